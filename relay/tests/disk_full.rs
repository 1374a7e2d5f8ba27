//! A disk that refuses writes (full, failing), through the real server and node, with the
//! storage's switch that makes its disk refuse writes: a write that is not persisted is
//! answered with an error, never an ack; reads go on; once the disk takes writes again,
//! writes are persisted and acked without a restart; after a restart, exactly the acked
//! writes are there.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{tempdir, Client};
use concord_core::sync::ErrorCode;
use concord_relay::config::{Config, Overrides};
use concord_relay::node::{Node, NodeOptions};
use concord_relay::{Metrics, Storage};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Upper bound for anything to happen; never reached unless something is broken.
const T: Duration = Duration::from_secs(20);

/// A relay node and its server in this process, so the test can reach its storage.
struct InProcess {
    addr: std::net::SocketAddr,
    storage: Storage,
    node: Node,
    stop: oneshot::Sender<()>,
    server: JoinHandle<()>,
    ticker: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl InProcess {
    /// Opens the storage in `dir` and serves on a free port, without the node's ticker.
    async fn start(dir: &Path) -> InProcess {
        let storage = Storage::open(dir).expect("open storage");
        let metrics = Arc::new(Metrics::new());
        let node = Node::open(storage.clone(), metrics.clone(), NodeOptions::default(), None)
            .await
            .expect("open node");
        let config = Config::from_overrides(&Overrides {
            listen: Some("127.0.0.1:0".into()),
            admin_listen: None,
            data_dir: Some(dir.to_path_buf()),
            node_id: Some("disk-full".into()),
        })
        .expect("config");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn({
            let node = Arc::new(node.clone());
            async move {
                concord_relay::server::run(listener, &config, node, metrics, async {
                    let _ = stopped.await;
                })
                .await;
            }
        });
        InProcess { addr, storage, node, stop, server, ticker: None }
    }

    /// Starts the node's once-a-second work (session ticks, retries of failed writes).
    fn start_ticker(&mut self) {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(self.node.clone().run_ticker(async {
            let _ = stopped.await;
        }));
        self.ticker = Some((stop, task));
    }

    /// Stops the server; the node writes its final snapshots (if the disk takes them)
    /// and closes the storage, releasing the data directory.
    async fn stop(self) {
        if let Some((stop, task)) = self.ticker {
            let _ = stop.send(());
            task.await.expect("ticker");
        }
        let _ = self.stop.send(());
        tokio::time::timeout(T, self.server).await.expect("server stops").expect("server task");
    }
}

async fn connected(id: u64, addr: std::net::SocketAddr, docs: &[&str]) -> Client {
    let mut c = Client::new(id);
    for d in docs {
        c.open(d).await;
    }
    c.connect(addr, None).await;
    for d in docs {
        assert!(c.pump_until(T, |c| c.synced.contains(*d)).await, "{d} did not sync");
    }
    c
}

/// Writes acked by the relay for `c`'s own replica on `doc`.
fn acked(c: &Client, doc: &str) -> u64 {
    c.acked.get(doc).map_or(0, |v| v.get(c.replica))
}

/// Waits for an error about `doc`, returns its code.
async fn next_error(c: &mut Client, doc: &str) -> ErrorCode {
    let seen = c.errors.len();
    let got = c.pump_until(T, |c| c.errors[seen..].iter().any(|e| e.doc.as_deref() == Some(doc))).await;
    assert!(got, "no error about {doc}; acked {:?}", c.acked.get(doc));
    let e = c.errors[seen..].iter().find(|e| e.doc.as_deref() == Some(doc)).expect("error");
    e.code
}

/// Subscribes `c` to `doc` again and waits for the answer, so every frame the relay sent
/// before has been read.
async fn resubscribe(c: &mut Client, doc: &str) {
    c.synced.remove(doc);
    let msgs = c.session.subscribe(doc, &mut c.docs);
    c.send(msgs).await;
    assert!(c.pump_until(T, |c| c.synced.contains(doc)).await, "{doc} did not sync again");
}

/// What the relay holds durable of `replica`'s writes to `doc`: the ack a new subscriber
/// gets (its first, so no earlier ack is merged into it).
async fn durable(addr: std::net::SocketAddr, doc: &str, replica: concord_core::ReplicaId) -> u64 {
    let mut probe = connected(1000 + replica.0, addr, &[doc]).await;
    assert!(probe.pump_until(T, |c| c.acked.contains_key(doc)).await, "no ack on subscribing to {doc}");
    probe.acked[doc].get(replica)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_write_gets_an_error_reads_go_on_and_writes_are_acked_again_without_restart() {
    let dir = tempdir("disk-full");
    // A document stored by an earlier run: after the restart it is on disk only.
    {
        let relay = InProcess::start(&dir).await;
        let mut w = connected(50, relay.addr, &["cold"]).await;
        for _ in 0..3 {
            w.increment("cold", "n", 1).await;
        }
        assert!(w.pump_until(T, |c| c.all_acked("cold")).await);
        w.disconnect();
        relay.stop().await;
    }

    let mut relay = InProcess::start(&dir).await;
    let mut a = connected(1, relay.addr, &["d"]).await;
    let mut c = connected(3, relay.addr, &["e"]).await;
    let mut f = connected(4, relay.addr, &["f"]).await;
    for _ in 0..3 {
        a.increment("d", "n", 1).await;
    }
    assert!(a.pump_until(T, |c| c.all_acked("d")).await);
    assert_eq!(acked(&a, "d"), 3);

    relay.storage.fail_writes(true);
    // (a) The refused write is answered with a typed error ...
    a.increment("d", "n", 1).await;
    assert_eq!(next_error(&mut a, "d").await, ErrorCode::INTERNAL);
    c.increment("e", "n", 1).await;
    assert_eq!(next_error(&mut c, "e").await, ErrorCode::INTERNAL);
    f.increment("f", "n", 1).await;
    assert_eq!(next_error(&mut f, "f").await, ErrorCode::INTERNAL);
    // ... and no ack covers it, then or later: (b) the relay does not hold it durable,
    // as a fresh subscription's ack says.
    relay.node.settle().await;
    resubscribe(&mut a, "d").await;
    assert_eq!(acked(&a, "d"), 3, "an ack covered a write the disk refused");
    assert_eq!(durable(relay.addr, "d", a.replica).await, 3, "the refused write counts as durable");

    // (c) Reads go on: a document only on disk, and one in memory.
    let mut b = connected(2, relay.addr, &["cold", "d"]).await;
    assert_eq!(b.docs["cold"].counter("n"), 3);
    assert_eq!(b.docs["d"].counter("n"), 4, "memory has the refused write; it is served");

    // While the disk refuses writes, so does the relay: a resend is refused too.
    a.resend_unacked("d").await;
    assert_eq!(next_error(&mut a, "d").await, ErrorCode::INTERNAL);
    a.increment("d", "n", 1).await;
    assert_eq!(next_error(&mut a, "d").await, ErrorCode::INTERNAL);
    relay.node.settle().await;
    resubscribe(&mut a, "d").await;
    assert_eq!(acked(&a, "d"), 3);
    assert_eq!(durable(relay.addr, "d", a.replica).await, 3);

    // (d) The disk takes writes again; no restart.
    relay.storage.fail_writes(false);
    // A resend of the refused writes (memory has them: nothing is new) is persisted
    // and acked.
    a.resend_unacked("d").await;
    assert!(a.pump_until(T, |c| c.all_acked("d")).await, "resend not acked: {:?}", a.errors);
    assert_eq!(acked(&a, "d"), 5);
    assert_eq!(durable(relay.addr, "d", a.replica).await, 5);
    // A new write is acked.
    a.increment("d", "n", 1).await;
    assert!(a.pump_until(T, |c| c.all_acked("d")).await);
    assert_eq!(acked(&a, "d"), 6);
    // A new write from a writer that does not resend is acked with its refused one.
    f.increment("f", "n", 1).await;
    assert!(f.pump_until(T, |c| c.all_acked("f")).await, "errors {:?}", f.errors);
    assert_eq!(acked(&f, "f"), 2);
    // A writer that neither resends nor writes again (a browser whose write the relay
    // has in memory) is acked once the node writes the document again by itself.
    assert!(!c.all_acked("e"));
    relay.start_ticker();
    assert!(c.pump_until(T, |c| c.all_acked("e")).await, "errors {:?}", c.errors);
    assert_eq!(acked(&c, "e"), 1);

    // (e) After a restart, exactly the acked writes are there.
    let expect = [("d", acked(&a, "d")), ("e", acked(&c, "e")), ("f", acked(&f, "f")), ("cold", 3)];
    for cl in [&mut a, &mut b, &mut c, &mut f] {
        cl.disconnect();
    }
    relay.stop().await;
    let relay = InProcess::start(&dir).await;
    let r = connected(99, relay.addr, &["d", "e", "f", "cold"]).await;
    for (doc, n) in expect {
        assert_eq!(r.docs[doc].counter("n"), n, "{doc}");
    }
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_during_the_outage_exactly_the_acked_writes_are_there_and_the_rest_is_resent() {
    let dir = tempdir("disk-full-restart");
    let relay = InProcess::start(&dir).await;
    let mut a = connected(1, relay.addr, &["d"]).await;
    for _ in 0..2 {
        a.increment("d", "n", 1).await;
    }
    assert!(a.pump_until(T, |c| c.all_acked("d")).await);

    relay.storage.fail_writes(true);
    for _ in 0..2 {
        a.increment("d", "n", 1).await;
        assert_eq!(next_error(&mut a, "d").await, ErrorCode::INTERNAL);
    }
    assert_eq!(acked(&a, "d"), 2);
    assert_eq!(durable(relay.addr, "d", a.replica).await, 2);
    // The node stops while the disk still refuses writes: its final snapshot fails too.
    a.disconnect();
    relay.stop().await;

    let relay = InProcess::start(&dir).await;
    let mut r = connected(99, relay.addr, &["d"]).await;
    assert_eq!(r.docs["d"].counter("n"), 2, "exactly the acked writes");
    // The writer reconnects: what the relay lacks is sent again, persisted and acked.
    a.connect(relay.addr, None).await;
    assert!(a.pump_until(T, |c| c.all_acked("d")).await, "errors {:?}", a.errors);
    assert_eq!(acked(&a, "d"), 4);
    assert!(r.pump_until(T, |c| c.docs["d"].counter("n") == 4).await);
    relay.stop().await;
}
