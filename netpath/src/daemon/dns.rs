//! The daemon's side of the embedded DNS server: checks the DNS options of `run` and
//! `network connect`, and hands the resolver plain views of containers (it never reads the
//! daemon's state itself).

use std::net::IpAddr;

use tracing::warn;

use super::Daemon;
use super::process::Isolation;
use crate::api::ContainerCreate;
use crate::dns::{self, ContainerView, EndpointView};
use crate::error::Result;
use crate::state::{Container, DriverKind, Network, Sandbox};

/// The DNS options of `run`, checked.
pub(super) struct DnsOptions {
    pub hostname: Option<String>,
    pub dns: Vec<IpAddr>,
    pub dns_search: Vec<String>,
    pub aliases: Vec<String>,
}

/// Checks `--alias` for a network: valid names, and only where names resolve (as Docker:
/// "network-scoped aliases are supported only for user-defined networks").
pub(super) fn check_aliases(aliases: &[String], net: &Network) -> Result<Vec<String>> {
    if !aliases.is_empty() && !resolves(net) {
        return Err(bad_request!("--alias is supported only on user-defined networks, not on {}", net.name));
    }
    let mut out: Vec<String> = vec![];
    for a in aliases {
        if !dns::valid_name(a) {
            return Err(bad_request!("invalid alias {a:?}: use DNS labels (letters, digits, '-', '_') of up to 63"));
        }
        if !out.contains(a) {
            out.push(a.clone());
        }
    }
    Ok(out)
}

pub(super) fn check_options(req: &ContainerCreate, net: &Network) -> Result<DnsOptions> {
    let dns = req
        .dns
        .iter()
        .map(|s| s.parse::<IpAddr>().map_err(|_| bad_request!("invalid --dns {s:?}: expected an IP address")))
        .collect::<Result<Vec<_>>>()?;
    for d in &req.dns_search {
        if !dns::valid_name(d) {
            return Err(bad_request!("invalid --dns-search {d:?}: expected a domain name"));
        }
    }
    if let Some(h) = &req.hostname {
        // One label or several, as sethostname(2) takes at most 64 bytes.
        if !dns::valid_name(h) || h.len() > 63 || h.ends_with('.') {
            return Err(bad_request!("invalid --hostname {h:?}: expected a host name of up to 63 characters"));
        }
        if net.driver == DriverKind::Host {
            return Err(bad_request!("--hostname cannot be used with --network host"));
        }
    }
    Ok(DnsOptions {
        hostname: req.hostname.clone(),
        dns,
        dns_search: req.dns_search.clone(),
        aliases: check_aliases(&req.aliases, net)?,
    })
}

/// Names resolve on user-defined networks; the default `bridge` has no name resolution.
fn resolves(net: &Network) -> bool {
    !net.builtin && matches!(net.driver, DriverKind::Bridge | DriverKind::Macvlan | DriverKind::Overlay)
}

impl Daemon {
    /// The resolver's view of `c`.
    fn dns_view(&self, c: &Container) -> ContainerView {
        let st = self.state();
        let endpoints: Vec<EndpointView> = c
            .endpoints
            .iter()
            .filter_map(|e| {
                let net = st.network_by_id(&e.network_id)?;
                Some(EndpointView {
                    network_id: net.id.clone(),
                    network_name: net.name.clone(),
                    resolves: resolves(net),
                    ipv4: e.ipv4,
                    aliases: e.aliases.clone(),
                    internal: net.opts.internal,
                })
            })
            .collect();
        let on_none =
            c.endpoints.iter().any(|e| st.network_by_id(&e.network_id).is_some_and(|n| n.driver == DriverKind::None));
        // dockerd serves 127.0.0.11 in its own sandboxes.
        let docker = c.labels.contains_key(super::docker::LABEL_DOCKER_ENDPOINT);
        let netns = match &c.sandbox {
            // `none` means no network at all: no resolver either.
            Sandbox::Netns { path, .. } if !on_none && !docker => Some(path.clone()),
            _ => None,
        };
        ContainerView {
            id: c.id.clone(),
            name: c.name.clone(),
            hostname: c.hostname().to_string(),
            netns,
            endpoints,
            dns: c.dns.clone(),
            dns_search: c.dns_search.clone(),
            host_network: c.sandbox == Sandbox::Host,
        }
    }

    /// Tells the resolver `c` is up or changed.
    pub(super) fn dns_up(&self, c: &Container) -> anyhow::Result<()> {
        self.dns.container_up(self.dns_view(c))
    }

    /// Like [`dns_up`], for changes that are done already: a failure is logged.
    pub(super) fn dns_refresh(&self, c: &Container) {
        if let Err(e) = self.dns_up(c) {
            warn!("container {}: {e:#}", c.name);
        }
    }

    /// After a (re)start: serves every container again.
    pub(super) fn dns_reconcile(&self) {
        let cs: Vec<Container> = self.state().containers().cloned().collect();
        for c in &cs {
            self.dns_refresh(c);
        }
    }

    /// How `c`'s processes are isolated: their own /etc files and hostname, except on the
    /// host network, where they are the host's processes.
    pub(super) fn isolation(&self, c: &Container) -> Option<Isolation> {
        if c.sandbox == Sandbox::Host {
            return None;
        }
        let p = self.dns.etc_paths(&c.id);
        Some(Isolation {
            mount_template: Some(self.store.mount_template()),
            netns_dir: Some(self.store.netns_dir()),
            resolv_conf: p.resolv_conf,
            hosts: p.hosts,
            hostname_file: p.hostname,
            hostname: c.hostname().to_string(),
        })
    }
}
