//! The daemon's control plane: every request goes CLI → API → here → state (persisted) →
//! driver → datapath. One module per resource; this one only wires them together.
//!
//! Concurrency: requests run in parallel. What is serialised, and why:
//! - the in-memory [`State`] sits behind a mutex held only for lookups and bookkeeping, never
//!   across kernel work or I/O: names, addresses and ports are reserved under it, so two
//!   requests cannot take the same one;
//! - each container and network has its own async lock ([`locks::KeyedLocks`]), held for a
//!   whole operation on it: two operations on one object run one after the other, operations
//!   on different objects do not wait for each other;
//! - the datapath's map handles sit behind a mutex held for single map updates (microseconds).
//!
//! Crash safety: an object is written to disk in phase `Creating` before the kernel is
//! changed for it and `Removing` before it is torn down, so after a crash [`reconcile`]
//! knows what to undo or finish (see `state`).

mod attachments;
mod cluster_services;
mod containers;
pub mod crash;
mod dns;
pub mod docker;
mod exits;
mod firewall;
mod flows;
mod host;
mod locks;
pub mod metrics;
mod networks;
mod overlay;
pub mod process;
mod reaper;
mod reconcile;
mod services;
mod spares;
pub mod spawner;
mod view;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;
use tokio::sync::watch;
use tracing::info;

use crate::datapath::Datapath;
use crate::error::{Error, Result};
use crate::netlink::Netlink;
use crate::state::store::Op;
use crate::state::{State, Store};

/// The default bridge network, as in Docker.
pub const DEFAULT_BRIDGE: &str = "netpath0";
const DEFAULT_SUBNET: &str = "172.17.0.0/16";

#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub bpffs: PathBuf,
    /// Uplinks named on the command line; empty means every interface that is not netpath's.
    pub uplinks: Vec<String>,
    /// On SIGTERM, stop every container's process and detach the datapath.
    pub shutdown_containers: bool,
    /// The host's resolver configuration: upstreams of the embedded DNS server.
    pub resolv_conf: PathBuf,
    /// Where to serve Prometheus metrics (off when None).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Load this eBPF object instead of the embedded one (development, upgrade tests).
    pub ebpf_object: Option<PathBuf>,
    /// Where to serve Docker's network and IPAM plugin API (off when None).
    pub docker_plugin_socket: Option<PathBuf>,
    /// Known flows take the kernel's forwarding path, so the host's FORWARD rules see them.
    pub keep_host_firewall: bool,
    /// `--xdp`: XDP on the uplinks ahead of TC.
    pub xdp: crate::datapath::XdpSetting,
    /// `--cluster-store`: multi-host through etcd (None: single host, as before).
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

pub struct Daemon {
    cfg: Config,
    store: Arc<Store>,
    state: Mutex<State>,
    locks: locks::KeyedLocks,
    nl: Netlink,
    datapath: Mutex<Datapath>,
    /// The container programs' links, changed without the datapath's lock.
    links: crate::datapath::EndpointLinks,
    host: host::Host,
    dns: crate::dns::Dns,
    /// The conntrack table, scanned without the datapath lock (expiry, flushes, counts).
    ct_table: Arc<crate::datapath::FlowTable>,
    /// Deletes removed containers' veths and namespaces in the background.
    reaper: reaper::Reaper,
    /// Network namespaces made ahead for new containers.
    spares: spares::Spares,
    /// Starts container supervisors without copying the daemon's descriptor table.
    spawner: Arc<spawner::Spawner>,
    /// Where `rm` and `disconnect` ask for a container address's flows to be flushed.
    flusher: tokio::sync::mpsc::UnboundedSender<FlushRequest>,
    /// False until the first reconcile is done; changes wait for it, reads do not.
    ready: watch::Sender<bool>,
    /// How long the first reconcile took (ms), once it is done.
    reconcile_ms: std::sync::atomic::AtomicU64,
    api_latency: metrics::ApiLatency,
    flows: flows::FlowEvents,
    /// What the datapath holds for services; one sync of it at a time.
    services: services::ServicesState,
    /// Wakes the services' sync (a task container is going).
    services_kick: tokio::sync::Notify,
    /// Task containers failing their service's TCP health check.
    svc_unhealthy: Mutex<std::collections::HashSet<String>>,
    /// What the datapath holds for the firewall.
    firewall: firewall::Firewall,
    /// The cluster store, with `--cluster-store`.
    cluster: Option<Arc<crate::cluster::Cluster>>,
    /// The overlay maps and VXLAN device (None: an eBPF object from before overlays).
    overlay_dp: Option<crate::datapath::Overlay>,
}

