//! Services across nodes: a service whose networks are overlays is defined in the cluster
//! store; its replicas (tasks `NAME.<slot>`) are placed on the live nodes by a scheduler every
//! daemon runs (compare-and-swap per task, so concurrent schedulers agree), and each daemon
//! runs the tasks placed on it through the single-host service machinery (its local copy of
//! the service lists the slots placed here). The VIP is claimed cluster-wide and answers on
//! every node, balanced over the tasks of every node (remote ones through the tunnel).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use serde_json::Value;
use tracing::{info, warn};

use super::Daemon;
use crate::api::ServiceUpdate;
use crate::cluster::{Cluster, ServiceRecord, Snapshot};
use crate::error::Result;
use crate::ipam;
use crate::state::{self, DriverKind, Phase, Service, ServicePort, ServiceVip};
use netpath_common::MAX_SERVICE_SLOTS;

/// What a scheduler does to one task of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Placement {
    /// Put slot on node; the task key's revision as read (0: absent).
    Place { slot: u32, node: String, seen_rev: i64 },
    /// The slot is beyond the replica count.
    Drop { slot: u32, seen_rev: i64 },
}

/// The scheduler, pure: tasks without a live node go to the live node running the fewest of
/// this service's tasks (then the fewest tasks overall, then by name): replicas spread.
pub(super) fn schedule(snap: &Snapshot, svc: &ServiceRecord) -> Vec<Placement> {
    let alive: Vec<&String> = snap.alive.keys().collect();
    if alive.is_empty() {
        return vec![];
    }
    let mut mine: BTreeMap<&str, usize> = alive.iter().map(|n| (n.as_str(), 0)).collect();
    let mut total: BTreeMap<&str, usize> = mine.clone();
    for ((sid, slot), (t, _)) in &snap.tasks {
        let Some(n) = total.get_mut(t.node.as_str()) else { continue };
        *n += 1;
        if sid == &svc.id && *slot <= svc.replicas {
            *mine.get_mut(t.node.as_str()).expect("same keys") += 1;
        }
    }
    let mut out = vec![];
    for slot in 1..=svc.replicas {
        let cur = snap.tasks.get(&(svc.id.clone(), slot));
        if cur.is_some_and(|(t, _)| snap.alive.contains_key(&t.node)) {
            continue;
        }
        let node = alive
            .iter()
            .map(|n| n.as_str())
            .min_by_key(|n| (mine[n], total[n], *n))
            .expect("alive is not empty")
            .to_string();
        *mine.get_mut(node.as_str()).expect("alive") += 1;
        *total.get_mut(node.as_str()).expect("alive") += 1;
        out.push(Placement::Place { slot, node, seen_rev: cur.map_or(0, |(_, r)| *r) });
    }
    for ((sid, slot), (_, rev)) in snap.tasks.range((svc.id.clone(), svc.replicas + 1)..) {
        if sid != &svc.id {
            break;
        }
        out.push(Placement::Drop { slot: *slot, seen_rev: *rev });
    }
    out
}

impl Daemon {
    pub(super) fn cluster_handle(&self) -> Result<&Arc<Cluster>> {
        self.cluster.as_ref().ok_or_else(|| bad_request!("this daemon is not part of a cluster"))
    }

    /// True when any of these networks is an overlay (the service is then a cluster one).
    pub(super) fn on_overlay(&self, networks: &[String]) -> bool {
        let st = self.state();
        networks.iter().any(|n| st.network(n).is_some_and(|n| n.driver == DriverKind::Overlay))
    }

