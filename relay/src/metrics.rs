//! Prometheus text exposition (format 0.0.4), hand-written.
//!
//! Counters are relaxed atomics: updating one is a single `fetch_add`. Errors are
//! counted per code label in a small map behind a mutex — errors are the cold path.
//!
//! ```
//! use concord_relay::metrics::Metrics;
//! let m = Metrics::new();
//! m.messages_in.inc();
//! m.error("rate_limited");
//! m.observe_ack_latency(std::time::Duration::from_millis(3));
//! let text = m.render();
//! assert!(text.contains("concord_messages_in_total 1"));
//! assert!(text.contains("concord_errors_total{code=\"rate_limited\"} 1"));
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// Subtracts one.
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds (seconds) of the ack-latency histogram buckets; `+Inf` is implicit.
pub const ACK_LATENCY_BUCKETS: [f64; 12] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// A histogram with the fixed [`ACK_LATENCY_BUCKETS`].
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per-bucket (non-cumulative) counts; the last slot is `+Inf`.
    buckets: [AtomicU64; ACK_LATENCY_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = ACK_LATENCY_BUCKETS.iter().position(|&le| secs <= le).unwrap_or(ACK_LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, le) in ACK_LATENCY_BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        cumulative += self.buckets[ACK_LATENCY_BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        // `count` equals the +Inf bucket by construction; report that to stay consistent
        // under concurrent updates.
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// Every metric of a relay node. Share it as `Arc<Metrics>`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// WebSocket connections accepted since start.
    pub connections_total: Counter,
    /// WebSocket connections open now.
    pub connections_open: Gauge,
    /// WebSocket messages received.
    pub messages_in: Counter,
    /// WebSocket messages sent.
    pub messages_out: Counter,
    /// Payload bytes received.
    pub bytes_in: Counter,
    /// Payload bytes sent.
    pub bytes_out: Counter,
    /// Deltas durably persisted by this node (updated by the sync handler).
    pub deltas_persisted: Counter,
    /// Durable transactions (group commits) of this node's storage (updated by the sync
    /// handler): deltas persisted per commit tells how well writes are grouped.
    pub storage_commits: Counter,
    /// HTTP requests served (health, metrics, static files, bad requests).
    pub http_requests: Counter,
    /// Time from receiving a client's delta to acking it.
    pub ack_latency: Histogram,
    errors: Mutex<BTreeMap<&'static str, u64>>,
}

impl Metrics {
    /// All zero.
    pub fn new() -> Metrics {
        Metrics::default()
    }

    /// Counts one error with the given code label (e.g. `"slow_consumer"`). Codes
    /// should be a small fixed set: each one is a time series.
    pub fn error(&self, code: &'static str) {
        if let Ok(mut map) = self.errors.lock() {
            *map.entry(code).or_insert(0) += 1;
        }
    }

    /// Errors counted so far with `code`.
    pub fn errors(&self, code: &str) -> u64 {
        self.errors.lock().ok().and_then(|m| m.get(code).copied()).unwrap_or(0)
    }

    /// Records one ack latency.
    pub fn observe_ack_latency(&self, d: Duration) {
        self.ack_latency.observe(d);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {v}");
        };
        counter(
            &mut out,
            "concord_connections_total",
            "WebSocket connections accepted.",
            self.connections_total.get(),
        );
        let _ = writeln!(out, "# HELP concord_connections_open WebSocket connections open.");
        let _ = writeln!(out, "# TYPE concord_connections_open gauge");
        let _ = writeln!(out, "concord_connections_open {}", self.connections_open.get());
        counter(
            &mut out,
            "concord_messages_in_total",
            "WebSocket messages received.",
            self.messages_in.get(),
        );
        counter(&mut out, "concord_messages_out_total", "WebSocket messages sent.", self.messages_out.get());
        counter(&mut out, "concord_bytes_in_total", "WebSocket payload bytes received.", self.bytes_in.get());
        counter(&mut out, "concord_bytes_out_total", "WebSocket payload bytes sent.", self.bytes_out.get());
        counter(
            &mut out,
            "concord_deltas_persisted_total",
            "Deltas durably persisted by this node.",
            self.deltas_persisted.get(),
        );
        counter(
            &mut out,
            "concord_storage_commits_total",
            "Durable storage transactions (group commits).",
            self.storage_commits.get(),
        );
        counter(
            &mut out,
            "concord_http_requests_total",
            "Plain HTTP requests served.",
            self.http_requests.get(),
        );
        let _ = writeln!(out, "# HELP concord_errors_total Errors by code.");
        let _ = writeln!(out, "# TYPE concord_errors_total counter");
        if let Ok(map) = self.errors.lock() {
            for (code, n) in map.iter() {
                let _ = writeln!(out, "concord_errors_total{{code=\"{}\"}} {n}", escape_label(code));
            }
        }
        self.ack_latency.render(
            &mut out,
            "concord_ack_latency_seconds",
            "Time from receiving a delta to acking it.",
        );
        out
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::new();
        m.observe_ack_latency(Duration::from_micros(500)); // <= 0.001
        m.observe_ack_latency(Duration::from_millis(3)); // <= 0.005
        m.observe_ack_latency(Duration::from_secs(10)); // +Inf
        let text = m.render();
        assert!(text.contains("concord_ack_latency_seconds_bucket{le=\"0.001\"} 1\n"));
        assert!(text.contains("concord_ack_latency_seconds_bucket{le=\"0.0025\"} 1\n"));
        assert!(text.contains("concord_ack_latency_seconds_bucket{le=\"0.005\"} 2\n"));
        assert!(text.contains("concord_ack_latency_seconds_bucket{le=\"5\"} 2\n"));
        assert!(text.contains("concord_ack_latency_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("concord_ack_latency_seconds_count 3\n"));
        assert!(text.contains("concord_ack_latency_seconds_sum 10.0035\n"));
    }

    #[test]
    fn every_line_is_a_comment_or_a_sample() {
        let m = Metrics::new();
        m.connections_total.inc();
        m.connections_open.inc();
        m.bytes_in.add(10);
        m.error("a\"b");
        for line in m.render().lines() {
            assert!(
                line.starts_with("# HELP ")
                    || line.starts_with("# TYPE ")
                    || line.rsplit_once(' ').is_some_and(|(_, v)| v.parse::<f64>().is_ok()),
                "{line}"
            );
        }
        assert!(m.render().contains("concord_errors_total{code=\"a\\\"b\"} 1"));
        assert_eq!(m.errors("a\"b"), 1);
        assert_eq!(m.errors("none"), 0);
    }
}
