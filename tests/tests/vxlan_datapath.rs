//! `test_run` tests of the overlay datapath (netpath-ebpf/src/vxlan.rs) on hand-built frames:
//! encapsulation toward another node's container (the verdict and the inner frame: test_run
//! cannot read back the tunnel key or follow the redirect, the lab test `overlay_datapath.rs`
//! checks those with real traffic), ARP answered from the remote-endpoint map (exact bytes),
//! what is left alone (bridge networks, local overlay peers, other overlays, malformed frames),
//! and `vxlan_in` dropping what carries no known VNI.
//!
//! Each test runs in its own network namespace (entered by the test's thread) with the maps
//! pinned on a private bpffs; the VXLAN device is made there by the same code the daemon uses.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use netpath::datapath::{Overlay, RemoteEndpoint, VXLAN_DEV, wire_addr};
use netpath::netlink::Netlink;
use netpath_common::prog_names::{FROM_CONTAINER, UNDERLAY_IN, VXLAN_IN};
use netpath_common::{MAGLEV_M, ServiceInfo, Tuple, net_flags, proto};
use netpath_tests::packet::{
    ICMP_ECHO_REQUEST, Ipv4Packet, UNDERLAY_DST_MAC, icmp_echo, ipv4_header_ok, l4_checksum_ok, refresh_ipv4_checksum,
    vxlan,
};
use netpath_tests::testrun::{PrivateDatapath, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC, add_veth};

/// Overlay network O (VNI 4097): O1 and O2 here, O9 on another node.
const NET_O: u32 = 7;
const VNI_O: u32 = 4097;
const GW_O: &str = "10.200.0.1";
const O1: &str = "10.200.0.2";
const O1_MAC: [u8; 6] = [0x02, 0x42, 10, 200, 0, 2];
const O2: &str = "10.200.0.3";
const O2_MAC: [u8; 6] = [0x02, 0x42, 10, 200, 0, 3];
const O9: &str = "10.200.0.9";
const O9_MAC: [u8; 6] = [0x02, 0x42, 10, 200, 0, 9];
const NODE_B: &str = "192.168.77.2";
/// Overlay network P (VNI 4098): P9 on another node only.
const NET_P: u32 = 8;
const VNI_P: u32 = 4098;
const GW_P: &str = "10.201.0.1";
const P9: &str = "10.201.0.9";
/// Bridge network A: A1 and A2 here.
const NET_A: u32 = 1;
const GW_A: &str = "172.18.0.1";
const A1: &str = "172.18.0.2";
const A1_MAC: [u8; 6] = [0x02, 0x42, 0xac, 0x12, 0, 2];
const A2: &str = "172.18.0.3";

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn gw_mac(gw: &str) -> [u8; 6] {
    let o = ip(gw).octets();
    [0x02, 0x42, o[0], o[1], o[2], o[3]]
}

struct Fixture {
    inner: PrivateDatapath,
    overlay: Overlay,
    veths: BTreeMap<Ipv4Addr, u32>,
    vxlan: u32,
    rt: tokio::runtime::Runtime,
}

impl Fixture {
    fn new(tag: &str) -> Self {
        let mut inner = PrivateDatapath::new(&format!("vxlan-{tag}"));
        // A current-thread runtime: netlink sockets and their tasks stay in this thread's namespace.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dp = inner.dp();
        let overlay = dp.overlay().unwrap();
        let flags = net_flags::MASQUERADE | net_flags::OVERLAY;
        dp.set_network("10.200.0.0/24".parse().unwrap(), NET_O, ip(GW_O), flags).unwrap();
        dp.set_network("10.201.0.0/24".parse().unwrap(), NET_P, ip(GW_P), flags).unwrap();
        dp.set_network("172.18.0.0/16".parse().unwrap(), NET_A, ip(GW_A), net_flags::MASQUERADE).unwrap();
        let mut veths = BTreeMap::new();
        for (name, addr, net, mac, gw) in [
            ("o1", O1, NET_O, O1_MAC, GW_O),
            ("o2", O2, NET_O, O2_MAC, GW_O),
            ("a1", A1, NET_A, A1_MAC, GW_A),
            ("a2", A2, NET_A, [0x02, 0x42, 0xac, 0x12, 0, 3], GW_A),
        ] {
            let ifindex = add_veth(name, 1450);
            inner.dp().set_endpoint(ip(addr), ifindex, net, mac, gw_mac(gw)).unwrap();
            veths.insert(ip(addr), ifindex);
        }
        inner.dp().sync_host_addrs(&[ip(GW_O), ip(GW_P), ip(GW_A)]).unwrap();
        overlay.overlay_set_network(VNI_O, NET_O).unwrap();
        overlay.overlay_set_network(VNI_P, NET_P).unwrap();
        overlay.overlay_add_local(VNI_O, ip(O1), veths[&ip(O1)], O1_MAC).unwrap();
        overlay.overlay_add_local(VNI_O, ip(O2), veths[&ip(O2)], O2_MAC).unwrap();
        let node = ip(NODE_B);
        overlay.overlay_add_remote(&RemoteEndpoint { vni: VNI_O, ip: ip(O9), mac: O9_MAC, node_ip: node }).unwrap();
        let p9_mac = [0x02, 0x42, 10, 201, 0, 9];
        overlay.overlay_add_remote(&RemoteEndpoint { vni: VNI_P, ip: ip(P9), mac: p9_mac, node_ip: node }).unwrap();
        let nl = rt.block_on(async { Netlink::current() }).unwrap();
        let vxlan = rt.block_on(overlay.ensure_vxlan(&nl, 1500)).unwrap();
        Fixture { inner, overlay, veths, vxlan, rt }
    }

    /// Runs from_container on `pkt` as sent from the veth of container `from`.
    fn from(&mut self, from: &str, pkt: &[u8]) -> (u32, Vec<u8>) {
        let veth = self.veths[&ip(from)];
        self.inner.run_on(Some(veth), FROM_CONTAINER, pkt)
    }

    fn drops(&mut self) -> BTreeMap<&'static str, u64> {
        self.inner.dp().counters().unwrap().drops.into_iter().filter(|(_, n)| *n > 0).collect()
    }

    fn flows(&mut self) -> Vec<(Tuple, netpath_common::CtEntry)> {
        self.inner.dp().flows().unwrap()
    }
}

