//! Networks: create, list, inspect, remove; and what the datapath must know of each.

use std::collections::BTreeMap;

use serde_json::Value;
use tracing::{info, warn};

use super::{DEFAULT_BRIDGE, DEFAULT_SUBNET, Daemon, crash, parse_ip, valid_name};
use crate::api::NetworkCreate;
use crate::drivers::driver;
use crate::error::Result;
use crate::ipam;
use crate::state::{self, DriverKind, GatewayMode, IpamConfig, MacvlanMode, NetOpts, Network, Phase, State};
use netpath_common::net_flags;

/// Docker's bridge options netpath knows.
const ICC_OPT: &str = "com.docker.network.bridge.enable_icc";
const MASQUERADE_OPT: &str = "com.docker.network.bridge.enable_ip_masquerade";
const MTU_OPT: &str = "com.docker.network.driver.mtu";
const BRIDGE_NAME_OPT: &str = "com.docker.network.bridge.name";
/// netpath's own: new flows between the network's containers need a firewall rule allowing them.
const DEFAULT_DENY_OPT: &str = "netpath.default_deny";
const BRIDGE_OPTS: [&str; 6] =
    [state::GATEWAY_MODE_OPT, ICC_OPT, MASQUERADE_OPT, MTU_OPT, BRIDGE_NAME_OPT, DEFAULT_DENY_OPT];
/// The macvlan driver's (Docker's names, and netpath's own for the host shim).
const PARENT_OPT: &str = "parent";
const MODE_OPT: &str = "macvlan_mode";
const HOST_ACCESS_OPT: &str = "netpath.macvlan.host_access";
const MACVLAN_OPTS: [&str; 3] = [PARENT_OPT, MODE_OPT, HOST_ACCESS_OPT];

/// What `network create`'s options ask for, checked without touching anything.
#[derive(Debug, Default, PartialEq)]
struct Options {
    gateway_mode: GatewayMode,
    icc: bool,
    masquerade: bool,
    mtu: Option<u32>,
    bridge_name: Option<String>,
    /// macvlan: the parent as given, `IFACE.VID` split, the mode, host_access.
    parent: Option<String>,
    vlan: Option<(String, u16)>,
    mode: MacvlanMode,
    host_access: bool,
    default_deny: bool,
}

/// Docker's booleans (Go's strconv.ParseBool, less the odd spellings).
fn parse_bool(k: &str, v: &str) -> Result<bool> {
    match v {
        "true" | "1" | "True" | "TRUE" => Ok(true),
        "false" | "0" | "False" | "FALSE" => Ok(false),
        _ => Err(bad_request!("invalid {k} {v:?}: use true or false")),
    }
}

/// Checks a link name the way the kernel will (dev_valid_name): 1 to 15 bytes, no '/', ':'
/// or whitespace, not "." or "..".
fn valid_ifname(what: &str, n: &str) -> Result<()> {
    let ok = !n.is_empty()
        && n.len() <= 15
        && n != "."
        && n != ".."
        && n.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok { Ok(()) } else { Err(bad_request!("invalid {what} {n:?}: an interface name of 1 to 15 characters")) }
}

/// `IFACE.VID` → (IFACE, VID) with VID in 1–4094; a plain name → None.
fn split_vlan(parent: &str) -> Result<Option<(String, u16)>> {
    let Some((lower, vid)) = parent.rsplit_once('.') else { return Ok(None) };
    if lower.is_empty() || vid.is_empty() || !vid.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(None); // a name with a dot that is not IFACE.VID
    }
    match vid.parse::<u16>() {
        Ok(v @ 1..=4094) => Ok(Some((lower.to_string(), v))),
        _ => Err(bad_request!("invalid parent {parent:?}: VLAN id {vid} is outside 1-4094")),
    }
}

