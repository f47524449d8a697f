//! Overlay networks: on each node a local Linux bridge exactly like a bridge network (the
//! gateway address is local, so every node's bridge holds the same one), whose containers
//! reach the other nodes' containers through the host's VXLAN device (the datapath encaps on
//! the container's veth, keyed by the network's VNI). The wiring is the bridge driver's; the
//! network's MTU (set when the node materialises the network) leaves room for the VXLAN
//! header: underlay MTU − [`VXLAN_OVERHEAD`].

use anyhow::Result;
use async_trait::async_trait;

use super::Driver;
use super::bridge::Bridge;
use crate::netlink::Netlink;
use crate::state::{Endpoint, Network, Sandbox};

pub use crate::datapath::VXLAN_OVERHEAD;

pub struct Overlay;

#[async_trait]
impl Driver for Overlay {
    async fn ensure_network(&self, nl: &Netlink, net: &Network) -> Result<()> {
        Bridge.ensure_network(nl, net).await
    }

    async fn remove_network(&self, nl: &Netlink, net: &Network) -> Result<()> {
        Bridge.remove_network(nl, net).await
    }

    async fn ensure_endpoint(
        &self,
        nl: &Netlink,
        net: &Network,
        sandbox: &Sandbox,
        ep: &Endpoint,
        primary: bool,
    ) -> Result<Option<u32>> {
        Bridge.ensure_endpoint(nl, net, sandbox, ep, primary).await
    }

    async fn remove_endpoint(&self, nl: &Netlink, net: &Network, sandbox: &Sandbox, ep: &Endpoint) -> Result<()> {
        Bridge.remove_endpoint(nl, net, sandbox, ep).await
    }
}
