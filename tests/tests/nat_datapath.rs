//! `test_run` tests of the NAT datapath on hand-built packets: published ports (DNAT) and their
//! replies on an uplink, masquerade (SNAT) with port collisions, ICMP echo and errors, isolation
//! and hairpin on a container's veth, and malformed packets toward a published port. Each test
//! checks the verdict, every header field it expects rewritten (by comparing with the packet
//! built from scratch), that the IPv4 and L4 checksums verify, and the conntrack entries.
//!
//! Flow events (the FLOW_EVENTS ring, written while CONFIG[FLOW_EVENTS] is set) are checked on
//! the same packets: none while switched off, one `new` per flow with both tuples, `closed`
//! once per flow, a `drop` with the packet's tuple and reason, nothing for malformed packets.
//!
//! nat_datapath_xdp.rs runs every one of these cases again with XDP on the uplink: each packet
//! for uplink_in goes through uplink_xdp first (see [`PrivateDatapath::run_uplink_with_xdp`]),
//! and the same assertions hold, byte for byte.
//!
//! Each test runs in its own network namespace (entered by the test's thread) with the maps
//! pinned on a private bpffs, so nothing touches the machine. test_run attaches the packet to
//! the namespace's loopback (ifindex 1), which therefore plays the uplink for `uplink_out`.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use netpath::datapath::{Datapath, FlowEventRing, LoadOptions, map_pin, wire_addr, wire_port};
use netpath_common::prog_names::{FROM_CONTAINER, UPLINK_IN, UPLINK_OUT, UPLINK_XDP};
use netpath_common::{
    CtEntry, FlowEvent, MAGLEV_M, ServiceInfo, Tuple, ct_ports, ct_state, drop_reason, flow_event, hook, net_flags,
    proto,
};
use netpath_tests::packet::{
    ICMP_DEST_UNREACH, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, Ipv4Packet, csum, icmp_echo, icmp_echo_id, icmp_error,
    ipv4_addrs, ipv4_header_ok, l4_checksum_ok, l4_ports, refresh_ipv4_checksum, with_ip_options,
};
use netpath_tests::testrun::{
    LO, PrivateDatapath, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_DROP, XDP_PASS, XDP_REDIRECT, add_veth,
};

/// Whether uplink_in's packets go through uplink_xdp first. The crate's own: false here, true
/// in nat_datapath_xdp.rs, which includes this file as a module.
#[allow(dead_code)]
const XDP_FIRST: bool = false;

/// The uplink's address (also a host address).
const HOST: &str = "198.51.100.1";
/// A second host address (another uplink).
const HOST2: &str = "192.0.2.1";
/// On the uplink's subnet, but not the host's.
const NOT_HOST: &str = "198.51.100.9";
/// Somewhere outside.
const CLIENT: &str = "203.0.113.7";

/// Network A (masquerading): two containers.
const NET_A: u32 = 1;
const GW_A: &str = "172.18.0.1";
const A1: &str = "172.18.0.2";
const A1_MAC: [u8; 6] = [0x02, 0x42, 0xac, 0x12, 0, 2];
const A2: &str = "172.18.0.3";
const A2_MAC: [u8; 6] = [0x02, 0x42, 0xac, 0x12, 0, 3];
/// Network B (masquerading): one container.
const NET_B: u32 = 2;
const GW_B: &str = "172.19.0.1";
const B1: &str = "172.19.0.2";
const B1_MAC: [u8; 6] = [0x02, 0x42, 0xac, 0x13, 0, 2];
/// Network N: gateway mode `routed` (no masquerade; direct access to published container ports).
const NET_N: u32 = 3;
const GW_N: &str = "172.20.0.1";
const N1: &str = "172.20.0.2";

/// The published port every DNAT test uses: HOST:8080 → A1:80.
const PUB: u16 = 8080;
const BACK: u16 = 80;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// A tuple as the datapath keys it (network byte order).
fn tuple(src: &str, sport: u16, dst: &str, dport: u16, proto_nr: u8) -> Tuple {
    Tuple::new(wire_addr(ip(src)), wire_addr(ip(dst)), wire_port(sport), wire_port(dport), proto_nr)
}

fn tcp(src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
    Ipv4Packet::tcp(src, sport, dst, dport, b"GET / HTTP/1.0\r\n\r\n").build()
}

fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
    Ipv4Packet::udp(src, sport, dst, dport, b"a datagram").build()
}

/// A frame as the datapath delivers it to a container's veth: to the container's MAC, from its
/// gateway's (the bridge's), as the stack would send it.
fn to_mac(mac: [u8; 6], mut frame: Vec<u8>) -> Vec<u8> {
    frame[..6].copy_from_slice(&mac);
    let gw = if mac == B1_MAC { GW_B } else { GW_A };
    frame[6..12].copy_from_slice(&gw_mac(gw));
    frame
}

/// A gateway's MAC, as the daemon derives it (and sets it on the bridge).
fn gw_mac(gw: &str) -> [u8; 6] {
    let o = ip(gw).octets();
    [0x02, 0x42, o[0], o[1], o[2], o[3]]
}

fn assert_checksums(pkt: &[u8]) {
    assert!(ipv4_header_ok(pkt), "IPv4 header checksum must verify after the rewrite");
    assert!(l4_checksum_ok(pkt), "L4 checksum must verify after the rewrite");
}

struct Fixture {
    inner: PrivateDatapath,
    /// Each container's host-side veth (a real one in the test's namespace), by address.
    veths: HashMap<Ipv4Addr, u32>,
    /// The flow-event ring's reading end, once a test asked for events.
    ring: Option<FlowEventRing>,
}

impl Fixture {
    /// A private namespace and datapath holding networks A, B and N, their containers, the
    /// host addresses (HOST, HOST2, the gateways) and HOST as the uplink (lo) address.
    fn new(tag: &str) -> Self {
        Self::with_options(tag, LoadOptions::default())
    }

    /// [`Fixture::new`] with a conntrack table of `entries` entries.
    fn with_ct_size(tag: &str, entries: u32) -> Self {
        Self::with_options(tag, LoadOptions { max_entries: vec![("CT".into(), entries)], ..Default::default() })
    }

    fn with_options(tag: &str, opts: LoadOptions) -> Self {
        let inner = PrivateDatapath::with_options(&format!("nat-{tag}"), opts);
        let mut f = Fixture { inner, veths: HashMap::new(), ring: None };
        let dp = f.dp();
        dp.set_network("172.18.0.0/16".parse().unwrap(), NET_A, ip(GW_A), net_flags::MASQUERADE).unwrap();
        dp.set_network("172.19.0.0/16".parse().unwrap(), NET_B, ip(GW_B), net_flags::MASQUERADE).unwrap();
        dp.set_network("172.20.0.0/16".parse().unwrap(), NET_N, ip(GW_N), net_flags::DIRECT_PUBLISHED).unwrap();
        for (name, addr, net, mac) in [
            ("a1", A1, NET_A, A1_MAC),
            ("a2", A2, NET_A, A2_MAC),
            ("b1", B1, NET_B, B1_MAC),
            ("n1", N1, NET_N, [0x02, 0x42, 0xac, 0x14, 0, 2]),
        ] {
            let ifindex = add_veth(name, 1500);
            let gw = match net {
                NET_A => GW_A,
                NET_B => GW_B,
                _ => GW_N,
            };
            f.dp().set_endpoint(ip(addr), ifindex, net, mac, gw_mac(gw)).unwrap();
            f.dp().set_xdp_port(ifindex, true).unwrap();
            f.veths.insert(ip(addr), ifindex);
        }
        let dp = f.dp();
        dp.sync_host_addrs(&[ip(HOST), ip(HOST2), ip(GW_A), ip(GW_B), ip(GW_N)]).unwrap();
        dp.set_uplink_addr(LO, Some(ip(HOST))).unwrap();
        // lo's MAC: all zeros (see for_this_host).
        dp.set_xdp_uplink(LO, Some([0; 6])).unwrap();
        f
    }

    /// Fixture::new plus HOST(every host address):8080/tcp and /udp published to A1:80.
    fn published(tag: &str) -> Self {
        let mut f = Self::new(tag);
        f.dp().set_port(None, PUB, proto::TCP, ip(A1), BACK).unwrap();
        f.dp().set_port(None, PUB, proto::UDP, ip(A1), BACK).unwrap();
        f
    }

    fn dp(&mut self) -> &mut Datapath {
        self.inner.dp()
    }

    /// Network A in gateway mode `nat-unprotected`: outside hosts routing to it reach every port.
    fn unprotect_a(&mut self) {
        let flags = net_flags::MASQUERADE | net_flags::DIRECT_ANY;
        self.dp().set_network("172.18.0.0/16".parse().unwrap(), NET_A, ip(GW_A), flags).unwrap();
    }

    /// Runs `prog` on `pkt` where it would run for real: from_container on the veth of the
    /// container whose address the packet comes from (any other program, and unknown
    /// sources, on lo).
    fn run(&mut self, prog: &str, pkt: &[u8]) -> (u32, Vec<u8>) {
        if prog == UPLINK_IN && crate::XDP_FIRST {
            return self.inner.run_uplink_with_xdp(pkt);
        }
        let veth = if prog == FROM_CONTAINER { self.veths.get(&ipv4_addrs(pkt).0).copied() } else { None };
        self.inner.run_on(veth, prog, pkt)
    }

    /// Runs uplink_xdp alone on `pkt`, received on lo.
    fn run_xdp(&mut self, pkt: &[u8]) -> (u32, Vec<u8>) {
        self.inner.run_xdp(UPLINK_XDP, pkt)
    }

    /// Runs uplink_xdp and checks it passed the packet untouched (to uplink_in).
    fn assert_xdp_passes(&mut self, pkt: &[u8], why: &str) {
        let (verdict, out) = self.run_xdp(pkt);
        assert_eq!(verdict, XDP_PASS, "{why}: verdict");
        assert_eq!(out, pkt, "{why}: the packet must pass unchanged");
    }

    /// Runs from_container on `pkt` as sent from the veth of container `from`.
    fn run_from(&mut self, from: &str, pkt: &[u8]) -> (u32, Vec<u8>) {
        let veth = self.veths[&ip(from)];
        self.inner.run_on(Some(veth), FROM_CONTAINER, pkt)
    }

    /// The NAT table, by key.
    fn flows(&mut self) -> HashMap<Tuple, CtEntry> {
        self.dp().flows().unwrap().into_iter().collect()
    }

    fn flow(&mut self, key: Tuple) -> CtEntry {
        let flows = self.flows();
        *flows.get(&key).unwrap_or_else(|| panic!("no entry for {key:?} in {flows:#?}"))
    }

    fn try_flow(&mut self, key: Tuple) -> Option<CtEntry> {
        self.flows().get(&key).copied()
    }

    fn counter(&mut self, name: &str) -> u64 {
        let c = self.dp().counters().unwrap();
        c.drops.get(name).or(c.conntrack.get(name)).copied().unwrap_or_else(|| panic!("no counter {name}"))
    }

    /// Switches flow events on or off, as the daemon does when followers come and go.
    fn flow_events(&mut self, on: bool) {
        self.dp().set_flow_events(on).unwrap();
    }

    /// The flow events written since the last call.
    fn events(&mut self) -> Vec<FlowEvent> {
        if self.ring.is_none() {
            self.ring = Some(self.dp().flow_events().unwrap());
        }
        self.ring.as_mut().unwrap().drain_all()
    }

    /// Runs `prog` and checks the packet passed untouched and no flow appeared.
    fn assert_passes_untouched(&mut self, prog: &str, pkt: &[u8]) {
        let before = self.flows();
        let (verdict, out) = self.run(prog, pkt);
        let after = self.flows();
        assert_eq!(verdict, TC_ACT_OK, "verdict");
        assert_eq!(after.len(), before.len(), "no conntrack entry may be created: {after:#?}");
        assert_eq!(out, pkt, "the packet must pass unchanged");
    }
}

// ---- uplink_in: published ports (DNAT) ----

#[test]
fn published_tcp_port_is_dnated_to_the_container_keeping_the_client_source() {
    let mut f = Fixture::published("dnat-tcp");
    let (verdict, out) = f.run(UPLINK_IN, &tcp(CLIENT, 40000, HOST, PUB));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, tcp(CLIENT, 40000, A1, BACK), "only the destination address and port change");
    assert_checksums(&out);
}

#[test]
fn published_port_creates_one_entry_per_direction() {
    let mut f = Fixture::published("dnat-entries");
    f.run(UPLINK_IN, &tcp(CLIENT, 40000, HOST, PUB));

    let flows = f.flows();
    assert_eq!(flows.len(), 2, "{flows:#?}");
    let fwd = f.flow(tuple(CLIENT, 40000, HOST, PUB, proto::TCP));
    assert_eq!(fwd.xlate, tuple(CLIENT, 40000, A1, BACK, proto::TCP));
    assert_eq!((fwd.hook, fwd.is_reply, fwd.state), (hook::UPLINK_IN, 0, ct_state::NEW));
    let rev = f.flow(tuple(A1, BACK, CLIENT, 40000, proto::TCP));
    assert_eq!(rev.xlate, tuple(HOST, PUB, CLIENT, 40000, proto::TCP));
    assert_eq!((rev.hook, rev.is_reply), (hook::UPLINK_OUT, 1));
    assert_eq!(f.counter("flows-created"), 1);
}

#[test]
fn later_packets_of_a_published_flow_reuse_its_entries() {
    let mut f = Fixture::published("dnat-again");
    let pkt = tcp(CLIENT, 40000, HOST, PUB);
    f.run(UPLINK_IN, &pkt);
    let (verdict, out) = f.run(UPLINK_IN, &pkt);
    assert_eq!((verdict, out), (TC_ACT_OK, tcp(CLIENT, 40000, A1, BACK)));
    assert_eq!(f.flows().len(), 2);
    assert_eq!(f.counter("flows-created"), 1);
}

#[test]
fn published_udp_port_is_dnated_with_a_valid_checksum() {
    let mut f = Fixture::published("dnat-udp");
    let (verdict, out) = f.run(UPLINK_IN, &udp(CLIENT, 5353, HOST, PUB));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, udp(CLIENT, 5353, A1, BACK));
    assert_checksums(&out);
}

