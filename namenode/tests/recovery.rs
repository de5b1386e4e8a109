//! Recovery refuses to guess: a metadata store missing edits that no log segment or checkpoint
//! holds is an error; one that lost writes is rebuilt from the checkpoint and the log; damage in the
//! middle of the log is an error naming its offset; ids are never issued twice across restarts.

#![allow(clippy::unwrap_used)]

use lode_namenode::perm::Caller;
use std::path::Path;

use lode_namenode::editlog::{EditLog, Journal};
use lode_namenode::namespace::MetaOp;
use lode_namenode::store::MetaStore;
use lode_namenode::{backup, recover, Error};

/// Makes `n` directories /d0../dn-1 through the log and the store, as the writer would.
fn mkdirs(meta: &Path, from: usize, n: usize, checkpoint_after: Option<usize>) {
    let (ns, mut log, mut ids, _) = recover(meta).unwrap();
    for i in from..from + n {
        let ops = ns
            .prepare_mkdir(
                &Caller::superuser(),
                &format!("/d{i}"),
                false,
                0o755,
                &mut ids,
                1,
            )
            .unwrap();
        for op in ops {
            let seq = log.append(&op).unwrap();
            log.sync().unwrap();
            ns.apply(seq, &op).unwrap();
        }
        if checkpoint_after == Some(i) {
            ns.store().flush().unwrap();
            let snap = backup::dump(ns.store(), log.last_seq()).unwrap();
            Journal::checkpoint(&mut log, &snap).unwrap();
        }
    }
    ns.store().flush().unwrap();
}

fn dirs(meta: &Path) -> Vec<String> {
    let (ns, _, _, _) = recover(meta).unwrap();
    ns.children(lode_namenode::namespace::ROOT)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect()
}

#[test]
fn a_store_that_lost_its_writes_is_rebuilt_from_the_checkpoint_and_the_log() {
    let meta = tempfile::tempdir().unwrap();
    // A checkpoint after d4, then a roll, then d5..d9 in the new segment.
    mkdirs(meta.path(), 0, 10, Some(4));
    assert!(meta.path().join("checkpoint").exists());
    // The store loses everything (its flushes were not power-loss barriers).
    std::fs::remove_dir_all(meta.path().join("sled")).unwrap();
    let mut names = dirs(meta.path());
    names.sort();
    let mut want: Vec<String> = (0..10).map(|i| format!("d{i}")).collect();
    want.sort();
    assert_eq!(names, want);
}

#[test]
fn a_gap_between_the_store_and_the_log_is_an_error_not_a_silent_replay() {
    let meta = tempfile::tempdir().unwrap();
    mkdirs(meta.path(), 0, 3, None);
    // Roll twice without any checkpoint: edits 1..=3 leave the log, the store is then wiped.
    let (mut log, _) = EditLog::open(meta.path()).unwrap();
    log.roll().unwrap();
    log.append(&MetaOp::SetDecommission {
        datanode: "dn-9".into(),
        on: true,
    })
    .unwrap();
    log.roll().unwrap();
    drop(log);
    std::fs::remove_dir_all(meta.path().join("sled")).unwrap();
    match recover(meta.path()) {
        Err(Error::Corrupt(m)) => assert!(m.contains("starts at edit 4"), "{m}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a gap was replayed silently"),
    }
}

