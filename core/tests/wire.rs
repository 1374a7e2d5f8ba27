//! The compact `Deltas` body (core/src/sync/batch.rs): any batch a set of replicas can
//! produce decodes to the same dots and keys, applies to the same state, and is exactly
//! what was sent wherever no run of superseding writes was joined (a run arrives as one
//! delta standing for its dots); any mutation of a valid
//! frame decodes to an error or to a batch whose encoding is stable.

use concord_core::sync::msg::Deltas;
use concord_core::sync::Msg;
use concord_core::{Crdt, Delta, Document, Dot, Field, OrSet, ReplicaId, Value};
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
                let _ = docs[*i].merge_state(other.all_fields(), other.context(), other.version());
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

fn deltas(m: &Msg) -> &[Delta] {
    match m {
        Msg::Deltas(d) => &d.deltas,
        other => panic!("not a Deltas message: {other:?}"),
    }
}

/// Applies `ds` in order to a fresh replica that has seen nothing.
fn applied(ds: &[Delta]) -> Document {
    let mut doc = Document::new(ReplicaId(0x5555));
    for d in ds {
        doc.apply(d.clone()).expect("valid delta");
    }
    doc
}

/// Every dot the deltas stand for (a run stands for several), with its key.
fn dots(ds: &[Delta]) -> Vec<(Dot, String)> {
    ds.iter()
        .flat_map(|d| (d.first()..=d.dot.seq).map(move |q| (Dot::new(d.dot.replica, q), d.key.clone())))
        .collect()
}

/// Whether `d` could have been joined into a run: a counter or register write by the
/// dot's own replica.
fn joinable(d: &Delta) -> bool {
    !matches!(d.payload, Field::Set(_))
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn every_batch_decodes_to_the_same_dots_and_the_same_state(
        ops in vec(op(), 0..60),
        split in any::<prop::sample::Index>(),
    ) {
        let all = history(&ops);
        // The whole history, and a suffix of it (sequence numbers not starting at 1).
        let from = if all.is_empty() { 0 } else { split.index(all.len()) };
        for sent in [all.clone(), all[from..].to_vec()] {
            let m = Msg::Deltas(Deltas { doc: "doc/é".into(), deltas: sent.clone() });
            let back = round_trip(&m);
            let got = deltas(&back);
            prop_assert_eq!(dots(got), dots(&sent));
            for g in got {
                // A delta arrives as sent, or as a run standing for consecutive writes of
                // one replica to one key, with the last one's payload.
                let s = sent.iter().find(|s| s.dot == g.dot).expect("a sent dot");
                if g.is_run() {
                    prop_assert!(joinable(s));
                    prop_assert_eq!(&g.payload, &s.payload);
                } else {
                    prop_assert_eq!(g, s);
                }
            }
            prop_assert!(applied(got) == applied(&sent), "same state after applying");
        }
    }

    #[test]
    fn a_mutated_batch_decodes_to_an_error_or_a_batch_whose_encoding_is_stable(
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
                let again = round_trip(&decoded);
                prop_assert_eq!(again.encode(), decoded.encode());
            }
        }
    }
}

#[test]
fn a_thousand_clicks_on_one_counter_travel_and_arrive_as_one_run() {
    let mut doc = Document::new(ReplicaId(0xfeed));
    let mut sent: Vec<Delta> = (0..1000).map(|_| doc.increment("likes", 1).unwrap()).collect();
    sent.extend(
        (0..10).map(|i| doc.set_register("title", Value::Int(i), 1_700_000_000_000 + i as u64).unwrap()),
    );
    let m = Msg::Deltas(Deltas { doc: "d".into(), deltas: sent.clone() });
    let bytes = m.encode();
    assert!(bytes.len() < 40, "{} bytes", bytes.len());
    let back = round_trip(&m);
    let got = deltas(&back);
    let spans: Vec<(u64, u64)> = got.iter().map(|d| (d.first(), d.dot.seq)).collect();
    assert_eq!(spans, [(1, 1000), (1001, 1010)]);
    let peer = applied(got);
    assert_eq!(peer.counter("likes"), 1000);
    assert_eq!(peer.register("title").map(|(v, _)| v), Some(&Value::Int(9)));
    assert!(peer == applied(&sent));
    assert_eq!(peer.version(), doc.version());
}

