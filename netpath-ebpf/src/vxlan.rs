//! Overlay networks over VXLAN (RFC 7348) through one external-mode (collect_md) device per
//! host: encapsulation sets the tunnel key (remote node, VNI) on the container's frame and
//! redirects it to the device, which adds the outer headers; decapsulation reads the key the
//! device set on the way in. ARP for other nodes' containers is answered here from the
//! endpoint map, so an overlay never floods broadcasts across nodes.
//!
//! Flows that reach another node's container from something that is not a container of its
//! overlay — a client of the routing mesh arriving on an uplink, a host process — leave
//! with this node's underlay address as their source (OVERLAY_CONFIG[NODE_IP]): the far
//! node sees the tunnel's remote end send from that address, tracks the flow as is, and its
//! container's replies (addressed to this node) go back through the tunnel, where
//! `vxlan_in` translates them back (see [`decap`]).

use aya_ebpf::bindings::{
    BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_INGRESS, BPF_F_ZERO_CSUM_TX, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_UNSPEC,
    bpf_adj_room_mode, bpf_check_mtu_ret, bpf_tunnel_key,
};
use aya_ebpf::helpers::{
    bpf_check_mtu, bpf_redirect_peer, bpf_skb_change_type, bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key,
};
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::programs::TcContext;
use netpath_common::{
    OverlayKey, OverlayRemote, Tuple, VXLAN_OVERHEAD, VXLAN_PORT, drop_reason, hook, overlay_config, proto,
};

use crate::maps::{
    ENDPOINTS, HOST_ADDRS, NETWORKS, OVERLAY_CONFIG, OVERLAY_LOCAL, OVERLAY_NETS, OVERLAY_REMOTE, OVERLAY_VNIS,
};
use crate::nat::{self, redirect};
use crate::parse::{ETH_LEN, Packet, parse};
use crate::stats::{drop, drop_policy, drop_unparsed};
use crate::{conntrack, firewall, icmp};

/// The outer header's TTL (the kernel's default for IPv4, IPDEFTTL).
const TUNNEL_TTL: u8 = 64;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IP: u16 = 0x0800;
const ARPOP_REQUEST: u16 = 1;
const ARPOP_REPLY: u16 = 2;
/// An Ethernet frame carrying an ARP packet for IPv4 over Ethernet.
const ARP_FRAME_LEN: usize = ETH_LEN + 28;

/// The other node's container `daddr` is, on the overlay of a local container's network
/// `src_net`: its VNI and where it is. None for everything else (not an overlay sender, or a
/// destination of its network on this node, its gateway, the outside).
#[inline(always)]
pub fn remote(src_net: Option<u32>, daddr: u32) -> Option<(u32, OverlayRemote)> {
    let src_net = src_net?;
    // SAFETY: plain lookups, values copied out.
    unsafe {
        let vni = *OVERLAY_NETS.get(&src_net)?;
        let r = *OVERLAY_REMOTE.get(&OverlayKey { vni, addr: daddr })?;
        Some((vni, r))
    }
}

/// The other node's container `addr` is, found by its subnet among the overlay networks this
/// node has (the routing mesh and host processes have no sender's network to go by): its VNI
/// and where it is. None for an address of no overlay, or of a container here.
#[inline(always)]
pub fn remote_of(addr: u32) -> Option<(u32, OverlayRemote)> {
    let net = NETWORKS.get(Key::new(32, addr))?.net_id;
    remote(Some(net), addr)
}

/// This node's underlay address, if the daemon set it.
#[inline(always)]
pub fn node_ip() -> Option<u32> {
    OVERLAY_CONFIG.get(overlay_config::NODE_IP).copied().filter(|a| *a != 0)
}

