//! The scale section: what one more container costs, and what a restart costs, as the number of
//! containers on the host grows (1, 100, 1,000 and, where asked, 10,000), for netpath and for
//! netavark (podman's network backend, one config per container), in the same run.
//!
//! netpath: a lab with the real daemon; the population grows by `run -d -- sleep` calls, 20
//! at a time, spread over networks of 1,000 (a Linux bridge takes 1,024 ports): nine
//! user-defined ones, then the default bridge (see [`net_of`]). At each count:
//! `run -d` of one more container with one published port (median of `samples`, each once
//! the last one's veths are deleted), `rm -f` of it, `ps`, the daemon's RSS, then a restart:
//! SIGTERM, start, time to the first answer of `netpath ps` and until every container is
//! verified (`system info` says Ready).
//! netavark: the same counts of namespaces wired with `netavark setup` (bridge driver, static
//! addresses, iptables), then setup/teardown of one more with one port mapping.
//!
//! A control at each netpath count: netavark setting up one container with one port mapping
//! beside netpath's population, from a config directory of its own (nothing else to scan).
//! Its work is the same kind (a namespace's veth on a bridge, a port), and none of it grows
//! with netpath's containers: what it gains from 1 to 10,000 is what the host makes every
//! such operation cost (the kernel's and the hypervisor's per-process and per-namespace
//! upkeep), not netpath's state.

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netpath_tests::{DaemonOpts, Lab};

use crate::stats::median;
use crate::util::{check, in_ns, stop_requested};
use crate::variants::netavark::{NETAVARK, netavark_config, netavark_mapping};

const PER_NETWORK: usize = 1000;
const BATCH: usize = 20;
const T: Duration = Duration::from_secs(120);
/// How long after a restart the daemon's RSS is read.
const SETTLE: Duration = Duration::from_secs(12);

