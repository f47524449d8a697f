//! Desired state: networks and containers with their endpoints. IPAM allocations are the
//! endpoints' addresses, so they are persisted with them and cannot drift apart.
//!
//! Every object is persisted on its own ([`store`]), so a change costs the same with one
//! container as with ten thousand, and carries a [`Phase`]: a record is written *before* the
//! kernel is changed for it (`Creating`, `Removing`), so a daemon that dies half-way leaves a
//! record saying what to finish or undo, never kernel objects nobody knows about.
//!
//! [`State`] keeps indexes (names, addresses in use, members of each network) next to the
//! objects; every change goes through its methods so the indexes cannot drift either.

pub mod store;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::ipam::{self, Pool};

pub use store::Store;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    Bridge,
    Host,
    None,
    Macvlan,
    /// Multi-host: defined in the cluster store, a local bridge on every node plus a VNI.
    Overlay,
}

impl DriverKind {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "bridge" => Some(Self::Bridge),
            "macvlan" => Some(Self::Macvlan),
            "host" => Some(Self::Host),
            "none" | "null" => Some(Self::None),
            "overlay" => Some(Self::Overlay),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bridge => "bridge",
            Self::Host => "host",
            Self::None => "none",
            Self::Macvlan => "macvlan",
            Self::Overlay => "overlay",
        }
    }
    /// Containers sit on a local Linux bridge behind a veth (bridge, and overlay on each node).
    pub fn is_bridged(self) -> bool {
        matches!(self, Self::Bridge | Self::Overlay)
    }
}

/// Where an object is in its life. Anything but `Ready` after a restart means the daemon
/// stopped in the middle of creating or removing it: reconcile finishes the job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    #[default]
    Ready,
    /// Reserved (name, addresses, ports) and being built; rolled back if the daemon dies.
    Creating,
    /// Being torn down; the teardown is finished if the daemon dies.
    Removing,
}

impl Phase {
    fn is_ready(&self) -> bool {
        *self == Phase::Ready
    }
}

/// Docker's option naming a bridge network's gateway mode.
pub const GATEWAY_MODE_OPT: &str = "com.docker.network.bridge.gateway_mode_ipv4";

/// How a bridge network meets the outside (Docker's gateway modes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GatewayMode {
    /// Masquerade out; from outside only published host ports (Docker's default).
    #[default]
    Nat,
    /// Masquerade out; hosts that route to the subnet reach every container port.
    NatUnprotected,
    /// No NAT: containers keep their addresses; hosts that route to the subnet reach
    /// published container ports (and ICMP).
    Routed,
}

impl GatewayMode {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "nat" => Some(Self::Nat),
            "nat-unprotected" => Some(Self::NatUnprotected),
            "routed" => Some(Self::Routed),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nat => "nat",
            Self::NatUnprotected => "nat-unprotected",
            Self::Routed => "routed",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Network {
    pub id: String,
    pub name: String,
    pub driver: DriverKind,
    /// Bridge and macvlan networks.
    pub ipam: Option<IpamConfig>,
    /// The Linux bridge of a bridge network.
    pub bridge: Option<String>,
    /// Created by the daemon itself (bridge, host, none): cannot be removed.
    pub builtin: bool,
    pub created: u64,
    /// Small number naming the network in the datapath (isolation); unique per daemon.
    #[serde(default)]
    pub index: u32,
    /// Bridge networks only.
    #[serde(default)]
    pub gateway_mode: GatewayMode,
    #[serde(default)]
    pub phase: Phase,
    /// Everything `network create` options add (records from before them get the defaults).
    #[serde(default)]
    pub opts: NetOpts,
}

/// A network's options beyond its driver and addresses, with Docker's defaults.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetOpts {
    /// `--internal`: no way out of the network and none in (bridge only).
    #[serde(default)]
    pub internal: bool,
    /// `com.docker.network.bridge.enable_icc`: containers of the network reach each other.
    #[serde(default = "yes")]
    pub icc: bool,
    /// `com.docker.network.bridge.enable_ip_masquerade`: outbound traffic leaves with the
    /// uplink's address (in gateway modes that masquerade).
    #[serde(default = "yes")]
    pub masquerade: bool,
    /// `com.docker.network.driver.mtu`: the bridge's and its containers' MTU.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// `--label K=V`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `--aux-address NAME=IP`: addresses IPAM never hands out (used by others on the subnet).
    #[serde(default)]
    pub aux_addresses: BTreeMap<String, Ipv4Addr>,
    /// The macvlan driver's settings.
    #[serde(default)]
    pub macvlan: Option<Macvlan>,
    /// `netpath.default_deny`: a new flow between two of its containers needs a firewall rule
    /// allowing it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub default_deny: bool,
    /// The overlay driver's (cluster-wide) settings.
    #[serde(default)]
    pub overlay: Option<Overlay>,
}

