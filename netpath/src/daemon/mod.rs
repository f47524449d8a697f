//! The daemon's control plane: every request goes CLI → API → here → state (persisted) →
//! driver → datapath. Mutations validate everything first, then change the kernel, then
//! persist; a failure part-way undoes what was done so state stays as it was.

mod dns;
pub mod process;
mod view;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use serde_json::Value;
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::api::{Connect, ContainerCreate, NetworkCreate, ProcessReport};
use crate::datapath::Datapath;
use crate::drivers::driver;
use crate::error::{Error, Result};
use crate::ipam;
use crate::netlink::{Netlink, netns};
use crate::ports;
use netpath_common::net_flags;

use crate::state::{
    self, Container, DriverKind, Endpoint, GatewayMode, IpamConfig, Network, Process, Sandbox, State, Store,
};

/// The default bridge network, as in Docker.
pub const DEFAULT_BRIDGE: &str = "netpath0";
const DEFAULT_SUBNET: &str = "172.17.0.0/16";

#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub bpffs: PathBuf,
    pub uplinks: Vec<String>,
    /// The host's resolver configuration: upstreams of the embedded DNS server.
    pub resolv_conf: PathBuf,
}

pub struct Daemon {
    store: Store,
    state: State,
    nl: Netlink,
    datapath: Datapath,
    uplinks: Vec<String>,
    dns: crate::dns::Dns,
}

pub type Shared = Arc<Mutex<Daemon>>;

/// A detached process the API layer must watch (it holds the shared handle the watcher needs).
pub struct Started {
    pub container_id: String,
    pub child: tokio::process::Child,
}

fn valid_name(kind: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(bad_request!(
            "invalid {kind} name {name:?}: use letters, digits, '_', '.', '-' (starting with a letter or digit, at most 64)"
        ))
    }
}

/// The gateway mode the options ask for; any option netpath does not know is an error rather
/// than silently ignored.
fn gateway_mode(options: &std::collections::BTreeMap<String, String>) -> Result<GatewayMode> {
    let mut mode = GatewayMode::default();
    for (k, v) in options {
        if k != state::GATEWAY_MODE_OPT {
            return Err(bad_request!("unsupported network option {k:?} (supported: {})", state::GATEWAY_MODE_OPT));
        }
        mode = GatewayMode::parse(v)
            .ok_or_else(|| bad_request!("invalid {k} {v:?}: use nat, nat-unprotected or routed"))?;
    }
    Ok(mode)
}

fn parse_ip(what: &str, s: &str) -> Result<Ipv4Addr> {
    s.parse().map_err(|_| bad_request!("invalid {what} {s:?}: expected an IPv4 address"))
}

/// Brings up `lo` in a namespace (it is always ifindex 1).
async fn lo_up(path: &Path) -> anyhow::Result<()> {
    Netlink::in_netns(path)?.set_up(1).await.context("bringing up lo")
}

impl Daemon {
    /// Opens state, loads the datapath and makes the kernel match the persisted state.
    pub async fn start(cfg: &Config) -> anyhow::Result<Self> {
        let store = Store::open(&cfg.state_dir)?;
        let state = store.load()?;
        let nl = Netlink::current()?;
        for up in &cfg.uplinks {
            nl.link_index(up).await?.with_context(|| format!("--uplink {up}: no such interface"))?;
        }
        let mut datapath = Datapath::load(&cfg.bpffs)
            .with_context(|| format!("loading datapath (pins in {})", cfg.bpffs.display()))?;
        // Published-port and masqueraded traffic is routed by the host between uplink and bridges.
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("enabling IPv4 forwarding")?;
        let uplinks = if cfg.uplinks.is_empty() { nl.default_route_links().await? } else { cfg.uplinks.clone() };
        // Without cgroup2 everything works except host processes reaching published ports.
        if let Err(e) = netns::cgroup2_root().and_then(|cg| datapath.attach_sockets(&cg, netns::current_cookie()?)) {
            warn!("host-local access to published ports is off: {e:#}");
        }
        let dns = crate::dns::Dns::new(&store.dir().join("containers"), &cfg.resolv_conf);
        let mut d = Self { store, state, nl, datapath, uplinks, dns };
        d.ensure_builtin_networks()?;
        d.reconcile().await;
        d.dns_reconcile(); // dns: serve every container again
        d.refresh_host().await?;
        d.store.save(&d.state)?;
        Ok(d)
    }

