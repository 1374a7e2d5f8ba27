//! The server over real sockets on 127.0.0.1:0, with an echo handler.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use concord_relay::config::{Config, Limits, Overrides};
use concord_relay::handler::{CloseReason, ConnInfo, Handler, HealthInfo, Outbox, SendError};
use concord_relay::metrics::Metrics;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Echoes frames; `flood` floods the outbox until it is full.
#[derive(Default)]
struct Echo {
    open: AtomicU64,
    closed: AtomicU64,
    flushed: AtomicBool,
}

impl Handler for Echo {
    type Conn = Outbox;

    fn open(&self, _info: ConnInfo, out: Outbox) -> Outbox {
        self.open.fetch_add(1, Ordering::SeqCst);
        out
    }

    async fn on_binary(&self, out: &mut Outbox, frame: Vec<u8>) -> Result<(), CloseReason> {
        if frame == b"flood" {
            for _ in 0..100_000 {
                match out.send(vec![7; 1024]) {
                    Ok(()) => {}
                    Err(SendError::Full) => return Ok(()),
                    Err(e) => return Err(CloseReason::internal(e.to_string())),
                }
            }
            return Ok(());
        }
        if frame == b"fail" {
            return Err(CloseReason::policy("handler says no"));
        }
        out.send(frame).map_err(|e| CloseReason::internal(e.to_string()))
    }

    fn on_close(&self, _out: Outbox) {
        self.closed.fetch_add(1, Ordering::SeqCst);
    }

    fn rate_limited(&self, _out: &mut Outbox) -> Option<Vec<u8>> {
        Some(b"rate limited".to_vec())
    }

    fn health(&self) -> HealthInfo {
        HealthInfo { documents_loaded: 7, extra: vec![("pending_hints".into(), 2)] }
    }

    async fn flush(&self) {
        self.flushed.store(true, Ordering::SeqCst);
    }

    fn http_get(&self, path: &str, _query: Option<&str>) -> Option<(u16, &'static str, Vec<u8>)> {
        (path == "/cluster").then(|| (200, "application/json", b"{\"node\":\"test-node\"}".to_vec()))
    }

    fn admin_allowed(&self, credential: &str) -> bool {
        credential == ADMIN_CREDENTIAL
    }
}

/// The one credential the test handler accepts for admin routes.
const ADMIN_CREDENTIAL: &str = "let-me-in";

