//! The namenode's HTTP side: a status page (plain server-rendered HTML, no JavaScript) and
//! Prometheus metrics, served through `lode_protocol::web` (request-head and connection deadlines,
//! a connection limit). No request takes the state's lock: the page and the gauges that describe
//! the cluster are a snapshot refreshed in the background every [`REFRESH`] (the block counts in
//! it less often on a large block map: see `HEALTH_DUTY`); counters and histograms are updated
//! where the work happens and read as they are.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::extract::State as AxumState;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::state::{BlockHealth, State};

/// A label set with one label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// Request kind, datanode state or datanode name.
    pub kind: String,
}

/// The namenode's metrics.
pub struct Metrics {
    registry: Registry,
    /// Requests served, by kind.
    pub requests: Family<KindLabel, Counter>,
    /// Request latency, by kind.
    pub request_seconds: Family<KindLabel, Histogram>,
    /// Edit-log syncs (one per group commit).
    pub editlog_syncs: Counter,
    /// Edits per group commit.
    pub editlog_group: Histogram,
    /// Edit-log segments rolled (after the metadata store flushed them).
    pub editlog_rolls: Counter,
    /// Replica receipts writers handed in, by outcome (`accepted`, `refused`).
    pub receipts: Family<KindLabel, Counter>,
    datanodes: Family<KindLabel, Gauge>,
    heartbeat_age: Family<KindLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    blocks: Gauge,
    under_replicated: Gauge,
    missing: Gauge,
    corrupt: Gauge,
    pending_copies: Gauge,
    safemode: Gauge,
    /// The namenode group as this member sees it: term, last log index, applied index, and 1
    /// while this member leads.
    pub group_term: Gauge,
    /// See `group_term`.
    pub group_last_index: Gauge,
    /// See `group_term`.
    pub group_applied_index: Gauge,
    /// See `group_term`.
    pub group_leader: Gauge,
    /// Times this member became the leader.
    pub group_elections_won: Counter,
    /// Seconds from proposing a group commit to a majority holding it durably and this member
    /// applying it.
    pub group_commit_seconds: Histogram,
    /// Bytes of this member's latest snapshot (built or installed).
    pub group_snapshot_bytes: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("lode_namenode");
        let requests = Family::<KindLabel, Counter>::default();
        let request_seconds = Family::<KindLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 18))
        });
        let editlog_syncs = Counter::default();
        let editlog_group = Histogram::new(exponential_buckets(1.0, 2.0, 10));
        let editlog_rolls = Counter::default();
        let receipts = Family::<KindLabel, Counter>::default();
        let datanodes = Family::<KindLabel, Gauge>::default();
        let heartbeat_age =
            Family::<KindLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let (blocks, under_replicated, missing, corrupt, pending_copies, safemode) = (
            Gauge::default(),
            Gauge::default(),
            Gauge::default(),
            Gauge::default(),
            Gauge::default(),
            Gauge::default(),
        );
        registry.register(
            "requests",
            "Client and datanode requests served, by kind",
            requests.clone(),
        );
        registry.register(
            "request_seconds",
            "Request latency in seconds, by kind",
            request_seconds.clone(),
        );
        registry.register(
            "editlog_syncs",
            "Edit-log fdatasyncs (one per group commit)",
            editlog_syncs.clone(),
        );
        registry.register(
            "editlog_group_edits",
            "Edits made durable per fdatasync",
            editlog_group.clone(),
        );
        registry.register(
            "editlog_rolls",
            "Edit-log segments rolled once the metadata store held them",
            editlog_rolls.clone(),
        );
        registry.register(
            "replica_receipts",
            "Datanodes' replica receipts handed in by writers, by outcome (accepted: signed by a datanode for the block committed; refused)",
            receipts.clone(),
        );
        registry.register("datanodes", "Datanodes by state", datanodes.clone());
        registry.register(
            "datanode_heartbeat_age_seconds",
            "Seconds since each datanode's last heartbeat",
            heartbeat_age.clone(),
        );
        registry.register("blocks", "Blocks of complete files", blocks.clone());
        registry.register(
            "blocks_under_replicated",
            "Blocks with fewer live replicas than their target",
            under_replicated.clone(),
        );
        registry.register(
            "blocks_missing",
            "Blocks with no live replica",
            missing.clone(),
        );
        registry.register(
            "replicas_corrupt",
            "Replicas reported corrupt and not yet removed",
            corrupt.clone(),
        );
        registry.register(
            "replication_queue",
            "Re-replication copies under way",
            pending_copies.clone(),
        );
        registry.register(
            "safemode",
            "1 while namespace changes are refused",
            safemode.clone(),
        );
        let (group_term, group_last_index, group_applied_index, group_leader) = (
            Gauge::default(),
            Gauge::default(),
            Gauge::default(),
            Gauge::default(),
        );
        let group_elections_won = Counter::default();
        let group_commit_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        let group_snapshot_bytes = Gauge::default();
        registry.register(
            "group_commit_seconds",
            "Seconds from proposing a group commit to a majority holding it durably and this member applying it",
            group_commit_seconds.clone(),
        );
        registry.register(
            "group_snapshot_bytes",
            "Bytes of this member's latest snapshot of the metadata (built or installed)",
            group_snapshot_bytes.clone(),
        );
        registry.register(
            "group_term",
            "The namenode group's current term, as this member knows it",
            group_term.clone(),
        );
        registry.register(
            "group_last_index",
            "The last index in this member's log of the namenode group",
            group_last_index.clone(),
        );
        registry.register(
            "group_applied_index",
            "The last index of the namenode group's log this member applied",
            group_applied_index.clone(),
        );
        registry.register(
            "group_leader",
            "1 while this member leads the namenode group",
            group_leader.clone(),
        );
        registry.register(
            "group_elections_won",
            "Times this member became the namenode group's leader",
            group_elections_won.clone(),
        );
        Metrics {
            group_commit_seconds,
            group_snapshot_bytes,
            group_term,
            group_last_index,
            group_applied_index,
            group_leader,
            group_elections_won,
            registry,
            requests,
            request_seconds,
            editlog_syncs,
            editlog_group,
            editlog_rolls,
            receipts,
            datanodes,
            heartbeat_age,
            blocks,
            under_replicated,
            missing,
            corrupt,
            pending_copies,
            safemode,
        }
    }
}

