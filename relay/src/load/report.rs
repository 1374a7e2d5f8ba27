//! The markdown report: one summary table (scenario | concord | baseline | ratio |
//! target | pass) and one table of details per scenario.

use std::fmt::Write as _;

use super::profile::NodeProfile;
use super::scenario::{Load, PhaseResult, Scenario};
use super::{Options, Outcome};

/// `1234567.8` → `1,234,568`.
pub fn int(v: f64) -> String {
    if !v.is_finite() {
        return "—".into();
    }
    let n = v.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        out.insert(0, '-');
    }
    out
}

/// Nanoseconds as `850 µs`, `1.23 ms` or `2.1 s`.
pub fn ms(ns: u64) -> String {
    let v = ns as f64;
    if ns == 0 {
        "—".into()
    } else if v < 1e6 {
        format!("{:.0} µs", v / 1e3)
    } else if v < 1e9 {
        format!("{:.2} ms", v / 1e6)
    } else {
        format!("{:.2} s", v / 1e9)
    }
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() && b.is_finite() {
        format!("{:.2}", a / b)
    } else {
        "—".into()
    }
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "—".into())
}

fn pass(ok: bool) -> &'static str {
    if ok {
        "yes"
    } else {
        "**NO**"
    }
}

/// Target thresholds of issue 4, item 6.
pub mod targets {
    /// fanout: delivered messages per second.
    pub const FANOUT_DELIVERED: f64 = 150_000.0;
    /// mixed: p99 end-to-end latency, ns.
    pub const MIXED_P99_NS: u64 = 5_000_000;
    /// acks: deltas acknowledged after fsync per second.
    pub const ACKS_PER_SEC: f64 = 50_000.0;
    /// idle: RSS per connection, KiB.
    pub const IDLE_KIB: f64 = 20.0;
}

fn describe(o: &Outcome) -> String {
    let p = &o.params;
    let load = match p.load {
        Load::Rate(r) => {
            let delivered = r * p.batch as f64 * (p.clients as f64 / p.docs.max(1) as f64 - 1.0).max(0.0);
            format!("{} writes/s offered (≈{} deliveries/s)", int(r * p.batch as f64), int(delivered))
        }
        other => other.to_string(),
    };
    let batch = if p.batch > 1 { format!(", {} deltas/frame", p.batch) } else { String::new() };
    let docs = if p.docs == 1 { "1 doc".to_string() } else { format!("{} docs", int(p.docs as f64)) };
    format!("{} clients, {docs}, {} ops, {load}{batch}", int(p.clients as f64), p.ops)
}

fn all_connected(r: &PhaseResult) -> bool {
    r.clients_failed == 0 && r.clients_ok > 0
}

/// The summary rows of one outcome.
fn summary(o: &Outcome, out: &mut String) {
    let c = &o.concord;
    let b = o.baseline.as_ref();
    let d = describe(o);
    let mut row = |label: String, cv: String, bv: String, r: String, target: &str, ok: Option<bool>| {
        let _ = writeln!(out, "| {label} | {cv} | {bv} | {r} | {target} | {} |", ok.map(pass).unwrap_or(""));
    };
    match o.scenario {
        Scenario::Fanout => {
            let cd = c.per_sec(c.stats.delivered);
            let bd = b.map(|b| b.per_sec(b.stats.delivered));
            row(
                format!("**fanout** delivered msg/s ({d})"),
                int(cd),
                opt(bd, int),
                opt(bd, |bd| ratio(cd, bd)),
                "≥ 150,000",
                Some(cd >= targets::FANOUT_DELIVERED && all_connected(c)),
            );
            if let Some(e) = &o.baseline_each {
                let ed = e.per_sec(e.stats.delivered);
                row(
                    "fanout delivered msg/s vs a baseline that flushes every frame, like the relay's writer"
                        .into(),
                    int(cd),
                    int(ed),
                    ratio(cd, ed),
                    "—",
                    None,
                );
            }
            let cl = c.stats.latency.quantile(0.99);
            let bl = b.map(|b| b.stats.latency.quantile(0.99));
            row(
                "fanout p99 delivery latency (clients still connected)".into(),
                ms(cl),
                opt(bl.map(|x| x as f64), |x| ms(x as u64)),
                opt(bl.map(|x| x as f64), |x| ratio(cl as f64, x)),
                "—",
                None,
            );
        }
        Scenario::Mixed => {
            let cl = c.stats.latency.quantile(0.99);
            let bl = b.map(|b| b.stats.latency.quantile(0.99) as f64);
            row(
                format!("**mixed** p99 end-to-end latency ({d})"),
                ms(cl),
                opt(bl, |x| ms(x as u64)),
                opt(bl, |x| ratio(cl as f64, x)),
                "≤ 5 ms",
                Some(cl <= targets::MIXED_P99_NS && c.stats.delivered > 0 && all_connected(c)),
            );
            let cd = c.per_sec(c.stats.delivered);
            let bd = b.map(|b| b.per_sec(b.stats.delivered));
            row(
                "mixed delivered msg/s".into(),
                int(cd),
                opt(bd, int),
                opt(bd, |bd| ratio(cd, bd)),
                "—",
                None,
            );
        }
        Scenario::Acks | Scenario::AcksBatch => {
            let ca = c.per_sec(c.stats.acked);
            let fsyncs = o.fsync.map(|f| 1.0 / f.as_secs_f64().max(1e-9));
            row(
                format!("**{}** durable acks/s ({d})", o.scenario.name()),
                format!("{} acks/s", int(ca)),
                opt(fsyncs, |f| format!("{} fsyncs/s", int(f))),
                opt(fsyncs, |f| format!("{:.0} acks per fsync time", ca / f)),
                "≥ 50,000",
                Some(ca >= targets::ACKS_PER_SEC && all_connected(c)),
            );
        }
        Scenario::Idle => {
            let cr = c.rss_per_conn_kib();
            let br = b.and_then(PhaseResult::rss_per_conn_kib);
            row(
                format!("**idle** relay RSS per connection ({d})"),
                opt(cr, |x| format!("{x:.1} KiB")),
                opt(br, |x| format!("{x:.1} KiB")),
                match (cr, br) {
                    (Some(x), Some(y)) => ratio(x, y),
                    _ => "—".into(),
                },
                "≤ 20 KiB",
                cr.map(|x| x <= targets::IDLE_KIB && all_connected(c)),
            );
        }
    }
}

