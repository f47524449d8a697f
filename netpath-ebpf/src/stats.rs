//! Per-endpoint packet and byte accounting.

use aya_ebpf::programs::TcContext;

use crate::maps::ENDPOINT_STATS;
use crate::parse::Packet;

pub enum Direction {
    FromContainer,
    ToContainer,
}

/// Counts the packet against the endpoint whose host-side veth it crosses. Interfaces the
/// daemon does not manage have no entry and are left alone.
#[inline(always)]
pub fn account(ctx: &TcContext, dir: Direction) {
    // SAFETY: the skb pointer is valid for the whole program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some(stats) = ENDPOINT_STATS.get_ptr_mut(ifindex) else {
        return;
    };
    let len = u64::from(ctx.len());
    // SAFETY: per-CPU value, so no other CPU writes it concurrently.
    let stats = unsafe { &mut *stats };
    match dir {
        Direction::FromContainer => {
            stats.tx_packets += 1;
            stats.tx_bytes += len;
        }
        Direction::ToContainer => {
            stats.rx_packets += 1;
            stats.rx_bytes += len;
        }
    }
}

/// Every drop goes through here: counted by reason, reported to flow followers with the
/// packet's tuple and the hook (`netpath_common::hook`) that dropped it, then TC_ACT_SHOT.
#[inline(always)]
pub fn drop(p: &Packet, hook: u8, reason: u32) -> i32 {
    crate::maps::count(&crate::maps::DROPS, reason);
    crate::events::dropped(p, hook, reason);
    aya_ebpf::bindings::TC_ACT_SHOT as i32
}