/// What an overlay network is across the cluster (a copy of its cluster record).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Overlay {
    /// The VXLAN network identifier, the same on every node.
    pub vni: u32,
    /// Standalone containers (`run --network`) may join, not only services' tasks.
    pub attachable: bool,
}

fn yes() -> bool {
    true
}

impl Default for NetOpts {
    fn default() -> Self {
        NetOpts {
            internal: false,
            icc: true,
            masquerade: true,
            mtu: None,
            labels: BTreeMap::new(),
            aux_addresses: BTreeMap::new(),
            macvlan: None,
            default_deny: false,
            overlay: None,
        }
    }
}

/// The kernel's macvlan modes (`-o macvlan_mode=`), Docker's default `bridge`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MacvlanMode {
    #[default]
    Bridge,
    Private,
    Vepa,
    Passthru,
}

impl MacvlanMode {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "bridge" => Some(Self::Bridge),
            "private" => Some(Self::Private),
            "vepa" => Some(Self::Vepa),
            "passthru" => Some(Self::Passthru),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bridge => "bridge",
            Self::Private => "private",
            Self::Vepa => "vepa",
            Self::Passthru => "passthru",
        }
    }
}

/// Where a macvlan network's containers hang: sub-interfaces of `parent`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Macvlan {
    /// The parent interface as given: `eth0`, or `eth0.10` for VLAN 10 of eth0.
    pub parent: String,
    pub mode: MacvlanMode,
    /// For `IFACE.VID` parents: the lower interface and the VLAN id. The VLAN link is made
    /// when absent (marked as netpath's) and removed with the last network on it, if netpath
    /// made it.
    #[serde(default)]
    pub vlan: Option<(String, u16)>,
    /// `netpath.macvlan.host_access`: the host's own macvlan on the parent (name, address),
    /// with a route to the network's range, so host processes reach the containers.
    #[serde(default)]
    pub host_shim: Option<(String, Ipv4Addr)>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct IpamConfig {
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub ip_range: Option<Ipv4Net>,
}

impl Network {
    pub fn pool(&self) -> Option<Pool> {
        self.ipam.map(|c| Pool { subnet: c.subnet, gateway: c.gateway, range: c.ip_range.unwrap_or(c.subnet) })
    }
    pub fn short_id(&self) -> &str {
        &self.id[..12]
    }
    /// Host links this network made: its bridge, its macvlan shim.
    pub fn own_links(&self) -> Vec<String> {
        let mut v: Vec<String> = self.bridge.iter().cloned().collect();
        if let Some(mv) = &self.opts.macvlan {
            v.extend(mv.host_shim.as_ref().map(|(n, _)| n.clone()));
        }
        v
    }
    /// Its VLAN parent (`eth0.10`), which netpath made only if it carries netpath's alias
    /// (see `Netlink::delete_own_link`); one the user made stays the user's (an uplink, say).
    pub fn vlan_link(&self) -> Option<&str> {
        self.opts.macvlan.as_ref().filter(|m| m.vlan.is_some()).map(|m| m.parent.as_str())
    }
}

