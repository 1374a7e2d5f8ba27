//! Quorum and failure handling of the relay cluster, without I/O.
//!
//! Every decision a relay makes about its peers that needs no socket lives here, so the
//! simulated network (`core/tests/cluster_sim.rs`) can test it deterministically; the relay
//! feeds in heartbeats, acks and the time, and sends what these functions choose.
//!
//! - **Failure detection** ([`FailureDetector`]): a node is [`Health::Up`] while its
//!   heartbeats are recent, [`Health::Suspect`] after `suspect_after_ms` of silence and
//!   [`Health::Down`] after `down_after_ms` (or when a connection to it failed).
//! - **Sloppy quorum** ([`write_targets`], [`WriteQuorum`]): Dynamo's write path
//!   (DeCandia et al., "Dynamo: Amazon's Highly Available Key-value Store", SOSP 2007,
//!   §4.5-4.6). The coordinator sends a write to the first N *healthy* nodes of the
//!   document's [`Ring::walk`]; a node beyond the N owners stands in for one owner that is
//!   down and keeps the write with a **hint** naming it. The client is acked after W
//!   durable acks. Acks are counted apart for owners and for fallbacks, as Riak's
//!   `node_confirms` and `pw` do, so durability is never overstated: a write held only by
//!   fallbacks is durable but not yet where it belongs, and a coordinator may insist on
//!   some owners ([`WriteQuorum::with_owner_quorum`]).
//! - **Hinted handoff** ([`HintQueue`], [`handoff_due`]): a fallback delivers its hints once
//!   the owner is seen up again, a throttled batch at a time, and deletes each hint only
//!   after the owner acked it (Dynamo §4.6).
//! - **Anti-entropy planning** ([`anti_entropy_peers`], [`shares_range`],
//!   [`AntiEntropySchedule`]): replicas that share a range compare their document-set
//!   Merkle trees ([`crate::docset`], Riak's tictac AAE) with one peer at a time, in turn,
//!   at jittered intervals so that nodes do not fall into lock-step (Floyd and Jacobson,
//!   "The Synchronization of Periodic Routing Messages", 1994). The randomness is passed in.
//!
//! ```
//! use concord_core::cluster::{write_targets, Target, WriteQuorum};
//! use concord_core::ring::{Ring, RingNode};
//!
//! let ring = Ring::new(&["a", "b", "c", "d"].map(|id| RingNode::new(id, 1)), 64);
//! let walk = ring.walk("board-1");
//! let down = walk[1]; // the second owner is down
//! let targets = write_targets(&walk, 3, |node| node != down);
//! assert_eq!(targets.len(), 3);
//! assert_eq!(targets[2], Target { node: walk[3].to_string(), hint_for: Some(down.to_string()) });
//!
//! let mut quorum = WriteQuorum::new(2, targets);
//! assert!(!quorum.ack(walk[3])); // the fallback persisted it (with its hint)
//! assert!(quorum.ack(walk[0])); // the second durable ack: tell the client
//! assert_eq!((quorum.owner_acks(), quorum.fallback_acks()), (1, 1));
//! ```

use crate::ring::Ring;
use crate::vv::VersionVector;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// The version durable on at least `w` of the given replicas: per replica id, the `w`-th
/// highest entry among `versions` (each a replica's durable, contiguous version). What a
/// coordinator may acknowledge without overstating durability.
///
/// ```
/// use concord_core::cluster::quorum_version;
/// use concord_core::{ReplicaId, VersionVector};
/// let a = VersionVector::from_iter([(ReplicaId(1), 5)]);
/// let b = VersionVector::from_iter([(ReplicaId(1), 3)]);
/// let c = VersionVector::new();
/// assert_eq!(quorum_version(2, &[&a, &b, &c]).get(ReplicaId(1)), 3);
/// assert_eq!(quorum_version(3, &[&a, &b, &c]).get(ReplicaId(1)), 0);
/// ```
pub fn quorum_version(w: usize, versions: &[&VersionVector]) -> VersionVector {
    let mut out = VersionVector::new();
    if w == 0 || versions.len() < w {
        return out;
    }
    let replicas: BTreeSet<crate::ReplicaId> = versions.iter().flat_map(|v| v.iter().map(|e| e.0)).collect();
    for r in replicas {
        let mut seqs: Vec<u64> = versions.iter().map(|v| v.get(r)).collect();
        seqs.sort_unstable_by(|a, b| b.cmp(a));
        out.raise(r, seqs[w - 1]);
    }
    out
}

