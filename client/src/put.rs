//! Writing a file: create it at the namenode (taking its lease), then for each block ask for a
//! pipeline, stream the block's pieces with their chaining values to the first datanode (which
//! forwards down the pipeline), and commit it. A block counts as written once at least
//! min(2, replication) datanodes fsynced it; otherwise it is abandoned and written again to other
//! datanodes. The next block is read and hashed while the current one is on the wire.

use std::time::Duration;

use bytes::Bytes;
use lode_protocol::checksum::{self, PIECE_BYTES};
use lode_protocol::frame::{kind, PieceHeader};
use lode_protocol::messages::{
    ClientToNamenode, CommittedBlock, DatanodeReply, DatanodeRequest, LocatedBlock, NamenodeReply,
    Target,
};
use lode_protocol::net;
use lode_protocol::token::Receipt;
use lode_protocol::{Blake3Cv, BlockId, InodeId};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;

use crate::error::Error;
use crate::fs::{unexpected, Client};

/// Attempts per block before the put fails.
const BLOCK_ATTEMPTS: usize = 4;
/// How long to wait for the pipeline's acknowledgement after the last piece.
const ACK_TIMEOUT: Duration = Duration::from_secs(120);

/// How to write a file.
#[derive(Clone, Debug, Default)]
pub struct PutOptions {
    /// Replace an existing file.
    pub overwrite: bool,
    /// Replica count (else the config's, else the namenode's default).
    pub replication: Option<u8>,
    /// Block size in bytes (else the config's, else the namenode's default).
    pub block_size: Option<u64>,
}

struct ReadBlock {
    data: Bytes,
    pieces: Vec<Blake3Cv>,
}

/// A file being written.
struct Writing {
    inode: InodeId,
    replication: u8,
    block_size: u64,
}

/// What a block's buffer starts at: a small file does not get a whole block's worth.
const FIRST_READ: u64 = 1 << 20;
/// Blocks up to this size are hashed on the task that read them (about 50 µs of BLAKE3).
const HASH_INLINE_BYTES: u64 = 4 * PIECE_BYTES;

