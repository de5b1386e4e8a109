//! Self-healing: a lost datanode's blocks are copied back to their target count on distinct live
//! datanodes, reads stay intact throughout, and `setrep` adds or removes replicas until each block
//! has exactly its target.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::Duration;

use lode_tests::{random_bytes, wait_until, Cluster, ClusterSpec};

const BLOCK: usize = 64 * 1024;

fn locations(c: &Cluster, path: &str) -> Vec<Vec<String>> {
    c.stat(path)["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            b["locations"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l.as_str().unwrap().to_string())
                .collect()
        })
        .collect()
}

fn all_have(c: &Cluster, path: &str, n: usize, without: Option<&str>) -> bool {
    locations(c, path).iter().all(|l| {
        let distinct: HashSet<&String> = l.iter().collect();
        l.len() == n && distinct.len() == n && without.is_none_or(|w| !l.iter().any(|x| x == w))
    })
}

/// Block files on the disks of the datanodes other than `skip`.
fn replica_files(c: &Cluster, datanodes: usize, skip: usize) -> usize {
    (1..=datanodes)
        .filter(|i| *i != skip)
        .flat_map(|i| {
            ["data1", "data2"].map(|d| c.dir().join(format!("dn-{i}")).join(d).join("current"))
        })
        .map(|dir| {
            std::fs::read_dir(dir)
                .map(|r| {
                    r.flatten()
                        .filter(|e| {
                            e.file_name().to_string_lossy().starts_with("blk_")
                                && !e.file_name().to_string_lossy().ends_with(".meta")
                        })
                        .count()
                })
                .unwrap_or(0)
        })
        .sum()
}

#[test]
fn a_lost_datanode_is_healed_and_setrep_converges() {
    let mut c = Cluster::start(ClusterSpec {
        datanodes: 4,
        replication: 3,
        ..Default::default()
    });
    let bytes = random_bytes(6 * BLOCK + 777, 31);
    c.put_bytes("/heal", &bytes, &[]);
    wait_until("3 replicas reported", Duration::from_secs(10), || {
        all_have(&c, "/heal", 3, None)
    });
    let victim = locations(&c, "/heal")[0][0].clone();
    let i: usize = victim.trim_start_matches("dn-").parse().unwrap();
    c.kill_datanode(i);
    assert_eq!(
        c.get_bytes("/heal"),
        bytes,
        "reads work right after the loss"
    );
    // Dead after 5 s in the test cluster, then copies start.
    wait_until(
        "every block back to 3 live replicas",
        Duration::from_secs(40),
        || all_have(&c, "/heal", 3, Some(&victim)),
    );
    assert_eq!(c.get_bytes("/heal"), bytes);
    let report = c.report().unwrap();
    assert_eq!(report["under_replicated"], 0, "{report}");
    assert_eq!(report["missing"], 0, "{report}");

    // Fewer replicas: the excess ones are deleted, on disk too (the dead node's disk is left alone).
    c.ok(&["setrep", "1", "/heal"]);
    wait_until("one replica per block", Duration::from_secs(20), || {
        all_have(&c, "/heal", 1, None) && replica_files(&c, 4, i) == 7
    });
    assert_eq!(c.get_bytes("/heal"), bytes);
    // More again.
    c.ok(&["setrep", "2", "/"]);
    wait_until("two replicas per block", Duration::from_secs(20), || {
        all_have(&c, "/heal", 2, None)
    });
    assert_eq!(c.stat("/heal")["replication"], 2);
    assert_eq!(c.get_bytes("/heal"), bytes);
    let err = c.fails(&["setrep", "9", "/heal"]);
    assert!(err.contains("replication"), "{err}");
}
