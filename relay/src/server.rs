//! The accept loops: the public listener (the WebSocket upgrade at `/sync`, an open
//! `GET /healthz` and static files) and the admin listener (`/metrics`, `/cluster*` and
//! `/healthz`, nothing else).
//!
//! Admission on the public listener, in order:
//! 1. at most `limits.max_connections_per_ip` open sockets per remote address (IPv6 per
//!    /64), checked at `accept`: a socket over the cap gets a 503 and is closed;
//! 2. until its request head is read (within `limits.head_timeout_ms`) and, for an
//!    upgrade, until it gets a connection permit, a socket is *pending*: at most
//!    `limits.max_pending_handshakes` are, and a new one sheds the oldest. Idle sockets
//!    therefore never hold the permits WebSockets need;
//! 3. a WebSocket holds one of `limits.max_connections` permits for its whole life, and
//!    must send its first frame within `limits.hello_timeout_ms` (see `connection.rs`).
//!
//! Admin routes on the public listener answer only a request whose
//! `Authorization: Bearer` credential [`Handler::admin_allowed`] accepts; to anyone else
//! they are 404s, as if they did not exist.
//!
//! Shutdown (mini-redis' `server.rs`): every task selects on the shutdown signal; on
//! shutdown the public loop stops accepting, waits for every connection task to finish
//! (each sends its client a 1001 Close), then calls [`Handler::flush`].

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use crate::config::{Config, Limits};
use crate::handler::{ConnInfo, Handler};
use crate::http::{bearer, read_head, serve_static, HeadError, Prefixed, Request, Response};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// How long writing a response (or the 101 of an upgrade) may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for connection tasks before flushing anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Simultaneous connections of the admin listener; more are closed at once.
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// The path of the WebSocket endpoint.
pub const SYNC_PATH: &str = "/sync";

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listener {
    Public,
    Admin,
}

struct Shared<H> {
    handler: Arc<H>,
    metrics: Arc<Metrics>,
    node_id: String,
    web_root: Option<PathBuf>,
    limits: Limits,
    ws_config: WebSocketConfig,
    started: Instant,
    admission: Admission,
}

impl<H> Shared<H> {
    fn new(config: &Config, handler: Arc<H>, metrics: Arc<Metrics>) -> Shared<H> {
        let limits = config.limits.clone();
        let ws_config = WebSocketConfig::default()
            .max_message_size(Some(limits.max_frame_bytes))
            .max_frame_size(Some(limits.max_frame_bytes))
            .read_buffer_size(4 * 1024)
            .write_buffer_size(4 * 1024);
        Shared {
            handler,
            metrics,
            node_id: config.node_id.clone(),
            web_root: config.web_root.clone(),
            admission: Admission::new(&limits),
            limits,
            ws_config,
            started: Instant::now(),
        }
    }
}

/// Serves the public listener until `shutdown` resolves, then closes every connection,
/// waits for their tasks (at most 10 s) and calls `handler.flush()`.
///
/// Uses `config.node_id`, `config.web_root` and `config.limits`; `config.listen` is
/// ignored (the caller bound `listener`, possibly to port 0). The admin routes are
/// served here only to requests with an admin credential; see [`run_admin`].
pub async fn run<H: Handler>(
    listener: TcpListener,
    config: &Config,
    handler: Arc<H>,
    metrics: Arc<Metrics>,
    shutdown: impl Future,
) {
    let shared = Arc::new(Shared::new(config, handler.clone(), metrics));
    let (notify_shutdown, _) = watch::channel(false);
    // Every connection task holds a clone; `recv` returns `None` once all are gone.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);

    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = accept(&listener) => accepted,
        };
        let Some(ip_slot) = shared.admission.enter_ip(peer.ip()) else {
            shared.metrics.error("per_ip_limit");
            // Best effort and never waiting: the accept loop must not block on one peer.
            let _ = stream.try_write(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            continue;
        };
        let (pending, shed) = shared.admission.enter_pending();
        if shed {
            shared.metrics.error("handshake_shed");
        }
        let shared = shared.clone();
        let shutdown = Shutdown::new(notify_shutdown.subscribe());
        let done = done_tx.clone();
        tokio::spawn(async move {
            handle_tcp(stream, peer, shared, shutdown, pending).await;
            drop(ip_slot);
            drop(done);
        });
    }

    drop(listener);
    tracing::info!("shutting down: closing connections");
    // Without receivers no connection is open: nothing to tell.
    if notify_shutdown.send(true).is_err() {
        tracing::debug!("no connection to notify of shutdown");
    }
    drop(done_tx);
    if timeout(SHUTDOWN_GRACE, done_rx.recv()).await.is_err() {
        tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; flushing anyway");
    }
    handler.flush().await;
    tracing::info!("shutdown complete");
}