/// `frame` addressed to `mac` at the Ethernet layer, nothing else changed.
fn to_mac(mac: [u8; 6], mut frame: Vec<u8>) -> Vec<u8> {
    frame[..6].copy_from_slice(&mac);
    frame
}

fn tcp(src: &str, dst: &str, src_mac: [u8; 6]) -> Vec<u8> {
    let mut p = Ipv4Packet::tcp(src, 40000, dst, 80, b"GET / HTTP/1.0\r\n\r\n");
    p.src_mac = src_mac;
    p.dst_mac = [0x02, 0, 0, 0, 0, 0x99]; // whatever the sender's ARP cache said
    p.build()
}

/// An ARP request as a container sends it: broadcast, "who has `target`? tell `sender`".
fn arp_request(sender_mac: [u8; 6], sender: &str, target: &str) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&ip(sender).octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip(target).octets());
    f
}

#[test]
fn the_vxlan_device_is_external_and_recorded_for_the_programs() {
    let f = Fixture::new("device");
    assert_eq!(nix::net::if_::if_nametoindex(VXLAN_DEV).unwrap(), f.vxlan);
    assert_eq!(f.overlay.vxlan_ifindex().unwrap(), f.vxlan);
    // Idempotent: the same device, the same link.
    let nl = f.rt.block_on(async { Netlink::current() }).unwrap();
    assert_eq!(f.rt.block_on(f.overlay.ensure_vxlan(&nl, 1500)).unwrap(), f.vxlan);
    let out = std::process::Command::new("ip").args(["-d", "link", "show", VXLAN_DEV]).output().unwrap();
    let details = String::from_utf8_lossy(&out.stdout);
    assert!(details.contains("external"), "{details}");
    assert!(details.contains("dstport 4789"), "{details}");
    assert!(details.contains("mtu 1500"), "{details}");
    assert!(details.contains("nolearning"), "{details}");
}

#[test]
fn traffic_to_another_nodes_container_is_encapsulated_toward_it() {
    let mut f = Fixture::new("encap");
    for pkt in [
        tcp(O1, O9, O1_MAC),
        Ipv4Packet::udp(O1, 5353, O9, 53, b"query").build(),
        icmp_echo(O1, O9, ICMP_ECHO_REQUEST, 7, 1, b"ping"),
    ] {
        let (verdict, out) = f.from(O1, &pkt);
        assert_eq!(verdict, TC_ACT_REDIRECT, "redirected to the VXLAN device");
        // The inner frame keeps everything but its destination MAC: the remote container's.
        assert_eq!(out, to_mac(O9_MAC, pkt));
    }
    assert!(f.drops().is_empty(), "{:?}", f.drops());
    assert!(f.flows().is_empty(), "overlay traffic is not tracked: {:?}", f.flows());
}

#[test]
fn a_service_backend_on_another_node_is_reached_through_the_tunnel() {
    let mut f = Fixture::new("vip");
    // A VIP of overlay O whose only backend is O9, on the other node.
    const VIP: &str = "10.200.0.100";
    let table = vec![ip(O9); MAGLEV_M as usize];
    f.inner.dp().set_maglev(0, &table).unwrap();
    let info = ServiceInfo { slot: 0, target_port: 0, backends: 1, flags: 0 };
    f.inner.dp().set_service(ip(VIP), 80, proto::TCP, info).unwrap();
    let pkt = tcp(O1, VIP, O1_MAC);
    let (verdict, out) = f.from(O1, &pkt);
    assert_eq!(verdict, TC_ACT_REDIRECT, "balanced, then encapsulated");
    // Addressed to O9 (its MAC and address), checksums fixed, nothing else changed.
    assert_eq!(out, to_mac(O9_MAC, tcp(O1, O9, O1_MAC)));
    assert!(ipv4_header_ok(&out) && l4_checksum_ok(&out));
    // The flow is tracked at the container's veth, so the reply (arriving through vxlan_in)
    // gets the VIP back as its source.
    let t = |a: &str, ap: u16, b: &str, bp: u16| {
        Tuple::new(wire_addr(ip(a)), wire_addr(ip(b)), ap.to_be(), bp.to_be(), proto::TCP)
    };
    let flows: BTreeMap<_, _> = f.flows().into_iter().map(|(k, e)| ((k.saddr, k.daddr), e.xlate)).collect();
    let reply = t(O9, 80, O1, 40000);
    assert_eq!(flows.get(&(reply.saddr, reply.daddr)), Some(&t(VIP, 80, O1, 40000)), "{flows:?}");
    // The next packet of the flow takes the same way.
    let (verdict, out) = f.from(O1, &pkt);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, to_mac(O9_MAC, tcp(O1, O9, O1_MAC)));
    assert!(f.drops().is_empty(), "{:?}", f.drops());
}

#[test]
fn traffic_that_is_not_for_another_node_is_left_alone() {
    let mut f = Fixture::new("untouched");
    // A local overlay peer (the bridge's), the gateway, the outside, bridge containers.
    for (from, pkt) in [
        (O1, tcp(O1, O2, O1_MAC)),
        (O1, tcp(O1, GW_O, O1_MAC)),
        (O1, tcp(O1, "203.0.113.7", O1_MAC)),
        (A1, tcp(A1, A2, A1_MAC)),
        (A1, tcp(A1, "203.0.113.7", A1_MAC)),
    ] {
        let (verdict, out) = f.from(from, &pkt);
        assert_eq!(verdict, TC_ACT_OK, "{from} → {:?}", netpath_tests::packet::ipv4_addrs(&pkt).1);
        assert_eq!(out, pkt);
    }
    assert!(f.drops().is_empty(), "{:?}", f.drops());
}

#[test]
fn overlays_stay_isolated_from_each_other_and_from_bridge_networks() {
    let mut f = Fixture::new("isolation");
    // A bridge container and another overlay's container cannot reach O9 (or P9 from O).
    for (from, pkt) in [(A1, tcp(A1, O9, A1_MAC)), (O1, tcp(O1, P9, O1_MAC))] {
        let (verdict, _) = f.from(from, &pkt);
        assert_eq!(verdict, TC_ACT_SHOT);
    }
    assert_eq!(f.drops(), BTreeMap::from([("isolation", 2)]));
}

