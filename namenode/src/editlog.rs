//! The append-only edit log: the source of truth for the namespace. Each record is
//! `[u32 len][u32 crc32(seq ‖ body)][u64 seq][body]`, body = a format byte, then postcard of a [`MetaOp`]. Records are
//! written as they are made and made durable together by one `fdatasync` (group commit).
//!
//! Recovery refuses to guess. On open, only a torn tail is cut off: a bad record after which no
//! intact record follows (a crash mid-append: never acknowledged). A bad record with intact records
//! after it is damage in the middle of acknowledged edits, and opening fails naming its offset.
//! A record larger than [`RECORD_BYTES_MAX`] is refused when it is written, never only when read.
//!
//! The log does not grow without bound: once the current segment passes `edit_log_roll_bytes`, the
//! writer takes a checkpoint (every key of the metadata store as of the last applied edit, written
//! to `checkpoint` and fsynced), and only then rolls the segment to `edits.log.1` (replacing the one
//! before) and starts an empty one. So every edit a roll drops is in a durable checkpoint, and a
//! metadata store that lost writes (sled's flush is not a power-loss barrier) is rebuilt from the
//! checkpoint and the segments after it.
//!
//! [`Journal`] is what the namespace writer needs of a log, so the same writer runs on this log
//! and on a replicated one.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::namespace::MetaOp;

/// Version byte in front of every edit's body. Format 2 gave `Mkdir` and `Create` the new
/// entry's owner, group and mode; format 1 is still read ([`crate::namespace::decode_edit_v1`]).
const EDIT_FORMAT: u8 = 2;
const EDIT_FORMAT_V1: u8 = 1;

/// Largest record body, checked when a record is written and when it is read. Operations whose
/// edit would be larger are split into bounded edits (`SetReplication`) or refused.
pub const RECORD_BYTES_MAX: u32 = 16 << 20;
const RECORD_HEADER_BYTES: u64 = 16;

/// The segment being appended to.
const CURRENT: &str = "edits.log";
/// The segment before it, kept after a roll.
const PREVIOUS: &str = "edits.log.1";
/// The durable checkpoint every roll writes first.
pub const CHECKPOINT: &str = "checkpoint";

/// What the namespace writer needs of a log of edits.
pub trait Journal: Send + 'static {
    /// Appends an edit (not yet durable) and returns its sequence number.
    fn append(&mut self, op: &MetaOp) -> Result<u64, Error>;
    /// Makes every appended edit durable.
    fn sync(&mut self) -> Result<(), Error>;
    /// Sequence number of the last edit appended.
    fn last_seq(&self) -> u64;
    /// Whether the journal wants a checkpoint now (after a group is durable and applied).
    fn wants_checkpoint(&self) -> bool;
    /// Stores `snapshot` (a [`crate::backup::dump`] as of [`Journal::last_seq`]) durably, then
    /// drops the edits it covers.
    fn checkpoint(&mut self, snapshot: &[u8]) -> Result<(), Error>;
    /// Whether a sync also applies the edits to the metadata store and the soft state (a
    /// replicated log applies what it commits on every member, this one included), so the
    /// writer drops its overlay after a sync instead of moving it into the store.
    fn applies(&self) -> bool {
        false
    }
    /// Called before a group: a replicated log refuses changes on a member that is not the
    /// leader, and picks up edit numbers that another leader used meanwhile.
    fn begin_group(&mut self) -> Result<(), Error> {
        Ok(())
    }
    /// Forgets edits appended since the last sync (a sync that failed without being fatal).
    fn discard(&mut self) {}
}

impl<J: Journal + ?Sized> Journal for Box<J> {
    fn append(&mut self, op: &MetaOp) -> Result<u64, Error> {
        (**self).append(op)
    }
    fn sync(&mut self) -> Result<(), Error> {
        (**self).sync()
    }
    fn last_seq(&self) -> u64 {
        (**self).last_seq()
    }
    fn wants_checkpoint(&self) -> bool {
        (**self).wants_checkpoint()
    }
    fn checkpoint(&mut self, snapshot: &[u8]) -> Result<(), Error> {
        (**self).checkpoint(snapshot)
    }
    fn applies(&self) -> bool {
        (**self).applies()
    }
    fn begin_group(&mut self) -> Result<(), Error> {
        (**self).begin_group()
    }
    fn discard(&mut self) {
        (**self).discard()
    }
}

