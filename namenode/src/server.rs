//! The async shell: accepts QUIC connections, reads one request per stream, calls into the
//! namespace, the writer and the soft state, and writes the reply.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use lode_protocol::frame::kind;
use lode_protocol::messages::SafeModeAction;
use lode_protocol::messages::{
    ClientToNamenode, CommittedBlock, DatanodeToNamenode, EntryKind, LocatedBlock, NamenodeReply,
    NamenodeToDatanode, PluginRecord, ReportedBlock, Target,
};
use lode_protocol::net::{self, Identity, Role, RpcError};
use lode_protocol::perm::READ;
use lode_protocol::service;
use lode_protocol::token::{self, Receipt};
use lode_protocol::{checksum, path, ErrorCode, RequestId, SessionId, WireError};

use crate::config::Config;
use crate::error::{to_wire, Error};
use crate::namespace::Namespace;
use crate::perm::{Caller, Groups};
use crate::placement;
use crate::state::{SafeMode, State, SCAN_CHUNK};
use crate::store::SledStore;
use crate::writer::{Mutation, WriterHandle};

/// Connections and requests served at once, in all and per peer.
pub const LIMITS: service::Limits = service::Limits {
    connections: 4096,
    connections_per_peer: 1024,
    streams_per_connection: 64,
    streams_per_peer: 256,
};

/// What every request handler shares.
pub struct Shared {
    /// Namespace reads.
    pub ns: Namespace<SledStore>,
    /// Soft state.
    pub state: Arc<Mutex<State>>,
    /// Namespace changes.
    pub writer: WriterHandle,
    /// Settings.
    pub config: Config,
    /// Request counters and latencies.
    pub metrics: Arc<crate::http::Metrics>,
    /// Woken whenever a datanode reports replicas (commits wait for their confirmations).
    pub replica_reports: tokio::sync::Notify,
    /// Full block report pages counted at once ([`REPORTS_AT_ONCE`]; the others wait their turn,
    /// as HDFS hands out block report leases): when every datanode of a large cluster registers
    /// at once, counting all their pages together would starve the tasks that read requests and
    /// drive the connections.
    pub report_slots: tokio::sync::Semaphore,
    /// Where namespace operations are audited, when configured.
    pub audit: Option<crate::audit::AuditLog>,
    /// Group membership, from the config (reloaded by `RefreshGroups`).
    pub groups: std::sync::RwLock<Groups>,
    /// Block access tokens.
    pub signer: Mutex<crate::tokens::Signer>,
    /// The namenode group this namenode is a member of, if any.
    pub group: Option<Group>,
    /// The name of this namenode's certificate.
    pub name: String,
}

/// This namenode's place in its group.
pub struct Group {
    /// The group's consensus.
    pub raft: crate::raft::Raft,
    /// This member's id.
    pub id: crate::raft::NodeId,
    /// The members the config names (the membership a fresh member knows before its log does).
    pub configured: Vec<(crate::raft::NodeId, crate::raft::Member)>,
    /// Connections to the other members (for their status; openraft has its own).
    pub pool: Arc<lode_protocol::net::Pool>,
    /// What each member last said of itself.
    pub seen: Arc<crate::raft::status::LastSeen>,
    /// The leader's confirmations before it answers a read.
    pub reads: crate::raft::reads::Reads,
    /// Followers answer namespace reads themselves (`[group] follower_reads`).
    pub follower_reads: bool,
}

impl Group {
    /// Refuses a client request on a member that is not the leader, naming the leader.
    fn check_leader(&self) -> Result<(), Error> {
        match crate::raft::journal::leader(&self.raft) {
            Some((id, _)) if id == self.id => Ok(()),
            other => Err(crate::raft::journal::not_leader(other)),
        }
    }

    /// Checks that this member may answer `req` now. A change is refused on a member that is not
    /// the leader (the writer confirms the lead again before each group). A read needs the
    /// leader's confirmation that it still leads, so that it sees every acknowledged change,
    /// unless followers answer namespace reads and this one follows a leader.
    async fn admit(&self, req: &ClientToNamenode) -> Result<(), Error> {
        if self.follower_reads && is_namespace_read(req) {
            let leader = self.raft.metrics().borrow().current_leader;
            if leader.is_some() && leader != Some(self.id) {
                return Ok(());
            }
        }
        self.check_leader()?;
        if !req.is_change() {
            self.reads.confirm().await?;
        }
        Ok(())
    }
}

/// Reads of the namespace a follower may answer (`[group] follower_reads`).
fn is_namespace_read(req: &ClientToNamenode) -> bool {
    matches!(
        req,
        ClientToNamenode::List { .. }
            | ClientToNamenode::Stat { .. }
            | ClientToNamenode::Du { .. }
            | ClientToNamenode::Count { .. }
            | ClientToNamenode::FindPlugin { .. }
            | ClientToNamenode::ListPlugins
    )
}

