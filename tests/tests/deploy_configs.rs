//! Every sample config under deploy/ parses and validates with the code that reads it, so the
//! documented examples stay in step with the code.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

fn deploy(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/config")
        .join(name)
}

#[test]
fn sample_configs_parse_and_validate() {
    let nn = lode_namenode::Config::load(&deploy("namenode.toml")).unwrap();
    assert_eq!(nn.replication_default, 3);
    assert_eq!(nn.transport, lode_protocol::net::TransportConfig::default());
    let dn = lode_datanode::Config::load(&deploy("datanode.toml")).unwrap();
    assert_eq!(dn.data_dirs.len(), 2);
    assert_eq!(dn.advertised(), "10.0.0.11:7401");
    let client = lode_client::ClientConfig::load(&deploy("client.toml")).unwrap();
    assert_eq!(client.reads_in_flight, 8);
    let home = PathBuf::from(std::env::var_os("HOME").unwrap());
    assert_eq!(client.tls.ca, home.join(".config/lode/ca.pem"));
}

/// A copy of the sample config `text` in `dir` with `from` replaced by `to`.
fn variant(dir: &Path, name: &str, text: &str, from: &str, to: &str) -> PathBuf {
    assert!(text.contains(from), "the sample no longer holds {from:?}");
    let path = dir.join(name);
    std::fs::write(&path, text.replace(from, to)).unwrap();
    path
}

#[test]
fn unknown_keys_and_bad_values_are_refused_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let text = std::fs::read_to_string(deploy("namenode.toml")).unwrap();
    let typo = variant(d, "typo.toml", &text, "lease_expiry_ms", "lease_expiry");
    let err = lode_namenode::Config::load(&typo).unwrap_err().to_string();
    assert!(err.contains("lease_expiry"), "{err}");
    let bad = variant(
        d,
        "bad.toml",
        &text,
        "block_size_default = 134217728",
        "block_size_default = 100000",
    );
    let err = lode_namenode::Config::load(&bad).unwrap_err().to_string();
    assert!(
        err.contains("block_size_default") && err.contains("power of two"),
        "{err}"
    );
    let dn = std::fs::read_to_string(deploy("datanode.toml")).unwrap();
    let empty = variant(
        d,
        "dn.toml",
        &dn,
        "data_dirs = [\"/data1/lode\", \"/data2/lode\"]",
        "data_dirs = []",
    );
    let err = lode_datanode::Config::load(&empty).unwrap_err().to_string();
    assert!(err.contains("data_dirs"), "{err}");
    // Only a required protection can be waived, by its exact name.
    let waiver = variant(
        d,
        "waiver.toml",
        &dn,
        "plugin_sandbox_optional = []",
        "plugin_sandbox_optional = [\"seccmop\"]",
    );
    let err = lode_datanode::Config::load(&waiver)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("plugin_sandbox_optional") && err.contains("seccmop"),
        "{err}"
    );
}
