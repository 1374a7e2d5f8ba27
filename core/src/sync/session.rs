//! The per-peer sync state machine: bytes in, messages out, no I/O.
//!
//! Shape after Automerge's `sync.rs` and yrs' `sync/protocol.rs`: the caller owns the
//! documents (a [`DocStore`]) and the socket; a [`Session`] owns what this side knows of
//! one peer. The same machine runs tab<->relay, tab<->tab and relay<->relay.
//!
//! Each direction of a document is a subscription: the subscriber sends its version
//! vector; the other side answers with exactly the deltas the vector lacks (from its delta
//! log) followed by [`Synced`], or — when the log no longer reaches back — with a Merkle
//! exchange that ends in the full state of the differing keys only; afterwards every new
//! delta is pushed live. This is delta-interval anti-entropy in the spirit of Almeida et
//! al. ("Delta State Replicated Data Types", 2018, Algorithm 2): per-peer knowledge of what
//! the peer has (never send back what it gave us), send only what it lacks, fall back to
//! state when deltas are gone. Answering a subscription also subscribes back, so both
//! sides end up with everything.
//!
//! Channels may lose, duplicate and reorder messages: deltas are idempotent and buffered
//! until contiguous; Merkle exchanges carry an id and track exactly which answers are
//! outstanding; [`Session::tick`] re-subscribes what has not settled.

use super::msg::*;
use crate::codec::Wire;
use crate::document::{Delta, DocError, Document, Field};
use crate::hash::FxHashMap;
use crate::id::ReplicaId;
use crate::merkle::{NodeId, DEPTH};
use crate::orset::{Entries, OrSet};
use crate::value::Value;
use crate::vv::{CausalContext, VersionVector};
use std::collections::{BTreeMap, HashMap};

/// Where a session finds documents. A relay loads (or creates) them on demand; a browser
/// replica answers only for documents it has open.
pub trait DocStore {
    /// The document `id`, or `None` when this side does not serve it.
    fn doc(&mut self, id: &str) -> Option<&mut Document>;
}

impl DocStore for HashMap<String, Document> {
    fn doc(&mut self, id: &str) -> Option<&mut Document> {
        self.get_mut(id)
    }
}

impl DocStore for BTreeMap<String, Document> {
    fn doc(&mut self, id: &str) -> Option<&mut Document> {
        self.get_mut(id)
    }
}

/// Tunables of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    /// No produced frame exceeds this many bytes (unless a single value is larger).
    pub max_frame: usize,
    /// Documents with at most this many keys are sent whole instead of by Merkle descent.
    pub full_state_keys: usize,
    /// Ticks without progress after which an unsettled subscription is sent again.
    pub stall_ticks: u64,
    /// Ticks after which a settled subscription is refreshed (repairs lost live deltas).
    pub resync_ticks: u64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self { max_frame: 256 * 1024, full_state_keys: 256, stall_ticks: 5, resync_ticks: 30 }
    }
}

/// Something the caller should know about.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The peer said hello (a relay checks the token here).
    PeerHello {
        /// Its replica id.
        replica: ReplicaId,
        /// Its token.
        token: Option<String>,
    },
    /// The peer subscribed to a document (a relay adds the connection to its room).
    Subscribed {
        /// Document id.
        doc: String,
    },
    /// The peer unsubscribed.
    Unsubscribed {
        /// Document id.
        doc: String,
    },
    /// Deltas from the peer were applied (in this order): persist and forward them.
    Applied {
        /// Document id.
        doc: String,
        /// Every delta actually applied, including buffered ones they unblocked.
        deltas: Vec<Delta>,
    },
    /// A state transfer was merged (persist a snapshot).
    StateMerged {
        /// Document id.
        doc: String,
    },
    /// This side now has everything the peer had at `vv`.
    Synced {
        /// Document id.
        doc: String,
        /// The peer's version at the time.
        vv: VersionVector,
    },
    /// The peer made everything up to `vv` durable.
    Acked {
        /// Document id.
        doc: String,
        /// Durable version.
        vv: VersionVector,
    },
    /// Progress of a state transfer into this side.
    Progress {
        /// Document id.
        doc: String,
        /// Keys received.
        done: u64,
        /// Keys expected.
        total: u64,
    },
    /// The peer reported an error.
    PeerError(ErrorMsg),
    /// The peer asked about this side's document set: a relay answers it from the set it
    /// shares with that peer, if the peer is a relay (see [`DocSetAnswerMsg::frames`]).
    DocSetQuery(DocSetQueryMsg),
    /// A part of the answer to a document-set query this side sent.
    DocSetAnswer(DocSetAnswerMsg),
}

/// What handling one frame produced.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Output {
    /// Messages to send back to the peer, in order.
    pub replies: Vec<Msg>,
    /// Things the caller must act on.
    pub events: Vec<Event>,
}

/// Why a frame was refused. The session is unchanged and stays usable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SyncError {
    /// The bytes are not a message.
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    /// No protocol version in common.
    #[error("protocol version mismatch: we speak {ours_min}..={ours}, the peer speaks {theirs_min}..={theirs}; upgrade the older side")]
    Version {
        /// Our highest version.
        ours: u16,
        /// Our lowest version.
        ours_min: u16,
        /// Their highest version.
        theirs: u16,
        /// Their lowest version.
        theirs_min: u16,
    },
    /// A message other than `Hello` came first.
    #[error("message before hello; send Hello first")]
    NoHello,
    /// One document refused the message; other documents are unaffected.
    #[error("document \"{doc}\": {error}")]
    Doc {
        /// Document id.
        doc: String,
        /// Why.
        error: DocError,
    },
}

impl SyncError {
    /// The error message to send the peer.
    pub fn to_msg(&self) -> Msg {
        let (code, doc) = match self {
            SyncError::Frame(FrameError::UnknownTag(_)) => (ErrorCode::UNKNOWN_TAG, None),
            SyncError::Frame(_) => (ErrorCode::BAD_FRAME, None),
            SyncError::Version { .. } => (ErrorCode::VERSION, None),
            SyncError::NoHello => (ErrorCode::NO_HELLO, None),
            SyncError::Doc { doc, error: DocError::Amnesia { .. } } => {
                (ErrorCode::AMNESIA, Some(doc.clone()))
            }
            SyncError::Doc { doc, .. } => (ErrorCode::INVALID, Some(doc.clone())),
        };
        Msg::Error(ErrorMsg { code, doc, message: self.to_string() })
    }
}

