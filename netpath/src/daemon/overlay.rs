//! Overlay networks and the cluster: creating and removing them in the cluster store,
//! materialising every cluster network on this node (a local bridge, as the overlay driver
//! builds it), cluster-wide addresses for containers, this node's endpoint records, and the
//! other nodes' endpoints fed to the resolver (and the datapath once it has the overlay maps).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use serde_json::Value;
use tracing::{info, warn};

use super::{Daemon, parse_ip, valid_name};
use crate::api::NetworkCreate;
use crate::cluster::{Cluster, EndpointRecord, OverlayNetwork};
use crate::drivers::driver;
use crate::drivers::overlay::VXLAN_OVERHEAD;
use crate::error::Result;
use crate::ipam;
use crate::state::{self, Container, DriverKind, Endpoint, IpamConfig, NetOpts, Network, Phase};

/// `-o encrypted`: refused, the kernel has neither of the two ways to encrypt.
const ENCRYPTED_OPT: &str = "encrypted";
/// Docker swarm's default address pool for overlays: /24s out of 10.0.0.0/8.
const OVERLAY_POOL: &str = "10.0.0.0/8";
const OVERLAY_PREFIX: u8 = 24;
/// How many addresses a run tries when other nodes take the ones it picked meanwhile.
const CLAIM_ATTEMPTS: usize = 32;

impl Daemon {
    fn cluster(&self) -> Result<&Arc<Cluster>> {
        self.cluster.as_ref().ok_or_else(|| {
            bad_request!(
                "overlay networks need a cluster store: start the daemon with --cluster-store etcd://HOST:PORT \
                 --node-ip UNDERLAY_IP"
            )
        })
    }

    /// `network create -d overlay`: checks, then one etcd transaction; every node (this one
    /// at once, the others from their watch) makes the local bridge.
    pub(super) async fn create_overlay_network(&self, req: NetworkCreate) -> Result<Value> {
        let cluster = self.cluster()?.clone();
        valid_name("network", &req.name)?;
        if req.options.contains_key(ENCRYPTED_OPT) {
            return Err(bad_request!(
                "-o encrypted is not supported: this kernel has neither IPsec ESP (xfrm) nor WireGuard, so \
                 overlay traffic cannot be encrypted here"
            ));
        }
        if let Some(k) = req.options.keys().next() {
            return Err(bad_request!("unsupported network option {k:?} for an overlay network (supported: none)"));
        }
        let (gateway, ip_range, subnet) = super::networks::addressing(&req)?;
        let mut aux = BTreeMap::new();
        for (n, a) in &req.aux_addresses {
            aux.insert(n.clone(), parse_ip(&format!("--aux-address {n}"), a)?);
        }
        if let Some(s) = subnet {
            let pool = ipam::pool(s, gateway, ip_range)?;
            for (n, ip) in &aux {
                if !s.contains(ip) || *ip == pool.gateway {
                    return Err(bad_request!("--aux-address {n}={ip} is not a free address of subnet {s}"));
                }
            }
        }
        // What this node has: its networks and routes (another node's are its own business).
        let (local_subnets, local_names): (Vec<ipnet::Ipv4Net>, Vec<String>) = {
            let st = self.state();
            (
                st.networks()
                    .filter(|n| n.driver != DriverKind::Overlay)
                    .filter_map(|n| n.ipam.map(|i| i.subnet))
                    .collect(),
                st.networks().filter(|n| n.driver != DriverKind::Overlay).map(|n| n.name.clone()).collect(),
            )
        };
        if local_names.contains(&req.name) {
            return Err(conflict!("network with name {} already exists", req.name));
        }
        let routed = self.nl.routed_prefixes().await?;
        let id = state::new_id();
        let me = cluster.node_name().to_string();
        let on = cluster
            .create_network(|snap| {
                if snap.network_by_name(&req.name).is_some() {
                    return Err(conflict!("network with name {} already exists", req.name));
                }
                let taken: Vec<ipnet::Ipv4Net> = snap
                    .networks
                    .values()
                    .map(|n| n.subnet)
                    .chain(local_subnets.iter().copied())
                    .chain(routed.iter().copied())
                    .collect();
                let subnet = match subnet {
                    Some(s) => {
                        if let Some(o) = snap.networks.values().find(|n| ipam::overlaps(n.subnet, s)) {
                            return Err(conflict!(
                                "subnet {s} overlaps with overlay network {} ({})",
                                o.name,
                                o.subnet
                            ));
                        }
                        if let Some(o) = local_subnets.iter().find(|n| ipam::overlaps(**n, s)) {
                            return Err(conflict!("subnet {s} overlaps with {o}, a network of this node"));
                        }
                        s
                    }
                    None => next_free_overlay_subnet(&taken)
                        .ok_or_else(|| conflict!("no free /24 left in {OVERLAY_POOL}: give one with --subnet"))?,
                };
                let pool = ipam::pool(subnet, gateway, ip_range)?;
                let vni = snap.free_vni().ok_or_else(|| conflict!("no free VNI left"))?;
                Ok(OverlayNetwork {
                    id: id.clone(),
                    name: req.name.clone(),
                    subnet: pool.subnet,
                    gateway: pool.gateway,
                    ip_range,
                    vni,
                    attachable: req.attachable,
                    internal: req.internal,
                    labels: req.labels.clone(),
                    aux_addresses: aux.clone(),
                    created: state::now(),
                    creator: me.clone(),
                })
            })
            .await?;
        info!("overlay network {} created in the cluster ({}, VNI {})", on.name, on.subnet, on.vni);
        self.materialize(&on).await?;
        let st = self.state();
        let net = st.network_by_id(&on.id).ok_or_else(|| not_found!("network {} not found", on.name))?;
        Ok(self.network_json(&st, net))
    }

