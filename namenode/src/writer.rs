//! The namespace writer: one thread that validates mutations, appends their edits to the log, applies
//! them to the store and the soft state, and makes each group of edits durable with one `fdatasync`
//! before any of their replies leave (group commit: concurrent clients share a sync).

use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use lode_protocol::messages::{CommittedBlock, LocatedBlock, NamenodeReply, PluginRecord, Target};
use lode_protocol::{Blake3Cv, BlockId, ErrorCode, InodeId, RequestId, SessionId};
use tokio::sync::{mpsc, oneshot};

use crate::editlog::Journal;
use crate::error::Error;
use crate::namespace::{Applied, IdAlloc, InodeKind, MetaOp, Namespace};
use crate::perm::Caller;
use crate::state::State;
use crate::store::{MetaStore, Overlay};

/// Most mutations taken into one group commit.
const GROUP_MAX: usize = 512;
/// Queue depth in front of the writer; senders wait when it is full.
const QUEUE_DEPTH: usize = 4096;

/// A namespace change requested by a client (paths already normalised).
#[derive(Debug)]
pub enum Mutation {
    /// mkdir.
    Mkdir {
        caller: Caller,
        path: String,
        parents: bool,
        mode: u16,
    },
    /// Create a file for writing.
    Create {
        caller: Caller,
        path: String,
        mode: u16,
        overwrite: bool,
        replication: u8,
        block_size: u64,
        session: SessionId,
        /// Also add the first block, placed on these datanodes.
        first_block: Option<Vec<Target>>,
    },
    /// Commit the previous block and add one placed on `targets`.
    AddBlock {
        inode: InodeId,
        session: SessionId,
        previous: Option<CommittedBlock>,
        targets: Vec<Target>,
    },
    /// Drop the last block.
    Abandon {
        inode: InodeId,
        session: SessionId,
        block: BlockId,
    },
    /// Close a file.
    Complete {
        inode: InodeId,
        session: SessionId,
        last: Option<CommittedBlock>,
        size: u64,
    },
    /// rm.
    Delete {
        caller: Caller,
        path: String,
        recursive: bool,
    },
    /// mv.
    Rename {
        caller: Caller,
        src: String,
        dst: String,
    },
    /// Change replication.
    SetReplication {
        caller: Caller,
        path: String,
        replication: u8,
    },
    /// rm into the trash: make the caller's trash directories as needed, then move the entry
    /// there (or delete it, if it is in the trash already).
    Trash {
        caller: Caller,
        path: String,
        recursive: bool,
    },
    /// The trash's periodic checkpoint (namenode's own work).
    TrashCheckpoint { interval_ms: u64 },
    /// Empty the caller's trash.
    Expunge { caller: Caller },
    /// Set or clear a directory's quotas.
    SetQuota {
        path: String,
        names: Option<u64>,
        bytes: Option<u64>,
        clear: bool,
    },
    /// chown, chgrp, chmod.
    SetAttributes {
        caller: Caller,
        path: String,
        owner: Option<String>,
        group: Option<String>,
        mode: Option<lode_protocol::perm::ModeChange>,
        recursive: bool,
    },
    /// `touch`: set an entry's modification time (to the writer's clock if `None`).
    SetTimes {
        caller: Caller,
        path: String,
        mtime_ms: Option<u64>,
    },
    /// Start or stop draining a datanode.
    Decommission { datanode: String, on: bool },
    /// Dump the metadata store (consistent: no change runs meanwhile); the bytes go to `out`.
    Backup {
        out: oneshot::Sender<(u64, Vec<u8>)>,
    },
    /// Register a plugin.
    AddPlugin(PluginRecord),
    /// Approve a plugin.
    ApprovePlugin { hash: Blake3Cv },
    /// A lease expired: delete the file if that session still writes it.
    Expire { inode: InodeId, session: SessionId },
    /// `mutation`, change `id` of `user`: if an earlier try committed, its answer again and
    /// nothing done; else done, and the answer remembered with it.
    Once {
        id: RequestId,
        user: String,
        mutation: Box<Mutation>,
    },
    /// Forget the answers remembered before `before_ms`.
    ForgetRequests { before_ms: u64 },
}

