//! Operating the cluster: safe mode after a restart, admin control of it, and fsck.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lode_tests::{assert_one_line_error, random_bytes, wait_until, Cluster, ClusterSpec};
use serde_json::Value;

const BLOCK: usize = 64 * 1024;

#[test]
fn safe_mode_holds_writes_until_blocks_are_reported() {
    let mut c = Cluster::start(ClusterSpec {
        datanodes: 2,
        replication: 2,
        ..Default::default()
    });
    let bytes = random_bytes(4 * BLOCK, 8);
    c.put_bytes("/kept", &bytes, &[]);
    c.kill_namenode();
    c.kill_datanode(1);
    c.kill_datanode(2);
    c.start_namenode();
    wait_until("the namenode to answer", Duration::from_secs(10), || {
        c.lode(&["ls", "/"]).status.success()
    });
    let out = String::from_utf8(c.ok(&["admin", "safemode", "get"])).unwrap();
    assert!(out.contains("ON") && out.contains("0 of 4"), "{out}");
    let err = c.fails(&["mkdir", "/during"]);
    assert!(err.contains("safe mode"), "{err}");
    // Block reports arrive: safe mode lifts by itself.
    c.start_datanode(1);
    c.start_datanode(2);
    wait_until("safe mode to lift", Duration::from_secs(20), || {
        c.lode(&["mkdir", "/after"]).status.success()
    });
    assert_eq!(c.get_bytes("/kept"), bytes);
    // An admin can hold writes and release them; a user cannot.
    c.ok(&["admin", "safemode", "enter"]);
    let err = c.fails(&["mkdir", "/held"]);
    assert!(err.contains("safe mode"), "{err}");
    let user = c.dir().join("client-user.toml");
    let out = c.lode_with(&user, &["admin", "safemode", "leave"], None);
    assert_one_line_error(&out, &["safemode leave as user"]);
    let report: Value = c.report().unwrap();
    assert_eq!(report["safemode"], true);
    c.ok(&["admin", "safemode", "leave"]);
    c.ok(&["mkdir", "/released"]);
}

#[test]
fn fsck_reports_healthy_under_replicated_and_missing_blocks() {
    let mut c = Cluster::start(ClusterSpec {
        datanodes: 2,
        replication: 1,
        ..Default::default()
    });
    c.ok(&["mkdir", "/d"]);
    c.put_bytes("/d/one", &random_bytes(3 * BLOCK, 1), &[]);
    c.put_bytes(
        "/d/two",
        &random_bytes(2 * BLOCK, 2),
        &["--replication", "2"],
    );
    wait_until("replicas reported", Duration::from_secs(10), || {
        let v: Value =
            serde_json::from_slice(&c.lode(&["fsck", "--json", "/"]).stdout).unwrap_or(Value::Null);
        v["status"] == "healthy"
    });
    let v: Value = serde_json::from_slice(&c.ok(&["fsck", "--json", "/d"])).unwrap();
    assert_eq!(
        (v["files"].as_u64(), v["blocks"].as_u64()),
        (Some(2), Some(5))
    );
    assert!(v["problems"].as_array().unwrap().is_empty());

    // Kill a datanode: /d/two loses a replica (under-replicated), /d/one may lose blocks (missing).
    let holder = c.stat("/d/one")["blocks"][0]["locations"][0]
        .as_str()
        .unwrap()
        .to_string();
    let i: usize = holder.trim_start_matches("dn-").parse().unwrap();
    c.kill_datanode(i);
    wait_until("fsck to see the loss", Duration::from_secs(20), || {
        let out = c.lode(&["fsck", "--json", "/"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        v["status"] == "missing" && out.status.code() == Some(1)
    });
    let out = c.lode(&["fsck", "--json", "/"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["under_replicated"], 2, "{v}");
    assert!(v["missing"].as_u64().unwrap() >= 1, "{v}");
    let problems = v["problems"].as_array().unwrap();
    assert!(problems.iter().any(|p| p["path"] == "/d/one"
        && p["state"] == "missing"
        && p["locations"].as_array().unwrap().is_empty()));
    assert!(problems
        .iter()
        .any(|p| p["path"] == "/d/two" && p["state"] == "under_replicated"));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim().lines().count(),
        1
    );
    // Only under-replication: exit 0.
    let out = c.lode(&["fsck", "/d/two"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("under_replicated"));
}

#[test]
fn metadata_backup_wipe_restore_and_every_file_reads_back() {
    let mut c = Cluster::start(ClusterSpec {
        datanodes: 2,
        replication: 2,
        ..Default::default()
    });
    c.ok(&["mkdir", "-p", "/b/deep/er"]);
    let files: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| {
            (
                format!("/b/deep/f{i}"),
                random_bytes(i * BLOCK + 99, 70 + i as u64),
            )
        })
        .collect();
    for (p, b) in &files {
        c.put_bytes(p, b, &[]);
    }
    let backup = c.dir().join("meta.backup");
    let out = String::from_utf8(c.ok(&["admin", "backup", backup.to_str().unwrap()])).unwrap();
    assert!(out.contains("wrote"), "{out}");
    // A user may not take one.
    let user = c.dir().join("client-user.toml");
    let out = c.lode_with(
        &user,
        &["admin", "backup", c.dir().join("x").to_str().unwrap()],
        None,
    );
    assert_one_line_error(&out, &["backup as user"]);

    c.kill_namenode();
    std::fs::remove_dir_all(c.dir().join("meta")).unwrap();
    let restore = |extra: &str| {
        std::process::Command::new(lode_tests::bin_dir().join("lode-namenode"))
            .arg("--config")
            .arg(c.dir().join("namenode.toml"))
            .arg("--restore-from")
            .arg(extra)
            .output()
            .unwrap()
    };
    let done = restore(backup.to_str().unwrap());
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    // Restoring over existing metadata is refused.
    let again = restore(backup.to_str().unwrap());
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("empty directory"));

    c.start_namenode();
    c.wait_live(2);
    let ls: Value = serde_json::from_slice(&c.ok(&["ls", "-R", "--json", "/b"])).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 2 + files.len());
    for (p, b) in &files {
        wait_until("replicas reported", Duration::from_secs(10), || {
            c.lode(&["cat", p]).status.success()
        });
        assert_eq!(&c.get_bytes(p), b, "{p}");
    }
    // New changes continue after the restored edits.
    c.put_bytes("/b/after", b"after restore", &[]);
    c.kill_namenode();
    c.start_namenode();
    c.wait_live(2);
    assert_eq!(c.ok(&["cat", "/b/after"]), b"after restore");
}
