//! Reading a file: get its blocks and their live locations from the namenode, cut them into
//! segments of up to 8 MiB, keep several segments in flight (spread over the replicas), verify every
//! piece against its chaining value, and write the segments out in order. A replica that fails, or
//! whose data fails its check, is reported (if corrupt) and the segment is read from the next one.

use std::time::Duration;

use std::sync::Arc;

use futures::stream::{self, StreamExt};
use lode_protocol::messages::{ClientToNamenode, EntryKind, FileStatus, Target};
use lode_protocol::net::{self, Pool, RangeError, RangeRead, RpcError};
use lode_protocol::{BlockId, ErrorCode};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::error::Error;
use crate::fs::{Client, Suspects};

/// Largest read request; a multiple of the piece size.
const SEGMENT_BYTES: u64 = 8 << 20;
/// A read that makes no progress for this long fails over to another replica.
const STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// One read request: a byte range of one block.
#[derive(Clone, Debug)]
struct Segment {
    block: BlockId,
    block_offset_in_file: u64,
    cv: Option<lode_protocol::Blake3Cv>,
    offset: u64,
    len: u64,
    locations: Vec<Target>,
    token: Option<lode_protocol::token::BlockToken>,
    ordinal: usize,
}

/// What a spawned segment read needs: connections and the shared list of failing datanodes.
#[derive(Clone)]
struct Fetcher {
    pool: Arc<Pool>,
    suspects: Suspects,
}

/// A segment's bytes, and replicas found corrupt on the way (to report to the namenode).
type Fetched = (Vec<u8>, Vec<(BlockId, String)>);

