//! Compute on storage with real processes: plugins shipped through Lode, approved, cached on the
//! datanodes, run next to the blocks; line mode gives exactly the records of the whole file for
//! every block size; failures are contained and retried.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use lode_plugin_host::{Host, Limits, RunSpec};
use lode_tests::{assert_one_line_error, plugin_lib, wait_until, Cluster, ClusterSpec};
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// The plugin run locally over the whole file in one task: the answer every scan must give.
fn local_answer(plugin: &Path, data: &[u8], args: &str, path: &str) -> String {
    let host = Host::new(
        lode_tests::bin_dir().join("lode-plugin-host"),
        Limits::default(),
    );
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("whole");
    std::fs::write(&f, data).unwrap();
    let pieces = data
        .chunks(65536)
        .enumerate()
        .map(|(i, p)| lode_protocol::checksum::piece_cv(i as u64 * 65536, p).0)
        .collect();
    let mut args: Value = serde_json::from_str(args).unwrap();
    args["_path"] = Value::String(path.to_string());
    let spec = RunSpec {
        args_json: args.to_string().into_bytes(),
        block_file_offset: 0,
        block_len: data.len() as u64,
        start: 0,
        end: data.len() as u64,
        pieces,
        continuation: vec![],
    };
    let out = host
        .run(plugin, &std::fs::File::open(&f).unwrap(), spec)
        .unwrap();
    let combined = host.combine(plugin, vec![out.partial]).unwrap();
    String::from_utf8(host.render(plugin, combined).unwrap()).unwrap()
}

fn scan_json(c: &Cluster, args: &[&str]) -> Value {
    let mut a = vec!["scan", "--json"];
    a.extend_from_slice(args);
    serde_json::from_slice(&c.ok(&a)).unwrap()
}

/// A random text: short and long lines (some longer than a block), `\r\n` now and then, a
/// needle in some lines, with or without a final newline.
fn random_text(rng: &mut rand::rngs::StdRng, block: usize) -> Vec<u8> {
    let lines = rng.random_range(0..60);
    let mut out = Vec::new();
    for _ in 0..lines {
        let len = match rng.random_range(0..10) {
            0 => rng.random_range(block / 2..3 * block),
            1 => 0,
            _ => rng.random_range(1..300),
        };
        for _ in 0..len {
            let c = match rng.random_range(0..12) {
                0 => b' ',
                _ => rng.random_range(b'a'..=b'z'),
            };
            out.push(c);
        }
        if rng.random_range(0..5) == 0 {
            out.extend_from_slice(b" needle ");
        }
        if rng.random_range(0..6) == 0 {
            out.push(b'\r');
        }
        out.push(b'\n');
    }
    if rng.random_range(0..2) == 0 {
        out.extend_from_slice(b"last record without a newline needle");
    }
    out
}

