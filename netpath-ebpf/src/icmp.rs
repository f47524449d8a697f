//! ICMP errors about translated flows (port unreachable, fragmentation needed, TTL exceeded):
//! the quoted packet carries the translated addresses, so the error is translated back like
//! the flow itself — outer address, quoted address and port, and every checksum they touch.
//! The quoted L4 checksum is left alone: only its first 8 bytes travel, and no stack checks it.
//! And the one error netpath sends itself: fragmentation needed, where it routes a packet into
//! the tunnel that does not fit ([`frag_needed`]).

use aya_ebpf::bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_MAC;
use aya_ebpf::helpers::{bpf_skb_adjust_room, bpf_skb_change_tail};
use aya_ebpf::programs::TcContext;
use netpath_common::{Tuple, drop_reason, hook, proto};

use crate::conntrack;
use crate::parse::{ETH_LEN, IP_CSUM, IP_DADDR, IP_SADDR, Packet, Quoted, quoted};
use crate::stats::drop;

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

/// What a "fragmentation needed" error adds in front of the packet's own IPv4 header (which
/// becomes the quoted one): its IPv4 header and the ICMP header.
const FRAG_NEEDED_ROOM: usize = 20 + 8;
/// The error's frame: Ethernet, the added headers, the quoted IPv4 header (no options) and the
/// first 8 bytes after it.
const FRAG_NEEDED_LEN: usize = ETH_LEN + FRAG_NEEDED_ROOM + 28;
const ICMP_FRAG_NEEDED: u8 = 4;
const IPDEFTTL: u8 = 64;

/// Turns `p` (arrived on its interface, too big for the next hop's `mtu` and marked don't
/// fragment) into the ICMP "fragmentation needed" error a router sends for it — from the
/// address it was sent to, quoting its header — and sends that back out of the interface it
/// came in on, to whoever sent it (the source MAC it came from). The sender's stack lowers
/// its path MTU and sends smaller packets. A packet with IPv4 options is dropped instead.
/// Built in place (room made in front of the IPv4 header, the rest cut): the programs that
/// call this have little stack to spare.
#[inline(always)]
pub fn frag_needed(ctx: &mut TcContext, p: &Packet, mtu: u16, hook: u8) -> i32 {
    match build_frag_needed(ctx, p, mtu) {
        Ok(()) => crate::nat::redirect(p, hook, p.ifindex),
        Err(()) => drop(p, hook, drop_reason::REWRITE_FAILED),
    }
}

#[inline(always)]
fn build_frag_needed(ctx: &mut TcContext, p: &Packet, mtu: u16) -> Result<(), ()> {
    if p.l4 != ETH_LEN + 20 {
        return Err(());
    }
    let m = ctx.load::<[u8; 12]>(0).map_err(|_| ())?;
    // SAFETY: helpers on the program's own skb.
    unsafe {
        let skb = ctx.skb.skb as *mut _;
        if bpf_skb_adjust_room(skb, FRAG_NEEDED_ROOM as i32, BPF_ADJ_ROOM_MAC, 0) != 0
            || bpf_skb_change_tail(skb, FRAG_NEEDED_LEN as u32, 0) != 0
        {
            return Err(());
        }
    }
    // Every array below is spelled out in full: LLVM turns zeroed arrays into memset calls,
    // which the verifier rejects.
    // Ethernet back to the sender, from the MAC it sent to.
    let eth = [m[6], m[7], m[8], m[9], m[10], m[11], m[0], m[1], m[2], m[3], m[4], m[5], 0x08, 0x00];
    // IPv4 from the address the packet was for, to its sender.
    let (s, d) = (p.daddr.to_ne_bytes(), p.saddr.to_ne_bytes());
    let len = (FRAG_NEEDED_ROOM + 28) as u16;
    let ttl_proto = u16::from_be_bytes([IPDEFTTL, proto::ICMP]);
    let sum = 0x4500 + u32::from(len) + u32::from(ttl_proto) + sum_addr(s) + sum_addr(d);
    let c = fold(sum).to_be_bytes();
    let l = len.to_be_bytes();
    let ip = [
        0x45,
        0,
        l[0],
        l[1],
        0,
        0,
        0,
        0,
        IPDEFTTL,
        proto::ICMP,
        c[0],
        c[1],
        s[0],
        s[1],
        s[2],
        s[3],
        d[0],
        d[1],
        d[2],
        d[3],
    ];
    // ICMP type 3 code 4 with the next hop's MTU; its checksum covers the quoted bytes too.
    let mut sum = u32::from(u16::from_be_bytes([crate::parse::ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED])) + u32::from(mtu);
    let mut off = ETH_LEN + FRAG_NEEDED_ROOM;
    while off < FRAG_NEEDED_LEN {
        sum += sum_addr(ctx.load::<[u8; 4]>(off).map_err(|_| ())?);
        off += 4;
    }
    let c = fold(sum).to_be_bytes();
    let mt = mtu.to_be_bytes();
    let icmp = [crate::parse::ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, c[0], c[1], 0, 0, mt[0], mt[1]];
    ctx.store(0, &eth, 0).map_err(|_| ())?;
    ctx.store(ETH_LEN, &ip, 0).map_err(|_| ())?;
    ctx.store(ETH_LEN + 20, &icmp, 0).map_err(|_| ())
}

/// The sum of the two big-endian 16-bit words of `w`.
#[inline(always)]
fn sum_addr(w: [u8; 4]) -> u32 {
    u32::from(u16::from_be_bytes([w[0], w[1]])) + u32::from(u16::from_be_bytes([w[2], w[3]]))
}

/// The one's complement of the folded one's-complement sum `sum`.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
