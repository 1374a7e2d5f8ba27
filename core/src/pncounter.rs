//! Positive-negative counter.

use crate::gcounter::GCounter;
use crate::id::ReplicaId;
use crate::traits::{Crdt, InvalidState};
use serde::{Deserialize, Serialize};

/// A counter that goes up and down: two [`GCounter`]s, `value = P - N`.
///
/// ```
/// use concord_core::{Crdt, PnCounter, ReplicaId};
/// let mut c = PnCounter::default();
/// c.merge(&c.increment(ReplicaId(1), 2));
/// c.merge(&c.decrement(ReplicaId(1), 5));
/// assert_eq!(c.value(), -3);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PnCounter {
    p: GCounter,
    n: GCounter,
}

impl PnCounter {
    /// The delta that adds `n`.
    #[inline]
    pub fn increment(&self, replica: ReplicaId, n: u64) -> PnCounter {
        PnCounter { p: self.p.increment(replica, n), n: GCounter::default() }
    }

    /// The increments and decrements, as two grow-only counters.
    pub fn parts(&self) -> (&GCounter, &GCounter) {
        (&self.p, &self.n)
    }

    /// Whether both halves are at most `other`'s (merging `self` into `other` changes
    /// nothing).
    pub fn le(&self, other: &PnCounter) -> bool {
        self.p.le(&other.p) && self.n.le(&other.n)
    }

    /// The delta that subtracts `n`.
    #[inline]
    pub fn decrement(&self, replica: ReplicaId, n: u64) -> PnCounter {
        PnCounter { p: GCounter::default(), n: self.n.increment(replica, n) }
    }
}

impl Crdt for PnCounter {
    type Value = i64;

    #[inline]
    fn merge(&mut self, other: &Self) {
        self.p.merge(&other.p);
        self.n.merge(&other.n);
    }

    fn value(&self) -> i64 {
        let v = i128::from(self.p.value()) - i128::from(self.n.value());
        v.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
    }

    fn validate(&self) -> Result<(), InvalidState> {
        self.p.validate()?;
        self.n.validate()
    }
}

impl crate::codec::Wire for PnCounter {
    fn put(&self, out: &mut Vec<u8>) {
        self.p.put(out);
        self.n.put(out);
    }
    fn read(r: &mut crate::codec::Reader<'_>) -> crate::codec::R<Self> {
        Ok(PnCounter { p: GCounter::read(r)?, n: GCounter::read(r)? })
    }
}
