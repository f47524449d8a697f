//! The cluster store: multi-host state in etcd (v3 API). Absent (`--cluster-store` not given),
//! the daemon is single-host on its embedded state, exactly as without this module.
//!
//! # Liveness
//! Each daemon holds one etcd lease of [`LEASE_TTL_SECS`] (5 s) and keeps it alive every
//! second. Everything that only holds while the node lives is put under that lease: its
//! `nodes/` key and its endpoint records. A node that dies (daemon killed, namespace gone,
//! host down) stops renewing, and etcd deletes those keys within 5 s; the other daemons see
//! the deletions on their watch. 5 s: short enough that a dead node's endpoints go "in
//! seconds", long enough that a daemon busy for a second or two (a reconcile of thousands of
//! containers on 2 shared CPUs) does not lose its lease.
//!
//! Address claims are not under the lease: a node that is down may still run its containers
//! (a daemon stopped, a partition) and come back with them, so their addresses stay taken
//! until the node itself gives them back (`rm`, or its next session deleting claims it no
//! longer owns) or the network goes. Under the lease, a container started elsewhere meanwhile
//! could get the same address (Docker, likewise, keeps a down node's addresses in its Raft
//! store).
//!
//! # Key layout (all under [`PREFIX`] = `/netpath/v1/`; values are JSON)
//! | key                                  | value               | lease | written by              |
//! |--------------------------------------|---------------------|-------|-------------------------|
//! | `node-info/<node>`                   | [`NodeRecord`]      | no    | the node, on join       |
//! | `nodes/<node>`                       | [`NodeRecord`]      | yes   | the node (alive marker) |
//! | `networks/<network-id>`              | [`OverlayNetwork`]  | no    | `network create` (any)  |
//! | `networks-serial`                    | counter             | no    | every network create/rm |
//! | `ipam/<network-id>/<ipv4>`           | [`IpClaim`]         | no    | the node that claims it |
//! | `endpoints/<network-id>/<container-id>` | [`EndpointRecord`] | yes | the container's node   |
//!
//! | `services/<service-id>`              | [`ServiceRecord`]   | no    | `service create` (any)  |
//! | `services-serial`                    | counter             | no    | every service create/rm |
//! | `tasks/<service-id>/<slot>`          | [`TaskRecord`]      | no    | any node's scheduler    |
//!
//! A service's VIPs are claims like containers' addresses (`ipam/<net>/<vip>`, holder
//! `service:<id>`), but without lease: they live as long as the service. A task's placement
//! has no lease either: when its node's `nodes/` key goes, the schedulers move it (a
//! compare-and-swap on the task key, so two schedulers never place one task twice). A
//! running task is a container like any other: its endpoint record (under its node's lease)
//! says where it is. Reserved: `ingress/` for the routing mesh.
//!
//! # Consistency
//! - An address is claimed with a transaction that puts `ipam/<net>/<ip>` only if the key does
//!   not exist (create_revision = 0): of two nodes claiming one address at once, exactly one
//!   wins; the loser tries the next free one. No address is ever handed out twice.
//! - Network create and remove compare `networks-serial`'s mod revision with the one their
//!   checks read: names, subnets and VNIs are checked against one consistent snapshot, and a
//!   concurrent create on another node makes the transaction fail (and the request retry).
//! - Every daemon keeps a full copy of the prefix ([`Snapshot`]), loaded with one range read
//!   and followed by a watch from the revision after it. After any error (etcd down, lease
//!   expired, watch cancelled or compacted) the session ends and a new one re-reads
//!   everything: the daemon resyncs against a complete snapshot, never a diff it missed.
//! - What this node owns (its claims and endpoint records, [`Owned`]) is also kept locally
//!   and put again at the start of every session: a node whose lease expired while etcd was
//!   away gets its endpoint records back, and keys of its own it no longer has are deleted.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{Context, bail};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

pub const PREFIX: &str = "/netpath/v1/";
/// The lease TTL: a dead node's keys are gone from etcd at most this long after its last
/// keep-alive (see the module docs for why 5 s).
pub const LEASE_TTL_SECS: i64 = 5;
const KEEPALIVE_EVERY: Duration = Duration::from_secs(1);
/// Every single etcd request gives up after this: a change that needs the cluster fails
/// rather than hanging while etcd is away.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// The whole of joining (connect, lease, register, re-put, read, watch).
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// VNIs of overlay networks: 4096 + n, as Docker swarm; at most 24 bits.
pub const FIRST_VNI: u32 = 4096;
pub const MAX_VNI: u32 = (1 << 24) - 1;

/// `--cluster-store etcd://HOST:PORT[,HOST:PORT...]` → the endpoints etcd-client takes.
pub fn parse_store_url(s: &str) -> anyhow::Result<Vec<String>> {
    let rest = s
        .strip_prefix("etcd://")
        .with_context(|| format!("invalid --cluster-store {s:?}: use etcd://HOST:PORT[,HOST:PORT...]"))?;
    let mut out = vec![];
    for hp in rest.split(',') {
        let hp = hp.trim().trim_end_matches('/');
        let ok = hp.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !ok {
            bail!("invalid --cluster-store {s:?}: {hp:?} is not HOST:PORT");
        }
        out.push(format!("http://{hp}"));
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeRecord {
    pub name: String,
    /// The underlay address: where VXLAN packets for this node's containers go.
    pub addr: Ipv4Addr,
    /// When this daemon joined (seconds since the epoch).
    pub joined: u64,
    pub version: String,
}

/// An overlay network as every node sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OverlayNetwork {
    pub id: String,
    pub name: String,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    #[serde(default)]
    pub ip_range: Option<Ipv4Net>,
    pub vni: u32,
    #[serde(default)]
    pub attachable: bool,
    #[serde(default)]
    pub internal: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub aux_addresses: BTreeMap<String, Ipv4Addr>,
    pub created: u64,
    /// The node whose `network create` made it.
    pub creator: String,
}

/// Who holds an overlay address.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IpClaim {
    pub node: String,
    pub container_id: String,
}

