//! [`Coordinator`]: one node's write and read quorums, event by event. The seeded cluster
//! simulator (`cluster_sim.rs`) drives the same type through faults; these pin down each
//! decision on its own.

use concord_core::cluster::{write_targets, Target};
use concord_core::coordinator::{Action, Coordinator};
use concord_core::{CausalContext, ReplicaId, Span, VersionVector};

const WRITER: ReplicaId = ReplicaId(9);

fn span(first: u64, last: u64) -> Span {
    Span { replica: WRITER, first, last }
}

/// The writer's dots 1..=`seq`, as a durable version.
fn upto(seq: u64) -> VersionVector {
    VersionVector::from_iter([(WRITER, seq)])
}

fn durable(seq: u64) -> CausalContext {
    CausalContext { vv: upto(seq), cloud: Default::default() }
}

/// The first three healthy nodes of the walk a, b, c, d, e.
fn targets(down: &[&str]) -> Vec<Target> {
    write_targets(&["a", "b", "c", "d", "e"], 3, |n| !down.contains(&n))
}

fn acks(acts: &[Action]) -> Vec<(u64, VersionVector, usize, usize)> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Ack { conn, vv, owner_acks, fallback_acks, .. } => {
                Some((*conn, vv.clone(), *owner_acks, *fallback_acks))
            }
            _ => None,
        })
        .collect()
}

fn answers(acts: &[Action]) -> Vec<u64> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Answer { conn, .. } => Some(*conn),
            _ => None,
        })
        .collect()
}

fn probes(acts: &[Action]) -> Vec<&str> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Probe { peer, .. } => Some(peer.as_str()),
            _ => None,
        })
        .collect()
}

fn errors(acts: &[Action]) -> Vec<u64> {
    acts.iter()
        .filter_map(|a| match a {
            Action::NotEnoughReplicas { conn, .. } => Some(*conn),
            _ => None,
        })
        .collect()
}

#[test]
fn a_write_is_acked_at_w_durable_acks_counting_owners_and_fallbacks_apart() {
    // b is down: d stands in for it.
    let mut c = Coordinator::new("a", 2, 2, 1_000);
    assert!(c.write(7, "doc", vec![span(1, 1)], targets(&["b"]), 100).is_empty());
    assert!(c.durable("doc", &durable(1), 110).is_empty(), "1 of W = 2");
    assert!(c.durable("doc", &durable(1), 111).is_empty(), "the same node twice is still one ack");
    let acts = c.peer_ack("b", "doc", &upto(1), &upto(1), 112);
    assert!(acks(&acts).is_empty(), "b is not a target of this write");
    let acts = c.peer_ack("d", "doc", &upto(1), &upto(1), 130);
    assert_eq!(acks(&acts), [(7, upto(1), 1, 1)]);
    assert!(matches!(acts[0], Action::Ack { latency_ms: 30, .. }), "latency runs from the write: {acts:?}");
    assert!(c.is_acked("doc", span(1, 1)) && c.is_idle("doc"));

    // a and b are down: x, not a target, coordinates; the fallbacks alone make W.
    let mut x = Coordinator::new("x", 2, 2, 1_000);
    x.write(1, "doc", vec![span(1, 1)], targets(&["a", "b"]), 0);
    assert!(x.durable("doc", &durable(1), 1).is_empty(), "x is no target: its copy does not count");
    assert!(x.peer_ack("d", "doc", &upto(1), &VersionVector::new(), 2).is_empty());
    assert_eq!(acks(&x.peer_ack("e", "doc", &upto(1), &VersionVector::new(), 3)), [(1, upto(1), 0, 2)]);
}

