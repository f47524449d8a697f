//! Two lab "hosts" joined by an underlay bridge, with containers on an overlay network that
//! spans them: through netpath's datapath without a daemon (the real eBPF object loaded by
//! `Datapath::load`, the maps programmed through the `Overlay` API, as the daemon does), or
//! through the kernel's own VXLAN as Docker's overlay driver builds it (a bridge with a VXLAN
//! port, static FDB and proxy-ARP neighbour entries) for the benchmark's comparison. The
//! namespaces belong to a [`Lab`], which removes them (and the bpffs mounts) when dropped.
//!
//! IPv6 is off in every namespace, so the only frames on the links are the test's own.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use netpath::datapath::{Datapath, Overlay, RemoteEndpoint, VXLAN_OVERHEAD, VXLAN_PORT};
use netpath::netlink::{Netlink, netns};
use netpath_common::net_flags;

use crate::{Lab, in_ns, must};

/// The overlay network, the same on both hosts: its datapath id, VNI, subnet and gateway.
pub const NET: u32 = 1;
pub const VNI: u32 = 4097;
pub const SUBNET: &str = "10.210.0.0/24";
pub const GW: &str = "10.210.0.1";
/// Each host's bridge for the overlay network.
pub const BRIDGE: &str = "np-ov1";
pub const UNDERLAY_MTU: u32 = 1500;
pub const OVERLAY_MTU: u32 = UNDERLAY_MTU - VXLAN_OVERHEAD;
/// Each host's underlay interface (holding its underlay address).
pub const UNDERLAY_IF: &str = "eth1";
/// The kernel variant's VXLAN device (a bridge port).
pub const KERNEL_VXLAN: &str = "vxlan0";

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

pub struct Container {
    pub name: &'static str,
    pub ip: &'static str,
    pub ns: PathBuf,
    /// Its veth's host side (in its host's namespace).
    pub host_if: String,
    pub mac: [u8; 6],
}

pub struct Host {
    pub ns: PathBuf,
    /// Its datapath's bpffs dir (maps and link pins).
    pub pins: PathBuf,
    pub underlay_ip: &'static str,
    /// netpath's datapath (None for the kernel variant, and while "the daemon" is down).
    pub dp: Option<Datapath>,
    pub overlay: Option<Overlay>,
    pub containers: Vec<Container>,
    pub kind: Kind,
}

/// Which datapath carries the overlay.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// netpath's programs with the VXLAN device decapsulating everything (`vxlan_in` on it):
    /// what an object without `underlay_in` does.
    Netpath,
    /// netpath as the daemon sets it up: `underlay_in` on the underlay interface decapsulates
    /// what it can ahead of the device, the device (`vxlan_in`) the rest.
    NetpathUnderlay,
    /// Kernel VXLAN with static FDB entries and a Linux bridge (Docker's overlay driver).
    Kernel,
}

/// Runs `f` on a thread inside the namespace at `ns`, with a netlink connection there.
pub fn in_netns<T: Send>(ns: &Path, f: impl FnOnce(&tokio::runtime::Runtime, &Netlink) -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            netns::enter(ns).expect("entering the host namespace");
            // Current-thread: netlink sockets and their tasks stay in this namespace.
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let nl = rt.block_on(async { Netlink::current() }).unwrap();
            f(&rt, &nl)
        })
        .join()
        .expect("namespace thread")
    })
}

