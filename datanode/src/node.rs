//! The node context that every part of the datanode shares: its store, connections, the reports
//! waiting for the next heartbeat, task slots and metrics. It depends on nothing else in the
//! crate's request paths, so `server`, `pipeline`, `heartbeat`, `task` and `scanner` all build on it
//! without depending on one another in a circle.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use lode_plugin_host::{Host, PluginInfo};
use lode_protocol::messages::ReportedBlock;
use lode_protocol::net::{Identity, Pool, Role};
use lode_protocol::token::{self, BlockToken, Grant, KeyRing, Receipt, TokenKey};
use lode_protocol::{paging, Blake3Cv, BlockId};
use tokio::sync::{Notify, Semaphore};

use crate::error::Error;
use crate::store::BlockStore;

/// What every part of the datanode shares.
pub struct Node {
    /// This datanode's name.
    pub name: String,
    /// Blocks on disk.
    pub store: Arc<BlockStore>,
    /// Connections to other datanodes and the namenode.
    pub pool: Pool,
    /// Replicas finalized or deleted, for the next heartbeat.
    pub reports: Arc<Reports>,
    /// The namenodes' addresses (one, or every member of a group).
    pub namenodes: Vec<String>,
    /// The highest namenode group term seen in a reply: commands of an older term are refused.
    pub term: std::sync::atomic::AtomicU64,
    /// Scan task runner.
    pub tasks: Tasks,
    /// The plugin sandbox protections tasks get here (probed once at start).
    pub sandbox: Vec<String>,
    /// Required protections missing here (not waived): while any is, no plugin runs.
    pub sandbox_missing: Vec<String>,
    /// Counters for `/metrics`.
    pub metrics: Arc<crate::http::Metrics>,
    /// The metrics address, reported to the namenode.
    pub http_addr: Option<String>,
    /// How long a write or read stream may move no data before it is ended.
    pub stream_idle: std::time::Duration,
    /// The namenode's block token keys, learned from its replies.
    pub keys: Mutex<KeyRing>,
    /// Woken whenever keys are learned.
    pub keys_learned: Notify,
    /// When a token with an unknown key last asked for an early heartbeat (ms since the epoch).
    pub key_wake_ms: std::sync::atomic::AtomicU64,
}

/// How long a request whose token names a key not yet learned waits for it (a restarted
/// namenode's first keys reach a datanode with its next heartbeat reply).
const KEY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// Tokens with unknown keys ask for an early heartbeat at most this often.
const KEY_WAKE_EVERY_MS: u64 = 500;

/// Milliseconds since the epoch (token expiry is wall-clock time).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Node {
    /// Takes the keys a namenode reply carried.
    pub fn learn_keys(&self, keys: &[TokenKey]) {
        if let Ok(mut ring) = self.keys.lock() {
            ring.learn(keys, now_ms());
        }
        self.keys_learned.notify_waiters();
    }

    /// This datanode's signed receipt for a replica it just finalized (None before it holds a key).
    pub fn receipt(&self, block: BlockId, len: u64, cv: Blake3Cv) -> Option<Receipt> {
        let ring = self.keys.lock().ok()?;
        ring.receipt(&self.name, block, len, cv, now_ms())
    }

    /// [`Node::authorise`], but a token signed with a key this datanode has not learned yet waits
    /// (up to [`KEY_WAIT`]) for the next heartbeat reply, which it asks for at once: a namenode
    /// that restarted signs with keys made after the datanodes last heard from it.
    pub async fn authorise_waiting(
        &self,
        peer: &Identity,
        token: Option<&BlockToken>,
        block: BlockId,
        ops: u8,
    ) -> Result<Grant, Error> {
        let deadline = tokio::time::Instant::now() + KEY_WAIT;
        loop {
            let learned = self.keys_learned.notified();
            tokio::pin!(learned);
            learned.as_mut().enable();
            match self.authorise(peer, token, block, ops) {
                Err(Error::Token(token::TokenError::UnknownKey)) => {
                    let now = now_ms();
                    let last = self.key_wake_ms.load(std::sync::atomic::Ordering::Relaxed);
                    if now.saturating_sub(last) >= KEY_WAKE_EVERY_MS {
                        self.key_wake_ms
                            .store(now, std::sync::atomic::Ordering::Relaxed);
                        self.reports.wake();
                    }
                    if tokio::time::timeout_at(deadline, learned).await.is_err() {
                        return self.authorise(peer, token, block, ops);
                    }
                }
                other => return other,
            }
        }
    }

    /// Checks a request's token for `block` and one of `ops`, presented by `peer`: a user must
    /// hold a token issued to it; a datanode passes on a user's or the namenode's (a pipeline's next
    /// hop, a copy, a task reading a following block). Returns what the token grants.
    pub fn authorise(
        &self,
        peer: &Identity,
        token: Option<&BlockToken>,
        block: BlockId,
        ops: u8,
    ) -> Result<Grant, Error> {
        let ring = self
            .keys
            .lock()
            .map_err(|_| Error::Invalid("key ring lock poisoned".into()))?;
        let grant = ring
            .verify(token, block, ops, now_ms())
            .map_err(Error::Token)?;
        token::check_user(grant, &peer.name, peer.role == Role::Datanode).map_err(Error::Token)?;
        Ok(grant.clone())
    }
}

/// Runs `f` on a blocking thread (disk work, plugin children).
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Invalid(format!("blocking task failed: {e}")))?
}

