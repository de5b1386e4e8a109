//! The async shell: serves reads and pipeline writes over QUIC, one request per stream.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lode_protocol::checksum::{self, PIECE_BYTES};
use lode_protocol::frame::{kind, PieceHeader};
use lode_protocol::messages::{DatanodeReply, DatanodeRequest, ReportedBlock, Target};
use lode_protocol::net::{self, Pool, RpcError};
use lode_protocol::service;
use lode_protocol::{Blake3Cv, BlockId, ErrorCode, WireError};
use tokio::sync::mpsc;

use crate::error::{to_wire, Error};
use crate::heartbeat::Reports;
use crate::store::BlockStore;

/// Connections served at once, and requests served at once on one connection.
pub const LIMITS: service::Limits = service::Limits {
    connections: 4096,
    streams_per_connection: 256,
};
/// Pieces buffered between the network and the disk thread (2 MiB).
const PIECES_IN_FLIGHT: usize = 32;
/// How long to wait for the downstream datanode's acknowledgement after the last piece.
const DOWNSTREAM_ACK_TIMEOUT: Duration = Duration::from_secs(120);

/// What every request handler shares.
pub struct Shared {
    /// This datanode's name.
    pub name: String,
    /// Blocks on disk.
    pub store: Arc<BlockStore>,
    /// Connections to other datanodes and the namenode.
    pub pool: Pool,
    /// Replicas finalized or deleted, for the next heartbeat.
    pub reports: Arc<Reports>,
    /// The namenode's address.
    pub namenode: String,
    /// Scan task runner.
    pub tasks: crate::task::Tasks,
    /// The plugin sandbox protections tasks get here (probed once at start).
    pub sandbox: Vec<String>,
    /// Counters for `/metrics`.
    pub metrics: Arc<crate::http::Metrics>,
    /// The metrics address, reported to the namenode.
    pub http_addr: Option<String>,
}

impl service::Handler for Shared {
    async fn handle(
        self: Arc<Self>,
        identity: net::Identity,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) {
        if let Err(e) = serve_stream(send, recv, &self).await {
            tracing::debug!(peer = %identity.name, "stream ended: {e}");
        }
    }
}

async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    shared: &Shared,
) -> Result<(), RpcError> {
    let req = match net::read_frame::<DatanodeRequest>(&mut recv, kind::DATANODE_REQUEST).await {
        Ok(r) => r,
        Err(e) => {
            net::write_error(
                &mut send,
                &WireError::new(ErrorCode::Protocol, format!("bad request: {e}")),
            )
            .await?;
            send.finish()?;
            return Ok(());
        }
    };
    let result = match req {
        DatanodeRequest::WriteBlock {
            block,
            file_offset,
            block_size,
            downstream,
        } => {
            write_block(
                shared,
                &mut recv,
                block,
                file_offset,
                block_size,
                downstream,
            )
            .await
        }
        DatanodeRequest::ReadBlock { block, offset, len } => {
            return read_block(shared, send, block, offset, len).await
        }
        DatanodeRequest::RunTask(task) => {
            let started = std::time::Instant::now();
            let r = crate::task::run(shared, *task).await;
            let result = if r.is_ok() { "ok" } else { "failed" };
            shared
                .metrics
                .tasks
                .get_or_create(&crate::http::ResultLabel {
                    result: result.into(),
                })
                .inc();
            shared
                .metrics
                .task_seconds
                .observe(started.elapsed().as_secs_f64());
            r.map(DatanodeReply::TaskDone)
        }
        DatanodeRequest::BlockChecksums { block } => {
            let store = shared.store.clone();
            blocking(move || store.sidecar(block))
                .await
                .map(|s| DatanodeReply::Checksums {
                    block_len: s.len,
                    pieces: s.pieces,
                })
        }
    };
    match result {
        Ok(reply) => net::write_frame(&mut send, kind::DATANODE_REPLY, &reply).await?,
        Err(e) => {
            if !matches!(e, Error::BlockNotFound { .. }) {
                tracing::warn!("request failed: {e}");
            }
            net::write_error(&mut send, &to_wire(&e)).await?
        }
    }
    send.finish()?;
    let _ = send.stopped().await;
    Ok(())
}

/// Runs `f` on a blocking thread (disk work, plugin children).
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Invalid(format!("blocking task failed: {e}")))?
}

enum ToDisk {
    Piece(Blake3Cv, Bytes),
    Done,
}

/// A downstream datanode in the pipeline while it is still healthy.
struct Downstream {
    targets: Vec<Target>,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

async fn open_downstream(
    shared: &Shared,
    block: BlockId,
    file_offset: u64,
    block_size: u64,
    targets: &[Target],
) -> Result<Downstream, RpcError> {
    let first = &targets[0];
    let conn = shared.pool.get(&first.addr, &first.name).await?;
    let (mut send, recv) = conn.open_bi().await?;
    let req = DatanodeRequest::WriteBlock {
        block,
        file_offset,
        block_size,
        downstream: targets[1..].to_vec(),
    };
    net::write_frame(&mut send, kind::DATANODE_REQUEST, &req).await?;
    Ok(Downstream {
        targets: targets.to_vec(),
        send,
        recv,
    })
}

async fn write_block(
    shared: &Shared,
    recv: &mut quinn::RecvStream,
    block: BlockId,
    file_offset: u64,
    block_size: u64,
    targets: Vec<Target>,
) -> Result<DatanodeReply, Error> {
    checksum::validate_block_size(block_size).map_err(Error::Invalid)?;
    if !file_offset.is_multiple_of(block_size) {
        return Err(Error::Invalid(format!(
            "block offset {file_offset} is not a multiple of {block_size}"
        )));
    }
    let mut failed: Vec<String> = vec![];
    let mut downstream = if targets.is_empty() {
        None
    } else {
        match open_downstream(shared, block, file_offset, block_size, &targets).await {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::warn!(%block, next = %targets[0].name, "pipeline: cannot reach next datanode: {e}");
                failed.push(targets[0].name.clone());
                None
            }
        }
    };

