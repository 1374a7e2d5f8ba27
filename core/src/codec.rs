//! The binary encoding: a tag byte, a format version byte, then a postcard body.
//!
//! Every encodable type has its tag here, in one place (as riak_dt keeps its tags in one
//! file). Decoding never panics: unknown tags, unknown versions, truncated or malformed
//! bodies, and states that break their type's invariants are all typed errors. Golden
//! byte vectors in the tests pin the format.
//!
//! **Written by hand.** The bodies are postcard's encoding (LEB128 varints, zig-zag for
//! signed integers, length-prefixed strings and sequences, enum variants as a varint
//! index, `Option` as a 0/1 byte, structs as their fields in order, `u8` as one byte,
//! `f64` as 8 little-endian bytes), but each type writes and reads itself through
//! [`Wire`] instead of serde: serde's generic visitors and postcard's flavors cost ~30 KB
//! of wasm, a direct walk a fraction of it. The types keep their serde derives for the
//! relay and the tests, which check that both encodings agree byte for byte — for every
//! type but the [`crate::OrSet`], which since format 2 is packed (front-coded elements in
//! dot order, a replica table, delta-coded sequence numbers: ~4 B per element of a typical
//! set instead of ~24, see its `Wire` impl); its serde form stays the plain one.
//!
//! [`Reader`] is a bounds-checked cursor: a count is never trusted beyond the bytes
//! left, preallocation is capped, and [`crate::Value`] nesting is bounded. It knows the
//! format version of what it reads (from the header), so values stored by an older build
//! are still read as they were written.

/// Version of the body format written by this build. 2: [`crate::OrSet`]s are written
/// in dot order with a replica table, front-coded elements and delta-coded sequence
/// numbers (see its `Wire` impl). 3: a [`crate::Delta`] ends with how many dots before
/// its own it stands for (a run, [`crate::Delta::run`]). Version 1 and 2 bodies are still
/// read ([`Reader::format`]).
pub const FORMAT_VERSION: u8 = 3;

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
pub fn encode<T: Wire>(tag: u8, value: &T) -> Vec<u8> {
    let mut out = vec![tag, FORMAT_VERSION];
    value.put(&mut out);
    out
}

/// Decodes a value written by [`encode`] under `tag`, rejecting trailing bytes.
pub fn decode<T: Wire>(tag: u8, bytes: &[u8]) -> Result<T, DecodeError> {
    check_header(tag, bytes)?.whole().map_err(|e| DecodeError::Malformed(e.into()))
}

/// Reads one `T` that must span all of `body` (in this build's format).
pub fn whole<T: Wire>(body: &[u8]) -> R<T> {
    Reader::new(body).whole()
}

/// Checks tag and version; returns a reader over the body in the format it names.
pub fn check_header(tag: u8, bytes: &[u8]) -> Result<Reader<'_>, DecodeError> {
    match bytes {
        [] => Err(DecodeError::Empty),
        [t, ..] if *t != tag => Err(DecodeError::WrongTag { found: *t, expected: tag }),
        [_] => Err(DecodeError::Malformed("missing format version".into())),
        [_, v, ..] if *v == 0 || *v > FORMAT_VERSION => {
            Err(DecodeError::UnsupportedVersion { found: *v, supported: FORMAT_VERSION })
        }
        [_, v, body @ ..] => Ok(Reader { b: body, format: *v }),
    }
}

/// A decoding result: errors are short static descriptions.
pub type R<T> = Result<T, &'static str>;

/// A type with a hand-written postcard encoding.
pub trait Wire: Sized {
    /// Appends the encoding of `self`.
    fn put(&self, out: &mut Vec<u8>);
    /// Reads one value; never panics, whatever the bytes.
    fn read(r: &mut Reader<'_>) -> R<Self>;
}

/// Appends `v` as a LEB128 varint.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends a length-prefixed byte string.
pub fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// Appends a sequence: its length, then each item.
pub fn put_seq<T>(out: &mut Vec<u8>, items: &[T], each: impl Fn(&T, &mut Vec<u8>)) {
    put_varint(out, items.len() as u64);
    for x in items {
        each(x, out);
    }
}

/// Zig-zag: small negative numbers become small varints.
pub fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

/// Inverse of [`zigzag`].
pub fn unzigzag(v: u64) -> i64 {
    (v >> 1) as i64 ^ -((v & 1) as i64)
}

/// Most bytes reserved ahead for a decoded sequence; longer ones grow as items arrive
/// (each item consumes input, so memory stays a small multiple of the input).
const MAX_PREALLOC: usize = 64 * 1024;

/// A bounds-checked cursor over untrusted bytes, in one body format.
pub struct Reader<'a> {
    b: &'a [u8],
    format: u8,
}

