//! The write pipeline and replica copies: a block arrives piece by piece, each verified before it is
//! written, is forwarded to the next datanode as it comes, and is acknowledged once fsynced here and
//! downstream; a copy (re-replication) reads a local replica piece by piece, verified, and writes it
//! to its targets the same way. Both the request server and the heartbeat loop (copy commands) use it.

use std::time::Duration;

use bytes::Bytes;
use lode_protocol::checksum::{self, PIECE_BYTES};
use lode_protocol::frame::{kind, PieceHeader};
use lode_protocol::messages::{DatanodeReply, DatanodeRequest, ReportedBlock, Target};
use lode_protocol::net::{self, RpcError};
use lode_protocol::token::{BlockToken, Receipt};
use lode_protocol::{Blake3Cv, BlockId, ErrorCode, REPLICATION_MAX};
use tokio::sync::mpsc;

use crate::error::Error;
use crate::node::{blocking, Node};

/// Pieces buffered between the network and the disk thread (2 MiB).
const PIECES_IN_FLIGHT: usize = 32;
/// How long to wait for the downstream datanode's acknowledgement after the last piece.
const DOWNSTREAM_ACK_TIMEOUT: Duration = Duration::from_secs(120);

enum ToDisk {
    Piece(Blake3Cv, Bytes),
    Done,
}

/// Pieces held before a block gets a disk thread of its own (a small block never does).
const HOLD_BYTES: u64 = 4 * PIECE_BYTES;

/// Where a block's pieces go: held in memory at first, then to a disk thread.
enum Disk {
    Holding(Vec<(Blake3Cv, Bytes)>, u64),
    Thread(
        mpsc::Sender<ToDisk>,
        tokio::task::JoinHandle<Result<(u64, Blake3Cv), Error>>,
    ),
}

/// A block being written: its id, offset in its file and the file's block size.
type Placed = (BlockId, u64, u64);

impl Disk {
    /// Takes one piece; false if the disk thread has stopped (its error comes from `finish`).
    async fn take(&mut self, shared: &Node, placed: Placed, cv: Blake3Cv, data: Bytes) -> bool {
        if let Disk::Holding(held, bytes) = self {
            if *bytes + data.len() as u64 <= HOLD_BYTES {
                *bytes += data.len() as u64;
                held.push((cv, data));
                return true;
            }
            let (tx, rx) = mpsc::channel::<ToDisk>(PIECES_IN_FLIGHT);
            let held = std::mem::take(held);
            let store = shared.store.clone();
            let thread =
                tokio::task::spawn_blocking(move || write_pieces(&store, placed, held, Some(rx)));
            *self = Disk::Thread(tx, thread);
        }
        match self {
            Disk::Thread(tx, _) => tx.send(ToDisk::Piece(cv, data)).await.is_ok(),
            Disk::Holding(..) => true,
        }
    }

    /// The stream failed: the disk thread, if any, removes what it wrote before this returns.
    async fn abandon(self) {
        if let Disk::Thread(tx, thread) = self {
            // Its sender gone without Done, the thread gives the write up.
            drop(tx);
            let _ = thread.await;
        }
    }

    /// The stream ended well: the block is written, fsynced and finalized.
    async fn finish(self, shared: &Node, placed: Placed) -> Result<(u64, Blake3Cv), Error> {
        let thread = match self {
            Disk::Holding(held, _) => {
                let store = shared.store.clone();
                tokio::task::spawn_blocking(move || write_pieces(&store, placed, held, None))
            }
            Disk::Thread(tx, thread) => {
                let _ = tx.send(ToDisk::Done).await;
                thread
            }
        };
        thread
            .await
            .map_err(|e| Error::Invalid(format!("disk task failed: {e}")))?
    }
}

/// Writes a block on a blocking thread: the pieces `held`, then those `more` brings until Done.
fn write_pieces(
    store: &std::sync::Arc<crate::store::BlockStore>,
    (block, file_offset, block_size): Placed,
    held: Vec<(Blake3Cv, Bytes)>,
    more: Option<mpsc::Receiver<ToDisk>>,
) -> Result<(u64, Blake3Cv), Error> {
    let mut w = store.create(block, file_offset, block_size)?;
    let mut write = |cv: Blake3Cv, data: &[u8]| {
        if w.len() + data.len() as u64 > block_size {
            return Err(Error::Invalid(format!(
                "block {block} is larger than {block_size} bytes"
            )));
        }
        w.write_piece(cv, data)
    };
    for (cv, data) in held {
        write(cv, &data)?;
    }
    let Some(mut rx) = more else {
        return w.finish();
    };
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            ToDisk::Piece(cv, data) => write(cv, &data)?,
            ToDisk::Done => return w.finish(),
        }
    }
    // The sender went away without Done: the write was abandoned; dropping `w` removes the temp file.
    Err(Error::Invalid(format!(
        "write of block {block} was abandoned"
    )))
}

