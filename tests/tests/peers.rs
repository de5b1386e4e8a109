//! Limits per peer: a request stream must bring its request in time and keep moving, a write
//! pipeline may not loop or repeat, and one certificate holding all it may of a server (connections
//! and streams) leaves room for everyone else. Real processes on loopback, raw QUIC requests made
//! with the user certificate as a hostile client would make them.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use lode_protocol::frame::kind;
use lode_protocol::messages::{
    ClientToNamenode, DatanodeReply, DatanodeRequest, LocatedBlock, NamenodeReply, Target,
};
use lode_protocol::net::{self, RpcError};
use lode_protocol::ErrorCode;
use lode_tests::{Cluster, ClusterSpec};

/// The connections one certificate may hold on the namenode.
const PER_PEER_CONNECTIONS: usize = lode_namenode::server::LIMITS.connections_per_peer;

fn target(c: &Cluster, i: usize) -> Target {
    Target {
        name: format!("dn-{}", i + 1),
        addr: format!("127.0.0.1:{}", c.datanode_ports[i]),
    }
}

/// A write of `block` (as the namenode allocated it, with its token) to `downstream`.
fn write_request(block: &LocatedBlock, downstream: Vec<Target>) -> DatanodeRequest {
    DatanodeRequest::WriteBlock {
        block: block.id,
        file_offset: 0,
        block_size: 1 << 20,
        downstream,
        token: block.token.clone(),
    }
}

/// Sends one request on a new stream and reads the reply (within 20 s), sending no data.
async fn datanode_exchange(
    conn: &quinn::Connection,
    req: &DatanodeRequest,
) -> Result<DatanodeReply, RpcError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(RpcError::from)?;
    net::write_frame(&mut send, kind::DATANODE_REQUEST, req).await?;
    tokio::time::timeout(
        Duration::from_secs(20),
        net::read_frame::<DatanodeReply>(&mut recv, kind::DATANODE_REPLY),
    )
    .await
    .map_err(|_| RpcError::Stream("no reply within 20 s".into()))?
}

#[test]
fn a_pipeline_that_loops_or_repeats_is_refused() {
    let c = Cluster::start(ClusterSpec::default());
    let home = c.user_home();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut refused = vec![];
    rt.block_on(async {
        let conn = c
            .connect("user", c.datanode_ports[0], "dn-1")
            .await
            .unwrap();
        let me = target(&c, 0);
        let other = target(&c, 1);
        let many: Vec<Target> = (0..7)
            .map(|i| Target {
                name: format!("dn-{}", i + 2),
                addr: other.addr.clone(),
            })
            .collect();
        for (i, (what, downstream)) in [
            ("itself 256 times", vec![me.clone(); 256]),
            ("itself", vec![me.clone()]),
            ("another datanode twice", vec![other.clone(), other.clone()]),
            ("seven more datanodes", many),
        ]
        .into_iter()
        .enumerate()
        {
            // A real write token, for a block the namenode placed on dn-1 alone: the token fixes
            // the pipeline, and the datanode checks the pipeline's shape besides.
            let block = c
                .allocate_block("user", &format!("{home}/loop-{i}"), &[1])
                .await;
            refused.push(block.id.0);
            let r = datanode_exchange(&conn, &write_request(&block, downstream)).await;
            assert!(
                matches!(&r, Err(RpcError::Remote(w))
                    if w.code == ErrorCode::InvalidToken && w.message.contains("pipeline")),
                "a pipeline naming {what}: {r:?}"
            );
        }
    });
    // The datanode serves on, and no half-written block is left of the refused requests.
    let data = lode_tests::random_bytes(300_000, 5);
    c.put_bytes("/after", &data, &[]);
    assert_eq!(c.get_bytes("/after"), data);
    for id in refused {
        assert!(
            c.replica_path(1, id).is_none(),
            "a replica of refused block {id}"
        );
    }
}

