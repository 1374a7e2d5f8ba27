//! The coordinator of one relay node in a cluster, without I/O: which client writes have
//! reached their write quorum (W), which client reads their read quorum (R), what the
//! node may acknowledge, and when to give up and say `NOT_ENOUGH_REPLICAS`.
//!
//! The relay feeds it events — a client write applied here, this node's durable version,
//! a peer's durable ack, a client subscription, a peer's answer, the passing of time, a
//! closed connection — and executes the [`Action`]s it returns: acknowledge a client,
//! answer a client's read, ask a peer afresh, report an error. It decides nothing else;
//! the seeded cluster simulator drives the same type.
//!
//! Targets (the first N healthy nodes of a document's preference list, [`crate::cluster::write_targets`])
//! are passed in: health and the ring belong to the caller. Time is milliseconds on any
//! monotonic clock the caller chooses.
//!
//! ```
//! use concord_core::coordinator::{Action, Coordinator};
//! use concord_core::cluster::write_targets;
//! use concord_core::{CausalContext, ReplicaId, Span};
//! let mut c = Coordinator::new("a", 2, 2, 3_000);
//! let targets = write_targets(&["a", "b", "c"], 3, |_| true);
//! let span = Span { replica: ReplicaId(9), first: 1, last: 1 };
//! assert!(c.write(1, "doc", vec![span], targets, 0).is_empty());
//! let mut durable = CausalContext::default();
//! durable.insert_span(span);
//! assert!(c.durable("doc", &durable, 1).is_empty()); // 1 of W = 2
//! let acts = c.peer_ack("b", "doc", &durable.vv, &durable.vv, 2);
//! assert!(matches!(&acts[0], Action::Ack { conn: 1, .. }));
//! ```

use std::collections::{HashMap, HashSet};

use crate::cluster::{quorum_version, Target, WriteQuorum};
use crate::id::Span;
use crate::vv::{CausalContext, VersionVector};

/// A connection of the relay (any id the caller chooses).
pub type ConnId = u64;

/// What the relay must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Acknowledge to client `conn` that `doc` is durable on W replicas up to `vv`.
    Ack {
        /// The client.
        conn: ConnId,
        /// The document.
        doc: String,
        /// Everything of `doc` durable on W replicas.
        vv: VersionVector,
        /// Milliseconds from the write to its quorum.
        latency_ms: u64,
        /// Acks of owners and of fallbacks that made the quorum.
        owner_acks: usize,
        /// See `owner_acks`.
        fallback_acks: usize,
    },
    /// More of `doc` became durable on W replicas (through any path): acknowledge `vv` to
    /// every client of the document.
    Acked {
        /// The document.
        doc: String,
        /// Everything of `doc` durable on W replicas.
        vv: VersionVector,
    },
    /// Client `conn`'s read of `doc` is complete: answer its subscription now.
    Answer {
        /// The client.
        conn: ConnId,
        /// The document.
        doc: String,
    },
    /// Ask `peer` afresh for `doc` (a new subscription on its link, answered after
    /// everything it sent before).
    Probe {
        /// The peer node.
        peer: String,
        /// The document.
        doc: String,
    },
    /// Tell client `conn` that too few replicas answered in time.
    NotEnoughReplicas {
        /// The client.
        conn: ConnId,
        /// The document.
        doc: String,
        /// For the client: what happened and what follows.
        message: String,
    },
}

struct Write {
    conn: ConnId,
    spans: Vec<Span>,
    quorum: WriteQuorum,
    deadline: u64,
    received: u64,
}

struct Read {
    conn: ConnId,
    quorum: WriteQuorum,
    deadline: u64,
}

#[derive(Default)]
struct Doc {
    /// What is durable on W replicas: what clients are acknowledged for.
    quorum: CausalContext,
    /// Per peer: the version it acknowledged as durable.
    peer_acks: HashMap<String, VersionVector>,
    /// Nodes seen among the targets as owners (not standing in for one): the replicas
    /// whose durable versions [`Coordinator::acked`] may count.
    owners: HashSet<String>,
    writes: Vec<Write>,
    reads: Vec<Read>,
}

/// The write and read quorums of one node (see the module docs).
pub struct Coordinator {
    me: String,
    w: usize,
    r: usize,
    timeout_ms: u64,
    docs: HashMap<String, Doc>,
}

impl Coordinator {
    /// The coordinator of node `me` with quorums `w` and `r`, giving up on a quorum (for
    /// now) after `timeout_ms`.
    pub fn new(me: &str, w: usize, r: usize, timeout_ms: u64) -> Self {
        Coordinator { me: me.to_owned(), w: w.max(1), r: r.max(1), timeout_ms, docs: HashMap::new() }
    }