/// How long `AddBlock` and `Complete` wait for datanodes to confirm the block a writer commits.
const CONFIRM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Waits until min(2, the block's replication) datanodes have reported a finalized replica of `block` with
/// exactly its length and value: a writer's word alone commits nothing (as HDFS waits for minimal
/// replication before `complete` succeeds), so no file can be committed that no datanode holds.
async fn confirmed(shared: &Shared, block: &CommittedBlock) -> Result<(), Error> {
    let deadline = tokio::time::Instant::now() + CONFIRM_TIMEOUT;
    loop {
        let notified = shared.replica_reports.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let (have, need) = shared.state()?.confirmations(block);
        if have >= need {
            return Ok(());
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Err(Error::refused(
                ErrorCode::Unavailable,
                format!(
                    "block {}: {have} of the {need} datanodes needed report a replica of {} bytes \
                     with the value committed; nothing was committed",
                    block.id, block.len
                ),
            ));
        }
    }
}

/// Counts the replicas of `block` whose datanodes signed receipts for them (carried by the writer
/// from the pipeline's acknowledgement), as those datanodes' reports; receipts that do not check
/// out, or name another block, length or value, are passed over (the heartbeats still come).
fn take_receipts(
    shared: &Shared,
    block: &CommittedBlock,
    receipts: &[Receipt],
) -> Result<(), Error> {
    if receipts.is_empty() {
        return Ok(());
    }
    let good: Vec<&Receipt> = {
        let signer = shared.signer()?;
        receipts
            .iter()
            .take(usize::from(lode_protocol::REPLICATION_MAX))
            .filter(|r| r.block == block.id && r.len == block.len && r.cv == block.cv)
            .filter(|r| signer.check_receipt(r))
            .collect()
    };
    let outcome = |kind: &str, n: usize| {
        shared
            .metrics
            .receipts
            .get_or_create(&crate::http::KindLabel { kind: kind.into() })
            .inc_by(n as u64);
    };
    outcome("accepted", good.len());
    outcome("refused", receipts.len() - good.len());
    let mut state = shared.state()?;
    let now = Instant::now();
    for r in good {
        let replica = ReportedBlock {
            id: r.block,
            len: r.len,
            cv: r.cv,
        };
        let _ = state.receipt(&r.datanode, replica, now);
    }
    Ok(())
}

/// Chooses a new block's pipeline (renewing the writer's lease) and promises the room on it.
fn place_block(
    shared: &Shared,
    session: SessionId,
    replication: u8,
    block_size: u64,
    exclude: &[String],
) -> Result<Vec<Target>, Error> {
    let mut state = shared.state()?;
    let now = Instant::now();
    state.renew(session, now);
    let chosen = placement::choose_targets(
        &state.write_candidates(now),
        usize::from(replication),
        block_size,
        exclude,
        rand::random(),
    )
    .map_err(|e| Error::refused(ErrorCode::NoDatanodes, e.to_string()))?;
    for n in &chosen {
        state.promise(n, block_size);
    }
    Ok(chosen.iter().filter_map(|n| state.target(n)).collect())
}

/// Signs a new block's write token, which fixes the pipeline the namenode chose, for the
/// certificate that will present it (a plugin library stored by a user is created as the
/// superuser, but written by the user).
fn sign_write(shared: &Shared, user: &str, b: &mut LocatedBlock) -> Result<(), Error> {
    let pipeline = b.locations.iter().map(|t| t.name.clone()).collect();
    b.token = Some(shared.signer()?.issue(b.id, token::WRITE, user, pipeline));
    Ok(())
}

impl Shared {
    /// The namenodes of the group as this one sees them now, or this namenode alone.
    async fn namenodes(&self) -> Result<Vec<lode_protocol::messages::NamenodeReport>, Error> {
        if let Some(g) = &self.group {
            return Ok(crate::raft::status::view(&g.raft, &g.configured, &g.pool, &g.seen).await);
        }
        let ns = self.ns.clone();
        let seq = blocking(move || ns.last_applied()).await?;
        Ok(vec![lode_protocol::messages::NamenodeReport {
            name: self.name.clone(),
            addr: self.config.listen.to_string(),
            role: "leader".into(),
            term: 0,
            last_index: seq,
            applied_index: seq,
        }])
    }

    fn state(&self) -> Result<MutexGuard<'_, State>, Error> {
        self.state
            .lock()
            .map_err(|_| Error::Store("state lock poisoned".into()))
    }

    fn signer(&self) -> Result<MutexGuard<'_, crate::tokens::Signer>, Error> {
        self.signer
            .lock()
            .map_err(|_| Error::Store("token signer lock poisoned".into()))
    }

    /// The user a certificate acts as. Admin certificates are superusers, and so are datanodes,
    /// which may only look entries up (to fetch plugin libraries and finish records).
    fn caller(&self, identity: &Identity) -> Result<Caller, Error> {
        let groups = self
            .groups
            .read()
            .map_err(|_| Error::Store("groups lock poisoned".into()))?;
        Ok(groups.caller(
            &identity.name,
            matches!(identity.role, Role::Admin | Role::Datanode),
        ))
    }

    /// Reads the groups from the config file again.
    fn refresh_groups(&self) -> Result<usize, Error> {
        let path = self.config.path.as_ref().ok_or_else(|| {
            Error::refused(
                ErrorCode::Unavailable,
                "this namenode was not started from a config file",
            )
        })?;
        let config = Config::load(path)
            .map_err(|e| Error::refused(ErrorCode::InvalidArgument, e.to_string()))?;
        let groups = Groups::new(&config.groups)
            .map_err(|e| Error::refused(ErrorCode::InvalidArgument, e))?;
        let users = groups.users();
        *self
            .groups
            .write()
            .map_err(|_| Error::Store("groups lock poisoned".into()))? = groups;
        Ok(users)
    }
}

impl service::Handler for Shared {
    async fn handle(
        self: Arc<Self>,
        identity: Identity,
        addr: std::net::SocketAddr,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) {
        if let Err(e) = serve_stream(send, recv, &identity, addr, &self).await {
            tracing::debug!(peer = %identity.name, "stream ended: {e}");
        }
    }
}

/// A decoded request.
enum Request {
    Client(ClientToNamenode),
    Datanode(DatanodeToNamenode),
    Peer(lode_protocol::messages::PeerPart),
}