/// Serves the admin listener until `shutdown` resolves: `GET /metrics`, `/healthz` and
/// the handler's routes ([`Handler::http_get`], e.g. `/cluster*`) without credentials,
/// and a 404 for everything else (no WebSocket, no static files). Meant for a loopback
/// or otherwise private address (`admin_listen`).
///
/// Requests are short: one head (within `limits.head_timeout_ms`), one answer, close.
/// In-flight requests are not waited for at shutdown; [`run`] flushes the handler.
pub async fn run_admin<H: Handler>(
    listener: TcpListener,
    config: &Config,
    handler: Arc<H>,
    metrics: Arc<Metrics>,
    shutdown: impl Future,
) {
    let shared = Arc::new(Shared::new(config, handler, metrics));
    let permits = Arc::new(Semaphore::new(ADMIN_MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let (mut stream, _) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = accept(&listener) => accepted,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            shared.metrics.error("admin_busy");
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let head = timeout(shared.limits.head_timeout(), read_head(&mut stream)).await;
            if let Some((req, _)) = head_or_answer(&mut stream, &shared, head).await {
                let response = route(&req, &shared, Listener::Admin).await;
                respond(&mut stream, &shared, response, req.method == "HEAD").await;
            }
            drop(permit);
        });
    }
}

/// Accepts one connection. Accept errors (e.g. out of file descriptors) are logged and
/// retried with backoff; the server does not die of them.
async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    let mut backoff = Duration::from_millis(10);
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Bounds on sockets by address and on sockets that have not become WebSockets yet.
struct Admission {
    max_per_ip: usize,
    max_pending: usize,
    /// Keyed by remote input, so with the std (randomly seeded) hasher.
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    /// Pending sockets, oldest first; dropping a sender sheds its socket.
    pending: Arc<Mutex<PendingPool>>,
    permits: Arc<Semaphore>,
}

#[derive(Default)]
struct PendingPool {
    next: u64,
    slots: BTreeMap<u64, oneshot::Sender<()>>,
}

impl Admission {
    fn new(limits: &Limits) -> Admission {
        Admission {
            max_per_ip: limits.max_connections_per_ip,
            max_pending: limits.max_pending_handshakes,
            per_ip: Arc::default(),
            pending: Arc::default(),
            permits: Arc::new(Semaphore::new(limits.max_connections)),
        }
    }

    /// Counts one more socket from `ip`, or `None` if that address is at its cap.
    fn enter_ip(&self, ip: IpAddr) -> Option<IpSlot> {
        let key = ip_key(ip);
        let mut map = self.per_ip.lock().ok()?;
        let count = map.entry(key).or_insert(0);
        if *count >= self.max_per_ip {
            return None;
        }
        *count += 1;
        Some(IpSlot { key, map: self.per_ip.clone() })
    }

    /// Registers a pending socket; when the pool is full the oldest is shed (the bool).
    fn enter_pending(&self) -> (PendingSlot, bool) {
        let (tx, shed) = oneshot::channel();
        let mut pool = self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut shed_one = false;
        while pool.slots.len() >= self.max_pending {
            // Dropping the sender wakes the oldest socket's task, which closes it.
            pool.slots.pop_first();
            shed_one = true;
        }
        let id = pool.next;
        pool.next += 1;
        pool.slots.insert(id, tx);
        (PendingSlot { id, shed, pool: self.pending.clone() }, shed_one)
    }
}