/// The options of a network of `kind`; any option netpath does not know (or that the driver
/// does not take) is an error rather than silently ignored.
fn parse_options(kind: DriverKind, options: &BTreeMap<String, String>) -> Result<Options> {
    let mut o = Options { icc: true, masquerade: true, ..Default::default() };
    let supported: &[&str] = if kind == DriverKind::Macvlan { &MACVLAN_OPTS } else { &BRIDGE_OPTS };
    for (k, v) in options {
        if !supported.contains(&k.as_str()) {
            return Err(bad_request!(
                "unsupported network option {k:?} for a {} network (supported: {})",
                kind.as_str(),
                supported.join(", ")
            ));
        }
        match k.as_str() {
            state::GATEWAY_MODE_OPT => {
                o.gateway_mode = GatewayMode::parse(v)
                    .ok_or_else(|| bad_request!("invalid {k} {v:?}: use nat, nat-unprotected or routed"))?
            }
            ICC_OPT => o.icc = parse_bool(k, v)?,
            MASQUERADE_OPT => o.masquerade = parse_bool(k, v)?,
            MTU_OPT => {
                o.mtu = Some(
                    v.parse::<u32>()
                        .ok()
                        .filter(|m| (68..=65535).contains(m))
                        .ok_or_else(|| bad_request!("invalid {k} {v:?}: an MTU from 68 to 65535"))?,
                )
            }
            BRIDGE_NAME_OPT => {
                valid_ifname(k, v)?;
                o.bridge_name = Some(v.clone());
            }
            PARENT_OPT => {
                valid_ifname("parent", v)?;
                o.vlan = split_vlan(v)?;
                o.parent = Some(v.clone());
            }
            MODE_OPT => {
                o.mode = MacvlanMode::parse(v)
                    .ok_or_else(|| bad_request!("invalid {k} {v:?}: use bridge, private, vepa or passthru"))?
            }
            HOST_ACCESS_OPT => o.host_access = parse_bool(k, v)?,
            DEFAULT_DENY_OPT => o.default_deny = parse_bool(k, v)?,
            _ => unreachable!("listed above"),
        }
    }
    if kind == DriverKind::Macvlan {
        if o.parent.is_none() {
            return Err(bad_request!("a macvlan network needs -o parent=IFACE (the host interface it hangs on)"));
        }
        if o.host_access && o.mode != MacvlanMode::Bridge {
            return Err(bad_request!(
                "{HOST_ACCESS_OPT} needs macvlan_mode bridge: in mode {} the host's macvlan cannot reach the others",
                o.mode.as_str()
            ));
        }
    }
    Ok(o)
}

/// True when this kernel can make 802.1q links: the module is loaded, built in, or can be.
fn kernel_has_vlan() -> bool {
    if std::path::Path::new("/proc/net/vlan").exists() || std::path::Path::new("/sys/module/8021q").exists() {
        return true;
    }
    let release = nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
    ["modules.builtin", "modules.dep"]
        .iter()
        .any(|f| std::fs::read_to_string(format!("/lib/modules/{release}/{f}")).is_ok_and(|s| s.contains("/8021q.ko")))
}

/// The NETWORKS flags of a bridge network.
fn datapath_flags(net: &Network) -> u32 {
    let mut flags = match net.gateway_mode {
        GatewayMode::Nat => net_flags::MASQUERADE,
        GatewayMode::NatUnprotected => net_flags::MASQUERADE | net_flags::DIRECT_ANY,
        GatewayMode::Routed => net_flags::DIRECT_PUBLISHED,
    };
    if !net.opts.masquerade {
        flags &= !net_flags::MASQUERADE;
    }
    if net.opts.internal {
        flags = net_flags::INTERNAL; // no way out, none in, whatever the gateway mode
    }
    if !net.opts.icc {
        flags |= net_flags::NO_ICC;
    }
    if net.opts.default_deny {
        flags |= net_flags::DEFAULT_DENY;
    }
    flags
}

/// A network by name or id, as a user names it.
/// The labels and addressing flags of a `network create`, every driver's: (gateway, IP range,
/// subnet), checked on their own (not yet against the host or other networks).
pub(super) fn addressing(
    req: &NetworkCreate,
) -> Result<(Option<std::net::Ipv4Addr>, Option<ipnet::Ipv4Net>, Option<ipnet::Ipv4Net>)> {
    if req.labels.keys().any(|k| k.is_empty()) {
        return Err(bad_request!("invalid --label: the key is empty"));
    }
    let gateway = req.gateway.as_deref().map(|g| parse_ip("gateway", g)).transpose()?;
    let ip_range = req.ip_range.as_deref().map(ipam::parse_subnet).transpose()?;
    let subnet = req.subnet.as_deref().map(ipam::parse_subnet).transpose()?;
    if subnet.is_none() && (gateway.is_some() || ip_range.is_some() || !req.aux_addresses.is_empty()) {
        return Err(bad_request!("--gateway, --ip-range and --aux-address need --subnet"));
    }
    Ok((gateway, ip_range, subnet))
}