struct TestServer {
    addr: SocketAddr,
    admin: SocketAddr,
    handler: Arc<Echo>,
    metrics: Arc<Metrics>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl TestServer {
    async fn start(limits: Limits, web_root: Option<PathBuf>) -> TestServer {
        let mut config = Config::from_overrides(&Overrides {
            listen: Some("127.0.0.1:0".into()),
            admin_listen: None,
            data_dir: Some(std::env::temp_dir().join("concord-unused")),
            node_id: Some("test-node".into()),
        })
        .unwrap();
        config.limits = limits;
        config.web_root = web_root;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = admin_listener.local_addr().unwrap();
        let handler = Arc::new(Echo::default());
        let metrics = Arc::new(Metrics::new());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn({
            let handler = handler.clone();
            let metrics = metrics.clone();
            async move {
                let (admin_stop, admin_stopped) = oneshot::channel::<()>();
                let admin_task = tokio::spawn({
                    let (config, handler, metrics) = (config.clone(), handler.clone(), metrics.clone());
                    async move {
                        concord_relay::server::run_admin(admin_listener, &config, handler, metrics, async {
                            let _ = admin_stopped.await;
                        })
                        .await;
                    }
                });
                concord_relay::server::run(listener, &config, handler, metrics, async {
                    let _ = stopped.await;
                })
                .await;
                let _ = admin_stop.send(());
                admin_task.await.expect("admin listener task");
            }
        });
        TestServer { addr, admin, handler, metrics, stop: Some(stop), task }
    }

    async fn ws(&self) -> Client {
        let url = format!("ws://{}/sync", self.addr);
        timeout(Duration::from_secs(5), connect_async(url))
            .await
            .expect("handshake timed out")
            .expect("handshake failed")
            .0
    }

    async fn get(&self, path: &str) -> (u16, String, Vec<u8>) {
        http(self.addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")).await
    }

    async fn stop(mut self) -> Arc<Echo> {
        let _ = self.stop.take().unwrap().send(());
        timeout(Duration::from_secs(5), self.task).await.expect("server did not stop").unwrap();
        self.handler
    }
}

fn limits() -> Limits {
    Limits::default()
}

/// Sends a raw request; returns status, head and body.
async fn http(addr: SocketAddr, request: &str) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.expect("response timed out").unwrap();
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").expect("no head") + 4;
    let head = String::from_utf8(buf[..end].to_vec()).unwrap();
    let status = head[9..12].parse().unwrap();
    (status, head, buf[end..].to_vec())
}

/// Reads until the server's Close, completes the closing handshake and drops the
/// socket (as a browser does); returns the binary frames seen before the Close.
async fn until_close(mut ws: Client) -> (Vec<Vec<u8>>, CloseFrame) {
    let mut frames = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next()).await.expect("no close within 5 s");
        match msg {
            Some(Ok(Message::Binary(b))) => frames.push(b.to_vec()),
            Some(Ok(Message::Close(Some(frame)))) => {
                // Finish the closing handshake like a browser: reply, then read to EOF.
                while let Ok(Some(_)) = tokio::time::timeout_at(deadline, ws.next()).await {}
                return (frames, frame);
            }
            Some(Ok(_)) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

fn code(frame: &CloseFrame) -> u16 {
    u16::from(frame.code)
}

#[tokio::test]
async fn healthz_reports_node_and_handler_facts() {
    let server = TestServer::start(limits(), None).await;
    let _ws = server.ws().await;
    let (status, head, body) = server.get("/healthz").await;
    assert_eq!(status, 200);
    assert!(head.contains("Content-Type: application/json"), "{head}");
    let body = String::from_utf8(body).unwrap();
    assert!(body.starts_with("{\"node_id\":\"test-node\",\"uptime_secs\":"), "{body}");
    assert!(body.contains("\"documents_loaded\":7"), "{body}");
    assert!(body.contains("\"connections\":1"), "{body}");
    assert!(body.ends_with(",\"pending_hints\":2}"), "{body}");
    drop(_ws);
    server.stop().await;
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let server = TestServer::start(limits(), None).await;
    let mut ws = server.ws().await;
    ws.send(Message::binary(b"hi".to_vec())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(b"hi".to_vec()));
    let (status, head, body) = http(server.admin, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status, 200);
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let text = String::from_utf8(body).unwrap();
    for line in [
        "concord_connections_total 1",
        "concord_connections_open 1",
        "concord_messages_in_total 1",
        "concord_messages_out_total 1",
        "concord_bytes_in_total 2",
        "# TYPE concord_ack_latency_seconds histogram",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }
    drop(ws);
    server.stop().await;
}

#[tokio::test]
async fn static_files_are_served_without_traversal() {
    let root = std::env::temp_dir().join(format!("concord-web-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("pkg")).unwrap();
    std::fs::write(root.join("index.html"), "<h1>board</h1>").unwrap();
    std::fs::write(root.join("pkg/app.wasm"), b"\0asm").unwrap();
    std::fs::write(root.join("pkg/app.mjs"), "export {}").unwrap();
    std::fs::write(root.parent().unwrap().join("concord-secret.txt"), "secret").unwrap();
    let server = TestServer::start(limits(), Some(root.clone())).await;

    let (status, head, body) = server.get("/").await;
    assert_eq!((status, body.as_slice()), (200, &b"<h1>board</h1>"[..]));
    assert!(head.contains("Content-Type: text/html"), "{head}");
    let (status, head, body) = server.get("/pkg/app.wasm").await;
    assert_eq!((status, body.as_slice()), (200, &b"\0asm"[..]));
    assert!(head.contains("Content-Type: application/wasm"), "{head}");
    let (_, head, _) = server.get("/pkg/app.mjs?v=1").await;
    assert!(head.contains("Content-Type: text/javascript"), "{head}");

    for bad in [
        "/../concord-secret.txt",
        "/pkg/../../concord-secret.txt",
        "/%2e%2e/concord-secret.txt",
        "/..%2fconcord-secret.txt",
    ] {
        let (status, _, body) = server.get(bad).await;
        assert_eq!(status, 400, "{bad}");
        assert!(!String::from_utf8_lossy(&body).contains("secret"), "{bad}");
    }
    assert_eq!(server.get("/missing.js").await.0, 404);
    let (status, head, _) = server.get("/pkg").await;
    assert_eq!(status, 301);
    assert!(head.contains("Location: /pkg/\r\n"), "{head}");
    let (status, head, _) = http(server.addr, "POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
    assert_eq!(status, 405);
    assert!(head.contains("Allow: GET, HEAD"));
    let (status, head, body) = http(server.addr, "HEAD / HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, 200);
    assert!(head.contains("Content-Length: 14"), "{head}");
    assert!(body.is_empty());
    assert_eq!(http(server.addr, "NONSENSE\r\n\r\n").await.0, 400, "garbage gets a 400");

    server.stop().await;
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test]
async fn without_web_root_only_the_api_exists() {
    let server = TestServer::start(limits(), None).await;
    assert_eq!(server.get("/").await.0, 404);
    let (status, head, _) = server.get("/sync").await;
    assert_eq!(status, 426, "a plain GET of /sync is told to upgrade");
    assert!(head.contains("Upgrade: websocket"));
    server.stop().await;
}

#[tokio::test]
async fn websocket_echoes_binary_frames() {
    let server = TestServer::start(limits(), None).await;
    let mut ws = server.ws().await;
    for i in 0..10u8 {
        let frame = vec![i; 1000 * usize::from(i)];
        ws.send(Message::binary(frame.clone())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(frame));
    }
    ws.close(None).await.unwrap();
    while ws.next().await.is_some() {}
    let handler = server.stop().await;
    assert_eq!(handler.open.load(Ordering::SeqCst), 1);
    assert_eq!(handler.closed.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn oversized_frames_close_the_connection() {
    let server = TestServer::start(Limits { max_frame_bytes: 1024, ..limits() }, None).await;
    let mut ws = server.ws().await;
    ws.send(Message::binary(vec![1; 1024])).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(vec![1; 1024]));
    ws.send(Message::binary(vec![1; 4096])).await.unwrap();
    let (_, close) = until_close(ws).await;
    assert_eq!(code(&close), 1009);
    assert!(close.reason.contains("too big"), "{close:?}");
    assert_eq!(server.metrics.errors("frame_too_large"), 1);
    server.stop().await;
}

#[tokio::test]
async fn text_frames_close_the_connection() {
    let server = TestServer::start(limits(), None).await;
    let mut ws = server.ws().await;
    ws.send(Message::text("hello")).await.unwrap();
    let (_, close) = until_close(ws).await;
    assert_eq!(code(&close), 1003);
    assert_eq!(close.reason.as_str(), "binary frames only");
    server.stop().await;
}

#[tokio::test]
async fn handler_errors_close_with_their_reason() {
    let server = TestServer::start(limits(), None).await;
    let mut ws = server.ws().await;
    ws.send(Message::binary(b"fail".to_vec())).await.unwrap();
    let (_, close) = until_close(ws).await;
    assert_eq!((code(&close), close.reason.as_str()), (1008, "handler says no"));
    server.stop().await;
}

#[tokio::test]
async fn slow_consumers_are_disconnected_not_dropped_silently() {
    let server = TestServer::start(Limits { send_queue: 8, ..limits() }, None).await;
    let mut ws = server.ws().await;
    ws.send(Message::binary(b"flood".to_vec())).await.unwrap();
    let (frames, close) = until_close(ws).await;
    assert_eq!(code(&close), 1013);
    assert_eq!(close.reason.as_str(), "slow consumer, resync");
    assert!(frames.len() < 100_000, "the flood was cut short");
    assert_eq!(server.metrics.errors("slow_consumer"), 1);
    // The server is fine for everyone else.
    let mut other = server.ws().await;
    other.send(Message::binary(b"ok".to_vec())).await.unwrap();
    assert_eq!(other.next().await.unwrap().unwrap(), Message::binary(b"ok".to_vec()));
    drop(other);
    server.stop().await;
}

#[tokio::test]
async fn exceeding_the_rate_limit_sends_the_handlers_error_then_closes() {
    let server =
        TestServer::start(Limits { rate_limit_msgs_per_sec: 1, rate_limit_burst: 5, ..limits() }, None).await;
    let mut ws = server.ws().await;
    for i in 0..20u8 {
        if ws.send(Message::binary(vec![i])).await.is_err() {
            break;
        }
    }
    let (frames, close) = until_close(ws).await;
    assert_eq!((code(&close), close.reason.as_str()), (1008, "rate limit"));
    assert_eq!(frames.len(), 6, "5 echoes, then the error: {frames:?}");
    assert_eq!(frames.last().unwrap(), b"rate limited");
    assert_eq!(server.metrics.errors("rate_limited"), 1);
    server.stop().await;
}

#[tokio::test]
async fn silent_clients_are_closed_after_the_idle_timeout() {
    let server =
        TestServer::start(Limits { ping_interval_secs: 1, idle_timeout_secs: 2, ..limits() }, None).await;
    let silent = server.ws().await;
    let mut lively = server.ws().await;
    // The lively client reads (and so answers pings); the silent one does not.
    let lively_task = tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(2600);
        while let Ok(msg) = tokio::time::timeout_at(deadline, lively.next()).await {
            let msg = msg.expect("open").expect("no error");
            assert!(msg.is_ping(), "a client answering pings is not closed: {msg:?}");
        }
        lively
    });
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, close) = until_close(silent).await;
    assert_eq!((code(&close), close.reason.as_str()), (1001, "idle timeout"));
    drop(lively_task.await.unwrap());
    server.stop().await;
}

#[tokio::test]
async fn connection_permits_bound_open_sockets() {
    let server = TestServer::start(Limits { max_connections: 1, ..limits() }, None).await;
    let mut first = server.ws().await;
    let url = format!("ws://{}/sync", server.addr);
    let mut second = tokio::spawn(connect_async(url));
    assert!(
        timeout(Duration::from_millis(300), &mut second).await.is_err(),
        "the second connection waits for a permit"
    );
    first.close(None).await.unwrap();
    while first.next().await.is_some() {}
    let (mut second, _) = timeout(Duration::from_secs(5), second)
        .await
        .expect("second connection admitted once the first closed")
        .unwrap()
        .unwrap();
    second.send(Message::binary(b"x".to_vec())).await.unwrap();
    assert_eq!(second.next().await.unwrap().unwrap(), Message::binary(b"x".to_vec()));
    drop(second);
    server.stop().await;
}

#[tokio::test]
async fn shutdown_closes_connections_then_flushes() {
    let server = TestServer::start(limits(), None).await;
    let mut ws = server.ws().await;
    ws.send(Message::binary(b"a".to_vec())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(b"a".to_vec()));
    let addr = server.addr;
    let reader = tokio::spawn(async move { until_close(ws).await.1 });
    let handler = server.stop().await;
    let close = reader.await.unwrap();
    assert_eq!((code(&close), close.reason.as_str()), (1001, "server shutting down"));
    assert!(handler.flushed.load(Ordering::SeqCst));
    assert_eq!(handler.closed.load(Ordering::SeqCst), 1);
    assert!(TcpStream::connect(addr).await.is_err(), "the listener is closed");
}

/// `GET path` with an optional `Authorization` header value.
async fn get_with(addr: SocketAddr, path: &str, authorization: Option<&str>) -> (u16, String, Vec<u8>) {
    let auth = authorization.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    http(addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n")).await
}

#[tokio::test]
async fn admin_routes_are_404_on_the_public_listener_without_the_right_credential() {
    let server = TestServer::start(limits(), None).await;
    for path in ["/metrics", "/cluster"] {
        for auth in [None, Some("Bearer wrong"), Some("Basic let-me-in"), Some("Bearer")] {
            let (status, _, body) = get_with(server.addr, path, auth).await;
            assert_eq!(status, 404, "{path} with {auth:?}");
            assert_eq!(body, b"not found\n", "a 404 like any unknown path: {path} with {auth:?}");
        }
        let (status, _, _) = get_with(server.addr, path, Some(&format!("Bearer {ADMIN_CREDENTIAL}"))).await;
        assert_eq!(status, 200, "{path} with the admin credential");
    }
    let (status, _, body) = get_with(server.addr, "/healthz", None).await;
    assert_eq!(status, 200, "/healthz stays open");
    assert!(String::from_utf8(body).unwrap().contains("\"node_id\":\"test-node\""));
    server.stop().await;
}

#[tokio::test]
async fn the_admin_listener_serves_admin_routes_and_nothing_else() {
    let root = std::env::temp_dir().join(format!("concord-web-admin-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("index.html"), "<h1>board</h1>").unwrap();
    let server = TestServer::start(limits(), Some(root.clone())).await;
    let (status, _, body) = get_with(server.admin, "/cluster", None).await;
    assert_eq!((status, body.as_slice()), (200, &b"{\"node\":\"test-node\"}"[..]));
    assert_eq!(get_with(server.admin, "/metrics", None).await.0, 200);
    assert_eq!(get_with(server.admin, "/healthz", None).await.0, 200);
    assert_eq!(get_with(server.admin, "/", None).await.0, 404, "no static files");
    assert_eq!(get_with(server.admin, "/index.html", None).await.0, 404, "no static files");
    assert_eq!(get_with(server.admin, "/sync", None).await.0, 404, "no WebSocket");
    let ws = connect_async(format!("ws://{}/sync", server.admin)).await;
    assert!(ws.is_err(), "no WebSocket upgrade on the admin listener");
    assert_eq!(server.get("/").await.0, 200, "the public listener still serves the page");
    server.stop().await;
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test]
async fn a_bare_lf_request_line_gets_a_400() {
    let server = TestServer::start(limits(), None).await;
    for request in [
        "GET /healthz HTTP/1.1\nHost: x\r\n\r\n",
        "GET /healthz HTTP/1.1\n\n",
        "GET /healthz HTTP/1.1\r\nHost: x\n\r\n",
    ] {
        let (status, _, body) = http(server.addr, request).await;
        assert_eq!(status, 400, "{request:?}");
        assert!(String::from_utf8_lossy(&body).contains("bare LF"), "{request:?}");
        assert_eq!(http(server.admin, request).await.0, 400, "admin listener: {request:?}");
    }
    assert_eq!(server.get("/healthz").await.0, 200, "still serving");
    server.stop().await;
}

/// A TCP socket from `ip` (any 127.0.0.0/8 address is loopback on Linux) that sends nothing.
async fn idle_socket(ip: [u8; 4], to: SocketAddr) -> Option<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    socket.bind(SocketAddr::from((ip, 0))).ok()?;
    socket.connect(to).await.ok()
}

#[tokio::test]
async fn a_client_still_connects_and_is_served_while_a_thousand_idle_sockets_are_open() {
    // Fewer permits than idle sockets: before, idle sockets held permits until their
    // head deadline, and this client would have waited behind them.
    let server = TestServer::start(Limits { max_connections: 100, ..limits() }, None).await;
    let mut idle = Vec::new();
    for i in 0..1000u32 {
        // 20 addresses, 50 sockets each: under the per-address cap, so the pending pool
        // is what bounds them.
        let ip = [127, 0, 0, 2 + (i % 20) as u8];
        if let Some(s) = idle_socket(ip, server.addr).await {
            idle.push(s);
        }
    }
    assert!(idle.len() >= 990, "opened only {} idle sockets", idle.len());
    let started = tokio::time::Instant::now();
    let mut ws = server.ws().await;
    ws.send(Message::binary(b"hello".to_vec())).await.unwrap();
    let echo = timeout(Duration::from_secs(2), ws.next()).await.expect("echo in time");
    assert_eq!(echo.unwrap().unwrap(), Message::binary(b"hello".to_vec()));
    assert!(started.elapsed() < Duration::from_secs(1), "served at once: {:?}", started.elapsed());
    assert!(server.metrics.errors("handshake_shed") > 0, "the oldest idle sockets were shed");
    drop(idle);
    drop(ws);
    server.stop().await;
}

#[tokio::test]
async fn idle_sockets_are_closed_after_the_head_deadline() {
    let server = TestServer::start(Limits { head_timeout_ms: 200, ..limits() }, None).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = timeout(Duration::from_secs(2), s.read(&mut buf)).await.expect("closed by the deadline");
    assert!(matches!(n, Ok(0) | Err(_)), "closed without an answer: {n:?}");
    assert_eq!(server.metrics.errors("head_timeout"), 1);
    server.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_per_address_cap_are_refused() {
    let server = TestServer::start(Limits { max_connections_per_ip: 2, ..limits() }, None).await;
    let a = server.ws().await;
    let b = server.ws().await;
    let refused = timeout(Duration::from_secs(5), connect_async(format!("ws://{}/sync", server.addr)))
        .await
        .expect("answered at once");
    assert!(refused.is_err(), "a third socket from 127.0.0.1 is refused");
    assert!(server.metrics.errors("per_ip_limit") >= 1);
    // Another address is not affected.
    let mut other = idle_socket([127, 0, 0, 9], server.addr).await.unwrap();
    other.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut response = Vec::new();
    other.read_to_end(&mut response).await.unwrap();
    assert!(response.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&response));
    // Closing one frees a place.
    drop(a);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if connect_async(format!("ws://{}/sync", server.addr)).await.is_ok() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the freed place was never reused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(b);
    server.stop().await;
}

#[tokio::test]
async fn a_websocket_that_never_sends_a_frame_is_closed_after_the_hello_deadline() {
    let server = TestServer::start(Limits { hello_timeout_ms: 300, ..limits() }, None).await;
    let silent = server.ws().await;
    let mut talking = server.ws().await;
    talking.send(Message::binary(b"hello".to_vec())).await.unwrap();
    assert_eq!(talking.next().await.unwrap().unwrap(), Message::binary(b"hello".to_vec()));
    let started = tokio::time::Instant::now();
    let (_, close) = until_close(silent).await;
    assert_eq!((code(&close), close.reason.as_str()), (1008, "no hello in time"));
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(server.metrics.errors("hello_timeout"), 1);
    // The client that spoke first is not subject to it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    talking.send(Message::binary(b"still here".to_vec())).await.unwrap();
    assert_eq!(talking.next().await.unwrap().unwrap(), Message::binary(b"still here".to_vec()));
    drop(talking);
    server.stop().await;
}

#[tokio::test]
async fn a_ping_flood_is_rate_limited_like_data() {
    let server =
        TestServer::start(Limits { rate_limit_msgs_per_sec: 1, rate_limit_burst: 5, ..limits() }, None).await;
    let mut ws = server.ws().await;
    for _ in 0..50 {
        if ws.send(Message::Ping(vec![1, 2, 3].into())).await.is_err() {
            break;
        }
    }
    let (_, close) = until_close(ws).await;
    assert_eq!((code(&close), close.reason.as_str()), (1008, "rate limit"));
    assert_eq!(server.metrics.errors("rate_limited"), 1);
    server.stop().await;
}