/// `x` (a new flow's translation toward another node's container) from this node's underlay
/// address instead, so that the far node's replies come back through the tunnel: the source
/// port is kept unless taken. The sender's address is then lost to the far container (what
/// Docker's ingress sandbox does too); the flow's replies get it back in `vxlan_in`.
#[inline(always)]
pub fn from_node(x: &Tuple) -> Result<Tuple, u32> {
    // No underlay address: the cluster side has not configured this node for the mesh.
    let node = node_ip().ok_or(drop_reason::REWRITE_FAILED)?;
    conntrack::snat_tuple(x, node).ok_or(drop_reason::NAT_PORTS_EXHAUSTED)
}

/// Sends `p` (handled at `hook`) to the other node's container `r` on overlay `vni`:
/// addressed to that container's MAC, handed to the VXLAN device with the tunnel key naming
/// its node.
#[inline(always)]
pub fn encap(ctx: &mut TcContext, p: &Packet, vni: u32, r: &OverlayRemote, hook: u8) -> i32 {
    if set_dst_mac(ctx, &r.mac).is_err() {
        return drop(p, hook, drop_reason::REWRITE_FAILED);
    }
    tunnel(ctx, p, vni, r.node_ip, hook)
}

/// A container's reply to a flow another node sent it from its underlay address (tracked by
/// `vxlan_in` as `hook::TO_NODE`), or an ICMP error about one: back through the tunnel to that
/// node (the packet's destination) on the container's overlay. The inner MACs stay: the node
/// routes the packet on from its own stack's view.
#[inline(always)]
pub fn back_to_node(ctx: &mut TcContext, p: &Packet, src_net: Option<u32>) -> i32 {
    const HOOK: u8 = hook::FROM_CONTAINER;
    // SAFETY: plain lookup, value copied out.
    let Some(vni) = src_net.and_then(|n| unsafe { OVERLAY_NETS.get(&n) }.copied()) else {
        // Not an overlay container (any more): its network was removed under the flow.
        return drop(p, HOOK, drop_reason::ISOLATION);
    };
    tunnel(ctx, p, vni, p.daddr, HOOK)
}

/// The overlay's MTU (the VXLAN device's less [`VXLAN_OVERHEAD`]) when `p`, a TCP segment this
/// node is about to route into the tunnel, does not fit in it and may not be fragmented (DF):
/// its sender must be told (ICMP fragmentation needed), as the kernel's VXLAN device tells
/// it, and sends smaller segments. None when it fits, for GSO packets (whose segments fit:
/// TCP's MSS follows the overlay's MTU, so this is for a sender that ignored it), and for
/// everything but TCP.
///
/// UDP and ICMP are carried whole instead and the device fragments the outer packet (the far
/// node reassembles it before decapsulation). The kernel would answer a DF datagram too, but
/// its sender would then fragment the datagram itself (IP_PMTUDISC_WANT, Linux's default), and
/// netpath translates no IPv4 fragments (the kernel's conntrack reassembles them before its
/// NAT): the answer would turn a datagram that arrives into one that never does.
#[inline(always)]
pub fn too_big(ctx: &TcContext, p: &Packet) -> Option<u16> {
    if p.tuple.proto != proto::TCP {
        return None;
    }
    let dev = OVERLAY_CONFIG.get(overlay_config::VXLAN_IFINDEX).copied().filter(|i| *i != 0)?;
    let mut mtu = 0u32;
    // SAFETY: helper on the program's own skb; mtu 0 checks the packet as it is, grown by
    // the encapsulation.
    let rc = unsafe { bpf_check_mtu(ctx.skb.skb as *mut _, dev, &mut mtu, VXLAN_OVERHEAD as i32, 0) };
    if rc != i64::from(bpf_check_mtu_ret::BPF_MTU_CHK_RET_FRAG_NEEDED) {
        return None;
    }
    let frag = ctx.load::<u8>(ETH_LEN + 6).ok()?;
    (frag & IP_DF != 0).then(|| mtu.saturating_sub(VXLAN_OVERHEAD) as u16)
}

