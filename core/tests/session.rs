//! A session fed garbage — random bytes, truncated frames, unknown tags, a foreign
//! protocol version, deltas and states that break invariants — answers with a typed
//! [`SyncError`] (or an `UNKNOWN_TAG` error reply), never panics, changes nothing, and
//! afterwards still syncs another document over the same session.

mod simnet;

use concord_core::sync::msg::{tag, Deltas, Hello, MerkleStart, StateChunk, Subscribe, MIN_PROTOCOL_VERSION};
use concord_core::sync::{ErrorCode, FrameError, Msg, SessionConfig, SyncError, PROTOCOL_VERSION};
use concord_core::{
    CausalContext, Delta, DocConfig, DocError, Document, Dot, Field, GCounter, OrSet, ReplicaId, Value,
    VersionVector,
};
use simnet::pair::Pair;
use simnet::Rng;

const VICTIM: &str = "victim";
const OTHER: &str = "other";

fn pair() -> Pair {
    Pair::new(SessionConfig::default(), DocConfig::default(), &[VICTIM, OTHER])
}

/// Replica 1 writes to `OTHER`, replica 0 subscribes over the same session and gets it.
fn other_document_still_syncs(p: &mut Pair) {
    let before = p.doc(0, OTHER).counter("n");
    let delta = p.doc(1, OTHER).increment("n", 7).unwrap();
    let live = p.sess[1].on_local_delta(OTHER, &delta);
    p.send(1, live);
    p.subscribe(0, OTHER);
    p.settle().expect("a well-formed sync after garbage");
    assert_eq!(p.doc(0, OTHER).counter("n"), before + 7);
    assert!(p.sess[0].is_synced(OTHER));
    assert_eq!(p.doc(0, OTHER).clone(), p.doc(1, OTHER).clone());
}

/// Valid frames of every kind, taken from a real sync (deltas, Merkle descent, state).
fn valid_frames() -> Vec<Vec<u8>> {
    let cfg = SessionConfig { full_state_keys: 0, ..SessionConfig::default() };
    let mut p = Pair::new(cfg, DocConfig { log_capacity: 1, pending_capacity: 8 }, &[VICTIM]);
    for i in 0..6 {
        p.doc(1, VICTIM).set_add("tags", Value::Int(i)).unwrap();
        p.doc(1, VICTIM).increment(&format!("k{i}"), 2).unwrap();
    }
    p.doc(1, VICTIM).set_register("title", Value::from("hello"), 5).unwrap();
    p.doc(1, VICTIM).set_remove("tags", &Value::Int(1)).unwrap();
    p.doc(1, VICTIM).pn_add("votes", -3).unwrap();
    let mut frames = vec![p.sess[0].hello(Some("token".into())).encode()];
    p.subscribe(0, VICTIM);
    for _ in 0..20 {
        for i in 0..2 {
            let fs = p.take(i);
            frames.extend(fs.iter().cloned());
            for f in fs {
                p.handle(i, &f).unwrap();
            }
        }
    }
    let delta = p.doc(1, VICTIM).set_add("tags", Value::from("x")).unwrap();
    frames.extend(p.sess[1].on_local_delta(VICTIM, &delta).iter().map(Msg::encode));
    frames.push(p.sess[1].ack(VICTIM, &p.docs[1][VICTIM].version().clone()).encode());
    frames.push(p.sess[1].unsubscribe(VICTIM).iter().map(Msg::encode).next().unwrap_or_default());
    let kinds: std::collections::BTreeSet<u8> = frames.iter().filter_map(|f| f.first().copied()).collect();
    for t in [tag::HELLO, tag::SUBSCRIBE, tag::DELTAS, tag::MERKLE_START, tag::MERKLE_QUERY, tag::STATE] {
        assert!(kinds.contains(&t), "no frame with tag {t:#x} in {kinds:?}");
    }
    frames
}

