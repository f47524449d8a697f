//! The paths of packets a container sends, at the TC ingress of its veth's host side. Nothing
//! runs on the way in: the kernel's own veth statistics count both directions (the daemon
//! reads them over rtnetlink), so a container costs one program link, not two.

use aya_ebpf::bindings::TC_ACT_OK;
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::programs::TcContext;
use netpath_common::{Backend, EndpointInfo, PortKey, Tuple, drop_reason, hook};

use crate::maps::{NETWORKS, PORTMAP};
use crate::parse::{Packet, parse};
use crate::policy::{self, Reach};
use crate::stats::{drop, drop_policy};
use crate::{conntrack, firewall, icmp, lb, nat, vxlan};

/// The hook these paths act at (conntrack entries, drops).
const HOOK: u8 = hook::FROM_CONTAINER;

/// Sent by a container: source check → known flow (hairpin, or out through an uplink), or
/// internal networks' confinement, isolation, an overlay peer on another node (encapsulated),
/// then a service, a hairpin to a published port or a flow inside the network, the last two
/// past the firewall → rewrite → deliver.
#[inline(always)]
pub fn from_container(ctx: &mut TcContext) -> i32 {
    // Not IPv4: ARP for another node's overlay container is answered here, the rest passes.
    let Some(p) = parse(ctx) else { return vxlan::answer_arp(ctx) };
    let src = policy::source(&p);
    // Only the network id is needed further on (copying the whole endpoint cost a memmove call).
    let src_net = src.as_ref().map(|s| s.net_id);
    if policy::spoofed(src.as_ref(), p.ifindex) {
        return drop(&p, HOOK, drop_reason::SPOOFED_SOURCE);
    }
    // An ICMP error about a flow another node sent here (port unreachable, say): back to it.
    if p.icmp_error && icmp::about(ctx, &p) == Some(hook::TO_NODE) {
        return vxlan::back_to_node(ctx, &p, src_net);
    }
    // A tracked flow was allowed when it started (a hairpin reply may cross networks).
    let known = if p.translatable { conntrack::lookup_any(&p) } else { None };
    let xlate = match known {
        Some((hook::FROM_CONTAINER, x)) => x,
        // A reply to another node's routing mesh or host process: back through the tunnel.
        Some((hook::TO_NODE, _)) => return vxlan::back_to_node(ctx, &p, src_net),
        // Bound for an uplink (a reply of a published flow, a masqueraded flow): translate here
        // and go straight out, or leave it to the stack and the uplink's program.
        Some((hook::UPLINK_OUT, x)) => return nat::forward_to_uplink(ctx, &p, &x),
        _ => {
            conntrack::release_closed_claim(&p);
            if policy::leaves_internal(&p, src.as_ref()) {
                return drop(&p, HOOK, drop_reason::INTERNAL);
            }
            match policy::reach(&p, src.as_ref()) {
                Reach::Free => {}
                Reach::Isolated => return drop(&p, HOOK, drop_reason::ISOLATION),
                Reach::Routed => return routed(&p, src.as_ref()),
            }
            // To another node's container of the sender's overlay: through the tunnel. In a
            // network the firewall guards, the destination's node judges the new flow
            // (`vxlan_in`); it is tracked here too, so that its replies come back as known.
            if let Some((vni, remote)) = vxlan::remote(src_net, p.daddr) {
                if p.translatable
                    && firewall::guarded_destination(&p).is_some()
                    && let Err(reason) = conntrack::create(&p.tuple, &p.tuple, HOOK, HOOK)
                {
                    return drop(&p, HOOK, reason);
                }
                return vxlan::encap(ctx, &p, vni, &remote, HOOK);
            }
            if !p.translatable {
                return within_network(&p, src.as_ref());
            }
            // A service first (a VIP, or a service port published on a host address).
            let on_host = lb::host_addr(p.daddr);
            match lb::choose(&p, lb::Scope::Local, on_host).map(|x| x.and_then(|x| service_flow(&p, src_net, &x))) {
                Some(Ok(x)) => x,
                Some(Err(reason)) => return drop(&p, HOOK, reason),
                None => match published(&p, on_host) {
                    Some(b) => {
                        if let Some(rule) = firewall::denied(&p, b.addr, b.port, src.as_ref()) {
                            return drop_policy(&p, HOOK, rule);
                        }
                        match hairpin(&p, &b) {
                            Ok(x) => x,
                            Err(reason) => return drop(&p, HOOK, reason),
                        }
                    }
                    None => return within_network(&p, src.as_ref()),
                },
            }
        }
    };
    // The routing mesh from a container outside the backend's overlay: the flow leaves from
    // this node's address, routed by this node from the container's network into the tunnel
    // (a hop). Looked up once: a container's every translated packet comes here.
    let mesh = if vxlan::node_ip() == Some(xlate.saddr) && vxlan::remote(src_net, xlate.daddr).is_none() {
        vxlan::remote_of(xlate.daddr)
    } else {
        None
    };
    // A TCP segment that does not fit the tunnel and may not be fragmented is answered before
    // it is translated (ICMP fragmentation needed, quoting it as the container sent it).
    if mesh.is_some()
        && let Some(mtu) = vxlan::too_big(ctx, &p)
    {
        return icmp::frag_needed(ctx, &p, mtu, HOOK);
    }
    if nat::rewrite(ctx, &p, &xlate).is_err() {
        return drop(&p, HOOK, drop_reason::REWRITE_FAILED);
    }
    // A service backend on another node of the sender's overlay: through the tunnel (its
    // replies are translated back where they come out, in vxlan_in).
    if let Some((vni, remote)) = vxlan::remote(src_net, xlate.daddr) {
        return vxlan::encap(ctx, &p, vni, &remote, HOOK);
    }
    if let Some((vni, remote)) = mesh {
        if nat::take_hop(ctx).is_err() {
            return drop(&p, HOOK, drop_reason::REWRITE_FAILED);
        }
        return vxlan::encap(ctx, &p, vni, &remote, HOOK);
    }
    nat::deliver(ctx, &p, xlate.daddr)
}

