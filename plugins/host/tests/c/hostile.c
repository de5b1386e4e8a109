/* A hostile plugin for the sandbox tests: each call tries one escape, named by the arguments
 * ({"escape":"NAME"}), from lode_plugin_feed (so the plugin is loaded and the block is being fed).
 * Built with -DINIT_ESCAPE='"NAME"' it tries the escape from an initializer instead, before the
 * host has called anything.
 *
 * The partial result says what happened: "refused NAME: detail" when the kernel refused or never
 * carried out the call, "escaped NAME: detail" when it did. The test fails on "escaped"; calls
 * that hang or flood are expected to be stopped by the host instead.
 *
 * TARGET is the pid of the process standing in for the datanode (the test itself), MARKER a path
 * that must never be created. Escapes that would do harm if they worked use probes without effect
 * (signal 0, bad magic numbers, bad pointers) wherever the kernel checks permission first. */
#define _GNU_SOURCE
#include <lode_plugin.h>
#include <errno.h>
#include <pthread.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef TARGET
#error "build with -DTARGET=<pid>"
#endif
#ifndef MARKER
#error "build with -DMARKER=\"path\""
#endif

static char verdict[8192];
static char name[64];

static void say(int escaped, const char *detail) {
    snprintf(verdict, sizeof verdict, "%s %s: %s", escaped ? "escaped" : "refused", name, detail);
}

/* The kernel reached the call's own work: it succeeded, or failed for a reason other than being
 * refused (EPERM, EACCES) or missing (ENOSYS). */
static int reached(long rc) {
    return rc >= 0 || (errno != EPERM && errno != EACCES && errno != ENOSYS);
}

/* Says what a call returned; `escaped` judges it. */
static void verdict_of(long rc, int escaped) {
    char d[128];
    if (rc >= 0) {
        snprintf(d, sizeof d, "returned %ld", rc);
    } else {
        snprintf(d, sizeof d, "%s", strerror(errno));
    }
    say(escaped, d);
}

/* An escape if the kernel reached the call's work (the probe's arguments are bad on purpose). */
static void report(long rc) { verdict_of(rc, reached(rc)); }

/* An escape only if the call succeeded (the probe's arguments are valid). */
static void report_success(long rc) { verdict_of(rc, rc >= 0); }

/* Sleeps for good (without burning CPU time, so only the wall clock can end it). */
static void *thread_body(void *arg) {
    *(int *)arg = 42;
    return NULL;
}

static void linger(void) {
    for (;;) {
        struct timespec t = {1000, 0};
        nanosleep(&t, NULL);
        pause();
    }
}

static void sweep(long base) {
    /* Every number of the table with zero arguments. Skipped: the calls that end or replace the
     * process, or that make a process, when allowed (they have their own escapes); and x86_64's
     * uretprobe and uprobe (335, 336), which the kernel lets past seccomp by design and which
     * only kill their caller with SIGILL when called from anywhere but a probe trampoline. */
    char *p = verdict;
    size_t room = sizeof verdict;
    int n = snprintf(p, room, "refused %s: reached", name);
    p += n;
    room -= (size_t)n;
    int escaped = 0;
    for (long nr = 0; nr < 470; nr++) {
        if (base == 0 && (nr == SYS_exit || nr == SYS_exit_group || nr == SYS_rt_sigreturn ||
                          nr == SYS_clone || nr == SYS_fork || nr == SYS_vfork || nr == SYS_clone3 ||
                          nr == SYS_pause || nr == SYS_execve || nr == SYS_execveat ||
                          nr == SYS_rt_sigsuspend || nr == SYS_vhangup || nr == 335 || nr == 336)) {
            continue;
        }
        errno = 0;
        long rc = syscall(base + nr, 0, 0, 0, 0, 0, 0);
        if (reached(rc) && room > 16) {
            n = snprintf(p, room, " %ld", nr);
            p += n;
            room -= (size_t)n;
            if (base != 0) escaped = 1;
        }
    }
    if (escaped) memcpy(verdict, "escaped", 7);
}

