//! Scan tasks: run an approved plugin over a split of a local replica, in the sandboxed plugin host.
//! The block file itself is handed to the child (no copy through this process); the child checks
//! every piece against the sidecar before the plugin sees it. On a cache miss the plugin library is
//! read from Lode, checked against its BLAKE3 hash (its identity) and cached, so the next task needs
//! no download. In line mode, a split that ends at its block's end reads on into the following
//! blocks, locally or from another datanode, up to the end of its last record.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lode_plugin_host::{PluginInfo, RunSpec};
use lode_protocol::checksum::PIECE_BYTES;
use lode_protocol::frame::kind;
use lode_protocol::messages::{
    ClientToNamenode, LocatedBlock, NamenodeReply, PluginRecord, TaskRequest, TaskResult,
};
use lode_protocol::net::{self, Identity, RangeRead, NAMENODE_SERVER_NAME};
use lode_protocol::token;
use lode_protocol::{Blake3Cv, BlockId, PLUGIN_BYTES_MAX, TASK_FOLLOWING_BYTES_MAX};

use crate::error::Error;
use crate::node::{blocking, Node, Tasks};

/// Bytes read per step while finishing a record in the following blocks (one piece: records are
/// usually short, so the first step nearly always finds the newline).
const CONTINUATION_STEP_BYTES: u64 = PIECE_BYTES;
/// A remote read that makes no progress for this long fails over.
const STALL: Duration = Duration::from_secs(10);

/// Runs one task for `peer`: its block and every following block it names must come with read
/// tokens (a scan runs as the user, over what the user may read).
pub async fn run(shared: &Node, peer: &Identity, req: TaskRequest) -> Result<TaskResult, Error> {
    let started = Instant::now();
    shared
        .authorise_waiting(peer, req.block.token.as_ref(), req.block.id, token::READ)
        .await?;
    // Signed with the same keys as the first: no waiting for each.
    for b in &req.following {
        shared.authorise(peer, b.token.as_ref(), b.id, token::READ)?;
    }
    if !shared.sandbox_missing.is_empty() {
        return Err(Error::Plugin(format!(
            "datanode {} runs no plugins: its kernel lacks the sandbox protection(s) {} \
             (an operator may waive one with plugin_sandbox_optional)",
            shared.name,
            shared.sandbox_missing.join(", ")
        )));
    }
    let tasks = &shared.tasks;
    let _slot = tasks
        .slots
        .acquire()
        .await
        .map_err(|_| Error::Invalid("shutting down".into()))?;
    let record = find_plugin(shared, &req.plugin).await?;
    if !record.approved {
        return Err(Error::NotApproved(format!(
            "plugin {} ({}) is not approved; an admin can approve it with `lode plugin approve {}`",
            record.name, record.hash, record.hash
        )));
    }
    let mut remote = 0u64;
    let lib = cached_library(shared, &record, &mut remote).await?;
    let info = inspect(tasks, &record, &lib).await?;

    let store = shared.store.clone();
    let id = req.block.id;
    let (file, sidecar) = blocking(move || store.open_block(id).map(|r| r.into_parts())).await?;
    if req.start > req.end || req.end > sidecar.len {
        return Err(Error::Invalid(format!(
            "split {}..{} is outside block {id} of {} bytes",
            req.start, req.end, sidecar.len
        )));
    }
    let mut local = req.end - req.start;
    let continuation = if info.input_mode == 1 && req.end == sidecar.len {
        continuation(shared, &req.following, &mut local, &mut remote).await?
    } else {
        vec![]
    };
    let spec = RunSpec {
        args_json: with_path(&req.args_json, &req.path),
        block_file_offset: req.block.offset,
        block_len: sidecar.len,
        start: req.start,
        end: req.end,
        pieces: sidecar.pieces.iter().map(|p| p.0).collect(),
        continuation,
    };
    let host = tasks.host.clone();
    let lib_path = lib.clone();
    let out = blocking(move || Ok(host.run(&lib_path, &file, spec))).await?;
    let out = out.map_err(|e| describe(e, &lib, &record, Some(id)))?;
    Ok(TaskResult {
        partial: out.partial,
        bytes_read_local: local,
        bytes_fetched_remote: remote,
        elapsed_ms: started.elapsed().as_millis() as u64,
    })
}