pub type Shared = Arc<Daemon>;

pub use crate::laps::Laps;

fn valid_name(kind: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(bad_request!(
            "invalid {kind} name {name:?}: use letters, digits, '_', '.', '-' (starting with a letter or digit, at most 64)"
        ))
    }
}

fn parse_ip(what: &str, s: &str) -> Result<Ipv4Addr> {
    s.parse().map_err(|_| bad_request!("invalid {what} {s:?}: expected an IPv4 address"))
}

/// Every object of the state, as the store holds them.
fn load_state(store: &Store) -> anyhow::Result<State> {
    let t = std::time::Instant::now();
    let o = store.load_all()?;
    tracing::debug!("read {} containers in {:.1} ms", o.containers.len(), t.elapsed().as_secs_f64() * 1e3);
    let mut state = State::from_objects(o.networks, o.containers);
    for s in o.services {
        state.put_service(s);
    }
    for r in o.rules {
        state.put_rule(r);
    }
    Ok(state)
}

/// What the API answers from the state alone while the datapath still loads: `ps`. A
/// restart answers it in the time it takes to read the state, not in the time the kernel
/// takes to verify the programs and take over ten thousand links.
pub struct EarlyView {
    rows: Arc<Vec<view::PsRow>>,
}

impl EarlyView {
    pub(crate) fn of(state: &State, store: &Store) -> Self {
        Self { rows: Arc::new(view::ps_rows(state, store)) }
    }

    /// `ps`, as [`Daemon::list_containers`] answers it.
    pub async fn list_containers(&self, all: bool) -> Vec<u8> {
        let rows = self.rows.clone();
        tokio::task::spawn_blocking(move || view::ps_json(&rows, all)).await.unwrap_or_else(|_| b"[]".to_vec())
    }
}

/// Brings up `lo` in a namespace (it is always ifindex 1).
async fn lo_up(path: &Path) -> anyhow::Result<()> {
    Netlink::in_netns(path)?.set_up(1).await.context("bringing up lo")
}

