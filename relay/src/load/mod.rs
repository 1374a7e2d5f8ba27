//! `concord-load`: the relay's load generator (issue 4, item 6).
//!
//! K WebSocket clients over M documents write at a target rate (or in a closed loop) and
//! measure delivered messages per second, end-to-end latency, durable acks per second,
//! bytes per operation, and the server's resident memory per connection. Every number is
//! reported beside a baseline measured in the same run, because the machines it runs on
//! are shared and noisy:
//!
//! - `fanout`, `mixed`, `idle`: the same clients against [`baseline`], a plain
//!   tokio-tungstenite broadcast server (no CRDT, no storage), run as a child process
//!   like the relay;
//! - `acks`: the raw `fdatasync` rate of the relay's data disk ([`procfs::fsync_latency`]).
//!
//! Modules, along the data path: [`client`] (one protocol client) → [`scenario`] (K
//! clients, a start signal, a measuring window) → [`target`] (the relay or baseline
//! process, its `/metrics`) and [`procfs`] (RSS, CPU time) → [`report`] (markdown).
//! The binary `src/bin/concord-load.rs` only parses flags.

pub mod baseline;
pub mod client;
pub mod hist;
pub mod procfs;
pub mod profile;
pub mod report;
pub mod scenario;
pub mod target;

use std::path::PathBuf;
use std::time::Duration;

use client::OpKind;
use scenario::{Load, Params, PhaseResult, Scenario, Timing};
use target::Target;

/// Everything the flags decide.
#[derive(Debug, Clone)]
pub struct Options {
    /// Scenarios to run, in order.
    pub scenarios: Vec<Scenario>,
    /// Spawn this relay binary (fresh data dir per scenario).
    pub spawn: Option<PathBuf>,
    /// Or load this running relay.
    pub url: Option<String>,
    /// The running relay's pid (for RSS and CPU).
    pub relay_pid: Option<u32>,
    /// Config file for spawned relays instead of the generated one.
    pub relay_config: Option<PathBuf>,
    /// Overrides of the scenario defaults.
    pub clients: Option<usize>,
    /// See [`Params::docs`].
    pub docs: Option<usize>,
    /// See [`Params::load`].
    pub load: Option<Load>,
    /// Frames in flight per client for closed-loop runs.
    pub window: Option<usize>,
    /// See [`Params::ops`].
    pub ops: Option<OpKind>,
    /// See [`Params::batch`].
    pub batch: Option<usize>,
    /// Measuring window per phase.
    pub duration: Duration,
    /// Writes before the window opens.
    pub warmup: Duration,
    /// Measure baselines too.
    pub baseline: bool,
    /// Make the baseline flush after every frame, as the relay's writer does (an
    /// experiment; the default flushes once per burst of queued frames).
    pub baseline_flush_each: bool,
    /// WebSocket read/write buffer size of the baseline server (default 16 KiB, as the
    /// relay's); an experiment knob for the idle scenario.
    pub baseline_ws_buffer: Option<usize>,
    /// Profile the sync handler in-process after the fanout scenario.
    pub profile: bool,
    /// Concurrent connection attempts.
    pub connect_concurrency: usize,
    /// `fdatasync` calls timed for the acks baseline.
    pub fsync_samples: u32,
    /// The command line, for the report.
    pub command: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            scenarios: Scenario::ALL.to_vec(),
            spawn: None,
            url: None,
            relay_pid: None,
            relay_config: None,
            clients: None,
            docs: None,
            load: None,
            window: None,
            ops: None,
            batch: None,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            baseline: true,
            baseline_flush_each: false,
            baseline_ws_buffer: None,
            profile: true,
            connect_concurrency: 128,
            fsync_samples: 200,
            command: String::new(),
        }
    }
}

impl Options {
    /// The parameters of `s` after the flags' overrides.
    pub fn params(&self, s: Scenario) -> Params {
        let mut p = s.defaults();
        if let Some(c) = self.clients {
            p.clients = c;
        }
        if let Some(d) = self.docs {
            p.docs = d;
        }
        if let Some(l) = self.load {
            p.load = l;
        }
        if let (Some(w), Load::Closed { .. }) = (self.window, p.load) {
            p.load = Load::Closed { window: w };
        }
        if let Some(o) = self.ops {
            p.ops = o;
        }
        if let Some(b) = self.batch {
            p.batch = b;
        }
        p
    }
}

/// One scenario's measurements.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Which.
    pub scenario: Scenario,
    /// With what.
    pub params: Params,
    /// Against the relay.
    pub concord: PhaseResult,
    /// Against the baseline server (fanout, mixed, idle).
    pub baseline: Option<PhaseResult>,
    /// Against the baseline server flushing after every frame, as the relay's writer
    /// does (fanout).
    pub baseline_each: Option<PhaseResult>,
    /// Mean `fdatasync` latency on the relay's disk (acks).
    pub fsync: Option<Duration>,
    /// The in-process handler profile (fanout).
    pub profile: Option<profile::NodeProfile>,
    /// The in-process per-connection memory split (idle).
    pub memory: Option<profile::ConnMemory>,
}

