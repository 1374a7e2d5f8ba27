//! Test support: a real `concord-relay` process and a protocol client built on the core
//! `Session`, over tokio-tungstenite.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use concord_core::sync::msg::ErrorMsg;
use concord_core::sync::{Event, Msg, Session, SessionConfig};
use concord_core::{Document, ReplicaId, VersionVector};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A relay process on 127.0.0.1 with its own data dir.
pub struct Relay {
    pub child: Child,
    /// The public listener: WebSocket, `/healthz`, static files.
    pub addr: SocketAddr,
    /// The admin listener: `/metrics`, `/cluster*`, `/healthz`.
    pub admin: SocketAddr,
    pub dir: PathBuf,
}

impl Relay {
    /// Starts the binary on port 0 and waits for its `listening on` and `admin listening
    /// on` lines.
    pub fn start(dir: &Path, extra: &[&str]) -> Relay {
        Relay::start_with(dir, extra, true)
    }

    /// Starts the binary; with `port0`, on a free port and `dir` as data dir (else the
    /// config given in `extra` decides).
    pub fn start_with(dir: &Path, extra: &[&str], port0: bool) -> Relay {
        Relay::spawn(dir, extra, port0, Stdio::null())
    }

    /// [`Relay::start`], with its log (stderr) written to `log`.
    pub fn start_logged(dir: &Path, extra: &[&str], log: &Path) -> Relay {
        let file = std::fs::File::create(log).expect("create log file");
        Relay::spawn(dir, extra, true, Stdio::from(file))
    }

    fn spawn(dir: &Path, extra: &[&str], port0: bool, stderr: Stdio) -> Relay {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_concord-relay"));
        if port0 {
            cmd.args(["--listen", "127.0.0.1:0", "--data-dir"]).arg(dir);
        }
        let mut child =
            cmd.args(extra).stdout(Stdio::piped()).stderr(stderr).spawn().expect("spawn concord-relay");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut addr = None;
        let admin = loop {
            let line = lines.next().expect("relay exited before listening").expect("read stdout");
            if let Some(rest) = line.trim().strip_prefix("listening on ") {
                addr = Some(rest.trim().parse().expect("address"));
            } else if let Some(rest) = line.trim().strip_prefix("admin listening on ") {
                break rest.trim().parse().expect("admin address");
            }
        };
        let addr = addr.expect("the public address is printed first");
        // Keep draining stdout so the relay never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Relay { child, addr, admin, dir: dir.to_path_buf() }
    }

    /// SIGKILL, no goodbye.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A replica speaking the real protocol to a relay.
pub struct Client {
    pub ws: Option<Ws>,
    pub session: Session,
    pub docs: HashMap<String, Document>,
    pub acked: HashMap<String, VersionVector>,
    pub synced: HashSet<String>,
    pub errors: Vec<ErrorMsg>,
    pub closed: Option<Option<CloseFrame>>,
    pub replica: ReplicaId,
}

pub async fn raw_ws(addr: SocketAddr) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/sync")).await.expect("connect");
    ws
}

impl Client {
    pub fn new(replica: u64) -> Client {
        Client {
            ws: None,
            session: Session::new(ReplicaId(replica), SessionConfig::default()),
            docs: HashMap::new(),
            acked: HashMap::new(),
            synced: HashSet::new(),
            errors: Vec::new(),
            closed: None,
            replica: ReplicaId(replica),
        }
    }

    /// Connects (or reconnects) and says hello; re-subscribes every open document.
    pub async fn connect(&mut self, addr: SocketAddr, token: Option<String>) {
        self.ws = Some(raw_ws(addr).await);
        self.session = Session::new(self.replica, SessionConfig::default());
        self.synced.clear();
        self.closed = None;
        let hello = self.session.hello(token);
        self.send(vec![hello]).await;
        let ids: Vec<String> = self.docs.keys().cloned().collect();
        for id in ids {
            let msgs = self.session.subscribe(&id, &mut self.docs);
            self.send(msgs).await;
        }
    }

    pub fn disconnect(&mut self) {
        self.ws = None;
    }

    pub fn doc(&mut self, id: &str) -> &mut Document {
        let r = self.replica;
        self.docs.entry(id.to_owned()).or_insert_with(|| Document::new(r))
    }

    /// Opens a document and subscribes when connected.
    pub async fn open(&mut self, id: &str) {
        self.doc(id);
        if self.ws.is_some() {
            let msgs = self.session.subscribe(id, &mut self.docs);
            self.send(msgs).await;
        }
    }