impl Daemon {
    /// Opens the state and loads the datapath. `early` gets the state's [`EarlyView`] as soon
    /// as it is read, while the datapath is still loading. The kernel is brought in line with
    /// the state by [`Daemon::reconcile`], which the caller runs while the API already answers.
    pub async fn start(cfg: &Config, early: impl FnOnce(EarlyView)) -> anyhow::Result<Shared> {
        let mut laps = Laps::new();
        raise_fd_limit();
        let store = Store::open(&cfg.state_dir)?;
        crate::netlink::netns::own_dir_mount(&store.netns_dir())?;
        // Without it (a bind mount the kernel refuses, say where the state dir propagates to an
        // older mount namespace) container processes copy the host's mounts instead: slower
        // with many containers, the same otherwise.
        if let Err(e) = process::make_mount_template(&store.mount_template(), &store.netns_dir()) {
            tracing::warn!("no template mount namespace, container starts copy the host's: {e:#}");
        }
        // Before the daemon opens the descriptors that grow with its containers.
        let spawner = Arc::new(spawner::Spawner::start());
        // Reading every object (3 ms per 1,000 containers from a clean stop's snapshot, ~40
        // from their files after a crash) and verifying the programs are the two long steps
        // before the daemon is up, and independent: side by side.
        let store = Arc::new(store);
        let loading = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || load_state(&store))
        };
        let nl = Netlink::current()?;
        for up in &cfg.uplinks {
            nl.link_index(up).await?.with_context(|| format!("--uplink {up}: no such interface"))?;
        }
        let object = match &cfg.ebpf_object {
            Some(p) => Some(std::fs::read(p).with_context(|| format!("reading eBPF object {}", p.display()))?),
            None => None,
        };
        let opts = crate::datapath::LoadOptions { object, ..Default::default() };
        let bpffs = cfg.bpffs.clone();
        let dp_loading = tokio::task::spawn_blocking(move || {
            Datapath::load_with(&bpffs, opts).with_context(|| format!("loading datapath (pins in {})", bpffs.display()))
        });
        laps.lap("netlink");
        let state = match loading.await.context("loading the state").and_then(|r| r) {
            Ok(s) => s,
            Err(e) => {
                // Not killed half-way through moving maps and links by the exit that follows.
                let _ = dp_loading.await;
                return Err(e);
            }
        };
        laps.lap("state");
        early(EarlyView::of(&state, &store));
        laps.lap("early");
        let mut datapath = dp_loading.await.context("loading the datapath")??;
        laps.lap("datapath");
        datapath.set_xdp(cfg.xdp);
        // Nobody follows flow events yet (a daemon that died may have left them on). An object
        // from before flow events (--ebpf-object) runs without them.
        let events = match datapath.set_flow_events(false).and_then(|_| datapath.flow_events()) {
            Ok(ring) => Some(ring),
            Err(e) => {
                tracing::warn!("flow events unavailable with this eBPF object: {e:#}");
                None
            }
        };
        // Published-port and masqueraded traffic is routed by the host between uplink and bridges.
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("enabling IPv4 forwarding")?;
        let dns = crate::dns::Dns::new(&store.dir().join("containers"), &cfg.resolv_conf)?;
        let ct_table = Arc::new(datapath.flow_table()?);
        let overlay_dp = match datapath.overlay() {
            Ok(o) => Some(o),
            Err(e) => {
                tracing::warn!("no overlay datapath in this eBPF object: {e:#}");
                None
            }
        };
        let links = crate::datapath::EndpointLinks::new(&datapath);
        let (reaper, remains) = reaper::Reaper::new()?;
        let d = Arc::new(Self {
            reaper,
            spares: Default::default(),
            spawner,
            flusher: spawn_flusher(ct_table.clone()),
            links,
            ct_table,
            host: host::Host::new(cfg),
            dns,
            cfg: cfg.clone(),
            store,
            state: Mutex::new(state),
            locks: locks::KeyedLocks::default(),
            nl,
            datapath: Mutex::new(datapath),
            ready: watch::channel(false).0,
            reconcile_ms: Default::default(),
            api_latency: Default::default(),
            flows: flows::FlowEvents::new(events.is_some()),
            services: Default::default(),
            services_kick: Default::default(),
            svc_unhealthy: Default::default(),
            firewall: Default::default(),
            cluster: cfg.cluster.clone().map(crate::cluster::Cluster::new),
            overlay_dp,
        });
        d.firewall_preload();
        // An object from before the switch has the fast paths only: fine unless asked for.
        if let Err(e) = d.dp().set_keep_host_firewall(cfg.keep_host_firewall) {
            anyhow::ensure!(!cfg.keep_host_firewall, "--keep-host-firewall: {e:#}");
        }
        tokio::spawn(d.clone().run_reaper(remains));
        tokio::spawn(d.clone().watch_services());
        tokio::spawn(d.clone().watch_health());
        if let Some(ring) = events {
            tokio::spawn(d.clone().read_flow_events(ring));
        }
        laps.lap("daemon");
        d.attach_sockets(&cfg.state_dir)?;
        d.ensure_builtin_networks()?;
        laps.lap("sockets");
        tracing::debug!("start phases (ms): {laps}");
        Ok(d)
    }

    /// Makes the kernel match the state after a (re)start, then lets changes through.
    pub async fn reconcile(self: &Arc<Self>) {
        let t = std::time::Instant::now();
        reconcile::run(self).await;
        self.firewall_changed().await; // the rules again, stale entries out
        let dns = std::time::Instant::now();
        self.dns_reconcile(); // serve every container's names and 127.0.0.11 again
        info!("embedded DNS serves every container again ({} ms)", dns.elapsed().as_millis());
        if let Err(e) = self.refresh_host().await {
            tracing::warn!("refreshing host interfaces: {e:#}");
        }
        // The VXLAN device's program is claimed before the release below would drop it.
        self.reconcile_vxlan().await;
        // Programs a former state attached (and this one no longer wants) stop now.
        self.dp().release_unclaimed();
        let ms = t.elapsed().as_millis() as u64;
        // Reconcile's short-lived threads (one per namespace it entered) leave freed memory
        // in malloc's per-thread arenas: give it back.
        trim_memory();
        tokio::spawn(trim_memory_every(std::time::Duration::from_secs(10)));
        self.reconcile_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
        self.ready.send_replace(true);
        self.start_cluster(); // after reconcile: the state says what this node owns
        tokio::spawn(self.clone().keep_spares());
        let n = self.state().container_count();
        info!("reconciled {n} containers in {ms} ms");
    }

    /// Leaves the whole state in one file for the next start to read (see [`Store`]). Called
    /// once the API has stopped. It takes the state lock inside the store's exclusive hold:
    /// nothing may write an object while holding the state lock meanwhile (only
    /// `ensure_builtin_networks` does, at start).
    pub fn save_snapshot(&self) {
        let t = std::time::Instant::now();
        let saved = self.store.save_snapshot(|| {
            let st = self.state();
            let objects = crate::state::store::ObjectsRef {
                networks: st.networks().collect(),
                containers: st.containers().collect(),
                services: st.services().collect(),
                rules: st.rules().collect(),
            };
            Ok(serde_json::to_vec(&objects)?)
        });
        match saved {
            Ok(()) => tracing::debug!("state snapshot written in {} ms", t.elapsed().as_millis()),
            Err(e) => tracing::warn!("no state snapshot, the next start reads every object's file: {e:#}"),
        }
    }

    /// Waits until the first reconcile is done: changes must not race it.
    async fn wait_ready(&self) {
        let mut rx = self.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn dp(&self) -> MutexGuard<'_, Datapath> {
        self.datapath.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes a container's current record (or its removal) to disk. Callers hold the
    /// container's lock, which orders the writes of one container.
    async fn persist_container(&self, id: &str) -> Result<()> {
        let (rec, rev) = {
            let mut st = self.state();
            let rev = st.next_rev();
            (st.container_by_id(id).cloned(), rev)
        };
        let (store_id, store) = (id.to_string(), self.store.clone());
        spawn_io(move || match &rec {
            Some(c) => store.write_container(&store_id, Op::Save(c), rev),
            None => store.write_container(&store_id, Op::Delete, rev),
        })
        .await
    }

    /// The same for a network.
    async fn persist_network(&self, id: &str) -> Result<()> {
        let (rec, rev) = {
            let mut st = self.state();
            let rev = st.next_rev();
            (st.network_by_id(id).cloned(), rev)
        };
        let (store_id, store) = (id.to_string(), self.store.clone());
        spawn_io(move || match &rec {
            Some(n) => store.write_network(&store_id, Op::Save(n), rev),
            None => store.write_network(&store_id, Op::Delete, rev),
        })
        .await
    }
}

