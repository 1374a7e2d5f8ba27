//! Version vectors and causal contexts.
//!
//! A [`VersionVector`] maps each replica to the highest sequence number seen from it with
//! no gaps below. A [`CausalContext`] adds a "dot cloud" of events seen out of order, as
//! in Almeida, Shoker and Baquero, "Delta State Replicated Data Types" (2018), §5.

use crate::codec::{put_seq, put_varint, Reader, Wire, R};
use crate::id::{Dot, ReplicaId, Span};
use crate::sorted::SortedSet;
use serde::{Deserialize, Serialize};

/// How two version vectors (or the states they describe) relate causally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Causality {
    /// The left side happened before the right side.
    Before,
    /// The left side happened after the right side.
    After,
    /// Both describe the same events.
    Equal,
    /// Each side has seen events the other has not.
    Concurrent,
}

/// `ReplicaId -> max contiguous seq seen`, kept sorted by replica for canonical encoding.
///
/// ```
/// use concord_core::{Causality, ReplicaId, VersionVector};
/// let (a, b) = (ReplicaId(1), ReplicaId(2));
/// let x = VersionVector::from_iter([(a, 3)]);
/// let y = VersionVector::from_iter([(a, 2), (b, 1)]);
/// assert_eq!(x.compare(&y), Causality::Concurrent);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VersionVector {
    entries: Pairs,
}

/// Sorted `(replica, seq)` pairs. A single pair, the shape of every counter delta, is kept
/// inline: making a delta allocates nothing. Compares, hashes, prints and encodes exactly
/// as the `Vec` it stands for.
#[derive(Clone)]
enum Pairs {
    One((ReplicaId, u64)),
    Many(Vec<(ReplicaId, u64)>),
}

impl Pairs {
    fn from_vec(v: Vec<(ReplicaId, u64)>) -> Pairs {
        if v.len() == 1 {
            Pairs::One(v[0])
        } else {
            Pairs::Many(v)
        }
    }

    #[inline]
    fn insert(&mut self, i: usize, pair: (ReplicaId, u64)) {
        match self {
            Pairs::Many(v) if v.is_empty() => *self = Pairs::One(pair),
            Pairs::Many(v) => v.insert(i, pair),
            Pairs::One(first) => {
                let mut v = Vec::with_capacity(4);
                v.push(*first);
                v.insert(i, pair);
                *self = Pairs::Many(v);
            }
        }
    }
}

impl Default for Pairs {
    fn default() -> Self {
        Pairs::Many(Vec::new())
    }
}

impl core::ops::Deref for Pairs {
    type Target = [(ReplicaId, u64)];
    #[inline]
    fn deref(&self) -> &Self::Target {
        match self {
            Pairs::One(p) => core::slice::from_ref(p),
            Pairs::Many(v) => v,
        }
    }
}

impl core::ops::DerefMut for Pairs {
    #[inline]
    fn deref_mut(&mut self) -> &mut Self::Target {
        match self {
            Pairs::One(p) => core::slice::from_mut(p),
            Pairs::Many(v) => v,
        }
    }
}

impl PartialEq for Pairs {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Pairs {}

impl core::hash::Hash for Pairs {
    fn hash<H: core::hash::Hasher>(&self, state: &mut H) {
        (**self).hash(state);
    }
}

impl core::fmt::Debug for Pairs {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        (**self).fmt(f)
    }
}

impl Serialize for Pairs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (**self).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Pairs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::deserialize(d).map(Pairs::from_vec)
    }
}

impl VersionVector {
    /// The empty vector: nothing seen.
    pub const fn new() -> Self {
        Self { entries: Pairs::Many(Vec::new()) }
    }

    /// The highest contiguous sequence seen from `replica` (0 when none).
    #[inline]
    pub fn get(&self, replica: ReplicaId) -> u64 {
        match &self.entries {
            Pairs::One((r, s)) => {
                if *r == replica {
                    *s
                } else {
                    0
                }
            }
            Pairs::Many(v) => match v.binary_search_by_key(&replica, |e| e.0) {
                Ok(i) => v[i].1,
                Err(_) => 0,
            },
        }
    }

