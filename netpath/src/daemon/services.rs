//! Services: a VIP per service network, spread over the service's tasks by the datapath's
//! Maglev tables. The record says what is wanted (networks, replicas, joined containers,
//! ports); [`Daemon::sync_services`] makes the kernel match it and runs the replicas — on
//! every change, when a task's container goes or its process exits, and every 200 ms (a
//! task that died unnoticed leaves its tables within that).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tracing::{info, warn};

use super::networks::{lookup as lookup_network, usable};
use super::{Daemon, spawn_io, valid_name};
use crate::api::{ContainerCreate, ServiceCreate, ServiceUpdate};
use crate::error::{Error, Result};
use crate::ipam;
use crate::ports::Proto;
use crate::state::store::Op;
use crate::state::{self, DriverKind, Phase, Service, ServicePort, ServiceVip, State};
use netpath_common::{MAGLEV_M, MAX_SERVICE_SLOTS, ServiceInfo, svc_flags};

/// How often the tasks are checked without being told.
const PERIOD: Duration = Duration::from_millis(200);
/// A replica that keeps exiting is restarted at most this often.
const RESTART_BACKOFF: Duration = Duration::from_secs(2);

/// What the datapath holds for services, as last written (so unchanged tables are not rewritten).
#[derive(Default)]
pub struct Programmed {
    /// Slot → the backends its table spreads over.
    tables: HashMap<u32, Vec<Ipv4Addr>>,
    /// Service entries: (VIP, port, proto) → the value written.
    entries: HashMap<(Ipv4Addr, u16, u8), ServiceInfo>,
    /// VIP → bridge ifindex it was added to.
    vips: HashMap<Ipv4Addr, u32>,
    /// Replica name → when it was last (re)started.
    restarts: HashMap<String, Instant>,
    /// False until the first sync after start: it also removes what no record claims.
    swept: bool,
}

pub type ServicesState = tokio::sync::Mutex<Programmed>;

fn lookup<'a>(st: &'a State, name: &str) -> Result<&'a Service> {
    st.service(name).ok_or_else(|| not_found!("service {name} not found"))
}

/// Parses `--publish published=P,target=T[,protocol=udp][,mode=ingress]` or `-p P:T[/udp]`.
pub fn parse_port(spec: &str) -> Result<ServicePort> {
    let bad =
        || bad_request!("invalid publish spec {spec:?}: use published=P,target=T[,protocol=tcp|udp] or P:T[/udp]");
    let port = |s: &str| s.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad);
    if spec.contains('=') {
        let (mut published, mut target, mut proto, mut host_mode) = (None, None, Proto::Tcp, false);
        for kv in spec.split(',') {
            let (k, v) = kv.split_once('=').ok_or_else(bad)?;
            match k {
                "published" => published = Some(port(v)?),
                "target" => target = Some(port(v)?),
                "protocol" => {
                    proto = match v {
                        "tcp" => Proto::Tcp,
                        "udp" => Proto::Udp,
                        _ => return Err(bad()),
                    }
                }
                "mode" if v == "ingress" => host_mode = false,
                "mode" if v == "host" => host_mode = true,
                "mode" => return Err(bad_request!("invalid publish mode {v:?}: use ingress or host")),
                _ => return Err(bad()),
            }
        }
        return Ok(ServicePort { published, target: target.ok_or_else(bad)?, proto, host_mode });
    }
    let (rest, proto) = match spec.rsplit_once('/') {
        Some((r, "tcp")) => (r, Proto::Tcp),
        Some((r, "udp")) => (r, Proto::Udp),
        Some(_) => return Err(bad()),
        None => (spec, Proto::Tcp),
    };
    match rest.split_once(':') {
        Some((p, t)) => Ok(ServicePort { published: Some(port(p)?), target: port(t)?, proto, host_mode: false }),
        None => Ok(ServicePort { published: None, target: port(rest)?, proto, host_mode: false }),
    }
}

fn replicas(n: Option<i64>) -> Result<Option<u32>> {
    match n {
        None => Ok(None),
        Some(n) if (0..=1000).contains(&n) => Ok(Some(n as u32)),
        Some(n) => Err(bad_request!("invalid replicas {n}: use 0 to 1000")),
    }
}

/// A network a service may use: a bridge network with IPAM.
fn service_network<'a>(st: &'a State, name: &str) -> Result<&'a state::Network> {
    let n = usable(st, name)?;
    if n.driver != DriverKind::Bridge || n.pool().is_none() {
        let what = if n.driver == DriverKind::Overlay {
            "a service on an overlay network is a cluster service: its networks must all be overlays"
        } else {
            "services need a bridge network (or overlay networks, across nodes)"
        };
        return Err(bad_request!("network {}: {what}", n.name));
    }
    Ok(n)
}

