//! Test harness: a real cluster of `lode-namenode` and `lode-datanode` processes on loopback, each
//! with its own temp directory, config file, ports and log file, and the real `lode` CLI to drive it.
//! Readiness is awaited through the namenode's report, never by sleeping. Everything is killed on
//! drop; when a test fails, the cluster's directory is kept and printed.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod history;
pub mod nemesis;
pub mod netns;

/// What cluster to start.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// Number of datanodes (dn-1..dn-N).
    pub datanodes: usize,
    /// Default replication of new files.
    pub replication: u8,
    /// Default block size of new files.
    pub block_size: u64,
    /// Lease expiry in ms.
    pub lease_expiry_ms: u64,
    /// Run the datanodes' block scanners fast and often (else at their gentle default).
    pub fast_block_scanner: bool,
    /// Check the datanodes' data dirs every second (else at the default of 300 s).
    pub fast_disk_check: bool,
    /// The namenode's `edit_log_roll_bytes` (else its default).
    pub edit_log_roll_bytes: Option<u64>,
    /// Failpoints every datanode start arms (`FAILPOINTS` syntax), such as lost heartbeats.
    pub datanode_failpoints: Option<String>,
    /// The datanodes' `stream_idle_ms` (else their default).
    pub stream_idle_ms: Option<u64>,
    /// The namenode's `trash_interval_ms`: 0 (the trash off, so `rm` frees blocks at once, as
    /// most tests expect) unless a test turns it on.
    pub trash_interval_ms: u64,
    /// The namenode's `stale_after_ms` and `dead_after_ms` (else 2 s and 5 s).
    pub liveness_ms: Option<(u64, u64)>,
    /// More top-level lines of the namenode's config (`token_lifetime_ms = 2000`), and tables
    /// after them (`[groups]`).
    pub namenode_extra: String,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            datanodes: 3,
            replication: 3,
            block_size: 64 * 1024,
            lease_expiry_ms: 10_000,
            fast_block_scanner: false,
            fast_disk_check: false,
            edit_log_roll_bytes: None,
            datanode_failpoints: None,
            stream_idle_ms: None,
            namenode_extra: String::new(),
            trash_interval_ms: 0,
            liveness_ms: None,
        }
    }
}

/// A running cluster.
pub struct Cluster {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    bin: PathBuf,
    namenode: Option<Child>,
    datanodes: Vec<Option<Child>>,
    /// Datanodes running in a mount namespace of their own (their files are seen through /proc).
    private_mounts: Vec<bool>,
    /// The namenode's UDP port.
    pub namenode_port: u16,
    /// Each datanode's UDP port.
    pub datanode_ports: Vec<u16>,
    spec: ClusterSpec,
}

/// Where the built binaries are (target/debug or target/release, next to the test executable).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/deps")
        .to_path_buf();
    for b in ["lode", "lode-namenode", "lode-datanode", "lode-plugin-host"] {
        assert!(
            dir.join(b).exists(),
            "{} is missing: build the workspace first (cargo build --workspace)",
            dir.join(b).display()
        );
    }
    dir
}

/// An example plugin library built with the workspace (`liblode_plugin_<name>.so`).
pub fn plugin_lib(name: &str) -> PathBuf {
    let p = bin_dir().join(format!("liblode_plugin_{name}.so"));
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        p.display()
    );
    p
}