/// Where a container's processes live.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Sandbox {
    /// A network namespace bind-mounted at `path`. `owned` namespaces were made by the daemon
    /// (and are removed with the container); others came from `netpath attach --netns`.
    Netns { path: PathBuf, owned: bool },
    /// The daemon's own (host) network namespace: `--network host`.
    Host,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Endpoint {
    pub id: String,
    pub network_id: String,
    /// Interface name inside the container: eth0, eth1, ...
    pub ifname: String,
    /// Host side of the veth pair (bridge networks).
    pub host_ifname: Option<String>,
    pub ipv4: Option<Ipv4Addr>,
    pub mac: Option<[u8; 6]>,
    /// `network connect` writes the endpoint `Creating` before wiring it, `disconnect` marks
    /// it `Removing` before unwiring it.
    #[serde(default)]
    pub phase: Phase,
    /// Network-scoped DNS aliases (`--alias`), user-defined networks only.
    #[serde(default)]
    pub aliases: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Process {
    pub cmd: Vec<String>,
    pub pid: Option<u32>,
    /// Kernel start time of `pid` (clock ticks since boot): tells our process from a recycled pid.
    pub start_time: Option<u64>,
    pub exit_code: Option<i32>,
    /// Supervised by the daemon (`run -d`), output in the container's log.
    pub detached: bool,
    /// Why the command could not be started (Docker's `State.Error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Container {
    pub id: String,
    pub name: String,
    pub sandbox: Sandbox,
    pub endpoints: Vec<Endpoint>,
    pub process: Option<Process>,
    pub created: u64,
    /// Published ports, on the address of the first endpoint that has one.
    #[serde(default)]
    pub ports: Vec<crate::ports::Binding>,
    #[serde(default)]
    pub phase: Phase,
    /// `--hostname`; the short ID when unset.
    #[serde(default)]
    pub hostname: Option<String>,
    /// `--dns`: upstream resolvers instead of the host's.
    #[serde(default)]
    pub dns: Vec<std::net::IpAddr>,
    /// `--dns-search`: search domains instead of the host's.
    #[serde(default)]
    pub dns_search: Vec<String>,
    /// Docker's labels; attachments made for a runtime (CNI) carry their key here.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// `--ingress-allow FROM[:PORT]`: only these may open connections to it (empty: anyone
    /// the firewall lets through).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress_allow: Vec<IngressAllow>,
    /// `--expose`: the ports it says it serves (with its published ones, what a service
    /// may send it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exposed: Vec<crate::ports::Exposed>,
}

/// One `run --ingress-allow FROM[:PORT]`: sources in `from` may open connections to the
/// container (on `port`, TCP or UDP, or on any port and protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngressAllow {
    pub from: Ipv4Net,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// What a firewall rule does with the new flows it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    Allow,
    Deny,
}

/// Which containers a firewall rule guards. Containers and networks are named (like DNS
/// names): a rule applies to whichever container or network has the name now, and to none
/// while none has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleTarget {
    /// Every container (where traffic enters its network, see the README).
    Any,
    Container(String),
    Network(String),
}

/// The protocols a firewall rule can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleProto {
    Tcp,
    Udp,
    Icmp,
}

impl RuleProto {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "tcp" => Some(Self::Tcp),
            "udp" => Some(Self::Udp),
            "icmp" => Some(Self::Icmp),
            _ => None,
        }
    }
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => netpath_common::proto::TCP,
            Self::Udp => netpath_common::proto::UDP,
            Self::Icmp => netpath_common::proto::ICMP,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Icmp => "icmp",
        }
    }
}

/// A `netpath firewall add` rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirewallRule {
    pub id: String,
    /// The rule's number in the datapath (flow events carry it), unique and never reused
    /// while the rule exists; also the tie-breaker between rules of one priority (older first).
    pub num: u32,
    pub name: String,
    pub action: RuleAction,
    /// Source prefix; None: any source.
    pub from: Option<Ipv4Net>,
    pub to: RuleTarget,
    /// Destination port range (as the container sees it), inclusive.
    pub ports: Option<(u16, u16)>,
    /// tcp, udp or icmp; None: any protocol (with ports: TCP and UDP).
    pub proto: Option<RuleProto>,
    /// Lower numbers are evaluated first.
    pub priority: u32,
    pub created: u64,
}

impl Container {
    /// The endpoint published ports lead to: the first wired one with an address.
    pub fn primary_endpoint(&self) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| e.ipv4.is_some() && e.phase.is_ready())
    }

    /// The UTS hostname its processes get: `--hostname`, else the short ID (as Docker).
    pub fn hostname(&self) -> &str {
        self.hostname.as_deref().unwrap_or(&self.id[..12])
    }

    /// The address published ports lead to: the primary endpoint's.
    pub fn primary_ipv4(&self) -> Option<Ipv4Addr> {
        self.primary_endpoint().and_then(|e| e.ipv4)
    }

    pub fn short_id(&self) -> &str {
        &self.id[..12]
    }

    /// Whether it serves `port`: `None` when it declares nothing (`--expose` or `-p`), as
    /// Docker cannot tell either; else whether one of its declarations covers the port.
    pub fn serves(&self, port: u16, proto: crate::ports::Proto) -> Option<bool> {
        if self.exposed.is_empty() && self.ports.is_empty() {
            return None;
        }
        Some(
            self.exposed.iter().any(|e| e.covers(port, proto))
                || self.ports.iter().any(|b| b.container_port == port && b.proto == proto),
        )
    }

    /// Its declared ports for messages: `80/tcp, 53/udp`.
    pub fn declared_ports(&self) -> String {
        let mut v: Vec<String> = self.exposed.iter().map(|e| e.to_string()).collect();
        for b in &self.ports {
            let s = format!("{}/{}", b.container_port, b.proto.as_str());
            if !v.contains(&s) {
                v.push(s);
            }
        }
        v.join(", ")
    }
}

