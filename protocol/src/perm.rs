//! Permission bits as POSIX and HDFS have them: parsing `chmod` modes (octal such as `640`, or
//! symbolic such as `u+x,go-w`), applying them, the umask, and the `ls -l` form (`drwxr-xr-x`).
//!
//! A mode is 12 bits: sticky (`0o1000`), then owner, group and other, each `rwx`. The set-id bits
//! mean nothing here and are never set.

use serde::{Deserialize, Serialize};

/// The bits a mode may hold: sticky and rwx for owner, group and other.
pub const MODE_MASK: u16 = 0o1777;
/// The sticky bit: in a directory, only an entry's owner, the directory's owner or a superuser may
/// delete or move the entry.
pub const STICKY: u16 = 0o1000;
/// A new file's mode before the umask.
pub const FILE_DEFAULT: u16 = 0o666;
/// A new directory's mode before the umask.
pub const DIR_DEFAULT: u16 = 0o777;
/// The umask when the client config names none.
pub const UMASK_DEFAULT: u16 = 0o022;

/// Read, write, execute (search, for a directory), as the low three bits.
pub const READ: u16 = 4;
/// See [`READ`].
pub const WRITE: u16 = 2;
/// See [`READ`].
pub const EXECUTE: u16 = 1;

/// A `chmod` change, applied to each entry on the namenode (so `-R` with `X` sees each entry's
/// kind and mode).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModeChange {
    /// Set the mode outright (octal).
    Set(u16),
    /// Symbolic clauses, applied in order.
    Symbolic(Vec<Clause>),
}

/// One clause of a symbolic mode: `[ugoa]*[+-=][rwxXt]*`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Clause {
    /// Which classes (bit 0 other, 1 group, 2 owner); none given means all.
    pub who: u8,
    /// `+`, `-` or `=`.
    pub op: char,
    /// `rwx` bits (low three), before they are spread over the classes.
    pub perms: u16,
    /// `X`: execute if the entry is a directory or already executable by anyone.
    pub cond_exec: bool,
    /// `t`: the sticky bit.
    pub sticky: bool,
}

/// Parses an octal mode (`0644`, `1777`, `640`) or a symbolic one (`g+w`, `u=rwx,go=rx`, `+t`).
pub fn parse_mode(s: &str) -> Result<ModeChange, String> {
    if s.is_empty() {
        return Err("empty mode".into());
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        let v = u16::from_str_radix(s, 8)
            .ok()
            .filter(|v| s.len() <= 4 && *v <= MODE_MASK)
            .ok_or_else(|| format!("mode {s:?}: octal modes are 0000 to 1777"))?;
        return Ok(ModeChange::Set(v));
    }
    let mut clauses = vec![];
    for part in s.split(',') {
        let bad = || format!("mode {s:?}: expected octal or [ugoa]*[+-=][rwxXt]*, comma-separated");
        let ops_at = part.find(['+', '-', '=']).ok_or_else(bad)?;
        let mut who = 0u8;
        for c in part[..ops_at].chars() {
            who |= match c {
                'u' => 0b100,
                'g' => 0b010,
                'o' => 0b001,
                'a' => 0b111,
                _ => return Err(bad()),
            };
        }
        // Each of `+x-w` is a clause of its own with the same classes.
        let mut rest = &part[ops_at..];
        while let Some(op) = rest.chars().next() {
            let body_end = rest[1..]
                .find(['+', '-', '='])
                .map_or(rest.len(), |i| i + 1);
            let mut clause = Clause {
                who: if who == 0 { 0b111 } else { who },
                op,
                perms: 0,
                cond_exec: false,
                sticky: false,
            };
            for c in rest[1..body_end].chars() {
                match c {
                    'r' => clause.perms |= READ,
                    'w' => clause.perms |= WRITE,
                    'x' => clause.perms |= EXECUTE,
                    'X' => clause.cond_exec = true,
                    't' => clause.sticky = true,
                    _ => return Err(bad()),
                }
            }
            clauses.push(clause);
            rest = &rest[body_end..];
        }
    }
    Ok(ModeChange::Symbolic(clauses))
}

fn spread(perms: u16, who: u8) -> u16 {
    let mut out = 0;
    for (class, shift) in [(0b100, 6), (0b010, 3), (0b001, 0)] {
        if who & class != 0 {
            out |= (perms & 7) << shift;
        }
    }
    out
}

