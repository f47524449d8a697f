//! macvlan networks end to end. The lab's physical network: an "underlay" namespace holding a
//! Linux bridge, the host namespace's `eth1` (the parent) and an "external" namespace (a host
//! of that network, and its gateway) on it. Containers hang on eth1 with addresses of the
//! physical subnet, which is the host's own too.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use common::*;
use netpath_tests::{DaemonOpts, Lab, in_ns, must};

const SUBNET: &str = "192.0.2.0/24";
/// The external namespace: a host of the physical network and its gateway.
const EXTERNAL_IP: &str = "192.0.2.254";
/// The host's own address on eth1, inside the network's range: IPAM must skip it.
const HOST_ETH1_IP: &str = "192.0.2.130";
const RANGE: &str = "192.0.2.128/26";

struct MacvlanLab {
    lab: Lab,
    external: PathBuf,
}

/// A lab whose host has `eth1` on the underlay bridge (the parent), and an external host
/// there. The daemon treats every interface as an uplink, eth1 included: its programs must
/// let macvlan traffic be.
fn macvlan_lab(tag: &str) -> MacvlanLab {
    let mut lab = Lab::without_daemon(tag);
    let underlay = lab.add_ns("underlay");
    let external = lab.add_ns("external");
    must(in_ns(&underlay, "ip", &["link", "add", "br0", "type", "bridge"]));
    must(in_ns(&underlay, "ip", &["link", "set", "br0", "up"]));
    for (ns, port) in [(&lab.host_ns, "h-port"), (&external, "x-port")] {
        let peer_ns = ns.display().to_string();
        let name = if *ns == lab.host_ns { "eth1" } else { "eth0" };
        must(in_ns(&underlay, "ip", &["link", "add", port, "type", "veth", "peer", "name", name, "netns", &peer_ns]));
        must(in_ns(&underlay, "ip", &["link", "set", port, "master", "br0", "up"]));
    }
    must(in_ns(&lab.host_ns, "ip", &["addr", "add", &format!("{HOST_ETH1_IP}/24"), "dev", "eth1"]));
    must(in_ns(&lab.host_ns, "ip", &["link", "set", "eth1", "up"]));
    must(in_ns(&external, "ip", &["addr", "add", &format!("{EXTERNAL_IP}/24"), "dev", "eth0"]));
    must(in_ns(&external, "ip", &["link", "set", "eth0", "up"]));
    lab.start_daemon_with(&DaemonOpts { all_uplinks: true, ..Default::default() });
    MacvlanLab { lab, external }
}

/// A TCP server in namespace `ns` answering with the peer address it sees; waits until it listens.
fn whoami_in(ns: &Path, port: u16) -> Child {
    let c = in_ns(ns, "socat", &[&format!("TCP-LISTEN:{port},fork,reuseaddr"), "SYSTEM:echo $SOCAT_PEERADDR"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if !must(in_ns(ns, "ss", &["-Hltn", &format!("sport = :{port}")])).trim().is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(30));
    }
    c
}

/// TCP from namespace `ns` that must not get through.
fn unreachable_from(ns: &Path, ip: &str, port: u16) -> bool {
    let cmd = format!("socat -t 2 - TCP:{ip}:{port},connect-timeout=2 </dev/null");
    !in_ns(ns, "sh", &["-c", &cmd]).output().unwrap().status.success()
}

fn getent(lab: &Lab, ctr: &str, name: &str) -> Vec<String> {
    let out = lab.try_np(&["exec", ctr, "--", "getent", "hosts", name]);
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split_whitespace().next()).map(String::from).collect()
}

