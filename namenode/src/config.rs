//! Namenode configuration, read from TOML. Unknown keys are refused so typos fail loudly.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use lode_protocol::net::{TlsFiles, TransportConfig};
use serde::Deserialize;

/// Default heartbeat interval datanodes are told to use, in ms.
pub const HEARTBEAT_INTERVAL_MS_DEFAULT: u64 = 3_000;
/// Default silence after which a datanode is stale (avoided for writes, read last), in ms.
pub const STALE_AFTER_MS_DEFAULT: u64 = 30_000;
/// Default silence after which a datanode is dead (its replicas leave the location map), in ms.
pub const DEAD_AFTER_MS_DEFAULT: u64 = 630_000;
/// Default time a writer's lease lives without renewal, in ms.
pub const LEASE_EXPIRY_MS_DEFAULT: u64 = 60_000;
/// Default replica count of new files.
pub const REPLICATION_DEFAULT: u8 = 3;
/// Default block size of new files: 128 MiB.
pub const BLOCK_SIZE_DEFAULT: u64 = 128 << 20;

/// The namenode's configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// UDP address to serve QUIC on, e.g. `127.0.0.1:7400`.
    pub listen: SocketAddr,
    /// Directory of the edit log and the sled metadata store. Created if missing.
    pub meta_dir: PathBuf,
    /// Certificate files (relative paths are taken from the config file's directory).
    pub tls: TlsFiles,
    /// Transport tuning.
    #[serde(default)]
    pub transport: TransportConfig,
    /// Expected datanode heartbeat interval in ms (informational; stale/dead use the two below).
    #[serde(default = "d_heartbeat")]
    pub heartbeat_interval_ms: u64,
    /// Silence after which a datanode is stale, in ms. Default 30000.
    #[serde(default = "d_stale")]
    pub stale_after_ms: u64,
    /// Silence after which a datanode is dead, in ms. Default 630000.
    #[serde(default = "d_dead")]
    pub dead_after_ms: u64,
    /// Lease lifetime without renewal, in ms. Default 60000.
    #[serde(default = "d_lease")]
    pub lease_expiry_ms: u64,
    /// Replica count of new files when the client does not choose (1..=7). Default 3.
    #[serde(default = "d_replication")]
    pub replication_default: u8,
    /// Block size of new files when the client does not choose: a power of two >= 64 KiB. Default 128 MiB.
    #[serde(default = "d_block")]
    pub block_size_default: u64,
    /// After a start, namespace changes wait until this fraction of blocks has a reported replica
    /// (or an admin leaves safe mode). 0.0 disables start-up safe mode. Default 0.999.
    #[serde(default = "d_safemode")]
    pub safemode_threshold: f64,
    /// TCP address of the status page (`/`) and Prometheus metrics (`/metrics`); none when absent.
    #[serde(default)]
    pub http_listen: Option<SocketAddr>,
    /// Once the edit log's current segment passes this many bytes, the metadata store is flushed
    /// and the segment rolled to `edits.log.1` (replacing the one before), so the log stays under
    /// about twice this. Default 64 MiB; at least 4096.
    #[serde(default = "d_roll")]
    pub edit_log_roll_bytes: u64,
    /// Bytes of the metadata store's pages kept in memory (sled's cache; the namespace itself
    /// stays on disk). Default 256 MiB; at least 16 MiB.
    #[serde(default = "d_meta_cache")]
    pub meta_cache_bytes: u64,
    /// Where the audit log goes (one JSON line per namespace operation); none when absent.
    #[serde(default)]
    pub audit_log: Option<PathBuf>,
    /// The audit log is rotated once it passes this many bytes (`audit.log.1` is the newest old
    /// one). Default 64 MiB.
    #[serde(default = "d_audit_max")]
    pub audit_log_max_bytes: u64,
    /// Rotated audit logs kept. Default 10.
    #[serde(default = "d_audit_keep")]
    pub audit_log_keep: u32,
    /// Groups and their members (user names: certificate common names). Members of `supergroup`
    /// are superusers. Reloaded by `lode admin refresh-groups`.
    #[serde(default)]
    pub groups: std::collections::BTreeMap<String, Vec<String>>,
    /// How long a block access token lives, in ms (a new signing key is made every half of
    /// it). Default 36000000 (ten hours, as HDFS has it); at least 1000.
    #[serde(default = "d_token_lifetime")]
    pub token_lifetime_ms: u64,
    /// How long what `rm` moves to a user's trash stays there, in ms: the trash is checkpointed
    /// this often, and checkpoints older than this are deleted. 0 turns the trash off (`rm`
    /// deletes at once). Default 86400000 (a day).
    #[serde(default = "d_trash")]
    pub trash_interval_ms: u64,
    /// How long the answer to a change sent with a request id is kept for the client's retries
    /// (it is replicated with the change, so a new leader has it too). Default 120000.
    #[serde(default = "d_retry_cache")]
    pub retry_cache_ms: u64,
    /// The namenode group this namenode is a member of (see `[group]` in
    /// `deploy/config/namenode.toml`); without it the namenode runs alone on its edit log.
    #[serde(default)]
    pub group: Option<GroupConfig>,
    /// The file this config was read from (to reload the groups).
    #[serde(skip)]
    pub path: Option<PathBuf>,
}

