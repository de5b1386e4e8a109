//! [`Client`]: the file-system API over the namenode and datanodes. Namespace calls go to the
//! namenode; data moves between this process and datanodes directly ([`crate::put`], [`crate::get`]).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lode_protocol::checksum::{self, PIECE_BYTES};
use lode_protocol::frame::kind;
use lode_protocol::messages::{
    ClientToNamenode, ClusterReport, DatanodeReply, DatanodeRequest, EntryKind, FileStatus,
    NamenodeReply,
};
use lode_protocol::net::{self, Pool, NAMENODE_SERVER_NAME};
use lode_protocol::{Blake3Cv, BlockId, RequestId, SessionId};

use crate::config::ClientConfig;
use crate::error::Error;

/// How long to wait for a connection to be set up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request looks for the leader of a namenode group (an election takes a few seconds
/// at most with the default timings).
const FAILOVER_WAIT: Duration = Duration::from_secs(15);
/// How long a connection to a member of a namenode group may take before the next is tried.
const MEMBER_CONNECT_TIMEOUT: Duration = Duration::from_millis(750);

/// What a tree holds, against its quotas (`None`: no quota set).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Count {
    /// Directories, the tree's root included.
    pub dirs: u64,
    /// Files.
    pub files: u64,
    /// Bytes of the files.
    pub bytes: u64,
    /// Most files and directories.
    pub name_quota: Option<u64>,
    /// Most bytes times replication.
    pub space_quota: Option<u64>,
    /// Files and directories counted against the name quota.
    pub names_used: u64,
    /// Bytes times replication counted against the space quota (a block being written counts whole).
    pub space_used: u64,
}

/// Space used under a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    /// Files.
    pub files: u64,
    /// Directories (including the path itself if it is one).
    pub directories: u64,
    /// Logical bytes.
    pub bytes: u64,
    /// Bytes times each file's replication.
    pub stored_bytes: u64,
}

/// A connection to a Lode cluster.
pub struct Client {
    pub(crate) pool: Arc<Pool>,
    /// The namenode requests go to: the one namenode, or the group's leader as last seen.
    pub(crate) namenode: Arc<Mutex<String>>,
    /// Every namenode the config names.
    members: Vec<String>,
    pub(crate) session: SessionId,
    pub(crate) config: ClientConfig,
    /// Datanodes that failed a request lately; tried last.
    pub(crate) suspects: Suspects,
    /// Counts the changes sent (each one's request id, with the session as the client's part).
    calls: std::sync::atomic::AtomicU64,
}

/// Names of datanodes that failed a request lately, shared by concurrent reads.
#[derive(Clone, Default)]
pub(crate) struct Suspects(Arc<Mutex<HashSet<String>>>);

impl Suspects {
    pub(crate) fn mark(&self, name: &str, suspect: bool) {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if suspect {
            s.insert(name.to_string());
        } else {
            s.remove(name);
        }
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name)
    }
}