    /// `service create` on overlay networks.
    /// `only_single_host`: options given that only single-host services have yet.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn create_cluster_service(
        self: &Arc<Self>,
        name: &str,
        networks: &[String],
        cmd: &[String],
        only_single_host: bool,
        replicas: Option<u32>,
        endpoint_mode: String,
        ports: Vec<ServicePort>,
    ) -> Result<Value> {
        let cluster = self.cluster_handle()?.clone();
        let nets: Vec<state::Network> = {
            let st = self.state();
            let mut out: Vec<state::Network> = vec![];
            for n in networks {
                let net = super::networks::usable(&st, n)?;
                if net.driver != DriverKind::Overlay {
                    return Err(bad_request!(
                        "network {}: a cluster service's networks must all be overlays ({} is {})",
                        net.name,
                        net.name,
                        net.driver.as_str()
                    ));
                }
                if out.iter().any(|x| x.id == net.id) {
                    return Err(bad_request!("network {} is given twice", net.name));
                }
                out.push(net.clone());
            }
            out
        };
        {
            // This node's own published ports; the others check theirs when they run a task.
            let st = self.state();
            for p in ports.iter().filter_map(|p| Some((p.published?, p.proto))) {
                let mine = crate::ports::Binding { host_ip: None, host_port: p.0, container_port: p.0, proto: p.1 };
                if st.container_bindings().iter().any(|b| b.clashes(&mine))
                    || st.services().any(|o| o.ports.iter().any(|q| q.published == Some(p.0) && q.proto == p.1))
                {
                    return Err(conflict!("port {}/{} is already published on this node", p.0, p.1.as_str()));
                }
            }
        }
        if only_single_host {
            return Err(bad_request!(
                "--backend, --health-cmd-tcp and --affinity are supported on single-host services only for now"
            ));
        }
        let replicas = replicas.unwrap_or(0);
        if replicas > 0 && cmd.is_empty() {
            return Err(bad_request!("replicas need a command: service create ... --replicas N -- CMD ARGS"));
        }
        if self.state().service(name).is_some_and(|s| s.name == name) {
            return Err(conflict!("service name {name} is already in use"));
        }
        let id = state::new_id();
        let rec = cluster
            .create_service(|snap| {
                if snap.services.values().any(|s| s.name == name) {
                    return Err(conflict!("service name {name} is already in use"));
                }
                let mut vips = vec![];
                for net in &nets {
                    if endpoint_mode != "vip" {
                        vips.push((net.id.clone(), Ipv4Addr::UNSPECIFIED));
                        continue;
                    }
                    let pool = net.pool().ok_or_else(|| bad_request!("network {} has no IPAM", net.name))?;
                    let used: BTreeSet<Ipv4Addr> = snap.claimed(&net.id).collect();
                    let vip = ipam::allocate(&pool, &used, None)
                        .map_err(|e| conflict!("network {}: no address left for a VIP: {e}", net.name))?;
                    vips.push((net.id.clone(), vip));
                }
                Ok(ServiceRecord {
                    id: id.clone(),
                    name: name.to_string(),
                    vips,
                    replicas,
                    cmd: cmd.to_vec(),
                    endpoint_mode: endpoint_mode.clone(),
                    created: state::now(),
                    ports: ports.clone(),
                })
            })
            .await?;
        info!("service {} created in the cluster ({} replicas)", rec.name, rec.replicas);
        self.schedule_services(&cluster, &cluster.fresh_snapshot().await?).await;
        self.materialize_fresh(&cluster).await?;
        self.sync_services().await;
        self.inspect_service(&rec.name)
    }

    /// `service update`/`scale` of a cluster service: replicas, `--network-add`,
    /// `--network-rm` (overlays; a VIP claimed or released with the change).
    pub(super) async fn update_cluster_service(
        self: &Arc<Self>,
        name: &str,
        req: ServiceUpdate,
        replicas: Option<u32>,
    ) -> Result<Value> {
        if !req.add_backend.is_empty() || !req.rm_backend.is_empty() {
            return Err(bad_request!(
                "service {name} runs across nodes: --add-backend/--rm-backend are single-host only"
            ));
        }
        let cluster = self.cluster_handle()?.clone();
        let (id, add, rm) = {
            let st = self.state();
            let s = st.service(name).ok_or_else(|| not_found!("service {name} not found"))?;
            if s.phase != Phase::Ready {
                return Err(conflict!("service {} is being removed", s.name));
            }
            let mut add = vec![];
            for n in &req.network_add {
                let net = super::networks::usable(&st, n)?;
                if net.driver != DriverKind::Overlay {
                    return Err(bad_request!(
                        "network {}: a cluster service's networks must all be overlays",
                        net.name
                    ));
                }
                add.push(net.clone());
            }
            let mut rm = vec![];
            for n in &req.network_rm {
                rm.push(super::networks::lookup(&st, n)?.clone());
            }
            (s.id.clone(), add, rm)
        };
        if replicas.is_some() || !add.is_empty() || !rm.is_empty() {
            cluster
                .update_service(&id, |snap, mut rec| {
                    if let Some(r) = replicas {
                        rec.replicas = r;
                    }
                    for net in &rm {
                        if !rec.vips.iter().any(|(n, _)| *n == net.id) {
                            return Err(bad_request!("service {} is not on network {}", rec.name, net.name));
                        }
                        rec.vips.retain(|(n, _)| *n != net.id);
                    }
                    for net in &add {
                        if rec.vips.iter().any(|(n, _)| *n == net.id) {
                            return Err(conflict!("service {} is already on network {}", rec.name, net.name));
                        }
                        let vip = if rec.endpoint_mode == "vip" {
                            let pool = net.pool().ok_or_else(|| bad_request!("network {} has no IPAM", net.name))?;
                            let used: BTreeSet<Ipv4Addr> = snap.claimed(&net.id).collect();
                            ipam::allocate(&pool, &used, None)
                                .map_err(|e| conflict!("network {}: no address left for a VIP: {e}", net.name))?
                        } else {
                            Ipv4Addr::UNSPECIFIED
                        };
                        rec.vips.push((net.id.clone(), vip));
                    }
                    if rec.vips.is_empty() {
                        return Err(bad_request!("service {} would be on no network: remove it instead", rec.name));
                    }
                    Ok(rec)
                })
                .await?;
            self.schedule_services(&cluster, &cluster.fresh_snapshot().await?).await;
            self.materialize_fresh(&cluster).await?;
            self.sync_services().await;
        }
        self.inspect_service(name)
    }

    /// Runs the scheduler for every service (any node may: placements are compare-and-swap).
    pub(super) async fn schedule_services(&self, cluster: &Cluster, snap: &Snapshot) {
        for svc in snap.services.values() {
            for p in schedule(snap, svc) {
                let r = match &p {
                    Placement::Place { slot, node, seen_rev } => {
                        cluster.place_task(&svc.id, *slot, node, *seen_rev).await.map(|won| {
                            if won {
                                info!("service {}: task {} placed on {node}", svc.name, slot);
                            }
                        })
                    }
                    Placement::Drop { slot, seen_rev } => cluster.unplace_task(&svc.id, *slot, *seen_rev).await,
                };
                if let Err(e) = r {
                    warn!("service {}: scheduling: {e}", svc.name);
                    return;
                }
            }
        }
    }

    /// Makes the local copies of the cluster's services match it: the slots placed here,
    /// replica counts, services gone. The services' sync then runs and removes tasks.
    /// Makes the local copies from a fresh read. Another write of this node (a task placed by
    /// the watch loop, an endpoint) landing between the read and the copy makes that read
    /// stale, and a stale read is not applied: read again, so the caller's answer shows its
    /// own change.
    async fn materialize_fresh(self: &Arc<Self>, cluster: &Cluster) -> Result<()> {
        for _ in 0..10 {
            if self.materialize_services(&cluster.fresh_snapshot().await?).await {
                return Ok(());
            }
        }
        Err(crate::error::Error::Unavailable("the cluster store kept changing under this request: try again".into()))
    }

    /// Returns false when `snap` is older than this node's last write (nothing applied).
    pub(super) async fn materialize_services(self: &Arc<Self>, snap: &Snapshot) -> bool {
        let me = self.cluster.as_ref().map(|c| c.node_name().to_string()).unwrap_or_default();
        let mut changed = vec![];
        {
            let mut st = self.state();
            // Checked under the state lock, which a request making a local copy after its own
            // write also takes: an older copy never undoes that.
            if self.cluster.as_ref().is_some_and(|c| !c.current(snap)) {
                return false;
            }
            for rec in snap.services.values() {
                let here: BTreeSet<u32> = snap
                    .tasks
                    .iter()
                    .filter(|((sid, _), (t, _))| sid == &rec.id && t.node == me)
                    .map(|((_, slot), _)| *slot)
                    .collect();
                let current = st.service_by_id(&rec.id).cloned();
                let next = match current {
                    Some(s) if s.phase != Phase::Ready => continue,
                    Some(s) => {
                        // Networks kept keep their slot; added ones get a free one.
                        let fresh = rec.vips.iter().filter(|(n, _)| !s.vips.iter().any(|v| v.network_id == *n)).count();
                        let Some(mut slots) = st.free_slots(fresh, MAX_SERVICE_SLOTS).map(|v| v.into_iter()) else {
                            warn!("cluster service {}: no free service slot on this node", rec.name);
                            continue;
                        };
                        let vips = rec
                            .vips
                            .iter()
                            .map(|(net, vip)| match s.vips.iter().find(|v| v.network_id == *net) {
                                Some(v) => ServiceVip { vip: *vip, ..v.clone() },
                                None => ServiceVip {
                                    network_id: net.clone(),
                                    vip: *vip,
                                    slot: if vip.is_unspecified() {
                                        u32::MAX
                                    } else {
                                        slots.next().unwrap_or(u32::MAX)
                                    },
                                },
                            })
                            .collect();
                        let host_slot = match (s.host_slot, rec.ports.iter().any(|p| p.host_mode)) {
                            (Some(h), true) => Some(h),
                            (None, true) => st.free_slots(1, MAX_SERVICE_SLOTS).and_then(|v| v.first().copied()),
                            (_, false) => None,
                        };
                        Service {
                            replicas: Some(rec.replicas),
                            here: Some(here),
                            vips,
                            host_slot,
                            ports: rec.ports.clone(),
                            ..s
                        }
                    }
                    None => {
                        if let Some(other) = st.service(&rec.name).filter(|s| s.name == rec.name) {
                            warn!(
                                "cluster service {} is not run here: local service {} has its name",
                                rec.name, other.name
                            );
                            continue;
                        }
                        let host = usize::from(rec.ports.iter().any(|p| p.host_mode));
                        let Some(mut slots) = st.free_slots(rec.vips.len() + host, MAX_SERVICE_SLOTS) else {
                            warn!("cluster service {}: no free service slot on this node", rec.name);
                            continue;
                        };
                        let host_slot = if host == 1 { slots.pop() } else { None };
                        let vips = rec
                            .vips
                            .iter()
                            .zip(slots)
                            .map(|((net, vip), slot)| ServiceVip {
                                network_id: net.clone(),
                                vip: *vip,
                                slot: if vip.is_unspecified() { u32::MAX } else { slot },
                            })
                            .collect();
                        Service {
                            id: rec.id.clone(),
                            name: rec.name.clone(),
                            vips,
                            replicas: Some(rec.replicas),
                            cmd: rec.cmd.clone(),
                            backends: vec![],
                            ports: rec.ports.clone(),
                            endpoint_mode: rec.endpoint_mode.clone(),
                            affinity: "none".into(),
                            health_tcp: None,
                            created: rec.created,
                            phase: Phase::Ready,
                            here: Some(here),
                            host_slot,
                        }
                    }
                };
                if st.service_by_id(&rec.id) != Some(&next) {
                    changed.push(next.id.clone());
                    st.put_service(next);
                }
            }
            // Services the cluster no longer has: their local copies go (with their tasks).
            if self.cluster.as_ref().is_some_and(|c| c.connected()) {
                let gone: Vec<Service> = st
                    .services()
                    .filter(|s| s.here.is_some() && s.phase == Phase::Ready && !snap.services.contains_key(&s.id))
                    .cloned()
                    .collect();
                for s in gone {
                    changed.push(s.id.clone());
                    st.put_service(Service { phase: Phase::Removing, ..s });
                }
            }
        }
        for id in &changed {
            if let Err(e) = self.persist_service(id).await {
                warn!("service {id}: {e}");
            }
        }
        if !changed.is_empty() {
            self.services_changed(&changed);
        }
        true
    }

    /// Addresses of `s`'s tasks on other nodes on `network_id` (from their endpoint records).
    pub(super) fn remote_task_addrs(&self, s: &Service, network_id: &str) -> Vec<Ipv4Addr> {
        let (Some(cluster), Some(_)) = (&self.cluster, &s.here) else { return vec![] };
        let snap = cluster.snapshot();
        snap.endpoints
            .values()
            .filter(|e| e.network_id == network_id && e.node != cluster.node_name() && s.is_replica_name(&e.container))
            .filter(|e| {
                e.container.rsplit_once('.').and_then(|(_, n)| n.parse::<u32>().ok()).is_some_and(|n| {
                    n <= s.replicas.unwrap_or(0)
                        && snap.tasks.get(&(s.id.clone(), n)).is_some_and(|(t, _)| t.node == e.node)
                })
            })
            .map(|e| e.ip)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{NodeRecord, TaskRecord};

    fn snap(nodes: &[&str]) -> Snapshot {
        let mut s = Snapshot::default();
        for n in nodes {
            let r = NodeRecord { name: n.to_string(), addr: Ipv4Addr::LOCALHOST, joined: 0, version: String::new() };
            s.alive.insert(n.to_string(), r.clone());
            s.known_nodes.insert(n.to_string(), r);
        }
        s
    }

    fn svc(replicas: u32) -> ServiceRecord {
        ServiceRecord {
            id: "s".into(),
            name: "web".into(),
            vips: vec![],
            replicas,
            cmd: vec!["sleep".into()],
            endpoint_mode: "vip".into(),
            created: 0,
            ports: vec![],
        }
    }

    fn apply(s: &mut Snapshot, ps: &[Placement]) {
        for p in ps {
            match p {
                Placement::Place { slot, node, .. } => {
                    s.tasks.insert(("s".into(), *slot), (TaskRecord { node: node.clone() }, 1));
                }
                Placement::Drop { slot, .. } => {
                    s.tasks.remove(&("s".into(), *slot));
                }
            }
        }
    }

    fn per_node(s: &Snapshot) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for (t, _) in s.tasks.values() {
            *m.entry(t.node.clone()).or_default() += 1;
        }
        m
    }

    #[test]
    fn replicas_spread_over_live_nodes_and_move_off_dead_ones() {
        let mut s = snap(&["a", "b", "c"]);
        let p = schedule(&s, &svc(6));
        assert_eq!(p.len(), 6);
        apply(&mut s, &p);
        assert_eq!(per_node(&s).values().copied().collect::<Vec<_>>(), [2, 2, 2]);
        assert!(schedule(&s, &svc(6)).is_empty(), "a placed service stays put");
        // c dies: its two tasks go to a and b, one each.
        s.alive.remove("c");
        let p = schedule(&s, &svc(6));
        assert!(p.iter().all(|p| matches!(p, Placement::Place { node, seen_rev: 1, .. } if node != "c")), "{p:?}");
        apply(&mut s, &p);
        assert_eq!(per_node(&s), BTreeMap::from([("a".into(), 3), ("b".into(), 3)]));
        // Scaled down to 2: slots 3..6 are dropped.
        let p = schedule(&s, &svc(2));
        assert_eq!(p.iter().filter(|p| matches!(p, Placement::Drop { .. })).count(), 4);
        // No live node: nothing to do.
        assert!(schedule(&snap(&[]), &svc(3)).is_empty());
    }
}