/// Every request takes one path: decode, then authorise (by the role in the verified certificate),
/// then validate (normalise paths, check arguments, bind the write session to the certificate),
/// then route to the writer, the soft state or a namespace read.
async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    identity: &Identity,
    addr: std::net::SocketAddr,
    shared: &Shared,
) -> Result<(), RpcError> {
    let started = std::time::Instant::now();
    let read = tokio::time::timeout(
        service::REQUEST_READ_TIMEOUT,
        net::read_raw_frame(&mut recv),
    );
    let request = match read.await {
        Ok(Ok((header, body))) => decode_request(header, &body),
        Ok(Err(e)) => Err(WireError::new(
            ErrorCode::Protocol,
            format!("bad request: {e}"),
        )),
        Err(_) => Err(WireError::new(
            ErrorCode::Protocol,
            format!("no request within {:?}", service::REQUEST_READ_TIMEOUT),
        )),
    };
    let (request, once) = match request {
        Ok((r, once)) => (Ok(r), once),
        Err(e) => (Err(e), None),
    };
    let audited = match &request {
        Ok(Request::Client(r)) => audited(r),
        _ => None,
    };
    let audit = |allowed: bool| async move {
        if let (Some(log), Some((op, path, dst))) = (&shared.audit, audited.clone()) {
            let entry = crate::audit::Entry::now(&identity.name, op, path, dst, allowed, addr);
            log.record(entry).await;
        }
    };
    let request = match request.and_then(|r| authorise(&r, identity).map(|()| r)) {
        Ok(r) => r,
        Err(e) => {
            audit(e.code != ErrorCode::PermissionDenied).await;
            return finish::<()>(&mut send, 0, Err(e)).await;
        }
    };
    // Only the group's leader serves clients (after confirming its lead, for a read); the others
    // name it.
    if let (Request::Client(req), Some(g)) = (&request, &shared.group) {
        if let Err(e) = g.admit(req).await {
            return finish::<()>(&mut send, 0, Err(to_wire(&e))).await;
        }
    }
    match request {
        Request::Peer(part) => match &shared.group {
            Some(g) => {
                crate::raft::net::serve(
                    &g.raft,
                    &g.configured,
                    identity,
                    part,
                    &mut send,
                    &mut recv,
                )
                .await
            }
            None => {
                let e = WireError::new(
                    ErrorCode::Protocol,
                    "this namenode is not a member of a namenode group",
                );
                finish::<()>(&mut send, 0, Err(e)).await
            }
        },
        Request::Datanode(req) => {
            let kind = request_kind(&req);
            let reply = handle_datanode(req, &identity.name, shared)
                .await
                .map_err(|e| to_wire(&e));
            // Replicas reported: commits waiting for confirmations look again.
            shared.replica_reports.notify_waiters();
            shared.metrics.observe(kind, started);
            finish(&mut send, kind::NAMENODE_TO_DATANODE, reply).await
        }
        Request::Client(ClientToNamenode::Backup) => {
            audit(true).await;
            serve_backup(send, shared).await
        }
        Request::Client(req) => {
            let kind = request_kind(&req);
            let reply = match validate(req, identity, &shared.config) {
                Ok((req, system)) => match shared.caller(identity) {
                    // What the system tree lets anyone do runs as the superuser (the entries it
                    // makes are the superuser's).
                    Ok(_) if system => {
                        route(req, once, identity, &Caller::superuser(), shared).await
                    }
                    Ok(caller) => route(req, once, identity, &caller, shared).await,
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            }
            .map_err(|e| {
                if e.is_fatal() || !matches!(e, Error::Refused { .. }) {
                    tracing::error!("request failed: {e}");
                }
                to_wire(&e)
            });
            audit(!matches!(&reply, Err(e) if e.code == ErrorCode::PermissionDenied)).await;
            shared.metrics.observe(kind, started);
            finish_paged(&mut send, reply).await
        }
    }
}

/// What the audit log records of a client request: the operation (named as HDFS names it) and its
/// paths; `None` for requests that are not namespace operations (block allocation, leases, reports).
fn audited(req: &ClientToNamenode) -> Option<(&'static str, Option<String>, Option<String>)> {
    use ClientToNamenode::*;
    let p = |path: &String| Some(path::normalize(path).unwrap_or_else(|_| path.clone()));
    Some(match req {
        Mkdir { path, .. } => ("mkdirs", p(path), None),
        List { path } => ("listStatus", p(path), None),
        Stat { path, blocks: true } => ("open", p(path), None),
        Stat {
            path,
            blocks: false,
        } => ("getfileinfo", p(path), None),
        Delete { path, .. } => ("delete", p(path), None),
        Rename { src, dst } => ("rename", p(src), p(dst)),
        Create { path, .. } => ("create", p(path), None),
        SetReplication { path, .. } => ("setReplication", p(path), None),
        Du { path } => ("contentSummary", p(path), None),
        Fsck { path } => ("fsck", p(path), None),
        AddPlugin { path, .. } => ("addPlugin", p(path), None),
        SetOwner { path, .. } => ("setOwner", p(path), None),
        SetMode { path, .. } => ("setPermission", p(path), None),
        SetTimes { path, .. } => ("setTimes", p(path), None),
        RefreshGroups => ("refreshUserToGroupsMappings", None, None),
        SetQuota { path, .. } => ("setQuota", p(path), None),
        Count { path } => ("contentSummary", p(path), None),
        Trash { path, .. } => ("delete", p(path), None),
        Expunge => ("expunge", None, None),
        ApprovePlugin { hash } => ("approvePlugin", Some(hash.to_hex()), None),
        SafeMode { action } if *action != SafeModeAction::Get => ("safemode", None, None),
        Decommission { .. } => ("decommission", None, None),
        Backup => ("backup", None, None),
        ChangeNamenodes { change } => match change {
            lode_protocol::messages::NamenodeChange::Add { name, .. } => {
                ("addNamenode", Some(name.clone()), None)
            }
            lode_protocol::messages::NamenodeChange::Remove { name } => {
                ("removeNamenode", Some(name.clone()), None)
            }
        },
        _ => return None,
    })
}

fn decode_request(
    header: lode_protocol::frame::FrameHeader,
    body: &[u8],
) -> Result<(Request, Option<RequestId>), WireError> {
    match header.kind {
        kind::CLIENT_TO_NAMENODE => match decode(header, body)? {
            ClientToNamenode::Once { id, request } => match postcard::from_bytes(&request) {
                Ok(ClientToNamenode::Once { .. }) => Err(WireError::new(
                    ErrorCode::Protocol,
                    "bad request: a Once inside a Once",
                )),
                Ok(r) => Ok((Request::Client(r), Some(id))),
                Err(e) => Err(WireError::new(
                    ErrorCode::Protocol,
                    format!("bad request: the change in a Once does not decode: {e}"),
                )),
            },
            r => Ok((Request::Client(r), None)),
        },
        kind::DATANODE_TO_NAMENODE => decode(header, body).map(|r| (Request::Datanode(r), None)),
        kind::NAMENODE_PEER => decode(header, body).map(|r| (Request::Peer(r), None)),
        k => Err(WireError::new(
            ErrorCode::Protocol,
            format!("bad request: unexpected frame kind {k}"),
        )),
    }
}

/// Who may send what: datanode messages only from datanode certificates; client requests from
/// users and admins (datanodes may only look things up, to fetch plugins and finish records);
/// changes to the cluster itself only from admins.
fn authorise(request: &Request, identity: &Identity) -> Result<(), WireError> {
    let denied = |m: &str| Err(WireError::new(ErrorCode::PermissionDenied, m));
    match (request, identity.role) {
        // Which member may speak in the group is checked against its membership.
        (Request::Peer(_), Role::Namenode) => Ok(()),
        (Request::Peer(_), _) => {
            denied("only a namenode certificate can speak in the namenode group")
        }
        (Request::Datanode(_), Role::Datanode) => Ok(()),
        (Request::Datanode(_), _) => denied("only a datanode certificate can act as a datanode"),
        (Request::Client(_), Role::Namenode) => denied("namenodes do not call namenodes"),
        (Request::Client(r), Role::Datanode) if !is_lookup(r) => {
            denied("a datanode certificate cannot make client requests")
        }
        (Request::Client(r), role) if role != Role::Admin => match admin_only(r) {
            Some(m) => denied(m),
            None => Ok(()),
        },
        _ => Ok(()),
    }
}

/// Requests only an admin may make, with the refusal everyone else gets.
fn admin_only(req: &ClientToNamenode) -> Option<&'static str> {
    match req {
        ClientToNamenode::Backup => Some("only an admin can back up metadata"),
        ClientToNamenode::SafeMode { action } if *action != SafeModeAction::Get => {
            Some("only an admin can change safe mode")
        }
        ClientToNamenode::Decommission { .. } => Some("only an admin can decommission datanodes"),
        ClientToNamenode::ApprovePlugin { .. } => Some("only an admin can approve plugins"),
        ClientToNamenode::RefreshGroups => Some("only an admin can reload the groups"),
        ClientToNamenode::SetQuota { .. } => Some("only an admin can set quotas"),
        ClientToNamenode::ChangeNamenodes { .. } => {
            Some("only an admin can change the namenode group")
        }
        _ => None,
    }
}

use lode_protocol::path::{PLUGIN_DIR, SYSTEM_DIR};