static void attempt(const char *what) {
    snprintf(name, sizeof name, "%s", what);
    const pid_t target = TARGET;
    char buf[256];
#define IS(s) (strcmp(what, s) == 0)
    /* The block being fed. */
    if (IS("truncate_fd0_path")) report_success(truncate("/proc/self/fd/0", 0));
    else if (IS("ftruncate_fd0")) report_success(ftruncate(0, 0));
    else if (IS("chmod_fd0_path")) report_success(chmod("/proc/self/fd/0", 0));
    else if (IS("fchmod_fd0")) report_success(fchmod(0, 0));
    else if (IS("fchown_fd0")) report_success(fchown(0, 4242, 4242));
    else if (IS("reopen_fd0_for_writing")) report_success(open("/proc/self/fd/0", O_RDWR));
    else if (IS("readlink_fd0")) report_success(readlink("/proc/self/fd/0", buf, sizeof buf));
    else if (IS("write_fd0")) report_success(write(0, "x", 1));
    else if (IS("mmap_fd0_shared_writable")) {
        void *m = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, 0, 0);
        report_success(m == MAP_FAILED ? -1 : 0);
    }
    else if (IS("inherited_fds")) {
        int found = -1;
        for (int fd = 0; fd < 4096; fd++) {
            if (fd == 1 || fd == 2) continue;
            if (read(fd, buf, 0) == 0 || errno != EBADF) { found = fd; break; }
        }
        snprintf(buf, sizeof buf, found < 0 ? "no descriptor but stdout and stderr" : "descriptor %d is open", found);
        say(found >= 0, buf);
    }
    /* Files and /proc. */
    else if (IS("open_etc_passwd")) report_success(open("/etc/passwd", O_RDONLY));
    else if (IS("open_dot")) report_success(openat(AT_FDCWD, ".", O_RDONLY | O_DIRECTORY));
    else if (IS("open_proc_self_mem")) report_success(open("/proc/self/mem", O_RDWR));
    else if (IS("open_parent_proc")) {
        snprintf(buf, sizeof buf, "/proc/%d/status", target);
        report_success(open(buf, O_RDONLY));
    }
    else if (IS("create_marker")) report_success(open(MARKER, O_WRONLY | O_CREAT, 0644));
    else if (IS("mkdir_marker")) report_success(mkdir(MARKER, 0755));
    else if (IS("stat_root")) { struct stat st; report_success(stat("/", &st)); }
    /* Limits and signals aimed at the datanode, or raised for itself. */
    else if (IS("prlimit_parent")) {
        struct rlimit zero = {0, 0};
        report_success(prlimit(target, RLIMIT_NOFILE, &zero, NULL));
    }
    else if (IS("prlimit_parent_read")) {
        struct rlimit old;
        report_success(prlimit(target, RLIMIT_NOFILE, NULL, &old));
    }
    else if (IS("setrlimit_up")) {
        struct rlimit inf = {RLIM_INFINITY, RLIM_INFINITY};
        report_success(setrlimit(RLIMIT_AS, &inf));
    }
    else if (IS("setrlimit_cpu_up")) {
        struct rlimit inf = {RLIM_INFINITY, RLIM_INFINITY};
        report_success(setrlimit(RLIMIT_CPU, &inf));
    }
    else if (IS("kill_parent")) report_success(kill(target, 0));
    else if (IS("kill_everyone")) report_success(kill(-1, 0));
    else if (IS("kill_group")) report_success(kill(0, 0));
    else if (IS("tgkill_parent")) report_success(syscall(SYS_tgkill, target, target, 0));
    else if (IS("tkill_parent")) report_success(syscall(SYS_tkill, target, 0));
    else if (IS("sigqueue_parent")) {
        siginfo_t si;
        memset(&si, 0, sizeof si);
        si.si_code = SI_QUEUE;
        report_success(syscall(SYS_rt_sigqueueinfo, target, 0, &si));
    }
    else if (IS("pidfd_parent")) report_success(syscall(SYS_pidfd_open, target, 0));
    else if (IS("ptrace_parent")) {
        long rc = ptrace(PTRACE_SEIZE, target, 0, 0);
        if (rc == 0) ptrace(PTRACE_DETACH, target, 0, 0);
        report_success(rc);
    }
    else if (IS("ptrace_traceme")) report_success(ptrace(PTRACE_TRACEME, 0, 0, 0));
    else if (IS("process_vm_readv_parent")) {
        struct iovec local = {buf, 1}, remote = {(void *)0x1000, 1};
        report(process_vm_readv(target, &local, 1, &remote, 1, 0));
    }
    else if (IS("getppid")) {
        long p = syscall(SYS_getppid);
        say(p == target, p == target ? "sees the datanode's pid" : "does not see the datanode");
    }
    /* Processes. */
    else if (IS("fork")) {
        pid_t p = fork();
        if (p == 0) linger();
        report_success(p);
    }
    else if (IS("clone_process")) {
        long p = syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0);
        if (p == 0) linger();
        report_success(p);
    }
    else if (IS("clone_newuser")) {
        long p = syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0);
        if (p == 0) linger();
        report_success(p);
    }
    else if (IS("clone3_process")) {
        struct { unsigned long long flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls; } args;
        memset(&args, 0, sizeof args);
        args.exit_signal = SIGCHLD;
        long p = syscall(SYS_clone3, &args, sizeof args);
        if (p == 0) linger();
        report_success(p);
    }
    else if (IS("fork_bomb")) {
        int made = 0;
        for (int i = 0; i < 100000; i++) {
            pid_t p = fork();
            if (p == 0) continue; /* children keep forking */
            if (p < 0) break;
            made++;
        }
        snprintf(buf, sizeof buf, "made %d processes", made);
        say(made > 0, buf);
    }
    else if (IS("unshare_newuser")) report_success(unshare(CLONE_NEWUSER));
    else if (IS("unshare_newns")) report_success(unshare(CLONE_NEWNS));
    else if (IS("setns")) report_success(setns(0, 0));
    else if (IS("setsid")) report_success(setsid());
    else if (IS("setpgid")) report_success(setpgid(0, 0));
    else if (IS("setuid")) report_success(setuid(4242));
    else if (IS("setresgid")) report_success(setresgid(4242, 4242, 4242));
    else if (IS("execve")) {
        char *argv[] = {"/bin/sh", "-c", "touch " MARKER, NULL};
        execve("/bin/sh", argv, NULL);
        report_success(-1);
    }
    else if (IS("execveat")) {
        char *argv[] = {"sh", "-c", "touch " MARKER, NULL};
        syscall(SYS_execveat, AT_FDCWD, "/bin/sh", argv, NULL, 0);
        report_success(-1);
    }
    else if (IS("memfd_create")) report_success(memfd_create("x", 0));
    /* Sockets by every route. */
    else if (IS("socket_inet")) report_success(socket(AF_INET, SOCK_STREAM, 0));
    else if (IS("socket_unix")) report_success(socket(AF_UNIX, SOCK_STREAM, 0));
    else if (IS("socket_netlink")) report_success(socket(AF_NETLINK, SOCK_RAW, 0));
    else if (IS("socketpair")) { int sv[2]; report_success(socketpair(AF_UNIX, SOCK_STREAM, 0, sv)); }
    else if (IS("io_uring_setup")) {
        struct io_uring_params p;
        memset(&p, 0, sizeof p);
        report_success(syscall(SYS_io_uring_setup, 4, &p));
    }
    /* Kernel interfaces with no business in a computation. */
    else if (IS("userfaultfd")) report_success(syscall(SYS_userfaultfd, 0));
    else if (IS("keyctl")) report_success(syscall(SYS_keyctl, 0 /* GET_KEYRING_ID */, -3 /* session */, 0));
    else if (IS("add_key")) report(syscall(SYS_add_key, "user", "x", (void *)1, 1, -3));
    else if (IS("bpf")) report(syscall(SYS_bpf, 5 /* PROG_LOAD */, (void *)1, 8));
    else if (IS("perf_event_open")) report(syscall(SYS_perf_event_open, (void *)1, 0, -1, -1, 0));
    else if (IS("mount")) report(syscall(SYS_mount, (void *)1, (void *)1, (void *)1, 0, 0));
    else if (IS("umount2")) report(syscall(SYS_umount2, (void *)1, 0));
    else if (IS("chroot")) report(syscall(SYS_chroot, (void *)1));
    else if (IS("pivot_root")) report(syscall(SYS_pivot_root, (void *)1, (void *)1));
    else if (IS("init_module")) report(syscall(SYS_init_module, (void *)1, 1, (void *)1));
    else if (IS("finit_module")) report(syscall(SYS_finit_module, -1, (void *)1, 0));
    else if (IS("delete_module")) report(syscall(SYS_delete_module, (void *)1, 0));
    else if (IS("kexec_load")) report(syscall(SYS_kexec_load, 0, 0, (void *)1, 0xdead));
    else if (IS("reboot")) report(syscall(SYS_reboot, 0, 0, 0, (void *)1));
    else if (IS("sethostname")) report(syscall(SYS_sethostname, (void *)1, 1));
    else if (IS("ioctl_tiocsti")) report(syscall(SYS_ioctl, 2, 0x5412 /* TIOCSTI */, (void *)1));
    else if (IS("personality")) report_success(syscall(SYS_personality, 0x0400000 /* READ_IMPLIES_EXEC */));
    else if (IS("prctl_dumpable")) report_success(prctl(PR_SET_DUMPABLE, 1, 0, 0, 0));
    /* Code: no new executable memory once loaded. */
    else if (IS("mmap_exec")) {
        void *m = mmap(NULL, 4096, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        report_success(m == MAP_FAILED ? -1 : 0);
    }
    else if (IS("mprotect_exec")) {
        void *m = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        report_success(m == MAP_FAILED ? -1 : mprotect(m, 4096, PROT_READ | PROT_EXEC));
    }
    /* Every syscall number, native and through the x32 numbering. */
    else if (IS("syscall_sweep")) sweep(0);
    else if (IS("syscall_sweep_x32")) sweep(0x40000000L);
    /* Dodging the limits. */
    else if (IS("close_stdio_and_pause")) { close(1); close(2); linger(); }
    else if (IS("stderr_flood")) {
        static char junk[65536];
        memset(junk, 'e', sizeof junk);
        for (int i = 0; i < 4096; i++) if (write(2, junk, sizeof junk) < 0) break;
        say(0, "wrote 256 MiB to stderr");
    }
    else if (IS("nothing")) say(0, "did nothing");
    /* Not an escape: what a computing plugin may do, which must keep working. */
    else if (IS("threads")) {
        pthread_t t;
        int v = 0;
        int rc = pthread_create(&t, NULL, thread_body, &v);
        if (rc == 0) pthread_join(t, NULL);
        snprintf(verdict, sizeof verdict, "ok threads: %s",
                 rc == 0 && v == 42 ? "a thread ran" : strerror(rc));
    }
    else say(1, "unknown escape (the test names one this plugin lacks)");
#undef IS
}

