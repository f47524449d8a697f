//! `test_run` tests of the firewall's decisions on hand-built packets: rules compiled by the
//! daemon's compiler (netpath::firewall) and written into the real tries, then new flows to a
//! published port, a routed container, a hairpin and inside a default-deny network. Checked:
//! the verdict, the `policy-denied` counter, the flow event naming the rule, that a denied
//! flow leaves no conntrack entry, and that malformed packets meet only the rules they can.
//!
//! firewall_datapath_xdp.rs runs these cases again with every uplink_in packet through
//! uplink_xdp first: its early drops must be the same drops, counted and reported the same.
//!
//! Each test runs in its own network namespace with the maps on a private bpffs (see
//! netpath_tests::testrun), so nothing touches the machine.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use netpath::datapath::Datapath;
use netpath::firewall::{Applied, Compiled, Rule, Target};
use netpath_common::prog_names::{FROM_CONTAINER, UPLINK_IN};
use netpath_common::{FlowEvent, MAGLEV_M, ServiceInfo, drop_reason, flow_event, net_flags, policy_rule, proto};
use netpath_tests::packet::{ICMP_ECHO_REQUEST, Ipv4Packet, icmp_echo, refresh_ipv4_checksum};
use netpath_tests::testrun::{LO, PrivateDatapath, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, add_veth};

/// Whether uplink_in's packets go through uplink_xdp first: false here, true in
/// firewall_datapath_xdp.rs, which includes this file as a module.
#[allow(dead_code)]
const XDP_FIRST: bool = false;

const HOST: &str = "198.51.100.1";
/// Clients outside: one in 10.1.0.0/16, one elsewhere in 10.0.0.0/8, one far away.
const NEAR: &str = "10.1.2.3";
const FAR: &str = "10.9.9.9";
const OTHER: &str = "203.0.113.7";

/// Network A (masquerading, id 1): A1 (published 8080 → 80) and A2.
const NET_A: u32 = 1;
const GW_A: &str = "172.18.0.1";
const A1: &str = "172.18.0.2";
const A1_MAC: [u8; 6] = [0x02, 0x42, 0xac, 0x12, 0, 2];
const A2: &str = "172.18.0.3";
const A2_MAC: [u8; 6] = [0x02, 0x42, 0xac, 0x12, 0, 3];
/// Network N (`routed`, id 3): N1, port 80 published.
const NET_N: u32 = 3;
const GW_N: &str = "172.20.0.1";
const N1: &str = "172.20.0.2";

const PUB: u16 = 8080;
const BACK: u16 = 80;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn tcp(src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
    Ipv4Packet::tcp(src, sport, dst, dport, b"GET / HTTP/1.0\r\n\r\n").build()
}

fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
    Ipv4Packet::udp(src, sport, dst, dport, b"a datagram").build()
}

fn gw_mac(gw: &str) -> [u8; 6] {
    let o = ip(gw).octets();
    [0x02, 0x42, o[0], o[1], o[2], o[3]]
}

/// A rule for [`Fixture::rules`]: rank and id are its position (1-based).
struct R {
    allow: bool,
    target: Target,
    src: &'static str,
    proto: Option<u8>,
    ports: Option<(u16, u16)>,
}

fn deny(target: Target, src: &'static str) -> R {
    R { allow: false, target, src, proto: None, ports: None }
}

fn allow(target: Target, src: &'static str) -> R {
    R { allow: true, target, src, proto: None, ports: None }
}

impl R {
    fn proto(mut self, p: u8) -> Self {
        self.proto = Some(p);
        self
    }
    fn ports(mut self, lo: u16, hi: u16) -> Self {
        self.ports = Some((lo, hi));
        self
    }
}

struct Fixture {
    inner: PrivateDatapath,
    veths: HashMap<Ipv4Addr, u32>,
    applied: Applied,
    ring: Option<netpath::datapath::FlowEventRing>,
}

