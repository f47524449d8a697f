//! The NAT engine end to end: published ports (TCP, UDP), masquerade, hairpin, isolation.
//! The client namespace doubles as "the outside": it sits behind the host's uplink eth0.
//! nat_xdp.rs runs every one of these tests again with XDP on the uplink (`--xdp native`).

mod common;

use netpath_common::NetworkInfo;
use netpath_tests::{CLIENT_IP, HOST_ETH0_IP, Lab, in_ns, must};

/// `netpath daemon` flags of every lab here: none; nat_xdp.rs, which includes this file as a
/// module, has its own.
#[allow(dead_code)]
const DAEMON_ARGS: &[&str] = &[];

/// A lab whose daemon runs with this crate's DAEMON_ARGS. With XDP, the client sends full
/// checksums, so that uplink_xdp handles its traffic rather than passing it all to TC.
fn lab(tag: &str) -> Lab {
    let lab = Lab::with_daemon_args(tag, crate::DAEMON_ARGS);
    if !crate::DAEMON_ARGS.is_empty() {
        lab.client_sends_full_checksums();
    }
    lab
}

/// A TCP server in the client namespace answering with the peer address it sees.
fn outside_whoami(lab: &Lab, port: u16) -> std::process::Child {
    let c =
        in_ns(&lab.client_ns, "socat", &[&format!("TCP-LISTEN:{port},fork,reuseaddr"), "SYSTEM:echo $SOCAT_PEERADDR"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
    for _ in 0..100 {
        let out = must(in_ns(&lab.client_ns, "ss", &["-Hltn", &format!("sport = :{port}")]));
        if !out.trim().is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(30));
    }
    c
}

fn tcp_from_client(lab: &Lab, ip: &str, port: u16) -> String {
    must(in_ns(&lab.client_ns, "sh", &["-c", &format!("socat -t 10 - TCP:{ip}:{port},connect-timeout=5 </dev/null")]))
        .trim()
        .to_string()
}

#[test]
fn published_tcp_port_keeps_the_client_address() {
    let lab = lab("pubtcp");
    common::whoami_server_with(&lab, "web", &["-p", "8080:8"]);
    assert_eq!(tcp_from_client(&lab, HOST_ETH0_IP, 8080), CLIENT_IP);
    assert_eq!(lab.np(&["port", "web"]).trim(), "8/tcp -> 0.0.0.0:8080");
}

#[test]
fn masquerade_outbound_traffic_leaves_with_the_host_address() {
    let lab = lab("masq");
    let mut srv = outside_whoami(&lab, 9000);
    lab.np(&["run", "-d", "--name", "c", "--", "sleep", "600"]);
    let seen = lab.np(&[
        "exec",
        "c",
        "--",
        "sh",
        "-c",
        &format!("socat -t 10 - TCP:{CLIENT_IP}:9000,connect-timeout=5 </dev/null"),
    ]);
    let _ = srv.kill();
    let _ = srv.wait();
    assert_eq!(seen.trim(), HOST_ETH0_IP);
}

#[test]
fn a_detached_command_starts_wired_its_first_connection_is_masqueraded() {
    // The daemon finishes attaching the datapath while the process is being started: the
    // command itself must not run before that, or its first packets would leave unfiltered.
    let lab = Lab::new("masqfirst");
    let mut srv = outside_whoami(&lab, 9001);
    let connect = format!("socat -t 10 - TCP:{CLIENT_IP}:9001,connect-timeout=5 </dev/null");
    lab.np(&["run", "-d", "--name", "c", "--", "sh", "-c", &connect]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let seen = loop {
        let logs = lab.np(&["logs", "c"]);
        if !logs.trim().is_empty() || std::time::Instant::now() > deadline {
            break logs;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let _ = srv.kill();
    let _ = srv.wait();
    assert_eq!(seen.trim(), HOST_ETH0_IP, "the command's first connection, as the outside saw it");
}

const GATEWAY_MODE: &str = "com.docker.network.bridge.gateway_mode_ipv4";

/// TCP from the client namespace that must not get through: the connection fails.
fn tcp_refused_from_client(lab: &Lab, ip: &str, port: u16) -> bool {
    let cmd = format!("socat -t 2 - TCP:{ip}:{port},connect-timeout=2 </dev/null");
    !in_ns(&lab.client_ns, "sh", &["-c", &cmd]).output().unwrap().status.success()
}

fn drops(lab: &Lab, reason: &str) -> u64 {
    let counters: serde_json::Value = serde_json::from_str(&lab.np(&["system", "datapath"])).unwrap();
    counters["drops"][reason].as_u64().unwrap()
}

#[test]
fn outside_hosts_routing_to_a_nat_network_reach_published_host_ports_only() {
    // Docker's default gateway mode: a neighbour that routes the bridge subnet through the
    // host reaches no container port by the container's address, published or not.
    let lab = lab("routednat");
    common::whoami_server_with(&lab, "web", &["-p", "8080:8"]);
    must(in_ns(&lab.client_ns, "ip", &["route", "add", "172.17.0.0/16", "via", HOST_ETH0_IP]));
    let ip = lab.ip_of("web", "bridge");
    assert!(tcp_refused_from_client(&lab, &ip, 8));
    assert!(drops(&lab, "direct-access") >= 1);
    assert_eq!(tcp_from_client(&lab, HOST_ETH0_IP, 8080), CLIENT_IP);
    let opts = &lab.inspect_network("bridge")["Options"];
    assert_eq!(opts[GATEWAY_MODE], "nat", "{opts}");
}

#[test]
fn a_neighbour_routing_to_an_unprotected_network_is_answered_from_the_container_address() {
    // nat-unprotected: every container port is reachable by direct routing, and the
    // container's replies keep its own address (they are not masqueraded as a new flow).
    let lab = lab("routedin");
    lab.np(&[
        "network",
        "create",
        "--subnet",
        "10.77.0.0/24",
        "-o",
        &format!("{GATEWAY_MODE}=nat-unprotected"),
        "open",
    ]);
    common::whoami_server_with(&lab, "web", &["--network", "open"]);
    must(in_ns(&lab.client_ns, "ip", &["route", "add", "10.77.0.0/24", "via", HOST_ETH0_IP]));
    let ip = lab.ip_of("web", "open");
    assert_eq!(tcp_from_client(&lab, &ip, 8), CLIENT_IP);
}

#[test]
fn a_routed_network_is_not_masqueraded_and_opens_published_container_ports() {
    let lab = lab("routedmode");
    lab.np(&["network", "create", "--subnet", "10.78.0.0/24", "-o", &format!("{GATEWAY_MODE}=routed"), "flat"]);
    common::whoami_server_with(&lab, "web", &["--network", "flat", "-p", "8080:8"]);
    lab.np(&[
        "run",
        "-d",
        "--name",
        "other",
        "--network",
        "flat",
        "--",
        "socat",
        "TCP-LISTEN:9,fork,reuseaddr",
        "SYSTEM:echo no",
    ]);
    common::wait_listening(&lab, "other", 9);
    must(in_ns(&lab.client_ns, "ip", &["route", "add", "10.78.0.0/24", "via", HOST_ETH0_IP]));
    let web = lab.ip_of("web", "flat");
    // The published container port, by the container's address: the client's address is kept.
    assert_eq!(tcp_from_client(&lab, &web, 8), CLIENT_IP);
    // A port nobody published is closed to direct routing.
    assert!(tcp_refused_from_client(&lab, &lab.ip_of("other", "flat"), 9));
    // As with Docker, routed mode maps no host port.
    assert!(tcp_refused_from_client(&lab, HOST_ETH0_IP, 8080));
    // Containers of other networks reach the published container port directly, not others.
    lab.np(&["run", "-d", "--name", "neighbour", "--", "sleep", "600"]);
    assert_eq!(common::whoami(&lab, "neighbour", &web), lab.ip_of("neighbour", "bridge"));
    let other = lab.ip_of("other", "flat");
    let probe = format!("socat -t 2 - TCP:{other}:9,connect-timeout=2 </dev/null");
    assert!(!lab.try_np(&["exec", "neighbour", "--", "sh", "-c", &probe]).status.success());
    // Outbound: the outside sees the container's own address, and its replies get back in.
    let mut srv = outside_whoami(&lab, 9000);
    let cmd = format!("socat -t 10 - TCP:{CLIENT_IP}:9000,connect-timeout=5 </dev/null");
    let seen = lab.np(&["exec", "other", "--", "sh", "-c", &cmd]);
    let _ = srv.kill();
    let _ = srv.wait();
    assert_eq!(seen.trim(), lab.ip_of("other", "flat"));
}

/// A UDP server in a container answering each datagram with the sender's address.
fn udp_whoami(lab: &Lab, name: &str, publish: &str) {
    lab.np(&[
        "run",
        "-d",
        "--name",
        name,
        "-p",
        publish,
        "--",
        "socat",
        "UDP-RECVFROM:5353,fork",
        "SYSTEM:echo $SOCAT_PEERADDR",
    ]);
    wait_listening_udp(lab, name, 5353);
}

/// Asks a UDP server from a connected socket bound to `sport` (0: any), resending once a
/// second for up to 10 s (a loaded machine can take a while to fork the toy server), and
/// returns the first answer or "" if none came.
const UDP_ASK: &str = "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('',int(sys.argv[3])))\ns.connect((sys.argv[1],int(sys.argv[2])))\ns.settimeout(1)\nfor _ in range(10):\n  s.send(b'hi')\n  try:\n    print(s.recv(100).decode().strip()); break\n  except socket.timeout: pass";

fn udp_from_client(lab: &Lab, port: u16, sport: u16) -> String {
    must(in_ns(&lab.client_ns, "python3", &["-c", UDP_ASK, HOST_ETH0_IP, &port.to_string(), &sport.to_string()]))
        .trim()
        .to_string()
}

#[test]
fn published_udp_port_keeps_the_client_address() {
    let lab = lab("pubudp");
    udp_whoami(&lab, "dns", "5353:5353/udp");
    assert_eq!(udp_from_client(&lab, 5353, 40001), CLIENT_IP);
}

#[test]
fn udp_client_reaches_a_recreated_container_with_a_new_address() {
    let lab = lab("udprecreate");
    udp_whoami(&lab, "dns", "5353:5353/udp");
    let first_ip = lab.ip_of("dns", "bridge");
    // The same client socket (fixed source port) before and after the re-create.
    assert_eq!(udp_from_client(&lab, 5353, 40002), CLIENT_IP);
    lab.np(&["rm", "-f", "dns"]);
    // Take the old address so the new container gets a different one.
    lab.np(&["run", "-d", "--name", "squatter", "--ip", &first_ip, "--", "sleep", "600"]);
    udp_whoami(&lab, "dns", "5353:5353/udp");
    assert_ne!(lab.ip_of("dns", "bridge"), first_ip);
    assert_eq!(udp_from_client(&lab, 5353, 40002), CLIENT_IP, "stale NAT state kept the old container");
}

#[test]
fn hairpin_reaches_published_ports_from_containers() {
    let lab = lab("hairpin");
    common::whoami_server_with(&lab, "web", &["-p", "8080:8"]);
    lab.np(&["run", "-d", "--name", "other", "--", "sleep", "600"]);
    let ask = |from: &str| {
        lab.np(&[
            "exec",
            from,
            "--",
            "sh",
            "-c",
            &format!("socat -t 10 - TCP:{HOST_ETH0_IP}:8080,connect-timeout=5 </dev/null"),
        ])
        .trim()
        .to_string()
    };
    // Another container: the server sees that container's own address.
    assert_eq!(ask("other"), lab.ip_of("other", "bridge"));
    // The container itself: the source becomes its gateway, so the reply returns through the host.
    assert_eq!(ask("web"), "172.17.0.1");
    // A container on another network reaches the published port too (not isolation).
    lab.np(&["network", "create", "far"]);
    lab.np(&["run", "-d", "--name", "faraway", "--network", "far", "--", "sleep", "600"]);
    assert_eq!(ask("faraway"), lab.ip_of("faraway", "far"));
}

fn reachable(lab: &Lab, from: &str, ip: &str) -> bool {
    lab.try_np(&["exec", from, "--", "ping", "-c", "1", "-W", "1", ip]).status.success()
}

/// Networks n1 and n2 with one idle container each: a on n1, b on n2.
fn two_networks(lab: &Lab) {
    lab.np(&["network", "create", "n1"]);
    lab.np(&["network", "create", "n2"]);
    lab.np(&["run", "-d", "--name", "a", "--network", "n1", "--", "sleep", "600"]);
    lab.np(&["run", "-d", "--name", "b", "--network", "n2", "--", "sleep", "600"]);
}

/// Waits (bounded) until UDP `port` is bound inside `container`.
fn wait_listening_udp(lab: &Lab, container: &str, port: u16) {
    let filter = format!("sport = :{port}");
    for _ in 0..100 {
        if !lab.np(&["exec", container, "--", "ss", "-Hlun", &filter]).trim().is_empty() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(30));
    }
    panic!("{container} never listened on udp {port}");
}

#[test]
fn networks_are_isolated_both_ways_and_counted() {
    let lab = lab("isolation");
    two_networks(&lab);
    lab.np(&["run", "-d", "--name", "both", "--network", "n1", "--", "sleep", "600"]);
    lab.np(&["network", "connect", "n2", "both"]);
    let (a, b) = (lab.ip_of("a", "n1"), lab.ip_of("b", "n2"));
    assert!(!reachable(&lab, "a", &b), "n1 reached n2");
    assert!(!reachable(&lab, "b", &a), "n2 reached n1");
    assert!(reachable(&lab, "both", &a) && reachable(&lab, "both", &b), "a container on both reaches both");
    // The host's address on the other network stays reachable, as in Docker.
    let gw2 = lab.inspect_network("n2")["IPAM"]["Config"][0]["Gateway"].as_str().unwrap().to_string();
    assert!(reachable(&lab, "a", &gw2));
    let counters: serde_json::Value = serde_json::from_str(&lab.np(&["system", "datapath"])).unwrap();
    assert!(counters["drops"]["isolation"].as_u64().unwrap() >= 2, "{counters}");
}

/// Sends one UDP datagram with a forged source address through a raw socket (IP_HDRINCL):
/// argv: source, destination, port. The kernel fills in the header checksum and length.
const SEND_FORGED: &str = "import socket,struct,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_RAW)\nsrc,dst,port=socket.inet_aton(sys.argv[1]),socket.inet_aton(sys.argv[2]),int(sys.argv[3])\nudp=struct.pack('!HHHH',4000,port,8+5,0)+b'hello'\nip=struct.pack('!BBHHHBBH4s4s',0x45,0,0,0,0,64,17,0,src,dst)\nfor _ in range(3): s.sendto(ip+udp,(sys.argv[2],0))";

#[test]
fn a_container_cannot_forge_another_containers_address_past_isolation() {
    // Isolation trusts the source address; a container claiming a member of the other network
    // must be stopped at its own veth, as Docker's interface-based rules would stop it.
    let lab = lab("spoof");
    two_networks(&lab);
    lab.np(&["run", "-d", "--name", "sink", "--network", "n2", "--", "socat", "-u", "UDP-RECV:7000", "-"]);
    wait_listening_udp(&lab, "sink", 7000);
    let (b, sink) = (lab.ip_of("b", "n2"), lab.ip_of("sink", "n2"));
    lab.np(&["exec", "a", "--", "python3", "-c", SEND_FORGED, &b, &sink, "7000"]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(lab.np(&["logs", "sink"]), "", "a forged datagram crossed into n2");
    assert!(drops(&lab, "spoofed-source") >= 1);
    // The same datagram with b's real address, from b, arrives: the check is not the blocker.
    lab.np(&["exec", "b", "--", "python3", "-c", SEND_FORGED, &b, &sink, "7000"]);
    let arrived = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        lab.np(&["logs", "sink"]).contains("hello")
    });
    assert!(arrived, "b's own datagram never arrived");
}

#[test]
fn conflicting_host_ports_are_refused_and_change_nothing() {
    let lab = lab("portclash");
    lab.np(&["run", "-d", "--name", "a", "-p", "8080:80", "--", "sleep", "600"]);
    let before = lab.np(&["ps", "-a"]);
    let err = lab.np_fails(&["run", "-d", "--name", "b", "-p", "8080:81", "--", "sleep", "600"]);
    assert!(err.contains("8080") && err.contains("already allocated"), "{err}");
    let err = lab.np_fails(&["run", "-d", "--name", "b", "-p", "198.51.100.1:8080:80", "--", "sleep", "600"]);
    assert!(err.contains("already allocated"), "{err}");
    let err = lab.np_fails(&["run", "-d", "--name", "b", "-p", "8000-8010:80", "--", "sleep", "600"]);
    assert!(err.contains("differ in size"), "{err}");
    let err = lab.np_fails(&["run", "-d", "--name", "b", "-p", "8081:80", "--network", "none", "--", "sleep", "600"]);
    assert!(err.contains("bridge network"), "{err}");
    assert_eq!(lab.np(&["ps", "-a"]), before);
    // The same port over UDP is a different binding.
    lab.np(&["run", "-d", "--name", "b", "-p", "8080:80/udp", "--", "sleep", "600"]);
}

/// Entries of a pinned map of the lab's daemon, read straight from bpffs.
fn pinned_len(lab: &Lab, name: &str) -> usize {
    let m = aya::maps::MapData::from_pin(netpath::datapath::map_pin(&lab.bpffs, name)).unwrap();
    let m = aya::maps::Map::HashMap(m);
    match name {
        "PORTMAP" => aya::maps::HashMap::<_, netpath_common::PortKey, netpath_common::Backend>::try_from(&m)
            .unwrap()
            .keys()
            .count(),
        "ENDPOINTS" => aya::maps::HashMap::<_, u32, netpath_common::EndpointInfo>::try_from(&m).unwrap().keys().count(),
        "PUBLISHED" => aya::maps::HashMap::<_, netpath_common::PortKey, u8>::try_from(&m).unwrap().keys().count(),
        _ => unreachable!(),
    }
}

#[test]
fn rm_removes_every_map_entry_it_added_and_no_iptables_rule_exists() {
    let lab = lab("rmmaps");
    lab.np(&["run", "-d", "--name", "web", "-p", "8000-8099:8000-8099", "-p", "53:53/udp", "--", "sleep", "600"]);
    assert_eq!(pinned_len(&lab, "PORTMAP"), 101);
    assert_eq!(pinned_len(&lab, "PUBLISHED"), 101);
    assert_eq!(pinned_len(&lab, "ENDPOINTS"), 1);
    assert_eq!(lab.np(&["port", "web"]).lines().count(), 101);
    lab.np(&["run", "--rm", "--name", "probe", "--", "true"]);
    lab.np(&["rm", "-f", "web"]);
    assert_eq!(pinned_len(&lab, "PORTMAP"), 0);
    assert_eq!(pinned_len(&lab, "PUBLISHED"), 0);
    assert_eq!(pinned_len(&lab, "ENDPOINTS"), 0);
    let flows: serde_json::Value = serde_json::from_str(&lab.np(&["system", "flows"])).unwrap();
    assert_eq!(flows.as_array().unwrap().len(), 0, "{flows}");
    // netpath installs no iptables or nftables rules.
    let ipt = must(lab.host("iptables-save", &[]));
    assert!(!ipt.lines().any(|l| l.starts_with("-A")), "{ipt}");
    let nft = must(lab.host("nft", &["list", "ruleset"]));
    assert!(nft.trim().is_empty(), "{nft}");
}

#[test]
fn host_processes_reach_published_ports_via_loopback_and_host_address() {
    let lab = lab("hostlocal");
    common::whoami_server_with(&lab, "web", &["-p", "8080:8"]);
    udp_whoami(&lab, "dns", "5353:5353/udp");
    let host_tcp = |ip: &str| {
        must(lab.host("sh", &["-c", &format!("socat -t 10 - TCP:{ip}:8080,connect-timeout=5 </dev/null")]))
            .trim()
            .to_string()
    };
    // The container sees the host's address on its network, as with Docker's proxy-less mode.
    assert_eq!(host_tcp("127.0.0.1"), "172.17.0.1");
    assert_eq!(host_tcp(HOST_ETH0_IP), "172.17.0.1");
    // Connected UDP: the reply must appear to come from 127.0.0.1 or the socket would drop it.
    let udp = must(lab.host("python3", &["-c", UDP_ASK, "127.0.0.1", "5353", "0"]));
    assert_eq!(udp.trim(), "172.17.0.1");
    // getpeername shows what the application asked for, not the container.
    let peer = must(lab.host(
        "python3",
        &["-c", "import socket; s=socket.create_connection(('127.0.0.1',8080),5); print(s.getpeername()); s.close()"],
    ));
    assert_eq!(peer.trim(), "('127.0.0.1', 8080)");
    // Processes in other namespaces are untouched: nothing listens on the client's loopback.
    let other = in_ns(&lab.client_ns, "sh", &["-c", "socat -t 1 - TCP:127.0.0.1:8080,connect-timeout=2 </dev/null"])
        .output()
        .unwrap();
    assert!(!other.status.success(), "the socket programs leaked into another namespace");
}

/// Sends one datagram on a connected UDP socket and reports how the wait for an answer ended:
/// "refused" means an ICMP port-unreachable reached the socket, translated back correctly.
const UDP_PROBE: &str = "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(10)\ns.connect((sys.argv[1],int(sys.argv[2])))\ns.send(b'x')\ntry:\n  s.recv(10); print('answer')\nexcept ConnectionRefusedError: print('refused')\nexcept socket.timeout: print('timeout')";

#[test]
fn icmp_errors_about_translated_flows_are_translated_back() {
    let lab = lab("icmperr");
    // Masqueraded flow: the outside answers "port unreachable" to the host address.
    lab.np(&["run", "-d", "--name", "c", "-p", "7777:7777/udp", "--", "sleep", "600"]);
    let out = lab.np(&["exec", "c", "--", "python3", "-c", UDP_PROBE, CLIENT_IP, "9999"]);
    assert_eq!(out.trim(), "refused");
    // Published-port flow: the container answers "port unreachable" (nothing listens on 7777).
    let out = must(in_ns(&lab.client_ns, "python3", &["-c", UDP_PROBE, HOST_ETH0_IP, "7777"]));
    assert_eq!(out.trim(), "refused");
}

#[test]
fn publish_all_picks_free_ports_and_ports_survive_a_daemon_restart() {
    let mut lab = lab("pubrestart");
    lab.np(&[
        "run",
        "-d",
        "--name",
        "web",
        "-P",
        "--expose",
        "8",
        "--expose",
        "9-10/udp",
        "--",
        "socat",
        "TCP-LISTEN:8,fork,reuseaddr",
        "SYSTEM:echo $SOCAT_PEERADDR",
    ]);
    common::wait_listening(&lab, "web", 8);
    let ports = lab.np(&["port", "web"]);
    assert_eq!(
        ports.lines().collect::<Vec<_>>(),
        vec!["8/tcp -> 0.0.0.0:49153", "9/udp -> 0.0.0.0:49153", "10/udp -> 0.0.0.0:49154",]
    );
    let published = &lab.inspect("web")["NetworkSettings"]["Ports"]["8/tcp"][0];
    assert_eq!((published["HostIp"].as_str(), published["HostPort"].as_str()), (Some("0.0.0.0"), Some("49153")));
    assert_eq!(tcp_from_client(&lab, HOST_ETH0_IP, 49153), CLIENT_IP);
    lab.restart_daemon();
    assert_eq!(tcp_from_client(&lab, HOST_ETH0_IP, 49153), CLIENT_IP, "published port after restart");
    assert_eq!(lab.np(&["port", "web"]), ports);
}

/// A client in the client namespace holding one TCP connection: each line written to its stdin
/// is sent, and the line the server answers is printed.
const LINE_CLIENT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
f = s.makefile("rw")
for line in sys.stdin:
    f.write(line); f.flush()
    print(f.readline().strip(), flush=True)
"#;

/// One TCP connection from the client namespace to the host's `port`, held open by
/// [`LINE_CLIENT`]: each call of the returned function sends a line and returns the answer.
fn line_client(lab: &Lab, port: &str) -> (std::process::Child, impl FnMut(&str) -> String + use<>) {
    use std::io::{BufRead, Write};
    let mut client = in_ns(&lab.client_ns, "python3", &["-c", LINE_CLIENT, HOST_ETH0_IP, port])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = client.stdin.take().unwrap();
    let mut output = std::io::BufReader::new(client.stdout.take().unwrap());
    let say = move |msg: &str| {
        writeln!(input, "{msg}").unwrap();
        let mut line = String::new();
        output.read_line(&mut line).unwrap();
        line.trim().to_string()
    };
    (client, say)
}

#[test]
fn a_connection_survives_xdp_switched_on_and_off() {
    let mut lab = lab("xdpswitch");
    lab.client_sends_full_checksums();
    lab.np(&["run", "-d", "--name", "echo", "-p", "8080:8", "--", "socat", "TCP-LISTEN:8,fork,reuseaddr", "EXEC:cat"]);
    common::wait_listening(&lab, "echo", 8);
    let (mut client, mut say) = line_client(&lab, "8080");
    // This crate's setting, the other one, and back: one connection throughout.
    let other: &[&str] = if crate::DAEMON_ARGS.is_empty() { &["--xdp", "native"] } else { &["--xdp", "off"] };
    assert_eq!(say("first"), "first");
    for (step, args) in [("switched", other), ("switched back", crate::DAEMON_ARGS)] {
        lab.set_daemon_args(args);
        lab.restart_daemon();
        let dp: serde_json::Value = serde_json::from_str(&lab.np(&["system", "datapath"])).unwrap();
        let xdp_on = !dp["xdp"]["uplinks"].as_object().unwrap().is_empty();
        assert_eq!(xdp_on, args.contains(&"native"), "{step}: {}", dp["xdp"]);
        let redirects = lab.uplink_xdp_redirects();
        assert_eq!(say(step), step, "the connection after XDP was {step}");
        // Not just passed along: with XDP on, it took the flow's packets to the container.
        assert_eq!(lab.uplink_xdp_redirects() > redirects, xdp_on, "{step}: XDP redirects");
    }
    drop(say); // closes its stdin: the client ends
    let _ = client.wait();
}

#[test]
fn generic_xdp_serves_published_ports_too() {
    // Native XDP is what nat_xdp.rs runs everything with; generic (any driver) hands the
    // redirected socket buffer to the veth instead of a frame.
    let mut lab = lab("xdpgeneric");
    lab.set_daemon_args(&["--xdp", "generic"]);
    lab.restart_daemon();
    lab.client_sends_full_checksums();
    common::whoami_server_with(&lab, "web", &["-p", "8080:8"]);
    assert_eq!(tcp_from_client(&lab, HOST_ETH0_IP, 8080), CLIENT_IP);
    let dp: serde_json::Value = serde_json::from_str(&lab.np(&["system", "datapath"])).unwrap();
    assert_eq!(dp["xdp"]["uplinks"]["eth0"], "generic", "{}", dp["xdp"]);
}

#[test]
fn xdp_auto_leaves_a_veth_uplink_to_tc() {
    // `auto` attaches native XDP only where frames arrive without a socket buffer (a NIC
    // driver's); a veth's mostly come from a local stack, so it keeps TC alone. A native link
    // an earlier daemon left on it goes.
    let mut lab = lab("xdpauto");
    lab.client_sends_full_checksums();
    common::whoami_server_with(&lab, "web", &["-p", "8080:8"]);
    for (args, uplinks) in
        [(["--xdp", "native"], serde_json::json!({"eth0": "native"})), (["--xdp", "auto"], serde_json::json!({}))]
    {
        lab.set_daemon_args(&args);
        lab.restart_daemon();
        let dp: serde_json::Value = serde_json::from_str(&lab.np(&["system", "datapath"])).unwrap();
        assert_eq!(dp["xdp"]["setting"], args[1], "{}", dp["xdp"]);
        assert_eq!(dp["xdp"]["uplinks"], uplinks, "{args:?}: {}", dp["xdp"]);
        let redirects = lab.uplink_xdp_redirects();
        assert_eq!(tcp_from_client(&lab, HOST_ETH0_IP, 8080), CLIENT_IP, "{args:?}");
        assert_eq!(lab.uplink_xdp_redirects() > redirects, args[1] == "native", "{args:?}: XDP redirects");
    }
}

/// ENDPOINT_NETS as pinned (the uplink programs' exact-match table of container addresses),
/// each entry with what NETWORKS, the trie it copies, says of its address.
fn pinned_endpoint_nets(lab: &Lab) -> Vec<(String, NetworkInfo, Option<NetworkInfo>)> {
    use aya::maps::lpm_trie::{Key, LpmTrie};
    use aya::maps::{Array, Map, MapData};
    let pin = |name| MapData::from_pin(netpath::datapath::map_pin(&lab.bpffs, name)).unwrap();
    // Slots by address hash; a free one is all zeros.
    let nets = Map::Array(pin("ENDPOINT_NETS"));
    let nets = Array::<_, netpath_common::EndpointNet>::try_from(&nets).unwrap();
    let trie = Map::LpmTrie(pin("NETWORKS"));
    let trie = LpmTrie::<_, u32, NetworkInfo>::try_from(&trie).unwrap();
    let mut v: Vec<_> = nets
        .iter()
        .map(|r| r.unwrap())
        .filter(|e| e.addr != 0)
        .map(|e| {
            let addr = e.addr;
            (std::net::Ipv4Addr::from(addr.to_ne_bytes()).to_string(), e.net, trie.get(&Key::new(32, addr), 0).ok())
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Checks that ENDPOINT_NETS holds exactly the addresses `want`, each as NETWORKS has it.
fn assert_endpoint_nets(lab: &Lab, mut want: Vec<String>, when: &str) {
    want.sort();
    let got = pinned_endpoint_nets(lab);
    assert_eq!(got.iter().map(|e| e.0.clone()).collect::<Vec<_>>(), want, "{when}: addresses");
    for (addr, net, trie) in &got {
        assert_eq!(Some(*net), *trie, "{when}: {addr} must say what NETWORKS says");
    }
}

#[test]
fn the_uplinks_table_of_container_addresses_follows_them_across_an_upgrade_and_rm() {
    let mut lab = lab("epnets");
    lab.np(&["network", "create", "--subnet", "10.96.0.0/24", "n"]);
    lab.np(&["run", "-d", "--name", "echo", "-p", "8080:8", "--", "socat", "TCP-LISTEN:8,fork,reuseaddr", "EXEC:cat"]);
    lab.np(&["run", "-d", "--name", "other", "--network", "n", "--", "sleep", "600"]);
    lab.np(&["network", "connect", "n", "echo"]);
    common::wait_listening(&lab, "echo", 8);
    let (echo_bridge, echo_n, other) = (lab.ip_of("echo", "bridge"), lab.ip_of("echo", "n"), lab.ip_of("other", "n"));
    assert_endpoint_nets(&lab, vec![echo_bridge.clone(), echo_n.clone(), other.clone()], "after run");

    let (mut client, mut say) = line_client(&lab, "8080");
    assert_eq!(say("first"), "first");

    // An upgrade from a build without the table: no pin of it. The new daemon fills it from
    // what the other maps hold, and the connection carries on.
    lab.stop_daemon();
    std::fs::remove_file(netpath::datapath::map_pin(&lab.bpffs, "ENDPOINT_NETS")).unwrap();
    lab.start_daemon();
    assert_endpoint_nets(&lab, vec![echo_bridge.clone(), echo_n.clone(), other], "after the upgrade");
    assert_eq!(say("after the upgrade"), "after the upgrade");
    // And it still keeps outside hosts off the container's own address.
    must(in_ns(&lab.client_ns, "ip", &["route", "add", "172.17.0.0/16", "via", HOST_ETH0_IP]));
    let before = drops(&lab, "direct-access");
    assert!(tcp_refused_from_client(&lab, &echo_bridge, 8));
    assert!(drops(&lab, "direct-access") > before);

    lab.np(&["rm", "-f", "other"]);
    assert_endpoint_nets(&lab, vec![echo_bridge.clone(), echo_n], "after rm");
    lab.np(&["network", "disconnect", "n", "echo"]);
    assert_endpoint_nets(&lab, vec![echo_bridge], "after disconnect");
    lab.restart_daemon();
    assert_eq!(say("after a restart"), "after a restart");
    assert_eq!(pinned_endpoint_nets(&lab).len(), 1, "after a restart");
    drop(say); // closes its stdin: the client ends
    let _ = client.wait();
}

/// CT_PORTS as pinned: whether complete, and whether TCP port `port` has its bit.
fn pinned_ct_port_bit(lab: &Lab, port: u16) -> (bool, bool) {
    use aya::maps::{Array, Map, MapData};
    use netpath_common::{ct_ports, proto};
    let pin = MapData::from_pin(netpath::datapath::map_pin(&lab.bpffs, "CT_PORTS")).unwrap();
    let words = Map::Array(pin);
    let words = Array::<_, u64>::try_from(&words).unwrap();
    let (word, mask) = ct_ports::bit(proto::TCP, port.to_be()).unwrap();
    (words.get(&ct_ports::COMPLETE, 0).unwrap() != 0, words.get(&word, 0).unwrap() & mask != 0)
}

#[test]
fn a_connection_survives_an_upgrade_to_a_build_with_conntrack_port_bits() {
    // A build without CT_PORTS leaves no pin of it. The new daemon's programs look every
    // packet up until it has set the bits of the flows tracked before (here a published
    // port's), and the connection carries on: had the bit stayed clear, its next packet
    // would be taken for a new flow, whose reply tuple the old one holds (dropped).
    let mut lab = lab("ctports");
    lab.np(&["run", "-d", "--name", "echo", "-p", "8080:8", "--", "socat", "TCP-LISTEN:8,fork,reuseaddr", "EXEC:cat"]);
    common::wait_listening(&lab, "echo", 8);
    let (mut client, mut say) = line_client(&lab, "8080");
    assert_eq!(say("first"), "first");
    assert_eq!(pinned_ct_port_bit(&lab, 8080), (true, true), "before");
    lab.stop_daemon();
    std::fs::remove_file(netpath::datapath::map_pin(&lab.bpffs, "CT_PORTS")).unwrap();
    lab.start_daemon();
    assert_eq!(pinned_ct_port_bit(&lab, 8080), (true, true), "refilled after the upgrade");
    assert_eq!(say("after the upgrade"), "after the upgrade");
    assert_eq!(drops(&lab, "ct-insert-failed"), 0);
    drop(say); // closes its stdin: the client ends
    let _ = client.wait();
}
