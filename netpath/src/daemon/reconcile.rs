//! Bringing the kernel back in line with the state after a (re)start, in bulk: one dump of
//! the host's links and addresses and one pass over each map, then repairs only where
//! something differs. Also finishes (or undoes) what a daemon that died mid-operation left
//! half done, and removes what no record claims (links, namespaces, map entries).

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use futures::StreamExt;
use tracing::{info, warn};

use super::containers::PeerEnd;
use super::docker::LABEL_DOCKER_ENDPOINT;
use super::{Daemon, lo_up, process};
use crate::drivers::driver;
use crate::netlink::{LinkSummary, netns};
use crate::state::{Container, Network, Phase, Sandbox};

/// Containers rewired from scratch at once (each needs netlink round trips in its namespace).
const PARALLEL_REPAIRS: usize = 16;

pub(super) async fn run(d: &Arc<Daemon>) {
    let mut phases = super::Laps::new();
    finish_interrupted(d).await;
    phases.lap("interrupted");
    let links = match d.nl.links().await {
        Ok(l) => l,
        Err(e) => {
            warn!("reconcile: dumping links: {e:#}");
            vec![]
        }
    };
    let addrs = d.nl.addresses_by_link().await.unwrap_or_default();
    let by_name: HashMap<&str, &LinkSummary> = links.iter().map(|l| (l.name.as_str(), l)).collect();

    let networks: Vec<Network> = d.state().networks().cloned().collect();
    for net in &networks {
        if !network_intact(net, &by_name, &addrs)
            && let Err(e) = driver(net.driver).ensure_network(&d.nl, net).await
        {
            warn!("network {}: {e:#}", net.name);
        }
        if let Err(e) = d.publish_network(net) {
            warn!("network {}: {e:#}", net.name);
        }
    }
    // Bridges may have been (re)made: their indexes are needed to check what hangs on them.
    let links = if networks.iter().any(|n| !network_intact(n, &by_name, &addrs)) {
        d.nl.links().await.unwrap_or(links)
    } else {
        links
    };
    let by_name: HashMap<&str, &LinkSummary> = links.iter().map(|l| (l.name.as_str(), l)).collect();

    phases.lap("networks");
    let containers: Vec<Container> = d.state().containers().cloned().collect();
    let mut broken = vec![];
    for c in &containers {
        match adopt(d, c, &by_name) {
            Ok(true) => {}
            Ok(false) => broken.push(c.clone()),
            Err(e) => warn!("container {}: {e:#}", c.name),
        }
    }
    phases.lap("adopt");
    if !broken.is_empty() {
        info!("reconcile: rewiring {} containers", broken.len());
    }
    futures::stream::iter(broken)
        .for_each_concurrent(PARALLEL_REPAIRS, |c| async move {
            if let Err(e) = rewire(d, &c).await {
                warn!("container {}: {e:#}", c.name);
            }
        })
        .await;
    phases.lap("rewire");
    for c in &containers {
        if let Err(e) = d.publish_ports(c, c.primary_ipv4()) {
            warn!("container {}: {e:#}", c.name);
        }
    }
    phases.lap("ports");
    // Interrupted removals finished above left their veths to the reaper: gone before the
    // sweep, which would otherwise race it for them.
    d.drain_reaper().await;
    remove_orphans(d, &links).await;
    withdraw_stale_entries(d);
    phases.lap("cleanup");
    info!("reconcile phases (ms): {phases}");
}

