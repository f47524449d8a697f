//! The datapath: loads the eBPF object, attaches its programs to endpoint interfaces and owns
//! every map handle. The rest of the daemon talks to the kernel datapath only here.
//!
//! Everything it attaches and every map is pinned under the daemon's bpffs dir (layout in
//! `pins.rs`), so the datapath keeps forwarding while no daemon runs, and a new daemon — the
//! same build or another — adopts it: maps are reused or migrated (`migrate.rs`), links get
//! the new programs atomically (`links.rs`).

mod bpffs;
mod ct_ports;
mod endpoint_nets;
mod events;
mod links;
mod migrate;
mod mmap;
mod overlay;
pub mod pins;
mod sys;

use std::borrow::Cow;
use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::Path;

use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, DevMapHash, HashMap as BpfHashMap, MapData, PerCpuArray};
use aya::programs::{CgroupSockAddr, ProgramError, SchedClassifier, Xdp};
use aya::{Ebpf, EbpfLoader};
use ipnet::Ipv4Net;
use netpath_common::{
    Backend, CtEntry, EndpointInfo, NetworkInfo, PortKey, Tuple, XdpUplink, config, ct_stat, drop_reason, map_names,
    prog_names,
};
use tracing::{info, warn};

pub use bpffs::ensure_bpffs;
pub use ct_ports::CtPorts;
pub use events::FlowEventRing;
pub use links::XdpMode;
pub use overlay::{LocalEndpoint, Overlay, RemoteEndpoint, VXLAN_DEV, VXLAN_OVERHEAD, VXLAN_PORT};
pub use pins::map_pin;

mod conntrack;
mod flows;
pub use conntrack::ct_timeout;
pub use flows::FlowTable;

/// An IPv4 address as the datapath keeps it: the wire's byte order, read as a native u32.
pub fn wire_addr(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// A port as the datapath keeps it (network byte order).
pub fn wire_port(port: u16) -> u16 {
    port.to_be()
}

/// The compiled datapath (`netpath-ebpf`), embedded at build time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netpath-ebpf.o"));

/// An eBPF object's build id: the start of its SHA-256, as `netpath version` shows it.
pub fn object_id(object: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(object).iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// What to load besides the defaults.
#[derive(Default)]
pub struct LoadOptions {
    /// Another eBPF object than the embedded one (`netpath daemon --ebpf-object`).
    pub object: Option<Vec<u8>>,
    /// Map sizes other than the object's (tests fill small tables).
    pub max_entries: Vec<(String, u32)>,
}

/// The one program on a container's veth (ingress of its host side). What is delivered to the
/// container passes no program: the kernel's veth statistics count it.
const CONTAINER_PROG: &str = prog_names::FROM_CONTAINER;
const UPLINK_PROGS: [&str; 2] = [prog_names::UPLINK_IN, prog_names::UPLINK_OUT];

pub struct Datapath {
    ebpf: Ebpf,
    pins: pins::Pins,
    links: links::SharedLinks,
    object_id: String,
    ct_capacity: u32,
    /// Drop counters at the last pressure check (see [`Datapath::check_pressure`]).
    last_drops: HashMap<u32, u64>,
    /// `netpath daemon --xdp`.
    xdp: XdpSetting,
    /// ENDPOINT_NETS mapped into this process, from its first write on (endpoint_nets.rs).
    endpoint_slots: Option<endpoint_nets::Slots>,
}

/// `netpath daemon --xdp`: whether uplink_xdp runs ahead of uplink_in on the uplinks, and how.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpSetting {
    /// TC only.
    #[default]
    Off,
    /// Native on uplinks whose driver runs XDP before any socket buffer exists (a NIC
    /// driver with native XDP); TC alone on veths (their frames mostly come from a local
    /// stack as socket buffers, which native XDP on a veth converts and copies) and on drivers
    /// without native XDP (generic XDP copies every socket buffer with less than 256 B of
    /// headroom, as drivers build them). Both measured slower than TC (README, XDP).
    Auto,
    /// Native only: an uplink whose driver lacks it keeps TC alone (and the log says so).
    Native,
    /// Generic XDP (in the stack, once the socket buffer is built) on every uplink.
    Generic,
}

impl XdpSetting {
    /// The modes to try on an uplink whose driver is `driver` (None: unknown), in order.
    fn modes(self, driver: Option<&str>) -> &'static [XdpMode] {
        match self {
            XdpSetting::Off => &[],
            XdpSetting::Auto if driver.is_none_or(|d| d == "veth") => &[],
            XdpSetting::Auto => &[XdpMode::Native],
            XdpSetting::Native => &[XdpMode::Native],
            XdpSetting::Generic => &[XdpMode::Generic],
        }
    }

    /// Whether a frame uplink_xdp redirects to a container's veth needs NAPI on the veth's
    /// container end: in native mode the frame is handed over as an XDP frame, which a veth
    /// takes only with XDP or GRO (NAPI) on its receiving end. Generic XDP hands over a socket
    /// buffer, which needs neither.
    pub fn needs_peer_napi(self) -> bool {
        matches!(self, XdpSetting::Auto | XdpSetting::Native)
    }
}

