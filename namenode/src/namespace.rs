//! The namespace: inodes and directory entries in a [`MetaStore`], the edits ([`MetaOp`]) that change
//! them, validation of requests into edits (`prepare_*`), and deterministic application (`apply`).
//!
//! Keys: `i` + inode id (8 bytes BE) -> inode record; `d` + parent id + name -> child id;
//! `m` + name -> metadata (`last_applied`, `next_ids`). Every value starts with a format version
//! byte, except the fixed-width counters.
//!
//! Ids never repeat: `next_ids` (the next inode and block id) is namespace state, advanced in the
//! same atomic batch as the edit that consumes an id, and never moved back (deleting a file or
//! abandoning a block leaves it where it is). A restart, a replay or a restore reads it back.

use std::collections::BTreeMap;
use std::sync::Arc;

use lode_protocol::messages::{CommittedBlock, EntryKind, FileStatus, LocatedBlock, PluginRecord};
use lode_protocol::{path, Blake3Cv, BlockId, ErrorCode, InodeId, RequestId, SessionId};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::perm::{Caller, Perm};
use crate::store::MetaStore;
use lode_protocol::perm::{ModeChange, EXECUTE, READ, WRITE};

/// Version byte in front of every stored value. Version 1 kept a file's block list inside its
/// inode record (rewritten whole by every `AddBlock`); version 2 keeps each block under its own
/// key; version 3 gives every inode an owner, a group and a mode. Other records are the same in
/// all three. A version-1 store is migrated when it is opened; a version-2 inode is read as owned
/// by the superuser with mode 0755 or 0644 ([`Perm::legacy`]) and written as version 3 the next
/// time it changes.
pub const FORMAT_VERSION: u8 = 3;
const FORMAT_V2: u8 = 2;
const FORMAT_V1: u8 = 1;
/// The root directory's inode.
pub const ROOT: InodeId = InodeId(1);
const LAST_APPLIED_KEY: &[u8] = b"mlast_applied";
const NEXT_IDS_KEY: &[u8] = b"mnext_ids";
/// How many directories have a quota (none: no edit walks up the tree to charge one).
const QUOTAS_KEY: &[u8] = b"mquotas";
/// The first bucket of remembered answers that may still hold any.
const REQUESTS_FROM_KEY: &[u8] = b"mrequests_from";
/// Remembered answers are filed by time in buckets of this many ms, forgotten a bucket at a time.
const REQUEST_BUCKET_MS: u64 = 10_000;

/// A directory's quotas, as HDFS has them, and what the tree under it (itself included) uses.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    /// Most files and directories, the directory itself included.
    pub names: Option<u64>,
    /// Most bytes stored, times replication; a block being written counts as a whole block.
    pub bytes: Option<u64>,
    /// Files and directories now.
    pub names_used: u64,
    /// Bytes times replication now.
    pub space_used: u64,
}

/// A block of a file as the namespace records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockMeta {
    /// Block id.
    pub id: BlockId,
    /// Committed length (0 until committed).
    pub len: u64,
    /// Committed chaining value.
    pub cv: Option<Blake3Cv>,
}

/// File or directory details.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum InodeKind {
    /// A directory; its entries are separate keys.
    Directory,
    /// A file.
    File {
        /// Target replica count.
        replication: u8,
        /// Block size.
        block_size: u64,
        /// Size once complete.
        size: u64,
        /// How many blocks it has; block `i` is stored under `block_key(id, i)`.
        block_count: u64,
        /// The session writing it, while under construction.
        writer: Option<SessionId>,
        /// While it is written to replace an existing file: the name it takes on completion.
        target_name: Option<String>,
    },
}

/// The whole namespace as stored, read once at start-up.
#[derive(Debug, Default)]
pub struct Stored {
    /// Every inode.
    pub inodes: Vec<Inode>,
    /// Each file's blocks in order, by inode.
    pub blocks: BTreeMap<InodeId, Vec<BlockMeta>>,
}

/// A version-1 inode record: the block list inside (read only to migrate a store).
#[derive(Serialize, Deserialize)]
struct InodeV1 {
    id: InodeId,
    parent: InodeId,
    name: String,
    mtime_ms: u64,
    kind: InodeKindV1,
}

#[derive(Serialize, Deserialize)]
enum InodeKindV1 {
    Directory,
    File {
        replication: u8,
        block_size: u64,
        size: u64,
        blocks: Vec<BlockMeta>,
        writer: Option<SessionId>,
        target_name: Option<String>,
    },
}

/// A version-2 inode record: no owner, group or mode.
#[derive(Serialize, Deserialize)]
struct InodeV2 {
    id: InodeId,
    parent: InodeId,
    name: String,
    mtime_ms: u64,
    kind: InodeKind,
}

/// A namespace entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inode {
    /// Its id.
    pub id: InodeId,
    /// Parent directory.
    pub parent: InodeId,
    /// Name in the parent.
    pub name: String,
    /// Last change, ms since the epoch.
    pub mtime_ms: u64,
    /// File or directory.
    pub kind: InodeKind,
    /// Owner, group and mode.
    pub perm: Perm,
}

impl Inode {
    /// Whether it is a directory.
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, InodeKind::Directory)
    }
}

/// One logged namespace edit, fully resolved (ids chosen, paths turned into inodes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaOp {
    /// New directory.
    Mkdir {
        parent: InodeId,
        name: String,
        inode: InodeId,
        mtime_ms: u64,
        perm: Perm,
    },
    /// New file under construction, replacing `replaces` if set.
    Create {
        parent: InodeId,
        name: String,
        inode: InodeId,
        replication: u8,
        block_size: u64,
        session: SessionId,
        mtime_ms: u64,
        replaces: Option<InodeId>,
        target_name: Option<String>,
        perm: Perm,
    },
    /// Commit `previous` (the current last block) and append a new block.
    AddBlock {
        inode: InodeId,
        block: BlockId,
        previous: Option<CommittedBlock>,
    },
    /// Drop the last block (its pipeline failed).
    AbandonBlock { inode: InodeId, block: BlockId },
    /// Commit the last block and close the file; with `rename`, move it onto its target name,
    /// deleting the file it replaces (if one is still there).
    Complete {
        inode: InodeId,
        last: Option<CommittedBlock>,
        size: u64,
        mtime_ms: u64,
        rename: Option<(String, Option<InodeId>)>,
    },
    /// Delete an entry and everything under it.
    Delete { inode: InodeId },
    /// Set the target replica count of files.
    SetReplication {
        files: Vec<InodeId>,
        replication: u8,
    },
    /// Start (`on`) or stop draining a datanode.
    SetDecommission { datanode: String, on: bool },
    /// Register a plugin.
    AddPlugin(PluginRecord),
    /// Approve a registered plugin.
    ApprovePlugin { hash: Blake3Cv },
    /// Move an entry.
    Rename {
        inode: InodeId,
        dst_parent: InodeId,
        dst_name: String,
        mtime_ms: u64,
    },
    /// Change the owner, the group and/or the mode of entries.
    SetAttributes {
        inodes: Vec<InodeId>,
        owner: Option<String>,
        group: Option<String>,
        mode: Option<ModeChange>,
    },
    /// Set a directory's quotas (both `None`: it has none).
    SetQuota {
        inode: InodeId,
        names: Option<u64>,
        bytes: Option<u64>,
    },
    /// Set an entry's modification time.
    SetTimes { inode: InodeId, mtime_ms: u64 },
    /// The answer the change `id` of `user` got (a postcard-encoded `NamenodeReply`), given again
    /// to its retries; logged in the same group as the change.
    Remember {
        id: RequestId,
        user: String,
        at_ms: u64,
        reply: Vec<u8>,
    },
    /// Forget the answers remembered before `before_ms`.
    ForgetRequests { before_ms: u64 },
}

/// The two edits whose fields changed in edit format 2 (owners), as format 1 had them.
#[derive(Deserialize)]
struct MkdirV1 {
    parent: InodeId,
    name: String,
    inode: InodeId,
    mtime_ms: u64,
}

#[derive(Deserialize)]
struct CreateV1 {
    parent: InodeId,
    name: String,
    inode: InodeId,
    replication: u8,
    block_size: u64,
    session: SessionId,
    mtime_ms: u64,
    replaces: Option<InodeId>,
    target_name: Option<String>,
}

/// Decodes the postcard body of an edit of format 1 (before owners). Only `Mkdir` (variant 0) and
/// `Create` (variant 1) were different: they made entries of the time before owners, so they come
/// back with [`Perm::legacy`], as the entries they made read from a store of that time. Every
/// other edit is encoded as it was.
pub fn decode_edit_v1(body: &[u8]) -> Result<MetaOp, Error> {
    match body.split_first() {
        Some((0, rest)) => {
            let m: MkdirV1 = postcard_value(rest)?;
            Ok(MetaOp::Mkdir {
                parent: m.parent,
                name: m.name,
                inode: m.inode,
                mtime_ms: m.mtime_ms,
                perm: Perm::legacy(true),
            })
        }
        Some((1, rest)) => {
            let c: CreateV1 = postcard_value(rest)?;
            Ok(MetaOp::Create {
                parent: c.parent,
                name: c.name,
                inode: c.inode,
                replication: c.replication,
                block_size: c.block_size,
                session: c.session,
                mtime_ms: c.mtime_ms,
                replaces: c.replaces,
                target_name: c.target_name,
                perm: Perm::legacy(false),
            })
        }
        _ => postcard_value(body),
    }
}

/// What applying an edit changed that the in-memory state must follow.
#[derive(Debug, Default)]
pub struct Applied {
    /// Blocks that no longer belong to any file.
    pub freed: Vec<BlockId>,
    /// A block now belongs to a file: (block, file, replication).
    pub added: Option<(BlockId, InodeId, u8)>,
    /// Files now held by a session's lease.
    pub leased: Option<(SessionId, InodeId)>,
    /// Files whose lease is released (completed or deleted).
    pub released: Vec<InodeId>,
    /// Blocks of a file that was completed.
    pub completed: Vec<BlockId>,
    /// Blocks whose target replica count changed.
    pub replication: Vec<(BlockId, u8)>,
    /// Blocks whose length and value the writer committed.
    pub committed: Vec<CommittedBlock>,
    /// A datanode's decommissioning changed.
    pub decommission: Option<(String, bool)>,
}

/// Reads and writes the namespace in a store.
pub struct Namespace<S: MetaStore> {
    store: Arc<S>,
}

impl<S: MetaStore> Clone for Namespace<S> {
    fn clone(&self) -> Self {
        Namespace {
            store: self.store.clone(),
        }
    }
}

fn inode_key(id: InodeId) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(b'i');
    k.extend_from_slice(&id.0.to_be_bytes());
    k
}

fn blocks_prefix(inode: InodeId) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.push(b'b');
    k.extend_from_slice(&inode.0.to_be_bytes());
    k
}

/// Where block `index` of file `inode` is stored: its blocks sort in file order.
fn block_key(inode: InodeId, index: u64) -> Vec<u8> {
    let mut k = blocks_prefix(inode);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

fn dirent_prefix(parent: InodeId) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(b'd');
    k.extend_from_slice(&parent.0.to_be_bytes());
    k
}

fn dirent_key(parent: InodeId, name: &str) -> Vec<u8> {
    let mut k = dirent_prefix(parent);
    k.extend_from_slice(name.as_bytes());
    k
}

/// `r`, the request id, the user: the remembered answer (`at_ms`, then the reply's bytes).
fn request_key(id: &RequestId, user: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(17 + user.len());
    k.push(b'r');
    k.extend_from_slice(&id.client.to_be_bytes());
    k.extend_from_slice(&id.call.to_be_bytes());
    k.extend_from_slice(user.as_bytes());
    k
}

/// `R`, a time bucket: the answers remembered in it, each under the rest of its `request_key`.
fn request_bucket(bucket: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(b'R');
    k.extend_from_slice(&bucket.to_be_bytes());
    k
}

fn quota_key(id: InodeId) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(b'q');
    k.extend_from_slice(&id.0.to_be_bytes());
    k
}

/// A change in what a tree uses, charged to the quotas above `dir` (inclusive).
type Charge = (InodeId, i128, i128);

fn decommission_key(name: &str) -> Vec<u8> {
    let mut k = vec![b'x'];
    k.extend_from_slice(name.as_bytes());
    k
}

fn plugin_key(hash: &Blake3Cv) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(b'g');
    k.extend_from_slice(&hash.0);
    k
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, Error> {
    let mut out = vec![FORMAT_VERSION];
    out.extend(postcard::to_stdvec(v).map_err(|e| Error::Store(e.to_string()))?);
    Ok(out)
}

