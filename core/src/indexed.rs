//! An insertion-ordered hash map for the OR-Set's elements.
//!
//! The layout follows the idea behind Python's compact dict and Rust's `indexmap`: the
//! entries live densely in a `Vec`, in the order they arrived, and a separate
//! open-addressing table holds only `u32` positions into that `Vec`. The table is split the
//! way Google's SwissTable (Abseil's `flat_hash_map`, Rust's `hashbrown`) splits it: one
//! control byte per slot, holding 7 bits of the key's hash (or "free"), beside the array of
//! positions; a probe compares eight control bytes at a time with word arithmetic. Each
//! key's 32-bit hash is kept in a third array, parallel to the entries. Why it beats a
//! `HashMap<String, Dots>` for a set of a million strings:
//!
//! - Adding appends to the `Vec`: sequential writes, and the string's heap memory is only
//!   read once, to hash it.
//! - Looking up an absent key (every add of a new element) reads only control bytes, one
//!   byte a slot: 2 MiB for a million elements, which stays in cache where the positions
//!   (and the entries) do not. A position is only read when 7 hash bits match.
//! - Growing rebuilds the table from the stored hashes; it never re-hashes a key, so it
//!   never chases a pointer into string memory (a `HashMap` re-hashes every key on every
//!   doubling: a cache miss per element). The `Vec`s grow by `realloc`.
//! - The table is small: 5 bytes a slot (at most half full) and 4 bytes of hash an entry.
//! - Keys are hashed with the Fx hash of [`crate::hash`], not SipHash.
//!
//! Probing is linear, slot by slot (a group of eight is read at once, starting anywhere),
//! so removal shifts later slots back instead of leaving tombstones (Knuth's Algorithm R,
//! TAOCP vol. 3, 6.4).
//!
//! Small maps (every delta) have no table at all: lookups compare keys in a linear scan,
//! and a map of one entry keeps it inline, so making a one-element delta allocates
//! nothing. A local add's delta also carries what its lookup learnt (`Known`): the
//! element's hash, and for a new element the free slot where the probe ended, stamped with
//! the table's process-unique id and change count. Applied to the same set with no change
//! in between (the usual `apply(add(..))`), the element goes to that slot without hashing
//! or probing again; anything else (another set, a clone, a change since) probes as usual.
//! Removal swaps the last entry into the hole, so the order is only "arrival order,
//! disturbed by removals": nothing may depend on it (encodings sort).

use crate::hash::FxHasher;
use crate::onevec::OneOrVec;
use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// Up to this many entries a map has no table: lookups scan the entries.
const SMALL: usize = 8;
/// The control byte of a free slot. A used slot's byte is its key's [`h2`] (top bit clear).
const EMPTY: u8 = 0x80;
/// Control bytes compared at once, as one `u64`.
const GROUP: usize = 8;
const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

/// A hash map that keeps its entries densely in arrival order (see the module docs).
///
/// It has the `HashMap` methods the OR-Set and its callers use, with the same meaning;
/// iteration order is unspecified. Equality ignores order.
///
/// ```
/// use concord_core::indexed::IndexedMap;
/// let mut m = IndexedMap::default();
/// assert_eq!(m.insert("milk".to_string(), 1), None);
/// assert_eq!(m.insert("eggs".to_string(), 2), None);
/// assert_eq!(m.insert("milk".to_string(), 3), Some(1));
/// assert_eq!(m.get("milk"), Some(&3));
/// assert_eq!(m.remove("milk"), Some(3));
/// assert_eq!(m.iter().collect::<Vec<_>>(), [(&"eggs".to_string(), &2)]);
/// ```
#[derive(Clone)]
pub struct IndexedMap<K, V> {
    entries: OneOrVec<(K, V)>,
    index: Index,
}

/// How an [`IndexedMap`] finds its keys.
#[derive(Clone)]
enum Index {
    /// No table (a small map): lookups scan the entries.
    Scan,
    /// No table, a single entry, and what the map it was made from knew of its key: the
    /// delta of a local add, whose element was looked up there, so applying it need not
    /// hash it (or look it up) again.
    Known(Known),
    /// The table.
    Table(Box<Table>),
}

