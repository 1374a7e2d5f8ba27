//! The sync handler: one relay node's documents, rooms, durability and write quorum.
//!
//! Data path of a frame: the connection task in `connection.rs` (or a cluster peer link)
//! hands it to [`Node::on_binary`] → the frame is decoded and authorised → the connection's
//! core [`Session`] applies it to the document (loaded from [`Storage`] on demand) →
//! applied deltas are pushed at once to every other connection subscribed to the document
//! (clients and peer relays alike) and queued for storage, where the group-commit writer
//! makes them durable together with other connections' writes → the writer is acked:
//! standalone, once the local commit is durable; in a cluster, once W replicas of the
//! document's preference list confirmed durability (see [`crate::cluster`]).
//!
//! The connection does not wait for the commit: its next frame is read while the
//! previous ones are on their way to disk (at most [`MAX_UNCOMMITTED_FRAMES`] per
//! connection). The storage thread reports each commit to one completion task, which
//! takes the node's lock once per commit for every write in it and sends each
//! connection one `Ack` per document — never before the data is durable.
//!
//! All protocol decisions are made by concord-core; this module moves bytes, keeps
//! per-connection sessions, and decides what to persist and when to ack.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use concord_core::cluster::{quorum_version, write_targets, WriteQuorum};
use concord_core::sync::msg::ErrorMsg;
use concord_core::sync::{ErrorCode, Event, FrameError, Msg, Session, SessionConfig, SyncError};
use concord_core::{CausalContext, Delta, DocConfig, Document, Field, ReplicaId, Span, VersionVector};

use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};

use crate::auth::{Access, AuthError, Claims, Keyring, VerifyKey};
use crate::cluster::ClusterView;
use crate::handler::{CloseReason, ConnInfo, Handler, HealthInfo, Outbox, SendError};
use crate::metrics::Metrics;
use crate::storage::{Storage, StorageError, WriteOp};

/// Deltas written per document before a snapshot replaces them (see
/// [`DocEntry::snapshot_due`] for the other condition).
const SNAPSHOT_EVERY: u64 = 512;
/// Frames of one connection whose writes may be waiting for their commit at once; the
/// connection's next frame is read only when one of them is durable.
pub const MAX_UNCOMMITTED_FRAMES: usize = 32;
/// Prefix of the `Hello` token of a relay peer link: `peer:<credential>` with a secret
/// (see [`crate::auth::Keyring::peer_credential`]), `peer:<node id>` without.
pub const PEER_TOKEN_PREFIX: &str = "peer:";

/// Settings of a node's sync handler.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// With a secret, every connection must present a valid token in its `Hello`.
    pub auth_secret: Option<Vec<u8>>,
    /// Further keys for client tokens, selected by the `kid` of a token's header (used
    /// only with a secret, which also keys the peer and admin credentials).
    pub auth_keys: Vec<VerifyKey>,
    /// Documents kept in memory (documents with subscribers are never unloaded).
    pub doc_cache_capacity: usize,
    /// Frame limit, passed to sessions so they chunk below it.
    pub max_frame: usize,
    /// Delta log length per document.
    pub doc_config: DocConfig,
    /// How long a coordinator waits for W durable acks before answering
    /// "not enough replicas".
    pub write_timeout: Duration,
    /// This node's id (for introspection when it runs standalone).
    pub node_id: String,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            auth_secret: None,
            auth_keys: Vec::new(),
            doc_cache_capacity: 1024,
            max_frame: 256 * 1024,
            doc_config: DocConfig::default(),
            write_timeout: Duration::from_secs(3),
            node_id: "local".to_owned(),
        }
    }
}

pub(crate) struct DocEntry {
    pub(crate) doc: Document,
    /// Dots durable on this node.
    durable: CausalContext,
    /// Dots durable on W replicas (cluster mode): what clients are acked for.
    quorum: CausalContext,
    /// Per peer node: the version it acknowledged as durable.
    peer_acks: HashMap<String, VersionVector>,
    /// Client writes waiting for their quorum.
    waiting: Vec<WaitingWrite>,
    next_seq: u64,
    /// Deltas stored since the last snapshot.
    since_snapshot: u64,
    /// Entries (keys, and elements of sets) in the document at the last snapshot.
    snapshot_entries: u64,
    inflight: u64,
    /// Connections that resent deltas already applied but not yet durable, with their
    /// dots: acked once those are durable (or, failing that, when no write is in flight).
    ack_waiters: Vec<(u64, Vec<Span>)>,
    pub(crate) members: BTreeSet<u64>,
    last_used: u64,
}

impl DocEntry {
    /// Whether the deltas stored since the last snapshot should be replaced by a new one:
    /// after [`SNAPSHOT_EVERY`] deltas, or after as many as the document had entries at
    /// the last snapshot if that is more. A snapshot encodes every entry; on the count
    /// alone, a large document arriving as a stream of full frames (thousands of deltas
    /// each) was encoded and stored again for every frame, so uploading n entries cost
    /// O(n^2) (a 4 MB document took the relay 9 s instead of 4). Paid for by as many new
    /// deltas, the snapshots of a growing document cost at most about twice its final
    /// size, and loading replays at most as many deltas as the snapshot has entries.
    fn snapshot_due(&self) -> bool {
        self.since_snapshot >= SNAPSHOT_EVERY.max(self.snapshot_entries)
    }

    /// The snapshot write replacing every delta stored so far.
    fn snapshot(&mut self, doc: &str) -> WriteOp {
        self.since_snapshot = 0;
        self.snapshot_entries = entries(&self.doc);
        WriteOp::PutSnapshot {
            doc: doc.to_owned(),
            bytes: self.doc.encode(),
            truncate_through: Some(self.next_seq - 1),
        }
    }
}

