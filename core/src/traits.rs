//! The one trait every CRDT implements.
//!
//! Shape after riak_dt and the `crdts` crate: mutators are `&self` methods that *make* a
//! delta (a small state of the same lattice) without changing anything; [`Crdt::merge`]
//! applies it. Merge is the lattice join: total, commutative, associative, idempotent, and
//! it never fails. Checking untrusted input is a separate, fallible step
//! ([`Crdt::validate`]) done once when bytes are decoded.

use crate::codec::Wire;
use serde::{de::DeserializeOwned, Serialize};
use std::fmt::Debug;

/// A state-based CRDT whose deltas are states of the same lattice
/// (Almeida et al., "Delta State Replicated Data Types", 2018).
///
/// ```
/// use concord_core::{Crdt, GCounter, ReplicaId};
/// let mut c = GCounter::default();
/// let delta = c.increment(ReplicaId(1), 5); // make the op...
/// c.merge(&delta);                          // ...then apply it
/// assert_eq!(c.value(), 5);
/// ```
pub trait Crdt: Clone + Debug + PartialEq + Default + Serialize + DeserializeOwned + Wire {
    /// What a reader sees.
    type Value;

    /// Joins `other` into `self` (least upper bound). Never fails.
    fn merge(&mut self, other: &Self);

    /// Joins `delta` into `self`, consuming it: the same result as [`Crdt::merge`], but a
    /// type may move the delta's contents in instead of cloning them. The way to apply a
    /// local mutation, as the `crdts` crate's `apply(op)`: make the delta, encode (or clone)
    /// it for the peers, then `apply` it.
    ///
    /// ```
    /// use concord_core::{codec::Wire, Crdt, OrSet, ReplicaId};
    /// let mut s: OrSet<String> = OrSet::default();
    /// let delta = s.add(s.next_dot(ReplicaId(1)), "milk".into());
    /// let mut for_peers = Vec::new();
    /// delta.put(&mut for_peers);
    /// s.apply(delta);
    /// assert!(s.contains(&"milk".into()) && !for_peers.is_empty());
    /// ```
    fn apply(&mut self, delta: Self) {
        self.merge(&delta);
    }

    /// The current value.
    fn value(&self) -> Self::Value;

    /// Checks invariants of a state that came from outside (the network, the disk).
    fn validate(&self) -> Result<(), InvalidState>;
}

/// A decoded state breaks an invariant of its type; the message says which.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid CRDT state: {0}")]
pub struct InvalidState(pub &'static str);
