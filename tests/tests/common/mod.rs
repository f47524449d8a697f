//! Helpers shared by the end-to-end test files (each file uses a subset).
#![allow(dead_code)]

use std::path::Path;

use netpath_tests::{Lab, in_ns, must};

/// Port of the TCP echo server started by [`echo_server`].
pub const ECHO_PORT: u16 = 7;
/// Port of the server started by [`whoami_server`]: it answers with the client's address.
pub const WHOAMI_PORT: u16 = 8;

/// Sends `msg` to the TCP echo server at ip:7 from inside `container` and returns the answer.
pub fn echo(lab: &Lab, container: &str, ip: &str, msg: &str) -> String {
    lab.np(&[
        "exec",
        container,
        "--",
        "sh",
        "-c",
        &format!("printf '{msg}' | socat -t 10 - TCP:{ip}:{ECHO_PORT},connect-timeout=5"),
    ])
}

/// The same as [`echo`], from a namespace that is not a container.
pub fn echo_from_ns(ns: &Path, ip: &str, msg: &str) -> String {
    must(in_ns(ns, "sh", &["-c", &format!("printf '{msg}' | socat -t 10 - TCP:{ip}:{ECHO_PORT},connect-timeout=5")]))
}

/// Starts a detached container running a TCP echo server on port 7 and waits until it listens.
pub fn echo_server(lab: &Lab, name: &str, network: &str) {
    lab.np(&[
        "run",
        "-d",
        "--name",
        name,
        "--network",
        network,
        "--",
        "socat",
        &format!("TCP-LISTEN:{ECHO_PORT},fork,reuseaddr"),
        "EXEC:cat",
    ]);
    wait_listening(lab, name, ECHO_PORT);
}

/// Starts a detached container whose server on port 8 answers each connection with the
/// client's address as it sees it, and waits until it listens.
pub fn whoami_server(lab: &Lab, name: &str, network: &str) {
    whoami_server_with(lab, name, &["--network", network]);
}

/// [`whoami_server`] with any extra `run` flags (network, published ports, ...).
pub fn whoami_server_with(lab: &Lab, name: &str, flags: &[&str]) {
    let listen = format!("TCP-LISTEN:{WHOAMI_PORT},fork,reuseaddr");
    let mut args = vec!["run", "-d", "--name", name];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--", "socat", &listen, "SYSTEM:echo $SOCAT_PEERADDR"]);
    lab.np(&args);
    wait_listening(lab, name, WHOAMI_PORT);
}

/// Asks the whoami server at ip:8 from inside `container`: the source address it saw.
pub fn whoami(lab: &Lab, container: &str, ip: &str) -> String {
    lab.np(&[
        "exec",
        container,
        "--",
        "sh",
        "-c",
        &format!("socat -t 10 - TCP:{ip}:{WHOAMI_PORT},connect-timeout=5 </dev/null"),
    ])
    .trim()
    .to_string()
}

/// Waits (bounded) until a TCP port listens inside a container (servers start asynchronously).
pub fn wait_listening(lab: &Lab, container: &str, port: u16) {
    for _ in 0..100 {
        let out = lab.np(&["exec", container, "--", "ss", "-Hltn", &format!("sport = :{port}")]);
        if !out.trim().is_empty() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("{container} never listened on {port}");
}

/// Interface names in the output of `ip -o link`.
pub fn link_names(ip_o_link: &str) -> Vec<String> {
    ip_o_link
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap().to_string())
        .collect()
}

/// Interface names inside a container, as its own processes see them.
pub fn container_links(lab: &Lab, container: &str) -> Vec<String> {
    link_names(&lab.np(&["exec", container, "--", "ip", "-o", "link"]))
}

/// The IPv4 addresses (with prefix) on `dev` inside a container, from `ip -o -4 addr`.
pub fn container_addrs(lab: &Lab, container: &str, dev: &str) -> Vec<String> {
    addrs(&lab.np(&["exec", container, "--", "ip", "-o", "-4", "addr", "show", "dev", dev]))
}

/// The `inet a.b.c.d/n` entries of `ip -o -4 addr` output.
pub fn addrs(ip_o_addr: &str) -> Vec<String> {
    ip_o_addr
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.find(|x| *x == "inet")?;
            w.next().map(str::to_string)
        })
        .collect()
}

/// Names of the containers a network's inspect lists.
pub fn network_members(lab: &Lab, network: &str) -> Vec<String> {
    let mut v: Vec<String> =
        lab.inspect_network(network)["Containers"].as_object().expect("Containers").keys().cloned().collect();
    v.sort();
    v
}

/// One counter of a container's endpoint on a network, from `inspect`.
pub fn counter(lab: &Lab, container: &str, network: &str, key: &str) -> u64 {
    let c = &lab.inspect(container)["NetworkSettings"]["Networks"][network]["Counters"];
    c[key].as_u64().unwrap_or_else(|| panic!("{container}/{network}: no counter {key}: {c}"))
}
