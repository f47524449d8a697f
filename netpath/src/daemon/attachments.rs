//! Attachments of namespaces a runtime owns (the CNI plugin's ADD/DEL/CHECK/GC): each is a
//! container record with an unowned sandbox, labelled with its key, so persistence,
//! reconcile, `ps` and `inspect` need nothing of their own.

use std::collections::{BTreeMap, HashSet};

use tracing::info;

use super::{Daemon, valid_name};
use crate::api::attach::{
    Attach, AttachGc, AttachKey, Attachment, LABEL_CONTAINER_ID, LABEL_IFNAME, LABEL_NETWORK, PortMapping,
};
use crate::api::{ContainerCreate, NetworkCreate};
use crate::error::{Error, Result};
use crate::ipam;
use crate::state::{Container, Phase, Sandbox};

/// How long an attach waits for a network another request is creating (a burst of first
/// ADDs on one network all try to create it).
const NETWORK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn check_key(k: &AttachKey) -> Result<()> {
    valid_name("network", &k.network)?;
    if k.container_id.is_empty() || k.container_id.len() > 256 || k.container_id.chars().any(char::is_control) {
        return Err(bad_request!("invalid container id {:?}: 1-256 printable characters", k.container_id));
    }
    if k.ifname.is_empty() {
        return Err(bad_request!("an interface name is required"));
    }
    Ok(())
}

/// A `portMappings` entry as a `-p` spec.
fn publish_spec(p: &PortMapping) -> Result<String> {
    let proto = p.protocol.as_deref().unwrap_or("tcp").to_ascii_lowercase();
    if proto != "tcp" && proto != "udp" {
        return Err(bad_request!("unsupported protocol {proto:?} in portMappings: use tcp or udp"));
    }
    let host = match p.host_ip.as_deref() {
        None | Some("") | Some("0.0.0.0") => String::new(),
        Some(ip) => {
            let ip: std::net::Ipv4Addr =
                ip.parse().map_err(|_| bad_request!("invalid hostIP {ip:?} in portMappings: expected IPv4"))?;
            format!("{ip}:")
        }
    };
    Ok(format!("{host}{}:{}/{proto}", p.host_port, p.container_port))
}

fn key_of(c: &Container) -> Option<AttachKey> {
    Some(AttachKey {
        network: c.labels.get(LABEL_NETWORK)?.clone(),
        container_id: c.labels.get(LABEL_CONTAINER_ID)?.clone(),
        ifname: c.labels.get(LABEL_IFNAME)?.clone(),
    })
}

/// `nameserver`, `search` and `options` lines of a resolv.conf.
fn resolv_conf(path: &std::path::Path) -> (Vec<String>, Vec<String>, Vec<String>) {
    let (mut ns, mut search, mut opts) = (vec![], vec![], vec![]);
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        let mut w = line.split_whitespace();
        match w.next() {
            Some("nameserver") => ns.extend(w.next().map(str::to_string)),
            Some("search") => search.extend(w.map(str::to_string)),
            Some("options") => opts.extend(w.map(str::to_string)),
            _ => {}
        }
    }
    (ns, search, opts)
}

impl Daemon {
    /// ADD: wires `req.netns` to the network (made first from `subnet` if it does not exist)
    /// and publishes the ports. The same key again with the same namespace answers what is
    /// there (a runtime retrying after a timeout); with another namespace it is a conflict.
    pub async fn attach(&self, req: Attach) -> Result<Attachment> {
        check_key(&req.key)?;
        let name = req.key.record_name();
        let existing = self.state().container(&name).cloned();
        if let Some(c) = existing {
            let same = matches!(&c.sandbox, Sandbox::Netns { path, .. }
                if crate::netlink::netns::inode(path).is_some()
                    && crate::netlink::netns::inode(path) == crate::netlink::netns::inode(std::path::Path::new(&req.netns)));
            if same && c.phase == Phase::Ready {
                return self.attachment_view(&c);
            }
            return Err(conflict!(
                "container {} already has {} on network {}: DEL it first",
                req.key.container_id,
                req.key.ifname,
                req.key.network
            ));
        }
        let publish = req.ports.iter().map(publish_spec).collect::<Result<Vec<_>>>()?;
        self.ensure_attach_network(&req).await?;
        let labels = BTreeMap::from([
            (LABEL_NETWORK.to_string(), req.key.network.clone()),
            (LABEL_CONTAINER_ID.to_string(), req.key.container_id.clone()),
            (LABEL_IFNAME.to_string(), req.key.ifname.clone()),
        ]);
        let create = ContainerCreate {
            name: name.clone(),
            network: Some(req.key.network.clone()),
            ip: req.ip.clone(),
            netns: Some(req.netns.clone()),
            publish,
            ifname: Some(req.key.ifname.clone()),
            labels,
            ..Default::default()
        };
        // Warnings (ports ignored on macvlan) have no place in a CNI result.
        let (c, _warnings) = self.create_container_record(create).await?;
        self.attachment_view(&c)
    }

