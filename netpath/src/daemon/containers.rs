//! Containers: run/attach, rm, stop, connect/disconnect, processes, published ports.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use serde_json::Value;
use tracing::{info, warn};

use super::networks::{lookup as lookup_network, usable};
use super::reaper::Remains;
use super::{Daemon, crash, dns, lo_up, parse_ip, process, valid_name};
use crate::api::{Connect, ContainerCreate, ProcessReport};
use crate::drivers::driver;
use crate::error::{Error, Result};
use crate::ipam;
use crate::netlink::netns;
use crate::ports;
use crate::state::{
    self, Container, DriverKind, Endpoint, GatewayMode, MacvlanMode, Network, Phase, Process, Sandbox, State,
};

/// Linux bridges take at most 1,024 ports (BR_MAX_PORTS); one stays free for the kernel's
/// own bookkeeping. Docker fails at the same point ("exchange full"); we say why up front.
const MAX_BRIDGE_ENDPOINTS: usize = 1023;

fn lookup<'a>(st: &'a State, name: &str) -> Result<&'a Container> {
    st.container(name).ok_or_else(|| not_found!("container {name} not found"))
}

/// Plans a new endpoint on `net`: address, MAC, interface names. Pure: nothing is changed
/// until the caller records and wires it.
/// `host_addrs`: the host's own addresses, which a macvlan network (on the host's subnet) must
/// never hand out.
pub(super) fn plan_endpoint(
    st: &State,
    net: &Network,
    taken_ifnames: &[String],
    ip: Option<&str>,
    host_addrs: &[std::net::Ipv4Addr],
) -> Result<Endpoint> {
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
            phase: Phase::Ready,
            aliases: vec![],
        });
    };
    // Veths still being deleted hold their bridge ports too.
    if net.driver.is_bridged() && st.member_count(&net.id) + st.held_addresses(&net.id).len() >= MAX_BRIDGE_ENDPOINTS {
        return Err(conflict!(
            "network {} has {MAX_BRIDGE_ENDPOINTS} endpoints, the most a Linux bridge takes: use another network",
            net.name
        ));
    }
    if let Some(mv) = &net.opts.macvlan
        && mv.mode == MacvlanMode::Passthru
        && st.member_count(&net.id) > 0
    {
        return Err(conflict!(
            "network {} is a passthru macvlan network: its parent {} takes one container only",
            net.name,
            mv.parent
        ));
    }
    let reserved = reserved_addresses(net, host_addrs);
    let ip = ipam::allocate_except(&pool, st.used_addresses(&net.id), &reserved, requested).map_err(|e| match e {
        Error::BadRequest(m) => Error::BadRequest(format!("network {}: {m}", net.name)),
        Error::Conflict(m) => Error::Conflict(format!("network {}: {m}", net.name)),
        e => e,
    })?;
    let ifname = (0..).map(|i| format!("eth{i}")).find(|n| !taken_ifnames.contains(n)).expect("unbounded");
    let id = state::new_id();
    Ok(Endpoint {
        // A macvlan endpoint has no host side.
        host_ifname: net.driver.is_bridged().then(|| format!("veth{}", &id[..8])),
        id,
        network_id: net.id.clone(),
        ifname,
        ipv4: Some(ip),
        mac: Some(ipam::mac_for(ip)),
        phase: Phase::Ready,
        aliases: vec![],
    })
}

/// True when IPAM has no address left for `net` (the caller knows some are held for veths
/// being deleted, which will free one).
pub(super) fn only_held_left(st: &State, net: &Network, host_addrs: &[std::net::Ipv4Addr]) -> bool {
    net.pool().is_some_and(|pool| {
        ipam::allocate_except(&pool, st.used_addresses(&net.id), &reserved_addresses(net, host_addrs), None).is_err()
    })
}

/// Addresses of `net`'s subnet IPAM must not hand out, with who holds each: aux addresses, the
/// host shim's, and (macvlan: the subnet is the host's) the host's own.
fn reserved_addresses(net: &Network, host_addrs: &[std::net::Ipv4Addr]) -> Vec<(std::net::Ipv4Addr, String)> {
    let mut r: Vec<_> = net.opts.aux_addresses.iter().map(|(n, ip)| (*ip, format!("aux address {n}"))).collect();
    if let Some(mv) = &net.opts.macvlan {
        if let Some((_, ip)) = mv.host_shim {
            r.push((ip, "the host's macvlan shim".into()));
        }
        r.extend(host_addrs.iter().map(|ip| (*ip, "an address of the host".into())));
    }
    r
}

/// A program's attachment to a host veth, under way on a blocking thread.
type Attaching = tokio::task::JoinHandle<anyhow::Result<()>>;

/// Waits for every attachment (even after a failure: none is left running unseen) and returns
/// the first error.
async fn join_attaches(attaching: Vec<Attaching>) -> anyhow::Result<()> {
    let mut first = Ok(());
    for a in attaching {
        let r = a.await.unwrap_or_else(|e| Err(anyhow::anyhow!("attaching the datapath: {e}")));
        if first.is_ok() {
            first = r;
        }
    }
    first
}