impl Client {
    /// Writes everything `input` yields to `remote`. `progress` is told the bytes written so far.
    pub async fn put<R>(
        &self,
        input: R,
        remote: &str,
        opts: &PutOptions,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<u64, Error>
    where
        R: AsyncRead + Unpin + Send + 'static,
    {
        let block_size = opts.block_size.or(self.config.block_size);
        if let Some(b) = block_size {
            checksum::validate_block_size(b).map_err(Error::Invalid)?;
        }
        // A first look at the input (one read: whatever is there, so a stream that trickles in
        // is created at once): a file with data gets its first block with the create, in the
        // same round trip.
        let mut input = input;
        let mut head = vec![0u8; PIECE_BYTES as usize];
        let n = input
            .read(&mut head)
            .await
            .map_err(|e| Error::local("input", e))?;
        head.truncate(n);
        let create = ClientToNamenode::Create {
            path: remote.to_string(),
            overwrite: opts.overwrite,
            replication: opts.replication.or(self.config.replication),
            block_size,
            session: self.session,
            mode: self.config.new_mode(false),
            first_block: !head.is_empty(),
        };
        let (inode, replication, block_size, lease_ms, located) = match self.nn(&create).await? {
            NamenodeReply::Created {
                inode,
                replication,
                block_size,
                lease_ms,
                first,
            } => (inode, replication, block_size, lease_ms, first),
            other => return Err(unexpected(other)),
        };
        let (tx, rx) = mpsc::channel::<Result<ReadBlock, Error>>(1);
        let mut reader = tokio::spawn(read_blocks(
            std::io::Cursor::new(head).chain(input),
            block_size,
            tx,
        ));
        let renew = self.spawn_lease_renewal(lease_ms);
        let file = Writing {
            inode,
            replication,
            block_size,
        };
        let result = self
            .write_blocks(&file, located, (rx, &mut reader), progress)
            .await;
        renew.abort();
        reader.abort();
        if result.is_err() {
            let _ = self
                .nn(&ClientToNamenode::AbandonFile {
                    inode,
                    session: self.session,
                })
                .await;
        }
        result
    }

    fn spawn_lease_renewal(&self, lease_ms: u64) -> tokio::task::JoinHandle<()> {
        let every = Duration::from_millis((lease_ms / 3).max(200));
        let session = self.session;
        let (pool, leader) = (self.pool.clone(), self.namenode.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let namenode = leader.lock().unwrap_or_else(|p| p.into_inner()).clone();
                if let Ok(conn) = pool.get(&namenode, net::NAMENODE_SERVER_NAME).await {
                    let renew = ClientToNamenode::RenewLease { session };
                    let _ = net::call::<_, NamenodeReply>(
                        &conn,
                        kind::CLIENT_TO_NAMENODE,
                        kind::NAMENODE_REPLY,
                        &renew,
                    )
                    .await;
                }
            }
        })
    }

    async fn write_blocks(
        &self,
        file: &Writing,
        mut first: Option<LocatedBlock>,
        (mut rx, reader): (
            mpsc::Receiver<Result<ReadBlock, Error>>,
            &mut tokio::task::JoinHandle<()>,
        ),
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<u64, Error> {
        let required = usize::from(file.replication.min(2));
        let mut previous: Option<CommittedBlock> = None;
        let mut receipts: Vec<Receipt> = vec![];
        let mut offset = 0u64;
        loop {
            let Some(block) = rx.recv().await else {
                break;
            };
            let block = block?;
            // The first block may have come with the create.
            let located = first.take();
            let len = block.data.len() as u64;
            let cv = checksum::block_cv(&block.pieces)
                .ok_or_else(|| Error::Invalid("empty block".into()))?;
            let (id, signed) = self
                .write_one_block(
                    file,
                    (previous, receipts),
                    offset,
                    required,
                    &block,
                    located,
                )
                .await?;
            previous = Some(CommittedBlock { id, len, cv });
            receipts = signed;
            offset += len;
            progress(offset);
        }
        // The input ended (not the reader): only then is the file complete.
        reader
            .await
            .map_err(|e| Error::Invalid(format!("input reader failed: {e}")))?;
        let done = ClientToNamenode::Complete {
            inode: file.inode,
            session: self.session,
            last: previous,
            receipts,
            size: offset,
        };
        self.nn_ok(&done).await?;
        Ok(offset)
    }

    /// Writes one block: to `located` if the namenode already placed it, else (and after a failed
    /// attempt) to a pipeline asked for with AddBlock (which commits `previous` with the receipts
    /// its datanodes signed). Returns the block's id and its datanodes' receipts.
    async fn write_one_block(
        &self,
        file: &Writing,
        (previous, receipts): (Option<CommittedBlock>, Vec<Receipt>),
        offset: u64,
        required: usize,
        block: &ReadBlock,
        mut located: Option<LocatedBlock>,
    ) -> Result<(BlockId, Vec<Receipt>), Error> {
        let mut exclude: Vec<String> = vec![];
        let mut last_err = None;
        for _ in 0..BLOCK_ATTEMPTS {
            let located = match located.take() {
                Some(b) => b,
                None => {
                    let add = ClientToNamenode::AddBlock {
                        inode: file.inode,
                        session: self.session,
                        previous,
                        receipts: receipts.clone(),
                        exclude: exclude.clone(),
                    };
                    match self.nn(&add).await? {
                        NamenodeReply::Block(b) => b,
                        other => return Err(unexpected(other)),
                    }
                }
            };
            match self
                .send_block(&located, offset, file.block_size, block)
                .await
            {
                Ok((stored, _, signed)) if stored.len() >= required => {
                    return Ok((located.id, signed));
                }
                Ok((stored, failed, _)) => {
                    exclude.extend(failed.iter().cloned());
                    last_err = Some(Error::Invalid(format!(
                        "block {} stored on {} of the {required} datanodes required (stored: [{}], failed: [{}])",
                        located.id,
                        stored.len(),
                        stored.join(", "),
                        failed.join(", ")
                    )));
                }
                Err((first, e)) => {
                    exclude.push(first);
                    last_err = Some(e);
                }
            }
            let abandon = ClientToNamenode::AbandonBlock {
                inode: file.inode,
                session: self.session,
                block: located.id,
            };
            self.nn_ok(&abandon).await?;
        }
        Err(last_err.unwrap_or_else(|| Error::Invalid("no attempt made".into())))
    }

    /// Streams one block to the first datanode of its pipeline. On failure, names the first datanode.
    async fn send_block(
        &self,
        located: &LocatedBlock,
        offset: u64,
        block_size: u64,
        block: &ReadBlock,
    ) -> Result<(Vec<String>, Vec<String>, Vec<Receipt>), (String, Error)> {
        let Some(first) = located.locations.first() else {
            return Err((
                String::new(),
                Error::Invalid("namenode gave an empty pipeline".into()),
            ));
        };
        let fail = |t: &Target, e| {
            (
                t.name.clone(),
                Error::rpc(format!("write block {} to {}", located.id, t.name), e),
            )
        };
        let attempt = async {
            let conn = self.pool.get(&first.addr, &first.name).await?;
            let (mut send, mut recv) = conn.open_bi().await?;
            let req = DatanodeRequest::WriteBlock {
                block: located.id,
                file_offset: offset,
                block_size,
                downstream: located.locations[1..].to_vec(),
                token: located.token.clone(),
            };
            net::write_frame(&mut send, kind::DATANODE_REQUEST, &req).await?;
            for (i, cv) in block.pieces.iter().enumerate() {
                let start = i * PIECE_BYTES as usize;
                let end = (start + PIECE_BYTES as usize).min(block.data.len());
                let header = PieceHeader {
                    len: (end - start) as u32,
                    cv: *cv,
                };
                send.write_all(&header.encode()).await?;
                send.write_chunk(block.data.slice(start..end)).await?;
            }
            net::write_piece(&mut send, &PieceHeader::END, &[]).await?;
            send.finish()?;
            let reply = tokio::time::timeout(
                ACK_TIMEOUT,
                net::read_frame::<DatanodeReply>(&mut recv, kind::DATANODE_REPLY),
            )
            .await
            .map_err(|_| net::RpcError::Stream("timed out waiting for the pipeline".into()))??;
            Ok::<_, net::RpcError>(reply)
        };
        match attempt.await {
            Ok(DatanodeReply::WriteAck {
                stored,
                failed,
                receipts,
            }) => {
                for f in &failed {
                    self.mark_suspect(f, true);
                }
                Ok((stored, failed, receipts))
            }
            Ok(other) => Err((first.name.clone(), unexpected(other))),
            Err(e) => {
                self.mark_suspect(&first.name, true);
                self.pool.forget(&first.addr, &first.name).await;
                Err(fail(first, e))
            }
        }
    }
}

