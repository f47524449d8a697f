//! Multi-host: three daemons in three lab hosts on one underlay segment, a real etcd started
//! inside the lab, overlay networks created on one node and used from the others.

use std::collections::BTreeSet;

use netpath_tests::cluster::{ClusterLab, node_ip};
use netpath_tests::{CLIENT_IP, HOST_ETH0_IP, Lab, in_ns, must};

/// `getent hosts NAME` inside a container: the addresses it printed (empty if not found).
fn getent(lab: &Lab, ctr: &str, name: &str) -> Vec<String> {
    let out = lab.try_np(&["exec", ctr, "--", "getent", "hosts", name]);
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split_whitespace().next()).map(String::from).collect()
}

fn all_ready(c: &ClusterLab, from: usize, n: usize) -> bool {
    let ls = c.node_ls(from);
    ls.len() == n && ls.iter().all(|(_, s)| s == "ready")
}

#[test]
fn overlay_needs_a_cluster_store() {
    let lab = Lab::new("ov-single");
    let e = lab.np_fails(&["network", "create", "-d", "overlay", "--attachable", "ov"]);
    assert!(e.contains("need a cluster store") && e.contains("--cluster-store"), "{e}");
    for args in [&["node", "ls"][..], &["node", "rm", "x"]] {
        let e = lab.np_fails(args);
        assert!(e.contains("not part of a cluster"), "{e}");
    }
    assert!(!lab.np(&["network", "ls", "-q"]).lines().any(|n| n == "ov"), "nothing was made");
}

#[test]
fn the_docker_plugin_scope_is_global_in_a_cluster() {
    // dockerd keeps one copy of a global-scope network for the whole cluster, as with its own
    // overlay driver: a clustered netpath says so; a single-host one says local.
    let mut c = ClusterLab::new("ov-dock", 0);
    let sock = c.infra.dir.join("docker.sock");
    let mut opts = ClusterLab::daemon_opts(0);
    opts.args.extend(["--docker-plugin-socket".to_string(), sock.display().to_string()]);
    c.add_node("ov-dock", &opts);
    let out = must({
        let mut cmd = std::process::Command::new("curl");
        cmd.args(["-sS", "--unix-socket"]).arg(&sock).args([
            "-X",
            "POST",
            "--data-binary",
            "null",
            "http://plugin/NetworkDriver.GetCapabilities",
        ]);
        cmd
    });
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["Scope"].as_str(), v["ConnectivityScope"].as_str()), (Some("global"), Some("global")), "{out}");
}