/// A Linux interface name: 1-15 bytes, no '/', ':' or whitespace, not "." or "..".
fn valid_ifname(s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() < 16
        && s != "."
        && s != ".."
        && !s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if ok { Ok(()) } else { Err(bad_request!("invalid interface name {s:?}: 1-15 characters, no '/', ':' or spaces")) }
}

/// Resolves `-p`/`-P`/`--expose` into bindings that clash with no other container's. On a
/// macvlan network there is nothing to publish (containers are on the physical network):
/// accepted and ignored with a warning, as Docker does.
fn plan_ports(
    st: &State,
    req: &ContainerCreate,
    net: &Network,
    warnings: &mut Vec<String>,
) -> Result<Vec<ports::Binding>> {
    let mut reqs = req.publish.iter().map(|s| ports::parse_publish(s)).collect::<Result<Vec<_>>>()?;
    let exposed = req.expose.iter().map(|s| ports::parse_expose(s)).collect::<Result<Vec<_>>>()?;
    if req.publish_all {
        reqs.extend(exposed);
    }
    if reqs.is_empty() {
        return Ok(vec![]);
    }
    if net.driver == DriverKind::Macvlan {
        warnings.push(format!(
            "published ports are discarded on macvlan network {}: its containers are reached at their own addresses",
            net.name
        ));
        return Ok(vec![]);
    }
    if net.driver != DriverKind::Bridge {
        return Err(bad_request!("ports cannot be published on the {} network: use a bridge network", net.name));
    }
    if net.opts.internal {
        return Err(bad_request!("ports cannot be published on internal network {}: nothing reaches it", net.name));
    }
    ports::resolve(&reqs, &st.bindings_except(""))
}

/// The namespace a container's processes enter; `None` means the daemon's own.
fn sandbox_netns(c: &Container) -> Option<PathBuf> {
    match &c.sandbox {
        Sandbox::Netns { path, .. } => Some(path.clone()),
        Sandbox::Host => None,
    }
}

impl Daemon {
    pub fn is_running(c: &Container) -> bool {
        c.process
            .as_ref()
            .and_then(|p| p.pid.map(|pid| (pid, p.start_time)))
            .is_some_and(|(pid, t)| process::is_alive(pid, t))
    }

    /// Resolves a user's name for a container to its id (the key of its lock).
    fn container_id(&self, name: &str) -> Result<String> {
        Ok(lookup(&self.state(), name)?.id.clone())
    }

    /// The container `id` as it is now, once its lock is held (it may have gone meanwhile).
    pub(super) fn current(&self, id: &str, name: &str) -> Result<Container> {
        self.state().container_by_id(id).cloned().ok_or_else(|| not_found!("container {name} not found"))
    }

    /// The host's addresses, when `network` is a macvlan network (its subnet is the host's,
    /// whose addresses IPAM must skip); nothing to ask the kernel for otherwise.
    async fn host_addrs_for(&self, network: &str) -> Result<Vec<std::net::Ipv4Addr>> {
        let macvlan = self.state().network(network).is_some_and(|n| n.driver == DriverKind::Macvlan);
        if !macvlan {
            return Ok(vec![]);
        }
        Ok(self.nl.addresses_v4(None).await?.into_iter().map(|(ip, _)| ip).collect())
    }

    // ------------------------------------------------------------------ create

    /// `run` and `attach`: makes (or adopts) the sandbox, wires it to one network, optionally
    /// starts the detached process.
    pub async fn create_container(&self, req: ContainerCreate) -> Result<Value> {
        let (c, warnings) = self.create_container_record(req).await?;
        // No counters: a container made this instant has carried nothing worth a netlink
        // round trip per endpoint on the path every start takes (`inspect` has them).
        let mut v = self.container_json(&c, &Default::default());
        if !warnings.is_empty() {
            v["Warnings"] = serde_json::json!(warnings);
        }
        Ok(v)
    }

