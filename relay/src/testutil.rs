//! Helpers of the crate's unit tests: randomized-test settings and byte mutations.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;

/// Cases per randomized test: `PROPTEST_CASES`, 1,000 without it.
pub(crate) fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(1000)
}

/// [`cases`], as a proptest configuration.
pub(crate) fn config() -> ProptestConfig {
    ProptestConfig::with_cases(cases())
}

/// For tests whose every case opens databases and syncs them: a 32nd of [`cases`], at
/// least 16.
pub(crate) fn disk_config() -> ProptestConfig {
    ProptestConfig::with_cases((cases() / 32).max(16))
}

/// One change to a valid record, as a damaged disk or a bug would make it.
#[derive(Clone, Debug)]
pub(crate) enum Mutation {
    /// Flip one bit.
    Flip { at: prop::sample::Index, bit: u8 },
    /// Overwrite one byte.
    Set { at: prop::sample::Index, to: u8 },
    /// Insert bytes.
    Insert { at: prop::sample::Index, bytes: Vec<u8> },
    /// Append bytes.
    Extend { bytes: Vec<u8> },
    /// Remove a few bytes.
    Delete { at: prop::sample::Index, len: usize },
    /// Cut the record short.
    Truncate { at: prop::sample::Index },
}

/// Any [`Mutation`].
pub(crate) fn mutation() -> impl Strategy<Value = Mutation> {
    let bytes = || proptest::collection::vec(any::<u8>(), 1..8);
    prop_oneof![
        (any::<prop::sample::Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (
            any::<prop::sample::Index>(),
            prop_oneof![Just(0u8), Just(0xff), Just(0x80), Just(0x7f), any::<u8>()]
        )
            .prop_map(|(at, to)| Mutation::Set { at, to }),
        (any::<prop::sample::Index>(), bytes()).prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        bytes().prop_map(|bytes| Mutation::Extend { bytes }),
        (any::<prop::sample::Index>(), 1usize..8).prop_map(|(at, len)| Mutation::Delete { at, len }),
        any::<prop::sample::Index>().prop_map(|at| Mutation::Truncate { at }),
    ]
}

/// Applies `m` to `bytes`.
pub(crate) fn mutate(bytes: &mut Vec<u8>, m: &Mutation) {
    match m {
        Mutation::Extend { bytes: more } => bytes.extend_from_slice(more),
        Mutation::Insert { at, bytes: more } => {
            let i = at.index(bytes.len() + 1);
            bytes.splice(i..i, more.iter().copied());
        }
        _ if bytes.is_empty() => {}
        Mutation::Flip { at, bit } => {
            let i = at.index(bytes.len());
            bytes[i] ^= 1 << bit;
        }
        Mutation::Set { at, to } => {
            let i = at.index(bytes.len());
            bytes[i] = *to;
        }
        Mutation::Delete { at, len } => {
            let i = at.index(bytes.len());
            let end = (i + len).min(bytes.len());
            bytes.drain(i..end);
        }
        Mutation::Truncate { at } => {
            let i = at.index(bytes.len());
            bytes.truncate(i);
        }
    }
}

/// A fresh directory under the system temp dir, removed on drop.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "concord-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
