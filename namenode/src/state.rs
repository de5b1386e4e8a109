//! Soft state, rebuilt after a restart from the namespace and datanode block reports: the datanode
//! registry, where each block's replicas are, and write leases. Nothing here is persisted.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use lode_protocol::messages::{
    ClusterReport, CommittedBlock, CopyCommand, DatanodeReport, FsckProblem, FsckReport,
    ReportedBlock, Space, Target,
};
use lode_protocol::{Blake3Cv, BlockId, InodeId, SessionId};

use crate::namespace::{Applied, Inode, InodeKind};
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

/// Liveness of a datanode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeState {
    /// Heartbeating.
    Live,
    /// Missed a few heartbeats: avoided for writes, read last.
    Stale,
    /// Gone: its replicas do not count.
    Dead,
}

impl NodeState {
    fn as_str(self) -> &'static str {
        match self {
            NodeState::Live => "live",
            NodeState::Stale => "stale",
            NodeState::Dead => "dead",
        }
    }
}

/// A registered datanode.
#[derive(Debug)]
pub struct Datanode {
    /// Data address.
    pub addr: String,
    /// Its disks as last reported.
    pub space: Space,
    /// Bytes of blocks placed on it since that report (its next heartbeat counts them itself).
    pub promised: u64,
    /// Last heartbeat or registration.
    pub last_seen: Instant,
    /// Replicas it reported that are counted or provisional (stale ones are not here).
    pub blocks: BTreeSet<BlockId>,
    /// Replicas it should delete (each named with its length and value), sent with the next
    /// heartbeat reply.
    pub pending_delete: Vec<ReportedBlock>,
    /// Deletes sent and not yet answered (the node reports the replica deleted, or reports what it
    /// holds instead), with when they were sent: a reply can be lost, so unanswered ones are sent
    /// again after [`DELETE_RESEND`].
    pub sent_deletes: BTreeMap<BlockId, (ReportedBlock, Instant)>,
    /// Whether it must send a full report again (it was dead).
    pub needs_report: bool,
    /// Plugin sandbox protections it reported.
    pub sandbox: Vec<String>,
    /// Copies it should start, sent with the next heartbeat reply.
    pub pending_copy: Vec<CopyCommand>,
    /// Its metrics address.
    pub http_addr: Option<String>,
}

/// A re-replication copy under way.
#[derive(Clone, Debug)]
pub struct PendingCopy {
    /// The block.
    pub block: BlockId,
    /// Sending datanode.
    pub source: String,
    /// Receiving datanode.
    pub target: String,
    /// When to give up waiting for the target's report and plan again.
    pub deadline: Instant,
}

/// Copies one datanode sends at once.
pub const COPIES_PER_SOURCE: usize = 4;
/// A delete command not answered this long is sent again (its heartbeat reply may have been lost).
pub const DELETE_RESEND: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a copy may take before it is planned again.
pub const COPY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Where a block's replicas are.
///
/// The rule for replicas (DESIGN.md, durability rules): a replica counts only when its reported
/// length and block value equal the committed block's. One that differs is stale (an old replica
/// under a reused id, or one rewritten behind the namenode's back): it is never listed, never a copy
/// source, never counted, and it is deleted. While a block is still being written it has no
/// committed value yet: replicas reported then are held as provisional (never listed or counted)
/// and judged by the same rule when the writer commits the block.
#[derive(Debug)]
pub struct BlockEntry {
    /// Owning file.
    pub inode: InodeId,
    /// Target replica count.
    pub replication: u8,
    /// Whether its file is complete.
    pub complete: bool,
    /// The committed length and value; `None` while the block is being written.
    pub committed: Option<(u64, Blake3Cv)>,
    /// Datanodes whose replica matches the committed block: the replicas that count.
    pub locations: BTreeSet<String>,
    /// Replicas reported before the block was committed, with what they hold.
    pub provisional: BTreeMap<String, ReportedBlock>,
    /// When each counted replica last proved its bytes by a verified read: written or copied
    /// (every piece is checked on the way in) or verified on request. A registration's report
    /// only claims a replica; it proves nothing.
    pub verified: BTreeMap<String, Instant>,
    /// Length of the block (committed, or the largest provisional replica).
    pub len: u64,
}