/// A service's address on one of its networks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceVip {
    pub network_id: String,
    pub vip: Ipv4Addr,
    /// Its Maglev table's slot in the datapath (unique across services).
    pub slot: u32,
}

/// A port a service serves: `target` on its tasks, published on the host as `published`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    pub published: Option<u16>,
    pub target: u16,
    pub proto: crate::ports::Proto,
    /// `mode=host`: published only on the nodes that run a task (swarm's host mode) rather
    /// than through the routing mesh; on one host both reach the same tasks.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub host_mode: bool,
}

/// A service (Docker swarm's, on one host): a VIP per network spreading connections over its
/// tasks, which are the replicas the daemon runs (`NAME.1..N`) and the containers that joined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub id: String,
    pub name: String,
    pub vips: Vec<ServiceVip>,
    /// Replicas the daemon runs with `cmd` (None: only joined containers).
    pub replicas: Option<u32>,
    #[serde(default)]
    pub cmd: Vec<String>,
    /// Names of containers that joined (`--backend`, `run --service`).
    #[serde(default)]
    pub backends: Vec<String>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// `vip` or `dnsrr`.
    pub endpoint_mode: String,
    /// `none` or `client-ip`.
    pub affinity: String,
    /// `--health-cmd-tcp PORT`: a task is a backend only while it accepts connections there.
    #[serde(default)]
    pub health_tcp: Option<u16>,
    pub created: u64,
    pub phase: Phase,
    /// A service across nodes (defined in the cluster store): the slots placed on this node.
    /// None: a service of this host alone, which runs every slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub here: Option<BTreeSet<u32>>,
    /// A cluster service with `mode=host` ports: the Maglev slot of this node's own tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_slot: Option<u32>,
}

impl Service {
    /// The replica task names it wants now (on this node).
    pub fn replica_names(&self) -> Vec<String> {
        (1..=self.replicas.unwrap_or(0))
            .filter(|n| self.wants_replica(*n))
            .map(|i| format!("{}.{i}", self.name))
            .collect()
    }
    /// True when this node should run replica `n`.
    pub fn wants_replica(&self, n: u32) -> bool {
        n >= 1 && n <= self.replicas.unwrap_or(0) && self.here.as_ref().is_none_or(|h| h.contains(&n))
    }
    /// True when `container` is one of its replicas, wanted or not (NAME.<number>).
    pub fn is_replica_name(&self, container: &str) -> bool {
        container
            .strip_prefix(&self.name)
            .and_then(|r| r.strip_prefix('.'))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    }
}

/// Networks and containers with their indexes. Lookups by name, id or id prefix, the
/// addresses in use on a network and a network's members cost the same whatever the number
/// of containers.
#[derive(Debug, Default)]
pub struct State {
    networks: BTreeMap<String, Network>,
    network_names: HashMap<String, String>,
    containers: BTreeMap<String, Container>,
    container_names: HashMap<String, String>,
    /// Network id → addresses its endpoints hold (the IPAM allocations, reservations included).
    used: HashMap<String, BTreeSet<Ipv4Addr>>,
    /// Network id → ids of the containers with an endpoint on it.
    members: HashMap<String, BTreeSet<String>>,
    /// Network id → addresses of removed containers whose host interface is still being
    /// deleted (in the background): in `used` too, so nothing is handed them until it is gone
    /// (the MAC is derived from the address, and the bridge's FDB still points at the old
    /// port). Never on disk: after a crash, reconcile deletes the interfaces no record claims
    /// before any address is handed out.
    held: HashMap<String, BTreeSet<Ipv4Addr>>,
    /// Every container's published ports, with the container holding each.
    bindings: Vec<(crate::ports::Binding, String)>,
    /// Services by id (VIPs are in `used` too, so no container gets one).
    services: BTreeMap<String, Service>,
    /// Firewall rules by name.
    rules: BTreeMap<String, FirewallRule>,
    /// Bumped on every change: orders the writes of one object (see [`Store`]).
    rev: u64,
}

/// An id prefix (at least 3 characters, as Docker) naming exactly one key of `map`.
fn by_prefix<'a, V>(map: &'a BTreeMap<String, V>, prefix: &str) -> Option<&'a V> {
    if prefix.len() < 3 {
        return None;
    }
    let mut m = map.range(prefix.to_string()..).take_while(|(k, _)| k.starts_with(prefix));
    match (m.next(), m.next()) {
        (Some((_, v)), None) => Some(v),
        _ => None,
    }
}