/// Allocates a VIP on `net` and a free slot.
fn plan_vips(st: &State, nets: &[state::Network], keep: &[ServiceVip]) -> Result<Vec<ServiceVip>> {
    let mut out: Vec<ServiceVip> = keep.to_vec();
    let fresh: Vec<&state::Network> = nets.iter().filter(|n| !keep.iter().any(|v| v.network_id == n.id)).collect();
    let slots = st
        .free_slots(fresh.len(), MAX_SERVICE_SLOTS)
        .ok_or_else(|| conflict!("no free service slot: at most {MAX_SERVICE_SLOTS} service VIPs"))?;
    for (net, slot) in fresh.into_iter().zip(slots) {
        let pool = net.pool().expect("checked: bridge with IPAM");
        let vip = ipam::allocate(&pool, st.used_addresses(&net.id), None)
            .map_err(|e| conflict!("network {}: no address left for a VIP: {e}", net.name))?;
        out.push(ServiceVip { network_id: net.id.clone(), vip, slot });
    }
    Ok(out)
}

impl Daemon {
    pub(super) async fn persist_service(&self, id: &str) -> Result<()> {
        let (rec, rev) = {
            let mut st = self.state();
            let rev = st.next_rev();
            (st.service_by_id(id).cloned(), rev)
        };
        let (sid, store) = (id.to_string(), self.store.clone());
        spawn_io(move || match &rec {
            Some(s) => store.write_service(&sid, Op::Save(s), rev),
            None => store.write_service(&sid, Op::Delete, rev),
        })
        .await
    }

    /// Checks what a create or an update asks for against the state: networks, containers,
    /// ports that clash. Pure.
    fn check_service(&self, st: &State, s: &Service) -> Result<()> {
        for b in &s.backends {
            let c = st.container(b).ok_or_else(|| not_found!("container {b} not found"))?;
            if !c.endpoints.iter().any(|e| s.vips.iter().any(|v| v.network_id == e.network_id)) {
                return Err(bad_request!("container {b} is on none of service {}'s networks", s.name));
            }
        }
        let mut seen = HashSet::new();
        for p in &s.ports {
            if !seen.insert((p.target, p.proto)) {
                return Err(bad_request!("target port {}/{} is given twice", p.target, p.proto.as_str()));
            }
            let Some(pp) = p.published else { continue };
            let mine = crate::ports::Binding { host_ip: None, host_port: pp, container_port: p.target, proto: p.proto };
            if st.container_bindings().iter().any(|b| b.clashes(&mine)) {
                return Err(conflict!("port {pp}/{} is already published by a container", p.proto.as_str()));
            }
            let other = st
                .services()
                .filter(|o| o.id != s.id)
                .find(|o| o.ports.iter().any(|q| q.published == Some(pp) && q.proto == p.proto));
            if let Some(o) = other {
                return Err(conflict!("port {pp}/{} is already published by service {}", p.proto.as_str(), o.name));
            }
        }
        if s.endpoint_mode == "dnsrr" && s.ports.iter().any(|p| p.published.is_some()) {
            // As Docker: ingress publishing needs a VIP to balance on.
            return Err(bad_request!("a dnsrr service cannot publish ports (it has no VIP to balance on)"));
        }
        if s.replicas.unwrap_or(0) > 0 && s.cmd.is_empty() {
            return Err(bad_request!("replicas need a command: service create ... --replicas N -- CMD ARGS"));
        }
        // NAME.<n> are the service's task names: a container of such a name made outside it
        // would be taken for a task (and removed when it is not wanted).
        let creating = st.service_by_id(&s.id).is_none();
        if let Some(c) = st.containers().find(|c| creating && s.is_replica_name(&c.name)) {
            return Err(conflict!(
                "container name {} is already in use: {}.<n> names are the service's tasks",
                c.name,
                s.name
            ));
        }
        Ok(())
    }