/// A free UDP port on loopback.
pub fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// A free TCP port on loopback.
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// A plain HTTP GET on loopback: (status code, body).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// Random bytes from a seed.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// `path` of the HTTP server at `addr` once its body satisfies `cond` (status pages are snapshots
/// rebuilt every second, so a change shows within about a second); panics with `what` and the last
/// body after `timeout`.
pub fn http_get_until(
    addr: &str,
    path: &str,
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut(&str) -> bool,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let body = match http_get(addr, path) {
            Ok((200, body)) => body,
            Ok((code, body)) => format!("HTTP {code}: {body}"),
            Err(e) => format!("no answer: {e}"),
        };
        if cond(&body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `n` QUIC connections from one endpoint to a server on loopback `port`, as the holder of
/// certificate `cert` in `certs` (the directory `lode certs init` made), expecting the server to
/// be `server_name`.
pub async fn connect_with(
    certs: &Path,
    cert: &str,
    port: u16,
    server_name: &str,
    n: usize,
) -> Result<Vec<quinn::Connection>, String> {
    connect_to(
        certs,
        cert,
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        server_name,
        n,
    )
    .await
}

/// As [`connect_with`], to a server at `addr` (on loopback or another host).
pub async fn connect_to(
    certs: &Path,
    cert: &str,
    addr: std::net::SocketAddr,
    server_name: &str,
    n: usize,
) -> Result<Vec<quinn::Connection>, String> {
    use lode_protocol::net::{self, TlsFiles, TransportConfig};
    let files = TlsFiles {
        ca: certs.join("ca.pem"),
        cert: certs.join(format!("{cert}.pem")),
        key: certs.join(format!("{cert}-key.pem")),
        ..Default::default()
    };
    let t = TransportConfig::default();
    let tls = net::client_config(&files, &t).map_err(|e| e.to_string())?;
    let local = if addr.ip().is_loopback() {
        "127.0.0.1:0"
    } else {
        "0.0.0.0:0"
    };
    let ep =
        net::endpoint(local.parse().expect("addr"), None, tls, &t).map_err(|e| e.to_string())?;
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let conn = ep
            .connect(addr, server_name)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        conns.push(conn);
    }
    Ok(conns)
}

/// Waits for `cond` to hold, polling, or panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Cluster {
    /// Creates certificates and configs, starts the namenode and datanodes, and waits until every
    /// datanode is registered and live.
    pub fn start(spec: ClusterSpec) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("lode-test-")
            .tempdir()
            .expect("temp dir");
        let path = dir.path().to_path_buf();
        lode_client::certs::init(&path.join("certs"), spec.datanodes as u32).expect("certs init");
        let namenode_port = free_port();
        let datanode_ports: Vec<u16> = (0..spec.datanodes).map(|_| free_port()).collect();
        // HTTP listens on a port the kernel picks (no race with other tests for a free one); the
        // servers report where (`http_addr` in the admin report).
        // Short idle timeouts so a killed peer is noticed within seconds.
        let tls = |name: &str| {
            format!(
                "[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/{name}.pem\"\nkey = \"certs/{name}-key.pem\"\n\
                 [transport]\nidle_timeout_ms = 3000\n"
            )
        };
        std::fs::write(
            path.join("namenode.toml"),
            format!(
                "listen = \"127.0.0.1:{namenode_port}\"\nmeta_dir = \"meta\"\nheartbeat_interval_ms = 200\n\
                 stale_after_ms = {}\ndead_after_ms = {}\nlease_expiry_ms = {}\nreplication_default = {}\n\
                 block_size_default = {}\nhttp_listen = \"127.0.0.1:0\"\naudit_log = \"audit.log\"\n\
                 trash_interval_ms = {}\n{}{}\n{}",
                spec.liveness_ms.map_or(2000, |l| l.0),
                spec.liveness_ms.map_or(5000, |l| l.1),
                spec.lease_expiry_ms,
                spec.replication,
                spec.block_size,
                spec.trash_interval_ms,
                spec.edit_log_roll_bytes
                    .map(|b| format!("edit_log_roll_bytes = {b}\n"))
                    .unwrap_or_default(),
                spec.namenode_extra,
                tls("namenode")
            ),
        )
        .expect("write namenode config");
        let mut scanner = if spec.fast_block_scanner {
            "scan_bytes_per_sec = 1073741824\nscan_pause_secs = 1\n".to_string()
        } else {
            String::new()
        };
        if spec.fast_disk_check {
            scanner.push_str("disk_check_secs = 1\n");
        }
        if let Some(ms) = spec.stream_idle_ms {
            scanner.push_str(&format!("stream_idle_ms = {ms}\n"));
        }
        // Plugins run as another user only where the datanode may switch to one (as root); a test
        // run as an ordinary user waives that protection, as an operator would have to.
        // SAFETY: geteuid has no arguments.
        if unsafe { libc::geteuid() } != 0 {
            scanner.push_str("plugin_sandbox_optional = [\"identity\"]\n");
        }
        for (i, port) in datanode_ports.iter().enumerate() {
            let name = format!("dn-{}", i + 1);
            std::fs::write(
                path.join(format!("{name}.toml")),
                format!(
                    "name = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\nnamenode = \"127.0.0.1:{namenode_port}\"\n\
                     data_dirs = [\"{name}/data1\", \"{name}/data2\"]\nheartbeat_interval_ms = 200\nhttp_listen = \"127.0.0.1:0\"\n{scanner}{}",
                    tls(&name)
                ),
            )
            .expect("write datanode config");
        }
        for (file, cert) in [("client.toml", "admin"), ("client-user.toml", "user")] {
            std::fs::write(
                path.join(file),
                format!("namenode = \"127.0.0.1:{namenode_port}\"\n{}", tls(cert)),
            )
            .expect("write client config");
        }
        let mut c = Cluster {
            dir: Some(dir),
            path,
            bin: bin_dir(),
            namenode: None,
            datanodes: (0..spec.datanodes).map(|_| None).collect(),
            private_mounts: vec![false; spec.datanodes],
            namenode_port,
            datanode_ports,
            spec,
        };
        c.start_namenode();
        for i in 1..=c.spec.datanodes {
            c.start_datanode(i);
        }
        c.wait_live(c.spec.datanodes);
        c
    }

    /// The cluster's directory.
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// Datanode `dn`'s directory (holding `data1` and `data2`) as this process sees the files the
    /// datanode sees: through `/proc/PID/root` when it runs in a mount namespace of its own.
    pub fn datanode_dir(&self, dn: usize) -> PathBuf {
        let dir = self.path.join(format!("dn-{dn}"));
        match &self.datanodes[dn - 1] {
            Some(child) if self.private_mounts[dn - 1] => {
                let mut p = PathBuf::from(format!("/proc/{}/root", child.id()));
                p.push(dir.strip_prefix("/").unwrap_or(&dir));
                p
            }
            _ => dir,
        }
    }

    /// The block file of block `id` on datanode `dn` (1-based), in whichever data dir holds it;
    /// its sidecar is the same path with the extension `meta`.
    pub fn replica_path(&self, dn: usize, id: u64) -> Option<PathBuf> {
        ["data1", "data2"]
            .iter()
            .map(|d| {
                self.datanode_dir(dn)
                    .join(d)
                    .join("current")
                    .join(format!("blk_{id}"))
            })
            .find(|p| p.exists())
    }

    /// Block files (not sidecars) on datanode `dn`'s disks.
    pub fn replica_count(&self, dn: usize) -> usize {
        ["data1", "data2"]
            .iter()
            .filter_map(|d| std::fs::read_dir(self.datanode_dir(dn).join(d).join("current")).ok())
            .flat_map(|r| r.flatten())
            .filter(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                name.starts_with("blk_") && !name.ends_with(".meta")
            })
            .count()
    }

    /// A QUIC connection to a server of this cluster on loopback `port`, as the holder of
    /// certificate `cert` (`admin`, `user`, `dn-1`, ...), expecting it to be `server_name`.
    pub async fn connect(
        &self,
        cert: &str,
        port: u16,
        server_name: &str,
    ) -> Result<quinn::Connection, String> {
        let mut one = self.connect_many(cert, port, server_name, 1).await?;
        Ok(one.remove(0))
    }

    /// `n` QUIC connections from one endpoint (one socket), as [`Cluster::connect`] makes one.
    pub async fn connect_many(
        &self,
        cert: &str,
        port: u16,
        server_name: &str,
        n: usize,
    ) -> Result<Vec<quinn::Connection>, String> {
        connect_with(&self.path.join("certs"), cert, port, server_name, n).await
    }

    /// A block allocated to a new file at `path` (which `cert` may create) on exactly the datanodes
    /// `pipeline` (1-based), in that order, with the write token the namenode signed for it: what a
    /// writer holds between `AddBlock` and writing the block. Blocks are 1 MiB.
    pub async fn allocate_block(
        &self,
        cert: &str,
        path: &str,
        pipeline: &[usize],
    ) -> lode_protocol::messages::LocatedBlock {
        use lode_protocol::frame::kind;
        use lode_protocol::messages::{ClientToNamenode as C, NamenodeReply};
        let conn = self
            .connect(cert, self.namenode_port, "namenode")
            .await
            .expect("connect to the namenode");
        let call = |req: C| {
            let conn = conn.clone();
            async move {
                lode_protocol::net::call::<_, NamenodeReply>(
                    &conn,
                    kind::CLIENT_TO_NAMENODE,
                    kind::NAMENODE_REPLY,
                    &req,
                )
                .await
                .expect("namenode call")
            }
        };
        let session = lode_protocol::SessionId(rand::random());
        let NamenodeReply::Created { inode, .. } = call(C::Create {
            path: path.into(),
            overwrite: false,
            replication: Some(pipeline.len() as u8),
            block_size: Some(1 << 20),
            session,
            mode: 0o644,
            first_block: false,
        })
        .await
        else {
            panic!("create {path}");
        };
        let want: Vec<String> = pipeline.iter().map(|i| format!("dn-{i}")).collect();
        let exclude: Vec<String> = (1..=self.datanode_ports.len())
            .map(|i| format!("dn-{i}"))
            .filter(|n| !want.contains(n))
            .collect();
        // The namenode orders the pipeline itself: ask again until it is the one wanted.
        for _ in 0..100 {
            let NamenodeReply::Block(b) = call(C::AddBlock {
                inode,
                session,
                previous: None,
                receipts: vec![],
                exclude: exclude.clone(),
            })
            .await
            else {
                panic!("add block to {path}");
            };
            let got: Vec<String> = b.locations.iter().map(|t| t.name.clone()).collect();
            if got == want {
                return b;
            }
            call(C::AbandonBlock {
                inode,
                session,
                block: b.id,
            })
            .await;
        }
        panic!("the namenode never placed a block on {want:?}");
    }

    /// What a server has logged so far (`namenode`, `dn-1`, ...).
    pub fn log(&self, server: &str) -> String {
        std::fs::read_to_string(self.path.join(format!("{server}.log"))).unwrap_or_default()
    }

    /// The admin client config.
    pub fn client_config(&self) -> PathBuf {
        self.path.join("client.toml")
    }

    fn spawn(&self, binary: &str, config: &str, log: &str) -> Child {
        self.spawn_with(binary, config, log, &[])
    }

    fn spawn_with(&self, binary: &str, config: &str, log: &str, env: &[(&str, &str)]) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path.join(log))
            .expect("open log");
        Command::new(self.bin.join(binary))
            .arg("--config")
            .arg(self.path.join(config))
            .env("LODE_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn server")
    }

    /// Starts (or restarts) the namenode.
    pub fn start_namenode(&mut self) {
        self.namenode = Some(self.spawn("lode-namenode", "namenode.toml", "namenode.log"));
    }

    /// Starts (or restarts) the namenode with failpoints armed (`FAILPOINTS` syntax; test builds
    /// have the `failpoints` feature).
    pub fn start_namenode_with_failpoints(&mut self, spec: &str) {
        self.namenode = Some(self.spawn_with(
            "lode-namenode",
            "namenode.toml",
            "namenode.log",
            &[("FAILPOINTS", spec)],
        ));
    }

    /// Starts (or restarts) datanode `i` (1-based) with failpoints armed.
    pub fn start_datanode_with_failpoints(&mut self, i: usize, spec: &str) {
        let child = self.spawn_with(
            "lode-datanode",
            &format!("dn-{i}.toml"),
            &format!("dn-{i}.log"),
            &[("FAILPOINTS", spec)],
        );
        self.datanodes[i - 1] = Some(child);
        self.private_mounts[i - 1] = false;
    }

    /// The process id of datanode `i` (1-based), while it runs.
    pub fn datanode_pid(&self, i: usize) -> Option<u32> {
        self.datanodes[i - 1].as_ref().map(|c| c.id())
    }

    /// Whether the namenode process has exited by itself (a failpoint ended it).
    pub fn namenode_exited(&mut self) -> bool {
        self.namenode
            .as_mut()
            .is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    /// Whether datanode `i` (1-based) has exited by itself.
    pub fn datanode_exited(&mut self, i: usize) -> bool {
        self.datanodes[i - 1]
            .as_mut()
            .is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    /// SIGKILLs the namenode.
    pub fn kill_namenode(&mut self) {
        if let Some(mut c) = self.namenode.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts (or restarts) datanode `i` (1-based).
    pub fn start_datanode(&mut self, i: usize) {
        let fp = self.spec.datanode_failpoints.clone();
        let env: Vec<(&str, &str)> = fp.iter().map(|f| ("FAILPOINTS", f.as_str())).collect();
        let child = self.spawn_with(
            "lode-datanode",
            &format!("dn-{i}.toml"),
            &format!("dn-{i}.log"),
            &env,
        );
        self.datanodes[i - 1] = Some(child);
        self.private_mounts[i - 1] = false;
    }

    /// Restarts datanode `i` (1-based) with each of its two data dirs on a tmpfs of `bytes`, in a
    /// mount namespace of its own (so the mounts vanish with it): a small real disk that fills up.
    /// Needs root or unprivileged user namespaces (`unshare`); says why when it cannot.
    pub fn start_datanode_on_small_disks(&mut self, i: usize, bytes: u64) -> Result<(), String> {
        self.kill_datanode(i);
        let dir = self.path.join(format!("dn-{i}"));
        let mut script = String::from("set -e\n");
        for d in ["data1", "data2"] {
            let p = dir.join(d);
            std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            script.push_str(&format!(
                "mount -t tmpfs -o size={bytes} lode-test-disk '{}'\n",
                p.display()
            ));
        }
        // Root needs only a mount namespace; anyone else also needs a user namespace.
        let flavours: [&[&str]; 2] = [&["--mount"], &["--user", "--map-root-user", "--mount"]];
        let flavour = flavours
            .into_iter()
            .find(|f| {
                Command::new("unshare")
                    .args(*f)
                    .args(["sh", "-c", &script])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
            .ok_or("cannot mount a tmpfs in a private mount namespace (unshare failed as root and with a user namespace)")?;
        script.push_str(&format!(
            "exec '{}' --config '{}'\n",
            self.bin.join("lode-datanode").display(),
            self.path.join(format!("dn-{i}.toml")).display()
        ));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path.join(format!("dn-{i}.log")))
            .map_err(|e| e.to_string())?;
        let child = Command::new("unshare")
            .args(flavour)
            .args(["sh", "-c", &script])
            .env("LODE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn unshare: {e}"))?;
        self.datanodes[i - 1] = Some(child);
        self.private_mounts[i - 1] = true;
        Ok(())
    }

    /// SIGKILLs datanode `i` (1-based).
    pub fn kill_datanode(&mut self, i: usize) {
        if let Some(mut c) = self.datanodes[i - 1].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The namenode's report as JSON, if it answers.
    pub fn report(&self) -> Option<Value> {
        let out = self.lode(&["admin", "report", "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Names of datanodes in a given state.
    pub fn datanodes_in_state(&self, state: &str) -> Vec<String> {
        self.report()
            .and_then(|r| {
                r["datanodes"].as_array().map(|a| {
                    a.iter()
                        .filter(|d| d["state"] == state)
                        .filter_map(|d| d["name"].as_str().map(String::from))
                        .collect()
                })
            })
            .unwrap_or_default()
    }

    /// Waits until at least `n` datanodes are live.
    pub fn wait_live(&self, n: usize) {
        wait_until(
            &format!("{n} live datanodes"),
            Duration::from_secs(30),
            || self.datanodes_in_state("live").len() >= n,
        );
    }

    /// Runs the `lode` CLI with the admin config.
    pub fn lode(&self, args: &[&str]) -> Output {
        self.lode_with(&self.client_config(), args, None)
    }

    /// Runs the `lode` CLI with a given config and optional stdin bytes.
    pub fn lode_with(&self, config: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut cmd = Command::new(self.bin.join("lode"));
        cmd.arg("--config")
            .arg(config)
            .args(args)
            .env_remove("LODE_CONFIG");
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn lode");
        if let Some(bytes) = stdin {
            use std::io::Write;
            let mut si = child.stdin.take().expect("stdin");
            si.write_all(bytes).expect("write stdin");
        }
        child.wait_with_output().expect("wait lode")
    }

    /// Runs `lode` and asserts success, returning stdout.
    pub fn ok(&self, args: &[&str]) -> Vec<u8> {
        let out = self.lode(args);
        assert!(
            out.status.success(),
            "lode {args:?} failed ({:?}): {}\n(cluster dir {})",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr),
            self.path.display()
        );
        out.stdout
    }

    /// A client config for a new user certificate `name` (issued by the cluster's CA now), with
    /// `extra` top-level lines (`umask = "077"`).
    pub fn client_config_for(&self, name: &str, extra: &str) -> PathBuf {
        let certs = self.path.join("certs");
        if !certs.join(format!("{name}.pem")).exists() {
            lode_client::certs::issue(&certs, name, lode_protocol::net::Role::User)
                .expect("issue a user certificate");
        }
        let file = self.path.join(format!("client-{name}.toml"));
        std::fs::write(
            &file,
            format!(
                "namenode = \"127.0.0.1:{}\"\n{extra}\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/{name}.pem\"\n\
                 key = \"certs/{name}-key.pem\"\n[transport]\nidle_timeout_ms = 3000\n",
                self.namenode_port
            ),
        )
        .expect("write client config");
        file
    }

    /// The user certificate's home, `/user/user`: made by the admin and given to the user, as the
    /// dev cluster makes it. Returns the path.
    pub fn user_home(&self) -> String {
        self.ok(&["mkdir", "-p", "/user/user"]);
        self.ok(&["chown", "user", "/user/user"]);
        "/user/user".into()
    }

    /// Runs `lode` and asserts it fails with exit code 1 and one line on stderr; returns that line.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.lode(args);
        assert_one_line_error(&out, args);
        String::from_utf8_lossy(&out.stderr).trim().to_string()
    }

    /// Writes `bytes` to a local file in the cluster dir and puts it at `remote`.
    pub fn put_bytes(&self, remote: &str, bytes: &[u8], extra: &[&str]) {
        let local = self.path.join(format!("upload-{}", rand::random::<u64>()));
        std::fs::write(&local, bytes).expect("write local file");
        let l = local.to_string_lossy().to_string();
        let mut args = vec!["put"];
        args.extend_from_slice(extra);
        args.push(&l);
        args.push(remote);
        self.ok(&args);
        let _ = std::fs::remove_file(local);
    }

    /// Reads a file back through `lode get` into a local file, returning the bytes.
    pub fn get_bytes(&self, remote: &str) -> Vec<u8> {
        let local = self
            .path
            .join(format!("download-{}", rand::random::<u64>()));
        let l = local.to_string_lossy().to_string();
        self.ok(&["get", remote, &l]);
        let bytes = std::fs::read(&local).expect("read downloaded file");
        let _ = std::fs::remove_file(local);
        bytes
    }

    /// `stat --json --blocks` of a path.
    pub fn stat(&self, remote: &str) -> Value {
        serde_json::from_slice(&self.ok(&["stat", "--json", "--blocks", remote]))
            .expect("stat json")
    }

    /// Fails the test if any server logged an ERROR line that no pattern in `expected` matches.
    pub fn assert_no_unexpected_errors(&self, expected: &[&str]) {
        for entry in std::fs::read_dir(&self.path)
            .expect("read cluster dir")
            .flatten()
        {
            let p = entry.path();
            if p.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                for line in text.lines().filter(|l| l.contains(" ERROR ")) {
                    assert!(
                        expected.iter().any(|e| line.contains(e)),
                        "unexpected error in {}: {line}",
                        p.display()
                    );
                }
            }
        }
    }
}

/// Asserts a failed CLI run: exit code 1 and exactly one line on stderr.
pub fn assert_one_line_error(out: &Output, args: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "lode {args:?} should fail with exit 1; stderr: {stderr}"
    );
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "lode {args:?} should print one error line, got: {stderr}"
    );
    assert!(
        stderr.starts_with("lode: "),
        "error line should start with 'lode: ': {stderr}"
    );
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_namenode();
        for i in 1..=self.datanodes.len() {
            self.kill_datanode(i);
        }
        if std::thread::panicking() {
            if let Some(d) = self.dir.take() {
                let kept = d.keep();
                eprintln!("cluster directory kept for inspection: {}", kept.display());
            }
        }
    }
}

