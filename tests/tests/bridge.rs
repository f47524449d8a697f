//! Bridge networks end to end: containers reach each other, counters move, rm cleans up.

mod common;

use common::{echo, echo_server, link_names};
use netpath_tests::Lab;

#[test]
fn two_containers_on_a_user_bridge_talk_both_ways_and_counters_move() {
    let lab = Lab::new("userbr");
    lab.np(&["network", "create", "appnet"]);
    echo_server(&lab, "a", "appnet");
    echo_server(&lab, "b", "appnet");
    let ip_a = lab.ip_of("a", "appnet");
    let ip_b = lab.ip_of("b", "appnet");
    assert!(ip_a.starts_with("172.18."), "first user network gets 172.18.0.0/16, got {ip_a}");
    assert_eq!(echo(&lab, "a", &ip_b, "ping-from-a"), "ping-from-a");
    assert_eq!(echo(&lab, "b", &ip_a, "ping-from-b"), "ping-from-b");
    // The host ends carry no IPv6 (no link-local address, no route per container): the
    // kernel walks every IPv6 route on each link change, which made wiring grow with them.
    let v6 =
        netpath_tests::must(netpath_tests::in_ns(&lab.host_ns, "ip", &["-6", "-o", "route", "show", "table", "all"]));
    assert!(!v6.contains("dev veth"), "IPv6 routes on container veths:\n{v6}");
    // Nor do the container ends (as Docker's on IPv4-only networks): no link-local address,
    // so no duplicate address detection or router solicitations after each start.
    let inner = lab.np(&["exec", "a", "--", "ip", "-6", "-o", "addr", "show", "dev", "eth0"]);
    assert!(inner.trim().is_empty(), "IPv6 addresses on a's eth0:\n{inner}");
    let lo = lab.np(&["exec", "a", "--", "ip", "-6", "-o", "addr", "show", "dev", "lo"]);
    assert!(lo.contains("::1/128"), "a's lo keeps ::1:\n{lo}");

    let c = &lab.inspect("a")["NetworkSettings"]["Networks"]["appnet"]["Counters"];
    for k in COUNTERS {
        assert!(c[k].as_u64().unwrap() > 0, "{k} did not move: {c}");
    }
    // The counters are the container's view: what its own eth0 counts, read from the host.
    let (before, seen, after) = (own_counters(&lab, "a"), counters(&lab, "a"), own_counters(&lab, "a"));
    for (i, k) in COUNTERS.iter().enumerate() {
        assert!(before[i] <= seen[i] && seen[i] <= after[i], "{k}: {seen:?} is not eth0's {before:?}..{after:?}");
    }
    // Each direction moves with the traffic going that way: a sends 200 kB of UDP to b, where
    // nothing listens (b answers with a few ICMP errors at most; unconnected, the sender
    // ignores them).
    const SENT: u64 = 200_000;
    let (a0, b0) = (counters(&lab, "a"), counters(&lab, "b"));
    let cmd = format!("head -c {SENT} /dev/zero | socat -u - UDP-SENDTO:{ip_b}:9999");
    lab.np(&["exec", "a", "--", "sh", "-c", &cmd]);
    let (a1, b1) = (counters(&lab, "a"), counters(&lab, "b"));
    let moved = |x: [u64; 4], y: [u64; 4]| -> [u64; 4] { std::array::from_fn(|i| y[i] - x[i]) };
    let [a_rxp, a_rxb, a_txp, a_txb] = moved(a0, a1);
    let [b_rxp, b_rxb, b_txp, b_txb] = moved(b0, b1);
    let frames = SENT / 1500; // at least: IP fragments of the 8 kB datagrams, on a 1500 MTU
    assert!(a_txb >= SENT && a_txp >= frames, "a sent {a_txp} packets, {a_txb} B");
    assert!(b_rxb >= SENT && b_rxp >= frames, "b received {b_rxp} packets, {b_rxb} B");
    assert!(a_rxb < SENT / 4 && b_txb < SENT / 4, "the other way: a received {a_rxb} B, b sent {b_txb} B");
    assert!(a_rxp < frames && b_txp < frames, "the other way: a received {a_rxp}, b sent {b_txp} packets");
    let mac = lab.inspect("a")["NetworkSettings"]["Networks"]["appnet"]["MacAddress"].as_str().unwrap().to_string();
    let o: Vec<u8> = ip_a.split('.').map(|x| x.parse().unwrap()).collect();
    assert_eq!(mac, format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]));
}

const COUNTERS: [&str; 4] = ["RxPackets", "RxBytes", "TxPackets", "TxBytes"];

/// `inspect`'s counters of `container` on appnet, in [`COUNTERS`]' order.
fn counters(lab: &Lab, container: &str) -> [u64; 4] {
    let c = &lab.inspect(container)["NetworkSettings"]["Networks"]["appnet"]["Counters"];
    COUNTERS.map(|k| c[k].as_u64().unwrap_or_else(|| panic!("{container}: no {k}: {c}")))
}