/// A downstream datanode in the pipeline while it is still healthy.
struct Downstream {
    targets: Vec<Target>,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

async fn open_downstream(
    shared: &Node,
    block: BlockId,
    file_offset: u64,
    block_size: u64,
    targets: &[Target],
    token: Option<BlockToken>,
) -> Result<Downstream, RpcError> {
    let first = &targets[0];
    let conn = shared.pool.get(&first.addr, &first.name).await?;
    let (mut send, recv) = conn.open_bi().await?;
    let req = DatanodeRequest::WriteBlock {
        block,
        file_offset,
        block_size,
        downstream: targets[1..].to_vec(),
        token,
    };
    net::write_frame(&mut send, kind::DATANODE_REQUEST, &req).await?;
    Ok(Downstream {
        targets: targets.to_vec(),
        send,
        recv,
    })
}

pub(crate) async fn write_block(
    shared: &Node,
    recv: &mut quinn::RecvStream,
    block: BlockId,
    file_offset: u64,
    block_size: u64,
    targets: Vec<Target>,
    token: Option<BlockToken>,
) -> Result<DatanodeReply, Error> {
    checksum::validate_block_size(block_size).map_err(Error::Invalid)?;
    if !file_offset.is_multiple_of(block_size) {
        return Err(Error::Invalid(format!(
            "block offset {file_offset} is not a multiple of {block_size}"
        )));
    }
    validate_pipeline(&shared.name, &targets)?;
    let mut failed: Vec<String> = vec![];
    let mut downstream = if targets.is_empty() {
        None
    } else {
        match open_downstream(shared, block, file_offset, block_size, &targets, token).await {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::warn!(%block, next = %targets[0].name, "pipeline: cannot reach next datanode: {e}");
                failed.push(targets[0].name.clone());
                None
            }
        }
    };

    // The first pieces are held here; a block that ends within them is written with one
    // blocking call, and a longer one gets a disk thread fed piece by piece.
    let mut disk = Disk::Holding(vec![], 0);
    let mut received: u64 = 0;
    let outcome: Result<(), Error> = async {
        loop {
            let mut buf = Vec::new();
            // A writer that goes quiet is let go: the stream holds a disk thread.
            let piece = tokio::time::timeout(shared.stream_idle, net::read_piece(recv, &mut buf))
                .await
                .map_err(|_| Error::Invalid(format!(
                    "write of block {block} sent nothing for {:?}", shared.stream_idle
                )))?;
            let Some(header) = piece? else { break };
            received += u64::from(header.len);
            if received > block_size {
                return Err(Error::Invalid(format!("block {block} is larger than {block_size} bytes")));
            }
            let data = Bytes::from(buf);
            if let Some(d) = &mut downstream {
                let forwarded =
                    tokio::time::timeout(shared.stream_idle, net::write_piece(&mut d.send, &header, &data))
                        .await
                        .unwrap_or_else(|_| Err(RpcError::Stream("took nothing in time".into())));
                if let Err(e) = forwarded {
                    tracing::warn!(%block, next = %d.targets[0].name, "pipeline: forwarding failed: {e}");
                    failed.push(d.targets[0].name.clone());
                    downstream = None;
                }
            }
            if !disk.take(shared, (block, file_offset, block_size), header.cv, data).await {
                break; // the disk thread stopped; its error is reported below
            }
        }
        Ok(())
    }
    .await;
    let local = match outcome {
        Ok(()) => disk.finish(shared, (block, file_offset, block_size)).await,
        Err(e) => {
            disk.abandon().await;
            Err(e)
        }
    };
    let (len, cv) = match local {
        Ok(v) => v,
        Err(e) => {
            if matches!(e, Error::NoSpace(_)) {
                shared.metrics.no_space_refusals.inc();
                // The namenode should hear at once that this node is full.
                shared.reports.wake();
            }
            if let Some(mut d) = downstream {
                let _ = d.send.reset((ErrorCode::Io as u32).into());
            }
            return Err(e);
        }
    };
    shared
        .reports
        .received(ReportedBlock { id: block, len, cv });
    shared.metrics.bytes_written.inc_by(len);

    let mut stored = vec![shared.name.clone()];
    let mut receipts: Vec<Receipt> = shared.receipt(block, len, cv).into_iter().collect();
    if let Some(mut d) = downstream {
        match finish_downstream(&mut d).await {
            Ok((s, f, r)) => {
                failed.extend(f);
                stored.extend(s);
                // A peer's receipts pass through unread (the namenode checks them), as many as
                // a pipeline can hold.
                receipts.extend(r.into_iter().take(usize::from(REPLICATION_MAX) - 1));
            }
            Err(e) => {
                tracing::warn!(%block, next = %d.targets[0].name, "pipeline: downstream did not acknowledge: {e}");
                failed.push(d.targets[0].name.clone());
            }
        }
    }
    failed.sort();
    failed.dedup();
    Ok(DatanodeReply::WriteAck {
        stored,
        failed,
        receipts,
    })
}

