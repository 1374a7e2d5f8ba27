//! Decoding untrusted bytes never panics and never hangs: every decodable type answers
//! random byte strings, and random mutations and truncations of valid encodings, with an
//! error or a value that passes validation and can be used (merged, applied, re-encoded).

use concord_core::codec::{self, tag};
use concord_core::orset::{Dots, Entries};
use concord_core::{
    CausalContext, Crdt, Delta, DocConfig, Document, Dot, Field, GCounter, LwwRegister, OrSet, PnCounter,
    ReplicaId, Timestamp, Value, VersionVector,
};
use proptest::collection::vec;
use proptest::prelude::*;
use std::fmt::Debug;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(1000);
    ProptestConfig::with_cases(cases)
}

const A: ReplicaId = ReplicaId(0xA);
const B: ReplicaId = ReplicaId(0xB);

// ---- what to do with a decoded value ----

/// A populated document to apply decoded deltas to and merge decoded states into.
fn populated() -> (Document, Vec<Delta>) {
    let mut a = Document::new(A);
    let mut b = Document::new(B);
    let mut sent = vec![
        a.increment("likes", 3).unwrap(),
        a.pn_add("votes", -2).unwrap(),
        a.set_register("title", Value::from("hi"), 1_000).unwrap(),
        a.set_add("tags", Value::from("x")).unwrap(),
        b.set_add("tags", Value::Int(7)).unwrap(),
    ];
    sent.push(a.set_remove("tags", &Value::from("x")).unwrap().unwrap());
    for d in &sent {
        let _ = b.apply(d.clone());
        let _ = a.apply(d.clone());
    }
    (a, sent)
}

fn use_document(mut doc: Document) {
    let _ = doc.to_value();
    let _ = doc.version().total();
    let _ = doc.deltas_since(&VersionVector::new());
    let _ = doc.merkle().root();
    let bytes = doc.encode();
    let again = Document::decode(&bytes, doc.config()).expect("a decoded document re-encodes to valid bytes");
    assert_eq!(again.to_value(), doc.to_value());
    let (_, sent) = populated();
    for d in sent {
        let _ = doc.apply(d);
    }
    let _ = doc.increment("likes", 1);
    let _ = doc.set_add("tags", Value::Null);
    let _ = doc.set_remove("tags", &Value::Int(7));
    let _ = doc.set_register("title", Value::Bool(true), 0);
    let _ = doc.to_value();
}

fn use_delta(d: Delta) {
    d.validate().expect("Delta::decode validates");
    let again = Delta::decode(&d.encode()).expect("a decoded delta re-encodes to valid bytes");
    assert_eq!(again, d);
    let mut fresh = Document::new(ReplicaId(0xF));
    let _ = fresh.apply(d.clone());
    let _ = fresh.to_value();
    let (mut doc, _) = populated();
    let _ = doc.apply(d);
    let _ = doc.to_value();
    let _ = doc.merkle().root();
}

fn use_crdt<T: Crdt>(x: T)
where
    T::Value: Debug,
{
    if x.validate().is_err() {
        return; // decoding succeeded; validation is the separate, fallible step
    }
    let mut y = T::default();
    y.merge(&x);
    y.merge(&x);
    let _ = y.value();
    let bytes = codec::encode(tag::FIELD, &x);
    assert_eq!(codec::decode::<T>(tag::FIELD, &bytes).as_ref(), Ok(&x));
}

fn use_field(f: Field) {
    let _ = f.to_value();
    let _ = f.kind();
    match &f {
        Field::Counter(c) => use_crdt(c.clone()),
        Field::PnCounter(c) => use_crdt(c.clone()),
        Field::Register(r) => use_crdt(r.clone()),
        Field::Set(s) => use_crdt(s.clone()),
    }
}

