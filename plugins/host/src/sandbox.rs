//! The child's sandbox, in force before the plugin is loaded so that its initializers run inside it.
//!
//! Deny by default: the seccomp policy lists the system calls a plugin needs to compute on the
//! buffers it is handed (memory, threads of its own, futexes, clocks, writing its result and
//! errors, exit) and every other call fails with `EPERM`, numbers nobody thought of and other ABIs'
//! numberings included. Calls needed for one use only have their arguments checked: writes go to
//! stdout and stderr only, signals only to the child itself, `clone` makes threads only, limits
//! can be read but not set, and files open read-only.
//!
//! Two stages, stacked (a later seccomp filter can only narrow an earlier one):
//! - [`enter`], before loading: resource limits, no capabilities, no new privileges, landlock
//!   (read-only access to the plugin and the system libraries) where the kernel has it, and the
//!   loading policy: the computing calls, plus what the dynamic linker needs (read-only opens,
//!   stat, executable mappings) and installing the second stage.
//! - [`seal`], once the plugin is loaded: the computing policy alone. Nothing can be opened, no
//!   memory can become executable; a filter can still be added (which only narrows).
//!
//! The block itself never reaches the plugin as a descriptor: the child maps it and closes the
//! descriptor before entering the sandbox, so there is nothing to truncate, chmod, reopen or
//! resolve to a path.

use std::collections::BTreeMap;
use std::path::Path;

use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

use crate::wire::ChildLimits;

/// Directories the dynamic linker may need to read from to load a plugin's dependencies.
const LIBRARY_DIRS: &[&str] = &[
    "/lib",
    "/lib64",
    "/usr/lib",
    "/usr/lib64",
    "/usr/local/lib",
    "/etc/ld.so.cache",
];

/// Descriptors a plugin child may hold while loading: the plugin and its libraries, briefly.
const OPEN_FILES_MAX: u64 = 32;
/// Processes and threads of the plugin uid at once, over every task of the machine (fork is
/// refused anyway; threads count too).
const PLUGIN_UID_PROCESSES_MAX: u64 = 1024;

/// Calls a plugin may make with any arguments, in both stages.
const COMPUTE: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_read,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_set_tid_address,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Calls only the dynamic linker needs, while loading (with any arguments).
const LOADING: &[i64] = &[
    libc::SYS_pread64,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
];

/// The protections a datanode requires before it runs plugins (an operator may waive one by name;
/// see [`missing`]). `landlock_net` and `landlock_scope` are reported where the kernel has them,
/// on top of seccomp, which already refuses sockets and signals to others.
pub const REQUIRED: &[&str] = &[
    "rlimits",
    "identity",
    "no_capabilities",
    "no_new_privs",
    "landlock",
    "seccomp",
];

/// Every protection name a child can report.
pub const KNOWN: &[&str] = &[
    "rlimits",
    "identity",
    "no_capabilities",
    "no_new_privs",
    "landlock",
    "landlock_net",
    "landlock_scope",
    "seccomp",
];

/// The required protections not in force (`active`) and not waived (`waived`).
pub fn missing(active: &[String], waived: &[String]) -> Vec<String> {
    REQUIRED
        .iter()
        .filter(|r| !active.iter().any(|a| a == *r) && !waived.iter().any(|w| w == *r))
        .map(|r| r.to_string())
        .collect()
}

/// Every system call number either stage can let through (some only with the arguments checked).
pub fn allowed_syscalls() -> Vec<i64> {
    let mut all: Vec<i64> = COMPUTE.iter().chain(LOADING).copied().collect();
    all.extend([
        libc::SYS_mmap,
        libc::SYS_mprotect,
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_kill,
        libc::SYS_tgkill,
        libc::SYS_clone,
        libc::SYS_prlimit64,
        libc::SYS_openat,
        libc::SYS_prctl,
        libc::SYS_seccomp,
    ]);
    all.sort_unstable();
    all.dedup();
    all
}

