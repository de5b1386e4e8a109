//! The Lode datanode: stores block replicas on local disks with their chunk checksums, takes part in
//! write pipelines (verify, write, fsync, forward, acknowledge), serves verified reads of any byte
//! range, and reports its replicas to the namenode.
//!
//! Read [`store`] first (the on-disk layout and its crash rules), then [`node`] (the context every
//! part shares), [`pipeline`] (writes and replica copies), [`server`] (requests: reads and pipeline
//! writes) and [`heartbeat`] (registration, reports, commands). The modules form layers: `node`
//! depends on none of the others; `pipeline`, `scanner` and `task` on `node`; `server` and
//! `heartbeat` on those; only `lib.rs` puts them together.

pub mod config;
pub mod error;
pub mod failpoints;
pub mod heartbeat;
pub mod http;
pub mod node;
pub mod pipeline;
pub mod scanner;
pub mod server;
pub mod store;
pub mod task;

use std::sync::Arc;
use std::time::Duration;

use lode_protocol::net::Pool;

pub use config::Config;
pub use error::Error;

pub use lode_protocol::service::ShutdownSignal;

/// Checks every data dir each `every` (never when zero); a failed dir's lost replicas go out with
/// the next heartbeat.
async fn check_disks(shared: Arc<node::Node>, every: Duration) {
    if every.is_zero() {
        return;
    }
    loop {
        tokio::time::sleep(every).await;
        let store = shared.store.clone();
        let newly_failed = tokio::task::spawn_blocking(move || {
            let before = store.failed_dirs();
            store.check_dirs();
            store.failed_dirs() > before
        })
        .await
        .unwrap_or(false);
        if newly_failed {
            shared.reports.wake();
        }
    }
}

/// Opens the block store, registers with the namenode and serves on `endpoint` until `shutdown`.
pub async fn run(
    config: Config,
    endpoint: quinn::Endpoint,
    shutdown: ShutdownSignal,
) -> Result<(), Error> {
    let dirs = config.data_dirs.clone();
    let reserved = config.reserved_bytes;
    let store = tokio::task::spawn_blocking(move || store::BlockStore::open(&dirs, reserved))
        .await
        .map_err(|e| Error::Invalid(format!("open block store: {e}")))??;
    let store = Arc::new(store);
    // SAFETY: geteuid has no arguments.
    if unsafe { libc::geteuid() } == config.plugin_uid {
        return Err(Error::Invalid(format!(
            "plugin_uid {} is this datanode's own uid: plugins must run as another user",
            config.plugin_uid
        )));
    }
    let limits = lode_plugin_host::Limits {
        memory_bytes: config.plugin_memory_bytes,
        cpu_secs: config.plugin_cpu_secs,
        wall: Duration::from_secs(config.plugin_wall_secs),
        // A task's partial result travels in one reply frame.
        output_bytes: 2 << 20,
        run_as: lode_plugin_host::sandbox::can_switch_identity()
            .then_some((config.plugin_uid, config.plugin_gid)),
    };
    let host = lode_plugin_host::Host::beside_current_exe(limits)
        .map_err(|e| Error::Plugin(e.to_string()))?;
    let slots = config
        .task_slots
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let cache = config
        .plugin_cache_dir
        .clone()
        .unwrap_or_else(|| config.data_dirs[0].join("plugin-cache"));
    let probe = host.clone();
    let tasks = node::Tasks::new(host, slots, cache)?;
    let sandbox = tokio::task::spawn_blocking(move || {
        probe
            .probe()
            .unwrap_or_else(|e| vec![format!("unavailable: {e}")])
    })
    .await
    .unwrap_or_default();
    tracing::info!(protections = %sandbox.join(","), "plugin sandbox");
    // Fail closed: a required protection the kernel lacks means no plugins, unless waived by name.
    let sandbox_missing =
        lode_plugin_host::sandbox::missing(&sandbox, &config.plugin_sandbox_optional);
    if !sandbox_missing.is_empty() {
        tracing::error!(
            missing = %sandbox_missing.join(","),
            "this datanode refuses to run plugins: its kernel lacks required sandbox protections \
             (waive one by name with plugin_sandbox_optional in the config)"
        );
    }
    for waived in &config.plugin_sandbox_optional {
        if !sandbox.contains(waived) {
            tracing::warn!(protection = %waived, "plugins run without a sandbox protection (waived in the config)");
        }
    }
    let metrics = Arc::new(http::Metrics::default());
    let http_listener = match config.http_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| Error::Invalid(format!("bind metrics at {addr}: {e}")))?,
        ),
        None => None,
    };
    let http_addr = http_listener
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map(|a| a.to_string());
    let shared = Arc::new(node::Node {
        name: config.name.clone(),
        store,
        pool: Pool::new(endpoint.clone(), Duration::from_secs(5)),
        reports: Arc::new(node::Reports::new(config.namenode_addrs().len())),
        namenodes: config.namenode_addrs(),
        term: std::sync::atomic::AtomicU64::new(0),
        tasks,
        sandbox,
        sandbox_missing,
        metrics: metrics.clone(),
        http_addr,
        stream_idle: Duration::from_millis(config.stream_idle_ms.max(1)),
        keys: std::sync::Mutex::new(Default::default()),
        keys_learned: tokio::sync::Notify::new(),
        key_wake_ms: std::sync::atomic::AtomicU64::new(0),
    });
    let web = http_listener.map(|l| {
        tokio::spawn(http::serve(
            l,
            shared.store.clone(),
            metrics,
            shutdown.clone(),
        ))
    });
    tracing::info!(name = %config.name, addr = ?endpoint.local_addr().ok(), replicas = shared.store.block_count(), "datanode serving");
    // One heartbeat loop per namenode (every member of a group hears every report).
    let hbs: Vec<_> = config
        .namenode_addrs()
        .into_iter()
        .enumerate()
        .map(|(i, namenode)| {
            tokio::spawn(heartbeat::run(
                shared.clone(),
                i,
                namenode,
                config.advertised(),
                Duration::from_millis(config.heartbeat_interval_ms),
                Duration::from_secs(config.full_report_interval_secs),
                shutdown.clone(),
            ))
        })
        .collect();
    let scanner = tokio::spawn(scanner::run(
        shared.clone(),
        config.scan_bytes_per_sec,
        Duration::from_secs(config.scan_pause_secs),
        shutdown.clone(),
    ));
    let checker = tokio::spawn(check_disks(
        shared.clone(),
        Duration::from_secs(config.disk_check_secs),
    ));
    lode_protocol::service::serve(endpoint, server::LIMITS, shutdown, shared).await;
    checker.abort();
    scanner.abort();
    if let Some(w) = web {
        w.abort();
    }
    for hb in hbs {
        hb.abort();
    }
    Ok(())
}