/// IPv4 addresses as they are; IPv6 by /64, the block one host usually controls.
fn ip_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(v6.to_bits() & !u128::from(u64::MAX))),
        },
    }
}

/// One counted socket of an address; uncounted on drop.
struct IpSlot {
    key: IpAddr,
    map: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = map.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                map.remove(&self.key);
            }
        }
    }
}

/// A place in the pending pool; left on drop. `shed` resolves when it was taken away.
struct PendingSlot {
    id: u64,
    shed: oneshot::Receiver<()>,
    pool: Arc<Mutex<PendingPool>>,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut pool = self.pool.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        pool.slots.remove(&self.id);
    }
}

async fn handle_tcp<H: Handler>(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared<H>>,
    mut shutdown: Shutdown,
    mut pending: PendingSlot,
) {
    let _ = stream.set_nodelay(true);
    let upgrade_to = tokio::select! {
        _ = shutdown.recv() => return,
        _ = &mut pending.shed => {
            tracing::debug!(%peer, "pending socket shed for a newer one");
            return;
        }
        up = before_upgrade(&mut stream, &shared) => up,
    };
    drop(pending);
    if let Some((req, rest, permit)) = upgrade_to {
        upgrade(stream, rest, peer, req, shared, shutdown).await;
        drop(permit);
    }
}

/// Reads the head and answers it, or, for a valid upgrade, waits for a connection
/// permit and returns what the WebSocket needs.
async fn before_upgrade<H: Handler>(
    stream: &mut TcpStream,
    shared: &Shared<H>,
) -> Option<(Request, Vec<u8>, OwnedSemaphorePermit)> {
    let head = timeout(shared.limits.head_timeout(), read_head(stream)).await;
    let (req, rest) = head_or_answer(stream, shared, head).await?;
    if req.path == SYNC_PATH {
        if let Err(resp) = check_upgrade(&req) {
            respond(stream, shared, resp, false).await;
            return None;
        }
        let permit = shared.admission.permits.clone().acquire_owned().await.ok()?;
        return Some((req, rest, permit));
    }
    let response = route(&req, shared, Listener::Public).await;
    respond(stream, shared, response, req.method == "HEAD").await;
    None
}

/// The request (and the bytes after it) of a head read, or `None` after answering a bad
/// head with a 4xx (or closing silently on EOF, I/O errors and the head deadline).
async fn head_or_answer<H>(
    stream: &mut TcpStream,
    shared: &Shared<H>,
    head: Result<Result<(Request, Vec<u8>), HeadError>, tokio::time::error::Elapsed>,
) -> Option<(Request, Vec<u8>)> {
    let response = match head {
        Ok(Ok(head)) => return Some(head),
        Err(_) => {
            shared.metrics.error("head_timeout");
            return None;
        }
        Ok(Err(HeadError::Eof | HeadError::Io(_))) => return None,
        Ok(Err(HeadError::TooLarge)) => Response::text(431, "request head too large"),
        Ok(Err(e @ (HeadError::BareLf | HeadError::Syntax(_) | HeadError::Malformed(_)))) => {
            Response::text(400, &e.to_string())
        }
    };
    respond(stream, shared, response, false).await;
    None
}

/// Whether `path` is an admin route: served on the admin listener, and on the public one
/// only with an admin credential.
fn is_admin_path(path: &str) -> bool {
    path == "/metrics" || path.starts_with("/cluster")
}

/// Answers a plain HTTP request (anything but the upgrade).
async fn route<H: Handler>(req: &Request, shared: &Shared<H>, listener: Listener) -> Response {
    if req.method != "GET" && req.method != "HEAD" {
        return Response::text(405, "method not allowed").with_header("Allow", "GET, HEAD");
    }
    if req.path == "/healthz" {
        return Response::new(200, "application/json", health_json(shared));
    }
    let admin = match listener {
        Listener::Admin => true,
        Listener::Public => bearer(req).is_some_and(|c| shared.handler.admin_allowed(c)),
    };
    if admin {
        if req.path == "/metrics" {
            return Response::new(200, "text/plain; version=0.0.4; charset=utf-8", metrics_text(shared));
        }
        if let Some((status, content_type, body)) = shared.handler.http_get(&req.path, req.query.as_deref()) {
            return Response::new(status, content_type, body);
        }
    }
    match (listener, &shared.web_root) {
        (Listener::Public, Some(root)) if !is_admin_path(&req.path) => serve_static(root, &req.path).await,
        _ => Response::text(404, "not found"),
    }
}

