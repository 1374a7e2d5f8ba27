//! Last-writer-wins register.

use crate::codec::Wire;
use crate::hlc::Timestamp;
use crate::traits::{Crdt, InvalidState};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::fmt::Debug;

/// A register whose value is the write with the greatest hybrid-logical [`Timestamp`]
/// (ties between equal timestamps, which only a misbehaving peer can produce, go to the
/// greater value, so merge stays deterministic).
///
/// ```
/// use concord_core::{Crdt, LwwRegister, ReplicaId, Timestamp};
/// let t = |ms, r| Timestamp { millis: ms, counter: 0, replica: ReplicaId(r) };
/// let mut reg = LwwRegister::default();
/// reg.merge(&reg.set(t(10, 1), "late".to_string()));
/// reg.merge(&reg.set(t(5, 2), "early".to_string()));
/// assert_eq!(reg.value().as_deref(), Some("late"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LwwRegister<V> {
    entry: Option<(Timestamp, V)>,
}

impl<V> Default for LwwRegister<V> {
    fn default() -> Self {
        Self { entry: None }
    }
}

impl<V: Clone> LwwRegister<V> {
    /// The delta that writes `value` at time `ts` (take `ts` from the replica's `Hlc`).
    pub fn set(&self, ts: Timestamp, value: V) -> LwwRegister<V> {
        LwwRegister { entry: Some((ts, value)) }
    }

    /// The timestamp of the winning write.
    pub fn timestamp(&self) -> Option<Timestamp> {
        self.entry.as_ref().map(|e| e.0)
    }

    /// The winning value, borrowed.
    pub fn get(&self) -> Option<&V> {
        self.entry.as_ref().map(|e| &e.1)
    }
}

impl<V> Crdt for LwwRegister<V>
where
    V: Clone + Debug + Ord + Serialize + DeserializeOwned + Wire,
{
    type Value = Option<V>;

    fn merge(&mut self, other: &Self) {
        if let Some(theirs) = &other.entry {
            let wins = match &self.entry {
                None => true,
                Some(mine) => (theirs.0, &theirs.1) > (mine.0, &mine.1),
            };
            if wins {
                self.entry = Some(theirs.clone());
            }
        }
    }

    fn value(&self) -> Option<V> {
        self.get().cloned()
    }

    fn validate(&self) -> Result<(), InvalidState> {
        Ok(())
    }
}

impl<V: Wire> Wire for LwwRegister<V> {
    fn put(&self, out: &mut Vec<u8>) {
        self.entry.put(out);
    }
    fn read(r: &mut crate::codec::Reader<'_>) -> crate::codec::R<Self> {
        Ok(LwwRegister { entry: Option::read(r)? })
    }
}
