//! The relay cluster: peer links, sloppy-quorum replication, hinted handoff and
//! anti-entropy (Dynamo, DeCandia et al. 2007; Riak's node_confirms and AAE).
//!
//! Every decision that needs no I/O comes from concord-core ([`concord_core::ring`],
//! [`concord_core::cluster`]); this module owns the sockets and timers:
//!
//! - **Peer links**: one outgoing WebSocket per other node, speaking the ordinary sync
//!   protocol with a `peer:<id>` token. A link is a connection of the [`Node`] like any
//!   client's, so fan-out, persistence and acks work unchanged. Frames and pongs feed the
//!   failure detector.
//! - **Write path**: when a client subscribes to a document here, this node (the
//!   coordinator) subscribes the document on the links of its write targets — the first N
//!   healthy nodes clockwise (sloppy quorum). Client deltas then flow to those nodes live;
//!   each acks after its local commit, and the client is acked after W acks
//!   (see `Node::check_quorum`).
//! - **Hinted handoff**: a node that stores a document it does not own records durable
//!   hints for the owners (one per document, not per delta). When an owner is up again,
//!   the holder subscribes the document on that owner's link (the protocol sends what the
//!   owner lacks), probes for its durable version, and deletes the hint once the owner has
//!   acked everything.
//! - **Anti-entropy**: every few seconds (with jitter) each node compares, with each peer
//!   it shares ranges with, the document-set Merkle tree ([`concord_core::docset`]) of the
//!   documents both own — root first, descending only into differing children — and syncs
//!   only the documents that differ, a bounded number per round. The questions travel on
//!   the peer link as `DocSetQuery` messages of the sync protocol and come back as
//!   `DocSetAnswer` parts, each below the frame limit; a relay answers them only on a
//!   connection authenticated as a peer, from the set it shares with that peer. A round
//!   whose answers do not all arrive in time is dropped, and the next round starts over.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use concord_core::cluster::{write_targets, DetectorConfig, FailureDetector, Health};
use concord_core::docset::{DocSet, DocSetAnswer, DocSetDiff, DocSetQuery};
use concord_core::hash::stable_hash;
use concord_core::ring::{Ring, RingNode};
use concord_core::sync::msg::{Deltas, DocSetAnswerMsg, DocSetQueryMsg, ErrorMsg};
use concord_core::sync::{ErrorCode, Msg};
use concord_core::VersionVector;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;

use crate::handler::{Outbox, Overflow};
use crate::http::query_value;
use crate::node::{Docs, Node, State};

/// Documents handed off per tick.
const HANDOFF_BATCH: usize = 32;
/// Differing documents synced per anti-entropy round and peer.
const AE_CAP: usize = 256;
/// Things asked per document-set query (answers stay small; see `MAX_DOCSET_QUERY`).
const AE_QUERY: usize = 128;
/// How long one step of a comparison waits for all its answers before giving up the
/// round (the next round, a few seconds later, starts over).
const AE_TIMEOUT: Duration = Duration::from_secs(3);
/// The first protocol version with document-set messages; older peers are not asked.
const AE_PROTOCOL: u16 = 6;

/// A document-set query sent to a peer, waiting for every part of its answer.
struct Asked {
    peer: String,
    /// One slot per part, sized by the first part that arrives.
    parts: Vec<Option<DocSetAnswer>>,
    got: usize,
    done: oneshot::Sender<DocSetAnswer>,
}

/// What this node knows of the cluster's shape and health.
pub struct ClusterView {
    /// This node's id.
    pub me: String,
    /// Replicas per document (N).
    pub n: usize,
    /// Read quorum (R).
    pub r: usize,
    /// Write quorum (W).
    pub w: usize,
    ring: Ring,
    /// Other nodes: id -> address.
    pub peers: BTreeMap<String, String>,
    detector: Mutex<FailureDetector>,
    started: Instant,
    /// Anti-entropy queries in flight, by exchange id.
    asked: Mutex<HashMap<u64, Asked>>,
    next_exchange: AtomicU64,
}