/// Why a run could not be made.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A server could not be started.
    #[error(transparent)]
    Target(#[from] target::TargetError),
    /// Neither `--spawn` nor `--url`.
    #[error("give --spawn PATH/TO/concord-relay or --url ws://HOST:PORT/sync")]
    NoTarget,
}

fn relay(o: &Options, max_connections: usize) -> Result<Target, LoadError> {
    match (&o.spawn, &o.url) {
        (Some(bin), _) => Ok(Target::spawn_relay(bin, o.relay_config.as_deref(), max_connections)?),
        (None, Some(url)) => Ok(Target::external(url, o.relay_pid)?),
        (None, None) => Err(LoadError::NoTarget),
    }
}

fn progress(s: Scenario, what: &str, r: &PhaseResult) {
    eprintln!(
        "  {:<7} {what:<8} clients {}/{} in {:.1}s · delivered {:.0}/s · acked {:.0}/s · p99 {} · \
         rss {:?}->{:?} KiB · disconnects {} ({} slow)",
        s.name(),
        r.clients_ok,
        r.clients_ok + r.clients_failed,
        r.connect_secs,
        r.per_sec(r.stats.delivered),
        r.per_sec(r.stats.acked),
        report::ms(r.stats.latency.quantile(0.99)),
        r.rss_before,
        r.rss_after,
        r.disconnected,
        r.stats.slow_consumer,
    );
}

/// Runs every selected scenario.
pub async fn run(o: &Options) -> Result<Vec<Outcome>, LoadError> {
    let timing = Timing {
        warmup: o.warmup,
        duration: o.duration,
        connect_concurrency: o.connect_concurrency,
        settle: Duration::from_secs(2),
    };
    let mut out = Vec::new();
    let mut node_profile: Option<profile::NodeProfile> = None;
    for &s in &o.scenarios {
        let params = o.params(s);
        eprintln!(
            "concord-load: {} — {} clients, {} docs, {}",
            s.name(),
            params.clients,
            params.docs,
            params.load
        );
        let max_connections = (params.clients + 1024).max(20_000);
        let mut fsync = None;
        let concord = {
            let target = relay(o, max_connections)?;
            if matches!(s, Scenario::Acks | Scenario::AcksBatch) {
                let dir = target.data_dir.clone().unwrap_or_else(std::env::temp_dir);
                match procfs::fsync_latency(&dir, o.fsync_samples) {
                    Ok(d) => fsync = Some(d),
                    Err(e) => eprintln!("  fsync probe in {} failed: {e}", dir.display()),
                }
            }
            let r = scenario::run_phase(&target, &params, &timing, s.name()).await;
            progress(s, "concord", &r);
            r
        };
        let baseline = if o.baseline && !matches!(s, Scenario::Acks | Scenario::AcksBatch) {
            let target = Target::spawn_baseline(o.baseline_flush_each, o.baseline_ws_buffer)?;
            let r = scenario::run_phase(&target, &params, &timing, s.name()).await;
            progress(s, "baseline", &r);
            Some(r)
        } else {
            None
        };
        let baseline_each = if o.baseline && !o.baseline_flush_each && s == Scenario::Fanout {
            let target = Target::spawn_baseline(true, o.baseline_ws_buffer)?;
            let r = scenario::run_phase(&target, &params, &timing, s.name()).await;
            progress(s, "base/each", &r);
            Some(r)
        } else {
            None
        };
        let wants_profile = matches!(s, Scenario::Fanout | Scenario::Acks | Scenario::AcksBatch);
        if o.profile && wants_profile && node_profile.is_none() {
            let members = if s == Scenario::Fanout { params.clients.clamp(2, 1000) } else { 100 };
            match tokio::task::spawn_blocking(move || profile::profile(members, 50)).await {
                Ok(Ok(p)) => {
                    eprintln!(
                        "  profile  handler {:.1} µs/write with {members} subscribers, {:.1} alone → {:.2} µs \
                         per delivery; storage {:.1} µs/write",
                        p.write_fanout_us,
                        p.write_alone_us,
                        p.per_delivery_us(),
                        p.storage_alone_us,
                    );
                    node_profile = Some(p);
                }
                Ok(Err(e)) => eprintln!("  handler profile failed: {e}"),
                Err(e) => eprintln!("  handler profile failed: {e}"),
            }
        }
        let profile = node_profile.clone().filter(|_| wants_profile);
        let memory = if o.profile && s == Scenario::Idle {
            let (conns, docs) = (params.clients, params.docs);
            match tokio::task::spawn_blocking(move || profile::conn_memory(conns, docs)).await {
                Ok(Ok(m)) => Some(m),
                Ok(Err(e)) => {
                    eprintln!("  memory profile failed: {e}");
                    None
                }
                Err(e) => {
                    eprintln!("  memory profile failed: {e}");
                    None
                }
            }
        } else {
            None
        };
        out.push(Outcome { scenario: s, params, concord, baseline, baseline_each, fsync, profile, memory });
    }
    Ok(out)
}
