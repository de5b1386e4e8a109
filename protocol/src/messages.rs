//! One message enum per direction, one variant per request or reply. New variants go at the end;
//! removed tags are never reused.

use serde::{Deserialize, Serialize};

use crate::ids::{Blake3Cv, BlockId, InodeId, SessionId};
use crate::token::{BlockToken, Receipt, TokenKey};

/// A datanode as clients and peers reach it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// The datanode's name, as in its certificate (`dn-1`).
    pub name: String,
    /// Its data address (`127.0.0.1:9870`).
    pub addr: String,
}

/// A block of a file with where it lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocatedBlock {
    /// Block id.
    pub id: BlockId,
    /// Offset of the block in the file.
    pub offset: u64,
    /// Length of the block in bytes.
    pub len: u64,
    /// The block's BLAKE3 chaining value, once committed.
    pub cv: Option<Blake3Cv>,
    /// Live replica holders, best first.
    pub locations: Vec<Target>,
    /// What opens the block on its datanodes ([`crate::token`]): read for a file being read,
    /// write along `locations` for a block being written.
    pub token: Option<BlockToken>,
}

/// Whether an entry is a file or a directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Directory,
}

/// What `stat` and `ls` show of an entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStatus {
    /// Absolute normalised path.
    pub path: String,
    /// File or directory.
    pub kind: EntryKind,
    /// Bytes (0 for directories).
    pub size: u64,
    /// Target replica count (0 for directories).
    pub replication: u8,
    /// Block size (0 for directories).
    pub block_size: u64,
    /// Last modification, milliseconds since the Unix epoch.
    pub mtime_ms: u64,
    /// False while a writer holds the file open.
    pub complete: bool,
    /// The blocks, when asked for.
    pub blocks: Vec<LocatedBlock>,
    /// The owning user.
    pub owner: String,
    /// The owning group.
    pub group: String,
    /// Permission bits and the sticky bit ([`crate::perm`]).
    pub mode: u16,
}

/// A block's length and value as the writer committed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommittedBlock {
    /// Block id.
    pub id: BlockId,
    /// Bytes written.
    pub len: u64,
    /// Chaining value of the whole block.
    pub cv: Blake3Cv,
}

/// A replica as a datanode reports it, and as the namenode names one to delete: its id, its length
/// and its block value (merged from the piece values in its sidecar). The namenode counts a replica
/// only when length and value equal the committed block's; a delete command removes a replica only
/// when both still match, so it can never hit a newer replica stored under the same id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedBlock {
    /// Block id.
    pub id: BlockId,
    /// Length on disk.
    pub len: u64,
    /// The block's BLAKE3 chaining value, merged from its sidecar's piece values.
    pub cv: Blake3Cv,
}

