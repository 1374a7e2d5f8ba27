//! Document bookkeeping: buffering of out-of-order deltas, the bounded delta log, input
//! validation, and Merkle catch-up, which must reach the same state as delta sync.

use concord_core::document::Applied;
use concord_core::merkle::NodeId;
use concord_core::orset::{Dots, Entries};
use concord_core::{
    CausalContext, Delta, DocConfig, DocError, Document, Dot, Field, GCounter, OrSet, ReplicaId, Value,
    VersionVector,
};
use proptest::collection::vec;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(1000);
    ProptestConfig::with_cases(cases)
}

const A: ReplicaId = ReplicaId(0xA);
const B: ReplicaId = ReplicaId(0xB);
const C: ReplicaId = ReplicaId(0xC);

/// What `to` lacks of `from`, from `from`'s log.
fn lacking(from: &Document, to: &Document) -> Vec<Delta> {
    from.deltas_since(to.version()).expect("the log reaches back").into_iter().cloned().collect()
}

fn likes(doc: &mut Document, n: u64) -> Delta {
    doc.increment("likes", n).unwrap()
}

/// A's document after `clicks` increments of "likes" by `by`, and its log's one run.
fn clicked(clicks: usize, by: u64) -> (Document, Delta) {
    let mut a = Document::new(A);
    for _ in 0..clicks {
        likes(&mut a, by);
    }
    let log = lacking(&a, &Document::new(B));
    assert_eq!(log.len(), 1, "one run: {log:?}");
    (a, log[0].clone())
}

#[test]
fn deltas_arriving_out_of_order_are_buffered_until_the_gap_fills() {
    let mut a = Document::new(A);
    let d: Vec<Delta> = (1..=4).map(|n| likes(&mut a, n)).collect();
    let mut b = Document::new(B);
    assert_eq!(b.apply(d[2].clone()), Ok(Applied::Buffered));
    assert_eq!(b.apply(d[3].clone()), Ok(Applied::Buffered));
    assert_eq!(b.apply(d[3].clone()), Ok(Applied::Buffered), "buffered once");
    assert_eq!((b.pending_len(), b.counter("likes")), (2, 0), "nothing shows before the gap fills");
    assert_eq!(b.version().get(A), 0);
    assert_eq!(b.apply(d[1].clone()), Ok(Applied::Buffered));
    assert_eq!(b.apply(d[0].clone()), Ok(Applied::Applied(3)));
    assert_eq!((b.pending_len(), b.counter("likes")), (0, 10));
    assert_eq!(b, a);
}

#[test]
fn applying_a_delta_twice_is_a_no_op() {
    let mut a = Document::new(A);
    let d = a.set_add("tags", Value::from("x")).unwrap();
    let mut b = Document::new(B);
    b.apply(d.clone()).unwrap();
    let once = b.encode();
    assert_eq!(b.apply(d), Ok(Applied::Duplicate));
    assert_eq!(b.encode(), once);
}

#[test]
fn a_full_buffer_drops_early_deltas_and_a_later_sync_recovers_them() {
    let mut a = Document::new(A);
    let d: Vec<Delta> = (1..=5).map(|n| likes(&mut a, n)).collect();
    let mut b = Document::with_config(B, DocConfig { log_capacity: 16, pending_capacity: 2 });
    assert_eq!(b.apply(d[4].clone()), Ok(Applied::Buffered));
    assert_eq!(b.apply(d[3].clone()), Ok(Applied::Buffered));
    assert_eq!(b.apply(d[2].clone()), Ok(Applied::Dropped));
    assert_eq!(b.pending_len(), 2);
    for missing in lacking(&a, &b) {
        b.apply(missing).unwrap();
    }
    assert_eq!(b, a);
    assert_eq!(b.pending_len(), 0);
}

