//! Add-wins observed-remove set without tombstones.
//!
//! The "optimized OR-Set" (Bieniusa et al. 2012), as Riak's ORSWOT and the delta-state
//! AWSet of Almeida, Shoker and Baquero ("Delta State Replicated Data Types", 2018, §6):
//! each element maps to the [`Dot`]s of the adds that put it there, and a
//! [`CausalContext`] records every dot the replica has seen. An element is present while
//! it has a dot. A remove ships the dots it observed; a concurrent add has a dot the
//! remover did not see, so it survives. Removed elements leave nothing behind but their
//! dots in the (compressed) context.
//!
//! The elements live in an [`IndexedMap`]: entries appended to a dense `Vec`, found
//! through a small table of positions and stored hashes, so a local add is an append, and
//! growing never re-hashes an element (see [`crate::indexed`] for why that matters for
//! large sets of strings). A local add makes a one-element delta that allocates nothing
//! and carries its element's hash, and [`Crdt::apply`] joins it by moving the element in
//! instead of cloning it: for a new element, one probe, one append and one dot recorded.

use crate::codec::{put_seq, put_varint, unzigzag, zigzag, Reader, Wire, R};
use crate::id::{Dot, ReplicaId};
use crate::indexed::{IndexedMap, Known};
use crate::traits::{Crdt, InvalidState};
use crate::vv::CausalContext;
use serde::{de::DeserializeOwned, Deserialize, Deserializer, Serialize, Serializer};
use std::borrow::Borrow;
use std::fmt::Debug;
use std::hash::Hash;

/// The dots supporting one element. Almost always exactly one, stored inline.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dots {
    /// A single supporting add (the common case).
    One(Dot),
    /// Zero (only inside remove deltas) or several concurrent adds, sorted.
    Many(Vec<Dot>),
}

impl Dots {
    fn from_vec(mut v: Vec<Dot>) -> Dots {
        if v.len() == 1 {
            Dots::One(v[0])
        } else {
            crate::sort::sort(&mut v);
            v.dedup();
            Dots::Many(v)
        }
    }

    /// The dots, in order.
    pub fn as_slice(&self) -> &[Dot] {
        match self {
            Dots::One(d) => std::slice::from_ref(d),
            Dots::Many(v) => v,
        }
    }

    /// Whether `d` supports the element.
    pub fn contains(&self, d: Dot) -> bool {
        self.as_slice().contains(&d)
    }

    /// Whether no dot supports the element (a removal hint, see [`OrSet::remove`]).
    pub fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }
}

/// Whether some element of `entries` has no dot (a removal hint).
fn has_hints<V>(entries: &Entries<V>) -> bool {
    entries.values().any(Dots::is_empty)
}

/// Elements and their supporting dots.
pub type Entries<V> = IndexedMap<V, Dots>;

/// Joins `theirs` (seen under `their_ctx`) into `mine` (seen under `my_ctx`), element by
/// element: a dot survives if both sides have it, or if the side lacking it never saw it.
/// The contexts themselves are not merged here; the caller does that.
///
/// This is the join of the OR-Set lattice, exposed so a [`crate::Document`] can keep one
/// context for all its sets instead of one per set.
pub fn join_entries<V: Hash + Eq + Clone>(
    mine: &mut Entries<V>,
    my_ctx: &CausalContext,
    theirs: &Entries<V>,
    their_ctx: &CausalContext,
) {
    drop_removed(mine, theirs, their_ctx);
    for (v, their_dots) in theirs {
        join_element(mine, my_ctx, their_ctx, v, their_dots, V::clone);
    }
}

/// [`join_entries`] taking `theirs` by value: new elements move in instead of being cloned.
fn join_entries_owned<V: Hash + Eq>(
    mine: &mut Entries<V>,
    my_ctx: &CausalContext,
    theirs: Entries<V>,
    their_ctx: &CausalContext,
) {
    drop_removed(mine, &theirs, their_ctx);
    for (v, their_dots) in theirs {
        join_element(mine, my_ctx, their_ctx, v, &their_dots, |v| v);
    }
}

/// The first half of a join: the dots of `mine`'s elements that `theirs` does not mention
/// but whose removal `their_ctx` records are dropped (elements left without one go).
/// Elements `theirs` mentions are left to [`join_element`]. Touches nothing, after a
/// check, when every dot of a small `their_ctx` is accounted for (the common delta).
fn drop_removed<V: Hash + Eq>(mine: &mut Entries<V>, theirs: &Entries<V>, their_ctx: &CausalContext) {
    // Dots of `their_ctx` that may remove elements `theirs` does not mention. For small
    // contexts (deltas) enumerate them; if all are accounted for, skip the full scan.
    // (Saturating: a context from the wire may claim up to 2^64 dots per replica.)
    let ctx_dots =
        usize::try_from(their_ctx.vv.total()).unwrap_or(usize::MAX).saturating_add(their_ctx.cloud.len());
    if ctx_dots <= 64 {
        let in_theirs = |d: Dot| theirs.values().any(|ds| ds.contains(d));
        // A fresh add: its context is its own dot, nothing to drop.
        if their_ctx.vv.is_empty() && their_ctx.cloud.iter().all(|&d| in_theirs(d)) {
            return;
        }
        let mut loose: Vec<Dot> = Vec::new();
        for (r, top) in their_ctx.vv.iter() {
            loose.extend((1..=top).map(|q| Dot::new(r, q)).filter(|&d| !in_theirs(d)));
        }
        loose.extend(their_ctx.cloud.iter().copied().filter(|&d| !in_theirs(d)));
        // A dot that supports, in `mine`, an element `theirs` mentions is joined there.
        for (v, _) in theirs {
            if loose.is_empty() {
                return;
            }
            if let Some(my_dots) = mine.get(v) {
                loose.retain(|d| !my_dots.contains(*d));
            }
        }
        if loose.is_empty() {
            return;
        }
    }
    mine.retain(|v, ds| {
        if !ds.as_slice().iter().any(|d| their_ctx.contains(*d)) || theirs.contains_key(v) {
            return true;
        }
        let keep: Vec<Dot> = ds.as_slice().iter().copied().filter(|d| !their_ctx.contains(*d)).collect();
        if keep.is_empty() {
            return false;
        }
        *ds = Dots::from_vec(keep);
        true
    });
}

