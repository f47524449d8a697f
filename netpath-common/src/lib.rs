//! Types shared by the eBPF datapath and the daemon. Everything here is `#[repr(C)]`, has no
//! implicit padding and no `bool`, so both sides agree on the byte layout (checked at compile time).
#![cfg_attr(not(test), no_std)]

pub mod layout;

/// Upper bound on endpoints (container interfaces) one daemon manages; sizes the endpoint maps.
pub const MAX_ENDPOINTS: u32 = 16384;

/// Connection-tracking (NAT) entries, preallocated: a full table refuses new flows (dropped as
/// `ct-full`) and never evicts an established one; the daemon expires idle entries.
pub const CT_MAX_ENTRIES: u32 = 131_072;
/// Bytes of the flow-event ring buffer (a power-of-2 multiple of the page size): 4,096 events
/// of [`FlowEvent`] (56 B + the ring's 8 B header) waiting for the daemon to read them.
pub const FLOW_EVENTS_RING_BYTES: u32 = 256 * 1024;
/// Sockets the socket programs translated (LRU: a socket's entry only matters while it lives).
pub const SOCK_REVNAT_MAX_ENTRIES: u32 = 65_536;
/// Uplinks one daemon can hold.
pub const MAX_UPLINKS: u32 = 64;
/// Published ports (host address, port, protocol) one daemon can hold.
pub const MAX_PORTMAPS: u32 = 65_536;
/// Container networks (subnets) one daemon can hold.
pub const MAX_NETWORKS: u32 = 1024;
/// Addresses of the host (uplinks and bridge gateways).
pub const MAX_HOST_ADDRS: u32 = 1024;
/// Service VIPs (one per service and network) one daemon can hold: each owns a slot of
/// [`MAGLEV_M`] entries in the `MAGLEV` array.
pub const MAX_SERVICE_SLOTS: u32 = 16_384;
/// Service entries (VIP, port, protocol).
pub const MAX_SERVICE_PORTS: u32 = 65_536;
/// Source-prefix entries of the firewall (one per target and distinct source prefix of its
/// rules, see [`PolicySrcKey`]). An LPM trie allocates per entry: the bound costs nothing unused.
pub const MAX_POLICY_SRC: u32 = 65_536;
/// Protocol/port entries of the firewall's compiled rule sets (see [`PolicyPortKey`]).
pub const MAX_POLICY_PORTS: u32 = 262_144;
/// Entries of one service's Maglev lookup table: a prime (Maglev's permutations need it)
/// well above the backends a service has (≥ 10× for 25 backends keeps each within ~4% of
/// its share), and small enough that 16,384 tables of u32 fit in 16 MiB.
pub const MAGLEV_M: u32 = 251;
/// Overlay networks (VNIs) one daemon can hold.
pub const MAX_OVERLAY_NETS: u32 = 1024;
/// Containers of overlay networks on other nodes, across every overlay: the cluster's size,
/// not this host's.
pub const MAX_OVERLAY_REMOTES: u32 = 65_536;
/// The largest VXLAN network identifier: 24 bits on the wire (RFC 7348).
pub const VNI_MAX: u32 = (1 << 24) - 1;