#[test]
fn a_long_run_is_one_delta_and_runs_of_sets_or_past_the_last_sequence_are_refused() {
    // doc "", one replica, one key "k", one item: count 5, RUN with 10,000 extra dots.
    let body = [0x00, 0x01, 0x07, 0x01, 0x01, b'k', 0x01, 0x01 | 0x08 | 0x20, 0x00, 0x90, 0x4e, 0x05];
    let mut frame = vec![concord_core::sync::msg::tag::DELTAS];
    frame.extend(body);
    let m = Msg::decode(&frame).unwrap();
    let got = deltas(&m);
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].first(), got[0].dot.seq), (1, 10_001));
    let peer = applied(got);
    assert_eq!((peer.counter("k"), peer.version().get(ReplicaId(7))), (5, 10_001));
    // The same item as a set add: refused.
    let mut set = frame.clone();
    set[8] = 0x05 | 0x08 | 0x20;
    set.truncate(set.len() - 1);
    set.extend([0x02, 0x02]); // the element: Int 1
    let err = Msg::decode(&set).unwrap_err().to_string();
    assert!(err.contains("runs"), "{err}");
    // A run whose whole field is a set (a forged run the encoder writes as it is): refused.
    let mut set = OrSet::default();
    for (seq, v) in [(1, 1), (2, 2)] {
        let d = set.add(Dot::new(ReplicaId(7), seq), Value::Int(v));
        set.merge(&d);
    }
    let forged = Delta::run(1, Dot::new(ReplicaId(7), 2), "k", Field::Set(set));
    let bytes = Msg::Deltas(Deltas { doc: String::new(), deltas: vec![forged] }).encode();
    let err = Msg::decode(&bytes).unwrap_err().to_string();
    assert!(err.contains("runs"), "{err}");
    // A run past u64::MAX: refused.
    let mut far = vec![concord_core::sync::msg::tag::DELTAS];
    far.extend([0x00, 0x01, 0x07, 0x01, 0x01, b'k', 0x01, 0x01 | 0x08 | 0x20, 0x00]);
    far.extend([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0x05]);
    let err = Msg::decode(&far).unwrap_err().to_string();
    assert!(err.contains("last sequence"), "{err}");
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

// ---- document-set messages (relay to relay) ----

use concord_core::docset::{DocSet, DocSetDiff};
use concord_core::sync::msg::{
    tag, DocSetAnswerMsg, DocSetQueryMsg, FrameError, MAX_DOCSET_ITEMS, MAX_DOCSET_PARTS, MAX_DOCSET_QUERY,
};

/// Valid document-set frames: the first queries of a comparison and their answers.
fn docset_frames(n: u64) -> Vec<Vec<u8>> {
    let mut there = DocSet::new();
    for i in 0..n {
        there.upsert(&format!("doc-{i}"), &concord_core::VersionVector::from_iter([(ReplicaId(1), i + 1)]));
    }
    let here = DocSet::new();
    let (mut diff, mut q) = DocSetDiff::start();
    let mut out = Vec::new();
    for exchange in 0..3 {
        out.push(Msg::DocSetQuery(DocSetQueryMsg { exchange, query: q.clone() }).encode());
        let answer = there.answer(&q);
        out.extend(
            DocSetAnswerMsg::frames(exchange, answer.clone(), 300)
                .unwrap_or_default()
                .iter()
                .map(Msg::encode),
        );
        q = diff.step(&here, answer).expect("a valid answer");
    }
    out
}

/// A decoded document-set message is within its bounds and re-encodes stably.
fn docset_decodes_sanely(bytes: &[u8]) -> Result<(), TestCaseError> {
    match Msg::decode(bytes) {
        Ok(m) => {
            match &m {
                Msg::DocSetQuery(q) => prop_assert!(q.query.len() <= MAX_DOCSET_QUERY),
                Msg::DocSetAnswer(a) => {
                    prop_assert!(a.part < a.parts && a.parts <= MAX_DOCSET_PARTS);
                    prop_assert!(a.answer.items() <= MAX_DOCSET_ITEMS);
                }
                _ => {}
            }
            let again = Msg::decode(&m.encode());
            prop_assert_eq!(again.as_ref(), Ok(&m));
        }
        Err(FrameError::Empty | FrameError::UnknownTag(_) | FrameError::Malformed { .. }) => {}
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn random_document_set_frames_decode_to_a_typed_error_or_a_bounded_message(
        t in prop_oneof![Just(tag::DOCSET_QUERY), Just(tag::DOCSET_ANSWER)],
        body in vec(any::<u8>(), 0..300),
    ) {
        let mut bytes = vec![t];
        bytes.extend(body);
        docset_decodes_sanely(&bytes)?;
    }

    #[test]
    fn mutated_document_set_frames_decode_to_a_typed_error_or_a_bounded_message(
        docs in 0u64..400,
        which in any::<prop::sample::Index>(),
        edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let frames = docset_frames(docs);
        let mut bytes = which.get(&frames).clone();
        for (at, b) in &edits {
            let i = at.index(bytes.len());
            if i > 0 {
                bytes[i] = *b;
            }
        }
        docset_decodes_sanely(&bytes)?;
        docset_decodes_sanely(&bytes[..cut.index(bytes.len())])?;
    }
}