/// Operations a dead daemon left half done: what was being created is undone (its request
/// failed, as far as the caller knows), what was being removed is removed.
async fn finish_interrupted(d: &Arc<Daemon>) {
    let containers: Vec<Container> = d
        .state()
        .containers()
        .filter(|c| c.phase != Phase::Ready || c.endpoints.iter().any(|e| e.phase != Phase::Ready))
        .cloned()
        .collect();
    for c in containers {
        match c.phase {
            Phase::Creating => info!("container {}: its creation was interrupted, undoing it", c.name),
            Phase::Removing => info!("container {}: its removal was interrupted, finishing it", c.name),
            Phase::Ready => {}
        }
        if c.phase != Phase::Ready {
            d.kill(&c).await;
            let errs = d.finish_container_removal(&c).await;
            if !errs.is_empty() {
                warn!("container {}: {}", c.name, errs.join("; "));
            }
            continue;
        }
        for ep in c.endpoints.iter().filter(|e| e.phase != Phase::Ready) {
            info!("container {}: an interrupted connect/disconnect of {} is undone", c.name, ep.ifname);
            if let Err(e) = d.finish_disconnect(&c, ep).await {
                warn!("container {}: {e}", c.name);
            }
        }
    }
    let networks: Vec<Network> = d.state().networks().filter(|n| n.phase != Phase::Ready).cloned().collect();
    for n in networks {
        info!(
            "network {}: an interrupted {} is finished",
            n.name,
            if n.phase == Phase::Creating { "create" } else { "removal" }
        );
        d.finish_network_removal(&n).await;
    }
}

/// True when the network's bridge exists, is up, holds its gateway address and has the MAC
/// derived from it (bridges made by older versions picked their own).
fn network_intact(net: &Network, links: &HashMap<&str, &LinkSummary>, addrs: &[(u32, Ipv4Addr, u8)]) -> bool {
    if let Some(mv) = &net.opts.macvlan {
        // Its VLAN parent and host shim (the parent itself is the host's business).
        let vlan_ok = mv.vlan.is_none() || links.contains_key(mv.parent.as_str());
        let shim_ok = mv.host_shim.as_ref().is_none_or(|(name, ip)| {
            links.get(name.as_str()).is_some_and(|l| l.up && addrs.iter().any(|(i, a, _)| *i == l.index && a == ip))
        });
        return vlan_ok && shim_ok;
    }
    let (Some(bridge), Some(ipam)) = (net.bridge.as_deref(), net.ipam) else { return true };
    !net.driver.is_bridged()
        || links.get(bridge).is_some_and(|l| {
            l.up && l.mac.as_deref() == Some(&crate::ipam::mac_for(ipam.gateway)[..])
                && addrs.iter().any(|(i, a, _)| *i == l.index && *a == ipam.gateway)
        })
}

/// Takes over a container whose wiring survived: its namespace is there and each endpoint's
/// veth is up on its network's bridge (veth ends die together, so the inside is there too).
/// Only the datapath is (re)attached. False when something must be rebuilt.
fn adopt(d: &Daemon, c: &Container, links: &HashMap<&str, &LinkSummary>) -> anyhow::Result<bool> {
    if let Sandbox::Netns { path, .. } = &c.sandbox
        && !netns::is_mounted(path)
    {
        return Ok(false);
    }
    let mut wired = vec![];
    for ep in &c.endpoints {
        let Some(net) = d.state().network_by_id(&ep.network_id).cloned() else { continue };
        let Some(host) = ep.host_ifname.as_deref() else { continue };
        let bridge = net.bridge.as_deref().and_then(|b| links.get(b)).map(|b| b.index);
        match links.get(host) {
            Some(l) if l.up && bridge.is_some() && l.master == bridge => wired.push((net, ep, l.index, l.peer)),
            _ => return Ok(false),
        }
    }
    for (net, ep, idx, peer) in wired {
        d.attach_endpoint(&net, ep, ep.host_ifname.as_deref().unwrap_or_default(), idx)?;
        // dockerd named a Docker endpoint's interface in the sandbox: found by index there
        // (GRO already on is left alone: flows are running through it).
        let end = match (&c.sandbox, peer) {
            (Sandbox::Netns { path, .. }, Some(i)) if c.labels.contains_key(LABEL_DOCKER_ENDPOINT) => {
                PeerEnd::Index(path, i, false)
            }
            _ => PeerEnd::of(&c.sandbox, ep),
        };
        d.xdp_endpoint(end, ep, idx);
    }
    Ok(true)
}

