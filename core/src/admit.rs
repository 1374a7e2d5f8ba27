//! What a relay admits from a client: the bounds on a document and the checks on every
//! write, decided before anything is applied.
//!
//! A relay is a public endpoint, so one writer must not be able to make a document
//! unloadable for everyone (a set too large to load, a value too large to send) or leave
//! it holding writes nobody can ever apply. [`admit`] looks at one frame of deltas against
//! the document as it stands and either accepts the whole frame or names the first reason
//! to refuse it ([`Refusal`]); nothing of a refused frame is applied. Peers (other relays)
//! are not checked here: they only forward what a relay already admitted.
//!
//! [`check_doc_id`] is the rule for document ids, shared by the relay and the browser
//! replica so both refuse the same ids.

use std::collections::BTreeMap;

use crate::codec::Wire;
use crate::document::{Delta, Document, Field};
use crate::id::ReplicaId;
use crate::value::Value;

/// Bounds on what clients may store. The relay reads them from its configuration
/// (`[limits]`); [`Limits::default`] holds the documented defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes a document's encoded state may take (default 16 MiB).
    pub max_doc_bytes: usize,
    /// Most elements one set may hold (default 1,000,000).
    pub max_set_elements: usize,
    /// Most encoded bytes one value (a register's value or a set element) may take
    /// (default 64 KiB).
    pub max_value_bytes: usize,
    /// Most bytes of a document id (default 512, the protocol's own bound).
    pub max_doc_id_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_doc_bytes: 16 << 20,
            max_set_elements: 1_000_000,
            max_value_bytes: 64 << 10,
            max_doc_id_bytes: crate::sync::msg::MAX_DOC_ID,
        }
    }
}