/// Membership of a namenode group and its timings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// This member's id (one of `members`).
    pub id: u64,
    /// Every member at the group's start: id, certificate name and QUIC address. Later changes of
    /// membership are made through the group and kept in its log; this list only starts it.
    pub members: Vec<GroupMember>,
    /// How often the leader sends heartbeats, in ms. Default 250.
    #[serde(default = "d_group_heartbeat")]
    pub heartbeat_ms: u64,
    /// A follower that hears nothing from a leader for a random time between these two stands
    /// for election, in ms. Defaults 1000 and 2000.
    #[serde(default = "d_election_min")]
    pub election_min_ms: u64,
    /// See `election_min_ms`.
    #[serde(default = "d_election_max")]
    pub election_max_ms: u64,
    /// A snapshot of the metadata is taken once this many log entries were applied since the
    /// last one. Default 20000.
    #[serde(default = "d_snapshot_every")]
    pub snapshot_every: u64,
    /// This namenode joins a group that runs already (`lode admin namenode add` makes it a
    /// member): it never starts a group of its own, and `members` lists the members it will hear
    /// from, itself included. Default false.
    #[serde(default)]
    pub join: bool,
    /// A follower answers namespace reads (ls, stat, du, count, plugin lookups) from its own
    /// state instead of naming the leader, while it follows a leader. Such reads may miss the
    /// latest changes (by the replication lag, as HDFS observer reads may); changes still go to
    /// the leader. Default false: every read is linearizable (the leader confirms its lead with a
    /// majority first).
    #[serde(default)]
    pub follower_reads: bool,
}

/// A member of the namenode group, as the config names it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupMember {
    /// Member id, unique in the group and never reused.
    pub id: u64,
    /// The common name of its certificate (`nn-1`).
    pub name: String,
    /// `host:port` of its QUIC endpoint.
    pub addr: String,
}

fn d_retry_cache() -> u64 {
    120_000
}
fn d_group_heartbeat() -> u64 {
    250
}
fn d_election_min() -> u64 {
    1000
}
fn d_election_max() -> u64 {
    2000
}
fn d_snapshot_every() -> u64 {
    20_000
}

impl GroupConfig {
    /// The group's timings.
    pub fn timing(&self) -> crate::raft::Timing {
        crate::raft::Timing {
            heartbeat: std::time::Duration::from_millis(self.heartbeat_ms),
            election_min: std::time::Duration::from_millis(self.election_min_ms),
            election_max: std::time::Duration::from_millis(self.election_max_ms),
            snapshot_every: self.snapshot_every,
        }
    }

    /// The members as the group names them.
    pub fn members(&self) -> Vec<(crate::raft::NodeId, crate::raft::Member)> {
        self.members
            .iter()
            .map(|m| {
                (
                    m.id,
                    crate::raft::Member {
                        name: m.name.clone(),
                        addr: m.addr.clone(),
                    },
                )
            })
            .collect()
    }

