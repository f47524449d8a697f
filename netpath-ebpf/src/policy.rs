//! Who may reach whom, as Docker decides it: isolation between networks (a container may reach
//! containers of its own networks and any host address, not those of other networks), and the
//! gateway modes' protection of container addresses from hosts outside that route to them.

use aya_ebpf::maps::lpm_trie::Key;
use netpath_common::{PortKey, net_flags, proto};

use crate::maps::{ENDPOINTS, HOST_ADDRS, NETWORKS, PUBLISHED};
use crate::parse::Packet;

/// True when `p`, arriving from the container veth `ifindex`, carries the address of a
/// container on another veth. Isolation and conntrack trust the source address, so it must be
/// the sender's own (Docker gets the same from interface-based rules).
#[inline(always)]
pub fn spoofed(p: &Packet, ifindex: u32) -> bool {
    // SAFETY: plain lookup.
    unsafe { ENDPOINTS.get(&p.saddr) }.is_some_and(|ep| ep.ifindex != ifindex)
}

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

/// What a packet arriving from outside, of no known flow and for no published host port, may do.
pub enum Direct {
    /// Not addressed to a container network (or to the host's own address on one).
    NotContainer,
    /// Routed to a container its network opens: `nat-unprotected` (every port) or `routed`
    /// (published container ports, and ICMP).
    Open,
    /// Routed to a container its network keeps closed (`nat`, Docker's default).
    Denied,
}

#[inline(always)]
pub fn direct_access(p: &Packet) -> Direct {
    let Some(net) = NETWORKS.get(Key::new(32, p.daddr)) else { return Direct::NotContainer };
    // SAFETY: plain lookup.
    if unsafe { HOST_ADDRS.get(&p.daddr) }.is_some() {
        return Direct::NotContainer;
    }
    if net.flags & net_flags::DIRECT_ANY != 0 {
        return Direct::Open;
    }
    if net.flags & net_flags::DIRECT_PUBLISHED != 0 {
        if p.tuple.proto == proto::ICMP {
            return Direct::Open;
        }
        let key = PortKey { addr: p.daddr, port: p.tuple.dport, proto: p.tuple.proto, _pad: 0 };
        // SAFETY: plain lookup. Fragments and other untranslatable packets have no port to check.
        if p.translatable && unsafe { PUBLISHED.get(&key) }.is_some() {
            return Direct::Open;
        }
    }
    Direct::Denied
}

/// True when a new flow to the outside from a network with `flags` is tracked as is (not
/// masqueraded): its replies must be let back in by a network closed to direct access.
#[inline(always)]
pub fn track_unmasqueraded(flags: u32) -> bool {
    flags & (net_flags::MASQUERADE | net_flags::DIRECT_ANY) == 0
}
