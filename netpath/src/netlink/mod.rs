//! rtnetlink helpers: links, addresses, routes, and network namespaces. Everything the daemon
//! changes in the kernel's network configuration goes through here; nothing shells out to `ip`.

pub mod ethtool;
pub mod netns;

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::MacVlanMode;
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
use rtnetlink::{
    Handle, LinkBridge, LinkMacVlan, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVlan, LinkVxlan, RouteMessageBuilder,
};

/// One interface as a link dump shows it.
#[derive(Debug, Clone)]
pub struct LinkSummary {
    pub index: u32,
    pub name: String,
    /// `bridge`, `veth`, `vxlan`, ...; None for plain devices.
    pub kind: Option<String>,
    /// The bridge (or bond) it is enslaved to.
    pub master: Option<u32>,
    pub loopback: bool,
    pub up: bool,
    /// IFLA_IFALIAS: [`OWNER_ALIAS`] on links netpath made.
    pub alias: Option<String>,
    pub mac: Option<Vec<u8>>,
    /// IFLA_LINK: a veth's peer's ifindex (in the peer's namespace).
    pub peer: Option<u32>,
}

/// What the kernel counted on a link (its IFLA_STATS64), from the link's own side: `rx` is what
/// it received, `tx` what it sent. Forwarded and eBPF-redirected packets are counted like any
/// other (a redirect to a veth goes through its transmit path).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

impl LinkStats {
    /// The same traffic from the other end of a veth pair (a container's side, for the stats
    /// of its host-side veth): what one end sends, the other receives.
    pub fn peer_view(&self) -> LinkStats {
        LinkStats {
            rx_packets: self.tx_packets,
            rx_bytes: self.tx_bytes,
            tx_packets: self.rx_packets,
            tx_bytes: self.rx_bytes,
        }
    }
}

/// The counters of a link message (None if it carries no IFLA_STATS64, which every kernel
/// since 2.6.35 sends).
fn link_stats(m: &LinkMessage) -> Option<LinkStats> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::Stats64(s) => Some(LinkStats {
            rx_packets: s.rx_packets,
            rx_bytes: s.rx_bytes,
            tx_packets: s.tx_packets,
            tx_bytes: s.tx_bytes,
        }),
        _ => None,
    })
}

fn link_name(m: &LinkMessage) -> Option<&str> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

/// The alias netpath gives every link it creates, so it can tell its own links (and only
/// those) from other software's, whatever their names.
pub const OWNER_ALIAS: &str = "netpath";

/// What the kernel announces about interfaces (see [`monitor`]).
#[derive(Debug, Clone)]
pub enum Event {
    /// A link appeared, changed or went away.
    Link { name: Option<String> },
    /// An IPv4 address was added or removed on a link.
    Addr { index: u32 },
    /// Announcements were lost (the socket overflowed): anything may have changed.
    Lost,
}

/// Follows link and IPv4 address changes in the calling thread's network namespace, like
/// `ip monitor link address`.
pub fn monitor() -> Result<impl futures::Stream<Item = Event>> {
    use futures::StreamExt;
    use rtnetlink::MulticastGroup;
    use rtnetlink::packet_core::NetlinkPayload;
    use rtnetlink::packet_route::RouteNetlinkMessage as M;
    let (conn, _handle, messages) =
        rtnetlink::new_multicast_connection(&[MulticastGroup::Link, MulticastGroup::Ipv4Ifaddr])
            .context("subscribing to link and address changes")?;
    tokio::spawn(conn);
    Ok(messages.filter_map(|(m, _)| async move {
        match m.payload {
            NetlinkPayload::InnerMessage(M::NewLink(l) | M::DelLink(l)) => Some(Event::Link {
                name: l.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n.clone()),
                    _ => None,
                }),
            }),
            NetlinkPayload::InnerMessage(M::NewAddress(a) | M::DelAddress(a)) => {
                Some(Event::Addr { index: a.header.index })
            }
            NetlinkPayload::Overrun(_) | NetlinkPayload::Error(_) => Some(Event::Lost),
            _ => None,
        }
    }))
}

