//! Service load balancing: a new flow to a service VIP gets a backend from the VIP's Maglev
//! table (consistent hashing: the daemon builds the tables, see netpath/src/maglev.rs), and
//! conntrack keeps it there; replies get the VIP back as their source.

use aya_ebpf::maps::lpm_trie::Key;
use netpath_common::{MAGLEV_M, PortKey, ServiceInfo, Tuple, drop_reason, svc_flags};

use crate::conntrack;
use crate::maps::{MAGLEV, NETWORKS, SERVICES};
use crate::parse::Packet;

/// The service `p` is addressed to: its exact port first, then the VIP's every-port entry.
#[inline(always)]
fn service(p: &Packet) -> Option<ServiceInfo> {
    let mut key = PortKey { addr: p.tuple.daddr, port: p.tuple.dport, proto: p.tuple.proto, _pad: 0 };
    // SAFETY: plain lookups, values copied.
    unsafe {
        if let Some(s) = SERVICES.get(&key) {
            return Some(*s);
        }
        key.port = 0;
        SERVICES.get(&key).copied()
    }
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

/// A new flow from a container to a service VIP: picks its backend, records the flow (both
/// directions translated at `hook`) and returns the translated tuple. None when `p` is not
/// for a service, or the service has no backend: then the packet goes on to the host, which
/// holds the VIP and refuses the connection (TCP RST, ICMP port unreachable for UDP).
#[inline(always)]
pub fn balance(p: &Packet, hook: u8) -> Option<Result<Tuple, u32>> {
    let svc = service(p)?;
    if svc.backends == 0 {
        return None;
    }
    let idx = svc.slot.wrapping_mul(MAGLEV_M) + flow_hash(&p.tuple, svc.flags) % MAGLEV_M;
    let backend = *MAGLEV.get(idx)?;
    if backend == 0 {
        return None;
    }
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
    Some(conntrack::create(&p.tuple, &xlate, hook, hook).map(|_| xlate))
}
