//! Durability rules with real processes: block ids never repeat, a stale replica (an old or
//! rewritten one under a block's id) is never counted and is deleted, and crashes at every durable
//! transition (failpoints) lose nothing that was acknowledged.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lode_protocol::checksum::{piece_cv, PIECE_BYTES};
use lode_tests::{random_bytes, wait_until, Cluster, ClusterSpec};

const BLOCK: usize = 64 * 1024;

/// (block id, live locations) of every block of a file.
fn blocks_of(c: &Cluster, remote: &str) -> Vec<(u64, Vec<String>)> {
    c.stat(remote)["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["id"].as_u64().unwrap(),
                b["locations"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|l| l.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}

fn dn_index(name: &str) -> usize {
    name.trim_start_matches("dn-").parse().unwrap()
}

/// Waits until every block of `remote` has exactly `n` listed holders and each holder's replica
/// file holds exactly the block's bytes of `data`.
fn wait_exactly_replicated(c: &Cluster, remote: &str, data: &[u8], n: usize) {
    wait_until(
        &format!("{remote}: every block on exactly {n} good replicas"),
        Duration::from_secs(60),
        || {
            blocks_of(c, remote)
                .iter()
                .enumerate()
                .all(|(i, (id, locs))| {
                    let want = &data[i * BLOCK..((i + 1) * BLOCK).min(data.len())];
                    locs.len() == n
                        && locs.iter().all(|l| {
                            c.replica_path(dn_index(l), *id)
                                .and_then(|p| std::fs::read(p).ok())
                                .is_some_and(|b| b == want)
                        })
                })
        },
    );
}

fn fsck_status(c: &Cluster) -> String {
    let out = c.lode(&["fsck", "--json", "/"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["status"].as_str().unwrap().to_string()
}

/// The scenario that once lost an acknowledged file: replication 2 on three datanodes; `put /t/a`;
/// one holder dies; `rm /t/a`; the namenode restarts; `put /t/b`. The namenode used to hand out
/// /t/a's block id again, count the returning node's stale replica as a holder of /t/b, and delete a
/// good replica as excess, so one more failure lost /t/b.
#[test]
fn ids_never_repeat_and_a_returning_stale_replica_costs_nothing() {
    let mut c = Cluster::start(ClusterSpec {
        datanodes: 3,
        replication: 2,
        ..Default::default()
    });
    c.ok(&["mkdir", "/t"]);
    let a = random_bytes(BLOCK / 2, 1);
    c.put_bytes("/t/a", &a, &[]);
    wait_exactly_replicated(&c, "/t/a", &a, 2);
    let (a_id, a_holders) = blocks_of(&c, "/t/a").remove(0);
    let dead = dn_index(&a_holders[0]);
    c.kill_datanode(dead);
    c.ok(&["rm", "/t/a"]);
    c.kill_namenode();
    c.start_namenode();
    c.wait_live(2);
    let b = random_bytes(BLOCK / 2, 2);
    c.put_bytes("/t/b", &b, &["--replication", "2"]);
    let (b_id, _) = blocks_of(&c, "/t/b").remove(0);
    assert!(
        b_id > a_id,
        "block id {b_id} issued again after a delete and a restart (a's was {a_id})"
    );
    wait_exactly_replicated(&c, "/t/b", &b, 2);
    // The dead datanode returns with /t/a's replica: nobody needs it, so it is deleted.
    c.start_datanode(dead);
    c.wait_live(3);
    wait_until(
        "the returning node's orphan replica deleted",
        Duration::from_secs(30),
        || c.replica_path(dead, a_id).is_none(),
    );
    wait_exactly_replicated(&c, "/t/b", &b, 2);
    assert_eq!(fsck_status(&c), "healthy");
    // Replication 2 promises to survive one more failure.
    let (_, holders) = blocks_of(&c, "/t/b").remove(0);
    c.kill_datanode(dn_index(&holders[0]));
    assert_eq!(c.get_bytes("/t/b"), b);
}

/// Writes a replica of block `id` on datanode `dn` that is valid on its own (data and sidecar
/// agree) but holds other bytes than the committed block: what an old replica under a reused id,
/// or one rewritten behind the namenode's back, looks like.
fn plant_stale_replica(c: &Cluster, dn: usize, id: u64, file_offset: u64, bytes: &[u8]) {
    let dir = c.datanode_dir(dn).join("data1").join("current");
    std::fs::create_dir_all(&dir).unwrap();
    for d in ["data1", "data2"] {
        let other = c.datanode_dir(dn).join(d).join("current");
        let _ = std::fs::remove_file(other.join(format!("blk_{id}")));
        let _ = std::fs::remove_file(other.join(format!("blk_{id}.meta")));
    }
    let mut sidecar = vec![1u8];
    sidecar.extend((bytes.len() as u64).to_le_bytes());
    sidecar.extend(file_offset.to_le_bytes());
    for (i, p) in bytes.chunks(PIECE_BYTES as usize).enumerate() {
        sidecar.extend(piece_cv(file_offset + i as u64 * PIECE_BYTES, p).0);
    }
    std::fs::write(dir.join(format!("blk_{id}")), bytes).unwrap();
    std::fs::write(dir.join(format!("blk_{id}.meta")), sidecar).unwrap();
}

#[test]
fn a_stale_replica_under_a_live_block_id_is_never_counted_and_is_deleted() {
    let mut c = Cluster::start(ClusterSpec {
        datanodes: 3,
        replication: 2,
        ..Default::default()
    });
    let data = random_bytes(2 * BLOCK, 3);
    c.put_bytes("/s", &data, &[]);
    wait_exactly_replicated(&c, "/s", &data, 2);
    let blocks = blocks_of(&c, "/s");
    // A holder of the first block goes down and comes back with other bytes under that block's
    // id, same length, self-consistent sidecar (so its own checks pass).
    let (id, holders) = blocks[0].clone();
    let victim = dn_index(&holders[0]);
    c.kill_datanode(victim);
    let stale = random_bytes(BLOCK, 99);
    plant_stale_replica(&c, victim, id, 0, &stale);
    c.start_datanode(victim);
    c.wait_live(3);
    // It is deleted (or replaced by a good copy), never listed while it holds the wrong bytes.
    wait_until(
        "the stale replica gone from the returning node",
        Duration::from_secs(30),
        || {
            c.replica_path(victim, id)
                .and_then(|p| std::fs::read(p).ok())
                .is_none_or(|b| b != stale)
        },
    );
    wait_exactly_replicated(&c, "/s", &data, 2);
    assert_eq!(fsck_status(&c), "healthy");
    assert_eq!(c.get_bytes("/s"), data);
    let log = std::fs::read_to_string(c.dir().join("namenode.log")).unwrap();
    assert!(
        log.contains("stale replica"),
        "the namenode names the stale replica"
    );
    c.assert_no_unexpected_errors(&[]);
}

/// Namenode failpoints at every durable transition: the group sync, applying a group, the
/// checkpoint and roll, and the backup. At each, the process dies; after a restart every
/// acknowledged change is there and the namespace keeps working.
#[test]
fn namenode_crashes_at_each_durable_transition_lose_nothing_acknowledged() {
    let mut c = Cluster::start(ClusterSpec {
        datanodes: 1,
        replication: 1,
        edit_log_roll_bytes: Some(4096),
        ..Default::default()
    });
    let failpoints = [
        ("namenode.group.before_sync", "5*off->return"),
        ("namenode.group.after_sync", "5*off->return"),
        ("namenode.group.after_apply", "5*off->return"),
        ("namenode.checkpoint.before_write", "return"),
        ("namenode.checkpoint.before_roll", "return"),
        ("namenode.checkpoint.after_roll", "return"),
        ("namenode.backup.before_dump", "return"),
        ("namenode.backup.after_dump", "return"),
    ];
    let mut acknowledged: Vec<String> = vec![];
    for (round, (fp, action)) in failpoints.iter().enumerate() {
        c.kill_namenode();
        c.start_namenode_with_failpoints(&format!("{fp}={action}"));
        c.wait_live(1);
        let file = random_bytes(1000 + round, round as u64);
        let mut crashed = false;
        for i in 0..200 {
            if fp.starts_with("namenode.backup") && i == 3 {
                let out = c.lode(&["admin", "backup", c.dir().join("b.bak").to_str().unwrap()]);
                assert!(!out.status.success(), "{fp}: the backup cannot finish");
            }
            // Deep paths: one request makes many edits, so checkpoints come quickly.
            let dir = format!("/r{round}/{i}/a/b/c/d/e/f/g/h/i/j");
            if !c.lode(&["mkdir", "-p", &dir]).status.success() {
                crashed = true;
                break;
            }
            acknowledged.push(dir.clone());
            let f = format!("/r{round}/{i}/file");
            let local = c.dir().join("up");
            std::fs::write(&local, &file).unwrap();
            if !c
                .lode(&["put", local.to_str().unwrap(), &f])
                .status
                .success()
            {
                crashed = true;
                break;
            }
            acknowledged.push(f);
        }
        assert!(crashed, "{fp} never fired");
        wait_until(
            &format!("{fp}: namenode ended"),
            Duration::from_secs(20),
            || c.namenode_exited(),
        );
        c.start_namenode();
        c.wait_live(1);
        for p in &acknowledged {
            let out = c.lode(&["stat", "--json", p]);
            assert!(
                out.status.success(),
                "{fp}: acknowledged {p} lost: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let last = acknowledged
            .iter()
            .rev()
            .find(|p| p.ends_with("/file"))
            .unwrap();
        let round_of_last: usize = last[2..].split('/').next().unwrap().parse().unwrap();
        assert_eq!(
            c.get_bytes(last),
            random_bytes(1000 + round_of_last, round_of_last as u64)
        );
    }
    assert!(c.dir().join("meta").join("checkpoint").exists());
    // Without failpoints, checkpoints complete and the namespace goes on across them.
    for i in 0..20 {
        let dir = format!("/clean/{i}/a/b/c/d/e/f/g/h/i/j");
        c.ok(&["mkdir", "-p", &dir]);
        acknowledged.push(dir);
    }
    c.kill_namenode();
    c.start_namenode();
    c.wait_live(1);
    for p in &acknowledged {
        c.ok(&["stat", p]);
    }
    let log = std::fs::read_to_string(c.dir().join("namenode.log")).unwrap();
    assert!(log.contains("checkpoint written"), "checkpoints were taken");
}

/// Datanode failpoints around a finished block: before its renames, between the sidecar's and the
/// data's, before and after the directory sync. The put still succeeds on the other nodes; after a
/// restart nothing half-done stays on the crashed node and every block ends on exactly its target.
#[test]
fn datanode_crashes_around_a_finished_block_leave_nothing_behind() {
    let mut c = Cluster::start(ClusterSpec {
        datanodes: 4,
        replication: 3,
        ..Default::default()
    });
    for (round, fp) in [
        "datanode.block.before_rename",
        "datanode.block.between_renames",
        "datanode.block.before_dir_sync",
        "datanode.block.after_dir_sync",
    ]
    .iter()
    .enumerate()
    {
        c.kill_datanode(1);
        c.start_datanode_with_failpoints(1, &format!("{fp}=1*off->return"));
        c.wait_live(4);
        let data = random_bytes(6 * BLOCK + 5, 10 + round as u64);
        let path = format!("/d{round}");
        // dn-1 dies in the middle of this put whenever placement picks it twice.
        c.put_bytes(&path, &data, &[]);
        if c.datanode_exited(1) {
            c.start_datanode(1);
        } else {
            // Placement never sent dn-1 a second block; crash it through another file.
            c.put_bytes(&format!("{path}-more"), &data, &["--replication", "4"]);
            wait_until(
                &format!("{fp}: dn-1 ended"),
                Duration::from_secs(20),
                || c.datanode_exited(1),
            );
            c.start_datanode(1);
        }
        c.wait_live(4);
        wait_exactly_replicated(&c, &path, &data, 3);
        assert_eq!(c.get_bytes(&path), data);
        // Nothing half-done on dn-1: no temp files, no sidecar without data, no data without a sidecar.
        for d in ["data1", "data2"] {
            let root = c.datanode_dir(1).join(d);
            let tmp: Vec<_> = std::fs::read_dir(root.join("tmp"))
                .unwrap()
                .flatten()
                .collect();
            assert!(tmp.is_empty(), "{fp}: leftovers in tmp: {tmp:?}");
            let names: Vec<String> = std::fs::read_dir(root.join("current"))
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect();
            for n in &names {
                let pair = match n.strip_suffix(".meta") {
                    Some(data) => data.to_string(),
                    None => format!("{n}.meta"),
                };
                assert!(names.contains(&pair), "{fp}: {n} without {pair} on dn-1");
            }
        }
    }
    assert_eq!(fsck_status(&c), "healthy");
}
