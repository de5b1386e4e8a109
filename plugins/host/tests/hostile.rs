//! The hostile-plugin suite: a C plugin (tests/c/hostile.c, built here against the header) tries
//! one escape per call, from its feed function and from its initializer. For each, the outcome is
//! asserted: the call was refused (the plugin says so) or stopped by the host; the block is
//! byte-identical and keeps its mode; the process standing in for the datanode (this test) is alive
//! with the same limits; nothing was created; and no process the plugin made is left.
//!
//! The test is a child subreaper, so any process a plugin leaves behind becomes its child and is
//! seen.

#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lode_plugin_host::{Error, Host, Limits, RunSpec};

/// Escapes the plugin must be refused (it reports "refused NAME: ...").
const REFUSED: &[&str] = &[
    "truncate_fd0_path",
    "ftruncate_fd0",
    "chmod_fd0_path",
    "fchmod_fd0",
    "fchown_fd0",
    "reopen_fd0_for_writing",
    "readlink_fd0",
    "write_fd0",
    "mmap_fd0_shared_writable",
    "inherited_fds",
    "open_etc_passwd",
    "open_dot",
    "open_proc_self_mem",
    "open_parent_proc",
    "create_marker",
    "mkdir_marker",
    "stat_root",
    "prlimit_parent",
    "prlimit_parent_read",
    "setrlimit_up",
    "setrlimit_cpu_up",
    "kill_parent",
    "kill_everyone",
    "kill_group",
    "tgkill_parent",
    "tkill_parent",
    "sigqueue_parent",
    "pidfd_parent",
    "ptrace_parent",
    "ptrace_traceme",
    "process_vm_readv_parent",
    "getppid",
    "fork",
    "clone_process",
    "clone_newuser",
    "clone3_process",
    "fork_bomb",
    "unshare_newuser",
    "unshare_newns",
    "setns",
    "setsid",
    "setpgid",
    "setuid",
    "setresgid",
    "execve",
    "execveat",
    "memfd_create",
    "socket_inet",
    "socket_unix",
    "socket_netlink",
    "socketpair",
    "io_uring_setup",
    "userfaultfd",
    "keyctl",
    "add_key",
    "bpf",
    "perf_event_open",
    "mount",
    "umount2",
    "chroot",
    "pivot_root",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "reboot",
    "sethostname",
    "ioctl_tiocsti",
    "personality",
    "prctl_dumpable",
    "mmap_exec",
    "mprotect_exec",
    "syscall_sweep_x32",
];

/// Escapes tried from the plugin's initializer, before the host calls anything.
const FROM_INIT: &[&str] = &[
    "truncate_fd0_path",
    "fchmod_fd0",
    "create_marker",
    "kill_parent",
    "prlimit_parent",
    "fork",
    "socket_inet",
    "execve",
    "io_uring_setup",
    "unshare_newuser",
];

/// As a datanode does: where this process is root, plugins run as `nobody`.
fn plugin_identity() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no arguments.
    (unsafe { libc::geteuid() } == 0).then_some((65534, 65534))
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn hostile(dir: &Path, marker: &Path, init: Option<&str>) -> PathBuf {
    let name = init.map_or("hostile".to_string(), |e| format!("hostile_init_{e}"));
    let out = dir.join(format!("lib{name}.so"));
    let mut cmd = Command::new("cc");
    cmd.args(["-shared", "-fPIC", "-O1", "-I"])
        .arg(root().join("plugins/sdk/include"))
        .arg(format!("-DTARGET={}", std::process::id()))
        .arg(format!("-DMARKER=\"{}\"", marker.display()));
    if let Some(e) = init {
        cmd.arg(format!("-DINIT_ESCAPE=\"{e}\""));
    }
    let status = cmd
        .arg("-o")
        .arg(&out)
        .arg(root().join("plugins/host/tests/c/hostile.c"))
        .status()
        .expect("a C compiler (cc)");
    assert!(status.success(), "cc hostile.c failed");
    out
}

fn piece_values(data: &[u8]) -> Vec<[u8; 32]> {
    data.chunks(65536)
        .enumerate()
        .map(|(i, p)| {
            let mut h = blake3::Hasher::new();
            blake3::hazmat::HasherExt::set_input_offset(&mut h, i as u64 * 65536);
            h.update(p);
            blake3::hazmat::HasherExt::finalize_non_root(&h)
        })
        .collect()
}

fn nofile() -> (u64, u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) }, 0);
    (r.rlim_cur, r.rlim_max)
}

/// Live (not zombie) children of this process; zombies are reaped on the way.
fn live_children() -> Vec<String> {
    loop {
        // SAFETY: waitpid with a null status pointer.
        let pid = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        if pid <= 0 {
            break;
        }
    }
    let me = std::process::id().to_string();
    let mut out = vec![];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after its closing paren.
        let Some(after) = stat.rsplit_once(") ").map(|(_, a)| a) else {
            continue;
        };
        let fields: Vec<&str> = after.split_whitespace().collect();
        if fields.get(1) == Some(&me.as_str()) && fields.first() != Some(&"Z") {
            out.push(
                stat.split_whitespace()
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        }
    }
    out
}

struct Check<'a> {
    host: Host,
    block: &'a Path,
    data: &'a [u8],
    marker: &'a Path,
    limits: (u64, u64),
}