/// The number of keys and set elements of `doc`: what encoding it costs, roughly.
fn entries(doc: &Document) -> u64 {
    doc.keys().map(|k| if let Some(Field::Set(s)) = doc.get(k) { s.entries().len() as u64 } else { 1 }).sum()
}

struct WaitingWrite {
    dots: Vec<Span>,
    conn: u64,
    quorum: WriteQuorum,
    deadline: Instant,
    received: Instant,
}

pub(crate) struct ConnEntry {
    pub(crate) session: Session,
    pub(crate) out: Outbox,
    claims: Option<Claims>,
    docs: BTreeSet<String>,
    /// The relay node at the other end, for peer links (either direction).
    pub(crate) peer: Option<String>,
}

#[derive(Default)]
pub(crate) struct State {
    pub(crate) docs: HashMap<String, DocEntry>,
    pub(crate) conns: HashMap<u64, ConnEntry>,
    /// Outgoing peer link per node id.
    pub(crate) links: HashMap<String, u64>,
    /// Documents this node stores for owners that were down: doc -> owner -> hint id.
    pub(crate) hints: BTreeMap<String, BTreeMap<String, u64>>,
    /// Delivered hints to delete from storage: (owner, doc, hint id).
    pub(crate) hint_deletes: Vec<(String, String, u64)>,
    /// Ids of every stored document.
    pub(crate) stored: BTreeSet<String>,
    /// Per peer, the document-set tree of the stored documents that peer also owns, kept
    /// current on every commit so anti-entropy never rebuilds it.
    pub(crate) shared: BTreeMap<String, concord_core::docset::DocSet>,
    next_conn: u64,
    clock: u64,
}

pub(crate) struct Docs<'a> {
    pub(crate) docs: &'a mut HashMap<String, DocEntry>,
}

impl concord_core::sync::DocStore for Docs<'_> {
    fn doc(&mut self, id: &str) -> Option<&mut Document> {
        self.docs.get_mut(id).map(|e| &mut e.doc)
    }
}

pub(crate) struct Inner {
    replica: ReplicaId,
    pub(crate) storage: Storage,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) options: NodeOptions,
    pub(crate) cluster: Option<ClusterView>,
    /// Every key, when a secret is set; `None` runs open.
    auth: Option<Keyring>,
    state: Mutex<State>,
    /// Where the storage writer reports commits (see [`Node::on_durable`]).
    durable: Arc<Mutex<Vec<Durable>>>,
    /// Durable acks that completed client write quorums, from owners and from fallbacks
    /// (Riak's node_confirms: durability is never overstated).
    owner_acks: AtomicU64,
    fallback_acks: AtomicU64,
}

/// The relay's [`Handler`]: shared state of one node. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    pub(crate) inner: Arc<Inner>,
}

/// Per-connection handle given to the server (or held by a peer link).
pub struct NodeConn {
    pub(crate) id: u64,
    out: Outbox,
    /// [`MAX_UNCOMMITTED_FRAMES`] permits: one per frame whose writes are not durable yet.
    uncommitted: Arc<Semaphore>,
}

/// A write this frame must make durable before acking.
struct Pending {
    doc: String,
    ops: Vec<WriteOp>,
    dots: Vec<Span>,
    absorb: Option<VersionVector>,
    /// Ack the writer once locally durable (standalone, or a replica write from a peer).
    ack_local: bool,
}

/// One frame's writes, queued for storage as one atomic request.
struct Commit {
    conn: u64,
    /// Their `ops` already went to storage.
    pending: Vec<Pending>,
    /// The connection's place for an uncommitted frame, given back once processed.
    _permit: OwnedSemaphorePermit,
}

/// What the storage writer reports to the completion task, in commit order.
enum Durable {
    /// The ops come back to be freed here, not on the writer thread.
    Commit(Commit, Vec<WriteOp>, Result<(), StorageError>),
    /// Everything queued before it is durable and processed.
    Barrier(oneshot::Sender<()>),
}

/// Processes commit reports, woken once per storage batch, until the node is gone (the
/// task holds no strong handle, so it does not keep the node alive).
async fn run_completions(node: Weak<Inner>, mut completed: watch::Receiver<u64>) {
    let mut batch = Vec::new();
    let mut commits = 0;
    while completed.changed().await.is_ok() {
        let Some(inner) = node.upgrade() else { return };
        let now = inner.storage.commits();
        inner.metrics.storage_commits.add(now.saturating_sub(commits));
        commits = now;
        std::mem::swap(&mut batch, &mut *inner.durable.lock().unwrap_or_else(|p| p.into_inner()));
        Node { inner }.on_durable(&mut batch);
    }
}

impl Node {
    /// A node over `storage`. Its replica id is read from storage, or drawn and stored.
    pub async fn open(
        storage: Storage,
        metrics: Arc<Metrics>,
        options: NodeOptions,
        cluster: Option<ClusterView>,
    ) -> Result<Node, StorageError> {
        let replica = match storage.get_meta("replica_id").await? {
            Some(b) if b.len() == 8 => ReplicaId(u64::from_le_bytes(b.try_into().unwrap_or([0; 8]))),
            _ => {
                let id = ReplicaId(random_u64());
                storage.put_meta("replica_id", id.0.to_le_bytes().to_vec()).await?;
                id
            }
        };
        let mut state = State::default();
        for target in storage.hint_targets().await? {
            for h in storage.hints_for(target.clone()).await? {
                state.hints.entry(h.doc).or_default().insert(target.clone(), h.id);
            }
        }
        for doc in storage.list_docs().await? {
            state.stored.insert(doc);
        }
        let completed = storage.completed();
        let auth = options.auth_secret.as_deref().map(|s| Keyring::new(s, options.auth_keys.clone()));
        let node = Node {
            inner: Arc::new(Inner {
                replica,
                storage,
                metrics,
                auth,
                options,
                cluster,
                state: Mutex::new(state),
                // Unbounded, yet bounded by the storage queue: one report per request.
                durable: Arc::default(),
                owner_acks: AtomicU64::new(0),
                fallback_acks: AtomicU64::new(0),
            }),
        };
        tokio::spawn(run_completions(Arc::downgrade(&node.inner), completed));
        // Version digests of stored documents, for anti-entropy.
        if node.inner.cluster.is_some() {
            let ids: Vec<String> = node.lock().stored.iter().cloned().collect();
            for id in ids {
                node.ensure_loaded(&id).await?;
                let mut st = node.lock();
                let vv = st.docs.get(&id).map(|e| e.doc.version().clone()).unwrap_or_default();
                node.record_stored(&mut st, &id, Some(&vv));
                Self::evict(&mut st, node.inner.options.doc_cache_capacity);
            }
        }
        Ok(node)
    }