#[test]
fn udp_without_checksum_keeps_a_zero_checksum_through_dnat() {
    let mut f = Fixture::published("dnat-udp0");
    let no_csum = |mut p: Vec<u8>| {
        p[40..42].copy_from_slice(&[0, 0]);
        p
    };
    let (verdict, out) = f.run(UPLINK_IN, &no_csum(udp(CLIENT, 5353, HOST, PUB)));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, no_csum(udp(CLIENT, 5353, A1, BACK)), "the UDP checksum must stay 0 (none)");
    assert!(ipv4_header_ok(&out));
}

#[test]
fn port_published_on_one_host_address_matches_only_that_address() {
    let mut f = Fixture::new("dnat-bound");
    f.dp().set_port(Some(ip(HOST2)), PUB, proto::TCP, ip(A1), BACK).unwrap();

    f.assert_passes_untouched(UPLINK_IN, &tcp(CLIENT, 40000, HOST, PUB));
    let (verdict, out) = f.run(UPLINK_IN, &tcp(CLIENT, 40000, HOST2, PUB));
    assert_eq!((verdict, out), (TC_ACT_OK, tcp(CLIENT, 40000, A1, BACK)));
}

#[test]
fn port_published_on_every_address_matches_each_host_address() {
    let mut f = Fixture::published("dnat-any");
    for (sport, host) in [(40000, HOST), (40001, HOST2), (40002, GW_B)] {
        let (verdict, out) = f.run(UPLINK_IN, &tcp(CLIENT, sport, host, PUB));
        assert_eq!((verdict, out), (TC_ACT_OK, tcp(CLIENT, sport, A1, BACK)), "to {host}");
    }
}

#[test]
fn a_flow_whose_reply_tuple_is_taken_is_dropped_and_counted() {
    let mut f = Fixture::published("dnat-clash");
    f.run(UPLINK_IN, &tcp(CLIENT, 40000, HOST, PUB));
    // The same client port to another host address: both would be answered by
    // A1:80 → CLIENT:40000, so the second flow cannot be told apart and is refused.
    let (verdict, _) = f.run(UPLINK_IN, &tcp(CLIENT, 40000, HOST2, PUB));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(f.counter("ct-insert-failed"), 1);
    // The first flow keeps its translation both ways.
    let (_, out) = f.run(UPLINK_OUT, &tcp(A1, BACK, CLIENT, 40000));
    assert_eq!(out, tcp(HOST, PUB, CLIENT, 40000));
    assert_eq!(f.flows().len(), 2);
}

#[test]
fn port_published_on_a_specific_address_wins_over_every_address() {
    let mut f = Fixture::new("dnat-specific");
    f.dp().set_port(None, PUB, proto::TCP, ip(A2), BACK).unwrap();
    f.dp().set_port(Some(ip(HOST)), PUB, proto::TCP, ip(A1), BACK).unwrap();

    let (_, out) = f.run(UPLINK_IN, &tcp(CLIENT, 40000, HOST, PUB));
    assert_eq!(out, tcp(CLIENT, 40000, A1, BACK));
    let (_, out) = f.run(UPLINK_IN, &tcp(CLIENT, 40000, HOST2, PUB));
    assert_eq!(out, tcp(CLIENT, 40000, A2, BACK));
}

#[test]
fn packets_to_a_non_host_address_pass_unchanged() {
    let mut f = Fixture::published("dnat-nothost");
    f.assert_passes_untouched(UPLINK_IN, &tcp(CLIENT, 40000, NOT_HOST, PUB));
}

#[test]
fn packets_to_an_unpublished_port_pass_unchanged() {
    let mut f = Fixture::published("dnat-unpub");
    f.assert_passes_untouched(UPLINK_IN, &tcp(CLIENT, 40000, HOST, PUB + 1));
}

#[test]
fn a_port_published_for_tcp_does_not_catch_udp() {
    let mut f = Fixture::new("dnat-proto");
    f.dp().set_port(None, PUB, proto::TCP, ip(A1), BACK).unwrap();
    f.assert_passes_untouched(UPLINK_IN, &udp(CLIENT, 40000, HOST, PUB));
}

#[test]
fn removed_port_no_longer_translates_new_flows() {
    let mut f = Fixture::published("dnat-removed");
    f.dp().remove_port(None, PUB, proto::TCP).unwrap();
    f.assert_passes_untouched(UPLINK_IN, &tcp(CLIENT, 40000, HOST, PUB));
}

// ---- uplink_in: the fast path straight to a container's veth ----

/// Sets the MTU of A1's host-side veth: the fast path checks it before redirecting there.
fn a1_link_mtu(mtu: u32) {
    let st = std::process::Command::new("ip").args(["link", "set", "a1", "mtu", &mtu.to_string()]).status().unwrap();
    assert!(st.success());
}

/// `pkt` addressed to this host's MAC (test_run's lo: all zeros), as the uplink receives it.
fn for_this_host(mut pkt: Vec<u8>) -> Vec<u8> {
    pkt[..6].copy_from_slice(&[0; 6]);
    pkt
}

/// `pkt` as the stack would forward it: one hop less, the header checksum updated.
fn one_hop_less(mut pkt: Vec<u8>) -> Vec<u8> {
    pkt[14 + 8] -= 1;
    refresh_ipv4_checksum(&mut pkt);
    pkt
}

#[test]
fn a_published_flow_is_forwarded_straight_to_the_containers_veth() {
    let mut f = Fixture::published("fast-dnat");
    for (pkt, expected) in [
        (tcp(CLIENT, 40000, HOST, PUB), tcp(CLIENT, 40000, A1, BACK)),
        (udp(CLIENT, 5353, HOST, PUB), udp(CLIENT, 5353, A1, BACK)),
    ] {
        let (verdict, out) = f.run(UPLINK_IN, &for_this_host(pkt));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(out, one_hop_less(to_mac(A1_MAC, expected)), "DNAT, TTL - 1, the container's MAC");
        assert_checksums(&out);
    }
}

#[test]
fn a_routed_flow_is_forwarded_straight_to_the_containers_veth() {
    let mut f = Fixture::new("fast-routed");
    f.unprotect_a();
    let (verdict, out) = f.run(UPLINK_IN, &for_this_host(tcp(CLIENT, 40000, A1, 80)));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, one_hop_less(to_mac(A1_MAC, tcp(CLIENT, 40000, A1, 80))));
    assert_checksums(&out);
}

#[test]
fn the_fast_path_leaves_to_the_stack_what_only_the_stack_handles() {
    let mut f = Fixture::published("fast-fallback");
    a1_link_mtu(1000);
    // TTL 1: forwarding would expire it; the stack sends the time-exceeded error. The packet
    // is translated, its TTL and MAC left alone.
    let ttl_1 = |mut pkt: Vec<u8>| {
        pkt[14 + 8] = 1;
        refresh_ipv4_checksum(&mut pkt);
        pkt
    };
    let (verdict, out) = f.run(UPLINK_IN, &ttl_1(for_this_host(tcp(CLIENT, 40001, HOST, PUB))));
    assert_eq!((verdict, out), (TC_ACT_OK, ttl_1(for_this_host(tcp(CLIENT, 40001, A1, BACK)))));
    // Bigger than the container link's MTU: the stack fragments it or sends frag-needed.
    let big = |dst: &str, dport: u16| for_this_host(Ipv4Packet::udp(CLIENT, 5353, dst, dport, &[7; 1200]).build());
    let (verdict, out) = f.run(UPLINK_IN, &big(HOST, PUB));
    assert_eq!((verdict, out), (TC_ACT_OK, big(A1, BACK)));
    // A frame for another MAC (a promiscuous uplink) is not this host's to forward.
    let (verdict, out) = f.run(UPLINK_IN, &tcp(CLIENT, 40002, HOST, PUB));
    assert_eq!((verdict, out), (TC_ACT_OK, tcp(CLIENT, 40002, A1, BACK)));
}

/// A real uplink in the test's namespace: a veth `npup0` with HOST on it, a route to CLIENT's
/// subnet via a neighbour with a fixed MAC, and forwarding on. Returns npup0's MAC.
fn a_real_uplink(f: &mut Fixture) -> [u8; 6] {
    for args in [
        "link add npup0 type veth peer name npup1",
        "link set npup0 address 02:00:00:00:01:01",
        "link set npup0 up",
        "link set npup1 up",
        "addr add 198.51.100.1/24 dev npup0",
        "route add 203.0.113.0/24 via 198.51.100.2 dev npup0",
        "neigh add 198.51.100.2 lladdr 02:00:00:00:01:02 dev npup0 nud permanent",
    ] {
        let st = std::process::Command::new("ip").args(args.split(' ')).status().expect("running ip");
        assert!(st.success(), "ip {args}");
    }
    // The FIB lookup refuses to forward where the stack would not. (sysctl runs in this
    // thread's namespace, as the child of this thread.)
    let st = std::process::Command::new("sysctl").args(["-qw", "net.ipv4.ip_forward=1"]).status().unwrap();
    assert!(st.success());
    let ifindex = nix::net::if_::if_nametoindex("npup0").expect("npup0 exists");
    f.dp().set_uplink_addr(ifindex, Some(ip(HOST))).unwrap();
    [0x02, 0, 0, 0, 1, 1]
}

/// `pkt` with Ethernet addresses `dst` and `src`.
fn macs(dst: [u8; 6], src: [u8; 6], mut pkt: Vec<u8>) -> Vec<u8> {
    pkt[..6].copy_from_slice(&dst);
    pkt[6..12].copy_from_slice(&src);
    pkt
}

#[test]
fn a_published_flows_reply_leaves_straight_through_the_uplink() {
    let mut f = Fixture::published("fast-reply");
    let uplink_mac = a_real_uplink(&mut f);
    f.run(UPLINK_IN, &tcp(CLIENT, 40000, HOST, PUB));
    let (verdict, out) = f.run(FROM_CONTAINER, &tcp(A1, BACK, CLIENT, 40000));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let expected = one_hop_less(macs([0x02, 0, 0, 0, 1, 2], uplink_mac, tcp(HOST, PUB, CLIENT, 40000)));
    assert_eq!(out, expected, "reverse DNAT, TTL - 1, the next hop's MAC");
    assert_checksums(&out);
    assert_eq!(f.flow(tuple(A1, BACK, CLIENT, 40000, proto::TCP)).state, ct_state::ESTABLISHED);
}

#[test]
fn a_masqueraded_flow_leaves_straight_through_the_uplink_after_its_first_packet() {
    let mut f = Fixture::new("fast-masq");
    let uplink_mac = a_real_uplink(&mut f);
    // The first packet takes the stack (no entry yet); the uplink's program creates the flow.
    let first = tcp(A1, 45000, CLIENT, 443);
    f.assert_passes_untouched(FROM_CONTAINER, &first);
    let (_, out) = f.run(UPLINK_OUT, &first);
    assert_eq!(out, tcp(HOST, 45000, CLIENT, 443));
    // Later packets are translated on the container's veth and sent out directly.
    let (verdict, out) = f.run(FROM_CONTAINER, &first);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, one_hop_less(macs([0x02, 0, 0, 0, 1, 2], uplink_mac, tcp(HOST, 45000, CLIENT, 443))));
    assert_checksums(&out);
}

#[test]
fn without_a_route_through_an_uplink_the_reply_takes_the_stack() {
    // No uplink link in this namespace: the FIB has no route, the packet continues untouched
    // and the uplink program translates it as before.
    let mut f = Fixture::published("fast-noroute");
    f.run(UPLINK_IN, &tcp(CLIENT, 40000, HOST, PUB));
    let reply = tcp(A1, BACK, CLIENT, 40000);
    let (verdict, out) = f.run(FROM_CONTAINER, &reply);
    assert_eq!((verdict, out), (TC_ACT_OK, reply));
}

// ---- uplink_out: replies of published flows, masquerade ----

#[test]
fn reply_of_a_published_flow_leaves_with_the_host_address_and_port() {
    let mut f = Fixture::published("dnat-reply");
    f.run(UPLINK_IN, &tcp(CLIENT, 40000, HOST, PUB));
    let (verdict, out) = f.run(UPLINK_OUT, &tcp(A1, BACK, CLIENT, 40000));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, tcp(HOST, PUB, CLIENT, 40000), "only the source address and port change");
    assert_checksums(&out);
}

#[test]
fn reply_of_a_published_udp_flow_leaves_with_the_host_address_and_port() {
    let mut f = Fixture::published("dnat-reply-udp");
    f.run(UPLINK_IN, &udp(CLIENT, 5353, HOST, PUB));
    let (verdict, out) = f.run(UPLINK_OUT, &udp(A1, BACK, CLIENT, 5353));
    assert_eq!((verdict, &out), (TC_ACT_OK, &udp(HOST, PUB, CLIENT, 5353)));
    assert_checksums(&out);
}

#[test]
fn reply_marks_the_flow_established_and_fin_marks_it_closing() {
    let mut f = Fixture::published("dnat-state");
    f.run(UPLINK_IN, &tcp(CLIENT, 40000, HOST, PUB));
    f.run(UPLINK_OUT, &tcp(A1, BACK, CLIENT, 40000));
    assert_eq!(f.flow(tuple(A1, BACK, CLIENT, 40000, proto::TCP)).state, ct_state::ESTABLISHED);

    let mut fin = tcp(CLIENT, 40000, HOST, PUB);
    fin[14 + 20 + 13] = 0x11; // FIN|ACK (the checksum no longer matters for conntrack)
    f.run(UPLINK_IN, &fin);
    assert_eq!(f.flow(tuple(CLIENT, 40000, HOST, PUB, proto::TCP)).state, ct_state::CLOSING);
}

#[test]
fn container_traffic_to_the_outside_is_masqueraded_keeping_the_source_port() {
    let mut f = Fixture::new("masq");
    let (verdict, out) = f.run(UPLINK_OUT, &tcp(A1, 45000, CLIENT, 443));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, tcp(HOST, 45000, CLIENT, 443), "only the source address changes");
    assert_checksums(&out);

    let fwd = f.flow(tuple(A1, 45000, CLIENT, 443, proto::TCP));
    assert_eq!((fwd.xlate, fwd.hook, fwd.is_reply), (tuple(HOST, 45000, CLIENT, 443, proto::TCP), hook::UPLINK_OUT, 0));
    let rev = f.flow(tuple(CLIENT, 443, HOST, 45000, proto::TCP));
    assert_eq!((rev.xlate, rev.hook, rev.is_reply), (tuple(CLIENT, 443, A1, 45000, proto::TCP), hook::UPLINK_IN, 1));
    assert_eq!(f.flows().len(), 2);
}