    fn validate(&self) -> Result<(), String> {
        let ids: std::collections::BTreeSet<u64> = self.members.iter().map(|m| m.id).collect();
        let names: std::collections::BTreeSet<&str> =
            self.members.iter().map(|m| m.name.as_str()).collect();
        if ids.len() != self.members.len() || names.len() != self.members.len() {
            return Err("group.members: ids and names must be unique".into());
        }
        if !ids.contains(&self.id) {
            return Err(format!("group.id {} is not one of group.members", self.id));
        }
        crate::raft::config(&self.timing()).map(|_| ())
    }
}

fn d_trash() -> u64 {
    86_400_000
}

fn d_token_lifetime() -> u64 {
    36_000_000
}

fn d_audit_max() -> u64 {
    64 << 20
}

fn d_audit_keep() -> u32 {
    10
}

fn d_roll() -> u64 {
    64 << 20
}

fn d_meta_cache() -> u64 {
    crate::store::DEFAULT_CACHE_BYTES
}

fn d_safemode() -> f64 {
    0.999
}

fn d_heartbeat() -> u64 {
    HEARTBEAT_INTERVAL_MS_DEFAULT
}
fn d_stale() -> u64 {
    STALE_AFTER_MS_DEFAULT
}
fn d_dead() -> u64 {
    DEAD_AFTER_MS_DEFAULT
}
fn d_lease() -> u64 {
    LEASE_EXPIRY_MS_DEFAULT
}
fn d_replication() -> u8 {
    REPLICATION_DEFAULT
}
fn d_block() -> u64 {
    BLOCK_SIZE_DEFAULT
}

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("read config {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this struct.
    #[error("parse config {path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Cause.
        message: String,
    },
    /// A value is out of range.
    #[error("config {path}: {message}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.path = Some(path.to_path_buf());
        cfg.tls = cfg.tls.relative_to(base);
        if cfg.meta_dir.is_relative() {
            cfg.meta_dir = base.join(&cfg.meta_dir);
        }
        if let Some(audit) = cfg.audit_log.as_mut().filter(|a| a.is_relative()) {
            *audit = base.join(&*audit);
        }
        cfg.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(cfg)
    }

    /// Checks every range.
    pub fn validate(&self) -> Result<(), String> {
        lode_protocol::validate_replication(self.replication_default)
            .map_err(|e| format!("replication_default: {e}"))?;
        lode_protocol::checksum::validate_block_size(self.block_size_default)
            .map_err(|e| format!("block_size_default: {e}"))?;
        if self.meta_cache_bytes < 16 << 20 {
            return Err("meta_cache_bytes must be at least 16 MiB (16777216)".into());
        }
        if self.heartbeat_interval_ms == 0 || self.stale_after_ms <= self.heartbeat_interval_ms {
            return Err("stale_after_ms must exceed heartbeat_interval_ms (> 0)".into());
        }
        if self.dead_after_ms <= self.stale_after_ms {
            return Err("dead_after_ms must exceed stale_after_ms".into());
        }
        if self.edit_log_roll_bytes < 4096 {
            return Err(format!(
                "edit_log_roll_bytes must be at least 4096, got {}",
                self.edit_log_roll_bytes
            ));
        }
        if !(0.0..=1.0).contains(&self.safemode_threshold) {
            return Err(format!(
                "safemode_threshold must be 0.0..=1.0, got {}",
                self.safemode_threshold
            ));
        }
        if self.token_lifetime_ms < 1000 {
            return Err(format!(
                "token_lifetime_ms must be at least 1000, got {}",
                self.token_lifetime_ms
            ));
        }
        if self.lease_expiry_ms < 1000 {
            return Err(format!(
                "lease_expiry_ms must be at least 1000, got {}",
                self.lease_expiry_ms
            ));
        }
        crate::perm::Groups::new(&self.groups).map_err(|e| format!("groups: {e}"))?;
        if let Some(g) = &self.group {
            g.validate().map_err(|e| format!("group: {e}"))?;
        }
        self.transport.validate()
    }
}
