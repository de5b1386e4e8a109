//! Write leases: one per client session, renewed by the writer, expired files handed back.

use super::*;

/// A client session's lease.
#[derive(Debug)]
pub struct Lease {
    /// Last renewal.
    pub renewed: Instant,
    /// Files it is writing.
    pub files: BTreeSet<InodeId>,
}

impl State {
    /// Renews a session's lease; false if it holds none.
    pub fn renew(&mut self, session: SessionId, now: Instant) -> bool {
        match self.leases.get_mut(&session) {
            Some(l) => {
                l.renewed = now;
                true
            }
            None => false,
        }
    }

    /// Removes expired leases and returns the files they held.
    pub fn take_expired_leases(&mut self, now: Instant) -> Vec<(SessionId, InodeId)> {
        if self.follower {
            return vec![];
        }
        let expiry = self.timing.lease_expiry;
        let expired: Vec<SessionId> = self
            .leases
            .iter()
            .filter(|(_, l)| now.saturating_duration_since(l.renewed) >= expiry)
            .map(|(s, _)| *s)
            .collect();
        let mut out = vec![];
        for s in expired {
            if let Some(l) = self.leases.remove(&s) {
                out.extend(l.files.into_iter().map(|f| (s, f)));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    #[test]
    fn a_lease_lives_while_renewed_and_expires_with_its_files() {
        let t0 = Instant::now();
        let mut s = state(1, 1, false, t0);
        let session = SessionId(7);
        assert!(s.renew(session, t0 + Duration::from_secs(8)));
        assert!(!s.renew(SessionId(8), t0), "no lease for another session");
        assert!(s
            .take_expired_leases(t0 + Duration::from_secs(17))
            .is_empty());
        let expired = s.take_expired_leases(t0 + Duration::from_secs(18));
        assert_eq!(expired, vec![(session, lode_protocol::InodeId(2))]);
        assert!(s.leases.is_empty());
    }
}
