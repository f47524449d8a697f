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
    let addr = vips
        .iter()
        .find(|x| x["Network"] == network)
        .unwrap_or_else(|| panic!("no VIP on {network}: {v}"))["Addr"]
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
fn spread(lab: &Lab, client: &str, ip: &str, count: usize) -> HashMap<String, usize> {
    let script = format!(
        "for i in $(seq {count}); do socat -u -T 5 TCP:{ip}:{PORT},connect-timeout=5 - || echo failed; done"
    );
    let out = lab.np(&["exec", client, "--", "sh", "-c", &script]);
    let mut m = HashMap::new();
    for l in out.lines() {
        *m.entry(l.trim().to_string()).or_insert(0) += 1;
    }
    m
}

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
    assert_even(&spread(&lab, "client", &vip, 500), &task_addrs(&lab, &tasks, "app"), 500);
    lab.np(&["service", "update", "--replicas", "2", "web"]);
    let tasks = wait_tasks(&lab, "web", 2);
    assert_eq!(tasks, ["web.1", "web.2"]);
    assert!(lab.try_np(&["inspect", "web.3"]).status.code() != Some(0), "web.3 is gone");
    assert_even(&spread(&lab, "client", &vip, 400), &task_addrs(&lab, &tasks, "app"), 400);

    // rm takes the tasks, the VIP and its entries along; nothing answers there any more.
    lab.np(&["service", "rm", "web"]);
    assert!(lab.np(&["ps", "-a"]).lines().all(|l| !l.contains("web.")));
    assert!(lab.np(&["service", "ls"]).lines().count() == 1);
    let out = lab.try_np(&["exec", "client", "--", "socat", "-u", "-T", "2", &format!("TCP:{vip}:{PORT},connect-timeout=2"), "-"]);
    assert!(!out.status.success(), "the VIP still answers after rm");
}
