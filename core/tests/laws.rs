//! The one generic law suite every CRDT plugs into (STYLE.md §10; after riak_dt's
//! `crdt_statem_eqc:prop_converge(Mod)` and the `crdts` crate's property tests).
//!
//! A CRDT joins by implementing [`Model`]: how to generate an operation, how the CRDT makes
//! its delta, how the same operation mutates a full state when written out by hand, and a
//! simple reference model (a sum, a maximum, a set of tagged pairs) that says what the value
//! must be once every replica has seen everything. [`law_suite!`] then stamps out the laws:
//! merge is commutative, associative and idempotent on reachable states; a mutator's delta
//! joined into its state is the mutated state; random interleavings of operations, delta
//! deliveries and state merges over 3-5 replicas converge to the reference; encodings
//! round-trip.
//!
//! The end of the file runs the same convergence law one level up, on [`Document`]s.
//!
//! Cases per property: `PROPTEST_CASES` (default 1000).

use concord_core::codec::{self, tag};
use concord_core::document::Applied;
use concord_core::orset::Dots;
use concord_core::{
    Crdt, Delta, DocConfig, Document, Dot, Field, GCounter, Hlc, LwwRegister, OrSet, PnCounter, ReplicaId,
    Timestamp, Value, VersionVector,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use serde::{de::DeserializeOwned, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::hash::Hash;

/// `PROPTEST_CASES` or 1000.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(1000);
    ProptestConfig::with_cases(cases)
}

/// Replica ids that are not in index order, so nothing depends on `ReplicaId` order
/// matching creation order.
fn replica_id(i: usize) -> ReplicaId {
    const IDS: [u64; 5] = [0x9e37_79b9, 0x1234, 0xffff_0000_0000, 0x42, 0x7f00_0001];
    ReplicaId(IDS[i])
}

/// Re-reads `a`'s encoding as a `B`: used to write full-state mutations by hand from a
/// type's structure (a `GCounter` is a `VersionVector`), independently of its mutators.
fn reshape<A: Serialize, B: DeserializeOwned>(a: &A) -> B {
    let bytes = postcard::to_allocvec(a).expect("encode");
    postcard::from_bytes(&bytes).expect("reshape")
}

// ---------------------------------------------------------------------------------------
// The model trait and the generic laws
// ---------------------------------------------------------------------------------------

/// How a CRDT plugs into the law suite.
trait Model {
    /// The CRDT.
    type State: Crdt<Value = Self::Value>;
    /// Its value.
    type Value: PartialEq + Debug;
    /// An operation as generated, before a replica resolves it.
    type Op: Clone + Debug + 'static;
    /// An operation resolved at a replica (its dot or timestamp chosen).
    type Concrete: Clone + Debug;
    /// Reference model: what one replica has observed.
    type Knows: Clone + Debug;
    /// Reference model: what a delta tells the replica that receives it.
    type Msg: Clone + Debug;
    /// Reference model: the outcome of every operation so far.
    type Reference: Default + Debug;
    /// Whether the codec body is the postcard encoding of the serde form (true for every
    /// type but the OR-Set, whose codec form is front- and delta-coded, see `orset.rs`).
    const CODEC_IS_POSTCARD: bool = true;

    /// Random operations.
    fn op() -> BoxedStrategy<Self::Op>;
    /// What replica `me` knows at the start.
    fn knows(me: ReplicaId) -> Self::Knows;
    /// Resolves `op` at replica `me` whose state is `state`.
    fn resolve(state: &Self::State, me: ReplicaId, knows: &mut Self::Knows, op: &Self::Op) -> Self::Concrete;
    /// The delta the CRDT's mutator makes.
    fn delta(state: &Self::State, op: &Self::Concrete) -> Self::State;
    /// The state after `op`, written by hand from the type's structure.
    fn mutate(state: &Self::State, op: &Self::Concrete) -> Self::State;
    /// Records `op` in the reference model; returns what its delta tells a receiver.
    fn record(knows: &mut Self::Knows, reference: &mut Self::Reference, op: &Self::Concrete) -> Self::Msg;
    /// A replica received a delta.
    fn learn(knows: &mut Self::Knows, msg: &Self::Msg);
    /// A replica merged another replica's whole state.
    fn learn_all(knows: &mut Self::Knows, from: &Self::Knows);
    /// The value every replica must read once all have seen everything.
    fn expected(reference: &Self::Reference) -> Self::Value;
}

/// One step of a random run over `n` replicas.
#[derive(Clone, Debug)]
enum Step<Op> {
    /// Replica `at` performs `op` and keeps the delta.
    Op { at: usize, op: Op },
    /// Replica `to` receives one of the deltas `from` made (any of them, any number of
    /// times, in any order).
    Deliver { from: usize, to: usize, which: Index },
    /// Replica `to` merges `from`'s whole state.
    Sync { from: usize, to: usize },
}

#[derive(Clone, Debug)]
struct Scenario<Op> {
    replicas: usize,
    steps: Vec<Step<Op>>,
    /// Order of the final all-to-all exchange: a permutation of every ordered pair.
    finale: Vec<(usize, usize)>,
}

fn scenario<M: Model>() -> impl Strategy<Value = Scenario<M::Op>> {
    (3usize..=5).prop_flat_map(|n| {
        let step = prop_oneof![
            4 => (0..n, M::op()).prop_map(|(at, op)| Step::Op { at, op }),
            3 => (0..n, 0..n, any::<Index>()).prop_map(|(from, to, which)| Step::Deliver { from, to, which }),
            1 => (0..n, 0..n).prop_map(|(from, to)| Step::Sync { from, to }),
        ];
        let pairs: Vec<(usize, usize)> =
            (0..n).flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j))).collect();
        (vec(step, 0..48), Just(pairs).prop_shuffle()).prop_map(move |(steps, finale)| Scenario {
            replicas: n,
            steps,
            finale,
        })
    })
}

