//! Plugins and scans from the client's side. `add_plugin` checks a library in the local sandbox,
//! stores it in Lode under its BLAKE3 hash and registers it. `scan` is the coordinator: one task per
//! block, each placed on a live replica holder with a free slot, failed tasks retried on another
//! replica, partial results combined and rendered by the plugin (in the local sandbox). No job
//! state lives on any server.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Instant;

use lode_plugin_host::{Host, Limits, RunSpec};
use lode_protocol::frame::kind;
use lode_protocol::messages::{
    ClientToNamenode, DatanodeReply, DatanodeRequest, EntryKind, FileStatus, NamenodeReply,
    PluginRecord, TaskRequest, TaskResult,
};
use lode_protocol::net::{self, RpcError};
use lode_protocol::{Blake3Cv, ErrorCode};
use tokio::task::JoinSet;

use crate::error::Error;
use crate::fs::{unexpected, Client};
use crate::put::PutOptions;

/// Where plugin libraries are stored in Lode.
pub use lode_protocol::path::PLUGIN_DIR;
/// Tasks this client keeps running on one datanode at once.
pub const TASKS_PER_DATANODE: usize = 2;
/// Attempts per task (each on a different replica).
const TASK_ATTEMPTS: usize = 3;

/// What a scan measured.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanStats {
    /// Bytes in the scanned files.
    pub input_bytes: u64,
    /// Tasks run (one per block).
    pub tasks: u64,
    /// Tasks that ran on a datanode holding their block.
    pub local_tasks: u64,
    /// Bytes tasks read from their datanode's own disk.
    pub bytes_read_local: u64,
    /// Bytes that crossed the network: partial results and data fetched between datanodes.
    pub bytes_over_network: u64,
    /// Tasks run again after a failure.
    pub retried_tasks: u64,
    /// Wall time of the scan.
    pub elapsed_ms: u64,
}

/// A finished scan.
#[derive(Clone, Debug)]
pub struct ScanOutcome {
    /// The plugin that ran.
    pub plugin: PluginRecord,
    /// The combined partial result.
    pub combined: Vec<u8>,
    /// The result rendered for humans (the combined partial when the plugin has no render).
    pub rendered: Vec<u8>,
    /// Measurements.
    pub stats: ScanStats,
}

/// The user's private plugin cache: `$XDG_CACHE_HOME/lode/plugins` or `~/.cache/lode/plugins`,
/// created 0700; a cache dir that another user owns or can write is refused.
fn plugin_cache_dir() -> Result<PathBuf, Error> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .ok_or_else(|| Error::Invalid("no HOME for the plugin cache".into()))?;
    let dir = base.join("lode").join("plugins");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| Error::local(&dir, e))?;
    let meta = std::fs::metadata(&dir).map_err(|e| Error::local(&dir, e))?;
    // SAFETY: getuid has no arguments.
    let me = unsafe { libc::getuid() };
    if meta.uid() != me || meta.permissions().mode() & 0o022 != 0 {
        return Err(Error::Invalid(format!(
            "{}: the plugin cache must be yours and writable by you alone",
            dir.display()
        )));
    }
    Ok(dir)
}

impl Client {
    fn plugin_host(&self) -> Result<Host, Error> {
        Host::beside_current_exe(Limits::default()).map_err(|e| Error::Invalid(e.to_string()))
    }

    /// Checks a local library in the sandbox, stores it in Lode under its hash and registers it.
    pub async fn add_plugin(
        &self,
        file: &Path,
        name: Option<String>,
    ) -> Result<PluginRecord, Error> {
        let size = tokio::fs::metadata(file)
            .await
            .map_err(|e| Error::local(file, e))?
            .len();
        if size > lode_protocol::PLUGIN_BYTES_MAX {
            return Err(Error::Invalid(format!(
                "{}: a plugin library may be at most {} bytes, this one is {size}",
                file.display(),
                lode_protocol::PLUGIN_BYTES_MAX
            )));
        }
        let bytes = tokio::fs::read(file)
            .await
            .map_err(|e| Error::local(file, e))?;
        let hash = Blake3Cv(*blake3::hash(&bytes).as_bytes());
        let host = self.plugin_host()?;
        let path = file.to_path_buf();
        let info = tokio::task::spawn_blocking(move || host.inspect(&path))
            .await
            .map_err(|e| Error::Invalid(format!("inspect failed: {e}")))?
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let remote = format!("{PLUGIN_DIR}/{}", hash.to_hex());
        self.mkdir(PLUGIN_DIR, true).await?;
        let stored_before = self.try_stat(&remote).await?.is_some();
        if !stored_before {
            let opts = PutOptions::default();
            match self
                .put(std::io::Cursor::new(bytes), &remote, &opts, &|_| {})
                .await
            {
                Ok(_) => {}
                // Someone stored a file under the same name at the same moment.
                Err(e) if e.code() == Some(ErrorCode::AlreadyExists) => {}
                Err(e) => return Err(e),
            }
        }
        // A file stored under the library's name by someone else must be the library itself.
        if self.checksum(&remote).await? != hash {
            return Err(Error::Invalid(format!(
                "{remote} holds other bytes than {} (hash {hash}); an admin must remove it",
                file.display()
            )));
        }
        let add = ClientToNamenode::AddPlugin {
            hash,
            name: name.unwrap_or(info.name),
            path: remote,
        };
        match self.nn(&add).await? {
            NamenodeReply::Plugin(p) => Ok(p),
            other => Err(unexpected(other)),
        }
    }