fn postcard_value<T: for<'de> Deserialize<'de>>(rest: &[u8]) -> Result<T, Error> {
    postcard::from_bytes(rest).map_err(|e| Error::Corrupt(format!("undecodable record: {e}")))
}

/// Decodes a stored record other than an inode (those are the same in every version).
fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, Error> {
    match bytes.split_first() {
        Some((&(FORMAT_VERSION | FORMAT_V2 | FORMAT_V1), rest)) => postcard_value(rest),
        Some((v, _)) => Err(Error::Corrupt(format!("unknown record format {v}"))),
        None => Err(Error::Corrupt("empty record".into())),
    }
}

/// Decodes a stored inode record (untrusted: it comes from the metadata store's disk). A
/// version-1 record is an error here: `Namespace::open` migrates them all first.
pub fn decode_inode(bytes: &[u8]) -> Result<Inode, Error> {
    match bytes.split_first() {
        Some((&FORMAT_VERSION, rest)) => postcard_value(rest),
        Some((&FORMAT_V2, rest)) => {
            let old: InodeV2 = postcard_value(rest)?;
            let perm = Perm::legacy(matches!(old.kind, InodeKind::Directory));
            Ok(Inode {
                id: old.id,
                parent: old.parent,
                name: old.name,
                mtime_ms: old.mtime_ms,
                kind: old.kind,
                perm,
            })
        }
        Some((&FORMAT_V1, _)) => Err(Error::Corrupt(
            "inode record of format 1 in a store of format 2 or later".into(),
        )),
        Some((v, _)) => Err(Error::Corrupt(format!("unknown record format {v}"))),
        None => Err(Error::Corrupt("empty record".into())),
    }
}

/// A version-1 inode record as version 2: the inode and, for a file, its blocks. `None` for a
/// record of another version.
pub fn upgrade_v1(bytes: &[u8]) -> Result<Option<(Inode, Vec<BlockMeta>)>, Error> {
    let Some((&FORMAT_V1, rest)) = bytes.split_first() else {
        return Ok(None);
    };
    let old: InodeV1 = postcard_value(rest)?;
    let (kind, blocks) = match old.kind {
        InodeKindV1::Directory => (InodeKind::Directory, vec![]),
        InodeKindV1::File {
            replication,
            block_size,
            size,
            blocks,
            writer,
            target_name,
        } => (
            InodeKind::File {
                replication,
                block_size,
                size,
                block_count: blocks.len() as u64,
                writer,
                target_name,
            },
            blocks,
        ),
    };
    let node = Inode {
        perm: Perm::legacy(matches!(kind, InodeKind::Directory)),
        id: old.id,
        parent: old.parent,
        name: old.name,
        mtime_ms: old.mtime_ms,
        kind,
    };
    Ok(Some((node, blocks)))
}

/// Decodes a stored block record (untrusted, like an inode record).
pub fn decode_block(bytes: &[u8]) -> Result<BlockMeta, Error> {
    match bytes.split_first() {
        Some((&(FORMAT_VERSION | FORMAT_V2), rest)) => postcard_value(rest),
        Some((v, _)) => Err(Error::Corrupt(format!("unknown block record format {v}"))),
        None => Err(Error::Corrupt("empty record".into())),
    }
}

fn u64_value(bytes: &[u8]) -> Result<u64, Error> {
    let arr: [u8; 8] = bytes
        .try_into()
        .map_err(|_| Error::Corrupt("bad counter".into()))?;
    Ok(u64::from_be_bytes(arr))
}

fn refused(code: ErrorCode, message: impl Into<String>) -> Error {
    Error::refused(code, message)
}

impl<S: MetaStore> Namespace<S> {
    /// Wraps a store, creating the root directory if the store is new.
    pub fn open(store: Arc<S>) -> Result<Namespace<S>, Error> {
        let ns = Namespace { store };
        ns.migrate_v1()?;
        if ns.get(ROOT)?.is_none() {
            let root = Inode {
                id: ROOT,
                parent: ROOT,
                name: String::new(),
                mtime_ms: 0,
                kind: InodeKind::Directory,
                perm: Perm::legacy(true),
            };
            ns.store
                .apply_batch(vec![(inode_key(ROOT), Some(encode(&root)?))])?;
        }
        Ok(ns)
    }

    /// Rewrites version-1 inode records (block list inside) as version 2 (each block under its
    /// own key), in one atomic batch that changes nothing else: the edits logged after it are
    /// the same in both versions, so replay and the checkpoint are unaffected.
    fn migrate_v1(&self) -> Result<(), Error> {
        let mut batch = vec![];
        for (key, value) in self.store.scan_prefix(b"i")? {
            let Some((node, blocks)) = upgrade_v1(&value)? else {
                continue;
            };
            for (i, b) in (0u64..).zip(&blocks) {
                batch.push((block_key(node.id, i), Some(encode(b)?)));
            }
            batch.push((key, Some(encode(&node)?)));
        }
        if !batch.is_empty() {
            tracing::info!(
                records = batch.len(),
                "migrating the metadata store to format 2"
            );
            self.store.apply_batch(batch)?;
            self.store.flush()?;
        }
        Ok(())
    }

    /// The blocks of file `inode`, in order.
    pub fn blocks(&self, inode: InodeId) -> Result<Vec<BlockMeta>, Error> {
        self.store
            .scan_prefix(&blocks_prefix(inode))?
            .into_iter()
            .map(|(_, v)| decode_block(&v))
            .collect()
    }

    /// Every inode, and every block of every file in file order (used at start-up to rebuild
    /// block and lease state and the id floor).
    pub fn load_all(&self) -> Result<Stored, Error> {
        Ok(Stored {
            inodes: self.all_inodes()?,
            blocks: self.all_blocks()?,
        })
    }

    fn all_blocks(&self) -> Result<BTreeMap<InodeId, Vec<BlockMeta>>, Error> {
        let mut out: BTreeMap<InodeId, Vec<BlockMeta>> = BTreeMap::new();
        for (k, v) in self.store.scan_prefix(b"b")? {
            let id: [u8; 8] = k
                .get(1..9)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(|| Error::Corrupt("bad block key".into()))?;
            out.entry(InodeId(u64::from_be_bytes(id)))
                .or_default()
                .push(decode_block(&v)?);
        }
        Ok(out)
    }

    /// The last block of a file with `count` blocks.
    fn last_block(&self, inode: InodeId, count: u64) -> Result<Option<BlockMeta>, Error> {
        let Some(i) = count.checked_sub(1) else {
            return Ok(None);
        };
        match self.store.get(&block_key(inode, i))? {
            Some(v) => decode_block(&v).map(Some),
            None => Err(Error::Corrupt(format!(
                "block {i} of file {inode} referenced but missing"
            ))),
        }
    }

    /// The store underneath.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The store underneath, shared.
    pub fn store_arc(&self) -> Arc<S> {
        self.store.clone()
    }

    /// The durable id counters: (next inode id, next block id); (0, 0) in a store that has none.
    pub fn next_ids(&self) -> Result<(u64, u64), Error> {
        let Some(v) = self.store.get(NEXT_IDS_KEY)? else {
            return Ok((0, 0));
        };
        if v.len() != 16 {
            return Err(Error::Corrupt("bad id counters".into()));
        }
        Ok((u64_value(&v[..8])?, u64_value(&v[8..])?))
    }

    /// Sequence number of the last edit applied.
    pub fn last_applied(&self) -> Result<u64, Error> {
        read_last_applied(&*self.store)
    }

    /// One inode.
    pub fn get(&self, id: InodeId) -> Result<Option<Inode>, Error> {
        self.store
            .get(&inode_key(id))?
            .map(|v| decode_inode(&v))
            .transpose()
    }

    fn must_get(&self, id: InodeId) -> Result<Inode, Error> {
        self.get(id)?
            .ok_or_else(|| Error::Corrupt(format!("inode {id} referenced but missing")))
    }

    /// The child named `name` of `parent`.
    pub fn lookup(&self, parent: InodeId, name: &str) -> Result<Option<InodeId>, Error> {
        self.store
            .get(&dirent_key(parent, name))?
            .map(|v| u64_value(&v).map(InodeId))
            .transpose()
    }

    /// The entries of a directory, sorted by name.
    pub fn children(&self, dir: InodeId) -> Result<Vec<(String, InodeId)>, Error> {
        let prefix = dirent_prefix(dir);
        self.store
            .scan_prefix(&prefix)?
            .into_iter()
            .map(|(k, v)| {
                let name = String::from_utf8(k[prefix.len()..].to_vec())
                    .map_err(|_| Error::Corrupt("non-utf8 name".into()))?;
                Ok((name, InodeId(u64_value(&v)?)))
            })
            .collect()
    }

    /// Every inode in the store (used at start-up to rebuild block and lease state).
    pub fn all_inodes(&self) -> Result<Vec<Inode>, Error> {
        self.store
            .scan_prefix(b"i")?
            .into_iter()
            .map(|(_, v)| decode_inode(&v))
            .collect()
    }

    /// A registered plugin.
    pub fn get_plugin(&self, hash: &Blake3Cv) -> Result<Option<PluginRecord>, Error> {
        self.store
            .get(&plugin_key(hash))?
            .map(|v| decode(&v))
            .transpose()
    }

    /// Datanodes being drained.
    pub fn decommissioned(&self) -> Result<Vec<String>, Error> {
        Ok(self
            .store
            .scan_prefix(b"x")?
            .into_iter()
            .map(|(k, _)| String::from_utf8_lossy(&k[1..]).into_owned())
            .collect())
    }

    /// Every registered plugin, oldest first.
    pub fn list_plugins(&self) -> Result<Vec<PluginRecord>, Error> {
        let mut all: Vec<PluginRecord> = self
            .store
            .scan_prefix(b"g")?
            .into_iter()
            .map(|(_, v)| decode(&v))
            .collect::<Result<_, _>>()?;
        all.sort_by_key(|p| p.added_ms);
        Ok(all)
    }

    /// Validates registering a plugin: a new hash is added; adding a known hash again only
    /// approves it (when the new adder may approve).
    pub fn prepare_add_plugin(&self, record: PluginRecord) -> Result<Vec<MetaOp>, Error> {
        match self.get_plugin(&record.hash)? {
            None => Ok(vec![MetaOp::AddPlugin(record)]),
            Some(old) if record.approved && !old.approved => {
                Ok(vec![MetaOp::ApprovePlugin { hash: record.hash }])
            }
            Some(_) => Ok(vec![]),
        }
    }

    /// Validates approving a plugin.
    pub fn prepare_approve_plugin(&self, hash: Blake3Cv) -> Result<MetaOp, Error> {
        if self.get_plugin(&hash)?.is_none() {
            return Err(refused(
                ErrorCode::NotFound,
                format!("no plugin with hash {hash}"),
            ));
        }
        Ok(MetaOp::ApprovePlugin { hash })
    }

    /// Resolves a normalised path (with no permission checks). A file in the middle of the path is
    /// an error.
    pub fn resolve(&self, p: &str) -> Result<Option<Inode>, Error> {
        self.walk(None, p)
    }

    /// Resolves a normalised path as `caller`: it needs search (x) on every directory it passes
    /// through.
    pub fn resolve_as(&self, caller: &Caller, p: &str) -> Result<Option<Inode>, Error> {
        self.walk(Some(caller), p)
    }

    /// Resolves a path that must exist, as `caller`.
    pub fn resolve_existing_as(&self, caller: &Caller, p: &str) -> Result<Inode, Error> {
        self.resolve_as(caller, p)?.ok_or_else(|| not_found(p))
    }

    fn walk(&self, caller: Option<&Caller>, p: &str) -> Result<Option<Inode>, Error> {
        let mut cur = self.must_get(ROOT)?;
        let mut walked = String::new();
        for name in path::components(p) {
            if !matches!(cur.kind, InodeKind::Directory) {
                return Err(refused(
                    ErrorCode::NotADirectory,
                    format!("{walked}: not a directory"),
                ));
            }
            if let Some(c) = caller {
                let here = if walked.is_empty() { "/" } else { &walked };
                c.check(here, &cur.perm, true, EXECUTE)?;
            }
            walked.push('/');
            walked.push_str(name);
            match self.lookup(cur.id, name)? {
                Some(id) => cur = self.must_get(id)?,
                None => return Ok(None),
            }
        }
        Ok(Some(cur))
    }

    /// Resolves a path that must exist.
    pub fn resolve_existing(&self, p: &str) -> Result<Inode, Error> {
        self.resolve(p)?.ok_or_else(|| not_found(p))
    }

    /// Resolves an existing path for reading what is under it (list, du, count, fsck): search on
    /// every ancestor, and read and search on it if it is a directory.
    pub fn readable(&self, caller: &Caller, p: &str) -> Result<Inode, Error> {
        let node = self.resolve_existing_as(caller, p)?;
        if node.is_dir() {
            caller.check(p, &node.perm, true, READ | EXECUTE)?;
        }
        Ok(node)
    }

