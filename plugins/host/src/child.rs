//! The child side: read the request from fd 3, map the block from fd 0 and close every descriptor
//! but stdout and stderr, apply the sandbox, load the plugin (its initializers run inside the
//! sandbox), seal the sandbox, do the work, print the result on stdout. Every failure is one line
//! on stderr and an exit code from [`crate::wire::exit`].

use std::ffi::{c_char, c_void, CStr};
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::path::Path;

use crate::wire::{self, exit, Request, RunSpec};

/// Bytes of input gathered before a feed call in line mode (whole records only).
const FEED_BYTES: usize = 1 << 20;
const PIECE: u64 = 64 * 1024;

#[repr(C)]
struct LodeBuf {
    ptr: *mut u8,
    len: usize,
}

type AbiFn = unsafe extern "C" fn() -> u32;
type NameFn = unsafe extern "C" fn() -> *const c_char;
type NewFn = unsafe extern "C" fn(*const u8, usize) -> *mut c_void;
type FeedFn = unsafe extern "C" fn(*mut c_void, *const u8, usize) -> i32;
type FinishFn = unsafe extern "C" fn(*mut c_void, *mut LodeBuf) -> i32;
type CombineFn = unsafe extern "C" fn(*const LodeBuf, usize, *mut LodeBuf) -> i32;
type RenderFn = unsafe extern "C" fn(*const u8, usize, *mut LodeBuf) -> i32;
type FreeFn = unsafe extern "C" fn(LodeBuf);
type ErrFn = unsafe extern "C" fn() -> *const c_char;

struct Loaded {
    _lib: libloading::Library,
    name: String,
    mode: u32,
    new: NewFn,
    feed: FeedFn,
    finish: FinishFn,
    combine: CombineFn,
    render: Option<RenderFn>,
    free: FreeFn,
    last_error: Option<ErrFn>,
}

fn fail(code: i32, msg: impl std::fmt::Display) -> ! {
    let line = msg.to_string().replace('\n', " ");
    let _ = writeln!(std::io::stderr(), "{line}");
    std::process::exit(code)
}

/// The child's entry point: `lode-plugin-host PLUGIN` with the request on fd 3.
pub fn main() -> ! {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 2 {
        fail(2, "usage: lode-plugin-host PLUGIN (started by a datanode or the lode client, not by hand)");
    }
    // The plugin's bytes come on fd 4, a sealed memory file the parent filled: what is loaded is
    // what the parent read (no path to swap between a check and the load), and it needs no
    // permission on the plugin's file. `PLUGIN` only names it in messages.
    // SAFETY: fd 3 is the control pipe set up by the parent; we take ownership of it once.
    let mut control = unsafe { std::fs::File::from_raw_fd(3) };
    let mut raw = Vec::new();
    if let Err(e) = control.read_to_end(&mut raw) {
        fail(exit::BAD_REQUEST, format!("read control pipe: {e}"));
    }
    drop(control);
    let (req, limits) = wire::decode(&raw).unwrap_or_else(|e| fail(exit::BAD_REQUEST, e));
    // The block is mapped read-only and its descriptor closed before any plugin code runs: the
    // plugin gets bytes, never a file it could truncate, chmod, reopen or resolve to a path.
    let block = match &req {
        Request::Run(spec) => {
            // SAFETY: fd 0 is the block file the parent opened for us; we take it once.
            let file = unsafe { std::fs::File::from_raw_fd(0) };
            Some(Mapping::new(&file, spec.block_len).unwrap_or_else(|e| fail(exit::CORRUPT, e)))
        }
        _ => None,
    };
    close_inherited();
    let protections = crate::sandbox::enter(limits).unwrap_or_else(|e| fail(exit::SANDBOX, e));
    if req == Request::Probe {
        print_out(protections.join(",").as_bytes());
    }
    let loaded = load(Path::new(PLUGIN_FD_PATH));
    // SAFETY: the plugin's descriptor, no longer needed once it is mapped.
    unsafe { libc::close(PLUGIN_FD) };
    // Loaded: nothing more to open or make executable, ever.
    crate::sandbox::seal().unwrap_or_else(|e| fail(exit::SANDBOX, e));
    match req {
        Request::Inspect => {
            let text = format!(
                "{}\n1\n{}\n{}\n",
                loaded.name,
                loaded.mode,
                u8::from(loaded.render.is_some())
            );
            print_out(text.as_bytes())
        }
        Request::Combine(parts) => print_owned(&loaded, combine(&loaded, &parts)),
        Request::Render(partial) => {
            let out = match loaded.render {
                None => partial,
                Some(render) => {
                    let mut buf = LodeBuf {
                        ptr: std::ptr::null_mut(),
                        len: 0,
                    };
                    // SAFETY: ABI call with a valid buffer and out-pointer.
                    let rc = unsafe { render(partial.as_ptr(), partial.len(), &mut buf) };
                    check(&loaded, "render", rc);
                    take(&loaded, buf)
                }
            };
            print_out(&out)
        }
        Request::Run(spec) => {
            let Some(map) = &block else {
                fail(exit::BAD_REQUEST, "no block mapped");
            };
            let (fed, partial) = run(&loaded, spec, map);
            let mut out = fed.to_le_bytes().to_vec();
            out.extend(partial);
            print_out(&out)
        }
        Request::Probe => unreachable!("answered before loading"),
    }
}

