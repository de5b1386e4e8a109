//! Start-up safe mode: namespace changes wait until enough blocks have a reported replica.

use super::*;

/// Safe mode: namespace changes are refused while it is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SafeMode {
    /// Writes allowed.
    Off,
    /// After a start, until enough blocks are reported; lifts by itself.
    Startup,
    /// Entered by an admin; only an admin lifts it.
    Manual,
}

impl State {
    /// (complete blocks with at least one reported replica, complete blocks).
    pub fn reported_blocks(&self, now: Instant) -> (u64, u64) {
        let health = self.full_health(now);
        (health.total - health.missing, health.total)
    }

    /// Lifts start-up safe mode once the threshold of blocks has a reported replica.
    ///
    /// It is asked after every chunk of a block report, so it must not count every block each
    /// time: blocks that were complete at start and have had a replica reported since are counted
    /// as they come ([`State::startup_seen`]), and only once that count reaches the threshold are
    /// the blocks counted exactly (replicas on datanodes that died since do not count). A count
    /// that falls short is tried again a second later at the earliest.
    pub fn check_safemode(&mut self, now: Instant) {
        if self.safemode != SafeMode::Startup {
            return;
        }
        let need = self.safemode_threshold * self.complete_at_start as f64;
        if (self.startup_seen as f64) < need
            || self
                .safemode_retry
                .is_some_and(|t| now.saturating_duration_since(t) < SAFEMODE_RETRY)
        {
            return;
        }
        let (reported, total) = self.reported_blocks(now);
        if total == 0 || reported as f64 >= self.safemode_threshold * total as f64 {
            self.safemode = SafeMode::Off;
            tracing::info!(
                reported,
                total,
                "leaving safe mode: enough blocks are reported"
            );
            self.event(format!(
                "left safe mode: {reported} of {total} blocks reported"
            ));
        } else {
            self.safemode_retry = Some(now);
        }
    }
}

/// How soon an exact count that kept safe mode on is made again.
const SAFEMODE_RETRY: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    #[test]
    fn start_up_safe_mode_lifts_once_enough_blocks_are_reported() {
        let t0 = Instant::now();
        let mut s = state(4, 1, true, t0);
        s.safemode_threshold = 0.75;
        s.check_safemode(t0);
        assert_eq!(s.safemode, SafeMode::Startup);
        s.register("dn-1", "a:1".into(), space(), &[replica(1), replica(2)], t0);
        assert_eq!(s.reported_blocks(t0), (2, 4));
        assert_eq!(s.safemode, SafeMode::Startup);
        s.report_more("dn-1", &[replica(3)], t0);
        assert_eq!(s.safemode, SafeMode::Off);
        // The count of blocks seen gates the exact count: replicas of a node that died since do
        // not count, and a count that fell short is made again a second later at the earliest.
        let mut s = state(4, 1, true, t0);
        s.safemode_threshold = 0.75;
        s.register("dn-1", "a:1".into(), space(), &[replica(1)], t0);
        let t1 = t0 + timing().dead_after;
        s.register("dn-2", "a:2".into(), space(), &[replica(2), replica(3)], t1);
        assert_eq!(s.startup_seen, 3);
        assert_eq!(s.safemode, SafeMode::Startup, "dn-1 is dead by now");
        s.report_more("dn-2", &[replica(4)], t1);
        assert_eq!(s.safemode, SafeMode::Startup, "tried again within a second");
        s.check_safemode(t1 + SAFEMODE_RETRY);
        assert_eq!(s.safemode, SafeMode::Off);
        assert_eq!(s.reported_blocks(t1), (3, 4));
        let mut s = state(4, 1, true, t0);
        s.safemode = SafeMode::Startup;
        // A manual safe mode never lifts by itself.
        s.safemode = SafeMode::Manual;
        s.check_safemode(t0);
        assert_eq!(s.safemode, SafeMode::Manual);
    }
}