/// What a one-entry map made by [`IndexedMap::delta_of`] knows of its key in the map it
/// was made from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Known {
    /// The key's hash.
    Hash(u32),
    /// The key's hash, and that it was absent from table `table` after its `mods`-th
    /// change, whose probe for it ended at free slot `slot`: while that table has not
    /// changed, the key can be put there without probing again.
    Absent { hash: u32, slot: usize, table: u64, mods: u64 },
}

impl Known {
    /// The key's hash.
    #[inline]
    pub(crate) fn hash(self) -> u32 {
        match self {
            Known::Hash(h) | Known::Absent { hash: h, .. } => h,
        }
    }
}

/// Tables made so far: each table's id, unique in the process (a clone gets its own), so
/// a [`Known::Absent`] can only ever match the table it was made from.
static TABLES: AtomicU64 = AtomicU64::new(0);

/// The open-addressing table of an [`IndexedMap`]: linear probing over a power-of-two
/// number of slots, at most half of them used.
struct Table {
    /// One control byte a slot, [`EMPTY`] or the [`h2`] of the key it holds, followed by a
    /// copy of the first [`GROUP`] bytes so that a group read at any slot is contiguous.
    ctrl: Box<[u8]>,
    /// The position in the entries of each used slot's key.
    slots: Box<[u32]>,
    /// `hashes[pos]` is the hash of the key at position `pos`.
    hashes: Vec<u32>,
    /// This table's id (see [`TABLES`]).
    id: u64,
    /// How many times a slot was filled or freed: with `id`, names the table's state.
    mods: u64,
}

impl Clone for Table {
    /// A copy with an id of its own: the copy and the original change apart.
    fn clone(&self) -> Table {
        Table {
            ctrl: self.ctrl.clone(),
            slots: self.slots.clone(),
            hashes: self.hashes.clone(),
            id: TABLES.fetch_add(1, Ordering::Relaxed),
            mods: self.mods,
        }
    }
}

impl<K, V> Default for IndexedMap<K, V> {
    fn default() -> Self {
        IndexedMap { entries: OneOrVec::new(), index: Index::Scan }
    }
}

/// The 32 hash bits a table keeps of a key.
#[inline]
fn hash_of<Q: Hash + ?Sized>(k: &Q) -> u32 {
    let mut h = FxHasher::default();
    k.hash(&mut h);
    (h.finish() >> 32) as u32
}

/// The 7 hash bits in a used slot's control byte: the top ones, while the home slot comes
/// from the bottom ones.
#[inline]
fn h2(hash: u32) -> u8 {
    (hash >> 25) as u8
}

/// The bytes of `group` equal to `b`, as the top bit of each (exact: no false positives).
#[inline]
fn bytes_equal(group: u64, b: u8) -> u64 {
    let x = group ^ (LO * u64::from(b));
    !(((x & !HI) + !HI) | x) & HI
}

impl Table {
    /// An empty table of `cap` slots (a power of two, at least [`GROUP`]).
    fn new(cap: usize) -> Table {
        Table {
            ctrl: vec![EMPTY; cap + GROUP].into_boxed_slice(),
            slots: vec![0; cap].into_boxed_slice(),
            hashes: Vec::new(),
            id: TABLES.fetch_add(1, Ordering::Relaxed),
            mods: 0,
        }
    }

    #[inline]
    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// The control bytes of slots `i..i + GROUP` (wrapping), the first in the low byte.
    #[inline]
    fn group(&self, i: usize) -> u64 {
        let bytes: [u8; GROUP] = self.ctrl[i..i + GROUP].try_into().expect("a group is GROUP bytes");
        u64::from_le_bytes(bytes)
    }

    /// Probes for `hash`: `Ok(slot)` of the first used slot whose position `is` accepts, or
    /// `Err(slot)`, the free slot that ends the probe.
    #[inline(always)]
    fn probe(&self, hash: u32, mut is: impl FnMut(usize) -> bool) -> Result<usize, usize> {
        let mask = self.mask();
        let h2 = h2(hash);
        let mut i = hash as usize & mask;
        loop {
            let g = self.group(i);
            let free = g & HI;
            // Candidates before the first free slot only: the probe ends there.
            let mut m = bytes_equal(g, h2) & free.wrapping_sub(1);
            while m != 0 {
                let s = (i + (m.trailing_zeros() / 8) as usize) & mask;
                if is(self.slots[s] as usize) {
                    return Ok(s);
                }
                m &= m - 1;
            }
            if free != 0 {
                return Err((i + (free.trailing_zeros() / 8) as usize) & mask);
            }
            i = (i + GROUP) & mask;
        }
    }