    pub async fn create_service(self: &Arc<Self>, req: ServiceCreate) -> Result<Value> {
        self.wait_ready().await;
        valid_name("service", &req.name)?;
        if req.networks.is_empty() {
            return Err(bad_request!("a service needs at least one --network"));
        }
        let endpoint_mode = req.endpoint_mode.unwrap_or_else(|| "vip".into());
        if !["vip", "dnsrr"].contains(&endpoint_mode.as_str()) {
            return Err(bad_request!("invalid endpoint mode {endpoint_mode:?}: use vip or dnsrr"));
        }
        let affinity = req.affinity.unwrap_or_else(|| "none".into());
        if !["none", "client-ip"].contains(&affinity.as_str()) {
            return Err(bad_request!("invalid affinity {affinity:?}: use none or client-ip"));
        }
        let replicas = replicas(req.replicas)?;
        if req.health_tcp == Some(0) {
            return Err(bad_request!("invalid --health-cmd-tcp 0: give the port the tasks serve"));
        }
        let ports = req.publish.iter().map(|p| parse_port(p)).collect::<Result<Vec<_>>>()?;
        if self.on_overlay(&req.networks) {
            let only_single_host = !req.backends.is_empty() || req.health_tcp.is_some() || affinity != "none";
            return self
                .create_cluster_service(
                    &req.name,
                    &req.networks,
                    &req.cmd,
                    only_single_host,
                    replicas,
                    endpoint_mode,
                    ports,
                )
                .await;
        }
        let id = state::new_id();
        {
            let mut st = self.state();
            if st.service(&req.name).is_some_and(|s| s.name == req.name) {
                return Err(conflict!("service name {} is already in use", req.name));
            }
            let mut nets = vec![];
            for n in &req.networks {
                let net = service_network(&st, n)?.clone();
                if nets.iter().any(|x: &state::Network| x.id == net.id) {
                    return Err(bad_request!("network {} is given twice", net.name));
                }
                nets.push(net);
            }
            let vips = if endpoint_mode == "vip" { plan_vips(&st, &nets, &[])? } else { vec![] };
            // dnsrr has no VIP, but the service still lists its networks (slot unused).
            let vips = if vips.is_empty() {
                nets.iter()
                    .map(|n| ServiceVip { network_id: n.id.clone(), vip: Ipv4Addr::UNSPECIFIED, slot: u32::MAX })
                    .collect()
            } else {
                vips
            };
            let s = Service {
                id: id.clone(),
                name: req.name.clone(),
                vips,
                replicas,
                cmd: req.cmd.clone(),
                backends: req.backends.clone(),
                ports,
                endpoint_mode,
                affinity,
                health_tcp: req.health_tcp.filter(|p| *p != 0),
                created: state::now(),
                phase: Phase::Ready,
                here: None,
                host_slot: None,
            };
            self.check_service(&st, &s)?;
            st.put_service(s);
        }
        if let Err(e) = self.persist_service(&id).await {
            self.state().remove_service(&id);
            return Err(e);
        }
        // The commit point: from here the record says what to build, and any sync (this
        // one, or the next daemon's) builds it.
        super::crash::point("service-create:persisted");
        info!("service {} created", req.name);
        self.sync_services().await;
        self.inspect_service(&req.name)
    }

    pub async fn update_service(self: &Arc<Self>, name: &str, req: ServiceUpdate) -> Result<Value> {
        self.wait_ready().await;
        let replicas = replicas(req.replicas)?;
        let cluster_svc = lookup(&self.state(), name)?.here.is_some();
        if cluster_svc {
            return self.update_cluster_service(name, req, replicas).await;
        }
        let (id, old) = {
            let mut st = self.state();
            let old = lookup(&st, name)?.clone();
            if old.phase != Phase::Ready {
                return Err(conflict!("service {} is being removed", old.name));
            }
            let mut s = old.clone();
            if replicas.is_some() {
                if old.replicas.is_none() {
                    return Err(bad_request!(
                        "service {} has no replicas to scale: it was created without a command",
                        s.name
                    ));
                }
                s.replicas = replicas;
            }
            let mut nets: Vec<state::Network> =
                s.vips.iter().filter_map(|v| st.network_by_id(&v.network_id).cloned()).collect();
            for n in &req.network_rm {
                let net = lookup_network(&st, n)?;
                if !nets.iter().any(|x| x.id == net.id) {
                    return Err(bad_request!("service {} is not on network {}", s.name, net.name));
                }
                let net_id = net.id.clone();
                nets.retain(|x| x.id != net_id);
            }
            for n in &req.network_add {
                let net = service_network(&st, n)?.clone();
                if nets.iter().any(|x| x.id == net.id) {
                    return Err(conflict!("service {} is already on network {}", s.name, net.name));
                }
                nets.push(net);
            }
            if nets.is_empty() {
                return Err(bad_request!("service {} would be on no network: remove it instead", s.name));
            }
            let keep: Vec<ServiceVip> =
                s.vips.iter().filter(|v| nets.iter().any(|n| n.id == v.network_id)).cloned().collect();
            s.vips = if s.endpoint_mode == "vip" {
                // Its old VIPs are its own to keep: plan with them reserved.
                plan_vips(&st, &nets, &keep)?
            } else {
                nets.iter()
                    .map(|n| ServiceVip { network_id: n.id.clone(), vip: Ipv4Addr::UNSPECIFIED, slot: u32::MAX })
                    .collect()
            };
            for b in &req.rm_backend {
                if !s.backends.contains(b) {
                    return Err(not_found!("container {b} is not a backend of service {}", s.name));
                }
                s.backends.retain(|x| x != b);
            }
            for b in &req.add_backend {
                if s.backends.contains(b) {
                    return Err(conflict!("container {b} is already a backend of service {}", s.name));
                }
                s.backends.push(b.clone());
            }
            self.check_service(&st, &s)?;
            st.put_service(s);
            (old.id.clone(), old)
        };
        if let Err(e) = self.persist_service(&id).await {
            self.state().put_service(old);
            return Err(e);
        }
        self.sync_services().await;
        self.inspect_service(name)
    }