/// A netlink connection bound to one network namespace (the one it was opened in).
#[derive(Clone)]
pub struct Netlink {
    /// Several sockets: the kernel handles a request on the sender's socket to completion (a
    /// link deletion waits out grace periods), and one socket would queue every other request
    /// behind it. `handles[0]` is kept for dumps.
    handles: std::sync::Arc<[Handle]>,
    next: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// The kernel runs one dump at a time per socket (a second one fails with EBUSY): dumps
    /// take turns on theirs.
    dumping: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// Sockets of the daemon's own namespace; those made inside a container's need only one.
const HOST_SOCKETS: usize = 8;

/// The kernel's errno for a netlink error, if that is what `e` is.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// An rtnetlink socket in the calling thread's namespace (a new thread inherits it), driven
/// on a thread of its own. The kernel carries out a request inside the `sendmsg` that sends
/// it, so a slow one (a veth's deletion or a tcx attach: 20-50 ms under RTNL) blocks the
/// thread that sends it; on a runtime worker that stalled every task queued there (an `rm`
/// arriving during a deletion took the deletion's time although it waits for none of it).
fn driven_on_own_thread() -> Result<Handle> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("netlink".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_io().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(anyhow::Error::from(e).context("netlink thread runtime")));
                    return;
                }
            };
            rt.block_on(async move {
                match rtnetlink::new_connection().context("opening rtnetlink socket") {
                    Ok((conn, handle, unsolicited)) => {
                        // Dropped now: a `_` in this pattern would keep the receiver alive
                        // in the scrutinee for as long as `conn` runs (the daemon's life),
                        // queueing every unsolicited message unread. Closed, the connection
                        // discards them.
                        drop(unsolicited);
                        let _ = tx.send(Ok(handle));
                        conn.await; // ends when every handle is dropped
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            });
        })
        .context("starting a netlink thread")?;
    rx.recv().context("netlink thread")?
}

impl Netlink {
    /// A connection in the calling thread's network namespace: [`HOST_SOCKETS`] sockets, each
    /// driven on a thread of its own (see [`driven_on_own_thread`]).
    pub fn current() -> Result<Self> {
        let handles = (0..HOST_SOCKETS).map(|_| driven_on_own_thread()).collect::<Result<Vec<_>>>()?;
        Ok(Self::with(handles))
    }

    /// A connection of one socket in the calling thread's namespace, for a task of its own
    /// whose slow requests (link deletions) must not hold up the shared sockets' others.
    pub fn current_single() -> Result<Self> {
        Ok(Self::with(vec![driven_on_own_thread()?]))
    }

    fn with(handles: Vec<Handle>) -> Self {
        Self { handles: handles.into(), next: Default::default(), dumping: Default::default() }
    }

    /// The socket for the next request (dumps use [`Self::dump_handle`]).
    fn handle(&self) -> &Handle {
        let n = self.handles.len();
        if n == 1 {
            return &self.handles[0];
        }
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % (n - 1);
        &self.handles[1 + i]
    }

