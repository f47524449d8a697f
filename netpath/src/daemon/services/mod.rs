//! Services: a VIP per service network, spread over the service's tasks by the datapath's
//! Maglev tables. The record says what is wanted (networks, replicas, joined containers,
//! ports); [`Daemon::sync_services`] (in `sync`) makes the kernel match it and runs the replicas — on
//! every change, when a task's container goes or its process exits, and every 200 ms (a
//! task that died unnoticed leaves its tables within that).

mod sync;

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tracing::info;

use super::networks::{lookup as lookup_network, usable};
use super::{Daemon, spawn_io, valid_name};
use crate::api::{ServiceCreate, ServiceUpdate};
use crate::error::{Error, Result};
use crate::ipam;
use crate::ports::Proto;
use crate::state::store::Op;
use crate::state::{self, DriverKind, Phase, Service, ServicePort, ServiceVip, State};
use netpath_common::MAX_SERVICE_SLOTS;
pub use sync::ServicesState;

fn lookup<'a>(st: &'a State, name: &str) -> Result<&'a Service> {
    st.service(name).ok_or_else(|| not_found!("service {name} not found"))
}

/// Parses `--publish published=P,target=T[,protocol=udp][,mode=ingress|host]` or `-p P:T[/udp]`.
pub fn parse_port(spec: &str) -> Result<ServicePort> {
    let bad = || {
        bad_request!(
            "invalid publish spec {spec:?}: use published=P,target=T[,protocol=tcp|udp][,mode=ingress|host] or P:T[/udp]"
        )
    };
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
                "mode" => {
                    host_mode = match v {
                        "ingress" => false,
                        "host" => true,
                        _ => return Err(bad_request!("invalid publish mode {v:?}: use ingress or host")),
                    }
                }
                _ => return Err(bad()),
            }
        }
        if host_mode && published.is_none() {
            return Err(bad_request!("invalid publish spec {spec:?}: mode=host needs a published port"));
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
            // A backend that declares its ports (`--expose`, `-p`) must serve the targets.
            if let Some(p) = s.ports.iter().find(|p| c.serves(p.target, p.proto) == Some(false)) {
                return Err(bad_request!(
                    "container {b} does not serve target port {}/{} of service {} (it exposes {})",
                    p.target,
                    p.proto.as_str(),
                    s.name,
                    c.declared_ports()
                ));
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
        self.wait_networks_created(&req.networks).await;
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
        self.sync_service(&id).await;
        self.inspect_service(&req.name)
    }

    pub async fn update_service(self: &Arc<Self>, name: &str, req: ServiceUpdate) -> Result<Value> {
        self.wait_ready().await;
        self.wait_networks_created(&req.network_add).await;
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
        self.sync_service(&id).await;
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
        self.sync_service(&id).await;
        if self.state().service_by_id(&id).is_some() {
            return Err(Error::Internal(anyhow::anyhow!(
                "service {name}: removal did not finish, see the daemon's log"
            )));
        }
        Ok(())
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
    json!({
        "Protocol": p.proto.as_str(),
        "TargetPort": p.target,
        "PublishedPort": p.published,
        "PublishMode": if p.host_mode { "host" } else { "ingress" },
    })
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
        let p = parse_port("published=8080,target=80,mode=host").unwrap();
        assert!(p.host_mode && p.published == Some(8080));
        let p = parse_port("9090:90/udp").unwrap();
        assert_eq!((p.published, p.target, p.proto), (Some(9090), 90, Proto::Udp));
        assert_eq!(parse_port("80").unwrap().published, None);
        for bad in [
            "published=1",
            "target=0",
            "x=1,target=2",
            "8080:80/sctp",
            "a:b",
            "published=8080,target=80,mode=mesh",
            "target=80,mode=host",
        ] {
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
