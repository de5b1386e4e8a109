//! The namespace writer's journal on a namenode group: a group commit becomes one entry of the
//! group's log (or a few, if its edits are large), and the sync returns once a majority of the
//! members hold it durably and this member has applied it. Only the leader writes: before each
//! group it confirms its leadership with a majority (openraft's read index) and waits until it
//! has applied everything committed before, so it validates against the latest namespace and
//! numbers the edits after the last one applied.

use std::sync::Arc;

use lode_protocol::ErrorCode;
use openraft::error::{ClientWriteError, RaftError};

use super::{Edits, Member, NodeId, Raft};
use crate::editlog::Journal;
use crate::error::Error;
use crate::namespace::{self, MetaOp};
use crate::store::MetaStore;

/// Edits of one group are cut into entries of about this many bytes at most.
const ENTRY_BYTES: usize = 8 << 20;

/// The refusal a member that is not the leader gives, naming the leader when it knows one.
pub fn not_leader(leader: Option<(NodeId, Member)>) -> Error {
    let message = match leader {
        Some((_, m)) => format!(
            "this namenode is not the leader of its group; the leader is {} at {}",
            m.name, m.addr
        ),
        None => "this namenode is not the leader of its group and knows of no leader: an election \
                 is under way, or fewer than a majority of the members are up"
            .into(),
    };
    Error::refused(ErrorCode::NotLeader, message)
}

/// The leader as `raft` knows it now.
pub fn leader(raft: &Raft) -> Option<(NodeId, Member)> {
    let m = raft.metrics().borrow().clone();
    let id = m.current_leader?;
    let member = m.membership_config.membership().get_node(&id)?.clone();
    Some((id, member))
}

/// A [`Journal`] on the group's log.
pub struct GroupJournal<S: MetaStore> {
    raft: Raft,
    runtime: tokio::runtime::Handle,
    store: Arc<S>,
    pending: Vec<MetaOp>,
    first_seq: u64,
    commit_seconds: prometheus_client::metrics::histogram::Histogram,
}

impl<S: MetaStore> GroupJournal<S> {
    /// A journal writing through `raft` (driven on `runtime`); `store` is this member's store,
    /// which the state machine applies to. Each commit's time goes into `commit_seconds`.
    pub fn new(
        raft: Raft,
        runtime: tokio::runtime::Handle,
        store: Arc<S>,
        commit_seconds: prometheus_client::metrics::histogram::Histogram,
    ) -> GroupJournal<S> {
        GroupJournal {
            raft,
            runtime,
            store,
            pending: vec![],
            first_seq: 1,
            commit_seconds,
        }
    }

    fn propose(&self, edits: Edits) -> Result<(), Error> {
        let started = std::time::Instant::now();
        match self.runtime.block_on(self.raft.client_write(edits)) {
            Ok(_) => {
                self.commit_seconds.observe(started.elapsed().as_secs_f64());
                Ok(())
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(not_leader(f.leader_id.zip(f.leader_node)))
            }
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                Err(Error::refused(ErrorCode::Unavailable, e.to_string()))
            }
            Err(RaftError::Fatal(e)) => Err(Error::Store(format!("namenode group: {e}"))),
        }
    }
}

impl<S: MetaStore> Journal for GroupJournal<S> {
    fn append(&mut self, op: &MetaOp) -> Result<u64, Error> {
        self.pending.push(op.clone());
        Ok(self.first_seq + self.pending.len() as u64 - 1)
    }

    fn sync(&mut self) -> Result<(), Error> {
        let ops = std::mem::take(&mut self.pending);
        let mut first = self.first_seq;
        let mut chunk: Vec<MetaOp> = vec![];
        let mut bytes = 0;
        for op in ops {
            let size = postcard::experimental::serialized_size(&op).unwrap_or(0);
            if !chunk.is_empty() && bytes + size > ENTRY_BYTES {
                let n = chunk.len() as u64;
                self.propose(Edits {
                    first_seq: first,
                    ops: std::mem::take(&mut chunk),
                })?;
                first += n;
                bytes = 0;
            }
            bytes += size;
            chunk.push(op);
        }
        if !chunk.is_empty() {
            let n = chunk.len() as u64;
            self.propose(Edits {
                first_seq: first,
                ops: chunk,
            })?;
            first += n;
        }
        self.first_seq = first;
        Ok(())
    }

    fn last_seq(&self) -> u64 {
        self.first_seq + self.pending.len() as u64 - 1
    }

    fn wants_checkpoint(&self) -> bool {
        false // the group's snapshots take the place of checkpoints
    }

    fn checkpoint(&mut self, _snapshot: &[u8]) -> Result<(), Error> {
        Ok(())
    }

    fn applies(&self) -> bool {
        true
    }

    fn begin_group(&mut self) -> Result<(), Error> {
        self.runtime.block_on(super::reads::confirm(&self.raft))?;
        self.pending.clear();
        self.first_seq = namespace::read_last_applied(&*self.store)? + 1;
        Ok(())
    }

    fn discard(&mut self) {
        self.pending.clear();
    }
}