/// Names of the maps as they appear in the object file and under the daemon's bpffs pin dir.
pub mod map_names {
    pub const ENDPOINTS: &str = "ENDPOINTS";
    pub const NETWORKS: &str = "NETWORKS";
    pub const HOST_ADDRS: &str = "HOST_ADDRS";
    pub const UPLINKS: &str = "UPLINKS";
    pub const PORTMAP: &str = "PORTMAP";
    pub const PUBLISHED: &str = "PUBLISHED";
    pub const CT: &str = "CT";
    pub const DROPS: &str = "DROPS";
    pub const CT_STATS: &str = "CT_STATS";
    pub const CONFIG: &str = "CONFIG";
    pub const SOCK_REVNAT: &str = "SOCK_REVNAT";
    pub const FLOW_EVENTS: &str = "FLOW_EVENTS";
    pub const SERVICES: &str = "SERVICES";
    pub const MAGLEV: &str = "MAGLEV";
    pub const OVERLAY_NETS: &str = "OVERLAY_NETS";
    pub const OVERLAY_VNIS: &str = "OVERLAY_VNIS";
    pub const OVERLAY_LOCAL: &str = "OVERLAY_LOCAL";
    pub const OVERLAY_REMOTE: &str = "OVERLAY_REMOTE";
    pub const OVERLAY_CONFIG: &str = "OVERLAY_CONFIG";
    pub const POLICY_SRC: &str = "POLICY_SRC";
    pub const POLICY_PORTS: &str = "POLICY_PORTS";
    pub const XDP_PORTS: &str = "XDP_PORTS";
    pub const XDP_UPLINKS: &str = "XDP_UPLINKS";
    pub const ENDPOINT_NETS: &str = "ENDPOINT_NETS";
    pub const CT_PORTS: &str = "CT_PORTS";
}

/// Slots of the `CONFIG` array.
pub mod config {
    /// Cookie of the network namespace the daemon serves: socket programs act only there.
    pub const HOST_NETNS_COOKIE: u32 = 0;
    /// Non-zero while someone follows flow events (`netpath system flows --follow`): the
    /// programs write [`super::FlowEvent`]s only then, so with nobody listening an event
    /// costs one array lookup.
    pub const FLOW_EVENTS: u32 = 1;
    /// Non-zero with `netpath daemon --keep-host-firewall`: known flows leave the fast paths
    /// (no bpf_redirect between uplink and veth) and cross the kernel's forwarding path, so the
    /// host's own netfilter FORWARD rules see them.
    pub const KEEP_HOST_FIREWALL: u32 = 2;
    pub const MAX: u32 = 3;
}

/// What VXLAN over IPv4 adds to a frame: outer IPv4 (20), UDP (8), VXLAN (8) and the inner
/// Ethernet header (14). Overlay interfaces get the underlay's MTU minus this, and the
/// programs answer a packet bigger than that, that may not be fragmented, with ICMP.
pub const VXLAN_OVERHEAD: u32 = 50;
/// VXLAN's IANA port (RFC 7348), the one the overlay's device listens on.
pub const VXLAN_PORT: u16 = 4789;

/// Slots of the `OVERLAY_CONFIG` array.
pub mod overlay_config {
    /// Ifindex of the host's VXLAN device (external mode), where encapsulated packets are
    /// redirected; 0 while there is none.
    pub const VXLAN_IFINDEX: u32 = 0;
    /// This node's underlay address (network byte order; 0 while unset): the source the
    /// routing mesh and host processes reaching other nodes' containers are translated to,
    /// so the far node's replies come back through the tunnel. The slot was added after
    /// the first: the array keeps its revision (a migration copies slot 0).
    pub const NODE_IP: u32 = 1;
    pub const MAX: u32 = 2;
}

/// Names of the programs in the object file.
pub mod prog_names {
    /// TC ingress on the host side of a container's veth: packets the container sent.
    pub const FROM_CONTAINER: &str = "from_container";
    /// TC ingress on an uplink: published ports (DNAT), replies to masqueraded flows.
    pub const UPLINK_IN: &str = "uplink_in";
    /// TC egress on an uplink: masquerade (SNAT), replies of published-port flows.
    pub const UPLINK_OUT: &str = "uplink_out";
    /// cgroup sock_addr hooks: host processes reaching published ports (no proxy).
    pub const SOCK_CONNECT4: &str = "sock_connect4";
    pub const SOCK_SENDMSG4: &str = "sock_sendmsg4";
    pub const SOCK_RECVMSG4: &str = "sock_recvmsg4";
    pub const SOCK_GETPEERNAME4: &str = "sock_getpeername4";
    pub const SOCK: [&str; 4] = [SOCK_CONNECT4, SOCK_SENDMSG4, SOCK_RECVMSG4, SOCK_GETPEERNAME4];
    /// TC ingress on the host's VXLAN device: decapsulated overlay traffic for local containers.
    pub const VXLAN_IN: &str = "vxlan_in";
    /// TC ingress on the node's underlay interface, first of its programs: VXLAN packets for
    /// local containers decapsulated ahead of the VXLAN device (the rest goes on untouched).
    pub const UNDERLAY_IN: &str = "underlay_in";
    /// TC egress on an overlay network's bridge: the host's own packets (and ARP) for that
    /// overlay's containers on other nodes.
    pub const OVERLAY_BRIDGE_OUT: &str = "overlay_bridge_out";
    /// XDP on an uplink (`netpath daemon --xdp`): uplink_in's work for what it can finish
    /// before the stack (redirect to a container's veth, drops); the rest passes to uplink_in.
    pub const UPLINK_XDP: &str = "uplink_xdp";
}