/// Joins one element of the other side, `v` with `their_dots`, into `mine`; `own` makes
/// the element to store when `mine` lacks it (a clone, or the value itself).
#[inline]
fn join_element<V: Hash + Eq, T: Borrow<V>>(
    mine: &mut Entries<V>,
    my_ctx: &CausalContext,
    their_ctx: &CausalContext,
    v: T,
    their_dots: &Dots,
    own: impl FnOnce(T) -> V,
) {
    let (hash, found) = mine.locate(v.borrow());
    join_located(mine, my_ctx, their_ctx, hash, found, v, their_dots, own);
}

/// [`join_element`] once `v` is located in `mine` (`hash` and `found` from
/// [`IndexedMap::locate`]).
#[inline]
#[allow(clippy::too_many_arguments)]
fn join_located<V: Hash + Eq, T>(
    mine: &mut Entries<V>,
    my_ctx: &CausalContext,
    their_ctx: &CausalContext,
    hash: u32,
    found: Result<usize, usize>,
    v: T,
    their_dots: &Dots,
    own: impl FnOnce(T) -> V,
) {
    match found {
        Err(free) => {
            let merged = match their_dots {
                Dots::One(d) if my_ctx.contains(*d) => return,
                Dots::One(d) => Dots::One(*d),
                Dots::Many(ds) => {
                    let keep: Vec<Dot> = ds.iter().copied().filter(|d| !my_ctx.contains(*d)).collect();
                    if keep.is_empty() {
                        return;
                    }
                    Dots::from_vec(keep)
                }
            };
            mine.push_new(hash, free, own(v), merged);
        }
        Ok(pos) => {
            let my_dots = mine.value_at_mut(pos);
            if *my_dots != *their_dots && !join_dots(my_dots, my_ctx, their_dots, their_ctx) {
                mine.remove_at(hash, pos);
            }
        }
    }
}

/// Whether every dot of `ctx` is `d` or one of `mine`, with few enough of them that
/// [`drop_removed`] would enumerate them (and so find nothing to drop): the context of a
/// local add, which retires the dots the element had.
#[inline]
fn only_dots_of(ctx: &CausalContext, d: Dot, mine: Option<&Dots>) -> bool {
    let mine = mine.map_or(&[][..], Dots::as_slice);
    let ok = |x: Dot| x == d || mine.contains(&x);
    let Some(mut budget) = (mine.len() + 1).checked_sub(ctx.cloud.len()).filter(|_| mine.len() < 64) else {
        return false;
    };
    for (r, top) in ctx.vv.iter() {
        if top > budget as u64 {
            return false;
        }
        budget -= top as usize;
        if !(1..=top).all(|q| ok(Dot::new(r, q))) {
            return false;
        }
    }
    ctx.cloud.iter().all(|&x| ok(x))
}

/// Joins the dots of one element present on both sides into `mine`: a dot survives if
/// both sides have it, or if the side lacking it never saw it. Returns whether any survive.
fn join_dots(mine: &mut Dots, my_ctx: &CausalContext, theirs: &Dots, their_ctx: &CausalContext) -> bool {
    // The common case, one add on each side (a re-add meeting the add it replaced),
    // without allocating.
    if let (Dots::One(m), Dots::One(t)) = (&*mine, theirs) {
        let (m, t) = (*m, *t);
        let keep_m = !their_ctx.contains(m);
        let keep_t = !my_ctx.contains(t);
        *mine = match (keep_m, keep_t) {
            (true, true) => Dots::from_vec(vec![m, t]),
            (true, false) => Dots::One(m),
            (false, true) => Dots::One(t),
            (false, false) => return false,
        };
        return true;
    }
    let mut keep: Vec<Dot> =
        mine.as_slice().iter().copied().filter(|d| theirs.contains(*d) || !their_ctx.contains(*d)).collect();
    keep.extend(theirs.as_slice().iter().copied().filter(|d| !mine.contains(*d) && !my_ctx.contains(*d)));
    if keep.is_empty() {
        return false;
    }
    *mine = Dots::from_vec(keep);
    true
}