/// Datapath-wide counters for `netpath info`-style reporting.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Counters {
    pub drops: std::collections::BTreeMap<&'static str, u64>,
    pub conntrack: std::collections::BTreeMap<&'static str, u64>,
    pub ct_entries: usize,
    /// Container addresses the datapath knows (ENDPOINTS).
    pub endpoints: usize,
    /// Published host ports (PORTMAP).
    pub published_ports: usize,
    /// How many entries the conntrack table holds at most.
    pub ct_capacity: u32,
    /// Whether the programs write flow events now (someone follows them).
    pub flow_events: bool,
    /// `--xdp`, and the mode uplink_xdp runs in on each uplink (absent: TC only there).
    pub xdp: XdpStatus,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct XdpStatus {
    pub setting: XdpSetting,
    pub uplinks: std::collections::BTreeMap<String, XdpMode>,
}

impl Datapath {
    /// Loads the embedded object with its maps pinned under `pin_dir` (made a bpffs mount if it
    /// is not on one already), adopting whatever an earlier daemon left there.
    pub fn load(pin_dir: &Path) -> Result<Self> {
        Self::load_with(pin_dir, LoadOptions::default())
    }

    /// [`Datapath::load`], with another object or map sizes. In order, so no flow is dropped:
    /// plan every map (open the pins to migrate from), load the object (reused maps opened,
    /// new ones created), verify the programs, copy the migrating maps, move every pinned
    /// link to the new programs, copy again what the old programs wrote meanwhile, then put
    /// the new maps under their final names and remove the old pins.
    pub fn load_with(pin_dir: &Path, opts: LoadOptions) -> Result<Self> {
        let mut laps = crate::laps::Laps::new();
        ensure_bpffs(pin_dir)?;
        let pins = pins::Pins::new(pin_dir);
        pins.make_dirs()?;
        let object: Cow<[u8]> = opts.object.map_or(Cow::Borrowed(EBPF_OBJECT), Cow::Owned);
        let wants = migrate::object_layouts(&object, &opts.max_entries)?;
        migrate::sweep_unknown(&pins, &wants);
        // CT_PORTS, reused as it is pinned, beside a CT reused as is, is what the programs kept
        // complete; anything else is refilled (see ct_ports.rs).
        let ct_ports_pinned = wants.iter().any(|w| w.name == map_names::CT_PORTS && pins.map(&w.name, w.rev).exists());
        let mut plans = migrate::plan(&pins, &wants)?;
        laps.lap("plan");
        let loaded = Self::load_object(&object, &plans, &opts.max_entries);
        laps.lap("verify");
        let mut ebpf = match loaded {
            Ok(e) => e,
            Err(e) => {
                plans.iter().for_each(|p| p.abort());
                return Err(e);
            }
        };
        let ct_migrating =
            plans.iter().any(|p| (p.name == map_names::CT || p.name == map_names::CT_PORTS) && p.migrating());
        let refill_ct_ports = ct_ports::present(&ebpf)
            && (!ct_ports_pinned || ct_migrating || !ct_ports::complete(&ebpf).unwrap_or(false));
        if refill_ct_ports && let Err(e) = ct_ports::invalidate(&mut ebpf) {
            plans.iter().for_each(|p| p.abort());
            return Err(e);
        }
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e).context("counting CPUs")?;
        for p in plans.iter_mut().filter(|p| p.migrating()) {
            let m = sys::obj_get(&p.load_path).with_context(|| format!("opening {}", p.load_path.display()))?;
            p.copy(m.as_fd(), cpus).with_context(|| format!("copying map {}", p.name))?;
        }
        let mut links = links::Links::new(pins.clone(), &ebpf)?;
        let adopted = links.adopt()?;
        laps.lap("adopt");
        let links = std::sync::Arc::new(std::sync::Mutex::new(links));
        if plans.iter().any(|p| p.migrating()) || (refill_ct_ports && adopted > 0) {
            // Old programs still running on another CPU finish within microseconds.
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        for p in plans.iter_mut().filter(|p| p.migrating()) {
            let m = sys::obj_get(&p.load_path).with_context(|| format!("opening {}", p.load_path.display()))?;
            // The programs moved already: a failure here costs entries, not the datapath.
            if let Err(e) = p.copy_again(m.as_fd(), cpus) {
                warn!("map {}: copying what the old programs wrote last: {e:#}", p.name);
            }
        }
        if refill_ct_ports {
            // Only programs that set bits insert entries now. A failure leaves every packet
            // looked up: slower, the same verdicts.
            match ct_ports::refill(&mut ebpf) {
                Ok(n) => info!("CT_PORTS refilled from {n} conntrack entries"),
                Err(e) => warn!("CT_PORTS: every packet from outside is looked up: {e:#}"),
            }
        }
        for p in plans {
            let (name, rev) = (p.name.clone(), p.rev());
            p.finish().with_context(|| format!("pinning map {name} rev {rev}"))?;
        }
        let object_id = object_id(&object);
        let ct_capacity = wants.iter().find(|w| w.name == map_names::CT).map_or(0, |w| w.info.max_entries);
        if adopted > 0 {
            info!("datapath {object_id}: took over {adopted} attached links");
        }
        let mut dp = Self {
            ebpf,
            pins,
            links,
            object_id,
            ct_capacity,
            last_drops: HashMap::new(),
            xdp: XdpSetting::Off,
            endpoint_slots: None,
        };
        dp.sync_endpoint_nets().context("filling ENDPOINT_NETS")?;
        laps.lap("maps");
        tracing::debug!("datapath load phases (ms): {laps}");
        Ok(dp)
    }