    /// `network rm` of an overlay: refused while a container on any node uses it; removed
    /// from the cluster, then here (the other nodes follow their watch).
    pub(super) async fn remove_overlay_network(&self, net: &Network) -> Result<()> {
        self.cluster()?.remove_network(&net.id).await?;
        self.dematerialize(&net.id, None).await;
        Ok(())
    }

    /// Makes the local copy of a cluster network: record, bridge, datapath entry. Idempotent.
    async fn materialize(&self, on: &OverlayNetwork) -> Result<()> {
        if self.state().network_by_id(&on.id).is_some_and(|n| n.phase == Phase::Ready) {
            return Ok(()); // the common case: every watch event passes here
        }
        let _lock = self.locks.lock(&on.id).await;
        let mtu = self.underlay_mtu().await.saturating_sub(VXLAN_OVERHEAD);
        let net = {
            let mut st = self.state();
            if let Some(n) = st.network_by_id(&on.id) {
                if n.phase == Phase::Ready {
                    return Ok(());
                }
                n.clone()
            } else {
                if let Some(other) = st.network(&on.name).filter(|n| n.name == on.name) {
                    return Err(conflict!(
                        "overlay network {} cannot be made on this node: its network {} ({}) has that name",
                        on.name,
                        other.name,
                        other.driver.as_str()
                    ));
                }
                let n = Network {
                    id: on.id.clone(),
                    name: on.name.clone(),
                    driver: DriverKind::Overlay,
                    ipam: Some(IpamConfig { subnet: on.subnet, gateway: on.gateway, ip_range: on.ip_range }),
                    bridge: Some(format!("np-{}", &on.id[..12])),
                    builtin: false,
                    created: on.created,
                    index: st.next_network_index(),
                    gateway_mode: state::GatewayMode::Nat,
                    phase: Phase::Creating,
                    opts: NetOpts {
                        internal: on.internal,
                        mtu: Some(mtu),
                        labels: on.labels.clone(),
                        aux_addresses: on.aux_addresses.clone(),
                        overlay: Some(state::Overlay { vni: on.vni, attachable: on.attachable }),
                        ..NetOpts::default()
                    },
                };
                st.put_network(n.clone());
                n
            }
        };
        if let Err(e) = self.persist_network(&net.id).await {
            self.state().remove_network(&net.id);
            return Err(e);
        }
        let built = async {
            driver(net.driver).ensure_network(&self.nl, &net).await?;
            self.publish_network(&net)?;
            self.ensure_vxlan().await?;
            self.attach_overlay_bridge(&net).await
        }
        .await;
        if let Err(e) = built {
            self.finish_network_removal(&net).await;
            return Err(e.into());
        }
        self.state().set_network_phase(&net.id, Phase::Ready);
        self.persist_network(&net.id).await?;
        if let Err(e) = self.refresh_host().await {
            warn!("refreshing host addresses: {e:#}");
        }
        info!(
            "overlay network {} ready on this node (bridge {}, MTU {mtu})",
            net.name,
            net.bridge.as_deref().unwrap_or("")
        );
        Ok(())
    }

