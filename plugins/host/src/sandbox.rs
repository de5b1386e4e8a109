//! The child's sandbox, applied before the plugin is loaded so its initializers run inside it:
//! resource limits (address space, CPU time, no file writes, no core dumps), no new privileges,
//! landlock (read-only access to the plugin and the system libraries, nothing else) where the kernel
//! has it, and a seccomp filter refusing sockets, exec, fork and tracing. After loading, a second
//! seccomp filter refuses opening any file at all.

use std::collections::BTreeMap;
use std::path::Path;

use seccompiler::{SeccompAction, SeccompFilter, SeccompRule, TargetArch};

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

/// Applies the sandbox; returns the protections that are active.
pub fn enter(plugin: &Path, limits: ChildLimits) -> Result<Vec<String>, String> {
    let mut active = vec![];
    set_limit(libc::RLIMIT_AS, limits.memory_bytes)?;
    set_limit(libc::RLIMIT_CPU, limits.cpu_secs)?;
    set_limit(libc::RLIMIT_FSIZE, 0)?;
    set_limit(libc::RLIMIT_CORE, 0)?;
    active.push("rlimits".to_string());
    // SAFETY: prctl with constant arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(format!("no_new_privs: {}", std::io::Error::last_os_error()));
    }
    active.push("no_new_privs".to_string());
    if landlock(plugin)? {
        active.push("landlock".to_string());
    }
    let mut denied = vec![
        libc::SYS_socket,
        libc::SYS_socketpair,
        libc::SYS_connect,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_accept,
        libc::SYS_accept4,
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_chroot,
        libc::SYS_pivot_root,
        libc::SYS_setns,
        libc::SYS_unshare,
        libc::SYS_kill,
        libc::SYS_tkill,
    ];
    #[cfg(target_arch = "x86_64")]
    denied.extend([libc::SYS_fork, libc::SYS_vfork, libc::SYS_creat]);
    apply_filter(&denied, &write_opens()?)?;
    active.push("seccomp".to_string());
    Ok(active)
}

/// After loading the plugin: refuse every way of opening a file.
pub fn forbid_opening_files() -> Result<(), String> {
    let mut denied = vec![
        libc::SYS_openat,
        libc::SYS_openat2,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_mknodat,
        libc::SYS_linkat,
        libc::SYS_symlinkat,
        libc::SYS_unlinkat,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_mkdirat,
        libc::SYS_memfd_create,
    ];
    #[cfg(target_arch = "x86_64")]
    denied.extend([
        libc::SYS_open,
        libc::SYS_creat,
        libc::SYS_mknod,
        libc::SYS_link,
        libc::SYS_symlink,
        libc::SYS_unlink,
        libc::SYS_rename,
        libc::SYS_mkdir,
    ]);
    apply_seccomp(&denied)
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

fn apply_seccomp(denied: &[i64]) -> Result<(), String> {
    apply_filter(denied, &[])
}

/// Rules refusing `open`/`openat` for writing, creating or truncating (loading needs read-only opens).
fn write_opens() -> Result<Vec<(i64, Vec<SeccompRule>)>, String> {
    use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition};
    let flag_rules = |arg: u8| -> Result<Vec<SeccompRule>, String> {
        [
            libc::O_WRONLY,
            libc::O_RDWR,
            libc::O_CREAT,
            libc::O_TRUNC,
            libc::O_APPEND,
        ]
        .iter()
        .map(|flag| {
            let bit = *flag as u64;
            let cond = SeccompCondition::new(
                arg,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(bit),
                bit,
            )
            .map_err(|e| format!("seccomp condition: {e}"))?;
            SeccompRule::new(vec![cond]).map_err(|e| format!("seccomp rule: {e}"))
        })
        .collect()
    };
    let mut rules = vec![(libc::SYS_openat, flag_rules(2)?)];
    #[cfg(target_arch = "x86_64")]
    rules.push((libc::SYS_open, flag_rules(1)?));
    rules.push((libc::SYS_openat2, vec![]));
    Ok(rules)
}

fn apply_filter(denied: &[i64], conditional: &[(i64, Vec<SeccompRule>)]) -> Result<(), String> {
    let arch =
        TargetArch::try_from(std::env::consts::ARCH).map_err(|e| format!("seccomp: {e:?}"))?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = denied.iter().map(|s| (*s, vec![])).collect();
    rules.extend(conditional.iter().cloned());
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| format!("seccomp filter: {e}"))?;
    let program: seccompiler::BpfProgram = filter
        .try_into()
        .map_err(|e| format!("seccomp program: {e:?}"))?;
    seccompiler::apply_filter(&program).map_err(|e| format!("seccomp: {e}"))
}

/// Read-only access to the plugin file and the library directories; nothing else on the file
/// system. Returns false where the kernel has no landlock.
fn landlock(plugin: &Path) -> Result<bool, String> {
    use landlock::{
        Access, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
        RulesetStatus, ABI,
    };
    let abi = ABI::V2;
    let err = |e: &dyn std::fmt::Display| format!("landlock: {e}");
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(|e| err(&e))?
        .create()
        .map_err(|e| err(&e))?;
    let mut paths: Vec<&Path> = LIBRARY_DIRS.iter().map(Path::new).collect();
    paths.push(plugin);
    paths.retain(|p| p.exists());
    for p in paths {
        let fd = PathFd::new(p).map_err(|e| format!("landlock: open {}: {e}", p.display()))?;
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, AccessFs::from_read(abi)))
            .map_err(|e| err(&e))?;
    }
    let status = ruleset.restrict_self().map_err(|e| err(&e))?;
    Ok(status.ruleset != RulesetStatus::NotEnforced)
}
