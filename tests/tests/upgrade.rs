//! The datapath outlives the daemon and survives upgrades: pinned links keep the programs
//! attached while no daemon runs, a new daemon adopts them (atomic link update) and migrates
//! maps whose layout changed. Real iperf3 streams through a published port, out through
//! masquerade and through a hairpin must keep going across a restart, an upgrade to another
//! build of the programs (`upgrade-test` feature: other code, other map sizes) and back.
//! And pins in the landed build's unversioned layout are migrated, or replaced with a reason.

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use aya::maps::{MapData, MapInfo, MapType, PerCpuArray};
use netpath::datapath::map_pin;
use netpath_tests::{CLIENT_IP, DaemonOpts, HOST_ETH0_IP, Lab, in_ns, must, variant_object};
use serde_json::Value;

/// How long each stream runs: the restart, the upgrade and the way back happen within it.
const STREAM_SECS: u64 = 20;
/// Paced, so the 2-CPU machine is not saturated and a stall is the datapath's doing.
const RATE: &str = "100M";

/// A running iperf3 client; its JSON report goes to a file (a pipe would fill up and stall it).
struct Iperf {
    child: Child,
    out: std::path::PathBuf,
}

/// An iperf3 client (JSON report, 0.2 s intervals) running in namespace `ns` for `secs`.
fn iperf3_client(lab: &Lab, ns: &Path, server: &str, port: u16, secs: u64) -> Iperf {
    let out = lab.dir.join(format!("iperf3-{server}-{port}-{secs}.json"));
    let file = std::fs::File::create(&out).unwrap();
    let (port, t) = (port.to_string(), secs.to_string());
    let args = ["-c", server, "-p", &port, "-t", &t, "-i", "0.2", "-b", RATE, "-J", "--connect-timeout", "5000"];
    let child = in_ns(ns, "iperf3", &args).stdout(file).stderr(Stdio::null()).spawn().expect("starting iperf3");
    Iperf { child, out }
}

