//! The group's state machine: the metadata store, changed only by the deterministic apply of
//! committed entries ([`Namespace::apply`], as recovery replays the edit log), and the soft state
//! that follows each edit ([`State::on_applied`]: leases, blocks being written, queued deletes),
//! so a new leader holds them already.
//!
//! Applying is idempotent by edit number: each edit records its number with its changes in one
//! atomic batch, so an entry applied again after a crash (the store had it, its log id was not yet
//! recorded) skips the edits the store holds. The last applied log id and the membership are
//! kept in the store too ([`APPLIED_KEY`], [`MEMBERSHIP_KEY`]), after the entry's edits.
//!
//! A snapshot is [`crate::backup::dump`] of the store, taken between two applies (so it is
//! consistent), kept durably in `raft.snapshot` with its metadata, and sent in chunks to a member
//! too far behind; installing one replaces the store's contents in one batch and rebuilds the
//! soft state's view of the namespace.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use openraft::storage::RaftStateMachine;
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
};

use super::{io_error, Entry, Lode, LogId, Member, NodeId, StorageError, StoredMembership};
use crate::editlog::write_durably;
use crate::error::Error;
use crate::namespace::{self, Namespace};
use crate::state::State;
use crate::store::MetaStore;

/// The last log id applied (postcard of `Option<LogId>`).
pub const APPLIED_KEY: &[u8] = b"mraft_applied";
/// The membership in force as of the last applied entry (postcard of [`StoredMembership`]).
pub const MEMBERSHIP_KEY: &[u8] = b"mraft_membership";
/// The current snapshot: `[u32 meta length][postcard of SnapshotMeta][dump]`.
/// The file in the metadata directory that holds the latest snapshot.
pub const SNAPSHOT: &str = "raft.snapshot";

/// The state machine over a metadata store `S`.
pub struct StateMachine<S: MetaStore> {
    ns: Namespace<S>,
    state: Option<Arc<Mutex<State>>>,
    dir: PathBuf,
    applied: Option<LogId>,
    membership: StoredMembership,
    last_seq: u64,
    snapshots_built: u64,
}

fn sm_err(verb: ErrorVerb, e: impl std::fmt::Display) -> StorageError {
    io_error(ErrorSubject::StateMachine, verb, e)
}