#[test]
fn udp_from_a_container_is_masqueraded_with_a_valid_checksum() {
    let mut f = Fixture::new("masq-udp");
    let (verdict, out) = f.run(UPLINK_OUT, &udp(A1, 45000, CLIENT, 53));
    assert_eq!((verdict, &out), (TC_ACT_OK, &udp(HOST, 45000, CLIENT, 53)));
    assert_checksums(&out);
}

#[test]
fn reply_to_a_masqueraded_flow_gets_the_container_address_back() {
    let mut f = Fixture::new("masq-reply");
    f.run(UPLINK_OUT, &tcp(A1, 45000, CLIENT, 443));
    let (verdict, out) = f.run(UPLINK_IN, &tcp(CLIENT, 443, HOST, 45000));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, tcp(CLIENT, 443, A1, 45000), "only the destination address changes");
    assert_checksums(&out);
    assert_eq!(f.flow(tuple(CLIENT, 443, HOST, 45000, proto::TCP)).state, ct_state::ESTABLISHED);
}

#[test]
fn masquerade_picks_another_port_when_the_translation_is_taken() {
    let mut f = Fixture::new("masq-retry");
    f.run(UPLINK_OUT, &tcp(A1, 45000, CLIENT, 443));
    // A2 uses the same source port toward the same server: HOST:45000 is taken.
    let (verdict, out) = f.run(UPLINK_OUT, &tcp(A2, 45000, CLIENT, 443));
    assert_eq!(verdict, TC_ACT_OK);
    let (sport, _) = l4_ports(&out);
    assert_ne!(sport, 45000);
    assert!((32768..=60999).contains(&sport), "port {sport} outside 32768-60999");
    assert_eq!(out, tcp(HOST, sport, CLIENT, 443));
    assert_checksums(&out);
    assert!(f.counter("port-retries") >= 1);

    // Replies reach the right container.
    let (_, out) = f.run(UPLINK_IN, &tcp(CLIENT, 443, HOST, sport));
    assert_eq!(out, tcp(CLIENT, 443, A2, 45000));
    assert_checksums(&out);
    let (_, out) = f.run(UPLINK_IN, &tcp(CLIENT, 443, HOST, 45000));
    assert_eq!(out, tcp(CLIENT, 443, A1, 45000));
}

#[test]
fn masquerade_does_not_take_the_tuple_of_a_published_flow() {
    let mut f = Fixture::published("masq-vs-dnat");
    f.run(UPLINK_IN, &tcp(CLIENT, 40000, HOST, PUB));
    // A2 connects from port 8080 to the client's port 40000: HOST:8080 → CLIENT:40000 is the
    // published flow's reply direction, so the masquerade must pick another port.
    let (verdict, out) = f.run(UPLINK_OUT, &tcp(A2, PUB, CLIENT, 40000));
    assert_eq!(verdict, TC_ACT_OK);
    let (sport, _) = l4_ports(&out);
    assert_ne!(sport, PUB);
    assert_eq!(out, tcp(HOST, sport, CLIENT, 40000));
    // The published flow still goes to A1.
    let (_, out) = f.run(UPLINK_IN, &tcp(CLIENT, 40000, HOST, PUB));
    assert_eq!(out, tcp(CLIENT, 40000, A1, BACK));
}

#[test]
fn replies_of_a_flow_routed_to_an_unprotected_network_keep_the_container_address() {
    // A neighbour routes to the container subnet directly (no published port) on a
    // nat-unprotected network: the flow is tracked as is, so the container's SYN-ACK is not
    // mistaken for a new outbound flow and masqueraded.
    let mut f = Fixture::new("routed-in");
    f.unprotect_a();
    let syn = tcp(CLIENT, 40000, A1, 80);
    let (verdict, out) = f.run(UPLINK_IN, &syn);
    assert_eq!((verdict, &out), (TC_ACT_OK, &syn), "the inbound packet passes unchanged");
    let fwd = f.flow(tuple(CLIENT, 40000, A1, 80, proto::TCP));
    assert_eq!((fwd.xlate, fwd.hook, fwd.is_reply), (tuple(CLIENT, 40000, A1, 80, proto::TCP), hook::UPLINK_IN, 0));
    let rev = f.flow(tuple(A1, 80, CLIENT, 40000, proto::TCP));
    assert_eq!((rev.xlate, rev.hook, rev.is_reply), (tuple(A1, 80, CLIENT, 40000, proto::TCP), hook::UPLINK_OUT, 1));

    let reply = tcp(A1, 80, CLIENT, 40000);
    let (verdict, out) = f.run(UPLINK_OUT, &reply);
    assert_eq!((verdict, &out), (TC_ACT_OK, &reply), "the reply must not be masqueraded");
    assert_eq!(f.flows().len(), 2, "no masquerade entry for the reply");
    assert_eq!(f.flow(tuple(A1, 80, CLIENT, 40000, proto::TCP)).state, ct_state::ESTABLISHED);
}

#[test]
fn a_nat_network_drops_what_outside_hosts_route_to_its_containers() {
    // Docker's default: from outside, containers are reached through published host ports only.
    let mut f = Fixture::published("direct-nat");
    let mut frag = udp(CLIENT, 5353, A1, 53);
    frag[14 + 6] = 0x20; // more fragments
    refresh_ipv4_checksum(&mut frag);
    for pkt in [
        tcp(CLIENT, 40000, A1, 80),
        tcp(CLIENT, 40000, A1, BACK), // even the published container port, by its own address
        udp(CLIENT, 5353, A1, 53),
        icmp_echo(CLIENT, A1, ICMP_ECHO_REQUEST, 7, 1, b"ping"),
        frag,
    ] {
        let (verdict, _) = f.run(UPLINK_IN, &pkt);
        assert_eq!(verdict, TC_ACT_SHOT);
    }
    assert_eq!(f.counter("direct-access"), 5);
    assert!(f.flows().is_empty(), "{:#?}", f.flows());
    // The host's own address on the network (the gateway) is not a container.
    f.assert_passes_untouched(UPLINK_IN, &tcp(CLIENT, 40000, GW_A, 22));
}

/// ENDPOINT_NETS as the datapath holds it: (container address, its network's id, gateway, flags).
fn endpoint_nets(f: &mut Fixture) -> Vec<(Ipv4Addr, u32, Ipv4Addr, u32)> {
    let nets = f.dp().endpoint_nets().unwrap();
    nets.into_iter().map(|(a, n)| (a, n.net_id, Ipv4Addr::from(n.gateway.to_ne_bytes()), n.flags)).collect()
}

#[test]
fn endpoint_nets_say_what_networks_says_of_each_container_address() {
    // The uplink programs' exact-match shortcut for a container's address: what the trie gives
    // for it, kept so as containers, networks and host addresses change.
    let mut f = Fixture::new("epnets");
    let masq = net_flags::MASQUERADE;
    let a = |addr: &str, flags: u32| (ip(addr), NET_A, ip(GW_A), flags);
    let b1 = (ip(B1), NET_B, ip(GW_B), masq);
    let n1 = (ip(N1), NET_N, ip(GW_N), net_flags::DIRECT_PUBLISHED);
    assert_eq!(endpoint_nets(&mut f), vec![a(A1, masq), a(A2, masq), b1, n1]);
    // A network's mode changes: its containers' entries follow.
    f.unprotect_a();
    let open = masq | net_flags::DIRECT_ANY;
    assert_eq!(endpoint_nets(&mut f), vec![a(A1, open), a(A2, open), b1, n1]);
    // A container leaves.
    f.dp().remove_endpoint(ip(A2)).unwrap();
    assert_eq!(endpoint_nets(&mut f), vec![a(A1, open), b1, n1]);
    // An address the host holds too (ports may be published on it) is left to HOST_ADDRS.
    let hosts = [HOST, HOST2, GW_A, GW_B, GW_N].map(ip);
    f.dp().sync_host_addrs(&[&hosts[..], &[ip(B1)]].concat()).unwrap();
    assert_eq!(endpoint_nets(&mut f), vec![a(A1, open), n1]);
    f.dp().sync_host_addrs(&hosts).unwrap();
    assert_eq!(endpoint_nets(&mut f), vec![a(A1, open), b1, n1]);
    // A network goes (before its last container, as a failed setup may leave it): so do its
    // entries, and they come back with it.
    f.dp().remove_network("172.19.0.0/16".parse().unwrap()).unwrap();
    assert_eq!(endpoint_nets(&mut f), vec![a(A1, open), n1]);
    f.dp().set_network("172.19.0.0/16".parse().unwrap(), NET_B, ip(GW_B), masq).unwrap();
    assert_eq!(endpoint_nets(&mut f), vec![a(A1, open), b1, n1]);
    // A daemon starting again rebuilds it from the other maps (an earlier build had none).
    f.inner.reload(LoadOptions::default());
    assert_eq!(endpoint_nets(&mut f), vec![a(A1, open), b1, n1]);
}

#[test]
fn a_container_address_whose_slot_another_holds_is_judged_by_its_network() {
    // ENDPOINT_NETS has one slot per address hash: of two addresses with one slot, the first
    // keeps it and the other is left to the trie, with the same verdicts.
    let mut f = Fixture::new("epnets-slot");
    let slot = |a: Ipv4Addr| netpath_common::endpoint_net_slot(wire_addr(a));
    let other = (3..=u16::MAX)
        .map(|n| Ipv4Addr::new(172, 18, (n >> 8) as u8, n as u8))
        .find(|a| *a != ip(A1) && slot(*a) == slot(ip(A1)))
        .expect("a subnet of 65,536 addresses over 16,384 slots shares one");
    let veth = add_veth("a9", 1500);
    f.dp().set_endpoint(other, veth, NET_A, [0x02, 0x42, 0xac, 0x12, 0, 9], gw_mac(GW_A)).unwrap();
    let held = |f: &mut Fixture| endpoint_nets(f).into_iter().map(|e| e.0).collect::<Vec<_>>();
    assert_eq!(held(&mut f), vec![ip(A1), ip(A2), ip(B1), ip(N1)], "A1 keeps its slot");
    let mut frag = udp(CLIENT, 5353, &other.to_string(), 53);
    frag[14 + 6] = 0x20; // more fragments
    refresh_ipv4_checksum(&mut frag);
    let pkts = [tcp(CLIENT, 40000, &other.to_string(), 80), udp(CLIENT, 5353, &other.to_string(), 53), frag];
    for pkt in &pkts {
        assert_eq!(f.run(UPLINK_IN, &for_this_host(pkt.clone())).0, TC_ACT_SHOT);
    }
    assert_eq!(f.counter("direct-access"), 3);
    // A1 leaves; a start gives the slot to the other address.
    f.dp().remove_endpoint(ip(A1)).unwrap();
    f.inner.reload(LoadOptions::default());
    assert_eq!(held(&mut f), vec![ip(A2), other, ip(B1), ip(N1)]);
    for pkt in &pkts {
        assert_eq!(f.run(UPLINK_IN, &for_this_host(pkt.clone())).0, TC_ACT_SHOT);
    }
    assert_eq!(f.counter("direct-access"), 6);
    // Unprotected, its flows are let in, the same by its slot as by the trie.
    f.unprotect_a();
    let pkt = tcp(CLIENT, 40000, &other.to_string(), 80);
    assert_eq!(f.run(UPLINK_IN, &pkt), (TC_ACT_OK, pkt));
}

#[test]
fn an_address_of_a_container_subnet_no_container_holds_is_judged_by_its_network() {
    // ENDPOINT_NETS holds container addresses only: the rest of a subnet is decided by the
    // trie, with the same verdicts.
    let mut f = Fixture::published("subnet-rest");
    const FREE: &str = "172.18.0.99";
    let mut frag = udp(CLIENT, 5353, FREE, 53);
    frag[14 + 6] = 0x20; // more fragments
    refresh_ipv4_checksum(&mut frag);
    for pkt in [tcp(CLIENT, 40000, FREE, 80), udp(CLIENT, 5353, FREE, 53), frag] {
        assert_eq!(f.run(UPLINK_IN, &for_this_host(pkt)).0, TC_ACT_SHOT);
    }
    assert_eq!(f.counter("direct-access"), 3);
    // Unprotected: let in and tracked as is, for the stack to deliver (no container has it).
    f.unprotect_a();
    let pkt = for_this_host(tcp(CLIENT, 40000, FREE, 80));
    assert_eq!(f.run(UPLINK_IN, &pkt), (TC_ACT_OK, pkt));
    assert_eq!(f.flow(tuple(CLIENT, 40000, FREE, 80, proto::TCP)).xlate, tuple(CLIENT, 40000, FREE, 80, proto::TCP));
}

#[test]
fn malformed_packets_to_a_container_address_are_dropped_as_direct_access() {
    // Cut short, they carry no ports to look up a flow with; the container's address alone
    // says they may not come in. A header that does not parse is the stack's, as always.
    let mut f = Fixture::published("direct-malformed");
    let tcp_full = Ipv4Packet::tcp(CLIENT, 40000, A1, 80, b"").build();
    let udp_full = udp(CLIENT, 5353, A1, 53);
    for pkt in [cut_l4(&tcp_full, 4), cut_l4(&tcp_full, 17), cut_l4(&udp_full, 7), cut_l4(&udp_full, 0)] {
        assert_eq!(f.run(UPLINK_IN, &for_this_host(pkt)).0, TC_ACT_SHOT);
    }
    assert_eq!(f.counter("direct-access"), 4);
    let opts = for_this_host(with_ip_options(&tcp_full, &[1, 1, 1, 0]));
    assert_eq!(f.run(UPLINK_IN, &opts).0, TC_ACT_SHOT, "IP options: uplink_xdp leaves it to uplink_in, which drops it");
    assert_eq!(f.counter("direct-access"), 5);
    let mut bad_ihl = for_this_host(tcp_full.clone());
    bad_ihl[14] = 0x44;
    refresh_ipv4_checksum(&mut bad_ihl);
    f.assert_passes_untouched(UPLINK_IN, &bad_ihl);
    assert!(f.flows().is_empty());
}

