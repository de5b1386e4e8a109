//! Disk faults on a datanode: a disk that fills up, and a data dir that fails.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use lode_protocol::checksum::{self, PIECE_BYTES};
use lode_protocol::frame::{kind, PieceHeader};
use lode_protocol::messages::{DatanodeReply, DatanodeRequest, LocatedBlock, Target};
use lode_protocol::net::{self, RpcError};
use lode_protocol::ErrorCode;
use lode_tests::{http_get, random_bytes, wait_until, Cluster, ClusterSpec};
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn datanode(c: &Cluster, name: &str) -> Option<Value> {
    c.report()?["datanodes"]
        .as_array()?
        .iter()
        .find(|d| d["name"] == name)
        .cloned()
}

/// A block of a file as `stat --json --blocks` shows it.
struct Block {
    id: u64,
    offset: u64,
    len: u64,
    locations: Vec<String>,
}

fn blocks(c: &Cluster, path: &str) -> Vec<Block> {
    c.stat(path)["blocks"]
        .as_array()
        .expect("blocks")
        .iter()
        .map(|b| Block {
            id: b["id"].as_u64().expect("id"),
            offset: b["offset"].as_u64().expect("offset"),
            len: b["len"].as_u64().expect("len"),
            locations: b["locations"]
                .as_array()
                .expect("locations")
                .iter()
                .map(|l| l.as_str().expect("name").to_string())
                .collect(),
        })
        .collect()
}

/// Writes into `dir` until the file system is full; returns the bytes written.
fn fill(dir: &Path) -> u64 {
    let mut f = std::fs::File::create(dir.join("filler")).expect("create filler");
    let chunk = vec![0x5au8; 64 * 1024];
    let mut written = 0;
    loop {
        // The small disks hold a few MiB: far more means this is not one of them.
        assert!(
            written < 64 << 20,
            "{} is not on a small disk; refusing to fill it",
            dir.display()
        );
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => panic!("filling {}: {e}", dir.display()),
        }
    }
    let _ = f.sync_all();
    written
}

/// The value of a metric without labels from a server's `/metrics`.
fn metric(addr: &str, name: &str) -> f64 {
    let (_, text) = http_get(addr, "/metrics").expect("metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} in {text}"))
}