/// IP protocol numbers the datapath translates.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}

/// Why the datapath dropped a packet: the index into the per-CPU `DROPS` counters.
pub mod drop_reason {
    /// Between containers of different networks (Docker's inter-network isolation).
    pub const ISOLATION: u32 = 0;
    /// No free source port for a masqueraded flow.
    pub const NAT_PORTS_EXHAUSTED: u32 = 1;
    /// The NAT table refused a new entry.
    pub const CT_INSERT_FAILED: u32 = 2;
    /// A packet rewrite or redirect helper failed.
    pub const REWRITE_FAILED: u32 = 3;
    /// From outside straight to a container address its network's gateway mode does not open
    /// (Docker's protection of unpublished ports from direct routing).
    pub const DIRECT_ACCESS: u32 = 4;
    /// Sent from a container's veth with the address of another container: a container could
    /// otherwise slip past isolation or take over another's flows.
    pub const SPOOFED_SOURCE: u32 = 5;
    /// A new flow found the conntrack table full (established flows keep their entries).
    pub const CT_FULL: u32 = 6;
    /// From a container of an `--internal` network to anything outside that network, or from
    /// outside to one of its containers: internal networks have no way out and none in.
    pub const INTERNAL: u32 = 7;
    /// A new flow a firewall rule denies (`netpath firewall`, `run --ingress-allow`, a network's
    /// `netpath.default_deny`); the flow event names the rule.
    pub const POLICY_DENIED: u32 = 8;
    /// A VXLAN packet whose VNI no overlay network of this host has (or with no tunnel
    /// metadata at all).
    pub const UNKNOWN_VNI: u32 = 9;
    pub const MAX: u32 = 10;
    pub const NAMES: [&str; MAX as usize] = [
        "isolation",
        "nat-ports-exhausted",
        "ct-insert-failed",
        "rewrite-failed",
        "direct-access",
        "spoofed-source",
        "ct-full",
        "internal",
        "policy-denied",
        "unknown-vni",
    ];
}

/// Connection-tracking counters: the index into the per-CPU `CT_STATS` array.
pub mod ct_stat {
    /// Flows created (each creates two entries, one per direction).
    pub const CREATED: u32 = 0;
    /// Masquerade source-port collisions that needed another port.
    pub const PORT_RETRIES: u32 = 1;
    /// Flow events the datapath could not write because the ring buffer was full (the
    /// daemon reads too slowly): followers are told how many they missed.
    pub const EVENTS_LOST: u32 = 2;
    pub const MAX: u32 = 3;
    pub const NAMES: [&str; MAX as usize] = ["flows-created", "port-retries", "flow-events-lost"];
}

