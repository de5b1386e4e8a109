//! Each member's place in the group, as `admin report` and the status page show it. A member
//! answers for itself from its own Raft metrics ([`own`]); the member asked for a report asks
//! every other member of the membership at once ([`view`]), each within [`ASK_TIMEOUT`], and
//! calls one that does not answer in time `down`, with the figures it last gave.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lode_protocol::messages::{NamenodeReport, PeerRpc};
use lode_protocol::net::{self, Pool, RpcError};
use openraft::ServerState;

use super::{Member, NodeId, Raft};

/// How long a member waits for another's status before it calls it `down`.
pub const ASK_TIMEOUT: Duration = Duration::from_millis(1000);

/// The word a report uses for a member's Raft state.
fn role(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "down",
    }
}

/// This member's own report; `configured` names it while its log holds no membership yet.
pub fn own(raft: &Raft, configured: &[(NodeId, Member)]) -> NamenodeReport {
    let m = raft.metrics().borrow().clone();
    let member = m
        .membership_config
        .membership()
        .get_node(&m.id)
        .or_else(|| {
            configured
                .iter()
                .find(|(id, _)| *id == m.id)
                .map(|(_, c)| c)
        })
        .cloned()
        .unwrap_or_default();
    NamenodeReport {
        name: member.name,
        addr: member.addr,
        role: role(m.state).into(),
        term: m.current_term,
        last_index: m.last_log_index.unwrap_or(0),
        applied_index: m.last_applied.map_or(0, |l| l.index),
    }
}

/// What each member last answered, for the report of one that is down now.
#[derive(Default)]
pub struct LastSeen(Mutex<HashMap<NodeId, NamenodeReport>>);

impl LastSeen {
    fn put(&self, id: NodeId, r: &NamenodeReport) {
        if let Ok(mut seen) = self.0.lock() {
            seen.insert(id, r.clone());
        }
    }

    fn down(&self, id: NodeId, member: &Member) -> NamenodeReport {
        let last = self.0.lock().ok().and_then(|seen| seen.get(&id).cloned());
        let (term, last_index, applied_index) =
            last.map_or((0, 0, 0), |l| (l.term, l.last_index, l.applied_index));
        NamenodeReport {
            name: member.name.clone(),
            addr: member.addr.clone(),
            role: "down".into(),
            term,
            last_index,
            applied_index,
        }
    }
}

async fn ask(pool: &Pool, member: &Member) -> Result<NamenodeReport, String> {
    let conn = pool
        .get_member(&member.addr, &member.name)
        .await
        .map_err(|e| e.to_string())?;
    let reply = match net::call_peer(&conn, PeerRpc::Status, &[]).await {
        Ok(r) => r,
        Err(e) => {
            if !matches!(e, RpcError::Remote(_)) {
                pool.forget(&member.addr, &member.name).await;
            }
            return Err(e.to_string());
        }
    };
    postcard::from_bytes(&reply).map_err(|e| format!("status does not decode: {e}"))
}

/// Every member of the membership `raft` knows (voters and learners), in id order: this one
/// from its own metrics, the others as they answer. A member's name and address are the
/// membership's, whatever its answer says.
pub async fn view(
    raft: &Raft,
    configured: &[(NodeId, Member)],
    pool: &Arc<Pool>,
    seen: &Arc<LastSeen>,
) -> Vec<NamenodeReport> {
    let m = raft.metrics().borrow().clone();
    let mut members: Vec<(NodeId, Member)> = m
        .membership_config
        .membership()
        .nodes()
        .map(|(id, member)| (*id, member.clone()))
        .collect();
    if members.is_empty() {
        members = configured.to_vec();
    }
    let mut asks = tokio::task::JoinSet::new();
    for (i, (id, member)) in members.iter().cloned().enumerate() {
        if id == m.id {
            continue;
        }
        let (pool, seen) = (pool.clone(), seen.clone());
        asks.spawn(async move {
            let r = match tokio::time::timeout(ASK_TIMEOUT, ask(&pool, &member)).await {
                Ok(Ok(r)) => {
                    let r = NamenodeReport {
                        name: member.name.clone(),
                        addr: member.addr.clone(),
                        ..r
                    };
                    seen.put(id, &r);
                    r
                }
                Ok(Err(e)) => {
                    tracing::debug!(%member, "no status: {e}");
                    seen.down(id, &member)
                }
                Err(_) => seen.down(id, &member),
            };
            (i, r)
        });
    }
    let mut out: Vec<Option<NamenodeReport>> = vec![None; members.len()];
    if let Some(i) = members.iter().position(|(id, _)| *id == m.id) {
        out[i] = Some(own(raft, configured));
    }
    while let Some(done) = asks.join_next().await {
        if let Ok((i, r)) = done {
            out[i] = Some(r);
        }
    }
    out.into_iter()
        .zip(members)
        .map(|(r, (id, member))| r.unwrap_or_else(|| seen.down(id, &member)))
        .collect()
}
