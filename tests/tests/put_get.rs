//! Round trips through the real CLI and processes: sizes around block boundaries, checksums equal to
//! BLAKE3 of the bytes, block placement on distinct datanodes, stdin/stdout, and namespace commands.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;

use lode_tests::{random_bytes, Cluster, ClusterSpec};

const BLOCK: usize = 64 * 1024;

fn check_blocks(c: &Cluster, remote: &str, size: usize, replication: usize) {
    let st = c.stat(remote);
    assert_eq!(st["path"], remote);
    assert_eq!(st["type"], "file");
    assert_eq!(st["size"], size as u64);
    assert_eq!(st["replication"], replication as u64);
    assert_eq!(st["block_size"], BLOCK as u64);
    let blocks = st["blocks"].as_array().expect("blocks");
    assert_eq!(blocks.len(), size.div_ceil(BLOCK));
    let mut offset = 0;
    let mut ids = HashSet::new();
    for b in blocks {
        assert_eq!(b["offset"], offset);
        assert!(ids.insert(b["id"].as_u64().expect("numeric block id")));
        offset += b["len"].as_u64().unwrap();
        let locs: HashSet<&str> = b["locations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_str().unwrap())
            .collect();
        assert_eq!(
            locs.len(),
            replication,
            "block {b} should be on {replication} distinct datanodes"
        );
    }
    assert_eq!(offset, size as u64);
}

#[test]
fn round_trips_around_block_boundaries() {
    let c = Cluster::start(ClusterSpec {
        datanodes: 3,
        replication: 3,
        ..Default::default()
    });
    let sizes = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 5 * BLOCK + 12_345];
    for (i, size) in sizes.into_iter().enumerate() {
        let bytes = random_bytes(size, i as u64);
        let remote = format!("/rt/file-{size}");
        if i == 0 {
            c.ok(&["mkdir", "/rt"]);
        }
        c.put_bytes(&remote, &bytes, &[]);
        assert_eq!(c.get_bytes(&remote), bytes, "bytes of {remote}");
        let sum = String::from_utf8(c.ok(&["checksum", &remote])).unwrap();
        assert_eq!(
            sum.split_whitespace().next().unwrap(),
            blake3::hash(&bytes).to_hex().as_str(),
            "checksum of {remote}"
        );
        let st = c.stat(&remote);
        assert_eq!(st["checksum"], blake3::hash(&bytes).to_hex().as_str());
        // every block settles on `replication` distinct datanodes (reports arrive right after the put)
        lode_tests::wait_until("block reports", std::time::Duration::from_secs(10), || {
            c.stat(&remote)["blocks"]
                .as_array()
                .unwrap()
                .iter()
                .all(|b| b["locations"].as_array().unwrap().len() == 3)
        });
        check_blocks(&c, &remote, size, 3);
    }
    c.assert_no_unexpected_errors(&[]);
}

#[test]
fn checksum_equals_blake3_for_many_sizes() {
    let c = Cluster::start(ClusterSpec {
        datanodes: 2,
        replication: 1,
        ..Default::default()
    });
    let piece = 64 * 1024;
    let mut sizes = vec![1023, 1024, 1025, 2048 + 1, piece - 1024, piece + 1024];
    sizes.extend([
        2 * piece - 1,
        2 * piece,
        2 * piece + 1,
        3 * piece + 7,
        4 * piece,
        4 * piece + 1,
        9 * piece - 1,
    ]);
    let block_args = ["--block-size", "128K"];
    for (i, size) in sizes.into_iter().enumerate() {
        let bytes = random_bytes(size, 100 + i as u64);
        let remote = format!("/sum-{size}");
        c.put_bytes(&remote, &bytes, &block_args);
        let out = String::from_utf8(c.ok(&["checksum", &remote])).unwrap();
        assert_eq!(
            out.trim(),
            format!("{}  {remote}", blake3::hash(&bytes).to_hex()),
            "size {size}"
        );
    }
}

