//! The block store: on each data dir, finalized blocks live in `current/` as `blk_<id>` (exactly the
//! block's bytes) beside `blk_<id>.meta` (the sidecar: format version, block length, file offset and
//! one BLAKE3 chaining value per 64 KiB piece). Blocks being written live in `tmp/`, which is emptied
//! on start: a block exists only once its data and sidecar were fsynced and renamed into `current/`
//! and that directory was fsynced.
//!
//! All methods block; callers run them on blocking threads.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use lode_protocol::checksum::{self, PIECE_BYTES};
use lode_protocol::messages::{ReportedBlock, Space};
use lode_protocol::{Blake3Cv, BlockId};

use crate::error::Error;

const SIDECAR_VERSION: u8 = 1;
const SIDECAR_HEADER_BYTES: usize = 17;

/// A block's sidecar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sidecar {
    /// Block length in bytes.
    pub len: u64,
    /// Offset of the block in its file (pieces are hashed at their file offset).
    pub file_offset: u64,
    /// One value per piece.
    pub pieces: Vec<Blake3Cv>,
}

impl Sidecar {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SIDECAR_HEADER_BYTES + 32 * self.pieces.len());
        out.push(SIDECAR_VERSION);
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.file_offset.to_le_bytes());
        for p in &self.pieces {
            out.extend_from_slice(&p.0);
        }
        out
    }

    /// Decodes a sidecar file's bytes (untrusted: they come from a disk).
    pub fn decode(bytes: &[u8]) -> Result<Sidecar, String> {
        if bytes.len() < SIDECAR_HEADER_BYTES || bytes[0] != SIDECAR_VERSION {
            return Err("bad sidecar header".into());
        }
        let mut u = [0u8; 8];
        u.copy_from_slice(&bytes[1..9]);
        let len = u64::from_le_bytes(u);
        u.copy_from_slice(&bytes[9..17]);
        let file_offset = u64::from_le_bytes(u);
        let body = &bytes[SIDECAR_HEADER_BYTES..];
        if !body.len().is_multiple_of(32) || (body.len() / 32) as u64 != checksum::piece_count(len)
        {
            return Err("sidecar piece count does not match block length".into());
        }
        let pieces = body
            .chunks_exact(32)
            .map(|c| {
                let mut a = [0u8; 32];
                a.copy_from_slice(c);
                Blake3Cv(a)
            })
            .collect();
        Ok(Sidecar {
            len,
            file_offset,
            pieces,
        })
    }
}

struct DataDir {
    root: PathBuf,
    current: PathBuf,
    tmp: PathBuf,
    /// Bytes promised to blocks being written here.
    inflight: AtomicU64,
    /// Taken out of service: a disk error, confirmed by a failed probe.
    failed: AtomicBool,
    /// Group commit of the renames into `current/`.
    sync: DirSync,
}

/// Group commit of a directory's entries: blocks finished at the same time share one fsync of
/// `current/`. Each rename into it is counted; a thread that needs its rename durable takes the
/// lock, and either finds it covered by an fsync that began after it (done), or fsyncs the
/// directory itself for every rename counted so far. An fsync that fails fails every rename it
/// was to cover, even if a later one succeeds (after a failed fsync the kernel may have dropped
/// what it could not write, and the next fsync need not say so).
#[derive(Default)]
struct DirSync {
    /// Renames into the directory so far.
    renamed: AtomicU64,
    /// What the fsyncs so far covered.
    synced: Mutex<Synced>,
    /// Directory fsyncs made.
    syncs: AtomicU64,
}

#[derive(Default)]
struct Synced {
    /// Renames counted before the last fsync began, whether it succeeded or not.
    covered: u64,
    /// The ranges `(after, upto]` of renames whose fsync failed (a few; merged when many).
    failed: Vec<(u64, u64)>,
}

/// Failed ranges kept apart; beyond that the oldest two merge (failing the renames between).
const FAILED_RANGES_MAX: usize = 16;