    /// Raises `replica`'s entry to `seq` if it is lower.
    #[inline]
    pub fn raise(&mut self, replica: ReplicaId, seq: u64) {
        if seq == 0 {
            return;
        }
        match self.entries.binary_search_by_key(&replica, |e| e.0) {
            Ok(i) => self.entries[i].1 = self.entries[i].1.max(seq),
            Err(i) => self.entries.insert(i, (replica, seq)),
        }
    }

    /// `replica`'s entry, mutably, or where it would go (one search; none for the common
    /// one-replica vector).
    #[inline]
    fn entry_mut(&mut self, replica: ReplicaId) -> Result<&mut u64, usize> {
        match &mut self.entries {
            Pairs::One((r, s)) if *r == replica => Ok(s),
            Pairs::One((r, _)) => Err(usize::from(*r < replica)),
            Pairs::Many(v) => match v.binary_search_by_key(&replica, |e| e.0) {
                Ok(i) => Ok(&mut v[i].1),
                Err(i) => Err(i),
            },
        }
    }

    /// Whether `dot` is covered by this vector.
    #[inline]
    pub fn contains(&self, dot: Dot) -> bool {
        dot.seq != 0 && dot.seq <= self.get(dot.replica)
    }

    /// The next dot `replica` would mint after everything this vector has seen
    /// (saturating: a vector from the wire may claim the last possible sequence).
    #[inline]
    pub fn next_dot(&self, replica: ReplicaId) -> Dot {
        Dot::new(replica, self.get(replica).saturating_add(1))
    }

    /// Pointwise maximum: one linear pass over both sorted vectors (raising entry by
    /// entry would shift the vector once per new replica, quadratic for large vectors).
    #[inline]
    pub fn merge(&mut self, other: &VersionVector) {
        if other.entries.len() <= 4 {
            // A delta: raise in place.
            for &(r, s) in other.entries.iter() {
                self.raise(r, s);
            }
        } else {
            self.merge_large(other);
        }
    }

    fn merge_large(&mut self, other: &VersionVector) {
        let sorted = |e: &[(ReplicaId, u64)]| e.windows(2).all(|w| w[0].0 < w[1].0);
        if !sorted(&self.entries) || !sorted(&other.entries) {
            // Not validated: raise entry by entry, which tolerates anything.
            for &(r, s) in other.entries.iter() {
                self.raise(r, s);
            }
            return;
        }
        let (a, b) = (&*self.entries, &*other.entries);
        let mut out = Vec::with_capacity(a.len() + b.len());
        let (mut i, mut j) = (0, 0);
        while i < a.len() && j < b.len() {
            match a[i].0.cmp(&b[j].0) {
                core::cmp::Ordering::Less => {
                    out.push(a[i]);
                    i += 1;
                }
                core::cmp::Ordering::Greater => {
                    out.push(b[j]);
                    j += 1;
                }
                core::cmp::Ordering::Equal => {
                    out.push((a[i].0, a[i].1.max(b[j].1)));
                    i += 1;
                    j += 1;
                }
            }
        }
        out.extend_from_slice(&a[i..]);
        out.extend_from_slice(&b[j..]);
        out.retain(|e| e.1 != 0);
        self.entries = Pairs::from_vec(out);
    }

    /// Whether every event of `self` is also in `other` (`self <= other`).
    pub fn le(&self, other: &VersionVector) -> bool {
        self.entries.iter().all(|&(r, s)| s <= other.get(r))
    }

    /// Causal order between `self` and `other`.
    pub fn compare(&self, other: &VersionVector) -> Causality {
        match (self.le(other), other.le(self)) {
            (true, true) => Causality::Equal,
            (true, false) => Causality::Before,
            (false, true) => Causality::After,
            (false, false) => Causality::Concurrent,
        }
    }

    /// `self < other`: every event of `self` is in `other`, and `other` has more.
    pub fn happened_before(&self, other: &VersionVector) -> bool {
        self.compare(other) == Causality::Before
    }