/// A Merkle or whole-state transfer into this side.
#[derive(Clone, Debug)]
struct Catchup {
    exchange: u64,
    vv: VersionVector,
    ctx: CausalContext,
    /// Sets of nodes hold [`node_key`]s: one set type, [`U64Set`], for all of them
    /// (each distinct set type costs kilobytes of wasm code).
    waiting_nodes: U64Set,
    waiting_keys: U64Set,
    /// Whole-state transfers: the number of chunks announced, and those received (a
    /// count, not a set of the missing ones: the peer chooses the number).
    chunks: u32,
    chunks_got: U64Set,
    fields: Vec<(String, Field)>,
    done: u64,
    total: u64,
    /// Merkle transfers: every key asked for (its state comes from the peer)...
    wanted: U64Set,
    /// ...and every subtree found equal, with this side's context at that moment (an
    /// index into `seen`), by [`node_key`]. See [`Document::merge_keys`] for why it
    /// matters. (The Merkle tree's own map type, so no new map code.)
    equal: FxHashMap<u64, u64>,
    seen: Vec<CausalContext>,
}

impl Catchup {
    fn complete(&self) -> bool {
        self.waiting_nodes.is_empty()
            && self.waiting_keys.is_empty()
            && self.chunks_got.len() as u64 == u64::from(self.chunks)
    }

    /// Records `nodes` as found equal while this side's context was `ctx`.
    fn judged_equal(&mut self, nodes: impl IntoIterator<Item = NodeId>, ctx: &CausalContext) {
        let mut nodes = nodes.into_iter().peekable();
        if nodes.peek().is_none() {
            return;
        }
        if self.seen.last() != Some(ctx) {
            self.seen.push(ctx.clone());
        }
        let i = self.seen.len() as u64 - 1;
        self.equal.extend(nodes.map(|n| (node_key(n), i)));
    }

    /// This side's context when the key with hash `h` was found equal on both sides, or
    /// `None` when it was asked for (or never compared).
    fn seen_when_equal(&self, h: u64) -> Option<&CausalContext> {
        if self.wanted.contains(&h) {
            return None;
        }
        (0..=DEPTH)
            .find_map(|level| self.equal.get(&node_key(NodeId::of(h, level))))
            .and_then(|&i| self.seen.get(i as usize))
    }
}

/// A node id as a set element (exact for every id).
fn node_key(n: NodeId) -> u64 {
    (u64::from(n.index) << 8) | u64::from(n.level)
}

/// A set of `u64`s: the Merkle tree's hash map type (so no new set code). Node and key
/// sets of a large transfer hold up to millions of entries, inserted and removed in
/// any order: a hash set, not a sorted `Vec`.
#[derive(Clone, Debug, Default)]
struct U64Set(FxHashMap<u64, u64>);

impl U64Set {
    fn insert(&mut self, x: u64) -> bool {
        self.0.insert(x, 0).is_none()
    }

    fn remove(&mut self, x: &u64) -> bool {
        self.0.remove(x).is_some()
    }

    fn contains(&self, x: &u64) -> bool {
        self.0.contains_key(x)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Extend<u64> for U64Set {
    fn extend<I: IntoIterator<Item = u64>>(&mut self, iter: I) {
        for x in iter {
            self.insert(x);
        }
    }
}

/// What this side knows about one document with this peer.
#[derive(Clone, Debug, Default)]
struct DocSync {
    /// The peer wants our deltas.
    they_subscribed: bool,
    /// Dots we believe the peer has (never send these).
    peer_has: CausalContext,
    /// We want the peer's deltas.
    we_subscribed: bool,
    /// Set when our subscription settled: we have all the peer had at this version.
    synced: Option<VersionVector>,
    /// The peer said `Synced` at this version but some of its deltas have not arrived
    /// yet (reordered or lost): settle once the document covers it.
    awaiting: Option<VersionVector>,
    catchup: Option<Catchup>,
    /// The Merkle exchange we last started for the peer, with our version at its start:
    /// the state of the keys it asks for must still be the state at that version.
    serving: Option<(u64, VersionVector)>,
    /// Tick of our last subscribe, and of the last progress of its answer.
    sub_tick: u64,
    progress_tick: u64,
    /// What the peer acknowledged as durable.
    acked: VersionVector,
    /// The peer could not make our writes durable ("not enough replicas"): resend what
    /// it has not acknowledged at this tick.
    resend_at: Option<u64>,
}

/// A session's per-document state. Natively a hash map: a relay↔relay session may carry
/// every document two nodes share. In the browser a sorted `Vec`: a tab has a handful of
/// documents open, and a second hash-map instantiation costs ~1 KB gzipped of wasm.
#[cfg(not(target_arch = "wasm32"))]
type DocStates = FxHashMap<String, DocSync>;
#[cfg(target_arch = "wasm32")]
type DocStates = crate::sorted::SortedMap<String, DocSync>;

/// `docs[doc]`, created if absent.
fn state_of<'a>(docs: &'a mut DocStates, doc: &str) -> &'a mut DocSync {
    #[cfg(not(target_arch = "wasm32"))]
    return docs.entry(doc.to_owned()).or_default();
    #[cfg(target_arch = "wasm32")]
    return docs.entry_or_default(doc.to_owned());
}