    fn load_object(object: &[u8], plans: &[migrate::MapPlan], max_entries: &[(String, u32)]) -> Result<Ebpf> {
        let mut loader = EbpfLoader::new();
        for p in plans {
            loader.map_pin_path(&p.name, p.load_path.as_path());
        }
        for (name, n) in max_entries {
            loader.map_max_entries(name, *n);
        }
        let mut ebpf = loader.load(object).context("loading the eBPF object (is the kernel's BPF support enabled?)")?;
        for name in [
            prog_names::FROM_CONTAINER,
            prog_names::UPLINK_IN,
            prog_names::UPLINK_OUT,
            prog_names::VXLAN_IN,
            prog_names::OVERLAY_BRIDGE_OUT,
        ] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the eBPF object"))?
                .try_into()?;
            retry_interrupted(|| prog.load()).with_context(|| format!("verifying program {name}"))?;
        }
        // An object from before the underlay decapsulation (--ebpf-object) has no underlay_in:
        // the VXLAN device decapsulates everything.
        if let Some(p) = ebpf.program_mut(prog_names::UNDERLAY_IN) {
            let prog: &mut SchedClassifier = p.try_into()?;
            retry_interrupted(|| prog.load())
                .with_context(|| format!("verifying program {}", prog_names::UNDERLAY_IN))?;
        }
        // An object from before XDP (--ebpf-object) has no uplink_xdp: TC alone.
        if let Some(p) = ebpf.program_mut(prog_names::UPLINK_XDP) {
            let prog: &mut Xdp = p.try_into()?;
            retry_interrupted(|| prog.load())
                .with_context(|| format!("verifying program {}", prog_names::UPLINK_XDP))?;
        }
        for name in prog_names::SOCK {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the eBPF object"))?
                .try_into()?;
            retry_interrupted(|| prog.load()).with_context(|| format!("verifying program {name}"))?;
        }
        Ok(ebpf)
    }

    /// The build id of the loaded object.
    pub fn object_id(&self) -> &str {
        &self.object_id
    }

    /// Where this datapath pins its maps and links.
    pub fn pin_dir(&self) -> &Path {
        self.pins.root()
    }

    /// Detaches the pinned links this daemon did not ask for since it loaded: endpoints and
    /// uplinks its state no longer has. Call once the state is reconciled.
    pub fn release_unclaimed(&mut self) {
        let n = self.links().release_unclaimed();
        if n > 0 {
            info!("detached {n} links no container or uplink claims");
        }
    }

    /// Tears the datapath down: every program detached, every link pin removed. The maps stay
    /// pinned (a later daemon finds its counters); [`Datapath::unpin_maps`] removes them too.
    pub fn detach_all(&mut self) {
        self.links().detach_all();
    }

    /// Removes every map pin (after [`Datapath::detach_all`]: nothing is left on the bpffs).
    pub fn unpin_maps(&self) -> Result<()> {
        let dir = self.pins.maps_dir();
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?.flatten() {
            std::fs::remove_file(e.path()).with_context(|| format!("removing {}", e.path().display()))?;
        }
        Ok(())
    }

    /// Attaches the socket programs to the cgroup2 root at `cgroup`, acting only for sockets of
    /// the network namespace with cookie `netns_cookie` (the daemon's). Other namespaces, and
    /// other daemons' programs on the same cgroup, are left alone.
    pub fn attach_sockets(&mut self, cgroup: &Path, netns_cookie: u64) -> Result<()> {
        let mut cfg: Array<_, u64> = self.map(map_names::CONFIG)?;
        cfg.set(config::HOST_NETNS_COOKIE, netns_cookie, 0).context("setting the namespace cookie")?;
        for name in prog_names::SOCK {
            self.links().attach_cgroup(cgroup, name)?;
        }
        Ok(())
    }

    /// The consumer of the flow-event ring (once: the map moves out of the datapath).
    pub fn flow_events(&mut self) -> Result<FlowEventRing> {
        let m = self.ebpf.take_map(map_names::FLOW_EVENTS).with_context(|| {
            format!("map {} missing from the eBPF object, or taken already", map_names::FLOW_EVENTS)
        })?;
        let ring = aya::maps::RingBuf::try_from(m).context("opening the flow-event ring buffer")?;
        Ok(FlowEventRing::new(ring))
    }

    /// Makes the programs write flow events (or stop). Off, an event costs them one lookup.
    pub fn set_flow_events(&mut self, on: bool) -> Result<()> {
        let mut cfg: Array<_, u64> = self.map(map_names::CONFIG)?;
        cfg.set(config::FLOW_EVENTS, u64::from(on), 0).context("switching flow events")
    }

    /// Whether the programs write flow events now.
    pub fn flow_events_on(&mut self) -> Result<bool> {
        let cfg: Array<_, u64> = self.map(map_names::CONFIG)?;
        Ok(cfg.get(&config::FLOW_EVENTS, 0).context("reading the flow-events switch")? != 0)
    }

    /// Flow events the programs could not write since the maps were made: the ring was full.
    pub fn flow_events_lost(&mut self) -> Result<u64> {
        let cts: PerCpuArray<_, u64> = self.map(map_names::CT_STATS)?;
        Ok(cts.get(&ct_stat::EVENTS_LOST, 0).map(|v| v.iter().sum()).unwrap_or(0))
    }

    /// A program, for tests that drive it with `test_run`.
    pub fn classifier(&mut self, name: &str) -> Result<&mut SchedClassifier> {
        Ok(self.ebpf.program_mut(name).with_context(|| format!("no program {name}"))?.try_into()?)
    }

    /// A typed handle on one of the maps of the catalogue.
    fn map<'a, M>(&'a mut self, name: &str) -> Result<M>
    where
        M: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
    {
        let m = self.ebpf.map_mut(name).with_context(|| format!("map {name} missing from the eBPF object"))?;
        M::try_from(m).with_context(|| format!("map {name} has an unexpected type"))
    }

    /// The address masqueraded traffic leaving through uplink `ifindex` gets (None: no masquerade).
    pub fn set_uplink_addr(&mut self, ifindex: u32, addr: Option<Ipv4Addr>) -> Result<()> {
        let mut m: BpfHashMap<_, u32, u32> = self.map(map_names::UPLINKS)?;
        match addr {
            Some(a) => m.insert(ifindex, wire_addr(a), 0)?,
            None => {
                let _ = m.remove(&ifindex);
            }
        }
        Ok(())
    }

    /// A container address: where hairpin and fast-path traffic is redirected (with `gw_mac`,
    /// its bridge's MAC, as source), and which network it is on.
    pub fn set_endpoint(
        &mut self,
        addr: Ipv4Addr,
        ifindex: u32,
        net_id: u32,
        mac: [u8; 6],
        gw_mac: [u8; 6],
    ) -> Result<()> {
        let mut m: BpfHashMap<_, u32, EndpointInfo> = self.map(map_names::ENDPOINTS)?;
        m.insert(wire_addr(addr), EndpointInfo { ifindex, net_id, mac, gw_mac }, 0).context("adding endpoint")?;
        self.sync_endpoint_nets_of([wire_addr(addr)])
    }

    pub fn remove_endpoint(&mut self, addr: Ipv4Addr) -> Result<()> {
        let mut m: BpfHashMap<_, u32, EndpointInfo> = self.map(map_names::ENDPOINTS)?;
        let ifindex = m.get(&wire_addr(addr), 0).ok().map(|ep| ep.ifindex);
        let _ = m.remove(&wire_addr(addr));
        self.sync_endpoint_nets_of([wire_addr(addr)])?;
        // The kernel also drops a devmap entry when its device goes away.
        if let Some(ifindex) = ifindex {
            self.set_xdp_port(ifindex, false)?;
        }
        Ok(())
    }

    /// Uplink `ifindex` (MAC `mac`) runs uplink_xdp: frames to that MAC are the host's to
    /// forward. None: it no longer does.
    pub fn set_xdp_uplink(&mut self, ifindex: u32, mac: Option<[u8; 6]>) -> Result<()> {
        let mut m: BpfHashMap<_, u32, XdpUplink> = self.map(map_names::XDP_UPLINKS)?;
        match mac {
            Some(mac) => m.insert(ifindex, XdpUplink { mac, _pad: [0; 2] }, 0).context("adding an XDP uplink")?,
            None => {
                let _ = m.remove(&ifindex);
            }
        }
        Ok(())
    }

    /// An XDP program, for tests that drive it with `test_run`.
    pub fn xdp(&mut self, name: &str) -> Result<&mut Xdp> {
        Ok(self.ebpf.program_mut(name).with_context(|| format!("no program {name}"))?.try_into()?)
    }

    pub fn set_network(&mut self, subnet: Ipv4Net, net_id: u32, gateway: Ipv4Addr, flags: u32) -> Result<()> {
        let mut m: LpmTrie<_, u32, NetworkInfo> = self.map(map_names::NETWORKS)?;
        let key = LpmKey::new(u32::from(subnet.prefix_len()), wire_addr(subnet.network()));
        m.insert(&key, NetworkInfo { net_id, gateway: wire_addr(gateway), flags }, 0).context("adding network")?;
        self.sync_endpoint_nets_within(subnet)
    }

    pub fn remove_network(&mut self, subnet: Ipv4Net) -> Result<()> {
        let mut m: LpmTrie<_, u32, NetworkInfo> = self.map(map_names::NETWORKS)?;
        let _ = m.remove(&LpmKey::new(u32::from(subnet.prefix_len()), wire_addr(subnet.network())));
        self.sync_endpoint_nets_within(subnet)
    }

    /// Makes HOST_ADDRS hold exactly `addrs`.
    pub fn sync_host_addrs(&mut self, addrs: &[Ipv4Addr]) -> Result<()> {
        let m: BpfHashMap<_, u32, u32> = self.map(map_names::HOST_ADDRS)?;
        let want: std::collections::HashSet<u32> = addrs.iter().map(|a| wire_addr(*a)).collect();
        let have: Vec<u32> = m.keys().filter_map(|k| k.ok()).collect();
        let added: Vec<u32> = want.iter().filter(|k| !have.contains(k)).copied().collect();
        let removed: Vec<u32> = have.iter().filter(|k| !want.contains(k)).copied().collect();
        // An address becoming the host's leaves ENDPOINT_NETS first: ports may be published on it.
        self.forget_endpoint_nets(&added)?;
        let mut m: BpfHashMap<_, u32, u32> = self.map(map_names::HOST_ADDRS)?;
        for k in &removed {
            let _ = m.remove(k);
        }
        for k in &added {
            m.insert(*k, 1, 0).context("adding host address")?;
        }
        self.sync_endpoint_nets_of(removed)
    }

    /// Publishes a port: (host address or every address, port, protocol) → container address/port.
    pub fn set_port(&mut self, host: Option<Ipv4Addr>, port: u16, proto: u8, to: Ipv4Addr, to_port: u16) -> Result<()> {
        let mut m: BpfHashMap<_, PortKey, Backend> = self.map(map_names::PORTMAP)?;
        let key = port_key(host, port, proto);
        m.insert(key, Backend { addr: wire_addr(to), port: wire_port(to_port), _pad: 0 }, 0)
            .context("publishing port (is the port table full?)")?;
        Ok(())
    }

    pub fn remove_port(&mut self, host: Option<Ipv4Addr>, port: u16, proto: u8) -> Result<()> {
        let mut m: BpfHashMap<_, PortKey, Backend> = self.map(map_names::PORTMAP)?;
        let _ = m.remove(&port_key(host, port, proto));
        Ok(())
    }

    /// Opens a container port to direct routing on a `routed` network.
    pub fn set_published(&mut self, addr: Ipv4Addr, port: u16, proto: u8) -> Result<()> {
        let mut m: BpfHashMap<_, PortKey, u8> = self.map(map_names::PUBLISHED)?;
        m.insert(port_key(Some(addr), port, proto), 1, 0).context("opening a published container port")
    }

    pub fn remove_published(&mut self, addr: Ipv4Addr, port: u16, proto: u8) -> Result<()> {
        let mut m: BpfHashMap<_, PortKey, u8> = self.map(map_names::PUBLISHED)?;
        let _ = m.remove(&port_key(Some(addr), port, proto));
        Ok(())
    }

    /// Every open container port: (container address, port, protocol).
    pub fn published_keys(&mut self) -> Result<Vec<(Ipv4Addr, u16, u8)>> {
        let m: BpfHashMap<_, PortKey, u8> = self.map(map_names::PUBLISHED)?;
        Ok(m.keys()
            .filter_map(|r| r.ok())
            .map(|k| (Ipv4Addr::from(k.addr.to_ne_bytes()), u16::from_be(k.port), k.proto))
            .collect())
    }

    /// The keys of every published-port entry: (host address or every address, port, protocol).
    pub fn port_keys(&mut self) -> Result<Vec<(Option<Ipv4Addr>, u16, u8)>> {
        let m: BpfHashMap<_, PortKey, Backend> = self.map(map_names::PORTMAP)?;
        Ok(m.keys()
            .filter_map(|r| r.ok())
            .map(|k| ((k.addr != 0).then(|| Ipv4Addr::from(k.addr.to_ne_bytes())), u16::from_be(k.port), k.proto))
            .collect())
    }

    /// Points (VIP, port or 0 for every port, protocol) at the Maglev table in `slot`.
    pub fn set_service(
        &mut self,
        vip: Ipv4Addr,
        port: u16,
        proto: u8,
        info: netpath_common::ServiceInfo,
    ) -> Result<()> {
        let mut m: BpfHashMap<_, PortKey, netpath_common::ServiceInfo> = self.map(map_names::SERVICES)?;
        m.insert(port_key(Some(vip), port, proto), info, 0)
            .context("adding a service entry (is the service table full?)")
    }

    pub fn remove_service(&mut self, vip: Ipv4Addr, port: u16, proto: u8) -> Result<()> {
        let mut m: BpfHashMap<_, PortKey, netpath_common::ServiceInfo> = self.map(map_names::SERVICES)?;
        let _ = m.remove(&port_key(Some(vip), port, proto));
        Ok(())
    }

    /// Every service entry: (VIP, port, protocol).
    pub fn service_keys(&mut self) -> Result<Vec<(Ipv4Addr, u16, u8)>> {
        let m: BpfHashMap<_, PortKey, netpath_common::ServiceInfo> = self.map(map_names::SERVICES)?;
        Ok(m.keys()
            .filter_map(|r| r.ok())
            .map(|k| (Ipv4Addr::from(k.addr.to_ne_bytes()), u16::from_be(k.port), k.proto))
            .collect())
    }

    /// Writes the Maglev table of `slot` (MAGLEV_M backend addresses).
    pub fn set_maglev(&mut self, slot: u32, table: &[Ipv4Addr]) -> Result<()> {
        let m_len = netpath_common::MAGLEV_M;
        anyhow::ensure!(table.len() == m_len as usize, "a Maglev table has {m_len} entries, not {}", table.len());
        let mut m: Array<_, u32> = self.map(map_names::MAGLEV)?;
        for (i, a) in table.iter().enumerate() {
            m.set(slot * m_len + i as u32, wire_addr(*a), 0).context("writing a Maglev table")?;
        }
        Ok(())
    }

    /// What the firewall's tries hold (a starting daemon diffs its rules against it).
    pub fn policy_entries(&mut self) -> Result<crate::firewall::Applied> {
        use netpath_common::{PolicyPortKey, PolicySrcKey, PolicyVerdict};
        let src: LpmTrie<_, PolicySrcKey, u32> = self.map(map_names::POLICY_SRC)?;
        let src: Vec<_> = src.iter().filter_map(|r| r.ok()).map(|(k, v)| ((k.prefix_len(), k.data()), v)).collect();
        let ports: LpmTrie<_, PolicyPortKey, PolicyVerdict> = self.map(map_names::POLICY_PORTS)?;
        let ports: Vec<_> = ports.iter().filter_map(|r| r.ok()).map(|(k, v)| ((k.prefix_len(), k.data()), v)).collect();
        Ok(crate::firewall::Applied::from_kernel(src, ports))
    }

    /// Carries out a firewall change, in the plan's order (see [`crate::firewall::Plan`]).
    pub fn apply_policy(&mut self, plan: &crate::firewall::Plan) -> Result<()> {
        use netpath_common::{PolicyPortKey, PolicySrcKey, PolicyVerdict};
        {
            let mut m: LpmTrie<_, PolicyPortKey, PolicyVerdict> = self.map(map_names::POLICY_PORTS)?;
            for ((len, k), v) in &plan.put_ports {
                m.insert(&LpmKey::new(*len, *k), *v, 0)
                    .context("writing a firewall verdict (is POLICY_PORTS full?)")?;
            }
        }
        {
            let mut m: LpmTrie<_, PolicySrcKey, u32> = self.map(map_names::POLICY_SRC)?;
            for ((len, k), v) in &plan.put_src {
                m.insert(&LpmKey::new(*len, *k), *v, 0)
                    .context("writing a firewall source prefix (is POLICY_SRC full?)")?;
            }
            for (len, k) in &plan.del_src {
                let _ = m.remove(&LpmKey::new(*len, *k));
            }
        }
        let mut m: LpmTrie<_, PolicyPortKey, PolicyVerdict> = self.map(map_names::POLICY_PORTS)?;
        for (len, k) in &plan.del_ports {
            let _ = m.remove(&LpmKey::new(*len, *k));
        }
        Ok(())
    }

    /// `--keep-host-firewall`: known flows take the kernel's forwarding path (or the fast
    /// paths again).
    pub fn set_keep_host_firewall(&mut self, on: bool) -> Result<()> {
        let mut cfg: Array<_, u64> = self.map(map_names::CONFIG)?;
        cfg.set(config::KEEP_HOST_FIREWALL, u64::from(on), 0).context("setting --keep-host-firewall")
    }

    fn ct(&mut self) -> Result<BpfHashMap<&mut MapData, Tuple, CtEntry>> {
        self.map(map_names::CT)
    }

    /// The conntrack table through a descriptor of its own (see [`FlowTable`]).
    pub fn flow_table(&self) -> Result<FlowTable> {
        let m = self.ebpf.map(map_names::CT).context("map CT missing from the eBPF object")?;
        let data = match m {
            aya::maps::Map::HashMap(d) | aya::maps::Map::LruHashMap(d) => d,
            _ => anyhow::bail!("map CT has an unexpected type"),
        };
        let fd = data.fd().as_fd().try_clone_to_owned().context("duplicating the conntrack descriptor")?;
        Ok(FlowTable::new(fd))
    }

    /// Expires idle flows (both entries of a flow go together). Returns the entries that went.
    pub fn expire_flows(&self, now_ns: u64) -> Result<Vec<(Tuple, CtEntry)>> {
        self.flow_table()?.expire(now_ns)
    }

    /// CT_PORTS (see ct_ports.rs); None for an object without it. For tests and diagnostics.
    pub fn ct_ports(&self) -> Result<Option<CtPorts>> {
        if !ct_ports::present(&self.ebpf) {
            return Ok(None);
        }
        ct_ports::marked(&self.ebpf).map(Some)
    }

    /// The NAT table, for tests and `netpath` diagnostics.
    pub fn flows(&mut self) -> Result<Vec<(Tuple, CtEntry)>> {
        Ok(self.ct()?.iter().filter_map(|r| r.ok()).collect())
    }

    pub fn counters(&mut self) -> Result<Counters> {
        let mut c = Counters::default();
        let drops: PerCpuArray<_, u64> = self.map(map_names::DROPS)?;
        for (i, name) in drop_reason::NAMES.iter().enumerate() {
            c.drops.insert(name, drops.get(&(i as u32), 0).map(|v| v.iter().sum()).unwrap_or(0));
        }
        let cts: PerCpuArray<_, u64> = self.map(map_names::CT_STATS)?;
        for (i, name) in ct_stat::NAMES.iter().enumerate() {
            c.conntrack.insert(name, cts.get(&(i as u32), 0).map(|v| v.iter().sum()).unwrap_or(0));
        }
        // ct_entries: filled by the caller from a FlowTable, without this handle's lock.
        c.endpoints = self.endpoint_keys()?.len();
        c.published_ports = self.port_keys()?.len();
        c.ct_capacity = self.ct_capacity;
        // An object from before flow events has no switch: off.
        c.flow_events = self.flow_events_on().unwrap_or(false);
        c.xdp.setting = self.xdp;
        c.xdp.uplinks = self.links().xdp_links(prog_names::UPLINK_XDP).into_iter().collect();
        Ok(c)
    }

    /// Periodic upkeep (the daemon calls it every few seconds): table pressure warnings, and
    /// the pins of links whose interface disappeared without the daemon detaching it (a
    /// container namespace deleted under us takes its veth along).
    pub fn housekeeping(&mut self) {
        if let Err(e) = self.check_pressure() {
            warn!("checking table pressure: {e:#}");
        }
    }

    /// Logs (and returns) one warning per call — the daemon calls it every few seconds — for
    /// each kind of table pressure that dropped new flows since the last call: a full
    /// conntrack table, no free masquerade port. Established flows are not affected by either.
    pub fn check_pressure(&mut self) -> Result<Vec<String>> {
        let drops: PerCpuArray<_, u64> = self.map(map_names::DROPS)?;
        let totals: Vec<(u32, u64)> = [drop_reason::CT_FULL, drop_reason::NAT_PORTS_EXHAUSTED]
            .into_iter()
            .map(|r| (r, drops.get(&r, 0).map(|v| v.iter().sum()).unwrap_or(0)))
            .collect();
        let mut moved = vec![];
        for (reason, total) in totals {
            let last = self.last_drops.insert(reason, total);
            // The first look only learns where the counter stands (it survives restarts).
            if let Some(last) = last
                && total > last
            {
                moved.push((reason, total - last));
            }
        }
        let mut warnings = vec![];
        for (reason, n) in moved {
            let name = drop_reason::NAMES[reason as usize];
            let w = if reason == drop_reason::CT_FULL {
                let entries = self.ct()?.keys().count();
                format!(
                    "conntrack table full ({entries} of {} entries): {n} new flows dropped ({name}) since the last check; established flows are unaffected",
                    self.ct_capacity
                )
            } else {
                format!("no free source port to masquerade with: {n} new flows dropped ({name}) since the last check")
            };
            warn!("{w}");
            warnings.push(w);
        }
        Ok(warnings)
    }

    /// The links, shared, for changing them without this datapath's lock (see
    /// [`links::SharedLinks`]).
    pub fn shared_links(&self) -> links::SharedLinks {
        self.links.clone()
    }

    fn links(&self) -> std::sync::MutexGuard<'_, links::Links> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Attaches the container program to an endpoint's host-side veth (adopts it if it still
    /// is). Idempotent.
    pub fn attach_endpoint(&mut self, host_ifname: &str, ifindex: u32) -> Result<()> {
        links::attach_tcx(&self.links, host_ifname, ifindex, CONTAINER_PROG).map(drop)
    }

    /// Attaches the NAT programs to an uplink and records the address masqueraded traffic
    /// leaves with; with `--xdp`, uplink_xdp too (`mac`: the uplink's). Idempotent; a new
    /// address replaces the old one.
    pub fn attach_uplink(
        &mut self,
        ifname: &str,
        ifindex: u32,
        addr: Option<Ipv4Addr>,
        mac: Option<[u8; 6]>,
    ) -> Result<()> {
        self.set_uplink_addr(ifindex, addr)?;
        attach_pair(&self.links, ifname, ifindex, UPLINK_PROGS)?;
        self.attach_uplink_xdp(ifname, ifindex, mac);
        Ok(())
    }

    /// `--xdp` (before the uplinks are attached).
    pub fn set_xdp(&mut self, setting: XdpSetting) {
        self.xdp = setting;
    }

    pub fn xdp_setting(&self) -> XdpSetting {
        self.xdp
    }

    /// uplink_xdp on an uplink, in the first mode of the setting its driver takes. XDP only
    /// speeds up what TC does, so an uplink it cannot run on keeps TC alone, with a warning.
    fn attach_uplink_xdp(&mut self, ifname: &str, ifindex: u32, mac: Option<[u8; 6]>) {
        let driver = match self.xdp {
            XdpSetting::Auto => crate::netlink::ethtool::driver(ifname)
                .map_err(|e| warn!("uplink {ifname}: {e:#}; --xdp auto leaves it to TC"))
                .ok(),
            _ => None,
        };
        let modes = self.xdp.modes(driver.as_deref());
        if modes.is_empty() {
            if self.xdp == XdpSetting::Auto {
                tracing::debug!(
                    "uplink {ifname}: driver {}: TC alone (--xdp auto)",
                    driver.as_deref().unwrap_or("unknown")
                );
            }
            // An earlier daemon's: its link is released with the other unclaimed ones.
            let _ = self.set_xdp_uplink(ifindex, None);
            return;
        }
        let Some(mac) = mac else {
            warn!("uplink {ifname}: no MAC address, so no XDP (TC alone)");
            return;
        };
        if let Err(e) = self.set_xdp_uplink(ifindex, Some(mac)) {
            warn!("uplink {ifname}: {e:#}; TC alone");
            return;
        }
        let mut errors = vec![];
        for &mode in modes {
            match links::attach_xdp(&self.links, ifname, ifindex, prog_names::UPLINK_XDP, mode) {
                Ok(made) => {
                    if made {
                        info!("uplink {ifname}: XDP in {} mode", mode.name());
                    }
                    return;
                }
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        warn!("uplink {ifname}: no XDP ({}); TC alone", errors.join("; "));
        let _ = self.set_xdp_uplink(ifindex, None);
    }

    /// Detaches the NAT programs from an uplink and forgets its address.
    pub fn detach_uplink(&mut self, ifindex: u32) -> Result<()> {
        let pins = self.links().take_ifindex(ifindex, &[UPLINK_PROGS[0], UPLINK_PROGS[1], prog_names::UPLINK_XDP]);
        links::drop_pins(&pins, true);
        let _ = self.set_xdp_uplink(ifindex, None);
        self.set_uplink_addr(ifindex, None)
    }

    /// Container veth `ifindex` (host side) as a target of uplink_xdp's redirects, or not.
    /// The daemon makes it one once the veth can take them (see XdpSetting::needs_peer_napi);
    /// until then uplink_xdp leaves its flows to TC.
    pub fn set_xdp_port(&mut self, ifindex: u32, on: bool) -> Result<()> {
        let mut ports: DevMapHash<_> = self.map(map_names::XDP_PORTS)?;
        if on {
            ports.insert(ifindex, ifindex, None, 0).with_context(|| format!("adding veth {ifindex} to XDP_PORTS"))?;
        } else {
            let _ = ports.remove(ifindex);
        }
        Ok(())
    }

    /// The ifindexes of the interfaces the uplink programs are attached to.
    pub fn uplink_ifindexes(&self) -> Vec<u32> {
        self.links().ifindexes(prog_names::UPLINK_IN)
    }

    /// Every container address the datapath knows.
    pub fn endpoint_keys(&mut self) -> Result<Vec<Ipv4Addr>> {
        let m: BpfHashMap<_, u32, EndpointInfo> = self.map(map_names::ENDPOINTS)?;
        Ok(m.keys().filter_map(|r| r.ok()).map(|k| Ipv4Addr::from(k.to_ne_bytes())).collect())
    }

    /// Detaches the container program from an endpoint's veth. The veth may already be gone
    /// (the kernel drops tcx links with their device), so detach errors are not failures.
    pub fn detach_endpoint(&mut self, ifindex: u32) {
        let pins = self.links().take_ifindex(ifindex, &[CONTAINER_PROG]);
        links::drop_pins(&pins, true);
    }
}

/// Loads a program, again when the verifier was interrupted: it gives up with EAGAIN when a
/// signal is pending mid-verification (a child exiting, say). Signals are blocked on this
/// thread for the load, so a process-directed one goes to another thread or waits the few
/// milliseconds; five attempts as libbpf makes stay for one aimed at this thread. (Retries
/// alone were not enough: a test process whose other threads spawn commands got EAGAIN five
/// times in a row.)
fn retry_interrupted(mut load: impl FnMut() -> Result<(), ProgramError>) -> Result<(), ProgramError> {
    use nix::sys::signal::{SigSet, SigmaskHow, pthread_sigmask};
    let mut old = SigSet::empty();
    let blocked = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&SigSet::all()), Some(&mut old)).is_ok();
    let mut r = load();
    for _ in 1..5 {
        match &r {
            Err(ProgramError::LoadError { io_error, .. }) if io_error.raw_os_error() == Some(libc::EAGAIN) => {
                r = load()
            }
            _ => break,
        }
    }
    if blocked {
        // Restoring the mask delivers whatever arrived meanwhile.
        let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    }
    r
}