/// Requests from clients (users and admins) to the namenode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientToNamenode {
    /// Create a directory (and its parents with `parents`) with `mode` (the umask already taken
    /// off).
    Mkdir {
        path: String,
        parents: bool,
        mode: u16,
    },
    /// List a directory (or show a file as a one-entry listing).
    List { path: String },
    /// Show one entry; with `blocks`, its blocks and their locations.
    Stat { path: String, blocks: bool },
    /// Delete a file or directory.
    Delete { path: String, recursive: bool },
    /// Rename; into a directory if `dst` is one.
    Rename { src: String, dst: String },
    /// Create a file for writing and take its lease.
    Create {
        path: String,
        overwrite: bool,
        replication: Option<u8>,
        block_size: Option<u64>,
        session: SessionId,
        /// Permission bits, the umask already taken off.
        mode: u16,
        /// Also allocate the first block (as `AddBlock` would), saving a round trip for a file
        /// that has data; the reply's `first` holds it, or is empty if it could not be allocated
        /// (the file is created all the same, and `AddBlock` says why).
        first_block: bool,
    },
    /// Commit the previous block (if any) and allocate the next one with its pipeline.
    AddBlock {
        inode: InodeId,
        session: SessionId,
        previous: Option<CommittedBlock>,
        /// The datanodes' receipts for `previous` from the pipeline's acknowledgement.
        receipts: Vec<Receipt>,
        exclude: Vec<String>,
    },
    /// Give up a block whose pipeline failed.
    AbandonBlock {
        inode: InodeId,
        session: SessionId,
        block: BlockId,
    },
    /// Commit the last block and close the file.
    Complete {
        inode: InodeId,
        session: SessionId,
        last: Option<CommittedBlock>,
        /// The datanodes' receipts for `last` from the pipeline's acknowledgement.
        receipts: Vec<Receipt>,
        size: u64,
    },
    /// Keep this session's leases alive.
    RenewLease { session: SessionId },
    /// Space used under a path.
    Du { path: String },
    /// Cluster overview (used for readiness and `admin report`).
    Report,
    /// A replica failed its checksum on read.
    ReportBadReplica { block: BlockId, datanode: String },
    /// Give up writing a file: it is deleted if this session still writes it.
    AbandonFile { inode: InodeId, session: SessionId },
    /// Register a plugin library already stored in Lode at `path` under its BLAKE3 `hash`.
    /// Approved at once when an admin adds it.
    AddPlugin {
        hash: Blake3Cv,
        name: String,
        path: String,
    },
    /// Every registered plugin.
    ListPlugins,
    /// Approve a plugin (admins only).
    ApprovePlugin { hash: Blake3Cv },
    /// Look a plugin up by hash (hex) or by name (the newest with that name).
    FindPlugin { key: String },
    /// Change the target replica count of a file, or of every file under a directory.
    SetReplication { path: String, replication: u8 },
    /// Block health of a file or of every file under a directory.
    Fsck { path: String },
    /// Read or change safe mode (changes need an admin certificate).
    SafeMode { action: SafeModeAction },
    /// Start (`on`) or undo draining a datanode (admins only).
    Decommission { datanode: String, on: bool },
    /// A consistent copy of the namespace metadata (admins only); the bytes follow the reply.
    Backup,
    /// Change the owner (superusers only) and/or the group of an entry, or of everything under
    /// it with `recursive`.
    SetOwner {
        path: String,
        owner: Option<String>,
        group: Option<String>,
        recursive: bool,
    },
    /// Change the mode of an entry, or of everything under it with `recursive`.
    SetMode {
        path: String,
        change: crate::perm::ModeChange,
        recursive: bool,
    },
    /// Read the groups from the namenode's config again (admins only).
    RefreshGroups,
    /// Set a directory's name and/or space quota, keeping a limit not given; with `clear`, remove
    /// both (admins only).
    SetQuota {
        path: String,
        names: Option<u64>,
        bytes: Option<u64>,
        clear: bool,
    },
    /// What the tree at a path holds, against its quotas (`count -q`).
    Count { path: String },
    /// `rm`: move an entry into the caller's trash (`/user/<name>/.Trash/Current/<path>`), or
    /// delete it where the trash is off or it is in the trash already. Answered with `Trashed`.
    Trash { path: String, recursive: bool },
    /// Empty the caller's trash.
    Expunge,
    /// Set an entry's modification time (`touch`): to `mtime_ms`, or to the namenode's clock.
    SetTimes { path: String, mtime_ms: Option<u64> },
    /// Add a member to the namenode group or remove one (admins only; answered with `Ok` once
    /// the new membership is committed).
    ChangeNamenodes { change: NamenodeChange },
    /// A change sent with an id that every retry of it repeats: a namenode that committed it
    /// before answers with the first answer and changes nothing (for the time its
    /// `retry_cache_ms` keeps answers). `request` is the change, a postcard-encoded
    /// `ClientToNamenode` that is not itself a `Once`: bytes rather than a nested value, so that
    /// decoding a frame never recurses (a chain of nested requests would overflow the stack).
    Once {
        id: crate::RequestId,
        request: Vec<u8>,
    },
}

impl ClientToNamenode {
    /// `request` sent as change `id` (see [`ClientToNamenode::Once`]).
    pub fn once(id: crate::RequestId, request: &ClientToNamenode) -> ClientToNamenode {
        ClientToNamenode::Once {
            id,
            request: postcard::to_stdvec(request).unwrap_or_default(),
        }
    }

    /// Whether the request changes the namespace or the cluster through the namenode's writer
    /// (a client sends such a request with a request id, in a [`ClientToNamenode::Once`]).
    pub fn is_change(&self) -> bool {
        use ClientToNamenode as C;
        matches!(
            self,
            C::Mkdir { .. }
                | C::Create { .. }
                | C::AddBlock { .. }
                | C::AbandonBlock { .. }
                | C::Complete { .. }
                | C::AbandonFile { .. }
                | C::Delete { .. }
                | C::Rename { .. }
                | C::SetReplication { .. }
                | C::SetOwner { .. }
                | C::SetMode { .. }
                | C::SetTimes { .. }
                | C::SetQuota { .. }
                | C::Trash { .. }
                | C::Expunge
                | C::AddPlugin { .. }
                | C::ApprovePlugin { .. }
                | C::Decommission { .. }
        )
    }
}

