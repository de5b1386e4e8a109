//! A deterministic simulation of the namenode core: the real writer (validation, journal, overlay,
//! soft state), block map, repair planner, placement, safe mode and leases, with simulated
//! datanodes, an in-memory journal and store, and a virtual clock. No I/O, no threads.
//!
//! Each run drives random client writes (some abandoned mid-way, some handing in the datanodes'
//! replica receipts with their commits, and old receipts replayed, which must count for nothing), overwrites, deletes, setrep,
//! datanode deaths and returns, disks replaced, replicas going bad (found by the scanner), stale
//! replicas planted under live ids, and namenode restarts (soft state dropped, the journal
//! replayed). After every step it checks:
//! - every counted replica was last reported with exactly its block's committed length and value;
//! - no copy is ordered from a source that is stale or known corrupt;
//! - no good replica of a live block is deleted below the block's target;
//! - block and inode ids are never issued twice, across restarts too;
//! - every pending copy is of a known complete block, from a counted holder, to a node without it.
//!
//! At the end of each run every datanode returns and the cluster is left to heal: then every block
//! of every complete file must be counted on exactly its target of nodes that hold its bytes, and no
//! datanode may keep a replica nobody counts (an orphan). Then one datanode is lost for good and
//! every file gets a new target below the nodes left: the same must hold on the live ones, with the
//! dead node still listed as a holder.
//!
//! `SIM_SEED=<n> cargo test -p lode-namenode --test sim` replays one run; `SIM_RUNS=<n>` sets the
//! count (default 1000).

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lode_namenode::editlog::Journal;
use lode_namenode::http::Metrics;
use lode_namenode::namespace::{IdAlloc, InodeKind, MetaOp, Namespace};
use lode_namenode::perm::Caller;
use lode_namenode::placement::choose_targets;
use lode_namenode::state::{NodeState, State, Timing};
use lode_namenode::store::{MemStore, Overlay};
use lode_namenode::writer::{Mutation, Writer};
use lode_namenode::Error;
use lode_protocol::messages::{CommittedBlock, NamenodeReply, ReportedBlock, Space, Target};
use lode_protocol::{Blake3Cv, BlockId, InodeId, SessionId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BLOCK: u64 = 65536;
const DATANODES: usize = 5;
const TICK: Duration = Duration::from_millis(500);

/// A journal in memory: what was synced survives a restart.
struct MemJournal {
    durable: Arc<Mutex<Vec<(u64, MetaOp)>>>,
    unsynced: Vec<(u64, MetaOp)>,
    last: u64,
}

impl Journal for MemJournal {
    fn append(&mut self, op: &MetaOp) -> Result<u64, Error> {
        self.last += 1;
        self.unsynced.push((self.last, op.clone()));
        Ok(self.last)
    }
    fn sync(&mut self) -> Result<(), Error> {
        self.durable.lock().unwrap().append(&mut self.unsynced);
        Ok(())
    }
    fn last_seq(&self) -> u64 {
        self.last
    }
    fn wants_checkpoint(&self) -> bool {
        false
    }
    fn checkpoint(&mut self, _: &[u8]) -> Result<(), Error> {
        Ok(())
    }
}

type Replica = (u64, Blake3Cv);

#[derive(Default)]
struct SimDn {
    alive: bool,
    registered: bool,
    /// What is on its disks.
    replicas: BTreeMap<BlockId, Replica>,
    /// Replicas whose data went bad (the sidecar still names the old value).
    bad: BTreeSet<BlockId>,
    /// What the namenode last heard from it.
    reported: BTreeMap<BlockId, Replica>,
    received: Vec<ReportedBlock>,
    deleted: Vec<BlockId>,
}

impl SimDn {
    fn store(&mut self, id: BlockId, r: Replica) {
        self.replicas.insert(id, r);
        self.bad.remove(&id);
        self.received.retain(|b| b.id != id);
        self.deleted.retain(|b| *b != id);
        self.received.push(ReportedBlock {
            id,
            len: r.0,
            cv: r.1,
        });
    }
    fn remove(&mut self, id: BlockId) {
        if self.replicas.remove(&id).is_some() {
            self.bad.remove(&id);
            self.received.retain(|b| b.id != id);
            if !self.deleted.contains(&id) {
                self.deleted.push(id);
            }
        }
    }
}

struct Sim {
    seed: u64,
    rng: StdRng,
    t0: Instant,
    clock: Duration,
    journal: Arc<Mutex<Vec<(u64, MetaOp)>>>,
    writer: Writer<MemStore, MemJournal>,
    state: Arc<Mutex<State>>,
    dns: BTreeMap<String, SimDn>,
    issued_blocks: BTreeSet<BlockId>,
    issued_inodes: BTreeSet<InodeId>,
    /// Complete files by path: their blocks as written.
    files: BTreeMap<String, Vec<CommittedBlock>>,
    /// Receipts handed in so far, by datanode, for replays.
    receipts: Vec<(String, ReportedBlock)>,
    next: u64,
    steps: usize,
}

fn timing() -> Timing {
    Timing {
        stale_after: Duration::from_secs(3),
        dead_after: Duration::from_secs(10),
        lease_expiry: Duration::from_secs(10),
    }
}

fn space() -> Space {
    Space {
        capacity: 1 << 40,
        used: 0,
        remaining: 1 << 40,
        block_room: 1 << 40,
        failed_volumes: 0,
    }
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let journal = Arc::new(Mutex::new(vec![]));
        let t0 = Instant::now();
        let (writer, state) = Self::start_namenode(&journal, t0);
        let dns = (1..=DATANODES)
            .map(|i| {
                (
                    format!("dn-{i}"),
                    SimDn {
                        alive: true,
                        ..Default::default()
                    },
                )
            })
            .collect();
        Sim {
            seed,
            rng: StdRng::seed_from_u64(seed),
            t0,
            clock: Duration::ZERO,
            journal,
            writer,
            state,
            dns,
            issued_blocks: BTreeSet::new(),
            issued_inodes: BTreeSet::new(),
            files: BTreeMap::new(),
            receipts: vec![],
            next: 0,
            steps: 0,
        }
    }

    /// A namenode from the durable journal alone: the store rebuilt by replay, soft state new.
    fn start_namenode(
        journal: &Arc<Mutex<Vec<(u64, MetaOp)>>>,
        now: Instant,
    ) -> (Writer<MemStore, MemJournal>, Arc<Mutex<State>>) {
        let store = Arc::new(MemStore::default());
        let ns = Namespace::open(store.clone()).unwrap();
        let records = journal.lock().unwrap().clone();
        for (seq, op) in &records {
            ns.apply(*seq, op).unwrap();
        }
        let stored = ns.load_all().unwrap();
        let ids = IdAlloc::recover(&ns, &stored).unwrap();
        let mut st = State::new(timing(), &stored, now);
        st.safemode_threshold = 0.999;
        // No sweep: the events alone must mark every block that needs repair planning.
        st.sweep_chunk = 0;
        st.check_safemode(now);
        let state = Arc::new(Mutex::new(st));
        let writer = Writer {
            ns: Namespace::open(Arc::new(Overlay::new(store))).unwrap(),
            journal: MemJournal {
                durable: journal.clone(),
                unsynced: vec![],
                last: records.last().map_or(0, |r| r.0),
            },
            ids,
            state: state.clone(),
            lease_ms: 10_000,
            metrics: Arc::new(Metrics::default()),
        };
        (writer, state)
    }

    fn trace(&self, what: String) {
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!("  [{:?}] {what}", self.clock);
        }
    }

    fn now(&self) -> Instant {
        self.t0 + self.clock
    }

    fn fail(&self, what: String) -> ! {
        panic!(
            "sim seed {} step {}: {what}\nreplay: SIM_SEED={} cargo test -p lode-namenode --test sim",
            self.seed, self.steps, self.seed
        )
    }

    fn submit(&mut self, m: Mutation) -> Result<NamenodeReply, Error> {
        let now = self.now();
        let now_ms = self.clock.as_millis() as u64;
        let mut r = self
            .writer
            .run_group(vec![m], now, now_ms)
            .unwrap_or_else(|e| self.fail(format!("writer failed: {e}")));
        r.pop().unwrap()
    }

    fn safemode(&self) -> bool {
        self.state.lock().unwrap().safemode != lode_namenode::state::SafeMode::Off
    }

    // ----- client -----

    /// A pipeline for a new block, its room promised (as the server does before AddBlock).
    fn place(&mut self, replication: u8) -> Option<Vec<Target>> {
        let mut st = self.state.lock().unwrap();
        let now = self.now();
        let chosen = choose_targets(
            &st.write_candidates(now),
            usize::from(replication),
            BLOCK,
            &[],
            self.rng.random(),
        )
        .ok()?;
        for n in &chosen {
            st.promise(n, BLOCK);
        }
        Some(chosen.iter().filter_map(|n| st.target(n)).collect())
    }

    fn write_file(&mut self, overwrite_of: Option<String>) {
        if self.safemode() {
            return;
        }
        self.next += 1;
        let path = overwrite_of
            .clone()
            .unwrap_or_else(|| format!("/f{}", self.next));
        let replication: u8 = self.rng.random_range(1..=3);
        let session = SessionId(self.rng.random());
        let blocks = self.rng.random_range(0..4);
        // Half the writers with data ask for the first block with the create.
        let first_targets = if blocks > 0 && self.rng.random_bool(0.5) {
            self.place(replication)
        } else {
            None
        };
        let created = self.submit(Mutation::Create {
            caller: Caller::superuser(),
            mode: 0o644,
            path: path.clone(),
            overwrite: overwrite_of.is_some(),
            replication,
            block_size: BLOCK,
            session,
            first_block: first_targets.clone(),
        });
        let (inode, mut first) = match created {
            Ok(NamenodeReply::Created { inode, first, .. }) => (inode, first),
            Ok(other) => self.fail(format!("create replied {other:?}")),
            Err(_) => return,
        };
        if first.is_some() != first_targets.is_some() {
            self.fail(format!(
                "create with first block targets {first_targets:?} gave {first:?}"
            ));
        }
        if !self.issued_inodes.insert(inode) {
            self.fail(format!("inode {inode} issued twice"));
        }
        let abandon_at = if self.rng.random_bool(0.15) {
            Some(self.rng.random_range(0..=blocks))
        } else {
            None
        };
        let mut previous: Option<CommittedBlock> = None;
        let mut written = vec![];
        let mut handed = vec![];
        let mut size = 0;
        for k in 0..blocks {
            if abandon_at == Some(k) {
                return; // the client dies: its lease expires later
            }
            let (id, targets) = if let Some(b) = first.take() {
                (b.id, b.locations)
            } else {
                let Some(targets) = self.place(replication) else {
                    return;
                };
                let reply = self.submit(Mutation::AddBlock {
                    inode,
                    session,
                    previous,
                    targets: targets.clone(),
                });
                match reply {
                    Ok(NamenodeReply::Block(b)) => (b.id, targets),
                    Ok(other) => self.fail(format!("add block replied {other:?}")),
                    Err(_) => return,
                }
            };
            if !self.issued_blocks.insert(id) {
                self.fail(format!("block {id} issued twice"));
            }
            let len = if k + 1 == blocks {
                self.rng.random_range(1..=BLOCK)
            } else {
                BLOCK
            };
            let cv = Blake3Cv(self.rng.random());
            self.trace(format!(
                "{path}: block {id} on {:?}",
                targets.iter().map(|t| t.name.clone()).collect::<Vec<_>>()
            ));
            // The pipeline: every live target stores the block.
            let mut stored = 0;
            for t in &targets {
                let dn = self.dns.get_mut(&t.name).unwrap();
                if dn.alive {
                    dn.store(id, (len, cv));
                    stored += 1;
                }
            }
            // The writer hands in some of the datanodes' receipts with the commit (the rest are
            // heard of by heartbeat).
            let replica = ReportedBlock { id, len, cv };
            for t in &targets {
                if !self.dns[&t.name].alive || !self.rng.random_bool(0.5) {
                    continue;
                }
                let now = self.now();
                if self.state.lock().unwrap().receipt(&t.name, replica, now) {
                    self.dns
                        .get_mut(&t.name)
                        .unwrap()
                        .reported
                        .insert(id, (len, cv));
                }
                handed.push((t.name.clone(), replica));
            }
            if stored < usize::from(replication).min(2) {
                let _ = self.submit(Mutation::Abandon {
                    inode,
                    session,
                    block: id,
                });
                return;
            }
            let c = CommittedBlock { id, len, cv };
            previous = Some(c);
            written.push(c);
            size += len;
        }
        if abandon_at == Some(blocks) {
            return;
        }
        match self.submit(Mutation::Complete {
            inode,
            session,
            last: previous,
            size,
        }) {
            Ok(_) => {
                self.files.insert(path, written);
                self.receipts.extend(handed);
            }
            Err(e) => self.fail(format!("complete refused: {e}")),
        }
        // A writer replays a receipt of a block it finished earlier: it must count for nothing
        // (the replica may be gone since).
        if !self.receipts.is_empty() && self.rng.random_bool(0.3) {
            let (name, r) = self.receipts[self.rng.random_range(0..self.receipts.len())].clone();
            let now = self.now();
            if self.state.lock().unwrap().receipt(&name, r, now) {
                self.fail(format!(
                    "a replayed receipt of block {} from {name} counted",
                    r.id
                ));
            }
        }
    }

    fn delete_file(&mut self) {
        if self.safemode() {
            return;
        }
        let Some(path) = self.pick_file() else {
            return;
        };
        if self
            .submit(Mutation::Delete {
                caller: Caller::superuser(),
                path: path.clone(),
                recursive: false,
            })
            .is_ok()
        {
            self.files.remove(&path);
        }
    }

    fn setrep(&mut self) {
        if self.safemode() {
            return;
        }
        let Some(path) = self.pick_file() else {
            return;
        };
        let r = self.rng.random_range(1..=4);
        // Lowering a target to the faults in force would leave the promise behind.
        if self.files[&path]
            .iter()
            .any(|b| self.faulty(b.id, None) >= usize::from(r))
        {
            return;
        }
        self.trace(format!("setrep {r} {path}"));
        let _ = self.submit(Mutation::SetReplication {
            caller: Caller::superuser(),
            path,
            replication: r,
        });
    }

    fn pick_file(&mut self) -> Option<String> {
        let all: Vec<&String> = self.files.keys().collect();
        if all.is_empty() {
            return None;
        }
        Some(all[self.rng.random_range(0..all.len())].clone())
    }

    fn pick_dn(&mut self, alive: bool) -> Option<String> {
        let all: Vec<String> = self
            .dns
            .iter()
            .filter(|(_, d)| d.alive == alive)
            .map(|(n, _)| n.clone())
            .collect();
        if all.is_empty() {
            return None;
        }
        Some(all[self.rng.random_range(0..all.len())].clone())
    }

    /// Whether some other live datanode holds a good copy of `id`.
    fn good_elsewhere(&self, id: BlockId, not: &str) -> bool {
        let Some(committed) = self.committed(id) else {
            return false;
        };
        self.dns.iter().any(|(n, d)| {
            n != not && d.alive && !d.bad.contains(&id) && d.replicas.get(&id) == Some(&committed)
        })
    }

    fn committed(&self, id: BlockId) -> Option<Replica> {
        self.state
            .lock()
            .unwrap()
            .blocks
            .get(&id)
            .and_then(|e| e.committed)
    }

    /// Replicas of `id` that are faulty (on a dead node, or gone bad), counting `extra`'s too.
    fn faulty(&self, id: BlockId, extra: Option<&str>) -> usize {
        self.dns
            .iter()
            .filter(|(n, d)| {
                d.replicas.contains_key(&id)
                    && (!d.alive || d.bad.contains(&id) || extra == Some(n.as_str()))
            })
            .count()
    }

    fn target(&self, id: BlockId) -> usize {
        self.state
            .lock()
            .unwrap()
            .blocks
            .get(&id)
            .map_or(0, |e| usize::from(e.replication))
    }

    /// The promise covers fewer faults than a block's replication: a fault on `node` is allowed
    /// only if every block keeps a good replica elsewhere and its faulty replicas stay below its
    /// target.
    fn may_lose(&self, node: &str) -> bool {
        self.files.values().flatten().all(|b| {
            self.good_elsewhere(b.id, node) && self.faulty(b.id, Some(node)) < self.target(b.id)
        })
    }

    // ----- datanodes -----

    fn heartbeats(&mut self) {
        let names: Vec<String> = self.dns.keys().cloned().collect();
        for name in names {
            let now = self.now();
            let (alive, registered) = {
                let d = &self.dns[&name];
                (d.alive, d.registered)
            };
            if !alive {
                continue;
            }
            if !registered {
                let report: Vec<ReportedBlock> = self.dns[&name]
                    .replicas
                    .iter()
                    .map(|(id, r)| ReportedBlock {
                        id: *id,
                        len: r.0,
                        cv: r.1,
                    })
                    .collect();
                let delete = {
                    let mut st = self.state.lock().unwrap();
                    let delete = st.register(&name, format!("{name}:1"), space(), &report, now);
                    st.end_report(&name);
                    delete
                };
                let dn = self.dns.get_mut(&name).unwrap();
                dn.received.clear();
                dn.deleted.clear();
                dn.reported = report.iter().map(|b| (b.id, (b.len, b.cv))).collect();
                dn.registered = true;
                self.execute_deletes(&name, delete);
                continue;
            }
            let (received, deleted) = {
                let dn = self.dns.get_mut(&name).unwrap();
                (
                    std::mem::take(&mut dn.received),
                    std::mem::take(&mut dn.deleted),
                )
            };
            let reply =
                self.state
                    .lock()
                    .unwrap()
                    .heartbeat(&name, space(), &received, &deleted, now);
            {
                let dn = self.dns.get_mut(&name).unwrap();
                for b in &deleted {
                    dn.reported.remove(b);
                }
                for b in &received {
                    dn.reported.insert(b.id, (b.len, b.cv));
                }
            }
            // Now and then the reply is lost on the way (the namenode acted on the request).
            if self.rng.random_bool(0.05) {
                self.trace(format!("{name}: heartbeat reply lost"));
                continue;
            }
            match reply {
                None => self.dns.get_mut(&name).unwrap().registered = false,
                Some((delete, copy)) => {
                    self.execute_deletes(&name, delete);
                    for c in copy {
                        match c.targets.first() {
                            Some(t) => self.execute_copy(&name, c.block, &t.name.clone()),
                            None => self.execute_verify(&name, c.block),
                        }
                    }
                }
            }
        }
    }

    fn execute_deletes(&mut self, name: &str, delete: Vec<ReportedBlock>) {
        for d in delete {
            self.trace(format!("{name} told to delete {} ", d.id));
            let dn = self.dns.get_mut(name).unwrap();
            match dn.replicas.get(&d.id).copied() {
                Some(r) if r == (d.len, d.cv) => dn.remove(d.id),
                // Answered with what it holds instead once verified (or a corrupt report), or as
                // deleted when it holds nothing.
                Some(_) if dn.bad.contains(&d.id) => {
                    self.state.lock().unwrap().bad_replica(d.id, name);
                }
                Some(r) => {
                    dn.received.retain(|b| b.id != d.id);
                    dn.received.push(ReportedBlock {
                        id: d.id,
                        len: r.0,
                        cv: r.1,
                    });
                }
                None => {
                    if !dn.deleted.contains(&d.id) {
                        dn.deleted.push(d.id);
                    }
                }
            }
        }
    }

    /// No good replica of a live, complete block is deleted below its target: checked when the
    /// namenode decides (a holder may die before the delete arrives, which loses nothing).
    fn check_delete(&self, st: &State, name: &str, d: &ReportedBlock) -> Result<(), String> {
        let Some(e) = st.blocks.get(&d.id) else {
            return Ok(());
        };
        let dn = &self.dns[name];
        let good = e.committed == Some((d.len, d.cv)) && !dn.bad.contains(&d.id);
        if !good || !e.complete {
            return Ok(());
        }
        let now = self.now();
        let live_good = e
            .locations
            .iter()
            .filter(|n| *n != name)
            .filter(|n| {
                st.datanodes
                    .get(*n)
                    .is_some_and(|x| st.node_state(x, now) != NodeState::Dead)
            })
            .count();
        if live_good < usize::from(e.replication) {
            return Err(format!(
                "good replica of block {} on {name} deleted, leaving {live_good} of target {}",
                d.id, e.replication
            ));
        }
        Ok(())
    }

    /// A verification: a good replica is reported again, a bad one reported corrupt.
    fn execute_verify(&mut self, name: &str, block: BlockId) {
        let dn = self.dns.get_mut(name).unwrap();
        let Some(r) = dn.replicas.get(&block).copied() else {
            return;
        };
        if dn.bad.contains(&block) {
            self.trace(format!("verify {block} on {name}: bad"));
            self.state.lock().unwrap().bad_replica(block, name);
        } else {
            dn.store(block, r);
        }
    }

    fn execute_copy(&mut self, source: &str, block: BlockId, target: &str) {
        let committed = self.committed(block);
        let reported = self.dns[source].reported.get(&block).copied();
        let known_corrupt = self
            .state
            .lock()
            .unwrap()
            .corrupt
            .contains(&(block, source.to_string()));
        if committed.is_none() || reported != committed || known_corrupt {
            self.fail(format!(
                "copy of block {block} ordered from {source}, whose replica is stale or corrupt \
                 (reported {reported:?}, committed {committed:?}, known corrupt {known_corrupt})"
            ));
        }
        let src = &self.dns[source];
        let Some(r) = src.replicas.get(&block).copied() else {
            return; // gone since its last report: the copy fails
        };
        if src.bad.contains(&block) {
            // A real copy reads verified pieces: it fails, and the source reports the replica.
            self.state.lock().unwrap().bad_replica(block, source);
            return;
        }
        self.trace(format!("copy {block} {source} -> {target}"));
        let t = self.dns.get_mut(target).unwrap();
        if t.alive {
            t.store(block, r);
        }
    }

    // ----- faults -----

    fn kill_datanode(&mut self) {
        let Some(name) = self.pick_dn(true) else {
            return;
        };
        if self.may_lose(&name) {
            self.trace(format!("kill {name}"));
            let dn = self.dns.get_mut(&name).unwrap();
            dn.alive = false;
            dn.registered = false;
        }
    }

    fn return_datanode(&mut self) {
        if let Some(name) = self.pick_dn(false) {
            let wipe = self.rng.random_bool(0.2);
            self.trace(format!("return {name} wipe={wipe}"));
            let dn = self.dns.get_mut(&name).unwrap();
            dn.alive = true;
            dn.registered = false;
            if wipe {
                // A replaced disk: it comes back empty.
                dn.replicas.clear();
                dn.bad.clear();
            }
        }
    }

    /// A random replica of a random live datanode.
    fn pick_replica(&mut self) -> Option<(String, BlockId)> {
        let name = self.pick_dn(true)?;
        let ids: Vec<BlockId> = self.dns[&name].replicas.keys().copied().collect();
        if ids.is_empty() {
            return None;
        }
        let id = ids[self.rng.random_range(0..ids.len())];
        Some((name, id))
    }

    fn bad_replica(&mut self) {
        let Some((name, id)) = self.pick_replica() else {
            return;
        };
        if !self.good_elsewhere(id, &name) || self.faulty(id, Some(&name)) >= self.target(id) {
            return;
        }
        self.trace(format!("bad replica {id} on {name}"));
        self.dns.get_mut(&name).unwrap().bad.insert(id);
        if self.rng.random_bool(0.5) {
            // The block scanner finds it.
            self.state.lock().unwrap().bad_replica(id, &name);
        }
    }

    /// A client reports a replica bad, good or not (as a hostile client would). Its word alone
    /// removes nothing: the block's replicas are where they were, and the holder is asked to
    /// verify (a bad replica is then reported by its datanode, through `execute_verify`).
    fn client_reports_bad_replica(&mut self) {
        let Some((name, id)) = self.pick_replica() else {
            return;
        };
        self.trace(format!("a client reports {id} on {name} bad"));
        let now = self.now();
        let mut state = self.state.lock().unwrap();
        let before = state.blocks.get(&id).map(|e| e.locations.clone());
        state.suspect_replica(id, &name, now);
        let after = state.blocks.get(&id).map(|e| e.locations.clone());
        assert_eq!(
            before, after,
            "a client's report of {id} on {name} changed its replicas"
        );
    }

    /// A datanode restarts holding a replica under a live block's id with other bytes (an old
    /// replica from before, or one rewritten behind the namenode's back).
    fn stale_replica(&mut self) {
        let Some(name) = self.pick_dn(true) else {
            return;
        };
        let blocks: Vec<BlockId> = self.files.values().flatten().map(|b| b.id).collect();
        if blocks.is_empty() {
            return;
        }
        let id = blocks[self.rng.random_range(0..blocks.len())];
        if !self.good_elsewhere(id, &name) || self.faulty(id, Some(&name)) >= self.target(id) {
            return;
        }
        let stale = (
            self.rng.random_range(1..=BLOCK),
            Blake3Cv(self.rng.random()),
        );
        self.trace(format!("stale replica {id} on {name}"));
        let dn = self.dns.get_mut(&name).unwrap();
        dn.replicas.insert(id, stale);
        dn.bad.remove(&id);
        dn.registered = false;
    }

    /// A replica vanishes from a live datanode without a word (a file removed behind its back),
    /// and the node's next periodic full report leaves it out.
    fn silent_loss(&mut self) {
        let Some(name) = self.pick_dn(true) else {
            return;
        };
        let held: Vec<BlockId> = self.dns[&name].replicas.keys().copied().collect();
        if held.is_empty() {
            return;
        }
        let id = held[self.rng.random_range(0..held.len())];
        if !self.good_elsewhere(id, &name) || self.faulty(id, Some(&name)) >= self.target(id) {
            return;
        }
        self.trace(format!(
            "replica {id} vanishes from {name}; a full report follows"
        ));
        let dn = self.dns.get_mut(&name).unwrap();
        dn.replicas.remove(&id);
        dn.bad.remove(&id);
        dn.registered = false;
    }

    fn restart_namenode(&mut self) {
        self.trace("namenode restart".into());
        let (w, s) = Self::start_namenode(&self.journal, self.now());
        self.writer = w;
        self.state = s;
        for dn in self.dns.values_mut() {
            dn.registered = false;
        }
    }

    fn tick(&mut self) {
        self.clock += TICK;
        self.heartbeats();
        let now = self.now();
        let problem = {
            let mut st = self.state.lock().unwrap();
            let before: BTreeMap<String, usize> = st
                .datanodes
                .iter()
                .map(|(n, d)| (n.clone(), d.pending_delete.len()))
                .collect();
            let due = st.repair_tick(now);
            st.plan_blocks(&due, now);
            st.datanodes
                .iter()
                .flat_map(|(n, d)| {
                    let from = before
                        .get(n)
                        .copied()
                        .unwrap_or(0)
                        .min(d.pending_delete.len());
                    d.pending_delete[from..]
                        .iter()
                        .map(move |r| (n.clone(), *r))
                })
                .find_map(|(n, r)| self.check_delete(&st, &n, &r).err())
        };
        if let Some(p) = problem {
            self.fail(p);
        }
        let expired = self.state.lock().unwrap().take_expired_leases(now);
        for (session, inode) in expired {
            let _ = self.submit(Mutation::Expire { inode, session });
        }
    }

    // ----- invariants -----

    fn check(&self) {
        let st = self.state.lock().unwrap();
        for (id, e) in &st.blocks {
            if let Some(committed) = e.committed {
                for l in &e.locations {
                    let reported = self.dns[l].reported.get(id).copied();
                    if reported != Some(committed) {
                        let msg = format!(
                            "block {id} counted on {l}, which reported {reported:?}, not {committed:?}"
                        );
                        drop(st);
                        self.fail(msg);
                    }
                }
            } else if !e.locations.is_empty() {
                let msg = format!("uncommitted block {id} has counted replicas");
                drop(st);
                self.fail(msg);
            }
        }
        for c in &st.copies {
            let bad = match st.blocks.get(&c.block) {
                None => Some("an unknown block"),
                Some(e) if !e.complete => Some("an incomplete block"),
                Some(e) if e.locations.contains(&c.target) => Some("a target that holds it"),
                _ => None,
            };
            if let Some(why) = bad {
                let msg = format!(
                    "pending copy of block {} to {} is of {why}",
                    c.block, c.target
                );
                drop(st);
                self.fail(msg);
            }
        }
    }

    /// Every datanode back, time for the repairs; then exactly the target on good nodes and no
    /// orphans. Then one machine is lost for good and every file gets a new target below the
    /// machines left (excess replicas go while a dead holder is still listed), and the same must
    /// hold on the live ones.
    fn heal_and_check(&mut self) {
        for dn in self.dns.values_mut() {
            if !dn.alive {
                dn.alive = true;
                dn.registered = false;
            }
        }
        // Bad replicas nobody noticed are found by the scanner in the end.
        let bad: Vec<(String, BlockId)> = self
            .dns
            .iter()
            .flat_map(|(n, d)| d.bad.iter().map(move |b| (n.clone(), *b)))
            .collect();
        for _ in 0..40 {
            self.tick();
        }
        for (n, b) in bad {
            let before = self
                .state
                .lock()
                .unwrap()
                .blocks
                .get(&b)
                .map(|e| e.locations.clone());
            self.state.lock().unwrap().bad_replica(b, &n);
            self.trace(format!(
                "heal: {n} reports {b} corrupt (counted on {before:?})"
            ));
        }
        self.wait_converged("heal");
        let Some(lost) = self.pick_dn(true) else {
            return;
        };
        if !self.may_lose(&lost) {
            return;
        }
        self.trace(format!("heal: {lost} is lost for good"));
        self.dns.get_mut(&lost).unwrap().alive = false;
        // Replication is lowered once the namenode counts the machine dead. Before that it cannot
        // know the machine is gone (as in HDFS, a replica on a node that died a moment ago may be
        // the one kept), so a file lowered to one replica could keep only that one.
        while {
            let st = self.state.lock().unwrap();
            let now = self.now();
            st.datanodes
                .get(&lost)
                .is_some_and(|d| st.node_state(d, now) != NodeState::Dead)
        } {
            self.tick();
        }
        let paths: Vec<String> = self.files.keys().cloned().collect();
        for path in paths {
            let r = self.rng.random_range(1..=DATANODES as u8 - 1);
            self.trace(format!("heal: setrep {r} {path}"));
            let _ = self.submit(Mutation::SetReplication {
                caller: Caller::superuser(),
                path,
                replication: r,
            });
        }
        self.wait_converged("heal without a lost machine");
    }

    /// Ticks until `converged`, long enough for lost copy commands (5% of replies are lost) to time
    /// out and be planned again, a few times over; fails the run if it never does.
    fn wait_converged(&mut self, phase: &str) {
        let ticks =
            (lode_namenode::state::COPY_TIMEOUT.as_millis() * 6 / TICK.as_millis()) as usize;
        for i in 0..ticks {
            self.tick();
            self.check();
            if i % 8 == 0 && self.converged().is_none() {
                return;
            }
        }
        let why = self.converged().unwrap_or_default();
        if std::env::var_os("SIM_TRACE").is_some() {
            let st = self.state.lock().unwrap();
            eprintln!(
                "copies: {:?}\nverifying: {:?}\ncorrupt: {:?}",
                st.copies, st.verifying, st.corrupt
            );
            for (n, d) in &st.datanodes {
                eprintln!(
                    "{n}: state {:?} pending_copy {:?} pending_delete {} sent {:?}",
                    st.node_state(d, self.now()),
                    d.pending_copy,
                    d.pending_delete.len(),
                    d.sent_deletes.keys().collect::<Vec<_>>()
                );
            }
        }
        self.fail(format!("{phase}: did not converge: {why}"));
    }

    /// Why the cluster has not converged: every block of every complete file counted on exactly
    /// its target of live nodes that hold its bytes, and no live node keeping a replica nobody
    /// counts. A dead node's replicas stay listed (it may come back) and are left out.
    fn converged(&self) -> Option<String> {
        let st = self.state.lock().unwrap();
        if st.safemode != lode_namenode::state::SafeMode::Off {
            return Some("still in safe mode".into());
        }
        let mut counted: BTreeSet<(String, BlockId)> = BTreeSet::new();
        for (path, blocks) in &self.files {
            for b in blocks {
                let Some(e) = st.blocks.get(&b.id) else {
                    return Some(format!("{path}: block {} unknown", b.id));
                };
                let live: Vec<&String> =
                    e.locations.iter().filter(|l| self.dns[*l].alive).collect();
                if live.len() != usize::from(e.replication) {
                    return Some(format!(
                        "{path}: block {} on {} live nodes, target {}",
                        b.id,
                        live.len(),
                        e.replication
                    ));
                }
                for l in live {
                    let d = &self.dns[l];
                    if d.replicas.get(&b.id) != Some(&(b.len, b.cv)) || d.bad.contains(&b.id) {
                        return Some(format!(
                            "{path}: block {} counted on {l} without its bytes",
                            b.id
                        ));
                    }
                    counted.insert((l.clone(), b.id));
                }
            }
        }
        for (n, d) in self.dns.iter().filter(|(_, d)| d.alive) {
            for id in d.replicas.keys() {
                let in_flight = st.blocks.get(id).is_some_and(|e| !e.complete);
                if !counted.contains(&(n.clone(), *id)) && !in_flight {
                    return Some(format!("orphan replica of block {id} on {n}"));
                }
            }
        }
        None
    }

    fn step(&mut self) {
        self.steps += 1;
        let roll = self.rng.random_range(0..100);
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!("step {} roll {roll} t={:?}", self.steps, self.clock);
        }
        match roll {
            0..=29 => self.write_file(None),
            30..=34 => {
                let f = self.pick_file();
                if f.is_some() {
                    self.write_file(f)
                }
            }
            35..=44 => self.delete_file(),
            45..=49 => self.setrep(),
            50..=56 => self.kill_datanode(),
            57..=63 => self.return_datanode(),
            64..=67 => self.bad_replica(),
            68..=70 => self.stale_replica(),
            71..=73 => self.restart_namenode(),
            74..=75 => self.client_reports_bad_replica(),
            76..=78 => self.silent_loss(),
            _ => {
                for _ in 0..self.rng.random_range(1..8) {
                    self.tick();
                }
            }
        }
        self.check();
    }
}