impl ClusterView {
    /// The view of node `me` of a cluster of `nodes` (`(id, addr, weight)`).
    pub fn new(me: &str, nodes: &[(String, String, u32)], n: usize, r: usize, w: usize, vnodes: u32) -> Self {
        let ring = Ring::new(
            &nodes.iter().map(|(id, _, wt)| RingNode::new(id.clone(), *wt)).collect::<Vec<_>>(),
            vnodes,
        );
        let peers =
            nodes.iter().filter(|(id, _, _)| id != me).map(|(id, a, _)| (id.clone(), a.clone())).collect();
        ClusterView {
            me: me.to_owned(),
            n,
            r,
            w,
            ring,
            peers,
            detector: Mutex::new(FailureDetector::new(
                DetectorConfig { suspect_after_ms: 1_000, down_after_ms: 3_000 },
                0,
            )),
            started: Instant::now(),
            asked: Mutex::default(),
            next_exchange: AtomicU64::new(1),
        }
    }

    fn asked_map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Asked>> {
        self.asked.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// All nodes clockwise from the document's position.
    pub fn walk(&self, doc: &str) -> Vec<String> {
        self.ring.walk(doc).into_iter().map(str::to_owned).collect()
    }

    /// The document's preference list (its N owners).
    pub fn owners(&self, doc: &str) -> Vec<String> {
        self.ring.preference_list(doc, self.n).into_iter().map(str::to_owned).collect()
    }

    /// Whether this node owns the document.
    pub fn owns_self(&self, doc: &str) -> bool {
        self.ring.owns(&self.me, doc, self.n)
    }

    /// Records a sign of life from `node`.
    pub fn heartbeat(&self, node: &str) {
        let now = self.now_ms();
        if let Ok(mut d) = self.detector.lock() {
            d.heartbeat(node, now);
        }
    }

    /// Records that a connection to `node` failed: it is down until heard from again.
    pub fn mark_down(&self, node: &str) {
        let now = self.now_ms();
        if let Ok(mut d) = self.detector.lock() {
            d.mark_down(node, now);
        }
    }

    /// Health of `node` as this node sees it.
    pub fn health(&self, node: &str) -> Health {
        if node == self.me {
            return Health::Up;
        }
        let now = self.now_ms();
        self.detector.lock().map(|d| d.health(node, now)).unwrap_or(Health::Down)
    }

    /// Whether `node` can take writes now: its link is connected and it is not down.
    pub fn is_up(&self, node: &str, links: &HashMap<String, u64>) -> bool {
        node == self.me || (links.contains_key(node) && self.health(node) == Health::Up)
    }

    /// `(peer, state)` for every other node: 2 up, 1 suspect, 0 down.
    pub fn peer_states(&self, links: &HashMap<String, u64>) -> Vec<(String, i64)> {
        self.peers
            .keys()
            .map(|p| {
                let state = match self.health(p) {
                    Health::Up if links.contains_key(p) => 2,
                    Health::Up | Health::Suspect => 1,
                    Health::Down => 0,
                };
                (p.clone(), state)
            })
            .collect()
    }

    /// Peers sharing at least one document range with this node.
    pub(crate) fn shares(&self, peer: &str, doc: &str) -> bool {
        let owners = self.ring.preference_list(doc, self.n);
        owners.contains(&peer) && owners.contains(&self.me.as_str())
    }
}

/// A client subscribed to `doc` here: replicate it with its write targets.
pub(crate) fn follow(node: &Node, st: &mut State, doc: &str) {
    let Some(cluster) = &node.inner.cluster else { return };
    let walk = cluster.walk(doc);
    let refs: Vec<&str> = walk.iter().map(String::as_str).collect();
    let State { docs, conns, links, .. } = st;
    let targets = write_targets(&refs, cluster.n, |n| cluster.is_up(n, links));
    for t in targets {
        if t.node == cluster.me {
            continue;
        }
        subscribe_on_link(node, docs, conns, links, &t.node, doc);
    }
}

fn subscribe_on_link(
    node: &Node,
    docs: &mut HashMap<String, crate::node::DocEntry>,
    conns: &mut HashMap<u64, crate::node::ConnEntry>,
    links: &HashMap<String, u64>,
    peer: &str,
    doc: &str,
) -> bool {
    let Some(link) = links.get(peer) else { return false };
    let Some(c) = conns.get_mut(link) else { return false };
    if !c.session.we_subscribed(doc) {
        for m in c.session.subscribe(doc, &mut Docs { docs }) {
            node.send(&c.out, &m);
        }
    }
    true
}

/// An owner acked `vv` of `doc`: if that covers everything held here, the hint is done.
pub(crate) fn on_peer_ack(
    hints: &mut BTreeMap<String, BTreeMap<String, u64>>,
    deletes: &mut Vec<(String, String, u64)>,
    doc: &str,
    peer: &str,
    vv: &VersionVector,
    held: &VersionVector,
) {
    let Some(owners) = hints.get_mut(doc) else { return };
    if !held.le(vv) {
        return;
    }
    if let Some(id) = owners.remove(peer) {
        deletes.push((peer.to_owned(), doc.to_owned(), id));
    }
    if owners.is_empty() {
        hints.remove(doc);
    }
}

/// Periodic cluster work, called every 250 ms by the node's ticker.
pub(crate) async fn tick(node: &Node, n: u64) {
    let Some(cluster) = &node.inner.cluster else { return };
    // Persist delivered hints' deletion.
    let deletes = std::mem::take(&mut node.lock().hint_deletes);
    if !deletes.is_empty() {
        let ops = deletes
            .into_iter()
            .map(|(target, doc, id)| crate::storage::WriteOp::DeleteHint { target, doc, id })
            .collect();
        if let Err(e) = node.inner.storage.write(ops).await {
            tracing::warn!(error = %e, "could not delete delivered hints; they will be delivered again");
        }
    }
    // Hinted handoff, throttled: a batch of documents every second.
    if n.is_multiple_of(4) {
        let due: Vec<(String, String)> = {
            let st = node.lock();
            st.hints
                .iter()
                .flat_map(|(doc, owners)| owners.keys().map(move |o| (doc.clone(), o.clone())))
                .filter(|(_, o)| cluster.is_up(o, &st.links))
                .take(HANDOFF_BATCH)
                .collect()
        };
        for (doc, owner) in due {
            if node.ensure_loaded(&doc).await.is_err() {
                continue;
            }
            let mut st = node.lock();
            let State { docs, conns, links, .. } = &mut *st;
            if subscribe_on_link(node, docs, conns, links, &owner, &doc) {
                // An empty batch asks the owner for its durable version.
                if let Some(c) = links.get(&owner).and_then(|l| conns.get(l)) {
                    node.send(&c.out, &Msg::Deltas(Deltas { doc: doc.clone(), deltas: Vec::new() }));
                }
            }
        }
    }
    // Anti-entropy every ~3 s per node, jittered by node id.
    let phase = stable_hash(cluster.me.as_bytes()) % 12;
    if n % 12 == phase {
        for peer in cluster.peers.keys() {
            let up = cluster.is_up(peer, &node.lock().links);
            if up {
                anti_entropy(node, cluster, peer).await;
            }
        }
    }
}

/// Compares the document-set Merkle trees of the documents both nodes own (root first,
/// descending only into differing children) and syncs the documents that differ.
async fn anti_entropy(node: &Node, cluster: &ClusterView, peer: &str) {
    let (mut diff, first) = DocSetDiff::start();
    let mut queries = first.chunks(AE_QUERY);
    let mut rounds = 0;
    while !diff.is_done() && rounds < 12 {
        rounds += 1;
        let Some(answers) = ask(node, cluster, peer, std::mem::take(&mut queries)).await else { return };
        for answer in answers {
            let stepped = {
                let st = node.lock();
                let empty = DocSet::new();
                diff.step(st.shared.get(peer).unwrap_or(&empty), answer)
            };
            match stepped {
                Ok(more) => queries.extend(more.chunks(AE_QUERY)),
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "anti-entropy answer refused");
                    node.inner.metrics.error("anti_entropy");
                    return;
                }
            }
        }
        if queries.is_empty() {
            queries = diff.outstanding().chunks(AE_QUERY);
        }
    }
    let differing: Vec<String> = diff.into_differences().into_iter().map(|d| d.id).collect();
    if !differing.is_empty() {
        tracing::debug!(%peer, count = differing.len(), "anti-entropy found differing documents");
    }
    for doc in differing.into_iter().take(AE_CAP) {
        if node.ensure_loaded(&doc).await.is_err() {
            continue;
        }
        let mut st = node.lock();
        let State { docs, conns, links, .. } = &mut *st;
        // Subscribing syncs both ways: the peer answers what we lack and subscribes back.
        let Some(link) = links.get(peer) else { return };
        let Some(c) = conns.get_mut(link) else { return };
        for m in c.session.subscribe(&doc, &mut Docs { docs }) {
            node.send(&c.out, &m);
        }
    }
}

