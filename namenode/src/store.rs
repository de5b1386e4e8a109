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

/// sled, pinned at 0.34.7.
pub struct SledStore {
    tree: sled::Db,
}

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<SledStore, Error> {
        let tree = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        Ok(SledStore { tree })
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