#[test]
fn a_container_address_the_host_holds_too_keeps_the_ports_published_on_it() {
    // Not a setup netpath makes, but one it must not misread: an address both a container's
    // and the host's is the host's for published ports, as before ENDPOINT_NETS.
    let mut f = Fixture::new("ep-is-host");
    let hosts = [HOST, HOST2, GW_A, GW_B, GW_N, A2].map(ip);
    f.dp().sync_host_addrs(&hosts).unwrap();
    f.dp().set_port(Some(ip(A2)), PUB, proto::TCP, ip(A1), BACK).unwrap();
    let (verdict, out) = f.run(UPLINK_IN, &for_this_host(tcp(CLIENT, 40000, A2, PUB)));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, one_hop_less(to_mac(A1_MAC, tcp(CLIENT, 40000, A1, BACK))));
    // Its other ports are still closed to direct access.
    assert_eq!(f.run(UPLINK_IN, &for_this_host(tcp(CLIENT, 40000, A2, 81))).0, TC_ACT_SHOT);
    assert_eq!(f.counter("direct-access"), 1);
}

// ---- uplink_in: CT_PORTS, the port bits in front of its conntrack lookup ----

/// CT_PORTS as the datapath holds it: whether complete, and the (protocol, port) pairs marked.
fn ct_ports(f: &mut Fixture) -> (bool, Vec<(u8, u16)>) {
    let c = f.dp().ct_ports().unwrap().expect("this build has CT_PORTS");
    (c.complete, c.marked)
}

/// Clears CT_PORTS' COMPLETE word through its pin, as a daemon does before refilling it:
/// until it is set again the programs look every packet up.
fn make_ct_ports_incomplete(f: &mut Fixture) {
    use aya::maps::{Array, Map, MapData};
    let pin = MapData::from_pin(map_pin(f.inner.pins(), "CT_PORTS")).unwrap();
    let mut words = Array::<_, u64>::try_from(Map::Array(pin)).unwrap();
    words.set(ct_ports::COMPLETE, 0, 0).unwrap();
}

#[test]
fn port_bits_mark_the_destination_ports_of_entries_that_apply_at_the_uplinks_ingress() {
    let mut f = Fixture::published("ctports");
    assert_eq!(ct_ports(&mut f), (true, vec![]), "a new table: complete, nothing marked");
    f.run(UPLINK_IN, &tcp(CLIENT, 40000, HOST, PUB)); // its entry at uplink_in: CLIENT -> HOST:PUB
    f.run(UPLINK_OUT, &udp(A1, 45000, CLIENT, 53)); // its reply's entry: CLIENT:53 -> HOST:45000
    f.run(UPLINK_OUT, &icmp_echo(A1, CLIENT, ICMP_ECHO_REQUEST, 7, 1, b"ping")); // ICMP: no bit
    f.run_from(A2, &tcp(A2, 45001, HOST, PUB)); // a hairpin's entries apply at A2's veth
    assert_eq!(f.flows().len(), 8);
    let marked = vec![(proto::TCP, PUB), (proto::UDP, 45000)];
    assert_eq!(ct_ports(&mut f), (true, marked.clone()), "not 53, 80 or 45001: no entry applying there has them");

    // An upgrade from a build without the bits (no pin): refilled from CT, then complete.
    std::fs::remove_file(map_pin(f.inner.pins(), "CT_PORTS")).unwrap();
    f.inner.reload(LoadOptions::default());
    assert_eq!(ct_ports(&mut f), (true, marked.clone()), "after an upgrade");
    // A daemon that died while refilling them left them incomplete: the next one refills them.
    make_ct_ports_incomplete(&mut f);
    f.inner.reload(LoadOptions::default());
    assert_eq!(ct_ports(&mut f), (true, marked.clone()), "after an interrupted refill");
    // A restart keeps them as the programs left them: bits are never cleared (a stale one
    // costs a lookup, no verdict).
    f.dp().remove_port(None, PUB, proto::TCP).unwrap();
    f.dp().flow_table().unwrap().flush_where(|_, _| true).unwrap();
    assert!(f.flows().is_empty());
    f.inner.reload(LoadOptions::default());
    assert_eq!(ct_ports(&mut f), (true, marked), "after a restart");
}

#[test]
fn port_bits_change_no_verdict_of_the_uplinks_ingress() {
    // Flows whose packets come in from outside, each one tracked at uplink_in (or uplink_out for
    // its replies) before what would refuse a new flow like it: a masqueraded flow's replies, a
    // network without masquerade (its container's address is closed to new flows from outside),
    // a flow to a port since unpublished, a flow to a network since switched back to `nat`.
    let mut f = Fixture::published("ctports-verdicts");
    f.run(UPLINK_OUT, &tcp(A1, 45000, CLIENT, 443));
    f.run(UPLINK_OUT, &tcp(N1, 45001, CLIENT, 443));
    f.run(UPLINK_IN, &tcp(CLIENT, 40000, HOST, PUB));
    f.dp().remove_port(None, PUB, proto::TCP).unwrap();
    f.unprotect_a();
    f.run(UPLINK_IN, &tcp(CLIENT, 40001, A2, 22));
    f.dp().set_network("172.18.0.0/16".parse().unwrap(), NET_A, ip(GW_A), net_flags::MASQUERADE).unwrap();
    let flows = f.flows().len();
    assert_eq!(flows, 8);

    let tcp_to_n1 = Ipv4Packet::tcp(CLIENT, 443, N1, 45001, b"").build();
    let passes = [
        (tcp(CLIENT, 443, HOST, 45000), tcp(CLIENT, 443, A1, 45000)),
        (tcp(CLIENT, 443, N1, 45001), tcp(CLIENT, 443, N1, 45001)),
        (tcp(CLIENT, 40000, HOST, PUB), tcp(CLIENT, 40000, A1, BACK)),
        (tcp(CLIENT, 40001, A2, 22), tcp(CLIENT, 40001, A2, 22)),
        // IP options: its tuple is the tracked flow's.
        (with_ip_options(&tcp_to_n1, &[1, 1, 1, 0]), with_ip_options(&tcp_to_n1, &[1, 1, 1, 0])),
    ];
    let mut frag = tcp(CLIENT, 443, N1, 45001);
    frag[14 + 6] = 0x20; // more fragments
    refresh_ipv4_checksum(&mut frag);
    let drops = [
        tcp(CLIENT, 443, N1, 45002), // a port no entry has: its bit is clear
        tcp(CLIENT, 444, N1, 45001), // a tracked flow's port (bit set), another flow
        udp(CLIENT, 443, N1, 45001), // the same port for UDP: its own bit, clear
        tcp(CLIENT, 40002, A2, 22),  // the flow from before the mode change's port, a new flow
        tcp(CLIENT, 40000, A1, 9),   // a flood's packet
        cut_l4(&tcp_to_n1, 4),       // no ports: nothing to look up, the address decides
        cut_l4(&tcp_to_n1, 17),
        frag,
        // IP options (uplink_xdp leaves those to uplink_in), a port no entry has.
        with_ip_options(&Ipv4Packet::tcp(CLIENT, 443, N1, 45002, b"").build(), &[1, 1, 1, 0]),
    ];
    for complete in [true, false] {
        let round = if complete { "bits complete" } else { "bits incomplete: every packet looked up" };
        if !complete {
            make_ct_ports_incomplete(&mut f);
            assert!(!ct_ports(&mut f).0, "incomplete");
        }
        let before = f.counter("direct-access");
        for (pkt, want) in &passes {
            let (verdict, out) = f.run(UPLINK_IN, pkt);
            assert_eq!((verdict, &out), (TC_ACT_OK, want), "{round}: a tracked flow's packet");
            assert_checksums(&out);
        }
        for (i, pkt) in drops.iter().enumerate() {
            assert_eq!(f.run(UPLINK_IN, pkt).0, TC_ACT_SHOT, "{round}: drop case {i}");
        }
        assert_eq!(f.counter("direct-access") - before, drops.len() as u64, "{round}: all of them as direct access");
        assert_eq!(f.flows().len(), flows, "{round}: no flow created or lost");
    }
}

#[test]
fn a_routed_network_opens_published_container_ports_and_icmp_only() {
    let mut f = Fixture::new("direct-routed");
    f.dp().set_published(ip(N1), 80, proto::TCP).unwrap();
    let open = tcp(CLIENT, 40000, N1, 80);
    let (verdict, out) = f.run(UPLINK_IN, &open);
    assert_eq!((verdict, out), (TC_ACT_OK, open), "no translation on a routed network");
    assert_eq!(f.flow(tuple(CLIENT, 40000, N1, 80, proto::TCP)).xlate, tuple(CLIENT, 40000, N1, 80, proto::TCP));
    let ping = icmp_echo(CLIENT, N1, ICMP_ECHO_REQUEST, 7, 1, b"ping");
    assert_eq!(f.run(UPLINK_IN, &ping), (TC_ACT_OK, ping));
    for closed in [tcp(CLIENT, 40000, N1, 81), udp(CLIENT, 40000, N1, 80)] {
        assert_eq!(f.run(UPLINK_IN, &closed).0, TC_ACT_SHOT);
    }
    assert_eq!(f.counter("direct-access"), 2);
    f.dp().remove_published(ip(N1), 80, proto::TCP).unwrap();
    assert_eq!(f.run(UPLINK_IN, &tcp(CLIENT, 40001, N1, 80)).0, TC_ACT_SHOT);
}

#[test]
fn a_routed_networks_containers_keep_their_address_and_get_replies() {
    let mut f = Fixture::new("routed-out");
    let out_pkt = tcp(N1, 45000, CLIENT, 443);
    let (verdict, out) = f.run(UPLINK_OUT, &out_pkt);
    assert_eq!((verdict, out), (TC_ACT_OK, out_pkt), "not masqueraded");
    // Tracked as is, so the reply is let in although port 45000 is not published.
    let reply = tcp(CLIENT, 443, N1, 45000);
    let (verdict, out) = f.run(UPLINK_IN, &reply);
    assert_eq!((verdict, out), (TC_ACT_OK, reply));
    assert_eq!(f.flows().len(), 2);
}

#[test]
fn traffic_from_a_non_masquerading_network_is_not_translated() {
    let mut f = Fixture::new("masq-off");
    let pkt = tcp(N1, 45000, CLIENT, 443);
    assert_eq!(f.run(UPLINK_OUT, &pkt), (TC_ACT_OK, pkt.clone()));
    assert!(
        f.flows().values().all(|e| e.xlate == tuple(N1, 45000, CLIENT, 443, proto::TCP)
            || e.xlate == tuple(CLIENT, 443, N1, 45000, proto::TCP)),
        "tracked only as is"
    );
}

#[test]
fn traffic_from_a_non_container_source_is_not_translated() {
    let mut f = Fixture::new("masq-host");
    f.assert_passes_untouched(UPLINK_OUT, &tcp(HOST, 45000, CLIENT, 443));
    f.assert_passes_untouched(UPLINK_OUT, &tcp("10.9.9.9", 45000, CLIENT, 443));
}

#[test]
fn traffic_to_a_container_subnet_is_not_masqueraded() {
    let mut f = Fixture::new("masq-tonet");
    f.assert_passes_untouched(UPLINK_OUT, &tcp(A1, 45000, B1, 443));
    f.assert_passes_untouched(UPLINK_OUT, &tcp(A1, 45000, N1, 443));
}

#[test]
fn no_masquerade_on_an_uplink_without_an_address() {
    let mut f = Fixture::new("masq-noaddr");
    f.dp().set_uplink_addr(LO, None).unwrap();
    f.assert_passes_untouched(UPLINK_OUT, &tcp(A1, 45000, CLIENT, 443));
}

#[test]
fn icmp_echo_from_a_container_is_masqueraded_with_its_identifier_as_the_port() {
    let mut f = Fixture::new("masq-ping");
    let ping = |src: &str| icmp_echo(src, CLIENT, ICMP_ECHO_REQUEST, 0x1234, 1, b"ping");
    let (verdict, out) = f.run(UPLINK_OUT, &ping(A1));
    assert_eq!((verdict, &out), (TC_ACT_OK, &ping(HOST)), "only the source address changes");
    assert_checksums(&out);

    let rev = f.flow(tuple(CLIENT, 0, HOST, 0x1234, proto::ICMP));
    assert_eq!((rev.xlate, rev.hook), (tuple(CLIENT, 0, A1, 0x1234, proto::ICMP), hook::UPLINK_IN));
    let pong = |dst: &str| icmp_echo(CLIENT, dst, ICMP_ECHO_REPLY, 0x1234, 1, b"ping");
    let (verdict, out) = f.run(UPLINK_IN, &pong(HOST));
    assert_eq!((verdict, &out), (TC_ACT_OK, &pong(A1)));
    assert_checksums(&out);
}

#[test]
fn icmp_echo_identifier_is_rewritten_on_collision_and_restored_on_the_reply() {
    let mut f = Fixture::new("masq-ping-id");
    let ping = |src: &str, id: u16| icmp_echo(src, CLIENT, ICMP_ECHO_REQUEST, id, 7, b"ping");
    f.run(UPLINK_OUT, &ping(A1, 0x1234));
    let (verdict, out) = f.run(UPLINK_OUT, &ping(A2, 0x1234));
    assert_eq!(verdict, TC_ACT_OK);
    let id = icmp_echo_id(&out);
    assert_ne!(id, 0x1234);
    assert!((32768..=60999).contains(&id), "identifier {id} outside 32768-60999");
    assert_eq!(out, ping(HOST, id));
    assert_checksums(&out);

    let pong = |dst: &str, id: u16| icmp_echo(CLIENT, dst, ICMP_ECHO_REPLY, id, 7, b"ping");
    let (verdict, out) = f.run(UPLINK_IN, &pong(HOST, id));
    assert_eq!((verdict, &out), (TC_ACT_OK, &pong(A2, 0x1234)), "the reply gets A2's address and identifier back");
    assert_checksums(&out);
}

// ---- ICMP errors about translated flows ----

#[test]
fn icmp_error_about_a_masqueraded_flow_reaches_the_container_untranslated() {
    let mut f = Fixture::new("icmp-err-in");
    f.run(UPLINK_OUT, &tcp(A1, 45000, CLIENT, 443));
    // Fragmentation needed, quoting the packet as it left the host.
    let err = icmp_error(CLIENT, HOST, ICMP_DEST_UNREACH, 4, &tcp(HOST, 45000, CLIENT, 443));
    let (verdict, out) = f.run(UPLINK_IN, &err);
    assert_eq!(verdict, TC_ACT_OK);
    let expected = icmp_error(CLIENT, A1, ICMP_DEST_UNREACH, 4, &tcp(A1, 45000, CLIENT, 443));
    assert_eq!(out, expected, "outer destination and quoted source must be the container's");
    assert_checksums(&out);
    assert_eq!(csum(&out[14 + 20 + 8..14 + 20 + 8 + 20], 0), 0, "the quoted IPv4 header checksum must verify");
}