/// A container's endpoint on an overlay network, as the other nodes need it: where to send
/// its packets (node address, MAC) and the names it answers to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointRecord {
    pub network_id: String,
    pub container_id: String,
    pub container: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    pub node: String,
    pub node_ip: Ipv4Addr,
}

/// A service across nodes: its replicas run as tasks `NAME.<slot>` placed on the nodes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceRecord {
    pub id: String,
    pub name: String,
    /// (overlay network id, VIP on it; 0.0.0.0 with dnsrr).
    pub vips: Vec<(String, Ipv4Addr)>,
    pub replicas: u32,
    pub cmd: Vec<String>,
    pub endpoint_mode: String,
    pub created: u64,
    /// Published ports (`mode=host` only so far: the routing mesh is not there yet).
    #[serde(default)]
    pub ports: Vec<crate::state::ServicePort>,
}

/// Where a task (a service's slot) runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TaskRecord {
    pub node: String,
}

/// A key of the layout, parsed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    NodeInfo(String),
    Node(String),
    Network(String),
    Claim(String, Ipv4Addr),
    Endpoint(String, String),
    Service(String),
    Task(String, u32),
    Other,
}

impl Key {
    pub fn parse(k: &[u8]) -> Key {
        let Some(rest) = std::str::from_utf8(k).ok().and_then(|s| s.strip_prefix(PREFIX)) else {
            return Key::Other;
        };
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["node-info", n] => Key::NodeInfo(n.to_string()),
            ["nodes", n] => Key::Node(n.to_string()),
            ["networks", id] => Key::Network(id.to_string()),
            ["ipam", net, ip] => ip.parse().map_or(Key::Other, |ip| Key::Claim(net.to_string(), ip)),
            ["endpoints", net, c] => Key::Endpoint(net.to_string(), c.to_string()),
            ["services", id] => Key::Service(id.to_string()),
            ["tasks", id, slot] => slot.parse().map_or(Key::Other, |s| Key::Task(id.to_string(), s)),
            _ => Key::Other,
        }
    }

    pub fn path(&self) -> String {
        match self {
            Key::NodeInfo(n) => format!("{PREFIX}node-info/{n}"),
            Key::Node(n) => format!("{PREFIX}nodes/{n}"),
            Key::Network(id) => format!("{PREFIX}networks/{id}"),
            Key::Claim(net, ip) => format!("{PREFIX}ipam/{net}/{ip}"),
            Key::Endpoint(net, c) => format!("{PREFIX}endpoints/{net}/{c}"),
            Key::Service(id) => format!("{PREFIX}services/{id}"),
            Key::Task(id, slot) => format!("{PREFIX}tasks/{id}/{slot}"),
            Key::Other => format!("{PREFIX}other"),
        }
    }
}

fn serial_key() -> String {
    format!("{PREFIX}networks-serial")
}

fn services_serial_key() -> String {
    format!("{PREFIX}services-serial")
}

/// Everything under the prefix, as this daemon last saw it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Every node that ever joined (`node-info/`).
    pub known_nodes: BTreeMap<String, NodeRecord>,
    /// Nodes whose lease is alive (`nodes/`).
    pub alive: BTreeMap<String, NodeRecord>,
    pub networks: BTreeMap<String, OverlayNetwork>,
    pub claims: BTreeMap<(String, Ipv4Addr), IpClaim>,
    pub endpoints: BTreeMap<(String, String), EndpointRecord>,
    pub services: BTreeMap<String, ServiceRecord>,
    /// (service id, slot) → (placement, its key's mod revision for compare-and-swap).
    pub tasks: BTreeMap<(String, u32), (TaskRecord, i64)>,
    /// The etcd revision this copy reflects.
    pub revision: i64,
    /// The mod revision of `networks-serial` (0: never written).
    pub serial_rev: i64,
    /// The same for `services-serial`.
    pub services_serial_rev: i64,
}

impl Snapshot {
    /// Applies one put (value) or delete (None). Values that do not parse are skipped with a
    /// warning: a newer daemon's record must not stop an older one.
    pub fn apply(&mut self, key: &[u8], value: Option<&[u8]>, mod_rev: i64) {
        fn parse<T: for<'de> Deserialize<'de>>(k: &[u8], v: &[u8]) -> Option<T> {
            serde_json::from_slice(v)
                .map_err(|e| warn!("cluster store: skipping {}: {e}", String::from_utf8_lossy(k)))
                .ok()
        }
        if key == serial_key().as_bytes() {
            self.serial_rev = if value.is_some() { mod_rev } else { 0 };
            return;
        }
        if key == services_serial_key().as_bytes() {
            self.services_serial_rev = if value.is_some() { mod_rev } else { 0 };
            return;
        }
        match (Key::parse(key), value) {
            (Key::NodeInfo(n), Some(v)) => {
                parse(key, v).map(|r| self.known_nodes.insert(n, r));
            }
            (Key::NodeInfo(n), None) => {
                self.known_nodes.remove(&n);
            }
            (Key::Node(n), Some(v)) => {
                parse(key, v).map(|r| self.alive.insert(n, r));
            }
            (Key::Node(n), None) => {
                self.alive.remove(&n);
            }
            (Key::Network(id), Some(v)) => {
                parse(key, v).map(|r| self.networks.insert(id, r));
            }
            (Key::Network(id), None) => {
                self.networks.remove(&id);
            }
            (Key::Claim(net, ip), Some(v)) => {
                parse(key, v).map(|r| self.claims.insert((net, ip), r));
            }
            (Key::Claim(net, ip), None) => {
                self.claims.remove(&(net, ip));
            }
            (Key::Endpoint(net, c), Some(v)) => {
                parse(key, v).map(|r| self.endpoints.insert((net, c), r));
            }
            (Key::Endpoint(net, c), None) => {
                self.endpoints.remove(&(net, c));
            }
            (Key::Service(id), Some(v)) => {
                parse(key, v).map(|r| self.services.insert(id, r));
            }
            (Key::Service(id), None) => {
                self.services.remove(&id);
            }
            (Key::Task(id, slot), Some(v)) => {
                parse(key, v).map(|r| self.tasks.insert((id, slot), (r, mod_rev)));
            }
            (Key::Task(id, slot), None) => {
                self.tasks.remove(&(id, slot));
            }
            (Key::Other, _) => {}
        }
    }

