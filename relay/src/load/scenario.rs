//! Scenarios, their default parameters, and one measured phase: connect K clients to a
//! target, start them together, count inside a window, read the target's RSS and CPU.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Semaphore};

use super::client::{self, now_ns, ClientSpec, ClientStats, OpKind, Pace, Plan, Ready, SentTimes, Shared};
use super::procfs;
use super::target::Target;

/// The benchmark scenarios of issue 4, item 6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// 100 clients in one document; every write reaches the 99 others.
    Fanout,
    /// 1,000 clients over 500 documents at 2,000 updates/s in total.
    Mixed,
    /// Many writers, closed loop: deltas acknowledged after fsync.
    Acks,
    /// `Acks` with 8 deltas per frame, as a client's outbox sends them while it waits.
    AcksBatch,
    /// 10,000 connections that say Hello, subscribe, and idle.
    Idle,
}

impl Scenario {
    /// Every scenario, in report order.
    pub const ALL: [Scenario; 5] =
        [Scenario::Fanout, Scenario::Mixed, Scenario::Acks, Scenario::AcksBatch, Scenario::Idle];

    /// Its `--scenario` name.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Fanout => "fanout",
            Scenario::Mixed => "mixed",
            Scenario::Acks => "acks",
            Scenario::AcksBatch => "acks-batch",
            Scenario::Idle => "idle",
        }
    }

    /// Parses a `--scenario` name.
    pub fn parse(s: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|x| x.name() == s)
    }

    /// The parameters the targets are stated for.
    pub fn defaults(self) -> Params {
        match self {
            Scenario::Fanout => {
                Params { clients: 100, docs: 1, load: Load::Rate(1_700.0), ops: OpKind::Register, batch: 1 }
            }
            Scenario::Mixed => {
                Params { clients: 1_000, docs: 500, load: Load::Rate(2_000.0), ops: OpKind::Mix, batch: 1 }
            }
            Scenario::Acks => Params {
                clients: 500,
                docs: 500,
                load: Load::Closed { window: 4 },
                ops: OpKind::Counter,
                batch: 1,
            },
            Scenario::AcksBatch => Params { batch: 8, ..Scenario::Acks.defaults() },
            Scenario::Idle => {
                Params { clients: 10_000, docs: 1_000, load: Load::Idle, ops: OpKind::Counter, batch: 1 }
            }
        }
    }
}

/// How hard clients write.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Load {
    /// Not at all.
    Idle,
    /// Open loop, this many frames per second over all clients.
    Rate(f64),
    /// Closed loop, this many unacknowledged frames per client.
    Closed {
        /// Frames in flight per client.
        window: usize,
    },
}

impl std::fmt::Display for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Load::Idle => f.write_str("idle"),
            Load::Rate(r) => write!(f, "{} frames/s", super::report::int(*r)),
            Load::Closed { window } => write!(f, "closed loop, {window} frames in flight per client"),
        }
    }
}

/// One scenario's parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Params {
    /// Connections.
    pub clients: usize,
    /// Documents; client `i` uses document `i % docs`.
    pub docs: usize,
    /// Write pacing.
    pub load: Load,
    /// What is written.
    pub ops: OpKind,
    /// Deltas per frame.
    pub batch: usize,
}

/// Timing of a phase.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Writes run this long before counting starts.
    pub warmup: Duration,
    /// The measuring window.
    pub duration: Duration,
    /// Concurrent connection attempts.
    pub connect_concurrency: usize,
    /// For idle phases: wait this long after the last connection before reading RSS.
    pub settle: Duration,
}