/// Replicas after a run, with every delta made and the reference model.
struct World<M: Model> {
    ids: Vec<ReplicaId>,
    states: Vec<M::State>,
    knows: Vec<M::Knows>,
    deltas: Vec<Vec<(M::State, M::Msg)>>,
    reference: M::Reference,
}

impl<M: Model> World<M> {
    fn run(sc: &Scenario<M::Op>) -> World<M> {
        let n = sc.replicas;
        let ids: Vec<ReplicaId> = (0..n).map(replica_id).collect();
        let mut w = World::<M> {
            states: vec![M::State::default(); n],
            knows: ids.iter().map(|&id| M::knows(id)).collect(),
            deltas: vec![Vec::new(); n],
            reference: M::Reference::default(),
            ids,
        };
        for step in &sc.steps {
            match step {
                Step::Op { at, op } => {
                    let op = M::resolve(&w.states[*at], w.ids[*at], &mut w.knows[*at], op);
                    let delta = M::delta(&w.states[*at], &op);
                    // A local mutation is applied the documented way: by value.
                    w.states[*at].apply(delta.clone());
                    let msg = M::record(&mut w.knows[*at], &mut w.reference, &op);
                    w.deltas[*at].push((delta, msg));
                }
                Step::Deliver { from, to, which } => {
                    if !w.deltas[*from].is_empty() {
                        let (delta, msg) = which.get(&w.deltas[*from]).clone();
                        w.states[*to].merge(&delta);
                        M::learn(&mut w.knows[*to], &msg);
                    }
                }
                Step::Sync { from, to } => w.sync(*from, *to),
            }
        }
        w
    }

    fn sync(&mut self, from: usize, to: usize) {
        let state = self.states[from].clone();
        self.states[to].merge(&state);
        let knows = self.knows[from].clone();
        M::learn_all(&mut self.knows[to], &knows);
    }

    /// Every replica state and every delta made: the states the laws are checked on.
    fn reachable(&self) -> Vec<M::State> {
        let mut pool = self.states.clone();
        pool.extend(self.deltas.iter().flatten().map(|(d, _)| d.clone()));
        pool
    }
}

fn join<S: Crdt>(a: &S, b: &S) -> S {
    let mut out = a.clone();
    out.merge(b);
    out
}

fn check_commutative<M: Model>(sc: &Scenario<M::Op>, picks: &[Index; 3]) -> Result<(), TestCaseError> {
    let pool = World::<M>::run(sc).reachable();
    let (a, b) = (picks[0].get(&pool), picks[1].get(&pool));
    prop_assert_eq!(join(a, b), join(b, a));
    Ok(())
}

fn check_associative<M: Model>(sc: &Scenario<M::Op>, picks: &[Index; 3]) -> Result<(), TestCaseError> {
    let pool = World::<M>::run(sc).reachable();
    let (a, b, c) = (picks[0].get(&pool), picks[1].get(&pool), picks[2].get(&pool));
    prop_assert_eq!(join(&join(a, b), c), join(a, &join(b, c)));
    Ok(())
}

fn check_idempotent<M: Model>(sc: &Scenario<M::Op>, picks: &[Index; 3]) -> Result<(), TestCaseError> {
    let pool = World::<M>::run(sc).reachable();
    let (a, b) = (picks[0].get(&pool), picks[1].get(&pool));
    prop_assert_eq!(&join(a, a), a);
    let ab = join(a, b);
    prop_assert_eq!(join(&ab, b), ab);
    Ok(())
}