#[test]
fn stdin_stdout_cat_and_block_size_flag() {
    let c = Cluster::start(ClusterSpec {
        datanodes: 2,
        replication: 2,
        ..Default::default()
    });
    let bytes = random_bytes(300_000, 7);
    let out = c.lode_with(
        &c.client_config(),
        &["put", "--block-size", "128K", "-", "/piped"],
        Some(&bytes),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(c.stat("/piped")["block_size"], 128 * 1024);
    assert_eq!(c.ok(&["get", "/piped", "-"]), bytes);
    assert_eq!(c.ok(&["cat", "/piped"]), bytes);
    let err = c.fails(&["put", "--block-size", "100000", "-", "/bad-block"]);
    assert!(err.contains("power of two"), "{err}");
    let err = c.fails(&["put", "--replication", "9", "-", "/bad-repl"]);
    assert!(err.contains("replication"), "{err}");
}

#[test]
fn namespace_commands_and_bad_input() {
    let c = Cluster::start(ClusterSpec {
        datanodes: 1,
        replication: 1,
        ..Default::default()
    });
    c.ok(&["mkdir", "-p", "/a/b/c"]);
    c.put_bytes("/a/b/f", b"hello", &[]);
    // ls --json lists entries with types
    let ls: serde_json::Value = serde_json::from_slice(&c.ok(&["ls", "--json", "/a/b"])).unwrap();
    let names: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["/a/b/c", "/a/b/f"]);
    assert_eq!(ls[0]["type"], "directory");
    assert_eq!(ls[1]["size"], 5);
    let rec: serde_json::Value =
        serde_json::from_slice(&c.ok(&["ls", "-R", "--json", "/"])).unwrap();
    assert_eq!(rec.as_array().unwrap().len(), 4);
    // paths are normalised; '..' is refused
    assert_eq!(c.ok(&["cat", "//a/./b//f"]), b"hello");
    let err = c.fails(&["cat", "/a/../a/b/f"]);
    assert!(err.contains("'..'"), "{err}");
    // errors name the path and the cause
    let err = c.fails(&["cat", "/nope"]);
    assert!(
        err.contains("/nope") && err.contains("no such file"),
        "{err}"
    );
    let err = c.fails(&["mkdir", "/a/b/f/sub"]);
    assert!(
        err.contains("/a/b/f") && err.contains("not a directory"),
        "{err}"
    );
    let local = c.dir().join("local-hello");
    std::fs::write(&local, b"other").unwrap();
    let l = local.to_str().unwrap();
    let err = c.fails(&["put", l, "/a/b/f"]);
    assert!(err.contains("/a/b/f") && err.contains("exists"), "{err}");
    c.ok(&["put", "-f", l, "/a/b/f"]);
    assert_eq!(c.ok(&["cat", "/a/b/f"]), b"other");
    let err = c.fails(&["rm", "/a"]);
    assert!(err.contains("not empty"), "{err}");
    let err = c.fails(&["get", "/a/b/f", l]);
    assert!(err.contains("exists"), "{err}");
    let err = c.fails(&["put", "/does/not/exist/locally", "/x"]);
    assert!(err.contains("/does/not/exist/locally"), "{err}");
    // mv into a directory keeps the name; mv a directory into itself is refused
    c.ok(&["mv", "/a/b/f", "/a"]);
    assert_eq!(c.ok(&["cat", "/a/f"]), b"other");
    let err = c.fails(&["mv", "/a", "/a/b/c"]);
    assert!(err.contains("into itself"), "{err}");
    // du sums sizes
    let du = String::from_utf8(c.ok(&["du", "-s", "/a"])).unwrap();
    assert!(du.contains("5 B") && du.contains("/a"), "{du}");
    c.ok(&["rm", "-r", "/a"]);
    let ls: serde_json::Value = serde_json::from_slice(&c.ok(&["ls", "--json", "/"])).unwrap();
    assert!(ls.as_array().unwrap().is_empty());
    // usage errors exit 2
    let out = c.lode(&["put"]);
    assert_eq!(out.status.code(), Some(2));
    let out = c.lode(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    c.assert_no_unexpected_errors(&[]);
}

#[test]
fn deleting_a_file_frees_its_blocks_on_the_datanodes() {
    let c = Cluster::start(ClusterSpec {
        datanodes: 2,
        replication: 2,
        ..Default::default()
    });
    let bytes = random_bytes(4 * BLOCK, 3);
    c.put_bytes("/gone", &bytes, &[]);
    let count_block_files = || c.replica_count(1) + c.replica_count(2);
    lode_tests::wait_until(
        "8 replicas on disk",
        std::time::Duration::from_secs(10),
        || count_block_files() == 8,
    );
    c.ok(&["rm", "/gone"]);
    lode_tests::wait_until(
        "replicas deleted",
        std::time::Duration::from_secs(10),
        || count_block_files() == 0,
    );
}