#[test]
fn random_bytes_are_typed_errors_and_the_session_stays_usable() {
    let mut p = pair();
    let mut rng = Rng::new(0xBAD);
    let tags = [
        tag::HELLO,
        tag::SUBSCRIBE,
        tag::DELTAS,
        tag::SYNCED,
        tag::ACK,
        tag::UNSUBSCRIBE,
        tag::MERKLE_START,
        tag::MERKLE_QUERY,
        tag::MERKLE_NODES,
        tag::MERKLE_LEAVES,
        tag::KEYS_QUERY,
        tag::STATE,
        tag::ERROR,
    ];
    let victim_before = p.doc(0, VICTIM).clone();
    for _ in 0..20_000 {
        let len = rng.below(64) as usize;
        let mut f: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        if !f.is_empty() && rng.chance(800) {
            f[0] = *rng.pick(&tags); // a known tag, so the body parser is what is tested
        }
        // Whatever it is, it must not panic; refusals are typed.
        match p.sess[0].handle(&f, &mut p.docs[0]) {
            Ok(_) | Err(SyncError::Frame(_) | SyncError::Doc { .. } | SyncError::Version { .. }) => {}
            Err(e) => panic!("unexpected refusal {e:?} of {f:?}"),
        }
    }
    // Random bytes that happened to decode may have subscribed or sent deltas; the
    // victim holds nothing but valid state.
    let v = p.doc(0, VICTIM).clone();
    let _ = victim_before;
    assert!(Document::decode(&v.encode(), DocConfig::default()).is_ok());
    p.queue = [Vec::new(), Vec::new()];
    other_document_still_syncs(&mut p);
}

#[test]
fn mutated_valid_frames_never_panic_and_leave_only_valid_state() {
    let frames = valid_frames();
    let mut rng = Rng::new(0x5EED);
    for round in 0..4 {
        // Replica 0 receives replica 1's mutated frames in a sync of its own.
        let mut p = Pair::new(
            SessionConfig { full_state_keys: round, ..SessionConfig::default() },
            DocConfig { log_capacity: 2, pending_capacity: 8 },
            &[VICTIM, OTHER],
        );
        p.subscribe(0, VICTIM);
        for _ in 0..5_000 {
            let mut f = rng.pick(&frames).clone();
            for _ in 0..rng.range(1, 4) {
                let at = rng.below(f.len() as u64 + 1) as usize;
                match rng.below(3) {
                    0 if at < f.len() => f[at] ^= 1 << rng.below(8),
                    1 => f.insert(at, rng.next_u64() as u8),
                    _ if at < f.len() => {
                        f.remove(at);
                    }
                    _ => {}
                }
            }
            let _ = p.sess[0].handle(&f, &mut p.docs[0]);
        }
        let v = p.doc(0, VICTIM).clone();
        let back = Document::decode(&v.encode(), DocConfig::default()).expect("state stays valid");
        assert_eq!(back, v);
        p.queue = [Vec::new(), Vec::new()];
        other_document_still_syncs(&mut p);
    }
}

#[test]
fn every_truncation_of_a_valid_frame_is_refused_without_panic() {
    let mut p = pair();
    let frames = valid_frames();
    assert!(frames.len() > 10);
    let mut refused = 0;
    for f in &frames {
        for cut in 0..f.len() {
            match p.sess[0].handle(&f[..cut], &mut p.docs[0]) {
                Err(SyncError::Frame(FrameError::Empty | FrameError::Malformed { .. })) => refused += 1,
                // A prefix can itself be a shorter valid message (a varint cut short
                // at a boundary); then it is handled like any other.
                Ok(_) | Err(SyncError::Doc { .. }) => {}
                Err(e) => panic!("truncation at {cut} of {f:?}: {e:?}"),
            }
        }
    }
    assert!(refused > 100, "only {refused} truncations were refused");
    p.queue = [Vec::new(), Vec::new()];
    other_document_still_syncs(&mut p);
}

#[test]
fn an_unknown_tag_is_answered_with_an_unknown_tag_error_and_nothing_else_changes() {
    let mut p = pair();
    for t in [0x00u8, 0x07, 0x0f, 0x16, 0x42, 0x7e, 0x80, 0xff] {
        let out = p.sess[0].handle(&[t, 1, 2, 3], &mut p.docs[0]).expect("unknown tags are tolerated");
        assert!(out.events.is_empty());
        match out.replies.as_slice() {
            [Msg::Error(e)] => {
                assert_eq!(e.code, ErrorCode::UNKNOWN_TAG);
                assert!(e.message.contains(&format!("{t:02x}")), "{}", e.message);
            }
            other => panic!("tag {t:#x}: {other:?}"),
        }
    }
    other_document_still_syncs(&mut p);
}