/// The plugin's descriptor, and the path it is loaded through.
const PLUGIN_FD: i32 = 4;
const PLUGIN_FD_PATH: &str = "/proc/self/fd/4";

/// Closes stdin (the block, already mapped, or /dev/null) and every descriptor above stderr that
/// the parent may have leaked, all but the plugin's.
fn close_inherited() {
    // SAFETY: closing descriptors this process owns; nothing refers to them any more.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            (PLUGIN_FD + 1) as u32,
            u32::MAX,
            0u32,
        )
    };
    if rc != 0 {
        for fd in PLUGIN_FD + 1..1024 {
            // SAFETY: as above, one at a time where close_range is missing.
            unsafe { libc::close(fd) };
        }
    }
    for fd in [0, 3] {
        // SAFETY: as above.
        unsafe { libc::close(fd) };
    }
}

fn print_out(bytes: &[u8]) -> ! {
    let mut out = std::io::stdout().lock();
    if out.write_all(bytes).and_then(|_| out.flush()).is_err() {
        std::process::exit(1);
    }
    std::process::exit(0)
}

fn print_owned(_l: &Loaded, bytes: Vec<u8>) -> ! {
    print_out(&bytes)
}

fn load(path: &Path) -> Loaded {
    // SAFETY: loading a plugin runs its initializers; that is why this happens inside the sandbox.
    let lib = unsafe { libloading::Library::new(path) }
        .unwrap_or_else(|e| fail(exit::NOT_A_PLUGIN, format!("not a loadable plugin: {e}")));
    macro_rules! sym {
        ($name:literal, $t:ty) => {
            // SAFETY: the symbol's type is fixed by the plugin ABI (lode_plugin.h).
            unsafe { lib.get::<$t>(concat!($name, "\0").as_bytes()) }
                .map(|s| *s)
                .unwrap_or_else(|_| fail(exit::MISSING_EXPORT, concat!("missing export ", $name)))
        };
    }
    macro_rules! opt_sym {
        ($name:literal, $t:ty) => {
            // SAFETY: as above.
            unsafe { lib.get::<$t>(concat!($name, "\0").as_bytes()) }
                .ok()
                .map(|s| *s)
        };
    }
    let abi: AbiFn = sym!("lode_plugin_abi_version", AbiFn);
    // SAFETY: ABI call without arguments.
    let version = unsafe { abi() };
    if version != 1 {
        fail(
            exit::ABI_MISMATCH,
            format!("plugin ABI version {version}, this host speaks 1"),
        );
    }
    let name_fn: NameFn = sym!("lode_plugin_name", NameFn);
    // SAFETY: the ABI says the name is a static NUL-terminated string.
    let name = unsafe {
        let p = name_fn();
        if p.is_null() {
            fail(exit::PLUGIN_ERROR, "lode_plugin_name returned NULL");
        }
        CStr::from_ptr(p).to_string_lossy().into_owned()
    };
    let mode_fn: AbiFn = sym!("lode_plugin_input_mode", AbiFn);
    // SAFETY: ABI call without arguments.
    let mode = unsafe { mode_fn() };
    if mode > 1 {
        fail(exit::PLUGIN_ERROR, format!("unknown input mode {mode}"));
    }
    Loaded {
        name,
        mode,
        new: sym!("lode_plugin_new", NewFn),
        feed: sym!("lode_plugin_feed", FeedFn),
        finish: sym!("lode_plugin_finish", FinishFn),
        combine: sym!("lode_plugin_combine", CombineFn),
        render: opt_sym!("lode_plugin_render", RenderFn),
        free: sym!("lode_plugin_free", FreeFn),
        last_error: opt_sym!("lode_plugin_last_error", ErrFn),
        _lib: lib,
    }
}