/// The counters of the container's eth0 as it sees them itself (`ip -s link` inside it).
fn own_counters(lab: &Lab, container: &str) -> [u64; 4] {
    let out = lab.np(&["exec", container, "--", "ip", "-j", "-s", "link", "show", "eth0"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let s = &v[0]["stats64"];
    let n = |dir: &str, k: &str| s[dir][k].as_u64().unwrap_or_else(|| panic!("no {dir}.{k}: {out}"));
    [n("rx", "packets"), n("rx", "bytes"), n("tx", "packets"), n("tx", "bytes")]
}

#[test]
fn containers_on_the_default_bridge_talk() {
    let lab = Lab::new("defbr");
    echo_server(&lab, "srv", "bridge");
    lab.np(&["run", "-d", "--name", "cli", "--", "sleep", "600"]);
    let ip = lab.ip_of("srv", "bridge");
    assert!(ip.starts_with("172.17.0."), "{ip}");
    assert_eq!(echo(&lab, "cli", &ip, "hello"), "hello");
    assert!(lab.links(&lab.host_ns).contains(&"netpath0".to_string()));
    // The container's default route goes via the bridge gateway.
    let routes = lab.np(&["exec", "cli", "--", "ip", "route"]);
    assert!(routes.contains("default via 172.17.0.1 dev eth0"), "{routes}");
}

#[test]
fn the_gateway_mac_stays_put_as_containers_come_and_go() {
    // A bridge left to itself takes its lowest port MAC; containers would keep a stale one.
    let mut lab = Lab::new("brmac");
    let bridge_mac = |lab: &Lab| {
        let out = netpath_tests::must(lab.host("ip", &["-o", "link", "show", "netpath0"]));
        out.split_whitespace().skip_while(|w| *w != "link/ether").nth(1).unwrap().to_string()
    };
    let gw_mac_seen_by = |c: &str| {
        let out = lab.np(&["exec", c, "--", "ip", "neigh", "show", "172.17.0.1"]);
        out.split_whitespace().skip_while(|w| *w != "lladdr").nth(1).map(str::to_string)
    };
    assert_eq!(bridge_mac(&lab), "02:42:ac:11:00:01", "derived from the gateway 172.17.0.1");
    echo_server(&lab, "srv", "bridge");
    lab.np(&["run", "-d", "--name", "cli", "--", "sleep", "600"]);
    assert_eq!(echo(&lab, "cli", &lab.ip_of("srv", "bridge"), "hi"), "hi");
    lab.np(&["exec", "cli", "--", "ping", "-c", "1", "-W", "2", "172.17.0.1"]);
    assert_eq!(gw_mac_seen_by("cli").as_deref(), Some("02:42:ac:11:00:01"));
    lab.np(&["rm", "-f", "srv"]);
    assert_eq!(bridge_mac(&lab), "02:42:ac:11:00:01");
    // A bridge with another MAC (made by an older netpath) gets it fixed on start.
    lab.stop_daemon();
    netpath_tests::must(lab.host("ip", &["link", "set", "netpath0", "address", "02:00:00:00:00:99"]));
    lab.start_daemon();
    assert_eq!(bridge_mac(&lab), "02:42:ac:11:00:01");
}

#[test]
fn foreground_run_passes_exit_code_and_rm_flag_removes() {
    let lab = Lab::new("fg");
    let out = lab.try_np(&["run", "--rm", "--name", "once", "--", "sh", "-c", "ip -o -4 addr show eth0; exit 3"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout).contains("172.17.0.2/16"));
    assert!(!lab.np(&["ps", "-a"]).contains("once"));
    lab.np(&["run", "--name", "kept", "--", "true"]);
    let ps = lab.np(&["ps", "-a"]);
    assert!(ps.contains("kept") && ps.contains("exited (0)"), "{ps}");
}

#[test]
fn rm_leaves_no_link_address_or_allocation() {
    let lab = Lab::new("rmclean");
    lab.np(&["network", "create", "--subnet", "10.77.0.0/24", "n1"]);
    let links_before = lab.links(&lab.host_ns);
    lab.np(&["run", "-d", "--name", "c1", "--network", "n1", "--", "sleep", "600"]);
    let host_if = lab.inspect("c1")["NetworkSettings"]["Networks"]["n1"]["HostInterface"].as_str().unwrap().to_string();
    let sandbox = lab.inspect("c1")["NetworkSettings"]["SandboxKey"].as_str().unwrap().to_string();
    assert!(lab.links(&lab.host_ns).contains(&host_if));
    assert_eq!(lab.ip_of("c1", "n1"), "10.77.0.2");

    let pid = lab.inspect("c1")["State"]["Pid"].as_u64().expect("c1 runs");
    lab.np_fails(&["rm", "c1"]); // running
    lab.np(&["rm", "-f", "c1"]);
    assert_eq!(lab.links(&lab.host_ns), links_before, "host links after rm");
    assert!(!std::path::Path::new(&sandbox).exists(), "netns file {sandbox} left behind");
    assert!(lab.inspect_network("n1")["Containers"].as_object().unwrap().is_empty());
    // The address is free again: the next container gets it.
    lab.np(&["run", "-d", "--name", "c2", "--network", "n1", "--", "sleep", "600"]);
    assert_eq!(lab.ip_of("c2", "n1"), "10.77.0.2");
    // c1's process is gone (not even a zombie).
    assert!(netpath::daemon::process::start_time(pid as u32).is_none(), "c1's process {pid} survived rm -f");
}

/// The host's interface names as the kernel has them now (no waiting for the daemon).
fn host_links_now(lab: &Lab) -> Vec<String> {
    link_names(&netpath_tests::must(lab.host("ip", &["-o", "link", "show"])))
}

/// Pinned program links of the daemon (one per container veth).
fn link_pins(lab: &Lab) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(lab.bpffs.join("links"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn rm_f_answers_and_leaves_nothing_shortly_after_and_the_same_name_and_ip_run_again_at_once() {
    // rm -f answers before the kernel has deleted the container's veth (that goes in the
    // background): its name is free at once; its address (and the MAC derived from it) as
    // soon as the veth is gone, which a run asking for it waits for.
    let lab = Lab::new("rerun");
    lab.np(&["network", "create", "--subnet", "10.78.0.0/24", "n"]);
    echo_server(&lab, "srv", "n");
    let srv_ip = lab.ip_of("srv", "n");
    let (links_before, pins_before) = (lab.links(&lab.host_ns), link_pins(&lab));
    let run =
        ["run", "-d", "--name", "c", "--network", "n", "--ip", "10.78.0.9", "-p", "8080:80", "--", "sleep", "600"];
    lab.np(&run);
    let mut old = lab.inspect("c");
    for round in 0..4 {
        lab.np(&["rm", "-f", "c"]);
        lab.np(&run);
        let v = lab.inspect("c");
        assert_eq!(lab.ip_of("c", "n"), "10.78.0.9", "round {round}");
        let (old_if, new_if) = (
            &old["NetworkSettings"]["Networks"]["n"]["HostInterface"],
            &v["NetworkSettings"]["Networks"]["n"]["HostInterface"],
        );
        assert_ne!(old_if, new_if, "round {round}: a new veth");
        // The run had to wait for the address: the old veth, its program's pin and its
        // namespace were gone before it was handed out again.
        let old_if = old_if.as_str().unwrap();
        assert!(!host_links_now(&lab).iter().any(|l| l == old_if), "round {round}: {old_if} still there");
        assert!(
            !link_pins(&lab).iter().any(|p| p.starts_with(&format!("{old_if}@"))),
            "round {round}: pin of {old_if}"
        );
        let old_ns = old["NetworkSettings"]["SandboxKey"].as_str().unwrap();
        assert!(!std::path::Path::new(old_ns).exists(), "round {round}: {old_ns} still there");
        // The new container is reachable at the address (the bridge forgot the old port).
        assert_eq!(echo(&lab, "c", &srv_ip, "again"), "again", "round {round}");
        old = v;
    }
    // Removed without a run after it: gone shortly after rm answers.
    lab.np(&["rm", "-f", "c"]);
    assert_eq!(lab.links(&lab.host_ns), links_before, "host links once the removal settled");
    assert_eq!(link_pins(&lab), pins_before, "link pins once the removal settled");
    let old_ns = old["NetworkSettings"]["SandboxKey"].as_str().unwrap();
    assert!(!std::path::Path::new(old_ns).exists(), "{old_ns} left behind");
    let dp: serde_json::Value = serde_json::from_str(&lab.np(&["system", "datapath"])).unwrap();
    assert_eq!((dp["endpoints"].as_u64(), dp["published_ports"].as_u64()), (Some(1), Some(0)), "{dp}");
}

#[test]
fn new_networks_skip_subnets_routed_on_the_host_and_honour_ip_range() {
    let lab = Lab::new("routed");
    // Something else on the host already routes 172.18.0.0/16.
    netpath_tests::must(lab.host("ip", &["route", "add", "172.18.0.0/16", "dev", "eth0"]));
    lab.np(&["network", "create", "n1"]);
    assert_eq!(lab.inspect_network("n1")["IPAM"]["Config"][0]["Subnet"], "172.19.0.0/16");
    lab.np(&["network", "create", "n2"]);
    assert_eq!(lab.inspect_network("n2")["IPAM"]["Config"][0]["Subnet"], "172.20.0.0/16");

    lab.np(&[
        "network",
        "create",
        "--subnet",
        "10.50.0.0/24",
        "--gateway",
        "10.50.0.254",
        "--ip-range",
        "10.50.0.16/28",
        "r",
    ]);
    let cfg = &lab.inspect_network("r")["IPAM"]["Config"][0];
    assert_eq!((cfg["Gateway"].as_str(), cfg["IPRange"].as_str()), (Some("10.50.0.254"), Some("10.50.0.16/28")));
    lab.np(&["run", "-d", "--name", "c", "--network", "r", "--", "sleep", "600"]);
    assert_eq!(lab.ip_of("c", "r"), "10.50.0.16");
    let routes = lab.np(&["exec", "c", "--", "ip", "route"]);
    assert!(routes.contains("default via 10.50.0.254"), "{routes}");
}
