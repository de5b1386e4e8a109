//! `grep`: count the lines that match, and keep the first N matches with their file and byte offset.
//! Arguments: `pattern` (a regular expression), `fixed` (`true`: the pattern is a plain string),
//! `max_matches` (default 10). Partial (little-endian): u64 count, u32 max, u32 n, then n matches of
//! (u32 path length, path, u64 offset, u32 line length, line).

use lode_plugin_sdk::{export_plugin, Args, InputMode, Plugin};
use regex::bytes::Regex;

/// Per-task state.
pub struct Grep {
    re: Regex,
    /// The same pattern with `^`/`$` at line breaks: finds candidate lines in a whole buffer.
    finder: Regex,
    path: String,
    offset: u64,
    partial: Partial,
}

/// Count and first matches.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Partial {
    count: u64,
    max: u32,
    matches: Vec<(String, u64, Vec<u8>)>,
}

/// Longest part of a matching line kept in the result.
const LINE_KEPT_MAX: usize = 4096;

impl Partial {
    fn encode(&self) -> Vec<u8> {
        let mut v = vec![];
        v.extend(self.count.to_le_bytes());
        v.extend(self.max.to_le_bytes());
        v.extend((self.matches.len() as u32).to_le_bytes());
        for (p, off, line) in &self.matches {
            v.extend((p.len() as u32).to_le_bytes());
            v.extend(p.as_bytes());
            v.extend(off.to_le_bytes());
            v.extend((line.len() as u32).to_le_bytes());
            v.extend(line);
        }
        v
    }

    fn decode(b: &[u8]) -> Result<Partial, String> {
        let mut r = Reader { b, i: 0 };
        let count = r.u64()?;
        let max = r.u32()?;
        let n = r.u32()? as usize;
        let mut matches = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            let plen = r.u32()? as usize;
            let p = String::from_utf8(r.take(plen)?.to_vec())
                .map_err(|_| "bad path in grep partial")?;
            let off = r.u64()?;
            let llen = r.u32()? as usize;
            matches.push((p, off, r.take(llen)?.to_vec()));
        }
        if r.i != b.len() {
            return Err("trailing bytes in grep partial".into());
        }
        Ok(Partial {
            count,
            max,
            matches,
        })
    }
}

struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self
            .i
            .checked_add(n)
            .ok_or("grep partial: length overflow")?;
        let s = self.b.get(self.i..end).ok_or("truncated grep partial")?;
        self.i = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, String> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
}

impl Plugin for Grep {
    const INPUT_MODE: InputMode = InputMode::Lines;

    fn new(args: &Args) -> Result<Self, String> {
        let pattern = args.require("pattern")?;
        let fixed = args.get("fixed").is_some_and(|v| v == "true" || v == "1");
        let source = if fixed {
            regex::escape(pattern)
        } else {
            pattern.to_string()
        };
        let re = Regex::new(&source).map_err(|e| format!("bad pattern: {e}"))?;
        let finder = regex::bytes::RegexBuilder::new(&source)
            .multi_line(true)
            .build()
            .map_err(|e| format!("bad pattern: {e}"))?;
        let max: u32 = args.parse_or("max_matches", 10)?;
        Ok(Grep {
            re,
            finder,
            path: args.get("_path").unwrap_or("").to_string(),
            offset: args.parse_or("_offset", 0)?,
            partial: Partial {
                max,
                ..Default::default()
            },
        })
    }

    fn feed(&mut self, data: &[u8]) -> Result<(), String> {
        // Search the whole buffer at once (the regex engine skips non-matching text with fast
        // literal scans), then widen each match to its line and continue after that line.
        let mut from = 0usize;
        while from < data.len() {
            let Some(m) = self.finder.find_at(data, from) else {
                break;
            };
            let start = data[..m.start()]
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |p| p + 1);
            let end = data[m.start()..]
                .iter()
                .position(|b| *b == b'\n')
                .map_or(data.len(), |p| m.start() + p);
            let line = &data[start..end];
            // The candidate is confirmed on its own line (a match may not span a line break).
            if self.re.is_match(line) {
                self.partial.count += 1;
                if self.partial.matches.len() < self.partial.max as usize {
                    let kept = line[..line.len().min(LINE_KEPT_MAX)].to_vec();
                    self.partial.matches.push((
                        self.path.clone(),
                        self.offset + start as u64,
                        kept,
                    ));
                }
            }
            from = end + 1;
        }
        self.offset += data.len() as u64;
        Ok(())
    }

    fn finish(self) -> Result<Vec<u8>, String> {
        Ok(self.partial.encode())
    }

    fn combine(parts: &[&[u8]]) -> Result<Vec<u8>, String> {
        let mut out = Partial::default();
        for p in parts {
            let d = Partial::decode(p)?;
            out.count += d.count;
            out.max = out.max.max(d.max);
            out.matches.extend(d.matches);
        }
        out.matches.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        out.matches.truncate(out.max as usize);
        Ok(out.encode())
    }

    fn render(partial: &[u8]) -> Option<Result<Vec<u8>, String>> {
        Some(Partial::decode(partial).map(|p| {
            let mut s = format!("{} matching lines\n", p.count);
            for (path, off, line) in &p.matches {
                s.push_str(&format!(
                    "{path}:{off}: {}\n",
                    String::from_utf8_lossy(line)
                ));
            }
            s.into_bytes()
        }))
    }
}

export_plugin!(Grep, "grep");
