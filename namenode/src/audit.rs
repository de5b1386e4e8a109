//! The audit log: one JSON object per line for every namespace operation a client asks for, with
//! `time` (RFC 3339, UTC), `user` (the certificate's name), `op`, `path`, `dst` (null when there is
//! none), `allowed` (false when the request was refused for want of permission) and `addr` (the
//! client's address). Lines go to a writer task through a bounded queue (a full queue makes
//! requests wait rather than lose a line), which appends them, flushes after each batch, and rotates
//! the file once it passes its size: `audit.log` becomes `audit.log.1`, older ones move up, and the
//! oldest beyond the number kept is removed.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;
use tokio::sync::mpsc;

/// Lines waiting for the writer at most.
const QUEUE: usize = 4096;

/// One audited operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// When it was asked, RFC 3339 in UTC.
    pub time: String,
    /// Who asked (the certificate's name).
    pub user: String,
    /// The operation (`mkdir`, `ls`, `rm`, `mv`, ...).
    pub op: &'static str,
    /// The path it named.
    pub path: Option<String>,
    /// The second path, for a rename.
    pub dst: Option<String>,
    /// Whether it was allowed (false only when refused for want of permission).
    pub allowed: bool,
    /// The client's address.
    pub addr: String,
}

impl Entry {
    /// An entry stamped now.
    pub fn now(
        user: &str,
        op: &'static str,
        path: Option<String>,
        dst: Option<String>,
        allowed: bool,
        addr: SocketAddr,
    ) -> Entry {
        let time = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        Entry {
            time,
            user: user.to_string(),
            op,
            path,
            dst,
            allowed,
            addr: addr.to_string(),
        }
    }
}

/// Where audited operations are sent.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Entry>,
}

impl AuditLog {
    /// Opens (appends to) `path` and starts its writer task.
    pub fn open(path: PathBuf, max_bytes: u64, keep: u32) -> std::io::Result<AuditLog> {
        let file = Rotating::open(path, max_bytes, keep)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::task::spawn_blocking(move || write_all(file, rx));
        Ok(AuditLog { tx })
    }

    /// Records one operation (waits while the queue is full).
    pub async fn record(&self, entry: Entry) {
        let _ = self.tx.send(entry).await;
    }
}

fn write_all(mut file: Rotating, mut rx: mpsc::Receiver<Entry>) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        if let Err(e) = file.append(&batch) {
            tracing::error!(path = %file.path.display(), "audit log: {e}");
        }
    }
}

/// An append-only file rotated by size.
struct Rotating {
    path: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
    len: u64,
    max_bytes: u64,
    keep: u32,
}

impl Rotating {
    fn open(path: PathBuf, max_bytes: u64, keep: u32) -> std::io::Result<Rotating> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        let len = file.metadata()?.len();
        Ok(Rotating {
            path,
            out: std::io::BufWriter::new(file),
            len,
            max_bytes,
            keep,
        })
    }

    fn append(&mut self, entries: &[Entry]) -> std::io::Result<()> {
        for e in entries {
            let mut line = serde_json::to_vec(e).map_err(std::io::Error::other)?;
            line.push(b'\n');
            self.out.write_all(&line)?;
            self.len += line.len() as u64;
            if self.len >= self.max_bytes {
                self.rotate()?;
            }
        }
        self.out.flush()
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.out.flush()?;
        let numbered = |n: u32| rotated_name(&self.path, n);
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            let _ = std::fs::remove_file(numbered(self.keep));
            for n in (1..self.keep).rev() {
                let from = numbered(n);
                if from.exists() {
                    std::fs::rename(&from, numbered(n + 1))?;
                }
            }
            std::fs::rename(&self.path, numbered(1))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.out = std::io::BufWriter::new(file);
        self.len = 0;
        Ok(())
    }
}

fn rotated_name(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: usize) -> Entry {
        Entry::now(
            "alice",
            "mkdir",
            Some(format!("/d{i}")),
            None,
            true,
            "127.0.0.1:9".parse().unwrap(),
        )
    }

    #[test]
    fn lines_are_json_and_the_file_rotates_keeping_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/audit.log");
        let mut log = Rotating::open(path.clone(), 2000, 2).unwrap();
        let entries: Vec<Entry> = (0..100).map(entry).collect();
        log.append(&entries).unwrap();
        let current = std::fs::read_to_string(&path).unwrap();
        let one = std::fs::read_to_string(rotated_name(&path, 1)).unwrap();
        assert!(rotated_name(&path, 2).exists());
        assert!(
            !rotated_name(&path, 3).exists(),
            "only two old logs are kept"
        );
        assert!(one.len() as u64 >= 2000 - 200 && one.len() < 2200);
        // The last entry is the current file's last line, and the one before the rotation the
        // last line of audit.log.1.
        let last: serde_json::Value =
            serde_json::from_str(current.lines().last().unwrap()).unwrap();
        assert_eq!(last["path"], "/d99");
        assert_eq!(last["user"], "alice");
        assert_eq!(last["dst"], serde_json::Value::Null);
        assert_eq!(last["allowed"], true);
        assert_eq!(last["addr"], "127.0.0.1:9");
        let first_current: serde_json::Value =
            serde_json::from_str(current.lines().next().unwrap_or("{}")).unwrap_or_default();
        let last_one: serde_json::Value =
            serde_json::from_str(one.lines().last().unwrap()).unwrap();
        let index = |v: &serde_json::Value| {
            v["path"]
                .as_str()
                .and_then(|p| p[2..].parse::<usize>().ok())
        };
        if let (Some(a), Some(b)) = (index(&last_one), index(&first_current)) {
            assert_eq!(a + 1, b, "no line lost at the rotation");
        }
        assert!(time::OffsetDateTime::parse(
            last["time"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339
        )
        .is_ok());
    }
}
