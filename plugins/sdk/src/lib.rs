//! Write a Lode plugin in Rust in a few lines: implement [`Plugin`] and call [`export_plugin!`].
//!
//! ```ignore
//! use lode_plugin_sdk::{export_plugin, Args, InputMode, Plugin};
//!
//! struct Bytes(u64);
//! impl Plugin for Bytes {
//!     const INPUT_MODE: InputMode = InputMode::Bytes;
//!     fn new(_args: &Args) -> Result<Self, String> { Ok(Bytes(0)) }
//!     fn feed(&mut self, data: &[u8]) -> Result<(), String> { self.0 += data.len() as u64; Ok(()) }
//!     fn finish(self) -> Result<Vec<u8>, String> { Ok(self.0.to_le_bytes().to_vec()) }
//!     fn combine(parts: &[&[u8]]) -> Result<Vec<u8>, String> {
//!         let mut n = 0u64;
//!         for p in parts { n += u64::from_le_bytes((*p).try_into().map_err(|_| "bad partial")?); }
//!         Ok(n.to_le_bytes().to_vec())
//!     }
//! }
//! export_plugin!(Bytes, "bytes");
//! ```
//!
//! Build it as a `cdylib`. The C ABI it exports is documented in `include/lode_plugin.h`; this crate
//! has no dependencies so plugins stay small and their builds fast.

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// The ABI version this SDK implements.
pub const ABI_VERSION: u32 = 1;

/// How the host feeds input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum InputMode {
    /// Raw bytes of the split, in chunks of any size.
    Bytes = 0,
    /// Whole `\n`-terminated records, each delivered to exactly one task.
    Lines = 1,
}

/// A buffer handed to the host; owned by the plugin until `lode_plugin_free`.
#[repr(C)]
#[derive(Debug)]
pub struct LodeBuf {
    /// Start of the bytes.
    pub ptr: *mut u8,
    /// Number of bytes.
    pub len: usize,
}

/// A plugin: per-task state fed with input, producing a partial result that partials combine into.
pub trait Plugin: Sized + 'static {
    /// How input arrives.
    const INPUT_MODE: InputMode;
    /// New state from the task's arguments.
    fn new(args: &Args) -> Result<Self, String>;
    /// Consume input.
    fn feed(&mut self, data: &[u8]) -> Result<(), String>;
    /// The task's partial result.
    fn finish(self) -> Result<Vec<u8>, String>;
    /// Merge partial results into one; must be associative.
    fn combine(parts: &[&[u8]]) -> Result<Vec<u8>, String>;
    /// The final partial as text for humans (`None`: print the partial as it is).
    fn render(_partial: &[u8]) -> Option<Result<Vec<u8>, String>> {
        None
    }
}

/// The task's arguments: a flat JSON object whose values are strings (numbers and booleans are kept
/// as their JSON text).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Args {
    pairs: Vec<(String, String)>,
}

impl Args {
    /// Parses the JSON object the host passes.
    pub fn parse(json: &[u8]) -> Result<Args, String> {
        let text = std::str::from_utf8(json).map_err(|_| "arguments are not UTF-8".to_string())?;
        let mut p = JsonCursor {
            s: text.as_bytes(),
            i: 0,
        };
        let pairs = p.object()?;
        p.ws();
        if p.i != p.s.len() {
            return Err("trailing bytes after the arguments object".into());
        }
        Ok(Args { pairs })
    }

    /// A value, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A value that must be present.
    pub fn require(&self, key: &str) -> Result<&str, String> {
        self.get(key)
            .ok_or_else(|| format!("missing argument {key:?} (pass --arg {key}=...)"))
    }

    /// A value parsed as a number (or other `FromStr`), with a default when absent.
    pub fn parse_or<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T, String> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("argument {key}={v:?} is not valid")),
        }
    }

    /// All pairs in order.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.pairs
    }
}

