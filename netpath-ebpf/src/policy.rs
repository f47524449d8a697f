//! Who may reach whom, as Docker decides it: isolation between networks (a container may reach
//! containers of its own networks and any host address, not those of other networks, except the
//! published ports of `routed` networks), and the gateway modes' protection of container
//! addresses from hosts outside that route to them.

use aya_ebpf::maps::lpm_trie::Key;
use netpath_common::{EndpointInfo, NetworkInfo, PortKey, endpoint_net_slot, net_flags, proto};

use crate::maps::{ENDPOINT_NETS, ENDPOINTS, NETWORKS, PUBLISHED};
use crate::parse::Packet;

/// The container endpoint `p`'s source address belongs to, if any: looked up once per packet
/// for both the source check and isolation.
#[inline(always)]
pub fn source(p: &Packet) -> Option<EndpointInfo> {
    // SAFETY: plain lookup, value copied.
    unsafe { ENDPOINTS.get(&p.saddr) }.copied()
}

/// True when a packet from the container veth `ifindex` carries the address of a container on
/// another veth (`src`: see [`source`]). Isolation and conntrack trust the source address, so
/// it must be the sender's own (Docker gets the same from interface-based rules).
#[inline(always)]
pub fn spoofed(src: Option<&EndpointInfo>, ifindex: u32) -> bool {
    src.is_some_and(|ep| ep.ifindex != ifindex)
}

/// Whether a container may send `p` to the container network address it targets.
pub enum Reach {
    /// Not another network's container (its own network, a host address, the outside).
    Free,
    /// Another network's container that its `routed` network opens to direct routing (a
    /// published container port, ICMP): allowed, tracked so that replies come back.
    Routed,
    /// Another network's container: isolated, as Docker isolates bridge networks.
    Isolated,
}

/// `src`: the sender's endpoint, see [`source`].
#[inline(always)]
pub fn reach(p: &Packet, src: Option<&EndpointInfo>) -> Reach {
    let Some(dst) = NETWORKS.get(Key::new(32, p.daddr)) else { return Reach::Free };
    if dst.gateway == p.daddr {
        return Reach::Free; // the host's own address on that network
    }
    match src {
        // `enable_icc=false`: not even its own network's containers (the gateway is above).
        Some(src) if src.net_id == dst.net_id && dst.flags & net_flags::NO_ICC != 0 => Reach::Isolated,
        Some(src) if src.net_id == dst.net_id => Reach::Free,
        _ if dst.flags & net_flags::DIRECT_PUBLISHED != 0 && opens_published(p) => Reach::Routed,
        // Another network, or a source netpath did not assign (spoofed): no way in.
        _ => Reach::Isolated,
    }
}

/// True when a `routed` network opens `p`'s destination to direct routing: a published
/// container port, or ICMP. Fragments and other untranslatable packets have no port to check.
#[inline(always)]
fn opens_published(p: &Packet) -> bool {
    if p.tuple.proto == proto::ICMP {
        return true;
    }
    let key = PortKey { addr: p.daddr, port: p.tuple.dport, proto: p.tuple.proto, _pad: 0 };
    // SAFETY: plain lookup.
    p.translatable && unsafe { PUBLISHED.get(&key) }.is_some()
}

/// True when a container of an `--internal` network (`src`, see [`source`]) sends `p` anywhere
/// outside its own network: to the outside, the host's other addresses, other networks.
#[inline(always)]
pub fn leaves_internal(p: &Packet, src: Option<&EndpointInfo>) -> bool {
    let Some(src) = src else { return false };
    let Some(own) = NETWORKS.get(Key::new(32, p.saddr)) else { return false };
    if own.flags & net_flags::INTERNAL == 0 {
        return false;
    }
    !NETWORKS.get(Key::new(32, p.daddr)).is_some_and(|dst| dst.net_id == src.net_id)
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
    /// Routed to a container of an `--internal` network: nothing gets in.
    Internal,
}

/// The network of `addr` when it is the address of a container here and none of the host's
/// (ENDPOINT_NETS: what NETWORKS says of it, in the address's slot). None decides nothing: the
/// address may still be in a container network (ask NETWORKS).
#[inline(always)]
pub fn endpoint_net(addr: u32) -> Option<NetworkInfo> {
    let slot = ENDPOINT_NETS.get_ptr(endpoint_net_slot(addr))?;
    // The address first, then the fields the daemon wrote before it (volatile: in this order).
    // SAFETY: a map value, valid for the program run.
    let e = unsafe { &*slot };
    // SAFETY: fields of that value.
    if unsafe { core::ptr::read_volatile(&e.addr) } != addr || addr == 0 {
        return None;
    }
    // SAFETY: as above.
    let net = unsafe { core::ptr::read_volatile(&e.net) };
    // Still this address: the daemon did not give the slot to another (clearing the address
    // first) while the network was read.
    // SAFETY: as above.
    (unsafe { core::ptr::read_volatile(&e.addr) } == addr).then_some(net)
}

#[inline(always)]
pub fn direct_access(p: &Packet) -> Direct {
    match endpoint_net(p.daddr) {
        Some(net) => direct_access_to(p, &net),
        None => direct_access_by_prefix(p),
    }
}

/// [`direct_access`] for an address ENDPOINT_NETS does not hold: the trie decides.
#[inline(always)]
pub fn direct_access_by_prefix(p: &Packet) -> Direct {
    match NETWORKS.get(Key::new(32, p.daddr)) {
        Some(net) => direct_access_to(p, net),
        None => Direct::NotContainer,
    }
}

/// [`direct_access`] for a destination on network `net` (its NETWORKS entry).
#[inline(always)]
pub fn direct_access_to(p: &Packet, net: &NetworkInfo) -> Direct {
    if net.gateway == p.daddr {
        return Direct::NotContainer; // the host's own address on that network
    }
    if net.flags & net_flags::INTERNAL != 0 {
        return Direct::Internal;
    }
    if net.flags & net_flags::DIRECT_ANY != 0 {
        return Direct::Open;
    }
    if net.flags & net_flags::DIRECT_PUBLISHED != 0 && opens_published(p) {
        return Direct::Open;
    }
    Direct::Denied
}