    /// Removes the local copy of a network the cluster no longer has, unless containers of
    /// this node still use it (they keep working; it goes with the last of them).
    /// `seen`: the copy of the cluster that says it is gone (None: the user's own removal).
    async fn dematerialize(&self, id: &str, seen: Option<&crate::cluster::Snapshot>) {
        let _lock = self.locks.lock(id).await;
        let net = {
            let st = self.state();
            if let (Some(snap), Some(c)) = (seen, &self.cluster)
                && (!c.current(snap) || snap.networks.contains_key(id))
            {
                return; // an older copy than this node's own last write
            }
            match st.network_by_id(id) {
                Some(n) if n.driver == DriverKind::Overlay && st.member_count(id) == 0 => n.clone(),
                _ => return,
            }
        };
        self.finish_network_removal(&net).await;
        info!("overlay network {} removed from this node", net.name);
        let last = !self.state().networks().any(|n| n.driver == DriverKind::Overlay);
        if let (true, Some(o)) = (last, &self.overlay_dp) {
            match o.remove_vxlan(&self.nl).await {
                Ok(()) => info!("no overlay network left: VXLAN device removed"),
                Err(e) => warn!("removing the VXLAN device: {e:#}"),
            }
        }
    }

    /// Whether this daemon is part of a cluster (`--cluster-store`).
    pub fn clustered(&self) -> bool {
        self.cluster.is_some()
    }

    /// After a (re)start: the VXLAN device and its program, if overlays are here (adopting
    /// what the last daemon left: decapsulation goes on across the restart).
    pub(super) async fn reconcile_vxlan(&self) {
        let overlays: Vec<state::Network> =
            self.state().networks().filter(|n| n.driver == DriverKind::Overlay).cloned().collect();
        if overlays.is_empty() {
            return;
        }
        if let Err(e) = self.ensure_vxlan().await {
            warn!("VXLAN device: {e:#}");
        }
        for net in &overlays {
            if let Err(e) = self.attach_overlay_bridge(net).await {
                warn!("overlay network {}: {e:#}", net.name);
            }
        }
    }

    /// The program on an overlay network's bridge that sends this host's own packets for
    /// containers on other nodes through the tunnel (from the node's underlay address), and
    /// answers the host's ARP for them. Idempotent; after a restart it claims the pinned link.
    async fn attach_overlay_bridge(&self, net: &state::Network) -> anyhow::Result<()> {
        let (Some(o), Some(bridge)) = (&self.overlay_dp, net.bridge.as_deref()) else { return Ok(()) };
        let idx = self.nl.require_link(bridge).await?;
        o.overlay_attach_bridge(bridge, idx).await
    }

    /// Takes [`Self::attach_overlay_bridge`]'s program (and its pin) off a bridge about to go.
    pub(super) async fn detach_overlay_bridge(&self, net: &state::Network) {
        let (Some(o), Some(bridge), Some(_)) = (&self.overlay_dp, net.bridge.as_deref(), &net.opts.overlay) else {
            return;
        };
        if let Ok(Some(idx)) = self.nl.link_index(bridge).await
            && let Err(e) = o.overlay_detach_bridge(idx).await
        {
            warn!("overlay network {}: {e:#}", net.name);
        }
    }

