//! The Raft log of the namenode group, on the same record format as the edit log
//! ([`crate::editlog`]): `[u32 len][u32 crc32(index ‖ body)][u64 index][body]`, body = a format
//! byte, then postcard of the [`Entry`]. Appended entries are made durable by one `fdatasync`
//! before openraft hears that they are flushed; the vote is written durably (temp file, fsync,
//! rename, directory fsync) before `save_vote` returns.
//!
//! Only positions are kept in memory (index, log id, where the record lies); entries are read
//! from the file when a follower needs them. Recovery refuses to guess, as the edit log's does: a
//! torn tail (a crash mid-append, never acknowledged) is cut off, damage with intact records after
//! it is an error. Purging records the purged log id durably first and rewrites the file only once
//! the purged part is large, so a crash at any point leaves either the old file or the new one,
//! and entries at or below the purged id are ignored on open.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::ops::{Bound, RangeBounds};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, LogState, RaftLogReader};

use super::{io_error, Entry, Lode, LogId, StorageError, Vote};
use crate::editlog::{frame_record, split_records, write_durably};
use crate::error::Error;

/// The log file.
const LOG: &str = "raft.log";
/// The last vote granted.
const VOTE: &str = "raft.vote";
/// The last purged log id.
const PURGED: &str = "raft.purged";
/// The last committed log id (a hint for start-up; losing it loses nothing).
const COMMITTED: &str = "raft.committed";
/// Version byte in front of every entry's body.
const ENTRY_FORMAT: u8 = 1;
/// The file is rewritten without its purged records once they take this many bytes.
const COMPACT_BYTES: u64 = 64 << 20;

/// Where an entry lies in the file.
#[derive(Clone, Copy, Debug)]
struct Slot {
    log_id: LogId,
    offset: u64,
    len: u64,
}

struct Inner {
    dir: PathBuf,
    file: File,
    size: u64,
    slots: BTreeMap<u64, Slot>,
    purged: Option<LogId>,
    vote: Option<Vote>,
    committed: Option<LogId>,
}

/// The durable Raft log (cheap to clone: clones share it, and serve as its readers).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<Inner>>,
}

/// Reads a small state file: `[u32 crc32(body)][body]`, body = postcard of `T`. A missing file is
/// `None`; a damaged one is an error, except where `damage_is_none` (a hint that may be lost).
fn read_small<T: serde::de::DeserializeOwned>(
    dir: &Path,
    name: &str,
    damage_is_none: bool,
) -> Result<Option<T>, Error> {
    let path = dir.join(name);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(Error::EditLog { path, source }),
    };
    let decoded = (bytes.len() >= 4)
        .then(|| {
            let (crc, body) = bytes.split_at(4);
            (u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) == crc32fast::hash(body))
                .then(|| postcard::from_bytes(body).ok())
                .flatten()
        })
        .flatten();
    match decoded {
        Some(v) => Ok(Some(v)),
        None if damage_is_none => Ok(None),
        None => Err(Error::Corrupt(format!(
            "{}: damaged (its checksum or encoding is wrong)",
            path.display()
        ))),
    }
}

fn small_bytes<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    let body = postcard::to_stdvec(value).map_err(|e| Error::Store(e.to_string()))?;
    let mut out = crc32fast::hash(&body).to_le_bytes().to_vec();
    out.extend(body);
    Ok(out)
}

fn encode_entry(entry: &Entry) -> Result<Vec<u8>, Error> {
    let mut body = vec![ENTRY_FORMAT];
    body.extend(postcard::to_stdvec(entry).map_err(|e| Error::Store(e.to_string()))?);
    frame_record(entry.log_id.index, &body)
}