/// A change of the namenode group's membership.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NamenodeChange {
    /// Add the namenode whose certificate is named `name`, serving at `addr`, as member `id`:
    /// first as a learner until it has caught up (from a snapshot, if the log it needs is gone),
    /// then as a voter.
    Add { id: u64, name: String, addr: String },
    /// Remove the member named `name`.
    Remove { name: String },
}

/// What to do with safe mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SafeModeAction {
    /// Report it.
    Get,
    /// Turn it on: refuse namespace changes until an admin leaves it.
    Enter,
    /// Turn it off.
    Leave,
}

/// Block health under a path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsckReport {
    /// Files examined.
    pub files: u64,
    /// Blocks examined.
    pub blocks: u64,
    /// Blocks with fewer live replicas than their target (but at least one).
    pub under_replicated: u64,
    /// Blocks with no live replica.
    pub missing: u64,
    /// Blocks whose only known replicas are corrupt.
    pub corrupt: u64,
    /// Every block that is not healthy.
    pub problems: Vec<FsckProblem>,
}

/// One unhealthy block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsckProblem {
    /// The file.
    pub path: String,
    /// The block.
    pub block: BlockId,
    /// `under_replicated`, `missing` or `corrupt`.
    pub state: String,
    /// Live healthy replica holders.
    pub locations: Vec<String>,
}

/// Replies from the namenode to clients.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NamenodeReply {
    /// Done, nothing to return.
    Ok,
    /// One entry.
    Status(FileStatus),
    /// A directory listing, sorted by name.
    Listing(Vec<FileStatus>),
    /// A file was created.
    Created {
        inode: InodeId,
        replication: u8,
        block_size: u64,
        lease_ms: u64,
        /// The first block, when asked for and allocated.
        first: Option<LocatedBlock>,
    },
    /// A block was allocated.
    Block(LocatedBlock),
    /// Space usage.
    Usage {
        files: u64,
        directories: u64,
        bytes: u64,
        stored_bytes: u64,
    },
    /// Cluster overview.
    Report(ClusterReport),
    /// Registered plugins.
    Plugins(Vec<PluginRecord>),
    /// One plugin.
    Plugin(PluginRecord),
    /// Block health.
    Fsck(FsckReport),
    /// Safe mode state: on or off, and blocks with a reported replica out of all blocks.
    SafeMode { on: bool, reported: u64, total: u64 },
    /// A metadata backup of `len` bytes follows as raw stream data; `hash` is its BLAKE3 hash.
    BackupStart {
        len: u64,
        hash: Blake3Cv,
        last_applied: u64,
    },
    /// More entries of the `Listing` that opened this reply (see [`crate::paging`]).
    ListingMore(Vec<FileStatus>),
    /// More blocks of the `Status` that opened this reply.
    BlocksMore(Vec<LocatedBlock>),
    /// More problems of the `Fsck` report that opened this reply.
    FsckMore(Vec<FsckProblem>),
    /// The answer to `Count`: the tree's directories (itself included) and files, bytes, and
    /// its quotas (`None`: none set) with what it uses against them (bytes times replication, a
    /// block being written counted whole).
    Count {
        dirs: u64,
        files: u64,
        bytes: u64,
        name_quota: Option<u64>,
        space_quota: Option<u64>,
        names_used: u64,
        space_used: u64,
    },
    /// The answer to `Trash`: where the entry went (`None`: it was deleted).
    Trashed { to: Option<String> },
}

/// A registered plugin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginRecord {
    /// BLAKE3 hash of the library: its identity.
    pub hash: Blake3Cv,
    /// Its name (`lode_plugin_name()` unless the adder chose one).
    pub name: String,
    /// Where the library is stored in Lode.
    pub path: String,
    /// Who added it (certificate name).
    pub added_by: String,
    /// Whether datanodes may run it.
    pub approved: bool,
    /// When it was added, ms since the epoch.
    pub added_ms: u64,
}

/// One scan task: run a plugin over a split of one block on a datanode holding it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRequest {
    /// The plugin's hash (it must be approved).
    pub plugin: Blake3Cv,
    /// Where the plugin library is stored in Lode.
    pub plugin_path: String,
    /// The task's arguments (a JSON object of strings).
    pub args_json: String,
    /// The file being scanned (passed to the plugin as `_path`).
    pub path: String,
    /// The block to read locally.
    pub block: LocatedBlock,
    /// The split `[start, end)` within the block.
    pub start: u64,
    /// End of the split within the block.
    pub end: u64,
    /// The blocks after this one (line mode reads into them to finish its last record).
    pub following: Vec<LocatedBlock>,
}