    /// R.
    pub fn r(&self) -> usize {
        self.r
    }

    /// Everything of `doc` durable on W replicas, given this node's durable version:
    /// what write quorums completed here, and per replica id the W-th highest of the
    /// durable versions of the document's owners — this node's and the ones peers
    /// acknowledged — counting only nodes seen among the targets as owners.
    ///
    /// A node that is not an owner may hold a copy, but it is nobody's replica: this
    /// node's copy when it coordinates a document it does not own is never handed over,
    /// and a fallback's copy stops standing in for its owner once its hint is delivered
    /// (the owner then holds it: counting both would count one copy twice). A fallback's
    /// ack counts only in the quorum of the write it was sent for.
    ///
    /// ```
    /// use concord_core::coordinator::Coordinator;
    /// use concord_core::cluster::write_targets;
    /// use concord_core::{ReplicaId, VersionVector};
    /// let v = VersionVector::from_iter([(ReplicaId(9), 1)]);
    /// // "d" coordinates for owners a, b, c; it holds a copy, and a acked.
    /// let mut c = Coordinator::new("d", 2, 2, 3_000);
    /// c.read(1, "doc", write_targets(&["a", "b", "c", "d"], 3, |_| true), 0);
    /// c.peer_ack("a", "doc", &v, &v, 1);
    /// assert!(c.acked("doc", &v).is_empty()); // one replica: d's copy does not count
    /// c.peer_ack("b", "doc", &v, &v, 2);
    /// assert_eq!(c.acked("doc", &v), v);
    /// ```
    pub fn acked(&self, doc: &str, durable: &VersionVector) -> VersionVector {
        let Some(d) = self.docs.get(doc) else { return VersionVector::new() };
        let mine = d.owners.contains(&self.me).then_some(durable);
        let peers = d.peer_acks.iter().filter(|(p, _)| d.owners.contains(*p)).map(|(_, vv)| vv);
        let all: Vec<&VersionVector> = mine.into_iter().chain(peers).collect();
        let mut out = d.quorum.vv.clone();
        out.merge(&quorum_version(self.w, &all));
        out
    }

    /// Whether the quorum context holds `span`.
    pub fn is_acked(&self, doc: &str, span: Span) -> bool {
        self.docs.get(doc).is_some_and(|d| d.quorum.contains_span(span))
    }

    /// The owners this node stands in for, as a fallback target, in writes of `doc` still
    /// waiting for their quorum, sorted. Its own durability counts for them as a
    /// fallback's: before reporting it ([`Coordinator::durable`], [`Coordinator::retry`]),
    /// make sure a hint for each of them is stored with the document — the one stored when
    /// the write came may have been delivered and deleted while the write was held back.
    ///
    /// ```
    /// use concord_core::coordinator::Coordinator;
    /// use concord_core::cluster::write_targets;
    /// use concord_core::{ReplicaId, Span};
    /// let mut c = Coordinator::new("d", 2, 2, 3_000);
    /// let targets = write_targets(&["a", "b", "c", "d"], 3, |n| n != "b"); // d stands in for b
    /// let span = Span { replica: ReplicaId(9), first: 1, last: 1 };
    /// c.write(1, "doc", vec![span], targets, 0);
    /// assert_eq!(c.standing_in_for("doc"), ["b"]);
    /// ```
    pub fn standing_in_for(&self, doc: &str) -> Vec<String> {
        let Some(d) = self.docs.get(doc) else { return Vec::new() };
        let mut owners: Vec<String> = d
            .writes
            .iter()
            .flat_map(|w| w.quorum.targets())
            .filter(|t| t.node == self.me)
            .filter_map(|t| t.hint_for.clone())
            .collect();
        owners.sort_unstable();
        owners.dedup();
        owners
    }

    /// Whether nothing waits on `doc` (it may be unloaded).
    pub fn is_idle(&self, doc: &str) -> bool {
        self.docs.get(doc).is_none_or(|d| d.writes.is_empty() && d.reads.is_empty())
    }

    /// Forgets an unloaded document (what peers acknowledged is learned again).
    pub fn forget(&mut self, doc: &str) {
        if self.is_idle(doc) {
            self.docs.remove(doc);
        }
    }