#[test]
fn a_version_that_does_not_reach_the_write_is_no_ack() {
    let mut c = Coordinator::new("a", 2, 2, 1_000);
    c.write(1, "doc", vec![span(3, 3)], targets(&[]), 0);
    // Dot 3 alone, without 1 and 2: not a version that holds the write.
    let mut gap = CausalContext::default();
    gap.insert_span(span(3, 3));
    assert!(c.durable("doc", &gap, 1).is_empty());
    assert!(c.peer_ack("b", "doc", &upto(2), &upto(0), 2).is_empty());
    assert!(c.durable("doc", &durable(3), 3).is_empty(), "a: 1 of 2");
    assert_eq!(acks(&c.peer_ack("b", "doc", &upto(3), &upto(3), 4)).len(), 1);
}

/// Regression: the writer's dots 1 and 2 were acked through another coordinator. The
/// ack of dot 3 here must still cover dot 3 — a client is told only a version, and one
/// that left dot 3 out made it resend the write forever.
#[test]
fn the_ack_covers_a_write_whose_earlier_dots_were_acked_elsewhere() {
    let mut c = Coordinator::new("a", 2, 2, 1_000);
    c.write(1, "doc", vec![span(3, 3)], targets(&[]), 0);
    c.durable("doc", &durable(3), 1);
    let acts = c.peer_ack("c", "doc", &upto(3), &upto(3), 2);
    let (_, vv, _, _) = acks(&acts).pop().expect("acked");
    assert!(vv.contains(span(3, 3).last_dot()), "ack {vv:?} leaves the write out");
    // W targets hold the writer's dots from the first: a retry of dot 2 is acked at once.
    let (missing, acts) = c.retry(2, "doc", vec![span(2, 2)], targets(&[]), &durable(3), 3);
    assert!(missing.is_empty());
    assert_eq!(acks(&acts), [(2, upto(3), 0, 0)]);
}

#[test]
fn a_retry_is_acked_at_once_for_acked_spans_and_waits_again_for_missing_ones() {
    let mut c = Coordinator::new("a", 2, 2, 1_000);
    c.write(1, "doc", vec![span(1, 1)], targets(&[]), 0);
    c.durable("doc", &durable(1), 1);
    c.peer_ack("b", "doc", &upto(1), &upto(1), 2);

    // Dot 1 again: acked already, at once, with no new quorum.
    let (missing, acts) = c.retry(2, "doc", vec![span(1, 1)], targets(&[]), &durable(1), 3);
    assert!(missing.is_empty());
    assert_eq!(acks(&acts), [(2, upto(1), 0, 0)]);
    assert!(c.is_idle("doc"));

    // Dots 1 and 2, where 2 was applied here but its quorum timed out: only 2 goes out
    // again. This node's durable version already holds it (1 of 2); b holds only dot 1.
    c.write(3, "doc", vec![span(2, 2)], targets(&[]), 4);
    assert_eq!(errors(&c.tick(2_000, |_| targets(&[]))), [3]);
    let (missing, acts) =
        c.retry(3, "doc", vec![span(1, 1), span(2, 2)], targets(&["b"]), &durable(2), 2_001);
    assert_eq!(missing, [span(2, 2)]);
    assert!(acks(&acts).is_empty(), "{acts:?}");
    assert_eq!(c.standing_in_for("doc"), Vec::<String>::new());
    assert_eq!(acks(&c.peer_ack("d", "doc", &upto(2), &upto(2), 2_010)), [(3, upto(2), 1, 1)]);
}

#[test]
fn a_read_with_r_1_is_answered_at_once_and_with_r_2_waits_for_a_fresh_answer() {
    let mut one = Coordinator::new("a", 2, 1, 1_000);
    assert_eq!(answers(&one.read(1, "doc", targets(&[]), 0)), [1]);
    assert!(one.is_idle("doc"));

    // R = 2 at an owner: its own copy is one answer, one peer must add another.
    let mut c = Coordinator::new("a", 2, 2, 1_000);
    let acts = c.read(1, "doc", targets(&[]), 0);
    assert!(answers(&acts).is_empty());
    assert_eq!(probes(&acts), ["b", "c"]);
    assert!(c.peer_answered("d", "doc").is_empty(), "d is not a target");
    assert_eq!(answers(&c.peer_answered("c", "doc")), [1]);
    assert!(c.is_idle("doc"));
    assert!(c.peer_answered("b", "doc").is_empty(), "answered once");

    // At a node that is no target, two peers must answer; one answering twice is one.
    let mut x = Coordinator::new("x", 2, 2, 1_000);
    assert_eq!(probes(&x.read(5, "doc", targets(&[]), 0)), ["a", "b", "c"]);
    assert!(x.peer_answered("a", "doc").is_empty());
    assert!(x.peer_answered("a", "doc").is_empty());
    // A read that starts later waits for answers of its own, too.
    assert_eq!(probes(&x.read(6, "doc", targets(&[]), 1)), ["a", "b", "c"]);
    assert_eq!(answers(&x.peer_answered("b", "doc")), [5]);
    assert_eq!(answers(&x.peer_answered("c", "doc")), [6]);
}