#[test]
fn damage_in_the_middle_of_the_log_is_an_error_naming_its_offset() {
    let meta = tempfile::tempdir().unwrap();
    mkdirs(meta.path(), 0, 5, None);
    let log = meta.path().join("edits.log");
    let mut bytes = std::fs::read(&log).unwrap();
    // Flip a byte inside the second record's body.
    let first_len = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize + 16;
    bytes[first_len + 20] ^= 0x40;
    std::fs::write(&log, &bytes).unwrap();
    std::fs::remove_dir_all(meta.path().join("sled")).unwrap();
    match recover(meta.path()) {
        Err(Error::Corrupt(m)) => {
            assert!(m.contains(&format!("at offset {first_len}")), "{m}");
            assert!(m.contains("intact edits follow"), "{m}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("acknowledged edits after the damage were dropped"),
    }
    // Only a torn tail is cut: the same flip in the last record drops just that record.
    let meta2 = tempfile::tempdir().unwrap();
    mkdirs(meta2.path(), 0, 5, None);
    let log2 = meta2.path().join("edits.log");
    let mut bytes = std::fs::read(&log2).unwrap();
    let n = bytes.len();
    bytes[n - 2] ^= 0x40;
    std::fs::write(&log2, &bytes).unwrap();
    std::fs::remove_dir_all(meta2.path().join("sled")).unwrap();
    assert_eq!(dirs(meta2.path()).len(), 4);
}

#[test]
fn ids_are_durable_across_deletes_and_restarts() {
    let meta = tempfile::tempdir().unwrap();
    mkdirs(meta.path(), 0, 3, None);
    let top = {
        let (ns, mut log, mut ids, _) = recover(meta.path()).unwrap();
        // Delete the newest directory: its id must not come back.
        let op = ns
            .prepare_delete(&Caller::superuser(), "/d2", false)
            .unwrap();
        let seq = log.append(&op).unwrap();
        log.sync().unwrap();
        ns.apply(seq, &op).unwrap();
        ns.store().flush().unwrap();
        let probe = ns
            .prepare_mkdir(&Caller::superuser(), "/probe", false, 0o755, &mut ids, 1)
            .unwrap();
        match &probe[0] {
            MetaOp::Mkdir { inode, .. } => inode.0,
            _ => unreachable!(),
        }
    };
    for wipe_store in [false, true] {
        if wipe_store {
            // Even replayed from the log alone, the counters come back.
            std::fs::remove_dir_all(meta.path().join("sled")).unwrap();
        }
        let (ns, _, mut ids, _) = recover(meta.path()).unwrap();
        let again = ns
            .prepare_mkdir(&Caller::superuser(), "/again", false, 0o755, &mut ids, 1)
            .unwrap();
        let MetaOp::Mkdir { inode, .. } = &again[0] else {
            unreachable!()
        };
        assert!(
            inode.0 >= top,
            "inode {} issued again (wipe_store={wipe_store})",
            inode.0
        );
    }
}

/// A metadata dir written before owners existed: inode records of format 2 and edits of edit
/// format 1 in the log. It opens, replays, and everything in it is the superuser's, 0755 for
/// directories and 0644 for files; a user can read it but not change it.
#[test]
fn a_metadata_dir_from_before_owners_opens_and_replays_as_the_superusers() {
    use lode_namenode::namespace::{InodeKind, ROOT};
    use lode_protocol::InodeId;
    use std::io::Write;

    #[derive(serde::Serialize)]
    struct InodeV2 {
        id: InodeId,
        parent: InodeId,
        name: String,
        mtime_ms: u64,
        kind: InodeKind,
    }
    #[derive(serde::Serialize)]
    struct MkdirV1 {
        parent: InodeId,
        name: String,
        inode: InodeId,
        mtime_ms: u64,
    }
    let meta = tempfile::tempdir().unwrap();
    mkdirs(meta.path(), 0, 1, None);
    // An inode of format 2 in the store, as the store of that time had it.
    {
        let (ns, _, _, _) = recover(meta.path()).unwrap();
        let old = InodeV2 {
            id: InodeId(1000),
            parent: ROOT,
            name: "legacy".into(),
            mtime_ms: 5,
            kind: InodeKind::File {
                replication: 1,
                block_size: 65536,
                size: 0,
                block_count: 0,
                writer: None,
                target_name: None,
            },
        };
        let mut value = vec![2u8];
        value.extend(postcard::to_stdvec(&old).unwrap());
        let mut inode_key = vec![b'i'];
        inode_key.extend_from_slice(&1000u64.to_be_bytes());
        let mut dirent = vec![b'd'];
        dirent.extend_from_slice(&ROOT.0.to_be_bytes());
        dirent.extend_from_slice(b"legacy");
        ns.store()
            .apply_batch(vec![
                (inode_key, Some(value)),
                (dirent, Some(1000u64.to_be_bytes().to_vec())),
            ])
            .unwrap();
        ns.store().flush().unwrap();
    }
    // An edit of format 1 at the end of the log, not yet in the store: replayed at the next start.
    let mut body = vec![1u8, 0u8];
    body.extend(
        postcard::to_stdvec(&MkdirV1 {
            parent: ROOT,
            name: "old".into(),
            inode: InodeId(1001),
            mtime_ms: 6,
        })
        .unwrap(),
    );
    let seq = 2u64;
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(&body);
    let mut rec = vec![];
    rec.extend_from_slice(&(body.len() as u32).to_le_bytes());
    rec.extend_from_slice(&h.finalize().to_le_bytes());
    rec.extend_from_slice(&seq.to_le_bytes());
    rec.extend_from_slice(&body);
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(meta.path().join("edits.log"))
        .unwrap();
    log.write_all(&rec).unwrap();
    log.sync_all().unwrap();
    drop(log);

    let (ns, log, mut ids, _) = recover(meta.path()).unwrap();
    assert_eq!(log.last_seq(), 2);
    let old = ns.resolve_existing("/old").unwrap();
    let legacy = ns.resolve_existing("/legacy").unwrap();
    let new = ns.resolve_existing("/d0").unwrap();
    assert_eq!(
        (
            old.perm.owner.as_str(),
            old.perm.group.as_str(),
            old.perm.mode
        ),
        ("admin", "supergroup", 0o755)
    );
    assert_eq!(
        (legacy.perm.owner.as_str(), legacy.perm.mode),
        ("admin", 0o644)
    );
    assert_eq!(new.perm.owner, "admin");
    let alice = lode_namenode::perm::Groups::default().caller("alice", false);
    assert!(ns
        .accessible(&alice, "/legacy", lode_protocol::perm::READ)
        .is_ok());
    let e = ns
        .prepare_mkdir(&alice, "/old/mine", false, 0o755, &mut ids, 7)
        .unwrap_err();
    assert!(e.to_string().contains("permission denied"), "{e}");
}