fn snap_err(verb: ErrorVerb, e: impl std::fmt::Display) -> StorageError {
    io_error(ErrorSubject::Snapshot(None), verb, e)
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, Error> {
    postcard::from_bytes(bytes).map_err(|e| Error::Corrupt(format!("{what} does not decode: {e}")))
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    postcard::to_stdvec(value).map_err(|e| Error::Store(e.to_string()))
}

impl<S: MetaStore> StateMachine<S> {
    /// The state machine over `store`, resuming from what it recorded. `state`, when given, is
    /// kept in step with every edit; `dir` holds the snapshot file.
    pub fn open(
        store: Arc<S>,
        state: Option<Arc<Mutex<State>>>,
        dir: &Path,
    ) -> Result<StateMachine<S>, Error> {
        let ns = Namespace::open(store)?;
        let applied: Option<LogId> = match ns.store().get(APPLIED_KEY)? {
            Some(b) => decode(&b, "the last applied raft log id")?,
            None => None,
        };
        let membership: StoredMembership = match ns.store().get(MEMBERSHIP_KEY)? {
            Some(b) => decode(&b, "the raft membership")?,
            None => StoredMembership::default(),
        };
        let last_seq = namespace::read_last_applied(ns.store())?;
        Ok(StateMachine {
            ns,
            state,
            dir: dir.to_path_buf(),
            applied,
            membership,
            last_seq,
            snapshots_built: 0,
        })
    }

    /// The number of the last edit applied.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The last log id applied.
    pub fn applied(&self) -> Option<LogId> {
        self.applied
    }

    fn record(&self) -> Result<(), Error> {
        self.ns.store().apply_batch(vec![
            (APPLIED_KEY.to_vec(), Some(encode(&self.applied)?)),
            (MEMBERSHIP_KEY.to_vec(), Some(encode(&self.membership)?)),
        ])
    }

    fn apply_entry(&mut self, entry: Entry) -> Result<(), Error> {
        match entry.payload {
            EntryPayload::Blank => {}
            EntryPayload::Normal(edits) => {
                let now = Instant::now();
                for (seq, op) in (edits.first_seq..).zip(&edits.ops) {
                    if seq <= self.last_seq {
                        continue; // applied before a crash; its log id was not recorded yet
                    }
                    if seq != self.last_seq + 1 {
                        return Err(Error::Corrupt(format!(
                            "raft entry {} holds edit {seq}, but the store's last edit is {}",
                            entry.log_id.index, self.last_seq
                        )));
                    }
                    crate::failpoint!("namenode.raft.apply");
                    let applied = self.ns.apply(seq, op)?;
                    self.last_seq = seq;
                    if let Some(state) = &self.state {
                        state
                            .lock()
                            .map_err(|_| Error::Store("state lock poisoned".into()))?
                            .on_applied(&applied, now);
                    }
                }
            }
            EntryPayload::Membership(m) => {
                self.membership = StoredMembership::new(Some(entry.log_id), m);
            }
        }
        self.applied = Some(entry.log_id);
        self.record()
    }

    fn snapshot_path(&self) -> PathBuf {
        self.dir.join(SNAPSHOT)
    }

    fn save_snapshot(&self, meta: &SnapshotMeta<NodeId, Member>, data: &[u8]) -> Result<(), Error> {
        let meta_bytes = encode(meta)?;
        let mut out = Vec::with_capacity(4 + meta_bytes.len() + data.len());
        out.extend((meta_bytes.len() as u32).to_le_bytes());
        out.extend(&meta_bytes);
        out.extend(data);
        write_durably(&self.dir, SNAPSHOT, &out).map_err(|source| Error::EditLog {
            path: self.snapshot_path(),
            source,
        })
    }

    fn load_snapshot(&self) -> Result<Option<Snapshot<Lode>>, Error> {
        let path = self.snapshot_path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(Error::EditLog { path, source }),
        };
        let bad = || Error::Corrupt(format!("{}: damaged snapshot", path.display()));
        let len = bytes
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(bad)?;
        let meta_bytes = bytes.get(4..4 + len).ok_or_else(bad)?;
        let meta: SnapshotMeta<NodeId, Member> = decode(meta_bytes, "the snapshot's metadata")?;
        let data = bytes[4 + len..].to_vec();
        // The dump carries its own hash; check it before offering it to anyone.
        crate::backup::parse(&data)?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }

    /// Replaces the store's contents with a snapshot's, in one atomic batch.
    fn install(&mut self, meta: &SnapshotMeta<NodeId, Member>, data: &[u8]) -> Result<(), Error> {
        let (seq, pairs) = crate::backup::parse(data)?;
        let incoming: std::collections::BTreeSet<&[u8]> =
            pairs.iter().map(|(k, _)| k.as_slice()).collect();
        let mut batch: crate::store::Batch = self
            .ns
            .store()
            .scan_prefix(b"")?
            .into_iter()
            .filter(|(k, _)| !incoming.contains(k.as_slice()))
            .map(|(k, _)| (k, None))
            .collect();
        batch.extend(pairs.iter().map(|(k, v)| (k.clone(), Some(v.clone()))));
        self.ns.store().apply_batch(batch)?;
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.last_seq = seq;
        self.record()?;
        self.ns.store().flush()?;
        if let Some(state) = &self.state {
            let stored = self.ns.load_all()?;
            state
                .lock()
                .map_err(|_| Error::Store("state lock poisoned".into()))?
                .rebase(&stored, Instant::now());
        }
        self.save_snapshot(meta, data)
    }

    /// A consistent dump of the store as of the last applied entry, saved as the current snapshot.
    fn build(&mut self) -> Result<Snapshot<Lode>, Error> {
        self.ns.store().flush()?;
        let data = crate::backup::dump(self.ns.store(), self.last_seq)?;
        self.snapshots_built += 1;
        let snapshot_id = match self.applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, self.snapshots_built),
            None => format!("none-{}", self.snapshots_built),
        };
        let meta = SnapshotMeta {
            last_log_id: self.applied,
            last_membership: self.membership.clone(),
            snapshot_id,
        };
        self.save_snapshot(&meta, &data)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

/// A snapshot taken between two applies, handed to openraft to keep and send.
pub struct Built(Option<Result<Snapshot<Lode>, Error>>);

impl RaftSnapshotBuilder<Lode> for Built {
    async fn build_snapshot(&mut self) -> Result<Snapshot<Lode>, StorageError> {
        match self.0.take() {
            Some(Ok(s)) => Ok(s),
            Some(Err(e)) => Err(snap_err(ErrorVerb::Write, e)),
            None => Err(snap_err(ErrorVerb::Write, "snapshot already taken")),
        }
    }
}

impl<S: MetaStore> RaftStateMachine<Lode> for StateMachine<S> {
    type SnapshotBuilder = Built;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<()>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut out = vec![];
        for e in entries {
            self.apply_entry(e)
                .map_err(|e| sm_err(ErrorVerb::Write, e))?;
            out.push(());
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Built {
        // Built here, between two applies: a dump taken while edits were applied would not be
        // the state as of any one entry.
        Built(Some(self.build()))
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        self.install(meta, &data)
            .map_err(|e| snap_err(ErrorVerb::Write, e))
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<Lode>>, StorageError> {
        self.load_snapshot()
            .map_err(|e| snap_err(ErrorVerb::Read, e))
    }
}