#[test]
fn deltas_since_answers_exactly_what_the_peer_lacks_in_sequence_order() {
    let (mut a, mut b) = (Document::new(A), Document::new(B));
    let from_a: Vec<Delta> = (1..=3).map(|n| likes(&mut a, n)).collect();
    let from_b = b.set_add("tags", Value::Int(1)).unwrap();
    a.apply(from_b.clone()).unwrap();
    let peer = VersionVector::from_iter([(A, 1)]);
    // A's three increments of one counter are one run in the log (1..=3).
    let got: Vec<(u64, Dot)> = a.deltas_since(&peer).unwrap().iter().map(|d| (d.first(), d.dot)).collect();
    assert_eq!(got, [(1, Dot::new(A, 3)), (1, Dot::new(B, 1))]);
    assert!(a.deltas_since(a.version()).unwrap().is_empty());
    let mut c = Document::new(C);
    c.apply(from_a[0].clone()).unwrap();
    for d in a.deltas_since(c.version()).unwrap() {
        assert!(matches!(c.apply(d.clone()), Ok(Applied::Applied(_))));
    }
    assert_eq!(c, a);
}

#[test]
fn a_truncated_log_says_it_cannot_reach_back_instead_of_answering_partly() {
    let mut a = Document::with_config(A, DocConfig { log_capacity: 2, pending_capacity: 16 });
    for n in 1..=5 {
        a.increment(&format!("c{n}"), 1).unwrap(); // other keys: five entries, not one run
    }
    let old = VersionVector::from_iter([(A, 1)]);
    assert!(a.deltas_since(&old).is_none());
    assert!(!a.log_reaches(&old));
    let recent = VersionVector::from_iter([(A, 3)]);
    assert!(a.log_reaches(&recent));
    assert_eq!(a.deltas_since(&recent).unwrap().len(), 2);
}

#[test]
fn a_set_delta_that_adds_with_another_dot_is_rejected_and_changes_nothing() {
    let mut entries: Entries<Value> = Entries::default();
    entries.insert(Value::from("x"), Dots::One(Dot::new(C, 7)));
    let ctx = CausalContext { vv: VersionVector::from_iter([(C, 7)]), cloud: Default::default() };
    let forged = Delta::new(Dot::new(B, 1), "tags", Field::Set(OrSet::from_parts(entries, ctx)));
    let mut a = Document::new(A);
    likes(&mut a, 1);
    let before = a.encode();
    assert!(matches!(a.apply(forged.clone()), Err(DocError::Invalid(_))));
    assert!(Delta::decode(&forged.encode()).is_err());
    assert_eq!(a.encode(), before);
    let zero = Delta::new(Dot::new(B, 0), "likes", Field::Counter(GCounter::default()));
    assert!(matches!(a.apply(zero), Err(DocError::Invalid(_))));
}

#[test]
fn a_full_state_transfer_brings_a_document_level_with_its_peer() {
    let (mut a, mut b) = (Document::new(A), Document::new(B));
    likes(&mut a, 2);
    a.set_add("tags", Value::from("x")).unwrap();
    let rm = a.set_remove("tags", &Value::from("x")).unwrap().unwrap();
    a.set_register("title", Value::from("t"), 10).unwrap();
    b.set_add("tags", Value::from("y")).unwrap();
    b.apply(rm).unwrap(); // buffered: b has not seen a's first deltas
    assert_eq!(b.pending_len(), 1);
    b.merge_state(a.all_fields(), a.context(), a.version()).unwrap();
    assert_eq!(b.pending_len(), 0, "the state covered the buffered delta");
    for d in lacking(&b, &a) {
        a.apply(d).unwrap();
    }
    assert_eq!(a, b);
    assert_eq!(b.set_values("tags"), vec![Value::from("y")]);
}

#[test]
fn a_state_moves_into_the_keys_a_fresh_replica_lacks_and_equals_its_source() {
    let mut a = Document::new(A);
    likes(&mut a, 3);
    a.pn_add("votes", -2).unwrap();
    a.set_register("title", Value::from("t"), 10).unwrap();
    for i in 0..20 {
        a.set_add("tags", Value::from(format!("t{i}"))).unwrap();
    }
    a.set_remove("tags", &Value::from("t7")).unwrap();
    let mut fresh = Document::new(B);
    fresh.merge_state(a.all_fields(), a.context(), a.version()).unwrap();
    assert_eq!(fresh, a);
    // Decoding moves each field in the same way.
    assert_eq!(Document::decode(&a.encode(), DocConfig::default()).unwrap(), a);
    assert_eq!(
        fresh.merkle().node(NodeId::ROOT),
        a.merkle().node(NodeId::ROOT),
        "moved-in keys reach the Merkle tree"
    );
}