/// Refuses an edit larger than [`RECORD_BYTES_MAX`] without encoding it (the writer checks every
/// edit of a mutation before appending any).
pub fn check_edit_size(op: &MetaOp) -> Result<(), Error> {
    let bytes =
        1 + postcard::experimental::serialized_size(op).map_err(|e| Error::Store(e.to_string()))?;
    if bytes > RECORD_BYTES_MAX as usize {
        return Err(Error::refused(
            lode_protocol::ErrorCode::InvalidArgument,
            format!(
                "the change needs an edit of {bytes} bytes, more than the {RECORD_BYTES_MAX} an edit may hold"
            ),
        ));
    }
    Ok(())
}

/// The postcard body of an edit, with its format byte; refused if larger than [`RECORD_BYTES_MAX`].
pub fn encode_edit(op: &MetaOp) -> Result<Vec<u8>, Error> {
    check_edit_size(op)?;
    let mut body = vec![EDIT_FORMAT];
    body.extend(postcard::to_stdvec(op).map_err(|e| Error::Store(e.to_string()))?);
    Ok(body)
}

/// An open edit log positioned at its end.
pub struct EditLog {
    file: File,
    path: PathBuf,
    dir: PathBuf,
    /// Bytes in the current segment.
    size: u64,
    last_seq: u64,
    unsynced: bool,
    /// Checkpoint and roll once the current segment is this large.
    roll_bytes: u64,
}

impl EditLog {
    /// Opens (or creates) the log in `dir`, returning it with every intact record in order: those
    /// of the previous segment (`edits.log.1`, kept after the last roll) and of the current one
    /// (`edits.log`, whose torn or corrupt tail is cut off).
    pub fn open(dir: &Path) -> Result<(EditLog, Vec<(u64, MetaOp)>), Error> {
        let path = dir.join(CURRENT);
        let io = |source| Error::EditLog {
            path: path.clone(),
            source,
        };
        let previous = dir.join(PREVIOUS);
        let mut records = match File::open(&previous) {
            // The previous segment was synced whole before it was rolled: nothing in it is torn.
            Ok(f) => read_records(f, &previous, false)?.0,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
            Err(source) => {
                return Err(Error::EditLog {
                    path: previous,
                    source,
                })
            }
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let (current, good_end) = read_records(&mut file, &path, true)?;
        if let (Some((prev, _)), Some((first, _))) = (records.last(), current.first()) {
            if *first != prev + 1 {
                return Err(Error::Corrupt(format!(
                    "edit log sequence jumps from {prev} to {first} between {PREVIOUS} and {CURRENT}"
                )));
            }
        }
        records.extend(current);
        file.set_len(good_end).map_err(io)?;
        file.seek(SeekFrom::End(0)).map_err(io)?;
        file.sync_all().map_err(io)?;
        sync_dir(dir).map_err(io)?;
        let last_seq = records.last().map_or(0, |(s, _)| *s);
        Ok((
            EditLog {
                file,
                path,
                dir: dir.to_path_buf(),
                size: good_end,
                last_seq,
                unsynced: false,
                roll_bytes: u64::MAX,
            },
            records,
        ))
    }

    /// Checkpoints and rolls once the current segment reaches `bytes`.
    pub fn set_roll_bytes(&mut self, bytes: u64) {
        self.roll_bytes = bytes;
    }

    /// Bytes in the current segment.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Starts a new segment: the current one becomes `edits.log.1` (replacing the one before) and
    /// an empty `edits.log` takes its place. Call only when every edit so far is durable in the
    /// metadata store too: the segment before the previous one is gone after this.
    pub fn roll(&mut self) -> Result<(), Error> {
        self.sync()?;
        let io = |source| Error::EditLog {
            path: self.path.clone(),
            source,
        };
        std::fs::rename(&self.path, self.dir.join(PREVIOUS)).map_err(io)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&self.path)
            .map_err(io)?;
        file.sync_all().map_err(io)?;
        sync_dir(&self.dir).map_err(io)?;
        self.file = file;
        self.size = 0;
        Ok(())
    }

