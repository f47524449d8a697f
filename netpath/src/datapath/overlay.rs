//! Overlay networks: the typed side of the VXLAN datapath (netpath-ebpf/src/vxlan.rs). The
//! host's VXLAN device (external mode) and the `vxlan_in` program on it, which networks are
//! overlays under which VNI, and the containers of each overlay here and on other nodes.
//!
//! What the daemon calls, and when: `ensure_vxlan` with the first overlay network (and at
//! every start, to claim the device's link), `remove_vxlan` after the last; per overlay
//! network on this node, its bridge and NETWORKS entry as for a bridge network, then
//! `overlay_set_network` and `overlay_attach_bridge` (`overlay_detach_bridge`, then
//! `overlay_remove_network` when it goes); `overlay_add_local`/`overlay_remove_local` as
//! its containers here are wired and unwired; `overlay_add_remote`/`overlay_remove_remote`
//! from the cluster store; `overlay_set_node_ip` once at start with `--node-ip`. The routing
//! mesh needs nothing more: a service port published on every node (SERVICES address 0)
//! whose Maglev table names another node's container goes through the tunnel, provided
//! this node has that container's overlay network (NETWORKS entry and VNI), as every node
//! has Docker's `ingress` network.
//!
//! An [`Overlay`] works through descriptors of its own (like [`super::FlowTable`]): the
//! daemon changes overlay entries, and awaits netlink for the device, without holding the
//! datapath's lock. Every map update is one atomic kernel call.

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};
use netpath_common::{OverlayKey, OverlayLocal, OverlayRemote, VNI_MAX, map_names, overlay_config, prog_names};

use super::{Datapath, links, sys, wire_addr};
use crate::netlink::Netlink;

/// The host's one VXLAN device, shared by every overlay network.
pub const VXLAN_DEV: &str = "np-vxlan0";
pub use netpath_common::{VXLAN_OVERHEAD, VXLAN_PORT};

/// A container of an overlay network on another node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RemoteEndpoint {
    pub vni: u32,
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    /// The underlay address of its node.
    pub node_ip: Ipv4Addr,
}

/// A container of an overlay network on this node, as the datapath holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LocalEndpoint {
    pub vni: u32,
    pub ip: Ipv4Addr,
    /// The host side of its veth.
    pub host_veth_ifindex: u32,
    pub mac: [u8; 6],
}

/// The overlay maps and the VXLAN device's program link (see the module's docs). Cheap to clone.
#[derive(Clone)]
pub struct Overlay(Arc<Inner>);

struct Inner {
    nets: OwnedFd,
    vnis: OwnedFd,
    local: OwnedFd,
    remote: OwnedFd,
    config: OwnedFd,
    links: links::SharedLinks,
}

impl Datapath {
    /// A handle on the overlay maps and the VXLAN device's link, usable without this
    /// datapath's lock (see [`Overlay`]).
    pub fn overlay(&self) -> Result<Overlay> {
        let fd = |name: &str| -> Result<OwnedFd> {
            let m = self.ebpf.map(name).with_context(|| format!("map {name} missing from the eBPF object"))?;
            let data = match m {
                aya::maps::Map::HashMap(d) | aya::maps::Map::Array(d) => d,
                _ => bail!("map {name} has an unexpected type"),
            };
            data.fd().as_fd().try_clone_to_owned().with_context(|| format!("duplicating the descriptor of {name}"))
        };
        Ok(Overlay(Arc::new(Inner {
            nets: fd(map_names::OVERLAY_NETS)?,
            vnis: fd(map_names::OVERLAY_VNIS)?,
            local: fd(map_names::OVERLAY_LOCAL)?,
            remote: fd(map_names::OVERLAY_REMOTE)?,
            config: fd(map_names::OVERLAY_CONFIG)?,
            links: self.shared_links(),
        })))
    }
}

fn bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: T is one of the shared #[repr(C)] plain-integer types without padding (or u32).
    unsafe { std::slice::from_raw_parts((v as *const T).cast(), size_of::<T>()) }
}

