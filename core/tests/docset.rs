//! The document-set Merkle tree: incremental upkeep and the relay-to-relay diff.

use concord_core::docset::{
    doc_hash, version_digest, DiffError, DocSet, DocSetAnswer, DocSetDiff, DocSetQuery,
};
use concord_core::merkle::NodeId;
use concord_core::sync::msg::{
    tag, DocSetAnswerMsg, DocSetQueryMsg, MAX_DOCSET_ITEMS, MAX_DOCSET_PARTS, MAX_DOCSET_QUERY,
};
use concord_core::sync::{FrameError, Msg};
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

/// `answer` as the one part of a `DocSetAnswer` frame.
fn answer_frame(answer: &DocSetAnswer) -> Vec<u8> {
    Msg::DocSetAnswer(DocSetAnswerMsg { exchange: 1, part: 0, parts: 1, answer: answer.clone() }).encode()
}

fn answer_of(frame: &[u8]) -> Result<DocSetAnswer, FrameError> {
    match Msg::decode(frame)? {
        Msg::DocSetAnswer(m) => Ok(m.answer),
        other => panic!("not an answer: {other:?}"),
    }
}

#[test]
fn queries_and_answers_survive_the_wire_in_compact_form() {
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
    let m = Msg::DocSetQuery(DocSetQueryMsg { exchange: 9, query: q.clone() });
    assert_eq!(Msg::decode(&m.encode()), Ok(m));
    let ans = b.answer(&q);
    assert_eq!(answer_of(&answer_frame(&ans)), Ok(ans));
    // Hashes travel as 8-byte words: 16 children in 2 + 128 bytes, plus the node, lengths
    // and the frame's head.
    let one = DocSetAnswer { children: vec![(NodeId::ROOT, b.root_children())], ..Default::default() };
    assert!(answer_frame(&one).len() <= 130 + 8 + 4);
    // ... and empty children cost nothing but their bit.
    let sparse = DocSetAnswer { children: vec![(NodeId::ROOT, vec![0; 16])], ..Default::default() };
    assert!(answer_frame(&sparse).len() <= 2 + 8 + 4);
    assert_eq!(answer_of(&answer_frame(&sparse)), Ok(sparse));
    // A children list always travels as 16 hashes.
    let short = DocSetAnswer { children: vec![(NodeId::ROOT, vec![1, 2])], ..Default::default() };
    let mut padded = vec![1, 2];
    padded.resize(16, 0);
    assert_eq!(answer_of(&answer_frame(&short)).unwrap().children, vec![(NodeId::ROOT, padded)]);
    // Malformed word lists are refused: the frame head, then the children and buckets.
    let frame = |children: &[Vec<u8>], buckets: &[Vec<u8>]| {
        let mut f = vec![tag::DOCSET_ANSWER, 1, 0, 1];
        for list in [children, buckets] {
            f.push(list.len() as u8);
            for bytes in list {
                f.extend([0, 0, bytes.len() as u8]); // the root, then the byte count
                f.extend(bytes);
            }
        }
        f.extend([0, 0]); // no lists, no names
        answer_of(&f).is_ok()
    };
    let mut one_child = vec![0b1000_0000, 0];
    one_child.extend(7u64.to_le_bytes());
    assert!(frame(&[one_child.clone()], &[]));
    assert!(!frame(&[one_child[..9].to_vec()], &[]), "a word cut short");
    assert!(!frame(&[vec![0b11, 0, 7, 0, 0, 0, 0, 0, 0, 0]], &[]), "two bits, one word");
    assert!(!frame(&[vec![1, 0, 0, 0, 0, 0, 0, 0, 0, 0]], &[]), "a set bit with an empty hash");
    assert!(frame(&[], &[vec![0; 16]]));
    assert!(!frame(&[], &[vec![0; 8]]), "half a pair");
}