impl DirSync {
    /// Counts a rename just made; the number to pass to [`DirSync::sync`].
    fn renamed(&self) -> u64 {
        self.renamed.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Returns once rename number `mine` in `dir` is durable (or an fsync that covered it failed).
    fn sync(&self, dir: &Path, mine: u64) -> std::io::Result<()> {
        let mut synced = self.synced.lock().unwrap_or_else(|e| e.into_inner());
        if synced
            .failed
            .iter()
            .any(|(after, upto)| *after < mine && mine <= *upto)
        {
            return Err(std::io::Error::other(format!(
                "an fsync of {} failed",
                dir.display()
            )));
        }
        if synced.covered >= mine {
            return Ok(());
        }
        // Every rename counted by now is complete, so this fsync covers it.
        let upto = self.renamed.load(Ordering::SeqCst);
        self.syncs.fetch_add(1, Ordering::Relaxed);
        let result = File::open(dir).and_then(|d| d.sync_all());
        if result.is_err() {
            let after = synced.covered;
            synced.failed.push((after, upto));
            if synced.failed.len() > FAILED_RANGES_MAX {
                let (a, _) = synced.failed.remove(0);
                synced.failed[0].0 = a;
            }
        }
        synced.covered = upto;
        result
    }
}

/// Where a finalized block is, with its length and block value (from its sidecar).
#[derive(Clone, Copy, Debug)]
struct Located {
    dir: usize,
    len: u64,
    cv: Blake3Cv,
}

/// All blocks on this datanode's disks.
pub struct BlockStore {
    dirs: Vec<DataDir>,
    index: Mutex<HashMap<BlockId, Located>>,
    /// Bytes of each data dir's file system left for other users; blocks never use them.
    reserved: u64,
    /// Replicas lost with a failed data dir, not yet reported to the namenode.
    lost: Mutex<Vec<BlockId>>,
    /// Where the round-robin choice of a data dir for the next block starts.
    next_dir: std::sync::atomic::AtomicUsize,
}

/// Whether an I/O error means the file system is full (or the quota used up).
pub fn is_no_space(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(libc::EDQUOT)
}

/// Whether an I/O error says nothing about the disk: the process is out of descriptors or memory,
/// the call was interrupted or timed out. Such errors never take a data dir out of service and never
/// condemn a replica; the operation is tried again later.
pub fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{Interrupted, OutOfMemory, TimedOut, WouldBlock};
    matches!(e.kind(), Interrupted | OutOfMemory | TimedOut | WouldBlock)
        || matches!(
            e.raw_os_error(),
            Some(
                libc::EMFILE
                    | libc::ENFILE
                    | libc::ENOMEM
                    | libc::ENOBUFS
                    | libc::EAGAIN
                    | libc::EINTR
                    | libc::ETIMEDOUT
            )
        )
}

/// Writes, fsyncs and removes a small file in `dir`.
fn probe_write(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".write-probe-{:016x}", rand::random::<u64>()));
    let result =
        File::create(&probe).and_then(|mut f| f.write_all(b"probe").and_then(|_| f.sync_all()));
    let _ = fs::remove_file(&probe);
    result
}

/// The file name of a block's data.
pub fn block_file_name(id: BlockId) -> String {
    format!("blk_{id}")
}

fn parse_block_name(name: &str) -> Option<BlockId> {
    name.strip_prefix("blk_")?.parse().ok().map(BlockId)
}

impl BlockStore {
    /// Opens every data dir: creates its folders, proves it writable, empties `tmp/`, and indexes
    /// `current/` (a data file without a valid sidecar is removed). New blocks leave `reserved`
    /// bytes free on each data dir's file system.
    pub fn open(roots: &[PathBuf], reserved: u64) -> Result<BlockStore, Error> {
        let mut dirs = Vec::new();
        let mut index = HashMap::new();
        for (i, root) in roots.iter().enumerate() {
            let current = root.join("current");
            let tmp = root.join("tmp");
            for d in [&current, &tmp] {
                fs::create_dir_all(d).map_err(|e| Error::disk(d, e))?;
            }
            // Replicas are the users' data: the data dir is the datanode user's alone.
            for d in [root, &current, &tmp] {
                lode_protocol::service::make_private_dir(d).map_err(|e| Error::disk(d, e))?;
            }
            probe_write(&tmp).map_err(|e| {
                Error::disk(
                    root,
                    std::io::Error::new(e.kind(), format!("data dir is not writable: {e}")),
                )
            })?;
            for entry in fs::read_dir(&tmp).map_err(|e| Error::disk(&tmp, e))? {
                let entry = entry.map_err(|e| Error::disk(&tmp, e))?;
                let _ = fs::remove_file(entry.path());
            }
            for entry in fs::read_dir(&current).map_err(|e| Error::disk(&current, e))? {
                let entry = entry.map_err(|e| Error::disk(&current, e))?;
                let name = entry.file_name().to_string_lossy().to_string();
                if let Some(data) = name.strip_suffix(".meta") {
                    // A sidecar whose data file never arrived (a crash between the renames).
                    if parse_block_name(data).is_some() && !current.join(data).exists() {
                        tracing::warn!(file = %name, "removing a sidecar without its block file");
                        let _ = fs::remove_file(entry.path());
                    }
                    continue;
                }
                let Some(id) = parse_block_name(&name) else {
                    continue;
                };
                let meta_path = current.join(format!("{name}.meta"));
                let valid = fs::read(&meta_path)
                    .ok()
                    .and_then(|b| Sidecar::decode(&b).ok())
                    .filter(|s| entry.metadata().map(|m| m.len() == s.len).unwrap_or(false))
                    .and_then(|s| Some((s.len, checksum::block_cv(&s.pieces)?)));
                match valid {
                    Some((len, cv)) => {
                        let here = Located { dir: i, len, cv };
                        match index.get(&id).copied() {
                            None => {
                                index.insert(id, here);
                            }
                            Some(earlier) => {
                                // The same block in two data dirs (a pulled disk put back after
                                // its blocks were stored again elsewhere): one copy is kept and
                                // the other removed, or the other would never be reported, nor
                                // deleted when the kept one is. HDFS resolves duplicate replicas
                                // the same way at start.
                                let keep = newer(roots, earlier, here, &name);
                                let drop = if keep.dir == here.dir { earlier } else { here };
                                tracing::warn!(block = %id,
                                    kept = %roots[keep.dir].display(),
                                    removed = %roots[drop.dir].display(),
                                    "the same block in two data dirs; keeping the newer copy");
                                let dir = roots[drop.dir].join("current");
                                let _ = fs::remove_file(dir.join(&name));
                                let _ = fs::remove_file(dir.join(format!("{name}.meta")));
                                index.insert(id, keep);
                            }
                        }
                    }
                    None => {
                        tracing::warn!(block = %id, "removing block file without a valid sidecar");
                        let _ = fs::remove_file(entry.path());
                        let _ = fs::remove_file(&meta_path);
                    }
                }
            }
            dirs.push(DataDir {
                root: root.clone(),
                current,
                tmp,
                inflight: AtomicU64::new(0),
                failed: AtomicBool::new(false),
                sync: DirSync::default(),
            });
        }
        Ok(BlockStore {
            dirs,
            index: Mutex::new(index),
            reserved,
            lost: Mutex::new(vec![]),
            next_dir: Default::default(),
        })
    }