/// Sends `queries` on the link to `peer` and waits for all their answers, each joined
/// from its parts. `None` (logged and counted) when the link is down, the peer is too
/// old, a query could not be queued, or an answer did not arrive in time.
async fn ask(
    node: &Node,
    cluster: &ClusterView,
    peer: &str,
    queries: Vec<DocSetQuery>,
) -> Option<Vec<DocSetAnswer>> {
    let mut waiting = Vec::with_capacity(queries.len());
    {
        let st = node.lock();
        let c = st.links.get(peer).and_then(|l| st.conns.get(l))?;
        if c.session.peer().is_none_or(|h| h.protocol < AE_PROTOCOL) {
            return None;
        }
        for query in queries {
            let exchange = cluster.next_exchange.fetch_add(1, Ordering::Relaxed);
            let (done, rx) = oneshot::channel();
            let asked = Asked { peer: peer.to_owned(), parts: Vec::new(), got: 0, done };
            cluster.asked_map().insert(exchange, asked);
            waiting.push((exchange, rx));
            if let Err(e) = c.out.send(Msg::DocSetQuery(DocSetQueryMsg { exchange, query }).encode()) {
                tracing::warn!(%peer, error = %e, "could not send an anti-entropy query; retrying next round");
                node.inner.metrics.error("anti_entropy");
                forget(cluster, &waiting);
                return None;
            }
        }
    }
    let deadline = tokio::time::Instant::now() + AE_TIMEOUT;
    let mut answers = Vec::with_capacity(waiting.len());
    for (_, rx) in &mut waiting {
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(answer)) => answers.push(answer),
            _ => {
                tracing::warn!(%peer, "anti-entropy answers did not arrive in time; retrying next round");
                node.inner.metrics.error("anti_entropy");
                forget(cluster, &waiting);
                return None;
            }
        }
    }
    Some(answers)
}