fn from_bytes<T: Copy + Default>(b: &[u8]) -> T {
    let mut v = T::default();
    // SAFETY: same size, plain integers: every bit pattern is a valid T.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut v as *mut T).cast(), size_of::<T>()) };
    v
}

fn check_vni(vni: u32) -> Result<()> {
    ensure!(vni <= VNI_MAX, "VNI {vni} does not fit VXLAN's 24 bits (at most {VNI_MAX})");
    Ok(())
}

fn key(vni: u32, ip: Ipv4Addr) -> OverlayKey {
    OverlayKey { vni, addr: wire_addr(ip) }
}

/// `BPF_ANY`: insert or replace.
const ANY: u64 = 0;

impl Overlay {
    /// Creates (idempotently) the host's VXLAN device with the underlay's MTU and attaches
    /// `vxlan_in` to it (a pinned link: it outlives the daemon, and a restarted daemon claims
    /// it by calling this again); returns its ifindex. From then on the programs encapsulate
    /// through it.
    pub async fn ensure_vxlan(&self, nl: &Netlink, underlay_mtu: u32) -> Result<u32> {
        ensure!(
            underlay_mtu > VXLAN_OVERHEAD + 68,
            "an underlay MTU of {underlay_mtu} leaves no room for VXLAN's {VXLAN_OVERHEAD} bytes and an IPv4 packet"
        );
        let ifindex = nl.ensure_vxlan(VXLAN_DEV, VXLAN_PORT, underlay_mtu).await?;
        let links = self.0.links.clone();
        // Attaching waits out an RCU grace period: off the async runtime's threads.
        tokio::task::spawn_blocking(move || links::attach_tcx(&links, VXLAN_DEV, ifindex, prog_names::VXLAN_IN))
            .await
            .context("attaching vxlan_in")??;
        self.set_config(overlay_config::VXLAN_IFINDEX, ifindex)?;
        Ok(ifindex)
    }

    /// Attaches `underlay_in` to the node's underlay interface (`ifname`, `ifindex`: the one
    /// holding the address other nodes' tunnels reach), ahead of its other programs: VXLAN
    /// packets for this node's containers are then decapsulated there, before the VXLAN
    /// device (which keeps everything else). The device must exist (`ensure_vxlan`): what
    /// `underlay_in` hands on goes to it. A pinned link, claimed again by a restarted daemon
    /// calling this again; one underlay at a time (one moved to another interface leaves the
    /// old one). False when this eBPF object has no `underlay_in` (an older one).
    pub async fn overlay_attach_underlay(&self, ifname: &str, ifindex: u32) -> Result<bool> {
        let links = self.0.links.clone();
        let name = ifname.to_string();
        tokio::task::spawn_blocking(move || {
            if !links.lock().unwrap_or_else(|e| e.into_inner()).has_prog(prog_names::UNDERLAY_IN) {
                return Ok(false);
            }
            let old: Vec<u32> = links
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .ifindexes(prog_names::UNDERLAY_IN)
                .into_iter()
                .filter(|i| *i != ifindex)
                .collect();
            detach_underlay(&links, &old);
            links::attach_tcx(&links, &name, ifindex, prog_names::UNDERLAY_IN).map(|_| true)
        })
        .await
        .context("attaching underlay_in")?
    }

    /// Removes the VXLAN device and its programs, `underlay_in` too (when no overlay network
    /// is left). The programs stop encapsulating first. A device that is gone already is fine.
    pub async fn remove_vxlan(&self, nl: &Netlink) -> Result<()> {
        self.set_config(overlay_config::VXLAN_IFINDEX, 0)?;
        let links = self.0.links.clone();
        tokio::task::spawn_blocking(move || {
            let all = links.lock().unwrap_or_else(|e| e.into_inner()).ifindexes(prog_names::UNDERLAY_IN);
            detach_underlay(&links, &all);
        })
        .await
        .context("detaching underlay_in")?;
        if let Some(ifindex) = nl.link_index(VXLAN_DEV).await? {
            let links = self.0.links.clone();
            tokio::task::spawn_blocking(move || {
                let pins =
                    links.lock().unwrap_or_else(|e| e.into_inner()).take_ifindex(ifindex, &[prog_names::VXLAN_IN]);
                links::drop_pins(&pins, true);
            })
            .await
            .context("detaching vxlan_in")?;
        }
        nl.delete_own_link(VXLAN_DEV).await.map(drop)
    }

