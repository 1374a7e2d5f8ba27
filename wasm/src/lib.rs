//! # concord-wasm
//!
//! The browser replica: [`concord_core`] compiled to WebAssembly as a sans-IO state
//! machine. Data path:
//!
//! - [`api`]: the `#[wasm_bindgen]` shim (`Replica`, `DocHandle`, and `Host`, the JS
//!   object outputs go to): argument conversion only.
//! - [`replica`]: open documents and the relay session; frames and writes in, [`Out`]s
//!   (frames for the relay and the other tabs, outbox entries, change events) out.
//! - [`channel`]: the tab-to-tab whole-document frame.
//! - Register and set values cross as bytes in [`concord_core::Value`]'s wire encoding;
//!   `js/client.js` converts them to and from JSON-compatible JS values.
//! - [`error`]: JS error classes.
//! - [`alloc`]: the global allocator (power-of-two free lists; smaller than dlmalloc).
//!
//! **Why the transports are in JavaScript.** The WebSocket (failover, backoff, liveness),
//! the `BroadcastChannel` and IndexedDB live in the package's hand-written `js/client.js`.
//! They decide nothing about data — every protocol decision is the core's, made here —
//! but written with web-sys they cost ~15 KB gzipped of wasm and generated glue (each
//! closure, promise and DOM call is wasm code plus a JS shim), where the same code in JS
//! is ~3 KB minified. See `npm run size`.
//!
//! Runs in browsers (ESM, Vite) and in Node 20+.

pub mod alloc;
pub mod api;
pub mod channel;
pub mod error;
pub mod replica;
pub mod vecmap;

pub use api::{DocHandle, Replica};
pub use replica::Out;

/// With the `panic-hook` feature, Rust panics are logged to the console with their
/// message instead of a bare `unreachable` trap.
#[cfg(feature = "panic-hook")]
#[wasm_bindgen::prelude::wasm_bindgen(start)]
pub fn start() {
    console_error_panic_hook::set_once();
}

/// A seeded generator for the tests (xorshift64*, Marsaglia 2003 / Vigna 2016), so a
/// failing seed can be replayed.
#[cfg(test)]
pub(crate) mod test_rng {
    /// xorshift64*; the state must not be zero.
    pub(crate) struct Rng(pub(crate) u64);

    impl Rng {
        /// The next number of the stream.
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        /// A number below `n`.
        pub(crate) fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }
}