    fn index(&self) -> std::sync::MutexGuard<'_, HashMap<BlockId, Located>> {
        // A panic while holding this lock cannot leave the map half-updated (single inserts/removes).
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every finalized replica.
    pub fn report(&self) -> Vec<ReportedBlock> {
        self.index()
            .iter()
            .map(|(id, l)| ReportedBlock {
                id: *id,
                len: l.len,
                cv: l.cv,
            })
            .collect()
    }

    /// The replica of `id` as it would be reported, if one is here.
    pub fn replica(&self, id: BlockId) -> Option<ReportedBlock> {
        self.index().get(&id).map(|l| ReportedBlock {
            id,
            len: l.len,
            cv: l.cv,
        })
    }

    /// Whether a finalized replica of `id` is here.
    pub fn contains(&self, id: BlockId) -> bool {
        self.index().contains_key(&id)
    }

    /// Directory fsyncs made to finalize blocks, over all data dirs.
    pub fn dir_syncs(&self) -> u64 {
        self.dirs
            .iter()
            .map(|d| d.sync.syncs.load(Ordering::Relaxed))
            .sum()
    }

    /// Finalized replicas here.
    pub fn block_count(&self) -> usize {
        self.index().len()
    }

    /// Bytes of block data stored.
    pub fn used(&self) -> u64 {
        self.index().values().map(|l| l.len).sum()
    }

    /// (capacity, room) of data dir `i`, where room is what a new block may use: free space less
    /// the reserve and what blocks being written there were promised. None for a failed dir (a
    /// dir whose file system cannot be asked is checked, and fails if its probe fails too).
    fn room(&self, i: usize) -> Option<(u64, u64)> {
        let d = &self.dirs[i];
        if d.failed.load(Ordering::Relaxed) {
            return None;
        }
        let Some((cap, free)) = statvfs(&d.current) else {
            self.check_dir(i);
            return None;
        };
        let room = free
            .saturating_sub(self.reserved)
            .saturating_sub(d.inflight.load(Ordering::Relaxed));
        Some((cap, room))
    }

    /// The disks as reported to the namenode: totals over healthy data dirs.
    pub fn space(&self) -> Space {
        let mut space = Space {
            used: self.used(),
            ..Space::default()
        };
        for i in 0..self.dirs.len() {
            if let Some((cap, room)) = self.room(i) {
                space.capacity += cap;
                space.remaining += room;
                space.block_room = space.block_room.max(room);
            }
        }
        space.failed_volumes = self.failed_dirs();
        space
    }

    /// Checks data dir `i` after a disk error there by writing a probe file. If the probe fails
    /// for any reason but a full disk, the dir is taken out of service: its replicas leave the
    /// index (and are reported lost) and no new block goes there. Returns whether it is healthy.
    pub fn check_dir(&self, i: usize) -> bool {
        let d = &self.dirs[i];
        if d.failed.load(Ordering::Relaxed) {
            return false;
        }
        match probe_write(&d.tmp) {
            Ok(()) => true,
            Err(e) if is_no_space(&e) => true,
            Err(e) if is_transient(&e) => {
                tracing::warn!(dir = %d.root.display(), "data dir check inconclusive (transient error, dir stays in service): {e}");
                true
            }
            Err(e) => {
                if d.failed.swap(true, Ordering::Relaxed) {
                    return false;
                }
                let mut lost = vec![];
                self.index().retain(|id, l| {
                    if l.dir == i {
                        lost.push(*id);
                    }
                    l.dir != i
                });
                tracing::error!(dir = %d.root.display(), replicas = lost.len(), "data dir failed its check and is out of service: {e}");
                self.lost
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(lost);
                false
            }
        }
    }