    /// The VXLAN device's ifindex as the programs see it (0: none).
    pub fn vxlan_ifindex(&self) -> Result<u32> {
        let mut v = [0u8; 4];
        sys::map_lookup(self.0.config.as_fd(), bytes(&overlay_config::VXLAN_IFINDEX), &mut v)
            .context("reading the overlay settings")?;
        Ok(u32::from_ne_bytes(v))
    }

    /// This node's underlay address (the one `--node-ip` names, which other nodes' tunnels
    /// reach). Flows that reach another node's container from outside that container's
    /// overlay — the routing mesh (a published service port whose backend the Maglev table
    /// puts on another node), host processes — leave with it as their source, so the far
    /// node's replies come back through the tunnel; until it is set, such flows are dropped
    /// (`rewrite-failed`). `None` unsets it.
    pub fn overlay_set_node_ip(&self, ip: Option<Ipv4Addr>) -> Result<()> {
        if let Some(ip) = ip {
            ensure!(
                !ip.is_unspecified() && !ip.is_broadcast() && !ip.is_multicast() && !ip.is_loopback(),
                "{ip} cannot be a node's underlay address"
            );
        }
        self.set_config(overlay_config::NODE_IP, ip.map_or(0, wire_addr))
    }

    /// This node's underlay address as the programs see it.
    pub fn overlay_node_ip(&self) -> Result<Option<Ipv4Addr>> {
        let mut v = [0u8; 4];
        sys::map_lookup(self.0.config.as_fd(), bytes(&overlay_config::NODE_IP), &mut v)
            .context("reading the overlay settings")?;
        Ok(Some(Ipv4Addr::from(v)).filter(|a| !a.is_unspecified()))
    }

    /// Attaches `overlay_bridge_out` to an overlay network's bridge (`bridge`, `ifindex`),
    /// so host processes reach that overlay's containers on other nodes (through the tunnel,
    /// from this node's underlay address; the host's ARP for them answered from the map).
    /// A pinned link, claimed again by a restarted daemon calling this again. Idempotent.
    pub async fn overlay_attach_bridge(&self, bridge: &str, ifindex: u32) -> Result<()> {
        let links = self.0.links.clone();
        let name = bridge.to_string();
        tokio::task::spawn_blocking(move || links::attach_tcx(&links, &name, ifindex, prog_names::OVERLAY_BRIDGE_OUT))
            .await
            .context("attaching overlay_bridge_out")??;
        Ok(())
    }

    /// Detaches `overlay_bridge_out` from bridge `ifindex` (before the overlay network's
    /// bridge is removed; a bridge without it is fine).
    pub async fn overlay_detach_bridge(&self, ifindex: u32) -> Result<()> {
        let links = self.0.links.clone();
        tokio::task::spawn_blocking(move || {
            let pins = links
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take_ifindex(ifindex, &[prog_names::OVERLAY_BRIDGE_OUT]);
            links::drop_pins(&pins, true);
        })
        .await
        .context("detaching overlay_bridge_out")
    }

    fn set_config(&self, slot: u32, v: u32) -> Result<()> {
        sys::map_update(self.0.config.as_fd(), bytes(&slot), bytes(&v), ANY).context("writing the overlay settings")
    }

