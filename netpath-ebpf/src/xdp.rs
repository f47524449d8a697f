//! XDP on an uplink (`uplink_xdp`): what the TC ingress path (crate::uplink) would do to a
//! packet, decided by the same code before the kernel builds a socket buffer. Packets of
//! known flows and new connections to published ports bound for a container here are
//! translated and redirected straight to its veth (XDP_REDIRECT through XDP_PORTS); what TC
//! would drop is dropped here, counted under the same reasons at the same hook. Everything
//! else passes unchanged to TC, which then finds the flow already tracked (conntrack is
//! shared): ICMP errors and echo, IP options, frames for another MAC, expiring TTLs, packets
//! over the container link's MTU, packets whose checksum a local stack left to offload (see
//! [`partial_checksum`]), backends on other nodes and `--keep-host-firewall`.

use aya_ebpf::bindings::xdp_action::{XDP_DROP, XDP_PASS};
use aya_ebpf::helpers::bpf_check_mtu;
use aya_ebpf::programs::XdpContext;
use netpath_common::{Tuple, drop_reason, hook, proto};

use crate::frame::Frame;
use crate::maps::{ENDPOINTS, XDP_PORTS, XDP_UPLINKS};
use crate::parse::{ETH_LEN, Packet, parse};
use crate::stats::{count_drop, count_policy_drop};
use crate::uplink::{Verdict, decide};
use crate::{nat, vxlan};

const IN: u8 = hook::UPLINK_IN;

#[inline(always)]
pub fn uplink(ctx: &mut XdpContext) -> u32 {
    let Some(p) = parse(ctx) else { return XDP_PASS };
    // ICMP errors: their quoted packet is translated too (TC's icmp module). IP options: TC.
    if p.icmp_error || p.l4 != ETH_LEN + 20 {
        return XDP_PASS;
    }
    match decide(&p) {
        Verdict::Pass => XDP_PASS,
        Verdict::Drop(reason) => {
            count_drop(&p, IN, reason);
            XDP_DROP
        }
        Verdict::Deny(rule) => {
            count_policy_drop(&p, IN, rule);
            XDP_DROP
        }
        Verdict::Translate(x) => to_endpoint(ctx, &p, &x),
    }
}

/// Translates `p` to `x` and hands it to the container's veth, as TC's
/// nat::forward_to_endpoint would (one hop less, the container's and its gateway's MACs), if
/// nothing calls for the stack; else passes it untouched.
#[inline(always)]
fn to_endpoint(ctx: &mut XdpContext, p: &Packet, x: &Tuple) -> u32 {
    if p.tuple.proto != proto::TCP && p.tuple.proto != proto::UDP {
        return XDP_PASS;
    }
    if nat::keep_host_firewall() || vxlan::remote_of(x.daddr).is_some() {
        return XDP_PASS;
    }
    // SAFETY: plain map lookup; the value is copied out.
    let Some(ep) = (unsafe { ENDPOINTS.get(&x.daddr) }).copied() else { return XDP_PASS };
    if XDP_PORTS.get_ifindex(ep.ifindex).is_none() || !for_this_host(ctx, p.ifindex) {
        return XDP_PASS;
    }
    if partial_checksum(ctx, p) {
        return XDP_PASS;
    }
    let Some(ttl) = nat::ttl_word(ctx) else { return XDP_PASS };
    let mut mtu_len = 0u32;
    // SAFETY: helper on the program's own context; mtu_len 0 checks the frame as it is.
    if unsafe { bpf_check_mtu(ctx.ctx as *mut _, ep.ifindex, &mut mtu_len, 0, 0) } != 0 {
        return XDP_PASS;
    }
    if nat::rewrite(ctx, p, x).is_err() || nat::hop(ctx, ttl).is_err() || nat::set_macs(ctx, &ep).is_err() {
        count_drop(p, IN, drop_reason::REWRITE_FAILED);
        return XDP_DROP;
    }
    match XDP_PORTS.redirect(ep.ifindex, 0) {
        Ok(action) => action,
        Err(_) => {
            count_drop(p, IN, drop_reason::REWRITE_FAILED);
            XDP_DROP
        }
    }
}

/// True when the frame is addressed to the uplink's own MAC (TC: pkt_type PACKET_HOST): a
/// promiscuous uplink also sees other hosts' frames, which are not this host's to forward.
#[inline(always)]
fn for_this_host(ctx: &XdpContext, ifindex: u32) -> bool {
    // SAFETY: plain lookup, value copied.
    let Some(mac) = (unsafe { XDP_UPLINKS.get(&ifindex) }).copied() else { return false };
    ctx.load::<[u8; 6]>(0).is_ok_and(|dst| dst == mac.mac)
}

/// True when the L4 checksum field holds only the pseudo-header's sum: what a stack on this
/// machine leaves there when it sends with checksum offload (CHECKSUM_PARTIAL, kept across a
/// veth), for the device to complete. TC's helpers see that state and update such a field as
/// it must be; XDP sees only the bytes, and a frame redirected as they are would reach the
/// container with a checksum that never gets completed. So these take TC. Frames from a wire
/// carry full checksums, equal to the pseudo-header sum once in 65536 at random: such a
/// frame takes TC too, which costs speed, never correctness.
#[inline(always)]
fn partial_checksum(ctx: &XdpContext, p: &Packet) -> bool {
    let Ok(field) = ctx.load::<u16>(p.csum_off) else { return true };
    // Words as they lie in the packet (network order), read natively like the field.
    let l4_len = (p.end - p.l4) as u16;
    let sum = u64::from(p.saddr & 0xffff)
        + u64::from(p.saddr >> 16)
        + u64::from(p.daddr & 0xffff)
        + u64::from(p.daddr >> 16)
        + u64::from(u16::from_ne_bytes([0, p.tuple.proto]))
        + u64::from(u16::from_ne_bytes(l4_len.to_be_bytes()));
    fold(sum) == field
}

#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}