    /// Sequence number of the last record written.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Moves the sequence forward (when the metadata store is ahead of the log).
    pub fn skip_to(&mut self, seq: u64) {
        self.last_seq = self.last_seq.max(seq);
    }

    /// Appends a record (not yet durable) and returns its sequence number.
    pub fn append(&mut self, op: &MetaOp) -> Result<u64, Error> {
        let seq = self.last_seq + 1;
        let body = encode_edit(op)?;
        let rec = frame_record(seq, &body)?;
        self.file.write_all(&rec).map_err(|source| Error::EditLog {
            path: self.path.clone(),
            source,
        })?;
        self.last_seq = seq;
        self.size += rec.len() as u64;
        self.unsynced = true;
        Ok(seq)
    }

    /// Makes every appended record durable (fdatasync).
    pub fn sync(&mut self) -> Result<(), Error> {
        if self.unsynced {
            self.file.sync_data().map_err(|source| Error::EditLog {
                path: self.path.clone(),
                source,
            })?;
            self.unsynced = false;
        }
        Ok(())
    }
}

/// A record that passes its checks at `offset` of `bytes`: (seq, body, end).
fn intact_record(bytes: &[u8], offset: usize) -> Result<(u64, &[u8], usize), &'static str> {
    let head = bytes
        .get(offset..offset + RECORD_HEADER_BYTES as usize)
        .ok_or("torn record header")?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    let mut seq_bytes = [0u8; 8];
    seq_bytes.copy_from_slice(&head[8..16]);
    if len > RECORD_BYTES_MAX {
        return Err("record length too large");
    }
    let start = offset + RECORD_HEADER_BYTES as usize;
    let end = start + len as usize;
    let body = bytes.get(start..end).ok_or("torn record")?;
    let mut h = crc32fast::Hasher::new();
    h.update(&seq_bytes);
    h.update(body);
    if h.finalize() != crc {
        return Err("record fails its crc");
    }
    Ok((u64::from_le_bytes(seq_bytes), body, end))
}

/// Reads intact records from the start of `file`: (records, end of the last intact one). A bad
/// record ends the log only if `torn_tail_allowed` and no intact record follows it anywhere after;
/// otherwise it is an error naming its offset.
fn read_records(
    mut file: impl Read,
    path: &Path,
    torn_tail_allowed: bool,
) -> Result<(Vec<(u64, MetaOp)>, u64), Error> {
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|source| Error::EditLog {
            path: path.to_path_buf(),
            source,
        })?;
    decode_segment(&bytes, path, torn_tail_allowed)
}

/// Decodes a segment's bytes (see [`read_records`]); `path` only names it in errors.
pub fn decode_segment(
    bytes: &[u8],
    path: &Path,
    torn_tail_allowed: bool,
) -> Result<(Vec<(u64, MetaOp)>, u64), Error> {
    let (raw, end) = split_records("edit log", bytes, path, torn_tail_allowed)?;
    let mut records: Vec<(u64, MetaOp)> = Vec::with_capacity(raw.len());
    for r in raw {
        let seq = r.seq;
        let op: MetaOp = match r.body.split_first() {
            Some((&EDIT_FORMAT, rest)) => postcard::from_bytes(rest)
                .map_err(|e| Error::Corrupt(format!("edit {seq} does not decode: {e}")))?,
            Some((&EDIT_FORMAT_V1, rest)) => {
                crate::namespace::decode_edit_v1(rest).map_err(|e| {
                    Error::Corrupt(format!("edit {seq} (format 1) does not decode: {e}"))
                })?
            }
            Some((v, _)) => {
                return Err(Error::Corrupt(format!(
                    "edit {seq} has format {v}; this build reads formats 1 to {EDIT_FORMAT}"
                )))
            }
            None => return Err(Error::Corrupt(format!("edit {seq} is empty"))),
        };
        if let Some((prev, _)) = records.last() {
            if seq != prev + 1 {
                return Err(Error::Corrupt(format!(
                    "edit log sequence jumps from {prev} to {seq}"
                )));
            }
        }
        records.push((seq, op));
    }
    Ok((records, end))
}

