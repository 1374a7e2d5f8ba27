//! One WebSocket connection: a reader loop, a writer task, and the bounds between them.
//!
//! ```text
//!            ┌──────────── reader loop (this task) ────────────┐
//! socket ──> │ size limit (tungstenite) → rate limit → Handler │
//!            │ idle deadline · shutdown · slow-consumer signal │
//!            └─────────────────────────────────────────────────┘
//!                 Outbox ──(bounded mpsc, try_send)──┐
//!            ┌──────────── writer task ──────────────▼─────────┐
//! socket <── │ frames · pings every ping_interval · Close      │
//!            └─────────────────────────────────────────────────┘
//! ```
//!
//! Every way out goes through one place: the reader decides a [`CloseReason`], the
//! writer sends what is already queued (except to a slow consumer), an optional last
//! frame (e.g. the protocol's rate-limit error), then the Close frame; the socket is half-closed and drained briefly so the client reads
//! the Close instead of a reset, and the handler's `on_close` runs exactly once.
//! Model: y-sweet's `server.rs` (bounded channel, ping every 20 s, close after 40 s).

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, timeout, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::config::Limits;
use crate::handler::{close_code, CloseReason, ConnInfo, Handler, Outbox, Overflow};
use crate::http::Prefixed;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// How long the writer may take to send the Close frame.
const CLOSE_SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a closed socket is drained so the peer reads our Close, not a reset.
const LINGER: Duration = Duration::from_secs(1);

type Ws<S> = WebSocketStream<Prefixed<S>>;

/// The reader's decision, handed to the writer.
struct Closing {
    reason: CloseReason,
    /// Sent after the queued frames, before the Close.
    last_frame: Option<Vec<u8>>,
    /// Send what is already queued first (e.g. the protocol error a handler queued
    /// before returning `Err`). Not for slow consumers: they could not take it.
    drain: bool,
}

impl From<CloseReason> for Closing {
    fn from(reason: CloseReason) -> Closing {
        let drain = reason != CloseReason::slow_consumer();
        Closing { reason, last_frame: None, drain }
    }
}

/// Token bucket: `rate` tokens per second, at most `burst` saved up.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(rate: u32, burst: u32, now: Instant) -> TokenBucket {
        TokenBucket { tokens: f64::from(burst), rate: f64::from(rate), burst: f64::from(burst), last: now }
    }

    /// Takes one token if there is one.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Runs one established WebSocket connection to its end.
pub(crate) async fn serve<S, H>(
    ws: Ws<S>,
    info: ConnInfo,
    handler: Arc<H>,
    limits: Limits,
    metrics: Arc<Metrics>,
    mut shutdown: Shutdown,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let peer = info.peer;
    metrics.connections_total.inc();
    metrics.connections_open.inc();
    tracing::debug!(%peer, "websocket open");

    let (sink, mut stream) = ws.split();
    let (tx, rx) = mpsc::channel(limits.send_queue);
    let overflow = Arc::new(Overflow::default());
    let outbox = Outbox::new(tx, overflow.clone(), limits.max_frame_bytes);
    let (close_tx, close_rx) = oneshot::channel();
    let mut writer = tokio::spawn(write_loop(sink, rx, close_rx, limits.ping_interval(), metrics.clone()));
    let mut writer_done = false;

    let mut conn = handler.open(info, outbox);
    let mut bucket =
        TokenBucket::new(limits.rate_limit_msgs_per_sec, limits.rate_limit_burst, Instant::now());
    let idle = limits.idle_timeout();
    let mut deadline = Instant::now() + idle;
    // Until the first binary message (the protocol's `Hello`) a connection has done
    // nothing but hold a permit; it gets a shorter deadline than an idle client.
    let mut hello_deadline = Some(Instant::now() + limits.hello_timeout());

    let closing: Option<Closing> = loop {
        tokio::select! {
            biased;
            _ = shutdown.recv() => break Some(CloseReason::going_away("server shutting down").into()),
            _ = overflow.notify.notified() => {
                metrics.error("slow_consumer");
                break Some(CloseReason::slow_consumer().into());
            }
            _ = &mut writer, if !writer_done => {
                // The socket failed under the writer: nothing more can be sent.
                writer_done = true;
                break None;
            }
            msg = stream.next() => {
                let msg = match msg {
                    None => break None,
                    Some(Ok(msg)) => msg,
                    Some(Err(WsError::Capacity(e))) => {
                        tracing::debug!(%peer, error = %e, "oversized message");
                        metrics.error("frame_too_large");
                        break Some(CloseReason::new(
                            close_code::TOO_BIG,
                            format!("message too big (max {} bytes)", limits.max_frame_bytes),
                        ).into());
                    }
                    Some(Err(WsError::Protocol(e))) => {
                        tracing::debug!(%peer, error = %e, "websocket protocol error");
                        metrics.error("ws_protocol");
                        break Some(CloseReason::protocol("websocket protocol error").into());
                    }
                    Some(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "websocket read failed");
                        break None;
                    }
                };
                let now = Instant::now();
                deadline = now + idle;
                metrics.messages_in.inc();
                metrics.bytes_in.add(msg.len() as u64);
                // Every message costs a token, control frames included: each ping makes
                // us queue a pong, so a ping flood is as much work as a data flood.
                if !bucket.take(now) {
                    metrics.error("rate_limited");
                    break Some(Closing {
                        reason: CloseReason::policy("rate limit"),
                        last_frame: handler.rate_limited(&mut conn),
                        drain: true,
                    });
                }
                match msg {
                    Message::Binary(frame) => {
                        hello_deadline = None;
                        if let Err(reason) = handler.on_binary(&mut conn, Vec::from(frame)).await {
                            break Some(reason.into());
                        }
                    }
                    Message::Text(_) => {
                        metrics.error("text_frame");
                        break Some(
                            CloseReason::new(close_code::UNSUPPORTED, "binary frames only").into(),
                        );
                    }
                    // tungstenite answers pings and close frames itself; any traffic
                    // (pongs included) already moved the idle deadline.
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                    Message::Close(_) => {}
                }
            }
            // Last: a message already waiting counts as traffic, even after a slow handler.
            _ = sleep_until(hello_deadline.unwrap_or(deadline)), if hello_deadline.is_some_and(|h| h < deadline) => {
                metrics.error("hello_timeout");
                break Some(CloseReason::policy("no hello in time").into());
            }
            _ = sleep_until(deadline) => {
                metrics.error("idle_timeout");
                break Some(CloseReason::going_away("idle timeout").into());
            }
        }
    };

    handler.on_close(conn);
    match closing {
        Some(closing) => {
            tracing::debug!(%peer, code = closing.reason.code, reason = %closing.reason.reason, "closing");
            // The writer task may have ended already (its socket failed): nothing to close.
            if close_tx.send(closing).is_err() {
                tracing::debug!(%peer, "the writer had ended before the close");
            }
            let sink = if writer_done {
                None
            } else {
                match timeout(CLOSE_SEND_TIMEOUT, &mut writer).await {
                    Ok(Ok(sink)) => sink,
                    _ => {
                        writer.abort();
                        None
                    }
                }
            };
            if let Some(ws) = sink.and_then(|sink| stream.reunite(sink).ok()) {
                linger(ws).await;
            }
        }
        None => {
            drop(close_tx);
            if !writer_done && timeout(CLOSE_SEND_TIMEOUT, &mut writer).await.is_err() {
                writer.abort();
            }
        }
    }
    metrics.connections_open.dec();
    tracing::debug!(%peer, "websocket closed");
}

