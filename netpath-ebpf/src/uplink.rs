//! The paths of packets crossing an uplink (the host's interface to the outside).

use aya_ebpf::bindings::TC_ACT_OK;
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::programs::TcContext;
use netpath_common::{Tuple, drop_reason, hook, net_flags};

use crate::container::published;
use crate::maps::{NETWORKS, UPLINKS};
use crate::parse::{Packet, parse};
use crate::policy::{self, Direct};
use crate::stats::{drop, drop_policy};
use crate::{conntrack, firewall, icmp, lb, nat, vxlan};

const IN: u8 = hook::UPLINK_IN;
const OUT: u8 = hook::UPLINK_OUT;

/// Arriving from outside: a known flow (replies to masqueraded traffic, later packets of a
/// published-port flow), a new connection to a published service port (Maglev) or
/// published container port (DNAT), or a new flow routed to
/// a container address (tracked as is where the network's gateway mode opens it, dropped where
/// it does not). A new flow then meets the firewall, on its translated destination (as
/// Docker's DOCKER-USER chain sees it). Packets for a local container then go straight to its veth (or through the
/// stack when it must see them); the client's address is kept. A published service port whose
/// backend is on another node (the routing mesh) goes through the tunnel from this node's
/// underlay address instead: the backend sees that address, not the client's (as behind
/// Docker's ingress sandbox), and its replies come back through the tunnel, where `vxlan_in`
/// translates them back and routes them to the client.
#[inline(always)]
pub fn ingress(ctx: &mut TcContext) -> i32 {
    // The upgrade tests' variant build: different code, visible in its extra counter slot.
    #[cfg(feature = "upgrade-test")]
    crate::maps::count(&crate::maps::CT_STATS, netpath_common::ct_stat::MAX);
    let Some(p) = parse(ctx) else { return TC_ACT_OK as i32 };
    if p.icmp_error {
        return icmp_error(ctx, &p, IN, true);
    }
    let xlate = match decide(&p) {
        Verdict::Pass => return TC_ACT_OK as i32,
        Verdict::Drop(reason) => return drop(&p, IN, reason),
        Verdict::Deny(rule) => return drop_policy(&p, IN, rule),
        Verdict::Translate(x) => x,
    };
    // A backend on another node (the routing mesh): this node routes the packet on into the
    // tunnel, a hop like any forward (a TTL that would expire is dropped, as route_out does).
    // A TCP segment that does not fit the tunnel and may not be fragmented is answered (ICMP
    // fragmentation needed), as the kernel's VXLAN answers it (see vxlan::too_big for UDP).
    let remote = vxlan::remote_of(xlate.daddr);
    if remote.is_some() {
        if let Some(mtu) = vxlan::too_big(ctx, &p) {
            return icmp::frag_needed(ctx, &p, mtu, IN);
        }
        if nat::take_hop(ctx).is_err() {
            return drop(&p, IN, drop_reason::REWRITE_FAILED);
        }
    }
    if nat::rewrite(ctx, &p, &xlate).is_err() {
        return drop(&p, IN, drop_reason::REWRITE_FAILED);
    }
    if let Some((vni, remote)) = remote {
        return vxlan::encap(ctx, &p, vni, &remote, IN);
    }
    nat::forward_to_endpoint(ctx, &p, xlate.daddr)
}

/// What the uplink's ingress does with a packet from outside (not an ICMP error), decided the
/// same way for TC and XDP (`uplink_xdp`): the flow is looked up, and a new one is balanced,
/// judged by the firewall and tracked, here, once, whichever program sees it first.
pub enum Verdict {
    /// Not netpath's: the stack has it as it is.
    Pass,
    /// Dropped for a reason (netpath_common::drop_reason).
    Drop(u32),
    /// Dropped by firewall rule `rule`.
    Deny(u32),
    /// A tracked flow, to be rewritten to this tuple.
    Translate(Tuple),
}

#[inline(always)]
pub fn decide(p: &Packet) -> Verdict {
    if !p.translatable {
        return match policy::direct_access(p) {
            Direct::Denied => Verdict::Drop(drop_reason::DIRECT_ACCESS),
            Direct::Internal => Verdict::Drop(drop_reason::INTERNAL),
            Direct::Open => match firewall::denied(p, p.daddr, 0, None) {
                Some(rule) => Verdict::Deny(rule),
                None => Verdict::Pass,
            },
            Direct::NotContainer => Verdict::Pass,
        };
    }
    if let Some(x) = conntrack::lookup_inbound(p) {
        return Verdict::Translate(x);
    }
    let x = match policy::endpoint_net(p.daddr) {
        // A container's own address (what a flood from outside aims at), none of the host's:
        // no port is published on it, so one exact-match lookup decides, sparing a packet
        // HOST_ADDRS, the service and port tables and the trie.
        Some(net) => match routed(p, policy::direct_access_to(p, &net)) {
            Ok(x) => x,
            Err(v) => return v,
        },
        None => {
            // Ports (services' and containers') are published on host addresses only: one
            // lookup spares a packet for anything else both tables.
            let on_host = lb::host_addr(p.daddr);
            match lb::choose(p, lb::Scope::Published, on_host) {
                // The firewall judges the backend the table picked, before the flow is tracked.
                Some(Ok(x)) => {
                    return match firewall::denied(p, x.daddr, x.dport, None) {
                        Some(rule) => Verdict::Deny(rule),
                        None => match service_flow(p, &x) {
                            Ok(x) => Verdict::Translate(x),
                            Err(reason) => Verdict::Drop(reason),
                        },
                    };
                }
                Some(Err(reason)) => return Verdict::Drop(reason),
                None => match published(p, on_host) {
                    Some(b) => Tuple::new(p.tuple.saddr, b.addr, p.tuple.sport, b.port, p.tuple.proto),
                    None => match routed(p, policy::direct_access_by_prefix(p)) {
                        Ok(x) => x,
                        Err(v) => return v,
                    },
                },
            }
        }
    };
    if let Some(rule) = firewall::denied(p, x.daddr, x.dport, None) {
        return Verdict::Deny(rule);
    }
    if let Err(reason) = conntrack::create(&p.tuple, &x, IN, OUT) {
        return Verdict::Drop(reason);
    }
    Verdict::Translate(x)
}

