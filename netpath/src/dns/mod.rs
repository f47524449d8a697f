//! The embedded DNS server, as Docker's at 127.0.0.11: containers on user-defined networks
//! resolve each other's names, aliases and short IDs (scoped to the networks they share), and
//! everything else is forwarded to the upstream resolvers.
//!
//! The daemon pushes plain data in ([`Dns::container_up`], [`Dns::container_gone`]); this
//! module never reads the daemon's state. It keeps its own name table, the sockets it serves
//! inside each container's namespace, and each container's resolv.conf, hosts and hostname
//! files under `<state-dir>/containers/<short id>/`.

mod files;
mod forward;
mod message;
mod names;
mod server;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tracing::{debug, warn};

pub use files::{EMBEDDED, HostResolv};
pub use names::{ServiceNames, valid_name};

/// TTL of container records. Docker uses 600 s; a container re-created with a new address
/// would then stay wrong in every caching client for ten minutes. 5 s keeps caches useful
/// for bursts of lookups while a re-created container is found again almost at once (and
/// glibc, which most containers use, does not cache at all).
pub const TTL: u32 = 5;

/// What the resolver needs to know about one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerView {
    pub id: String,
    pub name: String,
    /// Its UTS hostname (`--hostname`, else the short ID).
    pub hostname: String,
    /// The namespace to serve 127.0.0.11 in; `None`: no embedded server (host or none network).
    pub netns: Option<PathBuf>,
    pub endpoints: Vec<EndpointView>,
    /// `--dns`: upstreams instead of the host's.
    pub dns: Vec<IpAddr>,
    /// `--dns-search`: search domains instead of the host's.
    pub dns_search: Vec<String>,
    /// Runs in the host's namespace: its resolv.conf is the host's.
    pub host_network: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointView {
    pub network_id: String,
    pub network_name: String,
    /// Names resolve on this network (user-defined networks; not the default `bridge`).
    pub resolves: bool,
    pub ipv4: Option<Ipv4Addr>,
    /// Network-scoped aliases (`--alias`).
    pub aliases: Vec<String>,
    /// An `--internal` network: no way out, so no forwarding for it either.
    pub internal: bool,
}

impl ContainerView {
    /// Endpoints on networks with name resolution.
    fn resolving(&self) -> impl Iterator<Item = &EndpointView> {
        self.endpoints.iter().filter(|e| e.resolves)
    }
}

/// The files a container's processes see as /etc/resolv.conf, /etc/hosts and /etc/hostname.
#[derive(Debug, Clone)]
pub struct EtcPaths {
    pub resolv_conf: PathBuf,
    pub hosts: PathBuf,
    pub hostname: PathBuf,
}

/// The embedded DNS server: cheap to clone, safe to share.
#[derive(Clone)]
pub struct Dns {
    inner: Shared,
}

type Shared = Arc<Inner>;

struct Inner {
    table: RwLock<names::Table>,
    listeners: Mutex<HashMap<String, server::Listener>>,
    host: RwLock<(Option<SystemTime>, HostResolv)>,
    resolv_conf: PathBuf,
    /// `<state-dir>/containers`
    files_dir: PathBuf,
    rotate: AtomicUsize,
    runtime: tokio::runtime::Handle,
}

