//! Packet rewriting: sets a packet's addresses and ports to a translated tuple, fixing the IPv4
//! and L4 checksums incrementally (TC: with the kernel helpers, which also handle checksum
//! offload; XDP: by hand, see crate::frame). Then the ways a translated packet leaves.

use aya_ebpf::bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams};
use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_REDIRECT};
use aya_ebpf::helpers::{bpf_check_mtu, bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh};
use aya_ebpf::programs::TcContext;
use netpath_common::{EndpointInfo, Tuple, config, drop_reason, hook, proto};

use crate::frame::{CSUM_MANGLED_0, CSUM_PSEUDO_HDR, Frame};
use crate::maps::{CONFIG, ENDPOINTS, UPLINKS};
use crate::parse::{ETH_LEN, IP_CSUM, IP_DADDR, IP_SADDR, Packet, dport_off, sport_off};
use crate::stats::drop;

/// Rewrites `p` (parsed from `ctx`) so that it carries `to`.
#[inline(always)]
pub fn rewrite<C: Frame>(ctx: &mut C, p: &Packet, to: &Tuple) -> Result<(), ()> {
    let from = p.tuple;
    // UDP may carry no checksum (0): the helper must leave it at 0, or turn a computed 0 into 0xffff.
    let mangled = if from.proto == proto::UDP { CSUM_MANGLED_0 } else { 0 };
    // The ICMP checksum covers no pseudo-header: address changes do not touch it.
    let l4_addr = from.proto != proto::ICMP;
    if to.saddr != from.saddr {
        set_addr(ctx, p, IP_SADDR, from.saddr, to.saddr, l4_addr, mangled)?;
    }
    if to.daddr != from.daddr {
        set_addr(ctx, p, IP_DADDR, from.daddr, to.daddr, l4_addr, mangled)?;
    }
    if to.sport != from.sport {
        set_port(ctx, p, sport_off(p), from.sport, to.sport, mangled)?;
    }
    if to.dport != from.dport {
        set_port(ctx, p, dport_off(p), from.dport, to.dport, mangled)?;
    }
    Ok(())
}

#[inline(always)]
fn set_addr<C: Frame>(
    ctx: &mut C,
    p: &Packet,
    off: usize,
    old: u32,
    new: u32,
    l4: bool,
    mangled: u64,
) -> Result<(), ()> {
    ctx.store(off, &new)?;
    ctx.l3_csum_replace(IP_CSUM, old, new, 4)?;
    if l4 {
        ctx.l4_csum_replace(p.csum_off, old, new, CSUM_PSEUDO_HDR | mangled | 4)?;
    }
    Ok(())
}

#[inline(always)]
fn set_port<C: Frame>(ctx: &mut C, p: &Packet, off: usize, old: u16, new: u16, mangled: u64) -> Result<(), ()> {
    ctx.store(off, &new)?;
    ctx.l4_csum_replace(p.csum_off, u32::from(old), u32::from(new), mangled | 2)
}

/// Hands a translated packet straight to a local container's veth when its destination is
/// one (hairpin): the host stack would reject a packet from one of its own addresses.
/// Anything else continues through the stack.
#[inline(always)]
pub fn deliver(ctx: &mut TcContext, p: &Packet, daddr: u32) -> i32 {
    // SAFETY: plain map lookup; the value is copied out.
    let Some(ep) = (unsafe { ENDPOINTS.get(&daddr) }).copied() else {
        return TC_ACT_OK as i32;
    };
    if set_macs(ctx, &ep).is_err() {
        return drop(p, hook::FROM_CONTAINER, drop_reason::REWRITE_FAILED);
    }
    redirect(p, hook::FROM_CONTAINER, ep.ifindex)
}

/// skb->pkt_type of a frame addressed to this host's MAC.
const PACKET_HOST: u32 = 0;
/// Offset of the IPv4 TTL (with the protocol, one 16-bit checksum word).
const IP_TTL: usize = ETH_LEN + 8;