#[test]
fn merging_a_whole_document_adopts_it_when_fresh_and_joins_it_otherwise() {
    let mut a = Document::new(A);
    likes(&mut a, 3);
    a.set_add("tags", Value::from("x")).unwrap();
    let (whole, state) = (a.encode(), a.encode_without_log());
    let copy = || Document::decode(&whole, DocConfig::default()).unwrap();

    // Fresh: becomes a's state, but writes as itself, and a takes that write.
    let mut fresh = Document::new(B);
    fresh.merge_document(copy()).unwrap();
    assert_eq!(fresh, a);
    assert_eq!(fresh.replica(), B);
    let mine = likes(&mut fresh, 1);
    assert_eq!(mine.dot, Dot::new(B, 1));
    a.apply(mine).unwrap();
    assert_eq!(a.counter("likes"), 4);

    // Not fresh, and a's log reaches back: joined by deltas, b's own write kept.
    let mut b = Document::new(B);
    b.set_add("tags", Value::from("y")).unwrap();
    b.merge_document(copy()).unwrap();
    assert_eq!(b.counter("likes"), 3);
    assert_eq!(b.set_values("tags"), vec![Value::from("x"), Value::from("y")]);

    // Not fresh, and the copy has no log (a state frame): joined by state.
    let mut c = Document::new(C);
    c.set_add("tags", Value::from("z")).unwrap();
    let bare = Document::decode(&state, DocConfig::default()).unwrap();
    assert!(bare.deltas_since(c.version()).is_none());
    c.merge_document(bare).unwrap();
    assert_eq!((c.counter("likes"), c.version().get(A)), (3, 2));
    assert_eq!(c.set_values("tags"), vec![Value::from("x"), Value::from("z")]);
}

#[test]
fn a_document_is_fresh_only_when_it_knows_nothing_and_keeps_its_own_bounds() {
    let mut a = Document::new(A);
    let x = a.set_add("tags", Value::from("x")).unwrap();
    let y = a.set_add("tags", Value::from("y")).unwrap();
    let copy = || Document::decode(&a.encode(), DocConfig::default()).unwrap();

    // Empty, but with bounds of its own: it takes a's state and keeps its bounds.
    let small = DocConfig { log_capacity: 0, ..DocConfig::default() };
    let mut bounded = Document::with_config(B, small);
    bounded.merge_document(copy()).unwrap();
    assert_eq!(bounded.config(), small);
    assert_eq!((bounded.set_values("tags").len(), bounded.version()), (2, a.version()));

    // No version yet, but its context saw y's dot (and so y's removal): not fresh, and
    // y does not come back.
    let mut knows = Document::new(C);
    knows.merge_state(Vec::new(), &CausalContext::of_dot(y.dot), &VersionVector::new()).unwrap();
    assert!(knows.version().is_empty());
    knows.merge_document(copy()).unwrap();
    assert_eq!(knows.set_values("tags"), vec![Value::from("x")]);
    assert!(knows.context().contains(x.dot) && knows.context().contains(y.dot));
}

#[test]
fn a_set_holding_a_dot_already_seen_is_joined_not_moved_into_a_missing_key() {
    // `b` knows (from a context alone) that a's add was seen and is gone: the element
    // must not come back with a state that still holds it, even for a key `b` lacks.
    let mut a = Document::new(A);
    let add = a.set_add("tags", Value::from("x")).unwrap();
    a.set_add("tags", Value::from("y")).unwrap();
    let mut b = Document::new(B);
    let seen = CausalContext::of_dot(add.dot);
    b.merge_state(Vec::new(), &seen, &VersionVector::from_iter([(A, 1)])).unwrap();
    assert!(b.get("tags").is_none());
    b.merge_state(a.all_fields(), a.context(), a.version()).unwrap();
    assert_eq!(b.set_values("tags"), vec![Value::from("y")]);
}