/// IPv4's don't-fragment flag (in the byte at header offset 6).
const IP_DF: u8 = 0x40;

/// Hands `p` to the VXLAN device with the tunnel key (`vni`, `node_ip`).
#[inline(always)]
fn tunnel(ctx: &mut TcContext, p: &Packet, vni: u32, node_ip: u32, hook: u8) -> i32 {
    let Some(dev) = OVERLAY_CONFIG.get(overlay_config::VXLAN_IFINDEX).copied().filter(|i| *i != 0) else {
        // An overlay with no device to send through: the daemon removed it, or has not made it yet.
        return drop(p, hook, drop_reason::REWRITE_FAILED);
    };
    let mut raw = KeySpace::uninit();
    let key = zeroed_key(&mut raw);
    key.tunnel_id = vni;
    // The helper takes the remote address in host byte order.
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be(node_ip);
    key.tunnel_ttl = TUNNEL_TTL;
    // No outer UDP checksum (RFC 7348 says it SHOULD be zero; the inner packet has its own).
    // SAFETY: helper on the program's own skb with a stack struct of the size given.
    let rc = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.skb.skb as *mut _,
            key,
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            u64::from(BPF_F_ZERO_CSUM_TX),
        )
    };
    if rc < 0 {
        return drop(p, hook, drop_reason::REWRITE_FAILED);
    }
    redirect(p, hook, dev)
}

/// Room for a `bpf_tunnel_key`, in u32 words (its alignment).
const KEY_WORDS: usize = core::mem::size_of::<bpf_tunnel_key>() / 4;
const _: () = assert!(core::mem::size_of::<bpf_tunnel_key>() == KEY_WORDS * 4);
type KeySpace = core::mem::MaybeUninit<[u32; KEY_WORDS]>;

/// A tunnel key of zeros in `raw`, written word by word with volatile stores and used in
/// place: LLVM turns plainer zeroing (or a copy of zeros) into a memset call, which the
/// verifier rejects.
#[inline(always)]
fn zeroed_key(raw: &mut KeySpace) -> &mut bpf_tunnel_key {
    let words = raw.as_mut_ptr() as *mut u32;
    for i in 0..KEY_WORDS {
        // SAFETY: in bounds of `raw`, aligned for u32.
        unsafe { words.add(i).write_volatile(0) };
    }
    // SAFETY: zeroed plain integers and unions of them, 4-byte aligned like the struct.
    unsafe { &mut *(words as *mut bpf_tunnel_key) }
}

/// Answers an ARP request a local overlay container sent for another node's container, from
/// OVERLAY_REMOTE: the reply goes straight back into the container and nothing leaves the
/// host. Every other frame continues untouched (ARP for local addresses is the bridge's).
#[inline(always)]
pub fn answer_arp(ctx: &mut TcContext) -> i32 {
    answer_arp_with(ctx, 0, |sender, target, ifindex| {
        // Only for a container asking with its own address, from its own veth. Two fields
        // read: copying the whole value made LLVM call memmove.
        // SAFETY: plain lookups, values copied out.
        let (ep_ifindex, net_id) = (unsafe { ENDPOINTS.get(&sender) }).map(|e| (e.ifindex, e.net_id))?;
        if ep_ifindex != ifindex {
            return None;
        }
        remote(Some(net_id), target).map(|(_, r)| r.mac)
    })
}

/// Answers an ARP request the host sends out of an overlay network's bridge (`overlay_bridge_out`)
/// for another node's container of that overlay: the reply comes back into the bridge as if
/// that container had answered, and nothing is flooded. Every other frame continues untouched.
#[inline(always)]
pub fn answer_host_arp(ctx: &mut TcContext) -> i32 {
    answer_arp_with(ctx, BPF_F_INGRESS as u64, |sender, target, _| {
        // SAFETY: plain lookup.
        unsafe { HOST_ADDRS.get(&sender) }?;
        remote_of(target).map(|(_, r)| r.mac)
    })
}

