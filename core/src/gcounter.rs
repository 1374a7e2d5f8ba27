//! Grow-only counter.

use crate::id::ReplicaId;
use crate::traits::{Crdt, InvalidState};
use crate::vv::VersionVector;
use serde::{Deserialize, Serialize};

/// A grow-only counter: one count per replica; merge takes the pointwise maximum and the
/// value is the sum. Structurally a [`VersionVector`], which it reuses.
///
/// ```
/// use concord_core::{Crdt, GCounter, ReplicaId};
/// let (mut a, mut b) = (GCounter::default(), GCounter::default());
/// a.merge(&a.increment(ReplicaId(1), 2));
/// b.merge(&b.increment(ReplicaId(2), 3));
/// a.merge(&b);
/// assert_eq!(a.value(), 5);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GCounter(VersionVector);

impl GCounter {
    /// The delta that adds `n` to `replica`'s count.
    #[inline]
    pub fn increment(&self, replica: ReplicaId, n: u64) -> GCounter {
        let mut d = VersionVector::new();
        d.raise(replica, self.0.get(replica).saturating_add(n));
        GCounter(d)
    }

    /// `replica`'s own contribution.
    pub fn get(&self, replica: ReplicaId) -> u64 {
        self.0.get(replica)
    }

    /// Whether every count here is at most `other`'s (merging `self` into `other` changes
    /// nothing).
    pub fn le(&self, other: &GCounter) -> bool {
        self.0.le(&other.0)
    }
}

impl Crdt for GCounter {
    type Value = u64;

    #[inline]
    fn merge(&mut self, other: &Self) {
        self.0.merge(&other.0);
    }

    fn value(&self) -> u64 {
        self.0.iter().fold(0u64, |acc, (_, n)| acc.saturating_add(n))
    }

    fn validate(&self) -> Result<(), InvalidState> {
        self.0.validate().map_err(InvalidState)
    }
}

impl crate::codec::Wire for GCounter {
    fn put(&self, out: &mut Vec<u8>) {
        self.0.put(out);
    }
    fn read(r: &mut crate::codec::Reader<'_>) -> crate::codec::R<Self> {
        VersionVector::read(r).map(GCounter)
    }
}