/// Which hook applies a conntrack entry: the same tuple is seen at several hooks (a
/// masqueraded packet crosses its container's veth before the uplink) and only one rewrites.
pub mod hook {
    pub const UPLINK_IN: u8 = 1;
    pub const UPLINK_OUT: u8 = 2;
    pub const FROM_CONTAINER: u8 = 3;
    /// Decapsulated overlay traffic on the VXLAN device: replies of flows this node sent to
    /// another node translated (routing mesh, host processes), and the flows another node
    /// sent from its own underlay address tracked.
    pub const VXLAN_IN: u8 = 4;
    /// A container's reply to a flow another node sent it from that node's underlay address
    /// (routing mesh, host processes there): applied at the container's veth, untranslated,
    /// and back through the tunnel to that node (the entry's destination).
    pub const TO_NODE: u8 = 5;
    /// TC egress on an overlay bridge: a host process's flow to another node's container.
    pub const OVERLAY_BRIDGE_OUT: u8 = 6;

    /// The name views and flow events show for a hook (None: not a hook).
    pub const fn name(h: u8) -> Option<&'static str> {
        match h {
            UPLINK_IN => Some("uplink-in"),
            UPLINK_OUT => Some("uplink-out"),
            FROM_CONTAINER => Some("from-container"),
            VXLAN_IN => Some("vxlan-in"),
            TO_NODE => Some("to-node"),
            OVERLAY_BRIDGE_OUT => Some("overlay-bridge-out"),
            _ => None,
        }
    }
}

/// The `CT_PORTS` array: a negative filter in front of the conntrack lookup of packets arriving
/// from outside. One bit per TCP and per UDP destination port says whether a conntrack entry
/// that applies at the uplink's ingress ([`hook::UPLINK_IN`]) may have that protocol and
/// destination port in its key; a clear bit (in a complete array) means none has, so the
/// lookup would miss. ICMP and other protocols have no bit: always looked up.
pub mod ct_ports {
    use super::proto;

    /// Words of bits: 2 protocols × 65,536 ports.
    pub const BIT_WORDS: u32 = 2 * 65_536 / 64;
    /// The word after the bits: non-zero once they cover every entry the table holds. Zero (a
    /// new array, or while the daemon refills it at start) makes the programs look every
    /// packet up.
    pub const COMPLETE: u32 = BIT_WORDS;
    pub const MAX: u32 = BIT_WORDS + 1;

    /// The word and bit mask of (protocol, destination port) — the port as the key holds it,
    /// in network byte order — or None for a protocol without ports.
    #[inline(always)]
    pub const fn bit(proto_nr: u8, dport: u16) -> Option<(u32, u64)> {
        let base = match proto_nr {
            proto::TCP => 0,
            proto::UDP => 65_536,
            _ => return None,
        };
        let n = base + dport as u32;
        Some((n / 64, 1 << (n % 64)))
    }
}

/// TCP progress of a conntrack entry; decides its idle timeout.
pub mod ct_state {
    pub const NEW: u8 = 0;
    /// A packet was seen in the reply direction.
    pub const ESTABLISHED: u8 = 1;
    /// FIN or RST seen.
    pub const CLOSING: u8 = 2;
}

/// Kinds of [`FlowEvent`].
pub mod flow_event {
    /// A flow was tracked (where conntrack created its entries): `orig` as it arrived,
    /// `xlate` as it leaves, `hook` where the translation applies.
    pub const NEW: u8 = 1;
    /// The first TCP FIN or RST of a tracked flow (either direction), reported once.
    pub const CLOSED: u8 = 2;
    /// A dropped packet: `orig` is its tuple, `reason` a `drop_reason`.
    pub const DROP: u8 = 3;
    /// Written by the daemon only: its idle-timeout sweep removed the flow.
    pub const EXPIRED: u8 = 4;
}