fn check_apply_equals_merge<M: Model>(sc: &Scenario<M::Op>, picks: &[Index; 3]) -> Result<(), TestCaseError> {
    let pool = World::<M>::run(sc).reachable();
    let (a, b) = (picks[0].get(&pool), picks[1].get(&pool));
    let mut applied = a.clone();
    applied.apply(b.clone());
    prop_assert_eq!(applied, join(a, b));
    Ok(())
}

fn check_delta_law<M: Model>(sc: &Scenario<M::Op>, at: &Index, ops: &[M::Op]) -> Result<(), TestCaseError> {
    let mut w = World::<M>::run(sc);
    let i = at.index(w.states.len());
    for op in ops {
        let op = M::resolve(&w.states[i], w.ids[i], &mut w.knows[i], op);
        let delta = M::delta(&w.states[i], &op);
        let expected = M::mutate(&w.states[i], &op);
        let joined = join(&w.states[i], &delta);
        prop_assert_eq!(joined.value(), expected.value(), "value after {:?}", op);
        prop_assert_eq!(&joined, &expected, "state after {:?}", op);
        w.states[i] = joined;
    }
    Ok(())
}

fn check_convergence<M: Model>(sc: &Scenario<M::Op>) -> Result<(), TestCaseError> {
    let mut w = World::<M>::run(sc);
    for &(from, to) in &sc.finale {
        w.sync(from, to);
    }
    let expected = M::expected(&w.reference);
    for (i, s) in w.states.iter().enumerate() {
        prop_assert_eq!(s, &w.states[0], "replica {} differs from replica 0", i);
        prop_assert_eq!(&s.value(), &expected, "replica {} differs from the reference model", i);
    }
    Ok(())
}

fn check_round_trip<M: Model>(sc: &Scenario<M::Op>) -> Result<(), TestCaseError> {
    for s in World::<M>::run(sc).reachable() {
        prop_assert_eq!(s.validate(), Ok(()), "reachable state is invalid: {:?}", s);
        let bytes = postcard::to_allocvec(&s).expect("postcard encode");
        prop_assert_eq!(&postcard::from_bytes::<M::State>(&bytes).expect("postcard decode"), &s);
        let framed = codec::encode(tag::FIELD, &s);
        if M::CODEC_IS_POSTCARD {
            prop_assert_eq!(&framed[2..], &bytes[..], "the codec body is the postcard encoding");
        }
        let back = codec::decode::<M::State>(tag::FIELD, &framed).expect("codec decode");
        prop_assert_eq!(&back, &s);
        prop_assert_eq!(
            &codec::encode(tag::FIELD, &back),
            &framed,
            "decoding and encoding again gives the same bytes"
        );
    }
    Ok(())
}

/// Stamps out every law for one model.
macro_rules! law_suite {
    ($name:ident, $model:ty) => {
        mod $name {
            use super::*;

            proptest! {
                #![proptest_config(config())]

                #[test]
                fn merge_is_commutative(sc in scenario::<$model>(), picks in any::<[Index; 3]>()) {
                    check_commutative::<$model>(&sc, &picks)?;
                }

                #[test]
                fn merge_is_associative(sc in scenario::<$model>(), picks in any::<[Index; 3]>()) {
                    check_associative::<$model>(&sc, &picks)?;
                }

                #[test]
                fn merge_is_idempotent(sc in scenario::<$model>(), picks in any::<[Index; 3]>()) {
                    check_idempotent::<$model>(&sc, &picks)?;
                }

                #[test]
                fn apply_by_value_equals_merge(sc in scenario::<$model>(), picks in any::<[Index; 3]>()) {
                    check_apply_equals_merge::<$model>(&sc, &picks)?;
                }

                #[test]
                fn a_delta_joined_into_its_state_equals_the_mutated_state(
                    sc in scenario::<$model>(),
                    at in any::<Index>(),
                    ops in vec(<$model as Model>::op(), 1..6),
                ) {
                    check_delta_law::<$model>(&sc, &at, &ops)?;
                }

                #[test]
                fn random_interleavings_converge_to_the_reference_model(sc in scenario::<$model>()) {
                    check_convergence::<$model>(&sc)?;
                }

                #[test]
                fn reachable_states_validate_and_round_trip_through_postcard_and_the_codec(
                    sc in scenario::<$model>(),
                ) {
                    check_round_trip::<$model>(&sc)?;
                }
            }
        }
    };
}

// ---------------------------------------------------------------------------------------
// Counters
// ---------------------------------------------------------------------------------------

struct GCounterModel;

impl Model for GCounterModel {
    type State = GCounter;
    type Value = u64;
    type Op = u64;
    type Concrete = (ReplicaId, u64);
    type Knows = ();
    type Msg = ();
    type Reference = u64;

