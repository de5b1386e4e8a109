//! The container deployment: the image built from the project's binaries alone by
//! deploy/container/build-image.sh, and the compose cluster of deploy/container/compose.yaml (a
//! namenode and three datanodes on a private network, the CLI in a tools container). Every
//! service runs as the unprivileged user `lode`, mounts only its own key, and datanodes run
//! plugins as `lode-plugin`, with the full sandbox: the hostile plugin is tried here too. Runs
//! where a Docker engine and compose are present; says so and passes where they are not.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use lode_tests::{bin_dir, free_tcp_port, random_bytes, wait_until};
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `docker compose` (v2) or `docker-compose` (v1), when a Docker engine answers.
fn compose_command() -> Option<Vec<String>> {
    if !succeeds(Command::new("docker").arg("info")) {
        return None;
    }
    if succeeds(Command::new("docker").args(["compose", "version"])) {
        return Some(vec!["docker".into(), "compose".into()]);
    }
    if succeeds(Command::new("docker-compose").arg("version")) {
        return Some(vec!["docker-compose".into()]);
    }
    None
}

/// The image's service user and plugin user (deploy/container/rootfs-tar.py).
const LODE_UID: u32 = 10001;
const PLUGIN_UID: u32 = 10002;

const SERVICES: [&str; 4] = ["namenode", "dn-1", "dn-2", "dn-3"];

/// A compose project of this test's own; taken down with its volumes and image on drop.
struct ComposeCluster {
    compose: Vec<String>,
    project: String,
    image: String,
    /// The cluster dir (init-cluster.sh) and the tools container's work dir.
    dir: tempfile::TempDir,
    work: tempfile::TempDir,
    http_port: u16,
}

