//! Multi-process cluster tests: real `concord-relay` nodes on loopback (N=3, R=W=2),
//! links between nodes through fault-injecting TCP proxies, clients writing through
//! different nodes.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{free_port, http_json, tempdir, Client, Relay};
use concord_core::sync::ErrorCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const T: Duration = Duration::from_secs(30);

/// A TCP proxy that can cut (drop and refuse) its connections, and notes whether any
/// request for `/cluster/docset` went through it.
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    saw_docset_route: Arc<AtomicBool>,
}

impl Proxy {
    async fn start(target_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let saw_docset_route = Arc::new(AtomicBool::new(false));
        let c = cut.clone();
        let saw = saw_docset_route.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { return };
                if c.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let c2 = c.clone();
                let saw = saw.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target_port)).await else {
                        return;
                    };
                    let (mut ri, mut wi) = inbound.split();
                    let (mut ro, mut wo) = outbound.split();
                    let mut a = [0u8; 16384];
                    let mut b = [0u8; 16384];
                    loop {
                        if c2.load(Ordering::SeqCst) {
                            return;
                        }
                        tokio::select! {
                            r = ri.read(&mut a) => match r {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    if a[..n].windows(15).any(|w| w == b"/cluster/docset") {
                                        saw.store(true, Ordering::SeqCst);
                                    }
                                    if wo.write_all(&a[..n]).await.is_err() { return }
                                }
                            },
                            r = ro.read(&mut b) => match r { Ok(0) | Err(_) => return, Ok(n) => if wi.write_all(&b[..n]).await.is_err() { return } },
                            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                        }
                    }
                });
            }
        });
        Proxy { port, cut, saw_docset_route }
    }
}

/// A cluster of real nodes; node i reaches node j through proxy (i, j).
struct Cluster {
    /// R of every node.
    read_quorum: usize,
    ids: Vec<String>,
    ports: Vec<u16>,
    dirs: Vec<PathBuf>,
    proxies: HashMap<(usize, usize), Proxy>,
    relays: Vec<Option<Relay>>,
    root: PathBuf,
}

impl Cluster {
    async fn start(name: &str, n: usize) -> Cluster {
        Cluster::start_with(name, n, 2).await
    }

    /// `n` nodes with N = 3, W = 2 and R = `read_quorum`.
    async fn start_with(name: &str, n: usize, read_quorum: usize) -> Cluster {
        let root = tempdir(name);
        let ids: Vec<String> = (0..n).map(|i| format!("n{i}")).collect();
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut proxies = HashMap::new();
        for i in 0..n {
            for (j, port) in ports.iter().enumerate() {
                if i != j {
                    proxies.insert((i, j), Proxy::start(*port).await);
                }
            }
        }
        let dirs = ids.iter().map(|id| root.join(id)).collect();
        let mut c = Cluster { read_quorum, ids, ports, dirs, proxies, relays: Vec::new(), root };
        for i in 0..n {
            let r = c.spawn(i, n);
            c.relays.push(Some(r));
        }
        c
    }

