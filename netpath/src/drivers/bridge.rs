//! Bridge networks: a Linux bridge holding the gateway address, one veth pair per endpoint
//! (host end on the bridge, container end born inside the sandbox with its address and MAC).

use anyhow::{Context, Result, bail};
use async_trait::async_trait;

use super::Driver;
use crate::netlink::Netlink;
use crate::state::{Endpoint, Network, Sandbox};

pub struct Bridge;

fn bridge_name(net: &Network) -> Result<&str> {
    net.bridge.as_deref().context("bridge network without a bridge name")
}

#[async_trait]
impl Driver for Bridge {
    async fn ensure_network(&self, nl: &Netlink, net: &Network) -> Result<()> {
        let ipam = net.ipam.context("bridge network without IPAM config")?;
        nl.ensure_bridge(bridge_name(net)?, ipam.gateway, ipam.subnet.prefix_len(), net.opts.mtu).await?;
        Ok(())
    }

    async fn remove_network(&self, nl: &Netlink, net: &Network) -> Result<()> {
        nl.delete_link(bridge_name(net)?).await
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
            bail!("a bridge endpoint needs a network namespace");
        };
        let ipam = net.ipam.context("bridge network without IPAM config")?;
        let host = ep.host_ifname.as_deref().context("bridge endpoint without a host interface")?;
        let ip = ep.ipv4.context("bridge endpoint without an address")?;
        let mac = ep.mac.context("bridge endpoint without a MAC")?;
        let mut laps = crate::daemon::Laps::new();
        let inner = Netlink::in_netns(path)?;
        laps.lap("netlink");

        // A host end whose container end vanished (its namespace was recreated) is rebuilt.
        if nl.link_index(host).await?.is_some() && inner.link_index(&ep.ifname).await?.is_none() {
            nl.delete_link(host).await?;
        }
        laps.lap("check");
        if nl.link_index(host).await?.is_none() {
            let master = nl.require_link(bridge_name(net)?).await?;
            nl.create_veth(host, master, path, &ep.ifname, mac, net.opts.mtu).await?;
        }
        laps.lap("veth");
        let idx = inner.require_link(&ep.ifname).await?;
        inner.ensure_addr(idx, ip, ipam.subnet.prefix_len()).await?;
        inner.set_up_ipv4_only(idx).await?;
        if primary {
            inner.ensure_default_route(ipam.gateway).await?;
        }
        laps.lap("inside");
        let idx = nl.require_link(host).await?;
        tracing::debug!("bridge endpoint {host}: {laps}");
        Ok(Some(idx))
    }

    async fn remove_endpoint(&self, nl: &Netlink, _: &Network, _: &Sandbox, ep: &Endpoint) -> Result<()> {
        // Deleting one end of a veth deletes the other, inside the container, too.
        match ep.host_ifname.as_deref() {
            Some(host) => nl.delete_link(host).await,
            None => Ok(()),
        }
    }
}