fn in_system_tree(path: &str) -> bool {
    path == SYSTEM_DIR
        || path
            .strip_prefix(SYSTEM_DIR)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Only an admin may change the system tree (or act on `/` as a whole, which holds it), except that
/// anyone may make `/.lode/plugins` and store a new library directly in it, never over another
/// (`plugin add`; a library runs only once an admin approves its hash). Takes normalised paths.
/// True for one of those exceptions by a non-admin: the request then runs as the superuser, so
/// the system tree stays the superuser's whatever its modes.
fn guard_system_tree(req: &ClientToNamenode, identity: &Identity) -> Result<bool, Error> {
    use ClientToNamenode::*;
    if identity.role == Role::Admin {
        return Ok(false);
    }
    let denied = |path: &str| {
        Err(Error::refused(
            ErrorCode::PermissionDenied,
            format!("permission denied: {path}: only an admin can change {SYSTEM_DIR} (where plugin libraries live)"),
        ))
    };
    let new_library = |path: &str| path::split_parent(path).is_some_and(|(p, _)| p == PLUGIN_DIR);
    match req {
        Mkdir { path, .. } if in_system_tree(path) && path != SYSTEM_DIR && path != PLUGIN_DIR => {
            denied(path)
        }
        Mkdir { path, .. } if in_system_tree(path) => Ok(true),
        Create {
            path, overwrite, ..
        } if in_system_tree(path) && (*overwrite || !new_library(path)) => denied(path),
        Create { path, .. } if in_system_tree(path) => Ok(true),
        Delete { path, .. }
        | Trash { path, .. }
        | SetReplication { path, .. }
        | SetOwner { path, .. }
        | SetMode { path, .. }
        | SetTimes { path, .. }
            if in_system_tree(path) || path == "/" =>
        {
            denied(path)
        }
        Rename { src, dst } if in_system_tree(src) || in_system_tree(dst) || src == "/" => {
            denied(if in_system_tree(dst) { dst } else { src })
        }
        _ => Ok(false),
    }
}

/// Checks a client request's arguments and puts it in the form routing expects: paths
/// normalised, defaults filled in, the write session bound to the certificate. True with it where
/// the system tree lets a non-admin make the change ([`guard_system_tree`]).
fn validate(
    req: ClientToNamenode,
    identity: &Identity,
    config: &Config,
) -> Result<(ClientToNamenode, bool), Error> {
    use ClientToNamenode::*;
    let invalid = |m: String| Error::refused(ErrorCode::InvalidArgument, m);
    Ok(match bind_session(req, identity) {
        Mkdir {
            path,
            parents,
            mode,
        } => Mkdir {
            path: normalize(&path)?,
            parents,
            mode: mode & 0o777,
        },
        SetOwner {
            path,
            owner,
            group,
            recursive,
        } => {
            if owner.is_none() && group.is_none() {
                return Err(invalid("give an owner, a group or both".into()));
            }
            SetOwner {
                path: normalize(&path)?,
                owner,
                group,
                recursive,
            }
        }
        SetMode {
            path,
            change,
            recursive,
        } => SetMode {
            path: normalize(&path)?,
            change,
            recursive,
        },
        SetQuota {
            path,
            names,
            bytes,
            clear,
        } => SetQuota {
            path: normalize(&path)?,
            names,
            bytes,
            clear,
        },
        Count { path } => Count {
            path: normalize(&path)?,
        },
        SetTimes { path, mtime_ms } => SetTimes {
            path: normalize(&path)?,
            mtime_ms,
        },
        Trash { path, recursive } => Trash {
            path: normalize(&path)?,
            recursive,
        },
        List { path } => List {
            path: normalize(&path)?,
        },
        Stat { path, blocks } => Stat {
            path: normalize(&path)?,
            blocks,
        },
        Delete { path, recursive } => Delete {
            path: normalize(&path)?,
            recursive,
        },
        Rename { src, dst } => Rename {
            src: normalize(&src)?,
            dst: normalize(&dst)?,
        },
        Du { path } => Du {
            path: normalize(&path)?,
        },
        Fsck { path } => Fsck {
            path: normalize(&path)?,
        },
        Create {
            path,
            overwrite,
            replication,
            block_size,
            session,
            mode,
            first_block,
        } => {
            let replication = replication.unwrap_or(config.replication_default);
            lode_protocol::validate_replication(replication).map_err(invalid)?;
            let block_size = block_size.unwrap_or(config.block_size_default);
            checksum::validate_block_size(block_size).map_err(invalid)?;
            Create {
                path: normalize(&path)?,
                overwrite,
                replication: Some(replication),
                block_size: Some(block_size),
                session,
                mode: mode & 0o777,
                first_block,
            }
        }
        SetReplication { path, replication } => {
            lode_protocol::validate_replication(replication).map_err(invalid)?;
            SetReplication {
                path: normalize(&path)?,
                replication,
            }
        }
        AddPlugin { hash, name, path } => {
            let valid = !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
            if !valid {
                return Err(invalid(format!(
                    "plugin name {name:?} must be 1..=64 of [A-Za-z0-9_.-]"
                )));
            }
            AddPlugin {
                hash,
                name,
                path: normalize(&path)?,
            }
        }
        other => other,
    })
    .and_then(|req| guard_system_tree(&req, identity).map(|system| (req, system)))
}

/// Streams a consistent metadata backup: a `BackupStart` frame, then the bytes.
async fn serve_backup(mut send: quinn::SendStream, shared: &Shared) -> Result<(), RpcError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let taken = match shared.writer.submit(Mutation::Backup { out: tx }).await {
        Ok(_) => rx.await.map_err(|_| Error::WriterGone),
        Err(e) => Err(e),
    };
    let (last_applied, bytes) = match taken {
        Ok(t) => t,
        Err(e) => return finish::<()>(&mut send, 0, Err(to_wire(&e))).await,
    };
    let start = NamenodeReply::BackupStart {
        len: bytes.len() as u64,
        hash: lode_protocol::Blake3Cv(*blake3::hash(&bytes).as_bytes()),
        last_applied,
    };
    tracing::info!(bytes = bytes.len(), last_applied, "metadata backup taken");
    net::write_frame(&mut send, kind::NAMENODE_REPLY, &start).await?;
    send.write_all(&bytes).await.map_err(RpcError::from)?;
    send.finish()?;
    let _ = send.stopped().await;
    Ok(())
}

fn decode<T: serde::de::DeserializeOwned>(
    header: lode_protocol::frame::FrameHeader,
    body: &[u8],
) -> Result<T, WireError> {
    match lode_protocol::frame::decode_body::<T>(header, header.kind, body) {
        Ok(lode_protocol::frame::Decoded::Message(m)) => Ok(m),
        Ok(lode_protocol::frame::Decoded::Error(_)) => Err(WireError::new(
            ErrorCode::Protocol,
            "bad request: an error frame",
        )),
        Err(e) => Err(WireError::new(
            ErrorCode::Protocol,
            format!("bad request: {e}"),
        )),
    }
}

/// Requests refused in safe mode. Completing or abandoning a write already under way is allowed.
fn changes_namespace(req: &ClientToNamenode) -> bool {
    matches!(
        req,
        ClientToNamenode::Mkdir { .. }
            | ClientToNamenode::Create { .. }
            | ClientToNamenode::AddBlock { .. }
            | ClientToNamenode::Delete { .. }
            | ClientToNamenode::Rename { .. }
            | ClientToNamenode::SetReplication { .. }
            | ClientToNamenode::AddPlugin { .. }
            | ClientToNamenode::ApprovePlugin { .. }
            | ClientToNamenode::SetOwner { .. }
            | ClientToNamenode::SetMode { .. }
            | ClientToNamenode::SetTimes { .. }
            | ClientToNamenode::SetQuota { .. }
            | ClientToNamenode::Trash { .. }
            | ClientToNamenode::Expunge
    )
}

/// A request's variant name, for metrics labels.
trait RequestKind {
    fn kind(&self) -> &'static str;
}

impl RequestKind for DatanodeToNamenode {
    fn kind(&self) -> &'static str {
        match self {
            DatanodeToNamenode::Register { .. } => "Register",
            DatanodeToNamenode::Heartbeat { .. } => "Heartbeat",
            DatanodeToNamenode::Info { .. } => "Info",
            DatanodeToNamenode::CorruptReplicas { .. } => "CorruptReplicas",
            DatanodeToNamenode::ReportMore { .. } => "ReportMore",
        }
    }
}

