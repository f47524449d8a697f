//! Crash points for tests: with `NETPATH_CRASH_AT=<point>` in its environment the daemon kills
//! itself with SIGKILL when it reaches that point, exactly as `kill -9` would at that moment
//! (no destructor, no cleanup, no final write). Unset, a point costs one cached lookup.

use std::sync::OnceLock;

/// Every crash point, in the order an operation meets them (the tests walk this list).
pub const POINTS: &[&str] = &[
    "run:reserved",
    "run:sandbox",
    "run:wired",
    "run:published",
    "run:started",
    "rm:marked",
    "rm:killed",
    "rm:unwired",
    // After `rm` answered: the removed container's veth and namespace not deleted yet.
    "reap:links",
    "network-create:reserved",
    "network-create:built",
    "network-rm:marked",
    "network-rm:removed",
    "connect:reserved",
    "connect:wired",
    "disconnect:marked",
    "disconnect:unwired",
    "service-create:persisted",
    "service-rm:marked",
];

fn armed() -> Option<&'static str> {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    AT.get_or_init(|| std::env::var("NETPATH_CRASH_AT").ok().filter(|s| !s.is_empty())).as_deref()
}

/// Dies here if this is the armed point.
pub fn point(name: &str) {
    debug_assert!(POINTS.contains(&name), "unlisted crash point {name}");
    if armed() == Some(name) {
        tracing::error!("crash point {name} reached: killing the daemon (NETPATH_CRASH_AT)");
        // SAFETY: plain syscalls on our own pid.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}
