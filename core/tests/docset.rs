//! The document-set Merkle tree: incremental upkeep and the relay-to-relay diff.

use concord_core::docset::{
    doc_hash, version_digest, DiffError, DocSet, DocSetAnswer, DocSetDiff, DocSetQuery,
};
use concord_core::merkle::NodeId;
use concord_core::{ReplicaId, VersionVector};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

fn vv(a: u64, b: u64) -> VersionVector {
    VersionVector::from_iter([(ReplicaId(1), a), (ReplicaId(2), b)])
}

/// Runs a whole comparison of `here` against `there`, answering every query at once.
/// Returns the differing ids and the number of round trips.
fn diff(here: &DocSet, there: &DocSet) -> (BTreeSet<String>, usize) {
    let (mut d, mut q) = DocSetDiff::start();
    let mut trips = 0;
    while !d.is_done() {
        trips += 1;
        q = d.step(here, there.answer(&q)).unwrap();
        assert!(trips <= 5, "the descent must end after depth + 1 round trips");
    }
    (d.differences().iter().map(|x| x.id.clone()).collect(), trips)
}

/// The differing ids, computed by brute force.
fn expected(here: &DocSet, there: &DocSet) -> BTreeSet<String> {
    let a: BTreeMap<&str, u64> = here.iter().collect();
    let b: BTreeMap<&str, u64> = there.iter().collect();
    a.keys().chain(b.keys()).filter(|k| a.get(*k) != b.get(*k)).map(|k| k.to_string()).collect()
}

#[derive(Clone, Debug)]
enum Change {
    Bump(usize),
    Remove(usize),
    Add(u32),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        any::<usize>().prop_map(Change::Bump),
        any::<usize>().prop_map(Change::Remove),
        any::<u32>().prop_map(Change::Add),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn diff_finds_exactly_the_differing_documents(
        docs in prop::collection::btree_map("[a-z0-9/_-]{1,12}", (1u64..50, 0u64..5), 0..400),
        changes in prop::collection::vec(change(), 0..40),
        swap in any::<bool>(),
    ) {
        let mut a = DocSet::new();
        for (id, (x, y)) in &docs {
            a.upsert(id, &vv(*x, *y));
        }
        let mut b = a.clone();
        let ids: Vec<&String> = docs.keys().collect();
        for c in changes {
            match c {
                Change::Bump(i) if !ids.is_empty() => {
                    let id = ids[i % ids.len()];
                    let (x, y) = docs[id];
                    b.upsert(id, &vv(x + 1, y));
                }
                Change::Remove(i) if !ids.is_empty() => {
                    b.remove(ids[i % ids.len()]);
                }
                Change::Add(n) => {
                    b.upsert(&format!("new-{n}"), &vv(1, 0));
                }
                _ => {}
            }
        }
        let (here, there) = if swap { (&b, &a) } else { (&a, &b) };
        let (found, _) = diff(here, there);
        prop_assert_eq!(found, expected(here, there));
    }

    #[test]
    fn tree_is_the_same_whatever_the_order_of_updates(
        ops in prop::collection::vec(("[a-e]{1,2}", prop::option::of(1u64..4)), 0..60),
    ) {
        // Apply the ops, then rebuild the final set from scratch in another order.
        let mut a = DocSet::new();
        for (id, v) in &ops {
            match v {
                Some(n) => { a.upsert(id, &vv(*n, 0)); }
                None => { a.remove(id); }
            }
        }
        let mut b = DocSet::new();
        let fin: Vec<(String, u64)> = a.iter().map(|(id, d)| (id.to_owned(), d)).collect();
        for (id, d) in fin.iter().rev() {
            b.upsert_digest(id, *d);
        }
        prop_assert_eq!(a.root(), b.root());
        prop_assert_eq!(&a, &b);
    }
}

#[test]
fn equal_sets_agree_after_one_round_trip() {
    let mut a = DocSet::new();
    for i in 0..5000 {
        a.upsert(&format!("doc-{i}"), &vv(i + 1, 0));
    }
    let b = a.clone();
    let (found, trips) = diff(&a, &b);
    assert!(found.is_empty());
    assert_eq!(trips, 1);
}

#[test]
fn many_documents_with_sparse_differences_are_found_in_depth_plus_one_round_trips() {
    let mut a = DocSet::new();
    for i in 0..20_000u64 {
        a.upsert(&format!("room/{i:05}"), &vv(i % 7 + 1, i % 3));
    }
    let mut b = a.clone();
    b.upsert("room/00017", &vv(99, 0));
    b.remove("room/12345");
    b.upsert("room/new", &vv(1, 0));
    let (found, trips) = diff(&a, &b);
    assert_eq!(found, BTreeSet::from(["room/00017".into(), "room/12345".into(), "room/new".into()]));
    assert_eq!(trips, 5);
}