    pub async fn remove_service(self: &Arc<Self>, name: &str) -> Result<()> {
        self.wait_ready().await;
        let cluster_svc = lookup(&self.state(), name)?.clone();
        if cluster_svc.here.is_some() {
            // Gone from the cluster first: every node (this one below) removes its tasks.
            self.cluster_handle()?.remove_service(&cluster_svc.id).await?;
        }
        let id = {
            let mut st = self.state();
            let s = lookup(&st, name)?.clone();
            let id = s.id.clone();
            st.put_service(Service { phase: Phase::Removing, ..s });
            id
        };
        // Written first: a daemon that dies now finishes the removal when it starts again.
        self.persist_service(&id).await?;
        super::crash::point("service-rm:marked");
        self.sync_services().await;
        if self.state().service_by_id(&id).is_some() {
            return Err(Error::Internal(anyhow::anyhow!(
                "service {name}: removal did not finish, see the daemon's log"
            )));
        }
        Ok(())
    }

    /// The containers that are tasks of `s`: its wanted replicas and joined containers.
    fn task_names(s: &Service) -> Vec<String> {
        let mut t = s.replica_names();
        t.extend(s.backends.iter().cloned());
        t
    }

    /// A task container that may take new connections: built, its process (if any) running,
    /// and not failing its service's health check.
    fn healthy(&self, c: &state::Container) -> bool {
        c.phase == Phase::Ready
            && (c.process.is_none() || Self::is_running(c))
            && !self.svc_unhealthy.lock().unwrap().contains(&c.id)
    }

