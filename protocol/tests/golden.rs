//! Golden bytes: one example of every message, encoded as a whole frame, compared with the files in
//! `tests/golden/v1/`. A change that alters the bytes fails here and is reviewed for a version bump.
//! `LODE_BLESS=1 cargo test -p lode-protocol --test golden` rewrites the files.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use lode_protocol::frame::{self, kind, Decoded, FrameHeader, HEADER_BYTES};
use lode_protocol::messages::*;
use lode_protocol::{Blake3Cv, BlockId, ErrorCode, InodeId, SessionId, WireError};
use serde::{de::DeserializeOwned, Serialize};

fn target(i: u8) -> Target {
    Target {
        name: format!("dn-{i}"),
        addr: format!("127.0.0.1:74{i:02}"),
    }
}

fn located() -> LocatedBlock {
    LocatedBlock {
        id: BlockId(7),
        offset: 1 << 20,
        len: 4096,
        cv: Some(Blake3Cv([3; 32])),
        locations: vec![target(1), target(2)],
        token: token(lode_protocol::token::READ, &[]),
    }
}

fn token(ops: u8, pipeline: &[&str]) -> Option<lode_protocol::token::BlockToken> {
    let key = lode_protocol::token::TokenKey {
        id: 0x0102030405060708,
        secret: [5; 32],
        expires_ms: 1_700_000_600_000,
    };
    Some(lode_protocol::token::sign(
        &key,
        lode_protocol::token::Grant {
            block: BlockId(7),
            ops,
            user: "alice".into(),
            expires_ms: 1_700_000_300_000,
            pipeline: pipeline.iter().map(|p| p.to_string()).collect(),
        },
    ))
}

fn receipt() -> lode_protocol::token::Receipt {
    lode_protocol::token::Receipt {
        datanode: "dn-1".into(),
        block: BlockId(7),
        len: 65536,
        cv: Blake3Cv([9; 32]),
        key_id: 3,
        mac: [5; 32],
    }
}

fn committed() -> CommittedBlock {
    CommittedBlock {
        id: BlockId(7),
        len: 65536,
        cv: Blake3Cv([9; 32]),
    }
}