/// The task that flushes removed containers' flows: it takes every request waiting, scans the
/// conntrack table once for all of them (off the async workers), then answers them all. Twenty
/// concurrent `rm` cost one scan, not twenty.
fn spawn_flusher(flows: Arc<crate::datapath::FlowTable>) -> tokio::sync::mpsc::UnboundedSender<FlushRequest> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<FlushRequest>();
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            let addrs: std::collections::HashSet<u32> =
                batch.iter().map(|(ip, _)| crate::datapath::wire_addr(*ip)).collect();
            let f = flows.clone();
            let t = std::time::Instant::now();
            let n = addrs.len();
            let gone = match tokio::task::spawn_blocking(move || f.flush(&addrs)).await {
                Ok(Ok(gone)) => {
                    tracing::debug!(
                        "flushed {} flow entries of {n} addresses in {:.1} ms",
                        gone.len(),
                        t.elapsed().as_secs_f64() * 1000.0
                    );
                    gone
                }
                Ok(Err(e)) => {
                    tracing::warn!("flushing flows: {e:#}");
                    vec![]
                }
                Err(e) => {
                    tracing::warn!("flushing flows: {e}");
                    vec![]
                }
            };
            let gone = Arc::new(gone);
            for (_, done) in batch {
                let _ = done.send(gone.clone());
            }
        }
    });
    tx
}

/// A container address whose flows must go, and where to say they went (with what went).
type FlushRequest =
    (std::net::Ipv4Addr, tokio::sync::oneshot::Sender<Arc<Vec<(netpath_common::Tuple, netpath_common::CtEntry)>>>);

