//! The materialised namespace lives behind the narrow [`MetaStore`] trait: sled in production, a
//! `BTreeMap` in unit tests. Swapping the engine touches this file only.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use crate::error::Error;

/// Key-value pairs in key order.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;
/// Puts (`Some`) and deletes (`None`), applied together.
pub type Batch = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// A key-value store with atomic batches.
pub trait MetaStore: Send + Sync + 'static {
    /// Reads one key.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error>;
    /// All pairs whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Pairs, Error>;
    /// Applies puts (`Some`) and deletes (`None`) atomically.
    fn apply_batch(&self, batch: Batch) -> Result<(), Error>;
    /// Writes buffered state out (not a power-loss barrier for sled; the edit log is).
    fn flush(&self) -> Result<(), Error>;
}

/// How long an open waits for another handle of this process to release the store's lock.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// sled, pinned at 0.34.7.
pub struct SledStore {
    tree: sled::Db,
}

/// sled's page cache unless the config sets `meta_cache_bytes`.
pub const DEFAULT_CACHE_BYTES: u64 = 256 << 20;

impl SledStore {
    /// Opens (or creates) the store in `dir` with the default page cache.
    pub fn open(dir: &Path) -> Result<SledStore, Error> {
        SledStore::open_cached(dir, DEFAULT_CACHE_BYTES)
    }

    /// Opens (or creates) the store in `dir`, caching at most about `cache_bytes` of its pages.
    pub fn open_cached(dir: &Path, cache_bytes: u64) -> Result<SledStore, Error> {
        // A store closed a moment ago in this process may still hold its file lock while sled's
        // flusher thread winds down: wait for it, briefly, rather than fail the open.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            match sled::Config::new()
                .path(dir)
                .cache_capacity(cache_bytes)
                .mode(sled::Mode::HighThroughput)
                .open()
            {
                Ok(tree) => return Ok(SledStore { tree }),
                // sled reports the lock as ErrorKind::Other with this text.
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl MetaStore for SledStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.tree.get(key)?.map(|v| v.to_vec()))
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Pairs, Error> {
        self.tree
            .scan_prefix(prefix)
            .map(|r| {
                r.map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(Error::from)
            })
            .collect()
    }

    fn apply_batch(&self, batch: Batch) -> Result<(), Error> {
        let mut b = sled::Batch::default();
        for (k, v) in batch {
            match v {
                Some(v) => b.insert(k, v),
                None => b.remove(k),
            }
        }
        Ok(self.tree.apply_batch(b)?)
    }

    fn flush(&self) -> Result<(), Error> {
        self.tree.flush()?;
        Ok(())
    }
}

/// In-memory store for unit tests.
#[derive(Default)]
pub struct MemStore {
    map: Mutex<BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl MetaStore for MemStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        Ok(self
            .map
            .lock()
            .map_err(|_| Error::Store("poisoned".into()))?
            .get(key)
            .cloned())
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Pairs, Error> {
        let map = self
            .map
            .lock()
            .map_err(|_| Error::Store("poisoned".into()))?;
        Ok(map
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn apply_batch(&self, batch: Batch) -> Result<(), Error> {
        let mut map = self
            .map
            .lock()
            .map_err(|_| Error::Store("poisoned".into()))?;
        for (k, v) in batch {
            match v {
                Some(v) => map.insert(k, v),
                None => map.remove(&k),
            };
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), Error> {
        Ok(())
    }
}

/// The namespace writer's view of a store: the durable store underneath plus the edits of the
/// group being made durable. Later requests in a group are validated against it (they see the
/// group's earlier edits), while readers that use the store underneath see an edit only once it is
/// durable in the log and [`Overlay::commit`] has moved the group into the store.
pub struct Overlay<S: MetaStore> {
    base: std::sync::Arc<S>,
    pending: Mutex<PendingEdits>,
}

/// Keys written (`Some`) or deleted (`None`) by edits not yet durable.
type PendingEdits = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

impl<S: MetaStore> Overlay<S> {
    /// An overlay with nothing pending over `base`.
    pub fn new(base: std::sync::Arc<S>) -> Overlay<S> {
        Overlay {
            base,
            pending: Mutex::new(BTreeMap::new()),
        }
    }

    /// The durable store underneath.
    pub fn base(&self) -> &S {
        &self.base
    }

    fn pending(&self) -> Result<std::sync::MutexGuard<'_, PendingEdits>, Error> {
        self.pending
            .lock()
            .map_err(|_| Error::Store("overlay poisoned".into()))
    }

    /// Whether edits are waiting for [`Overlay::commit`].
    pub fn has_pending(&self) -> Result<bool, Error> {
        Ok(!self.pending()?.is_empty())
    }

    /// Drops everything pending (the edits that made it were applied to the store underneath by
    /// other means, or never became durable).
    pub fn discard(&self) -> Result<(), Error> {
        self.pending()?.clear();
        Ok(())
    }

    /// Applies everything pending to the store underneath as one atomic batch (call once the
    /// edits that made it are durable).
    pub fn commit(&self) -> Result<(), Error> {
        let batch: Batch = std::mem::take(&mut *self.pending()?).into_iter().collect();
        if batch.is_empty() {
            return Ok(());
        }
        self.base.apply_batch(batch)
    }
}

impl<S: MetaStore> MetaStore for Overlay<S> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        if let Some(v) = self.pending()?.get(key) {
            return Ok(v.clone());
        }
        self.base.get(key)
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Pairs, Error> {
        let pending = self.pending()?;
        let mut touched = pending
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .peekable();
        if touched.peek().is_none() {
            return self.base.scan_prefix(prefix);
        }
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> =
            self.base.scan_prefix(prefix)?.into_iter().collect();
        for (k, v) in touched {
            match v {
                Some(v) => merged.insert(k.clone(), v.clone()),
                None => merged.remove(k),
            };
        }
        Ok(merged.into_iter().collect())
    }

    fn apply_batch(&self, batch: Batch) -> Result<(), Error> {
        let mut pending = self.pending()?;
        for (k, v) in batch {
            pending.insert(k, v);
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), Error> {
        self.base.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn overlay_shows_pending_edits_to_the_writer_only_until_commit() {
        let base = Arc::new(MemStore::default());
        base.apply_batch(vec![
            (b"a1".to_vec(), Some(b"x".to_vec())),
            (b"a2".to_vec(), Some(b"y".to_vec())),
        ])
        .unwrap();
        let o = Overlay::new(base.clone());
        o.apply_batch(vec![
            (b"a1".to_vec(), None),
            (b"a3".to_vec(), Some(b"z".to_vec())),
            (b"b1".to_vec(), Some(b"w".to_vec())),
        ])
        .unwrap();
        assert_eq!(o.get(b"a1").unwrap(), None);
        assert_eq!(o.get(b"a2").unwrap(), Some(b"y".to_vec()));
        assert_eq!(
            o.scan_prefix(b"a").unwrap(),
            vec![
                (b"a2".to_vec(), b"y".to_vec()),
                (b"a3".to_vec(), b"z".to_vec())
            ]
        );
        // The store underneath has none of it yet.
        assert_eq!(base.get(b"a1").unwrap(), Some(b"x".to_vec()));
        assert_eq!(base.get(b"a3").unwrap(), None);
        assert!(o.has_pending().unwrap());
        o.commit().unwrap();
        assert!(!o.has_pending().unwrap());
        assert_eq!(base.scan_prefix(b"").unwrap(), o.scan_prefix(b"").unwrap());
        assert_eq!(base.get(b"a1").unwrap(), None);
    }
}
