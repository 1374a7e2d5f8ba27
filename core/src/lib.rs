//! # concord-core
//!
//! The pure heart of Concord: CRDTs, clocks, documents and the sync protocol. No I/O, no
//! clock reads, no randomness: time and ids are passed in, bytes come in and go out.
//!
//! Data path, bottom up:
//!
//! - [`id`], [`vv`], [`hlc`]: replica ids, dots, version vectors and causal contexts,
//!   hybrid logical clocks.
//! - [`traits`] and one module per CRDT: [`gcounter`], [`pncounter`], [`lww`], [`orset`].
//!   Mutators return deltas; `merge` is the lattice join.
//! - [`value`]: the JSON-compatible values registers and sets hold.
//! - [`document`]: named CRDT fields, a version vector, a bounded delta log, buffering of
//!   out-of-order deltas, and the amnesia guard. A replica's consecutive writes to one
//!   counter or register are one delta, a run standing for all their dots
//!   ([`Delta::run`]), in the log, on the wire, in storage and when applied.
//! - [`codec`]: the tagged, versioned binary encoding (postcard inside).
//! - [`hash`]: stable hashes for Merkle trees and the ring.
//! - [`docset`]: the document-set Merkle tree (`document id -> version digest`) relays
//!   compare for anti-entropy.
//! - [`sort`]: one stable sort shared by every element type (wasm code size).
//! - [`sorted`]: sorted-vector maps and sets for the small collections (wasm code size).
//! - [`indexed`]: the dense, insertion-ordered hash map that holds OR-Set elements.
//! - [`ring`]: consistent hashing with virtual nodes: which relays own a document.
//! - [`admit`]: what a relay admits from a client: document bounds, value checks, ids.
//! - [`coordinator`]: one relay node's write and read quorums as a state machine fed
//!   events, returning actions; the relay executes them, the cluster simulator drives it.
//! - [`cluster`]: the relay cluster's decisions without I/O: failure detection, sloppy
//!   quorum targets and ack counting, hinted handoff, anti-entropy planning.

pub mod admit;
pub mod cluster;
pub mod codec;
pub mod coordinator;
pub mod docset;
pub mod document;
pub mod gcounter;
pub mod hash;
pub mod hlc;
pub mod id;
pub mod indexed;
pub mod lww;
pub mod merkle;
mod onevec;
pub mod orset;
pub mod pncounter;
pub mod ring;
pub mod sort;
pub mod sorted;
pub mod sync;
pub mod traits;
pub mod value;
pub mod vv;

pub use cluster::{FailureDetector, Health, HintQueue, Target, WriteQuorum};
pub use codec::DecodeError;
pub use docset::{DocSet, DocSetDiff};
pub use document::{Delta, DeltaBody, DocConfig, DocError, Document, Field, Kind};
pub use gcounter::GCounter;
pub use hlc::{Hlc, Timestamp};
pub use id::{Dot, ReplicaId, Span};
pub use lww::LwwRegister;
pub use orset::OrSet;
pub use pncounter::PnCounter;
pub use ring::{Ring, RingNode};
pub use traits::{Crdt, InvalidState};
pub use value::Value;
pub use vv::{CausalContext, Causality, VersionVector};
