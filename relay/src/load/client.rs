//! One load client: a WebSocket connection speaking the sync protocol like a browser
//! replica (Hello, Subscribe, wait for `Synced`, then write deltas), built on the core
//! [`Session`] and [`Document`].
//!
//! Control messages go through the session, exactly as in a real replica. Incoming
//! `Deltas` and `Ack` frames are decoded and measured but not applied to the local
//! document: applying 150,000 foreign deltas a second would make the tool, which shares
//! the machine's cores with the relay, the bottleneck it is meant to measure.
//!
//! Latency is measured from send to remote receipt inside this process: a writer stores
//! the send time of each of its dots in [`SentTimes`]; a receiver looks the dot up.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use concord_core::sync::msg::Deltas;
use concord_core::sync::{Event, Msg, Session, SessionConfig};
use concord_core::{Delta, Document, ReplicaId, Value};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::hist::Histogram;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long one connect (TCP + upgrade) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the subscription may take to settle.
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);
/// Most frames remembered for ack latency (clients whose server never acks).
const MAX_INFLIGHT: usize = 1 << 16;

static START: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the first call in this process: the clock of every timestamp.
pub fn now_ns() -> u64 {
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// The tokio instant `ns` nanoseconds after the [`now_ns`] epoch.
pub fn instant_at(ns: u64) -> tokio::time::Instant {
    let start = *START.get_or_init(Instant::now);
    tokio::time::Instant::from_std(start + Duration::from_nanos(ns))
}

fn wall_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// What a client writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// G-Counter increments by 1.
    Counter,
    /// LWW-Register writes of an integer.
    Register,
    /// OR-Set adds of a new integer.
    Set,
    /// The three above in turn.
    Mix,
}

impl std::str::FromStr for OpKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "counter" => Ok(OpKind::Counter),
            "register" => Ok(OpKind::Register),
            "set" => Ok(OpKind::Set),
            "mix" => Ok(OpKind::Mix),
            _ => Err(format!("--ops {s:?}: expected counter, register, set or mix")),
        }
    }
}

impl std::fmt::Display for OpKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OpKind::Counter => "counter",
            OpKind::Register => "register",
            OpKind::Set => "set",
            OpKind::Mix => "mix",
        })
    }
}

/// When a client writes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pace {
    /// Never: Hello, Subscribe, then only read.
    Idle,
    /// Open loop: one frame every `period`, the first `phase` after the start.
    Rate {
        /// Time between frames.
        period: Duration,
        /// Offset of the first frame, to spread clients evenly.
        phase: Duration,
    },
    /// Closed loop: keep `window` frames sent but not yet acknowledged.
    Closed {
        /// Frames in flight.
        window: usize,
    },
}

/// One client's assignment.
#[derive(Clone, Debug)]
pub struct ClientSpec {
    /// Index among the run's clients (its replica id is `replica_base + idx`).
    pub idx: usize,
    /// The one document it subscribes to and writes.
    pub doc: String,
    /// What it writes.
    pub ops: OpKind,
    /// When it writes.
    pub pace: Pace,
    /// Deltas per frame.
    pub batch: usize,
}

/// The run's timeline, in [`now_ns`] nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Writing starts.
    pub start: u64,
    /// Counting starts (after the warm-up).
    pub measure_from: u64,
    /// Counting and writing stop.
    pub measure_until: u64,
    /// Clients hang up (after draining what is in flight).
    pub stop: u64,
}

impl Plan {
    fn counts(&self, t: u64) -> bool {
        t >= self.measure_from && t < self.measure_until
    }
}

/// Send times of every writer's recent dots.
#[derive(Debug, Default)]
pub struct SentTimes {
    rings: Vec<Box<[AtomicU64]>>,
    mask: u64,
}

impl SentTimes {
    /// Room for `writers` writers, each remembering its last `ring` (rounded up to a
    /// power of two) dots. `ring == 0` disables latency measurement.
    pub fn new(writers: usize, ring: usize) -> SentTimes {
        if ring == 0 {
            return SentTimes::default();
        }
        let ring = ring.next_power_of_two();
        let rings = (0..writers).map(|_| (0..ring).map(|_| AtomicU64::new(0)).collect()).collect();
        SentTimes { rings, mask: ring as u64 - 1 }
    }

    fn store(&self, writer: usize, seq: u64, t: u64) {
        if let Some(r) = self.rings.get(writer) {
            r[(seq & self.mask) as usize].store(t, Ordering::Relaxed);
        }
    }

    fn load(&self, writer: usize, seq: u64) -> Option<u64> {
        let t = self.rings.get(writer)?[(seq & self.mask) as usize].load(Ordering::Relaxed);
        (t != 0).then_some(t)
    }
}

