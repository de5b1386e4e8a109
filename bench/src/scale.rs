//! The namenode at scale (`bench/scale.sh` drives these):
//!
//! - `synth`: a synthetic namespace written straight into an empty metadata directory through the
//!   namenode's own apply (`Namespace::apply`, so the records are exactly what edits make): files
//!   of `--blocks-per-file` committed blocks, 1,000 to a directory, with the replicas laid out over
//!   `--datanodes` by [`Layout`]. A namenode started on the directory recovers it as it would a
//!   restored backup.
//! - `datanodes`: simulated datanodes against one real namenode, each on its own QUIC + mutual TLS
//!   connection with its own certificate. They register with full block reports (in pages, as a
//!   datanode sends them) of exactly the replicas the layout gives them, then heartbeat every
//!   `--heartbeat-ms` with incremental reports, and send their full reports again at the rate
//!   `--full-report-secs` gives the whole fleet (one node every interval / N). Heartbeat, report and
//!   (with `--client-config`) client mkdir latencies are recorded and printed as percentiles.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use lode_namenode::namespace::{MetaOp, Namespace, ROOT};
use lode_namenode::perm::Perm;
use lode_namenode::store::{MemStore, MetaStore, SledStore};
use lode_protocol::frame::kind;
use lode_protocol::messages::{
    CommittedBlock, DatanodeToNamenode, NamenodeToDatanode, ReportedBlock, Space,
};
use lode_protocol::net::{self, TransportConfig, NAMENODE_SERVER_NAME};
use lode_protocol::{paging, Blake3Cv, BlockId, InodeId, SessionId};

/// Length of every synthetic block.
const BLOCK_LEN: u64 = 1 << 20;

/// Which blocks exist and where their replicas are: block k (from 0; id k + 1) has its replicas
/// on datanodes k, k + 1, ..., k + R - 1 (mod N), so every node holds the same share.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct Layout {
    /// Files in the namespace.
    #[arg(long)]
    pub files: u64,
    /// Committed blocks per file.
    #[arg(long, default_value_t = 1)]
    pub blocks_per_file: u64,
    /// Datanodes the replicas are spread over.
    #[arg(long)]
    pub datanodes: u64,
    /// Replicas per block.
    #[arg(long, default_value_t = 3)]
    pub replication: u64,
}

impl Layout {
    fn blocks(&self) -> u64 {
        self.files * self.blocks_per_file
    }

    fn replica(k: u64) -> ReportedBlock {
        let mut cv = [0u8; 32];
        cv[..8].copy_from_slice(&k.to_le_bytes());
        cv[8..16].copy_from_slice(&(!k).to_le_bytes());
        ReportedBlock {
            id: BlockId(k + 1),
            len: BLOCK_LEN,
            cv: Blake3Cv(cv),
        }
    }

    /// The replicas datanode `dn` (from 0) holds.
    fn replicas_of(&self, dn: u64) -> Vec<ReportedBlock> {
        let (n, total) = (self.datanodes, self.blocks());
        let mut out = Vec::with_capacity((total * self.replication / n.max(1)) as usize + 1);
        for r in 0..self.replication.min(n) {
            let mut k = (dn + n - r) % n;
            while k < total {
                out.push(Layout::replica(k));
                k += n;
            }
        }
        out
    }
}

