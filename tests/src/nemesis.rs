//! The fault campaign: a seeded, replayable randomized run against a real cluster. It keeps a
//! model of the namespace (directories, files with their bytes and replication) while it drives
//! the cluster through the `lode` CLI (put, put -f, rm, rm -r, mv, mkdir, setrep, verified reads,
//! checksums, scans) and injects faults in random order and combination: SIGKILL and restart of
//! datanodes (several at once), SIGKILL of the namenode (also in the middle of a put), frozen
//! datanodes (SIGSTOP: lost heartbeats and a node partitioned from everyone, then SIGCONT), lost
//! heartbeat requests and replies (3% each, datanode failpoints), flipped bytes, truncated block
//! files and deleted sidecars, a data dir pulled from a running datanode, and a datanode whose
//! disks (small real tmpfs file systems) fill up.
//!
//! The rules it checks:
//! - throughout, a read returns exactly the bytes of an acknowledged version of the file, or fails;
//! - faults never take away every good replica of a block: a fault is injected only while every
//!   block keeps a good replica on a running node outside it (the promise is "fewer than a block's
//!   replication"), judged from the replica files themselves;
//! - at the end, after healing: the namespace equals the model exactly (nothing lost, nothing
//!   resurrected), every file reads back byte-exact with its BLAKE3 checksum, every block has
//!   exactly its target count of replicas on distinct nodes and each holds the block's bytes, and no
//!   datanode keeps a replica the namenode does not list (no orphans).
//!
//! An operation that fails while a fault is in force has an unknown outcome; the campaign then asks
//! the cluster, accepts any state the operation could have left, and adopts it.
//!
//! A failing run prints its seed; `LODE_NEMESIS_SEED=<seed>` replays it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::{bin_dir, plugin_lib, random_bytes, wait_until, Cluster, ClusterSpec};

/// Waits up to `limit` for `cond`; whether it held.
fn wait_until_quiet(mut cond: impl FnMut() -> bool, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

const BLOCK: usize = 64 * 1024;
const DATANODES: usize = 5;
/// The most the full-disk fault writes into one data dir (its disks are 4 MiB).
const FILLER_BYTES_MAX: usize = 8 << 20;

/// What one campaign does.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Seed of every random choice.
    pub seed: u64,
    /// Operations and faults to run (before healing).
    pub steps: usize,
}

/// What a campaign did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Client operations that were acknowledged.
    pub acknowledged: usize,
    /// Operations whose outcome was unknown (they failed under a fault) and was resolved.
    pub in_doubt: usize,
    /// Reads verified against the model.
    pub reads: usize,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, usize>,
}

#[derive(Clone, Debug, PartialEq)]
enum Node {
    Dir,
    File { data: Vec<u8>, replication: u8 },
}

struct Campaign {
    c: Cluster,
    rng: StdRng,
    model: BTreeMap<String, Node>,
    down: BTreeSet<usize>,
    frozen: BTreeMap<usize, usize>,
    pulled: BTreeSet<usize>,
    /// Datanodes running on small full disks.
    full: BTreeSet<usize>,
    next_name: usize,
    out: Outcome,
    seed: u64,
    trace: Vec<String>,
}

/// Runs one campaign; panics (naming the seed) when a rule breaks.
pub fn run(plan: &Plan) -> Outcome {
    eprintln!(
        "nemesis: seed {} ({} steps); replay with LODE_NEMESIS_SEED={}",
        plan.seed, plan.steps, plan.seed
    );
    let c = Cluster::start(ClusterSpec {
        datanodes: DATANODES,
        replication: 3,
        lease_expiry_ms: 3000,
        fast_block_scanner: true,
        fast_disk_check: true,
        edit_log_roll_bytes: Some(64 * 1024),
        // Message loss: some heartbeats never arrive, and some replies are lost after the
        // namenode acted on them.
        datanode_failpoints: Some(
            "datanode.heartbeat.lose_request=3%return;datanode.heartbeat.lose_reply=3%return"
                .into(),
        ),
        ..Default::default()
    });
    let mut k = Campaign {
        c,
        rng: StdRng::seed_from_u64(plan.seed),
        model: BTreeMap::from([("/".to_string(), Node::Dir)]),
        down: BTreeSet::new(),
        frozen: BTreeMap::new(),
        pulled: BTreeSet::new(),
        full: BTreeSet::new(),
        next_name: 0,
        out: Outcome::default(),
        seed: plan.seed,
        trace: vec![],
    };
    k.c.ok(&["plugin", "add", plugin_lib("wc").to_str().unwrap_or("")]);
    for step in 0..plan.steps {
        k.thaw_due(step);
        k.step(step);
    }
    k.heal();
    k.check_final();
    eprintln!("nemesis: seed {} clean: {:?}", plan.seed, k.out);
    std::mem::take(&mut k.out)
}