    /// This node's replica id.
    pub fn replica(&self) -> ReplicaId {
        self.inner.replica
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug; keep serving with the data.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn session_config(&self) -> SessionConfig {
        SessionConfig { max_frame: self.inner.options.max_frame, ..SessionConfig::default() }
    }

    /// Runs `tick` on every session once a second, expires writes that missed their
    /// quorum, and (in a cluster) hands off hints and runs anti-entropy, until
    /// `shutdown` resolves.
    pub async fn run_ticker(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut every = tokio::time::interval(Duration::from_millis(250));
        let mut n: u64 = 0;
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = every.tick() => {
                    n += 1;
                    self.expire_writes();
                    if n.is_multiple_of(4) {
                        let mut st = self.lock();
                        let State { docs, conns, .. } = &mut *st;
                        for c in conns.values_mut() {
                            for m in c.session.tick(&mut Docs { docs }) {
                                self.send(&c.out, &m);
                            }
                        }
                    }
                    if self.inner.cluster.is_some() {
                        crate::cluster::tick(&self, n).await;
                    }
                }
            }
        }
    }

    fn expire_writes(&self) {
        let now = Instant::now();
        let mut st = self.lock();
        let State { docs, conns, .. } = &mut *st;
        for (doc_id, e) in docs.iter_mut() {
            let (late, keep): (Vec<WaitingWrite>, Vec<WaitingWrite>) =
                std::mem::take(&mut e.waiting).into_iter().partition(|w| w.deadline <= now);
            e.waiting = keep;
            for w in late {
                if let Some(c) = conns.get(&w.conn) {
                    let msg = Msg::Error(ErrorMsg {
                        code: ErrorCode::NOT_ENOUGH_REPLICAS,
                        doc: Some(doc_id.clone()),
                        message: format!(
                            "only {} of {} replicas confirmed the write in time; it is kept on your side, retry",
                            w.quorum.acks(),
                            w.quorum.w()
                        ),
                    });
                    self.send(&c.out, &msg);
                }
            }
        }
    }

    /// Makes sure `doc` is in memory, loading it from storage.
    pub(crate) async fn ensure_loaded(&self, doc_id: &str) -> Result<(), StorageError> {
        if self.lock().docs.contains_key(doc_id) {
            return Ok(());
        }
        let stored = self.inner.storage.load_doc(doc_id).await?;
        let cfg = self.inner.options.doc_config;
        let mut doc = match stored.snapshot.as_deref().map(|b| Document::decode(b, cfg)) {
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                tracing::error!(doc = doc_id, error = %e, "stored snapshot is unreadable; starting from its deltas");
                Document::with_config(self.inner.replica, cfg)
            }
            None => Document::with_config(self.inner.replica, cfg),
        };
        let mut next_seq = 1;
        for (seq, bytes) in &stored.deltas {
            next_seq = seq + 1;
            match Delta::decode(bytes) {
                Ok(d) => {
                    let _ = doc.apply(d);
                }
                Err(e) => {
                    tracing::error!(doc = doc_id, seq, error = %e, "skipping an unreadable stored delta")
                }
            }
        }
        let durable = CausalContext { vv: doc.version().clone(), cloud: Default::default() };
        let snapshot_entries = entries(&doc);
        let mut st = self.lock();
        st.clock += 1;
        let clock = st.clock;
        st.docs.entry(doc_id.to_owned()).or_insert(DocEntry {
            doc,
            // Standalone, what is on disk is acknowledged; in a cluster, W replicas must
            // say so first (never overstate durability).
            quorum: if self.inner.cluster.is_some() { CausalContext::default() } else { durable.clone() },
            durable,
            peer_acks: HashMap::new(),
            waiting: Vec::new(),
            next_seq,
            since_snapshot: stored.deltas.len() as u64,
            snapshot_entries,
            inflight: 0,
            ack_waiters: Vec::new(),
            members: BTreeSet::new(),
            last_used: clock,
        });
        Ok(())
    }

    /// Unloads least recently used documents nobody is subscribed to, beyond capacity.
    fn evict(st: &mut State, capacity: usize) {
        if st.docs.len() <= capacity {
            return;
        }
        let mut idle: Vec<(u64, String)> = st
            .docs
            .iter()
            .filter(|(_, e)| e.members.is_empty() && e.inflight == 0 && e.waiting.is_empty())
            .map(|(k, e)| (e.last_used, k.clone()))
            .collect();
        idle.sort();
        let excess = st.docs.len() - capacity;
        for (_, k) in idle.into_iter().take(excess) {
            st.docs.remove(&k);
        }
    }

    pub(crate) fn send(&self, out: &Outbox, msg: &Msg) {
        let bytes = msg.encode();
        if let Msg::Error(e) = msg {
            self.inner.metrics.error(e.code.name());
        }
        // Sent frames are counted by the connection's writer when they go out. A refusal
        // means the peer would miss something it needs: it is logged and counted, and the
        // connection is closed so the peer reconnects and catches up (a full queue closes
        // it already; a closed one is gone).
        match out.send(bytes) {
            Ok(()) | Err(SendError::Closed) | Err(SendError::Full) => {}
            Err(e @ SendError::TooLarge { .. }) => {
                tracing::error!(error = %e, "a frame could not be sent; closing the connection so it resyncs");
                self.inner.metrics.error("frame_too_large");
                out.resync();
            }
        }
    }

    fn error(&self, out: &Outbox, code: ErrorCode, doc: Option<&str>, message: String) {
        self.send(out, &Msg::Error(ErrorMsg { code, doc: doc.map(str::to_owned), message }));
    }

    /// What access a message needs on its document.
    fn needs(msg: &Msg) -> Access {
        match msg {
            Msg::Deltas(_) | Msg::MerkleStart(_) | Msg::State(_) => Access::ReadWrite,
            _ => Access::Read,
        }
    }

    /// The token a peer link presents: a fresh, short-lived peer credential.
    pub(crate) fn peer_token(&self, me: &str) -> String {
        match &self.inner.auth {
            None => format!("{PEER_TOKEN_PREFIX}{me}"),
            Some(keys) => match keys.peer_credential(me, unix_now()) {
                Ok(credential) => format!("{PEER_TOKEN_PREFIX}{credential}"),
                Err(e) => {
                    // Cannot happen with a derived 32-byte key; the peer refuses the link.
                    tracing::error!(error = %e, "cannot sign a peer credential");
                    PEER_TOKEN_PREFIX.to_owned()
                }
            },
        }
    }

    /// `node` when it is another member of this node's cluster.
    fn cluster_member(&self, node: String) -> Result<String, AuthError> {
        match &self.inner.cluster {
            Some(cluster) if cluster.peers.contains_key(&node) => Ok(node),
            _ => Err(AuthError::UnknownPeer { node }),
        }
    }

    /// Answers UNAUTHORIZED and closes with 1008.
    fn refuse(&self, c: &ConnEntry, message: String) -> Result<(), CloseReason> {
        self.error(&c.out, ErrorCode::UNAUTHORIZED, None, message);
        Err(CloseReason::policy("unauthorized"))
    }

    /// Checks a `Hello`. A `peer:` token must carry a peer credential (derived peer key,
    /// `kind: "peer"`, naming another cluster member) when a secret is set, and name a
    /// member without; no client token can pass for one. Anything else is a client, who
    /// needs a valid client token when a secret is set.
    fn authenticate(&self, c: &mut ConnEntry, token: Option<&str>) -> Result<(), CloseReason> {
        let now = unix_now();
        if let Some(rest) = token.and_then(|t| t.strip_prefix(PEER_TOKEN_PREFIX)) {
            let node = match &self.inner.auth {
                None => Ok(rest.to_owned()),
                Some(keys) => keys.verify_peer(rest, now).map(|p| p.node),
            }
            .and_then(|node| self.cluster_member(node));
            return match node {
                Ok(node) => {
                    if self.inner.auth.is_some() {
                        c.claims = Claims::new("*", Access::ReadWrite, u64::MAX / 2).ok();
                    }
                    c.peer = Some(node);
                    Ok(())
                }
                Err(e) => {
                    tracing::warn!(error = %e, "refused a peer link");
                    self.refuse(c, format!("peer credential rejected: {e}"))
                }
            };
        }
        let Some(keys) = &self.inner.auth else { return Ok(()) };
        match token.map(|t| keys.verify_client(t, now)) {
            Some(Ok(claims)) => {
                c.claims = Some(claims);
                Ok(())
            }
            Some(Err(e)) => self.refuse(c, e.to_string()),
            None => self.refuse(c, "this relay requires a token in Hello; ask your server for one".into()),
        }
    }

    /// Authorises and applies one message of connection `id` (whose entry is taken out of
    /// `conns` meanwhile), fanning out and queueing writes into `pending`.
    #[allow(clippy::too_many_arguments)]
    fn process(
        &self,
        id: u64,
        c: &mut ConnEntry,
        msg: Msg,
        st: &mut State,
        clock: u64,
        pending: &mut Vec<Pending>,
        follow: &mut Vec<String>,
    ) -> Result<(), CloseReason> {
        if let Msg::Hello(h) = &msg {
            self.authenticate(c, h.token.as_deref())?;
        } else if self.inner.auth.is_some() {
            if let Some(doc) = msg.doc() {
                let allowed = match &c.claims {
                    Some(claims) => claims.check(doc, Self::needs(&msg)).map_err(|e| e.to_string()),
                    None => Err("send Hello with a token first".to_string()),
                };
                if let Err(why) = allowed {
                    if !matches!(msg, Msg::Error(_)) {
                        self.error(&c.out, ErrorCode::FORBIDDEN, Some(doc), why);
                    }
                    return Ok(());
                }
            }
        }
        // Kept in case nothing is new (a retry): the dots, and in a cluster the deltas
        // themselves, to send them to the replicas again.
        let coordinator = self.inner.cluster.is_some() && c.peer.is_none();
        let retry: Option<(String, Vec<Span>, Vec<Delta>)> = match &msg {
            Msg::Deltas(d) => Some((
                d.doc.clone(),
                d.deltas.iter().map(Delta::span).collect(),
                if coordinator { d.deltas.clone() } else { Vec::new() },
            )),
            _ => None,
        };
        let State { docs, conns, links, hints, hint_deletes, shared, .. } = st;
        let result = c.session.handle_msg(msg, &mut Docs { docs });
        let out = match result {
            Ok(o) => o,
            Err(e) => {
                self.send(&c.out, &e.to_msg());
                return match e {
                    SyncError::Version { .. } => Err(CloseReason::protocol("protocol version mismatch")),
                    _ => Ok(()),
                };
            }
        };
        for m in &out.replies {
            self.send(&c.out, m);
        }
        let mut applied_any = false;
        for ev in out.events {
            match ev {
                Event::Subscribed { doc } => {
                    if let Some(e) = docs.get_mut(&doc) {
                        e.members.insert(id);
                        e.last_used = clock;
                        // Tell the subscriber what is already durable, so a writer that
                        // reconnects learns which of its writes need no resend.
                        let vv = if c.peer.is_some() { e.durable.vv.clone() } else { self.quorum_vv(e) };
                        self.send(&c.out, &c.session.ack(&doc, &vv));
                    }
                    if c.peer.is_none() {
                        follow.push(doc.clone());
                    }
                    c.docs.insert(doc);
                }
                Event::Unsubscribed { doc } => {
                    if let Some(e) = docs.get_mut(&doc) {
                        e.members.remove(&id);
                    }
                    c.docs.remove(&doc);
                }
                Event::Applied { doc, deltas } => {
                    applied_any = true;
                    let Some(e) = docs.get_mut(&doc) else { continue };
                    e.last_used = clock;
                    let mut ops = Vec::with_capacity(deltas.len() + 2);
                    for d in &deltas {
                        ops.push(WriteOp::PutDelta { doc: doc.clone(), seq: e.next_seq, bytes: d.encode() });
                        e.next_seq += 1;
                    }
                    e.since_snapshot += deltas.len() as u64;
                    if e.snapshot_due() {
                        // The snapshot holds this frame's deltas too: write it instead.
                        ops.clear();
                        ops.push(e.snapshot(&doc));
                    }
                    self.hint_ops(&doc, hints, &mut ops, c.peer.is_some());
                    e.inflight += 1;
                    let dots: Vec<Span> = deltas.iter().map(Delta::span).collect();
                    if coordinator {
                        self.start_quorum(&doc, e, id, dots.clone(), links);
                        // The targets may have changed since the client subscribed (a node
                        // went down: a fallback takes its place).
                        follow.push(doc.clone());
                    }
                    pending.push(Pending {
                        doc: doc.clone(),
                        ops,
                        dots,
                        absorb: None,
                        ack_local: !coordinator,
                    });
                    // Fan out at once; the ack waits for durability.
                    let members: Vec<u64> = e.members.iter().copied().filter(|m| *m != id).collect();
                    for m in members {
                        if let Some(o) = conns.get_mut(&m) {
                            for msg in o.session.on_local_deltas(&doc, &deltas) {
                                self.send(&o.out, &msg);
                            }
                        }
                    }
                }
                Event::StateMerged { doc } => {
                    applied_any = true;
                    let Some(e) = docs.get_mut(&doc) else { continue };
                    e.inflight += 1;
                    let mut ops = vec![e.snapshot(&doc)];
                    self.hint_ops(&doc, hints, &mut ops, c.peer.is_some());
                    let vv = e.doc.version().clone();
                    // No deltas carry merged state to the document's other subscribers:
                    // tell them our version, so they catch up now (a writer that came
                    // online with more writes than the delta log holds would otherwise
                    // reach them only at their next refresh, half a minute later).
                    let members: Vec<u64> = e.members.iter().copied().filter(|m| *m != id).collect();
                    for m in members {
                        if let Some(o) = conns.get_mut(&m) {
                            for msg in o.session.on_state_merged(&doc, &mut Docs { docs }) {
                                self.send(&o.out, &msg);
                            }
                        }
                    }
                    pending.push(Pending { doc, ops, dots: Vec::new(), absorb: Some(vv), ack_local: true });
                }
                Event::Acked { doc, vv } => {
                    if let (Some(peer), Some(e)) = (&c.peer, docs.get_mut(&doc)) {
                        e.peer_acks.entry(peer.clone()).or_default().merge(&vv);
                        self.check_quorum(&doc, e, conns, Some(peer));
                        // Writes acknowledged by W replicas through any path (e.g. after a
                        // restart) are acknowledged to this document's clients.
                        let qv = self.quorum_vv(e);
                        if !qv.le(&e.quorum.vv) {
                            e.quorum.absorb(&qv);
                            for m in &e.members {
                                if let Some(o) = conns.get(m).filter(|o| o.peer.is_none()) {
                                    self.send(&o.out, &o.session.ack(&doc, &e.quorum.vv));
                                }
                            }
                        }
                        crate::cluster::on_peer_ack(hints, hint_deletes, &doc, peer, &vv, e.doc.version());
                    }
                }
                Event::PeerError(err) => {
                    tracing::debug!(code = err.code.name(), doc = ?err.doc, message = %err.message, "peer reported an error");
                }
                // Document sets are relay business: only a peer relay may see them, and
                // only the part it shares with this node.
                Event::DocSetQuery(q) => match &c.peer {
                    Some(peer) => crate::cluster::answer_docset(self, &c.out, shared.get(peer), peer, q),
                    None => self.error(
                        &c.out,
                        ErrorCode::FORBIDDEN,
                        None,
                        "document-set queries are for relay peer links".into(),
                    ),
                },
                Event::DocSetAnswer(a) => {
                    if let Some(peer) = &c.peer {
                        crate::cluster::on_docset_answer(self, peer, a);
                    }
                }
                Event::PeerHello { .. } | Event::Synced { .. } | Event::Progress { .. } => {}
            }
        }
        // A retried write (nothing new): ack what is durable, and in a cluster make sure
        // the write reaches its quorum again.
        if let (false, Some((doc, dots, deltas))) = (applied_any, retry) {
            if let Some(e) = docs.get_mut(&doc) {
                if coordinator {
                    let missing: Vec<Span> =
                        dots.into_iter().filter(|d| !e.quorum.contains_span(*d)).collect();
                    if !missing.is_empty() {
                        self.start_quorum(&doc, e, id, missing.clone(), links);
                        let resend: Vec<Delta> =
                            deltas.iter().filter(|d| missing.contains(&d.span())).cloned().collect();
                        for link in links.values() {
                            if let Some(o) = conns.get_mut(link) {
                                for msg in o.session.resend(&doc, &resend) {
                                    self.send(&o.out, &msg);
                                }
                            }
                        }
                        self.check_quorum(&doc, e, conns, None);
                    }
                    if missing.is_empty() {
                        self.send(&c.out, &c.session.ack(&doc, &e.quorum.vv));
                    }
                } else if e.inflight == 0 || dots.iter().all(|d| e.durable.contains_span(*d)) {
                    self.send(&c.out, &c.session.ack(&doc, &e.durable.vv));
                } else {
                    e.ack_waiters.push((id, dots));
                }
            }
        }
        Ok(())
    }

    /// Hint records for a document this node stores on behalf of down owners.
    fn hint_ops(
        &self,
        doc: &str,
        hints: &mut BTreeMap<String, BTreeMap<String, u64>>,
        ops: &mut Vec<WriteOp>,
        from_peer: bool,
    ) {
        let Some(cluster) = &self.inner.cluster else { return };
        if !from_peer || cluster.owns_self(doc) || hints.contains_key(doc) {
            return;
        }
        let owners: Vec<String> = cluster.owners(doc).into_iter().filter(|o| *o != cluster.me).collect();
        let mut mine = BTreeMap::new();
        for owner in owners {
            let id = self.inner.storage.next_hint_id();
            ops.push(WriteOp::PutHint { target: owner.clone(), doc: doc.to_owned(), id, bytes: Vec::new() });
            mine.insert(owner, id);
        }
        hints.insert(doc.to_owned(), mine);
    }

    /// The version durable on at least W nodes: per replica, the W-th highest of this
    /// node's durable version and the versions peers acknowledged.
    fn quorum_vv(&self, e: &DocEntry) -> VersionVector {
        let Some(cluster) = &self.inner.cluster else { return e.durable.vv.clone() };
        let all: Vec<&VersionVector> = std::iter::once(&e.durable.vv).chain(e.peer_acks.values()).collect();
        let mut out = e.quorum.vv.clone();
        out.merge(&quorum_version(cluster.w, &all));
        out
    }

    /// Registers a client write that needs W durable acks.
    fn start_quorum(
        &self,
        doc: &str,
        e: &mut DocEntry,
        conn: u64,
        dots: Vec<Span>,
        links: &HashMap<String, u64>,
    ) {
        let Some(cluster) = &self.inner.cluster else { return };
        let walk = cluster.walk(doc);
        let walk_refs: Vec<&str> = walk.iter().map(String::as_str).collect();
        let targets =
            write_targets(&walk_refs, cluster.n, |node| node == cluster.me || cluster.is_up(node, links));
        let mut quorum = WriteQuorum::new(cluster.w, targets);
        for (peer, vv) in &e.peer_acks {
            if dots.iter().all(|d| vv.contains(d.last_dot())) {
                quorum.ack(peer);
            }
        }
        let now = Instant::now();
        e.waiting.push(WaitingWrite {
            dots,
            conn,
            quorum,
            deadline: now + self.inner.options.write_timeout,
            received: now,
        });
    }

    /// Acks every waiting write of `doc` whose quorum is now complete.
    fn check_quorum(
        &self,
        doc: &str,
        e: &mut DocEntry,
        conns: &HashMap<u64, ConnEntry>,
        acker: Option<&str>,
    ) {
        let Some(cluster) = &self.inner.cluster else { return };
        let mut done = Vec::new();
        for (i, w) in e.waiting.iter_mut().enumerate() {
            match acker {
                Some(peer) => {
                    if e.peer_acks
                        .get(peer)
                        .is_some_and(|vv| w.dots.iter().all(|d| vv.contains(d.last_dot())))
                    {
                        w.quorum.ack(peer);
                    }
                }
                None => {
                    if w.dots.iter().all(|d| e.durable.contains_span(*d)) {
                        w.quorum.ack(&cluster.me);
                    }
                }
            }
            if w.quorum.is_reached() {
                done.push(i);
            }
        }
        for i in done.into_iter().rev() {
            let w = e.waiting.remove(i);
            self.inner.owner_acks.fetch_add(w.quorum.owner_acks() as u64, Ordering::Relaxed);
            self.inner.fallback_acks.fetch_add(w.quorum.fallback_acks() as u64, Ordering::Relaxed);
            for d in &w.dots {
                e.quorum.insert_span(*d);
            }
            if let Some(c) = conns.get(&w.conn) {
                self.send(&c.out, &c.session.ack(doc, &e.quorum.vv));
            }
            self.inner.metrics.observe_ack_latency(w.received.elapsed());
        }
    }

    async fn handle(&self, conn: &NodeConn, frame: Vec<u8>) -> Result<(), CloseReason> {
        let msg = match Msg::decode(&frame) {
            Ok(m) => m,
            Err(e) => {
                let code = if matches!(e, FrameError::UnknownTag(_)) {
                    ErrorCode::UNKNOWN_TAG
                } else {
                    ErrorCode::BAD_FRAME
                };
                self.error(&conn.out, code, None, format!("{e}; frame ignored"));
                return Ok(());
            }
        };
        drop(frame);
        if let Some(doc) = msg.doc() {
            if !matches!(msg, Msg::Error(_)) {
                if let Err(e) = self.ensure_loaded(doc).await {
                    self.error(
                        &conn.out,
                        ErrorCode::INTERNAL,
                        Some(doc),
                        format!("storage failed: {e}; retry later"),
                    );
                    return Ok(());
                }
            }
        }
        // Any frame may end up writing (deltas, a finished catch-up): take its place among
        // the connection's uncommitted frames and in the storage queue before the lock,
        // so that the write can be queued under it, in the order the documents changed.
        let Ok(permit) = conn.uncommitted.clone().acquire_owned().await else { return Ok(()) };
        let slot = match self.inner.storage.reserve().await {
            Ok(slot) => slot,
            Err(e) => {
                self.error(
                    &conn.out,
                    ErrorCode::INTERNAL,
                    msg.doc(),
                    format!("storage failed: {e}; retry later"),
                );
                return Ok(());
            }
        };
        let mut pending: Vec<Pending> = Vec::new();
        let mut follow: Vec<String> = Vec::new();
        let mut st = self.lock();
        st.clock += 1;
        let clock = st.clock;
        let Some(mut c) = st.conns.remove(&conn.id) else { return Ok(()) };
        let r = self.process(conn.id, &mut c, msg, &mut st, clock, &mut pending, &mut follow);
        st.conns.insert(conn.id, c);
        if !pending.is_empty() {
            let mut ops = std::mem::take(&mut pending[0].ops);
            for p in &mut pending[1..] {
                ops.append(&mut p.ops);
            }
            let report = self.inner.durable.clone();
            let commit = Commit { conn: conn.id, pending, _permit: permit };
            slot.submit(ops, move |ops, result| {
                report.lock().unwrap_or_else(|p| p.into_inner()).push(Durable::Commit(commit, ops, result));
            });
        }
        r?;
        for doc in follow {
            crate::cluster::follow(self, &mut st, &doc);
        }
        Self::evict(&mut st, self.inner.options.doc_cache_capacity);
        Ok(())
    }

    /// Resolves once every write queued before the call is durable and its acks are
    /// sent (for tests and the in-process profile).
    pub async fn settle(&self) {
        let Ok(slot) = self.inner.storage.reserve().await else { return };
        let (tx, rx) = oneshot::channel();
        let report = self.inner.durable.clone();
        slot.submit(Vec::new(), move |_, _| {
            report.lock().unwrap_or_else(|p| p.into_inner()).push(Durable::Barrier(tx));
        });
        let _ = rx.await;
    }

    /// Commit reports, in commit order: marks the writes durable, completes quorums, and
    /// acks each writer once per document for the whole batch.
    fn on_durable(&self, batch: &mut Vec<Durable>) {
        let mut barriers = Vec::new();
        let mut acks: Vec<(u64, String)> = Vec::new();
        let mut guard = self.lock();
        let st = &mut *guard;
        for report in batch.drain(..) {
            let (commit, res) = match report {
                Durable::Barrier(tx) => {
                    barriers.push(tx);
                    continue;
                }
                Durable::Commit(commit, ops, res) => {
                    drop(ops);
                    (commit, res)
                }
            };
            for p in commit.pending {
                let State { docs, conns, .. } = &mut *st;
                let Some(e) = docs.get_mut(&p.doc) else { continue };
                e.inflight = e.inflight.saturating_sub(1);
                match &res {
                    Ok(()) => {
                        for d in &p.dots {
                            e.durable.insert_span(*d);
                        }
                        if let Some(vv) = &p.absorb {
                            e.durable.absorb(vv);
                        }
                        if !e.ack_waiters.is_empty() {
                            let idle = e.inflight == 0;
                            let durable = &e.durable;
                            e.ack_waiters.retain(|(w, dots)| {
                                let done = idle || dots.iter().all(|d| durable.contains_span(*d));
                                if done {
                                    acks.push((*w, p.doc.clone()));
                                }
                                !done
                            });
                        }
                        self.inner.metrics.deltas_persisted.add(p.dots.len() as u64);
                        if p.ack_local {
                            if self.inner.cluster.is_none() {
                                for d in &p.dots {
                                    e.quorum.insert_span(*d);
                                }
                            }
                        } else {
                            self.check_quorum(&p.doc, e, conns, None);
                        }
                        let vv = self.inner.cluster.is_some().then(|| e.doc.version().clone());
                        self.record_stored(st, &p.doc, vv.as_ref());
                        if p.ack_local {
                            acks.push((commit.conn, p.doc));
                        }
                    }
                    Err(err) => {
                        tracing::error!(doc = %p.doc, error = %err, "persisting failed");
                        if e.inflight == 0 {
                            // Nothing else will make them durable: tell them what is.
                            for (w, _) in std::mem::take(&mut e.ack_waiters) {
                                acks.push((w, p.doc.clone()));
                            }
                        }
                        if let Some(c) = conns.get(&commit.conn) {
                            self.error(
                                &c.out,
                                ErrorCode::INTERNAL,
                                Some(&p.doc),
                                format!("storage failed: {err}; the write was not acknowledged, retry"),
                            );
                        }
                    }
                }
            }
        }
        // One ack per connection and document, with everything durable by now.
        acks.sort_unstable();
        acks.dedup();
        for (conn, doc) in acks {
            if let (Some(c), Some(e)) = (st.conns.get(&conn), st.docs.get(&doc)) {
                self.send(&c.out, &c.session.ack(&doc, &e.durable.vv));
            }
        }
        drop(guard);
        for tx in barriers {
            let _ = tx.send(());
        }
    }

    /// Registers a connection made by this node to a peer relay (a cluster link) and
    /// sends its `Hello`.
    pub(crate) fn attach_link(&self, peer: &str, me: &str, out: Outbox) -> NodeConn {
        let conn = self.attach(out, Some(peer.to_owned()));
        let hello = {
            let st = self.lock();
            st.conns.get(&conn.id).map(|c| c.session.hello(Some(self.peer_token(me))))
        };
        if let Some(h) = hello {
            self.send(&conn.out, &h);
        }
        self.lock().links.insert(peer.to_owned(), conn.id);
        conn
    }

    /// Forgets a peer link.
    pub(crate) fn detach_link(&self, peer: &str, conn: NodeConn) {
        {
            let mut st = self.lock();
            if st.links.get(peer) == Some(&conn.id) {
                st.links.remove(peer);
            }
        }
        self.on_close(conn);
    }

    fn attach(&self, out: Outbox, peer: Option<String>) -> NodeConn {
        let mut st = self.lock();
        st.next_conn += 1;
        let id = st.next_conn;
        let session = Session::new(self.inner.replica, self.session_config());
        st.conns
            .insert(id, ConnEntry { session, out: out.clone(), claims: None, docs: BTreeSet::new(), peer });
        NodeConn { id, out, uncommitted: Arc::new(Semaphore::new(MAX_UNCOMMITTED_FRAMES)) }
    }

    /// Handles one frame of a connection (server connections and peer links alike).
    pub(crate) async fn handle_frame(&self, conn: &NodeConn, frame: Vec<u8>) -> Result<(), CloseReason> {
        self.handle(conn, frame).await
    }

    /// Facts about hints and peers for `/healthz`.
    pub fn pending_hints(&self) -> usize {
        self.lock().hints.values().map(BTreeMap::len).sum()
    }

    /// Notes that `doc` is durable here at `vv`: in the stored set and in the shared
    /// document-set tree of every peer that also owns it (O(peers) per commit).
    fn record_stored(&self, st: &mut State, doc: &str, vv: Option<&VersionVector>) {
        if !st.stored.contains(doc) {
            st.stored.insert(doc.to_owned());
        }
        let (Some(cluster), Some(vv)) = (&self.inner.cluster, vv) else { return };
        for peer in cluster.peers.keys() {
            if cluster.shares(peer, doc) {
                st.shared.entry(peer.clone()).or_default().upsert(doc, vv);
            }
        }
    }

    /// Ids of loaded docs.
    pub(crate) fn loaded_docs(&self) -> HashSet<String> {
        self.lock().docs.keys().cloned().collect()
    }
}