/// An ARP request (IPv4 over Ethernet) whose (sender address, target address, interface)
/// `answer` knows the MAC of: turned into the reply and sent back where it came from with
/// `flags` (0: out of the interface, into a container; BPF_F_INGRESS: into the host).
#[inline(always)]
fn answer_arp_with(ctx: &mut TcContext, flags: u64, answer: impl FnOnce(u32, u32, u32) -> Option<[u8; 6]>) -> i32 {
    let ok = TC_ACT_OK as i32;
    let Ok(mut f) = ctx.load::<[u8; ARP_FRAME_LEN]>(0) else { return ok };
    // Ethernet + ARP for IPv4 over Ethernet (hardware 1, protocol IPv4, lengths 6 and 4), a request.
    if be16(&f, 12) != ETH_P_ARP
        || be16(&f, 14) != 1
        || be16(&f, 16) != ETH_P_IP
        || f[18] != 6
        || f[19] != 4
        || be16(&f, 20) != ARPOP_REQUEST
    {
        return ok;
    }
    let sender = [f[28], f[29], f[30], f[31]];
    let target = [f[38], f[39], f[40], f[41]];
    // SAFETY: the skb pointer is valid for the program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some(mac) = answer(u32::from_ne_bytes(sender), u32::from_ne_bytes(target), ifindex) else { return ok };
    let asker = [f[22], f[23], f[24], f[25], f[26], f[27]];
    let asker_eth = [f[6], f[7], f[8], f[9], f[10], f[11]];
    // Turned into the reply in place (no second copy of the frame on the stack).
    let reply = &mut f;
    put(reply, 0, &asker_eth);
    put(reply, 6, &mac);
    put(reply, 20, &ARPOP_REPLY.to_be_bytes());
    put(reply, 22, &mac);
    put(reply, 28, &target);
    put(reply, 32, &asker);
    put(reply, 38, &sender);
    if ctx.store(0, reply, 0).is_err() {
        return drop_unparsed(drop_reason::REWRITE_FAILED);
    }
    // SAFETY: helper call with plain arguments.
    if unsafe { aya_ebpf::helpers::bpf_redirect(ifindex, flags) } == i64::from(aya_ebpf::bindings::TC_ACT_REDIRECT) {
        aya_ebpf::bindings::TC_ACT_REDIRECT as i32
    } else {
        drop_unparsed(drop_reason::REWRITE_FAILED)
    }
}

#[inline(always)]
fn be16(f: &[u8; ARP_FRAME_LEN], at: usize) -> u16 {
    u16::from_be_bytes([f[at], f[at + 1]])
}

#[inline(always)]
fn put<const N: usize>(f: &mut [u8; ARP_FRAME_LEN], at: usize, v: &[u8; N]) {
    f[at..at + N].copy_from_slice(v);
}

/// The hook decapsulated packets are handled at (drops, flow events).
const DECAP_HOOK: u8 = hook::VXLAN_IN;

/// A frame the VXLAN device decapsulated: a VNI this node has, then
/// - a reply of a flow this node translated before sending it through the tunnel gets the
///   addresses its opener used back: a local container's flow to a service VIP (tracked at its
///   veth) goes to that container; a routing-mesh flow (tracked at `vxlan_in`) is routed out
///   to its client through the host's FIB (the stack would drop a packet from one of its own
///   addresses); a host process's flow goes up the host's stack. ICMP errors about those
///   flows are translated back the same way;
/// - anything else must be for a local container of that overlay (its MAC, straight into its
///   veth); a new flow the other node sent from its own underlay address (the tunnel's remote
///   end: its routing mesh, its host processes) is tracked as is, so that the container's
///   replies go back through the tunnel (`hook::TO_NODE`) instead of out of the underlay.
///
/// Everything else is dropped, never handed to the host stack: an unknown VNI (or no tunnel
/// metadata), and within a known VNI anything that is not IPv4 to one of its containers here
/// (ARP is answered on the sender's node, so none should arrive; another network's address is
/// isolation).
#[inline(always)]
pub fn decap(ctx: &mut TcContext) -> i32 {
    let key = tunnel_key(ctx);
    decap_frame(ctx, key)
}