/// What a task produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskResult {
    /// The plugin's partial result.
    pub partial: Vec<u8>,
    /// Bytes read from this datanode's disk.
    pub bytes_read_local: u64,
    /// Bytes fetched from other datanodes (to finish a record, or the plugin library on a cache miss).
    pub bytes_fetched_remote: u64,
    /// Time the task took on the datanode.
    pub elapsed_ms: u64,
}

/// A datanode's state as the namenode sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatanodeReport {
    /// Name from its certificate.
    pub name: String,
    /// `live`, `stale` or `dead`.
    pub state: String,
    /// Data address.
    pub addr: String,
    /// Milliseconds since its last heartbeat.
    pub last_heartbeat_ms: u64,
    /// Replicas it holds.
    pub blocks: u64,
    /// Total bytes of its data dirs' file systems.
    pub capacity: u64,
    /// Bytes of block data it stores.
    pub used: u64,
    /// Bytes still free on its data dirs.
    pub remaining: u64,
    /// Data dirs it took out of service after disk errors.
    pub failed_volumes: u32,
    /// Plugin sandbox protections in force for its tasks (`rlimits`, `identity`, `no_capabilities`,
    /// `no_new_privs`, `landlock`, `landlock_net`, `landlock_scope`, `seccomp`).
    pub sandbox: Vec<String>,
    /// Required protections its kernel lacks; while any is listed it refuses to run plugins.
    pub sandbox_missing: Vec<String>,
    /// Its metrics address, if it serves HTTP.
    pub http_addr: Option<String>,
}

/// Cluster overview.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterReport {
    /// The namenode's status page and metrics address, if it serves HTTP.
    pub http_addr: Option<String>,
    /// Whether the namenode refuses namespace changes.
    pub safemode: bool,
    /// Blocks of complete files with fewer live replicas than their target (but at least one).
    pub under_replicated: u64,
    /// Blocks of complete files with no live replica.
    pub missing: u64,
    /// Replicas reported corrupt and not yet removed.
    pub corrupt: u64,
    /// Every datanode that registered since the namenode started.
    pub datanodes: Vec<DatanodeReport>,
    /// Every namenode of the group (the one namenode, when there is no group), as the one that
    /// answers sees them.
    pub namenodes: Vec<NamenodeReport>,
}

/// A namenode's place in its group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamenodeReport {
    /// Name from its certificate.
    pub name: String,
    /// Its QUIC address.
    pub addr: String,
    /// `leader`, `follower`, `candidate`, `learner`, or `down` when it did not answer; a lone
    /// namenode is its own `leader`.
    pub role: String,
    /// Its Raft term (0 for a lone namenode).
    pub term: u64,
    /// The index of the last entry in its log (a lone namenode's last edit).
    pub last_index: u64,
    /// The index of the last entry it applied to its namespace. For a member that is `down`,
    /// these three are what it last answered, or 0.
    pub applied_index: u64,
}

/// A datanode's disks as it reports them in every registration and heartbeat.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Space {
    /// Total bytes of its healthy data dirs' file systems.
    pub capacity: u64,
    /// Bytes of block data it stores.
    pub used: u64,
    /// Bytes a new block may still use: free space on healthy data dirs, less the configured
    /// reserve and the space promised to blocks being written.
    pub remaining: u64,
    /// The largest block it can take now: the room in the data dir with the most (a block never
    /// spans data dirs).
    pub block_room: u64,
    /// Data dirs taken out of service after disk errors.
    pub failed_volumes: u32,
}

/// Messages from a datanode to the namenode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DatanodeToNamenode {
    /// Join (or rejoin) with a full block report: its first page, `last` when no `ReportMore`
    /// follows. A node registered and alive sends one again every `full_report_interval_secs`;
    /// the namenode then compares it with what it knew of the node and forgets, after the last
    /// page, only the replicas the report left out.
    Register {
        addr: String,
        space: Space,
        blocks: Vec<ReportedBlock>,
        last: bool,
    },
    /// Periodic liveness, with replicas finalized or deleted since the last one.
    Heartbeat {
        space: Space,
        received: Vec<ReportedBlock>,
        deleted: Vec<BlockId>,
    },
    /// What this datanode offers besides data (sent after registering): the plugin sandbox
    /// protections its tasks get, the required ones its kernel lacks (it then runs no plugins),
    /// and its metrics address.
    Info {
        protections: Vec<String>,
        http_addr: Option<String>,
        missing: Vec<String>,
    },
    /// Local replicas that failed their checksums (found by the block scanner).
    CorruptReplicas { blocks: Vec<BlockId> },
    /// More of the full block report that the last `Register` opened (a report is sent in pages
    /// of at most [`crate::paging::PAGE_BYTES`]); answered with `Registered`.
    ReportMore {
        blocks: Vec<ReportedBlock>,
        last: bool,
    },
}

