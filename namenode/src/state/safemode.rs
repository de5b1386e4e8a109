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
        let mut reported = 0;
        let mut total = 0;
        for e in self.blocks.values().filter(|e| e.complete) {
            total += 1;
            let any = e.locations.iter().any(|n| {
                self.datanodes
                    .get(n)
                    .is_some_and(|dn| self.node_state(dn, now) != NodeState::Dead)
            });
            reported += u64::from(any);
        }
        (reported, total)
    }

    /// Lifts start-up safe mode once the threshold of blocks has a reported replica.
    pub fn check_safemode(&mut self, now: Instant) {
        if self.safemode != SafeMode::Startup {
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
        }
    }
}

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
        // A manual safe mode never lifts by itself.
        s.safemode = SafeMode::Manual;
        s.check_safemode(t0);
        assert_eq!(s.safemode, SafeMode::Manual);
    }
}