#[test]
fn icmp_error_about_a_published_flow_reaches_the_container_with_its_port() {
    let mut f = Fixture::published("icmp-err-pub");
    f.run(UPLINK_IN, &tcp(CLIENT, 40000, HOST, PUB));
    // The client became unreachable: a router answers the reply (HOST:8080 → CLIENT:40000).
    let err = icmp_error(NOT_HOST, HOST, ICMP_DEST_UNREACH, 1, &tcp(HOST, PUB, CLIENT, 40000));
    let (verdict, out) = f.run(UPLINK_IN, &err);
    assert_eq!(verdict, TC_ACT_OK);
    let expected = icmp_error(NOT_HOST, A1, ICMP_DEST_UNREACH, 1, &tcp(A1, BACK, CLIENT, 40000));
    assert_eq!(out, expected, "outer destination and quoted source must be A1:80");
    assert_checksums(&out);
}

#[test]
fn icmp_error_from_a_published_container_leaves_with_the_host_address() {
    let mut f = Fixture::published("icmp-err-out");
    f.run(UPLINK_IN, &tcp(CLIENT, 40000, HOST, PUB));
    // A1 reports a problem with the packet it received (CLIENT:40000 → A1:80).
    let err = icmp_error(A1, CLIENT, ICMP_DEST_UNREACH, 4, &tcp(CLIENT, 40000, A1, BACK));
    let (verdict, out) = f.run(UPLINK_OUT, &err);
    assert_eq!(verdict, TC_ACT_OK);
    let expected = icmp_error(HOST, CLIENT, ICMP_DEST_UNREACH, 4, &tcp(CLIENT, 40000, HOST, PUB));
    assert_eq!(out, expected, "the client must see the error about the packet it sent");
    assert_checksums(&out);
}

#[test]
fn icmp_error_about_an_unknown_flow_passes_unchanged() {
    let mut f = Fixture::new("icmp-err-unknown");
    let err = icmp_error(CLIENT, HOST, ICMP_DEST_UNREACH, 3, &tcp(HOST, 45000, CLIENT, 443));
    f.assert_passes_untouched(UPLINK_IN, &err);
}

// ---- from_container: isolation ----

#[test]
fn traffic_to_a_container_of_another_network_is_dropped_and_counted() {
    let mut f = Fixture::new("iso-drop");
    let (verdict, _) = f.run(FROM_CONTAINER, &tcp(A1, 45000, B1, 80));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(f.counter("isolation"), 1);
    assert!(f.flows().is_empty());
}

#[test]
fn other_networks_reach_a_routed_networks_published_ports_only() {
    // Docker's routed mode: other networks may use direct routing to its published ports.
    let mut f = Fixture::new("iso-routed");
    f.dp().set_published(ip(N1), 80, proto::TCP).unwrap();
    let (verdict, _) = f.run(FROM_CONTAINER, &tcp(A1, 45000, N1, 80));
    assert_eq!(verdict, TC_ACT_OK, "the stack routes it");
    assert_eq!(f.flow(tuple(A1, 45000, N1, 80, proto::TCP)).xlate, tuple(A1, 45000, N1, 80, proto::TCP));
    // The reply crosses back into A's network although N and A are isolated otherwise.
    let (verdict, out) = f.run(FROM_CONTAINER, &tcp(N1, 80, A1, 45000));
    assert_eq!((verdict, out), (TC_ACT_REDIRECT, to_mac(A1_MAC, tcp(N1, 80, A1, 45000))));
    let ping = icmp_echo(A1, N1, ICMP_ECHO_REQUEST, 9, 1, b"ping");
    assert_eq!(f.run(FROM_CONTAINER, &ping).0, TC_ACT_OK);
    // Unpublished ports of N, and anything of A from N, stay isolated.
    assert_eq!(f.run(FROM_CONTAINER, &tcp(A1, 45001, N1, 81)).0, TC_ACT_SHOT);
    assert_eq!(f.run(FROM_CONTAINER, &tcp(N1, 1000, A1, 80)).0, TC_ACT_SHOT);
    assert_eq!(f.counter("isolation"), 2);
}

#[test]
fn isolation_also_drops_packets_that_are_not_translatable() {
    let mut f = Fixture::new("iso-untranslatable");
    let mut fragment = udp(A1, 45000, B1, 53);
    fragment[20] = 0x20; // more fragments
    refresh_ipv4_checksum(&mut fragment);
    let ping = icmp_echo(A1, B1, ICMP_ECHO_REQUEST, 1, 1, b"");
    for pkt in [fragment, ping] {
        assert_eq!(f.run(FROM_CONTAINER, &pkt).0, TC_ACT_SHOT);
    }
    assert_eq!(f.counter("isolation"), 2);
}

#[test]
fn traffic_within_a_network_passes() {
    let mut f = Fixture::new("iso-same");
    f.assert_passes_untouched(FROM_CONTAINER, &tcp(A1, 45000, A2, 80));
    assert_eq!(f.counter("isolation"), 0);
}

#[test]
fn traffic_to_another_networks_gateway_passes() {
    let mut f = Fixture::new("iso-gw");
    f.assert_passes_untouched(FROM_CONTAINER, &tcp(A1, 45000, GW_B, 80));
}

#[test]
fn traffic_to_the_outside_passes_from_container() {
    let mut f = Fixture::new("iso-out");
    f.assert_passes_untouched(FROM_CONTAINER, &tcp(A1, 45000, CLIENT, 443));
}

#[test]
fn unknown_source_into_a_container_subnet_is_dropped() {
    let mut f = Fixture::new("iso-spoof");
    // From outside every network, and spoofed from inside A's subnet.
    for src in ["10.9.9.9", "172.18.0.99"] {
        let (verdict, _) = f.run(FROM_CONTAINER, &tcp(src, 45000, A1, 80));
        assert_eq!(verdict, TC_ACT_SHOT, "from {src}");
    }
    assert_eq!(f.counter("isolation"), 2);
}

#[test]
fn a_container_sending_with_another_containers_address_is_dropped_and_counted() {
    let mut f = Fixture::published("spoof");
    // From A1's veth with B1's address: to B1's network (past isolation) or to the outside.
    for pkt in [tcp(B1, 1000, GW_B, 80), tcp(B1, 1000, CLIENT, 80), tcp(A2, 1000, HOST, PUB)] {
        assert_eq!(f.run_from(A1, &pkt).0, TC_ACT_SHOT, "{:?}", ipv4_addrs(&pkt));
    }
    assert_eq!(f.counter("spoofed-source"), 3);
    assert!(f.flows().is_empty(), "a spoofed packet must not create a flow");
    // Its own address passes; so does an address that is nobody's (left to the other checks).
    f.assert_passes_untouched(FROM_CONTAINER, &tcp(A1, 1000, CLIENT, 80));
    let (verdict, _) = f.run_from(A1, &tcp("172.18.0.99", 1000, CLIENT, 80));
    assert_eq!(verdict, TC_ACT_OK);
}

// ---- from_container, uplink_in: internal networks and enable_icc=false ----

impl Fixture {
    /// Network A with other flags (`--internal`, `enable_icc=false`, ...).
    fn set_a_flags(&mut self, flags: u32) {
        self.dp().set_network("172.18.0.0/16".parse().unwrap(), NET_A, ip(GW_A), flags).unwrap();
    }
}

#[test]
fn an_internal_network_keeps_its_own_traffic_and_drops_the_rest_as_internal() {
    let mut f = Fixture::published("internal");
    f.set_a_flags(net_flags::INTERNAL);
    // Within the network, and to its gateway (the host's address on it): as usual.
    f.assert_passes_untouched(FROM_CONTAINER, &tcp(A1, 45000, A2, 80));
    f.assert_passes_untouched(FROM_CONTAINER, &tcp(A1, 45000, GW_A, 53));
    f.assert_passes_untouched(FROM_CONTAINER, &icmp_echo(A1, A2, ICMP_ECHO_REQUEST, 3, 1, b"in"));
    // Out of it: the outside, the host's other addresses and published ports, other networks
    // (even their gateways), untranslatable packets too.
    let mut frag = udp(A1, 45000, CLIENT, 53);
    frag[20] = 0x20; // more fragments
    refresh_ipv4_checksum(&mut frag);
    for pkt in [
        tcp(A1, 45000, CLIENT, 443),
        udp(A2, 45000, CLIENT, 53),
        icmp_echo(A1, CLIENT, ICMP_ECHO_REQUEST, 3, 2, b"out"),
        tcp(A1, 45000, HOST, PUB),
        tcp(A1, 45000, B1, 80),
        tcp(A1, 45000, GW_B, 80),
        frag,
    ] {
        assert_eq!(f.run(FROM_CONTAINER, &pkt).0, TC_ACT_SHOT, "{:?}", ipv4_addrs(&pkt));
    }
    assert_eq!(f.counter("internal"), 7);
    assert_eq!(f.counter("isolation"), 0, "counted as internal, not isolation");
    assert!(f.flows().is_empty(), "nothing tracked, nothing masqueraded: {:#?}", f.flows());
    // Nothing gets in from outside either, whatever a neighbour routes to it.
    for pkt in [tcp(CLIENT, 40000, A1, 80), icmp_echo(CLIENT, A1, ICMP_ECHO_REQUEST, 4, 1, b"in")] {
        assert_eq!(f.run(UPLINK_IN, &pkt).0, TC_ACT_SHOT);
    }
    assert_eq!(f.counter("internal"), 9);
    // Other networks are untouched.
    let (verdict, _) = f.run(UPLINK_OUT, &tcp(B1, 45000, CLIENT, 443));
    assert_eq!(verdict, TC_ACT_OK);
    assert!(!f.flows().is_empty(), "B still masquerades");
}

#[test]
fn internal_drops_are_flow_events_with_their_reason() {
    let mut f = Fixture::new("internal-events");
    f.set_a_flags(net_flags::INTERNAL);
    f.flow_events(true);
    f.events();
    f.run(FROM_CONTAINER, &tcp(A1, 45000, CLIENT, 443));
    let ev = f.events();
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!((ev[0].kind, ev[0].reason), (flow_event::DROP, drop_reason::INTERNAL));
    assert_eq!(ev[0].orig, tuple(A1, 45000, CLIENT, 443, proto::TCP));
}

#[test]
fn without_icc_containers_of_a_network_reach_its_gateway_and_published_ports_only() {
    let mut f = Fixture::published("no-icc");
    f.set_a_flags(net_flags::MASQUERADE | net_flags::NO_ICC);
    // A2 → A1 directly: dropped, counted as isolation (Docker's icc=false is isolation too).
    for pkt in [tcp(A2, 45000, A1, BACK), icmp_echo(A2, A1, ICMP_ECHO_REQUEST, 5, 1, b"x")] {
        assert_eq!(f.run(FROM_CONTAINER, &pkt).0, TC_ACT_SHOT);
    }
    assert_eq!(f.counter("isolation"), 2);
    // Its gateway and the outside: as usual.
    f.assert_passes_untouched(FROM_CONTAINER, &tcp(A2, 45000, GW_A, 22));
    f.assert_passes_untouched(FROM_CONTAINER, &tcp(A2, 45000, CLIENT, 443));
    // A1's published port through a host address: hairpinned to A1, and A1's reply too.
    let (verdict, out) = f.run(FROM_CONTAINER, &tcp(A2, 45001, HOST, PUB));
    assert_eq!((verdict, &out), (TC_ACT_REDIRECT, &to_mac(A1_MAC, tcp(A2, 45001, A1, BACK))));
    let (verdict, out) = f.run(FROM_CONTAINER, &tcp(A1, BACK, A2, 45001));
    assert_eq!((verdict, &out), (TC_ACT_REDIRECT, &to_mac(A2_MAC, tcp(HOST, PUB, A2, 45001))));
    // Through the gateway's address too (it is a host address).
    let (verdict, _) = f.run(FROM_CONTAINER, &tcp(A2, 45002, GW_A, PUB));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(f.counter("isolation"), 2);
}

#[test]
fn a_network_without_masquerade_keeps_its_addresses_going_out() {
    let mut f = Fixture::new("no-masq");
    f.set_a_flags(0); // gateway mode nat, enable_ip_masquerade=false
    let out_pkt = tcp(A1, 45000, CLIENT, 443);
    let (verdict, out) = f.run(UPLINK_OUT, &out_pkt);
    assert_eq!((verdict, out), (TC_ACT_OK, out_pkt), "not masqueraded");
    // Tracked as is, so the reply is a known flow; anything else routed to A stays out.
    let reply = tcp(CLIENT, 443, A1, 45000);
    assert_eq!(f.run(UPLINK_IN, &reply).0, TC_ACT_OK);
    assert_eq!(f.run(UPLINK_IN, &tcp(CLIENT, 40000, A1, 80)).0, TC_ACT_SHOT);
    assert_eq!(f.counter("direct-access"), 1);
}

// ---- from_container: hairpin ----

#[test]
fn hairpin_to_a_published_port_is_dnated_and_redirected_to_the_target() {
    let mut f = Fixture::published("hairpin");
    let (verdict, out) = f.run(FROM_CONTAINER, &tcp(A2, 45000, HOST, PUB));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, to_mac(A1_MAC, tcp(A2, 45000, A1, BACK)), "destination → A1:80 and A1's MAC");
    assert_checksums(&out);

    let fwd = f.flow(tuple(A2, 45000, HOST, PUB, proto::TCP));
    assert_eq!((fwd.xlate, fwd.hook), (tuple(A2, 45000, A1, BACK, proto::TCP), hook::FROM_CONTAINER));
    let rev = f.flow(tuple(A1, BACK, A2, 45000, proto::TCP));
    assert_eq!((rev.xlate, rev.hook, rev.is_reply), (tuple(HOST, PUB, A2, 45000, proto::TCP), hook::FROM_CONTAINER, 1));
}

#[test]
fn hairpin_reply_gets_the_host_address_back_and_is_redirected_to_the_client() {
    let mut f = Fixture::published("hairpin-reply");
    f.run(FROM_CONTAINER, &tcp(A2, 45000, HOST, PUB));
    let (verdict, out) = f.run(FROM_CONTAINER, &tcp(A1, BACK, A2, 45000));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, to_mac(A2_MAC, tcp(HOST, PUB, A2, 45000)));
    assert_checksums(&out);
}