fn fsck_healthy(c: &Cluster) -> bool {
    let out = c.lode(&["fsck", "--json", "/"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    out.status.success() && v["status"] == "healthy"
}

fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Writes one 1 MiB block straight to datanode `first` with `downstream` after it, as a writer
/// that does not know they are full would.
async fn write_block_raw(
    c: &Cluster,
    block: &LocatedBlock,
    first: usize,
    downstream: &[usize],
) -> Result<DatanodeReply, RpcError> {
    let target = |i: usize| Target {
        name: format!("dn-{i}"),
        addr: format!("127.0.0.1:{}", c.datanode_ports[i - 1]),
    };
    let conn = c
        .connect("admin", c.datanode_ports[first - 1], &target(first).name)
        .await
        .expect("connection");
    let (mut send, mut recv) = conn.open_bi().await?;
    let req = DatanodeRequest::WriteBlock {
        block: block.id,
        file_offset: 0,
        block_size: MIB,
        downstream: downstream.iter().map(|i| target(*i)).collect(),
        token: block.token.clone(),
    };
    net::write_frame(&mut send, kind::DATANODE_REQUEST, &req).await?;
    let data = random_bytes(MIB as usize, 44);
    for (i, piece) in data.chunks(PIECE_BYTES as usize).enumerate() {
        let header = PieceHeader {
            len: piece.len() as u32,
            cv: checksum::piece_cv(i as u64 * PIECE_BYTES, piece),
        };
        if net::write_piece(&mut send, &header, piece).await.is_err() {
            break; // the datanode stopped reading; its reply says why
        }
    }
    let _ = net::write_piece(&mut send, &PieceHeader::END, &[]).await;
    let _ = send.finish();
    net::read_frame::<DatanodeReply>(&mut recv, kind::DATANODE_REPLY).await
}

#[test]
fn a_datanode_whose_disk_fills_up_gets_no_new_blocks_and_nothing_is_corrupted() {
    let mut c = Cluster::start(ClusterSpec {
        datanodes: 4,
        replication: 3,
        block_size: MIB,
        ..ClusterSpec::default()
    });
    // dn-4's two data dirs are real 6 MiB file systems: room for five 1 MiB blocks each.
    if let Err(why) = c.start_datanode_on_small_disks(4, 6 * MIB) {
        // Only a machine that allows neither root mounts nor user namespaces gets here.
        eprintln!("SKIPPED: no small real disk for dn-4 on this machine: {why}");
        return;
    }
    wait_until(
        "dn-4 live on its small disks",
        Duration::from_secs(30),
        || {
            datanode(&c, "dn-4").is_some_and(|d| {
                d["state"] == "live"
                    && d["capacity"]
                        .as_u64()
                        .is_some_and(|cap| cap > 0 && cap <= 12 * MIB)
            })
        },
    );

    // A writer is given blocks on dn-4 while it has room (used once dn-4 is full).
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    c.ok(&["mkdir", "/late"]);
    let alone = rt.block_on(c.allocate_block("admin", "/late/alone", &[4]));
    let after_dn1 = rt.block_on(c.allocate_block("admin", "/late/piped", &[1, 4]));

    // A file twice as large as dn-4's disks: dn-4 takes what fits, the rest goes elsewhere.
    let a = random_bytes(24 * MIB as usize, 41);
    c.put_bytes("/a", &a, &[]);
    assert_eq!(c.get_bytes("/a"), a, "/a reads back");

    // Something else fills dn-4's disks to the last byte.
    for d in ["data1", "data2"] {
        fill(&c.datanode_dir(4).join(d));
    }
    wait_until(
        "the namenode hears that dn-4 is full",
        Duration::from_secs(20),
        || datanode(&c, "dn-4").is_some_and(|d| d["remaining"].as_u64().is_some_and(|r| r < MIB)),
    );
    let dn4 = datanode(&c, "dn-4").expect("dn-4 in the report");
    assert_eq!(dn4["state"], "live", "a full datanode stays live: {dn4}");
    let status = c.report().expect("report")["namenode"]["http_addr"]
        .as_str()
        .expect("status page address")
        .to_string();
    lode_tests::http_get_until(
        &status,
        "/",
        "the status page to show dn-4 full",
        Duration::from_secs(10),
        |page| page.contains("dn-4 is out of space") && page.contains("(full)"),
    );
    let dn4_metrics = dn4["http_addr"].as_str().expect("dn-4 metrics");
    let remaining = metric(dn4_metrics, "lode_datanode_remaining_bytes");
    assert!(
        remaining < MIB as f64,
        "dn-4 reports {remaining} bytes of room"
    );

    // A writer whose view is out of date still gets a clean refusal, alone or mid-pipeline.
    let direct = rt.block_on(write_block_raw(&c, &alone, 4, &[]));
    assert!(
        matches!(direct, Err(RpcError::Remote(ref w)) if w.code == ErrorCode::NoSpace),
        "a full datanode refuses a block: {direct:?}"
    );
    let piped = rt.block_on(write_block_raw(&c, &after_dn1, 1, &[4]));
    assert!(
        matches!(piped, Ok(DatanodeReply::WriteAck { ref stored, ref failed, .. })
            if stored == &["dn-1"] && failed == &["dn-4"]),
        "the pipeline names the full node as the failed one: {piped:?}"
    );
    let refusals = metric(dn4_metrics, "lode_datanode_no_space_refusals_total");
    assert!(refusals >= 2.0, "dn-4 counted {refusals} refusals");

    // New writes go to the other nodes, with full replication.
    let b = random_bytes(8 * MIB as usize, 42);
    c.put_bytes("/b", &b, &[]);
    for Block {
        offset, locations, ..
    } in blocks(&c, "/b")
    {
        assert_eq!(locations.len(), 3, "block at {offset} of /b: {locations:?}");
        assert!(
            !locations.contains(&"dn-4".to_string()),
            "block at {offset} of /b went to the full dn-4"
        );
    }
    assert_eq!(c.get_bytes("/b"), b, "/b reads back");

    // Nothing is corrupted or half-written on the full node, and every block is fully replicated.
    wait_until("fsck healthy", Duration::from_secs(30), || fsck_healthy(&c));
    let mut on_dn4 = 0;
    for Block {
        id,
        offset,
        len,
        locations,
    } in blocks(&c, "/a")
    {
        assert_eq!(locations.len(), 3, "block at {offset} of /a: {locations:?}");
        let replica = c.replica_path(4, id);
        assert_eq!(
            replica.is_some(),
            locations.contains(&"dn-4".to_string()),
            "dn-4 holds block {id} exactly when the namenode says so"
        );
        if let Some(p) = replica {
            let bytes = std::fs::read(&p).expect("read dn-4 replica");
            assert!(
                bytes == a[offset as usize..(offset + len) as usize],
                "dn-4's replica of block {id} matches the file"
            );
            assert!(p.with_extension("meta").exists(), "sidecar of {id}");
            on_dn4 += 1;
        }
    }
    assert!(on_dn4 > 0, "dn-4 took some of /a before it filled up");
    assert_eq!(c.replica_count(4), on_dn4, "no stray block files on dn-4");
    for d in ["data1", "data2"] {
        let tmp = c.datanode_dir(4).join(d).join("tmp");
        assert!(
            files_in(&tmp).is_empty(),
            "half-written blocks left in {}: {:?}",
            tmp.display(),
            files_in(&tmp)
        );
    }

    // Room again: replicas on a full disk can be deleted, and the namenode notices the room.
    c.ok(&["rm", "/a"]);
    for d in ["data1", "data2"] {
        std::fs::remove_file(c.datanode_dir(4).join(d).join("filler")).expect("remove filler");
    }
    wait_until("dn-4 has room again", Duration::from_secs(20), || {
        c.replica_count(4) == 0
            && datanode(&c, "dn-4")
                .is_some_and(|d| d["remaining"].as_u64().is_some_and(|r| r >= 10 * MIB))
    });
    lode_tests::http_get_until(
        &status,
        "/",
        "the status page to tell that dn-4 has space again",
        Duration::from_secs(10),
        |page| page.contains("dn-4 has space again"),
    );
    c.assert_no_unexpected_errors(&[]);
}

#[test]
fn a_failed_data_dir_leaves_service_and_its_replicas_are_copied_elsewhere() {
    let c = Cluster::start(ClusterSpec {
        datanodes: 4,
        replication: 3,
        block_size: 256 * 1024,
        fast_disk_check: true,
        ..ClusterSpec::default()
    });
    let a = random_bytes(8 * MIB as usize, 43);
    c.put_bytes("/a", &a, &[]);
    let data1 = c.datanode_dir(4).join("data1");
    let on_data1: Vec<u64> = blocks(&c, "/a")
        .iter()
        .map(|b| b.id)
        .filter(|id| data1.join("current").join(format!("blk_{id}")).exists())
        .collect();
    assert!(!on_data1.is_empty(), "dn-4's data1 holds some of /a");

    // The disk under data1 goes away (as when it is pulled and its mount point is gone).
    std::fs::rename(&data1, c.datanode_dir(4).join("data1-pulled")).expect("pull data1");
    wait_until(
        "dn-4 reports a failed data dir",
        Duration::from_secs(20),
        || datanode(&c, "dn-4").is_some_and(|d| d["failed_volumes"] == 1),
    );
    assert_eq!(c.get_bytes("/a"), a, "/a reads back while it heals");
    wait_until(
        "every block of /a back to 3 replicas",
        Duration::from_secs(60),
        || {
            fsck_healthy(&c)
                && blocks(&c, "/a").iter().all(|b| {
                    let mut d = b.locations.clone();
                    d.sort();
                    d.dedup();
                    d.len() == 3
                })
        },
    );
    // dn-4 no longer claims the lost replicas (unless one was copied back to its good dir).
    for b in blocks(&c, "/a") {
        if b.locations.contains(&"dn-4".to_string()) {
            assert!(
                c.replica_path(4, b.id).is_some(),
                "dn-4 is listed for block {} but holds no file of it",
                b.id
            );
        }
    }
    assert_eq!(c.get_bytes("/a"), a, "/a reads back after healing");
    lode_tests::http_get_until(
        c.report().expect("report")["namenode"]["http_addr"]
            .as_str()
            .expect("status page address"),
        "/",
        "the status page to tell of the failed dir",
        Duration::from_secs(10),
        |page| page.contains("dn-4 has 1 failed data dir"),
    );
    c.assert_no_unexpected_errors(&["data dir failed its check", "datanode lost data dirs"]);
}
