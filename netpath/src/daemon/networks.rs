//! Networks: create, list, inspect, remove; and what the datapath must know of each.

use std::collections::BTreeMap;

use serde_json::Value;
use tracing::{info, warn};

use super::{DEFAULT_BRIDGE, DEFAULT_SUBNET, Daemon, crash, parse_ip, valid_name};
use crate::api::NetworkCreate;
use crate::drivers::driver;
use crate::error::Result;
use crate::ipam;
use crate::state::{self, DriverKind, GatewayMode, IpamConfig, Network, Phase, State};
use netpath_common::net_flags;

/// The gateway mode the options ask for; any option netpath does not know is an error rather
/// than silently ignored.
fn gateway_mode(options: &BTreeMap<String, String>) -> Result<GatewayMode> {
    let mut mode = GatewayMode::default();
    for (k, v) in options {
        if k != state::GATEWAY_MODE_OPT {
            return Err(bad_request!("unsupported network option {k:?} (supported: {})", state::GATEWAY_MODE_OPT));
        }
        mode = GatewayMode::parse(v)
            .ok_or_else(|| bad_request!("invalid {k} {v:?}: use nat, nat-unprotected or routed"))?;
    }
    Ok(mode)
}

/// A network by name or id, as a user names it.
pub(super) fn lookup<'a>(st: &'a State, name: &str) -> Result<&'a Network> {
    st.network(name).ok_or_else(|| not_found!("network {name} not found"))
}

/// A network that requests may use: not being created or removed.
pub(super) fn usable<'a>(st: &'a State, name: &str) -> Result<&'a Network> {
    let n = lookup(st, name)?;
    match n.phase {
        Phase::Ready => Ok(n),
        Phase::Creating => Err(conflict!("network {} is still being created", n.name)),
        Phase::Removing => Err(conflict!("network {} is being removed", n.name)),
    }
}

impl Daemon {
    /// Tells the datapath about a bridge network (isolation, masquerade).
    pub(super) fn publish_network(&self, net: &Network) -> anyhow::Result<()> {
        if let (DriverKind::Bridge, Some(ipam)) = (net.driver, net.ipam) {
            let flags = match net.gateway_mode {
                GatewayMode::Nat => net_flags::MASQUERADE,
                GatewayMode::NatUnprotected => net_flags::MASQUERADE | net_flags::DIRECT_ANY,
                GatewayMode::Routed => net_flags::DIRECT_PUBLISHED,
            };
            self.dp().set_network(ipam.subnet, net.index, ipam.gateway, flags)?;
        }
        Ok(())
    }

    pub(super) fn ensure_builtin_networks(&self) -> anyhow::Result<()> {
        let subnet = ipam::parse_subnet(DEFAULT_SUBNET)?;
        let builtin = [
            ("bridge", DriverKind::Bridge, Some(ipam::pool(subnet, None, None)?), Some(DEFAULT_BRIDGE.to_string())),
            ("host", DriverKind::Host, None, None),
            ("none", DriverKind::None, None, None),
        ];
        let mut st = self.state();
        for (name, driver, pool, bridge) in builtin {
            if st.network(name).is_none() {
                let n = Network {
                    id: state::new_id(),
                    name: name.into(),
                    driver,
                    ipam: pool.map(|p| IpamConfig { subnet: p.subnet, gateway: p.gateway, ip_range: None }),
                    bridge,
                    builtin: true,
                    created: state::now(),
                    index: st.next_network_index(),
                    gateway_mode: GatewayMode::default(),
                    phase: Phase::Ready,
                };
                let rev = st.next_rev();
                self.store.write_network(&n.id, state::store::Op::Save(&n), rev)?;
                st.put_network(n);
            }
        }
        Ok(())
    }