/// [`decap`] of the frame at offset 0 that arrived in the tunnel `key` (VNI, the sending
/// node's underlay address), whichever way its outer headers came off: the VXLAN device's
/// receive path, or [`decap_underlay`].
#[inline(always)]
fn decap_frame(ctx: &mut TcContext, key: Option<(u32, u32)>) -> i32 {
    let p = parse(ctx);
    // SAFETY: plain lookup.
    let known = key.is_some_and(|(v, _)| unsafe { OVERLAY_VNIS.get(&v) }.is_some());
    let Some(p) = p else {
        let reason = if known { drop_reason::ISOLATION } else { drop_reason::UNKNOWN_VNI };
        return drop_unparsed(reason);
    };
    let Some((vni, from_node)) = key.filter(|_| known) else {
        return drop(&p, DECAP_HOOK, drop_reason::UNKNOWN_VNI);
    };
    if p.icmp_error {
        return match icmp::translate_reply(ctx, &p) {
            Ok(Some((h, x))) => {
                deliver(ctx, &p, vni, &Tuple::new(x.saddr, x.daddr, 0, 0, proto::ICMP), h == hook::VXLAN_IN)
            }
            Ok(None) => deliver(ctx, &p, vni, &p.tuple, false),
            Err(()) => drop(&p, DECAP_HOOK, drop_reason::REWRITE_FAILED),
        };
    }
    match if p.translatable { conntrack::lookup_any(&p) } else { None } {
        Some((h @ (hook::FROM_CONTAINER | hook::VXLAN_IN), x)) => {
            if nat::rewrite(ctx, &p, &x).is_err() {
                return drop(&p, DECAP_HOOK, drop_reason::REWRITE_FAILED);
            }
            // Only flows this node sent through the tunnel itself may leave for the host or
            // the outside (a VIP's replies are for the local container that opened it).
            deliver(ctx, &p, vni, &x, h == hook::VXLAN_IN)
        }
        _ => {
            // Another node's container opening a flow to one here, on their overlay: the
            // firewall of the destination's network, as for a sender on this node; allowed,
            // the flow is tracked so that its replies are known, not new.
            if p.saddr != from_node
                && let Some(net) = firewall::guarded_destination(&p)
            {
                if let Some(rule) = firewall::denied_to(&p, p.daddr, p.tuple.dport, &net, firewall::From::SameNetwork) {
                    return drop_policy(&p, DECAP_HOOK, rule);
                }
                if p.translatable
                    && let Err(reason) =
                        conntrack::create(&p.tuple, &p.tuple, hook::FROM_CONTAINER, hook::FROM_CONTAINER)
                {
                    return drop(&p, DECAP_HOOK, reason);
                }
            }
            // The other node's own new flow to a container here: tracked as is.
            if p.translatable
                && p.saddr == from_node
                && is_local(vni, p.daddr)
                && let Err(reason) = conntrack::create(&p.tuple, &p.tuple, hook::VXLAN_IN, hook::TO_NODE)
            {
                return drop(&p, DECAP_HOOK, reason);
            }
            deliver(ctx, &p, vni, &p.tuple, false)
        }
    }
}

#[inline(always)]
fn is_local(vni: u32, addr: u32) -> bool {
    // SAFETY: plain lookup.
    unsafe { OVERLAY_LOCAL.get(&OverlayKey { vni, addr }) }.is_some()
}

#[inline(always)]
fn is_host(addr: u32) -> bool {
    // SAFETY: plain lookup.
    unsafe { HOST_ADDRS.get(&addr) }.is_some()
}

