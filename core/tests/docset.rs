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
        assert!(trips <= 6, "the descent must end after depth + 2 round trips");
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
fn many_documents_with_sparse_differences_are_found_in_depth_plus_two_round_trips() {
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
    // Root, three inner levels, buckets, then the ids of the hashes that did not match.
    assert_eq!(trips, 6);
    // A document only here needs no names: buckets settle it.
    let mut c = a.clone();
    c.upsert("room/only-here", &vv(1, 0));
    let (found, trips) = diff(&c, &a);
    assert_eq!(found, BTreeSet::from(["room/only-here".into()]));
    assert!(trips <= 5);
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
    let short = DocSetAnswer { children: vec![(NodeId::ROOT, vec![1, 2, 3])], ..Default::default() };
    assert_eq!(d.step(&a, short), Err(DiffError::Fanout { node: NodeId::ROOT, got: 3 }));
    let q = d.step(&a, b.answer(&q)).unwrap();
    assert_eq!(q.lists.len(), 1, "a subtree empty here is listed whole");
    // A document listed under a node its id does not hash into.
    let outsider =
        (0..).map(|i| format!("y{i}")).find(|id| NodeId::of(doc_hash(id), 1) != q.lists[0]).unwrap();
    let lie = DocSetAnswer { lists: vec![(q.lists[0], vec![(outsider, 5)])], ..Default::default() };
    assert!(matches!(d.step(&a, lie), Err(DiffError::OutOfRange { .. })));
    // Answers about nodes nobody asked for are ignored.
    let elsewhere = NodeId { level: 1, index: (q.lists[0].index + 1) % 16 };
    let lie_elsewhere =
        DocSetAnswer { lists: vec![(elsewhere, vec![("x".into(), 5)])], ..Default::default() };
    assert!(d.step(&a, lie_elsewhere).unwrap().is_empty());
    assert!(!d.is_done());
    d.step(&a, b.answer(&q)).unwrap();
    assert!(d.is_done());
    assert_eq!(d.differences().len(), 1);
    assert_eq!(d.differences()[0].id, "x");
}

/// Drives `here` against `there` until the diff asks about buckets; returns that query.
fn until_buckets(d: &mut DocSetDiff, here: &DocSet, there: &DocSet) -> DocSetQuery {
    let mut q = d.outstanding();
    while q.buckets.is_empty() {
        q = d.step(here, there.answer(&q)).unwrap();
    }
    q
}

#[test]
fn bucket_and_name_answers_are_checked() {
    let mut a = DocSet::new();
    for i in 0..3000 {
        a.upsert(&format!("doc-{i}"), &vv(1, 0));
    }
    let mut b = a.clone();
    b.upsert("doc-5", &vv(2, 0));
    let (mut d, _) = DocSetDiff::start();
    let q = until_buckets(&mut d, &a, &b);
    let bucket = q.buckets[0];
    // A hash outside the bucket.
    let (lo, _) = bucket.key_range();
    let stray = DocSetAnswer { buckets: vec![(bucket, vec![(lo.wrapping_sub(1), 1)])], ..Default::default() };
    assert!(matches!(d.step(&a, stray), Err(DiffError::HashOutOfRange { .. })));
    let q = d.step(&a, b.answer(&q)).unwrap();
    assert_eq!(q.names, vec![doc_hash("doc-5")]);
    // A name whose id does not have the hash asked about.
    let wrong = DocSetAnswer { names: vec![(q.names[0], vec![("doc-6".into(), 1)])], ..Default::default() };
    assert!(matches!(d.step(&a, wrong), Err(DiffError::WrongName { .. })));
    assert!(d.step(&a, b.answer(&q)).unwrap().is_empty());
    assert!(d.is_done());
    let found = d.into_differences();
    assert_eq!(found.len(), 1);
    assert_eq!(
        (found[0].id.as_str(), found[0].local, found[0].remote),
        ("doc-5", a.get("doc-5"), b.get("doc-5"))
    );
}