impl<'a> Reader<'a> {
    /// A reader over `bytes` in this build's format ([`FORMAT_VERSION`]).
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { b: bytes, format: FORMAT_VERSION }
    }

    /// The body format being read: [`FORMAT_VERSION`], or an older one a stored value was
    /// written in (protocol messages are always in this build's format).
    pub fn format(&self) -> u8 {
        self.format
    }

    /// Reads one `T` that must span every byte left.
    pub fn whole<T: Wire>(mut self) -> R<T> {
        let v = T::read(&mut self)?;
        if !self.is_empty() {
            return Err("trailing bytes");
        }
        Ok(v)
    }

    /// Whether every byte was read.
    pub fn is_empty(&self) -> bool {
        self.b.is_empty()
    }

    /// Bytes not read yet.
    pub fn left(&self) -> usize {
        self.b.len()
    }

    /// One byte.
    pub fn byte(&mut self) -> R<u8> {
        let (&b, rest) = self.b.split_first().ok_or("truncated")?;
        self.b = rest;
        Ok(b)
    }

    /// A LEB128 varint of at most 64 bits.
    pub fn varint(&mut self) -> R<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            if shift == 63 && b > 1 {
                return Err("varint overflows 64 bits");
            }
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint overflows 64 bits")
    }

    /// A varint that must fit in 32 bits.
    pub fn u32(&mut self) -> R<u32> {
        u32::try_from(self.varint()?).map_err(|_| "integer out of range")
    }

    /// A varint that must fit in 16 bits.
    pub fn u16(&mut self) -> R<u16> {
        u16::try_from(self.varint()?).map_err(|_| "integer out of range")
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: u64) -> R<&'a [u8]> {
        let n = usize::try_from(n).map_err(|_| "length out of range")?;
        if n > self.b.len() {
            return Err("truncated");
        }
        let (a, b) = self.b.split_at(n);
        self.b = b;
        Ok(a)
    }

    /// A length-prefixed UTF-8 string.
    pub fn str(&mut self) -> R<&'a str> {
        let n = self.varint()?;
        std::str::from_utf8(self.take(n)?).map_err(|_| "string is not UTF-8")
    }

    /// A length-prefixed UTF-8 string, owned.
    pub fn string(&mut self) -> R<String> {
        self.str().map(str::to_owned)
    }

    /// `Option`'s tag: 0 (none) or 1 (some).
    pub fn flag(&mut self) -> R<bool> {
        match self.byte()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err("bad bool or option tag"),
        }
    }

    /// A count of items each at least one byte long: never more than the bytes left, so a
    /// forged count cannot make us reserve memory.
    pub fn count(&mut self) -> R<usize> {
        let n = self.varint()?;
        usize::try_from(n).ok().filter(|n| *n <= self.b.len()).ok_or("count exceeds the input")
    }

    /// A sequence: a count, then each item.
    pub fn seq<T>(&mut self, mut each: impl FnMut(&mut Self) -> R<T>) -> R<Vec<T>> {
        let n = self.count()?;
        let mut v = Vec::with_capacity(n.min(MAX_PREALLOC / std::mem::size_of::<T>().max(1)));
        for _ in 0..n {
            v.push(each(self)?);
        }
        Ok(v)
    }
}

impl Wire for u64 {
    fn put(&self, out: &mut Vec<u8>) {
        put_varint(out, *self);
    }
    fn read(r: &mut Reader<'_>) -> R<Self> {
        r.varint()
    }
}

impl Wire for u8 {
    fn put(&self, out: &mut Vec<u8>) {
        out.push(*self);
    }
    fn read(r: &mut Reader<'_>) -> R<Self> {
        r.byte()
    }
}

impl Wire for u32 {
    fn put(&self, out: &mut Vec<u8>) {
        put_varint(out, (*self).into());
    }
    fn read(r: &mut Reader<'_>) -> R<Self> {
        r.u32()
    }
}

impl Wire for u16 {
    fn put(&self, out: &mut Vec<u8>) {
        put_varint(out, (*self).into());
    }
    fn read(r: &mut Reader<'_>) -> R<Self> {
        r.u16()
    }
}

impl Wire for i64 {
    fn put(&self, out: &mut Vec<u8>) {
        put_varint(out, zigzag(*self));
    }
    fn read(r: &mut Reader<'_>) -> R<Self> {
        r.varint().map(unzigzag)
    }
}

impl Wire for String {
    fn put(&self, out: &mut Vec<u8>) {
        put_bytes(out, self.as_bytes());
    }
    fn read(r: &mut Reader<'_>) -> R<Self> {
        r.string()
    }
}

impl<T: Wire> Wire for Vec<T> {
    fn put(&self, out: &mut Vec<u8>) {
        put_seq(out, self, T::put);
    }
    fn read(r: &mut Reader<'_>) -> R<Self> {
        r.seq(T::read)
    }
}

impl<A: Wire, B: Wire> Wire for (A, B) {
    fn put(&self, out: &mut Vec<u8>) {
        self.0.put(out);
        self.1.put(out);
    }
    fn read(r: &mut Reader<'_>) -> R<Self> {
        Ok((A::read(r)?, B::read(r)?))
    }
}

impl<T: Wire> Wire for Option<T> {
    fn put(&self, out: &mut Vec<u8>) {
        match self {
            None => out.push(0),
            Some(x) => {
                out.push(1);
                x.put(out);
            }
        }
    }
    fn read(r: &mut Reader<'_>) -> R<Self> {
        Ok(if r.flag()? { Some(T::read(r)?) } else { None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_zigzag_round_trip_at_the_edges() {
        for v in [0, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX - 1, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(Reader::new(&out).varint(), Ok(v));
            assert_eq!(out, postcard::to_allocvec(&v).unwrap());
        }
        for v in [0, 1, -1, 63, -64, i64::MAX, i64::MIN] {
            assert_eq!(unzigzag(zigzag(v)), v);
            let mut out = Vec::new();
            put_varint(&mut out, zigzag(v));
            assert_eq!(out, postcard::to_allocvec(&v).unwrap());
        }
        // An 11th byte or a 10th byte above 1 overflows.
        assert!(Reader::new(&[0xff; 10]).varint().is_err());
        assert!(Reader::new(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]).varint().is_err());
    }

    #[test]
    fn a_forged_count_is_refused_before_anything_is_reserved() {
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff, 0x0f, 1, 2]);
        assert!(r.seq(|r| r.byte()).is_err());
    }
}
