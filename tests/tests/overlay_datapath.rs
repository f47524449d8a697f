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
//! counters can be compared exactly. The lab is `netpath_tests::overlay_lab`, which the
//! benchmark's overlay section shares.

use std::net::{Ipv4Addr, UdpSocket};
use std::path::Path;
use std::time::Duration;

use netpath::datapath::{VXLAN_DEV, VXLAN_PORT};
use netpath::netlink::netns;
use netpath_common::net_flags;
use netpath_tests::overlay_lab::{
    BRIDGE, CLIENT_IP, GW, Host, Kind, NET, SUBNET, UNDERLAY_IF, UPLINK_IP, VNI, in_netns, two_hosts,
};
use netpath_tests::packet::Ipv4Packet;
use netpath_tests::{Lab, in_ns, must};

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn ping(from: &Path, to: &str, args: &[&str]) -> std::process::Output {
    // A generous wait: the lab shares its CPUs with every other test running.
    let mut a = vec!["-n", "-c", "3", "-i", "0.2", "-W", "5"];
    a.extend_from_slice(args);
    a.push(to);
    in_ns(from, "ping", &a).output().unwrap()
}

/// Host `b`'s share of the overlay made default-deny: a ping from `a1_ns` to `b1_ip` on it
/// fails, and b counts it as policy-denied.
fn denies_by_default(b: &mut Host, a1_ns: &Path, b1_ip: &str) {
    let flags = net_flags::MASQUERADE | net_flags::OVERLAY | net_flags::DEFAULT_DENY;
    b.dp().set_network(SUBNET.parse().unwrap(), NET, ip(GW), flags).unwrap();
    let out = ping(a1_ns, b1_ip, &["-c", "1", "-W", "1"]);
    assert!(!out.status.success(), "a1 → b1 passed b's default deny");
    let denied = b.drops().into_iter().find(|(r, _)| *r == "policy-denied").map_or(0, |(_, n)| n);
    assert!(denied >= 1, "b counted no policy-denied drop: {:?}", b.drops());
}