/// Attaches an ingress/egress program pair (an uplink's); on failure nothing this call made
/// stays attached.
fn attach_pair(l: &links::SharedLinks, ifname: &str, ifindex: u32, [ingress, egress]: [&str; 2]) -> Result<()> {
    let made = links::attach_tcx(l, ifname, ifindex, ingress)?;
    if let Err(e) = links::attach_tcx(l, ifname, ifindex, egress) {
        if made {
            let pins = l.lock().unwrap_or_else(|e| e.into_inner()).take_ifindex(ifindex, &[ingress]);
            links::drop_pins(&pins, true);
        }
        return Err(e);
    }
    Ok(())
}

/// The container programs' links, changed without the datapath's lock: attaching and
/// detaching wait for the kernel (an RCU grace period under RTNL), map updates should not.
#[derive(Clone)]
pub struct EndpointLinks(links::SharedLinks);

impl EndpointLinks {
    pub fn new(dp: &Datapath) -> Self {
        Self(dp.shared_links())
    }

    /// Attaches (or claims) the container program on a container's host veth.
    pub fn attach(&self, host_ifname: &str, ifindex: u32) -> Result<()> {
        links::attach_tcx(&self.0, host_ifname, ifindex, CONTAINER_PROG).map(drop)
    }

    /// Removes the pins of links whose interface was deleted behind the daemon's back.
    pub fn prune_defunct(&self) {
        let n = links::prune_defunct(&self.0);
        if n > 0 {
            info!("removed {n} link pins of interfaces that are gone");
        }
    }