impl RequestKind for ClientToNamenode {
    fn kind(&self) -> &'static str {
        match self {
            ClientToNamenode::Report => "Report",
            ClientToNamenode::ListPlugins => "ListPlugins",
            ClientToNamenode::Backup => "Backup",
            ClientToNamenode::Mkdir { .. } => "Mkdir",
            ClientToNamenode::List { .. } => "List",
            ClientToNamenode::Stat { .. } => "Stat",
            ClientToNamenode::Delete { .. } => "Delete",
            ClientToNamenode::Rename { .. } => "Rename",
            ClientToNamenode::Create { .. } => "Create",
            ClientToNamenode::AddBlock { .. } => "AddBlock",
            ClientToNamenode::AbandonBlock { .. } => "AbandonBlock",
            ClientToNamenode::Complete { .. } => "Complete",
            ClientToNamenode::RenewLease { .. } => "RenewLease",
            ClientToNamenode::Du { .. } => "Du",
            ClientToNamenode::ReportBadReplica { .. } => "ReportBadReplica",
            ClientToNamenode::AbandonFile { .. } => "AbandonFile",
            ClientToNamenode::AddPlugin { .. } => "AddPlugin",
            ClientToNamenode::ApprovePlugin { .. } => "ApprovePlugin",
            ClientToNamenode::FindPlugin { .. } => "FindPlugin",
            ClientToNamenode::SetReplication { .. } => "SetReplication",
            ClientToNamenode::Fsck { .. } => "Fsck",
            ClientToNamenode::SafeMode { .. } => "SafeMode",
            ClientToNamenode::Decommission { .. } => "Decommission",
            ClientToNamenode::SetOwner { .. } => "SetOwner",
            ClientToNamenode::SetMode { .. } => "SetMode",
            ClientToNamenode::SetTimes { .. } => "SetTimes",
            ClientToNamenode::RefreshGroups => "RefreshGroups",
            ClientToNamenode::SetQuota { .. } => "SetQuota",
            ClientToNamenode::Count { .. } => "Count",
            ClientToNamenode::Trash { .. } => "Trash",
            ClientToNamenode::Expunge => "Expunge",
            ClientToNamenode::ChangeNamenodes { .. } => "ChangeNamenodes",
            ClientToNamenode::Once { .. } => "Once",
        }
    }
}

fn request_kind(req: &impl RequestKind) -> &'static str {
    req.kind()
}

fn is_lookup(req: &ClientToNamenode) -> bool {
    matches!(
        req,
        ClientToNamenode::Stat { .. } | ClientToNamenode::FindPlugin { .. }
    )
}

async fn finish<T: serde::Serialize>(
    send: &mut quinn::SendStream,
    kind: u16,
    reply: Result<T, WireError>,
) -> Result<(), RpcError> {
    match reply {
        Ok(r) => net::write_frame(send, kind, &r).await?,
        Err(e) => net::write_error(send, &e).await?,
    }
    send.finish()?;
    // Wait until the peer has the reply (or is gone) before dropping the stream.
    let _ = send.stopped().await;
    Ok(())
}

/// Writes a client's reply as its frames (long listings, block lists and fsck reports are paged).
async fn finish_paged(
    send: &mut quinn::SendStream,
    reply: Result<NamenodeReply, WireError>,
) -> Result<(), RpcError> {
    match reply {
        Ok(r) => net::write_paged_reply(send, r).await?,
        Err(e) => net::write_error(send, &e).await?,
    }
    send.finish()?;
    let _ = send.stopped().await;
    Ok(())
}

fn normalize(p: &str) -> Result<String, Error> {
    path::normalize(p).map_err(|m| Error::refused(ErrorCode::InvalidPath, m))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Store(format!("reader task: {e}")))?
}

/// Ties a client's session to the certificate presenting it: the namenode works with a value
/// derived from both, so a session id seen or guessed by a holder of another certificate is of no
/// use to it (its requests miss the lease, as any other client's would).
fn bind_session(mut req: ClientToNamenode, identity: &Identity) -> ClientToNamenode {
    use ClientToNamenode::*;
    let (Create { session, .. }
    | AddBlock { session, .. }
    | AbandonBlock { session, .. }
    | Complete { session, .. }
    | RenewLease { session }
    | AbandonFile { session, .. }) = &mut req
    else {
        return req;
    };
    let mut h = blake3::Hasher::new_derive_key("lode 1 namenode write session");
    h.update(identity.role.as_str().as_bytes());
    h.update(&[0]);
    h.update(identity.name.as_bytes());
    h.update(&[0]);
    h.update(&session.0.to_le_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&h.finalize().as_bytes()[..8]);
    *session = lode_protocol::SessionId(u64::from_le_bytes(first));
    req
}

/// Submits a client's change to the writer, as a `Once` when the client gave it a request id.
struct Submitter<'a> {
    writer: &'a WriterHandle,
    once: Option<(RequestId, String)>,
}

impl Submitter<'_> {
    async fn submit(&self, mutation: Mutation) -> Result<NamenodeReply, Error> {
        let mutation = match &self.once {
            Some((id, user)) => Mutation::Once {
                id: *id,
                user: user.clone(),
                mutation: Box::new(mutation),
            },
            None => mutation,
        };
        self.writer.submit(mutation).await
    }
}