fn details(o: &Outcome, out: &mut String) {
    let _ = writeln!(out, "\n### {} — {}\n", o.scenario.name(), describe(o));
    let mut names = vec!["concord"];
    let mut phases: Vec<&PhaseResult> = vec![&o.concord];
    if let Some(b) = &o.baseline {
        names.push("baseline");
        phases.push(b);
    }
    if let Some(b) = &o.baseline_each {
        names.push("baseline, flush per frame");
        phases.push(b);
    }
    let _ = writeln!(out, "| metric | {} |\n|---|{}", names.join(" | "), "---:|".repeat(names.len()));
    let mut row = |name: &str, f: &dyn Fn(&PhaseResult) -> String| {
        let cells: Vec<String> = phases.iter().map(|p| f(p)).collect();
        let _ = writeln!(out, "| {name} | {} |", cells.join(" | "));
    };
    row("clients connected / failed", &|r| format!("{} / {}", r.clients_ok, r.clients_failed));
    row("connect + subscribe time", &|r| format!("{:.1} s", r.connect_secs));
    row("measuring window", &|r| format!("{:.1} s", r.window_secs));
    if o.scenario != Scenario::Idle {
        row("deltas written /s", &|r| int(r.per_sec(r.stats.writes)));
        row("delivered msg/s (deltas of others received)", &|r| int(r.per_sec(r.stats.delivered)));
        row("acked deltas /s (`Ack` events)", &|r| int(r.per_sec(r.stats.acked)));
        let q = |r: &PhaseResult, q: f64| ms(r.stats.latency.quantile(q));
        row("delivery latency p50 / p99 / p99.9 / max", &|r| {
            format!("{} / {} / {} / {}", q(r, 0.5), q(r, 0.99), q(r, 0.999), ms(r.stats.latency.max()))
        });
        let a = |r: &PhaseResult, q: f64| ms(r.stats.ack_latency.quantile(q));
        row("ack latency p50 / p99 / p99.9", &|r| {
            format!("{} / {} / {}", a(r, 0.5), a(r, 0.99), a(r, 0.999))
        });
        row("bytes per op written (frame payload / deltas)", &|r| {
            opt((r.stats.writes > 0).then(|| r.stats.bytes_sent as f64 / r.stats.writes as f64), |x| {
                format!("{x:.1} B")
            })
        });
        row("bytes per delivered msg (payload)", &|r| {
            opt(
                (r.stats.delivered > 0).then(|| r.stats.bytes_received as f64 / r.stats.delivered as f64),
                |x| format!("{x:.1} B"),
            )
        });
    }
    row("slow-consumer disconnects (1013)", &|r| r.stats.slow_consumer.to_string());
    row("other disconnects", &|r| {
        let other = r.disconnected.saturating_sub(r.stats.slow_consumer as usize);
        match (&r.disconnect_sample, other) {
            (Some(s), n) if n > 0 => format!("{n} ({s})"),
            _ => other.to_string(),
        }
    });
    row("protocol errors", &|r| match &r.stats.error_sample {
        Some(s) => format!("{} (first: {s})", r.stats.errors),
        None => r.stats.errors.to_string(),
    });
    row("server RSS before → after", &|r| {
        format!(
            "{} → {} KiB",
            opt(r.rss_before.map(|x| x as f64), int),
            opt(r.rss_after.map(|x| x as f64), int)
        )
    });
    row("server RSS growth per connection", &|r| opt(r.rss_per_conn_kib(), |x| format!("{x:.1} KiB")));
    row("server CPU (cores) during the window", &|r| opt(r.target_cores, |x| format!("{x:.2}")));
    row("server threads (cores)", &|r| {
        let mut v: Vec<(&String, &f64)> = r.target_threads.iter().filter(|(_, c)| **c >= 0.005).collect();
        v.sort_by(|a, b| b.1.total_cmp(a.1));
        let s: Vec<String> = v.iter().map(|(n, c)| format!("{n} {c:.2}")).collect();
        if s.is_empty() {
            "—".into()
        } else {
            s.join(", ")
        }
    });
    if o.scenario != Scenario::Idle {
        row("server CPU µs per delivered msg", &|r| {
            let n = r.stats.delivered;
            opt(r.target_cores.filter(|_| n > 0), |c| format!("{:.2}", c * r.window_secs * 1e6 / n as f64))
        });
        row("server CPU µs per written delta", &|r| {
            let n = r.stats.writes;
            opt(r.target_cores.filter(|_| n > 0), |c| format!("{:.2}", c * r.window_secs * 1e6 / n as f64))
        });
    }
    row("load tool CPU (cores)", &|r| opt(r.tool_cores, |x| format!("{x:.2}")));
    row("load average before", &|r| r.loadavg.clone().unwrap_or_else(|| "—".into()));
    let m = &o.concord.metrics;
    if !m.is_empty() {
        let per = |k: &str| m.get(k).map(|v| int(v / o.concord.window_secs.max(1e-9))).unwrap_or("—".into());
        let _ = writeln!(
            out,
            "\nRelay `/metrics` over the window: messages in {}/s, out {}/s, deltas persisted {}/s{}, \
             bytes out {}/s{}.",
            per("concord_messages_in_total"),
            per("concord_messages_out_total"),
            per("concord_deltas_persisted_total"),
            match (m.get("concord_deltas_persisted_total"), m.get("concord_storage_commits_total")) {
                (Some(d), Some(c)) if *c > 0.0 => format!(
                    " in {} commits/s ({:.1} deltas per commit)",
                    int(c / o.concord.window_secs.max(1e-9)),
                    d / c
                ),
                _ => String::new(),
            },
            per("concord_bytes_out_total"),
            m.iter()
                .filter(|(k, v)| k.starts_with("concord_errors_total") && **v > 0.0)
                .map(|(k, v)| format!(", {k} +{v}"))
                .collect::<String>()
        );
    }
    if let Some(p) = &o.profile {
        profile_text(o, p, out);
    }
    if let Some(m) = &o.memory {
        let total = o.concord.rss_per_conn_kib();
        let base = o.baseline.as_ref().and_then(PhaseResult::rss_per_conn_kib);
        let _ = writeln!(
            out,
            "\nWhere the relay's memory goes (in-process, {} connections through `Node` without \
             sockets): handler state (session, subscription, room membership, and the loaded documents \
             amortized) {:.1} KiB per connection; send \
             queue {:.1} KiB. Futures allocated per connection task: `connection::serve` {:.1} KiB \
             (of which `Node::on_binary` {:.1} KiB, kept inline). Measured live: relay {} vs \
             baseline {} per connection.",
            int(m.conns as f64),
            m.handler_bytes / 1024.0,
            m.queue_bytes / 1024.0,
            m.serve_future_bytes as f64 / 1024.0,
            m.on_binary_future_bytes as f64 / 1024.0,
            opt(total, |x| format!("{x:.1} KiB")),
            opt(base, |x| format!("{x:.1} KiB")),
        );
    }
    if let Some(f) = o.fsync {
        let _ = writeln!(
            out,
            "\nfsync baseline: mean `fdatasync` of a 4 KiB overwrite in the relay's data dir = {} \
             ({} fsyncs/s).",
            ms(f.as_nanos() as u64),
            int(1.0 / f.as_secs_f64().max(1e-9))
        );
    }
}

