//! Soft state, rebuilt after a restart from the namespace and datanode block reports: the datanode
//! registry, where each block's replicas are, and write leases. Nothing here is persisted.

mod blockmap;
mod leases;
mod registry;
mod safemode;

pub use blockmap::{BlockEntry, PendingCopy, COPIES_PER_SOURCE, COPY_TIMEOUT, DELETE_RESEND};
pub use leases::Lease;
pub use registry::{Datanode, NodeState};
pub use safemode::SafeMode;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use lode_protocol::messages::{
    ClusterReport, CommittedBlock, CopyCommand, DatanodeReport, FsckProblem, FsckReport,
    ReportedBlock, Space, Target,
};
use lode_protocol::{Blake3Cv, BlockId, InodeId, SessionId};

use crate::namespace::{Applied, InodeKind, Stored};
use crate::placement::Candidate;

/// How long silences and leases last.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Silence before a datanode is stale.
    pub stale_after: Duration,
    /// Silence before a datanode is dead.
    pub dead_after: Duration,
    /// Lease lifetime without renewal.
    pub lease_expiry: Duration,
}

/// Blocks one hold of the state lock covers in a pass over the whole block map (health counts,
/// repair planning) or in a block report: a pass over millions of blocks in one hold would stall
/// every heartbeat and client request behind it.
pub const SCAN_CHUNK: usize = 4096;

/// Block counts of one pass over the block map (complete blocks only).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockHealth {
    /// Complete blocks.
    pub total: u64,
    /// Without any replica on a datanode that is not dead.
    pub missing: u64,
    /// With fewer such replicas than their replication.
    pub under: u64,
}

/// Counts the health of every block, one [`SCAN_CHUNK`] per hold of `state`'s lock, yielding
/// between chunks; `None` if the lock is poisoned.
pub async fn health_pass(state: &std::sync::Mutex<State>, now: Instant) -> Option<BlockHealth> {
    let mut health = BlockHealth::default();
    let mut from = Some(BlockId(0));
    while let Some(f) = from {
        from = state.lock().ok()?.block_health(f, now, &mut health);
        tokio::task::yield_now().await;
    }
    Some(health)
}

/// All soft state, behind one mutex in the server.
#[derive(Debug)]
pub struct State {
    /// Timing settings.
    pub timing: Timing,
    /// Datanodes by name.
    pub datanodes: BTreeMap<String, Datanode>,
    /// Blocks by id.
    pub blocks: BTreeMap<BlockId, BlockEntry>,
    /// Leases by session.
    pub leases: BTreeMap<SessionId, Lease>,
    /// Replicas reported corrupt: (block, datanode).
    pub corrupt: BTreeSet<(BlockId, String)>,
    /// Stale replicas found (reported with another length or value than the committed block's).
    pub stale_replicas: u64,
    /// The largest block id any datanode reported: ids at or below it are never issued again,
    /// even by a namenode restored from a backup older than that block.
    pub max_reported_block: BlockId,
    /// Re-replication copies under way.
    pub copies: Vec<PendingCopy>,
    /// Verifications asked of replica holders before an excess delete: (block, node) -> when
    /// asked. An excess replica is deleted only once every replica that stays has proved its bytes
    /// by a verified read after it was asked: a replica gone bad unnoticed must never be the one
    /// kept while good ones are deleted.
    pub verifying: BTreeMap<(BlockId, String), Instant>,
    /// Blocks the next repair tick plans besides its sweep (see [`State::repair_tick`]).
    pub repair_due: BTreeSet<BlockId>,
    /// Whether the next repair tick plans every block.
    pub repair_full: bool,
    /// Where the repair sweep goes on.
    pub repair_sweep: BlockId,
    /// Blocks the sweep adds to each repair tick ([`SCAN_CHUNK`]; the simulation turns it off to
    /// prove that the events alone mark every block that needs planning).
    pub sweep_chunk: usize,
    /// Whether namespace changes are refused.
    pub safemode: SafeMode,
    /// Fraction of blocks that must have a reported replica before start-up safe mode lifts.
    pub safemode_threshold: f64,
    /// Blocks complete when the state was built.
    pub complete_at_start: u64,
    /// Complete blocks that have had a counted replica reported since (each once): safe mode
    /// counts exactly only once this reaches its threshold.
    pub startup_seen: u64,
    /// When an exact count last kept safe mode on.
    pub safemode_retry: Option<Instant>,
    /// Datanodes being drained (decommissioning, or decommissioned once drained).
    pub decommission: BTreeSet<String>,
    /// Recent events for the status page, oldest first.
    pub events: std::collections::VecDeque<(Instant, String)>,
    /// The namenode's own HTTP address.
    pub http_addr: Option<String>,
    /// The namenode group's members as this one last asked them (empty without a group), for
    /// the status page.
    pub namenodes: Vec<lode_protocol::messages::NamenodeReport>,
    /// A datanode with less room than this (the default block size) counts as out of space.
    pub full_below: u64,
    /// A member of a namenode group that does not lead: it keeps the soft state in step (every
    /// edit, every datanode's reports) but sends no delete or copy command, plans no repair and
    /// lets no lease expire; all of that is the leader's, and waits here until this member leads.
    pub follower: bool,
    /// Replicas a follower heard of before it applied the edit that adds their block; they join
    /// the block when the edit is applied, and are dropped when this member starts leading (the
    /// datanodes' next full reports tell the leader of them again).
    pub orphans: BTreeMap<BlockId, Vec<(String, ReportedBlock)>>,
}

