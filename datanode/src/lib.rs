//! The Lode datanode: stores block replicas on local disks with their chunk checksums, takes part in
//! write pipelines (verify, write, fsync, forward, acknowledge), serves verified reads of any byte
//! range, and reports its replicas to the namenode.
//!
//! Read [`store`] first (the on-disk layout and its crash rules), then [`server`] (reads and the
//! pipeline) and [`heartbeat`] (registration and reports).

pub mod config;
pub mod error;
pub mod heartbeat;
pub mod server;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use lode_protocol::net::Pool;

pub use config::Config;
pub use error::Error;

pub use lode_protocol::service::ShutdownSignal;

/// Opens the block store, registers with the namenode and serves on `endpoint` until `shutdown`.
pub async fn run(
    config: Config,
    endpoint: quinn::Endpoint,
    shutdown: ShutdownSignal,
) -> Result<(), Error> {
    let dirs = config.data_dirs.clone();
    let store = tokio::task::spawn_blocking(move || store::BlockStore::open(&dirs))
        .await
        .map_err(|e| Error::Invalid(format!("open block store: {e}")))??;
    let store = Arc::new(store);
    let shared = Arc::new(server::Shared {
        name: config.name.clone(),
        store,
        pool: Pool::new(endpoint.clone(), Duration::from_secs(5)),
        reports: Arc::new(heartbeat::Reports::default()),
    });
    tracing::info!(name = %config.name, addr = ?endpoint.local_addr().ok(), replicas = shared.store.report().len(), "datanode serving");
    let hb = tokio::spawn(heartbeat::run(
        shared.clone(),
        config.namenode.clone(),
        config.advertised(),
        Duration::from_millis(config.heartbeat_interval_ms),
        shutdown.clone(),
    ));
    server::serve(endpoint, shared, shutdown).await;
    hb.abort();
    Ok(())
}
