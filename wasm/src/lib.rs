//! # concord-wasm
//!
//! The browser replica: [`concord_core`] compiled to WebAssembly, plus the transports it
//! needs there. Data path:
//!
//! - [`api`]: the `#[wasm_bindgen]` shim (`Replica`, `DocHandle`): argument conversion
//!   only. The public `Client`/`Doc` API of the npm package `concord-sync` is written by
//!   hand in `js/client.js` on top of it, with authored types in `js/index.d.ts`.
//! - [`value`]: JSON-compatible JS values <-> [`concord_core::Value`].
//! - [`client`]: open documents, write/persist/forward bookkeeping, and the relay
//!   connection loop (WebSocket, failover, backoff, liveness) driving a
//!   [`concord_core::sync::Session`].
//! - [`channel`]: tab-to-tab sync over `BroadcastChannel`.
//! - [`store`]: IndexedDB persistence (snapshots + outbox, one transaction each).
//! - [`js`], [`error`]: timers/clock/randomness, and JS error classes.
//!
//! **Why the transport is in Rust (web-sys).** The protocol decisions are the core's; what
//! is left is deciding *when* to call it (on open, on each frame, on each tick, after a
//! reconnect) and what is durable where. Keeping that next to the documents avoids a
//! second copy of the replica's state in JS and lets the wasm-bindgen tests in headless
//! Chromium drive persistence and tab sync directly. The bindings are thin (web-sys calls
//! are one JS line each) and the measured cost is small; see `npm run size`.
//!
//! Runs in browsers (ESM, Vite) and in Node 20+ (pass a WebSocket constructor such as the
//! `ws` package's; IndexedDB is skipped where there is none).

pub mod api;
pub mod channel;
pub mod client;
pub mod error;
pub mod js;
pub mod store;
pub mod value;
pub mod vecmap;

pub use api::{DocHandle, Replica};
pub use client::{Client, Options, Status};

/// With the `panic-hook` feature, Rust panics are logged to the console with their
/// message instead of a bare `unreachable` trap.
#[cfg(feature = "panic-hook")]
#[wasm_bindgen::prelude::wasm_bindgen(start)]
pub fn start() {
    console_error_panic_hook::set_once();
}
