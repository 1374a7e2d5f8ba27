//! The ring's properties: preference lists are N distinct nodes (across the wrap-around
//! too), a membership change only inserts or removes the changed nodes in every walk, the
//! load is even, and adding or removing nodes moves about the share they take or give.
//!
//! The measurements run over 100,000 document ids and print their numbers (see them with
//! `cargo test -p concord-core --test ring -- --nocapture`). Cases per property:
//! `PROPTEST_CASES` (default 256).

use concord_core::ring::{Ring, RingNode};
use proptest::collection::{btree_set, vec};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use std::collections::BTreeSet;

const DOCS: usize = 100_000;
const N: usize = 3;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(256);
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        ..ProptestConfig::default()
    }
}

fn nodes(count: usize) -> Vec<RingNode> {
    (0..count).map(|i| RingNode::new(format!("relay-{i}"), 1)).collect()
}

fn doc_ids() -> impl Iterator<Item = String> {
    (0..DOCS).map(|i| format!("doc-{i}"))
}

/// The walk of a brute-force ring: every node's tokens sorted, clockwise from
/// `position`, first sighting of each node kept. An oracle independent of `Ring`'s search.
fn oracle_walk(nodes: &[RingNode], vnodes: u32, position: u64) -> Vec<String> {
    let mut tokens: Vec<(u64, usize)> = Vec::new();
    for (idx, n) in nodes.iter().enumerate() {
        for i in 0..n.weight * vnodes {
            tokens.push((Ring::token(&n.id, i), idx));
        }
    }
    tokens.sort();
    let (after, before): (Vec<_>, Vec<_>) = tokens.iter().partition(|(t, _)| *t >= position);
    let mut out: Vec<String> = Vec::new();
    for (_, idx) in after.into_iter().chain(before) {
        if !out.contains(&nodes[idx].id) {
            out.push(nodes[idx].id.clone());
        }
    }
    out
}

/// A ring of distinct node ids with weights 0..=3 (at least one positive).
fn arb_ring() -> impl Strategy<Value = (Vec<RingNode>, u32)> {
    (btree_set("[a-z]{1,6}", 1..10), vec(0u32..4, 10), 1u32..24).prop_map(|(ids, weights, vnodes)| {
        let mut nodes: Vec<RingNode> =
            ids.into_iter().zip(weights).map(|(id, w)| RingNode::new(id, w)).collect();
        if nodes.iter().all(|n| n.weight == 0) {
            nodes[0].weight = 1;
        }
        (nodes, vnodes)
    })
}

fn owning(nodes: &[RingNode]) -> BTreeSet<&str> {
    nodes.iter().filter(|n| n.weight > 0).map(|n| n.id.as_str()).collect()
}

