//! The namenode group's replicated log on real parts: openraft over QUIC with mutual TLS on
//! loopback, the fdatasync'ed raft log, and sled state machines. Each member's store is dumped
//! ([`lode_namenode::backup::dump`]) and compared byte for byte.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use lode_namenode::namespace::{MetaOp, ROOT};
use lode_namenode::perm::Perm;
use lode_namenode::raft::log::LogStore;
use lode_namenode::raft::net::Network;
use lode_namenode::raft::sm::StateMachine;
use lode_namenode::raft::{self, Edits, Member, NodeId, Raft};
use lode_namenode::store::{MetaStore, SledStore};
use lode_protocol::frame::kind;
use lode_protocol::messages::PeerPart;
use lode_protocol::net::{self, Identity, Pool, Role, TlsFiles, TransportConfig};
use lode_protocol::service::{self, Limits};
use lode_protocol::ErrorCode;

const LIMITS: Limits = Limits {
    connections: 64,
    connections_per_peer: 16,
    streams_per_connection: 64,
    streams_per_peer: 256,
};

fn timing() -> raft::Timing {
    raft::Timing {
        heartbeat: Duration::from_millis(100),
        election_min: Duration::from_millis(400),
        election_max: Duration::from_millis(800),
        snapshot_every: 40,
    }
}

struct Handler {
    raft: Raft,
    configured: Vec<(NodeId, Member)>,
}

impl service::Handler for Handler {
    async fn handle(
        self: Arc<Self>,
        identity: Identity,
        _addr: std::net::SocketAddr,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let Ok(first) = net::read_frame::<PeerPart>(&mut recv, kind::NAMENODE_PEER).await else {
            return;
        };
        let _ = raft::net::serve(
            &self.raft,
            &self.configured,
            &identity,
            first,
            &mut send,
            &mut recv,
        )
        .await;
    }
}

struct Node {
    id: NodeId,
    raft: Raft,
    store: Arc<SledStore>,
    endpoint: quinn::Endpoint,
    stop: tokio::sync::watch::Sender<bool>,
}

fn tls(certs: &Path, name: &str) -> TlsFiles {
    TlsFiles {
        ca: certs.join("ca.pem"),
        cert: certs.join(format!("{name}.pem")),
        key: certs.join(format!("{name}-key.pem")),
        deny: vec![],
    }
}

fn client_endpoint(certs: &Path, name: &str) -> quinn::Endpoint {
    let t = TransportConfig::default();
    let files = tls(certs, name);
    net::endpoint(
        "127.0.0.1:0".parse().unwrap(),
        None,
        net::client_config(&files, &t).unwrap(),
        &t,
    )
    .unwrap()
}

async fn start(
    id: NodeId,
    certs: &Path,
    dir: &Path,
    addr: std::net::SocketAddr,
    configured: &[(NodeId, Member)],
) -> Node {
    let name = format!("nn-{id}");
    let t = TransportConfig::default();
    let files = tls(certs, &name);
    let endpoint = net::endpoint(
        addr,
        Some(net::server_config(&files, &t).unwrap()),
        net::client_config(&files, &t).unwrap(),
        &t,
    )
    .unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let store = Arc::new(SledStore::open(&dir.join("sled")).unwrap());
    let log = LogStore::open(dir).unwrap();
    let sm = StateMachine::open(store.clone(), None, dir).unwrap();
    let pool = Arc::new(Pool::new(endpoint.clone(), Duration::from_secs(2)));
    let config = Arc::new(raft::config(&timing()).unwrap());
    let r = Raft::new(id, config, Network::new(pool), log, sm)
        .await
        .unwrap();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let handler = Arc::new(Handler {
        raft: r.clone(),
        configured: configured.to_vec(),
    });
    tokio::spawn(service::serve(endpoint.clone(), LIMITS, rx, handler));
    Node {
        id,
        raft: r,
        store,
        endpoint,
        stop,
    }
}

