//! netpath's eBPF entry points. Each one is a few lines over the datapath library so every
//! packet path reads as a straight line: parse → conntrack → nat → rewrite → deliver.
#![no_std]
#![no_main]
// Inline assembly on the BPF target: packet loads that LLVM would split into bytes (frame.rs).
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

mod conntrack;
mod container;
mod events;
mod firewall;
mod frame;
mod icmp;
mod lb;
mod maps;
mod nat;
mod parse;
mod policy;
mod sock;
mod stats;
mod uplink;
mod vxlan;
mod xdp;

use aya_ebpf::macros::{cgroup_sock_addr, classifier, xdp};
use aya_ebpf::programs::{SockAddrContext, TcContext, XdpContext};

/// TC ingress on the host side of a container's veth: traffic the container sends.
#[classifier]
pub fn from_container(mut ctx: TcContext) -> i32 {
    container::from_container(&mut ctx)
}

/// TC ingress on an uplink.
#[classifier]
pub fn uplink_in(mut ctx: TcContext) -> i32 {
    uplink::ingress(&mut ctx)
}

/// XDP on an uplink (`netpath daemon --xdp`): ahead of uplink_in, for what it can finish.
#[xdp]
pub fn uplink_xdp(mut ctx: XdpContext) -> u32 {
    xdp::uplink(&mut ctx)
}

/// TC egress on an uplink.
#[classifier]
pub fn uplink_out(mut ctx: TcContext) -> i32 {
    uplink::egress(&mut ctx)
}

/// TC ingress on the host's VXLAN device: overlay traffic from other nodes.
#[classifier]
pub fn vxlan_in(mut ctx: TcContext) -> i32 {
    vxlan::decap(&mut ctx)
}

/// TC ingress on the node's underlay interface: VXLAN for local containers, decapsulated
/// ahead of the VXLAN device (everything else goes on to the next program or the stack).
#[classifier]
pub fn underlay_in(mut ctx: TcContext) -> i32 {
    vxlan::decap_underlay(&mut ctx)
}

/// TC egress on an overlay network's bridge: the host's own packets for other nodes' containers.
#[classifier]
pub fn overlay_bridge_out(mut ctx: TcContext) -> i32 {
    vxlan::bridge_out(&mut ctx)
}

/// connect() of a host process: published ports reached through host addresses or loopback.
#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::redirect(&ctx)
}

/// sendto() of a host process (unconnected UDP).
#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::redirect(&ctx)
}

/// recvfrom() of a host process: the reply appears to come from the address it used.
#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx)
}

/// getpeername() of a host process.
#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
