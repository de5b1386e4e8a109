//! The Lode namenode: owns the namespace (an fdatasync'ed edit log as the source of truth, sled as
//! the materialised view), allocates blocks and places their pipelines, tracks datanodes and where
//! replicas live (soft state, rebuilt from block reports), and holds single-writer leases.
//!
//! Read [`namespace`] first (edits and their validation), then [`writer`] (group commit),
//! [`state`] (datanodes, block locations, leases) and [`server`] (the request loop).

pub mod audit;
pub mod backup;
pub mod config;
pub mod editlog;
pub mod error;
pub mod failpoints;
pub mod http;
pub mod namespace;
pub mod perm;
pub mod placement;
pub mod raft;
pub mod repair;
pub mod server;
pub mod state;
pub mod store;
pub mod tokens;
pub mod writer;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use config::Config;
pub use error::Error;

use crate::editlog::EditLog;
use crate::namespace::{IdAlloc, Namespace};
use crate::state::{State, Timing};
use crate::store::{MetaStore, Overlay, SledStore};
use crate::writer::{Mutation, Writer};

pub use lode_protocol::service::ShutdownSignal;

/// Returns free heap memory to the system (glibc keeps what small allocations freed).
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator's own heap.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Recovers the namespace (replaying edits the store has not applied), then serves on `endpoint`
/// until `shutdown` fires or the namespace writer fails.
pub async fn run(
    config: Config,
    endpoint: quinn::Endpoint,
    shutdown: ShutdownSignal,
) -> Result<(), Error> {
    let meta_dir = config.meta_dir.clone();
    let cache_bytes = config.meta_cache_bytes;
    let (ns, mut log, ids, stored) =
        tokio::task::spawn_blocking(move || recover_cached(&meta_dir, cache_bytes))
            .await
            .map_err(|e| Error::Store(format!("recovery task: {e}")))??;
    let timing = Timing {
        stale_after: Duration::from_millis(config.stale_after_ms),
        dead_after: Duration::from_millis(config.dead_after_ms),
        lease_expiry: Duration::from_millis(config.lease_expiry_ms),
    };
    let decommissioned = ns.decommissioned()?;
    let mut initial = State::new(timing, &stored, Instant::now());
    let entries = stored.inodes.len();
    // The namespace stays on disk; what the soft state needs of it is in `initial` now. The
    // allocator is asked to hand the freed heap back (a namespace of millions of files passes
    // through it once at start).
    drop(stored);
    trim_heap();
    initial.safemode_threshold = config.safemode_threshold;
    initial.full_below = config.block_size_default;
    initial.decommission = decommissioned.into_iter().collect();
    initial.check_safemode(Instant::now());
    // A member of a group follows until it hears that it leads.
    initial.follower = config.group.is_some();
    let metrics = Arc::new(http::Metrics::default());
    let http_listener = match config.http_listen {
        Some(addr) => {
            let l = http::bind(addr)
                .await
                .map_err(|e| Error::Store(format!("bind status page at {addr}: {e}")))?;
            initial.http_addr = l.local_addr().ok().map(|a| a.to_string());
            Some(l)
        }
        None => None,
    };
    let state = Arc::new(Mutex::new(initial));
    let web = http_listener.map(|l| {
        tokio::spawn(http::serve(
            l,
            state.clone(),
            metrics.clone(),
            shutdown.clone(),
        ))
    });
    let (journal, group): (Box<dyn editlog::Journal>, _) = match &config.group {
        None => {
            log.set_roll_bytes(config.edit_log_roll_bytes);
            (Box::new(log), None)
        }
        Some(g) => {
            drop(log);
            let (raft, pool) =
                start_group(g, &config, &endpoint, ns.store_arc(), state.clone()).await?;
            let journal = raft::journal::GroupJournal::new(
                raft.clone(),
                tokio::runtime::Handle::current(),
                ns.store_arc(),
                metrics.group_commit_seconds.clone(),
            );
            let group = server::Group {
                reads: raft::reads::Reads::new(raft.clone()),
                follower_reads: g.follower_reads,
                raft,
                id: g.id,
                configured: g.members(),
                pool,
                seen: Default::default(),
            };
            (Box::new(journal), Some(group))
        }
    };
    let (writer, mut fatal) = Writer {
        ns: Namespace::open(Arc::new(Overlay::new(ns.store_arc())))?,
        journal,
        ids,
        state: state.clone(),
        lease_ms: config.lease_expiry_ms,
        metrics: metrics.clone(),
    }
    .spawn()?;
    let audit = match &config.audit_log {
        Some(path) => Some(
            audit::AuditLog::open(
                path.clone(),
                config.audit_log_max_bytes,
                config.audit_log_keep,
            )
            .map_err(|e| Error::Store(format!("audit log {}: {e}", path.display())))?,
        ),
        None => None,
    };
    let token_lifetime_ms = config.token_lifetime_ms;
    let name = config
        .tls
        .identity()
        .map_err(|e| Error::Store(e.to_string()))?
        .name;
    let groups =
        perm::Groups::new(&config.groups).map_err(|e| Error::Store(format!("groups: {e}")))?;
    tracing::info!(addr = ?endpoint.local_addr().ok(), files_and_dirs = entries, "namenode serving");
    let shared = Arc::new(server::Shared {
        ns,
        state: state.clone(),
        writer: writer.clone(),
        config,
        metrics,
        replica_reports: tokio::sync::Notify::new(),
        report_slots: tokio::sync::Semaphore::new(server::REPORTS_AT_ONCE),
        audit,
        groups: std::sync::RwLock::new(groups),
        signer: Mutex::new(tokens::Signer::new(token_lifetime_ms)),
        group,
        name,
    });
    let repairs = tokio::spawn(repair_loop(
        state.clone(),
        Duration::from_millis(shared.config.heartbeat_interval_ms),
        Duration::from_millis(shared.config.stale_after_ms),
        shutdown.clone(),
    ));
    let trash = tokio::spawn(empty_trash(
        writer.clone(),
        shared.config.trash_interval_ms,
        shutdown.clone(),
    ));
    let forget = tokio::spawn(forget_requests(
        state.clone(),
        writer.clone(),
        shared.config.retry_cache_ms,
        shutdown.clone(),
    ));
    let leases = tokio::spawn(expire_leases(state, writer, shutdown.clone()));
    let watch = shared.group.as_ref().map(|g| {
        tokio::spawn(watch_group(
            g.raft.clone(),
            g.id,
            shared.state.clone(),
            shared.metrics.clone(),
            shared.config.meta_dir.join(raft::sm::SNAPSHOT),
            shutdown.clone(),
        ))
    });
    let status = shared.group.as_ref().map(|_| {
        let shared = shared.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let Some(g) = &shared.group else { return };
            let mut tick = tokio::time::interval(http::REFRESH);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.changed() => return,
                }
                let view = raft::status::view(&g.raft, &g.configured, &g.pool, &g.seen).await;
                match shared.state.lock() {
                    Ok(mut s) => s.namenodes = view,
                    Err(_) => return,
                }
            }
        })
    });
    let result = tokio::select! {
        _ = lode_protocol::service::serve(endpoint, server::LIMITS, shutdown, shared.clone()) => Ok(()),
        e = &mut fatal => match e {
            Ok(e) => Err(e),
            Err(_) => Err(Error::WriterGone),
        },
    };
    leases.abort();
    forget.abort();
    for w in [watch, status].into_iter().flatten() {
        w.abort();
    }
    if let Some(g) = &shared.group {
        let _ = g.raft.shutdown().await;
    }
    trash.abort();
    repairs.abort();
    if let Some(w) = web {
        w.abort();
    }
    shared.ns.store().flush()?;
    result
}

