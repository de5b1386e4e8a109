//! Who may do what: the owner, group and mode every inode carries, the caller a request runs as,
//! groups from the config, and the checks POSIX and HDFS make (the owner class first, then the
//! group, then other; a superuser passes every check).
//!
//! The namespace calls [`Caller::check`] while it resolves paths and validates edits, so a check and
//! the change it guards see the same state (the writer's overlay).

use std::collections::{BTreeMap, BTreeSet};

use lode_protocol::perm::{self, EXECUTE, READ, STICKY, WRITE};
use lode_protocol::ErrorCode;
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// The owner of everything a cluster held before it had owners, and of the root.
pub const SUPERUSER: &str = "admin";
/// The group whose members are superusers (HDFS's `supergroup`), and the root's group.
pub const SUPERGROUP: &str = "supergroup";

/// Owner, group and mode of an inode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Perm {
    /// The owning user.
    pub owner: String,
    /// The owning group.
    pub group: String,
    /// Permission bits and the sticky bit.
    pub mode: u16,
}

impl Perm {
    /// What an entry from before owners existed gets: the superuser's, 0755 or 0644.
    pub fn legacy(is_dir: bool) -> Perm {
        Perm {
            owner: SUPERUSER.into(),
            group: SUPERGROUP.into(),
            mode: if is_dir { 0o755 } else { 0o644 },
        }
    }
}

/// The user a request runs as: the certificate's common name, its groups from the config, and
/// whether it is a superuser (an admin certificate, or a member of [`SUPERGROUP`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// User name.
    pub user: String,
    /// Groups the user is in.
    pub groups: BTreeSet<String>,
    /// Passes every check.
    pub superuser: bool,
}

/// The access a check asks for, as HDFS names it in its refusals.
fn access_name(bits: u16) -> &'static str {
    match bits {
        READ => "READ",
        WRITE => "WRITE",
        EXECUTE => "EXECUTE",
        b if b == READ | EXECUTE => "READ_EXECUTE",
        b if b == WRITE | EXECUTE => "WRITE_EXECUTE",
        _ => "ALL",
    }
}

impl Caller {
    /// A superuser (the namenode's own work: lease expiry, the simulation, tests).
    pub fn superuser() -> Caller {
        Caller {
            user: SUPERUSER.into(),
            groups: BTreeSet::from([SUPERGROUP.to_string()]),
            superuser: true,
        }
    }

    /// Whether `perm` grants every bit of `want` (rwx, low three bits) to this caller.
    pub fn may(&self, p: &Perm, want: u16) -> bool {
        if self.superuser {
            return true;
        }
        let class = if p.owner == self.user {
            p.mode >> 6
        } else if self.groups.contains(&p.group) {
            p.mode >> 3
        } else {
            p.mode
        };
        class & want == want
    }

    /// Refuses unless `perm` grants `want`; the error names the user, the access and the entry as
    /// HDFS does (`user=alice, access=WRITE, inode="/x":bob:staff:drwxr-xr-x`).
    pub fn check(&self, path: &str, p: &Perm, is_dir: bool, want: u16) -> Result<(), Error> {
        if self.may(p, want) {
            return Ok(());
        }
        Err(Error::refused(
            ErrorCode::PermissionDenied,
            format!(
                "permission denied: user={}, access={}, inode=\"{path}\":{}:{}:{}",
                self.user,
                access_name(want),
                p.owner,
                p.group,
                perm::symbolic(p.mode, is_dir)
            ),
        ))
    }

    /// The sticky rule: in a sticky directory only the entry's owner, the directory's owner or a
    /// superuser may delete or move the entry.
    pub fn check_sticky(&self, path: &str, dir: &Perm, entry: &Perm) -> Result<(), Error> {
        if self.superuser
            || dir.mode & STICKY == 0
            || entry.owner == self.user
            || dir.owner == self.user
        {
            return Ok(());
        }
        Err(Error::refused(
            ErrorCode::PermissionDenied,
            format!(
                "permission denied: user={} may not delete or move \"{path}\" (owned by {}) out of a \
                 sticky directory owned by {}",
                self.user, entry.owner, dir.owner
            ),
        ))
    }