impl Campaign {
    fn note(&mut self, what: String) {
        eprintln!("nemesis[{}]: {what}", self.seed);
        self.trace.push(what);
    }

    fn fail(&self, what: &str) -> ! {
        panic!(
            "nemesis seed {}: {what}\nreplay with LODE_NEMESIS_SEED={}\nlast steps:\n  {}",
            self.seed,
            self.seed,
            self.trace
                .iter()
                .rev()
                .take(15)
                .rev()
                .cloned()
                .collect::<Vec<_>>()
                .join("\n  ")
        )
    }

    fn dirs(&self) -> Vec<String> {
        self.model
            .iter()
            .filter(|(_, n)| **n == Node::Dir)
            .map(|(p, _)| p.clone())
            .collect()
    }

    fn files(&self) -> Vec<String> {
        self.model
            .iter()
            .filter(|(_, n)| matches!(n, Node::File { .. }))
            .map(|(p, _)| p.clone())
            .collect()
    }

    fn pick<T: Clone>(&mut self, v: &[T]) -> Option<T> {
        if v.is_empty() {
            None
        } else {
            Some(v[self.rng.random_range(0..v.len())].clone())
        }
    }

    fn new_path(&mut self, dir: &str) -> String {
        self.next_name += 1;
        let name = format!("n{}", self.next_name);
        if dir == "/" {
            format!("/{name}")
        } else {
            format!("{dir}/{name}")
        }
    }

    fn lode(&self, args: &[&str]) -> std::process::Output {
        self.c.lode(args)
    }

    /// Runs a changing command; true if it was acknowledged (the outcome is noted either way).
    fn change(&mut self, args: &[&str]) -> bool {
        let out = self.lode(args);
        if out.status.success() {
            self.out.acknowledged += 1;
            true
        } else {
            let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
            self.note(format!("  -> failed, outcome unknown: {err}"));
            false
        }
    }

    fn put_local(&mut self, data: &[u8]) -> PathBuf {
        let p = self
            .c
            .dir()
            .join(format!("nemesis-upload-{}", self.next_name));
        std::fs::write(&p, data).unwrap_or_else(|e| self.fail(&format!("write local: {e}")));
        p
    }

    fn random_data(&mut self) -> Vec<u8> {
        let len = match self.rng.random_range(0..10) {
            0 => 0,
            1 => BLOCK,
            2 => 3 * BLOCK + 1,
            _ => self.rng.random_range(1..5 * BLOCK),
        };
        random_bytes(len, self.rng.random())
    }

    /// One operation or fault.
    fn step(&mut self, step: usize) {
        let roll = self.rng.random_range(0..100);
        match roll {
            0..=24 => self.op_put(false),
            25..=31 => self.op_put(true),
            32..=37 => self.op_rm(),
            38..=40 => self.op_rm_r(),
            41..=46 => self.op_mv(),
            47..=52 => self.op_mkdir(),
            53..=56 => self.op_setrep(),
            57..=74 => self.op_read(),
            75..=77 => self.op_scan(),
            78..=81 => self.fault_kill_datanodes(),
            82..=85 => self.fault_restart_datanode(),
            86..=87 => self.fault_freeze(step),
            88..=90 => self.fault_kill_namenode(false),
            91..=92 => self.fault_kill_namenode(true),
            93..=96 => self.fault_damage_replica(),
            97 => self.fault_full_disk(),
            _ => self.fault_pull_data_dir(),
        }
    }

    // ----- operations -----