/// What a node's failure detector thinks of a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Health {
    /// Heard from recently.
    Up,
    /// Silent for a while: still tried, but do not start handoff to it.
    Suspect,
    /// Silent for long, or a connection to it failed: skipped by the sloppy quorum.
    Down,
}

/// Timeouts of a [`FailureDetector`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DetectorConfig {
    /// Silence after which a node is [`Health::Suspect`].
    pub suspect_after_ms: u64,
    /// Silence after which a node is [`Health::Down`].
    pub down_after_ms: u64,
}

impl Default for DetectorConfig {
    /// Suitable for heartbeats every second: suspect after 3 s, down after 10 s.
    fn default() -> Self {
        DetectorConfig { suspect_after_ms: 3_000, down_after_ms: 10_000 }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seen {
    last_ms: u64,
    /// A connection failed after the last heartbeat.
    failed: bool,
}

/// A timeout failure detector: one node's view of its peers' health.
///
/// A node never heard from counts from the moment the detector was made, so a fresh
/// relay gives its peers `suspect_after_ms` to say hello before it routes around them.
///
/// ```
/// use concord_core::cluster::{DetectorConfig, FailureDetector, Health};
/// let mut fd = FailureDetector::new(DetectorConfig { suspect_after_ms: 100, down_after_ms: 300 }, 0);
/// assert_eq!(fd.health("b", 50), Health::Up); // grace period at start
/// fd.heartbeat("b", 1_000);
/// assert_eq!(fd.health("b", 1_050), Health::Up);
/// assert_eq!(fd.health("b", 1_100), Health::Suspect);
/// assert_eq!(fd.health("b", 1_300), Health::Down);
/// fd.mark_down("c", 1_300); // its connection was refused
/// assert_eq!(fd.health("c", 1_300), Health::Down);
/// fd.heartbeat("c", 1_310);
/// assert!(fd.is_up("c", 1_310));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailureDetector {
    config: DetectorConfig,
    started_ms: u64,
    seen: BTreeMap<String, Seen>,
}

impl FailureDetector {
    /// A detector started at `now_ms`. `down_after_ms` is raised to `suspect_after_ms`
    /// if it is smaller.
    pub fn new(config: DetectorConfig, now_ms: u64) -> Self {
        let config = DetectorConfig {
            suspect_after_ms: config.suspect_after_ms,
            down_after_ms: config.down_after_ms.max(config.suspect_after_ms),
        };
        FailureDetector { config, started_ms: now_ms, seen: BTreeMap::new() }
    }

    /// Its timeouts.
    pub fn config(&self) -> DetectorConfig {
        self.config
    }

    /// `node` showed it is alive at `now_ms` (a heartbeat, or any message from it).
    /// Clears a [`FailureDetector::mark_down`]. Times never go backwards.
    pub fn heartbeat(&mut self, node: &str, now_ms: u64) {
        match self.seen.get_mut(node) {
            Some(s) => {
                s.last_ms = s.last_ms.max(now_ms);
                s.failed = false;
            }
            None => {
                self.seen.insert(node.to_string(), Seen { last_ms: now_ms, failed: false });
            }
        }
    }

    /// A connection to `node` failed: it is [`Health::Down`] until it is heard from again.
    pub fn mark_down(&mut self, node: &str, now_ms: u64) {
        let started = self.started_ms;
        let s =
            self.seen.entry(node.to_string()).or_insert(Seen { last_ms: started.min(now_ms), failed: true });
        s.failed = true;
    }

    /// `node`'s health at `now_ms`.
    pub fn health(&self, node: &str, now_ms: u64) -> Health {
        let (last, failed) = match self.seen.get(node) {
            Some(s) => (s.last_ms, s.failed),
            None => (self.started_ms, false),
        };
        let silent = now_ms.saturating_sub(last);
        if failed || silent >= self.config.down_after_ms {
            Health::Down
        } else if silent >= self.config.suspect_after_ms {
            Health::Suspect
        } else {
            Health::Up
        }
    }

    /// Whether `node` is [`Health::Up`].
    pub fn is_up(&self, node: &str, now_ms: u64) -> bool {
        self.health(node, now_ms) == Health::Up
    }