    /// Only the owner or a superuser may change an entry's mode or group.
    pub fn check_owner(&self, path: &str, p: &Perm) -> Result<(), Error> {
        if self.superuser || p.owner == self.user {
            return Ok(());
        }
        Err(Error::refused(
            ErrorCode::PermissionDenied,
            format!(
                "permission denied: user={} is not the owner of \"{path}\" (owned by {})",
                self.user, p.owner
            ),
        ))
    }
}

/// Group membership from the namenode's config (`[groups]`: group name -> member users).
#[derive(Clone, Debug, Default)]
pub struct Groups {
    of_user: BTreeMap<String, BTreeSet<String>>,
}

impl Groups {
    /// Builds the membership map, checking every name.
    pub fn new(groups: &BTreeMap<String, Vec<String>>) -> Result<Groups, String> {
        let mut of_user: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (group, members) in groups {
            perm::validate_name("group", group)?;
            for user in members {
                perm::validate_name("user", user)?;
                of_user
                    .entry(user.clone())
                    .or_default()
                    .insert(group.clone());
            }
        }
        Ok(Groups { of_user })
    }

    /// The caller a certificate's user acts as; `admin` certificates are superusers.
    pub fn caller(&self, user: &str, admin: bool) -> Caller {
        let groups = self.of_user.get(user).cloned().unwrap_or_default();
        Caller {
            user: user.to_string(),
            superuser: admin || groups.contains(SUPERGROUP),
            groups,
        }
    }

    /// How many users have groups.
    pub fn users(&self) -> usize {
        self.of_user.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perm(owner: &str, group: &str, mode: u16) -> Perm {
        Perm {
            owner: owner.into(),
            group: group.into(),
            mode,
        }
    }

    #[test]
    fn the_owner_class_comes_first_then_the_group_then_other() {
        let groups = Groups::new(&BTreeMap::from([(
            "staff".to_string(),
            vec!["alice".to_string(), "bob".to_string()],
        )]))
        .unwrap();
        let alice = groups.caller("alice", false);
        let bob = groups.caller("bob", false);
        let eve = groups.caller("eve", false);
        // The owner gets only the owner bits, even where the group or other has more (POSIX).
        let p = perm("alice", "staff", 0o077);
        assert!(!alice.may(&p, READ));
        assert!(bob.may(&p, READ | WRITE | EXECUTE));
        assert!(eve.may(&p, READ | WRITE | EXECUTE));
        let p = perm("alice", "staff", 0o640);
        assert!(alice.may(&p, READ | WRITE) && !alice.may(&p, EXECUTE));
        assert!(bob.may(&p, READ) && !bob.may(&p, WRITE));
        assert!(!eve.may(&p, READ));
        assert!(groups.caller("root", true).may(&p, READ | WRITE | EXECUTE));
        let err = eve.check("/x", &p, false, READ).unwrap_err().to_string();
        assert!(
            err.contains("user=eve, access=READ, inode=\"/x\":alice:staff:-rw-r-----"),
            "{err}"
        );
    }

    #[test]
    fn sticky_directories_keep_entries_to_their_owners() {
        let groups = Groups::default();
        let tmp = perm("admin", "supergroup", 0o1777);
        let mine = perm("alice", "supergroup", 0o644);
        assert!(groups
            .caller("alice", false)
            .check_sticky("/tmp/a", &tmp, &mine)
            .is_ok());
        assert!(groups
            .caller("bob", false)
            .check_sticky("/tmp/a", &tmp, &mine)
            .is_err());
        assert!(groups
            .caller("admin", false)
            .check_sticky("/tmp/a", &tmp, &mine)
            .is_ok());
        let open = perm("admin", "supergroup", 0o777);
        assert!(groups
            .caller("bob", false)
            .check_sticky("/d/a", &open, &mine)
            .is_ok());
    }

    #[test]
    fn supergroup_members_are_superusers_and_names_are_checked() {
        let groups = Groups::new(&BTreeMap::from([(
            SUPERGROUP.to_string(),
            vec!["ops".to_string()],
        )]))
        .unwrap();
        assert!(groups.caller("ops", false).superuser);
        assert!(!groups.caller("dev", false).superuser);
        assert!(Groups::new(&BTreeMap::from([("a b".to_string(), vec![])])).is_err());
        assert!(Groups::new(&BTreeMap::from([(
            "g".to_string(),
            vec!["x:y".to_string()]
        )]))
        .is_err());
    }
}