    /// `(replica, seq)` pairs in replica order.
    pub fn iter(&self) -> impl Iterator<Item = (ReplicaId, u64)> + '_ {
        self.entries.iter().copied()
    }

    /// Number of replicas with a non-zero entry.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing has been seen.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Total number of events covered (sum of entries, saturating at `u64::MAX`).
    pub fn total(&self) -> u64 {
        self.entries.iter().fold(0u64, |acc, e| acc.saturating_add(e.1))
    }

    /// Checks the invariants a decoded vector must hold (sorted, unique, non-zero).
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.entries.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err("version vector entries are not sorted by replica");
        }
        if self.entries.iter().any(|e| e.1 == 0) {
            return Err("version vector has a zero entry");
        }
        Ok(())
    }
}

impl FromIterator<(ReplicaId, u64)> for VersionVector {
    fn from_iter<I: IntoIterator<Item = (ReplicaId, u64)>>(iter: I) -> Self {
        let mut vv = VersionVector::new();
        for (r, s) in iter {
            vv.raise(r, s);
        }
        vv
    }
}

/// The set of events a replica has seen: a compact [`VersionVector`] plus the dots seen
/// out of order (the "dot cloud"). Kept compact: no cloud dot is covered by the vector.
///
/// ```
/// use concord_core::{CausalContext, Dot, ReplicaId};
/// let r = ReplicaId(1);
/// let mut cc = CausalContext::default();
/// cc.insert(Dot::new(r, 2));
/// assert!(!cc.contains(Dot::new(r, 1)));
/// cc.insert(Dot::new(r, 1));
/// assert_eq!(cc.vv.get(r), 2); // the cloud folded into the vector
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CausalContext {
    /// Events seen without gaps.
    pub vv: VersionVector,
    /// Events seen above a gap.
    pub cloud: SortedSet<Dot>,
}

impl CausalContext {
    /// Whether no event has been seen.
    pub fn is_empty(&self) -> bool {
        self.vv.is_empty() && self.cloud.is_empty()
    }

    /// The context of `dot` alone (what [`Self::insert`] makes of an empty context,
    /// without searching it).
    #[inline]
    pub fn of_dot(dot: Dot) -> Self {
        match dot.seq {
            0 => CausalContext::default(),
            1 => CausalContext {
                vv: VersionVector { entries: Pairs::One((dot.replica, 1)) },
                cloud: SortedSet::new(),
            },
            _ => CausalContext { vv: VersionVector::new(), cloud: SortedSet::one(dot) },
        }
    }

    /// Whether `dot` has been seen.
    #[inline]
    pub fn contains(&self, dot: Dot) -> bool {
        self.vv.contains(dot) || self.cloud.contains(&dot)
    }

    /// Whether this is the context of `dot` alone, as [`Self::of_dot`] makes it, with
    /// `dot.seq > 0`.
    #[inline]
    pub fn is_of_dot(&self, dot: Dot) -> bool {
        match (&*self.vv.entries, self.cloud.len()) {
            ([], 1) => dot.seq > 1 && self.cloud.nth(0) == Some(&dot),
            ([(r, 1)], 0) => dot.seq == 1 && *r == dot.replica,
            _ => false,
        }
    }

    /// Records `dot` as seen; returns whether it was new ([`Self::contains`] said no).
    /// One search of the vector for a replica's next local event.
    #[inline]
    pub fn insert_new(&mut self, dot: Dot) -> bool {
        match self.vv.entry_mut(dot.replica) {
            Ok(top) if dot.seq != 0 && dot.seq <= *top => false,
            Ok(top) if dot.seq == *top + 1 && self.cloud.is_empty() => {
                *top = dot.seq;
                true
            }
            _ => {
                let new = !self.contains(dot);
                self.insert(dot);
                new
            }
        }
    }

    /// Records `dot` as seen.
    #[inline]
    pub fn insert(&mut self, dot: Dot) {
        if dot.seq == 0 {
            return;
        }
        // One search of the vector: the next dot of a replica (a local event) raises it.
        match self.vv.entry_mut(dot.replica) {
            Ok(top) if dot.seq <= *top => return,
            Ok(top) if dot.seq == *top + 1 => *top = dot.seq,
            Err(i) if dot.seq == 1 => self.vv.entries.insert(i, (dot.replica, 1)),
            _ => {
                self.cloud.insert(dot);
                return;
            }
        }
        if !self.cloud.is_empty() {
            self.fold(dot.replica);
        }
    }

