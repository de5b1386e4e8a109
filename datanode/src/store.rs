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
use std::sync::{Arc, Mutex};

use lode_protocol::checksum::{self, PIECE_BYTES};
use lode_protocol::messages::ReportedBlock;
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

    fn decode(bytes: &[u8]) -> Result<Sidecar, String> {
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
    current: PathBuf,
    tmp: PathBuf,
}

/// Where a finalized block is.
#[derive(Clone, Copy, Debug)]
struct Located {
    dir: usize,
    len: u64,
}

/// All blocks on this datanode's disks.
pub struct BlockStore {
    dirs: Vec<DataDir>,
    index: Mutex<HashMap<BlockId, Located>>,
}

/// The file name of a block's data.
pub fn block_file_name(id: BlockId) -> String {
    format!("blk_{id}")
}

fn parse_block_name(name: &str) -> Option<BlockId> {
    name.strip_prefix("blk_")?.parse().ok().map(BlockId)
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::disk(dir, e))
}

impl BlockStore {
    /// Opens every data dir: creates its folders, proves it writable, empties `tmp/`, and indexes
    /// `current/` (a data file without a valid sidecar is removed).
    pub fn open(roots: &[PathBuf]) -> Result<BlockStore, Error> {
        let mut dirs = Vec::new();
        let mut index = HashMap::new();
        for (i, root) in roots.iter().enumerate() {
            let current = root.join("current");
            let tmp = root.join("tmp");
            for d in [&current, &tmp] {
                fs::create_dir_all(d).map_err(|e| Error::disk(d, e))?;
            }
            let probe = tmp.join(".write-probe");
            File::create(&probe)
                .and_then(|mut f| f.write_all(b"probe").and_then(|_| f.sync_all()))
                .and_then(|_| fs::remove_file(&probe))
                .map_err(|e| {
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
                let Some(id) = parse_block_name(&name) else {
                    continue;
                };
                let meta_path = current.join(format!("{name}.meta"));
                let valid = fs::read(&meta_path)
                    .ok()
                    .and_then(|b| Sidecar::decode(&b).ok())
                    .filter(|s| entry.metadata().map(|m| m.len() == s.len).unwrap_or(false));
                match valid {
                    Some(s) => {
                        index.insert(id, Located { dir: i, len: s.len });
                    }
                    None => {
                        tracing::warn!(block = %id, "removing block file without a valid sidecar");
                        let _ = fs::remove_file(entry.path());
                        let _ = fs::remove_file(&meta_path);
                    }
                }
            }
            dirs.push(DataDir { current, tmp });
        }
        Ok(BlockStore {
            dirs,
            index: Mutex::new(index),
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
            })
            .collect()
    }

    /// Whether a finalized replica of `id` is here.
    pub fn contains(&self, id: BlockId) -> bool {
        self.index().contains_key(&id)
    }

    /// Bytes of block data stored.
    pub fn used(&self) -> u64 {
        self.index().values().map(|l| l.len).sum()
    }

    /// (capacity, remaining) summed over the data dirs' file systems.
    pub fn space(&self) -> (u64, u64) {
        let mut cap = 0;
        let mut free = 0;
        for d in &self.dirs {
            if let Some((c, f)) = statvfs(&d.current) {
                cap += c;
                free += f;
            }
        }
        (cap, free)
    }

    fn paths(&self, id: BlockId) -> Result<(PathBuf, PathBuf, u64), Error> {
        let loc = *self.index().get(&id).ok_or(Error::BlockNotFound { id })?;
        let dir = &self.dirs[loc.dir].current;
        let data = dir.join(block_file_name(id));
        let meta = dir.join(format!("{}.meta", block_file_name(id)));
        Ok((data, meta, loc.len))
    }

    /// Reads a block's sidecar.
    pub fn sidecar(&self, id: BlockId) -> Result<Sidecar, Error> {
        let (_, meta, _) = self.paths(id)?;
        let bytes = fs::read(&meta).map_err(|e| Error::disk(&meta, e))?;
        Sidecar::decode(&bytes).map_err(|_| Error::Corrupt {
            id,
            offset: 0,
            stage: "read",
        })
    }

    /// Opens a block for reading: the file and its sidecar.
    pub fn open_block(&self, id: BlockId) -> Result<BlockReader, Error> {
        let sidecar = self.sidecar(id)?;
        let (data, _, _) = self.paths(id)?;
        let file = File::open(&data).map_err(|e| Error::disk(&data, e))?;
        Ok(BlockReader {
            id,
            file,
            path: data,
            sidecar,
        })
    }

    /// Starts writing a block; it becomes visible only when [`BlockWriter::finish`] returns.
    pub fn create(self: &Arc<Self>, id: BlockId, file_offset: u64) -> Result<BlockWriter, Error> {
        let dir = self.pick_dir();
        let tmp = &self.dirs[dir].tmp;
        let suffix: u64 = rand::random();
        let data_path = tmp.join(format!("{}.{suffix:016x}", block_file_name(id)));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&data_path)
            .map_err(|e| Error::disk(&data_path, e))?;
        Ok(BlockWriter {
            store: self.clone(),
            id,
            dir,
            file_offset,
            file,
            data_path,
            len: 0,
            pieces: vec![],
            short_seen: false,
        })
    }

