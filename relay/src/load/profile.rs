//! Where the relay's time goes, without perf: the sync handler ([`Node`]) driven
//! in-process through the [`Handler`] trait with detached outboxes (no sockets), timed
//! with the thread's CPU clock (`/proc/thread-self/schedstat`), plus micro-timings of
//! the core calls it makes per subscriber.
//!
//! Comparing the handler's CPU per delivered message with the live relay's (from the
//! fanout scenario) splits the relay's cost into "handler under the global lock" and
//! "sockets and writer tasks".

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use concord_core::sync::msg::{Deltas, Subscribe};
use concord_core::sync::{Msg, Session, SessionConfig};
use concord_core::{Delta, Document, ReplicaId, Value, VersionVector};

use super::procfs;
use crate::handler::{ConnInfo, Handler, Outbox};
use crate::metrics::Metrics;
use crate::node::{Node, NodeOptions};
use crate::storage::Storage;

/// What [`profile`] measured.
#[derive(Clone, Debug, Default)]
pub struct NodeProfile {
    /// Subscribers of the one document.
    pub members: usize,
    /// Writes timed per configuration.
    pub writes: u64,
    /// Handler CPU per write, every connection subscribed to one document (µs).
    pub write_fanout_us: f64,
    /// Handler CPU per write with no other subscriber (µs).
    pub write_alone_us: f64,
    /// Frames the subscribers' outboxes received per write (should be `members - 1`
    /// deltas plus one ack).
    pub frames_per_write: f64,
    /// Storage writer thread CPU per write in the fanout run (µs).
    pub storage_us: f64,
    /// Storage writer thread CPU per write when each connection writes its own
    /// document (µs).
    pub storage_alone_us: f64,
    /// Writes per storage commit (group commit) in the fanout and the alone run.
    pub writes_per_commit: (f64, f64),
    /// Wall time of the fanout run (s): storage commits dominate it.
    pub wall_secs: f64,
    /// `Session::on_local_deltas` + `Msg::encode` for one subscriber and one delta (ns):
    /// what the handler does per subscriber under the lock.
    pub per_member_ns: f64,
    /// `Msg::encode` of the frame alone (ns): what "encode once, share the bytes" costs
    /// per write instead.
    pub encode_once_ns: f64,
    /// `Msg::decode` of an incoming one-delta frame (ns).
    pub decode_ns: f64,
}

impl NodeProfile {
    /// Handler CPU per delivered message (µs): the fanout run's extra cost over the
    /// lone write, spread over the `members - 1` deliveries.
    pub fn per_delivery_us(&self) -> f64 {
        (self.write_fanout_us - self.write_alone_us) / (self.members.max(2) - 1) as f64
    }
}

fn peer() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9))
}

fn register_deltas(replica: ReplicaId, doc: &str, n: usize) -> Vec<Vec<u8>> {
    let mut d = Document::new(replica);
    (0..n)
        .map(|i| {
            let delta = d.set_register("k", Value::Int(i as i64), 1_700_000_000_000 + i as u64);
            let delta = delta.unwrap_or_else(|_| unreachable!("a fresh register key takes writes"));
            Msg::Deltas(Deltas { doc: doc.into(), deltas: vec![delta] }).encode()
        })
        .collect()
}

struct Run {
    cpu_ns: u64,
    storage_ns: u64,
    commits: u64,
    wall_secs: f64,
    frames: u64,
}