/// Replica changes waiting for the next heartbeat to each namenode: (received, deleted). They are
/// kept as the net change per block id, because the namenode applies a heartbeat's deletions
/// before its receptions: a replica received and then deleted before the heartbeat is only
/// deleted, and one deleted and then received again is only received (with its newest length and
/// value). Each namenode (every member of a group) has its own queue.
pub struct Reports {
    queues: Vec<(Mutex<Pending>, Notify)>,
}

impl Default for Reports {
    fn default() -> Reports {
        Reports::new(1)
    }
}

/// (received, deleted) waiting for the next heartbeat.
pub type Pending = (Vec<ReportedBlock>, Vec<BlockId>);

fn note_received(p: &mut Pending, block: ReportedBlock) {
    p.0.retain(|b| b.id != block.id);
    p.1.retain(|b| *b != block.id);
    p.0.push(block);
}

fn note_deleted(p: &mut Pending, block: BlockId) {
    p.0.retain(|b| b.id != block);
    if !p.1.contains(&block) {
        p.1.push(block);
    }
}

impl Reports {
    /// Queues for `namenodes` namenodes (at least one).
    pub fn new(namenodes: usize) -> Reports {
        Reports {
            queues: (0..namenodes.max(1))
                .map(|_| (Mutex::new(Pending::default()), Notify::new()))
                .collect(),
        }
    }

    /// A replica was finalized; the namenodes hear of it promptly.
    pub fn received(&self, block: ReportedBlock) {
        for i in 0..self.queues.len() {
            note_received(&mut self.lock(i), block);
            self.queues[i].1.notify_one();
        }
    }

    /// A replica was deleted (or is not here, answering a delete).
    pub fn deleted(&self, block: BlockId) {
        for i in 0..self.queues.len() {
            note_deleted(&mut self.lock(i), block);
        }
    }

    /// Asks for a heartbeat to every namenode now (the node ran out of space, say).
    pub fn wake(&self) {
        for q in &self.queues {
            q.1.notify_one();
        }
    }

    fn queue(&self, i: usize) -> &(Mutex<Pending>, Notify) {
        &self.queues[i.min(self.queues.len() - 1)]
    }

    /// Woken when namenode `i` should hear from this node.
    pub async fn notified(&self, i: usize) {
        self.queue(i).1.notified().await
    }

    fn lock(&self, i: usize) -> std::sync::MutexGuard<'_, Pending> {
        self.queue(i).0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Everything pending for namenode `i` (a full report covers it).
    pub fn take(&self, i: usize) -> Pending {
        std::mem::take(&mut *self.lock(i))
    }

    /// At most a page of each list for one heartbeat to namenode `i`; what is left wakes the
    /// next one at once.
    pub fn take_page(&self, i: usize) -> Pending {
        let mut p = self.lock(i);
        let received = paging::take_page(&mut p.0, paging::PAGE_BYTES);
        let deleted = paging::take_page(&mut p.1, paging::PAGE_BYTES);
        if !p.0.is_empty() || !p.1.is_empty() {
            self.queue(i).1.notify_one();
        }
        (received, deleted)
    }

    /// Puts back what a failed heartbeat to namenode `i` carried, under the changes noted since
    /// (which are newer).
    pub fn put_back(&self, i: usize, taken: Pending) {
        let mut p = self.lock(i);
        let newer = std::mem::replace(&mut *p, taken);
        // Deletions and receptions of one id never both survive in `newer`, so their order
        // between the two lists does not matter.
        for b in newer.1 {
            note_deleted(&mut p, b);
        }
        for b in newer.0 {
            note_received(&mut p, b);
        }
    }
}

/// Task slots, the plugin host and the plugin cache.
pub struct Tasks {
    pub(crate) host: Host,
    pub(crate) slots: Semaphore,
    pub(crate) cache_dir: PathBuf,
    pub(crate) infos: Mutex<HashMap<Blake3Cv, PluginInfo>>,
    /// Held while a library is fetched, so concurrent tasks wait for one download.
    pub(crate) fetching: tokio::sync::Mutex<()>,
}

impl Tasks {
    /// Sets up the runner: `slots` tasks at once, libraries cached in `cache_dir`.
    pub fn new(host: Host, slots: usize, cache_dir: PathBuf) -> Result<Tasks, Error> {
        std::fs::create_dir_all(&cache_dir).map_err(|e| Error::disk(&cache_dir, e))?;
        Ok(Tasks {
            host,
            slots: Semaphore::new(slots),
            cache_dir,
            infos: Mutex::new(HashMap::new()),
            fetching: tokio::sync::Mutex::new(()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lode_protocol::Blake3Cv;

    fn rb(id: u64, v: u8) -> ReportedBlock {
        ReportedBlock {
            id: BlockId(id),
            len: 10,
            cv: Blake3Cv([v; 32]),
        }
    }

    #[test]
    fn reports_carry_the_net_change_per_replica() {
        let r = Reports::default();
        r.received(rb(1, 1));
        r.deleted(BlockId(1));
        r.deleted(BlockId(2));
        r.received(rb(2, 2));
        r.received(rb(3, 3));
        r.received(rb(3, 4));
        let (received, deleted) = r.take(0);
        // 1 was received then deleted: only deleted; 2 deleted then received again: only received.
        assert_eq!(received, vec![rb(2, 2), rb(3, 4)]);
        assert_eq!(deleted, vec![BlockId(1)]);
        // A failed heartbeat's changes go back under the newer ones.
        r.deleted(BlockId(3));
        r.received(rb(1, 5));
        r.put_back(0, (received, deleted));
        let (received, deleted) = r.take(0);
        assert_eq!(received, vec![rb(2, 2), rb(1, 5)]);
        assert_eq!(deleted, vec![BlockId(3)]);
    }
}
