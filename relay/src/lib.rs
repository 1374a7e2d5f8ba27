//! # concord-relay
//!
//! The relay: WebSocket server, storage, cluster.
