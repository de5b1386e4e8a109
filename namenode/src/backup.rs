//! Metadata backups: every key and value of the metadata store as of one applied edit, in one file
//! with a BLAKE3 hash at the end, taken online by the namespace writer (so no change is half in it),
//! and restored offline into an empty metadata directory.
//!
//! Format: `LODEMETA1`, u64 last applied edit, u64 pair count, then per pair u32 key length, key,
//! u32 value length, value; then the 32-byte BLAKE3 hash of everything before it.

use std::path::Path;

use crate::error::Error;
use crate::store::{MetaStore, SledStore};

const MAGIC: &[u8; 9] = b"LODEMETA1";

/// Serialises the whole store.
pub fn dump<S: MetaStore>(store: &S, last_applied: u64) -> Result<Vec<u8>, Error> {
    let pairs = store.scan_prefix(b"")?;
    let mut out = MAGIC.to_vec();
    out.extend(last_applied.to_le_bytes());
    out.extend((pairs.len() as u64).to_le_bytes());
    for (k, v) in &pairs {
        out.extend((k.len() as u32).to_le_bytes());
        out.extend(k);
        out.extend((v.len() as u32).to_le_bytes());
        out.extend(v);
    }
    let hash = blake3::hash(&out);
    out.extend(hash.as_bytes());
    Ok(out)
}

/// Checks a backup and returns (last applied edit, pairs).
pub fn parse(bytes: &[u8]) -> Result<(u64, crate::store::Pairs), Error> {
    let bad = |m: &str| Error::Corrupt(format!("backup: {m}"));
    if bytes.len() < MAGIC.len() + 16 + 32 || &bytes[..MAGIC.len()] != MAGIC {
        return Err(bad("not a Lode metadata backup"));
    }
    let (body, hash) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(body).as_bytes() != hash {
        return Err(bad("hash mismatch (truncated or damaged file)"));
    }
    let mut i = MAGIC.len();
    let mut take = |n: usize| -> Result<&[u8], Error> {
        let s = body.get(i..i + n).ok_or_else(|| bad("truncated"))?;
        i += n;
        Ok(s)
    };
    let u64_at = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
    let last_applied = u64_at(take(8)?);
    let n = u64_at(take(8)?);
    let mut pairs = Vec::new();
    for _ in 0..n {
        let kl = u32::from_le_bytes(take(4)?.try_into().unwrap_or([0; 4])) as usize;
        let k = take(kl)?.to_vec();
        let vl = u32::from_le_bytes(take(4)?.try_into().unwrap_or([0; 4])) as usize;
        let v = take(vl)?.to_vec();
        pairs.push((k, v));
    }
    Ok((last_applied, pairs))
}

/// Restores a backup into `meta_dir`, which must hold no metadata yet.
pub fn restore(backup: &Path, meta_dir: &Path) -> Result<u64, Error> {
    let io = |path: &Path, source| Error::EditLog {
        path: path.to_path_buf(),
        source,
    };
    let holds_metadata = [
        "sled",
        "edits.log",
        "edits.log.1",
        crate::editlog::CHECKPOINT,
    ]
    .iter()
    .any(|f| meta_dir.join(f).exists());
    if holds_metadata {
        return Err(Error::refused(
            lode_protocol::ErrorCode::AlreadyExists,
            format!(
                "{}: already holds metadata; restore only into an empty directory",
                meta_dir.display()
            ),
        ));
    }
    let bytes = std::fs::read(backup).map_err(|e| io(backup, e))?;
    let (last_applied, pairs) = parse(&bytes)?;
    std::fs::create_dir_all(meta_dir).map_err(|e| io(meta_dir, e))?;
    load(&meta_dir.join("sled"), pairs)?;
    // The backup is also the directory's first checkpoint, so a store that later loses writes
    // can be rebuilt from it and the edits after it.
    crate::editlog::write_durably(meta_dir, crate::editlog::CHECKPOINT, &bytes)
        .map_err(|e| io(&meta_dir.join(crate::editlog::CHECKPOINT), e))?;
    // The next edit continues after the backup's last one (the log starts empty).
    let (mut log, _) = crate::editlog::EditLog::open(meta_dir)?;
    log.skip_to(last_applied);
    Ok(last_applied)
}

/// Creates a metadata store in `dir` (which must not exist) holding exactly `pairs`.
pub fn load(dir: &Path, pairs: crate::store::Pairs) -> Result<SledStore, Error> {
    let store = SledStore::open(dir)?;
    store.apply_batch(pairs.into_iter().map(|(k, v)| (k, Some(v))).collect())?;
    store.flush()?;
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;

    #[test]
    fn dumps_parse_back_and_damage_is_detected() {
        let store = MemStore::default();
        store
            .apply_batch(vec![
                (b"a".to_vec(), Some(b"1".to_vec())),
                (b"bb".to_vec(), Some(vec![])),
            ])
            .unwrap();
        let d = dump(&store, 42).unwrap();
        let (applied, pairs) = parse(&d).unwrap();
        assert_eq!(applied, 42);
        assert_eq!(
            pairs,
            vec![(b"a".to_vec(), b"1".to_vec()), (b"bb".to_vec(), vec![])]
        );
        let mut bad = d.clone();
        bad[12] ^= 1;
        assert!(parse(&bad).is_err());
        assert!(parse(&d[..d.len() - 1]).is_err());
        assert!(parse(b"nope").is_err());
    }
}