/// The sync state machine for one peer.
///
/// ```
/// use concord_core::sync::{Session, SessionConfig};
/// use concord_core::{Document, ReplicaId};
/// use std::collections::HashMap;
///
/// let (ra, rb) = (ReplicaId(1), ReplicaId(2));
/// let mut docs_a = HashMap::from([("d".to_string(), Document::new(ra))]);
/// let mut docs_b = HashMap::from([("d".to_string(), Document::new(rb))]);
/// docs_a.get_mut("d").unwrap().increment("likes", 3).unwrap();
///
/// let mut a = Session::new(ra, SessionConfig::default());
/// let mut b = Session::new(rb, SessionConfig::default());
/// // Deliver messages until both sides are quiet.
/// let mut to_b: Vec<Vec<u8>> = vec![a.hello(None).encode()];
/// let mut to_a: Vec<Vec<u8>> = vec![b.hello(None).encode()];
/// to_a.extend(b.subscribe("d", &mut docs_b).iter().map(|m| m.encode()));
/// while !to_a.is_empty() || !to_b.is_empty() {
///     for f in std::mem::take(&mut to_b) {
///         to_a.extend(b.handle(&f, &mut docs_b).unwrap().replies.iter().map(|m| m.encode()));
///     }
///     for f in std::mem::take(&mut to_a) {
///         to_b.extend(a.handle(&f, &mut docs_a).unwrap().replies.iter().map(|m| m.encode()));
///     }
/// }
/// assert_eq!(docs_b["d"].counter("likes"), 3);
/// ```
#[derive(Debug)]
pub struct Session {
    local: ReplicaId,
    config: SessionConfig,
    peer: Option<Hello>,
    /// Iteration that reaches the peer is sorted by id.
    docs: DocStates,
    next_exchange: u64,
    ticks: u64,
}

impl Session {
    /// A session of replica `local` with one peer.
    pub fn new(local: ReplicaId, config: SessionConfig) -> Self {
        Self { local, config, peer: None, docs: DocStates::default(), next_exchange: 1, ticks: 0 }
    }

    /// The peer's hello, once received.
    pub fn peer(&self) -> Option<&Hello> {
        self.peer.as_ref()
    }

    /// Switches this side's replica id (after amnesia).
    pub fn set_local(&mut self, replica: ReplicaId) {
        self.local = replica;
    }

