//! Desired state: networks and containers with their endpoints. IPAM allocations are the
//! endpoints' addresses, so they are persisted with them and cannot drift apart.
//! Written crash-safely (temp file, fsync, rename, fsync dir): a crash leaves the old or the
//! new state, never a torn one.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::ipam::{self, Pool};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    Bridge,
    Host,
    None,
}

impl DriverKind {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "bridge" => Some(Self::Bridge),
            "host" => Some(Self::Host),
            "none" | "null" => Some(Self::None),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bridge => "bridge",
            Self::Host => "host",
            Self::None => "none",
        }
    }
}

/// Docker's option naming a bridge network's gateway mode.
pub const GATEWAY_MODE_OPT: &str = "com.docker.network.bridge.gateway_mode_ipv4";

/// How a bridge network meets the outside (Docker's gateway modes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GatewayMode {
    /// Masquerade out; from outside only published host ports (Docker's default).
    #[default]
    Nat,
    /// Masquerade out; hosts that route to the subnet reach every container port.
    NatUnprotected,
    /// No NAT: containers keep their addresses; hosts that route to the subnet reach
    /// published container ports (and ICMP).
    Routed,
}

impl GatewayMode {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "nat" => Some(Self::Nat),
            "nat-unprotected" => Some(Self::NatUnprotected),
            "routed" => Some(Self::Routed),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nat => "nat",
            Self::NatUnprotected => "nat-unprotected",
            Self::Routed => "routed",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Network {
    pub id: String,
    pub name: String,
    pub driver: DriverKind,
    /// Bridge networks only.
    pub ipam: Option<IpamConfig>,
    /// The Linux bridge of a bridge network.
    pub bridge: Option<String>,
    /// Created by the daemon itself (bridge, host, none): cannot be removed.
    pub builtin: bool,
    pub created: u64,
    /// Small number naming the network in the datapath (isolation); unique per daemon.
    #[serde(default)]
    pub index: u32,
    /// Bridge networks only.
    #[serde(default)]
    pub gateway_mode: GatewayMode,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct IpamConfig {
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub ip_range: Option<Ipv4Net>,
}

impl Network {
    pub fn pool(&self) -> Option<Pool> {
        self.ipam.map(|c| Pool { subnet: c.subnet, gateway: c.gateway, range: c.ip_range.unwrap_or(c.subnet) })
    }
    pub fn short_id(&self) -> &str {
        &self.id[..12]
    }
}

/// Where a container's processes live.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Sandbox {
    /// A network namespace bind-mounted at `path`. `owned` namespaces were made by the daemon
    /// (and are removed with the container); others came from `netpath attach --netns`.
    Netns { path: PathBuf, owned: bool },
    /// The daemon's own (host) network namespace: `--network host`.
    Host,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Endpoint {
    pub id: String,
    pub network_id: String,
    /// Interface name inside the container: eth0, eth1, ...
    pub ifname: String,
    /// Host side of the veth pair (bridge networks).
    pub host_ifname: Option<String>,
    pub ipv4: Option<Ipv4Addr>,
    pub mac: Option<[u8; 6]>,
    /// Network-scoped DNS aliases (`--alias`), user-defined networks only.
    #[serde(default)]
    pub aliases: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Process {
    pub cmd: Vec<String>,
    pub pid: Option<u32>,
    /// Kernel start time of `pid` (clock ticks since boot): tells our process from a recycled pid.
    pub start_time: Option<u64>,
    pub exit_code: Option<i32>,
    /// Supervised by the daemon (`run -d`), output in the container's log.
    pub detached: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Container {
    pub id: String,
    pub name: String,
    pub sandbox: Sandbox,
    pub endpoints: Vec<Endpoint>,
    pub process: Option<Process>,
    pub created: u64,
    /// Published ports, on the address of the first endpoint that has one.
    #[serde(default)]
    pub ports: Vec<crate::ports::Binding>,
    /// `--hostname`; the short ID when unset.
    #[serde(default)]
    pub hostname: Option<String>,
    /// `--dns`: upstream resolvers instead of the host's.
    #[serde(default)]
    pub dns: Vec<std::net::IpAddr>,
    /// `--dns-search`: search domains instead of the host's.
    #[serde(default)]
    pub dns_search: Vec<String>,
}

impl Container {
    /// The endpoint published ports lead to: the first one with an address.
    pub fn primary_endpoint(&self) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| e.ipv4.is_some())
    }

    /// The UTS hostname its processes get: `--hostname`, else the short ID (as Docker).
    pub fn hostname(&self) -> &str {
        self.hostname.as_deref().unwrap_or(&self.id[..12])
    }

    /// The address published ports lead to: the primary endpoint's.
    pub fn primary_ipv4(&self) -> Option<Ipv4Addr> {
        self.primary_endpoint().and_then(|e| e.ipv4)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    pub networks: Vec<Network>,
    pub containers: Vec<Container>,
}

impl State {
    pub fn network(&self, name_or_id: &str) -> Option<&Network> {
        self.networks.iter().find(|n| n.name == name_or_id).or_else(|| {
            // Docker accepts an unambiguous id prefix too.
            let mut m = self.networks.iter().filter(|n| name_or_id.len() >= 3 && n.id.starts_with(name_or_id));
            match (m.next(), m.next()) {
                (Some(n), None) => Some(n),
                _ => None,
            }
        })
    }
    pub fn network_by_id(&self, id: &str) -> Option<&Network> {
        self.networks.iter().find(|n| n.id == id)
    }
    pub fn container(&self, name_or_id: &str) -> Option<&Container> {
        self.containers.iter().find(|c| c.name == name_or_id).or_else(|| {
            let mut m = self.containers.iter().filter(|c| name_or_id.len() >= 3 && c.id.starts_with(name_or_id));
            match (m.next(), m.next()) {
                (Some(c), None) => Some(c),
                _ => None,
            }
        })
    }
    pub fn container_mut(&mut self, id: &str) -> Option<&mut Container> {
        self.containers.iter_mut().find(|c| c.id == id)
    }
    /// Addresses in use on a network: its endpoints' addresses (the IPAM allocations).
    pub fn used_addresses(&self, network_id: &str) -> BTreeSet<Ipv4Addr> {
        self.endpoints_on(network_id).filter_map(|(_, e)| e.ipv4).collect()
    }
    pub fn endpoints_on<'a>(&'a self, network_id: &'a str) -> impl Iterator<Item = (&'a Container, &'a Endpoint)> + 'a {
        self.containers
            .iter()
            .flat_map(|c| c.endpoints.iter().map(move |e| (c, e)))
            .filter(move |(_, e)| e.network_id == network_id)
    }
    /// Every container's published ports except `except`'s.
    pub fn bindings_except(&self, except: &str) -> Vec<crate::ports::Binding> {
        self.containers.iter().filter(|c| c.id != except).flat_map(|c| c.ports.iter().copied()).collect()
    }
    /// The next unused network index (0 is never used: it marks "not assigned yet").
    pub fn next_network_index(&self) -> u32 {
        self.networks.iter().map(|n| n.index).max().unwrap_or(0) + 1
    }
    pub fn subnets(&self) -> Vec<Ipv4Net> {
        self.networks.iter().filter_map(|n| n.ipam.map(|c| c.subnet)).collect()
    }
    /// A network whose subnet overlaps `subnet`, if any.
    pub fn overlapping(&self, subnet: Ipv4Net) -> Option<&Network> {
        self.networks.iter().find(|n| n.ipam.is_some_and(|c| ipam::overlaps(c.subnet, subnet)))
    }
}

/// The state file and its directory layout under `--state-dir`.
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        for sub in ["", "netns", "containers"] {
            fs::create_dir_all(dir.join(sub)).with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        Ok(Self { dir: dir.to_owned() })
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    fn file(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    pub fn netns_path(&self, container_id: &str) -> PathBuf {
        self.dir.join("netns").join(&container_id[..12])
    }
    pub fn log_path(&self, container_id: &str) -> PathBuf {
        self.dir.join("containers").join(format!("{}.log", &container_id[..12]))
    }
    /// Where a detached process's supervisor records its exit code.
    pub fn exit_path(&self, container_id: &str) -> PathBuf {
        self.dir.join("containers").join(format!("{}.exit", &container_id[..12]))
    }

    pub fn load(&self) -> anyhow::Result<State> {
        match fs::read(self.file()) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| format!("parsing {}", self.file().display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.file().display())),
        }
    }

    pub fn save(&self, state: &State) -> anyhow::Result<()> {
        let tmp = self.dir.join(".state.json.tmp");
        let data = serde_json::to_vec_pretty(state)?;
        let mut f = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(&data)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, self.file()).context("replacing state file")?;
        fs::File::open(&self.dir)?.sync_all().context("syncing state dir")?;
        Ok(())
    }
}

/// A fresh random 64-hex-digit id, like Docker's.
pub fn new_id() -> String {
    let mut b = [0u8; 32];
    // getrandom(2) never fails for 32 bytes on Linux once the pool is initialised.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    assert_eq!(n, 32, "getrandom failed");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_modes_parse_and_state_from_before_them_means_nat() {
        for m in [GatewayMode::Nat, GatewayMode::NatUnprotected, GatewayMode::Routed] {
            assert_eq!(GatewayMode::parse(m.as_str()), Some(m));
            assert_eq!(serde_json::to_value(m).unwrap(), m.as_str());
        }
        assert_eq!(GatewayMode::parse("isolated"), None);
        let old = r#"{"id":"x","name":"n","driver":"bridge","ipam":null,"bridge":null,"builtin":false,"created":0}"#;
        let n: Network = serde_json::from_str(old).unwrap();
        assert_eq!(n.gateway_mode, GatewayMode::Nat);
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("netpath-state-test-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn sample() -> State {
        let subnet: Ipv4Net = "10.5.0.0/24".parse().unwrap();
        State {
            networks: vec![Network {
                id: new_id(),
                name: "n1".into(),
                driver: DriverKind::Bridge,
                ipam: Some(IpamConfig { subnet, gateway: "10.5.0.1".parse().unwrap(), ip_range: None }),
                bridge: Some("np-x".into()),
                builtin: false,
                created: now(),
                index: 1,
                gateway_mode: GatewayMode::Routed,
            }],
            containers: vec![],
        }
    }

    #[test]
    fn save_load_roundtrip_and_no_temp_left() {
        let d = tmpdir("rt");
        let s = Store::open(&d).unwrap();
        assert!(s.load().unwrap().networks.is_empty(), "missing file is an empty state");
        let st = sample();
        s.save(&st).unwrap();
        let back = s.load().unwrap();
        assert_eq!(back.networks[0].name, "n1");
        assert_eq!(back.networks[0].ipam.unwrap().subnet, st.networks[0].ipam.unwrap().subnet);
        assert!(!d.join(".state.json.tmp").exists());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn corrupt_file_is_an_error_not_an_empty_state() {
        let d = tmpdir("corrupt");
        let s = Store::open(&d).unwrap();
        fs::write(d.join("state.json"), b"{ not json").unwrap();
        assert!(s.load().is_err());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn lookups_by_name_and_id_prefix() {
        let st = sample();
        let id = st.networks[0].id.clone();
        assert!(st.network("n1").is_some());
        assert!(st.network(&id[..6]).is_some());
        assert!(st.network("zz").is_none());
        assert!(st.overlapping("10.5.0.128/25".parse().unwrap()).is_some());
        assert!(st.overlapping("10.6.0.0/24".parse().unwrap()).is_none());
    }

    #[test]
    fn ids_are_unique_hex() {
        let a = new_id();
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, new_id());
    }
}
