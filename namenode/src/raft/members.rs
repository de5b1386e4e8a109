//! Changes of the group's membership (`lode admin namenode add|remove`), made on the leader with
//! openraft's joint consensus. A new member joins as a learner; it becomes a voter only once it
//! holds everything the leader had when it was added (by snapshot if the log it needs is
//! compacted away), so adding a machine never weakens the quorum while it catches up.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use lode_protocol::ErrorCode;
use openraft::error::{ClientWriteError, RaftError};
use openraft::ChangeMembers;

use super::{Member, NodeId, Raft};
use crate::error::Error;

/// A learner whose copy of the log does not advance for this long is not waited for any more.
const STALL: Duration = Duration::from_secs(30);

fn refused(message: String) -> Error {
    Error::refused(ErrorCode::InvalidArgument, message)
}

fn failed(e: RaftError<NodeId, ClientWriteError<NodeId, Member>>) -> Error {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            super::journal::not_leader(f.leader_id.zip(f.leader_node))
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => refused(format!(
            "the namenode group's membership cannot change: {e}"
        )),
        RaftError::Fatal(e) => Error::Store(format!("namenode group: {e}")),
    }
}

/// Adds `member` as member `id`: a learner first, a voter once it has caught up.
pub async fn add(raft: &Raft, id: NodeId, member: Member) -> Result<(), Error> {
    lode_protocol::perm::validate_name("namenode", &member.name).map_err(refused)?;
    if member.addr.trim().is_empty() {
        return Err(refused("give the new namenode's host:port".into()));
    }
    let metrics = raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership().clone();
    let shown = member.to_string();
    match membership.get_node(&id) {
        // A learner added before that had not caught up then: wait for it again.
        Some(other) if *other == member && !membership.voter_ids().any(|v| v == id) => {}
        Some(other) => {
            return Err(refused(format!(
                "member {id} of the namenode group is {other} already"
            )))
        }
        None => {
            if let Some((other, _)) = membership.nodes().find(|(_, m)| m.name == member.name) {
                return Err(refused(format!(
                    "{} is member {other} of the namenode group already",
                    member.name
                )));
            }
            raft.add_learner(id, member, false).await.map_err(failed)?;
            tracing::info!(id, member = %shown, "namenode added as a learner");
        }
    }
    // Everything the leader holds now, the membership that adds the learner included.
    let index = raft.metrics().borrow().last_log_index.unwrap_or(0);
    caught_up(raft, id, index, &shown).await?;
    let voters: BTreeSet<NodeId> = [id].into();
    raft.change_membership(ChangeMembers::AddVoterIds(voters), false)
        .await
        .map_err(failed)?;
    tracing::info!(id, member = %shown, "namenode is a voting member");
    Ok(())
}

/// Waits until the leader has replicated to learner `id` up to `index`, for as long as its copy
/// keeps advancing.
async fn caught_up(raft: &Raft, id: NodeId, index: u64, shown: &str) -> Result<(), Error> {
    let mut rx = raft.metrics();
    let mut best = None;
    let mut moved = Instant::now();
    loop {
        let matched = {
            let m = rx.borrow_and_update();
            if m.current_leader != Some(m.id) {
                return Err(super::journal::not_leader(super::journal::leader(raft)));
            }
            m.replication
                .as_ref()
                .and_then(|r| r.get(&id).cloned().flatten())
                .map(|l| l.index)
        };
        if matched.is_some_and(|i| i >= index) {
            return Ok(());
        }
        if matched > best {
            best = matched;
            moved = Instant::now();
        }
        let left = STALL.saturating_sub(moved.elapsed());
        if left.is_zero() || matches!(tokio::time::timeout(left, rx.changed()).await, Ok(Err(_))) {
            return Err(Error::refused(
                ErrorCode::Unavailable,
                format!(
                    "{shown} is a learner of the namenode group but has not caught up \
                     (it holds the log to {best:?} of {index}); is it running with `join = true`? \
                     it becomes a voter with `lode admin namenode add` again, or goes with `remove`"
                ),
            ));
        }
    }
}

/// Removes the member named `name` (a voter or a learner).
pub async fn remove(raft: &Raft, name: &str) -> Result<(), Error> {
    let metrics = raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership().clone();
    let Some(id) = membership
        .nodes()
        .find(|(_, m)| m.name == name)
        .map(|(id, _)| *id)
    else {
        return Err(Error::refused(
            ErrorCode::NotFound,
            format!("{name}: no such member of the namenode group"),
        ));
    };
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let change = if voters.contains(&id) {
        if voters.len() == 1 {
            return Err(refused(format!(
                "{name} is the namenode group's only voter; add another first"
            )));
        }
        ChangeMembers::RemoveVoters([id].into())
    } else {
        ChangeMembers::RemoveNodes([id].into())
    };
    raft.change_membership(change, false)
        .await
        .map_err(failed)?;
    tracing::info!(id, name, "namenode removed from the group");
    Ok(())
}