/// skb->pkt_type of a frame addressed to this host.
const PACKET_HOST: u32 = 0;

/// Hands a decapsulated packet, already translated to `to`, to the local container of
/// overlay `vni` holding `to.daddr`; with `may_leave` (a flow this node sent through the
/// tunnel), a packet for one of the host's addresses goes up its stack, and one for anywhere
/// else is routed out. Anything else: dropped (isolation).
#[inline(always)]
fn deliver(ctx: &mut TcContext, p: &Packet, vni: u32, to: &Tuple, may_leave: bool) -> i32 {
    // SAFETY: plain lookup, value copied out.
    if let Some(ep) = (unsafe { OVERLAY_LOCAL.get(&OverlayKey { vni, addr: to.daddr }) }).copied() {
        if set_dst_mac(ctx, &ep.mac).is_err() {
            return drop(p, DECAP_HOOK, drop_reason::REWRITE_FAILED);
        }
        return into_container(ctx, p, ep.ifindex);
    }
    if !may_leave {
        return drop(p, DECAP_HOOK, drop_reason::ISOLATION);
    }
    if is_host(to.daddr) {
        // The inner frame is addressed to the far container's gateway, not to this host: the
        // stack takes it as its own once told so. It arrives on the VXLAN device: a strict
        // rp_filter there would refuse its source (routed through the overlay's bridge), a
        // loose one or none does not.
        // SAFETY: helper on the program's own skb.
        if unsafe { bpf_skb_change_type(ctx.skb.skb as *mut _, PACKET_HOST) } != 0 {
            return drop(p, DECAP_HOOK, drop_reason::REWRITE_FAILED);
        }
        return TC_ACT_OK as i32;
    }
    nat::route_out(ctx, p, to, DECAP_HOOK)
}

/// Hands a decapsulated frame (addressed to the container's MAC) straight to the container
/// end of the veth whose host end is `host_veth`: into its namespace's ingress, as if it had
/// arrived there (bpf_redirect_peer, as Cilium delivers to its endpoints). A redirect to the
/// host end's egress instead goes through the veth's transmit and one more trip through the
/// CPU's backlog queue per packet. The frame was classified on the VXLAN device (not addressed
/// to it: PACKET_OTHERHOST) and is not classified again on the way: it is marked for the host
/// it is going to, or the container's IP layer would drop it. Overlay endpoints are always
/// veths in another namespace, which is what the helper needs.
#[inline(always)]
fn into_container(ctx: &mut TcContext, p: &Packet, host_veth: u32) -> i32 {
    // SAFETY: helpers on the program's own skb / with plain arguments.
    unsafe {
        if bpf_skb_change_type(ctx.skb.skb as *mut _, PACKET_HOST) != 0 {
            return drop(p, DECAP_HOOK, drop_reason::REWRITE_FAILED);
        }
        if bpf_redirect_peer(host_veth, 0) == i64::from(TC_ACT_REDIRECT) {
            return TC_ACT_REDIRECT as i32;
        }
    }
    drop(p, DECAP_HOOK, drop_reason::REWRITE_FAILED)
}

/// Addresses the frame to `mac` unless it is already (what the sender's ARP answer made it,
/// nearly always): a write makes the skb writable first, which for a cloned packet (TCP keeps
/// one for retransmission) may mean copying its head.
#[inline(always)]
fn set_dst_mac(ctx: &mut TcContext, mac: &[u8; 6]) -> Result<(), ()> {
    if ctx.load::<[u8; 6]>(0).map_err(|_| ())? == *mac {
        return Ok(());
    }
    ctx.store(0, mac, 0).map_err(|_| ())
}

