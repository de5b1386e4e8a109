//! Identity and hostile input: foreign CAs, certificates used in the wrong role, garbage and
//! oversized frames, configs that point nowhere, unusable data dirs; and servers' files private to
//! them.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use lode_protocol::frame::{kind, FrameHeader, ENCODING_VERSION, MAX_FRAME_BYTES};
use lode_protocol::messages::{ClientToNamenode, NamenodeReply};
use lode_protocol::net::{self, RpcError};
use lode_protocol::{ErrorCode, SessionId};
use lode_tests::{assert_one_line_error, free_port, random_bytes, Cluster, ClusterSpec};

fn config_with(
    c: &Cluster,
    name: &str,
    certs: &std::path::Path,
    namenode_port: u16,
) -> std::path::PathBuf {
    let path = c
        .dir()
        .join(format!("client-{name}-{}.toml", rand::random::<u32>()));
    std::fs::write(
        &path,
        format!(
            "namenode = \"127.0.0.1:{namenode_port}\"\n[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/{name}.pem\"\nkey = \"{0}/{name}-key.pem\"\n",
            certs.display()
        ),
    )
    .unwrap();
    path
}

#[test]
fn foreign_and_wrong_role_certificates_are_refused() {
    let c = Cluster::start(ClusterSpec {
        datanodes: 1,
        replication: 1,
        ..Default::default()
    });
    let other = c.dir().join("other-ca");
    lode_client::certs::init(&other, 1).unwrap();
    let foreign = config_with(&c, "admin", &other, c.namenode_port);
    let out = c.lode_with(&foreign, &["ls", "/"], None);
    assert_one_line_error(&out, &["ls", "/ (foreign CA)"]);

    // A datanode certificate cannot act as a client.
    let dn_as_client = config_with(&c, "dn-1", &c.dir().join("certs"), c.namenode_port);
    let out = c.lode_with(&dn_as_client, &["mkdir", "/x"], None);
    assert_one_line_error(&out, &["mkdir (datanode cert)"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("datanode certificate"));

    // A user certificate cannot register as a datanode.
    let cfg = c.dir().join("fake-dn.toml");
    std::fs::write(
        &cfg,
        format!(
            "name = \"dn-fake\"\nlisten = \"127.0.0.1:{}\"\nnamenode = \"127.0.0.1:{}\"\ndata_dirs = [\"fake-data\"]\n\
             heartbeat_interval_ms = 100\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/user.pem\"\nkey = \"certs/user-key.pem\"\n",
            free_port(),
            c.namenode_port
        ),
    )
    .unwrap();
    let log = std::fs::File::create(c.dir().join("fake-dn.out")).unwrap();
    let mut fake = Command::new(lode_tests::bin_dir().join("lode-datanode"))
        .args(["--config", cfg.to_str().unwrap()])
        .stderr(log)
        .spawn()
        .unwrap();
    lode_tests::wait_until(
        "the fake datanode to be refused",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(c.dir().join("fake-dn.out"))
                .unwrap_or_default()
                .contains("only a datanode certificate")
        },
    );
    fake.kill().unwrap();
    fake.wait().unwrap();
    let report = c.report().unwrap();
    assert_eq!(report["datanodes"].as_array().unwrap().len(), 1, "{report}");

    // The user certificate works as a client.
    c.ok(&["mkdir", "/still-fine"]);
    let user = c.dir().join("client-user.toml");
    let out = c.lode_with(&user, &["ls", "/"], None);
    assert!(out.status.success());
}

async fn raw_stream_exchange(
    c: &Cluster,
    port: u16,
    server_name: &str,
    payload: &[u8],
) -> Result<Vec<u8>, String> {
    let conn = c.connect("user", port, server_name).await?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(payload).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    let reply = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20))
        .await
        .map_err(|_| "no reply".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(reply)
}