    let (tx, mut rx) = mpsc::channel::<ToDisk>(PIECES_IN_FLIGHT);
    let store = shared.store.clone();
    let disk = tokio::task::spawn_blocking(move || {
        let mut w = store.create(block, file_offset, block_size)?;
        while let Some(msg) = rx.blocking_recv() {
            match msg {
                ToDisk::Piece(cv, data) => {
                    if w.len() + data.len() as u64 > block_size {
                        return Err(Error::Invalid(format!(
                            "block {block} is larger than {block_size} bytes"
                        )));
                    }
                    w.write_piece(cv, &data)?;
                }
                ToDisk::Done => return w.finish(),
            }
        }
        // The sender went away without Done: the write was abandoned; dropping `w` removes the temp file.
        Err(Error::Invalid(format!(
            "write of block {block} was abandoned"
        )))
    });

    let mut received: u64 = 0;
    let outcome: Result<(), Error> = async {
        loop {
            let mut buf = Vec::new();
            let Some(header) = net::read_piece(recv, &mut buf).await? else { break };
            received += u64::from(header.len);
            if received > block_size {
                return Err(Error::Invalid(format!("block {block} is larger than {block_size} bytes")));
            }
            let data = Bytes::from(buf);
            if let Some(d) = &mut downstream {
                if let Err(e) = net::write_piece(&mut d.send, &header, &data).await {
                    tracing::warn!(%block, next = %d.targets[0].name, "pipeline: forwarding failed: {e}");
                    failed.push(d.targets[0].name.clone());
                    downstream = None;
                }
            }
            if tx.send(ToDisk::Piece(header.cv, data)).await.is_err() {
                break; // the disk thread stopped; its error is reported below
            }
        }
        Ok(())
    }
    .await;
    if outcome.is_ok() {
        let _ = tx.send(ToDisk::Done).await;
    }
    drop(tx);
    let local = disk
        .await
        .map_err(|e| Error::Invalid(format!("disk task failed: {e}")))?;
    let local = outcome.and(local);
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
    if let Some(mut d) = downstream {
        match finish_downstream(&mut d).await {
            Ok((s, f)) => {
                failed.extend(f);
                stored.extend(s);
            }
            Err(e) => {
                tracing::warn!(%block, next = %d.targets[0].name, "pipeline: downstream did not acknowledge: {e}");
                failed.push(d.targets[0].name.clone());
            }
        }
    }
    failed.sort();
    failed.dedup();
    Ok(DatanodeReply::WriteAck { stored, failed })
}

async fn finish_downstream(d: &mut Downstream) -> Result<(Vec<String>, Vec<String>), RpcError> {
    net::write_piece(&mut d.send, &PieceHeader::END, &[]).await?;
    d.send.finish()?;
    let reply = tokio::time::timeout(
        DOWNSTREAM_ACK_TIMEOUT,
        net::read_frame::<DatanodeReply>(&mut d.recv, kind::DATANODE_REPLY),
    )
    .await
    .map_err(|_| RpcError::Stream("timed out".into()))??;
    match reply {
        DatanodeReply::WriteAck { stored, failed } => Ok((stored, failed)),
        other => Err(RpcError::Stream(format!("unexpected reply {other:?}"))),
    }
}

async fn read_block(
    shared: &Shared,
    mut send: quinn::SendStream,
    block: BlockId,
    offset: u64,
    len: u64,
) -> Result<(), RpcError> {
    let store = shared.store.clone();
    let opened = blocking(move || store.open_block(block)).await;
    let reader = match opened {
        Ok(r)
            if offset
                .checked_add(len)
                .is_some_and(|end| end <= r.sidecar.len) =>
        {
            r
        }
        Ok(r) => {
            let msg = format!(
                "range {offset}+{len} is outside block {block} of {} bytes",
                r.sidecar.len
            );
            net::write_error(&mut send, &WireError::new(ErrorCode::InvalidArgument, msg)).await?;
            send.finish()?;
            return Ok(());
        }
        Err(e) => {
            net::write_error(&mut send, &to_wire(&e)).await?;
            send.finish()?;
            return Ok(());
        }
    };
    let first = offset / PIECE_BYTES;
    let end = if len == 0 {
        first
    } else {
        (offset + len).div_ceil(PIECE_BYTES)
    };
    let start = DatanodeReply::ReadStart {
        block_len: reader.sidecar.len,
        first_piece_offset: first * PIECE_BYTES,
        pieces: reader.sidecar.pieces.clone(),
    };
    net::write_frame(&mut send, kind::DATANODE_REPLY, &start).await?;
    let mut rx = spawn_piece_reader(reader, first, end);
    while let Some(item) = rx.recv().await {
        match item {
            Ok((cv, data)) => {
                shared.metrics.bytes_read.inc_by(data.len() as u64);
                let header = PieceHeader {
                    len: data.len() as u32,
                    cv,
                };
                net::write_piece(&mut send, &header, &data).await?;
            }
            Err(e) => {
                tracing::error!("{e}; the replica is not served");
                let code = if matches!(e, Error::Corrupt { .. }) {
                    ErrorCode::Corrupt
                } else {
                    ErrorCode::Io
                };
                let _ = send.reset((code as u32).into());
                return Ok(());
            }
        }
    }
    net::write_piece(&mut send, &PieceHeader::END, &[]).await?;
    send.finish()?;
    let _ = send.stopped().await;
    Ok(())
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
    shared: &Shared,
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