/// Why a frame of writes was refused. [`Refusal::too_large`] tells the bounds
/// (`TOO_LARGE` on the wire) from malformed writes (`INVALID`).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Refusal {
    /// The document id is empty, too long, or has a control character or a `.`/`..`
    /// path segment.
    #[error("document id refused: {0}")]
    DocId(&'static str),
    /// A value larger than [`Limits::max_value_bytes`].
    #[error("a value of key \"{key}\" takes {bytes} bytes; the limit is {max}")]
    ValueTooLarge {
        /// The key written.
        key: String,
        /// The value's encoded size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// A set would hold more than [`Limits::max_set_elements`].
    #[error("set \"{key}\" would hold {elements} elements; the limit is {max}")]
    SetTooLarge {
        /// The set's key.
        key: String,
        /// Its size after the write (at most).
        elements: usize,
        /// The limit.
        max: usize,
    },
    /// The document would take more than [`Limits::max_doc_bytes`].
    #[error("the document would take {bytes} bytes; the limit is {max}")]
    DocTooLarge {
        /// Its size after the write (at most).
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// NaN or an infinity: not a JSON value, and equal to nothing (not even itself).
    #[error("key \"{key}\" holds NaN or an infinity; store null or a string instead")]
    NotFinite {
        /// The key written.
        key: String,
    },
    /// Replica id 0 is reserved.
    #[error("replica id 0 is reserved")]
    ReplicaZero,
    /// A writer's own events skip sequence numbers the relay never received, so the
    /// relay could never apply them.
    #[error("replica {replica}'s events jump from {have} to {first}: {missing} never arrived, so these would never be applied")]
    Gap {
        /// The writer.
        replica: ReplicaId,
        /// The last of its events the document holds.
        have: u64,
        /// The first sequence number of the write.
        first: u64,
        /// A description of the missing range.
        missing: String,
    },
}

impl Refusal {
    /// Whether a bound refused the write (rather than a malformed write).
    pub fn too_large(&self) -> bool {
        matches!(
            self,
            Refusal::ValueTooLarge { .. } | Refusal::SetTooLarge { .. } | Refusal::DocTooLarge { .. }
        )
    }
}

/// Checks a document id: 1 to `max` bytes, no control character (NUL included), no `.`
/// or `..` segment between slashes. Ids are keys in the store, never paths; the segment
/// rule keeps them safe to use as paths or URLs elsewhere.
pub fn check_doc_id(id: &str, max: usize) -> Result<(), Refusal> {
    if id.is_empty() {
        return Err(Refusal::DocId("empty"));
    }
    if id.len() > max {
        return Err(Refusal::DocId("too long"));
    }
    if id.chars().any(char::is_control) {
        return Err(Refusal::DocId("control character"));
    }
    if id.split('/').any(|s| s == "." || s == "..") {
        return Err(Refusal::DocId("a \".\" or \"..\" path segment"));
    }
    Ok(())
}

/// The writes of one frame, checked against `doc` as it stands (`None`: a document not
/// stored yet) whose encoded size is at most `doc_bytes`.
///
/// `writer` is the replica at the other end and `catching_up` whether a catch-up from it
/// is still running: while it runs, the writer's newer events may legitimately arrive
/// before older ones (the catch-up carries those); otherwise a gap in the writer's own
/// sequence numbers can never be filled.
///
/// Returns the frame's encoded size, which the caller adds to its size estimate of the
/// document once the frame is applied.
pub fn admit(
    doc: Option<&Document>,
    doc_bytes: usize,
    deltas: &[Delta],
    writer: Option<ReplicaId>,
    catching_up: bool,
    limits: &Limits,
) -> Result<usize, Refusal> {
    let mut added = 0usize;
    // Elements each set key gains in this frame, so far (a frame may add to one set in
    // many deltas).
    let mut growth: BTreeMap<&str, usize> = BTreeMap::new();
    let mut have = writer.map(|w| doc.map_or(0, |d| d.version().get(w)));
    for d in deltas {
        if d.dot.replica == ReplicaId(0) {
            return Err(Refusal::ReplicaZero);
        }
        if let (Some(w), Some(h)) = (writer, have.as_mut()) {
            if d.dot.replica == w {
                let first = d.first();
                if first > *h + 1 && !catching_up {
                    return Err(Refusal::Gap {
                        replica: w,
                        have: *h,
                        first,
                        missing: format!("{}..={}", *h + 1, first - 1),
                    });
                }
                *h = (*h).max(d.dot.seq);
            }
        }
        added = added.saturating_add(d.encode().len());
        let grown = growth.get(d.key.as_str()).copied().unwrap_or(0);
        let grown = check_field(&d.key, &d.payload, doc.and_then(|doc| doc.get(&d.key)), grown, limits)?;
        if grown > 0 {
            growth.insert(&d.key, grown);
        }
    }
    let total = doc_bytes.saturating_add(added);
    if total > limits.max_doc_bytes {
        return Err(Refusal::DocTooLarge { bytes: total, max: limits.max_doc_bytes });
    }
    Ok(added)
}

/// The checks on one key's delta: values finite and small enough, sets not too large
/// given the `grown` elements earlier deltas of the frame add to the key. Returns the
/// key's growth including this delta.
fn check_field(
    key: &str,
    payload: &Field,
    current: Option<&Field>,
    grown: usize,
    limits: &Limits,
) -> Result<usize, Refusal> {
    match payload {
        Field::Register(r) => match r.get() {
            Some(v) => check_value(key, v, limits).map(|()| grown),
            None => Ok(grown),
        },
        Field::Set(s) => {
            let have = match current {
                Some(Field::Set(c)) => Some(c),
                _ => None,
            };
            let mut new = 0usize;
            for (v, dots) in s.entries().iter() {
                check_value(key, v, limits)?;
                if !dots.is_empty() && !have.is_some_and(|c| c.contains(v)) {
                    new += 1;
                }
            }
            let grown = grown.saturating_add(new);
            let elements = have.map_or(0, |c| c.len()).saturating_add(grown);
            if new > 0 && elements > limits.max_set_elements {
                return Err(Refusal::SetTooLarge {
                    key: key.to_owned(),
                    elements,
                    max: limits.max_set_elements,
                });
            }
            Ok(grown)
        }
        Field::Counter(_) | Field::PnCounter(_) => Ok(grown),
    }
}

fn check_value(key: &str, v: &Value, limits: &Limits) -> Result<(), Refusal> {
    if !finite(v) {
        return Err(Refusal::NotFinite { key: key.to_owned() });
    }
    let mut bytes = Vec::new();
    v.put(&mut bytes);
    if bytes.len() > limits.max_value_bytes {
        return Err(Refusal::ValueTooLarge {
            key: key.to_owned(),
            bytes: bytes.len(),
            max: limits.max_value_bytes,
        });
    }
    Ok(())
}

/// Whether every number in `v` is finite.
fn finite(v: &Value) -> bool {
    match v {
        Value::Float(f) => f.is_finite(),
        Value::Array(a) => a.iter().all(finite),
        Value::Object(o) => o.values().all(finite),
        _ => true,
    }
}