impl Metrics {
    /// Counts one request and its latency.
    pub fn observe(&self, kind: &str, started: Instant) {
        let label = KindLabel {
            kind: kind.to_string(),
        };
        self.requests.get_or_create(&label).inc();
        self.request_seconds
            .get_or_create(&label)
            .observe(started.elapsed().as_secs_f64());
    }

    /// Sets the gauges that describe the cluster from the soft state.
    fn update_gauges(&self, state: &State, health: &BlockHealth, now: Instant) {
        let report = state.report_with(now, health);
        self.datanodes.clear();
        for s in ["live", "stale", "dead", "decommissioning", "decommissioned"] {
            let n = report.datanodes.iter().filter(|d| d.state == s).count();
            self.datanodes
                .get_or_create(&KindLabel { kind: s.into() })
                .set(n as i64);
        }
        self.heartbeat_age.clear();
        for d in &report.datanodes {
            self.heartbeat_age
                .get_or_create(&KindLabel {
                    kind: d.name.clone(),
                })
                .set(d.last_heartbeat_ms as f64 / 1000.0);
        }
        self.blocks.set(health.total as i64);
        self.under_replicated.set(report.under_replicated as i64);
        self.missing.set(report.missing as i64);
        self.corrupt.set(report.corrupt as i64);
        self.pending_copies.set(state.copies.len() as i64);
        self.safemode.set(i64::from(report.safemode));
    }

    fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// How often the page and the cluster gauges are rebuilt from the soft state.
pub const REFRESH: Duration = Duration::from_secs(1);

/// The block counts of the page and the gauges are taken again once this many times as long as
/// the last count took has passed (a count of every block takes seconds on a large map).
const HEALTH_DUTY: u32 = 20;

#[derive(Clone)]
struct Web {
    page: Arc<RwLock<String>>,
    metrics: Arc<Metrics>,
}

/// Serves `/` (the status page) and `/metrics` until shutdown.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<Mutex<State>>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) {
    let web = Web {
        page: Arc::new(RwLock::new(String::new())),
        metrics,
    };
    let refresher = {
        let web = web.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REFRESH);
            let mut health = BlockHealth::default();
            let mut counted: Option<(Instant, Duration)> = None;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.changed() => return,
                }
                // The block counts are taken chunk by chunk, the lock released in between, and
                // no more than 1/HEALTH_DUTY of the time: on a large block map they are older
                // than the rest of the page.
                let now = Instant::now();
                if counted.is_none_or(|(at, took)| {
                    now.saturating_duration_since(at) >= took * HEALTH_DUTY
                }) {
                    let Some(h) = crate::state::health_pass(&state, now).await else {
                        return;
                    };
                    health = h;
                    counted = Some((now, now.elapsed()));
                }
                let html = match state.lock() {
                    Ok(s) => {
                        web.metrics.update_gauges(&s, &health, now);
                        page(&s, &health, now)
                    }
                    Err(_) => return,
                };
                if let Ok(mut p) = web.page.write() {
                    *p = html;
                }
            }
        })
    };
    let app = axum::Router::new()
        .route("/", get(serve_page))
        .route("/metrics", get(scrape))
        .with_state(web);
    lode_protocol::web::serve_until(listener, app, shutdown).await;
    refresher.abort();
}

/// Binds the HTTP listener (so its address can be reported before serving).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