    fn dump_handle(&self) -> &Handle {
        &self.handles[0]
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
            Ok(Self::with(vec![handle]))
        })
        .join()
        .map_err(|_| anyhow!("netns thread panicked"))?
    }

    pub async fn link_index(&self, name: &str) -> Result<Option<u32>> {
        Ok(self.link_peer(name).await?.map(|(index, _)| index))
    }

    /// Link `name`'s index and (a veth's) its peer's index, in the peer's namespace.
    pub async fn link_peer(&self, name: &str) -> Result<Option<(u32, Option<u32>)>> {
        Ok(self.link_summary(LinkRef::Name(name)).await?.map(|l| (l.index, l.peer)))
    }

    pub async fn require_link(&self, name: &str) -> Result<u32> {
        self.link_index(name).await?.ok_or_else(|| anyhow!("link {name} does not exist"))
    }

    /// Creates the bridge if missing, gives it `gateway/prefix` and brings it up. Idempotent.
    /// Its MAC is set (derived from the gateway, like containers' MACs): a bridge left to pick
    /// its own takes the lowest of its ports' MACs and changes it as containers come and go,
    /// leaving containers with a stale gateway MAC.
    pub async fn ensure_bridge(&self, name: &str, gateway: Ipv4Addr, prefix: u8, mtu: Option<u32>) -> Result<u32> {
        let mac = crate::ipam::mac_for(gateway).to_vec();
        let idx = match self.link_index(name).await? {
            // A bridge from before netpath fixed bridge MACs (setting it again is a no-op).
            Some(i) => {
                let mut set = LinkUnspec::new_with_index(i).address(mac).alias(OWNER_ALIAS);
                if let Some(mtu) = mtu {
                    set = set.mtu(mtu);
                }
                self.handle()
                    .link()
                    .set(set.build())
                    .execute()
                    .await
                    .with_context(|| format!("setting the MAC of bridge {name}"))?;
                i
            }
            None => {
                let mut add = LinkBridge::new(name).address(mac);
                if let Some(mtu) = mtu {
                    add = add.mtu(mtu);
                }
                self.handle()
                    .link()
                    .add(add.build())
                    .execute()
                    .await
                    .with_context(|| format!("creating bridge {name}"))?;
                let i = self.require_link(name).await?;
                self.set_alias(i).await?;
                i
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
        match self.handle().link().del(idx).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("deleting link {name}")),
        }
    }

    /// Deletes the links `indexes` together, in one request when there are several: they are
    /// put in link group `group` (IFLA_GROUP, a number nothing else here uses) and the group
    /// is deleted, so the kernel unregisters them as one batch, waiting out its RCU grace
    /// periods once for all (a veth's deletion alone waits 20-40 ms for them). Links already
    /// gone are fine. Should the group request fail, they are deleted one by one.
    pub async fn delete_links(&self, indexes: &[u32], group: u32) -> Result<()> {
        assert_ne!(group, 0, "group 0 is every link's default");
        if let [idx] = indexes {
            return self.delete_index(*idx).await;
        }
        let mut grouped = 0;
        for &idx in indexes {
            let set = LinkUnspec::new_with_index(idx).link_group(group).build();
            match self.handle().link().set(set).execute().await {
                Ok(()) => grouped += 1,
                Err(e) if errno(&e) == Some(libc::ENODEV) => {}
                Err(e) => return Err(e).with_context(|| format!("putting link {idx} in group {group}")),
            }
        }
        if grouped == 0 {
            return Ok(());
        }
        let mut del = LinkMessage::default();
        del.attributes.push(LinkAttribute::Group(group));
        if let Err(e) = rtnetlink::LinkDelRequest::new_with_message(self.handle().clone(), del).execute().await {
            tracing::warn!("deleting link group {group}: {e}; deleting its links one by one");
            for &idx in indexes {
                self.delete_index(idx).await?;
            }
        }
        Ok(())
    }

    async fn delete_index(&self, idx: u32) -> Result<()> {
        match self.handle().link().del(idx).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("deleting link {idx}")),
        }
    }

    /// Creates a veth pair whose host end `host` is enslaved to bridge `master` and up, and whose
    /// other end is born inside the namespace at `netns` as `peer` with MAC `mac`, in one request.
    /// `mtu`: both ends' (the kernel's default, 1500, when None).
    pub async fn create_veth(
        &self,
        host: &str,
        master: u32,
        netns: &Path,
        peer: &str,
        mac: [u8; 6],
        mtu: Option<u32>,
    ) -> Result<()> {
        let ns = std::fs::File::open(netns).with_context(|| format!("opening netns {}", netns.display()))?;
        let mut peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer.to_string())
            .address(mac.to_vec())
            .setns_by_fd(ns.as_raw_fd());
        let mut msg = LinkVeth::new(host, peer);
        if let Some(mtu) = mtu {
            peer_msg = peer_msg.mtu(mtu);
            msg = msg.mtu(mtu);
        }
        // Down at first: IPv6 goes off before the kernel would configure it.
        let msg = msg.set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg.build()))).controller(master).build();
        self.handle()
            .link()
            .add(msg)
            .execute()
            .await
            .with_context(|| format!("creating veth {host} <-> {peer} in {}", netns.display()))?;
        let idx = self.require_link(host).await?;
        disable_ipv6(host);
        // The kernel applies an alias only to existing links: a second request, which also
        // brings it up.
        self.handle()
            .link()
            .set(LinkUnspec::new_with_index(idx).alias(OWNER_ALIAS).up().build())
            .execute()
            .await
            .with_context(|| format!("marking link {idx} as netpath's and bringing it up"))
    }

    /// Creates a macvlan sub-interface of `parent` (an ifindex of this namespace) born inside
    /// the namespace at `netns` as `name` with MAC `mac`, in one request.
    pub async fn create_macvlan_in(
        &self,
        parent: u32,
        mode: crate::state::MacvlanMode,
        netns: &Path,
        name: &str,
        mac: [u8; 6],
    ) -> Result<()> {
        let ns = std::fs::File::open(netns).with_context(|| format!("opening netns {}", netns.display()))?;
        let mut msg = LinkMacVlan::new(name, parent, macvlan_mode(mode)).setns_by_fd(ns.as_raw_fd());
        // A passthru macvlan is the parent's one MAC: giving it another would change the parent's.
        if mode != crate::state::MacvlanMode::Passthru {
            msg = msg.address(mac.to_vec());
        }
        self.handle()
            .link()
            .add(msg.build())
            .execute()
            .await
            .with_context(|| format!("creating macvlan {name} on link {parent} in {}", netns.display()))
    }

    /// Creates a macvlan sub-interface `name` of `parent` in this namespace, marked as
    /// netpath's, up (the host's shim to its own macvlan containers). Idempotent.
    pub async fn ensure_macvlan(&self, parent: u32, mode: crate::state::MacvlanMode, name: &str) -> Result<u32> {
        if let Some(i) = self.link_index(name).await? {
            self.set_up(i).await?;
            return Ok(i);
        }
        self.handle()
            .link()
            .add(LinkMacVlan::new(name, parent, macvlan_mode(mode)).build())
            .execute()
            .await
            .with_context(|| format!("creating macvlan {name} on link {parent}"))?;
        let i = self.require_link(name).await?;
        self.set_alias(i).await?;
        self.set_up(i).await?;
        Ok(i)
    }

    /// Creates (idempotently) the VXLAN device `name` in external mode (collect_md: the tunnel
    /// endpoint and VNI of each packet come from its metadata, set by eBPF) on UDP `port`, with
    /// `mtu`, marked as netpath's, up; returns its ifindex. A netpath device made otherwise (an
    /// earlier build's, another port) is made again; a link of that name netpath did not make
    /// is an error, left alone.
    pub async fn ensure_vxlan(&self, name: &str, port: u16, mtu: u32) -> Result<u32> {
        if let Some(m) = self.link_message(name).await? {
            let idx = m.header.index;
            match vxlan_config(&m) {
                Some(c) if c.collect_metadata && c.port == Some(port) && c.ours => {
                    self.handle()
                        .link()
                        .set(LinkUnspec::new_with_index(idx).mtu(mtu).up().build())
                        .execute()
                        .await
                        .with_context(|| format!("setting MTU {mtu} on {name}"))?;
                    return Ok(idx);
                }
                Some(c) if c.ours => self.delete_link(name).await?,
                _ => anyhow::bail!("link {name} exists and is not netpath's external VXLAN device: remove it first"),
            }
        }
        match self.handle().link().add(vxlan_message(name, port, mtu)).execute().await {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(libc::EOPNOTSUPP) => {
                anyhow::bail!("the kernel lacks VXLAN support: cannot create {name}")
            }
            Err(e) => return Err(e).with_context(|| format!("creating VXLAN device {name} (UDP port {port})")),
        }
        let i = self.require_link(name).await?;
        self.set_alias(i).await?;
        Ok(i)
    }

    /// The RTM_NEWLINK message the kernel has for link `name` (None if there is none).
    async fn link_message(&self, name: &str) -> Result<Option<LinkMessage>> {
        let mut links = self.handle().link().get().match_name(name.to_string()).execute();
        match links.try_next().await {
            Ok(m) => Ok(m),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("looking up link {name}")),
        }
    }

    /// Creates the 802.1q link `name` (VLAN `vid` of `lower`), marked as netpath's, up.
    /// A kernel without VLAN support answers EOPNOTSUPP ("unknown device type"): said so.
    pub async fn create_vlan(&self, name: &str, lower: u32, vid: u16) -> Result<u32> {
        match self.handle().link().add(vlan_message(name, lower, vid)).execute().await {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(libc::EOPNOTSUPP) => {
                anyhow::bail!("the kernel lacks VLAN (802.1q) support: cannot create {name}")
            }
            Err(e) => return Err(e).with_context(|| format!("creating VLAN {vid} link {name} on link {lower}")),
        }
        let i = self.require_link(name).await?;
        self.set_alias(i).await?;
        self.set_up(i).await?;
        Ok(i)
    }

    /// A link's index, whether it is up, and its alias (None if there is no such link).
    pub async fn link_state(&self, name: &str) -> Result<Option<(u32, bool, Option<String>)>> {
        use rtnetlink::packet_route::link::LinkFlags;
        let mut links = self.handle().link().get().match_name(name.to_string()).execute();
        match links.try_next().await {
            Ok(Some(m)) => {
                let alias = m.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfAlias(a) => Some(a.clone()),
                    _ => None,
                });
                Ok(Some((m.header.index, m.header.flags.contains(LinkFlags::Up), alias)))
            }
            Ok(None) => Ok(None),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("looking up link {name}")),
        }
    }

    /// Deletes link `name` if it exists and carries netpath's alias: never one netpath did
    /// not make. True if it was deleted.
    pub async fn delete_own_link(&self, name: &str) -> Result<bool> {
        match self.link_state(name).await? {
            Some((_, _, Some(a))) if a == OWNER_ALIAS => {
                self.delete_link(name).await?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Routes `dest` straight out of link `oif` (scope link) unless such a route exists.
    pub async fn ensure_link_route(&self, dest: Ipv4Net, oif: u32) -> Result<()> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dest.network(), dest.prefix_len())
            .output_interface(oif)
            .scope(rtnetlink::packet_route::route::RouteScope::Link)
            .build();
        match self.handle().route().add(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("adding a route to {dest} via link {oif}")),
        }
    }

    /// Marks a link as netpath's (see [`OWNER_ALIAS`]).
    async fn set_alias(&self, idx: u32) -> Result<()> {
        self.handle()
            .link()
            .set(LinkUnspec::new_with_index(idx).alias(OWNER_ALIAS).build())
            .execute()
            .await
            .with_context(|| format!("marking link {idx} as netpath's"))
    }

    /// Brings up a container's end of its link with no IPv6 on it, as Docker does on IPv4-only
    /// networks (all of netpath's): without an address generation mode it would get a
    /// link-local address and run duplicate address detection, router solicitations and MLD
    /// reports for seconds after its start. The mode goes first, in a request of its own: the
    /// kernel brings a link up before it reads the rest of a request, and a container's end
    /// has carrier the moment it is up. A netlink request, not a write to
    /// `/proc/sys/.../disable_ipv6`: a path walk under /proc/sys compares against the entries
    /// of every namespace that has made one, so it costs more the more containers run.
    /// Best effort: a kernel without IPv6 refuses the mode, and the link works either way.
    pub async fn set_up_ipv4_only(&self, idx: u32) -> Result<()> {
        use rtnetlink::packet_route::link::{AfSpecInet6, AfSpecUnspec, In6AddrGenMode};
        let none = LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(vec![AfSpecInet6::AddrGenMode(
            In6AddrGenMode::None,
        )])]);
        let msg = LinkUnspec::new_with_index(idx).append_extra_attribute(none).build();
        if let Err(e) = self.handle().link().set(msg).execute().await {
            tracing::debug!("link {idx}: no IPv6 address generation mode: {e}");
        }
        self.set_up(idx).await
    }

    pub async fn set_up(&self, idx: u32) -> Result<()> {
        self.handle()
            .link()
            .set(LinkUnspec::new_with_index(idx).up().build())
            .execute()
            .await
            .with_context(|| format!("bringing up link {idx}"))
    }

    /// Adds an IPv4 address unless the link already has it.
    pub async fn ensure_addr(&self, idx: u32, ip: Ipv4Addr, prefix: u8) -> Result<()> {
        match self.handle().address().add(idx, IpAddr::V4(ip), prefix).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("adding {ip}/{prefix} to link {idx}")),
        }
    }

    /// Removes an IPv4 address from a link; one it does not have is fine.
    pub async fn remove_addr(&self, idx: u32, ip: Ipv4Addr) -> Result<()> {
        let msgs = {
            let _turn = self.dumping.lock().await;
            let mut s = self.dump_handle().address().get().set_link_index_filter(idx).execute();
            let mut out = vec![];
            while let Some(m) = s.try_next().await.context("dumping addresses")? {
                if m.attributes.iter().any(|a| matches!(a, AddressAttribute::Address(IpAddr::V4(x)) if *x == ip)) {
                    out.push(m);
                }
            }
            out
        };
        for m in msgs {
            match self.handle().address().del(m).execute().await {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(libc::EADDRNOTAVAIL) => {}
                Err(e) => return Err(e).with_context(|| format!("removing {ip} from link {idx}")),
            }
        }
        Ok(())
    }

    /// IPv4 addresses of a link (or of every link with `None`).
    pub async fn addresses_v4(&self, idx: Option<u32>) -> Result<Vec<(Ipv4Addr, u8)>> {
        let mut req = self.dump_handle().address().get();
        if let Some(i) = idx {
            req = req.set_link_index_filter(i);
        }
        let mut out = vec![];
        let _turn = self.dumping.lock().await;
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
        match self.handle().route().add(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("adding default route via {gateway}")),
        }
    }

    /// Destination prefixes of the IPv4 routes in the main table (default route excluded):
    /// what is already reachable from here, so new networks can keep clear of it.
    pub async fn routed_prefixes(&self) -> Result<Vec<Ipv4Net>> {
        let mut out = vec![];
        let _turn = self.dumping.lock().await;
        let mut s = self.dump_handle().route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute();
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
        let _turn = self.dumping.lock().await;
        let mut s = self.dump_handle().route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute();
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
            let mut links = self.handle().link().get().match_index(i).execute();
            if let Some(m) = links.try_next().await.context("looking up link")? {
                names.extend(m.attributes.iter().filter_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n.clone()),
                    _ => None,
                }));
            }
        }
        Ok(names)
    }

    /// The kernel's counters of link `index` (one RTM_GETLINK); None if there is no such link.
    pub async fn stats_of(&self, index: u32) -> Result<Option<LinkStats>> {
        let mut links = self.handle().link().get().match_index(index).execute();
        match links.try_next().await {
            Ok(Some(m)) => Ok(link_stats(&m)),
            Ok(None) => Ok(None),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading the counters of link {index}")),
        }
    }

    /// The kernel's counters of every link of this namespace, by name, in one dump.
    pub async fn stats_by_name(&self) -> Result<std::collections::HashMap<String, LinkStats>> {
        let mut out = std::collections::HashMap::new();
        let _turn = self.dumping.lock().await;
        let mut s = self.dump_handle().link().get().execute();
        while let Some(m) = s.try_next().await.context("dumping links")? {
            if let (Some(name), Some(stats)) = (link_name(&m), link_stats(&m)) {
                out.insert(name.to_string(), stats);
            }
        }
        Ok(out)
    }

    /// Every link of this namespace, in one dump.
    ///
    /// With many containers a dump of every link is costly: the kernel fills in each veth's
    /// peer namespace id by a walk over every id the namespace has given out (about a second
    /// of its CPU at 10,000 containers). [`Netlink::links_without_master`] skips them.
    pub async fn links(&self) -> Result<Vec<LinkSummary>> {
        self.dump_links(None).await
    }

    /// The links enslaved to no bridge or bond, in one dump the kernel filters (bridge ports,
    /// every container's veth among them, are skipped before it fills them in).
    pub async fn links_without_master(&self) -> Result<Vec<LinkSummary>> {
        // IFLA_MASTER -1: "no master" (0 would mean no filter).
        self.dump_links(Some(u32::MAX)).await
    }

    async fn dump_links(&self, master: Option<u32>) -> Result<Vec<LinkSummary>> {
        let mut out = vec![];
        let _turn = self.dumping.lock().await;
        let mut req = self.dump_handle().link().get();
        if let Some(m) = master {
            req.message_mut().attributes.push(LinkAttribute::Controller(m));
        }
        let mut s = req.execute();
        while let Some(m) = s.try_next().await.context("dumping links")? {
            out.push(summarize(&m));
        }
        Ok(out)
    }

    /// One link, by name or index, as [`Netlink::links`] describes it; None if there is none.
    pub async fn link_summary(&self, link: LinkRef<'_>) -> Result<Option<LinkSummary>> {
        let req = self.handle().link().get();
        let req = match link {
            LinkRef::Name(n) => req.match_name(n.to_string()),
            LinkRef::Index(i) => req.match_index(i),
        };
        match req.execute().try_next().await {
            Ok(m) => Ok(m.as_ref().map(summarize)),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("looking up link {link}")),
        }
    }

    /// Every IPv4 address of this namespace with the link that holds it, in one dump.
    pub async fn addresses_by_link(&self) -> Result<Vec<(u32, Ipv4Addr, u8)>> {
        let mut out = vec![];
        let _turn = self.dumping.lock().await;
        let mut s = self.dump_handle().address().get().execute();
        while let Some(m) = s.try_next().await.context("dumping addresses")? {
            for a in &m.attributes {
                if let AddressAttribute::Address(IpAddr::V4(ip)) = a {
                    out.push((m.header.index, *ip, m.header.prefix_len));
                }
            }
        }
        Ok(out)
    }

    /// Names of all links in this namespace.
    pub async fn link_names(&self) -> Result<Vec<String>> {
        let mut out = vec![];
        let _turn = self.dumping.lock().await;
        let mut s = self.dump_handle().link().get().execute();
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

fn macvlan_mode(m: crate::state::MacvlanMode) -> MacVlanMode {
    use crate::state::MacvlanMode as M;
    match m {
        M::Bridge => MacVlanMode::Bridge,
        M::Private => MacVlanMode::Private,
        M::Vepa => MacVlanMode::Vepa,
        M::Passthru => MacVlanMode::Passthrough,
    }
}

/// The RTM_NEWLINK message that makes VLAN `vid` of link `lower` as `name` (`ip link add link
/// LOWER name NAME type vlan id VID`), up.
pub fn vlan_message(name: &str, lower: u32, vid: u16) -> LinkMessage {
    LinkVlan::new(name, lower, vid).up().build()
}

/// The RTM_NEWLINK message that makes `name` an external-mode VXLAN device on UDP `port` (`ip
/// link add NAME mtu MTU type vxlan external dstport PORT nolearning`), up. No VNI, no remote,
/// no lower device: each packet's come from the tunnel key eBPF sets. No learning: other nodes'
/// containers are known from the cluster, never from traffic.
pub fn vxlan_message(name: &str, port: u16, mtu: u32) -> LinkMessage {
    LinkMessageBuilder::<LinkVxlan>::new(name).collect_metadata(true).port(port).learning(false).mtu(mtu).up().build()
}

/// What [`Netlink::ensure_vxlan`] checks of an existing VXLAN device (None: not VXLAN).
struct VxlanConfig {
    collect_metadata: bool,
    port: Option<u16>,
    ours: bool,
}

fn vxlan_config(m: &LinkMessage) -> Option<VxlanConfig> {
    use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkInfo};
    let infos = m.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(i) => Some(i),
        _ => None,
    })?;
    if !infos.contains(&LinkInfo::Kind(InfoKind::Vxlan)) {
        return None;
    }
    let mut c = VxlanConfig { collect_metadata: false, port: None, ours: false };
    for i in infos {
        if let LinkInfo::Data(InfoData::Vxlan(data)) = i {
            for d in data {
                match d {
                    InfoVxlan::CollectMetadata(v) => c.collect_metadata = *v,
                    InfoVxlan::Port(p) => c.port = Some(*p),
                    _ => {}
                }
            }
        }
    }
    c.ours = m.attributes.iter().any(|a| matches!(a, LinkAttribute::IfAlias(a) if a == OWNER_ALIAS));
    Some(c)
}

