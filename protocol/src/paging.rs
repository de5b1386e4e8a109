//! Pages: no single message limits the cluster's size. Replies that grow with the namespace (a
//! directory listing, the blocks of a file, fsck's problems) and reports that grow with a datanode
//! (its full block report, the replicas it received or deleted, the replicas it must delete) are
//! cut into pages of at most [`PAGE_BYTES`] of encoded items, far below
//! [`crate::frame::MAX_FRAME_BYTES`].
//!
//! A paged namenode reply is one stream of frames: the usual reply holding the first page, then
//! `ListingMore`, `BlocksMore` or `FsckMore` frames with the rest, then the end of the stream.
//! [`split_reply`] makes the frames and [`join_reply`] puts them back together. A block report is
//! a `Register` holding the first page, then one `ReportMore` request per further page.

use serde::Serialize;

use crate::messages::{DatanodeToNamenode, NamenodeReply, ReportedBlock, Space};

/// Encoded bytes of items in one page at most (a single larger item travels alone).
pub const PAGE_BYTES: usize = 1 << 20;

/// Continuation frames a receiver accepts after the first frame of a reply (a bound on the
/// receiving side: 2^20 pages of at most [`PAGE_BYTES`]).
pub const PAGES_MAX: usize = 1 << 20;

/// Cuts `items` into pages of at most `budget` encoded bytes (at least one item per page); an
/// empty list is one empty page.
pub fn pages<T: Serialize>(mut items: Vec<T>, budget: usize) -> Vec<Vec<T>> {
    let mut out = vec![take_page(&mut items, budget)];
    while !items.is_empty() {
        out.push(take_page(&mut items, budget));
    }
    out
}

/// The first page of `items` (at most `budget` encoded bytes, at least one item), leaving the
/// rest in `items`.
pub fn take_page<T: Serialize>(items: &mut Vec<T>, budget: usize) -> Vec<T> {
    let mut bytes = 0usize;
    let mut n = 0;
    for item in items.iter() {
        let size = postcard::experimental::serialized_size(item).unwrap_or(budget);
        if n > 0 && bytes + size > budget {
            break;
        }
        bytes += size;
        n += 1;
    }
    let rest = items.split_off(n);
    std::mem::replace(items, rest)
}

/// A full block report as the requests that carry it: `Register` with the first page, then a
/// `ReportMore` per further page, `last` set on the final one.
pub fn report_requests(
    addr: String,
    space: Space,
    blocks: Vec<ReportedBlock>,
) -> Vec<DatanodeToNamenode> {
    let pages = pages(blocks, PAGE_BYTES);
    let n = pages.len();
    pages
        .into_iter()
        .enumerate()
        .map(|(i, blocks)| {
            let last = i + 1 == n;
            if i == 0 {
                DatanodeToNamenode::Register {
                    addr: addr.clone(),
                    space,
                    blocks,
                    last,
                }
            } else {
                DatanodeToNamenode::ReportMore { blocks, last }
            }
        })
        .collect()
}

/// Whether `items` fill a page (so the sender likely has more): within 1 KiB of [`PAGE_BYTES`].
pub fn is_full_page<T: Serialize>(items: &[T]) -> bool {
    postcard::experimental::serialized_size(items).unwrap_or(0) + 1024 >= PAGE_BYTES
}

/// The frames of a reply: the reply with its first page, then continuation frames.
pub fn split_reply(reply: NamenodeReply) -> Vec<NamenodeReply> {
    match reply {
        NamenodeReply::Listing(entries) => {
            let mut p = pages(entries, PAGE_BYTES).into_iter();
            let first = NamenodeReply::Listing(p.next().unwrap_or_default());
            std::iter::once(first)
                .chain(p.map(NamenodeReply::ListingMore))
                .collect()
        }
        NamenodeReply::Status(mut status) => {
            let mut p = pages(std::mem::take(&mut status.blocks), PAGE_BYTES).into_iter();
            status.blocks = p.next().unwrap_or_default();
            std::iter::once(NamenodeReply::Status(status))
                .chain(p.map(NamenodeReply::BlocksMore))
                .collect()
        }
        NamenodeReply::Fsck(mut report) => {
            let mut p = pages(std::mem::take(&mut report.problems), PAGE_BYTES).into_iter();
            report.problems = p.next().unwrap_or_default();
            std::iter::once(NamenodeReply::Fsck(report))
                .chain(p.map(NamenodeReply::FsckMore))
                .collect()
        }
        other => vec![other],
    }
}