/// One record of the `FLOW_EVENTS` ring buffer. Tuples as in [`Tuple`] (network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// bpf_ktime_get_ns() when it happened (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// The flow's tuple as it arrived (for a drop: the dropped packet's).
    pub orig: Tuple,
    /// The tuple it leaves with (NEW, CLOSED); zero for a drop.
    pub xlate: Tuple,
    /// `drop_reason` of a DROP; 0 otherwise.
    pub reason: u32,
    /// The interface a packet was dropped on; 0 for other kinds.
    pub ifindex: u32,
    /// `flow_event::*`.
    pub kind: u8,
    /// `hook::*` where the flow is translated (NEW, CLOSED) or the packet dropped (DROP).
    pub hook: u8,
    /// 1 when the tuples' ports are meaningful (a translatable packet); a dropped fragment,
    /// say, has addresses and protocol only.
    pub ports: u8,
    pub _pad1: u8,
    /// The firewall rule of a `policy-denied` DROP (see [`policy_rule`]); 0 otherwise.
    pub rule: u32,
}

/// A flow in one direction. Addresses and ports are kept as on the wire (network byte order),
/// so the datapath never swaps bytes. For ICMP echo, the identifier stands in for a port:
/// `sport` on requests, `dport` on replies, so a reply's tuple is the request's reversed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    // Padding as scalars, not byte arrays: zeroing an array makes LLVM call memset, which
    // the eBPF verifier cannot take.
    pub _pad1: u8,
    pub _pad2: u16,
}

impl Tuple {
    pub const fn new(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> Self {
        Self { saddr, daddr, sport, dport, proto, _pad1: 0, _pad2: 0 }
    }
    /// The same flow seen from the other end.
    pub const fn reversed(&self) -> Self {
        Self::new(self.daddr, self.saddr, self.dport, self.sport, self.proto)
    }
}

/// A NAT entry: packets matching the key at `hook` leave with the tuple `xlate`. Every flow has
/// two entries, one per direction; each one's partner is keyed by `xlate.reversed()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    pub xlate: Tuple,
    /// bpf_ktime_get_ns() of the last packet (CLOCK_MONOTONIC).
    pub last_seen_ns: u64,
    pub hook: u8,
    pub state: u8,
    /// Set on the entry created for the reply direction.
    pub is_reply: u8,
    pub _pad1: u8,
    pub _pad2: u32,
}

/// Where a published port leads. Key: [`PortKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// A published port: host address (0 = every host address), port, protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// A service on one VIP. Key: [`PortKey`] (VIP, port, protocol; port 0: every port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Its Maglev table: entries `slot * MAGLEV_M ..` of `MAGLEV`.
    pub slot: u32,
    /// The backends' port (network byte order); 0 keeps the port the client asked for.
    pub target_port: u16,
    /// How many backends the table spreads over; 0: none (the host refuses the connection).
    pub backends: u16,
    /// `svc_flags::*`.
    pub flags: u32,
}

/// Flags of a [`ServiceInfo`].
pub mod svc_flags {
    /// Pick the backend by the client's address alone (`--affinity client-ip`).
    pub const AFFINITY_CLIENT_IP: u32 = 1;
}

/// A container address. Key: the address (network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Host side of its veth: where packets for it are redirected.
    pub ifindex: u32,
    pub net_id: u32,
    pub mac: [u8; 6],
    /// Its gateway's MAC (the bridge's): the source of frames netpath hands it directly.
    pub gw_mac: [u8; 6],
}

/// An uplink `uplink_xdp` runs on. Key: its ifindex.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpUplink {
    /// Its MAC: only frames addressed to it are the host's to forward (TC: PACKET_HOST).
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// A container network, found by longest-prefix match on an address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetworkInfo {
    pub net_id: u32,
    /// The host's address on this network (network byte order).
    pub gateway: u32,
    pub flags: u32,
}

/// An ENDPOINT_NETS slot: a container address and the NETWORKS entry covering it; all zeros
/// when free. The daemon writes the address last and clears it first (see
/// netpath/src/datapath/endpoint_nets.rs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointNet {
    pub net: NetworkInfo,
    /// Network byte order.
    pub addr: u32,
}

/// Slots of ENDPOINT_NETS (a power of two): one per endpoint this daemon may have.
pub const ENDPOINT_NET_SLOTS: u32 = MAX_ENDPOINTS;
const _: () = assert!(ENDPOINT_NET_SLOTS.is_power_of_two());

