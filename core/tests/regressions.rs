//! Hand-minimised scenarios of the bugs the network simulation (`sim.rs`) found, and of
//! the ones found while reading the protocol against it. Each sets up two replicas and
//! delivers frames in the order that went wrong. (The seeds that first showed them are
//! kept in `sim.rs`.)

mod simnet;

use concord_core::sync::msg::{MerkleStart, StateChunk};
use concord_core::sync::{Event, Msg, SessionConfig};
use concord_core::{DocConfig, Document, ReplicaId, Value};
use simnet::pair::Pair;

const D: &str = "d";

fn cfg() -> SessionConfig {
    SessionConfig::default()
}

/// A document config whose delta log keeps one delta: anything older goes by Merkle.
fn tiny_log() -> DocConfig {
    DocConfig { log_capacity: 1, pending_capacity: 64 }
}

/// Merkle descent even for small documents.
fn merkle_only() -> SessionConfig {
    SessionConfig { full_state_keys: 0, ..SessionConfig::default() }
}

fn synced_events(events: &[Event]) -> usize {
    events.iter().filter(|e| matches!(e, Event::Synced { .. })).count()
}

#[test]
fn synced_is_not_announced_before_the_deltas_it_covers_arrive() {
    let mut p = Pair::new(cfg(), DocConfig::default(), &[D]);
    p.doc(1, D).increment("likes", 2).unwrap();
    p.doc(1, D).increment("likes", 3).unwrap();
    p.subscribe(0, D);
    p.deliver_all(1).unwrap();
    // Replica 1 answered with [Subscribe back, Deltas, Synced]; the network reorders:
    // Synced first.
    let frames = p.take(0);
    let (synced, rest): (Vec<_>, Vec<_>) =
        frames.into_iter().partition(|f| matches!(Msg::decode(f), Ok(Msg::Synced(_))));
    assert_eq!(synced.len(), 1);
    let ev = p.handle(0, &synced[0]).unwrap();
    assert_eq!(synced_events(&ev), 0, "Synced announced while the document lacks the deltas: {ev:?}");
    assert!(!p.sess[0].is_synced(D));
    for f in rest {
        p.handle(0, &f).unwrap();
    }
    assert_eq!(p.doc(0, D).counter("likes"), 5);
    assert!(p.sess[0].is_synced(D), "settles once the deltas are in");
    assert_eq!(synced_events(&p.events[0]), 1);
}

#[test]
fn synced_whose_deltas_were_lost_is_not_announced_and_the_subscription_is_retried() {
    let mut p = Pair::new(SessionConfig { stall_ticks: 3, ..cfg() }, DocConfig::default(), &[D]);
    p.doc(1, D).increment("likes", 2).unwrap();
    p.subscribe(0, D);
    p.deliver_all(1).unwrap();
    for f in p.take(0) {
        if !matches!(Msg::decode(&f), Ok(Msg::Deltas(_))) {
            p.handle(0, &f).unwrap(); // the deltas are lost
        }
    }
    assert!(!p.sess[0].is_synced(D));
    for _ in 0..3 {
        p.tick(0);
    }
    assert!(p.peek(1).iter().any(|m| matches!(m, Msg::Subscribe(_))), "a stalled subscription is resent");
    p.settle().unwrap();
    assert_eq!(p.doc(0, D).counter("likes"), 2);
    assert!(p.sess[0].is_synced(D));
}