/// Positions on both sides of the wrap-around and on every token edge.
fn edge_positions(nodes: &[RingNode], vnodes: u32) -> Vec<u64> {
    let mut out = vec![0, 1, u64::MAX - 1, u64::MAX];
    for n in nodes {
        for i in 0..n.weight * vnodes {
            let t = Ring::token(&n.id, i);
            out.extend([t, t.wrapping_add(1), t.wrapping_sub(1)]);
        }
    }
    out
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn preference_lists_hold_min_n_distinct_owning_nodes(
        (nodes, vnodes) in arb_ring(),
        docs in vec(".{0,12}", 1..20),
        n in 1usize..12,
    ) {
        let ring = Ring::new(&nodes, vnodes);
        let owning = owning(&nodes);
        for doc in &docs {
            let pl = ring.preference_list(doc, n);
            prop_assert_eq!(pl.len(), n.min(owning.len()));
            let distinct: BTreeSet<&str> = pl.iter().copied().collect();
            prop_assert_eq!(distinct.len(), pl.len(), "repeated node in {:?}", pl);
            prop_assert!(distinct.is_subset(&owning));
            let walk = ring.walk(doc);
            prop_assert_eq!(walk.iter().copied().collect::<BTreeSet<_>>(), owning.clone());
            prop_assert_eq!(&walk[..pl.len()], &pl[..]);
            for node in ring.nodes() {
                prop_assert_eq!(ring.owns(node, doc, n), pl.contains(&node));
            }
        }
    }

    #[test]
    fn walks_match_a_brute_force_ring_on_both_sides_of_the_wrap_around(
        (nodes, vnodes) in arb_ring(),
        extra in vec(any::<u64>(), 8),
    ) {
        let ring = Ring::new(&nodes, vnodes);
        let mut positions = edge_positions(&nodes, vnodes);
        positions.extend(extra);
        for p in positions {
            let want = oracle_walk(&nodes, vnodes, p);
            prop_assert_eq!(ring.walk_from(p), want.iter().map(String::as_str).collect::<Vec<_>>(), "at {}", p);
            let three = ring.preference_list_at(p, N);
            prop_assert_eq!(three.len(), N.min(want.len()));
        }
    }

    /// Consistent hashing's defining property: adding nodes inserts them into each walk
    /// and leaves the order of the others alone, so no document moves between two old
    /// nodes (what Riak's claim algorithms got wrong when several nodes joined at once).
    #[test]
    fn adding_nodes_only_inserts_them_into_every_walk(
        (nodes, vnodes) in arb_ring(),
        added in btree_set("[A-Z]{1,4}", 1..5),
        docs in vec(".{0,12}", 1..20),
    ) {
        let old = Ring::new(&nodes, vnodes);
        let mut bigger = nodes.clone();
        bigger.extend(added.iter().map(|id| RingNode::new(id.clone(), 1)));
        let new = Ring::new(&bigger, vnodes);
        for doc in &docs {
            let without_added: Vec<&str> =
                new.walk(doc).into_iter().filter(|n| !added.contains(*n)).collect();
            prop_assert_eq!(without_added, old.walk(doc));
            // So a preference list changes only where an added node entered it.
            let (before, after) = (old.preference_list(doc, N), new.preference_list(doc, N));
            for n in &after {
                prop_assert!(before.contains(n) || added.contains(*n));
            }
        }
    }

    #[test]
    fn removing_a_node_only_takes_it_out_of_every_walk(
        (nodes, vnodes) in arb_ring(),
        which in any::<prop::sample::Index>(),
        docs in vec(".{0,12}", 1..20),
    ) {
        let gone = which.get(&nodes).id.clone();
        let fewer: Vec<RingNode> = nodes.iter().filter(|n| n.id != gone).cloned().collect();
        let (old, new) = (Ring::new(&nodes, vnodes), Ring::new(&fewer, vnodes));
        for doc in &docs {
            let mut want = old.walk(doc);
            want.retain(|n| *n != gone);
            prop_assert_eq!(new.walk(doc), want);
        }
    }

    #[test]
    fn ranges_partition_the_ring_with_their_preference_lists(
        (nodes, vnodes) in arb_ring(),
        n in 1usize..5,
        probes in vec(any::<u64>(), 16),
    ) {
        let ring = Ring::new(&nodes, vnodes);
        let ranges = ring.ranges(n);
        for p in probes {
            // The range holding p ends at the first range end >= p, wrapping to the first.
            let i = ranges.partition_point(|(end, _)| *end < p) % ranges.len();
            prop_assert_eq!(&ranges[i].1, &ring.preference_list_at(p, n));
        }
    }
}

/// Share of documents each node is the primary of, and holds a replica of (N = 3).
fn load(ring: &Ring) -> (Vec<f64>, Vec<f64>) {
    let ids: Vec<&str> = ring.nodes().collect();
    let (mut primary, mut replica) = (vec![0usize; ids.len()], vec![0usize; ids.len()]);
    for doc in doc_ids() {
        for (k, node) in ring.preference_list(&doc, N).into_iter().enumerate() {
            let i = ids.iter().position(|id| *id == node).unwrap_or_default();
            replica[i] += 1;
            if k == 0 {
                primary[i] += 1;
            }
        }
    }
    let share = |v: Vec<usize>| v.into_iter().map(|c| c as f64).collect();
    (share(primary), share(replica))
}

/// (max / mean, min / mean), weighted: each node's load divided by its weight.
fn spread(load: &[f64], weights: &[u32]) -> (f64, f64) {
    let per_weight: Vec<f64> = load.iter().zip(weights).map(|(l, w)| l / f64::from(*w)).collect();
    let mean = load.iter().sum::<f64>() / f64::from(weights.iter().sum::<u32>());
    let max = per_weight.iter().cloned().fold(f64::MIN, f64::max);
    let min = per_weight.iter().cloned().fold(f64::MAX, f64::min);
    (max / mean, min / mean)
}

#[test]
fn load_is_even_with_64_vnodes() {
    for count in [3, 5, 10] {
        let nodes = nodes(count);
        let ring = Ring::new(&nodes, 64);
        let (primary, replica) = load(&ring);
        let weights = vec![1; count];
        let (pmax, pmin) = spread(&primary, &weights);
        let (rmax, rmin) = spread(&replica, &weights);
        println!(
            "balance {count:>2} nodes x 64 vnodes over {DOCS} docs: primary max/mean {pmax:.3} min/mean {pmin:.3}; \
             replica (N=3) max/mean {rmax:.3} min/mean {rmin:.3}"
        );
        assert!(pmax < 1.3 && pmin > 0.7, "primary load of {count} nodes is uneven: {pmax:.3} / {pmin:.3}");
        assert!(rmax < 1.3 && rmin > 0.7, "replica load of {count} nodes is uneven: {rmax:.3} / {rmin:.3}");
    }
}