/// Reads the input a block at a time and hashes its pieces, one block ahead of the sender.
async fn read_blocks<R: AsyncRead + Unpin>(
    mut input: R,
    block_size: u64,
    tx: mpsc::Sender<Result<ReadBlock, Error>>,
) {
    let mut offset = 0u64;
    loop {
        // Read a first piece of the block into a small buffer; only a block that fills it gets
        // the whole block's room (one copy of the first MiB, instead of doubling as it grows).
        let start = block_size.min(FIRST_READ);
        let mut buf = Vec::with_capacity(start as usize);
        let mut read = (&mut input).take(start).read_to_end(&mut buf).await;
        if let Ok(n) = read {
            if n as u64 == start && start < block_size {
                buf.reserve_exact((block_size - start) as usize);
                read = (&mut input)
                    .take(block_size - start)
                    .read_to_end(&mut buf)
                    .await
                    .map(|m| n + m);
            }
        }
        let n = match read {
            Ok(n) => n,
            Err(e) => {
                let _ = tx.send(Err(Error::local("input", e))).await;
                return;
            }
        };
        if n == 0 {
            return;
        }
        let base = offset;
        let hash = move || {
            let pieces = buf
                .chunks(PIECE_BYTES as usize)
                .enumerate()
                .map(|(i, p)| checksum::piece_cv(base + i as u64 * PIECE_BYTES, p))
                .collect();
            ReadBlock {
                data: Bytes::from(buf),
                pieces,
            }
        };
        // A small block hashes in far less time than a hand-off to a blocking thread takes.
        let hashed = if n as u64 <= HASH_INLINE_BYTES {
            Ok(hash())
        } else {
            tokio::task::spawn_blocking(hash).await
        };
        let block = match hashed {
            Ok(b) => b,
            Err(e) => {
                let _ = tx
                    .send(Err(Error::Invalid(format!("hashing failed: {e}"))))
                    .await;
                return;
            }
        };
        offset += n as u64;
        let full = n as u64 == block_size;
        if tx.send(Ok(block)).await.is_err() || !full {
            return;
        }
    }
}