    /// Sets slot `i`'s control byte, and its copy after the end.
    #[inline]
    fn set_ctrl(&mut self, i: usize, c: u8) {
        self.ctrl[i] = c;
        if i < GROUP {
            let cap = self.slots.len();
            self.ctrl[cap + i] = c;
        }
    }

    /// Fills free slot `i` with `pos`, whose key hashes to `hash`.
    #[inline]
    fn fill(&mut self, i: usize, hash: u32, pos: usize) {
        self.mods += 1;
        self.set_ctrl(i, h2(hash));
        self.slots[i] = pos as u32;
    }

    /// Puts `pos` (hashing to `hash`) into the first free slot of its probe sequence.
    fn place(&mut self, hash: u32, pos: usize) {
        let mask = self.mask();
        let mut i = hash as usize & mask;
        loop {
            let free = self.group(i) & HI;
            if free != 0 {
                let i = (i + (free.trailing_zeros() / 8) as usize) & mask;
                self.fill(i, hash, pos);
                return;
            }
            i = (i + GROUP) & mask;
        }
    }

    /// A table of `cap` slots holding positions `0..hashes.len()`, from their hashes alone.
    fn build(cap: usize, hashes: Vec<u32>) -> Table {
        let mut t = Table::new(cap);
        for (pos, &h) in hashes.iter().enumerate() {
            t.place(h, pos);
        }
        t.hashes = hashes;
        t
    }

    /// The slot holding `pos`, whose key hashes to `hash`.
    fn slot_of(&self, hash: u32, pos: usize) -> usize {
        self.probe(hash, |p| p == pos).expect("every entry of an IndexedMap has a slot")
    }

    /// Frees slot `i`, shifting later slots of the same probe run back (no tombstones).
    fn free_slot(&mut self, mut i: usize) {
        self.mods += 1;
        let mask = self.mask();
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let c = self.ctrl[j];
            if c == EMPTY {
                break;
            }
            let pos = self.slots[j];
            let home = self.hashes[pos as usize] as usize & mask;
            // The key in `j` may move back to `i` unless its home lies in the run after `i`.
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(i) & mask) {
                self.set_ctrl(i, c);
                self.slots[i] = pos;
                i = j;
            }
        }
        self.set_ctrl(i, EMPTY);
    }
}

impl<K, V> IndexedMap<K, V> {
    /// The map of one entry (inline: no allocation).
    pub fn one(k: K, v: V) -> Self {
        IndexedMap { entries: OneOrVec::One((k, v)), index: Index::Scan }
    }

    /// The map of the one entry `k`, `v`, remembering what this map said of `k` when
    /// [`Self::locate`] gave `hash` and `found` for it (nothing, for a map without a table).
    #[inline]
    pub(crate) fn delta_of<T>(&self, k: T, v: V, hash: u32, found: Result<usize, usize>) -> IndexedMap<T, V> {
        let index = match (&self.index, found) {
            (Index::Table(t), Err(slot)) => {
                Index::Known(Known::Absent { hash, slot, table: t.id, mods: t.mods })
            }
            (Index::Table(_), Ok(_)) => Index::Known(Known::Hash(hash)),
            _ => Index::Scan,
        };
        IndexedMap { entries: OneOrVec::One((k, v)), index }
    }

    /// The map's only entry and what is known of its key (see [`Self::delta_of`]), if it
    /// has exactly one entry and no table (a one-element delta); otherwise the map back.
    #[inline]
    pub(crate) fn into_single(self) -> Result<((K, V), Option<Known>), Self> {
        match (self.entries, self.index) {
            (OneOrVec::One(e), Index::Scan) => Ok((e, None)),
            (OneOrVec::One(e), Index::Known(k)) => Ok((e, Some(k))),
            (entries, index) => Err(IndexedMap { entries, index }),
        }
    }