#ifdef INIT_ESCAPE
__attribute__((constructor)) static void init_escape(void) { attempt(INIT_ESCAPE); }
#endif

uint32_t lode_plugin_abi_version(void) { return LODE_PLUGIN_ABI_VERSION; }
const char *lode_plugin_name(void) { return "hostile"; }
uint32_t lode_plugin_input_mode(void) { return LODE_INPUT_BYTES; }

void *lode_plugin_new(const uint8_t *args, size_t n) {
    static char escape[64];
    const char *key = "\"escape\":\"";
    char json[512];
    size_t len = n < sizeof json - 1 ? n : sizeof json - 1;
    memcpy(json, args, len);
    json[len] = 0;
    char *at = strstr(json, key);
    escape[0] = 0;
    if (at) {
        at += strlen(key);
        size_t i = 0;
        while (at[i] && at[i] != '"' && i < sizeof escape - 1) { escape[i] = at[i]; i++; }
        escape[i] = 0;
    }
    return escape;
}

int32_t lode_plugin_feed(void *state, const uint8_t *data, size_t len) {
    (void)data; (void)len;
    const char *escape = state;
    if (escape[0] && !verdict[0]) attempt(escape);
    return 0;
}

int32_t lode_plugin_finish(void *state, lode_buf *out) {
    (void)state;
    size_t n = strlen(verdict);
    out->ptr = malloc(n);
    memcpy(out->ptr, verdict, n);
    out->len = n;
    return 0;
}

int32_t lode_plugin_combine(const lode_buf *parts, size_t n, lode_buf *out) {
    (void)n;
    out->ptr = malloc(parts[0].len);
    memcpy(out->ptr, parts[0].ptr, parts[0].len);
    out->len = parts[0].len;
    return 0;
}

void lode_plugin_free(lode_buf buf) { free(buf.ptr); }