#[test]
fn a_spoofed_sender_is_not_encapsulated() {
    let mut f = Fixture::new("spoof");
    // O2's veth sending with O1's address.
    let (verdict, _) = f.from(O2, &tcp(O1, O9, O1_MAC));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(f.drops(), BTreeMap::from([("spoofed-source", 1)]));
}

#[test]
fn without_a_vxlan_device_overlay_traffic_is_dropped_and_counted() {
    let mut f = Fixture::new("nodev");
    let nl = f.rt.block_on(async { Netlink::current() }).unwrap();
    f.rt.block_on(f.overlay.remove_vxlan(&nl)).unwrap();
    assert!(nix::net::if_::if_nametoindex(VXLAN_DEV).is_err(), "the device is gone");
    assert_eq!(f.overlay.vxlan_ifindex().unwrap(), 0);
    let pin = f.inner.pins().join("links").join(format!("{VXLAN_DEV}@{VXLAN_IN}"));
    assert!(!pin.exists(), "vxlan_in's link pin went with the device");
    let (verdict, _) = f.from(O1, &tcp(O1, O9, O1_MAC));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(f.drops(), BTreeMap::from([("rewrite-failed", 1)]));
    // And removing it again is fine.
    f.rt.block_on(f.overlay.remove_vxlan(&nl)).unwrap();
}

#[test]
fn the_vxlan_device_is_never_taken_from_someone_else_and_bad_mtus_are_refused() {
    let f = Fixture::new("foreign");
    let nl = f.rt.block_on(async { Netlink::current() }).unwrap();
    let ip_cmd = |args: &[&str]| {
        let st = std::process::Command::new("ip").args(args).status().unwrap();
        assert!(st.success(), "ip {args:?}");
    };
    // An MTU that leaves no room for an IPv4 packet inside VXLAN: refused, nothing touched.
    let e = f.rt.block_on(f.overlay.ensure_vxlan(&nl, 100)).unwrap_err().to_string();
    assert!(e.contains("MTU"), "{e}");
    assert_eq!(nix::net::if_::if_nametoindex(VXLAN_DEV).unwrap(), f.vxlan);
    // A link of that name that netpath did not make: an error naming it, and it stays.
    f.rt.block_on(f.overlay.remove_vxlan(&nl)).unwrap();
    ip_cmd(&["link", "add", VXLAN_DEV, "type", "bridge"]);
    let e = f.rt.block_on(f.overlay.ensure_vxlan(&nl, 1500)).unwrap_err().to_string();
    assert!(e.contains(VXLAN_DEV) && e.contains("not netpath's"), "{e}");
    assert_eq!(f.overlay.vxlan_ifindex().unwrap(), 0, "the programs were not pointed at it");
    let out = std::process::Command::new("ip").args(["-d", "link", "show", VXLAN_DEV]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("bridge"), "left alone");
    // Nor does removing touch it.
    f.rt.block_on(f.overlay.remove_vxlan(&nl)).unwrap();
    assert!(nix::net::if_::if_nametoindex(VXLAN_DEV).is_ok());
    ip_cmd(&["link", "del", VXLAN_DEV]);
    // netpath's own device made another way (an older build's port, say) is made again.
    ip_cmd(&["link", "add", VXLAN_DEV, "type", "vxlan", "external", "dstport", "8472"]);
    ip_cmd(&["link", "set", VXLAN_DEV, "alias", "netpath"]);
    let idx = f.rt.block_on(f.overlay.ensure_vxlan(&nl, 1500)).unwrap();
    let out = std::process::Command::new("ip").args(["-d", "link", "show", VXLAN_DEV]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("dstport 4789"), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(f.overlay.vxlan_ifindex().unwrap(), idx);
}

#[test]
fn arp_for_another_nodes_container_is_answered_from_the_map() {
    let mut f = Fixture::new("arp");
    let req = arp_request(O1_MAC, O1, O9);
    let (verdict, out) = f.from(O1, &req);
    assert_eq!(verdict, TC_ACT_REDIRECT, "sent back into the container");
    #[rustfmt::skip]
    let want: Vec<u8> = [
        &O1_MAC[..], &O9_MAC[..], &[0x08, 0x06][..],       // Ethernet: to the asker, from O9
        &[0, 1, 0x08, 0x00, 6, 4, 0, 2][..],                // IPv4 over Ethernet, reply
        &O9_MAC[..], &[10, 200, 0, 9][..],                  // O9 is at O9_MAC
        &O1_MAC[..], &[10, 200, 0, 2][..],                  // to O1
    ].concat();
    assert_eq!(out, want);
    // Ethernet padding (a 60-byte minimum frame) is kept as it was.
    let mut padded = req.clone();
    padded.resize(60, 0xaa);
    let (verdict, out) = f.from(O1, &padded);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&out[..42], &want[..]);
    assert_eq!(&out[42..], &[0xaa; 18][..]);
    assert!(f.drops().is_empty(), "{:?}", f.drops());
}

#[test]
fn other_arp_passes_untouched() {
    let mut f = Fixture::new("arp-other");
    let mut reply = arp_request(O1_MAC, O1, O9);
    reply[21] = 2; // a reply, not a request
    let mut not_ipv4 = arp_request(O1_MAC, O1, O9);
    not_ipv4[16] = 0x86; // protocol type 0x86dd
    not_ipv4[17] = 0xdd;
    for (from, frame) in [
        (O1, arp_request(O1_MAC, O1, O2)),        // a local peer: the bridge answers
        (O1, arp_request(O1_MAC, O1, GW_O)),      // the gateway: the bridge answers
        (O1, arp_request(O1_MAC, O1, P9)),        // another overlay's container: not O's
        (A1, arp_request(A1_MAC, A1, O9)),        // a bridge container asking
        (O2, arp_request(O1_MAC, O1, O9)),        // O2's veth asking with O1's address
        (O1, arp_request(O1_MAC, "0.0.0.0", O9)), // an address probe (RFC 5227)
        (O1, reply),
        (O1, not_ipv4),
        (O1, arp_request(O1_MAC, O1, O9)[..41].to_vec()), // truncated
        (O1, arp_request(O1_MAC, O1, O9)[..20].to_vec()),
    ] {
        let (verdict, out) = f.from(from, &frame);
        assert_eq!(verdict, TC_ACT_OK, "{frame:02x?}");
        assert_eq!(out, frame);
    }
    assert!(f.drops().is_empty(), "{:?}", f.drops());
}