#[test]
fn a_late_read_goes_on_against_the_targets_of_now_keeping_answers_still_among_them() {
    let mut x = Coordinator::new("x", 2, 2, 1_000);
    x.read(1, "doc", targets(&[]), 0);
    x.peer_answered("a", "doc");
    assert!(x.tick(999, |_| targets(&[])).is_empty(), "not late yet");

    // b and c went down: d and e stand in. a's answer still counts; b's no longer does.
    let acts = x.tick(1_000, |_| targets(&["b", "c"]));
    assert_eq!(errors(&acts), [1]);
    assert_eq!(probes(&acts), ["d", "e"]);
    assert!(x.peer_answered("b", "doc").is_empty());
    assert_eq!(answers(&x.peer_answered("e", "doc")), [1]);

    // Not answered in time again: reported again, a new round of probes.
    x.read(2, "doc", targets(&[]), 2_000);
    assert_eq!(errors(&x.tick(3_000, |_| targets(&[]))), [2]);
    assert_eq!(errors(&x.tick(3_500, |_| targets(&[]))), Vec::<u64>::new());
    let acts = x.tick(4_000, |_| targets(&[]));
    assert_eq!((errors(&acts), probes(&acts)), (vec![2], vec!["a", "b", "c"]));
}

#[test]
fn a_late_read_that_the_targets_of_now_complete_is_answered_without_an_error() {
    // d is no target at first; when a, b go down it stands in, and its own copy plus
    // c's answer make R.
    let mut d = Coordinator::new("d", 2, 2, 1_000);
    d.read(1, "doc", targets(&[]), 0);
    d.peer_answered("c", "doc");
    let acts = d.tick(1_000, |_| targets(&["a", "b"]));
    assert_eq!((answers(&acts), errors(&acts)), (vec![1], vec![]));
}

#[test]
fn a_late_write_is_reported_and_dropped() {
    let mut c = Coordinator::new("a", 2, 2, 1_000);
    c.write(1, "doc", vec![span(1, 1)], targets(&[]), 0);
    c.durable("doc", &durable(1), 1);
    assert!(c.tick(999, |_| targets(&[])).is_empty());
    assert_eq!(errors(&c.tick(1_000, |_| targets(&[]))), [1]);
    assert!(c.is_idle("doc"));
    assert!(acks(&c.peer_ack("b", "doc", &upto(1), &upto(1), 1_001)).is_empty(), "nobody waits");
}

#[test]
fn a_closed_connection_drops_its_reads_but_not_its_writes() {
    let mut c = Coordinator::new("a", 2, 2, 1_000);
    c.read(1, "doc", targets(&[]), 0);
    c.read(2, "doc", targets(&[]), 0);
    c.write(1, "doc", vec![span(1, 1)], targets(&[]), 0);
    c.closed(1);
    assert_eq!(answers(&c.peer_answered("b", "doc")), [2]);
    c.durable("doc", &durable(1), 1);
    assert_eq!(acks(&c.peer_ack("b", "doc", &upto(1), &upto(1), 2)).len(), 1, "the write completes");
    assert!(c.is_idle("doc"));
    assert!(c.tick(5_000, |_| targets(&[])).is_empty(), "nothing left to report");
}

