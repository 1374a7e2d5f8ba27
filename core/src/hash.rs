//! Small, stable, non-cryptographic hashing.
//!
//! Two uses: [`FxBuild`] for in-memory hash maps (fast), and [`stable_hash`] for hashes
//! that cross the wire (Merkle trees, the ring), which must be identical on every platform
//! and release.
//!
//! In-memory maps are keyed by remote input (document ids, set elements, key hashes), and
//! a hasher an attacker can predict can be flooded with colliding keys. The core draws no
//! randomness itself: a server calls [`set_map_seed`] with a random value once, at start-up,
//! before it builds any map; every map hasher then starts from that seed. Without a call
//! the seed is 0 and maps hash deterministically (tests, the browser replica). Hashes that
//! cross the wire never use it.

use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// The seed every [`FxHasher::default`] starts from (see [`set_map_seed`]).
static MAP_SEED: AtomicU64 = AtomicU64::new(0);

/// Seeds the hasher of every in-memory map built afterwards. Call it once, first thing:
/// a map built before the call would no longer find its keys. Later calls are ignored, and
/// so is 0. Returns whether this call set the seed.
pub fn set_map_seed(seed: u64) -> bool {
    seed != 0 && MAP_SEED.compare_exchange(0, seed, Ordering::Relaxed, Ordering::Relaxed).is_ok()
}

const K: u64 = 0x517c_c1b7_2722_0a95;

/// The rustc "Fx" hash: one multiply and rotate per word. `default()` starts from the
/// map seed ([`set_map_seed`]).
#[derive(Clone, Copy)]
pub struct FxHasher {
    hash: u64,
}

impl Default for FxHasher {
    #[inline]
    fn default() -> Self {
        FxHasher { hash: MAP_SEED.load(Ordering::Relaxed) }
    }
}

impl FxHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.hash = (self.hash.rotate_left(5) ^ w).wrapping_mul(K);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            // The tail as a little-endian word, zero-padded: two reads that may overlap
            // (the overlapping bytes are the same, so OR-ing them is exact), no loop and
            // no `memcpy` of a variable length.
            let n = rest.len();
            let w = if n >= 4 {
                let lo = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let hi = u32::from_le_bytes([rest[n - 4], rest[n - 3], rest[n - 2], rest[n - 1]]);
                u64::from(lo) | u64::from(hi) << (8 * (n - 4))
            } else if n >= 2 {
                let lo = u16::from_le_bytes([rest[0], rest[1]]);
                let hi = u16::from_le_bytes([rest[n - 2], rest[n - 1]]);
                u64::from(lo) | u64::from(hi) << (8 * (n - 2))
            } else {
                u64::from(rest[0])
            };
            self.add(w ^ ((n as u64) << 56));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        // Fx leaves low bits weak; hashbrown uses the top bits, but mix anyway.
        fmix64(self.hash)
    }
}

/// Builds [`FxHasher`]s for `HashMap`/`HashSet`.
pub type FxBuild = BuildHasherDefault<FxHasher>;

/// A `HashMap` with the Fx hasher.
pub type FxHashMap<K, V> = std::collections::HashMap<K, V, FxBuild>;

/// MurmurHash3's 64-bit finaliser: full avalanche.
#[inline]
pub const fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// A 64-bit hash of `bytes` that never changes across platforms or releases.
///
/// ```
/// use concord_core::hash::stable_hash;
/// assert_eq!(stable_hash(b"doc-1"), stable_hash(b"doc-1"));
/// assert_ne!(stable_hash(b"doc-1"), stable_hash(b"doc-2"));
/// ```
pub fn stable_hash(bytes: &[u8]) -> u64 {
    stable_hash_seeded(0, bytes)
}

/// [`stable_hash`] with a seed, for independent hash families.
pub fn stable_hash_seeded(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = FxHasher { hash: fmix64(seed ^ (bytes.len() as u64).wrapping_mul(K)) };
    h.write(bytes);
    h.finish()
}

#[cfg(test)]
mod fx_tests {
    use super::*;

    /// The tail read as two overlapping words hashes exactly as the zero-padded word it stands for.
    #[test]
    fn the_tail_is_read_as_a_zero_padded_word() {
        let bytes: Vec<u8> = (1..=40u8).map(|b| b.wrapping_mul(37)).collect();
        for len in 0..=bytes.len() {
            let data = &bytes[..len];
            let mut expect = FxHasher::default();
            let mut chunks = data.chunks_exact(8);
            for c in &mut chunks {
                expect.add(u64::from_le_bytes(c.try_into().unwrap()));
            }
            let rest = chunks.remainder();
            if !rest.is_empty() {
                let mut buf = [0u8; 8];
                buf[..rest.len()].copy_from_slice(rest);
                expect.add(u64::from_le_bytes(buf) ^ ((rest.len() as u64) << 56));
            }
            let mut got = FxHasher::default();
            got.write(data);
            assert_eq!(got.finish(), expect.finish(), "length {len}");
        }
    }
}
