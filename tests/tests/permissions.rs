//! Users and permissions on a real cluster: a permission matrix (owner, group and other × r, w, x ×
//! the namespace operations) run against Lode and, as its oracle, against a local directory through
//! unprivileged Linux users (`setpriv`); the attacks any user certificate could make before owners
//! existed; the sticky `/tmp`; and groups reloaded without a restart.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use lode_client::{Client, ClientConfig, PutOptions};
use lode_protocol::perm::ModeChange;
use lode_protocol::ErrorCode;
use lode_tests::{Cluster, ClusterSpec};

const GROUPS: &str = "[groups]\nstaff = [\"alice\", \"bob\"]\n";

/// Who acts: Lode's certificate name and the local uid, gid and supplementary groups that play it.
struct Actor {
    name: &'static str,
    uid: u32,
    gid: u32,
    groups: &'static str,
}

/// alice owns the entries and is in staff; bob is in staff; eve is in neither.
const STAFF: u32 = 20100;
const ACTORS: [Actor; 3] = [
    Actor {
        name: "alice",
        uid: 20001,
        gid: STAFF,
        groups: "20100",
    },
    Actor {
        name: "bob",
        uid: 20002,
        gid: 20002,
        groups: "20100",
    },
    Actor {
        name: "eve",
        uid: 20003,
        gid: 20003,
        groups: "",
    },
];

/// What the mode under test is put on.
#[derive(Clone, Copy, Debug, PartialEq)]
enum On {
    /// The directory `d` (its file `f` is 0666).
    Dir,
    /// The file `d/f` (in a 0777 directory).
    File,
}

#[derive(Clone, Copy, Debug)]
enum Op {
    List,
    Stat,
    Read,
    Create,
    Mkdir,
    Delete,
    Rename,
    Overwrite,
    Chmod,
}

impl Op {
    /// The same operation on a local disk, as a shell command run in the case's directory.
    fn local(self) -> &'static str {
        match self {
            Op::List => "ls d > /dev/null",
            Op::Stat => "stat d/f > /dev/null",
            Op::Read => "cat d/f > /dev/null",
            Op::Create => ": > d/new",
            Op::Mkdir => "mkdir d/sub",
            Op::Delete => "rm -f d/f",
            Op::Rename => "mv d/f d/g",
            Op::Overwrite => "printf x > d/f",
            Op::Chmod => "chmod 600 d/f",
        }
    }

    /// Whether HDFS and POSIX differ here, so that Lode (which checks as HDFS does) need not match
    /// the local disk: listing a directory one may read but not search (POSIX lists the names,
    /// HDFS asks for both).
    fn may_differ(self, on: On, class_bits: u16) -> bool {
        matches!((self, on), (Op::List, On::Dir)) && class_bits == 4
    }
}

async fn lode_op(c: &Client, op: Op, d: &str) -> Result<(), lode_client::Error> {
    let f = format!("{d}/f");
    match op {
        Op::List => c.list(d).await.map(|_| ()),
        Op::Stat => c.stat(&f, false).await.map(|_| ()),
        Op::Read => {
            let mut out = Vec::new();
            c.get(&f, &mut out, &|_| {}).await.map(|_| ())
        }
        Op::Create => c
            .put(
                &b"x"[..],
                &format!("{d}/new"),
                &PutOptions::default(),
                &|_| {},
            )
            .await
            .map(|_| ()),
        Op::Mkdir => c.mkdir(&format!("{d}/sub"), false).await,
        Op::Delete => c.delete(&f, false).await,
        Op::Rename => c.rename(&f, &format!("{d}/g")).await,
        Op::Overwrite => {
            let opts = PutOptions {
                overwrite: true,
                ..PutOptions::default()
            };
            c.put(&b"x"[..], &f, &opts, &|_| {}).await.map(|_| ())
        }
        Op::Chmod => c.set_mode(&f, ModeChange::Set(0o600), false).await,
    }
}

