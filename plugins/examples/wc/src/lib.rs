//! `wc`: lines, words and bytes, like `wc` (a line is a `\n`; a word is a run of non-whitespace).
//! Line mode, so no word is cut by a block boundary. Partial: three little-endian u64.

use lode_plugin_sdk::{export_plugin, Args, InputMode, Plugin};

/// Counts so far.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Wc {
    lines: u64,
    words: u64,
    bytes: u64,
}

fn decode(p: &[u8]) -> Result<[u64; 3], String> {
    if p.len() != 24 {
        return Err(format!("wc partial must be 24 bytes, got {}", p.len()));
    }
    let mut out = [0u64; 3];
    for (i, c) in p.chunks_exact(8).enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(c);
        out[i] = u64::from_le_bytes(b);
    }
    Ok(out)
}

fn encode(v: [u64; 3]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl Plugin for Wc {
    const INPUT_MODE: InputMode = InputMode::Lines;

    fn new(_args: &Args) -> Result<Self, String> {
        Ok(Wc::default())
    }

    fn feed(&mut self, data: &[u8]) -> Result<(), String> {
        self.bytes += data.len() as u64;
        let mut in_word = false;
        for &b in data {
            if b == b'\n' {
                self.lines += 1;
            }
            let space = matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c);
            if !space && !in_word {
                self.words += 1;
            }
            in_word = !space;
        }
        Ok(())
    }

    fn finish(self) -> Result<Vec<u8>, String> {
        Ok(encode([self.lines, self.words, self.bytes]))
    }

    fn combine(parts: &[&[u8]]) -> Result<Vec<u8>, String> {
        let mut sum = [0u64; 3];
        for p in parts {
            let v = decode(p)?;
            for (s, x) in sum.iter_mut().zip(v) {
                *s += x;
            }
        }
        Ok(encode(sum))
    }

    fn render(partial: &[u8]) -> Option<Result<Vec<u8>, String>> {
        Some(decode(partial).map(|[l, w, b]| format!("{l} {w} {b}\n").into_bytes()))
    }
}

export_plugin!(Wc, "wc");