/// Decodes `bytes` as every type; each answer is an error or a usable value.
fn decode_everything(bytes: &[u8]) {
    if let Ok(d) = Delta::decode(bytes) {
        use_delta(d);
    }
    if let Ok(doc) = Document::decode(bytes, DocConfig::default()) {
        use_document(doc);
    }
    if let Ok(doc) = Document::decode(bytes, DocConfig { log_capacity: 1, pending_capacity: 1 }) {
        use_document(doc);
    }
    fn generic<T: codec::Wire>(t: u8, bytes: &[u8], then: impl Fn(T)) {
        // Whatever the tag byte says, try this type's tag too.
        if let Ok(x) = codec::decode::<T>(t, bytes) {
            then(x);
        }
        if let Some((_, body)) = bytes.split_first() {
            let mut retagged = vec![t];
            retagged.extend_from_slice(body);
            if let Ok(x) = codec::decode::<T>(t, &retagged) {
                then(x);
            }
        }
    }
    generic::<VersionVector>(tag::VERSION_VECTOR, bytes, |vv| {
        if vv.validate().is_ok() {
            let mut m = vv.clone();
            m.merge(&vv);
            let _ = (m.total(), m.compare(&vv), m.next_dot(A));
        }
    });
    generic::<Field>(tag::FIELD, bytes, use_field);
    generic::<CausalContext>(tag::FIELD, bytes, |cc| {
        if cc.validate().is_ok() {
            let mut m = CausalContext::default();
            m.merge(&cc);
            m.insert(Dot::new(A, 1));
        }
    });
    generic::<GCounter>(tag::FIELD, bytes, use_crdt);
    generic::<PnCounter>(tag::FIELD, bytes, use_crdt);
    generic::<LwwRegister<Value>>(tag::FIELD, bytes, use_crdt);
    generic::<OrSet<Value>>(tag::FIELD, bytes, use_crdt);
    generic::<OrSet<String>>(tag::FIELD, bytes, use_crdt);
    generic::<Value>(tag::FIELD, bytes, |v| assert!(v.depth() <= concord_core::value::MAX_VALUE_DEPTH));
    generic::<Timestamp>(tag::FIELD, bytes, |_| ());
}

// ---- inputs ----

/// Valid encodings of every type, from a small random history.
fn corpus(ops: &[(bool, u8, u8)]) -> Vec<Vec<u8>> {
    let (mut a, mut sent) = populated();
    let mut b = Document::new(B);
    for &(at_a, op, v) in ops {
        let doc = if at_a { &mut a } else { &mut b };
        let value = if v % 3 == 0 {
            Value::Array(vec![Value::Int(v.into()), Value::Null])
        } else {
            Value::Int(v.into())
        };
        let d = match op % 5 {
            0 => doc.increment("likes", v.into()).ok(),
            1 => doc.pn_add("votes", i64::from(v) - 128).ok(),
            2 => doc.set_register("title", value, u64::from(v) * 7).ok(),
            3 => doc.set_add("tags", value).ok(),
            _ => doc.set_remove("tags", &value).ok().flatten(),
        };
        sent.extend(d);
    }
    for d in &sent[sent.len().saturating_sub(4)..] {
        let _ = b.apply(d.clone()); // some in order, some buffered
    }
    let mut out = vec![a.encode(), b.encode(), codec::encode(tag::VERSION_VECTOR, a.version())];
    out.extend(sent.iter().map(Delta::encode));
    out.extend(a.all_fields().iter().map(|(_, f)| codec::encode(tag::FIELD, f)));
    out.extend(sent.iter().map(|d| codec::encode(tag::FIELD, &d.payload)));
    out.push(codec::encode(tag::FIELD, a.context()));
    out
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip { at: prop::sample::Index, bit: u8 },
    Set { at: prop::sample::Index, to: u8 },
    Insert { at: prop::sample::Index, bytes: Vec<u8> },
    Delete { at: prop::sample::Index, len: usize },
    Truncate { at: prop::sample::Index },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<prop::sample::Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (any::<prop::sample::Index>(), prop_oneof![Just(0u8), Just(0xff), Just(0x80), any::<u8>()])
            .prop_map(|(at, to)| Mutation::Set { at, to }),
        (any::<prop::sample::Index>(), vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<prop::sample::Index>(), 1usize..8).prop_map(|(at, len)| Mutation::Delete { at, len }),
        any::<prop::sample::Index>().prop_map(|at| Mutation::Truncate { at }),
    ]
}