/// Forwards a packet arriving on an uplink straight to a local container's veth: what the
/// stack would do (TTL decrement, the container's and its gateway's MACs) without the trip
/// through routing and the bridge. Anything the stack must handle itself continues there:
/// frames not addressed to this host, a TTL about to expire and packets over the container
/// link's MTU (the stack sends the ICMP errors those need).
#[inline(always)]
pub fn forward_to_endpoint(ctx: &mut TcContext, p: &Packet, daddr: u32) -> i32 {
    if keep_host_firewall() {
        return TC_ACT_OK as i32;
    }
    // SAFETY: plain map lookup; the value is copied out.
    let Some(ep) = (unsafe { ENDPOINTS.get(&daddr) }).copied() else {
        return TC_ACT_OK as i32;
    };
    // SAFETY: the skb pointer is valid for the program run.
    if unsafe { (*ctx.skb.skb).pkt_type } != PACKET_HOST {
        return TC_ACT_OK as i32;
    }
    let Some(ttl) = ttl_word(ctx) else { return TC_ACT_OK as i32 };
    let mut mtu_len = 0u32;
    // SAFETY: helper on the program's own skb; mtu_len 0 checks the packet as it is.
    if unsafe { bpf_check_mtu(ctx.skb.skb as *mut _, ep.ifindex, &mut mtu_len, 0, 0) } != 0 {
        return TC_ACT_OK as i32;
    }
    if hop(ctx, ttl).is_err() || set_macs(ctx, &ep).is_err() {
        return drop(p, hook::UPLINK_IN, drop_reason::REWRITE_FAILED);
    }
    redirect(p, hook::UPLINK_IN, ep.ifindex)
}

/// Sends a container's packet of a flow translated at an uplink (`to`: its translation)
/// straight out of the uplink the host routes it to: translated here, one hop less, the
/// next hop's MAC from the FIB. Without a complete route and neighbour entry, or if the route
/// does not leave through an uplink, it continues untouched through the stack, whose uplink
/// program translates it as usual.
#[inline(always)]
pub fn forward_to_uplink(ctx: &mut TcContext, p: &Packet, to: &Tuple) -> i32 {
    if keep_host_firewall() {
        return TC_ACT_OK as i32;
    }
    let Some(ttl) = ttl_word(ctx) else { return TC_ACT_OK as i32 };
    let mut raw = FibSpace::uninit();
    let fib = fib_params(&mut raw, p, to);
    // SAFETY: helper on the program's own skb with a stack struct of the size given. The
    // lookup also checks the route's MTU (GSO-aware).
    let rc = unsafe { bpf_fib_lookup(ctx.skb.skb as *mut _, fib, core::mem::size_of::<FibParams>() as i32, 0) };
    // SAFETY: plain lookup.
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) || unsafe { UPLINKS.get(&fib.ifindex) }.is_none() {
        return TC_ACT_OK as i32;
    }
    if rewrite(ctx, p, to).is_err()
        || hop(ctx, ttl).is_err()
        || Frame::store(ctx, 0, &fib.dmac).is_err()
        || Frame::store(ctx, 6, &fib.smac).is_err()
    {
        return drop(p, hook::FROM_CONTAINER, drop_reason::REWRITE_FAILED);
    }
    redirect(p, hook::FROM_CONTAINER, fib.ifindex)
}

/// Routes a packet already translated to `to` (handled at `hook`) out of whichever interface
/// the host's FIB says, one hop less: the next hop's MAC from the FIB, or resolved by the
/// neighbour subsystem when it has no entry yet. For packets the host stack must not see
/// (their source is one of its own addresses: it would drop them as martians). A forwarding
/// lookup from the interface `p` arrived on: the host must forward (the daemon enables it).
/// No route, an expiring TTL or a packet over the route's MTU: dropped and counted.
#[inline(always)]
pub fn route_out(ctx: &mut TcContext, p: &Packet, to: &Tuple, hook: u8) -> i32 {
    let Some(ttl) = ttl_word(ctx) else { return drop(p, hook, drop_reason::REWRITE_FAILED) };
    let mut raw = FibSpace::uninit();
    let fib = fib_params(&mut raw, p, to);
    // SAFETY: as in forward_to_uplink.
    let rc = unsafe { bpf_fib_lookup(ctx.skb.skb as *mut _, fib, core::mem::size_of::<FibParams>() as i32, 0) };
    let ifindex = fib.ifindex;
    if rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        if hop(ctx, ttl).is_err()
            || Frame::store(ctx, 0, &fib.dmac).is_err()
            || Frame::store(ctx, 6, &fib.smac).is_err()
        {
            return drop(p, hook, drop_reason::REWRITE_FAILED);
        }
        return redirect(p, hook, ifindex);
    }
    if rc != i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) || hop(ctx, ttl).is_err() {
        return drop(p, hook, drop_reason::REWRITE_FAILED);
    }
    // SAFETY: helper with plain arguments; no parameters: it looks the next hop up itself.
    if unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) } == i64::from(TC_ACT_REDIRECT) {
        TC_ACT_REDIRECT as i32
    } else {
        drop(p, hook, drop_reason::REWRITE_FAILED)
    }
}

