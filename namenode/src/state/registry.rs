//! The datanode registry: who is registered, liveness by silence (live, stale, dead), disk
//! figures and room promised to new blocks, registration with paged full reports, heartbeats
//! (with the answers to earlier deletes and unanswered ones sent again), and write targets.

use super::*;

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
    pub(super) fn as_str(self) -> &'static str {
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
    /// Required protections its kernel lacks (it runs no plugins then).
    pub sandbox_missing: Vec<String>,
    /// Copies it should start, sent with the next heartbeat reply.
    pub pending_copy: Vec<CopyCommand>,
    /// Its metrics address.
    pub http_addr: Option<String>,
    /// (dead or to report again, draining) as the last repair tick saw it: a change makes all of
    /// its blocks due for planning.
    pub repair_mark: Option<(bool, bool)>,
    /// While a full report of a node already known is under way: the replicas it was known to
    /// hold that the report has not named yet.
    pub reporting: Option<BTreeSet<BlockId>>,
}

impl State {
    /// Notes `bytes` promised to a new block on `name`, so placement does not hand out more room
    /// than the node has before its next heartbeat reports the real figure.
    pub fn promise(&mut self, name: &str, bytes: u64) {
        if let Some(dn) = self.datanodes.get_mut(name) {
            dn.promised = dn.promised.saturating_add(bytes);
        }
    }

