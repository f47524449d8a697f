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
pub use names::valid_name;

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

/// The servers on 127.0.0.11: one per network namespace, answering for every container record
/// in it. A runtime that gives one namespace several interfaces (CNI, one ADD per interface)
/// makes a record per interface; they share the namespace's one server, which resolves what
/// any of them may resolve.
#[derive(Default)]
struct Servers {
    /// Server key → its sockets.
    listeners: HashMap<u64, server::Listener>,
    /// Server key → the containers it answers for, in the order they came.
    /// (Shared with the queries being answered: a query takes the list without copying it.)
    members: HashMap<u64, Arc<Vec<String>>>,
    /// Namespace inode → the key of the server in it.
    by_netns: HashMap<u64, u64>,
    /// Container id → the key of the server it is a member of.
    key_of: HashMap<String, u64>,
    next_key: u64,
}

impl Servers {
    /// Takes container `id` out of its server; the server closes with its last member.
    fn leave(&mut self, id: &str) {
        let Some(key) = self.key_of.remove(id) else { return };
        let Some(m) = self.members.get_mut(&key) else { return };
        Arc::make_mut(m).retain(|x| x != id);
        if m.is_empty() {
            self.members.remove(&key);
            if let Some(l) = self.listeners.remove(&key)
                && let Some(inode) = l.netns_inode
            {
                self.by_netns.remove(&inode);
            }
        }
    }
}

/// The embedded DNS server: cheap to clone, safe to share.
#[derive(Clone)]
pub struct Dns {
    inner: Shared,
}

type Shared = Arc<Inner>;

struct Inner {
    table: RwLock<names::Table>,
    servers: Mutex<Servers>,
    host: RwLock<(Option<SystemTime>, HostResolv)>,
    resolv_conf: PathBuf,
    /// `<state-dir>/containers`
    files_dir: PathBuf,
    rotate: AtomicUsize,
    runtime: tokio::runtime::Handle,
    /// Every server's sockets, served by one task.
    poller: Arc<server::Poller>,
}

impl Dns {
    /// Must be called inside the daemon's tokio runtime. `resolv_conf`: the host's resolver
    /// configuration (upstreams, search domains), re-read when it changes.
    pub fn new(files_dir: &Path, resolv_conf: &Path) -> anyhow::Result<Dns> {
        let poller = server::Poller::new().context("starting the embedded DNS server")?;
        let inner = Arc::new(Inner {
            table: RwLock::default(),
            servers: Mutex::default(),
            host: RwLock::new((None, HostResolv::default())),
            resolv_conf: resolv_conf.to_owned(),
            files_dir: files_dir.to_owned(),
            rotate: AtomicUsize::new(0),
            runtime: tokio::runtime::Handle::current(),
            poller: poller.clone(),
        });
        poller.serve(Arc::downgrade(&inner));
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
        Ok(Dns { inner })
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
        let mut s = i.servers.lock().unwrap();
        let Some(ns) = netns.filter(|_| serve) else {
            s.leave(&id);
            return files;
        };
        let inode = crate::netlink::netns::inode(&ns);
        let key = s.key_of.get(&id).copied();
        if key.is_some_and(|k| s.listeners.get(&k).is_some_and(|l| l.netns_inode == inode)) {
            return files; // served where it is
        }
        s.leave(&id);
        // Another record of the same namespace already has a server there: join it.
        if let Some(&k) = inode.and_then(|n| s.by_netns.get(&n)) {
            Arc::make_mut(s.members.entry(k).or_default()).push(id.clone());
            s.key_of.insert(id, k);
            return files;
        }
        s.next_key += 1;
        let k = s.next_key;
        match server::start(i, k, &ns) {
            Ok(l) => {
                if let Some(n) = l.netns_inode {
                    s.by_netns.insert(n, k);
                }
                s.listeners.insert(k, l);
                s.members.insert(k, Arc::new(vec![id.clone()]));
                s.key_of.insert(id, k);
            }
            Err(e) => warn!("container {}: no embedded DNS: {e:#}", &id[..12]),
        }
        files
    }

    /// One service's names (`NAME` → VIP or task addresses, `tasks.NAME` → task addresses)
    /// per network: `old` (network id, name) pairs stop resolving, `new` ones resolve for
    /// containers on that network only.
    pub fn replace_service_names(&self, old: &[(String, String)], new: Vec<(String, String, Vec<Ipv4Addr>)>) {
        self.inner.table.write().unwrap().replace_service_names(old, new);
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
        self.inner.servers.lock().unwrap().leave(id);
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

    /// The containers server `key` answers for (one, unless a runtime gave their namespace
    /// several interfaces).
    fn members(&self, key: u64) -> Arc<Vec<String>> {
        self.servers.lock().unwrap().members.get(&key).cloned().unwrap_or_default()
    }

    /// Where server `key`'s forwarded queries go: its containers' `--dns` servers, else the
    /// host's.
    fn upstreams(&self, key: u64) -> Vec<IpAddr> {
        let ids = self.members(key);
        let table = self.table.read().unwrap();
        let views: Vec<&ContainerView> = ids.iter().filter_map(|id| table.get(id)).collect();
        // A container only on internal networks has no way out: its queries for other names
        // are not forwarded either (Docker 26 and later), and get SERVFAIL.
        let endpoints = || views.iter().flat_map(|c| &c.endpoints);
        if endpoints().next().is_some() && endpoints().all(|e| e.internal) {
            return vec![];
        }
        let own = views.iter().map(|c| &c.dns).find(|d| !d.is_empty()).cloned().unwrap_or_default();
        drop(table);
        if own.is_empty() { self.host.read().unwrap().1.nameservers.clone() } else { own }
    }

    /// Decides about one query to server `key`.
    fn handle(&self, key: u64, q: &[u8], tcp: bool) -> message::Outcome {
        let ids = self.members(key);
        let table = self.table.read().unwrap();
        let asker = Asker { table: &table, ids: &ids };
        let rotate = self.rotate.fetch_add(1, Ordering::Relaxed);
        message::handle(q, tcp, &asker, rotate, TTL)
    }
}

/// Who asks: the containers of one namespace; the first that knows a name answers.
struct Asker<'a> {
    table: &'a names::Table,
    ids: &'a [String],
}

impl message::Names for Asker<'_> {
    fn resolve(&self, qname: &str) -> Option<Vec<Ipv4Addr>> {
        self.ids.iter().find_map(|id| self.table.resolve(id, qname)).map(<[_]>::to_vec)
    }
    fn reverse(&self, ip: Ipv4Addr) -> Option<String> {
        self.ids.iter().find_map(|id| self.table.reverse(id, ip)).map(str::to_string)
    }
}
