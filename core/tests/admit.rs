//! What a relay admits from a client ([`concord_core::admit`]): genuine writes under the
//! default limits always pass; each bound and each malformed write is refused whole.

use concord_core::admit::{admit, check_doc_id, Limits, Refusal};
use concord_core::value::Value;
use concord_core::{Delta, Document, ReplicaId};
use proptest::prelude::*;

const W: ReplicaId = ReplicaId(7);

/// One local write of a random kind.
#[derive(Clone, Debug)]
enum Op {
    Inc(u8),
    Reg(u8, i64),
    Add(u8, i64),
    Remove(u8, i64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..4).prop_map(Op::Inc),
        (0u8..4, any::<i64>()).prop_map(|(k, v)| Op::Reg(k, v)),
        (0u8..4, 0i64..50).prop_map(|(k, v)| Op::Add(k, v)),
        (0u8..4, 0i64..50).prop_map(|(k, v)| Op::Remove(k, v)),
    ]
}

fn apply(doc: &mut Document, op: &Op) -> Option<Delta> {
    match op {
        Op::Inc(k) => doc.increment(&format!("c{k}"), 1).ok(),
        Op::Reg(k, v) => doc.set_register(&format!("r{k}"), Value::Int(*v), 1_000).ok(),
        Op::Add(k, v) => doc.set_add(&format!("s{k}"), Value::Int(*v)).ok(),
        Op::Remove(k, v) => doc.set_remove(&format!("s{k}"), &Value::Int(*v)).ok().flatten(),
    }
}

proptest! {
    /// A writer's own writes, sent in order in frames of any size, are all admitted, and
    /// the relay's copy ends equal to the writer's.
    #[test]
    fn in_order_writes_are_always_admitted(ops in prop::collection::vec(op(), 1..120), frame in 1usize..20) {
        let mut local = Document::new(W);
        let deltas: Vec<Delta> = ops.iter().filter_map(|o| apply(&mut local, o)).collect();
        let mut relay = Document::new(ReplicaId(1));
        let mut bytes = 0;
        for chunk in deltas.chunks(frame) {
            let added = admit(Some(&relay), bytes, chunk, Some(W), false, &Limits::default());
            prop_assert!(added.is_ok(), "{:?}", added);
            bytes += added.unwrap();
            for d in chunk {
                relay.apply(d.clone()).unwrap();
            }
        }
        prop_assert_eq!(relay.version(), local.version());
        prop_assert_eq!(bytes > 0, !deltas.is_empty());
    }

    /// Leaving out any one of a writer's own writes makes a later one a gap, refused
    /// unless a catch-up from the writer is running.
    #[test]
    fn a_skipped_own_write_is_a_gap(n in 2usize..30, skip in any::<prop::sample::Index>()) {
        let mut local = Document::new(W);
        let deltas: Vec<Delta> = (0..n).map(|i| local.increment(&format!("k{i}"), 1).unwrap()).collect();
        let skip = skip.index(n - 1);
        let mut frame = deltas.clone();
        frame.remove(skip);
        let refused = admit(None, 0, &frame, Some(W), false, &Limits::default());
        let is_gap = matches!(refused, Err(Refusal::Gap { .. }));
        prop_assert!(is_gap, "{:?}", refused);
        prop_assert!(admit(None, 0, &frame, Some(W), true, &Limits::default()).is_ok());
        // Another replica's gap is not the writer's to fill: it may come from elsewhere.
        prop_assert!(admit(None, 0, &frame, Some(ReplicaId(8)), false, &Limits::default()).is_ok());
    }
}