    /// Checks every healthy data dir (see [`BlockStore::check_dir`]).
    pub fn check_dirs(&self) {
        for i in 0..self.dirs.len() {
            self.check_dir(i);
        }
    }

    /// Data dirs out of service.
    pub fn failed_dirs(&self) -> u32 {
        self.dirs
            .iter()
            .filter(|d| d.failed.load(Ordering::Relaxed))
            .count() as u32
    }

    /// Replicas lost with failed data dirs since the last call.
    pub fn take_lost(&self) -> Vec<BlockId> {
        std::mem::take(&mut *self.lost.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// (data file, sidecar, data dir index) of a finalized block.
    fn paths(&self, id: BlockId) -> Result<(PathBuf, PathBuf, usize), Error> {
        let loc = *self.index().get(&id).ok_or(Error::BlockNotFound { id })?;
        let dir = &self.dirs[loc.dir].current;
        let data = dir.join(block_file_name(id));
        let meta = dir.join(format!("{}.meta", block_file_name(id)));
        Ok((data, meta, loc.dir))
    }

    /// The error for a failed read in data dir `dir`, after checking the dir (a disk going bad
    /// shows first as failed reads).
    fn read_error(&self, dir: usize, path: &Path, e: std::io::Error) -> Error {
        if !is_transient(&e) {
            self.check_dir(dir);
        }
        Error::disk(path, e)
    }

    /// Reads a block's sidecar.
    pub fn sidecar(&self, id: BlockId) -> Result<Sidecar, Error> {
        let (_, meta, dir) = self.paths(id)?;
        let bytes = fs::read(&meta).map_err(|e| self.read_error(dir, &meta, e))?;
        Sidecar::decode(&bytes).map_err(|_| Error::Corrupt {
            id,
            offset: 0,
            stage: "read",
        })
    }

    /// Opens a block for reading: the file and its sidecar.
    pub fn open_block(self: &Arc<Self>, id: BlockId) -> Result<BlockReader, Error> {
        let sidecar = self.sidecar(id)?;
        let (data, _, dir) = self.paths(id)?;
        let file = File::open(&data).map_err(|e| self.read_error(dir, &data, e))?;
        Ok(BlockReader {
            id,
            file,
            path: data,
            store: self.clone(),
            dir,
            sidecar,
        })
    }

    /// Starts writing a block of at most `max_len` bytes in the next healthy data dir (round robin,
    /// spreading blocks over the disks) with `max_len` bytes to spare (else [`Error::NoSpace`]); the room stays
    /// promised to the block until it is finished or dropped. The block becomes visible only when
    /// [`BlockWriter::finish`] returns.
    pub fn create(
        self: &Arc<Self>,
        id: BlockId,
        file_offset: u64,
        max_len: u64,
    ) -> Result<BlockWriter, Error> {
        loop {
            let n = self.dirs.len();
            let start = self.next_dir.fetch_add(1, Ordering::Relaxed);
            let dir = (0..n)
                .map(|k| (start + k) % n)
                .find(|i| self.room(*i).is_some_and(|(_, room)| room >= max_len))
                .ok_or_else(|| self.no_space(max_len))?;
            let suffix: u64 = rand::random();
            let data_path = self.dirs[dir]
                .tmp
                .join(format!("{}.{suffix:016x}", block_file_name(id)));
            let file = match OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&data_path)
            {
                Ok(f) => f,
                Err(e) if is_no_space(&e) => return Err(self.no_space(max_len)),
                // A dir that fails its check is out of service now: try the next one.
                Err(_) if !self.check_dir(dir) => continue,
                Err(e) => return Err(Error::disk(&data_path, e)),
            };
            self.dirs[dir]
                .inflight
                .fetch_add(max_len, Ordering::Relaxed);
            return Ok(BlockWriter {
                store: self.clone(),
                id,
                dir,
                promised: max_len,
                file_offset,
                file,
                data_path,
                len: 0,
                pieces: vec![],
                short_seen: false,
            });
        }
    }

    fn no_space(&self, needed: u64) -> Error {
        let failed = self.failed_dirs();
        let failed = if failed > 0 {
            format!(", {failed} of {} data dirs failed", self.dirs.len())
        } else {
            String::new()
        };
        Error::NoSpace(format!(
            "no healthy data dir has {needed} bytes to spare (reserve {} bytes{failed})",
            self.reserved
        ))
    }

    /// The error for a failed write in data dir `dir`: a full disk is [`Error::NoSpace`]; any other
    /// error gets the dir checked (and taken out of service if the check fails too).
    fn write_error(&self, dir: usize, path: &Path, e: std::io::Error) -> Error {
        if is_no_space(&e) {
            return Error::NoSpace(format!("{} is full", self.dirs[dir].root.display()));
        }
        if !is_transient(&e) {
            self.check_dir(dir);
        }
        Error::disk(path, e)
    }

    /// Deletes the replica the namenode named, only if the one here still has its length and value
    /// (a newer replica stored under the same id since is kept); false if no such replica is here.
    pub fn delete_exact(&self, replica: &ReportedBlock) -> Result<bool, Error> {
        let matches = self
            .index()
            .get(&replica.id)
            .is_some_and(|l| l.len == replica.len && l.cv == replica.cv);
        if !matches {
            return Ok(false);
        }
        self.delete(replica.id)
    }

    /// Deletes a replica whatever it holds; false if it was not here.
    pub fn delete(&self, id: BlockId) -> Result<bool, Error> {
        let Ok((data, meta, _)) = self.paths(id) else {
            return Ok(false);
        };
        self.index().remove(&id);
        for p in [&data, &meta] {
            match fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::disk(p, e)),
            }
        }
        Ok(true)
    }
}

