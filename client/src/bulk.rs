//! Many files in one process: `put_many` and `get_many` keep up to N files in flight over the
//! client's one set of connections, report the bytes of all of them to one progress callback, and
//! give each file's own outcome, so that one file's failure stops none of the others.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use futures::stream::{self, StreamExt};
use lode_protocol::messages::EntryKind;

use crate::error::Error;
use crate::fs::Client;
use crate::put::PutOptions;

/// One file to move: its local path and its path in Lode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transfer {
    /// The local file.
    pub local: PathBuf,
    /// The file in Lode.
    pub remote: String,
}

/// What became of one transfer: the bytes moved, or why not.
#[derive(Debug)]
pub struct Outcome {
    /// Which file.
    pub transfer: Transfer,
    /// Bytes moved, or the error.
    pub result: Result<u64, Error>,
}

/// Adds each file's progress to a total for the whole transfer.
struct Total<'a> {
    bytes: AtomicU64,
    report: &'a (dyn Fn(u64) + Sync),
}

/// One file's progress, passed on to the total as deltas.
struct FileProgress<'a> {
    total: &'a Total<'a>,
    seen: AtomicU64,
}

impl FileProgress<'_> {
    fn report(&self, n: u64) {
        let before = self.seen.swap(n, Ordering::Relaxed);
        let delta = n.saturating_sub(before);
        let now = self.total.bytes.fetch_add(delta, Ordering::Relaxed) + delta;
        (self.total.report)(now);
    }
}

/// Runs `one` on every transfer, `in_flight` at a time, each with its progress counted into
/// `total`; the outcomes come in the order the transfers finish.
async fn each<'a, F, Fut>(
    items: Vec<Transfer>,
    in_flight: usize,
    total: &'a Total<'a>,
    one: F,
) -> Vec<Outcome>
where
    F: Fn(&Transfer, FileProgress<'a>) -> Fut,
    Fut: std::future::Future<Output = Result<u64, Error>>,
{
    stream::iter(items)
        .map(|transfer| {
            let progress = FileProgress {
                total,
                seen: AtomicU64::new(0),
            };
            let work = one(&transfer, progress);
            async move {
                Outcome {
                    result: work.await,
                    transfer,
                }
            }
        })
        .buffer_unordered(in_flight.max(1))
        .collect()
        .await
}

/// Local files up to this size are read (put) or written (get) whole by one blocking call (a file
/// read or written through `tokio::fs` costs a hand-off to a blocking thread per call).
const READ_WHOLE_BYTES: u64 = 1 << 20;

/// A local file to put: its bytes, if it is small, or what was read of it and the open file.
enum Local {
    Read(Vec<u8>),
    Open(Vec<u8>, tokio::fs::File),
}

async fn open_local(path: PathBuf) -> Result<Local, Error> {
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut file = std::fs::File::open(&path).map_err(|e| Error::local(&path, e))?;
        let len = file.metadata().map_err(|e| Error::local(&path, e))?.len();
        if len > READ_WHOLE_BYTES {
            return Ok(Local::Open(vec![], tokio::fs::File::from_std(file)));
        }
        // Read to the end, not `len` bytes: the file may be growing or be something else.
        let mut bytes = Vec::with_capacity(len as usize + 1);
        (&mut file)
            .take(READ_WHOLE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| Error::local(&path, e))?;
        if bytes.len() as u64 > READ_WHOLE_BYTES {
            // It grew past the bound meanwhile: the rest comes from the file itself.
            return Ok(Local::Open(bytes, tokio::fs::File::from_std(file)));
        }
        Ok(Local::Read(bytes))
    })
    .await
    .map_err(|e| Error::Invalid(format!("reading a local file failed: {e}")))?
}

/// A temporary file written with outcome `got`: renamed onto `dest` if it succeeded, else (or if
/// the rename fails) removed.
fn settle(tmp: &Path, dest: &Path, got: Result<u64, Error>) -> Result<u64, Error> {
    let settled = got.and_then(|n| {
        std::fs::rename(tmp, dest)
            .map(|()| n)
            .map_err(|e| Error::local(dest, e))
    });
    if settled.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    settled
}

/// A name beside `dest` for a file being written, renamed onto `dest` when complete.
pub fn temp_beside(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.lode-{:08x}.part", rand::random::<u32>()))
}