/// An add-wins observed-remove set.
///
/// A remove delta names the element it removes with an empty dot set, a *removal hint*
/// that lets a join find the element without scanning the whole set. A hint is not an
/// element: reads, equality and joins treat it as absent, and no join leaves one in a
/// state that did not already carry one.
///
/// A local add is `let d = set.add(dot, v);`, then ship `d` (encode or clone it) and
/// `set.apply(d)`: applying by value moves the element in; `merge(&d)` clones it.
///
/// ```
/// use concord_core::{Crdt, OrSet, ReplicaId};
/// let (a, b) = (ReplicaId(1), ReplicaId(2));
/// let mut x: OrSet<String> = OrSet::default();
/// let d = x.add(x.next_dot(a), "milk".into());
/// x.apply(d);
/// let mut y = x.clone();
/// y.merge(&y.remove(&"milk".into()));            // b removes what it saw...
/// x.merge(&x.add(x.next_dot(a), "milk".into())); // ...while a adds again
/// x.merge(&y);
/// assert!(x.contains(&"milk".into()));           // add wins
/// ```
#[derive(Clone, Debug)]
pub struct OrSet<V: Hash + Eq> {
    entries: Entries<V>,
    ctx: CausalContext,
    /// Whether `entries` may hold removal hints (only deltas do); reads skip them.
    hinted: bool,
}

impl<V: Hash + Eq> Default for OrSet<V> {
    fn default() -> Self {
        Self { entries: Entries::default(), ctx: CausalContext::default(), hinted: false }
    }
}

impl<V: Hash + Eq> PartialEq for OrSet<V> {
    /// Same context and same elements with the same dots; removal hints do not count.
    fn eq(&self, other: &Self) -> bool {
        if self.ctx != other.ctx {
            return false;
        }
        if !self.hinted && !other.hinted {
            return self.entries == other.entries;
        }
        let live = |s: &'_ Self| s.entries.iter().filter(|(_, d)| !d.is_empty()).count();
        live(self) == live(other)
            && self
                .entries
                .iter()
                .filter(|(_, d)| !d.is_empty())
                .all(|(v, d)| other.entries.get(v) == Some(d))
    }
}

impl<V: Hash + Eq + Clone> OrSet<V> {
    /// A set made of `entries` seen under `ctx` (used by documents and decoders).
    pub fn from_parts(entries: Entries<V>, ctx: CausalContext) -> Self {
        let hinted = has_hints(&entries);
        Self { entries, ctx, hinted }
    }

    /// The elements with their dots (a delta may also hold removal hints: elements with
    /// no dot).
    pub fn entries(&self) -> &Entries<V> {
        &self.entries
    }

    /// Mutable elements, for documents that keep the context elsewhere and join with
    /// [`join_entries`]. Do not insert elements without a dot: this set does not expect
    /// removal hints it did not start with.
    pub fn entries_mut(&mut self) -> &mut Entries<V> {
        &mut self.entries
    }

    /// Every dot this set has seen.
    pub fn context(&self) -> &CausalContext {
        &self.ctx
    }

    /// The next dot `replica` should use for this set when used standalone (in a
    /// document, the document mints dots).
    #[inline]
    pub fn next_dot(&self, replica: crate::ReplicaId) -> Dot {
        if self.ctx.cloud.is_empty() {
            return Dot::new(replica, self.ctx.vv.get(replica) + 1);
        }
        let top = self.ctx.cloud.iter().filter(|d| d.replica == replica).map(|d| d.seq).max();
        Dot::new(replica, top.unwrap_or(0).max(self.ctx.vv.get(replica)) + 1)
    }

    /// The delta that adds `v` with the fresh dot `dot`; it also retires the dots that
    /// supported `v` so far (one dot per element in the common case).
    #[inline]
    pub fn add(&self, dot: Dot, v: V) -> OrSet<V> {
        let (hash, found) = self.entries.locate(&v);
        let mut ctx = CausalContext::of_dot(dot);
        if let Ok(pos) = found {
            for &d in self.entries.value_at(pos).as_slice() {
                ctx.insert(d);
            }
        }
        // The delta keeps what the lookup learnt for `apply` (if this set has a table): the
        // element's hash, and for a new element the free slot it goes to here.
        OrSet { entries: self.entries.delta_of(v, Dots::One(dot), hash, found), ctx, hinted: false }
    }

    /// The delta that removes `v` as observed here: the dots it retires, and a removal
    /// hint naming `v`. Removing an absent element is a no-op (an empty delta).
    pub fn remove(&self, v: &V) -> OrSet<V> {
        let mut out = OrSet::default();
        if let Some(ds) = self.entries.get(v).filter(|ds| !ds.is_empty()) {
            for &d in ds.as_slice() {
                out.ctx.insert(d);
            }
            out.entries.insert(v.clone(), Dots::Many(Vec::new()));
            out.hinted = true;
        }
        out
    }

    /// Whether `v` is in the set.
    pub fn contains(&self, v: &V) -> bool {
        self.entries.get(v).is_some_and(|ds| !ds.is_empty())
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        if self.hinted {
            self.entries.values().filter(|ds| !ds.is_empty()).count()
        } else {
            self.entries.len()
        }
    }

    /// Whether the set has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &V> {
        self.entries.iter().filter(|(_, ds)| !ds.is_empty()).map(|(v, _)| v)
    }
}

