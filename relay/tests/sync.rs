//! The relay binary speaking the real protocol: convergence, catch-up, durability.

mod common;

use common::{http_json, tempdir, Client, Relay};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

#[tokio::test]
async fn two_clients_on_one_document_converge() {
    let dir = tempdir("converge");
    let relay = Relay::start(&dir, &[]);
    let mut a = Client::new(1);
    let mut b = Client::new(2);
    a.open("board").await;
    b.open("board").await;
    a.connect(relay.addr, None).await;
    b.connect(relay.addr, None).await;
    assert!(a.pump_until(T, |c| c.synced.contains("board")).await);
    assert!(b.pump_until(T, |c| c.synced.contains("board")).await);

    a.increment("board", "likes", 2).await;
    let d = b.doc("board").set_add("tags", "rust".into()).unwrap();
    let m = b.session.on_local_delta("board", &d);
    b.send(m).await;
    let d = b.doc("board").set_register("title", "Hello".into(), 1_000).unwrap();
    let m = b.session.on_local_delta("board", &d);
    b.send(m).await;

    assert!(a.pump_until(T, |c| c.docs["board"].set_values("tags").len() == 1 && c.all_acked("board")).await);
    assert!(b.pump_until(T, |c| c.docs["board"].counter("likes") == 2 && c.all_acked("board")).await);
    assert!(a.pump_until(T, |c| c.docs["board"].register("title").is_some()).await);
    assert_eq!(a.docs["board"].to_value(), b.docs["board"].to_value());
    assert_eq!(a.docs["board"].version(), b.docs["board"].version());
}

#[tokio::test]
async fn an_offline_client_catches_up_by_deltas() {
    let dir = tempdir("catchup-delta");
    let relay = Relay::start(&dir, &[]);
    let mut a = Client::new(1);
    let mut b = Client::new(2);
    a.open("doc").await;
    b.open("doc").await;
    a.connect(relay.addr, None).await;
    // b is offline and writes too.
    for _ in 0..20 {
        a.increment("doc", "n", 1).await;
    }
    b.doc("doc").increment("n", 5).unwrap();
    assert!(a.pump_until(T, |c| c.all_acked("doc")).await);
    b.connect(relay.addr, None).await;
    assert!(b.pump_until(T, |c| c.docs["doc"].counter("n") == 25 && c.all_acked("doc")).await);
    assert!(a.pump_until(T, |c| c.docs["doc"].counter("n") == 25).await);
}

#[tokio::test]
async fn an_offline_client_catches_up_by_merkle_when_the_log_is_gone() {
    let dir = tempdir("catchup-merkle");
    let relay = Relay::start(&dir, &[]);
    let mut a = Client::new(1);
    a.open("big").await;
    a.connect(relay.addr, None).await;
    assert!(a.pump_until(T, |c| c.session.peer_subscribed("big")).await);
    // More keys than a whole-state answer takes and more deltas than the log keeps, sent
    // in batches of 100 per frame (well inside the default rate limit).
    for batch in 0..50u32 {
        let deltas: Vec<_> = (0..100u32)
            .map(|j| a.doc("big").increment(&format!("k{}", (batch * 100 + j) % 400), 1).unwrap())
            .collect();
        let m = a.session.on_local_deltas("big", &deltas);
        a.send(m).await;
        a.pump_for(Duration::from_millis(1)).await;
    }
    assert!(a.pump_until(T, |c| c.all_acked("big")).await);
    let mut b = Client::new(2);
    b.open("big").await;
    b.connect(relay.addr, None).await;
    assert!(b.pump_until(T, |c| c.synced.contains("big")).await);
    assert_eq!(b.docs["big"].to_value(), a.docs["big"].to_value());
    assert_eq!(b.docs["big"].version(), a.docs["big"].version());
}

