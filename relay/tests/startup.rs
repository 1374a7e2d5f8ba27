//! A node starts from the version records stored beside its documents: it reads no
//! document bodies, however many it stores. A store written before those records existed
//! is read once, and records are written for it.
//!
//! `cargo test --release -p concord-relay --test startup -- --ignored --nocapture`
//! times start-up with 100k and 1M stored documents.

use std::sync::Arc;
use std::time::{Duration, Instant};

use concord_core::codec::Wire;
use concord_core::{Document, ReplicaId};
use concord_relay::cluster::ClusterView;
use concord_relay::node::{Node, NodeOptions};
use concord_relay::storage::{Storage, WriteOp};
use concord_relay::{Handler, Metrics};

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "concord-startup-{name}-{}-{}",
        std::process::id(),
        concord_relay::node::random_u64()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn cluster() -> ClusterView {
    let nodes: Vec<(String, String, u32)> =
        ["a", "b", "c"].iter().map(|id| (id.to_string(), "127.0.0.1:9".to_string(), 1)).collect();
    ClusterView::new("a", &nodes, 3, 2, 2, 16)
}

/// Stores `n` one-key documents the way a node does (snapshot + version record), and,
/// with `records`, marks the store as having every record.
async fn fill(storage: &Storage, n: usize, records: bool) {
    let mut doc = Document::new(ReplicaId(7));
    doc.increment("n", 1).unwrap();
    let (bytes, mut vv) = (doc.encode(), Vec::new());
    doc.version().put(&mut vv);
    for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
        let mut ops = Vec::with_capacity(chunk.len() * 2);
        for i in chunk {
            let id = format!("doc-{i:07}");
            ops.push(WriteOp::PutSnapshot { doc: id.clone(), bytes: bytes.clone(), truncate_through: None });
            if records {
                ops.push(WriteOp::PutVersion { doc: id, bytes: vv.clone() });
            }
        }
        storage.write(ops).await.unwrap();
    }
    if records {
        storage
            .write(vec![WriteOp::PutMeta { key: "versions_complete".into(), bytes: vec![1] }])
            .await
            .unwrap();
    }
}

fn stored(node: &Node) -> u64 {
    let (_, _, body) = node.http_get("/cluster", None).expect("/cluster");
    let body = String::from_utf8(body).unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["documents_stored"].as_u64().unwrap()
}

async fn open(dir: &std::path::Path) -> (Node, Storage) {
    let storage = Storage::open(dir).unwrap();
    let node = Node::open(storage.clone(), Arc::new(Metrics::new()), NodeOptions::default(), Some(cluster()))
        .await
        .unwrap();
    (node, storage)
}

#[tokio::test]
async fn a_cluster_node_starts_without_reading_a_document() {
    let dir = tempdir("records");
    let storage = Storage::open(&dir).unwrap();
    fill(&storage, 2_000, true).await;
    storage.close().await;
    drop(storage);
    let (node, storage) = open(&dir).await;
    assert_eq!(storage.loads(), 0, "start-up read document bodies");
    assert_eq!(stored(&node), 2_000);
}

#[tokio::test]
async fn a_store_without_version_records_is_read_once_and_then_never_again() {
    let dir = tempdir("upgrade");
    let storage = Storage::open(&dir).unwrap();
    fill(&storage, 300, false).await;
    storage.close().await;
    drop(storage);
    {
        let (node, storage) = open(&dir).await;
        assert_eq!(storage.loads(), 300);
        assert_eq!(stored(&node), 300);
        assert_eq!(storage.versions().await.unwrap().len(), 300);
        storage.close().await;
    }
    let (node, storage) = open(&dir).await;
    assert_eq!(storage.loads(), 0);
    assert_eq!(stored(&node), 300);
}

#[tokio::test]
#[ignore = "a benchmark: run with -- --ignored --nocapture"]
async fn startup_time_with_100k_and_1m_documents() {
    for n in [100_000usize, 1_000_000] {
        let dir = tempdir(&format!("bench-{n}"));
        let storage = Storage::open(&dir).unwrap();
        let t = Instant::now();
        fill(&storage, n, true).await;
        let filled = t.elapsed();
        storage.close().await;
        drop(storage);
        let t = Instant::now();
        let (node, storage) = open(&dir).await;
        let took = t.elapsed();
        assert_eq!(storage.loads(), 0);
        assert_eq!(stored(&node), n as u64);
        println!(
            "{n} documents: start-up to serving {:.2} s ({:.1} µs per document; filling the store took {:.1} s)",
            took.as_secs_f64(),
            took.as_secs_f64() * 1e6 / n as f64,
            filled.as_secs_f64()
        );
        assert!(took < Duration::from_secs(600));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
