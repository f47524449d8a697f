//! `cargo xtask demo`: a guided tour of netpath in a throwaway network-namespace lab.
//! Every step prints the command a user would type and what came back.

use std::time::Duration;

use netpath_tests::cluster::{ClusterLab, ETCD_IP, ETCD_PORT, node_ip};
use netpath_tests::{CLIENT_IP, HOST_ETH0_IP, Lab, in_ns, must};

fn step(title: &str) {
    println!("\n\x1b[1m== {title}\x1b[0m");
}

fn np(lab: &Lab, args: &[&str]) -> String {
    println!(
        "$ netpath {}",
        args.iter()
            .map(|a| if a.contains(' ') { format!("'{a}'") } else { a.to_string() })
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = lab.np(args);
    print!("{out}");
    out
}

fn counters(lab: &Lab, c: &str, net: &str) -> serde_json::Value {
    lab.inspect(c)["NetworkSettings"]["Networks"][net]["Counters"].clone()
}

fn main() {
    step("A lab: a \"host\" network namespace running the real netpath daemon");
    let mut lab = Lab::new("demo");
    println!("lab dir {}, daemon socket {}", lab.dir.display(), lab.socket.display());
    np(&lab, &["network", "ls"]);

    step("A user-defined bridge network (next free /16 from 172.18.0.0)");
    np(&lab, &["network", "create", "demo-net"]);

    step("A web container, detached and supervised by the daemon");
    np(
        &lab,
        &[
            "run",
            "-d",
            "--name",
            "web",
            "--network",
            "demo-net",
            "--",
            "socat",
            "TCP-LISTEN:80,fork,reuseaddr",
            "SYSTEM:echo HTTP/1.0 200 OK; echo; echo hello from web",
        ],
    );
    let ip = lab.ip_of("web", "demo-net");
    for _ in 0..100 {
        if !lab.np(&["exec", "web", "--", "ss", "-Hltn", "sport = :80"]).trim().is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    np(&lab, &["ps"]);
    let before = counters(&lab, "web", "demo-net");

    step("A second container talks to web across the bridge, by name");
    np(
        &lab,
        &["run", "--rm", "--name", "client", "--network", "demo-net", "--", "socat", "-t", "2", "-", "TCP:web:80"],
    );
    np(&lab, &["run", "-d", "--name", "client2", "--network", "demo-net", "--", "sleep", "60"]);
    np(&lab, &["exec", "client2", "--", "ping", "-c", "2", "-i", "0.2", &ip]);

    step("Names: the daemon's DNS server answers at 127.0.0.11 inside each container's namespace");
    np(&lab, &["exec", "client2", "--", "cat", "/etc/resolv.conf"]);
    let resolved = np(&lab, &["exec", "client2", "--", "getent", "hosts", "web"]);
    np(&lab, &["run", "-d", "--name", "api", "--network", "demo-net", "--alias", "backend", "--", "sleep", "60"]);
    let alias = np(&lab, &["exec", "client2", "--", "getent", "hosts", "backend"]);
    let api_ip = lab.ip_of("api", "demo-net");
    np(&lab, &["exec", "client2", "--", "dig", "+short", "-x", &api_ip]);
    np(&lab, &["rm", "-f", "api"]);
    let gone = np(&lab, &["exec", "client2", "--", "sh", "-c", "getent hosts backend || echo \"backend: not found\""]);
    let names_ok = resolved.split_whitespace().next() == Some(ip.as_str())
        && alias.split_whitespace().next() == Some(api_ip.as_str())
        && gone.contains("not found");
    println!("names, aliases, reverse names; gone with the container: {}", if names_ok { "yes" } else { "NO" });

    step("The eBPF datapath counted it (TC programs on web's veth, per-CPU map)");
    let after = counters(&lab, "web", "demo-net");
    println!("web counters before: {before}");
    println!("web counters after:  {after}");
    let moved = ["RxPackets", "TxPackets"].iter().all(|k| after[k].as_u64() > before[k].as_u64());
    println!("counters moving: {}", if moved { "yes" } else { "NO" });

    step("Publish a port: -p 8080:80, DNAT in eBPF on the uplink, no proxy, no iptables");
    np(
        &lab,
        &[
            "run",
            "-d",
            "--name",
            "whoami",
            "--network",
            "demo-net",
            "-p",
            "8080:80",
            "--",
            "socat",
            "TCP-LISTEN:80,fork,reuseaddr",
            "SYSTEM:echo HTTP/1.0 200 OK; echo; echo you are $SOCAT_PEERADDR",
        ],
    );
    for _ in 0..100 {
        if !lab.np(&["exec", "whoami", "--", "ss", "-Hltn", "sport = :80"]).trim().is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    np(&lab, &["port", "whoami"]);
    // No request body: the toy server answers without reading, and unread bytes would turn its
    // close into a reset that can swallow the answer.
    let curl = format!("socat -t 10 - TCP:{HOST_ETH0_IP}:8080 </dev/null");
    println!("client namespace ({CLIENT_IP})$ {curl}");
    let answer = must(in_ns(&lab.client_ns, "sh", &["-c", &curl]));
    print!("{answer}");
    let kept = answer.contains(&format!("you are {CLIENT_IP}"));
    println!("the container saw the real client address {CLIENT_IP}: {}", if kept { "yes" } else { "NO" });
    println!("host namespace$ socat - TCP:127.0.0.1:8080   (cgroup socket programs, no proxy)");
    print!("{}", must(lab.host("sh", &["-c", "socat -t 10 - TCP:127.0.0.1:8080 </dev/null"])));
    np(&lab, &["system", "flows"]);
    let rules = must(lab.host("iptables-save", &[]));
    println!("iptables rules in the host namespace: {}", rules.lines().filter(|l| l.starts_with("-A")).count());

    step("Restart the daemon under load: the datapath outlives it, no flow drops");
    np(&lab, &["run", "-d", "--name", "perf", "--network", "demo-net", "-p", "5201:5201", "--", "iperf3", "-s"]);
    for _ in 0..100 {
        if !lab.np(&["exec", "perf", "--", "ss", "-Hltn", "sport = :5201"]).trim().is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let iperf = format!("iperf3 -c {HOST_ETH0_IP} -p 5201 -t 6 -i 1 -b 200M");
    println!("client namespace$ {iperf} &");
    let stream = in_ns(&lab.client_ns, "sh", &["-c", &iperf]).stdout(std::process::Stdio::piped()).spawn();
    std::thread::sleep(Duration::from_secs(2));
    println!("$ kill -TERM <daemon>; netpath daemon ...   (stop and start while the stream runs)");
    lab.restart_daemon();
    np(&lab, &["system", "info"]);
    let survived = match stream.and_then(|c| c.wait_with_output()) {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            print!("{}", text.lines().filter(|l| l.contains("sec")).collect::<Vec<_>>().join("\n") + "\n");
            out.status.success() && !text.contains(" 0.00 bits/sec")
        }
        Err(e) => {
            println!("iperf3: {e}");
            false
        }
    };
    println!(
        "the stream kept going across the restart, no second without traffic: {}",
        if survived { "yes" } else { "NO" }
    );

    step("Direct routing to a container address is dropped (Docker's default gateway mode, nat)");
    let ip = lab.ip_of("whoami", "demo-net");
    let route = format!("ip route add {ip}/32 via {HOST_ETH0_IP}");
    println!("client namespace$ {route}");
    must(in_ns(&lab.client_ns, "sh", &["-c", &route]));
    let direct = format!("socat -t 2 - TCP:{ip}:80,connect-timeout=2 </dev/null");
    println!("client namespace$ {direct}");
    let got_in = in_ns(&lab.client_ns, "sh", &["-c", &direct]).output().map(|o| o.status.success()).unwrap_or(false);
    println!("reached the container by its own address: {}", if got_in { "YES" } else { "no (dropped in eBPF)" });
    let counters: serde_json::Value = serde_json::from_str(&lab.np(&["system", "datapath"])).unwrap_or_default();
    println!("drops counted as direct-access: {}", counters["drops"]["direct-access"]);

    let xdp_ok = xdp_step(&mut lab, &curl, &direct);

    step("A firewall in eBPF: a deny rule drops one outside client, the flow log names the rule");
    let far = "198.51.100.9";
    println!("client namespace$ ip addr add {far}/24 dev eth0   (a second outside client)");
    must(in_ns(&lab.client_ns, "ip", &["addr", "add", &format!("{far}/24"), "dev", "eth0"]));
    np(
        &lab,
        &["firewall", "add", "--name", "block-far", "--deny", "--from", "198.51.100.8/29", "--to-container", "whoami"],
    );
    np(&lab, &["firewall", "ls"]);
    println!("$ netpath system flows --follow &");
    let mut follow = lab.np_cmd(&["system", "flows", "--follow"]).stdout(std::process::Stdio::piped()).spawn().ok();
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    if let Some(out) = follow.as_mut().and_then(|f| f.stdout.take()) {
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
    }
    std::thread::sleep(Duration::from_millis(500));
    let ask = |from: &str| {
        let cmd = format!("socat -t 3 - TCP:{HOST_ETH0_IP}:8080,connect-timeout=2,bind={from} </dev/null");
        println!("client namespace ({from})$ socat - TCP:{HOST_ETH0_IP}:8080");
        let out = in_ns(&lab.client_ns, "sh", &["-c", &cmd]).output();
        let ok = out.as_ref().is_ok_and(|o| o.status.success());
        print!("{}", out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default());
        println!("{}", if ok { "(answered)" } else { "(no answer: dropped)" });
        ok
    };
    let near_in = ask(CLIENT_IP);
    let far_in = ask(far);
    let mut named = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while let Ok(l) = lines.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
        if l.contains("policy-denied") {
            println!("{l}");
            named = l.contains("block-far");
            break;
        }
    }
    if let Some(mut f) = follow {
        let _ = f.kill();
        let _ = f.wait();
    }
    let counters: serde_json::Value = serde_json::from_str(&lab.np(&["system", "datapath"])).unwrap_or_default();
    println!("drops counted as policy-denied: {}", counters["drops"]["policy-denied"]);
    np(&lab, &["firewall", "rm", "block-far"]);
    let firewall_ok = near_in && !far_in && named;
    println!("one client in, the other dropped, the rule named: {}", if firewall_ok { "yes" } else { "NO" });

    step("A macvlan network on the host's eth0: containers on the client's own subnet, no NAT");
    np(
        &lab,
        &[
            "network",
            "create",
            "-d",
            "macvlan",
            "--subnet",
            "198.51.100.0/24",
            "--ip-range",
            "198.51.100.128/25",
            "--gateway",
            CLIENT_IP,
            "-o",
            "parent=eth0",
            "demo-mv",
        ],
    );
    np(
        &lab,
        &[
            "run",
            "-d",
            "--name",
            "mv-web",
            "--network",
            "demo-mv",
            "--",
            "socat",
            "TCP-LISTEN:80,fork",
            "SYSTEM:echo hello from macvlan",
        ],
    );
    let mv_ip = lab.ip_of("mv-web", "demo-mv");
    std::thread::sleep(Duration::from_millis(300));
    let get = format!("socat -t 5 - TCP:{mv_ip}:80,connect-timeout=5 </dev/null");
    println!("client namespace$ {get}");
    let mv_out =
        in_ns(&lab.client_ns, "sh", &["-c", &get]).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    let mv_ok = mv_out.as_deref().is_ok_and(|o| o.contains("hello from macvlan"));
    print!("{}", mv_out.unwrap_or_default());
    println!("(the host itself cannot reach it: -o netpath.macvlan.host_access=true adds it a way)");

    step("An internal network: its containers talk to each other, nothing leaves");
    np(&lab, &["network", "create", "--internal", "demo-int"]);
    np(&lab, &["run", "-d", "--name", "int1", "--network", "demo-int", "--", "sleep", "600"]);
    let ping = ["exec", "int1", "--", "ping", "-c", "1", "-W", "1", CLIENT_IP];
    println!("$ netpath {}", ping.join(" "));
    let left = lab.try_np(&ping).status.success();
    println!("reached the outside: {}", if left { "YES" } else { "no (dropped in eBPF)" });
    let counters: serde_json::Value = serde_json::from_str(&lab.np(&["system", "datapath"])).unwrap_or_default();
    println!("drops counted as internal: {}", counters["drops"]["internal"]);

    step("A service: 3 replicas behind one VIP, balanced by a Maglev table in eBPF");
    np(
        &lab,
        &[
            "service",
            "create",
            "--name",
            "hello",
            "--network",
            "demo-net",
            "--replicas",
            "3",
            "--publish",
            "published=8081,target=80",
            "--",
            "socat",
            "TCP-LISTEN:80,fork,reuseaddr",
            "SYSTEM:echo $SOCAT_SOCKADDR",
        ],
    );
    let mut ready = false;
    for _ in 0..100 {
        let ps = lab.np(&["service", "ps", "hello"]);
        ready = ps.lines().filter(|l| l.contains("running")).count() == 3
            && (1..=3).all(|i| {
                !lab.np(&["exec", &format!("hello.{i}"), "--", "ss", "-Hltn", "sport = :80"]).trim().is_empty()
            });
        if ready {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    np(&lab, &["service", "ls"]);
    np(&lab, &["service", "ps", "hello"]);
    np(&lab, &["exec", "client2", "--", "getent", "hosts", "hello"]);
    let spread =
        "for p in $(seq 20000 20059); do socat -u TCP:hello:80,sourceport=$p,reuseaddr -; done | sort | uniq -c";
    np(&lab, &["exec", "client2", "--", "sh", "-c", spread]);
    let outside = format!(
        "for p in $(seq 21000 21029); do socat -u TCP:{HOST_ETH0_IP}:8081,sourceport=$p,reuseaddr -; done | sort | uniq -c"
    );
    println!("client namespace$ {outside}");
    let from_outside = must(in_ns(&lab.client_ns, "sh", &["-c", &outside]));
    print!("{from_outside}");
    let balanced = ready && from_outside.lines().count() == 3;
    println!(
        "connections spread over the 3 replicas, from inside and outside: {}",
        if balanced { "yes" } else { "NO" }
    );
    np(&lab, &["service", "scale", "hello=1"]);
    np(&lab, &["service", "rm", "hello"]);

    step("Inspect the network");
    np(&lab, &["network", "inspect", "demo-net"]);

    step("Clean up: containers, network, then the lab itself");
    np(&lab, &["rm", "-f", "web", "client2", "whoami", "perf", "mv-web", "int1"]);
    np(&lab, &["network", "rm", "demo-net", "demo-mv", "demo-int"]);
    drop(lab);
    println!("lab removed: no namespaces, links or pins left behind");

    let multi_host = multi_host();
    if !moved
        || !kept
        || got_in
        || !names_ok
        || !survived
        || !xdp_ok
        || !mv_ok
        || left
        || !balanced
        || !firewall_ok
        || !multi_host
    {
        std::process::exit(1);
    }
}

/// XDP switched on by a restart: the published port (`curl`, from the client) answers with its
/// frames redirected by XDP, and direct access (`direct`) is dropped there under the same
/// reason; then back to TC alone. True when all of it held.
fn xdp_step(lab: &mut Lab, curl: &str, direct: &str) -> bool {
    step("XDP on the uplink: the same NAT and drops, decided before the kernel builds a socket buffer");
    println!("$ kill -TERM <daemon>; netpath daemon --xdp native ...   (a restart switches it; flows carry on)");
    lab.set_daemon_args(&["--xdp", "native"]);
    lab.restart_daemon();
    let dp =
        |lab: &Lab| -> serde_json::Value { serde_json::from_str(&lab.np(&["system", "datapath"])).unwrap_or_default() };
    let before = dp(lab);
    println!("$ netpath system datapath   →   \"xdp\": {}", before["xdp"]);
    // A socket on this machine leaves TCP checksums to offload, which XDP cannot finish (TC
    // can): a client off a wire sends them whole, as this one now does.
    println!("client namespace$ ethtool -K eth0 tx off   (full checksums, as frames off a wire carry)");
    lab.client_sends_full_checksums();
    let redirects = lab.uplink_xdp_redirects();
    println!("client namespace$ {curl}");
    let answer =
        in_ns(&lab.client_ns, "sh", &["-c", curl]).output().map(|o| String::from_utf8_lossy(&o.stdout).to_string());
    let answer = answer.unwrap_or_default();
    print!("{answer}");
    let moved = lab.uplink_xdp_redirects() - redirects;
    println!("frames uplink_xdp handed straight to the container's veth: {moved}");
    println!("client namespace$ {direct}");
    let got_in = in_ns(&lab.client_ns, "sh", &["-c", direct]).output().map(|o| o.status.success()).unwrap_or(false);
    let after = dp(lab);
    let dropped =
        after["drops"]["direct-access"].as_u64().unwrap_or(0) - before["drops"]["direct-access"].as_u64().unwrap_or(0);
    println!(
        "reached the container by its own address: {}; drops counted as direct-access meanwhile: {dropped}",
        if got_in { "YES" } else { "no (dropped in XDP)" }
    );
    must(in_ns(&lab.client_ns, "ethtool", &["-K", "eth0", "tx", "on"]));
    println!("$ netpath daemon ...   (restarted without --xdp: TC alone again, the default)");
    lab.set_daemon_args(&[]);
    lab.restart_daemon();
    answer.contains("you are") && moved > 0 && !got_in && dropped > 0
}

/// Two hosts, a real etcd, an overlay network across them and a service spread over both.
/// True when everything answered as it should.
fn multi_host() -> bool {
    step("Multi-host: two hosts on an underlay network, each with its daemon, and a real etcd");
    let c = ClusterLab::new("demo-mh", 2);
    let ready = |i: usize| c.node(i).np(&["node", "ls"]).lines().filter(|l| l.contains("ready")).count() == 2;
    for _ in 0..100 {
        if ready(0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "(daemons started with --cluster-store etcd://{ETCD_IP}:{ETCD_PORT} --node-ip {} / {})",
        node_ip(0),
        node_ip(1)
    );
    np(c.node(0), &["node", "ls"]);

    step("An overlay network made on host A is on host B too (a VNI, MTU = underlay - 50)");
    np(c.node(0), &["network", "create", "-d", "overlay", "--attachable", "--subnet", "10.60.0.0/24", "ov"]);
    for _ in 0..100 {
        if c.node(1).np(&["network", "ls", "-q"]).lines().any(|n| n == "ov") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    np(c.node(1), &["network", "ls"]);

    step("A container on host A, reached by name from host B through the VXLAN tunnel");
    np(
        c.node(0),
        &[
            "run",
            "-d",
            "--name",
            "web-a",
            "--network",
            "ov",
            "--",
            "socat",
            "TCP-LISTEN:80,fork,reuseaddr",
            "SYSTEM:echo hello from host A",
        ],
    );
    np(c.node(1), &["run", "-d", "--name", "client-b", "--network", "ov", "--", "sleep", "600"]);
    let mut answer = String::new();
    for _ in 0..100 {
        let out = c.node(1).try_np(&["exec", "client-b", "--", "socat", "-T", "2", "-", "TCP:web-a:80"]);
        answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if answer == "hello from host A" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("host B$ netpath exec client-b -- socat - TCP:web-a:80\n{answer}");
    let reached = answer == "hello from host A";

    step("A service across both hosts: one VIP, balanced over the tasks of both");
    np(
        c.node(1),
        &[
            "service",
            "create",
            "--name",
            "hello",
            "--network",
            "ov",
            "--replicas",
            "2",
            "--",
            "socat",
            "TCP-LISTEN:80,fork,reuseaddr",
            "SYSTEM:echo $SOCAT_SOCKADDR",
        ],
    );
    let spread = "for i in $(seq 1 20); do socat -u -T 2 TCP:hello:80,connect-timeout=2 - ; done | sort | uniq -c";
    let run = || {
        String::from_utf8_lossy(&c.node(1).try_np(&["exec", "client-b", "--", "sh", "-c", spread]).stdout).into_owned()
    };
    // Both tasks answering first (they start on their hosts in parallel), then the tour's run.
    for _ in 0..100 {
        if run().lines().count() == 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = run();
    println!("host B$ netpath exec client-b -- sh -c '{spread}'\n{out}");
    let balanced = out.lines().count() == 2;
    np(c.node(0), &["service", "ps", "hello"]);
    np(c.node(1), &["service", "rm", "hello"]);

    step("The routing mesh: a published service port answers on every host, wherever its task runs");
    np(
        c.node(0),
        &[
            "service",
            "create",
            "--name",
            "mesh",
            "--network",
            "ov",
            "--replicas",
            "1",
            "-p",
            "8090:80",
            "--",
            "socat",
            "TCP-LISTEN:80,fork,reuseaddr",
            "SYSTEM:echo task sees $SOCAT_PEERADDR",
        ],
    );
    let ask = |i: usize| {
        let to = format!("TCP:{HOST_ETH0_IP}:8090,connect-timeout=2");
        let out = in_ns(&c.node(i).client_ns, "socat", &["-u", "-T", "2", &to, "-"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let mut meshed = false;
    for _ in 0..100 {
        if (0..2).all(|i| !ask(i).is_empty()) {
            meshed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for i in 0..2 {
        let host = if i == 0 { "A" } else { "B" };
        println!("client of host {host}$ socat - TCP:{HOST_ETH0_IP}:8090   -> {}", ask(i));
    }
    println!(
        "(the host running the task hands it the client's own address, {CLIENT_IP}; the other \
         reaches it through the tunnel from its own address, as Docker's ingress network does)"
    );
    np(c.node(1), &["service", "rm", "mesh"]);
    drop(c);
    println!("cluster lab removed");
    println!(
        "across hosts: by name {}, service balanced over both hosts {}, routing mesh {}",
        if reached { "yes" } else { "NO" },
        if balanced { "yes" } else { "NO" },
        if meshed { "yes" } else { "NO" }
    );
    reached && balanced && meshed
}
