//! An insertion-ordered hash map for the OR-Set's elements.
//!
//! The layout follows the idea behind Python's compact dict and Rust's `indexmap`: the
//! entries live densely in a `Vec`, in the order they arrived, and a separate
//! open-addressing table holds only `u32` positions into that `Vec` next to 32 bits of each
//! key's hash. Why it beats a `HashMap<String, Dots>` for a set of a million strings:
//!
//! - Adding appends to the `Vec`: sequential writes, and the string's heap memory is only
//!   read once, to hash it.
//! - Growing rebuilds the 8-byte-per-slot table from the hashes stored in it; it never
//!   re-hashes a key, so it never chases a pointer into string memory (a `HashMap` re-hashes
//!   every key on every doubling: a cache miss per element). The `Vec` grows by `realloc`.
//! - The table is small (8 bytes a slot, at most half full) and mostly stays in cache.
//! - Keys are hashed with the Fx hash of [`crate::hash`], not SipHash.
//!
//! Small maps (every delta) have no table at all: lookups compare keys in a linear scan,
//! and a map of one entry keeps it inline, so making a one-element delta allocates
//! nothing. Removal swaps the last entry into the hole, so the order is only "arrival
//! order, disturbed by removals": nothing may depend on it (encodings sort).

use crate::hash::FxHasher;
use crate::onevec::OneOrVec;
use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};

/// Up to this many entries a map has no table: lookups scan the entries.
const SMALL: usize = 8;

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
    /// Linear-probing table, a power of two long and at most half full, of
    /// `hash << 32 | (position + 1)`; 0 marks a free slot. Empty while the map is small.
    index: Vec<u64>,
}

impl<K, V> Default for IndexedMap<K, V> {
    fn default() -> Self {
        IndexedMap { entries: OneOrVec::new(), index: Vec::new() }
    }
}

/// The 32 hash bits a table keeps of a key.
#[inline]
fn hash_of<Q: Hash + ?Sized>(k: &Q) -> u32 {
    let mut h = FxHasher::default();
    k.hash(&mut h);
    (h.finish() >> 32) as u32
}

#[inline]
fn slot(hash: u32, pos: usize) -> u64 {
    (u64::from(hash) << 32) | (pos as u64 + 1)
}

#[inline]
fn slot_pos(s: u64) -> usize {
    (s as u32) as usize - 1
}

#[inline]
fn slot_hash(s: u64) -> u32 {
    (s >> 32) as u32
}

impl<K, V> IndexedMap<K, V> {
    /// The map of one entry (inline: no allocation).
    pub fn one(k: K, v: V) -> Self {
        IndexedMap { entries: OneOrVec::One((k, v)), index: Vec::new() }
    }