    fn op() -> BoxedStrategy<u64> {
        prop_oneof![Just(0u64), 1..1000u64].boxed()
    }
    fn knows(_: ReplicaId) {}
    fn resolve(_: &GCounter, me: ReplicaId, _: &mut (), n: &u64) -> (ReplicaId, u64) {
        (me, *n)
    }
    fn delta(state: &GCounter, &(me, n): &(ReplicaId, u64)) -> GCounter {
        state.increment(me, n)
    }
    fn mutate(state: &GCounter, &(me, n): &(ReplicaId, u64)) -> GCounter {
        let mut counts: VersionVector = reshape(state);
        counts.raise(me, counts.get(me) + n);
        reshape(&counts)
    }
    fn record(_: &mut (), sum: &mut u64, &(_, n): &(ReplicaId, u64)) {
        *sum += n;
    }
    fn learn(_: &mut (), _: &()) {}
    fn learn_all(_: &mut (), _: &()) {}
    fn expected(sum: &u64) -> u64 {
        *sum
    }
}

struct PnCounterModel;

impl Model for PnCounterModel {
    type State = PnCounter;
    type Value = i64;
    type Op = i64;
    type Concrete = (ReplicaId, i64);
    type Knows = ();
    type Msg = ();
    type Reference = i64;

    fn op() -> BoxedStrategy<i64> {
        prop_oneof![Just(0i64), -1000..1000i64].boxed()
    }
    fn knows(_: ReplicaId) {}
    fn resolve(_: &PnCounter, me: ReplicaId, _: &mut (), n: &i64) -> (ReplicaId, i64) {
        (me, *n)
    }
    fn delta(state: &PnCounter, &(me, n): &(ReplicaId, i64)) -> PnCounter {
        if n >= 0 {
            state.increment(me, n.unsigned_abs())
        } else {
            state.decrement(me, n.unsigned_abs())
        }
    }
    fn mutate(state: &PnCounter, &(me, n): &(ReplicaId, i64)) -> PnCounter {
        let (mut p, mut m): (VersionVector, VersionVector) = reshape(state);
        let side = if n >= 0 { &mut p } else { &mut m };
        side.raise(me, side.get(me) + n.unsigned_abs());
        reshape(&(p, m))
    }
    fn record(_: &mut (), sum: &mut i64, &(_, n): &(ReplicaId, i64)) {
        *sum += n;
    }
    fn learn(_: &mut (), _: &()) {}
    fn learn_all(_: &mut (), _: &()) {}
    fn expected(sum: &i64) -> i64 {
        *sum
    }
}

// ---------------------------------------------------------------------------------------
// Element types for registers and sets
// ---------------------------------------------------------------------------------------

trait Element: Ord + Hash + Clone + Debug + Serialize + DeserializeOwned + codec::Wire + 'static {
    /// A small domain, so operations collide.
    fn strategy() -> BoxedStrategy<Self>;
}

impl Element for u8 {
    fn strategy() -> BoxedStrategy<u8> {
        (0u8..6).boxed()
    }
}

impl Element for i64 {
    fn strategy() -> BoxedStrategy<i64> {
        prop_oneof![Just(i64::MIN), -3..3i64, Just(i64::MAX)].boxed()
    }
}

impl Element for String {
    fn strategy() -> BoxedStrategy<String> {
        prop_oneof![
            prop::sample::select(vec!["", "a", "b", "milk", "ünïcødé"]).prop_map(String::from),
            "[a-c]{1,3}",
        ]
        .boxed()
    }
}