    fn op_put(&mut self, overwrite: bool) {
        let target = if overwrite {
            match self.pick(&self.files()) {
                Some(p) => p,
                None => return,
            }
        } else {
            let dir = self.pick(&self.dirs()).unwrap_or_else(|| "/".into());
            self.new_path(&dir)
        };
        let data = self.random_data();
        let replication: u8 = self.rng.random_range(2..=3);
        let local = self.put_local(&data);
        let r = replication.to_string();
        let mut args = vec!["put", "--replication", &r];
        if overwrite {
            args.push("-f");
        }
        let l = local.to_string_lossy().to_string();
        args.push(&l);
        args.push(&target);
        self.note(format!(
            "put{} {target} ({} bytes, r{replication})",
            if overwrite { " -f" } else { "" },
            data.len()
        ));
        let ok = self.change(&args);
        let _ = std::fs::remove_file(&local);
        let new = Node::File { data, replication };
        if ok {
            self.model.insert(target, new);
        } else {
            let old = self.model.get(&target).cloned();
            self.resolve_file(&target, &[old, Some(new)]);
        }
    }

    fn op_rm(&mut self) {
        let Some(p) = self.pick(&self.files()) else {
            return;
        };
        self.note(format!("rm {p}"));
        if self.change(&["rm", &p]) {
            self.model.remove(&p);
        } else {
            let old = self.model.get(&p).cloned();
            self.resolve_file(&p, &[old, None]);
        }
    }

    fn subtree(&self, p: &str) -> Vec<String> {
        let prefix = format!("{p}/");
        self.model
            .keys()
            .filter(|k| *k == p || k.starts_with(&prefix))
            .cloned()
            .collect()
    }

    fn op_rm_r(&mut self) {
        let dirs: Vec<String> = self.dirs().into_iter().filter(|d| d != "/").collect();
        let Some(p) = self.pick(&dirs) else {
            return;
        };
        self.note(format!("rm -r {p}"));
        if !self.change(&["rm", "-r", &p]) {
            self.out.in_doubt += 1;
            self.wait_namenode();
            if self.stat(&p).is_some() {
                self.note(format!("  -> resolved: {p} is still there"));
                return; // not done: the subtree is unchanged (checked at the end)
            }
            self.note(format!("  -> resolved: {p} is gone"));
        }
        for k in self.subtree(&p) {
            self.model.remove(&k);
        }
    }

    fn op_mv(&mut self) {
        let all: Vec<String> = self.model.keys().filter(|k| *k != "/").cloned().collect();
        let Some(src) = self.pick(&all) else {
            return;
        };
        let dirs: Vec<String> = self
            .dirs()
            .into_iter()
            .filter(|d| *d != src && !d.starts_with(&format!("{src}/")))
            .collect();
        let Some(dir) = self.pick(&dirs) else {
            return;
        };
        let dst = self.new_path(&dir);
        self.note(format!("mv {src} {dst}"));
        if !self.change(&["mv", &src, &dst]) {
            self.out.in_doubt += 1;
            self.wait_namenode();
            if self.stat(&src).is_some() {
                self.note("  -> resolved: not moved".into());
                return;
            }
            if self.stat(&dst).is_none() {
                self.fail(&format!("mv {src} {dst} in doubt: neither exists"));
            }
            self.note("  -> resolved: moved".into());
        }
        for k in self.subtree(&src) {
            if let Some(n) = self.model.remove(&k) {
                self.model.insert(format!("{dst}{}", &k[src.len()..]), n);
            }
        }
    }

    fn op_mkdir(&mut self) {
        let dir = self.pick(&self.dirs()).unwrap_or_else(|| "/".into());
        let p = self.new_path(&dir);
        self.note(format!("mkdir {p}"));
        if self.change(&["mkdir", &p]) {
            self.model.insert(p, Node::Dir);
        } else {
            self.out.in_doubt += 1;
            self.wait_namenode();
            if self.stat(&p).is_some() {
                self.model.insert(p, Node::Dir);
            }
        }
    }

    fn op_setrep(&mut self) {
        let Some(p) = self.pick(&self.files()) else {
            return;
        };
        let r: u8 = self.rng.random_range(2..=3);
        self.note(format!("setrep {r} {p}"));
        let now = if self.change(&["setrep", &r.to_string(), &p]) {
            r
        } else {
            self.out.in_doubt += 1;
            self.wait_namenode();
            match self.stat(&p) {
                Some(s) => s["replication"].as_u64().unwrap_or(0) as u8,
                None => self.fail(&format!("setrep {p}: the file vanished")),
            }
        };
        if let Some(Node::File { replication, .. }) = self.model.get_mut(&p) {
            *replication = now;
        }
    }