impl Fixture {
    fn new(tag: &str) -> Self {
        let inner = PrivateDatapath::new(&format!("fw-{tag}"));
        let mut f = Fixture { inner, veths: HashMap::new(), applied: Applied::default(), ring: None };
        let dp = f.dp();
        dp.set_network(net("172.18.0.0/16"), NET_A, ip(GW_A), net_flags::MASQUERADE).unwrap();
        dp.set_network(net("172.20.0.0/16"), NET_N, ip(GW_N), net_flags::DIRECT_PUBLISHED).unwrap();
        for (name, addr, id, mac, gw) in [
            ("a1", A1, NET_A, A1_MAC, GW_A),
            ("a2", A2, NET_A, A2_MAC, GW_A),
            ("n1", N1, NET_N, [0x02, 0x42, 0xac, 0x14, 0, 2], GW_N),
        ] {
            let ifindex = add_veth(name, 1500);
            f.dp().set_endpoint(ip(addr), ifindex, id, mac, gw_mac(gw)).unwrap();
            f.dp().set_xdp_port(ifindex, true).unwrap();
            f.veths.insert(ip(addr), ifindex);
        }
        let dp = f.dp();
        dp.sync_host_addrs(&[ip(HOST), ip(GW_A), ip(GW_N)]).unwrap();
        dp.set_uplink_addr(LO, Some(ip(HOST))).unwrap();
        dp.set_xdp_uplink(LO, Some([0; 6])).unwrap();
        dp.set_port(None, PUB, proto::TCP, ip(A1), BACK).unwrap();
        dp.set_port(None, PUB, proto::UDP, ip(A1), BACK).unwrap();
        dp.set_published(ip(N1), BACK, proto::TCP).unwrap();
        dp.set_flow_events(true).unwrap();
        f
    }

    fn dp(&mut self) -> &mut Datapath {
        self.inner.dp()
    }

    /// Compiles `rules` (rank and id: their position, from 1) and makes the tries hold them.
    fn rules(&mut self, rules: Vec<R>) {
        let rules: Vec<Rule> = rules
            .into_iter()
            .enumerate()
            .map(|(i, r)| Rule {
                rank: i as u32 + 1,
                id: i as u32 + 1,
                allow: r.allow,
                target: r.target,
                src: net(r.src),
                proto: r.proto,
                ports: r.ports,
            })
            .collect();
        let plan = self.applied.plan(&Compiled::compile(&rules));
        self.inner.dp().apply_policy(&plan).unwrap();
        self.applied.done(&plan);
    }

    fn run(&mut self, prog: &str, pkt: &[u8]) -> u32 {
        if prog == UPLINK_IN && crate::XDP_FIRST {
            return self.inner.run_uplink_with_xdp(pkt).0;
        }
        self.inner.run(prog, pkt).0
    }

    fn run_from(&mut self, from: &str, pkt: &[u8]) -> u32 {
        let veth = self.veths[&ip(from)];
        self.inner.run_on(Some(veth), FROM_CONTAINER, pkt).0
    }

    fn denied_count(&mut self) -> u64 {
        self.dp().counters().unwrap().drops["policy-denied"]
    }

    fn events(&mut self) -> Vec<FlowEvent> {
        if self.ring.is_none() {
            self.ring = Some(self.dp().flow_events().unwrap());
        }
        self.ring.as_mut().unwrap().drain_all()
    }

    /// The rule of the one policy-denied drop event since the last look.
    fn denying_rule(&mut self) -> u32 {
        let drops: Vec<FlowEvent> = self.events().into_iter().filter(|e| e.kind == flow_event::DROP).collect();
        assert_eq!(drops.len(), 1, "{drops:?}");
        assert_eq!(drops[0].reason, drop_reason::POLICY_DENIED);
        drops[0].rule
    }

    fn flow_count(&mut self) -> usize {
        self.dp().flows().unwrap().len()
    }
}

fn a1() -> Target {
    Target::container(ip(A1))
}

#[test]
fn with_no_rule_every_new_flow_passes_as_with_docker() {
    let mut f = Fixture::new("default");
    assert_eq!(f.run(UPLINK_IN, &tcp(OTHER, 40000, HOST, PUB)), TC_ACT_OK);
    assert_eq!(f.flow_count(), 2);
    assert_eq!(f.denied_count(), 0);
}