    /// Whether `node` is not [`Health::Down`] (worth sending a write to).
    pub fn is_available(&self, node: &str, now_ms: u64) -> bool {
        self.health(node, now_ms) != Health::Down
    }

    /// When `node` was last heard from.
    pub fn last_heard(&self, node: &str) -> Option<u64> {
        self.seen.get(node).map(|s| s.last_ms)
    }

    /// Forgets `node` (it left the cluster).
    pub fn forget(&mut self, node: &str) {
        self.seen.remove(node);
    }
}

/// One node a write is sent to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    /// The node.
    pub node: String,
    /// For a fallback: the down owner it stands in for (store the write with this hint).
    pub hint_for: Option<String>,
}

impl Target {
    /// Whether this is a fallback standing in for an owner.
    pub fn is_fallback(&self) -> bool {
        self.hint_for.is_some()
    }
}

/// The sloppy quorum: the first `n` nodes of `walk` that `is_up`, owners first. Each
/// fallback (a node beyond the first `n` of the walk) is paired with one skipped owner,
/// in walk order. Fewer than `n` targets come back when fewer nodes are up; a walk
/// shorter than `n` means fewer owners.
///
/// ```
/// use concord_core::cluster::write_targets;
/// let walk = ["a", "b", "c", "d", "e"];
/// let t = write_targets(&walk, 3, |n| n != "a" && n != "c");
/// let got: Vec<(&str, Option<&str>)> = t.iter().map(|t| (&*t.node, t.hint_for.as_deref())).collect();
/// assert_eq!(got, [("b", None), ("d", Some("a")), ("e", Some("c"))]);
/// ```
pub fn write_targets(walk: &[&str], n: usize, is_up: impl Fn(&str) -> bool) -> Vec<Target> {
    let (owners, rest) = walk.split_at(n.min(walk.len()));
    let mut out = Vec::with_capacity(owners.len());
    let mut skipped: VecDeque<&str> = VecDeque::new();
    for &o in owners {
        if is_up(o) {
            out.push(Target { node: o.to_string(), hint_for: None });
        } else {
            skipped.push_back(o);
        }
    }
    for &f in rest {
        if skipped.is_empty() {
            break;
        }
        if is_up(f) {
            out.push(Target { node: f.to_string(), hint_for: skipped.pop_front().map(str::to_string) });
        }
    }
    out
}

/// The nodes a read asks: the same first `n` healthy nodes of the walk that writes go to
/// (owners, and fallbacks that may hold hinted writes), so read repair reaches every
/// healthy owner. Empty when fewer than `r` nodes are up: the read cannot reach its
/// quorum, answer "not enough replicas" at once. The read succeeds on the first `r`
/// answers.
///
/// ```
/// use concord_core::cluster::read_targets;
/// let walk = ["a", "b", "c", "d"];
/// assert_eq!(read_targets(&walk, 3, 2, |n| n != "b"), ["a", "c", "d"]);
/// assert!(read_targets(&walk, 3, 2, |n| n == "a").is_empty());
/// ```
pub fn read_targets(walk: &[&str], n: usize, r: usize, is_up: impl Fn(&str) -> bool) -> Vec<String> {
    let targets = write_targets(walk, n, is_up);
    if targets.len() < r.max(1) {
        return Vec::new();
    }
    targets.into_iter().map(|t| t.node).collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Waiting,
    Acked,
    Failed,
}

/// Counts the durable acks of one write until W of them arrived. A read quorum counts
/// the same way: R answers from the read's targets.
///
/// Acks from nodes that are not targets, and repeated acks, are ignored; an ack that
/// arrives after its node was reported [`WriteQuorum::failed`] still counts (it did
/// persist the write).
///
/// ```
/// use concord_core::cluster::{write_targets, WriteQuorum};
/// let targets = write_targets(&["a", "b", "c", "d"], 3, |_| true);
/// let mut q = WriteQuorum::new(2, targets);
/// assert!(!q.ack("a"));
/// assert!(!q.ack("a")); // duplicates do not count
/// assert!(!q.ack("d")); // not a target
/// assert!(q.failed("b")); // W is still reachable through c
/// assert!(q.ack("c"));
/// assert!(!q.ack("b")); // true only once
/// assert_eq!(q.acks(), 3);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteQuorum {
    w: usize,
    pw: usize,
    targets: Vec<Target>,
    answers: Vec<Answer>,
    reached: bool,
}