fn metrics_text<H: Handler>(shared: &Shared<H>) -> String {
    let mut text = shared.metrics.render();
    // Handler facts (pending hints, peer states, quorum ack sources) as gauges.
    for (name, value) in shared.handler.health().extra {
        let name: String = name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        text.push_str(&format!("# TYPE concord_{name} gauge\nconcord_{name} {value}\n"));
    }
    text
}

async fn respond<H>(stream: &mut TcpStream, shared: &Shared<H>, response: Response, head_only: bool) {
    shared.metrics.http_requests.inc();
    if response.status >= 400 {
        shared.metrics.error("http_bad_request");
    }
    let _ = timeout(WRITE_TIMEOUT, async {
        let _ = response.write_to(stream, head_only).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(stream).await;
    })
    .await;
}

fn check_upgrade(req: &Request) -> Result<(), Response> {
    if req.method != "GET" {
        return Err(Response::text(405, "the WebSocket upgrade needs GET").with_header("Allow", "GET"));
    }
    if !req.header_has_token("Upgrade", "websocket") || !req.header_has_token("Connection", "upgrade") {
        return Err(Response::text(426, "this endpoint speaks WebSocket only")
            .with_header("Upgrade", "websocket")
            .with_header("Sec-WebSocket-Version", "13"));
    }
    if req.header("Sec-WebSocket-Version") != Some("13") {
        return Err(Response::text(426, "unsupported WebSocket version; use 13")
            .with_header("Sec-WebSocket-Version", "13"));
    }
    match req.header("Sec-WebSocket-Key") {
        Some(k) if !k.is_empty() => Ok(()),
        _ => Err(Response::text(400, "missing Sec-WebSocket-Key")),
    }
}

async fn upgrade<H: Handler>(
    mut stream: TcpStream,
    rest: Vec<u8>,
    peer: SocketAddr,
    req: Request,
    shared: Arc<Shared<H>>,
    shutdown: Shutdown,
) {
    let key = req.header("Sec-WebSocket-Key").unwrap_or_default();
    let accept = derive_accept_key(key.as_bytes());
    let head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    let written =
        timeout(WRITE_TIMEOUT, tokio::io::AsyncWriteExt::write_all(&mut stream, head.as_bytes())).await;
    if !matches!(written, Ok(Ok(()))) {
        return;
    }
    let ws =
        WebSocketStream::from_raw_socket(Prefixed::new(rest, stream), Role::Server, Some(shared.ws_config))
            .await;
    let info = ConnInfo { peer, query: req.query };
    crate::connection::serve(
        ws,
        info,
        shared.handler.clone(),
        shared.limits.clone(),
        shared.metrics.clone(),
        shutdown,
    )
    .await;
}

fn health_json<H: Handler>(shared: &Shared<H>) -> String {
    #[derive(serde::Serialize)]
    struct Health<'a> {
        node_id: &'a str,
        uptime_secs: u64,
        documents_loaded: u64,
        connections: i64,
        #[serde(flatten)]
        extra: BTreeMap<String, i64>,
    }
    let info = shared.handler.health();
    const FIXED: [&str; 4] = ["node_id", "uptime_secs", "documents_loaded", "connections"];
    let health = Health {
        node_id: &shared.node_id,
        uptime_secs: shared.started.elapsed().as_secs(),
        documents_loaded: info.documents_loaded,
        connections: shared.metrics.connections_open.get().max(0),
        // A handler fact named like a fixed field would make a duplicate key.
        extra: info.extra.into_iter().filter(|(k, _)| !FIXED.contains(&k.as_str())).collect(),
    };
    serde_json::to_string(&health).unwrap_or_else(|_| "{}".to_string())
}