#[test]
fn a_published_port_admits_clients_by_source_prefix() {
    let mut f = Fixture::new("prefix");
    // DOCKER-USER's classic: only 10.1.0.0/16 may reach the published port.
    f.rules(vec![allow(Target::ANY, "10.1.0.0/16"), deny(Target::ANY, "0.0.0.0/0")]);
    assert_eq!(f.run(UPLINK_IN, &tcp(NEAR, 40000, HOST, PUB)), TC_ACT_OK);
    assert_eq!(f.flow_count(), 2, "the allowed flow is tracked");
    assert_eq!(f.run(UPLINK_IN, &tcp(FAR, 40000, HOST, PUB)), TC_ACT_SHOT);
    assert_eq!(f.flow_count(), 2, "a denied flow leaves no entry");
    assert_eq!(f.denied_count(), 1);
    f.events(); // the flows so far: the next drop is read on its own
    assert_eq!(f.run(UPLINK_IN, &udp(OTHER, 5353, HOST, PUB)), TC_ACT_SHOT);
    assert_eq!(f.denying_rule(), 2, "the flow event names the rule");
    // The allowed client's later packets are a known flow: no rule is looked at again.
    assert_eq!(f.run(UPLINK_IN, &tcp(NEAR, 40000, HOST, PUB)), TC_ACT_OK);
}

#[test]
fn priority_decides_not_prefix_length() {
    let mut f = Fixture::new("priority");
    f.rules(vec![deny(Target::ANY, "10.0.0.0/8"), allow(a1(), "10.1.2.3/32")]);
    assert_eq!(f.run(UPLINK_IN, &tcp(NEAR, 40000, HOST, PUB)), TC_ACT_SHOT, "the broad deny ranks first");
    assert_eq!(f.denying_rule(), 1);
    f.rules(vec![allow(a1(), "10.1.2.3/32"), deny(Target::ANY, "10.0.0.0/8")]);
    assert_eq!(f.run(UPLINK_IN, &tcp(NEAR, 40001, HOST, PUB)), TC_ACT_OK, "now the allow does");
    assert_eq!(f.run(UPLINK_IN, &tcp(FAR, 40001, HOST, PUB)), TC_ACT_SHOT);
    assert_eq!(f.denying_rule(), 2, "renumbered: the deny is the second rule now");
}

#[test]
fn ports_are_the_containers_and_ranges_and_protocols_match_exactly() {
    let mut f = Fixture::new("ports");
    // The published port is 8080; the container's is 80, which is what rules see.
    f.rules(vec![deny(a1(), "0.0.0.0/0").proto(proto::TCP).ports(8000, 8100)]);
    assert_eq!(f.run(UPLINK_IN, &tcp(OTHER, 40000, HOST, PUB)), TC_ACT_OK);
    f.rules(vec![deny(a1(), "0.0.0.0/0").proto(proto::TCP).ports(70, 90)]);
    assert_eq!(f.run(UPLINK_IN, &tcp(OTHER, 40001, HOST, PUB)), TC_ACT_SHOT);
    assert_eq!(f.run(UPLINK_IN, &udp(OTHER, 40001, HOST, PUB)), TC_ACT_OK, "TCP only");
    f.rules(vec![deny(a1(), "0.0.0.0/0").ports(81, 90)]);
    assert_eq!(f.run(UPLINK_IN, &tcp(OTHER, 40002, HOST, PUB)), TC_ACT_OK, "80 is outside 81-90");
    f.rules(vec![deny(a1(), "0.0.0.0/0").ports(79, 80)]);
    assert_eq!(f.run(UPLINK_IN, &udp(OTHER, 40003, HOST, PUB)), TC_ACT_SHOT, "no protocol: TCP and UDP");
    // ICMP meets ICMP rules and rules without protocol, never port rules.
    let ping = |id| icmp_echo(OTHER, N1, ICMP_ECHO_REQUEST, id, 1, b"ping");
    assert_eq!(f.run(UPLINK_IN, &ping(7)), TC_ACT_OK);
    f.rules(vec![deny(Target::container(ip(N1)), "0.0.0.0/0").proto(proto::ICMP)]);
    assert_eq!(f.run(UPLINK_IN, &ping(8)), TC_ACT_SHOT);
    assert_eq!(f.run(UPLINK_IN, &tcp(OTHER, 40004, N1, BACK)), TC_ACT_OK, "TCP to the routed port is not ICMP");
}