    /// Where a key is, given what [`Self::delta_of`] knew of it in the map it was made
    /// from: `Err(slot)` without probing when that map is this one and has not changed
    /// since, else as [`Self::find`] says.
    #[inline]
    pub(crate) fn find_known<Q: Hash + Eq + ?Sized>(&self, known: Known, k: &Q) -> Result<usize, usize>
    where
        K: Borrow<Q> + Hash + Eq,
    {
        if let (Known::Absent { slot, table, mods, .. }, Index::Table(t)) = (known, &self.index) {
            if t.id == table && t.mods == mods {
                return Err(slot);
            }
        }
        self.find(known.hash(), k)
    }

    /// Whether lookups use a table, and so [`Self::locate`] gives a key's real hash.
    #[inline]
    fn has_table(&self) -> bool {
        matches!(self.index, Index::Table(_))
    }

    /// Number of entries.
    #[inline]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the map has no entry.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entries as pairs, in storage order.
    pub fn iter(&self) -> Iter<'_, K, V> {
        self.entries.iter().map(|(k, v)| (k, v))
    }

    /// The values, in storage order.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.entries.iter().map(|e| &e.1)
    }

    /// Room for `additional` more entries without reallocating the entries.
    pub fn reserve(&mut self, additional: usize) {
        self.entries.reserve(additional);
    }
}

impl<K: Hash + Eq, V> IndexedMap<K, V> {
    /// Where `k`, whose hash is `hash` (see [`Self::locate`]; anything for a map without a
    /// table), is: `Ok(position)`, or `Err(free slot)` in the table for a new entry
    /// (`Err(0)`, meaningless, for a map without a table).
    #[inline(always)]
    pub(crate) fn find<Q: Hash + Eq + ?Sized>(&self, hash: u32, k: &Q) -> Result<usize, usize>
    where
        K: Borrow<Q>,
    {
        let entries: &[(K, V)] = &self.entries;
        match &self.index {
            Index::Table(t) => t.probe(hash, |pos| entries[pos].0.borrow() == k).map(|s| t.slots[s] as usize),
            _ => entries.iter().position(|e| e.0.borrow() == k).ok_or(0),
        }
    }

    /// Where `k` is, with the hash the table needs for it (see [`Self::push_new`] and
    /// [`Self::remove_at`]): one hash and one probe for a lookup followed by a change.
    #[inline]
    pub(crate) fn locate<Q: Hash + Eq + ?Sized>(&self, k: &Q) -> (u32, Result<usize, usize>)
    where
        K: Borrow<Q>,
    {
        let hash = self.hash_for(k);
        (hash, self.find(hash, k))
    }

    /// The value at position `pos`.
    #[inline]
    pub(crate) fn value_at(&self, pos: usize) -> &V {
        &self.entries[pos].1
    }

    /// The value at position `pos`, mutably.
    #[inline]
    pub(crate) fn value_at_mut(&mut self, pos: usize) -> &mut V {
        &mut self.entries[pos].1
    }

    /// The hash the table needs for `k`, or 0 when the map has no table.
    #[inline]
    fn hash_for<Q: Hash + ?Sized>(&self, k: &Q) -> u32 {
        if self.has_table() {
            hash_of(k)
        } else {
            0
        }
    }

    #[inline]
    fn position<Q: Hash + Eq + ?Sized>(&self, k: &Q) -> Option<usize>
    where
        K: Borrow<Q>,
    {
        self.find(self.hash_for(k), k).ok()
    }

    /// The value under `k`.
    #[inline]
    pub fn get<Q: Hash + Eq + ?Sized>(&self, k: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        self.position(k).map(|i| &self.entries[i].1)
    }

    /// The value under `k`, mutably.
    #[inline]
    pub fn get_mut<Q: Hash + Eq + ?Sized>(&mut self, k: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
    {
        self.position(k).map(|i| &mut self.entries[i].1)
    }

    /// Whether `k` has a value.
    #[inline]
    pub fn contains_key<Q: Hash + Eq + ?Sized>(&self, k: &Q) -> bool
    where
        K: Borrow<Q>,
    {
        self.position(k).is_some()
    }

    /// Sets the value under `k`; returns the old one.
    #[inline]
    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        match self.locate(&k) {
            (_, Ok(pos)) => Some(std::mem::replace(self.value_at_mut(pos), v)),
            (hash, Err(free)) => {
                self.push_new(hash, free, k, v);
                None
            }
        }
    }