/// An open block with its sidecar; every piece read is verified.
pub struct BlockReader {
    id: BlockId,
    file: File,
    path: PathBuf,
    store: Arc<BlockStore>,
    dir: usize,
    /// The sidecar.
    pub sidecar: Sidecar,
}

impl BlockReader {
    /// The open file and its sidecar (to hand the file to a plugin task).
    pub fn into_parts(self) -> (File, Sidecar) {
        (self.file, self.sidecar)
    }

    /// Reads and verifies piece `index` into `buf`.
    pub fn read_piece(&mut self, index: u64, buf: &mut Vec<u8>) -> Result<Blake3Cv, Error> {
        let offset = index * PIECE_BYTES;
        if offset >= self.sidecar.len {
            return Err(Error::Invalid(format!(
                "piece {index} is past the end of block {}",
                self.id
            )));
        }
        let len = (self.sidecar.len - offset).min(PIECE_BYTES) as usize;
        buf.clear();
        buf.resize(len, 0);
        let read = self
            .file
            .seek(SeekFrom::Start(offset))
            .and_then(|_| self.file.read_exact(buf));
        if let Err(e) = read {
            return Err(self.store.read_error(self.dir, &self.path, e));
        }
        let want = self.sidecar.pieces[index as usize];
        if checksum::piece_cv(self.sidecar.file_offset + offset, buf) != want {
            return Err(Error::Corrupt {
                id: self.id,
                offset,
                stage: "read",
            });
        }
        Ok(want)
    }
}

/// A block being written.
pub struct BlockWriter {
    store: Arc<BlockStore>,
    id: BlockId,
    dir: usize,
    /// Room promised in the dir while this block is written.
    promised: u64,
    file_offset: u64,
    file: File,
    data_path: PathBuf,
    len: u64,
    pieces: Vec<Blake3Cv>,
    short_seen: bool,
}