    /// `--health-cmd-tcp`: connects to every task's port every 300 ms (from the host, through
    /// its bridge); a task that does not accept within 300 ms is out of the tables until it does.
    pub async fn watch_health(self: Arc<Self>) {
        self.wait_ready().await;
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let probes: Vec<(String, std::net::SocketAddr)> = {
                let st = self.state();
                st.services()
                    .filter(|s| s.phase == Phase::Ready)
                    .filter_map(|s| Some((s, s.health_tcp?)))
                    .flat_map(|(s, port)| {
                        Self::task_names(s)
                            .into_iter()
                            .filter_map(|t| st.container(&t).filter(|c| c.name == t).cloned())
                            .filter_map(move |c| Some((c.id.clone(), (c.primary_ipv4()?, port).into())))
                            .collect::<Vec<_>>()
                    })
                    .collect()
            };
            let checks = probes.into_iter().map(|(id, addr)| async move {
                let ok = tokio::time::timeout(Duration::from_millis(300), tokio::net::TcpStream::connect(addr))
                    .await
                    .is_ok_and(|r| r.is_ok());
                (id, ok)
            });
            let results = futures::future::join_all(checks).await;
            let failing: HashSet<String> = results.into_iter().filter(|(_, ok)| !ok).map(|(id, _)| id).collect();
            let changed = {
                let mut u = self.svc_unhealthy.lock().unwrap();
                let changed = *u != failing;
                *u = failing;
                changed
            };
            if changed {
                self.services_kick.notify_one();
            }
        }
    }

    /// Makes the kernel and the replicas match the services: starts missing replicas,
    /// restarts exited ones, removes unwanted ones, writes every VIP's table and entries,
    /// finishes removals. Serialised: one sync at a time.
    pub async fn sync_services(self: &Arc<Self>) {
        let mut prog = self.services.lock().await;
        // 1. Replicas: removed services and scaled-down ones first, then missing or exited ones.
        // Only task containers are looked at (by name), never a copy of every container: this
        // runs every 200 ms.
        type Replicas = HashMap<String, state::Container>;
        let (services, unwanted, replicas): (Vec<Service>, Vec<(String, String)>, Replicas) = {
            let st = self.state();
            let services: Vec<Service> = st.services().cloned().collect();
            if services.is_empty() && prog.swept && prog.entries.is_empty() && prog.vips.is_empty() {
                return; // nothing to run, nothing programmed
            }
            let by_name: HashMap<&str, &Service> = services.iter().map(|s| (s.name.as_str(), s)).collect();
            let unwanted = st
                .containers()
                .filter_map(|c| {
                    let (prefix, n) = c.name.rsplit_once('.')?;
                    let s = by_name.get(prefix)?;
                    let n: u32 = n.parse().ok().filter(|_| s.is_replica_name(&c.name))?;
                    let wanted = s.phase == Phase::Ready && s.wants_replica(n);
                    (!wanted).then(|| (s.name.clone(), c.name.clone()))
                })
                .collect();
            let replicas = services
                .iter()
                .filter(|s| s.phase == Phase::Ready)
                .flat_map(|s| s.replica_names())
                .filter_map(|r| st.container(&r).filter(|c| c.name == r).cloned().map(|c| (r, c)))
                .collect();
            (services, unwanted, replicas)
        };
        for (svc, name) in &unwanted {
            if let Err(e) = self.remove_container(name, true).await {
                warn!("service {svc}: removing task {name}: {e}");
            }
        }
        for s in services.iter().filter(|s| s.phase == Phase::Ready) {
            let Some(first) = s.vips.first() else { continue };
            let net_name = self.state().network_by_id(&first.network_id).map(|n| n.name.clone());
            let Some(net_name) = net_name else { continue };
            for r in s.replica_names() {
                let existing = replicas.get(&r);
                let exited = existing.is_some_and(|c| c.phase == Phase::Ready && !Self::is_running(c));
                if let Some(c) = existing.filter(|c| c.phase == Phase::Ready && !exited) {
                    self.follow_networks(s, c).await; // --network-add / --network-rm
                    continue;
                }
                if existing.is_some() && !exited {
                    continue;
                }
                if prog.restarts.get(&r).is_some_and(|t| t.elapsed() < RESTART_BACKOFF) {
                    continue;
                }
                prog.restarts.insert(r.clone(), Instant::now());
                if exited {
                    info!("service {}: task {r} exited, restarting it", s.name);
                    if let Err(e) = self.remove_container(&r, true).await {
                        warn!("service {}: removing exited task {r}: {e}", s.name);
                        continue;
                    }
                }
                let req = ContainerCreate {
                    name: r.clone(),
                    network: Some(net_name.clone()),
                    cmd: s.cmd.clone(),
                    detach: true,
                    ..Default::default()
                };
                if let Err(e) = self.create_container(req).await {
                    warn!("service {}: starting task {r}: {e}", s.name);
                    continue;
                }
                for v in &s.vips[1..] {
                    let net = self.state().network_by_id(&v.network_id).map(|n| n.name.clone());
                    if let Some(net) = net {
                        let req = crate::api::Connect { container: r.clone(), ip: None, aliases: vec![] };
                        if let Err(e) = self.connect(&net, req).await {
                            warn!("service {}: connecting task {r} to {net}: {e}", s.name);
                        }
                    }
                }
            }
        }
        // 2. The datapath: what every live service wants now.
        let (services, nets) = {
            let st = self.state();
            let s: Vec<Service> = st.services().cloned().collect();
            let nets: HashMap<String, state::Network> = st.networks().map(|n| (n.id.clone(), n.clone())).collect();
            (s, nets)
        };
        let mut want_tables: HashMap<u32, Vec<Ipv4Addr>> = HashMap::new();
        let mut want_entries: HashMap<(Ipv4Addr, u16, u8), ServiceInfo> = HashMap::new();
        let mut want_vips: HashMap<Ipv4Addr, String> = HashMap::new();
        for s in services.iter().filter(|s| s.phase == Phase::Ready && s.endpoint_mode == "vip") {
            let tasks = Self::task_names(s);
            let flags = if s.affinity == "client-ip" { svc_flags::AFFINITY_CLIENT_IP } else { 0 };
            for (i, v) in s.vips.iter().enumerate() {
                let Some(bridge) = nets.get(&v.network_id).and_then(|n| n.bridge.clone()) else { continue };
                let backends: Vec<Ipv4Addr> = {
                    let st = self.state();
                    let mut b: Vec<Ipv4Addr> = tasks
                        .iter()
                        .filter_map(|t| st.container(t).filter(|c| c.name == *t))
                        .filter(|c| self.healthy(c))
                        .filter_map(|c| c.endpoints.iter().find(|e| e.network_id == v.network_id)?.ipv4)
                        .collect();
                    b.extend(self.remote_task_addrs(s, &v.network_id)); // tasks on other nodes
                    b.sort();
                    b.dedup();
                    b
                };
                let info = ServiceInfo { slot: v.slot, target_port: 0, backends: backends.len() as u16, flags };
                want_tables.insert(v.slot, backends);
                want_vips.insert(v.vip, bridge);
                // Every port of the VIP, both protocols, as swarm's VIPs do.
                for proto in [Proto::Tcp, Proto::Udp] {
                    want_entries.insert((v.vip, 0, proto.number()), info);
                }
                // Published ports: on every host address, to the tasks of its first network.
                // A cluster service's `mode=host` ports go to this node's tasks only (below).
                if i == 0 {
                    for p in s.ports.iter().filter(|p| p.published.is_some() && !(p.host_mode && s.here.is_some())) {
                        let info = ServiceInfo { target_port: p.target.to_be(), ..info };
                        want_entries.insert((Ipv4Addr::UNSPECIFIED, p.published.unwrap_or(0), p.proto.number()), info);
                    }
                }
            }
        }
        // `mode=host` ports of cluster services: only where a task runs, to the local tasks.
        for s in services.iter().filter(|s| s.phase == Phase::Ready && s.here.is_some()) {
            let (Some(slot), Some(first)) = (s.host_slot, s.vips.first()) else { continue };
            let local: Vec<Ipv4Addr> = {
                let st = self.state();
                let mut b: Vec<Ipv4Addr> = s
                    .replica_names()
                    .iter()
                    .filter_map(|t| st.container(t).filter(|c| c.name == *t))
                    .filter(|c| self.healthy(c))
                    .filter_map(|c| c.endpoints.iter().find(|e| e.network_id == first.network_id)?.ipv4)
                    .collect();
                b.sort();
                b
            };
            if local.is_empty() {
                continue; // no task here: the port does not answer here
            }
            let info = ServiceInfo { slot, target_port: 0, backends: local.len() as u16, flags: 0 };
            want_tables.insert(slot, local);
            for p in s.ports.iter().filter(|p| p.host_mode) {
                let info = ServiceInfo { target_port: p.target.to_be(), ..info };
                want_entries.insert((Ipv4Addr::UNSPECIFIED, p.published.unwrap_or(0), p.proto.number()), info);
            }
        }
        self.dns.set_services(self.service_names(&services));
        let mut gone_backends: BTreeSet<Ipv4Addr> = BTreeSet::new();
        // VIP addresses on their bridges: the host answers ARP for them (and refuses what no
        // backend takes).
        for (vip, bridge) in &want_vips {
            if prog.vips.contains_key(vip) {
                continue;
            }
            match self.nl.link_index(bridge).await {
                Ok(Some(idx)) => match self.nl.ensure_addr(idx, *vip, 32).await {
                    Ok(()) => {
                        prog.vips.insert(*vip, idx);
                    }
                    Err(e) => warn!("VIP {vip}: {e:#}"),
                },
                Ok(None) => warn!("VIP {vip}: bridge {bridge} missing"),
                Err(e) => warn!("VIP {vip}: {e:#}"),
            }
        }
        {
            let mut dp = self.dp();
            // Tables before the entries that point at them.
            for (slot, backends) in &want_tables {
                if prog.tables.get(slot) == Some(backends) {
                    continue;
                }
                if let Some(old) = prog.tables.get(slot) {
                    gone_backends.extend(old.iter().filter(|a| !backends.contains(a)));
                }
                let table = if backends.is_empty() {
                    vec![Ipv4Addr::UNSPECIFIED; MAGLEV_M as usize]
                } else {
                    crate::maglev::table(backends, MAGLEV_M as usize)
                };
                match dp.set_maglev(*slot, &table) {
                    Ok(()) => {
                        prog.tables.insert(*slot, backends.clone());
                    }
                    Err(e) => warn!("service table {slot}: {e:#}"),
                }
            }
            for (k, info) in &want_entries {
                if prog.entries.get(k) == Some(info) {
                    continue;
                }
                match dp.set_service(k.0, k.1, k.2, *info) {
                    Ok(()) => {
                        prog.entries.insert(*k, *info);
                    }
                    Err(e) => warn!("service entry {}:{}: {e:#}", k.0, k.1),
                }
            }
            // What no service wants any more; after a restart, whatever the pins hold too.
            let mut stale: Vec<(Ipv4Addr, u16, u8)> =
                prog.entries.keys().filter(|k| !want_entries.contains_key(k)).copied().collect();
            if !prog.swept {
                match dp.service_keys() {
                    Ok(keys) => stale.extend(keys.into_iter().filter(|k| !want_entries.contains_key(k))),
                    Err(e) => warn!("reading service entries: {e:#}"),
                }
            }
            for k in stale {
                let _ = dp.remove_service(k.0, k.1, k.2);
                prog.entries.remove(&k);
            }
            let old_slots: Vec<u32> = prog.tables.keys().filter(|s| !want_tables.contains_key(s)).copied().collect();
            for slot in old_slots {
                if let Some(old) = prog.tables.remove(&slot) {
                    gone_backends.extend(old);
                }
            }
        }
        let stale_vips: Vec<(Ipv4Addr, u32)> =
            prog.vips.iter().filter(|(v, _)| !want_vips.contains_key(v)).map(|(v, i)| (*v, *i)).collect();
        for (vip, idx) in stale_vips {
            if let Err(e) = self.nl.remove_addr(idx, vip).await {
                warn!("VIP {vip}: {e:#}");
            }
            prog.vips.remove(&vip);
        }
        if !prog.swept {
            // VIPs a dead daemon left on bridges no service wants: every /32 on a netpath bridge
            // that is neither its gateway nor a wanted VIP.
            for n in nets.values() {
                let Some(bridge) = &n.bridge else { continue };
                let Ok(Some(idx)) = self.nl.link_index(bridge).await else { continue };
                let Ok(addrs) = self.nl.addresses_v4(Some(idx)).await else { continue };
                for (a, len) in addrs {
                    if len == 32 && !want_vips.contains_key(&a) && n.ipam.is_some_and(|i| i.gateway != a) {
                        let _ = self.nl.remove_addr(idx, a).await;
                    }
                }
            }
            prog.swept = true;
        }
        // Flows to backends that left: they must not keep using them.
        for ip in gone_backends {
            self.flush_backend(ip).await;
        }
        // 3. Removals to finish: their tasks and kernel state are gone now.
        for s in services.iter().filter(|s| s.phase == Phase::Removing) {
            if self.state().containers().any(|c| s.is_replica_name(&c.name)) {
                continue; // a task that would not go: the next sync tries again
            }
            self.state().remove_service(&s.id);
            if let Err(e) = self.persist_service(&s.id).await {
                warn!("service {}: {e}", s.name);
            }
            info!("service {} removed", s.name);
        }
        prog.restarts.retain(|_, t| t.elapsed() < RESTART_BACKOFF * 10);
    }

    /// Connects a running replica to the service's networks it is not on, and disconnects it
    /// from networks the service left.
    async fn follow_networks(self: &Arc<Self>, s: &Service, c: &state::Container) {
        let names: HashMap<String, String> = self.state().networks().map(|n| (n.id.clone(), n.name.clone())).collect();
        for v in s.vips.iter().filter(|v| !c.endpoints.iter().any(|e| e.network_id == v.network_id)) {
            let Some(net) = names.get(&v.network_id) else { continue };
            let req = crate::api::Connect { container: c.name.clone(), ip: None, aliases: vec![] };
            if let Err(e) = self.connect(net, req).await {
                warn!("service {}: connecting task {} to {net}: {e}", s.name, c.name);
            }
        }
        for e in c.endpoints.iter().filter(|e| !s.vips.iter().any(|v| v.network_id == e.network_id)) {
            let Some(net) = names.get(&e.network_id) else { continue };
            if let Err(err) = self.disconnect(net, &c.name).await {
                warn!("service {}: disconnecting task {} from {net}: {err}", s.name, c.name);
            }
        }
    }

    /// What the embedded DNS answers for services, per network: `NAME` (the VIP, or with
    /// dnsrr the running tasks' addresses) and `tasks.NAME` (the running tasks' addresses).
    fn service_names(&self, services: &[Service]) -> crate::dns::ServiceNames {
        let st = self.state();
        let mut out = crate::dns::ServiceNames::new();
        for s in services.iter().filter(|s| s.phase == Phase::Ready) {
            let tasks = Self::task_names(s);
            for v in &s.vips {
                let mut addrs: Vec<Ipv4Addr> = tasks
                    .iter()
                    .filter_map(|t| st.container(t).filter(|c| c.name == *t && self.healthy(c)))
                    .filter_map(|c| c.endpoints.iter().find(|e| e.network_id == v.network_id)?.ipv4)
                    .collect();
                addrs.extend(self.remote_task_addrs(s, &v.network_id)); // tasks on other nodes
                let names = out.entry(v.network_id.clone()).or_default();
                let name = s.name.to_ascii_lowercase();
                let own = if s.endpoint_mode == "vip" { vec![v.vip] } else { addrs.clone() };
                names.insert(name.clone(), own);
                names.insert(format!("tasks.{name}"), addrs);
            }
        }
        out
    }

    /// Flushes the flows of a backend that left a service, unless it is a backend elsewhere.
    async fn flush_backend(&self, ip: Ipv4Addr) {
        self.flush_flows(ip).await;
    }

    /// Runs [`Self::sync_services`] every [`PERIOD`], or sooner when kicked.
    pub async fn watch_services(self: Arc<Self>) {
        self.wait_ready().await;
        loop {
            self.sync_services().await;
            // A task going (rm, stop, exit) wakes it at once: it leaves the tables before its
            // process and veth are gone.
            let _ = tokio::time::timeout(PERIOD, self.services_kick.notified()).await;
        }
    }

    pub fn list_services(&self) -> Value {
        let st = self.state();
        let mut v: Vec<Value> =
            st.services().filter(|s| s.phase == Phase::Ready).map(|s| self.service_summary(&st, s)).collect();
        v.sort_by(|a, b| a["Name"].as_str().cmp(&b["Name"].as_str()));
        Value::Array(v)
    }

    fn service_summary(&self, st: &State, s: &Service) -> Value {
        let running = Self::task_names(s)
            .iter()
            .filter(|t| st.container(t).is_some_and(|c| c.name == **t && self.healthy(c)))
            .count();
        json!({
            "ID": s.id,
            "Name": s.name,
            "Mode": if s.replicas.is_some() { "replicated" } else { "backends" },
            "Replicas": format!("{running}/{}", Self::task_names(s).len()),
            "Ports": s.ports.iter().map(port_json).collect::<Vec<_>>(),
        })
    }

    pub fn inspect_service(&self, name: &str) -> Result<Value> {
        let st = self.state();
        let s = lookup(&st, name)?;
        let vips: Vec<Value> = s
            .vips
            .iter()
            .filter(|_| s.endpoint_mode == "vip")
            .map(|v| {
                let prefix = st.network_by_id(&v.network_id).and_then(|n| n.ipam).map_or(32, |i| i.subnet.prefix_len());
                json!({ "NetworkID": v.network_id, "Network": st.network_by_id(&v.network_id).map(|n| n.name.clone()), "Addr": format!("{}/{prefix}", v.vip) })
            })
            .collect();
        let networks: Vec<Value> = s
            .vips
            .iter()
            .map(|v| json!({ "Target": v.network_id, "Name": st.network_by_id(&v.network_id).map(|n| n.name.clone()) }))
            .collect();
        Ok(json!({
            "ID": s.id,
            "CreatedAt": s.created,
            "Spec": {
                "Name": s.name,
                "Mode": match s.replicas {
                    Some(n) => json!({ "Replicated": { "Replicas": n } }),
                    None => json!({ "Backends": s.backends }),
                },
                "TaskTemplate": { "ContainerSpec": { "Command": s.cmd }, "Networks": networks },
                "Backends": s.backends,
                "EndpointSpec": { "Mode": s.endpoint_mode, "Ports": s.ports.iter().map(port_json).collect::<Vec<_>>() },
                "Affinity": s.affinity,
                "HealthCheck": s.health_tcp.map(|p| json!({ "TCPPort": p })),
            },
            "Endpoint": { "VirtualIPs": vips, "Ports": s.ports.iter().map(port_json).collect::<Vec<_>>() },
            "Tasks": tasks_json(self, &st, s),
        }))
    }

    /// `service ps`: the tasks with their addresses and state.
    pub fn service_tasks(&self, name: &str) -> Result<Value> {
        let st = self.state();
        let s = lookup(&st, name)?;
        Ok(tasks_json(self, &st, s))
    }
}