    /// The first message to send.
    pub fn hello(&self, token: Option<String>) -> Msg {
        Msg::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            min_protocol: MIN_PROTOCOL_VERSION,
            replica: self.local,
            token,
        })
    }

    /// Whether our subscription to `doc` has settled (we hold all the peer had).
    pub fn is_synced(&self, doc: &str) -> bool {
        self.docs.get(doc).is_some_and(|s| s.synced.is_some())
    }

    /// Answers the peer's subscription to `doc` again, from what we believe it has: the
    /// deltas it lacks (or a state transfer) and a fresh `Synced`. A relay that holds back
    /// its first answer until a read quorum has vouched for its copy sends this then.
    /// Nothing if the peer has not subscribed.
    pub fn answer_again(&mut self, doc_id: &str, store: &mut impl DocStore) -> Vec<Msg> {
        let Some(st) = self.docs.get(doc_id).filter(|s| s.they_subscribed) else { return Vec::new() };
        let Some(doc) = store.doc(doc_id) else { return Vec::new() };
        let vv = st.peer_has.vv.clone();
        let exchange = self.next_exchange;
        self.next_exchange += 1;
        let answer = answer_subscribe(doc, doc_id, &vv, exchange, &self.config);
        if matches!(answer.first(), Some(Msg::MerkleStart(_))) {
            let my_vv = doc.version().clone();
            state_of(&mut self.docs, doc_id).serving = Some((exchange, my_vv));
        }
        answer
    }

    /// Whether a catch-up from the peer (a Merkle descent or a counted state transfer
    /// it answers) is running for `doc`: until it ends, the peer's newer deltas may
    /// arrive before the older state the catch-up carries.
    pub fn catching_up(&self, doc: &str) -> bool {
        self.docs.get(doc).is_some_and(|s| s.catchup.is_some())
    }

    /// Whether the peer subscribed to `doc`.
    pub fn peer_subscribed(&self, doc: &str) -> bool {
        self.docs.get(doc).is_some_and(|s| s.they_subscribed)
    }

    /// Documents the peer subscribed to, sorted.
    pub fn peer_subscriptions(&self) -> impl Iterator<Item = &str> {
        let mut docs: Vec<&str> =
            self.docs.iter().filter(|(_, s)| s.they_subscribed).map(|(d, _)| d.as_str()).collect();
        crate::sort::sort(&mut docs);
        docs.into_iter()
    }

    /// Asks the peer for `doc`: what we lack now, then live deltas.
    pub fn subscribe(&mut self, doc_id: &str, store: &mut impl DocStore) -> Vec<Msg> {
        let Some(doc) = store.doc(doc_id) else { return Vec::new() };
        let vv = doc.version().clone();
        let ticks = self.ticks;
        let st = state_of(&mut self.docs, doc_id);
        st.we_subscribed = true;
        st.synced = None;
        st.awaiting = None;
        st.catchup = None;
        st.sub_tick = ticks;
        st.progress_tick = ticks;
        vec![Msg::Subscribe(Subscribe { doc: doc_id.to_owned(), vv })]
    }

    /// Stops both directions of `doc` with this peer.
    pub fn unsubscribe(&mut self, doc_id: &str) -> Vec<Msg> {
        match self.docs.remove(doc_id) {
            Some(_) => vec![Msg::Unsubscribe(Unsubscribe { doc: doc_id.to_owned() })],
            None => Vec::new(),
        }
    }

    /// The durability acknowledgement a relay sends once `vv` of `doc` is persisted.
    pub fn ack(&self, doc_id: &str, vv: &VersionVector) -> Msg {
        Msg::Ack(Ack { doc: doc_id.to_owned(), vv: vv.clone() })
    }

    /// Pushes a delta applied on this side (made locally, or received from another peer)
    /// to this peer if it subscribed and does not have it.
    pub fn on_local_delta(&mut self, doc_id: &str, delta: &Delta) -> Vec<Msg> {
        self.on_local_deltas(doc_id, std::slice::from_ref(delta))
    }

    /// [`Session::on_local_delta`] for a batch.
    pub fn on_local_deltas(&mut self, doc_id: &str, deltas: &[Delta]) -> Vec<Msg> {
        let Some(st) = self.docs.get_mut(doc_id) else { return Vec::new() };
        if !st.they_subscribed {
            return Vec::new();
        }
        let mut send = Vec::new();
        for d in deltas {
            if !st.peer_has.contains(d.dot) {
                st.peer_has.insert_span(d.span());
                send.push(d.clone());
            }
        }
        if send.is_empty() {
            return Vec::new();
        }
        chunk_deltas(doc_id, send, self.config.max_frame)
    }

    /// This side's copy of `doc` took in state that came by a transfer from another peer
    /// ([`Event::StateMerged`]), not as deltas that [`Session::on_local_deltas`] could push
    /// on. If this peer subscribed and may lack some of it, tell it this side's version (a
    /// `Synced`): a subscriber that settled already and does not cover it subscribes again
    /// and catches up at once, instead of at its next refresh (`resync_ticks`).
    pub fn on_state_merged(&mut self, doc_id: &str, store: &mut impl DocStore) -> Vec<Msg> {
        let Some(st) = self.docs.get(doc_id).filter(|s| s.they_subscribed) else { return Vec::new() };
        let Some(doc) = store.doc(doc_id) else { return Vec::new() };
        if doc.version().le(&st.peer_has.vv) {
            return Vec::new();
        }
        vec![Msg::Synced(Synced { doc: doc_id.to_owned(), vv: doc.version().clone() })]
    }

    /// Sends `deltas` to the peer even if we believe it has them (a retry whose
    /// acknowledgement was lost). Nothing is sent unless the peer subscribed.
    pub fn resend(&mut self, doc_id: &str, deltas: &[Delta]) -> Vec<Msg> {
        match self.docs.get_mut(doc_id) {
            Some(st) if st.they_subscribed && !deltas.is_empty() => {
                for d in deltas {
                    st.peer_has.insert_span(d.span());
                }
                chunk_deltas(doc_id, deltas.to_vec(), self.config.max_frame)
            }
            _ => Vec::new(),
        }
    }

    /// Whether we subscribed to `doc` at the peer.
    pub fn we_subscribed(&self, doc: &str) -> bool {
        self.docs.get(doc).is_some_and(|s| s.we_subscribed)
    }

    /// Call periodically: re-sends subscriptions that stalled (lost messages) or are due
    /// for a refresh, so lost live deltas are repaired.
    pub fn tick(&mut self, store: &mut impl DocStore) -> Vec<Msg> {
        self.ticks += 1;
        let now = self.ticks;
        let cfg = self.config;
        // A state transfer that keeps making progress is left to finish however long it
        // takes; only a stalled one starts over.
        let mut due: Vec<String> = self
            .docs
            .iter()
            .filter(|(_, s)| {
                s.we_subscribed
                    && ((s.synced.is_none() && now - s.progress_tick >= cfg.stall_ticks)
                        || (s.catchup.is_none() && now - s.sub_tick >= cfg.resync_ticks))
            })
            .map(|(d, _)| d.clone())
            .collect();
        crate::sort::sort(&mut due);
        let mut out = Vec::new();
        for d in due {
            out.extend(self.subscribe(&d, store));
        }
        // Writes the peer refused to acknowledge: send them again (deltas are idempotent).
        let mut retry: Vec<String> = self
            .docs
            .iter()
            .filter(|(_, s)| s.they_subscribed && s.resend_at.is_some_and(|t| t <= now))
            .map(|(d, _)| d.clone())
            .collect();
        crate::sort::sort(&mut retry);
        for d in retry {
            let Some(st) = self.docs.get_mut(&d) else { continue };
            st.resend_at = None;
            let Some(doc) = store.doc(&d) else { continue };
            let Some(deltas) = doc.deltas_since(&st.acked) else { continue };
            let deltas: Vec<Delta> = deltas.into_iter().cloned().collect();
            if deltas.is_empty() {
                continue;
            }
            for x in &deltas {
                st.peer_has.insert_span(x.span());
            }
            out.extend(chunk_deltas(&d, deltas, self.config.max_frame));
        }
        out
    }

    /// Handles one frame from the peer.
    pub fn handle(&mut self, bytes: &[u8], store: &mut impl DocStore) -> Result<Output, SyncError> {
        let msg = match Msg::decode(bytes) {
            Ok(m) => m,
            Err(FrameError::UnknownTag(t)) => {
                // A newer peer: say so and carry on.
                let err = SyncError::Frame(FrameError::UnknownTag(t));
                return Ok(Output { replies: vec![err.to_msg()], events: Vec::new() });
            }
            Err(e) => return Err(e.into()),
        };
        self.handle_msg(msg, store)
    }

    /// Handles one decoded message.
    pub fn handle_msg(&mut self, msg: Msg, store: &mut impl DocStore) -> Result<Output, SyncError> {
        let mut out = Output::default();
        if self.peer.is_none() && !matches!(msg, Msg::Hello(_) | Msg::Error(_)) {
            return Err(SyncError::NoHello);
        }
        match msg {
            Msg::Hello(h) => self.on_hello(h, &mut out)?,
            Msg::Subscribe(m) => self.on_subscribe(m, store, &mut out)?,
            Msg::Deltas(m) => self.on_deltas(m, store, &mut out)?,
            Msg::Synced(m) => {
                let covered = store.doc(&m.doc).is_some_and(|d| m.vv.le(d.version()));
                let mut again = false;
                if let Some(st) = self.docs.get_mut(&m.doc).filter(|s| s.we_subscribed) {
                    if st.catchup.is_some() {
                        // Sent during a transfer into this side, which may predate it: checked
                        // when the transfer ends (`try_finish`).
                        st.awaiting = Some(m.vv);
                    } else if covered {
                        st.progress_tick = self.ticks;
                        st.awaiting = None;
                        st.synced = Some(m.vv.clone());
                        out.events.push(Event::Synced { doc: m.doc.clone(), vv: m.vv });
                    } else if st.synced.is_none() {
                        // Its deltas were overtaken or lost: settle when they are in
                        // (a stalled subscription is sent again by `tick`).
                        st.progress_tick = self.ticks;
                        st.awaiting = Some(m.vv);
                    } else {
                        // Settled, and the peer holds writes no live delta will bring: it
                        // took them in by a state transfer ([`Session::on_state_merged`]).
                        // Catch up now rather than at the next refresh.
                        again = true;
                    }
                }
                if again {
                    out.replies.extend(self.subscribe(&m.doc, store));
                }
            }
            Msg::Ack(m) => {
                if let Some(st) = self.docs.get_mut(&m.doc) {
                    st.acked.merge(&m.vv);
                }
                out.events.push(Event::Acked { doc: m.doc, vv: m.vv });
            }
            Msg::Unsubscribe(m) => {
                // Both directions stop, as on the side that sent it: keeping our own
                // subscription would re-subscribe at the next refresh (undoing the
                // unsubscribe), or forever if the peer closed the document.
                self.docs.remove(&m.doc);
                out.events.push(Event::Unsubscribed { doc: m.doc });
            }
            Msg::MerkleStart(m) => self.on_merkle_start(m, store, &mut out)?,
            Msg::MerkleQuery(m) => self.on_merkle_query(m, store, &mut out),
            Msg::MerkleNodes(m) => self.on_merkle_nodes(m, store, &mut out)?,
            Msg::MerkleLeaves(m) => self.on_merkle_leaves(m, store, &mut out)?,
            Msg::KeysQuery(m) => self.on_keys_query(m, store, &mut out),
            Msg::State(m) => self.on_state(m, store, &mut out)?,
            // Document sets are the caller's, not the session's.
            Msg::DocSetQuery(m) => out.events.push(Event::DocSetQuery(m)),
            Msg::DocSetAnswer(m) => out.events.push(Event::DocSetAnswer(m)),
            Msg::Error(e) => {
                if e.code == ErrorCode::NOT_ENOUGH_REPLICAS {
                    let next = self.ticks + 1;
                    if let Some(st) = e.doc.as_deref().and_then(|d| self.docs.get_mut(d)) {
                        st.resend_at = Some(next);
                    }
                }
                out.events.push(Event::PeerError(e));
            }
        }
        Ok(out)
    }

    fn on_hello(&mut self, h: Hello, out: &mut Output) -> Result<(), SyncError> {
        let agreed = PROTOCOL_VERSION.min(h.protocol);
        if agreed < MIN_PROTOCOL_VERSION.max(h.min_protocol) {
            return Err(SyncError::Version {
                ours: PROTOCOL_VERSION,
                ours_min: MIN_PROTOCOL_VERSION,
                theirs: h.protocol,
                theirs_min: h.min_protocol,
            });
        }
        out.events.push(Event::PeerHello { replica: h.replica, token: h.token.clone() });
        self.peer = Some(h);
        Ok(())
    }

    fn on_subscribe(
        &mut self,
        m: Subscribe,
        store: &mut impl DocStore,
        out: &mut Output,
    ) -> Result<(), SyncError> {
        let Some(doc) = store.doc(&m.doc) else { return Ok(()) };
        doc.check_amnesia(&m.vv).map_err(|error| SyncError::Doc { doc: m.doc.clone(), error })?;
        let exchange = self.next_exchange;
        self.next_exchange += 1;
        let answer = answer_subscribe(doc, &m.doc, &m.vv, exchange, &self.config);
        let my_vv = doc.version().clone();
        let ticks = self.ticks;
        let st = state_of(&mut self.docs, &m.doc);
        if matches!(answer.first(), Some(Msg::MerkleStart(_))) {
            st.serving = Some((exchange, my_vv.clone()));
        }
        st.they_subscribed = true;
        st.peer_has = CausalContext { vv: m.vv, cloud: Default::default() };
        // Subscribe back first: by the time the peer sees the answer's `Synced`, it
        // knows we want its deltas too.
        if !st.we_subscribed {
            st.we_subscribed = true;
            st.synced = None;
            st.sub_tick = ticks;
            st.progress_tick = ticks;
            out.replies.push(Msg::Subscribe(Subscribe { doc: m.doc.clone(), vv: my_vv }));
        }
        out.replies.extend(answer);
        out.events.push(Event::Subscribed { doc: m.doc });
        Ok(())
    }

    fn on_deltas(&mut self, m: Deltas, store: &mut impl DocStore, out: &mut Output) -> Result<(), SyncError> {
        let Some(doc) = store.doc(&m.doc) else { return Ok(()) };
        // All or nothing: check the whole frame before applying any of it.
        for d in &m.deltas {
            doc.check(d).map_err(|error| SyncError::Doc { doc: m.doc.clone(), error })?;
        }
        if !self.docs.contains_key(&m.doc) {
            self.docs.insert(m.doc.clone(), DocSync::default());
        }
        let Some(st) = self.docs.get_mut(&m.doc) else { unreachable!("inserted above") };
        let mut applied = Vec::with_capacity(m.deltas.len());
        for d in m.deltas {
            st.peer_has.insert_span(d.span());
            doc.apply_checked(d, &mut applied);
        }
        let covered = |vv: &VersionVector| vv.le(doc.version());
        if st.we_subscribed && st.synced.is_none() && st.catchup.is_none() {
            st.progress_tick = self.ticks; // the answer to our subscription is arriving
        }
        let settled = match st.awaiting.take() {
            Some(vv) if covered(&vv) && st.catchup.is_none() => Some(vv),
            other => {
                st.awaiting = other;
                None
            }
        };
        if !applied.is_empty() {
            out.events.push(Event::Applied { doc: m.doc.clone(), deltas: applied });
        }
        if let Some(vv) = settled {
            st.synced = Some(vv.clone());
            out.events.push(Event::Synced { doc: m.doc, vv });
        }
        Ok(())
    }

    fn catchup(&mut self, doc: &str, exchange: u64) -> Option<&mut Catchup> {
        let ticks = self.ticks;
        let st = self.docs.get_mut(doc)?;
        let c = st.catchup.as_mut().filter(|c| c.exchange == exchange)?;
        st.progress_tick = ticks;
        Some(c)
    }

    fn on_merkle_start(
        &mut self,
        m: MerkleStart,
        store: &mut impl DocStore,
        out: &mut Output,
    ) -> Result<(), SyncError> {
        let Some(doc) = store.doc(&m.doc) else { return Ok(()) };
        // Settled already: this answers an older subscription (delayed or duplicated).
        let Some(st) = self.docs.get_mut(&m.doc).filter(|s| s.we_subscribed && s.synced.is_none()) else {
            return Ok(());
        };
        st.progress_tick = self.ticks;
        st.awaiting = None;
        let mut c = Catchup {
            exchange: m.exchange,
            vv: m.vv,
            ctx: m.ctx,
            waiting_nodes: Default::default(),
            waiting_keys: Default::default(),
            chunks: m.full_chunks,
            chunks_got: Default::default(),
            fields: Vec::new(),
            done: 0,
            total: if m.full_chunks > 0 { m.keys } else { 0 },
            wanted: Default::default(),
            equal: FxHashMap::default(),
            seen: Vec::new(),
        };
        if m.full_chunks == 0 {
            let now = doc.context().clone();
            let mine = doc.merkle().children(NodeId::ROOT);
            let (differing, equal): (Vec<_>, Vec<_>) = NodeId::ROOT
                .children()
                .zip(mine.iter().zip(m.children.iter()))
                .partition(|(_, (a, b))| a != b);
            let differing: Vec<NodeId> = differing.into_iter().map(|(id, _)| id).collect();
            c.judged_equal(equal.into_iter().map(|(id, _)| id), &now);
            if !differing.is_empty() {
                c.waiting_nodes.extend(differing.iter().map(|&n| node_key(n)));
                out.replies.push(Msg::MerkleQuery(MerkleQuery {
                    doc: m.doc.clone(),
                    exchange: m.exchange,
                    nodes: differing,
                }));
            }
        }
        st.catchup = Some(c);
        self.try_finish(&m.doc, store, out)
    }

    fn on_merkle_query(&mut self, m: MerkleQuery, store: &mut impl DocStore, out: &mut Output) {
        let Some(doc) = store.doc(&m.doc) else { return };
        // Borrow the tree (no clone: that would copy every node per message), then the
        // buckets once the tree's borrow has ended.
        let tree = doc.merkle();
        let nodes: Vec<(NodeId, Vec<u64>)> =
            m.nodes.iter().filter(|id| !id.is_bucket()).map(|&id| (id, tree.children(id))).collect();
        let buckets: Vec<(NodeId, Vec<(u64, u64)>)> =
            m.nodes.iter().filter(|id| id.is_bucket()).map(|&id| (id, doc.bucket_leaves(id))).collect();
        let max = self.config.max_frame;
        let (doc_id, exchange) = (m.doc, m.exchange);
        if !nodes.is_empty() {
            out.replies.extend(split(0..nodes.len(), max, &|r| {
                Msg::MerkleNodes(MerkleNodes { doc: doc_id.clone(), exchange, nodes: nodes[r].to_vec() })
            }));
        }
        if !buckets.is_empty() {
            out.replies.extend(split(0..buckets.len(), max, &|r| {
                Msg::MerkleLeaves(MerkleLeaves {
                    doc: doc_id.clone(),
                    exchange,
                    buckets: buckets[r].to_vec(),
                })
            }));
        }
    }

    fn on_merkle_nodes(
        &mut self,
        m: MerkleNodes,
        store: &mut impl DocStore,
        out: &mut Output,
    ) -> Result<(), SyncError> {
        let Some(doc) = store.doc(&m.doc) else { return Ok(()) };
        let now = doc.context().clone();
        let tree = doc.merkle();
        let Some(c) = self.catchup(&m.doc, m.exchange) else { return Ok(()) };
        let mut query = Vec::new();
        let mut equal = Vec::new();
        for (id, theirs) in m.nodes {
            if !c.waiting_nodes.remove(&node_key(id)) {
                continue; // a duplicate or a stale answer
            }
            let mine = tree.children(id);
            for ((child, a), b) in id.children().zip(mine.iter()).zip(theirs.iter()) {
                if a != b {
                    c.waiting_nodes.insert(node_key(child));
                    query.push(child);
                } else {
                    equal.push(child);
                }
            }
        }
        c.judged_equal(equal, &now);
        if !query.is_empty() {
            out.replies.push(Msg::MerkleQuery(MerkleQuery {
                doc: m.doc.clone(),
                exchange: m.exchange,
                nodes: query,
            }));
        }
        self.try_finish(&m.doc, store, out)
    }

    fn on_merkle_leaves(
        &mut self,
        m: MerkleLeaves,
        store: &mut impl DocStore,
        out: &mut Output,
    ) -> Result<(), SyncError> {
        let Some(doc) = store.doc(&m.doc) else { return Ok(()) };
        doc.merkle();
        let now = doc.context().clone();
        let mine: Vec<(NodeId, Vec<(u64, u64)>)> =
            m.buckets.iter().map(|(id, _)| (*id, doc.bucket_leaves(*id))).collect();
        let Some(c) = self.catchup(&m.doc, m.exchange) else { return Ok(()) };
        let mut want = Vec::new();
        let mut compared = Vec::new();
        for ((id, theirs), (_, mine)) in m.buckets.into_iter().zip(mine) {
            if !c.waiting_nodes.remove(&node_key(id)) {
                continue;
            }
            // Keys of this bucket not asked for below are equal now (or the peer lacks them).
            compared.push(id);
            let (lo, hi) = id.key_range();
            for (kh, leaf) in theirs {
                if kh < lo || kh > hi {
                    continue; // not in this bucket: ignore a confused peer
                }
                let same = mine.binary_search_by_key(&kh, |e| e.0).is_ok_and(|i| mine[i].1 == leaf);
                if !same && c.waiting_keys.insert(kh) {
                    c.wanted.insert(kh);
                    want.push(kh);
                }
            }
        }
        c.judged_equal(compared, &now);
        c.total += want.len() as u64;
        if !want.is_empty() {
            out.replies.push(Msg::KeysQuery(KeysQuery {
                doc: m.doc.clone(),
                exchange: m.exchange,
                keys: want,
            }));
        }
        self.try_finish(&m.doc, store, out)
    }

    fn on_keys_query(&mut self, m: KeysQuery, store: &mut impl DocStore, out: &mut Output) {
        let Some(doc) = store.doc(&m.doc) else { return };
        let Some(st) = self.docs.get_mut(&m.doc) else { return };
        let Some((_, since)) = st.serving.as_ref().filter(|s| s.0 == m.exchange) else {
            return; // an exchange we no longer serve: the peer's catch-up stalls and restarts
        };
        // The peer will merge these keys under the version and context announced when the
        // exchange started. If a requested key changed since, its state now holds effects
        // beyond that version (the peer would adopt them without their dots, and could
        // never tell them apart again): start over from the current version instead.
        let unchanged =
            doc.keys_changed_since(since).is_some_and(|changed| m.keys.iter().all(|k| !changed.contains(k)));
        if !unchanged {
            let exchange = self.next_exchange;
            self.next_exchange += 1;
            st.serving = Some((exchange, doc.version().clone()));
            out.replies.extend(start_transfer(doc, &m.doc, exchange, &self.config));
            return;
        }
        let total = m.keys.len() as u64;
        let per_key: Vec<(u64, Vec<(String, Field)>)> =
            m.keys.iter().map(|&k| (k, doc.fields_by_hash(&[k]))).collect();
        // A key too large for one frame must go in pieces, and only a counted (whole-state)
        // transfer tells the receiver when it has every piece: start one instead.
        let max = self.config.max_frame;
        if per_key.iter().flat_map(|g| &g.1).any(|(k, f)| field_len(k, f) > max / 2) {
            let exchange = self.next_exchange;
            self.next_exchange += 1;
            st.serving = Some((exchange, doc.version().clone()));
            out.replies.extend(whole_state(doc, &m.doc, exchange, &self.config));
            return;
        }
        let mut done = 0u64;
        let (doc_id, exchange) = (m.doc, m.exchange);
        let msgs = split(0..per_key.len(), self.config.max_frame, &|r| {
            let group = &per_key[r];
            Msg::State(StateChunk {
                doc: doc_id.clone(),
                exchange,
                chunk: 0,
                answered: group.iter().map(|g| g.0).collect(),
                fields: group.iter().flat_map(|g| g.1.iter().cloned()).collect(),
                done: 0,
                total,
            })
        });
        for mut msg in msgs {
            if let Msg::State(s) = &mut msg {
                done += s.answered.len() as u64;
                s.done = done;
            }
            out.replies.push(msg);
        }
    }

    fn on_state(
        &mut self,
        m: StateChunk,
        store: &mut impl DocStore,
        out: &mut Output,
    ) -> Result<(), SyncError> {
        let Some(c) = self.catchup(&m.doc, m.exchange) else { return Ok(()) };
        let fresh = if c.chunks == 0 {
            let before = c.waiting_keys.len();
            for k in &m.answered {
                c.waiting_keys.remove(k);
            }
            c.waiting_keys.len() < before
        } else {
            m.chunk < c.chunks && c.chunks_got.insert(u64::from(m.chunk))
        };
        if !fresh {
            return Ok(());
        }
        c.done += if m.answered.is_empty() { m.fields.len() as u64 } else { m.answered.len() as u64 };
        c.fields.extend(m.fields);
        out.events.push(Event::Progress { doc: m.doc.clone(), done: c.done.min(c.total), total: c.total });
        self.try_finish(&m.doc, store, out)
    }

    fn try_finish(
        &mut self,
        doc_id: &str,
        store: &mut impl DocStore,
        out: &mut Output,
    ) -> Result<(), SyncError> {
        let Some(st) = self.docs.get_mut(doc_id) else { return Ok(()) };
        if !st.catchup.as_ref().is_some_and(Catchup::complete) {
            return Ok(());
        }
        let Some(mut c) = st.catchup.take() else { return Ok(()) };
        let Some(doc) = store.doc(doc_id) else { return Ok(()) };
        // `merge_keys` visits every key of the document; it can only find something when
        // this side gained dots after some subtree compared equal. Nothing arrived since
        // (the common case): the plain join is the same and costs O(keys sent).
        let unchanged = c.seen.iter().all(|then| then == doc.context());
        let fields = coalesce(std::mem::take(&mut c.fields));
        let merged = if c.chunks > 0 || unchanged {
            doc.merge_state(fields, &c.ctx, &c.vv)
        } else {
            doc.merge_keys(fields, &c.ctx, &c.vv, &|h| c.seen_when_equal(h))
        };
        merged.map_err(|error| SyncError::Doc { doc: doc_id.to_owned(), error })?;
        // The peer said during the transfer that it holds more than the transfer brought.
        let behind = st.awaiting.take().is_some_and(|vv| !vv.le(doc.version()));
        st.synced = Some(c.vv.clone());
        out.events.push(Event::StateMerged { doc: doc_id.to_owned() });
        out.events.push(Event::Synced { doc: doc_id.to_owned(), vv: c.vv });
        if behind {
            out.replies.extend(self.subscribe(doc_id, store));
        }
        Ok(())
    }
}

