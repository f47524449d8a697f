//! Services end to end: a VIP per network spread over tasks by the datapath's Maglev tables,
//! replicas the daemon runs and restarts, affinity, backends leaving, bad input.

mod common;

use std::collections::HashMap;

use common::wait_listening;
use netpath_tests::Lab;

/// The port the test services serve: each connection gets the task's own address back.
const PORT: u16 = 80;

/// The tasks' command: answers every connection with the address it was reached at.
fn whoami_cmd() -> Vec<&'static str> {
    vec!["socat", "TCP-LISTEN:80,fork,reuseaddr", "SYSTEM:echo $SOCAT_SOCKADDR"]
}

fn inspect_service(lab: &Lab, name: &str) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_str(&lab.np(&["service", "inspect", name])).expect("service inspect JSON");
    v[0].clone()
}

/// The service's VIP on `network` (without the prefix length).
fn vip(lab: &Lab, name: &str, network: &str) -> String {
    let v = inspect_service(lab, name);
    let vips = v["Endpoint"]["VirtualIPs"].as_array().cloned().unwrap_or_default();
    let addr =
        vips.iter().find(|x| x["Network"] == network).unwrap_or_else(|| panic!("no VIP on {network}: {v}"))["Addr"]
            .as_str()
            .unwrap()
            .to_string();
    addr.split('/').next().unwrap().to_string()
}

