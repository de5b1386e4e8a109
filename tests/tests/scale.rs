//! No single message limits the cluster's size: a datanode with two million replicas registers
//! through paged reports and gets its (paged) delete commands, and a directory too large for one
//! frame lists through continuation frames.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use lode_protocol::frame::kind;
use lode_protocol::messages::{
    ClientToNamenode, DatanodeToNamenode, NamenodeReply, NamenodeToDatanode, ReportedBlock, Space,
};
use lode_protocol::net;
use lode_protocol::paging::{self, PAGE_BYTES};
use lode_protocol::{Blake3Cv, BlockId};
use lode_tests::{wait_until, Cluster, ClusterSpec};

const REPLICAS: u64 = 2_000_000;

#[test]
fn a_datanode_with_two_million_replicas_registers_and_hears_every_delete() {
    let mut c = Cluster::start(ClusterSpec {
        datanodes: 2,
        replication: 1,
        ..Default::default()
    });
    // dn-2's certificate speaks for a datanode whose disks hold 2M replicas of blocks the namenode
    // never issued (a node from another life): every one must come back as a delete.
    c.kill_datanode(2);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = c
            .connect("dn-2", c.namenode_port, "namenode")
            .await
            .unwrap();
        let mut all: Vec<ReportedBlock> = (0..REPLICAS)
            .map(|i| ReportedBlock {
                id: BlockId(1 << 40 | i),
                len: 65536,
                cv: Blake3Cv([(i % 251) as u8; 32]),
            })
            .collect();
        let started = Instant::now();
        let mut req = DatanodeToNamenode::Register {
            addr: "127.0.0.1:9".into(),
            space: Space {
                capacity: 1 << 40,
                used: 1 << 39,
                remaining: 1 << 39,
                block_room: 1 << 39,
                failed_volumes: 0,
            },
            blocks: paging::take_page(&mut all, PAGE_BYTES),
            last: false,
        };
        let mut pages = 0;
        let mut deletes = 0u64;
        loop {
            let bytes = lode_protocol::frame::encode_frame(kind::DATANODE_TO_NAMENODE, &req)
                .unwrap()
                .len();
            assert!(bytes <= PAGE_BYTES + 4096, "a report page of {bytes} bytes");
            let reply: NamenodeToDatanode = net::call(
                &conn,
                kind::DATANODE_TO_NAMENODE,
                kind::NAMENODE_TO_DATANODE,
                &req,
            )
            .await
            .unwrap();
            let NamenodeToDatanode::Registered { delete, .. } = reply else {
                panic!("unexpected reply {reply:?}");
            };
            deletes += delete.len() as u64;
            pages += 1;
            if all.is_empty() {
                break;
            }
            let blocks = paging::take_page(&mut all, PAGE_BYTES);
            req = DatanodeToNamenode::ReportMore {
                last: all.is_empty(),
                blocks,
            };
        }
        assert!(pages > 50, "{pages} pages");
        assert_eq!(deletes, REPLICAS, "every unknown replica is to be deleted");
        eprintln!(
            "registered {REPLICAS} replicas in {pages} pages in {:?}",
            started.elapsed()
        );
        // The namenode still answers, and its report has the node.
        let report = c.report().unwrap();
        assert!(report["datanodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["name"] == "dn-2"));
    });
}

#[test]
fn a_directory_larger_than_a_frame_lists_whole() {
    let c = Cluster::start(ClusterSpec {
        datanodes: 1,
        replication: 1,
        ..Default::default()
    });
    const ENTRIES: usize = 20_000;
    c.ok(&["mkdir", "/big"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = std::sync::Arc::new(
            c.connect("admin", c.namenode_port, "namenode")
                .await
                .unwrap(),
        );
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(48));
        let mut tasks = vec![];
        for i in 0..ENTRIES {
            let conn = conn.clone();
            let permit = sem.clone().acquire_owned().await.unwrap();
            tasks.push(tokio::spawn(async move {
                let r = net::call_namenode(
                    &conn,
                    &ClientToNamenode::Mkdir {
                        path: format!("/big/a-rather-long-directory-name-{i:08}"),
                        parents: false,
                        mode: 0o755,
                    },
                )
                .await;
                drop(permit);
                r
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), NamenodeReply::Ok);
        }
        // One listing through the raw call: more than one frame arrived and joined.
        let reply = net::call_namenode(
            &conn,
            &ClientToNamenode::List {
                path: "/big".into(),
            },
        )
        .await
        .unwrap();
        let NamenodeReply::Listing(l) = &reply else {
            panic!("unexpected {reply:?}");
        };
        assert_eq!(l.len(), ENTRIES);
        assert!(
            paging::split_reply(reply.clone()).len() > 1,
            "the listing needed pages"
        );
    });
    // And through the CLI, as a user would.
    let out = c.ok(&["ls", "--json", "/big"]);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), ENTRIES);
    wait_until("namenode still answers", Duration::from_secs(5), || {
        c.report().is_some()
    });
}
