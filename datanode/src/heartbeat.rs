//! Registration with a full block report, then heartbeats carrying incremental reports (replicas
//! finalized or deleted since the last one). The namenode's replies carry replicas to delete, or
//! ask for a new registration (it restarted, or counted this node dead).

use std::sync::Arc;
use std::time::Duration;

use lode_protocol::frame::kind;
use lode_protocol::messages::{DatanodeToNamenode, NamenodeToDatanode, ReportedBlock, Space};
use lode_protocol::net::{self, RpcError, NAMENODE_SERVER_NAME};
use lode_protocol::paging;
use tokio::sync::watch;

use crate::error::Error;
use crate::node::Node;

/// How long a heartbeat woken early (a new replica, a full disk, a key asked for) waits for more
/// news to carry with it.
const REPORT_BATCH: Duration = Duration::from_millis(50);

/// Runs until shutdown: register, then heartbeat every `interval` (or sooner when a replica is
/// new), and send the full report again every `full_report` (never if zero).
pub async fn run(
    shared: Arc<Node>,
    index: usize,
    namenode: String,
    advertise: String,
    interval: Duration,
    full_report: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut registered = false;
    let mut reported = tokio::time::Instant::now();
    let mut backoff = Duration::from_millis(100);
    loop {
        if registered && !full_report.is_zero() && reported.elapsed() >= full_report {
            tracing::info!("sending the periodic full block report");
            registered = false;
        }
        if !registered {
            match register(&shared, index, &namenode, &advertise).await {
                Ok(()) => {
                    registered = true;
                    reported = tokio::time::Instant::now();
                    backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    tracing::warn!("register with namenode at {namenode}: {e}");
                    shared.pool.forget(&namenode, NAMENODE_SERVER_NAME).await;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => return,
                    }
                    backoff = (backoff * 2).min(interval.max(Duration::from_millis(500)));
                    continue;
                }
            }
        }
        let woken = tokio::select! {
            _ = tokio::time::sleep(interval) => false,
            _ = shared.reports.notified(index) => true,
            _ = shutdown.changed() => return,
        };
        if woken {
            // Whatever else finishes meanwhile goes in the same report: writers hand the
            // namenode this node's receipts, so it need not hear of each replica at once.
            tokio::select! {
                _ = tokio::time::sleep(REPORT_BATCH) => {}
                _ = shutdown.changed() => return,
            }
        }
        match heartbeat(&shared, index, &namenode).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!("namenode asks for a new registration");
                registered = false;
            }
            Err(e) => {
                tracing::warn!("heartbeat to namenode at {namenode}: {e}");
                shared.pool.forget(&namenode, NAMENODE_SERVER_NAME).await;
            }
        }
    }
}

/// The disks' figures; replicas lost with a failed data dir since the last call go into the
/// next report as deleted.
async fn space(shared: &Node) -> Space {
    let store = shared.store.clone();
    let (space, lost) = tokio::task::spawn_blocking(move || (store.space(), store.take_lost()))
        .await
        .unwrap_or_default();
    for b in lost {
        shared.reports.deleted(b);
    }
    space
}

async fn register(
    shared: &Node,
    index: usize,
    namenode: &str,
    advertise: &str,
) -> Result<(), RpcError> {
    let space = space(shared).await;
    // Whatever was pending (lost replicas too) is covered by the full report.
    let _ = shared.reports.take(index);
    let store = shared.store.clone();
    let blocks = tokio::task::spawn_blocking(move || store.report())
        .await
        .unwrap_or_default();
    let conn = shared.pool.get(namenode, NAMENODE_SERVER_NAME).await?;
    let n = blocks.len();
    // The full report goes in pages: the registration holds the first, `ReportMore` the rest.
    let mut to_delete = 0;
    for req in paging::report_requests(advertise.to_string(), space, blocks) {
        let reply: NamenodeToDatanode = net::call(
            &conn,
            kind::DATANODE_TO_NAMENODE,
            kind::NAMENODE_TO_DATANODE,
            &req,
        )
        .await?;
        if let NamenodeToDatanode::Registered { delete, keys } = reply {
            shared.learn_keys(&keys);
            to_delete += delete.len();
            delete_replicas(shared, delete).await;
        }
    }
    tracing::info!(replicas = n, to_delete, "registered with the namenode");
    let sandbox = DatanodeToNamenode::Info {
        protections: shared.sandbox.clone(),
        http_addr: shared.http_addr.clone(),
        missing: shared.sandbox_missing.clone(),
    };
    net::call::<_, NamenodeToDatanode>(
        &conn,
        kind::DATANODE_TO_NAMENODE,
        kind::NAMENODE_TO_DATANODE,
        &sandbox,
    )
    .await?;
    Ok(())
}

