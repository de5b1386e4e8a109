//! Plugins run in a sandboxed child: real plugins (Rust examples, a C plugin built here with cc) give
//! right answers, and misbehaving ones are contained, reported with the plugin's name and the cause,
//! and proven not to have done the forbidden thing.

#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lode_plugin_host::{Error, Host, Limits, RunSpec};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn host(limits: Limits) -> Host {
    Host::new(
        PathBuf::from(env!("CARGO_BIN_EXE_lode-plugin-host")),
        limits,
    )
}

/// A Rust example plugin built by `cargo build --workspace` (deploy/scripts/test.sh does that first).
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let p = dir.join(format!("liblode_plugin_{name}.so"));
    assert!(
        p.exists(),
        "{} is missing: run cargo build --workspace first",
        p.display()
    );
    p
}

/// Builds a C plugin with the system compiler, proving the header is enough.
fn cc(dir: &Path, source: &Path, defines: &[&str], name: &str) -> PathBuf {
    let out = dir.join(format!("lib{name}.so"));
    let mut cmd = Command::new("cc");
    cmd.args(["-shared", "-fPIC", "-O1", "-I"])
        .arg(root().join("plugins/sdk/include"));
    for d in defines {
        cmd.arg(format!("-D{d}"));
    }
    let status = cmd
        .arg("-o")
        .arg(&out)
        .arg(source)
        .status()
        .expect("a C compiler (cc)");
    assert!(status.success(), "cc {} failed", source.display());
    out
}

/// A block file of `data` and the piece values a datanode's sidecar would hold.
fn block(dir: &Path, data: &[u8], file_offset: u64) -> (File, Vec<[u8; 32]>) {
    let path = dir.join(format!("blk-{}", rand_name()));
    std::fs::write(&path, data).unwrap();
    let pieces = data
        .chunks(65536)
        .enumerate()
        .map(|(i, p)| {
            let mut h = blake3::Hasher::new();
            blake3::hazmat::HasherExt::set_input_offset(&mut h, file_offset + i as u64 * 65536);
            h.update(p);
            blake3::hazmat::HasherExt::finalize_non_root(&h)
        })
        .collect();
    (File::open(path).unwrap(), pieces)
}

fn rand_name() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn spec(data_len: usize, pieces: Vec<[u8; 32]>, args: &str) -> RunSpec {
    RunSpec {
        args_json: args.as_bytes().to_vec(),
        block_file_offset: 0,
        block_len: data_len as u64,
        start: 0,
        end: data_len as u64,
        pieces,
        continuation: vec![],
    }
}

