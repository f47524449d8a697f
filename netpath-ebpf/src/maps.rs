//! The map catalogue: every map the datapath uses, with who writes it and who reads it.
//! Maps are pinned under the daemon's bpffs dir (at versioned names the daemon chooses, see
//! netpath_common::layout, which must agree with the definitions here) so they outlive a
//! daemon restart. Addresses and ports in keys and values are in network byte order.

use aya_ebpf::macros::map;
use aya_ebpf::maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf};
use netpath_common::{
    Backend, CtEntry, ENDPOINT_NET_SLOTS, EndpointInfo, EndpointNet, FLOW_EVENTS_RING_BYTES, MAGLEV_M, MAX_ENDPOINTS,
    MAX_HOST_ADDRS, MAX_NETWORKS, MAX_OVERLAY_NETS, MAX_OVERLAY_REMOTES, MAX_POLICY_PORTS, MAX_POLICY_SRC,
    MAX_PORTMAPS, MAX_SERVICE_PORTS, MAX_SERVICE_SLOTS, MAX_UPLINKS, NetworkInfo, OverlayKey, OverlayLocal,
    OverlayRemote, PolicyPortKey, PolicySrcKey, PolicyVerdict, PortKey, SOCK_REVNAT_MAX_ENTRIES, ServiceInfo,
    SockRevKey, SockRevValue, Tuple, XdpUplink, config, ct_ports, drop_reason, layout, overlay_config,
};

/// The conntrack table's size. The `upgrade-test` build (a second object the upgrade tests
/// switch to and back) differs here and in CT_STATS, so an upgrade migrates both maps.
#[cfg(not(feature = "upgrade-test"))]
const CT_ENTRIES: u32 = netpath_common::CT_MAX_ENTRIES;
#[cfg(feature = "upgrade-test")]
const CT_ENTRIES: u32 = netpath_common::CT_MAX_ENTRIES / 2;
#[cfg(not(feature = "upgrade-test"))]
pub const CT_STATS_SLOTS: u32 = netpath_common::ct_stat::MAX;
/// One slot more: the variant's programs count the packets they see there.
#[cfg(feature = "upgrade-test")]
pub const CT_STATS_SLOTS: u32 = netpath_common::ct_stat::MAX + 1;

/// Key: container address. Daemon writes on wire/unwire; datapath reads to redirect hairpin
/// traffic to the container's veth and to learn a sender's network.
#[map(name = "ENDPOINTS")]
pub static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(MAX_ENDPOINTS, 0);

/// Key: container subnet (LPM). Daemon writes per bridge network; datapath reads for
/// isolation and to decide what to masquerade.
#[map(name = "NETWORKS")]
pub static NETWORKS: LpmTrie<u32, NetworkInfo> = LpmTrie::pinned(MAX_NETWORKS, 0);

/// Slots (netpath_common::endpoint_net_slot) of container addresses that are none of the
/// host's (ENDPOINTS keys not in HOST_ADDRS), each with the NETWORKS entry covering it, copied.
/// Daemon writes with ENDPOINTS, NETWORKS and HOST_ADDRS (and refills it at every start),
/// through a mapping of the array, the address last; the uplink programs read it to decide a
/// new flow to a container's address from outside (a flood's target) with one array read
/// instead of HOST_ADDRS and the trie. A slot of another address decides nothing: they fall
/// back to both.
#[map(name = "ENDPOINT_NETS")]
pub static ENDPOINT_NETS: Array<EndpointNet> = Array::pinned(ENDPOINT_NET_SLOTS, layout::MMAPABLE);

/// Key: an address of the host (uplinks, bridge gateways). Daemon writes; datapath reads to
/// recognise traffic to published ports.
#[map(name = "HOST_ADDRS")]
pub static HOST_ADDRS: HashMap<u32, u32> = HashMap::pinned(MAX_HOST_ADDRS, 0);

/// Key: uplink ifindex; value: the address masqueraded traffic leaves with. Daemon writes.
#[map(name = "UPLINKS")]
pub static UPLINKS: HashMap<u32, u32> = HashMap::pinned(MAX_UPLINKS, 0);