    fn op_read(&mut self) {
        let Some(p) = self.pick(&self.files()) else {
            return;
        };
        let Some(Node::File { data, .. }) = self.model.get(&p).cloned() else {
            return;
        };
        let out = self.lode(&["cat", &p]);
        if out.status.success() {
            self.out.reads += 1;
            if out.stdout != data {
                self.fail(&format!(
                    "read of {p} returned {} bytes that were never acknowledged (want {})",
                    out.stdout.len(),
                    data.len()
                ));
            }
            let sum = self.lode(&["checksum", &p]);
            if sum.status.success() {
                let want = blake3::hash(&data).to_hex().to_string();
                if !String::from_utf8_lossy(&sum.stdout).starts_with(&want) {
                    self.fail(&format!("checksum of {p} is not the acknowledged bytes'"));
                }
            }
        }
    }

    fn op_scan(&mut self) {
        let Some(p) = self.pick(&self.files()) else {
            return;
        };
        let Some(Node::File { data, .. }) = self.model.get(&p).cloned() else {
            return;
        };
        let out = self.lode(&["scan", "--json", "--plugin", "wc", &p]);
        if out.status.success() {
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            let bytes = v["stats"]["input_bytes"].as_u64();
            if bytes != Some(data.len() as u64) {
                self.fail(&format!(
                    "scan of {p} read {bytes:?} bytes, want {}",
                    data.len()
                ));
            }
            let lines = data.iter().filter(|b| **b == b'\n').count();
            let result = v["result"].as_str().unwrap_or("");
            if result.split_whitespace().next() != Some(&lines.to_string()) {
                self.fail(&format!(
                    "scan of {p}: wc says {result:?}, want {lines} lines"
                ));
            }
        }
    }

    // ----- resolving unknown outcomes -----

    /// Waits until the namenode leaves start-up safe mode: every block keeps a reported replica
    /// under the campaign's faults, so it must.
    fn wait_safemode_off(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.c.report().is_some_and(|r| r["safemode"] == false) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.fail("the namenode stays in safe mode although every block has a live replica");
    }

    fn wait_namenode(&self) {
        wait_until("the namenode answers", Duration::from_secs(60), || {
            self.c.report().is_some()
        });
    }