/// Half-closes the socket and reads (discarding) until the peer closes or [`LINGER`]
/// passes, so unread input does not turn our close into a reset.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(mut ws: Ws<S>) {
    let raw = ws.get_mut().get_mut();
    let _ = raw.shutdown().await;
    // On the heap: a stack array would live in every connection's task for its whole life.
    let mut buf = vec![0u8; 8192];
    let _ = timeout(LINGER, async {
        while let Ok(n) = raw.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// Sends queued frames and pings until told to close. Returns the sink when it closed
/// cleanly (so the socket can be drained), `None` when the socket failed.
async fn write_loop<S: AsyncRead + AsyncWrite + Unpin>(
    mut sink: SplitSink<Ws<S>, Message>,
    mut rx: mpsc::Receiver<Vec<u8>>,
    mut close_rx: oneshot::Receiver<Closing>,
    ping_interval: Duration,
    metrics: Arc<Metrics>,
) -> Option<SplitSink<Ws<S>, Message>> {
    let mut ping = tokio::time::interval_at(Instant::now() + ping_interval, ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut queue_open = true;
    loop {
        tokio::select! {
            biased;
            closing = &mut close_rx => {
                // Without a decision (sender dropped) the peer is gone: just stop.
                let closing = closing.ok()?;
                let send = async {
                    while let (true, Ok(frame)) = (closing.drain, rx.try_recv()) {
                        let len = frame.len() as u64;
                        sink.send(Message::Binary(frame.into())).await?;
                        metrics.messages_out.inc();
                        metrics.bytes_out.add(len);
                    }
                    if let Some(frame) = closing.last_frame {
                        sink.send(Message::Binary(frame.into())).await?;
                        metrics.messages_out.inc();
                    }
                    sink.send(Message::Close(Some(close_frame(&closing.reason)))).await
                };
                return match timeout(CLOSE_SEND_TIMEOUT, send).await {
                    Ok(Ok(())) => Some(sink),
                    _ => None,
                };
            }
            frame = rx.recv(), if queue_open => match frame {
                Some(frame) => {
                    // Queue everything already waiting, then flush once: one syscall per
                    // burst instead of one per frame (fan-out sends bursts).
                    let mut next = Some(frame);
                    let mut n = 0;
                    while let Some(frame) = next {
                        let len = frame.len() as u64;
                        sink.feed(Message::Binary(frame.into())).await.ok()?;
                        metrics.messages_out.inc();
                        metrics.bytes_out.add(len);
                        n += 1;
                        next = if n < 256 { rx.try_recv().ok() } else { None };
                    }
                    sink.flush().await.ok()?;
                }
                // Every outbox is gone; keep pinging until the reader decides.
                None => queue_open = false,
            },
            _ = ping.tick() => {
                sink.send(Message::Ping(Bytes::new())).await.ok()?;
            }
        }
    }
}

fn close_frame(reason: &CloseReason) -> CloseFrame {
    // A close frame's payload is at most 125 bytes: 2 for the code, 123 for the reason.
    let mut text = reason.reason.to_string();
    if text.len() > 123 {
        let mut cut = 123;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    CloseFrame { code: CloseCode::from(reason.code), reason: text.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 3, t0);
        assert!(b.take(t0) && b.take(t0) && b.take(t0));
        assert!(!b.take(t0));
        assert!(b.take(t0 + Duration::from_millis(100)));
        assert!(!b.take(t0 + Duration::from_millis(100)));
        // Idle time refills only up to the burst.
        let later = t0 + Duration::from_secs(60);
        assert!((0..3).all(|_| b.take(later)));
        assert!(!b.take(later));
    }

    #[test]
    fn close_reasons_are_truncated_to_fit_a_frame() {
        let long = CloseReason::policy("é".repeat(100));
        let f = close_frame(&long);
        assert!(f.reason.len() <= 123);
        assert_eq!(u16::from(f.code), 1008);
    }
}