fn run(seed: u64, steps: usize) {
    let mut sim = Sim::new(seed);
    // Register everyone first.
    sim.tick();
    for _ in 0..steps {
        sim.step();
    }
    sim.heal_and_check();
}

#[test]
fn thousands_of_seeded_runs_keep_every_invariant() {
    if let Some(seed) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        run(seed, 300);
        return;
    }
    let runs: u64 = std::env::var("SIM_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let started = Instant::now();
    for seed in 0..runs {
        run(seed, 300);
    }
    eprintln!("sim: {runs} runs of 300 steps in {:?}", started.elapsed());
}

#[test]
fn the_simulation_catches_a_namenode_that_counts_stale_replicas() {
    // The checks must be able to fail: a replica reported with another value under a committed
    // block is stale, and the state must refuse to count it.
    let mut sim = Sim::new(7);
    sim.tick();
    while sim.files.values().flatten().next().is_none() {
        sim.write_file(None);
        sim.tick();
    }
    let b = *sim.files.values().flatten().next().unwrap();
    let name = sim.dns.keys().next().unwrap().clone();
    let stale = ReportedBlock {
        id: b.id,
        len: b.len,
        cv: Blake3Cv([0xee; 32]),
    };
    let now = sim.now();
    let reply = sim
        .state
        .lock()
        .unwrap()
        .heartbeat(&name, space(), &[stale], &[], now);
    let (delete, _) = reply.unwrap();
    assert!(delete.contains(&stale), "a stale replica is deleted");
    assert!(!sim.state.lock().unwrap().blocks[&b.id]
        .locations
        .contains(&name));
}

#[test]
fn ids_survive_restarts_in_the_simulation() {
    let mut sim = Sim::new(11);
    sim.tick();
    for _ in 0..30 {
        sim.write_file(None);
        sim.delete_file();
        sim.restart_namenode();
        sim.tick();
        sim.tick();
    }
    assert!(sim.issued_blocks.len() > 10);
    // And every inode the namespace holds is one the simulation saw issued.
    let ns_inodes: Vec<InodeId> = sim
        .writer
        .ns
        .all_inodes()
        .unwrap()
        .into_iter()
        .filter(|i| matches!(i.kind, InodeKind::File { .. }))
        .map(|i| i.id)
        .collect();
    assert!(ns_inodes.iter().all(|i| sim.issued_inodes.contains(i)));
}