/// `members` connections subscribe to `docs` documents (connection `i` to document
/// `i % docs`) and all write `each` register deltas, concurrently.
async fn run_node(members: usize, docs: usize, each: usize) -> Result<Run, String> {
    let dir = std::env::temp_dir().join(format!("concord-load-profile-{:x}", crate::node::random_u64()));
    let storage = Storage::open(&dir).map_err(|e| e.to_string())?;
    let store = storage.clone();
    let node = Node::open(storage, Arc::new(Metrics::new()), NodeOptions::default(), None)
        .await
        .map_err(|e| e.to_string())?;
    let node = Arc::new(node);
    let doc_of = |i: usize| format!("profile-{}", i % docs.max(1));
    let mut conns = Vec::new();
    let mut inboxes = Vec::new();
    for i in 0..members {
        let (out, rx) = Outbox::for_test(members * each + 64, 256 * 1024);
        let mut conn = node.open(ConnInfo { peer: peer(), query: None }, out);
        let replica = ReplicaId(1_000 + i as u64);
        let session = Session::new(replica, SessionConfig::default());
        let hello = session.hello(None).encode();
        let sub = Msg::Subscribe(Subscribe { doc: doc_of(i), vv: VersionVector::new() }).encode();
        for f in [hello, sub] {
            node.on_binary(&mut conn, f).await.map_err(|e| format!("{e:?}"))?;
        }
        conns.push((replica, doc_of(i), conn));
        inboxes.push(rx);
    }
    for rx in &mut inboxes {
        while rx.try_recv().is_ok() {}
    }
    let storage_threads = |m: std::collections::BTreeMap<String, u64>| {
        m.iter().filter(|(k, _)| k.starts_with("concord-stor")).map(|(_, v)| *v).sum::<u64>()
    };
    let me = std::process::id();
    let s0 = storage_threads(procfs::thread_cpu_ns(me));
    let k0 = store.commits();
    let c0 = procfs::this_thread_cpu_ns().unwrap_or(0);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (replica, doc, mut conn) in conns.drain(..) {
        let frames = register_deltas(replica, &doc, each);
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            for f in frames {
                if node.on_binary(&mut conn, f).await.is_err() {
                    break;
                }
            }
            conn
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    // Frames return before their commit: wait for every write and ack.
    node.settle().await;
    let wall_secs = t0.elapsed().as_secs_f64();
    let cpu_ns = procfs::this_thread_cpu_ns().unwrap_or(0).saturating_sub(c0);
    let storage_ns = storage_threads(procfs::thread_cpu_ns(me)).saturating_sub(s0);
    let commits = store.commits().saturating_sub(k0);
    let mut frames = 0;
    for rx in &mut inboxes {
        while rx.try_recv().is_ok() {
            frames += 1;
        }
    }
    node.flush().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Run { cpu_ns, storage_ns, commits, wall_secs, frames })
}

fn time_ns(n: usize, mut f: impl FnMut(usize)) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        f(i);
    }
    t.elapsed().as_nanos() as f64 / n.max(1) as f64
}

/// The per-subscriber core calls, timed in a loop.
fn micro(n: usize) -> (f64, f64, f64) {
    let relay = ReplicaId(1);
    let writer = ReplicaId(2);
    let mut docs: HashMap<String, Document> = HashMap::from([("d".to_string(), Document::new(relay))]);
    let mut s = Session::new(relay, SessionConfig::default());
    let peer = Session::new(ReplicaId(3), SessionConfig::default());
    let _ = s.handle_msg(peer.hello(None), &mut docs);
    let _ = s.handle_msg(Msg::Subscribe(Subscribe { doc: "d".into(), vv: VersionVector::new() }), &mut docs);
    let mut w = Document::new(writer);
    let deltas: Vec<Delta> = (0..n)
        .filter_map(|i| w.set_register("k", Value::Int(i as i64), 1_700_000_000_000 + i as u64).ok())
        .collect();
    let mut sink = 0usize;
    let per_member = time_ns(deltas.len(), |i| {
        for m in s.on_local_deltas("d", std::slice::from_ref(&deltas[i])) {
            sink += m.encode().len();
        }
    });
    let frames: Vec<Msg> = deltas
        .iter()
        .take(n)
        .map(|d| Msg::Deltas(Deltas { doc: "d".into(), deltas: vec![d.clone()] }))
        .collect();
    let encode_once = time_ns(frames.len(), |i| sink += frames[i].encode().len());
    let bytes: Vec<Vec<u8>> = frames.iter().map(Msg::encode).collect();
    let decode = time_ns(bytes.len(), |i| sink += Msg::decode(&bytes[i]).map(|_| 1).unwrap_or(0));
    std::hint::black_box(sink);
    (per_member, encode_once, decode)
}

/// Profiles the handler with `members` subscribers of one document, each writing
/// `each` deltas, against the same writers each alone in a document. Runs on its own thread (a current-thread runtime, so the thread CPU
/// clock sees the whole handler).
pub fn profile(members: usize, each: usize) -> Result<NodeProfile, String> {
    std::thread::spawn(move || {
        let rt =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        let members = members.max(2);
        let fan = rt.block_on(run_node(members, 1, each))?;
        let alone = rt.block_on(run_node(members, members, each))?;
        let writes = (members * each) as f64;
        let (per_member_ns, encode_once_ns, decode_ns) = micro(20_000);
        Ok(NodeProfile {
            members,
            writes: writes as u64,
            write_fanout_us: fan.cpu_ns as f64 / 1e3 / writes,
            write_alone_us: alone.cpu_ns as f64 / 1e3 / writes,
            frames_per_write: fan.frames as f64 / writes,
            storage_us: fan.storage_ns as f64 / 1e3 / writes,
            storage_alone_us: alone.storage_ns as f64 / 1e3 / writes,
            writes_per_commit: (writes / fan.commits.max(1) as f64, writes / alone.commits.max(1) as f64),
            wall_secs: fan.wall_secs,
            per_member_ns,
            encode_once_ns,
            decode_ns,
        })
    })
    .join()
    .map_err(|_| "the profile thread panicked".to_string())?
}