/// Replica 1 is ahead by more than its log holds, so replica 0's subscription is answered
/// by a Merkle descent; replica 1 writes to a key of that descent before the key's state
/// is asked for. Before the fix the state sent was newer than the version the exchange
/// announced: a set add was rejected ("set element has a dot outside the causal
/// context"), and a counter's increment arrived as state the receiver's version did not
/// cover (it could never be told apart again).
#[test]
fn a_write_during_a_merkle_descent_is_not_shipped_beyond_the_announced_version() {
    let mut p = Pair::new(merkle_only(), tiny_log(), &[D]);
    for i in 0..5 {
        p.doc(1, D).set_add("tags", Value::Int(i)).unwrap();
        p.doc(1, D).increment("likes", 1).unwrap();
    }
    p.doc(0, D).increment("views", 1).unwrap();
    p.subscribe(0, D);
    // Run the descent until replica 0 asks for keys, then write on replica 1.
    let mut asked = false;
    for _ in 0..20 {
        if p.peek(1).iter().any(|m| matches!(m, Msg::KeysQuery(_))) {
            asked = true;
            break;
        }
        p.deliver_all(1).unwrap();
        p.deliver_all(0).unwrap();
    }
    assert!(asked, "the catch-up went by Merkle descent");
    let add = p.doc(1, D).set_add("tags", Value::Int(99)).unwrap();
    let inc = p.doc(1, D).increment("likes", 10).unwrap();
    // The live push of those writes is lost; only the resync repairs it.
    let _ = (add, inc);
    p.settle().unwrap();
    // Whatever replica 0 holds, its version must account for it.
    let d0 = p.doc(0, D).clone();
    assert_eq!(d0.counter("likes") > 5, d0.version().get(ReplicaId(2)) == 12, "state beyond the version");
    // And after a refresh both sides are equal.
    p.subscribe(0, D);
    p.subscribe(1, D);
    p.settle().unwrap();
    let (a, b) = (p.doc(0, D).clone(), p.doc(1, D).clone());
    assert_eq!(a, b);
    assert_eq!(a.counter("likes"), 15);
    assert!(a.set_contains("tags", &Value::Int(99)));
}

/// The divergence of seed 53: a Merkle descent finds a set key equal on both sides; after
/// that comparison an add reaches replica 0 from a third replica — an add that replica 1
/// had already removed. Adopting replica 1's version marks the remove as seen, so replica
/// 0 would keep the element forever while everyone else dropped it.
#[test]
fn an_add_that_arrives_during_a_merkle_descent_yields_to_the_remove_the_peer_already_applied() {
    let third = ReplicaId(3);
    let mut c = Document::with_config(third, DocConfig::default());
    let base = c.set_add("tags", Value::from("keep")).unwrap();
    let doomed = c.set_add("tags", Value::from("doomed")).unwrap();

    let mut p = Pair::new(merkle_only(), tiny_log(), &[D]);
    // Both hold "keep"; replica 1 also got "doomed" and removed it, and moved on further
    // than its log reaches.
    p.doc(0, D).apply(base.clone()).unwrap();
    p.doc(1, D).apply(base).unwrap();
    p.doc(1, D).apply(doomed.clone()).unwrap();
    p.doc(1, D).set_remove("tags", &Value::from("doomed")).unwrap().unwrap();
    for _ in 0..3 {
        p.doc(1, D).increment("likes", 1).unwrap();
    }
    assert_eq!(p.doc(0, D).set_values("tags"), p.doc(1, D).set_values("tags"));

    p.subscribe(0, D);
    p.deliver_all(1).unwrap(); // MerkleStart (and replica 1 subscribes back)
    p.deliver_all(0).unwrap(); // replica 0 compares the root: the set's subtree is equal
                               // Now the add arrives at replica 0 from the third replica.
    p.doc(0, D).apply(doomed).unwrap();
    assert!(p.doc(0, D).set_contains("tags", &Value::from("doomed")));
    p.settle().unwrap();
    assert!(
        !p.doc(0, D).set_contains("tags", &Value::from("doomed")),
        "replica 0 adopted replica 1's version but kept an element replica 1 removed"
    );
    assert_eq!(p.doc(0, D).clone(), p.doc(1, D).clone());
}

#[test]
fn an_unsubscribe_stops_both_directions() {
    let mut p =
        Pair::new(SessionConfig { stall_ticks: 2, resync_ticks: 4, ..cfg() }, DocConfig::default(), &[D]);
    p.subscribe(0, D);
    p.settle().unwrap();
    assert!(p.sess[0].peer_subscribed(D) && p.sess[1].peer_subscribed(D));
    let msgs = p.sess[0].unsubscribe(D);
    p.send(0, msgs);
    p.settle().unwrap();
    // Replica 0 closed the document.
    p.docs[0].remove(D);
    for _ in 0..20 {
        p.tick(0);
        p.tick(1);
        assert!(
            p.peek(0).iter().chain(p.peek(1).iter()).all(|m| !matches!(m, Msg::Subscribe(_))),
            "the subscription came back after an unsubscribe"
        );
        p.settle().unwrap();
    }
    assert!(!p.sess[1].peer_subscribed(D));
    // Live writes no longer go to replica 0.
    let delta = p.doc(1, D).increment("likes", 1).unwrap();
    assert!(p.sess[1].on_local_delta(D, &delta).is_empty());
}