    /// Records every dot of `span` as seen (a [`crate::Delta::run`]). A span that
    /// continues what is seen without a gap (how a document applies one) is one raise. A
    /// detached one goes to the cloud dot by dot, at most its last 64: a context that
    /// records less than was seen only makes a session send again what the peer will
    /// ignore, while a span's length comes from the wire.
    pub fn insert_span(&mut self, span: Span) {
        let Span { replica, first, last } = span;
        if first >= last || first == 0 {
            self.insert(span.last_dot());
        } else if self.vv.get(replica) >= first - 1 {
            self.vv.raise(replica, last);
            if !self.cloud.is_empty() {
                self.fold(replica);
            }
        } else {
            for seq in first.max(last.saturating_sub(63))..=last {
                self.insert(Dot::new(replica, seq));
            }
        }
    }

    /// Whether every dot of `span` has been seen (exact for spans recorded with
    /// [`Self::insert_span`] after what they continue; a detached span longer than 64
    /// dots answers no).
    pub fn contains_span(&self, span: Span) -> bool {
        let Span { replica, first, last } = span;
        let top = self.vv.get(replica);
        if top >= last {
            return true;
        }
        let from = top.max(first.saturating_sub(1)) + 1;
        last - from < 64 && (from..=last).all(|q| self.cloud.contains(&Dot::new(replica, q)))
    }

    /// Joins another context into this one.
    pub fn merge(&mut self, other: &CausalContext) {
        if !other.vv.is_empty() {
            self.absorb(&other.vv);
        }
        for &d in &other.cloud {
            self.insert(d);
        }
    }

    /// Records every event of `vv` as seen.
    pub fn absorb(&mut self, vv: &VersionVector) {
        if vv.le(&self.vv) {
            return;
        }
        self.vv.merge(vv);
        if !self.cloud.is_empty() {
            let replicas: Vec<ReplicaId> = vv.iter().map(|e| e.0).collect();
            for r in replicas {
                self.fold(r);
            }
        }
    }

    /// Moves `replica`'s cloud dots that became contiguous (or covered) into the vector.
    fn fold(&mut self, replica: ReplicaId) {
        // `replica`'s dots are one sorted run of the cloud: take its covered or
        // contiguous prefix.
        let start = self.cloud.lower_bound(&Dot::new(replica, 0));
        let mut end = start;
        let mut top = self.vv.get(replica);
        while let Some(d) = self.cloud.nth(end).filter(|d| d.replica == replica) {
            if d.seq > top.saturating_add(1) {
                break;
            }
            top = top.max(d.seq);
            end += 1;
        }
        self.vv.raise(replica, top);
        self.cloud.drain_range(start..end);
    }

    /// Checks the invariants a decoded context must hold.
    pub fn validate(&self) -> Result<(), &'static str> {
        self.vv.validate()?;
        if self.cloud.iter().any(|d| d.seq <= self.vv.get(d.replica).saturating_add(1)) {
            return Err("causal context is not compact");
        }
        Ok(())
    }
}

impl Wire for VersionVector {
    fn put(&self, out: &mut Vec<u8>) {
        put_seq(out, &self.entries, |&(r, s), out| {
            put_varint(out, r.0);
            put_varint(out, s);
        });
    }
    fn read(r: &mut Reader<'_>) -> R<Self> {
        let v = r.seq(|r| Ok((ReplicaId(r.varint()?), r.varint()?)))?;
        Ok(VersionVector { entries: Pairs::from_vec(v) })
    }
}

