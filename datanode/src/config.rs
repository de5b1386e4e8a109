//! Datanode configuration, read from TOML. Unknown keys are refused so typos fail loudly.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use lode_protocol::net::{TlsFiles, TransportConfig};
use serde::Deserialize;

/// Default heartbeat interval, in ms.
pub const HEARTBEAT_INTERVAL_MS_DEFAULT: u64 = 3_000;

/// The datanode's configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This datanode's name; must equal the CN of its certificate (`dn-1`).
    pub name: String,
    /// UDP address to serve QUIC on.
    pub listen: SocketAddr,
    /// Address clients and peers should use; defaults to `listen`.
    #[serde(default)]
    pub advertise: Option<String>,
    /// The namenode's address (`127.0.0.1:7400`), for a namenode that runs alone.
    #[serde(default)]
    pub namenode: Option<String>,
    /// Every member of a namenode group: the datanode registers with, reports to and heartbeats
    /// every one of them (so a new leader knows every replica at once), and carries out the
    /// commands of the current leader only.
    #[serde(default)]
    pub namenodes: Vec<String>,
    /// Directories holding block files; at least one. Created if missing; each must be writable.
    pub data_dirs: Vec<PathBuf>,
    /// Certificate files (relative paths are taken from the config file's directory).
    pub tls: TlsFiles,
    /// Transport tuning.
    #[serde(default)]
    pub transport: TransportConfig,
    /// Heartbeat interval in ms. Default 3000.
    #[serde(default = "d_heartbeat")]
    pub heartbeat_interval_ms: u64,
    /// A full block report goes to the namenode again this often (besides registration), so
    /// that what it knows of this node cannot drift for long. 0: only at registration.
    /// Default 3600.
    #[serde(default = "d_full_report")]
    pub full_report_interval_secs: u64,
    /// Scan tasks run at once; more wait. Default: the number of cores.
    #[serde(default)]
    pub task_slots: Option<usize>,
    /// Where plugin libraries fetched from Lode are cached. Default: `plugin-cache` in the first data dir.
    #[serde(default)]
    pub plugin_cache_dir: Option<PathBuf>,
    /// Address-space limit of a plugin task, bytes. Default 1 GiB.
    #[serde(default = "d_plugin_memory")]
    pub plugin_memory_bytes: u64,
    /// CPU-time limit of a plugin task, seconds. Default 60.
    #[serde(default = "d_plugin_cpu")]
    pub plugin_cpu_secs: u64,
    /// Wall-clock limit of a plugin task, seconds. Default 120.
    #[serde(default = "d_plugin_wall")]
    pub plugin_wall_secs: u64,
    /// The uid plugin children run as, apart from the datanode's own (taken when the datanode runs
    /// as root or holds CAP_SETUID and CAP_SETGID as ambient capabilities). Default 65534 (nobody).
    #[serde(default = "d_plugin_id")]
    pub plugin_uid: u32,
    /// The gid plugin children run as. Default 65534 (nogroup).
    #[serde(default = "d_plugin_id")]
    pub plugin_gid: u32,
    /// Required plugin sandbox protections this datanode may run plugins without, by name (for a
    /// kernel that lacks one: `landlock`, say). Default none: a missing protection means no plugins.
    #[serde(default)]
    pub plugin_sandbox_optional: Vec<String>,
    /// The block scanner re-reads and verifies every replica at most this fast, bytes per second;
    /// 0 turns it off. Default 8 MiB/s.
    #[serde(default = "d_scan_rate")]
    pub scan_bytes_per_sec: u64,
    /// Pause between two full passes of the block scanner, seconds. Default 3600.
    #[serde(default = "d_scan_pause")]
    pub scan_pause_secs: u64,
    /// TCP address of Prometheus metrics (`/metrics`); none when absent.
    #[serde(default)]
    pub http_listen: Option<SocketAddr>,
    /// Bytes of each data dir's file system that blocks never use (left for the system and other
    /// programs). Default 0.
    #[serde(default)]
    pub reserved_bytes: u64,
    /// Every this many seconds each data dir is checked by writing a probe file (a dir is also
    /// checked after any disk error); a dir that fails is taken out of service and its replicas
    /// are re-replicated elsewhere. 0 turns the periodic check off. Default 300.
    #[serde(default = "d_disk_check")]
    pub disk_check_secs: u64,
    /// A write or read stream that moves no data for this long is ended (its peer may be gone, or
    /// holding the stream open to tie up this datanode), ms. Default 30000.
    #[serde(default = "d_stream_idle")]
    pub stream_idle_ms: u64,
}