#[test]
fn a_hello_with_a_protocol_this_build_cannot_speak_is_refused_naming_both_versions() {
    let mut p = pair();
    let alien = Msg::Hello(Hello {
        protocol: PROTOCOL_VERSION + 40,
        min_protocol: PROTOCOL_VERSION + 30,
        replica: ReplicaId(9),
        token: None,
    });
    match p.sess[0].handle(&alien.encode(), &mut p.docs[0]) {
        Err(e @ SyncError::Version { ours, ours_min, theirs, theirs_min }) => {
            assert_eq!((ours, ours_min), (PROTOCOL_VERSION, MIN_PROTOCOL_VERSION));
            assert_eq!((theirs, theirs_min), (PROTOCOL_VERSION + 40, PROTOCOL_VERSION + 30));
            let Msg::Error(reply) = e.to_msg() else { panic!("not an error message") };
            assert_eq!(reply.code, ErrorCode::VERSION);
            for v in [PROTOCOL_VERSION, PROTOCOL_VERSION + 40] {
                assert!(reply.message.contains(&v.to_string()), "{}", reply.message);
            }
        }
        other => panic!("{other:?}"),
    }
    // The old peer is still the peer.
    assert_eq!(p.sess[0].peer().map(|h| h.replica), Some(ReplicaId(2)));
    other_document_still_syncs(&mut p);
}

#[test]
fn a_message_before_hello_is_refused() {
    let mut s = concord_core::sync::Session::new(ReplicaId(5), SessionConfig::default());
    let mut docs = std::collections::BTreeMap::from([(OTHER.to_string(), Document::new(ReplicaId(5)))]);
    let sub = Msg::Subscribe(Subscribe { doc: OTHER.into(), vv: VersionVector::new() });
    assert_eq!(s.handle(&sub.encode(), &mut docs), Err(SyncError::NoHello));
    let Msg::Error(e) = SyncError::NoHello.to_msg() else { unreachable!() };
    assert_eq!(e.code, ErrorCode::NO_HELLO);
}

fn deltas(deltas: Vec<Delta>) -> Vec<u8> {
    Msg::Deltas(Deltas { doc: VICTIM.into(), deltas }).encode()
}

fn set_delta(dot: Dot, entries: Vec<(Value, Vec<Dot>)>, ctx: &[Dot]) -> Delta {
    let mut c = CausalContext::default();
    for d in ctx {
        c.insert(*d);
    }
    let mut e = concord_core::orset::Entries::default();
    for (v, ds) in entries {
        let ds = match ds.as_slice() {
            [one] => concord_core::orset::Dots::One(*one),
            _ => concord_core::orset::Dots::Many(ds),
        };
        e.insert(v, ds);
    }
    Delta::new(dot, "tags", Field::Set(OrSet::from_parts(e, c)))
}

#[test]
fn deltas_that_break_invariants_are_refused_whole_and_change_nothing() {
    let mut p = pair();
    let peer = ReplicaId(2);
    let good = Delta::new(Dot::new(peer, 1), "likes", Field::Counter(GCounter::default().increment(peer, 1)));
    let bad: Vec<(&str, Delta)> = vec![
        ("sequence 0", Delta::new(Dot::new(peer, 0), good.key.as_str(), good.payload.clone())),
        (
            "adds with another dot",
            set_delta(
                Dot::new(peer, 1),
                vec![(Value::Int(1), vec![Dot::new(peer, 9)])],
                &[Dot::new(peer, 9)],
            ),
        ),
        (
            "dot outside its context",
            set_delta(Dot::new(peer, 1), vec![(Value::Int(1), vec![Dot::new(peer, 1)])], &[]),
        ),
        (
            "one dot for two elements",
            set_delta(
                Dot::new(peer, 1),
                vec![(Value::Int(1), vec![Dot::new(peer, 1)]), (Value::Int(2), vec![Dot::new(peer, 1)])],
                &[Dot::new(peer, 1)],
            ),
        ),
        (
            "unsorted dots",
            set_delta(
                Dot::new(peer, 1),
                vec![(Value::Int(1), vec![Dot::new(peer, 1), Dot::new(peer, 1)])],
                &[Dot::new(peer, 1)],
            ),
        ),
        (
            "this replica's own future dot (amnesia)",
            Delta::new(
                Dot::new(ReplicaId(1), 5),
                "likes",
                Field::Counter(GCounter::default().increment(ReplicaId(1), 1)),
            ),
        ),
    ];
    let before = p.doc(0, VICTIM).clone();
    for (what, d) in bad {
        // A valid delta first in the same batch: the batch is refused whole.
        let frame = deltas(vec![good.clone(), d]);
        match p.handle(0, &frame) {
            Err(SyncError::Doc { doc, error: DocError::Invalid(_) | DocError::Amnesia { .. } }) => {
                assert_eq!(doc, VICTIM)
            }
            Err(SyncError::Frame(FrameError::Malformed { .. })) => {} // caught by the decoder
            other => panic!("{what}: {other:?}"),
        }
        assert_eq!(*p.doc(0, VICTIM), before, "{what}: something was applied");
    }
    // The good delta alone is fine.
    p.handle(0, &deltas(vec![good])).unwrap();
    assert_eq!(p.doc(0, VICTIM).counter("likes"), 1);
    other_document_still_syncs(&mut p);
}