#[test]
fn hairpin_from_another_network_works_both_ways() {
    let mut f = Fixture::published("hairpin-cross");
    let (verdict, out) = f.run(FROM_CONTAINER, &udp(B1, 45000, HOST, PUB));
    assert_eq!((verdict, &out), (TC_ACT_REDIRECT, &to_mac(A1_MAC, udp(B1, 45000, A1, BACK))));
    assert_checksums(&out);
    // A1 → B1 would be isolated, but it is the reply of a flow B1 was allowed to start.
    let (verdict, out) = f.run(FROM_CONTAINER, &udp(A1, BACK, B1, 45000));
    assert_eq!((verdict, &out), (TC_ACT_REDIRECT, &to_mac(B1_MAC, udp(HOST, PUB, B1, 45000))));
    assert_checksums(&out);
    assert_eq!(f.counter("isolation"), 0);
}

#[test]
fn self_hairpin_comes_from_the_network_gateway() {
    let mut f = Fixture::published("hairpin-self");
    let (verdict, out) = f.run(FROM_CONTAINER, &tcp(A1, 45000, HOST, PUB));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, to_mac(A1_MAC, tcp(GW_A, 45000, A1, BACK)), "source → the gateway, destination → A1:80");
    assert_checksums(&out);

    let (verdict, out) = f.run(FROM_CONTAINER, &tcp(A1, BACK, GW_A, 45000));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, to_mac(A1_MAC, tcp(HOST, PUB, A1, 45000)), "the reply looks like it came from HOST:8080");
    assert_checksums(&out);
}

#[test]
fn container_traffic_to_an_unpublished_host_port_passes_unchanged() {
    let mut f = Fixture::published("hairpin-none");
    f.assert_passes_untouched(FROM_CONTAINER, &tcp(A2, 45000, HOST, PUB + 1));
}

// ---- from_container and uplink_in: services (VIP → Maglev backend) ----

/// A service VIP on network A.
const VIP: &str = "172.18.0.100";
const VIP_SLOT: u32 = 7;

impl Fixture {
    /// Points VIP (every port, TCP and UDP) at a Maglev table over `backends` with `flags`,
    /// and HOST:`PUB_SVC`/tcp (every host address) at the same table, to port BACK.
    fn service(&mut self, backends: &[&str], flags: u32) {
        let addrs: Vec<Ipv4Addr> = backends.iter().map(|b| ip(b)).collect();
        let table = if addrs.is_empty() {
            vec![Ipv4Addr::UNSPECIFIED; MAGLEV_M as usize]
        } else {
            netpath::maglev::table(&addrs, MAGLEV_M as usize)
        };
        self.dp().set_maglev(VIP_SLOT, &table).unwrap();
        let info = ServiceInfo { slot: VIP_SLOT, target_port: 0, backends: addrs.len() as u16, flags };
        for p in [proto::TCP, proto::UDP] {
            self.dp().set_service(ip(VIP), 0, p, info).unwrap();
        }
        let published = ServiceInfo { target_port: wire_port(BACK), ..info };
        self.dp().set_service(Ipv4Addr::UNSPECIFIED, PUB_SVC, proto::TCP, published).unwrap();
    }
}

/// A service port published on every host address.
const PUB_SVC: u16 = 9090;

#[test]
fn a_new_flow_to_a_vip_is_dnated_to_its_backend_and_redirected() {
    let mut f = Fixture::new("svc-vip");
    f.service(&[A1], 0);
    let (verdict, out) = f.run(FROM_CONTAINER, &tcp(A2, 45000, VIP, 80));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, to_mac(A1_MAC, tcp(A2, 45000, A1, 80)), "destination → A1:80, A1's MAC, the client's source kept");
    assert_checksums(&out);
    let fwd = f.flow(tuple(A2, 45000, VIP, 80, proto::TCP));
    assert_eq!((fwd.xlate, fwd.hook), (tuple(A2, 45000, A1, 80, proto::TCP), hook::FROM_CONTAINER));
    let rev = f.flow(tuple(A1, 80, A2, 45000, proto::TCP));
    assert_eq!((rev.xlate, rev.hook, rev.is_reply), (tuple(VIP, 80, A2, 45000, proto::TCP), hook::FROM_CONTAINER, 1));
}

/// `pkt` with its TCP flags set to `flags` (conntrack reads them; checksums do not matter here).
fn with_flags(mut pkt: Vec<u8>, flags: u8) -> Vec<u8> {
    pkt[14 + 20 + 13] = flags;
    pkt
}

#[test]
fn a_port_reused_straight_to_the_backend_after_a_closed_vip_flow_gets_untranslated_replies() {
    let mut f = Fixture::new("svc-reuse");
    f.service(&[A1], 0);
    f.run(FROM_CONTAINER, &with_flags(tcp(A2, 45000, VIP, 80), 0x02));
    f.run(FROM_CONTAINER, &with_flags(tcp(A1, 80, A2, 45000), 0x12));
    // While the VIP flow lives, a SYN from the same port to the backend leaves its entries alone.
    f.run(FROM_CONTAINER, &with_flags(tcp(A2, 45000, A1, 80), 0x02));
    assert_eq!(f.flow(tuple(A1, 80, A2, 45000, proto::TCP)).xlate, tuple(VIP, 80, A2, 45000, proto::TCP));
    // The client closes with an RST, then opens a new connection from that port to A1 itself.
    f.run(FROM_CONTAINER, &with_flags(tcp(A2, 45000, VIP, 80), 0x14));
    f.run(FROM_CONTAINER, &with_flags(tcp(A2, 45000, A1, 80), 0x02));
    assert!(f.try_flow(tuple(A1, 80, A2, 45000, proto::TCP)).is_none(), "the closed flow's reply entry went");
    assert!(f.try_flow(tuple(A2, 45000, VIP, 80, proto::TCP)).is_none(), "and its forward entry");
    // So A1's SYN-ACK reaches the client from A1, not from the VIP.
    let synack = with_flags(tcp(A1, 80, A2, 45000), 0x12);
    let (verdict, out) = f.run(FROM_CONTAINER, &synack);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, synack);
}

#[test]
fn a_backends_reply_comes_from_the_vip() {
    let mut f = Fixture::new("svc-reply");
    f.service(&[A1], 0);
    f.run(FROM_CONTAINER, &udp(A2, 45000, VIP, 53));
    let (verdict, out) = f.run(FROM_CONTAINER, &udp(A1, 53, A2, 45000));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, to_mac(A2_MAC, udp(VIP, 53, A2, 45000)));
    assert_checksums(&out);
}

#[test]
fn flows_spread_over_backends_and_stay_on_theirs_when_the_table_changes() {
    let mut f = Fixture::new("svc-spread");
    f.service(&[A1, A2], 0);
    let mut seen: HashMap<Ipv4Addr, usize> = HashMap::new();
    for sport in 40000..40200 {
        let (verdict, out) = f.run_from(B1, &tcp(B1, sport, VIP, 80));
        // B1 is on another network than the VIP: isolated.
        assert_eq!(verdict, TC_ACT_SHOT, "{sport}");
        assert_eq!(out.len(), tcp(B1, sport, VIP, 80).len());
    }
    assert_eq!(f.counter("isolation"), 200);
    // From the gateway's namespace-less sources nothing runs; from A2 (a container of A):
    // spread over A1 and A2 itself (which comes back from the gateway).
    for sport in 40000..40200 {
        let (verdict, out) = f.run_from(A2, &tcp(A2, sport, VIP, 80));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        *seen.entry(ipv4_addrs(&out).1).or_default() += 1;
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen.values().all(|n| *n >= 70), "{seen:?}");
    // Conntrack keeps a flow on its backend when the table changes under it.
    let first = f.flow(tuple(A2, 40000, VIP, 80, proto::TCP)).xlate.daddr;
    let other = if first == wire_addr(ip(A1)) { A2 } else { A1 };
    f.service(&[other], 0);
    let (_, out) = f.run_from(A2, &tcp(A2, 40000, VIP, 80));
    assert_eq!(wire_addr(ipv4_addrs(&out).1), first, "an established flow keeps its backend");
    let (_, out) = f.run_from(A2, &tcp(A2, 50000, VIP, 80));
    assert_eq!(ipv4_addrs(&out).1, ip(other), "a new flow takes the new table");
}

#[test]
fn client_ip_affinity_sends_every_flow_of_a_client_to_one_backend() {
    let mut f = Fixture::new("svc-affinity");
    f.service(&[A1, A2, "172.18.0.4", "172.18.0.5"], netpath_common::svc_flags::AFFINITY_CLIENT_IP);
    let mut seen = std::collections::HashSet::new();
    for sport in 40000..40050 {
        let (_, out) = f.run_from(A2, &tcp(A2, sport, VIP, 80));
        seen.insert(ipv4_addrs(&out).1);
    }
    assert_eq!(seen.len(), 1, "{seen:?}");
}

#[test]
fn a_task_reaching_its_own_service_comes_from_the_gateway() {
    let mut f = Fixture::new("svc-self");
    f.service(&[A1], 0);
    let (verdict, out) = f.run_from(A1, &tcp(A1, 45000, VIP, 80));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, to_mac(A1_MAC, tcp(GW_A, 45000, A1, 80)));
    assert_checksums(&out);
    let (verdict, out) = f.run_from(A1, &tcp(A1, 80, GW_A, 45000));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, to_mac(A1_MAC, tcp(VIP, 80, A1, 45000)));
}

#[test]
fn a_service_without_backends_leaves_the_packet_to_the_host_which_refuses_it() {
    let mut f = Fixture::new("svc-empty");
    f.service(&[], 0);
    f.assert_passes_untouched(FROM_CONTAINER, &tcp(A2, 45000, VIP, 80));
    f.assert_passes_untouched(UPLINK_IN, &tcp(CLIENT, 45000, HOST, PUB_SVC));
}

#[test]
fn malformed_packets_to_a_vip_pass_untranslated() {
    let mut f = Fixture::new("svc-malformed");
    f.service(&[A1], 0);
    let mut short = tcp(A2, 45000, VIP, 80);
    short.truncate(14 + 20 + 10); // half a TCP header
    let mut frag = udp(A2, 45000, VIP, 53);
    frag[20] = 0x20; // more fragments: no ports to balance on
    refresh_ipv4_checksum(&mut frag);
    let mut bad_ihl = tcp(A2, 45000, VIP, 80);
    bad_ihl[14] = 0x44; // header length 16 bytes
    for pkt in [short, frag, bad_ihl] {
        f.assert_passes_untouched(FROM_CONTAINER, &pkt);
    }
    // ICMP to a VIP is the host's to answer (ping works, as with swarm's VIPs).
    f.assert_passes_untouched(FROM_CONTAINER, &icmp_echo(A2, VIP, ICMP_ECHO_REQUEST, 7, 1, b"ping"));
}

#[test]
fn a_published_service_port_is_balanced_from_outside_and_replies_come_from_the_host() {
    let mut f = Fixture::new("svc-published");
    f.service(&[A1], 0);
    let (verdict, out) = f.run(UPLINK_IN, &tcp(CLIENT, 45000, HOST, PUB_SVC));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, tcp(CLIENT, 45000, A1, BACK), "to A1:80, the client's address kept");
    assert_checksums(&out);
    let rev = f.flow(tuple(A1, BACK, CLIENT, 45000, proto::TCP));
    assert_eq!((rev.xlate, rev.hook), (tuple(HOST, PUB_SVC, CLIENT, 45000, proto::TCP), hook::UPLINK_OUT));
    let (verdict, out) = f.run(UPLINK_OUT, &tcp(A1, BACK, CLIENT, 45000));
    assert_eq!((verdict, &out), (TC_ACT_OK, &tcp(HOST, PUB_SVC, CLIENT, 45000)));
    assert_checksums(&out);
    // From outside, the VIP itself is a container-network address: not a service.
    let before = f.flows().len();
    let (verdict, _) = f.run(UPLINK_IN, &tcp(CLIENT, 45001, VIP, 80));
    assert_eq!(verdict, TC_ACT_SHOT, "direct access to network A is closed");
    assert_eq!(f.flows().len(), before);
    // A container reaching the published port through a host address: balanced too.
    let (verdict, out) = f.run_from(A2, &tcp(A2, 45002, GW_A, PUB_SVC));
    assert_eq!((verdict, &out), (TC_ACT_REDIRECT, &to_mac(A1_MAC, tcp(A2, 45002, A1, BACK))));
}

// ---- uplink_xdp on its own: what it finishes, what it leaves to uplink_in ----
// (Its results composed with uplink_in's are checked by every uplink_in case above and below,
// run again by nat_datapath_xdp.rs.)

#[test]
fn uplink_xdp_redirects_new_and_known_published_flows_to_the_containers_veth() {
    let mut f = Fixture::published("xdp-dnat");
    for (pkt, expected) in [
        (tcp(CLIENT, 40000, HOST, PUB), tcp(CLIENT, 40000, A1, BACK)),
        (udp(CLIENT, 5353, HOST, PUB), udp(CLIENT, 5353, A1, BACK)),
    ] {
        for round in ["new flow", "known flow"] {
            let (verdict, out) = f.run_xdp(&for_this_host(pkt.clone()));
            assert_eq!(verdict, XDP_REDIRECT, "{round}");
            assert_eq!(out, one_hop_less(to_mac(A1_MAC, expected.clone())), "{round}: DNAT, TTL - 1, MACs");
            assert_checksums(&out);
        }
    }
    assert_eq!(f.flows().len(), 4, "one flow per protocol, tracked once");
    let fwd = f.flow(tuple(CLIENT, 40000, HOST, PUB, proto::TCP));
    assert_eq!((fwd.hook, fwd.xlate), (hook::UPLINK_IN, tuple(CLIENT, 40000, A1, BACK, proto::TCP)));
    assert_eq!(f.counter("flows-created"), 2);
}

#[test]
fn a_flow_tracked_by_uplink_in_continues_in_uplink_xdp_and_back() {
    let mut f = Fixture::published("xdp-switch");
    let pkt = for_this_host(tcp(CLIENT, 40000, HOST, PUB));
    let expected = one_hop_less(to_mac(A1_MAC, tcp(CLIENT, 40000, A1, BACK)));
    assert_eq!(f.inner.run(UPLINK_IN, &pkt), (TC_ACT_REDIRECT, expected.clone()), "TC alone");
    assert_eq!(f.run_xdp(&pkt), (XDP_REDIRECT, expected.clone()), "XDP on: the same flow");
    assert_eq!(f.inner.run(UPLINK_IN, &pkt), (TC_ACT_REDIRECT, expected), "XDP off again");
    // The reply still leaves with the host's address: one flow, both ways.
    let (_, out) = f.run(UPLINK_OUT, &tcp(A1, BACK, CLIENT, 40000));
    assert_eq!(out, tcp(HOST, PUB, CLIENT, 40000));
    assert_eq!(f.flows().len(), 2);
    assert_eq!(f.counter("flows-created"), 1);
}