fn last_error(l: &Loaded) -> String {
    let Some(f) = l.last_error else {
        return String::new();
    };
    // SAFETY: ABI call; the result is NULL or a NUL-terminated string owned by the plugin.
    unsafe {
        let p = f();
        if p.is_null() {
            String::new()
        } else {
            format!(": {}", CStr::from_ptr(p).to_string_lossy())
        }
    }
}

fn check(l: &Loaded, call: &str, rc: i32) {
    if rc != 0 {
        fail(
            exit::PLUGIN_ERROR,
            format!("{call} returned {rc}{}", last_error(l)),
        );
    }
}

fn take(l: &Loaded, buf: LodeBuf) -> Vec<u8> {
    let out = if buf.ptr.is_null() || buf.len == 0 {
        Vec::new()
    } else {
        // SAFETY: the plugin handed out `len` bytes at `ptr`, valid until lode_plugin_free.
        unsafe { std::slice::from_raw_parts(buf.ptr, buf.len).to_vec() }
    };
    // SAFETY: returning the plugin's own buffer to it.
    unsafe { (l.free)(buf) };
    out
}

fn combine(l: &Loaded, parts: &[Vec<u8>]) -> Vec<u8> {
    if parts.is_empty() {
        fail(exit::BAD_REQUEST, "combine needs at least one partial");
    }
    let bufs: Vec<LodeBuf> = parts
        .iter()
        .map(|p| LodeBuf {
            ptr: p.as_ptr() as *mut u8,
            len: p.len(),
        })
        .collect();
    let mut out = LodeBuf {
        ptr: std::ptr::null_mut(),
        len: 0,
    };
    // SAFETY: ABI call; the plugin only reads the parts.
    let rc = unsafe { (l.combine)(bufs.as_ptr(), bufs.len(), &mut out) };
    check(l, "combine", rc);
    take(l, out)
}

/// Runs one task over the mapped block; returns the bytes fed and the partial result. Each piece is
/// checked against its value before any of it is fed, and whole-record windows are fed straight
/// from the mapping (only the last record, finished by the continuation, is copied).
fn run(l: &Loaded, spec: RunSpec, map: &Mapping) -> (u64, Vec<u8>) {
    let end = spec.end.min(spec.block_len);
    if spec.start > end {
        fail(exit::BAD_REQUEST, "split starts after it ends");
    }
    let mut checked = Checked {
        data: map.bytes(),
        spec: &spec,
        upto: 0,
    };
    let data = map.bytes();
    let lines = l.mode == 1;
    // Line mode: a split that does not start the file skips its first, partial record; the
    // previous split finishes that record.
    let mut pos = spec.start;
    let mut owns_records = true;
    if lines && spec.block_file_offset + spec.start > 0 {
        owns_records = false;
        while pos < end {
            let window_end = (pos + FEED_BYTES as u64).min(end);
            checked.through(window_end);
            match data[pos as usize..window_end as usize]
                .iter()
                .position(|b| *b == b'\n')
            {
                Some(i) => {
                    pos += i as u64 + 1;
                    owns_records = true;
                    break;
                }
                None => pos = window_end,
            }
        }
    }
    let args = with_offset(&spec.args_json, spec.block_file_offset + pos);
    // SAFETY: ABI call with the arguments buffer.
    let state = unsafe { (l.new)(args.as_ptr(), args.len()) };
    if state.is_null() {
        fail(
            exit::PLUGIN_ERROR,
            format!("bad arguments{}", last_error(l)),
        );
    }
    let mut fed = 0u64;
    let mut feed = |data: &[u8]| {
        if data.is_empty() {
            return;
        }
        // SAFETY: ABI call with live state and a valid buffer.
        let rc = unsafe { (l.feed)(state, data.as_ptr(), data.len()) };
        check(l, "feed", rc);
        fed += data.len() as u64;
    };
    if !lines {
        while pos < end {
            let window_end = (pos + FEED_BYTES as u64).min(end);
            checked.through(window_end);
            feed(&data[pos as usize..window_end as usize]);
            pos = window_end;
        }
    } else if owns_records {
        // Feed windows that end at a record boundary; a record longer than a window widens it.
        let mut search_end = (pos + FEED_BYTES as u64).min(end);
        while pos < end {
            checked.through(search_end);
            match data[pos as usize..search_end as usize]
                .iter()
                .rposition(|b| *b == b'\n')
            {
                Some(q) => {
                    let stop = pos + q as u64 + 1;
                    feed(&data[pos as usize..stop as usize]);
                    pos = stop;
                    search_end = (pos + FEED_BYTES as u64).min(end);
                }
                None if search_end == end => break,
                None => search_end = (search_end + FEED_BYTES as u64).min(end),
            }
        }
        // The last record starting in this split ends in the continuation (or at the end of file).
        checked.through(end);
        let mut last = data[pos as usize..end as usize].to_vec();
        last.extend_from_slice(&spec.continuation);
        feed(&last);
    }
    let mut out = LodeBuf {
        ptr: std::ptr::null_mut(),
        len: 0,
    };
    // SAFETY: ABI call; finish frees the state.
    let rc = unsafe { (l.finish)(state, &mut out) };
    check(l, "finish", rc);
    (fed, take(l, out))
}