    /// Every registered plugin.
    pub async fn list_plugins(&self) -> Result<Vec<PluginRecord>, Error> {
        match self.nn(&ClientToNamenode::ListPlugins).await? {
            NamenodeReply::Plugins(p) => Ok(p),
            other => Err(unexpected(other)),
        }
    }

    /// Approves a plugin (admin certificates only).
    pub async fn approve_plugin(&self, hash_hex: &str) -> Result<PluginRecord, Error> {
        let hash = parse_hash(hash_hex)?;
        match self.nn(&ClientToNamenode::ApprovePlugin { hash }).await? {
            NamenodeReply::Plugin(p) => Ok(p),
            other => Err(unexpected(other)),
        }
    }

    /// A plugin by local path (added if new), name or hash, with a local copy of its library.
    async fn resolve_plugin(&self, spec: &str) -> Result<(PluginRecord, PathBuf), Error> {
        let local = Path::new(spec);
        if local.is_file() {
            let record = self.add_plugin(local, None).await?;
            return Ok((record, local.to_path_buf()));
        }
        let record = match self
            .nn(&ClientToNamenode::FindPlugin {
                key: spec.to_string(),
            })
            .await?
        {
            NamenodeReply::Plugin(p) => p,
            other => return Err(unexpected(other)),
        };
        let cache = plugin_cache_dir()?.join(format!("{}.so", record.hash.to_hex()));
        // Trust a cached copy only if it still has the plugin's hash (and the host checks the
        // bytes it loads again).
        let cached_ok = tokio::fs::read(&cache)
            .await
            .is_ok_and(|b| blake3::hash(&b).as_bytes() == &record.hash.0);
        if !cached_ok {
            let mut bytes = Vec::new();
            self.get(&record.path, &mut bytes, &|_| {}).await?;
            if blake3::hash(&bytes).as_bytes() != &record.hash.0 {
                return Err(Error::Corrupt(format!(
                    "plugin {}: stored library does not match its hash",
                    record.name
                )));
            }
            let tmp = cache.with_extension(format!("{}.tmp", rand::random::<u32>()));
            tokio::fs::write(&tmp, &bytes)
                .await
                .map_err(|e| Error::local(&tmp, e))?;
            tokio::fs::rename(&tmp, &cache)
                .await
                .map_err(|e| Error::local(&cache, e))?;
        }
        Ok((record, cache))
    }