#[test]
fn malformed_overlay_packets_never_crash_and_never_reach_the_host() {
    let mut f = Fixture::new("malformed");
    let good = Ipv4Packet::udp(O1, 1, O9, 2, b"payload").build();
    let mut ihl_past_end = good[..14 + 20 + 4].to_vec();
    ihl_past_end[14] = 0x4f;
    let l4_truncated = good[..14 + 20 + 3].to_vec();
    let mut fragment = good.clone();
    fragment[20] = 0x20;
    // As a bridge would, the overlay carries what it cannot parse beyond the addresses to the
    // peer it is addressed to (whose kernel judges it); it never goes to the host instead.
    for pkt in [ihl_past_end, l4_truncated, fragment] {
        let (verdict, out) = f.from(O1, &pkt);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(out, to_mac(O9_MAC, pkt));
    }
    assert!(f.drops().is_empty(), "{:?}", f.drops());
    assert!(f.flows().is_empty());
}

#[test]
fn vxlan_in_drops_frames_without_a_known_vni() {
    let mut f = Fixture::new("decap");
    // test_run frames carry no tunnel metadata, as if the device had no VNI for them: every
    // one is dropped and counted, whatever it holds, never handed to the host stack.
    let frames = [
        Ipv4Packet::udp(O9, 1, O1, 2, b"payload").build(),
        tcp(O9, O1, O9_MAC),
        arp_request(O9_MAC, O9, O1),
        Ipv4Packet::udp(O9, 1, O1, 2, b"payload").build()[..14 + 20 + 3].to_vec(),
        vec![0u8; 14],
    ];
    for frame in &frames {
        let (verdict, _) = f.inner.run_on(Some(f.vxlan), VXLAN_IN, frame);
        assert_eq!(verdict, TC_ACT_SHOT);
    }
    assert_eq!(f.drops(), BTreeMap::from([("unknown-vni", frames.len() as u64)]));
}

#[test]
fn the_overlay_maps_read_back_and_removing_a_network_removes_its_endpoints() {
    let f = Fixture::new("api");
    let o = &f.overlay;
    assert_eq!(o.overlay_networks().unwrap(), vec![(VNI_O, NET_O), (VNI_P, NET_P)]);
    assert_eq!(o.overlay_remotes().unwrap().len(), 2);
    assert_eq!(o.overlay_locals().unwrap().len(), 2);
    // Bad input: refused, nothing changed.
    let e = o.overlay_set_network(1 << 24, 99).unwrap_err().to_string();
    assert!(e.contains("24 bits"), "{e}");
    let e = o.overlay_set_network(VNI_O, NET_P).unwrap_err().to_string();
    assert!(e.contains("belongs to network"), "{e}");
    let bad_node = RemoteEndpoint { vni: VNI_O, ip: ip("10.200.0.50"), mac: O9_MAC, node_ip: Ipv4Addr::UNSPECIFIED };
    assert!(o.overlay_add_remote(&bad_node).is_err());
    let multicast_mac = RemoteEndpoint { mac: [0x01, 0, 0x5e, 0, 0, 1], node_ip: ip(NODE_B), ..bad_node };
    assert!(o.overlay_add_remote(&multicast_mac).is_err());
    assert_eq!(o.overlay_networks().unwrap(), vec![(VNI_O, NET_O), (VNI_P, NET_P)]);
    assert_eq!(o.overlay_remotes().unwrap().len(), 2);
    // A remote that moved to another node: replaced.
    let moved = RemoteEndpoint { vni: VNI_O, ip: ip(O9), mac: O9_MAC, node_ip: ip("192.168.77.3") };
    o.overlay_add_remote(&moved).unwrap();
    assert!(o.overlay_remotes().unwrap().contains(&moved));
    // A network whose VNI changes forgets the old one.
    o.overlay_set_network(5000, NET_P).unwrap();
    assert_eq!(o.overlay_networks().unwrap(), vec![(VNI_O, NET_O), (5000, NET_P)]);
    o.overlay_remove_network(VNI_O).unwrap();
    assert_eq!(o.overlay_networks().unwrap(), vec![(5000, NET_P)]);
    assert!(o.overlay_locals().unwrap().is_empty());
    let left: Vec<u32> = o.overlay_remotes().unwrap().iter().map(|r| r.vni).collect();
    assert_eq!(left, vec![VNI_P], "P9 stays (under its old VNI until the daemon moves it)");
    o.overlay_remove_remote(VNI_P, ip(P9)).unwrap();
    o.overlay_remove_remote(VNI_P, ip(P9)).unwrap(); // unknown: fine
    o.overlay_remove_local(VNI_O, ip(O1)).unwrap();
    assert!(o.overlay_remotes().unwrap().is_empty());
    // The wire order of what the programs read.
    let _ = wire_addr(ip(O9));
}

// ---- The routing mesh, other nodes' flows, host processes (node address 192.168.77.1) ----

/// This node's underlay address.
const NODE_A: &str = "192.168.77.1";
/// An address of this host's uplink, and a client outside.
const UPLINK_IP: &str = "198.51.100.1";
const CLIENT: &str = "203.0.113.7";

fn tcp_ports(src: &str, sport: u16, dst: &str, dport: u16, src_mac: [u8; 6]) -> Vec<u8> {
    let mut p = Ipv4Packet::tcp(src, sport, dst, dport, b"GET / HTTP/1.0\r\n\r\n");
    p.src_mac = src_mac;
    p.dst_mac = [0x02, 0, 0, 0, 0, 0x99];
    p.build()
}

/// `frame` with its IPv4 TTL set to `ttl` (header checksum recomputed).
fn with_ttl(mut frame: Vec<u8>, ttl: u8) -> Vec<u8> {
    frame[14 + 8] = ttl;
    netpath_tests::packet::refresh_ipv4_checksum(&mut frame);
    frame
}

/// The IPv4 TTL of `frame` (after its Ethernet header).
fn ttl_of(frame: &[u8]) -> u8 {
    frame[14 + 8]
}