#[test]
fn doc_ids() {
    for ok in ["a", "org/team/doc", "..x", "x..", "a.b", "ünïcödé", "a b"] {
        assert_eq!(check_doc_id(ok, 512), Ok(()), "{ok:?}");
    }
    for bad in ["", "a\0", "\n", "a\u{7f}", "..", ".", "../x", "x/..", "a/./b", "a\u{85}"] {
        assert!(matches!(check_doc_id(bad, 512), Err(Refusal::DocId(_))), "{bad:?}");
    }
    assert!(check_doc_id(&"x".repeat(512), 512).is_ok());
    assert!(check_doc_id(&"x".repeat(513), 512).is_err());
}

#[test]
fn non_finite_numbers_anywhere_in_a_value_are_refused() {
    let mut map = concord_core::value::Map::new();
    map.insert("deep".into(), Value::Array(vec![Value::Float(f64::INFINITY)]));
    for v in [Value::Float(f64::NAN), Value::Float(f64::NEG_INFINITY), Value::Object(map)] {
        let mut d = Document::new(W);
        let reg = d.set_register("r", v.clone(), 1).unwrap();
        let add = d.set_add("s", v).unwrap();
        for delta in [reg, add] {
            let r = admit(None, 0, std::slice::from_ref(&delta), None, false, &Limits::default());
            assert!(matches!(r, Err(Refusal::NotFinite { .. })), "{r:?}");
        }
    }
    let mut d = Document::new(W);
    let ok = d.set_register("r", Value::Float(1.5e300), 1).unwrap();
    assert!(admit(None, 0, &[ok], None, false, &Limits::default()).is_ok());
}

#[test]
fn bounds_count_the_whole_frame_and_what_the_document_holds() {
    let limits =
        Limits { max_set_elements: 10, max_value_bytes: 100, max_doc_bytes: 2_000, ..Limits::default() };
    let mut local = Document::new(W);
    let adds: Vec<Delta> = (0..11).map(|i| local.set_add("s", Value::Int(i)).unwrap()).collect();
    let r = admit(None, 0, &adds, Some(W), false, &limits);
    assert!(matches!(r, Err(Refusal::SetTooLarge { elements: 11, max: 10, .. })), "{r:?}");
    assert!(r.unwrap_err().too_large());
    // Ten in the document, then one more in a later frame.
    let mut relay = Document::new(ReplicaId(1));
    let bytes = admit(Some(&relay), 0, &adds[..10], Some(W), false, &limits).unwrap();
    for d in &adds[..10] {
        relay.apply(d.clone()).unwrap();
    }
    let r = admit(Some(&relay), bytes, &adds[10..], Some(W), false, &limits);
    assert!(matches!(r, Err(Refusal::SetTooLarge { elements: 11, .. })), "{r:?}");
    // Re-adding a held element is no growth.
    let mut other = Document::new(ReplicaId(8));
    let again = other.set_add("s", Value::Int(3)).unwrap();
    assert!(admit(Some(&relay), bytes, &[again], Some(ReplicaId(8)), false, &limits).is_ok());

    let mut d = Document::new(W);
    let big = d.set_register("r", Value::Str("x".repeat(101)), 1).unwrap();
    let r = admit(None, 0, &[big], None, false, &limits);
    assert!(matches!(r, Err(Refusal::ValueTooLarge { max: 100, .. })), "{r:?}");

    let mut d = Document::new(W);
    let regs: Vec<Delta> =
        (0..30).map(|i| d.set_register(&format!("k{i}"), Value::Str("y".repeat(90)), 1).unwrap()).collect();
    let r = admit(None, 0, &regs, Some(W), false, &limits);
    assert!(matches!(r, Err(Refusal::DocTooLarge { max: 2_000, .. })), "{r:?}");
    assert!(admit(None, 0, &regs[..10], Some(W), false, &limits).is_ok());
    assert!(admit(None, 1_500, &regs[..10], Some(W), false, &limits).is_err());
}

#[test]
fn replica_zero_is_refused() {
    let d = Document::new(ReplicaId(0)).increment("n", 1).unwrap();
    assert_eq!(admit(None, 0, &[d], Some(W), false, &Limits::default()), Err(Refusal::ReplicaZero));
}