/// Turns IPv6 off on a host end of a container's veth (netpath's container networks are IPv4):
/// with it on, every host end gets a link-local address and a multicast route, and the kernel
/// walks the whole IPv6 routing table on each link change of any of them (fib6_clean_all),
/// so wiring one container cost more the more containers there were. Best effort: a kernel
/// without IPv6 has no such file, and the link works either way.
///
/// The file is opened relative to the host's /proc/sys/net/ipv6/conf, held open from the first
/// call (made on a thread in the host's namespace, as every call is): the kernel resolves
/// `net`, `ipv6` and `conf` under /proc/sys by comparing against the entries of every network
/// namespace that has looked them up, under one global lock. With 5,000 containers a path
/// walk from /proc/sys took 5 ms of CPU (perf: proc_sys_compare), and grew with them.
fn disable_ipv6(ifname: &str) {
    static CONF: std::sync::OnceLock<Option<std::os::fd::OwnedFd>> = std::sync::OnceLock::new();
    let conf = CONF.get_or_init(|| {
        nix::fcntl::open(
            "/proc/sys/net/ipv6/conf",
            nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .ok()
    });
    let Some(conf) = conf else { return }; // no IPv6 in this kernel
    let rel = format!("{ifname}/disable_ipv6");
    let res = nix::fcntl::openat(
        conf,
        rel.as_str(),
        nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(std::io::Error::from)
    .and_then(|fd| std::io::Write::write_all(&mut std::fs::File::from(fd), b"1"));
    if let Err(e) = res
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::debug!("/proc/sys/net/ipv6/conf/{rel}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use rtnetlink::packet_core::Parseable;

    use super::*;

    /// A netlink attribute: length, type, payload, padding to 4 bytes.
    fn nla(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut b = ((4 + payload.len()) as u16).to_ne_bytes().to_vec();
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(payload);
        b.resize(b.len().next_multiple_of(4), 0);
        b
    }

    /// An RTM_NEWLINK body as the kernel sends it for a veth: ifinfomsg, IFLA_IFNAME, the
    /// IFLA_PAD that aligns the 64-bit counters, then IFLA_STATS64 with `fields` u64s (24 from
    /// kernels before 6.9, 25 since).
    fn newlink(index: i32, name: &str, stats: [u64; 4], fields: usize) -> Vec<u8> {
        let mut b = vec![0u8; 16]; // family, pad, type, index, flags, change
        b[4..8].copy_from_slice(&index.to_ne_bytes());
        b.extend(nla(3, format!("{name}\0").as_bytes())); // IFLA_IFNAME
        b.extend(nla(42, &[])); // IFLA_PAD
        // struct rtnl_link_stats64 begins rx_packets, tx_packets, rx_bytes, tx_bytes.
        let [rx_p, rx_b, tx_p, tx_b] = stats;
        let mut st: Vec<u8> = [rx_p, tx_p, rx_b, tx_b].iter().flat_map(|v| v.to_ne_bytes()).collect();
        st.resize(fields * 8, 0xff); // errors and drops: not ours to report
        b.extend(nla(23, &st)); // IFLA_STATS64
        b
    }

    #[test]
    fn the_counters_of_a_link_message_are_read_from_ifla_stats64() {
        for fields in [24, 25] {
            let m = LinkMessage::parse(&newlink(7, "veth0123abcd", [10, 1000, 20, 3000], fields)[..]).unwrap();
            assert_eq!(m.header.index, 7);
            assert_eq!(link_name(&m), Some("veth0123abcd"));
            let s = link_stats(&m).expect("IFLA_STATS64");
            assert_eq!(
                s,
                LinkStats { rx_packets: 10, rx_bytes: 1000, tx_packets: 20, tx_bytes: 3000 },
                "{fields} fields"
            );
            // The container at the other end of the veth received what the host side sent.
            let c = s.peer_view();
            assert_eq!((c.rx_packets, c.rx_bytes, c.tx_packets, c.tx_bytes), (20, 3000, 10, 1000));
        }
    }

    #[test]
    fn the_vlan_request_names_the_lower_link_the_kind_and_the_id() {
        use rtnetlink::packet_core::Emitable;
        use rtnetlink::packet_route::link::{InfoKind, InfoVlan, LinkFlags, LinkInfo};
        let m = vlan_message("eth0.10", 7, 10);
        assert!(m.header.flags.contains(LinkFlags::Up));
        assert!(m.attributes.contains(&LinkAttribute::IfName("eth0.10".into())), "{m:?}");
        assert!(m.attributes.contains(&LinkAttribute::Link(7)), "{m:?}");
        let info = m.attributes.iter().find_map(|a| match a {
            LinkAttribute::LinkInfo(i) => Some(i.clone()),
            _ => None,
        });
        let info = info.expect("IFLA_LINKINFO");
        assert!(info.contains(&LinkInfo::Kind(InfoKind::Vlan)), "{info:?}");
        assert!(info.contains(&LinkInfo::Data(InfoData::Vlan(vec![InfoVlan::Id(10)]))), "{info:?}");
        // And it survives the wire: what the kernel would parse back.
        let mut buf = vec![0u8; m.buffer_len()];
        m.emit(&mut buf);
        assert_eq!(LinkMessage::parse(&buf[..]).unwrap(), m);
    }

    #[test]
    fn the_vxlan_request_is_external_on_the_port_with_no_vni_and_no_learning() {
        use rtnetlink::packet_core::Emitable;
        use rtnetlink::packet_route::link::{InfoKind, InfoVxlan, LinkFlags, LinkInfo};
        let m = vxlan_message("np-vxlan0", 4789, 1500);
        assert!(m.header.flags.contains(LinkFlags::Up));
        assert!(m.attributes.contains(&LinkAttribute::Mtu(1500)), "{m:?}");
        let mut buf = vec![0u8; m.buffer_len()];
        m.emit(&mut buf);
        let back = LinkMessage::parse(&buf[..]).unwrap();
        let info = back.attributes.iter().find_map(|a| match a {
            LinkAttribute::LinkInfo(i) => Some(i.clone()),
            _ => None,
        });
        let info = info.expect("IFLA_LINKINFO");
        assert!(info.contains(&LinkInfo::Kind(InfoKind::Vxlan)), "{info:?}");
        let data = info.iter().find_map(|i| match i {
            LinkInfo::Data(InfoData::Vxlan(d)) => Some(d.clone()),
            _ => None,
        });
        let data = data.expect("IFLA_INFO_DATA");
        assert!(data.contains(&InfoVxlan::CollectMetadata(true)), "{data:?}");
        assert!(data.contains(&InfoVxlan::Port(4789)), "{data:?}");
        assert!(data.contains(&InfoVxlan::Learning(false)), "{data:?}");
        assert!(
            !data.iter().any(|d| matches!(d, InfoVxlan::Id(_) | InfoVxlan::Group(_) | InfoVxlan::Link(_))),
            "{data:?}"
        );
        // What ensure_vxlan reads back from the kernel's answer (no alias yet: not ours).
        let c = vxlan_config(&back).expect("a VXLAN device");
        assert!(c.collect_metadata && c.port == Some(4789) && !c.ours);
    }

    #[test]
    fn a_link_message_without_ifla_stats64_has_no_counters() {
        let mut b = vec![0u8; 16];
        b.extend(nla(3, b"lo\0"));
        let m = LinkMessage::parse(&b[..]).unwrap();
        assert_eq!(link_stats(&m), None);
    }
}

/// A link named by name or by index.
#[derive(Debug, Clone, Copy)]
pub enum LinkRef<'a> {
    Name(&'a str),
    Index(u32),
}

impl std::fmt::Display for LinkRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkRef::Name(n) => f.write_str(n),
            LinkRef::Index(i) => write!(f, "with ifindex {i}"),
        }
    }
}

/// What the daemon reads of a link.
fn summarize(m: &rtnetlink::packet_route::link::LinkMessage) -> LinkSummary {
    use rtnetlink::packet_route::link::{InfoKind, LinkFlags, LinkInfo};
    let mut l = LinkSummary {
        index: m.header.index,
        name: String::new(),
        kind: None,
        master: None,
        loopback: m.header.flags.contains(LinkFlags::Loopback),
        up: m.header.flags.contains(LinkFlags::Up),
        alias: None,
        mac: None,
        peer: None,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Controller(i) => l.master = Some(*i),
            LinkAttribute::IfAlias(a) => l.alias = Some(a.clone()),
            LinkAttribute::Address(m) => l.mac = Some(m.clone()),
            LinkAttribute::Link(i) => l.peer = Some(*i),
            LinkAttribute::LinkInfo(infos) => {
                l.kind = infos.iter().find_map(|i| match i {
                    LinkInfo::Kind(InfoKind::Other(k)) => Some(k.clone()),
                    LinkInfo::Kind(k) => Some(k.to_string()),
                    _ => None,
                })
            }
            _ => {}
        }
    }
    l
}