#[test]
fn a_hash_listed_twice_is_settled_by_id() {
    // Two entries under one hash (as colliding ids would give) are resolved by name.
    let mut a = DocSet::new();
    for i in 0..3000 {
        a.upsert(&format!("doc-{i}"), &vv(1, 0));
    }
    let mut b = a.clone();
    b.upsert("doc-9", &vv(3, 0));
    let (mut d, _) = DocSetDiff::start();
    let q = until_buckets(&mut d, &a, &b);
    let mut ans = b.answer(&q);
    let h = doc_hash("doc-9");
    for (_, pairs) in &mut ans.buckets {
        if pairs.iter().any(|p| p.0 == h) {
            pairs.push((h, 77));
        }
    }
    let q = d.step(&a, ans).unwrap();
    assert_eq!(q.names, vec![h]);
    d.step(&a, b.answer(&q)).unwrap();
    assert!(d.is_done());
    let ids: Vec<String> = d.differences().iter().map(|x| x.id.clone()).collect();
    assert_eq!(ids, ["doc-9"]);
}

#[test]
fn answers_survive_the_wire_in_compact_form() {
    let mut b = DocSet::new();
    for i in 0..500 {
        b.upsert(&format!("doc-{i}"), &vv(i + 1, 0));
    }
    let q = DocSetQuery {
        children: vec![NodeId::ROOT, NodeId { level: 1, index: 3 }],
        buckets: vec![NodeId::of(doc_hash("doc-1"), 4)],
        lists: vec![NodeId { level: 2, index: 17 }],
        names: vec![doc_hash("doc-2"), 12345],
    };
    let bytes = postcard::to_allocvec(&q).unwrap();
    assert_eq!(postcard::from_bytes::<DocSetQuery>(&bytes).unwrap(), q);
    let ans = b.answer(&q);
    let bytes = postcard::to_allocvec(&ans).unwrap();
    assert_eq!(postcard::from_bytes::<DocSetAnswer>(&bytes).unwrap(), ans);
    // Hashes travel as 8-byte words: 16 children in 2 + 128 bytes plus the node and a length.
    let one = DocSetAnswer { children: vec![(NodeId::ROOT, b.root_children())], ..Default::default() };
    assert!(postcard::to_allocvec(&one).unwrap().len() <= 130 + 8);
    // ... and empty children cost nothing but their bit.
    let sparse = DocSetAnswer { children: vec![(NodeId::ROOT, vec![0; 16])], ..Default::default() };
    assert!(postcard::to_allocvec(&sparse).unwrap().len() <= 2 + 8);
    assert_eq!(
        postcard::from_bytes::<DocSetAnswer>(&postcard::to_allocvec(&sparse).unwrap()).unwrap(),
        sparse
    );
    // A children list of another length cannot be encoded.
    let short = DocSetAnswer { children: vec![(NodeId::ROOT, vec![1, 2])], ..Default::default() };
    assert!(postcard::to_allocvec(&short).is_err());
    // Malformed word lists are refused.
    type Wire = (
        Vec<(NodeId, Vec<u8>)>,
        Vec<(NodeId, Vec<u8>)>,
        Vec<(NodeId, Vec<(String, u64)>)>,
        Vec<(u64, Vec<(String, u64)>)>,
    );
    let decodes = |w: Wire| postcard::from_bytes::<DocSetAnswer>(&postcard::to_allocvec(&w).unwrap()).is_ok();
    let kids = |bytes: Vec<u8>| (vec![(NodeId::ROOT, bytes)], Vec::new(), Vec::new(), Vec::new());
    let mut one_child = vec![0b1000_0000, 0];
    one_child.extend(7u64.to_le_bytes());
    assert!(decodes(kids(one_child.clone())));
    assert!(!decodes(kids(one_child[..9].to_vec())), "a word cut short");
    assert!(!decodes(kids(vec![0b11, 0, 7, 0, 0, 0, 0, 0, 0, 0])), "two bits, one word");
    assert!(!decodes(kids(vec![1, 0, 0, 0, 0, 0, 0, 0, 0, 0])), "a set bit with an empty hash");
    let bucket = |bytes: Vec<u8>| (Vec::new(), vec![(NodeId::ROOT, bytes)], Vec::new(), Vec::new());
    assert!(decodes(bucket(vec![0; 16])));
    assert!(!decodes(bucket(vec![0; 8])), "half a pair");
}

#[test]
fn answers_skip_invalid_node_ids() {
    let mut b = DocSet::new();
    b.upsert("x", &vv(1, 0));
    let q = DocSetQuery {
        children: vec![NodeId { level: 9, index: 0 }, NodeId { level: 4, index: 0 }],
        buckets: vec![NodeId { level: 5, index: 0 }],
        lists: vec![NodeId { level: 1, index: 99 }],
        names: Vec::new(),
    };
    let ans = b.answer(&q);
    assert!(ans.children.is_empty() && ans.buckets.is_empty() && ans.lists.is_empty());
}