/// Joins the namenode group: its log and state machine in the metadata directory, its messages
/// through `endpoint` (which presents this member's certificate). A member whose log is empty
/// starts the group with the configured members; openraft accepts the same start from each of
/// them and keeps the first.
async fn start_group(
    g: &config::GroupConfig,
    config: &Config,
    endpoint: &quinn::Endpoint,
    store: Arc<SledStore>,
    state: Arc<Mutex<State>>,
) -> Result<(raft::Raft, Arc<lode_protocol::net::Pool>), Error> {
    let group_err = |e: &dyn std::fmt::Display| Error::Store(format!("namenode group: {e}"));
    let settings = raft::config(&g.timing()).map_err(|e| group_err(&e))?;
    let log = raft::log::LogStore::open(&config.meta_dir)?;
    let sm = raft::sm::StateMachine::open(store, Some(state), &config.meta_dir)?;
    let pool = Arc::new(lode_protocol::net::Pool::new(
        endpoint.clone(),
        Duration::from_secs(2),
    ));
    let r = raft::Raft::new(
        g.id,
        Arc::new(settings),
        raft::net::Network::new(pool.clone()),
        log,
        sm,
    )
    .await
    .map_err(|e| group_err(&e))?;
    if !g.join && !r.is_initialized().await.map_err(|e| group_err(&e))? {
        let members: std::collections::BTreeMap<_, _> = g.members().into_iter().collect();
        match r.initialize(members).await {
            Ok(()) => tracing::info!(id = g.id, "namenode group started"),
            Err(openraft::error::RaftError::APIError(
                openraft::error::InitializeError::NotAllowed(_),
            )) => {}
            Err(e) => return Err(group_err(&e)),
        }
    }
    tracing::info!(
        id = g.id,
        members = g.members.len(),
        "member of a namenode group"
    );
    Ok((r, pool))
}

