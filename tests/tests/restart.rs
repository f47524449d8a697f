//! A daemon restart keeps networks, containers, addressing and running processes, re-attaches
//! the datapath, and what is removed afterwards leaves nothing behind.

mod common;

use common::*;
use netpath_tests::Lab;
use serde_json::Value;

/// What a user compares across a restart: a container's state and addressing (not counters).
fn addressing(lab: &Lab, container: &str) -> Value {
    let mut v = lab.inspect(container);
    for (_, n) in v["NetworkSettings"]["Networks"].as_object_mut().unwrap() {
        n.as_object_mut().unwrap().remove("Counters");
    }
    v
}

#[test]
fn restart_keeps_networks_containers_addresses_and_traffic() {
    let mut lab = Lab::new("restart");
    lab.np(&["network", "create", "--subnet", "10.93.0.0/24", "--gateway", "10.93.0.254", "rnet"]);
    echo_server(&lab, "srv", "rnet");
    lab.np(&["run", "-d", "--name", "cli", "--network", "rnet", "--", "sleep", "600"]);
    let srv_ip = lab.ip_of("srv", "rnet");
    assert_eq!(srv_ip, "10.93.0.1", "the gateway is .254, so .1 is free");
    assert_eq!(echo(&lab, "cli", &srv_ip, "before"), "before");

    let net_ls = lab.np(&["network", "ls"]);
    let ps = lab.np(&["ps"]);
    let net = lab.inspect_network("rnet");
    let (srv, cli) = (addressing(&lab, "srv"), addressing(&lab, "cli"));
    assert_eq!(srv["State"]["Running"], true);
    let srv_pid = srv["State"]["Pid"].as_u64().expect("srv runs");
    let host_links = lab.links(&lab.host_ns);
    let tx_before_restart = counter(&lab, "srv", "rnet", "TxPackets");
    let rx_before_restart = counter(&lab, "srv", "rnet", "RxPackets");

    lab.restart_daemon();

    assert_eq!(lab.np(&["network", "ls"]), net_ls);
    assert_eq!(lab.inspect_network("rnet"), net);
    assert_eq!(addressing(&lab, "srv"), srv, "srv after restart");
    assert_eq!(addressing(&lab, "cli"), cli, "cli after restart");
    assert_eq!(lab.np(&["ps"]), ps, "both still reported running");
    assert_eq!(lab.inspect("srv")["State"]["Pid"].as_u64(), Some(srv_pid));
    assert_eq!(lab.links(&lab.host_ns), host_links, "no link added or lost");
    assert_eq!(container_addrs(&lab, "cli", "eth0"), [format!("{}/24", lab.ip_of("cli", "rnet"))]);
    let routes = lab.np(&["exec", "cli", "--", "ip", "-4", "route"]);
    assert!(routes.contains("default via 10.93.0.254 dev eth0"), "{routes}");

    // Counters are the kernel's, kept by the veths, which outlive the daemon: they survive
    // the restart...
    let tx = counter(&lab, "srv", "rnet", "TxPackets");
    let rx = counter(&lab, "srv", "rnet", "RxPackets");
    assert!(tx >= tx_before_restart && rx >= rx_before_restart, "counters reset by restart: {tx}/{rx}");
    // ...and the datapath was re-attached: traffic still flows and is counted.
    assert_eq!(echo(&lab, "cli", &srv_ip, "after"), "after");
    assert!(counter(&lab, "srv", "rnet", "TxPackets") > tx, "TxPackets of srv did not move after restart");
    assert!(counter(&lab, "srv", "rnet", "RxPackets") > rx, "RxPackets of srv did not move after restart");
    assert!(counter(&lab, "cli", "rnet", "TxPackets") > 0);

    // The restarted daemon still manages the network: a new container joins and talks.
    lab.np(&["run", "-d", "--name", "late", "--network", "rnet", "--", "sleep", "600"]);
    assert_eq!(lab.ip_of("late", "rnet"), "10.93.0.3", "addresses allocated before the restart stay taken");
    assert_eq!(echo(&lab, "late", &srv_ip, "late"), "late");
}