/// Events kept for the status page.
const EVENTS_MAX: usize = 100;

impl State {
    /// Builds the block map and leases from the namespace.
    pub fn new(timing: Timing, stored: &Stored, now: Instant) -> State {
        let mut s = State {
            timing,
            datanodes: BTreeMap::new(),
            blocks: BTreeMap::new(),
            leases: BTreeMap::new(),
            corrupt: BTreeSet::new(),
            stale_replicas: 0,
            max_reported_block: BlockId(0),
            copies: vec![],
            verifying: BTreeMap::new(),
            repair_due: BTreeSet::new(),
            repair_full: true,
            repair_sweep: BlockId(0),
            sweep_chunk: SCAN_CHUNK,
            safemode: SafeMode::Startup,
            safemode_threshold: 0.999,
            complete_at_start: 0,
            startup_seen: 0,
            safemode_retry: None,
            decommission: BTreeSet::new(),
            events: std::collections::VecDeque::new(),
            http_addr: None,
            namenodes: vec![],
            full_below: 64 << 20,
            follower: false,
            orphans: BTreeMap::new(),
        };
        for inode in &stored.inodes {
            if let InodeKind::File {
                replication,
                writer,
                ..
            } = &inode.kind
            {
                for b in stored.blocks.get(&inode.id).into_iter().flatten() {
                    s.blocks.insert(
                        b.id,
                        BlockEntry::new(
                            inode.id,
                            *replication,
                            writer.is_none(),
                            b.cv.map(|cv| (b.len, cv)),
                        ),
                    );
                }
                if let Some(w) = writer {
                    s.leases
                        .entry(*w)
                        .or_insert_with(|| Lease {
                            renewed: now,
                            files: BTreeSet::new(),
                        })
                        .files
                        .insert(inode.id);
                }
            }
        }
        s.complete_at_start = s.blocks.values().filter(|e| e.complete).count() as u64;
        s
    }

    /// Follows a namespace that was replaced whole (a snapshot installed): blocks and leases are
    /// rebuilt from `stored`, and a block that is still there with the same committed length and
    /// value keeps the replicas counted for it. Every block is planned again on the next repair
    /// tick. Datanodes and their reports stay as they are.
    pub fn rebase(&mut self, stored: &Stored, now: Instant) {
        let fresh = State::new(self.timing, stored, now);
        let mut blocks = fresh.blocks;
        for (id, entry) in blocks.iter_mut() {
            if let Some(old) = self.blocks.remove(id) {
                if old.committed == entry.committed && old.inode == entry.inode {
                    entry.locations = old.locations;
                    entry.provisional = old.provisional;
                    entry.verified = old.verified;
                    entry.len = old.len.max(entry.len);
                    entry.seen = old.seen;
                }
            }
        }
        self.blocks = blocks;
        self.leases = fresh.leases;
        self.corrupt.retain(|(b, _)| self.blocks.contains_key(b));
        self.repair_full = true;
    }