    fn pick_dir(&self) -> usize {
        (0..self.dirs.len())
            .max_by_key(|i| statvfs(&self.dirs[*i].current).map_or(0, |(_, free)| free))
            .unwrap_or(0)
    }

    /// Deletes a replica; false if it was not here.
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
        self.file
            .seek(SeekFrom::Start(offset))
            .map_err(|e| Error::disk(&self.path, e))?;
        self.file
            .read_exact(buf)
            .map_err(|e| Error::disk(&self.path, e))?;
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
        self.file
            .write_all(data)
            .map_err(|e| Error::disk(&self.data_path, e))?;
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

    /// Fsyncs data and sidecar, renames both into `current/`, fsyncs the directory, and indexes the
    /// block. Returns the block's length and value.
    pub fn finish(mut self) -> Result<(u64, Blake3Cv), Error> {
        let cv = checksum::block_cv(&self.pieces)
            .ok_or_else(|| Error::Invalid(format!("block {} is empty", self.id)))?;
        self.file
            .sync_all()
            .map_err(|e| Error::disk(&self.data_path, e))?;
        let dir = &self.store.dirs[self.dir];
        let meta_tmp = self.data_path.with_extension("meta.tmp");
        let sidecar = Sidecar {
            len: self.len,
            file_offset: self.file_offset,
            pieces: std::mem::take(&mut self.pieces),
        };
        let mut meta = File::create(&meta_tmp).map_err(|e| Error::disk(&meta_tmp, e))?;
        meta.write_all(&sidecar.encode())
            .and_then(|_| meta.sync_all())
            .map_err(|e| Error::disk(&meta_tmp, e))?;
        let name = block_file_name(self.id);
        let meta_final = dir.current.join(format!("{name}.meta"));
        let data_final = dir.current.join(&name);
        // If an older replica of this block sits in another dir, drop it first.
        let _ = self.store.delete(self.id);
        fs::rename(&meta_tmp, &meta_final).map_err(|e| Error::disk(&meta_final, e))?;
        fs::rename(&self.data_path, &data_final).map_err(|e| Error::disk(&data_final, e))?;
        sync_dir(&dir.current)?;
        self.store.index().insert(
            self.id,
            Located {
                dir: self.dir,
                len: self.len,
            },
        );
        Ok((self.len, cv))
    }
}

impl Drop for BlockWriter {
    fn drop(&mut self) {
        // Unfinished: remove the temp file (after finish it was renamed and this fails harmlessly).
        let _ = fs::remove_file(&self.data_path);
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

    fn write_block(
        store: &Arc<BlockStore>,
        id: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<(u64, Blake3Cv), Error> {
        let mut w = store.create(BlockId(id), offset)?;
        for (i, p) in data.chunks(PIECE_BYTES as usize).enumerate() {
            w.write_piece(checksum::piece_cv(offset + i as u64 * PIECE_BYTES, p), p)?;
        }
        w.finish()
    }

    #[test]
    fn write_reopen_read_verify_delete() {
        let d1 = tempfile::tempdir().unwrap();
        let d2 = tempfile::tempdir().unwrap();
        let roots = vec![d1.path().to_path_buf(), d2.path().to_path_buf()];
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        {
            let store = Arc::new(BlockStore::open(&roots).unwrap());
            let (len, _) = write_block(&store, 5, 1 << 20, &data).unwrap();
            assert_eq!(len, data.len() as u64);
            // a piece with the wrong value is refused and leaves nothing behind
            let mut w = store.create(BlockId(6), 0).unwrap();
            assert!(matches!(
                w.write_piece(Blake3Cv([0; 32]), &data[..10]),
                Err(Error::Corrupt { .. })
            ));
        }
        let store = Arc::new(BlockStore::open(&roots).unwrap());
        assert_eq!(
            store.report(),
            vec![ReportedBlock {
                id: BlockId(5),
                len: data.len() as u64
            }]
        );
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
        assert!(store.delete(BlockId(5)).unwrap());
        assert!(store.report().is_empty());
        assert!(matches!(
            store.open_block(BlockId(5)),
            Err(Error::BlockNotFound { .. })
        ));
    }

    #[test]
    fn unwritable_data_dir_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("not-a-dir");
        fs::write(&file, b"x").unwrap();
        let err = BlockStore::open(std::slice::from_ref(&file)).err().unwrap();
        assert!(err.to_string().contains("not-a-dir"), "{err}");
    }
}