/// Published ports. Daemon writes on run/rm; datapath reads when a new flow arrives.
#[map(name = "PORTMAP")]
pub static PORTMAP: HashMap<PortKey, Backend> = HashMap::pinned(MAX_PORTMAPS, 0);

/// The container ports published, keyed by container address and port (PortKey's `addr` is
/// the container's): what direct routing may reach on a `routed` network. Daemon writes with
/// PORTMAP; datapath reads when a routed flow arrives from outside.
#[map(name = "PUBLISHED")]
pub static PUBLISHED: HashMap<PortKey, u8> = HashMap::pinned(MAX_PORTMAPS, 0);

/// NAT state, two entries per flow. Datapath creates and refreshes; daemon expires idle
/// entries and flushes a removed container's flows. A preallocated hash, not an LRU: when it
/// is full a new flow is refused (`ct-full`) rather than an established one evicted.
#[map(name = "CT")]
pub static CT: HashMap<Tuple, CtEntry> = HashMap::pinned(CT_ENTRIES, 0);

/// Which (TCP or UDP, destination port) CT keys applying at the uplink's ingress may have, one
/// bit each, and whether those bits are complete (netpath_common::ct_ports). conntrack::create
/// sets a key's bit before inserting it; the daemon sets the bits of what CT holds, then the
/// COMPLETE word, when it cannot vouch for them at start (a new array, a migrated CT); bits are
/// never cleared. The uplink's ingress (uplink_in, uplink_xdp) reads it to skip the CT lookup
/// of a packet that cannot have a flow there (a flood to a closed port). Memory-mapped by the
/// daemon, which sets bits with atomic ORs as the programs do.
#[map(name = "CT_PORTS")]
pub static CT_PORTS: Array<u64> = Array::pinned(ct_ports::MAX, layout::MMAPABLE);

/// Drops by reason (netpath_common::drop_reason). Datapath increments; daemon reports.
#[map(name = "DROPS")]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::pinned(drop_reason::MAX, 0);

/// Conntrack counters and lost flow events (netpath_common::ct_stat). Datapath increments;
/// daemon reports.
#[map(name = "CT_STATS")]
pub static CT_STATS: PerCpuArray<u64> = PerCpuArray::pinned(CT_STATS_SLOTS, 0);

/// Daemon-set settings (netpath_common::config). Daemon writes the namespace cookie at start
/// (socket programs read it) and the flow-events switch as followers come and go (every
/// program that emits flow events reads it first).
#[map(name = "CONFIG")]
pub static CONFIG: Array<u64> = Array::pinned(config::MAX, 0);

/// Sockets whose destination the socket programs translated, so replies and getpeername show
/// the address the application asked for. Socket programs write and read; LRU ages them out.
#[map(name = "SOCK_REVNAT")]
pub static SOCK_REVNAT: LruHashMap<SockRevKey, SockRevValue> = LruHashMap::pinned(SOCK_REVNAT_MAX_ENTRIES, 0);

/// Flow events (netpath_common::FlowEvent records): new flows, first FIN/RST, drops. The
/// programs write only while CONFIG[FLOW_EVENTS] is set; the daemon reads and fans them out
/// to `netpath system flows --follow`.
#[map(name = "FLOW_EVENTS")]
pub static FLOW_EVENTS: RingBuf = RingBuf::pinned(FLOW_EVENTS_RING_BYTES, 0);

#[inline(always)]
pub fn count(map: &PerCpuArray<u64>, idx: u32) {
    if let Some(c) = map.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
}

/// Services: (VIP, port or 0 for every port, protocol) → the VIP's Maglev slot, backend port,
/// backend count and flags. Daemon writes as services and their backends change; datapath
/// reads when a container opens a new flow to a VIP.
#[map(name = "SERVICES")]
pub static SERVICES: HashMap<PortKey, ServiceInfo> = HashMap::pinned(MAX_SERVICE_PORTS, 0);