impl Dns {
    /// Must be called inside the daemon's tokio runtime. `resolv_conf`: the host's resolver
    /// configuration (upstreams, search domains), re-read when it changes.
    pub fn new(files_dir: &Path, resolv_conf: &Path) -> Dns {
        let inner = Arc::new(Inner {
            table: RwLock::default(),
            listeners: Mutex::default(),
            host: RwLock::new((None, HostResolv::default())),
            resolv_conf: resolv_conf.to_owned(),
            files_dir: files_dir.to_owned(),
            rotate: AtomicUsize::new(0),
            runtime: tokio::runtime::Handle::current(),
        });
        inner.refresh_host();
        // Follow the host's resolver changes (DHCP, VPN) for forwarding.
        let weak = Arc::downgrade(&inner);
        inner.runtime.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                let Some(i) = weak.upgrade() else { return };
                i.refresh_host();
            }
        });
        Dns { inner }
    }

    /// The files of container `id` (whether or not they exist yet).
    pub fn etc_paths(&self, id: &str) -> EtcPaths {
        let dir = self.inner.dir(id);
        EtcPaths { resolv_conf: dir.join("resolv.conf"), hosts: dir.join("hosts"), hostname: dir.join("hostname") }
    }

    /// A container was created, changed (connect, disconnect) or found again at start: writes
    /// its files, publishes its names (visible to the very next query) and serves 127.0.0.11
    /// in its namespace. Errors: its files could not be written (its names are served anyway);
    /// a server that cannot bind is logged, not fatal (the container works without it).
    pub fn container_up(&self, c: ContainerView) -> anyhow::Result<()> {
        let i = &self.inner;
        i.refresh_host();
        let host = i.host.read().unwrap().1.clone();
        let (id, netns) = (c.id.clone(), c.netns.clone());
        // Only a container whose resolv.conf names 127.0.0.11 gets sockets there: one on the
        // default bridge with reachable upstreams asks them itself (as Docker's do), and
        // holds none of the daemon's descriptors.
        let serve = files::uses_embedded(&c, &host);
        let files = self.write_files(&c, &host);
        i.table.write().unwrap().upsert(c);
        let mut ls = i.listeners.lock().unwrap();
        match netns.filter(|_| serve) {
            Some(ns) => {
                let same = ls.get(&id).is_some_and(|l| l.netns_inode == crate::netlink::netns::inode(&ns));
                if !same {
                    ls.remove(&id);
                    match server::start(i, &id, &ns) {
                        Ok(l) => {
                            ls.insert(id.clone(), l);
                        }
                        Err(e) => warn!("container {}: no embedded DNS: {e:#}", &id[..12]),
                    }
                }
            }
            None => {
                ls.remove(&id);
            }
        }
        files
    }

    /// Service names (`NAME` → VIP or task addresses, `tasks.NAME` → task addresses) per
    /// network; they resolve for containers on that network only.
    pub fn set_services(&self, s: ServiceNames) {
        self.inner.table.write().unwrap().set_services(s);
    }

    /// A container of another node (on an overlay network): only its names, no files or
    /// server here.
    pub fn remote_up(&self, c: ContainerView) {
        self.inner.table.write().unwrap().upsert(c);
    }

    /// A container of another node is gone: its names stop resolving.
    pub fn remote_gone(&self, id: &str) {
        self.inner.table.write().unwrap().remove(id);
    }

    /// A container is gone: its names stop resolving at once, its server stops, its files go.
    pub fn container_gone(&self, id: &str) {
        self.inner.table.write().unwrap().remove(id);
        self.inner.listeners.lock().unwrap().remove(id);
        let dir = self.inner.dir(id);
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!("removing {}: {e}", dir.display());
        }
    }

    fn write_files(&self, c: &ContainerView, host: &HostResolv) -> anyhow::Result<()> {
        let dir = self.inner.dir(&c.id);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let p = self.etc_paths(&c.id);
        for (path, content) in [
            (&p.resolv_conf, files::resolv_conf(c, host)),
            (&p.hosts, files::hosts(c)),
            (&p.hostname, format!("{}\n", c.hostname)),
        ] {
            files::write_in_place(path, &content).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }
}

impl Inner {
    fn dir(&self, id: &str) -> PathBuf {
        self.files_dir.join(&id[..id.len().min(names::SHORT_ID)])
    }

    /// Re-reads the host's resolv.conf if it changed (by mtime). A missing file means no
    /// upstreams: external names get SERVFAIL.
    fn refresh_host(&self) {
        let mtime = std::fs::metadata(&self.resolv_conf).and_then(|m| m.modified()).ok();
        if self.host.read().unwrap().0 == mtime && mtime.is_some() {
            return;
        }
        let text = std::fs::read_to_string(&self.resolv_conf).unwrap_or_default();
        let parsed = HostResolv::parse(&text);
        debug!("upstream resolvers: {:?}", parsed.nameservers);
        *self.host.write().unwrap() = (mtime, parsed);
    }

    /// Where `id`'s forwarded queries go: its `--dns` servers, else the host's.
    fn upstreams(&self, id: &str) -> Vec<IpAddr> {
        let table = self.table.read().unwrap();
        // A container only on internal networks has no way out: its queries for other names
        // are not forwarded either (Docker 26 and later), and get SERVFAIL.
        if let Some(c) = table.get(id)
            && !c.endpoints.is_empty()
            && c.endpoints.iter().all(|e| e.internal)
        {
            return vec![];
        }
        let own = table.get(id).map(|c| c.dns.clone()).unwrap_or_default();
        drop(table);
        if own.is_empty() { self.host.read().unwrap().1.nameservers.clone() } else { own }
    }

    /// Decides about one query from container `id`.
    fn handle(&self, id: &str, q: &[u8], tcp: bool) -> message::Outcome {
        let table = self.table.read().unwrap();
        let asker = Asker { table: &table, id };
        let rotate = self.rotate.fetch_add(1, Ordering::Relaxed);
        message::handle(q, tcp, &asker, rotate, TTL)
    }
}

struct Asker<'a> {
    table: &'a names::Table,
    id: &'a str,
}

impl message::Names for Asker<'_> {
    fn resolve(&self, qname: &str) -> Option<Vec<Ipv4Addr>> {
        self.table.resolve(self.id, qname).map(<[_]>::to_vec)
    }
    fn reverse(&self, ip: Ipv4Addr) -> Option<String> {
        self.table.reverse(self.id, ip).map(str::to_string)
    }
}
