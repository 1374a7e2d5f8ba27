//! Damaged records in a real database file: the relay starts, serves every other
//! document, refuses the damaged ones with a typed error (and logs them), and leaves the
//! damaged records in place.

mod common;

use std::time::Duration;

use common::{tempdir, Client, Relay};
use concord_core::sync::msg::Deltas;
use concord_core::sync::ErrorCode;
use concord_core::sync::Msg;
use redb::{Database, TableDefinition};

const T: Duration = Duration::from_secs(20);

// The relay's tables (see `storage.rs`), opened here as a damaged disk would leave them.
const DOCUMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("documents");
const DELTA_RUNS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("delta_runs");

/// Damaged records: a snapshot that is not one, a run whose framing is cut off, and a
/// well-framed run whose delta is garbage.
const DAMAGE: [(&str, Option<u64>, &[u8]); 3] = [
    ("bad-snapshot", None, b"not a snapshot"),
    ("bad-run", Some(1000), &[0xff, 0xff]),
    ("bad-delta", Some(1000), &[3, 0xde, 0xad, 0x00]),
];

fn damaged_records(db: &Database) -> Vec<Vec<u8>> {
    let txn = db.begin_read().unwrap();
    let docs = txn.open_table(DOCUMENTS).unwrap();
    let runs = txn.open_table(DELTA_RUNS).unwrap();
    DAMAGE
        .iter()
        .map(|(doc, last, _)| match last {
            None => docs.get(*doc).unwrap().expect("snapshot row").value().to_vec(),
            Some(last) => runs.get((*doc, *last)).unwrap().expect("run row").value().to_vec(),
        })
        .collect()
}

#[tokio::test]
async fn a_relay_with_damaged_records_starts_serves_the_rest_and_refuses_the_damaged_documents() {
    let dir = tempdir("corrupt");
    let docs = ["good", "bad-snapshot", "bad-run", "bad-delta"];
    {
        let relay = Relay::start(&dir, &[]);
        let mut w = Client::new(1);
        for d in docs {
            w.open(d).await;
        }
        w.connect(relay.addr, None).await;
        for d in docs {
            assert!(w.pump_until(T, |c| c.synced.contains(d)).await);
            for _ in 0..3 {
                w.increment(d, "n", 1).await;
            }
        }
        assert!(w.pump_until(T, |c| docs.iter().all(|d| c.all_acked(d))).await);
    } // killed

    let db = Database::create(dir.join(concord_relay::storage::DB_FILE)).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut snapshots = txn.open_table(DOCUMENTS).unwrap();
        let mut runs = txn.open_table(DELTA_RUNS).unwrap();
        for (doc, last, bytes) in DAMAGE {
            match last {
                None => drop(snapshots.insert(doc, bytes).unwrap()),
                Some(last) => drop(runs.insert((doc, last), bytes).unwrap()),
            }
        }
    }
    txn.commit().unwrap();
    drop(db);

    let log = dir.join("relay.log");
    let mut relay = Relay::start_logged(&dir, &[], &log);
    let mut r = Client::new(2);
    for d in docs {
        r.open(d).await;
    }
    r.connect(relay.addr, None).await;
    // The undamaged document is served, and takes writes.
    assert!(r.pump_until(T, |c| c.synced.contains("good")).await);
    assert_eq!(r.docs["good"].counter("n"), 3);
    r.increment("good", "n", 1).await;
    assert!(r.pump_until(T, |c| c.all_acked("good")).await);
    // Each damaged one is refused with a typed error naming it: no sync, no ack.
    let bad = &docs[1..];
    assert!(
        r.pump_until(T, |c| bad.iter().all(|d| c.errors.iter().any(|e| e.doc.as_deref() == Some(d)))).await,
        "errors {:?}",
        r.errors
    );
    for e in &r.errors {
        assert_eq!(e.code, ErrorCode::INTERNAL, "{e:?}");
        assert!(e.message.contains("unreadable"), "{e:?}");
    }
    // A write to a damaged document is refused, not acked (nor stored over it). Sent
    // raw: the relay never subscribed back, so the session would not send it.
    let seen = r.errors.len();
    let delta = r.doc("bad-snapshot").increment("n", 1).unwrap();
    r.send(vec![Msg::Deltas(Deltas { doc: "bad-snapshot".into(), deltas: vec![delta] })]).await;
    assert!(
        r.pump_until(T, |c| c.errors[seen..].iter().any(|e| e.doc.as_deref() == Some("bad-snapshot"))).await
    );
    for d in bad {
        assert!(!r.synced.contains(*d), "{d} was served");
        assert!(!r.acked.contains_key(*d), "{d} was acked");
    }
    // Still serving: a second reader of the good document.
    let mut r2 = Client::new(3);
    r2.open("good").await;
    r2.connect(relay.addr, None).await;
    assert!(r2.pump_until(T, |c| c.synced.contains("good") && c.docs["good"].counter("n") == 4).await);
    relay.kill9();

    // Logged, naming each damaged document.
    let text = std::fs::read_to_string(&log).unwrap();
    for d in bad {
        assert!(
            text.lines().any(|l| l.contains("unreadable") && l.contains(&format!("{d:?}"))),
            "no log line about {d}:\n{text}"
        );
    }
    // The damaged records are left in place for an operator.
    let db = Database::create(dir.join(concord_relay::storage::DB_FILE)).unwrap();
    let want: Vec<Vec<u8>> = DAMAGE.iter().map(|(_, _, b)| b.to_vec()).collect();
    assert_eq!(damaged_records(&db), want);
}