#[test]
fn a_catch_up_that_keeps_progressing_is_not_restarted_by_the_periodic_refresh() {
    // Four round trips of Merkle descent plus the key transfer take longer than the
    // refresh period, though every step comes well within the stall limit.
    let cfg = SessionConfig { full_state_keys: 0, stall_ticks: 4, resync_ticks: 6, ..cfg() };
    let mut p = Pair::new(cfg, tiny_log(), &[D]);
    for i in 0..8 {
        p.doc(1, D).increment(&format!("k{i}"), 1).unwrap();
    }
    p.subscribe(0, D);
    for _ in 0..40 {
        // One hop per tick each way: a round trip takes two ticks.
        p.deliver_all(1).unwrap();
        p.tick(0);
        p.deliver_all(0).unwrap();
        p.tick(0);
        if p.sess[0].is_synced(D) {
            break;
        }
    }
    assert!(p.sess[0].is_synced(D), "the catch-up never finished");
    assert_eq!(p.doc(0, D).len(), 8);
}

#[test]
fn a_duplicate_merkle_start_after_settling_does_not_reopen_the_transfer() {
    let mut p = Pair::new(SessionConfig { resync_ticks: 5, ..cfg() }, tiny_log(), &[D]);
    p.doc(1, D).increment("a", 1).unwrap();
    p.doc(1, D).increment("b", 1).unwrap();
    p.subscribe(0, D);
    p.deliver_all(1).unwrap();
    let frames = p.take(0);
    let start = frames.iter().find(|f| matches!(Msg::decode(f), Ok(Msg::MerkleStart(_)))).cloned().unwrap();
    for f in &frames {
        p.handle(0, f).unwrap();
    }
    p.settle().unwrap();
    assert!(p.sess[0].is_synced(D));
    // The network duplicated the start; its state chunks are not duplicated.
    p.handle(0, &start).unwrap();
    assert!(p.sess[0].is_synced(D), "a stale transfer reopened a settled subscription");
    // And the periodic refresh still runs (a stuck transfer would block it).
    for _ in 0..5 {
        p.tick(0);
    }
    assert!(p.peek(1).iter().any(|m| matches!(m, Msg::Subscribe(_))));
}

#[test]
fn a_merkle_start_announcing_four_billion_chunks_costs_nothing() {
    let mut p = Pair::new(cfg(), DocConfig::default(), &[D]);
    p.subscribe(0, D);
    p.take(1);
    let doc = p.doc(1, D).clone();
    let start = Msg::MerkleStart(MerkleStart {
        doc: D.into(),
        exchange: 7,
        vv: doc.version().clone(),
        ctx: doc.context().clone(),
        children: Vec::new(),
        full_chunks: u32::MAX,
        keys: u64::MAX,
    });
    let t = std::time::Instant::now();
    p.handle(0, &start.encode()).unwrap();
    let chunk = |n| {
        Msg::State(StateChunk {
            doc: D.into(),
            exchange: 7,
            chunk: n,
            answered: Vec::new(),
            fields: Vec::new(),
            done: 0,
            total: 0,
        })
    };
    p.handle(0, &chunk(u32::MAX).encode()).unwrap(); // out of range: ignored
    p.handle(0, &chunk(3).encode()).unwrap();
    assert!(t.elapsed() < std::time::Duration::from_secs(1), "took {:?}", t.elapsed());
    assert!(!p.sess[0].is_synced(D));
}

/// A state that `r` (the relay's copy of `D`) took in from elsewhere, other than by deltas:
/// the writes of replica 9, made beyond its delta log, merged by state.
fn merge_foreign_state(r: &mut Document, elements: i64) {
    let mut w = Document::with_config(ReplicaId(9), tiny_log());
    for i in 0..elements {
        w.set_add("s", Value::Int(i)).unwrap();
    }
    r.merge_state(w.all_fields(), w.context(), w.version()).unwrap();
}