impl<V: Hash + Eq> OrSet<V> {
    /// Finishes a join of elements seen under `their_ctx`.
    fn joined(&mut self, their_ctx: &CausalContext) {
        self.ctx.merge(their_ctx);
        self.drop_hints();
    }

    /// A join never adds hints, but a delta joined into may carry its own: a merged state
    /// is no longer a single remove, so drop them.
    #[inline]
    fn drop_hints(&mut self) {
        if self.hinted {
            self.entries.retain(|_, ds| !ds.is_empty());
            self.hinted = false;
        }
    }

    /// [`Crdt::apply`] of a delta of one element `v` with one dot `d`, of which the
    /// delta may know the hash and, if made by this set and nothing changed since, where
    /// it goes (see [`OrSet::add`]).
    #[inline]
    fn apply_one(&mut self, v: V, d: Dot, known: Option<Known>, ctx: &CausalContext) {
        let (hash, found) = match known {
            Some(k) => (k.hash(), self.entries.find_known(k, &v)),
            None => self.entries.locate(&v),
        };
        // The local add of a new element: its context is its dot alone, which removes
        // nothing, so the join is to record the dot and, if it is new here, add the element.
        if let Err(free) = found {
            if ctx.is_of_dot(d) {
                if self.ctx.insert_new(d) {
                    self.entries.push_new(hash, free, v, Dots::One(d));
                }
                self.drop_hints();
                return;
            }
        }
        self.apply_located(v, d, hash, found, ctx);
    }

    /// [`Self::apply_one`] past its fast path, with `v` located (`hash`, `found`).
    #[inline(never)]
    fn apply_located(&mut self, v: V, d: Dot, hash: u32, found: Result<usize, usize>, ctx: &CausalContext) {
        // A context holding nothing but `d` and dots `v` has here (a local re-add, which
        // retires them) removes no other element, so the join is that element's alone.
        if only_dots_of(ctx, d, found.ok().map(|pos| self.entries.value_at(pos))) {
            join_located(&mut self.entries, &self.ctx, ctx, hash, found, v, &Dots::One(d), |v| v);
            self.joined(ctx);
        } else {
            self.apply_entries(Entries::one(v, Dots::One(d)), ctx);
        }
    }

    /// [`Crdt::apply`] in general: a join that moves new elements in.
    #[inline(never)]
    fn apply_entries(&mut self, entries: Entries<V>, ctx: &CausalContext) {
        join_entries_owned(&mut self.entries, &self.ctx, entries, ctx);
        self.joined(ctx);
    }
}

impl<V> Crdt for OrSet<V>
where
    V: Hash + Eq + Ord + Clone + Debug + Serialize + DeserializeOwned + Wire,
{
    type Value = Vec<V>;

    fn merge(&mut self, other: &Self) {
        join_entries(&mut self.entries, &self.ctx, &other.entries, &other.ctx);
        self.joined(&other.ctx);
    }

    /// Moves the delta's new elements in instead of cloning them: the cheap way to apply
    /// a local [`OrSet::add`] (encode or clone the delta first to ship it).
    #[inline]
    fn apply(&mut self, delta: Self) {
        let OrSet { entries, ctx, .. } = delta;
        // The common delta, a local add: one element with one dot. Its join concerns that
        // element alone (see `apply_one`): locate it once.
        match entries.into_single() {
            Ok(((v, Dots::One(d)), known)) => self.apply_one(v, d, known, &ctx),
            Ok(((v, ds), _)) => self.apply_entries(Entries::one(v, ds), &ctx),
            Err(entries) => self.apply_entries(entries, &ctx),
        }
    }

    /// The elements in sorted order.
    fn value(&self) -> Vec<V> {
        let mut v: Vec<V> = self.iter().cloned().collect();
        crate::sort::sort(&mut v);
        v
    }

    fn validate(&self) -> Result<(), InvalidState> {
        self.ctx.validate().map_err(InvalidState)?;
        validate_entries(&self.entries, &self.ctx)
    }
}

/// Checks that every supporting dot is seen by `ctx` and supports one element only.
pub fn validate_entries<V: Hash + Eq>(entries: &Entries<V>, ctx: &CausalContext) -> Result<(), InvalidState> {
    // Every dot, sorted, to find one used twice (a sort: no hash set type for dots).
    let mut seen: Vec<Dot> = Vec::new();
    for ds in entries.values() {
        if let Dots::Many(v) = ds {
            if v.len() == 1 || v.windows(2).any(|w| w[0] >= w[1]) {
                return Err(InvalidState("set dots are not sorted and unique"));
            }
        }
        for &d in ds.as_slice() {
            if !ctx.contains(d) {
                return Err(InvalidState("set element has a dot outside the causal context"));
            }
            seen.push(d);
        }
    }
    crate::sort::sort(&mut seen);
    if seen.windows(2).any(|w| w[0] == w[1]) {
        return Err(InvalidState("one dot supports two set elements"));
    }
    Ok(())
}

/// Canonical wire form: elements sorted, so equal sets encode to equal bytes.
#[derive(Serialize, Deserialize)]
struct OrSetRepr<V> {
    entries: Vec<(V, Vec<Dot>)>,
    ctx: CausalContext,
}

