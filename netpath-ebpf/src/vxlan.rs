//! Overlay networks over VXLAN (RFC 7348) through one external-mode (collect_md) device per
//! host: encapsulation sets the tunnel key (remote node, VNI) on the container's frame and
//! redirects it to the device, which adds the outer headers; decapsulation reads the key the
//! device set on the way in. ARP for other nodes' containers is answered here from the
//! endpoint map, so an overlay never floods broadcasts across nodes.

use aya_ebpf::bindings::{BPF_F_ZERO_CSUM_TX, TC_ACT_OK, bpf_tunnel_key};
use aya_ebpf::helpers::{bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key};
use aya_ebpf::programs::TcContext;
use netpath_common::{OverlayKey, OverlayRemote, drop_reason, hook, overlay_config};

use crate::conntrack;
use crate::maps::{ENDPOINTS, OVERLAY_CONFIG, OVERLAY_LOCAL, OVERLAY_NETS, OVERLAY_REMOTE, OVERLAY_VNIS};
use crate::nat::{self, redirect};
use crate::parse::{ETH_LEN, Packet, parse};
use crate::stats::{drop, drop_unparsed};

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

/// Sends `p` to the other node's container `r` on overlay `vni`: addressed to that container's
/// MAC, handed to the VXLAN device with the tunnel key naming its node.
#[inline(always)]
pub fn encap(ctx: &mut TcContext, p: &Packet, vni: u32, r: &OverlayRemote) -> i32 {
    const HOOK: u8 = hook::FROM_CONTAINER;
    let Some(dev) = OVERLAY_CONFIG.get(overlay_config::VXLAN_IFINDEX).copied().filter(|i| *i != 0) else {
        // An overlay with no device to send through: the daemon removed it, or has not made it yet.
        return drop(p, HOOK, drop_reason::REWRITE_FAILED);
    };
    if set_dst_mac(ctx, &r.mac).is_err() {
        return drop(p, HOOK, drop_reason::REWRITE_FAILED);
    }
    let mut raw = KeySpace::uninit();
    let key = zeroed_key(&mut raw);
    key.tunnel_id = vni;
    // The helper takes the remote address in host byte order.
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be(r.node_ip);
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
        return drop(p, HOOK, drop_reason::REWRITE_FAILED);
    }
    redirect(p, HOOK, dev)
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
    // Only for a container asking with its own address, from its own veth. Two fields read:
    // copying the whole value made LLVM call memmove.
    // SAFETY: plain lookups, values copied out.
    let Some((ep_ifindex, net_id)) =
        (unsafe { ENDPOINTS.get(&u32::from_ne_bytes(sender)) }).map(|e| (e.ifindex, e.net_id))
    else {
        return ok;
    };
    if ep_ifindex != ifindex {
        return ok;
    }
    let Some(vni) = (unsafe { OVERLAY_NETS.get(&net_id) }).copied() else { return ok };
    let key = OverlayKey { vni, addr: u32::from_ne_bytes(target) };
    let Some(r) = (unsafe { OVERLAY_REMOTE.get(&key) }).copied() else { return ok };
    let asker = [f[22], f[23], f[24], f[25], f[26], f[27]];
    let asker_eth = [f[6], f[7], f[8], f[9], f[10], f[11]];
    // Turned into the reply in place (no second copy of the frame on the stack).
    let reply = &mut f;
    put(reply, 0, &asker_eth);
    put(reply, 6, &r.mac);
    put(reply, 20, &ARPOP_REPLY.to_be_bytes());
    put(reply, 22, &r.mac);
    put(reply, 28, &target);
    put(reply, 32, &asker);
    put(reply, 38, &sender);
    if ctx.store(0, reply, 0).is_err() {
        return drop_unparsed(drop_reason::REWRITE_FAILED);
    }
    // Out of the veth it came in on: into the container.
    // SAFETY: helper call with plain arguments.
    if unsafe { aya_ebpf::helpers::bpf_redirect(ifindex, 0) } == i64::from(aya_ebpf::bindings::TC_ACT_REDIRECT) {
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

/// A frame the VXLAN device decapsulated: a VNI this node has → the local container of that
/// overlay it is addressed to (its MAC, straight into its veth). A reply of a flow a local
/// container opened to a service whose backend is on another node gets the address the
/// container used back first, as replies from a local backend do on its veth. Everything
/// else is dropped, never handed to the host stack: an unknown VNI (or no tunnel metadata),
/// and within a known VNI anything that is not IPv4 to one of its containers here (ARP is
/// answered on the sender's node, so none should arrive; another network's address is
/// isolation).
#[inline(always)]
pub fn decap(ctx: &mut TcContext) -> i32 {
    let vni = tunnel_vni(ctx);
    let p = parse(ctx);
    // SAFETY: plain lookup.
    let known = vni.is_some_and(|v| unsafe { OVERLAY_VNIS.get(&v) }.is_some());
    let Some(p) = p else {
        let reason = if known { drop_reason::ISOLATION } else { drop_reason::UNKNOWN_VNI };
        return drop_unparsed(reason);
    };
    let Some(vni) = vni.filter(|_| known) else { return drop(&p, DECAP_HOOK, drop_reason::UNKNOWN_VNI) };
    let reply = match p.translatable {
        true => conntrack::lookup(&p, hook::FROM_CONTAINER),
        false => None,
    };
    let daddr = reply.map_or(p.daddr, |x| x.daddr);
    // SAFETY: plain lookup, value copied out.
    let Some(ep) = (unsafe { OVERLAY_LOCAL.get(&OverlayKey { vni, addr: daddr }) }).copied() else {
        return drop(&p, DECAP_HOOK, drop_reason::ISOLATION);
    };
    if let Some(x) = reply
        && nat::rewrite(ctx, &p, &x).is_err()
    {
        return drop(&p, DECAP_HOOK, drop_reason::REWRITE_FAILED);
    }
    if set_dst_mac(ctx, &ep.mac).is_err() {
        return drop(&p, DECAP_HOOK, drop_reason::REWRITE_FAILED);
    }
    redirect(&p, DECAP_HOOK, ep.ifindex)
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

/// The VNI the VXLAN device received the frame with; None without IPv4 tunnel metadata.
#[inline(always)]
fn tunnel_vni(ctx: &TcContext) -> Option<u32> {
    let mut raw = KeySpace::uninit();
    let key = zeroed_key(&mut raw);
    // SAFETY: helper on the program's own skb with a stack struct of the size given.
    let rc =
        unsafe { bpf_skb_get_tunnel_key(ctx.skb.skb as *mut _, key, core::mem::size_of::<bpf_tunnel_key>() as u32, 0) };
    (rc == 0).then_some(key.tunnel_id)
}