/// One count's figures for one system (None: not measured or not applicable).
#[derive(Debug, Default, Clone)]
pub struct Point {
    pub count: usize,
    pub run_ms: Option<f64>,
    pub rm_ms: Option<f64>,
    pub ps_ms: Option<f64>,
    pub restart_answer_ms: Option<f64>,
    pub restart_ready_ms: Option<f64>,
    /// Settled: after the filling, once the daemon's periodic trim has run.
    pub rss_mib: Option<f64>,
    /// The filling daemon's high-water mark (VmHWM) after the probes at this count.
    pub rss_peak_mib: Option<f64>,
    pub rss_after_restart_mib: Option<f64>,
    /// Seconds to grow the population to `count` (BATCH at a time), per container.
    pub fill_ms_per: Option<f64>,
    /// Removing the whole population at the end (BATCH at a time), per container.
    pub drain_ms_per: Option<f64>,
    /// The control beside netpath's population: netavark's setup of one container of its own.
    pub control_ms: Option<f64>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn np(lab: &Lab, args: &[&str]) -> Result<String> {
    check(lab.np_cmd(args), None, T)
}

fn rss_mib(pid: u32) -> Option<f64> {
    status_mib(pid, "VmRSS:")
}

/// A memory figure of /proc/PID/status (`VmRSS:`, `VmHWM:`), in MiB.
fn status_mib(pid: u32, key: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = s.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Runs `calls` concurrently, at most BATCH at a time; fails on the first failure.
fn in_batches(mut spawn: impl FnMut(usize) -> Result<Child>, range: std::ops::Range<usize>) -> Result<()> {
    let idx: Vec<usize> = range.collect();
    for chunk in idx.chunks(BATCH) {
        let children: Vec<(usize, Child)> = chunk.iter().map(|&i| spawn(i).map(|c| (i, c))).collect::<Result<_>>()?;
        for (i, mut c) in children {
            let st = c.wait()?;
            if !st.success() {
                bail!("call {i} failed ({st})");
            }
        }
        if stop_requested() {
            bail!("interrupted");
        }
    }
    Ok(())
}

/// Each container is two processes (its supervisor and its command, as Docker's are a shim
/// and the command): with the kernel's default `pid_max` of 32,768 (systemd raises it to
/// 4,194,304) 10,000 containers leave too few ids for everything else. Says so up front rather
/// than failing at the 9,900th container.
fn check_pid_room(containers: usize) -> Result<()> {
    let pid_max: usize = std::fs::read_to_string("/proc/sys/kernel/pid_max")?.trim().parse()?;
    let in_use = std::fs::read_dir("/proc")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| std::fs::read_dir(format!("/proc/{pid}/task")).ok().map(|t| t.count()))
        .sum::<usize>();
    // Headroom for threads of the daemon, the CLI calls in flight and whatever else runs.
    let need = 2 * containers + in_use + 8_000;
    if need > pid_max {
        bail!(
            "{containers} containers need about {need} process ids and kernel.pid_max is {pid_max}: \
             raise it (sysctl -w kernel.pid_max=4194304, systemd's default) or ask for fewer"
        );
    }
    Ok(())
}

/// User-defined networks of the population; containers past them go to the default bridge.
const USER_NETWORKS: usize = 9;

/// The network of the i-th container: user-defined networks of 1,000, then the default
/// `bridge` (which has no embedded DNS, so its containers hold no descriptor of the daemon:
/// this machine caps a process at 20,000, two per container on a user-defined network).
fn net_of(i: usize) -> String {
    match i / PER_NETWORK {
        k if k < USER_NETWORKS => format!("scale{k}"),
        _ => "bridge".into(),
    }
}

/// netpath at each count in `counts` (ascending), one lab growing through them.
pub fn netpath(counts: &[usize], samples: usize) -> Result<Vec<Point>> {
    let max = counts.iter().copied().max().unwrap_or(0);
    check_pid_room(max)?;
    let mut lab = Lab::new("bench-scale");
    // A host with a resolver: default-bridge containers get a copy of its resolv.conf, as
    // Docker's do, rather than the embedded server (forward-only) for want of one. Nothing
    // answers there: the bench makes no lookups.
    lab.set_upstreams(&[netpath_tests::CLIENT_IP]);
    for k in 0..max.div_ceil(PER_NETWORK).min(USER_NETWORKS) {
        np(&lab, &["network", "create", "--subnet", &format!("10.{}.0.0/16", 100 + k), &format!("scale{k}")])?;
    }
    let mut have = 0;
    let mut out = vec![];
    for &n in counts {
        let t = Instant::now();
        // The probes below make one more: grow to n - 1 so they measure the n-th.
        let target = n.saturating_sub(1);
        in_batches(
            |i| {
                let (name, net) = (format!("s{i}"), net_of(i));
                let mut c = lab.np_cmd(&["run", "-d", "--name", &name, "--network", &net, "--", "sleep", "36000"]);
                c.stdout(std::process::Stdio::null());
                Ok(c.spawn()?)
            },
            have..target,
        )?;
        let fill_ms_per = (target > have).then(|| ms(t.elapsed()) / (target - have) as f64);
        have = target;
        let mut p = Point { count: n, fill_ms_per, ..Default::default() };
        // What the daemon holds for the population, not what the filling's burst freed last.
        std::thread::sleep(SETTLE);
        p.rss_mib = lab.daemon_pid().and_then(rss_mib);
        let (mut run, mut rm, mut ps) = (vec![], vec![], vec![]);
        for i in 0..samples {
            let name = format!("probe{i}");
            let port = format!("{}:80", 30000 + i);
            let t = Instant::now();
            np(&lab, &["run", "-d", "--name", &name, "--network", "scale0", "-p", &port, "--", "sleep", "36000"])?;
            run.push(ms(t.elapsed()));
            let t = Instant::now();
            np(&lab, &["ps"])?;
            ps.push(ms(t.elapsed()));
            let t = Instant::now();
            np(&lab, &["rm", "-f", &name])?;
            rm.push(ms(t.elapsed()));
            // The removal's veths go in the background, holding RTNL across RCU grace periods
            // (tens of ms each with 10,000 containers here): the next sample measures one more
            // container at this count, not its overlap with the last one's deletion.
            lab.settle();
        }
        (p.run_ms, p.rm_ms, p.ps_ms) = (median(&run), median(&rm), median(&ps));
        p.rss_peak_mib = lab.daemon_pid().and_then(|pid| status_mib(pid, "VmHWM:"));
        if Path::new(NETAVARK).is_file() {
            p.control_ms = median(&control(&lab, n, samples)?);
        }

        lab.stop_daemon();
        let t = Instant::now();
        lab.spawn_daemon(&DaemonOpts::default());
        let deadline = Instant::now() + T;
        while !lab.try_np(&["ps"]).status.success() {
            if Instant::now() > deadline {
                bail!("the daemon did not answer within {T:?} of its start");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        p.restart_answer_ms = Some(ms(t.elapsed()));
        loop {
            let out = lab.try_np(&["system", "info"]);
            if serde_json::from_slice::<serde_json::Value>(&out.stdout).is_ok_and(|v| v["Ready"] == true) {
                break;
            }
            if Instant::now() > deadline {
                bail!("the daemon did not verify its containers within {T:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        p.restart_ready_ms = Some(ms(t.elapsed()));
        // Settled: the daemon gives what a restart's burst freed back every 10 s.
        std::thread::sleep(SETTLE);
        p.rss_after_restart_mib = lab.daemon_pid().and_then(rss_mib);
        eprintln!("bench: scale: netpath @{n}: {p:?}");
        out.push(p);
    }
    // Tear the population down through the daemon too, timed (what `rm -f $(ps -q)` costs).
    let t = Instant::now();
    in_batches(
        |i| {
            let mut c = lab.np_cmd(&["rm", "-f", &format!("s{i}")]);
            c.stdout(std::process::Stdio::null());
            Ok(c.spawn()?)
        },
        0..have,
    )
    .context("removing the population")?;
    if let Some(last) = out.last_mut()
        && have > 0
    {
        last.drain_ms_per = Some(ms(t.elapsed()) / have as f64);
    }
    Ok(out)
}

/// netavark's `setup` and `teardown` of one container in `ns` with `cfg`, configs in `conf`.
fn netavark_once(lab: &Lab, conf: &Path, verb: &str, ns: &Path, cfg: &str) -> Result<()> {
    let (conf, ns) = (conf.display().to_string(), ns.display().to_string());
    check(in_ns(&lab.host_ns, NETAVARK, &["--config", &conf, verb, &ns]), Some(cfg.as_bytes()), T).map(|_| ())
}

/// The control (see the module's comment): `samples` timed netavark setups of one container
/// with one port mapping, each torn down again, in netpath's lab holding `n` containers.
fn control(lab: &Lab, n: usize, samples: usize) -> Result<Vec<f64>> {
    let conf = lab.dir.join(format!("control-{n}"));
    std::fs::create_dir_all(&conf)?;
    let mut out = vec![];
    for i in 0..samples {
        let name = format!("control{n}-{i}");
        let ns = lab.add_ns(&name);
        // Its own subnet and port: nothing of netpath's is in the way.
        let maps = [netavark_mapping(40000 + i as u16, 80, 1, crate::variants::Proto::Tcp)];
        let cfg = netavark_config(&name, "10.201.0.2", "10.201.0.0/16", "10.201.0.1", &maps).to_string();
        let t = Instant::now();
        netavark_once(lab, &conf, "setup", &ns, &cfg)?;
        out.push(ms(t.elapsed()));
        netavark_once(lab, &conf, "teardown", &ns, &cfg)?;
    }
    Ok(out)
}

/// netavark at each count in `counts`.
pub fn netavark(counts: &[usize], samples: usize) -> Result<Vec<Point>> {
    if !Path::new(NETAVARK).is_file() {
        bail!("{NETAVARK} is missing (apt-get install netavark)");
    }
    let lab = Lab::without_daemon("bench-scale-netavark");
    let conf = lab.dir.join("netavark");
    std::fs::create_dir_all(&conf)?;
    let setup = |verb: &str, ns: &Path, cfg: &str| netavark_once(&lab, &conf, verb, ns, cfg);
    // Static addresses in 10.200.0.0/16 (netavark's IPAM is the caller's job, as podman's).
    let ip = |i: usize| format!("10.200.{}.{}", (i + 2) / 256, (i + 2) % 256);
    let mut have = 0;
    let mut out = vec![];
    // One network, as podman would use: a Linux bridge takes 1,023 containers at most.
    for &n in counts.iter().filter(|n| **n <= PER_NETWORK) {
        let target = n.saturating_sub(1);
        let t = Instant::now();
        for i in have..target {
            let ns = lab.add_ns(&format!("c{i}"));
            setup(
                "setup",
                &ns,
                &netavark_config(&format!("c{i}"), &ip(i), "10.200.0.0/16", "10.200.0.1", &[]).to_string(),
            )?;
            if stop_requested() {
                bail!("interrupted");
            }
        }
        let fill_ms_per = (target > have).then(|| ms(t.elapsed()) / (target - have) as f64);
        have = target;
        let (mut run, mut rm) = (vec![], vec![]);
        for i in 0..samples {
            let name = format!("probe{n}-{i}");
            let ns = lab.add_ns(&name);
            let maps = [netavark_mapping(30000 + i as u16, 80, 1, crate::variants::Proto::Tcp)];
            let cfg = netavark_config(&name, &ip(60000 + i), "10.200.0.0/16", "10.200.0.1", &maps).to_string();
            let t = Instant::now();
            setup("setup", &ns, &cfg)?;
            run.push(ms(t.elapsed()));
            let t = Instant::now();
            setup("teardown", &ns, &cfg)?;
            rm.push(ms(t.elapsed()));
        }
        let p = Point { count: n, run_ms: median(&run), rm_ms: median(&rm), fill_ms_per, ..Default::default() };
        eprintln!("bench: scale: netavark @{n}: {p:?}");
        out.push(p);
    }
    Ok(out)
}

fn cell(v: Option<f64>, unit: &str) -> String {
    match v {
        Some(x) if x >= 100.0 => format!("{x:.0} {unit}"),
        Some(x) => format!("{x:.1} {unit}"),
        None => "–".into(),
    }
}

/// The section as markdown, and its chart.
pub fn report(np: &[Point], nv: Result<&[Point], String>, samples: usize) -> (String, String) {
    let mut md = String::from("## Scale: cost per container as the host fills up\n\n");
    md.push_str(&format!(
        "Medians of {samples} samples per count. The population is `run -d -- sleep` containers on \
         user-defined networks of 1,000 (past 9,000, on the default bridge: this machine caps a process \
         at 20,000 descriptors, and each container with embedded DNS holds two of the daemon's). \
         `run -d`: one more container with one published port (each sample once the last one's \
         veths, deleted in the background after its `rm -f`, are gone); \
         `rm -f`: removing it; restart: SIGTERM, start, first answer of `ps` / every container verified; \
         daemon RSS: {settle} s after the filling (the daemon trims malloc's arenas every 10 s); \
         peak: the filling daemon's high-water mark (VmHWM) after the samples at that count, the \
         bursts of filling, `run`, `ps` and `rm` included; \
         RSS after restart: {settle} s after every container is verified. \
         netavark (podman's backend, one config per container): `setup` / `teardown` of one more \
         container with one port mapping at the same count. Filling: wall time per container while \
         growing to the count (netpath: {BATCH} `run -d` at a time; netavark: one `setup` at a time, \
         as podman calls it per container). Control: netavark's `setup` of one container of its own \
         (own config directory, subnet and port) beside netpath's population, at each count.\n\n",
        settle = SETTLE.as_secs()
    ));
    md.push_str("| containers | netpath run -d | control | netavark setup | netpath rm -f | netavark teardown | netpath ps | restart: answers | restart: verified | daemon RSS | peak RSS | RSS after restart | filling: netpath | filling: netavark |\n");
    md.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let nvp = |n: usize| nv.as_ref().ok().and_then(|v| v.iter().find(|p| p.count == n)).cloned().unwrap_or_default();
    for p in np {
        let q = nvp(p.count);
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            p.count,
            cell(p.run_ms, "ms"),
            cell(p.control_ms, "ms"),
            cell(q.run_ms, "ms"),
            cell(p.rm_ms, "ms"),
            cell(q.rm_ms, "ms"),
            cell(p.ps_ms, "ms"),
            cell(p.restart_answer_ms, "ms"),
            cell(p.restart_ready_ms, "ms"),
            cell(p.rss_mib, "MiB"),
            cell(p.rss_peak_mib, "MiB"),
            cell(p.rss_after_restart_mib, "MiB"),
            cell(p.fill_ms_per, "ms"),
            cell(q.fill_ms_per, "ms"),
        ));
    }
    if let (Some(first), Some(last)) = (np.first(), np.last())
        && let (Some(a), Some(b)) = (first.run_ms, last.run_ms)
    {
        md.push_str(&format!(
            "\nnetpath `run -d` at {} containers costs {:.2}× its cost at {} (target ≤ 1.1×).",
            last.count,
            b / a,
            first.count
        ));
        if let (Some(a), Some(b)) = (nvp(first.count).run_ms, nvp(last.count).run_ms) {
            md.push_str(&format!(" netavark setup: {:.2}×.", b / a));
        }
        if let (Some(a), Some(b)) = (first.control_ms, last.control_ms) {
            md.push_str(&format!(
                " The control (netavark setting up one container of its own beside netpath's {}): {:.2}×; \
                 netpath's `run -d` over the control: {:.2}× at {} and {:.2}× at {}.",
                last.count - 1,
                b / a,
                first.run_ms.map_or(f64::NAN, |r| r / a),
                first.count,
                last.run_ms.map_or(f64::NAN, |r| r / b),
                last.count,
            ));
        }
        md.push('\n');
    }
    if let Some((n, d)) = np.iter().find_map(|p| p.drain_ms_per.map(|d| (p.count, d))) {
        md.push_str(&format!(
            "Removing all {} containers at the end, {BATCH} `rm -f` at a time: {d:.1} ms per container.\n",
            n - 1
        ));
    }
    if let Err(e) = &nv {
        md.push_str(&format!("\nnetavark: not run: {e}\n"));
    }
    (md, svg(np, nv.ok().unwrap_or(&[])))
}

/// Cost against container count (log scale), one line per figure and system.
fn svg(np: &[Point], nv: &[Point]) -> String {
    let (w, h, l, r, t, b) = (720.0, 360.0, 60.0, 180.0, 30.0, 40.0);
    let counts: Vec<usize> = np.iter().map(|p| p.count).collect();
    let xmax = (*counts.iter().max().unwrap_or(&10) as f64).log10().max(1.0);
    type Series<'a> = (&'a str, &'a str, Vec<(usize, f64)>);
    let series: Vec<Series> = vec![
        ("netpath run -d", "#1f77b4", np.iter().filter_map(|p| p.run_ms.map(|v| (p.count, v))).collect()),
        ("netpath rm -f", "#2ca02c", np.iter().filter_map(|p| p.rm_ms.map(|v| (p.count, v))).collect()),
        ("netavark setup", "#d62728", nv.iter().filter_map(|p| p.run_ms.map(|v| (p.count, v))).collect()),
        ("netavark teardown", "#ff7f0e", nv.iter().filter_map(|p| p.rm_ms.map(|v| (p.count, v))).collect()),
    ];
    let ymax = series.iter().flat_map(|s| s.2.iter().map(|p| p.1)).fold(1.0f64, f64::max) * 1.1;
    let x = |n: usize| l + (n.max(1) as f64).log10() / xmax * (w - l - r);
    let y = |v: f64| h - b - v / ymax * (h - t - b);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\
         <text x=\"{l}\" y=\"18\" font-size=\"14\">Cost of one more container (ms) against containers on the host</text>\
         <line x1=\"{l}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/><line x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{}\" stroke=\"black\"/>",
        h - b,
        w - r,
        h - b,
        h - b
    );
    for &n in &counts {
        s.push_str(&format!("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{n}</text>", x(n), h - b + 16.0));
    }
    for i in 0..=4 {
        let v = ymax * i as f64 / 4.0;
        s.push_str(&format!("<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{v:.0}</text>", l - 6.0, y(v) + 4.0));
    }
    for (k, (name, color, pts)) in series.iter().enumerate() {
        if pts.is_empty() {
            continue;
        }
        let path: Vec<String> = pts.iter().map(|(n, v)| format!("{:.1},{:.1}", x(*n), y(*v))).collect();
        s.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
            path.join(" ")
        ));
        for (n, v) in pts {
            s.push_str(&format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/>", x(*n), y(*v)));
        }
        let ly = t + 16.0 + 18.0 * k as f64;
        s.push_str(&format!(
            "<rect x=\"{}\" y=\"{}\" width=\"12\" height=\"4\" fill=\"{color}\"/><text x=\"{}\" y=\"{}\">{name}</text>",
            w - r + 10.0,
            ly - 4.0,
            w - r + 28.0,
            ly
        ));
    }
    s.push_str("</svg>\n");
    s
}

/// What a daemon holds, for the churn figure.
#[derive(Debug, Clone, PartialEq)]
struct Footprint {
    rss_mib: f64,
    fds: usize,
    /// Datapath entries: endpoints, published ports, conntrack.
    entries: (u64, u64, u64),
    state_files: usize,
}

fn footprint(lab: &Lab) -> Result<Footprint> {
    let pid = lab.daemon_pid().context("daemon not running")?;
    let dp: serde_json::Value = serde_json::from_str(&np(lab, &["system", "datapath"])?)?;
    let n = |k: &str| dp[k].as_u64().unwrap_or(0);
    let count = |d: &str| std::fs::read_dir(lab.state_dir.join(d)).map_or(0, |r| r.count());
    Ok(Footprint {
        rss_mib: rss_mib(pid).unwrap_or(0.0),
        fds: std::fs::read_dir(format!("/proc/{pid}/fd"))?.count(),
        entries: (n("endpoints"), n("published_ports"), n("ct_entries")),
        state_files: count("db/containers") + count("containers") + count("netns"),
    })
}

/// `cycles` run/rm cycles ({BATCH} at a time) on a daemon with one other container: what is
/// left afterwards should be what was there before.
pub fn churn(cycles: usize) -> Result<String> {
    let lab = Lab::new("bench-churn");
    np(&lab, &["network", "create", "--subnet", "10.99.0.0/16", "churn"])?;
    np(&lab, &["run", "-d", "--name", "keep", "--network", "churn", "-p", "8000:80", "--", "sleep", "36000"])?;
    let cycle = |i: usize| -> Result<Child> {
        let name = format!("c{i}");
        let port = format!("{}:80", 20000 + i % BATCH);
        let script = format!(
            "{np} run -d --name {name} --network churn -p {port} -- sleep 36000 >/dev/null && {np} rm -f {name} >/dev/null",
            np = format!("{} --socket {}", netpath_tests::netpath_bin().display(), lab.socket.display())
        );
        Ok(std::process::Command::new("sh").args(["-c", &script]).spawn()?)
    };
    in_batches(cycle, 0..BATCH)?; // warm up: pools and lazily made things exist
    std::thread::sleep(SETTLE); // the warm-up's removals done in the background too
    let before = footprint(&lab)?;
    let t = Instant::now();
    in_batches(cycle, BATCH..BATCH + cycles)?;
    let took = t.elapsed();
    let same = |a: &Footprint, b: &Footprint| (a.fds, a.entries, a.state_files) == (b.fds, b.entries, b.state_files);
    // `rm -f` answers before its veth and namespace pin are gone (the reaper's work), and
    // malloc's arenas are trimmed every 10 s: read the footprint once both had their time.
    std::thread::sleep(SETTLE);
    let mut after = footprint(&lab)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !same(&before, &after) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
        after = footprint(&lab)?;
    }
    eprintln!("bench: churn {cycles}: before {before:?}, after {after:?}");
    Ok(format!(
        "Churn: {cycles} `run -d -p` + `rm -f` cycles, {BATCH} at a time, beside one running container, in {:.0} s \
         ({:.1} ms per cycle). Before → after (settled {} s): daemon RSS {:.1} → {:.1} MiB, open descriptors {} → {}, datapath \
         entries (endpoints, ports, flows) {:?} → {:?}, state and namespace files {} → {}: {}.\n",
        took.as_secs_f64(),
        ms(took) / cycles as f64,
        SETTLE.as_secs(),
        before.rss_mib,
        after.rss_mib,
        before.fds,
        after.fds,
        before.entries,
        after.entries,
        before.state_files,
        after.state_files,
        if same(&before, &after) { "nothing accumulates" } else { "SOMETHING ACCUMULATED" }
    ))
}

/// The whole section: both systems, the markdown and the chart.
pub fn run(counts: &[usize], samples: usize, churn_cycles: usize) -> Result<(String, String)> {
    let mut counts = counts.to_vec();
    counts.sort();
    counts.dedup();
    let np = netpath(&counts, samples)?;
    let nv = netavark(&counts, samples).map_err(|e| format!("{e:#}"));
    let (mut md, svg) = report(&np, nv.as_deref().map_err(|e| e.clone()), samples);
    if churn_cycles > 0 {
        match churn(churn_cycles) {
            Ok(c) => md.push_str(&format!("\n{c}")),
            Err(e) => md.push_str(&format!("\nChurn: not run: {e:#}\n")),
        }
    }
    Ok((md, svg))
}
