//! A file of 200,000 blocks on a real sled store: every block allocation writes a bounded number of
//! bytes (the inode record does not grow with the file, so writing it is linear, not quadratic),
//! the file completes, its status with every block is paged into frames no larger than a page,
//! and a namenode starting on the store rebuilds every block and issues no id twice.

#![allow(clippy::unwrap_used)]

use lode_namenode::perm::Caller;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use lode_namenode::namespace::{IdAlloc, InodeKind, MetaOp, Namespace};
use lode_namenode::state::{State, Timing};
use lode_namenode::store::{Batch, MetaStore, Pairs, SledStore};
use lode_namenode::Error;
use lode_protocol::frame::{encode_frame, kind};
use lode_protocol::messages::{CommittedBlock, NamenodeReply};
use lode_protocol::paging::{self, PAGE_BYTES};
use lode_protocol::{Blake3Cv, SessionId};

const BLOCKS: u64 = 200_000;
const BLOCK_SIZE: u64 = 64 * 1024;

/// sled, counting the bytes of the largest batch applied.
struct Counting {
    inner: SledStore,
    largest_batch: AtomicUsize,
}

impl MetaStore for Counting {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        self.inner.get(key)
    }
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Pairs, Error> {
        self.inner.scan_prefix(prefix)
    }
    fn apply_batch(&self, batch: Batch) -> Result<(), Error> {
        let bytes = batch
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
            .sum();
        self.largest_batch.fetch_max(bytes, Ordering::Relaxed);
        self.inner.apply_batch(batch)
    }
    fn flush(&self) -> Result<(), Error> {
        self.inner.flush()
    }
}

fn cv(i: u64) -> Blake3Cv {
    let mut v = [0u8; 32];
    v[..8].copy_from_slice(&i.to_le_bytes());
    Blake3Cv(v)
}

#[test]
fn a_file_of_200k_blocks_is_written_in_bounded_steps_and_read_back_paged() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Counting {
        inner: SledStore::open(&dir.path().join("sled")).unwrap(),
        largest_batch: AtomicUsize::new(0),
    });
    let ns = Namespace::open(store.clone()).unwrap();
    let mut ids = IdAlloc::recover(&ns, &ns.load_all().unwrap()).unwrap();
    let session = SessionId(9);
    let mut seq = 0;
    let mut run = |op: MetaOp| {
        seq += 1;
        ns.apply(seq, &op).unwrap()
    };
    let create = ns
        .prepare_create(
            &Caller::superuser(),
            "/big",
            false,
            1,
            BLOCK_SIZE,
            0o644,
            session,
            &mut ids,
            1,
        )
        .unwrap();
    let MetaOp::Create { inode, .. } = create else {
        panic!("{create:?}");
    };
    run(create);
    let started = Instant::now();
    let mut previous = None;
    let mut issued = vec![];
    for _ in 0..BLOCKS {
        let op = ns
            .prepare_add_block(inode, session, previous, &mut ids)
            .unwrap();
        let MetaOp::AddBlock { block, .. } = op else {
            panic!("{op:?}");
        };
        run(op);
        issued.push(block);
        previous = Some(CommittedBlock {
            id: block,
            len: BLOCK_SIZE,
            cv: cv(block.0),
        });
    }
    let per_add = store.largest_batch.load(Ordering::Relaxed);
    assert!(
        per_add < 1024,
        "an AddBlock wrote a batch of {per_add} bytes: it grows with the file"
    );
    let complete = ns
        .prepare_complete(inode, session, previous, BLOCKS * BLOCK_SIZE, 2)
        .unwrap();
    let applied = run(complete);
    assert_eq!(applied.completed, issued);
    eprintln!(
        "{BLOCKS} blocks allocated and completed in {:?}",
        started.elapsed()
    );

    // Its status with every block, paged as the server sends it.
    let node = ns.resolve_existing("/big").unwrap();
    let InodeKind::File { block_count, .. } = node.kind else {
        panic!("not a file");
    };
    assert_eq!(block_count, BLOCKS);
    let status = ns.status("/big", &node, true).unwrap();
    assert_eq!(status.size, BLOCKS * BLOCK_SIZE);
    assert_eq!(status.blocks.len() as u64, BLOCKS);
    for (i, b) in (0u64..).zip(&status.blocks) {
        assert_eq!(
            (b.id, b.offset, b.len),
            (issued[i as usize], i * BLOCK_SIZE, BLOCK_SIZE)
        );
        assert_eq!(b.cv, Some(cv(b.id.0)));
    }
    let reply = NamenodeReply::Status(status);
    let pages = paging::split_reply(reply.clone());
    assert!(pages.len() > 5, "{} pages", pages.len());
    let mut joined = None;
    for page in pages {
        let bytes = encode_frame(kind::NAMENODE_REPLY, &page).unwrap().len();
        assert!(bytes <= PAGE_BYTES + 4096, "a page of {bytes} bytes");
        match &mut joined {
            None => joined = Some(page),
            Some(first) => paging::join_reply(first, page).unwrap(),
        }
    }
    assert_eq!(joined, Some(reply));

    // A namenode starting on this store knows every block and issues none of their ids again.
    let stored = ns.load_all().unwrap();
    let timing = Timing {
        stale_after: std::time::Duration::from_secs(3),
        dead_after: std::time::Duration::from_secs(10),
        lease_expiry: std::time::Duration::from_secs(10),
    };
    let state = State::new(timing, &stored, Instant::now());
    assert!(issued.iter().all(|b| state.blocks[b].complete));
    let mut again = IdAlloc::recover(&ns, &stored).unwrap();
    let op = ns
        .prepare_create(
            &Caller::superuser(),
            "/next",
            false,
            1,
            BLOCK_SIZE,
            0o644,
            SessionId(10),
            &mut again,
            3,
        )
        .unwrap();
    run(op.clone());
    let MetaOp::Create { inode: next, .. } = op else {
        panic!("{op:?}");
    };
    let MetaOp::AddBlock { block, .. } = ns
        .prepare_add_block(next, SessionId(10), None, &mut again)
        .unwrap()
    else {
        panic!("not an AddBlock");
    };
    assert!(block > *issued.last().unwrap(), "{block} issued again");

    // Deleting it frees every block, and leaves no block key behind.
    let freed = run(ns
        .prepare_delete(&Caller::superuser(), "/big", false)
        .unwrap())
    .freed;
    assert_eq!(freed.len() as u64, BLOCKS);
    assert!(ns.blocks(inode).unwrap().is_empty());
}