/// A new flow from outside to a container network address, as its network's gateway mode
/// has it: Ok with the tuple to track, or the verdict.
#[inline(always)]
fn routed(p: &Packet, access: Direct) -> Result<Tuple, Verdict> {
    match access {
        // Tracked as is, like Linux conntrack does, so the container's replies are
        // recognised at egress and keep their address (not masqueraded as a new flow).
        Direct::Open => Ok(p.tuple),
        Direct::Denied => Err(Verdict::Drop(drop_reason::DIRECT_ACCESS)),
        Direct::Internal => Err(Verdict::Drop(drop_reason::INTERNAL)),
        Direct::NotContainer => Err(Verdict::Pass),
    }
}

/// Records a new flow to a published service port balanced to `x`: a backend here keeps the
/// client's address (replies translated back at the uplink's egress); a backend on another
/// node gets this node's underlay address as source (replies translated back in `vxlan_in`).
#[inline(always)]
fn service_flow(p: &Packet, x: &Tuple) -> Result<Tuple, u32> {
    if vxlan::remote_of(x.daddr).is_none() {
        conntrack::create(&p.tuple, x, IN, OUT)?;
        return Ok(*x);
    }
    let x = vxlan::from_node(x)?;
    conntrack::create(&p.tuple, &x, IN, hook::VXLAN_IN)?;
    Ok(x)
}

/// Leaving for outside: a known flow (replies of published-port flows get the host address
/// back as source) or a new flow from a container network (masquerade).
#[inline(always)]
pub fn egress(ctx: &mut TcContext) -> i32 {
    let Some(p) = parse(ctx) else { return TC_ACT_OK as i32 };
    if p.icmp_error {
        return icmp_error(ctx, &p, OUT, false);
    }
    if !p.translatable {
        return TC_ACT_OK as i32;
    }
    let xlate = match conntrack::lookup(&p, OUT) {
        Some(x) => x,
        None => match masquerade(&p) {
            Ok(Some(x)) => x,
            Ok(None) => return TC_ACT_OK as i32,
            Err(reason) => return drop(&p, OUT, reason),
        },
    };
    finish(ctx, &p, &xlate)
}

#[inline(always)]
fn icmp_error(ctx: &mut TcContext, p: &Packet, hook: u8, inbound: bool) -> i32 {
    match icmp::translate(ctx, p, hook, inbound) {
        Ok(_) => TC_ACT_OK as i32,
        Err(()) => drop(p, hook, drop_reason::REWRITE_FAILED),
    }
}

#[inline(always)]
fn finish(ctx: &mut TcContext, p: &Packet, xlate: &Tuple) -> i32 {
    if nat::rewrite(ctx, p, xlate).is_err() {
        return drop(p, OUT, drop_reason::REWRITE_FAILED);
    }
    TC_ACT_OK as i32
}

/// A new flow from a container network to a non-container address: from a masquerading
/// network it leaves with the uplink's address; from a network closed to the outside
/// (`routed`) it keeps its address and is tracked so that its replies are let in.
#[inline(always)]
fn masquerade(p: &Packet) -> Result<Option<Tuple>, u32> {
    let Some(src) = NETWORKS.get(Key::new(32, p.saddr)) else { return Ok(None) };
    if NETWORKS.get(Key::new(32, p.daddr)).is_some() {
        return Ok(None);
    }
    let x = if src.flags & net_flags::MASQUERADE != 0 {
        // SAFETY: plain lookup, value copied.
        let Some(addr) = (unsafe { UPLINKS.get(&p.ifindex) }).copied() else { return Ok(None) };
        conntrack::snat_tuple(&p.tuple, addr).ok_or(drop_reason::NAT_PORTS_EXHAUSTED)?
    } else if src.flags & net_flags::DIRECT_ANY == 0 {
        // Closed to direct access: its replies are let back in only as a known flow.
        p.tuple
    } else {
        return Ok(None);
    };
    conntrack::create(&p.tuple, &x, OUT, IN)?;
    Ok(Some(x))
}
