//! Every test_run case of nat_datapath.rs again, with XDP on the uplink: each packet for
//! uplink_in goes through uplink_xdp first, and uplink_in runs only on what it passes, which must
//! be the packet unchanged. The assertions are nat_datapath.rs's own, so XDP on or off gives the
//! same verdicts, the same bytes, the same flows, counters and flow events.

/// Read by the included cases (`crate::XDP_FIRST`).
const XDP_FIRST: bool = true;

#[path = "nat_datapath.rs"]
mod cases;