/// Turns a host error into one naming the plugin by its registered name.
/// A replica failing its checksum while a task reads it is a corrupt replica (the client retries
/// another one and reports it), not a plugin failure.
fn describe(
    e: lode_plugin_host::Error,
    lib: &Path,
    record: &PluginRecord,
    block: Option<BlockId>,
) -> Error {
    match (e, block) {
        (lode_plugin_host::Error::Corrupt { .. }, Some(id)) => Error::Corrupt {
            id,
            offset: 0,
            stage: "plugin read",
        },
        (e, _) => {
            let named = format!("{} ({})", record.name, &record.hash.to_hex()[..12]);
            Error::Plugin(e.to_string().replace(&lib.display().to_string(), &named))
        }
    }
}

fn with_path(args: &str, path: &str) -> Vec<u8> {
    let body = args.trim_end();
    let body = body.strip_suffix('}').unwrap_or(body).trim_end();
    let sep = if body.trim_start() == "{" { "" } else { "," };
    let escaped: String = path
        .chars()
        .flat_map(|c| match c {
            '"' => vec!['\\', '"'],
            '\\' => vec!['\\', '\\'],
            c => vec![c],
        })
        .collect();
    format!("{body}{sep}\"_path\":\"{escaped}\"}}").into_bytes()
}

/// A lookup at the namenode; in a group, each member in turn until one serves it (the others
/// are not the leader, or cannot be reached).
async fn namenode_call(shared: &Node, req: &ClientToNamenode) -> Result<NamenodeReply, Error> {
    let mut last = None;
    for namenode in &shared.namenodes {
        let tried = async {
            let conn = shared.pool.get(namenode, NAMENODE_SERVER_NAME).await?;
            net::call(&conn, kind::CLIENT_TO_NAMENODE, kind::NAMENODE_REPLY, req).await
        };
        match tried.await {
            Ok(r) => return Ok(r),
            Err(e) => last = Some(e),
        }
    }
    Err(last
        .map(Error::from)
        .unwrap_or_else(|| Error::Invalid("no namenode configured".into())))
}

async fn find_plugin(shared: &Node, hash: &Blake3Cv) -> Result<PluginRecord, Error> {
    match namenode_call(shared, &ClientToNamenode::FindPlugin { key: hash.to_hex() }).await {
        Ok(NamenodeReply::Plugin(p)) if p.hash == *hash => Ok(p),
        Ok(_) => Err(Error::NotApproved(format!(
            "plugin {hash} is not registered"
        ))),
        Err(Error::Rpc(net::RpcError::Remote(w))) => {
            Err(Error::NotApproved(format!("plugin {hash}: {}", w.message)))
        }
        Err(e) => Err(e),
    }
}

/// The plugin library in the local cache, fetched from Lode and hash-checked on a miss.
async fn cached_library(
    shared: &Node,
    record: &PluginRecord,
    remote: &mut u64,
) -> Result<PathBuf, Error> {
    let path = shared
        .tasks
        .cache_dir
        .join(format!("{}.so", record.hash.to_hex()));
    // Whatever is in the cache runs only if its bytes, read once for the child, have the hash.
    shared.tasks.host.pin(&path, record.hash.0);
    if path.exists() {
        return Ok(path);
    }
    let _one_download = shared.tasks.fetching.lock().await;
    if path.exists() {
        return Ok(path);
    }
    let status = match namenode_call(
        shared,
        &ClientToNamenode::Stat {
            path: record.path.clone(),
            blocks: true,
        },
    )
    .await?
    {
        NamenodeReply::Status(s) => s,
        other => return Err(Error::Invalid(format!("unexpected reply {other:?}"))),
    };
    let listed: u64 = status
        .blocks
        .iter()
        .map(|b| b.len)
        .fold(0, u64::saturating_add);
    if status.size > PLUGIN_BYTES_MAX || listed > PLUGIN_BYTES_MAX {
        return Err(Error::Plugin(format!(
            "plugin {}: the library stored at {} is larger than {PLUGIN_BYTES_MAX} bytes",
            record.name, record.path
        )));
    }
    let mut bytes = Vec::with_capacity(listed as usize);
    for b in &status.blocks {
        bytes.extend(read_remote(shared, b, 0, b.len).await?);
    }
    if blake3::hash(&bytes).as_bytes() != &record.hash.0 {
        return Err(Error::Plugin(format!(
            "plugin {}: the library stored at {} does not match its hash {}",
            record.name, record.path, record.hash
        )));
    }
    *remote += bytes.len() as u64;
    let dir = shared.tasks.cache_dir.clone();
    let final_path = path.clone();
    blocking(move || {
        let tmp = dir.join(format!(".{}.tmp", rand::random::<u64>()));
        std::fs::write(&tmp, &bytes).map_err(|e| Error::disk(&tmp, e))?;
        std::fs::rename(&tmp, &final_path).map_err(|e| Error::disk(&final_path, e))
    })
    .await?;
    tracing::info!(plugin = %record.name, hash = %record.hash, "plugin fetched from Lode and cached");
    Ok(path)
}