impl Client {
    /// Writes every local file to its remote path, `in_flight` at a time; `progress` is told the
    /// bytes written so far over all of them.
    pub async fn put_many(
        &self,
        items: Vec<Transfer>,
        opts: &PutOptions,
        in_flight: usize,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Vec<Outcome> {
        let total = Total {
            bytes: AtomicU64::new(0),
            report: progress,
        };
        each(items, in_flight, &total, |t, p| {
            let (local, remote) = (t.local.clone(), t.remote.clone());
            async move {
                let p = &|n| p.report(n);
                match open_local(local.clone()).await? {
                    Local::Read(bytes) => {
                        self.put(std::io::Cursor::new(bytes), &remote, opts, p)
                            .await
                    }
                    Local::Open(head, file) => {
                        use tokio::io::AsyncReadExt;
                        let input = std::io::Cursor::new(head).chain(file);
                        self.put(input, &remote, opts, p).await
                    }
                }
            }
        })
        .await
    }

    /// Reads every remote file into its local path (through a temporary name, renamed when
    /// complete), `in_flight` at a time; an existing local file is replaced only with `overwrite`.
    pub async fn get_many(
        &self,
        items: Vec<Transfer>,
        overwrite: bool,
        in_flight: usize,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Vec<Outcome> {
        let total = Total {
            bytes: AtomicU64::new(0),
            report: progress,
        };
        each(items, in_flight, &total, |t, p| {
            let (local, remote) = (t.local.clone(), t.remote.clone());
            async move {
                if !overwrite && local.exists() {
                    return Err(Error::Invalid(format!(
                        "{}: exists (use -f to overwrite)",
                        local.display()
                    )));
                }
                let st = self.stat(&remote, true).await?;
                let tmp = temp_beside(&local);
                if st.kind == EntryKind::File && st.size <= READ_WHOLE_BYTES {
                    // A small file comes into memory and goes out with one blocking call.
                    let mut bytes = Vec::with_capacity(st.size as usize);
                    let n = self.get_status(&st, &mut bytes, &|n| p.report(n)).await?;
                    return tokio::task::spawn_blocking(move || {
                        let written = std::fs::write(&tmp, &bytes)
                            .map(|()| n)
                            .map_err(|e| Error::local(&tmp, e));
                        settle(&tmp, &local, written)
                    })
                    .await
                    .map_err(|e| Error::Invalid(format!("writing a local file failed: {e}")))?;
                }
                let mut file = tokio::fs::File::create(&tmp)
                    .await
                    .map_err(|e| Error::local(&tmp, e))?;
                let got = self.get_status(&st, &mut file, &|n| p.report(n)).await;
                drop(file);
                settle(&tmp, &local, got)
            }
        })
        .await
    }
}

/// Whether a path holds glob characters (`*`, `?`, `[`).
pub fn is_glob(path: &str) -> bool {
    path.contains(['*', '?', '['])
}

/// Matches one name against a glob: `*` (any run), `?` (one character), `[abc]`, `[a-z]`, and
/// `[!a]` or `[^a]` (none of them). A `[` without its `]` matches itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Iterative matching with one backtrack point for the last `*`.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        let step = match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
                continue;
            }
            Some('?') => Some(1),
            Some('[') => match class(&p[pi..], n[ni]) {
                Some((true, len)) => Some(len),
                Some((false, _)) => None,
                None => (n[ni] == '[').then_some(1),
            },
            Some(c) => (*c == n[ni]).then_some(1),
            None => None,
        };
        match (step, star) {
            (Some(len), _) => {
                pi += len;
                ni += 1;
            }
            (None, Some((sp, sn))) => {
                pi = sp + 1;
                ni = sn + 1;
                star = Some((sp, sn + 1));
            }
            (None, None) => return false,
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// A `[...]` class at the start of `p`: whether `c` is in it and the class's length; `None` if it
/// has no closing `]`.
fn class(p: &[char], c: char) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(p.get(1), Some('!' | '^'));
    if negate {
        i += 1;
    }
    let mut hit = false;
    let mut first = true;
    while let Some(&x) = p.get(i) {
        if x == ']' && !first {
            return Some((hit != negate, i + 1));
        }
        first = false;
        if p.get(i + 1) == Some(&'-') && p.get(i + 2).is_some_and(|e| *e != ']') {
            if (x..=p[i + 2]).contains(&c) {
                hit = true;
            }
            i += 3;
        } else {
            if x == c {
                hit = true;
            }
            i += 1;
        }
    }
    None
}

impl Client {
    /// The paths a remote glob names (`/logs/2026-*`), in order; a path without glob characters
    /// as it is. No match is a not-found error naming the pattern.
    pub async fn expand(&self, pattern: &str) -> Result<Vec<String>, Error> {
        if !is_glob(pattern) {
            return Ok(vec![pattern.to_string()]);
        }
        let norm = lode_protocol::path::normalize(pattern).map_err(Error::Invalid)?;
        let names: Vec<&str> = lode_protocol::path::components(&norm).collect();
        let mut at = vec!["/".to_string()];
        for (i, name) in names.iter().enumerate() {
            let last = i + 1 == names.len();
            let mut next = vec![];
            for dir in &at {
                if !is_glob(name) {
                    next.push(lode_protocol::path::join(dir, name));
                    continue;
                }
                let entries = match self.list(dir).await {
                    Ok(e) => e,
                    Err(e) if e.code() == Some(lode_protocol::ErrorCode::NotFound) => continue,
                    Err(e) => return Err(e),
                };
                for e in entries {
                    let base = e.path.rsplit('/').next().unwrap_or_default().to_string();
                    let is_dir = e.kind == lode_protocol::messages::EntryKind::Directory;
                    if glob_match(name, &base) && (last || is_dir) {
                        next.push(e.path);
                    }
                }
            }
            at = next;
        }
        at.sort();
        if at.is_empty() {
            return Err(Error::Remote(lode_protocol::WireError::new(
                lode_protocol::ErrorCode::NotFound,
                format!("{pattern}: no match"),
            )));
        }
        Ok(at)
    }
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs_match_as_a_shell_does() {
        for (p, n, want) in [
            ("2026-*", "2026-01-02.log", true),
            ("2026-*", "2025-01", false),
            ("*.log", "a.log", true),
            ("*.log", "a.log.gz", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("[ab]x", "bx", true),
            ("[a-c]x", "cx", true),
            ("[!a-c]x", "cx", false),
            ("[^a]x", "bx", true),
            ("*a*b*", "xxaxxbxx", true),
            ("*a*b*", "xxbxxaxx", false),
            ("[x", "[x", true),
            ("*", "", true),
            ("", "", true),
        ] {
            assert_eq!(glob_match(p, n), want, "{p} vs {n}");
        }
    }
}
