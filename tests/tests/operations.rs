//! Operations: a daemon killed at any point of any change leaves a state the next start
//! reconciles (nothing leaked, nothing handed out twice); many clients at once end
//! consistent; uplinks follow the host's interfaces; a host without cgroup2 keeps host-local
//! access.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};

use common::*;
use netpath::daemon::crash::POINTS;
use netpath_tests::{DaemonOpts, Lab, in_ns, must};
use serde_json::Value;

/// Names of every container, from `ps -a`.
fn container_names(lab: &Lab) -> Vec<String> {
    lab.np(&["ps", "-a"]).lines().skip(1).filter_map(|l| l.split_whitespace().nth(1)).map(str::to_string).collect()
}

/// True for the names netpath gives the host ends of its veths.
fn own_veth(name: &str) -> bool {
    name.strip_prefix("veth").is_some_and(|h| h.len() == 8 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// What the daemon reports and what the kernel holds agree: every container's veths and
/// namespace exist and nothing else of netpath's does; no address is held twice; the
/// datapath knows exactly the containers' addresses and published ports.
fn assert_consistent(lab: &Lab) {
    let names = container_names(lab);
    let mut veths = BTreeSet::new();
    let mut sandboxes = BTreeSet::new();
    let mut ips: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let (mut n_ips, mut n_ports) = (0, 0);
    for n in &names {
        let v = lab.inspect(n);
        let key = v["NetworkSettings"]["SandboxKey"].as_str().unwrap().to_string();
        assert!(netpath::netlink::netns::is_mounted(std::path::Path::new(&key)), "{n}: namespace {key} not mounted");
        sandboxes.insert(std::path::Path::new(&key).file_name().unwrap().to_string_lossy().into_owned());
        for (net, e) in v["NetworkSettings"]["Networks"].as_object().unwrap() {
            if let Some(h) = e["HostInterface"].as_str() {
                assert!(veths.insert(h.to_string()), "{n}: veth {h} twice");
            }
            let ip = e["IPAddress"].as_str().unwrap_or_default();
            if !ip.is_empty() {
                assert!(ips.entry(net.clone()).or_default().insert(ip.to_string()), "{ip} handed out twice on {net}");
                n_ips += 1;
            }
        }
        n_ports += v["NetworkSettings"]["Ports"]
            .as_object()
            .map_or(0, |p| p.values().map(|b| b.as_array().unwrap().len()).sum());
    }
    let host_veths: BTreeSet<String> = lab.links(&lab.host_ns).into_iter().filter(|l| own_veth(l)).collect();
    assert_eq!(host_veths, veths, "veths in the host vs containers' endpoints");
    let files: BTreeSet<String> = std::fs::read_dir(lab.state_dir.join("netns"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files, sandboxes, "namespace files vs containers");
    let bridges: BTreeSet<String> =
        lab.links(&lab.host_ns).into_iter().filter(|l| l.starts_with("np-") || l == "netpath0").collect();
    let nets: BTreeSet<String> = lab
        .np(&["network", "ls", "-q"])
        .lines()
        .filter_map(|n| {
            lab.inspect_network(n)["Options"]["com.docker.network.bridge.name"].as_str().map(str::to_string)
        })
        .collect();
    assert_eq!(bridges, nets, "bridges vs networks");
    let dp: Value = serde_json::from_str(&lab.np(&["system", "datapath"])).unwrap();
    assert_eq!(dp["endpoints"], n_ips, "datapath endpoints vs container addresses: {dp}");
    assert_eq!(dp["published_ports"], n_ports, "datapath published ports vs containers': {dp}");
}

/// Removes every container and user network, then checks nothing of them is left.
fn assert_cleans_up(lab: &Lab) {
    let names = container_names(lab);
    if !names.is_empty() {
        let mut args = vec!["rm", "-f"];
        args.extend(names.iter().map(String::as_str));
        lab.np(&args);
    }
    for n in lab.np(&["network", "ls", "-q"]).lines() {
        if !["bridge", "host", "none"].contains(&n) {
            lab.np(&["network", "rm", n]);
        }
    }
    assert_consistent(lab);
    assert!(container_names(lab).is_empty());
    assert!(
        lab.links(&lab.host_ns).iter().all(|l| !own_veth(l) && !l.starts_with("np-")),
        "{:?}",
        lab.links(&lab.host_ns)
    );
}

/// One crash point: the setup that leads to it, the request that reaches it, what must hold
/// after the next start.
fn crash_at(point: &str) {
    let mut lab = Lab::new(&format!("crash-{}", point.replace(':', "-")));
    // The setup runs on a daemon that is not armed, then one armed for `point` takes over.
    lab.np(&["network", "create", "--subnet", "10.71.0.0/24", "n"]);
    let op = point.split(':').next().unwrap();
    if op != "run" && op != "network-rm" {
        lab.np(&["run", "-d", "--name", "victim", "--network", "n", "-p", "8080:80", "--", "sleep", "600"]);
    }
    if op == "connect" || op == "disconnect" {
        lab.np(&["network", "create", "--subnet", "10.72.0.0/24", "n2"]);
    }
    if op == "disconnect" {
        lab.np(&["network", "connect", "n2", "victim"]);
    }
    lab.stop_daemon();
    lab.start_daemon_with(&DaemonOpts { env: vec![("NETPATH_CRASH_AT".into(), point.into())], ..Default::default() });
    let req: Vec<&str> = match op {
        "run" => vec!["run", "-d", "--name", "victim", "--network", "n", "-p", "8080:80", "--", "sleep", "600"],
        "rm" => vec!["rm", "-f", "victim"],
        "network-create" => vec!["network", "create", "--subnet", "10.73.0.0/24", "x"],
        "network-rm" => vec!["network", "rm", "n"],
        "connect" => vec!["network", "connect", "n2", "victim"],
        "disconnect" => vec!["network", "disconnect", "n2", "victim"],
        other => panic!("no scenario for crash point {other}"),
    };
    let out = lab.try_np(&req);
    assert!(!out.status.success(), "{point}: {req:?} succeeded although the daemon was to die");
    assert!(lab.wait_daemon_died(), "{point}: the daemon did not reach its crash point:\n{}", lab.daemon_log());
    lab.start_daemon();

    let names = container_names(&lab);
    let nets: Vec<String> = lab.np(&["network", "ls", "-q"]).lines().map(str::to_string).collect();
    match op {
        // Interrupted creations are undone, interrupted removals finished.
        "run" | "rm" => assert!(!names.contains(&"victim".to_string()), "{point}: {names:?}"),
        "network-create" => assert!(!nets.contains(&"x".to_string()), "{point}: {nets:?}"),
        "network-rm" => assert!(!nets.contains(&"n".to_string()), "{point}: {nets:?}"),
        "connect" | "disconnect" => {
            let v = lab.inspect("victim");
            assert!(v["NetworkSettings"]["Networks"].get("n2").is_none(), "{point}: still on n2");
            assert_eq!(v["State"]["Running"], true, "{point}: the container kept running");
        }
        _ => unreachable!(),
    }
    assert_consistent(&lab);
    // The network and its addresses are usable again.
    if op != "network-rm" {
        lab.np(&["run", "-d", "--name", "after", "--network", "n", "-p", "8081:80", "--", "sleep", "600"]);
        assert_consistent(&lab);
    }
    assert_cleans_up(&lab);
}

fn crash_points(prefix: &str) {
    let pts: Vec<&str> = POINTS.iter().copied().filter(|p| p.starts_with(prefix)).collect();
    assert!(!pts.is_empty());
    for p in pts {
        crash_at(p);
    }
}

#[test]
fn a_crash_anywhere_in_run_is_undone() {
    crash_points("run:");
}

#[test]
fn a_crash_anywhere_in_rm_is_finished() {
    crash_points("rm:");
}

#[test]
fn a_crash_anywhere_in_network_create_or_rm_is_resolved() {
    crash_points("network-");
}

#[test]
fn a_crash_anywhere_in_connect_or_disconnect_is_resolved() {
    crash_points("connect:");
    crash_points("disconnect:");
}

#[test]
fn a_crash_before_a_removed_containers_veth_is_deleted_leaks_nothing_and_frees_its_address() {
    // rm answers before the veth and namespace are deleted (in the background), and the
    // address stays held until they are: a daemon killed in between leaves them to the next
    // start, which must sweep them and hand the address out again.
    let mut lab = Lab::new("crash-reap");
    lab.np(&["network", "create", "--subnet", "10.71.0.0/24", "n"]);
    let run =
        ["run", "-d", "--name", "victim", "--network", "n", "--ip", "10.71.0.9", "-p", "8080:80", "--", "sleep", "600"];
    lab.np(&run);
    let v = lab.inspect("victim");
    let veth = v["NetworkSettings"]["Networks"]["n"]["HostInterface"].as_str().unwrap().to_string();
    let sandbox = v["NetworkSettings"]["SandboxKey"].as_str().unwrap().to_string();
    lab.stop_daemon();
    lab.start_daemon_with(&DaemonOpts {
        env: vec![("NETPATH_CRASH_AT".into(), "reap:links".into())],
        ..Default::default()
    });
    lab.np(&["rm", "-f", "victim"]);
    assert!(lab.wait_daemon_died(), "the daemon did not reach its crash point:\n{}", lab.daemon_log());
    assert!(lab.links(&lab.host_ns).contains(&veth), "the crash came before {veth} was deleted");
    assert!(std::path::Path::new(&sandbox).exists(), "the crash came before {sandbox} was unpinned");
    lab.start_daemon();
    assert!(!container_names(&lab).contains(&"victim".to_string()));
    assert_consistent(&lab); // no veth, namespace or map entry of it left
    lab.np(&run);
    assert_eq!(lab.ip_of("victim", "n"), "10.71.0.9", "its address is free again");
    assert_consistent(&lab);
    assert_cleans_up(&lab);
}

/// Starts `netpath ARGS` without waiting for it.
fn spawn_np(lab: &Lab, args: &[&str]) -> Child {
    let mut c = lab.np_cmd(args);
    c.stdout(Stdio::null()).stderr(Stdio::null());
    c.spawn().expect("spawning netpath")
}

#[test]
fn kill_9_during_concurrent_runs_leaks_nothing() {
    let mut lab = Lab::new("kill9");
    lab.np(&["network", "create", "--subnet", "10.74.0.0/22", "n"]);
    let runs: Vec<Child> = (0..40)
        .map(|i| {
            let name = format!("c{i}");
            spawn_np(&lab, &["run", "-d", "--name", &name, "--network", "n", "--", "sleep", "600"])
        })
        .collect();
    // Let some finish and others be in flight.
    std::thread::sleep(std::time::Duration::from_millis(300));
    lab.kill_daemon();
    for mut c in runs {
        let _ = c.wait();
    }
    lab.start_daemon();
    assert_consistent(&lab);
    let survivors = container_names(&lab);
    for n in &survivors {
        assert_eq!(lab.inspect(n)["State"]["Running"], true, "{n} lost its process");
    }
    assert_cleans_up(&lab);
}

#[test]
fn a_hundred_parallel_runs_rms_and_connects_end_consistent() {
    let lab = Lab::new("parallel");
    lab.np(&["network", "create", "--subnet", "10.75.0.0/22", "a"]);
    lab.np(&["network", "create", "--subnet", "10.76.0.0/22", "b"]);
    for i in 0..40 {
        lab.np(&["run", "-d", "--name", &format!("old{i}"), "--network", "a", "--", "sleep", "600"]);
    }
    let mut calls: Vec<Child> = vec![];
    for i in 0..60 {
        let name = format!("new{i}");
        let port = format!("{}:80", 9000 + i);
        calls
            .push(spawn_np(&lab, &["run", "-d", "--name", &name, "--network", "a", "-p", &port, "--", "sleep", "600"]));
    }
    for i in 0..20 {
        calls.push(spawn_np(&lab, &["network", "connect", "b", &format!("old{i}")]));
    }
    for i in 20..40 {
        calls.push(spawn_np(&lab, &["rm", "-f", &format!("old{i}")]));
    }
    // Clashing requests: the same name and the same host port twice; exactly one of each wins.
    calls.push(spawn_np(&lab, &["run", "-d", "--name", "twin", "--network", "b", "--", "sleep", "600"]));
    calls.push(spawn_np(&lab, &["run", "-d", "--name", "twin", "--network", "b", "--", "sleep", "600"]));
    calls.push(spawn_np(&lab, &["run", "-d", "--name", "p1", "--network", "b", "-p", "7000:80", "--", "sleep", "600"]));
    calls.push(spawn_np(&lab, &["run", "-d", "--name", "p2", "--network", "b", "-p", "7000:80", "--", "sleep", "600"]));
    assert_eq!(calls.len(), 104);
    let ok: Vec<bool> = calls.into_iter().map(|mut c| c.wait().unwrap().success()).collect();
    assert!(ok[..100].iter().all(|s| *s), "every independent call succeeds: {ok:?}");
    assert_eq!(ok[100..102].iter().filter(|s| **s).count(), 1, "one of two runs with one name wins");
    assert_eq!(ok[102..104].iter().filter(|s| **s).count(), 1, "one of two runs with one host port wins");

    let names = container_names(&lab);
    assert_eq!(names.len(), 40 - 20 + 60 + 2, "{names:?}");
    for i in 0..20 {
        let v = lab.inspect(&format!("old{i}"));
        assert!(v["NetworkSettings"]["Networks"].get("b").is_some(), "old{i} connected to b");
    }
    assert_consistent(&lab);
    assert_cleans_up(&lab);
}

/// The host refresh reads only the links enslaved to nothing, in a dump the kernel filters:
/// bridge ports (every container's veth) are skipped, the kernel's costly part of a dump
/// with thousands of them; a bridge and an unenslaved link are read.
#[test]
fn the_host_refresh_reads_links_without_a_master_and_skips_bridge_ports() {
    use netpath::netlink::{LinkRef, Netlink};
    let lab = Lab::without_daemon("nomaster");
    must(in_ns(&lab.host_ns, "ip", &["link", "add", "brx", "type", "bridge"]));
    must(in_ns(&lab.host_ns, "ip", &["link", "add", "port0", "type", "veth", "peer", "name", "loose0"]));
    must(in_ns(&lab.host_ns, "ip", &["link", "set", "port0", "master", "brx"]));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let nl = Netlink::in_netns(&lab.host_ns).unwrap();
        let names = |v: Vec<netpath::netlink::LinkSummary>| v.into_iter().map(|l| l.name).collect::<BTreeSet<_>>();
        let free = names(nl.links_without_master().await.unwrap());
        assert!(["lo", "brx", "loose0"].iter().all(|n| free.contains(*n)), "{free:?}");
        assert!(!free.contains("port0"), "a bridge port is skipped: {free:?}");
        assert!(names(nl.links().await.unwrap()).contains("port0"), "a full dump has it");
        let port = nl.link_summary(LinkRef::Name("port0")).await.unwrap().expect("port0 by name");
        let bridge = nl.link_summary(LinkRef::Name("brx")).await.unwrap().expect("brx by name");
        assert_eq!(port.master, Some(bridge.index));
        let by_index = nl.link_summary(LinkRef::Index(port.index)).await.unwrap().expect("port0 by index");
        assert_eq!((by_index.name.as_str(), by_index.kind.as_deref()), ("port0", Some("veth")));
        assert!(nl.link_summary(LinkRef::Name("nosuch0")).await.unwrap().is_none());
    });
}

#[test]
fn an_uplink_added_after_start_publishes_ports_at_once() {
    // No --uplink: every interface that is not netpath's is one, followed live.
    let mut lab = Lab::without_daemon("newuplink");
    lab.start_daemon_with(&DaemonOpts { all_uplinks: true, ..Default::default() });
    let info: Value = serde_json::from_str(&lab.np(&["system", "info"])).unwrap();
    assert_eq!(info["Uplinks"], serde_json::json!(["eth0"]), "lo and netpath0 are not uplinks");
    whoami_server_with(&lab, "web", &["-p", "8080:8"]);

    // A second NIC towards a second client, added while the daemon runs.
    let client2 = lab.add_ns("client2");
    let c2 = client2.display().to_string();
    must(lab.host("ip", &["link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns", &c2]));
    must(lab.host("ip", &["addr", "add", "203.0.113.1/24", "dev", "eth1"]));
    must(lab.host("ip", &["link", "set", "eth1", "up"]));
    must(in_ns(&client2, "ip", &["addr", "add", "203.0.113.2/24", "dev", "eth0"]));
    must(in_ns(&client2, "ip", &["link", "set", "eth0", "up"]));
    let mut seen = String::new();
    for _ in 0..50 {
        let out = in_ns(&client2, "socat", &["-t", "2", "-", "TCP:203.0.113.1:8080,connect-timeout=1"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        seen = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !seen.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(seen, "203.0.113.2", "the new uplink publishes the port, with the client's address kept");
    let info: Value = serde_json::from_str(&lab.np(&["system", "info"])).unwrap();
    assert_eq!(info["Uplinks"], serde_json::json!(["eth0", "eth1"]));
    // And one that goes is forgotten.
    must(lab.host("ip", &["link", "del", "eth1"]));
    let mut uplinks = Value::Null;
    for _ in 0..50 {
        uplinks = serde_json::from_str::<Value>(&lab.np(&["system", "info"])).unwrap()["Uplinks"].clone();
        if uplinks == serde_json::json!(["eth0"]) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(uplinks, serde_json::json!(["eth0"]));
}

#[test]
fn without_a_mounted_cgroup2_the_daemon_mounts_its_own_and_host_access_works() {
    let lab = Lab::without_daemon("nocgroup");
    // The daemon runs in a mount namespace of its own whose cgroup2 mounts are gone. Its
    // state dir is made a shared mount first, so the container namespaces it mounts there
    // show through to the CLI here (the lab unmounts it at the end).
    std::fs::create_dir_all(&lab.state_dir).unwrap();
    let dir = lab.state_dir.display().to_string();
    for args in [vec!["--bind", &dir, &dir], vec!["--make-shared", &dir]] {
        let mut c = Command::new("mount");
        c.args(args);
        must(c);
    }
    let script = "mount --make-rprivate /sys && \
        for m in $(awk '$3==\"cgroup2\"{print $2}' /proc/self/mounts | sort -r); do umount -l \"$m\"; done; \
        if awk '$3==\"cgroup2\"' /proc/self/mounts | grep -q .; then echo cgroup2 still mounted >&2; exit 1; fi; \
        exec \"$@\"";
    let bin = netpath_tests::netpath_bin();
    let mut c = in_ns(&lab.host_ns, "unshare", &["-m", "--propagation", "unchanged", "sh", "-c", script, "sh"]);
    c.arg(&bin)
        .arg("--socket")
        .arg(&lab.socket)
        .arg("daemon")
        .arg("--state-dir")
        .arg(&lab.state_dir)
        .arg("--bpffs")
        .arg(&lab.bpffs)
        .arg("--resolv-conf")
        .arg(&lab.resolv_conf)
        .arg("--uplink")
        .arg("eth0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(lab.dir.join("daemon.log")).unwrap());
    let mut daemon = DaemonGuard(c.spawn().unwrap());
    for _ in 0..200 {
        let out = lab.try_np(&["system", "info"]);
        if out.status.success() && serde_json::from_slice::<Value>(&out.stdout).unwrap()["Ready"] == true {
            break;
        }
        assert!(daemon.0.try_wait().unwrap().is_none(), "daemon died:\n{}", lab.daemon_log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(lab.daemon_log().contains("mounted one at"), "{}", lab.daemon_log());
    whoami_server_with(&lab, "web", &["-p", "8080:8"]);
    // A host process (here: in the host namespace) reaches the published port on loopback.
    let mut c = lab.host("socat", &["-t", "5", "-", "TCP:127.0.0.1:8080,connect-timeout=3"]);
    c.stdin(Stdio::null());
    let out = must(c);
    assert!(!out.trim().is_empty(), "host-local access works without a cgroup2 mounted beforehand");
    drop(daemon);
}

/// Kills a daemon started by hand when the test ends, however it ends.
struct DaemonGuard(Child);

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// GET http://127.0.0.1:PORT/metrics from the host namespace; the body.
fn scrape(lab: &Lab, port: u16) -> String {
    let ns = lab.host_ns.clone();
    // A thread of our own enters the namespace (setns is per thread). The request is sent
    // without shutting down our side, which would make the server drop the answer.
    let resp = std::thread::spawn(move || {
        use std::io::{Read, Write};
        netpath::netlink::netns::enter(&ns).unwrap();
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .join()
    .unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    assert!(!head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{head}");
    body.to_string()
}

/// The text format's grammar, strictly: every sample belongs to a family announced by HELP
/// and TYPE lines before it, names and labels are well formed, values are numbers.
fn check_text_format(body: &str) {
    let name_ok = |n: &str| {
        n.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    let mut typed: BTreeMap<String, String> = BTreeMap::new();
    let mut helped = BTreeSet::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            assert!(name_ok(name) && helped.insert(name.to_string()), "HELP {line}");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut w = rest.split(' ');
            let (name, kind) = (w.next().unwrap(), w.next().unwrap_or(""));
            assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind), "{line}");
            assert!(helped.contains(name) && typed.insert(name.to_string(), kind.to_string()).is_none(), "{line}");
        } else {
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
            assert!(value.parse::<f64>().is_ok(), "value of {line}");
            let name = series.split('{').next().unwrap();
            assert!(name_ok(name), "name in {line}");
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| typed.get(*f).is_some_and(|k| k == "histogram")))
                .unwrap_or(name);
            assert!(typed.contains_key(family), "{line}: sample before its TYPE");
            if let Some(labels) = series.strip_prefix(name)
                && !labels.is_empty()
            {
                let inner = labels.strip_prefix('{').and_then(|l| l.strip_suffix('}')).expect("braces");
                for kv in inner.split("\",") {
                    let (k, v) = kv.split_once('=').unwrap_or_else(|| panic!("label in {line}"));
                    assert!(name_ok(k) && v.starts_with('"'), "label {kv} in {line}");
                }
            }
        }
    }
}

#[test]
fn metrics_are_valid_prometheus_text_with_tables_drops_traffic_and_api_latency() {
    let mut lab = Lab::without_daemon("metrics");
    lab.start_daemon_with(&DaemonOpts {
        args: vec!["--metrics-addr".into(), "127.0.0.1:9273".into()],
        ..Default::default()
    });
    lab.np(&["network", "create", "--subnet", "10.77.0.0/24", "m"]);
    whoami_server_with(&lab, "web", &["--network", "m", "-p", "8080:8"]);
    // Traffic through the published port from the client.
    let mut c = in_ns(
        &lab.client_ns,
        "socat",
        &["-t", "5", "-", &format!("TCP:{}:8080,connect-timeout=3", netpath_tests::HOST_ETH0_IP)],
    );
    c.stdin(Stdio::null());
    assert_eq!(must(c).trim(), netpath_tests::CLIENT_IP);

    let body = scrape(&lab, 9273);
    check_text_format(&body);
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
    let value = |name: &str, labels: &[(&str, &str)]| -> Option<f64> {
        scrape.samples.iter().find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))).map(
            |s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                other => panic!("{name}: {other:?}"),
            },
        )
    };
    assert!(value("netpath_conntrack_entries", &[]).unwrap() >= 2.0, "the flow is tracked");
    assert_eq!(value("netpath_conntrack_capacity", &[]), Some(netpath_common::CT_MAX_ENTRIES as f64));
    assert_eq!(value("netpath_drops_total", &[("reason", "isolation")]), Some(0.0));
    assert_eq!(value("netpath_published_ports", &[]), Some(1.0));
    assert_eq!(value("netpath_containers", &[("status", "running")]), Some(1.0));
    assert!(value("netpath_container_rx_packets_total", &[("container", "web"), ("network", "m")]).unwrap() > 0.0);
    assert!(value("netpath_container_tx_bytes_total", &[("container", "web"), ("network", "m")]).unwrap() > 0.0);
    let runs = scrape.samples.iter().find(|s| {
        s.metric == "netpath_api_request_duration_seconds"
            && s.labels.get("route") == Some("/containers")
            && s.labels.get("method") == Some("POST")
    });
    match runs.map(|s| &s.value) {
        Some(prometheus_parse::Value::Histogram(h)) => {
            let inf = h.iter().find(|b| b.less_than == f64::INFINITY).expect("+Inf bucket");
            assert!(inf.count >= 1.0, "the run was timed: {h:?}");
            assert!(h.windows(2).all(|w| w[0].count <= w[1].count), "buckets are cumulative: {h:?}");
        }
        other => panic!("no API latency histogram for POST /containers: {other:?}"),
    }
}

#[test]
fn a_running_container_holds_no_other_container_namespace() {
    // Container processes get their own mount namespace (for /etc files); the copies of the
    // daemon's namespace mounts it would inherit must not keep removed containers alive.
    let lab = Lab::new("nsrefs");
    lab.np(&["run", "-d", "--name", "a", "--", "sleep", "600"]);
    lab.np(&["run", "-d", "--name", "b", "--", "sleep", "600"]);
    let pid = lab.inspect("a")["State"]["Pid"].as_u64().expect("a runs");
    let netns_dir = lab.state_dir.join("netns").display().to_string();
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let held: Vec<&str> = mountinfo.lines().filter(|l| l.contains(&netns_dir)).collect();
    assert!(held.is_empty(), "a's mount namespace holds namespace files: {held:?}");
    lab.np(&["rm", "-f", "b"]);
    assert_eq!(lab.inspect("a")["State"]["Running"], true);
}

/// What a long-running daemon accumulates: open descriptors, datapath entries, state files.
fn footprint(lab: &Lab) -> (usize, Value, usize, usize) {
    lab.settle();
    let pid = lab.daemon_pid().expect("daemon runs");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let dp: Value = serde_json::from_str(&lab.np(&["system", "datapath"])).unwrap();
    let entries = serde_json::json!([dp["endpoints"], dp["published_ports"], dp["ct_entries"]]);
    let count = |d: &str| std::fs::read_dir(lab.state_dir.join(d)).map_or(0, |r| r.count());
    (fds, entries, count("db/containers") + count("containers"), count("netns"))
}

#[test]
fn run_rm_churn_leaves_descriptors_entries_and_state_where_they_were() {
    let lab = Lab::new("churn");
    lab.np(&["network", "create", "--subnet", "10.79.0.0/24", "c"]);
    lab.np(&["run", "-d", "--name", "keep", "--network", "c", "-p", "8000:80", "--", "sleep", "600"]);
    // One cycle first, so lazily made things (sockets, pools) exist before the baseline.
    lab.np(&["run", "-d", "--name", "warm", "--network", "c", "-p", "8001:80", "--", "sleep", "600"]);
    lab.np(&["rm", "-f", "warm"]);
    // The baseline once warm's teardown has wound down too (its DNS sockets close just after
    // `rm` answers): two readings in a row that agree.
    let mut before = footprint(&lab);
    for _ in 0..50 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let now = footprint(&lab);
        if now == before {
            break;
        }
        before = now;
    }
    for i in 0..60 {
        let name = format!("churn{i}");
        lab.np(&["run", "-d", "--name", &name, "--network", "c", "-p", "8001:80", "--", "sleep", "600"]);
        if i % 3 == 0 {
            lab.np(&["network", "connect", "bridge", &name]);
        }
        lab.np(&["rm", "-f", &name]);
    }
    // A removed container's DNS sockets close as its server's tasks wind down, which the
    // runtime does just after `rm` answers: give that a moment, then it must all be back.
    let mut after = footprint(&lab);
    for _ in 0..50 {
        if after == before {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        after = footprint(&lab);
    }
    assert_eq!(after, before, "(fds, [endpoints, ports, flows], state files, namespace files) after 60 run/rm cycles");
    assert_consistent(&lab);
}

#[test]
fn shutdown_containers_stops_processes_and_takes_the_datapath_off() {
    let mut lab = Lab::without_daemon("shutdown");
    lab.start_daemon_with(&DaemonOpts { args: vec!["--shutdown-containers".into()], ..Default::default() });
    lab.np(&["run", "-d", "--name", "s", "-p", "8080:80", "--", "sleep", "600"]);
    let pid = lab.inspect("s")["State"]["Pid"].as_u64().expect("s runs") as u32;
    let veth = lab.inspect("s")["NetworkSettings"]["Networks"]["bridge"]["HostInterface"].as_str().unwrap().to_string();
    lab.stop_daemon();
    assert!(netpath::daemon::process::start_time(pid).is_none(), "the container's process outlived the daemon");
    let links: Vec<String> = std::fs::read_dir(lab.bpffs.join("links"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(links.is_empty(), "link pins left: {links:?}");
    let tc = must(lab.host("bpftool", &["net", "show", "dev", &veth]));
    assert!(!tc.contains("from_container"), "programs still attached to {veth}:\n{tc}");
    // The next start brings the containers' networking back; they are reported exited.
    lab.start_daemon();
    let ps = lab.np(&["ps", "-a"]);
    assert!(ps.lines().any(|l| l.contains(" s ") && l.contains("exited")), "{ps}");
}