impl State {
    pub fn from_objects(networks: Vec<Network>, containers: Vec<Container>) -> Self {
        let mut s = State::default();
        for n in networks {
            s.put_network(n);
        }
        for c in containers {
            s.put_container(c);
        }
        s
    }

    // ------------------------------------------------------------------ services

    pub fn service(&self, name_or_id: &str) -> Option<&Service> {
        self.services
            .values()
            .find(|s| s.name == name_or_id)
            .or_else(|| self.services.get(name_or_id))
            .or_else(|| by_prefix(&self.services, name_or_id))
    }
    pub fn service_by_id(&self, id: &str) -> Option<&Service> {
        self.services.get(id)
    }
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.services.values()
    }
    /// Adds or replaces a service, keeping its VIPs reserved.
    pub fn put_service(&mut self, s: Service) {
        self.remove_service(&s.id);
        for v in s.vips.iter().filter(|v| !v.vip.is_unspecified()) {
            self.used.entry(v.network_id.clone()).or_default().insert(v.vip);
        }
        self.services.insert(s.id.clone(), s);
    }
    pub fn remove_service(&mut self, id: &str) -> Option<Service> {
        let s = self.services.remove(id)?;
        for v in &s.vips {
            if let Some(u) = self.used.get_mut(&v.network_id) {
                u.remove(&v.vip);
            }
        }
        Some(s)
    }
    /// The lowest Maglev slot no service holds.
    pub fn free_slots(&self, n: usize, max: u32) -> Option<Vec<u32>> {
        let taken: BTreeSet<u32> =
            self.services.values().flat_map(|s| s.vips.iter().map(|v| v.slot).chain(s.host_slot)).collect();
        let free: Vec<u32> = (0..max).filter(|i| !taken.contains(i)).take(n).collect();
        (free.len() == n).then_some(free)
    }

    // ------------------------------------------------------------------ firewall

    pub fn rule(&self, name: &str) -> Option<&FirewallRule> {
        self.rules.get(name)
    }
    pub fn rules(&self) -> impl Iterator<Item = &FirewallRule> {
        self.rules.values()
    }
    pub fn put_rule(&mut self, r: FirewallRule) {
        self.rules.insert(r.name.clone(), r);
    }
    pub fn remove_rule(&mut self, name: &str) -> Option<FirewallRule> {
        self.rules.remove(name)
    }

    /// A revision number for a write that reflects the state as it is now.
    pub fn next_rev(&mut self) -> u64 {
        self.rev += 1;
        self.rev
    }

    // ------------------------------------------------------------------ networks

    pub fn network(&self, name_or_id: &str) -> Option<&Network> {
        match self.network_names.get(name_or_id) {
            Some(id) => self.networks.get(id),
            None => self.networks.get(name_or_id).or_else(|| by_prefix(&self.networks, name_or_id)),
        }
    }
    pub fn network_by_id(&self, id: &str) -> Option<&Network> {
        self.networks.get(id)
    }
    pub fn networks(&self) -> impl Iterator<Item = &Network> {
        self.networks.values()
    }
    /// Adds or replaces a network.
    pub fn put_network(&mut self, n: Network) {
        if let Some(old) = self.networks.get(&n.id) {
            self.network_names.remove(&old.name);
        }
        self.network_names.insert(n.name.clone(), n.id.clone());
        self.networks.insert(n.id.clone(), n);
    }
    pub fn remove_network(&mut self, id: &str) -> Option<Network> {
        let n = self.networks.remove(id)?;
        self.network_names.remove(&n.name);
        self.used.remove(id);
        self.members.remove(id);
        Some(n)
    }
    pub fn set_network_phase(&mut self, id: &str, phase: Phase) {
        if let Some(n) = self.networks.get_mut(id) {
            n.phase = phase;
        }
    }
    /// The next unused network index (0 is never used: it marks "not assigned yet").
    pub fn next_network_index(&self) -> u32 {
        self.networks.values().map(|n| n.index).max().unwrap_or(0) + 1
    }
    pub fn subnets(&self) -> Vec<Ipv4Net> {
        self.networks.values().filter_map(|n| n.ipam.map(|c| c.subnet)).collect()
    }
    /// A network whose subnet overlaps `subnet`, if any.
    pub fn overlapping(&self, subnet: Ipv4Net) -> Option<&Network> {
        self.networks.values().find(|n| n.ipam.is_some_and(|c| ipam::overlaps(c.subnet, subnet)))
    }

    // ---------------------------------------------------------------- containers

    pub fn container(&self, name_or_id: &str) -> Option<&Container> {
        match self.container_names.get(name_or_id) {
            Some(id) => self.containers.get(id),
            None => self.containers.get(name_or_id).or_else(|| by_prefix(&self.containers, name_or_id)),
        }
    }
    pub fn container_by_id(&self, id: &str) -> Option<&Container> {
        self.containers.get(id)
    }
    /// The one container whose id starts with `prefix` (of 3 characters or more).
    pub fn container_by_id_prefix(&self, prefix: &str) -> Option<&Container> {
        by_prefix(&self.containers, prefix)
    }
    pub fn containers(&self) -> impl Iterator<Item = &Container> {
        self.containers.values()
    }
    pub fn container_count(&self) -> usize {
        self.containers.len()
    }
    /// Adds or replaces a container, keeping every index in step.
    pub fn put_container(&mut self, c: Container) {
        self.unindex(&c.id);
        self.container_names.insert(c.name.clone(), c.id.clone());
        for e in &c.endpoints {
            self.members.entry(e.network_id.clone()).or_default().insert(c.id.clone());
            if let Some(ip) = e.ipv4 {
                self.used.entry(e.network_id.clone()).or_default().insert(ip);
            }
        }
        self.bindings.extend(c.ports.iter().map(|b| (*b, c.id.clone())));
        self.containers.insert(c.id.clone(), c);
    }
    pub fn remove_container(&mut self, id: &str) -> Option<Container> {
        self.unindex(id);
        self.containers.remove(id)
    }
    /// Changes a container in place through `f`, re-indexing it. None if it does not exist.
    pub fn update_container<R>(&mut self, id: &str, f: impl FnOnce(&mut Container) -> R) -> Option<R> {
        let mut c = self.containers.get(id)?.clone();
        let r = f(&mut c);
        self.put_container(c);
        Some(r)
    }
    fn unindex(&mut self, id: &str) {
        let Some(old) = self.containers.get(id) else { return };
        self.container_names.remove(&old.name);
        for e in &old.endpoints {
            if let Some(m) = self.members.get_mut(&e.network_id) {
                m.remove(id);
            }
            if let (Some(ip), Some(u)) = (e.ipv4, self.used.get_mut(&e.network_id)) {
                u.remove(&ip);
            }
        }
        if !old.ports.is_empty() {
            self.bindings.retain(|(_, c)| c != id);
        }
    }

    /// Addresses in use on a network: its endpoints' addresses (the IPAM allocations).
    pub fn used_addresses(&self, network_id: &str) -> &BTreeSet<Ipv4Addr> {
        static EMPTY: BTreeSet<Ipv4Addr> = BTreeSet::new();
        self.used.get(network_id).unwrap_or(&EMPTY)
    }
    /// How many containers have an endpoint on a network.
    pub fn member_count(&self, network_id: &str) -> usize {
        self.members.get(network_id).map_or(0, |m| m.len())
    }
    /// Keeps a removed container's address from being handed out (see `held`). The caller
    /// has removed the container: the address belongs to nothing else.
    pub fn hold_address(&mut self, network_id: &str, ip: Ipv4Addr) {
        self.held.entry(network_id.to_string()).or_default().insert(ip);
        self.used.entry(network_id.to_string()).or_default().insert(ip);
    }
    /// Frees an address [`Self::hold_address`] kept: its interface is gone.
    pub fn release_address(&mut self, network_id: &str, ip: Ipv4Addr) {
        let Some(h) = self.held.get_mut(network_id) else { return };
        if h.remove(&ip) {
            if h.is_empty() {
                self.held.remove(network_id);
            }
            if let Some(u) = self.used.get_mut(network_id) {
                u.remove(&ip);
            }
        }
    }
    /// Addresses of a network held for interfaces still being deleted.
    pub fn held_addresses(&self, network_id: &str) -> &BTreeSet<Ipv4Addr> {
        static EMPTY: BTreeSet<Ipv4Addr> = BTreeSet::new();
        self.held.get(network_id).unwrap_or(&EMPTY)
    }
    pub fn endpoints_on<'a>(&'a self, network_id: &'a str) -> impl Iterator<Item = (&'a Container, &'a Endpoint)> + 'a {
        self.members
            .get(network_id)
            .into_iter()
            .flatten()
            .filter_map(|id| self.containers.get(id))
            .flat_map(move |c| c.endpoints.iter().filter(move |e| e.network_id == network_id).map(move |e| (c, e)))
    }
    /// Every container's published ports except `except`'s, and every service's.
    pub fn bindings_except(&self, except: &str) -> Vec<crate::ports::Binding> {
        let services = self.services.values().flat_map(|s| {
            s.ports.iter().filter_map(|p| {
                let host_port = p.published?;
                Some(crate::ports::Binding { host_ip: None, host_port, container_port: p.target, proto: p.proto })
            })
        });
        self.bindings.iter().filter(|(_, c)| c != except).map(|(b, _)| *b).chain(services).collect()
    }

    /// Only containers' published ports (a service checks other services by name).
    pub fn container_bindings(&self) -> Vec<crate::ports::Binding> {
        self.bindings.iter().map(|(b, _)| *b).collect()
    }
}

