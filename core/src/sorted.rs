//! Sorted-vector maps and sets for the small collections of the data path.
//!
//! Dot clouds, the buffer of out-of-order deltas, the delta log's replica index and JSON
//! objects hold a handful of entries. `BTreeMap`/`BTreeSet` cost 5-8 KB of wasm per
//! element type (node splitting, merging, stealing); a sorted `Vec` is a binary search
//! and a `Vec::insert`, a few hundred bytes, with the same iteration order, comparison,
//! hashing, printing and serde encoding. Inserts and removes in the middle are O(n)
//! moves, so this is not for the document's field map (up to millions of keys), which
//! stays a `BTreeMap`. Appending in order — decoding a canonical encoding — is O(log n).

use crate::onevec::OneOrVec;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::borrow::Borrow;
use std::cmp::Ordering;
use std::collections::BTreeMap;

/// A map kept as a `Vec` of pairs sorted by key, keys unique.
///
/// ```
/// use concord_core::sorted::SortedMap;
/// let mut m = SortedMap::new();
/// m.insert("b", 2);
/// m.insert("a", 1);
/// assert_eq!(m.iter().collect::<Vec<_>>(), [(&"a", &1), (&"b", &2)]);
/// assert_eq!(m.insert("a", 3), Some(1));
/// assert_eq!(m.get("a"), Some(&3));
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SortedMap<K, V>(Vec<(K, V)>);

impl<K, V> Default for SortedMap<K, V> {
    fn default() -> Self {
        SortedMap(Vec::new())
    }
}

impl<K, V> SortedMap<K, V> {
    /// The empty map.
    pub const fn new() -> Self {
        SortedMap(Vec::new())
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Entries in key order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&K, &V)> + ExactSizeIterator {
        self.0.iter().map(|e| (&e.0, &e.1))
    }

    /// Keys in order.
    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &K> + ExactSizeIterator {
        self.0.iter().map(|e| &e.0)
    }

    /// Values in key order.
    pub fn values(&self) -> impl DoubleEndedIterator<Item = &V> + ExactSizeIterator {
        self.0.iter().map(|e| &e.1)
    }

    /// Values in key order, mutably.
    pub fn values_mut(&mut self) -> impl DoubleEndedIterator<Item = &mut V> + ExactSizeIterator {
        self.0.iter_mut().map(|e| &mut e.1)
    }

    /// The entries as a sorted slice.
    pub fn as_slice(&self) -> &[(K, V)] {
        &self.0
    }

    /// Keeps the entries for which `keep` says so.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        self.0.retain_mut(|e| keep(&e.0, &mut e.1));
    }

    /// Removes the entries at positions `range` of the sorted order.
    pub fn drain_range(&mut self, range: std::ops::Range<usize>) {
        self.0.drain(range);
    }

    /// Position of the first key not less than `k`.
    pub fn lower_bound<Q: Ord + ?Sized>(&self, k: &Q) -> usize
    where
        K: Borrow<Q>,
    {
        self.0.partition_point(|e| e.0.borrow() < k)
    }
}

impl<K: Ord, V> SortedMap<K, V> {
    fn find<Q: Ord + ?Sized>(&self, k: &Q) -> Result<usize, usize>
    where
        K: Borrow<Q>,
    {
        // Appending in order is the common way in: check the end first.
        match self.0.last().map(|e| e.0.borrow().cmp(k)) {
            None | Some(Ordering::Less) => Err(self.0.len()),
            Some(Ordering::Equal) => Ok(self.0.len() - 1),
            Some(Ordering::Greater) => self.0.binary_search_by(|e| e.0.borrow().cmp(k)),
        }
    }

    /// The value under `k`.
    pub fn get<Q: Ord + ?Sized>(&self, k: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        self.find(k).ok().map(|i| &self.0[i].1)
    }