    /// The host's VXLAN device (made with the first overlay network; idempotent, and after a
    /// restart it claims the device and program the last daemon left).
    async fn ensure_vxlan(&self) -> anyhow::Result<()> {
        let Some(o) = &self.overlay_dp else {
            anyhow::bail!("this eBPF object has no overlay datapath");
        };
        let underlay = self.underlay_link().await;
        let mtu = underlay.as_ref().and_then(|(name, _)| link_mtu(name)).unwrap_or(1500);
        o.ensure_vxlan(&self.nl, mtu).await?;
        // With `--overlay-decap underlay`, VXLAN for this node's containers is decapsulated on
        // the underlay interface, ahead of the device; otherwise (or without that program)
        // the device does it all. Quiet bench: the device's round trip is 0.8x underlay_in's.
        let underlay_decap = self.cluster.as_ref().is_some_and(|c| c.config().underlay_decap);
        if let Some((name, idx)) = underlay.as_ref().filter(|_| underlay_decap) {
            match o.overlay_attach_underlay(name, *idx).await {
                Ok(true) => {}
                Ok(false) => info!("this eBPF object has no underlay_in: the VXLAN device decapsulates everything"),
                Err(e) => warn!("underlay {name}: {e:#}; the VXLAN device decapsulates everything"),
            }
        }
        // The routing mesh and host processes reach other nodes' containers from this address.
        o.overlay_set_node_ip(self.cluster.as_ref().map(|c| c.config().node_ip))?;
        Ok(())
    }

    /// Makes the remote-endpoint map match the cluster: every endpoint of another node on an
    /// overlay network this node has, with its node's underlay address.
    fn sync_remote_endpoints(&self, snap: &crate::cluster::Snapshot) -> anyhow::Result<()> {
        let Some(o) = &self.overlay_dp else { return Ok(()) };
        let me = self.cluster.as_ref().map(|c| c.node_name().to_string()).unwrap_or_default();
        let vnis: BTreeMap<String, u32> =
            self.state().networks().filter_map(|n| Some((n.id.clone(), n.opts.overlay.as_ref()?.vni))).collect();
        let want: BTreeSet<crate::datapath::RemoteEndpoint> = snap
            .endpoints
            .values()
            .filter(|e| e.node != me)
            .filter_map(|e| {
                Some(crate::datapath::RemoteEndpoint {
                    vni: *vnis.get(&e.network_id)?,
                    ip: e.ip,
                    mac: e.mac,
                    node_ip: snap.alive.get(&e.node).map_or(e.node_ip, |n| n.addr),
                })
            })
            .collect();
        let have: BTreeSet<crate::datapath::RemoteEndpoint> = o.overlay_remotes()?.into_iter().collect();
        for gone in have.difference(&want) {
            // An address that moved (same key, new MAC or node) is simply replaced below.
            if !want.iter().any(|w| (w.vni, w.ip) == (gone.vni, gone.ip)) {
                o.overlay_remove_remote(gone.vni, gone.ip)?;
            }
        }
        for new in want.difference(&have) {
            o.overlay_add_remote(new)?;
        }
        Ok(())
    }

    /// The MTU of the link holding --node-ip (1500 if it cannot be read).
    async fn underlay_mtu(&self) -> u32 {
        let link = self.underlay_link().await;
        link.and_then(|(name, _)| link_mtu(&name)).unwrap_or(1500)
    }

    /// The link holding --node-ip (name, ifindex); None without a cluster, or (warned) if
    /// no link has that address or the links cannot be read.
    async fn underlay_link(&self) -> Option<(String, u32)> {
        let c = self.cluster.as_ref()?;
        let ip = c.config().node_ip;
        let link = async {
            let idx = self.nl.addresses_by_link().await?.into_iter().find(|(_, a, _)| *a == ip).map(|(i, _, _)| i);
            let Some(i) = idx else { return anyhow::Ok(None) };
            let link = self.nl.link_summary(crate::netlink::LinkRef::Index(i)).await?;
            anyhow::Ok(link.map(|l| (l.name, l.index)))
        };
        match link.await {
            Ok(Some(l)) => Some(l),
            Ok(None) => {
                warn!("--node-ip {ip} is not an address of this host: assuming an underlay MTU of 1500");
                None
            }
            Err(e) => {
                warn!("reading the underlay link: {e:#}");
                None
            }
        }
    }