#[test]
fn containers_on_two_hosts_talk_through_the_tunnel_with_arp_answered_locally() {
    let lab = Lab::without_daemon("overlay-dp");
    let [mut a, mut b] = two_hosts(&lab, Kind::Netpath, &[("a1", "10.210.0.2")], &[("b1", "10.210.0.3")]);
    let (a1, b1) = (a.container("a1"), b.container("b1"));
    let (bridge_a, bridge_b) = (a.rx_packets(BRIDGE), b.rx_packets(BRIDGE));
    let (tunnel_a, tunnel_b) = (a.rx_packets(VXLAN_DEV), b.rx_packets(VXLAN_DEV));

    // Ping across: three requests arrive on b's tunnel, three replies on a's.
    let out = ping(&a1.ns, b1.ip, &[]);
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("3 received"), "{summary} {:?} {:?}", a.drops(), b.drops());
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
    let [a, mut b] = two_hosts(&lab, Kind::Netpath, &[("va1", "10.210.0.2")], &[("vb1", "10.210.0.3")]);
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
    let [mut a, b] = two_hosts(&lab, Kind::Netpath, &[("sa1", "10.210.0.2")], &[("sb1", "10.210.0.3")]);
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
        let out = ping(&a1_ns, b1.ip, &["-c", "2"]);
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
    // b1's port unreachable about a UDP flow to the VIP comes back through the tunnel and is
    // translated in vxlan_in: a1's socket, connected to the VIP, sees the refusal.
    let info = netpath_common::ServiceInfo { slot: 0, target_port: 0, backends: 1, flags: 0 };
    a.dp().set_service(ip(VIP), 9000, netpath_common::proto::UDP, info).unwrap();
    let refused = in_netns(&a1_ns, |_, _| {
        let s = UdpSocket::bind((ip("10.210.0.2"), 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.connect((ip(VIP), 9000)).unwrap();
        s.send(b"anyone?").unwrap();
        s.recv(&mut [0u8; 64]).map_err(|e| e.kind())
    });
    assert_eq!(refused, Err(std::io::ErrorKind::ConnectionRefused), "b1's port unreachable, from the VIP");

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

/// The routing mesh: a client outside host a reaches a service port published on a, whose only
/// backend is a container on host b. The flow crosses from a's underlay address (what b1 sees
/// and echoes back), b1's answers come back through the tunnel and leave a's uplink to the
/// client from the address it used, for TCP and UDP; b1's port unreachable about a UDP flow
/// reaches the client translated, so its connected socket sees the refusal.
#[test]
fn the_routing_mesh_reaches_a_backend_on_the_other_host_for_tcp_and_udp() {
    use netpath_common::proto::{TCP, UDP};
    let lab = Lab::without_daemon("overlay-mesh");
    let [mut a, b] = two_hosts(&lab, Kind::Netpath, &[], &[("mb1", "10.210.0.3")]);
    let client = a.add_client(&lab, "mesh-client");
    a.set_node_ip();
    b.set_node_ip();
    let b1 = b.container("mb1");
    // Ports 8080 (TCP and UDP) and 8081 (UDP) published on every address of a, all on b1:
    // 80 and 81 (where nothing listens).
    a.dp().set_maglev(0, &vec![ip(b1.ip); netpath_common::MAGLEV_M as usize]).unwrap();
    for (port, target, proto) in [(8080, 80u16, TCP), (8080, 80, UDP), (8081, 81, UDP)] {
        let info = netpath_common::ServiceInfo { slot: 0, target_port: target.to_be(), backends: 1, flags: 0 };
        a.dp().set_service(Ipv4Addr::UNSPECIFIED, port, proto, info).unwrap();
    }
    // b1 answers with the address it sees the client at.
    let peer = "SYSTEM:echo $SOCAT_PEERADDR";
    let tcp = in_ns(&b1.ns, "socat", &[&format!("TCP-LISTEN:80,bind={},reuseaddr,fork", b1.ip), peer]).spawn().unwrap();
    let _tcp = KillOnDrop(tcp);
    let udp = in_ns(&b1.ns, "socat", &[&format!("UDP-RECVFROM:80,bind={},fork", b1.ip), peer]).spawn().unwrap();
    let _udp = KillOnDrop(udp);

    let out = in_ns(
        &client,
        "timeout",
        &["10", "socat", "-T", "5", "-t", "5", "-", &format!("TCP:{UPLINK_IP}:8080,retry=50,interval=0.1")],
    )
    .output()
    .unwrap();
    let drops = a.drops();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        a.underlay_ip,
        "TCP: b1 sees a's address: {out:?} {drops:?}"
    );

    let (udp_answer, refused) = in_netns(&client, |_, _| {
        let s = UdpSocket::bind((ip(CLIENT_IP), 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.connect((ip(UPLINK_IP), 8080)).unwrap();
        let mut buf = [0u8; 64];
        // UDP may lose the first datagram while the socat server starts: a few tries.
        let mut answer = None;
        for _ in 0..5 {
            s.send(b"hello").unwrap();
            if let Ok(n) = s.recv(&mut buf) {
                answer = Some(String::from_utf8_lossy(&buf[..n]).trim().to_string());
                break;
            }
        }
        // The answer came from the address the client used (connected sockets filter on it).
        let s = UdpSocket::bind((ip(CLIENT_IP), 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.connect((ip(UPLINK_IP), 8081)).unwrap();
        s.send(b"anyone?").unwrap();
        let refused = s.recv(&mut buf).map_err(|e| e.kind());
        (answer, refused)
    });
    assert_eq!(udp_answer.as_deref(), Some(a.underlay_ip), "UDP: b1 sees a's address");
    assert_eq!(
        refused,
        Err(std::io::ErrorKind::ConnectionRefused),
        "b1's port unreachable reached the client, translated back to the flow it sent"
    );
    let mut b = b;
    assert_eq!(a.drops(), vec![]);
    assert_eq!(b.drops(), vec![]);
}

/// A full-size UDP datagram from a client on a 1500-byte network, through the routing mesh to
/// a backend on the other host: it does not fit the tunnel (1500 + 50), and arrives whole
/// (the VXLAN device fragments the outer packet, b reassembles it before decapsulating), with
/// the client's default don't-fragment flag and without it.
#[test]
fn a_full_size_udp_datagram_crosses_the_routing_mesh_whole() {
    use netpath_common::proto::UDP;
    let lab = Lab::without_daemon("overlay-mesh-mtu");
    let [mut a, b] = two_hosts(&lab, Kind::Netpath, &[], &[("mm1", "10.210.0.3")]);
    let client = a.add_client(&lab, "mtu-client");
    a.set_node_ip();
    b.set_node_ip();
    let b1 = b.container("mm1");
    a.dp().set_maglev(0, &vec![ip(b1.ip); netpath_common::MAGLEV_M as usize]).unwrap();
    let info = netpath_common::ServiceInfo { slot: 0, target_port: 80u16.to_be(), backends: 1, flags: 0 };
    a.dp().set_service(Ipv4Addr::UNSPECIFIED, 8080, UDP, info).unwrap();
    // b1 answers with the size of the datagram it got.
    let udp =
        in_ns(&b1.ns, "socat", &[&format!("UDP-RECVFROM:80,bind={},fork", b1.ip), "SYSTEM:wc -c"]).spawn().unwrap();
    let _udp = KillOnDrop(udp);
    let answers = in_netns(&client, |_, _| {
        // Until the server answers a small datagram (it starts asynchronously; a busy machine
        // may take seconds).
        let s = UdpSocket::bind((ip(CLIENT_IP), 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        s.connect((ip(UPLINK_IP), 8080)).unwrap();
        let mut buf = [0u8; 64];
        let ready = (0..60).any(|_| s.send(b"hi").is_ok() && s.recv(&mut buf).is_ok());
        assert!(ready, "the server never answered a small datagram");
        let mut answers = vec![];
        for pmtudisc in [libc::IP_PMTUDISC_WANT, libc::IP_PMTUDISC_DONT] {
            let s = UdpSocket::bind((ip(CLIENT_IP), 0)).unwrap();
            let v: libc::c_int = pmtudisc;
            // SAFETY: a valid socket and a correctly sized option value.
            let rc = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&s),
                    libc::IPPROTO_IP,
                    libc::IP_MTU_DISCOVER,
                    (&v as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0);
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s.connect((ip(UPLINK_IP), 8080)).unwrap();
            let mut answer = None;
            for _ in 0..3 {
                s.send(&[b'x'; 1472]).unwrap();
                if let Ok(n) = s.recv(&mut buf) {
                    answer = Some(String::from_utf8_lossy(&buf[..n]).trim().to_string());
                    break;
                }
            }
            answers.push(answer);
        }
        answers
    });
    let drops = a.drops();
    assert_eq!(answers, vec![Some("1472".to_string()); 2], "DF (Linux's default) and not: {drops:?}");
    let mut b = b;
    assert_eq!(a.drops(), vec![]);
    assert_eq!(b.drops(), vec![]);
}

/// A process of host a reaches b's container by its overlay address (ARP answered on a, the
/// packets through the tunnel from a's underlay address, the answers up a's stack), and only
/// once the overlay's bridge has its program.
#[test]
fn a_host_process_reaches_a_container_on_the_other_host() {
    let lab = Lab::without_daemon("overlay-hostproc");
    let [mut a, b] = two_hosts(&lab, Kind::Netpath, &[], &[("hb1", "10.210.0.3")]);
    let b1 = b.container("hb1");
    a.set_node_ip();
    b.set_node_ip();
    let out = ping(&a.ns, b1.ip, &["-c", "1", "-W", "1"]);
    assert!(!out.status.success(), "no way across before the bridge's program");
    a.attach_bridge();
    must(in_ns(&a.ns, "ip", &["neigh", "flush", "dev", BRIDGE]));
    let out = ping(&a.ns, b1.ip, &[]);
    assert!(out.status.success(), "ping a → b1: {}", String::from_utf8_lossy(&out.stdout));
    let neigh = must(in_ns(&a.ns, "ip", &["neigh", "show", b1.ip, "dev", BRIDGE]));
    assert!(neigh.contains(&netpath::ipam::format_mac(&b1.mac)), "a's ARP for b1 answered: {neigh}");
    let server = in_ns(
        &b1.ns,
        "socat",
        &[&format!("TCP-LISTEN:80,bind={},reuseaddr,fork", b1.ip), "SYSTEM:echo $SOCAT_PEERADDR"],
    )
    .spawn()
    .unwrap();
    let _server = KillOnDrop(server);
    let out = in_ns(
        &a.ns,
        "timeout",
        &["10", "socat", "-T", "5", "-t", "5", "-", &format!("TCP:{}:80,retry=50,interval=0.1", b1.ip)],
    )
    .output()
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), a.underlay_ip, "b1 sees a's address: {out:?}");
    let mut b = b;
    assert_eq!(a.drops(), vec![]);
    assert_eq!(b.drops(), vec![]);
}

/// The benchmark's baseline (`cargo xtask bench -- --overlay only`) builds the same lab with the
/// kernel's VXLAN instead: it must carry the same traffic, or the comparison means nothing.
#[test]
fn the_kernel_vxlan_baseline_carries_the_same_traffic() {
    let lab = Lab::without_daemon("overlay-kernel");
    let [a, b] = two_hosts(&lab, Kind::Kernel, &[("ka1", "10.210.0.2")], &[("kb1", "10.210.0.3")]);
    let (a1, b1) = (a.container("ka1"), b.container("kb1"));
    let out = ping(&a1.ns, b1.ip, &["-M", "do", "-s", "1422"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let neigh = must(in_ns(&a1.ns, "ip", &["neigh", "show", b1.ip]));
    assert!(neigh.contains(&netpath::ipam::format_mac(&b1.mac)), "proxy ARP answered for b1: {neigh}");
    assert!(a.dp.is_none() && !lab.links(&a.ns).iter().any(|l| l == VXLAN_DEV), "no netpath here");
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_default_deny_overlay_judges_new_flows_where_the_destination_runs() {
    let lab = Lab::without_daemon("overlay-fw");
    let [a, mut b] = two_hosts(&lab, Kind::Netpath, &[("a1", "10.210.0.2")], &[("b1", "10.210.0.3")]);
    let (a1_ns, a1_ip) = (a.container("a1").ns.clone(), a.container("a1").ip);
    let (b1_ns, b1_ip) = (b.container("b1").ns.clone(), b.container("b1").ip);
    // Host b's share of the overlay denies flows inside it by default (no rule allows any):
    // a1 on host a may not open one to b1, though a's programs let it into the tunnel.
    denies_by_default(&mut b, &a1_ns, b1_ip);
    // b1 opening a flow to a1 is its own network's business on b (tracked there): its
    // replies come back through the tunnel as known, not as new flows to deny.
    let out = ping(&b1_ns, a1_ip, &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("3 received"), "b1 → a1 and back: {out:?}");
}

/// With `underlay_in` on each host's underlay interface (as the daemon attaches it), VXLAN
/// for a local container is decapsulated there, ahead of the VXLAN device: the same traffic
/// arrives (ping, a megabyte of TCP both ways), nothing of the ping passes through the device,
/// and the firewall of the destination still judges new flows.
#[test]
fn decapsulation_on_the_underlay_carries_the_same_traffic_past_the_vxlan_device() {
    let lab = Lab::without_daemon("overlay-ul");
    let [mut a, mut b] = two_hosts(&lab, Kind::NetpathUnderlay, &[("ua1", "10.210.0.2")], &[("ub1", "10.210.0.3")]);
    let (a1_ns, a1_ip) = (a.container("ua1").ns.clone(), a.container("ua1").ip);
    let (b1_ns, b1_ip) = (b.container("ub1").ns.clone(), b.container("ub1").ip);
    let (tunnel_a, tunnel_b) = (a.rx_packets(VXLAN_DEV), b.rx_packets(VXLAN_DEV));
    let (under_a, under_b) = (a.rx_packets(UNDERLAY_IF), b.rx_packets(UNDERLAY_IF));
    let out = ping(&a1_ns, b1_ip, &["-M", "do", "-s", "1422"]);
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("3 received"), "{summary} {:?} {:?}", a.drops(), b.drops());
    assert_eq!((a.rx_packets(VXLAN_DEV), b.rx_packets(VXLAN_DEV)), (tunnel_a, tunnel_b), "none through the devices");
    assert!(
        a.rx_packets(UNDERLAY_IF) - under_a >= 3 && b.rx_packets(UNDERLAY_IF) - under_b >= 3,
        "all on the underlay"
    );

    // A megabyte each way: the GSO packets among them are the device's (see vxlan.rs).
    for (from_ns, to_ns, to_ip) in [(&a1_ns, &b1_ns, b1_ip), (&b1_ns, &a1_ns, a1_ip)] {
        let listen = format!("TCP-LISTEN:8080,bind={to_ip},reuseaddr");
        let server = in_ns(to_ns, "socat", &["-T", "10", &listen, "SYSTEM:wc -c"]).spawn().unwrap();
        let mut server = KillOnDrop(server);
        let send =
            format!("head -c 1000000 /dev/zero | timeout 20 socat -t 10 - TCP:{to_ip}:8080,retry=50,interval=0.1");
        let sent = in_ns(from_ns, "sh", &["-c", &send]).output().unwrap();
        assert!(sent.status.success(), "{}", String::from_utf8_lossy(&sent.stderr));
        assert_eq!(String::from_utf8_lossy(&sent.stdout).trim(), "1000000", "every byte to {to_ip}");
        let _ = server.0.wait();
    }
    assert_eq!(a.drops(), vec![], "no drops on a");
    assert_eq!(b.drops(), vec![], "no drops on b");

    // b's share of the overlay denies new flows: judged on the underlay path as on the device's.
    denies_by_default(&mut b, &a1_ns, b1_ip);
    drop((a, b));
}