impl WriteQuorum {
    /// Waits for `w` durable acks (at least 1) from `targets`.
    pub fn new(w: usize, targets: Vec<Target>) -> Self {
        let answers = vec![Answer::Waiting; targets.len()];
        WriteQuorum { w: w.max(1), pw: 0, targets, answers, reached: false }
    }

    /// Also requires `pw` of the W acks to come from owners (Riak's `pw`): a write
    /// held only by fallbacks is not acked.
    ///
    /// ```
    /// use concord_core::cluster::{write_targets, WriteQuorum};
    /// let targets = write_targets(&["a", "b", "c", "d"], 3, |n| n != "a");
    /// let mut q = WriteQuorum::new(2, targets).with_owner_quorum(2);
    /// assert!(!q.ack("d")); // a fallback
    /// assert!(!q.ack("b"));
    /// assert!(q.ack("c")); // the second owner
    /// ```
    pub fn with_owner_quorum(mut self, pw: usize) -> Self {
        self.pw = pw;
        self.reached = false;
        self
    }

    /// W.
    pub fn w(&self) -> usize {
        self.w
    }

    /// The nodes the write was sent to.
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    fn index(&self, node: &str) -> Option<usize> {
        self.targets.iter().position(|t| t.node == node)
    }

    fn count(&self, answer: Answer, fallback: Option<bool>) -> usize {
        self.targets
            .iter()
            .zip(&self.answers)
            .filter(|(t, a)| {
                **a == answer
                    && match fallback {
                        Some(f) => t.is_fallback() == f,
                        None => true,
                    }
            })
            .count()
    }

    /// `node` durably stored the write. True exactly once: when this ack completes the
    /// quorum.
    pub fn ack(&mut self, node: &str) -> bool {
        let Some(i) = self.index(node) else { return false };
        if self.answers[i] == Answer::Acked {
            return false;
        }
        self.answers[i] = Answer::Acked;
        if !self.reached && self.is_met() {
            self.reached = true;
            return true;
        }
        false
    }

    fn is_met(&self) -> bool {
        self.acks() >= self.w && self.owner_acks() >= self.pw
    }

    /// `node` will not ack (it is down, or its connection failed). Returns whether the
    /// quorum can still be reached (true if it already was).
    pub fn failed(&mut self, node: &str) -> bool {
        if let Some(i) = self.index(node) {
            if self.answers[i] == Answer::Waiting {
                self.answers[i] = Answer::Failed;
            }
        }
        self.is_reachable()
    }

    /// Whether the quorum was reached or can still be reached by the targets that have
    /// not answered.
    pub fn is_reachable(&self) -> bool {
        if self.reached {
            return true;
        }
        let open = self.count(Answer::Waiting, None);
        let open_owners = self.count(Answer::Waiting, Some(false));
        self.acks() + open >= self.w && self.owner_acks() + open_owners >= self.pw
    }

    /// Whether `node` acked.
    pub fn has_acked(&self, node: &str) -> bool {
        self.index(node).is_some_and(|i| self.answers[i] == Answer::Acked)
    }

    /// Whether W acks arrived.
    pub fn is_reached(&self) -> bool {
        self.reached
    }

    /// Durable acks so far.
    pub fn acks(&self) -> usize {
        self.count(Answer::Acked, None)
    }

    /// Durable acks from owners of the document.
    pub fn owner_acks(&self) -> usize {
        self.count(Answer::Acked, Some(false))
    }

    /// Durable acks from fallbacks (the write sits there as a hint).
    pub fn fallback_acks(&self) -> usize {
        self.count(Answer::Acked, Some(true))
    }

    /// Targets that have neither acked nor failed.
    pub fn waiting(&self) -> impl Iterator<Item = &Target> {
        self.targets.iter().zip(&self.answers).filter(|(_, a)| **a == Answer::Waiting).map(|(t, _)| t)
    }
}

/// Whether a fallback should start handing hints over to `hinted_owner`: only once it is
/// [`Health::Up`] again (a suspect node may be dying; delivering to it would only be
/// retried). The owner is named so callers read as the decision they make.
pub fn handoff_due(hinted_owner: &str, health: Health) -> bool {
    let _ = hinted_owner;
    health == Health::Up
}