#[test]
fn macvlan_containers_live_on_the_physical_network() {
    let MacvlanLab { lab, external } = macvlan_lab("mv");
    let host_links = lab.links(&lab.host_ns);
    lab.np(&[
        "network",
        "create",
        "-d",
        "macvlan",
        "--subnet",
        SUBNET,
        "--gateway",
        EXTERNAL_IP,
        "--ip-range",
        RANGE,
        "--aux-address",
        "printer=192.0.2.129",
        "-o",
        "parent=eth1",
        "mv",
    ]);
    let net = lab.inspect_network("mv");
    assert_eq!(net["Driver"], "macvlan", "{net}");
    assert_eq!(net["Options"]["parent"], "eth1");
    assert_eq!(net["Options"]["macvlan_mode"], "bridge", "Docker's default mode");
    assert_eq!(net["IPAM"]["Config"][0]["AuxiliaryAddresses"]["printer"], "192.0.2.129");
    assert_eq!(lab.links(&lab.host_ns), host_links, "no bridge, no link on the host");

    echo_server(&lab, "m1", "mv");
    whoami_server(&lab, "m2", "mv");
    // The range's first address, then past the aux address and the host's own address.
    assert_eq!(lab.ip_of("m1", "mv"), "192.0.2.128");
    assert_eq!(lab.ip_of("m2", "mv"), "192.0.2.131");
    let link = lab.np(&["exec", "m1", "--", "ip", "-d", "link", "show", "eth0"]);
    assert!(link.contains("macvlan mode bridge"), "{link}");
    assert_eq!(container_addrs(&lab, "m1", "eth0"), ["192.0.2.128/24"]);
    let routes = lab.np(&["exec", "m1", "--", "ip", "-4", "route"]);
    assert!(routes.contains(&format!("default via {EXTERNAL_IP} dev eth0")), "{routes}");
    assert_eq!(lab.links(&lab.host_ns), host_links, "the sub-interfaces live in the containers");

    // The external host reaches them at their own addresses, no NAT, no published port ...
    assert_eq!(echo_from_ns(&external, "192.0.2.128", "from-outside"), "from-outside");
    // ... and they reach it with their own addresses.
    let mut srv = whoami_in(&external, 9000);
    let seen = lab.np(&[
        "exec",
        "m2",
        "--",
        "sh",
        "-c",
        &format!("socat -t 10 - TCP:{EXTERNAL_IP}:9000,connect-timeout=5 </dev/null"),
    ]);
    let _ = srv.kill();
    let _ = srv.wait();
    assert_eq!(seen.trim(), "192.0.2.131");
    // Each other, and by name (the embedded DNS serves macvlan containers too).
    assert_eq!(whoami(&lab, "m1", "192.0.2.131"), "192.0.2.128");
    assert_eq!(getent(&lab, "m1", "m2"), ["192.0.2.131"]);
    assert_eq!(getent(&lab, "m2", "m1.mv"), ["192.0.2.128"]);

    // A bridge container connected to it gets a macvlan eth1 there; disconnect takes it away.
    lab.np(&["network", "create", "--subnet", "10.33.0.0/24", "br"]);
    lab.np(&["run", "-d", "--name", "b", "--network", "br", "--", "sleep", "600"]);
    lab.np(&["network", "connect", "--ip", "192.0.2.140", "mv", "b"]);
    assert_eq!(container_addrs(&lab, "b", "eth1"), ["192.0.2.140/24"]);
    assert!(lab.np(&["exec", "b", "--", "ip", "-d", "link", "show", "eth1"]).contains("macvlan"));
    assert_eq!(echo(&lab, "b", "192.0.2.128", "over-eth1"), "over-eth1");
    lab.np(&["network", "disconnect", "mv", "b"]);
    assert_eq!(container_links(&lab, "b"), ["lo", "eth0"]);
    lab.np(&["rm", "-f", "b"]);
    lab.np(&["network", "rm", "br"]);

    // -p means nothing here: accepted, with Docker's warning.
    let out = lab.try_np(&["run", "-d", "--name", "p", "--network", "mv", "-p", "8080:80", "--", "sleep", "600"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let warning = String::from_utf8_lossy(&out.stderr);
    assert!(warning.contains("WARNING: published ports are discarded on macvlan network mv"), "{warning}");
    assert!(lab.np(&["port", "p"]).trim().is_empty());
    // A static address that is the host's, an aux address or taken: refused.
    for (ip, why) in [(HOST_ETH1_IP, "an address of the host"), ("192.0.2.129", "aux address printer")] {
        let err = lab.np_fails(&["run", "-d", "--name", "s", "--network", "mv", "--ip", ip, "--", "sleep", "1"]);
        assert!(err.contains(&format!("address {ip} is reserved ({why})")), "{err}");
    }

    // The network goes only when empty, and leaves the parent as it was.
    let err = lab.np_fails(&["network", "rm", "mv"]);
    assert!(err.contains("in use"), "{err}");
    lab.np(&["rm", "-f", "m1", "m2", "p"]);
    lab.np(&["network", "rm", "mv"]);
    assert_eq!(lab.links(&lab.host_ns), host_links);
    let eth1 = must(lab.host("ip", &["-o", "-4", "addr", "show", "dev", "eth1"]));
    assert!(eth1.contains(HOST_ETH1_IP), "{eth1}");
}

#[test]
fn host_access_lets_host_processes_reach_the_containers() {
    let MacvlanLab { mut lab, external } = macvlan_lab("mvhost");
    let host_links = lab.links(&lab.host_ns);
    let create = |name: &str, extra: &[&str]| {
        let mut args = vec!["network", "create", "-d", "macvlan", "--subnet", SUBNET, "--gateway", EXTERNAL_IP];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-o", "parent=eth1", name]);
        lab.np(&args);
    };
    create("mv", &["--ip-range", RANGE]);
    echo_server(&lab, "m1", "mv");
    let m1 = lab.ip_of("m1", "mv");
    // The kernel delivers nothing between a parent and its macvlans: the host cannot reach them.
    assert!(unreachable_from(&lab.host_ns, &m1, ECHO_PORT), "the host reached its macvlan container");
    assert_eq!(echo_from_ns(&external, &m1, "outside-ok"), "outside-ok");
    lab.np(&["rm", "-f", "m1"]);
    lab.np(&["network", "rm", "mv"]);

    // With host_access the host has a macvlan of its own on eth1 and a route to the range.
    create("mvh", &["--ip-range", RANGE, "-o", "netpath.macvlan.host_access=true"]);
    let net = lab.inspect_network("mvh");
    let shim = net["Options"]["netpath.macvlan.host_interface"].as_str().expect("shim name").to_string();
    assert_eq!(net["Options"]["netpath.macvlan.host_address"], "192.0.2.191", "the range's highest address");
    assert!(lab.links(&lab.host_ns).contains(&shim), "{shim}");
    let routes = must(lab.host("ip", &["-4", "route", "show", RANGE]));
    assert!(routes.contains(&format!("dev {shim}")), "{routes}");
    echo_server(&lab, "m1", "mvh");
    let m1 = lab.ip_of("m1", "mvh");
    assert_eq!(echo_from_ns(&lab.host_ns, &m1, "from-the-host"), "from-the-host");
    assert_eq!(echo_from_ns(&external, &m1, "still-outside"), "still-outside");
    // The shim's address is never a container's.
    let err =
        lab.np_fails(&["run", "-d", "--name", "s", "--network", "mvh", "--ip", "192.0.2.191", "--", "sleep", "1"]);
    assert!(err.contains("reserved (the host's macvlan shim)"), "{err}");

    // A daemon restart finds it as it left it, or makes it again where it went missing.
    lab.stop_daemon();
    must(lab.host("ip", &["link", "del", &shim]));
    assert!(unreachable_from(&lab.host_ns, &m1, ECHO_PORT));
    lab.start_daemon_with(&DaemonOpts { all_uplinks: true, ..Default::default() });
    assert_eq!(echo_from_ns(&lab.host_ns, &m1, "after-restart"), "after-restart");
    assert!(lab.links(&lab.host_ns).contains(&shim), "the shim was made again");
    lab.np(&["rm", "-f", "m1"]);
    lab.np(&["network", "rm", "mvh"]);
    assert_eq!(lab.links(&lab.host_ns), host_links, "the shim is gone");
    assert!(must(lab.host("ip", &["-4", "route", "show", RANGE])).trim().is_empty());
}

#[test]
fn macvlan_parents_modes_and_vlans_are_checked_before_anything_is_made() {
    let MacvlanLab { lab, .. } = macvlan_lab("mvbad");
    must(lab.host("ip", &["link", "add", "eth9", "type", "veth", "peer", "name", "eth9p"]));
    let host_links = lab.links(&lab.host_ns);
    let nets = lab.np(&["network", "ls"]);
    let fails = |extra: &[&str], expected: &str| {
        let mut args = vec!["network", "create", "-d", "macvlan", "--subnet", "10.40.0.0/24"];
        args.extend_from_slice(extra);
        args.push("bad");
        let err = lab.np_fails(&args);
        assert!(err.contains(expected), "{args:?}: expected {expected:?}, got {err}");
        assert_eq!(lab.links(&lab.host_ns), host_links, "{args:?} changed the host's links");
        assert_eq!(lab.np(&["network", "ls"]), nets, "{args:?} changed the networks");
    };
    fails(&[], "a macvlan network needs -o parent=IFACE");
    fails(&["-o", "parent=nosuch0"], "parent interface nosuch0 does not exist");
    fails(&["-o", "parent=eth9"], "parent interface eth9 is down");
    fails(&["-o", "parent=eth1", "-o", "macvlan_mode=turbo"], "invalid macvlan_mode \"turbo\"");
    fails(&["-o", "parent=eth1.0"], "VLAN id 0 is outside 1-4094");
    fails(&["-o", "parent=eth1.4095"], "VLAN id 4095 is outside 1-4094");
    fails(
        &["-o", "parent=eth1", "-o", "com.docker.network.driver.mtu=1400"],
        "unsupported network option \"com.docker.network.driver.mtu\" for a macvlan network",
    );
    fails(&["-o", "parent=eth1", "--internal"], "--internal is supported on bridge networks only");
    fails(
        &["-o", "parent=eth1", "-o", "macvlan_mode=private", "-o", "netpath.macvlan.host_access=true"],
        "needs macvlan_mode bridge",
    );
    // The host routes the whole subnet through eth1: a shim route for it would steal that.
    let err = lab.np_fails(&[
        "network",
        "create",
        "-d",
        "macvlan",
        "--subnet",
        SUBNET,
        "-o",
        "parent=eth1",
        "-o",
        "netpath.macvlan.host_access=true",
        "bad",
    ]);
    assert!(err.contains("give an --ip-range narrower"), "{err}");
    // One mode per parent.
    lab.np(&["network", "create", "-d", "macvlan", "--subnet", "10.41.0.0/24", "-o", "parent=eth1", "first"]);
    let nets = lab.np(&["network", "ls"]);
    let err = lab.np_fails(&[
        "network",
        "create",
        "-d",
        "macvlan",
        "--subnet",
        "10.42.0.0/24",
        "-o",
        "parent=eth1",
        "-o",
        "macvlan_mode=private",
        "second",
    ]);
    assert!(err.contains("parent eth1 is used by macvlan network first in mode bridge"), "{err}");
    // Subnets still may not overlap other networks' (only the host's own).
    let err =
        lab.np_fails(&["network", "create", "-d", "macvlan", "--subnet", "10.41.0.128/25", "-o", "parent=eth1", "x"]);
    assert!(err.contains("overlaps with network first"), "{err}");
    assert_eq!(lab.np(&["network", "ls"]), nets);
}

#[test]
fn a_vlan_parent_is_refused_where_the_kernel_has_no_8021q_and_managed_where_it_has() {
    let MacvlanLab { lab, .. } = macvlan_lab("mvvlan");
    let host_links = lab.links(&lab.host_ns);
    let create = |name: &str, subnet: &str, parent: &str| {
        lab.try_np(&["network", "create", "-d", "macvlan", "--subnet", subnet, "-o", &format!("parent={parent}"), name])
    };
    let out = create("v10", "10.50.10.0/24", "eth1.10");
    if !kernel_has_vlan() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains("the kernel lacks VLAN (802.1q) support"), "{err}");
        assert_eq!(lab.links(&lab.host_ns), host_links);
        eprintln!("skipping the VLAN trunk part: this kernel has no 802.1q (CONFIG_VLAN_8021Q)");
        return;
    }
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(create("v20", "10.50.20.0/24", "eth1.20").status.success());
    assert!(create("v10b", "10.50.11.0/24", "eth1.10").status.success(), "a second network on eth1.10");
    let links = lab.links(&lab.host_ns);
    assert!(links.contains(&"eth1.10".into()) && links.contains(&"eth1.20".into()), "{links:?}");
    // Made when absent, removed with the last network on it.
    lab.np(&["network", "rm", "v10"]);
    assert!(lab.links(&lab.host_ns).contains(&"eth1.10".into()), "v10b still uses it");
    lab.np(&["network", "rm", "v10b", "v20"]);
    assert_eq!(lab.links(&lab.host_ns), host_links);
    // Never one it did not make.
    must(lab.host("ip", &["link", "add", "link", "eth1", "name", "eth1.30", "type", "vlan", "id", "30"]));
    must(lab.host("ip", &["link", "set", "eth1.30", "up"]));
    assert!(create("v30", "10.50.30.0/24", "eth1.30").status.success());
    lab.np(&["network", "rm", "v30"]);
    assert!(lab.links(&lab.host_ns).contains(&"eth1.30".into()));
}

