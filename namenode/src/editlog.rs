//! The append-only edit log: the source of truth for the namespace. Each record is
//! `[u32 len][u32 crc32(seq ‖ body)][u64 seq][body]`, body = a format byte, then postcard of a [`MetaOp`]. Records are
//! written as they are made and made durable together by one `fdatasync` (group commit).
//! On open, a torn or corrupt tail (a crash mid-append: never acknowledged) is cut off.
//!
//! The log does not grow without bound: once the current segment passes `edit_log_roll_bytes` and
//! the metadata store has flushed every edit in it, the writer rolls it to `edits.log.1` (replacing
//! the segment before) and starts an empty one. The store's `last_applied` says where replay starts.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::namespace::MetaOp;

/// Version byte in front of every edit's body; decoding older formats is added here when one changes.
const EDIT_FORMAT: u8 = 1;

/// Largest record body accepted when reading the log.
const RECORD_BYTES_MAX: u32 = 16 << 20;
const RECORD_HEADER_BYTES: u64 = 16;

/// The segment being appended to.
const CURRENT: &str = "edits.log";
/// The segment before it, kept after a roll.
const PREVIOUS: &str = "edits.log.1";

/// An open edit log positioned at its end.
pub struct EditLog {
    file: File,
    path: PathBuf,
    dir: PathBuf,
    /// Bytes in the current segment.
    size: u64,
    last_seq: u64,
    unsynced: bool,
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
            Ok(f) => read_records(f, &previous)?.0,
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
        let (current, good_end) = read_records(&mut file, &path)?;
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
            },
            records,
        ))
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
        let mut body = vec![EDIT_FORMAT];
        body.extend(postcard::to_stdvec(op).map_err(|e| Error::Store(e.to_string()))?);
        let len = u32::try_from(body.len()).map_err(|_| Error::Store("edit too large".into()))?;
        let mut h = crc32fast::Hasher::new();
        h.update(&seq.to_le_bytes());
        h.update(&body);
        let mut rec = Vec::with_capacity(body.len() + RECORD_HEADER_BYTES as usize);
        rec.extend_from_slice(&len.to_le_bytes());
        rec.extend_from_slice(&h.finalize().to_le_bytes());
        rec.extend_from_slice(&seq.to_le_bytes());
        rec.extend_from_slice(&body);
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

/// Reads intact records from the start of `file`: (records, end of the last intact one).
fn read_records(file: impl Read, path: &Path) -> Result<(Vec<(u64, MetaOp)>, u64), Error> {
    let io = |source| Error::EditLog {
        path: path.to_path_buf(),
        source,
    };
    let mut records: Vec<(u64, MetaOp)> = Vec::new();
    let mut good_end = 0u64;
    let mut reader = BufReader::new(file);
    loop {
        let mut head = [0u8; RECORD_HEADER_BYTES as usize];
        if read_full(&mut reader, &mut head).map_err(io)? < head.len() {
            break;
        }
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        let mut seq_bytes = [0u8; 8];
        seq_bytes.copy_from_slice(&head[8..16]);
        let seq = u64::from_le_bytes(seq_bytes);
        if len > RECORD_BYTES_MAX {
            tracing::warn!(path = %path.display(), offset = good_end, "edit log record length {len} too large; cutting tail");
            break;
        }
        let mut body = vec![0u8; len as usize];
        if read_full(&mut reader, &mut body).map_err(io)? < body.len() {
            tracing::warn!(path = %path.display(), offset = good_end, "torn edit log record; cutting tail");
            break;
        }
        let mut h = crc32fast::Hasher::new();
        h.update(&seq_bytes);
        h.update(&body);
        if h.finalize() != crc {
            tracing::warn!(path = %path.display(), offset = good_end, "edit log record fails its crc; cutting tail");
            break;
        }
        let op: MetaOp = match body.split_first() {
            Some((&EDIT_FORMAT, rest)) => postcard::from_bytes(rest)
                .map_err(|e| Error::Corrupt(format!("edit {seq} does not decode: {e}")))?,
            Some((v, _)) => {
                return Err(Error::Corrupt(format!(
                    "edit {seq} has format {v}; this build reads format {EDIT_FORMAT}"
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
        good_end += RECORD_HEADER_BYTES + u64::from(len);
    }
    Ok((records, good_end))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
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