/// The same refusal again, for each reply of a group.
fn same(e: &Error) -> Error {
    match e {
        Error::Refused { code, message } => Error::refused(*code, message.clone()),
        other => Error::refused(ErrorCode::Unavailable, other.to_string()),
    }
}

struct Job {
    mutation: Mutation,
    reply: oneshot::Sender<Result<NamenodeReply, Error>>,
}

/// Sends mutations to the writer thread.
#[derive(Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<Job>,
}

impl WriterHandle {
    /// Submits a mutation and waits until it is durable (or refused).
    pub async fn submit(&self, mutation: Mutation) -> Result<NamenodeReply, Error> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job { mutation, reply })
            .await
            .map_err(|_| Error::WriterGone)?;
        rx.await.map_err(|_| Error::WriterGone)?
    }
}

/// Everything the writer owns.
///
/// The rule it keeps (DESIGN.md, durability rules): nothing leaves the namenode because of an edit
/// before the edit is durable. A group's mutations are validated against the writer's [`Overlay`]
/// (the durable store plus the group's earlier edits) and appended to the journal; after one sync
/// makes the group durable, the overlay moves into the store in one atomic batch, the soft state
/// follows the edits (queued replica deletions, leases, new blocks), and only then do the replies
/// go out. Readers use the store underneath, so they never see an edit that is not yet durable.
pub struct Writer<S: MetaStore, J: Journal> {
    /// The namespace as the writer sees it (durable state plus the group in progress).
    pub ns: Namespace<Overlay<S>>,
    /// Where edits are made durable.
    pub journal: J,
    /// Id allocation.
    pub ids: IdAlloc,
    /// Soft state to keep in step.
    pub state: Arc<Mutex<State>>,
    /// Lease lifetime told to writers.
    pub lease_ms: u64,
    /// Group-commit metrics.
    pub metrics: Arc<crate::http::Metrics>,
}

