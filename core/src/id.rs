//! Replica identities and dots.

use crate::codec::{Reader, Wire, R};
use core::fmt;
use serde::{Deserialize, Serialize};

/// A 64-bit random identity, one per replica (a browser tab, a relay node).
///
/// Ids are drawn by the caller (the core has no randomness) and persisted atomically with
/// the replica's state. A replica that lost its state must draw a new id: reusing an id
/// with a reset sequence would mint duplicate [`Dot`]s (Riak's kv679 "amnesia" bug).
///
/// ```
/// use concord_core::ReplicaId;
/// let a = ReplicaId(7);
/// assert_eq!(a.to_string(), "0000000000000007");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct ReplicaId(pub u64);

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// One event: the `seq`-th mutation a replica made to a document (`seq` starts at 1).
///
/// ```
/// use concord_core::{Dot, ReplicaId};
/// let d = Dot::new(ReplicaId(1), 3);
/// assert_eq!((d.replica, d.seq), (ReplicaId(1), 3));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Dot {
    /// The replica that made the event.
    pub replica: ReplicaId,
    /// Its sequence number at that replica, contiguous from 1.
    pub seq: u64,
}

impl Dot {
    /// A dot for `replica`'s `seq`-th event.
    pub const fn new(replica: ReplicaId, seq: u64) -> Self {
        Self { replica, seq }
    }
}

/// The dots `first..=last` of one replica: what a [`crate::Delta`] stands for (its own
/// dot, or a run of them, [`crate::Delta::run`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// The replica that made the events.
    pub replica: ReplicaId,
    /// The first sequence number (at least 1).
    pub first: u64,
    /// The last sequence number (at least `first`).
    pub last: u64,
}

impl Span {
    /// The last dot: the one a version vector must reach to hold the whole span.
    pub const fn last_dot(self) -> Dot {
        Dot::new(self.replica, self.last)
    }
}

impl fmt::Display for Dot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.replica, self.seq)
    }
}

impl Wire for ReplicaId {
    fn put(&self, out: &mut Vec<u8>) {
        crate::codec::put_varint(out, self.0);
    }
    fn read(r: &mut Reader<'_>) -> R<Self> {
        r.varint().map(ReplicaId)
    }
}

impl Wire for Dot {
    fn put(&self, out: &mut Vec<u8>) {
        crate::codec::put_varint(out, self.replica.0);
        crate::codec::put_varint(out, self.seq);
    }
    fn read(r: &mut Reader<'_>) -> R<Self> {
        Ok(Dot::new(ReplicaId(r.varint()?), r.varint()?))
    }
}