/// A clean stop leaves the whole state in one snapshot file, which the next start reads; the
/// first change after it takes it away, and a killed daemon leaves none: the start after a
/// crash reads every object's file, and sees the same containers.
#[test]
fn a_clean_stop_leaves_a_state_snapshot_that_a_change_or_a_crash_does_not() {
    let mut lab = Lab::new("snapshot");
    let snapshot = lab.state_dir.join("db/snapshot.json");
    lab.np(&["network", "create", "--subnet", "10.96.0.0/24", "sn"]);
    lab.np(&["run", "-d", "--name", "a", "--network", "sn", "-p", "18080:80", "--", "sleep", "600"]);
    let (ps, ports) = (lab.np(&["ps"]), lab.np(&["port", "a"]));
    assert!(!snapshot.exists(), "none while the daemon runs and changes things");

    lab.stop_daemon();
    assert!(snapshot.exists(), "a clean stop writes {}", snapshot.display());
    lab.start_daemon();
    assert_eq!((lab.np(&["ps"]), lab.np(&["port", "a"])), (ps.clone(), ports.clone()));
    assert!(snapshot.exists(), "kept while nothing changes (a restart's reconcile changes nothing)");

    lab.np(&["run", "-d", "--name", "b", "--network", "sn", "--", "sleep", "600"]);
    assert!(!snapshot.exists(), "the first change takes it away");
    lab.kill_daemon();
    assert!(!snapshot.exists(), "a killed daemon leaves none");
    lab.start_daemon();
    let after = lab.np(&["ps"]);
    assert!(after.contains(" a ") && after.contains(" b "), "{after}");
    assert_eq!(lab.np(&["port", "a"]), ports);
    lab.np(&["run", "-d", "--name", "c", "--network", "sn", "--", "sleep", "600"]);
    assert_eq!(lab.ip_of("c", "sn"), "10.96.0.4", "read from the files: a's and b's addresses stay taken");
}

#[test]
fn a_container_removed_after_restart_leaves_nothing_behind() {
    let mut lab = Lab::new("rmafter");
    lab.np(&["network", "create", "--subnet", "10.95.0.0/24", "n"]);
    let links_before = lab.links(&lab.host_ns);
    lab.np(&["run", "-d", "--name", "c", "--network", "n", "--", "sleep", "600"]);
    lab.np(&["network", "connect", "bridge", "c"]);
    let v = lab.inspect("c");
    let sandbox = v["NetworkSettings"]["SandboxKey"].as_str().unwrap().to_string();
    let veths: Vec<String> = ["n", "bridge"]
        .iter()
        .map(|n| v["NetworkSettings"]["Networks"][n]["HostInterface"].as_str().unwrap().to_string())
        .collect();
    let pid = v["State"]["Pid"].as_u64().expect("c runs");
    assert!(veths.iter().all(|h| lab.links(&lab.host_ns).contains(h)));

    lab.restart_daemon();
    assert_eq!(lab.inspect("c")["State"]["Running"], true);
    lab.np(&["rm", "-f", "c"]);

    assert_eq!(lab.links(&lab.host_ns), links_before, "host links after rm");
    assert!(!std::path::Path::new(&sandbox).exists(), "netns file {sandbox} left behind");
    assert!(netpath::daemon::process::start_time(pid as u32).is_none(), "c's process {pid} survived rm -f");
    assert!(network_members(&lab, "n").is_empty());
    assert!(network_members(&lab, "bridge").is_empty());
    assert!(!lab.np(&["ps", "-a"]).contains(" c "));
    // Its addresses are free again, and stay so across one more restart.
    lab.restart_daemon();
    lab.np(&["run", "-d", "--name", "c2", "--network", "n", "--", "sleep", "600"]);
    assert_eq!(lab.ip_of("c2", "n"), "10.95.0.2");
}

/// The published ports in the pinned port table, as (port, protocol).
fn pinned_ports(lab: &Lab) -> Vec<(u16, u8)> {
    let m = aya::maps::Map::HashMap(
        aya::maps::MapData::from_pin(netpath::datapath::map_pin(&lab.bpffs, "PORTMAP")).unwrap(),
    );
    let m = aya::maps::HashMap::<_, netpath_common::PortKey, netpath_common::Backend>::try_from(&m).unwrap();
    let mut v: Vec<_> = m.keys().map(|k| k.unwrap()).map(|k| (u16::from_be(k.port), k.proto)).collect();
    v.sort();
    v
}