    /// Events for a datanode running out of room (less than `full_below` left), getting room back,
    /// and losing data dirs.
    pub(super) fn space_events(&mut self, name: &str, before: Option<Space>, now: Space) {
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

    /// A datanode joins with a full block report (`report` is its first page, or a part of it:
    /// the server counts pages with `report_more`, a chunk at a time); returns replicas it should
    /// delete.
    ///
    /// A node that registers again while registered and alive (its periodic full report, or a
    /// quick restart) keeps what it was known to hold (its queued commands go, as for any
    /// registration): the report is compared with it, and the replicas it leaves out are
    /// forgotten at [`State::end_report`]. So a full report never
    /// makes a block look under-replicated while its pages arrive. Any other node starts afresh.
    pub fn register(
        &mut self,
        name: &str,
        addr: String,
        space: Space,
        report: &[ReportedBlock],
        now: Instant,
    ) -> Vec<ReportedBlock> {
        let before = self.datanodes.get(name).map(|dn| dn.space);
        let alive = self
            .datanodes
            .get(name)
            .is_some_and(|dn| !dn.needs_report && self.node_state(dn, now) != NodeState::Dead);
        match self.datanodes.get_mut(name) {
            Some(dn) if alive => {
                dn.addr = addr;
                dn.space = space;
                dn.promised = 0;
                dn.last_seen = now;
                dn.reporting = Some(dn.blocks.clone());
                // The report says what the node holds now: commands decided before it are
                // dropped, as for a node that starts afresh, and decided again from it.
                dn.pending_delete.clear();
                dn.sent_deletes.clear();
                dn.pending_copy.clear();
            }
            _ => {
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
                        sandbox_missing: vec![],
                        pending_copy: vec![],
                        http_addr: None,
                        repair_mark: None,
                        reporting: None,
                    },
                );
            }
        }
        let delete = self.count_report(name, report);
        self.event(format!("{name} registered"));
        self.space_events(name, before, space);
        self.check_safemode(now);
        delete
    }

    /// A further page (or part of one) of the full block report a `register` opened; returns
    /// replicas to delete. A node that is not registered (the namenode restarted between pages)
    /// is ignored: its next heartbeat makes it register again.
    pub fn report_more(
        &mut self,
        name: &str,
        report: &[ReportedBlock],
        now: Instant,
    ) -> Vec<ReportedBlock> {
        if !self.datanodes.contains_key(name) {
            return vec![];
        }
        let delete = self.count_report(name, report);
        self.check_safemode(now);
        delete
    }

    /// The last page of a full report is counted: the replicas the node was known to hold and
    /// did not report are forgotten (lost or deleted behind the namenode's back); their blocks
    /// are due for repair planning.
    pub fn end_report(&mut self, name: &str) {
        let Some(left) = self
            .datanodes
            .get_mut(name)
            .and_then(|dn| dn.reporting.take())
        else {
            return;
        };
        if !left.is_empty() {
            tracing::warn!(
                datanode = name,
                replicas = left.len(),
                "a full report leaves out replicas the node was known to hold; forgetting them"
            );
            self.event(format!(
                "{name}'s full report leaves out {} replicas it held",
                left.len()
            ));
        }
        for b in left {
            if let Some(dn) = self.datanodes.get_mut(name) {
                dn.blocks.remove(&b);
            }
            self.drop_location(name, b);
        }
    }

    /// Counts a report's replicas for `name`; returns those to delete.
    fn count_report(&mut self, name: &str, report: &[ReportedBlock]) -> Vec<ReportedBlock> {
        if let Some(left) = self
            .datanodes
            .get_mut(name)
            .and_then(|dn| dn.reporting.as_mut())
        {
            for b in report {
                left.remove(&b.id);
            }
        }
        report
            .iter()
            .filter_map(|b| self.add_replica(name, *b, None))
            .collect()
    }

    /// A replica a datanode signed for in a writer's pipeline acknowledgement (a checked
    /// [`lode_protocol::token::Receipt`]): counted as that node's report of it, but only for a
    /// block still being written and a node in service. Once a block is committed, its replicas
    /// are heard of from the datanodes alone, so a receipt cannot bring back a replica deleted
    /// after the write (a replica lost with a failed data dir during the write stays counted
    /// until the node's next full report, as if its heartbeats had come in the other order).
    /// Returns whether it counted.
    pub fn receipt(&mut self, name: &str, replica: ReportedBlock, now: Instant) -> bool {
        let in_service = self
            .datanodes
            .get(name)
            .is_some_and(|dn| !dn.needs_report && self.node_state(dn, now) != NodeState::Dead);
        in_service
            && self.being_written(replica.id)
            && self.add_replica(name, replica, Some(now)).is_none()
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
        let unanswered: Vec<ReportedBlock> = dn
            .sent_deletes
            .values()
            .filter(|(_, sent)| now.saturating_duration_since(*sent) >= DELETE_RESEND)
            .map(|(r, _)| *r)
            .collect();
        // Deletes never answered go out again, unless the block has since fallen short of its
        // target: then the replica may be what it needs, and the node is asked to report it
        // again (a verification) instead.
        for r in unanswered {
            let wanted = self.blocks.get(&r.id).is_some_and(|e| {
                e.committed == Some((r.len, r.cv)) && e.locations.len() < usize::from(e.replication)
            });
            let Some(dn) = self.datanodes.get_mut(name) else {
                break;
            };
            dn.sent_deletes.remove(&r.id);
            if wanted {
                dn.pending_copy.push(CopyCommand {
                    block: r.id,
                    targets: vec![],
                    token: None,
                });
                // Still unanswered until the node reports the replica (or it is found bad).
                dn.sent_deletes.insert(r.id, (r, now));
            } else if !dn.pending_delete.iter().any(|p| p.id == r.id) {
                dn.pending_delete.push(r);
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
        if self.follower {
            // Commands are the leader's: they wait here until this member leads.
            if let Some(dn) = self.datanodes.get_mut(name) {
                for r in delete {
                    if !dn.pending_delete.iter().any(|p| p.id == r.id) {
                        dn.pending_delete.push(r);
                    }
                }
            }
            self.space_events(name, Some(before), space);
            return Some((vec![], vec![]));
        }
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
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    #[test]
    fn a_full_report_of_a_live_node_forgets_only_what_it_left_out_after_its_last_page() {
        let t0 = Instant::now();
        let mut s = state(3, 2, true, t0);
        s.safemode_threshold = 0.0;
        let all = [replica(1), replica(2), replica(3)];
        s.register("dn-1", "a:1".into(), space(), &all, t0);
        s.end_report("dn-1");
        s.register("dn-2", "a:2".into(), space(), &all, t0);
        s.end_report("dn-2");
        // dn-1 reports again, in two pages, without block 2 (lost behind the namenode's back).
        s.repair_due.clear();
        s.register("dn-1", "a:1".into(), space(), &[replica(1)], t0);
        let counted = |s: &State| -> Vec<usize> {
            (1..=3)
                .map(|i| s.blocks[&BlockId(i)].locations.len())
                .collect()
        };
        assert_eq!(counted(&s), [2, 2, 2], "nothing is forgotten between pages");
        assert!(s.repair_due.is_empty());
        s.report_more("dn-1", &[replica(3)], t0);
        assert_eq!(counted(&s), [2, 2, 2]);
        s.end_report("dn-1");
        assert_eq!(counted(&s), [2, 1, 2], "the replica left out is forgotten");
        assert!(!s.datanodes["dn-1"].blocks.contains(&BlockId(2)));
        assert_eq!(
            s.repair_due.iter().copied().collect::<Vec<_>>(),
            [BlockId(2)]
        );
        // A node that was dead starts afresh: its old replicas no longer count at all.
        let late = t0 + timing().dead_after;
        s.register("dn-2", "a:2".into(), space(), &[replica(1)], late);
        assert_eq!(counted(&s), [2, 0, 1]);
    }

    #[test]
    fn a_follower_keeps_replicas_of_blocks_it_has_not_applied_yet_and_never_calls_them_stale() {
        let t0 = Instant::now();
        let mut s = state(3, 2, true, t0);
        s.safemode_threshold = 0.0;
        s.set_leading(false, t0);
        let early = ReportedBlock {
            id: BlockId(9),
            len: 10,
            cv: Blake3Cv([9; 32]),
        };
        // The datanode reports block 9 before this member applied the edit that adds it.
        let delete = s.register("dn-1", "a:1".into(), space(), &[replica(1), early], t0);
        s.end_report("dn-1");
        assert!(delete.is_empty(), "a follower called {delete:?} stale");
        assert!(s.datanodes["dn-1"].pending_delete.is_empty());
        let applied = crate::namespace::Applied {
            added: Some((BlockId(9), InodeId(99), 2)),
            ..Default::default()
        };
        s.on_applied(&applied, t0);
        assert!(
            s.blocks[&BlockId(9)].provisional.contains_key("dn-1"),
            "the early replica did not join its block"
        );
        assert!(s.datanodes["dn-1"].blocks.contains(&BlockId(9)));
        // A leader calls a replica of a block it does not know stale, as before.
        s.set_leading(true, t0);
        let unknown = ReportedBlock {
            id: BlockId(10),
            ..early
        };
        let delete = s.register("dn-2", "a:2".into(), space(), &[unknown], t0);
        assert_eq!(delete, vec![unknown]);
    }

    #[test]
    fn liveness_follows_silence_and_a_dead_node_must_register_again() {
        let t0 = Instant::now();
        let mut s = state(1, 1, true, t0);
        assert!(s
            .register("dn-1", "a:1".into(), space(), &[replica(1)], t0)
            .is_empty());
        let dn = &s.datanodes["dn-1"];
        assert_eq!(
            s.node_state(dn, t0 + Duration::from_secs(2)),
            NodeState::Live
        );
        assert_eq!(
            s.node_state(dn, t0 + Duration::from_secs(4)),
            NodeState::Stale
        );
        assert_eq!(
            s.node_state(dn, t0 + Duration::from_secs(11)),
            NodeState::Dead
        );
        // Stale nodes take no new blocks; dead ones must send a full report again.
        assert!(s.write_candidates(t0 + Duration::from_secs(4)).is_empty());
        let late = t0 + Duration::from_secs(11);
        assert!(s.heartbeat("dn-1", space(), &[], &[], late).is_none());
        assert!(s.heartbeat("dn-1", space(), &[], &[], late).is_none());
        assert!(
            s.heartbeat("dn-9", space(), &[], &[], late).is_none(),
            "unknown node"
        );
    }

    #[test]
    fn unanswered_deletes_are_sent_again() {
        let t0 = Instant::now();
        let mut s = state(1, 1, true, t0);
        let stale = ReportedBlock {
            cv: lode_protocol::Blake3Cv([0xaa; 32]),
            ..replica(1)
        };
        let delete = s.register("dn-1", "a:1".into(), space(), &[stale], t0);
        assert_eq!(delete, vec![stale]);
        // Deletes from the block map go out with a heartbeat; one never answered comes back.
        s.forget_block(BlockId(1));
        s.delete_on("dn-1", replica(1));
        let (sent, _) = s.heartbeat("dn-1", space(), &[], &[], t0).unwrap();
        assert_eq!(sent, vec![replica(1)]);
        // Heartbeats every 5 s without an answer: the delete comes back once, after DELETE_RESEND.
        let mut resent_at = vec![];
        let mut t = t0;
        while t < t0 + DELETE_RESEND + Duration::from_secs(10) {
            t += Duration::from_secs(5);
            let (again, _) = s.heartbeat("dn-1", space(), &[], &[], t).unwrap();
            if !again.is_empty() {
                assert_eq!(again, vec![replica(1)]);
                resent_at.push(t.duration_since(t0));
            }
        }
        assert_eq!(resent_at, [DELETE_RESEND]);
        // Answered (reported deleted): never again.
        let mut after = vec![];
        for i in 1..=10 {
            let deleted = if i == 1 { vec![BlockId(1)] } else { vec![] };
            t += Duration::from_secs(5);
            after.extend(s.heartbeat("dn-1", space(), &[], &deleted, t).unwrap().0);
        }
        assert!(after.is_empty());
    }

    #[test]
    fn an_unanswered_delete_of_a_replica_now_needed_becomes_a_verification() {
        let t0 = Instant::now();
        let mut s = state(1, 1, true, t0);
        s.register("dn-1", "a:1".into(), space(), &[replica(1)], t0);
        // The namenode decided dn-1's replica goes (say as excess) and stopped counting it; the
        // command is never answered, and meanwhile the block has no counted replica left.
        s.blocks.get_mut(&BlockId(1)).unwrap().locations.clear();
        s.delete_on("dn-1", replica(1));
        let (sent, _) = s.heartbeat("dn-1", space(), &[], &[], t0).unwrap();
        assert_eq!(sent, vec![replica(1)]);
        let mut t = t0;
        let mut verifies = 0;
        while t < t0 + DELETE_RESEND + Duration::from_secs(10) {
            t += Duration::from_secs(5);
            let (delete, copy) = s.heartbeat("dn-1", space(), &[], &[], t).unwrap();
            assert!(
                delete.is_empty(),
                "the replica the block needs is not deleted again"
            );
            verifies += copy.iter().filter(|c| c.targets.is_empty()).count();
        }
        assert_eq!(verifies, 1);
        // The node reports it again: it counts.
        s.heartbeat("dn-1", space(), &[replica(1)], &[], t).unwrap();
        assert!(s.blocks[&BlockId(1)].locations.contains("dn-1"));
    }
}