impl Handler for Node {
    type Conn = NodeConn;

    fn open(&self, _info: ConnInfo, out: Outbox) -> NodeConn {
        let conn = self.attach(out, None);
        // The relay speaks first too: its Hello.
        let hello = self.lock().conns.get(&conn.id).map(|c| c.session.hello(None));
        if let Some(h) = hello {
            self.send(&conn.out, &h);
        }
        conn
    }

    async fn on_binary(&self, conn: &mut NodeConn, frame: Vec<u8>) -> Result<(), CloseReason> {
        self.handle_frame(conn, frame).await
    }

    fn on_close(&self, conn: NodeConn) {
        let mut st = self.lock();
        if let Some(c) = st.conns.remove(&conn.id) {
            for d in c.docs {
                if let Some(e) = st.docs.get_mut(&d) {
                    e.members.remove(&conn.id);
                }
            }
        }
    }

    fn rate_limited(&self, _conn: &mut NodeConn) -> Option<Vec<u8>> {
        self.inner.metrics.error("rate_limited");
        Some(
            Msg::Error(ErrorMsg {
                code: ErrorCode::RATE_LIMITED,
                doc: None,
                message: "rate limit exceeded; reconnect and send more slowly".into(),
            })
            .encode(),
        )
    }

    fn health(&self) -> HealthInfo {
        let st = self.lock();
        let mut extra =
            vec![("pending_hints".to_string(), st.hints.values().map(BTreeMap::len).sum::<usize>() as i64)];
        if let Some(cluster) = &self.inner.cluster {
            for (peer, state) in cluster.peer_states(&st.links) {
                extra.push((format!("peer_{peer}_state"), state));
            }
            extra.push((
                "quorum_acks_owner".to_string(),
                self.inner.owner_acks.load(Ordering::Relaxed) as i64,
            ));
            extra.push((
                "quorum_acks_fallback".to_string(),
                self.inner.fallback_acks.load(Ordering::Relaxed) as i64,
            ));
        }
        HealthInfo { documents_loaded: st.docs.len() as u64, extra }
    }