/// Applies the first stage; returns the protections that are active.
pub fn enter(limits: ChildLimits) -> Result<Vec<String>, String> {
    let mut active = vec![];
    set_limit(libc::RLIMIT_AS, limits.memory_bytes)?;
    set_limit(libc::RLIMIT_CPU, limits.cpu_secs)?;
    set_limit(libc::RLIMIT_FSIZE, 0)?;
    set_limit(libc::RLIMIT_CORE, 0)?;
    set_limit(libc::RLIMIT_NOFILE, OPEN_FILES_MAX)?;
    set_limit(libc::RLIMIT_MEMLOCK, 0)?;
    // The bounding set goes first: emptying it needs CAP_SETPCAP, which a new identity drops.
    drop_bounding_set();
    if let Some((uid, gid)) = limits.run_as {
        set_limit(libc::RLIMIT_NPROC, PLUGIN_UID_PROCESSES_MAX)?;
        take_identity(uid, gid)?;
        active.push("identity".to_string());
    }
    active.push("rlimits".to_string());
    drop_capabilities()?;
    active.push("no_capabilities".to_string());
    // SAFETY: prctl with constant arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(format!("no_new_privs: {}", std::io::Error::last_os_error()));
    }
    active.push("no_new_privs".to_string());
    active.extend(landlock()?);
    install(&policy(Stage::Loading)?)?;
    install(&clone3_unavailable()?)?;
    active.push("seccomp".to_string());
    Ok(active)
}

/// The second stage, once the plugin is loaded.
pub fn seal() -> Result<(), String> {
    install(&policy(Stage::Computing)?)?;
    // Filters are consulted newest first and, among errors, the first one seen wins: without
    // this again, the computing policy's EPERM for clone3 would be seen before ENOSYS, and the C
    // library would not fall back to clone, so no plugin could start a thread.
    install(&clone3_unavailable()?)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Loading,
    Computing,
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, String> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)
        .map_err(|e| format!("seccomp condition: {e}"))
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, String> {
    SeccompRule::new(conditions).map_err(|e| format!("seccomp rule: {e}"))
}

/// One rule: argument `arg` equals `value`.
fn arg_is(arg: u8, value: u64) -> Result<SeccompRule, String> {
    rule(vec![cond(arg, SeccompCmpOp::Eq, value)?])
}

/// One rule: none of `bits` is set in argument `arg`.
fn arg_lacks(arg: u8, bits: u64) -> Result<SeccompRule, String> {
    rule(vec![cond(arg, SeccompCmpOp::MaskedEq(bits), 0)?])
}

/// The stage's policy: what is allowed; everything else fails with `EPERM`.
fn policy(stage: Stage) -> Result<seccompiler::BpfProgram, String> {
    let me = u64::from(std::process::id());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = COMPUTE.iter().map(|s| (*s, vec![])).collect();
    // Output: the result on stdout, errors on stderr; no other descriptor.
    for call in [libc::SYS_write, libc::SYS_writev] {
        rules.insert(call, vec![arg_is(0, 1)?, arg_is(0, 2)?]);
    }
    // Signals to itself only (raise and abort).
    rules.insert(libc::SYS_kill, vec![arg_is(0, me)?]);
    rules.insert(libc::SYS_tgkill, vec![arg_is(0, me)?]);
    // Threads, never processes: CLONE_THREAD set (x86_64 and aarch64 pass the flags first).
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(
        libc::SYS_clone,
        vec![rule(vec![cond(
            0,
            SeccompCmpOp::MaskedEq(thread),
            thread,
        )?])?],
    );
    // Its own limits, read only: prlimit64(0, resource, NULL, old).
    rules.insert(
        libc::SYS_prlimit64,
        vec![rule(vec![
            cond(0, SeccompCmpOp::Eq, 0)?,
            cond(2, SeccompCmpOp::Eq, 0)?,
        ])?],
    );
    // Installing the next filter (no_new_privs again, then the filter): the second stage, and
    // after each stage the clone3 one. A filter can only narrow what the process may do.
    rules.insert(
        libc::SYS_prctl,
        vec![arg_is(0, libc::PR_SET_NO_NEW_PRIVS as u64)?],
    );
    rules.insert(
        libc::SYS_seccomp,
        vec![arg_is(0, u64::from(libc::SECCOMP_SET_MODE_FILTER))?],
    );
    let exec = libc::PROT_EXEC as u64;
    match stage {
        Stage::Loading => {
            for call in LOADING {
                rules.insert(*call, vec![]);
            }
            rules.insert(libc::SYS_mmap, vec![]);
            rules.insert(libc::SYS_mprotect, vec![]);
            // Read-only opens (landlock narrows where to).
            let writing = (libc::O_WRONLY
                | libc::O_RDWR
                | libc::O_CREAT
                | libc::O_TRUNC
                | libc::O_APPEND
                | libc::O_TMPFILE) as u64;
            rules.insert(libc::SYS_openat, vec![arg_lacks(2, writing)?]);
        }
        Stage::Computing => {
            // No new executable memory.
            rules.insert(libc::SYS_mmap, vec![arg_lacks(2, exec)?]);
            rules.insert(libc::SYS_mprotect, vec![arg_lacks(2, exec)?]);
        }
    }
    compile(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
    )
}

