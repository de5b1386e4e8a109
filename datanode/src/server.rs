//! The async shell: serves reads and pipeline writes over QUIC, one request per stream.

use std::sync::Arc;

use lode_protocol::checksum::PIECE_BYTES;
use lode_protocol::frame::{kind, PieceHeader};
use lode_protocol::messages::{DatanodeReply, DatanodeRequest};
use lode_protocol::net::{self, RpcError};
use lode_protocol::service;
use lode_protocol::token;
use lode_protocol::{BlockId, ErrorCode, WireError};

use crate::error::{to_wire, Error};
use crate::node::{blocking, Node};
use crate::pipeline::{spawn_piece_reader, write_block};

/// Connections and requests served at once, in all and per peer. A write or read in progress holds
/// a disk thread, so one peer's share stays well below the blocking pool (512 threads).
pub const LIMITS: service::Limits = service::Limits {
    connections: 4096,
    connections_per_peer: 1024,
    streams_per_connection: 64,
    streams_per_peer: 64,
};

impl service::Handler for Node {
    async fn handle(
        self: Arc<Self>,
        identity: net::Identity,
        _addr: std::net::SocketAddr,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) {
        if let Err(e) = serve_stream(send, recv, &identity, &self).await {
            tracing::debug!(peer = %identity.name, "stream ended: {e}");
        }
    }
}

/// Every request on a block carries a block access token for it ([`Node::authorise`]); one that
/// does not open what it asks for is refused before anything is read, written or run.
async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    peer: &net::Identity,
    shared: &Node,
) -> Result<(), RpcError> {
    let req = tokio::time::timeout(
        service::REQUEST_READ_TIMEOUT,
        net::read_frame::<DatanodeRequest>(&mut recv, kind::DATANODE_REQUEST),
    )
    .await
    .unwrap_or_else(|_| {
        Err(RpcError::Stream(format!(
            "no request within {:?}",
            service::REQUEST_READ_TIMEOUT
        )))
    });
    let req = match req {
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
            token,
        } => {
            // The block goes only where the namenode sent it: the token's pipeline from here on.
            let allowed = shared
                .authorise_waiting(peer, token.as_ref(), block, token::WRITE | token::COPY)
                .await
                .and_then(|grant| {
                    let rest: Vec<&str> = downstream.iter().map(|t| t.name.as_str()).collect();
                    token::check_pipeline(&grant, &shared.name, &rest).map_err(Error::Token)
                });
            match allowed {
                Ok(()) => {
                    write_block(
                        shared,
                        &mut recv,
                        block,
                        file_offset,
                        block_size,
                        downstream,
                        token,
                    )
                    .await
                }
                Err(e) => Err(e),
            }
        }
        DatanodeRequest::ReadBlock {
            block,
            offset,
            len,
            token,
        } => {
            if let Err(e) = shared
                .authorise_waiting(peer, token.as_ref(), block, token::READ)
                .await
            {
                return refuse(send, &e).await;
            }
            return read_block(shared, send, block, offset, len).await;
        }
        DatanodeRequest::RunTask(task) => {
            let started = std::time::Instant::now();
            let r = crate::task::run(shared, peer, *task).await;
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
        DatanodeRequest::BlockChecksums { block, token } => {
            match shared
                .authorise_waiting(peer, token.as_ref(), block, token::READ)
                .await
            {
                Ok(_) => {
                    let store = shared.store.clone();
                    blocking(move || store.sidecar(block))
                        .await
                        .map(|s| DatanodeReply::Checksums {
                            block_len: s.len,
                            pieces: s.pieces,
                        })
                }
                Err(e) => Err(e),
            }
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

/// Answers a request with its refusal and ends the stream.
async fn refuse(mut send: quinn::SendStream, e: &Error) -> Result<(), RpcError> {
    tracing::warn!("request refused: {e}");
    net::write_error(&mut send, &to_wire(e)).await?;
    send.finish()?;
    let _ = send.stopped().await;
    Ok(())
}

async fn read_block(
    shared: &Node,
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
                // A reader that stops reading is let go: the stream holds a disk thread.
                let sent = tokio::time::timeout(
                    shared.stream_idle,
                    net::write_piece(&mut send, &header, &data),
                )
                .await;
                match sent {
                    Ok(r) => r?,
                    Err(_) => {
                        let _ = send.reset((ErrorCode::Protocol as u32).into());
                        return Err(RpcError::Stream(format!(
                            "the reader took nothing for {:?}",
                            shared.stream_idle
                        )));
                    }
                }
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
