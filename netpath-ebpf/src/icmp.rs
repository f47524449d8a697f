//! ICMP errors about translated flows (port unreachable, fragmentation needed, TTL exceeded):
//! the quoted packet carries the translated addresses, so the error is translated back like
//! the flow itself — outer address, quoted address and port, and every checksum they touch.
//! The quoted L4 checksum is left alone: only its first 8 bytes travel, and no stack checks it.

use aya_ebpf::programs::TcContext;
use netpath_common::{Tuple, hook, proto};

use crate::conntrack;
use crate::parse::{IP_CSUM, IP_DADDR, IP_SADDR, Packet, Quoted, quoted};

/// Translates an ICMP error crossing `hook` if it quotes a tracked flow. Ok(false): not ours.
#[inline(always)]
pub fn translate(ctx: &mut TcContext, p: &Packet, hook: u8, inbound: bool) -> Result<bool, ()> {
    let Some(q) = quoted(ctx, p) else { return Ok(false) };
    // The quoted packet went the other way: its reverse is the direction this error travels.
    let Some(x) = conntrack::peek(&q.tuple.reversed(), hook) else { return Ok(false) };
    if inbound {
        // We sent the quoted packet from the translated address: give the container's back.
        rewrite_addr(ctx, IP_DADDR, p.tuple.daddr, x.daddr)?;
        rewrite_quoted(ctx, p, &q, q.l3 + 12, q.tuple.saddr, x.daddr, sport_off(&q), q.tuple.sport, x.dport)?;
    } else {
        rewrite_addr(ctx, IP_SADDR, p.tuple.saddr, x.saddr)?;
        rewrite_quoted(ctx, p, &q, q.l3 + 16, q.tuple.daddr, x.saddr, dport_off(&q), q.tuple.dport, x.sport)?;
    }
    Ok(true)
}

/// The hook of the tracked flow the ICMP error `p` is about (the reverse of the packet it
/// quotes), if any.
#[inline(always)]
pub fn about(ctx: &TcContext, p: &Packet) -> Option<u8> {
    let q = quoted(ctx, p)?;
    conntrack::peek_any(&q.tuple.reversed()).map(|(h, _)| h)
}

/// Translates an ICMP error that came out of the tunnel about a flow this node translated both
/// ways before sending it through (a service VIP's, at the container's veth; the routing
/// mesh's and host processes', tracked at `vxlan_in`): the error goes to whoever opened the
/// flow, quoting the packet as they sent it, and comes from the address they sent it to when
/// the far end itself sent it (port unreachable, fragmentation needed from the backend).
/// Returns the hook the flow is tracked at and its reply translation (the error's new
/// destination is its `daddr`); None when the error is about no such flow.
#[inline(always)]
pub fn translate_reply(ctx: &mut TcContext, p: &Packet) -> Result<Option<(u8, Tuple)>, ()> {
    let Some(q) = quoted(ctx, p) else { return Ok(None) };
    let reply = q.tuple.reversed();
    let Some((h, x)) = conntrack::peek_any(&reply) else { return Ok(None) };
    if h != hook::FROM_CONTAINER && h != hook::VXLAN_IN {
        return Ok(None);
    }
    rewrite_addr(ctx, IP_DADDR, p.tuple.daddr, x.daddr)?;
    if p.tuple.saddr == reply.saddr {
        rewrite_addr(ctx, IP_SADDR, p.tuple.saddr, x.saddr)?;
    }
    rewrite_quoted(ctx, p, &q, q.l3 + 12, q.tuple.saddr, x.daddr, sport_off(&q), q.tuple.sport, x.dport)?;
    rewrite_quoted(ctx, p, &q, q.l3 + 16, q.tuple.daddr, x.saddr, dport_off(&q), q.tuple.dport, x.sport)?;
    Ok(Some((h, x)))
}

#[inline(always)]
fn sport_off(q: &Quoted) -> usize {
    if q.tuple.proto == proto::ICMP { q.l4 + 4 } else { q.l4 }
}

#[inline(always)]
fn dport_off(q: &Quoted) -> usize {
    if q.tuple.proto == proto::ICMP { q.l4 + 4 } else { q.l4 + 2 }
}

#[inline(always)]
fn rewrite_addr(ctx: &mut TcContext, off: usize, old: u32, new: u32) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    ctx.store(off, &new, 0).map_err(|_| ())?;
    ctx.l3_csum_replace(IP_CSUM, u64::from(old), u64::from(new), 4).map_err(|_| ())
}

/// Rewrites an address and a port of the quoted packet; the quoted IPv4 checksum and the ICMP
/// checksum (which covers the whole quote) follow.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn rewrite_quoted(
    ctx: &mut TcContext,
    p: &Packet,
    q: &Quoted,
    addr_off: usize,
    old_addr: u32,
    new_addr: u32,
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Result<(), ()> {
    let icmp_csum = p.l4 + 2;
    if old_addr != new_addr {
        let old_csum: u16 = ctx.load(q.l3 + 10).map_err(|_| ())?;
        ctx.store(addr_off, &new_addr, 0).map_err(|_| ())?;
        ctx.l3_csum_replace(q.l3 + 10, u64::from(old_addr), u64::from(new_addr), 4).map_err(|_| ())?;
        let new_csum: u16 = ctx.load(q.l3 + 10).map_err(|_| ())?;
        ctx.l4_csum_replace(icmp_csum, u64::from(old_addr), u64::from(new_addr), 4).map_err(|_| ())?;
        ctx.l4_csum_replace(icmp_csum, u64::from(old_csum), u64::from(new_csum), 2).map_err(|_| ())?;
    }
    if old_port != new_port {
        ctx.store(port_off, &new_port, 0).map_err(|_| ())?;
        ctx.l4_csum_replace(icmp_csum, u64::from(old_port), u64::from(new_port), 2).map_err(|_| ())?;
    }
    Ok(())
}
