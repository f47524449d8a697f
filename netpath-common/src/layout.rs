//! The layout of every pinned map, versioned. Maps are pinned as `maps/<NAME>.v<rev>` under the
//! daemon's bpffs dir; a daemon only reuses a pin whose kernel-reported layout matches what it
//! loads, and migrates (or, failing that, replaces with a logged reason) any other. The sizes
//! here are literals on purpose: the tests below fail when a key or value type changes size,
//! and the fix is a new revision (plus a converter in the daemon's `datapath/migrate.rs`), not
//! an edited one.

use crate::{
    CT_MAX_ENTRIES, ENDPOINT_NET_SLOTS, FLOW_EVENTS_RING_BYTES, MAGLEV_M, MAX_ENDPOINTS, MAX_HOST_ADDRS, MAX_NETWORKS,
    MAX_OVERLAY_NETS, MAX_OVERLAY_REMOTES, MAX_POLICY_PORTS, MAX_POLICY_SRC, MAX_PORTMAPS, MAX_SERVICE_PORTS,
    MAX_SERVICE_SLOTS, MAX_UPLINKS, SOCK_REVNAT_MAX_ENTRIES, config, ct_ports, ct_stat, drop_reason, map_names as n,
    overlay_config,
};

/// Kernel map types (`enum bpf_map_type`, stable UAPI numbers).
pub mod map_type {
    pub const HASH: u32 = 1;
    pub const ARRAY: u32 = 2;
    pub const PERCPU_HASH: u32 = 5;
    pub const PERCPU_ARRAY: u32 = 6;
    pub const LRU_HASH: u32 = 9;
    pub const LPM_TRIE: u32 = 11;
    /// Keys and values of size 0; `max_entries` is the ring's size in bytes.
    pub const DEVMAP_HASH: u32 = 25;
    pub const RINGBUF: u32 = 27;
}