    /// Client `conn` wrote `spans` of `doc`, applied here and sent to `targets`: it is
    /// acknowledged once W of them made it durable. Owners that already acknowledged a
    /// version holding the spans count at once; a fallback must acknowledge afresh, as
    /// its earlier version may have been handed over and its hint deleted since.
    pub fn write(
        &mut self,
        conn: ConnId,
        doc: &str,
        spans: Vec<Span>,
        targets: Vec<Target>,
        now: u64,
    ) -> Vec<Action> {
        let d = self.docs.entry(doc.to_owned()).or_default();
        learn_owners(&mut d.owners, &targets);
        let mut quorum = WriteQuorum::new(self.w, targets);
        for (peer, vv) in &d.peer_acks {
            if d.owners.contains(peer) && spans.iter().all(|s| vv.contains(s.last_dot())) {
                quorum.ack(peer);
            }
        }
        d.writes.push(Write { conn, spans, quorum, deadline: now + self.timeout_ms, received: now });
        self.complete_writes(doc, now)
    }

    /// Client `conn` sent `spans` again, all applied here before. The ones not yet on W
    /// replicas get a new quorum, returned for the caller to send to the replicas again;
    /// without any, the client is acknowledged at once.
    pub fn retry(
        &mut self,
        conn: ConnId,
        doc: &str,
        spans: Vec<Span>,
        targets: Vec<Target>,
        durable: &CausalContext,
        now: u64,
    ) -> (Vec<Span>, Vec<Action>) {
        let missing: Vec<Span> = spans.into_iter().filter(|s| !self.is_acked(doc, *s)).collect();
        if missing.is_empty() {
            let vv = self.docs.get(doc).map(|d| d.quorum.vv.clone()).unwrap_or_default();
            return (
                missing,
                vec![Action::Ack {
                    conn,
                    doc: doc.to_owned(),
                    vv,
                    latency_ms: 0,
                    owner_acks: 0,
                    fallback_acks: 0,
                }],
            );
        }
        let mut acts = self.write(conn, doc, missing.clone(), targets, now);
        acts.extend(self.durable(doc, durable, now));
        (missing, acts)
    }

    /// This node's durable context of `doc` grew. It counts for a write once its
    /// contiguous version holds the write, as a peer's acknowledged version does (see
    /// `complete_writes`); a document applies deltas in sequence, so it always does
    /// unless an earlier commit failed.
    pub fn durable(&mut self, doc: &str, durable: &CausalContext, now: u64) -> Vec<Action> {
        let Some(d) = self.docs.get_mut(doc) else { return Vec::new() };
        for w in &mut d.writes {
            if w.spans.iter().all(|s| durable.vv.contains(s.last_dot())) {
                w.quorum.ack(&self.me);
            }
        }
        self.complete_writes(doc, now)
    }

    /// Peer `peer` acknowledged `vv` of `doc` as durable; `durable` is this node's.
    pub fn peer_ack(
        &mut self,
        peer: &str,
        doc: &str,
        vv: &VersionVector,
        durable: &VersionVector,
        now: u64,
    ) -> Vec<Action> {
        let d = self.docs.entry(doc.to_owned()).or_default();
        let acked = d.peer_acks.entry(peer.to_owned()).or_default();
        acked.merge(vv);
        let acked = acked.clone();
        for w in &mut d.writes {
            if w.spans.iter().all(|s| acked.contains(s.last_dot())) {
                w.quorum.ack(peer);
            }
        }
        let mut acts = self.complete_writes(doc, now);
        // Writes acknowledged by W replicas through any path (e.g. after a restart).
        let qv = self.acked(doc, durable);
        if let Some(d) = self.docs.get_mut(doc) {
            if !qv.le(&d.quorum.vv) {
                d.quorum.absorb(&qv);
                acts.push(Action::Acked { doc: doc.to_owned(), vv: d.quorum.vv.clone() });
            }
        }
        acts
    }

    fn complete_writes(&mut self, doc: &str, now: u64) -> Vec<Action> {
        let Some(d) = self.docs.get_mut(doc) else { return Vec::new() };
        let mut acts = Vec::new();
        let mut i = 0;
        while i < d.writes.len() {
            if !d.writes[i].quorum.is_reached() {
                i += 1;
                continue;
            }
            let w = d.writes.remove(i);
            // Every ack that reached the quorum was a contiguous durable version (a
            // peer's, or this node's), so W targets hold each writer's dots from the
            // first: recorded so, the acknowledged version covers this write even when
            // the writer's earlier dots were acknowledged through another coordinator.
            // Recording the spans alone would leave them outside the version, and the
            // client, told only a version, would retry them forever.
            for s in &w.spans {
                d.quorum.insert_span(Span { first: 1, ..*s });
            }
            acts.push(Action::Ack {
                conn: w.conn,
                doc: doc.to_owned(),
                vv: d.quorum.vv.clone(),
                latency_ms: now.saturating_sub(w.received),
                owner_acks: w.quorum.owner_acks(),
                fallback_acks: w.quorum.fallback_acks(),
            });
        }
        acts
    }