    /// Drops the links of an endpoint whose veth the caller already deleted (the kernel made
    /// them defunct with it): no detach, so no grace period to wait for.
    pub fn forget(&self, ifindex: u32) {
        let pins = self.0.lock().unwrap_or_else(|e| e.into_inner()).take_ifindex(ifindex, &[CONTAINER_PROG]);
        links::drop_pins(&pins, false);
    }
}

fn port_key(host: Option<Ipv4Addr>, port: u16, proto: u8) -> PortKey {
    PortKey { addr: host.map(wire_addr).unwrap_or(0), port: wire_port(port), proto, _pad: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xdp_auto_is_native_on_nic_drivers_and_tc_alone_on_veths_and_unknowns() {
        assert_eq!(XdpSetting::Auto.modes(Some("mlx5_core")), &[XdpMode::Native]);
        assert_eq!(XdpSetting::Auto.modes(Some("virtio_net")), &[XdpMode::Native]);
        assert!(XdpSetting::Auto.modes(Some("veth")).is_empty());
        assert!(XdpSetting::Auto.modes(None).is_empty());
        // The explicit settings do what they say on any driver.
        assert_eq!(XdpSetting::Native.modes(Some("veth")), &[XdpMode::Native]);
        assert_eq!(XdpSetting::Generic.modes(None), &[XdpMode::Generic]);
        assert!(XdpSetting::Off.modes(Some("mlx5_core")).is_empty());
    }
}