/// Writes the synthetic namespace into `meta_dir`, which must not exist.
pub fn synth(meta_dir: &Path, layout: &Layout) -> anyhow::Result<()> {
    anyhow::ensure!(
        !meta_dir.exists(),
        "{}: already exists; synth writes a new metadata directory",
        meta_dir.display()
    );
    anyhow::ensure!(
        layout.datanodes >= layout.replication && layout.replication > 0,
        "--datanodes must be at least --replication (> 0)"
    );
    std::fs::create_dir_all(meta_dir)?;
    let store = SledStore::open(&meta_dir.join("sled"))?;
    // The edits are applied to an in-memory store one chunk of files at a time, and each chunk
    // goes into sled as one batch (an edit reads only the records of its own file).
    let mut chunk = Namespace::open(Arc::new(MemStore::default()))?;
    let start = Instant::now();
    let mut seq = 0u64;
    let mut apply = |op: MetaOp, flush: bool| -> anyhow::Result<()> {
        seq += 1;
        chunk.apply(seq, &op)?;
        if flush {
            let pairs = chunk.store().scan_prefix(b"")?;
            store.apply_batch(pairs.into_iter().map(|(k, v)| (k, Some(v))).collect())?;
            chunk = Namespace::open(Arc::new(MemStore::default()))?;
        }
        Ok(())
    };
    let perm = |mode| Perm {
        owner: "bench".into(),
        group: "supergroup".into(),
        mode,
    };
    let mtime_ms = 1_790_000_000_000;
    let mut next_inode = ROOT.0 + 1;
    let mut inode = || {
        next_inode += 1;
        InodeId(next_inode - 1)
    };
    let top = inode();
    apply(
        MetaOp::Mkdir {
            parent: ROOT,
            name: "synth".into(),
            inode: top,
            mtime_ms,
            perm: perm(0o755),
        },
        false,
    )?;
    let mut dir = top;
    for f in 0..layout.files {
        if f % 1000 == 0 {
            dir = inode();
            apply(
                MetaOp::Mkdir {
                    parent: top,
                    name: format!("d{}", f / 1000),
                    inode: dir,
                    mtime_ms,
                    perm: perm(0o755),
                },
                false,
            )?;
        }
        let file = inode();
        apply(
            MetaOp::Create {
                parent: dir,
                name: format!("f{f}"),
                inode: file,
                replication: layout.replication as u8,
                block_size: BLOCK_LEN,
                session: SessionId(1),
                mtime_ms,
                replaces: None,
                target_name: None,
                perm: perm(0o644),
            },
            false,
        )?;
        let mut previous = None;
        for b in 0..layout.blocks_per_file {
            let r = Layout::replica(f * layout.blocks_per_file + b);
            apply(
                MetaOp::AddBlock {
                    inode: file,
                    block: r.id,
                    previous,
                },
                false,
            )?;
            previous = Some(CommittedBlock {
                id: r.id,
                len: r.len,
                cv: r.cv,
            });
        }
        apply(
            MetaOp::Complete {
                inode: file,
                last: previous,
                size: layout.blocks_per_file * BLOCK_LEN,
                mtime_ms,
                rename: None,
            },
            (f + 1) % 20_000 == 0 || f + 1 == layout.files,
        )?;
        if (f + 1) % 1_000_000 == 0 {
            eprintln!(
                "synth: {} files in {:.0} s",
                f + 1,
                start.elapsed().as_secs_f64()
            );
        }
    }
    store.flush()?;
    println!(
        "synth: {} files, {} blocks, {} edits applied in {:.1} s",
        layout.files,
        layout.blocks(),
        seq,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Options of the simulated datanodes.
#[derive(clap::Args, Clone, Debug)]
pub struct SimArgs {
    /// The namenode's address.
    #[arg(long)]
    pub namenode: std::net::SocketAddr,
    /// Directory with `ca.pem` and `dn-1.pem`.. `dn-N.pem` (and their keys).
    #[arg(long)]
    pub certs: PathBuf,
    #[command(flatten)]
    pub layout: Layout,
    /// Heartbeat interval of every node.
    #[arg(long, default_value_t = 3000)]
    pub heartbeat_ms: u64,
    /// Each node sends its full report again this often (the fleet: one node every SECS / N).
    #[arg(long, default_value_t = 3600)]
    pub full_report_secs: u64,
    /// Replicas each heartbeat reports as received (its own, again: an incremental report).
    #[arg(long, default_value_t = 2)]
    pub received_per_heartbeat: usize,
    /// How long to measure after every node has registered.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// A client config: one client makes directories one after another and its latency is
    /// recorded too.
    #[arg(long)]
    pub client_config: Option<PathBuf>,
    /// UDP sockets the nodes' connections share.
    #[arg(long, default_value_t = 8)]
    pub sockets: usize,
}

/// Latencies of one kind, with when each was taken.
#[derive(Default)]
struct Samples(Mutex<Vec<(Instant, Duration)>>);

impl Samples {
    fn add(&self, at: Instant, d: Duration) {
        if let Ok(mut v) = self.0.lock() {
            v.push((at, d));
        }
    }

    /// "n, p50, p99, max" of the samples taken at or after `from`.
    fn summary(&self, from: Instant, unit: &str) -> String {
        let mut v: Vec<Duration> = self
            .0
            .lock()
            .map(|v| v.iter().filter(|(t, _)| *t >= from).map(|s| s.1).collect())
            .unwrap_or_default();
        if v.is_empty() {
            return "none".into();
        }
        v.sort();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        let f = |d: Duration| {
            if unit == "s" {
                format!("{:.2} s", d.as_secs_f64())
            } else {
                format!("{:.1} ms", d.as_secs_f64() * 1e3)
            }
        };
        format!(
            "n {}, p50 {}, p99 {}, max {}",
            v.len(),
            f(at(0.5)),
            f(at(0.99)),
            f(*v.last().unwrap_or(&Duration::ZERO))
        )
    }
}

#[derive(Default)]
struct Figures {
    heartbeats: Samples,
    reports: Samples,
    pages: Samples,
    mkdirs: Samples,
    commands: std::sync::atomic::AtomicU64,
    errors: std::sync::atomic::AtomicU64,
    refused: std::sync::atomic::AtomicU64,
}

fn space() -> Space {
    Space {
        capacity: 100 << 40,
        used: 1 << 40,
        remaining: 99 << 40,
        block_room: 99 << 40,
        failed_volumes: 0,
    }
}

async fn call(
    conn: &quinn::Connection,
    req: &DatanodeToNamenode,
) -> anyhow::Result<NamenodeToDatanode> {
    Ok(net::call(
        conn,
        kind::DATANODE_TO_NAMENODE,
        kind::NAMENODE_TO_DATANODE,
        req,
    )
    .await?)
}

/// A full report in pages; returns the replicas the namenode asked to delete.
async fn full_report(
    conn: &quinn::Connection,
    dn: u64,
    blocks: Vec<ReportedBlock>,
    figures: &Figures,
) -> anyhow::Result<usize> {
    let start = Instant::now();
    let mut deletes = 0;
    for req in paging::report_requests(format!("127.0.0.1:{}", 20_000 + dn), space(), blocks) {
        let t = Instant::now();
        if let NamenodeToDatanode::Registered { delete, .. } = call(conn, &req).await? {
            deletes += delete.len();
        }
        figures.pages.add(t, t.elapsed());
    }
    figures.reports.add(start, start.elapsed());
    Ok(deletes)
}

/// One simulated datanode: register, then heartbeat until `until`, with a full report again at
/// `report_at` and every `args.full_report_secs` after it.
async fn node(
    conn: quinn::Connection,
    dn: u64,
    args: Arc<SimArgs>,
    figures: Arc<Figures>,
    registered: Arc<tokio::sync::Barrier>,
    clock: Arc<tokio::sync::OnceCell<Instant>>,
) -> anyhow::Result<()> {
    let replicas = args.layout.replicas_of(dn);
    // A registration the namenode refuses (it could not read every request in time while the
    // whole fleet registered at once) is tried again after a pause that doubles, as a datanode
    // does.
    let mut backoff = Duration::from_millis(100);
    let mut tries = 0;
    let deletes = loop {
        tries += 1;
        match full_report(&conn, dn, replicas.clone(), &figures).await {
            Ok(d) => break d,
            Err(_) if tries < 20 => {
                figures
                    .refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(args.heartbeat_ms));
            }
            Err(e) => return Err(e),
        }
    };
    anyhow::ensure!(
        deletes == 0,
        "dn-{}: the namenode asked to delete {deletes} replicas of its registration (is the \
         namespace from synth with the same layout?)",
        dn + 1
    );
    let n = args.layout.datanodes;
    let beat = Duration::from_millis(args.heartbeat_ms);
    // Phases spread over the fleet, so heartbeats and full reports arrive evenly.
    let beat_phase = beat.mul_f64(dn as f64 / n as f64);
    let every = Duration::from_secs(args.full_report_secs);
    let report_phase = every.mul_f64(dn as f64 / n as f64);
    let heartbeats = tokio::spawn({
        let (conn, figures, args, replicas) = (
            conn.clone(),
            figures.clone(),
            args.clone(),
            replicas.clone(),
        );
        async move {
            tokio::time::sleep(beat_phase).await;
            let mut tick = tokio::time::interval(beat);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut next = 0usize;
            loop {
                tick.tick().await;
                let received: Vec<ReportedBlock> = (0..args.received_per_heartbeat)
                    .filter_map(|i| replicas.get((next + i) % replicas.len().max(1)).copied())
                    .collect();
                next += args.received_per_heartbeat;
                let req = DatanodeToNamenode::Heartbeat {
                    space: space(),
                    received,
                    deleted: vec![],
                };
                let t = Instant::now();
                match call(&conn, &req).await {
                    Ok(NamenodeToDatanode::Commands {
                        reregister,
                        delete,
                        copy,
                        ..
                    }) => {
                        figures.heartbeats.add(t, t.elapsed());
                        let work = delete.len() + copy.len() + usize::from(reregister);
                        figures
                            .commands
                            .fetch_add(work as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                    _ => {
                        figures
                            .errors
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
        }
    });
    registered.wait().await;
    let t0 = *clock.get_or_init(|| async { Instant::now() }).await;
    let until = t0 + Duration::from_secs(args.seconds);
    let mut at = t0 + report_phase;
    while at < until {
        tokio::time::sleep_until(at.into()).await;
        let deletes = full_report(&conn, dn, replicas.clone(), &figures).await?;
        anyhow::ensure!(deletes == 0, "dn-{}: {deletes} deletes asked", dn + 1);
        at += every;
    }
    tokio::time::sleep_until(until.into()).await;
    heartbeats.abort();
    Ok(())
}

/// Runs the simulated datanodes and prints the figures.
pub async fn datanodes(args: SimArgs) -> anyhow::Result<()> {
    let t = TransportConfig::default();
    let n = args.layout.datanodes;
    let mut sockets = vec![];
    for _ in 0..args.sockets.max(1) {
        let files = crate::tls(&args.certs, "dn-1");
        sockets.push(net::endpoint(
            "127.0.0.1:0".parse()?,
            None,
            net::client_config(&files, &t)?,
            &t,
        )?);
    }
    let start = Instant::now();
    let mut conns = vec![];
    for dn in 0..n {
        let files = crate::tls(&args.certs, &format!("dn-{}", dn + 1));
        let cfg = net::client_config(&files, &t).with_context(|| format!("dn-{}", dn + 1))?;
        let ep = &sockets[dn as usize % sockets.len()];
        conns.push(ep.connect_with(cfg, args.namenode, NAMENODE_SERVER_NAME)?);
    }
    let mut connected = vec![];
    for c in conns {
        connected.push(c.await?);
    }
    println!(
        "connected: {n} datanodes in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let args = Arc::new(args);
    let figures = Arc::new(Figures::default());
    // Every node, and this task, meet here once all have registered.
    let registered = Arc::new(tokio::sync::Barrier::new(n as usize + 1));
    let clock = Arc::new(tokio::sync::OnceCell::new());
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (dn, conn) in connected.into_iter().enumerate() {
        tasks.spawn(node(
            conn,
            dn as u64,
            args.clone(),
            figures.clone(),
            registered.clone(),
            clock.clone(),
        ));
    }
    let client = match &args.client_config {
        Some(path) => Some(Arc::new(
            lode_client::Client::connect(lode_client::ClientConfig::load(path)?).await?,
        )),
        None => None,
    };
    // Wait for every registration; a node that failed ends the run with its error.
    tokio::select! {
        _ = registered.wait() => {}
        Some(r) = tasks.join_next() => { r??; anyhow::bail!("a node ended before registering"); }
    }
    let replicas = args.layout.blocks() * args.layout.replication.min(n);
    println!(
        "registration: {n} datanodes, {replicas} replicas in {:.1} s ({} refused and sent \
         again); full reports: {}",
        start.elapsed().as_secs_f64(),
        figures.refused.load(std::sync::atomic::Ordering::Relaxed),
        figures.reports.summary(start, "s")
    );
    let t0 = *clock.get_or_init(|| async { Instant::now() }).await;
    let writer = client.map(|c| {
        let figures = figures.clone();
        tokio::spawn(async move {
            // Safe mode lifts once enough blocks are reported; mkdirs are refused until then.
            let dir = format!("/scale-{}", std::process::id());
            let deadline = Instant::now() + Duration::from_secs(120);
            while c.mkdir(&dir, true).await.is_err() {
                if Instant::now() > deadline {
                    return Err(anyhow::anyhow!("the namenode refused mkdirs for 120 s"));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            for i in 0.. {
                let t = Instant::now();
                c.mkdir(&format!("{dir}/d{i}"), false).await?;
                figures.mkdirs.add(t, t.elapsed());
            }
            Ok(())
        })
    });
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    if let Some(w) = writer {
        if w.is_finished() {
            w.await??;
        } else {
            w.abort();
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "steady: {secs:.0} s; full reports of {} replicas each: {}",
        replicas / n.max(1),
        figures.reports.summary(t0, "s")
    );
    println!("report pages: {}", figures.pages.summary(t0, "ms"));
    println!("heartbeats: {}", figures.heartbeats.summary(t0, "ms"));
    println!("client mkdirs: {}", figures.mkdirs.summary(t0, "ms"));
    println!(
        "commands sent to the nodes (copies, deletes, re-registrations): {}; failed heartbeats: {}",
        figures.commands.load(std::sync::atomic::Ordering::Relaxed),
        figures.errors.load(std::sync::atomic::Ordering::Relaxed)
    );
    Ok(())
}