/// Found by the package's large-document test: a client that came online with more
/// writes than its delta log holds hands them to the relay by a state transfer, and no
/// delta carries them on to the relay's other subscribers, which saw them only at their
/// next refresh (30 s later). The relay now tells them its version; a subscriber that
/// settled already and lacks it subscribes again at once.
#[test]
fn a_state_taken_in_from_one_peer_reaches_the_other_subscribers_without_a_refresh() {
    // Link `a`: the relay (0) and a writer (1). Link `b`: the relay (0) and a reader (1),
    // with a replica id of its own. Both links see one copy of the relay's document.
    let mut a = Pair::new(cfg(), tiny_log(), &[D]);
    let mut b = Pair::new(cfg(), tiny_log(), &[D]);
    b.docs[1].insert(D.into(), Document::with_config(ReplicaId(3), tiny_log()));
    b.subscribe(1, D);
    b.settle().unwrap();
    assert!(b.sess[1].is_synced(D));

    for i in 0..10 {
        a.doc(1, D).set_add("s", Value::Int(i)).unwrap();
    }
    a.subscribe(1, D);
    a.settle().unwrap();
    assert!(a.events[0].iter().any(|e| matches!(e, Event::StateMerged { .. })), "{:?}", a.events[0]);
    let relay = a.doc(0, D).clone();
    assert_eq!(relay.set_values("s").len(), 10);
    b.docs[0].insert(D.into(), relay);

    let tell = b.sess[0].on_state_merged(D, &mut b.docs[0]);
    assert!(matches!(&tell[..], [Msg::Synced(_)]), "{tell:?}");
    b.send(0, tell);
    b.settle().unwrap();
    assert_eq!(b.doc(1, D).set_values("s").len(), 10, "the reader caught up without a tick");
    assert!(b.sess[1].is_synced(D));
    assert!(a.sess[0].on_state_merged(D, &mut a.docs[0]).is_empty(), "the writer has it all");
}

/// The relay's version arrives while a transfer into the subscriber is under way, ahead of
/// the transfer's chunks (a reordering link): the subscriber checks it once the transfer
/// ends, and subscribes again for what the transfer did not bring.
#[test]
fn a_version_announced_during_a_transfer_is_caught_up_after_it() {
    let mut p = Pair::new(cfg(), tiny_log(), &[D]);
    for i in 0..5 {
        p.doc(1, D).increment(&format!("k{i}"), 1).unwrap();
    }
    p.subscribe(0, D);
    p.deliver_all(1).unwrap();
    // Replica 1 answered [Subscribe back, MerkleStart, State...]; then it takes in a
    // state and announces its version.
    let mut frames = p.take(0);
    merge_foreign_state(p.doc(1, D), 20);
    let tell = p.sess[1].on_state_merged(D, &mut p.docs[1]);
    assert!(matches!(&tell[..], [Msg::Synced(_)]), "{tell:?}");
    let at = frames.iter().position(|f| matches!(Msg::decode(f), Ok(Msg::State(_)))).unwrap();
    frames.splice(at..at, tell.iter().map(Msg::encode));
    for f in frames {
        p.handle(0, &f).unwrap();
    }
    assert_eq!(p.doc(0, D).counter("k4"), 1, "the transfer completed");
    assert!(
        p.peek(1).iter().any(|m| matches!(m, Msg::Subscribe(_))),
        "and subscribed again for the rest: {:?}",
        p.peek(1)
    );
    p.settle().unwrap();
    assert_eq!(p.doc(0, D).set_values("s").len(), 20);
    assert_eq!(p.docs[0][D].version(), p.docs[1][D].version());
}

/// A `Synced` that a settled subscriber already covers (a late or duplicated answer, or
/// a version told of state it got already) changes nothing and sends nothing.
#[test]
fn a_covered_synced_after_settling_sends_nothing() {
    let mut p = Pair::new(cfg(), tiny_log(), &[D]);
    for i in 0..5 {
        p.doc(1, D).set_add("s", Value::Int(i)).unwrap();
    }
    p.subscribe(0, D);
    p.settle().unwrap();
    assert!(p.sess[0].is_synced(D));
    let tell = p.sess[1].on_state_merged(D, &mut p.docs[1]);
    let vv = p.doc(1, D).version().clone();
    let dup = Msg::Synced(concord_core::sync::msg::Synced { doc: D.into(), vv });
    for m in tell.into_iter().chain([dup]) {
        p.handle(0, &m.encode()).unwrap();
    }
    assert!(p.queue[1].is_empty(), "{:?}", p.peek(1));
    assert!(p.sess[0].is_synced(D));
}