    /// The value under `k`, mutably.
    pub fn get_mut<Q: Ord + ?Sized>(&mut self, k: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
    {
        self.find(k).ok().map(|i| &mut self.0[i].1)
    }

    /// Whether `k` has a value.
    pub fn contains_key<Q: Ord + ?Sized>(&self, k: &Q) -> bool
    where
        K: Borrow<Q>,
    {
        self.find(k).is_ok()
    }

    /// Sets the value under `k`; returns the old one.
    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        match self.find(&k) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, v)),
            Err(i) => {
                self.0.insert(i, (k, v));
                None
            }
        }
    }

    /// The value under `k`, inserting `V::default()` first if absent.
    pub fn entry_or_default(&mut self, k: K) -> &mut V
    where
        V: Default,
    {
        let i = match self.find(&k) {
            Ok(i) => i,
            Err(i) => {
                self.0.insert(i, (k, V::default()));
                i
            }
        };
        &mut self.0[i].1
    }

    /// Removes and returns the value under `k`.
    pub fn remove<Q: Ord + ?Sized>(&mut self, k: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        self.find(k).ok().map(|i| self.0.remove(i).1)
    }
}

impl<K: Ord, V> FromIterator<(K, V)> for SortedMap<K, V> {
    /// Sorts once; a later value for a key replaces an earlier one, as in `BTreeMap`.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut v: Vec<(K, V)> = iter.into_iter().collect();
        crate::sort::sort_by(&mut v, |a, b| a.0.cmp(&b.0));
        // Stable sort: of equal keys, keep the last.
        let mut out: Vec<(K, V)> = Vec::with_capacity(v.len());
        for e in v {
            match out.last_mut() {
                Some(last) if last.0 == e.0 => *last = e,
                _ => out.push(e),
            }
        }
        SortedMap(out)
    }
}

impl<'a, K, V> IntoIterator for &'a SortedMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = std::iter::Map<std::slice::Iter<'a, (K, V)>, fn(&'a (K, V)) -> (&'a K, &'a V)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|e| (&e.0, &e.1))
    }
}

impl<K, V> IntoIterator for SortedMap<K, V> {
    type Item = (K, V);
    type IntoIter = std::vec::IntoIter<(K, V)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<K: std::fmt::Debug, V: std::fmt::Debug> std::fmt::Debug for SortedMap<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<K: Serialize, V: Serialize> Serialize for SortedMap<K, V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de, K: Ord + Deserialize<'de>, V: Deserialize<'de>> Deserialize<'de> for SortedMap<K, V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Only the relay and tests decode through serde: code size does not matter here.
        BTreeMap::deserialize(d).map(|m| SortedMap(m.into_iter().collect()))
    }
}

/// A set kept as a sorted `Vec`, elements unique.
///
/// ```
/// use concord_core::sorted::SortedSet;
/// let mut s: SortedSet<u64> = [3, 1, 3].into_iter().collect();
/// assert!(s.insert(2));
/// assert!(!s.insert(2));
/// assert_eq!(s.iter().copied().collect::<Vec<_>>(), [1, 2, 3]);
/// ```
///
/// A lone element is kept inline (a causal context's cloud in a delta holds one dot), so
/// a set of one allocates nothing.
#[derive(Clone)]
pub struct SortedSet<T>(OneOrVec<T>);

impl<T> Default for SortedSet<T> {
    fn default() -> Self {
        SortedSet::new()
    }
}

impl<T> SortedSet<T> {
    /// The empty set.
    pub const fn new() -> Self {
        SortedSet(OneOrVec::new())
    }

    /// The set of `x` alone (inline: no allocation).
    pub fn one(x: T) -> Self {
        SortedSet(OneOrVec::One(x))
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Elements in order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &T> + ExactSizeIterator {
        self.0.iter()
    }

    /// Element at position `i` of the sorted order.
    pub fn nth(&self, i: usize) -> Option<&T> {
        self.0.get(i)
    }

    /// Position of the first element not less than `x`.
    pub fn lower_bound(&self, x: &T) -> usize
    where
        T: Ord,
    {
        self.0.partition_point(|e| e < x)
    }

    /// Removes the elements at positions `range` of the sorted order.
    pub fn drain_range(&mut self, range: std::ops::Range<usize>) {
        self.0.drain_range(range);
    }

    /// Keeps the elements for which `keep` says so.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        self.0.retain_mut(|x| keep(x));
    }
}