/// The answer to a subscription: the deltas the subscriber lacks and [`Synced`], or the
/// start of a state transfer when the log cannot reach back.
fn answer_subscribe(
    doc: &mut Document,
    doc_id: &str,
    vv: &VersionVector,
    exchange: u64,
    cfg: &SessionConfig,
) -> Vec<Msg> {
    if let Some(deltas) = doc.deltas_since(vv) {
        let deltas: Vec<Delta> = deltas.into_iter().cloned().collect();
        let mut out =
            if deltas.is_empty() { Vec::new() } else { chunk_deltas(doc_id, deltas, cfg.max_frame) };
        out.push(Msg::Synced(Synced { doc: doc_id.to_owned(), vv: doc.version().clone() }));
        return out;
    }
    start_transfer(doc, doc_id, exchange, cfg)
}

/// The start of a state transfer: the whole state for a small document, else the root of
/// a Merkle descent. Everything it sends is the state at the document's current version.
fn start_transfer(doc: &mut Document, doc_id: &str, exchange: u64, cfg: &SessionConfig) -> Vec<Msg> {
    if doc.len() <= cfg.full_state_keys {
        return whole_state(doc, doc_id, exchange, cfg);
    }
    debug_assert_eq!(DEPTH, 4);
    vec![Msg::MerkleStart(MerkleStart {
        doc: doc_id.to_owned(),
        exchange,
        vv: doc.version().clone(),
        ctx: doc.context().clone(),
        children: doc.merkle().children(NodeId::ROOT),
        full_chunks: 0,
        keys: doc.len() as u64,
    })]
}

