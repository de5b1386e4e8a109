//! Runs Lode plugins without trusting them: every call happens in a fresh `lode-plugin-host` child
//! process that applies its sandbox (see [`sandbox`]) *before* loading the plugin, so even the
//! plugin's initializers are confined. The parent enforces the wall-clock and output limits and
//! turns every way a child can die into an [`Error`] that names the plugin and the cause.
//!
//! The block a task reads reaches the child as its stdin file descriptor (no copy through the
//! caller); the child checks every 64 KiB piece against the block's sidecar values before the
//! plugin sees it. Read [`Host`] first.

pub mod child;
pub mod sandbox;
pub mod wire;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub use wire::RunSpec;
use wire::{exit, ChildLimits, Request};

/// Limits for one plugin call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Address space of the child, bytes. Default 1 GiB.
    pub memory_bytes: u64,
    /// CPU time, seconds. Default 60.
    pub cpu_secs: u64,
    /// Wall-clock time. Default 120 s.
    pub wall: Duration,
    /// Largest result accepted, bytes. Default 16 MiB.
    pub output_bytes: usize,
    /// The uid and gid the child runs the plugin as (possible when the caller is root). Default
    /// none: the child keeps the caller's identity, and reports no `identity` protection.
    pub run_as: Option<(u32, u32)>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 1 << 30,
            cpu_secs: 60,
            wall: Duration::from_secs(120),
            output_bytes: 16 << 20,
            run_as: None,
        }
    }
}

/// Why a plugin call failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The child died on a signal (segfault, abort, ...).
    #[error("plugin {plugin} crashed ({signal})")]
    Crashed {
        /// Plugin file.
        plugin: String,
        /// The signal, in words.
        signal: String,
    },
    /// The plugin hit its memory limit.
    #[error("plugin {plugin} exceeded its memory limit of {limit_bytes} bytes")]
    Memory {
        /// Plugin file.
        plugin: String,
        /// The limit.
        limit_bytes: u64,
    },
    /// The plugin used up its CPU time.
    #[error("plugin {plugin} exceeded its CPU limit of {secs} s")]
    Cpu {
        /// Plugin file.
        plugin: String,
        /// The limit.
        secs: u64,
    },
    /// The plugin ran past its wall-clock limit and was killed.
    #[error("plugin {plugin} ran longer than {secs} s and was killed")]
    WallClock {
        /// Plugin file.
        plugin: String,
        /// The limit.
        secs: u64,
    },
    /// The plugin produced more output than allowed.
    #[error("plugin {plugin} produced more than {limit_bytes} bytes of result")]
    OutputTooLarge {
        /// Plugin file.
        plugin: String,
        /// The limit.
        limit_bytes: usize,
    },
    /// A plugin call returned an error, or its arguments were refused.
    #[error("plugin {plugin}: {message}")]
    Plugin {
        /// Plugin file.
        plugin: String,
        /// What it said.
        message: String,
    },
    /// The file is not a plugin (not a shared library, missing exports, wrong ABI version).
    #[error("{plugin} is not a usable plugin: {message}")]
    NotAPlugin {
        /// Plugin file.
        plugin: String,
        /// Why.
        message: String,
    },
    /// The block failed its checksum.
    #[error("plugin {plugin}: input {message}")]
    Corrupt {
        /// Plugin file.
        plugin: String,
        /// Where.
        message: String,
    },
    /// Starting or talking to the child failed.
    #[error("plugin host: {0}")]
    Host(String),
}

/// What `inspect` learns about a plugin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginInfo {
    /// `lode_plugin_name()`.
    pub name: String,
    /// `lode_plugin_input_mode()`: 0 bytes, 1 lines.
    pub input_mode: u32,
    /// Whether it exports `lode_plugin_render`.
    pub has_render: bool,
}

/// The result of one task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskOutput {
    /// Bytes fed to the plugin.
    pub bytes_fed: u64,
    /// The partial result.
    pub partial: Vec<u8>,
}

/// Starts sandboxed plugin calls through a `lode-plugin-host` executable.
#[derive(Clone, Debug)]
pub struct Host {
    exe: PathBuf,
    limits: Limits,
    /// Plugins that load only while their bytes have this BLAKE3 hash.
    pins: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<PathBuf, [u8; 32]>>>,
}

impl Host {
    /// A host using the given `lode-plugin-host` executable.
    pub fn new(exe: PathBuf, limits: Limits) -> Host {
        Host {
            exe,
            limits,
            pins: Default::default(),
        }
    }

