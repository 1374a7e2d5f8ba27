//! The seam between the server (which moves bytes) and the sync protocol (which decides
//! what they mean).
//!
//! The server owns sockets, queues, timers and limits; a [`Handler`] owns protocol state.
//! For every WebSocket connection the server calls [`Handler::open`] once, then
//! [`Handler::on_binary`] for each binary message in order, then [`Handler::on_close`]
//! exactly once, whatever ended the connection. The handler answers through the
//! connection's [`Outbox`] — immediately or later, from any task (e.g. when a write
//! quorum is reached or another client's delta must be pushed).
//!
//! ```
//! use std::net::SocketAddr;
//! use concord_relay::handler::{CloseReason, ConnInfo, Handler, HealthInfo, Outbox};
//!
//! /// Answers every frame with the same bytes.
//! struct Echo;
//!
//! impl Handler for Echo {
//!     type Conn = Outbox;
//!     fn open(&self, _info: ConnInfo, out: Outbox) -> Outbox {
//!         out
//!     }
//!     async fn on_binary(&self, out: &mut Outbox, frame: Vec<u8>) -> Result<(), CloseReason> {
//!         out.send(frame).map_err(|_| CloseReason::going_away("send queue closed"))
//!     }
//!     fn on_close(&self, _out: Outbox) {}
//!     fn health(&self) -> HealthInfo {
//!         HealthInfo::default()
//!     }
//!     fn rate_limited(&self, _out: &mut Outbox) -> Option<Vec<u8>> {
//!         None
//!     }
//!     async fn flush(&self) {}
//! }
//! ```

use std::borrow::Cow;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, Notify};

/// WebSocket close codes used by the relay (RFC 6455 §7.4.1).
pub mod close_code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The server is going away (shutdown, idle timeout).
    pub const GOING_AWAY: u16 = 1001;
    /// Protocol error.
    pub const PROTOCOL: u16 = 1002;
    /// Unsupported data (a text frame on the binary protocol).
    pub const UNSUPPORTED: u16 = 1003;
    /// Policy violation (rate limit, auth).
    pub const POLICY: u16 = 1008;
    /// Message too big.
    pub const TOO_BIG: u16 = 1009;
    /// Internal error.
    pub const INTERNAL: u16 = 1011;
    /// Try again later (slow consumer: reconnect and resync).
    pub const TRY_AGAIN: u16 = 1013;
}

/// Why the server closes a connection: a WebSocket close code and a short reason
/// (at most 123 bytes on the wire; longer reasons are truncated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    /// Close code.
    pub code: u16,
    /// Human-readable reason.
    pub reason: Cow<'static, str>,
}

impl CloseReason {
    /// Any code and reason.
    pub fn new(code: u16, reason: impl Into<Cow<'static, str>>) -> CloseReason {
        CloseReason { code, reason: reason.into() }
    }
    /// 1000: normal closure.
    pub fn normal(reason: impl Into<Cow<'static, str>>) -> CloseReason {
        CloseReason::new(close_code::NORMAL, reason)
    }
    /// 1001: going away.
    pub fn going_away(reason: impl Into<Cow<'static, str>>) -> CloseReason {
        CloseReason::new(close_code::GOING_AWAY, reason)
    }
    /// 1002: the peer broke the protocol.
    pub fn protocol(reason: impl Into<Cow<'static, str>>) -> CloseReason {
        CloseReason::new(close_code::PROTOCOL, reason)
    }
    /// 1008: policy violation (auth, rate limit).
    pub fn policy(reason: impl Into<Cow<'static, str>>) -> CloseReason {
        CloseReason::new(close_code::POLICY, reason)
    }
    /// 1011: internal error.
    pub fn internal(reason: impl Into<Cow<'static, str>>) -> CloseReason {
        CloseReason::new(close_code::INTERNAL, reason)
    }
    /// 1013: the client could not keep up; it should reconnect and resync.
    pub fn slow_consumer() -> CloseReason {
        CloseReason::new(close_code::TRY_AGAIN, "slow consumer, resync")
    }
}

/// What the server knows about a new connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The peer's address.
    pub peer: SocketAddr,
    /// The query string of the upgrade request (`/sync?token=...` gives
    /// `Some("token=...")`), undecoded.
    pub query: Option<String>,
}

/// Extra facts for `GET /healthz`. The server adds `node_id`, `uptime_secs` and
/// `connections` itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthInfo {
    /// Documents currently loaded in memory.
    pub documents_loaded: u64,
    /// Further numeric fields, rendered as extra top-level JSON keys
    /// (e.g. `("pending_hints", 3)`).
    pub extra: Vec<(String, i64)>,
}

/// Why [`Outbox::send`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The queue is full: the connection is being closed as a slow consumer
    /// (1013 "slow consumer, resync"). The frame was not queued.
    #[error("send queue full; the client is disconnected and will resync")]
    Full,
    /// The connection is closed.
    #[error("connection closed")]
    Closed,
    /// The frame exceeds `limits.max_frame_bytes`; split it (the sync protocol chunks
    /// large catch-ups).
    #[error("frame of {len} bytes exceeds the maximum of {max}; chunk it")]
    TooLarge {
        /// The frame's length.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
}

/// Shared between a connection's outboxes and its task: set when a send found the
/// queue full.
#[derive(Debug, Default)]
pub(crate) struct Overflow {
    pub(crate) flag: AtomicBool,
    pub(crate) notify: Notify,
}

/// A cloneable handle that queues binary frames on one connection's bounded send queue.
///
/// Sending never waits: when the queue is full the connection is closed with 1013
/// "slow consumer, resync" and [`SendError::Full`] is returned, so a slow client never
/// holds up the others and is never silently dropped.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Vec<u8>>,
    overflow: Arc<Overflow>,
    max_frame: usize,
}