#[test]
fn load_follows_weight() {
    let nodes = vec![RingNode::new("small", 1), RingNode::new("big", 3), RingNode::new("mid", 2)];
    let ring = Ring::new(&nodes, 64);
    let (primary, _) = load(&ring);
    let (max, min) = spread(&primary, &[1, 3, 2]);
    println!("weighted 1:3:2 primary load {primary:?}: per-weight max/mean {max:.3} min/mean {min:.3}");
    assert!(max < 1.3 && min > 0.7, "load does not follow weight: {primary:?}");
}

/// What a membership change moved, over the test documents.
struct Moved {
    /// Documents whose primary changed.
    primary: f64,
    /// Documents whose preference list (as a set) changed.
    docs: f64,
    /// Replicas that moved, of all N x docs replicas.
    replicas: f64,
}

fn moved(old: &Ring, new: &Ring) -> Moved {
    let (mut primary, mut docs, mut replicas) = (0usize, 0usize, 0usize);
    for doc in doc_ids() {
        let (a, b) = (old.preference_list(&doc, N), new.preference_list(&doc, N));
        if a[0] != b[0] {
            primary += 1;
        }
        let gone = a.iter().filter(|n| !b.contains(n)).count();
        if gone > 0 {
            docs += 1;
        }
        replicas += gone;
    }
    let total = DOCS as f64;
    Moved {
        primary: primary as f64 / total,
        docs: docs as f64 / total,
        replicas: replicas as f64 / (total * N as f64),
    }
}

/// Probability that a random N-subset of `after` nodes misses all `after - before` new
/// ones, turned around: the share of documents whose preference list should change.
fn expected_docs_changed(before: usize, after: usize) -> f64 {
    let (lo, hi) = (before.min(after), before.max(after));
    let mut keep = 1.0;
    for k in 0..N {
        keep *= (lo - k) as f64 / (hi - k) as f64;
    }
    1.0 - keep
}

fn assert_near(what: &str, got: f64, want: f64) {
    let ratio = got / want;
    assert!(
        (0.7..1.3).contains(&ratio),
        "{what}: moved {got:.4}, expected about {want:.4} (ratio {ratio:.2})"
    );
}

fn check_change(label: &str, before: usize, after: usize) {
    let (small, large) = (nodes(before.min(after)), nodes(before.max(after)));
    let (old, new) = if before < after {
        (Ring::new(&small, 64), Ring::new(&large, 64))
    } else {
        (Ring::new(&large, 64), Ring::new(&small, 64))
    };
    let m = moved(&old, &new);
    let changed = before.abs_diff(after) as f64 / before.max(after) as f64;
    let want_docs = expected_docs_changed(before, after);
    // The ring after the change is as even as one built that way from scratch.
    let (primary, _) = load(&new);
    let (max, min) = spread(&primary, &vec![1; after]);
    println!(
        "{label} {before} -> {after}: primary moved {:.4} (ideal {changed:.4}), replicas moved {:.4} \
         (ideal {changed:.4}), docs with a changed list {:.4} (ideal {want_docs:.4}); \
         afterwards primary max/mean {max:.3} min/mean {min:.3}",
        m.primary, m.replicas, m.docs
    );
    assert_near(&format!("{label} {before}->{after} primary"), m.primary, changed);
    assert_near(&format!("{label} {before}->{after} replicas"), m.replicas, changed);
    assert_near(&format!("{label} {before}->{after} docs"), m.docs, want_docs);
    assert!(max < 1.3 && min > 0.7, "{label} {before}->{after}: uneven afterwards ({max:.3} / {min:.3})");
}

#[test]
fn adding_one_node_moves_about_one_share() {
    for k in [3, 5, 10] {
        check_change("add one", k, k + 1);
    }
}

#[test]
fn removing_one_node_moves_about_its_share() {
    for k in [4, 5, 10] {
        check_change("remove one", k, k - 1);
    }
}

#[test]
fn adding_several_nodes_at_once_moves_their_share_and_stays_even() {
    for (k, m) in [(3, 3), (5, 3), (5, 5), (10, 5), (4, 12)] {
        check_change("add several", k, k + m);
    }
}