#[tokio::test]
async fn every_acked_write_survives_kill_9_and_unacked_ones_are_resent_once() {
    let dir = tempdir("kill9");
    let mut relay = Relay::start(&dir, &[]);
    let mut a = Client::new(7);
    a.open("doc").await;
    a.connect(relay.addr, None).await;
    for _ in 0..300 {
        a.increment("doc", "n", 1).await;
        a.pump_until(Duration::from_millis(2), |_| false).await;
    }
    let acked = a.acked.get("doc").map(|v| v.get(a.replica)).unwrap_or(0);
    relay.kill9();
    assert!(acked > 0, "nothing was acked before the kill");

    let relay = Relay::start(&dir, &[]);
    // A fresh reader sees at least every acked increment.
    let mut r = Client::new(99);
    r.open("doc").await;
    r.connect(relay.addr, None).await;
    assert!(r.pump_until(T, |c| c.synced.contains("doc")).await);
    let seen = r.docs["doc"].counter("n");
    assert!(seen >= acked, "relay lost acked writes: {seen} < {acked}");

    // The writer reconnects; what the relay lacks is re-sent and applied once.
    a.connect(relay.addr, None).await;
    let ok = a.pump_until(T, |c| c.all_acked("doc")).await;
    assert!(
        ok,
        "acked {:?} mine {:?} errors {:?} closed {:?}",
        a.acked.get("doc"),
        a.docs["doc"].version(),
        a.errors,
        a.closed
    );
    assert!(r.pump_until(T, |c| c.docs["doc"].counter("n") == 300).await);
    r.pump_for(Duration::from_millis(200)).await;
    assert_eq!(r.docs["doc"].counter("n"), 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_writers_lose_no_acked_write_to_kill_9() {
    let dir = tempdir("kill9-pipelined");
    let mut relay = Relay::start(&dir, &[]);
    let docs = ["p0", "p1", "p2", "p3"];
    let mut writers = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        let mut w = Client::new(100 + i as u64);
        w.open(doc).await;
        w.connect(relay.addr, None).await;
        assert!(w.pump_until(T, |c| c.synced.contains(*doc)).await);
        writers.push(w);
    }
    // 1,200 increments per writer, one frame each, sent without waiting for acks: many
    // frames are read while earlier ones commit, commits group several frames of one
    // document into one row, and each document crosses two snapshots (every 512 deltas).
    const N: u64 = 1_200;
    for i in 0..N {
        for (w, doc) in writers.iter_mut().zip(docs) {
            w.increment(doc, "n", 1).await;
            if i % 200 == 199 {
                w.pump_for(Duration::from_millis(1)).await;
            }
        }
    }
    for w in &mut writers {
        w.pump_for(Duration::from_millis(5)).await;
    }
    let acked: Vec<u64> =
        writers.iter().zip(docs).map(|(w, d)| w.acked.get(d).map_or(0, |v| v.get(w.replica))).collect();
    relay.kill9();
    assert!(acked.iter().sum::<u64>() > 0, "nothing was acked before the kill");

    let relay = Relay::start(&dir, &[]);
    let mut r = Client::new(199);
    for (doc, acked) in docs.iter().zip(&acked) {
        r.open(doc).await;
        if r.ws.is_none() {
            r.connect(relay.addr, None).await;
        }
        assert!(r.pump_until(T, |c| c.synced.contains(*doc)).await);
        let seen = r.docs[*doc].counter("n");
        assert!(seen >= *acked, "{doc}: relay lost acked writes: {seen} < {acked}");
    }
    // The writers reconnect and resend what the relay lacks; each write counts once.
    for (w, doc) in writers.iter_mut().zip(docs) {
        w.connect(relay.addr, None).await;
        assert!(w.pump_until(T, |c| c.all_acked(doc)).await, "{doc}: errors {:?}", w.errors);
    }
    for doc in docs {
        assert!(r.pump_until(T, |c| c.docs[doc].counter("n") == N).await, "{doc} did not reach {N}");
    }
    r.pump_for(Duration::from_millis(200)).await;
    for doc in docs {
        assert_eq!(r.docs[doc].counter("n"), N, "{doc}");
    }
}

fn metric(body: &str, name: &str) -> Option<u64> {
    let line = body.lines().find(|l| l.starts_with(&format!("{name} ")))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test]
async fn a_thousand_offline_clicks_are_one_stored_delta_on_the_relay_and_reach_readers_whole() {
    let dir = tempdir("runs");
    let relay = Relay::start(&dir, &[]);
    let mut a = Client::new(1);
    a.open("doc").await;
    for _ in 0..1000 {
        a.doc("doc").increment("likes", 1).unwrap(); // offline: nothing is sent
    }
    a.connect(relay.addr, None).await;
    assert!(a.pump_until(T, |c| c.all_acked("doc")).await, "all 1,000 dots acked");
    let m = http_json(relay.admin, "/metrics").await;
    assert_eq!(metric(&m, "concord_deltas_persisted_total"), Some(1), "{m}");

    let mut b = Client::new(2);
    b.open("doc").await;
    b.connect(relay.addr, None).await;
    assert!(b.pump_until(T, |c| c.synced.contains("doc")).await);
    let doc = &b.docs["doc"];
    assert_eq!((doc.counter("likes"), doc.version()), (1000, a.docs["doc"].version()));
    let log = doc.deltas_since(&concord_core::VersionVector::new()).unwrap();
    assert_eq!(log.iter().map(|d| (d.first(), d.dot.seq)).collect::<Vec<_>>(), [(1, 1000)]);
}