    pub async fn create_network(&self, req: NetworkCreate) -> Result<Value> {
        self.wait_ready().await;
        valid_name("network", &req.name)?;
        let d = req.driver.as_deref().unwrap_or("bridge");
        let kind =
            DriverKind::parse(d).ok_or_else(|| bad_request!("unknown driver {d:?}: use bridge, host or none"))?;
        if kind != DriverKind::Bridge {
            return Err(bad_request!(
                "only one instance of the {} network is allowed: it exists already as {:?}",
                kind.as_str(),
                kind.as_str()
            ));
        }
        let gateway_mode = gateway_mode(&req.options)?;
        let gateway = req.gateway.as_deref().map(|g| parse_ip("gateway", g)).transpose()?;
        let ip_range = req.ip_range.as_deref().map(ipam::parse_subnet).transpose()?;
        let subnet = req.subnet.as_deref().map(ipam::parse_subnet).transpose()?;
        if subnet.is_none() && (gateway.is_some() || ip_range.is_some()) {
            return Err(bad_request!("--gateway and --ip-range need --subnet"));
        }
        // What the host already has, read before reserving (netlink dumps, not under the lock).
        let host_nets = self.nl.addresses_v4(None).await?;
        let routed = if subnet.is_none() { self.nl.routed_prefixes().await? } else { vec![] };

        let id = state::new_id();
        // Nobody else knows this id yet: the lock is free, and taking it before the network
        // is visible makes every other request on it wait until it is built.
        let _lock = self.locks.lock(&id).await;
        let net = {
            let mut st = self.state();
            if st.network(&req.name).is_some_and(|n| n.name == req.name) {
                return Err(conflict!("network with name {} already exists", req.name));
            }
            let subnet = match subnet {
                Some(subnet) => {
                    if let Some(other) = st.overlapping(subnet) {
                        return Err(conflict!(
                            "subnet {subnet} overlaps with network {} ({})",
                            other.name,
                            other.ipam.map(|c| c.subnet.to_string()).unwrap_or_default()
                        ));
                    }
                    // The bridge would take an address of the host's own subnet and compete with
                    // its connected route: the host loses that link (our bridges were checked above).
                    if let Some((ip, len)) = host_nets.iter().find(|(ip, len)| {
                        ipnet::Ipv4Net::new(*ip, *len).is_ok_and(|n| ipam::overlaps(n.trunc(), subnet))
                    }) {
                        return Err(conflict!("subnet {subnet} overlaps with the host's address {ip}/{len}"));
                    }
                    subnet
                }
                None => {
                    let mut taken = st.subnets();
                    taken.extend(routed);
                    ipam::next_free_subnet(&taken)
                        .ok_or_else(|| conflict!("no free subnet left in the default pools: give one with --subnet"))?
                }
            };
            let pool = ipam::pool(subnet, gateway, ip_range)?;
            let net = Network {
                bridge: Some(format!("np-{}", &id[..12])),
                id: id.clone(),
                name: req.name,
                driver: kind,
                ipam: Some(IpamConfig { subnet: pool.subnet, gateway: pool.gateway, ip_range }),
                builtin: false,
                created: state::now(),
                index: st.next_network_index(),
                gateway_mode,
                phase: Phase::Creating,
            };
            st.put_network(net.clone());
            net
        };
        if let Err(e) = self.persist_network(&id).await {
            self.state().remove_network(&id);
            return Err(e);
        }
        crash::point("network-create:reserved");
        let built = async {
            driver(net.driver).ensure_network(&self.nl, &net).await?;
            self.publish_network(&net)
        }
        .await;
        if let Err(e) = built {
            self.finish_network_removal(&net).await;
            return Err(e.into());
        }
        crash::point("network-create:built");
        self.state().set_network_phase(&id, Phase::Ready);
        if let Err(e) = self.persist_network(&id).await {
            self.finish_network_removal(&net).await;
            return Err(e);
        }
        if let Err(e) = self.refresh_host().await {
            warn!("refreshing host addresses: {e:#}");
        }
        info!("network {} created ({})", net.name, net.ipam.map(|i| i.subnet.to_string()).unwrap_or_default());
        let st = self.state();
        Ok(self.network_json(&st, st.network_by_id(&id).unwrap_or(&net)))
    }

    pub fn list_networks(&self) -> Value {
        let st = self.state();
        let mut nets: Vec<&Network> = st.networks().collect();
        nets.sort_by(|a, b| a.name.cmp(&b.name));
        Value::Array(nets.into_iter().map(|n| self.network_json(&st, n)).collect())
    }

    pub fn inspect_network(&self, name: &str) -> Result<Value> {
        let st = self.state();
        Ok(self.network_json(&st, lookup(&st, name)?))
    }

    pub async fn remove_network(&self, name: &str) -> Result<()> {
        self.wait_ready().await;
        let id = lookup(&self.state(), name)?.id.clone();
        let _lock = self.locks.lock(&id).await;
        let net = {
            let mut st = self.state();
            let net = st.network_by_id(&id).ok_or_else(|| not_found!("network {name} not found"))?.clone();
            if net.builtin {
                return Err(conflict!("{} is a pre-defined network and cannot be removed", net.name));
            }
            // A removal that failed half-way may be retried; a network being built may not go.
            if net.phase == Phase::Creating {
                return Err(conflict!("network {} is still being created", net.name));
            }
            let mut users: Vec<(u64, &str)> =
                st.endpoints_on(&net.id).map(|(c, _)| (c.created, c.name.as_str())).collect();
            users.sort();
            let users: Vec<&str> = users.into_iter().map(|(_, n)| n).collect();
            if !users.is_empty() {
                return Err(conflict!("network {} is in use by container(s): {}", net.name, users.join(", ")));
            }
            if let Some(s) = st.services().find(|s| s.vips.iter().any(|v| v.network_id == net.id)) {
                return Err(conflict!("network {} is in use by service {}", net.name, s.name));
            }
            st.set_network_phase(&id, Phase::Removing);
            net
        };
        if let Err(e) = self.persist_network(&id).await {
            self.state().set_network_phase(&id, Phase::Ready);
            return Err(e);
        }
        crash::point("network-rm:marked");
        driver(net.driver).remove_network(&self.nl, &net).await?;
        crash::point("network-rm:removed");
        self.finish_network_removal(&net).await;
        if let Err(e) = self.refresh_host().await {
            warn!("refreshing host addresses: {e:#}");
        }
        info!("network {} removed", net.name);
        Ok(())
    }

    /// Removes what a network made (kernel objects, datapath entry, record); used by `rm`, by
    /// a failed `create` and by reconcile for operations a dead daemon left half done.
    pub(super) async fn finish_network_removal(&self, net: &Network) {
        if let Err(e) = driver(net.driver).remove_network(&self.nl, net).await {
            warn!("network {}: {e:#}", net.name);
        }
        if let Some(ipam) = net.ipam {
            let _ = self.dp().remove_network(ipam.subnet);
        }
        self.state().remove_network(&net.id);
        if let Err(e) = self.persist_network(&net.id).await {
            warn!("network {}: {e}", net.name);
        }
    }
}
