//! The background half of removing a container: deleting its host-side veths and unpinning
//! its namespace. A veth's deletion costs the kernel 20-50 ms whatever the number of
//! containers (the RTNL lock, RCU grace periods, the bridge's FDB flush): most of what `rm`
//! took, and nothing its caller needs. `rm` answers once the process is gone and the datapath,
//! the names and the record have forgotten the container; one task (serialised) deletes what
//! is left, on a netlink socket of its own, once no request is wiring a container (for a
//! quarter of a second at most), and what piled up meanwhile goes in one batch
//! ([`Netlink::delete_links`]: one set of grace periods for all of it).
//!
//! Only containers in namespaces of their own are reaped here: a namespace a runtime owns
//! (`--netns`, CNI, Docker) outlives the container, and its next attachment may reuse the
//! interface name at once, so its veth goes before the request answers, as before.
//!
//! The container's addresses stay held in IPAM until its veths are gone (the MAC is derived
//! from the address, and the bridge's FDB would still point at the old port): a request for
//! one of them waits for its release ([`Daemon::wait_released`]). Crash safety: the record is
//! off the disk before `rm` answers and holds live only in memory, so a restarted daemon's
//! reconcile deletes the leftovers as orphans (links and namespaces no record claims) before
//! it hands out any address.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tracing::warn;

use super::Daemon;
use crate::netlink::{Netlink, netns};

/// The link group the reaper puts veths in to delete them in one request. Nothing else on
/// the host is expected to use it ("np" in ASCII, shifted: groups are 32 bits, the commonly
/// used ones small).
const REAP_GROUP: u32 = 0x6e70_0001;

/// How long the reaper waits after a removal before it looks for its turn: a caller that
/// removes a container and starts another at once (`rm x; run y`, a CI runner) has begun
/// wiring by then, and its start does not queue behind the deletion on the RTNL lock.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(50);

/// How long the reaper lets requests that are wiring containers go first (see `wiring`).
const YIELD_AT_MOST: std::time::Duration = std::time::Duration::from_millis(250);

/// What a removed container leaves for the background.
#[derive(Debug, Default)]
pub(super) struct Remains {
    /// For the log.
    pub name: String,
    /// Host-side veths, by name.
    pub links: Vec<String>,
    /// Its own namespace, to unpin once its veths are gone.
    pub netns: Option<PathBuf>,
    /// Addresses held until the veths are gone: network id, address.
    pub held: Vec<(String, Ipv4Addr)>,
}

impl Remains {
    fn is_empty(&self) -> bool {
        self.links.is_empty() && self.netns.is_none() && self.held.is_empty()
    }
}

pub(super) struct Reaper {
    tx: mpsc::UnboundedSender<Remains>,
    /// Its own socket: a deletion waits out grace periods, which no other request should
    /// queue behind.
    nl: Netlink,
    /// Remains handed over and not yet reaped. Every batch reaped sends a new value, which
    /// wakes whoever waits for an address or for the queue to drain.
    pending: watch::Sender<usize>,
    /// Requests wiring a container now (namespace, veth, program attachment: all under the
    /// kernel's RTNL lock, which a deletion holds for most of its 20-50 ms). The reaper waits
    /// for none to be, up to [`YIELD_AT_MOST`]: a removal's deletion must not slow the start
    /// that follows it (`rm` then `run`).
    wiring: watch::Sender<usize>,
}

/// A request's turn at wiring (see `Reaper::wiring`), until dropped.
pub(super) struct Wiring<'a>(&'a watch::Sender<usize>);

impl Drop for Wiring<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl Reaper {
    pub fn new() -> anyhow::Result<(Self, mpsc::UnboundedReceiver<Remains>)> {
        let (tx, rx) = mpsc::unbounded_channel();
        Ok((Self { tx, nl: Netlink::current_single()?, pending: watch::channel(0).0, wiring: watch::channel(0).0 }, rx))
    }

    /// Remains handed over and not reaped yet.
    pub fn pending(&self) -> usize {
        *self.pending.borrow()
    }
}