#[test]
fn streams_that_bring_nothing_are_let_go() {
    let idle = Duration::from_millis(1500);
    let c = Cluster::start(ClusterSpec {
        stream_idle_ms: Some(idle.as_millis() as u64),
        ..Default::default()
    });
    let home = c.user_home();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let idle_block = rt.block_on(async {
        // A write whose pieces never come ends with an error once the stream has been idle.
        let dn = c
            .connect("user", c.datanode_ports[0], "dn-1")
            .await
            .unwrap();
        let block = c
            .allocate_block("user", &format!("{home}/idle"), &[1])
            .await;
        let started = Instant::now();
        let r = datanode_exchange(&dn, &write_request(&block, vec![])).await;
        assert!(
            matches!(&r, Err(RpcError::Remote(w)) if w.message.contains("sent nothing")),
            "an idle write: {r:?}"
        );
        assert!(started.elapsed() >= idle, "ended before it was idle");

        // A stream that never brings its request gets an error after the request timeout, from
        // the datanode and from the namenode.
        let nn = c
            .connect("user", c.namenode_port, "namenode")
            .await
            .unwrap();
        for (server, conn) in [("datanode", &dn), ("namenode", &nn)] {
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            // Opening a stream is seen by the server only once something is sent on it.
            send.write_all(&[0u8]).await.unwrap();
            let started = Instant::now();
            let reply = tokio::time::timeout(Duration::from_secs(30), recv.read_to_end(1 << 20))
                .await
                .unwrap_or_else(|_| panic!("{server}: no answer within 30 s"))
                .unwrap_or_default();
            assert!(
                started.elapsed() >= lode_protocol::service::REQUEST_READ_TIMEOUT - idle,
                "{server} answered a partial request before its timeout"
            );
            assert!(
                String::from_utf8_lossy(&reply).contains("no request within"),
                "{server}: {}",
                String::from_utf8_lossy(&reply)
            );
        }
        block.id.0
    });
    assert!(
        c.replica_path(1, idle_block).is_none(),
        "the idle write left a replica"
    );
}

/// Opens `streams` write requests of `block` on a new connection of `cert` to datanode `i` and
/// keeps them, sending no piece.
async fn hold_write_streams(
    c: &Cluster,
    cert: &str,
    i: usize,
    block: &LocatedBlock,
    streams: usize,
) -> (
    quinn::Connection,
    Vec<(quinn::SendStream, quinn::RecvStream)>,
) {
    let conn = c
        .connect(cert, c.datanode_ports[i], &format!("dn-{}", i + 1))
        .await
        .unwrap();
    let mut held = vec![];
    for _ in 0..streams {
        let (mut send, recv) = conn.open_bi().await.unwrap();
        net::write_frame(
            &mut send,
            kind::DATANODE_REQUEST,
            &write_request(block, vec![]),
        )
        .await
        .unwrap();
        held.push((send, recv));
    }
    (conn, held)
}

