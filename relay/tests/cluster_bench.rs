//! Cluster benchmarks (ignored by default; run with
//! `cargo test --release -p concord-relay --test cluster_bench -- --ignored --nocapture`).
//!
//! Each row is printed beside a baseline measured in the same run: write latency beside a
//! standalone node's, anti-entropy bytes beside shipping the whole digest list.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{free_port, tempdir, Client, Relay};
use concord_core::docset::{DocSet, DocSetAnswer, DocSetDiff};
use concord_core::sync::msg::{DocSetAnswerMsg, DocSetQueryMsg};
use concord_core::sync::Msg;
use concord_core::{ReplicaId, VersionVector};

fn start_cluster(root: &Path, nodes: usize, w: usize) -> (Vec<Relay>, Vec<SocketAddr>) {
    let ports: Vec<u16> = (0..nodes).map(|_| free_port()).collect();
    let mut relays = Vec::new();
    for i in 0..nodes {
        let dir = root.join(format!("n{i}"));
        let mut text = format!(
            "node_id = \"n{i}\"\nlisten = \"127.0.0.1:{}\"\ndata_dir = \"{}\"\n[limits]\nrate_limit_msgs_per_sec = 1000000\nrate_limit_burst = 1000000\nmax_connections_per_ip = 10000\n[cluster]\nreplicas = 3\nwrite_quorum = {w}\nread_quorum = {w}\n",
            ports[i],
            dir.display()
        );
        for (j, p) in ports.iter().enumerate() {
            text.push_str(&format!("[[cluster.nodes]]\nid = \"n{j}\"\naddr = \"127.0.0.1:{p}\"\n"));
        }
        let cfg = root.join(format!("n{i}.toml"));
        std::fs::write(&cfg, text).unwrap();
        relays.push(Relay::start_with(&dir, &["--config", cfg.to_str().unwrap()], false));
    }
    let addrs = ports.iter().map(|p| format!("127.0.0.1:{p}").parse().unwrap()).collect();
    (relays, addrs)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Sequential writes, each timed from send to its durable ack.
async fn write_latencies(addr: SocketAddr, writes: usize) -> (f64, f64) {
    let mut c = Client::new(77);
    c.open("bench").await;
    c.connect(addr, None).await;
    assert!(c.pump_until(Duration::from_secs(20), |c| c.synced.contains("bench")).await);
    let mut lat = Vec::with_capacity(writes);
    for _ in 0..writes {
        let t = Instant::now();
        c.increment("bench", "n", 1).await;
        assert!(c.pump_until(Duration::from_secs(10), |c| c.all_acked("bench")).await, "write not acked");
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    lat.sort_by(f64::total_cmp);
    (pct(&lat, 0.5), pct(&lat, 0.99))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn cluster_benchmarks() {
    const WRITES: usize = 400;
    let mut rows = Vec::new();

    let dir = tempdir("bench-standalone");
    let solo = Relay::start(&dir, &[]);
    let (b50, b99) = write_latencies(solo.addr, WRITES).await;
    drop(solo);
    rows.push(format!("| write latency, standalone node (baseline) | {b50:.2} ms | {b99:.2} ms | 1.00 |"));
    for w in [1, 2] {
        let root = tempdir(&format!("bench-w{w}"));
        let (relays, addrs) = start_cluster(&root, 3, w);
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let (p50, p99) = write_latencies(addrs[0], WRITES).await;
        rows.push(format!(
            "| write latency, 3 nodes, N=3, W={w} | {p50:.2} ms | {p99:.2} ms | {:.2} |",
            p50 / b50
        ));
        drop(relays);
    }

    // Hint drain: five nodes, one owner down while 60 documents are written.
    let root = tempdir("bench-hints");
    let (mut relays, addrs) = start_cluster(&root, 5, 2);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    relays[4].kill9();
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let mut c = Client::new(78);
    let docs: Vec<String> = (0..60).map(|i| format!("h{i}")).collect();
    for d in &docs {
        c.open(d).await;
    }
    c.connect(addrs[0], None).await;
    for d in &docs {
        assert!(c.pump_until(Duration::from_secs(20), |c| c.synced.contains(d)).await);
        c.increment(d, "n", 1).await;
        assert!(c.pump_until(Duration::from_secs(20), |c| c.all_acked(d)).await);
    }
    let admins: Vec<SocketAddr> = relays[..4].iter().map(|r| r.admin).collect();
    let hints = total_hints(&admins).await;
    let cfg = root.join("n4.toml");
    let t = Instant::now();
    relays[4] = Relay::start_with(&root.join("n4"), &["--config", cfg.to_str().unwrap()], false);
    while total_hints(&admins).await > 0 {
        assert!(t.elapsed() < Duration::from_secs(60), "hints did not drain");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let secs = t.elapsed().as_secs_f64();
    rows.push(format!(
        "| hint drain: {hints} hinted documents after restart | {:.0} docs/s | {secs:.2} s | |",
        hints as f64 / secs
    ));
    drop(relays);

    // Anti-entropy: 100,000 documents, 1% divergent, the exchange as the relays run it
    // (queries of 128 nodes and their answers, as sync protocol frames of at most the
    // default 256 KiB), beside the whole digest list.
    let vv = |n: u64| VersionVector::from_iter([(ReplicaId(1), n)]);
    let (mut here, mut there) = (DocSet::new(), DocSet::new());
    for i in 0..100_000u64 {
        let id = format!("doc-{i:06}");
        here.upsert(&id, &vv(i + 1));
        there.upsert(&id, &vv(if i % 100 == 7 { i + 2 } else { i + 1 }));
    }
    let t = Instant::now();
    let (mut diff, first) = DocSetDiff::start();
    let mut queries = first.chunks(128);
    let (mut bytes, mut rounds) = (0usize, 0);
    while !diff.is_done() {
        rounds += 1;
        let mut next = Vec::new();
        for query in std::mem::take(&mut queries) {
            let qb = Msg::DocSetQuery(DocSetQueryMsg { exchange: 1, query }).encode();
            let Ok(Msg::DocSetQuery(q)) = Msg::decode(&qb) else { panic!("query does not decode") };
            bytes += qb.len();
            let mut answer = DocSetAnswer::default();
            for part in DocSetAnswerMsg::frames(1, there.answer(&q.query), 256 * 1024).unwrap() {
                let ab = part.encode();
                bytes += ab.len();
                let Ok(Msg::DocSetAnswer(a)) = Msg::decode(&ab) else { panic!("answer does not decode") };
                answer.absorb(a.answer);
            }
            next.extend(diff.step(&here, answer).unwrap().chunks(128));
        }
        queries = next;
    }
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let found = diff.differences().len();
    let full: usize =
        postcard::to_allocvec(&there.iter().map(|(k, d)| (k.to_string(), d)).collect::<Vec<_>>())
            .unwrap()
            .len();
    rows.push(format!(
        "| anti-entropy, 100,000 docs, 1% divergent: {found} found in {rounds} round trips | {} KiB | {ms:.1} ms | {:.3} of the full digest list ({} KiB) |",
        bytes / 1024,
        bytes as f64 / full as f64,
        full / 1024
    ));

    println!("\n| measurement | p50 / value | p99 / time | ratio to baseline |\n|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
}

async fn total_hints(addrs: &[SocketAddr]) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut total = 0;
    for a in addrs {
        let Ok(mut s) = tokio::net::TcpStream::connect(a).await else { continue };
        let _ = s.write_all(b"GET /cluster HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
        let mut buf = String::new();
        let _ = s.read_to_string(&mut buf).await;
        let n: u64 = buf
            .split("\"pending_hints\":")
            .nth(1)
            .map(|r| r.chars().take_while(char::is_ascii_digit).collect::<String>())
            .and_then(|d| d.parse().ok())
            .unwrap_or(0);
        total += n;
    }
    total
}