impl ModeChange {
    /// The new mode of an entry whose mode is `old`.
    pub fn apply(&self, old: u16, is_dir: bool) -> u16 {
        match self {
            ModeChange::Set(v) => v & MODE_MASK,
            ModeChange::Symbolic(clauses) => {
                let mut mode = old & MODE_MASK;
                for c in clauses {
                    let mut perms = c.perms;
                    if c.cond_exec && (is_dir || mode & 0o111 != 0) {
                        perms |= EXECUTE;
                    }
                    let mut bits = spread(perms, c.who);
                    // `t` only means something for all or for other (as chmod(1) has it).
                    if c.sticky && c.who & 0b001 != 0 {
                        bits |= STICKY;
                    }
                    mode = match c.op {
                        '+' => mode | bits,
                        '-' => mode & !bits,
                        _ => {
                            let mut cleared = spread(7, c.who);
                            if c.who & 0b001 != 0 {
                                cleared |= STICKY;
                            }
                            (mode & !cleared) | bits
                        }
                    };
                }
                mode
            }
        }
    }
}

/// Parses a umask: octal, at most `777`.
pub fn parse_umask(s: &str) -> Result<u16, String> {
    u16::from_str_radix(s, 8)
        .ok()
        .filter(|v| *v <= 0o777 && !s.is_empty() && s.len() <= 4)
        .ok_or_else(|| format!("umask {s:?}: expected octal 000 to 777"))
}

/// A mode as JSON shows it: four octal digits (`"0644"`, `"1777"`).
pub fn octal(mode: u16) -> String {
    format!("{:04o}", mode & MODE_MASK)
}

/// A mode as `ls -l` shows it: `drwxr-xr-x`, with `t`/`T` for the sticky bit.
pub fn symbolic(mode: u16, is_dir: bool) -> String {
    let mut s = String::with_capacity(10);
    s.push(if is_dir { 'd' } else { '-' });
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & READ != 0 { 'r' } else { '-' });
        s.push(if bits & WRITE != 0 { 'w' } else { '-' });
        let x = bits & EXECUTE != 0;
        s.push(match (shift, x, mode & STICKY != 0) {
            (0, true, true) => 't',
            (0, false, true) => 'T',
            (_, true, _) => 'x',
            _ => '-',
        });
    }
    s
}

/// Checks a user or group name: 1 to 64 characters of `[A-Za-z0-9_.@-]`, not starting with `-`.
pub fn validate_name(kind: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.@-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{kind} name {name:?} must be 1..=64 of [A-Za-z0-9_.@-], not starting with '-'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sym(s: &str, old: u16, dir: bool) -> u16 {
        parse_mode(s).unwrap().apply(old, dir)
    }

    #[test]
    fn octal_modes_set_the_bits() {
        assert_eq!(parse_mode("640").unwrap(), ModeChange::Set(0o640));
        assert_eq!(parse_mode("1777").unwrap(), ModeChange::Set(0o1777));
        assert_eq!(parse_mode("0").unwrap().apply(0o755, true), 0);
        for bad in ["8", "2777", "17777", "", "u+q", "u", "rw", "+z", "u+r,,"] {
            assert!(parse_mode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn symbolic_modes_follow_chmod() {
        assert_eq!(sym("g+w", 0o644, false), 0o664);
        assert_eq!(sym("go-r", 0o644, false), 0o600);
        assert_eq!(sym("u=rwx,go=rx", 0o600, false), 0o755);
        assert_eq!(sym("a-x", 0o755, true), 0o644);
        assert_eq!(sym("+x", 0o644, false), 0o755);
        assert_eq!(sym("o+t", 0o777, true), 0o1777);
        assert_eq!(sym("+t", 0o777, true), 0o1777);
        assert_eq!(sym("u+t", 0o777, true), 0o777);
        assert_eq!(sym("o=", 0o1777, true), 0o770);
        assert_eq!(sym("a+X", 0o644, false), 0o644);
        assert_eq!(sym("a+X", 0o644, true), 0o755);
        assert_eq!(sym("a+X", 0o744, false), 0o755);
        assert_eq!(sym("u+x-w", 0o644, false), 0o544);
    }

    #[test]
    fn modes_print_as_ls_and_json_show_them() {
        assert_eq!(symbolic(0o755, true), "drwxr-xr-x");
        assert_eq!(symbolic(0o640, false), "-rw-r-----");
        assert_eq!(symbolic(0o1777, true), "drwxrwxrwt");
        assert_eq!(symbolic(0o1770, true), "drwxrwx--T");
        assert_eq!(octal(0o644), "0644");
        assert_eq!(octal(0o1777), "1777");
        assert_eq!(parse_umask("022").unwrap(), 0o022);
        assert!(parse_umask("8").is_err() && parse_umask("1000").is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("user", "alice").is_ok());
        assert!(validate_name("user", "dn-1.example@x").is_ok());
        for bad in ["", "-x", "a b", "a:b", "a/b", &"x".repeat(65)] {
            assert!(validate_name("user", bad).is_err(), "{bad}");
        }
    }
}