    /// The network an attach names, made from its `subnet`/`gateway` if missing, and ready.
    async fn ensure_attach_network(&self, req: &Attach) -> Result<()> {
        let deadline = std::time::Instant::now() + NETWORK_WAIT;
        loop {
            let phase = self.state().network(&req.key.network).map(|n| n.phase);
            match phase {
                Some(Phase::Ready) => return Ok(()),
                Some(_) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await
                }
                Some(_) => return Err(conflict!("network {} is being created or removed", req.key.network)),
                None if req.subnet.is_none() => {
                    return Err(not_found!(
                        "network {} not found (give a subnet in the network config to create it)",
                        req.key.network
                    ));
                }
                None => {
                    let create = NetworkCreate {
                        name: req.key.network.clone(),
                        subnet: req.subnet.clone(),
                        gateway: req.gateway.clone(),
                        ..Default::default()
                    };
                    match self.create_network(create).await {
                        Ok(_) => info!("network {} created for an attachment", req.key.network),
                        // Another attach made it meanwhile: use theirs.
                        Err(Error::Conflict(_)) if self.state().network(&req.key.network).is_some() => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }

    /// CHECK's view of an attachment, or NotFound.
    pub fn attachment(&self, key: &AttachKey) -> Result<Attachment> {
        let c = self.state().container(&key.record_name()).cloned();
        match c {
            Some(c) if c.phase == Phase::Ready => self.attachment_view(&c),
            _ => Err(not_found!(
                "container {} has no interface {} on network {}",
                key.container_id,
                key.ifname,
                key.network
            )),
        }
    }

    /// DEL: unwires and forgets an attachment. One that does not exist is fine (DEL is
    /// idempotent), and so is a namespace that is already gone (its veth went with it).
    pub async fn detach(&self, key: &AttachKey) -> Result<()> {
        let name = key.record_name();
        if self.state().container(&name).is_none() {
            return Ok(());
        }
        match self.remove_container(&name, true).await {
            Err(Error::NotFound(_)) => Ok(()), // a concurrent DEL won
            r => r,
        }
    }

    /// GC: removes the attachments on a network that the runtime no longer knows.
    pub async fn attach_gc(&self, req: AttachGc) -> Result<Vec<AttachKey>> {
        let valid: HashSet<(String, String)> = req.valid.into_iter().map(|v| (v.container_id, v.ifname)).collect();
        let stale: Vec<AttachKey> = self
            .state()
            .containers()
            .filter_map(key_of)
            .filter(|k| k.network == req.network && !valid.contains(&(k.container_id.clone(), k.ifname.clone())))
            .collect();
        let mut errs = vec![];
        for k in &stale {
            info!("gc: removing attachment {} {} on {}", k.container_id, k.ifname, k.network);
            if let Err(e) = self.detach(k).await {
                errs.push(format!("{} {}: {e}", k.container_id, k.ifname));
            }
        }
        if errs.is_empty() { Ok(stale) } else { Err(Error::Internal(anyhow::anyhow!("gc: {}", errs.join("; ")))) }
    }

    fn attachment_view(&self, c: &Container) -> Result<Attachment> {
        let key = key_of(c).ok_or_else(|| bad_request!("container {} is not an attachment", c.name))?;
        let ep = c.endpoints.first().ok_or_else(|| not_found!("attachment {} has no endpoint", c.name))?;
        let net = self
            .state()
            .network_by_id(&ep.network_id)
            .cloned()
            .ok_or_else(|| not_found!("network of attachment {} is gone", c.name))?;
        let ipam = net.ipam.ok_or_else(|| bad_request!("network {} has no addresses", net.name))?;
        let netns = match &c.sandbox {
            Sandbox::Netns { path, .. } => path.display().to_string(),
            Sandbox::Host => String::new(),
        };
        let (nameservers, search, options) = resolv_conf(&self.dns.etc_paths(&c.id).resolv_conf);
        Ok(Attachment {
            key,
            name: c.name.clone(),
            netns,
            mac: ep.mac.map(|m| ipam::format_mac(&m)).unwrap_or_default(),
            bridge: net.bridge.clone().unwrap_or_default(),
            bridge_mac: ipam::format_mac(&ipam::mac_for(ipam.gateway)),
            host_ifname: ep.host_ifname.clone().unwrap_or_default(),
            ip: ep.ipv4.map(|i| i.to_string()).unwrap_or_default(),
            prefix: ipam.subnet.prefix_len(),
            gateway: ipam.gateway.to_string(),
            nameservers,
            search,
            options,
        })
    }
}
