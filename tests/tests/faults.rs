//! Faults with real processes: datanodes killed before and during writes, the namenode killed right
//! after acknowledging, concurrent writers, and single-writer leases.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use lode_tests::{random_bytes, wait_until, Cluster, ClusterSpec};

const BLOCK: usize = 64 * 1024;

fn live_locations_ok(c: &Cluster, remote: &str, min: usize) -> bool {
    c.stat(remote)["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|b| b["locations"].as_array().unwrap().len() >= min)
}

#[test]
fn every_file_reads_back_after_a_datanode_is_killed() {
    let mut c = Cluster::start(ClusterSpec {
        datanodes: 3,
        replication: 2,
        ..Default::default()
    });
    let files: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| {
            (
                format!("/f{i}"),
                random_bytes(3 * BLOCK + i * 1000 + 1, i as u64),
            )
        })
        .collect();
    for (p, b) in &files {
        c.put_bytes(p, b, &[]);
    }
    for (p, _) in &files {
        wait_until("replicas reported", Duration::from_secs(10), || {
            live_locations_ok(&c, p, 2)
        });
    }
    c.kill_datanode(2);
    // Right away (dn-2 still counts as live at the namenode) and in one process: reads fail over.
    let all: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
    let mut args = vec!["cat"];
    args.extend(&all);
    let expected: Vec<u8> = files.iter().flat_map(|(_, b)| b.clone()).collect();
    assert_eq!(c.ok(&args), expected);
    // And each file on its own, with its checksum.
    for (p, b) in &files {
        assert_eq!(&c.get_bytes(p), b, "{p}");
        let sum = String::from_utf8(c.ok(&["checksum", p])).unwrap();
        assert!(sum.starts_with(blake3::hash(b).to_hex().as_str()));
    }
}

