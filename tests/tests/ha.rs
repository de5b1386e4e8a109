//! A group of three namenode processes on loopback: changes go through the leader, the client
//! follows a new leader after the old one is killed, nothing acknowledged is lost, and a member
//! that comes back catches up until every member's metadata store holds the same bytes.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lode_namenode::store::SledStore;
use lode_protocol::net::Role;
use lode_tests::{bin_dir, free_port, free_tcp_port, http_get, wait_until};

struct Group {
    dir: PathBuf,
    http: Vec<u16>,
    children: Vec<Option<Child>>,
    datanodes: Vec<Child>,
}

impl Group {
    fn start(dir: &Path, n: usize, datanodes: usize) -> Group {
        lode_client::certs::init(&dir.join("certs"), datanodes as u32).unwrap();
        for i in 1..=n {
            lode_client::certs::issue(&dir.join("certs"), &format!("nn-{i}"), Role::Namenode)
                .unwrap();
        }
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let http: Vec<u16> = (0..n).map(|_| free_tcp_port()).collect();
        let members: Vec<String> = (1..=n)
            .map(|i| {
                format!(
                    "{{ id = {i}, name = \"nn-{i}\", addr = \"127.0.0.1:{}\" }}",
                    ports[i - 1]
                )
            })
            .collect();
        for i in 1..=n {
            std::fs::write(
                dir.join(format!("nn-{i}.toml")),
                format!(
                    "listen = \"127.0.0.1:{}\"\nmeta_dir = \"meta-{i}\"\nhttp_listen = \"127.0.0.1:{}\"\n\
                     safemode_threshold = 0.0\ntrash_interval_ms = 0\nheartbeat_interval_ms = 200\n\
                     stale_after_ms = 2000\ndead_after_ms = 5000\nreplication_default = 2\n\
                     block_size_default = 65536\n\
                     [tls]\nca = \"certs/ca.pem\"\ncert = \"certs/nn-{i}.pem\"\nkey = \"certs/nn-{i}-key.pem\"\n\
                     [transport]\nidle_timeout_ms = 3000\n\
                     [group]\nid = {i}\nheartbeat_ms = 100\nelection_min_ms = 500\nelection_max_ms = 1000\n\
                     members = [{}]\n",
                    ports[i - 1],
                    http[i - 1],
                    members.join(", ")
                ),
            )
            .unwrap();
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
        std::fs::write(
            dir.join("client.toml"),
            format!(
                "namenodes = [{}]\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/admin.pem\"\nkey = \"certs/admin-key.pem\"\n",
                addrs.join(", ")
            ),
        )
        .unwrap();
        let mut g = Group {
            dir: dir.to_path_buf(),
            http,
            children: (0..n).map(|_| None).collect(),
            datanodes: vec![],
        };
        for i in 1..=n {
            g.start_member(i);
        }
        for d in 1..=datanodes {
            let config = dir.join(format!("dn-{d}.toml"));
            std::fs::write(
                &config,
                format!(
                    "name = \"dn-{d}\"\nlisten = \"127.0.0.1:{}\"\nnamenodes = [{}]\n\
                     data_dirs = [\"dn-{d}/data\"]\nheartbeat_interval_ms = 200\n\
                     [tls]\nca = \"certs/ca.pem\"\ncert = \"certs/dn-{d}.pem\"\nkey = \"certs/dn-{d}-key.pem\"\n\
                     [transport]\nidle_timeout_ms = 3000\n",
                    free_port(),
                    addrs.join(", ")
                ),
            )
            .unwrap();
            let log = std::fs::File::create(dir.join(format!("dn-{d}.log"))).unwrap();
            g.datanodes.push(
                Command::new(bin_dir().join("lode-datanode"))
                    .arg("--config")
                    .arg(&config)
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .unwrap(),
            );
        }
        g
    }

    fn start_member(&mut self, i: usize) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("nn-{i}.log")))
            .unwrap();
        let child = Command::new(bin_dir().join("lode-namenode"))
            .arg("--config")
            .arg(self.dir.join(format!("nn-{i}.toml")))
            .env("RUST_LOG", "info,openraft=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children[i - 1] = Some(child);
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i - 1].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops a member with SIGTERM (it flushes its store) and waits for it to exit.
    fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.children[i - 1].take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let _ = c.wait();
        }
    }

    fn metric(&self, i: usize, name: &str) -> Option<i64> {
        let (code, body) = http_get(&format!("127.0.0.1:{}", self.http[i - 1]), "/metrics").ok()?;
        if code != 200 {
            return None;
        }
        let prefix = format!("lode_namenode_{name} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
    }

    /// A gauge with one `kind` label (`datanodes{kind="live"}`).
    fn metric_labelled(&self, i: usize, name: &str, kind: &str) -> Option<i64> {
        let (_, body) = http_get(&format!("127.0.0.1:{}", self.http[i - 1]), "/metrics").ok()?;
        let prefix = format!("lode_namenode_{name}{{kind=\"{kind}\"}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
    }

    fn leader(&self) -> Option<usize> {
        (1..=self.children.len())
            .filter(|i| self.children[i - 1].is_some())
            .find(|i| self.metric(*i, "group_leader") == Some(1))
    }

    fn lode(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin_dir().join("lode"))
            .arg("--config")
            .arg(self.dir.join("client.toml"))
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.lode(args);
        assert!(
            out.status.success(),
            "lode {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn dump(&self, i: usize) -> Vec<u8> {
        let store = SledStore::open(&self.dir.join(format!("meta-{i}/sled"))).unwrap();
        let seq = lode_namenode::namespace::read_last_applied(&store).unwrap();
        lode_namenode::backup::dump(&store, seq).unwrap()
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for i in 1..=self.children.len() {
            self.kill(i);
        }
        for mut d in self.datanodes.drain(..) {
            let _ = d.kill();
            let _ = d.wait();
        }
    }
}

#[test]
fn the_group_fails_over_to_a_new_leader_and_a_returning_member_catches_up() {
    let tmp = tempfile::tempdir().unwrap();
    let mut g = Group::start(tmp.path(), 3, 3);
    let mut first = None;
    wait_until("a leader", Duration::from_secs(30), || {
        first = g.leader();
        first.is_some()
    });
    let first = first.unwrap();
    for i in 0..10 {
        g.ok(&["mkdir", &format!("/a{i}")]);
    }
    // Every datanode reports to every member, so whichever leads knows where the replicas are.
    wait_until(
        "3 live datanodes at every member",
        Duration::from_secs(30),
        || (1..=3).all(|i| g.metric_labelled(i, "datanodes", "live") == Some(3)),
    );
    let data = lode_tests::random_bytes(300_000, 7);
    std::fs::write(tmp.path().join("before"), &data).unwrap();
    g.ok(&[
        "put",
        tmp.path().join("before").to_str().unwrap(),
        "/before",
    ]);

    // Kill the leader: the next change waits for the new leader and is acknowledged by it.
    g.kill(first);
    let killed = Instant::now();
    g.ok(&["mkdir", "/b0"]);
    let failover = killed.elapsed();
    eprintln!("first acknowledged change {failover:?} after the leader was killed");
    for i in 1..10 {
        g.ok(&["mkdir", &format!("/b{i}")]);
    }
    let second = g.leader().expect("a new leader");
    assert_ne!(second, first);
    // The new leader serves the file written under the old one, and takes new ones.
    let back = tmp.path().join("back");
    g.ok(&["get", "/before", back.to_str().unwrap()]);
    assert!(
        std::fs::read(&back).unwrap() == data,
        "/before read back differs"
    );
    g.ok(&["put", tmp.path().join("before").to_str().unwrap(), "/after"]);
    let again = tmp.path().join("again");
    g.ok(&["get", "/after", again.to_str().unwrap()]);
    assert!(
        std::fs::read(&again).unwrap() == data,
        "/after read back differs"
    );
    let listing = g.ok(&["ls", "/"]);
    for name in (0..10).flat_map(|i| [format!("a{i}"), format!("b{i}")]) {
        assert!(listing.contains(&name), "{name} is missing: {listing}");
    }

    // The old leader comes back as a follower and catches up.
    g.start_member(first);
    let target = g.metric(second, "group_applied_index").unwrap();
    wait_until(
        "the returning member to apply what the leader applied",
        Duration::from_secs(30),
        || (1..=3).all(|i| g.metric(i, "group_applied_index") == Some(target)),
    );
    assert_eq!(g.metric(first, "group_leader"), Some(0));
    for i in 1..=3 {
        g.stop(i);
    }
    let d = g.dump(1);
    for i in 2..=3 {
        assert!(g.dump(i) == d, "nn-{i}'s metadata differs from nn-1's");
    }
}
