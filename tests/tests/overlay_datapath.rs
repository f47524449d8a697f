//! The overlay datapath end to end, without a daemon: two lab "hosts" (network namespaces)
//! joined by an underlay bridge, each with the real eBPF object loaded by the code the daemon
//! uses (`Datapath::load`, the container program on each veth), a local bridge with veth
//! containers, the VXLAN device made by `Overlay::ensure_vxlan`, and the maps programmed
//! through the `Overlay` API. Then real traffic: ping and TCP between containers on the two
//! hosts, ARP for the remote container answered on its own host (no broadcast anywhere), the
//! path's MTU (underlay 1500 → overlay 1450), and decapsulation by VNI: crafted VXLAN packets
//! from the underlay with an unknown VNI, or for an address that is not a container of that
//! VNI, are dropped and counted; one with the right VNI is delivered.
//!
//! IPv6 is off in every namespace so the only frames on the links are the test's own, and the
//! counters can be compared exactly.

use std::net::{Ipv4Addr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use netpath::datapath::{Datapath, Overlay, RemoteEndpoint, VXLAN_DEV, VXLAN_PORT};
use netpath::netlink::{Netlink, netns};
use netpath_common::net_flags;
use netpath_tests::packet::Ipv4Packet;
use netpath_tests::{Lab, in_ns, must};

/// The overlay network, the same on both hosts: its datapath id, VNI, subnet and gateway.
const NET: u32 = 1;
const VNI: u32 = 4097;
const SUBNET: &str = "10.210.0.0/24";
const GW: &str = "10.210.0.1";
const BRIDGE: &str = "np-ov1";
const UNDERLAY_MTU: u32 = 1500;
const OVERLAY_MTU: u32 = UNDERLAY_MTU - netpath::datapath::VXLAN_OVERHEAD;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

struct Container {
    name: &'static str,
    ip: &'static str,
    ns: PathBuf,
    /// Its veth's host side (in its host's namespace).
    host_if: String,
    mac: [u8; 6],
}

struct Host {
    ns: PathBuf,
    /// Its datapath's bpffs dir (maps and link pins).
    pins: PathBuf,
    underlay_ip: &'static str,
    /// None while "the daemon" is down.
    dp: Option<Datapath>,
    overlay: Overlay,
    containers: Vec<Container>,
}

/// Runs `f` on a thread inside the namespace at `ns`, with a netlink connection there.
fn in_netns<T: Send>(ns: &Path, f: impl FnOnce(&tokio::runtime::Runtime, &Netlink) -> T + Send) -> T {
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

/// Two hosts on an underlay bridge, each with its containers on the overlay; every host
/// knows the other's containers as remote endpoints.
fn two_hosts(lab: &Lab, a: &[(&'static str, &'static str)], b: &[(&'static str, &'static str)]) -> [Host; 2] {
    let underlay = lab.add_ns("underlay");
    no_ipv6(&underlay);
    must(in_ns(&underlay, "ip", &["link", "add", "br0", "type", "bridge"]));
    must(in_ns(&underlay, "ip", &["link", "set", "br0", "up"]));
    let mut hosts = vec![];
    for (tag, underlay_ip, containers) in [("a", "192.168.77.1", a), ("b", "192.168.77.2", b)] {
        let ns = lab.add_ns(&format!("host-{tag}"));
        no_ipv6(&ns);
        let port = format!("ul-{tag}");
        let peer_ns = ns.display().to_string();
        must(in_ns(
            &underlay,
            "ip",
            &["link", "add", &port, "mtu", "1500", "type", "veth", "peer", "name", "eth1", "netns", &peer_ns],
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
        let (dp, overlay) = in_netns(&ns, |rt, nl| {
            let pins = &pins;
            let br = rt.block_on(nl.ensure_bridge(BRIDGE, ip(GW), 24, Some(OVERLAY_MTU))).unwrap();
            let mut dp = Datapath::load(pins).expect("loading the datapath");
            dp.set_network(SUBNET.parse().unwrap(), NET, ip(GW), net_flags::MASQUERADE | net_flags::OVERLAY).unwrap();
            dp.sync_host_addrs(&[ip(GW), ip(underlay_ip)]).unwrap();
            let overlay = dp.overlay().unwrap();
            overlay.overlay_set_network(VNI, NET).unwrap();
            for c in &containers {
                rt.block_on(nl.create_veth(&c.host_if, br, &c.ns, "eth0", c.mac, Some(OVERLAY_MTU))).unwrap();
                let ifindex = rt.block_on(nl.require_link(&c.host_if)).unwrap();
                dp.set_endpoint(ip(c.ip), ifindex, NET, c.mac, netpath::ipam::mac_for(ip(GW))).unwrap();
                dp.attach_endpoint(&c.host_if, ifindex).unwrap();
                overlay.overlay_add_local(VNI, ip(c.ip), ifindex, c.mac).unwrap();
            }
            rt.block_on(overlay.ensure_vxlan(nl, UNDERLAY_MTU)).expect("making the VXLAN device");
            (dp, overlay)
        });
        for c in &containers {
            must(in_ns(&c.ns, "ip", &["addr", "add", &format!("{}/24", c.ip), "dev", "eth0"]));
            must(in_ns(&c.ns, "ip", &["link", "set", "eth0", "up"]));
            must(in_ns(&c.ns, "ip", &["route", "add", "default", "via", GW]));
        }
        hosts.push(Host { ns, pins, underlay_ip, dp: Some(dp), overlay, containers });
    }
    let [a, b]: [Host; 2] = hosts.try_into().unwrap_or_else(|_| unreachable!());
    for (from, to) in [(&a, &b), (&b, &a)] {
        for c in &to.containers {
            let ep = RemoteEndpoint { vni: VNI, ip: ip(c.ip), mac: c.mac, node_ip: ip(to.underlay_ip) };
            from.overlay.overlay_add_remote(&ep).unwrap();
        }
    }
    [a, b]
}

impl Host {
    fn container(&self, name: &str) -> &Container {
        self.containers.iter().find(|c| c.name == name).unwrap()
    }

    /// What a daemon restart does: the datapath is dropped (its pinned maps and links keep
    /// forwarding meanwhile, `during` runs then), loaded again, and the endpoints and the VXLAN
    /// device claimed again; what nobody claimed is released.
    fn reload(&mut self, during: impl FnOnce()) {
        drop(self.dp.take());
        during();
        let mut dp = Datapath::load(&self.pins).expect("a second datapath");
        let containers = &self.containers;
        self.overlay = in_netns(&self.ns, |rt, nl| {
            for c in containers {
                let ifindex = rt.block_on(nl.require_link(&c.host_if)).unwrap();
                dp.attach_endpoint(&c.host_if, ifindex).unwrap();
            }
            let overlay = dp.overlay().unwrap();
            rt.block_on(overlay.ensure_vxlan(nl, UNDERLAY_MTU)).expect("claiming the VXLAN device");
            dp.release_unclaimed();
            overlay
        });
        self.dp = Some(dp);
    }

    fn dp(&mut self) -> &mut Datapath {
        self.dp.as_mut().expect("a loaded datapath")
    }

    /// Packets link `dev` of this host received, as the kernel counts them.
    fn rx_packets(&self, dev: &str) -> u64 {
        let out = must(in_ns(&self.ns, "ip", &["-j", "-s", "link", "show", "dev", dev]));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v[0]["stats64"]["rx"]["packets"].as_u64().unwrap_or_else(|| panic!("no rx counter in {out}"))
    }

    /// The datapath's drops with a count, by reason.
    fn drops(&mut self) -> Vec<(&'static str, u64)> {
        self.dp().counters().unwrap().drops.into_iter().filter(|(_, n)| *n > 0).collect()
    }
}

fn ping(from: &Path, to: &str, args: &[&str]) -> std::process::Output {
    let mut a = vec!["-n", "-c", "3", "-i", "0.2", "-W", "2"];
    a.extend_from_slice(args);
    a.push(to);
    in_ns(from, "ping", &a).output().unwrap()
}

#[test]
fn containers_on_two_hosts_talk_through_the_tunnel_with_arp_answered_locally() {
    let lab = Lab::without_daemon("overlay-dp");
    let [mut a, mut b] = two_hosts(&lab, &[("a1", "10.210.0.2")], &[("b1", "10.210.0.3")]);
    let (a1, b1) = (a.container("a1"), b.container("b1"));
    let (bridge_a, bridge_b) = (a.rx_packets(BRIDGE), b.rx_packets(BRIDGE));
    let (tunnel_a, tunnel_b) = (a.rx_packets(VXLAN_DEV), b.rx_packets(VXLAN_DEV));

    // Ping across: three requests arrive on b's tunnel, three replies on a's.
    let out = ping(&a1.ns, b1.ip, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(b.rx_packets(VXLAN_DEV) - tunnel_b, 3, "only the echo requests crossed to b");
    assert_eq!(a.rx_packets(VXLAN_DEV) - tunnel_a, 3, "only the echo replies crossed to a");
    // Each container asked ARP for the other and got the remote container's own MAC, answered
    // on its own host: no broadcast reached either bridge, let alone the other host.
    let neigh = must(in_ns(&a1.ns, "ip", &["neigh", "show", b1.ip]));
    let b1_mac = netpath::ipam::format_mac(&b1.mac);
    assert!(neigh.contains(&b1_mac), "a1's ARP answer for b1: {neigh}");
    let neigh = must(in_ns(&b1.ns, "ip", &["neigh", "show", a1.ip]));
    assert!(neigh.contains(&netpath::ipam::format_mac(&a1.mac)), "b1's ARP answer for a1: {neigh}");
    assert_eq!(a.rx_packets(BRIDGE), bridge_a, "nothing of this went through a's bridge");
    assert_eq!(b.rx_packets(BRIDGE), bridge_b, "nothing of this went through b's bridge");
    // The control: ARP for an address nobody has is the bridge's, as on a bridge network
    // (the counter sees broadcasts), and still nothing crosses to b.
    let (tunnel_b, bridge_b) = (b.rx_packets(VXLAN_DEV), b.rx_packets(BRIDGE));
    let out = ping(&a1.ns, "10.210.0.50", &["-c", "1", "-W", "1"]);
    assert!(!out.status.success(), "nobody has 10.210.0.50");
    assert!(a.rx_packets(BRIDGE) > bridge_a, "a1's ARP broadcast for 10.210.0.50 reached a's bridge");
    assert_eq!((b.rx_packets(VXLAN_DEV), b.rx_packets(BRIDGE)), (tunnel_b, bridge_b), "no flood to b");

    // The overlay's MTU is the underlay's minus VXLAN's 50 bytes: a full-size packet with DF
    // set crosses (1422 + 8 + 20 = 1450 bytes of IPv4, 1500 on the underlay); one byte more
    // does not leave the container.
    let out = ping(&a1.ns, b1.ip, &["-M", "do", "-s", "1422"]);
    assert!(out.status.success(), "1450-byte DF ping: {}", String::from_utf8_lossy(&out.stdout));
    let out = ping(&a1.ns, b1.ip, &["-M", "do", "-s", "1423", "-c", "1"]);
    assert!(!out.status.success(), "1451 bytes exceed the overlay's MTU");

    // TCP both ways, with a megabyte one way (segmentation offloads through the tunnel).
    let server =
        in_ns(&b1.ns, "socat", &["-T", "10", &format!("TCP-LISTEN:8080,bind={},reuseaddr", b1.ip), "SYSTEM:wc -c"])
            .spawn()
            .unwrap();
    let mut server = KillOnDrop(server);
    let sent = in_ns(
        &a1.ns,
        "sh",
        &[
            "-c",
            &format!("head -c 1000000 /dev/zero | timeout 20 socat -t 10 - TCP:{}:8080,retry=50,interval=0.1", b1.ip),
        ],
    )
    .output()
    .unwrap();
    assert!(sent.status.success(), "{}", String::from_utf8_lossy(&sent.stderr));
    assert_eq!(String::from_utf8_lossy(&sent.stdout).trim(), "1000000", "b1 counted every byte a1 sent");
    let _ = server.0.wait();

    assert_eq!(a.drops(), vec![], "no drops on a");
    assert_eq!(b.drops(), vec![], "no drops on b");
    drop((a, b));
}

#[test]
fn decapsulation_delivers_only_a_known_vni_to_its_own_containers() {
    let lab = Lab::without_daemon("overlay-vni");
    let [a, mut b] = two_hosts(&lab, &[("va1", "10.210.0.2")], &[("vb1", "10.210.0.3")]);
    let b1 = b.container("vb1");
    let b1_ns = b1.ns.clone();
    let b1_ip = b1.ip;
    // A receiver in b1, bound before anything is sent.
    let receiver = std::thread::spawn(move || {
        netns::enter(&b1_ns).unwrap();
        let s = UdpSocket::bind((ip(b1_ip), 9999)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = vec![];
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            got.push((String::from_utf8_lossy(&buf[..n]).into_owned(), from));
            if buf[..n] == *b"last" {
                break;
            }
        }
        got
    });
    std::thread::sleep(Duration::from_millis(200));

    // VXLAN packets sent by hand from host a's underlay address to host b's VXLAN port.
    let frame = |src: &str, dst: &str, payload: &[u8]| -> Vec<u8> {
        let mut p = Ipv4Packet::udp(src, 40000, dst, 9999, payload);
        p.src_mac = netpath::ipam::mac_for(ip(src));
        p.dst_mac = [0x02, 0, 0, 0, 0, 0x01]; // vxlan_in sets the container's own
        p.build()
    };
    let vxlan = |vni: u32, inner: Vec<u8>| -> Vec<u8> {
        let mut v = vec![0x08, 0, 0, 0];
        v.extend_from_slice(&(vni << 8).to_be_bytes());
        v.extend(inner);
        v
    };
    let to_b = format!("{}:{VXLAN_PORT}", b.underlay_ip);
    in_netns(&a.ns, |_, _| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        for pkt in [
            vxlan(999, frame("10.210.0.2", b1_ip, b"unknown vni")),
            vxlan(VNI, frame("10.210.0.2", "10.210.0.99", b"nobody here")),
            vxlan(VNI, frame("10.210.0.2", GW, b"the gateway is not a container")),
            vxlan(VNI, frame("10.210.0.2", b1_ip, b"hello")),
            vxlan(VNI, frame("10.210.0.2", b1_ip, b"last")),
        ] {
            s.send_to(&pkt, &to_b).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let got = receiver.join().unwrap();
    let texts: Vec<&str> = got.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(texts, ["hello", "last"], "only the right VNI's packets for b1 arrived");
    assert!(got.iter().all(|(_, from)| from.ip() == ip("10.210.0.2")), "{got:?}");
    assert_eq!(b.drops(), vec![("isolation", 2), ("unknown-vni", 1)]);
    drop((a, b));
}

#[test]
fn a_service_on_one_host_balances_to_the_other_and_the_overlay_survives_a_datapath_reload() {
    let lab = Lab::without_daemon("overlay-svc");
    let [mut a, b] = two_hosts(&lab, &[("sa1", "10.210.0.2")], &[("sb1", "10.210.0.3")]);
    let b1 = b.container("sb1");
    // A service VIP on host a (the host holds the address, as the daemon does), whose only
    // backend is b1 on host b.
    const VIP: &str = "10.210.0.200";
    must(in_ns(&a.ns, "ip", &["addr", "add", &format!("{VIP}/32"), "dev", BRIDGE]));
    a.dp().set_maglev(0, &vec![ip(b1.ip); netpath_common::MAGLEV_M as usize]).unwrap();
    let info = netpath_common::ServiceInfo { slot: 0, target_port: 0, backends: 1, flags: 0 };
    a.dp().set_service(ip(VIP), 8080, netpath_common::proto::TCP, info).unwrap();
    let server = in_ns(
        &b1.ns,
        "socat",
        &[&format!("TCP-LISTEN:8080,bind={},reuseaddr,fork", b1.ip), "SYSTEM:echo served by b1"],
    )
    .spawn()
    .unwrap();
    let _server = KillOnDrop(server);
    let a1 = a.container("sa1");
    let a1_ns = a1.ns.clone();
    let a1_to_b1 = |what: &str| {
        let out = ping(&a1_ns, b1.ip, &["-c", "1"]);
        assert!(out.status.success(), "{what}: ping a1 → b1: {}", String::from_utf8_lossy(&out.stdout));
    };
    // The reply only reaches a1's socket with the VIP as its source: vxlan_in translated it.
    let via_vip = |what: &str| {
        let out = in_ns(
            &a1_ns,
            "timeout",
            &["10", "socat", "-T", "5", "-", &format!("TCP:{VIP}:8080,retry=50,interval=0.1")],
        )
        .output()
        .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "served by b1", "{what}: {out:?}");
    };
    a1_to_b1("before");
    via_vip("before");

    // A daemon restart on a: the pinned links keep the overlay forwarding while no datapath
    // is loaded, and the new one claims the VXLAN device's link instead of making another.
    let link_pin = a.pins.join("links").join(format!("{VXLAN_DEV}@vxlan_in"));
    assert!(link_pin.exists(), "vxlan_in's link is pinned");
    a.reload(|| {
        a1_to_b1("with no datapath loaded");
    });
    assert!(link_pin.exists(), "claimed, not released");
    a1_to_b1("after the reload");
    via_vip("after the reload");
    let mut b = b;
    assert_eq!(a.drops(), vec![]);
    assert_eq!(b.drops(), vec![]);
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