/// Room for a `bpf_fib_lookup` parameter block, in u64 words (its alignment).
const FIB_WORDS: usize = core::mem::size_of::<FibParams>() / 8;
const _: () = assert!(core::mem::size_of::<FibParams>() == FIB_WORDS * 8);
type FibSpace = core::mem::MaybeUninit<[u64; FIB_WORDS]>;

/// FIB lookup parameters for `to` arriving on `p`'s interface, in `raw`, zeroed word by word
/// with volatile stores: LLVM turns any plainer zeroing of 64 bytes into a memset call,
/// which the verifier rejects.
#[inline(always)]
fn fib_params<'a>(raw: &'a mut FibSpace, p: &Packet, to: &Tuple) -> &'a mut FibParams {
    let words = raw.as_mut_ptr() as *mut u64;
    for i in 0..FIB_WORDS {
        // SAFETY: in bounds of `raw`, aligned for u64.
        unsafe { words.add(i).write_volatile(0) };
    }
    // SAFETY: 64 zeroed bytes, 8-byte aligned: a valid FibParams (plain integers and unions of them).
    let fib = unsafe { &mut *(words as *mut FibParams) };
    fib.family = AF_INET;
    fib.l4_protocol = to.proto;
    fib.sport = to.sport;
    fib.dport = to.dport;
    fib.__bindgen_anon_3.ipv4_src = to.saddr;
    fib.__bindgen_anon_4.ipv4_dst = to.daddr;
    fib.ifindex = p.ifindex;
    fib
}

const AF_INET: u8 = 2;

/// `netpath daemon --keep-host-firewall`: no fast path between uplink and veth, so that
/// forwarded packets cross the host's netfilter FORWARD chain (translated already, as
/// Docker's DOCKER-USER chain sees them).
#[inline(always)]
pub fn keep_host_firewall() -> bool {
    CONFIG.get(config::KEEP_HOST_FIREWALL).is_some_and(|v| *v != 0)
}

/// Addresses a frame to a container as its bridge would: its MAC, from its gateway's.
#[inline(always)]
pub fn set_macs<C: Frame>(ctx: &mut C, ep: &EndpointInfo) -> Result<(), ()> {
    ctx.store(0, &ep.mac)?;
    ctx.store(6, &ep.gw_mac)
}

/// The IPv4 TTL/protocol word, if forwarding may take the TTL down by one (else the stack
/// must handle the packet and send time-exceeded).
#[inline(always)]
pub fn ttl_word<C: Frame>(ctx: &C) -> Option<[u8; 2]> {
    let word = ctx.load::<[u8; 2]>(IP_TTL).ok()?;
    (word[0] > 1).then_some(word)
}

/// Takes one routing hop off the packet's TTL, as the stack forwarding it would; Err when the
/// TTL would expire (1 or 0) or cannot be written.
#[inline(always)]
pub fn take_hop(ctx: &mut TcContext) -> Result<(), ()> {
    hop(ctx, ttl_word(ctx).ok_or(())?)
}

/// Takes the TTL down by one, as forwarding does.
#[inline(always)]
pub fn hop<C: Frame>(ctx: &mut C, word: [u8; 2]) -> Result<(), ()> {
    let old = u16::from_ne_bytes(word);
    let new = u16::from_ne_bytes([word[0] - 1, word[1]]);
    ctx.store(IP_TTL, &new)?;
    ctx.l3_csum_replace(IP_CSUM, u32::from(old), u32::from(new), 2)
}

/// Redirects `p` (being handled at `hook`) to interface `ifindex`.
#[inline(always)]
pub fn redirect(p: &Packet, hook: u8, ifindex: u32) -> i32 {
    // SAFETY: helper call with plain arguments.
    if unsafe { bpf_redirect(ifindex, 0) } == i64::from(TC_ACT_REDIRECT) {
        TC_ACT_REDIRECT as i32
    } else {
        drop(p, hook, drop_reason::REWRITE_FAILED)
    }
}