    /// This member of a namenode group starts or stops leading. A new leader plans every block
    /// afresh and counts every lease as renewed now (the writers renewed theirs with the old
    /// leader, which this member did not see).
    pub fn set_leading(&mut self, leading: bool, now: Instant) {
        if leading && self.follower {
            self.repair_full = true;
            self.orphans.clear();
            for lease in self.leases.values_mut() {
                lease.renewed = now;
            }
        }
        self.follower = !leading;
    }

    /// Records an event for the status page.
    pub fn event(&mut self, what: String) {
        if self.events.len() >= EVENTS_MAX {
            self.events.pop_front();
        }
        self.events.push_back((Instant::now(), what));
    }

    /// Follows a namespace edit.
    pub fn on_applied(&mut self, applied: &Applied, now: Instant) {
        for block in &applied.freed {
            self.forget_block(*block);
        }
        for c in &applied.committed {
            self.commit_block(c, now);
        }
        if let Some((block, inode, replication)) = applied.added {
            self.blocks
                .insert(block, BlockEntry::new(inode, replication, false, None));
            for (name, replica) in self.orphans.remove(&block).unwrap_or_default() {
                if self.datanodes.contains_key(&name) {
                    let _ = self.add_replica(&name, replica, None);
                    if let Some(dn) = self.datanodes.get_mut(&name) {
                        dn.blocks.insert(block);
                    }
                }
            }
        }
        if let Some((session, inode)) = applied.leased {
            self.leases
                .entry(session)
                .or_insert_with(|| Lease {
                    renewed: now,
                    files: BTreeSet::new(),
                })
                .files
                .insert(inode);
        }
        for inode in &applied.released {
            self.leases.retain(|_, lease| {
                lease.files.remove(inode);
                !lease.files.is_empty()
            });
        }
        if let Some((name, on)) = &applied.decommission {
            let what = if *on {
                "decommissioning"
            } else {
                "recommissioned"
            };
            self.event(format!("{name} {what}"));
            if *on {
                self.decommission.insert(name.clone());
            } else {
                self.decommission.remove(name);
            }
        }
        for (block, replication) in &applied.replication {
            if let Some(e) = self.blocks.get_mut(block) {
                e.replication = *replication;
                self.repair_due.insert(*block);
            }
        }
        for block in &applied.completed {
            if let Some(e) = self.blocks.get_mut(block) {
                e.complete = true;
                self.repair_due.insert(*block);
            }
        }
    }

    /// Block health of the given files: (path, replication, complete, block ids).
    pub fn fsck(&self, files: &[(String, u8, bool, Vec<BlockId>)], now: Instant) -> FsckReport {
        let mut r = FsckReport {
            files: files.len() as u64,
            blocks: 0,
            under_replicated: 0,
            missing: 0,
            corrupt: 0,
            problems: vec![],
        };
        for (path, replication, complete, blocks) in files {
            for id in blocks {
                r.blocks += 1;
                if !complete {
                    continue;
                }
                let live: Vec<String> = self
                    .locations(*id, now)
                    .into_iter()
                    .map(|t| t.name)
                    .collect();
                let corrupt = self.corrupt.iter().any(|(b, _)| b == id);
                let state = if live.is_empty() && corrupt {
                    r.corrupt += 1;
                    "corrupt"
                } else if live.is_empty() {
                    r.missing += 1;
                    "missing"
                } else if live.len() < usize::from(*replication) {
                    r.under_replicated += 1;
                    "under_replicated"
                } else {
                    continue;
                };
                r.problems.push(FsckProblem {
                    path: path.clone(),
                    block: *id,
                    state: state.into(),
                    locations: live,
                });
            }
        }
        r
    }

    /// The cluster overview.
    pub fn report(&self, now: Instant) -> ClusterReport {
        self.report_with(now, &self.full_health(now))
    }

    /// The health of every block, in one go (see [`health_pass`] for a pass that lets others in).
    pub fn full_health(&self, now: Instant) -> BlockHealth {
        let mut health = BlockHealth::default();
        let mut from = Some(BlockId(0));
        while let Some(f) = from {
            from = self.block_health(f, now, &mut health);
        }
        health
    }