    /// The entry at `p`, `None` only when the namenode says it does not exist (any other failure,
    /// such as a namenode that does not answer yet, is waited out).
    fn stat(&self, p: &str) -> Option<Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = self.lode(&["stat", "--json", p]);
            if out.status.success() {
                if let Ok(v) = serde_json::from_slice(&out.stdout) {
                    return Some(v);
                }
            }
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("no such file or directory") {
                return None;
            }
            if Instant::now() > deadline {
                self.fail(&format!("stat {p} keeps failing: {err}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// After a failed change of the file at `p`, finds which of `allowed` the cluster holds (an
    /// unfinished write may linger until its lease expires) and adopts it.
    fn resolve_file(&mut self, p: &str, allowed: &[Option<Node>]) {
        self.out.in_doubt += 1;
        self.wait_namenode();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let seen = match self.stat(p) {
                None => None,
                Some(s) if s["complete"] != true => {
                    if Instant::now() > deadline {
                        self.fail(&format!("{p} is still being written after its lease"));
                    }
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
                Some(s) => {
                    let out = self.lode(&["cat", p]);
                    if !out.status.success() {
                        // A replica may be on a node that is down; the namespace state is what
                        // matters here: match by size and replication, verify at the end.
                        let size = s["size"].as_u64().unwrap_or(u64::MAX);
                        let found = allowed.iter().flatten().find(
                            |n| matches!(n, Node::File { data, .. } if data.len() as u64 == size),
                        );
                        match found {
                            Some(n) => Some(n.clone()),
                            None => self
                                .fail(&format!("{p}: size {size} matches no acknowledged version")),
                        }
                    } else {
                        let r = s["replication"].as_u64().unwrap_or(0) as u8;
                        Some(Node::File {
                            data: out.stdout,
                            replication: r,
                        })
                    }
                }
            };
            let matches = |n: &Option<Node>| match (n, &seen) {
                (None, None) => true,
                (Some(Node::File { data: a, .. }), Some(Node::File { data: b, .. })) => a == b,
                _ => false,
            };
            match allowed.iter().find(|a| matches(a)) {
                Some(a) => {
                    let what = if a.is_some() {
                        "a version written"
                    } else {
                        "absent"
                    };
                    self.note(format!("  -> resolved: {p} is {what}"));
                    let adopted = match (a, seen) {
                        (
                            Some(Node::File { data, replication }),
                            Some(Node::File {
                                replication: seen_r,
                                ..
                            }),
                        ) => {
                            // The replication is the version's; a failed setrep could also have changed it.
                            Some(Node::File {
                                data: data.clone(),
                                replication: if seen_r > 0 { seen_r } else { *replication },
                            })
                        }
                        (a, _) => a.clone(),
                    };
                    match adopted {
                        Some(n) => self.model.insert(p.to_string(), n),
                        None => self.model.remove(p),
                    };
                    return;
                }
                None => self.fail(&format!(
                    "{p}: the cluster holds a version that was never written"
                )),
            }
        }
    }

    // ----- faults -----

    fn running(&self) -> Vec<usize> {
        (1..=DATANODES)
            .filter(|i| !self.down.contains(i) && !self.frozen.contains_key(i))
            .collect()
    }

    /// (block id, the block's bytes, the datanodes the namenode lists for it) of every block of
    /// every file in the model.
    fn all_blocks(&self) -> Vec<(u64, Vec<u8>, Vec<usize>)> {
        let mut out = vec![];
        for p in self.files() {
            let Some(Node::File { data, .. }) = self.model.get(&p) else {
                continue;
            };
            let s = self.lode(&["stat", "--json", "--blocks", &p]);
            let Ok(v) = serde_json::from_slice::<Value>(&s.stdout) else {
                continue;
            };
            for b in v["blocks"].as_array().cloned().unwrap_or_default() {
                let id = b["id"].as_u64().unwrap_or(0);
                let off = b["offset"].as_u64().unwrap_or(0) as usize;
                let len = b["len"].as_u64().unwrap_or(0) as usize;
                let listed = b["locations"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|l| l.as_str()?.trim_start_matches("dn-").parse().ok())
                    .collect();
                if off + len <= data.len() {
                    out.push((id, data[off..off + len].to_vec(), listed));
                }
            }
        }
        out
    }

    fn good_holders(&self, id: u64, bytes: &[u8]) -> Vec<usize> {
        (1..=DATANODES)
            .filter(|dn| {
                self.c
                    .replica_path(*dn, id)
                    .filter(|p| p.with_extension("meta").exists())
                    .and_then(|p| std::fs::read(p).ok())
                    .is_some_and(|b| b == bytes)
            })
            .collect()
    }

    /// Whether taking `nodes` away (killing, freezing or damaging) leaves every block a good
    /// replica on a running node outside them that the namenode lists (a replica file the
    /// namenode already chose to delete as excess does not count).
    fn may_lose(&self, nodes: &[usize]) -> bool {
        let running = self.running();
        self.all_blocks().iter().all(|(id, bytes, listed)| {
            self.good_holders(*id, bytes).iter().any(|h| {
                running.contains(h)
                    && listed.contains(h)
                    && !nodes.contains(h)
                    && !self.pulled.contains(h)
            })
        })
    }

    fn count(&mut self, kind: &'static str) {
        *self.out.faults.entry(kind).or_default() += 1;
    }

    fn fault_kill_datanodes(&mut self) {
        let running = self.running();
        let n = self
            .rng
            .random_range(1..=2usize)
            .min(running.len().saturating_sub(2));
        let mut victims = vec![];
        for _ in 0..n {
            let rest: Vec<usize> = running
                .iter()
                .filter(|d| !victims.contains(*d))
                .copied()
                .collect();
            if let Some(v) = self.pick(&rest) {
                victims.push(v);
            }
        }
        if victims.is_empty() || !self.may_lose(&victims) {
            return;
        }
        self.note(format!("FAULT kill -9 datanodes {victims:?}"));
        for v in victims {
            self.c.kill_datanode(v);
            self.down.insert(v);
        }
        self.count("kill datanode");
    }

    fn fault_restart_datanode(&mut self) {
        let down: Vec<usize> = self.down.iter().copied().collect();
        let Some(d) = self.pick(&down) else {
            return;
        };
        self.note(format!("FAULT restart dn-{d}"));
        self.restore_pulled(d);
        self.full.remove(&d);
        self.c.start_datanode(d);
        self.down.remove(&d);
        self.count("restart datanode");
    }

    fn fault_freeze(&mut self, step: usize) {
        let running = self.running();
        let Some(d) = self.pick(&running) else {
            return;
        };
        if running.len() <= 3 || !self.may_lose(&[d]) {
            return;
        }
        let steps = self.rng.random_range(2..25);
        self.note(format!("FAULT freeze dn-{d} (SIGSTOP) for {steps} steps"));
        self.signal(d, "STOP");
        self.frozen.insert(d, step + steps);
        self.count("freeze datanode");
    }

    fn thaw_due(&mut self, step: usize) {
        let due: Vec<usize> = self
            .frozen
            .iter()
            .filter(|(_, until)| **until <= step)
            .map(|(d, _)| *d)
            .collect();
        for d in due {
            self.note(format!("FAULT thaw dn-{d} (SIGCONT)"));
            self.signal(d, "CONT");
            self.frozen.remove(&d);
        }
    }

    fn signal(&self, dn: usize, sig: &str) {
        if let Some(pid) = self.c.datanode_pid(dn) {
            let _ = Command::new("kill")
                .args([&format!("-{sig}"), &pid.to_string()])
                .status();
        }
    }

    fn fault_kill_namenode(&mut self, mid_put: bool) {
        if !mid_put {
            self.note("FAULT kill -9 namenode".into());
            self.c.kill_namenode();
            self.c.start_namenode();
            self.count("kill namenode");
            if self.rng.random_bool(0.5) {
                self.wait_safemode_off();
            }
            return;
        }
        // A put of several blocks in flight while the namenode dies.
        let dir = self.pick(&self.dirs()).unwrap_or_else(|| "/".into());
        let target = self.new_path(&dir);
        let data = random_bytes(
            self.rng.random_range(4 * BLOCK..12 * BLOCK),
            self.rng.random(),
        );
        let local = self.put_local(&data);
        let delay = Duration::from_millis(self.rng.random_range(0..150));
        self.note(format!(
            "FAULT kill -9 namenode {delay:?} into a put of {target}"
        ));
        let mut child: Child = Command::new(bin_dir().join("lode"))
            .arg("--config")
            .arg(self.c.client_config())
            .args(["put", "--replication", "3"])
            .arg(&local)
            .arg(&target)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| self.fail(&format!("spawn lode: {e}")));
        std::thread::sleep(delay);
        self.c.kill_namenode();
        self.c.start_namenode();
        let ok = child.wait().map(|s| s.success()).unwrap_or(false);
        let _ = std::fs::remove_file(&local);
        self.count("kill namenode mid-put");
        let new = Node::File {
            data,
            replication: 3,
        };
        if ok {
            self.out.acknowledged += 1;
            self.model.insert(target, new);
        } else {
            self.resolve_file(&target, &[None, Some(new)]);
        }
    }

    fn fault_damage_replica(&mut self) {
        let blocks = self.all_blocks();
        let Some((id, bytes, _)) = self.pick(&blocks) else {
            return;
        };
        let running = self.running();
        let holders: Vec<usize> = self
            .good_holders(id, &bytes)
            .into_iter()
            .filter(|h| running.contains(h))
            .collect();
        let Some(victim) = self.pick(&holders) else {
            return;
        };
        if !self.may_lose(&[victim]) || bytes.is_empty() {
            return;
        }
        let Some(path) = self.c.replica_path(victim, id) else {
            return;
        };
        let how = self.rng.random_range(0..3);
        let kind = match how {
            0 => {
                let mut b = bytes.clone();
                let i = self.rng.random_range(0..b.len());
                b[i] ^= 0x10;
                let _ = std::fs::write(&path, b);
                "flip a byte"
            }
            1 => {
                let _ = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_len((bytes.len() / 2) as u64));
                "truncate"
            }
            _ => {
                let _ = std::fs::remove_file(path.with_extension("meta"));
                "delete the sidecar"
            }
        };
        self.note(format!("FAULT {kind} of block {id} on dn-{victim}"));
        self.count("damage replica");
    }

    fn fault_pull_data_dir(&mut self) {
        let running = self.running();
        let Some(d) = self.pick(&running) else {
            return;
        };
        if self.pulled.contains(&d) || running.len() <= 3 || !self.may_lose(&[d]) {
            return;
        }
        let dir = self.c.datanode_dir(d).join("data1");
        if std::fs::rename(&dir, dir.with_extension("pulled")).is_ok() {
            self.note(format!("FAULT pull data1 from under dn-{d}"));
            self.pulled.insert(d);
            self.count("pull data dir");
        }
    }

    /// A datanode restarts on two small disks (real tmpfs file systems, in a mount namespace of its
    /// own; its replicas are out of reach, as after a disk swap) that other programs then fill to
    /// the last byte. Healing restarts it on its own disks.
    fn fault_full_disk(&mut self) {
        let running = self.running();
        let Some(d) = self.pick(&running) else {
            return;
        };
        if self.full.contains(&d)
            || self.pulled.contains(&d)
            || running.len() <= 3
            || !self.may_lose(&[d])
        {
            return;
        }
        if let Err(why) = self.c.start_datanode_on_small_disks(d, 4 << 20) {
            self.note(format!("(no full-disk fault here: {why})"));
            return;
        }
        self.note(format!(
            "FAULT dn-{d} restarted on 4 MiB disks, which then fill up"
        ));
        self.full.insert(d);
        self.count("full disk");
        // Only once the datanode runs (after its private mounts are made) do its data dirs, seen
        // through its /proc root, lie on the small disks.
        let name = format!("dn-{d}");
        if !wait_until_quiet(
            || self.c.datanodes_in_state("live").contains(&name),
            Duration::from_secs(30),
        ) {
            self.note(format!(
                "(dn-{d} did not come back on small disks; no filler)"
            ));
            return;
        }
        for dir in ["data1", "data2"] {
            let p = self.c.datanode_dir(d).join(dir);
            // Never more than the small disk could hold: if the path were on a real disk after
            // all, this wastes 8 MiB, not the machine's disk.
            if let Ok(mut f) = std::fs::File::create(p.join("filler")) {
                use std::io::Write;
                let chunk = vec![0u8; 64 << 10];
                let mut written = 0usize;
                while written < FILLER_BYTES_MAX && f.write_all(&chunk).is_ok() {
                    written += chunk.len();
                }
                let _ = f.sync_all();
            }
        }
    }

    /// Puts a pulled data dir back (with the datanode stopped).
    fn restore_pulled(&mut self, d: usize) {
        if self.pulled.remove(&d) {
            let dir = self.c.datanode_dir(d).join("data1");
            let _ = std::fs::remove_dir_all(&dir);
            let _ = std::fs::rename(dir.with_extension("pulled"), &dir);
        }
    }

    // ----- healing and the final check -----

    fn heal(&mut self) {
        self.note("heal: thaw, restart and repair every datanode".into());
        let frozen: Vec<usize> = self.frozen.keys().copied().collect();
        for d in frozen {
            self.signal(d, "CONT");
        }
        self.frozen.clear();
        for d in 1..=DATANODES {
            if self.pulled.contains(&d) || self.down.contains(&d) || self.full.remove(&d) {
                self.c.kill_datanode(d);
                self.restore_pulled(d);
                self.c.start_datanode(d);
            }
        }
        self.down.clear();
        self.wait_namenode();
        self.c.wait_live(DATANODES);
    }

    fn check_final(&mut self) {
        // Unfinished writes end with their leases; then the namespace must equal the model.
        // Lost commands cost their timeouts (copies 120 s, deletes and verifications 30 s).
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut last_problem = String::new();
        while Instant::now() < deadline {
            match self.final_problem() {
                None => return,
                Some(p) => {
                    if p != last_problem {
                        eprintln!(
                            "nemesis[{}]: waiting for the cluster to heal: {p}",
                            self.seed
                        );
                        last_problem = p;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        self.fail(&format!("the cluster did not converge: {last_problem}"));
    }

    /// The first rule the cluster breaks now, if any.
    fn final_problem(&self) -> Option<String> {
        if self.c.report().is_none_or(|r| r["safemode"] != false) {
            return Some("the namenode is in safe mode".into());
        }
        let out = self.lode(&["ls", "-R", "--json", "/"]);
        if !out.status.success() {
            return Some("ls -R failed".into());
        }
        let listed: Value = serde_json::from_slice(&out.stdout).ok()?;
        let mut seen: BTreeMap<String, Value> = BTreeMap::new();
        for e in listed.as_array()? {
            let p = e["path"].as_str()?.to_string();
            if p == "/.lode" || p.starts_with("/.lode/") {
                continue;
            }
            seen.insert(p, e.clone());
        }
        let want: BTreeSet<&String> = self.model.keys().filter(|k| *k != "/").collect();
        let got: BTreeSet<&String> = seen.keys().collect();
        if want != got {
            let lost: Vec<_> = want.difference(&got).collect();
            let extra: Vec<_> = got.difference(&want).collect();
            // A file that comes back after it was removed is as bad as one lost.
            return Some(format!(
                "namespace differs: lost {lost:?}, resurrected or unknown {extra:?}"
            ));
        }
        let mut listed_replicas: BTreeSet<(usize, u64)> = BTreeSet::new();
        for (p, n) in &self.model {
            let Node::File { data, replication } = n else {
                continue;
            };
            let s = self.lode(&["stat", "--json", "--blocks", p]);
            let v: Value = serde_json::from_slice(&s.stdout).ok()?;
            if v["replication"].as_u64() != Some(u64::from(*replication)) {
                return Some(format!(
                    "{p}: replication {} not {replication}",
                    v["replication"]
                ));
            }
            for b in v["blocks"].as_array()? {
                let id = b["id"].as_u64()?;
                let off = b["offset"].as_u64()? as usize;
                let len = b["len"].as_u64()? as usize;
                let locs: BTreeSet<usize> = b["locations"]
                    .as_array()?
                    .iter()
                    .filter_map(|l| l.as_str()?.trim_start_matches("dn-").parse().ok())
                    .collect();
                if locs.len() != usize::from(*replication) {
                    return Some(format!(
                        "{p}: block {id} has {} replicas, target {replication}",
                        locs.len()
                    ));
                }
                let bytes = data.get(off..off + len)?;
                for dn in &locs {
                    listed_replicas.insert((*dn, id));
                    if !self.good_holders(id, bytes).contains(dn) {
                        return Some(format!(
                            "{p}: block {id} is listed on dn-{dn}, which lacks its bytes"
                        ));
                    }
                }
            }
            let got = self.lode(&["cat", p]);
            if !got.status.success() || &got.stdout != data {
                return Some(format!("{p}: does not read back byte-exact"));
            }
            let sum = self.lode(&["checksum", p]);
            if !String::from_utf8_lossy(&sum.stdout)
                .starts_with(blake3::hash(data).to_hex().as_str())
            {
                return Some(format!("{p}: checksum differs"));
            }
        }
        // No orphans: every replica on every disk is one the namenode lists there (the plugin
        // library's blocks under /.lode count too).
        let lode_files = self.lode(&["ls", "-R", "--json", "/.lode"]);
        if let Ok(v) = serde_json::from_slice::<Value>(&lode_files.stdout) {
            for e in v.as_array().cloned().unwrap_or_default() {
                if e["type"] == "file" {
                    let s = self.lode(&["stat", "--json", "--blocks", e["path"].as_str()?]);
                    let v: Value = serde_json::from_slice(&s.stdout).ok()?;
                    for b in v["blocks"].as_array()? {
                        for l in b["locations"].as_array()? {
                            let dn: usize = l.as_str()?.trim_start_matches("dn-").parse().ok()?;
                            listed_replicas.insert((dn, b["id"].as_u64()?));
                        }
                    }
                }
            }
        }
        for dn in 1..=DATANODES {
            for d in ["data1", "data2"] {
                let current = self.c.datanode_dir(dn).join(d).join("current");
                for e in std::fs::read_dir(&current).ok()?.flatten() {
                    let name = e.file_name().to_string_lossy().to_string();
                    if name.ends_with(".meta") {
                        continue;
                    }
                    let id: u64 = name.strip_prefix("blk_")?.parse().ok()?;
                    if !listed_replicas.contains(&(dn, id)) {
                        return Some(format!("orphan replica blk_{id} on dn-{dn}"));
                    }
                }
            }
        }
        None
    }
}
