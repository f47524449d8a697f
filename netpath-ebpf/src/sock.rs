//! Host-local access to published ports at the socket layer, as Cilium's socket LB does: a
//! process in the host's namespace connecting (or sending) to 127.0.0.1:PORT or a host
//! address:PORT is pointed at the container before any packet exists, so no proxy and no
//! NAT entry are needed. Only sockets of the daemon's network namespace are touched: the
//! programs sit on the root cgroup, where every process of the machine passes.

use aya_ebpf::bindings::{BPF_ANY, bpf_sock_addr};
use aya_ebpf::helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie};
use aya_ebpf::programs::SockAddrContext;
use netpath_common::{Backend, PortKey, SockRevKey, SockRevValue, config, svc_flags};

use crate::lb;
use crate::maps::{CONFIG, PORTMAP, SOCK_REVNAT};

const ALLOW: i32 = 1;

#[inline(always)]
fn ours(ctx: &SockAddrContext) -> bool {
    let Some(want) = CONFIG.get(config::HOST_NETNS_COOKIE) else { return false };
    // SAFETY: helper on the program's own context.
    *want != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr_mut()) } == *want
}

trait CtxPtr {
    fn as_ptr_mut(&self) -> *mut core::ffi::c_void;
}
impl CtxPtr for SockAddrContext {
    fn as_ptr_mut(&self) -> *mut core::ffi::c_void {
        self.sock_addr.cast()
    }
}

/// The published port a destination names, if it is a host address (or loopback), or the
/// backend of the service it names.
#[inline(always)]
fn lookup(ctx: &SockAddrContext, sa: &bpf_sock_addr) -> Option<Backend> {
    let addr = sa.user_ip4;
    let loopback = addr.to_ne_bytes()[0] == 127;
    let on_host = loopback || lb::host_addr(addr);
    // SAFETY: plain lookups, values copied.
    unsafe {
        if on_host {
            let mut key = PortKey { addr, port: sa.user_port as u16, proto: sa.protocol as u8, _pad: 0 };
            if let Some(b) = PORTMAP.get(&key) {
                return Some(*b);
            }
            key.addr = 0;
            if let Some(b) = PORTMAP.get(&key) {
                return Some(*b);
            }
        }
    }
    // A VIP need not be a known host address yet (the host's addresses are learnt lazily).
    service(ctx, sa, addr, on_host)
}

/// A service VIP or published service port: a backend from its Maglev table, by the socket's
/// cookie (a connected socket or an unconnected UDP socket's datagrams all reach one task),
/// or with client-ip affinity the same for every host process.
#[inline(always)]
fn service(ctx: &SockAddrContext, sa: &bpf_sock_addr, addr: u32, on_host: bool) -> Option<Backend> {
    let port = sa.user_port as u16;
    let svc = lb::lookup(addr, port, sa.protocol as u8, lb::Scope::Local, on_host)?;
    let hash = if svc.flags & svc_flags::AFFINITY_CLIENT_IP != 0 {
        0
    } else {
        // SAFETY: helper on the program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr_mut()) };
        (cookie ^ (cookie >> 32)) as u32
    };
    let t = netpath_common::Tuple::new(hash, 0, 0, 0, 0);
    let backend = lb::pick(&svc, lb::flow_hash(&t, svc_flags::AFFINITY_CLIENT_IP))?;
    let port = if svc.target_port != 0 { svc.target_port } else { port };
    Some(Backend { addr: backend, port, _pad: 0 })
}

/// connect() and sendmsg(): point the socket at the container, remembering what it asked for.
#[inline(always)]
pub fn redirect(ctx: &SockAddrContext) -> i32 {
    if !ours(ctx) {
        return ALLOW;
    }
    // SAFETY: the context pointer is valid for the program run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(b) = lookup(ctx, sa) else { return ALLOW };
    // SAFETY: helper on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr_mut()) };
    let key = SockRevKey { cookie, addr: b.addr, port: b.port, _pad: 0 };
    let orig = SockRevValue { addr: sa.user_ip4, port: sa.user_port as u16, _pad: 0 };
    // Without the reverse entry replies would show the container's address: better not to translate.
    if SOCK_REVNAT.insert(&key, &orig, u64::from(BPF_ANY)).is_err() {
        return ALLOW;
    }
    sa.user_ip4 = b.addr;
    sa.user_port = u32::from(b.port);
    ALLOW
}

/// recvmsg() and getpeername(): show the address the application asked for, not the container's.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext) -> i32 {
    if !ours(ctx) {
        return ALLOW;
    }
    // SAFETY: the context pointer is valid for the program run.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: helper on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr_mut()) };
    let key = SockRevKey { cookie, addr: sa.user_ip4, port: sa.user_port as u16, _pad: 0 };
    // SAFETY: plain lookup, value copied.
    if let Some(orig) = unsafe { SOCK_REVNAT.get(&key) }.copied() {
        sa.user_ip4 = orig.addr;
        sa.user_port = u32::from(orig.port);
    }
    ALLOW
}