#[test]
fn oversized_or_inconsistent_queries_and_answers_are_typed_errors() {
    let refused = |m: Msg| match Msg::decode(&m.encode()) {
        Err(FrameError::Malformed { tag, .. }) => {
            assert!(tag == tag::DOCSET_QUERY || tag == tag::DOCSET_ANSWER)
        }
        other => panic!("accepted: {other:?}"),
    };
    let names = (0..=MAX_DOCSET_QUERY as u64).collect();
    refused(Msg::DocSetQuery(DocSetQueryMsg {
        exchange: 1,
        query: DocSetQuery { names, ..Default::default() },
    }));
    let bad_node = NodeId { level: 9, index: 0 };
    refused(Msg::DocSetQuery(DocSetQueryMsg {
        exchange: 1,
        query: DocSetQuery { lists: vec![bad_node], ..Default::default() },
    }));
    let part = |part, parts, answer| Msg::DocSetAnswer(DocSetAnswerMsg { exchange: 1, part, parts, answer });
    refused(part(0, 0, DocSetAnswer::default()));
    refused(part(2, 2, DocSetAnswer::default()));
    refused(part(0, MAX_DOCSET_PARTS + 1, DocSetAnswer::default()));
    let big =
        DocSetAnswer { names: vec![(1, vec![(String::new(), 0); MAX_DOCSET_ITEMS])], ..Default::default() };
    refused(part(0, 1, big));
    let long_id = DocSetAnswer { names: vec![(1, vec![("x".repeat(513), 0)])], ..Default::default() };
    refused(part(0, 1, long_id));
    let bucket_as_inner =
        DocSetAnswer { children: vec![(NodeId::of(0, 4), vec![0; 16])], ..Default::default() };
    refused(part(0, 1, bucket_as_inner));
    assert!(Msg::decode(&part(1, 2, DocSetAnswer::default()).encode()).is_ok());
}

/// A set of `n` documents with long ids, and one empty set to compare it with.
fn big_set(n: u64) -> DocSet {
    let mut s = DocSet::new();
    for i in 0..n {
        s.upsert(
            &format!("a-rather-long-document-id-{i:08}-{}", "x".repeat((i % 50) as usize)),
            &vv(i + 1, 0),
        );
    }
    s
}

#[test]
fn an_answer_larger_than_a_frame_is_split_into_parts_that_join_back() {
    let there = big_set(3000);
    let mut q = DocSetQuery {
        children: vec![NodeId::ROOT, NodeId { level: 1, index: 5 }],
        buckets: (0..40).map(|i| NodeId { level: 4, index: i * 1000 }).collect(),
        lists: (0..16).map(|i| NodeId { level: 1, index: i }).collect(),
        names: there.iter().take(300).map(|(id, _)| doc_hash(id)).collect(),
    };
    // A hash asked twice would be answered twice, and the copies joined into one entry.
    q.names.dedup();
    let answer = there.answer(&q);
    for max_frame in [600, 4096, 64 * 1024, 1 << 20] {
        let frames = DocSetAnswerMsg::frames(7, answer.clone(), max_frame).expect("few enough parts");
        let n = frames.len() as u32;
        let mut joined = DocSetAnswer::default();
        for (i, m) in frames.into_iter().enumerate() {
            let bytes = m.encode();
            assert!(bytes.len() <= max_frame, "part of {} bytes above {max_frame}", bytes.len());
            let Ok(Msg::DocSetAnswer(back)) = Msg::decode(&bytes) else { panic!("a part does not decode") };
            assert_eq!((back.exchange, back.part, back.parts), (7, i as u32, n));
            joined.absorb(back.answer);
        }
        assert!(joined == answer, "parts at max_frame {max_frame} do not join back");
        if max_frame == 600 {
            assert!(n > 100, "{n} parts");
        }
    }
    // Far too small a frame for the answer: no frames rather than too many.
    assert_eq!(DocSetAnswerMsg::frames(7, answer, 40), None);
}

#[test]
fn a_comparison_over_split_answers_finds_what_a_whole_one_finds() {
    let here = big_set(2000);
    let mut there = big_set(2000);
    let ids: Vec<String> = there.iter().map(|(id, _)| id.to_owned()).collect();
    for id in ids.iter().step_by(37) {
        there.upsert(id, &vv(99_999, 1));
    }
    there.upsert("only-there", &vv(1, 1));
    let (want, _) = diff(&here, &there);
    for max_frame in [512, 8192] {
        let (mut d, mut q) = DocSetDiff::start();
        let mut trips = 0;
        while !d.is_done() {
            trips += 1;
            assert!(trips <= 6);
            let Some(frames) = DocSetAnswerMsg::frames(1, there.answer(&q), max_frame) else {
                panic!("too many parts")
            };
            let mut joined = DocSetAnswer::default();
            for m in frames {
                let Ok(Msg::DocSetAnswer(part)) = Msg::decode(&m.encode()) else {
                    panic!("a part does not decode")
                };
                joined.absorb(part.answer);
            }
            q = d.step(&here, joined).unwrap();
        }
        let got: BTreeSet<String> = d.differences().iter().map(|x| x.id.clone()).collect();
        assert_eq!(got, want);
    }
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