#[test]
fn cluster_nodes_overlay_networks_addresses_and_names() {
    let mut c = ClusterLab::new("ov-cluster", 3);
    c.wait_for(20, "3 nodes ready on node0", || all_ready(&c, 0, 3));
    let table = c.node(1).np(&["node", "ls"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("node1 *") && table.contains("192.0.2.2") && table.contains("ready"), "{table}");

    // Bad input: a clear error, nothing made anywhere.
    let e = c.node(0).np_fails(&["network", "create", "-d", "overlay", "-o", "encrypted", "sec"]);
    assert!(e.contains("neither IPsec ESP") && e.contains("WireGuard"), "{e}");
    let e = c.node(0).np_fails(&["network", "create", "-d", "overlay", "-o", "mtu=1", "x"]);
    assert!(e.contains("unsupported network option"), "{e}");

    // Created on node0, visible on every node with the same id, subnet and VNI.
    c.node(0).np(&["network", "create", "-d", "overlay", "--attachable", "--subnet", "10.77.0.0/24", "ov"]);
    let a = c.node(0).inspect_network("ov");
    assert_eq!(a["Driver"], "overlay");
    assert_eq!(a["Scope"], "swarm");
    assert_eq!(a["Attachable"], true);
    let vni = a["Options"]["com.docker.network.driver.overlay.vxlanid_list"].as_str().unwrap().to_string();
    assert_eq!(vni, "4096", "the first overlay gets the first VNI");
    for i in 1..3 {
        c.wait_for(10, "ov on every node", || c.node(i).np(&["network", "ls", "-q"]).lines().any(|n| n == "ov"));
        let b = c.node(i).inspect_network("ov");
        assert_eq!((b["Id"].clone(), b["IPAM"].clone()), (a["Id"].clone(), a["IPAM"].clone()));
        assert_eq!(b["Options"]["com.docker.network.driver.overlay.vxlanid_list"], vni.as_str());
    }
    // One name cluster-wide; subnets do not overlap.
    let e = c.node(2).np_fails(&["network", "create", "-d", "overlay", "ov"]);
    assert!(e.contains("already exists"), "{e}");
    let e = c.node(1).np_fails(&["network", "create", "-d", "overlay", "--subnet", "10.77.0.128/25", "ov2"]);
    assert!(e.contains("overlaps with overlay network ov"), "{e}");
    // Not attachable: standalone containers are refused.
    c.node(1).np(&["network", "create", "-d", "overlay", "svcs"]);
    let e = c.node(1).np_fails(&["run", "-d", "--name", "x", "--network", "svcs", "--", "sleep", "60"]);
    assert!(e.contains("not attachable"), "{e}");

    // Concurrent runs on two nodes: every address handed out once.
    let n = 6;
    let runs: Vec<_> = (0..2)
        .flat_map(|node| (0..n).map(move |k| (node, format!("c{node}x{k}"))))
        .map(|(node, name)| {
            let cmd = c.node(node).np_cmd(&["run", "-d", "--name", &name, "--network", "ov", "--", "sleep", "600"]);
            (node, name, cmd)
        })
        .collect();
    let threads: Vec<_> = runs
        .into_iter()
        .map(|(node, name, mut cmd)| {
            std::thread::spawn(move || {
                let out = cmd.output().expect("running netpath");
                assert!(out.status.success(), "run {name}: {}", String::from_utf8_lossy(&out.stderr));
                (node, name)
            })
        })
        .collect();
    let started: Vec<(usize, String)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let mut ips = BTreeSet::new();
    for (node, name) in &started {
        let ip = c.node(*node).ip_of(name, "ov");
        assert!(ip.starts_with("10.77.0."), "{name}: {ip}");
        assert!(ips.insert(ip.clone()), "{ip} was handed out twice (second: {name} on node{node})");
    }
    assert_eq!(ips.len(), 2 * n);
    // Without --overlay-decap underlay the VXLAN device decapsulates: nothing on the underlay.
    for i in 0..2 {
        let (dev, on) = underlay_in_on(&c, i);
        assert!(!on, "node{i}: underlay_in on {dev} by default");
    }
    // The same --ip asked on two nodes at once: exactly one gets it.
    let both: Vec<_> = (0..2)
        .map(|node| {
            let name = format!("pinned{node}");
            let mut cmd = c.node(node).np_cmd(&[
                "run",
                "-d",
                "--name",
                &name,
                "--network",
                "ov",
                "--ip",
                "10.77.0.200",
                "--",
                "sleep",
                "600",
            ]);
            std::thread::spawn(move || cmd.output().expect("running netpath"))
        })
        .collect();
    let outs: Vec<_> = both.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(outs.iter().filter(|o| o.status.success()).count(), 1, "{outs:?}");
    let lost = outs.iter().find(|o| !o.status.success()).unwrap();
    assert!(String::from_utf8_lossy(&lost.stderr).contains("10.77.0.200 is in use"), "{lost:?}");
    for node in 0..2 {
        c.node(node).try_np(&["rm", "-f", &format!("pinned{node}")]);
    }

    // Docker's Peers: the nodes with containers on the overlay, seen from a node with none.
    let peers: Vec<String> = c.node(2).inspect_network("ov")["Peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| format!("{} {}", p["Name"].as_str().unwrap(), p["IP"].as_str().unwrap()))
        .collect();
    assert_eq!(peers, ["node0 192.0.2.1", "node1 192.0.2.2"]);

    // Overlay MTU: the underlay's (1500) less the VXLAN overhead.
    let sb = c.node(0).sandbox("c0x0");
    let link = must(in_ns(&sb, "ip", &["-o", "link", "show", "eth0"]));
    assert!(link.contains("mtu 1450"), "{link}");

    // Names of containers on other nodes resolve (the embedded DNS learns them from etcd).
    let ip_remote = c.node(1).ip_of("c1x0", "ov");
    c.wait_for(10, "c1x0 resolving on node0", || getent(c.node(0), "c0x0", "c1x0") == vec![ip_remote.clone()]);
    // Traffic across hosts by name: ping, and TCP to a server on node1 that sees the
    // client's own overlay address (no NAT on the way).
    let ip_local = c.node(0).ip_of("c0x0", "ov");
    let ping = c.node(0).np(&["exec", "c0x0", "--", "ping", "-c", "2", "-W", "2", "c1x0"]);
    assert!(ping.contains("2 received"), "{ping}");
    c.node(1).np(&[
        "run",
        "-d",
        "--name",
        "srv",
        "--network",
        "ov",
        "--",
        "socat",
        "TCP-LISTEN:80,fork,reuseaddr",
        "SYSTEM:echo $SOCAT_PEERADDR",
    ]);
    c.wait_for(10, "srv resolving on node0", || !getent(c.node(0), "c0x0", "srv").is_empty());
    let mut seen = String::new();
    c.wait_for(10, "a TCP answer from srv on node1", || {
        let out = c.node(0).try_np(&["exec", "c0x0", "--", "socat", "-T", "3", "-", "TCP:srv:80"]);
        seen = String::from_utf8_lossy(&out.stdout).trim().to_string();
        out.status.success() && !seen.is_empty()
    });
    assert_eq!(seen, ip_local, "the server sees the client's overlay address");
    // And from node2, a third host, to node0.
    c.node(2).np(&["run", "-d", "--name", "c2", "--network", "ov", "--", "sleep", "600"]);
    let ping = c.node(2).np(&["exec", "c2", "--", "ping", "-c", "1", "-W", "2", &ip_local]);
    assert!(ping.contains("1 received"), "{ping}");

    // Isolation across hosts: a container of another overlay (on node2) does not reach ov's
    // containers on node0, nor a bridge network's container on its own node; connected to ov
    // as well (`network connect` on an attachable overlay), it does.
    c.node(2).np(&["network", "create", "-d", "overlay", "--attachable", "--subnet", "10.78.0.0/24", "other"]);
    c.wait_for(10, "other on node0", || c.node(0).np(&["network", "ls", "-q"]).lines().any(|n| n == "other"));
    c.node(2).np(&["run", "-d", "--name", "o2", "--network", "other", "--", "sleep", "600"]);
    c.node(0).np(&["run", "-d", "--name", "o0", "--network", "other", "--", "sleep", "600"]);
    let o0 = c.node(0).ip_of("o0", "other");
    let ping = c.node(2).np(&["exec", "o2", "--", "ping", "-c", "1", "-W", "2", &o0]);
    assert!(ping.contains("1 received"), "same overlay, across hosts: {ping}");
    c.node(2).np(&["network", "create", "--subnet", "10.79.0.0/24", "br2"]);
    c.node(2).np(&["run", "-d", "--name", "b2", "--network", "br2", "--", "sleep", "600"]);
    let b2 = c.node(2).ip_of("b2", "br2");
    let ping = c.node(2).np(&["exec", "b2", "--", "ping", "-c", "1", "-W", "2", "10.79.0.1"]);
    assert!(ping.contains("1 received"), "b2 is up: {ping}");
    for target in [ip_local.as_str(), b2.as_str()] {
        let out = c.node(2).try_np(&["exec", "o2", "--", "ping", "-c", "1", "-W", "1", target]);
        assert!(!out.status.success(), "o2 (overlay other) reached {target}");
    }
    c.node(2).np(&["network", "connect", "ov", "o2"]);
    let ping = c.node(2).np(&["exec", "o2", "--", "ping", "-c", "1", "-W", "2", &ip_local]);
    assert!(ping.contains("1 received"), "connected to ov too: {ping}");
    for (node, name) in [(2, "c2"), (2, "o2"), (0, "o0"), (2, "b2")] {
        c.node(node).np(&["rm", "-f", name]);
    }
    c.node(0).np(&["network", "rm", "other"]);
    c.node(1).np(&["rm", "-f", "srv"]);

    // Removing a network in use on another node is refused.
    let e = c.node(2).np_fails(&["network", "rm", "ov"]);
    assert!(e.contains("in use") && e.contains("node1"), "{e}");

    // A node that dies (daemon killed, namespaces gone): down within the lease TTL, its
    // endpoints gone from the others (names, the in-use check).
    for k in 0..n {
        c.node(1).np(&["rm", "-f", &format!("c1x{k}")]);
    }
    c.node(2).np(&["run", "-d", "--name", "doomed", "--network", "ov", "--", "sleep", "600"]);
    let doomed_ip = c.node(2).ip_of("doomed", "ov");
    c.wait_for(10, "doomed resolving on node0", || getent(c.node(0), "c0x0", "doomed") == vec![doomed_ip.clone()]);
    c.destroy_node(2);
    // TTL 5 s, plus etcd's expiry sweep (twice a second), the watch, and a loaded machine.
    c.wait_for(15, "node2 down on node0", || c.node_ls(0).contains(&("node2".into(), "down".into())));
    c.wait_for(5, "doomed gone from node0's names", || getent(c.node(0), "c0x0", "doomed").is_empty());
    assert!(c.node_ls(1).contains(&("node2".into(), "down".into())));
    // Its addresses stay taken while it is down (it may come back with its containers)...
    let taker = ["run", "-d", "--name", "taker", "--network", "ov", "--ip", &doomed_ip, "--", "sleep", "600"];
    let e = c.node(0).np_fails(&taker);
    assert!(e.contains("is in use"), "{e}");
    // ...until it is removed for good; this node, a live one or an unknown one cannot be.
    let e = c.node(0).np_fails(&["node", "rm", "node0"]);
    assert!(e.contains("is this node"), "{e}");
    let e = c.node(0).np_fails(&["node", "rm", "node1"]);
    assert!(e.contains("node node1 is up"), "{e}");
    let e = c.node(0).np_fails(&["node", "rm", "nope"]);
    assert!(e.contains("no such node: nope"), "{e}");
    c.node(0).np(&["node", "rm", "node2"]);
    c.wait_for(5, "node2 gone from node1's list", || !c.node_ls(1).iter().any(|(n, _)| n == "node2"));
    c.node(0).np(&taker);
    assert_eq!(c.node(0).ip_of("taker", "ov"), doomed_ip);
    c.node(0).np(&["rm", "-f", "taker"]);

    // Addresses come back: rm frees them cluster-wide, and the network goes when unused.
    for k in 0..n {
        c.node(0).np(&["rm", "-f", &format!("c0x{k}")]);
    }
    c.node(1).np(&["network", "rm", "ov"]);
    c.wait_for(10, "ov gone from node0", || !c.node(0).np(&["network", "ls", "-q"]).lines().any(|n| n == "ov"));
}

#[test]
fn etcd_down_keeps_local_containers_and_resyncs_when_back() {
    let mut c = ClusterLab::new("ov-etcd", 2);
    c.wait_for(20, "2 nodes ready", || all_ready(&c, 0, 2));
    c.node(0).np(&["network", "create", "-d", "overlay", "--attachable", "ov"]);
    c.wait_for(10, "ov on node1", || c.node(1).np(&["network", "ls", "-q"]).lines().any(|n| n == "ov"));
    c.node(0).np(&["run", "-d", "--name", "a", "--network", "ov", "--", "sleep", "600"]);
    let ip_a = c.node(0).ip_of("a", "ov");
    c.node(1).np(&["run", "-d", "--name", "w", "--network", "ov", "--", "sleep", "600"]);
    let ip_w = c.node(1).ip_of("w", "ov");
    c.wait_for(10, "w resolving on node0", || getent(c.node(0), "a", "w") == vec![ip_w.clone()]);

    // A second daemon claiming node0's name (another address) is refused, and says why.
    let mut opts = ClusterLab::daemon_opts(0);
    let at = opts.args.iter().position(|a| a == "--node-ip").unwrap() + 1;
    opts.args[at] = netpath_tests::cluster::node_ip(2);
    let dup = c.add_node("ov-etcd", &opts);
    let e = c.node(dup).np_fails(&["network", "create", "-d", "overlay", "x"]);
    assert!(e.contains("node name node0 is in use by the live node at 192.0.2.1"), "{e}");
    assert!(all_ready(&c, 1, 2), "node0 keeps its name and keys");
    c.destroy_node(dup);

    c.stop_etcd();
    // Changes that need the cluster fail with a clear error (after the daemon notices).
    c.wait_for(20, "node0 to notice etcd is gone", || {
        let out = c.node(0).try_np(&["run", "-d", "--name", "b", "--network", "ov", "--", "sleep", "600"]);
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("cluster store")
    });
    let e = c.node(1).np_fails(&["network", "create", "-d", "overlay", "ov2"]);
    assert!(e.contains("unreachable"), "{e}");
    // Local work goes on: containers on overlays and bridges, new bridge networks.
    c.node(0).np(&["network", "create", "local1"]);
    c.node(0).np(&["run", "-d", "--name", "l", "--network", "local1", "--", "sleep", "600"]);
    assert_eq!(c.node(0).ip_of("a", "ov"), ip_a);
    assert_eq!(c.node(0).inspect("a")["State"]["Running"], true, "a still runs");
    // What is programmed keeps working across hosts: the name of w (node1) and the tunnel.
    assert_eq!(getent(c.node(0), "a", "w"), vec![ip_w.clone()], "w's name while etcd is down");
    let ping = c.node(0).np(&["exec", "a", "--", "ping", "-c", "1", "-W", "2", "w"]);
    assert!(ping.contains("1 received"), "a reaches w on node1 while etcd is down: {ping}");

    c.start_etcd();
    c.wait_for(20, "both nodes ready again", || all_ready(&c, 1, 2));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !c.node(0).try_np(&["run", "-d", "--name", "b", "--network", "ov", "--", "sleep", "600"]).status.success() {
        assert!(std::time::Instant::now() < deadline, "node0 did not reconnect:\n{}", c.underlay_report(0));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let ip_b = c.node(0).ip_of("b", "ov");
    assert_ne!(ip_a, ip_b, "a's address stayed claimed across the outage");
    c.node(1).np(&["network", "create", "-d", "overlay", "--attachable", "ov2"]);
    c.wait_for(10, "ov2 on node0", || c.node(0).np(&["network", "ls", "-q"]).lines().any(|n| n == "ov2"));
    // node1 sees a's record again (re-put by node0's new session), and reaches it.
    c.node(1).np(&["run", "-d", "--name", "q", "--network", "ov", "--", "sleep", "600"]);
    c.wait_for(10, "a resolving on node1", || getent(c.node(1), "q", "a") == vec![ip_a.clone()]);
    let ping = c.node(1).np(&["exec", "q", "--", "ping", "-c", "1", "-W", "2", "a"]);
    assert!(ping.contains("1 received"), "{ping}");

    // A node whose daemon restarts comes back: same containers, records, datapath.
    c.node_mut(0).stop_daemon();
    c.node_mut(0).start_daemon_with(&ClusterLab::daemon_opts(0));
    c.wait_for(20, "node0 ready again", || all_ready(&c, 1, 2));
    assert_eq!(c.node(0).ip_of("a", "ov"), ip_a);
    // node1 sees node0 ready while node0's lease from before the restart lasts; node0 learns
    // the other nodes' names once it has joined again, a moment after its API answers.
    let ip_q = c.node(1).ip_of("q", "ov");
    c.wait_for(10, "q resolving on node0 again", || getent(c.node(0), "a", "q") == vec![ip_q.clone()]);
    let ping = c.node(0).np(&["exec", "a", "--", "ping", "-c", "1", "-W", "2", "q"]);
    assert!(ping.contains("1 received"), "{ping}");
    c.wait_for(10, "a still resolving on node1", || getent(c.node(1), "q", "a") == vec![ip_a.clone()]);
    // Its claims survived the restart: a new container does not get a's or b's address.
    c.node(1).np(&["run", "-d", "--name", "r", "--network", "ov", "--", "sleep", "600"]);
    let ip_r = c.node(1).ip_of("r", "ov");
    assert!(ip_r != ip_a && ip_r != ip_b, "{ip_r} handed out twice");
}

/// `service create` of two replicas on `net` that answer each connection with the client's
/// address.
fn echo_service(lab: &Lab, name: &str, net: &str) {
    lab.np(&[
        "service",
        "create",
        "--name",
        name,
        "--network",
        net,
        "--replicas",
        "2",
        "--",
        "socat",
        "TCP-LISTEN:80,fork,reuseaddr",
        "SYSTEM:echo $SOCAT_SOCKADDR",
    ]);
}

/// Names of a service's running tasks on one node (`service inspect` lists the node's own).
fn running_tasks(lab: &Lab, svc: &str) -> Vec<String> {
    let out = lab.try_np(&["service", "inspect", svc]);
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else { return vec![] };
    v[0]["Tasks"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|t| t["State"] == "running")
        .map(|t| t["Name"].as_str().unwrap_or("").to_string())
        .collect()
}

fn service_vip(lab: &Lab, svc: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(&lab.np(&["service", "inspect", svc])).unwrap();
    v[0]["Endpoint"]["VirtualIPs"][0]["Addr"].as_str().unwrap().split('/').next().unwrap().to_string()
}

/// `count` connections from `client` to ip:80, each answered with the task address reached;
/// the answers counted.
fn spread(lab: &Lab, client: &str, ip: &str, count: usize) -> std::collections::BTreeMap<String, usize> {
    let script =
        format!("for i in $(seq 1 {count}); do socat -u -T 5 TCP:{ip}:80,connect-timeout=5 - || echo failed; done");
    let out = lab.np(&["exec", client, "--", "sh", "-c", &script]);
    let mut m = std::collections::BTreeMap::new();
    for l in out.lines() {
        *m.entry(l.trim().to_string()).or_insert(0) += 1;
    }
    m
}

/// Waits until every task listens on port 80 (from inside it).
fn listening(lab: &Lab, task: &str) -> bool {
    lab.try_np(&["exec", task, "--", "sh", "-c", "ss -ltn | grep -q ':80 '"]).status.success()
}

#[test]
fn a_service_spreads_over_nodes_balances_across_them_and_moves_off_a_dead_node() {
    let mut c = ClusterLab::new("ov-svc", 3);
    c.wait_for(20, "3 nodes ready", || all_ready(&c, 0, 3));
    c.node(0).np(&["network", "create", "-d", "overlay", "--attachable", "--subnet", "10.88.0.0/24", "svcnet"]);
    for i in 1..3 {
        c.wait_for(10, "svcnet everywhere", || c.node(i).np(&["network", "ls", "-q"]).lines().any(|n| n == "svcnet"));
    }
    c.node(1).np(&[
        "service",
        "create",
        "--name",
        "web",
        "--network",
        "svcnet",
        "--replicas",
        "3",
        "--",
        "socat",
        "TCP-LISTEN:80,fork,reuseaddr",
        "SYSTEM:echo $SOCAT_SOCKADDR",
    ]);
    // One task per node: the scheduler spreads them.
    c.wait_for(30, "one running task on every node", || (0..3).all(|i| running_tasks(c.node(i), "web").len() == 1));
    let vip = service_vip(c.node(0), "web");
    assert_eq!(service_vip(c.node(2), "web"), vip, "one VIP cluster-wide");
    let mut tasks = vec![];
    for i in 0..3 {
        let t = running_tasks(c.node(i), "web").remove(0);
        c.wait_for(10, "the task listening", || listening(c.node(i), &t));
        tasks.push(c.node(i).ip_of(&t, "svcnet"));
    }
    let tasks: BTreeSet<String> = tasks.into_iter().collect();
    assert_eq!(tasks.len(), 3, "{tasks:?}");

    // The VIP (and the service's name) balances over the tasks of every node.
    c.node(0).np(&["run", "-d", "--name", "client", "--network", "svcnet", "--", "sleep", "600"]);
    c.wait_for(10, "web resolving to its VIP", || getent(c.node(0), "client", "web") == vec![vip.clone()]);
    let m = spread(c.node(0), "client", &vip, 60);
    assert_eq!(m.keys().cloned().collect::<BTreeSet<_>>(), tasks, "every task answers, nothing else: {m:?}");

    // node2 dies: its task is started on a live node, and the VIP leaves it.
    c.destroy_node(2);
    c.wait_for(30, "3 tasks on the 2 live nodes", || {
        running_tasks(c.node(0), "web").len() + running_tasks(c.node(1), "web").len() == 3
    });
    let mut live = BTreeSet::new();
    for i in 0..2 {
        for t in running_tasks(c.node(i), "web") {
            c.wait_for(10, "the task listening", || listening(c.node(i), &t));
            live.insert(c.node(i).ip_of(&t, "svcnet"));
        }
    }
    c.wait_for(15, "the VIP balancing over the live tasks only", || {
        spread(c.node(0), "client", &vip, 30).keys().cloned().collect::<BTreeSet<_>>() == live
    });

    // Scale and rm act on every node.
    c.node(0).np(&["service", "scale", "web=1"]);
    c.wait_for(20, "one task left", || {
        running_tasks(c.node(0), "web").len() + running_tasks(c.node(1), "web").len() == 1
    });
    c.node(1).np(&["service", "rm", "web"]);
    c.wait_for(20, "web gone everywhere", || {
        (0..2).all(|i| {
            !c.node(i).np(&["ps", "-a"]).contains("web.")
                && c.node(i).try_np(&["service", "inspect", "web"]).status.code() != Some(0)
        })
    });
}

/// The seed tutorial (service create, update --network-add / --network-rm, rm) on overlays,
/// its tasks on two nodes.
#[test]
fn service_networks_follow_updates_across_nodes() {
    let c = ClusterLab::new("ov-tut", 2);
    c.wait_for(20, "2 nodes ready", || all_ready(&c, 0, 2));
    for (net, subnet) in [("front", "10.91.0.0/24"), ("back", "10.92.0.0/24")] {
        c.node(0).np(&["network", "create", "-d", "overlay", "--attachable", "--subnet", subnet, net]);
        c.wait_for(10, "the overlay on node1", || c.node(1).np(&["network", "ls", "-q"]).lines().any(|n| n == net));
    }
    echo_service(c.node(0), "api", "back");
    c.wait_for(30, "a task on each node", || (0..2).all(|i| running_tasks(c.node(i), "api").len() == 1));
    let e = c.node(1).np_fails(&["network", "rm", "back"]);
    assert!(e.contains("in use by service api"), "{e}");
    c.node(1).np(&["run", "-d", "--name", "fclient", "--network", "front", "--", "sleep", "600"]);

    // --network-add: every task joins front, wherever it runs; the VIP there balances over both.
    c.node(1).np(&["service", "update", "--network-add", "front", "api"]);
    let v: serde_json::Value = serde_json::from_str(&c.node(0).np(&["service", "inspect", "api"])).unwrap();
    let vips = v[0]["Endpoint"]["VirtualIPs"].as_array().cloned().unwrap();
    let front_vip = vips.iter().find(|x| x["Network"] == "front").expect("a VIP on front")["Addr"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let mut on_front = BTreeSet::new();
    for i in 0..2 {
        let t = running_tasks(c.node(i), "api").remove(0);
        c.wait_for(20, "the task on front", || {
            c.node(i).inspect(&t)["NetworkSettings"]["Networks"]["front"]["IPAddress"].is_string()
        });
        c.wait_for(10, "the task listening", || listening(c.node(i), &t));
        on_front.insert(c.node(i).ip_of(&t, "front"));
    }
    c.wait_for(15, "front's VIP balancing over both nodes' tasks", || {
        spread(c.node(1), "fclient", &front_vip, 30).keys().cloned().collect::<BTreeSet<_>>() == on_front
    });
    c.wait_for(10, "api resolving on front", || getent(c.node(1), "fclient", "api") == vec![front_vip.clone()]);

    // --network-rm: the tasks leave back on every node.
    c.node(0).np(&["service", "update", "--network-rm", "back", "api"]);
    for i in 0..2 {
        let t = running_tasks(c.node(i), "api").remove(0);
        c.wait_for(20, "the task off back", || c.node(i).inspect(&t)["NetworkSettings"]["Networks"]["back"].is_null());
    }
    // back is unused now: it can go.
    c.wait_for(10, "back removable", || c.node(1).try_np(&["network", "rm", "back"]).status.success());

    // mode=host: the port answers only on the node running the task, to that task; the
    // client keeps its own address.
    c.node(0).np(&[
        "service",
        "create",
        "--name",
        "hp",
        "--network",
        "front",
        "--replicas",
        "1",
        "--publish",
        "published=8088,target=80,mode=host",
        "--",
        "socat",
        "TCP-LISTEN:80,fork,reuseaddr",
        "SYSTEM:echo $SOCAT_PEERADDR",
    ]);
    c.wait_for(30, "hp's task running", || (0..2).map(|i| running_tasks(c.node(i), "hp").len()).sum::<usize>() == 1);
    let with = (0..2).find(|i| running_tasks(c.node(*i), "hp").len() == 1).unwrap();
    let t = running_tasks(c.node(with), "hp").remove(0);
    c.wait_for(10, "the task listening", || listening(c.node(with), &t));
    let ask = |i: usize| {
        in_ns(
            &c.node(i).client_ns,
            "socat",
            &["-u", "-T", "3", &format!("TCP:{HOST_ETH0_IP}:8088,connect-timeout=3"), "-"],
        )
        .output()
        .unwrap()
    };
    let mut got = String::new();
    c.wait_for(10, "the port answering on the task's node", || {
        let o = ask(with);
        got = String::from_utf8_lossy(&o.stdout).trim().to_string();
        o.status.success() && !got.is_empty()
    });
    assert_eq!(got, CLIENT_IP, "the task sees the client's own address");
    assert!(!ask(1 - with).status.success(), "mode=host answers only where a task runs");
    // The routing mesh (mode=ingress, the default): the port answers on every node. The node
    // running the task hands it the client's own address; another node reaches it through
    // the tunnel from its own underlay address, as Docker's ingress network does.
    c.node(0).np(&[
        "service",
        "create",
        "--name",
        "ing",
        "--network",
        "front",
        "--replicas",
        "1",
        "--publish",
        "8089:80",
        "--",
        "socat",
        "TCP-LISTEN:80,fork,reuseaddr",
        "SYSTEM:echo $SOCAT_PEERADDR",
    ]);
    c.wait_for(30, "ing's task running", || (0..2).map(|i| running_tasks(c.node(i), "ing").len()).sum::<usize>() == 1);
    let with = (0..2).find(|i| running_tasks(c.node(*i), "ing").len() == 1).unwrap();
    let t = running_tasks(c.node(with), "ing").remove(0);
    c.wait_for(10, "ing's task listening", || listening(c.node(with), &t));
    let ask = |i: usize| {
        let o = in_ns(
            &c.node(i).client_ns,
            "socat",
            &["-u", "-T", "3", &format!("TCP:{HOST_ETH0_IP}:8089,connect-timeout=3"), "-"],
        )
        .output()
        .unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    for (i, want) in [(with, CLIENT_IP.to_string()), (1 - with, node_ip(1 - with))] {
        let mut got = String::new();
        c.wait_for(10, &format!("the mesh answering on node{i}"), || {
            let (ok, out) = ask(i);
            got = out;
            ok && !got.is_empty()
        });
        assert_eq!(got, want, "node{i}: the address the task sees");
    }
    c.node(1).np(&["service", "rm", "ing"]);
    c.node(1).np(&["service", "rm", "hp"]);

    c.node(1).np(&["service", "rm", "api"]);
    c.wait_for(20, "api gone everywhere", || (0..2).all(|i| !c.node(i).np(&["ps", "-a"]).contains("api.")));
    let out = c.node(1).try_np(&[
        "exec",
        "fclient",
        "--",
        "socat",
        "-u",
        "-T",
        "2",
        &format!("TCP:{front_vip}:80,connect-timeout=2"),
        "-",
    ]);
    assert!(!out.status.success(), "the VIP still answers after rm");
}

/// The link of node `i`'s namespace holding its underlay address, and whether the daemon
/// holds an `underlay_in` link on it (its pin; bpftool here does not list tcx links).
fn underlay_in_on(c: &ClusterLab, i: usize) -> (String, bool) {
    let ns = &c.node(i).host_ns;
    let addr = must(in_ns(ns, "ip", &["-o", "-4", "addr", "show", "to", &node_ip(i)]));
    let dev = addr.split_whitespace().nth(1).unwrap_or_else(|| panic!("no link holds {}: {addr}", node_ip(i)));
    let pinned = c.node(i).bpffs.join("links").join(format!("{dev}@underlay_in")).exists();
    (dev.to_string(), pinned)
}

/// The daemon decapsulates on the underlay: with the first overlay network it attaches
/// `underlay_in` to the link holding `--node-ip`, the overlay's traffic between containers
/// crosses it (small packets never reach the VXLAN device), and with the last overlay
/// network it goes again.
#[test]
fn the_daemon_decapsulates_on_the_underlay_link_while_it_has_an_overlay() {
    let c = ClusterLab::with_args("ov-underlay", 2, &["--overlay-decap", "underlay"]);
    c.wait_for(20, "2 nodes ready on node0", || all_ready(&c, 0, 2));
    let (dev, on) = underlay_in_on(&c, 1);
    assert!(!on, "no overlay yet, nothing on {dev}");
    c.node(0).np(&["network", "create", "-d", "overlay", "--attachable", "--subnet", "10.78.0.0/24", "ul"]);
    for (i, name) in [(0, "u0"), (1, "u1")] {
        c.wait_for(10, "ul on the node", || c.node(i).np(&["network", "ls", "-q"]).lines().any(|n| n == "ul"));
        c.node(i).np(&["run", "-d", "--name", name, "--network", "ul", "--", "sleep", "600"]);
    }
    for i in 0..2 {
        let (dev, on) = underlay_in_on(&c, i);
        assert!(on, "node{i}: underlay_in on {dev}");
    }
    let rx = |i: usize| {
        let out = must(in_ns(&c.node(i).host_ns, "ip", &["-j", "-s", "link", "show", "dev", "np-vxlan0"]));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v[0]["stats64"]["rx"]["packets"].as_u64().unwrap()
    };
    let u1 = c.node(1).ip_of("u1", "ul");
    c.wait_for(10, "u1's address known on node0", || {
        c.node(0).try_np(&["exec", "u0", "--", "ping", "-c", "1", "-W", "1", &u1]).status.success()
    });
    let before = (rx(0), rx(1));
    let ping = c.node(0).np(&["exec", "u0", "--", "ping", "-c", "3", "-i", "0.2", "-W", "2", &u1]);
    assert!(ping.contains("3 received"), "{ping}");
    assert_eq!((rx(0), rx(1)), before, "the pings were decapsulated on the underlay, not by the device");
    for (i, name) in [(0, "u0"), (1, "u1")] {
        c.node(i).np(&["rm", "-f", name]);
    }
    c.node(0).np(&["network", "rm", "ul"]);
    c.wait_for(10, "underlay_in gone with the last overlay", || !underlay_in_on(&c, 1).1);
}

/// A node whose daemon was away longer than its lease comes back and resyncs: while it is
/// down its task runs elsewhere and its container's name is gone from the others; back, it
/// is ready again, no longer runs the task that moved (the service keeps its replica count),
/// and its container is known (name, route) on the other node again.
#[test]
fn a_node_back_after_its_lease_expired_resyncs() {
    let mut c = ClusterLab::new("ov-back", 2);
    c.wait_for(20, "2 nodes ready", || all_ready(&c, 0, 2));
    c.node(0).np(&["network", "create", "-d", "overlay", "--attachable", "--subnet", "10.93.0.0/24", "ov"]);
    c.wait_for(10, "ov on node1", || c.node(1).np(&["network", "ls", "-q"]).lines().any(|n| n == "ov"));
    echo_service(c.node(0), "web", "ov");
    c.wait_for(30, "a task on each node", || (0..2).all(|i| running_tasks(c.node(i), "web").len() == 1));
    c.node(0).np(&["run", "-d", "--name", "peer", "--network", "ov", "--", "sleep", "600"]);
    c.node(1).np(&["run", "-d", "--name", "back", "--network", "ov", "--", "sleep", "600"]);
    let back_ip = c.node(1).ip_of("back", "ov");
    c.wait_for(10, "back resolving on node0", || getent(c.node(0), "peer", "back") == vec![back_ip.clone()]);
    let task1 = running_tasks(c.node(1), "web").remove(0);
    let task1_ip = c.node(1).ip_of(&task1, "ov");

    // The daemon stops (its containers keep running) and stays away past the lease (5 s).
    c.node_mut(1).stop_daemon();
    c.wait_for(15, "node1 down on node0", || c.node_ls(0).contains(&("node1".into(), "down".into())));
    c.wait_for(5, "back gone from node0's names", || getent(c.node(0), "peer", "back").is_empty());
    c.wait_for(30, "node1's task moved to node0", || running_tasks(c.node(0), "web").len() == 2);
    // node1's containers still hold their addresses: neither the moved task nor a container
    // started meanwhile gets one of them (the lowest free addresses, had they been freed).
    c.node(0).np(&["run", "-d", "--name", "late", "--network", "ov", "--", "sleep", "600"]);
    let mut on0: Vec<String> = running_tasks(c.node(0), "web").iter().map(|t| c.node(0).ip_of(t, "ov")).collect();
    on0.push(c.node(0).ip_of("late", "ov"));
    for ip in [&back_ip, &task1_ip] {
        assert!(!on0.contains(ip), "{ip} of a container on the down node1 was handed out again: {on0:?}");
    }

    c.node_mut(1).start_daemon_with(&ClusterLab::daemon_opts(1));
    c.wait_for(20, "node1 ready again", || all_ready(&c, 0, 2));
    c.wait_for(20, "the moved task gone from node1", || {
        running_tasks(c.node(1), "web").is_empty() && !c.node(1).np(&["ps", "-a"]).contains("web.")
    });
    assert_eq!(running_tasks(c.node(0), "web").len(), 2, "the service keeps its 2 replicas");
    assert_eq!(c.node(1).ip_of("back", "ov"), back_ip, "back kept its address");
    c.wait_for(10, "back resolving on node0 again", || getent(c.node(0), "peer", "back") == vec![back_ip.clone()]);
    let ping = c.node(0).np(&["exec", "peer", "--", "ping", "-c", "1", "-W", "2", "back"]);
    assert!(ping.contains("1 received"), "{ping}");
    // The VIP balances over the running tasks only (both on node0 now).
    let vip = service_vip(c.node(0), "web");
    let live: BTreeSet<String> = running_tasks(c.node(0), "web").iter().map(|t| c.node(0).ip_of(t, "ov")).collect();
    for t in running_tasks(c.node(0), "web") {
        c.wait_for(10, "the task listening", || listening(c.node(0), &t));
    }
    c.wait_for(15, "the VIP balancing over the live tasks", || {
        spread(c.node(1), "back", &vip, 20).keys().cloned().collect::<BTreeSet<_>>() == live
    });
}

/// Overlay interfaces follow the underlay's MTU, whatever it is: on a 1400-byte underlay,
/// containers get 1350, and a full-size packet with don't-fragment set crosses hosts.
#[test]
fn overlay_interfaces_take_the_underlay_mtu_less_the_vxlan_overhead() {
    let c = ClusterLab::new("ov-mtu", 2);
    c.wait_for(20, "2 nodes ready", || all_ready(&c, 0, 2));
    for i in 0..2 {
        must(c.node(i).host("ip", &["link", "set", "ul0", "mtu", "1400"]));
        must(c.infra.host("ip", &["link", "set", &format!("ulp{i}"), "mtu", "1400"]));
    }
    c.node(0).np(&["network", "create", "-d", "overlay", "--attachable", "--subnet", "10.94.0.0/24", "ov"]);
    c.wait_for(10, "ov on node1", || c.node(1).np(&["network", "ls", "-q"]).lines().any(|n| n == "ov"));
    for (i, name) in [(0, "m0"), (1, "m1")] {
        c.node(i).np(&["run", "-d", "--name", name, "--network", "ov", "--", "sleep", "600"]);
        let link = must(in_ns(&c.node(i).sandbox(name), "ip", &["-o", "link", "show", "eth0"]));
        assert!(link.contains("mtu 1350"), "node{i}: {link}");
    }
    let m1 = c.node(1).ip_of("m1", "ov");
    // 1322 bytes of ICMP payload + 28 of headers = 1350, + 50 of VXLAN = the underlay's 1400.
    c.wait_for(10, "a full-size DF ping across hosts", || {
        c.node(0)
            .try_np(&["exec", "m0", "--", "ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1322", &m1])
            .status
            .success()
    });
}