/// Sorted `(element, dots)` pairs: the canonical order for encoding and hashing.
pub fn sorted_entries<V: Ord + Hash + Eq + Clone>(entries: &Entries<V>) -> Vec<(V, Vec<Dot>)> {
    let mut v: Vec<(V, Vec<Dot>)> = entries.iter().map(|(k, d)| (k.clone(), d.as_slice().to_vec())).collect();
    crate::sort::sort_by(&mut v, |a, b| a.0.cmp(&b.0));
    v
}

/// Rebuilds entries from their wire form.
pub fn entries_from_sorted<V: Hash + Eq>(pairs: Vec<(V, Vec<Dot>)>) -> Entries<V> {
    let mut e = Entries::default();
    e.reserve(pairs.len());
    for (v, ds) in pairs {
        e.insert(v, Dots::from_vec(ds));
    }
    e
}

impl<V: Ord + Hash + Eq + Clone + Serialize> Serialize for OrSet<V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        OrSetRepr { entries: sorted_entries(&self.entries), ctx: self.ctx.clone() }.serialize(s)
    }
}

impl<'de, V: Hash + Eq + Deserialize<'de>> Deserialize<'de> for OrSet<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let r = OrSetRepr::<V>::deserialize(d)?;
        let entries = entries_from_sorted(r.entries);
        let hinted = has_hints(&entries);
        Ok(OrSet { entries, ctx: r.ctx, hinted })
    }
}

/// Longest prefix an element shares with the one before it on the wire. The cap keeps
/// decoding linear: an element costs at least two input bytes, so at most this many
/// bytes are rebuilt per input byte pair, whatever a forged input claims.
const MAX_SHARED: usize = 127;

/// How a dot's seq is written after `last`, its replica's previous seq on the wire (0:
/// none yet): the first as it is (a zig-zag would double it), later ones as zig-zagged
/// steps (small; negative only for the further dots of an element with several).
fn seq_step(last: u64, seq: u64) -> u64 {
    if last == 0 {
        seq
    } else {
        zigzag(seq.wrapping_sub(last) as i64)
    }
}

/// Inverse of [`seq_step`].
fn seq_from_step(last: u64, step: u64) -> u64 {
    if last == 0 {
        step
    } else {
        last.wrapping_add(unzigzag(step) as u64)
    }
}

/// The wire form (format 2, see [`crate::codec`]), canonical so that equal sets encode to
/// equal bytes (Merkle leaves hash it):
///
/// ```text
/// entries: varint
/// replicas: varint count, then each ReplicaId ascending
/// per entry, removal hints (no dots) first by element, then by first dot:
///   shared: varint            bytes of the element's encoding equal to the previous one's (<= 127)
///   head: varint              suffix length << 2 | dot count (3 = 3 or more, a varint follows)
///   [more: varint]            dot count - 3
///   suffix: bytes             the rest of the element's encoding
///   per dot: [replica index: varint, only with two or more replicas]
///            seq: varint      the seq itself for the replica's first dot, else the
///                             zig-zagged difference to that replica's previous seq
/// context: CausalContext
/// ```
///
/// Written in dot order, elements added one after another sit side by side, so ids with
/// a common stem share their prefix and sequence numbers differ by small steps; a replica
/// id is written once instead of once per dot. This is the columnar idea of Automerge's
/// storage format (front coding, delta coding, an actor table) in one row-wise pass, with
/// no compressor: a 5,000-element set of `item-N` strings from one replica takes 4.2 bytes
/// per element instead of ~24 in format 1 (which is still read: value-sorted pairs of
/// element and dots, see `OrSet::read_v1`).
impl<V: Ord + Hash + Eq + Wire> Wire for OrSet<V> {
    fn put(&self, out: &mut Vec<u8>) {
        let mut order: Vec<(&V, &[Dot])> = self.entries.iter().map(|(v, ds)| (v, ds.as_slice())).collect();
        // `None` (a hint) sorts first; dots are unique across elements, so only hints tie.
        crate::sort::sort_by(&mut order, |a, b| a.1.first().cmp(&b.1.first()).then_with(|| a.0.cmp(b.0)));
        let mut replicas: Vec<ReplicaId> = Vec::new();
        for (_, ds) in &order {
            for d in *ds {
                if replicas.last() != Some(&d.replica) {
                    replicas.push(d.replica);
                }
            }
        }
        crate::sort::sort(&mut replicas);
        replicas.dedup();
        put_varint(out, order.len() as u64);
        put_seq(out, &replicas, ReplicaId::put);
        let mut last = vec![0u64; replicas.len()];
        let (mut prev, mut cur) = (Vec::new(), Vec::new());
        for (v, dots) in order {
            cur.clear();
            v.put(&mut cur);
            let shared = prev.iter().zip(&cur).take(MAX_SHARED).take_while(|(a, b)| a == b).count();
            let suffix = &cur[shared..];
            put_varint(out, shared as u64);
            put_varint(out, (suffix.len() as u64) << 2 | dots.len().min(3) as u64);
            if dots.len() >= 3 {
                put_varint(out, dots.len() as u64 - 3);
            }
            out.extend_from_slice(suffix);
            for d in dots {
                let i = replicas.binary_search(&d.replica).unwrap_or_default();
                if replicas.len() > 1 {
                    put_varint(out, i as u64);
                }
                put_varint(out, seq_step(last[i], d.seq));
                last[i] = d.seq;
            }
            std::mem::swap(&mut prev, &mut cur);
        }
        self.ctx.put(out);
    }

