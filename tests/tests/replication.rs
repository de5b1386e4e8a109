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
    // Excess replicas go only after the replica that stays has verified its bytes: a round more.
    wait_until("one replica per block", Duration::from_secs(60), || {
        all_have(&c, "/heal", 1, None)
            && (1..=4)
                .filter(|n| *n != i)
                .map(|n| c.replica_count(n))
                .sum::<usize>()
                == 7
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

#[test]
fn the_block_scanner_finds_a_corrupt_replica_and_it_is_healed() {
    let c = Cluster::start(ClusterSpec {
        datanodes: 3,
        replication: 2,
        fast_block_scanner: true,
        ..Default::default()
    });
    let bytes = random_bytes(3 * BLOCK, 44);
    c.put_bytes("/scanned", &bytes, &[]);
    wait_until("2 replicas reported", Duration::from_secs(10), || {
        all_have(&c, "/scanned", 2, None)
    });
    let locs = locations(&c, "/scanned");
    let ids: Vec<u64> = (0..3)
        .map(|i| c.stat("/scanned")["blocks"][i]["id"].as_u64().unwrap())
        .collect();
    let holder = |i: usize| -> usize { locs[i][0].trim_start_matches("dn-").parse().unwrap() };
    // Three kinds of damage, one per block: a flipped byte, a truncated file, a lost sidecar.
    let file = c.replica_path(holder(0), ids[0]).unwrap();
    let mut d = std::fs::read(&file).unwrap();
    d[12_345] ^= 0x20;
    std::fs::write(&file, &d).unwrap();
    let file = c.replica_path(holder(1), ids[1]).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(1000)
        .unwrap();
    let file = c.replica_path(holder(2), ids[2]).unwrap();
    std::fs::remove_file(file.with_extension("meta")).unwrap();
    // No read touches the blocks: the scanner finds them, the namenode has them deleted and
    // copies good replicas, so in the end every offered replica holds the right bytes again.
    for (i, id) in ids.iter().enumerate() {
        let want = &bytes[i * BLOCK..(i + 1) * BLOCK];
        wait_until(
            &format!("the damaged replica of block {i} to be replaced"),
            Duration::from_secs(30),
            || {
                let l = locations(&c, "/scanned");
                l[i].len() == 2
                    && l[i].iter().all(|n| {
                        let dn: usize = n.trim_start_matches("dn-").parse().unwrap();
                        c.replica_path(dn, *id)
                            .filter(|p| p.with_extension("meta").exists())
                            .and_then(|p| std::fs::read(p).ok())
                            .is_some_and(|b| b == want)
                    })
            },
        );
    }
    assert_eq!(c.get_bytes("/scanned"), bytes);
    c.assert_no_unexpected_errors(&["block scanner: replica cannot be trusted"]);
}

#[test]
fn decommissioning_drains_a_node_under_read_load_and_recommission_undoes_it() {
    let c = Cluster::start(ClusterSpec {
        datanodes: 4,
        replication: 2,
        ..Default::default()
    });
    let bytes = random_bytes(8 * BLOCK + 5, 61);
    c.put_bytes("/busy", &bytes, &[]);
    wait_until("2 replicas reported", Duration::from_secs(10), || {
        all_have(&c, "/busy", 2, None)
    });
    let counts = |name: &str| {
        locations(&c, "/busy")
            .iter()
            .filter(|l| l.iter().any(|x| x == name))
            .count()
    };
    let victim = (1..=4)
        .map(|i| format!("dn-{i}"))
        .max_by_key(|n| counts(n))
        .unwrap();
    assert!(counts(&victim) > 0);
    let state = |name: &str| -> String {
        let r = c.report().unwrap();
        r["datanodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == name)
            .unwrap()["state"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        // Readers throughout: no read may fail.
        let reader = s.spawn(|| {
            let mut reads = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                assert_eq!(c.get_bytes("/busy"), bytes);
                reads += 1;
            }
            reads
        });
        c.ok(&["admin", "decommission", &victim]);
        wait_until(
            "the node to be decommissioned",
            Duration::from_secs(40),
            || state(&victim) == "decommissioned",
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
    });
    // Every block has its 2 replicas on other nodes; the drained node still serves, listed last.
    for l in locations(&c, "/busy") {
        let others = l.iter().filter(|x| **x != victim).count();
        assert!(others >= 2, "{l:?}");
        if let Some(pos) = l.iter().position(|x| *x == victim) {
            assert_eq!(pos, l.len() - 1, "a draining node is read from last: {l:?}");
        }
    }
    // New blocks avoid it.
    c.put_bytes("/new", &random_bytes(4 * BLOCK, 62), &[]);
    wait_until("new replicas", Duration::from_secs(10), || {
        all_have(&c, "/new", 2, Some(&victim))
    });
    // Recommission: it is live again and the excess replicas are removed.
    c.ok(&["admin", "recommission", &victim]);
    wait_until(
        "back to exactly 2 replicas",
        Duration::from_secs(20),
        || state(&victim) == "live" && all_have(&c, "/busy", 2, None),
    );
    let user = c.dir().join("client-user.toml");
    let out = c.lode_with(&user, &["admin", "decommission", "dn-1"], None);
    lode_tests::assert_one_line_error(&out, &["decommission as user"]);
    let err = c.fails(&["admin", "decommission", "dn-99"]);
    assert!(err.contains("dn-99"), "{err}");
}