/// A write a fallback keeps for an owner that was down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hint<T> {
    /// Unique id (the relay's storage assigns it; it survives restarts).
    pub id: u64,
    /// The owner the write is meant for.
    pub owner: String,
    /// The document.
    pub doc: String,
    /// The write (a delta, or its encoding).
    pub payload: T,
}

/// The hints a fallback holds, and which are being handed over.
///
/// Per owner, hints go out in id order, at most `max` in flight at once; a hint not acked
/// within `resend_after_ms` is sent again (messages may be lost), and it is removed only
/// by [`HintQueue::delivered`], after the owner's ack. In-flight marks are not state worth
/// persisting: after a restart, rebuild the queue from the stored hints.
///
/// ```
/// use concord_core::cluster::{Health, Hint, HintQueue};
/// let mut q = HintQueue::new(1_000);
/// for id in 1..=3 {
///     q.insert(Hint { id, owner: "c".into(), doc: "board-1".into(), payload: vec![id as u8] });
/// }
/// assert_eq!(q.due_owners(|_| Health::Up), ["c"]);
/// let batch: Vec<u64> = q.next_batch("c", 2, 0).iter().map(|h| h.id).collect();
/// assert_eq!(batch, [1, 2]);
/// assert!(q.next_batch("c", 2, 10).is_empty()); // two already in flight
/// assert!(q.delivered(1).is_some()); // the owner acked: delete the stored hint too
/// assert_eq!(q.next_batch("c", 2, 20).len(), 1); // hint 3
/// assert_eq!(q.next_batch("c", 2, 1_010)[0].id, 2); // no ack for 2 in time: resent
/// assert_eq!(q.len(), 2);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HintQueue<T> {
    resend_after_ms: u64,
    hints: BTreeMap<u64, Hint<T>>,
    by_owner: BTreeMap<String, BTreeSet<u64>>,
    /// Hint id -> when it was last sent.
    in_flight: BTreeMap<u64, u64>,
}

impl<T> HintQueue<T> {
    /// An empty queue; unacked hints are resent after `resend_after_ms`.
    pub fn new(resend_after_ms: u64) -> Self {
        HintQueue {
            resend_after_ms,
            hints: BTreeMap::new(),
            by_owner: BTreeMap::new(),
            in_flight: BTreeMap::new(),
        }
    }

    /// A queue holding `hints` (read back from storage after a restart).
    pub fn from_hints(resend_after_ms: u64, hints: impl IntoIterator<Item = Hint<T>>) -> Self {
        let mut q = HintQueue::new(resend_after_ms);
        for h in hints {
            q.insert(h);
        }
        q
    }

    /// Adds a hint (after storing it durably). False, and nothing changes, if its id is
    /// already queued.
    pub fn insert(&mut self, hint: Hint<T>) -> bool {
        if self.hints.contains_key(&hint.id) {
            return false;
        }
        self.by_owner.entry(hint.owner.clone()).or_default().insert(hint.id);
        self.hints.insert(hint.id, hint);
        true
    }