struct JsonCursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl JsonCursor<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn expect(&mut self, c: u8) -> Result<(), String> {
        self.ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            Ok(())
        } else {
            Err(format!(
                "arguments: expected '{}' at byte {}",
                c as char, self.i
            ))
        }
    }

    fn object(&mut self) -> Result<Vec<(String, String)>, String> {
        self.expect(b'{')?;
        let mut out = vec![];
        self.ws();
        if self.s.get(self.i) == Some(&b'}') {
            self.i += 1;
            return Ok(out);
        }
        loop {
            self.ws();
            let k = self.string()?;
            self.expect(b':')?;
            self.ws();
            let v = match self.s.get(self.i) {
                Some(b'"') => self.string()?,
                Some(_) => self.scalar()?,
                None => return Err("arguments: unexpected end".into()),
            };
            out.push((k, v));
            self.ws();
            match self.s.get(self.i) {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(out);
                }
                _ => {
                    return Err(format!(
                        "arguments: expected ',' or '}}' at byte {}",
                        self.i
                    ))
                }
            }
        }
    }

    fn scalar(&mut self) -> Result<String, String> {
        let start = self.i;
        while self.i < self.s.len()
            && (self.s[self.i].is_ascii_alphanumeric() || b"+-.".contains(&self.s[self.i]))
        {
            self.i += 1;
        }
        let v = std::str::from_utf8(&self.s[start..self.i]).map_err(|_| "arguments: bad value")?;
        if v.is_empty() {
            return Err(format!(
                "arguments: values must be strings, numbers or booleans (byte {start})"
            ));
        }
        Ok(v.to_string())
    }

    fn string(&mut self) -> Result<String, String> {
        self.expect(b'"')?;
        let mut out = String::new();
        loop {
            let c = *self.s.get(self.i).ok_or("arguments: unterminated string")?;
            self.i += 1;
            match c {
                b'"' => return Ok(out),
                b'\\' => {
                    let e = *self.s.get(self.i).ok_or("arguments: unterminated escape")?;
                    self.i += 1;
                    match e {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let hex = self
                                .s
                                .get(self.i..self.i + 4)
                                .ok_or("arguments: short \\u escape")?;
                            let code = u32::from_str_radix(
                                std::str::from_utf8(hex).map_err(|_| "bad \\u")?,
                                16,
                            )
                            .map_err(|_| "arguments: bad \\u escape")?;
                            self.i += 4;
                            out.push(char::from_u32(code).unwrap_or('\u{fffd}'));
                        }
                        _ => return Err("arguments: bad escape".into()),
                    }
                }
                _ => {
                    // Copy the whole UTF-8 sequence starting here.
                    let start = self.i - 1;
                    let mut end = self.i;
                    while end < self.s.len() && (self.s[end] & 0xC0) == 0x80 {
                        end += 1;
                    }
                    out.push_str(
                        std::str::from_utf8(&self.s[start..end])
                            .map_err(|_| "arguments: bad UTF-8")?,
                    );
                    self.i = end;
                }
            }
        }
    }
}

thread_local! {
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

fn set_error(msg: String) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = Some(c));
}

/// Moves bytes into a buffer the host will hand back to `lode_plugin_free`.
pub fn into_buf(v: Vec<u8>) -> LodeBuf {
    let boxed = v.into_boxed_slice();
    let len = boxed.len();
    let ptr = Box::into_raw(boxed) as *mut u8;
    LodeBuf { ptr, len }
}

/// Frees a buffer made by [`into_buf`].
///
/// # Safety
/// `buf` must come from [`into_buf`] and not have been freed.
pub unsafe fn free_buf(buf: LodeBuf) {
    if !buf.ptr.is_null() {
        drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
            buf.ptr, buf.len,
        )));
    }
}

unsafe fn slice<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
    if ptr.is_null() || len == 0 {
        &[]
    } else {
        std::slice::from_raw_parts(ptr, len)
    }
}

fn guarded<T>(default: T, f: impl FnOnce() -> Result<T, String>) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            set_error(e);
            default
        }
        Err(_) => {
            set_error("the plugin panicked".into());
            default
        }
    }
}

#[doc(hidden)]
pub mod __export {
    use super::*;

    pub unsafe fn new<P: Plugin>(args: *const u8, len: usize) -> *mut c_void {
        guarded(std::ptr::null_mut(), || {
            let args = Args::parse(slice(args, len))?;
            Ok(Box::into_raw(Box::new(P::new(&args)?)) as *mut c_void)
        })
    }

    pub unsafe fn feed<P: Plugin>(state: *mut c_void, data: *const u8, len: usize) -> i32 {
        if state.is_null() {
            return -1;
        }
        guarded(-1, || {
            let p = &mut *(state as *mut P);
            p.feed(slice(data, len)).map(|_| 0)
        })
    }

    pub unsafe fn finish<P: Plugin>(state: *mut c_void, out: *mut LodeBuf) -> i32 {
        if state.is_null() || out.is_null() {
            return -1;
        }
        guarded(-1, || {
            let p = Box::from_raw(state as *mut P);
            let v = p.finish()?;
            *out = into_buf(v);
            Ok(0)
        })
    }

    pub unsafe fn combine<P: Plugin>(parts: *const LodeBuf, n: usize, out: *mut LodeBuf) -> i32 {
        if parts.is_null() || out.is_null() || n == 0 {
            return -1;
        }
        guarded(-1, || {
            let bufs = std::slice::from_raw_parts(parts, n);
            let slices: Vec<&[u8]> = bufs.iter().map(|b| slice(b.ptr, b.len)).collect();
            *out = into_buf(P::combine(&slices)?);
            Ok(0)
        })
    }