#[test]
fn real_plugins_compute_the_right_answers() {
    let dir = tempfile::tempdir().unwrap();
    let h = host(Limits::default());
    let text = b"alpha beta\ngamma\n\ndelta epsilon zeta\nlast line without newline";
    let (f, pieces) = block(dir.path(), text, 0);
    let wc = example("wc");
    let info = h.inspect(&wc).unwrap();
    assert_eq!(
        (info.name.as_str(), info.input_mode, info.has_render),
        ("wc", 1, true)
    );
    let out = h
        .run(&wc, &f, spec(text.len(), pieces.clone(), "{}"))
        .unwrap();
    assert_eq!(out.bytes_fed, text.len() as u64);
    let both = h
        .combine(&wc, vec![out.partial.clone(), out.partial])
        .unwrap();
    assert_eq!(h.render(&wc, both).unwrap(), b"8 20 124\n"); // twice `wc` of the text: 4 10 62

    let grep = example("grep");
    let out = h
        .run(
            &grep,
            &f,
            spec(
                text.len(),
                pieces.clone(),
                r#"{"pattern":"^(gamma|delta)","_path":"/t"}"#,
            ),
        )
        .unwrap();
    let rendered = String::from_utf8(h.render(&grep, out.partial).unwrap()).unwrap();
    assert_eq!(
        rendered,
        "2 matching lines\n/t:11: gamma\n/t:18: delta epsilon zeta\n"
    );

    let csv = b"name,value\na,1.5\nb,2.5\nc,oops\nd,-4\n";
    let (f, pieces) = block(dir.path(), csv, 0);
    let csvsum = example("csvsum");
    let out = h
        .run(&csvsum, &f, spec(csv.len(), pieces, r#"{"column":"2"}"#))
        .unwrap();
    assert_eq!(
        h.render(&csvsum, out.partial).unwrap(),
        b"count 3 sum 0 min -4 max 2.5 bad 2\n"
    );

    // The C example, built here with only the header.
    let lc = cc(
        dir.path(),
        &root().join("plugins/examples/c/linecount.c"),
        &[],
        "linecount",
    );
    let (f, pieces) = block(dir.path(), text, 0);
    let out = h.run(&lc, &f, spec(text.len(), pieces, "{}")).unwrap();
    assert_eq!(h.render(&lc, out.partial).unwrap(), b"4 lines\n");
    // Bad arguments are a clear error naming the plugin.
    let (f, pieces) = block(dir.path(), csv, 0);
    let err = h
        .run(&csvsum, &f, spec(csv.len(), pieces, "{}"))
        .unwrap_err();
    assert!(
        matches!(&err, Error::Plugin { message, .. } if message.contains("column")),
        "{err}"
    );
    assert!(
        err.to_string().contains("libplugin") || err.to_string().contains("csvsum"),
        "{err}"
    );
}

#[test]
fn corrupt_input_never_reaches_the_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let h = host(Limits::default());
    let data = vec![b'a'; 200_000];
    let (_, pieces) = block(dir.path(), &data, 0);
    let mut bad = data.clone();
    bad[70_000] = b'b';
    let (f, _) = block(dir.path(), &bad, 0);
    let err = h
        .run(&example("wc"), &f, spec(data.len(), pieces, "{}"))
        .unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
}

#[test]
fn misbehaving_plugins_are_contained() {
    let dir = tempfile::tempdir().unwrap();
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/c/bad.c");
    let marker = dir.path().join("escaped");
    let marker_def = format!("MARKER=\"{}\"", marker.display());
    let limits = Limits {
        memory_bytes: 256 << 20,
        cpu_secs: 2,
        wall: Duration::from_secs(5),
        output_bytes: 1 << 20,
        ..Limits::default()
    };
    let h = host(limits);
    let data = b"some input\n";
    let run = |p: &Path| {
        let (f, pieces) = block(dir.path(), data, 0);
        h.run(p, &f, spec(data.len(), pieces, "{}"))
    };

    let segv = cc(dir.path(), &src, &["SEGV"], "segv");
    let e = run(&segv).unwrap_err();
    assert!(
        matches!(&e, Error::Crashed { signal, .. } if signal.contains("segmentation")),
        "{e}"
    );
    assert!(
        e.to_string().contains("libsegv.so"),
        "the error names the plugin: {e}"
    );

    let looping = cc(dir.path(), &src, &["LOOP"], "loop");
    let e = run(&looping).unwrap_err();
    assert!(
        matches!(e, Error::Cpu { .. } | Error::WallClock { .. }),
        "{e}"
    );

    let alloc = cc(dir.path(), &src, &["ALLOC"], "alloc");
    let e = run(&alloc).unwrap_err();
    assert!(
        e.to_string().contains("out of memory") || matches!(e, Error::Memory { .. }),
        "{e}"
    );

    let passwd = cc(dir.path(), &src, &["READ_PASSWD"], "passwd");
    match run(&passwd) {
        Err(e) => assert!(e.to_string().contains("refused"), "{e}"),
        Ok(out) => panic!(
            "reading /etc/passwd succeeded: {:?}",
            String::from_utf8_lossy(&out.partial)
        ),
    }

    let write = cc(dir.path(), &src, &["WRITE_FILE", &marker_def], "write");
    assert!(run(&write).is_err());
    assert!(!marker.exists(), "the plugin created a file");

    let init = cc(dir.path(), &src, &["INIT_WRITE", &marker_def], "initwrite");
    let _ = run(&init);
    assert!(!marker.exists(), "the plugin's initializer created a file");

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let sock = cc(
        dir.path(),
        &src,
        &["SOCKET", &format!("PORT={port}")],
        "socket",
    );
    let e = run(&sock).unwrap_err();
    assert!(e.to_string().contains("socket refused"), "{e}");
    assert!(
        listener.accept().is_err(),
        "the plugin connected to a socket"
    );

    let exec = cc(dir.path(), &src, &["EXEC", &marker_def], "exec");
    let e = run(&exec).unwrap_err();
    assert!(e.to_string().contains("exec refused"), "{e}");
    assert!(!marker.exists(), "the plugin ran a shell");

    let huge = cc(dir.path(), &src, &["HUGE_RESULT"], "huge");
    let e = run(&huge).unwrap_err();
    assert!(matches!(e, Error::OutputTooLarge { .. }), "{e}");

    // Not plugins: clear errors.
    let abi = cc(dir.path(), &src, &["WRONG_ABI"], "abi");
    let e = h.inspect(&abi).unwrap_err();
    assert!(
        matches!(&e, Error::NotAPlugin { message, .. } if message.contains("ABI version 2")),
        "{e}"
    );
    let missing = cc(dir.path(), &src, &["NO_COMBINE"], "nocombine");
    let e = h.inspect(&missing).unwrap_err();
    assert!(
        matches!(&e, Error::NotAPlugin { message, .. } if message.contains("lode_plugin_combine")),
        "{e}"
    );
    let text = dir.path().join("notes.txt");
    File::create(&text)
        .unwrap()
        .write_all(b"not a library")
        .unwrap();
    let e = h.inspect(&text).unwrap_err();
    assert!(matches!(e, Error::NotAPlugin { .. }), "{e}");
}

#[test]
fn the_sandbox_reports_its_protections() {
    let p = host(Limits::default()).probe().unwrap();
    for needed in ["rlimits", "no_new_privs", "seccomp"] {
        assert!(p.iter().any(|x| x == needed), "{p:?}");
    }
    eprintln!("sandbox protections on this machine: {}", p.join(","));
}

#[test]
fn a_pinned_plugin_swapped_after_its_check_is_never_run() {
    let dir = tempfile::tempdir().unwrap();
    let h = host(Limits::default());
    let lib = dir.path().join("libchecked.so");
    std::fs::copy(example("wc"), &lib).unwrap();
    h.pin(
        &lib,
        *blake3::hash(&std::fs::read(&lib).unwrap()).as_bytes(),
    );
    assert_eq!(h.inspect(&lib).unwrap().name, "wc");
    // Another library put in its place after the check.
    std::fs::copy(example("grep"), &lib).unwrap();
    let e = h.inspect(&lib).unwrap_err();
    assert!(
        matches!(&e, Error::NotAPlugin { message, .. } if message.contains("no longer match")),
        "{e}"
    );
}