    fn config(&self, i: usize, members: usize) -> PathBuf {
        let mut text = format!(
            "node_id = \"{}\"\nlisten = \"127.0.0.1:{}\"\ndata_dir = \"{}\"\n\n[limits]\nrate_limit_msgs_per_sec = 100000\nrate_limit_burst = 100000\nmax_connections_per_ip = 10000\n\n[cluster]\nreplicas = 3\nwrite_quorum = 2\nread_quorum = {}\n",
            self.ids[i],
            self.ports[i],
            self.dirs[i].display(),
            self.read_quorum
        );
        for j in 0..members {
            let port = if i == j { self.ports[j] } else { self.proxies[&(i, j)].port };
            text.push_str(&format!(
                "\n[[cluster.nodes]]\nid = \"{}\"\naddr = \"127.0.0.1:{port}\"\n",
                self.ids[j]
            ));
        }
        let path = self.root.join(format!("{}.toml", self.ids[i]));
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Prepares one more node (ports, proxies); start it with `restart`.
    async fn add_node(&mut self) {
        let n = self.ids.len();
        self.ids.push(format!("n{n}"));
        self.ports.push(free_port());
        self.dirs.push(self.root.join(format!("n{n}")));
        for i in 0..n {
            self.proxies.insert((i, n), Proxy::start(self.ports[n]).await);
            self.proxies.insert((n, i), Proxy::start(self.ports[i]).await);
        }
    }

    fn spawn(&self, i: usize, members: usize) -> Relay {
        let cfg = self.config(i, members);
        Relay::start_with(&self.dirs[i], &["--config", cfg.to_str().unwrap()], false)
    }

    fn addr(&self, i: usize) -> SocketAddr {
        format!("127.0.0.1:{}", self.ports[i]).parse().unwrap()
    }

    /// The admin listener of running node `i` (`/cluster*`, `/metrics`).
    fn admin(&self, i: usize) -> SocketAddr {
        self.relays[i].as_ref().expect("node is running").admin
    }

    fn kill9(&mut self, i: usize) {
        if let Some(mut r) = self.relays[i].take() {
            r.kill9();
        }
    }

    fn restart(&mut self, i: usize) {
        let n = self.ids.len();
        self.relays[i] = Some(self.spawn(i, n));
    }

    /// Whether any request for `/cluster/docset` went between nodes.
    fn docset_route_used(&self) -> bool {
        self.proxies.values().any(|p| p.saw_docset_route.load(Ordering::SeqCst))
    }

    /// Cuts every link between node `i` and the others (both directions).
    fn isolate(&self, i: usize, cut: bool) {
        for ((a, b), p) in &self.proxies {
            if *a == i || *b == i {
                p.cut.store(cut, Ordering::SeqCst);
            }
        }
    }
}

async fn owners(addr: SocketAddr, doc: &str) -> Vec<String> {
    let body = http_json(addr, &format!("/cluster/owners?doc={doc}")).await;
    let list = body.split("\"owners\":[").nth(1).unwrap_or("").split(']').next().unwrap_or("");
    list.split(',').map(|s| s.trim_matches('"').to_string()).filter(|s| !s.is_empty()).collect()
}

fn json_number(body: &str, field: &str) -> Option<u64> {
    let rest = body.split(&format!("\"{field}\":")).nth(1)?;
    rest.chars().take_while(char::is_ascii_digit).collect::<String>().parse().ok()
}

async fn pending_hints(addr: SocketAddr) -> u64 {
    json_number(&http_json(addr, "/cluster").await, "pending_hints").expect("pending_hints in /cluster")
}

/// Writes `count` increments, retrying each until acked.
async fn write_acked(c: &mut Client, doc: &str, count: u64) {
    for _ in 0..count {
        c.increment(doc, "n", 1).await;
        let mut tries = 0;
        while !c.pump_until(Duration::from_secs(5), |c| c.all_acked(doc)).await {
            tries += 1;
            assert!(tries < 20, "a write was never acked; errors: {:?}", c.errors);
            c.errors.clear();
            c.resend_unacked(doc).await;
        }
    }
}

async fn read_counter(addr: SocketAddr, doc: &str) -> u64 {
    let mut r = Client::new(1_000_000 + concord_relay::node::random_u64() % 1_000_000);
    r.open(doc).await;
    r.connect(addr, None).await;
    assert!(r.pump_until(T, |c| c.synced.contains(doc)).await);
    r.pump_for(Duration::from_millis(300)).await;
    r.docs[doc].counter("n")
}

async fn wait_for(mut f: impl AsyncFnMut() -> bool) -> bool {
    for _ in 0..120 {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_keep_being_acked_when_an_owner_is_killed_and_hints_drain_after_restart() {
    let mut cl = Cluster::start("kill-owner", 5).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let doc = "board";
    let own = owners(cl.admin(0), doc).await;
    assert_eq!(own.len(), 3);
    // Coordinators: two nodes; victim: an owner that is neither.
    let coords: Vec<usize> = vec![0, 1];
    let victim = (0..5).find(|i| own.contains(&cl.ids[*i]) && !coords.contains(i)).unwrap_or(2);
    let mut a = Client::new(11);
    let mut b = Client::new(12);
    a.open(doc).await;
    b.open(doc).await;
    a.connect(cl.addr(coords[0]), None).await;
    b.connect(cl.addr(coords[1]), None).await;
    assert!(a.pump_until(T, |c| c.synced.contains(doc)).await);
    assert!(b.pump_until(T, |c| c.synced.contains(doc)).await);
    write_acked(&mut a, doc, 20).await;
    write_acked(&mut b, doc, 20).await;
    cl.kill9(victim);
    write_acked(&mut a, doc, 20).await;
    write_acked(&mut b, doc, 20).await;
    // A fallback holds the document for the dead owner, with a durable hint.
    let live: Vec<SocketAddr> = (0..5).filter(|i| *i != victim).map(|i| cl.admin(i)).collect();
    let mut hinted = 0;
    for a in &live {
        hinted += pending_hints(*a).await;
    }
    assert!(hinted > 0, "no fallback took the dead owner's writes");
    // The dead node shows as down in /healthz and /metrics, and fallbacks confirmed writes.
    let coord = cl.addr(coords[0]);
    let victim_id = cl.ids[victim].clone();
    let health = http_json(coord, "/healthz").await;
    assert!(health.contains(&format!("\"peer_{victim_id}_state\":0")), "{health}");
    let metrics = http_json(cl.admin(coords[0]), "/metrics").await;
    assert!(metrics.contains(&format!("concord_peer_{victim_id}_state 0")), "{metrics}");
    // Quorum acks are reported by source (owners vs fallbacks), never lumped together.
    let mut confirmed = 0;
    for i in coords.iter() {
        let h = http_json(cl.addr(*i), "/healthz").await;
        let owner = json_number(&h, "quorum_acks_owner").expect("owner acks reported");
        let fallback = json_number(&h, "quorum_acks_fallback").expect("fallback acks reported");
        confirmed += owner + fallback;
    }
    assert!(confirmed >= 2, "no write quorum was confirmed");
    assert!(metrics.contains("concord_quorum_acks_fallback "), "{metrics}");
    cl.restart(victim);
    let addrs: Vec<SocketAddr> = (0..5).map(|i| cl.admin(i)).collect();
    assert!(
        wait_for(async || {
            let mut total = 0;
            for a in &addrs {
                total += pending_hints(*a).await;
            }
            total == 0
        })
        .await,
        "hints did not drain"
    );
    // Every owner holds every acked increment, exactly.
    for o in &own {
        let i = cl.ids.iter().position(|x| x == o).unwrap();
        let addr = cl.addr(i);
        assert!(wait_for(async || read_counter(addr, doc).await == 80).await, "owner {o} lacks acked writes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_minority_refuses_writes_and_everything_converges_after_healing() {
    let mut cl = Cluster::start("partition", 3).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let doc = "shared";
    let mut major = Client::new(21);
    let mut minor = Client::new(22);
    major.open(doc).await;
    minor.open(doc).await;
    major.connect(cl.addr(0), None).await;
    minor.connect(cl.addr(2), None).await;
    assert!(major.pump_until(T, |c| c.synced.contains(doc)).await);
    assert!(minor.pump_until(T, |c| c.synced.contains(doc)).await);
    cl.isolate(2, true);
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    // The majority side (nodes 0, 1) reaches W=2.
    write_acked(&mut major, doc, 10).await;
    // The minority side (node 2 alone) cannot: "not enough replicas", kept for retry.
    minor.increment(doc, "n", 1).await;
    assert!(minor.pump_until(T, |c| c.errors.iter().any(|e| e.code == ErrorCode::NOT_ENOUGH_REPLICAS)).await);
    assert!(!minor.all_acked(doc));
    cl.isolate(2, false);
    minor.errors.clear();
    let mut tries = 0;
    while !minor.pump_until(Duration::from_secs(5), |c| c.all_acked(doc)).await {
        tries += 1;
        assert!(tries < 20, "retry never acked: {:?}", minor.errors);
        minor.resend_unacked(doc).await;
    }
    for i in 0..3 {
        let addr = cl.addr(i);
        assert!(wait_for(async || read_counter(addr, doc).await == 11).await, "node {i} did not converge");
    }
    let _ = &mut cl;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_wiped_data_dir_is_repaired_by_anti_entropy() {
    let mut cl = Cluster::start("wipe", 3).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let docs = ["w1", "w2", "w3", "w4"];
    let mut a = Client::new(31);
    for d in docs {
        a.open(d).await;
    }
    a.connect(cl.addr(0), None).await;
    for d in docs {
        assert!(a.pump_until(T, |c| c.synced.contains(d)).await);
        write_acked(&mut a, d, 5).await;
    }
    // No client stays subscribed: a returning link would re-follow its documents.
    a.disconnect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    cl.kill9(2);
    std::fs::remove_dir_all(&cl.dirs[2]).unwrap();
    cl.restart(2);
    let (addr, admin) = (cl.addr(2), cl.admin(2));
    // Before any client reads through the wiped node (which would fetch the documents on
    // demand), anti-entropy alone brings them back.
    assert!(
        wait_for(async || stored(admin).await >= docs.len() as u64).await,
        "anti-entropy did not restore the wiped node's documents"
    );
    for d in docs {
        assert!(
            wait_for(async || read_counter(addr, d).await == 5).await,
            "doc {d} not repaired on the wiped node"
        );
    }
    // The comparison ran on the peer links: no HTTP side channel, and none to be had.
    assert!(!cl.docset_route_used(), "a node asked a peer over GET /cluster/docset");
    assert!(http_status(cl.addr(0), "/cluster/docset?peer=n1&q=00").await.starts_with("HTTP/1.1 404"));
}

/// The status line of a `GET path`.
async fn http_status(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf).lines().next().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_asking_for_the_document_set_is_forbidden_and_learns_no_document_ids() {
    use concord_core::docset::DocSetQuery;
    use concord_core::merkle::NodeId;
    use concord_core::sync::msg::DocSetQueryMsg;
    use concord_core::sync::Msg;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let cl = Cluster::start("docset-client", 3).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let docs = ["secret-board-1", "secret-board-2", "secret-board-3"];
    let mut a = Client::new(51);
    for d in docs {
        a.open(d).await;
    }
    a.connect(cl.addr(0), None).await;
    for d in docs {
        assert!(a.pump_until(T, |c| c.synced.contains(d)).await);
        write_acked(&mut a, d, 1).await;
    }
    // Wait until the node's shared sets hold the documents (stored on every owner).
    assert!(wait_for(async || stored(cl.admin(0)).await >= docs.len() as u64).await);
    // A plain client (no peer token) asks for every document listed, in every form.
    let mut ws = common::raw_ws(cl.addr(0)).await;
    let hello = concord_core::sync::Session::new(concord_core::ReplicaId(52), Default::default()).hello(None);
    let query = DocSetQuery {
        children: vec![NodeId::ROOT],
        lists: (0..16).map(|i| NodeId { level: 1, index: i }).collect(),
        names: docs.iter().map(|d| concord_core::docset::doc_hash(d)).collect(),
        ..Default::default()
    };
    for m in [hello, Msg::DocSetQuery(DocSetQueryMsg { exchange: 1, query })] {
        ws.send(Message::Binary(m.encode().into())).await.unwrap();
    }
    let mut forbidden = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(deadline, ws.next()).await {
        let Message::Binary(b) = frame else { continue };
        for d in docs {
            assert!(!b.windows(d.len()).any(|w| w == d.as_bytes()), "a client learned the id {d}");
        }
        match Msg::decode(&b) {
            Ok(Msg::DocSetAnswer(a)) => panic!("a client got a document-set answer: {a:?}"),
            Ok(Msg::Error(e)) if e.code == ErrorCode::FORBIDDEN => forbidden = true,
            _ => {}
        }
    }
    assert!(forbidden, "no FORBIDDEN error for a client's document-set query");
}

async fn stored(addr: SocketAddr) -> u64 {
    json_number(&http_json(addr, "/cluster").await, "documents_stored").unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_a_fourth_node_under_load_moves_about_a_quarter_of_placements_and_loses_nothing() {
    let mut cl = Cluster::start("grow", 3).await;
    cl.add_node().await; // prepared (ports, proxies), not started
    tokio::time::sleep(Duration::from_millis(800)).await;
    let docs: Vec<String> = (0..24).map(|i| format!("g{i}")).collect();
    let mut a = Client::new(41);
    for d in &docs {
        a.open(d).await;
    }
    a.connect(cl.addr(0), None).await;
    for d in &docs {
        assert!(a.pump_until(T, |c| c.synced.contains(d)).await);
        write_acked(&mut a, d, 2).await;
    }
    // Rolling restart into a four-node ring, writing between steps.
    cl.relays.push(None);
    cl.restart(3);
    for i in 0..3 {
        cl.kill9(i);
        cl.restart(i);
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        a.connect(cl.addr(0), None).await;
        for d in &docs {
            assert!(a.pump_until(T, |c| c.synced.contains(d)).await);
        }
        for d in docs.iter().take(6) {
            write_acked(&mut a, d, 1).await;
        }
    }
    // Documents the new node owns reach it through anti-entropy.
    let ring_owners = {
        let mut n = 0;
        for d in &docs {
            if owners(cl.admin(0), d).await.contains(&"n3".to_string()) {
                n += 1;
            }
        }
        n
    };
    let fraction = ring_owners as f64 / (docs.len() * 3) as f64;
    println!("new node owns {ring_owners} of {} placements ({:.2})", docs.len() * 3, fraction);
    assert!((0.12..=0.40).contains(&fraction), "moved fraction {fraction}");
    let new = cl.admin(3);
    assert!(
        wait_for(async || stored(new).await >= ring_owners as u64).await,
        "new node did not receive its ranges"
    );
    for (k, d) in docs.iter().enumerate() {
        let want = if k < 6 { 5 } else { 2 };
        for i in 0..4 {
            let addr = cl.addr(i);
            if owners(cl.admin(i), d).await.contains(&cl.ids[i]) {
                assert!(wait_for(async || read_counter(addr, d).await == want).await, "{d} on n{i}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_missed_acked_writes_does_not_report_synced_until_a_read_quorum_answers() {
    let cl = Cluster::start("read-quorum", 3).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let doc = "ledger";
    // Node 2 is cut off while 10 increments are acked by nodes 0 and 1 (W = 2).
    cl.isolate(2, true);
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let mut w = Client::new(61);
    w.open(doc).await;
    w.connect(cl.addr(0), None).await;
    assert!(w.pump_until(T, |c| c.synced.contains(doc)).await);
    write_acked(&mut w, doc, 10).await;

    // A reader that can reach only node 2 (which has none of them) is never told it is
    // synced on that stale copy: it hears NOT_ENOUGH_REPLICAS and keeps waiting.
    let mut r = Client::new(62);
    r.open(doc).await;
    r.connect(cl.addr(2), None).await;
    assert!(
        r.pump_until(T, |c| c.errors.iter().any(|e| e.code == ErrorCode::NOT_ENOUGH_REPLICAS)).await,
        "no NOT_ENOUGH_REPLICAS for a read no quorum could answer"
    );
    assert!(!r.synced.contains(doc), "Synced on a copy no read quorum vouched for");
    assert_eq!(r.docs[doc].counter("n"), 0);

    // Once a second replica is reachable the read completes, with every acked write.
    cl.isolate(2, false);
    assert!(
        r.pump_until(Duration::from_secs(30), |c| c.synced.contains(doc)).await,
        "the read never completed"
    );
    assert_eq!(r.docs[doc].counter("n"), 10, "the read missed acked writes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_r_1_a_replica_answers_from_its_own_copy_at_once() {
    // The documented fast path: R = 1 trades the guarantee for latency.
    let cl = Cluster::start_with("read-one", 3, 1).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let doc = "fast";
    cl.isolate(2, true);
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let mut w = Client::new(71);
    w.open(doc).await;
    w.connect(cl.addr(0), None).await;
    assert!(w.pump_until(T, |c| c.synced.contains(doc)).await);
    write_acked(&mut w, doc, 3).await;
    let mut r = Client::new(72);
    r.open(doc).await;
    r.connect(cl.addr(2), None).await;
    assert!(r.pump_until(T, |c| c.synced.contains(doc)).await, "R = 1 waited for other replicas");
    assert_eq!(r.docs[doc].counter("n"), 0, "the isolated replica cannot know the writes");
    assert!(r.errors.is_empty(), "{:?}", r.errors);
}