impl Check<'_> {
    fn spec(&self, escape: &str) -> RunSpec {
        RunSpec {
            args_json: format!(r#"{{"escape":"{escape}"}}"#).into_bytes(),
            block_file_offset: 0,
            block_len: self.data.len() as u64,
            start: 0,
            end: self.data.len() as u64,
            pieces: piece_values(self.data),
            continuation: vec![],
        }
    }

    fn run(&self, plugin: &Path, escape: &str) -> Result<String, Error> {
        let f = File::open(self.block).unwrap();
        self.host
            .run(plugin, &f, self.spec(escape))
            .map(|o| String::from_utf8_lossy(&o.partial).into_owned())
    }

    /// Everything the plugin could have harmed is as it was.
    fn unharmed(&self, what: &str) {
        assert_eq!(
            std::fs::read(self.block).unwrap(),
            self.data,
            "{what}: the block changed"
        );
        let mode = std::fs::metadata(self.block).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600, "{what}: the block's mode changed");
        assert_eq!(
            nofile(),
            self.limits,
            "{what}: this process's limits changed"
        );
        assert!(!self.marker.exists(), "{what}: the plugin created a file");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = live_children();
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: processes left behind: {left:?}"
            );
            std::thread::yield_now();
        }
    }
}

#[test]
fn every_escape_is_refused_or_stopped_and_harms_nothing() {
    // SAFETY: prctl with constant arguments.
    assert_eq!(
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) },
        0
    );
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("escaped");
    let block = dir.path().join("blk_1");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&block, &data).unwrap();
    std::fs::set_permissions(&block, std::fs::Permissions::from_mode(0o600)).unwrap();
    let wall = Duration::from_secs(4);
    let check = Check {
        host: Host::new(
            PathBuf::from(env!("CARGO_BIN_EXE_lode-plugin-host")),
            Limits {
                memory_bytes: 256 << 20,
                cpu_secs: 2,
                wall,
                output_bytes: 1 << 20,
                run_as: plugin_identity(),
            },
        ),
        block: &block,
        data: &data,
        marker: &marker,
        limits: nofile(),
    };
    let plugin = hostile(dir.path(), &marker, None);
    let protections = check.host.probe().unwrap();
    eprintln!("protections: {}", protections.join(","));
    if plugin_identity().is_some() {
        assert!(
            protections.iter().any(|p| p == "identity"),
            "{protections:?}"
        );
    }

    // The plugin works when it tries nothing, and may use threads of its own.
    assert_eq!(
        check.run(&plugin, "nothing").unwrap(),
        "refused nothing: did nothing"
    );
    assert_eq!(
        check.run(&plugin, "threads").unwrap(),
        "ok threads: a thread ran"
    );
    check.unharmed("threads");
    let mut escaped = vec![];
    for escape in REFUSED {
        match check.run(&plugin, escape) {
            Ok(verdict) if verdict.starts_with("refused ") => {}
            Ok(verdict) => escaped.push(verdict),
            // Killed for a forbidden call is a refusal too.
            Err(Error::Crashed { signal, .. }) if signal.contains("forbidden") => {}
            Err(e) => escaped.push(format!("{escape}: unexpected error {e}")),
        }
        check.unharmed(escape);
    }
    assert!(escaped.is_empty(), "escapes:\n{}", escaped.join("\n"));

    // Every syscall the kernel carried out with zero arguments is one the policy allows.
    let sweep = check.run(&plugin, "syscall_sweep").unwrap();
    let reached: Vec<i64> = sweep
        .split_once("reached")
        .unwrap()
        .1
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    let allowed = lode_plugin_host::sandbox::allowed_syscalls();
    let outside: Vec<&i64> = reached.iter().filter(|n| !allowed.contains(n)).collect();
    assert!(
        outside.is_empty(),
        "reached outside the policy: {outside:?}"
    );
    check.unharmed("syscall_sweep");

    // Limits that cannot be dodged: a child that closes its output and sleeps dies on time, and
    // one that floods its error stream is bounded.
    let started = Instant::now();
    let e = check.run(&plugin, "close_stdio_and_pause").unwrap_err();
    assert!(matches!(e, Error::WallClock { .. }), "{e}");
    assert!(
        started.elapsed() < wall + Duration::from_secs(3),
        "killed after {:?}",
        started.elapsed()
    );
    check.unharmed("close_stdio_and_pause");
    match check.run(&plugin, "stderr_flood") {
        Ok(v) => assert!(v.starts_with("refused "), "{v}"),
        Err(e) => assert!(
            matches!(e, Error::Cpu { .. } | Error::WallClock { .. }),
            "{e}"
        ),
    }
    check.unharmed("stderr_flood");

    // The same escapes from an initializer: the sandbox is in force before any plugin code runs.
    for escape in FROM_INIT {
        let p = hostile(dir.path(), &marker, Some(escape));
        match check.run(&p, "nothing") {
            Ok(verdict) => assert!(verdict.starts_with("refused "), "from init: {verdict}"),
            Err(Error::Crashed { signal, .. }) if signal.contains("forbidden") => {}
            Err(e) => panic!("from init, {escape}: unexpected error {e}"),
        }
        check.unharmed(escape);
    }
    let hang = hostile(dir.path(), &marker, Some("close_stdio_and_pause"));
    let e = check.run(&hang, "nothing").unwrap_err();
    assert!(matches!(e, Error::WallClock { .. }), "{e}");
    check.unharmed("close_stdio_and_pause from init");
}