fn wire(a: &str, ap: u16, b: &str, bp: u16, proto_nr: u8) -> Tuple {
    Tuple::new(wire_addr(ip(a)), wire_addr(ip(b)), ap.to_be(), bp.to_be(), proto_nr)
}

impl Fixture {
    /// An uplink (its ifindex) whose address is a host address, and a service port 8080
    /// published on every host address balanced to `backend` (target port 80).
    fn published_service(&mut self, backend: &str) -> u32 {
        let uplink = add_veth("up0", 1500);
        self.inner.dp().sync_host_addrs(&[ip(GW_O), ip(GW_P), ip(GW_A), ip(UPLINK_IP)]).unwrap();
        self.inner.dp().set_maglev(0, &vec![ip(backend); MAGLEV_M as usize]).unwrap();
        let info = ServiceInfo { slot: 0, target_port: 80u16.to_be(), backends: 1, flags: 0 };
        self.inner.dp().set_service(Ipv4Addr::UNSPECIFIED, 8080, proto::TCP, info).unwrap();
        uplink
    }

    /// Writes a flow's two conntrack entries as the datapath would (what `vxlan_in` records
    /// for another node's flow, which test_run cannot feed it: no tunnel metadata).
    fn track(&mut self, orig: Tuple, xlate: Tuple, orig_hook: u8, reply_hook: u8) {
        use netpath_common::CtEntry;
        let path =
            self.inner.pins().join("maps").join(format!("CT@v{}", netpath_common::layout::current("CT").unwrap().rev));
        let data = aya::maps::MapData::from_pin(&path).unwrap();
        let mut ct: aya::maps::HashMap<_, Tuple, CtEntry> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).unwrap();
        ct.insert(orig, CtEntry { xlate, hook: orig_hook, ..Default::default() }, 0).unwrap();
        let reply = CtEntry { xlate: orig.reversed(), hook: reply_hook, is_reply: 1, ..Default::default() };
        ct.insert(xlate.reversed(), reply, 0).unwrap();
    }
}

#[test]
fn a_published_service_port_balanced_to_another_node_goes_through_the_tunnel_from_the_node_address() {
    let mut f = Fixture::new("mesh");
    let uplink = f.published_service(O9);
    let client_mac = [0x02, 0, 0, 0, 0, 0x77];
    let pkt = tcp_ports(CLIENT, 40000, UPLINK_IP, 8080, client_mac);
    // Without this node's underlay address the mesh cannot work: dropped and counted.
    let (verdict, _) = f.inner.run_on(Some(uplink), netpath_common::prog_names::UPLINK_IN, &pkt);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(f.drops(), BTreeMap::from([("rewrite-failed", 1)]));
    assert!(f.flows().is_empty(), "nothing tracked for a refused flow: {:?}", f.flows());
    f.overlay.overlay_set_node_ip(Some(ip(NODE_A))).unwrap();
    assert_eq!(f.overlay.overlay_node_ip().unwrap(), Some(ip(NODE_A)));
    for round in ["first packet", "next packet"] {
        let (verdict, out) = f.inner.run_on(Some(uplink), netpath_common::prog_names::UPLINK_IN, &pkt);
        assert_eq!(verdict, TC_ACT_REDIRECT, "{round}: encapsulated");
        // From this node's underlay address to O9's port 80, addressed to O9's MAC, one hop
        // down: this node routed it from its uplink into the tunnel.
        assert_eq!(ttl_of(&out), 63, "{round}: the forward step takes a hop");
        assert_eq!(out, to_mac(O9_MAC, with_ttl(tcp_ports(NODE_A, 40000, O9, 80, client_mac), 63)), "{round}");
        assert!(ipv4_header_ok(&out) && l4_checksum_ok(&out));
    }
    // Tracked at the uplink, its replies (from O9 to this node) at vxlan_in, back to what
    // the client used.
    let flows: std::collections::HashMap<Tuple, (Tuple, u8)> =
        f.flows().into_iter().map(|(k, e)| (k, (e.xlate, e.hook))).collect();
    let orig = wire(CLIENT, 40000, UPLINK_IP, 8080, proto::TCP);
    let x = wire(NODE_A, 40000, O9, 80, proto::TCP);
    assert_eq!(flows.get(&orig), Some(&(x, netpath_common::hook::UPLINK_IN)), "{flows:?}");
    assert_eq!(flows.get(&x.reversed()), Some(&(orig.reversed(), netpath_common::hook::VXLAN_IN)), "{flows:?}");
    assert_eq!(f.drops(), BTreeMap::from([("rewrite-failed", 1)]), "no new drops");
    // A packet whose TTL would expire on this hop is not forwarded into the tunnel.
    let (verdict, _) = f.inner.run_on(Some(uplink), netpath_common::prog_names::UPLINK_IN, &with_ttl(pkt, 1));
    assert_eq!(verdict, TC_ACT_SHOT, "TTL 1 does not cross the mesh");
    assert_eq!(f.drops(), BTreeMap::from([("rewrite-failed", 2)]));
}

#[test]
fn a_published_service_port_with_a_backend_here_keeps_the_clients_address() {
    let mut f = Fixture::new("mesh-local");
    let uplink = f.published_service(O1);
    f.overlay.overlay_set_node_ip(Some(ip(NODE_A))).unwrap();
    let pkt = tcp_ports(CLIENT, 40000, UPLINK_IP, 8080, [0x02, 0, 0, 0, 0, 0x77]);
    let (verdict, out) = f.inner.run_on(Some(uplink), netpath_common::prog_names::UPLINK_IN, &pkt);
    assert_ne!(verdict, TC_ACT_SHOT);
    assert_eq!(netpath_tests::packet::ipv4_addrs(&out), (ip(CLIENT), ip(O1)), "DNAT only, as before the mesh");
    let hooks: Vec<u8> = f.flows().iter().map(|(_, e)| e.hook).collect();
    assert!(!hooks.contains(&netpath_common::hook::VXLAN_IN), "{hooks:?}");
    assert!(f.drops().is_empty(), "{:?}", f.drops());
}