/// Every container on a user-defined network costs the daemon two descriptors (its DNS
/// sockets): raise the open-file limit as far as the kernel allows (fs.nr_open), or at least
/// the soft limit to the hard one, as Docker's unit does with LimitNOFILE.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let max = std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse::<u64>().ok());
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
    let want = max.unwrap_or(hard).max(hard);
    if setrlimit(Resource::RLIMIT_NOFILE, want, want).is_err() && soft < hard {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    if let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) {
        tracing::debug!("open-file limit {soft}");
    }
}

/// The glibc tunable that turns malloc's per-thread caches (tcache) off.
const NO_TCACHE: &str = "glibc.malloc.tcache_count=0";
/// Set only across the daemon's re-exec in [`without_thread_caches`]: the GLIBC_TUNABLES
/// its caller gave (empty: none), put back once glibc has read the new one.
const CALLERS_TUNABLES: &str = "NETPATH_CALLERS_GLIBC_TUNABLES";

/// GLIBC_TUNABLES with the thread caches off, or None where the caller chose a tcache_count
/// of their own (theirs stands).
fn tunables_without_tcache(current: Option<&str>) -> Option<String> {
    match current.filter(|t| !t.is_empty()) {
        Some(t) if t.split(':').any(|kv| kv.starts_with("glibc.malloc.tcache_count=")) => None,
        Some(t) => Some(format!("{t}:{NO_TCACHE}")),
        None => Some(NO_TCACHE.to_string()),
    }
}

/// Turns glibc's per-thread malloc caches off for the daemon: it re-executes itself (same
/// pid, same arguments) with GLIBC_TUNABLES saying so, the only way to set them, and puts the
/// caller's GLIBC_TUNABLES back right after, so the containers it starts never see it. Each
/// long-lived thread (the runtime's workers, one per netlink socket) keeps up to 7 freed
/// chunks of each of 64 sizes in its tcache, counted as in use, out of malloc_trim's reach:
/// 2,000 run/rm cycles left 1.4 MB there (RSS +3 MiB, still there after the trim), and with
/// the caches off 35 kB (RSS +0.1 MiB), at the same cycle time. Must run before any thread.
pub fn without_thread_caches() {
    use std::os::unix::process::CommandExt;
    if let Some(callers) = std::env::var_os(CALLERS_TUNABLES) {
        // SAFETY: the re-executed daemon, before it starts any thread.
        unsafe {
            std::env::remove_var(CALLERS_TUNABLES);
            if callers.is_empty() {
                std::env::remove_var("GLIBC_TUNABLES");
            } else {
                std::env::set_var("GLIBC_TUNABLES", callers);
            }
        }
        return;
    }
    let current = std::env::var("GLIBC_TUNABLES").ok();
    let Some(tunables) = tunables_without_tcache(current.as_deref()) else { return };
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_default();
    let e = std::process::Command::new("/proc/self/exe")
        .arg0(arg0)
        .args(args)
        .env("GLIBC_TUNABLES", tunables)
        .env(CALLERS_TUNABLES, current.unwrap_or_default())
        .exec();
    // Only if the exec failed: run with the caches, as before.
    eprintln!("netpath: re-executing without malloc's thread caches failed: {e}; running with them");
}

/// glibc gives each new thread an arena of its own (up to 8 per CPU) and keeps what they
/// free: with a thread per namespace the daemon enters, that is most of its memory. Two
/// arenas are plenty for a daemon whose threads mostly wait for the kernel.
///
/// The trim threshold is fixed at glibc's initial 128 KiB: left dynamic, it becomes twice the
/// largest mmap'd block freed (the daemon maps 17 MB at once while it loads), and the second
/// arena's free top, which malloc_trim leaves alone (it shrinks only the main arena's), was
/// not given back: 10,000 run/rm cycles left 1.2 MB free but resident there (RSS +1.4 MiB);
/// fixed, RSS +0.16 MiB at the same cycle time.
pub fn limit_arenas() {
    // SAFETY: plain libc calls, before the daemon's threads allocate much.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
    }
}

/// Returns memory malloc holds but no longer uses to the kernel.
pub(crate) fn trim_memory() {
    // SAFETY: plain libc call.
    unsafe { libc::malloc_trim(0) };
}