/// The encoded size of one field with its key, as a state chunk carries it.
fn field_len(key: &str, field: &Field) -> usize {
    let mut out = Vec::new();
    key.to_owned().put(&mut out);
    field.put(&mut out);
    out.len()
}

/// Splits every set whose state would take more than half a frame into pieces that fit,
/// by element (the receiver joins them again, [`coalesce`]), so that a key of any size
/// travels in frames below the limit. Other fields are small by construction (counters,
/// registers whose value is bounded).
fn pieces(fields: Vec<(String, Field)>, max: usize) -> Vec<(String, Field)> {
    let budget = (max / 2).max(1);
    let mut out = Vec::with_capacity(fields.len());
    for (key, field) in fields {
        let len = field_len(&key, &field);
        let Field::Set(set) = &field else {
            out.push((key, field));
            continue;
        };
        if len <= budget || set.entries().len() < 2 {
            out.push((key, field));
            continue;
        }
        let per = set.entries().len().div_ceil(len.div_ceil(budget) + 1).max(1);
        let mut part = Entries::default();
        for (v, d) in set.entries().iter() {
            part.insert(v.clone(), d.clone());
            if part.len() == per {
                out.push((key.clone(), piece(std::mem::take(&mut part))));
            }
        }
        if !part.is_empty() {
            out.push((key, piece(part)));
        }
    }
    out
}

