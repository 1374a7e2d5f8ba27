//! The baseline: a minimal tokio-tungstenite broadcast server, no CRDT, no storage.
//!
//! It speaks just enough of the protocol for the load client: it answers `Hello` with a
//! `Hello` and `Subscribe` with an empty `Synced` (looking only at the tag byte, and
//! decoding subscriptions only), and forwards every `Deltas` frame, bytes untouched, to
//! every other member of the connection's rooms. Like the relay it has one bounded
//! queue and one writer task per connection and disconnects a consumer whose queue is
//! full with 1013; unlike the relay its writer flushes once per burst of queued frames
//! (feed, feed, ..., flush) — the plain way to write a broadcast server.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use concord_core::sync::msg::{tag, Hello, Synced, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use concord_core::sync::Msg;
use concord_core::{ReplicaId, VersionVector};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Bytes, Message};

/// Per-connection send queue, as the relay's default `limits.send_queue`.
pub const SEND_QUEUE: usize = 256;

/// The WebSocket buffer size the relay uses too (`server.rs`), so memory compares fairly.
pub const WS_BUFFER: usize = 16 * 1024;

/// WebSocket settings with `buffer`-byte read and write buffers.
pub fn ws_config_with(buffer: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(256 * 1024))
        .max_frame_size(Some(256 * 1024))
        .read_buffer_size(buffer)
        .write_buffer_size(buffer)
}

/// The relay's WebSocket settings.
pub fn ws_config() -> WebSocketConfig {
    ws_config_with(WS_BUFFER)
}

#[derive(Default)]
struct Slow {
    flag: AtomicBool,
    reader: Notify,
    writer: Notify,
}

impl Slow {
    fn trip(&self) {
        if !self.flag.swap(true, Ordering::AcqRel) {
            self.reader.notify_one();
            self.writer.notify_one();
        }
    }
}

struct Member {
    id: u64,
    tx: mpsc::Sender<Message>,
    slow: Arc<Slow>,
}

#[derive(Default)]
struct Room {
    members: RwLock<Vec<Member>>,
}

#[derive(Default)]
struct Server {
    rooms: Mutex<HashMap<String, Arc<Room>>>,
    next_id: AtomicU64,
}

/// Serves `listener` forever with `buffer`-byte WebSocket buffers. With `flush_each`,
/// writers flush after every frame (as the relay's writer does) instead of once per
/// burst.
pub async fn serve(listener: TcpListener, flush_each: bool, buffer: usize) -> std::io::Result<()> {
    let server = Arc::new(Server::default());
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("baseline: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let server = server.clone();
        tokio::spawn(async move { connection(stream, server, flush_each, buffer).await });
    }
}

async fn connection(stream: TcpStream, server: Arc<Server>, flush_each: bool, buffer: usize) {
    let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(ws_config_with(buffer))).await
    else {
        return;
    };
    let id = server.next_id.fetch_add(1, Ordering::Relaxed);
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Message>(SEND_QUEUE);
    let slow = Arc::new(Slow::default());
    let writer_slow = slow.clone();
    let writer = tokio::spawn(async move {
        loop {
            let first = tokio::select! {
                biased;
                _ = writer_slow.writer.notified() => {
                    let close = CloseFrame { code: CloseCode::from(1013), reason: "slow consumer, resync".into() };
                    // The socket may be gone already; either way this connection ends.
                    if sink.send(Message::Close(Some(close))).await.is_err() {
                        return;
                    }
                    return;
                }
                m = rx.recv() => m,
            };
            let Some(first) = first else { return };
            if flush_each {
                if sink.send(first).await.is_err() {
                    return;
                }
                continue;
            }
            if sink.feed(first).await.is_err() {
                return;
            }
            while let Ok(m) = rx.try_recv() {
                if sink.feed(m).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });

    let hello = Msg::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        min_protocol: MIN_PROTOCOL_VERSION,
        replica: ReplicaId(1),
        token: None,
    })
    .encode();
    let mut rooms: Vec<Arc<Room>> = Vec::new();
    loop {
        let msg = tokio::select! {
            _ = slow.reader.notified() => break,
            m = stream.next() => m,
        };
        let Some(Ok(msg)) = msg else { break };
        let frame = match msg {
            Message::Binary(b) => b,
            Message::Close(_) => break,
            _ => continue,
        };
        match frame.first().copied() {
            Some(tag::HELLO) => {
                // The first frame of an empty queue: it fails only if the writer is gone.
                let sent = tx.try_send(Message::Binary(Bytes::from(hello.clone())));
                if sent.is_err() {
                    break;
                }
            }
            Some(tag::SUBSCRIBE) => {
                let Ok(Msg::Subscribe(s)) = Msg::decode(&frame) else { continue };
                let room = {
                    let mut all = server.rooms.lock().unwrap_or_else(|p| p.into_inner());
                    all.entry(s.doc.clone()).or_default().clone()
                };
                if !rooms.iter().any(|r| Arc::ptr_eq(r, &room)) {
                    room.members.write().unwrap_or_else(|p| p.into_inner()).push(Member {
                        id,
                        tx: tx.clone(),
                        slow: slow.clone(),
                    });
                    rooms.push(room);
                }
                let synced = Msg::Synced(Synced { doc: s.doc, vv: VersionVector::default() }).encode();
                if tx.try_send(Message::Binary(Bytes::from(synced))).is_err() {
                    // Full or gone: the same slow-consumer close as for deltas.
                    slow.trip();
                    break;
                }
            }
            Some(tag::DELTAS) => {
                for room in &rooms {
                    let members = room.members.read().unwrap_or_else(|p| p.into_inner());
                    for m in members.iter().filter(|m| m.id != id) {
                        if m.tx.try_send(Message::Binary(frame.clone())).is_err() {
                            m.slow.trip();
                        }
                    }
                }
            }
            _ => {}
        }
    }
    for room in &rooms {
        room.members.write().unwrap_or_else(|p| p.into_inner()).retain(|m| m.id != id);
    }
    drop(tx);
    if !slow.flag.load(Ordering::Acquire) {
        writer.abort();
    } else {
        let _ = writer.await;
    }
}