    /// The owner acked hint `id`: removes and returns it (delete the stored copy). `None`
    /// for an unknown or already delivered id.
    pub fn delivered(&mut self, id: u64) -> Option<Hint<T>> {
        let hint = self.hints.remove(&id)?;
        self.in_flight.remove(&id);
        if let Some(ids) = self.by_owner.get_mut(&hint.owner) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_owner.remove(&hint.owner);
            }
        }
        Some(hint)
    }

    /// Up to `max` hints for `owner` to send now (in id order), counting those already in
    /// flight: hints never sent and hints whose last send is `resend_after_ms` old. Marks
    /// them as sent at `now_ms`.
    pub fn next_batch(&mut self, owner: &str, max: usize, now_ms: u64) -> Vec<&Hint<T>> {
        let Some(ids) = self.by_owner.get(owner) else { return Vec::new() };
        let mut busy = 0;
        let mut ready = Vec::new();
        for id in ids {
            match self.in_flight.get(id) {
                Some(&sent) if now_ms.saturating_sub(sent) < self.resend_after_ms => busy += 1,
                _ => ready.push(*id),
            }
        }
        ready.truncate(max.saturating_sub(busy));
        for id in &ready {
            self.in_flight.insert(*id, now_ms);
        }
        ready.iter().filter_map(|id| self.hints.get(id)).collect()
    }

    /// The connection to `owner` dropped: its in-flight hints may be sent again at once.
    pub fn retry(&mut self, owner: &str) {
        if let Some(ids) = self.by_owner.get(owner) {
            for id in ids {
                self.in_flight.remove(id);
            }
        }
    }

    /// Owners with hints that [`handoff_due`] says to deliver now, in name order.
    pub fn due_owners(&self, health: impl Fn(&str) -> Health) -> Vec<&str> {
        self.by_owner.keys().map(String::as_str).filter(|o| handoff_due(o, health(o))).collect()
    }

    /// Owners with hints, in name order.
    pub fn owners(&self) -> impl Iterator<Item = &str> {
        self.by_owner.keys().map(String::as_str)
    }

    /// Hints for `owner`.
    pub fn len_for(&self, owner: &str) -> usize {
        self.by_owner.get(owner).map_or(0, BTreeSet::len)
    }

    /// All hints.
    pub fn len(&self) -> usize {
        self.hints.len()
    }

    /// Whether no hint is held.
    pub fn is_empty(&self) -> bool {
        self.hints.is_empty()
    }

    /// The hint `id`.
    pub fn get(&self, id: u64) -> Option<&Hint<T>> {
        self.hints.get(&id)
    }

    /// Every hint, in id order.
    pub fn iter(&self) -> impl Iterator<Item = &Hint<T>> {
        self.hints.values()
    }
}

/// Nodes that share at least one range with `me` when documents are kept `n` times: the
/// peers `me` runs anti-entropy with. In configuration order, without `me`.
///
/// ```
/// use concord_core::cluster::anti_entropy_peers;
/// use concord_core::ring::{Ring, RingNode};
/// let ring = Ring::new(&["a", "b", "c"].map(|id| RingNode::new(id, 1)), 16);
/// assert_eq!(anti_entropy_peers(&ring, "a", 3), ["b", "c"]);
/// assert!(anti_entropy_peers(&ring, "a", 1).is_empty()); // one copy: nothing to compare
/// ```
pub fn anti_entropy_peers(ring: &Ring, me: &str, n: usize) -> Vec<String> {
    let mut shared = BTreeSet::new();
    for (_, owners) in ring.ranges(n) {
        if owners.contains(&me) {
            shared.extend(owners.into_iter().filter(|o| *o != me));
        }
    }
    ring.nodes().filter(|id| shared.contains(id)).map(str::to_string).collect()
}

/// Whether `me` and `peer` are both owners of `doc_id`: the documents two peers compare
/// during anti-entropy.
///
/// ```
/// use concord_core::cluster::shares_range;
/// use concord_core::ring::{Ring, RingNode};
/// let ring = Ring::new(&["a", "b", "c", "d"].map(|id| RingNode::new(id, 1)), 16);
/// let owners = ring.preference_list("doc", 2);
/// assert!(shares_range(&ring, owners[0], owners[1], "doc", 2));
/// assert!(!shares_range(&ring, owners[0], owners[0], "doc", 2)); // not with itself
/// ```
pub fn shares_range(ring: &Ring, me: &str, peer: &str, doc_id: &str, n: usize) -> bool {
    let owners = ring.preference_list(doc_id, n);
    me != peer && owners.contains(&me) && owners.contains(&peer)
}

/// When the next anti-entropy exchange is due, and with whom.
///
/// Exchanges run every `interval_ms`, moved by up to `jitter_ms` either way so that
/// nodes started together drift apart; peers are taken in turn from a random start, so
/// each is visited once per round (Riak's AAE exchange queue).
///
/// ```
/// use concord_core::cluster::AntiEntropySchedule;
/// let mut s = AntiEntropySchedule::new(10_000, 2_000);
/// assert!(s.is_due(0)); // new: due at once (call `next_due` first to spread a start)
/// let at = s.next_due(0, 12345);
/// assert!((8_000..=12_000).contains(&at));
/// assert!(!s.is_due(at - 1) && s.is_due(at));
/// let peers = ["b".to_string(), "c".to_string()];
/// let first = s.pick_peer(&peers, 7).unwrap().to_string();
/// let second = s.pick_peer(&peers, 99).unwrap();
/// assert_ne!(first, second); // in turn
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AntiEntropySchedule {
    interval_ms: u64,
    jitter_ms: u64,
    due_ms: u64,
    turn: Option<u64>,
}