fn mutate(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    match m {
        Mutation::Flip { at, bit } => {
            let i = at.index(bytes.len());
            bytes[i] ^= 1 << bit;
        }
        Mutation::Set { at, to } => {
            let i = at.index(bytes.len());
            bytes[i] = *to;
        }
        Mutation::Insert { at, bytes: ins } => {
            let i = at.index(bytes.len() + 1);
            bytes.splice(i..i, ins.iter().copied());
        }
        Mutation::Delete { at, len } => {
            let i = at.index(bytes.len());
            let end = (i + len).min(bytes.len());
            bytes.drain(i..end);
        }
        Mutation::Truncate { at } => {
            let i = at.index(bytes.len());
            bytes.truncate(i);
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn random_bytes_decode_to_an_error_or_a_valid_value(
        header in prop::option::of(prop_oneof![Just(tag::DOCUMENT), Just(tag::DELTA), Just(tag::VERSION_VECTOR), Just(tag::FIELD), any::<u8>()]),
        body in vec(any::<u8>(), 0..256),
    ) {
        let mut bytes = Vec::new();
        if let Some(t) = header {
            bytes.extend([t, codec::FORMAT_VERSION]);
        }
        bytes.extend(body);
        decode_everything(&bytes);
    }

    #[test]
    fn mutated_and_truncated_encodings_decode_to_an_error_or_a_valid_value(
        ops in vec((any::<bool>(), any::<u8>(), any::<u8>()), 0..12),
        which in any::<prop::sample::Index>(),
        mutations in vec(mutation(), 1..4),
    ) {
        let corpus = corpus(&ops);
        let mut bytes = which.get(&corpus).clone();
        for m in &mutations {
            mutate(&mut bytes, m);
        }
        decode_everything(&bytes);
    }

    #[test]
    fn every_prefix_of_a_valid_encoding_is_refused_or_decodes(
        ops in vec((any::<bool>(), any::<u8>(), any::<u8>()), 0..6),
        which in any::<prop::sample::Index>(),
    ) {
        let corpus = corpus(&ops);
        let bytes = which.get(&corpus);
        for end in 0..bytes.len() {
            decode_everything(&bytes[..end]);
        }
        decode_everything(bytes);
    }
}

// ---- hostile but well-formed input (found by reading the code; each once panicked) ----

fn set_delta(dot: Dot, ctx: CausalContext) -> Delta {
    let mut entries: Entries<Value> = Entries::default();
    entries.insert(Value::from("x"), Dots::One(dot));
    Delta::new(dot, "tags", Field::Set(OrSet::from_parts(entries, ctx)))
}

#[test]
fn a_set_delta_whose_context_claims_two_to_the_64_dots_applies_without_overflow_or_hang() {
    let d = ReplicaId(0xD);
    let dot = Dot::new(d, 1);
    let ctx =
        CausalContext { vv: VersionVector::from_iter([(B, u64::MAX), (d, 1)]), cloud: Default::default() };
    let bytes = set_delta(dot, ctx).encode();
    let d = Delta::decode(&bytes).expect("well-formed");
    let (mut doc, _) = populated();
    assert!(doc.apply(d).is_ok());
    assert!(doc.set_contains("tags", &Value::from("x")));
    assert!(!doc.set_contains("tags", &Value::Int(7)), "covered by the claimed context");
}

#[test]
fn version_vector_totals_saturate_instead_of_overflowing() {
    let vv = VersionVector::from_iter([(A, u64::MAX), (B, 2)]);
    assert_eq!(vv.total(), u64::MAX);
    assert_eq!(vv.next_dot(A), Dot::new(A, u64::MAX), "saturates: there is no dot after the last");
}

#[test]
fn a_causal_context_with_a_full_vector_and_a_cloud_dot_is_refused_not_a_panic() {
    let cc = CausalContext {
        vv: VersionVector::from_iter([(A, u64::MAX)]),
        cloud: [Dot::new(A, 5), Dot::new(B, 9)].into_iter().collect(),
    };
    let bytes = codec::encode(tag::FIELD, &cc);
    let back: CausalContext = codec::decode(tag::FIELD, &bytes).unwrap();
    assert!(back.validate().is_err(), "the cloud dot is covered: not compact");
    let d = set_delta(Dot::new(B, 1), CausalContext { cloud: [Dot::new(B, 1)].into_iter().collect(), ..cc });
    assert!(Delta::decode(&d.encode()).is_err());
}

#[test]
fn a_state_transfer_claiming_the_last_possible_sequence_is_merged_without_overflow() {
    let (mut doc, _) = populated();
    let vv = VersionVector::from_iter([(ReplicaId(0xC), u64::MAX)]);
    let ctx = CausalContext { vv: vv.clone(), cloud: Default::default() };
    doc.merge_state(Vec::new(), &ctx, &vv).expect("a valid state transfer");
    assert_eq!(doc.version().get(ReplicaId(0xC)), u64::MAX);
    let d = Delta::new(Dot::new(ReplicaId(0xC), u64::MAX), "likes", Field::Counter(GCounter::default()));
    assert_eq!(doc.apply(d), Ok(concord_core::document::Applied::Duplicate));
}

#[test]
fn values_nested_deeper_than_the_limit_are_refused_inside_every_container() {
    let mut deep = Value::Int(1);
    for _ in 0..concord_core::value::MAX_VALUE_DEPTH + 4 {
        deep = Value::Array(vec![deep]);
    }
    let reg: LwwRegister<Value> = LwwRegister::default().set(Timestamp::default(), deep.clone());
    let bytes = codec::encode(tag::FIELD, &Field::Register(reg));
    assert!(codec::decode::<Field>(tag::FIELD, &bytes).is_err());
    let d = Delta::new(
        Dot::new(A, 1),
        "title",
        Field::Register(LwwRegister::default().set(Timestamp::default(), deep)),
    );
    assert!(Delta::decode(&d.encode()).is_err());
    // The depth counter is back to zero afterwards: a shallow value still decodes.
    let ok = Value::Array(vec![Value::Array(vec![Value::Null])]);
    assert_eq!(codec::decode::<Value>(tag::FIELD, &codec::encode(tag::FIELD, &ok)), Ok(ok));
}
