//! Making the kernel, the DNS and the replicas match the services, one service at a time.
//!
//! A sync looks only at the services that may have changed: those a request touched (create,
//! update, rm), those whose task containers changed since the last look (gone, stopped,
//! exited, unhealthy, connected elsewhere: one cheap signature per task container, compared on
//! every tick), and those left to retry (a replica waiting out its restart backoff, a write
//! that failed). The first sync after a start looks at every service and removes what the pins
//! and bridges hold that no service claims. So a tick costs the number of task containers, not
//! services × tasks, and `service create` costs the same with 10,000 services as with one.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::super::Daemon;
use crate::api::ContainerCreate;
use crate::datapath::wire_addr;
use crate::ports::Proto;
use crate::state::{self, Phase, Service, State};
use netpath_common::{MAGLEV_M, ServiceInfo, svc_flags};

/// How often the tasks are checked without being told.
pub(super) const PERIOD: Duration = Duration::from_millis(200);
/// A replica that keeps exiting is restarted at most this often.
const RESTART_BACKOFF: Duration = Duration::from_secs(2);

type EntryKey = (Ipv4Addr, u16, u8);

/// What one service holds in the datapath and the DNS, as last written.
#[derive(Default)]
struct Written {
    /// Slot → the backends its table spreads over.
    tables: HashMap<u32, Vec<Ipv4Addr>>,
    /// (VIP or 0.0.0.0 for a published port, port, proto) → the entry written.
    entries: HashMap<EntryKey, ServiceInfo>,
    /// VIP → index of the bridge it was added to.
    vips: HashMap<Ipv4Addr, u32>,
    /// (network id, DNS name, addresses) it answers.
    names: Vec<(String, String, Vec<Ipv4Addr>)>,
    /// The task container names it was balanced over (the reverse index's entries).
    tasks: Vec<String>,
    /// Replicas it ran: scaling below this looks for replicas to remove.
    replicas: u32,
    /// A cluster service's slots on this node when it last ran them: when they move, replicas
    /// here may have to go.
    here: Option<BTreeSet<u32>>,
}

/// What the datapath holds for services, per service, as last written (so that what did not
/// change is not rewritten), and what the next sync must look at.
#[derive(Default)]
pub struct Programmed {
    by_service: HashMap<String, Written>,
    /// Task container name → ids of the services it is a task of.
    by_task: HashMap<String, HashSet<String>>,
    /// Task container name → its signature at the last look.
    seen: HashMap<String, u64>,
    /// Replica name → when it was last (re)started.
    restarts: HashMap<String, Instant>,
    /// Services to look at again on the next tick.
    retry: HashSet<String>,
    /// Cluster services: looked at on every tick, as their tasks on other nodes come and go
    /// with the cluster store, not with anything of this node's.
    cluster: HashSet<String>,
    /// False until the first sync after start: it looks at everything and also removes what
    /// no record claims.
    swept: bool,
}

/// The services' reconciler state: what is programmed, and what requests asked to look at.
#[derive(Default)]
pub struct ServicesState {
    prog: tokio::sync::Mutex<Programmed>,
    /// Ids of services a request changed, for the next sync.
    dirty: std::sync::Mutex<HashSet<String>>,
}

/// What one service wants in the kernel and the DNS now.
#[derive(Default)]
struct Wanted {
    tables: HashMap<u32, Vec<Ipv4Addr>>,
    entries: HashMap<EntryKey, ServiceInfo>,
    /// VIP → the name of the bridge it lives on.
    vips: HashMap<Ipv4Addr, String>,
    names: Vec<(String, String, Vec<Ipv4Addr>)>,
    tasks: Vec<String>,
}

impl Daemon {
    /// The containers that are tasks of `s`: its wanted replicas and joined containers.
    pub(super) fn task_names(s: &Service) -> Vec<String> {
        let mut t = s.replica_names();
        t.extend(s.backends.iter().cloned());
        t
    }

    /// A task container that may take new connections: built, its process (if any) running,
    /// and not failing its service's health check.
    pub(super) fn healthy(&self, c: &state::Container) -> bool {
        c.phase == Phase::Ready
            && (c.process.is_none() || Self::is_running(c))
            && !self.svc_unhealthy.lock().unwrap().contains(&c.id)
    }