/// The ENDPOINT_NETS slot of container address `addr` (wire order): Fibonacci hashing, whose
/// top bits depend on every bit of the address (a subnet's addresses differ in their last
/// byte, the top of the native u32 here, and networks in their third).
#[inline(always)]
pub const fn endpoint_net_slot(addr: u32) -> u32 {
    addr.wrapping_mul(0x9E37_79B1) >> (32 - ENDPOINT_NET_SLOTS.trailing_zeros())
}

/// A socket's view of a translated destination: which socket, and the backend it now talks to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    pub cookie: u64,
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// The destination the application asked for, shown back to it (recvmsg, getpeername).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevValue {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// How a network meets the outside (Docker's gateway modes): `nat` is MASQUERADE alone (no
/// direct access from outside), `nat-unprotected` adds DIRECT_ANY, `routed` is DIRECT_PUBLISHED.
pub mod net_flags {
    /// Traffic from this network to the outside leaves with the uplink's address.
    pub const MASQUERADE: u32 = 1;
    /// Outside hosts routing to the subnet reach every port of its containers.
    pub const DIRECT_ANY: u32 = 2;
    /// Outside hosts routing to the subnet reach published container ports (and ICMP).
    pub const DIRECT_PUBLISHED: u32 = 4;
    /// `--internal`: containers reach their own network only (and nothing reaches them from
    /// outside it). Bits an older build does not know are ignored by its programs, and an
    /// entry written before them has none: the NETWORKS layout keeps its revision.
    pub const INTERNAL: u32 = 8;
    /// `enable_icc=false`: containers of the network cannot reach each other (only its gateway
    /// and published ports through host addresses).
    pub const NO_ICC: u32 = 16;
    /// An overlay network: its bridge is this node's share of a network spanning nodes. The
    /// programs find its VNI in OVERLAY_NETS (by network id); the flag tells readers of
    /// NETWORKS (the daemon's views, tools) what the entry is.
    pub const OVERLAY: u32 = 32;
    /// `netpath.default_deny`: a new flow between two containers of the network needs a
    /// firewall rule that allows it (from outside and from other networks, the default stays
    /// allow).
    pub const DEFAULT_DENY: u32 = 64;
    /// Some container of the network has rules of its own (`firewall add --to-container`,
    /// `run --ingress-allow`): flows inside the network are checked against them and tracked,
    /// so that the replies of a checked container's own flows are known.
    pub const POLICED: u32 = 128;
}

/// Key of the overlay endpoint maps: an address within one overlay network.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OverlayKey {
    pub vni: u32,
    /// Network byte order.
    pub addr: u32,
}

/// A container of an overlay network on this node. Key: [`OverlayKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OverlayLocal {
    /// Host side of its veth: where decapsulated packets for it are redirected.
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub _pad: u16,
}

/// A container of an overlay network on another node. Key: [`OverlayKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OverlayRemote {
    /// The underlay address of its node: the VXLAN tunnel's remote end (network byte order).
    pub node_ip: u32,
    /// Its MAC: the inner frame's destination, and the answer to ARP for its address.
    pub mac: [u8; 6],
    pub _pad: u16,
}

/// The firewall, compiled (netpath/src/firewall.rs writes it, netpath-ebpf/src/firewall.rs
/// reads it). A new flow to a container is looked up at up to three targets — the container's
/// address, its network, every destination — each in two longest-prefix matches: the source
/// address in `POLICY_SRC` gives the rule set of the longest matching source prefix (it holds
/// every rule whose prefix contains that one), then (protocol, port) in `POLICY_PORTS` gives
/// that set's best verdict for the most specific protocol/port block. The lowest rank wins.
pub mod policy_target {
    /// Rules with no `--to-*`: `target` is 0.
    pub const ANY: u32 = 0;
    /// `--to-network`: `target` is the network's `net_id`.
    pub const NETWORK: u32 = 1;
    /// `--to-container` and `run --ingress-allow`: `target` is a container address.
    pub const CONTAINER: u32 = 2;
}

