//! Bulk transfers in one process: `put`/`get` with many sources and trees (`-r`), N files in
//! flight (`-t`), one summary line, and per-file errors that name the file without stopping the
//! rest.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use lode_tests::{random_bytes, Cluster, ClusterSpec};

fn write(p: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, bytes).unwrap();
}

#[test]
fn trees_and_many_files_go_both_ways_in_one_command() {
    let c = Cluster::start(ClusterSpec::default());
    let local = c.dir().join("local");
    // Above the size a put reads whole (1 MiB), so it streams from the open file.
    let a = random_bytes(1_300_000, 1);
    write(&local.join("t/a"), &a);
    write(&local.join("t/sub/b"), b"bee");
    std::fs::create_dir_all(local.join("t/sub/empty")).unwrap();
    write(&local.join("c"), b"sea");
    c.ok(&["mkdir", "/dst"]);
    let t = local.join("t");
    let cc = local.join("c");
    let (t, cc) = (t.to_str().unwrap(), cc.to_str().unwrap());
    let out = c.lode(&["put", "-r", "-t", "3", t, cc, "/dst"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("put: 3 of 3 files"), "{err}");
    assert_eq!(c.get_bytes("/dst/t/a"), a);
    assert_eq!(c.get_bytes("/dst/t/sub/b"), b"bee");
    assert_eq!(c.get_bytes("/dst/c"), b"sea");
    assert_eq!(c.stat("/dst/t/sub/empty")["type"], "directory");

    // Several sources need a directory; a missing source fails alone, named, and the rest land.
    let out = c.lode(&["put", cc, cc, "/dst/c"]);
    lode_tests::assert_one_line_error(&out, &["put of two files onto a file"]);
    let missing = local.join("nope");
    let out = c.lode(&["put", "-f", cc, missing.to_str().unwrap(), t, "/dst"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("nope") && err.contains("t: is a directory (use -r)"),
        "{err}"
    );
    assert!(err.contains("put: 1 of 3 files"), "{err}");

    // And back: a tree and a file into a local directory, then again without -f (each refused).
    let back = c.dir().join("back");
    std::fs::create_dir_all(&back).unwrap();
    let b = back.to_str().unwrap();
    let out = c.lode(&["get", "-r", "-t", "2", "/dst/t", "/dst/c", b]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("get: 3 of 3 files"), "{err}");
    assert_eq!(std::fs::read(back.join("t/a")).unwrap(), a);
    assert_eq!(std::fs::read(back.join("t/sub/b")).unwrap(), b"bee");
    assert_eq!(std::fs::read(back.join("c")).unwrap(), b"sea");
    assert!(back.join("t/sub/empty").is_dir());
    let out = c.lode(&["get", "-r", "/dst/t", "/dst/c", b]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("exists (use -f to overwrite)") && err.contains("get: 0 of 3 files"),
        "{err}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&back)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".part"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

/// `head`, `tail`, `touch`, `test` and `getmerge`, as `hdfs dfs` has them.
#[test]
fn head_tail_touch_test_and_getmerge() {
    let c = Cluster::start(ClusterSpec::default());
    // Three blocks of 64 KiB and a bit: head and tail read only the ends.
    let data = random_bytes(3 * 65536 + 100, 7);
    c.put_bytes("/f", &data, &[]);
    assert_eq!(c.ok(&["head", "/f"]), &data[..1024]);
    assert_eq!(c.ok(&["tail", "/f"]), &data[data.len() - 1024..]);
    c.put_bytes("/short", b"tiny", &[]);
    assert_eq!(c.ok(&["head", "/short"]), b"tiny");
    assert_eq!(c.ok(&["tail", "/short"]), b"tiny");

    c.ok(&["touch", "/empty"]);
    assert_eq!(c.stat("/empty")["size"], 0);
    let before = c.stat("/short")["mtime_ms"].as_u64().unwrap();
    c.ok(&["touch", "/short"]);
    assert_eq!(
        c.get_bytes("/short"),
        b"tiny",
        "touch leaves a file's bytes alone"
    );
    let after = c.stat("/short")["mtime_ms"].as_u64().unwrap();
    assert!(
        after > before,
        "touch sets the modification time: {before} then {after}"
    );
    // Someone who may not write the file (nor owns it) cannot touch it.
    let bob = c.client_config_for("bob", "");
    let out = c.lode_with(&bob, &["touch", "/short"], None);
    lode_tests::assert_one_line_error(&out, &["touch of another's file"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("permission denied"));
    assert_eq!(c.stat("/short")["mtime_ms"].as_u64().unwrap(), after);
    let out = c.lode(&["touch", "/"]);
    assert!(!out.status.success(), "a directory is refused");
    c.ok(&["mkdir", "/d"]);
    for (args, code) in [
        (vec!["test", "-e", "/f"], 0),
        (vec!["test", "-f", "/f"], 0),
        (vec!["test", "-d", "/f"], 1),
        (vec!["test", "-d", "/d"], 0),
        (vec!["test", "-f", "/d"], 1),
        (vec!["test", "-e", "/nothing"], 1),
    ] {
        let out = c.lode(&args);
        assert_eq!(out.status.code(), Some(code), "{args:?}");
        assert!(
            out.stdout.is_empty() && out.stderr.is_empty(),
            "{args:?} printed something"
        );
    }

    c.put_bytes("/d/b", b"second", &[]);
    c.put_bytes("/d/a", b"first", &[]);
    let merged = c.dir().join("merged");
    let m = merged.to_str().unwrap();
    c.ok(&["getmerge", "/d", m]);
    assert_eq!(std::fs::read(&merged).unwrap(), b"firstsecond");
    c.ok(&["getmerge", "-nl", "/d", m]);
    assert_eq!(std::fs::read(&merged).unwrap(), b"first\nsecond\n");
}

/// Remote globs, quoted so that the shell leaves them alone, in ls, cat, get, rm, du and count.
#[test]
fn remote_globs_name_many_paths() {
    let c = Cluster::start(ClusterSpec::default());
    c.ok(&["mkdir", "-p", "/logs/sub"]);
    for (name, body) in [
        ("2026-01-01.log", "a\n"),
        ("2026-01-02.log", "b\n"),
        ("2025-12-31.log", "old\n"),
        ("2026-notes.txt", "n\n"),
    ] {
        c.put_bytes(&format!("/logs/{name}"), body.as_bytes(), &[]);
    }
    c.put_bytes("/logs/sub/2026-03.log", b"deep\n", &[]);
    assert_eq!(c.ok(&["cat", "/logs/2026-0?-*.log"]), b"a\nb\n");
    let ls: serde_json::Value =
        serde_json::from_slice(&c.ok(&["ls", "--json", "/logs/2026-*"])).unwrap();
    let paths: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "/logs/2026-01-01.log",
            "/logs/2026-01-02.log",
            "/logs/2026-notes.txt"
        ]
    );
    assert_eq!(c.ok(&["cat", "/l[o]gs/*/2026-*"]), b"deep\n");
    let out = String::from_utf8(c.ok(&["count", "/logs/2025-*"])).unwrap();
    assert!(out.contains("/logs/2025-12-31.log"), "{out}");
    let du = String::from_utf8(c.ok(&["du", "/logs/*.txt"])).unwrap();
    assert!(
        du.contains("/logs/2026-notes.txt") && !du.contains(".log"),
        "{du}"
    );
    let here = c.dir().join("logs-back");
    std::fs::create_dir_all(&here).unwrap();
    c.ok(&["get", "/logs/2026-01-*", here.to_str().unwrap()]);
    assert_eq!(std::fs::read(here.join("2026-01-02.log")).unwrap(), b"b\n");
    c.ok(&["rm", "/logs/2026-01-*"]);
    let left: serde_json::Value =
        serde_json::from_slice(&c.ok(&["ls", "--json", "/logs"])).unwrap();
    assert_eq!(left.as_array().unwrap().len(), 3, "{left}");
    let err = c.fails(&["cat", "/logs/1999-*"]);
    assert!(err.contains("no match"), "{err}");
}
