//! Namespace paths: absolute, `/`-separated. Empty components (`//`, a trailing `/`) and `.` are
//! dropped; `..` is refused, so no path can name anything outside the namespace or be read two ways.

/// Longest path accepted, in bytes.
pub const PATH_BYTES_MAX: usize = 4096;
/// Longest single name, in bytes.
pub const NAME_BYTES_MAX: usize = 255;

/// Normalises a path to `/a/b` form. A relative path is taken from the root.
pub fn normalize(path: &str) -> Result<String, String> {
    if path.is_empty() {
        return Err("empty path".into());
    }
    if path.len() > PATH_BYTES_MAX {
        return Err(format!("path longer than {PATH_BYTES_MAX} bytes"));
    }
    let mut out = String::with_capacity(path.len() + 1);
    for part in path.split('/') {
        match part {
            "" | "." => continue,
            ".." => return Err(format!("{path}: '..' is not allowed in paths")),
            name => {
                if name.len() > NAME_BYTES_MAX {
                    return Err(format!("{path}: name longer than {NAME_BYTES_MAX} bytes"));
                }
                if name.chars().any(|c| c == '\0' || c.is_control()) {
                    return Err(format!(
                        "{path}: control characters are not allowed in names"
                    ));
                }
                out.push('/');
                out.push_str(name);
            }
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// The names of a normalised path, root first (none for `/`).
pub fn components(normalized: &str) -> impl Iterator<Item = &str> {
    normalized.split('/').filter(|c| !c.is_empty())
}

/// The system tree: only an admin may change it (the namenode enforces this).
pub const SYSTEM_DIR: &str = "/.lode";
/// Where plugin libraries are stored, each under its hash.
pub const PLUGIN_DIR: &str = "/.lode/plugins";

/// Splits a normalised path into parent and last name; `None` for the root.
pub fn split_parent(normalized: &str) -> Option<(&str, &str)> {
    if normalized == "/" {
        return None;
    }
    let idx = normalized.rfind('/')?;
    let parent = if idx == 0 { "/" } else { &normalized[..idx] };
    Some((parent, &normalized[idx + 1..]))
}

/// Joins a normalised directory path and a name.
pub fn join(dir: &str, name: &str) -> String {
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_and_refuses() {
        assert_eq!(normalize("/").unwrap(), "/");
        assert_eq!(normalize("//a///b/").unwrap(), "/a/b");
        assert_eq!(normalize("a/./b").unwrap(), "/a/b");
        assert!(normalize("/a/../b").is_err());
        assert!(normalize("..").is_err());
        assert!(normalize("").is_err());
        assert!(normalize("/a\0b").is_err());
        assert!(normalize(&"x".repeat(300)).is_err());
        assert_eq!(split_parent("/a/b"), Some(("/a", "b")));
        assert_eq!(split_parent("/a"), Some(("/", "a")));
        assert_eq!(split_parent("/"), None);
        assert_eq!(components("/a/b").collect::<Vec<_>>(), vec!["a", "b"]);
        assert_eq!(join("/", "a"), "/a");
    }
}
