//! Bad input against the real binary: each case gets a typed `Error` (and a close where it
//! must), other connections keep working, and nothing of a rejected message is persisted.

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{raw_ws, tempdir, Client, Relay};
use concord_core::sync::msg::{Deltas, Hello};
use concord_core::sync::{ErrorCode, Msg};
use concord_core::{Delta, Document, Dot, ReplicaId};
use concord_relay::auth::{self, Access, Claims};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(15);
const SECRET: &str = "test-secret-of-some-length";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn token(pattern: &str, access: Access, expires_at: u64) -> String {
    auth::sign(SECRET.as_bytes(), &Claims::new(pattern, access, expires_at).unwrap()).unwrap()
}

fn write_config(dir: &Path, extra: &str) -> String {
    let path = dir.join("relay.toml");
    let text = format!(
        "node_id = \"a\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n{extra}\n",
        dir.join("data").display()
    );
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn has_error(c: &Client, code: ErrorCode) -> bool {
    c.errors.iter().any(|e| e.code == code)
}

/// A healthy client on another document, to show the relay keeps serving.
async fn bystander(relay: &Relay, token: Option<String>) -> Client {
    let mut b = Client::new(500);
    b.open("other").await;
    b.connect(relay.addr, token).await;
    assert!(b.pump_until(T, |c| c.synced.contains("other")).await);
    b
}

async fn bystander_still_served(b: &mut Client) {
    b.increment("other", "n", 1).await;
    assert!(b.pump_until(T, |c| c.all_acked("other")).await, "the relay stopped serving others");
}

#[tokio::test]
async fn garbage_truncated_and_unknown_tag_frames_get_typed_errors_and_the_connection_survives() {
    let dir = tempdir("garbage");
    let relay = Relay::start(&dir, &[]);
    let mut other = bystander(&relay, None).await;
    let mut c = Client::new(1);
    c.open("doc").await;
    c.connect(relay.addr, None).await;
    assert!(c.pump_until(T, |c| c.synced.contains("doc")).await);

    c.send_raw(vec![0xde, 0xad, 0xbe, 0xef, 0x00, 0x01]).await; // an unknown tag
    assert!(c.pump_until(T, |c| has_error(c, ErrorCode::UNKNOWN_TAG)).await);
    let mut d = Document::new(ReplicaId(1));
    let delta = d.increment("n", 1).unwrap();
    let frame = Msg::Deltas(Deltas { doc: "doc".into(), deltas: vec![delta] }).encode();
    c.send_raw(frame[..frame.len() - 3].to_vec()).await; // truncated
    assert!(c.pump_until(T, |c| has_error(c, ErrorCode::BAD_FRAME)).await);
    c.send_raw(vec![0x03, 0xff, 0xff, 0xff]).await; // garbage body
    c.send_raw(vec![]).await; // empty
    assert!(
        c.pump_until(T, |c| c.errors.iter().filter(|e| e.code == ErrorCode::BAD_FRAME).count() >= 2).await
    );

    // Still usable: a real write is applied and acked; nothing of the rejects landed.
    c.increment("doc", "n", 1).await;
    assert!(c.pump_until(T, |c| c.all_acked("doc")).await);
    let mut r = Client::new(77);
    r.open("doc").await;
    r.connect(relay.addr, None).await;
    assert!(r.pump_until(T, |c| c.synced.contains("doc")).await);
    assert_eq!(r.docs["doc"].counter("n"), 1);
    bystander_still_served(&mut other).await;
}

#[tokio::test]
async fn an_invalid_delta_is_rejected_and_nothing_of_it_is_persisted() {
    let dir = tempdir("invalid");
    let relay = Relay::start(&dir, &[]);
    let mut c = Client::new(1);
    c.open("doc").await;
    c.connect(relay.addr, None).await;
    assert!(c.pump_until(T, |c| c.synced.contains("doc")).await);
    // A delta with sequence 0 breaks an invariant.
    let mut d = Document::new(ReplicaId(1));
    let good = d.increment("n", 5).unwrap();
    let bad = Delta::new(Dot::new(good.dot.replica, 0), good.key.clone(), good.payload.clone());
    c.send_raw(Msg::Deltas(Deltas { doc: "doc".into(), deltas: vec![bad] }).encode()).await;
    assert!(c.pump_until(T, |c| has_error(c, ErrorCode::INVALID)).await);
    let mut r = Client::new(77);
    r.open("doc").await;
    r.connect(relay.addr, None).await;
    assert!(r.pump_until(T, |c| c.synced.contains("doc")).await);
    assert_eq!(r.docs["doc"].counter("n"), 0);
}

#[tokio::test]
async fn a_wrong_protocol_version_gets_an_error_naming_both_versions_and_a_close() {
    let dir = tempdir("version");
    let relay = Relay::start(&dir, &[]);
    let mut other = bystander(&relay, None).await;
    let mut c = Client::new(1);
    c.ws = Some(raw_ws(relay.addr).await);
    let hello = Hello { protocol: 99, min_protocol: 90, replica: ReplicaId(1), token: None };
    c.send_raw(Msg::Hello(hello).encode()).await;
    assert!(c.pump_until(T, |c| has_error(c, ErrorCode::VERSION) && c.closed.is_some()).await);
    let e = c.errors.iter().find(|e| e.code == ErrorCode::VERSION).unwrap();
    let ours = concord_core::sync::PROTOCOL_VERSION.to_string();
    assert!(e.message.contains("99") && e.message.contains(&ours), "{}", e.message);
    bystander_still_served(&mut other).await;
}

#[tokio::test]
async fn an_oversized_frame_closes_with_a_reason() {
    let dir = tempdir("oversized");
    let cfg = write_config(&dir, "[limits]\nmax_frame_bytes = 4096\n");
    let relay = Relay::start(&dir, &["--config", &cfg]);
    let mut other = bystander(&relay, None).await;
    let mut ws = raw_ws(relay.addr).await;
    ws.send(Message::Binary(vec![0x03; 10_000].into())).await.unwrap();
    let mut close = None;
    while let Ok(Some(m)) = tokio::time::timeout(T, ws.next()).await {
        match m {
            Ok(Message::Close(f)) => {
                close = f;
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let f = close.expect("a close frame");
    assert_eq!(u16::from(f.code), 1009);
    bystander_still_served(&mut other).await;
}

#[tokio::test]
async fn forged_expired_and_missing_tokens_are_unauthorized_and_closed() {
    let dir = tempdir("tokens");
    let cfg = write_config(&dir, &format!("auth_secret = \"{SECRET}\""));
    let relay = Relay::start(&dir, &["--config", &cfg]);
    let mut other = bystander(&relay, Some(token("other", Access::ReadWrite, now() + 3600))).await;
    let forged =
        auth::sign(b"not-the-secret", &Claims::new("doc", Access::ReadWrite, now() + 3600).unwrap()).unwrap();
    let expired = token("doc", Access::ReadWrite, now() - 10);
    for tok in [Some(forged), Some(expired), None, Some("garbage".to_string())] {
        let mut c = Client::new(1);
        c.open("doc").await;
        c.connect(relay.addr, tok.clone()).await;
        assert!(
            c.pump_until(T, |c| has_error(c, ErrorCode::UNAUTHORIZED) && c.closed.is_some()).await,
            "token {tok:?}: errors {:?}",
            c.errors
        );
        assert!(!c.synced.contains("doc"));
    }
    bystander_still_served(&mut other).await;
}

#[tokio::test]
async fn a_read_only_token_cannot_write_but_its_other_documents_keep_working() {
    let dir = tempdir("readonly");
    let cfg = write_config(&dir, &format!("auth_secret = \"{SECRET}\""));
    let relay = Relay::start(&dir, &["--config", &cfg]);
    // Writer seeds both documents.
    let mut w = Client::new(2);
    w.open("board-1").await;
    w.open("notes-1").await;
    w.connect(relay.addr, Some(token("*", Access::ReadWrite, now() + 3600))).await;
    w.increment("board-1", "n", 3).await;
    w.increment("notes-1", "n", 4).await;
    assert!(w.pump_until(T, |c| c.all_acked("board-1") && c.all_acked("notes-1")).await);

    let mut c = Client::new(1);
    c.open("board-1").await;
    c.open("notes-1").await;
    let tok = token("board-*", Access::Read, now() + 3600);
    c.connect(relay.addr, Some(tok)).await;
    assert!(c.pump_until(T, |c| c.synced.contains("board-1")).await);
    assert_eq!(c.docs["board-1"].counter("n"), 3);
    // Not covered by the token at all.
    assert!(c.pump_until(T, |c| has_error(c, ErrorCode::FORBIDDEN)).await);
    assert!(!c.synced.contains("notes-1"));
    // A write is refused with a typed error...
    c.errors.clear();
    c.increment("board-1", "n", 100).await;
    assert!(c.pump_until(T, |c| has_error(c, ErrorCode::FORBIDDEN)).await);
    // ...and reading keeps working: the writer's next change still arrives.
    w.increment("board-1", "n", 1).await;
    assert!(c.pump_until(T, |c| c.docs["board-1"].counter("n") == 104).await);
    assert!(w.pump_until(T, |c| c.all_acked("board-1")).await);
    w.pump_for(Duration::from_millis(200)).await;
    assert_eq!(w.docs["board-1"].counter("n"), 4, "the read-only write reached the relay");
}

#[tokio::test]
async fn a_flood_beyond_the_rate_limit_gets_an_error_and_a_close() {
    let dir = tempdir("flood");
    let cfg = write_config(&dir, "[limits]\nrate_limit_msgs_per_sec = 20\nrate_limit_burst = 40\n");
    let relay = Relay::start(&dir, &["--config", &cfg]);
    let mut other = bystander(&relay, None).await;
    let mut c = Client::new(1);
    c.open("doc").await;
    c.connect(relay.addr, None).await;
    assert!(c.pump_until(T, |c| c.synced.contains("doc")).await);
    for _ in 0..200 {
        c.increment("doc", "n", 1).await;
    }
    let ok = c.pump_until(T, |c| has_error(c, ErrorCode::RATE_LIMITED) && c.closed.is_some()).await;
    assert!(ok, "errors {:?} closed {:?}", c.errors, c.closed);
    bystander_still_served(&mut other).await;
}

/// Sends raw request bytes; returns the status code (0 if there was no answer).
async fn raw_status(addr: std::net::SocketAddr, request: &[u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(buf.get(9..12).unwrap_or_default()).parse().unwrap_or(0)
}

#[tokio::test]
async fn broken_percent_sequences_in_cluster_queries_get_a_400_and_the_relay_keeps_serving() {
    let dir = tempdir("percent");
    let relay = Relay::start(&dir, &[]);
    let mut b = bystander(&relay, None).await;
    for doc in ["%aé", "%a", "%", "%zz", "%ff", "%C3", "a%2", "%e9%"] {
        let request = format!("GET /cluster/owners?doc={doc} HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(raw_status(relay.admin, request.as_bytes()).await, 400, "admin: {doc}");
        assert_eq!(raw_status(relay.addr, request.as_bytes()).await, 404, "public: {doc}");
    }
    let ok = b"GET /cluster/owners?doc=caf%C3%A9+board HTTP/1.1\r\nHost: x\r\n\r\n";
    assert_eq!(raw_status(relay.admin, ok).await, 200);
    let body = common::http_json(relay.admin, "/cluster/owners?doc=caf%C3%A9+board").await;
    assert!(body.contains("\"doc\":\"café board\""), "{body}");
    assert_eq!(raw_status(relay.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await, 200);
    bystander_still_served(&mut b).await;
}

#[tokio::test]
async fn a_client_syncs_while_a_thousand_idle_sockets_are_open_and_a_silent_websocket_is_closed() {
    let dir = tempdir("idle-sockets");
    let relay = Relay::start(&dir, &[]);
    let mut idle = Vec::new();
    for i in 0..1000u32 {
        // 20 loopback addresses, 50 sockets each: under the default per-address cap.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(std::net::SocketAddr::from(([127, 0, 0, 2 + (i % 20) as u8], 0))).unwrap();
        if let Ok(s) = socket.connect(relay.addr).await {
            idle.push(s);
        }
    }
    assert!(idle.len() >= 990, "opened only {} idle sockets", idle.len());
    let mut a = Client::new(1);
    a.open("doc").await;
    tokio::time::timeout(Duration::from_secs(2), a.connect(relay.addr, None))
        .await
        .expect("connected at once");
    assert!(a.pump_until(T, |c| c.synced.contains("doc")).await);
    a.increment("doc", "n", 1).await;
    assert!(a.pump_until(T, |c| c.all_acked("doc")).await, "served while idle sockets are open");

    // A WebSocket that never says Hello is closed with 1008 after the deadline (5 s).
    let mut silent = raw_ws(relay.addr).await;
    let closed = tokio::time::timeout(Duration::from_secs(8), async {
        loop {
            match silent.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => {}
                _ => return None,
            }
        }
    })
    .await
    .expect("closed within the hello deadline");
    let frame = closed.expect("with a close frame");
    assert_eq!(u16::from(frame.code), 1008, "{frame:?}");
    drop(idle);
}