#[test]
fn a_put_survives_a_datanode_killed_in_the_middle() {
    let mut c = Cluster::start(ClusterSpec {
        datanodes: 3,
        replication: 3,
        ..Default::default()
    });
    let bytes = random_bytes(48 * BLOCK + 99, 42);
    let mut child = Command::new(lode_tests::bin_dir().join("lode"))
        .args([
            "--config",
            c.client_config().to_str().unwrap(),
            "put",
            "-",
            "/mid",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&bytes[..16 * BLOCK]).unwrap();
    stdin.flush().unwrap();
    // Wait until the put has committed blocks, i.e. it is really in the middle of the file.
    wait_until("the put to be under way", Duration::from_secs(20), || {
        let out = c.lode(&["stat", "--json", "--blocks", "/mid"]);
        out.status.success()
            && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .map(|v| v["blocks"].as_array().map_or(0, |b| b.len()) >= 4)
                .unwrap_or(false)
    });
    c.kill_datanode(1);
    // If the put gave up, its stdin is closed; the assertion below shows why.
    let _ = stdin.write_all(&bytes[16 * BLOCK..]);
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "put failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(c.get_bytes("/mid"), bytes);
    // Every block is on at least two live datanodes, none of them the dead one.
    wait_until("reports", Duration::from_secs(10), || {
        live_locations_ok(&c, "/mid", 2)
    });
    let sum = String::from_utf8(c.ok(&["checksum", "/mid"])).unwrap();
    assert!(sum.starts_with(blake3::hash(&bytes).to_hex().as_str()));
}

#[test]
fn acknowledged_writes_survive_a_namenode_kill() {
    let mut c = Cluster::start(ClusterSpec {
        datanodes: 3,
        replication: 2,
        ..Default::default()
    });
    let bytes = random_bytes(5 * BLOCK + 3, 9);
    c.ok(&["mkdir", "-p", "/keep/dir"]);
    c.put_bytes("/keep/dir/file", &bytes, &[]);
    c.ok(&["mv", "/keep/dir/file", "/keep/moved"]);
    c.kill_namenode();
    c.start_namenode();
    c.wait_live(3);
    let ls: serde_json::Value = serde_json::from_slice(&c.ok(&["ls", "--json", "/keep"])).unwrap();
    let names: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["/keep/dir", "/keep/moved"]);
    wait_until(
        "block reports after restart",
        Duration::from_secs(10),
        || live_locations_ok(&c, "/keep/moved", 2),
    );
    assert_eq!(c.get_bytes("/keep/moved"), bytes);
    // New files get fresh block ids after recovery (no reuse of ids from the replayed log).
    c.put_bytes("/keep/second", &bytes, &[]);
    let a: Vec<u64> = c.stat("/keep/moved")["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_u64().unwrap())
        .collect();
    let b: Vec<u64> = c.stat("/keep/second")["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_u64().unwrap())
        .collect();
    assert!(a.iter().all(|id| !b.contains(id)));
    assert_eq!(c.get_bytes("/keep/moved"), bytes);
}

#[test]
fn many_concurrent_changes_survive_a_namenode_kill_across_edit_log_rolls() {
    let mut c = Cluster::start(ClusterSpec {
        datanodes: 1,
        replication: 1,
        // A tiny segment, so the log rolls several times during the test.
        edit_log_roll_bytes: Some(4096),
        ..Default::default()
    });
    let files: Vec<Vec<u8>> = (0..4)
        .map(|i| random_bytes(40 * BLOCK + i * 77, 90 + i as u64))
        .collect();
    std::thread::scope(|s| {
        for (t, file) in files.iter().enumerate() {
            let c = &c;
            s.spawn(move || {
                for i in 0..15 {
                    c.ok(&["mkdir", "-p", &format!("/m/t{t}/d{i}")]);
                }
                c.put_bytes(&format!("/m/f{t}"), file, &[]);
            });
        }
    });
    // At least two rolls: the first segment is gone, its changes live only in the metadata store.
    let status = c.report().unwrap()["namenode"]["http_addr"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, metrics) = lode_tests::http_get(&status, "/metrics").unwrap();
    let rolls: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("lode_namenode_editlog_rolls_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("editlog_rolls metric");
    assert!(rolls >= 2.0, "the edit log rolled {rolls} times");
    let meta = c.dir().join("meta");
    let segment = std::fs::metadata(meta.join("edits.log")).unwrap().len();
    assert!(
        meta.join("edits.log.1").exists(),
        "the edit log rolled at least once"
    );
    assert!(
        segment < 4096 + 4096,
        "the current segment stays near the roll size, is {segment} bytes"
    );
    c.kill_namenode();
    c.start_namenode();
    c.wait_live(1);
    let ls: serde_json::Value =
        serde_json::from_slice(&c.ok(&["ls", "-R", "--json", "/m"])).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 4 + 60 + 4);
    for (t, file) in files.iter().enumerate() {
        assert_eq!(&c.get_bytes(&format!("/m/f{t}")), file);
    }
    // Numbering goes on after the restart: new changes land and survive another kill.
    c.ok(&["mkdir", "/m/after"]);
    c.kill_namenode();
    c.start_namenode();
    c.wait_live(1);
    c.ok(&["stat", "/m/after"]);
}

#[test]
fn concurrent_writers_and_single_writer_leases() {
    let c = Cluster::start(ClusterSpec {
        datanodes: 3,
        replication: 2,
        lease_expiry_ms: 2000,
        ..Default::default()
    });
    // Several clients putting different files at once.
    let files: Vec<Vec<u8>> = (0..4)
        .map(|i| random_bytes(7 * BLOCK + i * 333, 50 + i as u64))
        .collect();
    std::thread::scope(|s| {
        for (i, b) in files.iter().enumerate() {
            let c = &c;
            s.spawn(move || c.put_bytes(&format!("/c{i}"), b, &[]));
        }
    });
    for (i, b) in files.iter().enumerate() {
        assert_eq!(&c.get_bytes(&format!("/c{i}")), b);
    }

    // A writer holds /locked open; a second writer is refused with a clear error.
    let mut first = Command::new(lode_tests::bin_dir().join("lode"))
        .args([
            "--config",
            c.client_config().to_str().unwrap(),
            "put",
            "-",
            "/locked",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = first.stdin.take().unwrap();
    stdin.write_all(&random_bytes(BLOCK / 2, 1)).unwrap();
    wait_until("/locked to exist", Duration::from_secs(10), || {
        c.lode(&["stat", "/locked"]).status.success()
    });
    let local = c.dir().join("second-writer");
    std::fs::write(&local, b"second").unwrap();
    let err = c.fails(&["put", "-f", local.to_str().unwrap(), "/locked"]);
    assert!(
        err.contains("/locked") && err.contains("another client"),
        "{err}"
    );
    // The live writer renews its lease: past the 2 s expiry it still holds the file.
    std::thread::sleep(Duration::from_millis(3000));
    let err = c.fails(&["put", "-f", local.to_str().unwrap(), "/locked"]);
    assert!(err.contains("another client"), "{err}");

    // The first writer dies without closing: its lease expires and the path is free again.
    first.kill().unwrap();
    first.wait().unwrap();
    drop(stdin);
    wait_until(
        "the dead writer's lease to expire",
        Duration::from_secs(20),
        || {
            c.lode(&["put", "-f", local.to_str().unwrap(), "/locked"])
                .status
                .success()
        },
    );
    assert_eq!(c.ok(&["cat", "/locked"]), b"second");
}

#[test]
fn a_failed_overwrite_keeps_the_old_file() {
    let c = Cluster::start(ClusterSpec {
        datanodes: 2,
        replication: 2,
        lease_expiry_ms: 2000,
        ..Default::default()
    });
    let old = random_bytes(3 * BLOCK + 5, 77);
    c.put_bytes("/doc", &old, &[]);
    let mut writer = Command::new(lode_tests::bin_dir().join("lode"))
        .args([
            "--config",
            c.client_config().to_str().unwrap(),
            "put",
            "-f",
            "-",
            "/doc",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = writer.stdin.take().unwrap();
    stdin.write_all(&random_bytes(2 * BLOCK, 78)).unwrap();
    stdin.flush().unwrap();
    wait_until(
        "the overwrite to be under way",
        Duration::from_secs(10),
        || c.lode(&["stat", "/.doc.lode-replacing"]).status.success(),
    );
    // While the new version is written, readers see the old one.
    assert_eq!(c.get_bytes("/doc"), old);
    writer.kill().unwrap();
    writer.wait().unwrap();
    drop(stdin);
    wait_until(
        "the dead writer's file to be removed",
        Duration::from_secs(20),
        || !c.lode(&["stat", "/.doc.lode-replacing"]).status.success(),
    );
    assert_eq!(c.get_bytes("/doc"), old);
    // A successful overwrite replaces it.
    let new = random_bytes(BLOCK + 1, 79);
    c.put_bytes("/doc", &new, &["-f"]);
    assert_eq!(c.get_bytes("/doc"), new);
    let ls: serde_json::Value = serde_json::from_slice(&c.ok(&["ls", "--json", "/"])).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 1, "{ls}");
}

#[test]
fn corrupt_replicas_are_never_returned() {
    let c = Cluster::start(ClusterSpec {
        datanodes: 2,
        replication: 2,
        ..Default::default()
    });
    let bytes = random_bytes(2 * BLOCK, 11);
    c.put_bytes("/precious", &bytes, &[]);
    wait_until("both replicas reported", Duration::from_secs(10), || {
        live_locations_ok(&c, "/precious", 2)
    });
    // Each block here is one read segment, and segment i starts on location i % 2 of its block:
    // corrupt exactly the replicas the client will try first.
    let st = c.stat("/precious");
    let first_try = |i: usize| -> (u64, usize) {
        let b = &st["blocks"][i];
        let loc = b["locations"][i % 2].as_str().unwrap();
        (
            b["id"].as_u64().unwrap(),
            loc.trim_start_matches("dn-").parse().unwrap(),
        )
    };
    let (b0, dn0) = first_try(0);
    let (b1, dn1) = first_try(1);

    // Block 0: flip a byte in the data file (the datanode's own check catches it).
    let data = c.replica_path(dn0, b0).expect("replica of block 0");
    let mut d = std::fs::read(&data).unwrap();
    d[1000] ^= 0x40;
    std::fs::write(&data, &d).unwrap();

    // Block 1: flip a byte *and* rewrite the sidecar to match, as a lying or buggy datanode
    // would; only the client's end-to-end check against the committed block value catches this.
    let data = c.replica_path(dn1, b1).expect("replica of block 1");
    let meta = data.with_extension("meta");
    let mut d = std::fs::read(&data).unwrap();
    d[5] ^= 0x01;
    std::fs::write(&data, &d).unwrap();
    let mut m = std::fs::read(&meta).unwrap();
    let cv = lode_protocol::checksum::piece_cv(BLOCK as u64, &d[..]);
    m[17..49].copy_from_slice(&cv.0);
    std::fs::write(&meta, &m).unwrap();

    assert_eq!(c.get_bytes("/precious"), bytes);
    // The bad replicas were reported: every replica still offered holds the right bytes (the
    // corrupt ones were deleted, and re-replication may have copied good ones back).
    wait_until(
        "only good replicas offered",
        Duration::from_secs(20),
        || {
            let st = c.stat("/precious");
            [(0usize, b0), (1, b1)].iter().all(|(i, id)| {
                let want = &bytes[i * BLOCK..(i + 1) * BLOCK];
                st["blocks"][*i]["locations"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|l| {
                        let dn: usize = l
                            .as_str()
                            .unwrap()
                            .trim_start_matches("dn-")
                            .parse()
                            .unwrap();
                        c.replica_path(dn, *id)
                            .is_some_and(|data| std::fs::read(data).is_ok_and(|d| d == want))
                    })
            })
        },
    );
    assert_eq!(c.get_bytes("/precious"), bytes);
    c.assert_no_unexpected_errors(&["failed its hash check", "the replica is not served"]);
}

#[test]
fn a_restarted_datanode_rejoins_and_drops_replicas_deleted_while_it_was_down() {
    let mut c = Cluster::start(ClusterSpec {
        datanodes: 2,
        replication: 2,
        ..Default::default()
    });
    let keep = random_bytes(3 * BLOCK, 21);
    let gone = random_bytes(3 * BLOCK, 22);
    c.put_bytes("/keep", &keep, &[]);
    c.put_bytes("/gone", &gone, &[]);
    wait_until("replicas reported", Duration::from_secs(10), || {
        live_locations_ok(&c, "/keep", 2) && live_locations_ok(&c, "/gone", 2)
    });
    let gone_ids: Vec<u64> = c.stat("/gone")["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_u64().unwrap())
        .collect();
    c.kill_datanode(1);
    c.ok(&["rm", "/gone"]);
    c.start_datanode(1);
    // It re-registers with a full report; the namenode tells it to drop what no file owns.
    wait_until(
        "deleted replicas removed from the restarted datanode",
        Duration::from_secs(20),
        || gone_ids.iter().all(|id| c.replica_path(1, *id).is_none()),
    );
    wait_until("dn-1 serving /keep again", Duration::from_secs(20), || {
        live_locations_ok(&c, "/keep", 2)
    });
    c.kill_datanode(2);
    assert_eq!(c.get_bytes("/keep"), keep);
}

/// The datanodes' receipts commit a write on their own: with every heartbeat lost after the
/// datanodes registered, a put of several blocks still completes (without receipts its commits
/// would wait for replica reports that never come, and fail after 20 s), and the file reads back
/// from the replicas the receipts named.
#[test]
fn a_put_commits_on_receipts_while_every_heartbeat_is_lost() {
    let c = Cluster::start(ClusterSpec {
        datanodes: 2,
        replication: 2,
        // Heartbeats never arrive, so the datanodes must stay live on their registration alone.
        liveness_ms: Some((120_000, 240_000)),
        datanode_failpoints: Some("datanode.heartbeat.lose_request=return".into()),
        ..Default::default()
    });
    c.wait_live(2);
    let data = random_bytes(3 * 65536 + 5, 21);
    c.put_bytes("/on-receipts", &data, &[]);
    let st = c.stat("/on-receipts");
    assert_eq!(st["complete"], true, "{st}");
    assert_eq!(c.get_bytes("/on-receipts"), data);
    let report = c.report().unwrap();
    let nn = report["namenode"]["http_addr"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, metrics) = lode_tests::http_get(&nn, "/metrics").unwrap();
    assert!(
        metrics.contains("lode_namenode_replica_receipts_total{kind=\"accepted\"} 8"),
        "four blocks, two receipts each: {metrics}"
    );
    assert!(
        !metrics.contains("lode_namenode_requests_total{kind=\"Heartbeat\"}"),
        "no heartbeat reached the namenode: {metrics}"
    );
}