/// Carries out a validated client request.
async fn route(
    req: ClientToNamenode,
    once: Option<RequestId>,
    identity: &Identity,
    caller: &Caller,
    shared: &Shared,
) -> Result<NamenodeReply, Error> {
    // A change sent with a request id is answered once: a retry gets the first answer.
    let writer = Submitter {
        writer: &shared.writer,
        once: once.map(|id| (id, identity.name.clone())),
    };
    if changes_namespace(&req) {
        let state = shared.state()?;
        if state.safemode != SafeMode::Off {
            let (reported, total) = state.reported_blocks(Instant::now());
            return Err(Error::refused(
                ErrorCode::SafeMode,
                format!(
                    "namenode is in safe mode ({reported} of {total} blocks reported); changes resume when enough \
                     blocks are reported or an admin runs `lode admin safemode leave`"
                ),
            ));
        }
    }
    match req {
        ClientToNamenode::Mkdir {
            path,
            parents,
            mode,
        } => {
            writer
                .submit(Mutation::Mkdir {
                    caller: caller.clone(),
                    path,
                    parents,
                    mode,
                })
                .await
        }
        ClientToNamenode::List { path: p } => {
            let ns = shared.ns.clone();
            let caller = caller.clone();
            blocking(move || {
                let node = ns.readable(&caller, &p)?;
                let status = ns.status(&p, &node, false)?;
                if status.kind == EntryKind::File {
                    return Ok(NamenodeReply::Listing(vec![status]));
                }
                let mut out = vec![];
                for (name, id) in ns.children(node.id)? {
                    if let Some(child) = ns.get(id)? {
                        out.push(ns.status(&path::join(&p, &name), &child, false)?);
                    }
                }
                Ok(NamenodeReply::Listing(out))
            })
            .await
        }
        ClientToNamenode::Stat { path: p, blocks } => {
            let ns = shared.ns.clone();
            let reader = caller.clone();
            let mut status = blocking(move || {
                let node = ns.resolve_existing_as(&reader, &p)?;
                // Block locations are what reading takes.
                if blocks && !node.is_dir() {
                    reader.check(&p, &node.perm, false, READ)?;
                }
                ns.status(&p, &node, blocks)
            })
            .await?;
            let now = Instant::now();
            {
                let state = shared.state()?;
                for b in &mut status.blocks {
                    b.locations = state.locations(b.id, now);
                }
            }
            // Signed outside the state lock (a file may have many blocks).
            let mut signer = shared.signer()?;
            for b in &mut status.blocks {
                b.token = Some(signer.issue(b.id, token::READ, &caller.user, vec![]));
            }
            Ok(NamenodeReply::Status(status))
        }
        ClientToNamenode::Delete { path, recursive } => {
            writer
                .submit(Mutation::Delete {
                    caller: caller.clone(),
                    path,
                    recursive,
                })
                .await
        }
        ClientToNamenode::Rename { src, dst } => {
            writer
                .submit(Mutation::Rename {
                    caller: caller.clone(),
                    src,
                    dst,
                })
                .await
        }
        ClientToNamenode::SetOwner {
            path,
            owner,
            group,
            recursive,
        } => {
            writer
                .submit(Mutation::SetAttributes {
                    caller: caller.clone(),
                    path,
                    owner,
                    group,
                    mode: None,
                    recursive,
                })
                .await
        }
        ClientToNamenode::SetMode {
            path,
            change,
            recursive,
        } => {
            writer
                .submit(Mutation::SetAttributes {
                    caller: caller.clone(),
                    path,
                    owner: None,
                    group: None,
                    mode: Some(change),
                    recursive,
                })
                .await
        }
        ClientToNamenode::SetTimes { path, mtime_ms } => {
            writer
                .submit(Mutation::SetTimes {
                    caller: caller.clone(),
                    path,
                    mtime_ms,
                })
                .await
        }
        ClientToNamenode::SetQuota {
            path,
            names,
            bytes,
            clear,
        } => {
            writer
                .submit(Mutation::SetQuota {
                    path,
                    names,
                    bytes,
                    clear,
                })
                .await
        }
        ClientToNamenode::Trash { path, recursive } => {
            if shared.config.trash_interval_ms == 0 {
                writer
                    .submit(Mutation::Delete {
                        caller: caller.clone(),
                        path,
                        recursive,
                    })
                    .await?;
                return Ok(NamenodeReply::Trashed { to: None });
            }
            writer
                .submit(Mutation::Trash {
                    caller: caller.clone(),
                    path,
                    recursive,
                })
                .await
        }
        ClientToNamenode::Expunge => {
            writer
                .submit(Mutation::Expunge {
                    caller: caller.clone(),
                })
                .await
        }
        ClientToNamenode::Count { path: p } => {
            let ns = shared.ns.clone();
            let caller = caller.clone();
            blocking(move || {
                let node = ns.readable(&caller, &p)?;
                let (files, dirs, bytes, stored) = ns.usage(&node)?;
                let quota = ns.quota(node.id)?;
                Ok(NamenodeReply::Count {
                    dirs,
                    files,
                    bytes,
                    name_quota: quota.as_ref().and_then(|q| q.names),
                    space_quota: quota.as_ref().and_then(|q| q.bytes),
                    names_used: quota.as_ref().map_or(files + dirs, |q| q.names_used),
                    space_used: quota.as_ref().map_or(stored, |q| q.space_used),
                })
            })
            .await
        }
        ClientToNamenode::RefreshGroups => {
            let users = shared.refresh_groups()?;
            tracing::info!(users, by = %identity.name, "groups reloaded from the config");
            Ok(NamenodeReply::Ok)
        }
        ClientToNamenode::Create {
            path,
            overwrite,
            replication,
            block_size,
            session,
            mode,
            first_block,
        } => {
            // Filled in by `validate`.
            let replication = replication.unwrap_or(shared.config.replication_default);
            let block_size = block_size.unwrap_or(shared.config.block_size_default);
            // A first block that cannot be placed now is left to AddBlock, which says why.
            let first = if first_block {
                place_block(shared, session, replication, block_size, &[]).ok()
            } else {
                None
            };
            let mut reply = writer
                .submit(Mutation::Create {
                    caller: caller.clone(),
                    mode,
                    path,
                    overwrite,
                    replication,
                    block_size,
                    session,
                    first_block: first,
                })
                .await?;
            if let NamenodeReply::Created { first: Some(b), .. } = &mut reply {
                sign_write(shared, &identity.name, b)?;
            }
            Ok(reply)
        }
        ClientToNamenode::AddBlock {
            inode,
            session,
            previous,
            receipts,
            exclude,
        } => {
            let ns = shared.ns.clone();
            let node = blocking(move || ns.get(inode)).await?.ok_or_else(|| {
                Error::refused(
                    ErrorCode::NotFound,
                    format!("file {inode} no longer exists"),
                )
            })?;
            let crate::namespace::InodeKind::File {
                replication,
                block_size,
                writer: holder,
                ..
            } = node.kind
            else {
                return Err(Error::refused(ErrorCode::IsADirectory, "not a file"));
            };
            // Room is promised on datanodes only to the lease holder (the writer checks it again).
            if holder != Some(session) {
                return Err(Error::refused(
                    ErrorCode::LeaseConflict,
                    format!("file {inode} is not being written by this session"),
                ));
            }
            if let Some(prev) = &previous {
                take_receipts(shared, prev, &receipts)?;
                confirmed(shared, prev).await?;
            }
            let targets = place_block(shared, session, replication, block_size, &exclude)?;
            let mut reply = writer
                .submit(Mutation::AddBlock {
                    inode,
                    session,
                    previous,
                    targets,
                })
                .await?;
            if let NamenodeReply::Block(b) = &mut reply {
                sign_write(shared, &identity.name, b)?;
            }
            Ok(reply)
        }
        ClientToNamenode::AbandonBlock {
            inode,
            session,
            block,
        } => {
            writer
                .submit(Mutation::Abandon {
                    inode,
                    session,
                    block,
                })
                .await
        }
        ClientToNamenode::Complete {
            inode,
            session,
            last,
            receipts,
            size,
        } => {
            if let Some(last) = &last {
                take_receipts(shared, last, &receipts)?;
                confirmed(shared, last).await?;
            }
            writer
                .submit(Mutation::Complete {
                    inode,
                    session,
                    last,
                    size,
                })
                .await
        }
        ClientToNamenode::RenewLease { session } => {
            shared.state()?.renew(session, Instant::now());
            Ok(NamenodeReply::Ok)
        }
        ClientToNamenode::Du { path: p } => {
            let ns = shared.ns.clone();
            let caller = caller.clone();
            blocking(move || {
                let node = ns.readable(&caller, &p)?;
                let (files, directories, bytes, stored_bytes) = ns.usage(&node)?;
                Ok(NamenodeReply::Usage {
                    files,
                    directories,
                    bytes,
                    stored_bytes,
                })
            })
            .await
        }
        ClientToNamenode::Report => {
            let now = Instant::now();
            let health = crate::state::health_pass(&shared.state, now)
                .await
                .ok_or_else(|| Error::Store("state lock poisoned".into()))?;
            let mut report = shared.state()?.report_with(now, &health);
            report.namenodes = shared.namenodes().await?;
            Ok(NamenodeReply::Report(report))
        }
        ClientToNamenode::AddPlugin { hash, name, path } => {
            let ns = shared.ns.clone();
            let p = path.clone();
            let complete = blocking(move || {
                ns.resolve(&p)?
                    .map(|i| ns.status(&p, &i, false).map(|s| s.complete))
                    .transpose()
            })
            .await?;
            if complete != Some(true) {
                return Err(Error::refused(
                    ErrorCode::NotFound,
                    format!("{path}: no complete file to register as a plugin"),
                ));
            }
            let record = PluginRecord {
                hash,
                name,
                path,
                added_by: identity.name.clone(),
                approved: identity.role == Role::Admin,
                added_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
            };
            writer.submit(Mutation::AddPlugin(record)).await
        }
        ClientToNamenode::SetReplication { path, replication } => {
            writer
                .submit(Mutation::SetReplication {
                    caller: caller.clone(),
                    path,
                    replication,
                })
                .await
        }
        ClientToNamenode::Fsck { path: p } => {
            let ns = shared.ns.clone();
            let caller = caller.clone();
            let files = blocking(move || {
                let top = ns.readable(&caller, &p)?;
                ns.files_under(&p, top)?
                    .into_iter()
                    .filter_map(|(path, inode)| match inode.kind {
                        crate::namespace::InodeKind::File {
                            replication,
                            writer,
                            ..
                        } => Some(ns.blocks(inode.id).map(|blocks| {
                            (
                                path,
                                replication,
                                writer.is_none(),
                                blocks.iter().map(|b| b.id).collect(),
                            )
                        })),
                        crate::namespace::InodeKind::Directory => None,
                    })
                    .collect::<Result<Vec<_>, Error>>()
            })
            .await?;
            Ok(NamenodeReply::Fsck(
                shared.state()?.fsck(&files, Instant::now()),
            ))
        }
        ClientToNamenode::SafeMode { action } => {
            let mut state = shared.state()?;
            match action {
                SafeModeAction::Get => {}
                SafeModeAction::Enter => state.safemode = SafeMode::Manual,
                SafeModeAction::Leave => state.safemode = SafeMode::Off,
            }
            if action != SafeModeAction::Get {
                tracing::info!(by = %identity.name, ?action, "safe mode changed by an admin");
            }
            let (reported, total) = state.reported_blocks(Instant::now());
            Ok(NamenodeReply::SafeMode {
                on: state.safemode != SafeMode::Off,
                reported,
                total,
            })
        }
        ClientToNamenode::ChangeNamenodes { change } => {
            let Some(g) = &shared.group else {
                return Err(Error::refused(
                    ErrorCode::InvalidArgument,
                    "this namenode is not a member of a namenode group (give it a [group] section)",
                ));
            };
            tracing::info!(?change, by = %identity.name, "namenode group change");
            match change {
                lode_protocol::messages::NamenodeChange::Add { id, name, addr } => {
                    crate::raft::members::add(&g.raft, id, crate::raft::Member { name, addr })
                        .await?
                }
                lode_protocol::messages::NamenodeChange::Remove { name } => {
                    crate::raft::members::remove(&g.raft, &name).await?
                }
            }
            Ok(NamenodeReply::Ok)
        }
        ClientToNamenode::Decommission { datanode, on } => {
            if !shared.state()?.datanodes.contains_key(&datanode) {
                return Err(Error::refused(
                    ErrorCode::NotFound,
                    format!("{datanode}: no such datanode"),
                ));
            }
            tracing::info!(%datanode, on, by = %identity.name, "decommissioning changed");
            writer.submit(Mutation::Decommission { datanode, on }).await
        }
        // Unwrapped when decoded.
        ClientToNamenode::Once { .. } => Err(Error::refused(
            ErrorCode::Protocol,
            "a Once is not a routed request",
        )),
        // Streamed by `serve_backup` before routing.
        ClientToNamenode::Backup => Err(Error::refused(
            ErrorCode::Protocol,
            "a backup is not a routed request",
        )),
        ClientToNamenode::ListPlugins => {
            let ns = shared.ns.clone();
            Ok(NamenodeReply::Plugins(
                blocking(move || ns.list_plugins()).await?,
            ))
        }
        ClientToNamenode::ApprovePlugin { hash } => {
            writer.submit(Mutation::ApprovePlugin { hash }).await
        }
        ClientToNamenode::FindPlugin { key } => {
            let ns = shared.ns.clone();
            let found = blocking(move || {
                let all = ns.list_plugins()?;
                let by_hash = all
                    .iter()
                    .find(|p| p.hash.to_hex() == key.to_ascii_lowercase())
                    .cloned();
                let by_name = || {
                    let named: Vec<&PluginRecord> = all.iter().filter(|p| p.name == key).collect();
                    named
                        .iter()
                        .rev()
                        .find(|p| p.approved)
                        .or(named.last())
                        .map(|p| (*p).clone())
                };
                by_hash.or_else(by_name).ok_or_else(|| {
                    Error::refused(
                        ErrorCode::NotFound,
                        format!("no plugin named or hashed {key:?}"),
                    )
                })
            })
            .await?;
            Ok(NamenodeReply::Plugin(found))
        }
        ClientToNamenode::AbandonFile { inode, session } => {
            writer.submit(Mutation::Expire { inode, session }).await
        }
        ClientToNamenode::ReportBadReplica { block, datanode } => {
            // The holder re-verifies it; only its own report marks the replica corrupt.
            let asked = shared
                .state()?
                .suspect_replica(block, &datanode, Instant::now());
            tracing::warn!(%block, %datanode, asked, "a client reports a corrupt replica");
            Ok(NamenodeReply::Ok)
        }
    }
}