    /// From now on `plugin` loads only while its bytes hash to `hash` (BLAKE3). The bytes hashed
    /// are the bytes the child loads (both come from one read into a sealed memory file), so a
    /// file swapped after a check is never run.
    pub fn pin(&self, plugin: &Path, hash: [u8; 32]) {
        if let Ok(mut pins) = self.pins.lock() {
            pins.insert(plugin.to_path_buf(), hash);
        }
    }

    /// Finds `lode-plugin-host` next to the running executable (where cargo and installs put it).
    pub fn beside_current_exe(limits: Limits) -> Result<Host, Error> {
        let exe = std::env::current_exe().map_err(|e| Error::Host(format!("current exe: {e}")))?;
        let dir = exe
            .parent()
            .ok_or_else(|| Error::Host("executable has no directory".into()))?;
        for candidate in [
            dir.join("lode-plugin-host"),
            dir.join("../lode-plugin-host"),
        ] {
            if candidate.exists() {
                return Ok(Host::new(candidate, limits));
            }
        }
        Err(Error::Host(format!(
            "lode-plugin-host not found next to {}",
            exe.display()
        )))
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Runs one task: `block` is the block file, read by the child directly.
    pub fn run(&self, plugin: &Path, block: &File, spec: RunSpec) -> Result<TaskOutput, Error> {
        let out = self.call(plugin, Request::Run(spec), Some(block))?;
        if out.len() < 8 {
            return Err(Error::Host("short task output".into()));
        }
        let mut n = [0u8; 8];
        n.copy_from_slice(&out[..8]);
        Ok(TaskOutput {
            bytes_fed: u64::from_le_bytes(n),
            partial: out[8..].to_vec(),
        })
    }

    /// Combines partial results.
    pub fn combine(&self, plugin: &Path, parts: Vec<Vec<u8>>) -> Result<Vec<u8>, Error> {
        self.call(plugin, Request::Combine(parts), None)
    }

    /// Renders a final partial for humans (the partial itself when the plugin has no render).
    pub fn render(&self, plugin: &Path, partial: Vec<u8>) -> Result<Vec<u8>, Error> {
        self.call(plugin, Request::Render(partial), None)
    }

    /// Loads a plugin (in the sandbox) and reports its name and input mode.
    pub fn inspect(&self, plugin: &Path) -> Result<PluginInfo, Error> {
        let out = self.call(plugin, Request::Inspect, None)?;
        let text = String::from_utf8_lossy(&out);
        let lines: Vec<&str> = text.lines().collect();
        match lines.as_slice() {
            [name, "1", mode, render] => Ok(PluginInfo {
                name: name.to_string(),
                input_mode: mode
                    .parse()
                    .map_err(|_| Error::Host("bad inspect output".into()))?,
                has_render: *render == "1",
            }),
            _ => Err(Error::Host("bad inspect output".into())),
        }
    }

    /// The protections a sandboxed child gets on this machine (e.g. `rlimits,no_new_privs,seccomp`).
    pub fn probe(&self) -> Result<Vec<String>, Error> {
        let out = self.call(Path::new("/nonexistent-probe"), Request::Probe, None)?;
        Ok(String::from_utf8_lossy(&out)
            .split(',')
            .map(str::to_string)
            .collect())
    }

    fn call(&self, plugin: &Path, req: Request, block: Option<&File>) -> Result<Vec<u8>, Error> {
        let name = plugin.display().to_string();
        let limits = ChildLimits {
            memory_bytes: self.limits.memory_bytes,
            cpu_secs: self.limits.cpu_secs,
            run_as: self.limits.run_as,
        };
        let code = match req {
            Request::Probe => None,
            _ => {
                let pinned = self.pins.lock().ok().and_then(|p| p.get(plugin).copied());
                Some(sealed_copy(plugin, pinned).map_err(|e| Error::NotAPlugin {
                    plugin: name.clone(),
                    message: e,
                })?)
            }
        };
        let control = wire::encode(&req, limits);
        let (control_read, mut control_write) =
            pipe().map_err(|e| Error::Host(format!("pipe: {e}")))?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg(plugin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_clear();
        match block {
            Some(f) => cmd.stdin(
                f.try_clone()
                    .map_err(|e| Error::Host(format!("dup block fd: {e}")))?,
            ),
            None => cmd.stdin(Stdio::null()),
        };
        let fd = control_read.as_raw_fd();
        let code_fd = code.as_ref().map_or(-1, |c| c.as_raw_fd());
        // SAFETY: getpid has no arguments.
        let parent = unsafe { libc::getpid() };
        let switch_identity = self.limits.run_as.is_some();
        // SAFETY: only async-signal-safe calls (setsid, prctl, getppid, capget, capset, fcntl,
        // dup2) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let err = std::io::Error::last_os_error;
                // Its own session and process group, so everything it could start is killed with
                // it; and it dies with the process that started it.
                if libc::setsid() < 0
                    || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0
                {
                    return Err(err());
                }
                // A parent gone before the death signal was asked for sends none.
                if libc::getppid() != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                if switch_identity {
                    sandbox::pass_identity_capabilities()?;
                }
                // The control pipe becomes fd 3 and the plugin fd 4 (both moved out of the way
                // first, so neither lands on the other's number), open across exec.
                let control = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
                let code = if code_fd >= 0 {
                    libc::fcntl(code_fd, libc::F_DUPFD_CLOEXEC, 10)
                } else {
                    -1
                };
                if control < 0 || (code_fd >= 0 && code < 0) || libc::dup2(control, 3) < 0 {
                    return Err(err());
                }
                if code >= 0 && libc::dup2(code, 4) < 0 {
                    return Err(err());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::Host(format!("start {}: {e}", self.exe.display())))?;
        drop(control_read);
        drop(code);
        let proc = ChildProc::new(&child);
        let writer = std::thread::spawn(move || {
            let _ = control_write.write_all(&control);
        });
        let mut stdout = child
            .stdout
            .take()
            .ok_or_else(|| Error::Host("no stdout".into()))?;
        let mut stderr = child
            .stderr
            .take()
            .ok_or_else(|| Error::Host("no stderr".into()))?;
        let cap = self.limits.output_bytes;
        let (out_tx, out_rx) = mpsc::channel();
        let killer = proc.clone();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let r = (&mut stdout).take(cap as u64 + 9).read_to_end(&mut buf);
            if buf.len() > cap + 8 {
                // Too much: stop it now rather than at the wall clock.
                killer.kill();
            }
            let _ = out_tx.send(r.map(|_| buf));
        });
        let err_reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = (&mut stderr).take(STDERR_BYTES).read_to_end(&mut buf);
            // Past the bound, the rest is drained and dropped: a child never blocks on it.
            let _ = std::io::copy(&mut stderr, &mut std::io::sink());
            buf
        });
        // The wall clock bounds the child's life, not its output: a child that closes its pipes
        // and sleeps is killed on time.
        let deadline = Instant::now() + self.limits.wall;
        let timed_out = !proc.wait_exit(deadline);
        // Whatever happened, everything in its process group goes (the leader, not yet reaped,
        // keeps the group's id from being reused meanwhile).
        proc.kill_group();
        let status = child
            .wait()
            .map_err(|e| Error::Host(format!("wait: {e}")))?;
        let _ = writer.join();
        let output = out_rx.recv_timeout(PIPE_GRACE);
        let too_large = matches!(&output, Ok(Ok(b)) if b.len() > cap + 8);
        let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default())
            .trim()
            .to_string();
        if timed_out {
            return Err(Error::WallClock {
                plugin: name,
                secs: self.limits.wall.as_secs(),
            });
        }
        if too_large {
            return Err(Error::OutputTooLarge {
                plugin: name,
                limit_bytes: cap,
            });
        }
        let output = match output {
            Ok(Ok(b)) => b,
            _ => Vec::new(),
        };
        if let Some(sig) = status.signal() {
            return Err(match sig {
                libc::SIGXCPU => Error::Cpu {
                    plugin: name,
                    secs: self.limits.cpu_secs,
                },
                libc::SIGABRT if stderr.contains("memory allocation") => Error::Memory {
                    plugin: name,
                    limit_bytes: self.limits.memory_bytes,
                },
                libc::SIGKILL if stderr.is_empty() => Error::Cpu {
                    plugin: name,
                    secs: self.limits.cpu_secs,
                },
                s => Error::Crashed {
                    plugin: name,
                    signal: signal_name(s),
                },
            });
        }
        match status.code() {
            Some(0) => Ok(output),
            Some(exit::PLUGIN_ERROR) if stderr.contains("memory allocation") => {
                Err(Error::Memory {
                    plugin: name,
                    limit_bytes: self.limits.memory_bytes,
                })
            }
            Some(exit::PLUGIN_ERROR) => Err(Error::Plugin {
                plugin: name,
                message: stderr,
            }),
            Some(exit::NOT_A_PLUGIN | exit::MISSING_EXPORT | exit::ABI_MISMATCH) => {
                Err(Error::NotAPlugin {
                    plugin: name,
                    message: stderr,
                })
            }
            Some(exit::CORRUPT) => Err(Error::Corrupt {
                plugin: name,
                message: stderr,
            }),
            Some(code) => Err(Error::Host(format!("child exited with {code}: {stderr}"))),
            None => Err(Error::Host("child ended without a status".into())),
        }
    }
}