#[test]
fn a_restart_withdraws_published_ports_the_state_does_not_know() {
    // A daemon killed between writing the port table and its state leaves an entry behind;
    // the next daemon must not keep forwarding that port.
    let mut lab = Lab::new("staleport");
    whoami_server_with(&lab, "web", &["-p", "8080:8"]);
    lab.stop_daemon();
    {
        let mut m = aya::maps::Map::HashMap(
            aya::maps::MapData::from_pin(netpath::datapath::map_pin(&lab.bpffs, "PORTMAP")).unwrap(),
        );
        let mut m =
            aya::maps::HashMap::<_, netpath_common::PortKey, netpath_common::Backend>::try_from(&mut m).unwrap();
        let key = netpath_common::PortKey { addr: 0, port: 9999u16.to_be(), proto: 6, _pad: 0 };
        let to = netpath_common::Backend { addr: u32::from_ne_bytes([172, 17, 0, 9]), port: 80u16.to_be(), _pad: 0 };
        m.insert(key, to, 0).unwrap();
    }
    assert_eq!(pinned_ports(&lab), vec![(8080, 6), (9999, 6)]);
    lab.start_daemon();
    assert_eq!(pinned_ports(&lab), vec![(8080, 6)]);
    assert_eq!(lab.np(&["port", "web"]).trim(), "8/tcp -> 0.0.0.0:8080");
}

/// The daemon's children running `netpath __spawner`.
fn spawners(lab: &Lab) -> Vec<u32> {
    let daemon = lab.daemon_pid().expect("daemon running");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The parent pid is the second field after the parenthesised command name.
            let ppid = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok());
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            ppid == Some(daemon) && String::from_utf8_lossy(&cmdline).contains("__spawner")
        })
        .collect()
}

#[test]
fn containers_start_through_the_spawner_and_still_start_after_it_died() {
    let lab = Lab::new("spawner");
    let first = spawners(&lab);
    assert_eq!(first.len(), 1, "one spawner beside the daemon: {first:?}");
    lab.np(&["run", "-d", "--name", "a", "--", "sh", "-c", "exit 4"]);
    assert_eq!(exit_code(&lab, "a"), Some(4));
    // Killed behind the daemon's back: the next start makes a new one, and works.
    netpath_tests::must(lab.host("kill", &["-9", &first[0].to_string()]));
    lab.np(&["run", "-d", "--name", "b", "--", "sh", "-c", "echo started; exit 6"]);
    assert_eq!(exit_code(&lab, "b"), Some(6));
    assert_eq!(lab.np(&["logs", "b"]).trim(), "started");
    let second = spawners(&lab);
    assert!(second.len() == 1 && second != first, "a new spawner: {first:?} then {second:?}");
    lab.np(&["run", "-d", "--name", "c", "--", "sleep", "600"]);
    assert_eq!(lab.inspect("c")["State"]["Running"], true);
}

/// Polls `inspect` (up to 10 s) for the exit code of `container`'s process.
fn exit_code(lab: &Lab, container: &str) -> Option<i64> {
    for _ in 0..100 {
        if let Some(code) = lab.inspect(container)["State"]["ExitCode"].as_i64() {
            return Some(code);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    None
}

#[test]
fn detached_processes_report_how_they_ended_even_across_a_restart() {
    let mut lab = Lab::new("exitcodes");
    lab.np(&["run", "-d", "--name", "quick", "--", "sh", "-c", "exit 5"]);
    assert_eq!(exit_code(&lab, "quick"), Some(5));
    // Ends while no daemon runs: its supervisor writes the code down for the next one.
    lab.np(&["run", "-d", "--name", "slow", "--", "sh", "-c", "sleep 1; exit 3"]);
    lab.stop_daemon();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    lab.start_daemon();
    assert_eq!(exit_code(&lab, "slow"), Some(3));
    // Ends after the restart, watched by no one: the next look finds the code.
    lab.np(&["run", "-d", "--name", "later", "--", "sh", "-c", "sleep 2; exit 4"]);
    lab.restart_daemon();
    assert_eq!(exit_code(&lab, "later"), Some(4));
    // stop: SIGTERM reaches the command, not just its supervisor (143 = 128 + SIGTERM).
    lab.np(&["run", "-d", "--name", "stopped", "--", "sleep", "600"]);
    lab.np(&["stop", "stopped"]);
    assert_eq!(exit_code(&lab, "stopped"), Some(143));
    let ps = lab.np(&["ps", "-a"]);
    assert!(ps.lines().any(|l| l.contains("stopped") && l.contains("exited (143)")), "{ps}");
    // A command that does not exist is known at once, as with Docker.
    let _ = lab.try_np(&["run", "-d", "--name", "ghost", "--", "no-such-command-here"]);
    assert_eq!(exit_code(&lab, "ghost"), Some(127));
    assert!(lab.np(&["logs", "ghost"]).contains("executable file not found"));
}