/// Block report pages counted at once.
pub const REPORTS_AT_ONCE: usize = 2;

/// Counts the replicas of a block report page, one [`SCAN_CHUNK`] per hold of the state lock
/// (yielding in between, so that heartbeats and clients are not stalled behind a large report);
/// returns the replicas to delete.
async fn count_page(
    name: &str,
    blocks: &[ReportedBlock],
    shared: &Shared,
) -> Result<Vec<ReportedBlock>, Error> {
    let mut delete = vec![];
    for chunk in blocks.chunks(SCAN_CHUNK) {
        tokio::task::yield_now().await;
        delete.extend(shared.state()?.report_more(name, chunk, Instant::now()));
    }
    Ok(delete)
}

async fn handle_datanode(
    req: DatanodeToNamenode,
    name: &str,
    shared: &Shared,
) -> Result<NamenodeToDatanode, Error> {
    let _slot = match &req {
        DatanodeToNamenode::Register { .. } | DatanodeToNamenode::ReportMore { .. } => Some(
            shared
                .report_slots
                .acquire()
                .await
                .map_err(|_| Error::Store("report slots closed".into()))?,
        ),
        _ => None,
    };
    let now = Instant::now();
    match req {
        DatanodeToNamenode::Register {
            addr,
            space,
            blocks,
            last,
        } => {
            let mut delete = shared
                .state()?
                .register(name, addr.clone(), space, &[], now);
            delete.extend(count_page(name, &blocks, shared).await?);
            if last {
                shared.state()?.end_report(name);
            }
            tracing::info!(datanode = name, %addr, replicas = blocks.len(), unknown = delete.len(), "datanode registered");
            Ok(NamenodeToDatanode::Registered {
                delete,
                keys: shared.signer()?.keys(),
            })
        }
        DatanodeToNamenode::ReportMore { blocks, last } => {
            let delete = count_page(name, &blocks, shared).await?;
            if last {
                shared.state()?.end_report(name);
            }
            Ok(NamenodeToDatanode::Registered {
                delete,
                keys: shared.signer()?.keys(),
            })
        }
        other => handle_datanode_small(other, name, shared, now),
    }
}