/// Adds a continuation frame to the reply it continues; an error names a frame that continues
/// nothing (or another kind of reply).
pub fn join_reply(first: &mut NamenodeReply, more: NamenodeReply) -> Result<(), String> {
    match (first, more) {
        (NamenodeReply::Listing(all), NamenodeReply::ListingMore(mut page)) => {
            all.append(&mut page)
        }
        (NamenodeReply::Status(s), NamenodeReply::BlocksMore(mut page)) => {
            s.blocks.append(&mut page)
        }
        (NamenodeReply::Fsck(r), NamenodeReply::FsckMore(mut page)) => r.problems.append(&mut page),
        (_, more) => return Err(format!("unexpected continuation frame {more:?}")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{encode_frame, kind, MAX_FRAME_BYTES};
    use crate::messages::{EntryKind, FileStatus, LocatedBlock, Target};
    use crate::{Blake3Cv, BlockId};

    fn status(blocks: usize) -> FileStatus {
        FileStatus {
            path: "/big".into(),
            kind: EntryKind::File,
            size: blocks as u64 * 65536,
            replication: 7,
            block_size: 65536,
            mtime_ms: 1,
            complete: true,
            owner: "alice".into(),
            group: "staff".into(),
            mode: 0o644,
            blocks: (0..blocks as u64)
                .map(|i| LocatedBlock {
                    id: BlockId(i + 1),
                    offset: i * 65536,
                    len: 65536,
                    cv: Some(Blake3Cv([i as u8; 32])),
                    locations: (1..=7)
                        .map(|d| Target {
                            name: format!("dn-{d}"),
                            addr: format!("10.0.0.{d}:7400"),
                        })
                        .collect(),
                    token: Some(crate::token::BlockToken {
                        grant: crate::token::Grant {
                            block: BlockId(i + 1),
                            ops: crate::token::READ,
                            user: "alice".into(),
                            expires_ms: 1,
                            pipeline: vec![],
                        },
                        key_id: 1,
                        mac: [0; 32],
                    }),
                })
                .collect(),
        }
    }

    fn round_trip(reply: NamenodeReply) -> (usize, NamenodeReply) {
        let frames = split_reply(reply);
        let n = frames.len();
        let mut it = frames.into_iter();
        let mut first = it.next().unwrap();
        for f in it {
            let bytes = encode_frame(kind::NAMENODE_REPLY, &f).unwrap();
            assert!(bytes.len() < MAX_FRAME_BYTES as usize / 2);
            join_reply(&mut first, f).unwrap();
        }
        (n, first)
    }

    #[test]
    fn a_file_of_200k_blocks_travels_in_bounded_frames() {
        let big = status(200_000);
        let (frames, back) = round_trip(NamenodeReply::Status(big.clone()));
        assert!(frames > 10, "{frames} frames");
        assert_eq!(back, NamenodeReply::Status(big));
    }

    #[test]
    fn listings_and_fsck_reports_are_paged_and_small_replies_are_one_frame() {
        let mut entry = status(0);
        entry.blocks.clear();
        let entries: Vec<FileStatus> = (0..100_000)
            .map(|i| FileStatus {
                path: format!("/dir/file-{i:08}"),
                ..entry.clone()
            })
            .collect();
        let (frames, back) = round_trip(NamenodeReply::Listing(entries.clone()));
        assert!(frames > 1);
        assert_eq!(back, NamenodeReply::Listing(entries));
        let (frames, back) = round_trip(NamenodeReply::Listing(vec![]));
        assert_eq!((frames, back), (1, NamenodeReply::Listing(vec![])));
        assert_eq!(split_reply(NamenodeReply::Ok), vec![NamenodeReply::Ok]);
        let mut first = NamenodeReply::Ok;
        assert!(join_reply(&mut first, NamenodeReply::ListingMore(vec![])).is_err());
    }

    #[test]
    fn take_page_leaves_the_rest() {
        let mut items: Vec<u64> = (0..100_000).collect();
        let page = take_page(&mut items, 1000);
        assert!(!page.is_empty() && page.len() < 1000);
        assert_eq!(page.len() + items.len(), 100_000);
        assert_eq!(items[0], page.len() as u64);
        let mut one = vec![vec![0u8; 5000]];
        assert_eq!(
            take_page(&mut one, 10).len(),
            1,
            "a large item travels alone"
        );
        assert!(one.is_empty());
    }
}
