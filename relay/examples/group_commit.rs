//! Group commit vs one fsync per write, measured in the same run.
//!
//! ```text
//! cargo run --release -p concord-relay --example group_commit [-- WRITES CONCURRENCY]
//! ```
//!
//! Both runs use the same [`Storage`] with the same workload — `CONCURRENCY` tasks
//! writing `WRITES` deltas of 256 bytes in total, each awaiting durability — once with
//! group commit and once with `max_batch = 1`, i.e. one durable transaction (one fsync)
//! per write.

use std::time::{Duration, Instant};

use concord_relay::storage::{Storage, StorageOptions};

struct Run {
    elapsed: Duration,
    writes: u64,
    commits: u64,
}

async fn run(max_batch: usize, writes: u64, concurrency: u64) -> Run {
    let dir = std::env::temp_dir().join(format!("concord-group-commit-{}-{max_batch}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let storage = Storage::open_with(&dir, StorageOptions { max_batch, ..StorageOptions::default() })
        .expect("open storage");
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..concurrency {
        let storage = storage.clone();
        let per_task = writes / concurrency + u64::from(t < writes % concurrency);
        tasks.spawn(async move {
            for i in 0..per_task {
                storage.put_delta(format!("doc-{t}"), i + 1, vec![0xab; 256]).await.expect("durable write");
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("writer task");
    }
    let elapsed = start.elapsed();
    let result = Run { elapsed, writes: storage.writes(), commits: storage.commits() };
    storage.close().await;
    drop(storage);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn rate(r: &Run) -> f64 {
    r.writes as f64 / r.elapsed.as_secs_f64()
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let writes: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let concurrency: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(64);

    let baseline = run(1, writes, concurrency).await;
    let grouped = run(StorageOptions::default().max_batch, writes, concurrency).await;
    for (name, r) in [("one fsync per write", &baseline), ("group commit", &grouped)] {
        println!(
            "{name:>20}: {:>6} writes in {:>8.1?} = {:>9.0} writes/s, {:>5} commits ({:.1} writes/commit)",
            r.writes,
            r.elapsed,
            rate(r),
            r.commits,
            r.writes as f64 / r.commits.max(1) as f64
        );
    }
    println!(
        "group commit is {:.1}x the one-fsync-per-write baseline ({concurrency} concurrent writers)",
        rate(&grouped) / rate(&baseline)
    );
}
