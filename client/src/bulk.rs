//! Many files in one process: `put_many` and `get_many` keep up to N files in flight over the
//! client's one set of connections, report the bytes of all of them to one progress callback, and
//! give each file's own outcome, so that one file's failure stops none of the others.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use futures::stream::{self, StreamExt};

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

impl Total<'_> {
    fn add(&self, delta: u64) {
        let now = self.bytes.fetch_add(delta, Ordering::Relaxed) + delta;
        (self.report)(now);
    }
}

/// A callback for one file that passes its progress on to the total as deltas.
fn per_file<'a>(total: &'a Total<'a>) -> impl Fn(u64) + Sync + 'a {
    let seen = AtomicU64::new(0);
    move |n| {
        let before = seen.swap(n, Ordering::Relaxed);
        total.add(n.saturating_sub(before));
    }
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
        let total = &total;
        stream::iter(items)
            .map(|t| async move {
                let result = async {
                    let file = tokio::fs::File::open(&t.local)
                        .await
                        .map_err(|e| Error::local(&t.local, e))?;
                    self.put(file, &t.remote, opts, &per_file(total)).await
                }
                .await;
                Outcome {
                    transfer: t,
                    result,
                }
            })
            .buffer_unordered(in_flight.max(1))
            .collect()
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
        let total = &total;
        stream::iter(items)
            .map(|t| async move {
                let result = async {
                    if !overwrite && t.local.exists() {
                        return Err(Error::Invalid(format!(
                            "{}: exists (use -f to overwrite)",
                            t.local.display()
                        )));
                    }
                    let tmp = temp_beside(&t.local);
                    let mut file = tokio::fs::File::create(&tmp)
                        .await
                        .map_err(|e| Error::local(&tmp, e))?;
                    let got = self.get(&t.remote, &mut file, &per_file(total)).await;
                    drop(file);
                    match got {
                        Ok(n) => {
                            std::fs::rename(&tmp, &t.local)
                                .map_err(|e| Error::local(&t.local, e))?;
                            Ok(n)
                        }
                        Err(e) => {
                            let _ = std::fs::remove_file(&tmp);
                            Err(e)
                        }
                    }
                }
                .await;
                Outcome {
                    transfer: t,
                    result,
                }
            })
            .buffer_unordered(in_flight.max(1))
            .collect()
            .await
    }
}