async fn inspect(tasks: &Tasks, record: &PluginRecord, lib: &Path) -> Result<PluginInfo, Error> {
    if let Some(i) = tasks
        .infos
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&record.hash)
    {
        return Ok(i.clone());
    }
    let host = tasks.host.clone();
    let path = lib.to_path_buf();
    let info = blocking(move || Ok(host.inspect(&path)))
        .await?
        .map_err(|e| describe(e, lib, record, None))?;
    tasks
        .infos
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(record.hash, info.clone());
    Ok(info)
}

/// Reads `[offset, offset + len)` of a block from one of its replicas (verified end to end).
async fn read_remote(
    shared: &Node,
    b: &LocatedBlock,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, Error> {
    let mut last = Error::Invalid(format!("block {} has no live replica", b.id));
    for t in &b.locations {
        let conn = match shared.pool.get(&t.addr, &t.name).await {
            Ok(c) => c,
            Err(e) => {
                last = e.into();
                continue;
            }
        };
        let range = RangeRead {
            block: b.id,
            block_offset_in_file: b.offset,
            committed: b.cv,
            offset,
            len,
        };
        match net::read_verified_range(&conn, range, b.token.as_ref(), STALL).await {
            Ok(d) => return Ok(d),
            Err(e) => last = Error::Invalid(format!("read block {} from {}: {e}", b.id, t.name)),
        }
    }
    Err(last)
}

/// Reads a range of a block held here, verifying every piece.
fn read_local(
    store: &std::sync::Arc<crate::store::BlockStore>,
    b: &LocatedBlock,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, Error> {
    let mut r = store.open_block(b.id)?;
    let mut out = Vec::with_capacity(len as usize);
    let mut piece = Vec::new();
    let end = offset + len;
    let mut idx = offset / PIECE_BYTES;
    while idx * PIECE_BYTES < end {
        r.read_piece(idx, &mut piece)?;
        let p_start = idx * PIECE_BYTES;
        let from = offset.saturating_sub(p_start) as usize;
        let to = ((end - p_start) as usize).min(piece.len());
        out.extend_from_slice(&piece[from.min(to)..to]);
        idx += 1;
    }
    Ok(out)
}

/// The bytes after a split up to and including the first `\n` (or to the end of the file).
async fn continuation(
    shared: &Node,
    following: &[LocatedBlock],
    local: &mut u64,
    remote: &mut u64,
) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    for b in following {
        let here = shared.store.contains(b.id);
        let mut offset = 0;
        while offset < b.len {
            let len = CONTINUATION_STEP_BYTES.min(b.len - offset);
            let chunk = if here {
                let store = shared.store.clone();
                let block = b.clone();
                let c = blocking(move || read_local(&store, &block, offset, len)).await?;
                *local += c.len() as u64;
                c
            } else {
                let c = read_remote(shared, b, offset, len).await?;
                *remote += c.len() as u64;
                c
            };
            if let Some(nl) = chunk.iter().position(|c| *c == b'\n') {
                out.extend_from_slice(&chunk[..=nl]);
                return Ok(out);
            }
            if out.len() as u64 + chunk.len() as u64 > TASK_FOLLOWING_BYTES_MAX {
                return Err(Error::Invalid(format!(
                    "the split's last record runs on for more than {TASK_FOLLOWING_BYTES_MAX} bytes"
                )));
            }
            out.extend_from_slice(&chunk);
            offset += len;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_is_added_to_arguments() {
        assert_eq!(with_path("{}", "/a"), br#"{"_path":"/a"}"#.to_vec());
        assert_eq!(
            with_path(r#"{"k":"v"}"#, "/q\"x"),
            br#"{"k":"v","_path":"/q\"x"}"#.to_vec()
        );
    }
}