/// `clone3` fails with `ENOSYS`, so the C library falls back to `clone`, whose flags the policy can
/// check (`clone3` passes them in memory, out of a filter's reach).
fn clone3_unavailable() -> Result<seccompiler::BpfProgram, String> {
    let rules = BTreeMap::from([(libc::SYS_clone3, vec![])]);
    compile(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    )
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<seccompiler::BpfProgram, String> {
    let arch =
        TargetArch::try_from(std::env::consts::ARCH).map_err(|e| format!("seccomp: {e:?}"))?;
    let filter = SeccompFilter::new(rules, mismatch, matched, arch)
        .map_err(|e| format!("seccomp filter: {e}"))?;
    filter
        .try_into()
        .map_err(|e| format!("seccomp program: {e:?}"))
}

fn install(program: &seccompiler::BpfProgram) -> Result<(), String> {
    seccompiler::apply_filter_all_threads(program).map_err(|e| format!("seccomp: {e}"))
}

fn set_limit(resource: libc::__rlimit_resource_t, value: u64) -> Result<(), String> {
    let lim = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit with a valid struct.
    if unsafe { libc::setrlimit(resource, &lim) } != 0 {
        return Err(format!(
            "setrlimit({resource}): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Becomes `uid`/`gid` with no supplementary groups, for good (real, effective and saved ids), so
/// the datanode's processes and files are another user's: signals, prlimit, ptrace and /proc of
/// the datanode need privileges the child no longer has. It stays dumpable so that it can still
/// read its own /proc/self/fd (the plugin is loaded from there).
fn take_identity(uid: u32, gid: u32) -> Result<(), String> {
    let os = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
    // The parent asked for the death signal before exec, so it is alive now (it may be pid 1, as a
    // datanode is in a container without an init).
    // SAFETY: getppid has no arguments.
    let parent = unsafe { libc::getppid() };
    // SAFETY: plain system calls with integer arguments.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(os("setgroups"));
        }
        if libc::setresgid(gid, gid, gid) != 0 {
            return Err(os("setresgid"));
        }
        if libc::setresuid(uid, uid, uid) != 0 {
            return Err(os("setresuid"));
        }
        if libc::getuid() != uid || libc::geteuid() != uid || libc::getegid() != gid {
            return Err("the plugin identity did not take".into());
        }
        if libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) != 0 {
            return Err(os("dumpable"));
        }
        // A change of identity clears the parent-death signal the parent asked for: ask again,
        // and go now if the parent is already gone.
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            return Err(os("parent-death signal"));
        }
        if libc::getppid() != parent {
            return Err("the process that started this one is gone".into());
        }
    }
    Ok(())
}

/// Empties the capability bounding set (possible only while CAP_SETPCAP is held; errors past the
/// last capability, or without it, are expected).
fn drop_bounding_set() {
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
    }
}

/// The capability sets of this process (`capget`/`capset` with version 3: two 32-bit words each).
#[derive(Clone, Copy, Default)]
struct CapSets {
    effective: u64,
    permitted: u64,
    inheritable: u64,
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;

fn capget() -> std::io::Result<CapSets> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget with a version-3 header and room for two data words, as the kernel expects.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok(CapSets {
        effective: join(data[0].effective, data[1].effective),
        permitted: join(data[0].permitted, data[1].permitted),
        inheritable: join(data[0].inheritable, data[1].inheritable),
    })
}