/// Sends one heartbeat; false when the namenode wants a new registration.
async fn heartbeat(shared: &Arc<Node>, index: usize, namenode: &str) -> Result<bool, RpcError> {
    let space = space(shared).await;
    let taken = shared.reports.take_page(index);
    let conn = match shared.pool.get(namenode, NAMENODE_SERVER_NAME).await {
        Ok(c) => c,
        Err(e) => {
            shared.reports.put_back(index, taken);
            return Err(e);
        }
    };
    let req = DatanodeToNamenode::Heartbeat {
        space,
        received: taken.0.clone(),
        deleted: taken.1.clone(),
    };
    crate::failpoint!("datanode.heartbeat.lose_request", {
        shared.reports.put_back(index, taken.clone());
        Err(RpcError::Stream("heartbeat lost (failpoint)".into()))
    });
    let reply = net::call::<_, NamenodeToDatanode>(
        &conn,
        kind::DATANODE_TO_NAMENODE,
        kind::NAMENODE_TO_DATANODE,
        &req,
    )
    .await;
    // The namenode acted on the request, but its reply never arrives.
    crate::failpoint!("datanode.heartbeat.lose_reply", Ok(true));
    match reply {
        Ok(NamenodeToDatanode::HeartbeatReply { reregister, delete }) => {
            // The old reply names replicas by id alone; deleting by id could remove a newer
            // replica stored under the same id, so those deletes are not carried out.
            if !delete.is_empty() {
                tracing::warn!(
                    replicas = delete.len(),
                    "ignoring delete commands that do not name a replica's length and value"
                );
            }
            Ok(!reregister)
        }
        Ok(NamenodeToDatanode::Commands {
            reregister,
            delete,
            copy,
            keys,
            term,
        }) => {
            shared.learn_keys(&keys);
            // Commands of a leader deposed since (an older term than one heard) are refused.
            let newest = shared
                .term
                .fetch_max(term, std::sync::atomic::Ordering::SeqCst)
                .max(term);
            if term < newest && (!delete.is_empty() || !copy.is_empty()) {
                tracing::warn!(
                    namenode,
                    term,
                    newest,
                    "refusing the commands of a deposed namenode leader"
                );
                return Ok(!reregister);
            }
            // A full page of deletions means the namenode has more: ask again at once.
            if paging::is_full_page(&delete) {
                shared.reports.wake();
            }
            delete_replicas(shared, delete).await;
            start_copies(shared, copy);
            Ok(!reregister)
        }
        Ok(other) => {
            shared.reports.put_back(index, taken);
            Err(RpcError::Stream(format!("unexpected reply {other:?}")))
        }
        Err(e) => {
            shared.reports.put_back(index, taken);
            Err(e)
        }
    }
}

/// How a datanode answers a delete command.
enum Answer {
    Deleted,
    Holds(ReportedBlock),
    Corrupt,
}

/// Deletes the replicas the namenode named, each only if its length and value still match.
async fn delete_replicas(shared: &Node, blocks: Vec<ReportedBlock>) {
    if blocks.is_empty() {
        return;
    }
    let store = shared.store.clone();
    // Every delete is answered: deleted (or not here at all), or the replica held instead once
    // it is read and verified (a replica in a report's received list has always proved its
    // bytes), or a corrupt report when it fails.
    let answers = tokio::task::spawn_blocking(move || {
        let mut answers = vec![];
        for b in blocks {
            match store.delete_exact(&b) {
                Ok(true) => answers.push((b.id, Answer::Deleted)),
                Ok(false) => {
                    tracing::debug!(block = %b.id, "no replica with the length and value to delete");
                    let answer = match store.replica(b.id) {
                        None => Answer::Deleted,
                        Some(r) => match crate::scanner::verify(&store, b.id) {
                            Ok(_) => Answer::Holds(r),
                            Err(e) if crate::scanner::unreadable(&e) => Answer::Corrupt,
                            Err(_) => continue,
                        },
                    };
                    answers.push((b.id, answer));
                }
                Err(e) => tracing::error!("delete replica: {e}"),
            }
        }
        answers
    })
    .await
    .unwrap_or_default();
    for (b, answer) in answers {
        match answer {
            Answer::Deleted => shared.reports.deleted(b),
            Answer::Holds(r) => shared.reports.received(r),
            Answer::Corrupt => crate::scanner::report(shared, b).await,
        }
    }
}

/// Starts re-replication copies in the background; the receivers report the new replicas. A
/// copy with no targets is a verification: the replica is read and checked, and reported again
/// (as received) when it is good. A replica that fails its checks while being read is reported
/// corrupt, as the block scanner would.
fn start_copies(shared: &Arc<Node>, copies: Vec<lode_protocol::messages::CopyCommand>) {
    for cmd in copies {
        let shared = shared.clone();
        tokio::spawn(async move {
            let block = cmd.block;
            if cmd.targets.is_empty() {
                let store = shared.store.clone();
                let checked =
                    tokio::task::spawn_blocking(move || crate::scanner::verify(&store, block))
                        .await;
                match checked {
                    Ok(Ok(_)) => {
                        tracing::info!(%block, "replica verified on request");
                        if let Some(r) = shared.store.replica(block) {
                            shared.reports.received(r);
                        }
                    }
                    Ok(Err(e)) if crate::scanner::unreadable(&e) => {
                        tracing::error!(%block, "replica failed verification ({e}); reporting it");
                        crate::scanner::report(&shared, block).await;
                    }
                    Ok(Err(e)) => tracing::warn!(%block, "verification not done: {e}"),
                    Err(_) => {}
                }
                return;
            }
            let to: Vec<String> = cmd.targets.iter().map(|t| t.name.clone()).collect();
            let mut result = crate::pipeline::copy_block(&shared, cmd.clone()).await;
            if matches!(result, Err(Error::Rpc(_))) {
                // A pooled connection to a target that restarted is dead: forget it and try once
                // more on a fresh one, rather than leave the block short until the namenode plans
                // the copy again.
                if let Some(first) = cmd.targets.first() {
                    shared.pool.forget(&first.addr, &first.name).await;
                }
                result = crate::pipeline::copy_block(&shared, cmd).await;
            }
            match result {
                Ok(stored) => tracing::info!(%block, to = ?stored, "replica copied"),
                Err(e) if crate::scanner::unreadable(&e) => {
                    tracing::error!(%block, "copy source failed its checks ({e}); reporting it");
                    crate::scanner::report(&shared, block).await;
                }
                Err(e) => tracing::warn!(%block, to = ?to, "copy failed: {e}"),
            }
        });
    }
}
