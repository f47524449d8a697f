//! Bridge network options with Docker's names, end to end: `--internal`, `enable_icc=false`,
//! `enable_ip_masquerade=false`, `driver.mtu`, `bridge.name`, `--label`, and `network prune`.
//! The client namespace plays the outside, behind the host's uplink eth0.

mod common;

use std::process::{Child, Stdio};

use common::*;
use netpath_tests::{CLIENT_IP, HOST_ETH0_IP, Lab, in_ns, must};

/// A TCP server in the client namespace answering with the peer address it sees.
fn outside_whoami(lab: &Lab, port: u16) -> Child {
    let c =
        in_ns(&lab.client_ns, "socat", &[&format!("TCP-LISTEN:{port},fork,reuseaddr"), "SYSTEM:echo $SOCAT_PEERADDR"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
    for _ in 0..100 {
        if !must(in_ns(&lab.client_ns, "ss", &["-Hltn", &format!("sport = :{port}")])).trim().is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(30));
    }
    c
}

/// TCP from inside a container that must not get through.
fn blocked(lab: &Lab, ctr: &str, ip: &str, port: u16) -> bool {
    let cmd = format!("socat -t 2 - TCP:{ip}:{port},connect-timeout=2 </dev/null");
    !lab.try_np(&["exec", ctr, "--", "sh", "-c", &cmd]).status.success()
}

fn drops(lab: &Lab, reason: &str) -> u64 {
    let counters: serde_json::Value = serde_json::from_str(&lab.np(&["system", "datapath"])).unwrap();
    counters["drops"][reason].as_u64().unwrap_or_else(|| panic!("no drop reason {reason}: {counters}"))
}

#[test]
fn an_internal_network_talks_within_itself_and_nowhere_else() {
    let lab = Lab::new("internal");
    lab.np(&["network", "create", "--internal", "--subnet", "10.71.0.0/24", "int"]);
    assert_eq!(lab.inspect_network("int")["Internal"], true);
    echo_server(&lab, "srv", "int");
    lab.np(&["run", "-d", "--name", "c", "--network", "int", "--", "sleep", "600"]);
    let srv = lab.ip_of("srv", "int");
    // In-network traffic flows.
    assert_eq!(echo(&lab, "c", &srv, "inside"), "inside");
    // No egress: not the outside, not the host's uplink address; counted as `internal`.
    let mut out = outside_whoami(&lab, 9000);
    let before = drops(&lab, "internal");
    assert!(blocked(&lab, "c", CLIENT_IP, 9000), "reached the outside");
    assert!(blocked(&lab, "c", HOST_ETH0_IP, 22), "reached the host's uplink address");
    let _ = out.kill();
    let _ = out.wait();
    assert!(drops(&lab, "internal") > before);
    // Nothing in: a neighbour routing to the subnet gets nowhere.
    must(in_ns(&lab.client_ns, "ip", &["route", "add", "10.71.0.0/24", "via", HOST_ETH0_IP]));
    let cmd = format!("socat -t 2 - TCP:{srv}:{ECHO_PORT},connect-timeout=2 </dev/null");
    assert!(!in_ns(&lab.client_ns, "sh", &["-c", &cmd]).output().unwrap().status.success());
    // No published port either.
    let err = lab.np_fails(&["run", "-d", "--name", "p", "--network", "int", "-p", "8080:80", "--", "sleep", "1"]);
    assert!(err.contains("ports cannot be published on internal network int"), "{err}");
    // Other networks are untouched.
    let mut out = outside_whoami(&lab, 9001);
    lab.np(&["run", "-d", "--name", "free", "--", "sleep", "600"]);
    let seen = lab.np(&[
        "exec",
        "free",
        "--",
        "sh",
        "-c",
        &format!("socat -t 10 - TCP:{CLIENT_IP}:9001,connect-timeout=5 </dev/null"),
    ]);
    let _ = out.kill();
    let _ = out.wait();
    assert_eq!(seen.trim(), HOST_ETH0_IP);
}

#[test]
fn without_icc_containers_reach_each_other_only_through_published_ports() {
    let lab = Lab::new("noicc");
    lab.np(&["network", "create", "--subnet", "10.72.0.0/24", "-o", "com.docker.network.bridge.enable_icc=false", "n"]);
    assert_eq!(lab.inspect_network("n")["Options"]["com.docker.network.bridge.enable_icc"], "false");
    whoami_server_with(&lab, "web", &["--network", "n", "-p", "8088:8"]);
    lab.np(&["run", "-d", "--name", "c", "--network", "n", "--", "sleep", "600"]);
    let web = lab.ip_of("web", "n");
    let c = lab.ip_of("c", "n");
    let before = drops(&lab, "isolation");
    assert!(blocked(&lab, "c", &web, WHOAMI_PORT), "c reached web directly");
    assert!(drops(&lab, "isolation") > before);
    // The published port works, from the container (through the host's address or the
    // gateway's) and from outside; the gateway answers pings.
    assert_eq!(whoami_via(&lab, "c", HOST_ETH0_IP, 8088), c);
    assert_eq!(whoami_via(&lab, "c", "10.72.0.1", 8088), c);
    let seen = must(in_ns(
        &lab.client_ns,
        "sh",
        &["-c", &format!("socat -t 10 - TCP:{HOST_ETH0_IP}:8088,connect-timeout=5 </dev/null")],
    ));
    assert_eq!(seen.trim(), CLIENT_IP);
    lab.np(&["exec", "c", "--", "ping", "-c", "1", "-W", "2", "10.72.0.1"]);
}

fn whoami_via(lab: &Lab, ctr: &str, ip: &str, port: u16) -> String {
    let cmd = format!("socat -t 10 - TCP:{ip}:{port},connect-timeout=5 </dev/null");
    lab.np(&["exec", ctr, "--", "sh", "-c", &cmd]).trim().to_string()
}

#[test]
fn without_masquerade_traffic_leaves_with_the_containers_address() {
    let lab = Lab::new("nomasq");
    lab.np(&[
        "network",
        "create",
        "--subnet",
        "10.73.0.0/24",
        "-o",
        "com.docker.network.bridge.enable_ip_masquerade=false",
        "n",
    ]);
    // The outside routes the subnet back through the host (as a real router would have to).
    must(in_ns(&lab.client_ns, "ip", &["route", "add", "10.73.0.0/24", "via", HOST_ETH0_IP]));
    let mut out = outside_whoami(&lab, 9002);
    lab.np(&["run", "-d", "--name", "c", "--network", "n", "--", "sleep", "600"]);
    let seen = lab.np(&[
        "exec",
        "c",
        "--",
        "sh",
        "-c",
        &format!("socat -t 10 - TCP:{CLIENT_IP}:9002,connect-timeout=5 </dev/null"),
    ]);
    let _ = out.kill();
    let _ = out.wait();
    assert_eq!(seen.trim(), lab.ip_of("c", "n"));
}

#[test]
fn mtu_bridge_name_and_labels_show_where_a_user_looks() {
    let lab = Lab::new("bropts");
    lab.np(&[
        "network",
        "create",
        "--subnet",
        "10.74.0.0/24",
        "-o",
        "com.docker.network.driver.mtu=1400",
        "-o",
        "com.docker.network.bridge.name=br-lab",
        "--label",
        "env=test",
        "--label",
        "team=net",
        "n",
    ]);
    let v = lab.inspect_network("n");
    assert_eq!(v["Labels"], serde_json::json!({ "env": "test", "team": "net" }), "{v}");
    assert_eq!(v["Options"]["com.docker.network.bridge.name"], "br-lab");
    assert_eq!(v["Options"]["com.docker.network.driver.mtu"], "1400");
    let br = must(lab.host("ip", &["-o", "link", "show", "br-lab"]));
    assert!(br.contains("mtu 1400"), "{br}");
    echo_server(&lab, "srv", "n");
    lab.np(&["run", "-d", "--name", "c", "--network", "n", "--", "sleep", "600"]);
    // Inside the container, and on its host-side veth.
    let eth0 = lab.np(&["exec", "c", "--", "ip", "-o", "link", "show", "eth0"]);
    assert!(eth0.contains("mtu 1400"), "{eth0}");
    let veth = lab.inspect("c")["NetworkSettings"]["Networks"]["n"]["HostInterface"].as_str().unwrap().to_string();
    assert!(must(lab.host("ip", &["-o", "link", "show", &veth])).contains("mtu 1400"));
    assert_eq!(echo(&lab, "c", &lab.ip_of("srv", "n"), "small-frames"), "small-frames");
    // The name is taken while the network lives, and free again after.
    let err = lab.np_fails(&["network", "create", "-o", "com.docker.network.bridge.name=br-lab", "m"]);
    assert!(err.contains("br-lab"), "{err}");
    lab.np(&["rm", "-f", "srv", "c"]);
    lab.np(&["network", "rm", "n"]);
    assert!(!lab.links(&lab.host_ns).contains(&"br-lab".to_string()));
    // It survives a restart under its own name (the reconcile finds it by that name).
    lab.np(&["network", "create", "-o", "com.docker.network.bridge.name=br-lab", "m"]);
    let mut lab = lab;
    lab.restart_daemon();
    assert!(lab.links(&lab.host_ns).contains(&"br-lab".to_string()));
    lab.np(&["run", "-d", "--name", "after", "--network", "m", "--", "sleep", "600"]);
    lab.np(&["rm", "-f", "after"]);
    lab.np(&["network", "rm", "m"]);
    assert!(!lab.links(&lab.host_ns).contains(&"br-lab".to_string()));
}

#[test]
fn prune_removes_the_unused_user_networks_only() {
    let lab = Lab::new("prune");
    lab.np(&["network", "create", "--subnet", "10.75.1.0/24", "idle1"]);
    lab.np(&["network", "create", "--subnet", "10.75.2.0/24", "idle2"]);
    lab.np(&["network", "create", "--subnet", "10.75.3.0/24", "busy"]);
    lab.np(&["run", "-d", "--name", "c", "--network", "busy", "--", "sleep", "600"]);
    let host_links = lab.links(&lab.host_ns);
    let out = lab.np(&["network", "prune", "-f"]);
    assert_eq!(out, "Deleted Networks:\nidle1\nidle2\n");
    let mut left: Vec<String> = lab.np(&["network", "ls", "-q"]).lines().map(String::from).collect();
    left.sort();
    assert_eq!(left, ["bridge", "busy", "host", "none"]);
    assert_eq!(lab.links(&lab.host_ns).len(), host_links.len() - 2, "their bridges are gone");
    assert_eq!(lab.np(&["network", "prune"]), "", "nothing left to prune");
}