#[test]
fn a_document_encoded_without_its_log_carries_the_state_and_answers_no_delta_request() {
    let (mut a, mut b) = (Document::new(A), Document::new(B));
    for i in 0..50 {
        likes(&mut a, 1);
        a.set_add("tags", Value::from(format!("t{i}"))).unwrap();
    }
    a.set_remove("tags", &Value::from("t3")).unwrap();
    a.set_register("title", Value::from("t"), 10).unwrap();
    b.set_add("tags", Value::from("mine")).unwrap();

    let (whole, state) = (a.encode(), a.encode_without_log());
    assert!(
        state.len() * 2 < whole.len(),
        "the log is most of this document: {} vs {} B",
        state.len(),
        whole.len()
    );
    let bare = Document::decode(&state, DocConfig::default()).expect("decodes as a document");
    assert_eq!(bare.version(), a.version());
    assert_eq!(bare.context(), a.context());
    assert_eq!(bare.all_fields(), a.all_fields());
    assert!(bare.deltas_since(b.version()).is_none(), "no log: it cannot answer by deltas");
    assert_eq!(bare.deltas_since(a.version()).map(|d| d.len()), Some(0), "but knows the peer is level");
    assert_eq!(bare.pending_len(), 0);

    // A peer merges it as a state transfer and ends level with `a` (plus its own write).
    b.merge_state(bare.all_fields(), bare.context(), bare.version()).unwrap();
    for d in lacking(&b, &a) {
        a.apply(d).unwrap();
    }
    assert_eq!(a.all_fields(), b.all_fields());
    assert_eq!(a.version(), b.version());
    assert_eq!(b.set_values("tags").len(), 50, "49 of a's tags and b's own");
}

// ---- Merkle catch-up ----

/// Key hashes whose leaves differ between `a` and `b`, found by descending only into
/// differing nodes.
fn differing_keys(a: &mut Document, b: &mut Document) -> Vec<u64> {
    let (ta, tb) = (a.merkle().clone(), b.merkle().clone());
    let mut out = BTreeSet::new();
    let mut stack = vec![NodeId::ROOT];
    while let Some(n) = stack.pop() {
        if ta.node(n) == tb.node(n) {
            continue;
        }
        if n.is_bucket() {
            let la: BTreeMap<u64, u64> = a.bucket_leaves(n).into_iter().collect();
            let lb: BTreeMap<u64, u64> = b.bucket_leaves(n).into_iter().collect();
            out.extend(la.keys().chain(lb.keys()).filter(|k| la.get(k) != lb.get(k)));
        } else {
            stack.extend(n.children());
        }
    }
    out.into_iter().collect()
}

/// `to` catches up with `from` by Merkle comparison and a state transfer of the
/// differing keys only; returns how many fields were sent.
fn merkle_catch_up(from: &mut Document, to: &mut Document) -> Result<usize, DocError> {
    let keys = differing_keys(from, to);
    let fields = from.fields_by_hash(&keys);
    let sent = fields.len();
    to.merge_state(fields, from.context(), from.version())?;
    Ok(sent)
}

#[derive(Clone, Debug)]
enum Op {
    Inc(u8, u64),
    Pn(u8, i64),
    Reg(u8, i64, u64),
    Add(u8, u8),
    Remove(u8, u8),
}

/// Keys have fixed types by name: `c*` counters, `p*` pn-counters, `r*` registers, `s*` sets.
fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..4, 1u64..9).prop_map(|(k, n)| Op::Inc(k, n)),
        (0u8..4, -9i64..9).prop_map(|(k, n)| Op::Pn(k, n)),
        (0u8..4, 0i64..9, 0u64..100).prop_map(|(k, v, w)| Op::Reg(k, v, w)),
        (0u8..4, 0u8..4).prop_map(|(k, v)| Op::Add(k, v)),
        (0u8..4, 0u8..4).prop_map(|(k, v)| Op::Remove(k, v)),
    ]
}