impl Outbox {
    pub(crate) fn new(tx: mpsc::Sender<Vec<u8>>, overflow: Arc<Overflow>, max_frame: usize) -> Outbox {
        Outbox { tx, overflow, max_frame }
    }

    /// A detached outbox with its receiving end, for tests of handlers. Frames sent to
    /// it can be read from the receiver; nothing disconnects when it is full.
    pub fn for_test(capacity: usize, max_frame: usize) -> (Outbox, mpsc::Receiver<Vec<u8>>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (Outbox::new(tx, Arc::default(), max_frame), rx)
    }

    /// Queues one binary frame.
    pub fn send(&self, frame: Vec<u8>) -> Result<(), SendError> {
        if frame.len() > self.max_frame {
            return Err(SendError::TooLarge { len: frame.len(), max: self.max_frame });
        }
        match self.tx.try_send(frame) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.resync();
                Err(SendError::Full)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SendError::Closed),
        }
    }

    /// Closes the connection with 1013 "resync", as for a slow consumer: for a sender
    /// that could not deliver something the peer needs, so the peer reconnects and catches
    /// up instead of silently missing it.
    pub fn resync(&self) {
        if !self.overflow.flag.swap(true, Ordering::AcqRel) {
            self.overflow.notify.notify_one();
        }
    }

    /// True once the connection is gone (or being closed as a slow consumer).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed() || self.overflow.flag.load(Ordering::Acquire)
    }

    /// The largest frame [`Outbox::send`] accepts.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }
}

/// The protocol, plugged into the server.
///
/// Implementations may write `async fn` for the methods returning futures; the futures
/// must be `Send` because connections run on the multi-threaded runtime.
pub trait Handler: Send + Sync + 'static {
    /// Per-connection protocol state.
    type Conn: Send + 'static;

    /// A WebSocket connection was established. `out` stays valid for the connection's
    /// life; clone it to push frames from elsewhere.
    fn open(&self, info: ConnInfo, out: Outbox) -> Self::Conn;

    /// One binary message (already bounded by `limits.max_frame_bytes` and the rate
    /// limit). Messages of a connection are delivered one at a time, in order; the
    /// next is not read until this future completes, which is the connection's
    /// backpressure. Return `Err` to close the connection with that reason.
    fn on_binary(
        &self,
        conn: &mut Self::Conn,
        frame: Vec<u8>,
    ) -> impl Future<Output = Result<(), CloseReason>> + Send;

    /// The connection ended (any cause). Called exactly once per `open`.
    fn on_close(&self, conn: Self::Conn);

    /// The connection exceeded its rate limit and will be closed with 1008
    /// "rate limit". Return a frame (e.g. a protocol `Error`) to send before closing.
    fn rate_limited(&self, conn: &mut Self::Conn) -> Option<Vec<u8>>;

    /// Facts for `GET /healthz`.
    fn health(&self) -> HealthInfo;

    /// Called once at shutdown after every connection ended: persist what must be.
    fn flush(&self) -> impl Future<Output = ()> + Send;

    /// Extra admin `GET` routes (e.g. cluster introspection): `Some((status, content
    /// type, body))` to answer, `None` for a 404. Asked on the admin listener, and on the
    /// public one only for requests carrying an admin credential.
    fn http_get(&self, _path: &str, _query: Option<&str>) -> Option<(u16, &'static str, Vec<u8>)> {
        None
    }

    /// Whether `credential` (the bearer token of an HTTP request) is an admin
    /// credential, which unlocks the admin routes (`/metrics`, `/cluster*`) on the public
    /// listener. The admin listener serves them without one.
    fn admin_allowed(&self, _credential: &str) -> bool {
        false
    }
}

/// A handler that accepts connections and answers nothing: the relay's placeholder until
/// the sync protocol is plugged in. If given a storage, `flush` closes it.
#[derive(Debug, Default)]
pub struct NullHandler {
    storage: Option<crate::storage::Storage>,
}

impl NullHandler {
    /// A placeholder handler that closes `storage` on flush.
    pub fn new(storage: Option<crate::storage::Storage>) -> NullHandler {
        NullHandler { storage }
    }
}

impl Handler for NullHandler {
    type Conn = ();

    fn open(&self, _info: ConnInfo, _out: Outbox) {}

    async fn on_binary(&self, _conn: &mut (), _frame: Vec<u8>) -> Result<(), CloseReason> {
        Ok(())
    }

    fn on_close(&self, _conn: ()) {}

    fn rate_limited(&self, _conn: &mut ()) -> Option<Vec<u8>> {
        None
    }

    fn health(&self) -> HealthInfo {
        HealthInfo::default()
    }

    async fn flush(&self) {
        if let Some(storage) = &self.storage {
            storage.close().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_outbox_reports_overflow_once() {
        let (tx, mut rx) = mpsc::channel(2);
        let overflow = Arc::new(Overflow::default());
        let out = Outbox::new(tx, overflow.clone(), 10);
        out.send(vec![1]).unwrap();
        out.send(vec![2]).unwrap();
        assert!(!out.is_closed());
        assert_eq!(out.send(vec![3]), Err(SendError::Full));
        assert!(overflow.flag.load(Ordering::Acquire));
        assert!(out.is_closed());
        assert_eq!(out.send(vec![0; 11]), Err(SendError::TooLarge { len: 11, max: 10 }));
        assert_eq!(rx.try_recv().unwrap(), vec![1]);
        drop(rx);
        assert_eq!(out.send(vec![4]), Err(SendError::Closed));
    }
}