#[test]
fn line_mode_gives_exactly_the_records_of_the_whole_file() {
    let c = Cluster::start(ClusterSpec {
        datanodes: 3,
        replication: 2,
        ..Default::default()
    });
    let wc = plugin_lib("wc");
    let grep = plugin_lib("grep");
    c.ok(&["plugin", "add", wc.to_str().unwrap()]);
    c.ok(&["plugin", "add", grep.to_str().unwrap()]);
    let seed: u64 = std::env::var("SCAN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("SCAN_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    c.ok(&["mkdir", "/exact"]);
    for case in 0..12 {
        let block = [65536usize, 131072][rng.random_range(0..2)];
        let data = if case == 0 {
            vec![]
        } else {
            random_text(&mut rng, block)
        };
        let path = format!("/exact/{case}");
        c.put_bytes(&path, &data, &["--block-size", &block.to_string()]);
        let got = scan_json(&c, &["--plugin", "wc", &path]);
        let want = local_answer(&wc, &data, "{}", &path);
        assert_eq!(
            got["result"],
            want,
            "wc, case {case}, block {block}, {} bytes (SCAN_SEED={seed})",
            data.len()
        );
        let args = r#"{"pattern":"needle","fixed":"true","max_matches":"1000"}"#;
        let got = scan_json(
            &c,
            &[
                "--plugin",
                "grep",
                "--arg",
                "pattern=needle",
                "--arg",
                "fixed=true",
                "--arg",
                "max_matches=1000",
                &path,
            ],
        );
        let want = local_answer(&grep, &data, args, &path);
        assert_eq!(
            got["result"], want,
            "grep, case {case}, block {block} (SCAN_SEED={seed})"
        );
        let stats = &got["stats"];
        assert_eq!(stats["tasks"], data.len().div_ceil(block) as u64);
        assert_eq!(stats["local_tasks"], stats["tasks"]);
        assert_eq!(stats["input_bytes"], data.len() as u64);
    }
    // A directory scans every file under it, and the answer is the combined one.
    let all = scan_json(&c, &["--plugin", "wc", "/exact"]);
    assert!(
        all["result"].as_str().unwrap().split_whitespace().count() == 3,
        "{all}"
    );
}

#[test]
fn plugins_are_shipped_approved_cached_and_contained() {
    let mut c = Cluster::start(ClusterSpec {
        datanodes: 2,
        replication: 2,
        block_size: 65536,
        ..Default::default()
    });
    let text: Vec<u8> = (0..20_000)
        .flat_map(|i| format!("row {i},{}\n", i % 7).into_bytes())
        .collect();
    c.put_bytes("/data.csv", &text, &[]);
    let user = c.dir().join("client-user.toml");
    let csvsum = plugin_lib("csvsum");
    // Every datanode reports the sandbox its plugin tasks get.
    lode_tests::wait_until(
        "sandbox reports",
        std::time::Duration::from_secs(10),
        || {
            c.report().is_some_and(|r| {
                r["datanodes"].as_array().unwrap().iter().all(|d| {
                    d["sandbox"].as_array().is_some_and(|p| {
                        lode_plugin_host::sandbox::REQUIRED
                            .iter()
                            .all(|r| p.iter().any(|x| x == *r))
                    }) && d["sandbox_missing"].as_array().is_some_and(Vec::is_empty)
                })
            })
        },
    );

    // A user's plugin waits for approval; the user cannot approve it; scans refuse it.
    let out = c.lode_with(&user, &["plugin", "add", csvsum.to_str().unwrap()], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout).unwrap();
    assert!(line.contains("waiting for approval"), "{line}");
    let hash = line.split_whitespace().next().unwrap().to_string();
    let out = c.lode_with(
        &user,
        &[
            "scan",
            "--plugin",
            "csvsum",
            "--arg",
            "column=2",
            "/data.csv",
        ],
        None,
    );
    assert_one_line_error(&out, &["scan unapproved"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not approved"));
    let out = c.lode_with(&user, &["plugin", "approve", &hash], None);
    assert_one_line_error(&out, &["approve as user"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("only an admin"));
    c.ok(&["plugin", "approve", &hash]);
    let list: Value = serde_json::from_slice(&c.ok(&["plugin", "list", "--json"])).unwrap();
    assert_eq!(list[0]["approved"], true);

    // The first scan fetches the library onto the datanodes; the second needs no download.
    let first = scan_json(&c, &["--plugin", &hash, "--arg", "column=2", "/data.csv"]);
    let expected_sum: u64 = (0..20_000u64).map(|i| i % 7).sum();
    assert_eq!(
        first["result"],
        format!("count 20000 sum {expected_sum} min 0 max 6 bad 0\n")
    );
    let second = scan_json(
        &c,
        &["--plugin", "csvsum", "--arg", "column=2", "/data.csv"],
    );
    assert_eq!(second["result"], first["result"]);
    let lib_size = std::fs::metadata(&csvsum).unwrap().len();
    assert!(first["stats"]["bytes_over_network"].as_u64().unwrap() >= lib_size);
    let net = second["stats"]["bytes_over_network"].as_u64().unwrap();
    assert!(
        net < 64 * 1024,
        "second scan moved {net} bytes: the library was fetched again"
    );
    assert!(
        net * 100 < text.len() as u64,
        "partials should be far smaller than the input"
    );

    // Not plugins, and bad arguments: clear errors.
    let notes = c.dir().join("notes.txt");
    std::fs::write(&notes, b"not a library").unwrap();
    let err = c.fails(&["plugin", "add", notes.to_str().unwrap()]);
    assert!(err.contains("not a usable plugin"), "{err}");
    let err = c.fails(&["scan", "--plugin", "csvsum", "/data.csv"]);
    assert!(err.contains("csvsum") && err.contains("column"), "{err}");
    let err = c.fails(&["scan", "--plugin", "no-such-plugin", "/data.csv"]);
    assert!(err.contains("no-such-plugin"), "{err}");

    // A plugin that crashes fails the scan with its name and the cause; the datanodes keep serving.
    let dir = tempfile::tempdir().unwrap();
    let so = dir.path().join("libcrash.so");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/host/tests/c/bad.c");
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/sdk/include");
    let ok = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-DSEGV", "-I"])
        .arg(&include)
        .arg("-o")
        .arg(&so)
        .arg(&src)
        .status()
        .unwrap();
    assert!(ok.success());
    let err = c.fails(&["scan", "--plugin", so.to_str().unwrap(), "/data.csv"]);
    assert!(
        err.contains("bad") && err.contains("segmentation fault"),
        "{err}"
    );
    assert_eq!(c.get_bytes("/data.csv"), text);

    // A datanode dies before the namenode notices: its tasks are retried on the other replica.
    c.kill_datanode(1);
    let after = scan_json(
        &c,
        &["--plugin", "csvsum", "--arg", "column=2", "/data.csv"],
    );
    assert_eq!(after["result"], first["result"]);
    assert!(
        after["stats"]["retried_tasks"].as_u64().unwrap() > 0,
        "{after}"
    );
}

/// The hostile plugin (plugins/host/tests/c/hostile.c) through real scans: aimed at the datanode
/// that runs it (its pid built in), each escape is refused, and the datanode is unharmed: same
/// process, same limits, no failed data dir, every replica byte-identical with its mode.
#[test]
fn a_hostile_plugin_in_a_scan_harms_no_datanode() {
    use std::os::unix::fs::PermissionsExt;
    let mut c = Cluster::start(ClusterSpec {
        datanodes: 1,
        replication: 1,
        ..Default::default()
    });
    let data = lode_tests::random_bytes(2 * 65536 + 99, 77);
    c.put_bytes("/victim", &data, &["--block-size", "65536"]);
    let pid = c.datanode_pid(1).unwrap();
    let limits = || std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let limits_before = limits();
    let replicas = |c: &Cluster| -> Vec<(Vec<u8>, u32)> {
        (1..=3u64)
            .filter_map(|id| c.replica_path(1, id))
            .map(|p| {
                let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
                (std::fs::read(&p).unwrap(), mode)
            })
            .collect()
    };
    let before = replicas(&c);
    assert_eq!(before.len(), 3, "three replicas on dn-1");

    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("escaped");
    let so = dir.path().join("libhostile.so");
    lode_tests::build_hostile_plugin(&pid.to_string(), &marker.display().to_string(), &so);
    c.ok(&["plugin", "add", so.to_str().unwrap()]);
    for escape in lode_tests::HOSTILE_SCAN_ESCAPES {
        let args = lode_tests::hostile_scan_args(escape, "/victim");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = c.ok(&args);
        let verdict = String::from_utf8_lossy(&out);
        assert!(verdict.starts_with("refused "), "{escape}: {verdict}");
    }
    assert_eq!(
        c.datanode_pid(1),
        Some(pid),
        "the datanode is the same process"
    );
    assert_eq!(limits(), limits_before, "the datanode's limits changed");
    assert_eq!(replicas(&c), before, "a replica or its mode changed");
    assert!(!marker.exists(), "the plugin created a file");
    assert_eq!(c.get_bytes("/victim"), data);
    let report = c.report().unwrap();
    let dn = &report["datanodes"][0];
    assert_eq!(dn["state"], "live", "{report}");
    assert_eq!(dn["failed_volumes"], 0, "{report}");

    // A task that sleeps for good (as its own user, with its output closed) dies with the
    // datanode that started it: nothing of it outlives a crash.
    let mut scan = std::process::Command::new(lode_tests::bin_dir().join("lode"))
        .arg("--config")
        .arg(c.client_config())
        .args([
            "scan",
            "--plugin",
            "hostile",
            "--arg",
            "escape=close_stdio_and_pause",
            "/victim",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let children_of = |parent: u32| -> Vec<u32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| {
                let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
                let (head, rest) = stat.rsplit_once(") ")?;
                let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
                (ppid == parent && head.contains("(lode-plugin-ho"))
                    .then(|| e.file_name().to_str()?.parse().ok())?
            })
            .collect()
    };
    let mut tasks = vec![];
    wait_until("the sleeping task runs", Duration::from_secs(20), || {
        tasks = children_of(pid);
        !tasks.is_empty()
    });
    c.kill_datanode(1);
    // Gone, or a zombie waiting for whoever adopted it to reap it.
    let alive = |t: &u32| {
        std::fs::read_to_string(format!("/proc/{t}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
            .unwrap_or(false)
    };
    wait_until(
        "the task dies with its datanode",
        Duration::from_secs(10),
        || !tasks.iter().any(alive),
    );
    let _ = scan.kill();
    let _ = scan.wait();
}

/// Kills the process it holds when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Fail closed: a datanode whose plugin children cannot take the plugin user (root without
/// CAP_SETUID and CAP_SETGID, as in a container that dropped them) refuses every plugin task and
/// says which protections are missing, in `admin report` and in the task's error.
#[test]
fn a_datanode_lacking_a_protection_refuses_plugins_and_says_which() {
    // SAFETY: geteuid has no arguments.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/usr/bin/setpriv").exists() {
        eprintln!("needs root and setpriv (util-linux) to start a datanode without capabilities");
        return;
    }
    let mut c = Cluster::start(ClusterSpec {
        datanodes: 1,
        replication: 1,
        ..Default::default()
    });
    c.put_bytes("/lines", b"one\ntwo\nthree\n", &[]);
    let wc = plugin_lib("wc");
    c.ok(&["plugin", "add", wc.to_str().unwrap()]);
    c.kill_datanode(1);
    let log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(c.dir().join("dn-1.log"))
        .unwrap();
    let _dn = KillOnDrop(
        std::process::Command::new("/usr/bin/setpriv")
            .args(["--bounding-set=-setuid,-setgid", "--"])
            .arg(lode_tests::bin_dir().join("lode-datanode"))
            .arg("--config")
            .arg(c.dir().join("dn-1.toml"))
            .current_dir(c.dir())
            .env("LODE_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    wait_until(
        "dn-1 back, reporting the protections it lacks",
        Duration::from_secs(30),
        || {
            c.report().is_some_and(|r| {
                let d = &r["datanodes"][0];
                d["state"] == "live"
                    && d["sandbox_missing"]
                        .as_array()
                        .is_some_and(|m| m.iter().any(|p| p == "identity"))
            })
        },
    );
    let err = c.fails(&["scan", "--plugin", "wc", "/lines"]);
    assert!(
        err.contains("runs no plugins") && err.contains("identity"),
        "{err}"
    );
}