    /// Makes the network `net_id` (its id in NETWORKS and ENDPOINTS, whose NETWORKS entry
    /// should carry `net_flags::OVERLAY`) the overlay `vni`. A network's VNI may change (its
    /// old one is forgotten); a VNI held by another network is refused, leaving both as they were.
    pub fn overlay_set_network(&self, vni: u32, net_id: u32) -> Result<()> {
        check_vni(vni)?;
        let mut v = [0u8; 4];
        if sys::map_lookup(self.0.vnis.as_fd(), bytes(&vni), &mut v)? {
            let holder = u32::from_ne_bytes(v);
            ensure!(holder == net_id, "VNI {vni} belongs to network {holder} already, not to network {net_id}");
        }
        // The network's previous VNI, if it changes.
        if sys::map_lookup(self.0.nets.as_fd(), bytes(&net_id), &mut v)? {
            let old = u32::from_ne_bytes(v);
            if old != vni {
                sys::map_delete(self.0.vnis.as_fd(), bytes(&old))?;
            }
        }
        // VNI → network first: decapsulation accepts the VNI before anything is sent with it.
        sys::map_update(self.0.vnis.as_fd(), bytes(&vni), bytes(&net_id), ANY)
            .context("adding an overlay network (is the overlay table full?)")?;
        sys::map_update(self.0.nets.as_fd(), bytes(&net_id), bytes(&vni), ANY)
            .context("adding an overlay network (is the overlay table full?)")?;
        Ok(())
    }

    /// Forgets overlay `vni`: its network, and every local and remote endpoint under it.
    /// An unknown VNI is fine.
    pub fn overlay_remove_network(&self, vni: u32) -> Result<()> {
        let mut v = [0u8; 4];
        if sys::map_lookup(self.0.vnis.as_fd(), bytes(&vni), &mut v)? {
            let net_id = u32::from_ne_bytes(v);
            let mut mine = [0u8; 4];
            // Only if the network still has this VNI (it may have moved on to another).
            if sys::map_lookup(self.0.nets.as_fd(), bytes(&net_id), &mut mine)? && u32::from_ne_bytes(mine) == vni {
                sys::map_delete(self.0.nets.as_fd(), bytes(&net_id))?;
            }
            sys::map_delete(self.0.vnis.as_fd(), bytes(&vni))?;
        }
        for fd in [&self.0.local, &self.0.remote] {
            for k in keys::<OverlayKey>(fd)?.into_iter().filter(|k| k.vni == vni) {
                sys::map_delete(fd.as_fd(), bytes(&k))?;
            }
        }
        Ok(())
    }

    /// The overlay networks: (VNI, network id).
    pub fn overlay_networks(&self) -> Result<Vec<(u32, u32)>> {
        let mut out = vec![];
        for vni in keys::<u32>(&self.0.vnis)? {
            let mut v = [0u8; 4];
            if sys::map_lookup(self.0.vnis.as_fd(), bytes(&vni), &mut v)? {
                out.push((vni, u32::from_ne_bytes(v)));
            }
        }
        out.sort();
        Ok(out)
    }

    /// A container of overlay `vni` on this node: decapsulated packets for `ip` go to its veth
    /// (`host_veth_ifindex`, the host side) addressed to `mac`.
    pub fn overlay_add_local(&self, vni: u32, ip: Ipv4Addr, host_veth_ifindex: u32, mac: [u8; 6]) -> Result<()> {
        check_vni(vni)?;
        ensure!(host_veth_ifindex != 0, "overlay endpoint {ip}: no interface (ifindex 0)");
        let v = OverlayLocal { ifindex: host_veth_ifindex, mac, _pad: 0 };
        sys::map_update(self.0.local.as_fd(), bytes(&key(vni, ip)), bytes(&v), ANY)
            .with_context(|| format!("adding overlay endpoint {ip} (VNI {vni}; is the table full?)"))
    }

    /// Unknown entries are fine.
    pub fn overlay_remove_local(&self, vni: u32, ip: Ipv4Addr) -> Result<()> {
        sys::map_delete(self.0.local.as_fd(), bytes(&key(vni, ip)))?;
        Ok(())
    }

    /// This node's overlay containers, sorted.
    pub fn overlay_locals(&self) -> Result<Vec<LocalEndpoint>> {
        let mut out = vec![];
        for k in keys::<OverlayKey>(&self.0.local)? {
            let mut v = [0u8; size_of::<OverlayLocal>()];
            if sys::map_lookup(self.0.local.as_fd(), bytes(&k), &mut v)? {
                let l: OverlayLocal = from_bytes(&v);
                let ip = Ipv4Addr::from(k.addr.to_ne_bytes());
                out.push(LocalEndpoint { vni: k.vni, ip, host_veth_ifindex: l.ifindex, mac: l.mac });
            }
        }
        out.sort();
        Ok(out)
    }

