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

use concord_core::admit::{admit, check_doc_id, Limits, Refusal};
use concord_core::cluster::{write_targets, Target};
use concord_core::codec::Wire;
use concord_core::coordinator::{Action, Coordinator};
use concord_core::sync::msg::{Deltas, ErrorMsg};
use concord_core::sync::{ErrorCode, Event, FrameError, Msg, Session, SessionConfig, SyncError};
use concord_core::{CausalContext, Delta, DocConfig, Document, Field, ReplicaId, Span, VersionVector};

use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};

use crate::auth::{Access, AuthError, Claims, Keyring, VerifyKey};
use crate::cluster::ClusterView;
use crate::handler::{CloseReason, ConnInfo, Handler, HealthInfo, Outbox, SendError};
use crate::metrics::Metrics;
use crate::storage::{Storage, StorageError, StoredDoc, WriteOp, WriteSlot};

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
    /// Bounds on what clients store (document size, set elements, value size, ids).
    pub limits: Limits,
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
            limits: Limits::default(),
        }
    }
}

pub(crate) struct DocEntry {
    pub(crate) doc: Document,
    /// Dots durable on this node.
    durable: CausalContext,
    next_seq: u64,
    /// Deltas stored since the last snapshot.
    since_snapshot: u64,
    /// Entries (keys, and elements of sets) in the document at the last snapshot.
    snapshot_entries: u64,
    inflight: u64,
    /// A write of this document failed: memory holds dots the disk may lack, and that
    /// were never acknowledged. Its next write is a snapshot of the whole document (see
    /// [`Node::snapshot_write`]), which makes them durable; until then it stays loaded.
    unsaved: bool,
    /// Connections that resent deltas already applied but not yet durable, with their
    /// dots: acked once those are durable (or, failing that, when no write is in flight).
    ack_waiters: Vec<(u64, Vec<Span>)>,
    pub(crate) members: BTreeSet<u64>,
    last_used: u64,
    /// The document's encoded size, for `max_doc_bytes`: exact after a load or a
    /// snapshot, then plus the encoded size of each delta applied (about what a delta
    /// adds; an overwrite counts again, so it drifts up and is measured again near the
    /// limit).
    bytes: usize,
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
}

/// The number of keys and set elements of `doc`: what encoding it costs, roughly.
fn entries(doc: &Document) -> u64 {
    doc.keys().map(|k| if let Some(Field::Set(s)) = doc.get(k) { s.entries().len() as u64 } else { 1 }).sum()
}