/// Drops the queries of a failed round: late answers to them are ignored.
fn forget<T>(cluster: &ClusterView, waiting: &[(u64, T)]) {
    let mut asked = cluster.asked_map();
    for (exchange, _) in waiting {
        asked.remove(exchange);
    }
}

/// Answers a document-set query from `peer` with the set this node shares with it, in
/// parts below the connection's frame limit. A part that cannot be queued is logged and
/// counted: the asker's round times out and its next round asks again.
pub(crate) fn answer_docset(
    node: &Node,
    out: &Outbox,
    shared: Option<&DocSet>,
    peer: &str,
    m: DocSetQueryMsg,
) {
    let answer = shared.map(|s| s.answer(&m.query)).unwrap_or_default();
    let Some(frames) = DocSetAnswerMsg::frames(m.exchange, answer, out.max_frame()) else {
        node.send(
            out,
            &Msg::Error(ErrorMsg {
                code: ErrorCode::TOO_LARGE,
                doc: None,
                message: "the document-set answer does not fit the frame limit; ask about fewer nodes".into(),
            }),
        );
        return;
    };
    for f in frames {
        if let Err(e) = out.send(f.encode()) {
            tracing::warn!(%peer, error = %e, "could not send an anti-entropy answer; the peer will ask again");
            node.inner.metrics.error("anti_entropy");
            return;
        }
    }
}

