//! Network drivers behind one trait, chosen by [`driver`]. A driver makes a network's kernel
//! objects exist and wires endpoints into sandboxes; every method is idempotent so the same
//! calls create state on request and repair it when the daemon reconciles after a restart.

mod bridge;
mod macvlan;
pub mod overlay;

use anyhow::Result;
use async_trait::async_trait;

use crate::netlink::Netlink;
use crate::state::{DriverKind, Endpoint, Network, Sandbox};

#[async_trait]
pub trait Driver: Send + Sync {
    /// Creates (or repairs) the network's kernel objects.
    async fn ensure_network(&self, nl: &Netlink, net: &Network) -> Result<()>;
    /// Removes the network's kernel objects; missing ones are fine.
    async fn remove_network(&self, nl: &Netlink, net: &Network) -> Result<()>;
    /// Wires `ep` into `sandbox` (or checks it is still wired). `primary` endpoints carry the
    /// default route. Returns the host-side interface the datapath attaches to, if any.
    async fn ensure_endpoint(
        &self,
        nl: &Netlink,
        net: &Network,
        sandbox: &Sandbox,
        ep: &Endpoint,
        primary: bool,
    ) -> Result<Option<u32>>;
    /// Unwires `ep` from `sandbox`; a half-gone endpoint is fine.
    async fn remove_endpoint(&self, nl: &Netlink, net: &Network, sandbox: &Sandbox, ep: &Endpoint) -> Result<()>;
}

pub fn driver(kind: DriverKind) -> &'static dyn Driver {
    match kind {
        DriverKind::Bridge => &bridge::Bridge,
        DriverKind::Macvlan => &macvlan::Macvlan,
        DriverKind::Overlay => &overlay::Overlay,
        DriverKind::Host | DriverKind::None => &Unwired,
    }
}

/// `host` (the container shares the daemon's namespace) and `none` (its own namespace with
/// only `lo`, set up with the sandbox): the network itself wires nothing.
struct Unwired;

#[async_trait]
impl Driver for Unwired {
    async fn ensure_network(&self, _: &Netlink, _: &Network) -> Result<()> {
        Ok(())
    }
    async fn remove_network(&self, _: &Netlink, _: &Network) -> Result<()> {
        Ok(())
    }
    async fn ensure_endpoint(
        &self,
        _: &Netlink,
        _: &Network,
        _: &Sandbox,
        _: &Endpoint,
        _: bool,
    ) -> Result<Option<u32>> {
        Ok(None)
    }
    async fn remove_endpoint(&self, _: &Netlink, _: &Network, _: &Sandbox, _: &Endpoint) -> Result<()> {
        Ok(())
    }
}