impl Client {
    /// Reads a whole file into `out`. `progress` is told the bytes written so far.
    pub async fn get<W: AsyncWrite + Unpin>(
        &self,
        remote: &str,
        out: &mut W,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<u64, Error> {
        let st = self.stat(remote, true).await?;
        self.get_status(&st, out, progress).await
    }

    /// Reads the file `st` describes (with blocks) into `out`. Each segment is read by its own task,
    /// so verifying and copying spread over the cores while the output is written in order.
    /// A read that outlives its block tokens asks the namenode for new ones and goes on where it
    /// stopped, as long as the file is still the one it was reading.
    pub async fn get_status<W: AsyncWrite + Unpin>(
        &self,
        st: &FileStatus,
        out: &mut W,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<u64, Error> {
        if st.kind == EntryKind::Directory {
            return Err(Error::Invalid(format!("{}: is a directory", st.path)));
        }
        self.get_range(st, 0, st.size, out, progress).await
    }

    /// Reads bytes `[start, end)` of the file `st` describes (with blocks) into `out`, asking for
    /// new block tokens if the read outlives them.
    pub async fn get_range<W: AsyncWrite + Unpin>(
        &self,
        st: &FileStatus,
        start: u64,
        end: u64,
        out: &mut W,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<u64, Error> {
        let end = end.min(st.size);
        let mut current = st.clone();
        let mut written = start.min(end);
        let mut renewals = 0;
        loop {
            match self.read_from(&current, written, end, out, progress).await {
                Ok(n) => return Ok(n - start.min(end)),
                Err((e, at)) if e.code() == Some(ErrorCode::InvalidToken) && renewals < 3 => {
                    renewals += 1;
                    written = at;
                    let fresh = self.stat(&st.path, true).await?;
                    let same = |a: &FileStatus| -> Vec<_> {
                        a.blocks.iter().map(|b| (b.id, b.len, b.cv)).collect()
                    };
                    if same(&fresh) != same(st) {
                        return Err(Error::Invalid(format!(
                            "{}: the file changed while it was read",
                            st.path
                        )));
                    }
                    tracing::info!(path = %st.path, at, "block tokens expired; reading on with new ones");
                    current = fresh;
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// Reads the file's bytes `[skip, end)`; on success the offset reached (`end`), on failure the
    /// error and the offset the output got to.
    async fn read_from<W: AsyncWrite + Unpin>(
        &self,
        st: &FileStatus,
        skip: u64,
        end: u64,
        out: &mut W,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<u64, (Error, u64)> {
        let mut segments = vec![];
        for b in &st.blocks {
            let mut off = 0;
            while off < b.len {
                let len = SEGMENT_BYTES.min(b.len - off);
                let at = b.offset + off;
                if at + len <= skip || at >= end {
                    off += len;
                    continue;
                }
                segments.push(Segment {
                    block: b.id,
                    block_offset_in_file: b.offset,
                    cv: b.cv,
                    offset: off,
                    len,
                    locations: b.locations.clone(),
                    token: b.token.clone(),
                    ordinal: segments.len(),
                });
                off += len;
            }
        }
        let starts: Vec<u64> = segments
            .iter()
            .map(|s| s.block_offset_in_file + s.offset)
            .collect();
        let fetcher = Fetcher {
            pool: self.pool.clone(),
            suspects: self.suspects.clone(),
        };
        let tasks = segments.into_iter().map(|s| {
            let f = fetcher.clone();
            async move {
                tokio::spawn(async move { f.fetch_segment(s).await })
                    .await
                    .map_err(|e| (Error::Invalid(format!("read task failed: {e}")), vec![]))?
            }
        });
        let mut results = stream::iter(tasks).buffered(self.config.reads_in_flight);
        let mut written = skip;
        let mut starts = starts.into_iter();
        while let Some(fetched) = results.next().await {
            let seg_start = starts.next().unwrap_or(written);
            let (bytes, corrupt) = match fetched {
                Ok(f) => f,
                Err((e, corrupt)) => {
                    self.report_corrupt(corrupt).await;
                    return Err((e, written));
                }
            };
            self.report_corrupt(corrupt).await;
            // Only what lies in [skip, end) of the segment goes out.
            let from = written.saturating_sub(seg_start) as usize;
            let to = (end.saturating_sub(seg_start) as usize).min(bytes.len());
            let part = &bytes[from.min(to)..to];
            out.write_all(part)
                .await
                .map_err(|e| (Error::local("output", e), written))?;
            written += part.len() as u64;
            progress(written);
        }
        out.flush()
            .await
            .map_err(|e| (Error::local("output", e), written))?;
        Ok(written)
    }

    async fn report_corrupt(&self, corrupt: Vec<(BlockId, String)>) {
        for (block, datanode) in corrupt {
            tracing::warn!(%block, %datanode, "replica failed its checksum; reporting it");
            let _ = self
                .nn(&ClientToNamenode::ReportBadReplica { block, datanode })
                .await;
        }
    }
}

impl Fetcher {
    async fn fetch_segment(
        &self,
        seg: Segment,
    ) -> Result<Fetched, (Error, Vec<(BlockId, String)>)> {
        let mut corrupt = vec![];
        if seg.locations.is_empty() {
            return Err((
                Error::Invalid(format!("block {} has no live replica", seg.block)),
                corrupt,
            ));
        }
        // Spread segments over replicas; replicas that failed lately go last.
        let n = seg.locations.len();
        let mut order: Vec<&Target> = (0..n)
            .map(|i| &seg.locations[(seg.ordinal + i) % n])
            .collect();
        order.sort_by_key(|t| self.suspects.contains(&t.name));
        let mut last = None;
        let mut refused_tokens = 0;
        for t in order {
            match self.read_segment(t, &seg).await {
                Ok(bytes) => {
                    self.suspects.mark(&t.name, false);
                    return Ok((bytes, corrupt));
                }
                Err(e) => {
                    let is_corrupt = matches!(&e, Error::Corrupt(_))
                        || matches!(&e, Error::Rpc { source: RpcError::Reset(c), .. } if *c == ErrorCode::Corrupt as u64);
                    if e.code() == Some(ErrorCode::InvalidToken) {
                        refused_tokens += 1;
                    } else if is_corrupt {
                        corrupt.push((seg.block, t.name.clone()));
                    } else {
                        tracing::debug!(block = %seg.block, datanode = %t.name, "read failed: {e}");
                        self.suspects.mark(&t.name, true);
                        self.pool.forget(&t.addr, &t.name).await;
                    }
                    last = Some(e);
                }
            }
        }
        if refused_tokens == n {
            // Every replica refused the token (it expired): the caller asks for new ones.
            if let Some(e) = last {
                return Err((e, corrupt));
            }
        }
        let e = Error::Invalid(format!(
            "block {}: no replica could be read ({})",
            seg.block,
            last.map(|e| e.to_string()).unwrap_or_default()
        ));
        Err((e, corrupt))
    }
    async fn read_segment(&self, t: &Target, seg: &Segment) -> Result<Vec<u8>, Error> {
        let ctx = || format!("read block {} from {}", seg.block, t.name);
        let conn = self
            .pool
            .get(&t.addr, &t.name)
            .await
            .map_err(|e| Error::rpc(ctx(), e))?;
        let range = RangeRead {
            block: seg.block,
            block_offset_in_file: seg.block_offset_in_file,
            committed: seg.cv,
            offset: seg.offset,
            len: seg.len,
        };
        match net::read_verified_range(&conn, range, seg.token.as_ref(), STALL_TIMEOUT).await {
            Ok(data) => Ok(data),
            Err(e) if e.is_corrupt() => Err(Error::Corrupt(format!("{}: {e}", ctx()))),
            Err(RangeError::Rpc(e)) => Err(Error::rpc(ctx(), e)),
            Err(e) => Err(Error::rpc(ctx(), RpcError::Stream(e.to_string()))),
        }
    }
}
