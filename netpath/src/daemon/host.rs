//! The host around the containers: which interfaces are uplinks (followed live as links come
//! and go), the host's addresses, the cgroup the socket programs sit on, and the periodic
//! housekeeping.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use tracing::{info, warn};

use super::{Config, Daemon};
use crate::netlink::{self, Event, LinkSummary, netns};
use crate::state::State;

pub struct Host {
    /// `--uplink`: only these act as uplinks. Empty: every interface that is not netpath's.
    named: Vec<String>,
    /// Uplinks the datapath is attached to: ifindex → name.
    attached: Mutex<BTreeMap<u32, String>>,
    /// One refresh at a time: each one reads the whole picture and acts on it.
    refresh: tokio::sync::Mutex<()>,
}

impl Host {
    pub fn new(cfg: &Config) -> Self {
        Self { named: cfg.uplinks.clone(), attached: Mutex::default(), refresh: tokio::sync::Mutex::default() }
    }

    pub fn uplinks(&self) -> Vec<String> {
        self.attached.lock().unwrap().values().cloned().collect()
    }
}

/// Names of the interfaces netpath made: bridges, macvlan shims, the host ends of endpoints.
/// (VLAN links it made carry its alias, which keeps them from being uplinks too.)
fn own_links(st: &State) -> HashSet<String> {
    let mut own: HashSet<String> = st.networks().flat_map(|n| n.own_links()).collect();
    own.extend(st.containers().flat_map(|c| c.endpoints.iter().filter_map(|e| e.host_ifname.clone())));
    own
}

/// True for a name netpath gives its own links: `np-<id>` bridges, `veth<8 hex>` endpoint
/// ends. Only a cheap first filter for link announcements: other software may use such names
/// too (the CNI bridge plugin names veths the same way), so nothing is removed on a name alone.
fn looks_own(name: &str) -> bool {
    name.strip_prefix("veth").is_some_and(|h| h.len() == 8 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        || name.starts_with("np-")
        || name == super::DEFAULT_BRIDGE
}

/// Which links are uplinks: the named ones, or every link but loopback, netpath's own (known
/// to the state or marked with its alias) and what is enslaved to netpath's bridges.
fn pick_uplinks<'a>(links: &'a [LinkSummary], named: &[String], own: &HashSet<String>) -> Vec<&'a LinkSummary> {
    if !named.is_empty() {
        return links.iter().filter(|l| named.contains(&l.name)).collect();
    }
    let own_idx: HashSet<u32> = links.iter().filter(|l| own.contains(&l.name)).map(|l| l.index).collect();
    links
        .iter()
        .filter(|l| !l.loopback && !own.contains(&l.name) && l.alias.as_deref() != Some(netlink::OWNER_ALIAS))
        .filter(|l| !l.master.is_some_and(|m| own_idx.contains(&m)))
        .collect()
}

impl Daemon {
    pub fn uplinks(&self) -> Vec<String> {
        self.host.uplinks()
    }