/// Trims every `period`: what follows a restart (every container's first statistics, DNS
/// servers, service syncs) and any burst of requests leaves freed memory in malloc's arenas
/// that it keeps otherwise. With 1,000 containers a restarted daemon held 28 MiB of anonymous
/// memory; trimmed, 10 MiB (less than before the restart). A trim costs well under a
/// millisecond at these heap sizes.
async fn trim_memory_every(period: std::time::Duration) {
    loop {
        tokio::time::sleep(period).await;
        trim_memory();
    }
}

/// Runs blocking file I/O (fsync) off the async workers, which stay free for other requests.
async fn spawn_io(f: impl FnOnce() -> anyhow::Result<()> + Send + 'static) -> Result<()> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(anyhow::anyhow!("state writer failed: {e}")))?
        .map_err(Error::Internal)
}

impl Daemon {
    /// `--shutdown-containers`: stops every container's process and takes the datapath off
    /// every interface, so nothing of netpath acts while no daemon runs.
    pub async fn shutdown_containers(self: &Arc<Self>) {
        self.stop_all().await;
        self.dp().detach_all();
    }

    /// `netpath system info`: whether the first reconcile is done, what the daemon holds.
    pub fn status(&self) -> serde_json::Value {
        let ready = *self.ready.borrow();
        let (networks, containers) = {
            let st = self.state();
            (st.networks().count(), st.container_count())
        };
        serde_json::json!({
            "Ready": ready,
            "ReconcileMs": ready.then(|| self.reconcile_ms.load(std::sync::atomic::Ordering::Relaxed)),
            "Networks": networks,
            "Containers": containers,
            // Removed containers whose veths and namespace are still being deleted.
            "PendingRemovals": self.reaper.pending(),
            "Uplinks": self.uplinks(),
            "StateDir": self.cfg.state_dir,
            "Bpffs": self.cfg.bpffs,
            "Version": env!("CARGO_PKG_VERSION"),
            "Cluster": self.cluster_status(),
        })
    }

    /// The build id of the eBPF object the datapath runs.
    pub fn datapath_object_id(&self) -> String {
        self.dp().object_id().to_string()
    }

    /// Datapath-wide counters (drops by reason, conntrack).
    pub fn datapath_counters(&self) -> Result<crate::datapath::Counters> {
        let mut c = self.dp().counters()?;
        c.ct_entries = self.ct_table.len()?;
        Ok(c)
    }

    /// Forgets the flows of a container address that is going away, before the address can
    /// be handed out again. Flushes asked for at once share one scan of the table.
    pub(crate) async fn flush_flows(&self, ip: std::net::Ipv4Addr) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.flusher.send((ip, tx)).is_ok()
            && let Ok(gone) = rx.await
        {
            // Followers see them end (each requester reports its own address's flows).
            let a = crate::datapath::wire_addr(ip);
            let mine: Vec<_> = gone
                .iter()
                .filter(|(k, e)| [k.saddr, k.daddr, e.xlate.saddr, e.xlate.daddr].contains(&a))
                .copied()
                .collect();
            self.flows_expired(&mine);
        }
    }

    /// The NAT table as JSON, for diagnostics and tests.
    pub fn flows(&self) -> Result<serde_json::Value> {
        let v = self.dp().flows()?;
        Ok(serde_json::Value::Array(v.iter().map(|(k, e)| view::flow_json(k, e)).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_caches_go_off_unless_the_caller_chose_a_tcache_count() {
        assert_eq!(tunables_without_tcache(None).as_deref(), Some(NO_TCACHE));
        assert_eq!(tunables_without_tcache(Some("")).as_deref(), Some(NO_TCACHE));
        // The caller's other tunables stay, ours goes after them.
        assert_eq!(
            tunables_without_tcache(Some("glibc.malloc.arena_max=1")).as_deref(),
            Some("glibc.malloc.arena_max=1:glibc.malloc.tcache_count=0")
        );
        // A count of their own (even the default) is theirs to keep: no re-exec.
        assert_eq!(tunables_without_tcache(Some("glibc.malloc.tcache_count=7")), None);
        assert_eq!(tunables_without_tcache(Some("glibc.malloc.arena_max=1:glibc.malloc.tcache_count=2")), None);
        // Another tunable whose name merely contains ours does not count.
        assert!(tunables_without_tcache(Some("glibc.malloc.tcache_max=64")).is_some());
    }
}