/// Joins the pieces of one key that [`pieces`] split (they hold disjoint elements under
/// no context of their own, so the join is their union); fields arrive in any order.
fn coalesce(mut fields: Vec<(String, Field)>) -> Vec<(String, Field)> {
    crate::sort::sort_by(&mut fields, |a, b| a.0.cmp(&b.0));
    let mut out: Vec<(String, Field)> = Vec::with_capacity(fields.len());
    for (key, field) in fields {
        match out.last_mut() {
            Some((k, have)) if *k == key => have.absorb_piece(field),
            _ => out.push((key, field)),
        }
    }
    out
}

/// One piece of a split set: some of its elements, under no context of their own.
fn piece(entries: Entries<Value>) -> Field {
    Field::Set(OrSet::from_parts(entries, CausalContext::default()))
}

/// A counted whole-state transfer: every field of the document (large sets in pieces), in
/// chunks below the frame limit, preceded by the `MerkleStart` that announces how many.
fn whole_state(doc: &mut Document, doc_id: &str, exchange: u64, cfg: &SessionConfig) -> Vec<Msg> {
    let fields = pieces(doc.all_fields(), cfg.max_frame);
    let total = doc.len() as u64;
    let mut chunks = split(0..fields.len(), cfg.max_frame, &|r| {
        Msg::State(StateChunk {
            doc: doc_id.to_owned(),
            exchange,
            chunk: 0,
            answered: Vec::new(),
            fields: fields[r].to_vec(),
            done: 0,
            total,
        })
    });
    if chunks.is_empty() {
        chunks.push(Msg::State(StateChunk {
            doc: doc_id.to_owned(),
            exchange,
            chunk: 0,
            answered: Vec::new(),
            fields: Vec::new(),
            done: 0,
            total: 0,
        }));
    }
    let mut done = 0;
    for (i, c) in chunks.iter_mut().enumerate() {
        if let Msg::State(s) = c {
            s.chunk = i as u32;
            done += s.fields.len() as u64;
            s.done = done;
        }
    }
    let start = MerkleStart {
        doc: doc_id.to_owned(),
        exchange,
        vv: doc.version().clone(),
        ctx: doc.context().clone(),
        children: Vec::new(),
        full_chunks: chunks.len() as u32,
        keys: total,
    };
    let mut out = vec![Msg::MerkleStart(start)];
    out.extend(chunks);
    out
}