async fn scrape(AxumState(web): AxumState<Web>) -> impl IntoResponse {
    let body = web.metrics.encode();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn size(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

async fn serve_page(AxumState(web): AxumState<Web>) -> Html<String> {
    Html(web.page.read().map(|p| p.clone()).unwrap_or_default())
}

/// The status page, from the soft state.
fn page(state: &State, health: &BlockHealth, now: Instant) -> String {
    let r = state.report_with(now, health);
    let (reported, total) = (health.total - health.missing, health.total);
    let mut h = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Lode namenode</title>\
         <meta http-equiv=\"refresh\" content=\"5\"><style>\
         body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}\
         td,th{border:1px solid #ccc;padding:.3em .7em;text-align:left}th{background:#f3f3f3}\
         .live{color:#17803d}.stale{color:#b36b00}.dead{color:#b00020}.decommissioning,.decommissioned{color:#555}\
         .on{color:#b00020;font-weight:bold}</style></head><body><h1>Lode namenode</h1>",
    );
    let _ = write!(
        h,
        "<h2>Overview</h2><table id=\"overview\"><tr><th>Safe mode</th><td class=\"{}\">{}</td></tr>\
         <tr><th>Blocks</th><td>{total} ({reported} with a reported replica)</td></tr>\
         <tr><th>Datanodes</th><td>{}</td></tr><tr><th>Capacity</th><td>{}</td></tr>\
         <tr><th>Used</th><td>{}</td></tr><tr><th>Remaining</th><td>{}</td></tr></table>",
        if r.safemode { "on" } else { "off" },
        if r.safemode { "on" } else { "off" },
        r.datanodes.len(),
        size(r.datanodes.iter().map(|d| d.capacity).sum()),
        size(r.datanodes.iter().map(|d| d.used).sum()),
        size(r.datanodes.iter().map(|d| d.remaining).sum()),
    );
    h.push_str(
        "<h2>Datanodes</h2><table id=\"datanodes\"><tr><th>Name</th><th>State</th><th>Address</th>\
         <th>Last heartbeat</th><th>Blocks</th><th>Used</th><th>Remaining</th><th>Failed data dirs</th>\
         <th>Plugin sandbox</th></tr>",
    );
    for d in &r.datanodes {
        let _ = write!(
            h,
            "<tr><td>{}</td><td class=\"{}\">{}</td><td>{}</td><td>{:.1} s ago</td><td>{}</td><td>{}</td>\
             <td{}</td><td{}>{}</td><td>{}</td></tr>",
            esc(&d.name),
            esc(&d.state),
            esc(&d.state),
            esc(&d.addr),
            d.last_heartbeat_ms as f64 / 1000.0,
            d.blocks,
            size(d.used),
            if d.remaining < state.full_below {
                format!(" class=\"on\">{} (full)", size(d.remaining))
            } else {
                format!(">{}", size(d.remaining))
            },
            if d.failed_volumes > 0 { " class=\"on\"" } else { "" },
            d.failed_volumes,
            if d.sandbox_missing.is_empty() {
                esc(&d.sandbox.join(", "))
            } else {
                format!(
                    "{} <span class=\"on\">missing: {} (plugins refused)</span>",
                    esc(&d.sandbox.join(", ")),
                    esc(&d.sandbox_missing.join(", "))
                )
            },
        );
    }
    if !state.namenodes.is_empty() {
        let top = state
            .namenodes
            .iter()
            .map(|n| n.last_index)
            .max()
            .unwrap_or(0);
        h.push_str(
            "</table><h2>Namenode group</h2><table id=\"namenodes\"><tr><th>Name</th><th>Role</th>\
             <th>Address</th><th>Term</th><th>Last index</th><th>Applied index</th><th>Lag</th></tr>",
        );
        for n in &state.namenodes {
            let _ = write!(
                h,
                "<tr><td>{}</td><td class=\"{}\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td>{}</td></tr>",
                esc(&n.name),
                if n.role == "down" { "dead" } else { "live" },
                esc(&n.role),
                esc(&n.addr),
                n.term,
                n.last_index,
                n.applied_index,
                top.saturating_sub(n.applied_index)
            );
        }
    }
    let _ = write!(
        h,
        "</table><h2>Block health</h2><table id=\"health\"><tr><th>Under-replicated</th><td>{}</td></tr>\
         <tr><th>Missing</th><td>{}</td></tr><tr><th>Corrupt replicas</th><td>{}</td></tr>\
         <tr><th>Copies under way</th><td>{}</td></tr></table><h2>Recent events</h2><table id=\"events\">\
         <tr><th>When</th><th>Event</th></tr>",
        r.under_replicated,
        r.missing,
        r.corrupt,
        state.copies.len()
    );
    for (at, what) in state.events.iter().rev() {
        let _ = write!(
            h,
            "<tr><td>{:.0} s ago</td><td>{}</td></tr>",
            now.saturating_duration_since(*at).as_secs_f64(),
            esc(what)
        );
    }
    h.push_str("</table><p><a href=\"/metrics\">Prometheus metrics</a></p></body></html>");
    h
}