    pub fn network_by_name(&self, name: &str) -> Option<&OverlayNetwork> {
        self.networks.values().find(|n| n.name == name)
    }

    /// Addresses of `network_id` claimed by anyone.
    pub fn claimed<'a>(&'a self, network_id: &'a str) -> impl Iterator<Item = Ipv4Addr> + 'a {
        self.claims.keys().filter(move |(n, _)| n == network_id).map(|(_, ip)| *ip)
    }

    /// The lowest VNI no network uses.
    pub fn free_vni(&self) -> Option<u32> {
        let used: std::collections::BTreeSet<u32> = self.networks.values().map(|n| n.vni).collect();
        (FIRST_VNI..=MAX_VNI).find(|v| !used.contains(v))
    }
}

/// What this node has put under its lease, to put again in a new session.
#[derive(Debug, Default)]
struct Owned {
    claims: BTreeMap<(String, Ipv4Addr), IpClaim>,
    endpoints: BTreeMap<(String, String), EndpointRecord>,
}

/// One row of `node ls`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Addr")]
    pub addr: Ipv4Addr,
    /// `ready` while its lease lives, `down` after.
    #[serde(rename = "Status")]
    pub status: String,
    #[serde(rename = "Self")]
    pub this: bool,
    #[serde(rename = "Version")]
    pub version: String,
}

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub store: String,
    pub endpoints: Vec<String>,
    pub node_name: String,
    pub node_ip: Ipv4Addr,
    /// `--overlay-decap underlay`: VXLAN for this node's containers is decapsulated in TC on
    /// the underlay interface (`underlay_in`) instead of by the VXLAN device.
    pub underlay_decap: bool,
}

pub struct Cluster {
    cfg: ClusterConfig,
    client: RwLock<Option<Client>>,
    lease: AtomicI64,
    connected: AtomicBool,
    last_error: Mutex<String>,
    snapshot: RwLock<Arc<Snapshot>>,
    owned: Mutex<Owned>,
    /// Bumped after every change of the snapshot (and at each resync).
    changed: watch::Sender<u64>,
    /// The revision of this daemon's last write: a watched copy older than that does not
    /// have it yet, and must not undo what the write's caller already made of it.
    floor: AtomicI64,
}

/// A session's handles, once joined.
struct Joined {
    client: Client,
    lease: i64,
    /// The revision of the snapshot read.
    rev: i64,
    watch: etcd_client::WatchStream,
    keeper: etcd_client::LeaseKeeper,
    ka: etcd_client::LeaseKeepAliveStream,
}

/// A change that needs the cluster, while etcd cannot be reached.
pub fn unavailable(cfg: &ClusterConfig, why: &str) -> crate::error::Error {
    crate::error::Error::Unavailable(format!(
        "the cluster store {} is unreachable ({why}): changes that need the cluster (overlay networks and \
         their containers) fail until it is back; local containers keep working",
        cfg.store
    ))
}

impl Cluster {
    pub fn new(cfg: ClusterConfig) -> Arc<Cluster> {
        Arc::new(Cluster {
            cfg,
            client: RwLock::new(None),
            lease: AtomicI64::new(0),
            connected: AtomicBool::new(false),
            last_error: Mutex::new("not connected yet".into()),
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            owned: Mutex::new(Owned::default()),
            changed: watch::channel(0).0,
            floor: AtomicI64::new(0),
        })
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.cfg
    }