    /// Everything about task container `name` a service's tables, names or replicas depend
    /// on, hashed: a change means its services need a look.
    fn task_signature(&self, st: &State, name: &str) -> u64 {
        let mut h = DefaultHasher::new();
        if let Some(c) = st.container(name).filter(|c| c.name == name) {
            c.id.hash(&mut h);
            (c.phase == Phase::Ready).hash(&mut h);
            self.healthy(c).hash(&mut h);
            for e in &c.endpoints {
                e.network_id.hash(&mut h);
                e.ipv4.hash(&mut h);
            }
        }
        h.finish()
    }

    /// Services the cluster changed here (a local copy updated): the next sync looks at them.
    pub(in crate::daemon) fn services_changed(&self, ids: &[String]) {
        self.services.dirty.lock().unwrap().extend(ids.iter().cloned());
        self.services_kick.notify_one();
    }

    /// Syncs after a request changed service `id`: it is looked at whatever else changed.
    pub(super) async fn sync_service(self: &Arc<Self>, id: &str) {
        self.services.dirty.lock().unwrap().insert(id.to_string());
        self.sync_services().await;
    }

    /// Makes the kernel, the DNS and the replicas match the services that may have changed
    /// (see the module's comment). Serialised: one sync at a time.
    pub async fn sync_services(self: &Arc<Self>) {
        let mut prog = self.services.prog.lock().await;
        let full = !prog.swept;
        let mut look: BTreeSet<String> =
            std::mem::take(&mut *self.services.dirty.lock().unwrap()).into_iter().collect();
        look.extend(prog.retry.drain());
        look.extend(prog.cluster.iter().cloned());
        {
            let st = self.state();
            if full {
                look.extend(st.services().map(|s| s.id.clone()));
            }
            let Programmed { by_task, seen, .. } = &mut *prog;
            for (task, services) in by_task.iter() {
                let sig = self.task_signature(&st, task);
                match seen.get_mut(task) {
                    Some(old) if *old == sig => continue,
                    Some(old) => *old = sig,
                    None => {
                        seen.insert(task.clone(), sig);
                    }
                }
                look.extend(services.iter().cloned());
            }
        }
        if look.is_empty() && !full {
            return;
        }
        let services: Vec<Option<Service>> = {
            let st = self.state();
            look.iter().map(|id| st.service_by_id(id).cloned()).collect()
        };
        self.remove_unwanted_replicas(&prog, &services, full).await;
        for (id, s) in look.iter().zip(&services) {
            let ok = match s {
                Some(s) if s.phase == Phase::Ready => self.run_replicas(&mut prog, s).await,
                _ => true,
            };
            let wanted = match s {
                Some(s) if s.phase == Phase::Ready => self.wanted(s),
                _ => Wanted::default(),
            };
            let written = self.write(&mut prog, id, wanted).await;
            match s {
                Some(s) if s.here.is_some() && s.phase == Phase::Ready => prog.cluster.insert(id.clone()),
                _ => prog.cluster.remove(id),
            };
            if s.is_none() {
                prog.by_service.remove(id); // nothing left to remember
            } else if !(ok && written) {
                prog.retry.insert(id.clone());
            }
            // Removals to finish: its tasks and kernel state are gone now.
            if let Some(s) = s.as_ref().filter(|s| s.phase == Phase::Removing) {
                if self.state().containers().any(|c| s.is_replica_name(&c.name)) {
                    prog.retry.insert(id.clone()); // a task that would not go: try again
                    continue;
                }
                prog.by_service.remove(id);
                self.state().remove_service(id);
                if let Err(e) = self.persist_service(id).await {
                    warn!("service {}: {e}", s.name);
                }
                info!("service {} removed", s.name);
            }
        }
        if full {
            self.sweep(&prog).await;
            prog.swept = true;
        }
        prog.restarts.retain(|_, t| t.elapsed() < RESTART_BACKOFF * 10);
    }

    /// Removes replicas no service wants (scaled down, or their service is being removed).
    /// Only when one might exist: the containers are scanned once, not per service.
    async fn remove_unwanted_replicas(self: &Arc<Self>, prog: &Programmed, services: &[Option<Service>], full: bool) {
        let scan: HashMap<&str, &Service> = services
            .iter()
            .flatten()
            .filter(|s| {
                let wanted = if s.phase == Phase::Ready { s.replicas.unwrap_or(0) } else { 0 };
                let had = prog.by_service.get(&s.id);
                full || wanted < had.map_or(0, |w| w.replicas)
                    || s.phase == Phase::Removing
                    // A cluster service's slots move between nodes whatever its count does.
                    || (s.here.is_some() && had.map(|w| &w.here) != Some(&s.here))
            })
            .map(|s| (s.name.as_str(), s))
            .collect();
        if scan.is_empty() {
            return;
        }
        let unwanted: Vec<(String, String)> = self
            .state()
            .containers()
            .filter_map(|c| {
                let (prefix, n) = c.name.rsplit_once('.')?;
                let s = scan.get(prefix)?;
                let n: u32 = n.parse().ok().filter(|_| s.is_replica_name(&c.name))?;
                let wanted = s.phase == Phase::Ready && s.wants_replica(n);
                (!wanted).then(|| (s.name.clone(), c.name.clone()))
            })
            .collect();
        for (svc, name) in &unwanted {
            if let Err(e) = self.remove_container(name, true).await {
                warn!("service {svc}: removing task {name}: {e}");
            }
        }
    }

