//! The container deployment: the image built FROM scratch by deploy/container/build-image.sh, and
//! the compose cluster of deploy/container/compose.yaml (a namenode and three datanodes on a
//! private network). Runs where a Docker engine and compose are present; says so and passes
//! where they are not.

use std::io::Write;
use std::path::PathBuf;
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

/// A compose project of this test's own; taken down with its volumes and image on drop.
struct ComposeCluster {
    compose: Vec<String>,
    project: String,
    image: String,
    dir: tempfile::TempDir,
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

    /// The `lode` CLI inside the namenode container, with optional stdin.
    fn lode(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut child = self
            .command()
            .args(["exec", "-T", "namenode", "lode"])
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
        http_port: free_tcp_port(),
    };
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
        .json(&["fsck", "--json", "/"])
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