fn perform(doc: &mut Document, op: &Op) -> Option<Delta> {
    let r = match op {
        Op::Inc(k, n) => doc.increment(&format!("c{k}"), *n).map(Some),
        Op::Pn(k, n) => doc.pn_add(&format!("p{k}"), *n).map(Some),
        Op::Reg(k, v, w) => doc.set_register(&format!("r{k}"), Value::Int(*v), *w).map(Some),
        Op::Add(k, v) => doc.set_add(&format!("s{k}"), Value::Int((*v).into())).map(Some),
        Op::Remove(k, v) => doc.set_remove(&format!("s{k}"), &Value::Int((*v).into())),
    };
    r.expect("keys have fixed types")
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn merkle_catch_up_reaches_the_same_state_as_delta_sync(
        common in vec(op(), 0..12),
        only_a in vec(op(), 0..12),
        only_b in vec(op(), 0..12),
        received in vec(any::<bool>(), 12),
    ) {
        let (mut a, mut b) = (Document::new(A), Document::new(B));
        let mut sent = Vec::new();
        for op in &common {
            sent.extend(perform(&mut a, op));
        }
        // b has seen some of the common history by delta (maybe with gaps: buffered), the
        // rest only via state.
        for (d, _) in sent.iter().zip(&received).filter(|(_, r)| **r) {
            b.apply(d.clone()).unwrap();
        }
        for op in &only_a {
            sent.extend(perform(&mut a, op));
        }
        let mut from_b = Vec::new();
        for op in &only_b {
            from_b.extend(perform(&mut b, op));
        }
        // What delta sync would reach.
        let mut expected = a.clone();
        for d in &from_b {
            expected.apply(d.clone()).unwrap();
        }

        let to_b = merkle_catch_up(&mut a, &mut b).unwrap();
        let to_a = merkle_catch_up(&mut b, &mut a).unwrap();
        prop_assert_eq!(&a, &b);
        prop_assert_eq!(&a, &expected);
        prop_assert_eq!(a.to_value(), expected.to_value());
        prop_assert_eq!(a.merkle().root(), b.merkle().root());
        prop_assert_eq!(a.merkle().root(), expected.merkle().root());
        prop_assert!(to_b <= a.len() && to_a <= a.len());
        prop_assert!(differing_keys(&mut a, &mut b).is_empty());
        // Delta sync still works afterwards, from either side.
        let next = perform(&mut a, &Op::Inc(0, 1)).unwrap();
        prop_assert!(matches!(b.apply(next), Ok(Applied::Applied(_))));
        prop_assert_eq!(&a, &b);
    }

    #[test]
    fn documents_with_the_same_state_have_the_same_merkle_root_whatever_the_order(
        ops in vec(op(), 0..24),
        seed in any::<u64>(),
    ) {
        let mut a = Document::new(A);
        let deltas: Vec<Delta> = ops.iter().filter_map(|op| perform(&mut a, op)).collect();
        let mut shuffled = deltas.clone();
        let mut rng = seed | 1;
        for i in (1..shuffled.len()).rev() {
            rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            shuffled.swap(i, (rng >> 33) as usize % (i + 1));
        }
        let mut b = Document::new(B);
        for d in shuffled {
            b.apply(d).unwrap();
        }
        prop_assert_eq!(&a, &b);
        prop_assert_eq!(a.merkle().root(), b.merkle().root());
        prop_assert_eq!(a.merkle(), b.merkle());
    }
}

// ---- runs (delta-intervals) ----

/// The dots a batch of deltas stands for.
fn dots_of(ds: &[&Delta]) -> Vec<Dot> {
    ds.iter().flat_map(|d| (d.first()..=d.dot.seq).map(|q| Dot::new(d.dot.replica, q))).collect()
}