impl AntiEntropySchedule {
    /// Exchanges every `interval_ms ± jitter_ms` (the jitter is capped at the interval).
    pub fn new(interval_ms: u64, jitter_ms: u64) -> Self {
        AntiEntropySchedule { interval_ms, jitter_ms: jitter_ms.min(interval_ms), due_ms: 0, turn: None }
    }

    /// Whether an exchange is due at `now_ms`.
    pub fn is_due(&self, now_ms: u64) -> bool {
        now_ms >= self.due_ms
    }

    /// When the next exchange is due.
    pub fn due_at(&self) -> u64 {
        self.due_ms
    }

    /// Schedules the next exchange after one that starts at `now_ms`, using the random
    /// `rand`; returns when it is due.
    pub fn next_due(&mut self, now_ms: u64, rand: u64) -> u64 {
        let span = self.jitter_ms.saturating_mul(2).saturating_add(1);
        let delay = self.interval_ms - self.jitter_ms + rand % span;
        self.due_ms = now_ms.saturating_add(delay.max(1));
        self.due_ms
    }

    /// The peer to exchange with next: `peers` in turn, starting at a random one.
    pub fn pick_peer<'a>(&mut self, peers: &'a [String], rand: u64) -> Option<&'a str> {
        if peers.is_empty() {
            return None;
        }
        let turn = *self.turn.get_or_insert(rand);
        self.turn = Some(turn.wrapping_add(1));
        Some(&peers[(turn % peers.len() as u64) as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::RingNode;

    fn t(node: &str, hint: Option<&str>) -> Target {
        Target { node: node.into(), hint_for: hint.map(Into::into) }
    }

    #[test]
    fn write_targets_take_the_owners_when_all_are_up() {
        assert_eq!(
            write_targets(&["a", "b", "c", "d"], 3, |_| true),
            [t("a", None), t("b", None), t("c", None)]
        );
    }

    #[test]
    fn write_targets_pair_each_fallback_with_one_down_owner_in_order() {
        let walk = ["a", "b", "c", "d", "e", "f"];
        let got = write_targets(&walk, 3, |n| !matches!(n, "a" | "b" | "d"));
        assert_eq!(got, [t("c", None), t("e", Some("a")), t("f", Some("b"))]);
    }

    #[test]
    fn write_targets_return_fewer_when_too_few_nodes_are_up() {
        let got = write_targets(&["a", "b", "c", "d"], 3, |n| n == "a" || n == "d");
        assert_eq!(got, [t("a", None), t("d", Some("b"))]);
        assert!(write_targets(&["a", "b"], 3, |_| false).is_empty());
        assert_eq!(write_targets(&["a", "b"], 3, |_| true).len(), 2);
    }

    #[test]
    fn read_targets_need_r_healthy_nodes() {
        assert_eq!(read_targets(&["a", "b", "c"], 3, 2, |_| true), ["a", "b", "c"]);
        assert_eq!(read_targets(&["a", "b", "c"], 3, 3, |n| n != "c"), Vec::<String>::new());
    }

    #[test]
    fn quorum_counts_owner_and_fallback_acks_apart() {
        let targets = write_targets(&["a", "b", "c", "d", "e"], 3, |n| n != "a" && n != "b");
        let mut q = WriteQuorum::new(2, targets);
        assert!(!q.ack("d"));
        assert!(q.ack("e"));
        assert_eq!((q.acks(), q.owner_acks(), q.fallback_acks()), (2, 0, 2));
        assert!(q.is_reached());
        assert_eq!(q.waiting().map(|t| t.node.as_str()).collect::<Vec<_>>(), ["c"]);
    }

    #[test]
    fn quorum_becomes_unreachable_when_too_many_targets_fail() {
        let mut q = WriteQuorum::new(2, write_targets(&["a", "b", "c"], 3, |_| true));
        assert!(q.failed("a"));
        assert!(!q.failed("b"));
        assert!(!q.is_reachable());
        // A late ack from a node reported failed still counts: it persisted the write.
        assert!(!q.ack("c"));
        assert!(q.ack("a"));
    }

    #[test]
    fn quorum_with_more_w_than_targets_is_unreachable_from_the_start() {
        let q = WriteQuorum::new(3, write_targets(&["a", "b"], 3, |_| true));
        assert!(!q.is_reachable());
        let q =
            WriteQuorum::new(2, write_targets(&["a", "b", "c", "d"], 3, |n| n != "a")).with_owner_quorum(3);
        assert!(!q.is_reachable(), "only two owners are up");
    }

    #[test]
    fn a_write_quorum_of_zero_waits_for_one_ack() {
        let mut q = WriteQuorum::new(0, write_targets(&["a"], 1, |_| true));
        assert!(!q.is_reached());
        assert!(q.ack("a"));
    }

    #[test]
    fn detector_walks_up_suspect_down_and_back() {
        let cfg = DetectorConfig { suspect_after_ms: 10, down_after_ms: 20 };
        let mut fd = FailureDetector::new(cfg, 100);
        assert_eq!(fd.health("x", 109), Health::Up);
        assert_eq!(fd.health("x", 110), Health::Suspect);
        assert_eq!(fd.health("x", 120), Health::Down);
        fd.heartbeat("x", 121);
        fd.heartbeat("x", 90); // late, out of order: ignored
        assert_eq!(fd.last_heard("x"), Some(121));
        assert!(fd.is_up("x", 130));
        assert!(fd.is_available("x", 131) && !fd.is_up("x", 131));
        fd.forget("x");
        assert_eq!(fd.last_heard("x"), None);
        let odd = FailureDetector::new(DetectorConfig { suspect_after_ms: 50, down_after_ms: 5 }, 0);
        assert_eq!(odd.config().down_after_ms, 50);
    }

    #[test]
    fn hints_go_out_in_id_order_per_owner_and_leave_only_when_delivered() {
        let mut q = HintQueue::new(100);
        for (id, owner) in [(5, "b"), (1, "a"), (3, "a"), (2, "b")] {
            assert!(q.insert(Hint { id, owner: owner.into(), doc: "d".into(), payload: () }));
        }
        assert!(!q.insert(Hint { id: 5, owner: "a".into(), doc: "d".into(), payload: () }));
        assert_eq!(q.owners().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(q.due_owners(|o| if o == "a" { Health::Suspect } else { Health::Up }), ["b"]);
        let ids: Vec<u64> = q.next_batch("b", 10, 0).iter().map(|h| h.id).collect();
        assert_eq!(ids, [2, 5]);
        assert!(q.next_batch("b", 10, 1).is_empty(), "both are in flight");
        q.retry("b");
        assert_eq!(q.next_batch("b", 1, 2).iter().map(|h| h.id).collect::<Vec<_>>(), [2]);
        assert!(q.next_batch("b", 1, 3).is_empty(), "one in flight, max one");
        assert_eq!(q.delivered(2).map(|h| h.owner), Some("b".to_string()));
        assert_eq!(q.delivered(2), None);
        assert_eq!(q.len_for("b"), 1);
        assert!(q.delivered(5).is_some());
        assert_eq!(q.owners().collect::<Vec<_>>(), ["a"]);
        let rebuilt = HintQueue::from_hints(100, q.iter().cloned());
        assert_eq!(rebuilt.len(), 2);
        assert!(!rebuilt.is_empty() && rebuilt.get(3).is_some());
    }

    #[test]
    fn schedule_stays_within_its_jitter() {
        let mut s = AntiEntropySchedule::new(100, 500);
        for r in [0, 1, 199, 200, u64::MAX] {
            let at = s.next_due(1_000, r);
            assert!((1_001..=1_200).contains(&at), "{at}");
        }
        let mut s = AntiEntropySchedule::new(0, 0);
        assert_eq!(s.next_due(5, 3), 6, "never due again at the same instant");
        assert_eq!(s.pick_peer(&[], 1), None);
    }

    #[test]
    fn every_node_of_a_small_ring_is_an_anti_entropy_peer() {
        let ring = Ring::new(&["a", "b", "c", "d", "e"].map(|id| RingNode::new(id, 1)), 64);
        assert_eq!(anti_entropy_peers(&ring, "c", 3), ["a", "b", "d", "e"]);
        assert!(anti_entropy_peers(&ring, "zz", 3).is_empty());
    }
}