/// Verdicts of [`PolicyVerdict`].
pub mod policy_action {
    pub const ALLOW: u32 = 1;
    pub const DENY: u32 = 2;
}

/// Rule ids of flow events the daemon did not number itself.
pub mod policy_rule {
    /// `| net_id`: a network's `netpath.default_deny` (no rule allowed the flow).
    pub const NETWORK_DEFAULT_DENY: u32 = 0x8000_0000;
}

/// `POLICY_SRC` key (an LPM key's data; prefix length 64 + the source prefix's length).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicySrcKey {
    /// `policy_target::*`.
    pub kind: u32,
    pub target: u32,
    /// Source address (network byte order).
    pub saddr: u32,
}

/// `POLICY_PORTS` key (an LPM key's data; prefix length 32, 40 with a protocol, 40 + the port
/// block's length with ports). `port` is big-endian, so that a port block is a bit prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyPortKey {
    /// The rule set (`POLICY_SRC`'s value).
    pub set: u32,
    pub proto: u8,
    pub port: [u8; 2],
    pub _pad: u8,
}

/// A compiled verdict: the best-ranked rule covering a (set, protocol, port block).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyVerdict {
    /// Lower is evaluated first (the daemon orders every rule by priority, then age).
    pub rank: u32,
    /// The rule's id, for flow events.
    pub rule: u32,
    /// `policy_action::*`.
    pub action: u32,
}

const _: () = {
    assert!(core::mem::size_of::<Tuple>() == 16);
    assert!(core::mem::size_of::<CtEntry>() == 32);
    assert!(core::mem::size_of::<Backend>() == 8);
    assert!(core::mem::size_of::<PortKey>() == 8);
    assert!(core::mem::size_of::<EndpointInfo>() == 20);
    assert!(core::mem::size_of::<NetworkInfo>() == 12);
    assert!(core::mem::size_of::<EndpointNet>() == 16);
    assert!(core::mem::size_of::<SockRevKey>() == 16);
    assert!(core::mem::size_of::<SockRevValue>() == 8);
    assert!(core::mem::size_of::<FlowEvent>() == 56);
    assert!(core::mem::size_of::<ServiceInfo>() == 12);
    assert!(core::mem::size_of::<OverlayKey>() == 8);
    assert!(core::mem::size_of::<OverlayLocal>() == 12);
    assert!(core::mem::size_of::<OverlayRemote>() == 12);
    assert!(core::mem::size_of::<PolicySrcKey>() == 12);
    assert!(core::mem::size_of::<PolicyPortKey>() == 8);
    assert!(core::mem::size_of::<PolicyVerdict>() == 12);
    assert!(core::mem::size_of::<XdpUplink>() == 8);
    // The ring buffer hands out 8-byte aligned records.
    assert!(core::mem::align_of::<FlowEvent>() <= 8);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), plain integers, explicit padding (sizes asserted above).
    unsafe impl aya::Pod for super::Tuple {}
    unsafe impl aya::Pod for super::CtEntry {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::EndpointInfo {}
    unsafe impl aya::Pod for super::EndpointNet {}
    unsafe impl aya::Pod for super::NetworkInfo {}
    unsafe impl aya::Pod for super::SockRevKey {}
    unsafe impl aya::Pod for super::SockRevValue {}
    unsafe impl aya::Pod for super::FlowEvent {}
    unsafe impl aya::Pod for super::ServiceInfo {}
    unsafe impl aya::Pod for super::OverlayKey {}
    unsafe impl aya::Pod for super::OverlayLocal {}
    unsafe impl aya::Pod for super::OverlayRemote {}
    unsafe impl aya::Pod for super::PolicySrcKey {}
    unsafe impl aya::Pod for super::PolicyPortKey {}
    unsafe impl aya::Pod for super::PolicyVerdict {}
    unsafe impl aya::Pod for super::XdpUplink {}
}
