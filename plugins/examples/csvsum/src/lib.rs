//! `csvsum`: count, sum, min and max of one numeric column of delimited text.
//! Arguments: `column` (1-based, like `cut -f`), `delimiter` (one character, default `,`).
//! Rows whose column is missing or not a number (a header, say) are counted as bad, not fatal.
//! Partial: count, bad (u64), sum, min, max (f64), little-endian.

use lode_plugin_sdk::{export_plugin, Args, InputMode, Plugin};

/// Per-task state.
pub struct CsvSum {
    column: usize,
    delimiter: u8,
    acc: Acc,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Acc {
    count: u64,
    bad: u64,
    sum: f64,
    min: f64,
    max: f64,
}

impl Default for Acc {
    fn default() -> Self {
        Acc {
            count: 0,
            bad: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }
}

impl Acc {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(40);
        v.extend(self.count.to_le_bytes());
        v.extend(self.bad.to_le_bytes());
        for f in [self.sum, self.min, self.max] {
            v.extend(f.to_le_bytes());
        }
        v
    }

    fn decode(p: &[u8]) -> Result<Acc, String> {
        if p.len() != 40 {
            return Err(format!("csvsum partial must be 40 bytes, got {}", p.len()));
        }
        let w = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&p[i * 8..i * 8 + 8]);
            b
        };
        Ok(Acc {
            count: u64::from_le_bytes(w(0)),
            bad: u64::from_le_bytes(w(1)),
            sum: f64::from_le_bytes(w(2)),
            min: f64::from_le_bytes(w(3)),
            max: f64::from_le_bytes(w(4)),
        })
    }

    fn merge(&mut self, o: &Acc) {
        self.count += o.count;
        self.bad += o.bad;
        self.sum += o.sum;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
    }
}

impl Plugin for CsvSum {
    const INPUT_MODE: InputMode = InputMode::Lines;

    fn new(args: &Args) -> Result<Self, String> {
        let column: usize = args
            .require("column")?
            .parse()
            .map_err(|_| "column must be a number from 1".to_string())?;
        if column == 0 {
            return Err("column is 1-based (the first column is 1)".into());
        }
        let delimiter = match args.get("delimiter").unwrap_or(",") {
            "\\t" | "tab" => b'\t',
            d if d.len() == 1 => d.as_bytes()[0],
            d => return Err(format!("delimiter must be one character, got {d:?}")),
        };
        Ok(CsvSum {
            column,
            delimiter,
            acc: Acc::default(),
        })
    }

    fn feed(&mut self, data: &[u8]) -> Result<(), String> {
        for line in data.split(|b| *b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                continue;
            }
            let field = line.split(|b| *b == self.delimiter).nth(self.column - 1);
            let value = field
                .and_then(|f| std::str::from_utf8(f).ok())
                .and_then(|s| s.trim().trim_matches('"').parse::<f64>().ok())
                .filter(|v| v.is_finite());
            match value {
                Some(v) => {
                    self.acc.count += 1;
                    self.acc.sum += v;
                    self.acc.min = self.acc.min.min(v);
                    self.acc.max = self.acc.max.max(v);
                }
                None => self.acc.bad += 1,
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<Vec<u8>, String> {
        Ok(self.acc.encode())
    }

    fn combine(parts: &[&[u8]]) -> Result<Vec<u8>, String> {
        let mut acc = Acc::default();
        for p in parts {
            acc.merge(&Acc::decode(p)?);
        }
        Ok(acc.encode())
    }

    fn render(partial: &[u8]) -> Option<Result<Vec<u8>, String>> {
        Some(Acc::decode(partial).map(|a| {
            if a.count == 0 {
                format!("count 0 sum 0 min - max - bad {}\n", a.bad).into_bytes()
            } else {
                format!(
                    "count {} sum {} min {} max {} bad {}\n",
                    a.count, a.sum, a.min, a.max, a.bad
                )
                .into_bytes()
            }
        }))
    }
}

export_plugin!(CsvSum, "csvsum");