/// Counts clients that finished connecting.
#[derive(Debug, Default)]
pub struct Ready {
    /// Connected and subscribed.
    pub ok: AtomicUsize,
    /// Gave up.
    pub failed: AtomicUsize,
}

/// What every client of a run shares.
#[derive(Debug)]
pub struct Shared {
    /// `ws://host:port/sync`.
    pub url: String,
    /// Replica id of client 0; client `i` is `replica_base + i`.
    pub replica_base: u64,
    /// Send times, for latency.
    pub sent: SentTimes,
    /// Bounds concurrent connection attempts.
    pub connect: Semaphore,
    /// Connection progress.
    pub ready: Ready,
    /// The plan, once the orchestrator starts the run.
    pub go: watch::Receiver<Option<Plan>>,
}

/// What one client measured (only inside the plan's measuring window, except the
/// connection facts).
#[derive(Clone, Debug, Default)]
pub struct ClientStats {
    /// Connected and subscribed.
    pub ready: bool,
    /// Why it could not connect or subscribe.
    pub failure: Option<String>,
    /// Deltas written.
    pub writes: u64,
    /// Frames written.
    pub frames_sent: u64,
    /// Payload bytes of the frames written.
    pub bytes_sent: u64,
    /// Deltas of other clients received.
    pub delivered: u64,
    /// Payload bytes of `Deltas` frames received.
    pub bytes_received: u64,
    /// Own deltas covered by `Ack`s.
    pub acked: u64,
    /// Send-to-receipt latency of delivered deltas (ns).
    pub latency: Histogram,
    /// Send-to-`Ack` latency of written frames (ns).
    pub ack_latency: Histogram,
    /// Closed by the server with 1013 "slow consumer".
    pub slow_consumer: u64,
    /// Lost the connection otherwise before the end (close code and reason, or error).
    pub disconnected: Option<String>,
    /// Protocol errors received or frames that did not decode.
    pub errors: u64,
    /// The first of them.
    pub error_sample: Option<String>,
}

impl ClientStats {
    /// Adds `other` into `self` (failure and error samples: the first one wins).
    pub fn merge(&mut self, other: &ClientStats) {
        self.writes += other.writes;
        self.frames_sent += other.frames_sent;
        self.bytes_sent += other.bytes_sent;
        self.delivered += other.delivered;
        self.bytes_received += other.bytes_received;
        self.acked += other.acked;
        self.latency.merge(&other.latency);
        self.ack_latency.merge(&other.ack_latency);
        self.slow_consumer += other.slow_consumer;
        self.errors += other.errors;
        if self.error_sample.is_none() {
            self.error_sample.clone_from(&other.error_sample);
        }
    }
}

struct Client {
    spec: ClientSpec,
    shared: Arc<Shared>,
    replica: ReplicaId,
    session: Session,
    docs: HashMap<String, Document>,
    keys: [String; 3],
    stats: ClientStats,
    plan: Option<Plan>,
    synced: bool,
    /// `(last seq, send time)` of frames not yet acknowledged.
    inflight: VecDeque<(u64, u64)>,
    acked_seq: u64,
    ops_made: u64,
}

/// Why the connection loop ended early.
struct Hangup;

/// Runs one client to the end of the plan and returns what it measured.
pub async fn run(spec: ClientSpec, shared: Arc<Shared>) -> ClientStats {
    let replica = ReplicaId(shared.replica_base + spec.idx as u64);
    let idx = spec.idx;
    let mut c = Client {
        session: Session::new(replica, SessionConfig::default()),
        docs: HashMap::from([(spec.doc.clone(), Document::new(replica))]),
        keys: [format!("count-{idx}"), format!("reg-{idx}"), format!("set-{idx}")],
        spec,
        shared,
        replica,
        stats: ClientStats::default(),
        plan: None,
        synced: false,
        inflight: VecDeque::new(),
        acked_seq: 0,
        ops_made: 0,
    };
    match c.connect().await {
        Ok(ws) => {
            c.stats.ready = true;
            c.shared.ready.ok.fetch_add(1, Ordering::AcqRel);
            c.serve(ws).await;
        }
        Err(why) => {
            c.stats.failure = Some(why);
            c.shared.ready.failed.fetch_add(1, Ordering::AcqRel);
        }
    }
    c.stats
}

