//! The services section: new TCP connections per second from a container to a service VIP
//! with 3 backends, with 1 and with many services defined, through netpath (Maglev in eBPF on
//! the client's veth) and through a kube-proxy-style iptables variant (a `KUBE-SERVICES`
//! chain with one `-d VIP --dport` rule per service jumping to a chain of `-m statistic
//! --mode random` rules that DNAT to the backends), in the same run.
//!
//! Both labs put the client and the 3 backends on one bridge of the host namespace; the
//! backends run this binary's accept-and-close server, the client its connect/close loop.
//! netpath: the real daemon, `service create` per service (each its own VIP and table, the
//! same 3 backends). iptables: plain namespaces, the client on its own subnet of the bridge
//! (as a pod behind a node's bridge), VIPs routed to the host; the measured service's rule
//! is the last of the chain (kube-proxy matches services one rule after another).

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netpath_tests::{Lab, in_ns, netpath_bin};

use crate::serve::CONN_PORT;
use crate::stats::median;
use crate::util::{check, conn_rate, iperf_tcp, ns_check, stop_child, stop_requested};

const T: Duration = Duration::from_secs(600);

/// One lab, ready to measure: the client's namespace and the VIP to connect to.
struct SvcLab {
    _lab: Lab,
    client_ns: PathBuf,
    vip: String,
    /// netpath lab: (the VIP of a service whose one backend is b1, b1's own address). iperf3
    /// opens a control and a data connection that must reach one server, which a VIP over
    /// several backends does not promise: the throughput figure uses a one-backend service.
    direct: Option<(String, String)>,
    /// netpath lab, first count: the three backends' own addresses (the ceiling figure).
    backends: Vec<String>,
    servers: Vec<Child>,
}

impl Drop for SvcLab {
    fn drop(&mut self) {
        for s in &mut self.servers {
            stop_child(s);
        }
    }
}

