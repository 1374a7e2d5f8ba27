//! The compact `Deltas` body (core/src/sync/batch.rs): any batch a set of replicas can
//! produce round-trips exactly, whatever its keys, replicas, clocks and payload shapes; and
//! any mutation of a valid frame decodes to an error or to a batch that round-trips again.

use concord_core::sync::msg::Deltas;
use concord_core::sync::Msg;
use concord_core::{Delta, Document, ReplicaId, Value};
use proptest::collection::vec;
use proptest::prelude::*;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(1000);
    ProptestConfig::with_cases(cases)
}

/// Keys that exercise the key table: shared prefixes shorter and longer than the 63-byte
/// sharing limit, suffixes around the 15-byte escape, multi-byte UTF-8, the empty key.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-c]{1,3}",
        "k[0-9]{4}",
        "[a-z/]{10,20}",
        "é[ü€a]{0,4}",
        (0usize..3, "[a-b]{0,20}").prop_map(|(n, s)| format!("{}{s}", "p".repeat(60 + n))),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<i64>().prop_map(Value::Int),
        "[a-z]{0,6}".prop_map(Value::from),
        any::<bool>().prop_map(Value::Bool),
        vec(any::<i64>().prop_map(Value::Int), 0..3).prop_map(Value::Array),
    ]
}

#[derive(Clone, Debug)]
enum Op {
    Inc(u64),
    Pn(i64),
    Reg(Value, u64),
    Add(Value),
    Remove(Value),
    /// Merge the other replica's document into this one (so later set deltas retire
    /// foreign dots, and register clocks jump).
    Merge,
}

fn op() -> impl Strategy<Value = (usize, String, Op)> {
    let op = prop_oneof![
        (0u64..1 << 40).prop_map(Op::Inc),
        any::<i64>().prop_map(|n| Op::Pn(n / 2)),
        (value(), prop_oneof![0u64..1000, 1_700_000_000_000u64..1_700_000_001_000, Just(u64::MAX >> 1)])
            .prop_map(|(v, t)| Op::Reg(v, t)),
        value().prop_map(Op::Add),
        value().prop_map(Op::Remove),
        Just(Op::Merge),
    ];
    (0usize..3, key(), op)
}

/// Runs `ops` on three replicas (each key keeps the type of its first write: ops of another
/// type on it are skipped) and returns every delta made, in the order made.
fn history(ops: &[(usize, String, Op)]) -> Vec<Delta> {
    let ids = [ReplicaId(1), ReplicaId(0xdead_beef), ReplicaId(u64::MAX)];
    let mut docs: Vec<Document> = ids.iter().map(|r| Document::new(*r)).collect();
    let mut out = Vec::new();
    for (i, key, op) in ops {
        let doc = &mut docs[*i];
        let d = match op {
            Op::Inc(n) => doc.increment(key, *n).ok(),
            Op::Pn(n) => doc.pn_add(key, *n).ok(),
            Op::Reg(v, t) => doc.set_register(key, v.clone(), *t).ok(),
            Op::Add(v) => doc.set_add(key, v.clone()).ok(),
            Op::Remove(v) => doc.set_remove(key, v).ok().flatten(),
            Op::Merge => {
                let other = docs[(i + 1) % 3].clone();
                let _ = docs[*i].merge_state(&other.all_fields(), other.context(), other.version());
                None
            }
        };
        out.extend(d);
    }
    out
}

fn round_trip(m: &Msg) -> Msg {
    let bytes = m.encode();
    match Msg::decode(&bytes) {
        Ok(back) => back,
        Err(e) => panic!("a valid batch failed to decode: {e}"),
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn every_batch_round_trips(ops in vec(op(), 0..60), split in any::<prop::sample::Index>()) {
        let all = history(&ops);
        // The whole history, and a suffix of it (sequence numbers not starting at 1).
        let from = if all.is_empty() { 0 } else { split.index(all.len()) };
        for deltas in [all.clone(), all[from..].to_vec()] {
            let m = Msg::Deltas(Deltas { doc: "doc/é".into(), deltas });
            prop_assert_eq!(round_trip(&m), m);
        }
    }

    #[test]
    fn a_mutated_batch_decodes_to_an_error_or_a_batch_that_round_trips(
        ops in vec(op(), 1..30),
        edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let m = Msg::Deltas(Deltas { doc: "d".into(), deltas: history(&ops) });
        let mut bytes = m.encode();
        for (at, b) in &edits {
            let i = at.index(bytes.len());
            if i > 0 {
                bytes[i] = *b;
            }
        }
        for b in [&bytes[..], &bytes[..cut.index(bytes.len()).max(1)]] {
            if let Ok(decoded) = Msg::decode(b) {
                prop_assert_eq!(round_trip(&decoded), decoded);
            }
        }
    }
}

#[test]
fn a_batch_of_one_replicas_consecutive_writes_costs_a_few_bytes_per_delta() {
    let mut doc = Document::new(ReplicaId(0x1234_5678_9abc));
    let mut deltas = Vec::new();
    for i in 0..100u64 {
        let k = format!("k{:04}", (i * 97) % 10_000);
        deltas.push(match i % 3 {
            0 => doc.increment(&k, 1 + i % 5).unwrap(),
            1 => doc.set_register(&k, Value::Int(i as i64), 1_700_000_000_000 + i).unwrap(),
            _ => doc.set_add(&k, Value::from(format!("t{i}"))).unwrap(),
        });
    }
    let bytes = Msg::Deltas(Deltas { doc: "board".into(), deltas }).encode();
    // Per delta: a head byte, a key index, the payload (a total; a clock gap and a value;
    // an element) and the key's share of the front-coded table.
    assert!(bytes.len() < 100 * 10, "{} bytes for 100 deltas", bytes.len());
}