/// Rebuilds a container's wiring: its namespace if it vanished (a reboot), then every endpoint.
async fn rewire(d: &Daemon, c: &Container) -> anyhow::Result<()> {
    if let Sandbox::Netns { path, owned } = &c.sandbox
        && !netns::is_mounted(path)
    {
        if !*owned {
            anyhow::bail!("its namespace {} is gone", path.display());
        }
        info!("container {}: namespace gone (reboot?), recreating it", c.name);
        netns::create(path)?;
        lo_up(path).await?;
    }
    for (i, ep) in c.endpoints.iter().enumerate() {
        d.wire(c, ep, i == 0).await?;
    }
    Ok(())
}

/// Links and namespaces that look like netpath's but that no record claims: left by a daemon
/// killed before it could write (or after it deleted) the record.
async fn remove_orphans(d: &Daemon, links: &[LinkSummary]) {
    let (own_links, own_netns): (HashSet<String>, HashSet<std::path::PathBuf>) = {
        let st = d.state();
        let mut l: HashSet<String> = st.networks().flat_map(|n| n.own_links()).collect();
        l.extend(st.networks().filter_map(|n| n.vlan_link().map(String::from)));
        l.extend(st.containers().flat_map(|c| c.endpoints.iter().filter_map(|e| e.host_ifname.clone())));
        let n = st
            .containers()
            .filter_map(|c| match &c.sandbox {
                Sandbox::Netns { path, owned: true } => Some(path.clone()),
                _ => None,
            })
            .collect();
        (l, n)
    };
    let marked = |l: &&LinkSummary| l.alias.as_deref() == Some(crate::netlink::OWNER_ALIAS);
    for l in links.iter().filter(marked).filter(|l| !own_links.contains(&l.name)) {
        info!("removing orphaned link {}", l.name);
        if let Err(e) = d.nl.delete_link(&l.name).await {
            warn!("orphaned link {}: {e:#}", l.name);
        }
        d.dp().detach_endpoint(l.index);
    }
    for e in std::fs::read_dir(d.store.netns_dir()).into_iter().flatten().flatten() {
        let path = e.path();
        if !own_netns.contains(&path) {
            info!("removing orphaned namespace {}", path.display());
            process::kill_netns_members(&path);
            if let Err(e) = netns::remove(&path) {
                warn!("orphaned namespace {}: {e:#}", path.display());
            }
        }
    }
}

/// Map entries no record explains: published ports and container ports of containers that
/// are gone, endpoints of addresses no container has.
fn withdraw_stale_entries(d: &Daemon) {
    let (ports, open, endpoints) = {
        let st = d.state();
        let ports: HashSet<_> =
            st.containers().flat_map(|c| c.ports.iter().map(|b| (b.host_ip, b.host_port, b.proto.number()))).collect();
        let open: HashSet<_> = st
            .containers()
            .filter_map(|c| c.primary_ipv4().map(|ip| (ip, c)))
            .flat_map(|(ip, c)| c.ports.iter().map(move |b| (ip, b.container_port, b.proto.number())))
            .collect();
        let endpoints: HashSet<Ipv4Addr> =
            st.containers().flat_map(|c| c.endpoints.iter().filter_map(|e| e.ipv4)).collect();
        (ports, open, endpoints)
    };
    let mut dp = d.dp();
    for (host, port, proto) in dp.port_keys().unwrap_or_default() {
        if !ports.contains(&(host, port, proto)) {
            info!("withdrawing stale published port {port}/{proto}");
            let _ = dp.remove_port(host, port, proto);
        }
    }
    for (ip, port, proto) in dp.published_keys().unwrap_or_default() {
        if !open.contains(&(ip, port, proto)) {
            let _ = dp.remove_published(ip, port, proto);
        }
    }
    for ip in dp.endpoint_keys().unwrap_or_default() {
        if !endpoints.contains(&ip) {
            let _ = dp.remove_endpoint(ip);
        }
    }
}
