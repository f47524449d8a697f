//! Bad input: every case gets a clear message naming the problem, a non-zero exit, and leaves
//! the daemon's state (networks, containers, links, namespaces) exactly as it was.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use common::*;
use netpath_tests::{Lab, netpath_bin};

/// Everything a user (or the host) could see change.
#[derive(Debug, PartialEq)]
struct Snapshot {
    networks: String,
    network_details: String,
    containers: String,
    container_details: String,
    host_links: Vec<String>,
    netns_files: Vec<String>,
}

fn snapshot(lab: &Lab) -> Snapshot {
    let names: Vec<String> = lab.np(&["network", "ls", "-q"]).lines().map(str::to_string).collect();
    let mut args = vec!["network", "inspect"];
    args.extend(names.iter().map(String::as_str));
    let ps: Vec<String> =
        lab.np(&["ps", "-a"]).lines().skip(1).filter_map(|l| l.split_whitespace().nth(1)).map(str::to_string).collect();
    let container_details = if ps.is_empty() {
        String::new()
    } else {
        let mut args = vec!["inspect"];
        args.extend(ps.iter().map(String::as_str));
        // Counters are live numbers, not state.
        let mut v: serde_json::Value = serde_json::from_str(&lab.np(&args)).unwrap();
        for c in v.as_array_mut().unwrap() {
            for (_, n) in c["NetworkSettings"]["Networks"].as_object_mut().unwrap() {
                n.as_object_mut().unwrap().remove("Counters");
            }
        }
        v.to_string()
    };
    lab.settle();
    let mut netns_files: Vec<String> = std::fs::read_dir(lab.state_dir.join("netns"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    netns_files.sort();
    Snapshot {
        networks: lab.np(&["network", "ls"]),
        network_details: lab.np(&args),
        containers: lab.np(&["ps", "-a"]),
        container_details,
        host_links: lab.links(&lab.host_ns),
        netns_files,
    }
}

/// Runs a command that must fail with `expected` in its message and change nothing.
fn rejected(lab: &Lab, args: &[&str], expected: &str) {
    let before = snapshot(lab);
    let out = lab.try_np(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "netpath {args:?} succeeded:\n{}", String::from_utf8_lossy(&out.stdout));
    assert!(stderr.contains(expected), "netpath {args:?}: expected {expected:?} in the message, got:\n{stderr}");
    assert!(stderr.starts_with("Error: "), "netpath {args:?}: {stderr}");
    assert_eq!(snapshot(lab), before, "netpath {args:?} changed state");
}

#[test]
fn bad_subnets_and_gateways_are_refused() {
    let lab = Lab::new("badsubnet");
    rejected(&lab, &["network", "create", "--subnet", "10.0.0.0/33", "n"], "invalid CIDR \"10.0.0.0/33\"");
    rejected(&lab, &["network", "create", "--subnet", "banana", "n"], "invalid CIDR \"banana\"");
    rejected(
        &lab,
        &["network", "create", "--subnet", "10.1.2.3/16", "n"],
        "host bits are set, did you mean 10.1.0.0/16",
    );
    rejected(&lab, &["network", "create", "--subnet", "10.1.0.0/31", "n"], "too small");
    rejected(
        &lab,
        &["network", "create", "--subnet", "10.50.0.0/24", "--gateway", "10.9.9.1", "n"],
        "gateway 10.9.9.1 is not a usable address of subnet 10.50.0.0/24",
    );
    rejected(
        &lab,
        &["network", "create", "--subnet", "10.50.0.0/24", "--gateway", "10.50.0.255", "n"],
        "gateway 10.50.0.255 is not a usable address",
    );
    rejected(&lab, &["network", "create", "--subnet", "10.50.0.0/24", "--gateway", "nope", "n"], "invalid gateway");
    rejected(
        &lab,
        &["network", "create", "--subnet", "10.50.0.0/24", "--ip-range", "10.51.0.0/25", "n"],
        "not inside subnet 10.50.0.0/24",
    );
    rejected(&lab, &["network", "create", "--gateway", "10.50.0.1", "n"], "need --subnet");
    rejected(&lab, &["network", "create", "-d", "ipvlan", "n"], "unknown driver \"ipvlan\"");
    // overlay is a driver now, but only in a cluster: this daemon has no cluster store.
    rejected(&lab, &["network", "create", "-d", "overlay", "n"], "overlay networks need a cluster store");
    rejected(&lab, &["network", "create", "-d", "macvlan", "n"], "a macvlan network needs -o parent=IFACE");
    rejected(
        &lab,
        &["network", "create", "-d", "macvlan", "-o", "parent=eth0", "n"],
        "a macvlan network needs --subnet",
    );
    rejected(
        &lab,
        &["network", "create", "-d", "macvlan", "--subnet", "10.50.0.0/24", "-o", "parent=eth0.4095", "n"],
        "VLAN id 4095 is outside 1-4094",
    );
    rejected(
        &lab,
        &[
            "network",
            "create",
            "-d",
            "macvlan",
            "--subnet",
            "10.50.0.0/24",
            "-o",
            "parent=eth0",
            "-o",
            "macvlan_mode=x",
            "n",
        ],
        "invalid macvlan_mode \"x\": use bridge, private, vepa or passthru",
    );
    // Reserved ranges: multicast, "this network", class E, loopback; named, before the kernel.
    for (subnet, what) in [
        ("224.0.0.0/24", "the multicast range"),
        ("239.255.0.0/16", "the multicast range"),
        ("0.0.0.0/8", "\"this network\" range"),
        ("240.0.0.0/24", "class E"),
        ("127.0.0.0/16", "the loopback range"),
    ] {
        rejected(&lab, &["network", "create", "--subnet", subnet, "n"], what);
        rejected(&lab, &["network", "create", "--subnet", "10.50.0.0/24", "--ip-range", subnet, "n"], what);
    }
    // Options: their values, and options of another driver.
    for (opt, expected) in [
        ("com.docker.network.bridge.enable_icc=maybe", "invalid com.docker.network.bridge.enable_icc \"maybe\""),
        ("com.docker.network.bridge.enable_ip_masquerade=2", "use true or false"),
        ("com.docker.network.driver.mtu=64", "an MTU from 68 to 65535"),
        ("com.docker.network.driver.mtu=big", "an MTU from 68 to 65535"),
        ("com.docker.network.bridge.name=this-name-is-too-long", "an interface name of 1 to 15 characters"),
        ("com.docker.network.bridge.name=eth0", "a link named eth0 exists already"),
        ("parent=eth0", "unsupported network option \"parent\" for a bridge network"),
    ] {
        rejected(&lab, &["network", "create", "-o", opt, "n"], expected);
    }
    rejected(
        &lab,
        &["network", "create", "--subnet", "10.50.0.0/24", "--aux-address", "a=10.51.0.1", "n"],
        "--aux-address a=10.51.0.1 is not inside subnet 10.50.0.0/24",
    );
    rejected(
        &lab,
        &["network", "create", "--subnet", "10.50.0.0/24", "--aux-address", "gw=10.50.0.1", "n"],
        "is the gateway",
    );
    rejected(&lab, &["network", "create", "--aux-address", "a=10.50.0.9", "n"], "need --subnet");
    rejected(&lab, &["network", "create", "-d", "host", "n"], "only one instance of the host network");
    rejected(
        &lab,
        &["network", "create", "-o", "com.docker.network.bridge.gateway_mode_ipv4=open", "n"],
        "invalid com.docker.network.bridge.gateway_mode_ipv4 \"open\": use nat, nat-unprotected or routed",
    );
    rejected(&lab, &["network", "create", "-o", "com.example.mtu=9000", "n"], "unsupported network option");
    // Malformed flags are caught by the CLI before any request (clap's usage error, exit 2).
    let out = lab.try_np(&["network", "create", "-o", "novalue", "n"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"novalue\" is not KEY=VALUE"));
    assert!(!lab.np(&["network", "ls", "-q"]).lines().any(|l| l == "n"));
}

#[test]
fn overlapping_subnets_and_duplicate_names_are_refused() {
    let lab = Lab::new("overlap");
    lab.np(&["network", "create", "--subnet", "10.60.0.0/16", "n1"]);
    rejected(&lab, &["network", "create", "--subnet", "10.60.5.0/24", "n2"], "overlaps with network n1 (10.60.0.0/16)");
    rejected(&lab, &["network", "create", "--subnet", "10.0.0.0/8", "n2"], "overlaps with network n1");
    rejected(&lab, &["network", "create", "--subnet", "172.17.3.0/24", "n2"], "overlaps with network bridge");
    // The host's own subnets (its eth0 has 198.51.100.1/24): the bridge would take its address.
    rejected(
        &lab,
        &["network", "create", "--subnet", "198.51.100.0/24", "n2"],
        "overlaps with the host's address 198.51.100.1/24",
    );
    rejected(&lab, &["network", "create", "--subnet", "198.51.100.128/25", "n2"], "overlaps with the host's address");
    // Loopback is refused as a reserved range before any host address is looked at.
    rejected(
        &lab,
        &["network", "create", "--subnet", "127.0.0.0/16", "n2"],
        "overlaps 127.0.0.0/8, the loopback range",
    );
    rejected(&lab, &["network", "create", "--subnet", "10.61.0.0/16", "n1"], "network with name n1 already exists");
    rejected(&lab, &["network", "create", "n1"], "already exists");
    rejected(&lab, &["network", "create", "bridge"], "network with name bridge already exists");

    lab.np(&["run", "-d", "--name", "c", "--network", "n1", "--", "sleep", "600"]);
    rejected(
        &lab,
        &["run", "-d", "--name", "c", "--network", "n1", "--", "sleep", "600"],
        "container name c is already in use",
    );
    rejected(&lab, &["run", "--name", "c", "--", "true"], "already in use");
    let ext = lab.add_ns("ext");
    rejected(&lab, &["attach", "--netns", ext.to_str().unwrap(), "--name", "c", "--network", "n1"], "already in use");
    assert_eq!(lab.links(&ext), ["lo"], "the refused attach did not touch the namespace");
}

#[test]
fn unknown_networks_and_containers_are_named() {
    let lab = Lab::new("unknown");
    lab.np(&["network", "create", "--subnet", "10.62.0.0/24", "n"]);
    lab.np(&["run", "-d", "--name", "c", "--network", "n", "--", "sleep", "600"]);
    rejected(&lab, &["run", "--name", "x", "--network", "nosuch", "--", "true"], "network nosuch not found");
    rejected(
        &lab,
        &["run", "-d", "--name", "x", "--network", "nosuch", "--", "sleep", "1"],
        "network nosuch not found",
    );
    rejected(&lab, &["network", "inspect", "nosuch"], "network nosuch not found");
    rejected(&lab, &["network", "rm", "nosuch"], "network nosuch not found");
    rejected(&lab, &["network", "connect", "nosuch", "c"], "network nosuch not found");
    for args in [
        &["inspect", "ghost"][..],
        &["rm", "ghost"],
        &["rm", "-f", "ghost"],
        &["exec", "ghost", "--", "true"],
        &["stop", "ghost"],
        &["logs", "ghost"],
        &["network", "connect", "n", "ghost"],
        &["network", "disconnect", "n", "ghost"],
    ] {
        rejected(&lab, args, "container ghost not found");
    }
    rejected(&lab, &["network", "disconnect", "bridge", "c"], "container c is not connected to network bridge");
    // One bad name among good ones: the good ones are not half-done.
    rejected(&lab, &["inspect", "c", "ghost"], "container ghost not found");
}

#[test]
fn bad_static_addresses_are_refused() {
    let lab = Lab::new("badip");
    lab.np(&["network", "create", "--subnet", "10.63.0.0/24", "n"]);
    lab.np(&["network", "create", "--subnet", "10.64.0.0/24", "m"]);
    lab.np(&["run", "-d", "--name", "a", "--network", "n", "--ip", "10.63.0.10", "--", "sleep", "600"]);
    assert_eq!(lab.ip_of("a", "n"), "10.63.0.10");
    lab.np(&["run", "-d", "--name", "b", "--network", "m", "--", "sleep", "600"]);

    let run = |ip: &'static str| -> Vec<&'static str> {
        vec!["run", "-d", "--name", "c", "--network", "n", "--ip", ip, "--", "sleep", "600"]
    };
    rejected(&lab, &run("10.99.0.5"), "network n: address 10.99.0.5 is not a usable address of subnet 10.63.0.0/24");
    rejected(&lab, &run("10.63.0.255"), "is not a usable address");
    rejected(&lab, &run("10.63.0.0"), "is not a usable address");
    rejected(&lab, &run("10.63.0.10"), "network n: address 10.63.0.10 is already in use");
    rejected(&lab, &run("10.63.0.1"), "network n: address 10.63.0.1 is the network's gateway");
    rejected(&lab, &run("ten"), "invalid address \"ten\"");
    rejected(
        &lab,
        &["run", "-d", "--name", "c", "--network", "none", "--ip", "10.63.0.20", "--", "sleep", "600"],
        "network none has no IPAM",
    );
    // The same checks on connect.
    rejected(
        &lab,
        &["network", "connect", "--ip", "10.99.0.5", "n", "b"],
        "is not a usable address of subnet 10.63.0.0/24",
    );
    rejected(&lab, &["network", "connect", "--ip", "10.63.0.10", "n", "b"], "already in use");
    rejected(&lab, &["network", "connect", "--ip", "10.63.0.1", "n", "b"], "gateway");
    assert_eq!(container_links(&lab, "b"), ["lo", "eth0"]);
    // A container refused its address does not exist, and the address stays free.
    lab.np(&["run", "-d", "--name", "c", "--network", "n", "--ip", "10.63.0.11", "--", "sleep", "600"]);
    assert_eq!(lab.ip_of("c", "n"), "10.63.0.11");
}

#[test]
fn networks_in_use_and_builtin_networks_cannot_be_removed() {
    let lab = Lab::new("rmnet");
    lab.np(&["network", "create", "--subnet", "10.65.0.0/24", "n"]);
    lab.np(&["run", "-d", "--name", "c", "--network", "n", "--", "sleep", "600"]);
    lab.np(&["run", "--name", "done", "--network", "n", "--", "true"]);
    rejected(&lab, &["network", "rm", "n"], "network n is in use by container(s): c, done");
    for b in ["bridge", "host", "none"] {
        rejected(&lab, &["network", "rm", b], &format!("{b} is a pre-defined network and cannot be removed"));
    }
    // A running container cannot be removed without -f.
    rejected(&lab, &["rm", "c"], "container c is running: stop it first or use rm -f");
    // With the users gone, the network goes (and its bridge with it).
    let bridge = lab.inspect_network("n")["Options"]["com.docker.network.bridge.name"].as_str().unwrap().to_string();
    lab.np(&["rm", "-f", "c", "done"]);
    lab.np(&["network", "rm", "n"]);
    assert!(!lab.links(&lab.host_ns).contains(&bridge));
}

#[test]
fn invalid_names_are_refused() {
    let lab = Lab::new("badname");
    for name in ["bad name!", ".hidden", "", &"x".repeat(65), "a/b"] {
        rejected(&lab, &["network", "create", name], "invalid network name");
        rejected(&lab, &["run", "--name", name, "--", "true"], "invalid container name");
    }
    let ext = lab.add_ns("ext");
    rejected(&lab, &["attach", "--netns", ext.to_str().unwrap(), "--name", "bad name!"], "invalid container name");
    // attach of something that is not a namespace.
    let plain = lab.dir.join("plain-file");
    std::fs::write(&plain, b"").unwrap();
    rejected(&lab, &["attach", "--netns", plain.to_str().unwrap(), "--name", "x"], "is not a network namespace");
    rejected(&lab, &["attach", "--netns", "/nonexistent/ns", "--name", "x"], "--netns /nonexistent/ns");
    rejected(
        &lab,
        &["attach", "--netns", ext.to_str().unwrap(), "--name", "x", "--network", "host"],
        "cannot be used with --netns",
    );
    assert_eq!(lab.links(&ext), ["lo"]);
}

#[test]
fn a_socket_nobody_listens_on_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("netpath-nobody-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // A path that does not exist, then a stale socket file nobody listens on.
    let missing = dir.join("nobody.sock");
    let stale = dir.join("stale.sock");
    for sock in [&missing, &stale] {
        if sock == &stale {
            std::fs::create_dir_all(&dir).unwrap();
            drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        }
        let out = Command::new(netpath_bin()).arg("--socket").arg(sock).args(["network", "ls"]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
        assert!(stderr.contains("cannot connect to the netpath daemon"), "{stderr}");
        assert!(stderr.contains(&sock.display().to_string()), "the message names the socket: {stderr}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Sends one raw HTTP request to the daemon's socket; returns (status code, body).
fn raw_request(lab: &Lab, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = UnixStream::connect(&lab.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: netpath\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or_else(|| panic!("not HTTP: {resp:?}"));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("{head}"));
    (status, body.to_string())
}

#[test]
fn malformed_api_bodies_get_400_with_a_json_message() {
    let lab = Lab::new("badbody");
    lab.np(&["network", "create", "--subnet", "10.66.0.0/24", "n"]);
    lab.np(&["run", "-d", "--name", "c", "--network", "n", "--", "sleep", "600"]);
    let before = snapshot(&lab);
    for (method, path, body, expected) in [
        ("POST", "/networks", r#"{"nam": 1}"#, "unknown field `nam`"),
        ("POST", "/networks", r#"{"name": 1}"#, "invalid type"),
        ("POST", "/networks", "not json", "invalid request body"),
        ("POST", "/networks", "", "invalid request body"),
        ("POST", "/containers", r#"{"name": "x"}"#, "missing field `cmd`"),
        ("POST", "/networks/n/connect", r#"{"container": "c", "ip": 5}"#, "invalid type"),
        ("POST", "/networks/n/disconnect", "[]", "invalid request body"),
    ] {
        let (status, resp) = raw_request(&lab, method, path, body);
        assert_eq!(status, 400, "{method} {path} {body:?}: {resp}");
        let v: serde_json::Value =
            serde_json::from_str(&resp).unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {resp}"));
        let msg = v["message"].as_str().unwrap_or_else(|| panic!("no message: {v}"));
        assert!(msg.starts_with("invalid request body"), "{msg}");
        assert!(msg.contains(expected), "{method} {path} {body:?}: {msg}");
    }
    // Domain errors come back as JSON too, with their own status.
    let (status, resp) = raw_request(&lab, "POST", "/networks", r#"{"name": "n"}"#);
    assert_eq!(status, 409, "{resp}");
    assert!(
        serde_json::from_str::<serde_json::Value>(&resp).unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("already exists")
    );
    let (status, resp) = raw_request(&lab, "GET", "/containers/ghost", "");
    assert_eq!(status, 404, "{resp}");
    assert_eq!(snapshot(&lab), before);
    // The daemon still serves normal requests.
    lab.np(&["network", "create", "--subnet", "10.67.0.0/24", "m"]);
}