/// What one phase measured.
#[derive(Clone, Debug, Default)]
pub struct PhaseResult {
    /// Clients that connected and subscribed.
    pub clients_ok: usize,
    /// Clients that did not, with the first reason.
    pub clients_failed: usize,
    /// The first connection failure.
    pub failure_sample: Option<String>,
    /// Seconds all connections took.
    pub connect_secs: f64,
    /// Length of the measuring window.
    pub window_secs: f64,
    /// Every client's numbers, added up.
    pub stats: ClientStats,
    /// Clients that lost their connection before the end.
    pub disconnected: usize,
    /// The first reason of a disconnect other than "slow consumer".
    pub disconnect_sample: Option<String>,
    /// Target RSS (KiB) before connecting.
    pub rss_before: Option<u64>,
    /// Target RSS (KiB) with every client connected (idle: after settling; otherwise at
    /// the end of the window).
    pub rss_after: Option<u64>,
    /// Cores the target used during the window.
    pub target_cores: Option<f64>,
    /// Cores this tool used during the window.
    pub tool_cores: Option<f64>,
    /// Target cores by thread name during the window.
    pub target_threads: BTreeMap<String, f64>,
    /// Change of the target's `/metrics` samples over the window.
    pub metrics: BTreeMap<String, f64>,
    /// `/proc/loadavg` before the phase.
    pub loadavg: Option<String>,
}

impl PhaseResult {
    /// Per-second rate of a count over the window.
    pub fn per_sec(&self, n: u64) -> f64 {
        if self.window_secs > 0.0 {
            n as f64 / self.window_secs
        } else {
            0.0
        }
    }

    /// The target's CPU per unit of `n` (e.g. per acked delta) by thread name, as
    /// `name X µs, ...`.
    pub fn threads_per_unit(&self, n: u64) -> String {
        if n == 0 {
            return "—".into();
        }
        let mut v: Vec<(&String, &f64)> = self.target_threads.iter().filter(|(_, c)| **c >= 0.005).collect();
        v.sort_by(|a, b| b.1.total_cmp(a.1));
        let per = |c: f64| c * self.window_secs * 1e6 / n as f64;
        v.iter().map(|(name, c)| format!("{name} {:.1} µs", per(**c))).collect::<Vec<_>>().join(", ")
    }

    /// (RSS after - RSS before) / connections, in KiB.
    pub fn rss_per_conn_kib(&self) -> Option<f64> {
        let (b, a) = (self.rss_before?, self.rss_after?);
        (self.clients_ok > 0).then(|| (a as f64 - b as f64) / self.clients_ok as f64)
    }
}

fn cores(ticks: Option<u64>, secs: f64) -> Option<f64> {
    ticks.map(|t| t as f64 / procfs::TICKS_PER_SEC / secs.max(1e-9))
}