impl Wire for CausalContext {
    fn put(&self, out: &mut Vec<u8>) {
        self.vv.put(out);
        put_varint(out, self.cloud.len() as u64);
        for d in &self.cloud {
            d.put(out);
        }
    }
    fn read(r: &mut Reader<'_>) -> R<Self> {
        let vv = VersionVector::read(r)?;
        let cloud = r.seq(Dot::read)?.into_iter().collect();
        Ok(CausalContext { vv, cloud })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: ReplicaId = ReplicaId(0xA);
    const B: ReplicaId = ReplicaId(0xB);

    #[test]
    fn worked_example_from_the_design() {
        let x = VersionVector::from_iter([(A, 3)]);
        let y = VersionVector::from_iter([(A, 2), (B, 1)]);
        let mut m = x.clone();
        m.merge(&y);
        assert_eq!(m, VersionVector::from_iter([(A, 3), (B, 1)]));
        assert_eq!(m.compare(&y), Causality::After);
        assert!(y.happened_before(&m));
        let z = VersionVector::from_iter([(A, 4)]);
        assert_eq!(z.compare(&m), Causality::Concurrent);
        assert_eq!(m.compare(&m.clone()), Causality::Equal);
    }

    #[test]
    fn a_one_entry_vector_is_inline_yet_encodes_like_a_list() {
        let one = VersionVector::from_iter([(A, 3)]);
        assert!(matches!(one.entries, Pairs::One(_)));
        let list: Vec<(ReplicaId, u64)> = vec![(A, 3)];
        assert_eq!(postcard::to_allocvec(&one).unwrap(), postcard::to_allocvec(&list).unwrap());
        let back: VersionVector = postcard::from_bytes(&postcard::to_allocvec(&one).unwrap()).unwrap();
        assert_eq!(back, one);
        let mut two = one.clone();
        two.raise(B, 1);
        two.raise(ReplicaId(1), 1);
        assert_eq!(two.iter().collect::<Vec<_>>(), [(ReplicaId(1), 1), (A, 3), (B, 1)]);
        assert_eq!(format!("{one:?}"), "VersionVector { entries: [(ReplicaId(10), 3)] }");
    }

    #[test]
    fn merging_large_vectors_keeps_them_sorted_and_takes_the_maximum() {
        let x = VersionVector::from_iter((0..100u64).map(|i| (ReplicaId(i * 2), i + 1)));
        let y = VersionVector::from_iter((0..100u64).map(|i| (ReplicaId(i * 3), 50)));
        let mut m = x.clone();
        m.merge(&y);
        m.validate().unwrap();
        for r in (0..300).map(ReplicaId) {
            assert_eq!(m.get(r), x.get(r).max(y.get(r)));
        }
        let mut raised = x.clone();
        for (r, s) in y.iter() {
            raised.raise(r, s);
        }
        assert_eq!(m, raised);
    }

    #[test]
    fn the_context_of_one_dot_is_that_of_inserting_it() {
        for dot in [Dot::new(A, 0), Dot::new(A, 1), Dot::new(A, 2), Dot::new(B, 9)] {
            let mut cc = CausalContext::default();
            cc.insert(dot);
            assert_eq!(CausalContext::of_dot(dot), cc);
            assert_eq!(format!("{:?}", CausalContext::of_dot(dot)), format!("{cc:?}"));
        }
    }

    #[test]
    fn insert_new_is_contains_then_insert_and_is_of_dot_recognises_of_dot() {
        let mut cc = CausalContext::default();
        cc.insert(Dot::new(A, 1));
        cc.insert(Dot::new(A, 2));
        cc.insert(Dot::new(B, 3));
        for dot in [0, 1, 2, 3, 4, 5].into_iter().flat_map(|q| [Dot::new(A, q), Dot::new(B, q)]) {
            let (mut fast, mut slow) = (cc.clone(), cc.clone());
            assert_eq!(fast.insert_new(dot), !slow.contains(dot), "{dot}");
            slow.insert(dot);
            assert_eq!(fast, slow);
            assert_eq!(CausalContext::of_dot(dot).is_of_dot(dot), dot.seq > 0);
            assert!(!cc.is_of_dot(dot));
            assert!(!CausalContext::of_dot(Dot::new(A, 3)).is_of_dot(Dot::new(B, 3)));
        }
    }

    #[test]
    fn context_folds_cloud_when_gap_closes() {
        let mut cc = CausalContext::default();
        cc.insert(Dot::new(A, 3));
        cc.insert(Dot::new(A, 2));
        assert_eq!(cc.vv.get(A), 0);
        cc.absorb(&VersionVector::from_iter([(A, 1)]));
        assert_eq!(cc.vv.get(A), 3);
        assert!(cc.cloud.is_empty());
        cc.validate().unwrap();
    }
}
