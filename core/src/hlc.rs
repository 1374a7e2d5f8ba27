//! Hybrid logical clocks (Kulkarni et al., "Logical Physical Clocks and Consistent
//! Snapshots in Globally Distributed Databases", 2014).
//!
//! The wall clock is passed in (the core reads no clock). Timestamps never go backwards,
//! whatever the wall clock does, and are totally ordered with the replica id as the final
//! tie-break, which makes last-writer-wins deterministic.

use crate::id::ReplicaId;
use serde::{Deserialize, Serialize};

/// A point in hybrid logical time: `(millis, counter, replica)`, compared in that order.
///
/// ```
/// use concord_core::{ReplicaId, Timestamp};
/// let a = Timestamp { millis: 5, counter: 0, replica: ReplicaId(1) };
/// let b = Timestamp { millis: 5, counter: 0, replica: ReplicaId(2) };
/// assert!(a < b); // same time: the larger replica id wins
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Timestamp {
    /// Physical part: milliseconds since the Unix epoch (or the largest seen).
    pub millis: u64,
    /// Logical part: orders events within one millisecond.
    pub counter: u32,
    /// The replica that made the timestamp.
    pub replica: ReplicaId,
}

/// A hybrid logical clock owned by one replica.
///
/// ```
/// use concord_core::{Hlc, ReplicaId};
/// let mut clock = Hlc::new(ReplicaId(1));
/// let t1 = clock.tick(1_000);
/// let t2 = clock.tick(400); // the wall clock jumped back
/// assert!(t2 > t1);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hlc {
    last: Timestamp,
}

impl Hlc {
    /// A clock for `replica` that has seen nothing yet.
    pub fn new(replica: ReplicaId) -> Self {
        Self { last: Timestamp { millis: 0, counter: 0, replica } }
    }

    /// The replica this clock stamps for.
    pub fn replica(&self) -> ReplicaId {
        self.last.replica
    }

    /// The last timestamp issued or observed.
    pub fn last(&self) -> Timestamp {
        self.last
    }

    /// A new timestamp for a local event, given the current wall-clock reading.
    pub fn tick(&mut self, wall_millis: u64) -> Timestamp {
        if wall_millis > self.last.millis {
            self.last.millis = wall_millis;
            self.last.counter = 0;
        } else {
            self.bump();
        }
        self.last
    }

    /// Folds a timestamp received from another replica into the clock, so the next local
    /// timestamp is after it.
    pub fn observe(&mut self, remote: Timestamp) {
        let mine = (self.last.millis, self.last.counter);
        let theirs = (remote.millis, remote.counter);
        if theirs > mine {
            self.last.millis = remote.millis;
            self.last.counter = remote.counter;
        }
    }

    fn bump(&mut self) {
        match self.last.counter.checked_add(1) {
            Some(c) => self.last.counter = c,
            None => {
                // 4 billion events in one millisecond: borrow the next millisecond.
                self.last.millis = self.last.millis.saturating_add(1);
                self.last.counter = 0;
            }
        }
    }
}

impl crate::codec::Wire for Timestamp {
    fn put(&self, out: &mut Vec<u8>) {
        crate::codec::put_varint(out, self.millis);
        crate::codec::put_varint(out, self.counter.into());
        crate::codec::put_varint(out, self.replica.0);
    }
    fn read(r: &mut crate::codec::Reader<'_>) -> crate::codec::R<Self> {
        Ok(Timestamp { millis: r.varint()?, counter: r.u32()?, replica: ReplicaId(r.varint()?) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_is_monotonic_when_wall_clock_runs_backwards() {
        let mut c = Hlc::new(ReplicaId(9));
        let mut prev = c.tick(10_000);
        for wall in (0..10_000).rev().step_by(7) {
            let t = c.tick(wall);
            assert!(t > prev, "{t:?} <= {prev:?}");
            prev = t;
        }
    }

    #[test]
    fn observing_a_future_timestamp_moves_the_clock_past_it() {
        let mut c = Hlc::new(ReplicaId(1));
        c.observe(Timestamp { millis: 50_000, counter: 3, replica: ReplicaId(2) });
        let t = c.tick(10);
        assert_eq!((t.millis, t.counter, t.replica), (50_000, 4, ReplicaId(1)));
    }

    #[test]
    fn counter_overflow_borrows_the_next_millisecond() {
        let mut c = Hlc::new(ReplicaId(1));
        c.observe(Timestamp { millis: 7, counter: u32::MAX, replica: ReplicaId(2) });
        let t = c.tick(0);
        assert_eq!((t.millis, t.counter), (8, 0));
    }
}