/// Runs one phase of `params` against `target`.
pub async fn run_phase(target: &Target, params: &Params, timing: &Timing, tag: &str) -> PhaseResult {
    let mut r = PhaseResult { loadavg: procfs::loadavg(), ..PhaseResult::default() };
    let pid = target.pid;
    r.rss_before = pid.and_then(procfs::rss_kib);
    let clients = params.clients.max(1);
    let docs = params.docs.clamp(1, clients);
    let secs = (timing.warmup + timing.duration).as_secs_f64() + 2.0;
    // Only documents with more than one member deliver anything: only then keep send times.
    let ring = match params.load {
        Load::Rate(rate) if clients > docs => ((rate / clients as f64) * secs * 1.5) as usize + 64,
        _ => 0,
    };
    let (go_tx, go_rx) = watch::channel::<Option<Plan>>(None);
    let shared = Arc::new(Shared {
        url: target.url.clone(),
        replica_base: (crate::node::random_u64() >> 2) | 1,
        sent: SentTimes::new(clients, ring.min(1 << 16)),
        connect: Semaphore::new(timing.connect_concurrency.max(1)),
        ready: Ready::default(),
        go: go_rx,
    });
    let period = match params.load {
        Load::Rate(rate) if rate > 0.0 => Some(Duration::from_secs_f64(clients as f64 / rate)),
        _ => None,
    };
    let run_id = format!("{tag}-{:x}", crate::node::random_u64() & 0xffff_ffff);
    let started = now_ns();
    let mut handles = Vec::with_capacity(clients);
    for idx in 0..clients {
        let pace = match (params.load, period) {
            (Load::Rate(_), Some(period)) => {
                Pace::Rate { period, phase: period.mul_f64(idx as f64 / clients as f64) }
            }
            (Load::Closed { window }, _) => Pace::Closed { window: window.max(1) },
            _ => Pace::Idle,
        };
        let spec = ClientSpec {
            idx,
            doc: format!("load-{run_id}-{}", idx % docs),
            ops: params.ops,
            pace,
            batch: params.batch.max(1),
        };
        handles.push(tokio::spawn(client::run(spec, shared.clone())));
    }
    // Wait for every client to connect and subscribe.
    loop {
        let done = shared.ready.ok.load(Ordering::Acquire) + shared.ready.failed.load(Ordering::Acquire);
        if done >= clients {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    r.connect_secs = (now_ns() - started) as f64 / 1e9;
    r.clients_ok = shared.ready.ok.load(Ordering::Acquire);
    r.clients_failed = shared.ready.failed.load(Ordering::Acquire);

    let idle = params.load == Load::Idle;
    if idle {
        tokio::time::sleep(timing.settle).await;
        r.rss_after = pid.and_then(procfs::rss_kib);
    }
    // Idle connections only need holding while the window's CPU is read.
    let (warmup, duration) = if idle {
        (Duration::ZERO, timing.duration.min(Duration::from_secs(2)))
    } else {
        (timing.warmup, timing.duration)
    };
    let start = now_ns() + 50_000_000;
    let measure_from = start + warmup.as_nanos() as u64;
    let measure_until = measure_from + duration.as_nanos() as u64;
    let plan = Plan { start, measure_from, measure_until, stop: measure_until + 300_000_000 };
    if go_tx.send(Some(plan)).is_err() {
        // Every client failed to connect: the report counts them as failed.
        eprintln!("warning: every client task ended before the start signal");
    }

    tokio::time::sleep_until(client::instant_at(measure_from)).await;
    let t0 = now_ns();
    let cpu0 = pid.and_then(procfs::cpu_ticks);
    let me0 = procfs::cpu_ticks(std::process::id());
    let threads0 = pid.map(procfs::thread_cpu_ns).unwrap_or_default();
    let metrics0 = target.metrics().await;
    tokio::time::sleep_until(client::instant_at(measure_until)).await;
    let cpu1 = pid.and_then(procfs::cpu_ticks);
    let me1 = procfs::cpu_ticks(std::process::id());
    let threads1 = pid.map(procfs::thread_cpu_ns).unwrap_or_default();
    let t1 = now_ns();
    let metrics1 = target.metrics().await;
    let window = (t1 - t0) as f64 / 1e9;
    r.window_secs = (measure_until - measure_from) as f64 / 1e9;
    r.target_cores = cores(cpu0.zip(cpu1).map(|(a, b)| b.saturating_sub(a)), window);
    r.tool_cores = cores(me0.zip(me1).map(|(a, b)| b.saturating_sub(a)), window);
    for (name, after) in threads1 {
        let before = threads0.get(&name).copied().unwrap_or(0);
        r.target_threads.insert(name, after.saturating_sub(before) as f64 / 1e9 / window.max(1e-9));
    }
    for (k, v) in &metrics1 {
        r.metrics.insert(k.clone(), v - metrics0.get(k).copied().unwrap_or(0.0));
    }
    if !idle {
        r.rss_after = pid.and_then(procfs::rss_kib);
    }

    for h in handles {
        let Ok(s) = h.await else { continue };
        if let Some(f) = &s.failure {
            r.failure_sample.get_or_insert_with(|| f.clone());
        }
        if let (true, Some(d)) = (s.ready, &s.disconnected) {
            r.disconnected += 1;
            if s.slow_consumer == 0 {
                r.disconnect_sample.get_or_insert_with(|| d.clone());
            }
        }
        r.stats.merge(&s);
    }
    r
}