impl Client {
    async fn connect(&mut self) -> Result<Ws, String> {
        let shared = self.shared.clone();
        let _permit = shared.connect.acquire().await.map_err(|e| e.to_string())?;
        let url = self.shared.url.clone();
        let connecting = tokio_tungstenite::connect_async_with_config(
            url.as_str(),
            Some(super::baseline::ws_config()),
            true,
        );
        let mut ws = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok((ws, _))) => ws,
            Ok(Err(e)) => return Err(format!("connect: {e}")),
            Err(_) => return Err(format!("connect: no answer within {CONNECT_TIMEOUT:?}")),
        };
        let mut hello = vec![self.session.hello(None)];
        hello.extend(self.session.subscribe(&self.spec.doc, &mut self.docs));
        send_all(&mut ws, hello).await.map_err(|_| "send hello: connection lost".to_string())?;
        let deadline = tokio::time::Instant::now() + SYNC_TIMEOUT;
        while !self.synced {
            match tokio::time::timeout_at(deadline, ws.next()).await {
                Ok(Some(Ok(m))) => {
                    if self.on_message(&mut ws, m).await.is_err() {
                        return Err(format!(
                            "closed while subscribing: {}",
                            self.stats.disconnected.clone().unwrap_or_default()
                        ));
                    }
                }
                Ok(Some(Err(e))) => return Err(format!("read while subscribing: {e}")),
                Ok(None) => return Err("closed while subscribing".into()),
                Err(_) => return Err(format!("no Synced within {SYNC_TIMEOUT:?}")),
            }
        }
        Ok(ws)
    }

    /// Waits for the plan (reading all the while), then writes and reads until it ends.
    async fn serve(&mut self, mut ws: Ws) {
        let mut go = self.shared.go.clone();
        let plan = loop {
            if let Some(p) = *go.borrow_and_update() {
                break p;
            }
            tokio::select! {
                changed = go.changed() => if changed.is_err() { return },
                m = ws.next() => if self.on_next(&mut ws, m).await.is_err() { return },
            }
        };
        self.plan = Some(plan);
        let stop = instant_at(plan.stop);
        let mut ticker = match self.spec.pace {
            Pace::Rate { period, phase } => {
                let mut t = tokio::time::interval_at(instant_at(plan.start) + phase, period);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                Some(t)
            }
            Pace::Idle | Pace::Closed { .. } => None,
        };
        tokio::time::sleep_until(instant_at(plan.start)).await;
        if self.refill(&mut ws).await.is_err() {
            return;
        }
        loop {
            let writing = now_ns() < plan.measure_until;
            tokio::select! {
                biased;
                _ = tokio::time::sleep_until(stop) => break,
                m = ws.next() => {
                    if self.on_next(&mut ws, m).await.is_err() || self.refill(&mut ws).await.is_err() {
                        return;
                    }
                }
                _ = tick(&mut ticker), if writing => {
                    if self.write(&mut ws).await.is_err() || self.flush(&mut ws).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = ws.close(None).await;
    }

    /// Closed loop: tops up the window of unacknowledged frames, flushing once for all
    /// of them (as a browser tab sends what its outbox holds in one go).
    async fn refill(&mut self, ws: &mut Ws) -> Result<(), Hangup> {
        let Pace::Closed { window } = self.spec.pace else { return Ok(()) };
        let Some(plan) = self.plan else { return Ok(()) };
        let mut wrote = false;
        while self.inflight.len() < window && now_ns() < plan.measure_until {
            self.write(ws).await?;
            wrote = true;
        }
        if wrote {
            self.flush(ws).await?;
        }
        Ok(())
    }

    async fn flush(&mut self, ws: &mut Ws) -> Result<(), Hangup> {
        if let Err(e) = ws.flush().await {
            self.stats.disconnected.get_or_insert_with(|| format!("write failed: {e}"));
            return Err(Hangup);
        }
        Ok(())
    }

    async fn on_next(
        &mut self,
        ws: &mut Ws,
        m: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    ) -> Result<(), Hangup> {
        match m {
            Some(Ok(m)) => self.on_message(ws, m).await,
            Some(Err(e)) => {
                self.stats.disconnected.get_or_insert_with(|| format!("read failed: {e}"));
                Err(Hangup)
            }
            None => {
                self.stats.disconnected.get_or_insert_with(|| "connection closed without a Close".into());
                Err(Hangup)
            }
        }
    }

    async fn on_message(&mut self, ws: &mut Ws, m: Message) -> Result<(), Hangup> {
        match m {
            Message::Binary(b) => {
                let replies = self.on_frame(&b);
                if !replies.is_empty() {
                    send_all(ws, replies).await.map_err(|_| Hangup)?;
                }
                Ok(())
            }
            Message::Close(frame) => {
                let (code, reason) =
                    frame.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or((1005, String::new()));
                if code == 1013 {
                    self.stats.slow_consumer += 1;
                }
                self.stats
                    .disconnected
                    .get_or_insert_with(|| format!("closed by the server: {code} {reason}"));
                Err(Hangup)
            }
            _ => Ok(()),
        }
    }

    fn error(&mut self, what: String) {
        self.stats.errors += 1;
        self.stats.error_sample.get_or_insert(what);
    }

    /// Handles one binary frame; returns the replies to send.
    fn on_frame(&mut self, bytes: &[u8]) -> Vec<Msg> {
        let now = now_ns();
        let counts = self.plan.is_some_and(|p| p.counts(now));
        match Msg::decode(bytes) {
            Ok(Msg::Deltas(m)) => {
                if counts {
                    self.stats.bytes_received += bytes.len() as u64;
                }
                for d in &m.deltas {
                    if d.dot.replica == self.replica || !counts {
                        continue;
                    }
                    self.stats.delivered += 1;
                    let writer = d.dot.replica.0.wrapping_sub(self.shared.replica_base) as usize;
                    if let Some(t) = self.shared.sent.load(writer, d.dot.seq) {
                        self.stats.latency.record(now.saturating_sub(t));
                    }
                }
                Vec::new()
            }
            Ok(Msg::Ack(a)) => {
                if a.doc == self.spec.doc {
                    self.on_ack(a.vv.get(self.replica), now, counts);
                }
                Vec::new()
            }
            Ok(msg) => match self.session.handle_msg(msg, &mut self.docs) {
                Ok(out) => {
                    for ev in out.events {
                        match ev {
                            Event::Synced { doc, .. } if doc == self.spec.doc => self.synced = true,
                            Event::PeerError(e) => {
                                self.error(format!("{} ({}): {}", e.code.name(), e.code.0, e.message))
                            }
                            _ => {}
                        }
                    }
                    out.replies
                }
                Err(e) => {
                    self.error(format!("session refused a frame: {e}"));
                    Vec::new()
                }
            },
            Err(e) => {
                self.error(format!("undecodable frame: {e}"));
                Vec::new()
            }
        }
    }

    fn on_ack(&mut self, acked: u64, now: u64, counts: bool) {
        if acked <= self.acked_seq {
            return;
        }
        if counts {
            self.stats.acked += acked - self.acked_seq;
        }
        self.acked_seq = acked;
        while let Some(&(last, sent)) = self.inflight.front() {
            if last > acked {
                break;
            }
            self.inflight.pop_front();
            if counts {
                self.stats.ack_latency.record(now.saturating_sub(sent));
            }
        }
    }

    fn make_delta(&mut self) -> Option<Delta> {
        let kind = match self.spec.ops {
            OpKind::Mix => [OpKind::Counter, OpKind::Register, OpKind::Set][(self.ops_made % 3) as usize],
            k => k,
        };
        self.ops_made += 1;
        let n = self.ops_made as i64;
        let doc = self.docs.get_mut(&self.spec.doc)?;
        let made = match kind {
            OpKind::Counter | OpKind::Mix => doc.increment(&self.keys[0], 1),
            OpKind::Register => doc.set_register(&self.keys[1], Value::Int(n), wall_millis()),
            OpKind::Set => doc.set_add(&self.keys[2], Value::Int(n)),
        };
        match made {
            Ok(d) => Some(d),
            Err(e) => {
                self.error(format!("local write failed: {e}"));
                None
            }
        }
    }

    async fn write(&mut self, ws: &mut Ws) -> Result<(), Hangup> {
        let deltas: Vec<Delta> = (0..self.spec.batch.max(1)).filter_map(|_| self.make_delta()).collect();
        let Some(last) = deltas.last().map(|d| d.dot.seq) else { return Ok(()) };
        let n = deltas.len() as u64;
        let seqs: Vec<u64> = deltas.iter().map(|d| d.dot.seq).collect();
        let frame = Msg::Deltas(Deltas { doc: self.spec.doc.clone(), deltas }).encode();
        let now = now_ns();
        for seq in seqs {
            self.shared.sent.store(self.spec.idx, seq, now);
        }
        if self.plan.is_some_and(|p| p.counts(now)) {
            self.stats.writes += n;
            self.stats.frames_sent += 1;
            self.stats.bytes_sent += frame.len() as u64;
        }
        if self.inflight.len() >= MAX_INFLIGHT {
            self.inflight.pop_front();
        }
        self.inflight.push_back((last, now));
        // Queued only: the caller flushes.
        if let Err(e) = ws.feed(Message::Binary(frame.into())).await {
            self.stats.disconnected.get_or_insert_with(|| format!("write failed: {e}"));
            return Err(Hangup);
        }
        Ok(())
    }
}

async fn tick(ticker: &mut Option<tokio::time::Interval>) {
    match ticker {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn send_all(ws: &mut Ws, msgs: Vec<Msg>) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    for m in msgs {
        ws.feed(Message::Binary(m.encode().into())).await?;
    }
    ws.flush().await
}