/// A fresh random 64-hex-digit id, like Docker's.
pub fn new_id() -> String {
    let mut b = [0u8; 32];
    // getrandom(2) never fails for 32 bytes on Linux once the pool is initialised.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    assert_eq!(n, 32, "getrandom failed");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn gateway_modes_parse_and_state_from_before_them_means_nat() {
        for m in [GatewayMode::Nat, GatewayMode::NatUnprotected, GatewayMode::Routed] {
            assert_eq!(GatewayMode::parse(m.as_str()), Some(m));
            assert_eq!(serde_json::to_value(m).unwrap(), m.as_str());
        }
        assert_eq!(GatewayMode::parse("isolated"), None);
        let old = r#"{"id":"x","name":"n","driver":"bridge","ipam":null,"bridge":null,"builtin":false,"created":0}"#;
        let n: Network = serde_json::from_str(old).unwrap();
        assert_eq!(n.gateway_mode, GatewayMode::Nat);
        assert_eq!(n.phase, Phase::Ready, "records from before phases are complete");
        assert_eq!(n.opts, NetOpts::default(), "records from before options have Docker's defaults");
        assert!(n.opts.icc && n.opts.masquerade && !n.opts.internal);
    }

    pub(crate) fn network(name: &str, subnet: &str) -> Network {
        let subnet: Ipv4Net = subnet.parse().unwrap();
        Network {
            id: new_id(),
            name: name.into(),
            driver: DriverKind::Bridge,
            ipam: Some(IpamConfig { subnet, gateway: Ipv4Addr::from(u32::from(subnet.network()) + 1), ip_range: None }),
            bridge: Some(format!("np-{name}")),
            builtin: false,
            created: now(),
            index: 1,
            gateway_mode: GatewayMode::Routed,
            phase: Phase::Ready,
            opts: NetOpts::default(),
        }
    }

    pub(crate) fn container(name: &str, net: &Network, ip: &str, port: Option<u16>) -> Container {
        let ip: Ipv4Addr = ip.parse().unwrap();
        Container {
            id: new_id(),
            name: name.into(),
            sandbox: Sandbox::Netns { path: PathBuf::from("/x"), owned: true },
            endpoints: vec![Endpoint {
                id: new_id(),
                network_id: net.id.clone(),
                ifname: "eth0".into(),
                host_ifname: Some("vethx".into()),
                ipv4: Some(ip),
                mac: Some(ipam::mac_for(ip)),
                phase: Phase::Ready,
                aliases: vec![],
            }],
            process: None,
            created: now(),
            ports: port
                .map(|p| crate::ports::Binding {
                    host_ip: None,
                    host_port: p,
                    container_port: 80,
                    proto: crate::ports::Proto::Tcp,
                })
                .into_iter()
                .collect(),
            phase: Phase::Ready,
            hostname: None,
            dns: vec![],
            dns_search: vec![],
            labels: Default::default(),
            ingress_allow: vec![],
            exposed: vec![],
        }
    }

    #[test]
    fn lookups_by_name_id_and_id_prefix() {
        let n = network("n1", "10.5.0.0/24");
        let id = n.id.clone();
        let st = State::from_objects(vec![n], vec![]);
        assert!(st.network("n1").is_some());
        assert!(st.network(&id).is_some());
        assert!(st.network(&id[..6]).is_some());
        assert!(st.network(&id[..2]).is_none(), "too short a prefix");
        assert!(st.network("zz").is_none());
        assert!(st.overlapping("10.5.0.128/25".parse().unwrap()).is_some());
        assert!(st.overlapping("10.6.0.0/24".parse().unwrap()).is_none());
    }

    #[test]
    fn ambiguous_prefixes_name_nothing() {
        let mut a = network("a", "10.1.0.0/24");
        let mut b = network("b", "10.2.0.0/24");
        a.id = format!("abc1{}", &a.id[4..]);
        b.id = format!("abc2{}", &b.id[4..]);
        let st = State::from_objects(vec![a, b], vec![]);
        assert!(st.network("abc").is_none());
        assert_eq!(st.network("abc1").unwrap().name, "a");
    }

    #[test]
    fn indexes_follow_every_change() {
        let n = network("n", "10.5.0.0/24");
        let c1 = container("c1", &n, "10.5.0.2", Some(8080));
        let c2 = container("c2", &n, "10.5.0.3", None);
        let (nid, id1, id2) = (n.id.clone(), c1.id.clone(), c2.id.clone());
        let mut st = State::from_objects(vec![n], vec![c1, c2]);
        assert_eq!(st.member_count(&nid), 2);
        assert_eq!(st.used_addresses(&nid).len(), 2);
        assert_eq!(st.bindings_except("").len(), 1);
        assert!(st.bindings_except(&id1).is_empty());
        assert_eq!(st.endpoints_on(&nid).count(), 2);

        // Rename and readdress through update: the old name and address are free again.
        st.update_container(&id1, |c| {
            c.name = "renamed".into();
            c.endpoints[0].ipv4 = Some("10.5.0.9".parse().unwrap());
            c.ports.clear();
        });
        assert!(st.container("c1").is_none());
        assert_eq!(st.container("renamed").unwrap().id, id1);
        assert!(st.used_addresses(&nid).contains(&"10.5.0.9".parse().unwrap()));
        assert!(!st.used_addresses(&nid).contains(&"10.5.0.2".parse().unwrap()));
        assert!(st.bindings_except("").is_empty());

        st.remove_container(&id2);
        assert!(st.container("c2").is_none());
        assert_eq!(st.member_count(&nid), 1);
        assert_eq!(st.used_addresses(&nid).len(), 1);
        st.remove_container(&id1);
        assert_eq!(st.member_count(&nid), 0);
        assert!(st.used_addresses(&nid).is_empty());
        assert_eq!(st.container_count(), 0);
    }

    #[test]
    fn a_held_address_stays_used_until_released_and_only_then() {
        let n = network("n", "10.5.0.0/24");
        let c = container("c", &n, "10.5.0.2", None);
        let (nid, id, ip) = (n.id.clone(), c.id.clone(), "10.5.0.2".parse().unwrap());
        let mut st = State::from_objects(vec![n], vec![c]);
        st.remove_container(&id);
        assert!(!st.used_addresses(&nid).contains(&ip));
        st.hold_address(&nid, ip);
        assert!(st.used_addresses(&nid).contains(&ip), "held: not handed out");
        assert!(st.held_addresses(&nid).contains(&ip));
        // Releasing an address that is not held changes nothing.
        st.release_address(&nid, "10.5.0.3".parse().unwrap());
        st.release_address("other", ip);
        assert!(st.used_addresses(&nid).contains(&ip));
        st.release_address(&nid, ip);
        assert!(!st.used_addresses(&nid).contains(&ip));
        assert!(st.held_addresses(&nid).is_empty());
    }

    #[test]
    fn reservations_hold_their_address_and_are_not_primary() {
        let n = network("n", "10.5.0.0/24");
        let mut c = container("c", &n, "10.5.0.2", None);
        c.endpoints[0].phase = Phase::Creating;
        let nid = n.id.clone();
        let st = State::from_objects(vec![n], vec![c.clone()]);
        assert!(st.used_addresses(&nid).contains(&"10.5.0.2".parse().unwrap()), "a reservation holds its address");
        assert_eq!(c.primary_ipv4(), None, "an endpoint being wired is not where ports lead");
    }

    #[test]
    fn ids_are_unique_hex() {
        let a = new_id();
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, new_id());
    }

    #[test]
    fn a_container_serves_what_it_declares_and_nothing_is_known_without_declarations() {
        use crate::ports::{Exposed, Proto};
        let net = network("n", "10.1.0.0/24");
        let mut c = container("c", &net, "10.1.0.2", None);
        assert_eq!(c.serves(80, Proto::Tcp), None);
        c.exposed = vec![Exposed { from: 8000, to: 8010, proto: Proto::Tcp }];
        assert_eq!(c.serves(8010, Proto::Tcp), Some(true));
        assert_eq!(c.serves(8010, Proto::Udp), Some(false));
        assert_eq!(c.serves(80, Proto::Tcp), Some(false));
        let published = container("p", &net, "10.1.0.3", Some(8080));
        assert_eq!(published.serves(80, Proto::Tcp), Some(true));
        c.ports = published.ports.clone();
        assert_eq!(c.declared_ports(), "8000-8010/tcp, 80/tcp");
    }
}