#[test]
fn uplink_xdp_drops_direct_access_under_uplink_ins_reason() {
    let mut f = Fixture::published("xdp-direct");
    f.flow_events(true);
    let pkt = for_this_host(tcp(CLIENT, 40000, A1, 80));
    let (verdict, _) = f.run_xdp(&pkt);
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(f.counter("direct-access"), 1);
    let events = f.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        (events[0].kind, events[0].hook, events[0].reason),
        (flow_event::DROP, hook::UPLINK_IN, drop_reason::DIRECT_ACCESS)
    );
    // A fragment to it has no ports but is no more welcome.
    let mut frag = pkt.clone();
    frag[20..22].copy_from_slice(&0x2000u16.to_be_bytes());
    refresh_ipv4_checksum(&mut frag);
    assert_eq!(f.run_xdp(&frag).0, XDP_DROP);
    assert_eq!(f.counter("direct-access"), 2);
    assert!(f.flows().is_empty());
}

#[test]
fn uplink_xdp_passes_to_uplink_in_what_it_does_not_finish() {
    let mut f = Fixture::published("xdp-pass");
    let host = |p: Vec<u8>| for_this_host(p);
    f.assert_xdp_passes(&host(tcp(CLIENT, 40000, HOST, PUB + 1)), "an unpublished host port (the host's own)");
    f.assert_xdp_passes(&host(tcp(CLIENT, 40000, NOT_HOST, PUB)), "another address");
    f.assert_xdp_passes(&tcp(CLIENT, 40001, HOST, PUB), "a frame for another MAC");
    f.assert_xdp_passes(&host(with_ip_options(&tcp(CLIENT, 40002, HOST, PUB), &[1, 1, 1, 0])), "IP options");
    let mut frag = host(udp(CLIENT, 5353, HOST, PUB));
    frag[20..22].copy_from_slice(&0x2000u16.to_be_bytes());
    refresh_ipv4_checksum(&mut frag);
    f.assert_xdp_passes(&frag, "a fragment");
    let mut ttl_1 = host(tcp(CLIENT, 40003, HOST, PUB));
    ttl_1[14 + 8] = 1;
    refresh_ipv4_checksum(&mut ttl_1);
    f.assert_xdp_passes(&ttl_1, "TTL 1 (the stack sends time-exceeded)");
    a1_link_mtu(1000);
    f.assert_xdp_passes(&host(Ipv4Packet::udp(CLIENT, 5354, HOST, PUB, &[7; 1200]).build()), "over the veth's MTU");
    a1_link_mtu(1500);
    f.assert_xdp_passes(&host(icmp_echo(CLIENT, HOST, ICMP_ECHO_REQUEST, 7, 1, b"ping")), "ICMP echo");
    f.run_xdp(&host(tcp(CLIENT, 40004, HOST, PUB)));
    let err = icmp_error(NOT_HOST, HOST, ICMP_DEST_UNREACH, 1, &tcp(HOST, PUB, CLIENT, 40004));
    f.assert_xdp_passes(&host(err), "an ICMP error (its quote is translated too)");
    let mut bad = host(tcp(CLIENT, 40005, HOST, PUB));
    bad[14] = 0x44;
    f.assert_xdp_passes(&bad, "IHL below 5");
    f.assert_xdp_passes(&host(cut_l4(&Ipv4Packet::tcp(CLIENT, 40006, HOST, PUB, b"").build(), 14)), "a cut TCP header");
    f.assert_xdp_passes(&[0u8; 14], "an Ethernet header alone");
    for pkt in [tcp(CLIENT, 40007, HOST, PUB), udp(CLIENT, 5355, HOST, PUB)] {
        f.assert_xdp_passes(&host(partial_checksum(pkt)), "a checksum left to offload (CHECKSUM_PARTIAL)");
    }
    // Without the uplink's MAC it cannot tell frames for the host from others.
    f.dp().set_xdp_uplink(LO, None).unwrap();
    f.assert_xdp_passes(&host(tcp(CLIENT, 40000, HOST, PUB)), "an uplink without its MAC");
}

/// `pkt` as a stack on this machine sends it with checksum offload: the L4 checksum field holds
/// the pseudo-header's sum only.
fn partial_checksum(mut pkt: Vec<u8>) -> Vec<u8> {
    let csum_off = 14 + 20 + if pkt[23] == proto::TCP { 16 } else { 6 };
    let mut ph = pkt[26..34].to_vec();
    ph.extend_from_slice(&[0, pkt[23]]);
    ph.extend_from_slice(&((pkt.len() - 34) as u16).to_be_bytes());
    let partial = !csum(&ph, 0);
    pkt[csum_off..csum_off + 2].copy_from_slice(&partial.to_be_bytes());
    pkt
}

#[test]
fn a_checksum_left_to_offload_is_completed_by_uplink_in_not_uplink_xdp() {
    // uplink_in's helpers know the skb's checksum state (test_run's skbs have none).
    let mut f = Fixture::published("xdp-partial");
    let pkt = for_this_host(partial_checksum(tcp(CLIENT, 40000, HOST, PUB)));
    assert_eq!(f.run_xdp(&pkt), (XDP_PASS, pkt.clone()));
    assert_eq!(f.flows().len(), 2, "the flow is tracked once, by whichever program sees it first");
    let (verdict, _) = f.inner.run(UPLINK_IN, &pkt);
    assert_eq!(verdict, TC_ACT_REDIRECT);
}

// ---- malformed and odd packets toward a published port ----

#[test]
fn ip_fragments_to_a_published_port_pass_unchanged() {
    let mut f = Fixture::published("frag");
    for frags in [0x2000u16, 0x0001, 0x2001] {
        // More fragments; a later fragment (offset 8 bytes); both.
        let mut pkt = udp(CLIENT, 5353, HOST, PUB);
        pkt[20..22].copy_from_slice(&frags.to_be_bytes());
        refresh_ipv4_checksum(&mut pkt);
        f.assert_passes_untouched(UPLINK_IN, &pkt);
    }
}

#[test]
fn ihl_below_five_passes_unchanged() {
    let mut f = Fixture::published("ihl-short");
    let mut pkt = tcp(CLIENT, 40000, HOST, PUB);
    pkt[14] = 0x44;
    f.assert_passes_untouched(UPLINK_IN, &pkt);
}

#[test]
fn ihl_past_the_end_of_the_packet_passes_unchanged() {
    let mut f = Fixture::published("ihl-long");
    let mut pkt = Ipv4Packet::tcp(CLIENT, 40000, HOST, PUB, b"").build(); // 14 + 20 + 20 bytes
    pkt[14] = 0x4f; // a 60-byte header: the TCP header would start past the end
    refresh_ipv4_checksum(&mut pkt);
    f.assert_passes_untouched(UPLINK_IN, &pkt);
}

/// `frame` cut to `l4_len` bytes of L4 header, with the IPv4 total length saying so.
fn cut_l4(frame: &[u8], l4_len: usize) -> Vec<u8> {
    let mut p = frame[..14 + 20 + l4_len].to_vec();
    p[16..18].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
    refresh_ipv4_checksum(&mut p);
    p
}

#[test]
fn tcp_header_cut_short_passes_unchanged() {
    let mut f = Fixture::published("tcp-short");
    let full = Ipv4Packet::tcp(CLIENT, 40000, HOST, PUB, b"").build();
    // Ports only; ports and flags; one byte of the checksum.
    for l4_len in [4, 14, 17] {
        f.assert_passes_untouched(UPLINK_IN, &cut_l4(&full, l4_len));
    }
}

#[test]
fn udp_header_cut_short_passes_unchanged() {
    let mut f = Fixture::published("udp-short");
    let full = udp(CLIENT, 5353, HOST, PUB);
    f.assert_passes_untouched(UPLINK_IN, &cut_l4(&full, 7));
}

#[test]
fn tcp_header_cut_short_inside_ethernet_padding_is_not_translated() {
    // A short frame is padded to Ethernet's 60-byte minimum; the IPv4 total length says
    // where the packet ends. Here it holds 12 bytes of TCP header: the padding after them
    // is not part of the packet (the stack trims it) and must not be read as one.
    let mut f = Fixture::published("tcp-short-pad");
    let mut pkt = cut_l4(&Ipv4Packet::tcp(CLIENT, 40000, HOST, PUB, b"").build(), 12);
    pkt.resize(60, 0);
    f.assert_passes_untouched(UPLINK_IN, &pkt);
}

#[test]
fn udp_header_cut_short_inside_ethernet_padding_is_not_translated() {
    let mut f = Fixture::published("udp-short-pad");
    let mut pkt = cut_l4(&udp(CLIENT, 5353, HOST, PUB), 4);
    pkt.resize(60, 0);
    f.assert_passes_untouched(UPLINK_IN, &pkt);
}

#[test]
fn ethernet_padding_after_a_whole_packet_does_not_prevent_translation() {
    let mut f = Fixture::published("udp-pad");
    let mut pkt = Ipv4Packet::udp(CLIENT, 5353, HOST, PUB, b"").build(); // 42 bytes
    pkt.resize(60, 0);
    let (verdict, out) = f.run(UPLINK_IN, &pkt);
    assert_eq!(verdict, TC_ACT_OK);
    let mut expected = Ipv4Packet::udp(CLIENT, 5353, A1, BACK, b"").build();
    expected.resize(60, 0);
    assert_eq!(out, expected);
    assert_checksums(&out);
}

#[test]
fn ip_options_on_a_published_port_are_translated_correctly() {
    let mut f = Fixture::published("options");
    // Four bytes of options (NOP, NOP, NOP, EOL): the L4 header starts at 14 + 24.
    let opts = [1, 1, 1, 0];
    for (pkt, expected) in [
        (tcp(CLIENT, 40000, HOST, PUB), tcp(CLIENT, 40000, A1, BACK)),
        (udp(CLIENT, 5353, HOST, PUB), udp(CLIENT, 5353, A1, BACK)),
    ] {
        let (verdict, out) = f.run(UPLINK_IN, &with_ip_options(&pkt, &opts));
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(out, with_ip_options(&expected, &opts));
        assert_checksums(&out);
    }
    assert_eq!(f.flows().len(), 4);
}

#[test]
fn ip_options_on_a_masqueraded_flow_are_translated_correctly() {
    let mut f = Fixture::new("options-masq");
    let opts = [1, 1, 1, 0, 1, 1, 1, 0]; // IHL 7
    let (verdict, out) = f.run(UPLINK_OUT, &with_ip_options(&udp(A1, 45000, CLIENT, 53), &opts));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, with_ip_options(&udp(HOST, 45000, CLIENT, 53), &opts));
    assert_checksums(&out);
    assert_eq!(ipv4_addrs(&out).0, ip(HOST));
}

// ---- a full conntrack table ----

/// Publishes HOST:8080 and fills a 4-entry table with two flows: a published one (CLIENT:40000
/// to A1) and a masqueraded one (A1:45000 to CLIENT:443).
fn full_table(tag: &str) -> Fixture {
    let mut f = Fixture::with_ct_size(tag, 4);
    f.dp().set_port(None, PUB, proto::TCP, ip(A1), BACK).unwrap();
    assert_eq!(f.run(UPLINK_IN, &tcp(CLIENT, 40000, HOST, PUB)).0, TC_ACT_OK);
    assert_eq!(f.run(UPLINK_OUT, &tcp(A1, 45000, CLIENT, 443)).0, TC_ACT_OK);
    assert_eq!(f.flows().len(), 4);
    f
}

#[test]
fn a_full_conntrack_table_drops_new_flows_as_ct_full() {
    let mut f = full_table("ct-full");
    // A new published flow, a new masqueraded flow and a new hairpin: each refused, counted.
    let (verdict, _) = f.run(UPLINK_IN, &tcp(CLIENT, 40001, HOST, PUB));
    assert_eq!(verdict, TC_ACT_SHOT);
    let (verdict, _) = f.run(UPLINK_OUT, &udp(A2, 45001, CLIENT, 53));
    assert_eq!(verdict, TC_ACT_SHOT);
    let (verdict, _) = f.run_from(A2, &tcp(A2, 45002, HOST, PUB));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(f.counter("ct-full"), 3);
    assert_eq!(f.counter("ct-insert-failed"), 0, "a full table is not a clash");
    assert_eq!(f.counter("flows-created"), 2);
    assert_eq!(f.flows().len(), 4, "nothing half-made stays behind");
}

#[test]
fn established_flows_keep_working_while_the_table_is_full() {
    let mut f = full_table("ct-full-est");
    assert_eq!(f.run(UPLINK_IN, &tcp(CLIENT, 40001, HOST, PUB)).0, TC_ACT_SHOT);
    // The published flow, both ways.
    let (verdict, out) = f.run(UPLINK_IN, &tcp(CLIENT, 40000, HOST, PUB));
    assert_eq!((verdict, out), (TC_ACT_OK, tcp(CLIENT, 40000, A1, BACK)));
    let (verdict, out) = f.run(UPLINK_OUT, &tcp(A1, BACK, CLIENT, 40000));
    assert_eq!((verdict, out), (TC_ACT_OK, tcp(HOST, PUB, CLIENT, 40000)));
    // The masqueraded flow, both ways.
    let (verdict, out) = f.run(UPLINK_OUT, &tcp(A1, 45000, CLIENT, 443));
    assert_eq!((verdict, out), (TC_ACT_OK, tcp(HOST, 45000, CLIENT, 443)));
    let (verdict, out) = f.run(UPLINK_IN, &tcp(CLIENT, 443, HOST, 45000));
    assert_eq!((verdict, out), (TC_ACT_OK, tcp(CLIENT, 443, A1, 45000)));
    assert_eq!(f.flow(tuple(CLIENT, 443, HOST, 45000, proto::TCP)).state, ct_state::ESTABLISHED);
    assert_eq!(f.counter("ct-full"), 1, "only the new flow was refused");
}