/// Replies from the namenode to a datanode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NamenodeToDatanode {
    /// Registration accepted; replicas nobody needs (unknown or stale) are to be deleted; `keys`
    /// are the block token keys alive now.
    Registered {
        delete: Vec<ReportedBlock>,
        keys: Vec<TokenKey>,
    },
    /// Heartbeat accepted; `reregister` asks for a full block report.
    HeartbeatReply {
        reregister: bool,
        delete: Vec<BlockId>,
    },
    /// Noted.
    Ack,
    /// Heartbeat accepted, with work: `reregister` asks for a full block report, `delete` lists
    /// replicas to remove (each only if its length and value still match), `copy` lists replicas to
    /// send to other datanodes (re-replication). `term` is the namenode group's term in which
    /// the sender leads (0 for a namenode alone): a datanode carries out no delete or copy from a
    /// term older than one it has seen, so a deposed leader's commands are refused.
    Commands {
        reregister: bool,
        delete: Vec<ReportedBlock>,
        copy: Vec<CopyCommand>,
        keys: Vec<TokenKey>,
        term: u64,
    },
}

/// Copy a local replica to other datanodes (in pipeline order).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyCommand {
    /// The block.
    pub block: BlockId,
    /// Where to copy it.
    pub targets: Vec<Target>,
    /// Opens the targets for the copy (none for a verification, which has no targets).
    pub token: Option<BlockToken>,
}

/// Requests to a datanode, from clients or from the previous datanode of a pipeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DatanodeRequest {
    /// Store a block, then forward it to `downstream` (in order). Pieces follow.
    WriteBlock {
        block: BlockId,
        file_offset: u64,
        block_size: u64,
        downstream: Vec<Target>,
        token: Option<BlockToken>,
    },
    /// Send whole verified pieces covering `[offset, offset + len)` of the block.
    ReadBlock {
        block: BlockId,
        offset: u64,
        len: u64,
        token: Option<BlockToken>,
    },
    /// Send the piece values of a block (from its sidecar, without reading the data).
    BlockChecksums {
        block: BlockId,
        token: Option<BlockToken>,
    },
    /// Run a scan task against a local replica.
    RunTask(Box<TaskRequest>),
}

/// Replies from a datanode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DatanodeReply {
    /// The write finished: names of the nodes that fsynced the block, and those that failed. A node
    /// after a failed one was never reached and is in neither list (it is not to blame).
    WriteAck {
        stored: Vec<String>,
        failed: Vec<String>,
        /// A signed receipt from each datanode that stored the block and held a key to sign with.
        receipts: Vec<Receipt>,
    },
    /// Pieces follow, the first one starting at `first_piece_offset` in the block. `pieces` holds
    /// the values of every piece of the block, so the reader can check that they merge to the block
    /// value the namenode recorded before trusting any of them.
    ReadStart {
        block_len: u64,
        first_piece_offset: u64,
        pieces: Vec<Blake3Cv>,
    },
    /// Piece values of a block.
    Checksums {
        block_len: u64,
        pieces: Vec<Blake3Cv>,
    },
    /// A scan task finished.
    TaskDone(TaskResult),
}

/// Which call of the namenode group's consensus a [`PeerPart`] belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerRpc {
    /// Log entries (or a heartbeat) from the leader.
    AppendEntries,
    /// A candidate asks for a vote.
    Vote,
    /// A chunk of a snapshot from the leader.
    InstallSnapshot,
    /// A member asks another for its [`NamenodeReport`] (the request is empty).
    Status,
}

/// One frame of a message between members of the namenode group. The message is the consensus
/// library's own request or reply, encoded with postcard and cut into parts of at most
/// [`PEER_PART_BYTES`]; the receiver joins them up to [`PEER_MESSAGE_MAX`] and no further.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerPart {
    /// The call.
    pub rpc: PeerRpc,
    /// These bytes of the message.
    pub bytes: Vec<u8>,
    /// Whether this is the message's last part.
    pub last: bool,
}

/// Most bytes in one [`PeerPart`] (below the frame limit, with room for the rest of the frame).
pub const PEER_PART_BYTES: usize = 3 << 20;
/// Most bytes of one message between members of the namenode group, summed over its parts.
pub const PEER_MESSAGE_MAX: usize = 64 << 20;
