//! Isolation between networks, as Docker does it: a container may reach containers of its own
//! networks and any host address, but not containers of networks it is not attached to.

use aya_ebpf::maps::lpm_trie::Key;

use crate::maps::{ENDPOINTS, NETWORKS};
use crate::parse::Packet;

/// True when `p`, sent by a container, targets a container of another network.
#[inline(always)]
pub fn isolated(p: &Packet) -> bool {
    let Some(dst) = NETWORKS.get(Key::new(32, p.daddr)) else { return false };
    if dst.gateway == p.daddr {
        return false; // the host's own address on that network
    }
    // SAFETY: plain lookup.
    match unsafe { ENDPOINTS.get(&p.saddr) } {
        Some(src) => src.net_id != dst.net_id,
        // A source netpath did not assign (spoofed) gets no way into another network.
        None => true,
    }
}