#[test]
fn one_noisy_user_cannot_shut_out_another() {
    let c = Cluster::start(ClusterSpec::default());
    let home = c.user_home();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _held = rt.block_on(async {
        let mut blocks = vec![];
        for i in 0..3 {
            blocks.push(
                c.allocate_block("user", &format!("{home}/held-{i}"), &[i + 1])
                    .await,
            );
        }
        // As many namenode connections as one certificate may have are served; one more is not.
        let conns = c
            .connect_many("user", c.namenode_port, "namenode", PER_PEER_CONNECTIONS)
            .await
            .unwrap();
        let stat = ClientToNamenode::Stat {
            path: "/".into(),
            blocks: false,
        };
        let call = |conn: &quinn::Connection| {
            let conn = conn.clone();
            let stat = stat.clone();
            async move {
                net::call::<_, NamenodeReply>(
                    &conn,
                    kind::CLIENT_TO_NAMENODE,
                    kind::NAMENODE_REPLY,
                    &stat,
                )
                .await
            }
        };
        let served = call(conns.last().unwrap()).await;
        assert!(matches!(served, Ok(NamenodeReply::Status(_))), "{served:?}");
        let extra = c
            .connect("user", c.namenode_port, "namenode")
            .await
            .unwrap();
        let refused = call(&extra).await;
        assert!(
            refused.is_err(),
            "one connection too many was served: {refused:?}"
        );
        let closed = tokio::time::timeout(Duration::from_secs(10), extra.closed())
            .await
            .expect("one connection too many is closed");
        assert!(
            matches!(&closed, quinn::ConnectionError::ApplicationClosed(a)
                if String::from_utf8_lossy(&a.reason).contains("too many connections")),
            "one connection too many: {closed:?}"
        );
        // On every datanode the user opens more write streams than the datanode has disk threads
        // (9 connections of 64), each sending nothing, with a write token the namenode gave it
        // for a block of its own. Only its share is served; the rest wait.
        let mut held = vec![];
        for (i, block) in blocks.iter().enumerate() {
            for _ in 0..9 {
                held.push(hold_write_streams(&c, "user", i, block, 64).await);
            }
        }
        (conns, extra, held)
    });
    // Meanwhile the admin writes through every datanode and reads back, in good time (the user's
    // streams stay open for the datanodes' default idle limit of 30 s, well past this).
    let started = Instant::now();
    let data = lode_tests::random_bytes(1 << 20, 9);
    c.put_bytes("/admin-file", &data, &["--replication", "3"]);
    assert_eq!(c.get_bytes("/admin-file"), data);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the admin's put and get took {:?}",
        started.elapsed()
    );
    let st = c.stat("/admin-file");
    assert_eq!(st["replication"], 3, "{st}");
}

#[test]
fn a_task_that_names_following_blocks_without_end_is_refused() {
    let c = Cluster::start(ClusterSpec {
        datanodes: 1,
        replication: 1,
        ..Default::default()
    });
    // Two 1 MiB blocks with no newline at all, so a line-mode task reads on and on.
    let data: Vec<u8> = lode_tests::random_bytes(2 << 20, 3)
        .into_iter()
        .map(|b| if b == b'\n' { b'x' } else { b })
        .collect();
    c.put_bytes("/one-record", &data, &["--block-size", "1M"]);
    let wc = lode_tests::plugin_lib("wc");
    c.ok(&["plugin", "add", wc.to_str().unwrap()]);
    let hash = lode_protocol::Blake3Cv(*blake3::hash(&std::fs::read(&wc).unwrap()).as_bytes());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let nn = c
            .connect("user", c.namenode_port, "namenode")
            .await
            .unwrap();
        let status = net::call::<_, NamenodeReply>(
            &nn,
            kind::CLIENT_TO_NAMENODE,
            kind::NAMENODE_REPLY,
            &ClientToNamenode::Stat {
                path: "/one-record".into(),
                blocks: true,
            },
        )
        .await
        .unwrap();
        let NamenodeReply::Status(status) = status else {
            panic!("stat: {status:?}");
        };
        assert_eq!(status.blocks.len(), 2);
        let (first, second) = (status.blocks[0].clone(), status.blocks[1].clone());
        // The second block named 300 times: 300 MiB of one record, past what a task may read on.
        let task = lode_protocol::messages::TaskRequest {
            plugin: hash,
            plugin_path: format!("/.lode/plugins/{}", hash.to_hex()),
            args_json: "{}".into(),
            path: "/one-record".into(),
            end: first.len,
            block: first,
            start: 0,
            following: vec![second; 300],
        };
        let dn = c
            .connect("user", c.datanode_ports[0], "dn-1")
            .await
            .unwrap();
        let r = datanode_exchange(&dn, &DatanodeRequest::RunTask(Box::new(task))).await;
        assert!(
            matches!(&r, Err(RpcError::Remote(w)) if w.message.contains("runs on for more than")),
            "{r:?}"
        );
    });
    // The datanode serves on.
    assert_eq!(c.get_bytes("/one-record"), data);
}
