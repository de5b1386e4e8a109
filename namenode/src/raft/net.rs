//! The namenode group's messages over QUIC with mutual TLS: openraft's requests and replies,
//! encoded with postcard and carried in [`PeerPart`] frames (each bounded, the whole bounded by
//! [`lode_protocol::messages::PEER_MESSAGE_MAX`] on the side that receives).
//!
//! A member connects to another as a client with its own certificate, and checks that the other
//! certificate carries the member's name. The side that serves checks that the caller's
//! certificate has the namenode role and names a member of the group, and that the request is
//! that member's own: an append or a snapshot must come from the leader it names, a vote request
//! from the candidate it names. So a namenode certificate that is not a member cannot join, vote
//! or lead, and one member cannot speak for another.

use std::sync::Arc;
use std::time::Duration;

use lode_protocol::frame::kind;
use lode_protocol::messages::{PeerPart, PeerRpc, PEER_MESSAGE_MAX};
use lode_protocol::net::{self, Identity, Pool, Role, RpcError};
use lode_protocol::{ErrorCode, WireError};
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Lode, Member, NodeId, Raft};

/// How long a member waits for another's reply when openraft sets no deadline.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Makes connections to the other members.
#[derive(Clone)]
pub struct Network {
    pool: Arc<Pool>,
}

impl Network {
    /// Connections go out through `pool` (its endpoint presents this member's certificate).
    pub fn new(pool: Arc<Pool>) -> Network {
        Network { pool }
    }
}

impl RaftNetworkFactory<Lode> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> Peer {
        Peer {
            pool: self.pool.clone(),
            target,
            member: node.clone(),
        }
    }
}

/// The way to one other member.
pub struct Peer {
    pool: Arc<Pool>,
    target: NodeId,
    member: Member,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failed(String);

impl Peer {
    async fn call<Req, Rep, E>(
        &self,
        rpc: PeerRpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Rep, RPCError<NodeId, Member, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Rep: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let network = |m: String| RPCError::Network(NetworkError::new(&Failed(m)));
        let bytes = postcard::to_stdvec(req).map_err(|e| network(format!("encode: {e}")))?;
        if bytes.len() > PEER_MESSAGE_MAX {
            return Err(network(format!(
                "a {rpc:?} of {} bytes is larger than a member accepts",
                bytes.len()
            )));
        }
        let conn = self
            .pool
            .get_member(&self.member.addr, &self.member.name)
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&Failed(e.to_string()))))?;
        let ttl = option.hard_ttl().min(CALL_TIMEOUT);
        let reply = match tokio::time::timeout(ttl, net::call_peer(&conn, rpc, &bytes)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                if !matches!(e, RpcError::Remote(_)) {
                    self.pool.forget(&self.member.addr, &self.member.name).await;
                }
                return Err(network(format!("{}: {e}", self.member)));
            }
            Err(_) => {
                // The connection may be to a process that is gone (killed and started again
                // with a new endpoint): it would look alive until its idle timeout, and the
                // member restarted would hear nothing meanwhile, and stand for election. The next
                // call connects afresh.
                self.pool.forget(&self.member.addr, &self.member.name).await;
                return Err(network(format!("{}: no reply within {ttl:?}", self.member)));
            }
        };
        let result: Result<Rep, RaftError<NodeId, E>> = postcard::from_bytes(&reply)
            .map_err(|e| network(format!("{}: reply does not decode: {e}", self.member)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<Lode> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<Lode>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        let n = rpc.entries.len() as u64;
        let size = postcard::experimental::serialized_size(&rpc).unwrap_or(0);
        if size > PEER_MESSAGE_MAX && n > 1 {
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(n / 2),
            ));
        }
        self.call(PeerRpc::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<Lode>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(PeerRpc::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.call(PeerRpc::Vote, &rpc, &option).await
    }
}

/// The member id a certificate name has in the group, as `raft` knows it now; `configured`
/// answers for a member that knows no membership yet (a fresh member before its first entries).
pub fn member_id(raft: &Raft, name: &str, configured: &[(NodeId, Member)]) -> Option<NodeId> {
    let metrics = raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership();
    let mut nodes = membership.nodes().peekable();
    if nodes.peek().is_none() {
        return configured
            .iter()
            .find(|(_, m)| m.name == name)
            .map(|(id, _)| *id);
    }
    nodes.find(|(_, m)| m.name == name).map(|(id, _)| *id)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    postcard::from_bytes(bytes).map_err(|e| {
        WireError::new(
            ErrorCode::Protocol,
            format!("bad namenode group message: {e}"),
        )
    })
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, WireError> {
    postcard::to_stdvec(value).map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))
}

fn not_theirs(name: &str, claimed: Option<NodeId>, sender: NodeId) -> WireError {
    WireError::new(
        ErrorCode::PermissionDenied,
        format!(
            "{name} is member {sender} of the namenode group, but the request speaks for {claimed:?}"
        ),
    )
}

/// Serves one request from another member, `first` being its first part.
pub async fn serve(
    raft: &Raft,
    configured: &[(NodeId, Member)],
    identity: &Identity,
    first: PeerPart,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> Result<(), RpcError> {
    let (rpc, bytes) = net::read_peer_message(recv, kind::NAMENODE_PEER, first).await?;
    match answer(raft, configured, identity, rpc, &bytes).await {
        Ok(reply) => {
            net::write_peer_message(send, kind::NAMENODE_PEER_REPLY, rpc, &reply).await?;
        }
        Err(e) => net::write_error(send, &e).await?,
    }
    send.finish()?;
    Ok(())
}

async fn answer(
    raft: &Raft,
    configured: &[(NodeId, Member)],
    identity: &Identity,
    rpc: PeerRpc,
    bytes: &[u8],
) -> Result<Vec<u8>, WireError> {
    if identity.role != Role::Namenode {
        return Err(WireError::new(
            ErrorCode::PermissionDenied,
            "only a namenode certificate can speak in the namenode group",
        ));
    }
    let sender = member_id(raft, &identity.name, configured).ok_or_else(|| {
        WireError::new(
            ErrorCode::PermissionDenied,
            format!("{} is not a member of the namenode group", identity.name),
        )
    })?;
    let theirs = |vote: &openraft::Vote<NodeId>| {
        let claimed = vote.leader_id().voted_for();
        if claimed == Some(sender) {
            Ok(())
        } else {
            Err(not_theirs(&identity.name, claimed, sender))
        }
    };
    match rpc {
        PeerRpc::AppendEntries => {
            let req: AppendEntriesRequest<Lode> = decode(bytes)?;
            theirs(&req.vote)?;
            encode(&raft.append_entries(req).await)
        }
        PeerRpc::Vote => {
            let req: VoteRequest<NodeId> = decode(bytes)?;
            theirs(&req.vote)?;
            encode(&raft.vote(req).await)
        }
        PeerRpc::InstallSnapshot => {
            let req: InstallSnapshotRequest<Lode> = decode(bytes)?;
            theirs(&req.vote)?;
            encode(&raft.install_snapshot(req).await)
        }
        PeerRpc::Status => encode(&super::status::own(raft, configured)),
    }
}
