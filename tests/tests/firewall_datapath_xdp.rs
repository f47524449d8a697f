//! Every test_run case of firewall_datapath.rs again, with each packet for uplink_in through
//! uplink_xdp first (uplink_in runs only on what it passes, unchanged): a flow the firewall
//! denies is dropped by XDP with the same counter, flow event and rule as by TC.

/// Read by the included cases (`crate::XDP_FIRST`).
const XDP_FIRST: bool = true;

#[path = "firewall_datapath.rs"]
mod cases;