    pub fn node_name(&self) -> &str {
        &self.cfg.node_name
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// True when `snap` is at least as new as this daemon's own last write (see `floor`).
    pub fn current(&self, snap: &Snapshot) -> bool {
        snap.revision >= self.floor.load(Ordering::SeqCst)
    }

    /// A transaction; if it wrote, its revision becomes the floor. A failed compare wrote
    /// nothing a watched copy could undo, and its header names the store's newest revision
    /// (others' writes), which would only make fresh reads look stale.
    async fn txn(&self, client: &mut Client, txn: Txn) -> crate::error::Result<etcd_client::TxnResponse> {
        let resp = self.timed(client.txn(txn)).await?;
        if resp.succeeded()
            && let Some(h) = resp.header()
        {
            self.floor.fetch_max(h.revision(), Ordering::SeqCst);
        }
        Ok(resp)
    }

    /// The client of the current session, or the clear error a user gets while etcd is away.
    fn client_now(&self) -> crate::error::Result<Client> {
        let c = self.client.read().unwrap_or_else(|e| e.into_inner()).clone();
        match c {
            Some(c) if self.connected() => Ok(c),
            _ => Err(unavailable(&self.cfg, &self.last_error.lock().unwrap_or_else(|e| e.into_inner()))),
        }
    }

    /// [`Self::client_now`], waiting up to [`REQUEST_TIMEOUT`] for a session being set up
    /// (a reconnect after a blip must not fail the request that happens to come first).
    async fn client(&self) -> crate::error::Result<Client> {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        loop {
            if let Ok(c) = self.client_now() {
                return Ok(c);
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return self.client_now();
            }
        }
    }

    fn etcd_err(&self, e: impl std::fmt::Display) -> crate::error::Error {
        unavailable(&self.cfg, &e.to_string())
    }

    async fn timed<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> crate::error::Result<T> {
        match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.etcd_err(e)),
            Err(_) => Err(self.etcd_err(format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()))),
        }
    }

    /// `node ls`: every node that ever joined, alive or not.
    pub fn nodes(&self) -> Vec<NodeStatus> {
        let s = self.snapshot();
        let mut out: Vec<NodeStatus> = s
            .known_nodes
            .values()
            .map(|n| {
                let alive = s.alive.get(&n.name);
                NodeStatus {
                    name: n.name.clone(),
                    addr: alive.map_or(n.addr, |a| a.addr),
                    status: if alive.is_some() { "ready" } else { "down" }.into(),
                    this: n.name == self.cfg.node_name,
                    version: n.version.clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// `node rm`: forgets a node that is down for good (Docker's `node rm`): its record, the
    /// addresses its containers held (claims outlive the lease, see the module docs) and any
    /// endpoint records left. Refused for this node and for a live one; each transaction
    /// checks the node has not come back meanwhile.
    pub async fn remove_node(&self, name: &str) -> crate::error::Result<()> {
        use crate::error::Error;
        if name == self.cfg.node_name {
            return Err(Error::BadRequest(format!(
                "node {name} is this node: remove it from another node once it is down"
            )));
        }
        let mut client = self.client().await?;
        let snap = self.read_all(&mut client).await?;
        if !snap.known_nodes.contains_key(name) {
            return Err(Error::NotFound(format!("no such node: {name}")));
        }
        if snap.alive.contains_key(name) {
            return Err(Error::Conflict(format!("node {name} is up: stop its daemon first, then remove it")));
        }
        let mut keys: Vec<String> = snap
            .claims
            .iter()
            .filter(|(_, c)| c.node == name)
            .map(|((net, ip), _)| Key::Claim(net.clone(), *ip).path())
            .collect();
        keys.extend(
            snap.endpoints
                .iter()
                .filter(|(_, e)| e.node == name)
                .map(|((net, c), _)| Key::Endpoint(net.clone(), c.clone()).path()),
        );
        // The node record last: a failure half way leaves a node `node rm` can be run on again.
        keys.push(Key::NodeInfo(name.into()).path());
        let back = || Compare::create_revision(Key::Node(name.into()).path(), CompareOp::Equal, 0);
        // etcd takes at most 128 operations per transaction (its default --max-txn-ops).
        for chunk in keys.chunks(100) {
            let txn = Txn::new()
                .when([back()])
                .and_then(chunk.iter().map(|k| TxnOp::delete(k.as_str(), None)).collect::<Vec<_>>());
            if !self.txn(&mut client, txn).await?.succeeded() {
                return Err(Error::Conflict(format!("node {name} came back: not removed")));
            }
        }
        info!("cluster store: node {name} removed");
        Ok(())
    }

    /// Runs sessions forever: connect, register, resync, follow; after any failure wait a
    /// second and start again.
    pub async fn run(self: Arc<Self>) {
        loop {
            let e = self.session().await.unwrap_err();
            let was = self.connected.swap(false, Ordering::SeqCst);
            *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = format!("{e:#}");
            if was {
                warn!("cluster store {}: {e:#}; reconnecting", self.cfg.store);
            } else {
                tracing::debug!("cluster store {}: {e:#}", self.cfg.store);
            }
            tokio::time::sleep(RETRY_EVERY).await;
        }
    }

    async fn session(&self) -> anyhow::Result<std::convert::Infallible> {
        // Every step has its own timeout, but a request can also wait for a connection that
        // never comes (a channel stuck on an endpoint that went away): the whole join is
        // bounded, and a join that did not finish starts again with a new client.
        let Joined { client, lease, rev, mut watch, mut keeper, mut ka } =
            tokio::time::timeout(JOIN_TIMEOUT, self.join())
                .await
                .with_context(|| format!("joining: no answer within {} s", JOIN_TIMEOUT.as_secs()))??;
        *self.client.write().unwrap_or_else(|e| e.into_inner()) = Some(client);
        self.lease.store(lease, Ordering::SeqCst);
        self.connected.store(true, Ordering::SeqCst);
        self.changed.send_modify(|g| *g += 1);
        info!(
            "cluster store {}: joined as {} ({}), lease {lease:x} ({LEASE_TTL_SECS} s), resynced at revision {rev}",
            self.cfg.store, self.cfg.node_name, self.cfg.node_ip
        );

        let mut tick = tokio::time::interval(KEEPALIVE_EVERY);
        let mut last_ack = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    // A lease that expired is reported (TTL 0) and a dead connection fails
                    // the HTTP/2 keep-alive; this only catches a server that answers nothing
                    // else. Generous: a daemon stalled for a few seconds (tick and answer
                    // both late) must not drop a lease that is still alive.
                    if last_ack.elapsed() > Duration::from_secs(3 * LEASE_TTL_SECS as u64) {
                        bail!("no lease keep-alive answer for {} s", 3 * LEASE_TTL_SECS);
                    }
                    tokio::time::timeout(REQUEST_TIMEOUT, keeper.keep_alive())
                        .await
                        .context("lease keep-alive: stuck")?
                        .context("lease keep-alive")?;
                    // Our copy is older than our own last write, and no event of ours may come
                    // (others' writes outside the prefix in a shared etcd):
                    // ask where the store is.
                    if self.snapshot().revision < self.floor.load(Ordering::SeqCst) {
                        tokio::time::timeout(REQUEST_TIMEOUT, watch.request_progress())
                            .await
                            .context("watch progress: stuck")?
                            .context("watch progress")?;
                    }
                }
                m = ka.message() => {
                    let m = m.context("lease keep-alive")?.context("lease keep-alive stream ended")?;
                    if m.ttl() <= 0 {
                        bail!("lease {lease:x} expired");
                    }
                    last_ack = tokio::time::Instant::now();
                }
                m = watch.message() => {
                    let m = m.context("watch")?.context("watch stream ended")?;
                    self.apply_watch(&m)?;
                }
            }
        }
    }

    /// Connects, takes a lease, registers this node, puts its own keys again, reads the
    /// snapshot and starts the watch and the keep-alive.
    async fn join(&self) -> anyhow::Result<Joined> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        let mut client = tokio::time::timeout(REQUEST_TIMEOUT, Client::connect(&self.cfg.endpoints, Some(opts)))
            .await
            .context("connecting: timed out")?
            .context("connecting")?;
        let lease = client.lease_grant(LEASE_TTL_SECS, None).await.context("granting a lease")?.id();
        let me = NodeRecord {
            name: self.cfg.node_name.clone(),
            addr: self.cfg.node_ip,
            joined: crate::state::now(),
            version: env!("CARGO_PKG_VERSION").into(),
        };
        // Another live daemon with this name would have its keys taken (and its addresses
        // deleted as "no longer owned"): refuse. The same address is this node restarting.
        if let Some(kv) = client.get(Key::Node(me.name.clone()).path(), None).await?.kvs().first()
            && let Ok(other) = serde_json::from_slice::<NodeRecord>(kv.value())
            && other.addr != me.addr
        {
            bail!(
                "node name {} is in use by the live node at {}: give this daemon another --node-name",
                me.name,
                other.addr
            );
        }
        let v = serde_json::to_vec(&me)?;
        client.put(Key::NodeInfo(me.name.clone()).path(), v.clone(), None).await?;
        client.put(Key::Node(me.name.clone()).path(), v, Some(PutOptions::new().with_lease(lease))).await?;
        self.reclaim(&mut client, lease).await?;
        // The full snapshot, then the watch from the revision right after it.
        let resp = client.get(PREFIX, Some(GetOptions::new().with_prefix())).await.context("reading the cluster")?;
        let rev = resp.header().map_or(0, |h| h.revision());
        let mut snap = Snapshot { revision: rev, ..Default::default() };
        for kv in resp.kvs() {
            snap.apply(kv.key(), Some(kv.value()), kv.mod_revision());
        }
        let watch = client
            .watch(PREFIX, Some(WatchOptions::new().with_prefix().with_start_revision(rev + 1)))
            .await
            .context("watching the cluster")?;
        let (keeper, ka) = client.lease_keep_alive(lease).await.context("keeping the lease alive")?;
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(snap);
        Ok(Joined { client, lease, rev, watch, keeper, ka })
    }

    /// One watch message: a progress answer, a cancellation (resync), or events.
    fn apply_watch(&self, m: &etcd_client::WatchResponse) -> anyhow::Result<()> {
        if m.canceled() {
            bail!("watch cancelled ({}): resyncing", m.cancel_reason());
        }
        let rev = m.header().map_or(0, |h| h.revision());
        // Changed in place: the snapshot is copied only while a reader still holds the
        // previous one (copy on write), not once per watch message.
        let mut guard = self.snapshot.write().unwrap_or_else(|e| e.into_inner());
        if m.events().is_empty() {
            // A progress answer: nothing changed up to `rev`.
            if rev > guard.revision {
                Arc::make_mut(&mut guard).revision = rev;
                drop(guard);
                self.changed.send_modify(|g| *g += 1);
            }
            return Ok(());
        }
        let snap = Arc::make_mut(&mut guard);
        snap.revision = snap.revision.max(rev);
        for ev in m.events() {
            let Some(kv) = ev.kv() else { continue };
            let value = (ev.event_type() == EventType::Put).then(|| kv.value());
            snap.apply(kv.key(), value, kv.mod_revision());
        }
        drop(guard);
        self.changed.send_modify(|g| *g += 1);
        Ok(())
    }

    /// Puts this node's claims again and its endpoints under `lease`, and deletes keys of its
    /// own it no longer owns (removed while etcd was away, or by a daemon that then crashed).
    async fn reclaim(&self, client: &mut Client, lease: i64) -> anyhow::Result<()> {
        let (claims, endpoints) = {
            let o = self.owned.lock().unwrap_or_else(|e| e.into_inner());
            (o.claims.clone(), o.endpoints.clone())
        };
        for ((net, ip), c) in &claims {
            if let Err(e) = claim_key(client, &Key::Claim(net.clone(), *ip).path(), c).await? {
                warn!(
                    "address {ip} of network {net} (container {}) was claimed by node {} while this node was away: \
                     two containers now have it",
                    c.container_id, e.node
                );
            }
        }
        for ((net, c), rec) in &endpoints {
            let v = serde_json::to_vec(rec)?;
            client
                .put(Key::Endpoint(net.clone(), c.clone()).path(), v, Some(PutOptions::new().with_lease(lease)))
                .await?;
        }
        let me = &self.cfg.node_name;
        for prefix in ["ipam/", "endpoints/"] {
            let resp = client.get(format!("{PREFIX}{prefix}"), Some(GetOptions::new().with_prefix())).await?;
            for kv in resp.kvs() {
                let stale = match Key::parse(kv.key()) {
                    Key::Claim(net, ip) => serde_json::from_slice::<IpClaim>(kv.value())
                        .is_ok_and(|c| &c.node == me && !claims.contains_key(&(net, ip))),
                    Key::Endpoint(net, c) => serde_json::from_slice::<EndpointRecord>(kv.value())
                        .is_ok_and(|r| &r.node == me && !endpoints.contains_key(&(net, c))),
                    _ => false,
                };
                if stale {
                    info!("cluster store: deleting {} (no longer this node's)", String::from_utf8_lossy(kv.key()));
                    client.delete(kv.key(), None).await?;
                }
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------------ networks

    /// Creates an overlay network cluster-wide. `build` gets a snapshot read at the revision
    /// the transaction then checks, and returns the network (or a user error): names,
    /// subnets and VNIs are checked against a snapshot nobody changed meanwhile. Retries a
    /// few times when another node created or removed a network in between.
    pub async fn create_network(
        &self,
        build: impl Fn(&Snapshot) -> crate::error::Result<OverlayNetwork>,
    ) -> crate::error::Result<OverlayNetwork> {
        for _ in 0..5 {
            let mut client = self.client().await?;
            let snap = self.read_all(&mut client).await?;
            let net = build(&snap)?;
            let v = serde_json::to_vec(&net).map_err(|e| crate::error::Error::Internal(e.into()))?;
            let txn =
                Txn::new().when([Compare::mod_revision(serial_key(), CompareOp::Equal, snap.serial_rev)]).and_then([
                    TxnOp::put(serial_key(), net.id.clone(), None),
                    TxnOp::put(Key::Network(net.id.clone()).path(), v, None),
                ]);
            if self.txn(&mut client, txn).await?.succeeded() {
                return Ok(net);
            }
        }
        Err(crate::error::Error::Conflict("networks changed concurrently on other nodes: try again".into()))
    }

    /// Removes an overlay network cluster-wide, unless a container on any node uses it.
    pub async fn remove_network(&self, id: &str) -> crate::error::Result<()> {
        for _ in 0..5 {
            let mut client = self.client().await?;
            let snap = self.read_all(&mut client).await?;
            let Some(net) = snap.networks.get(id) else { return Ok(()) };
            if let Some(s) = snap.services.values().find(|s| s.vips.iter().any(|(n, _)| n == id)) {
                return Err(crate::error::Error::Conflict(format!(
                    "network {} is in use by service {}",
                    net.name, s.name
                )));
            }
            let mut users: Vec<String> = snap
                .endpoints
                .values()
                .filter(|e| e.network_id == id)
                .map(|e| format!("{} (node {})", e.container, e.node))
                .collect();
            if !users.is_empty() {
                users.sort();
                return Err(crate::error::Error::Conflict(format!(
                    "network {} is in use by container(s): {}",
                    net.name,
                    users.join(", ")
                )));
            }
            let txn =
                Txn::new().when([Compare::mod_revision(serial_key(), CompareOp::Equal, snap.serial_rev)]).and_then([
                    TxnOp::put(serial_key(), id, None),
                    TxnOp::delete(Key::Network(id.into()).path(), None),
                    TxnOp::delete(format!("{PREFIX}ipam/{id}/"), Some(etcd_client::DeleteOptions::new().with_prefix())),
                ]);
            if self.txn(&mut client, txn).await?.succeeded() {
                return Ok(());
            }
        }
        Err(crate::error::Error::Conflict("networks changed concurrently on other nodes: try again".into()))
    }

    // ------------------------------------------------------------------ services

    /// Creates a service cluster-wide: `build` checks names against a fresh snapshot and
    /// returns the record; its VIPs are claimed in the same transaction.
    pub async fn create_service(
        &self,
        build: impl Fn(&Snapshot) -> crate::error::Result<ServiceRecord>,
    ) -> crate::error::Result<ServiceRecord> {
        for _ in 0..5 {
            let mut client = self.client().await?;
            let snap = self.read_all(&mut client).await?;
            let rec = build(&snap)?;
            let v = serde_json::to_vec(&rec).map_err(|e| crate::error::Error::Internal(e.into()))?;
            let holder =
                serde_json::to_vec(&IpClaim { node: String::new(), container_id: format!("service:{}", rec.id) })
                    .map_err(|e| crate::error::Error::Internal(e.into()))?;
            let mut when =
                vec![Compare::mod_revision(services_serial_key(), CompareOp::Equal, snap.services_serial_rev)];
            let mut ops = vec![
                TxnOp::put(services_serial_key(), rec.id.clone(), None),
                TxnOp::put(Key::Service(rec.id.clone()).path(), v, None),
            ];
            for (net, vip) in rec.vips.iter().filter(|(_, v)| !v.is_unspecified()) {
                let k = Key::Claim(net.clone(), *vip).path();
                when.push(Compare::create_revision(k.clone(), CompareOp::Equal, 0));
                ops.push(TxnOp::put(k, holder.clone(), None));
            }
            if self.txn(&mut client, Txn::new().when(when).and_then(ops)).await?.succeeded() {
                return Ok(rec);
            }
        }
        Err(crate::error::Error::Conflict(
            "services or addresses changed concurrently on other nodes: try again".into(),
        ))
    }

    /// Changes a service: `change` gets a fresh snapshot and the record and returns the new
    /// record. VIPs it adds are claimed and VIPs it drops released in the same transaction,
    /// which also checks that the record did not change meanwhile.
    pub async fn update_service(
        &self,
        id: &str,
        change: impl Fn(&Snapshot, ServiceRecord) -> crate::error::Result<ServiceRecord>,
    ) -> crate::error::Result<ServiceRecord> {
        for _ in 0..5 {
            let mut client = self.client().await?;
            let resp = self.timed(client.get(Key::Service(id.into()).path(), None)).await?;
            let Some(kv) = resp.kvs().first() else { return Err(not_found!("service {id} not found")) };
            let old: ServiceRecord =
                serde_json::from_slice(kv.value()).map_err(|e| crate::error::Error::Internal(e.into()))?;
            let snap = self.read_all(&mut client).await?;
            let new = change(&snap, old.clone())?;
            let v = serde_json::to_vec(&new).map_err(|e| crate::error::Error::Internal(e.into()))?;
            let holder = serde_json::to_vec(&IpClaim { node: String::new(), container_id: format!("service:{id}") })
                .map_err(|e| crate::error::Error::Internal(e.into()))?;
            let key = Key::Service(id.into()).path();
            let mut when = vec![Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision())];
            let mut ops = vec![TxnOp::put(key, v, None)];
            let real = |r: &ServiceRecord| -> Vec<(String, Ipv4Addr)> {
                r.vips.iter().filter(|(_, v)| !v.is_unspecified()).cloned().collect()
            };
            for (net, vip) in real(&new).into_iter().filter(|x| !real(&old).contains(x)) {
                let k = Key::Claim(net, vip).path();
                when.push(Compare::create_revision(k.clone(), CompareOp::Equal, 0));
                ops.push(TxnOp::put(k, holder.clone(), None));
            }
            for (net, vip) in real(&old).into_iter().filter(|x| !real(&new).contains(x)) {
                ops.push(TxnOp::delete(Key::Claim(net, vip).path(), None));
            }
            if self.txn(&mut client, Txn::new().when(when).and_then(ops)).await?.succeeded() {
                return Ok(new);
            }
        }
        Err(crate::error::Error::Conflict(format!("service {id} changed concurrently on other nodes: try again")))
    }

    /// Removes a service cluster-wide: its record, placements and VIP claims.
    pub async fn remove_service(&self, id: &str) -> crate::error::Result<()> {
        let mut client = self.client().await?;
        let snap = self.read_all(&mut client).await?;
        let Some(rec) = snap.services.get(id) else { return Ok(()) };
        let mut ops = vec![
            TxnOp::put(services_serial_key(), id, None),
            TxnOp::delete(Key::Service(id.into()).path(), None),
            TxnOp::delete(format!("{PREFIX}tasks/{id}/"), Some(etcd_client::DeleteOptions::new().with_prefix())),
        ];
        for (net, vip) in rec.vips.iter().filter(|(_, v)| !v.is_unspecified()) {
            ops.push(TxnOp::delete(Key::Claim(net.clone(), *vip).path(), None));
        }
        self.txn(&mut client, Txn::new().and_then(ops)).await?;
        Ok(())
    }

    /// Places task `slot` of `service` on `node` if its key is still at `seen_rev` (0: absent):
    /// of several schedulers deciding at once, one wins, the others see its choice.
    pub async fn place_task(&self, service: &str, slot: u32, node: &str, seen_rev: i64) -> crate::error::Result<bool> {
        let mut client = self.client_now()?;
        let key = Key::Task(service.into(), slot).path();
        let v = serde_json::to_vec(&TaskRecord { node: node.into() }).unwrap_or_default();
        let cmp = if seen_rev == 0 {
            Compare::create_revision(key.clone(), CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(key.clone(), CompareOp::Equal, seen_rev)
        };
        let txn = Txn::new().when([cmp]).and_then([TxnOp::put(key, v, None)]);
        Ok(self.txn(&mut client, txn).await?.succeeded())
    }

    /// Drops the placement of a slot the service no longer has (scaled down).
    pub async fn unplace_task(&self, service: &str, slot: u32, seen_rev: i64) -> crate::error::Result<()> {
        let mut client = self.client_now()?;
        let key = Key::Task(service.into(), slot).path();
        let txn = Txn::new()
            .when([Compare::mod_revision(key.clone(), CompareOp::Equal, seen_rev)])
            .and_then([TxnOp::delete(key, None)]);
        self.txn(&mut client, txn).await?;
        Ok(())
    }

    /// A fresh read of everything, for decisions that must not act on a lagging copy.
    pub async fn fresh_snapshot(&self) -> crate::error::Result<Snapshot> {
        let mut client = self.client().await?;
        self.read_all(&mut client).await
    }

    /// A fresh, consistent read of everything (not the watch's copy, which may lag).
    async fn read_all(&self, client: &mut Client) -> crate::error::Result<Snapshot> {
        let resp = self.timed(client.get(PREFIX, Some(GetOptions::new().with_prefix()))).await?;
        let mut snap = Snapshot { revision: resp.header().map_or(0, |h| h.revision()), ..Default::default() };
        for kv in resp.kvs() {
            snap.apply(kv.key(), Some(kv.value()), kv.mod_revision());
        }
        Ok(snap)
    }

    // ------------------------------------------------------------------ addresses, endpoints

    /// Claims `ip` of `network_id` for a container of this node: Ok(true) if it is ours now,
    /// Ok(false) if another holder has it.
    pub async fn claim(&self, network_id: &str, ip: Ipv4Addr, container_id: &str) -> crate::error::Result<bool> {
        let mut client = self.client().await?;
        let c = IpClaim { node: self.cfg.node_name.clone(), container_id: container_id.into() };
        let key = Key::Claim(network_id.into(), ip).path();
        let won = match tokio::time::timeout(REQUEST_TIMEOUT, claim_key(&mut client, &key, &c)).await {
            Ok(Ok(r)) => r.is_ok(),
            Ok(Err(e)) => return Err(self.etcd_err(format!("{e:#}"))),
            Err(_) => return Err(self.etcd_err("no answer")),
        };
        if won {
            self.owned.lock().unwrap_or_else(|e| e.into_inner()).claims.insert((network_id.into(), ip), c);
        }
        Ok(won)
    }

    /// Gives an address back. Without etcd the local record goes anyway; the next session
    /// deletes the key (it is no longer owned).
    pub async fn release(&self, network_id: &str, ip: Ipv4Addr) {
        self.owned.lock().unwrap_or_else(|e| e.into_inner()).claims.remove(&(network_id.to_string(), ip));
        if let Ok(mut client) = self.client_now() {
            let key = Key::Claim(network_id.into(), ip).path();
            if let Err(e) = self.timed(client.delete(key, None)).await {
                warn!("releasing {ip} of network {network_id}: {e}");
            }
        }
    }

    /// Records that this node owns these claims and endpoints (after a restart, from the
    /// local state) before the first session puts them.
    pub fn adopt(&self, claims: Vec<(String, Ipv4Addr, String)>, endpoints: Vec<EndpointRecord>) {
        let mut o = self.owned.lock().unwrap_or_else(|e| e.into_inner());
        for (net, ip, cid) in claims {
            o.claims.insert((net, ip), IpClaim { node: self.cfg.node_name.clone(), container_id: cid });
        }
        for e in endpoints {
            o.endpoints.insert((e.network_id.clone(), e.container_id.clone()), e);
        }
    }

    /// Publishes a local endpoint (under the lease). Kept locally too, so a session that
    /// starts later puts it.
    pub async fn publish_endpoint(&self, rec: EndpointRecord) {
        let key = Key::Endpoint(rec.network_id.clone(), rec.container_id.clone());
        self.owned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .endpoints
            .insert((rec.network_id.clone(), rec.container_id.clone()), rec.clone());
        if let Ok(mut client) = self.client_now() {
            let lease = self.lease.load(Ordering::SeqCst);
            let v = serde_json::to_vec(&rec).unwrap_or_default();
            if let Err(e) = self.timed(client.put(key.path(), v, Some(PutOptions::new().with_lease(lease)))).await {
                warn!("publishing endpoint {} on {}: {e}", rec.container, rec.network_id);
            }
        }
    }

    pub async fn withdraw_endpoint(&self, network_id: &str, container_id: &str) {
        self.owned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .endpoints
            .remove(&(network_id.to_string(), container_id.to_string()));
        if let Ok(mut client) = self.client_now() {
            let key = Key::Endpoint(network_id.into(), container_id.into()).path();
            if let Err(e) = self.timed(client.delete(key, None)).await {
                warn!("withdrawing endpoint {container_id} on {network_id}: {e}");
            }
        }
    }
}

/// Puts `key` = `claim` (without a lease: see the module docs) if nobody has it, or if it is
/// already this very claim. Err(holder) when someone else has it.
async fn claim_key(client: &mut Client, key: &str, claim: &IpClaim) -> anyhow::Result<Result<(), IpClaim>> {
    let v = serde_json::to_vec(claim)?;
    let put = || TxnOp::put(key, v.clone(), None);
    let txn = Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, 0)])
        .and_then([put()])
        .or_else([TxnOp::get(key, None)]);
    let resp = client.txn(txn).await?;
    if resp.succeeded() {
        return Ok(Ok(()));
    }
    let Some(TxnOpResponse::Get(g)) = resp.op_responses().into_iter().next() else {
        bail!("claim of {key}: unexpected transaction answer");
    };
    let Some(kv) = g.kvs().first() else {
        bail!("claim of {key}: the key went meanwhile, try again");
    };
    let holder: IpClaim = serde_json::from_slice(kv.value())?;
    if &holder != claim {
        return Ok(Err(holder));
    }
    // Ours already: put again without a lease (one an older daemon put under its lease would
    // otherwise go with that lease), unless it changed meanwhile.
    let txn = Txn::new().when([Compare::mod_revision(key, CompareOp::Equal, kv.mod_revision())]).and_then([put()]);
    if client.txn(txn).await?.succeeded() { Ok(Ok(())) } else { Ok(Err(holder)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_parse_to_endpoints() {
        assert_eq!(parse_store_url("etcd://10.0.0.1:2379").unwrap(), vec!["http://10.0.0.1:2379"]);
        assert_eq!(
            parse_store_url("etcd://a:1,b:2").unwrap(),
            vec!["http://a:1".to_string(), "http://b:2".to_string()]
        );
        for bad in ["http://a:1", "etcd://", "etcd://a", "etcd://a:0", "etcd://a:x", "etcd://:1"] {
            assert!(parse_store_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_round_trip_and_foreign_keys_are_other() {
        let ip: Ipv4Addr = "10.0.0.2".parse().unwrap();
        for k in [
            Key::NodeInfo("a".into()),
            Key::Node("a".into()),
            Key::Network("n1".into()),
            Key::Claim("n1".into(), ip),
            Key::Endpoint("n1".into(), "c1".into()),
            Key::Service("s1".into()),
            Key::Task("s1".into(), 3),
        ] {
            assert_eq!(Key::parse(k.path().as_bytes()), k);
        }
        assert_eq!(Key::parse(b"/other/nodes/a"), Key::Other);
        assert_eq!(Key::parse(b"/netpath/v1/ipam/n1/not-an-ip"), Key::Other);
        assert_eq!(Key::parse(b"/netpath/v1/ingress/x"), Key::Other, "reserved keys are skipped for now");
        assert_eq!(Key::parse(b"/netpath/v1/tasks/s1/x"), Key::Other);
    }

    #[test]
    fn snapshot_follows_puts_and_deletes() {
        let mut s = Snapshot::default();
        let n = NodeRecord { name: "a".into(), addr: "192.0.2.1".parse().unwrap(), joined: 1, version: "x".into() };
        let v = serde_json::to_vec(&n).unwrap();
        s.apply(Key::NodeInfo("a".into()).path().as_bytes(), Some(&v), 3);
        s.apply(Key::Node("a".into()).path().as_bytes(), Some(&v), 3);
        assert!(s.alive.contains_key("a"));
        s.apply(Key::Node("a".into()).path().as_bytes(), None, 4);
        assert!(!s.alive.contains_key("a") && s.known_nodes.contains_key("a"), "a dead node stays known");
        s.apply(serial_key().as_bytes(), Some(b"x"), 7);
        assert_eq!(s.serial_rev, 7);
        let c = IpClaim { node: "a".into(), container_id: "c".into() };
        let ip: Ipv4Addr = "10.0.0.2".parse().unwrap();
        s.apply(Key::Claim("n".into(), ip).path().as_bytes(), Some(&serde_json::to_vec(&c).unwrap()), 8);
        assert_eq!(s.claimed("n").collect::<Vec<_>>(), vec![ip]);
        assert_eq!(s.claimed("m").count(), 0);
        s.apply(Key::Claim("n".into(), ip).path().as_bytes(), Some(b"not json"), 9);
        assert_eq!(s.claimed("n").count(), 1, "an unreadable value changes nothing");
        s.apply(Key::Claim("n".into(), ip).path().as_bytes(), None, 10);
        assert_eq!(s.claimed("n").count(), 0);
    }

    #[test]
    fn vnis_start_at_4096_and_fill_gaps() {
        let mut s = Snapshot::default();
        assert_eq!(s.free_vni(), Some(FIRST_VNI));
        for (id, vni) in [("a", 4096), ("b", 4098)] {
            s.networks.insert(
                id.into(),
                OverlayNetwork {
                    id: id.into(),
                    name: id.into(),
                    subnet: "10.0.0.0/24".parse().unwrap(),
                    gateway: "10.0.0.1".parse().unwrap(),
                    ip_range: None,
                    vni,
                    attachable: true,
                    internal: false,
                    labels: Default::default(),
                    aux_addresses: Default::default(),
                    created: 0,
                    creator: "a".into(),
                },
            );
        }
        assert_eq!(s.free_vni(), Some(4097));
    }
}