#[test]
fn garbage_and_oversized_frames_get_an_error_and_servers_keep_running() {
    let c = Cluster::start(ClusterSpec {
        datanodes: 1,
        replication: 1,
        ..Default::default()
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let oversized = FrameHeader {
        len: MAX_FRAME_BYTES + 1,
        kind: kind::CLIENT_TO_NAMENODE,
        version: ENCODING_VERSION,
    }
    .encode();
    let mut lying = FrameHeader {
        len: 1000,
        kind: kind::CLIENT_TO_NAMENODE,
        version: ENCODING_VERSION,
    }
    .encode()
    .to_vec();
    lying.extend_from_slice(&[0xff; 1000]);
    let targets = [(c.namenode_port, "namenode"), (c.datanode_ports[0], "dn-1")];
    for (port, name) in targets {
        for payload in [
            random_bytes(5000, 1),
            oversized.to_vec(),
            lying.clone(),
            vec![],
        ] {
            let reply = rt.block_on(raw_stream_exchange(&c, port, name, &payload));
            // The server answers with an error frame (or closes the stream); it never crashes.
            if let Ok(bytes) = reply {
                if bytes.len() >= 8 {
                    let h = FrameHeader::decode(bytes[..8].try_into().unwrap()).unwrap();
                    assert_eq!(
                        h.kind,
                        kind::ERROR,
                        "{name} should answer garbage with an error frame"
                    );
                }
            }
        }
        // Raw UDP garbage that is not QUIC at all.
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..50 {
            sock.send_to(&random_bytes(1200, i), ("127.0.0.1", port))
                .unwrap();
        }
    }
    // A well-formed request that is refused crosses the wire as a code.
    let refused = rt.block_on(async {
        let conn = connect_as(&c, "user").await;
        nn_call(
            &conn,
            &ClientToNamenode::List {
                path: "/missing".into(),
            },
        )
        .await
    });
    assert!(
        matches!(refused, Err(RpcError::Remote(ref w)) if w.code == ErrorCode::NotFound),
        "{refused:?}"
    );
    // Both servers still serve.
    let bytes = random_bytes(100_000, 5);
    c.put_bytes("/after-garbage", &bytes, &[]);
    assert_eq!(c.get_bytes("/after-garbage"), bytes);
}

#[test]
fn configs_that_point_nowhere_fail_with_one_line() {
    let c = Cluster::start(ClusterSpec {
        datanodes: 1,
        replication: 1,
        ..Default::default()
    });
    let nowhere = config_with(&c, "admin", &c.dir().join("certs"), free_port());
    let started = std::time::Instant::now();
    let out = c.lode_with(&nowhere, &["ls", "/"], None);
    assert_one_line_error(&out, &["ls / (nowhere)"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the namenode"));
    assert!(started.elapsed() < Duration::from_secs(20));
    let missing = c.dir().join("no-such-config.toml");
    let out = c.lode_with(&missing, &["ls", "/"], None);
    assert_one_line_error(&out, &["ls / (missing config)"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-config.toml"));
}

#[test]
fn a_datanode_with_an_unusable_data_dir_exits_with_a_clear_error() {
    let c = Cluster::start(ClusterSpec {
        datanodes: 1,
        replication: 1,
        ..Default::default()
    });
    let blocker = c.dir().join("a-file");
    std::fs::write(&blocker, b"x").unwrap();
    let cfg = c.dir().join("bad-dn.toml");
    std::fs::write(
        &cfg,
        format!(
            "name = \"dn-1\"\nlisten = \"127.0.0.1:{}\"\nnamenode = \"127.0.0.1:{}\"\ndata_dirs = [\"{}/data\"]\n\
             [tls]\nca = \"certs/ca.pem\"\ncert = \"certs/dn-1.pem\"\nkey = \"certs/dn-1-key.pem\"\n",
            free_port(),
            c.namenode_port,
            blocker.display()
        ),
    )
    .unwrap();
    let out = Command::new(lode_tests::bin_dir().join("lode-datanode"))
        .args(["--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.trim().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("lode-datanode: ") && last.contains("a-file/data"),
        "{stderr}"
    );
}

async fn connect_as(c: &Cluster, cert: &str) -> quinn::Connection {
    c.connect(cert, c.namenode_port, "namenode").await.unwrap()
}

async fn nn_call(
    conn: &quinn::Connection,
    req: &ClientToNamenode,
) -> Result<NamenodeReply, RpcError> {
    net::call(conn, kind::CLIENT_TO_NAMENODE, kind::NAMENODE_REPLY, req).await
}

/// Creates `path` as the holder of `conn` under a new session: the session and the file's inode.
async fn create_file(conn: &quinn::Connection, path: &str) -> (SessionId, lode_protocol::InodeId) {
    let session = SessionId(rand::random());
    let created = nn_call(
        conn,
        &ClientToNamenode::Create {
            path: path.into(),
            overwrite: false,
            replication: None,
            block_size: None,
            session,
            mode: 0o644,
            first_block: false,
        },
    )
    .await
    .unwrap();
    let NamenodeReply::Created { inode, .. } = created else {
        panic!("create: {created:?}");
    };
    (session, inode)
}

#[test]
fn a_write_session_is_bound_to_the_certificate_that_opened_it() {
    let c = Cluster::start(ClusterSpec::default());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let owner = connect_as(&c, "admin").await;
        let other = connect_as(&c, "user").await;
        let (session, inode) = create_file(&owner, "/bound").await;
        // Another certificate presenting the same session id misses the lease.
        let complete = ClientToNamenode::Complete {
            inode,
            session,
            last: None,
            receipts: vec![],
            size: 0,
        };
        for req in [
            ClientToNamenode::AddBlock {
                inode,
                session,
                previous: None,
                receipts: vec![],
                exclude: vec![],
            },
            complete.clone(),
        ] {
            let r = nn_call(&other, &req).await;
            assert!(
                matches!(r, Err(RpcError::Remote(ref w)) if w.code == ErrorCode::LeaseConflict),
                "{req:?} from another certificate: {r:?}"
            );
        }
        let _ = nn_call(&other, &ClientToNamenode::AbandonFile { inode, session }).await;
        // The file is still the owner's to finish.
        let done = nn_call(&owner, &complete).await;
        assert!(
            matches!(done, Ok(NamenodeReply::Ok)),
            "owner completes: {done:?}"
        );
    });
    let st = c.stat("/bound");
    assert_eq!(st["size"], 0);
    assert_eq!(st["complete"], true, "{st}");
}

/// Every file and directory under `dir`, with its mode.
fn modes(dir: &std::path::Path, out: &mut Vec<(std::path::PathBuf, u32, bool)>) {
    use std::os::unix::fs::PermissionsExt;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = e.metadata().unwrap();
        let is_dir = meta.is_dir();
        out.push((e.path(), meta.permissions().mode() & 0o777, is_dir));
        if is_dir {
            modes(&e.path(), out);
        }
    }
}

#[test]
fn replicas_and_metadata_are_private_to_their_servers() {
    let c = Cluster::start(ClusterSpec {
        datanodes: 2,
        replication: 2,
        ..Default::default()
    });
    c.put_bytes("/private", &lode_tests::random_bytes(3 * 65536 + 5, 3), &[]);
    let mut all = vec![];
    for dir in [c.dir().join("meta"), c.datanode_dir(1), c.datanode_dir(2)] {
        use std::os::unix::fs::PermissionsExt;
        all.push((
            dir.clone(),
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            true,
        ));
        modes(&dir, &mut all);
    }
    let replicas = all
        .iter()
        .filter(|(p, _, _)| p.to_string_lossy().contains("blk_"))
        .count();
    assert!(replicas >= 2 * 2 * 4, "{replicas} replica files found");
    let open: Vec<String> = all
        .iter()
        .filter(|(_, mode, _)| mode & 0o077 != 0)
        .map(|(p, mode, d)| {
            format!(
                "{} {:o}{}",
                p.display(),
                mode,
                if *d { " (dir)" } else { "" }
            )
        })
        .collect();
    assert!(open.is_empty(), "readable by others:\n{}", open.join("\n"));
}

/// A server whose certificate is valid for the name but of the wrong role is refused by clients:
/// a datanode certificate issued for "namenode" (by the cluster's own CA) cannot pose as the
/// namenode; and a user certificate cannot serve at all (no server authentication in it).
#[test]
fn a_certificate_of_the_wrong_role_cannot_pose_as_a_server() {
    use lode_protocol::net::{self, Role, TlsFiles, TransportConfig};
    let c = Cluster::start(ClusterSpec {
        datanodes: 1,
        replication: 1,
        ..Default::default()
    });
    let impostors = c.dir().join("impostors");
    std::fs::create_dir_all(&impostors).unwrap();
    for f in ["ca.pem", "ca-key.pem"] {
        std::fs::copy(c.dir().join("certs").join(f), impostors.join(f)).unwrap();
    }
    lode_client::certs::issue(&impostors, "namenode", Role::Datanode).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let files = |name: &str| TlsFiles {
        ca: impostors.join("ca.pem"),
        cert: impostors.join(format!("{name}.pem")),
        key: impostors.join(format!("{name}-key.pem")),
        ..Default::default()
    };
    // A QUIC server presenting `files`' certificate, completing every handshake it can.
    let serve = |files: TlsFiles| -> u16 {
        let t = TransportConfig::default();
        let _guard = rt.enter();
        let server = net::server_config(&files, &t).unwrap();
        let client = net::client_config(&files, &t).unwrap();
        let ep = net::endpoint("127.0.0.1:0".parse().unwrap(), Some(server), client, &t).unwrap();
        let port = ep.local_addr().unwrap().port();
        rt.spawn(async move {
            while let Some(incoming) = ep.accept().await {
                tokio::spawn(async move {
                    if let Ok(conn) = incoming.await {
                        let _ = conn.closed().await;
                    }
                });
            }
        });
        port
    };
    let port = serve(files("namenode"));
    let admin = config_with(&c, "admin", &c.dir().join("certs"), port);
    let out = c.lode_with(&admin, &["ls", "/"], None);
    assert_one_line_error(&out, &["ls", "/ (impostor namenode)"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("datanode namenode") && err.contains("not the namenode"),
        "{err}"
    );
    // A user certificate names no host and carries no server authentication: TLS refuses it.
    lode_client::certs::issue(&impostors, "mallory", Role::User).unwrap();
    let port = serve(files("mallory"));
    let refused = rt.block_on(c.connect("admin", port, "mallory"));
    assert!(refused.is_err(), "a user certificate served TLS");
}

/// A lost certificate is shut out by its fingerprint in `[tls] deny`, although the CA signed it.
#[test]
fn a_denied_certificate_is_shut_out() {
    let mut c = Cluster::start(ClusterSpec {
        datanodes: 1,
        replication: 1,
        ..Default::default()
    });
    let user = c.dir().join("client-user.toml");
    let out = c.lode_with(&user, &["ls", "/"], None);
    assert!(out.status.success());
    let line = String::from_utf8(c.ok(&[
        "certs",
        "fingerprint",
        c.dir().join("certs/user.pem").to_str().unwrap(),
    ]))
    .unwrap();
    let fp = line.split_whitespace().next().unwrap().to_string();
    assert_eq!(fp.len(), 64, "{line}");
    // In the form openssl prints it: upper case, colons.
    let openssl_form: Vec<String> = fp
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|p| String::from_utf8(p.to_vec()).unwrap())
        .collect();
    let config = c.dir().join("namenode.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let key_line = "key = \"certs/namenode-key.pem\"\n";
    assert!(text.contains(key_line), "{text}");
    let denied = text.replace(
        key_line,
        &format!("{key_line}deny = [\"{}\"]\n", openssl_form.join(":")),
    );
    std::fs::write(&config, denied).unwrap();
    c.kill_namenode();
    c.start_namenode();
    let out = c.lode_with(&user, &["ls", "/"], None);
    assert_one_line_error(&out, &["ls", "/ (denied certificate)"]);
    // Everyone else still gets in.
    c.ok(&["ls", "/"]);
}

/// A client's word that a replica is bad deletes nothing: the holder re-verifies it. Reported
/// bad at every holder, over and over, a good block keeps all its replicas.
#[test]
fn reports_of_bad_replicas_from_a_client_make_the_holders_verify_and_delete_nothing() {
    let c = Cluster::start(ClusterSpec::default());
    let data = random_bytes(40_000, 21);
    c.put_bytes("/precious", &data, &[]);
    let st = c.stat("/precious");
    let block = st["blocks"][0]["id"].as_u64().unwrap();
    let holders: Vec<String> = st["blocks"][0]["locations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_string())
        .collect();
    assert_eq!(holders.len(), 3, "{st}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let user = connect_as(&c, "user").await;
        for _ in 0..20 {
            for holder in &holders {
                let r = nn_call(
                    &user,
                    &ClientToNamenode::ReportBadReplica {
                        block: lode_protocol::BlockId(block),
                        datanode: holder.clone(),
                    },
                )
                .await;
                assert!(matches!(r, Ok(NamenodeReply::Ok)), "{r:?}");
            }
        }
    });
    // Still offered at every holder the moment the reports are in.
    let st = c.stat("/precious");
    assert_eq!(
        st["blocks"][0]["locations"].as_array().unwrap().len(),
        3,
        "{st}"
    );
    // Each holder verifies its replica, finds it good, and keeps it.
    lode_tests::wait_until(
        "every holder to verify its replica",
        Duration::from_secs(30),
        || {
            holders.iter().all(|h| {
                c.log(h).lines().any(|l| {
                    l.contains("replica verified on request") && l.contains(&block.to_string())
                })
            })
        },
    );
    let st = c.stat("/precious");
    assert_eq!(
        st["blocks"][0]["locations"].as_array().unwrap().len(),
        3,
        "{st}"
    );
    for dn in 1..=3 {
        let path = c
            .replica_path(dn, block)
            .expect("every replica is still on disk");
        assert!(std::fs::metadata(path).unwrap().len() > 0);
    }
    assert_eq!(c.get_bytes("/precious"), data);
}

/// A writer's word alone commits nothing: a block committed with a length and value that no
/// datanode reported is refused (after the namenode waits for confirmations), the file stays
/// uncommitted, and a restarted namenode leaves safe mode as usual.
#[test]
fn a_block_no_datanode_confirms_is_never_committed() {
    let mut c = Cluster::start(ClusterSpec::default());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let home = c.user_home();
    rt.block_on(async {
        let user = connect_as(&c, "user").await;
        let (session, inode) = create_file(&user, &format!("{home}/made-up")).await;
        let added = nn_call(
            &user,
            &ClientToNamenode::AddBlock {
                inode,
                session,
                previous: None,
                receipts: vec![],
                exclude: vec![],
            },
        )
        .await
        .unwrap();
        let NamenodeReply::Block(block) = added else {
            panic!("add block: {added:?}");
        };
        // No byte is sent to any datanode; the client claims 1 MB with a value of its own.
        let claim = lode_protocol::messages::CommittedBlock {
            id: block.id,
            len: 1_000_000,
            cv: lode_protocol::Blake3Cv([7; 32]),
        };
        // With receipts of its own making: a made-up signature, and the key id of none.
        let forged = |datanode: &str, key_id: u64| lode_protocol::token::Receipt {
            datanode: datanode.into(),
            block: claim.id,
            len: claim.len,
            cv: claim.cv,
            key_id,
            mac: [1; 32],
        };
        let receipts = vec![
            forged("dn-1", 0),
            forged("dn-2", u64::MAX),
            forged("dn-3", 1),
        ];
        let add = ClientToNamenode::AddBlock {
            inode,
            session,
            previous: Some(claim),
            receipts: receipts.clone(),
            exclude: vec![],
        };
        let complete = ClientToNamenode::Complete {
            inode,
            session,
            last: Some(claim),
            receipts,
            size: claim.len,
        };
        // Both at once: each waits for confirmations that never come (longer than the lease).
        let (a, b) = tokio::join!(nn_call(&user, &add), nn_call(&user, &complete));
        for (req, r) in [(add, a), (complete, b)] {
            assert!(
                matches!(&r, Err(RpcError::Remote(w)) if w.code == ErrorCode::Unavailable
                    && w.message.contains("nothing was committed")),
                "{req:?}: {r:?}"
            );
        }
    });
    let nn = c.report().unwrap()["namenode"]["http_addr"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, metrics) = lode_tests::http_get(&nn, "/metrics").unwrap();
    assert!(
        metrics.contains("lode_namenode_replica_receipts_total{kind=\"refused\"} 6")
            && metrics.contains("lode_namenode_replica_receipts_total{kind=\"accepted\"} 0"),
        "the six forged receipts refused: {metrics}"
    );
    // Never committed: still under construction, or gone with its lease.
    let out = c.lode(&["stat", "--json", "/made-up"]);
    if out.status.success() {
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(st["complete"], false, "{st}");
        assert_eq!(st["size"], 0, "{st}");
    }
    c.kill_namenode();
    c.start_namenode();
    c.wait_live(3);
    lode_tests::wait_until(
        "the restarted namenode out of safe mode",
        Duration::from_secs(30),
        || c.report().is_some_and(|r| r["safemode"] == false),
    );
}

/// Only an admin may change `/.lode`, where plugin libraries live (or act on `/` as a whole):
/// the user certificate can neither delete, move, overwrite nor re-replicate them, and a file
/// planted under a library's name before it is added is caught.
#[test]
fn only_an_admin_changes_the_plugin_libraries() {
    let c = Cluster::start(ClusterSpec::default());
    let wc = lode_tests::plugin_lib("wc");
    c.ok(&["plugin", "add", wc.to_str().unwrap()]);
    let hash = blake3::hash(&std::fs::read(&wc).unwrap())
        .to_hex()
        .to_string();
    let library = format!("/.lode/plugins/{hash}");
    let before = c.stat(&library);
    let user = c.dir().join("client-user.toml");
    let other = c.dir().join("planted.bin");
    std::fs::write(&other, b"not a plugin").unwrap();
    let other = other.to_str().unwrap();
    for args in [
        vec!["rm", "-r", "/.lode"],
        vec!["rm", library.as_str()],
        vec!["rm", "-r", "/"],
        vec!["mv", "/.lode/plugins", "/mine"],
        vec!["mv", library.as_str(), "/mine"],
        vec!["setrep", "1", library.as_str()],
        vec!["setrep", "1", "/"],
        vec!["put", "-f", other, library.as_str()],
        vec!["mkdir", "/.lode/elsewhere"],
        vec!["put", other, "/.lode/planted"],
    ] {
        let out = c.lode_with(&user, &args, None);
        assert_one_line_error(&out, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("only an admin can change /.lode"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(c.stat(&library), before, "the library changed");
    // A user may still add a plugin (it waits for an admin's approval), but not one whose name
    // someone has taken with other bytes.
    let grep = lode_tests::plugin_lib("grep");
    let grep_hash = blake3::hash(&std::fs::read(&grep).unwrap())
        .to_hex()
        .to_string();
    let planted = c.lode_with(
        &user,
        &["put", other, &format!("/.lode/plugins/{grep_hash}")],
        None,
    );
    assert!(planted.status.success(), "a new file in /.lode/plugins");
    let out = c.lode_with(&user, &["plugin", "add", grep.to_str().unwrap()], None);
    assert_one_line_error(&out, &["plugin add over a planted file"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("holds other bytes"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csvsum = lode_tests::plugin_lib("csvsum");
    let out = c.lode_with(&user, &["plugin", "add", csvsum.to_str().unwrap()], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The admin can still do what it likes there.
    c.ok(&["rm", &format!("/.lode/plugins/{grep_hash}")]);
    c.ok(&["setrep", "2", &library]);
}

/// The audit log: one JSON line per namespace operation, with exactly the contract's fields, the
/// certificate's user, both paths of a rename, and `allowed: false` for a refused one.
#[test]
fn namespace_operations_are_audited() {
    let c = Cluster::start(ClusterSpec::default());
    let user = c.dir().join("client-user.toml");
    c.user_home();
    for args in [
        vec!["mkdir", "/user/user/audited"],
        vec!["ls", "/"],
        vec!["mv", "/user/user/audited", "/user/user/moved"],
        vec!["rm", "-r", "/user/user/moved"],
    ] {
        let out = c.lode_with(&user, &args, None);
        assert!(out.status.success(), "{args:?}");
    }
    let out = c.lode_with(&user, &["rm", "-r", "/.lode"], None);
    assert!(!out.status.success());
    let lines = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(c.dir().join("audit.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("an audit line is JSON"))
            .collect()
    };
    let find = |entries: &[serde_json::Value], op: &str, path: &str| -> Option<serde_json::Value> {
        entries
            .iter()
            .find(|e| e["user"] == "user" && e["op"] == op && e["path"] == path)
            .cloned()
    };
    let mut entries = vec![];
    lode_tests::wait_until(
        "the refused delete audited",
        Duration::from_secs(10),
        || {
            entries = lines();
            find(&entries, "delete", "/.lode").is_some()
        },
    );
    for e in &entries {
        let mut keys: Vec<&String> = e.as_object().unwrap().keys().collect();
        keys.sort();
        assert_eq!(
            keys,
            ["addr", "allowed", "dst", "op", "path", "time", "user"],
            "{e}"
        );
        assert!(e["addr"].as_str().unwrap().starts_with("127.0.0.1:"), "{e}");
    }
    let mkdir = find(&entries, "mkdirs", "/user/user/audited").expect("mkdir audited");
    assert_eq!(mkdir["allowed"], true);
    assert_eq!(mkdir["dst"], serde_json::Value::Null);
    let rename = find(&entries, "rename", "/user/user/audited").expect("mv audited");
    assert_eq!(rename["dst"], "/user/user/moved");
    assert!(find(&entries, "listStatus", "/").is_some(), "ls audited");
    assert_eq!(
        find(&entries, "delete", "/user/user/moved").unwrap()["allowed"],
        true
    );
    assert_eq!(
        find(&entries, "delete", "/.lode").unwrap()["allowed"],
        false
    );
}
