//! The dev-cluster script's contract: `up` starts a namenode and N datanodes with fresh certificates,
//! waits for registration and prints `export LODE_CONFIG=DIR/client.toml`; `status`, `kill-datanode`,
//! `start-datanode`, `kill-namenode`, `start-namenode` and `down` do what they say.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use lode_tests::wait_until;

fn script(dir: &Path, port: u16, args: &[&str]) -> Output {
    Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/dev-cluster.sh"))
        .args(args)
        .args(["--dir", dir.to_str().unwrap()])
        .env("LODE_DEV_PROFILE", "debug")
        // Never rebuild (and relink binaries other tests are running) from inside the test suite.
        .env("LODE_DEV_SKIP_BUILD", "1")
        .env("LODE_DEV_BASE_PORT", port.to_string())
        .output()
        .unwrap()
}

fn lode(config: &str, args: &[&str]) -> Output {
    Command::new(lode_tests::bin_dir().join("lode"))
        .env("LODE_CONFIG", config)
        .args(args)
        .output()
        .unwrap()
}

fn live(config: &str) -> usize {
    let out = lode(config, &["admin", "report", "--json"]);
    if !out.status.success() {
        return 0;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["datanodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["state"] == "live")
        .count()
}

#[test]
fn dev_cluster_script_subcommands() {
    let dir = tempfile::tempdir().unwrap();
    // A base port unlikely to collide with other tests or a developer's own dev cluster.
    let port = 20_000 + (std::process::id() % 20_000) as u16;
    let up = script(dir.path(), port, &["up", "--datanodes", "2"]);
    assert!(
        up.status.success(),
        "up failed: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    let stdout = String::from_utf8(up.stdout).unwrap();
    let config = dir.path().join("client.toml");
    assert!(
        stdout
            .lines()
            .any(|l| l == format!("export LODE_CONFIG={}", config.display())),
        "{stdout}"
    );
    let config = config.to_str().unwrap();
    assert_eq!(live(config), 2);

    let put = Command::new(lode_tests::bin_dir().join("lode"))
        .env("LODE_CONFIG", config)
        .args(["put", "-", "/hello"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(b"hello dev cluster")?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(put.status.success());
    // The audit log is DIR/logs/audit.log.
    wait_until("the put in the audit log", Duration::from_secs(10), || {
        std::fs::read_to_string(dir.path().join("logs/audit.log"))
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains(r#""op":"create""#) && l.contains(r#""path":"/hello""#))
    });

    // Both client configs work at once: the user has /user/user and the sticky /tmp.
    let user = dir.path().join("client-user.toml");
    let user = user.to_str().unwrap();
    let hello = dir.path().join("certs/ca.pem");
    let hello = hello.to_str().unwrap();
    assert!(lode(user, &["put", hello, "/user/user/ca.pem"])
        .status
        .success());
    assert!(lode(user, &["put", hello, "/tmp/ca.pem"]).status.success());
    assert!(!lode(user, &["put", hello, "/elsewhere"]).status.success());
    let root: serde_json::Value =
        serde_json::from_slice(&lode(user, &["ls", "--json", "/"]).stdout).unwrap();
    let modes: Vec<(String, String)> = root
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["path"].as_str().unwrap().into(),
                e["mode"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(modes.contains(&("/tmp".into(), "1777".into())), "{modes:?}");
    // rm moves into the trash of the one removing.
    assert!(lode(user, &["rm", "/user/user/ca.pem"]).status.success());
    assert!(lode(
        user,
        &["stat", "/user/user/.Trash/Current/user/user/ca.pem"]
    )
    .status
    .success());

    let status = script(dir.path(), port, &["status"]);
    let text = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(
        text.contains("namenode: running") && text.contains("dn-2: running"),
        "{text}"
    );

    assert!(script(dir.path(), port, &["kill-datanode", "1"])
        .status
        .success());
    let text = String::from_utf8_lossy(&script(dir.path(), port, &["status"]).stdout).to_string();
    assert!(text.contains("dn-1: stopped"), "{text}");
    assert_eq!(
        lode(config, &["cat", "/hello"]).stdout,
        b"hello dev cluster"
    );
    assert!(script(dir.path(), port, &["start-datanode", "1"])
        .status
        .success());
    wait_until("dn-1 back", Duration::from_secs(30), || live(config) == 2);

    assert!(script(dir.path(), port, &["kill-namenode"])
        .status
        .success());
    assert!(!lode(config, &["ls", "/"]).status.success());
    assert!(script(dir.path(), port, &["start-namenode"])
        .status
        .success());
    wait_until(
        "namenode back with both datanodes",
        Duration::from_secs(30),
        || live(config) == 2,
    );
    assert_eq!(
        lode(config, &["cat", "/hello"]).stdout,
        b"hello dev cluster"
    );

    assert!(script(dir.path(), port, &["down"]).status.success());
    let text = String::from_utf8_lossy(&script(dir.path(), port, &["status"]).stdout).to_string();
    assert!(
        text.contains("namenode: stopped") && text.contains("dn-1: stopped"),
        "{text}"
    );
    // A bad argument is a usage error.
    assert_eq!(
        script(dir.path(), port, &["up", "--datanodes", "zero"])
            .status
            .code(),
        Some(1)
    );
    assert_eq!(
        script(dir.path(), port, &["frobnicate"]).status.code(),
        Some(2)
    );
}

/// `up --namenodes 3` starts a group: the client and datanodes list every member, and the
/// cluster goes on when the leader is killed or frozen (`kill-namenode`, `freeze-namenode` and
/// `thaw-namenode` without a member act on the leader).
#[test]
fn dev_cluster_with_a_namenode_group_survives_a_killed_and_a_frozen_leader() {
    let dir = tempfile::tempdir().unwrap();
    let port = 20_000 + ((std::process::id() + 7_919) % 20_000) as u16;
    let up = script(
        dir.path(),
        port,
        &["up", "--datanodes", "2", "--namenodes", "3"],
    );
    assert!(
        up.status.success(),
        "up failed: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    let config = dir.path().join("client.toml");
    let config = config.to_str().unwrap();
    let text = std::fs::read_to_string(config).unwrap();
    assert!(text.contains("namenodes = ["), "{text}");
    assert_eq!(live(config), 2);
    let data = lode_tests::random_bytes(200_000, 11);
    let local = dir.path().join("data");
    std::fs::write(&local, &data).unwrap();
    let local = local.to_str().unwrap();
    assert!(lode(config, &["put", local, "/a"]).status.success());
    let leader = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("leader: "))
            .map(str::to_string)
            .unwrap_or_default()
    };
    let status = String::from_utf8_lossy(&script(dir.path(), port, &["status"]).stdout).to_string();
    let first = leader(&status);
    assert!(first.starts_with("nn-"), "{status}");

    let killed = script(dir.path(), port, &["kill-namenode"]);
    assert!(killed.status.success());
    assert!(
        String::from_utf8_lossy(&killed.stderr).contains(&format!("{first} killed")),
        "{}",
        String::from_utf8_lossy(&killed.stderr)
    );
    let got = lode(config, &["cat", "/a"]);
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    assert!(got.stdout == data, "/a differs after the leader was killed");
    assert!(lode(config, &["put", local, "/b"]).status.success());
    // Back to three, so that a majority is left when the next leader is frozen. The returning
    // member may be the next leader: it must hear the datanodes' reports first.
    assert!(script(dir.path(), port, &["start-namenode"])
        .status
        .success());
    let i: u16 = first.trim_start_matches("nn-").parse().unwrap();
    let http = if i == 1 { port + 100 } else { port + 160 + i };
    lode_tests::http_get_until(
        &format!("127.0.0.1:{http}"),
        "/metrics",
        "both datanodes live at the returning member",
        Duration::from_secs(30),
        |body| body.contains("lode_namenode_datanodes{kind=\"live\"} 2"),
    );

    let frozen = script(dir.path(), port, &["freeze-namenode"]);
    assert!(
        frozen.status.success(),
        "freeze-namenode: {}",
        String::from_utf8_lossy(&frozen.stderr)
    );
    let out = lode(config, &["mkdir", "/while-frozen"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(script(dir.path(), port, &["thaw-namenode"])
        .status
        .success());
    assert!(script(dir.path(), port, &["start-namenode"])
        .status
        .success());
    let status = String::from_utf8_lossy(&script(dir.path(), port, &["status"]).stdout).to_string();
    for i in 1..=3 {
        assert!(status.contains(&format!("nn-{i}: running")), "{status}");
    }
    let got = lode(config, &["cat", "/b"]);
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    assert!(got.stdout == data, "/b differs after the freeze");
    assert!(script(dir.path(), port, &["down"]).status.success());
}