    pub async fn send(&mut self, msgs: Vec<Msg>) {
        for m in msgs {
            self.send_raw(m.encode()).await;
        }
    }

    pub async fn send_raw(&mut self, bytes: Vec<u8>) {
        if let Some(ws) = self.ws.as_mut() {
            let _ = ws.send(Message::Binary(bytes.into())).await;
        }
    }

    /// Increments a counter locally and pushes the delta.
    pub async fn increment(&mut self, doc: &str, key: &str, n: u64) {
        let d = self.doc(doc).increment(key, n).expect("increment");
        let msgs = self.session.on_local_delta(doc, &d);
        self.send(msgs).await;
    }

    /// Re-sends local writes of `doc` the relay has not acknowledged (after a timeout or
    /// a "not enough replicas" answer). Safe: deltas are idempotent.
    pub async fn resend_unacked(&mut self, doc: &str) {
        let Some(d) = self.docs.get(doc) else { return };
        let mut have = d.version().clone();
        let acked = self.acked.get(doc).map(|v| v.get(self.replica)).unwrap_or(0);
        let mut vv = concord_core::VersionVector::new();
        for (r, s) in have.iter() {
            vv.raise(r, if r == self.replica { acked } else { s });
        }
        have = vv;
        let deltas: Vec<concord_core::Delta> =
            d.deltas_since(&have).map(|v| v.into_iter().cloned().collect()).unwrap_or_default();
        let msgs = self.session.resend(doc, &deltas);
        self.send(msgs).await;
    }

    /// Whether the relay acked every local write of `doc`.
    pub fn all_acked(&self, doc: &str) -> bool {
        let mine = self.docs.get(doc).map(|d| d.version().get(self.replica)).unwrap_or(0);
        self.acked.get(doc).map(|v| v.get(self.replica)).unwrap_or(0) >= mine
    }

    /// Reads and handles frames until `pred` holds (true) or `timeout` passes (false).
    pub async fn pump_until(&mut self, timeout: Duration, mut pred: impl FnMut(&Client) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if pred(self) {
                return true;
            }
            let Some(ws) = self.ws.as_mut() else { return false };
            let next = tokio::time::timeout_at(deadline, ws.next()).await;
            match next {
                Err(_) => return pred(self),
                Ok(None) => {
                    self.closed.get_or_insert(None);
                    self.ws = None;
                    return pred(self);
                }
                Ok(Some(Err(_))) => {
                    self.closed.get_or_insert(None);
                    self.ws = None;
                    return pred(self);
                }
                Ok(Some(Ok(Message::Binary(b)))) => self.handle(&b).await,
                Ok(Some(Ok(Message::Close(f)))) => {
                    self.closed = Some(f);
                }
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// Pumps for a while, handling whatever comes.
    pub async fn pump_for(&mut self, d: Duration) {
        self.pump_until(d, |_| false).await;
    }

    async fn handle(&mut self, bytes: &[u8]) {
        match self.session.handle(bytes, &mut self.docs) {
            Ok(out) => {
                for ev in out.events {
                    match ev {
                        Event::Acked { doc, vv } => {
                            self.acked.entry(doc).or_default().merge(&vv);
                        }
                        Event::Synced { doc, .. } => {
                            self.synced.insert(doc);
                        }
                        Event::PeerError(e) => self.errors.push(e),
                        _ => {}
                    }
                }
                self.send(out.replies).await;
            }
            Err(e) => panic!("client could not handle a relay frame: {e}"),
        }
    }
}

pub fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "concord-relay-test-{name}-{}-{}",
        std::process::id(),
        concord_relay::node::random_u64()
    ));
    std::fs::create_dir_all(&dir).expect("mkdir");
    dir
}

/// A port for a relay that must know its address before it starts (cluster members name
/// each other in their configs). Drawn below the kernel's ephemeral range, so no outgoing
/// connection and no bind to port 0 elsewhere on the machine — another test's relay, a
/// load tool with thousands of clients — can take it between this check and the relay's
/// own bind. Different test processes start at different points of the range.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse::<u32>().ok()))
        .unwrap_or(32768)
        .clamp(12000, 49152);
    let (base, span) = (10000u32, low - 10000);
    let start = std::process::id().wrapping_mul(7919);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (base + start.wrapping_add(n.wrapping_mul(104_729)) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The body of a `GET path` to the relay's HTTP side.
pub async fn http_json(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
}