    /// Reads the host's links and addresses (one dump each) and makes the datapath match:
    /// NAT programs on every uplink (off the ones that went), the address each masquerades
    /// with, and the set of addresses that are "the host" for published ports.
    pub async fn refresh_host(&self) -> anyhow::Result<()> {
        let _one = self.host.refresh.lock().await;
        let links = if self.host.named.is_empty() {
            // An uplink is enslaved to nothing (a bridge or bond carries the address, not its
            // ports): a dump of those skips every container's veth, the costly part of a dump.
            self.nl.links_without_master().await?
        } else {
            let mut v = vec![];
            for n in &self.host.named {
                v.extend(self.nl.link_summary(netlink::LinkRef::Name(n)).await?);
            }
            v
        };
        let addrs = self.nl.addresses_by_link().await?;
        let (own, vips) = {
            let st = self.state();
            let vips: HashSet<Ipv4Addr> = st.services().flat_map(|s| s.vips.iter().map(|v| v.vip)).collect();
            (own_links(&st), vips)
        };
        let mut first_addr: HashMap<u32, Ipv4Addr> = HashMap::new();
        for (idx, ip, _) in &addrs {
            first_addr.entry(*idx).or_insert(*ip);
        }
        let want = pick_uplinks(&links, &self.host.named, &own);
        for n in &self.host.named {
            if !want.iter().any(|l| &l.name == n) {
                warn!("uplink {n} is gone");
            }
        }
        let mut attached = self.host.attached.lock().unwrap().clone();
        {
            let mut dp = self.dp();
            for l in &want {
                let mac = l.mac.as_deref().and_then(|m| <[u8; 6]>::try_from(m).ok());
                match dp.attach_uplink(&l.name, l.index, first_addr.get(&l.index).copied(), mac) {
                    Ok(()) => {
                        if attached.insert(l.index, l.name.clone()).is_none() {
                            info!("uplink {} (ifindex {}) attached", l.name, l.index);
                        }
                    }
                    Err(e) => warn!("uplink {}: {e:#}", l.name),
                }
            }
            let gone: Vec<u32> = attached.keys().filter(|i| !want.iter().any(|l| l.index == **i)).copied().collect();
            for idx in gone {
                let name = attached.remove(&idx).unwrap_or_default();
                let _ = dp.detach_uplink(idx);
                info!("uplink {name} (ifindex {idx}) detached");
            }
            // Service VIPs are not "the host" for published ports: the service entries name
            // them, and there may be more of them than HOST_ADDRS holds.
            let host: Vec<Ipv4Addr> = addrs.iter().map(|(_, a, _)| *a).filter(|a| !vips.contains(a)).collect();
            dp.sync_host_addrs(&host)?;
        }
        *self.host.attached.lock().unwrap() = attached;
        Ok(())
    }

    /// Follows the kernel's link and address announcements: an interface that appears (a
    /// second NIC, a VLAN, a re-created link) becomes an uplink at once, one that goes is
    /// forgotten, a new address is masqueraded with. Changes to netpath's own links are
    /// ignored, so running containers costs no host refresh.
    pub async fn follow_host(self: Arc<Self>) {
        loop {
            let events = match netlink::monitor() {
                Ok(s) => s,
                Err(e) => {
                    warn!("following host interfaces: {e:#}; retrying");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    continue;
                }
            };
            // Whatever happened while nobody listened.
            if let Err(e) = self.refresh_host().await {
                warn!("refreshing host interfaces: {e:#}");
            }
            let mut events = Box::pin(events);
            while let Some(ev) = events.next().await {
                let relevant = match &ev {
                    Event::Link { name: Some(n) } => !looks_own(n) && !own_links(&self.state()).contains(n),
                    Event::Link { name: None } | Event::Lost => true,
                    Event::Addr { index } => {
                        let attached = self.host.attached.lock().unwrap().contains_key(index);
                        // An address on a link that is not an uplink yet may make it one
                        // (named uplinks), and every address is a host address.
                        attached || !self.is_own_index(*index)
                    }
                };
                if !relevant {
                    continue;
                }
                // Announcements come in bursts (a link and its addresses): take them together.
                tokio::time::sleep(Duration::from_millis(20)).await;
                while let Some(Some(_)) = futures::FutureExt::now_or_never(events.next()) {}
                if let Err(e) = self.refresh_host().await {
                    warn!("refreshing host interfaces: {e:#}");
                }
            }
            warn!("host interface announcements stopped; subscribing again");
        }
    }

    fn is_own_index(&self, index: u32) -> bool {
        nix::net::if_::if_indextoname(index).is_ok_and(|n| {
            let n = n.to_string_lossy();
            looks_own(&n) || own_links(&self.state()).contains(n.as_ref())
        })
    }

