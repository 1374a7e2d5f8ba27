//! The sans-IO sync protocol: [`msg`] (wire messages) and [`session`] (the per-peer state
//! machine). See the `session` module docs for the protocol and where it comes from.

mod batch;
pub mod msg;
pub mod session;

pub use msg::{ErrorCode, ErrorMsg, FrameError, Hello, Msg, PROTOCOL_VERSION};
pub use session::{DocStore, Event, Output, Session, SessionConfig, SyncError};