    /// Resolves an existing path as `caller` and checks `want` on what it names.
    pub fn accessible(&self, caller: &Caller, p: &str, want: u16) -> Result<Inode, Error> {
        let node = self.resolve_existing_as(caller, p)?;
        caller.check(p, &node.perm, node.is_dir(), want)?;
        Ok(node)
    }

    /// The status of an entry (without block locations; the server adds those).
    pub fn status(&self, p: &str, inode: &Inode, with_blocks: bool) -> Result<FileStatus, Error> {
        Ok(match &inode.kind {
            InodeKind::Directory => FileStatus {
                path: p.to_string(),
                kind: EntryKind::Directory,
                size: 0,
                replication: 0,
                block_size: 0,
                mtime_ms: inode.mtime_ms,
                complete: true,
                blocks: vec![],
                owner: inode.perm.owner.clone(),
                group: inode.perm.group.clone(),
                mode: inode.perm.mode,
            },
            InodeKind::File {
                replication,
                block_size,
                size,
                writer,
                ..
            } => {
                let mut offset = 0;
                let located = if with_blocks {
                    self.blocks(inode.id)?
                        .iter()
                        .map(|b| {
                            let lb = LocatedBlock {
                                id: b.id,
                                offset,
                                len: b.len,
                                cv: b.cv,
                                locations: vec![],
                                token: None,
                            };
                            offset += b.len;
                            lb
                        })
                        .collect()
                } else {
                    vec![]
                };
                FileStatus {
                    path: p.to_string(),
                    kind: EntryKind::File,
                    size: *size,
                    replication: *replication,
                    block_size: *block_size,
                    mtime_ms: inode.mtime_ms,
                    complete: writer.is_none(),
                    blocks: located,
                    owner: inode.perm.owner.clone(),
                    group: inode.perm.group.clone(),
                    mode: inode.perm.mode,
                }
            }
        })
    }

