//! Counting what the datapath does to packets: every drop goes through here. (Per-endpoint
//! traffic is not counted here: the kernel counts it on each veth.)

use crate::parse::Packet;

/// Every drop goes through here: counted by reason, reported to flow followers with the
/// packet's tuple and the hook (`netpath_common::hook`) that dropped it, then TC_ACT_SHOT.
#[inline(always)]
pub fn drop(p: &Packet, hook: u8, reason: u32) -> i32 {
    count_drop(p, hook, reason);
    aya_ebpf::bindings::TC_ACT_SHOT as i32
}

/// Counts and reports a drop; the caller returns its program type's drop verdict (XDP).
#[inline(always)]
pub fn count_drop(p: &Packet, hook: u8, reason: u32) {
    crate::maps::count(&crate::maps::DROPS, reason);
    crate::events::dropped(p, hook, reason);
}

/// A drop of a frame that did not parse as IPv4 (no tuple to report): counted only.
#[inline(always)]
pub fn drop_unparsed(reason: u32) -> i32 {
    crate::maps::count(&crate::maps::DROPS, reason);
    aya_ebpf::bindings::TC_ACT_SHOT as i32
}

/// A new flow the firewall denies (`rule`: the rule's id, for the flow log).
#[inline(always)]
pub fn drop_policy(p: &Packet, hook: u8, rule: u32) -> i32 {
    count_policy_drop(p, hook, rule);
    aya_ebpf::bindings::TC_ACT_SHOT as i32
}

/// [`count_drop`] for a drop by firewall rule `rule`.
#[inline(always)]
pub fn count_policy_drop(p: &Packet, hook: u8, rule: u32) {
    let reason = netpath_common::drop_reason::POLICY_DENIED;
    crate::maps::count(&crate::maps::DROPS, reason);
    crate::events::dropped_by_rule(p, hook, reason, rule);
}