    /// Starts `s`'s missing replicas and restarts exited ones; follows network changes on
    /// running ones. False when something is left for a later tick.
    async fn run_replicas(self: &Arc<Self>, prog: &mut Programmed, s: &Service) -> bool {
        let mut done = true;
        let Some(first) = s.vips.first() else { return true };
        let net_name = self.state().network_by_id(&first.network_id).map(|n| n.name.clone());
        let Some(net_name) = net_name else { return true };
        for r in s.replica_names() {
            let existing = self.state().container(&r).filter(|c| c.name == r).cloned();
            let exited = existing.as_ref().is_some_and(|c| c.phase == Phase::Ready && !Self::is_running(c));
            if let Some(c) = existing.as_ref().filter(|c| c.phase == Phase::Ready && !exited) {
                self.follow_networks(s, c).await; // --network-add / --network-rm
                continue;
            }
            if existing.is_some() && !exited {
                done = false; // being built or removed: look again
                continue;
            }
            if prog.restarts.get(&r).is_some_and(|t| t.elapsed() < RESTART_BACKOFF) {
                done = false;
                continue;
            }
            prog.restarts.insert(r.clone(), Instant::now());
            if exited {
                info!("service {}: task {r} exited, restarting it", s.name);
                if let Err(e) = self.remove_container(&r, true).await {
                    warn!("service {}: removing exited task {r}: {e}", s.name);
                    done = false;
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
                done = false;
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
        let w = prog.by_service.entry(s.id.clone()).or_default();
        w.replicas = s.replicas.unwrap_or(0);
        w.here = s.here.clone();
        done
    }

    /// Connects a running replica to the service's networks it is not on, and disconnects it
    /// from networks the service left.
    async fn follow_networks(self: &Arc<Self>, s: &Service, c: &state::Container) {
        let missing = s.vips.iter().any(|v| !c.endpoints.iter().any(|e| e.network_id == v.network_id));
        let extra = c.endpoints.iter().any(|e| !s.vips.iter().any(|v| v.network_id == e.network_id));
        if !missing && !extra {
            return;
        }
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

    /// What live service `s` wants now: a Maglev table per VIP over its healthy tasks' addresses
    /// on that VIP's network, its VIP and published-port entries, its DNS names.
    fn wanted(&self, s: &Service) -> Wanted {
        let st = self.state();
        let tasks = Self::task_names(s);
        let mut w = Wanted::default();
        let flags = if s.affinity == "client-ip" { svc_flags::AFFINITY_CLIENT_IP } else { 0 };
        let name = s.name.to_ascii_lowercase();
        for (i, v) in s.vips.iter().enumerate() {
            let mut backends: Vec<Ipv4Addr> = tasks
                .iter()
                .filter_map(|t| st.container(t).filter(|c| c.name == *t))
                .filter(|c| self.healthy(c))
                .filter_map(|c| c.endpoints.iter().find(|e| e.network_id == v.network_id)?.ipv4)
                .collect();
            backends.extend(self.remote_task_addrs(s, &v.network_id)); // tasks on other nodes
            // DNS: `NAME` (the VIP, or with dnsrr the tasks' addresses) and `tasks.NAME`.
            let own = if s.endpoint_mode == "vip" { vec![v.vip] } else { backends.clone() };
            w.names.push((v.network_id.clone(), name.clone(), own));
            w.names.push((v.network_id.clone(), format!("tasks.{name}"), backends.clone()));
            if s.endpoint_mode != "vip" {
                continue;
            }
            let Some(bridge) = st.network_by_id(&v.network_id).and_then(|n| n.bridge.clone()) else { continue };
            backends.sort();
            backends.dedup();
            let info = ServiceInfo { slot: v.slot, target_port: 0, backends: backends.len() as u16, flags };
            w.tables.insert(v.slot, backends);
            w.vips.insert(v.vip, bridge);
            // Every port of the VIP, both protocols, as swarm's VIPs do.
            for proto in [Proto::Tcp, Proto::Udp] {
                w.entries.insert((v.vip, 0, proto.number()), info);
            }
            // Published ports: on every host address, to the tasks of its first network. On
            // one host, `mode=host` reaches the same tasks (all of them run here); a cluster
            // service's `mode=host` ports are below.
            if i == 0 {
                for p in s.ports.iter().filter(|p| !(p.host_mode && s.here.is_some())) {
                    let Some(published) = p.published else { continue };
                    let info = ServiceInfo { target_port: p.target.to_be(), ..info };
                    w.entries.insert((Ipv4Addr::UNSPECIFIED, published, p.proto.number()), info);
                }
            }
        }
        // `mode=host` ports of a cluster service: only where a task runs, to the local tasks.
        if let (Some(slot), Some(first), Some(_)) = (s.host_slot, s.vips.first(), &s.here) {
            let mut local: Vec<Ipv4Addr> = s
                .replica_names()
                .iter()
                .filter_map(|t| st.container(t).filter(|c| c.name == *t))
                .filter(|c| self.healthy(c))
                .filter_map(|c| c.endpoints.iter().find(|e| e.network_id == first.network_id)?.ipv4)
                .collect();
            local.sort();
            if !local.is_empty() {
                let info = ServiceInfo { slot, target_port: 0, backends: local.len() as u16, flags: 0 };
                w.tables.insert(slot, local);
                for p in s.ports.iter().filter(|p| p.host_mode) {
                    let info = ServiceInfo { target_port: p.target.to_be(), ..info };
                    w.entries.insert((Ipv4Addr::UNSPECIFIED, p.published.unwrap_or(0), p.proto.number()), info);
                }
            }
        }
        w.tasks = tasks;
        w
    }

    /// Writes what service `id` wants over what it had: only what differs. Flows to backends
    /// that left are flushed. False when a write failed (the next tick tries again).
    async fn write(&self, prog: &mut Programmed, id: &str, want: Wanted) -> bool {
        let mut ok = true;
        let mut had = prog.by_service.remove(id).unwrap_or_default();
        // Where this service's flows were addressed, before and after: its VIPs, and its
        // published ports (on every host address). Only backends leaving a table need them.
        let (flow_vips, flow_ports): (HashSet<u32>, HashSet<(u16, u8)>) = if had.tables == want.tables {
            Default::default()
        } else {
            let vips = had.vips.keys().chain(want.vips.keys()).map(|a| wire_addr(*a)).collect();
            let ports = had
                .entries
                .keys()
                .chain(want.entries.keys())
                .filter(|k| k.0.is_unspecified())
                .map(|k| (k.1.to_be(), k.2))
                .collect();
            (vips, ports)
        };
        // VIP addresses on their bridges: the host answers ARP for them.
        for (vip, bridge) in &want.vips {
            if had.vips.contains_key(vip) {
                continue;
            }
            match self.nl.link_index(bridge).await {
                Ok(Some(idx)) => match self.nl.ensure_addr(idx, *vip, 32).await {
                    Ok(()) => {
                        had.vips.insert(*vip, idx);
                    }
                    Err(e) => {
                        warn!("VIP {vip}: {e:#}");
                        ok = false;
                    }
                },
                Ok(None) => warn!("VIP {vip}: bridge {bridge} missing"),
                Err(e) => {
                    warn!("VIP {vip}: {e:#}");
                    ok = false;
                }
            }
        }
        let mut gone_backends: BTreeSet<Ipv4Addr> = BTreeSet::new();
        {
            let mut dp = self.dp();
            // Tables before the entries that point at them.
            for (slot, backends) in &want.tables {
                if had.tables.get(slot) == Some(backends) {
                    continue;
                }
                let table = if backends.is_empty() {
                    vec![Ipv4Addr::UNSPECIFIED; MAGLEV_M as usize]
                } else {
                    crate::maglev::table(backends, MAGLEV_M as usize)
                };
                match dp.set_maglev(*slot, &table) {
                    Ok(()) => {
                        if let Some(old) = had.tables.insert(*slot, backends.clone()) {
                            gone_backends.extend(old.iter().filter(|a| !backends.contains(a)));
                        }
                    }
                    Err(e) => {
                        warn!("service table {slot}: {e:#}");
                        ok = false;
                    }
                }
            }
            for (k, info) in &want.entries {
                if had.entries.get(k) == Some(info) {
                    continue;
                }
                match dp.set_service(k.0, k.1, k.2, *info) {
                    Ok(()) => {
                        had.entries.insert(*k, *info);
                    }
                    Err(e) => {
                        warn!("service entry {}:{}: {e:#}", k.0, k.1);
                        ok = false;
                    }
                }
            }
            had.entries.retain(|k, _| {
                let keep = want.entries.contains_key(k);
                if !keep {
                    let _ = dp.remove_service(k.0, k.1, k.2);
                }
                keep
            });
            had.tables.retain(|slot, old| {
                let keep = want.tables.contains_key(slot);
                if !keep {
                    gone_backends.extend(old.iter());
                }
                keep
            });
        }
        let stale: Vec<(Ipv4Addr, u32)> =
            had.vips.iter().filter(|(v, _)| !want.vips.contains_key(v)).map(|(v, i)| (*v, *i)).collect();
        for (vip, idx) in stale {
            if let Err(e) = self.nl.remove_addr(idx, vip).await {
                warn!("VIP {vip}: {e:#}");
            }
            had.vips.remove(&vip);
        }
        // DNS: this service's names only, when they changed.
        if had.names != want.names {
            let old: Vec<(String, String)> = had.names.iter().map(|(n, q, _)| (n.clone(), q.clone())).collect();
            self.dns.replace_service_names(&old, want.names.clone());
            had.names = want.names;
        }
        // The reverse index: which services each task container balances.
        for t in had.tasks.iter().filter(|t| !want.tasks.contains(t)) {
            if let Some(set) = prog.by_task.get_mut(t) {
                set.remove(id);
                if set.is_empty() {
                    prog.by_task.remove(t);
                    prog.seen.remove(t);
                }
            }
        }
        for t in &want.tasks {
            prog.by_task.entry(t.clone()).or_default().insert(id.to_string());
        }
        had.tasks = want.tasks;
        // Flows to backends that left must not keep using them: those this service made (to
        // its VIPs or published ports), not the backend's other flows.
        if !gone_backends.is_empty() {
            let backends = gone_backends.iter().map(|a| wire_addr(*a)).collect();
            self.flush_service_flows(flow_vips, flow_ports, backends).await;
        }
        prog.by_service.insert(id.to_string(), had);
        ok
    }

    /// Forgets the flows a service balanced onto one of `backends`: those addressed to one of
    /// its `vips` or its published `ports` ((port, protocol), wire order).
    async fn flush_service_flows(&self, vips: HashSet<u32>, ports: HashSet<(u16, u8)>, backends: HashSet<u32>) {
        let table = self.ct_table.clone();
        let gone = tokio::task::spawn_blocking(move || {
            table.flush_where(|k, e| {
                backends.contains(&e.xlate.daddr) && (vips.contains(&k.daddr) || ports.contains(&(k.dport, k.proto)))
            })
        })
        .await;
        match gone {
            Ok(Ok(gone)) => self.flows_expired(&gone),
            Ok(Err(e)) => warn!("flushing a service's flows: {e:#}"),
            Err(e) => warn!("flushing a service's flows: {e}"),
        }
    }

    /// After a start: removes the service entries the pins hold and the VIP addresses a dead
    /// daemon left on bridges that no service claims now.
    async fn sweep(&self, prog: &Programmed) {
        let entries: HashSet<EntryKey> = prog.by_service.values().flat_map(|w| w.entries.keys().copied()).collect();
        let vips: HashSet<Ipv4Addr> = prog.by_service.values().flat_map(|w| w.vips.keys().copied()).collect();
        {
            let mut dp = self.dp();
            match dp.service_keys() {
                Ok(keys) => {
                    for k in keys.into_iter().filter(|k| !entries.contains(k)) {
                        let _ = dp.remove_service(k.0, k.1, k.2);
                    }
                }
                Err(e) => warn!("reading service entries: {e:#}"),
            }
        }
        // Every /32 on a netpath bridge that is neither its gateway nor a wanted VIP.
        let nets: Vec<state::Network> = self.state().networks().cloned().collect();
        for n in &nets {
            let Some(bridge) = &n.bridge else { continue };
            let Ok(Some(idx)) = self.nl.link_index(bridge).await else { continue };
            let Ok(addrs) = self.nl.addresses_v4(Some(idx)).await else { continue };
            for (a, len) in addrs {
                if len == 32 && !vips.contains(&a) && n.ipam.is_some_and(|i| i.gateway != a) {
                    let _ = self.nl.remove_addr(idx, a).await;
                }
            }
        }
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
}