    /// A container of overlay `ep.vni` on another node: local containers of that overlay
    /// reach it through the tunnel to `ep.node_ip`, and their ARP for it is answered with
    /// `ep.mac`. Replaces an entry for the same (VNI, address) (a container that moved).
    pub fn overlay_add_remote(&self, ep: &RemoteEndpoint) -> Result<()> {
        check_vni(ep.vni)?;
        ensure!(
            !ep.node_ip.is_unspecified() && !ep.node_ip.is_broadcast() && !ep.node_ip.is_multicast(),
            "overlay endpoint {}: {} is not a node address",
            ep.ip,
            ep.node_ip
        );
        ensure!(ep.mac[0] & 1 == 0, "overlay endpoint {}: {} is not a unicast MAC", ep.ip, fmt_mac(&ep.mac));
        let v = OverlayRemote { node_ip: wire_addr(ep.node_ip), mac: ep.mac, _pad: 0 };
        sys::map_update(self.0.remote.as_fd(), bytes(&key(ep.vni, ep.ip)), bytes(&v), ANY)
            .with_context(|| format!("adding remote overlay endpoint {} (VNI {}; is the table full?)", ep.ip, ep.vni))
    }

    /// Unknown entries are fine.
    pub fn overlay_remove_remote(&self, vni: u32, ip: Ipv4Addr) -> Result<()> {
        sys::map_delete(self.0.remote.as_fd(), bytes(&key(vni, ip)))?;
        Ok(())
    }

    /// Every remote endpoint the datapath knows, sorted: what a resync diffs against the store.
    pub fn overlay_remotes(&self) -> Result<Vec<RemoteEndpoint>> {
        let mut out = vec![];
        for k in keys::<OverlayKey>(&self.0.remote)? {
            let mut v = [0u8; size_of::<OverlayRemote>()];
            if sys::map_lookup(self.0.remote.as_fd(), bytes(&k), &mut v)? {
                let r: OverlayRemote = from_bytes(&v);
                out.push(RemoteEndpoint {
                    vni: k.vni,
                    ip: Ipv4Addr::from(k.addr.to_ne_bytes()),
                    mac: r.mac,
                    node_ip: Ipv4Addr::from(r.node_ip.to_ne_bytes()),
                });
            }
        }
        out.sort();
        Ok(out)
    }
}

/// Detaches `underlay_in` from the interfaces `ifindexes`.
fn detach_underlay(links: &links::SharedLinks, ifindexes: &[u32]) {
    for i in ifindexes {
        let pins = links.lock().unwrap_or_else(|e| e.into_inner()).take_ifindex(*i, &[prog_names::UNDERLAY_IN]);
        links::drop_pins(&pins, true);
    }
}

fn fmt_mac(m: &[u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Every key of a hash map.
fn keys<K: Copy + Default>(fd: &OwnedFd) -> Result<Vec<K>> {
    let mut key = vec![0u8; size_of::<K>()];
    let mut next = vec![0u8; size_of::<K>()];
    let mut out = vec![];
    let mut first = true;
    while sys::map_next_key(fd.as_fd(), (!first).then_some(&key[..]), &mut next).context("walking an overlay map")? {
        first = false;
        key.copy_from_slice(&next);
        out.push(from_bytes::<K>(&key));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vnis_must_fit_24_bits() {
        assert!(check_vni(4096).is_ok());
        assert!(check_vni(VNI_MAX).is_ok());
        let e = check_vni(VNI_MAX + 1).unwrap_err().to_string();
        assert!(e.contains("24 bits"), "{e}");
    }

    #[test]
    fn overlay_keys_carry_the_address_in_wire_order() {
        let k = key(4097, Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(bytes(&k), [0x01, 0x10, 0, 0, 10, 0, 0, 2]);
    }
}