    /// Every file at or under a path: (path, inode).
    pub fn files_under(&self, p: &str, top: Inode) -> Result<Vec<(String, Inode)>, Error> {
        let mut out = vec![];
        let mut stack = vec![(p.to_string(), top)];
        while let Some((path, node)) = stack.pop() {
            match node.kind {
                InodeKind::Directory => {
                    for (name, id) in self.children(node.id)? {
                        stack.push((path::join(&path, &name), self.must_get(id)?));
                    }
                }
                InodeKind::File { .. } => out.push((path, node)),
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// (files, directories, bytes, bytes times replication) under an entry.
    pub fn usage(&self, inode: &Inode) -> Result<(u64, u64, u64, u64), Error> {
        let mut totals = (0, 0, 0, 0);
        let mut stack = vec![inode.clone()];
        while let Some(node) = stack.pop() {
            match &node.kind {
                InodeKind::Directory => {
                    totals.1 += 1;
                    for (_, id) in self.children(node.id)? {
                        stack.push(self.must_get(id)?);
                    }
                }
                InodeKind::File {
                    replication, size, ..
                } => {
                    totals.0 += 1;
                    totals.2 += size;
                    totals.3 += size * u64::from(*replication);
                }
            }
        }
        Ok(totals)
    }

    /// The directory an entry of path `p` is (or would be) in, which `caller` needs search and
    /// write on to add or remove an entry there.
    fn parent_dir_of(&self, caller: &Caller, p: &str) -> Result<(Inode, String), Error> {
        let (parent, name) = path::split_parent(p)
            .ok_or_else(|| refused(ErrorCode::InvalidArgument, "/: is the root directory"))?;
        let dir = self
            .resolve_as(caller, parent)?
            .ok_or_else(|| refused(ErrorCode::NotFound, format!("{parent}: no such directory")))?;
        if !matches!(dir.kind, InodeKind::Directory) {
            return Err(refused(
                ErrorCode::NotADirectory,
                format!("{parent}: not a directory"),
            ));
        }
        caller.check(parent, &dir.perm, true, WRITE | EXECUTE)?;
        Ok((dir, name.to_string()))
    }

    /// What a new entry made by `caller` in `dir` gets: the caller as owner, the directory's
    /// group (the BSD rule HDFS keeps), and `mode` (the client took its umask off already).
    fn new_perm(caller: &Caller, dir: &Inode, mode: u16) -> Perm {
        Perm {
            owner: caller.user.clone(),
            group: dir.perm.group.clone(),
            mode: mode & 0o777,
        }
    }

    /// Checks that `caller` may remove `node` (at `p`) from its directory `dir`: the sticky rule,
    /// and for a directory with entries, read, write and search on every directory under it and the
    /// sticky rule in each (what `rm -r` needs on a local disk).
    fn check_removable(
        &self,
        caller: &Caller,
        p: &str,
        dir: &Inode,
        node: &Inode,
    ) -> Result<(), Error> {
        caller.check_sticky(p, &dir.perm, &node.perm)?;
        if caller.superuser || !node.is_dir() {
            return Ok(());
        }
        let mut stack = vec![(p.to_string(), node.clone())];
        while let Some((at, d)) = stack.pop() {
            let children = self.children(d.id)?;
            if children.is_empty() {
                continue;
            }
            caller.check(&at, &d.perm, true, READ | WRITE | EXECUTE)?;
            for (name, id) in children {
                let child = self.must_get(id)?;
                let child_path = path::join(&at, &name);
                caller.check_sticky(&child_path, &d.perm, &child.perm)?;
                if child.is_dir() {
                    stack.push((child_path, child));
                }
            }
        }
        Ok(())
    }

    /// Every entry at or under `top` (at `p`), each with its path: directories need read and
    /// search for `caller` to be looked into (as a recursive walk on a local disk does).
    fn subtree(&self, caller: &Caller, p: &str, top: Inode) -> Result<Vec<(String, Inode)>, Error> {
        let mut out = vec![];
        let mut stack = vec![(p.to_string(), top)];
        while let Some((at, node)) = stack.pop() {
            if node.is_dir() {
                let children = self.children(node.id)?;
                if !children.is_empty() {
                    caller.check(&at, &node.perm, true, READ | EXECUTE)?;
                }
                for (name, id) in children {
                    stack.push((path::join(&at, &name), self.must_get(id)?));
                }
            }
            out.push((at, node));
        }
        Ok(out)
    }

    fn quota_count(&self) -> Result<u64, Error> {
        self.store
            .get(QUOTAS_KEY)?
            .map(|v| u64_value(&v))
            .transpose()
            .map(|v| v.unwrap_or(0))
    }

    /// A directory's quotas and use, if it has quotas.
    pub fn quota(&self, dir: InodeId) -> Result<Option<Quota>, Error> {
        self.store
            .get(&quota_key(dir))?
            .map(|v| decode(&v))
            .transpose()
    }

    /// What one replica of a file is charged: committed blocks by their length, a block being
    /// written as a whole block.
    fn file_charge(&self, node: &Inode) -> Result<u64, Error> {
        Ok(match &node.kind {
            InodeKind::File { block_size, .. } => self
                .blocks(node.id)?
                .iter()
                .map(|b| if b.cv.is_some() { b.len } else { *block_size })
                .sum(),
            InodeKind::Directory => 0,
        })
    }

    /// (names, bytes times replication) of the tree at `id`, itself included.
    fn tree_usage(&self, id: InodeId) -> Result<(u64, u64), Error> {
        let (mut names, mut space) = (0, 0);
        let mut stack = vec![self.must_get(id)?];
        while let Some(n) = stack.pop() {
            names += 1;
            match &n.kind {
                InodeKind::Directory => {
                    for (_, c) in self.children(n.id)? {
                        stack.push(self.must_get(c)?);
                    }
                }
                InodeKind::File { replication, .. } => {
                    space += self.file_charge(&n)? * u64::from(*replication);
                }
            }
        }
        Ok((names, space))
    }

    /// The path of an inode, walked up from it.
    pub fn path_of(&self, id: InodeId) -> Result<String, Error> {
        let mut names = vec![];
        let mut cur = self.must_get(id)?;
        while cur.id != ROOT {
            names.push(cur.name.clone());
            cur = self.must_get(cur.parent)?;
        }
        names.reverse();
        Ok(format!("/{}", names.join("/")))
    }

    /// Each directory with a quota at or above the charged ones, with its record and the sum of
    /// the charges under it. Empty (and cheap) while no directory has a quota.
    fn charged(&self, charges: &[Charge]) -> Result<BTreeMap<InodeId, (Quota, i128, i128)>, Error> {
        let mut out: BTreeMap<InodeId, (Quota, i128, i128)> = BTreeMap::new();
        if charges.is_empty() || self.quota_count()? == 0 {
            return Ok(out);
        }
        for (dir, names, space) in charges {
            let mut cur = *dir;
            loop {
                if let Some(q) = self.quota(cur)? {
                    let e = out.entry(cur).or_insert((q, 0, 0));
                    e.1 += names;
                    e.2 += space;
                }
                if cur == ROOT {
                    break;
                }
                match self.get(cur)? {
                    Some(n) => cur = n.parent,
                    None => break,
                }
            }
        }
        Ok(out)
    }

    /// Refuses a change that would take a quota past its limit (what only shrinks use passes).
    fn check_quotas(&self, charges: &[Charge]) -> Result<(), Error> {
        for (dir, (q, names, space)) in self.charged(charges)? {
            if let Some(limit) = q
                .names
                .filter(|l| names > 0 && i128::from(q.names_used) + names > i128::from(*l))
            {
                return Err(refused(
                    ErrorCode::QuotaExceeded,
                    format!(
                        "{}: the name quota of {limit} would be exceeded ({} used, {names} more)",
                        self.path_of(dir)?,
                        q.names_used
                    ),
                ));
            }
            if let Some(limit) = q
                .bytes
                .filter(|l| space > 0 && i128::from(q.space_used) + space > i128::from(*l))
            {
                return Err(refused(
                    ErrorCode::QuotaExceeded,
                    format!(
                        "{}: the space quota of {limit} bytes would be exceeded ({} used, {space} more, \
                         counting every replica)",
                        self.path_of(dir)?,
                        q.space_used
                    ),
                ));
            }
        }
        Ok(())
    }

    /// What applying `op` charges the quotas above the entries it changes.
    fn charges_of(&self, op: &MetaOp) -> Result<Vec<Charge>, Error> {
        if self.quota_count()? == 0 {
            return Ok(vec![]);
        }
        let removed = |id: InodeId| -> Result<Option<Charge>, Error> {
            let Some(node) = self.get(id)? else {
                return Ok(None);
            };
            let (n, sp) = self.tree_usage(id)?;
            Ok(Some((node.parent, -i128::from(n), -i128::from(sp))))
        };
        // A commit changes the last block's charge from a whole block to its length.
        let commit = |node: &Inode, c: &Option<CommittedBlock>| -> Result<i128, Error> {
            let (
                Some(c),
                InodeKind::File {
                    block_size,
                    block_count,
                    replication,
                    ..
                },
            ) = (c, &node.kind)
            else {
                return Ok(0);
            };
            Ok(match self.last_block(node.id, *block_count)? {
                Some(b) if b.id == c.id && b.cv.is_none() => {
                    (i128::from(c.len) - i128::from(*block_size)) * i128::from(*replication)
                }
                _ => 0,
            })
        };
        let mut out = vec![];
        match op {
            MetaOp::Mkdir { parent, .. } => out.push((*parent, 1, 0)),
            MetaOp::Create {
                parent, replaces, ..
            } => {
                out.push((*parent, 1, 0));
                if let Some(old) = replaces {
                    out.extend(removed(*old)?);
                }
            }
            MetaOp::AddBlock {
                inode, previous, ..
            } => {
                let node = self.must_get(*inode)?;
                if let InodeKind::File {
                    block_size,
                    replication,
                    ..
                } = &node.kind
                {
                    let whole = i128::from(*block_size) * i128::from(*replication);
                    out.push((node.parent, 0, whole + commit(&node, previous)?));
                }
            }
            MetaOp::AbandonBlock { inode, block } => {
                let node = self.must_get(*inode)?;
                if let InodeKind::File {
                    block_size,
                    replication,
                    block_count,
                    ..
                } = &node.kind
                {
                    if self
                        .last_block(*inode, *block_count)?
                        .is_some_and(|b| b.id == *block && b.cv.is_none())
                    {
                        out.push((
                            node.parent,
                            0,
                            -i128::from(*block_size) * i128::from(*replication),
                        ));
                    }
                }
            }
            MetaOp::Complete {
                inode,
                last,
                rename,
                ..
            } => {
                let node = self.must_get(*inode)?;
                out.push((node.parent, 0, commit(&node, last)?));
                if let Some((_, Some(old))) = rename {
                    out.extend(removed(*old)?);
                }
            }
            MetaOp::Delete { inode } => out.extend(removed(*inode)?),
            MetaOp::SetReplication { files, replication } => {
                for id in files {
                    let Some(node) = self.get(*id)? else { continue };
                    if let InodeKind::File {
                        replication: old, ..
                    } = &node.kind
                    {
                        let per = i128::from(self.file_charge(&node)?);
                        out.push((
                            node.parent,
                            0,
                            per * (i128::from(*replication) - i128::from(*old)),
                        ));
                    }
                }
            }
            MetaOp::Rename {
                inode, dst_parent, ..
            } => {
                let node = self.must_get(*inode)?;
                let (n, sp) = self.tree_usage(*inode)?;
                out.push((node.parent, -i128::from(n), -i128::from(sp)));
                out.push((*dst_parent, i128::from(n), i128::from(sp)));
            }
            _ => {}
        }
        Ok(out)
    }

    /// Validates setting (or with `clear`, removing) a directory's quotas; a limit not given
    /// keeps its value.
    pub fn prepare_set_quota(
        &self,
        p: &str,
        names: Option<u64>,
        bytes: Option<u64>,
        clear: bool,
    ) -> Result<MetaOp, Error> {
        let node = self.resolve_existing(p)?;
        if !node.is_dir() {
            return Err(refused(
                ErrorCode::NotADirectory,
                format!("{p}: quotas are set on directories"),
            ));
        }
        if clear {
            return Ok(MetaOp::SetQuota {
                inode: node.id,
                names: None,
                bytes: None,
            });
        }
        if names.is_none() && bytes.is_none() {
            return Err(refused(
                ErrorCode::InvalidArgument,
                "give a name quota, a space quota or both",
            ));
        }
        let old = self.quota(node.id)?.unwrap_or_default();
        Ok(MetaOp::SetQuota {
            inode: node.id,
            names: names.or(old.names),
            bytes: bytes.or(old.bytes),
        })
    }

    /// Where `user`'s trash is: `/user/<user>/.Trash`.
    pub fn trash_root(user: &str) -> String {
        format!("/user/{user}/{TRASH_DIR}")
    }

    /// Where `caller` moving `p` to its trash puts it: `/user/<name>/.Trash/Current<p>`, with the
    /// time appended if that is taken (as HDFS does). `None` when `p` is in the caller's trash
    /// already (removing it from there deletes it).
    pub fn trash_destination(
        &self,
        caller: &Caller,
        p: &str,
        now_ms: u64,
    ) -> Result<Option<String>, Error> {
        let root = Self::trash_root(&caller.user);
        if p == root || p.starts_with(&format!("{root}/")) {
            return Ok(None);
        }
        let base = format!("{root}/{TRASH_CURRENT}{p}");
        let mut dst = base.clone();
        let mut n = 0u32;
        while self.resolve(&dst)?.is_some() {
            n += 1;
            dst = format!(
                "{base}{now_ms}{}",
                if n > 1 {
                    format!("-{n}")
                } else {
                    String::new()
                }
            );
        }
        Ok(Some(dst))
    }

    /// The trash's periodic work at `now_ms`: in every `/user/*/.Trash`, `Current` becomes a
    /// checkpoint named by the time, and checkpoints older than `interval_ms` are deleted.
    pub fn prepare_trash_checkpoint(
        &self,
        interval_ms: u64,
        now_ms: u64,
    ) -> Result<Vec<MetaOp>, Error> {
        let Some(users) = self.resolve("/user")? else {
            return Ok(vec![]);
        };
        let mut ops = vec![];
        for (_, home) in self.children(users.id)? {
            let Some(trash) = self.lookup(home, TRASH_DIR)? else {
                continue;
            };
            for (name, id) in self.children(trash)? {
                if name == TRASH_CURRENT {
                    ops.push(MetaOp::Rename {
                        inode: id,
                        dst_parent: trash,
                        dst_name: now_ms.to_string(),
                        mtime_ms: now_ms,
                    });
                } else if name
                    .parse::<u64>()
                    .is_ok_and(|t| t.saturating_add(interval_ms) <= now_ms)
                {
                    ops.push(MetaOp::Delete { inode: id });
                }
            }
        }
        Ok(ops)
    }

    /// Validates a mkdir by `caller`; returns the edits (one per missing directory with
    /// `parents`). A directory made on the way gets `mode` with owner write and search added, so
    /// that the caller can make the next one in it (as HDFS does).
    pub fn prepare_mkdir(
        &self,
        caller: &Caller,
        p: &str,
        parents: bool,
        mode: u16,
        ids: &mut IdAlloc,
        now_ms: u64,
    ) -> Result<Vec<MetaOp>, Error> {
        if let Some(existing) = self.resolve_as(caller, p)? {
            return match existing.kind {
                InodeKind::Directory if parents => Ok(vec![]),
                InodeKind::Directory => Err(refused(
                    ErrorCode::AlreadyExists,
                    format!("{p}: directory exists"),
                )),
                InodeKind::File { .. } => Err(refused(
                    ErrorCode::AlreadyExists,
                    format!("{p}: file exists"),
                )),
            };
        }
        if !parents {
            let (dir, name) = self.parent_dir_of(caller, p)?;
            self.check_quotas(&[(dir.id, 1, 0)])?;
            return Ok(vec![MetaOp::Mkdir {
                parent: dir.id,
                name,
                inode: ids.inode()?,
                mtime_ms: now_ms,
                perm: Self::new_perm(caller, &dir, mode),
            }]);
        }
        let mut ops = vec![];
        let mut cur = self.must_get(ROOT)?;
        let mut walked = String::new();
        let mut creating: Option<Perm> = None;
        let names: Vec<&str> = path::components(p).collect();
        for (i, name) in names.iter().enumerate() {
            let here = if walked.is_empty() {
                "/".to_string()
            } else {
                walked.clone()
            };
            walked.push('/');
            walked.push_str(name);
            let last = i + 1 == names.len();
            let mode = if last { mode } else { mode | 0o300 };
            let perm = match &creating {
                Some(parent_perm) => Perm {
                    owner: caller.user.clone(),
                    group: parent_perm.group.clone(),
                    mode: mode & 0o777,
                },
                None => {
                    if let Some(id) = self.lookup(cur.id, name)? {
                        let node = self.must_get(id)?;
                        if !node.is_dir() {
                            return Err(refused(
                                ErrorCode::NotADirectory,
                                format!("{walked}: not a directory"),
                            ));
                        }
                        cur = node;
                        continue;
                    }
                    // The deepest directory that exists is where the caller adds one.
                    caller.check(&here, &cur.perm, true, WRITE | EXECUTE)?;
                    Self::new_perm(caller, &cur, mode)
                }
            };
            let id = ids.inode()?;
            ops.push(MetaOp::Mkdir {
                parent: cur.id,
                name: name.to_string(),
                inode: id,
                mtime_ms: now_ms,
                perm: perm.clone(),
            });
            cur = Inode {
                id,
                parent: cur.id,
                name: name.to_string(),
                mtime_ms: now_ms,
                kind: InodeKind::Directory,
                perm: perm.clone(),
            };
            creating = Some(perm);
        }
        // Every new directory is under the first one's parent, which exists.
        if let Some(MetaOp::Mkdir { parent, .. }) = ops.first() {
            self.check_quotas(&[(*parent, ops.len() as i128, 0)])?;
        }
        Ok(ops)
    }

    /// Validates a create by `caller`: write and search on the directory, and write on the file it
    /// overwrites.
    #[allow(clippy::too_many_arguments)]
    pub fn prepare_create(
        &self,
        caller: &Caller,
        p: &str,
        overwrite: bool,
        replication: u8,
        block_size: u64,
        mode: u16,
        session: SessionId,
        ids: &mut IdAlloc,
        now_ms: u64,
    ) -> Result<MetaOp, Error> {
        let (dir, name) = self.parent_dir_of(caller, p)?;
        let conflict = || {
            refused(
                ErrorCode::LeaseConflict,
                format!("{p}: is being written by another client"),
            )
        };
        let mut replaces = None;
        let mut create_as = name.clone();
        let mut target_name = None;
        if let Some(id) = self.lookup(dir.id, &name)? {
            let existing = self.must_get(id)?;
            if overwrite && !existing.is_dir() {
                caller.check(p, &existing.perm, false, WRITE)?;
            }
            match existing.kind {
                InodeKind::Directory => {
                    return Err(refused(
                        ErrorCode::IsADirectory,
                        format!("{p}: is a directory"),
                    ));
                }
                InodeKind::File {
                    writer: Some(w), ..
                } if w != session => return Err(conflict()),
                InodeKind::File { .. } if !overwrite => {
                    return Err(refused(
                        ErrorCode::AlreadyExists,
                        format!("{p}: file exists (use -f to overwrite)"),
                    ));
                }
                // Our own unfinished file: replace it now.
                InodeKind::File {
                    writer: Some(_), ..
                } => replaces = Some(id),
                // A complete file stays readable until the new one is complete: write under a
                // hidden name and swap on completion, so a failed overwrite loses nothing.
                InodeKind::File { writer: None, .. } => {
                    create_as = replacing_name(&name);
                    target_name = Some(name.clone());
                    if let Some(hidden) = self.lookup(dir.id, &create_as)? {
                        match self.must_get(hidden)?.kind {
                            InodeKind::File {
                                writer: Some(w), ..
                            } if w != session => return Err(conflict()),
                            InodeKind::File { .. } => replaces = Some(hidden),
                            InodeKind::Directory => {
                                return Err(refused(
                                    ErrorCode::IsADirectory,
                                    format!(
                                        "{}: is a directory",
                                        path::join(&path_of_parent(p), &create_as)
                                    ),
                                ))
                            }
                        }
                    }
                }
            }
        }
        if replaces.is_none() {
            self.check_quotas(&[(dir.id, 1, 0)])?;
        }
        Ok(MetaOp::Create {
            parent: dir.id,
            name: create_as,
            inode: ids.inode()?,
            replication,
            block_size,
            session,
            mtime_ms: now_ms,
            replaces,
            target_name,
            perm: Self::new_perm(caller, &dir, mode),
        })
    }

    /// A file this session writes: (block size, its last block, the name it takes on completion,
    /// its parent).
    #[allow(clippy::type_complexity)]
    fn writing_inode(
        &self,
        inode: InodeId,
        session: SessionId,
    ) -> Result<(u64, Option<BlockMeta>, Option<String>, InodeId), Error> {
        let node = self.get(inode)?.ok_or_else(|| {
            refused(
                ErrorCode::NotFound,
                format!("file {inode} no longer exists (lease lost?)"),
            )
        })?;
        match node.kind {
            InodeKind::File {
                writer: Some(w),
                block_size,
                block_count,
                target_name,
                ..
            } if w == session => Ok((
                block_size,
                self.last_block(inode, block_count)?,
                target_name,
                node.parent,
            )),
            _ => Err(refused(
                ErrorCode::LeaseConflict,
                format!("file {inode}: this client does not hold its lease"),
            )),
        }
    }

    fn check_commit(
        last: Option<&BlockMeta>,
        commit: Option<CommittedBlock>,
        full: Option<u64>,
    ) -> Result<(), Error> {
        match (last, commit) {
            (None, None) => Ok(()),
            (Some(b), Some(c)) if b.id == c.id => match full {
                Some(bs) if c.len != bs => Err(refused(
                    ErrorCode::InvalidArgument,
                    format!("block {} must be full ({bs} bytes)", c.id),
                )),
                _ if c.len == 0 && full.is_some() => {
                    Err(refused(ErrorCode::InvalidArgument, "empty block"))
                }
                _ => Ok(()),
            },
            (Some(b), _) => Err(refused(
                ErrorCode::InvalidArgument,
                format!("block {} must be committed", b.id),
            )),
            (None, Some(c)) => Err(refused(
                ErrorCode::InvalidArgument,
                format!("block {} is not this file's", c.id),
            )),
        }
    }

    /// Validates a block allocation.
    pub fn prepare_add_block(
        &self,
        inode: InodeId,
        session: SessionId,
        previous: Option<CommittedBlock>,
        ids: &mut IdAlloc,
    ) -> Result<MetaOp, Error> {
        let (block_size, last, _, parent) = self.writing_inode(inode, session)?;
        Self::check_commit(last.as_ref(), previous, Some(block_size))?;
        // The new block is charged whole (the previous one, committed full, is already).
        if let Some(InodeKind::File { replication, .. }) = self.get(inode)?.map(|n| n.kind) {
            let whole = i128::from(block_size) * i128::from(replication);
            self.check_quotas(&[(parent, 0, whole)])?;
        }
        Ok(MetaOp::AddBlock {
            inode,
            block: ids.block()?,
            previous,
        })
    }

    /// Validates giving up the last block.
    pub fn prepare_abandon(
        &self,
        inode: InodeId,
        session: SessionId,
        block: BlockId,
    ) -> Result<MetaOp, Error> {
        let (_, last, _, _) = self.writing_inode(inode, session)?;
        match last {
            Some(b) if b.id == block => Ok(MetaOp::AbandonBlock { inode, block }),
            _ => Err(refused(
                ErrorCode::InvalidArgument,
                format!("block {block} is not the file's last block"),
            )),
        }
    }

    /// Validates closing a file.
    pub fn prepare_complete(
        &self,
        inode: InodeId,
        session: SessionId,
        last: Option<CommittedBlock>,
        size: u64,
        now_ms: u64,
    ) -> Result<MetaOp, Error> {
        let (block_size, last_block, target_name, parent) = self.writing_inode(inode, session)?;
        Self::check_commit(last_block.as_ref(), last, None)?;
        let blocks = self.blocks(inode)?;
        let committed: u64 =
            blocks.iter().rev().skip(1).map(|b| b.len).sum::<u64>() + last.map_or(0, |c| c.len);
        if committed != size || last.is_some_and(|c| c.len > block_size || c.len == 0) {
            return Err(refused(
                ErrorCode::InvalidArgument,
                format!("file {inode}: size {size} does not match its blocks ({committed} bytes)"),
            ));
        }
        let rename = match target_name {
            None => None,
            Some(target) => {
                let replaces = match self.lookup(parent, &target)? {
                    None => None,
                    Some(id) => match self.must_get(id)?.kind {
                        InodeKind::File {
                            writer: Some(w), ..
                        } if w != session => {
                            return Err(refused(
                                ErrorCode::LeaseConflict,
                                format!("{target}: is being written by another client"),
                            ));
                        }
                        InodeKind::File { .. } => Some(id),
                        InodeKind::Directory => {
                            return Err(refused(
                                ErrorCode::IsADirectory,
                                format!("{target}: became a directory"),
                            ));
                        }
                    },
                };
                Some((target, replaces))
            }
        };
        Ok(MetaOp::Complete {
            inode,
            last,
            size,
            mtime_ms: now_ms,
            rename,
        })
    }

    /// Validates a replication change of a file or of every file under a directory by `caller`
    /// (write on each file): one edit per [`SETREP_FILES_PER_EDIT`] files.
    pub fn prepare_setrep(
        &self,
        caller: &Caller,
        p: &str,
        replication: u8,
    ) -> Result<Vec<MetaOp>, Error> {
        let node = self.resolve_existing_as(caller, p)?;
        let mut files = vec![];
        for (at, n) in self.subtree(caller, p, node)? {
            if !n.is_dir() {
                caller.check(&at, &n.perm, false, WRITE)?;
                files.push(n.id);
            }
        }
        if files.is_empty() {
            return Ok(vec![]);
        }
        let ops: Vec<MetaOp> = files
            .chunks(SETREP_FILES_PER_EDIT)
            .map(|chunk| MetaOp::SetReplication {
                files: chunk.to_vec(),
                replication,
            })
            .collect();
        let mut charges = vec![];
        for op in &ops {
            charges.extend(self.charges_of(op)?);
        }
        self.check_quotas(&charges)?;
        Ok(ops)
    }

    /// Validates `chown`/`chgrp`/`chmod` by `caller` of an entry, or of everything under it with
    /// `recursive`: only a superuser changes an owner; the owner (or a superuser) changes the mode,
    /// and the group to one the owner is in. One edit per [`SETREP_FILES_PER_EDIT`] entries.
    pub fn prepare_set_attributes(
        &self,
        caller: &Caller,
        p: &str,
        owner: Option<String>,
        group: Option<String>,
        mode: Option<ModeChange>,
        recursive: bool,
    ) -> Result<Vec<MetaOp>, Error> {
        let invalid = |m: String| refused(ErrorCode::InvalidArgument, m);
        if let Some(o) = &owner {
            lode_protocol::perm::validate_name("user", o).map_err(invalid)?;
            if !caller.superuser {
                return Err(refused(
                    ErrorCode::PermissionDenied,
                    format!(
                        "permission denied: user={} may not change the owner of {p} (only a superuser may)",
                        caller.user
                    ),
                ));
            }
        }
        if let Some(g) = &group {
            lode_protocol::perm::validate_name("group", g).map_err(invalid)?;
            if !caller.superuser && !caller.groups.contains(g) {
                return Err(refused(
                    ErrorCode::PermissionDenied,
                    format!(
                        "permission denied: user={} is not in group {g}, so may not give {p} to it",
                        caller.user
                    ),
                ));
            }
        }
        let node = self.resolve_existing_as(caller, p)?;
        let entries = if recursive {
            self.subtree(caller, p, node)?
        } else {
            vec![(p.to_string(), node)]
        };
        let mut inodes = Vec::with_capacity(entries.len());
        for (at, n) in entries {
            caller.check_owner(&at, &n.perm)?;
            inodes.push(n.id);
        }
        Ok(inodes
            .chunks(SETREP_FILES_PER_EDIT)
            .map(|chunk| MetaOp::SetAttributes {
                inodes: chunk.to_vec(),
                owner: owner.clone(),
                group: group.clone(),
                mode: mode.clone(),
            })
            .collect())
    }

    /// Validates `touch` of an existing entry by `caller`: its owner, a superuser, or anyone with
    /// write permission on it (as POSIX `utimes` to now, and HDFS's `setTimes`, which asks write).
    pub fn prepare_set_times(
        &self,
        caller: &Caller,
        p: &str,
        mtime_ms: u64,
    ) -> Result<MetaOp, Error> {
        let node = self.resolve_existing_as(caller, p)?;
        if caller.check_owner(p, &node.perm).is_err() {
            caller.check(p, &node.perm, node.is_dir(), WRITE)?;
        }
        Ok(MetaOp::SetTimes {
            inode: node.id,
            mtime_ms,
        })
    }

    /// Validates a delete by `caller`: write and search on the directory, the sticky rule, and
    /// for a directory with entries what [`Self::check_removable`] asks.
    pub fn prepare_delete(
        &self,
        caller: &Caller,
        p: &str,
        recursive: bool,
    ) -> Result<MetaOp, Error> {
        let node = self.resolve_existing_as(caller, p)?;
        if node.id == ROOT {
            return Err(refused(
                ErrorCode::InvalidArgument,
                "/: cannot delete the root directory",
            ));
        }
        let (dir, _) = self.parent_dir_of(caller, p)?;
        if node.is_dir() && !recursive && !self.children(node.id)?.is_empty() {
            return Err(refused(
                ErrorCode::NotEmpty,
                format!("{p}: directory not empty (use -r)"),
            ));
        }
        self.check_removable(caller, p, &dir, &node)?;
        Ok(MetaOp::Delete { inode: node.id })
    }

    /// Validates a rename by `caller`: write and search on both directories and the sticky rule
    /// at the source. Into an existing directory, the entry keeps its name; onto an existing file
    /// it fails.
    pub fn prepare_rename(
        &self,
        caller: &Caller,
        src: &str,
        dst: &str,
        now_ms: u64,
    ) -> Result<MetaOp, Error> {
        let node = self.resolve_existing_as(caller, src)?;
        if node.id == ROOT {
            return Err(refused(
                ErrorCode::InvalidArgument,
                "/: cannot move the root directory",
            ));
        }
        let (src_dir, _) = self.parent_dir_of(caller, src)?;
        caller.check_sticky(src, &src_dir.perm, &node.perm)?;
        let (dst_dir, dst_name) = match self.resolve_as(caller, dst)? {
            Some(d) if d.is_dir() => {
                caller.check(dst, &d.perm, true, WRITE | EXECUTE)?;
                (d, node.name.clone())
            }
            Some(_) => {
                return Err(refused(
                    ErrorCode::AlreadyExists,
                    format!("{dst}: file exists"),
                ))
            }
            None => self.parent_dir_of(caller, dst)?,
        };
        if self.lookup(dst_dir.id, &dst_name)?.is_some() {
            return Err(refused(
                ErrorCode::AlreadyExists,
                format!("{}: exists", path::join(dst, &dst_name)),
            ));
        }
        // Refuse moving a directory under itself: walk up from the destination.
        let mut cur = dst_dir.clone();
        loop {
            if cur.id == node.id {
                return Err(refused(
                    ErrorCode::InvalidArgument,
                    format!("{src}: cannot move a directory into itself"),
                ));
            }
            if cur.id == ROOT {
                break;
            }
            cur = self.must_get(cur.parent)?;
        }
        let op = MetaOp::Rename {
            inode: node.id,
            dst_parent: dst_dir.id,
            dst_name,
            mtime_ms: now_ms,
        };
        self.check_quotas(&self.charges_of(&op)?)?;
        Ok(op)
    }

    /// The answer remembered for change `id` of `user`, if it is still kept.
    pub fn remembered(&self, id: &RequestId, user: &str) -> Result<Option<Vec<u8>>, Error> {
        Ok(self
            .store
            .get(&request_key(id, user))?
            .map(|v| v.get(8..).unwrap_or_default().to_vec()))
    }

    /// Whether any remembered answer is older than `before_ms` (so that forgetting does something).
    pub fn forget_due(&self, before_ms: u64) -> Result<bool, Error> {
        Ok(self
            .requests_from()?
            .is_some_and(|from| from < before_ms / REQUEST_BUCKET_MS))
    }

    fn requests_from(&self) -> Result<Option<u64>, Error> {
        self.store
            .get(REQUESTS_FROM_KEY)?
            .map(|v| {
                <[u8; 8]>::try_from(v.as_slice())
                    .map(u64::from_be_bytes)
                    .map_err(|_| Error::Corrupt("bad remembered-requests bucket".into()))
            })
            .transpose()
    }

    /// Applies one edit (already validated, or replayed from the log) as an atomic batch that also
    /// records `seq` as the last edit applied.
    pub fn apply(&self, seq: u64, op: &MetaOp) -> Result<Applied, Error> {
        let mut batch: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        let mut applied = Applied::default();
        // Quotas first: what the edit adds or frees, read before it changes anything (a quota
        // record the edit deletes is deleted after, and stays deleted).
        for (dir, (mut q, names, space)) in self.charged(&self.charges_of(op)?)? {
            q.names_used = (i128::from(q.names_used) + names).max(0) as u64;
            q.space_used = (i128::from(q.space_used) + space).max(0) as u64;
            batch.push((quota_key(dir), Some(encode(&q)?)));
        }
        match op {
            MetaOp::Mkdir {
                parent,
                name,
                inode,
                mtime_ms,
                perm,
            } => {
                let node = Inode {
                    id: *inode,
                    parent: *parent,
                    name: name.clone(),
                    mtime_ms: *mtime_ms,
                    kind: InodeKind::Directory,
                    perm: perm.clone(),
                };
                batch.push((inode_key(*inode), Some(encode(&node)?)));
                batch.push((
                    dirent_key(*parent, name),
                    Some(inode.0.to_be_bytes().to_vec()),
                ));
            }
            MetaOp::Create {
                parent,
                name,
                inode,
                replication,
                block_size,
                session,
                mtime_ms,
                replaces,
                target_name,
                perm,
            } => {
                if let Some(old) = replaces {
                    self.delete_subtree(*old, &mut batch, &mut applied)?;
                }
                let node = Inode {
                    id: *inode,
                    parent: *parent,
                    name: name.clone(),
                    mtime_ms: *mtime_ms,
                    kind: InodeKind::File {
                        replication: *replication,
                        block_size: *block_size,
                        size: 0,
                        block_count: 0,
                        writer: Some(*session),
                        target_name: target_name.clone(),
                    },
                    perm: perm.clone(),
                };
                batch.push((inode_key(*inode), Some(encode(&node)?)));
                batch.push((
                    dirent_key(*parent, name),
                    Some(inode.0.to_be_bytes().to_vec()),
                ));
                applied.leased = Some((*session, *inode));
            }
            MetaOp::AddBlock {
                inode,
                block,
                previous,
            } => {
                let mut node = self.must_get(*inode)?;
                if let InodeKind::File {
                    block_count,
                    replication,
                    ..
                } = &mut node.kind
                {
                    if self.commit_last(*inode, *block_count, *previous, &mut batch)? {
                        applied.committed.extend(*previous);
                    }
                    let new = BlockMeta {
                        id: *block,
                        len: 0,
                        cv: None,
                    };
                    batch.push((block_key(*inode, *block_count), Some(encode(&new)?)));
                    *block_count += 1;
                    applied.added = Some((*block, *inode, *replication));
                }
                batch.push((inode_key(*inode), Some(encode(&node)?)));
            }
            MetaOp::AbandonBlock { inode, block } => {
                let mut node = self.must_get(*inode)?;
                if let InodeKind::File { block_count, .. } = &mut node.kind {
                    let last = self.last_block(*inode, *block_count)?;
                    if last.is_some_and(|b| b.id == *block) {
                        *block_count -= 1;
                        batch.push((block_key(*inode, *block_count), None));
                        applied.freed.push(*block);
                    }
                }
                batch.push((inode_key(*inode), Some(encode(&node)?)));
            }
            MetaOp::Complete {
                inode,
                last,
                size,
                mtime_ms,
                rename,
            } => {
                let mut node = self.must_get(*inode)?;
                node.mtime_ms = *mtime_ms;
                if let InodeKind::File {
                    block_count,
                    writer,
                    size: s,
                    target_name,
                    ..
                } = &mut node.kind
                {
                    if self.commit_last(*inode, *block_count, *last, &mut batch)? {
                        applied.committed.extend(*last);
                    }
                    *writer = None;
                    *s = *size;
                    *target_name = None;
                    applied.completed = self.blocks(*inode)?.iter().map(|b| b.id).collect();
                }
                applied.released.push(*inode);
                if let Some((target, replaces)) = rename {
                    if let Some(old) = replaces {
                        self.delete_subtree(*old, &mut batch, &mut applied)?;
                    }
                    batch.push((dirent_key(node.parent, &node.name), None));
                    node.name = target.clone();
                    batch.push((
                        dirent_key(node.parent, target),
                        Some(inode.0.to_be_bytes().to_vec()),
                    ));
                }
                batch.push((inode_key(*inode), Some(encode(&node)?)));
            }
            MetaOp::Delete { inode } => {
                self.delete_subtree(*inode, &mut batch, &mut applied)?;
            }
            MetaOp::SetReplication { files, replication } => {
                for id in files {
                    let Some(mut node) = self.get(*id)? else {
                        continue;
                    };
                    if let InodeKind::File { replication: r, .. } = &mut node.kind {
                        *r = *replication;
                        applied
                            .replication
                            .extend(self.blocks(*id)?.iter().map(|b| (b.id, *replication)));
                    }
                    batch.push((inode_key(*id), Some(encode(&node)?)));
                }
            }
            MetaOp::SetDecommission { datanode, on } => {
                let value = if *on {
                    Some(vec![FORMAT_VERSION])
                } else {
                    None
                };
                batch.push((decommission_key(datanode), value));
                applied.decommission = Some((datanode.clone(), *on));
            }
            MetaOp::AddPlugin(record) => {
                batch.push((plugin_key(&record.hash), Some(encode(record)?)));
            }
            MetaOp::ApprovePlugin { hash } => {
                if let Some(mut record) = self.get_plugin(hash)? {
                    record.approved = true;
                    batch.push((plugin_key(hash), Some(encode(&record)?)));
                }
            }
            MetaOp::Rename {
                inode,
                dst_parent,
                dst_name,
                mtime_ms,
            } => {
                let mut node = self.must_get(*inode)?;
                batch.push((dirent_key(node.parent, &node.name), None));
                node.parent = *dst_parent;
                node.name = dst_name.clone();
                node.mtime_ms = *mtime_ms;
                batch.push((inode_key(*inode), Some(encode(&node)?)));
                batch.push((
                    dirent_key(*dst_parent, dst_name),
                    Some(inode.0.to_be_bytes().to_vec()),
                ));
            }
            MetaOp::SetQuota {
                inode,
                names,
                bytes,
            } => {
                let had = self.quota(*inode)?.is_some();
                let count = self.quota_count()?;
                let count = if names.is_none() && bytes.is_none() {
                    batch.push((quota_key(*inode), None));
                    count.saturating_sub(u64::from(had))
                } else {
                    let (names_used, space_used) = self.tree_usage(*inode)?;
                    let q = Quota {
                        names: *names,
                        bytes: *bytes,
                        names_used,
                        space_used,
                    };
                    batch.push((quota_key(*inode), Some(encode(&q)?)));
                    count + u64::from(!had)
                };
                batch.push((QUOTAS_KEY.to_vec(), Some(count.to_be_bytes().to_vec())));
            }
            MetaOp::SetAttributes {
                inodes,
                owner,
                group,
                mode,
            } => {
                for id in inodes {
                    let Some(mut node) = self.get(*id)? else {
                        continue;
                    };
                    if let Some(o) = owner {
                        node.perm.owner = o.clone();
                    }
                    if let Some(g) = group {
                        node.perm.group = g.clone();
                    }
                    if let Some(m) = mode {
                        node.perm.mode = m.apply(node.perm.mode, node.is_dir());
                    }
                    batch.push((inode_key(*id), Some(encode(&node)?)));
                }
            }
            MetaOp::SetTimes { inode, mtime_ms } => {
                if let Some(mut node) = self.get(*inode)? {
                    node.mtime_ms = *mtime_ms;
                    batch.push((inode_key(*inode), Some(encode(&node)?)));
                }
            }
            MetaOp::Remember {
                id,
                user,
                at_ms,
                reply,
            } => {
                let key = request_key(id, user);
                let bucket = at_ms / REQUEST_BUCKET_MS;
                let mut filed = request_bucket(bucket);
                filed.extend_from_slice(&key[1..]);
                let mut value = at_ms.to_be_bytes().to_vec();
                value.extend_from_slice(reply);
                batch.push((key, Some(value)));
                batch.push((filed, Some(vec![])));
                if self.store.get(REQUESTS_FROM_KEY)?.is_none() {
                    batch.push((
                        REQUESTS_FROM_KEY.to_vec(),
                        Some(bucket.to_be_bytes().to_vec()),
                    ));
                }
            }
            MetaOp::ForgetRequests { before_ms } => {
                if let Some(from) = self.requests_from()? {
                    let until = before_ms / REQUEST_BUCKET_MS;
                    for bucket in from..until {
                        for (filed, _) in self.store.scan_prefix(&request_bucket(bucket))? {
                            let mut key = vec![b'r'];
                            key.extend_from_slice(&filed[9..]);
                            batch.push((key, None));
                            batch.push((filed, None));
                        }
                    }
                    if until > from {
                        batch.push((
                            REQUESTS_FROM_KEY.to_vec(),
                            Some(until.to_be_bytes().to_vec()),
                        ));
                    }
                }
            }
        }
        if let Some(ids) = self.advanced_ids(op)? {
            batch.push((NEXT_IDS_KEY.to_vec(), Some(ids)));
        }
        batch.push((LAST_APPLIED_KEY.to_vec(), Some(seq.to_be_bytes().to_vec())));
        self.store.apply_batch(batch)?;
        Ok(applied)
    }

    /// The new value of the id counters if `op` consumes an id at or above them.
    fn advanced_ids(&self, op: &MetaOp) -> Result<Option<Vec<u8>>, Error> {
        let (mut inode, mut block) = self.next_ids()?;
        match op {
            MetaOp::Mkdir { inode: id, .. } | MetaOp::Create { inode: id, .. } => {
                if id.0 < inode {
                    return Ok(None);
                }
                inode = id.0.saturating_add(1);
            }
            MetaOp::AddBlock { block: id, .. } => {
                if id.0 < block {
                    return Ok(None);
                }
                block = id.0.saturating_add(1);
            }
            _ => return Ok(None),
        }
        let mut v = Vec::with_capacity(16);
        v.extend_from_slice(&inode.to_be_bytes());
        v.extend_from_slice(&block.to_be_bytes());
        Ok(Some(v))
    }

    /// Commits the length and value of the last of `count` blocks of `inode` into `batch`; true
    /// if `commit` named it.
    fn commit_last(
        &self,
        inode: InodeId,
        count: u64,
        commit: Option<CommittedBlock>,
        batch: &mut Vec<(Vec<u8>, Option<Vec<u8>>)>,
    ) -> Result<bool, Error> {
        let (Some(c), Some(mut last)) = (commit, self.last_block(inode, count)?) else {
            return Ok(false);
        };
        if last.id != c.id {
            return Ok(false);
        }
        last.len = c.len;
        last.cv = Some(c.cv);
        batch.push((block_key(inode, count - 1), Some(encode(&last)?)));
        Ok(true)
    }

    fn delete_subtree(
        &self,
        root: InodeId,
        batch: &mut Vec<(Vec<u8>, Option<Vec<u8>>)>,
        applied: &mut Applied,
    ) -> Result<(), Error> {
        let top = self.must_get(root)?;
        batch.push((dirent_key(top.parent, &top.name), None));
        let quotas = self.quota_count()?;
        let mut gone = 0;
        let mut stack = vec![top];
        while let Some(node) = stack.pop() {
            batch.push((inode_key(node.id), None));
            match node.kind {
                InodeKind::Directory => {
                    if quotas > 0 && self.quota(node.id)?.is_some() {
                        batch.push((quota_key(node.id), None));
                        gone += 1;
                    }
                    for (name, child) in self.children(node.id)? {
                        batch.push((dirent_key(node.id, &name), None));
                        stack.push(self.must_get(child)?);
                    }
                }
                InodeKind::File { writer, .. } => {
                    for (k, v) in self.store.scan_prefix(&blocks_prefix(node.id))? {
                        applied.freed.push(decode_block(&v)?.id);
                        batch.push((k, None));
                    }
                    if writer.is_some() {
                        applied.released.push(node.id);
                    }
                }
            }
        }
        if gone > 0 {
            let left = quotas.saturating_sub(gone);
            batch.push((QUOTAS_KEY.to_vec(), Some(left.to_be_bytes().to_vec())));
        }
        Ok(())
    }
}

/// Sequence number of the last edit applied to `store` (0 for a new one).
pub fn read_last_applied<S: MetaStore>(store: &S) -> Result<u64, Error> {
    store
        .get(LAST_APPLIED_KEY)?
        .map(|v| u64_value(&v))
        .transpose()
        .map(|v| v.unwrap_or(0))
}

/// Files named by one `SetReplication` edit at most, so every edit stays far below
/// [`crate::editlog::RECORD_BYTES_MAX`] (an inode id takes at most 10 bytes): a setrep over more
/// files is logged as several edits, in path order, all in one group before the reply.
pub const SETREP_FILES_PER_EDIT: usize = 65_536;

/// The trash directory in a user's home.
pub const TRASH_DIR: &str = ".Trash";
/// Where deleted entries go until the next checkpoint.
pub const TRASH_CURRENT: &str = "Current";

/// The hidden name a file is written under while it replaces `name`.
pub fn replacing_name(name: &str) -> String {
    format!(".{name}.lode-replacing")
}

fn not_found(p: &str) -> Error {
    refused(
        ErrorCode::NotFound,
        format!("{p}: no such file or directory"),
    )
}

fn path_of_parent(p: &str) -> String {
    path::split_parent(p).map_or_else(|| "/".to_string(), |(parent, _)| parent.to_string())
}

fn exhausted() -> Error {
    refused(
        ErrorCode::InvalidArgument,
        "the namespace has issued every id",
    )
}

/// How far beyond the next block id a reported replica may raise the floor (2^40 blocks).
pub const FLOOR_REACH: u64 = 1 << 40;

/// Allocates inode and block ids; owned by the namespace writer.
#[derive(Debug)]
pub struct IdAlloc {
    next_inode: u64,
    next_block: u64,
}

impl IdAlloc {
    /// Starts at the durable counters, and after every id still in use (a store written before
    /// the counters existed has only the latter).
    pub fn recover<S: MetaStore>(ns: &Namespace<S>, stored: &Stored) -> Result<IdAlloc, Error> {
        let mut a = IdAlloc::in_use(stored);
        let (inode, block) = ns.next_ids()?;
        a.next_inode = a.next_inode.max(inode);
        a.next_block = a.next_block.max(block);
        Ok(a)
    }

    /// Moves past the durable counters of `ns` (another leader of the group may have issued ids
    /// since this writer last did).
    pub fn catch_up<S: MetaStore>(&mut self, ns: &Namespace<S>) -> Result<(), Error> {
        let (inode, block) = ns.next_ids()?;
        self.next_inode = self.next_inode.max(inode);
        self.next_block = self.next_block.max(block);
        Ok(())
    }

    /// Never issues `block` or anything below it (a datanode reported a replica with that id,
    /// which a namenode restored from an older backup may not know). An id more than
    /// [`FLOOR_REACH`] beyond the next one to issue is no block this namespace ever issued (no
    /// cluster allocates that many between a backup and its restore): it leaves the floor alone,
    /// or one report could use up every id.
    pub fn raise_block_floor(&mut self, block: BlockId) {
        if block.0 < self.next_block.saturating_add(FLOOR_REACH) {
            self.see_block(block);
        }
    }

    /// Starts after the largest ids in use.
    pub fn in_use(stored: &Stored) -> IdAlloc {
        let mut a = IdAlloc {
            next_inode: ROOT.0 + 1,
            next_block: 1,
        };
        for i in &stored.inodes {
            a.see_inode(i.id);
        }
        for b in stored.blocks.values().flatten() {
            a.see_block(b.id);
        }
        a
    }

    fn see_inode(&mut self, id: InodeId) {
        self.next_inode = self.next_inode.max(id.0.saturating_add(1));
    }

    fn see_block(&mut self, id: BlockId) {
        self.next_block = self.next_block.max(id.0.saturating_add(1));
    }

    fn inode(&mut self) -> Result<InodeId, Error> {
        let id = InodeId(self.next_inode);
        self.next_inode = self.next_inode.checked_add(1).ok_or_else(exhausted)?;
        Ok(id)
    }

    fn block(&mut self) -> Result<BlockId, Error> {
        let id = BlockId(self.next_block);
        self.next_block = self.next_block.checked_add(1).ok_or_else(exhausted)?;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn su() -> Caller {
        Caller::superuser()
    }
    use crate::store::MemStore;

    fn setup() -> (Namespace<MemStore>, IdAlloc, u64) {
        let ns = Namespace::open(Arc::new(MemStore::default())).unwrap();
        let ids = IdAlloc::in_use(&ns.load_all().unwrap());
        (ns, ids, 0)
    }

    fn run(ns: &Namespace<MemStore>, seq: &mut u64, ops: Vec<MetaOp>) -> Applied {
        let mut last = Applied::default();
        for op in ops {
            *seq += 1;
            last = ns.apply(*seq, &op).unwrap();
        }
        last
    }

    #[test]
    fn a_store_of_format_1_is_migrated_when_opened() {
        let v1 = |node: &InodeV1| {
            let mut v = vec![FORMAT_V1];
            v.extend(postcard::to_stdvec(node).unwrap());
            v
        };
        let blocks: Vec<BlockMeta> = (1..=3)
            .map(|i| BlockMeta {
                id: BlockId(i),
                len: 10 * i,
                cv: Some(Blake3Cv([i as u8; 32])),
            })
            .collect();
        let root = InodeV1 {
            id: ROOT,
            parent: ROOT,
            name: String::new(),
            mtime_ms: 0,
            kind: InodeKindV1::Directory,
        };
        let file = InodeV1 {
            id: InodeId(5),
            parent: ROOT,
            name: "f".into(),
            mtime_ms: 7,
            kind: InodeKindV1::File {
                replication: 2,
                block_size: 30,
                size: 60,
                blocks: blocks.clone(),
                writer: None,
                target_name: None,
            },
        };
        let store = Arc::new(MemStore::default());
        store
            .apply_batch(vec![
                (inode_key(ROOT), Some(v1(&root))),
                (inode_key(InodeId(5)), Some(v1(&file))),
                (dirent_key(ROOT, "f"), Some(5u64.to_be_bytes().to_vec())),
                (LAST_APPLIED_KEY.to_vec(), Some(9u64.to_be_bytes().to_vec())),
            ])
            .unwrap();
        let ns = Namespace::open(store).unwrap();
        let f = ns.resolve_existing("/f").unwrap();
        assert!(matches!(
            f.kind,
            InodeKind::File {
                block_count: 3,
                size: 60,
                replication: 2,
                ..
            }
        ));
        assert_eq!(ns.blocks(f.id).unwrap(), blocks);
        assert_eq!(ns.last_applied().unwrap(), 9, "the migration is no edit");
        let stored = ns.load_all().unwrap();
        assert_eq!(stored.blocks[&InodeId(5)], blocks);
        assert!(IdAlloc::in_use(&stored).next_block > 3);
    }

    #[test]
    fn a_store_of_format_2_reads_as_the_superusers_and_changes_write_format_3() {
        let v2 = |node: &InodeV2| {
            let mut v = vec![FORMAT_V2];
            v.extend(postcard::to_stdvec(node).unwrap());
            v
        };
        let dir = |id: u64, name: &str| InodeV2 {
            id: InodeId(id),
            parent: ROOT,
            name: name.into(),
            mtime_ms: 1,
            kind: InodeKind::Directory,
        };
        let file = InodeV2 {
            id: InodeId(6),
            parent: InodeId(5),
            name: "f".into(),
            mtime_ms: 2,
            kind: InodeKind::File {
                replication: 1,
                block_size: 65536,
                size: 0,
                block_count: 0,
                writer: None,
                target_name: None,
            },
        };
        let store = Arc::new(MemStore::default());
        store
            .apply_batch(vec![
                (inode_key(ROOT), Some(v2(&dir(1, "")))),
                (inode_key(InodeId(5)), Some(v2(&dir(5, "d")))),
                (inode_key(InodeId(6)), Some(v2(&file))),
                (dirent_key(ROOT, "d"), Some(5u64.to_be_bytes().to_vec())),
                (
                    dirent_key(InodeId(5), "f"),
                    Some(6u64.to_be_bytes().to_vec()),
                ),
                (LAST_APPLIED_KEY.to_vec(), Some(4u64.to_be_bytes().to_vec())),
            ])
            .unwrap();
        let ns = Namespace::open(store).unwrap();
        let d = ns.resolve_existing("/d").unwrap();
        let f = ns.resolve_existing("/d/f").unwrap();
        assert_eq!(d.perm, Perm::legacy(true));
        assert_eq!(f.perm, Perm::legacy(false));
        assert_eq!((d.perm.mode, f.perm.mode), (0o755, 0o644));
        assert_eq!(f.perm.owner, crate::perm::SUPERUSER);
        // A user may read the old entries but change nothing in them.
        let alice = crate::perm::Groups::default().caller("alice", false);
        assert!(ns.accessible(&alice, "/d/f", READ).is_ok());
        let (_, mut ids, mut seq) = setup();
        seq += 4;
        assert!(ns
            .prepare_create(
                &alice,
                "/d/g",
                false,
                1,
                65536,
                0o644,
                SessionId(1),
                &mut ids,
                3
            )
            .is_err());
        let chmod = ns
            .prepare_set_attributes(
                &su(),
                "/d/f",
                None,
                None,
                Some(ModeChange::Set(0o600)),
                false,
            )
            .unwrap();
        run(&ns, &mut seq, chmod);
        assert_eq!(
            ns.store().get(&inode_key(InodeId(6))).unwrap().unwrap()[0],
            FORMAT_VERSION
        );
        assert_eq!(ns.resolve_existing("/d/f").unwrap().perm.mode, 0o600);
        assert!(ns.accessible(&alice, "/d/f", READ).is_err());
    }

    #[test]
    fn edits_of_format_1_decode_with_the_owners_of_that_time() {
        #[derive(Serialize)]
        struct OldMkdir {
            parent: InodeId,
            name: String,
            inode: InodeId,
            mtime_ms: u64,
        }
        let mut body = vec![0u8];
        body.extend(
            postcard::to_stdvec(&OldMkdir {
                parent: ROOT,
                name: "old".into(),
                inode: InodeId(9),
                mtime_ms: 3,
            })
            .unwrap(),
        );
        assert_eq!(
            decode_edit_v1(&body).unwrap(),
            MetaOp::Mkdir {
                parent: ROOT,
                name: "old".into(),
                inode: InodeId(9),
                mtime_ms: 3,
                perm: Perm::legacy(true),
            }
        );
        // Edits that did not change decode as they are.
        let delete = MetaOp::Delete { inode: InodeId(9) };
        let bytes = postcard::to_stdvec(&delete).unwrap();
        assert_eq!(decode_edit_v1(&bytes).unwrap(), delete);
        assert!(decode_edit_v1(&[1, 0xff]).is_err());
    }

    #[test]
    fn permissions_are_checked_as_posix_checks_them() {
        let (ns, mut ids, mut seq) = setup();
        let groups = crate::perm::Groups::new(&BTreeMap::from([(
            "staff".to_string(),
            vec!["alice".to_string(), "bob".to_string()],
        )]))
        .unwrap();
        let (alice, bob, eve) = (
            groups.caller("alice", false),
            groups.caller("bob", false),
            groups.caller("eve", false),
        );
        let made = ns
            .prepare_mkdir(&su(), "/home/alice", true, 0o755, &mut ids, 1)
            .unwrap();
        run(&ns, &mut seq, made);
        let tmp = ns
            .prepare_mkdir(&su(), "/tmp", false, 0o777, &mut ids, 1)
            .unwrap();
        run(&ns, &mut seq, tmp);
        let ops = ns
            .prepare_set_attributes(
                &su(),
                "/home/alice",
                Some("alice".into()),
                Some("staff".into()),
                None,
                false,
            )
            .unwrap();
        run(&ns, &mut seq, ops);
        let sticky = ns
            .prepare_set_attributes(
                &su(),
                "/tmp",
                None,
                None,
                Some(ModeChange::Set(0o1777)),
                false,
            )
            .unwrap();
        run(&ns, &mut seq, sticky);
        // Only the owner writes in a 0755 directory; new entries take the directory's group.
        let create = |who: &Caller, p: &str, ids: &mut IdAlloc| {
            ns.prepare_create(who, p, false, 1, 65536, 0o640, SessionId(1), ids, 2)
        };
        assert!(create(&bob, "/home/alice/f", &mut ids).is_err());
        let op = create(&alice, "/home/alice/f", &mut ids).unwrap();
        let MetaOp::Create { perm, .. } = &op else {
            panic!()
        };
        assert_eq!(
            (perm.owner.as_str(), perm.group.as_str(), perm.mode),
            ("alice", "staff", 0o640)
        );
        run(&ns, &mut seq, vec![op]);
        // 0640: the group reads, others do not; nobody but the owner writes.
        assert!(ns.accessible(&bob, "/home/alice/f", READ).is_ok());
        assert!(ns.accessible(&eve, "/home/alice/f", READ).is_err());
        assert!(ns.accessible(&bob, "/home/alice/f", WRITE).is_err());
        assert!(ns.prepare_setrep(&bob, "/home/alice/f", 2).is_err());
        assert!(ns.prepare_delete(&bob, "/home/alice/f", false).is_err());
        assert!(ns
            .prepare_rename(&bob, "/home/alice/f", "/tmp/f", 3)
            .is_err());
        assert!(ns
            .prepare_set_attributes(
                &bob,
                "/home/alice/f",
                None,
                None,
                Some(ModeChange::Set(0o777)),
                false
            )
            .is_err());
        assert!(
            ns.prepare_set_attributes(
                &alice,
                "/home/alice/f",
                Some("bob".into()),
                None,
                None,
                false
            )
            .is_err(),
            "only a superuser gives a file away"
        );
        assert!(
            ns.prepare_set_attributes(
                &alice,
                "/home/alice/f",
                None,
                Some("other".into()),
                None,
                false
            )
            .is_err(),
            "only to a group the owner is in"
        );
        // Without search on a directory nothing under it resolves.
        let closed = ns
            .prepare_set_attributes(
                &alice,
                "/home/alice",
                None,
                None,
                Some(ModeChange::Set(0o700)),
                false,
            )
            .unwrap();
        run(&ns, &mut seq, closed);
        assert!(ns.resolve_as(&bob, "/home/alice/f").is_err());
        assert!(ns.resolve_as(&alice, "/home/alice/f").unwrap().is_some());
        // The sticky /tmp: anyone creates, only the owner removes or moves.
        let op = create(&bob, "/tmp/b", &mut ids).unwrap();
        run(&ns, &mut seq, vec![op]);
        assert!(ns.prepare_delete(&eve, "/tmp/b", false).is_err());
        assert!(ns.prepare_rename(&eve, "/tmp/b", "/tmp/c", 3).is_err());
        assert!(ns.prepare_delete(&bob, "/tmp/b", false).is_ok());
        assert!(ns.prepare_delete(&su(), "/tmp/b", false).is_ok());
        // rm -r needs write on every directory under the one removed.
        let op = ns
            .prepare_mkdir(&eve, "/tmp/e/locked", true, 0o755, &mut ids, 4)
            .unwrap();
        run(&ns, &mut seq, op);
        let op = create(&eve, "/tmp/e/locked/x", &mut ids).unwrap();
        run(&ns, &mut seq, vec![op]);
        let lock = ns
            .prepare_set_attributes(
                &eve,
                "/tmp/e/locked",
                None,
                None,
                Some(ModeChange::Set(0o555)),
                false,
            )
            .unwrap();
        run(&ns, &mut seq, lock);
        assert!(ns.prepare_delete(&eve, "/tmp/e", true).is_err());
        assert!(ns.prepare_delete(&su(), "/tmp/e", true).is_ok());
    }

    #[test]
    fn quotas_count_names_and_replicated_bytes_and_refuse_what_would_pass_them() {
        let (ns, mut ids, mut seq) = setup();
        let su = su();
        for p in ["/q", "/s", "/out"] {
            let op = ns.prepare_mkdir(&su, p, false, 0o755, &mut ids, 1).unwrap();
            run(&ns, &mut seq, op);
        }
        let q = ns.prepare_set_quota("/q", Some(4), None, false).unwrap();
        run(&ns, &mut seq, vec![q]);
        let used = |p: &str| {
            let id = ns.resolve_existing(p).unwrap().id;
            ns.quota(id).unwrap().unwrap()
        };
        assert_eq!(used("/q").names_used, 1, "the directory counts itself");
        let op = ns
            .prepare_mkdir(&su, "/q/a", false, 0o755, &mut ids, 1)
            .unwrap();
        run(&ns, &mut seq, op);
        let f = ns
            .prepare_create(
                &su,
                "/q/f",
                false,
                1,
                65536,
                0o644,
                SessionId(1),
                &mut ids,
                1,
            )
            .unwrap();
        run(&ns, &mut seq, vec![f]);
        let e = ns
            .prepare_mkdir(&su, "/q/b/c", true, 0o755, &mut ids, 1)
            .unwrap_err();
        assert!(e.to_string().contains("/q: the name quota of 4"), "{e}");
        let op = ns
            .prepare_mkdir(&su, "/q/b", false, 0o755, &mut ids, 1)
            .unwrap();
        run(&ns, &mut seq, op);
        assert_eq!(used("/q").names_used, 4);
        assert!(ns
            .prepare_create(
                &su,
                "/q/g",
                false,
                1,
                65536,
                0o644,
                SessionId(2),
                &mut ids,
                1
            )
            .is_err());
        run(
            &ns,
            &mut seq,
            vec![ns.prepare_delete(&su, "/q/a", false).unwrap()],
        );
        assert_eq!(used("/q").names_used, 3);

        // Space: three 64 KiB blocks at replication 2 fit in 6 x 64 KiB; a block being written
        // counts whole, a committed one by its length.
        let q = ns
            .prepare_set_quota("/s", None, Some(6 * 65536), false)
            .unwrap();
        run(&ns, &mut seq, vec![q]);
        let s1 = SessionId(3);
        let create = ns
            .prepare_create(&su, "/s/f", false, 2, 65536, 0o644, s1, &mut ids, 1)
            .unwrap();
        let MetaOp::Create { inode, .. } = create else {
            panic!()
        };
        run(&ns, &mut seq, vec![create]);
        let mut previous = None;
        for i in 0..3u8 {
            let add = ns.prepare_add_block(inode, s1, previous, &mut ids).unwrap();
            let MetaOp::AddBlock { block, .. } = add else {
                panic!()
            };
            run(&ns, &mut seq, vec![add]);
            previous = Some(CommittedBlock {
                id: block,
                len: 65536,
                cv: Blake3Cv([i; 32]),
            });
        }
        assert_eq!(used("/s").space_used, 6 * 65536);
        let e = ns
            .prepare_add_block(inode, s1, previous, &mut ids)
            .unwrap_err();
        assert!(e.to_string().contains("/s: the space quota"), "{e}");
        let last = CommittedBlock {
            len: 10,
            ..previous.unwrap()
        };
        let done = ns
            .prepare_complete(inode, s1, Some(last), 2 * 65536 + 10, 2)
            .unwrap();
        run(&ns, &mut seq, vec![done]);
        assert_eq!(used("/s").space_used, 2 * (2 * 65536 + 10));
        assert!(
            ns.prepare_setrep(&su, "/s/f", 3).is_err(),
            "a third replica does not fit"
        );
        let ops = ns.prepare_setrep(&su, "/s/f", 1).unwrap();
        run(&ns, &mut seq, ops);
        assert_eq!(used("/s").space_used, 2 * 65536 + 10);
        // Moving the file out frees its charge; moving it back in is checked.
        run(
            &ns,
            &mut seq,
            vec![ns.prepare_rename(&su, "/s/f", "/out/f", 3).unwrap()],
        );
        assert_eq!(used("/s").space_used, 0);
        let q = ns
            .prepare_set_quota("/s", None, Some(65536), false)
            .unwrap();
        run(&ns, &mut seq, vec![q]);
        assert!(ns.prepare_rename(&su, "/out/f", "/s/f", 3).is_err());
        // Clearing and deleting remove the records; nothing is charged then.
        run(
            &ns,
            &mut seq,
            vec![ns.prepare_set_quota("/s", None, None, true).unwrap()],
        );
        assert!(ns
            .quota(ns.resolve_existing("/s").unwrap().id)
            .unwrap()
            .is_none());
        run(
            &ns,
            &mut seq,
            vec![ns.prepare_delete(&su, "/q", true).unwrap()],
        );
        assert_eq!(ns.quota_count().unwrap(), 0);
    }

    #[test]
    fn mkdir_create_write_rename_delete() {
        let (ns, mut ids, mut seq) = setup();
        let ops = ns
            .prepare_mkdir(&su(), "/a/b", true, 0o755, &mut ids, 5)
            .unwrap();
        assert_eq!(ops.len(), 2);
        run(&ns, &mut seq, ops);
        assert!(ns
            .prepare_mkdir(&su(), "/a/b", false, 0o755, &mut ids, 5)
            .is_err());
        assert!(ns
            .prepare_mkdir(&su(), "/x/y", false, 0o755, &mut ids, 5)
            .is_err());
        let s = SessionId(9);
        let create = ns
            .prepare_create(&su(), "/a/b/f", false, 2, 65536, 0o644, s, &mut ids, 6)
            .unwrap();
        let inode = match &create {
            MetaOp::Create { inode, .. } => *inode,
            _ => unreachable!(),
        };
        run(&ns, &mut seq, vec![create]);
        // a second writer is refused while the first holds the lease
        let e = ns
            .prepare_create(
                &su(),
                "/a/b/f",
                true,
                2,
                65536,
                0o644,
                SessionId(10),
                &mut ids,
                6,
            )
            .unwrap_err();
        assert!(matches!(
            e,
            Error::Refused {
                code: ErrorCode::LeaseConflict,
                ..
            }
        ));
        let add = ns.prepare_add_block(inode, s, None, &mut ids).unwrap();
        let b1 = match &add {
            MetaOp::AddBlock { block, .. } => *block,
            _ => unreachable!(),
        };
        run(&ns, &mut seq, vec![add]);
        // a partial block cannot be followed by another
        let partial = CommittedBlock {
            id: b1,
            len: 10,
            cv: Blake3Cv([1; 32]),
        };
        assert!(ns
            .prepare_add_block(inode, s, Some(partial), &mut ids)
            .is_err());
        assert!(ns.prepare_complete(inode, s, Some(partial), 11, 7).is_err());
        let done = ns.prepare_complete(inode, s, Some(partial), 10, 7).unwrap();
        let applied = run(&ns, &mut seq, vec![done]);
        assert_eq!(applied.completed, vec![b1]);
        let f = ns.resolve_existing("/a/b/f").unwrap();
        assert_eq!(ns.status("/a/b/f", &f, true).unwrap().blocks[0].len, 10);
        assert!(ns
            .prepare_mkdir(&su(), "/a/b/f/g", true, 0o755, &mut ids, 8)
            .is_err());
        assert!(ns.prepare_delete(&su(), "/a", false).is_err());
        assert!(ns.prepare_rename(&su(), "/a", "/a/b/c", 9).is_err());
        run(
            &ns,
            &mut seq,
            vec![ns.prepare_rename(&su(), "/a/b/f", "/g", 9).unwrap()],
        );
        assert!(ns.resolve("/a/b/f").unwrap().is_none());
        assert_eq!(ns.usage(&ns.resolve_existing("/").unwrap()).unwrap().2, 10);
        let freed = run(
            &ns,
            &mut seq,
            vec![ns.prepare_delete(&su(), "/g", false).unwrap()],
        )
        .freed;
        assert_eq!(freed, vec![b1]);
        run(
            &ns,
            &mut seq,
            vec![ns.prepare_delete(&su(), "/a", true).unwrap()],
        );
        assert!(ns.children(ROOT).unwrap().is_empty());
        assert_eq!(ns.last_applied().unwrap(), seq);
        assert_eq!(ns.all_inodes().unwrap().len(), 1);
    }

    #[test]
    fn a_reported_id_raises_the_floor_only_within_reach_and_the_top_refuses() {
        let (ns, mut ids, mut seq) = setup();
        let s = SessionId(1);
        let create = ns
            .prepare_create(&su(), "/f", false, 1, 65536, 0o644, s, &mut ids, 1)
            .unwrap();
        let MetaOp::Create { inode, .. } = create else {
            unreachable!()
        };
        run(&ns, &mut seq, vec![create]);
        // A datanode claims a replica with the largest id there is: far beyond anything issued,
        // it does not move the floor (one report would otherwise use up every id).
        ids.raise_block_floor(BlockId(u64::MAX));
        let MetaOp::AddBlock { block, .. } =
            ns.prepare_add_block(inode, s, None, &mut ids).unwrap()
        else {
            unreachable!()
        };
        assert!(block.0 < 100, "{block}");
        // One within reach (a namenode restored from an older backup) does.
        ids.raise_block_floor(BlockId(block.0 + 1000));
        let MetaOp::AddBlock { block: next, .. } =
            ns.prepare_add_block(inode, s, None, &mut ids).unwrap()
        else {
            unreachable!()
        };
        assert_eq!(next.0, block.0 + 1001);
        // A store that holds an id at the very top: allocation is refused, not a panic.
        let mut top = IdAlloc::in_use(&Stored {
            inodes: vec![],
            blocks: [(
                inode,
                vec![BlockMeta {
                    id: BlockId(u64::MAX),
                    len: 1,
                    cv: None,
                }],
            )]
            .into(),
        });
        let e = ns.prepare_add_block(inode, s, None, &mut top).unwrap_err();
        assert!(matches!(e, Error::Refused { .. }), "{e}");
    }

    #[test]
    fn overwrite_keeps_the_old_file_until_the_new_one_is_complete() {
        let (ns, mut ids, mut seq) = setup();
        let s1 = SessionId(1);
        let write = |ns: &Namespace<MemStore>,
                     ids: &mut IdAlloc,
                     seq: &mut u64,
                     session,
                     overwrite,
                     len| {
            let create = ns
                .prepare_create(&su(), "/f", overwrite, 1, 65536, 0o644, session, ids, 1)
                .unwrap();
            let MetaOp::Create { inode, .. } = create else {
                unreachable!()
            };
            run(ns, seq, vec![create]);
            let add = ns.prepare_add_block(inode, session, None, ids).unwrap();
            let MetaOp::AddBlock { block, .. } = add else {
                unreachable!()
            };
            run(ns, seq, vec![add]);
            (
                inode,
                CommittedBlock {
                    id: block,
                    len,
                    cv: Blake3Cv([len as u8; 32]),
                },
            )
        };
        let (i1, b1) = write(&ns, &mut ids, &mut seq, s1, false, 10);
        run(
            &ns,
            &mut seq,
            vec![ns.prepare_complete(i1, s1, Some(b1), 10, 2).unwrap()],
        );
        // A second session overwrites: the old file stays in place while the new one is written.
        let s2 = SessionId(2);
        let (i2, b2) = write(&ns, &mut ids, &mut seq, s2, true, 20);
        assert_eq!(ns.resolve_existing("/f").unwrap().id, i1);
        assert_eq!(
            ns.resolve_existing(&format!("/{}", replacing_name("f")))
                .unwrap()
                .id,
            i2
        );
        // A third writer is refused while the second holds the lease.
        let e = ns
            .prepare_create(
                &su(),
                "/f",
                true,
                1,
                65536,
                0o644,
                SessionId(3),
                &mut ids,
                3,
            )
            .unwrap_err();
        assert!(matches!(
            e,
            Error::Refused {
                code: ErrorCode::LeaseConflict,
                ..
            }
        ));
        let applied = run(
            &ns,
            &mut seq,
            vec![ns.prepare_complete(i2, s2, Some(b2), 20, 4).unwrap()],
        );
        assert_eq!(applied.freed, vec![b1.id]);
        let f = ns.resolve_existing("/f").unwrap();
        assert_eq!(f.id, i2);
        assert_eq!(ns.status("/f", &f, false).unwrap().size, 20);
        assert_eq!(
            ns.children(ROOT).unwrap().len(),
            1,
            "the hidden name is gone"
        );
    }
}