impl BlockWriter {
    /// Verifies one piece against its value, then appends it.
    pub fn write_piece(&mut self, cv: Blake3Cv, data: &[u8]) -> Result<(), Error> {
        if self.short_seen || data.is_empty() || data.len() as u64 > PIECE_BYTES {
            return Err(Error::Invalid(
                "only the last piece of a block may be shorter than 64 KiB".into(),
            ));
        }
        if checksum::piece_cv(self.file_offset + self.len, data) != cv {
            return Err(Error::Corrupt {
                id: self.id,
                offset: self.len,
                stage: "write",
            });
        }
        if let Err(e) = self.file.write_all(data) {
            return Err(self.store.write_error(self.dir, &self.data_path, e));
        }
        self.short_seen = (data.len() as u64) < PIECE_BYTES;
        self.len += data.len() as u64;
        self.pieces.push(cv);
        Ok(())
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True before the first piece.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Fsyncs data and sidecar, renames both into `current/`, fsyncs the directory (one fsync for
    /// the blocks finished at the same time, [`DirSync`]), and indexes the block. Returns the block's length and value.
    pub fn finish(mut self) -> Result<(u64, Blake3Cv), Error> {
        let cv = checksum::block_cv(&self.pieces)
            .ok_or_else(|| Error::Invalid(format!("block {} is empty", self.id)))?;
        let store = self.store.clone();
        let fail = |path: &Path, e| store.write_error(self.dir, path, e);
        self.file.sync_all().map_err(|e| fail(&self.data_path, e))?;
        let dir = &store.dirs[self.dir];
        let meta_tmp = self.data_path.with_extension("meta.tmp");
        let sidecar = Sidecar {
            len: self.len,
            file_offset: self.file_offset,
            pieces: std::mem::take(&mut self.pieces),
        };
        let written = File::create(&meta_tmp).and_then(|mut meta| {
            meta.write_all(&sidecar.encode())
                .and_then(|_| meta.sync_all())
        });
        if let Err(e) = written {
            let _ = fs::remove_file(&meta_tmp);
            return Err(fail(&meta_tmp, e));
        }
        let name = block_file_name(self.id);
        let meta_final = dir.current.join(format!("{name}.meta"));
        let data_final = dir.current.join(&name);
        // If an older replica of this block sits in another dir, drop it first.
        let _ = store.delete(self.id);
        crate::failpoint!("datanode.block.before_rename");
        // The sidecar goes first: a crash before the data's rename leaves a sidecar alone, which
        // the next start removes; a data file is never visible without its sidecar.
        fs::rename(&meta_tmp, &meta_final).map_err(|e| fail(&meta_final, e))?;
        crate::failpoint!("datanode.block.between_renames");
        fs::rename(&self.data_path, &data_final).map_err(|e| fail(&data_final, e))?;
        let mine = dir.sync.renamed();
        crate::failpoint!("datanode.block.before_dir_sync");
        dir.sync
            .sync(&dir.current, mine)
            .map_err(|e| fail(&dir.current, e))?;
        crate::failpoint!("datanode.block.after_dir_sync");
        self.store.index().insert(
            self.id,
            Located {
                dir: self.dir,
                len: self.len,
                cv,
            },
        );
        Ok((self.len, cv))
    }
}

impl Drop for BlockWriter {
    fn drop(&mut self) {
        // Unfinished: remove the temp file (after finish it was renamed and this fails harmlessly).
        let _ = fs::remove_file(&self.data_path);
        self.store.dirs[self.dir]
            .inflight
            .fetch_sub(self.promised, Ordering::Relaxed);
    }
}

/// Of two copies of block file `name`, the one written last (the other if its time is unknown).
fn newer(roots: &[PathBuf], a: Located, b: Located, name: &str) -> Located {
    let written = |l: Located| {
        fs::metadata(roots[l.dir].join("current").join(name))
            .and_then(|m| m.modified())
            .ok()
    };
    match (written(a), written(b)) {
        (Some(ta), Some(tb)) if ta > tb => a,
        (Some(_), None) => a,
        _ => b,
    }
}

fn statvfs(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `s` a properly sized out-parameter.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    let frsize = s.f_frsize as u64;
    Some((s.f_blocks as u64 * frsize, s.f_bavail as u64 * frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renames_made_before_a_directory_fsync_share_it_and_a_failed_one_fails_them_all() {
        let tmp = tempfile::tempdir().unwrap();
        let sync = DirSync::default();
        let mine: Vec<u64> = (0..3).map(|_| sync.renamed()).collect();
        assert_eq!(mine, [1, 2, 3]);
        for m in &mine {
            sync.sync(tmp.path(), *m).unwrap();
        }
        assert_eq!(
            sync.syncs.load(Ordering::Relaxed),
            1,
            "one fsync covered all three"
        );
        let fourth = sync.renamed();
        sync.sync(tmp.path(), fourth).unwrap();
        assert_eq!(
            sync.syncs.load(Ordering::Relaxed),
            2,
            "a rename after it needs its own"
        );

        // A failed fsync fails every rename it was to cover, and a later success does not undo it.
        let gone = tmp.path().join("gone");
        let (fifth, sixth) = (sync.renamed(), sync.renamed());
        assert!(sync.sync(&gone, fifth).is_err());
        assert!(
            sync.sync(tmp.path(), sixth).is_err(),
            "covered by the failed fsync"
        );
        let seventh = sync.renamed();
        sync.sync(tmp.path(), seventh).unwrap();
        assert!(sync.sync(tmp.path(), fifth).is_err());
        assert!(
            sync.sync(tmp.path(), fourth).is_ok(),
            "made durable before the failure"
        );
    }

    #[test]
    fn blocks_finished_at_once_are_all_indexed_with_at_most_one_directory_fsync_each() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(BlockStore::open(&[tmp.path().to_path_buf()], 0).unwrap());
        let threads: Vec<_> = (0..16u64)
            .map(|i| {
                let store = store.clone();
                std::thread::spawn(move || write_block(&store, i + 1, 0, &[i as u8; 4096]))
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        assert_eq!(store.block_count(), 16);
        let syncs = store.dir_syncs();
        assert!(
            (1..=16).contains(&syncs),
            "{syncs} directory fsyncs for 16 blocks"
        );
    }

    fn write_block(
        store: &Arc<BlockStore>,
        id: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<(u64, Blake3Cv), Error> {
        let mut w = store.create(BlockId(id), offset, 1 << 20)?;
        for (i, p) in data.chunks(PIECE_BYTES as usize).enumerate() {
            w.write_piece(checksum::piece_cv(offset + i as u64 * PIECE_BYTES, p), p)?;
        }
        w.finish()
    }

    #[test]
    fn a_block_found_in_two_data_dirs_is_kept_once_and_deleted_whole() {
        // A disk pulled while its blocks were stored again on the other, then put back.
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let roots = [a.path().to_path_buf(), b.path().to_path_buf()];
        let old = vec![1u8; 1000];
        let new = vec![2u8; 1000];
        {
            let only_b = Arc::new(BlockStore::open(&roots[1..], 0).unwrap());
            write_block(&only_b, 7, 0, &old).unwrap();
        }
        let (len, cv) = {
            let only_a = Arc::new(BlockStore::open(&roots[..1], 0).unwrap());
            write_block(&only_a, 7, 0, &new).unwrap()
        };
        // The copy in `a` was written last; make that unmistakable to the file system's clock.
        let data_b = b.path().join("current").join(block_file_name(BlockId(7)));
        let past = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        File::options()
            .write(true)
            .open(&data_b)
            .unwrap()
            .set_modified(past)
            .unwrap();
        let store = Arc::new(BlockStore::open(&roots, 0).unwrap());
        assert_eq!(
            store.report(),
            vec![ReportedBlock {
                id: BlockId(7),
                len,
                cv
            }]
        );
        assert!(!data_b.exists(), "the older copy is removed");
        assert!(store
            .delete_exact(&store.replica(BlockId(7)).unwrap())
            .unwrap());
        for root in &roots {
            let left: Vec<_> = fs::read_dir(root.join("current")).unwrap().collect();
            assert!(left.is_empty(), "{left:?} left in {}", root.display());
        }
    }

    #[test]
    fn running_out_of_descriptors_never_fails_a_data_dir() {
        // Lowering the descriptor limit affects the whole process: only where each test has a
        // process of its own (cargo nextest, which the test scripts use).
        if std::env::var_os("NEXTEST").is_none() {
            eprintln!("skipped: needs a process of its own (run under cargo nextest)");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let store = Arc::new(BlockStore::open(&[d.path().to_path_buf()], 0).unwrap());
        write_block(&store, 1, 0, &[5u8; 1000]).unwrap();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: a valid out-parameter.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        let lowest_free = {
            use std::os::fd::AsRawFd;
            File::open("/dev/null").unwrap().as_raw_fd()
        };
        let tight = libc::rlimit {
            rlim_cur: lowest_free as libc::rlim_t,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: valid rlimit values (soft below hard).
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &tight) }, 0);
        let read = store.open_block(BlockId(1));
        let write = store.create(BlockId(2), 0, 1 << 20).map(|_| ());
        let checked = store.check_dir(0);
        // SAFETY: restores the limits read above.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
        let emfile = |r: Result<(), Error>| matches!(r, Err(Error::Disk { source, .. }) if source.raw_os_error() == Some(libc::EMFILE));
        assert!(
            emfile(read.map(|_| ())),
            "the read hit the descriptor limit"
        );
        assert!(emfile(write), "the write hit the descriptor limit");
        assert!(checked, "a transient error keeps the dir in service");
        assert_eq!(store.failed_dirs(), 0);
        assert!(store.take_lost().is_empty());
        assert!(store.open_block(BlockId(1)).is_ok());
    }

    #[test]
    fn a_sidecar_left_without_its_block_file_is_collected_at_start() {
        let d = tempfile::tempdir().unwrap();
        let roots = vec![d.path().to_path_buf()];
        let data = vec![7u8; 1000];
        {
            let store = Arc::new(BlockStore::open(&roots, 0).unwrap());
            write_block(&store, 3, 0, &data).unwrap();
        }
        let current = d.path().join("current");
        // A crash between the sidecar's rename and the data's leaves the sidecar alone.
        fs::copy(current.join("blk_3.meta"), current.join("blk_4.meta")).unwrap();
        let store = Arc::new(BlockStore::open(&roots, 0).unwrap());
        assert!(!current.join("blk_4.meta").exists());
        assert!(current.join("blk_3.meta").exists());
        assert_eq!(store.report().len(), 1);
    }

    #[test]
    fn write_reopen_read_verify_delete() {
        let d1 = tempfile::tempdir().unwrap();
        let d2 = tempfile::tempdir().unwrap();
        let roots = vec![d1.path().to_path_buf(), d2.path().to_path_buf()];
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        {
            let store = Arc::new(BlockStore::open(&roots, 0).unwrap());
            let (len, cv) = write_block(&store, 5, 1 << 20, &data).unwrap();
            assert_eq!(len, data.len() as u64);
            assert_eq!(store.replica(BlockId(5)).map(|r| r.cv), Some(cv));
            // a piece with the wrong value is refused and leaves nothing behind
            let mut w = store.create(BlockId(6), 0, 1 << 20).unwrap();
            assert!(matches!(
                w.write_piece(Blake3Cv([0; 32]), &data[..10]),
                Err(Error::Corrupt { .. })
            ));
        }
        let store = Arc::new(BlockStore::open(&roots, 0).unwrap());
        let pieces: Vec<Blake3Cv> = data
            .chunks(PIECE_BYTES as usize)
            .enumerate()
            .map(|(i, p)| checksum::piece_cv((1 << 20) + i as u64 * PIECE_BYTES, p))
            .collect();
        let reported = ReportedBlock {
            id: BlockId(5),
            len: data.len() as u64,
            cv: checksum::block_cv(&pieces).unwrap(),
        };
        // The value is merged from the sidecar again after a restart.
        assert_eq!(store.report(), vec![reported]);
        // A delete naming another length or value (a stale replica's) leaves this one alone.
        for other in [
            ReportedBlock { len: 1, ..reported },
            ReportedBlock {
                cv: Blake3Cv([0; 32]),
                ..reported
            },
        ] {
            assert!(!store.delete_exact(&other).unwrap());
        }
        assert!(store.contains(BlockId(5)));
        let mut r = store.open_block(BlockId(5)).unwrap();
        let mut buf = vec![];
        r.read_piece(3, &mut buf).unwrap();
        assert_eq!(&buf[..], &data[3 * 65536..]);
        // flip a byte on disk: the read fails its check
        let (path, _, _) = store.paths(BlockId(5)).unwrap();
        let mut bytes = fs::read(&path).unwrap();
        bytes[70_000] ^= 1;
        fs::write(&path, bytes).unwrap();
        let mut r = store.open_block(BlockId(5)).unwrap();
        assert!(matches!(
            r.read_piece(1, &mut buf),
            Err(Error::Corrupt { .. })
        ));
        assert!(store.delete_exact(&reported).unwrap());
        assert!(store.report().is_empty());
        assert!(matches!(
            store.open_block(BlockId(5)),
            Err(Error::BlockNotFound { .. })
        ));
    }

    #[test]
    fn a_block_needs_room_beyond_the_reserve_and_blocks_being_written() {
        let d = tempfile::tempdir().unwrap();
        let roots = vec![d.path().to_path_buf()];
        let free = statvfs(d.path()).unwrap().1;
        // A reserve larger than the free space leaves no room at all.
        let store = Arc::new(BlockStore::open(&roots, free + (1 << 30)).unwrap());
        assert!(matches!(
            store.create(BlockId(1), 0, 1 << 20),
            Err(Error::NoSpace(_))
        ));
        assert_eq!(store.space().remaining, 0);
        assert_eq!(store.space().block_room, 0);
        // Room promised to a block being written is not offered twice, and comes back after.
        let store = Arc::new(BlockStore::open(&roots, 0).unwrap());
        let room = store.space().block_room;
        let w = store.create(BlockId(2), 0, room / 4 * 3).unwrap();
        assert!(store.space().block_room < room / 2);
        assert!(matches!(
            store.create(BlockId(3), 0, room / 4 * 3),
            Err(Error::NoSpace(_))
        ));
        drop(w);
        assert!(store.space().block_room > room / 2);
        assert!(fs::read_dir(d.path().join("tmp")).unwrap().next().is_none());
    }

    #[test]
    fn a_data_dir_that_fails_its_check_leaves_service_with_its_replicas() {
        let d1 = tempfile::tempdir().unwrap();
        let d2 = tempfile::tempdir().unwrap();
        let roots = vec![d1.path().join("v"), d2.path().join("v")];
        let store = Arc::new(BlockStore::open(&roots, 0).unwrap());
        // Round robin: consecutive blocks land on both dirs.
        for id in 1..=4 {
            write_block(&store, id, 0, &[id as u8; 1000]).unwrap();
        }
        let on_first = fs::read_dir(roots[0].join("current")).unwrap().count() / 2;
        assert_eq!(on_first, 2, "blocks spread over the dirs");
        assert!(store.check_dir(0) && store.take_lost().is_empty());
        let on_dir0 = fs::read_dir(roots[0].join("current"))
            .unwrap()
            .flatten()
            .find_map(|e| parse_block_name(&e.file_name().to_string_lossy()))
            .unwrap();
        fs::rename(&roots[0], d1.path().join("pulled")).unwrap();
        // A read that fails gets the dir checked, and the check fails.
        assert!(matches!(store.open_block(on_dir0), Err(Error::Disk { .. })));
        assert_eq!(store.failed_dirs(), 1);
        assert!(!store.check_dir(0));
        assert_eq!(store.space().failed_volumes, 1);
        let mut lost = store.take_lost();
        lost.sort();
        assert_eq!(lost.len(), 2);
        assert!(lost.iter().all(|id| !store.contains(*id)));
        assert_eq!(store.report().len(), 2);
        // A refusal says that dirs have failed.
        let refused = store.create(BlockId(99), 0, u64::MAX / 2).err().unwrap();
        assert!(
            matches!(refused, Error::NoSpace(ref m) if m.contains("1 of 2 data dirs failed")),
            "{refused}"
        );
        // New blocks go to the healthy dir only.
        for id in 5..=7 {
            write_block(&store, id, 0, &[1; 100]).unwrap();
        }
        assert_eq!(
            fs::read_dir(roots[1].join("current")).unwrap().count(),
            2 * 5
        );
    }

    #[test]
    fn unwritable_data_dir_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("not-a-dir");
        fs::write(&file, b"x").unwrap();
        let err = BlockStore::open(std::slice::from_ref(&file), 0)
            .err()
            .unwrap();
        assert!(err.to_string().contains("not-a-dir"), "{err}");
    }
}