#[test]
fn an_empty_side_is_listed_without_descending() {
    let mut full = DocSet::new();
    for i in 0..3000 {
        full.upsert(&format!("d{i}"), &vv(1, 0));
    }
    let empty = DocSet::new();
    // The remote side is empty: everything here differs, found from the root's answer.
    let (found, trips) = diff(&full, &empty);
    assert_eq!(found.len(), 3000);
    assert_eq!(trips, 1);
    // This side is empty: the remote subtrees are listed whole.
    let (found, trips) = diff(&empty, &full);
    assert_eq!(found.len(), 3000);
    assert_eq!(trips, 2);
}

#[test]
fn differences_report_both_digests() {
    let mut a = DocSet::new();
    let mut b = DocSet::new();
    a.upsert("x", &vv(1, 0));
    b.upsert("x", &vv(2, 0));
    b.upsert("y", &vv(1, 0));
    let (mut d, mut q) = DocSetDiff::start();
    while !d.is_done() {
        q = d.step(&a, b.answer(&q)).unwrap();
    }
    let found = d.into_differences();
    assert_eq!(found.len(), 2);
    assert_eq!((found[0].local, found[0].remote), (Some(version_digest(&vv(1, 0))), b.get("x")));
    assert_eq!((found[1].id.as_str(), found[1].local), ("y", None));
}

#[test]
fn lost_and_duplicated_answers_do_not_change_the_result() {
    let mut a = DocSet::new();
    for i in 0..2000 {
        a.upsert(&format!("doc-{i}"), &vv(1, 0));
    }
    let mut b = a.clone();
    for i in (0..2000).step_by(97) {
        b.upsert(&format!("doc-{i}"), &vv(2, 0));
    }
    let (mut d, mut q) = DocSetDiff::start();
    let mut round = 0;
    while !d.is_done() {
        round += 1;
        let answer = b.answer(&q);
        if round % 2 == 0 {
            // Lose this answer; ask again for everything outstanding.
            q = d.outstanding();
            continue;
        }
        let again = answer.clone();
        q = d.step(&a, answer).unwrap();
        // A duplicate is ignored.
        assert!(d.step(&a, again).unwrap().is_empty());
    }
    let found: BTreeSet<String> = d.differences().iter().map(|x| x.id.clone()).collect();
    assert_eq!(found, expected(&a, &b));
}

#[test]
fn chunked_queries_find_the_same_documents() {
    let mut a = DocSet::new();
    for i in 0..4000 {
        a.upsert(&format!("doc-{i}"), &vv(1, 0));
    }
    let mut b = a.clone();
    for i in (0..4000).step_by(13) {
        b.remove(&format!("doc-{i}"));
    }
    let (mut d, q) = DocSetDiff::start();
    let mut queue = vec![q];
    while let Some(q) = queue.pop() {
        for part in q.chunks(7) {
            assert!(part.len() <= 7);
            queue.push(d.step(&a, b.answer(&part)).unwrap());
        }
    }
    assert!(d.is_done());
    let found: BTreeSet<String> = d.differences().iter().map(|x| x.id.clone()).collect();
    assert_eq!(found, expected(&a, &b));
}

#[test]
fn malformed_answers_are_refused_without_changing_the_diff() {
    let a = DocSet::new();
    let mut b = DocSet::new();
    b.upsert("x", &vv(1, 0));
    let (mut d, q) = DocSetDiff::start();
    let short = DocSetAnswer { children: vec![(NodeId::ROOT, vec![1, 2, 3])], docs: Vec::new() };
    assert_eq!(d.step(&a, short), Err(DiffError::Fanout { node: NodeId::ROOT, got: 3 }));
    let q = d.step(&a, b.answer(&q)).unwrap();
    assert_eq!(q.docs.len(), 1);
    // A document listed under a node its id does not hash into.
    let outsider =
        (0..).map(|i| format!("y{i}")).find(|id| NodeId::of(doc_hash(id), 1) != q.docs[0]).unwrap();
    let lie = DocSetAnswer { children: Vec::new(), docs: vec![(q.docs[0], vec![(outsider, 5)])] };
    assert!(matches!(d.step(&a, lie), Err(DiffError::OutOfRange { .. })));
    let elsewhere = NodeId { level: 1, index: (q.docs[0].index + 1) % 16 };
    let lie_elsewhere = DocSetAnswer { children: Vec::new(), docs: vec![(elsewhere, vec![("x".into(), 5)])] };
    // Answers about nodes nobody asked for are ignored.
    assert!(d.step(&a, lie_elsewhere).unwrap().is_empty());
    assert!(!d.is_done());
    d.step(&a, b.answer(&q)).unwrap();
    assert!(d.is_done());
    assert_eq!(d.differences().len(), 1);
    assert_eq!(d.differences()[0].id, "x");
}

#[test]
fn answers_skip_invalid_node_ids() {
    let mut b = DocSet::new();
    b.upsert("x", &vv(1, 0));
    let q = DocSetQuery {
        children: vec![NodeId { level: 9, index: 0 }, NodeId { level: 4, index: 0 }],
        docs: vec![NodeId { level: 1, index: 99 }],
    };
    let ans = b.answer(&q);
    assert!(ans.children.is_empty() && ans.docs.is_empty());
}
