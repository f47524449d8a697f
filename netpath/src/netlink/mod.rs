//! rtnetlink helpers: links, addresses, routes, and network namespaces. Everything the daemon
//! changes in the kernel's network configuration goes through here; nothing shells out to `ip`.

pub mod netns;

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
use rtnetlink::{Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

/// A netlink connection bound to one network namespace (the one it was opened in).
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

/// The kernel's errno for a netlink error, if that is what `e` is.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

impl Netlink {
    /// A connection in the calling thread's network namespace. Needs a tokio runtime.
    pub fn current() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink socket")?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// A connection inside the namespace at `path`. The socket is made on a short-lived thread
    /// that entered the namespace (setns is per thread); it stays bound to it afterwards.
    pub fn in_netns(path: &Path) -> Result<Self> {
        let rt = tokio::runtime::Handle::current();
        let path = path.to_owned();
        std::thread::spawn(move || -> Result<Self> {
            netns::enter(&path)?;
            let _guard = rt.enter();
            let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink socket")?;
            rt.spawn(conn);
            Ok(Self { handle })
        })
        .join()
        .map_err(|_| anyhow!("netns thread panicked"))?
    }

    pub async fn link_index(&self, name: &str) -> Result<Option<u32>> {
        let mut links = self.handle.link().get().match_name(name.to_string()).execute();
        match links.try_next().await {
            Ok(Some(msg)) => Ok(Some(msg.header.index)),
            Ok(None) => Ok(None),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("looking up link {name}")),
        }
    }

    pub async fn require_link(&self, name: &str) -> Result<u32> {
        self.link_index(name).await?.ok_or_else(|| anyhow!("link {name} does not exist"))
    }

    /// Creates the bridge if missing, gives it `gateway/prefix` and brings it up. Idempotent.
    /// Its MAC is set (derived from the gateway, like containers' MACs): a bridge left to pick
    /// its own takes the lowest of its ports' MACs and changes it as containers come and go,
    /// leaving containers with a stale gateway MAC.
    pub async fn ensure_bridge(&self, name: &str, gateway: Ipv4Addr, prefix: u8) -> Result<u32> {
        let mac = crate::ipam::mac_for(gateway).to_vec();
        let idx = match self.link_index(name).await? {
            // A bridge from before netpath fixed bridge MACs (setting it again is a no-op).
            Some(i) => {
                self.handle
                    .link()
                    .set(LinkUnspec::new_with_index(i).address(mac).build())
                    .execute()
                    .await
                    .with_context(|| format!("setting the MAC of bridge {name}"))?;
                i
            }
            None => {
                self.handle
                    .link()
                    .add(LinkBridge::new(name).address(mac).build())
                    .execute()
                    .await
                    .with_context(|| format!("creating bridge {name}"))?;
                self.require_link(name).await?
            }
        };
        self.ensure_addr(idx, gateway, prefix).await?;
        self.set_up(idx).await?;
        Ok(idx)
    }

    /// Deletes a link by name; a link that is already gone is not an error.
    pub async fn delete_link(&self, name: &str) -> Result<()> {
        let Some(idx) = self.link_index(name).await? else {
            return Ok(());
        };
        match self.handle.link().del(idx).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("deleting link {name}")),
        }
    }

    /// Creates a veth pair whose host end `host` is enslaved to bridge `master` and up, and whose
    /// other end is born inside the namespace at `netns` as `peer` with MAC `mac`, in one request.
    pub async fn create_veth(&self, host: &str, master: u32, netns: &Path, peer: &str, mac: [u8; 6]) -> Result<()> {
        let ns = std::fs::File::open(netns).with_context(|| format!("opening netns {}", netns.display()))?;
        let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer.to_string())
            .address(mac.to_vec())
            .setns_by_fd(ns.as_raw_fd())
            .build();
        let msg = LinkVeth::new(host, peer)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .controller(master)
            .up()
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .with_context(|| format!("creating veth {host} <-> {peer} in {}", netns.display()))
    }

    pub async fn set_up(&self, idx: u32) -> Result<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(idx).up().build())
            .execute()
            .await
            .with_context(|| format!("bringing up link {idx}"))
    }

    /// Adds an IPv4 address unless the link already has it.
    pub async fn ensure_addr(&self, idx: u32, ip: Ipv4Addr, prefix: u8) -> Result<()> {
        match self.handle.address().add(idx, IpAddr::V4(ip), prefix).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("adding {ip}/{prefix} to link {idx}")),
        }
    }

    /// IPv4 addresses of a link (or of every link with `None`).
    pub async fn addresses_v4(&self, idx: Option<u32>) -> Result<Vec<(Ipv4Addr, u8)>> {
        let mut req = self.handle.address().get();
        if let Some(i) = idx {
            req = req.set_link_index_filter(i);
        }
        let mut out = vec![];
        let mut s = req.execute();
        while let Some(m) = s.try_next().await.context("dumping addresses")? {
            for a in &m.attributes {
                if let AddressAttribute::Address(IpAddr::V4(ip)) = a {
                    out.push((*ip, m.header.prefix_len));
                }
            }
        }
        Ok(out)
    }

    /// Adds `default via gateway` unless a default route exists already.
    pub async fn ensure_default_route(&self, gateway: Ipv4Addr) -> Result<()> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new().gateway(gateway).build();
        match self.handle.route().add(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("adding default route via {gateway}")),
        }
    }

    /// Destination prefixes of the IPv4 routes in the main table (default route excluded):
    /// what is already reachable from here, so new networks can keep clear of it.
    pub async fn routed_prefixes(&self) -> Result<Vec<Ipv4Net>> {
        let mut out = vec![];
        let mut s = self.handle.route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute();
        while let Some(m) = s.try_next().await.context("dumping routes")? {
            let len = m.header.destination_prefix_length;
            if len == 0 || m.header.table != 254 {
                continue;
            }
            for a in &m.attributes {
                if let RouteAttribute::Destination(RouteAddress::Inet(ip)) = a
                    && let Ok(n) = Ipv4Net::new(*ip, len)
                {
                    out.push(n.trunc());
                }
            }
        }
        Ok(out)
    }

    /// Interfaces the default routes leave through: the uplinks when none are named.
    pub async fn default_route_links(&self) -> Result<Vec<String>> {
        let mut idxs = vec![];
        let mut s = self.handle.route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute();
        while let Some(m) = s.try_next().await.context("dumping routes")? {
            if m.header.destination_prefix_length != 0 || m.header.table != 254 {
                continue;
            }
            for a in &m.attributes {
                if let RouteAttribute::Oif(i) = a
                    && !idxs.contains(i)
                {
                    idxs.push(*i);
                }
            }
        }
        let mut names = vec![];
        for i in idxs {
            let mut links = self.handle.link().get().match_index(i).execute();
            if let Some(m) = links.try_next().await.context("looking up link")? {
                names.extend(m.attributes.iter().filter_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n.clone()),
                    _ => None,
                }));
            }
        }
        Ok(names)
    }

    /// Names of all links in this namespace.
    pub async fn link_names(&self) -> Result<Vec<String>> {
        let mut out = vec![];
        let mut s = self.handle.link().get().execute();
        while let Some(m) = s.try_next().await.context("dumping links")? {
            for a in &m.attributes {
                if let LinkAttribute::IfName(n) = a {
                    out.push(n.clone());
                }
            }
        }
        Ok(out)
    }
}