fn check<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
    name: &str,
    k: u16,
    msg: T,
) {
    let bytes = frame::encode_frame(k, &msg).unwrap();
    let header = FrameHeader::decode(bytes[..HEADER_BYTES].try_into().unwrap()).unwrap();
    match frame::decode_body::<T>(header, k, &bytes[HEADER_BYTES..]).unwrap() {
        Decoded::Message(back) => assert_eq!(back, msg, "{name} round trip"),
        Decoded::Error(e) => panic!("{name} decoded as an error: {e}"),
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/v1")
        .join(format!("{name}.bin"));
    if std::env::var_os("LODE_BLESS").is_some() {
        std::fs::write(&path, &bytes).unwrap();
        return;
    }
    let golden = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (LODE_BLESS=1 writes it)", path.display()));
    assert_eq!(
        bytes, golden,
        "{name}: encoding changed; decide on a version bump, then LODE_BLESS=1"
    );
}

#[test]
fn every_message_matches_its_golden_bytes() {
    use ClientToNamenode as C;
    let s = SessionId(0x1122334455667788);
    let c = kind::CLIENT_TO_NAMENODE;
    check(
        "c2n_mkdir",
        c,
        C::Mkdir {
            path: "/a/b".into(),
            parents: true,
            mode: 0o755,
        },
    );
    check("c2n_list", c, C::List { path: "/a".into() });
    check(
        "c2n_stat",
        c,
        C::Stat {
            path: "/a/f".into(),
            blocks: true,
        },
    );
    check(
        "c2n_delete",
        c,
        C::Delete {
            path: "/a".into(),
            recursive: true,
        },
    );
    check(
        "c2n_rename",
        c,
        C::Rename {
            src: "/a".into(),
            dst: "/b".into(),
        },
    );
    check(
        "c2n_create",
        c,
        C::Create {
            path: "/f".into(),
            overwrite: true,
            replication: Some(3),
            block_size: Some(1 << 27),
            session: s,
            mode: 0o644,
            first_block: true,
        },
    );
    check(
        "c2n_add_block",
        c,
        C::AddBlock {
            inode: InodeId(5),
            session: s,
            previous: Some(committed()),
            receipts: vec![receipt()],
            exclude: vec!["dn-3".into()],
        },
    );
    check(
        "c2n_abandon_block",
        c,
        C::AbandonBlock {
            inode: InodeId(5),
            session: s,
            block: BlockId(7),
        },
    );
    check(
        "c2n_complete",
        c,
        C::Complete {
            inode: InodeId(5),
            session: s,
            last: Some(committed()),
            receipts: vec![receipt()],
            size: 65536,
        },
    );
    check("c2n_renew_lease", c, C::RenewLease { session: s });
    check("c2n_du", c, C::Du { path: "/".into() });
    check("c2n_report", c, C::Report);
    check(
        "c2n_report_bad_replica",
        c,
        C::ReportBadReplica {
            block: BlockId(7),
            datanode: "dn-2".into(),
        },
    );
    check(
        "c2n_abandon_file",
        c,
        C::AbandonFile {
            inode: InodeId(5),
            session: s,
        },
    );
    let h = Blake3Cv([0x42; 32]);
    check(
        "c2n_add_plugin",
        c,
        C::AddPlugin {
            hash: h,
            name: "wc".into(),
            path: "/.lode/plugins/42".into(),
        },
    );
    check("c2n_list_plugins", c, C::ListPlugins);
    check("c2n_approve_plugin", c, C::ApprovePlugin { hash: h });
    check("c2n_find_plugin", c, C::FindPlugin { key: "wc".into() });
    check(
        "c2n_set_replication",
        c,
        C::SetReplication {
            path: "/logs".into(),
            replication: 2,
        },
    );
    check("c2n_fsck", c, C::Fsck { path: "/".into() });
    check(
        "c2n_decommission",
        c,
        C::Decommission {
            datanode: "dn-2".into(),
            on: true,
        },
    );
    check("c2n_backup", c, C::Backup);
    check(
        "c2n_set_owner",
        c,
        C::SetOwner {
            path: "/a".into(),
            owner: Some("alice".into()),
            group: Some("staff".into()),
            recursive: true,
        },
    );
    check(
        "c2n_set_mode",
        c,
        C::SetMode {
            path: "/a".into(),
            change: lode_protocol::perm::parse_mode("u+x,go-w").unwrap(),
            recursive: false,
        },
    );
    check("c2n_refresh_groups", c, C::RefreshGroups);
    check(
        "c2n_set_quota",
        c,
        C::SetQuota {
            path: "/q".into(),
            names: Some(1000),
            bytes: None,
            clear: false,
        },
    );
    check("c2n_count", c, C::Count { path: "/q".into() });
    check(
        "c2n_trash",
        c,
        C::Trash {
            path: "/a".into(),
            recursive: true,
        },
    );
    check("c2n_expunge", c, C::Expunge);
    check(
        "c2n_set_times",
        c,
        C::SetTimes {
            path: "/a".into(),
            mtime_ms: Some(1_700_000_000_000),
        },
    );
    check(
        "c2n_add_namenode",
        c,
        C::ChangeNamenodes {
            change: NamenodeChange::Add {
                id: 4,
                name: "nn-4".into(),
                addr: "127.0.0.1:7464".into(),
            },
        },
    );
    check(
        "c2n_once",
        c,
        C::once(
            lode_protocol::RequestId {
                client: 0x0123_4567_89ab_cdef,
                call: 7,
            },
            &C::Mkdir {
                path: "/a".into(),
                parents: false,
                mode: 0o755,
            },
        ),
    );
    check(
        "c2n_remove_namenode",
        c,
        C::ChangeNamenodes {
            change: NamenodeChange::Remove {
                name: "nn-1".into(),
            },
        },
    );
    check(
        "n2c_trashed",
        kind::NAMENODE_REPLY,
        NamenodeReply::Trashed {
            to: Some("/user/alice/.Trash/Current/a".into()),
        },
    );
    check(
        "n2c_count",
        kind::NAMENODE_REPLY,
        NamenodeReply::Count {
            dirs: 2,
            files: 3,
            bytes: 4096,
            name_quota: Some(1000),
            space_quota: None,
            names_used: 5,
            space_used: 12288,
        },
    );
    check(
        "c2n_safemode",
        c,
        C::SafeMode {
            action: SafeModeAction::Leave,
        },
    );

    let r = kind::NAMENODE_REPLY;
    let status = FileStatus {
        path: "/f".into(),
        kind: EntryKind::File,
        size: 4096,
        replication: 2,
        block_size: 65536,
        mtime_ms: 1_700_000_000_000,
        complete: true,
        blocks: vec![located()],
        owner: "alice".into(),
        group: "staff".into(),
        mode: 0o1750,
    };
    check("n2c_ok", r, NamenodeReply::Ok);
    check("n2c_status", r, NamenodeReply::Status(status.clone()));
    check(
        "n2c_listing",
        r,
        NamenodeReply::Listing(vec![status.clone()]),
    );
    check(
        "n2c_listing_more",
        r,
        NamenodeReply::ListingMore(vec![status]),
    );
    check(
        "n2c_blocks_more",
        r,
        NamenodeReply::BlocksMore(vec![located()]),
    );
    check(
        "n2c_created",
        r,
        NamenodeReply::Created {
            inode: InodeId(5),
            replication: 3,
            block_size: 65536,
            lease_ms: 60_000,
            first: Some(located()),
        },
    );
    check("n2c_block", r, NamenodeReply::Block(located()));
    check(
        "n2c_usage",
        r,
        NamenodeReply::Usage {
            files: 1,
            directories: 2,
            bytes: 3,
            stored_bytes: 9,
        },
    );
    let report = ClusterReport {
        http_addr: Some("127.0.0.1:7500".into()),
        safemode: false,
        under_replicated: 1,
        missing: 0,
        corrupt: 2,
        datanodes: vec![DatanodeReport {
            name: "dn-1".into(),
            state: "live".into(),
            addr: "127.0.0.1:7401".into(),
            last_heartbeat_ms: 12,
            blocks: 3,
            capacity: 1 << 40,
            used: 1 << 20,
            remaining: 1 << 39,
            failed_volumes: 0,
            sandbox: vec!["rlimits".into(), "seccomp".into()],
            sandbox_missing: vec![],
            http_addr: None,
        }],
        namenodes: vec![NamenodeReport {
            name: "nn-1".into(),
            addr: "127.0.0.1:7400".into(),
            role: "leader".into(),
            term: 3,
            last_index: 40,
            applied_index: 39,
        }],
    };
    check("n2c_report", r, NamenodeReply::Report(report));
    let plugin = PluginRecord {
        hash: Blake3Cv([0x42; 32]),
        name: "wc".into(),
        path: "/.lode/plugins/42".into(),
        added_by: "admin".into(),
        approved: true,
        added_ms: 1_700_000_000_000,
    };
    check(
        "n2c_plugins",
        r,
        NamenodeReply::Plugins(vec![plugin.clone()]),
    );
    check("n2c_plugin", r, NamenodeReply::Plugin(plugin));
    let fsck = FsckReport {
        files: 2,
        blocks: 5,
        under_replicated: 1,
        missing: 0,
        corrupt: 0,
        problems: vec![FsckProblem {
            path: "/d/two".into(),
            block: BlockId(9),
            state: "under_replicated".into(),
            locations: vec!["dn-1".into()],
        }],
    };
    check(
        "n2c_fsck_more",
        r,
        NamenodeReply::FsckMore(fsck.problems.clone()),
    );
    check("n2c_fsck", r, NamenodeReply::Fsck(fsck));
    check(
        "n2c_safemode",
        r,
        NamenodeReply::SafeMode {
            on: true,
            reported: 3,
            total: 4,
        },
    );
    check(
        "n2c_backup_start",
        r,
        NamenodeReply::BackupStart {
            len: 100,
            hash: Blake3Cv([5; 32]),
            last_applied: 9,
        },
    );

    let d = kind::DATANODE_TO_NAMENODE;
    let rb = ReportedBlock {
        id: BlockId(7),
        len: 65536,
        cv: Blake3Cv([6; 32]),
    };
    check(
        "d2n_register",
        d,
        DatanodeToNamenode::Register {
            addr: "127.0.0.1:7401".into(),
            space: Space {
                capacity: 10,
                used: 5,
                remaining: 5,
                block_room: 3,
                failed_volumes: 1,
            },
            blocks: vec![rb],
            last: true,
        },
    );
    check(
        "d2n_heartbeat",
        d,
        DatanodeToNamenode::Heartbeat {
            space: Space {
                capacity: 10,
                used: 5,
                remaining: 5,
                block_room: 3,
                failed_volumes: 0,
            },
            received: vec![rb],
            deleted: vec![BlockId(8)],
        },
    );
    check(
        "d2n_info",
        d,
        DatanodeToNamenode::Info {
            protections: vec!["rlimits".into(), "landlock".into()],
            http_addr: Some("127.0.0.1:7501".into()),
            missing: vec!["landlock_scope".into()],
        },
    );
    check(
        "d2n_corrupt_replicas",
        d,
        DatanodeToNamenode::CorruptReplicas {
            blocks: vec![BlockId(7)],
        },
    );
    check(
        "d2n_report_more",
        d,
        DatanodeToNamenode::ReportMore {
            blocks: vec![rb],
            last: true,
        },
    );
    let n = kind::NAMENODE_TO_DATANODE;
    check("n2d_ack", n, NamenodeToDatanode::Ack);
    check(
        "n2d_commands",
        n,
        NamenodeToDatanode::Commands {
            reregister: false,
            delete: vec![rb],
            copy: vec![CopyCommand {
                block: BlockId(7),
                targets: vec![target(4)],
                token: token(lode_protocol::token::COPY, &["dn-4"]),
            }],
            keys: vec![lode_protocol::token::TokenKey {
                id: 9,
                secret: [6; 32],
                expires_ms: 1_700_000_600_000,
            }],
            term: 3,
        },
    );
    check(
        "n2d_registered",
        n,
        NamenodeToDatanode::Registered {
            delete: vec![rb],
            keys: vec![],
        },
    );
    check(
        "n2d_heartbeat_reply",
        n,
        NamenodeToDatanode::HeartbeatReply {
            reregister: true,
            delete: vec![BlockId(9)],
        },
    );

    let q = kind::DATANODE_REQUEST;
    check(
        "dn_write_block",
        q,
        DatanodeRequest::WriteBlock {
            block: BlockId(7),
            file_offset: 1 << 20,
            block_size: 1 << 20,
            downstream: vec![target(2), target(3)],
            token: token(lode_protocol::token::WRITE, &["dn-1", "dn-2", "dn-3"]),
        },
    );
    check(
        "dn_read_block",
        q,
        DatanodeRequest::ReadBlock {
            block: BlockId(7),
            offset: 65536,
            len: 100,
            token: token(lode_protocol::token::READ, &[]),
        },
    );
    check(
        "dn_block_checksums",
        q,
        DatanodeRequest::BlockChecksums {
            block: BlockId(7),
            token: token(lode_protocol::token::READ, &[]),
        },
    );
    let task = TaskRequest {
        plugin: Blake3Cv([0x42; 32]),
        plugin_path: "/.lode/plugins/42".into(),
        args_json: r#"{"pattern":"x"}"#.into(),
        path: "/logs/a".into(),
        block: located(),
        start: 0,
        end: 4096,
        following: vec![located()],
    };
    check("dn_run_task", q, DatanodeRequest::RunTask(Box::new(task)));
    let p = kind::DATANODE_REPLY;
    check(
        "dn_write_ack",
        p,
        DatanodeReply::WriteAck {
            stored: vec!["dn-1".into()],
            failed: vec!["dn-2".into()],
            receipts: vec![receipt()],
        },
    );
    check(
        "dn_read_start",
        p,
        DatanodeReply::ReadStart {
            block_len: 65536,
            first_piece_offset: 0,
            pieces: vec![Blake3Cv([1; 32])],
        },
    );
    check(
        "dn_checksums",
        p,
        DatanodeReply::Checksums {
            block_len: 65536,
            pieces: vec![Blake3Cv([2; 32])],
        },
    );
    let result = TaskResult {
        partial: vec![1, 2, 3],
        bytes_read_local: 4096,
        bytes_fetched_remote: 10,
        elapsed_ms: 5,
    };
    check("dn_task_done", p, DatanodeReply::TaskDone(result));

    use lode_protocol::messages::{PeerPart, PeerRpc};
    check(
        "nn_peer_append",
        kind::NAMENODE_PEER,
        PeerPart {
            rpc: PeerRpc::AppendEntries,
            bytes: vec![1, 2, 3],
            last: false,
        },
    );
    check(
        "nn_peer_vote_reply",
        kind::NAMENODE_PEER_REPLY,
        PeerPart {
            rpc: PeerRpc::Vote,
            bytes: vec![],
            last: true,
        },
    );
    check(
        "nn_peer_snapshot",
        kind::NAMENODE_PEER,
        PeerPart {
            rpc: PeerRpc::InstallSnapshot,
            bytes: vec![9],
            last: true,
        },
    );
    check(
        "nn_peer_status",
        kind::NAMENODE_PEER,
        PeerPart {
            rpc: PeerRpc::Status,
            bytes: vec![],
            last: true,
        },
    );
    check(
        "error",
        kind::ERROR,
        WireError::new(ErrorCode::NotFound, "/x: no such file or directory"),
    );
}

/// Arbitrary bytes never make a decoder panic or allocate what a length merely claims.
#[test]
fn decoders_survive_arbitrary_bytes() {
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..20_000 {
        let len = (next() % 300) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let mut head = [0u8; HEADER_BYTES];
        for (i, b) in head.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
        if round % 2 == 0 {
            head[6] = frame::ENCODING_VERSION;
        }
        if let Ok(h) = FrameHeader::decode(&head) {
            assert!(h.len <= frame::MAX_FRAME_BYTES);
        }
        let h = FrameHeader {
            len: bytes.len() as u32,
            kind: (next() % 16) as u16,
            version: frame::ENCODING_VERSION,
        };
        let _ = frame::decode_body::<ClientToNamenode>(h, kind::CLIENT_TO_NAMENODE, &bytes);
        let _ = frame::decode_body::<DatanodeToNamenode>(h, kind::DATANODE_TO_NAMENODE, &bytes);
        let _ = frame::decode_body::<DatanodeRequest>(h, kind::DATANODE_REQUEST, &bytes);
        let _ = frame::decode_body::<DatanodeReply>(h, kind::DATANODE_REPLY, &bytes);
        let _ = frame::decode_body::<NamenodeReply>(h, kind::NAMENODE_REPLY, &bytes);
        let _ =
            frame::decode_body::<lode_protocol::messages::PeerPart>(h, kind::NAMENODE_PEER, &bytes);
        let mut ph = [0u8; frame::PIECE_HEADER_BYTES];
        for (i, b) in ph.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
        if let Ok(p) = frame::PieceHeader::decode(&ph) {
            assert!(u64::from(p.len) <= lode_protocol::checksum::PIECE_BYTES);
        }
    }
}