impl ComposeCluster {
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.compose[0]);
        cmd.args(&self.compose[1..])
            .arg("-f")
            .arg(repo().join("deploy/container/compose.yaml"))
            .args(["-p", &self.project])
            .env("LODE_IMAGE", &self.image)
            .env("LODE_CLUSTER_DIR", self.dir.path())
            .env("LODE_WORK_DIR", self.work.path())
            .env("LODE_HTTP_PORT", self.http_port.to_string());
        cmd
    }

    fn compose(&self, args: &[&str]) {
        let out = self.command().args(args).output().expect("run compose");
        assert!(
            out.status.success(),
            "compose {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The `lode` CLI (as admin) in a one-off tools container, with optional stdin.
    fn lode(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut child = self
            .command()
            .args(["run", "--rm", "-T", "tools"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("compose exec");
        let mut input = child.stdin.take().expect("stdin");
        if let Some(bytes) = stdin {
            input.write_all(bytes).expect("write stdin");
        }
        drop(input);
        child.wait_with_output().expect("compose exec output")
    }

    fn json(&self, args: &[&str]) -> Option<Value> {
        let out = self.lode(args, None);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    fn live(&self) -> Vec<String> {
        self.json(&["admin", "report", "--json"])
            .and_then(|r| {
                r["datanodes"].as_array().map(|a| {
                    a.iter()
                        .filter(|d| d["state"] == "live")
                        .filter_map(|d| d["name"].as_str().map(String::from))
                        .collect()
                })
            })
            .unwrap_or_default()
    }

    /// Each block's locations.
    fn locations(&self, path: &str) -> Vec<Vec<String>> {
        self.json(&["stat", "--json", "--blocks", path])
            .and_then(|s| {
                s["blocks"].as_array().map(|bs| {
                    bs.iter()
                        .map(|b| {
                            b["locations"]
                                .as_array()
                                .map(|l| {
                                    l.iter()
                                        .filter_map(|n| n.as_str().map(String::from))
                                        .collect()
                                })
                                .unwrap_or_default()
                        })
                        .collect()
                })
            })
            .unwrap_or_default()
    }
}

impl ComposeCluster {
    /// The host pid of a service's own process (the child of the container's init).
    fn service_pid(&self, service: &str) -> u32 {
        let id = self.command().args(["ps", "-q", service]).output().unwrap();
        let id = String::from_utf8_lossy(&id.stdout).trim().to_string();
        let init = Command::new("docker")
            .args(["inspect", "-f", "{{.State.Pid}}", &id])
            .output()
            .unwrap();
        let init: u32 = String::from_utf8_lossy(&init.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{service}: no running container"));
        let children = std::fs::read_to_string(format!("/proc/{init}/task/{init}/children"))
            .expect("children of the container's init");
        let pids: Vec<u32> = children
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        assert_eq!(pids.len(), 1, "{service}: one process under init: {pids:?}");
        pids[0]
    }

    /// Where a named volume of this project lies on the host, when this process may read it.
    fn volume_dir(&self, volume: &str) -> Option<PathBuf> {
        let out = Command::new("docker")
            .args(["volume", "inspect", "-f", "{{.Mountpoint}}"])
            .arg(format!("{}_{volume}", self.project))
            .output()
            .ok()?;
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        std::fs::read_dir(&dir).is_ok().then_some(dir)
    }
}

/// A line of /proc/PID/status, its value trimmed.
fn status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// Every block file and sidecar under a datanode volume, with its bytes and mode.
fn replica_files(volume: &Path) -> BTreeMap<String, (Vec<u8>, u32)> {
    let current = volume.join("data/current");
    std::fs::read_dir(&current)
        .map(|r| {
            r.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("blk_"))
                .map(|e| {
                    let mode = e.metadata().unwrap().permissions().mode() & 0o7777;
                    (
                        e.file_name().to_string_lossy().to_string(),
                        (std::fs::read(e.path()).unwrap(), mode),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Processes on this machine that run as the plugin user.
fn plugin_user_processes() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            status_field(*pid, "Uid")
                .split_whitespace()
                .next()
                .is_some_and(|uid| uid == PLUGIN_UID.to_string())
        })
        .collect()
}

impl Drop for ComposeCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Ok(out) = self.command().args(["logs", "--no-color"]).output() {
                eprintln!("{}", String::from_utf8_lossy(&out.stdout));
            }
        }
        let _ = self
            .command()
            .args(["down", "-v", "--remove-orphans"])
            .output();
        let _ = Command::new("docker")
            .args(["rmi", "-f", &self.image])
            .output();
    }
}

#[test]
fn compose_cluster_round_trips_a_file_and_heals_when_a_datanode_container_stops() {
    let Some(compose) = compose_command() else {
        eprintln!("no Docker engine with compose here: the container test does not run");
        return;
    };
    let tag = format!("lode-test-{:08x}", rand::random::<u32>());
    let cluster = ComposeCluster {
        compose,
        project: tag.clone(),
        image: format!("lode:{tag}"),
        dir: tempfile::Builder::new()
            .prefix("lode-compose-")
            .tempdir()
            .expect("temp dir"),
        work: tempfile::Builder::new()
            .prefix("lode-compose-work-")
            .tempdir()
            .expect("temp dir"),
        http_port: free_tcp_port(),
    };
    // The CLI in the tools container runs as the service user and reads plugins from here.
    std::fs::set_permissions(cluster.work.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    // The image from this build's binaries alone (no base image can be pulled).
    let built = Command::new("bash")
        .arg(repo().join("deploy/container/build-image.sh"))
        .args(["--tag", &cluster.image, "--bin-dir"])
        .arg(bin_dir())
        .output()
        .expect("run build-image.sh");
    assert!(
        built.status.success(),
        "build-image.sh: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let init = Command::new("bash")
        .arg(repo().join("deploy/container/init-cluster.sh"))
        .args(["--image", &cluster.image])
        .arg(cluster.dir.path())
        .output()
        .expect("run init-cluster.sh");
    assert!(
        init.status.success(),
        "init-cluster.sh: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    cluster.compose(&["up", "-d"]);
    wait_until(
        "three live datanodes in the compose cluster",
        Duration::from_secs(60),
        || cluster.live().len() == 3,
    );

    // Every service runs as the unprivileged service user, with no effective capability; the
    // datanodes hold CAP_SETUID and CAP_SETGID as permitted only, to hand to the plugin host.
    for service in SERVICES {
        let pid = cluster.service_pid(service);
        let want = format!("{LODE_UID}\t{LODE_UID}\t{LODE_UID}\t{LODE_UID}");
        assert_eq!(status_field(pid, "Uid"), want, "{service} runs as lode");
        assert_eq!(
            status_field(pid, "Gid"),
            want,
            "{service} runs in group lode"
        );
        assert_eq!(
            u64::from_str_radix(&status_field(pid, "CapEff"), 16),
            Ok(0),
            "{service} has no effective capability"
        );
        let permitted = u64::from_str_radix(&status_field(pid, "CapPrm"), 16).unwrap();
        let identity = (1 << 6) | (1 << 7);
        let expected = if service == "namenode" { 0 } else { identity };
        assert_eq!(permitted, expected, "{service}'s permitted capabilities");
    }
    // Each service mounts only its own directory: its config, key and certificate and the CA
    // certificate. The CA key is in none of them.
    for service in SERVICES {
        let mut files: Vec<String> = std::fs::read_dir(cluster.dir.path().join(service))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        files.sort();
        let name = service;
        let config = if service == "namenode" {
            "namenode.toml"
        } else {
            "datanode.toml"
        };
        let mut want = vec![
            "ca.pem".to_string(),
            config.to_string(),
            format!("{name}-key.pem"),
            format!("{name}.pem"),
        ];
        want.sort();
        assert_eq!(files, want, "what {service} can read");
        let id = cluster
            .command()
            .args(["ps", "-q", service])
            .output()
            .unwrap();
        let mounts = Command::new("docker")
            .args(["inspect", "-f", "{{json .Mounts}}"])
            .arg(String::from_utf8_lossy(&id.stdout).trim())
            .output()
            .unwrap();
        let mounts: Value = serde_json::from_slice(&mounts.stdout).expect("mounts as JSON");
        let binds: Vec<PathBuf> = mounts
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["Type"] == "bind")
            .map(|m| PathBuf::from(m["Source"].as_str().unwrap()))
            .collect();
        assert_eq!(
            binds,
            vec![cluster.dir.path().join(service)],
            "{service} binds its own directory only"
        );
    }
    assert!(cluster.dir.path().join("ca/ca-key.pem").exists());
    // The datanodes have every protection of the sandbox, the plugin identity among them.
    let report = cluster
        .json(&["admin", "report", "--json"])
        .expect("admin report");
    for dn in report["datanodes"].as_array().unwrap() {
        let sandbox: Vec<&str> = dn["sandbox"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p.as_str())
            .collect();
        for protection in lode_plugin_host::sandbox::REQUIRED {
            assert!(sandbox.contains(protection), "{}: {sandbox:?}", dn["name"]);
        }
        assert_eq!(dn["sandbox_missing"], serde_json::json!([]), "{dn}");
    }

    // A file round-trips through the containers.
    let data = random_bytes(5_000_000, 77);
    let put = cluster.lode(
        &[
            "put",
            "--replication",
            "2",
            "--block-size",
            "1M",
            "-",
            "/data.bin",
        ],
        Some(&data),
    );
    assert!(
        put.status.success(),
        "put: {}",
        String::from_utf8_lossy(&put.stderr)
    );
    let got = cluster.lode(&["get", "/data.bin", "-"], None);
    assert!(
        got.status.success(),
        "get: {}",
        String::from_utf8_lossy(&got.stderr)
    );
    assert!(got.stdout == data, "the file reads back byte for byte");

    // The status page is published on the host and lists every datanode.
    lode_tests::http_get_until(
        &format!("127.0.0.1:{}", cluster.http_port),
        "/",
        "the status page to list every datanode",
        Duration::from_secs(10),
        |page| ["dn-1", "dn-2", "dn-3"].iter().all(|dn| page.contains(dn)),
    );

    hostile_plugin_harms_no_datanode_container(&cluster);

    // Stop a container holding the first block: the cluster heals onto the remaining node.
    let before = cluster.locations("/data.bin");
    assert_eq!(before.len(), 5, "five 1 MiB blocks: {before:?}");
    let victim = before[0][0].clone();
    cluster.compose(&["stop", &victim]);
    wait_until(
        &format!("every block back to 2 replicas without {victim}"),
        Duration::from_secs(90),
        || {
            let now = cluster.locations("/data.bin");
            now.len() == 5 && now.iter().all(|l| l.len() == 2 && !l.contains(&victim))
        },
    );
    let fsck = cluster
        .json(&["fsck", "--json", "/data.bin"])
        .expect("fsck succeeds");
    assert_eq!(fsck["status"], "healthy", "{fsck}");
    let got = cluster.lode(&["get", "/data.bin", "-"], None);
    assert!(got.stdout == data, "the file reads back after healing");

    // The stopped node comes back; excess replicas go, so every block ends at exactly 2.
    cluster.compose(&["start", &victim]);
    wait_until("the stopped datanode back", Duration::from_secs(60), || {
        cluster.live().len() == 3
    });
    wait_until(
        "each block at exactly its 2 replicas",
        Duration::from_secs(60),
        || cluster.locations("/data.bin").iter().all(|l| l.len() == 2),
    );
}

/// The hostile plugin (plugins/host/tests/c/hostile.c), aimed at the datanode process of the
/// container it runs in, through real scans: each escape is refused, and no datanode is harmed
/// (same process, same limits, no failed data dir, every replica byte-identical with its mode),
/// nothing is written where the plugin aimed, and no plugin process is left behind.
fn hostile_plugin_harms_no_datanode_container(cluster: &ComposeCluster) {
    // One block on one datanode, so the plugin runs there and aims at that datanode's pid.
    let data = random_bytes(200_005, 91);
    let put = cluster.lode(&["put", "--replication", "1", "-", "/victim"], Some(&data));
    assert!(
        put.status.success(),
        "put: {}",
        String::from_utf8_lossy(&put.stderr)
    );
    let holder = cluster.locations("/victim");
    assert_eq!(holder.len(), 1, "one block: {holder:?}");
    let holder = holder[0][0].clone();
    let datanodes = ["dn-1", "dn-2", "dn-3"];
    let pids: Vec<u32> = datanodes.iter().map(|d| cluster.service_pid(d)).collect();
    // The holder's pid inside its container (the last NSpid field).
    let target = status_field(cluster.service_pid(&holder), "NSpid")
        .split_whitespace()
        .last()
        .unwrap()
        .to_string();
    let limits = || -> Vec<String> {
        pids.iter()
            .map(|p| std::fs::read_to_string(format!("/proc/{p}/limits")).unwrap())
            .collect()
    };
    let limits_before = limits();
    let volumes: Vec<Option<PathBuf>> = datanodes.iter().map(|d| cluster.volume_dir(d)).collect();
    if volumes.iter().any(Option::is_none) {
        eprintln!(
            "the volumes are not readable here: replicas are checked by reading the file back"
        );
    }
    let replicas = || -> Vec<BTreeMap<String, (Vec<u8>, u32)>> {
        volumes.iter().flatten().map(|v| replica_files(v)).collect()
    };
    let before = replicas();
    if let Some(v) = &volumes[datanodes.iter().position(|d| *d == holder).unwrap()] {
        assert!(
            replica_files(v).len() >= 2,
            "the victim's block and its sidecar on {holder}"
        );
    }

    let marker = "/var/lib/lode/escaped";
    let so = cluster.work.path().join("libhostile.so");
    lode_tests::build_hostile_plugin(&target, marker, &so);
    std::fs::set_permissions(&so, std::fs::Permissions::from_mode(0o644)).unwrap();
    let added = cluster.lode(&["plugin", "add", "/work/libhostile.so"], None);
    assert!(
        added.status.success(),
        "plugin add: {}",
        String::from_utf8_lossy(&added.stderr)
    );
    for escape in lode_tests::HOSTILE_SCAN_ESCAPES {
        let args = lode_tests::hostile_scan_args(escape, "/victim");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = cluster.lode(&args, None);
        let verdict = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && verdict.starts_with("refused "),
            "{escape}: {verdict} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let after: Vec<u32> = datanodes.iter().map(|d| cluster.service_pid(d)).collect();
    assert_eq!(after, pids, "every datanode is the same process");
    assert_eq!(limits(), limits_before, "a datanode's limits changed");
    for (v, (was, now)) in volumes.iter().flatten().zip(before.iter().zip(replicas())) {
        // (Files may be added: the plugin library is stored in the cluster too.)
        let changed: Vec<&String> = was.keys().filter(|k| was.get(*k) != now.get(*k)).collect();
        assert!(
            changed.is_empty(),
            "in {}: {:?}",
            v.display(),
            changed
                .iter()
                .map(|k| (
                    k,
                    was.get(*k).map(|f| (f.0.len(), f.1)),
                    now.get(*k).map(|f| (f.0.len(), f.1))
                ))
                .collect::<Vec<_>>()
        );
    }
    for v in volumes.iter().flatten() {
        assert!(
            !v.join("escaped").exists(),
            "the plugin wrote into {}",
            v.display()
        );
    }
    let got = cluster.lode(&["get", "/victim", "-"], None);
    assert!(got.stdout == data, "the victim reads back byte for byte");
    let report = cluster
        .json(&["admin", "report", "--json"])
        .expect("admin report");
    for dn in report["datanodes"].as_array().unwrap() {
        assert_eq!(dn["state"], "live", "{report}");
        assert_eq!(dn["failed_volumes"], 0, "{report}");
    }
    wait_until("no plugin process left", Duration::from_secs(10), || {
        plugin_user_processes().is_empty()
    });
}