    /// Files under the given paths (a directory means every file under it), with their blocks.
    async fn scan_inputs(&self, paths: &[String]) -> Result<Vec<FileStatus>, Error> {
        let mut files = vec![];
        let mut pending: Vec<String> = paths.to_vec();
        while let Some(p) = pending.pop() {
            let st = self.stat(&p, true).await?;
            match st.kind {
                EntryKind::File if st.complete => files.push(st),
                EntryKind::File => {
                    return Err(Error::Invalid(format!(
                        "{}: is still being written",
                        st.path
                    )))
                }
                EntryKind::Directory => {
                    for e in self.list(&st.path).await? {
                        pending.push(e.path);
                    }
                }
            }
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(files)
    }

    /// Runs a scan: `plugin` is a local library path, a registered name or a hash; `args` become
    /// the plugin's JSON arguments. `progress` is told (tasks done, tasks).
    pub async fn scan(
        &self,
        plugin: &str,
        args: &[(String, String)],
        paths: &[String],
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<ScanOutcome, Error> {
        let started = Instant::now();
        let (record, local_lib) = self.resolve_plugin(plugin).await?;
        if !record.approved {
            return Err(Error::Invalid(format!(
                "plugin {} ({}) is not approved; an admin can approve it with `lode plugin approve {}`",
                record.name, record.hash, record.hash
            )));
        }
        let mut obj = serde_json::Map::new();
        for (k, v) in args {
            obj.insert(k.clone(), serde_json::Value::String(v.clone()));
        }
        let args_json = serde_json::Value::Object(obj).to_string();
        let files = self.scan_inputs(paths).await?;
        let mut stats = ScanStats {
            input_bytes: files.iter().map(|f| f.size).sum(),
            ..Default::default()
        };
        let mut tasks = vec![];
        for f in &files {
            for (i, b) in f.blocks.iter().enumerate() {
                let mut following = vec![];
                let mut budget = 0;
                for n in &f.blocks[i + 1..] {
                    if budget >= lode_protocol::TASK_FOLLOWING_BYTES_MAX {
                        break;
                    }
                    budget += n.len;
                    following.push(n.clone());
                }
                tasks.push(TaskRequest {
                    plugin: record.hash,
                    plugin_path: record.path.clone(),
                    args_json: args_json.clone(),
                    path: f.path.clone(),
                    block: b.clone(),
                    start: 0,
                    end: b.len,
                    following,
                });
            }
        }
        stats.tasks = tasks.len() as u64;
        let host = self.plugin_host()?;
        // What runs here is what has the plugin's hash, read once for the child.
        host.pin(&local_lib, record.hash.0);
        let partials = if tasks.is_empty() {
            vec![empty_partial(&host, &local_lib, &args_json).await?]
        } else {
            self.run_tasks(tasks, &mut stats, progress).await?
        };
        let (combined, rendered) = tokio::task::spawn_blocking(move || {
            let combined = host.combine(&local_lib, partials)?;
            let rendered = host.render(&local_lib, combined.clone())?;
            Ok::<_, lode_plugin_host::Error>((combined, rendered))
        })
        .await
        .map_err(|e| Error::Invalid(format!("combine failed: {e}")))?
        .map_err(|e| Error::Invalid(e.to_string()))?;
        stats.elapsed_ms = started.elapsed().as_millis() as u64;
        Ok(ScanOutcome {
            plugin: record,
            combined,
            rendered,
            stats,
        })
    }

    async fn run_tasks(
        &self,
        tasks: Vec<TaskRequest>,
        stats: &mut ScanStats,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<Vec<Vec<u8>>, Error> {
        let total = tasks.len();
        let mut results: Vec<Option<Vec<u8>>> = vec![None; total];
        let mut tried: Vec<HashSet<String>> = vec![HashSet::new(); total];
        let mut queue: VecDeque<usize> = (0..total).collect();
        let mut busy: HashMap<String, usize> = HashMap::new();
        let mut running: JoinSet<(usize, String, Result<TaskResult, Error>)> = JoinSet::new();
        let mut done = 0u64;
        loop {
            // Place every queued task that has a replica holder with a free slot.
            let mut waiting = VecDeque::new();
            while let Some(i) = queue.pop_front() {
                let t = &tasks[i];
                let candidates: Vec<&lode_protocol::messages::Target> = t
                    .block
                    .locations
                    .iter()
                    .filter(|l| !tried[i].contains(&l.name))
                    .collect();
                if candidates.is_empty() {
                    return Err(Error::Invalid(format!(
                        "block {} of {}: no live replica left to run the task on",
                        t.block.id, t.path
                    )));
                }
                let best = candidates
                    .iter()
                    .filter(|l| busy.get(&l.name).copied().unwrap_or(0) < TASKS_PER_DATANODE)
                    .min_by_key(|l| {
                        (
                            self.suspects.contains(&l.name),
                            busy.get(&l.name).copied().unwrap_or(0),
                        )
                    });
                let Some(target) = best else {
                    waiting.push_back(i);
                    continue;
                };
                *busy.entry(target.name.clone()).or_default() += 1;
                tried[i].insert(target.name.clone());
                let (pool, req, target) = (self.pool.clone(), t.clone(), (*target).clone());
                running.spawn(async move {
                    let r = run_one(&pool, &target, req).await;
                    (i, target.name, r)
                });
            }
            queue = waiting;
            let Some(joined) = running.join_next().await else {
                break;
            };
            let (i, node, result) =
                joined.map_err(|e| Error::Invalid(format!("task failed: {e}")))?;
            if let Some(n) = busy.get_mut(&node) {
                *n = n.saturating_sub(1);
            }
            match result {
                Ok(r) => {
                    stats.local_tasks += 1;
                    stats.bytes_read_local += r.bytes_read_local;
                    stats.bytes_over_network += r.partial.len() as u64 + r.bytes_fetched_remote;
                    results[i] = Some(r.partial);
                    done += 1;
                    progress(done, total as u64);
                }
                Err(e) if retryable(&e) && tried[i].len() < TASK_ATTEMPTS => {
                    tracing::warn!(datanode = %node, "task failed, retrying on another replica: {e}");
                    self.mark_suspect(&node, true);
                    stats.retried_tasks += 1;
                    queue.push_back(i);
                }
                Err(e) => return Err(e),
            }
        }
        results
            .into_iter()
            .enumerate()
            .map(|(i, r)| r.ok_or_else(|| Error::Invalid(format!("task {i} did not run"))))
            .collect()
    }
}

/// Failures worth another replica: the datanode or its copy, not the plugin or its approval.
fn retryable(e: &Error) -> bool {
    !matches!(
        e.code(),
        Some(ErrorCode::PluginFailed | ErrorCode::PermissionDenied | ErrorCode::InvalidArgument)
    )
}

async fn run_one(
    pool: &net::Pool,
    target: &lode_protocol::messages::Target,
    req: TaskRequest,
) -> Result<TaskResult, Error> {
    let ctx = || format!("task on {}", target.name);
    let conn = pool
        .get(&target.addr, &target.name)
        .await
        .map_err(|e| Error::rpc(ctx(), e))?;
    let reply = net::call::<_, DatanodeReply>(
        &conn,
        kind::DATANODE_REQUEST,
        kind::DATANODE_REPLY,
        &DatanodeRequest::RunTask(Box::new(req)),
    )
    .await;
    match reply {
        Ok(DatanodeReply::TaskDone(r)) => Ok(r),
        Ok(other) => Err(unexpected(other)),
        Err(RpcError::Remote(w)) => Err(Error::Remote(w)),
        Err(e) => {
            pool.forget(&target.addr, &target.name).await;
            Err(Error::rpc(ctx(), e))
        }
    }
}

/// The plugin's partial result over no input (a scan of empty files only).
async fn empty_partial(host: &Host, lib: &Path, args_json: &str) -> Result<Vec<u8>, Error> {
    let empty = tempfile_empty()?;
    let spec = RunSpec {
        args_json: args_json.as_bytes().to_vec(),
        block_file_offset: 0,
        block_len: 0,
        start: 0,
        end: 0,
        pieces: vec![],
        continuation: vec![],
    };
    let (host, lib) = (host.clone(), lib.to_path_buf());
    let out = tokio::task::spawn_blocking(move || host.run(&lib, &empty, spec))
        .await
        .map_err(|e| Error::Invalid(format!("task failed: {e}")))?
        .map_err(|e| Error::Invalid(e.to_string()))?;
    Ok(out.partial)
}

fn tempfile_empty() -> Result<std::fs::File, Error> {
    let path = std::env::temp_dir().join(format!("lode-empty-{}", rand::random::<u64>()));
    let f = std::fs::File::create(&path).map_err(|e| Error::local(&path, e))?;
    let _ = std::fs::remove_file(&path);
    Ok(f)
}

fn parse_hash(hex: &str) -> Result<Blake3Cv, Error> {
    let bad = || Error::Invalid(format!("{hex:?} is not a plugin hash (64 hex digits)"));
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).map_err(|_| bad())?;
        out[i] = u8::from_str_radix(s, 16).map_err(|_| bad())?;
    }
    Ok(Blake3Cv(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_parse() {
        let h = Blake3Cv([0xab; 32]);
        assert_eq!(parse_hash(&h.to_hex()).unwrap(), h);
        assert!(parse_hash("xyz").is_err());
        assert!(parse_hash(&"g".repeat(64)).is_err());
    }

    #[test]
    fn plugin_failures_are_not_retried() {
        let w = |code| Error::Remote(lode_protocol::WireError::new(code, "x"));
        assert!(!retryable(&w(ErrorCode::PluginFailed)));
        assert!(retryable(&w(ErrorCode::Corrupt)));
        assert!(retryable(&w(ErrorCode::NotFound)));
    }
}