fn d_stream_idle() -> u64 {
    30_000
}

fn d_disk_check() -> u64 {
    300
}

fn d_scan_rate() -> u64 {
    8 << 20
}
fn d_scan_pause() -> u64 {
    3600
}

fn d_plugin_id() -> u32 {
    65534
}
fn d_plugin_memory() -> u64 {
    1 << 30
}
fn d_plugin_cpu() -> u64 {
    60
}
fn d_plugin_wall() -> u64 {
    120
}

fn d_full_report() -> u64 {
    3600
}

fn d_heartbeat() -> u64 {
    HEARTBEAT_INTERVAL_MS_DEFAULT
}

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("config {path}: {message}")]
pub struct ConfigError {
    /// File.
    pub path: PathBuf,
    /// What is wrong.
    pub message: String,
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let err = |message: String| ConfigError {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let mut cfg: Config = toml::from_str(&text).map_err(|e| err(e.message().to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.tls = cfg.tls.relative_to(base);
        for d in cfg
            .data_dirs
            .iter_mut()
            .chain(cfg.plugin_cache_dir.as_mut())
        {
            if d.is_relative() {
                *d = base.join(&*d);
            }
        }
        cfg.validate().map_err(err)?;
        Ok(cfg)
    }

    /// Checks every range.
    pub fn validate(&self) -> Result<(), String> {
        if self.namenode.is_some() != self.namenodes.is_empty() {
            return Err(
                "name the namenode with either `namenode = \"host:port\"` or, for a group, \
                 `namenodes = [\"host:port\", ...]`"
                    .into(),
            );
        }
        if self.advertise.is_none() && self.listen.ip().is_unspecified() {
            return Err(format!(
                "listen = \"{}\" is a wildcard address; set advertise to the address clients should use",
                self.listen
            ));
        }
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        {
            return Err(format!(
                "name must be non-empty [A-Za-z0-9.-], got {:?}",
                self.name
            ));
        }
        if self.data_dirs.is_empty() {
            return Err("data_dirs must name at least one directory".into());
        }
        if self.task_slots == Some(0) {
            return Err("task_slots must be at least 1".into());
        }
        if self.plugin_memory_bytes < (64 << 20)
            || self.plugin_cpu_secs == 0
            || self.plugin_wall_secs == 0
        {
            return Err("plugin limits: memory at least 64 MiB, cpu and wall at least 1 s".into());
        }
        if self.heartbeat_interval_ms == 0 {
            return Err("heartbeat_interval_ms must be > 0".into());
        }
        if self.plugin_uid == 0 || self.plugin_gid == 0 {
            return Err("plugin_uid and plugin_gid must not be 0 (root)".into());
        }
        if let Some(bad) = self
            .plugin_sandbox_optional
            .iter()
            .find(|p| !lode_plugin_host::sandbox::REQUIRED.contains(&p.as_str()))
        {
            return Err(format!(
                "plugin_sandbox_optional: {bad:?} is not a required protection (one of {})",
                lode_plugin_host::sandbox::REQUIRED.join(", ")
            ));
        }
        self.transport.validate()
    }

    /// Every namenode to report to.
    pub fn namenode_addrs(&self) -> Vec<String> {
        match &self.namenode {
            Some(n) => vec![n.clone()],
            None => self.namenodes.clone(),
        }
    }

    /// The address announced to the namenode.
    pub fn advertised(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }
}