    /// Client `conn` subscribed to `doc`. With R = 1 (or this node alone making R) it is
    /// answered at once; else the answer waits until R of `targets` answered a fresh
    /// subscription ([`Coordinator::peer_answered`]): the returned probes ask them.
    pub fn read(&mut self, conn: ConnId, doc: &str, targets: Vec<Target>, now: u64) -> Vec<Action> {
        learn_owners(&mut self.docs.entry(doc.to_owned()).or_default().owners, &targets);
        let mut quorum = WriteQuorum::new(self.r, targets);
        if self.r <= 1 || quorum.ack(&self.me) {
            return vec![Action::Answer { conn, doc: doc.to_owned() }];
        }
        let acts = probes(doc, &quorum);
        let d = self.docs.entry(doc.to_owned()).or_default();
        d.reads.push(Read { conn, quorum, deadline: now + self.timeout_ms });
        acts
    }

    /// Peer `peer` answered this node's latest subscription to `doc` (its state is merged
    /// here): count it for every read of `doc`.
    pub fn peer_answered(&mut self, peer: &str, doc: &str) -> Vec<Action> {
        let Some(d) = self.docs.get_mut(doc) else { return Vec::new() };
        let mut acts = Vec::new();
        d.reads.retain_mut(|r| {
            let done = r.quorum.ack(peer) || r.quorum.is_reached();
            if done {
                acts.push(Action::Answer { conn: r.conn, doc: doc.to_owned() });
            }
            !done
        });
        acts
    }

    /// Connection `conn` closed: its reads are dropped (its writes still complete, for
    /// the record).
    pub fn closed(&mut self, conn: ConnId) {
        for d in self.docs.values_mut() {
            d.reads.retain(|r| r.conn != conn);
        }
    }

    /// Time passed: writes past their deadline are reported and dropped (the client
    /// retries); reads past theirs go on against the targets of now (`targets(doc)`),
    /// keeping the answers of nodes still among them, and are reported unless those
    /// answers complete them (then they are answered instead).
    pub fn tick(&mut self, now: u64, targets: impl Fn(&str) -> Vec<Target>) -> Vec<Action> {
        let mut acts = Vec::new();
        for (doc, d) in &mut self.docs {
            d.writes.retain(|w| {
                if w.deadline > now {
                    return true;
                }
                acts.push(Action::NotEnoughReplicas {
                    conn: w.conn,
                    doc: doc.clone(),
                    message: format!(
                        "only {} of {} replicas confirmed the write in time; it is kept on your side, retry",
                        w.quorum.acks(),
                        w.quorum.w()
                    ),
                });
                false
            });
            for r in d.reads.iter_mut().filter(|r| r.deadline <= now) {
                r.deadline = now + self.timeout_ms;
                let (answered, wanted) = (r.quorum.acks(), r.quorum.w());
                let now_targets = targets(doc);
                learn_owners(&mut d.owners, &now_targets);
                let mut quorum = WriteQuorum::new(self.r, now_targets);
                quorum.ack(&self.me);
                for t in r.quorum.targets().iter().filter(|t| r.quorum.has_acked(&t.node)) {
                    quorum.ack(&t.node);
                }
                r.quorum = quorum;
                if r.quorum.is_reached() {
                    // E.g. this node became a target itself: answered below, no error.
                    continue;
                }
                acts.push(Action::NotEnoughReplicas {
                    conn: r.conn,
                    doc: doc.clone(),
                    message: format!(
                        "read: {answered} of {wanted} replicas answered; showing local state until more do"
                    ),
                });
                acts.extend(probes(doc, &r.quorum));
            }
            d.reads.retain(|r| {
                let reached = r.quorum.is_reached();
                if reached {
                    acts.push(Action::Answer { conn: r.conn, doc: doc.clone() });
                }
                !reached
            });
        }
        acts
    }
}

/// Remembers which of `targets` are owners (not standing in for one).
fn learn_owners(owners: &mut HashSet<String>, targets: &[Target]) {
    for t in targets.iter().filter(|t| !t.is_fallback()) {
        if !owners.contains(&t.node) {
            owners.insert(t.node.clone());
        }
    }
}

/// Asks every target of `quorum` that has not answered, but this node.
fn probes(doc: &str, quorum: &WriteQuorum) -> Vec<Action> {
    quorum
        .targets()
        .iter()
        .filter(|t| !quorum.has_acked(&t.node))
        .map(|t| Action::Probe { peer: t.node.clone(), doc: doc.to_owned() })
        .collect()
}