/// Runs `cmd` in `dir` as `who` (no capabilities: a uid other than 0 drops them).
fn local_op(who: &Actor, dir: &Path, cmd: &str) -> bool {
    let mut setpriv = Command::new("setpriv");
    setpriv
        .arg(format!("--reuid={}", who.uid))
        .arg(format!("--regid={}", who.gid));
    if who.groups.is_empty() {
        setpriv.arg("--clear-groups");
    } else {
        setpriv.arg(format!("--groups={}", who.groups));
    }
    let out = setpriv
        .args(["sh", "-c", cmd])
        .current_dir(dir)
        .output()
        .expect("run setpriv");
    out.status.success()
}

fn connect(rt: &tokio::runtime::Runtime, config: &Path) -> Client {
    rt.block_on(Client::connect(ClientConfig::load(config).unwrap()))
        .unwrap()
}

/// The modes tried: for each class, none, r, w, x and rwx of it alone (so the owner also meets
/// modes that grant the group and other more than itself).
fn modes() -> Vec<(u16, u16)> {
    let mut out = vec![];
    for shift in [6u16, 3, 0] {
        for bits in [4u16, 2, 1, 7] {
            out.push((bits << shift, shift));
        }
    }
    out.push((0, 0));
    out
}

/// The bits of `mode` that apply to `who` (who is in alice's group, as local checks have it).
fn class_bits(who: &Actor, mode: u16) -> u16 {
    let shift = match who.name {
        "alice" => 6,
        "bob" => 3,
        _ => 0,
    };
    (mode >> shift) & 7
}