/// The VNI the VXLAN device received the frame with and the tunnel's remote end (the sending
/// node's underlay address, network byte order); None without IPv4 tunnel metadata.
#[inline(always)]
fn tunnel_key(ctx: &TcContext) -> Option<(u32, u32)> {
    let mut raw = KeySpace::uninit();
    let key = zeroed_key(&mut raw);
    // SAFETY: helper on the program's own skb with a stack struct of the size given.
    let rc =
        unsafe { bpf_skb_get_tunnel_key(ctx.skb.skb as *mut _, key, core::mem::size_of::<bpf_tunnel_key>() as u32, 0) };
    // SAFETY: an IPv4 key: the union holds the remote IPv4 address (host byte order).
    (rc == 0).then(|| (key.tunnel_id, u32::to_be(unsafe { key.__bindgen_anon_1.remote_ipv4 })))
}

/// Offsets in a VXLAN packet as it arrives on the underlay: the outer IPv4 header (no
/// options), UDP, the VXLAN header, the inner Ethernet frame and its IPv4 header.
const OUTER_IP: usize = ETH_LEN;
const OUTER_UDP: usize = OUTER_IP + 20;
const VXLAN_HDR: usize = OUTER_UDP + 8;
const INNER_ETH: usize = VXLAN_HDR + 8;
const INNER_IP: usize = INNER_ETH + ETH_LEN;
// What decapsulation removes after the outer Ethernet header.
const _: () = assert!(INNER_IP - OUTER_IP == VXLAN_OVERHEAD as usize);
/// The VXLAN header's first word with only the I flag (a valid VNI follows), RFC 7348.
const VXLAN_FLAGS_I: u32 = 0x0800_0000;
/// What tcx runs the next program on (or the stack, after the last): "not mine".
const NEXT: i32 = TC_ACT_UNSPEC;

/// TC ingress on the underlay interface, ahead of the VXLAN device: a VXLAN packet for a
/// local container of a known VNI loses its outer headers here (`bpf_skb_adjust_room`) and
/// goes on through [`decap_frame`], the same checks, tracking and delivery as the device's
/// `vxlan_in`, straight into the container: no UDP socket lookup, `vxlan_rcv`, GRO cell,
/// metadata dst allocated and freed per packet, or second pass through the stack.
///
/// Everything else is the device's, untouched: not for this host, outer IPv4 options or
/// fragments (the stack reassembles), a UDP checksum to verify (netpath sends none; the
/// kernel's default is to), VXLAN flags other than a plain VNI, an unknown VNI, anything
/// not IPv4 inside or not for one of this node's containers (the routing mesh's and host
/// processes' replies), and GSO packets: on this kernel the helper leaves their
/// encapsulation marks (SKB_GSO_UDP_TUNNEL) in place (`BPF_F_ADJ_ROOM_DECAP_L4_UDP`, which
/// clears them, is newer), which would break their segmentation if a container routed
/// them on; the device's receive path clears them.
#[inline(always)]
pub fn decap_underlay(ctx: &mut TcContext) -> i32 {
    let Some((vni, from_node, src_mac)) = underlay_vxlan(ctx) else { return NEXT };
    // Drops the outer IPv4, UDP and VXLAN headers and the inner Ethernet header after the
    // outer Ethernet header, whose addresses then become the inner ones. The helper fails
    // before it changes anything (an skb it cannot unclone): the device has it then.
    if ctx
        .adjust_room(-(VXLAN_OVERHEAD as i32), bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, u64::from(BPF_F_ADJ_ROOM_FIXED_GSO))
        .is_err()
    {
        return NEXT;
    }
    // The destination MAC is the container's (set on delivery); the type is IPv4 already.
    if ctx.store(6, &src_mac, 0).is_err() {
        return drop_unparsed(drop_reason::REWRITE_FAILED);
    }
    decap_frame(ctx, Some((vni, from_node)))
}