type Recovered = (Namespace<SledStore>, EditLog, IdAlloc, namespace::Stored);

/// Opens the metadata directory: the edit log, the checkpoint and the store, and brings the store
/// up to the log's last edit. It refuses to guess: a store missing edits that neither the log nor
/// the checkpoint holds, or a store ahead of a log that has edits, is an error naming both.
pub fn recover(meta_dir: &std::path::Path) -> Result<Recovered, Error> {
    recover_cached(meta_dir, store::DEFAULT_CACHE_BYTES)
}

/// [`recover`], with at most about `cache_bytes` of the store's pages cached.
pub fn recover_cached(meta_dir: &std::path::Path, cache_bytes: u64) -> Result<Recovered, Error> {
    std::fs::create_dir_all(meta_dir).map_err(|source| Error::EditLog {
        path: meta_dir.to_path_buf(),
        source,
    })?;
    // The namespace is the cluster's: the metadata dir is the namenode user's alone.
    lode_protocol::service::make_private_dir(meta_dir).map_err(|source| Error::EditLog {
        path: meta_dir.to_path_buf(),
        source,
    })?;
    let (mut log, records) = EditLog::open(meta_dir)?;
    let checkpoint = editlog::read_checkpoint(meta_dir)?;
    let sled_dir = meta_dir.join("sled");
    let mut store = Arc::new(SledStore::open_cached(&sled_dir, cache_bytes)?);
    let mut applied = namespace::read_last_applied(&*store)?;
    // The first edit the log can still give.
    let log_from = records.first().map_or(log.last_seq() + 1, |r| r.0);
    let checkpoint_seq = checkpoint.as_ref().map_or(0, |c| c.0);
    if applied + 1 < log_from && (!records.is_empty() || checkpoint_seq > applied) {
        match checkpoint {
            Some((seq, pairs)) if seq + 1 >= log_from && seq > applied => {
                tracing::warn!(
                    store_at = applied,
                    log_from,
                    checkpoint = seq,
                    "the metadata store lacks edits the log no longer holds; rebuilding it from the checkpoint"
                );
                drop(store);
                let aside = meta_dir.join(format!("sled.behind-{applied}"));
                let _ = std::fs::remove_dir_all(&aside);
                std::fs::rename(&sled_dir, &aside).map_err(|source| Error::EditLog {
                    path: sled_dir.clone(),
                    source,
                })?;
                store = Arc::new(backup::load(&sled_dir, pairs)?);
                applied = seq;
            }
            _ => {
                return Err(Error::Corrupt(format!(
                "the metadata store holds edits up to {applied}, but the edit log starts at edit \
                     {log_from} and no checkpoint covers the edits between; restore from a backup"
            )))
            }
        }
    }
    if applied > log.last_seq() {
        if !records.is_empty() {
            return Err(Error::Corrupt(format!(
                "the metadata store holds edits up to {applied}, beyond the edit log's last edit {}: \
                 the log lost acknowledged edits",
                log.last_seq()
            )));
        }
        // A store restored from a backup, with no log yet: number later edits after it.
        tracing::info!(
            applied,
            "metadata store restored from a backup; the edit log starts after it"
        );
        log.skip_to(applied);
    }
    let ns = Namespace::open(store)?;
    let mut replayed = 0;
    for (seq, op) in records.iter().filter(|(seq, _)| *seq > applied) {
        ns.apply(*seq, op)?;
        replayed += 1;
    }
    ns.store().flush()?;
    let stored = ns.load_all()?;
    let ids = IdAlloc::recover(&ns, &stored)?;
    tracing::info!(edits = records.len(), replayed, "namespace recovered");
    Ok((ns, log, ids, stored))
}