#[test]
fn rules_name_a_container_a_network_or_every_container() {
    let mut f = Fixture::new("targets");
    f.rules(vec![deny(Target::network(NET_N), "0.0.0.0/0")]);
    assert_eq!(f.run(UPLINK_IN, &tcp(OTHER, 40000, N1, BACK)), TC_ACT_SHOT, "routed access to network N");
    assert_eq!(f.run(UPLINK_IN, &tcp(OTHER, 40000, HOST, PUB)), TC_ACT_OK, "A1 is on network A");
    f.rules(vec![deny(Target::container(ip(A2)), "0.0.0.0/0")]);
    assert_eq!(f.run(UPLINK_IN, &tcp(OTHER, 40001, HOST, PUB)), TC_ACT_OK, "the rule names A2, not A1");
}

#[test]
fn malformed_and_portless_packets_meet_only_rules_without_ports() {
    let mut f = Fixture::new("malformed");
    f.rules(vec![deny(Target::ANY, "0.0.0.0/0").proto(proto::TCP).ports(80, 80)]);
    // Network A as `nat-unprotected`: routed packets reach A1 whatever they are.
    let flags = net_flags::MASQUERADE | net_flags::DIRECT_ANY;
    f.dp().set_network(net("172.18.0.0/16"), NET_A, ip(GW_A), flags).unwrap();
    // A fragment routed to A1: no ports, so the port rule cannot match it.
    let mut frag = tcp(OTHER, 40000, A1, BACK);
    frag[20] = 0x20; // more fragments
    refresh_ipv4_checksum(&mut frag);
    assert_eq!(f.run(UPLINK_IN, &frag), TC_ACT_OK);
    f.rules(vec![deny(Target::ANY, "203.0.113.0/24")]);
    assert_eq!(f.run(UPLINK_IN, &frag), TC_ACT_SHOT, "a rule without ports covers it");
    assert_eq!(f.denying_rule(), 1);
    // Half a TCP header to the published port: untranslatable, to a host address: the
    // firewall guards containers, and the stack drops it.
    let mut short = tcp(OTHER, 40000, HOST, PUB);
    short.truncate(14 + 20 + 10);
    assert_eq!(f.run(UPLINK_IN, &short), TC_ACT_OK);
    assert_eq!(f.flow_count(), 0);
    // Not IPv4 at all, and an IPv4 header claiming less than 20 bytes: untouched.
    let mut arp = tcp(OTHER, 40000, HOST, PUB);
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    assert_eq!(f.run(UPLINK_IN, &arp), TC_ACT_OK);
    let mut bad_ihl = tcp(OTHER, 40000, A1, BACK);
    bad_ihl[14] = 0x44;
    assert_eq!(f.run(UPLINK_IN, &bad_ihl), TC_ACT_OK);
    assert_eq!(f.denied_count(), 1);
}

#[test]
fn a_published_service_port_meets_the_rules_on_the_backend_it_picks() {
    let mut f = Fixture::new("service");
    // Service port 8081 on every host address, balanced over A1:80 alone.
    f.dp().set_maglev(0, &[ip(A1); MAGLEV_M as usize]).unwrap();
    let info = ServiceInfo { slot: 0, target_port: 80u16.to_be(), backends: 1, flags: 0 };
    f.dp().set_service(Ipv4Addr::UNSPECIFIED, 8081, proto::TCP, info).unwrap();
    f.rules(vec![deny(a1(), "203.0.113.0/24").proto(proto::TCP).ports(80, 80)]);
    assert_eq!(f.run(UPLINK_IN, &tcp(NEAR, 40000, HOST, 8081)), TC_ACT_OK);
    assert_eq!(f.flow_count(), 2);
    f.events();
    assert_eq!(f.run(UPLINK_IN, &tcp(OTHER, 40000, HOST, 8081)), TC_ACT_SHOT);
    assert_eq!(f.denying_rule(), 1);
    assert_eq!(f.flow_count(), 2, "the denied flow's entries are gone again");
}