/// A read-only mapping of the block file.
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn new(file: &std::fs::File, len: u64) -> Result<Mapping, String> {
        let on_disk = file
            .metadata()
            .map_err(|e| format!("block file: {e}"))?
            .len();
        if on_disk < len {
            return Err(format!(
                "block file holds {on_disk} bytes, its sidecar says {len}"
            ));
        }
        if len == 0 {
            return Ok(Mapping {
                ptr: std::ptr::null_mut(),
                len: 0,
            });
        }
        let len = usize::try_from(len).map_err(|_| "block too large to map".to_string())?;
        use std::os::fd::AsRawFd;
        // SAFETY: mapping a regular file we hold open, read-only and private; unmapped on drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!("map block: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: advice on the mapping just made.
        unsafe { libc::madvise(ptr, len, libc::MADV_SEQUENTIAL) };
        Ok(Mapping { ptr, len })
    }

    fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr` maps `len` readable bytes for the life of `self`.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmapping what `new` mapped.
            unsafe { libc::munmap(self.ptr, self.len) };
        }
    }
}

/// Checks pieces against their values, in order, before their bytes are used.
struct Checked<'a> {
    data: &'a [u8],
    spec: &'a RunSpec,
    /// Bytes from the start of the block already checked.
    upto: u64,
}

impl Checked<'_> {
    /// Checks every piece that overlaps `[.., end)`.
    fn through(&mut self, end: u64) {
        while self.upto < end {
            let idx = self.upto / PIECE;
            let off = idx * PIECE;
            let stop = (off + PIECE).min(self.spec.block_len);
            let piece = &self.data[off as usize..stop as usize];
            let mut h = blake3::Hasher::new();
            blake3::hazmat::HasherExt::set_input_offset(&mut h, self.spec.block_file_offset + off);
            h.update(piece);
            if Some(blake3::hazmat::HasherExt::finalize_non_root(&h))
                != self.spec.pieces.get(idx as usize).copied()
            {
                fail(
                    exit::CORRUPT,
                    format!("block data at offset {off} failed its checksum"),
                );
            }
            self.upto = stop;
        }
    }
}

/// Adds `"_offset"` to the arguments object.
fn with_offset(args: &[u8], offset: u64) -> Vec<u8> {
    let text = String::from_utf8_lossy(args);
    let trimmed = text.trim_end();
    let body = trimmed.strip_suffix('}').unwrap_or(trimmed).trim_end();
    let sep = if body.trim_start() == "{" { "" } else { "," };
    format!("{body}{sep}\"_offset\":\"{offset}\"}}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_is_added_to_arguments() {
        assert_eq!(with_offset(b"{}", 5), br#"{"_offset":"5"}"#.to_vec());
        assert_eq!(
            with_offset(br#"{"a":"b"} "#, 7),
            br#"{"a":"b","_offset":"7"}"#.to_vec()
        );
    }
}