fn serve_in(exe: &Path, ns: &Path) -> Result<Child> {
    in_ns(ns, exe.to_str().context("exe path")?, &["__serve", "--max-secs", "3600"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting a backend server")
}

fn netpath_lab(exe: &Path, services: u32, tput: bool) -> Result<SvcLab> {
    let lab = Lab::new("bench-svc");
    let np = |args: &[&str]| check(lab.np_cmd(args), None, T);
    np(&["network", "create", "--subnet", "10.96.0.0/16", "svcnet"])?;
    let serve = format!("{} __serve --max-secs 3600", exe.display());
    for b in ["b1", "b2", "b3"] {
        np(&["run", "-d", "--name", b, "--network", "svcnet", "--", "sh", "-c", &serve])?;
    }
    np(&["run", "-d", "--name", "client", "--network", "svcnet", "--", "sleep", "3600"])?;
    // The fillers, 8 requests at a time, then the measured one last.
    if services > 1 {
        let script = format!(
            "seq 1 {} | xargs -P 8 -I@ {} --socket {} service create --name f@ --network svcnet \
             --backend b1 --backend b2 --backend b3 >/dev/null",
            services - 1,
            netpath_bin().display(),
            lab.socket.display()
        );
        check(in_ns(&lab.host_ns, "sh", &["-c", &script]), None, T)?;
    }
    np(&[
        "service",
        "create",
        "--name",
        "target",
        "--network",
        "svcnet",
        "--backend",
        "b1",
        "--backend",
        "b2",
        "--backend",
        "b3",
    ])?;
    let v: serde_json::Value = serde_json::from_str(&np(&["service", "inspect", "target"])?)?;
    let vip =
        v[0]["Endpoint"]["VirtualIPs"][0]["Addr"].as_str().context("no VIP")?.split('/').next().unwrap().to_string();
    let v: serde_json::Value = serde_json::from_str(&np(&["inspect", "client"])?)?;
    let client_ns = PathBuf::from(v[0]["NetworkSettings"]["SandboxKey"].as_str().context("no SandboxKey")?);
    let mut backends = vec![];
    for b in ["b1", "b2", "b3"] {
        let v: serde_json::Value = serde_json::from_str(&np(&["inspect", b])?)?;
        let a = v[0]["NetworkSettings"]["Networks"]["svcnet"]["IPAddress"].as_str().context("no backend address")?;
        backends.push(a.to_string());
    }
    let direct = backends[0].as_str();
    let direct = if tput {
        np(&["service", "create", "--name", "tput", "--network", "svcnet", "--backend", "b1"])?;
        let v: serde_json::Value = serde_json::from_str(&np(&["service", "inspect", "tput"])?)?;
        let vip = v[0]["Endpoint"]["VirtualIPs"][0]["Addr"].as_str().context("no VIP")?.split('/').next().unwrap();
        Some((vip.to_string(), direct.to_string()))
    } else {
        None
    };
    let backends = if tput { backends } else { vec![] };
    Ok(SvcLab { _lab: lab, client_ns, vip, direct, backends, servers: vec![] })
}

fn iptables_lab(exe: &Path, services: u32) -> Result<SvcLab> {
    let lab = Lab::without_daemon("bench-svc-ipt");
    let host = lab.host_ns.clone();
    ns_check(&host, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    ns_check(&host, "ip", &["link", "add", "br-svc", "type", "bridge"])?;
    ns_check(&host, "ip", &["addr", "add", "10.97.0.1/24", "dev", "br-svc"])?;
    ns_check(&host, "ip", &["addr", "add", "10.97.1.1/24", "dev", "br-svc"])?;
    ns_check(&host, "ip", &["link", "set", "br-svc", "up"])?;
    let wire = |name: &str, ip: &str, gw: &str| -> Result<PathBuf> {
        let ns = lab.add_ns(name);
        let ns_s = ns.to_str().context("netns path")?;
        let host_if = format!("v-{name}");
        ns_check(&host, "ip", &["link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", ns_s])?;
        ns_check(&host, "ip", &["link", "set", &host_if, "master", "br-svc", "up"])?;
        ns_check(&ns, "ip", &["addr", "add", ip, "dev", "eth0"])?;
        ns_check(&ns, "ip", &["link", "set", "eth0", "up"])?;
        ns_check(&ns, "ip", &["route", "add", "default", "via", gw])?;
        Ok(ns)
    };
    let mut servers = vec![];
    let backends = ["10.97.0.11", "10.97.0.12", "10.97.0.13"];
    for (i, b) in backends.iter().enumerate() {
        let ns = wire(&format!("b{}", i + 1), &format!("{b}/24"), "10.97.0.1")?;
        servers.push(serve_in(exe, &ns)?);
    }
    let client_ns = wire("cl", "10.97.1.2/24", "10.97.1.1")?;
    // kube-proxy's shape: one KUBE-SERVICES rule per service, a chain per service picking an
    // endpoint chain at random, an endpoint chain per backend doing the DNAT.
    let vip_of = |i: u32| format!("10.99.{}.{}", i / 250, 1 + i % 250);
    let mut rules = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    for b in 1..=3 {
        rules.push_str(&format!(":KUBE-SEP-{b} - [0:0]\n"));
    }
    for i in 0..services {
        rules.push_str(&format!(":KUBE-SVC-{i} - [0:0]\n"));
    }
    rules.push_str("-A PREROUTING -j KUBE-SERVICES\n");
    for i in 0..services {
        rules.push_str(&format!("-A KUBE-SERVICES -d {}/32 -p tcp --dport {CONN_PORT} -j KUBE-SVC-{i}\n", vip_of(i)));
        rules.push_str(&format!(
            "-A KUBE-SVC-{i} -m statistic --mode random --probability 0.33333333349 -j KUBE-SEP-1\n\
             -A KUBE-SVC-{i} -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-2\n\
             -A KUBE-SVC-{i} -j KUBE-SEP-3\n"
        ));
    }
    for (k, b) in backends.iter().enumerate() {
        rules.push_str(&format!("-A KUBE-SEP-{} -p tcp -j DNAT --to-destination {b}:{CONN_PORT}\n", k + 1));
    }
    rules.push_str("COMMIT\n");
    check(in_ns(&host, "iptables-restore", &["-w"]), Some(rules.as_bytes()), T)?;
    Ok(SvcLab { _lab: lab, client_ns, vip: vip_of(services - 1), direct: None, backends: vec![], servers })
}

/// Runs the services section; returns its markdown.
pub fn run(exe: &Path, counts: &[u32], reps: usize, secs: u32) -> Result<String> {
    let started = Instant::now();
    let mut rows: Vec<(String, u32, Vec<f64>, f64)> = vec![];
    // (through the VIP, straight to a backend), Gbit/s, per repetition: at the first count.
    let mut throughput: Vec<(f64, f64)> = vec![];
    // New conn/s from the client container straight to the 3 backends' addresses in turn (no
    // VIP, no service lookup): what the machine's TCP stacks allow, every datapath's ceiling.
    let mut ceiling: Vec<f64> = vec![];
    for &n in counts {
        for kind in ["netpath", "iptables"] {
            if stop_requested() {
                bail!("interrupted");
            }
            let t = Instant::now();
            eprintln!("bench: services: setting up {kind} with {n} services");
            let lab = if kind == "netpath" {
                netpath_lab(exe, n.max(1), Some(&n) == counts.first())?
            } else {
                iptables_lab(exe, n.max(1))?
            };
            let setup = t.elapsed().as_secs_f64();
            let mut v = vec![];
            for rep in 0..reps {
                let r = conn_rate(exe, &lab.client_ns, &format!("{}:{CONN_PORT}", lab.vip), secs)?;
                eprintln!("bench: services: {kind}, {n} services, rep {}: {r:.0} conn/s", rep + 1);
                v.push(r);
                if let Some((vip, direct)) = &lab.direct {
                    // iperf3 -s runs in every backend's `__serve`.
                    let tput = |ip: &str| iperf_tcp(&lab.client_ns, ip, crate::serve::IPERF_PORT, secs);
                    let (via, to) = (tput(vip)?, tput(direct)?);
                    eprintln!("bench: services: TCP through the VIP {via:.1} Gbit/s, to a backend {to:.1} Gbit/s");
                    throughput.push((via, to));
                }
                if !lab.backends.is_empty() {
                    let addrs: Vec<String> = lab.backends.iter().map(|b| format!("{b}:{CONN_PORT}")).collect();
                    let c = conn_rate(exe, &lab.client_ns, &addrs.join(","), secs)?;
                    eprintln!("bench: services: straight to the backends {c:.0} conn/s");
                    ceiling.push(c);
                }
            }
            rows.push((kind.to_string(), n, v, setup));
        }
    }
    let med = |v: &[f64]| median(v).unwrap_or(f64::NAN);
    let rate = |k: &str, n: u32| rows.iter().find(|r| r.0 == k && r.1 == n).map_or(f64::NAN, |r| med(&r.2));
    let mut md = String::from("## Services\n\n");
    md.push_str(&format!(
        "- {reps} repetition(s), {secs}s per run, services {counts:?}; took {:.0}s\n\n",
        started.elapsed().as_secs_f64()
    ));
    md.push_str("| datapath | services | new conn/s ↑ | setup (s) |\n| --- | ---: | ---: | ---: |\n");
    for (k, n, v, setup) in &rows {
        md.push_str(&format!("| {k} | {n} | {:.0} | {setup:.1} |\n", med(v)));
    }
    if let (Some(lo), Some(hi)) = (counts.iter().min(), counts.iter().max())
        && lo != hi
    {
        md.push_str(&format!(
            "\nnetpath at {hi} services: {:.2}× its rate at {lo} (target ≥ 0.9×), {:.1}× iptables at {hi} (target ≥ 8×).\n",
            rate("netpath", *hi) / rate("netpath", *lo),
            rate("netpath", *hi) / rate("iptables", *hi),
        ));
        // What each datapath adds to a new connection at `hi` services over its cost at `lo`:
        // the part that grows with the number of services.
        let extra = |k: &str| 1e6 / rate(k, *hi) - 1e6 / rate(k, *lo);
        md.push_str(&format!(
            "\nWhat {hi} services add to each new connection: netpath {:+.1} µs, iptables {:+.1} µs.\n",
            extra("netpath"),
            extra("iptables"),
        ));
        if !ceiling.is_empty() {
            let c = med(&ceiling);
            md.push_str(&format!(
                "\nCeiling: the client straight to the 3 backends' addresses in turn (no VIP at all) opens {c:.0} conn/s, \
                 so no datapath could show much more than {:.1}× iptables at {hi} on this machine; netpath at {hi} \
                 services runs at {:.2}× that ceiling.\n",
                c / rate("iptables", *hi),
                rate("netpath", *hi) / c,
            ));
        }
    }
    if !throughput.is_empty() {
        let via = med(&throughput.iter().map(|t| t.0).collect::<Vec<_>>());
        let to = med(&throughput.iter().map(|t| t.1).collect::<Vec<_>>());
        md.push_str(&format!(
            "\nTCP throughput, one iperf3 stream from the client container to one backend: through the VIP of a \
             service with that one backend {via:.1} Gbit/s, straight to its address {to:.1} Gbit/s: {:.2}× \
             (target ≥ 0.95×).\n",
            via / to
        ));
    }
    md.push_str(
        "\nMethod: the client (`netpath-bench __conn-client`, two threads) connects to VIP:8080, reads one byte and \
         closes with an RST, in a loop; 3 backends run the accept-and-close server. netpath: one `service create` \
         per service (its own VIP on the network, its own Maglev table, the same 3 backends), the client a \
         container on that network. iptables: kube-proxy's chains (KUBE-SERVICES → KUBE-SVC-n with `-m statistic \
         --mode random` → KUBE-SEP-k DNAT), the measured service's rule last. Cells are medians over repetitions. \
         The first count's netpath lab also holds `tput`, a service whose one backend is b1, for the \
         throughput figure (iperf3's control and data connections must reach one server).\n",
    );
    Ok(md)
}