#[test]
fn a_hairpin_to_a_published_port_meets_the_rules() {
    let mut f = Fixture::new("hairpin");
    f.rules(vec![deny(a1(), "172.18.0.3/32").proto(proto::TCP)]);
    assert_eq!(f.run_from(A2, &tcp(A2, 45000, HOST, PUB)), TC_ACT_SHOT);
    assert_eq!(f.denying_rule(), 1);
    assert_eq!(f.flow_count(), 0);
}

#[test]
fn inside_a_network_only_rules_naming_the_container_apply() {
    let mut f = Fixture::new("inside");
    // A broad rule does not touch traffic inside a network (Docker's bridge traffic)...
    f.rules(vec![deny(Target::ANY, "0.0.0.0/0")]);
    assert_eq!(f.run_from(A2, &tcp(A2, 45000, A1, BACK)), TC_ACT_OK);
    // ...one naming the container does, once its network is marked as guarded.
    f.rules(vec![deny(a1(), "172.18.0.3/32")]);
    let flags = net_flags::MASQUERADE | net_flags::POLICED;
    f.dp().set_network(net("172.18.0.0/16"), NET_A, ip(GW_A), flags).unwrap();
    assert_eq!(f.run_from(A2, &tcp(A2, 45001, A1, BACK)), TC_ACT_SHOT);
    assert_eq!(f.denying_rule(), 1);
    // A1's own flow to A2 is allowed and tracked, so A2's reply is not taken for a new flow.
    assert_eq!(f.run_from(A1, &tcp(A1, 46000, A2, BACK)), TC_ACT_OK);
    assert_eq!(f.flow_count(), 2);
    assert_eq!(f.run_from(A2, &tcp(A2, BACK, A1, 46000)), TC_ACT_REDIRECT, "the reply, to A1's veth");
}

#[test]
fn a_default_deny_network_needs_an_explicit_allow() {
    let mut f = Fixture::new("default-deny");
    let flags = net_flags::MASQUERADE | net_flags::DEFAULT_DENY;
    f.dp().set_network(net("172.18.0.0/16"), NET_A, ip(GW_A), flags).unwrap();
    assert_eq!(f.run_from(A2, &tcp(A2, 45000, A1, BACK)), TC_ACT_SHOT);
    assert_eq!(f.denying_rule(), policy_rule::NETWORK_DEFAULT_DENY | NET_A);
    f.rules(vec![allow(Target::network(NET_A), "172.18.0.3/32").proto(proto::TCP).ports(80, 80)]);
    assert_eq!(f.run_from(A2, &tcp(A2, 45001, A1, BACK)), TC_ACT_OK);
    assert_eq!(f.run_from(A2, &tcp(A2, 45002, A1, 81)), TC_ACT_SHOT, "only port 80 is allowed");
    assert_eq!(f.run_from(A1, &tcp(A1, 45003, A2, BACK)), TC_ACT_SHOT, "and only from A2");
    // The gateway (the host's address on the network) is not a container: open.
    assert_eq!(f.run_from(A2, &tcp(A2, 45004, GW_A, 53)), TC_ACT_OK);
    // From outside the default stays allow.
    assert_eq!(f.run(UPLINK_IN, &tcp(OTHER, 40000, HOST, PUB)), TC_ACT_OK);
}

#[test]
fn keep_host_firewall_leaves_known_flows_to_the_kernels_forwarding() {
    let mut f = Fixture::new("keep-host-fw");
    let mut pkt = tcp(OTHER, 40000, HOST, PUB);
    pkt[..6].copy_from_slice(&[0; 6]); // to this host's MAC (lo's)
    assert_eq!(f.run(UPLINK_IN, &pkt), TC_ACT_REDIRECT, "the fast path, by default");
    f.dp().set_keep_host_firewall(true).unwrap();
    let (verdict, out) = f.inner.run(UPLINK_IN, &pkt);
    assert_eq!(verdict, TC_ACT_OK, "through the stack, so FORWARD sees it");
    let mut want = tcp(OTHER, 40000, A1, BACK);
    want[..6].copy_from_slice(&[0; 6]);
    assert_eq!(out, want, "translated already (as DOCKER-USER sees it), TTL untouched");
}