    /// Attaches the NAT programs to the uplinks and tells the datapath the host's addresses
    /// (which ones are "the host" for published ports, which one masquerades on each uplink).
    /// Run at start and periodically: addresses come and go under us.
    pub async fn refresh_host(&mut self) -> anyhow::Result<()> {
        for up in self.uplinks.clone() {
            let Some(idx) = self.nl.link_index(&up).await? else {
                warn!("uplink {up} is gone");
                continue;
            };
            let addr = self.nl.addresses_v4(Some(idx)).await?.first().map(|(a, _)| *a);
            self.datapath.attach_uplink(&up, idx, addr)?;
        }
        let addrs: Vec<Ipv4Addr> = self.nl.addresses_v4(None).await?.into_iter().map(|(a, _)| a).collect();
        self.datapath.sync_host_addrs(&addrs)
    }

    /// Periodic housekeeping: idle NAT entries, host addresses.
    pub async fn housekeeping(&mut self) {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: valid pointer to a timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let now = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
        if let Err(e) = self.datapath.expire_flows(now) {
            warn!("expiring flows: {e:#}");
        }
        if let Err(e) = self.refresh_host().await {
            warn!("refreshing host addresses: {e:#}");
        }
        self.collect_exits();
    }

    /// Tells the datapath about a bridge network (isolation, masquerade).
    fn publish_network(&mut self, net: &Network) -> anyhow::Result<()> {
        if let (DriverKind::Bridge, Some(ipam)) = (net.driver, net.ipam) {
            let flags = match net.gateway_mode {
                GatewayMode::Nat => net_flags::MASQUERADE,
                GatewayMode::NatUnprotected => net_flags::MASQUERADE | net_flags::DIRECT_ANY,
                GatewayMode::Routed => net_flags::DIRECT_PUBLISHED,
            };
            self.datapath.set_network(ipam.subnet, net.index, ipam.gateway, flags)?;
        }
        Ok(())
    }

    /// Points a container's published ports at its current primary address (or withdraws
    /// them if it has none). On a `routed` network, as with Docker, only the container port
    /// opens: no host port is mapped.
    fn publish_ports(&mut self, c: &Container) -> anyhow::Result<()> {
        let primary = c.primary_endpoint();
        let target = c.primary_ipv4();
        let routed = primary
            .and_then(|e| self.state.network(&e.network_id))
            .is_some_and(|n| n.gateway_mode == GatewayMode::Routed);
        for b in &c.ports {
            match target {
                Some(ip) if !routed => {
                    self.datapath.set_port(b.host_ip, b.host_port, b.proto.number(), ip, b.container_port)?
                }
                _ => self.datapath.remove_port(b.host_ip, b.host_port, b.proto.number())?,
            }
            if let Some(ip) = target {
                self.datapath.set_published(ip, b.container_port, b.proto.number())?;
            }
        }
        Ok(())
    }

    fn withdraw_ports(&mut self, c: &Container) {
        for b in &c.ports {
            let _ = self.datapath.remove_port(b.host_ip, b.host_port, b.proto.number());
        }
        self.withdraw_published(c);
    }

    /// Closes the container ports direct routing could reach on any of `c`'s addresses.
    fn withdraw_published(&mut self, c: &Container) {
        for ip in c.endpoints.iter().filter_map(|e| e.ipv4) {
            for b in &c.ports {
                let _ = self.datapath.remove_published(ip, b.container_port, b.proto.number());
            }
        }
    }

    pub fn uplinks(&self) -> &[String] {
        &self.uplinks
    }

    fn ensure_builtin_networks(&mut self) -> anyhow::Result<()> {
        let subnet = ipam::parse_subnet(DEFAULT_SUBNET)?;
        let builtin = [
            ("bridge", DriverKind::Bridge, Some(ipam::pool(subnet, None, None)?), Some(DEFAULT_BRIDGE.to_string())),
            ("host", DriverKind::Host, None, None),
            ("none", DriverKind::None, None, None),
        ];
        for (name, driver, pool, bridge) in builtin {
            if self.state.network(name).is_none() {
                self.state.networks.push(Network {
                    id: state::new_id(),
                    name: name.into(),
                    driver,
                    ipam: pool.map(|p| IpamConfig { subnet: p.subnet, gateway: p.gateway, ip_range: None }),
                    bridge,
                    builtin: true,
                    created: state::now(),
                    index: 0,
                    gateway_mode: GatewayMode::default(),
                });
            }
        }
        Ok(())
    }