fn port_json(p: &ServicePort) -> Value {
    let mode = if p.host_mode { "host" } else { "ingress" };
    json!({ "Protocol": p.proto.as_str(), "TargetPort": p.target, "PublishedPort": p.published, "PublishMode": mode })
}

fn tasks_json(d: &Daemon, st: &State, s: &Service) -> Value {
    Value::Array(
        Daemon::task_names(s)
            .iter()
            .map(|t| {
                let c = st.container(t).filter(|c| c.name == *t);
                let state = match c {
                    None => "pending",
                    Some(c) if c.phase != Phase::Ready => "starting",
                    Some(c) if d.svc_unhealthy.lock().unwrap().contains(&c.id) => "unhealthy",
                    Some(c) if d.healthy(c) => "running",
                    Some(_) => "exited",
                };
                let addrs: Vec<Value> = c
                    .map(|c| {
                        c.endpoints
                            .iter()
                            .filter_map(|e| {
                                let net = st.network_by_id(&e.network_id)?.name.clone();
                                Some(json!({ "Network": net, "Addr": e.ipv4.map(|a| a.to_string()) }))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                json!({
                    "Name": t,
                    "Kind": if s.is_replica_name(t) { "replica" } else { "backend" },
                    "ContainerID": c.map(|c| c.id.clone()),
                    "State": state,
                    "Addresses": addrs,
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_specs_in_both_forms() {
        let p = parse_port("published=8080,target=80").unwrap();
        assert_eq!((p.published, p.target, p.proto), (Some(8080), 80, Proto::Tcp));
        let p = parse_port("published=53,target=5300,protocol=udp,mode=ingress").unwrap();
        assert_eq!((p.published, p.target, p.proto), (Some(53), 5300, Proto::Udp));
        let p = parse_port("9090:90/udp").unwrap();
        assert_eq!((p.published, p.target, p.proto), (Some(9090), 90, Proto::Udp));
        assert_eq!(parse_port("80").unwrap().published, None);
        let p = parse_port("published=8080,target=80,mode=host").unwrap();
        assert!(p.host_mode && !parse_port("8080:80").unwrap().host_mode);
        for bad in
            ["published=1", "target=0", "x=1,target=2", "8080:80/sctp", "a:b", "published=8080,target=80,mode=bogus"]
        {
            assert!(parse_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn replica_names_are_name_dot_number() {
        let s = Service {
            id: "x".into(),
            name: "web".into(),
            vips: vec![],
            replicas: Some(2),
            cmd: vec![],
            backends: vec![],
            ports: vec![],
            endpoint_mode: "vip".into(),
            affinity: "none".into(),
            health_tcp: None,
            created: 0,
            phase: Phase::Ready,
            here: None,
            host_slot: None,
        };
        assert_eq!(s.replica_names(), ["web.1", "web.2"]);
        assert!(s.is_replica_name("web.7"));
        for other in ["web", "web.", "web.x", "webs.1", "web.1a", "api.1"] {
            assert!(!s.is_replica_name(other), "{other}");
        }
        assert!(replicas(Some(-1)).is_err() && replicas(Some(3)).unwrap() == Some(3));
    }
}
