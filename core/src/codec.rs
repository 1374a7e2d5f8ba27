//! The binary encoding: a tag byte, a format version byte, then a postcard body.
//!
//! Every encodable type has its tag here, in one place (as riak_dt keeps its tags in one
//! file). Decoding never panics: unknown tags, unknown versions, truncated or malformed
//! bodies, and states that break their type's invariants are all typed errors. Golden
//! byte vectors in the tests pin the format.

use serde::{de::DeserializeOwned, Serialize};

/// Version of the body format written by this build.
pub const FORMAT_VERSION: u8 = 1;

/// Tags of top-level encoded values.
pub mod tag {
    /// A whole [`crate::Document`] (snapshot).
    pub const DOCUMENT: u8 = 0x01;
    /// One [`crate::Delta`].
    pub const DELTA: u8 = 0x02;
    /// A [`crate::VersionVector`].
    pub const VERSION_VECTOR: u8 = 0x03;
    /// A standalone CRDT state ([`crate::Field`]).
    pub const FIELD: u8 = 0x04;
}

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// No bytes at all.
    #[error("empty input: expected a tag byte")]
    Empty,
    /// The tag is not the one expected here.
    #[error("unexpected tag 0x{found:02x} (expected 0x{expected:02x})")]
    WrongTag {
        /// Tag read.
        found: u8,
        /// Tag wanted.
        expected: u8,
    },
    /// Written by a newer format.
    #[error("format version {found} is not supported (this build reads up to {supported}); upgrade concord")]
    UnsupportedVersion {
        /// Version read.
        found: u8,
        /// Highest version this build reads.
        supported: u8,
    },
    /// The body is truncated or malformed.
    #[error("malformed body: {0}")]
    Malformed(String),
    /// The body decoded but breaks an invariant.
    #[error("{0}")]
    Invalid(#[from] crate::traits::InvalidState),
}

/// Encodes `value` under `tag`.
pub fn encode<T: Serialize + ?Sized>(tag: u8, value: &T) -> Vec<u8> {
    let out = vec![tag, FORMAT_VERSION];
    // Serializing into a Vec cannot fail for our types (no maps with non-string keys
    // that postcard rejects, no I/O).
    match postcard::to_extend(value, out) {
        Ok(v) => v,
        Err(e) => unreachable!("postcard encoding into a Vec failed: {e}"),
    }
}

/// Decodes a value written by [`encode`] under `tag`, rejecting trailing bytes.
pub fn decode<T: DeserializeOwned>(tag: u8, bytes: &[u8]) -> Result<T, DecodeError> {
    let body = check_header(tag, bytes)?;
    let (value, rest) = postcard::take_from_bytes(body).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::Malformed(format!("{} trailing bytes", rest.len())));
    }
    Ok(value)
}

/// Checks tag and version; returns the body.
pub fn check_header(tag: u8, bytes: &[u8]) -> Result<&[u8], DecodeError> {
    match bytes {
        [] => Err(DecodeError::Empty),
        [t, ..] if *t != tag => Err(DecodeError::WrongTag { found: *t, expected: tag }),
        [_] => Err(DecodeError::Malformed("missing format version".into())),
        [_, v, ..] if *v == 0 || *v > FORMAT_VERSION => {
            Err(DecodeError::UnsupportedVersion { found: *v, supported: FORMAT_VERSION })
        }
        [_, _, body @ ..] => Ok(body),
    }
}