/// The plugin's bytes in a sealed memory file (no write, grow or shrink can follow): the child
/// loads exactly what was read here, whatever happens to the path afterwards; with `pinned`, only
/// if those bytes have that hash.
fn sealed_copy(plugin: &Path, pinned: Option<[u8; 32]>) -> Result<OwnedFd, String> {
    let bytes = std::fs::read(plugin).map_err(|e| format!("cannot read it: {e}"))?;
    if let Some(hash) = pinned {
        if blake3::hash(&bytes).as_bytes() != &hash {
            return Err("its bytes no longer match the hash it was checked against".into());
        }
    }
    write_sealed(&bytes).map_err(|e| format!("cannot copy it into a sealed memory file: {e}"))
}

fn write_sealed(bytes: &[u8]) -> std::io::Result<OwnedFd> {
    // SAFETY: memfd_create with a constant name; the descriptor is owned below.
    let fd = unsafe {
        libc::memfd_create(
            c"lode-plugin".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    use std::os::fd::FromRawFd;
    // SAFETY: a new descriptor nobody else owns.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(bytes)?;
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: fcntl on our descriptor.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(OwnedFd::from(file))
}

/// Error output kept from a child (the rest is drained and dropped).
const STDERR_BYTES: u64 = 64 * 1024;
/// How long the output pipes may stay open after the child and its group are gone.
const PIPE_GRACE: Duration = Duration::from_secs(2);

/// A started child, watched through a pidfd where the kernel has them (signals and waits then
/// cannot reach a reused pid).
#[derive(Clone)]
struct ChildProc {
    pid: i32,
    pidfd: Option<std::sync::Arc<OwnedFd>>,
}

impl ChildProc {
    fn new(child: &std::process::Child) -> ChildProc {
        let pid = child.id() as i32;
        // SAFETY: pidfd_open on our own unreaped child; the descriptor is owned below.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        let pidfd = (fd >= 0).then(|| {
            use std::os::fd::FromRawFd;
            // SAFETY: a new descriptor nobody else owns.
            std::sync::Arc::new(unsafe { OwnedFd::from_raw_fd(fd as i32) })
        });
        ChildProc { pid, pidfd }
    }

    /// Waits until the child has exited (without reaping it) or `deadline`; true if it exited.
    fn wait_exit(&self, deadline: Instant) -> bool {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Some(fd) = &self.pidfd {
                let mut p = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                let ms = left.as_millis().min(i32::MAX as u128) as i32;
                // SAFETY: poll on one valid descriptor.
                let rc = unsafe { libc::poll(&mut p, 1, ms) };
                if rc > 0 {
                    return true;
                }
                if rc == 0 {
                    return false;
                }
                if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                    return self.exited_now();
                }
            } else {
                if self.exited_now() {
                    return true;
                }
                if left.is_zero() {
                    return false;
                }
                std::thread::park_timeout(left.min(Duration::from_millis(5)));
            }
        }
    }

    /// Whether the child has exited, leaving it unreaped.
    fn exited_now(&self) -> bool {
        // SAFETY: waitid with WNOWAIT only inspects our child; the struct is ours.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                self.pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: si_pid is set by waitid when a child changed state.
        rc == 0 && unsafe { info.si_pid() } != 0
    }

    /// Kills the child.
    fn kill(&self) {
        match &self.pidfd {
            // SAFETY: pidfd_send_signal on our descriptor.
            Some(fd) => unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                );
            },
            // SAFETY: kill of our own child, not yet reaped (the caller reaps it later).
            None => unsafe {
                libc::kill(self.pid, libc::SIGKILL);
            },
        }
    }

    /// Kills every process in the child's process group (it leads one: `setsid` at start).
    fn kill_group(&self) {
        self.kill();
        // SAFETY: the group's leader is our unreaped child, so its id names only its group.
        unsafe { libc::kill(-self.pid, libc::SIGKILL) };
    }
}

fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGSEGV => "segmentation fault",
        libc::SIGBUS => "bus error",
        libc::SIGILL => "illegal instruction",
        libc::SIGFPE => "arithmetic error",
        libc::SIGABRT => "aborted",
        libc::SIGKILL => "killed",
        libc::SIGSYS => "forbidden system call",
        _ => "signal",
    };
    format!("signal {sig}: {name}")
}

fn pipe() -> std::io::Result<(OwnedFd, File)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe {
        use std::os::fd::FromRawFd;
        Ok((OwnedFd::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])))
    }
}
