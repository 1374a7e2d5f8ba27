//! A key larger than one frame still travels: state transfers split a large set into
//! pieces below the frame limit and the receiver joins them again, whatever their order.

mod simnet;

use concord_core::sync::{Msg, SessionConfig};
use concord_core::{DocConfig, Value};
use simnet::pair::Pair;

const DOC: &str = "big";
const MAX_FRAME: usize = 4 * 1024;

fn cfg(full_state_keys: usize) -> SessionConfig {
    SessionConfig { max_frame: MAX_FRAME, full_state_keys, ..SessionConfig::default() }
}

/// A log too short to answer from, so every catch-up is a state transfer.
fn short_log() -> DocConfig {
    DocConfig { log_capacity: 1, ..DocConfig::default() }
}

fn fill(p: &mut Pair, side: usize, elements: usize, extra_keys: usize) {
    let d = p.doc(side, DOC);
    for i in 0..elements {
        d.set_add("tags", Value::from(format!("element-{i:06}"))).unwrap();
    }
    for k in 0..extra_keys {
        d.increment(&format!("k{k}"), 1).unwrap();
    }
}

fn assert_frames_fit(p: &Pair, i: usize) {
    for f in &p.queue[i] {
        assert!(f.len() <= MAX_FRAME, "a frame of {} bytes exceeds the limit of {MAX_FRAME}", f.len());
    }
}

/// Delivers everything, checking every frame against the limit, optionally reversing the
/// order of the state chunks in each batch (the `MerkleStart` that opens a transfer comes
/// before its chunks on any ordered link; the chunks may come in any order).
fn settle_checked(p: &mut Pair, reverse: bool) {
    for _ in 0..1000 {
        if p.queue[0].is_empty() && p.queue[1].is_empty() {
            return;
        }
        for i in 0..2 {
            assert_frames_fit(p, i);
            let mut frames = p.take(i);
            if reverse {
                let is_state = |f: &Vec<u8>| matches!(Msg::decode(f), Ok(Msg::State(_)));
                let (mut states, mut rest): (Vec<_>, Vec<_>) = frames.into_iter().partition(is_state);
                states.reverse();
                rest.append(&mut states);
                frames = rest;
            }
            for f in frames {
                p.handle(i, &f).unwrap();
            }
        }
    }
    panic!("did not settle");
}

fn assert_converged(p: &mut Pair, elements: usize) {
    assert_eq!(p.doc(1, DOC).set_values("tags").len(), elements);
    let a = p.doc(0, DOC).to_value();
    let b = p.doc(1, DOC).to_value();
    assert!(a == b, "the replicas differ");
}

#[test]
fn a_set_larger_than_a_frame_arrives_whole_in_a_whole_state_transfer() {
    let mut p = Pair::new(cfg(256), short_log(), &[DOC]);
    fill(&mut p, 0, 5_000, 3);
    p.subscribe(1, DOC);
    settle_checked(&mut p, false);
    assert_converged(&mut p, 5_000);
}

#[test]
fn pieces_of_a_large_set_join_in_any_order() {
    let mut p = Pair::new(cfg(256), short_log(), &[DOC]);
    fill(&mut p, 0, 5_000, 0);
    p.subscribe(1, DOC);
    settle_checked(&mut p, true);
    assert_converged(&mut p, 5_000);
}

#[test]
fn a_merkle_catch_up_that_meets_a_large_key_restarts_as_a_counted_transfer() {
    // More keys than a whole-state transfer takes, so the catch-up descends the Merkle
    // tree and asks for the differing keys, one of which does not fit in a frame.
    let mut p = Pair::new(cfg(8), short_log(), &[DOC]);
    fill(&mut p, 0, 5_000, 40);
    p.subscribe(1, DOC);
    settle_checked(&mut p, false);
    assert_converged(&mut p, 5_000);
    assert_eq!(p.doc(1, DOC).counter("k39"), 1);
}

#[test]
fn a_large_set_that_both_sides_changed_converges_in_pieces() {
    let mut p = Pair::new(cfg(8), short_log(), &[DOC]);
    fill(&mut p, 0, 4_000, 20);
    {
        let d = p.doc(1, DOC);
        for i in 0..1_500 {
            d.set_add("tags", Value::from(format!("other-{i:06}"))).unwrap();
        }
    }
    p.subscribe(1, DOC);
    p.subscribe(0, DOC);
    settle_checked(&mut p, false);
    assert_converged(&mut p, 5_500);
    let states = p.peek(1).iter().filter(|m| matches!(m, Msg::State(_))).count();
    assert_eq!(states, 0, "nothing left in flight");
}