/// Maglev lookup tables, MAGLEV_M backend addresses per VIP slot (index slot * MAGLEV_M + hash
/// % MAGLEV_M). Daemon writes (a whole slot before its SERVICES entries point at it); datapath
/// reads to pick a new flow's backend.
#[map(name = "MAGLEV")]
pub static MAGLEV: Array<u32> = Array::pinned(MAX_SERVICE_SLOTS * MAGLEV_M, 0);

/// Overlay networks: network id (as in NETWORKS and ENDPOINTS) → VNI. Daemon writes as overlay
/// networks come and go on this node; from_container reads to encapsulate a sender's traffic.
#[map(name = "OVERLAY_NETS")]
pub static OVERLAY_NETS: HashMap<u32, u32> = HashMap::pinned(MAX_OVERLAY_NETS, 0);

/// The same networks the other way round: VNI → network id. Daemon writes with OVERLAY_NETS;
/// vxlan_in reads to drop a VNI this node does not have.
#[map(name = "OVERLAY_VNIS")]
pub static OVERLAY_VNIS: HashMap<u32, u32> = HashMap::pinned(MAX_OVERLAY_NETS, 0);

/// This node's overlay containers by (VNI, address): their veth and MAC. Daemon writes on
/// wire/unwire; vxlan_in reads to deliver a decapsulated packet.
#[map(name = "OVERLAY_LOCAL")]
pub static OVERLAY_LOCAL: HashMap<OverlayKey, OverlayLocal> = HashMap::pinned(MAX_ENDPOINTS, 0);

/// Other nodes' overlay containers by (VNI, address): their node's underlay address and their
/// MAC. Daemon writes from the cluster store; from_container reads to encapsulate and to
/// answer ARP (nothing is flooded to other nodes).
#[map(name = "OVERLAY_REMOTE")]
pub static OVERLAY_REMOTE: HashMap<OverlayKey, OverlayRemote> = HashMap::pinned(MAX_OVERLAY_REMOTES, 0);

/// Overlay settings (netpath_common::overlay_config): the VXLAN device's ifindex. Daemon writes
/// when it makes (or removes) the device; from_container reads to redirect encapsulated packets.
#[map(name = "OVERLAY_CONFIG")]
pub static OVERLAY_CONFIG: Array<u32> = Array::pinned(overlay_config::MAX, 0);

/// Firewall, first stage: (target, source prefix) → rule set (LPM). The daemon writes it when
/// rules, containers with rules or their networks change (compiled in netpath/src/firewall.rs);
/// datapath reads when a new flow to a container arrives (netpath-ebpf/src/firewall.rs).
#[map(name = "POLICY_SRC")]
pub static POLICY_SRC: LpmTrie<PolicySrcKey, u32> = LpmTrie::pinned(MAX_POLICY_SRC, 0);

/// Firewall, second stage: (rule set, protocol, port block) → the best verdict (LPM). Daemon
/// writes a set's entries before POLICY_SRC points at it; datapath reads after POLICY_SRC.
#[map(name = "POLICY_PORTS")]
pub static POLICY_PORTS: LpmTrie<PolicyPortKey, PolicyVerdict> = LpmTrie::pinned(MAX_POLICY_PORTS, 0);

/// Container veths (host side) uplink_xdp may redirect to, keyed by ifindex. Daemon writes with
/// ENDPOINTS; uplink_xdp reads (and redirects through it: the kernel batches the frames).
#[map(name = "XDP_PORTS")]
pub static XDP_PORTS: DevMapHash = DevMapHash::pinned(MAX_ENDPOINTS, 0);

/// The uplinks uplink_xdp is attached to, by ifindex: their MACs. Daemon writes when it
/// attaches XDP to an uplink; uplink_xdp reads to forward only frames addressed to the host.
#[map(name = "XDP_UPLINKS")]
pub static XDP_UPLINKS: HashMap<u32, XdpUplink> = HashMap::pinned(MAX_UPLINKS, 0);