/// [`split`] for deltas, without cloning them to measure: a batch whose size bound fits
/// (the usual case) goes as one message without being encoded here; only a larger batch
/// is cut, by [`split`].
fn chunk_deltas(doc_id: &str, deltas: Vec<Delta>, max: usize) -> Vec<Msg> {
    if deltas.is_empty() {
        return Vec::new();
    }
    // The tag byte, then the body: `1 + bound <= max`.
    if super::batch::size_bound(doc_id, &deltas) < max {
        return vec![Msg::Deltas(Deltas { doc: doc_id.to_owned(), deltas })];
    }
    split(0..deltas.len(), max, &|r| {
        Msg::Deltas(Deltas { doc: doc_id.to_owned(), deltas: deltas[r].to_vec() })
    })
}

/// Builds messages from the items at `range` (`make` builds one from a sub-range),
/// cutting groups until each frame fits in `max` bytes (a single item that alone exceeds
/// `max` is sent as it is). Ranges, not item vectors: one copy of this in wasm, not one
/// per item type.
fn split(
    range: std::ops::Range<usize>,
    max: usize,
    make: &dyn Fn(std::ops::Range<usize>) -> Msg,
) -> Vec<Msg> {
    if range.is_empty() {
        return Vec::new();
    }
    let msg = make(range.clone());
    let len = msg.encode().len();
    if range.len() == 1 || len <= max {
        return vec![msg];
    }
    // Cut in one more part than the size asks for (so that parts of unevenly sized items
    // mostly fit too), each encoded again only if it is still too large: every item is
    // encoded about twice in all. Halving re-encoded every item once per level,
    // O(n log n): a 4 MB catch-up encoded its state six times over.
    let per = range.len().div_ceil(len.div_ceil(max.max(1)) + 1);
    let mut out = Vec::new();
    let mut start = range.start;
    while start < range.end {
        let end = range.end.min(start + per);
        out.extend(split(start..end, max, make));
        start = end;
    }
    out
}