#[test]
fn a_reply_to_another_nodes_flow_goes_back_to_that_node_through_the_tunnel() {
    let mut f = Fixture::new("to-node");
    use netpath_common::hook;
    // Another node (NODE_B) opened a flow to O1 from its underlay address (its mesh), as
    // vxlan_in tracks it.
    let orig = wire(NODE_B, 40000, O1, 80, proto::TCP);
    f.track(orig, orig, hook::VXLAN_IN, hook::TO_NODE);
    let reply = tcp_ports(O1, 80, NODE_B, 40000, O1_MAC);
    let (verdict, out) = f.from(O1, &reply);
    assert_eq!(verdict, TC_ACT_REDIRECT, "into the tunnel");
    assert_eq!(out, reply, "untranslated, inner MACs as sent");
    // O1's port unreachable about that flow goes back the same way.
    let quoted = tcp_ports(NODE_B, 40000, O1, 80, O1_MAC);
    let err = netpath_tests::packet::icmp_error(O1, NODE_B, 3, 3, &quoted);
    let (verdict, out) = f.from(O1, &err);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, err);
    // Without such a flow, O1's traffic to that address is O1's own (out through the host).
    let other = tcp_ports(O1, 81, NODE_B, 40000, O1_MAC);
    let (verdict, out) = f.from(O1, &other);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, other);
    let err = netpath_tests::packet::icmp_error(O1, NODE_B, 3, 3, &tcp_ports(NODE_B, 1, O1, 2, O1_MAC));
    assert_eq!(f.from(O1, &err).0, TC_ACT_OK);
    assert!(f.drops().is_empty(), "{:?}", f.drops());
}

#[test]
fn a_host_process_reaches_another_nodes_container_from_the_node_address() {
    let mut f = Fixture::new("host");
    use netpath_common::prog_names::OVERLAY_BRIDGE_OUT;
    // test_run needs an interface: a stand-in for the overlay's bridge.
    let bridge = add_veth("br-o", 1450);
    f.overlay.overlay_set_node_ip(Some(ip(NODE_A))).unwrap();
    let host_mac = gw_mac(GW_O);
    let pkt = tcp_ports(GW_O, 40000, O9, 80, host_mac);
    let (verdict, out) = f.inner.run_on(Some(bridge), OVERLAY_BRIDGE_OUT, &pkt);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, to_mac(O9_MAC, tcp_ports(NODE_A, 40000, O9, 80, host_mac)));
    assert!(ipv4_header_ok(&out) && l4_checksum_ok(&out));
    let flows: std::collections::HashMap<Tuple, (Tuple, u8)> =
        f.flows().into_iter().map(|(k, e)| (k, (e.xlate, e.hook))).collect();
    let (orig, x) = (wire(GW_O, 40000, O9, 80, proto::TCP), wire(NODE_A, 40000, O9, 80, proto::TCP));
    assert_eq!(flows.get(&x.reversed()), Some(&(orig.reversed(), netpath_common::hook::VXLAN_IN)), "{flows:?}");
    // The host's ARP for O9 is answered into the bridge.
    let req = arp_request(host_mac, GW_O, O9);
    let (verdict, out) = f.inner.run_on(Some(bridge), OVERLAY_BRIDGE_OUT, &req);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&out[0..6], &host_mac[..], "to the host");
    assert_eq!(&out[22..32], &[&O9_MAC[..], &ip(O9).octets()[..]].concat()[..], "O9 is at O9_MAC");
    // Left alone: local containers, another overlay's remote (not this bridge's... found by
    // its own subnet: P9 is reached through its own bridge), traffic the host forwards, ARP
    // from a container.
    for frame in [
        tcp_ports(GW_O, 40000, O2, 80, host_mac),
        tcp_ports("203.0.113.9", 40000, O9, 80, host_mac),
        arp_request(O1_MAC, O1, O9),
        arp_request(host_mac, GW_O, O2),
    ] {
        let (verdict, out) = f.inner.run_on(Some(bridge), OVERLAY_BRIDGE_OUT, &frame);
        assert_eq!(verdict, TC_ACT_OK, "{frame:02x?}");
        assert_eq!(out, frame);
    }
    assert!(f.drops().is_empty(), "{:?}", f.drops());
    // The program's link on the bridge: pinned, claimed again without a second link, gone
    // with detaching (and detaching again is fine).
    let pin = f.inner.pins().join("links").join(format!("br-o@{OVERLAY_BRIDGE_OUT}"));
    f.rt.block_on(f.overlay.overlay_attach_bridge("br-o", bridge)).unwrap();
    assert!(pin.exists(), "overlay_bridge_out's link is pinned");
    f.rt.block_on(f.overlay.overlay_attach_bridge("br-o", bridge)).unwrap();
    f.rt.block_on(f.overlay.overlay_detach_bridge(bridge)).unwrap();
    assert!(!pin.exists(), "detached");
    f.rt.block_on(f.overlay.overlay_detach_bridge(bridge)).unwrap();
    // Bad input: refused, nothing changed.
    assert!(f.overlay.overlay_set_node_ip(Some(Ipv4Addr::BROADCAST)).is_err());
    assert_eq!(f.overlay.overlay_node_ip().unwrap(), Some(ip(NODE_A)));
    f.overlay.overlay_set_node_ip(None).unwrap();
    assert_eq!(f.overlay.overlay_node_ip().unwrap(), None);
}

#[test]
fn a_container_reaches_a_service_port_published_here_whose_backend_is_on_another_node() {
    let mut f = Fixture::new("mesh-container");
    f.published_service(O9);
    f.overlay.overlay_set_node_ip(Some(ip(NODE_A))).unwrap();
    // From a bridge network's container: the routing mesh, from this node's address.
    let pkt = tcp_ports(A1, 40000, UPLINK_IP, 8080, A1_MAC);
    for round in ["first packet", "next packet"] {
        let (verdict, out) = f.from(A1, &pkt);
        assert_eq!(verdict, TC_ACT_REDIRECT, "{round}: encapsulated");
        // Routed by this node from the bridge network into the tunnel: one hop.
        assert_eq!(out, to_mac(O9_MAC, with_ttl(tcp_ports(NODE_A, 40000, O9, 80, A1_MAC), 63)), "{round}");
        assert!(ipv4_header_ok(&out) && l4_checksum_ok(&out));
    }
    let flows: std::collections::HashMap<Tuple, (Tuple, u8)> =
        f.flows().into_iter().map(|(k, e)| (k, (e.xlate, e.hook))).collect();
    let (orig, x) = (wire(A1, 40000, UPLINK_IP, 8080, proto::TCP), wire(NODE_A, 40000, O9, 80, proto::TCP));
    assert_eq!(flows.get(&orig), Some(&(x, netpath_common::hook::FROM_CONTAINER)), "{flows:?}");
    assert_eq!(flows.get(&x.reversed()), Some(&(orig.reversed(), netpath_common::hook::VXLAN_IN)), "{flows:?}");
    // From a container of the backend's own overlay: its address is kept, as for a VIP.
    let pkt = tcp_ports(O1, 40001, UPLINK_IP, 8080, O1_MAC);
    let (verdict, out) = f.from(O1, &pkt);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, to_mac(O9_MAC, tcp_ports(O1, 40001, O9, 80, O1_MAC)));
    assert!(f.drops().is_empty(), "{:?}", f.drops());
}

