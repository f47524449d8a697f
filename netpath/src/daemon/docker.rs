//! The daemon's side of Docker's remote network driver: an endpoint dockerd joins to a
//! sandbox is a container record (unowned sandbox, labelled with the endpoint id) whose veth
//! is made with its container end left in the daemon's namespace, for dockerd to move into
//! the sandbox, name and address itself (the protocol's contract).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use tracing::info;

use super::Daemon;
use super::containers::{PeerEnd, plan_endpoint};
use super::networks::usable;
use crate::error::{Error, Result};
use crate::ports;
use crate::state::{self, Container, DriverKind, Phase, Sandbox};

/// The label naming the Docker endpoint a container record stands for.
pub const LABEL_DOCKER_ENDPOINT: &str = "io.netpath.docker.endpoint";

/// The record of a Docker endpoint: short, stable, a valid container name.
pub fn endpoint_record(endpoint_id: &str) -> String {
    format!("docker-{}", &endpoint_id[..endpoint_id.len().min(24)])
}

/// What Join answers: the interface dockerd moves into the sandbox, and the gateway.
pub struct Joined {
    pub src_name: String,
    pub gateway: Ipv4Addr,
}

impl Daemon {
    /// Subnets of every network: the IPAM driver keeps its pools clear of them.
    pub fn subnets(&self) -> Vec<ipnet::Ipv4Net> {
        self.state().subnets()
    }

    /// Join: makes the endpoint's veth (host end on the bridge, datapath attached) and records
    /// it with the sandbox dockerd names.
    pub async fn docker_join(
        &self,
        endpoint_id: &str,
        network: &str,
        sandbox_key: &str,
        ip: Ipv4Addr,
        mac: Option<[u8; 6]>,
    ) -> Result<Joined> {
        self.wait_ready().await;
        let name = endpoint_record(endpoint_id);
        let id = state::new_id();
        let _lock = self.locks.lock(&id).await;
        let (c, net) = {
            let mut st = self.state();
            if st.container(&name).is_some() {
                return Err(conflict!("endpoint {endpoint_id} has joined a sandbox already"));
            }
            let net = usable(&st, network)?.clone();
            if net.driver != DriverKind::Bridge {
                return Err(bad_request!("network {} is not a bridge network", net.name));
            }
            // A bridge network: no host addresses to keep out of its IPAM.
            let mut ep = plan_endpoint(&st, &net, &[], Some(&ip.to_string()), &[])?;
            // The name it has until dockerd renames it in the sandbox (at most 15 bytes).
            ep.ifname = format!("npc{}", &ep.id[..8]);
            if mac.is_some() {
                ep.mac = mac;
            }
            let c = Container {
                id: id.clone(),
                name,
                sandbox: Sandbox::Netns { path: PathBuf::from(sandbox_key), owned: false },
                endpoints: vec![ep],
                process: None,
                created: state::now(),
                ports: vec![],
                phase: Phase::Creating,
                hostname: None,
                dns: vec![],
                dns_search: vec![],
                labels: BTreeMap::from([(LABEL_DOCKER_ENDPOINT.to_string(), endpoint_id.to_string())]),
                ingress_allow: vec![],
                exposed: vec![],
            };
            st.put_container(c.clone());
            (c, net)
        };
        if let Err(e) = self.persist_container(&id).await {
            self.state().remove_container(&id);
            return Err(e);
        }
        let ep = &c.endpoints[0];
        let wired = async {
            let host = ep.host_ifname.as_deref().unwrap_or_default();
            let bridge = net.bridge.as_deref().unwrap_or_default();
            let master = self.nl.require_link(bridge).await?;
            let mac = ep.mac.unwrap_or_default();
            // The daemon's own namespace: dockerd finds the interface there by name (at the
            // network's MTU, which dockerd keeps when it moves it).
            self.nl.create_veth(host, master, Path::new("/proc/self/ns/net"), &ep.ifname, mac, net.opts.mtu).await?;
            let idx = self.nl.require_link(host).await?;
            self.attach_endpoint(&net, ep, host, idx)
        }
        .await;
        if let Err(e) = wired {
            self.finish_container_removal(&c).await;
            return Err(e.into());
        }
        self.state().update_container(&id, |x| x.phase = Phase::Ready);
        if let Err(e) = self.persist_container(&id).await {
            self.finish_container_removal(&c).await;
            return Err(e);
        }
        info!("docker endpoint {} joined {sandbox_key}", &endpoint_id[..endpoint_id.len().min(12)]);
        let gateway = net.ipam.map(|i| i.gateway).unwrap_or(Ipv4Addr::UNSPECIFIED);
        Ok(Joined { src_name: ep.ifname.clone(), gateway })
    }

    /// ProgramExternalConnectivity / RevokeExternalConnectivity: the endpoint's published
    /// ports become `reqs` (none to revoke).
    pub async fn docker_publish(&self, endpoint_id: &str, reqs: &[ports::Publish]) -> Result<()> {
        let name = endpoint_record(endpoint_id);
        let id = self.state().container(&name).map(|c| c.id.clone());
        let Some(id) = id else {
            return if reqs.is_empty() { Ok(()) } else { Err(not_found!("endpoint {endpoint_id} has not joined")) };
        };
        let _lock = self.locks.lock(&id).await;
        let old = self.current(&id, &name)?;
        let bindings = {
            let mut st = self.state();
            let b = ports::resolve(reqs, &st.bindings_except(&id))?;
            st.update_container(&id, |x| x.ports = b.clone());
            b
        };
        if let Err(e) = self.persist_container(&id).await {
            self.state().update_container(&id, |x| x.ports = old.ports.clone());
            return Err(e);
        }
        self.withdraw_ports(&old);
        let c = self.current(&id, &name)?;
        self.publish_ports(&c, c.primary_ipv4())?;
        info!("docker endpoint {}: {} published ports", &endpoint_id[..endpoint_id.len().min(12)], bindings.len());
        Ok(())
    }

    /// ProgramExternalConnectivity comes once dockerd has moved the endpoint's interface into
    /// its sandbox and brought it up: now it can become a target of uplink_xdp's redirects
    /// (see Daemon::xdp_endpoint). Not at Join: GRO turned on there, while the interface is
    /// still down here, would not make its host end a redirect target (the veth does that
    /// only for a change while up). Where this fails, the endpoint's flows stay on TC.
    pub async fn docker_xdp_ready(&self, endpoint_id: &str) {
        let name = endpoint_record(endpoint_id);
        let Some(c) = self.state().container(&name).cloned() else { return };
        let _lock = self.locks.lock(&c.id).await;
        let (Some(ep), Sandbox::Netns { path, .. }) = (c.endpoints.first(), &c.sandbox) else { return };
        let Some(host) = ep.host_ifname.as_deref() else { return };
        match self.nl.link_peer(host).await {
            Ok(Some((idx, Some(peer)))) => self.xdp_endpoint(PeerEnd::Index(path, peer, true), ep, idx),
            Ok(_) => tracing::debug!("endpoint {}: no veth peer; its flows stay on TC", ep.ifname),
            Err(e) => tracing::debug!("endpoint {}: {e:#}; its flows stay on TC", ep.ifname),
        }
    }

    /// DeleteEndpoint: unwires and forgets it; an endpoint that never joined is fine.
    pub async fn docker_delete_endpoint(&self, endpoint_id: &str) -> Result<()> {
        let name = endpoint_record(endpoint_id);
        if self.state().container(&name).is_none() {
            return Ok(());
        }
        match self.remove_container(&name, true).await {
            Err(Error::NotFound(_)) => Ok(()),
            r => r,
        }
    }
}