/// Takes a part of the answer to a query this node sent `peer`; once every part is in,
/// hands the joined answer to the waiting round. Parts of unknown or forgotten
/// exchanges, from another peer, or duplicated, are ignored.
pub(crate) fn on_docset_answer(node: &Node, peer: &str, m: DocSetAnswerMsg) {
    let Some(cluster) = &node.inner.cluster else { return };
    let mut asked = cluster.asked_map();
    let Some(a) = asked.get_mut(&m.exchange).filter(|a| a.peer == peer) else {
        tracing::debug!(%peer, exchange = m.exchange, "ignoring a late or unexpected anti-entropy answer");
        return;
    };
    // The decoder bounds `parts`.
    if a.parts.is_empty() {
        a.parts.resize_with(m.parts as usize, || None);
    }
    if a.parts.len() != m.parts as usize {
        return;
    }
    let Some(slot) = a.parts.get_mut(m.part as usize).filter(|s| s.is_none()) else { return };
    *slot = Some(m.answer);
    a.got += 1;
    if a.got < a.parts.len() {
        return;
    }
    let Some(a) = asked.remove(&m.exchange) else { return };
    let mut whole = DocSetAnswer::default();
    for part in a.parts.into_iter().flatten() {
        whole.absorb(part);
    }
    // The round may have given up meanwhile; then nobody needs the answer.
    if a.done.send(whole).is_err() {
        tracing::debug!(peer, "an anti-entropy answer arrived after its round gave up");
    }
}

/// Keeps one outgoing link per peer until `shutdown` flips to true.
pub fn spawn_links(node: Node, shutdown: tokio::sync::watch::Receiver<bool>) {
    let Some(cluster) = node.inner.cluster.as_ref() else { return };
    for (peer, addr) in cluster.peers.clone() {
        let node = node.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { run_link(node, peer, addr, shutdown).await });
    }
}

async fn run_link(node: Node, peer: String, addr: String, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let Some(cluster) = node.inner.cluster.as_ref() else { return };
    let me = cluster.me.clone();
    let mut backoff = Duration::from_millis(100);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let url = format!("ws://{addr}/sync");
        let connected =
            tokio::time::timeout(Duration::from_secs(2), tokio_tungstenite::connect_async(url.as_str()))
                .await;
        let ws = match connected {
            Ok(Ok((ws, _))) => ws,
            _ => {
                cluster.mark_down(&peer);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        cluster.heartbeat(&peer);
        let (mut sink, mut stream) = ws.split();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8192);
        let overflow = Arc::new(Overflow::default());
        let out = Outbox::new(tx, overflow.clone(), node.inner.options.max_frame);
        let conn = node.attach_link(&peer, &me, out);
        tracing::info!(%peer, %addr, "peer link up");
        // Re-follow every loaded document this peer should replicate.
        let loaded: Vec<String> = node.loaded_docs().into_iter().collect();
        {
            let mut st = node.lock();
            for doc in loaded {
                let walk = cluster.walk(&doc);
                let refs: Vec<&str> = walk.iter().map(String::as_str).collect();
                let wanted = write_targets(&refs, cluster.n, |n| cluster.is_up(n, &st.links))
                    .iter()
                    .any(|t| t.node == peer)
                    || st.hints.get(&doc).is_some_and(|o| o.contains_key(&peer));
                let has_clients = st.docs.get(&doc).is_some_and(|e| {
                    e.members.iter().any(|m| st.conns.get(m).is_some_and(|c| c.peer.is_none()))
                });
                if wanted && has_clients {
                    let State { docs, conns, links, .. } = &mut *st;
                    subscribe_on_link(&node, docs, conns, links, &peer, &doc);
                }
            }
        }
        let mut ping = tokio::time::interval(Duration::from_millis(300));
        let mut last_heard = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                // A frame the link could not carry: reconnect, which subscribes again and
                // catches up on what was missed.
                _ = overflow.notify.notified() => {
                    tracing::warn!(%peer, "peer link could not queue a frame; reconnecting");
                    break;
                }
                frame = rx.recv() => match frame {
                    Some(bytes) => {
                        if sink.send(Message::Binary(bytes.into())).await.is_err() {
                            break;
                        }
                    }
                    None => break,
                },
                msg = stream.next() => match msg {
                    Some(Ok(Message::Binary(b))) => {
                        last_heard = Instant::now();
                        cluster.heartbeat(&peer);
                        if node.handle_frame(&conn, b.to_vec()).await.is_err() {
                            break;
                        }
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {
                        last_heard = Instant::now();
                        cluster.heartbeat(&peer);
                    }
                },
                _ = ping.tick() => {
                    if last_heard.elapsed() > Duration::from_millis(1_500) {
                        tracing::warn!(%peer, "peer link silent; reconnecting");
                        break;
                    }
                    if sink.send(Message::Ping(Vec::new().into())).await.is_err() {
                        break;
                    }
                }
            }
        }
        tracing::info!(%peer, "peer link down");
        node.detach_link(&peer, conn);
    }
}