    // ------------------------------------------------------------------ addresses

    /// A cluster-wide address for a new endpoint of `container_id` on overlay `net`: the
    /// requested one, or the lowest free one, claimed in etcd (compare-and-swap per address).
    pub(super) async fn claim_overlay_address(
        &self,
        net: &Network,
        container_id: &str,
        requested: Option<&str>,
    ) -> Result<Ipv4Addr> {
        let cluster = self.cluster()?;
        let pool = net.pool().ok_or_else(|| bad_request!("network {} has no IPAM", net.name))?;
        if let Some(r) = requested {
            let ip = parse_ip("address", r)?;
            // The local checks (inside the range, not the gateway) before asking etcd.
            ipam::allocate_except(&pool, &BTreeSet::new(), &reserved(net), Some(ip))
                .map_err(|e| bad_request!("network {}: {e}", net.name))?;
            if !cluster.claim(&net.id, ip, container_id).await? {
                return Err(conflict!("network {}: address {ip} is in use (on another node)", net.name));
            }
            return Ok(ip);
        }
        let mut tried: BTreeSet<Ipv4Addr> = BTreeSet::new();
        for _ in 0..CLAIM_ATTEMPTS {
            let mut used: BTreeSet<Ipv4Addr> = cluster.snapshot().claimed(&net.id).collect();
            used.extend(self.state().used_addresses(&net.id).iter().copied());
            used.extend(tried.iter().copied());
            let ip = ipam::allocate_except(&pool, &used, &reserved(net), None)
                .map_err(|e| conflict!("network {}: {e}", net.name))?;
            if cluster.claim(&net.id, ip, container_id).await? {
                return Ok(ip);
            }
            tried.insert(ip); // taken meanwhile by another node: the next one
        }
        Err(conflict!("network {}: every address tried was taken meanwhile by other nodes: try again", net.name))
    }

    /// For `run`/`connect` on `network`: on an overlay, the address claimed cluster-wide
    /// (network id, address); None for any other network (local IPAM, as before).
    pub(super) async fn claim_for(
        &self,
        network: &str,
        container: &str,
        container_id: &str,
        requested: Option<&str>,
    ) -> Result<Option<(String, Ipv4Addr)>> {
        let (net, task) = {
            let st = self.state();
            let net = match super::networks::usable(&st, network) {
                Ok(n) if n.driver == DriverKind::Overlay => n.clone(),
                _ => return Ok(None), // not an overlay (or not usable: the caller says why)
            };
            // A task of a cluster service on this network may join a non-attachable overlay.
            let task = st.services().any(|s| {
                s.here.is_some() && s.is_replica_name(container) && s.vips.iter().any(|v| v.network_id == net.id)
            });
            (net, task)
        };
        if !task && !net.opts.overlay.as_ref().is_some_and(|o| o.attachable) {
            return Err(bad_request!(
                "overlay network {} is not attachable: only services' tasks join it (create it with --attachable)",
                net.name
            ));
        }
        let ip = self.claim_overlay_address(&net, container_id, requested).await?;
        Ok(Some((net.id.clone(), ip)))
    }

    /// Gives back a claimed address (a run that failed before recording it).
    pub(super) async fn release_overlay_address(&self, network_id: &str, ip: Ipv4Addr) {
        if let Some(c) = &self.cluster {
            c.release(network_id, ip).await;
        }
    }

    /// An endpoint of this node on an overlay is wired: the other nodes learn where it is.
    pub(super) async fn overlay_endpoint_up(&self, c: &Container, ep: &Endpoint, net: &Network) {
        let (Some(cluster), Some(ip), Some(mac)) = (&self.cluster, ep.ipv4, ep.mac) else { return };
        if net.driver != DriverKind::Overlay {
            return;
        }
        cluster.publish_endpoint(endpoint_record(cluster, c, ep, ip, mac)).await;
    }