fn decode_entry(index: u64, body: &[u8]) -> Result<Entry, Error> {
    match body.split_first() {
        Some((&ENTRY_FORMAT, rest)) => {
            let e: Entry = postcard::from_bytes(rest)
                .map_err(|e| Error::Corrupt(format!("raft entry {index} does not decode: {e}")))?;
            if e.log_id.index != index {
                return Err(Error::Corrupt(format!(
                    "raft record {index} holds entry {}",
                    e.log_id.index
                )));
            }
            Ok(e)
        }
        Some((v, _)) => Err(Error::Corrupt(format!(
            "raft entry {index} has format {v}; this build reads format {ENTRY_FORMAT}"
        ))),
        None => Err(Error::Corrupt(format!("raft entry {index} is empty"))),
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl LogStore {
    /// Opens (or creates) the log in `dir`.
    pub fn open(dir: &Path) -> Result<LogStore, Error> {
        let path = dir.join(LOG);
        let io = |source| Error::EditLog {
            path: path.clone(),
            source,
        };
        let _ = std::fs::remove_file(dir.join(format!("{LOG}.tmp")));
        let purged: Option<LogId> = read_small(dir, PURGED, false)?;
        let vote: Option<Vote> = read_small(dir, VOTE, false)?;
        let committed: Option<LogId> = read_small::<Option<LogId>>(dir, COMMITTED, true)?.flatten();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
            Err(source) => return Err(io(source)),
        };
        let (records, end) = split_records("raft log", &bytes, &path, true)?;
        let mut slots = BTreeMap::new();
        let floor = purged.map_or(0, |p| p.index);
        for r in records {
            if purged.is_some() && r.seq <= floor {
                continue;
            }
            let entry = decode_entry(r.seq, r.body)?;
            let expected = slots
                .last_key_value()
                .map(|(i, _)| i + 1)
                .or(purged.map(|p| p.index + 1));
            if expected.is_some_and(|e| e != r.seq) {
                return Err(Error::Corrupt(format!(
                    "raft log {}: entry {} follows {:?}; the log has a hole",
                    path.display(),
                    r.seq,
                    expected.map(|e| e - 1)
                )));
            }
            let len = end.min(r.offset + 16 + r.body.len() as u64) - r.offset;
            slots.insert(
                r.seq,
                Slot {
                    log_id: entry.log_id,
                    offset: r.offset,
                    len,
                },
            );
        }
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io)?;
        if end < bytes.len() as u64 {
            // Cut the torn tail off, durably, before appending after it.
            file.set_len(end).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        sync_dir(dir).map_err(io)?;
        Ok(LogStore {
            inner: Arc::new(Mutex::new(Inner {
                dir: dir.to_path_buf(),
                file,
                size: end,
                slots,
                purged,
                vote,
                committed,
            })),
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>, StorageError> {
        self.inner.lock().map_err(|_| {
            io_error(
                ErrorSubject::Logs,
                ErrorVerb::Read,
                "raft log lock poisoned",
            )
        })
    }
}

impl Inner {
    fn read(&self, slot: &Slot) -> Result<Entry, Error> {
        let mut buf = vec![0u8; slot.len as usize];
        self.file
            .read_exact_at(&mut buf, slot.offset)
            .map_err(|source| Error::EditLog {
                path: self.dir.join(LOG),
                source,
            })?;
        let path = self.dir.join(LOG);
        let (records, _) = split_records("raft log", &buf, &path, false)?;
        match records.first() {
            Some(r) if r.seq == slot.log_id.index => decode_entry(r.seq, r.body),
            _ => Err(Error::Corrupt(format!(
                "raft log {}: no record {} at offset {}",
                path.display(),
                slot.log_id.index,
                slot.offset
            ))),
        }
    }

    fn append(&mut self, entries: Vec<Entry>) -> Result<(), Error> {
        let path = self.dir.join(LOG);
        let mut bytes = Vec::new();
        let mut new = Vec::with_capacity(entries.len());
        for e in &entries {
            let rec = encode_entry(e)?;
            new.push(Slot {
                log_id: e.log_id,
                offset: self.size + bytes.len() as u64,
                len: rec.len() as u64,
            });
            bytes.extend(rec);
        }
        let io = |source| Error::EditLog {
            path: path.clone(),
            source,
        };
        self.file.write_all(&bytes).map_err(io)?;
        crate::failpoint!("namenode.raft.before_log_sync");
        self.file.sync_data().map_err(io)?;
        self.size += bytes.len() as u64;
        for s in new {
            self.slots.insert(s.log_id.index, s);
        }
        Ok(())
    }

    fn truncate(&mut self, since: u64) -> Result<(), Error> {
        let Some(first) = self.slots.get(&since).copied() else {
            return Ok(());
        };
        let path = self.dir.join(LOG);
        let io = |source| Error::EditLog {
            path: path.clone(),
            source,
        };
        self.file.set_len(first.offset).map_err(io)?;
        self.file.sync_all().map_err(io)?;
        self.size = first.offset;
        self.slots.split_off(&since);
        Ok(())
    }

    fn purge(&mut self, upto: LogId) -> Result<(), Error> {
        write_durably(&self.dir, PURGED, &small_bytes(&upto)?).map_err(|source| {
            Error::EditLog {
                path: self.dir.join(PURGED),
                source,
            }
        })?;
        self.purged = Some(upto);
        self.slots = self.slots.split_off(&(upto.index + 1));
        let dead = self.slots.values().next().map_or(self.size, |s| s.offset);
        if dead >= COMPACT_BYTES {
            self.compact()?;
        }
        Ok(())
    }

    /// Rewrites the file with only the entries not purged.
    fn compact(&mut self) -> Result<(), Error> {
        let path = self.dir.join(LOG);
        let tmp = self.dir.join(format!("{LOG}.tmp"));
        let io = |source| Error::EditLog {
            path: tmp.clone(),
            source,
        };
        let mut out = File::create(&tmp).map_err(io)?;
        let mut slots = BTreeMap::new();
        let mut size = 0u64;
        let keep: Vec<Slot> = self.slots.values().copied().collect();
        for s in keep {
            let rec = encode_entry(&self.read(&s)?)?;
            out.write_all(&rec).map_err(io)?;
            slots.insert(
                s.log_id.index,
                Slot {
                    log_id: s.log_id,
                    offset: size,
                    len: rec.len() as u64,
                },
            );
            size += rec.len() as u64;
        }
        out.sync_all().map_err(io)?;
        drop(out);
        std::fs::rename(&tmp, &path).map_err(io)?;
        sync_dir(&self.dir).map_err(io)?;
        self.file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        self.slots = slots;
        self.size = size;
        Ok(())
    }
}

fn range_start(b: Bound<&u64>) -> u64 {
    match b {
        Bound::Included(i) => *i,
        Bound::Excluded(i) => i.saturating_add(1),
        Bound::Unbounded => 0,
    }
}

fn range_end(b: Bound<&u64>) -> Option<u64> {
    match b {
        Bound::Included(i) => Some(*i),
        Bound::Excluded(0) => None,
        Bound::Excluded(i) => Some(i - 1),
        Bound::Unbounded => Some(u64::MAX),
    }
}

fn store_err(verb: ErrorVerb, e: Error) -> StorageError {
    io_error(ErrorSubject::Logs, verb, e)
}

impl RaftLogReader<Lode> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let inner = self.lock()?;
        let start = range_start(range.start_bound());
        let Some(end) = range_end(range.end_bound()) else {
            return Ok(vec![]);
        };
        if start > end {
            return Ok(vec![]);
        }
        inner
            .slots
            .range(start..=end)
            .map(|(_, s)| inner.read(s).map_err(|e| store_err(ErrorVerb::Read, e)))
            .collect()
    }
}

impl RaftLogStorage<Lode> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<Lode>, StorageError> {
        let inner = self.lock()?;
        let last = inner
            .slots
            .last_key_value()
            .map(|(_, s)| s.log_id)
            .or(inner.purged);
        Ok(LogState {
            last_purged_log_id: inner.purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> LogStore {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let mut inner = self.lock()?;
        let err = |e| io_error(ErrorSubject::Vote, ErrorVerb::Write, e);
        let bytes = small_bytes(vote).map_err(err)?;
        write_durably(&inner.dir, VOTE, &bytes).map_err(|e| err(Error::Store(e.to_string())))?;
        inner.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.lock()?.vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        let mut inner = self.lock()?;
        inner.committed = committed;
        // A hint only: written by rename so that it is whole, not synced (an older value after
        // a crash only means start-up applies less before the leader says more).
        let tmp = inner.dir.join(format!("{COMMITTED}.tmp"));
        let bytes = small_bytes(&committed)
            .map_err(|e| io_error(ErrorSubject::Store, ErrorVerb::Write, e))?;
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, inner.dir.join(COMMITTED)))
            .map_err(|e| io_error(ErrorSubject::Store, ErrorVerb::Write, e))?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.lock()?.committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<Lode>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let result = self.lock()?.append(entries);
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let msg = e.to_string();
                callback.log_io_completed(Err(std::io::Error::other(msg.clone())));
                Err(store_err(ErrorVerb::Write, Error::Store(msg)))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.lock()?
            .truncate(log_id.index)
            .map_err(|e| store_err(ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.lock()?
            .purge(log_id)
            .map_err(|e| store_err(ErrorVerb::Delete, e))
    }
}