/// Cluster introspection routes: `/cluster` (this node's view: peers, health, hints),
/// `/cluster/owners?doc=ID` (preference list and position) and `/cluster/ring` (tokens).
pub(crate) fn http_get_route(
    node: &Node,
    path: &str,
    query: Option<&str>,
) -> Option<(u16, &'static str, Vec<u8>)> {
    const JSON: &str = "application/json";
    const TEXT: &str = "text/plain; charset=utf-8";
    if !path.starts_with("/cluster") {
        return None;
    }
    let id = node.inner.options.node_id.clone();
    let standalone = ClusterView::new(&id, &[(id.clone(), String::new(), 1)], 1, 1, 1, 1);
    let cluster = node.inner.cluster.as_ref().unwrap_or(&standalone);
    match path {
        "/cluster" => {
            let (links, hints, stored) = {
                let st = node.lock();
                (st.links.clone(), st.hints.values().map(BTreeMap::len).sum::<usize>(), st.stored.len())
            };
            let peers: Vec<serde_json::Value> = cluster
                .peers
                .iter()
                .map(|(id, addr)| {
                    let health = match cluster.health(id) {
                        Health::Up if links.contains_key(id) => "up",
                        Health::Up | Health::Suspect => "suspect",
                        Health::Down => "down",
                    };
                    serde_json::json!({ "id": id, "addr": addr, "state": health })
                })
                .collect();
            let nodes: Vec<&str> = cluster.ring.nodes().collect();
            let body = serde_json::json!({
                "node": cluster.me,
                "replicas": cluster.n,
                "write_quorum": cluster.w,
                "read_quorum": cluster.r,
                "nodes": nodes,
                "peers": peers,
                "pending_hints": hints,
                "documents_stored": stored,
            });
            Some((200, JSON, body.to_string().into_bytes()))
        }
        "/cluster/owners" => {
            let doc = match query_value(query, "doc") {
                Ok(Some(doc)) => doc,
                Ok(None) => return Some((400, TEXT, b"missing doc parameter\n".to_vec())),
                Err(e) => return Some((400, TEXT, format!("doc: {e}\n").into_bytes())),
            };
            let body = serde_json::json!({
                "doc": doc,
                "position": Ring::position(&doc) as f64 / u64::MAX as f64,
                "owners": cluster.owners(&doc),
            });
            Some((200, JSON, body.to_string().into_bytes()))
        }
        "/cluster/ring" => {
            let tokens: Vec<(f64, &str)> =
                cluster.ring.tokens().map(|(t, id)| (t as f64 / u64::MAX as f64, id)).collect();
            Some((200, JSON, serde_json::json!({ "tokens": tokens }).to_string().into_bytes()))
        }
        _ => Some((
            404,
            TEXT,
            b"unknown cluster route
"
            .to_vec(),
        )),
    }
}