/// One intact record of a log file: its sequence number, body, and where it starts.
pub(crate) struct RawRecord<'a> {
    pub seq: u64,
    pub body: &'a [u8],
    pub offset: u64,
}

/// Frames `body` as a record numbered `seq` (the format every log of the namenode shares).
pub(crate) fn frame_record(seq: u64, body: &[u8]) -> Result<Vec<u8>, Error> {
    let len = u32::try_from(body.len())
        .ok()
        .filter(|l| *l <= RECORD_BYTES_MAX)
        .ok_or_else(|| Error::Store(format!("a record of {} bytes is too large", body.len())))?;
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(body);
    let mut rec = Vec::with_capacity(body.len() + RECORD_HEADER_BYTES as usize);
    rec.extend_from_slice(&len.to_le_bytes());
    rec.extend_from_slice(&h.finalize().to_le_bytes());
    rec.extend_from_slice(&seq.to_le_bytes());
    rec.extend_from_slice(body);
    Ok(rec)
}

/// The intact records of a log file's bytes, and the end of the last one. A bad record ends the
/// file only if `torn_tail_allowed` and no intact record with a greater number follows it
/// anywhere after (a crash mid-append, never acknowledged); otherwise it is damage in the middle
/// of acknowledged records, and the error names its offset.
pub(crate) fn split_records<'a>(
    what: &str,
    bytes: &'a [u8],
    path: &Path,
    torn_tail_allowed: bool,
) -> Result<(Vec<RawRecord<'a>>, u64), Error> {
    let mut records: Vec<RawRecord<'a>> = Vec::new();
    let mut offset = 0usize;
    while offset < bytes.len() {
        let (seq, body, end) = match intact_record(bytes, offset) {
            Ok(r) => r,
            Err(why) => {
                let last = records.last().map_or(0, |r| r.seq);
                let later = (offset + 1..bytes.len())
                    .find(|o| intact_record(bytes, *o).is_ok_and(|(seq, _, _)| seq > last));
                if let Some(later) = later {
                    return Err(Error::Corrupt(format!(
                        "{what} {}: {why} at offset {offset}, but intact edits follow at offset \
                         {later}; refusing to drop acknowledged edits (restore from a backup, or \
                         move the log aside to accept the loss)",
                        path.display()
                    )));
                }
                if !torn_tail_allowed {
                    return Err(Error::Corrupt(format!(
                        "{what} {}: {why} at offset {offset} of a segment that was synced whole",
                        path.display()
                    )));
                }
                tracing::warn!(path = %path.display(), offset, "log ends in a torn record ({why}); cutting it off");
                break;
            }
        };
        records.push(RawRecord {
            seq,
            body,
            offset: offset as u64,
        });
        offset = end;
    }
    Ok((records, offset.min(bytes.len()) as u64))
}

/// Writes `bytes` to `dir/name` durably: a temp file, fsync, rename, fsync of the directory.
pub fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

/// The checkpoint in `dir`, if there is one: (last edit it holds, its bytes).
pub fn read_checkpoint(dir: &Path) -> Result<Option<(u64, crate::store::Pairs)>, Error> {
    let path = dir.join(CHECKPOINT);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let (seq, pairs) = crate::backup::parse(&bytes)
                .map_err(|e| Error::Corrupt(format!("{}: {e}", path.display())))?;
            Ok(Some((seq, pairs)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::EditLog { path, source }),
    }
}

impl Journal for EditLog {
    fn append(&mut self, op: &MetaOp) -> Result<u64, Error> {
        EditLog::append(self, op)
    }