/// The datanode requests that take one short hold of the state lock.
fn handle_datanode_small(
    req: DatanodeToNamenode,
    name: &str,
    shared: &Shared,
    now: Instant,
) -> Result<NamenodeToDatanode, Error> {
    let mut state = shared.state()?;
    match req {
        DatanodeToNamenode::Register { .. } | DatanodeToNamenode::ReportMore { .. } => {
            Err(Error::Store("block reports are handled in chunks".into()))
        }
        DatanodeToNamenode::CorruptReplicas { blocks } => {
            for block in blocks {
                tracing::warn!(%block, datanode = name, "datanode reports a corrupt replica");
                state.bad_replica(block, name);
            }
            Ok(NamenodeToDatanode::Ack)
        }
        DatanodeToNamenode::Info {
            protections,
            http_addr,
            missing,
        } => {
            if let Some(dn) = state.datanodes.get_mut(name) {
                dn.sandbox = protections;
                dn.sandbox_missing = missing;
                dn.http_addr = http_addr;
            }
            Ok(NamenodeToDatanode::Ack)
        }
        DatanodeToNamenode::Heartbeat {
            space,
            received,
            deleted,
        } => {
            let mut signer = shared.signer()?;
            let keys = signer.keys();
            let term = shared
                .group
                .as_ref()
                .map_or(0, |g| g.raft.metrics().borrow().current_term);
            Ok(
                match state.heartbeat(name, space, &received, &deleted, now) {
                    Some((delete, mut copy)) => {
                        // A copy's token opens its targets for this block only, in this order.
                        for c in copy.iter_mut().filter(|c| !c.targets.is_empty()) {
                            let pipeline = c.targets.iter().map(|t| t.name.clone()).collect();
                            c.token = Some(signer.issue(c.block, token::COPY, name, pipeline));
                        }
                        NamenodeToDatanode::Commands {
                            reregister: false,
                            delete,
                            copy,
                            keys,
                            term,
                        }
                    }
                    None => NamenodeToDatanode::Commands {
                        reregister: true,
                        delete: vec![],
                        copy: vec![],
                        keys,
                        term,
                    },
                },
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lode_protocol::{InodeId, SessionId};

    fn decode_client(req: &ClientToNamenode) -> Result<(Request, Option<RequestId>), WireError> {
        let frame = lode_protocol::frame::encode_frame(kind::CLIENT_TO_NAMENODE, req).unwrap();
        let (h, body) = frame.split_at(lode_protocol::frame::HEADER_BYTES);
        decode_request(
            lode_protocol::frame::FrameHeader::decode(h.try_into().unwrap()).unwrap(),
            body,
        )
    }

    #[test]
    fn a_change_with_a_request_id_is_unwrapped_and_nothing_nests() {
        let mkdir = ClientToNamenode::Mkdir {
            path: "/a".into(),
            parents: false,
            mode: 0o755,
        };
        let rid = RequestId { client: 1, call: 2 };
        match decode_client(&ClientToNamenode::once(rid, &mkdir)) {
            Ok((Request::Client(r), Some(got))) => {
                assert_eq!(r, mkdir);
                assert_eq!(got, rid);
            }
            _ => panic!("a Once is unwrapped to its change and id"),
        }
        // A Once in a Once, a chain of them, or bytes that are no request: one clear refusal,
        // decoded one level deep only (a chain never recurses).
        let mut chain = ClientToNamenode::once(rid, &mkdir);
        for _ in 0..1_000 {
            chain = ClientToNamenode::once(rid, &chain);
        }
        let garbage = ClientToNamenode::Once {
            id: rid,
            request: vec![0xff; 16],
        };
        for bad in [
            ClientToNamenode::once(rid, &ClientToNamenode::once(rid, &mkdir)),
            chain,
            garbage,
        ] {
            let Err(e) = decode_client(&bad) else {
                panic!("a bad Once was accepted");
            };
            assert_eq!(e.code, ErrorCode::Protocol, "{e:?}");
        }
    }

    fn id(role: Role, name: &str) -> Identity {
        Identity {
            role,
            name: name.into(),
        }
    }

    fn config() -> Config {
        toml::from_str(
            "listen = \"127.0.0.1:1\"\nmeta_dir = \"m\"\n[tls]\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n",
        )
        .unwrap()
    }

    #[test]
    fn authorisation_follows_the_certificate_role() {
        let admin = id(Role::Admin, "admin");
        let user = id(Role::User, "alice");
        let dn = id(Role::Datanode, "dn-1");
        let nn = id(Role::Namenode, "namenode");
        let hb = Request::Datanode(DatanodeToNamenode::CorruptReplicas { blocks: vec![] });
        assert!(authorise(&hb, &dn).is_ok());
        for who in [&admin, &user, &nn] {
            assert!(authorise(&hb, who).is_err(), "{who:?} acting as a datanode");
        }
        let stat = Request::Client(ClientToNamenode::Stat {
            path: "/".into(),
            blocks: false,
        });
        let mkdir = Request::Client(ClientToNamenode::Mkdir {
            path: "/x".into(),
            parents: false,
            mode: 0o755,
        });
        assert!(
            authorise(&stat, &dn).is_ok(),
            "datanodes may look things up"
        );
        assert!(authorise(&mkdir, &dn).is_err());
        assert!(authorise(&mkdir, &nn).is_err());
        assert!(authorise(&mkdir, &user).is_ok());
        for admin_only in [
            ClientToNamenode::Backup,
            ClientToNamenode::SafeMode {
                action: SafeModeAction::Leave,
            },
            ClientToNamenode::Decommission {
                datanode: "dn-1".into(),
                on: true,
            },
            ClientToNamenode::ApprovePlugin {
                hash: lode_protocol::Blake3Cv([0; 32]),
            },
            ClientToNamenode::ChangeNamenodes {
                change: lode_protocol::messages::NamenodeChange::Remove {
                    name: "nn-1".into(),
                },
            },
        ] {
            let r = Request::Client(admin_only);
            assert!(authorise(&r, &admin).is_ok());
            let e = authorise(&r, &user).unwrap_err();
            assert_eq!(e.code, ErrorCode::PermissionDenied);
        }
        let get = Request::Client(ClientToNamenode::SafeMode {
            action: SafeModeAction::Get,
        });
        assert!(authorise(&get, &user).is_ok());
    }

    #[test]
    fn validation_normalises_fills_defaults_and_binds_sessions() {
        let cfg = config();
        let user = id(Role::User, "alice");
        let other = id(Role::User, "bob");
        let create = |session| ClientToNamenode::Create {
            path: "//a/./b/".into(),
            overwrite: false,
            replication: None,
            block_size: None,
            session,
            mode: 0o644,
            first_block: false,
        };
        let (v, _) = validate(create(SessionId(5)), &user, &cfg).unwrap();
        let ClientToNamenode::Create {
            path,
            replication,
            block_size,
            session,
            ..
        } = v
        else {
            panic!("{v:?}")
        };
        assert_eq!(path, "/a/b");
        assert_eq!(replication, Some(cfg.replication_default));
        assert_eq!(block_size, Some(cfg.block_size_default));
        let (
            ClientToNamenode::Create {
                session: theirs, ..
            },
            _,
        ) = validate(create(SessionId(5)), &other, &cfg).unwrap()
        else {
            panic!()
        };
        assert_ne!(
            session, theirs,
            "the same session id is another session for another certificate"
        );
        assert_ne!(session, SessionId(5));
        for bad in [
            ClientToNamenode::Mkdir {
                path: "/a/../b".into(),
                parents: false,
                mode: 0o755,
            },
            ClientToNamenode::SetReplication {
                path: "/a".into(),
                replication: 0,
            },
            ClientToNamenode::Create {
                path: "/a".into(),
                overwrite: false,
                replication: Some(3),
                block_size: Some(1000),
                session: SessionId(1),
                mode: 0o644,
                first_block: true,
            },
            ClientToNamenode::AddPlugin {
                hash: lode_protocol::Blake3Cv([0; 32]),
                name: "no spaces".into(),
                path: "/p".into(),
            },
        ] {
            assert!(validate(bad.clone(), &user, &cfg).is_err(), "{bad:?}");
        }
        let abandon = ClientToNamenode::AbandonFile {
            inode: InodeId(3),
            session: SessionId(9),
        };
        assert_ne!(validate(abandon.clone(), &user, &cfg).unwrap().0, abandon);
    }
}