#[test]
fn owners_acks_raise_the_acked_version_for_every_client() {
    let mut c = Coordinator::new("a", 2, 2, 1_000);
    c.read(1, "doc", targets(&[]), 0); // learns the owners a, b, c
    assert!(c.acked("doc", &upto(2)).is_empty(), "only a holds it");
    let acts = c.peer_ack("b", "doc", &upto(1), &upto(2), 1);
    assert_eq!(acts, [Action::Acked { doc: "doc".into(), vv: upto(1) }]);
    assert!(c.peer_ack("b", "doc", &upto(1), &upto(2), 2).is_empty(), "nothing new");
    let acts = c.peer_ack("c", "doc", &upto(2), &upto(2), 3);
    assert_eq!(acts, [Action::Acked { doc: "doc".into(), vv: upto(2) }]);
    assert_eq!(c.acked("doc", &upto(0)), upto(2), "what was acked stays acked");
}

/// Regression: a coordinator that is not an owner holds a copy of what its clients wrote,
/// but nothing hands that copy over. Counting it with one owner's ack told clients a
/// write was on W replicas while it was on one.
#[test]
fn a_copy_that_is_nobodys_replica_does_not_make_the_acked_version() {
    let mut x = Coordinator::new("x", 2, 2, 1_000);
    x.write(1, "doc", vec![span(1, 1)], targets(&[]), 0);
    assert!(x.durable("doc", &durable(1), 1).is_empty());
    assert!(x.peer_ack("a", "doc", &upto(1), &upto(1), 2).is_empty(), "one replica holds it");
    assert!(x.acked("doc", &upto(1)).is_empty());
    assert_eq!(acks(&x.peer_ack("b", "doc", &upto(1), &upto(1), 3)).len(), 1);

    // A fallback's ack counts for the write it was sent, never for the acked version:
    // once its hint is delivered its copy is its owner's, which would count it again.
    let mut y = Coordinator::new("a", 2, 2, 1_000);
    y.read(1, "doc", targets(&["b"]), 0);
    assert!(y.peer_ack("d", "doc", &upto(1), &upto(1), 1).is_empty());
    assert!(y.acked("doc", &upto(1)).is_empty());
    assert!(!y.peer_ack("c", "doc", &upto(1), &upto(1), 2).is_empty());
}

/// Regression: a fallback acknowledged a version before (standing in for an owner that
/// came back since: its hint delivered and deleted). That says nothing about a hint it
/// keeps for a new write: only a fresh ack, sent after it stored one, counts.
#[test]
fn a_fallbacks_earlier_ack_does_not_count_for_a_new_write() {
    let mut c = Coordinator::new("x", 2, 2, 1_000);
    c.write(1, "doc", vec![span(1, 1)], targets(&["a"]), 0);
    c.peer_ack("d", "doc", &upto(2), &upto(0), 1); // d already holds dot 2
    c.peer_ack("b", "doc", &upto(2), &upto(0), 2); // so does the owner b
    let acts = c.write(2, "doc", vec![span(2, 2)], targets(&["a"]), 3);
    assert!(acks(&acts).is_empty(), "b counts at once, d does not: {acts:?}");
    assert_eq!(acks(&c.peer_ack("d", "doc", &upto(2), &upto(0), 5)), [(2, upto(2), 1, 1)]);
}

#[test]
fn standing_in_for_names_the_owners_of_writes_still_waiting() {
    let mut d = Coordinator::new("d", 2, 2, 1_000);
    d.write(1, "doc", vec![span(1, 1)], targets(&["b"]), 0); // d for b
    d.write(2, "doc", vec![span(2, 2)], targets(&[]), 0); // d no target
    assert_eq!(d.standing_in_for("doc"), ["b"]);
    assert!(d.standing_in_for("other").is_empty());
    d.durable("doc", &durable(1), 1);
    d.peer_ack("a", "doc", &upto(1), &upto(1), 2);
    assert!(d.standing_in_for("doc").is_empty(), "that write is acked");
}