#[test]
fn a_tcp_segment_too_big_for_the_tunnel_is_answered_with_fragmentation_needed_and_udp_is_carried_whole() {
    use netpath_tests::packet::{csum, ipv4_addrs, refresh_ipv4_checksum};
    let mut f = Fixture::new("mesh-pmtu");
    let uplink = f.published_service(O9);
    let info = ServiceInfo { slot: 0, target_port: 80u16.to_be(), backends: 1, flags: 0 };
    f.inner.dp().set_service(Ipv4Addr::UNSPECIFIED, 8080, proto::UDP, info).unwrap();
    f.overlay.overlay_set_node_ip(Some(ip(NODE_A))).unwrap();
    let (client_mac, uplink_mac) = ([0x02, 0, 0, 0, 0, 0x77], [0x02, 0, 0, 0, 0, 0x99]);
    let packet = |tcp: bool, sport: u16, len: usize| {
        let payload = vec![7u8; len];
        let mut p = if tcp {
            Ipv4Packet::tcp(CLIENT, sport, UPLINK_IP, 8080, &payload)
        } else {
            Ipv4Packet::udp(CLIENT, sport, UPLINK_IP, 8080, &payload)
        };
        (p.src_mac, p.dst_mac) = (client_mac, uplink_mac);
        p.build()
    };
    // A full-size TCP segment from a 1500-byte network (DF, as TCP always sends), from a
    // client that ignored the MSS the backend announced: 1500 + 50 does not fit the 1500-byte
    // underlay.
    let big = packet(true, 40000, 1460);
    assert_eq!(big.len(), 14 + 1500);
    assert_eq!(big[14 + 6] & 0x40, 0x40, "DF");
    let (verdict, out) = f.inner.run_on(Some(uplink), netpath_common::prog_names::UPLINK_IN, &big);
    assert_eq!(verdict, TC_ACT_REDIRECT, "the error goes back out of the uplink");
    assert_eq!(out.len(), 14 + 20 + 8 + 28, "{out:02x?}");
    assert_eq!((&out[..6], &out[6..12]), (&client_mac[..], &uplink_mac[..]), "to the client's MAC, from ours");
    assert_eq!(ipv4_addrs(&out), (ip(UPLINK_IP), ip(CLIENT)), "from the address it sent to");
    assert!(ipv4_header_ok(&out));
    assert_eq!(out[14 + 9], proto::ICMP);
    assert_eq!((out[34], out[35]), (3, 4), "destination unreachable, fragmentation needed");
    assert_eq!(u16::from_be_bytes([out[40], out[41]]), 1450, "the overlay's MTU");
    assert_eq!(&out[42..], &big[14..42], "quoting the packet as the client sent it");
    assert_eq!(csum(&out[34..], 0), 0, "ICMP checksum");
    // One that fits (1450 bytes): through the tunnel.
    let (verdict, out) =
        f.inner.run_on(Some(uplink), netpath_common::prog_names::UPLINK_IN, &packet(true, 40000, 1410));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(ipv4_addrs(&out), (ip(NODE_A), ip(O9)), "encapsulated");
    // A full-size UDP datagram, DF or not, is carried whole (the device fragments the outer
    // packet): netpath could not translate the fragments its sender would make of it.
    let big = packet(false, 40001, 1472);
    let mut no_df = big.clone();
    no_df[14 + 6] = 0;
    refresh_ipv4_checksum(&mut no_df);
    for (what, pkt) in [("DF", big), ("no DF", no_df)] {
        let (verdict, out) = f.inner.run_on(Some(uplink), netpath_common::prog_names::UPLINK_IN, &pkt);
        assert_eq!(verdict, TC_ACT_REDIRECT, "{what}");
        assert_eq!(ipv4_addrs(&out), (ip(NODE_A), ip(O9)), "{what}: encapsulated");
        assert_eq!(out.len(), pkt.len(), "{what}: whole");
    }
    // A container of a bridge network (MTU 1500) reaching the same port: answered back into it.
    let mut p = Ipv4Packet::tcp(A1, 40002, UPLINK_IP, 8080, &[7u8; 1460]);
    (p.src_mac, p.dst_mac) = (A1_MAC, gw_mac(GW_A));
    let big = p.build();
    let (verdict, out) = f.from(A1, &big);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!((&out[..6], &out[6..12]), (&A1_MAC[..], &gw_mac(GW_A)[..]));
    assert_eq!(ipv4_addrs(&out), (ip(UPLINK_IP), ip(A1)));
    assert!(ipv4_header_ok(&out) && csum(&out[34..], 0) == 0);
    assert_eq!(&out[42..], &big[14..42]);
    assert!(f.drops().is_empty(), "{:?}", f.drops());
}

impl Fixture {
    /// An underlay interface holding [`NODE_A`] (a host address, as the daemon's sync makes
    /// it); returns its ifindex, for runs of underlay_in.
    fn underlay(&mut self) -> u32 {
        let ifindex = add_veth("ul", 1500);
        let addrs = [ip(GW_O), ip(GW_P), ip(GW_A), ip(NODE_A)];
        self.inner.dp().sync_host_addrs(&addrs).unwrap();
        ifindex
    }
}

/// `frame` with its Ethernet source `mac`.
fn from_mac(mac: [u8; 6], mut frame: Vec<u8>) -> Vec<u8> {
    frame[6..12].copy_from_slice(&mac);
    frame
}