    /// [`Self::create_container`] without the `inspect` view (its counters cost netlink
    /// round trips a runtime's attach does not need).
    /// Also returns the warnings for the user (options accepted but ignored).
    pub(super) async fn create_container_record(&self, req: ContainerCreate) -> Result<(Container, Vec<String>)> {
        self.wait_ready().await;
        self.wait_networks_created(&req.network).await;
        let mut laps = super::Laps::new();
        valid_name("container", &req.name)?;
        if req.detach && req.cmd.is_empty() {
            return Err(bad_request!("a detached container needs a command"));
        }
        if let Some(p) = &req.netns
            && !netns::is_mounted(std::path::Path::new(p))
        {
            return Err(bad_request!("{p} is not a network namespace"));
        }
        if let Some(i) = &req.ifname {
            valid_ifname(i)?;
            if req.netns.is_none() {
                return Err(bad_request!("an interface name can only be chosen in an attached namespace"));
            }
        }
        let ingress_allow =
            req.ingress_allow.iter().map(|s| super::firewall::parse_ingress_allow(s)).collect::<Result<Vec<_>>>()?;
        let host_addrs = self.host_addrs_for(req.network.as_deref().unwrap_or("bridge")).await?;
        let mut warnings = vec![];
        let id = state::new_id();
        // Nobody else knows this id yet: the lock is free, and taking it before the container
        // is visible makes every other request on it wait until it is built.
        let _lock = self.locks.lock(&id).await;
        // An overlay address is the cluster's: claimed in etcd first, then reserved here.
        let claimed =
            self.claim_for(req.network.as_deref().unwrap_or("bridge"), &req.name, &id, req.ip.as_deref()).await?;
        let ip_arg = claimed.as_ref().map(|(_, ip)| ip.to_string()).or(req.ip.clone());
        // A container just removed may still hold the address (its veth is being deleted).
        self.wait_released(req.network.as_deref().unwrap_or("bridge"), ip_arg.as_deref(), &host_addrs).await;
        let reserved = (|| -> Result<Container> {
            let mut st = self.state();
            if st.container(&req.name).is_some_and(|c| c.name == req.name) {
                return Err(conflict!("container name {} is already in use", req.name));
            }
            let net = usable(&st, req.network.as_deref().unwrap_or("bridge"))?.clone();
            if net.driver == DriverKind::Host && req.netns.is_some() {
                return Err(bad_request!("--network host cannot be used with --netns"));
            }
            let dns_opts = dns::check_options(&req, &net)?; // --alias, --dns, --dns-search, --hostname
            let ports = plan_ports(&st, &req, &net, &mut warnings)?;
            let exposed = req
                .expose
                .iter()
                .map(|s| {
                    let p = ports::parse_expose(s)?;
                    Ok(ports::Exposed { from: p.container_ports.0, to: p.container_ports.1, proto: p.proto })
                })
                .collect::<Result<Vec<_>>>()?;
            let mut ep = plan_endpoint(&st, &net, &[], ip_arg.as_deref(), &host_addrs)?;
            ep.aliases = dns_opts.aliases;
            if let Some(ifname) = &req.ifname {
                ep.ifname = ifname.clone();
            }
            let sandbox = match (&req.netns, net.driver) {
                (_, DriverKind::Host) => Sandbox::Host,
                (Some(p), _) => Sandbox::Netns { path: PathBuf::from(p), owned: false },
                (None, _) => Sandbox::Netns { path: self.store.netns_path(&id), owned: true },
            };
            let c = Container {
                id: id.clone(),
                name: req.name.clone(),
                sandbox,
                endpoints: vec![ep],
                process: None,
                created: state::now(),
                ports,
                phase: Phase::Creating,
                hostname: dns_opts.hostname,
                dns: dns_opts.dns,
                dns_search: dns_opts.dns_search,
                labels: req.labels.clone(),
                ingress_allow,
                exposed,
            };
            st.put_container(c.clone());
            Ok(c)
        })();
        let c = match reserved {
            Ok(c) => c,
            Err(e) => {
                if let Some((net_id, ip)) = claimed {
                    self.release_overlay_address(&net_id, ip).await;
                }
                return Err(e);
            }
        };
        laps.lap("reserve");
        if let Err(e) = self.persist_container(&id).await {
            self.state().remove_container(&id);
            return Err(e);
        }
        laps.lap("persist");
        crash::point("run:reserved");
        let wiring = self.wiring(); // the reaper's deletions wait
        // The programs' attachments finish in the background (each waits out an RCU grace
        // period) while the rest is done; the container is not handed out before they have.
        let mut attaching = vec![];
        if let Err(e) = async {
            self.build_sandbox(&c, &mut attaching).await?;
            crash::point("run:wired");
            self.publish_ports(&c, c.primary_ipv4())?;
            // Its firewall rules are in before its process can take a connection.
            if self.firewall_names(&c) {
                self.firewall_changed().await;
            }
            self.dns_up(&c) // names, 127.0.0.11, /etc files
        }
        .await
        {
            let _ = join_attaches(attaching).await; // settled before the teardown
            self.finish_container_removal(&c).await;
            return Err(e.into());
        }
        crash::point("run:published");
        laps.lap("build");

        let mut started = None;
        let mut gate = None;
        let mut proc = None;
        if !req.cmd.is_empty() {
            let mut p = Process {
                cmd: req.cmd.clone(),
                pid: None,
                start_time: None,
                exit_code: None,
                detached: req.detach,
                start_error: None,
            };
            if req.detach {
                let (log, exit) = (self.store.log_path(&id), self.store.exit_path(&id));
                let iso = self.isolation(&c); // own /etc files and hostname
                let (cmd, netns, spawner) = (req.cmd.clone(), sandbox_netns(&c), self.spawner.clone());
                // Off the async workers: a fork, an exec and a wait for the supervisor's first
                // half, which cost more the more descriptors and memory the daemon has.
                let spawned = tokio::task::spawn_blocking(move || {
                    process::spawn_detached(&cmd, netns.as_deref(), iso.as_ref(), &log, &exit, &spawner)
                })
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("starting the process: {e}")));
                let log = self.store.log_path(&id);
                match spawned {
                    Ok((pid, g)) => {
                        p.pid = Some(pid);
                        p.start_time = process::start_time(pid);
                        started = Some(pid);
                        gate = Some(g);
                    }
                    Err(e) => {
                        // Docker keeps a container whose command failed to start; so do we, exited.
                        p.exit_code = Some(127);
                        p.start_error = Some(format!("{e:#}"));
                        warn!("container {}: {e:#}", c.name);
                        let _ = std::fs::write(&log, format!("netpath: {e:#}\n"));
                    }
                }
            }
            proc = Some(p);
        }
        crash::point("run:started");
        laps.lap("spawn");
        self.state().update_container(&id, |x| {
            x.phase = Phase::Ready;
            x.process = proc;
        });
        // Ready on disk before the attachments are known to be done: a daemon that dies
        // meanwhile leaves a container whose veth is on its bridge, which the next one adopts
        // (attaching the program again), and a process that runs once the daemon is gone.
        let persisted = self.persist_container(&id).await;
        laps.lap("persist");
        let attached = join_attaches(attaching).await;
        laps.lap("attach");
        drop(wiring);
        if let Err(e) = persisted.and(attached.map_err(Error::from)) {
            if let Some(pid) = started {
                // Held before its command: nothing to stop gracefully.
                process::signal(pid, nix::sys::signal::Signal::SIGKILL);
                self.kill_pid(Some(pid), None).await;
            }
            drop(gate);
            self.finish_container_removal(&c).await;
            return Err(e);
        }
        if let Some(g) = gate {
            g.release(); // wired: its command runs
        }
        let c = self.current(&id, &c.name)?;
        info!("container {} created", c.name);
        tracing::debug!("run {}: {laps}", c.name);
        Ok((c, warnings))
    }

    /// Makes the namespace and wires every endpoint; the programs' attachments are left
    /// running in `attaching`, for the caller to join.
    async fn build_sandbox(&self, c: &Container, attaching: &mut Vec<Attaching>) -> anyhow::Result<()> {
        let mut laps = super::Laps::new();
        if let Sandbox::Netns { path, owned } = &c.sandbox {
            if *owned {
                self.new_sandbox_netns(path).await?; // lo is up
            }
            laps.lap("netns");
            crash::point("run:sandbox");
            if !*owned {
                lo_up(path).await?;
            }
            laps.lap("lo");
        }
        for (i, ep) in c.endpoints.iter().enumerate() {
            attaching.extend(self.wire_start(c, ep, i == 0).await?);
        }
        laps.lap("wire");
        tracing::debug!("build {}: {laps}", c.name);
        Ok(())
    }

    /// Wires one endpoint (driver) and attaches the datapath to its host interface.
    pub(super) async fn wire(&self, c: &Container, ep: &Endpoint, primary: bool) -> anyhow::Result<()> {
        join_attaches(self.wire_start(c, ep, primary).await?.into_iter().collect()).await
    }

    /// [`Self::wire`], returning while the program's attachment is still under way (joined
    /// with [`join_attaches`]). Every netlink request comes first: the attachment holds the
    /// kernel's RTNL lock through its grace period, and would make them wait for it.
    async fn wire_start(&self, c: &Container, ep: &Endpoint, primary: bool) -> anyhow::Result<Option<Attaching>> {
        let mut laps = super::Laps::new();
        let net = self.state().network_by_id(&ep.network_id).context("endpoint on unknown network")?.clone();
        let host_if = driver(net.driver).ensure_endpoint(&self.nl, &net, &c.sandbox, ep, primary).await?;
        laps.lap("driver");
        let mut attaching = None;
        if let (Some(idx), Some(name)) = (host_if, ep.host_ifname.clone()) {
            let links = self.links.clone();
            let a = tokio::task::spawn_blocking(move || links.attach(&name, idx));
            if let Err(e) = self.endpoint_maps(&net, ep, idx) {
                let _ = join_attaches(vec![a]).await; // settled before the caller unwires
                return Err(e);
            }
            self.xdp_endpoint(PeerEnd::of(&c.sandbox, ep), ep, idx);
            attaching = Some(a);
        }
        self.overlay_endpoint_up(c, ep, &net).await; // the other nodes learn where it is
        laps.lap("cluster");
        tracing::debug!("wire {} {}: {laps}", c.name, ep.ifname);
        Ok(attaching)
    }

    /// The datapath side of a wired endpoint: the program on its host veth, its map entry.
    pub(super) fn attach_endpoint(&self, net: &Network, ep: &Endpoint, host_if: &str, idx: u32) -> anyhow::Result<()> {
        // Without the datapath's lock: the kernel makes a new link wait for a grace period.
        self.links.attach(host_if, idx)?;
        self.endpoint_maps(net, ep, idx)
    }

    /// An endpoint's map entries: where its address is delivered, and (overlay) that it is here.
    fn endpoint_maps(&self, net: &Network, ep: &Endpoint, idx: u32) -> anyhow::Result<()> {
        if let (Some(ip), Some(mac), Some(ipam)) = (ep.ipv4, ep.mac, net.ipam) {
            self.dp().set_endpoint(ip, idx, net.index, mac, ipam::mac_for(ipam.gateway))?;
            // Packets from other nodes for this address come out of the VXLAN device here.
            if let (Some(ov), Some(o)) = (&net.opts.overlay, &self.overlay_dp) {
                o.overlay_add_local(ov.vni, ip, idx, mac)?;
            }
        }
        Ok(())
    }

    /// Makes the endpoint's veth (host side `idx`) a target of uplink_xdp's redirects where
    /// it can take them: with `--xdp` native (or auto) only once its container end (`peer`)
    /// has NAPI (GRO on). Where that fails, uplink_xdp leaves the endpoint's flows to TC, as before.
    pub(super) fn xdp_endpoint(&self, peer: PeerEnd<'_>, ep: &Endpoint, idx: u32) {
        let setting = self.dp().xdp_setting();
        let gro = |r: anyhow::Result<()>| match r {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!("endpoint {}: {e:#}; its flows stay on TC", ep.ifname);
                false
            }
        };
        let ready = match (setting, peer) {
            (crate::datapath::XdpSetting::Off, _) => false,
            (s, _) if !s.needs_peer_napi() => true,
            (_, PeerEnd::Named(ns, name)) => gro(crate::netlink::ethtool::enable_gro(ns, name)),
            (_, PeerEnd::Index(ns, index, renew)) => gro(crate::netlink::ethtool::enable_gro_index(ns, index, renew)),
            (_, PeerEnd::Unknown) => false,
        };
        // Not ready: an entry an earlier daemon made (in another mode) goes.
        if let Err(e) = self.dp().set_xdp_port(idx, ready) {
            tracing::warn!("endpoint {}: {e:#}; its flows stay on TC", ep.ifname);
        }
    }

    /// Detaches the datapath and unwires one endpoint; a half-gone endpoint is fine. The veth
    /// goes first: its program goes with it, which spares it a detach (an RCU grace period
    /// under the RTNL lock). With `remains`, a host-side veth is left to the reaper instead,
    /// with the address it holds until then.
    async fn unwire(
        &self,
        container_id: &str,
        sandbox: &Sandbox,
        ep: &Endpoint,
        remains: Option<&mut Remains>,
    ) -> anyhow::Result<()> {
        let mut laps = super::Laps::new();
        let net = self.state().network_by_id(&ep.network_id).cloned();
        if let (Some(ov), Some(o), Some(ip)) =
            (net.as_ref().and_then(|n| n.opts.overlay.as_ref()), &self.overlay_dp, ep.ipv4)
        {
            let _ = o.overlay_remove_local(ov.vni, ip);
        }
        if let Some(net) = net {
            self.overlay_endpoint_down(container_id, ep, &net).await; // record and address claim go
        }
        if let Some(ip) = ep.ipv4 {
            self.dp().remove_endpoint(ip)?;
            self.flush_flows(ip).await;
        }
        laps.lap("maps");
        // No netlink request here at all: a deletion the reaper is making holds the RTNL lock.
        if let (Some(r), Some(host)) = (remains, &ep.host_ifname) {
            r.links.push(host.clone());
            r.held.extend(ep.ipv4.map(|ip| (ep.network_id.clone(), ip)));
            tracing::debug!("unwire {}: {laps}, veth left to the reaper", ep.ifname);
            return Ok(());
        }
        let idx = match ep.host_ifname.as_deref() {
            Some(name) => self.nl.link_index(name).await?,
            None => None,
        };
        let net = self.state().network_by_id(&ep.network_id).cloned();
        let removed = match net {
            Some(net) => driver(net.driver).remove_endpoint(&self.nl, &net, sandbox, ep).await,
            // Its network went first (a crash between the two): only a veth can be left.
            None => match &ep.host_ifname {
                Some(h) => self.nl.delete_link(h).await,
                None => Ok(()),
            },
        };
        laps.lap("link");
        if let Some(idx) = idx {
            if removed.is_ok() {
                self.links.forget(idx);
            } else {
                self.dp().detach_endpoint(idx);
            }
        }
        laps.lap("pins");
        tracing::debug!("unwire {}: {laps}", ep.ifname);
        removed
    }

    /// Undoes [`Self::build_sandbox`] as far as it got; keeps going past errors and reports
    /// them all. `sweep`: also kill whatever still runs in its namespace (a creation that
    /// died before recording its process); a plain `rm` has stopped the process it knows.
    /// A namespace of its own and its veths are left in the returned remains, for the reaper;
    /// the veths of a runtime's namespace go now (its next attachment may reuse their names).
    async fn teardown(&self, c: &Container, sweep: bool) -> (Vec<String>, Remains) {
        let mut errs = vec![];
        let mut remains = Remains { name: c.name.clone(), ..Default::default() };
        let own = matches!(c.sandbox, Sandbox::Netns { owned: true, .. });
        for ep in &c.endpoints {
            if let Err(e) = self.unwire(&c.id, &c.sandbox, ep, own.then_some(&mut remains)).await {
                errs.push(format!("endpoint {}: {e:#}", ep.ifname));
            }
        }
        if let Sandbox::Netns { path, owned: true } = &c.sandbox {
            // Scanning /proc costs as much as there are processes: only when the process is
            // not known (its pid was never recorded).
            if sweep || c.process.as_ref().is_some_and(|p| p.pid.is_none() && p.exit_code.is_none()) {
                process::kill_netns_members(path);
            }
            remains.netns = Some(path.clone());
        }
        (errs, remains)
    }

    /// Removes everything a container made and its record: `rm`, a failed `run`, and
    /// reconcile finishing what a dead daemon left half done. Returns the errors met.
    pub(super) async fn finish_container_removal(&self, c: &Container) -> Vec<String> {
        self.dns.container_gone(&c.id); // its names go at once
        self.withdraw_ports(c);
        let (errs, remains) = self.teardown(c, c.phase == Phase::Creating).await;
        crash::point("rm:unwired");
        let _ = std::fs::remove_file(self.store.log_path(&c.id));
        let _ = std::fs::remove_file(self.store.exit_path(&c.id));
        {
            let mut st = self.state();
            st.remove_container(&c.id);
            for (net, ip) in &remains.held {
                st.hold_address(net, *ip);
            }
        }
        if self.firewall_names(c) {
            self.firewall_changed().await; // its rules' entries go with its addresses
        }
        if let Err(e) = self.persist_container(&c.id).await {
            warn!("container {}: {e}", c.name);
        }
        self.reap(remains); // its veths and namespace, in the background
        errs
    }

    // ------------------------------------------------------------------ ports

    /// Points a container's published ports at `target` (its primary address) or withdraws
    /// them if it has none. On a `routed` network, as with Docker, only the container port
    /// opens: no host port is mapped.
    pub(super) fn publish_ports(&self, c: &Container, target: Option<std::net::Ipv4Addr>) -> anyhow::Result<()> {
        if c.ports.is_empty() {
            return Ok(());
        }
        let routed = {
            let st = self.state();
            target
                .and_then(|ip| c.endpoints.iter().find(|e| e.ipv4 == Some(ip)))
                .and_then(|e| st.network_by_id(&e.network_id))
                .is_some_and(|n| n.gateway_mode == GatewayMode::Routed)
        };
        let mut dp = self.dp();
        for b in &c.ports {
            match target {
                Some(ip) if !routed => dp.set_port(b.host_ip, b.host_port, b.proto.number(), ip, b.container_port)?,
                _ => dp.remove_port(b.host_ip, b.host_port, b.proto.number())?,
            }
            if let Some(ip) = target {
                dp.set_published(ip, b.container_port, b.proto.number())?;
            }
        }
        Ok(())
    }

    pub(super) fn withdraw_ports(&self, c: &Container) {
        let mut dp = self.dp();
        for b in &c.ports {
            let _ = dp.remove_port(b.host_ip, b.host_port, b.proto.number());
        }
        drop(dp);
        self.withdraw_published(c);
    }

    /// Closes the container ports direct routing could reach on any of `c`'s addresses.
    fn withdraw_published(&self, c: &Container) {
        let mut dp = self.dp();
        for ip in c.endpoints.iter().filter_map(|e| e.ipv4) {
            for b in &c.ports {
                let _ = dp.remove_published(ip, b.container_port, b.proto.number());
            }
        }
    }

    // ------------------------------------------------------------------ rm, stop

    pub async fn remove_container(&self, name: &str, force: bool) -> Result<()> {
        self.wait_ready().await;
        let id = self.container_id(name)?;
        let _lock = self.locks.lock(&id).await;
        let c = self.current(&id, name)?;
        if Self::is_running(&c) && !force {
            return Err(conflict!("container {} is running: stop it first or use rm -f", c.name));
        }
        let mut laps = super::Laps::new();
        self.state().update_container(&id, |x| x.phase = Phase::Removing);
        self.services_kick.notify_one(); // out of its services' tables before it goes
        self.persist_container(&id).await?;
        laps.lap("persist");
        crash::point("rm:marked");
        self.kill(&c).await;
        laps.lap("kill");
        crash::point("rm:killed");
        let errs = self.finish_container_removal(&c).await;
        laps.lap("teardown");
        info!("container {} removed", c.name);
        tracing::debug!("rm {}: {laps}", c.name);
        if errs.is_empty() {
            Ok(())
        } else {
            Err(Error::Internal(anyhow::anyhow!("container {} removed, with errors: {}", c.name, errs.join("; "))))
        }
    }

    /// Stops a container's process: SIGTERM, then SIGKILL if it is still there after a grace
    /// period. Returns as soon as it is gone (no polling interval to wait out).
    pub(super) async fn kill(&self, c: &Container) {
        if let Some(p) = &c.process
            && let Some(pid) = p.pid
        {
            self.kill_pid(Some(pid), p.start_time).await;
        }
    }

    async fn kill_pid(&self, pid: Option<u32>, start_time: Option<u64>) {
        let Some(pid) = pid else { return };
        if !process::is_alive(pid, start_time) {
            return;
        }
        use nix::sys::signal::Signal;
        let exited = process::exit_watch(pid);
        process::signal(pid, Signal::SIGTERM);
        if process::wait_exit(exited.as_ref(), pid, start_time, std::time::Duration::from_secs(5)).await {
            return;
        }
        process::signal(pid, Signal::SIGKILL);
        process::wait_exit(exited.as_ref(), pid, start_time, std::time::Duration::from_secs(2)).await;
    }

    pub async fn stop_container(&self, name: &str) -> Result<()> {
        let id = self.container_id(name)?;
        let _lock = self.locks.lock(&id).await;
        let c = self.current(&id, name)?;
        self.kill(&c).await;
        self.services_kick.notify_one();
        Ok(())
    }

    // ------------------------------------------------------------------ processes

    /// Records what the CLI reports about a foreground process.
    pub async fn report_process(&self, name: &str, rep: ProcessReport) -> Result<()> {
        let id = self.container_id(name)?;
        let _lock = self.locks.lock(&id).await;
        let ok = self.state().update_container(&id, |c| {
            let Some(p) = c.process.as_mut() else { return false };
            if let Some(pid) = rep.pid {
                p.pid = Some(pid);
                p.start_time = process::start_time(pid);
            }
            if rep.exit_code.is_some() {
                p.exit_code = rep.exit_code;
            }
            true
        });
        match ok {
            None => Err(not_found!("container {name} not found")),
            Some(false) => Err(bad_request!("container {name} has no process")),
            Some(true) => self.persist_container(&id).await,
        }
    }

    // ------------------------------------------------------------------ views

    /// `ps`: a summary per container (what `ps` shows), not the whole `inspect` document:
    /// listing ten thousand containers must stay cheap, in time and in memory, and must not
    /// hold the state lock or a runtime worker while it reads each process's /proc entry.
    pub async fn list_containers(&self, all: bool) -> Vec<u8> {
        let rows = super::view::ps_rows(&self.state(), &self.store);
        tokio::task::spawn_blocking(move || super::view::ps_json(&rows, all)).await.unwrap_or_else(|_| b"[]".to_vec())
    }

    pub async fn inspect_container(&self, name: &str) -> Result<Value> {
        let c = lookup(&self.state(), name)?.clone();
        Ok(self.container_json(&c, &self.endpoint_counters(&c).await))
    }

    pub fn logs(&self, name: &str) -> Result<Vec<u8>> {
        let id = self.container_id(name)?;
        match std::fs::read(self.store.log_path(&id)) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
            Err(e) => Err(e.into()),
        }
    }

    /// `netpath port NAME`: the container's published ports.
    pub fn ports(&self, name: &str) -> Result<Vec<ports::Binding>> {
        Ok(lookup(&self.state(), name)?.ports.clone())
    }

    // ------------------------------------------------------------------ connect

    pub async fn connect(&self, network: &str, req: Connect) -> Result<Value> {
        self.wait_ready().await;
        let id = self.container_id(&req.container)?;
        let host_addrs = self.host_addrs_for(network).await?;
        let _lock = self.locks.lock(&id).await;
        let claimed = self.claim_for(network, &req.container, &id, req.ip.as_deref()).await?;
        let ip_arg = claimed.as_ref().map(|(_, ip)| ip.to_string()).or(req.ip.clone());
        self.wait_released(network, ip_arg.as_deref(), &host_addrs).await;
        let planned = (|| -> Result<(Container, Endpoint)> {
            let mut st = self.state();
            let c = st.container_by_id(&id).ok_or_else(|| not_found!("container {} not found", req.container))?;
            let net = usable(&st, network)?;
            if !matches!(net.driver, DriverKind::Bridge | DriverKind::Macvlan | DriverKind::Overlay) {
                return Err(bad_request!("container cannot be connected to the {} network", net.name));
            }
            for e in &c.endpoints {
                let other = st.network_by_id(&e.network_id).map(|n| (n.driver, n.name.clone()));
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
            let aliases = dns::check_aliases(&req.aliases, net)?;
            let taken: Vec<String> = c.endpoints.iter().map(|e| e.ifname.clone()).collect();
            let mut ep = plan_endpoint(&st, net, &taken, ip_arg.as_deref(), &host_addrs)?;
            ep.aliases = aliases;
            ep.phase = Phase::Creating;
            let c = c.clone();
            st.update_container(&id, |x| x.endpoints.push(ep.clone()));
            Ok((c, ep))
        })();
        let (c, ep) = match planned {
            Ok(v) => v,
            Err(e) => {
                if let Some((net_id, ip)) = claimed {
                    self.release_overlay_address(&net_id, ip).await;
                }
                return Err(e);
            }
        };
        let undo = |this: &Self| {
            this.state().update_container(&id, |x| x.endpoints.retain(|e| e.id != ep.id));
        };
        if let Err(e) = self.persist_container(&id).await {
            undo(self);
            return Err(e);
        }
        crash::point("connect:reserved");
        if let Err(e) = self.wire(&c, &ep, c.endpoints.is_empty()).await {
            let _ = self.unwire(&c.id, &c.sandbox, &ep, None).await;
            undo(self);
            let _ = self.persist_container(&id).await;
            return Err(e.into());
        }
        crash::point("connect:wired");
        self.state().update_container(&id, |x| x.endpoints.iter_mut().for_each(|e| e.phase = Phase::Ready));
        if let Err(e) = self.persist_container(&id).await {
            let _ = self.unwire(&c.id, &c.sandbox, &ep, None).await;
            undo(self);
            return Err(e);
        }
        let c = self.current(&id, &req.container)?;
        // A container that had no address yet now has one for its published ports.
        self.publish_ports(&c, c.primary_ipv4())?;
        if self.firewall_names(&c) {
            self.firewall_changed().await; // its rules cover the new address
        }
        self.dns_refresh(&c); // resolvable on the new network
        Ok(self.container_json(&c, &self.endpoint_counters(&c).await))
    }

    pub async fn disconnect(&self, network: &str, container: &str) -> Result<()> {
        self.wait_ready().await;
        let id = self.container_id(container)?;
        let _lock = self.locks.lock(&id).await;
        let (c, ep) = {
            let mut st = self.state();
            let net = lookup_network(&st, network)?.clone();
            let c = st.container_by_id(&id).ok_or_else(|| not_found!("container {container} not found"))?.clone();
            let Some(ep) = c.endpoints.iter().find(|e| e.network_id == net.id).cloned() else {
                return Err(not_found!("container {} is not connected to network {}", c.name, net.name));
            };
            // Its processes stay in the host's namespace whatever the state says.
            if net.driver == DriverKind::Host {
                return Err(bad_request!("container {} cannot be disconnected from the host network", c.name));
            }
            st.update_container(&id, |x| {
                x.endpoints.iter_mut().filter(|e| e.id == ep.id).for_each(|e| e.phase = Phase::Removing)
            });
            (c, ep)
        };
        self.persist_container(&id).await?;
        crash::point("disconnect:marked");
        self.finish_disconnect(&c, &ep).await?;
        Ok(())
    }

    /// Unwires an endpoint marked `Removing` and drops it from the record; published ports
    /// follow the primary address, which may change. Also used by reconcile.
    pub(super) async fn finish_disconnect(&self, c: &Container, ep: &Endpoint) -> Result<()> {
        self.unwire(&c.id, &c.sandbox, ep, None).await?;
        crash::point("disconnect:unwired");
        self.withdraw_published(c);
        self.state().update_container(&c.id, |x| x.endpoints.retain(|e| e.id != ep.id));
        self.persist_container(&c.id).await?;
        let c = self.current(&c.id, &c.name)?;
        self.publish_ports(&c, c.primary_ipv4())?;
        if self.firewall_names(&c) {
            self.firewall_changed().await;
        }
        self.dns_refresh(&c); // no longer resolvable there
        Ok(())
    }

    /// `--shutdown-containers`: stops every container's process (the daemon is going away).
    pub async fn stop_all(self: &Arc<Self>) {
        let ids: Vec<String> = self.state().containers().map(|c| c.id.clone()).collect();
        let stops = ids.into_iter().map(|id| {
            let d = self.clone();
            async move {
                let _lock = d.locks.lock(&id).await;
                let c = d.state().container_by_id(&id).cloned();
                if let Some(c) = c {
                    d.kill(&c).await;
                }
            }
        });
        futures::future::join_all(stops).await;
    }
}

/// Where the container end of an endpoint's veth is, for [`Daemon::xdp_endpoint`] to turn
/// GRO on there.
pub(super) enum PeerEnd<'a> {
    /// In the namespace at this path, by this name (netpath names it).
    Named(&'a std::path::Path, &'a str),
    /// In the namespace at this path, by its ifindex there (the host end's peer index): a
    /// Docker endpoint's, which dockerd renames in the sandbox. The flag: turn GRO off first
    /// if it is on (see netlink::ethtool::enable_gro_index).
    Index(&'a std::path::Path, u32, bool),
    /// Nowhere GRO can be turned on (the host's own namespace, or not found).
    Unknown,
}

impl<'a> PeerEnd<'a> {
    /// Where netpath put it: `ep`'s interface in the container's namespace.
    pub(super) fn of(sandbox: &'a Sandbox, ep: &'a Endpoint) -> Self {
        match sandbox {
            Sandbox::Netns { path, .. } => PeerEnd::Named(path, &ep.ifname),
            Sandbox::Host => PeerEnd::Unknown,
        }
    }
}