#[test]
fn the_permission_matrix_agrees_with_a_local_disk() {
    // SAFETY: geteuid has no arguments.
    if unsafe { libc::geteuid() } != 0 || Command::new("setpriv").arg("--version").output().is_err()
    {
        eprintln!("SKIPPED: the local oracle needs root and setpriv to act as other users");
        return;
    }
    let c = Cluster::start(ClusterSpec {
        datanodes: 1,
        replication: 1,
        namenode_extra: GROUPS.into(),
        ..ClusterSpec::default()
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let admin = connect(&rt, &c.client_config());
    let users: Vec<Client> = ACTORS
        .iter()
        .map(|a| connect(&rt, &c.client_config_for(a.name, "")))
        .collect();
    let local_root = tempfile::tempdir().unwrap();
    std::fs::set_permissions(local_root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ops_on = |on: On| -> Vec<Op> {
        match on {
            On::Dir => vec![
                Op::List,
                Op::Stat,
                Op::Read,
                Op::Create,
                Op::Mkdir,
                Op::Delete,
                Op::Rename,
            ],
            On::File => vec![Op::Read, Op::Overwrite, Op::Delete, Op::Chmod],
        }
    };
    let mut mismatches = vec![];
    let (mut allowed, mut denied, mut case) = (0, 0, 0);
    rt.block_on(admin.mkdir("/m", false)).unwrap();
    for on in [On::Dir, On::File] {
        for (mode, _) in modes() {
            for (who, user) in ACTORS.iter().zip(&users) {
                for op in ops_on(on) {
                    case += 1;
                    let (dir_mode, file_mode) = match on {
                        On::Dir => (mode, 0o666),
                        On::File => (0o777, mode),
                    };
                    // A fresh tree for every case: Lode's /m/N/d/f and the local N/d/f, both
                    // alice's and staff's.
                    let d = format!("/m/{case}/d");
                    rt.block_on(async {
                        admin.mkdir(&d, true).await?;
                        admin
                            .put(
                                &b"data"[..],
                                &format!("{d}/f"),
                                &PutOptions::default(),
                                &|_| {},
                            )
                            .await?;
                        admin
                            .set_owner(&d, Some("alice"), Some("staff"), true)
                            .await?;
                        admin
                            .set_mode(&format!("{d}/f"), ModeChange::Set(file_mode), false)
                            .await?;
                        admin.set_mode(&d, ModeChange::Set(dir_mode), false).await
                    })
                    .unwrap();
                    let here = local_root.path().join(case.to_string());
                    std::fs::create_dir_all(here.join("d")).unwrap();
                    std::fs::write(here.join("d/f"), b"data").unwrap();
                    for p in [here.join("d"), here.join("d/f")] {
                        std::os::unix::fs::chown(&p, Some(20001), Some(STAFF)).unwrap();
                    }
                    std::fs::set_permissions(
                        here.join("d/f"),
                        std::fs::Permissions::from_mode(u32::from(file_mode)),
                    )
                    .unwrap();
                    std::fs::set_permissions(
                        here.join("d"),
                        std::fs::Permissions::from_mode(u32::from(dir_mode)),
                    )
                    .unwrap();

                    let local = local_op(who, &here, op.local());
                    let lode = match rt.block_on(lode_op(user, op, &d)) {
                        Ok(()) => true,
                        Err(e) if e.code() == Some(ErrorCode::PermissionDenied) => false,
                        Err(e) => panic!("{op:?} by {} on {on:?} mode {mode:o}: {e}", who.name),
                    };
                    if lode {
                        allowed += 1;
                    } else {
                        denied += 1;
                    }
                    if lode != local && !op.may_differ(on, class_bits(who, mode)) {
                        mismatches.push(format!(
                            "{op:?} by {} with {on:?} mode {mode:04o}: lode {}, local disk {}",
                            who.name,
                            if lode { "allows" } else { "denies" },
                            if local { "allows" } else { "denies" }
                        ));
                    }
                }
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {case} cases disagree:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    assert!(
        allowed > 50 && denied > 100,
        "the matrix allowed {allowed} and denied {denied} of {case}"
    );
}

/// Runs `lode` with `config` and returns (success, stdout, stderr).
fn lode_as(c: &Cluster, config: &Path, args: &[&str]) -> (bool, String, String) {
    let out = c.lode_with(config, args, None);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn denied(c: &Cluster, config: &Path, args: &[&str]) {
    let out = c.lode_with(config, args, None);
    lode_tests::assert_one_line_error(&out, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission denied"), "{args:?}: {err}");
}

/// Every way a user certificate could harm another's data before owners existed is refused, the
/// data is intact afterwards, and the user works freely in its own home and in the sticky /tmp.
#[test]
fn a_user_certificate_cannot_harm_what_others_own() {
    let c = Cluster::start(ClusterSpec {
        namenode_extra: "[groups]\nstaff = [\"alice\"]\n".into(),
        ..ClusterSpec::default()
    });
    let data = lode_tests::random_bytes(200_000, 8);
    c.ok(&["mkdir", "-p", "/data", "/tmp"]);
    c.ok(&["chmod", "1777", "/tmp"]);
    c.put_bytes("/data/f", &data, &[]);
    let home = c.user_home();
    let user = c.dir().join("client-user.toml");
    let local = c.dir().join("upload");
    std::fs::write(&local, b"mine").unwrap();
    let l = local.to_str().unwrap();
    for args in [
        vec!["rm", "-r", "/data"],
        vec!["rm", "/data/f"],
        vec!["put", "-f", l, "/data/f"],
        vec!["setrep", "1", "/"],
        vec!["setrep", "1", "/data/f"],
        vec!["chmod", "777", "/data"],
        vec!["chmod", "-R", "777", "/"],
        vec!["chown", "user", "/data/f"],
        vec!["chgrp", "staff", "/data/f"],
        vec!["mv", "/data", "/user/user/taken"],
        vec!["mv", "/data/f", "/tmp/f"],
        vec!["mkdir", "/elsewhere"],
    ] {
        denied(&c, &user, &args);
    }
    assert_eq!(c.get_bytes("/data/f"), data, "the admin's file is intact");
    assert_eq!(c.stat("/data/f")["replication"], 3);

    // At home the user does as it likes; new entries are its own, in the parent's group, 0644.
    for args in [
        vec!["mkdir", "/user/user/d"],
        vec!["put", l, "/user/user/d/f"],
        vec!["mv", "/user/user/d/f", "/user/user/g"],
        vec!["chmod", "g+w", "/user/user/g"],
        vec!["setrep", "1", "/user/user/g"],
        vec!["rm", "-r", "/user/user/d"],
    ] {
        let (ok, _, err) = lode_as(&c, &user, &args);
        assert!(ok, "{args:?}: {err}");
    }
    let (_, out, _) = lode_as(&c, &user, &["stat", "--json", &format!("{home}/g")]);
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (
            st["owner"].as_str(),
            st["group"].as_str(),
            st["mode"].as_str()
        ),
        (Some("user"), Some("supergroup"), Some("0664")),
        "{st}"
    );
    let (_, ls, _) = lode_as(&c, &user, &["ls", "-l", &home]);
    assert!(ls.contains("-rw-rw-r--") && ls.contains(" user "), "{ls}");
    let (_, out, _) = lode_as(&c, &user, &["ls", "--json", "/"]);
    let root: serde_json::Value = serde_json::from_str(&out).unwrap();
    let tmp = root
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["path"] == "/tmp")
        .unwrap();
    assert_eq!(tmp["mode"], "1777", "{tmp}");

    // The sticky /tmp: everyone writes, only an entry's owner removes or moves it. A client's
    // umask shapes its new entries.
    let alice = c.client_config_for("alice", "umask = \"077\"");
    let (ok, _, err) = lode_as(&c, &user, &["put", l, "/tmp/u"]);
    assert!(ok, "{err}");
    let (ok, _, err) = lode_as(&c, &alice, &["put", l, "/tmp/a"]);
    assert!(ok, "{err}");
    denied(&c, &alice, &["rm", "/tmp/u"]);
    denied(&c, &alice, &["mv", "/tmp/u", "/tmp/mine"]);
    denied(&c, &user, &["cat", "/tmp/a"]);
    assert_eq!(c.stat("/tmp/a")["mode"], "0600");
    let (ok, _, err) = lode_as(&c, &user, &["rm", "/tmp/u"]);
    assert!(ok, "{err}");

    // Groups come from the namenode's config and are read again on request.
    c.put_bytes("/data/team", b"for the team", &[]);
    c.ok(&["chgrp", "staff", "/data/team"]);
    c.ok(&["chmod", "640", "/data/team"]);
    let bob = c.client_config_for("bob", "");
    let (ok, out, _) = lode_as(&c, &alice, &["cat", "/data/team"]);
    assert!(ok && out == "for the team");
    denied(&c, &bob, &["cat", "/data/team"]);
    let out = c.lode_with(&user, &["admin", "refresh-groups"], None);
    lode_tests::assert_one_line_error(&out, &["admin refresh-groups as a user"]);
    let config = c.dir().join("namenode.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("staff = [\"alice\"]", "staff = [\"alice\", \"bob\"]"),
    )
    .unwrap();
    c.ok(&["admin", "refresh-groups"]);
    let (ok, out, err) = lode_as(&c, &bob, &["cat", "/data/team"]);
    assert!(ok && out == "for the team", "{err}");
    // A member may give its own file to its group; nobody else's.
    denied(&c, &alice, &["chgrp", "staff", "/data/f"]);
}

mod tokens {
    use std::time::Duration;

    /// A read that outlives its tokens asks for new ones and reads on.
    #[test]
    fn a_read_whose_tokens_expire_gets_new_ones() {
        let c = Cluster::start(ClusterSpec {
            namenode_extra: "token_lifetime_ms = 2000\n".into(),
            ..ClusterSpec::default()
        });
        let data = lode_tests::random_bytes(5 * 65536 + 7, 4);
        c.put_bytes("/long-read", &data, &[]);
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let config = lode_client::ClientConfig::load(&c.client_config()).unwrap();
            let client = lode_client::Client::connect(config).await.unwrap();
            let st = client.stat("/long-read", true).await.unwrap();
            let first = st.blocks[0].clone();
            let holder = &first.locations[0];
            let port = c.datanode_ports[holder.name[3..].parse::<usize>().unwrap() - 1];
            let conn = c.connect("admin", port, &holder.name).await.unwrap();
            // Until the datanodes refuse the tokens this status carries.
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                let r = ask(
                    &conn,
                    &DatanodeRequest::BlockChecksums {
                        block: first.id,
                        token: first.token.clone(),
                    },
                )
                .await;
                if r.is_err() {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the token never expired"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let mut out = Vec::new();
            client.get_status(&st, &mut out, &|_| {}).await.unwrap();
            assert_eq!(out, data);
        });
    }

    use lode_protocol::frame::kind;
    use lode_protocol::messages::{
        ClientToNamenode, DatanodeReply, DatanodeRequest, LocatedBlock, NamenodeReply, TaskRequest,
    };
    use lode_protocol::net::{self, RangeRead, RpcError};
    use lode_protocol::ErrorCode;
    use lode_tests::{Cluster, ClusterSpec};

    async fn stat(conn: &quinn::Connection, path: &str) -> Result<Vec<LocatedBlock>, RpcError> {
        let r = net::call::<_, NamenodeReply>(
            conn,
            kind::CLIENT_TO_NAMENODE,
            kind::NAMENODE_REPLY,
            &ClientToNamenode::Stat {
                path: path.into(),
                blocks: true,
            },
        )
        .await?;
        match r {
            NamenodeReply::Status(s) => Ok(s.blocks),
            other => panic!("stat {path}: {other:?}"),
        }
    }

    async fn ask(
        conn: &quinn::Connection,
        req: &DatanodeRequest,
    ) -> Result<DatanodeReply, RpcError> {
        let (mut send, mut recv) = conn.open_bi().await.map_err(RpcError::from)?;
        net::write_frame(&mut send, kind::DATANODE_REQUEST, req).await?;
        // A refused write ends before its pieces; one that was let in waits for them.
        let _ = send.finish();
        tokio::time::timeout(
            Duration::from_secs(20),
            net::read_frame::<DatanodeReply>(&mut recv, kind::DATANODE_REPLY),
        )
        .await
        .map_err(|_| RpcError::Stream("no reply within 20 s".into()))?
    }

    fn refused_token(r: &Result<DatanodeReply, RpcError>, why: &str, what: &str) {
        assert!(
            matches!(r, Err(RpcError::Remote(w)) if w.code == ErrorCode::InvalidToken && w.message.contains(why)),
            "{what}: {r:?}"
        );
    }

    /// Raw requests with the user certificate to every datanode endpoint: with no token, with the
    /// token of another block, of another user, for another operation, forged, and expired. None
    /// reads, writes, checksums or scans a block the user may not read, and the admin's file is
    /// intact after all of them.
    #[test]
    fn a_block_opens_only_with_a_valid_token_of_its_own() {
        let c = Cluster::start(ClusterSpec {
            namenode_extra: "token_lifetime_ms = 3000\n".into(),
            ..ClusterSpec::default()
        });
        let secret = lode_tests::random_bytes(60_000, 1);
        let open = lode_tests::random_bytes(60_000, 2);
        c.put_bytes("/secret", &secret, &[]);
        c.ok(&["chmod", "600", "/secret"]);
        c.put_bytes("/open", &open, &[]);
        let home = c.user_home();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let user_nn = c.connect("user", c.namenode_port, "namenode").await.unwrap();
            let admin_nn = c.connect("admin", c.namenode_port, "namenode").await.unwrap();
            let denied = stat(&user_nn, "/secret").await;
            assert!(
                matches!(&denied, Err(RpcError::Remote(w)) if w.code == ErrorCode::PermissionDenied),
                "the user asks for the secret's blocks: {denied:?}"
            );
            let theirs = stat(&admin_nn, "/secret").await.unwrap().remove(0);
            let mine = stat(&user_nn, "/open").await.unwrap().remove(0);
            let own_write = c.allocate_block("user", &format!("{home}/w"), &[1]).await;
            let mut forged = mine.token.clone().unwrap();
            forged.grant.block = theirs.id;
            let read = |token| DatanodeRequest::ReadBlock {
                block: theirs.id,
                offset: 0,
                len: 100,
                token,
            };
            let write = |token| DatanodeRequest::WriteBlock {
                block: theirs.id,
                file_offset: 0,
                block_size: 65536,
                downstream: vec![],
                token,
            };
            let task = |token| {
                let mut block = theirs.clone();
                block.token = token;
                DatanodeRequest::RunTask(Box::new(TaskRequest {
                    plugin: lode_protocol::Blake3Cv([1; 32]),
                    plugin_path: "/.lode/plugins/x".into(),
                    args_json: "{}".into(),
                    path: "/secret".into(),
                    start: 0,
                    end: block.len,
                    block,
                    following: vec![],
                }))
            };
            for dn in 0..3 {
                let name = format!("dn-{}", dn + 1);
                let conn = c.connect("user", c.datanode_ports[dn], &name).await.unwrap();
                let cases = [
                    ("no token", read(None), "no block access token"),
                    ("another block's token", read(mine.token.clone()), "not block"),
                    ("another user's token", read(theirs.token.clone()), "issued to admin"),
                    ("a forged token", read(Some(forged.clone())), "bad signature"),
                    (
                        "checksums with another block's token",
                        DatanodeRequest::BlockChecksums {
                            block: theirs.id,
                            token: mine.token.clone(),
                        },
                        "not block",
                    ),
                    ("an overwrite with no token", write(None), "no block access token"),
                    ("an overwrite with a read token", write(mine.token.clone()), "not block"),
                    (
                        "an overwrite with the user's own write token",
                        write(own_write.token.clone()),
                        "not block",
                    ),
                    (
                        "a write of a readable block with its read token",
                        DatanodeRequest::WriteBlock {
                            block: mine.id,
                            file_offset: 0,
                            block_size: 65536,
                            downstream: vec![],
                            token: mine.token.clone(),
                        },
                        "does not allow writing",
                    ),
                    ("a scan with another block's token", task(mine.token.clone()), "not block"),
                    ("a scan with no token", task(None), "no block access token"),
                ];
                for (what, req, why) in cases {
                    refused_token(&ask(&conn, &req).await, why, &format!("{name}: {what}"));
                }
            }
            // The user's own token reads its block, until it expires.
            let holder = &mine.locations[0];
            let port = c.datanode_ports[holder.name[3..].parse::<usize>().unwrap() - 1];
            let conn = c.connect("user", port, &holder.name).await.unwrap();
            let range = RangeRead {
                block: mine.id,
                block_offset_in_file: 0,
                committed: mine.cv,
                offset: 0,
                len: mine.len,
            };
            let got = net::read_verified_range(&conn, range, mine.token.as_ref(), Duration::from_secs(10))
                .await
                .unwrap();
            assert_eq!(got, open);
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                let r = ask(&conn, &DatanodeRequest::BlockChecksums {
                    block: mine.id,
                    token: mine.token.clone(),
                })
                .await;
                if matches!(&r, Err(RpcError::Remote(w)) if w.code == ErrorCode::InvalidToken) {
                    refused_token(&r, "expired", "an expired token");
                    break;
                }
                assert!(matches!(r, Ok(DatanodeReply::Checksums { .. })), "{r:?}");
                assert!(std::time::Instant::now() < deadline, "the token never expired");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        // Nothing the user sent changed the admin's file, and a new token reads the open one.
        assert_eq!(c.get_bytes("/secret"), secret);
        assert_eq!(c.get_bytes("/open"), open);
        let fsck: serde_json::Value =
            serde_json::from_slice(&c.ok(&["fsck", "--json", "/"])).unwrap();
        assert_eq!(fsck["status"], "healthy", "{fsck}");
    }
}

/// Quotas as HDFS has them: a name quota and a space quota (bytes times replication) per
/// directory, held against eight writers at once, shown by `count -q`, set only by an admin.
#[test]
fn quotas_hold_against_eight_concurrent_writers() {
    let c = Cluster::start(ClusterSpec {
        replication: 2,
        ..ClusterSpec::default()
    });
    const BLOCK: u64 = 65536;
    c.ok(&["mkdir", "/limited", "/named"]);
    // Room for five one-block files at replication 2.
    let quota = 10 * BLOCK;
    c.ok(&[
        "admin",
        "quota",
        "set",
        "--bytes",
        &quota.to_string(),
        "/limited",
    ]);
    c.ok(&["admin", "quota", "set", "--names", "5", "/named"]);
    let user = c.dir().join("client-user.toml");
    let out = c.lode_with(
        &user,
        &["admin", "quota", "set", "--names", "1", "/named"],
        None,
    );
    lode_tests::assert_one_line_error(&out, &["admin quota set as a user"]);
    let local = c.dir().join("block");
    std::fs::write(&local, lode_tests::random_bytes(BLOCK as usize, 3)).unwrap();
    let local = local.to_str().unwrap().to_string();
    let outcomes: Vec<(bool, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|w| {
                let (c, local) = (&c, &local);
                s.spawn(move || {
                    let mut out = vec![];
                    for i in 0..3 {
                        let put = c.lode(&["put", local, &format!("/limited/w{w}-{i}")]);
                        out.push((
                            put.status.success(),
                            String::from_utf8_lossy(&put.stderr).to_string(),
                        ));
                        let mkdir = c.lode(&["mkdir", &format!("/named/w{w}-{i}")]);
                        out.push((
                            mkdir.status.success(),
                            String::from_utf8_lossy(&mkdir.stderr).to_string(),
                        ));
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let failures: Vec<&String> = outcomes.iter().filter(|o| !o.0).map(|o| &o.1).collect();
    for f in &failures {
        assert!(
            f.contains("/limited: the space quota") || f.contains("/named: the name quota"),
            "a write refused for another reason: {f}"
        );
    }
    let count = |p: &str| -> serde_json::Value {
        serde_json::from_slice(&c.ok(&["count", "-q", "--json", p])).unwrap()
    };
    let limited = count("/limited");
    assert_eq!(limited["space_quota"], quota, "{limited}");
    assert_eq!(limited["name_quota"], serde_json::Value::Null);
    assert!(
        limited["space_used"].as_u64().unwrap() <= quota,
        "{limited}"
    );
    assert_eq!(limited["files"], 5, "exactly five files fit: {limited}");
    assert_eq!(limited["space_used"], quota, "{limited}");
    let named = count("/named");
    assert_eq!(named["name_quota"], 5);
    assert_eq!(named["dirs"], 5, "the directory and four more: {named}");
    assert_eq!(named["names_used"], 5);
    assert_eq!(failures.len(), 48 - 5 - 4, "{failures:?}");
    let mut keys: Vec<String> = named.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "bytes",
            "dirs",
            "files",
            "name_quota",
            "names_used",
            "path",
            "space_quota",
            "space_used"
        ]
    );
    // Deleting frees room; clearing lifts the limit.
    let listed: serde_json::Value =
        serde_json::from_slice(&c.ok(&["ls", "--json", "/limited"])).unwrap();
    let first = listed[0]["path"].as_str().unwrap().to_string();
    c.ok(&["rm", &first]);
    c.ok(&["put", &local, "/limited/again"]);
    let text = String::from_utf8_lossy(&c.ok(&["count", "-q", "/named"])).to_string();
    assert!(
        text.split_whitespace().next() == Some("5") && text.contains("/named"),
        "{text}"
    );
    c.ok(&["admin", "quota", "clear", "/named"]);
    c.ok(&["mkdir", "/named/more"]);
    assert_eq!(count("/named")["name_quota"], serde_json::Value::Null);
    assert_eq!(count("/limited")["files"], 5);
}

/// The trash: `rm` moves into `/user/<name>/.Trash/Current/<path>`, `--skip-trash` deletes at
/// once, removing from the trash deletes, `expunge` empties it, and checkpoints older than the
/// interval go by themselves.
#[test]
fn rm_moves_to_the_trash_until_it_is_emptied_or_expires() {
    let mut c = Cluster::start(ClusterSpec {
        trash_interval_ms: 600_000,
        ..ClusterSpec::default()
    });
    let home = c.user_home();
    let user = c.dir().join("client-user.toml");
    let run = |args: &[&str]| {
        let (ok, out, err) = lode_as(&c, &user, args);
        assert!(ok, "{args:?}: {err}");
        out
    };
    let exists = |p: &str| {
        let (ok, _, _) = lode_as(&c, &user, &["stat", "--json", p]);
        ok
    };
    let local = c.dir().join("f");
    std::fs::write(&local, b"keep me").unwrap();
    let l = local.to_str().unwrap();
    let trash = format!("{home}/.Trash/Current{home}");
    run(&["put", l, &format!("{home}/a")]);
    run(&["mkdir", &format!("{home}/d")]);
    run(&["put", l, &format!("{home}/d/f")]);
    run(&["rm", &format!("{home}/a")]);
    assert!(!exists(&format!("{home}/a")));
    assert_eq!(run(&["cat", &format!("{trash}/a")]), "keep me");
    let (ok, _, err) = lode_as(&c, &user, &["rm", &format!("{home}/d")]);
    assert!(!ok && err.contains("not empty"), "{err}");
    run(&["rm", "-r", &format!("{home}/d")]);
    assert!(exists(&format!("{trash}/d/f")));
    // A name already in the trash: the newcomer gets the time appended.
    run(&["put", l, &format!("{home}/a")]);
    run(&["rm", &format!("{home}/a")]);
    let listed: serde_json::Value = serde_json::from_str(&run(&["ls", "--json", &trash])).unwrap();
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap().rsplit('/').next().unwrap())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(
        names.iter().any(|n| n.len() > 1
            && n.starts_with('a')
            && n[1..].bytes().all(|b| b.is_ascii_digit())),
        "{names:?}"
    );
    // --skip-trash, and rm inside the trash, delete at once.
    run(&["put", l, &format!("{home}/b")]);
    run(&["rm", "--skip-trash", &format!("{home}/b")]);
    assert!(!exists(&format!("{trash}/b")) && !exists(&format!("{home}/b")));
    run(&["rm", "-r", &format!("{trash}/d")]);
    assert!(!exists(&format!("{trash}/d")));
    run(&["expunge"]);
    assert!(!exists(&format!("{home}/.Trash")));
    // Checkpoints: with a short interval, Current becomes a checkpoint within an interval, and
    // the checkpoint is gone an interval later.
    c.kill_namenode();
    let config = c.dir().join("namenode.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("trash_interval_ms = 600000", "trash_interval_ms = 1500"),
    )
    .unwrap();
    c.start_namenode();
    c.wait_live(3);
    let run = |args: &[&str]| {
        let (ok, out, err) = lode_as(&c, &user, args);
        assert!(ok, "{args:?}: {err}");
        out
    };
    run(&["put", l, &format!("{home}/c")]);
    run(&["rm", &format!("{home}/c")]);
    lode_tests::wait_until(
        "the trash to empty itself",
        std::time::Duration::from_secs(20),
        || {
            let (_, out, _) = lode_as(
                &c,
                &user,
                &["ls", "-R", "--json", &format!("{home}/.Trash")],
            );
            !out.contains("/c\"")
        },
    );
    // The trash keeps the permission rules: a move out of someone else's sticky directory is
    // still refused.
    c.ok(&["mkdir", "/tmp"]);
    c.ok(&["chmod", "1777", "/tmp"]);
    c.put_bytes("/tmp/admins", b"x", &[]);
    denied(&c, &user, &["rm", "/tmp/admins"]);
}

/// A scan runs as the user: it plans only files the user may read, and its tasks open blocks with
/// the user's read tokens.
#[test]
fn scans_run_as_the_user() {
    let c = Cluster::start(ClusterSpec::default());
    let wc = lode_tests::plugin_lib("wc");
    c.ok(&["plugin", "add", wc.to_str().unwrap()]);
    c.put_bytes("/open.txt", b"one\ntwo\nthree\n", &[]);
    c.put_bytes("/secret.txt", b"a\nb\n", &[]);
    c.ok(&["chmod", "600", "/secret.txt"]);
    let user = c.dir().join("client-user.toml");
    let (ok, out, err) = lode_as(&c, &user, &["scan", "--plugin", "wc", "/open.txt"]);
    assert!(ok && out.contains('3'), "{out} {err}");
    denied(&c, &user, &["scan", "--plugin", "wc", "/secret.txt"]);
    let (ok, out, _) = lode_as(
        &c,
        &c.client_config(),
        &["scan", "--plugin", "wc", "/secret.txt"],
    );
    assert!(ok && out.contains('2'), "{out}");
}