    fn read(r: &mut Reader<'_>) -> R<Self> {
        if r.format() == 1 {
            return Self::read_v1(r);
        }
        let n = r.count()?;
        let replicas = r.seq(ReplicaId::read)?;
        let mut last = vec![0u64; replicas.len()];
        let mut entries = Entries::default();
        entries.reserve(n.min(4096));
        let mut value = Vec::new();
        for _ in 0..n {
            let shared = r.varint()?;
            let head = r.varint()?;
            let dots = match head & 3 {
                3 => r.count()? + 3,
                k => k as usize,
            };
            if shared > MAX_SHARED as u64 || shared > value.len() as u64 {
                return Err("set element shares more than the previous one has, or over 127 bytes");
            }
            value.truncate(shared as usize);
            value.extend_from_slice(r.take(head >> 2)?);
            let v: V = Reader::new(&value).whole()?;
            let mut ds = Vec::with_capacity(dots.min(r.left()));
            for _ in 0..dots {
                let i = if replicas.len() == 1 { 0 } else { r.varint()? };
                let i = usize::try_from(i)
                    .ok()
                    .filter(|&i| i < replicas.len())
                    .ok_or("set dot names no replica")?;
                last[i] = seq_from_step(last[i], r.varint()?);
                ds.push(Dot::new(replicas[i], last[i]));
            }
            if entries.insert(v, Dots::from_vec(ds)).is_some() {
                return Err("set element listed twice");
            }
        }
        let hinted = has_hints(&entries);
        Ok(OrSet { entries, ctx: CausalContext::read(r)?, hinted })
    }
}