    /// Adds the health of up to [`SCAN_CHUNK`] blocks from `from` on to `health`; returns where
    /// the next chunk starts, or `None` once every block is counted. A pass over a large block map
    /// goes chunk by chunk, each under its own hold of the state lock, so that heartbeats, reports
    /// and clients get in between.
    pub fn block_health(
        &self,
        from: BlockId,
        now: Instant,
        health: &mut BlockHealth,
    ) -> Option<BlockId> {
        let mut chunk = self.blocks.range(from..);
        for (_, entry) in chunk.by_ref().take(SCAN_CHUNK) {
            if !entry.complete {
                continue;
            }
            health.total += 1;
            let live = entry
                .locations
                .iter()
                .filter(|n| {
                    self.datanodes
                        .get(*n)
                        .is_some_and(|dn| self.node_state(dn, now) != NodeState::Dead)
                })
                .count();
            if live == 0 {
                health.missing += 1;
            } else if live < usize::from(entry.replication) {
                health.under += 1;
            }
        }
        chunk.next().map(|(id, _)| *id)
    }

    /// The cluster report, with the block counts of a pass of [`State::block_health`].
    pub fn report_with(&self, now: Instant, health: &BlockHealth) -> ClusterReport {
        let (under, missing) = (health.under, health.missing);
        let mut datanodes: Vec<DatanodeReport> = self
            .datanodes
            .iter()
            .map(|(name, dn)| DatanodeReport {
                name: name.clone(),
                state: match self.node_state(dn, now) {
                    NodeState::Dead => "dead".to_string(),
                    _ if self.decommission.contains(name) && self.drained(name, now) => {
                        "decommissioned".to_string()
                    }
                    _ if self.decommission.contains(name) => "decommissioning".to_string(),
                    s => s.as_str().to_string(),
                },
                addr: dn.addr.clone(),
                last_heartbeat_ms: now.saturating_duration_since(dn.last_seen).as_millis() as u64,
                blocks: dn.blocks.len() as u64,
                capacity: dn.space.capacity,
                used: dn.space.used,
                remaining: dn.space.remaining,
                failed_volumes: dn.space.failed_volumes,
                sandbox: dn.sandbox.clone(),
                sandbox_missing: dn.sandbox_missing.clone(),
                http_addr: dn.http_addr.clone(),
            })
            .collect();
        datanodes.sort_by(|a, b| a.name.cmp(&b.name));
        ClusterReport {
            http_addr: self.http_addr.clone(),
            safemode: self.safemode != SafeMode::Off,
            under_replicated: under,
            missing,
            corrupt: self.corrupt.len() as u64,
            datanodes,
            namenodes: vec![],
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! A small state to test each concern on: one file of `blocks` committed blocks.
    use super::*;
    use lode_protocol::InodeId;

    pub fn timing() -> Timing {
        Timing {
            stale_after: Duration::from_secs(3),
            dead_after: Duration::from_secs(10),
            lease_expiry: Duration::from_secs(10),
        }
    }

    pub fn space() -> Space {
        Space {
            capacity: 1 << 40,
            used: 0,
            remaining: 1 << 40,
            block_room: 1 << 40,
            failed_volumes: 0,
        }
    }

    /// The committed replica of block `i` (1-based) of the test file.
    pub fn replica(i: u64) -> ReportedBlock {
        ReportedBlock {
            id: BlockId(i),
            len: 65536,
            cv: lode_protocol::Blake3Cv([i as u8; 32]),
        }
    }

    pub fn state(blocks: u64, replication: u8, complete: bool, now: Instant) -> State {
        let inode = crate::namespace::Inode {
            id: InodeId(2),
            parent: crate::namespace::ROOT,
            name: "f".into(),
            mtime_ms: 0,
            kind: InodeKind::File {
                replication,
                block_size: 65536,
                size: blocks * 65536,
                block_count: blocks,
                writer: if complete { None } else { Some(SessionId(7)) },
                target_name: None,
            },
            perm: crate::perm::Perm::legacy(false),
        };
        let stored = Stored {
            inodes: vec![inode],
            blocks: [(
                InodeId(2),
                (1..=blocks)
                    .map(|i| crate::namespace::BlockMeta {
                        id: BlockId(i),
                        len: 65536,
                        cv: Some(replica(i).cv),
                    })
                    .collect(),
            )]
            .into(),
        };
        let mut s = State::new(timing(), &stored, now);
        s.safemode_threshold = 0.0;
        s
    }
}
