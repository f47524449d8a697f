//! Every NAT end-to-end test of nat.rs again, with XDP on the uplink (`netpath daemon --xdp
//! native`): uplink_xdp ahead of uplink_in must change nothing a user sees.

/// The flags of every lab's daemon (read by the included tests as `crate::DAEMON_ARGS`).
const DAEMON_ARGS: &[&str] = &["--xdp", "native"];

#[path = "nat.rs"]
mod cases;