impl Element for Value {
    fn strategy() -> BoxedStrategy<Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (-2..2i64).prop_map(Value::Int),
            prop::sample::select(vec![0.5, -0.0, 0.0, f64::NAN, f64::INFINITY]).prop_map(Value::Float),
            "[ab]{0,2}".prop_map(Value::Str),
        ];
        leaf.prop_recursive(2, 6, 3, |inner| {
            prop_oneof![
                vec(inner.clone(), 0..3).prop_map(Value::Array),
                prop::collection::btree_map("[xy]", inner, 0..3)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
        .boxed()
    }
}

// ---------------------------------------------------------------------------------------
// Last-writer-wins register
// ---------------------------------------------------------------------------------------

struct LwwModel<V>(std::marker::PhantomData<V>);

impl<V: Element> Model for LwwModel<V> {
    type State = LwwRegister<V>;
    type Value = Option<V>;
    /// A wall-clock reading (which jumps back and forth) and the value to write.
    type Op = (u64, V);
    type Concrete = (Timestamp, V);
    /// The replica's hybrid logical clock.
    type Knows = Hlc;
    /// The timestamp of the write, observed by whoever receives it.
    type Msg = Timestamp;
    /// The write with the greatest timestamp.
    type Reference = Option<(Timestamp, V)>;

    fn op() -> BoxedStrategy<(u64, V)> {
        (0u64..40, V::strategy()).boxed()
    }
    fn knows(me: ReplicaId) -> Hlc {
        Hlc::new(me)
    }
    fn resolve(_: &LwwRegister<V>, _: ReplicaId, clock: &mut Hlc, (wall, v): &(u64, V)) -> (Timestamp, V) {
        (clock.tick(*wall), v.clone())
    }
    fn delta(state: &LwwRegister<V>, (ts, v): &(Timestamp, V)) -> LwwRegister<V> {
        state.set(*ts, v.clone())
    }
    fn mutate(state: &LwwRegister<V>, (ts, v): &(Timestamp, V)) -> LwwRegister<V> {
        let current: Option<(Timestamp, V)> = reshape(state);
        match current {
            Some((cts, cv)) if (cts, &cv) >= (*ts, v) => state.clone(),
            _ => reshape(&Some((*ts, v.clone()))),
        }
    }
    fn record(_: &mut Hlc, best: &mut Option<(Timestamp, V)>, (ts, v): &(Timestamp, V)) -> Timestamp {
        if best.as_ref().is_none_or(|b| b.0 < *ts) {
            *best = Some((*ts, v.clone()));
        }
        *ts
    }
    fn learn(clock: &mut Hlc, ts: &Timestamp) {
        clock.observe(*ts);
    }
    fn learn_all(clock: &mut Hlc, from: &Hlc) {
        clock.observe(from.last());
    }
    fn expected(best: &Option<(Timestamp, V)>) -> Option<V> {
        best.as_ref().map(|b| b.1.clone())
    }
}

// ---------------------------------------------------------------------------------------
// Observed-remove set
// ---------------------------------------------------------------------------------------

/// A reference add of the OR-Set model: the adding replica and its own add counter. It
/// has nothing to do with the implementation's dots.
type Tag = (ReplicaId, u64);

/// The reference OR-Set: a set of `(element, unique tag)` pairs; add inserts a pair with
/// a fresh tag; a remove at a replica deletes the pairs of that element the replica has
/// observed; the value is the elements with a surviving pair.
///
/// "Observed" is causal and transitive, per element: an add carries the pairs of its
/// element that its replica had observed (its causal past), so whoever observes the add
/// observes them too; a remove carries the pairs it deleted; a full-state merge passes on
/// everything the sender observed.
#[derive(Debug)]
struct SetReference<V> {
    added: BTreeMap<Tag, V>,
    removed: BTreeSet<Tag>,
}

impl<V> Default for SetReference<V> {
    fn default() -> Self {
        Self { added: BTreeMap::new(), removed: BTreeSet::new() }
    }
}

impl<V: Ord + Clone> SetReference<V> {
    fn value(&self) -> Vec<V> {
        let live: BTreeSet<&V> =
            self.added.iter().filter(|(t, _)| !self.removed.contains(t)).map(|(_, v)| v).collect();
        live.into_iter().cloned().collect()
    }
}

/// What one replica of the reference OR-Set has observed.
#[derive(Clone, Debug)]
struct SetKnows<V> {
    me: ReplicaId,
    minted: u64,
    seen: BTreeMap<Tag, V>,
}

impl<V: Ord + Clone> SetKnows<V> {
    fn new(me: ReplicaId) -> Self {
        Self { me, minted: 0, seen: BTreeMap::new() }
    }

    fn observed(&self, v: &V) -> BTreeMap<Tag, V> {
        self.seen.iter().filter(|(_, e)| *e == v).map(|(t, e)| (*t, e.clone())).collect()
    }

    /// Adds `v` with a fresh tag; returns what the add tells its receivers.
    fn add(&mut self, reference: &mut SetReference<V>, v: &V) -> BTreeMap<Tag, V> {
        self.minted += 1;
        let tag = (self.me, self.minted);
        let mut msg = self.observed(v);
        msg.insert(tag, v.clone());
        self.seen.insert(tag, v.clone());
        reference.added.insert(tag, v.clone());
        msg
    }

    /// Deletes the pairs of `v` observed here; returns them.
    fn remove(&mut self, reference: &mut SetReference<V>, v: &V) -> BTreeMap<Tag, V> {
        let observed = self.observed(v);
        reference.removed.extend(observed.keys().copied());
        observed
    }

    fn learn(&mut self, msg: &BTreeMap<Tag, V>) {
        self.seen.extend(msg.iter().map(|(t, v)| (*t, v.clone())));
    }
}

#[derive(Clone, Debug)]
enum SetOp<V> {
    Add(V),
    Remove(V),
}

struct OrSetModel<V>(std::marker::PhantomData<V>);

impl<V: Element> Model for OrSetModel<V> {
    type State = OrSet<V>;
    type Value = Vec<V>;
    type Op = SetOp<V>;
    type Concrete = (Option<Dot>, V);
    type Knows = SetKnows<V>;
    type Msg = BTreeMap<Tag, V>;
    type Reference = SetReference<V>;
    const CODEC_IS_POSTCARD: bool = false;

    fn op() -> BoxedStrategy<SetOp<V>> {
        prop_oneof![
            3 => V::strategy().prop_map(SetOp::Add),
            2 => V::strategy().prop_map(SetOp::Remove),
        ]
        .boxed()
    }
    fn knows(me: ReplicaId) -> SetKnows<V> {
        SetKnows::new(me)
    }
    fn resolve(state: &OrSet<V>, me: ReplicaId, _: &mut SetKnows<V>, op: &SetOp<V>) -> (Option<Dot>, V) {
        match op {
            SetOp::Add(v) => (Some(state.next_dot(me)), v.clone()),
            SetOp::Remove(v) => (None, v.clone()),
        }
    }
    fn delta(state: &OrSet<V>, (dot, v): &(Option<Dot>, V)) -> OrSet<V> {
        match dot {
            Some(dot) => state.add(*dot, v.clone()),
            None => state.remove(v),
        }
    }
    fn mutate(state: &OrSet<V>, (dot, v): &(Option<Dot>, V)) -> OrSet<V> {
        let mut entries = state.entries().clone();
        let mut ctx = state.context().clone();
        match dot {
            Some(dot) => {
                entries.insert(v.clone(), Dots::One(*dot));
                ctx.insert(*dot);
            }
            None => {
                entries.remove(v);
            }
        }
        OrSet::from_parts(entries, ctx)
    }
    fn record(
        knows: &mut SetKnows<V>,
        reference: &mut SetReference<V>,
        (dot, v): &(Option<Dot>, V),
    ) -> BTreeMap<Tag, V> {
        match dot {
            Some(_) => knows.add(reference, v),
            None => knows.remove(reference, v),
        }
    }
    fn learn(knows: &mut SetKnows<V>, msg: &BTreeMap<Tag, V>) {
        knows.learn(msg);
    }
    fn learn_all(knows: &mut SetKnows<V>, from: &SetKnows<V>) {
        knows.learn(&from.seen);
    }
    fn expected(reference: &SetReference<V>) -> Vec<V> {
        reference.value()
    }
}

law_suite!(gcounter, GCounterModel);
law_suite!(pncounter, PnCounterModel);
law_suite!(lww_register_of_i64, LwwModel<i64>);
law_suite!(lww_register_of_values, LwwModel<Value>);
law_suite!(orset_of_u8, OrSetModel<u8>);
law_suite!(orset_of_strings, OrSetModel<String>);

// ---------------------------------------------------------------------------------------
// Documents
// ---------------------------------------------------------------------------------------

const COUNTER: &str = "likes";
const PN: &str = "votes";
const REGISTER: &str = "title";
/// Two set keys: removes of one must never touch the other.
const SETS: [&str; 2] = ["tags", "colors"];

fn element(v: u8) -> Value {
    if v % 2 == 0 {
        Value::Int(i64::from(v))
    } else {
        Value::from(format!("e{v}"))
    }
}

/// An operation on a document; every key has a fixed type.
#[derive(Clone, Debug)]
enum DocOp {
    Increment(u64),
    PnAdd(i64),
    /// A register write with a wall clock that jumps back and forth.
    SetRegister {
        value: i64,
        wall: u64,
    },
    SetAdd {
        set: usize,
        v: u8,
    },
    SetRemove {
        set: usize,
        v: u8,
    },
}

fn doc_op() -> impl Strategy<Value = DocOp> {
    prop_oneof![
        1 => (0u64..50).prop_map(DocOp::Increment),
        1 => (-50i64..50).prop_map(DocOp::PnAdd),
        1 => (0i64..10, 0u64..200).prop_map(|(value, wall)| DocOp::SetRegister { value, wall }),
        3 => (0..2usize, 0u8..5).prop_map(|(set, v)| DocOp::SetAdd { set, v }),
        2 => (0..2usize, 0u8..5).prop_map(|(set, v)| DocOp::SetRemove { set, v }),
    ]
}

#[derive(Clone, Debug)]
enum DocStep {
    Op {
        at: usize,
        op: DocOp,
    },
    /// Document `to` receives one of all the deltas made so far (any of them: late ones,
    /// early ones, ones it already has), once or twice.
    Deliver {
        which: Index,
        to: usize,
        twice: bool,
    },
    /// Document `to` pulls what it lacks from `from`'s delta log.
    Pull {
        from: usize,
        to: usize,
    },
}

#[derive(Clone, Debug)]
struct DocScenario {
    docs: usize,
    steps: Vec<DocStep>,
    /// Seed of the order of the final delivery of every delta to every document.
    seed: u64,
}

fn doc_scenario() -> impl Strategy<Value = DocScenario> {
    (3usize..=5).prop_flat_map(|n| {
        let step = prop_oneof![
            4 => (0..n, doc_op()).prop_map(|(at, op)| DocStep::Op { at, op }),
            4 => (any::<Index>(), 0..n, any::<bool>())
                .prop_map(|(which, to, twice)| DocStep::Deliver { which, to, twice }),
            1 => (0..n, 0..n).prop_map(|(from, to)| DocStep::Pull { from, to }),
        ];
        (vec(step, 0..64), any::<u64>()).prop_map(move |(steps, seed)| DocScenario { docs: n, steps, seed })
    })
}

/// Documents plus the reference model of their sets.
struct DocWorld {
    docs: Vec<Document>,
    deltas: Vec<Delta>,
    /// Per document, per set key: what the reference set has observed.
    knows: Vec<[SetKnows<Value>; 2]>,
    sets: [SetReference<Value>; 2],
    /// What each set delta tells its receiver in the reference model, by dot.
    msgs: BTreeMap<Dot, (usize, BTreeMap<Tag, Value>)>,
    counter: u64,
    pn: i64,
}

impl DocWorld {
    fn new(n: usize) -> DocWorld {
        DocWorld {
            docs: (0..n).map(|i| Document::new(replica_id(i))).collect(),
            deltas: Vec::new(),
            knows: (0..n).map(|i| [SetKnows::new(replica_id(i)), SetKnows::new(replica_id(i))]).collect(),
            sets: Default::default(),
            msgs: BTreeMap::new(),
            counter: 0,
            pn: 0,
        }
    }

    fn run(sc: &DocScenario) -> Result<DocWorld, TestCaseError> {
        let mut w = DocWorld::new(sc.docs);
        for step in &sc.steps {
            match step {
                DocStep::Op { at, op } => w.perform(*at, op)?,
                DocStep::Deliver { which, to, twice } => {
                    if !w.deltas.is_empty() {
                        let d = which.get(&w.deltas).clone();
                        w.deliver(*to, d.clone())?;
                        if *twice {
                            w.deliver(*to, d)?;
                        }
                    }
                }
                DocStep::Pull { from, to } => {
                    let lacking = w.docs[*from].deltas_since(w.docs[*to].version());
                    let lacking: Vec<Delta> =
                        lacking.expect("the log reaches back").into_iter().cloned().collect();
                    for d in lacking {
                        let applied = w.deliver(*to, d)?;
                        prop_assert!(
                            matches!(applied, Applied::Applied(_) | Applied::Duplicate),
                            "a pulled delta is never buffered: {:?}",
                            applied
                        );
                    }
                    prop_assert!(w.docs[*from].version().le(w.docs[*to].version()));
                }
            }
        }
        Ok(w)
    }

    fn perform(&mut self, at: usize, op: &DocOp) -> Result<(), TestCaseError> {
        let doc = &mut self.docs[at];
        let delta = match op {
            DocOp::Increment(n) => {
                self.counter += n;
                doc.increment(COUNTER, *n)
            }
            DocOp::PnAdd(n) => {
                self.pn += n;
                doc.pn_add(PN, *n)
            }
            DocOp::SetRegister { value, wall } => doc.set_register(REGISTER, Value::Int(*value), *wall),
            DocOp::SetAdd { set, v } => {
                let d = doc.set_add(SETS[*set], element(*v));
                let msg = self.knows[at][*set].add(&mut self.sets[*set], &element(*v));
                if let Ok(d) = &d {
                    self.msgs.insert(d.dot, (*set, msg));
                }
                d
            }
            DocOp::SetRemove { set, v } => {
                let d = doc.set_remove(SETS[*set], &element(*v));
                let msg = self.knows[at][*set].remove(&mut self.sets[*set], &element(*v));
                match d {
                    Ok(Some(d)) => {
                        self.msgs.insert(d.dot, (*set, msg));
                        Ok(d)
                    }
                    // Absent here: no dot is minted and nothing is sent.
                    Ok(None) => return Ok(()),
                    Err(e) => Err(e),
                }
            }
        };
        let delta = delta.map_err(|e| TestCaseError::fail(format!("{op:?} failed: {e}")))?;
        prop_assert_eq!(
            delta.dot.seq,
            self.docs[at].version().get(delta.dot.replica),
            "local ops apply at once"
        );
        self.deltas.push(delta);
        Ok(())
    }

    /// Applies a delta at `to`; the reference model learns every delta that got applied
    /// (this one and any buffered ones it unblocked), when it got applied.
    fn deliver(&mut self, to: usize, delta: Delta) -> Result<Applied, TestCaseError> {
        let before = self.docs[to].version().clone();
        let applied = self.docs[to].apply(delta).map_err(|e| TestCaseError::fail(format!("apply: {e}")))?;
        let after = self.docs[to].version().clone();
        for (r, top) in after.iter() {
            for seq in before.get(r) + 1..=top {
                if let Some((set, msg)) = self.msgs.get(&Dot::new(r, seq)) {
                    self.knows[to][*set].learn(msg);
                }
            }
        }
        Ok(applied)
    }

    /// Delivers every delta to every document, in an order drawn from `seed`.
    fn deliver_everything(&mut self, seed: u64) -> Result<(), TestCaseError> {
        let mut all: Vec<(usize, usize)> =
            (0..self.docs.len()).flat_map(|to| (0..self.deltas.len()).map(move |d| (to, d))).collect();
        let mut rng = seed | 1;
        for i in (1..all.len()).rev() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            all.swap(i, (rng % (i as u64 + 1)) as usize);
        }
        for (to, d) in all {
            let delta = self.deltas[d].clone();
            self.deliver(to, delta)?;
        }
        Ok(())
    }

    /// The register write with the greatest timestamp.
    fn register_winner(&self) -> Option<Value> {
        self.deltas
            .iter()
            .filter_map(|d| match &d.payload {
                Field::Register(r) => r.timestamp().zip(r.get().cloned()),
                _ => None,
            })
            .max_by_key(|(ts, _)| *ts)
            .map(|(_, v)| v)
    }
}