/// Plans re-replication every heartbeat interval, after a grace period at start-up so datanodes
/// can report their replicas before any block looks under-replicated.
async fn repair_loop(
    state: Arc<Mutex<State>>,
    every: Duration,
    grace: Duration,
    mut shutdown: ShutdownSignal,
) {
    tokio::select! {
        _ = tokio::time::sleep(grace) => {}
        _ = shutdown.changed() => return,
    }
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        // The tick's blocks are planned one chunk per hold of the lock.
        let now = Instant::now();
        let ids = match state.lock() {
            Ok(mut s) => s.repair_tick(now),
            Err(_) => return,
        };
        for chunk in ids.chunks(state::SCAN_CHUNK) {
            tokio::task::yield_now().await;
            match state.lock() {
                Ok(mut s) => s.plan_blocks(chunk, now),
                Err(_) => return,
            }
        }
    }
}

/// Follows the group's metrics into the namenode's gauges, and logs changes of leader.
async fn watch_group(
    r: raft::Raft,
    id: raft::NodeId,
    state: Arc<Mutex<State>>,
    metrics: Arc<http::Metrics>,
    snapshot_file: std::path::PathBuf,
    mut shutdown: ShutdownSignal,
) {
    let mut rx = r.metrics();
    // The soft state starts as a follower's (`run`); it changes when the leader does.
    let mut leader = None;
    // The snapshot last measured (the file is read only when it changes).
    let mut measured = None;
    loop {
        let m = rx.borrow_and_update().clone();
        if m.snapshot.is_some() && m.snapshot != measured {
            measured = m.snapshot;
            if let Ok(meta) = std::fs::metadata(&snapshot_file) {
                metrics.group_snapshot_bytes.set(meta.len() as i64);
            }
        }
        metrics.group_term.set(m.current_term as i64);
        metrics
            .group_last_index
            .set(m.last_log_index.unwrap_or(0) as i64);
        metrics
            .group_applied_index
            .set(m.last_applied.map_or(0, |l| l.index) as i64);
        metrics
            .group_leader
            .set(i64::from(m.current_leader == Some(id)));
        if m.current_leader != leader {
            leader = m.current_leader;
            if leader == Some(id) {
                metrics.group_elections_won.inc();
            }
            if let Ok(mut s) = state.lock() {
                s.set_leading(leader == Some(id), Instant::now());
            }
            tracing::info!(term = m.current_term, leader = ?leader, "namenode group leader");
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            _ = shutdown.changed() => return,
        }
    }
}

/// Forgets, every few seconds, the answers to changes with request ids that are older than
/// `keep_ms` (on the leader: its edit reaches the others through the log).
async fn forget_requests(
    state: Arc<Mutex<State>>,
    writer: writer::WriterHandle,
    keep_ms: u64,
    mut shutdown: ShutdownSignal,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(keep_ms.clamp(1000, 10_000)));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        match state.lock() {
            Ok(s) if s.follower => continue,
            Ok(_) => {}
            Err(_) => return,
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let before_ms = now_ms.saturating_sub(keep_ms);
        if let Err(e) = writer
            .submit(writer::Mutation::ForgetRequests { before_ms })
            .await
        {
            tracing::debug!("forgetting old request answers: {e}");
        }
    }
}

/// Checkpoints every user's trash once per interval and deletes checkpoints older than it.
async fn empty_trash(writer: writer::WriterHandle, interval_ms: u64, mut shutdown: ShutdownSignal) {
    if interval_ms == 0 {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_millis(interval_ms));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if let Err(e) = writer
            .submit(Mutation::TrashCheckpoint { interval_ms })
            .await
        {
            tracing::warn!("trash checkpoint: {e}");
        }
    }
}

async fn expire_leases(
    state: Arc<Mutex<State>>,
    writer: writer::WriterHandle,
    mut shutdown: ShutdownSignal,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let expired = match state.lock() {
            Ok(mut s) => s.take_expired_leases(Instant::now()),
            Err(_) => return,
        };
        for (session, inode) in expired {
            let _ = writer.submit(Mutation::Expire { inode, session }).await;
        }
    }
}