    /// Appends an entry known to be absent; `hash` and `free` come from [`Self::locate`].
    #[inline(always)]
    pub(crate) fn push_new(&mut self, hash: u32, free: usize, k: K, v: V) -> usize {
        let pos = self.len();
        match &mut self.index {
            Index::Table(t) if 2 * (pos + 1) <= t.slots.len() => {
                t.fill(free, hash, pos);
                t.hashes.push(hash);
                self.entries.push((k, v));
            }
            Index::Table(_) => self.push_and_grow(hash, k, v),
            _ if pos < SMALL => {
                self.entries.push((k, v));
                self.index = Index::Scan;
            }
            _ => self.push_and_grow(hash, k, v),
        }
        pos
    }

    /// [`Self::push_new`] when the table must be built or doubled.
    #[cold]
    #[inline(never)]
    fn push_and_grow(&mut self, hash: u32, k: K, v: V) {
        self.entries.push((k, v));
        let hashes = match std::mem::replace(&mut self.index, Index::Scan) {
            Index::Table(t) => {
                let mut hashes = t.hashes;
                hashes.push(hash);
                hashes
            }
            // Just outgrew a linear scan: hash every key once.
            _ => self.entries.iter().map(|e| hash_of(&e.0)).collect(),
        };
        let cap = (2 * hashes.len()).next_power_of_two().max(4 * SMALL);
        // Positions are `u32`s, and a table is at most half full.
        assert!(cap as u64 / 2 <= 1 << 32, "an IndexedMap holds at most 2^32 entries");
        self.index = Index::Table(Box::new(Table::build(cap, hashes)));
    }

    /// Removes `k`; returns its value. The last entry takes its place.
    pub fn remove<Q: Hash + Eq + ?Sized>(&mut self, k: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        let hash = self.hash_for(k);
        let pos = self.find(hash, k).ok()?;
        Some(self.remove_at(hash, pos))
    }

    /// Removes the entry at `pos`, whose key hashes to `hash` (as [`Self::locate`] said).
    pub(crate) fn remove_at(&mut self, hash: u32, pos: usize) -> V {
        let last = self.len() - 1;
        if let Index::Table(t) = &mut self.index {
            let i = t.slot_of(hash, pos);
            t.free_slot(i);
            if pos != last {
                let j = t.slot_of(t.hashes[last], last);
                t.slots[j] = pos as u32;
            }
            t.hashes.swap_remove(pos);
        } else {
            self.index = Index::Scan;
        }
        self.entries.swap_remove(pos).1
    }

    /// Keeps the entries for which `keep` says so (it may change their values).
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        let Index::Table(t) = &mut self.index else {
            self.entries.retain_mut(|e| keep(&e.0, &mut e.1));
            self.index = Index::Scan;
            return;
        };
        // The hashes follow their entries down over the removed ones.
        let hashes = &mut t.hashes;
        let (mut read, mut write) = (0, 0);
        self.entries.retain_mut(|e| {
            let kept = keep(&e.0, &mut e.1);
            if kept {
                hashes[write] = hashes[read];
                write += 1;
            }
            read += 1;
            kept
        });
        if write != read {
            hashes.truncate(write);
            let hashes = std::mem::take(hashes);
            **t = Table::build(t.slots.len(), hashes);
        }
    }
}

impl<K, V> IntoIterator for IndexedMap<K, V> {
    type Item = (K, V);
    type IntoIter = IntoIter<K, V>;

    /// The entries, by value, in storage order.
    fn into_iter(self) -> Self::IntoIter {
        IntoIter(self.entries.into_iter())
    }
}

/// The entries of an [`IndexedMap`] by value.
pub struct IntoIter<K, V>(crate::onevec::IntoIter<(K, V)>);

impl<K, V> Iterator for IntoIter<K, V> {
    type Item = (K, V);