impl Node {
    async fn stop(self) {
        let _ = self.stop.send(true);
        self.raft.shutdown().await.unwrap();
        self.endpoint.close(0u32.into(), b"stopped");
        self.endpoint.wait_idle().await;
        drop(self.raft);
        self.store.flush().unwrap();
    }
}

fn mkdir(seq: u64) -> MetaOp {
    MetaOp::Mkdir {
        parent: ROOT,
        name: format!("d{seq}"),
        inode: lode_protocol::InodeId(1000 + seq),
        mtime_ms: seq,
        perm: Perm {
            owner: "admin".into(),
            group: "admin".into(),
            mode: 0o755,
        },
    }
}

async fn leader_of(nodes: &[&Node]) -> NodeId {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        for n in nodes {
            let m = n.raft.metrics().borrow().clone();
            if m.current_leader == Some(n.id) {
                return n.id;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no leader within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn applied_to(node: &Node, index: u64) {
    node.raft
        .wait(Some(Duration::from_secs(30)))
        .applied_index_at_least(Some(index), "caught up")
        .await
        .unwrap_or_else(|e| panic!("nn-{} did not apply up to {index}: {e}", node.id));
}

fn dump(node: &Node) -> Vec<u8> {
    let seq = lode_namenode::namespace::read_last_applied(&*node.store).unwrap();
    lode_namenode::backup::dump(&*node.store, seq).unwrap()
}

/// Writes `count` mkdirs, one entry each, through the leader; returns the last log index.
async fn write(leader: &Node, next_seq: &mut u64, count: u64) -> u64 {
    let mut last = 0;
    for _ in 0..count {
        let r = leader
            .raft
            .client_write(Edits {
                first_seq: *next_seq,
                ops: vec![mkdir(*next_seq)],
            })
            .await
            .unwrap();
        *next_seq += 1;
        last = r.log_id.index;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_member_group_replicates_fails_over_and_catches_a_member_up_by_snapshot() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    lode_client::certs::init(&certs, 0).unwrap();
    for name in ["nn-1", "nn-2", "nn-3", "nn-9"] {
        lode_client::certs::issue(&certs, name, Role::Namenode).unwrap();
    }
    // Fixed ports, so that a restarted member comes back where the others look for it.
    let addrs: Vec<std::net::SocketAddr> = (0..3)
        .map(|_| {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap()
        })
        .collect();
    let members: Vec<(NodeId, Member)> = (1..=3)
        .map(|i| {
            (
                i,
                Member {
                    name: format!("nn-{i}"),
                    addr: addrs[i as usize - 1].to_string(),
                },
            )
        })
        .collect();
    let dir = |i: NodeId| tmp.path().join(format!("m{i}"));
    let mut nodes = vec![];
    for (id, _) in &members {
        nodes.push(start(*id, &certs, &dir(*id), addrs[*id as usize - 1], &members).await);
    }
    let membership: BTreeMap<NodeId, Member> = members.iter().cloned().collect();
    nodes[0].raft.initialize(membership).await.unwrap();
    let first = leader_of(&nodes.iter().collect::<Vec<_>>()).await;

    // 1. Replication: every member applies the same edits and holds the same bytes.
    let mut seq = 1;
    let leader = nodes.iter().find(|n| n.id == first).unwrap();
    let last = write(leader, &mut seq, 10).await;
    for n in &nodes {
        applied_to(n, last).await;
    }
    let d = dump(&nodes[0]);
    for n in &nodes[1..] {
        assert_eq!(dump(n), d, "nn-{} differs from nn-1", n.id);
    }

    // 2. A certificate with the namenode role that is not a member cannot vote or lead, and a
    // member cannot speak for another.
    let rogue = client_endpoint(&certs, "nn-9");
    let conn = rogue
        .connect(addrs[0], "nn-1")
        .unwrap()
        .await
        .expect("connect as nn-9");
    let vote = openraft::raft::VoteRequest::<NodeId> {
        vote: openraft::Vote::new(1_000, 9),
        last_log_id: None,
    };
    let bytes = postcard::to_stdvec(&vote).unwrap();
    match net::call_peer(&conn, lode_protocol::messages::PeerRpc::Vote, &bytes).await {
        Err(net::RpcError::Remote(e)) => {
            assert_eq!(e.code, ErrorCode::PermissionDenied, "{e}");
            assert!(e.message.contains("not a member"), "{e}");
        }
        other => panic!("a non-member's vote request was answered: {other:?}"),
    }
    let posing = client_endpoint(&certs, "nn-2");
    let conn = posing.connect(addrs[0], "nn-1").unwrap().await.unwrap();
    let vote = openraft::raft::VoteRequest::<NodeId> {
        vote: openraft::Vote::new(1_000, 3),
        last_log_id: None,
    };
    let bytes = postcard::to_stdvec(&vote).unwrap();
    match net::call_peer(&conn, lode_protocol::messages::PeerRpc::Vote, &bytes).await {
        Err(net::RpcError::Remote(e)) => assert_eq!(e.code, ErrorCode::PermissionDenied, "{e}"),
        other => panic!("nn-2 voting as nn-3 was answered: {other:?}"),
    }
    // Neither attempt moved anyone's term.
    for n in &nodes {
        assert!(n.raft.metrics().borrow().current_term < 1_000);
    }

    // 3. Failover: stop the leader; the other two elect one and go on.
    let pos = nodes.iter().position(|n| n.id == first).unwrap();
    let old = nodes.remove(pos);
    old.stop().await;
    let second = leader_of(&nodes.iter().collect::<Vec<_>>()).await;
    assert_ne!(second, first);
    let leader = nodes.iter().find(|n| n.id == second).unwrap();
    // Enough entries past the snapshot policy that the leader purges what the stopped member
    // lacks: it can only catch up through a snapshot.
    let last = write(leader, &mut seq, 150).await;
    for n in &nodes {
        applied_to(n, last).await;
    }
    leader.raft.trigger().snapshot().await.unwrap();
    leader
        .raft
        .wait(Some(Duration::from_secs(30)))
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= last),
            "snapshot taken",
        )
        .await
        .unwrap();
    leader.raft.trigger().purge_log(last).await.unwrap();
    leader
        .raft
        .wait(Some(Duration::from_secs(30)))
        .metrics(|m| m.purged.is_some_and(|p| p.index >= last - 1), "purged")
        .await
        .unwrap();

    // 4. The old leader comes back from its own disk and is caught up by a snapshot.
    let back = start(
        first,
        &certs,
        &dir(first),
        addrs[first as usize - 1],
        &members,
    )
    .await;
    applied_to(&back, last).await;
    let d = dump(leader);
    assert_eq!(
        dump(&back),
        d,
        "the returning member differs from the leader"
    );
    for n in &nodes {
        assert_eq!(dump(n), d, "nn-{} differs from the leader", n.id);
    }
    let snap = back.raft.metrics().borrow().snapshot;
    assert!(
        snap.is_some_and(|s| s.index >= last - 1),
        "the returning member did not install a snapshot: {snap:?}"
    );
    assert!(
        std::fs::read_dir(dir(first))
            .unwrap()
            .any(|e| e.unwrap().file_name() == "raft.snapshot"),
        "the installed snapshot was not kept"
    );
    nodes.push(back);
    for n in nodes {
        n.stop().await;
    }
}

#[test]
fn the_log_and_state_machine_pass_openraft_s_storage_suite() {
    struct Builder;
    impl
        openraft::testing::StoreBuilder<
            raft::Lode,
            LogStore,
            StateMachine<lode_namenode::store::MemStore>,
            tempfile::TempDir,
        > for Builder
    {
        async fn build(
            &self,
        ) -> Result<
            (
                tempfile::TempDir,
                LogStore,
                StateMachine<lode_namenode::store::MemStore>,
            ),
            raft::StorageError,
        > {
            let dir = tempfile::tempdir().unwrap();
            let log = LogStore::open(dir.path()).unwrap();
            let sm = StateMachine::open(Arc::new(Default::default()), None, dir.path()).unwrap();
            Ok((dir, log, sm))
        }
    }
    openraft::testing::Suite::test_all(Builder).unwrap();
}