/// Records a new flow to a service balanced to `x`. A backend on another node of the sender's
/// own overlay keeps the sender's address (the overlay routes the replies back to it); one on
/// another node of an overlay the sender is not on (a service port published on a host
/// address: the routing mesh) is reached from this node's underlay address, its replies
/// translated back in vxlan_in. Replies from a backend here are translated back here.
#[inline(always)]
fn service_flow(p: &Packet, src_net: Option<u32>, x: &Tuple) -> Result<Tuple, u32> {
    let (x, reply_hook) = match vxlan::remote(src_net, x.daddr).is_none() && vxlan::remote_of(x.daddr).is_some() {
        true => (vxlan::from_node(x)?, hook::VXLAN_IN),
        false => (*x, HOOK),
    };
    conntrack::create(&p.tuple, &x, HOOK, reply_hook)?;
    Ok(x)
}

/// The published port `p` targets, if it is addressed to the host (`on_host`: see
/// lb::host_addr, which the caller looked up for services too): first a port published on
/// exactly that address, then one published on every address.
#[inline(always)]
pub fn published(p: &Packet, on_host: bool) -> Option<Backend> {
    if !on_host {
        return None;
    }
    // SAFETY: plain lookups, values copied out.
    unsafe {
        let mut key = PortKey { addr: p.daddr, port: p.tuple.dport, proto: p.tuple.proto, _pad: 0 };
        if let Some(b) = PORTMAP.get(&key) {
            return Some(*b);
        }
        key.addr = 0;
        PORTMAP.get(&key).copied()
    }
}

/// A container reaching a published port through a host address (its own or another
/// container's). When it reaches itself, the source becomes its network's gateway so the
/// reply comes back through the host instead of short-circuiting inside the container.
#[inline(always)]
fn hairpin(p: &Packet, b: &Backend) -> Result<Tuple, u32> {
    let mut xlate = Tuple::new(p.tuple.saddr, b.addr, p.tuple.sport, b.port, p.tuple.proto);
    if p.tuple.saddr == b.addr {
        let gw = NETWORKS.get(Key::new(32, p.tuple.saddr)).map(|n| n.gateway).ok_or(drop_reason::REWRITE_FAILED)?;
        xlate = conntrack::snat_tuple(&xlate, gw).ok_or(drop_reason::NAT_PORTS_EXHAUSTED)?;
    }
    conntrack::create(&p.tuple, &xlate, HOOK, HOOK)?;
    Ok(xlate)
}

/// A new flow to a published port of a container on a `routed` network, by its address:
/// tracked as is so that the replies, from a network isolated from the sender's, pass.
#[inline(always)]
fn routed(p: &Packet, src: Option<&EndpointInfo>) -> i32 {
    if let Some(rule) = firewall::denied(p, p.daddr, p.tuple.dport, src) {
        return drop_policy(p, HOOK, rule);
    }
    if p.translatable
        && let Err(reason) = conntrack::create(&p.tuple, &p.tuple, HOOK, HOOK)
    {
        return drop(p, HOOK, reason);
    }
    TC_ACT_OK as i32
}

/// Anything else a container sends (its own network, the host, the outside): left to the
/// bridge and the stack, unless it goes to a container of its own network that the firewall
/// guards. Such a flow, once allowed, is tracked as is, so that its replies (which may go to
/// a guarded container themselves) are known rather than new.
#[inline(always)]
fn within_network(p: &Packet, src: Option<&EndpointInfo>) -> i32 {
    let Some(net) = firewall::guarded_network(p, src) else { return TC_ACT_OK as i32 };
    if let Some(rule) = firewall::denied_to(p, p.daddr, p.tuple.dport, &net, firewall::From::SameNetwork) {
        return drop_policy(p, HOOK, rule);
    }
    if p.translatable
        && let Err(reason) = conntrack::create(&p.tuple, &p.tuple, HOOK, HOOK)
    {
        return drop(p, HOOK, reason);
    }
    TC_ACT_OK as i32
}