    #[inline]
    fn next(&mut self) -> Option<(K, V)> {
        self.0.next()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

/// Iterator over the pairs of an [`IndexedMap`].
pub type Iter<'a, K, V> = std::iter::Map<std::slice::Iter<'a, (K, V)>, fn(&'a (K, V)) -> (&'a K, &'a V)>;

impl<'a, K, V> IntoIterator for &'a IndexedMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = Iter<'a, K, V>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<K: Hash + Eq, V> FromIterator<(K, V)> for IndexedMap<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut m = IndexedMap::default();
        m.extend(iter);
        m
    }
}

impl<K: Hash + Eq, V> Extend<(K, V)> for IndexedMap<K, V> {
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, iter: I) {
        let iter = iter.into_iter();
        self.reserve(iter.size_hint().0);
        for (k, v) in iter {
            self.insert(k, v);
        }
    }
}

impl<K: Hash + Eq + Borrow<Q>, Q: Hash + Eq + ?Sized, V> std::ops::Index<&Q> for IndexedMap<K, V> {
    type Output = V;

    /// The value under `k`; panics if there is none, like `HashMap`.
    fn index(&self, k: &Q) -> &V {
        self.get(k).expect("no entry for this key in the IndexedMap")
    }
}

impl<K: Hash + Eq, V: PartialEq> PartialEq for IndexedMap<K, V> {
    /// Same keys with equal values, in any order.
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().all(|(k, v)| other.get(k) == Some(v))
    }
}

impl<K: Hash + Eq, V: Eq> Eq for IndexedMap<K, V> {}

impl<K: fmt::Debug, V: fmt::Debug> fmt::Debug for IndexedMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Every entry is found at its position, and the table holds exactly the entries.
    fn check<K: Hash + Eq + Clone + fmt::Debug, V: PartialEq + fmt::Debug>(m: &IndexedMap<K, V>) {
        for (pos, (k, _)) in m.iter().enumerate() {
            assert_eq!(m.locate(k).1, Ok(pos), "{k:?}");
        }
        if let Index::Table(t) = &m.index {
            let cap = t.slots.len();
            assert_eq!(t.ctrl[cap..], t.ctrl[..GROUP]);
            assert_eq!(t.ctrl[..cap].iter().filter(|&&c| c != EMPTY).count(), m.len());
            assert!(2 * m.len() <= cap);
            for (pos, (k, _)) in m.iter().enumerate() {
                assert_eq!(t.hashes[pos], hash_of(k));
            }
        }
    }

    #[test]
    fn behaves_like_a_hash_map_across_growth_removal_and_retain() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut mine: IndexedMap<String, u32> = IndexedMap::default();
        let mut std: HashMap<String, u32> = HashMap::new();
        for i in 0..20_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Few keys early (small maps without a table), more later.
            let k = format!("k{}", x % u64::from(4 + i / 8));
            match x % 11 {
                0..=2 => assert_eq!(mine.remove(&k), std.remove(&k)),
                3 if i % 97 == 0 => {
                    mine.retain(|k, v| {
                        *v += 1;
                        k.len() % 3 != 0
                    });
                    std.retain(|k, v| {
                        *v += 1;
                        k.len() % 3 != 0
                    });
                }
                _ => assert_eq!(mine.insert(k.clone(), i), std.insert(k.clone(), i)),
            }
            assert_eq!(mine.get(&k), std.get(&k));
            assert_eq!(mine.len(), std.len());
            if i % 499 == 0 {
                check(&mine);
            }
        }
        check(&mine);
        let back: HashMap<String, u32> = mine.clone().into_iter().collect();
        assert_eq!(back, std);
        let rebuilt: IndexedMap<String, u32> = std.into_iter().collect();
        assert_eq!(rebuilt, mine);
    }

    #[test]
    fn a_one_entry_map_is_inline() {
        let mut m = IndexedMap::default();
        m.insert(1u8, 'a');
        assert!(matches!(m.entries, OneOrVec::One(_)) && matches!(m.index, Index::Scan));
        for k in 2..=(SMALL as u8 + 1) {
            m.insert(k, 'b');
        }
        assert!(m.has_table());
        check(&m);
        m.retain(|k, _| *k == 3);
        assert_eq!(m.iter().collect::<Vec<_>>(), [(&3, &'b')]);
        check(&m);
    }
}
