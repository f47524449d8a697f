//! The firewall end to end: `netpath firewall add/ls/rm` against real clients in the lab —
//! two outside clients on one published port, one admitted by its prefix and one dropped; a
//! deny added under a running connection cuts it; a default-deny network with an explicit
//! allow; `run --ingress-allow`; the flow log naming the rule; rules kept across a restart;
//! bad rules refused with nothing changed; `--keep-host-firewall` letting the host's own
//! FORWARD rules (iptables in the lab's host namespace) see published flows.

mod common;

use std::io::{BufRead, Write};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use netpath_tests::{CLIENT_IP, DaemonOpts, HOST_ETH0_IP, Lab, in_ns, must};
use serde_json::Value;

/// A second outside client: another address of the client namespace.
const FAR_CLIENT: &str = "198.51.100.9";

fn add_far_client(lab: &Lab) {
    must(in_ns(&lab.client_ns, "ip", &["addr", "add", &format!("{FAR_CLIENT}/24"), "dev", "eth0"]));
}

/// TCP from the client namespace with source address `from`: what the server answered, or
/// None when the connection failed.
fn try_from(lab: &Lab, from: &str, ip: &str, port: u16) -> Option<String> {
    let cmd = format!("socat -t 5 - TCP:{ip}:{port},connect-timeout=3,bind={from} </dev/null");
    let out = in_ns(&lab.client_ns, "sh", &["-c", &cmd]).output().unwrap();
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The echo server at ip:7 asked from container `from`: the answer, or None if it failed.
fn try_echo(lab: &Lab, from: &str, ip: &str) -> Option<String> {
    let cmd = format!("printf hi | socat -t 5 - TCP:{ip}:7,connect-timeout=3");
    let out = lab.try_np(&["exec", from, "--", "sh", "-c", &cmd]);
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn drops(lab: &Lab, reason: &str) -> u64 {
    let v: Value = serde_json::from_str(&lab.np(&["system", "datapath"])).unwrap();
    v["drops"][reason].as_u64().unwrap_or_else(|| panic!("no drop counter {reason} in {v}"))
}

fn rules(lab: &Lab) -> Vec<Value> {
    lab.np(&["firewall", "ls", "--format", "json"]).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn rule_names(lab: &Lab) -> Vec<String> {
    rules(lab).iter().map(|r| r["Name"].as_str().unwrap().to_string()).collect()
}

#[test]
fn a_prefix_admits_one_outside_client_and_the_flow_log_names_the_rule_that_drops_another() {
    let lab = Lab::new("fw-prefix");
    add_far_client(&lab);
    common::whoami_server_with(&lab, "web", &["-p", "8080:8"]);
    assert_eq!(try_from(&lab, FAR_CLIENT, HOST_ETH0_IP, 8080).as_deref(), Some(FAR_CLIENT), "default allow");

    lab.np(&["firewall", "add", "--name", "lan", "--allow", "--from", "198.51.100.0/29", "--to-container", "web"]);
    lab.np(&["firewall", "add", "--name", "others", "--deny", "--to-container", "web", "--priority", "2000"]);
    let table = lab.np(&["firewall", "ls"]);
    assert!(table.lines().next().unwrap().starts_with("NAME"), "{table}");
    assert_eq!(rule_names(&lab), ["lan", "others"], "in evaluation order");

    let mut follow = lab.np_cmd(&["system", "flows", "--follow", "--json"]).stdout(Stdio::piped()).spawn().unwrap();
    let out = follow.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500)); // the follower is connected

    assert_eq!(try_from(&lab, CLIENT_IP, HOST_ETH0_IP, 8080).as_deref(), Some(CLIENT_IP), "inside the prefix");
    let before = drops(&lab, "policy-denied");
    assert_eq!(try_from(&lab, FAR_CLIENT, HOST_ETH0_IP, 8080), None, "outside it: dropped");
    assert!(drops(&lab, "policy-denied") > before);

    let deadline = Instant::now() + Duration::from_secs(10);
    let drop = loop {
        let l = lines.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("a drop event");
        let v: Value = serde_json::from_str(&l).unwrap();
        if v["event"] == "drop" && v["reason"] == "policy-denied" {
            break v;
        }
    };
    let _ = follow.kill();
    let _ = follow.wait();
    assert_eq!(drop["rule"], "others", "{drop}");
    assert!(drop["src"].as_str().unwrap().starts_with(FAR_CLIENT), "{drop}");

    // Removing the deny lets the far client in again.
    lab.np(&["firewall", "rm", "others"]);
    assert_eq!(try_from(&lab, FAR_CLIENT, HOST_ETH0_IP, 8080).as_deref(), Some(FAR_CLIENT));
}

#[test]
fn a_deny_added_while_a_connection_runs_cuts_it() {
    let lab = Lab::new("fw-cut");
    lab.np(&["run", "-d", "--name", "echo", "-p", "8080:7", "--", "socat", "TCP-LISTEN:7,fork,reuseaddr", "EXEC:cat"]);
    common::wait_listening(&lab, "echo", 7);
    let mut conn = in_ns(&lab.client_ns, "socat", &["-", &format!("TCP:{HOST_ETH0_IP}:8080,connect-timeout=5")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = conn.stdin.take().unwrap();
    let out = conn.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    writeln!(stdin, "before").unwrap();
    assert_eq!(lines.recv_timeout(Duration::from_secs(10)).unwrap(), "before", "the connection works");

    lab.np(&["firewall", "add", "--name", "cut", "--deny", "--from", CLIENT_IP, "--port", "7", "--proto", "tcp"]);
    let flows = lab.np(&["system", "flows"]);
    assert!(!flows.contains(&format!("\"{CLIENT_IP}")), "its conntrack entries went:\n{flows}");
    let _ = writeln!(stdin, "after");
    assert!(lines.recv_timeout(Duration::from_secs(3)).is_err(), "nothing gets through any more");
    let _ = conn.kill();
    let _ = conn.wait();
}

#[test]
fn a_default_deny_network_admits_only_what_a_rule_allows() {
    let lab = Lab::new("fw-dd");
    lab.np(&["network", "create", "--subnet", "10.77.0.0/24", "-o", "netpath.default_deny=true", "dd"]);
    common::echo_server(&lab, "srv", "dd");
    for (name, ip) in [("friend", "10.77.0.10"), ("stranger", "10.77.0.11")] {
        lab.np(&["run", "-d", "--name", name, "--network", "dd", "--ip", ip, "--", "sleep", "600"]);
    }
    let srv = lab.ip_of("srv", "dd");
    assert_eq!(try_echo(&lab, "friend", &srv), None, "nothing is allowed by default");
    lab.np(&["firewall", "add", "--allow", "--from", "10.77.0.10", "--to-container", "srv", "--port", "7"]);
    assert_eq!(try_echo(&lab, "friend", &srv).as_deref(), Some("hi"));
    assert_eq!(try_echo(&lab, "stranger", &srv), None);
    let v = lab.inspect_network("dd");
    assert_eq!(v["Options"]["netpath.default_deny"], "true", "{v}");
}

#[test]
fn ingress_allow_admits_only_the_listed_sources() {
    let lab = Lab::new("fw-ingress");
    lab.np(&["network", "create", "--subnet", "10.78.0.0/24", "n"]);
    // a also serves (port 9): srv's own connections out must get their answers.
    let pong = ["socat", "TCP-LISTEN:9,fork,reuseaddr", "SYSTEM:echo pong"];
    lab.np(&[&["run", "-d", "--name", "a", "--network", "n", "--ip", "10.78.0.10", "--"][..], &pong[..]].concat());
    lab.np(&["run", "-d", "--name", "b", "--network", "n", "--ip", "10.78.0.11", "--", "sleep", "600"]);
    lab.np(&[
        "run",
        "-d",
        "--name",
        "srv",
        "--network",
        "n",
        "-p",
        "8081:7",
        "--ingress-allow",
        "10.78.0.10:7",
        "--",
        "socat",
        "TCP-LISTEN:7,fork,reuseaddr",
        "EXEC:cat",
    ]);
    common::wait_listening(&lab, "srv", 7);
    let srv = lab.ip_of("srv", "n");
    assert_eq!(try_echo(&lab, "a", &srv).as_deref(), Some("hi"));
    assert_eq!(try_echo(&lab, "b", &srv), None, "a neighbour not listed");
    assert_eq!(try_from(&lab, CLIENT_IP, HOST_ETH0_IP, 8081), None, "the outside not listed either");
    // srv's own connections out are its business: a's answers reach it.
    common::wait_listening(&lab, "a", 9);
    let out = lab.np(&["exec", "srv", "--", "sh", "-c", "socat -t 5 - TCP:10.78.0.10:9,connect-timeout=3 </dev/null"]);
    assert_eq!(out.trim(), "pong");
    let bad = lab.np_fails(&["run", "--name", "x", "--ingress-allow", "10.0.0.0/33", "--", "true"]);
    assert!(bad.contains("--ingress-allow"), "{bad}");
}

#[test]
fn rules_survive_a_restart() {
    let mut lab = Lab::new("fw-restart");
    add_far_client(&lab);
    common::whoami_server_with(&lab, "web", &["-p", "8080:8"]);
    lab.np(&["firewall", "add", "--name", "far", "--deny", "--from", FAR_CLIENT, "--to-container", "web"]);
    let before = rules(&lab);
    lab.restart_daemon();
    assert_eq!(rules(&lab), before);
    assert_eq!(try_from(&lab, FAR_CLIENT, HOST_ETH0_IP, 8080), None);
    assert_eq!(try_from(&lab, CLIENT_IP, HOST_ETH0_IP, 8080).as_deref(), Some(CLIENT_IP));
}

#[test]
fn bad_rules_are_refused_and_change_nothing() {
    let lab = Lab::new("fw-bad");
    lab.np(&["run", "-d", "--name", "web", "--", "sleep", "600"]);
    lab.np(&["firewall", "add", "--name", "keep", "--deny", "--from", "192.0.2.0/24"]);
    let files = || std::fs::read_dir(lab.state_dir.join("db/firewall")).unwrap().count();
    assert_eq!(files(), 1);
    for (args, says) in [
        (vec!["--deny", "--from", "10.0.0.0/33"], "invalid --from"),
        (vec!["--deny", "--from", "10.0.0.1/8"], "10.0.0.0/8"),
        (vec!["--deny", "--to-container", "nope"], "container nope not found"),
        (vec!["--deny", "--to-network", "nope"], "network nope not found"),
        (vec!["--deny", "--port", "0"], "1 to 65535"),
        (vec!["--deny", "--port", "90-80"], "ends before"),
        (vec!["--deny", "--proto", "sctp"], "invalid --proto"),
        (vec!["--deny", "--proto", "icmp", "--port", "1"], "ICMP has no ports"),
        (vec!["--deny", "--priority", "-1"], "invalid --priority"),
        (vec!["--name", "keep", "--allow"], "exists already"),
        (vec!["--name", "bad name", "--allow"], "invalid firewall rule name"),
        (vec!["--allow", "--deny"], "cannot be used with"),
    ] {
        let mut a = vec!["firewall", "add"];
        a.extend(args.iter());
        let err = lab.np_fails(&a);
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let err = lab.np_fails(&["firewall", "rm", "nope"]);
    assert!(err.contains("firewall rule nope not found"), "{err}");
    assert_eq!(rule_names(&lab), ["keep"]);
    assert_eq!(files(), 1);
}

#[test]
fn keep_host_firewall_lets_the_hosts_own_forward_rules_see_published_flows() {
    let mut lab = Lab::new("fw-keep");
    common::whoami_server_with(&lab, "web", &["-p", "8080:8"]);
    // The user's own rule in the host namespace's FORWARD chain.
    must(lab.host("iptables", &["-w", "-I", "FORWARD", "-s", CLIENT_IP, "-p", "tcp", "-j", "DROP"]));
    assert_eq!(
        try_from(&lab, CLIENT_IP, HOST_ETH0_IP, 8080).as_deref(),
        Some(CLIENT_IP),
        "by default the fast path hands the flow to the container's veth, past FORWARD"
    );
    lab.stop_daemon();
    lab.start_daemon_with(&DaemonOpts { args: vec!["--keep-host-firewall".into()], ..Default::default() });
    assert_eq!(try_from(&lab, CLIENT_IP, HOST_ETH0_IP, 8080), None, "with the flag FORWARD sees it, and drops it");
    must(lab.host("iptables", &["-w", "-D", "FORWARD", "-s", CLIENT_IP, "-p", "tcp", "-j", "DROP"]));
    assert_eq!(try_from(&lab, CLIENT_IP, HOST_ETH0_IP, 8080).as_deref(), Some(CLIENT_IP), "and lets it by");
}