/// Memory the relay holds per idle connection, split by owner.
#[derive(Clone, Debug, Default)]
pub struct ConnMemory {
    /// Connections opened in-process.
    pub conns: usize,
    /// RSS growth per connection of this process after `Node::open` + `Hello` +
    /// `Subscribe` through the handler, send queues created beforehand (bytes): the
    /// handler's per-connection state (session, subscription, room membership).
    pub handler_bytes: f64,
    /// Same, for the send queues themselves (one bounded channel each, after the
    /// relay's `Hello` was queued and read).
    pub queue_bytes: f64,
    /// `size_of` the future of `connection::serve` (the per-connection reader task,
    /// allocated whole when the task is spawned).
    pub serve_future_bytes: usize,
    /// `size_of` the future of `Node::on_binary` (nested inside the one above).
    pub on_binary_future_bytes: usize,
}

fn rss_bytes() -> f64 {
    procfs::rss_kib(std::process::id()).unwrap_or(0) as f64 * 1024.0
}

async fn conn_memory_async(conns: usize, docs: usize) -> Result<ConnMemory, String> {
    let dir = std::env::temp_dir().join(format!("concord-load-mem-{:x}", crate::node::random_u64()));
    let storage = Storage::open(&dir).map_err(|e| e.to_string())?;
    let metrics = Arc::new(Metrics::new());
    let node = Arc::new(
        Node::open(storage, metrics.clone(), NodeOptions::default(), None)
            .await
            .map_err(|e| e.to_string())?,
    );
    // Future sizes: build (never poll) the futures over a loopback socket.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let (client, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
    let (stream, _) = accepted.map_err(|e| e.to_string())?;
    let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        crate::http::Prefixed::new(Vec::new(), stream),
        tokio_tungstenite::tungstenite::protocol::Role::Server,
        None,
    )
    .await;
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let serve = crate::connection::serve(
        ws,
        ConnInfo { peer: peer(), query: None },
        node.clone(),
        crate::config::Limits::default(),
        metrics,
        crate::shutdown::Shutdown::new(rx),
    );
    let serve_future_bytes = std::mem::size_of_val(&serve);
    drop(serve);
    drop(client);
    let (out, _rx) = Outbox::for_test(4, 1024);
    let mut probe = node.open(ConnInfo { peer: peer(), query: None }, out);
    let on_binary_future_bytes = std::mem::size_of_val(&node.on_binary(&mut probe, Vec::new()));
    node.on_close(probe);

    let r0 = rss_bytes();
    let mut queues = Vec::with_capacity(conns);
    for _ in 0..conns {
        let (out, mut rx) = Outbox::for_test(crate::config::Limits::default().send_queue, 256 * 1024);
        // One frame through each queue, so its buffers are allocated as in use.
        out.send(vec![0; 16]).expect("an empty queue takes a frame");
        rx.try_recv().expect("the frame just sent");
        queues.push((out, rx));
    }
    let r1 = rss_bytes();
    let mut open = Vec::with_capacity(conns);
    for (i, (out, rx)) in queues.into_iter().enumerate() {
        let mut conn = node.open(ConnInfo { peer: peer(), query: None }, out);
        let session = Session::new(ReplicaId(10_000 + i as u64), SessionConfig::default());
        let hello = session.hello(None).encode();
        let doc = format!("idle-{}", i % docs.max(1));
        let sub = Msg::Subscribe(Subscribe { doc, vv: VersionVector::new() }).encode();
        for f in [hello, sub] {
            node.on_binary(&mut conn, f).await.map_err(|e| format!("{e:?}"))?;
        }
        open.push((conn, rx));
    }
    for (_, rx) in &mut open {
        while rx.try_recv().is_ok() {}
    }
    let r2 = rss_bytes();
    let n = conns.max(1) as f64;
    for (conn, _) in open {
        node.on_close(conn);
    }
    node.flush().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ConnMemory {
        conns,
        handler_bytes: (r2 - r1) / n,
        queue_bytes: (r1 - r0) / n,
        serve_future_bytes,
        on_binary_future_bytes,
    })
}

/// Opens `conns` connections over `docs` documents on an in-process [`Node`] and
/// measures what they cost (see [`ConnMemory`]).
pub fn conn_memory(conns: usize, docs: usize) -> Result<ConnMemory, String> {
    std::thread::spawn(move || {
        let rt =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        rt.block_on(conn_memory_async(conns, docs))
    })
    .join()
    .map_err(|_| "the memory profile thread panicked".to_string())?
}