/// What [`decap_underlay`] takes: a VXLAN packet to this host's port 4789 on a known VNI,
/// IPv4 inside to a local container of that VNI. Its VNI, the sending node's address and the
/// inner source MAC.
#[inline(always)]
fn underlay_vxlan(ctx: &TcContext) -> Option<(u32, u32, [u8; 6])> {
    if u16::from_be(ctx.load::<u16>(12).ok()?) != ETH_P_IP {
        return None;
    }
    // SAFETY: the skb pointer is valid for the program run.
    if unsafe { (*ctx.skb.skb).gso_size } != 0 {
        return None;
    }
    let ip: [u8; 20] = ctx.load(OUTER_IP).ok()?;
    // Version 4, no options; not a fragment (no flag but DF, no offset); UDP.
    if ip[0] != 0x45 || (ip[6] & 0xbf) != 0 || ip[7] != 0 || ip[9] != proto::UDP {
        return None;
    }
    let daddr = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
    if !is_host(daddr) {
        return None;
    }
    let udp: [u16; 4] = ctx.load(OUTER_UDP).ok()?;
    // Destination port, and no checksum to verify.
    if u16::from_be(udp[1]) != VXLAN_PORT || udp[3] != 0 {
        return None;
    }
    let vx: [u32; 2] = ctx.load(VXLAN_HDR).ok()?;
    let word = u32::from_be(vx[1]);
    // Reserved bits zero, as the device requires.
    if u32::from_be(vx[0]) != VXLAN_FLAGS_I || word & 0xff != 0 {
        return None;
    }
    let vni = word >> 8;
    // SAFETY: plain lookups.
    unsafe { OVERLAY_VNIS.get(&vni) }?;
    if u16::from_be(ctx.load::<u16>(INNER_ETH + 12).ok()?) != ETH_P_IP {
        return None;
    }
    let inner_daddr: u32 = ctx.load(INNER_IP + 16).ok()?;
    if !is_local(vni, inner_daddr) {
        return None;
    }
    let src_mac: [u8; 6] = ctx.load(INNER_ETH + 6).ok()?;
    Some((vni, u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]), src_mac))
}

/// The hook host processes' flows to other nodes' containers are translated at.
const BRIDGE_HOOK: u8 = hook::OVERLAY_BRIDGE_OUT;

/// Leaving the host through an overlay network's bridge (TC egress on the bridge): the host's
/// own packets (from one of its addresses) for another node's container of that overlay go
/// through the tunnel from this node's underlay address, since every node's bridge has the
/// same gateway address and the far container's replies to it would stay on its node; they
/// come back through the tunnel and `vxlan_in` hands them up the stack with the address the
/// host used. The host's ARP for such a container is answered here. Everything else (local
/// containers, forwarded traffic) continues into the bridge untouched.
#[inline(always)]
pub fn bridge_out(ctx: &mut TcContext) -> i32 {
    let Some(p) = parse(ctx) else { return answer_host_arp(ctx) };
    if !p.translatable || !is_host(p.saddr) {
        return TC_ACT_OK as i32;
    }
    let xlate = match conntrack::lookup(&p, BRIDGE_HOOK) {
        Some(x) => x,
        None => {
            if remote_of(p.daddr).is_none() {
                return TC_ACT_OK as i32;
            }
            let x = match from_node(&p.tuple) {
                Ok(x) => x,
                Err(reason) => return drop(&p, BRIDGE_HOOK, reason),
            };
            if let Err(reason) = conntrack::create(&p.tuple, &x, BRIDGE_HOOK, hook::VXLAN_IN) {
                return drop(&p, BRIDGE_HOOK, reason);
            }
            x
        }
    };
    let Some((vni, remote)) = remote_of(xlate.daddr) else {
        // The container left the map under a tracked flow: nowhere to send it.
        return drop(&p, BRIDGE_HOOK, drop_reason::ISOLATION);
    };
    if nat::rewrite(ctx, &p, &xlate).is_err() {
        return drop(&p, BRIDGE_HOOK, drop_reason::REWRITE_FAILED);
    }
    encap(ctx, &p, vni, &remote, BRIDGE_HOOK)
}