fn profile_text(o: &Outcome, p: &NodeProfile, out: &mut String) {
    let live =
        |n: u64| o.concord.target_cores.filter(|_| n > 0).map(|c| c * o.concord.window_secs * 1e6 / n as f64);
    if o.scenario == Scenario::Fanout {
        let _ = writeln!(
            out,
            "\nWhere the relay's time goes (in-process profile of the sync handler `Node`, no sockets, \
             {} writes by {} connections): **{:.1} µs CPU per write** when all {} subscribe to one \
             document vs {:.1} µs when each writes alone → **{:.2} µs per delivered message inside \
             the handler**, all of it under the node's global `Mutex`. Per subscriber the handler \
             runs `Session::on_local_deltas` + `Msg::encode`: {:.0} ns; encoding the frame once \
             would cost {:.0} ns per write in total. Decoding the incoming frame: {:.0} ns. \
             Frames queued per write: {:.2} (deltas to the other subscribers + the writer's ack).",
            int(p.writes as f64),
            p.members,
            p.write_fanout_us,
            p.members,
            p.write_alone_us,
            p.per_delivery_us(),
            p.per_member_ns,
            p.encode_once_ns,
            p.decode_ns,
            p.frames_per_write,
        );
        if let Some(live) = live(o.concord.stats.delivered) {
            let outside = (live - p.per_delivery_us()).max(0.0);
            let _ = writeln!(
                out,
                "The live relay spent {live:.2} µs of CPU per delivered message in this scenario, so \
                 ≈{outside:.2} µs ({:.0}%) is outside the handler: the per-connection writer task \
                 (one wake-up, one WebSocket frame and one `write(2)` per message).",
                100.0 * outside / live.max(1e-9)
            );
        }
    } else {
        let _ = writeln!(
            out,
            "\nWhere the relay's time goes (in-process profile of the sync handler `Node`, no sockets, \
             {} one-delta writes by {} connections each alone in a document): handler {:.1} µs CPU \
             per write (decode, lock, apply, encode for storage, ack); storage writer thread {:.1} \
             µs CPU per write at {:.1} writes per commit (redb insert + commit + `fsync` system \
             time).",
            int(p.writes as f64),
            p.members,
            p.write_alone_us,
            p.storage_alone_us,
            p.writes_per_commit.1,
        );
        let threads = &o.concord.threads_per_unit(o.concord.stats.acked);
        if let Some(live) = live(o.concord.stats.acked) {
            let _ = writeln!(
                out,
                "The live relay spent {live:.1} µs of CPU per acked delta here ({threads}); the storage \
                 writer is one thread, so its CPU per delta caps the node's durable throughput at \
                 about 1 / that cost.",
            );
        }
    }
}

/// Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (y, m, d) = civil(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", s / 3600, s % 3600 / 60)
}

/// The whole report.
pub fn render(o: &Options, outcomes: &[Outcome]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Relay load benchmark (`concord-load`)\n");
    let _ = writeln!(out, "Produced by:\n\n```sh\n{}\n```\n", o.command);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let _ = writeln!(
        out,
        "{} · {cores} cores · Linux {} · release build · {:.0} s window after {:.0} s warm-up per \
         phase · relay and baseline each spawned fresh per scenario on 127.0.0.1:0, the load \
         tool on the same cores · load average when the run began: {} (other processes share \
         these cores; compare each row with its baseline, and CPU per message over raw rates).\n",
        utc_now(),
        kernel.trim(),
        o.duration.as_secs_f64(),
        o.warmup.as_secs_f64(),
        outcomes.first().and_then(|oc| oc.concord.loadavg.clone()).unwrap_or_else(|| "—".into()),
    );
    let _ = writeln!(out, "| scenario | concord | baseline | ratio | target | pass |");
    let _ = writeln!(out, "|---|---:|---:|---:|---|:-:|");
    for oc in outcomes {
        summary(oc, &mut out);
    }
    if let Some(b) = o.baseline_ws_buffer {
        let _ = writeln!(out, "\nThe baseline ran with `--baseline-ws-buffer {b}`.");
    }
    if o.baseline_flush_each {
        let _ = writeln!(
            out,
            "\nThe baseline ran with `--baseline-flush each`: one flush per frame, like the relay."
        );
    }
    let _ = writeln!(
        out,
        "\nBaselines: fanout, mixed and idle run the same clients against `concord-load \
         baseline-server`, a plain tokio-tungstenite broadcast server (same 16 KiB WebSocket \
         buffers and 256-frame send queues as the relay; no CRDT, no storage, no acks). acks \
         compares with the raw `fdatasync` rate of the relay's disk. Ratios are concord / \
         baseline (for latency and memory: lower is better)."
    );
    let _ = writeln!(out, "\n## Details");
    for oc in outcomes {
        details(oc, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(int(0.0), "0");
        assert_eq!(int(999.4), "999");
        assert_eq!(int(1000.0), "1,000");
        assert_eq!(int(1_234_567.8), "1,234,568");
        assert_eq!(int(-4321.0), "-4,321");
        assert_eq!(ms(850_000), "850 µs");
        assert_eq!(ms(1_234_000), "1.23 ms");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(19_723), (2024, 1, 1));
        assert_eq!(civil(19_782), (2024, 2, 29));
    }
}