/// The rest of a write pipeline as a peer sent it: at most [`REPLICATION_MAX`] - 1 other datanodes,
/// each once, this one not among them, so that no request makes a datanode write a block twice or
/// send it round in a loop.
fn validate_pipeline(me: &str, targets: &[Target]) -> Result<(), Error> {
    if targets.len() >= usize::from(REPLICATION_MAX) {
        return Err(Error::Invalid(format!(
            "a pipeline of {} more datanodes is longer than replication allows ({REPLICATION_MAX})",
            targets.len()
        )));
    }
    for (i, t) in targets.iter().enumerate() {
        if t.name == me {
            return Err(Error::Invalid(format!(
                "the pipeline names this datanode ({me}) again"
            )));
        }
        if targets[..i].iter().any(|o| o.name == t.name) {
            return Err(Error::Invalid(format!(
                "the pipeline names datanode {} twice",
                t.name
            )));
        }
    }
    Ok(())
}

/// The downstream datanodes' acknowledgement: stored, failed, and their receipts.
type Ack = (Vec<String>, Vec<String>, Vec<Receipt>);

async fn finish_downstream(d: &mut Downstream) -> Result<Ack, RpcError> {
    net::write_piece(&mut d.send, &PieceHeader::END, &[]).await?;
    d.send.finish()?;
    let reply = tokio::time::timeout(
        DOWNSTREAM_ACK_TIMEOUT,
        net::read_frame::<DatanodeReply>(&mut d.recv, kind::DATANODE_REPLY),
    )
    .await
    .map_err(|_| RpcError::Stream("timed out".into()))??;
    match reply {
        DatanodeReply::WriteAck {
            stored,
            failed,
            receipts,
        } => Ok((stored, failed, receipts)),
        other => Err(RpcError::Stream(format!("unexpected reply {other:?}"))),
    }
}

/// Reads pieces `first..end` of a block on a blocking thread, each verified against the sidecar.
pub fn spawn_piece_reader(
    mut reader: crate::store::BlockReader,
    first: u64,
    end: u64,
) -> mpsc::Receiver<Result<(Blake3Cv, Bytes), Error>> {
    let (tx, rx) = mpsc::channel(PIECES_IN_FLIGHT);
    tokio::task::spawn_blocking(move || {
        for idx in first..end {
            let mut buf = Vec::with_capacity(PIECE_BYTES as usize);
            let item = reader
                .read_piece(idx, &mut buf)
                .map(|cv| (cv, Bytes::from(buf)));
            let stop = item.is_err();
            if tx.blocking_send(item).is_err() || stop {
                return;
            }
        }
    });
    rx
}

/// Re-replication: sends a local replica to `targets` (a pipeline), as a writer would.
pub async fn copy_block(
    shared: &Node,
    cmd: lode_protocol::messages::CopyCommand,
) -> Result<Vec<String>, Error> {
    let Some(first) = cmd.targets.first() else {
        return Ok(vec![]);
    };
    let store = shared.store.clone();
    let block = cmd.block;
    let reader = blocking(move || store.open_block(block)).await?;
    let (len, file_offset) = (reader.sidecar.len, reader.sidecar.file_offset);
    // Any power of two from the block's length up divides its file offset (the file's block size
    // is such a power of two), so the receiver's checks hold.
    let block_size = len.max(PIECE_BYTES).next_power_of_two();
    let conn = shared.pool.get(&first.addr, &first.name).await?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(RpcError::from)?;
    let req = DatanodeRequest::WriteBlock {
        block,
        file_offset,
        block_size,
        downstream: cmd.targets[1..].to_vec(),
        token: cmd.token.clone(),
    };
    net::write_frame(&mut send, kind::DATANODE_REQUEST, &req).await?;
    let mut rx = spawn_piece_reader(reader, 0, lode_protocol::checksum::piece_count(len));
    while let Some(item) = rx.recv().await {
        let (cv, data) = item?;
        net::write_piece(
            &mut send,
            &PieceHeader {
                len: data.len() as u32,
                cv,
            },
            &data,
        )
        .await?;
    }
    net::write_piece(&mut send, &PieceHeader::END, &[]).await?;
    send.finish().map_err(RpcError::from)?;
    match tokio::time::timeout(
        DOWNSTREAM_ACK_TIMEOUT,
        net::read_frame::<DatanodeReply>(&mut recv, kind::DATANODE_REPLY),
    )
    .await
    .map_err(|_| Error::Invalid("copy: no acknowledgement".into()))??
    {
        DatanodeReply::WriteAck { stored, .. } => Ok(stored),
        other => Err(Error::Invalid(format!("copy: unexpected reply {other:?}"))),
    }
}
