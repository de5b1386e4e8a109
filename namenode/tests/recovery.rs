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
