//! The paths of packets a container sends, at the TC ingress of its veth's host side. Nothing
//! runs on the way in: the kernel's own veth statistics count both directions (the daemon
//! reads them over rtnetlink), so a container costs one program link, not two.

use aya_ebpf::bindings::TC_ACT_OK;
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::programs::TcContext;
use netpath_common::{Backend, PortKey, Tuple, drop_reason, hook};

use crate::maps::{HOST_ADDRS, NETWORKS, PORTMAP};
use crate::parse::{Packet, parse};
use crate::policy::{self, Reach};
use crate::stats::drop;
use crate::{conntrack, lb, nat, vxlan};

/// The hook these paths act at (conntrack entries, drops).
const HOOK: u8 = hook::FROM_CONTAINER;

/// Sent by a container: source check → known flow (hairpin, or out through an uplink), or
/// internal networks' confinement, isolation, an overlay peer on another node (encapsulated),
/// then a service or a hairpin to a published port → rewrite → deliver.
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
    // A tracked flow was allowed when it started (a hairpin reply may cross networks).
    let known = if p.translatable { conntrack::lookup_any(&p) } else { None };
    let xlate = match known {
        Some((hook::FROM_CONTAINER, x)) => x,
        // Bound for an uplink (a reply of a published flow, a masqueraded flow): translate here
        // and go straight out, or leave it to the stack and the uplink's program.
        Some((hook::UPLINK_OUT, x)) => return nat::forward_to_uplink(ctx, &p, &x),
        _ => {
            if policy::leaves_internal(&p, src.as_ref()) {
                return drop(&p, HOOK, drop_reason::INTERNAL);
            }
            match policy::reach(&p, src.as_ref()) {
                Reach::Free => {}
                Reach::Isolated => return drop(&p, HOOK, drop_reason::ISOLATION),
                Reach::Routed => return routed(&p),
            }
            // To another node's container of the sender's overlay: through the tunnel.
            if let Some((vni, remote)) = vxlan::remote(src_net, p.daddr) {
                return vxlan::encap(ctx, &p, vni, &remote);
            }
            if !p.translatable {
                return TC_ACT_OK as i32;
            }
            // A service first (a VIP, or a service port published on a host address).
            match lb::balance(&p, lb::Scope::Local, HOOK, HOOK) {
                Some(Ok(x)) => x,
                Some(Err(reason)) => return drop(&p, HOOK, reason),
                None => match hairpin(&p) {
                    Ok(Some(x)) => x,
                    Ok(None) => return TC_ACT_OK as i32,
                    Err(reason) => return drop(&p, HOOK, reason),
                },
            }
        }
    };
    if nat::rewrite(ctx, &p, &xlate).is_err() {
        return drop(&p, HOOK, drop_reason::REWRITE_FAILED);
    }
    // A service backend on another node of the sender's overlay: through the tunnel (its
    // replies are translated back where they come out, in vxlan_in).
    if let Some((vni, remote)) = vxlan::remote(src_net, xlate.daddr) {
        return vxlan::encap(ctx, &p, vni, &remote);
    }
    nat::deliver(ctx, &p, xlate.daddr)
}

/// The published port `p` targets, if it is addressed to the host: first a port published on
/// exactly that address, then one published on every address.
#[inline(always)]
pub fn published(p: &Packet) -> Option<Backend> {
    // SAFETY: plain lookups, values copied out.
    unsafe {
        HOST_ADDRS.get(&p.daddr)?;
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
fn hairpin(p: &Packet) -> Result<Option<Tuple>, u32> {
    let Some(b) = published(p) else { return Ok(None) };
    let mut xlate = Tuple::new(p.tuple.saddr, b.addr, p.tuple.sport, b.port, p.tuple.proto);
    if p.tuple.saddr == b.addr {
        let gw = NETWORKS.get(Key::new(32, p.tuple.saddr)).map(|n| n.gateway).ok_or(drop_reason::REWRITE_FAILED)?;
        xlate = conntrack::snat_tuple(&xlate, gw).ok_or(drop_reason::NAT_PORTS_EXHAUSTED)?;
    }
    conntrack::create(&p.tuple, &xlate, HOOK, HOOK)?;
    Ok(Some(xlate))
}

/// A new flow to a published port of a container on a `routed` network, by its address:
/// tracked as is so that the replies, from a network isolated from the sender's, pass.
#[inline(always)]
fn routed(p: &Packet) -> i32 {
    if p.translatable
        && let Err(reason) = conntrack::create(&p.tuple, &p.tuple, HOOK, HOOK)
    {
        return drop(p, HOOK, reason);
    }
    TC_ACT_OK as i32
}