impl<T: Ord> SortedSet<T> {
    fn find(&self, x: &T) -> Result<usize, usize> {
        // Appending in order is the common way in: check the end first.
        match self.0.last().map(|e| e.cmp(x)) {
            None | Some(Ordering::Less) => Err(self.0.len()),
            Some(Ordering::Equal) => Ok(self.0.len() - 1),
            Some(Ordering::Greater) => self.0.binary_search(x),
        }
    }

    /// Whether `x` is an element.
    pub fn contains(&self, x: &T) -> bool {
        self.find(x).is_ok()
    }

    /// Adds `x`; false when it was there already.
    pub fn insert(&mut self, x: T) -> bool {
        match self.find(&x) {
            Ok(_) => false,
            Err(i) => {
                self.0.insert(i, x);
                true
            }
        }
    }

    /// Removes `x`; false when it was absent.
    pub fn remove(&mut self, x: &T) -> bool {
        match self.find(x) {
            Ok(i) => {
                self.0.remove(i);
                true
            }
            Err(_) => false,
        }
    }
}

impl<T: PartialEq> PartialEq for SortedSet<T> {
    fn eq(&self, other: &Self) -> bool {
        *self.0 == *other.0
    }
}

impl<T: Eq> Eq for SortedSet<T> {}

impl<T: PartialOrd> PartialOrd for SortedSet<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        (*self.0).partial_cmp(&*other.0)
    }
}

impl<T: Ord> Ord for SortedSet<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        (*self.0).cmp(&*other.0)
    }
}

impl<T: std::hash::Hash> std::hash::Hash for SortedSet<T> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (*self.0).hash(state);
    }
}

impl<T: Ord> FromIterator<T> for SortedSet<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let mut v: Vec<T> = iter.into_iter().collect();
        crate::sort::sort(&mut v);
        v.dedup();
        SortedSet(OneOrVec::from(v))
    }
}

impl<T: Ord> Extend<T> for SortedSet<T> {
    fn extend<I: IntoIterator<Item = T>>(&mut self, iter: I) {
        for x in iter {
            self.insert(x);
        }
    }
}

impl<'a, T> IntoIterator for &'a SortedSet<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for SortedSet<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl<T: Serialize> Serialize for SortedSet<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de, T: Ord + Deserialize<'de>> Deserialize<'de> for SortedSet<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<T>::deserialize(d).map(|v| v.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn behaves_like_the_standard_ordered_collections() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut mine: SortedMap<u8, u32> = SortedMap::new();
        let mut std: BTreeMap<u8, u32> = BTreeMap::new();
        let mut set: SortedSet<u8> = SortedSet::new();
        let mut std_set: BTreeSet<u8> = BTreeSet::new();
        for i in 0..2000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = (x % 64) as u8;
            if x % 3 == 0 {
                assert_eq!(mine.remove(&k), std.remove(&k));
                assert_eq!(set.remove(&k), std_set.remove(&k));
            } else {
                assert_eq!(mine.insert(k, i), std.insert(k, i));
                assert_eq!(set.insert(k), std_set.insert(k));
            }
            assert_eq!(mine.get(&k), std.get(&k));
            assert_eq!(set.contains(&k), std_set.contains(&k));
        }
        assert!(mine.iter().eq(std.iter()));
        assert!(set.iter().eq(std_set.iter()));
        assert_eq!(format!("{mine:?}"), format!("{std:?}"));
        assert_eq!(format!("{set:?}"), format!("{std_set:?}"));
        assert_eq!(postcard::to_allocvec(&mine).unwrap(), postcard::to_allocvec(&std).unwrap());
        assert_eq!(postcard::to_allocvec(&set).unwrap(), postcard::to_allocvec(&std_set).unwrap());
        let pairs = [(2u8, 'a'), (1, 'b'), (2, 'c')];
        let a: SortedMap<u8, char> = pairs.into_iter().collect();
        let b: BTreeMap<u8, char> = pairs.into_iter().collect();
        assert!(a.iter().eq(b.iter()));
    }
}