pub(crate) struct ConnEntry {
    pub(crate) session: Session,
    pub(crate) out: Outbox,
    claims: Option<Claims>,
    docs: BTreeSet<String>,
    /// Documents a read quorum vouched for on this connection: later subscriptions to
    /// them (the client's liveness refreshes) are answered at once.
    vouched: BTreeSet<String>,
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
    /// Write and read quorums (cluster mode).
    pub(crate) coordinator: Option<Coordinator>,
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
    /// The zero of the coordinator's millisecond clock.
    started: Instant,
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
    /// The writer; `None` for the node's own retry of a failed write (see
    /// [`Node::persist_unsaved`]), acked to the document's subscribers instead.
    conn: Option<u64>,
    /// Their `ops` already went to storage.
    pending: Vec<Pending>,
    /// The connection's place for an uncommitted frame, given back once processed.
    _permit: Option<OwnedSemaphorePermit>,
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
        let stored = storage.get_meta(REPLICA_ID_KEY).await?;
        let replica = match stored.as_deref().map(decode_replica_id) {
            Some(Ok(id)) => id,
            found => {
                if let Some(Err(e)) = found {
                    // A fresh id is always safe (no dot of it exists anywhere); the
                    // damaged one cannot be reused anyway.
                    tracing::error!(error = %e, "taking a new replica id");
                }
                let id = ReplicaId(random_u64());
                storage.put_meta(REPLICA_ID_KEY, id.0.to_le_bytes().to_vec()).await?;
                id
            }
        };
        let mut state = State {
            coordinator: cluster
                .as_ref()
                .map(|c| Coordinator::new(&c.me, c.w, c.r, options.write_timeout.as_millis() as u64)),
            ..State::default()
        };
        for target in storage.hint_targets().await? {
            for h in storage.hints_for(target.clone()).await? {
                state.hints.entry(h.doc).or_default().insert(target.clone(), h.id);
            }
        }
        // Each document's version is recorded beside it: start-up reads those records,
        // never the documents (a store written before they existed is read once, below).
        let complete = storage.get_meta(VERSIONS_COMPLETE).await?.is_some();
        let mut versions = Vec::new();
        if complete {
            for (doc, bytes) in storage.versions().await? {
                match concord_core::codec::whole::<VersionVector>(&bytes)
                    .ok()
                    .filter(|v| v.validate().is_ok())
                {
                    Some(vv) => versions.push((doc.clone(), vv)),
                    None => tracing::error!(
                        doc,
                        "unreadable version record; anti-entropy will compare this document as empty"
                    ),
                }
                state.stored.insert(doc);
            }
        } else {
            for doc in storage.list_docs().await? {
                state.stored.insert(doc);
            }
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
                started: Instant::now(),
            }),
        };
        tokio::spawn(run_completions(Arc::downgrade(&node.inner), completed));
        // Version digests of stored documents, for anti-entropy.
        if complete {
            let mut st = node.lock();
            for (doc, vv) in &versions {
                node.record_stored(&mut st, doc, Some(vv));
            }
        } else {
            // A store from before version records: read each document once to write them.
            let ids: Vec<String> = node.lock().stored.iter().cloned().collect();
            let mut ops = Vec::with_capacity(ids.len() + 1);
            for id in ids {
                match node.ensure_loaded(&id).await {
                    // Logged; the document is refused to whoever asks for it, the others
                    // are served.
                    Err(StorageError::Corrupt { .. }) => continue,
                    r => r?,
                }
                let mut st = node.lock();
                if let Some(e) = st.docs.get(&id) {
                    ops.push(version_op(&id, &e.doc));
                    let vv = e.doc.version().clone();
                    node.record_stored(&mut st, &id, Some(&vv));
                }
                Self::evict(&mut st, node.inner.options.doc_cache_capacity);
            }
            ops.push(WriteOp::PutMeta { key: VERSIONS_COMPLETE.into(), bytes: vec![1] });
            node.inner.storage.write(ops).await?;
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

    /// Runs `tick` on every session and writes again documents whose writes failed once
    /// a second, expires writes that missed their quorum, and (in a cluster) hands off
    /// hints and runs anti-entropy, until `shutdown` resolves.
    pub async fn run_ticker(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut every = tokio::time::interval(Duration::from_millis(250));
        let mut n: u64 = 0;
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = every.tick() => {
                    n += 1;
                    self.expire();
                    if n.is_multiple_of(4) {
                        {
                            let mut st = self.lock();
                            let State { docs, conns, .. } = &mut *st;
                            for c in conns.values_mut() {
                                for m in c.session.tick(&mut Docs { docs }) {
                                    self.send(&c.out, &m);
                                }
                            }
                        }
                        self.persist_unsaved().await;
                    }
                    if self.inner.cluster.is_some() {
                        crate::cluster::tick(&self, n).await;
                    }
                }
            }
        }
    }

    /// Milliseconds on the coordinator's clock.
    fn now_ms(&self) -> u64 {
        self.inner.started.elapsed().as_millis() as u64
    }

    /// The targets of `doc` as health stands now: the first N healthy nodes of its
    /// preference list (this node always counts itself healthy).
    fn targets(&self, doc: &str, links: &HashMap<String, u64>) -> Vec<Target> {
        let Some(cluster) = &self.inner.cluster else { return Vec::new() };
        let walk = cluster.walk(doc);
        let walk_refs: Vec<&str> = walk.iter().map(String::as_str).collect();
        write_targets(&walk_refs, cluster.n, |node| node == cluster.me || cluster.is_up(node, links))
    }

    /// Writes and reads past their deadline (see [`Coordinator::tick`]).
    fn expire(&self) {
        let now = self.now_ms();
        let mut st = self.lock();
        let State { docs, conns, links, coordinator, .. } = &mut *st;
        let Some(co) = coordinator else { return };
        let acts = co.tick(now, |doc| self.targets(doc, links));
        self.execute(acts, docs, conns, links, None);
    }

    /// Carries out the coordinator's actions. `current` is the connection being served,
    /// which is out of `conns` meanwhile.
    fn execute(
        &self,
        acts: Vec<Action>,
        docs: &mut HashMap<String, DocEntry>,
        conns: &mut HashMap<u64, ConnEntry>,
        links: &HashMap<String, u64>,
        mut current: Option<(u64, &mut ConnEntry)>,
    ) {
        for act in acts {
            let conn_id = match &act {
                Action::Ack { conn, .. }
                | Action::Answer { conn, .. }
                | Action::NotEnoughReplicas { conn, .. } => Some(*conn),
                Action::Acked { .. } | Action::Probe { .. } => None,
            };
            let conn = match (conn_id, current.as_mut()) {
                (Some(id), Some((cur, c))) if *cur == id => Some(&mut **c),
                (Some(id), _) => conns.get_mut(&id),
                (None, _) => None,
            };
            match act {
                Action::Ack { doc, vv, latency_ms, owner_acks, fallback_acks, .. } => {
                    self.inner.owner_acks.fetch_add(owner_acks as u64, Ordering::Relaxed);
                    self.inner.fallback_acks.fetch_add(fallback_acks as u64, Ordering::Relaxed);
                    self.inner.metrics.observe_ack_latency(Duration::from_millis(latency_ms));
                    if let Some(c) = conn {
                        self.send(&c.out, &c.session.ack(&doc, &vv));
                    }
                }
                Action::Acked { doc, vv } => {
                    let Some(e) = docs.get(&doc) else { continue };
                    for m in &e.members {
                        let c = match current.as_mut() {
                            Some((cur, c)) if cur == m => Some(&**c),
                            _ => conns.get(m),
                        };
                        if let Some(c) = c.filter(|c| c.peer.is_none()) {
                            self.send(&c.out, &c.session.ack(&doc, &vv));
                        }
                    }
                }
                Action::Answer { doc, .. } => {
                    if let Some(c) = conn {
                        c.vouched.insert(doc.clone());
                        for m in c.session.answer_again(&doc, &mut Docs { docs }) {
                            self.send(&c.out, &m);
                        }
                    }
                }
                Action::Probe { peer, doc } => {
                    let Some(link) = links.get(&peer).and_then(|l| conns.get_mut(l)) else { continue };
                    for m in link.session.subscribe(&doc, &mut Docs { docs }) {
                        self.send(&link.out, &m);
                    }
                }
                Action::NotEnoughReplicas { doc, message, .. } => {
                    if let Some(c) = conn {
                        self.error(&c.out, ErrorCode::NOT_ENOUGH_REPLICAS, Some(&doc), message);
                    }
                }
            }
        }
    }

    /// Makes sure `doc` is in memory, loading it from storage.
    pub(crate) async fn ensure_loaded(&self, doc_id: &str) -> Result<(), StorageError> {
        if self.lock().docs.contains_key(doc_id) {
            return Ok(());
        }
        // What is stored is the size estimate to start from (no encode of what was just
        // decoded).
        let mut size = 0;
        let decoded = match self.inner.storage.load_doc(doc_id).await {
            Ok(stored) => {
                size = stored.snapshot.as_ref().map_or(0, Vec::len)
                    + stored.deltas.iter().map(|(_, b)| b.len()).sum::<usize>();
                decode_stored(doc_id, &stored, self.inner.replica, self.inner.options.doc_config)
            }
            Err(e) => Err(e),
        };
        let (doc, next_seq, since_snapshot) = match decoded {
            Ok(d) => d,
            Err(e) => {
                if matches!(e, StorageError::Corrupt { .. }) {
                    tracing::error!(doc = doc_id, error = %e, "a stored document is unreadable; it is not served");
                }
                return Err(e);
            }
        };
        let durable = CausalContext { vv: doc.version().clone(), cloud: Default::default() };
        let snapshot_entries = entries(&doc);
        let mut st = self.lock();
        st.clock += 1;
        let clock = st.clock;
        st.docs.entry(doc_id.to_owned()).or_insert(DocEntry {
            doc,
            durable,
            next_seq,
            since_snapshot,
            snapshot_entries,
            inflight: 0,
            unsaved: false,
            ack_waiters: Vec::new(),
            members: BTreeSet::new(),
            last_used: clock,
            bytes: size,
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
            // An unsaved document holds the only copy of writes that failed on disk.
            .filter(|(k, e)| {
                e.members.is_empty()
                    && e.inflight == 0
                    && !e.unsaved
                    && st.coordinator.as_ref().is_none_or(|c| c.is_idle(k))
            })
            .map(|(k, e)| (e.last_used, k.clone()))
            .collect();
        idle.sort();
        let excess = st.docs.len() - capacity;
        for (_, k) in idle.into_iter().take(excess) {
            st.docs.remove(&k);
            if let Some(c) = &mut st.coordinator {
                c.forget(&k);
            }
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
            if h.replica == ReplicaId(0) {
                self.error(&c.out, ErrorCode::INVALID, None, Refusal::ReplicaZero.to_string());
                return Err(CloseReason::protocol("replica id 0"));
            }
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
        // A client's writes are checked whole before any of them is applied; peers only
        // forward what a relay already admitted.
        if let (Msg::Deltas(d), None) = (&msg, &c.peer) {
            if let Err(refusal) = self.admit(c, d, st) {
                let code = if refusal.too_large() { ErrorCode::TOO_LARGE } else { ErrorCode::INVALID };
                self.inner.metrics.error(if refusal.too_large() {
                    "write_too_large"
                } else {
                    "write_invalid"
                });
                tracing::debug!(doc = %d.doc, %refusal, "refused a write");
                self.error(&c.out, code, Some(&d.doc), format!("write refused, nothing applied: {refusal}"));
                return Ok(());
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
        // A client's first subscription in a cluster with R > 1 is answered only once a
        // read quorum vouched for this node's copy.
        let read = match (&msg, &self.inner.cluster) {
            (Msg::Subscribe(m), Some(cluster))
                if coordinator && cluster.r > 1 && !c.vouched.contains(&m.doc) =>
            {
                Some(m.doc.clone())
            }
            _ => None,
        };
        let State { docs, conns, links, hints, hint_deletes, shared, coordinator: co, .. } = st;
        let now = self.now_ms();
        // The coordinator's actions, carried out at the end.
        let mut acts: Vec<Action> = Vec::new();
        let result = c.session.handle_msg(msg, &mut Docs { docs });
        let mut out = match result {
            Ok(o) => o,
            Err(e) => {
                self.send(&c.out, &e.to_msg());
                return match e {
                    SyncError::Version { .. } => Err(CloseReason::protocol("protocol version mismatch")),
                    _ => Ok(()),
                };
            }
        };
        if let (Some(doc), Some(co)) = (read, co.as_mut()) {
            let read = co.read(id, &doc, self.targets(&doc, links), now);
            if read.iter().any(|a| matches!(a, Action::Answer { conn, .. } if *conn == id)) {
                c.vouched.insert(doc);
            } else {
                // Keep only the subscription back (so the client's writes flow): the
                // catch-up and `Synced` come with `Session::answer_again`.
                out.replies.retain(|m| matches!(m, Msg::Subscribe(_)));
                acts.extend(read);
            }
        }
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
                        let vv = if c.peer.is_some() {
                            e.durable.vv.clone()
                        } else {
                            self.acked_vv(co.as_ref(), &doc, e)
                        };
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
                        let bytes = d.encode();
                        e.bytes = e.bytes.saturating_add(bytes.len());
                        ops.push(WriteOp::PutDelta { doc: doc.clone(), seq: e.next_seq, bytes });
                        e.next_seq += 1;
                    }
                    e.since_snapshot += deltas.len() as u64;
                    let mut absorb = None;
                    if e.snapshot_due() || e.unsaved {
                        // The snapshot holds this frame's deltas too — and after a failed
                        // write, the deltas the disk lacks: write it instead. Were they
                        // written as deltas, the failed ones would leave a gap that keeps
                        // every later dot of their writer from counting as durable.
                        let (op, vv) = Self::snapshot_write(&doc, e);
                        ops.clear();
                        if let WriteOp::PutSnapshot { bytes, .. } = &op {
                            e.bytes = bytes.len();
                        }
                        ops.push(op);
                        absorb = Some(vv);
                    }
                    self.hint_ops(&doc, hints, &mut ops, c.peer.is_some());
                    ops.push(version_op(&doc, &e.doc));
                    e.inflight += 1;
                    let dots: Vec<Span> = deltas.iter().map(Delta::span).collect();
                    if let (true, Some(co)) = (coordinator, co.as_mut()) {
                        acts.extend(co.write(id, &doc, dots.clone(), self.targets(&doc, links), now));
                        // The targets may have changed since the client subscribed (a node
                        // went down: a fallback takes its place).
                        follow.push(doc.clone());
                    }
                    pending.push(Pending { doc: doc.clone(), ops, dots, absorb, ack_local: !coordinator });
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
                    let (op, vv) = Self::snapshot_write(&doc, e);
                    if let WriteOp::PutSnapshot { bytes, .. } = &op {
                        e.bytes = bytes.len();
                    }
                    let mut ops = vec![op];
                    self.hint_ops(&doc, hints, &mut ops, c.peer.is_some());
                    ops.push(version_op(&doc, &e.doc));
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
                        if let Some(co) = co.as_mut() {
                            acts.extend(co.peer_ack(peer, &doc, &vv, &e.durable.vv, now));
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
                Event::Synced { doc, .. } => {
                    if let (Some(peer), Some(co)) = (&c.peer, co.as_mut()) {
                        acts.extend(co.peer_answered(peer, &doc));
                    }
                }
                Event::PeerHello { .. } | Event::Progress { .. } => {}
            }
        }
        // A retried write (nothing new): ack what is durable, and in a cluster make sure
        // the write reaches its quorum again.
        if let (false, Some((doc, dots, deltas))) = (applied_any, retry) {
            if let Some(e) = docs.get_mut(&doc) {
                if let (true, Some(co)) = (coordinator, co.as_mut()) {
                    let targets = self.targets(&doc, links);
                    let (missing, retried) = co.retry(id, &doc, dots, targets, &e.durable, now);
                    acts.extend(retried);
                    if !missing.is_empty() {
                        let resend: Vec<Delta> =
                            deltas.iter().filter(|d| missing.contains(&d.span())).cloned().collect();
                        for link in links.values() {
                            if let Some(o) = conns.get_mut(link) {
                                for msg in o.session.resend(&doc, &resend) {
                                    self.send(&o.out, &msg);
                                }
                            }
                        }
                    }
                } else if dots.iter().all(|d| e.durable.contains_span(*d)) {
                    self.send(&c.out, &c.session.ack(&doc, &e.durable.vv));
                } else if e.inflight > 0 {
                    e.ack_waiters.push((id, dots));
                } else if e.unsaved {
                    // Their write failed on disk (memory has them, so nothing is new):
                    // write the whole document again; the ack or the error follows.
                    e.inflight += 1;
                    let (op, vv) = Self::snapshot_write(&doc, e);
                    let mut ops = vec![op];
                    self.hint_ops(&doc, hints, &mut ops, c.peer.is_some());
                    pending.push(Pending { doc, ops, dots: Vec::new(), absorb: Some(vv), ack_local: true });
                } else {
                    self.send(&c.out, &c.session.ack(&doc, &e.durable.vv));
                }
            }
        }
        self.execute(acts, docs, conns, links, Some((id, c)));
        Ok(())
    }

    /// Checks a client's frame of writes against the document and the limits. The size
    /// estimate is an overestimate: when it says no, the document is measured exactly
    /// before refusing.
    fn admit(&self, c: &ConnEntry, d: &Deltas, st: &mut State) -> Result<(), Refusal> {
        let limits = &self.inner.options.limits;
        let writer = c.session.peer().map(|h| h.replica);
        let catching_up = c.session.catching_up(&d.doc);
        let Some(e) = st.docs.get_mut(&d.doc) else {
            return admit(None, 0, &d.deltas, writer, catching_up, limits).map(drop);
        };
        match admit(Some(&e.doc), e.bytes, &d.deltas, writer, catching_up, limits) {
            Err(Refusal::DocTooLarge { .. }) => {
                e.bytes = e.doc.encode().len();
                admit(Some(&e.doc), e.bytes, &d.deltas, writer, catching_up, limits).map(drop)
            }
            r => r.map(drop),
        }
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

    /// What clients of `doc` are acknowledged for: standalone, what is durable here; in
    /// a cluster, what W replicas hold.
    fn acked_vv(&self, co: Option<&Coordinator>, doc: &str, e: &DocEntry) -> VersionVector {
        match co {
            Some(co) => co.acked(doc, &e.durable.vv),
            None => e.durable.vv.clone(),
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
                if let Err(e) = check_doc_id(doc, self.inner.options.limits.max_doc_id_bytes) {
                    self.error(&conn.out, ErrorCode::INVALID, None, format!("{e}; frame ignored"));
                    return Ok(());
                }
                if let Err(e) = self.ensure_loaded(doc).await {
                    let message = match e {
                        StorageError::Corrupt { .. } => {
                            format!("{e}; this relay does not serve the document until it is repaired")
                        }
                        _ => format!("storage failed: {e}; retry later"),
                    };
                    self.error(&conn.out, ErrorCode::INTERNAL, Some(doc), message);
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
            self.submit(slot, Commit { conn: Some(conn.id), pending, _permit: Some(permit) });
        }
        r?;
        for doc in follow {
            crate::cluster::follow(self, &mut st, &doc);
        }
        Self::evict(&mut st, self.inner.options.doc_cache_capacity);
        Ok(())
    }

    /// Queues the writes of `commit` in `slot`, as one atomic request reported to
    /// [`Node::on_durable`].
    fn submit(&self, slot: WriteSlot, mut commit: Commit) {
        let mut ops = Vec::new();
        for p in &mut commit.pending {
            ops.append(&mut p.ops);
        }
        let report = self.inner.durable.clone();
        slot.submit(ops, move |ops, result| {
            report.lock().unwrap_or_else(|p| p.into_inner()).push(Durable::Commit(commit, ops, result));
        });
    }

    /// A write of all of `doc`, superseding its delta log, and the version it makes
    /// durable: everything in memory (deltas whose write failed included).
    fn snapshot_write(doc: &str, e: &mut DocEntry) -> (WriteOp, VersionVector) {
        e.since_snapshot = 0;
        e.snapshot_entries = entries(&e.doc);
        e.unsaved = false;
        let op = WriteOp::PutSnapshot {
            doc: doc.to_owned(),
            bytes: e.doc.encode(),
            truncate_through: Some(e.next_seq - 1),
        };
        (op, e.doc.version().clone())
    }

    /// Writes again, as snapshots, the documents whose writes failed and that nothing
    /// else is writing, so that once the disk takes writes again they are durable and
    /// acknowledged to the documents' subscribers without waiting for a resend (a
    /// browser does not resend what the relay already has in memory).
    async fn persist_unsaved(&self) {
        let ids: Vec<String> = {
            let st = self.lock();
            st.docs.iter().filter(|(_, e)| e.unsaved && e.inflight == 0).map(|(k, _)| k.clone()).collect()
        };
        for id in ids {
            let Ok(slot) = self.inner.storage.reserve().await else { return };
            let mut st = self.lock();
            let Some(e) = st.docs.get_mut(&id).filter(|e| e.unsaved && e.inflight == 0) else { continue };
            e.inflight += 1;
            let (op, vv) = Self::snapshot_write(&id, e);
            // Standalone, the subscribers are acked; in a cluster, waiting writes count
            // this node's durability toward their quorum.
            let ack_local = self.inner.cluster.is_none();
            let pending =
                vec![Pending { doc: id, ops: vec![op], dots: Vec::new(), absorb: Some(vv), ack_local }];
            self.submit(slot, Commit { conn: None, pending, _permit: None });
        }
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
        let now = self.now_ms();
        let mut acts: Vec<Action> = Vec::new();
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
                let State { docs, conns, coordinator, .. } = &mut *st;
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
                        if let (false, Some(co)) = (p.ack_local, coordinator.as_mut()) {
                            acts.extend(co.durable(&p.doc, &e.durable, now));
                        }
                        if p.ack_local {
                            match commit.conn {
                                Some(conn) => acks.push((conn, p.doc.clone())),
                                // The node's own retry: its writers may be any subscriber.
                                None => acks.extend(
                                    e.members
                                        .iter()
                                        .filter(|m| conns.get(m).is_some_and(|c| c.peer.is_none()))
                                        .map(|m| (*m, p.doc.clone())),
                                ),
                            }
                        }
                        let vv = self.inner.cluster.is_some().then(|| e.doc.version().clone());
                        self.record_stored(st, &p.doc, vv.as_ref());
                    }
                    Err(err) => {
                        // Memory has these dots, the disk may not: they are not marked
                        // durable, and the document's next write (or the node's retry)
                        // is a snapshot, which makes them so.
                        e.unsaved = true;
                        if e.inflight == 0 {
                            // Nothing else will make them durable: tell them what is.
                            for (w, _) in std::mem::take(&mut e.ack_waiters) {
                                acks.push((w, p.doc.clone()));
                            }
                        }
                        match commit.conn {
                            Some(conn) => {
                                tracing::error!(doc = %p.doc, error = %err, "persisting failed");
                                if let Some(c) = conns.get(&conn) {
                                    self.error(
                                        &c.out,
                                        ErrorCode::INTERNAL,
                                        Some(&p.doc),
                                        format!(
                                            "storage failed: {err}; the write was not acknowledged, retry"
                                        ),
                                    );
                                }
                            }
                            // The node's own retry fails each second while the disk is
                            // full; the storage logged the failure once.
                            None => tracing::debug!(doc = %p.doc, error = %err, "persisting failed again"),
                        }
                    }
                }
            }
        }
        let State { docs, conns, links, .. } = &mut *st;
        self.execute(acts, docs, conns, links, None);
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
            // A settle() whose caller went away needs no answer.
            if tx.send(()).is_err() {
                tracing::debug!("a settle() caller left before its barrier");
            }
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
        st.conns.insert(
            id,
            ConnEntry {
                session,
                out: out.clone(),
                claims: None,
                docs: BTreeSet::new(),
                vouched: BTreeSet::new(),
                peer,
            },
        );
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
        if let Some(co) = &mut st.coordinator {
            co.closed(conn.id);
        }
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
                .filter(|(_, e)| e.since_snapshot > 0 || e.unsaved)
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

/// The record of `doc`'s version that start-up reads instead of the document.
fn version_op(doc: &str, d: &Document) -> WriteOp {
    let mut bytes = Vec::new();
    d.version().put(&mut bytes);
    WriteOp::PutVersion { doc: doc.to_owned(), bytes }
}

/// Meta key set once every stored document has a version record.
const VERSIONS_COMPLETE: &str = "versions_complete";

/// Meta key of this node's replica id (8 bytes, little-endian).
const REPLICA_ID_KEY: &str = "replica_id";
/// Highest sequence number a stored delta may have: logs count up from 1, one per delta,
/// so anything near `u64::MAX` is damage (and would overflow the next write's number).
const MAX_STORED_SEQ: u64 = u64::MAX / 2;

/// The replica id stored under [`REPLICA_ID_KEY`].
pub(crate) fn decode_replica_id(bytes: &[u8]) -> Result<ReplicaId, StorageError> {
    let bytes: [u8; 8] = bytes.try_into().map_err(|_| StorageError::Corrupt {
        record: format!("meta {REPLICA_ID_KEY}"),
        reason: format!("{} bytes, not 8", bytes.len()),
    })?;
    Ok(ReplicaId(u64::from_le_bytes(bytes)))
}

/// Rebuilds document `doc_id` from what storage holds for it: the document, the sequence
/// number of its next delta, and the deltas stored since its snapshot.
///
/// An unreadable record is an error, not skipped: serving the rest would present a state
/// without writes that were acknowledged, and the next snapshot would overwrite the
/// damaged record for good (as it would a snapshot written by a newer version).
pub(crate) fn decode_stored(
    doc_id: &str,
    stored: &StoredDoc,
    replica: ReplicaId,
    cfg: DocConfig,
) -> Result<(Document, u64, u64), StorageError> {
    let corrupt = |record: String, reason: String| StorageError::Corrupt { record, reason };
    let mut doc = match &stored.snapshot {
        Some(b) => {
            Document::decode(b, cfg).map_err(|e| corrupt(format!("snapshot of {doc_id:?}"), e.to_string()))?
        }
        None => Document::with_config(replica, cfg),
    };
    let mut next_seq = 1;
    for (seq, bytes) in &stored.deltas {
        let record = || format!("delta {seq} of {doc_id:?}");
        if *seq > MAX_STORED_SEQ {
            return Err(corrupt(record(), "sequence number out of range".into()));
        }
        let delta = Delta::decode(bytes).map_err(|e| corrupt(record(), e.to_string()))?;
        // A delta the snapshot already holds (runs are kept whole across a snapshot) is a
        // duplicate, one ahead of its causal past is buffered: both `Ok`. It applied when
        // it arrived, so a refusal now means damage.
        doc.apply(delta).map_err(|e| corrupt(record(), e.to_string()))?;
        next_seq = seq + 1;
    }
    Ok((doc, next_seq, stored.deltas.len() as u64))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{config, disk_config, mutate, mutation, Mutation, TempDir};
    use concord_core::Value;
    use proptest::collection::vec;
    use proptest::prelude::*;

    const RELAY: ReplicaId = ReplicaId(0x5E1A);
    const CFG: DocConfig = DocConfig { log_capacity: 8, pending_capacity: 8 };

    /// Deltas of a small random history of two writers.
    fn history(ops: &[(bool, u8, u8)]) -> Vec<Delta> {
        let mut a = Document::new(ReplicaId(0xA));
        let mut b = Document::new(ReplicaId(0xB));
        let mut out = Vec::new();
        for &(at_a, op, v) in ops {
            let doc = if at_a { &mut a } else { &mut b };
            let value =
                if v % 3 == 0 { Value::Array(vec![Value::Int(v.into())]) } else { Value::Int(v.into()) };
            let d = match op % 5 {
                0 => doc.increment("likes", v.into()).ok(),
                1 => doc.pn_add("votes", i64::from(v) - 128).ok(),
                2 => doc.set_register("title", value, u64::from(v) * 7).ok(),
                3 => doc.set_add("tags", value).ok(),
                _ => doc.set_remove("tags", &value).ok().flatten(),
            };
            out.extend(d);
        }
        out
    }

    /// Applies `mutations` to one record of `stored` (its snapshot or a delta).
    fn damage(stored: &mut StoredDoc, which: prop::sample::Index, mutations: &[Mutation]) {
        let mut records: Vec<&mut Vec<u8>> = stored.snapshot.iter_mut().collect();
        records.extend(stored.deltas.iter_mut().map(|(_, b)| b));
        if !records.is_empty() {
            let i = which.index(records.len());
            for m in mutations {
                mutate(records[i], m);
            }
        }
    }

    /// What a relay stores after `deltas`: a snapshot of the first `cut` (if any), and
    /// the rest as its log from `first_seq` on; and the document it must load back.
    fn stored(deltas: &[Delta], cut: Option<usize>, first_seq: u64) -> (StoredDoc, Document) {
        let mut doc = Document::with_config(RELAY, CFG);
        let mut snapshot = None;
        let from = cut.map_or(0, |c| c.min(deltas.len()));
        for (i, d) in deltas.iter().enumerate() {
            if cut.is_some() && i == from {
                snapshot = Some(doc.encode());
            }
            let _ = doc.apply(d.clone());
        }
        if cut.is_some() && from == deltas.len() {
            snapshot = Some(doc.encode());
        }
        let log = deltas[from..].iter().zip(first_seq..).map(|(d, q)| (q, d.encode())).collect();
        (StoredDoc { snapshot, deltas: log }, doc)
    }

    /// A loaded document must be usable the way the relay uses one.
    fn use_loaded(mut doc: Document) -> Result<(), TestCaseError> {
        let _ = doc.to_value();
        let _ = doc.merkle().root();
        let _ = doc.deltas_since(&VersionVector::new());
        let again = Document::decode(&doc.encode(), CFG);
        prop_assert!(again.is_ok(), "a loaded document re-encodes to valid bytes");
        Ok(())
    }

    /// `decode_stored` of `stored` is a usable document or `Corrupt` naming a record of
    /// `doc` — never a panic.
    fn check_decode(doc: &str, stored: &StoredDoc) -> Result<(), TestCaseError> {
        match decode_stored(doc, stored, RELAY, CFG) {
            Ok((loaded, next_seq, since)) => {
                prop_assert_eq!(since, stored.deltas.len() as u64);
                prop_assert_eq!(next_seq, stored.deltas.last().map_or(1, |(q, _)| q + 1));
                use_loaded(loaded)?;
            }
            Err(StorageError::Corrupt { record, .. }) => {
                let of = format!(" of {doc:?}");
                prop_assert!(
                    record == format!("snapshot{of}")
                        || stored.deltas.iter().any(|(q, _)| record == format!("delta {q}{of}")),
                    "{}",
                    record
                );
            }
            Err(e) => prop_assert!(false, "not a typed rejection: {}", e),
        }
        Ok(())
    }

    fn ops() -> impl Strategy<Value = Vec<(bool, u8, u8)>> {
        vec((any::<bool>(), any::<u8>(), any::<u8>()), 0..10)
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn stored_records_load_back_into_the_document_they_were_written_from(
            ops in ops(),
            cut in prop::option::of(0usize..12),
            first_seq in prop_oneof![Just(1u64), 1u64..1000],
        ) {
            let deltas = history(&ops);
            let (stored, want) = stored(&deltas, cut, first_seq);
            let (doc, next_seq, _) = decode_stored("d", &stored, RELAY, CFG).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(doc.to_value(), want.to_value());
            prop_assert_eq!(doc.version(), want.version());
            prop_assert_eq!(next_seq, stored.deltas.last().map_or(1, |(q, _)| q + 1));
        }

        #[test]
        fn damaged_stored_records_load_or_are_refused_as_corrupt(
            ops in ops(),
            cut in prop::option::of(0usize..12),
            which in any::<prop::sample::Index>(),
            mutations in vec(mutation(), 1..4),
            seq in prop::option::of(prop_oneof![Just(u64::MAX), Just(MAX_STORED_SEQ), Just(MAX_STORED_SEQ + 1), any::<u64>()]),
        ) {
            let deltas = history(&ops);
            let (mut stored, _) = stored(&deltas, cut, 1);
            // Damage the snapshot or one delta, and perhaps a sequence number.
            damage(&mut stored, which, &mutations);
            if let (Some(q), Some(last)) = (seq, stored.deltas.last_mut()) {
                last.0 = q.max(last.0);
            }
            check_decode("d", &stored)?;
        }

        #[test]
        fn random_stored_bytes_load_or_are_refused_as_corrupt(
            snapshot in prop::option::of(vec(any::<u8>(), 0..128)),
            deltas in vec((1u64..100, vec(any::<u8>(), 0..64)), 0..4),
        ) {
            let mut deltas = deltas;
            deltas.sort_by_key(|(q, _)| *q);
            deltas.dedup_by_key(|(q, _)| *q);
            check_decode("d", &StoredDoc { snapshot, deltas })?;
        }

        #[test]
        fn a_replica_id_record_is_eight_bytes_or_refused(bytes in vec(any::<u8>(), 0..16)) {
            match decode_replica_id(&bytes) {
                Ok(id) => prop_assert_eq!(Ok(id.0.to_le_bytes().to_vec()), Ok::<_, ()>(bytes)),
                Err(StorageError::Corrupt { record, .. }) => {
                    prop_assert_eq!(record, "meta replica_id");
                    prop_assert_ne!(bytes.len(), 8);
                }
                Err(e) => prop_assert!(false, "{}", e),
            }
        }
    }

    async fn open_node(storage: Storage, cluster: Option<ClusterView>) -> Result<Node, StorageError> {
        let options = NodeOptions { doc_config: CFG, ..NodeOptions::default() };
        Node::open(storage, Arc::new(Metrics::new()), options, cluster).await
    }

    /// Damaged records written through the real storage: the node loads the document
    /// as it was, or refuses it as corrupt — and keeps loading the others.
    #[test]
    fn the_node_loads_damaged_stored_documents_or_refuses_them_and_serves_the_rest() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = TempDir::new("node-load");
        let storage = Storage::open(&dir.0).unwrap();
        let (good, good_doc) = stored(&history(&[(true, 0, 5), (false, 3, 1)]), Some(1), 1);
        let write = |doc: &str, stored: &StoredDoc| {
            let mut ops = Vec::new();
            if let Some(b) = &stored.snapshot {
                ops.push(WriteOp::PutSnapshot { doc: doc.into(), bytes: b.clone(), truncate_through: None });
            }
            for (seq, b) in &stored.deltas {
                ops.push(WriteOp::PutDelta { doc: doc.into(), seq: *seq, bytes: b.clone() });
            }
            ops
        };
        rt.block_on(storage.write(write("good", &good))).unwrap();
        let node = rt.block_on(open_node(storage.clone(), None)).unwrap();
        let n = AtomicU64::new(0);
        let strategy =
            (ops(), prop::option::of(0usize..12), vec(mutation(), 0..3), any::<prop::sample::Index>());
        let mut runner = proptest::test_runner::TestRunner::new(disk_config());
        runner
            .run(&strategy, |(ops, cut, mutations, which)| {
                let id = format!("doc-{}", n.fetch_add(1, Ordering::Relaxed));
                let (mut stored, want) = stored(&history(&ops), cut, 1);
                damage(&mut stored, which, &mutations);
                rt.block_on(storage.write(write(&id, &stored))).unwrap();
                match rt.block_on(node.ensure_loaded(&id)) {
                    Ok(()) => {
                        let mut st = node.lock();
                        let e = st.docs.get_mut(&id).expect("loaded");
                        if mutations.is_empty() {
                            prop_assert_eq!(e.doc.to_value(), want.to_value());
                        }
                        // Loaded from disk: durable as loaded, nothing more.
                        prop_assert_eq!(&e.durable.vv, e.doc.version());
                        let doc = e.doc.clone();
                        drop(st);
                        use_loaded(doc)?;
                    }
                    Err(StorageError::Corrupt { record, .. }) => {
                        prop_assert!(!mutations.is_empty(), "undamaged records refused: {}", record);
                        prop_assert!(record.contains(&format!("{id:?}")), "{}", record);
                        prop_assert!(!node.lock().docs.contains_key(&id), "a refused document is not served");
                    }
                    Err(e) => prop_assert!(false, "not a typed rejection: {}", e),
                }
                // The other documents are unaffected.
                node.lock().docs.remove("good");
                prop_assert!(rt.block_on(node.ensure_loaded("good")).is_ok());
                prop_assert_eq!(node.lock().docs["good"].doc.to_value(), good_doc.to_value());
                Ok(())
            })
            .unwrap();
        rt.block_on(storage.close());
    }

    /// A node in a cluster loads every stored document when it opens: a damaged one is
    /// logged and skipped, the node opens and serves the rest.
    #[test]
    fn a_cluster_node_opens_with_a_damaged_document_and_serves_the_others() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = TempDir::new("node-open");
        let storage = Storage::open(&dir.0).unwrap();
        let (good, good_doc) = stored(&history(&[(true, 0, 5), (false, 3, 1)]), Some(1), 1);
        let mut bad_snapshot = good.snapshot.clone().unwrap();
        bad_snapshot.truncate(bad_snapshot.len() / 2);
        rt.block_on(storage.write(vec![
            WriteOp::PutSnapshot {
                doc: "good".into(),
                bytes: good.snapshot.clone().unwrap(),
                truncate_through: None,
            },
            WriteOp::PutDelta { doc: "good".into(), seq: 1, bytes: good.deltas[0].1.clone() },
            WriteOp::PutSnapshot { doc: "bad-snapshot".into(), bytes: bad_snapshot, truncate_through: None },
            WriteOp::PutDelta { doc: "bad-delta".into(), seq: 1, bytes: vec![0xde, 0xad] },
            // An unreadable replica id: a new one is taken.
            WriteOp::PutMeta { key: REPLICA_ID_KEY.into(), bytes: vec![1, 2, 3] },
        ]))
        .unwrap();
        let nodes: Vec<(String, String, u32)> =
            ["a", "b"].iter().map(|n| (n.to_string(), "127.0.0.1:1".to_string(), 1)).collect();
        let cluster = ClusterView::new("a", &nodes, 2, 1, 1, 16);
        let node = rt.block_on(open_node(storage.clone(), Some(cluster))).unwrap();
        assert_eq!(node.lock().docs["good"].doc.to_value(), good_doc.to_value());
        for bad in ["bad-snapshot", "bad-delta"] {
            assert!(!node.lock().docs.contains_key(bad));
            let err = rt.block_on(node.ensure_loaded(bad)).unwrap_err();
            assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
        }
        let replica = rt.block_on(storage.get_meta(REPLICA_ID_KEY)).unwrap().unwrap();
        assert_eq!(decode_replica_id(&replica).unwrap(), node.replica(), "the new id is stored");
        rt.block_on(storage.close());
    }
}