impl Daemon {
    /// Marks the caller as wiring a container until the result is dropped: the reaper waits.
    pub(super) fn wiring(&self) -> Wiring<'_> {
        self.reaper.wiring.send_modify(|n| *n += 1);
        Wiring(&self.reaper.wiring)
    }

    /// Background work's turn: once no request is wiring a container, or after
    /// [`YIELD_AT_MOST`] (under a steady stream of runs it goes anyway).
    pub(super) async fn yield_to_wiring(&self) {
        let mut wiring = self.reaper.wiring.subscribe();
        let _ = tokio::time::timeout(YIELD_AT_MOST, wiring.wait_for(|n| *n == 0)).await;
    }

    /// Hands a removed container's remains to the reaper.
    pub(super) fn reap(&self, r: Remains) {
        if r.is_empty() {
            return;
        }
        self.reaper.pending.send_modify(|n| *n += 1);
        if let Err(mpsc::error::SendError(r)) = self.reaper.tx.send(r) {
            // Not while the daemon runs: the task never ends. Nothing is lost either way (a
            // restart sweeps orphans), but the holds must not stay.
            warn!("container {}: the reaper is gone; its links are left to the next start", r.name);
            self.release(&r.held);
            self.reaper.pending.send_modify(|n| *n -= 1);
        }
    }

    /// The reaper's task: takes whatever is queued, deletes every veth of it in one request,
    /// unpins the namespaces, frees the addresses, and goes again.
    pub(super) async fn run_reaper(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Remains>) {
        while let Some(first) = rx.recv().await {
            tokio::time::sleep(SETTLE).await;
            self.yield_to_wiring().await;
            let mut batch = vec![first];
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            super::crash::point("reap:links");
            let t = std::time::Instant::now();
            let names: Vec<&str> = batch.iter().flat_map(|r| r.links.iter().map(String::as_str)).collect();
            let mut idx = vec![];
            for n in &names {
                match self.reaper.nl.link_index(n).await {
                    Ok(Some(i)) => idx.push(i),
                    Ok(None) => {} // gone already
                    Err(e) => warn!("looking up veth {n} of a removed container: {e:#}"),
                }
            }
            let deleted = self.reaper.nl.delete_links(&idx, REAP_GROUP).await;
            if let Err(e) = &deleted {
                warn!("deleting the veths {names:?} of removed containers: {e:#}");
            }
            let links_ms = t.elapsed().as_secs_f64() * 1000.0;
            for &i in &idx {
                if deleted.is_ok() {
                    self.links.forget(i); // the kernel dropped the program's link with the veth
                } else {
                    self.dp().detach_endpoint(i);
                }
            }
            let spaces: Vec<PathBuf> = batch.iter().filter_map(|r| r.netns.clone()).collect();
            let unpinned = tokio::task::spawn_blocking(move || {
                spaces.iter().filter_map(|p| netns::remove(p).err()).map(|e| format!("{e:#}")).collect::<Vec<_>>()
            })
            .await
            .unwrap_or_else(|e| vec![format!("unpinning namespaces: {e}")]);
            for e in unpinned {
                warn!("{e}");
            }
            // A veth whose deletion failed is left to the next start's sweep: holding its
            // address for ever would leak it.
            for r in &batch {
                self.release(&r.held);
            }
            tracing::debug!(
                "reaped {} containers: links {links_ms:.1} ms, all {:.1} ms",
                batch.len(),
                t.elapsed().as_secs_f64() * 1000.0
            );
            self.reaper.pending.send_modify(|n| *n -= batch.len());
        }
    }

    fn release(&self, held: &[(String, Ipv4Addr)]) {
        let mut st = self.state();
        for (net, ip) in held {
            st.release_address(net, *ip);
        }
    }

    /// Waits until nothing handed to the reaper is left (a graceful stop, reconcile's sweep).
    pub async fn drain_reaper(&self) {
        let mut rx = self.reaper.pending.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Waits while what a request asks of `network` is held for a veth still being deleted:
    /// address `ip`, or (none asked for) any address, when every free one is held.
    pub(super) async fn wait_released(&self, network: &str, ip: Option<&str>, host_addrs: &[Ipv4Addr]) {
        let mut rx = self.reaper.pending.subscribe();
        while self.blocked_by_held(network, ip, host_addrs) {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    fn blocked_by_held(&self, network: &str, ip: Option<&str>, host_addrs: &[Ipv4Addr]) -> bool {
        let st = self.state();
        let Some(net) = st.network(network) else { return false };
        let held = st.held_addresses(&net.id);
        if held.is_empty() {
            return false;
        }
        match ip {
            Some(s) => s.parse::<Ipv4Addr>().is_ok_and(|ip| held.contains(&ip)),
            None => super::containers::only_held_left(&st, net, host_addrs),
        }
    }
}
