//! The private pipe format between the host library (parent) and the `lode-plugin-host` child.
//! The parent is trusted; lengths are still bounded before anything is allocated.

/// Magic at the start of every request.
pub const MAGIC: &[u8; 4] = b"LPH2";
/// Largest length field accepted from the control pipe.
pub const FIELD_BYTES_MAX: u64 = 1 << 30;

/// What the child is asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Feed a range of the block on fd 0 to a new task and print its partial result.
    Run(RunSpec),
    /// Combine partial results.
    Combine(Vec<Vec<u8>>),
    /// Render a partial result.
    Render(Vec<u8>),
    /// Load the plugin and report its name, ABI version and input mode.
    Inspect,
    /// Apply the sandbox and report which protections are active.
    Probe,
}

/// A task over one split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunSpec {
    /// Arguments JSON (an object).
    pub args_json: Vec<u8>,
    /// Offset of the block in its file.
    pub block_file_offset: u64,
    /// Length of the block.
    pub block_len: u64,
    /// The split: `[start, end)` within the block.
    pub start: u64,
    /// End of the split within the block.
    pub end: u64,
    /// Values of every piece of the block (from its sidecar): each piece read is checked.
    pub pieces: Vec<[u8; 32]>,
    /// Line mode: the bytes after the block up to and including the first `\n` (or to the end of
    /// the file), already verified by the caller.
    pub continuation: Vec<u8>,
}

/// Resource limits the child applies to itself before loading the plugin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChildLimits {
    /// Address-space limit in bytes.
    pub memory_bytes: u64,
    /// CPU-time limit in seconds.
    pub cpu_secs: u64,
    /// The uid and gid the child takes before loading (the parent runs as root).
    pub run_as: Option<(u32, u32)>,
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend((b.len() as u64).to_le_bytes());
    out.extend(b);
}

/// Encodes a request with its limits.
pub fn encode(req: &Request, limits: ChildLimits) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend(limits.memory_bytes.to_le_bytes());
    out.extend(limits.cpu_secs.to_le_bytes());
    match limits.run_as {
        None => out.push(0),
        Some((uid, gid)) => {
            out.push(1);
            out.extend(uid.to_le_bytes());
            out.extend(gid.to_le_bytes());
        }
    }
    match req {
        Request::Run(r) => {
            out.push(1);
            put_bytes(&mut out, &r.args_json);
            for v in [r.block_file_offset, r.block_len, r.start, r.end] {
                out.extend(v.to_le_bytes());
            }
            out.extend((r.pieces.len() as u64).to_le_bytes());
            for p in &r.pieces {
                out.extend(p);
            }
            put_bytes(&mut out, &r.continuation);
        }
        Request::Combine(parts) => {
            out.push(2);
            out.extend((parts.len() as u64).to_le_bytes());
            for p in parts {
                put_bytes(&mut out, p);
            }
        }
        Request::Render(p) => {
            out.push(3);
            put_bytes(&mut out, p);
        }
        Request::Inspect => out.push(4),
        Request::Probe => out.push(5),
    }
    out
}

struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: u64) -> Result<&[u8], String> {
        if n > FIELD_BYTES_MAX {
            return Err(format!("control field of {n} bytes is too large"));
        }
        let end = self.i.checked_add(n as usize).ok_or("control overflow")?;
        let s = self.b.get(self.i..end).ok_or("truncated control message")?;
        self.i = end;
        Ok(s)
    }
    fn u64(&mut self) -> Result<u64, String> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn u32(&mut self) -> Result<u32, String> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, String> {
        let n = self.u64()?;
        Ok(self.take(n)?.to_vec())
    }
}

/// Decodes a request.
pub fn decode(b: &[u8]) -> Result<(Request, ChildLimits), String> {
    let mut c = Cursor { b, i: 0 };
    if c.take(4)? != MAGIC {
        return Err("bad control magic".into());
    }
    let (memory_bytes, cpu_secs) = (c.u64()?, c.u64()?);
    let run_as = match c.take(1)?[0] {
        0 => None,
        1 => Some((c.u32()?, c.u32()?)),
        f => return Err(format!("bad identity flag {f}")),
    };
    let limits = ChildLimits {
        memory_bytes,
        cpu_secs,
        run_as,
    };
    let kind = c.take(1)?[0];
    let req = match kind {
        1 => {
            let args_json = c.bytes()?;
            let (block_file_offset, block_len, start, end) =
                (c.u64()?, c.u64()?, c.u64()?, c.u64()?);
            let n = c.u64()?;
            let raw = c.take(n.checked_mul(32).ok_or("piece count overflow")?)?;
            let pieces = raw
                .chunks_exact(32)
                .map(|p| p.try_into().unwrap_or([0; 32]))
                .collect();
            let continuation = c.bytes()?;
            Request::Run(RunSpec {
                args_json,
                block_file_offset,
                block_len,
                start,
                end,
                pieces,
                continuation,
            })
        }
        2 => {
            let n = c.u64()?;
            let mut parts = Vec::new();
            for _ in 0..n {
                parts.push(c.bytes()?);
            }
            Request::Combine(parts)
        }
        3 => Request::Render(c.bytes()?),
        4 => Request::Inspect,
        5 => Request::Probe,
        k => return Err(format!("unknown request kind {k}")),
    };
    if c.i != b.len() {
        return Err("trailing bytes in control message".into());
    }
    Ok((req, limits))
}

/// Exit codes of the child, read by the parent.
pub mod exit {
    /// A plugin call returned an error.
    pub const PLUGIN_ERROR: i32 = 10;
    /// The file is not a loadable shared library.
    pub const NOT_A_PLUGIN: i32 = 11;
    /// A required export is missing.
    pub const MISSING_EXPORT: i32 = 12;
    /// The plugin speaks another ABI version.
    pub const ABI_MISMATCH: i32 = 13;
    /// The block failed its checksum.
    pub const CORRUPT: i32 = 14;
    /// The control message was malformed.
    pub const BAD_REQUEST: i32 = 15;
    /// The sandbox could not be set up.
    pub const SANDBOX: i32 = 16;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let limits = ChildLimits {
            memory_bytes: 1 << 30,
            cpu_secs: 9,
            run_as: Some((65534, 65533)),
        };
        let run = Request::Run(RunSpec {
            args_json: b"{}".to_vec(),
            block_file_offset: 65536,
            block_len: 100,
            start: 1,
            end: 99,
            pieces: vec![[7; 32]],
            continuation: b"x\n".to_vec(),
        });
        for r in [
            run,
            Request::Combine(vec![vec![1], vec![]]),
            Request::Render(vec![3]),
            Request::Inspect,
            Request::Probe,
        ] {
            assert_eq!(decode(&encode(&r, limits)).unwrap(), (r, limits));
        }
        let mut bad = encode(&Request::Render(vec![1, 2, 3]), limits);
        bad.truncate(bad.len() - 1);
        assert!(decode(&bad).is_err());
        assert!(decode(b"nope").is_err());
    }
}
