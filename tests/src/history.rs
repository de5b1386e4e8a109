//! A history of namespace operations, each with its invocation and completion times, and its check
//! for linearizability with stateright's `LinearizabilityTester` (a maintained model checker's
//! tester: it searches for a total order of the operations that respects real time, every
//! operation that completed before another began coming first, and that a sequential namespace
//! would have answered the same way).
//!
//! The operations are on directories, one register each: `mkdir`, `rm`, `chmod` (writes a mode)
//! and `stat` (reads it, or that the directory is missing). Linearizability is local (a history is
//! linearizable if and only if its restriction to each object is), so each directory's history is
//! checked on its own, which keeps the search small. An operation whose outcome is unknown (it
//! failed under a fault, and its change may or may not have been made) stays in flight for ever on
//! a thread of its own: it may take effect at any point after its invocation, or never. A read that
//! failed has no effect and is left out.

use std::collections::BTreeMap;
use std::time::Instant;

use stateright::semantics::{ConsistencyTester, LinearizabilityTester, SequentialSpec};

/// An operation on one directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Make it (with the mode the register starts at).
    Mkdir,
    /// Remove it.
    Rm,
    /// Set its mode.
    Chmod(u16),
    /// Read its mode.
    Stat,
}

/// What an operation answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ret {
    /// Done.
    Ok,
    /// `mkdir` of a directory that exists.
    Exists,
    /// The directory does not exist (`rm`, `chmod`, `stat`).
    Missing,
    /// `stat`: the directory's mode.
    Mode(u16),
}

/// One directory as a sequential namespace holds it: missing, or there with a mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dir {
    /// Its mode, if it exists.
    pub mode: Option<u16>,
    /// The mode `mkdir` gives.
    pub made: u16,
}

impl SequentialSpec for Dir {
    type Op = Op;
    type Ret = Ret;

    fn invoke(&mut self, op: &Op) -> Ret {
        match (op, self.mode) {
            (Op::Mkdir, Some(_)) => Ret::Exists,
            (Op::Mkdir, None) => {
                self.mode = Some(self.made);
                Ret::Ok
            }
            (Op::Rm, Some(_)) => {
                self.mode = None;
                Ret::Ok
            }
            (Op::Chmod(m), Some(_)) => {
                self.mode = Some(*m);
                Ret::Ok
            }
            (Op::Rm | Op::Chmod(_) | Op::Stat, None) => Ret::Missing,
            (Op::Stat, Some(m)) => Ret::Mode(m),
        }
    }
}

/// One operation of the history.
#[derive(Clone, Debug)]
pub struct Call {
    /// Which directory.
    pub key: usize,
    /// The client that made it (clients make one call at a time).
    pub client: usize,
    /// What it asked.
    pub op: Op,
    /// When it was invoked.
    pub start: Instant,
    /// When it completed and what it answered; `None` if it failed and its outcome is unknown.
    pub end: Option<(Instant, Ret)>,
}

/// Checks that `calls` are linearizable, each directory starting as `initial(key)`. On failure,
/// says which directory's history has no valid order and lists it. The tester's search recurses
/// once per operation, so it runs on a thread with a large stack.
pub fn check(calls: &[Call], initial: impl Fn(usize) -> Dir + Send) -> Result<(), String> {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .stack_size(1 << 30)
            .spawn_scoped(s, || check_here(calls, initial))
            .expect("a thread for the check")
            .join()
            .expect("the check panicked")
    })
}