    /// An endpoint of this node on an overlay goes: its record and address claim go too.
    pub(super) async fn overlay_endpoint_down(&self, container_id: &str, ep: &Endpoint, net: &Network) {
        let Some(cluster) = &self.cluster else { return };
        if net.driver != DriverKind::Overlay {
            return;
        }
        cluster.withdraw_endpoint(&net.id, container_id).await;
        if let Some(ip) = ep.ipv4 {
            cluster.release(&net.id, ip).await;
        }
    }

    // ------------------------------------------------------------------ following the cluster

    /// Before the first session: this node's overlay endpoints and addresses (from its state)
    /// are its own, to be put again under the new lease; then the sessions start.
    pub(super) fn start_cluster(self: &Arc<Self>) {
        let Some(cluster) = self.cluster.clone() else { return };
        let (claims, records) = {
            let st = self.state();
            let mut claims = vec![];
            let mut records = vec![];
            for c in st.containers() {
                for ep in &c.endpoints {
                    let Some(net) = st.network_by_id(&ep.network_id) else { continue };
                    let (DriverKind::Overlay, Some(ip), Some(mac)) = (net.driver, ep.ipv4, ep.mac) else { continue };
                    claims.push((net.id.clone(), ip, c.id.clone()));
                    if c.phase == Phase::Ready {
                        records.push(endpoint_record(&cluster, c, ep, ip, mac));
                    }
                }
            }
            (claims, records)
        };
        cluster.adopt(claims, records);
        tokio::spawn(cluster.clone().run());
        tokio::spawn(self.clone().follow_cluster(cluster));
    }

    /// Applies every change of the cluster snapshot: networks made and removed here, the
    /// other nodes' endpoints given to the resolver.
    async fn follow_cluster(self: Arc<Self>, cluster: Arc<Cluster>) {
        let mut rx = cluster.subscribe();
        let mut remote_dns: BTreeSet<String> = BTreeSet::new();
        loop {
            if rx.changed().await.is_err() {
                return;
            }
            self.wait_ready().await;
            let snap = cluster.snapshot();
            if !cluster.current(&snap) {
                continue; // older than our own last write: its watch event is on the way
            }
            for on in snap.networks.values() {
                if let Err(e) = self.materialize(on).await {
                    warn!("overlay network {}: {e}", on.name);
                }
            }
            // Only a connected session's snapshot is complete enough to remove from.
            if cluster.connected() {
                let gone: Vec<String> = self
                    .state()
                    .networks()
                    .filter(|n| n.driver == DriverKind::Overlay && !snap.networks.contains_key(&n.id))
                    .map(|n| n.id.clone())
                    .collect();
                for id in gone {
                    self.dematerialize(&id, Some(&snap)).await;
                }
            }
            remote_dns = self.feed_remote_names(&snap, remote_dns);
            if cluster.connected() {
                self.schedule_services(&cluster, &snap).await;
            }
            self.materialize_services(&snap).await;
            // What is programmed stays while etcd is away: only a live snapshot changes it.
            if cluster.connected()
                && let Err(e) = self.sync_remote_endpoints(&snap)
            {
                warn!("programming other nodes' endpoints: {e:#}");
            }
        }
    }

    /// The other nodes' containers, as the resolver sees them (names on the overlay networks
    /// they share with local containers). Returns the ids now served.
    fn feed_remote_names(&self, snap: &crate::cluster::Snapshot, before: BTreeSet<String>) -> BTreeSet<String> {
        let me = self.cluster.as_ref().map(|c| c.node_name().to_string()).unwrap_or_default();
        let mut views: BTreeMap<String, crate::dns::ContainerView> = BTreeMap::new();
        for e in snap.endpoints.values().filter(|e| e.node != me) {
            let Some(net) = snap.networks.get(&e.network_id) else { continue };
            let v = views.entry(e.container_id.clone()).or_insert_with(|| crate::dns::ContainerView {
                id: e.container_id.clone(),
                name: e.container.clone(),
                hostname: e.container_id.chars().take(12).collect(),
                netns: None,
                endpoints: vec![],
                dns: vec![],
                dns_search: vec![],
                host_network: false,
            });
            v.endpoints.push(crate::dns::EndpointView {
                network_id: net.id.clone(),
                network_name: net.name.clone(),
                resolves: true,
                ipv4: Some(e.ip),
                aliases: e.aliases.clone(),
                internal: net.internal,
            });
        }
        let now: BTreeSet<String> = views.keys().cloned().collect();
        for gone in before.difference(&now) {
            self.dns.remote_gone(gone);
        }
        for (_, v) in views {
            self.dns.remote_up(v);
        }
        now
    }

