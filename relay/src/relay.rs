//! The library's entry: a whole relay node from its [`Config`] — storage, the sync
//! handler, cluster links, the ticker, the public and admin listeners — until shutdown.
//!
//! ```no_run
//! # async fn demo(config: concord_relay::Config) -> anyhow::Result<()> {
//! use tokio::net::TcpListener;
//! let public = TcpListener::bind(&config.listen).await?;
//! let admin = TcpListener::bind(&config.admin_listen).await?;
//! concord_relay::Relay::start(config, public, admin, std::future::pending()).await
//! # }
//! ```

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::cluster::ClusterView;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::node::{Node, NodeOptions};
use crate::storage::Storage;

/// One relay node, opened and not yet serving.
pub struct Relay {
    config: Config,
    node: Node,
    metrics: Arc<Metrics>,
}

impl Relay {
    /// Opens the store and loads what the node needs to serve (hints, the stored
    /// documents' ids). Fails on a store it cannot open (e.g. one another process holds)
    /// or a bad key in `[[auth.keys]]`.
    pub async fn open(config: Config) -> anyhow::Result<Relay> {
        let storage = Storage::open(&config.data_dir)?;
        let metrics = Arc::new(Metrics::new());
        let options = NodeOptions {
            auth_secret: config.auth_secret.as_ref().map(|s| s.as_bytes().to_vec()),
            auth_keys: config.verify_keys().map_err(|e| anyhow::anyhow!("config error: {e}"))?,
            doc_cache_capacity: config.limits.doc_cache_capacity,
            max_frame: config.limits.max_frame_bytes,
            node_id: config.node_id.clone(),
            limits: config.limits.documents(),
            ..NodeOptions::default()
        };
        let cluster = (config.cluster.nodes.len() > 1).then(|| {
            let nodes: Vec<(String, String, u32)> =
                config.cluster.nodes.iter().map(|n| (n.id.clone(), n.addr.clone(), n.weight)).collect();
            ClusterView::new(
                &config.node_id,
                &nodes,
                config.cluster.replicas,
                config.cluster.r(),
                config.cluster.w(),
                config.cluster.vnodes,
            )
        });
        let node = Node::open(storage, metrics.clone(), options, cluster).await?;
        Ok(Relay { config, node, metrics })
    }

    /// Serves on `public` (WebSocket `/sync`, `/healthz`, static files) and `admin`
    /// (`/metrics`, `/cluster*`, `/healthz`) until `shutdown` resolves, then drains
    /// connections, stops the cluster links and flushes the store.
    pub async fn run(self, public: TcpListener, admin: TcpListener, shutdown: impl Future<Output = ()>) {
        let Relay { config, node, metrics } = self;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut ticker_stop = stopped.clone();
        tokio::spawn(node.clone().run_ticker(async move {
            let _ = ticker_stop.changed().await;
        }));
        crate::cluster::spawn_links(node.clone(), stopped);
        let node = Arc::new(node);
        // The admin listener outlives the public one's drain, so it can be watched; it
        // stops with the ticker and the links.
        let mut admin_stop = stop.subscribe();
        let admin_task = tokio::spawn({
            let (config, node, metrics) = (config.clone(), node.clone(), metrics.clone());
            async move {
                crate::server::run_admin(admin, &config, node, metrics, async move {
                    let _ = admin_stop.wait_for(|stopped| *stopped).await;
                })
                .await;
            }
        });
        crate::server::run(public, &config, node, metrics, shutdown).await;
        // Without receivers the ticker and the links have stopped already.
        if stop.send(true).is_err() {
            tracing::debug!("ticker and links had stopped before shutdown");
        }
        if let Err(e) = admin_task.await {
            tracing::warn!(error = %e, "admin listener task failed");
        }
    }

    /// [`Relay::open`], then [`Relay::run`].
    pub async fn start(
        config: Config,
        public: TcpListener,
        admin: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        Relay::open(config).await?.run(public, admin, shutdown).await;
        Ok(())
    }
}
