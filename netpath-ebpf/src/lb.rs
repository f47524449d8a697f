//! Service load balancing: a new flow to a service VIP (or to a service port published on the
//! host) gets a backend from the VIP's Maglev table (consistent hashing: the daemon builds the
//! tables, see netpath/src/maglev.rs), and conntrack keeps it there; replies get the address
//! the client used back as their source.

use aya_ebpf::maps::lpm_trie::Key;
use netpath_common::{MAGLEV_M, PortKey, ServiceInfo, Tuple, drop_reason, svc_flags};

use crate::conntrack;
use crate::maps::{HOST_ADDRS, MAGLEV, NETWORKS, SERVICES};
use crate::parse::Packet;

/// Which service entries a hook may use.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Containers and host processes: VIPs and published service ports.
    Local,
    /// From outside: published service ports only (a VIP is a container-network address,
    /// closed to direct access like any other).
    Published,
}

/// The service (`addr`, `port`, `proto`) names (all in network byte order): a VIP's exact
/// port, then the VIP's every-port entry, then a service port published on every host
/// address when `on_host`: `addr` is the host's (see [`host_addr`]; or loopback, for host
/// processes). The caller looks that up once: it also decides published container ports.
#[inline(always)]
pub fn lookup(addr: u32, port: u16, proto: u8, scope: Scope, on_host: bool) -> Option<ServiceInfo> {
    let mut key = PortKey { addr, port, proto, _pad: 0 };
    // SAFETY: plain lookups, values copied.
    unsafe {
        if scope == Scope::Local {
            if let Some(s) = SERVICES.get(&key) {
                return Some(*s);
            }
            key.port = 0;
            if let Some(s) = SERVICES.get(&key) {
                return Some(*s);
            }
            key.port = port;
        }
        if !on_host {
            return None;
        }
        key.addr = 0;
        SERVICES.get(&key).copied()
    }
}

/// True when `addr` is one of the host's addresses (uplinks, bridge gateways): the only
/// addresses ports are published on.
#[inline(always)]
pub fn host_addr(addr: u32) -> bool {
    // SAFETY: plain lookup.
    unsafe { HOST_ADDRS.get(&addr) }.is_some()
}

/// murmur3's finaliser: every input bit moves every output bit.
#[inline(always)]
fn mix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The flow's hash: its 5-tuple, or only the client's address with client-ip affinity.
#[inline(always)]
pub fn flow_hash(t: &Tuple, flags: u32) -> u32 {
    let mut h = mix(t.saddr ^ 0x9e37_79b9);
    if flags & svc_flags::AFFINITY_CLIENT_IP == 0 {
        h = mix(h ^ t.daddr);
        h = mix(h ^ ((u32::from(t.sport) << 16) | u32::from(t.dport)));
        h = mix(h ^ u32::from(t.proto));
    }
    h
}

/// The backend address the service's table holds for `hash`; None if it has none.
#[inline(always)]
pub fn pick(svc: &ServiceInfo, hash: u32) -> Option<u32> {
    if svc.backends == 0 {
        return None;
    }
    let idx = svc.slot.wrapping_mul(MAGLEV_M) + hash % MAGLEV_M;
    let backend = *MAGLEV.get(idx)?;
    (backend != 0).then_some(backend)
}

/// A new flow to a service: picks its backend and returns the translated tuple, which the
/// caller records (after the firewall; the routing mesh translates the source too when the
/// backend is on another node). None when `p` is not for a service, or the service has no
/// backend: the packet then goes on to the host, which holds the VIP (or the published
/// address) and refuses (TCP RST, ICMP port unreachable for UDP). `on_host`: see [`lookup`].
#[inline(always)]
pub fn choose(p: &Packet, scope: Scope, on_host: bool) -> Option<Result<Tuple, u32>> {
    let svc = lookup(p.tuple.daddr, p.tuple.dport, p.tuple.proto, scope, on_host)?;
    let backend = pick(&svc, flow_hash(&p.tuple, svc.flags))?;
    let port = if svc.target_port != 0 { svc.target_port } else { p.tuple.dport };
    let mut xlate = Tuple::new(p.tuple.saddr, backend, p.tuple.sport, port, p.tuple.proto);
    // A task reaching its own service: from its gateway, or its reply would never leave it.
    if backend == p.tuple.saddr {
        let Some(net) = NETWORKS.get(Key::new(32, backend)) else { return Some(Err(drop_reason::REWRITE_FAILED)) };
        match conntrack::snat_tuple(&xlate, net.gateway) {
            Some(x) => xlate = x,
            None => return Some(Err(drop_reason::NAT_PORTS_EXHAUSTED)),
        }
    }
    Some(Ok(xlate))
}