/// The hostile plugin's escapes (plugins/host/tests/c/hostile.c) that the scan and container tests
/// try through real scans; each must come back `refused ...`.
pub const HOSTILE_SCAN_ESCAPES: &[&str] = &[
    "kill_parent",
    "tgkill_parent",
    "prlimit_parent",
    "ptrace_parent",
    "pidfd_parent",
    "open_parent_proc",
    "truncate_fd0_path",
    "fchmod_fd0",
    "inherited_fds",
    "create_marker",
    "fork",
    "clone_newuser",
    "execve",
    "socket_inet",
    "io_uring_setup",
    "mount",
    "syscall_sweep_x32",
];

/// The `lode` arguments that scan `path` with the hostile plugin trying `escape`.
pub fn hostile_scan_args(escape: &str, path: &str) -> Vec<String> {
    let arg = format!("escape={escape}");
    ["scan", "--plugin", "hostile", "--arg", &arg, path]
        .map(String::from)
        .to_vec()
}

/// Builds the hostile plugin into `out`, aimed at the process `target` (the datanode that will run
/// it, as its pid is seen where it runs) and at the file `marker`.
pub fn build_hostile_plugin(target: &str, marker: &str, out: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-I"])
        .arg(root.join("plugins/sdk/include"))
        .arg(format!("-DTARGET={target}"))
        .arg(format!("-DMARKER=\"{marker}\""))
        .arg("-o")
        .arg(out)
        .arg(root.join("plugins/host/tests/c/hostile.c"))
        .status()
        .expect("run cc");
    assert!(status.success(), "cc hostile.c");
}