fn no_ipv6(ns: &Path) {
    must(in_ns(ns, "sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]));
}

/// No netfilter hooks on a namespace's bridges: whether `br_netfilter` is loaded depends on
/// what ran on the machine before (a Docker-style iptables baseline loads it), and while it is,
/// every frame a bridge forwards goes through its hooks (on the hosts' overlay bridges, about
/// 4% more CPU per Gbit/s for the kernel variant in the bench's stream; netpath's overlay
/// traffic never crosses them; on the underlay's, both pay). Off, every run measures the same
/// thing, the baseline at its best. `-e`: the key exists only with the module.
fn no_bridge_netfilter(ns: &Path) {
    must(in_ns(
        ns,
        "sysctl",
        &["-qew", "net.bridge.bridge-nf-call-iptables=0", "net.bridge.bridge-nf-call-arptables=0"],
    ));
}

/// Two hosts on an underlay bridge, each with its containers (name, address) on the overlay;
/// every host knows the other's containers.
/// Waits until link `dev` in `ns` is operationally up (its queue attached).
fn wait_up(ns: &Path, dev: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let out = must(in_ns(ns, "ip", &["-o", "link", "show", "dev", dev]));
        if out.contains("state UP") {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{dev} in {} is not up: {out}", ns.display());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

pub fn two_hosts(
    lab: &Lab,
    kind: Kind,
    a: &[(&'static str, &'static str)],
    b: &[(&'static str, &'static str)],
) -> [Host; 2] {
    let underlay = lab.add_ns("underlay");
    no_ipv6(&underlay);
    no_bridge_netfilter(&underlay);
    must(in_ns(&underlay, "ip", &["link", "add", "br0", "type", "bridge"]));
    must(in_ns(&underlay, "ip", &["link", "set", "br0", "up"]));
    let mut hosts = vec![];
    for (tag, underlay_ip, containers) in [("a", "192.168.77.1", a), ("b", "192.168.77.2", b)] {
        let ns = lab.add_ns(&format!("host-{tag}"));
        no_ipv6(&ns);
        no_bridge_netfilter(&ns);
        let port = format!("ul-{tag}");
        let peer_ns = ns.display().to_string();
        let mtu = UNDERLAY_MTU.to_string();
        must(in_ns(
            &underlay,
            "ip",
            &["link", "add", &port, "mtu", &mtu, "type", "veth", "peer", "name", "eth1", "netns", &peer_ns],
        ));
        must(in_ns(&underlay, "ip", &["link", "set", &port, "master", "br0", "up"]));
        must(in_ns(&ns, "ip", &["addr", "add", &format!("{underlay_ip}/24"), "dev", "eth1"]));
        must(in_ns(&ns, "ip", &["link", "set", "eth1", "up"]));
        let containers: Vec<Container> = containers
            .iter()
            .map(|(name, addr)| {
                let cns = lab.add_ns(name);
                no_ipv6(&cns);
                Container {
                    name,
                    ip: addr,
                    ns: cns,
                    host_if: format!("v{name}"),
                    mac: netpath::ipam::mac_for(ip(addr)),
                }
            })
            .collect();
        let pins = lab.dir.join(format!("bpf-{tag}"));
        let (dp, overlay) = match kind {
            Kind::Netpath | Kind::NetpathUnderlay => {
                let underlay_in = kind == Kind::NetpathUnderlay;
                let (dp, overlay) = netpath_host(&ns, &pins, underlay_ip, &containers, underlay_in);
                (Some(dp), Some(overlay))
            }
            Kind::Kernel => {
                kernel_host(&ns, underlay_ip, &containers);
                (None, None)
            }
        };
        for c in &containers {
            must(in_ns(&c.ns, "ip", &["addr", "add", &format!("{}/24", c.ip), "dev", "eth0"]));
            must(in_ns(&c.ns, "ip", &["link", "set", "eth0", "up"]));
            must(in_ns(&c.ns, "ip", &["route", "add", "default", "via", GW]));
        }
        hosts.push(Host { ns, pins, underlay_ip, dp, overlay, containers, kind });
    }
    let [a, b]: [Host; 2] = hosts.try_into().unwrap_or_else(|_| unreachable!());
    // Until the kernel's link watcher has run for a new link, its queue drops what is sent
    // (noop qdisc): on a busy machine that lost a test's first ping. Wait for every link.
    for port in ["ul-a", "ul-b"] {
        wait_up(&underlay, port);
    }
    for h in [&a, &b] {
        wait_up(&h.ns, "eth1");
        for c in &h.containers {
            wait_up(&h.ns, &c.host_if);
            wait_up(&c.ns, "eth0");
        }
    }
    for (from, to) in [(&a, &b), (&b, &a)] {
        for c in &to.containers {
            match &from.overlay {
                Some(o) => {
                    let ep = RemoteEndpoint { vni: VNI, ip: ip(c.ip), mac: c.mac, node_ip: ip(to.underlay_ip) };
                    o.overlay_add_remote(&ep).unwrap();
                }
                None => {
                    // What Docker's overlay driver programs for a remote endpoint.
                    let mac = netpath::ipam::format_mac(&c.mac);
                    let fdb = ["fdb", "append", &mac, "dev", KERNEL_VXLAN, "dst", to.underlay_ip, "self", "permanent"];
                    must(in_ns(&from.ns, "bridge", &fdb));
                    let neigh = ["neigh", "replace", c.ip, "lladdr", &mac, "dev", KERNEL_VXLAN, "nud", "permanent"];
                    must(in_ns(&from.ns, "ip", &neigh));
                }
            }
        }
    }
    [a, b]
}

/// netpath's side of a host: the bridge, the containers' veths with the container program, the
/// overlay's maps and the VXLAN device, as the daemon makes them.
fn netpath_host(
    ns: &Path,
    pins: &Path,
    underlay_ip: &str,
    containers: &[Container],
    underlay_in: bool,
) -> (Datapath, Overlay) {
    in_netns(ns, |rt, nl| {
        let br = rt.block_on(nl.ensure_bridge(BRIDGE, ip(GW), 24, Some(OVERLAY_MTU))).unwrap();
        let mut dp = Datapath::load(pins).expect("loading the datapath");
        dp.set_network(SUBNET.parse().unwrap(), NET, ip(GW), net_flags::MASQUERADE | net_flags::OVERLAY).unwrap();
        dp.sync_host_addrs(&[ip(GW), ip(underlay_ip)]).unwrap();
        let overlay = dp.overlay().unwrap();
        overlay.overlay_set_network(VNI, NET).unwrap();
        for c in containers {
            rt.block_on(nl.create_veth(&c.host_if, br, &c.ns, "eth0", c.mac, Some(OVERLAY_MTU))).unwrap();
            let ifindex = rt.block_on(nl.require_link(&c.host_if)).unwrap();
            dp.set_endpoint(ip(c.ip), ifindex, NET, c.mac, netpath::ipam::mac_for(ip(GW))).unwrap();
            dp.attach_endpoint(&c.host_if, ifindex).unwrap();
            overlay.overlay_add_local(VNI, ip(c.ip), ifindex, c.mac).unwrap();
        }
        rt.block_on(overlay.ensure_vxlan(nl, UNDERLAY_MTU)).expect("making the VXLAN device");
        if underlay_in {
            let ifindex = rt.block_on(nl.require_link(UNDERLAY_IF)).unwrap();
            assert!(rt.block_on(overlay.overlay_attach_underlay(UNDERLAY_IF, ifindex)).unwrap(), "no underlay_in");
        }
        (dp, overlay)
    })
}

/// The kernel's side: a bridge with a VXLAN port (the VNI, no learning, proxy ARP from its
/// neighbour table, the overlay's MTU) and the containers' veths, no eBPF at all. The outer
/// UDP checksum is off, as netpath sends it (zero, as RFC 7348 recommends; the kernel's
/// default and Docker's is on): the two carry the same packets.
fn kernel_host(ns: &Path, underlay_ip: &str, containers: &[Container]) {
    let mtu = OVERLAY_MTU.to_string();
    let ip_ns = |args: &[&str]| must(in_ns(ns, "ip", args));
    ip_ns(&["link", "add", BRIDGE, "mtu", &mtu, "type", "bridge"]);
    ip_ns(&["addr", "add", &format!("{GW}/24"), "dev", BRIDGE]);
    ip_ns(&["link", "set", BRIDGE, "up"]);
    let (vni, port) = (VNI.to_string(), VXLAN_PORT.to_string());
    ip_ns(&[
        "link",
        "add",
        KERNEL_VXLAN,
        "mtu",
        &mtu,
        "type",
        "vxlan",
        "id",
        &vni,
        "dstport",
        &port,
        "local",
        underlay_ip,
        "nolearning",
        "proxy",
        "noudpcsum",
    ]);
    ip_ns(&["link", "set", KERNEL_VXLAN, "master", BRIDGE, "up"]);
    for c in containers {
        let cns = c.ns.display().to_string();
        ip_ns(&["link", "add", &c.host_if, "mtu", &mtu, "type", "veth", "peer", "name", "eth0", "netns", &cns]);
        ip_ns(&["link", "set", &c.host_if, "master", BRIDGE, "up"]);
        let mac = netpath::ipam::format_mac(&c.mac);
        must(in_ns(&c.ns, "ip", &["link", "set", "eth0", "address", &mac, "mtu", &mtu]));
    }
}

impl Host {
    pub fn container(&self, name: &str) -> &Container {
        self.containers.iter().find(|c| c.name == name).unwrap()
    }

    /// netpath's overlay handle (not the kernel variant's).
    pub fn overlay(&self) -> &Overlay {
        self.overlay.as_ref().expect("a netpath host")
    }

    pub fn dp(&mut self) -> &mut Datapath {
        self.dp.as_mut().expect("a loaded datapath")
    }

    /// What a daemon restart does: the datapath is dropped (its pinned maps and links keep
    /// forwarding meanwhile, `during` runs then), loaded again, and the endpoints and the VXLAN
    /// device claimed again; what nobody claimed is released.
    pub fn reload(&mut self, during: impl FnOnce()) {
        drop(self.dp.take());
        during();
        let mut dp = Datapath::load(&self.pins).expect("a second datapath");
        let containers = &self.containers;
        let kind = self.kind;
        let overlay = in_netns(&self.ns, |rt, nl| {
            for c in containers {
                let ifindex = rt.block_on(nl.require_link(&c.host_if)).unwrap();
                dp.attach_endpoint(&c.host_if, ifindex).unwrap();
            }
            let overlay = dp.overlay().unwrap();
            rt.block_on(overlay.ensure_vxlan(nl, UNDERLAY_MTU)).expect("claiming the VXLAN device");
            if kind == Kind::NetpathUnderlay {
                let ifindex = rt.block_on(nl.require_link(UNDERLAY_IF)).unwrap();
                assert!(rt.block_on(overlay.overlay_attach_underlay(UNDERLAY_IF, ifindex)).unwrap());
            }
            dp.release_unclaimed();
            overlay
        });
        self.overlay = Some(overlay);
        self.dp = Some(dp);
    }

    /// Packets link `dev` of this host received, as the kernel counts them.
    pub fn rx_packets(&self, dev: &str) -> u64 {
        let out = must(in_ns(&self.ns, "ip", &["-j", "-s", "link", "show", "dev", dev]));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v[0]["stats64"]["rx"]["packets"].as_u64().unwrap_or_else(|| panic!("no rx counter in {out}"))
    }

    /// The datapath's drops with a count, by reason.
    pub fn drops(&mut self) -> Vec<(&'static str, u64)> {
        self.dp().counters().unwrap().drops.into_iter().filter(|(_, n)| *n > 0).collect()
    }
}

/// The uplink of a host that has an outside client ([`Host::add_client`]): the host's side and
/// the client's address.
pub const UPLINK_IP: &str = "10.99.0.1";
pub const CLIENT_IP: &str = "10.99.0.2";

impl Host {
    /// This host's underlay address as its overlay's own (what the cluster side sets from
    /// `--node-ip`): the routing mesh and host processes need it.
    pub fn set_node_ip(&self) {
        self.overlay().overlay_set_node_ip(Some(ip(self.underlay_ip))).unwrap();
    }

    /// A client outside this host: a namespace on a link of its own to the host's `eth0`, an
    /// uplink with netpath's uplink programs (as the daemon attaches them), the host at
    /// [`UPLINK_IP`], the client at [`CLIENT_IP`]. The host's addresses are then its overlay
    /// gateway, its underlay address and the uplink's. Returns the client's namespace.
    pub fn add_client(&mut self, lab: &Lab, name: &str) -> PathBuf {
        let client = lab.add_ns(name);
        no_ipv6(&client);
        let host_ns = self.ns.display().to_string();
        must(in_ns(&client, "ip", &["link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &host_ns]));
        must(in_ns(&client, "ip", &["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth0"]));
        must(in_ns(&client, "ip", &["link", "set", "eth0", "up"]));
        must(in_ns(&self.ns, "ip", &["addr", "add", &format!("{UPLINK_IP}/24"), "dev", "eth0"]));
        must(in_ns(&self.ns, "ip", &["link", "set", "eth0", "up"]));
        // A host forwards, as the daemon makes it (the mesh's replies are routed out by FIB).
        must(in_ns(&self.ns, "sysctl", &["-qw", "net.ipv4.ip_forward=1"]));
        let underlay = self.underlay_ip;
        let dp = self.dp.as_mut().expect("a loaded datapath");
        in_netns(&self.ns, |rt, nl| {
            let ifindex = rt.block_on(nl.require_link("eth0")).unwrap();
            dp.attach_uplink("eth0", ifindex, Some(ip(UPLINK_IP)), None).unwrap();
            dp.sync_host_addrs(&[ip(GW), ip(underlay), ip(UPLINK_IP)]).unwrap();
        });
        client
    }

    /// Attaches `overlay_bridge_out` to this host's overlay bridge, as the daemon does for an
    /// overlay network: its host processes then reach the other host's containers.
    pub fn attach_bridge(&self) {
        let overlay = self.overlay().clone();
        in_netns(&self.ns, |rt, nl| {
            let ifindex = rt.block_on(nl.require_link(BRIDGE)).unwrap();
            rt.block_on(overlay.overlay_attach_bridge(BRIDGE, ifindex)).unwrap();
        });
    }
}