    pub unsafe fn render<P: Plugin>(partial: *const u8, len: usize, out: *mut LodeBuf) -> i32 {
        if out.is_null() {
            return -1;
        }
        guarded(-1, || match P::render(slice(partial, len)) {
            None => {
                *out = into_buf(slice(partial, len).to_vec());
                Ok(0)
            }
            Some(r) => {
                *out = into_buf(r?);
                Ok(0)
            }
        })
    }

    pub unsafe fn free(buf: LodeBuf) {
        free_buf(buf)
    }

    pub fn last_error() -> *const c_char {
        LAST_ERROR.with(|e| e.borrow().as_ref().map_or(std::ptr::null(), |c| c.as_ptr()))
    }
}

/// Exports a [`Plugin`] implementation under the C ABI, with `name` as its plugin name.
#[macro_export]
macro_rules! export_plugin {
    ($ty:ty, $name:literal) => {
        #[no_mangle]
        pub extern "C" fn lode_plugin_abi_version() -> u32 {
            $crate::ABI_VERSION
        }
        #[no_mangle]
        pub extern "C" fn lode_plugin_name() -> *const ::std::ffi::c_char {
            concat!($name, "\0").as_ptr() as *const ::std::ffi::c_char
        }
        #[no_mangle]
        pub extern "C" fn lode_plugin_input_mode() -> u32 {
            <$ty as $crate::Plugin>::INPUT_MODE as u32
        }
        /// # Safety
        /// Called by the Lode host with a valid buffer.
        #[no_mangle]
        pub unsafe extern "C" fn lode_plugin_new(
            args: *const u8,
            len: usize,
        ) -> *mut ::std::ffi::c_void {
            $crate::__export::new::<$ty>(args, len)
        }
        /// # Safety
        /// Called by the Lode host with state from `lode_plugin_new`.
        #[no_mangle]
        pub unsafe extern "C" fn lode_plugin_feed(
            state: *mut ::std::ffi::c_void,
            data: *const u8,
            len: usize,
        ) -> i32 {
            $crate::__export::feed::<$ty>(state, data, len)
        }
        /// # Safety
        /// Called by the Lode host with state from `lode_plugin_new`.
        #[no_mangle]
        pub unsafe extern "C" fn lode_plugin_finish(
            state: *mut ::std::ffi::c_void,
            out: *mut $crate::LodeBuf,
        ) -> i32 {
            $crate::__export::finish::<$ty>(state, out)
        }
        /// # Safety
        /// Called by the Lode host with `n` valid buffers.
        #[no_mangle]
        pub unsafe extern "C" fn lode_plugin_combine(
            parts: *const $crate::LodeBuf,
            n: usize,
            out: *mut $crate::LodeBuf,
        ) -> i32 {
            $crate::__export::combine::<$ty>(parts, n, out)
        }
        /// # Safety
        /// Called by the Lode host with a valid buffer.
        #[no_mangle]
        pub unsafe extern "C" fn lode_plugin_render(
            partial: *const u8,
            len: usize,
            out: *mut $crate::LodeBuf,
        ) -> i32 {
            $crate::__export::render::<$ty>(partial, len, out)
        }
        /// # Safety
        /// Called by the Lode host with a buffer this plugin made.
        #[no_mangle]
        pub unsafe extern "C" fn lode_plugin_free(buf: $crate::LodeBuf) {
            $crate::__export::free(buf)
        }
        #[no_mangle]
        pub extern "C" fn lode_plugin_last_error() -> *const ::std::ffi::c_char {
            $crate::__export::last_error()
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_parse() {
        let a = Args::parse(br#"{"pattern": "a\"b\\n\u00e9", "n": 10, "x": true, "_path": "/f"}"#)
            .unwrap();
        assert_eq!(a.get("pattern"), Some("a\"b\\n\u{e9}"));
        assert_eq!(a.parse_or::<u32>("n", 1).unwrap(), 10);
        assert_eq!(a.get("x"), Some("true"));
        assert_eq!(a.parse_or::<u32>("missing", 7).unwrap(), 7);
        assert!(a.require("nope").is_err());
        assert_eq!(Args::parse(b"{}").unwrap(), Args::default());
        assert_eq!(
            Args::parse("{\"k\":\"ünï\"}".as_bytes()).unwrap().get("k"),
            Some("ünï")
        );
        for bad in [
            &b""[..],
            b"[]",
            b"{\"a\":}",
            b"{\"a\":\"b\"",
            b"{\"a\":\"b\"} x",
            b"{\"a\" \"b\"}",
        ] {
            assert!(
                Args::parse(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn buffers_round_trip() {
        let b = into_buf(vec![1, 2, 3]);
        assert_eq!(unsafe { slice(b.ptr, b.len) }, &[1, 2, 3]);
        unsafe { free_buf(b) };
    }
}