impl BlockEntry {
    /// The committed replica as a delete command names it.
    fn committed_replica(&self, id: BlockId) -> Option<ReportedBlock> {
        self.committed
            .map(|(len, cv)| ReportedBlock { id, len, cv })
    }
}

/// A client session's lease.
#[derive(Debug)]
pub struct Lease {
    /// Last renewal.
    pub renewed: Instant,
    /// Files it is writing.
    pub files: BTreeSet<InodeId>,
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
    /// Whether namespace changes are refused.
    pub safemode: SafeMode,
    /// Fraction of blocks that must have a reported replica before start-up safe mode lifts.
    pub safemode_threshold: f64,
    /// Datanodes being drained (decommissioning, or decommissioned once drained).
    pub decommission: BTreeSet<String>,
    /// Recent events for the status page, oldest first.
    pub events: std::collections::VecDeque<(Instant, String)>,
    /// The namenode's own HTTP address.
    pub http_addr: Option<String>,
    /// A datanode with less room than this (the default block size) counts as out of space.
    pub full_below: u64,
}

/// Events kept for the status page.
const EVENTS_MAX: usize = 100;

/// Safe mode: namespace changes are refused while it is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SafeMode {
    /// Writes allowed.
    Off,
    /// After a start, until enough blocks are reported; lifts by itself.
    Startup,
    /// Entered by an admin; only an admin lifts it.
    Manual,
}