#[test]
fn a_hostile_state_transfer_is_refused_and_changes_nothing() {
    let mut p = pair();
    p.subscribe(0, VICTIM);
    p.take(1);
    let start = |ex, vv: VersionVector| {
        Msg::MerkleStart(MerkleStart {
            doc: VICTIM.into(),
            exchange: ex,
            vv,
            ctx: CausalContext::default(),
            children: Vec::new(),
            full_chunks: 1,
            keys: 1,
        })
        .encode()
    };
    let chunk = |ex, fields| {
        Msg::State(StateChunk {
            doc: VICTIM.into(),
            exchange: ex,
            chunk: 0,
            answered: Vec::new(),
            fields,
            done: 1,
            total: 1,
        })
        .encode()
    };
    let before = p.doc(0, VICTIM).clone();
    // A set whose element's dot the announced context never saw.
    let mut e = concord_core::orset::Entries::default();
    e.insert(Value::Int(1), concord_core::orset::Dots::One(Dot::new(ReplicaId(2), 1)));
    let set = Field::Set(OrSet::from_parts(e, CausalContext::default()));
    p.handle(0, &start(1, VersionVector::new())).unwrap();
    match p.handle(0, &chunk(1, vec![("tags".to_string(), set)])) {
        Err(SyncError::Doc { error: DocError::Invalid(_), .. }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(*p.doc(0, VICTIM), before);
    // A state claiming this replica's own future writes: amnesia, typed.
    p.subscribe(0, VICTIM);
    p.take(1);
    p.handle(0, &start(2, VersionVector::from_iter([(ReplicaId(1), 3)]))).unwrap();
    match p.handle(0, &chunk(2, Vec::new())) {
        Err(SyncError::Doc { error: DocError::Amnesia { .. }, .. }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(*p.doc(0, VICTIM), before);
    // A version at the very end of the sequence space does not overflow anything.
    p.subscribe(0, VICTIM);
    p.take(1);
    p.handle(0, &start(3, VersionVector::from_iter([(ReplicaId(7), u64::MAX)]))).unwrap();
    let _ = p.handle(0, &chunk(3, Vec::new()));
    p.handle(
        0,
        &deltas(vec![Delta::new(
            Dot::new(ReplicaId(7), u64::MAX),
            "likes",
            Field::Counter(GCounter::default().increment(ReplicaId(7), 1)),
        )]),
    )
    .unwrap();
    other_document_still_syncs(&mut p);
}

#[test]
fn document_set_messages_are_handed_to_the_caller_and_need_a_hello_first() {
    use concord_core::docset::{DocSet, DocSetDiff};
    use concord_core::sync::msg::{DocSetAnswerMsg, DocSetQueryMsg};
    use concord_core::sync::{Event, Session};
    let mut p = pair();
    let (_, query) = DocSetDiff::start();
    let q = DocSetQueryMsg { exchange: 3, query: query.clone() };
    let a = DocSetAnswerMsg { exchange: 3, part: 0, parts: 1, answer: DocSet::new().answer(&query) };
    let mut fresh = Session::new(ReplicaId(5), SessionConfig::default());
    for (m, ev) in [
        (Msg::DocSetQuery(q.clone()), Event::DocSetQuery(q)),
        (Msg::DocSetAnswer(a.clone()), Event::DocSetAnswer(a)),
    ] {
        let out = p.sess[0].handle(&m.encode(), &mut p.docs[0]).expect("a valid message");
        assert!(out.replies.is_empty(), "the session does not answer for the caller");
        assert_eq!(out.events, vec![ev]);
        assert_eq!(fresh.handle(&m.encode(), &mut p.docs[1]), Err(SyncError::NoHello));
    }
    other_document_still_syncs(&mut p);
}