#[test]
fn a_counter_written_a_thousand_times_is_one_log_entry_that_catches_up_any_peer() {
    let mut a = Document::new(A);
    let mut all = Vec::new();
    for n in 1..=1000 {
        all.push(likes(&mut a, n % 3));
    }
    // Each write is handed back as itself (what goes to tabs, the relay and the outbox),
    // while the log keeps one run for all of them.
    assert!(all.iter().enumerate().all(|(i, d)| d.first() == i as u64 + 1 && d.dot.seq == i as u64 + 1));
    assert_eq!(all[999].payload, Field::Counter(GCounter::default().increment(A, 1000)));
    let title = a.set_register("title", Value::from("x"), 5).unwrap();
    for _ in 0..10 {
        a.pn_add("score", -1).unwrap();
    }
    a.pn_add("score", 3).unwrap(); // up after down: not subsumed, an entry of its own
    let since = a.deltas_since(&VersionVector::new()).unwrap();
    assert_eq!(since.len(), 4, "one run per key, and the PN-counter's turn: {since:?}");
    assert_eq!(dots_of(&since), (1..=1012).map(|q| Dot::new(A, q)).collect::<Vec<_>>());
    assert_eq!((since[0].first(), since[0].dot.seq), (1, 1000));
    assert_eq!(since[1].dot, title.dot);
    // Peers anywhere inside the run: one delta each, the same state.
    for behind in [0, 1, 499, 999, 1000, 1001] {
        let mut b = Document::new(B);
        for d in all.iter().take(behind) {
            b.apply(d.clone()).unwrap();
        }
        let missing = lacking(&a, &b);
        assert!(missing.len() <= 4);
        for d in missing {
            assert!(matches!(b.apply(d), Ok(Applied::Applied(_))), "behind {behind}");
        }
        assert_eq!(b.to_value(), a.to_value(), "behind {behind}");
        assert_eq!(b.version(), a.version());
        assert_eq!((b.counter("likes"), b.pn_counter("score")), (a.counter("likes"), -7));
        // And b, which applied part of the run one by one, serves the rest as one run too.
        let mut c = Document::new(C);
        for d in lacking(&b, &c) {
            c.apply(d).unwrap();
        }
        assert_eq!(c.to_value(), a.to_value());
    }
}

#[test]
fn a_run_that_reaches_back_into_what_is_known_applies_only_its_new_part() {
    let (_, run) = clicked(10, 1);
    let mut b = Document::new(B);
    let firsts: Vec<Delta> = {
        let mut a2 = Document::new(A);
        (0..4).map(|_| likes(&mut a2, 1)).collect()
    };
    for d in &firsts {
        b.apply(d.clone()).unwrap();
    }
    let mut applied = Vec::new();
    assert_eq!(b.apply_into(run.clone(), &mut applied), Ok(Applied::Applied(0)));
    assert_eq!((applied[0].first(), applied[0].dot.seq), (5, 10), "what b forwards: only what was new");
    assert_eq!(b.counter("likes"), 10);
    assert_eq!(b.apply(run), Ok(Applied::Duplicate));
}

#[test]
fn a_buffered_run_waits_for_its_gap_and_overlapping_runs_drain_in_order() {
    let mut a = Document::new(A);
    let singles: Vec<Delta> = (0..12).map(|_| likes(&mut a, 1)).collect();
    let run = |first: u64, last: u64| {
        let mut d = singles[last as usize - 1].clone();
        d = Delta::run(first, d.dot, d.key.clone(), d.payload.clone());
        d
    };
    let mut b = Document::new(B);
    assert_eq!(b.apply(run(6, 9)), Ok(Applied::Buffered));
    assert_eq!(b.apply(run(4, 12)), Ok(Applied::Buffered));
    assert_eq!(b.apply(run(3, 5)), Ok(Applied::Buffered), "a covered entry, dropped on drain");
    assert_eq!(b.apply(run(8, 12)), Ok(Applied::Buffered), "the same last dot: the longer run is kept");
    assert_eq!(b.pending_len(), 3);
    let mut c = Document::new(C);
    assert_eq!(c.apply(run(8, 12)), Ok(Applied::Buffered));
    assert_eq!(c.apply(run(4, 12)), Ok(Applied::Buffered), "replaces the shorter run of the same end");
    assert_eq!(c.apply(run(1, 3)), Ok(Applied::Applied(1)));
    assert_eq!((c.counter("likes"), c.pending_len()), (12, 0));
    assert_eq!(b.counter("likes"), 0);
    // 1..=2 arrives: 3..=5, then 6..=9, then the rest of 4..=12 (10..=12) apply.
    let mut applied = Vec::new();
    assert_eq!(b.apply_into(run(1, 2), &mut applied), Ok(Applied::Applied(3)));
    let spans: Vec<(u64, u64)> = applied.iter().map(|d| (d.first(), d.dot.seq)).collect();
    assert_eq!(spans, [(1, 2), (3, 5), (6, 9), (10, 12)]);
    assert_eq!((b.counter("likes"), b.pending_len()), (12, 0));
    assert_eq!(b.version(), a.version());
}