/// `BPF_F_NO_PREALLOC`: LPM tries require it.
pub const NO_PREALLOC: u32 = 1;
/// `BPF_F_MMAPABLE`: an array the daemon maps into its memory, to set bits atomically beside
/// the programs (an update syscall writes whole values).
pub const MMAPABLE: u32 = 1 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayout {
    pub name: &'static str,
    /// Bumped by hand whenever keys or values change size or meaning. Revision 0 is the
    /// unversioned pins (`<bpffs>/<NAME>`) of builds from before pins were versioned.
    pub rev: u32,
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

const fn map(name: &'static str, rev: u32, map_type: u32, key: u32, value: u32, max: u32, flags: u32) -> MapLayout {
    MapLayout { name, rev, map_type, key_size: key, value_size: value, max_entries: max, flags }
}

use map_type::*;

/// Every map of the datapath, as this build defines it. A map the eBPF object pins must be
/// here (the daemon refuses to load an object with an unlisted one): a new map starts at
/// revision 1.
pub const MAPS: &[MapLayout] = &[
    map(n::ENDPOINTS, 1, HASH, 4, 20, MAX_ENDPOINTS, 0),
    map(n::NETWORKS, 1, LPM_TRIE, 8, 12, MAX_NETWORKS, NO_PREALLOC),
    map(n::HOST_ADDRS, 1, HASH, 4, 4, MAX_HOST_ADDRS, 0),
    map(n::UPLINKS, 1, HASH, 4, 4, MAX_UPLINKS, 0),
    map(n::PORTMAP, 1, HASH, 8, 8, MAX_PORTMAPS, 0),
    map(n::PUBLISHED, 1, HASH, 8, 1, MAX_PORTMAPS, 0),
    // rev 1: a preallocated hash instead of rev 0's LRU (same entries).
    map(n::CT, 1, HASH, 16, 32, CT_MAX_ENTRIES, 0),
    // rev 1: the ct-full slot was added (and since, at the same revision, `internal`,
    // `policy-denied` and `unknown-vni`).
    map(n::DROPS, 1, PERCPU_ARRAY, 4, 8, drop_reason::MAX, 0),
    // Arrays that gained a slot keep their revision: the slots they had keep their meaning,
    // and a migration copies them (CT_STATS: flow-events-lost; CONFIG: flow events on/off).
    map(n::CT_STATS, 1, PERCPU_ARRAY, 4, 8, ct_stat::MAX, 0),
    map(n::CONFIG, 1, ARRAY, 4, 8, config::MAX, 0),
    map(n::SOCK_REVNAT, 1, LRU_HASH, 16, 8, SOCK_REVNAT_MAX_ENTRIES, 0),
    // Records are netpath_common::FlowEvent. A ring holds events in flight, not state: one of
    // another size is replaced, never copied.
    map(n::FLOW_EVENTS, 1, RINGBUF, 0, 0, FLOW_EVENTS_RING_BYTES, 0),
    // Services: (VIP, port, protocol) → ServiceInfo, and every VIP's Maglev table of backend
    // addresses, MAGLEV_M entries per slot.
    map(n::SERVICES, 1, HASH, 8, 12, MAX_SERVICE_PORTS, 0),
    map(n::MAGLEV, 1, ARRAY, 4, 4, MAX_SERVICE_SLOTS * MAGLEV_M, 0),
    // Overlay networks: network id → VNI (encap), VNI → network id (decap), this node's and
    // other nodes' containers by (VNI, address), and the overlay settings (the VXLAN device's
    // ifindex; since, at the same revision, this node's underlay address).
    map(n::OVERLAY_NETS, 1, HASH, 4, 4, MAX_OVERLAY_NETS, 0),
    map(n::OVERLAY_VNIS, 1, HASH, 4, 4, MAX_OVERLAY_NETS, 0),
    map(n::OVERLAY_LOCAL, 1, HASH, 8, 12, MAX_ENDPOINTS, 0),
    map(n::OVERLAY_REMOTE, 1, HASH, 8, 12, MAX_OVERLAY_REMOTES, 0),
    map(n::OVERLAY_CONFIG, 1, ARRAY, 4, 4, overlay_config::MAX, 0),
    // The firewall: (target, source prefix) → rule set, and (rule set, protocol, port block)
    // → verdict; both longest-prefix tries (see crate::policy_target).
    map(n::POLICY_SRC, 1, LPM_TRIE, 16, 4, MAX_POLICY_SRC, NO_PREALLOC),
    map(n::POLICY_PORTS, 1, LPM_TRIE, 12, 12, MAX_POLICY_PORTS, NO_PREALLOC),
    // XDP: container veths uplink_xdp may redirect to (ifindex → struct bpf_devmap_val), and
    // the uplinks it runs on (ifindex → XdpUplink).
    map(n::XDP_PORTS, 1, DEVMAP_HASH, 4, 8, MAX_ENDPOINTS, 0),
    map(n::XDP_UPLINKS, 1, HASH, 4, 8, MAX_UPLINKS, 0),
    // Container address → the NETWORKS entry covering it: an exact-match copy of the trie's
    // answer for the addresses a flood from outside aims at. Derived from ENDPOINTS, NETWORKS
    // and HOST_ADDRS (the daemon refills it at every start), so nothing to migrate from.
    // rev 2: slots of (NetworkInfo, address) by the address's hash, mapped by the daemon (rev
    // 1: a hash by address, replaced, not copied).
    map(n::ENDPOINT_NETS, 2, ARRAY, 4, 16, ENDPOINT_NET_SLOTS, MMAPABLE),
    // Bits of (protocol, destination port) that entries applying at the uplink's ingress may
    // have, and the word saying they are complete (crate::ct_ports). Derived from CT (the
    // daemon refills it when it cannot vouch for it), so nothing to migrate from.
    map(n::CT_PORTS, 1, ARRAY, 4, 8, ct_ports::MAX, MMAPABLE),
];

/// Layouts earlier builds pinned, newest last per map: what a daemon may find and must migrate.
pub const PREVIOUS: &[MapLayout] = &[
    map(n::ENDPOINTS, 0, HASH, 4, 20, MAX_ENDPOINTS, 0),
    map(n::NETWORKS, 0, LPM_TRIE, 8, 12, MAX_NETWORKS, NO_PREALLOC),
    map(n::HOST_ADDRS, 0, HASH, 4, 4, MAX_HOST_ADDRS, 0),
    map(n::UPLINKS, 0, HASH, 4, 4, 64, 0),
    map(n::PORTMAP, 0, HASH, 8, 8, MAX_PORTMAPS, 0),
    map(n::PUBLISHED, 0, HASH, 8, 1, MAX_PORTMAPS, 0),
    map(n::CT, 0, LRU_HASH, 16, 32, 131_072, 0),
    map(n::DROPS, 0, PERCPU_ARRAY, 4, 8, 6, 0),
    map(n::CT_STATS, 0, PERCPU_ARRAY, 4, 8, 2, 0),
    map(n::CONFIG, 0, ARRAY, 4, 8, 1, 0),
    map(n::SOCK_REVNAT, 0, LRU_HASH, 16, 8, 65_536, 0),
    map(n::ENDPOINT_NETS, 1, HASH, 4, 12, MAX_ENDPOINTS, 0),
];

/// Maps earlier builds pinned that this build no longer has. A daemon finding a pin of one, at
/// any revision (under maps/ or an unversioned one), removes it and says so in its log: no
/// program reads it any more, so there is nothing to migrate. A name once here is never
/// reused for another map.
pub const RETIRED: &[&str] = &[
    // Per-endpoint packet and byte counters (revisions 0 and 1: a per-CPU hash, host veth
    // ifindex → 4 × u64), counted by a program on each direction of every container's veth.
    // The kernel counts the same traffic on the veth itself (IFLA_STATS64, read over
    // rtnetlink), which spares every container its second program link.
    "ENDPOINT_STATS",
];

/// The current layout of map `name`.
pub fn current(name: &str) -> Option<&'static MapLayout> {
    MAPS.iter().find(|m| m.name == name)
}

