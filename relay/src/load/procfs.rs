//! What the kernel says about a process: resident memory, CPU time (whole process and
//! per thread name), and how long an `fdatasync` takes on a given disk.
//!
//! Linux only (`/proc`); elsewhere the readers return `None` and the report says so.

use std::collections::BTreeMap;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// Clock ticks per second of `/proc/*/stat` times (`USER_HZ`: 100 on every Linux
/// architecture the relay targets).
pub const TICKS_PER_SEC: f64 = 100.0;

/// `VmRSS` of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// `(comm, utime + stime)` from a `/proc/.../stat` line.
fn parse_stat(stat: &str) -> Option<(String, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    // Fields after the command: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// CPU time (user + system) `pid` has used so far, in ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat).map(|(_, t)| t)
}

/// CPU nanoseconds of `pid`'s live threads (from `schedstat`), summed per thread name
/// (e.g. `tokio-rt-worker`, `concord-storag`). Threads that exited are missing, so
/// compare two readings only for long-lived threads.
pub fn thread_cpu_ns(pid: u32) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for task in tasks.flatten() {
        let path = task.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default().trim().to_string();
        if let Some(ns) =
            std::fs::read_to_string(path.join("schedstat")).ok().as_deref().and_then(schedstat_ns)
        {
            *out.entry(comm).or_insert(0) += ns;
        }
    }
    out
}

fn schedstat_ns(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// CPU nanoseconds the calling thread has used so far.
pub fn this_thread_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat").ok().as_deref().and_then(schedstat_ns)
}

/// `/proc/loadavg`'s first three fields, for the report's noise context.
pub fn loadavg() -> Option<String> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

/// Times `n` overwrite-then-`fdatasync` cycles of one 4 KiB block on a temp file in
/// `dir` (the physical limit of a commit that must be durable). Returns the mean.
pub fn fsync_latency(dir: &Path, n: u32) -> std::io::Result<Duration> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("fsync-probe-{}", std::process::id()));
    let mut file =
        std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path)?;
    let block = [0x5au8; 4096];
    for _ in 0..16 {
        file.write_all(&block)?;
    }
    file.sync_all()?;
    let start = Instant::now();
    for i in 0..n.max(1) {
        file.seek(SeekFrom::Start(u64::from(i % 16) * 4096))?;
        file.write_all(&block)?;
        file.sync_data()?;
    }
    let took = start.elapsed() / n.max(1);
    drop(file);
    let _ = std::fs::remove_file(&path);
    Ok(took)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_spaces_in_the_name_parse() {
        let line = "42 (tokio runtime) S 1 42 42 0 -1 4194560 100 0 0 0 250 17 0 0 20 0 3 0 1 2 3";
        assert_eq!(parse_stat(line), Some(("tokio runtime".to_string(), 267)));
    }

    #[test]
    fn this_process_is_visible() {
        let me = std::process::id();
        assert!(rss_kib(me).is_some_and(|r| r > 0));
        assert!(cpu_ticks(me).is_some());
        assert!(!thread_cpu_ns(me).is_empty());
        assert!(this_thread_cpu_ns().is_some());
    }
}