impl State {
    /// Builds the block map and leases from the namespace.
    pub fn new(timing: Timing, inodes: &[Inode], now: Instant) -> State {
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
            safemode: SafeMode::Startup,
            safemode_threshold: 0.999,
            decommission: BTreeSet::new(),
            events: std::collections::VecDeque::new(),
            http_addr: None,
            full_below: 64 << 20,
        };
        for inode in inodes {
            if let InodeKind::File {
                replication,
                blocks,
                writer,
                ..
            } = &inode.kind
            {
                for b in blocks {
                    s.blocks.insert(
                        b.id,
                        BlockEntry {
                            inode: inode.id,
                            replication: *replication,
                            complete: writer.is_none(),
                            committed: b.cv.map(|cv| (b.len, cv)),
                            locations: BTreeSet::new(),
                            provisional: BTreeMap::new(),
                            verified: BTreeMap::new(),
                            len: b.len,
                        },
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
        s
    }

    /// Records an event for the status page.
    pub fn event(&mut self, what: String) {
        if self.events.len() >= EVENTS_MAX {
            self.events.pop_front();
        }
        self.events.push_back((Instant::now(), what));
    }

    /// Notes `bytes` promised to a new block on `name`, so placement does not hand out more room
    /// than the node has before its next heartbeat reports the real figure.
    pub fn promise(&mut self, name: &str, bytes: u64) {
        if let Some(dn) = self.datanodes.get_mut(name) {
            dn.promised = dn.promised.saturating_add(bytes);
        }
    }

    /// Events for a datanode running out of room (less than `full_below` left), getting room back,
    /// and losing data dirs.
    fn space_events(&mut self, name: &str, before: Option<Space>, now: Space) {
        let full = |s: &Space| s.block_room < self.full_below;
        match before {
            Some(b) if full(&b) == full(&now) => {}
            None if !full(&now) => {}
            _ if full(&now) => {
                tracing::warn!(
                    datanode = name,
                    remaining = now.remaining,
                    "datanode is out of space"
                );
                self.event(format!(
                    "{name} is out of space: room for {} bytes, new blocks go elsewhere",
                    now.block_room
                ));
            }
            _ => self.event(format!("{name} has space again")),
        }
        let failed_before = before.map_or(0, |b| b.failed_volumes);
        if now.failed_volumes > failed_before {
            tracing::error!(
                datanode = name,
                failed_volumes = now.failed_volumes,
                "datanode lost data dirs"
            );
            self.event(format!(
                "{name} has {} failed data dir(s); their replicas are being re-replicated",
                now.failed_volumes
            ));
        }
    }

    /// The liveness of a node at `now`.
    pub fn node_state(&self, dn: &Datanode, now: Instant) -> NodeState {
        let silence = now.saturating_duration_since(dn.last_seen);
        if silence >= self.timing.dead_after {
            NodeState::Dead
        } else if silence >= self.timing.stale_after {
            NodeState::Stale
        } else {
            NodeState::Live
        }
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
            self.blocks.insert(
                block,
                BlockEntry {
                    inode,
                    replication,
                    complete: false,
                    committed: None,
                    locations: BTreeSet::new(),
                    provisional: BTreeMap::new(),
                    verified: BTreeMap::new(),
                    len: 0,
                },
            );
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
            }
        }
        for block in &applied.completed {
            if let Some(e) = self.blocks.get_mut(block) {
                e.complete = true;
            }
        }
    }

    /// Queues the deletion of exactly `replica` on `name`.
    fn delete_on(&mut self, name: &str, replica: ReportedBlock) {
        if let Some(dn) = self.datanodes.get_mut(name) {
            dn.blocks.remove(&replica.id);
            dn.pending_delete.push(replica);
        }
    }

    fn forget_block(&mut self, block: BlockId) {
        if let Some(entry) = self.blocks.remove(&block) {
            if let Some(replica) = entry.committed_replica(block) {
                for name in &entry.locations {
                    self.delete_on(name, replica);
                }
            }
            for (name, replica) in entry.provisional {
                self.delete_on(&name, replica);
            }
        }
        self.corrupt.retain(|(b, _)| *b != block);
        // Copies and verifications of it still queued or under way are moot.
        self.copies.retain(|c| c.block != block);
        self.verifying.retain(|(b, _), _| *b != block);
        for dn in self.datanodes.values_mut() {
            dn.pending_copy.retain(|c| c.block != block);
        }
    }

    /// The writer committed a block's length and value: provisional replicas that hold exactly
    /// that now count; the others are stale and deleted.
    fn commit_block(&mut self, c: &CommittedBlock, now: Instant) {
        let Some(entry) = self.blocks.get_mut(&c.id) else {
            return;
        };
        entry.committed = Some((c.len, c.cv));
        entry.len = c.len;
        let provisional = std::mem::take(&mut entry.provisional);
        for (name, replica) in provisional {
            // Reported while the block was written: the write checked every piece.
            self.add_replica(&name, replica, Some(now));
        }
    }

    /// Counts a reported replica if it matches its block; returns it when it must be deleted
    /// instead (unknown block, stale, or marked corrupt on this node). `proved` is when the
    /// replica's bytes were last read and verified, for replicas just written, copied or verified.
    fn add_replica(
        &mut self,
        name: &str,
        replica: ReportedBlock,
        proved: Option<Instant>,
    ) -> Option<ReportedBlock> {
        self.max_reported_block = self.max_reported_block.max(replica.id);
        let corrupt = self.corrupt.contains(&(replica.id, name.to_string()));
        let Some(entry) = self.blocks.get_mut(&replica.id) else {
            return Some(replica);
        };
        if corrupt {
            return Some(replica);
        }
        match entry.committed {
            None => {
                entry.len = entry.len.max(replica.len);
                entry.provisional.insert(name.to_string(), replica);
            }
            Some((len, cv)) if replica.len == len && replica.cv == cv => {
                entry.locations.insert(name.to_string());
                if let Some(t) = proved {
                    entry.verified.insert(name.to_string(), t);
                }
                self.copies
                    .retain(|c| !(c.block == replica.id && c.target == name));
            }
            Some(_) => {
                entry.locations.remove(name);
                entry.verified.remove(name);
                self.stale_replicas += 1;
                self.cancel_copies_from(name, replica.id);
                tracing::warn!(block = %replica.id, datanode = name, len = replica.len,
                    "stale replica (its length or value differs from the committed block's); deleting it");
                self.event(format!(
                    "stale replica of block {} on {name} is deleted",
                    replica.id
                ));
                return Some(replica);
            }
        }
        if let Some(dn) = self.datanodes.get_mut(name) {
            dn.blocks.insert(replica.id);
        }
        None
    }

    /// Drops copies of `block` from `name` still queued or under way (its replica is no source).
    fn cancel_copies_from(&mut self, name: &str, block: BlockId) {
        self.copies
            .retain(|c| !(c.block == block && c.source == name));
        if let Some(dn) = self.datanodes.get_mut(name) {
            dn.pending_copy.retain(|c| c.block != block);
        }
    }

    /// Forgets that `name` holds a replica of `block` (it was deleted or lost).
    fn drop_location(&mut self, name: &str, block: BlockId) {
        if let Some(e) = self.blocks.get_mut(&block) {
            e.locations.remove(name);
            e.provisional.remove(name);
            e.verified.remove(name);
        }
        self.cancel_copies_from(name, block);
    }

    /// A datanode joins with a full block report; returns replicas it should delete.
    #[allow(clippy::too_many_arguments)]
    pub fn register(
        &mut self,
        name: &str,
        addr: String,
        space: Space,
        report: &[ReportedBlock],
        now: Instant,
    ) -> Vec<ReportedBlock> {
        let before = self.datanodes.get(name).map(|dn| dn.space);
        if let Some(old) = self.datanodes.remove(name) {
            for b in old.blocks {
                self.drop_location(name, b);
            }
        }
        self.datanodes.insert(
            name.to_string(),
            Datanode {
                addr,
                space,
                promised: 0,
                last_seen: now,
                blocks: BTreeSet::new(),
                pending_delete: vec![],
                sent_deletes: BTreeMap::new(),
                needs_report: false,
                sandbox: vec![],
                pending_copy: vec![],
                http_addr: None,
            },
        );
        let delete: Vec<ReportedBlock> = report
            .iter()
            .filter_map(|b| self.add_replica(name, *b, None))
            .collect();
        self.event(format!("{name} registered with {} replicas", report.len()));
        self.space_events(name, before, space);
        self.check_safemode(now);
        delete
    }

    /// A further page of the full block report a `register` opened; returns replicas to delete.
    /// A node that is not registered (the namenode restarted between pages) is ignored: its next
    /// heartbeat makes it register again.
    pub fn report_more(
        &mut self,
        name: &str,
        report: &[ReportedBlock],
        now: Instant,
    ) -> Vec<ReportedBlock> {
        if !self.datanodes.contains_key(name) {
            return vec![];
        }
        let delete = report
            .iter()
            .filter_map(|b| self.add_replica(name, *b, None))
            .collect();
        self.check_safemode(now);
        delete
    }

    /// A heartbeat; `None` means the node is unknown (or was dead) and must register again.
    #[allow(clippy::too_many_arguments)]
    pub fn heartbeat(
        &mut self,
        name: &str,
        space: Space,
        received: &[ReportedBlock],
        deleted: &[BlockId],
        now: Instant,
    ) -> Option<(Vec<ReportedBlock>, Vec<CopyCommand>)> {
        let state = self
            .datanodes
            .get(name)
            .map(|dn| self.node_state(dn, now))?;
        let dn = self.datanodes.get_mut(name)?;
        if state == NodeState::Dead || dn.needs_report {
            dn.needs_report = true;
            return None;
        }
        let before = std::mem::replace(&mut dn.space, space);
        dn.promised = 0;
        dn.last_seen = now;
        for b in deleted {
            dn.blocks.remove(b);
            dn.sent_deletes.remove(b);
        }
        for b in received {
            // The node answers a delete it could not carry out with what it holds instead.
            dn.sent_deletes.remove(&b.id);
        }
        // Deletes never answered go out again.
        let resend: Vec<BlockId> = dn
            .sent_deletes
            .iter()
            .filter(|(_, (_, sent))| now.saturating_duration_since(*sent) >= DELETE_RESEND)
            .map(|(id, _)| *id)
            .collect();
        for id in resend {
            if let Some((replica, _)) = dn.sent_deletes.remove(&id) {
                if !dn.pending_delete.iter().any(|r| r.id == id) {
                    dn.pending_delete.push(replica);
                }
            }
        }
        for b in deleted {
            self.drop_location(name, *b);
        }
        // A replica in a heartbeat was just written, copied or verified: its bytes were read and
        // checked.
        let mut delete: Vec<ReportedBlock> = received
            .iter()
            .filter_map(|b| self.add_replica(name, *b, Some(now)))
            .collect();
        let mut copy = vec![];
        if let Some(dn) = self.datanodes.get_mut(name) {
            // At most a page of deletions per reply; a full page tells the datanode to come back
            // at once for more.
            delete.append(&mut lode_protocol::paging::take_page(
                &mut dn.pending_delete,
                lode_protocol::paging::PAGE_BYTES,
            ));
            for r in &delete {
                dn.sent_deletes.insert(r.id, (*r, now));
            }
            copy.append(&mut dn.pending_copy);
        }
        self.space_events(name, Some(before), space);
        Some((delete, copy))
    }

    /// (complete blocks with at least one reported replica, complete blocks).
    pub fn reported_blocks(&self, now: Instant) -> (u64, u64) {
        let mut reported = 0;
        let mut total = 0;
        for e in self.blocks.values().filter(|e| e.complete) {
            total += 1;
            let any = e.locations.iter().any(|n| {
                self.datanodes
                    .get(n)
                    .is_some_and(|dn| self.node_state(dn, now) != NodeState::Dead)
            });
            reported += u64::from(any);
        }
        (reported, total)
    }

    /// Lifts start-up safe mode once the threshold of blocks has a reported replica.
    pub fn check_safemode(&mut self, now: Instant) {
        if self.safemode != SafeMode::Startup {
            return;
        }
        let (reported, total) = self.reported_blocks(now);
        if total == 0 || reported as f64 >= self.safemode_threshold * total as f64 {
            self.safemode = SafeMode::Off;
            tracing::info!(
                reported,
                total,
                "leaving safe mode: enough blocks are reported"
            );
            self.event(format!(
                "left safe mode: {reported} of {total} blocks reported"
            ));
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

    /// Plans re-replication and excess-replica removal for complete files (see `repair.rs`) and
    /// queues the commands for the datanodes' next heartbeats.
    pub fn plan_repairs(&mut self, now: Instant) {
        self.check_safemode(now);
        if self.safemode != SafeMode::Off {
            return;
        }
        self.copies.retain(|c| c.deadline > now);
        let live: BTreeSet<&String> = self
            .datanodes
            .iter()
            .filter(|(_, dn)| self.node_state(dn, now) != NodeState::Dead && !dn.needs_report)
            .map(|(n, _)| n)
            .collect();
        let mut pending: BTreeMap<BlockId, usize> = BTreeMap::new();
        let mut copies_out: BTreeMap<&str, usize> = BTreeMap::new();
        for c in &self.copies {
            *pending.entry(c.block).or_default() += 1;
            *copies_out.entry(c.source.as_str()).or_default() += 1;
        }
        let blocks: Vec<crate::repair::BlockView> = self
            .blocks
            .iter()
            .filter(|(_, e)| e.complete)
            .map(|(id, e)| crate::repair::BlockView {
                id: *id,
                target: usize::from(e.replication),
                holders: e
                    .locations
                    .iter()
                    .filter(|n| live.contains(n) && !self.decommission.contains(*n))
                    .cloned()
                    .collect(),
                extra_sources: e
                    .locations
                    .iter()
                    .filter(|n| live.contains(n) && self.decommission.contains(*n))
                    .cloned()
                    .collect(),
                pending: pending.get(id).copied().unwrap_or(0),
                len: e.len,
            })
            .collect();
        let nodes: Vec<crate::repair::NodeView> = self
            .datanodes
            .iter()
            .filter(|(n, dn)| live.contains(n) && self.node_state(dn, now) == NodeState::Live)
            .map(|(n, dn)| crate::repair::NodeView {
                name: n.clone(),
                remaining: dn.space.block_room.saturating_sub(dn.promised),
                copies_out: copies_out.get(n.as_str()).copied().unwrap_or(0),
                accepts: !self.decommission.contains(n),
            })
            .collect();
        let plan = crate::repair::plan(&blocks, &nodes, COPIES_PER_SOURCE);
        for (source, block, target) in plan.copies {
            let Some(t) = self.target(&target) else {
                continue;
            };
            if let Some(dn) = self.datanodes.get_mut(&source) {
                tracing::info!(%block, %source, %target, "re-replicating");
                self.events.push_back((
                    now,
                    format!("re-replicating block {block} from {source} to {target}"),
                ));
                dn.pending_copy.push(CopyCommand {
                    block,
                    targets: vec![t],
                });
                self.copies.push(PendingCopy {
                    block,
                    source,
                    target,
                    deadline: now + COPY_TIMEOUT,
                });
            }
        }
        // A verification that never came back is asked again.
        self.verifying
            .retain(|_, asked| now.saturating_duration_since(*asked) < COPY_TIMEOUT);
        let mut deleting: BTreeMap<BlockId, Vec<String>> = BTreeMap::new();
        for (holder, block) in &plan.deletes {
            deleting.entry(*block).or_default().push(holder.clone());
        }
        let proved = |s: &State, block: BlockId, n: &str| {
            let asked = s.verifying.get(&(block, n.to_string()));
            let proved = s.blocks.get(&block).and_then(|e| e.verified.get(n));
            matches!((asked, proved), (Some(a), Some(p)) if p > a)
        };
        for (block, planned) in deleting {
            let Some(e) = self.blocks.get(&block) else {
                continue;
            };
            // As many as the planner chose go, unproved replicas first (so the choice holds still
            // while the replicas that stay prove themselves), then the planner's order.
            let mut order: Vec<String> = e.locations.iter().cloned().collect();
            order.sort_by_key(|n| (proved(self, block, n), !planned.contains(n)));
            let holders: Vec<String> = order.iter().take(planned.len()).cloned().collect();
            let unproved: Vec<String> = order
                .iter()
                .skip(planned.len())
                .filter(|n| !proved(self, block, n))
                .cloned()
                .collect();
            if !unproved.is_empty() {
                // The replicas that stay must prove their bytes before others go.
                for n in unproved {
                    let key = (block, n.clone());
                    let outstanding = self
                        .verifying
                        .keys()
                        .filter(|(b, v)| *v == n && !proved(self, *b, v))
                        .count();
                    if self.verifying.contains_key(&key) || outstanding >= COPIES_PER_SOURCE {
                        continue;
                    }
                    tracing::info!(%block, datanode = %n, "verifying a replica before removing an excess one");
                    let Some(dn) = self.datanodes.get_mut(&n) else {
                        continue;
                    };
                    dn.pending_copy.push(CopyCommand {
                        block,
                        targets: vec![],
                    });
                    self.verifying.insert(key, now);
                }
                continue;
            }
            self.verifying.retain(|(b, _), _| *b != block);
            for holder in holders {
                tracing::info!(%block, datanode = %holder, "removing an excess replica");
                self.event(format!(
                    "removing an excess replica of block {block} from {holder}"
                ));
                let Some(e) = self.blocks.get_mut(&block) else {
                    continue;
                };
                e.locations.remove(&holder);
                e.verified.remove(&holder);
                if let Some(replica) = e.committed_replica(block) {
                    self.delete_on(&holder, replica);
                }
            }
        }
    }

    /// Live replica holders of a block, live before stale, dead and corrupt ones left out. The order
    /// rotates with the block id so reads of consecutive blocks spread over the holders.
    pub fn locations(&self, block: BlockId, now: Instant) -> Vec<Target> {
        let Some(entry) = self.blocks.get(&block) else {
            return vec![];
        };
        let mut live = vec![];
        let mut stale = vec![];
        let mut draining = vec![];
        for name in &entry.locations {
            let Some(dn) = self.datanodes.get(name) else {
                continue;
            };
            let t = Target {
                name: name.clone(),
                addr: dn.addr.clone(),
            };
            match self.node_state(dn, now) {
                NodeState::Dead => {}
                _ if self.decommission.contains(name) => draining.push(t),
                NodeState::Live => live.push(t),
                NodeState::Stale => stale.push(t),
            }
        }
        if !live.is_empty() {
            let k = (block.0 as usize) % live.len();
            live.rotate_left(k);
        }
        live.extend(stale);
        live.extend(draining);
        live
    }

    /// Whether every complete block with a replica on `name` has its target count of live replicas
    /// on other, non-draining datanodes.
    pub fn drained(&self, name: &str, now: Instant) -> bool {
        let Some(dn) = self.datanodes.get(name) else {
            return true;
        };
        dn.blocks.iter().all(|b| {
            self.blocks.get(b).is_none_or(|e| {
                !e.complete
                    || e.locations
                        .iter()
                        .filter(|n| *n != name && !self.decommission.contains(*n))
                        .filter(|n| {
                            self.datanodes
                                .get(*n)
                                .is_some_and(|d| self.node_state(d, now) != NodeState::Dead)
                        })
                        .count()
                        >= usize::from(e.replication)
            })
        })
    }

    /// Datanodes that may take new blocks (live only).
    pub fn write_candidates(&self, now: Instant) -> Vec<Candidate> {
        self.datanodes
            .iter()
            .filter(|(n, dn)| {
                self.node_state(dn, now) == NodeState::Live
                    && !dn.needs_report
                    && !self.decommission.contains(*n)
            })
            .map(|(name, dn)| Candidate {
                name: name.clone(),
                // A block must fit in one data dir.
                remaining: dn.space.block_room.saturating_sub(dn.promised),
            })
            .collect()
    }

    /// A datanode's address.
    pub fn target(&self, name: &str) -> Option<Target> {
        self.datanodes.get(name).map(|dn| Target {
            name: name.to_string(),
            addr: dn.addr.clone(),
        })
    }

    /// Renews a session's lease; false if it holds none.
    pub fn renew(&mut self, session: SessionId, now: Instant) -> bool {
        match self.leases.get_mut(&session) {
            Some(l) => {
                l.renewed = now;
                true
            }
            None => false,
        }
    }

    /// Removes expired leases and returns the files they held.
    pub fn take_expired_leases(&mut self, now: Instant) -> Vec<(SessionId, InodeId)> {
        let expiry = self.timing.lease_expiry;
        let expired: Vec<SessionId> = self
            .leases
            .iter()
            .filter(|(_, l)| now.saturating_duration_since(l.renewed) >= expiry)
            .map(|(s, _)| *s)
            .collect();
        let mut out = vec![];
        for s in expired {
            if let Some(l) = self.leases.remove(&s) {
                out.extend(l.files.into_iter().map(|f| (s, f)));
            }
        }
        out
    }

    /// A client found a replica failing its checksum: stop serving it, and delete it if another
    /// replica remains.
    pub fn bad_replica(&mut self, block: BlockId, name: &str) {
        if self
            .blocks
            .get(&block)
            .is_some_and(|e| e.locations.contains(name))
        {
            self.event(format!("corrupt replica of block {block} on {name}"));
        }
        let Some(entry) = self.blocks.get_mut(&block) else {
            return;
        };
        if !entry.locations.remove(name) {
            return;
        }
        entry.verified.remove(name);
        let others = !entry.locations.is_empty();
        let replica = entry.committed_replica(block);
        self.cancel_copies_from(name, block);
        self.corrupt.insert((block, name.to_string()));
        if others {
            if let Some(replica) = replica {
                self.delete_on(name, replica);
            }
            self.corrupt.remove(&(block, name.to_string()));
        }
    }

    /// The cluster overview.
    pub fn report(&self, now: Instant) -> ClusterReport {
        let mut under = 0;
        let mut missing = 0;
        for entry in self.blocks.values().filter(|e| e.complete) {
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
                missing += 1;
            } else if live < usize::from(entry.replication) {
                under += 1;
            }
        }
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
        }
    }
}