#[test]
fn a_flow_that_fits_only_half_leaves_no_entry_behind() {
    // Five entries: after two flows one is free, enough for the reply entry but not both.
    let mut f = Fixture::with_ct_size("ct-half", 5);
    f.dp().set_port(None, PUB, proto::TCP, ip(A1), BACK).unwrap();
    f.run(UPLINK_IN, &tcp(CLIENT, 40000, HOST, PUB));
    f.run(UPLINK_OUT, &tcp(A1, 45000, CLIENT, 443));
    let (verdict, _) = f.run(UPLINK_IN, &tcp(CLIENT, 40001, HOST, PUB));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(f.counter("ct-full"), 1);
    assert_eq!(f.flows().len(), 4, "the reply entry made first was taken back: {:#?}", f.flows());
}

#[test]
fn room_made_by_the_daemon_lets_new_flows_in_again() {
    let mut f = full_table("ct-full-room");
    assert_eq!(f.run(UPLINK_IN, &tcp(CLIENT, 40001, HOST, PUB)).0, TC_ACT_SHOT);
    // The daemon expires idle flows (and flushes a removed container's).
    assert_eq!(f.dp().expire_flows(u64::MAX).unwrap().len(), 4);
    let (verdict, out) = f.run(UPLINK_IN, &tcp(CLIENT, 40001, HOST, PUB));
    assert_eq!((verdict, out), (TC_ACT_OK, tcp(CLIENT, 40001, A1, BACK)));
}

#[test]
fn table_pressure_is_reported_once_per_check_not_per_packet() {
    let mut f = full_table("ct-full-warn");
    assert!(f.dp().check_pressure().unwrap().is_empty(), "the first check only learns the counters");
    for sport in 40001..40011 {
        f.run(UPLINK_IN, &tcp(CLIENT, sport, HOST, PUB));
    }
    let w = f.dp().check_pressure().unwrap();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("conntrack table full (4 of 4 entries): 10 new flows dropped (ct-full)"), "{w:?}");
    assert!(f.dp().check_pressure().unwrap().is_empty(), "nothing new, nothing said");
}

#[test]
fn a_malformed_packet_toward_a_full_table_is_not_counted_as_a_flow() {
    let mut f = full_table("ct-full-malformed");
    // Truncated TCP header: not translatable, passes untouched, no ct-full.
    let mut pkt = tcp(CLIENT, 40001, HOST, PUB);
    pkt.truncate(14 + 20 + 10);
    let (verdict, out) = f.run(UPLINK_IN, &pkt);
    assert_eq!((verdict, out), (TC_ACT_OK, pkt));
    assert_eq!(f.counter("ct-full"), 0);
}

#[test]
fn exhausted_masquerade_ports_drop_new_flows_and_are_reported_once() {
    let mut f = Fixture::new("ports-exhausted");
    // Every source port masquerade may pick toward CLIENT:443 is taken (its reply tuple is
    // tracked): the kept port 45000 and the whole 32768-60999 range.
    let pin = netpath::datapath::map_pin(f.dp().pin_dir(), "CT");
    let mut m = aya::maps::Map::HashMap(aya::maps::MapData::from_pin(pin).unwrap());
    let mut ct = aya::maps::HashMap::<_, Tuple, CtEntry>::try_from(&mut m).unwrap();
    for port in std::iter::once(45000).chain(32768..=60999) {
        let taken = tuple(CLIENT, 443, HOST, port, proto::TCP);
        ct.insert(taken, CtEntry { xlate: taken, hook: hook::UPLINK_IN, ..Default::default() }, 0).unwrap();
    }
    assert!(f.dp().check_pressure().unwrap().is_empty());
    let (verdict, _) = f.run(UPLINK_OUT, &tcp(A1, 45000, CLIENT, 443));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(f.counter("nat-ports-exhausted"), 1);
    let w = f.dp().check_pressure().unwrap();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("no free source port") && w[0].contains("(nat-ports-exhausted)"), "{w:?}");
    // Another destination still has ports.
    let (verdict, out) = f.run(UPLINK_OUT, &tcp(A1, 45000, CLIENT, 444));
    assert_eq!((verdict, out), (TC_ACT_OK, tcp(HOST, 45000, CLIENT, 444)));
}

// ---- flow events ----

/// `pkt` (TCP, built by `tcp`) with its flags set to `flags`; conntrack does not check the
/// checksum.
fn tcp_flags(mut pkt: Vec<u8>, flags: u8) -> Vec<u8> {
    pkt[14 + 20 + 13] = flags;
    pkt
}
const FIN_ACK: u8 = 0x11;
const RST: u8 = 0x04;

fn event(kind: u8, hook_nr: u8, orig: Tuple, xlate: Tuple) -> (u8, u8, Tuple, Tuple) {
    (kind, hook_nr, orig, xlate)
}

/// What a test compares: kind, hook, and both tuples.
fn what(e: &FlowEvent) -> (u8, u8, Tuple, Tuple) {
    (e.kind, e.hook, e.orig, e.xlate)
}

#[test]
fn with_flow_events_off_nothing_is_written() {
    let mut f = Fixture::published("ev-off");
    f.events();
    f.run(UPLINK_IN, &tcp(CLIENT, 40000, HOST, PUB));
    f.run(UPLINK_IN, &tcp_flags(tcp(CLIENT, 40000, HOST, PUB), FIN_ACK));
    assert_eq!(f.run(FROM_CONTAINER, &tcp(A1, 45000, B1, 80)).0, TC_ACT_SHOT);
    assert_eq!(f.flows().len(), 2, "the datapath worked as usual");
    assert!(f.events().is_empty(), "{:#?}", f.events());
    // Switched on and off again: nothing either.
    f.flow_events(true);
    f.flow_events(false);
    f.run(UPLINK_IN, &tcp(CLIENT, 40001, HOST, PUB));
    assert!(f.events().is_empty());
}

#[test]
fn a_new_published_flow_writes_one_new_event_with_both_tuples() {
    let mut f = Fixture::published("ev-new");
    f.flow_events(true);
    let before = f.events();
    assert!(before.is_empty());
    f.run(UPLINK_IN, &tcp(CLIENT, 40000, HOST, PUB));
    // Later packets of the flow, both ways, are no new flow.
    f.run(UPLINK_IN, &tcp(CLIENT, 40000, HOST, PUB));
    f.run(UPLINK_OUT, &tcp(A1, BACK, CLIENT, 40000));
    let ev = f.events();
    assert_eq!(ev.len(), 1, "{ev:#?}");
    assert_eq!(
        what(&ev[0]),
        event(
            flow_event::NEW,
            hook::UPLINK_IN,
            tuple(CLIENT, 40000, HOST, PUB, proto::TCP),
            tuple(CLIENT, 40000, A1, BACK, proto::TCP)
        )
    );
    assert_eq!((ev[0].ports, ev[0].reason, ev[0].ifindex), (1, 0, 0));
    assert!(ev[0].ts_ns > 0, "stamped with the monotonic clock");
}

#[test]
fn masquerade_and_hairpin_flows_write_new_events_at_their_hook() {
    let mut f = Fixture::published("ev-new-others");
    f.flow_events(true);
    f.run(UPLINK_OUT, &tcp(A1, 45000, CLIENT, 443));
    f.run(FROM_CONTAINER, &tcp(A2, 45001, HOST, PUB));
    let ev: Vec<_> = f.events().iter().map(what).collect();
    assert_eq!(
        ev,
        [
            event(
                flow_event::NEW,
                hook::UPLINK_OUT,
                tuple(A1, 45000, CLIENT, 443, proto::TCP),
                tuple(HOST, 45000, CLIENT, 443, proto::TCP)
            ),
            event(
                flow_event::NEW,
                hook::FROM_CONTAINER,
                tuple(A2, 45001, HOST, PUB, proto::TCP),
                tuple(A2, 45001, A1, BACK, proto::TCP)
            ),
        ]
    );
}

#[test]
fn a_fin_writes_closed_once_per_flow() {
    let mut f = Fixture::published("ev-fin");
    f.flow_events(true);
    let syn = tcp(CLIENT, 40000, HOST, PUB);
    f.run(UPLINK_IN, &syn);
    f.run(UPLINK_OUT, &tcp(A1, BACK, CLIENT, 40000));
    f.events();
    f.run(UPLINK_IN, &tcp_flags(syn.clone(), FIN_ACK));
    let ev = f.events();
    let closed = event(
        flow_event::CLOSED,
        hook::UPLINK_IN,
        tuple(CLIENT, 40000, HOST, PUB, proto::TCP),
        tuple(CLIENT, 40000, A1, BACK, proto::TCP),
    );
    assert_eq!(ev.iter().map(what).collect::<Vec<_>>(), [closed]);
    // The FIN again, the other side's FIN, a RST: the flow was reported already.
    f.run(UPLINK_IN, &tcp_flags(syn.clone(), FIN_ACK));
    f.run(UPLINK_OUT, &tcp_flags(tcp(A1, BACK, CLIENT, 40000), FIN_ACK));
    f.run(UPLINK_IN, &tcp_flags(syn, RST));
    assert!(f.events().is_empty(), "closed only once");
}

#[test]
fn a_flow_the_container_closes_is_reported_in_its_original_direction() {
    let mut f = Fixture::published("ev-fin-reply");
    f.flow_events(true);
    f.run(UPLINK_IN, &tcp(CLIENT, 40000, HOST, PUB));
    f.events();
    // The container resets it: seen on the reply entry, reported as the client's flow.
    f.run(UPLINK_OUT, &tcp_flags(tcp(A1, BACK, CLIENT, 40000), RST));
    let ev: Vec<_> = f.events().iter().map(what).collect();
    assert_eq!(
        ev,
        [event(
            flow_event::CLOSED,
            hook::UPLINK_IN,
            tuple(CLIENT, 40000, HOST, PUB, proto::TCP),
            tuple(CLIENT, 40000, A1, BACK, proto::TCP)
        )]
    );
    f.run(UPLINK_IN, &tcp_flags(tcp(CLIENT, 40000, HOST, PUB), FIN_ACK));
    assert!(f.events().is_empty());
}

#[test]
fn drops_write_the_packets_tuple_and_reason() {
    let mut f = Fixture::published("ev-drop");
    f.flow_events(true);
    assert_eq!(f.run(FROM_CONTAINER, &tcp(A1, 45000, B1, 80)).0, TC_ACT_SHOT);
    assert_eq!(f.run(UPLINK_IN, &udp(CLIENT, 5353, A1, 53)).0, TC_ACT_SHOT);
    assert_eq!(f.run_from(A1, &tcp(B1, 1000, CLIENT, 80)).0, TC_ACT_SHOT);
    let mut frag = udp(A1, 45000, B1, 53);
    frag[20] = 0x20; // more fragments: no ports
    refresh_ipv4_checksum(&mut frag);
    assert_eq!(f.run(FROM_CONTAINER, &frag).0, TC_ACT_SHOT);
    let ev = f.events();
    let got: Vec<_> = ev.iter().map(|e| (e.kind, e.hook, e.orig, e.reason, e.ports)).collect();
    let frag_tuple = Tuple::new(wire_addr(ip(A1)), wire_addr(ip(B1)), 0, 0, proto::UDP);
    assert_eq!(
        got,
        [
            (flow_event::DROP, hook::FROM_CONTAINER, tuple(A1, 45000, B1, 80, proto::TCP), drop_reason::ISOLATION, 1),
            (flow_event::DROP, hook::UPLINK_IN, tuple(CLIENT, 5353, A1, 53, proto::UDP), drop_reason::DIRECT_ACCESS, 1),
            (
                flow_event::DROP,
                hook::FROM_CONTAINER,
                tuple(B1, 1000, CLIENT, 80, proto::TCP),
                drop_reason::SPOOFED_SOURCE,
                1
            ),
            (flow_event::DROP, hook::FROM_CONTAINER, frag_tuple, drop_reason::ISOLATION, 0),
        ]
    );
    // Where it was dropped: A1's veth (the spoofing sender's), not the address's owner.
    let a1 = f.veths[&ip(A1)];
    assert_eq!(ev[2].ifindex, a1);
    assert!(ev.iter().all(|e| e.xlate == Tuple::default()), "no translation on a drop");
    // The counters agree, as before.
    assert_eq!((f.counter("isolation"), f.counter("direct-access"), f.counter("spoofed-source")), (2, 1, 1));
}

#[test]
fn a_full_table_writes_a_ct_full_drop_and_no_new_event() {
    let mut f = Fixture::with_ct_size("ev-full", 2);
    f.dp().set_port(None, PUB, proto::TCP, ip(A1), BACK).unwrap();
    f.flow_events(true);
    f.run(UPLINK_IN, &tcp(CLIENT, 40000, HOST, PUB));
    assert_eq!(f.run(UPLINK_IN, &tcp(CLIENT, 40001, HOST, PUB)).0, TC_ACT_SHOT);
    let ev: Vec<_> = f.events().iter().map(|e| (e.kind, e.orig, e.reason)).collect();
    assert_eq!(
        ev,
        [
            (flow_event::NEW, tuple(CLIENT, 40000, HOST, PUB, proto::TCP), 0),
            (flow_event::DROP, tuple(CLIENT, 40001, HOST, PUB, proto::TCP), drop_reason::CT_FULL),
        ]
    );
}

#[test]
fn malformed_packets_write_nothing() {
    let mut f = Fixture::published("ev-malformed");
    f.flow_events(true);
    let full = Ipv4Packet::tcp(CLIENT, 40000, HOST, PUB, b"").build();
    let mut ihl_short = full.clone();
    ihl_short[14] = 0x44;
    let mut ihl_long = full.clone();
    ihl_long[14] = 0x4f;
    refresh_ipv4_checksum(&mut ihl_long);
    let mut frag = udp(CLIENT, 5353, HOST, PUB);
    frag[20..22].copy_from_slice(&0x2000u16.to_be_bytes());
    refresh_ipv4_checksum(&mut frag);
    let mut padded = cut_l4(&full, 12);
    padded.resize(60, 0);
    let mut not_ip = full.clone();
    not_ip[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    for pkt in [ihl_short, ihl_long, cut_l4(&full, 4), cut_l4(&full, 17), frag, padded, not_ip] {
        for prog in [UPLINK_IN, UPLINK_OUT, FROM_CONTAINER] {
            assert_eq!(f.run(prog, &pkt).0, TC_ACT_OK, "{prog}");
        }
    }
    assert!(f.events().is_empty(), "{:#?}", f.events());
    assert!(f.flows().is_empty());
}
