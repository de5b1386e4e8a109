//! The child side: read the request from fd 3, apply the sandbox, load the plugin (its initializers
//! run inside the sandbox), forbid opening files, do the work, print the result on stdout. Every
//! failure is one line on stderr and an exit code from [`crate::wire::exit`].

use std::ffi::{c_char, c_void, CStr};
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
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
    let plugin = Path::new(&args[1]);
    // SAFETY: fd 3 is the control pipe set up by the parent; we take ownership of it once.
    let mut control = unsafe { std::fs::File::from_raw_fd(3) };
    let mut raw = Vec::new();
    if let Err(e) = control.read_to_end(&mut raw) {
        fail(exit::BAD_REQUEST, format!("read control pipe: {e}"));
    }
    drop(control);
    let (req, limits) = wire::decode(&raw).unwrap_or_else(|e| fail(exit::BAD_REQUEST, e));
    let protections =
        crate::sandbox::enter(plugin, limits).unwrap_or_else(|e| fail(exit::SANDBOX, e));
    if req == Request::Probe {
        print_out(protections.join(",").as_bytes());
    }
    let loaded = load(plugin);
    // Loaded: nothing more to open, ever.
    crate::sandbox::forbid_opening_files().unwrap_or_else(|e| fail(exit::SANDBOX, e));
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
            let (fed, partial) = run(&loaded, spec);
            let mut out = fed.to_le_bytes().to_vec();
            out.extend(partial);
            print_out(&out)
        }
        Request::Probe => unreachable!("answered before loading"),
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

/// Runs one task over the block on fd 0; returns the bytes fed and the partial result.
fn run(l: &Loaded, spec: RunSpec) -> (u64, Vec<u8>) {
    // SAFETY: fd 0 is the block file the parent opened for us.
    let block = unsafe { std::fs::File::from_raw_fd(0) };
    let end = spec.end.min(spec.block_len);
    if spec.start > end {
        fail(exit::BAD_REQUEST, "split starts after it ends");
    }
    let mut reader = PieceReader {
        file: &block,
        spec: &spec,
        buf: Vec::new(),
        piece: u64::MAX,
    };
    let lines = l.mode == 1;
    let file_start = spec.block_file_offset + spec.start;
    // Line mode: a split that does not start the file skips its first, partial record; the
    // previous split finishes that record.
    let mut pos = spec.start;
    let mut owns_records = true;
    if lines && file_start > 0 {
        owns_records = false;
        while pos < end {
            let chunk = reader.slice(pos, end);
            match chunk.iter().position(|b| *b == b'\n') {
                Some(i) => {
                    pos += i as u64 + 1;
                    owns_records = true;
                    break;
                }
                None => pos += chunk.len() as u64,
            }
        }
    }
    let first_offset = spec.block_file_offset + pos;
    let args = with_offset(&spec.args_json, first_offset);
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
            let chunk = reader.slice(pos, end).to_vec();
            pos += chunk.len() as u64;
            feed(&chunk);
        }
    } else if owns_records {
        let mut pending: Vec<u8> = Vec::with_capacity(FEED_BYTES + PIECE as usize);
        while pos < end {
            let chunk = reader.slice(pos, end);
            pending.extend_from_slice(chunk);
            pos += chunk.len() as u64;
            if pending.len() >= FEED_BYTES {
                if let Some(last_nl) = pending.iter().rposition(|b| *b == b'\n') {
                    feed(&pending[..=last_nl]);
                    pending.drain(..=last_nl);
                }
            }
        }
        // The last record starting in this split ends in the continuation (or at the end of file).
        pending.extend_from_slice(&spec.continuation);
        feed(&pending);
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

/// Adds `"_offset"` to the arguments object.
fn with_offset(args: &[u8], offset: u64) -> Vec<u8> {
    let text = String::from_utf8_lossy(args);
    let trimmed = text.trim_end();
    let body = trimmed.strip_suffix('}').unwrap_or(trimmed).trim_end();
    let sep = if body.trim_start() == "{" { "" } else { "," };
    format!("{body}{sep}\"_offset\":\"{offset}\"}}").into_bytes()
}

/// Reads whole pieces of the block, checks each against its value, and hands out slices.
struct PieceReader<'a> {
    file: &'a std::fs::File,
    spec: &'a RunSpec,
    buf: Vec<u8>,
    piece: u64,
}

impl PieceReader<'_> {
    /// Bytes from `pos` to the end of its piece (or `end`), verified.
    fn slice(&mut self, pos: u64, end: u64) -> &[u8] {
        let idx = pos / PIECE;
        if idx != self.piece {
            let off = idx * PIECE;
            let len = (self.spec.block_len - off).min(PIECE) as usize;
            self.buf.resize(len, 0);
            if let Err(e) = self.file.read_exact_at(&mut self.buf, off) {
                fail(exit::CORRUPT, format!("read block at {off}: {e}"));
            }
            let want = self.spec.pieces.get(idx as usize).copied();
            let mut h = blake3::Hasher::new();
            blake3::hazmat::HasherExt::set_input_offset(&mut h, self.spec.block_file_offset + off);
            h.update(&self.buf);
            if Some(blake3::hazmat::HasherExt::finalize_non_root(&h)) != want {
                fail(
                    exit::CORRUPT,
                    format!("block data at offset {off} failed its checksum"),
                );
            }
            self.piece = idx;
        }
        let from = (pos - idx * PIECE) as usize;
        let to = ((end.min((idx + 1) * PIECE)) - idx * PIECE) as usize;
        &self.buf[from..to.max(from)]
    }
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
