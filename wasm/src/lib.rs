//! # concord-wasm
//!
//! The browser replica: a wasm-bindgen shim over [`concord_core`].