/// Waits for an iperf3 client (bounded) and returns its report; panics with it if it failed.
fn report(what: &str, mut c: Iperf) -> Value {
    let deadline = Instant::now() + Duration::from_secs(STREAM_SECS + 30);
    let status = loop {
        if let Some(st) = c.child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = c.child.kill();
            break c.child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = std::fs::read_to_string(&c.out).unwrap_or_default();
    assert!(status.success(), "{what}: iperf3 failed ({status}): {text}");
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: iperf3 JSON: {e}: {text}"));
    assert!(v.get("error").is_none(), "{what}: {}", v["error"]);
    v
}

/// The longest run of consecutive intervals that moved no byte (seconds), and when it began.
fn longest_stall(v: &Value) -> (f64, f64) {
    let (mut longest, mut at, mut run, mut start) = (0.0, 0.0, 0.0, 0.0);
    for i in v["intervals"].as_array().expect("intervals") {
        let s = &i["sum"];
        if s["bytes"].as_u64() == Some(0) {
            if run == 0.0 {
                start = s["start"].as_f64().unwrap();
            }
            run += s["seconds"].as_f64().unwrap();
            if run > longest {
                (longest, at) = (run, start);
            }
        } else {
            run = 0.0;
        }
    }
    (longest, at)
}

/// TCP resets the host namespace sent (it answers packets of flows it does not know with one).
fn host_resets(lab: &Lab) -> u64 {
    let snmp = must(lab.host("cat", &["/proc/net/snmp"]));
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
    let i = names.split_whitespace().position(|n| n == "OutRsts").expect("OutRsts");
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

fn loaded_object(lab: &Lab) -> String {
    let v = lab.np(&["version"]);
    v.lines().find_map(|l| l.strip_prefix("daemon eBPF object: ")).unwrap_or_else(|| panic!("{v}")).to_string()
}

fn pinned_info(lab: &Lab, map: &str) -> MapInfo {
    MapInfo::from_pin(map_pin(&lab.bpffs, map)).unwrap_or_else(|e| panic!("{map}: {e}"))
}

/// The slot the `upgrade-test` build's uplink_in counts its packets in.
fn variant_packets(lab: &Lab) -> u64 {
    let m = aya::maps::Map::PerCpuArray(MapData::from_pin(map_pin(&lab.bpffs, "CT_STATS")).unwrap());
    let a = PerCpuArray::<_, u64>::try_from(&m).unwrap();
    a.get(&netpath_common::ct_stat::MAX, 0).map(|v| v.iter().sum()).unwrap_or(0)
}

#[test]
fn three_streams_survive_a_restart_an_upgrade_and_the_way_back() {
    let variant = variant_object();
    let variant = variant.to_str().unwrap();
    let mut lab = Lab::new("upgrade");
    lab.np(&["run", "-d", "--name", "pub", "-p", "5201:5201", "--", "iperf3", "-s", "-p", "5201"]);
    lab.np(&["run", "-d", "--name", "hairpin", "-p", "5202:5201", "--", "iperf3", "-s", "-p", "5201"]);
    lab.np(&["run", "-d", "--name", "cli", "--", "sleep", "600"]);
    common::wait_listening(&lab, "pub", 5201);
    common::wait_listening(&lab, "hairpin", 5201);
    let outside = in_ns(&lab.client_ns, "iperf3", &["-s", "-p", "5301"]).stdout(Stdio::null()).spawn().unwrap();
    for _ in 0..100 {
        if !must(in_ns(&lab.client_ns, "ss", &["-Hltn", "sport = :5301"])).trim().is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    let embedded = loaded_object(&lab);
    let version = lab.np(&["version"]);
    assert!(
        version.contains(&format!("\neBPF object: {embedded}\n")),
        "the CLI embeds what the daemon runs: {version}"
    );
    let resets_before = host_resets(&lab);
    let cli = lab.sandbox("cli");

    let t0 = Instant::now();
    let streams = [
        ("published port", iperf3_client(&lab, &lab.client_ns, HOST_ETH0_IP, 5201, STREAM_SECS)),
        ("masquerade", iperf3_client(&lab, &cli, CLIENT_IP, 5301, STREAM_SECS)),
        ("hairpin", iperf3_client(&lab, &cli, HOST_ETH0_IP, 5202, STREAM_SECS)),
    ];
    let mut phases = vec![];
    let mut phase = |name: &str, lab: &mut Lab, args: &[&str]| {
        std::thread::sleep(Duration::from_secs(2));
        let start = t0.elapsed().as_secs_f64();
        lab.stop_daemon();
        // Nobody manages the datapath for a while: the pinned links keep it running.
        std::thread::sleep(Duration::from_secs(1));
        lab.start_daemon_with(&DaemonOpts { args: args.iter().map(|a| a.to_string()).collect(), ..Default::default() });
        phases.push((name.to_string(), start, t0.elapsed().as_secs_f64()));
    };
    phase("restart", &mut lab, &[]);
    assert_eq!(loaded_object(&lab), embedded);
    phase("upgrade", &mut lab, &["--ebpf-object", variant]);
    let upgraded = loaded_object(&lab);
    assert_ne!(upgraded, embedded, "the variant object is another build");
    assert_eq!(pinned_info(&lab, "CT_STATS").max_entries(), netpath_common::ct_stat::MAX + 1, "variant layout");
    assert_eq!(pinned_info(&lab, "CT").max_entries(), netpath_common::CT_MAX_ENTRIES / 2, "variant layout");
    std::thread::sleep(Duration::from_millis(500));
    assert!(variant_packets(&lab) > 0, "the variant's programs run on the streams' packets");
    phase("downgrade", &mut lab, &[]);
    assert_eq!(loaded_object(&lab), embedded);
    let done = t0.elapsed().as_secs_f64();
    assert!(done < STREAM_SECS as f64 - 1.0, "the phases ({done:.1} s) outlasted the streams: nothing was tested");

    let mut failures = vec![];
    for (what, c) in streams {
        let v = report(what, c);
        let (stall, at) = longest_stall(&v);
        let bytes = v["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
        eprintln!("{what}: {bytes} bytes received, longest stall {stall:.1} s at {at:.1} s; phases {phases:?}");
        if stall > 1.0 {
            failures.push(format!("{what}: stalled {stall:.1} s from {at:.1} s (phases: {phases:?})"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}\ndaemon log:\n{}", lab.daemon_log());
    assert_eq!(host_resets(&lab) - resets_before, 0, "the host reset flows");

    // Back on the embedded build, with its layouts, and nothing left of the migrations.
    assert_eq!(pinned_info(&lab, "CT_STATS").max_entries(), netpath_common::ct_stat::MAX);
    assert_eq!(pinned_info(&lab, "CT").max_entries(), netpath_common::CT_MAX_ENTRIES);
    let maps: Vec<String> = std::fs::read_dir(lab.bpffs.join("maps"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    // Each map once, at the layout revision this build defines (v1, ENDPOINT_NETS v2).
    let want: std::collections::BTreeSet<String> =
        netpath_common::layout::MAPS.iter().map(|m| format!("{}@v{}", m.name, m.rev)).collect();
    assert_eq!(maps.iter().cloned().collect::<std::collections::BTreeSet<_>>(), want, "{maps:?}");
    assert_eq!(maps.len(), netpath_common::layout::MAPS.len(), "{maps:?}");
    let log = lab.daemon_log();
    assert!(log.contains("map CT: migrated"), "{log}");
    assert!(log.contains("map CT_STATS: migrated"), "{log}");
    // And new flows work as before.
    let v = report("after", iperf3_client(&lab, &lab.client_ns, HOST_ETH0_IP, 5201, 1));
    assert!(v["end"]["sum_received"]["bytes"].as_u64().unwrap() > 0);
    drop(outside);
}

fn whoami_from_client(lab: &Lab, port: u16) -> String {
    let cmd = format!("socat -t 10 - TCP:{HOST_ETH0_IP}:{port},connect-timeout=5 </dev/null");
    must(in_ns(&lab.client_ns, "sh", &["-c", &cmd])).trim().to_string()
}

#[test]
fn stopping_the_daemon_leaves_the_programs_attached() {
    let mut lab = Lab::new("pinnedlinks");
    common::whoami_server_with(&lab, "c", &["-p", "8080:8"]);
    let veth = lab.inspect("c")["NetworkSettings"]["Networks"]["bridge"]["HostInterface"].as_str().unwrap().to_string();
    lab.stop_daemon();
    // With no daemon running, a new connection to the published port is still translated.
    assert_eq!(whoami_from_client(&lab, 8080), CLIENT_IP);
    let links: Vec<String> = std::fs::read_dir(lab.bpffs.join("links"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for want in [format!("{veth}@from_container"), "eth0@uplink_in".into(), "eth0@uplink_out".into()] {
        assert!(links.contains(&want), "{want} not pinned: {links:?}");
    }
    // One link per container: what it receives passes no program (the kernel counts it).
    assert_eq!(links.iter().filter(|l| l.starts_with(&format!("{veth}@"))).count(), 1, "{links:?}");
    lab.start_daemon();
    assert_eq!(whoami_from_client(&lab, 8080), CLIENT_IP);
    // Removing the container removes its link pins (with its veth, just after rm answers);
    // the uplink's stay.
    lab.np(&["rm", "-f", "c"]);
    lab.settle();
    let links: Vec<String> = std::fs::read_dir(lab.bpffs.join("links"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!links.iter().any(|l| l.starts_with(&veth)), "{links:?}");
    assert!(links.contains(&"eth0@uplink_in".to_string()), "{links:?}");
}

/// Creates and pins a map the way the landed build did (unversioned name under the bpffs).
fn legacy_map(bpffs: &Path, name: &str, t: u32, key: u32, value: u32, max: u32) -> MapData {
    let def = aya_obj::Map::new_from_params(t, key, value, max, 0);
    let m = MapData::create(def, name, None).unwrap_or_else(|e| panic!("creating {name}: {e}"));
    m.pin(bpffs.join(name)).unwrap();
    m
}

fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

#[test]
fn pins_of_the_landed_layout_are_migrated_or_replaced_with_a_reason() {
    use netpath_common::layout::map_type;
    use netpath_common::{CtEntry, Tuple, hook};
    let mut lab = Lab::without_daemon("legacy");
    netpath::datapath::ensure_bpffs(&lab.bpffs).unwrap();
    let cpus = aya::util::nr_cpus().unwrap();

    // The landed build's CT: an LRU hash, holding one flow (both entries), fresh.
    let orig = Tuple::new(
        u32::from_ne_bytes([203, 0, 113, 7]),
        u32::from_ne_bytes([198, 51, 100, 1]),
        4000u16.to_be(),
        8080u16.to_be(),
        6,
    );
    let x = Tuple::new(orig.saddr, u32::from_ne_bytes([172, 17, 0, 2]), orig.sport, 80u16.to_be(), 6);
    let now = monotonic_ns();
    {
        let ct = legacy_map(&lab.bpffs, "CT", map_type::LRU_HASH, 16, 32, 131_072);
        let mut ct = aya::maps::HashMap::<_, Tuple, CtEntry>::try_from(aya::maps::Map::LruHashMap(ct)).unwrap();
        ct.insert(orig, CtEntry { xlate: x, last_seen_ns: now, hook: hook::UPLINK_IN, ..Default::default() }, 0)
            .unwrap();
        let reply = CtEntry {
            xlate: orig.reversed(),
            last_seen_ns: now,
            hook: hook::UPLINK_OUT,
            is_reply: 1,
            ..Default::default()
        };
        ct.insert(x.reversed(), reply, 0).unwrap();
    }
    // DROPS had 6 slots (no ct-full yet); CT_STATS 2.
    for (name, slots, values) in [("DROPS", 6, vec![(0u32, 5u64), (5, 7)]), ("CT_STATS", 2, vec![(0, 11)])] {
        let m = legacy_map(&lab.bpffs, name, map_type::PERCPU_ARRAY, 4, 8, slots);
        let mut a = PerCpuArray::<_, u64>::try_from(aya::maps::Map::PerCpuArray(m)).unwrap();
        for (slot, v) in values {
            let mut per_cpu = vec![0u64; cpus];
            per_cpu[0] = v;
            a.set(slot, aya::maps::PerCpuValues::try_from(per_cpu).unwrap(), 0).unwrap();
        }
    }
    // ENDPOINT_STATS, the per-endpoint counters builds before kernel veth counters kept:
    // retired, so its pins (unversioned, and versioned by a later build) are removed.
    let stats = legacy_map(&lab.bpffs, "ENDPOINT_STATS", map_type::PERCPU_HASH, 4, 32, 16384);
    std::fs::create_dir_all(lab.bpffs.join("maps")).unwrap();
    stats.pin(lab.bpffs.join("maps/ENDPOINT_STATS@v1")).unwrap();
    drop(stats);
    // An ENDPOINTS pin of a layout no build had (24-byte values): cannot be read, is replaced.
    {
        let m = legacy_map(&lab.bpffs, "ENDPOINTS", map_type::HASH, 4, 24, 16384);
        let mut h = aya::maps::HashMap::<_, u32, [u8; 24]>::try_from(aya::maps::Map::HashMap(m)).unwrap();
        h.insert(1, [7; 24], 0).unwrap();
    }

    lab.start_daemon();

    let ct = pinned_info(&lab, "CT");
    assert_eq!(ct.map_type().unwrap(), MapType::Hash, "CT became a preallocated hash");
    let flows: Value = serde_json::from_str(&lab.np(&["system", "flows"])).unwrap();
    assert_eq!(flows.as_array().unwrap().len(), 2, "both entries of the flow kept: {flows}");
    let c: Value = serde_json::from_str(&lab.np(&["system", "datapath"])).unwrap();
    assert_eq!(c["drops"]["isolation"], 5, "{c}");
    assert_eq!(c["drops"]["spoofed-source"], 7, "{c}");
    assert_eq!(c["drops"]["ct-full"], 0, "the new slot starts at 0: {c}");
    assert_eq!(c["conntrack"]["flows-created"], 11, "{c}");
    assert_eq!(pinned_info(&lab, "DROPS").max_entries(), netpath_common::drop_reason::MAX);

    let eps = pinned_info(&lab, "ENDPOINTS");
    assert_eq!(eps.value_size(), 20);
    let log = lab.daemon_log();
    assert!(
        log.contains("map ENDPOINTS: replaced") && log.contains("no known revision 0 of ENDPOINTS"),
        "the replacement is logged with its reason:\n{log}"
    );
    assert!(log.contains("map CT: migrated"), "{log}");
    for name in ["CT", "DROPS", "CT_STATS", "ENDPOINTS", "ENDPOINT_STATS"] {
        assert!(!lab.bpffs.join(name).exists(), "the unversioned {name} pin is gone");
    }
    assert!(!lab.bpffs.join("maps/ENDPOINT_STATS@v1").exists(), "the versioned ENDPOINT_STATS pin is gone");
    assert!(log.contains("ENDPOINT_STATS: map ENDPOINT_STATS was retired"), "the removal is logged:\n{log}");
    // The migrated datapath works: a published port answers.
    common::whoami_server_with(&lab, "web", &["-p", "8080:8"]);
    assert_eq!(whoami_from_client(&lab, 8080), CLIENT_IP);
}
