//! Failpoints: named places at durable transitions where a test can crash the process, to check
//! what survives. They exist only in builds with the `failpoints` cargo feature (the test suite
//! builds with it); other builds compile [`failpoint!`](crate::failpoint) to nothing.
//!
//! Armed at start-up by the `FAILPOINTS` environment variable in the `fail` crate's syntax,
//! `name=action;name=action`: `return` aborts the process at that point (no destructor runs and
//! nothing buffered is written, as when the process is killed there), `3*off->return` does so on
//! the fourth pass, `panic`, `sleep(ms)` and `pause` behave as in `fail`. Names are listed in
//! ARCHITECTURE.md ("Failpoints").

/// Starts reading `FAILPOINTS`; keep the returned guard for the life of the process.
#[cfg(feature = "failpoints")]
pub fn setup() -> fail::FailScenario<'static> {
    let scenario = fail::FailScenario::setup();
    if let Ok(spec) = std::env::var("FAILPOINTS") {
        tracing::warn!(%spec, "failpoints armed");
    }
    scenario
}

/// Ends the process at failpoint `name`, as a kill would.
pub fn crash(name: &str) -> ! {
    eprintln!("failpoint {name}: aborting the process");
    std::process::abort()
}

/// A named failpoint (see the module documentation). With a second argument, `return` makes the
/// enclosing function return that value instead of aborting (to lose a message, say).
#[macro_export]
macro_rules! failpoint {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name, |_| { $crate::failpoints::crash($name) });
    };
    ($name:literal, $value:expr) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name, |_| { $value });
    };
}