fn check_here(calls: &[Call], initial: impl Fn(usize) -> Dir) -> Result<(), String> {
    let mut by_key: BTreeMap<usize, Vec<&Call>> = BTreeMap::new();
    for c in calls {
        by_key.entry(c.key).or_default().push(c);
    }
    for (key, calls) in by_key {
        // Events in real-time order; an invocation at the same instant as a completion goes
        // first (the two count as concurrent, which only allows more orders).
        let mut events: Vec<(Instant, bool, usize)> = vec![];
        for (i, c) in calls.iter().enumerate() {
            match (c.op, c.end) {
                (Op::Stat, None) => {}
                (_, None) => events.push((c.start, false, i)),
                (_, Some((end, _))) => {
                    events.push((c.start, false, i));
                    events.push((end, true, i));
                }
            }
        }
        events.sort_by_key(|(at, is_return, _)| (*at, *is_return));
        let mut tester = LinearizabilityTester::new(initial(key));
        // A call whose outcome is unknown gets a thread of its own, in flight for ever.
        let thread = |i: usize| match calls[i].end {
            Some(_) => calls[i].client,
            None => 1_000_000 + i,
        };
        for (_, is_return, i) in events {
            let step = if is_return {
                let (_, ret) = calls[i].end.expect("a completed call");
                tester.on_return(thread(i), ret).map(|_| ())
            } else {
                tester.on_invoke(thread(i), calls[i].op).map(|_| ())
            };
            step.map_err(|e| format!("directory {key}: the history is malformed: {e}"))?;
        }
        if !tester.is_consistent() {
            let t0 = calls.iter().map(|c| c.start).min().expect("a call");
            let lines: Vec<String> = calls
                .iter()
                .map(|c| {
                    let ms = |t: Instant| t.duration_since(t0).as_millis();
                    match c.end {
                        Some((end, ret)) => format!(
                            "  client {} {:?} [{}..{} ms] -> {:?}",
                            c.client,
                            c.op,
                            ms(c.start),
                            ms(end),
                            ret
                        ),
                        None => format!(
                            "  client {} {:?} [{} ms..] -> unknown",
                            c.client,
                            c.op,
                            ms(c.start)
                        ),
                    }
                })
                .collect();
            return Err(format!(
                "directory {key}: no order of its operations is linearizable:\n{}",
                lines.join("\n")
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    fn call(t0: Instant, client: usize, op: Op, span: (u64, u64), ret: Option<Ret>) -> Call {
        Call {
            key: 0,
            client,
            op,
            start: at(t0, span.0),
            end: ret.map(|r| (at(t0, span.1), r)),
        }
    }

    fn made() -> Dir {
        Dir {
            mode: Some(0o755),
            made: 0o755,
        }
    }

    #[test]
    fn a_read_after_an_acknowledged_write_that_sees_the_old_value_is_flagged() {
        let t0 = Instant::now();
        let stale = [
            call(t0, 0, Op::Chmod(0o700), (0, 10), Some(Ret::Ok)),
            call(t0, 1, Op::Stat, (20, 30), Some(Ret::Mode(0o755))),
        ];
        let err = check(&stale, |_| made()).unwrap_err();
        assert!(err.contains("no order"), "{err}");
        // Overlapping the write, the same read may see either value.
        let concurrent = [
            call(t0, 0, Op::Chmod(0o700), (0, 30), Some(Ret::Ok)),
            call(t0, 1, Op::Stat, (10, 20), Some(Ret::Mode(0o755))),
        ];
        check(&concurrent, |_| made()).unwrap();
    }

    #[test]
    fn a_change_of_unknown_outcome_may_appear_late_or_never_but_not_twice() {
        let t0 = Instant::now();
        // An rm that failed under a fault, seen to have happened only later.
        let late = [
            call(t0, 0, Op::Rm, (0, 0), None),
            call(t0, 1, Op::Stat, (10, 20), Some(Ret::Mode(0o755))),
            call(t0, 1, Op::Stat, (30, 40), Some(Ret::Missing)),
        ];
        check(&late, |_| made()).unwrap();
        // Once gone it does not come back by itself: a later read of the old mode is flagged.
        let back = [
            call(t0, 0, Op::Rm, (0, 0), None),
            call(t0, 1, Op::Stat, (30, 40), Some(Ret::Missing)),
            call(t0, 2, Op::Stat, (50, 60), Some(Ret::Mode(0o755))),
        ];
        assert!(check(&back, |_| made()).is_err());
        // A mkdir answered "exists" with nothing else making it: flagged.
        let twice = [
            call(t0, 0, Op::Rm, (0, 10), Some(Ret::Ok)),
            call(t0, 1, Op::Mkdir, (20, 30), Some(Ret::Ok)),
            call(t0, 1, Op::Mkdir, (40, 50), Some(Ret::Exists)),
            call(t0, 2, Op::Rm, (60, 70), Some(Ret::Ok)),
            call(t0, 2, Op::Mkdir, (80, 90), Some(Ret::Exists)),
        ];
        assert!(check(&twice, |_| made()).is_err());
    }
}