impl<S: MetaStore, J: Journal> Writer<S, J> {
    /// Starts the writer thread. The returned receiver yields the error that stopped it, if any.
    pub fn spawn(self) -> Result<(WriterHandle, oneshot::Receiver<Error>), Error> {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let (fatal_tx, fatal_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("namespace-writer".into())
            .spawn(move || {
                if let Err(e) = self.run(rx) {
                    tracing::error!("namespace writer stopped, refusing all further changes: {e}");
                    let _ = fatal_tx.send(e);
                }
            })
            .map_err(|e| Error::Store(format!("spawn writer thread: {e}")))?;
        Ok((WriterHandle { tx }, fatal_rx))
    }

    fn run(mut self, mut rx: mpsc::Receiver<Job>) -> Result<(), Error> {
        while let Some(first) = rx.blocking_recv() {
            let mut jobs = vec![first];
            while jobs.len() < GROUP_MAX {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
            let (mutations, replies): (Vec<Mutation>, Vec<_>) =
                jobs.into_iter().map(|j| (j.mutation, j.reply)).unzip();
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            match self.run_group(mutations, Instant::now(), now_ms) {
                Ok(results) => {
                    for (tx, r) in replies.into_iter().zip(results) {
                        let _ = tx.send(r);
                    }
                }
                Err(e) => {
                    for tx in replies {
                        let _ = tx.send(Err(Error::WriterGone));
                    }
                    return Err(e);
                }
            }
            self.checkpoint_if_due()?;
        }
        Ok(())
    }

    /// Runs one group: validates and logs each mutation in order (later ones see the earlier ones'
    /// edits), makes the group durable, applies it to the store and the soft state, and returns the
    /// replies, which the caller may send only now. `Err` is fatal: the writer cannot go on.
    /// Time comes in (`now` for soft state, `now_ms` for mtimes), so a given input gives a given
    /// result (the simulation relies on it).
    pub fn run_group(
        &mut self,
        mutations: Vec<Mutation>,
        now: Instant,
        now_ms: u64,
    ) -> Result<Vec<Result<NamenodeReply, Error>>, Error> {
        if let Err(e) = self.journal.begin_group() {
            if e.is_fatal() || matches!(e, Error::Store(_)) {
                return Err(e);
            }
            return Ok(mutations.iter().map(|_| Err(same(&e))).collect());
        }
        if self.journal.applies() {
            self.ids.catch_up(&self.ns)?;
        }
        let mut results = Vec::with_capacity(mutations.len());
        let mut effects = Vec::new();
        for m in mutations {
            match self.execute(m, now_ms, &mut effects) {
                Err(e) if e.is_fatal() || matches!(e, Error::Store(_)) => return Err(e),
                r => results.push(r),
            }
        }
        match self.make_durable(effects, results.len(), now) {
            Ok(()) => Ok(results),
            // A replicated log that lost its leadership or its majority: none of the group's
            // replies may say it is done. The edits may still commit under the next leader
            // (the client's retry then finds them).
            Err(e) if !(e.is_fatal() || matches!(e, Error::Store(_))) => {
                self.ns.store().discard()?;
                self.journal.discard();
                Ok(results.iter().map(|_| Err(same(&e))).collect())
            }
            Err(e) => Err(e),
        }
    }

    /// Takes a checkpoint when the journal asks for one.
    pub fn checkpoint_if_due(&mut self) -> Result<(), Error> {
        if self.journal.wants_checkpoint() {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Syncs the group's edits, moves them into the store, and lets the soft state follow them.
    fn make_durable(
        &mut self,
        effects: Vec<Applied>,
        group: usize,
        now: Instant,
    ) -> Result<(), Error> {
        crate::failpoint!("namenode.group.before_sync");
        self.journal.sync()?;
        crate::failpoint!("namenode.group.after_sync");
        self.metrics.editlog_syncs.inc();
        self.metrics.editlog_group.observe(group as f64);
        if self.journal.applies() {
            // Every member applied the group as it committed, this one included.
            return self.ns.store().discard();
        }
        self.ns.store().commit()?;
        crate::failpoint!("namenode.group.after_apply");
        let mut state = self
            .state
            .lock()
            .map_err(|_| Error::Store("state lock poisoned".into()))?;
        for applied in &effects {
            state.on_applied(applied, now);
        }
        Ok(())
    }

    /// A durable checkpoint of the store, after which the journal drops the edits it covers.
    fn checkpoint(&mut self) -> Result<(), Error> {
        let base = self.ns.store().base();
        base.flush()?;
        let applied = self.journal.last_seq();
        let snapshot = crate::backup::dump(base, applied)?;
        self.journal.checkpoint(&snapshot)?;
        self.metrics.editlog_rolls.inc();
        tracing::info!(
            last_edit = applied,
            bytes = snapshot.len(),
            "checkpoint written; edit log rolled"
        );
        Ok(())
    }

    fn execute(
        &mut self,
        m: Mutation,
        now_ms: u64,
        effects: &mut Vec<Applied>,
    ) -> Result<NamenodeReply, Error> {
        let ns = &self.ns;
        let mut reply = NamenodeReply::Ok;
        let ops = match m {
            Mutation::Mkdir {
                caller,
                path,
                parents,
                mode,
            } => ns.prepare_mkdir(&caller, &path, parents, mode, &mut self.ids, now_ms)?,
            Mutation::Create {
                caller,
                path,
                mode,
                overwrite,
                replication,
                block_size,
                session,
                first_block,
            } => {
                let op = ns.prepare_create(
                    &caller,
                    &path,
                    overwrite,
                    replication,
                    block_size,
                    mode,
                    session,
                    &mut self.ids,
                    now_ms,
                )?;
                let MetaOp::Create { inode, .. } = op else {
                    return Err(Error::Store("create prepared another edit".into()));
                };
                self.log(vec![op], effects)?;
                // The create stands on its own: a first block that cannot be added now (a quota)
                // is left to the client's AddBlock, which reports why.
                let first = match first_block {
                    Some(targets) => match self.add_block(inode, session, None, targets, effects) {
                        Ok(b) => Some(b),
                        Err(e) if e.is_fatal() || matches!(e, Error::Store(_)) => return Err(e),
                        Err(_) => None,
                    },
                    None => None,
                };
                return Ok(NamenodeReply::Created {
                    inode,
                    replication,
                    block_size,
                    lease_ms: self.lease_ms,
                    first,
                });
            }
            Mutation::AddBlock {
                inode,
                session,
                previous,
                targets,
            } => {
                let block = self.add_block(inode, session, previous, targets, effects)?;
                return Ok(NamenodeReply::Block(block));
            }
            Mutation::Abandon {
                inode,
                session,
                block,
            } => vec![ns.prepare_abandon(inode, session, block)?],
            Mutation::Complete {
                inode,
                session,
                last,
                size,
            } => {
                vec![ns.prepare_complete(inode, session, last, size, now_ms)?]
            }
            Mutation::Delete {
                caller,
                path,
                recursive,
            } => vec![ns.prepare_delete(&caller, &path, recursive)?],
            Mutation::Rename { caller, src, dst } => {
                vec![ns.prepare_rename(&caller, &src, &dst, now_ms)?]
            }
            Mutation::SetReplication {
                caller,
                path,
                replication,
            } => ns.prepare_setrep(&caller, &path, replication)?,
            Mutation::SetQuota {
                path,
                names,
                bytes,
                clear,
            } => vec![ns.prepare_set_quota(&path, names, bytes, clear)?],
            Mutation::Trash {
                caller,
                path,
                recursive,
            } => {
                let Some(dst) = ns.trash_destination(&caller, &path, now_ms)? else {
                    reply = NamenodeReply::Trashed { to: None };
                    let op = ns.prepare_delete(&caller, &path, recursive)?;
                    return self.log(vec![op], effects).map(|()| reply);
                };
                let node = ns.resolve_existing_as(&caller, &path)?;
                if node.is_dir() && !recursive && !ns.children(node.id)?.is_empty() {
                    return Err(Error::refused(
                        ErrorCode::NotEmpty,
                        format!("{path}: directory not empty (use -r)"),
                    ));
                }
                // The trash's directories first (the caller's own, 0700), then the move, which
                // is checked as any rename is.
                let parent = lode_protocol::path::split_parent(&dst)
                    .map_or("/".to_string(), |(p, _)| p.to_string());
                let made = ns
                    .prepare_mkdir(&caller, &parent, true, 0o700, &mut self.ids, now_ms)
                    .map_err(|e| match e {
                        Error::Refused { code, message } => Error::refused(
                            code,
                            format!(
                                "{path}: cannot move it to the trash ({message}); rm --skip-trash deletes at once"
                            ),
                        ),
                        other => other,
                    })?;
                self.log(made, effects)?;
                let op = self.ns.prepare_rename(&caller, &path, &dst, now_ms)?;
                self.log(vec![op], effects)?;
                return Ok(NamenodeReply::Trashed { to: Some(dst) });
            }
            Mutation::TrashCheckpoint { interval_ms } => {
                ns.prepare_trash_checkpoint(interval_ms, now_ms)?
            }
            Mutation::Expunge { caller } => {
                let root = Namespace::<Overlay<S>>::trash_root(&caller.user);
                match ns.resolve_as(&caller, &root)? {
                    Some(_) => vec![ns.prepare_delete(&caller, &root, true)?],
                    None => vec![],
                }
            }
            Mutation::SetAttributes {
                caller,
                path,
                owner,
                group,
                mode,
                recursive,
            } => ns.prepare_set_attributes(&caller, &path, owner, group, mode, recursive)?,
            Mutation::SetTimes {
                caller,
                path,
                mtime_ms,
            } => vec![ns.prepare_set_times(&caller, &path, mtime_ms.unwrap_or(now_ms))?],
            Mutation::Decommission { datanode, on } => {
                vec![MetaOp::SetDecommission { datanode, on }]
            }
            Mutation::Backup { out } => {
                // Only what is durable: the store underneath, as of the last group.
                let base = ns.store().base();
                let applied = crate::namespace::read_last_applied(base)?;
                crate::failpoint!("namenode.backup.before_dump");
                let bytes = crate::backup::dump(base, applied)?;
                crate::failpoint!("namenode.backup.after_dump");
                let _ = out.send((applied, bytes));
                vec![]
            }
            Mutation::AddPlugin(record) => {
                let hash = record.hash;
                let ops = ns.prepare_add_plugin(record.clone())?;
                reply = NamenodeReply::Plugin(ns.get_plugin(&hash)?.map_or(record, |mut r| {
                    r.approved |= ops
                        .iter()
                        .any(|o| matches!(o, MetaOp::ApprovePlugin { .. }));
                    r
                }));
                ops
            }
            Mutation::ApprovePlugin { hash } => {
                let op = ns.prepare_approve_plugin(hash)?;
                if let Some(mut r) = ns.get_plugin(&hash)? {
                    r.approved = true;
                    reply = NamenodeReply::Plugin(r);
                }
                vec![op]
            }
            Mutation::Once { id, user, mutation } => {
                if let Some(bytes) = ns.remembered(&id, &user)? {
                    tracing::debug!(%id, %user, "a retried change answered as its first try was");
                    return postcard::from_bytes(&bytes)
                        .map_err(|e| Error::Corrupt(format!("remembered answer of {id}: {e}")));
                }
                let reply = self.execute(*mutation, now_ms, effects)?;
                let bytes = postcard::to_stdvec(&reply).map_err(|e| Error::Store(e.to_string()))?;
                let op = MetaOp::Remember {
                    id,
                    user,
                    at_ms: now_ms,
                    reply: bytes,
                };
                self.log(vec![op], effects)?;
                return Ok(reply);
            }
            Mutation::ForgetRequests { before_ms } if ns.forget_due(before_ms)? => {
                vec![MetaOp::ForgetRequests { before_ms }]
            }
            Mutation::ForgetRequests { .. } => vec![],
            Mutation::Expire { inode, session } => match ns.get(inode)?.map(|i| i.kind) {
                Some(InodeKind::File {
                    writer: Some(w), ..
                }) if w == session => {
                    tracing::info!(%inode, %session, "lease expired; deleting the unfinished file");
                    vec![MetaOp::Delete { inode }]
                }
                _ => return Err(Error::refused(ErrorCode::NotFound, "nothing to expire")),
            },
        };
        self.log(ops, effects)?;
        Ok(reply)
    }

    /// Adds a block placed on `targets` (committing `previous`), logged and applied; the write
    /// token is signed by the server once the block is durable.
    fn add_block(
        &mut self,
        inode: InodeId,
        session: SessionId,
        previous: Option<CommittedBlock>,
        targets: Vec<Target>,
        effects: &mut Vec<Applied>,
    ) -> Result<LocatedBlock, Error> {
        let floor = self
            .state
            .lock()
            .map_err(|_| Error::Store("state lock poisoned".into()))?
            .max_reported_block;
        self.ids.raise_block_floor(floor);
        let op = self
            .ns
            .prepare_add_block(inode, session, previous, &mut self.ids)?;
        let MetaOp::AddBlock { block, .. } = op else {
            return Err(Error::Store("add block prepared another edit".into()));
        };
        let offset = match self.ns.get(inode)?.map(|i| i.kind) {
            Some(InodeKind::File {
                block_count,
                block_size,
                ..
            }) => block_count.saturating_mul(block_size),
            _ => 0,
        };
        self.log(vec![op], effects)?;
        Ok(LocatedBlock {
            id: block,
            offset,
            len: 0,
            cv: None,
            locations: targets,
            token: None,
        })
    }

    /// Appends and applies a mutation's edits. Every edit is checked against the bound before any
    /// is appended, so the edits are logged whole or refused whole.
    fn log(&mut self, ops: Vec<MetaOp>, effects: &mut Vec<Applied>) -> Result<(), Error> {
        for op in &ops {
            crate::editlog::check_edit_size(op)?;
        }
        for op in ops {
            let seq = self.journal.append(&op)?;
            effects.push(self.ns.apply(seq, &op)?);
        }
        Ok(())
    }
}