    /// The map's only entry, if it has exactly one and no table (a one-element delta);
    /// otherwise the map back.
    #[inline]
    pub(crate) fn into_single(self) -> Result<(K, V), Self> {
        match self.entries {
            OneOrVec::One(e) if self.index.is_empty() => Ok(e),
            entries => Err(IndexedMap { entries, index: self.index }),
        }
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

    /// Rebuilds the table with `cap` slots, moving each entry's slot by `remap`
    /// (old position to new, `None` when gone). Reads only the old table: no key is hashed.
    fn reindex(&mut self, cap: usize, remap: impl Fn(usize) -> Option<usize>) {
        let mut table = vec![0u64; cap];
        let mask = cap - 1;
        for &s in &self.index {
            if s == 0 {
                continue;
            }
            let Some(pos) = remap(slot_pos(s)) else { continue };
            let mut i = slot_hash(s) as usize & mask;
            while table[i] != 0 {
                i = (i + 1) & mask;
            }
            table[i] = slot(slot_hash(s), pos);
        }
        self.index = table;
    }
}

impl<K: Hash + Eq, V> IndexedMap<K, V> {
    /// Where `k` is: `Ok(position)`, or `Err(free slot)` in the table for a new entry
    /// (`Err(0)`, meaningless, for a map without a table).
    #[inline]
    fn find<Q: Hash + Eq + ?Sized>(&self, hash: u32, k: &Q) -> Result<usize, usize>
    where
        K: Borrow<Q>,
    {
        let entries: &[(K, V)] = &self.entries;
        if self.index.is_empty() {
            return entries.iter().position(|e| e.0.borrow() == k).ok_or(0);
        }
        let mask = self.index.len() - 1;
        let mut i = hash as usize & mask;
        loop {
            let s = self.index[i];
            if s == 0 {
                return Err(i);
            }
            if slot_hash(s) == hash && entries[slot_pos(s)].0.borrow() == k {
                return Ok(slot_pos(s));
            }
            i = (i + 1) & mask;
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
        if self.index.is_empty() {
            0
        } else {
            hash_of(k)
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
    pub(crate) fn push_new(&mut self, hash: u32, free: usize, k: K, v: V) -> usize {
        let pos = self.len();
        assert!(pos < u32::MAX as usize - 1, "an IndexedMap holds fewer than 2^32 - 1 entries");
        if self.index.is_empty() {
            self.entries.push((k, v));
            if pos == SMALL {
                self.build_index();
            }
        } else if 2 * (pos + 1) > self.index.len() {
            self.entries.push((k, v));
            self.reindex(2 * self.index.len(), Some);
            let _ = self.place(hash, pos);
        } else {
            self.index[free] = slot(hash, pos);
            self.entries.push((k, v));
        }
        pos
    }

    /// Puts `pos` (hashing to `hash`) into the first free slot of its probe sequence.
    fn place(&mut self, hash: u32, pos: usize) -> usize {
        let mask = self.index.len() - 1;
        let mut i = hash as usize & mask;
        while self.index[i] != 0 {
            i = (i + 1) & mask;
        }
        self.index[i] = slot(hash, pos);
        i
    }

    /// Builds the table of a map that just outgrew [`SMALL`] (or lost it to a retain).
    fn build_index(&mut self) {
        let cap = (2 * self.len()).next_power_of_two().max(4 * SMALL);
        self.index = vec![0u64; cap];
        for pos in 0..self.len() {
            let hash = hash_of(&self.entries[pos].0);
            self.place(hash, pos);
        }
    }

    /// The table slot holding `pos`, whose key hashes to `hash`.
    fn slot_of(&self, hash: u32, pos: usize) -> usize {
        let mask = self.index.len() - 1;
        let mut i = hash as usize & mask;
        while self.index[i] != slot(hash, pos) {
            i = (i + 1) & mask;
        }
        i
    }

    /// Frees slot `i`, shifting later slots of the same probe run back (no tombstones).
    fn free_slot(&mut self, mut i: usize) {
        let mask = self.index.len() - 1;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let s = self.index[j];
            if s == 0 {
                break;
            }
            let home = slot_hash(s) as usize & mask;
            // `s` may move back to `i` unless its home lies in the run after `i`.
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(i) & mask) {
                self.index[i] = s;
                i = j;
            }
        }
        self.index[i] = 0;
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
        if !self.index.is_empty() {
            let i = self.slot_of(hash, pos);
            self.free_slot(i);
            if pos != last {
                let moved = hash_of(&self.entries[last].0);
                let j = self.slot_of(moved, last);
                self.index[j] = slot(moved, pos);
            }
        }
        self.entries.swap_remove(pos).1
    }

    /// Keeps the entries for which `keep` says so (it may change their values).
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        if self.index.is_empty() {
            self.entries.retain_mut(|e| keep(&e.0, &mut e.1));
            return;
        }
        // Positions shift down over removed entries: remember where each went.
        let before = self.len();
        let mut remap: Vec<u32> = Vec::with_capacity(before);
        let mut next = 0u32;
        self.entries.retain_mut(|e| {
            let kept = keep(&e.0, &mut e.1);
            remap.push(if kept { next } else { u32::MAX });
            next += u32::from(kept);
            kept
        });
        if self.len() != before {
            let cap = self.index.len();
            self.reindex(cap, |p| Some(remap[p]).filter(|&q| q != u32::MAX).map(|q| q as usize));
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
        if !m.index.is_empty() {
            assert_eq!(m.index.iter().filter(|&&s| s != 0).count(), m.len());
            assert!(2 * m.len() <= m.index.len());
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
        assert!(matches!(m.entries, OneOrVec::One(_)) && m.index.is_empty());
        for k in 2..=(SMALL as u8 + 1) {
            m.insert(k, 'b');
        }
        assert!(!m.index.is_empty());
        check(&m);
        m.retain(|k, _| *k == 3);
        assert_eq!(m.iter().collect::<Vec<_>>(), [(&3, &'b')]);
        check(&m);
    }
}