impl Client {
    /// Sets up the QUIC endpoint and checks that the namenode answers.
    pub async fn connect(config: ClientConfig) -> Result<Client, Error> {
        let members = config.namenode_addrs();
        let first = members
            .first()
            .cloned()
            .ok_or_else(|| Error::Invalid("the client config names no namenode".into()))?;
        let addr = resolve(&first).await?;
        let bind: SocketAddr = if addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        }
        .parse()
        .expect("literal address");
        let client_cfg = net::client_config(&config.tls, &config.transport)?;
        let endpoint = net::endpoint(bind, None, client_cfg, &config.transport)?;
        let client = Client {
            pool: Arc::new(Pool::new(endpoint, CONNECT_TIMEOUT)),
            namenode: Arc::new(Mutex::new(first.clone())),
            members,
            session: SessionId(rand::random()),
            config,
            suspects: Suspects::default(),
            calls: std::sync::atomic::AtomicU64::new(0),
        };
        if client.members.len() > 1 {
            // Requests find a member that answers, and then the leader.
            return Ok(client);
        }
        client
            .pool
            .get(&first, NAMENODE_SERVER_NAME)
            .await
            .map_err(|e| Error::rpc(format!("cannot reach the namenode at {first}"), e))?;
        Ok(client)
    }

    /// A connection to namenode `addr`. A member of a group that does not answer within
    /// [`MEMBER_CONNECT_TIMEOUT`] is given up for the next (it may be the leader just lost); the
    /// time allowed grows with each round over the members (`attempt` counts tries), so a
    /// slow machine still gets its handshakes done.
    async fn member_conn(
        &self,
        addr: &str,
        attempt: u32,
    ) -> Result<quinn::Connection, net::RpcError> {
        if self.members.len() < 2 {
            return self.pool.get(addr, NAMENODE_SERVER_NAME).await;
        }
        let rounds = attempt / self.members.len() as u32;
        let allowed = MEMBER_CONNECT_TIMEOUT * (1 << rounds.min(3));
        tokio::time::timeout(allowed, self.pool.get(addr, NAMENODE_SERVER_NAME))
            .await
            .unwrap_or_else(|_| {
                Err(net::RpcError::Connect(format!(
                    "{addr}: no answer within {allowed:?}"
                )))
            })
    }

    /// The namenode requests go to now (the group's leader, as far as this client knows).
    pub(crate) fn leader(&self) -> String {
        self.namenode
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn follow(&self, addr: &str) {
        *self.namenode.lock().unwrap_or_else(|p| p.into_inner()) = addr.to_string();
    }

    /// After a refusal by a member that is not the leader: the leader it named, else the next
    /// member in the config.
    fn next_namenode(&self, refusal: Option<&str>) {
        let named = refusal
            .and_then(|m| m.rsplit_once(" at "))
            .map(|(_, addr)| addr.trim().to_string())
            .filter(|a| !a.is_empty());
        let next = match named {
            Some(a) => a,
            None => {
                let now = self.leader();
                let i = self.members.iter().position(|m| *m == now).unwrap_or(0);
                self.members[(i + 1) % self.members.len()].clone()
            }
        };
        self.follow(&next);
    }

    /// Closes every connection of this client now, so that servers free them at once rather than
    /// after their idle timeout (a server bounds the connections of one certificate), and waits
    /// briefly for the peers to hear it. The returned future can outlive the client.
    pub fn close(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let endpoint = self.pool.endpoint().clone();
        async move {
            endpoint.close(0u32.into(), b"done");
            let _ =
                tokio::time::timeout(std::time::Duration::from_millis(250), endpoint.wait_idle())
                    .await;
        }
    }

    fn namenode_ctx(&self) -> String {
        format!("namenode at {}", self.leader())
    }

    async fn namenode_conn(&self) -> Result<quinn::Connection, Error> {
        self.pool
            .get(&self.leader(), NAMENODE_SERVER_NAME)
            .await
            .map_err(|e| Error::rpc(self.namenode_ctx(), e))
    }

    /// One request to the namenode. With a group, a member that is not the leader refuses the
    /// request untouched, and a member that cannot be reached never got it: both are asked of
    /// the next member (the leader named, else the next in the config) until [`FAILOVER_WAIT`]
    /// runs out, as an election takes a moment.
    pub(crate) async fn nn(&self, req: &ClientToNamenode) -> Result<NamenodeReply, Error> {
        // A change goes with a request id that its retries repeat, so a retry of a change whose
        // first try committed (the reply lost with the leader) gets the first answer and does
        // not change anything twice.
        let once;
        let req = if req.is_change() {
            let call = self
                .calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            once = ClientToNamenode::once(
                RequestId {
                    client: self.session.0,
                    call,
                },
                req,
            );
            &once
        } else {
            req
        };
        let group = self.members.len() > 1;
        let deadline = tokio::time::Instant::now() + FAILOVER_WAIT;
        let mut pause = Duration::from_millis(25);
        let mut attempt = 0;
        // The last refusal a member gave: when time runs out on a member that cannot be reached,
        // what a live member said explains more (no majority, say) than a timeout does.
        let mut refused: Option<(String, lode_protocol::WireError)> = None;
        loop {
            let addr = self.leader();
            let ctx = || format!("namenode at {addr}");
            let in_time = || tokio::time::Instant::now() < deadline;
            let give_up =
                |e: net::RpcError, refused: Option<(String, lode_protocol::WireError)>| {
                    match refused {
                        Some((at, w)) if group => {
                            Error::rpc(format!("namenode at {at}"), net::RpcError::Remote(w))
                        }
                        _ => Error::rpc(ctx(), e),
                    }
                };
            let refusal = match self.member_conn(&addr, attempt).await {
                Ok(conn) => match net::call_namenode(&conn, req).await {
                    Ok(r) => return Ok(r),
                    // A member that does not lead, or a leader that lost its majority before
                    // the change committed: the next leader takes it.
                    Err(net::RpcError::Remote(e))
                        if group
                            && in_time()
                            && matches!(
                                e.code,
                                lode_protocol::ErrorCode::NotLeader
                                    | lode_protocol::ErrorCode::Unavailable
                            ) =>
                    {
                        let hint = (e.code == lode_protocol::ErrorCode::NotLeader)
                            .then(|| e.message.clone());
                        refused = Some((addr.clone(), e));
                        hint
                    }
                    Err(net::RpcError::Remote(e)) => {
                        return Err(Error::rpc(ctx(), net::RpcError::Remote(e)))
                    }
                    // The connection failed on the way: in a group, the member may be the
                    // leader just lost; the request (with its id) goes to the next.
                    Err(e) => {
                        self.pool.forget(&addr, NAMENODE_SERVER_NAME).await;
                        if !(group && in_time()) {
                            return Err(give_up(e, refused));
                        }
                        tracing::debug!("{}: {e}", ctx());
                        None
                    }
                },
                Err(e) if group && in_time() => {
                    tracing::debug!("{}: {e}", ctx());
                    None
                }
                Err(e) => return Err(give_up(e, refused)),
            };
            self.next_namenode(refusal.as_deref());
            attempt += 1;
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(400));
        }
    }

    /// One request to the namenode whose answer is a plain `Ok`.
    pub(crate) async fn nn_ok(&self, req: &ClientToNamenode) -> Result<(), Error> {
        expect_ok(self.nn(req).await?)
    }

    /// Creates a directory (and missing parents with `parents`).
    pub async fn mkdir(&self, path: &str, parents: bool) -> Result<(), Error> {
        self.nn_ok(&ClientToNamenode::Mkdir {
            path: path.into(),
            parents,
            mode: self.config.new_mode(true),
        })
        .await
    }

    /// Changes the owner (superusers only) and/or the group of an entry, or of everything under it
    /// with `recursive`.
    pub async fn set_owner(
        &self,
        path: &str,
        owner: Option<&str>,
        group: Option<&str>,
        recursive: bool,
    ) -> Result<(), Error> {
        self.nn_ok(&ClientToNamenode::SetOwner {
            path: path.into(),
            owner: owner.map(str::to_string),
            group: group.map(str::to_string),
            recursive,
        })
        .await
    }

    /// Changes the mode of an entry, or of everything under it with `recursive`.
    pub async fn set_mode(
        &self,
        path: &str,
        change: lode_protocol::perm::ModeChange,
        recursive: bool,
    ) -> Result<(), Error> {
        self.nn_ok(&ClientToNamenode::SetMode {
            path: path.into(),
            change,
            recursive,
        })
        .await
    }

    /// Sets an entry's modification time to `mtime_ms`, or to the namenode's clock (`touch`).
    pub async fn set_times(&self, path: &str, mtime_ms: Option<u64>) -> Result<(), Error> {
        self.nn_ok(&ClientToNamenode::SetTimes {
            path: path.into(),
            mtime_ms,
        })
        .await
    }

    /// Sets a directory's name and/or space quota (a limit not given keeps its value), or with
    /// `clear` removes both (admins only).
    pub async fn set_quota(
        &self,
        path: &str,
        names: Option<u64>,
        bytes: Option<u64>,
        clear: bool,
    ) -> Result<(), Error> {
        self.nn_ok(&ClientToNamenode::SetQuota {
            path: path.into(),
            names,
            bytes,
            clear,
        })
        .await
    }

    /// What the tree at `path` holds, against its quotas.
    pub async fn count(&self, path: &str) -> Result<Count, Error> {
        match self
            .nn(&ClientToNamenode::Count { path: path.into() })
            .await?
        {
            NamenodeReply::Count {
                dirs,
                files,
                bytes,
                name_quota,
                space_quota,
                names_used,
                space_used,
            } => Ok(Count {
                dirs,
                files,
                bytes,
                name_quota,
                space_quota,
                names_used,
                space_used,
            }),
            other => Err(unexpected(other)),
        }
    }

    /// Makes the namenode read its groups from its config again (admins only).
    pub async fn refresh_groups(&self) -> Result<(), Error> {
        self.nn_ok(&ClientToNamenode::RefreshGroups).await
    }

    /// Lists a directory (a file lists as itself).
    pub async fn list(&self, path: &str) -> Result<Vec<FileStatus>, Error> {
        match self
            .nn(&ClientToNamenode::List { path: path.into() })
            .await?
        {
            NamenodeReply::Listing(l) => Ok(l),
            other => Err(unexpected(other)),
        }
    }

    /// Status of one entry, with its blocks and their live locations when `blocks`.
    pub async fn stat(&self, path: &str, blocks: bool) -> Result<FileStatus, Error> {
        match self
            .nn(&ClientToNamenode::Stat {
                path: path.into(),
                blocks,
            })
            .await?
        {
            NamenodeReply::Status(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// Status, or `None` if the path does not exist.
    pub async fn try_stat(&self, path: &str) -> Result<Option<FileStatus>, Error> {
        match self.stat(path, false).await {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.code() == Some(lode_protocol::ErrorCode::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Deletes a file, or a directory (non-empty only with `recursive`). Freed blocks are removed
    /// from the datanodes with their next heartbeats.
    pub async fn delete(&self, path: &str, recursive: bool) -> Result<(), Error> {
        self.nn_ok(&ClientToNamenode::Delete {
            path: path.into(),
            recursive,
        })
        .await
    }

    /// `rm`: moves an entry into the caller's trash (`/user/<name>/.Trash/Current/<path>`) and
    /// returns where it went; `None` if it was deleted (the trash is off, or it was in the
    /// trash already).
    pub async fn trash(&self, path: &str, recursive: bool) -> Result<Option<String>, Error> {
        match self
            .nn(&ClientToNamenode::Trash {
                path: path.into(),
                recursive,
            })
            .await?
        {
            NamenodeReply::Trashed { to } => Ok(to),
            other => Err(unexpected(other)),
        }
    }

    /// Empties the caller's trash.
    pub async fn expunge(&self) -> Result<(), Error> {
        self.nn_ok(&ClientToNamenode::Expunge).await
    }

    /// Renames; into `dst` if it is a directory.
    pub async fn rename(&self, src: &str, dst: &str) -> Result<(), Error> {
        self.nn_ok(&ClientToNamenode::Rename {
            src: src.into(),
            dst: dst.into(),
        })
        .await
    }

    /// Sets the target replica count of a file or of every file under a directory; the namenode
    /// adds or removes replicas in the background.
    pub async fn setrep(&self, path: &str, replication: u8) -> Result<(), Error> {
        self.nn_ok(&ClientToNamenode::SetReplication {
            path: path.into(),
            replication,
        })
        .await
    }

    /// Block health of a file or of every file under a directory.
    pub async fn fsck(&self, path: &str) -> Result<lode_protocol::messages::FsckReport, Error> {
        match self
            .nn(&ClientToNamenode::Fsck { path: path.into() })
            .await?
        {
            NamenodeReply::Fsck(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Reads or changes safe mode: (on, blocks reported, blocks).
    pub async fn safemode(
        &self,
        action: lode_protocol::messages::SafeModeAction,
    ) -> Result<(bool, u64, u64), Error> {
        match self.nn(&ClientToNamenode::SafeMode { action }).await? {
            NamenodeReply::SafeMode {
                on,
                reported,
                total,
            } => Ok((on, reported, total)),
            other => Err(unexpected(other)),
        }
    }

    /// Adds a member to the namenode group or removes one (admin only); returns once the new
    /// membership is committed.
    pub async fn change_namenodes(
        &self,
        change: lode_protocol::messages::NamenodeChange,
    ) -> Result<(), Error> {
        self.nn_ok(&ClientToNamenode::ChangeNamenodes { change })
            .await
    }

    /// Starts (`on`) or undoes draining a datanode (admin only).
    pub async fn decommission(&self, datanode: &str, on: bool) -> Result<(), Error> {
        self.nn_ok(&ClientToNamenode::Decommission {
            datanode: datanode.into(),
            on,
        })
        .await
    }

    /// Writes a consistent backup of the namenode's metadata to `file` (admin only); returns the
    /// number of bytes and the last edit it includes.
    pub async fn backup(&self, file: &std::path::Path) -> Result<(u64, u64), Error> {
        let ctx = || self.namenode_ctx();
        let conn = self.namenode_conn().await?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| Error::rpc(ctx(), e.into()))?;
        net::write_frame(
            &mut send,
            kind::CLIENT_TO_NAMENODE,
            &ClientToNamenode::Backup,
        )
        .await
        .map_err(|e| Error::rpc(ctx(), e))?;
        send.finish().map_err(|e| Error::rpc(ctx(), e.into()))?;
        let start = net::read_frame::<NamenodeReply>(&mut recv, kind::NAMENODE_REPLY)
            .await
            .map_err(|e| Error::rpc(ctx(), e))?;
        let NamenodeReply::BackupStart {
            len,
            hash,
            last_applied,
        } = start
        else {
            return Err(unexpected(start));
        };
        let bytes = recv
            .read_to_end(usize::try_from(len).unwrap_or(usize::MAX))
            .await
            .map_err(|e| Error::rpc(ctx(), net::RpcError::Stream(e.to_string())))?;
        if bytes.len() as u64 != len || blake3::hash(&bytes).as_bytes() != &hash.0 {
            return Err(Error::Corrupt(
                "backup arrived damaged (length or hash mismatch)".into(),
            ));
        }
        let tmp = file.with_extension("part");
        tokio::fs::write(&tmp, &bytes)
            .await
            .map_err(|e| Error::local(&tmp, e))?;
        tokio::fs::rename(&tmp, file)
            .await
            .map_err(|e| Error::local(file, e))?;
        Ok((len, last_applied))
    }

    /// Space used under a path.
    pub async fn du(&self, path: &str) -> Result<Usage, Error> {
        match self.nn(&ClientToNamenode::Du { path: path.into() }).await? {
            NamenodeReply::Usage {
                files,
                directories,
                bytes,
                stored_bytes,
            } => Ok(Usage {
                files,
                directories,
                bytes,
                stored_bytes,
            }),
            other => Err(unexpected(other)),
        }
    }

    /// The cluster overview.
    pub async fn report(&self) -> Result<ClusterReport, Error> {
        match self.nn(&ClientToNamenode::Report).await? {
            NamenodeReply::Report(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// The file's BLAKE3 hash (what `b3sum` prints), merged from block values without reading the
    /// data. A file of at most one piece (64 KiB) has no inner tree to merge, so its bytes are read.
    pub async fn checksum(&self, path: &str) -> Result<Blake3Cv, Error> {
        let st = self.stat(path, true).await?;
        checksum_of(self, &st).await
    }

    /// The file's BLAKE3 hash from a status fetched with blocks.
    pub async fn checksum_of_status(&self, st: &FileStatus) -> Result<Blake3Cv, Error> {
        checksum_of(self, st).await
    }

    pub(crate) fn mark_suspect(&self, name: &str, suspect: bool) {
        self.suspects.mark(name, suspect);
    }

    async fn block_checksums(
        &self,
        block: BlockId,
        targets: &[lode_protocol::messages::Target],
        token: Option<&lode_protocol::token::BlockToken>,
    ) -> Result<Vec<Blake3Cv>, Error> {
        let mut last = Error::Invalid(format!("block {block} has no live replica"));
        for t in targets {
            let attempt = async {
                let conn = self.pool.get(&t.addr, &t.name).await?;
                net::call::<_, DatanodeReply>(
                    &conn,
                    kind::DATANODE_REQUEST,
                    kind::DATANODE_REPLY,
                    &DatanodeRequest::BlockChecksums {
                        block,
                        token: token.cloned(),
                    },
                )
                .await
            };
            match attempt.await {
                Ok(DatanodeReply::Checksums { pieces, .. }) => return Ok(pieces),
                Ok(other) => last = unexpected(other),
                Err(e) => last = Error::rpc(format!("block {block} checksums from {}", t.name), e),
            }
        }
        Err(last)
    }
}

pub(crate) async fn checksum_of(client: &Client, st: &FileStatus) -> Result<Blake3Cv, Error> {
    if st.kind == EntryKind::Directory {
        return Err(Error::Invalid(format!("{}: is a directory", st.path)));
    }
    if !st.complete {
        return Err(Error::Invalid(format!(
            "{}: is still being written",
            st.path
        )));
    }
    if st.size <= PIECE_BYTES {
        let mut buf = Vec::with_capacity(st.size as usize);
        client.get_status(st, &mut buf, &|_| {}).await?;
        return Ok(Blake3Cv(*blake3::hash(&buf).as_bytes()));
    }
    if st.blocks.len() == 1 {
        let b = &st.blocks[0];
        let pieces = client
            .block_checksums(b.id, &b.locations, b.token.as_ref())
            .await?;
        if checksum::block_cv(&pieces) != b.cv {
            return Err(Error::Corrupt(format!(
                "block {}: piece values do not match the committed block value",
                b.id
            )));
        }
        return checksum::merge_leaves(&pieces, true)
            .ok_or_else(|| Error::Corrupt("empty piece list".into()));
    }
    let cvs: Option<Vec<Blake3Cv>> = st.blocks.iter().map(|b| b.cv).collect();
    let cvs = cvs.ok_or_else(|| Error::Invalid(format!("{}: has uncommitted blocks", st.path)))?;
    checksum::merge_leaves(&cvs, true)
        .ok_or_else(|| Error::Invalid(format!("{}: no blocks", st.path)))
}

fn expect_ok(r: NamenodeReply) -> Result<(), Error> {
    match r {
        NamenodeReply::Ok => Ok(()),
        other => Err(unexpected(other)),
    }
}

pub(crate) fn unexpected(r: impl std::fmt::Debug) -> Error {
    Error::Invalid(format!("unexpected reply from server: {r:?}"))
}

async fn resolve(addr: &str) -> Result<SocketAddr, Error> {
    if let Ok(a) = addr.parse() {
        return Ok(a);
    }
    tokio::net::lookup_host(addr)
        .await
        .ok()
        .and_then(|mut it| it.next())
        .ok_or_else(|| Error::Invalid(format!("cannot resolve namenode address {addr:?}")))
}