/// Layout revision `rev` of map `name`, current or previous.
pub fn revision(name: &str, rev: u32) -> Option<&'static MapLayout> {
    MAPS.iter().chain(PREVIOUS.iter()).find(|m| m.name == name && m.rev == rev)
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;
    use crate::*;

    fn sizes(name: &str) -> (usize, usize) {
        let l = current(name).unwrap();
        (l.key_size as usize, l.value_size as usize)
    }

    #[test]
    fn every_key_and_value_type_has_the_size_its_layout_revision_says() {
        // A failure here means a shared type changed size: add a revision to MAPS (the old
        // one goes to PREVIOUS) and a converter in netpath/src/datapath/migrate.rs.
        assert_eq!(sizes(n::ENDPOINTS), (size_of::<u32>(), size_of::<EndpointInfo>()));
        // LPM keys: a u32 prefix length, then the u32 address.
        assert_eq!(sizes(n::NETWORKS), (4 + size_of::<u32>(), size_of::<NetworkInfo>()));
        assert_eq!(sizes(n::HOST_ADDRS), (size_of::<u32>(), size_of::<u32>()));
        assert_eq!(sizes(n::UPLINKS), (size_of::<u32>(), size_of::<u32>()));
        assert_eq!(sizes(n::PORTMAP), (size_of::<PortKey>(), size_of::<Backend>()));
        assert_eq!(sizes(n::PUBLISHED), (size_of::<PortKey>(), size_of::<u8>()));
        assert_eq!(sizes(n::CT), (size_of::<Tuple>(), size_of::<CtEntry>()));
        assert_eq!(sizes(n::DROPS), (size_of::<u32>(), size_of::<u64>()));
        assert_eq!(sizes(n::CT_STATS), (size_of::<u32>(), size_of::<u64>()));
        assert_eq!(sizes(n::CONFIG), (size_of::<u32>(), size_of::<u64>()));
        assert_eq!(sizes(n::SOCK_REVNAT), (size_of::<SockRevKey>(), size_of::<SockRevValue>()));
        // A ring buffer has no keys or values; its records are FlowEvents (56 B, asserted in lib.rs).
        assert_eq!(sizes(n::FLOW_EVENTS), (0, 0));
        assert_eq!(sizes(n::SERVICES), (size_of::<PortKey>(), size_of::<ServiceInfo>()));
        assert_eq!(sizes(n::MAGLEV), (size_of::<u32>(), size_of::<u32>()));
        assert_eq!(sizes(n::OVERLAY_NETS), (size_of::<u32>(), size_of::<u32>()));
        assert_eq!(sizes(n::OVERLAY_VNIS), (size_of::<u32>(), size_of::<u32>()));
        assert_eq!(sizes(n::OVERLAY_LOCAL), (size_of::<OverlayKey>(), size_of::<OverlayLocal>()));
        assert_eq!(sizes(n::OVERLAY_REMOTE), (size_of::<OverlayKey>(), size_of::<OverlayRemote>()));
        assert_eq!(sizes(n::OVERLAY_CONFIG), (size_of::<u32>(), size_of::<u32>()));
        assert_eq!(sizes(n::POLICY_SRC), (4 + size_of::<PolicySrcKey>(), size_of::<u32>()));
        assert_eq!(sizes(n::POLICY_PORTS), (4 + size_of::<PolicyPortKey>(), size_of::<PolicyVerdict>()));
        // struct bpf_devmap_val: the ifindex and a program fd/id (unused: 0).
        assert_eq!(sizes(n::XDP_PORTS), (size_of::<u32>(), 8));
        assert_eq!(sizes(n::XDP_UPLINKS), (size_of::<u32>(), size_of::<XdpUplink>()));
        assert_eq!(sizes(n::ENDPOINT_NETS), (size_of::<u32>(), size_of::<EndpointNet>()));
        assert_eq!(sizes(n::CT_PORTS), (size_of::<u32>(), size_of::<u64>()));
    }

    #[test]
    fn maglev_tables_have_a_prime_size() {
        assert!((2..MAGLEV_M).take_while(|d| d * d <= MAGLEV_M).all(|d| !MAGLEV_M.is_multiple_of(d)));
        assert_eq!(current(n::MAGLEV).unwrap().max_entries, MAX_SERVICE_SLOTS * MAGLEV_M);
    }

    #[test]
    fn a_retired_map_has_no_layout_left() {
        for r in RETIRED {
            assert!(MAPS.iter().chain(PREVIOUS.iter()).all(|m| m.name != *r), "{r} is retired but catalogued");
        }
    }

    #[test]
    fn the_event_ring_is_a_power_of_two_number_of_pages() {
        let l = current(n::FLOW_EVENTS).unwrap();
        // The kernel wants a power of two and whole pages (up to 64 KiB on some machines).
        assert!(l.max_entries.is_power_of_two() && l.max_entries >= 64 * 1024, "{}", l.max_entries);
    }

    #[test]
    fn array_lengths_follow_their_index_constants() {
        assert_eq!(current(n::DROPS).unwrap().max_entries, drop_reason::MAX);
        assert_eq!(current(n::CT_STATS).unwrap().max_entries, ct_stat::MAX);
        assert_eq!(current(n::CONFIG).unwrap().max_entries, config::MAX);
        assert_eq!(current(n::OVERLAY_CONFIG).unwrap().max_entries, overlay_config::MAX);
        assert_eq!(current(n::CT_PORTS).unwrap().max_entries, ct_ports::MAX);
    }

    #[test]
    fn every_port_of_tcp_and_udp_has_a_bit_of_its_own_and_icmp_none() {
        let mut seen = std::collections::HashSet::new();
        for proto_nr in [proto::TCP, proto::UDP] {
            for port in 0..=u16::MAX {
                let (word, mask) = ct_ports::bit(proto_nr, port).unwrap();
                assert!(word < ct_ports::BIT_WORDS && mask.count_ones() == 1, "{proto_nr}/{port}");
                assert!(seen.insert((word, mask)), "{proto_nr}/{port} shares a bit");
            }
        }
        assert_eq!(seen.len(), 2 * 65_536);
        assert_eq!(ct_ports::bit(proto::ICMP, 7), None);
        assert_eq!(ct_ports::bit(47, 7), None);
    }

    #[test]
    fn a_revision_names_one_key_and_value_layout() {
        for a in MAPS.iter().chain(PREVIOUS.iter()) {
            for b in MAPS.iter().chain(PREVIOUS.iter()) {
                if a.name == b.name && a.rev == b.rev {
                    assert_eq!((a.key_size, a.value_size), (b.key_size, b.value_size), "{} rev {}", a.name, a.rev);
                }
            }
        }
        for m in MAPS {
            assert!(m.rev >= 1, "{}: revision 0 is reserved for unversioned pins", m.name);
            assert!(PREVIOUS.iter().filter(|p| p.name == m.name).all(|p| p.rev < m.rev), "{}", m.name);
            assert_eq!(MAPS.iter().filter(|o| o.name == m.name).count(), 1, "{}", m.name);
        }
    }
}