fn assert_snapshot_round_trips(doc: &Document) -> Result<(), TestCaseError> {
    let bytes = doc.encode();
    let back = Document::decode(&bytes, doc.config()).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(back.to_value(), doc.to_value());
    prop_assert_eq!(back.version(), doc.version());
    prop_assert_eq!(back.replica(), doc.replica());
    prop_assert_eq!(back.pending_len(), doc.pending_len());
    prop_assert_eq!(&back, doc);
    prop_assert_eq!(back.deltas_since(&VersionVector::new()), doc.deltas_since(&VersionVector::new()));
    prop_assert!(back.encode() == bytes, "re-encoding a decoded snapshot gives the same bytes");
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn documents_converge_whatever_the_delivery_order_duplication_and_delay(sc in doc_scenario()) {
        let mut w = DocWorld::run(&sc)?;
        w.deliver_everything(sc.seed)?;
        let first = &w.docs[0];
        for (i, d) in w.docs.iter().enumerate() {
            prop_assert_eq!(d.pending_len(), 0, "document {} still buffers deltas", i);
            prop_assert_eq!(d.version(), first.version(), "document {} version", i);
            prop_assert_eq!(d.to_value(), first.to_value(), "document {} value", i);
            prop_assert_eq!(d, first, "document {} state", i);
        }
        // ...and to what the reference models say.
        prop_assert_eq!(first.version().total(), w.deltas.len() as u64);
        prop_assert_eq!(first.counter(COUNTER), w.counter);
        prop_assert_eq!(first.pn_counter(PN), w.pn);
        prop_assert_eq!(first.register(REGISTER).map(|r| r.0.clone()), w.register_winner());
        for (i, key) in SETS.iter().enumerate() {
            prop_assert_eq!(first.set_values(key), w.sets[i].value(), "set {}", key);
        }
    }

    #[test]
    fn document_snapshots_round_trip_mid_run_and_after_convergence(sc in doc_scenario()) {
        let mut w = DocWorld::run(&sc)?;
        for d in &w.docs {
            assert_snapshot_round_trips(d)?;
        }
        w.deliver_everything(sc.seed)?;
        for d in &w.docs {
            assert_snapshot_round_trips(d)?;
        }
    }

    #[test]
    fn a_document_restored_from_a_snapshot_keeps_converging(sc in doc_scenario()) {
        let mut w = DocWorld::run(&sc)?;
        let restored = Document::decode(&w.docs[0].encode(), DocConfig::default())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        w.docs[0] = restored;
        w.deliver_everything(sc.seed)?;
        for d in &w.docs[1..] {
            prop_assert_eq!(d, &w.docs[0]);
            prop_assert_eq!(d.to_value(), w.docs[0].to_value());
        }
    }
}