impl<V: Ord + Hash + Eq + Wire> OrSet<V> {
    /// Format 1: `[(element, [dot])]` sorted by element, then the context.
    fn read_v1(r: &mut Reader<'_>) -> R<Self> {
        let pairs = r.seq(|r| Ok((V::read(r)?, r.seq(Dot::read)?)))?;
        let entries = entries_from_sorted(pairs);
        let hinted = has_hints(&entries);
        Ok(OrSet { entries, ctx: CausalContext::read(r)?, hinted })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ReplicaId;

    const A: ReplicaId = ReplicaId(1);
    const B: ReplicaId = ReplicaId(2);

    fn s(x: &str) -> String {
        x.to_string()
    }

    fn add(set: &mut OrSet<String>, r: ReplicaId, v: &str) -> OrSet<String> {
        let d = set.add(set.next_dot(r), s(v));
        set.merge(&d);
        d
    }

    #[test]
    fn concurrent_add_and_remove_keeps_the_element() {
        let mut a = OrSet::default();
        add(&mut a, A, "x");
        let mut b = a.clone();
        let rm = b.remove(&s("x"));
        b.merge(&rm);
        let re = add(&mut a, A, "x");
        a.merge(&rm);
        b.merge(&re);
        assert!(a.contains(&s("x")) && b.contains(&s("x")));
        assert_eq!(a, b);
    }

    #[test]
    fn remove_then_re_add_is_present() {
        let mut a = OrSet::default();
        add(&mut a, A, "x");
        a.merge(&a.remove(&s("x")));
        assert!(!a.contains(&s("x")));
        add(&mut a, A, "x");
        assert!(a.contains(&s("x")));
    }

    #[test]
    fn removing_an_element_never_seen_has_no_effect() {
        let mut a = OrSet::default();
        add(&mut a, A, "x");
        let before = a.clone();
        let d = a.remove(&s("y"));
        a.merge(&d);
        assert_eq!(a, before);
        let mut b: OrSet<String> = OrSet::default();
        add(&mut b, B, "y");
        b.merge(&d);
        assert!(b.contains(&s("y")));
    }

    #[test]
    fn remove_does_not_delete_concurrent_add_from_another_replica() {
        let mut a = OrSet::default();
        let mut b = OrSet::default();
        let from_a = add(&mut a, A, "x");
        b.merge(&from_a);
        let from_b = add(&mut b, B, "x"); // b adds x concurrently (b's own dot)
        let rm = a.remove(&s("x")); // a removes only the add it saw
        a.merge(&rm);
        a.merge(&from_b);
        b.merge(&rm);
        assert!(a.contains(&s("x")) && b.contains(&s("x")));
        assert_eq!(a, b);
    }

    #[test]
    fn remove_delta_arriving_before_the_add_it_observed_still_removes_it() {
        let mut a = OrSet::default();
        let add_x = add(&mut a, A, "x");
        let rm = a.remove(&s("x"));
        let mut c: OrSet<String> = OrSet::default();
        c.merge(&rm);
        c.merge(&add_x);
        assert!(!c.contains(&s("x")));
    }
    /// `apply` (with its fast path for one-element deltas) against the general join.
    fn apply_matches_merge(state: &OrSet<String>, delta: &OrSet<String>) {
        let mut fast = state.clone();
        fast.apply(delta.clone());
        let mut general = state.clone();
        general.merge(delta);
        assert_eq!(fast, general, "state {state:?}, delta {delta:?}");
        assert_eq!(fast.entries().len(), general.entries().len());
        for (v, ds) in general.entries() {
            assert_eq!(fast.entries().get(v), Some(ds));
        }
    }

    #[test]
    fn the_one_element_apply_fast_path_joins_like_merge() {
        let mut one = OrSet::default();
        add(&mut one, A, "x");
        add(&mut one, A, "y");
        // Element present with one dot: a local re-add retires it.
        apply_matches_merge(&one, &one.add(one.next_dot(A), s("x")));
        // Absent element, first dot of the replica (the context is a vector, not a cloud).
        apply_matches_merge(&OrSet::default(), &OrSet::default().add(Dot::new(A, 1), s("x")));
        apply_matches_merge(&one, &one.add(one.next_dot(B), s("z")));

        // Element present with several (concurrent) dots.
        let mut other = OrSet::default();
        add(&mut other, B, "x");
        let mut many = one.clone();
        many.merge(&other);
        assert_eq!(many.entries().get(&s("x")).map(|d| d.as_slice().len()), Some(2));
        apply_matches_merge(&many, &many.add(many.next_dot(A), s("x")));
        // A delta made before the concurrent dot arrived retires only one of them.
        apply_matches_merge(&many, &one.add(one.next_dot(A), s("x")));
        // ...and one whose dot that state has already seen.
        let stale = one.add(one.next_dot(A), s("x"));
        let mut seen = many.clone();
        seen.apply(stale.clone());
        apply_matches_merge(&seen, &stale);

        // A context with concurrent dots (removing "y" elsewhere): the general path.
        let mut wide = one.add(one.next_dot(A), s("x"));
        wide.ctx.insert(Dot::new(A, 2));
        wide.ctx.insert(Dot::new(B, 7));
        apply_matches_merge(&one, &wide);
        apply_matches_merge(&many, &wide);
        // A context missing the element's old dot keeps it beside the new one.
        let mut narrow = OrSet::default();
        narrow.ctx.insert(Dot::new(A, 9));
        narrow.entries = Entries::one(s("x"), Dots::One(Dot::new(A, 9)));
        apply_matches_merge(&one, &narrow);
        // A delta whose dot this state has seen (and removed): nothing comes back.
        let mut removed = one.clone();
        removed.merge(&removed.remove(&s("x")));
        let mut old = OrSet { entries: Entries::one(s("x"), Dots::One(Dot::new(A, 1))), ..OrSet::default() };
        old.ctx.insert(Dot::new(A, 1));
        apply_matches_merge(&removed, &old);
        apply_matches_merge(&one, &old);
        // Into a remove delta, which carries a removal hint.
        let rm = one.remove(&s("y"));
        apply_matches_merge(&rm, &one.add(one.next_dot(A), s("y")));
        apply_matches_merge(&rm, &one.add(one.next_dot(A), s("w")));
    }

    #[test]
    fn a_delta_that_carries_its_elements_hash_applies_like_merge() {
        // Sets large enough for a table, so `add` hands its hash to `apply`.
        let mut big = OrSet::default();
        for i in 0..40 {
            add(&mut big, A, &format!("e{i}"));
        }
        let new = big.add(big.next_dot(A), s("new"));
        assert!(matches!(new.entries.clone().into_single(), Ok((_, Some(_)))));
        apply_matches_merge(&big, &new);
        apply_matches_merge(&big, &big.add(big.next_dot(A), s("e7")));
        // Applied again (its dot seen), and into sets with and without a table.
        let mut seen = big.clone();
        seen.apply(new.clone());
        apply_matches_merge(&seen, &new);
        apply_matches_merge(&OrSet::default(), &new);
        let mut other = OrSet::default();
        for i in 0..40 {
            add(&mut other, B, &format!("o{i}"));
        }
        apply_matches_merge(&other, &new);
        // A delta edited through `entries_mut` no longer claims a hash.
        let mut edited = big.add(big.next_dot(A), s("x"));
        edited.entries_mut().insert(s("y"), Dots::One(Dot::new(A, 99)));
        edited.entries_mut().remove(&s("y"));
        assert!(!matches!(edited.entries.clone().into_single(), Ok((_, Some(_)))));
    }

    /// A set and its twin: the set applies deltas (trusting where `add` found a free
    /// slot when nothing changed since), the twin merges them (the general join).
    fn apply_and_merge(set: &mut OrSet<String>, twin: &mut OrSet<String>, delta: &OrSet<String>) {
        set.apply(delta.clone());
        twin.merge(delta);
        assert_eq!(*set, *twin, "delta {delta:?}");
        assert!(set.validate().is_ok());
        let mut seen: Vec<&String> = set.entries().iter().map(|(v, _)| v).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), set.entries().len(), "an element entered twice");
    }

    #[test]
    fn a_delta_applied_to_a_set_that_changed_since_it_was_made_probes_again() {
        let mut set = OrSet::default();
        for i in 0..40 {
            add(&mut set, A, &format!("e{i}"));
        }
        let mut twin = set.clone();
        // Unchanged since: the remembered slot is used.
        let d = set.add(set.next_dot(A), s("p"));
        apply_and_merge(&mut set, &mut twin, &d);
        // Two adds of one new element made before either is applied: both remember the
        // same free slot; once the first is in, the second must find the element there.
        let (d1, d2) = (set.add(Dot::new(A, 100), s("q")), set.add(Dot::new(B, 7), s("q")));
        apply_and_merge(&mut set, &mut twin, &d2);
        apply_and_merge(&mut set, &mut twin, &d1);
        assert_eq!(set.entries().get(&s("q")).map(|ds| ds.as_slice().len()), Some(2));
        // A removal in between frees and shifts slots.
        let d3 = set.add(set.next_dot(A), s("r"));
        let rm = set.remove(&s("e3"));
        apply_and_merge(&mut set, &mut twin, &rm);
        apply_and_merge(&mut set, &mut twin, &d3);
        // A clone changes apart from its original even after as many changes: a delta of
        // the original does not claim a slot in the clone.
        let mut copy = set.clone();
        let mut copy_twin = copy.clone();
        let x = set.add(set.next_dot(A), s("x"));
        set.apply(x);
        let y = copy.add(copy.next_dot(B), s("y"));
        apply_and_merge(&mut copy, &mut copy_twin, &y);
        let y_again = set.add(set.next_dot(A), s("y"));
        apply_and_merge(&mut copy, &mut copy_twin, &y_again);
        assert_eq!(copy.entries().get(&s("y")).map(|ds| ds.as_slice().len()), Some(2));
    }

    fn encoded(set: &OrSet<String>) -> Vec<u8> {
        let mut out = Vec::new();
        set.put(&mut out);
        out
    }

    #[test]
    fn the_wire_form_is_front_and_delta_coded_and_round_trips() {
        // The bench's churn: ids with a common stem, every other one removed again.
        let mut set = OrSet::default();
        for i in 0..10_000 {
            add(&mut set, A, &format!("item-{i}"));
        }
        for i in (0..10_000).step_by(2) {
            set.merge(&set.remove(&format!("item-{i}")));
        }
        let bytes = encoded(&set);
        // Format 1 wrote an element and a whole dot each: 11 + 1 + 1 + 2 bytes (a random id: 10).
        assert!(bytes.len() <= 9 * 5_000 / 2, "{} bytes for 5,000 elements", bytes.len());
        assert_eq!(Reader::new(&bytes).whole::<OrSet<String>>(), Ok(set.clone()));
        // Several replicas, an element with four concurrent dots, one with none (a removal
        // hint): replica indices appear, and the order is still canonical.
        let (c, e) = (ReplicaId(u64::MAX), ReplicaId(1 << 40));
        let mut many = OrSet::default();
        for (r, v) in [(A, "x"), (B, "x"), (c, "x"), (e, "x"), (B, "y"), (c, "z")] {
            let own = OrSet::default();
            let d = own.add(own.next_dot(r), s(v));
            many.merge(&d);
        }
        assert_eq!(many.entries().get(&s("x")).map(|ds| ds.as_slice().len()), Some(4));
        let mut hinted = many.remove(&s("x"));
        hinted.merge(&many.remove(&s("nothing")));
        for set in [&many, &hinted] {
            let bytes = encoded(set);
            let back: OrSet<String> = Reader::new(&bytes).whole().unwrap();
            assert_eq!(&back, set);
            assert_eq!(encoded(&back), bytes);
        }
    }

    #[test]
    fn forged_set_bytes_are_refused_not_trusted() {
        let read = |b: &[u8]| Reader::new(b).whole::<OrSet<String>>();
        // One entry, table [A]: shared 0, head 2 << 2 | 1, "x", seq 1; context {A: 1}.
        let good = [1, 1, 1, 0, 9, 1, b'x', 1, 1, 1, 1, 0];
        assert_eq!(
            read(&good).map(|set| set.entries().get(&s("x")).cloned()),
            Ok(Some(Dots::One(Dot::new(A, 1))))
        );
        let mut b = good;
        b[3] = 1; // shares a byte with no previous element
        assert!(read(&b).is_err());
        // A dot with an empty replica table.
        assert!(read(&[&[1, 0][..], &good[3..]].concat()).is_err());
        // A second entry that is not there.
        let mut b = good;
        b[0] = 2;
        assert!(read(&b).is_err());
        // Two replicas, a dot naming the third.
        assert!(read(&[1, 2, 1, 2, 0, 9, 1, b'x', 2, 2, 1, 1, 1, 0]).is_err());
        // The same element twice, the second sharing all of the first.
        let twice = [2, 1, 1, 0, 9, 1, b'x', 2, 2, 1, 2, 1, 1, 2, 0];
        assert_eq!(read(&twice), Err("set element listed twice"));
        // A prefix longer than the cap, even if the previous element had it.
        let stem = "y".repeat(199);
        let mut set = OrSet::default();
        add(&mut set, A, &(stem.clone() + "a"));
        add(&mut set, A, &(stem + "b"));
        let bytes = encoded(&set);
        assert_eq!(read(&bytes), Ok(set), "written with at most 127 shared bytes");
        let at: Vec<usize> = (0..bytes.len()).filter(|&i| bytes[i] == MAX_SHARED as u8).collect();
        assert_eq!(at.len(), 1, "the second entry's shared length");
        let mut forged = bytes.clone();
        forged[at[0]] = 0x80 | 200;
        forged.insert(at[0] + 1, 1);
        assert!(read(&forged).is_err());
        for cut in 0..bytes.len() {
            assert!(read(&bytes[..cut]).is_err(), "a set cut at {cut} bytes");
        }
    }
}