pub(super) fn lookup<'a>(st: &'a State, name: &str) -> Result<&'a Network> {
    st.network(name).ok_or_else(|| not_found!("network {name} not found"))
}

/// How long a request naming a network waits for it while it is being created (a network
/// made on another node of a cluster is built here a moment later; a burst of requests
/// races the one creating it).
const CREATING_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl Daemon {
    /// Waits (bounded) until none of `names` is still being created, so that a request made
    /// right after `network create` (here, or on another node) finds it ready rather than
    /// failing; [`usable`] then says what is wrong, if anything still is.
    pub(super) async fn wait_networks_created<'a>(&self, names: impl IntoIterator<Item = &'a String> + Clone) {
        let deadline = std::time::Instant::now() + CREATING_WAIT;
        while std::time::Instant::now() < deadline {
            let creating = {
                let st = self.state();
                names.clone().into_iter().any(|n| st.network(n).is_some_and(|n| n.phase == Phase::Creating))
            };
            if !creating {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

/// A network that requests may use: not being created or removed.
pub(super) fn usable<'a>(st: &'a State, name: &str) -> Result<&'a Network> {
    let n = lookup(st, name)?;
    match n.phase {
        Phase::Ready => Ok(n),
        Phase::Creating => Err(conflict!("network {} is still being created", n.name)),
        Phase::Removing => Err(conflict!("network {} is being removed", n.name)),
    }
}

impl Daemon {
    /// Tells the datapath about a bridge network (isolation, masquerade, internal, icc).
    /// macvlan networks are not the datapath's: their traffic never crosses a netpath bridge
    /// or veth, and their subnet (the host's own) must not look like a container network to
    /// the uplink programs on the parent.
    pub(super) fn publish_network(&self, net: &Network) -> anyhow::Result<()> {
        if let (true, Some(ipam)) = (net.driver.is_bridged(), net.ipam) {
            let overlay = net.opts.overlay.as_ref().map(|o| o.vni);
            let flags =
                datapath_flags(net) | self.firewall_flags(net.index) | overlay.map_or(0, |_| net_flags::OVERLAY);
            self.dp().set_network(ipam.subnet, net.index, ipam.gateway, flags)?;
            if let (Some(vni), Some(o)) = (overlay, &self.overlay_dp) {
                o.overlay_set_network(vni, net.index)?;
            }
        }
        Ok(())
    }

    pub(super) fn ensure_builtin_networks(&self) -> anyhow::Result<()> {
        let subnet = ipam::parse_subnet(DEFAULT_SUBNET)?;
        let builtin = [
            ("bridge", DriverKind::Bridge, Some(ipam::pool(subnet, None, None)?), Some(DEFAULT_BRIDGE.to_string())),
            ("host", DriverKind::Host, None, None),
            ("none", DriverKind::None, None, None),
        ];
        let mut st = self.state();
        for (name, driver, pool, bridge) in builtin {
            if st.network(name).is_none() {
                let n = Network {
                    id: state::new_id(),
                    name: name.into(),
                    driver,
                    ipam: pool.map(|p| IpamConfig { subnet: p.subnet, gateway: p.gateway, ip_range: None }),
                    bridge,
                    builtin: true,
                    created: state::now(),
                    index: st.next_network_index(),
                    gateway_mode: GatewayMode::default(),
                    phase: Phase::Ready,
                    opts: NetOpts::default(),
                };
                let rev = st.next_rev();
                self.store.write_network(&n.id, state::store::Op::Save(&n), rev)?;
                st.put_network(n);
            }
        }
        Ok(())
    }

    pub async fn create_network(&self, req: NetworkCreate) -> Result<Value> {
        self.wait_ready().await;
        valid_name("network", &req.name)?;
        let d = req.driver.as_deref().unwrap_or("bridge");
        let kind = DriverKind::parse(d)
            .ok_or_else(|| bad_request!("unknown driver {d:?}: use bridge, macvlan, overlay, host or none"))?;
        if kind == DriverKind::Overlay {
            return self.create_overlay_network(req).await;
        }
        if matches!(kind, DriverKind::Host | DriverKind::None) {
            return Err(bad_request!(
                "only one instance of the {} network is allowed: it exists already as {:?}",
                kind.as_str(),
                kind.as_str()
            ));
        }
        let o = parse_options(kind, &req.options)?;
        if req.internal && kind == DriverKind::Macvlan {
            return Err(bad_request!("--internal is supported on bridge networks only"));
        }
        let (gateway, ip_range, subnet) = addressing(&req)?;
        if kind == DriverKind::Macvlan && subnet.is_none() {
            return Err(bad_request!("a macvlan network needs --subnet: the subnet of the parent's network"));
        }
        let mut aux = BTreeMap::new();
        for (n, a) in &req.aux_addresses {
            let ip = parse_ip(&format!("--aux-address {n}"), a)?;
            if let Some((other, _)) = aux.iter().find(|(_, x)| **x == ip) {
                return Err(bad_request!("--aux-address {n}={ip}: {ip} is aux address {other} already"));
            }
            aux.insert(n.clone(), ip);
        }
        // What the host already has, read before reserving (netlink dumps, not under the lock).
        let host_nets = self.nl.addresses_v4(None).await?;
        let routed = if subnet.is_none() || o.host_access { self.nl.routed_prefixes().await? } else { vec![] };
        if let Some(b) = &o.bridge_name
            && self.nl.link_index(b).await?.is_some()
        {
            return Err(conflict!("{BRIDGE_NAME_OPT}={b}: a link named {b} exists already"));
        }
        if let Some(parent) = &o.parent {
            self.check_parent(parent, o.vlan.as_ref()).await?;
        }

        let id = state::new_id();
        // Nobody else knows this id yet: the lock is free, and taking it before the network
        // is visible makes every other request on it wait until it is built.
        let _lock = self.locks.lock(&id).await;
        let net = {
            let mut st = self.state();
            if st.network(&req.name).is_some_and(|n| n.name == req.name) {
                return Err(conflict!("network with name {} already exists", req.name));
            }
            let subnet = match subnet {
                Some(subnet) => {
                    if let Some(other) = st.overlapping(subnet) {
                        return Err(conflict!(
                            "subnet {subnet} overlaps with network {} ({})",
                            other.name,
                            other.ipam.map(|c| c.subnet.to_string()).unwrap_or_default()
                        ));
                    }
                    // The bridge would take an address of the host's own subnet and compete with
                    // its connected route: the host loses that link (our bridges were checked above).
                    // A macvlan network lives on the host's subnet by design.
                    if kind == DriverKind::Bridge
                        && let Some((ip, len)) = host_nets.iter().find(|(ip, len)| {
                            ipnet::Ipv4Net::new(*ip, *len).is_ok_and(|n| ipam::overlaps(n.trunc(), subnet))
                        })
                    {
                        return Err(conflict!("subnet {subnet} overlaps with the host's address {ip}/{len}"));
                    }
                    subnet
                }
                None => {
                    let mut taken = st.subnets();
                    taken.extend(routed.iter().copied());
                    ipam::next_free_subnet(&taken)
                        .ok_or_else(|| conflict!("no free subnet left in the default pools: give one with --subnet"))?
                }
            };
            let pool = ipam::pool(subnet, gateway, ip_range)?;
            for (n, ip) in &aux {
                if !subnet.contains(ip) {
                    return Err(bad_request!("--aux-address {n}={ip} is not inside subnet {subnet}"));
                }
                if *ip == pool.gateway {
                    return Err(bad_request!("--aux-address {n}={ip} is the gateway"));
                }
            }
            if let Some(b) = &o.bridge_name
                && let Some(other) = st.networks().find(|n| n.bridge.as_deref() == Some(b))
            {
                return Err(conflict!("bridge {b} belongs to network {} already", other.name));
            }
            let macvlan = match &o.parent {
                None => None,
                Some(parent) => {
                    if let Some(other) = st
                        .networks()
                        .find(|n| n.opts.macvlan.as_ref().is_some_and(|m| &m.parent == parent && m.mode != o.mode))
                    {
                        let m = other.opts.macvlan.as_ref().map(|m| m.mode.as_str()).unwrap_or_default();
                        return Err(conflict!(
                            "parent {parent} is used by macvlan network {} in mode {m}: a parent takes one mode",
                            other.name
                        ));
                    }
                    if o.mode == MacvlanMode::Passthru
                        && let Some(other) =
                            st.networks().find(|n| n.opts.macvlan.as_ref().is_some_and(|m| &m.parent == parent))
                    {
                        return Err(conflict!(
                            "parent {parent} is used by macvlan network {}: passthru needs it alone",
                            other.name
                        ));
                    }
                    let host_shim = if o.host_access {
                        let range = pool.range;
                        if routed.contains(&range) {
                            return Err(conflict!(
                                "{HOST_ACCESS_OPT} routes {range} to the network's containers, but the host routes \
                                 {range} already: give an --ip-range narrower than the parent's subnet"
                            ));
                        }
                        let taken: Vec<std::net::Ipv4Addr> =
                            host_nets.iter().map(|(ip, _)| *ip).chain(aux.values().copied()).collect();
                        // The shim's address: aux address "host" as Docker's documentation
                        // does it, else the highest free address of the range (netpath's own
                        // to hand out, so nobody else on the physical network has it).
                        let ip = match aux.get("host") {
                            Some(ip) => *ip,
                            None => (u32::from(range.network())..=u32::from(range.broadcast()))
                                .rev()
                                .map(std::net::Ipv4Addr::from)
                                .find(|ip| {
                                    *ip != subnet.network()
                                        && *ip != subnet.broadcast()
                                        && *ip != pool.gateway
                                        && !taken.contains(ip)
                                })
                                .ok_or_else(|| conflict!("no address left in {range} for the host's macvlan"))?,
                        };
                        Some((format!("np-m{}", &id[..11]), ip))
                    } else {
                        None
                    };
                    Some(state::Macvlan { parent: parent.clone(), mode: o.mode, vlan: o.vlan.clone(), host_shim })
                }
            };
            let net = Network {
                bridge: match kind {
                    DriverKind::Bridge => Some(o.bridge_name.clone().unwrap_or_else(|| format!("np-{}", &id[..12]))),
                    _ => None,
                },
                id: id.clone(),
                name: req.name,
                driver: kind,
                ipam: Some(IpamConfig { subnet: pool.subnet, gateway: pool.gateway, ip_range }),
                builtin: false,
                created: state::now(),
                index: st.next_network_index(),
                gateway_mode: o.gateway_mode,
                phase: Phase::Creating,
                opts: NetOpts {
                    internal: req.internal,
                    icc: o.icc,
                    masquerade: o.masquerade,
                    mtu: o.mtu,
                    labels: req.labels,
                    aux_addresses: aux,
                    macvlan,
                    default_deny: o.default_deny,
                    overlay: None,
                },
            };
            st.put_network(net.clone());
            net
        };
        if let Err(e) = self.persist_network(&id).await {
            self.state().remove_network(&id);
            return Err(e);
        }
        crash::point("network-create:reserved");
        let built = async {
            driver(net.driver).ensure_network(&self.nl, &net).await?;
            self.publish_network(&net)
        }
        .await;
        if let Err(e) = built {
            self.finish_network_removal(&net).await;
            return Err(e.into());
        }
        crash::point("network-create:built");
        self.state().set_network_phase(&id, Phase::Ready);
        if let Err(e) = self.persist_network(&id).await {
            self.finish_network_removal(&net).await;
            return Err(e);
        }
        if let Err(e) = self.refresh_host().await {
            warn!("refreshing host addresses: {e:#}");
        }
        self.firewall_changed().await; // rules naming it by name apply to it now
        info!("network {} created ({})", net.name, net.ipam.map(|i| i.subnet.to_string()).unwrap_or_default());
        let st = self.state();
        Ok(self.network_json(&st, st.network_by_id(&id).unwrap_or(&net)))
    }

    /// A macvlan parent must be there and up; `IFACE.VID` needs its IFACE, and VLAN support
    /// in the kernel unless the VLAN link exists already.
    async fn check_parent(&self, parent: &str, vlan: Option<&(String, u16)>) -> Result<()> {
        let iface = match (self.nl.link_state(parent).await?, vlan) {
            (Some(s), _) => Some((parent, s)),
            (None, None) => return Err(bad_request!("parent interface {parent} does not exist")),
            (None, Some((lower, _))) => {
                if !kernel_has_vlan() {
                    return Err(bad_request!(
                        "parent {parent} is a VLAN, but the kernel lacks VLAN (802.1q) support (CONFIG_VLAN_8021Q)"
                    ));
                }
                let s = self
                    .nl
                    .link_state(lower)
                    .await?
                    .ok_or_else(|| bad_request!("parent interface {lower} (of VLAN {parent}) does not exist"))?;
                Some((lower.as_str(), s))
            }
        };
        if let Some((name, (_, up, alias))) = iface {
            if alias.as_deref() == Some(crate::netlink::OWNER_ALIAS) && vlan.is_none() {
                return Err(bad_request!("parent interface {name} is one of netpath's own"));
            }
            if !up {
                return Err(bad_request!("parent interface {name} is down: bring it up first"));
            }
        }
        Ok(())
    }

    pub fn list_networks(&self) -> Value {
        let st = self.state();
        let mut nets: Vec<&Network> = st.networks().collect();
        nets.sort_by(|a, b| a.name.cmp(&b.name));
        Value::Array(nets.into_iter().map(|n| self.network_json(&st, n)).collect())
    }

    pub fn inspect_network(&self, name: &str) -> Result<Value> {
        let st = self.state();
        Ok(self.network_json(&st, lookup(&st, name)?))
    }

    pub async fn remove_network(&self, name: &str) -> Result<()> {
        self.wait_ready().await;
        let net = lookup(&self.state(), name)?.clone();
        if net.driver == DriverKind::Overlay {
            return self.remove_overlay_network(&net).await;
        }
        let id = net.id;
        let _lock = self.locks.lock(&id).await;
        let net = {
            let mut st = self.state();
            let net = st.network_by_id(&id).ok_or_else(|| not_found!("network {name} not found"))?.clone();
            if net.builtin {
                return Err(conflict!("{} is a pre-defined network and cannot be removed", net.name));
            }
            // A removal that failed half-way may be retried; a network being built may not go.
            if net.phase == Phase::Creating {
                return Err(conflict!("network {} is still being created", net.name));
            }
            let mut users: Vec<(u64, &str)> =
                st.endpoints_on(&net.id).map(|(c, _)| (c.created, c.name.as_str())).collect();
            users.sort();
            let users: Vec<&str> = users.into_iter().map(|(_, n)| n).collect();
            if !users.is_empty() {
                return Err(conflict!("network {} is in use by container(s): {}", net.name, users.join(", ")));
            }
            if let Some(s) = st.services().find(|s| s.vips.iter().any(|v| v.network_id == net.id)) {
                return Err(conflict!("network {} is in use by service {}", net.name, s.name));
            }
            st.set_network_phase(&id, Phase::Removing);
            net
        };
        if let Err(e) = self.persist_network(&id).await {
            self.state().set_network_phase(&id, Phase::Ready);
            return Err(e);
        }
        crash::point("network-rm:marked");
        driver(net.driver).remove_network(&self.nl, &net).await?;
        crash::point("network-rm:removed");
        self.finish_network_removal(&net).await;
        if let Err(e) = self.refresh_host().await {
            warn!("refreshing host addresses: {e:#}");
        }
        info!("network {} removed", net.name);
        Ok(())
    }

    /// `network prune`: removes every user-defined network no container uses; returns their
    /// names. A network that cannot go (in use meanwhile, being built) is left, as Docker does.
    pub async fn prune_networks(&self) -> Result<Value> {
        self.wait_ready().await;
        let candidates: Vec<String> = {
            let st = self.state();
            st.networks()
                .filter(|n| !n.builtin && n.phase == Phase::Ready && st.member_count(&n.id) == 0)
                .map(|n| n.name.clone())
                .collect()
        };
        let mut removed = vec![];
        for name in candidates {
            match self.remove_network(&name).await {
                Ok(()) => removed.push(name),
                Err(e) => warn!("network prune: {name}: {e}"),
            }
        }
        removed.sort();
        Ok(serde_json::json!({ "NetworksDeleted": removed }))
    }

    /// Removes what a network made (kernel objects, datapath entry, record); used by `rm`, by
    /// a failed `create` and by reconcile for operations a dead daemon left half done.
    pub(super) async fn finish_network_removal(&self, net: &Network) {
        self.detach_overlay_bridge(net).await;
        if let Err(e) = driver(net.driver).remove_network(&self.nl, net).await {
            warn!("network {}: {e:#}", net.name);
        }
        if let (true, Some(ipam)) = (net.driver.is_bridged(), net.ipam) {
            let _ = self.dp().remove_network(ipam.subnet);
        }
        if let (Some(ov), Some(o)) = (&net.opts.overlay, &self.overlay_dp) {
            let _ = o.overlay_remove_network(ov.vni);
        }
        // A VLAN link goes with the last network on it, and only if netpath made it.
        if let Some(mv) = &net.opts.macvlan
            && mv.vlan.is_some()
        {
            let shared = self
                .state()
                .networks()
                .any(|n| n.id != net.id && n.opts.macvlan.as_ref().is_some_and(|m| m.parent == mv.parent));
            if !shared {
                match self.nl.delete_own_link(&mv.parent).await {
                    Ok(true) => info!("VLAN link {} removed with network {}", mv.parent, net.name),
                    Ok(false) => {}
                    Err(e) => warn!("network {}: {e:#}", net.name),
                }
            }
        }
        self.state().remove_network(&net.id);
        self.firewall_changed().await;
        if let Err(e) = self.persist_network(&net.id).await {
            warn!("network {}: {e}", net.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(kind: DriverKind, kv: &[(&str, &str)]) -> Result<Options> {
        parse_options(kind, &kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn vlan_parents_split_into_lower_link_and_id() {
        assert_eq!(split_vlan("eth0.10").unwrap(), Some(("eth0".into(), 10)));
        assert_eq!(split_vlan("bond0.1.4094").unwrap(), Some(("bond0.1".into(), 4094)));
        assert_eq!(split_vlan("eth0").unwrap(), None);
        assert_eq!(split_vlan("my.link").unwrap(), None, "a dotted name that is not IFACE.VID");
        for bad in ["eth0.0", "eth0.4095", "eth0.99999"] {
            let e = split_vlan(bad).unwrap_err().to_string();
            assert!(e.contains("outside 1-4094"), "{bad}: {e}");
        }
    }

    #[test]
    fn options_parse_with_dockers_defaults_and_names() {
        let o = opts(DriverKind::Bridge, &[]).unwrap();
        assert!(o.icc && o.masquerade && o.mtu.is_none() && o.gateway_mode == GatewayMode::Nat);
        let o = opts(DriverKind::Bridge, &[(ICC_OPT, "false"), (MASQUERADE_OPT, "0"), (MTU_OPT, "9000")]).unwrap();
        assert!(!o.icc && !o.masquerade);
        assert_eq!(o.mtu, Some(9000));
        let o = opts(DriverKind::Macvlan, &[(PARENT_OPT, "eth0.20"), (MODE_OPT, "vepa")]).unwrap();
        assert_eq!(
            (o.parent.as_deref(), o.vlan, o.mode),
            (Some("eth0.20"), Some(("eth0".into(), 20)), MacvlanMode::Vepa)
        );
        // Each driver takes its own options only.
        assert!(opts(DriverKind::Bridge, &[(PARENT_OPT, "eth0")]).is_err());
        assert!(opts(DriverKind::Macvlan, &[(PARENT_OPT, "eth0"), (MTU_OPT, "1400")]).is_err());
        assert!(opts(DriverKind::Macvlan, &[(MODE_OPT, "bridge")]).is_err(), "no parent");
        let e = opts(DriverKind::Macvlan, &[(PARENT_OPT, "eth0"), (MODE_OPT, "passthru"), (HOST_ACCESS_OPT, "true")]);
        assert!(e.unwrap_err().to_string().contains("needs macvlan_mode bridge"));
    }

    #[test]
    fn datapath_flags_follow_the_options() {
        let mut n = state::tests::network("n", "10.1.0.0/24");
        n.gateway_mode = GatewayMode::Nat;
        assert_eq!(datapath_flags(&n), net_flags::MASQUERADE);
        n.opts.masquerade = false;
        assert_eq!(datapath_flags(&n), 0);
        n.opts.icc = false;
        assert_eq!(datapath_flags(&n), net_flags::NO_ICC);
        n.gateway_mode = GatewayMode::NatUnprotected;
        n.opts.internal = true;
        assert_eq!(datapath_flags(&n), net_flags::INTERNAL | net_flags::NO_ICC, "internal: no way out or in");
    }
}