/// Waits (bounded) until the service has exactly `n` running tasks and each listens.
fn wait_tasks(lab: &Lab, name: &str, n: usize) -> Vec<String> {
    for _ in 0..200 {
        let v = inspect_service(lab, name);
        let tasks = v["Tasks"].as_array().cloned().unwrap_or_default();
        let running: Vec<String> =
            tasks.iter().filter(|t| t["State"] == "running").map(|t| t["Name"].as_str().unwrap().to_string()).collect();
        if tasks.len() == n && running.len() == n {
            for t in &running {
                wait_listening(lab, t, PORT);
            }
            return running;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("service {name} did not get {n} running tasks: {}", inspect_service(lab, name));
}

/// Opens `count` connections from `client` to ip:80 and counts the answers by task address.
/// Each from its own source port, counting up from a base that differs per call: the kernel
/// would otherwise reuse a few ports over and over, and a port whose closed flow conntrack
/// still holds (10 s) goes where that flow went, which is not a new connection's choice.
fn spread(lab: &Lab, client: &str, ip: &str, count: usize) -> HashMap<String, usize> {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(20000);
    let base = NEXT.fetch_add(count, std::sync::atomic::Ordering::Relaxed);
    assert!(base + count < 40000, "source ports run into the fixed ones");
    let script = format!(
        "for p in $(seq {base} {}); do socat -u -T 5 TCP:{ip}:{PORT},connect-timeout=5,sourceport=$p,reuseaddr - || echo failed; done",
        base + count - 1
    );
    let out = lab.np(&["exec", client, "--", "sh", "-c", &script]);
    let mut m = HashMap::new();
    for l in out.lines() {
        *m.entry(l.trim().to_string()).or_insert(0) += 1;
    }
    m
}

/// Each backend got its share ±20%. A statistical check: callers give each backend ≥ 200
/// connections, so that ±20% is at least 3σ of the binomial spread.
fn assert_even(m: &HashMap<String, usize>, backends: &[String], count: usize) {
    let share = count / backends.len();
    assert_eq!(m.values().sum::<usize>(), count, "{m:?}");
    for b in backends {
        let got = *m.get(b).unwrap_or(&0);
        assert!(got * 5 >= share * 4 && got * 5 <= share * 6, "{b} got {got} of {count}, want {share} ± 20%: {m:?}");
    }
    assert!(m.keys().all(|k| backends.contains(k)), "answers from elsewhere: {m:?}");
}

/// Addresses of a service's tasks on `network`.
fn task_addrs(lab: &Lab, tasks: &[String], network: &str) -> Vec<String> {
    tasks.iter().map(|t| lab.ip_of(t, network)).collect()
}

#[test]
fn six_hundred_connections_spread_over_three_replicas_and_scale_keeps_the_spread() {
    let lab = Lab::new("svcspread");
    lab.np(&["network", "create", "app"]);
    let mut args = vec!["service", "create", "--name", "web", "--network", "app", "--replicas", "3", "--"];
    args.extend(whoami_cmd());
    lab.np(&args);
    let tasks = wait_tasks(&lab, "web", 3);
    assert_eq!(tasks, ["web.1", "web.2", "web.3"]);
    lab.np(&["run", "-d", "--name", "client", "--network", "app", "--", "sleep", "600"]);
    let vip = vip(&lab, "web", "app");
    let m = spread(&lab, "client", &vip, 600);
    assert_even(&m, &task_addrs(&lab, &tasks, "app"), 600);

    // The task list and ls show the same.
    let ps = lab.np(&["service", "ps", "web"]);
    assert_eq!(ps.lines().filter(|l| l.contains("running")).count(), 3, "{ps}");
    assert!(lab.np(&["service", "ls"]).contains("3/3"));

    lab.np(&["service", "scale", "web=5"]);
    let tasks = wait_tasks(&lab, "web", 5);
    // 200 per task: ±20% is then 3σ of the binomial spread, as with 600 over 3.
    assert_even(&spread(&lab, "client", &vip, 1000), &task_addrs(&lab, &tasks, "app"), 1000);
    lab.np(&["service", "update", "--replicas", "2", "web"]);
    let tasks = wait_tasks(&lab, "web", 2);
    assert_eq!(tasks, ["web.1", "web.2"]);
    assert!(lab.try_np(&["inspect", "web.3"]).status.code() != Some(0), "web.3 is gone");
    assert_even(&spread(&lab, "client", &vip, 400), &task_addrs(&lab, &tasks, "app"), 400);

    // rm takes the tasks, the VIP and its entries along; nothing answers there any more.
    lab.np(&["service", "rm", "web"]);
    assert!(lab.np(&["ps", "-a"]).lines().all(|l| !l.contains("web.")));
    assert!(lab.np(&["service", "ls"]).lines().count() == 1);
    let out = lab.try_np(&[
        "exec",
        "client",
        "--",
        "socat",
        "-u",
        "-T",
        "2",
        &format!("TCP:{vip}:{PORT},connect-timeout=2"),
        "-",
    ]);
    assert!(!out.status.success(), "the VIP still answers after rm");
}

/// Starts `n` detached whoami containers named `{prefix}{i}` on `network`.
fn backends(lab: &Lab, prefix: &str, n: usize, network: &str) -> Vec<String> {
    let names: Vec<String> = (1..=n).map(|i| format!("{prefix}{i}")).collect();
    for b in &names {
        let mut args = vec!["run", "-d", "--name", b.as_str(), "--network", network, "--"];
        args.extend(whoami_cmd());
        lab.np(&args);
    }
    for b in &names {
        wait_listening(lab, b, PORT);
    }
    names
}

/// One connection per source port in `ports` from `client` to ip:80: the answering address
/// for each port (or "failed").
fn by_source_port(lab: &Lab, client: &str, ip: &str, ports: std::ops::Range<u16>) -> Vec<String> {
    let script = format!(
        "for p in $(seq {} {}); do socat -u -T 5 TCP:{ip}:{PORT},connect-timeout=5,sourceport=$p,reuseaddr - || echo failed; done",
        ports.start,
        ports.end - 1
    );
    lab.np(&["exec", client, "--", "sh", "-c", &script]).lines().map(|l| l.trim().to_string()).collect()
}

/// Waits (bounded) until conntrack holds no flow to `ip`: closed flows linger 10 s, and a
/// flow the table still holds would keep its old backend.
fn wait_flows_gone(lab: &Lab, ip: &str) {
    for _ in 0..300 {
        if !lab.np(&["system", "flows"]).contains(&format!("\"{ip}:")) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("flows to {ip} stayed: {}", lab.np(&["system", "flows"]));
}

#[test]
fn removing_one_of_ten_backends_moves_few_clients_and_it_gets_no_new_connection() {
    let lab = Lab::new("svcremap");
    lab.np(&["network", "create", "app"]);
    let names = backends(&lab, "b", 10, "app");
    let mut args = vec!["service", "create", "--name", "web", "--network", "app"];
    for b in &names {
        args.extend(["--backend", b.as_str()]);
    }
    lab.np(&args);
    lab.np(&["run", "-d", "--name", "client", "--network", "app", "--", "sleep", "600"]);
    let vip = vip(&lab, "web", "app");
    const CLIENTS: std::ops::Range<u16> = 40000..40300;
    let before = by_source_port(&lab, "client", &vip, CLIENTS);
    assert!(before.iter().all(|a| a != "failed"), "{before:?}");
    let gone_ip = lab.ip_of("b4", "app");
    assert!(before.contains(&gone_ip));
    wait_flows_gone(&lab, &vip);

    lab.np(&["rm", "-f", "b4"]);
    let after = by_source_port(&lab, "client", &vip, CLIENTS);
    assert!(after.iter().all(|a| a != "failed" && *a != gone_ip), "a connection failed or reached b4: {after:?}");
    let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
    let had = before.iter().filter(|b| **b == gone_ip).count();
    assert!(moved * 100 <= CLIENTS.len() * 15, "{moved} of {} clients moved (b4 had {had})", CLIENTS.len());
    // Only b4's clients needed to move; Maglev moves few others.
    assert!(moved >= had, "{moved} < {had}");
    let ps = lab.np(&["service", "ps", "web"]);
    assert!(ps.lines().any(|l| l.starts_with("b4") && l.contains("pending")), "{ps}");
}

#[test]
fn client_ip_affinity_pins_a_client_and_names_resolve_in_the_service_networks_only() {
    let lab = Lab::new("svcaff");
    lab.np(&["network", "create", "app"]);
    lab.np(&["network", "create", "other"]);
    let mut args = vec![
        "service",
        "create",
        "--name",
        "web",
        "--network",
        "app",
        "--replicas",
        "3",
        "--affinity",
        "client-ip",
        "--",
    ];
    args.extend(whoami_cmd());
    lab.np(&args);
    let tasks = wait_tasks(&lab, "web", 3);
    lab.np(&["run", "-d", "--name", "c1", "--network", "app", "--", "sleep", "600"]);
    lab.np(&["run", "-d", "--name", "far", "--network", "other", "--", "sleep", "600"]);
    let vip = vip(&lab, "web", "app");
    let m = spread(&lab, "c1", &vip, 60);
    assert_eq!(m.len(), 1, "one client, one backend: {m:?}");
    assert!(task_addrs(&lab, &tasks, "app").contains(m.keys().next().unwrap()), "{m:?}");

    // DNS: the name is the VIP, tasks.NAME the tasks; not on other networks.
    let hosts = lab.np(&["exec", "c1", "--", "getent", "hosts", "web"]);
    assert!(hosts.starts_with(&format!("{vip} ")), "{hosts}");
    let all = lab.np(&["exec", "c1", "--", "getent", "ahostsv4", "tasks.web"]);
    for a in task_addrs(&lab, &tasks, "app") {
        assert!(all.contains(&a), "tasks.web lacks {a}: {all}");
    }
    assert!(!lab.try_np(&["exec", "far", "--", "getent", "hosts", "web"]).status.success());
    // Isolation holds for VIPs as for containers.
    let out = lab.try_np(&[
        "exec",
        "far",
        "--",
        "socat",
        "-u",
        "-T",
        "2",
        &format!("TCP:{vip}:{PORT},connect-timeout=2"),
        "-",
    ]);
    assert!(!out.status.success(), "another network reached the VIP");
}

#[test]
fn network_add_and_rm_move_the_service() {
    let lab = Lab::new("svcnet");
    lab.np(&["network", "create", "front"]);
    lab.np(&["network", "create", "back"]);
    let mut args = vec!["service", "create", "--name", "api", "--network", "back", "--replicas", "2", "--"];
    args.extend(whoami_cmd());
    lab.np(&args);
    wait_tasks(&lab, "api", 2);
    lab.np(&["run", "-d", "--name", "fc", "--network", "front", "--", "sleep", "600"]);
    lab.np(&["run", "-d", "--name", "bc", "--network", "back", "--", "sleep", "600"]);
    assert!(!lab.try_np(&["exec", "fc", "--", "getent", "hosts", "api"]).status.success());

    lab.np(&["service", "update", "--network-add", "front", "api"]);
    let front_vip = vip(&lab, "api", "front");
    // The tasks join the new network (asynchronously): wait for both to answer there.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..100 {
        let m = spread(&lab, "fc", "api", 20);
        seen.extend(m.keys().filter(|k| k.as_str() != "failed").cloned());
        if seen.len() == 2 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let tasks = ["api.1".to_string(), "api.2".to_string()];
    assert_eq!(seen, task_addrs(&lab, &tasks, "front").into_iter().collect(), "through {front_vip}");

    let back_vip = vip(&lab, "api", "back");
    lab.np(&["service", "update", "--network-rm", "back", "api"]);
    let out = lab.try_np(&[
        "exec",
        "bc",
        "--",
        "socat",
        "-u",
        "-T",
        "2",
        &format!("TCP:{back_vip}:{PORT},connect-timeout=2"),
        "-",
    ]);
    assert!(!out.status.success(), "the old VIP still answers");
    assert!(!lab.try_np(&["exec", "bc", "--", "getent", "hosts", "api"]).status.success());
    let m = spread(&lab, "fc", &front_vip, 20);
    assert_eq!(m.values().sum::<usize>(), 20);
    assert!(!m.contains_key("failed"), "{m:?}");
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let lab = Lab::new("svcbad");
    lab.np(&["network", "create", "app"]);
    lab.np(&["run", "-d", "--name", "pub", "--network", "app", "-p", "8080:80", "--", "sleep", "600"]);
    lab.np(&["service", "create", "--name", "one", "--network", "app", "--publish", "published=9090,target=80"]);
    let expose = ["--expose", "8000-8010", "--expose", "53/udp"];
    lab.np(&[&["run", "-d", "--name", "web", "--network", "app"][..], &expose, &["--", "sleep", "600"]].concat());
    let before_ls = lab.np(&["service", "ls"]);
    let before_ps = lab.np(&["ps", "-a"]);
    let cases: &[(&[&str], &str)] = &[
        (&["--name", "x", "--network", "nope"], "network nope not found"),
        (&["--name", "x", "--network", "app", "--backend", "ghost"], "container ghost not found"),
        (&["--name", "x", "--network", "app", "-p", "8080:80"], "already published by a container"),
        (
            &["--name", "x", "--network", "app", "--publish", "published=9090,target=81"],
            "already published by service one",
        ),
        (&["--name", "x", "--network", "app", "--replicas", "-1", "--", "sleep", "1"], "invalid replicas -1"),
        (&["--name", "x", "--network", "app", "--replicas", "2"], "replicas need a command"),
        (&["--name", "one", "--network", "app"], "already in use"),
        (&["--name", "x", "--network", "app", "--publish", "published=1,target=zz"], "invalid publish spec"),
        (&["--name", "x", "--network", "app", "--publish", "published=7,target=7,mode=mesh"], "invalid publish mode"),
        (&["--name", "x", "--network", "app", "--publish", "target=7,mode=host"], "mode=host needs a published port"),
        (&["--name", "x", "--network", "app", "--affinity", "sticky"], "invalid affinity"),
        (&["--name", "x", "--network", "host"], "services need a bridge network"),
        (
            &["--name", "x", "--network", "app", "--endpoint-mode", "dnsrr", "-p", "7070:70"],
            "dnsrr service cannot publish",
        ),
        // Backends that declare their ports (`-p`, `--expose`) must serve the service's targets.
        (
            &["--name", "x", "--network", "app", "--backend", "pub", "--publish", "published=7171,target=81"],
            "container pub does not serve target port 81/tcp of service x (it exposes 80/tcp)",
        ),
        (
            &["--name", "x", "--network", "app", "--backend", "web", "--publish", "target=53"],
            "container web does not serve target port 53/tcp of service x (it exposes 8000-8010/tcp, 53/udp)",
        ),
    ];
    for (args, want) in cases {
        let mut a = vec!["service", "create"];
        a.extend_from_slice(args);
        let err = lab.np_fails(&a);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert!(lab.np_fails(&["service", "scale", "one=-3"]).contains("invalid replicas -3"));
    assert!(lab.np_fails(&["service", "update", "--network-add", "nope", "one"]).contains("network nope not found"));
    assert!(lab.np_fails(&["service", "update", "--network-rm", "app", "one"]).contains("no network"));
    assert!(lab.np_fails(&["service", "update", "--rm-backend", "pub", "one"]).contains("not a backend"));
    assert!(lab.np_fails(&["service", "rm", "nope"]).contains("service nope not found"));
    let err = lab.np_fails(&["service", "update", "--add-backend", "web", "one"]);
    assert!(err.contains("container web does not serve target port 80/tcp of service one"), "{err}");
    // `run --service` joining a service it cannot serve leaves no container behind.
    let err =
        lab.np_fails(&["run", "-d", "--name", "late", "--service", "one", "--expose", "81", "--", "sleep", "600"]);
    assert!(err.contains("container late does not serve target port 80/tcp"), "{err}");
    assert_eq!(lab.np(&["service", "ls"]), before_ls);
    assert_eq!(lab.np(&["ps", "-a"]), before_ps);
    // What it declares is Docker's `Config.ExposedPorts`, and a target it covers is accepted.
    let v: serde_json::Value = serde_json::from_str(&lab.np(&["inspect", "web"])).unwrap();
    let exposed = v[0]["Config"]["ExposedPorts"].as_object().unwrap();
    assert_eq!(exposed.len(), 12, "{exposed:?}");
    assert!(exposed.contains_key("8005/tcp") && exposed.contains_key("53/udp"), "{exposed:?}");
    lab.np(&[
        "service",
        "create",
        "--name",
        "dns",
        "--network",
        "app",
        "--backend",
        "web",
        "--publish",
        "target=53,protocol=udp",
    ]);
    lab.np(&["service", "create", "--name", "alt", "--network", "app", "--backend", "web", "--publish", "target=8005"]);
}

#[test]
fn a_task_that_exits_is_restarted_and_a_restarted_daemon_keeps_the_service() {
    let mut lab = Lab::new("svcrestart");
    lab.np(&["network", "create", "app"]);
    let mut args = vec!["service", "create", "--name", "web", "--network", "app", "--replicas", "2", "--"];
    args.extend(whoami_cmd());
    lab.np(&args);
    wait_tasks(&lab, "web", 2);
    lab.np(&["run", "-d", "--name", "client", "--network", "app", "--", "sleep", "600"]);
    let vip = vip(&lab, "web", "app");

    // Kill one task's command (the child of its supervisor, whose pid inspect shows): it
    // exits, leaves the table and comes back as a new task.
    let pid = lab.inspect("web.1")["State"]["Pid"].as_u64().expect("pid");
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let child = children.split_whitespace().next().unwrap_or_else(|| panic!("no child of supervisor {pid}"));
    let _ = std::process::Command::new("kill").args(["-9", child]).status();
    let mut restarted = false;
    for _ in 0..100 {
        // The task is replaced (removed, then created again): for a moment it does not exist.
        let out = lab.try_np(&["inspect", "web.1"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let v = v[0].clone();
        let p = v["State"]["Pid"].as_u64();
        if out.status.success() && p.is_some_and(|p| p != pid) && v["State"]["Running"] == true {
            restarted = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(restarted, "web.1 was not restarted: {}", lab.np(&["service", "ps", "web"]));
    let tasks = wait_tasks(&lab, "web", 2);
    assert_even(&spread(&lab, "client", &vip, 400), &task_addrs(&lab, &tasks, "app"), 400);

    lab.restart_daemon();
    assert_eq!(self::vip(&lab, "web", "app"), vip);
    let tasks = wait_tasks(&lab, "web", 2);
    assert_even(&spread(&lab, "client", &vip, 400), &task_addrs(&lab, &tasks, "app"), 400);
}

#[test]
fn published_service_ports_reach_the_tasks_from_outside_and_from_host_processes() {
    use netpath_tests::{CLIENT_IP, HOST_ETH0_IP, in_ns, must};
    let lab = Lab::new("svcpub");
    lab.np(&["network", "create", "app"]);
    let mut args = vec![
        "service",
        "create",
        "--name",
        "web",
        "--network",
        "app",
        "--replicas",
        "2",
        "--publish",
        "published=8080,target=80",
        "--",
    ];
    // Answers with the address it was reached at and the client's address as it sees it.
    args.extend(["socat", "TCP-LISTEN:80,fork,reuseaddr", "SYSTEM:echo $SOCAT_SOCKADDR $SOCAT_PEERADDR"]);
    lab.np(&args);
    let tasks = wait_tasks(&lab, "web", 2);
    let addrs = task_addrs(&lab, &tasks, "app");
    let ls = lab.np(&["service", "ls"]);
    assert!(ls.contains("*:8080->80/tcp"), "{ls}");

    // From outside, through the uplink: both tasks, the client's real address kept.
    let script = format!(
        "for p in $(seq 30000 30039); do socat -u -T 5 TCP:{HOST_ETH0_IP}:8080,connect-timeout=5,sourceport=$p,reuseaddr -; done"
    );
    let out = must(in_ns(&lab.client_ns, "sh", &["-c", &script]));
    let mut seen = std::collections::BTreeSet::new();
    for l in out.lines() {
        let (task, peer) = l.split_once(' ').unwrap_or_else(|| panic!("{out}"));
        assert_eq!(peer, CLIENT_IP, "{out}");
        seen.insert(task.to_string());
    }
    assert_eq!(seen, addrs.iter().cloned().collect(), "{out}");

    // From a host process, by loopback and by the VIP: the socket programs point it at a task.
    for target in ["127.0.0.1:8080".to_string(), format!("{}:80", vip(&lab, "web", "app"))] {
        let out =
            must(in_ns(&lab.host_ns, "socat", &["-u", "-T", "5", &format!("TCP:{target},connect-timeout=5"), "-"]));
        let task = out.split_whitespace().next().unwrap_or_default().to_string();
        assert!(addrs.contains(&task), "{target}: {out}");
    }

    // A second service cannot take the port; a container cannot either.
    let err = lab.np_fails(&["service", "create", "--name", "x", "--network", "app", "-p", "8080:80"]);
    assert!(err.contains("already published by service web"), "{err}");
    let err = lab.np_fails(&["run", "-d", "--name", "y", "--network", "app", "-p", "8080:80", "--", "sleep", "1"]);
    assert!(err.contains("8080"), "{err}");

    // mode=host: on one host every task runs here, so it reaches them as ingress does, and
    // says which mode it is.
    let mut tasks_as_backends = vec!["service", "create", "--name", "hostmode", "--network", "app"];
    for t in &tasks {
        tasks_as_backends.extend(["--backend", t.as_str()]);
    }
    tasks_as_backends.extend(["--publish", "published=8081,target=80,mode=host"]);
    lab.np(&tasks_as_backends);
    let v: serde_json::Value = serde_json::from_str(&lab.np(&["service", "inspect", "hostmode"])).unwrap();
    assert_eq!(v[0]["Endpoint"]["Ports"][0]["PublishMode"], "host", "{v}");
    let out = must(in_ns(
        &lab.client_ns,
        "socat",
        &["-u", "-T", "5", &format!("TCP:{HOST_ETH0_IP}:8081,connect-timeout=5"), "-"],
    ));
    let (task, peer) = out.trim().split_once(' ').unwrap_or_else(|| panic!("{out}"));
    assert!(addrs.contains(&task.to_string()) && peer == CLIENT_IP, "{out}");
}

#[test]
fn udp_services_answer_from_the_vip_and_the_published_port() {
    use netpath_tests::{HOST_ETH0_IP, in_ns, must};
    let lab = Lab::new("svcudp");
    lab.np(&["network", "create", "app"]);
    lab.np(&[
        "service",
        "create",
        "--name",
        "dns",
        "--network",
        "app",
        "--replicas",
        "2",
        "-p",
        "5353:5300/udp",
        "--",
        // Not port 53: the embedded DNS server holds 127.0.0.11:53 in every container.
        // UDP-RECVFROM sets no SOCAT_SOCKADDR: the task's (only) address instead.
        "socat",
        "UDP-RECVFROM:5300,fork",
        "SYSTEM:hostname -I",
    ]);
    let tasks = wait_tasks_udp(&lab, "dns", 2);
    let addrs = task_addrs(&lab, &tasks, "app");
    lab.np(&["run", "-d", "--name", "client", "--network", "app", "--", "sleep", "600"]);
    let vip = vip(&lab, "dns", "app");
    let script = format!("for p in $(seq 31000 31019); do echo q | socat -T 2 - UDP:{vip}:5300,sourceport=$p; done");
    let out = lab.np(&["exec", "client", "--", "sh", "-c", &script]);
    let seen: std::collections::BTreeSet<String> = out.lines().map(|l| l.trim().to_string()).collect();
    assert_eq!(seen, addrs.iter().cloned().collect(), "answers come from the tasks, through {vip}: {out}");
    // From outside, through the published port.
    let out = must(in_ns(&lab.client_ns, "sh", &["-c", &format!("echo q | socat -T 2 - UDP:{HOST_ETH0_IP}:5353")]));
    assert!(addrs.contains(&out.trim().to_string()), "{out}");
}

/// [`wait_tasks`] for UDP servers: running tasks with a bound UDP port 5300.
fn wait_tasks_udp(lab: &Lab, name: &str, n: usize) -> Vec<String> {
    for _ in 0..200 {
        let v = inspect_service(lab, name);
        let tasks = v["Tasks"].as_array().cloned().unwrap_or_default();
        let running: Vec<String> =
            tasks.iter().filter(|t| t["State"] == "running").map(|t| t["Name"].as_str().unwrap().to_string()).collect();
        let bound = |t: &String| !lab.np(&["exec", t, "--", "ss", "-Hlun", "sport = :5300"]).trim().is_empty();
        if tasks.len() == n && running.len() == n && running.iter().all(bound) {
            return running;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("service {name} did not get {n} bound tasks: {}", inspect_service(lab, name));
}

#[test]
fn a_task_failing_its_tcp_health_check_gets_no_connection_until_it_passes() {
    let lab = Lab::new("svchealth");
    lab.np(&["network", "create", "app"]);
    let good = backends(&lab, "good", 1, "app");
    lab.np(&["run", "-d", "--name", "late", "--network", "app", "--", "sleep", "600"]);
    lab.np(&[
        "service",
        "create",
        "--name",
        "web",
        "--network",
        "app",
        "--backend",
        "good1",
        "--backend",
        "late",
        "--health-cmd-tcp",
        "80",
    ]);
    lab.np(&["run", "-d", "--name", "client", "--network", "app", "--", "sleep", "600"]);
    let wait_state = |task: &str, state: &str| {
        for _ in 0..100 {
            let ps = lab.np(&["service", "ps", "web"]);
            if ps.lines().any(|l| l.starts_with(task) && l.contains(state)) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("{task} never {state}: {}", lab.np(&["service", "ps", "web"]));
    };
    wait_state("late", "unhealthy");
    let vip = vip(&lab, "web", "app");
    let m = spread(&lab, "client", &vip, 40);
    assert_eq!(m.get(&lab.ip_of(&good[0], "app")), Some(&40), "only the healthy task: {m:?}");

    // It starts listening: within a second it is a backend again.
    lab.np(&[
        "exec",
        "late",
        "--",
        "sh",
        "-c",
        "setsid -f socat TCP-LISTEN:80,fork,reuseaddr 'SYSTEM:echo $SOCAT_SOCKADDR' </dev/null >/dev/null 2>&1",
    ]);
    wait_state("late", "running");
    let m = spread(&lab, "client", &vip, 400);
    assert_even(&m, &[lab.ip_of("good1", "app"), lab.ip_of("late", "app")], 400);
}

#[test]
fn a_daemon_killed_in_service_create_or_rm_finishes_it_when_it_starts_again() {
    use netpath_tests::DaemonOpts;
    for point in ["service-create:persisted", "service-rm:marked"] {
        let mut lab = Lab::new(&format!("svccrash-{}", point.split(':').next().unwrap()));
        lab.np(&["network", "create", "app"]);
        lab.np(&["run", "-d", "--name", "client", "--network", "app", "--", "sleep", "600"]);
        let mut create = vec!["service", "create", "--name", "web", "--network", "app", "--replicas", "2", "--"];
        create.extend(whoami_cmd());
        if point.starts_with("service-rm") {
            lab.np(&create);
            wait_tasks(&lab, "web", 2);
        }
        lab.stop_daemon();
        lab.start_daemon_with(&DaemonOpts {
            env: vec![("NETPATH_CRASH_AT".into(), point.into())],
            ..Default::default()
        });
        let req: Vec<&str> =
            if point.starts_with("service-rm") { vec!["service", "rm", "web"] } else { create.clone() };
        assert!(!lab.try_np(&req).status.success(), "{point}: the daemon was to die");
        assert!(lab.wait_daemon_died(), "{point}: no crash:\n{}", lab.daemon_log());
        lab.start_daemon();
        if point.starts_with("service-create") {
            // Committed: the next daemon builds it.
            let tasks = wait_tasks(&lab, "web", 2);
            let vip = vip(&lab, "web", "app");
            assert_even(&spread(&lab, "client", &vip, 400), &task_addrs(&lab, &tasks, "app"), 400);
        } else {
            let mut gone = false;
            for _ in 0..100 {
                let ps = lab.np(&["ps", "-a"]);
                let record = lab.try_np(&["service", "inspect", "web"]).status.success();
                if !record && lab.np(&["service", "ls"]).lines().count() == 1 && !ps.contains("web.") {
                    gone = true;
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            assert!(gone, "{point}: service or tasks left: {}", lab.np(&["ps", "-a"]));
            // Its VIP is free again, and its name.
            lab.np(&create);
            wait_tasks(&lab, "web", 2);
        }
    }
}

#[test]
fn a_dnsrr_service_has_no_vip_and_its_name_answers_the_tasks() {
    let lab = Lab::new("svcdnsrr");
    lab.np(&["network", "create", "app"]);
    let mut args = vec![
        "service",
        "create",
        "--name",
        "rr",
        "--network",
        "app",
        "--endpoint-mode",
        "dnsrr",
        "--replicas",
        "2",
        "--",
    ];
    args.extend(whoami_cmd());
    lab.np(&args);
    let tasks = wait_tasks(&lab, "rr", 2);
    let v = inspect_service(&lab, "rr");
    assert_eq!(v["Endpoint"]["VirtualIPs"], serde_json::json!([]), "{v}");
    lab.np(&["run", "-d", "--name", "client", "--network", "app", "--", "sleep", "600"]);
    let all = lab.np(&["exec", "client", "--", "getent", "ahostsv4", "rr"]);
    for a in task_addrs(&lab, &tasks, "app") {
        assert!(all.contains(&a), "rr lacks {a}: {all}");
        // Each answers on its own address.
        let got = lab.np(&[
            "exec",
            "client",
            "--",
            "socat",
            "-u",
            "-T",
            "5",
            &format!("TCP:{a}:{PORT},connect-timeout=5"),
            "-",
        ]);
        assert_eq!(got.trim(), a);
    }
}

#[test]
fn a_backend_leaving_one_service_keeps_the_flows_another_service_gave_it() {
    let lab = Lab::new("svcflush");
    lab.np(&["network", "create", "app"]);
    backends(&lab, "b", 1, "app");
    for s in ["one", "two"] {
        lab.np(&["service", "create", "--name", s, "--network", "app", "--backend", "b1"]);
    }
    lab.np(&["run", "-d", "--name", "client", "--network", "app", "--", "sleep", "600"]);
    let (v1, v2) = (vip(&lab, "one", "app"), vip(&lab, "two", "app"));
    // One connection through each VIP; closed flows stay tracked for a while (10 s).
    for v in [&v1, &v2] {
        let to = format!("TCP:{v}:80,connect-timeout=3");
        let out = lab.np(&["exec", "client", "--", "socat", "-u", "-T", "3", &to, "-"]);
        assert!(!out.trim().is_empty(), "no answer through {v}");
    }
    let flows = lab.np(&["system", "flows"]);
    assert!(flows.contains(&format!("\"{v1}:")) && flows.contains(&format!("\"{v2}:")), "{flows}");
    // b1 leaves `one`: the flows `one` balanced onto it go; `two`'s stay.
    lab.np(&["service", "update", "--rm-backend", "b1", "one"]);
    let flows = lab.np(&["system", "flows"]);
    assert!(!flows.contains(&format!("\"{v1}:")), "one's flow to b1 stayed: {flows}");
    assert!(flows.contains(&format!("\"{v2}:")), "two's flow to b1 went with one's: {flows}");
}