#[test]
fn runs_of_sets_and_runs_past_their_dot_are_refused() {
    let mut a = Document::new(A);
    a.set_add("tags", Value::Int(1)).unwrap();
    let add = a.set_add("tags", Value::Int(2)).unwrap();
    let forged = Delta::run(1, add.dot, "tags", add.payload.clone());
    let mut b = Document::new(B);
    assert!(matches!(b.apply(forged), Err(DocError::Invalid(_))));
    let c = likes(&mut a, 1);
    for first in [0, c.dot.seq + 1] {
        let bad = Delta::run(first, c.dot, "likes", c.payload.clone());
        assert!(matches!(b.apply(bad), Err(DocError::Invalid(_))), "first {first}");
    }
    assert_eq!(b, Document::new(B));
}

#[test]
fn runs_survive_the_stored_form_and_older_stored_deltas_read_as_single_writes() {
    let (a, run) = clicked(7, 2);
    assert_eq!((run.first(), run.dot.seq), (1, 7));
    let bytes = run.encode();
    let back = Delta::decode(&bytes).unwrap();
    assert_eq!((back.first(), back.dot, &back.payload), (1, run.dot, &run.payload));
    // The whole document, log included.
    let doc = Document::decode(&a.encode(), DocConfig::default()).unwrap();
    assert_eq!(doc, a);
    // Format 2 had no run length: the same bytes without it, header version 2.
    let mut v2 = bytes.clone();
    v2[1] = 2;
    v2.pop();
    let old = Delta::decode(&v2).unwrap();
    assert_eq!((old.first(), old.dot), (7, run.dot));
    // A run length reaching below sequence 1 is refused.
    let mut bad = bytes.clone();
    *bad.last_mut().unwrap() = 7;
    assert!(Delta::decode(&bad).is_err());
}

#[test]
fn writes_whose_deltas_nobody_keeps_still_hand_back_each_write_and_log_one_run() {
    // The wasm replica drops each write's delta once it is sent: the log's run is then
    // extended in place. Peers get copies (decoded bytes), as over a network.
    let (mut a, mut b) = (Document::new(A), Document::new(B));
    for i in 1..=500u64 {
        let d = if i % 100 == 0 {
            a.set_register("title", Value::Int(i as i64), i).unwrap()
        } else {
            likes(&mut a, 1)
        };
        assert_eq!((d.first(), d.dot.seq), (i, i));
        let copy = Delta::decode(&d.encode()).unwrap();
        drop(d);
        assert!(matches!(b.apply(copy), Ok(Applied::Applied(0))));
    }
    assert_eq!(a.counter("likes"), 495);
    let log = a.deltas_since(&VersionVector::new()).unwrap();
    assert_eq!(log.len(), 10, "a run of 99 clicks, then a title, five times over");
    assert_eq!((log[0].first(), log[0].dot.seq, log[9].first(), log[9].dot.seq), (1, 99, 500, 500));
    assert_eq!((b.to_value(), b.version()), (a.to_value(), a.version()));
    let mut c = Document::new(C);
    for d in lacking(&a, &c) {
        c.apply(d).unwrap();
    }
    assert_eq!((c.to_value(), c.version()), (a.to_value(), a.version()));
}
