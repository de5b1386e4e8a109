//! The datanode's Prometheus metrics, served at `/metrics` when `http_listen` is set.

use std::sync::Arc;

use axum::extract::State as AxumState;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::store::BlockStore;

/// A `result` label: `ok` or `failed`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `ok` or `failed`.
    pub result: String,
}

/// The datanode's metrics.
pub struct Metrics {
    registry: Registry,
    /// Bytes of blocks written (finalized) here.
    pub bytes_written: Counter,
    /// Bytes sent to readers.
    pub bytes_read: Counter,
    /// Scan tasks, by result.
    pub tasks: Family<ResultLabel, Counter>,
    /// Scan task durations.
    pub task_seconds: Histogram,
    /// Bytes re-verified by the block scanner.
    pub scanned_bytes: Counter,
    /// Corrupt replicas found by the block scanner.
    pub corrupt_found: Counter,
    /// Blocks refused (or cut short) because no data dir had room.
    pub no_space_refusals: Counter,
    /// Directory fsyncs that finalized blocks (brought up to the store's count when scraped).
    dir_syncs: Counter,
    blocks: Gauge,
    used_bytes: Gauge,
    remaining_bytes: Gauge,
    failed_dirs: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("lode_datanode");
        let m = Metrics {
            bytes_written: Counter::default(),
            bytes_read: Counter::default(),
            tasks: Family::default(),
            task_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            scanned_bytes: Counter::default(),
            corrupt_found: Counter::default(),
            no_space_refusals: Counter::default(),
            dir_syncs: Counter::default(),
            blocks: Gauge::default(),
            used_bytes: Gauge::default(),
            remaining_bytes: Gauge::default(),
            failed_dirs: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "written_bytes",
            "Bytes of blocks written here",
            m.bytes_written.clone(),
        );
        registry.register(
            "read_bytes",
            "Bytes of blocks sent to readers",
            m.bytes_read.clone(),
        );
        registry.register("tasks", "Scan tasks, by result", m.tasks.clone());
        registry.register(
            "task_seconds",
            "Scan task durations in seconds",
            m.task_seconds.clone(),
        );
        registry.register(
            "scanned_bytes",
            "Bytes re-verified by the block scanner",
            m.scanned_bytes.clone(),
        );
        registry.register(
            "corrupt_replicas_found",
            "Corrupt replicas found by the block scanner",
            m.corrupt_found.clone(),
        );
        registry.register("blocks", "Replicas stored here", m.blocks.clone());
        registry.register(
            "used_bytes",
            "Bytes of replicas stored here",
            m.used_bytes.clone(),
        );
        registry.register(
            "no_space_refusals",
            "Blocks refused or cut short because no data dir had room",
            m.no_space_refusals.clone(),
        );
        registry.register(
            "finalize_dir_syncs",
            "Fsyncs of a data dir's current/ that made finished blocks durable (one for all the \
             blocks finished at the same time)",
            m.dir_syncs.clone(),
        );
        registry.register(
            "remaining_bytes",
            "Bytes new blocks may still use on healthy data dirs",
            m.remaining_bytes.clone(),
        );
        registry.register(
            "failed_data_dirs",
            "Data dirs out of service after disk errors",
            m.failed_dirs.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    fn render(&self, store: &BlockStore) -> String {
        let space = store.space();
        self.blocks.set(store.block_count() as i64);
        self.used_bytes.set(space.used as i64);
        self.remaining_bytes.set(space.remaining as i64);
        self.failed_dirs.set(i64::from(space.failed_volumes));
        self.dir_syncs
            .inner()
            .fetch_max(store.dir_syncs(), std::sync::atomic::Ordering::Relaxed);
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[derive(Clone)]
struct Web {
    store: Arc<BlockStore>,
    metrics: Arc<Metrics>,
}

/// Serves `/metrics` until shutdown.
pub async fn serve(
    listener: tokio::net::TcpListener,
    store: Arc<BlockStore>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) {
    let app = axum::Router::new()
        .route("/metrics", get(scrape))
        .with_state(Web { store, metrics });
    lode_protocol::web::serve_until(listener, app, shutdown).await;
}

async fn scrape(AxumState(web): AxumState<Web>) -> impl IntoResponse {
    let store = web.store.clone();
    let metrics = web.metrics.clone();
    let body = tokio::task::spawn_blocking(move || metrics.render(&store))
        .await
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}