/// The same test the daemon makes (module loaded, built in, or loadable).
fn kernel_has_vlan() -> bool {
    if Path::new("/proc/net/vlan").exists() || Path::new("/sys/module/8021q").exists() {
        return true;
    }
    let release = nix::sys::utsname::uname().unwrap().release().to_string_lossy().into_owned();
    ["modules.builtin", "modules.dep"]
        .iter()
        .any(|f| std::fs::read_to_string(format!("/lib/modules/{release}/{f}")).is_ok_and(|s| s.contains("/8021q.ko")))
}

#[test]
fn a_passthru_network_gives_its_parent_to_one_container() {
    let MacvlanLab { lab, .. } = macvlan_lab("mvpass");
    must(lab.host("ip", &["link", "add", "eth8", "type", "veth", "peer", "name", "eth8p"]));
    must(lab.host("ip", &["link", "set", "eth8", "up"]));
    // `ip`, not /sys: sysfs shows the namespace it was mounted in.
    let mac = |ns: &Path, dev: &str| {
        let out = must(in_ns(ns, "ip", &["-o", "link", "show", dev]));
        out.split_whitespace().skip_while(|w| *w != "link/ether").nth(1).unwrap_or_default().to_string()
    };
    let parent_mac = mac(&lab.host_ns, "eth8");
    lab.np(&[
        "network",
        "create",
        "-d",
        "macvlan",
        "--subnet",
        "10.44.0.0/24",
        "-o",
        "parent=eth8",
        "-o",
        "macvlan_mode=passthru",
        "pt",
    ]);
    lab.np(&["run", "-d", "--name", "only", "--network", "pt", "--", "sleep", "600"]);
    let link = lab.np(&["exec", "only", "--", "ip", "-d", "link", "show", "eth0"]);
    assert!(link.contains("macvlan mode passthru"), "{link}");
    assert_eq!(mac(&lab.host_ns, "eth8"), parent_mac, "the parent keeps its MAC");
    let err = lab.np_fails(&["run", "-d", "--name", "second", "--network", "pt", "--", "sleep", "600"]);
    assert!(err.contains("takes one container only"), "{err}");
    let err = lab.np_fails(&[
        "network",
        "create",
        "-d",
        "macvlan",
        "--subnet",
        "10.45.0.0/24",
        "-o",
        "parent=eth8",
        "-o",
        "macvlan_mode=passthru",
        "pt2",
    ]);
    assert!(err.contains("parent eth8 is used by macvlan network pt"), "{err}");
    lab.np(&["rm", "-f", "only"]);
    lab.np(&["network", "rm", "pt"]);
}
