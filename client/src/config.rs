//! Client configuration: `--config FILE`, else `$LODE_CONFIG`, else `~/.config/lode/client.toml`.

use std::path::{Path, PathBuf};

use lode_protocol::net::{TlsFiles, TransportConfig};
use serde::Deserialize;

use crate::error::Error;

/// Default number of read requests kept in flight by `get`.
pub const READS_IN_FLIGHT_DEFAULT: usize = 8;

/// The client's configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The namenode's address (`127.0.0.1:7400`), for a namenode that runs alone.
    #[serde(default)]
    pub namenode: Option<String>,
    /// Every member of a namenode group (`["10.0.0.1:7400", "10.0.0.2:7400", ...]`): requests
    /// go to the leader, and the client follows it when it changes.
    #[serde(default)]
    pub namenodes: Vec<String>,
    /// Certificate files (relative paths are taken from the config file's directory).
    pub tls: TlsFiles,
    /// Transport tuning.
    #[serde(default)]
    pub transport: TransportConfig,
    /// Replica count for new files; the namenode's default when absent.
    #[serde(default)]
    pub replication: Option<u8>,
    /// Block size for new files (bytes); the namenode's default when absent.
    #[serde(default)]
    pub block_size: Option<u64>,
    /// Read requests (of up to 8 MiB each) kept in flight by `get`. Default 8.
    #[serde(default = "d_reads")]
    pub reads_in_flight: usize,
    /// Permission bits taken off new files (0666) and directories (0777), octal. Default `"022"`.
    #[serde(default = "d_umask")]
    pub umask: String,
}

fn d_reads() -> usize {
    READS_IN_FLIGHT_DEFAULT
}

fn d_umask() -> String {
    format!("{:03o}", lode_protocol::perm::UMASK_DEFAULT)
}

impl ClientConfig {
    /// Finds and loads the config: the explicit path, else `$LODE_CONFIG`, else the user's default.
    pub fn locate(explicit: Option<&Path>) -> Result<ClientConfig, Error> {
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None => match std::env::var_os("LODE_CONFIG") {
                Some(p) if !p.is_empty() => PathBuf::from(p),
                _ => {
                    let home = std::env::var_os("HOME")
                        .map(PathBuf::from)
                        .unwrap_or_default();
                    home.join(".config/lode/client.toml")
                }
            },
        };
        Self::load(&path)
    }

    /// Loads one file.
    pub fn load(path: &Path) -> Result<ClientConfig, Error> {
        let err = |message: String| Error::Config {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let mut cfg: ClientConfig =
            toml::from_str(&text).map_err(|e| err(e.message().to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.tls = cfg.tls.relative_to(base);
        cfg.transport.validate().map_err(err)?;
        if let Some(r) = cfg.replication {
            lode_protocol::validate_replication(r).map_err(err)?;
        }
        if let Some(b) = cfg.block_size {
            lode_protocol::checksum::validate_block_size(b).map_err(err)?;
        }
        lode_protocol::perm::parse_umask(&cfg.umask).map_err(err)?;
        if cfg.namenode.is_some() != cfg.namenodes.is_empty() {
            return Err(err(
                "name the namenode with either `namenode = \"host:port\"` or, for a group, \
                 `namenodes = [\"host:port\", ...]`"
                    .into(),
            ));
        }
        if cfg.reads_in_flight == 0 || cfg.reads_in_flight > 256 {
            return Err(err(format!(
                "reads_in_flight must be 1..=256, got {}",
                cfg.reads_in_flight
            )));
        }
        Ok(cfg)
    }

    /// The namenodes to ask: every member of the group, or the one namenode.
    pub fn namenode_addrs(&self) -> Vec<String> {
        match &self.namenode {
            Some(n) => vec![n.clone()],
            None => self.namenodes.clone(),
        }
    }

    /// The umask as bits (checked when the config was loaded).
    pub fn umask_bits(&self) -> u16 {
        lode_protocol::perm::parse_umask(&self.umask).unwrap_or(lode_protocol::perm::UMASK_DEFAULT)
    }

    /// The mode of a new file or directory: the default less the umask.
    pub fn new_mode(&self, dir: bool) -> u16 {
        let full = if dir {
            lode_protocol::perm::DIR_DEFAULT
        } else {
            lode_protocol::perm::FILE_DEFAULT
        };
        full & !self.umask_bits()
    }
}
