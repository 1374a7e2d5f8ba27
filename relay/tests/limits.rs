//! Bounds and malformed writes against the real binary: each refused write gets a typed
//! `Error` naming its document, nothing of it is applied or persisted, and the relay goes
//! on serving the same client and others.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{tempdir, Client, Relay};
use concord_core::sync::msg::{Deltas, Subscribe};
use concord_core::sync::{ErrorCode, Msg};
use concord_core::value::Value;
use concord_core::{Delta, Document, ReplicaId, VersionVector};

const T: Duration = Duration::from_secs(15);

fn config(dir: &Path, limits: &str) -> String {
    let path = dir.join("relay.toml");
    let text = format!(
        "node_id = \"a\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[limits]\n{limits}\n",
        dir.join("data").display()
    );
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn refused(c: &Client, code: ErrorCode, doc: &str) -> bool {
    c.errors.iter().any(|e| e.code == code && e.doc.as_deref() == Some(doc))
}

/// A client that opened `doc` and finished its first exchange.
async fn writer(relay: &Relay, replica: u64, doc: &str) -> Client {
    let mut c = Client::new(replica);
    c.open(doc).await;
    c.connect(relay.addr, None).await;
    assert!(c.pump_until(T, |c| c.synced.contains(doc)).await);
    c
}

/// Sends deltas made by the client's own document without going through its session
/// (which would remember them as sent).
async fn push(c: &mut Client, doc: &str, deltas: Vec<Delta>) {
    c.send(vec![Msg::Deltas(Deltas { doc: doc.into(), deltas })]).await;
}

/// What a fresh subscriber receives of `doc`.
async fn fresh_view(relay: &Relay, doc: &str) -> Document {
    let mut r = Client::new(900);
    r.open(doc).await;
    r.connect(relay.addr, None).await;
    assert!(r.pump_until(T, |c| c.synced.contains(doc)).await);
    r.doc(doc).clone()
}

#[tokio::test]
async fn nan_and_infinities_are_refused_as_invalid_and_nothing_is_applied() {
    let dir = tempdir("limits-nan");
    let relay = Relay::start(&dir, &[]);
    let nested = Value::Array(vec![Value::Int(1), Value::Float(f64::NAN)]);
    let bad = [Value::Float(f64::NAN), Value::Float(f64::INFINITY), Value::Float(f64::NEG_INFINITY), nested];
    for (i, v) in bad.into_iter().enumerate() {
        let mut c = writer(&relay, 10 + i as u64, "doc").await;
        let d = if i == 3 {
            c.doc("doc").set_add("s", v).unwrap()
        } else {
            c.doc("doc").set_register(&format!("r{i}"), v, 1_000).unwrap()
        };
        push(&mut c, "doc", vec![d]).await;
        assert!(
            c.pump_until(T, |c| refused(c, ErrorCode::INVALID, "doc")).await,
            "value {i} was not refused"
        );
        assert!(c.errors[0].message.contains("NaN or an infinity"), "{}", c.errors[0].message);
    }
    let view = fresh_view(&relay, "doc").await;
    assert!(view.get("r0").is_none() && view.get("r1").is_none() && view.get("s").is_none());
}

#[tokio::test]
async fn replica_zero_is_refused_in_hello_and_in_a_write() {
    let dir = tempdir("limits-zero");
    let relay = Relay::start(&dir, &[]);
    let mut z = Client::new(0);
    z.connect(relay.addr, None).await;
    assert!(z.pump_until(T, |c| c.errors.iter().any(|e| e.code == ErrorCode::INVALID)).await);
    assert!(
        z.pump_until(T, |c| c.closed.is_some()).await,
        "a Hello from replica 0 must close the connection"
    );

    // A client forwarding an event of replica 0.
    let mut c = writer(&relay, 1, "doc").await;
    let d = Document::new(ReplicaId(0)).increment("n", 1).unwrap();
    push(&mut c, "doc", vec![d]).await;
    assert!(c.pump_until(T, |c| refused(c, ErrorCode::INVALID, "doc")).await);
    assert!(fresh_view(&relay, "doc").await.get("n").is_none());
}

#[tokio::test]
async fn empty_control_character_dot_segment_and_long_doc_ids_are_refused() {
    let dir = tempdir("limits-ids");
    let relay = Relay::start(&dir, &["--config", &config(&dir, "max_doc_id_bytes = 64")]);
    let mut c = writer(&relay, 1, "ok").await;
    let long = "x".repeat(65);
    let bad = ["", "a\0b", "tab\there", "../etc/passwd", "a/./b", "a/..", long.as_str()];
    for (i, id) in bad.iter().enumerate() {
        let sub = Msg::Subscribe(Subscribe { doc: (*id).into(), vv: VersionVector::new() });
        c.send(vec![sub]).await;
        assert!(
            c.pump_until(T, |c| c.errors.iter().filter(|e| e.code == ErrorCode::INVALID).count() > i).await,
            "doc id {id:?} was not refused"
        );
    }
    // Ids with slashes and dots that are not whole segments stay fine.
    let mut ok = writer(&relay, 2, "org/team.v2/..x").await;
    ok.increment("org/team.v2/..x", "n", 1).await;
    assert!(ok.pump_until(T, |c| c.all_acked("org/team.v2/..x")).await);
}

#[tokio::test]
async fn a_write_that_skips_the_writers_own_sequence_numbers_is_refused() {
    let dir = tempdir("limits-gap");
    let relay = Relay::start(&dir, &[]);
    let mut c = writer(&relay, 7, "doc").await;
    // Five writes made locally; only the last one reaches the relay.
    let mut last = None;
    for _ in 0..5 {
        last = Some(c.doc("doc").increment("n", 1).unwrap());
    }
    push(&mut c, "doc", vec![last.unwrap()]).await;
    assert!(c.pump_until(T, |c| refused(c, ErrorCode::INVALID, "doc")).await);
    let e = c.errors.iter().find(|e| e.doc.as_deref() == Some("doc")).unwrap();
    assert!(e.message.contains("1..=4"), "{}", e.message);
    assert!(c.acked.get("doc").is_none_or(|v| v.get(ReplicaId(7)) == 0), "a refused write was acknowledged");
    // Sent in order, they are all applied.
    let all: Vec<Delta> =
        c.doc("doc").deltas_since(&VersionVector::new()).unwrap().into_iter().cloned().collect();
    push(&mut c, "doc", all).await;
    assert!(c.pump_until(T, |c| c.acked.get("doc").is_some_and(|v| v.get(ReplicaId(7)) == 5)).await);
}

#[tokio::test]
async fn values_sets_and_documents_over_their_limits_are_refused_as_too_large() {
    let dir = tempdir("limits-size");
    let limits = "max_value_bytes = 1024\nmax_set_elements = 100\nmax_doc_bytes = 20000";
    let relay = Relay::start(&dir, &["--config", &config(&dir, limits)]);
    let mut c = writer(&relay, 1, "doc").await;

    let d = c.doc("doc").set_register("big", Value::Str("x".repeat(2000)), 1_000).unwrap();
    push(&mut c, "doc", vec![d]).await;
    assert!(c.pump_until(T, |c| refused(c, ErrorCode::TOO_LARGE, "doc")).await);

    // A set: 100 elements fit, the 101st does not; the whole frame of 101 is refused.
    let mut sets = Client::new(2);
    sets.open("set").await;
    sets.connect(relay.addr, None).await;
    assert!(sets.pump_until(T, |c| c.synced.contains("set")).await);
    let mut a = sets.doc("set").clone();
    let adds: Vec<Delta> = (0..100).map(|i| a.set_add("s", Value::Int(i)).unwrap()).collect();
    let mut b = a.clone();
    let grow = b.set_add("s", Value::Int(100)).unwrap();
    let readd = a.set_add("s", Value::Int(5)).unwrap();
    let mut frame = adds.clone();
    frame.push(grow);
    push(&mut sets, "set", frame).await;
    assert!(sets.pump_until(T, |c| refused(c, ErrorCode::TOO_LARGE, "set")).await);
    assert!(fresh_view(&relay, "set").await.get("s").is_none(), "part of a refused frame was applied");
    push(&mut sets, "set", adds).await;
    assert!(sets.pump_until(T, |c| c.acked.get("set").is_some_and(|v| v.get(ReplicaId(2)) == 100)).await);
    assert_eq!(fresh_view(&relay, "set").await.set_values("s").len(), 100);
    // Re-adding an element the set holds is no growth.
    push(&mut sets, "set", vec![readd]).await;
    assert!(sets.pump_until(T, |c| c.acked.get("set").is_some_and(|v| v.get(ReplicaId(2)) == 101)).await);

    // A document: registers of 900 bytes each until the next would pass 20,000 bytes.
    let mut docs = Client::new(3);
    docs.open("d").await;
    docs.connect(relay.addr, None).await;
    assert!(docs.pump_until(T, |c| c.synced.contains("d")).await);
    let mut accepted = 0u64;
    for i in 0..40 {
        let d = docs.doc("d").set_register(&format!("k{i}"), Value::Str("y".repeat(900)), 1_000).unwrap();
        push(&mut docs, "d", vec![d]).await;
        let seq = i + 1;
        assert!(
            docs.pump_until(T, |c| {
                refused(c, ErrorCode::TOO_LARGE, "d")
                    || c.acked.get("d").is_some_and(|v| v.get(ReplicaId(3)) == seq)
            })
            .await
        );
        if refused(&docs, ErrorCode::TOO_LARGE, "d") {
            break;
        }
        accepted = seq;
    }
    assert!((15..=22).contains(&accepted), "{accepted} registers of 900 B fit under 20,000 B");
    assert_eq!(fresh_view(&relay, "d").await.len() as u64, accepted);
    // The relay still serves the first writer.
    c.increment("doc", "n", 1).await;
    // Its own refused register left a gap in its sequence: the next write is refused too,
    // with a typed error, never acknowledged.
    assert!(
        c.pump_until(T, |c| c.errors.iter().filter(|e| e.doc.as_deref() == Some("doc")).count() >= 2).await
    );
}

#[test]
fn a_limits_section_with_zero_or_too_long_ids_is_a_config_error() {
    let dir = tempdir("limits-config");
    for bad in ["max_doc_bytes = 0", "max_set_elements = 0", "max_value_bytes = 0", "max_doc_id_bytes = 513"]
    {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_concord-relay"))
            .args(["--config", &config(&dir, bad)])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        let field = bad.split(' ').next().unwrap();
        assert!(err.contains(&format!("limits.{field}")), "{bad}: {err}");
    }
}
