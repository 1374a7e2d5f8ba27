//! # concord-relay
//!
//! The relay node of Concord: a tokio + tokio-tungstenite server that moves sync frames
//! between clients and stores documents durably. It decides nothing about their
//! meaning: the sans-IO sync state machine of `concord-core` does, plugged in through
//! the [`Handler`] trait.
//!
//! The modules read top to bottom along the data path:
//!
//! ```text
//! wire        http.rs        one port: request head → /sync upgrade, /healthz, /metrics, files
//!             connection.rs  one WebSocket: reader loop, bounded writer queue, pings, limits
//! session     handler.rs     the Handler trait + Outbox: where the sync protocol plugs in
//! documents   node.rs        the sync handler: concord-core sessions, rooms, persistence
//! storage     storage.rs     redb, group commit: durable before acknowledged
//! ```
//!
//! Around them: [`config`] (the TOML configuration), [`auth`] (JSON Web Tokens of three
//! kinds), [`metrics`] (Prometheus text), [`server`] (accept loop, permits, graceful
//! shutdown), [`cluster`] (peer links, hints and anti-entropy; the quorum decisions are
//! `concord_core::coordinator`). [`Relay`] is the entry: a node from its config. The
//! binary (`main.rs`) only parses flags, sets up logging and signals, and calls
//! [`Relay::run`]. [`load`] is the `concord-load` benchmark (`src/bin/concord-load.rs`).

pub mod auth;
pub mod cluster;
pub mod config;
mod connection;
pub mod handler;
pub mod http;
pub mod load;
pub mod metrics;
pub mod node;
mod relay;
pub mod server;
mod shutdown;
pub mod storage;
#[cfg(test)]
mod testutil;

pub use config::{Config, Limits, Overrides};
pub use handler::{CloseReason, ConnInfo, Handler, HealthInfo, Outbox, SendError};
pub use metrics::Metrics;
pub use relay::Relay;
pub use server::run;
pub use storage::{Storage, StorageError, WriteOp};
