//! The block scanner: re-reads every replica at a bounded rate, verifying each piece against its
//! sidecar value, and reports replicas that fail to the namenode, which stops offering them, has
//! them deleted and copies a good replica in their place.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lode_protocol::frame::kind;
use lode_protocol::messages::{DatanodeToNamenode, NamenodeToDatanode};
use lode_protocol::net::{self, NAMENODE_SERVER_NAME};
use lode_protocol::BlockId;
use tokio::sync::watch;

use crate::error::Error;
use crate::node::Node;

/// Runs until shutdown: a full pass over all replicas, then a pause, and again.
pub async fn run(
    shared: Arc<Node>,
    bytes_per_sec: u64,
    pause: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    if bytes_per_sec == 0 {
        return;
    }
    loop {
        let started = Instant::now();
        let mut ids: Vec<BlockId> = shared.store.report().into_iter().map(|r| r.id).collect();
        ids.sort();
        let mut scanned = 0u64;
        for id in ids {
            let store = shared.store.clone();
            let result = tokio::task::spawn_blocking(move || verify(&store, id)).await;
            match result {
                Ok(Ok(len)) => {
                    scanned += len;
                    shared.metrics.scanned_bytes.inc_by(len);
                }
                Ok(Err(e)) if unreadable(&e) => {
                    tracing::error!(block = %id, "block scanner: replica cannot be trusted ({e}); reporting it");
                    shared.metrics.corrupt_found.inc();
                    report(&shared, id).await;
                }
                // Deleted meanwhile, or a transient error (out of descriptors, say): the next
                // pass reads it again.
                Ok(Err(e)) => tracing::debug!(block = %id, "block scanner skipped a replica: {e}"),
                Err(_) => {}
            }
            // Keep to the read budget: the pass so far may not have taken less than scanned / rate.
            let due = Duration::from_secs_f64(scanned as f64 / bytes_per_sec as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Whether an error reading a replica means the replica is bad: a checksum mismatch, a truncated
/// or missing file, a missing or damaged sidecar, an I/O error. A replica deleted meanwhile, or an
/// error that says nothing about the disk (out of descriptors or memory, a timeout), is not.
pub(crate) fn unreadable(e: &Error) -> bool {
    match e {
        Error::Corrupt { .. } => true,
        Error::Disk { source, .. } => !crate::store::is_transient(source),
        _ => false,
    }
}

/// Reads every piece of a replica, checking each against its sidecar value, and checks that the
/// sidecar still adds up to the block value this datanode reports for the replica (a sidecar
/// rewritten to match changed bytes would otherwise pass); its length.
pub(crate) fn verify(
    store: &std::sync::Arc<crate::store::BlockStore>,
    id: BlockId,
) -> Result<u64, Error> {
    let mut r = store.open_block(id)?;
    let mut buf = Vec::new();
    let len = r.sidecar.len;
    for idx in 0..lode_protocol::checksum::piece_count(len) {
        r.read_piece(idx, &mut buf)?;
    }
    let reported = store.replica(id).map(|b| (b.len, b.cv));
    let on_disk = lode_protocol::checksum::block_cv(&r.sidecar.pieces).map(|cv| (len, cv));
    if reported.is_some() && reported != on_disk {
        return Err(Error::Corrupt {
            id,
            offset: 0,
            stage: "verify",
        });
    }
    Ok(len)
}

/// Tells the namenode (every member of a group) that a local replica is corrupt.
pub(crate) async fn report(shared: &Node, block: BlockId) {
    let msg = DatanodeToNamenode::CorruptReplicas {
        blocks: vec![block],
    };
    for namenode in &shared.namenodes {
        let sent = async {
            let conn = shared.pool.get(namenode, NAMENODE_SERVER_NAME).await?;
            net::call::<_, NamenodeToDatanode>(
                &conn,
                kind::DATANODE_TO_NAMENODE,
                kind::NAMENODE_TO_DATANODE,
                &msg,
            )
            .await
        };
        if let Err(e) = sent.await {
            tracing::warn!(%block, namenode, "could not report a corrupt replica: {e}");
        }
    }
}
