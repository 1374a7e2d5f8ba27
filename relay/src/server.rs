//! The accept loop: one TCP port for the WebSocket upgrade (`/sync`), `GET /healthz`,
//! `GET /metrics` and static files.
//!
//! Shape (mini-redis' `server.rs`): a connection permit is taken *before* `accept`, so
//! at most `limits.max_connections` sockets are open; every task selects on the
//! shutdown signal; on shutdown the loop stops accepting, waits for every connection
//! task to finish (each sends its client a 1001 Close), then calls
//! [`Handler::flush`].

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use crate::config::{Config, Limits};
use crate::handler::{ConnInfo, Handler};
use crate::http::{json_string, read_head, serve_static, HeadError, Prefixed, Request, Response};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for connection tasks before flushing anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The path of the WebSocket endpoint.
pub const SYNC_PATH: &str = "/sync";

struct Shared<H> {
    handler: Arc<H>,
    metrics: Arc<Metrics>,
    node_id: String,
    web_root: Option<PathBuf>,
    limits: Limits,
    ws_config: WebSocketConfig,
    started: Instant,
}

/// Serves `listener` until `shutdown` resolves, then closes every connection, waits for
/// their tasks (at most 10 s) and calls `handler.flush()`.
///
/// Uses `config.node_id`, `config.web_root` and `config.limits`; `config.listen` is
/// ignored (the caller bound `listener`, possibly to port 0).
pub async fn run<H: Handler>(
    listener: TcpListener,
    config: &Config,
    handler: Arc<H>,
    metrics: Arc<Metrics>,
    shutdown: impl Future,
) {
    let limits = config.limits.clone();
    let ws_config = WebSocketConfig::default()
        .max_message_size(Some(limits.max_frame_bytes))
        .max_frame_size(Some(limits.max_frame_bytes))
        .read_buffer_size(4 * 1024)
        .write_buffer_size(4 * 1024);
    let shared = Arc::new(Shared {
        handler: handler.clone(),
        metrics,
        node_id: config.node_id.clone(),
        web_root: config.web_root.clone(),
        limits: limits.clone(),
        ws_config,
        started: Instant::now(),
    });
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let (notify_shutdown, _) = watch::channel(false);
    // Every connection task holds a clone; `recv` returns `None` once all are gone.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);

    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            accepted = accept(&listener, &permits) => accepted,
        };
        let Some((stream, peer, permit)) = accepted else {
            break;
        };
        let shared = shared.clone();
        let shutdown = Shutdown::new(notify_shutdown.subscribe());
        let done = done_tx.clone();
        tokio::spawn(async move {
            handle_tcp(stream, peer, shared, shutdown).await;
            drop(permit);
            drop(done);
        });
    }

    drop(listener);
    tracing::info!("shutting down: closing connections");
    let _ = notify_shutdown.send(true);
    drop(done_tx);
    if timeout(SHUTDOWN_GRACE, done_rx.recv()).await.is_err() {
        tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; flushing anyway");
    }
    handler.flush().await;
    tracing::info!("shutdown complete");
}

/// Takes a permit, then accepts. Accept errors (e.g. out of file descriptors) are
/// logged and retried with backoff; the server does not die of them.
async fn accept(
    listener: &TcpListener,
    permits: &Arc<Semaphore>,
) -> Option<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    let permit = permits.clone().acquire_owned().await.ok()?;
    let mut backoff = Duration::from_millis(10);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => return Some((stream, peer, permit)),
            Err(e) => {
                tracing::warn!(error = %e, "accept failed; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

async fn handle_tcp<H: Handler>(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared<H>>,
    mut shutdown: Shutdown,
) {
    let _ = stream.set_nodelay(true);
    let head = tokio::select! {
        _ = shutdown.recv() => return,
        head = timeout(HEAD_TIMEOUT, read_head(&mut stream)) => head,
    };
    let (req, rest) = match head {
        Ok(Ok(head)) => head,
        Ok(Err(HeadError::TooLarge)) => {
            return respond(&mut stream, &shared, Response::text(431, "request head too large"), false).await;
        }
        Ok(Err(HeadError::Malformed(why))) => {
            return respond(&mut stream, &shared, Response::text(400, why), false).await;
        }
        Ok(Err(_)) | Err(_) => return,
    };

    if req.path == SYNC_PATH {
        if let Err(resp) = check_upgrade(&req) {
            return respond(&mut stream, &shared, resp, false).await;
        }
        upgrade(stream, rest, peer, req, shared, shutdown).await;
        return;
    }

    let head_only = req.method == "HEAD";
    let response = if req.method != "GET" && !head_only {
        Response::text(405, "method not allowed").with_header("Allow", "GET, HEAD")
    } else if req.path == "/healthz" {
        Response::new(200, "application/json", health_json(&shared))
    } else if req.path == "/metrics" {
        let mut text = shared.metrics.render();
        // Handler facts (pending hints, peer states, quorum ack sources) as gauges.
        for (name, value) in shared.handler.health().extra {
            let name: String =
                name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
            text.push_str(&format!("# TYPE concord_{name} gauge\nconcord_{name} {value}\n"));
        }
        Response::new(200, "text/plain; version=0.0.4; charset=utf-8", text)
    } else if let Some((status, content_type, body)) =
        shared.handler.http_get(&req.path, req.query.as_deref())
    {
        Response::new(status, content_type, body)
    } else if let Some(root) = &shared.web_root {
        serve_static(root, &req.path).await
    } else {
        Response::text(404, "not found")
    };
    respond(&mut stream, &shared, response, head_only).await;
}

async fn respond<H>(stream: &mut TcpStream, shared: &Shared<H>, response: Response, head_only: bool) {
    shared.metrics.http_requests.inc();
    if response.status >= 400 {
        shared.metrics.error("http_bad_request");
    }
    let _ = timeout(HEAD_TIMEOUT, async {
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
        timeout(HEAD_TIMEOUT, tokio::io::AsyncWriteExt::write_all(&mut stream, head.as_bytes())).await;
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
    let info = shared.handler.health();
    let mut out = format!(
        "{{\"node_id\":{},\"uptime_secs\":{},\"documents_loaded\":{},\"connections\":{}",
        json_string(&shared.node_id),
        shared.started.elapsed().as_secs(),
        info.documents_loaded,
        shared.metrics.connections_open.get().max(0),
    );
    for (key, value) in &info.extra {
        out.push_str(&format!(",{}:{}", json_string(key), value));
    }
    out.push('}');
    out
}