    /// `node ls`.
    pub fn nodes(&self) -> Result<Value> {
        let c = self.cluster.as_ref().ok_or_else(|| {
            bad_request!("this daemon is not part of a cluster: start it with --cluster-store etcd://HOST:PORT")
        })?;
        Ok(serde_json::to_value(c.nodes()).unwrap_or_default())
    }

    /// `node rm`.
    pub async fn remove_node(&self, name: &str) -> Result<()> {
        let c = self.cluster.as_ref().ok_or_else(|| {
            bad_request!("this daemon is not part of a cluster: start it with --cluster-store etcd://HOST:PORT")
        })?;
        c.remove_node(name).await
    }

    /// `system info`'s cluster part.
    pub(super) fn cluster_status(&self) -> Value {
        match &self.cluster {
            None => Value::Null,
            Some(c) => serde_json::json!({
                "Store": c.config().store,
                "NodeName": c.node_name(),
                "NodeAddr": c.config().node_ip.to_string(),
                "Connected": c.connected(),
            }),
        }
    }
}

fn endpoint_record(cluster: &Cluster, c: &Container, ep: &Endpoint, ip: Ipv4Addr, mac: [u8; 6]) -> EndpointRecord {
    EndpointRecord {
        network_id: ep.network_id.clone(),
        container_id: c.id.clone(),
        container: c.name.clone(),
        aliases: ep.aliases.clone(),
        ip,
        mac,
        node: cluster.node_name().to_string(),
        node_ip: cluster.config().node_ip,
    }
}

/// Addresses IPAM never hands out on an overlay: its aux addresses.
fn reserved(net: &Network) -> Vec<(Ipv4Addr, String)> {
    net.opts.aux_addresses.iter().map(|(n, ip)| (*ip, format!("aux address {n}"))).collect()
}

/// The lowest /24 of 10.0.0.0/8 that overlaps nothing in `taken`.
fn next_free_overlay_subnet(taken: &[ipnet::Ipv4Net]) -> Option<ipnet::Ipv4Net> {
    let pool: ipnet::Ipv4Net = OVERLAY_POOL.parse().ok()?;
    pool.subnets(OVERLAY_PREFIX).ok()?.find(|s| !taken.iter().any(|t| ipam::overlaps(*t, *s)))
}

/// A link's MTU (SIOCGIFMTU on a socket of the daemon's namespace).
fn link_mtu(name: &str) -> Option<u32> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).ok()?;
    // SAFETY: ifreq is plain data; the name fits (link names are at most 15 bytes).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s as libc::c_char;
    }
    use std::os::fd::AsRawFd;
    // SAFETY: a valid socket and ifreq; the kernel fills ifr_mtu.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU, &mut req) };
    // SAFETY: the union is plain integers: zeroed, or the MTU after a successful SIOCGIFMTU.
    let mtu = unsafe { req.ifr_ifru.ifru_mtu };
    (r == 0).then_some(mtu as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_subnets_are_free_24s_of_ten_slash_eight() {
        assert_eq!(next_free_overlay_subnet(&[]).unwrap().to_string(), "10.0.0.0/24");
        let taken = ["10.0.0.0/24", "10.0.1.0/25", "10.0.3.0/24"].map(|s| s.parse().unwrap());
        assert_eq!(next_free_overlay_subnet(&taken).unwrap().to_string(), "10.0.2.0/24");
        assert_eq!(next_free_overlay_subnet(&["10.0.0.0/8".parse().unwrap()]), None);
    }
}