fn capset(sets: CapSets) -> std::io::Result<()> {
    let header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let word = |v: u64, hi: bool| if hi { (v >> 32) as u32 } else { v as u32 };
    let data = [false, true].map(|hi| CapData {
        effective: word(sets.effective, hi),
        permitted: word(sets.permitted, hi),
        inheritable: word(sets.inheritable, hi),
    });
    // SAFETY: capset with a version-3 header and two data words, as the kernel expects.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Clears every capability (effective, permitted, inheritable), so a child started by a
/// privileged datanode holds none of its privileges.
fn drop_capabilities() -> Result<(), String> {
    capset(CapSets::default()).map_err(|e| format!("dropping capabilities: {e}"))
}

const IDENTITY_CAPS: u64 = (1 << CAP_SETUID) | (1 << CAP_SETGID);

/// Whether plugin children of this process can take another identity: it is root, or it holds
/// CAP_SETUID and CAP_SETGID as permitted capabilities, which [`pass_identity_capabilities`] hands
/// to each child. The container image gives them to `lode-datanode` as file capabilities (never
/// effective); systemd's `AmbientCapabilities=` gives them too.
pub fn can_switch_identity() -> bool {
    // SAFETY: geteuid has no arguments.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    capget().is_ok_and(|sets| sets.permitted & IDENTITY_CAPS == IDENTITY_CAPS)
}

/// In a child between fork and exec (only system calls, so async-signal-safe): makes CAP_SETUID
/// and CAP_SETGID inheritable and ambient, so the plugin host keeps them across exec and can take
/// the plugin identity; it drops them with every other capability before any plugin code runs.
/// Capabilities belong to threads, so this happens in the forked child itself, not once in the
/// datanode (whose other threads would not have them). Nothing to do for root.
pub fn pass_identity_capabilities() -> std::io::Result<()> {
    // SAFETY: geteuid has no arguments.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(());
    }
    let mut sets = capget()?;
    if sets.inheritable & IDENTITY_CAPS != IDENTITY_CAPS {
        sets.inheritable |= IDENTITY_CAPS;
        capset(sets)?;
    }
    for cap in [CAP_SETUID, CAP_SETGID] {
        // SAFETY: prctl with integer arguments.
        let raised = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_RAISE,
                cap as libc::c_ulong,
                0,
                0,
            )
        };
        if raised != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Read-only access to the library directories (the plugin itself comes as a sealed memory file,
/// which has no path); nothing else on the file system (truncating included), and, where the kernel has them, no TCP binds or connects and no
/// signals or abstract unix sockets outside the child. Returns the protections in force:
/// `landlock` (files, needs landlock ABI 3), `landlock_net` (ABI 4), `landlock_scope` (ABI 6).
fn landlock() -> Result<Vec<String>, String> {
    use landlock::{
        Access, AccessFs, AccessNet, CompatLevel, Compatible, LandlockStatus, PathBeneath, PathFd,
        Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
    };
    let abi = ABI::V6;
    let err = |e: &dyn std::fmt::Display| format!("landlock: {e}");
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .map_err(|e| err(&e))?
        .handle_access(AccessNet::from_all(abi))
        .map_err(|e| err(&e))?
        .scope(Scope::Signal | Scope::AbstractUnixSocket)
        .map_err(|e| err(&e))?
        .create()
        .map_err(|e| err(&e))?;
    let mut paths: Vec<&Path> = LIBRARY_DIRS.iter().map(Path::new).collect();
    paths.retain(|p| p.exists());
    for p in paths {
        let fd = PathFd::new(p).map_err(|e| format!("landlock: open {}: {e}", p.display()))?;
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, AccessFs::from_read(abi)))
            .map_err(|e| err(&e))?;
    }
    let status = ruleset.restrict_self().map_err(|e| err(&e))?;
    let effective = match status.landlock {
        LandlockStatus::Available { effective_abi, .. } => effective_abi,
        _ => ABI::Unsupported,
    };
    if status.ruleset == RulesetStatus::NotEnforced {
        return Ok(vec![]);
    }
    let mut active = vec![];
    for (needs, name) in [
        (ABI::V3, "landlock"),
        (ABI::V4, "landlock_net"),
        (ABI::V6, "landlock_scope"),
    ] {
        if effective >= needs {
            active.push(name.to_string());
        }
    }
    Ok(active)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_missing_protection_is_named_unless_waived() {
        let all = names(REQUIRED);
        assert!(missing(&all, &[]).is_empty());
        let without_landlock = names(&[
            "rlimits",
            "identity",
            "no_capabilities",
            "no_new_privs",
            "seccomp",
        ]);
        assert_eq!(missing(&without_landlock, &[]), ["landlock"]);
        assert!(missing(&without_landlock, &names(&["landlock"])).is_empty());
        // A probe that failed reports nothing in force: everything is missing.
        assert_eq!(missing(&names(&["unavailable: no host"]), &[]), all);
        assert!(REQUIRED.iter().all(|r| KNOWN.contains(r)));
    }

    #[test]
    fn the_policy_lets_through_only_what_it_lists() {
        let allowed = allowed_syscalls();
        for denied in [
            libc::SYS_socket,
            libc::SYS_execve,
            libc::SYS_ptrace,
            libc::SYS_io_uring_setup,
            libc::SYS_unshare,
            libc::SYS_truncate,
            libc::SYS_fchmod,
            libc::SYS_setrlimit,
            libc::SYS_clone3,
        ] {
            assert!(!allowed.contains(&denied), "{denied} is allowed");
        }
        for stage in [Stage::Loading, Stage::Computing] {
            assert!(!policy(stage).unwrap().is_empty());
        }
    }
}