    /// Attaches the socket programs to the cgroup2 root, mounting a cgroup2 hierarchy of our
    /// own where none is mounted (as Cilium does): without it host processes could not reach
    /// published ports.
    pub(super) fn attach_sockets(&self, state_dir: &Path) -> anyhow::Result<()> {
        let cg = match netns::cgroup2_root() {
            Ok(cg) => cg,
            Err(_) => {
                let at = state_dir.join("cgroup2");
                mount_cgroup2(&at)?;
                info!("no cgroup2 hierarchy was mounted: mounted one at {}", at.display());
                at
            }
        };
        self.dp().attach_sockets(&cg, netns::current_cookie()?).context("attaching the socket programs")
    }

    /// Periodic housekeeping: idle flows, exits nobody saw, and a full host refresh now and
    /// then in case an announcement was missed.
    pub async fn housekeeping(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        let mut n = 0u64;
        // Exits are followed as they happen; the minute's sweep (the first at once) is the
        // net under the watch.
        let watching = self.watch_exits().is_some();
        loop {
            tick.tick().await;
            let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            // SAFETY: valid pointer to a timespec.
            unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
            let now = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
            let table = self.ct_table.clone();
            match tokio::task::spawn_blocking(move || table.expire(now)).await {
                Ok(Ok(gone)) => self.flows_expired(&gone),
                Ok(Err(e)) => warn!("expiring flows: {e:#}"),
                Err(e) => warn!("expiring flows: {e}"),
            }
            // Table pressure warnings, pins of links whose interface vanished.
            self.dp().housekeeping();
            if n.is_multiple_of(12) || !watching {
                self.collect_exits().await;
            }
            n += 1;
            // Every minute: what announcements may have missed, and memory freed since.
            if n.is_multiple_of(12) {
                if let Err(e) = self.refresh_host().await {
                    warn!("refreshing host interfaces: {e:#}");
                }
                self.links.prune_defunct();
                super::trim_memory();
            }
        }
    }
}

fn mount_cgroup2(at: &PathBuf) -> anyhow::Result<()> {
    use nix::mount::{MsFlags, mount};
    std::fs::create_dir_all(at).with_context(|| format!("creating {}", at.display()))?;
    if nix::sys::statfs::statfs(at.as_path())
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
    {
        return Ok(());
    }
    mount(Some("none"), at.as_path(), Some("cgroup2"), MsFlags::empty(), None::<&str>)
        .with_context(|| format!("mounting cgroup2 on {}", at.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, master: Option<u32>) -> LinkSummary {
        let alias = name.starts_with("mine").then(|| netlink::OWNER_ALIAS.to_string());
        LinkSummary {
            index,
            name: name.into(),
            kind: None,
            master,
            loopback: name == "lo",
            up: true,
            alias,
            mac: None,
            peer: None,
        }
    }

    #[test]
    fn every_foreign_link_is_an_uplink_unless_named_ones_narrow_it() {
        let links = vec![
            link(1, "lo", None),
            link(2, "eth0", None),
            link(3, "eth1", None),
            link(4, "np-0123456789ab", None),
            link(5, "vethdeadbeef", Some(4)),
            link(6, "netpath0", None),
            link(7, "mystery", Some(4)),
            link(8, "veth-other", None),
            link(9, "vethcafe0123", None),
            link(10, "mine-from-a-crash", None),
        ];
        let own: HashSet<String> =
            ["np-0123456789ab", "vethdeadbeef", "netpath0"].iter().map(|s| s.to_string()).collect();
        let names = |v: Vec<&LinkSummary>| v.iter().map(|l| l.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(pick_uplinks(&links, &[], &own)), ["eth0", "eth1", "veth-other", "vethcafe0123"]);
        assert_eq!(names(pick_uplinks(&links, &["eth1".into()], &own)), ["eth1"]);
        assert!(pick_uplinks(&links, &["gone".into()], &own).is_empty());
    }

    #[test]
    fn own_link_names() {
        assert!(looks_own("veth0123abcd"));
        assert!(!looks_own("veth0123abc"));
        assert!(!looks_own("vethxyzxyzxy"));
        assert!(looks_own("np-0123456789ab"));
        assert!(looks_own("netpath0"));
        assert!(!looks_own("eth0"));
    }
}