#[test]
fn underlay_in_decapsulates_vxlan_for_a_local_container_straight_into_it() {
    let mut f = Fixture::new("ul-decap");
    let ul = f.underlay();
    for inner in [
        tcp(O9, O1, O9_MAC),
        Ipv4Packet { src_mac: O9_MAC, ..Ipv4Packet::udp(O9, 5353, O1, 53, b"query") }.build(),
        from_mac(O9_MAC, icmp_echo(O9, O1, ICMP_ECHO_REQUEST, 7, 1, b"ping")),
        // To the other local container, and a frame the sender addressed to another MAC.
        to_mac([0x02, 0, 0, 0, 0, 0x42], tcp(O9, O2, O9_MAC)),
    ] {
        let dst = if inner[14 + 16..14 + 20] == ip(O1).octets() { O1_MAC } else { O2_MAC };
        let (verdict, out) = f.inner.run_on(Some(ul), UNDERLAY_IN, &vxlan(NODE_B, NODE_A, VNI_O, &inner));
        assert_eq!(verdict, TC_ACT_REDIRECT, "straight to the container");
        // The inner frame, exactly, addressed to the container's MAC.
        assert_eq!(out, to_mac(dst, inner));
    }
    assert!(f.drops().is_empty(), "{:?}", f.drops());
}

#[test]
fn underlay_in_leaves_everything_else_to_the_vxlan_device_untouched() {
    let mut f = Fixture::new("ul-next");
    let ul = f.underlay();
    let inner = tcp(O9, O1, O9_MAC);
    let good = vxlan(NODE_B, NODE_A, VNI_O, &inner);
    let with = |at: usize, bytes: &[u8]| {
        let mut p = good.clone();
        p[at..at + bytes.len()].copy_from_slice(bytes);
        refresh_ipv4_checksum(&mut p);
        p
    };
    let (ip0, udp0, vx0, inner0) = (14, 14 + 20, 14 + 28, 14 + 36);
    let mut ip_options = good[..ip0].to_vec();
    ip_options.extend_from_slice(&[0x46]);
    ip_options.extend_from_slice(&good[ip0 + 1..udp0]);
    ip_options.extend_from_slice(&[1, 1, 1, 0]); // NOP NOP NOP EOL
    ip_options.extend_from_slice(&good[udp0..]);
    ip_options[ip0 + 3] += 4; // total length
    refresh_ipv4_checksum(&mut ip_options);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("an unknown VNI", vxlan(NODE_B, NODE_A, 4099, &inner)),
        ("a VNI of no local container", vxlan(NODE_B, NODE_A, VNI_P, &tcp(P9, "10.201.0.2", O9_MAC))),
        ("a destination not here", vxlan(NODE_B, NODE_A, VNI_O, &tcp(O1, "10.200.0.50", O1_MAC))),
        ("the routing mesh's reply, to this node", vxlan(NODE_B, NODE_A, VNI_O, &tcp(O9, NODE_A, O9_MAC))),
        ("not this host's", vxlan(NODE_B, "192.168.77.3", VNI_O, &inner)),
        ("VXLAN flags but I", with(vx0, &[0x0c])),
        ("no I flag", with(vx0, &[0x00])),
        ("reserved bits after the VNI", with(vx0 + 7, &[0x01])),
        ("an outer UDP checksum", with(udp0 + 6, &[0x12, 0x34])),
        ("another UDP port", with(udp0 + 2, &8472u16.to_be_bytes())),
        ("not UDP", with(ip0 + 9, &[6])),
        ("an outer fragment (more fragments)", with(ip0 + 6, &[0x20, 0])),
        ("an outer fragment (an offset)", with(ip0 + 6, &[0x00, 0x10])),
        ("outer IPv4 options", ip_options),
        ("not IPv4 inside", vxlan(NODE_B, NODE_A, VNI_O, &arp_request(O9_MAC, O9, O1))),
        // (A frame cut inside its IPv4 header is refused by test_run itself.)
        ("the UDP header truncated", good[..udp0 + 4].to_vec()),
        ("the VXLAN header truncated", good[..vx0 + 6].to_vec()),
        ("the inner header truncated", good[..inner0 + 14 + 12].to_vec()),
        ("not IPv4 outside", with(12, &[0x86, 0xdd])),
    ];
    for (what, pkt) in &cases {
        let (verdict, out) = f.inner.run_on(Some(ul), UNDERLAY_IN, pkt);
        assert_eq!(verdict, TC_ACT_UNSPEC, "{what}: on to the device");
        assert_eq!(&out, pkt, "{what}: untouched");
    }
    // A GSO packet (the helper would leave its tunnel marks on it on this kernel).
    let (verdict, out) = f.inner.run_with(Some(ul), 1398, UNDERLAY_IN, &good);
    assert_eq!((verdict, out), (TC_ACT_UNSPEC, good.clone()), "GSO: on to the device");
    // The same packet, not GSO, is taken: the control.
    assert_eq!(f.inner.run_on(Some(ul), UNDERLAY_IN, &good).0, TC_ACT_REDIRECT);
    assert!(f.drops().is_empty(), "{:?}", f.drops());
}

#[test]
fn underlay_in_drops_what_vxlan_in_would_drop_once_the_vni_and_container_are_known() {
    let mut f = Fixture::new("ul-drop");
    let ul = f.underlay();
    // IPv4 to O1 inside, but with a header length below IPv4's 20 bytes: the inner packet
    // cannot be parsed, which vxlan_in drops for a known VNI as isolation.
    let mut inner = tcp(O9, O1, O9_MAC);
    inner[14] = 0x44;
    let (verdict, _) = f.inner.run_on(Some(ul), UNDERLAY_IN, &vxlan(NODE_B, NODE_A, VNI_O, &inner));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(f.drops(), BTreeMap::from([("isolation", 1)]));
    // The outer frame's own MAC never reaches a container (the control: a good packet).
    let (verdict, out) = f.inner.run_on(Some(ul), UNDERLAY_IN, &vxlan(NODE_B, NODE_A, VNI_O, &tcp(O9, O1, O9_MAC)));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_ne!(out[..6], UNDERLAY_DST_MAC);
}
