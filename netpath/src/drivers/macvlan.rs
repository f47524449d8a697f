//! macvlan networks: each endpoint is a macvlan sub-interface of the parent, born inside the
//! sandbox with its address on the parent's (physical) subnet and a default route via the
//! external gateway. No bridge, no veth, no NAT: frames go straight out of the parent.
//!
//! The kernel delivers nothing between a macvlan's parent and its sub-interfaces: the host
//! cannot reach its own macvlan containers through the parent. `host_access` adds the host
//! its own macvlan on the parent (the shim) with a route to the network's range.

use anyhow::{Context, Result, bail};
use async_trait::async_trait;

use super::Driver;
use crate::netlink::{Netlink, netns};
use crate::state::{self, Endpoint, Network, Sandbox};

pub struct Macvlan;

fn config(net: &Network) -> Result<&state::Macvlan> {
    net.opts.macvlan.as_ref().context("macvlan network without a parent")
}

/// The parent's ifindex; a VLAN parent (`eth0.10`) is made when absent.
async fn parent(nl: &Netlink, mv: &state::Macvlan) -> Result<u32> {
    if let Some(i) = nl.link_index(&mv.parent).await? {
        return Ok(i);
    }
    let Some((lower, vid)) = &mv.vlan else { bail!("parent interface {} does not exist", mv.parent) };
    let lower_idx = nl.link_index(lower).await?.with_context(|| format!("parent interface {lower} does not exist"))?;
    nl.create_vlan(&mv.parent, lower_idx, *vid).await
}

#[async_trait]
impl Driver for Macvlan {
    async fn ensure_network(&self, nl: &Netlink, net: &Network) -> Result<()> {
        let mv = config(net)?;
        let ipam = net.ipam.context("macvlan network without IPAM config")?;
        let parent = parent(nl, mv).await?;
        if let Some((shim, ip)) = &mv.host_shim {
            let idx = nl.ensure_macvlan(parent, mv.mode, shim).await?;
            nl.ensure_addr(idx, *ip, 32).await?;
            nl.ensure_link_route(ipam.ip_range.unwrap_or(ipam.subnet), idx).await?;
        }
        Ok(())
    }

    /// Removes the host shim (its route goes with it). A VLAN parent is the daemon's to
    /// remove once no network uses it (it knows the other networks; see `networks.rs`).
    async fn remove_network(&self, nl: &Netlink, net: &Network) -> Result<()> {
        if let Some((shim, _)) = &config(net)?.host_shim {
            nl.delete_link(shim).await?;
        }
        Ok(())
    }

    async fn ensure_endpoint(
        &self,
        nl: &Netlink,
        net: &Network,
        sandbox: &Sandbox,
        ep: &Endpoint,
        primary: bool,
    ) -> Result<Option<u32>> {
        let Sandbox::Netns { path, .. } = sandbox else {
            bail!("a macvlan endpoint needs a network namespace");
        };
        let mv = config(net)?;
        let ipam = net.ipam.context("macvlan network without IPAM config")?;
        let ip = ep.ipv4.context("macvlan endpoint without an address")?;
        let mac = ep.mac.context("macvlan endpoint without a MAC")?;
        let inner = Netlink::in_netns(path)?;
        if inner.link_index(&ep.ifname).await?.is_none() {
            let parent = parent(nl, mv).await?;
            nl.create_macvlan_in(parent, mv.mode, path, &ep.ifname, mac).await?;
        }
        let idx = inner.require_link(&ep.ifname).await?;
        inner.ensure_addr(idx, ip, ipam.subnet.prefix_len()).await?;
        inner.set_up_ipv4_only(idx).await?;
        if primary {
            inner.ensure_default_route(ipam.gateway).await?;
        }
        // Nothing on the host side for the datapath to attach to.
        Ok(None)
    }

    async fn remove_endpoint(&self, _: &Netlink, _: &Network, sandbox: &Sandbox, ep: &Endpoint) -> Result<()> {
        // The sub-interface lives only inside the sandbox: it goes with an owned namespace,
        // but an attached namespace (or a disconnect) keeps the namespace.
        let Sandbox::Netns { path, .. } = sandbox else { return Ok(()) };
        if !netns::is_mounted(path) {
            return Ok(());
        }
        Netlink::in_netns(path)?.delete_link(&ep.ifname).await
    }
}