    fn http_get(&self, path: &str, query: Option<&str>) -> Option<(u16, &'static str, Vec<u8>)> {
        crate::cluster::http_get_route(self, path, query)
    }

    /// An admin credential: `kind: "admin"`, signed with the admin key derived from the
    /// secret, not expired. Without a secret there is none.
    fn admin_allowed(&self, credential: &str) -> bool {
        self.inner.auth.as_ref().is_some_and(|keys| keys.verify_admin(credential, unix_now()).is_ok())
    }

    async fn flush(&self) {
        // Every applied delta was written when it arrived; snapshot what changed since.
        let snapshots: Vec<WriteOp> = {
            let st = self.lock();
            st.docs
                .iter()
                .filter(|(_, e)| e.since_snapshot > 0)
                .map(|(k, e)| WriteOp::PutSnapshot {
                    doc: k.clone(),
                    bytes: e.doc.encode(),
                    truncate_through: Some(e.next_seq - 1),
                })
                .collect()
        };
        if !snapshots.is_empty() {
            if let Err(e) = self.inner.storage.write(snapshots).await {
                tracing::error!(error = %e, "final snapshot failed; deltas on disk still hold every write");
            }
        }
        self.inner.storage.close().await;
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// 64 random-enough bits without a dependency: std's per-process random hash keys mixed
/// with the time and process id.
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}