    /// Brings the kernel back in line with the state after a (re)start: bridges, namespaces,
    /// veths, addresses, routes, datapath attachments. Keeps going past errors and logs them,
    /// so one broken container does not keep the others offline.
    async fn reconcile(&mut self) {
        // Networks from before indexes existed get one.
        for i in 0..self.state.networks.len() {
            if self.state.networks[i].index == 0 {
                self.state.networks[i].index = self.state.next_network_index();
            }
        }
        for net in self.state.networks.clone() {
            if let Err(e) = driver(net.driver).ensure_network(&self.nl, &net).await {
                warn!("network {}: {e:#}", net.name);
            }
            if let Err(e) = self.publish_network(&net) {
                warn!("network {}: {e:#}", net.name);
            }
        }
        for c in self.state.containers.clone() {
            if let Sandbox::Netns { path, owned: true } = &c.sandbox
                && !netns::is_mounted(path)
            {
                info!("container {}: namespace gone (reboot?), recreating it", c.name);
                if let Err(e) = async {
                    netns::create(path)?;
                    lo_up(path).await
                }
                .await
                {
                    warn!("container {}: {e:#}", c.name);
                    continue;
                }
            }
            if let Err(e) = self.wire_all(&c).await {
                warn!("container {}: {e:#}", c.name);
            }
            if let Err(e) = self.publish_ports(&c) {
                warn!("container {}: {e:#}", c.name);
            }
        }
        // Ports published by a daemon that died between changing the maps and the state.
        let wanted: std::collections::HashSet<_> = self
            .state
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().map(|b| (b.host_ip, b.host_port, b.proto.number())))
            .collect();
        for (host, port, proto) in self.datapath.port_keys().unwrap_or_default() {
            if !wanted.contains(&(host, port, proto)) {
                info!("withdrawing stale published port {port}/{proto}");
                let _ = self.datapath.remove_port(host, port, proto);
            }
        }
        let open: std::collections::HashSet<_> = self
            .state
            .containers
            .iter()
            .filter_map(|c| c.primary_ipv4().map(|ip| (ip, c)))
            .flat_map(|(ip, c)| c.ports.iter().map(move |b| (ip, b.container_port, b.proto.number())))
            .collect();
        for (ip, port, proto) in self.datapath.published_keys().unwrap_or_default() {
            if !open.contains(&(ip, port, proto)) {
                let _ = self.datapath.remove_published(ip, port, proto);
            }
        }
        // Counters of endpoints that disappeared while we were down.
        let live: Vec<u32> = futures::future::join_all(
            self.state.containers.iter().flat_map(|c| c.endpoints.iter().filter_map(|e| e.host_ifname.clone())).map(
                |n| {
                    let nl = self.nl.clone();
                    async move { nl.link_index(&n).await.ok().flatten() }
                },
            ),
        )
        .await
        .into_iter()
        .flatten()
        .collect();
        if let Ok(keys) = self.datapath.stats_keys() {
            for k in keys.into_iter().filter(|k| !live.contains(k)) {
                let _ = self.datapath.detach_endpoint(k);
            }
        }
    }

    async fn wire_all(&mut self, c: &Container) -> anyhow::Result<()> {
        for (i, ep) in c.endpoints.iter().enumerate() {
            self.wire(c, ep, i == 0).await?;
        }
        Ok(())
    }

    /// Wires one endpoint (driver) and attaches the datapath to its host interface.
    async fn wire(&mut self, c: &Container, ep: &Endpoint, primary: bool) -> anyhow::Result<()> {
        let net = self.state.network_by_id(&ep.network_id).context("endpoint on unknown network")?.clone();
        let host_if = driver(net.driver).ensure_endpoint(&self.nl, &net, &c.sandbox, ep, primary).await?;
        if let (Some(idx), Some(name)) = (host_if, ep.host_ifname.as_deref()) {
            self.datapath.attach_endpoint(name, idx)?;
            if let (Some(ip), Some(mac), Some(ipam)) = (ep.ipv4, ep.mac, net.ipam) {
                self.datapath.set_endpoint(ip, idx, net.index, mac, ipam::mac_for(ipam.gateway))?;
            }
        }
        Ok(())
    }

    /// Detaches the datapath and unwires one endpoint.
    async fn unwire(&mut self, ep: &Endpoint) -> anyhow::Result<()> {
        if let Some(name) = ep.host_ifname.as_deref()
            && let Some(idx) = self.nl.link_index(name).await?
        {
            self.datapath.detach_endpoint(idx)?;
        }
        if let Some(ip) = ep.ipv4 {
            self.datapath.remove_endpoint(ip)?;
            self.datapath.flush_flows(ip)?;
        }
        let net = self.state.network_by_id(&ep.network_id).context("endpoint on unknown network")?.clone();
        driver(net.driver).remove_endpoint(&self.nl, &net, ep).await
    }

    fn net(&self, name: &str) -> Result<&Network> {
        self.state.network(name).ok_or_else(|| not_found!("network {name} not found"))
    }

    fn ctr(&self, name: &str) -> Result<&Container> {
        self.state.container(name).ok_or_else(|| not_found!("container {name} not found"))
    }

    fn persist(&self) -> Result<()> {
        self.store.save(&self.state).map_err(Error::Internal)
    }

    // ---------------------------------------------------------------- networks

    pub async fn create_network(&mut self, req: NetworkCreate) -> Result<Value> {
        valid_name("network", &req.name)?;
        if self.state.network(&req.name).is_some_and(|n| n.name == req.name) {
            return Err(conflict!("network with name {} already exists", req.name));
        }
        let d = req.driver.as_deref().unwrap_or("bridge");
        let kind =
            DriverKind::parse(d).ok_or_else(|| bad_request!("unknown driver {d:?}: use bridge, host or none"))?;
        if kind != DriverKind::Bridge {
            return Err(bad_request!(
                "only one instance of the {} network is allowed: it exists already as {:?}",
                kind.as_str(),
                kind.as_str()
            ));
        }
        let gateway_mode = gateway_mode(&req.options)?;
        let subnet = match req.subnet.as_deref() {
            Some(s) => {
                let subnet = ipam::parse_subnet(s)?;
                if let Some(other) = self.state.overlapping(subnet) {
                    return Err(conflict!(
                        "subnet {subnet} overlaps with network {} ({})",
                        other.name,
                        other.ipam.map(|c| c.subnet.to_string()).unwrap_or_default()
                    ));
                }
                // The bridge would take an address of the host's own subnet and compete with
                // its connected route: the host loses that link (our bridges were checked above).
                let host_nets = self.nl.addresses_v4(None).await?;
                if let Some((ip, len)) = host_nets
                    .into_iter()
                    .find(|(ip, len)| ipnet::Ipv4Net::new(*ip, *len).is_ok_and(|n| ipam::overlaps(n.trunc(), subnet)))
                {
                    return Err(conflict!("subnet {subnet} overlaps with the host's address {ip}/{len}"));
                }
                subnet
            }
            None => {
                if req.gateway.is_some() || req.ip_range.is_some() {
                    return Err(bad_request!("--gateway and --ip-range need --subnet"));
                }
                let mut taken = self.state.subnets();
                taken.extend(self.nl.routed_prefixes().await?);
                ipam::next_free_subnet(&taken)
                    .ok_or_else(|| conflict!("no free subnet left in the default pools: give one with --subnet"))?
            }
        };
        let gateway = req.gateway.as_deref().map(|g| parse_ip("gateway", g)).transpose()?;
        let ip_range = req.ip_range.as_deref().map(ipam::parse_subnet).transpose()?;
        let pool = ipam::pool(subnet, gateway, ip_range)?;
        let id = state::new_id();
        let net = Network {
            bridge: Some(format!("np-{}", &id[..12])),
            id,
            name: req.name,
            driver: kind,
            ipam: Some(IpamConfig { subnet: pool.subnet, gateway: pool.gateway, ip_range }),
            builtin: false,
            created: state::now(),
            index: self.state.next_network_index(),
            gateway_mode,
        };
        let drv = driver(net.driver);
        if let Err(e) = async {
            drv.ensure_network(&self.nl, &net).await?;
            self.publish_network(&net)
        }
        .await
        {
            let _ = drv.remove_network(&self.nl, &net).await;
            if let Some(ipam) = net.ipam {
                let _ = self.datapath.remove_network(ipam.subnet);
            }
            return Err(e.into());
        }
        self.state.networks.push(net.clone());
        if let Err(e) = self.persist() {
            self.state.networks.pop();
            let _ = drv.remove_network(&self.nl, &net).await;
            return Err(e);
        }
        if let Err(e) = self.refresh_host().await {
            warn!("refreshing host addresses: {e:#}");
        }
        info!("network {} created ({})", net.name, subnet);
        Ok(self.network_json(&net))
    }

    pub fn list_networks(&self) -> Value {
        Value::Array(self.state.networks.iter().map(|n| self.network_json(n)).collect())
    }

    pub fn inspect_network(&self, name: &str) -> Result<Value> {
        Ok(self.network_json(self.net(name)?))
    }

    pub async fn remove_network(&mut self, name: &str) -> Result<()> {
        let net = self.net(name)?.clone();
        if net.builtin {
            return Err(conflict!("{} is a pre-defined network and cannot be removed", net.name));
        }
        let users: Vec<&str> = self.state.endpoints_on(&net.id).map(|(c, _)| c.name.as_str()).collect();
        if !users.is_empty() {
            return Err(conflict!("network {} is in use by container(s): {}", net.name, users.join(", ")));
        }
        driver(net.driver).remove_network(&self.nl, &net).await?;
        if let Some(ipam) = net.ipam {
            self.datapath.remove_network(ipam.subnet)?;
        }
        if let Err(e) = self.refresh_host().await {
            warn!("refreshing host addresses: {e:#}");
        }
        self.state.networks.retain(|n| n.id != net.id);
        self.persist()?;
        info!("network {} removed", net.name);
        Ok(())
    }

    // ---------------------------------------------------------------- containers

    /// Plans a new endpoint of `c_id` on `net`: address, MAC, interface names. Pure: nothing
    /// is changed until the caller wires it.
    fn plan_endpoint(&self, net: &Network, taken_ifnames: &[String], ip: Option<&str>) -> Result<Endpoint> {
        let requested = ip.map(|s| parse_ip("address", s)).transpose()?;
        let Some(pool) = net.pool() else {
            if requested.is_some() {
                return Err(bad_request!("network {} has no IPAM: --ip cannot be used", net.name));
            }
            return Ok(Endpoint {
                id: state::new_id(),
                network_id: net.id.clone(),
                ifname: String::new(),
                host_ifname: None,
                ipv4: None,
                mac: None,
                aliases: vec![],
            });
        };
        let ip = ipam::allocate(&pool, &self.state.used_addresses(&net.id), requested).map_err(|e| match e {
            Error::BadRequest(m) => Error::BadRequest(format!("network {}: {m}", net.name)),
            Error::Conflict(m) => Error::Conflict(format!("network {}: {m}", net.name)),
            e => e,
        })?;
        let ifname = (0..).map(|i| format!("eth{i}")).find(|n| !taken_ifnames.contains(n)).expect("unbounded");
        let id = state::new_id();
        Ok(Endpoint {
            host_ifname: Some(format!("veth{}", &id[..8])),
            id,
            network_id: net.id.clone(),
            ifname,
            ipv4: Some(ip),
            mac: Some(ipam::mac_for(ip)),
            aliases: vec![],
        })
    }

    /// `run` and `attach`: makes (or adopts) the sandbox, wires it to one network, optionally
    /// starts the detached process.
    pub async fn create_container(&mut self, req: ContainerCreate) -> Result<(Value, Option<Started>)> {
        valid_name("container", &req.name)?;
        if self.state.containers.iter().any(|c| c.name == req.name) {
            return Err(conflict!("container name {} is already in use", req.name));
        }
        if req.detach && req.cmd.is_empty() {
            return Err(bad_request!("a detached container needs a command"));
        }
        let net = self.net(req.network.as_deref().unwrap_or("bridge"))?.clone();
        if net.driver == DriverKind::Host && req.netns.is_some() {
            return Err(bad_request!("--network host cannot be used with --netns"));
        }
        if let Some(p) = &req.netns
            && !netns::is_mounted(Path::new(p))
        {
            return Err(bad_request!("{p} is not a network namespace"));
        }
        let dns_opts = dns::check_options(&req, &net)?; // dns: --alias, --dns, --dns-search, --hostname
        let ports = self.plan_ports(&req, &net)?;
        let mut ep = self.plan_endpoint(&net, &[], req.ip.as_deref())?;
        ep.aliases = dns_opts.aliases;
        let id = state::new_id();
        let sandbox = match (&req.netns, net.driver) {
            (_, DriverKind::Host) => Sandbox::Host,
            (Some(p), _) => Sandbox::Netns { path: PathBuf::from(p), owned: false },
            (None, _) => Sandbox::Netns { path: self.store.netns_path(&id), owned: true },
        };
        let mut c = Container {
            id,
            name: req.name,
            sandbox,
            endpoints: vec![ep],
            process: None,
            created: state::now(),
            ports,
            hostname: dns_opts.hostname,
            dns: dns_opts.dns,
            dns_search: dns_opts.dns_search,
        };

        if let Err(e) = async {
            self.build_sandbox(&c).await?;
            self.publish_ports(&c)?;
            self.dns_up(&c) // dns: names, 127.0.0.11, /etc files
        }
        .await
        {
            self.dns.container_gone(&c.id); // dns
            self.withdraw_ports(&c);
            self.teardown(&c).await;
            return Err(e.into());
        }
        self.state.containers.push(c.clone());
        if let Err(e) = self.persist() {
            self.state.containers.pop();
            self.dns.container_gone(&c.id); // dns
            self.withdraw_ports(&c);
            self.teardown(&c).await;
            return Err(e);
        }

        let mut started = None;
        if !req.cmd.is_empty() {
            c.process = Some(Process {
                cmd: req.cmd.clone(),
                pid: None,
                start_time: None,
                exit_code: None,
                detached: req.detach,
            });
            if req.detach {
                let (log, exit) = (self.store.log_path(&c.id), self.store.exit_path(&c.id));
                let iso = self.isolation(&c); // dns: own /etc files and hostname
                match process::spawn_detached(&req.cmd, self.sandbox_netns(&c).as_deref(), iso.as_ref(), &log, &exit) {
                    Ok(child) => {
                        let pid = child.id().unwrap_or_default();
                        let p = c.process.as_mut().unwrap();
                        p.pid = Some(pid);
                        p.start_time = process::start_time(pid);
                        started = Some(Started { container_id: c.id.clone(), child });
                    }
                    Err(e) => {
                        // Docker keeps a container whose command failed to start; so do we, exited.
                        c.process.as_mut().unwrap().exit_code = Some(127);
                        warn!("container {}: {e:#}", c.name);
                        let _ = std::fs::write(self.store.log_path(&c.id), format!("netpath: {e:#}\n"));
                    }
                }
            }
            *self.state.container_mut(&c.id).unwrap() = c.clone();
            self.persist()?;
        }
        info!("container {} created", c.name);
        Ok((self.container_json(&c), started))
    }

    /// Resolves `-p`/`-P`/`--expose` into bindings that clash with no other container's.
    fn plan_ports(&self, req: &ContainerCreate, net: &Network) -> Result<Vec<ports::Binding>> {
        let mut reqs = req.publish.iter().map(|s| ports::parse_publish(s)).collect::<Result<Vec<_>>>()?;
        let exposed = req.expose.iter().map(|s| ports::parse_expose(s)).collect::<Result<Vec<_>>>()?;
        if req.publish_all {
            reqs.extend(exposed);
        }
        if reqs.is_empty() {
            return Ok(vec![]);
        }
        if net.driver != DriverKind::Bridge {
            return Err(bad_request!("ports cannot be published on the {} network: use a bridge network", net.name));
        }
        ports::resolve(&reqs, &self.state.bindings_except(""))
    }

    async fn build_sandbox(&mut self, c: &Container) -> anyhow::Result<()> {
        if let Sandbox::Netns { path, owned } = &c.sandbox {
            if *owned {
                netns::create(path)?;
            }
            lo_up(path).await?;
        }
        self.wire_all(c).await
    }

    /// Undoes [`build_sandbox`] as far as it got; keeps going past errors and reports them all.
    async fn teardown(&mut self, c: &Container) -> Vec<String> {
        let mut errs = vec![];
        for ep in &c.endpoints {
            if let Err(e) = self.unwire(ep).await {
                errs.push(format!("endpoint {}: {e:#}", ep.ifname));
            }
        }
        if let Sandbox::Netns { path, owned: true } = &c.sandbox
            && let Err(e) = netns::remove(path)
        {
            errs.push(format!("{e:#}"));
        }
        errs
    }

    /// The namespace a container's processes enter; `None` means the daemon's own.
    fn sandbox_netns(&self, c: &Container) -> Option<PathBuf> {
        match &c.sandbox {
            Sandbox::Netns { path, .. } => Some(path.clone()),
            Sandbox::Host => None,
        }
    }

    pub fn is_running(c: &Container) -> bool {
        c.process
            .as_ref()
            .and_then(|p| p.pid.map(|pid| (pid, p.start_time)))
            .is_some_and(|(pid, t)| process::is_alive(pid, t))
    }

    pub async fn remove_container(&mut self, name: &str, force: bool) -> Result<()> {
        let c = self.ctr(name)?.clone();
        if Self::is_running(&c) {
            if !force {
                return Err(conflict!("container {} is running: stop it first or use rm -f", c.name));
            }
            self.kill(&c).await;
        }
        self.dns.container_gone(&c.id); // dns: its names go at once
        self.withdraw_ports(&c);
        let errs = self.teardown(&c).await;
        self.state.containers.retain(|x| x.id != c.id);
        let _ = std::fs::remove_file(self.store.log_path(&c.id));
        let _ = std::fs::remove_file(self.store.exit_path(&c.id));
        self.persist()?;
        info!("container {} removed", c.name);
        if errs.is_empty() {
            Ok(())
        } else {
            Err(Error::Internal(anyhow::anyhow!("container {} removed, with errors: {}", c.name, errs.join("; "))))
        }
    }

    /// SIGTERM, then SIGKILL if it is still there after a grace period.
    async fn kill(&self, c: &Container) {
        let Some((pid, t)) = c.process.as_ref().and_then(|p| p.pid.map(|pid| (pid, p.start_time))) else {
            return;
        };
        use nix::sys::signal::Signal;
        process::signal(pid, Signal::SIGTERM);
        for _ in 0..50 {
            if !process::is_alive(pid, t) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        process::signal(pid, Signal::SIGKILL);
        for _ in 0..50 {
            if !process::is_alive(pid, t) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    pub async fn stop_container(&mut self, name: &str) -> Result<()> {
        let c = self.ctr(name)?.clone();
        self.kill(&c).await;
        Ok(())
    }

    /// Records what the CLI reports about a foreground process.
    pub fn report_process(&mut self, name: &str, rep: ProcessReport) -> Result<()> {
        let id = self.ctr(name)?.id.clone();
        let c = self.state.container_mut(&id).unwrap();
        let Some(p) = c.process.as_mut() else {
            return Err(bad_request!("container {name} has no process"));
        };
        if let Some(pid) = rep.pid {
            p.pid = Some(pid);
            p.start_time = process::start_time(pid);
        }
        if rep.exit_code.is_some() {
            p.exit_code = rep.exit_code;
        }
        self.persist()
    }

    /// Called by the watcher when a detached process exits.
    pub fn process_exited(&mut self, container_id: &str, code: i32) {
        if let Some(p) = self.state.container_mut(container_id).and_then(|c| c.process.as_mut()) {
            p.exit_code = Some(code);
            if let Err(e) = self.persist() {
                warn!("recording exit: {e}");
            }
        }
    }

    /// Records the exit codes of detached processes that ended while nobody waited for them
    /// (started by an earlier daemon): their supervisors wrote them down.
    pub fn collect_exits(&mut self) {
        let ended: Vec<(String, i32)> = self
            .state
            .containers
            .iter()
            .filter(|c| c.process.as_ref().is_some_and(|p| p.detached && p.exit_code.is_none()))
            .filter(|c| !Self::is_running(c))
            .filter_map(|c| process::recorded_exit(&self.store.exit_path(&c.id)).map(|code| (c.id.clone(), code)))
            .collect();
        for (id, code) in ended {
            self.process_exited(&id, code);
        }
    }

    pub fn list_containers(&mut self, all: bool) -> Value {
        self.collect_exits();
        let cs: Vec<Container> = self.state.containers.iter().filter(|c| all || Self::is_running(c)).cloned().collect();
        Value::Array(cs.iter().map(|c| self.container_json(c)).collect())
    }

    pub fn inspect_container(&mut self, name: &str) -> Result<Value> {
        self.collect_exits();
        let c = self.ctr(name)?.clone();
        Ok(self.container_json(&c))
    }

    pub fn logs(&self, name: &str) -> Result<Vec<u8>> {
        let c = self.ctr(name)?;
        match std::fs::read(self.store.log_path(&c.id)) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn connect(&mut self, network: &str, req: Connect) -> Result<Value> {
        let net = self.net(network)?.clone();
        let c = self.ctr(&req.container)?.clone();
        if net.driver != DriverKind::Bridge {
            return Err(bad_request!("container cannot be connected to the {} network", net.name));
        }
        for e in &c.endpoints {
            let other = self.state.network_by_id(&e.network_id).map(|n| (n.driver, n.name.clone()));
            if let Some((DriverKind::Host | DriverKind::None, name)) = other {
                return Err(bad_request!(
                    "container {} uses the {name} network: it cannot join other networks",
                    c.name
                ));
            }
        }
        if c.endpoints.iter().any(|e| e.network_id == net.id) {
            return Err(conflict!("container {} is already connected to network {}", c.name, net.name));
        }
        let aliases = dns::check_aliases(&req.aliases, &net)?; // dns
        let taken: Vec<String> = c.endpoints.iter().map(|e| e.ifname.clone()).collect();
        let mut ep = self.plan_endpoint(&net, &taken, req.ip.as_deref())?;
        ep.aliases = aliases;
        let primary = c.endpoints.is_empty();
        if let Err(e) = self.wire(&c, &ep, primary).await {
            let _ = self.unwire(&ep).await;
            return Err(e.into());
        }
        self.state.container_mut(&c.id).unwrap().endpoints.push(ep.clone());
        if let Err(e) = self.persist() {
            self.state.container_mut(&c.id).unwrap().endpoints.pop();
            let _ = self.unwire(&ep).await;
            return Err(e);
        }
        let c = self.ctr(&c.id)?.clone();
        // A container that had no address yet now has one for its published ports.
        self.publish_ports(&c)?;
        self.dns_refresh(&c); // dns: resolvable on the new network
        Ok(self.container_json(&c))
    }

    pub async fn disconnect(&mut self, network: &str, container: &str) -> Result<()> {
        let net = self.net(network)?.clone();
        let c = self.ctr(container)?.clone();
        let Some(ep) = c.endpoints.iter().find(|e| e.network_id == net.id).cloned() else {
            return Err(not_found!("container {} is not connected to network {}", c.name, net.name));
        };
        // Its processes stay in the host's namespace whatever the state says.
        if net.driver == DriverKind::Host {
            return Err(bad_request!("container {} cannot be disconnected from the host network", c.name));
        }
        self.unwire(&ep).await?;
        // Its primary address may change: published ports follow it.
        self.withdraw_published(&c);
        self.state.container_mut(&c.id).unwrap().endpoints.retain(|e| e.id != ep.id);
        let c = self.ctr(&c.id)?.clone();
        self.publish_ports(&c)?;
        self.dns_refresh(&c); // dns: no longer resolvable there
        self.persist()
    }

    /// `netpath port NAME`: the container's published ports.
    pub fn ports(&self, name: &str) -> Result<Vec<ports::Binding>> {
        Ok(self.ctr(name)?.ports.clone())
    }

    /// Datapath-wide counters (drops by reason, conntrack).
    pub fn datapath_counters(&mut self) -> Result<crate::datapath::Counters> {
        Ok(self.datapath.counters()?)
    }

    /// The NAT table as JSON, for diagnostics and tests.
    pub fn flows(&mut self) -> Result<Value> {
        let v = self.datapath.flows()?;
        Ok(Value::Array(v.iter().map(|(k, e)| view::flow_json(k, e)).collect()))
    }
}