    fn sync(&mut self) -> Result<(), Error> {
        EditLog::sync(self)
    }

    fn last_seq(&self) -> u64 {
        self.last_seq
    }

    fn wants_checkpoint(&self) -> bool {
        self.size >= self.roll_bytes
    }

    fn checkpoint(&mut self, snapshot: &[u8]) -> Result<(), Error> {
        self.sync()?;
        crate::failpoint!("namenode.checkpoint.before_write");
        write_durably(&self.dir, CHECKPOINT, snapshot).map_err(|source| Error::EditLog {
            path: self.dir.join(CHECKPOINT),
            source,
        })?;
        crate::failpoint!("namenode.checkpoint.before_roll");
        self.roll()?;
        crate::failpoint!("namenode.checkpoint.after_roll");
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lode_protocol::InodeId;

    #[test]
    fn rolled_segments_keep_one_previous_and_replay_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let op = |i| MetaOp::Delete { inode: InodeId(i) };
        let (mut log, _) = EditLog::open(dir.path()).unwrap();
        for i in 1..=3 {
            log.append(&op(i)).unwrap();
        }
        assert!(log.size() > 0);
        log.roll().unwrap();
        assert_eq!(log.size(), 0);
        for i in 4..=5 {
            log.append(&op(i)).unwrap();
        }
        log.sync().unwrap();
        let (_, recs) = EditLog::open(dir.path()).unwrap();
        assert_eq!(
            recs.iter().map(|r| r.0).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        // A second roll drops the oldest segment; numbering goes on.
        log.roll().unwrap();
        assert_eq!(log.append(&op(6)).unwrap(), 6);
        log.sync().unwrap();
        drop(log);
        let (mut log, recs) = EditLog::open(dir.path()).unwrap();
        assert_eq!(recs, vec![(4, op(4)), (5, op(5)), (6, op(6))]);
        assert_eq!(log.append(&op(7)).unwrap(), 7);
        log.sync().unwrap();
        // A crash between the rename and the new segment leaves no current one: it starts empty.
        log.roll().unwrap();
        std::fs::remove_file(dir.path().join(CURRENT)).unwrap();
        let (log, recs) = EditLog::open(dir.path()).unwrap();
        assert_eq!(recs.iter().map(|r| r.0).collect::<Vec<_>>(), [6, 7]);
        assert_eq!(log.last_seq(), 7);
        // Segments that do not follow each other are refused, not silently merged.
        drop(log);
        let other_dir = tempfile::tempdir().unwrap();
        let (mut other, _) = EditLog::open(other_dir.path()).unwrap();
        other.append(&op(1)).unwrap();
        other.sync().unwrap();
        std::fs::copy(&other.path, dir.path().join(CURRENT)).unwrap();
        assert!(matches!(EditLog::open(dir.path()), Err(Error::Corrupt(_))));
    }

    #[test]
    fn records_survive_reopen_and_torn_tails_are_cut() {
        let dir = tempfile::tempdir().unwrap();
        let op = |i| MetaOp::Delete { inode: InodeId(i) };
        {
            let (mut log, recs) = EditLog::open(dir.path()).unwrap();
            assert!(recs.is_empty());
            for i in 0..5 {
                log.append(&op(i)).unwrap();
            }
            log.sync().unwrap();
        }
        // simulate a crash mid-append: half a record at the end
        let path = dir.path().join("edits.log");
        let full = std::fs::metadata(&path).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[20, 0, 0, 0, 1, 2, 3]).unwrap();
        drop(f);
        let (mut log, recs) = EditLog::open(dir.path()).unwrap();
        assert_eq!(recs.len(), 5);
        assert_eq!(recs[4], (5, op(4)));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), full);
        assert_eq!(log.append(&op(9)).unwrap(), 6);
        log.sync().unwrap();
        // flip a byte in the last record: it is cut, earlier ones stay
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 1] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        let (_, recs) = EditLog::open(dir.path()).unwrap();
        assert_eq!(recs.len(), 5);
    }
}
