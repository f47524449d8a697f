//! The overlay section: a container on one host to a container on another (two lab hosts on
//! an underlay bridge, MTU 1500, overlay MTU 1450), through netpath's VXLAN datapath (eBPF on
//! the container's veth sets the tunnel key and redirects to an external-mode VXLAN device;
//! `vxlan_in` delivers straight to the veth; or, as the daemon sets it up, `underlay_in` on
//! the underlay interface decapsulates ahead of the device) against the kernel's VXLAN as Docker's overlay
//! driver builds it (a bridge with a VXLAN port, static FDB and proxy-ARP neighbour entries;
//! Flannel's vxlan backend is the same device with static entries), in the same run: TCP
//! throughput (iperf3, one stream) and TCP round trips (sockperf ping-pong, p50 and p99).
//!
//! netpath's side is its datapath without a daemon (loaded and programmed by the code the
//! daemon uses, `netpath_tests::overlay_lab`): the cluster plumbing adds nothing per packet.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use netpath_tests::overlay_lab::{Host, Kind, two_hosts};
use netpath_tests::{Lab, in_ns};

use crate::figures::{parse_iperf_tcp, parse_sockperf_percentile};
use crate::serve::{CONN_PORT, IPERF_PORT, SOCKPERF_PORT};
use crate::stats::median;
use crate::util::{check, stop_child, stop_requested, tail};

const CLIENT: (&str, &str) = ("ov-c1", "10.210.0.2");
const SERVER: (&str, &str) = ("ov-s1", "10.210.0.3");

struct OverlayLab {
    kind: Kind,
    server: Child,
    // Dropped after the server is stopped: the hosts (datapath handles), then the lab.
    hosts: Option<[Host; 2]>,
    _lab: Lab,
}

impl Drop for OverlayLab {
    fn drop(&mut self) {
        stop_child(&mut self.server);
        self.hosts.take();
    }
}

impl OverlayLab {
    fn client_ns(&self) -> &Path {
        &self.hosts.as_ref().expect("hosts")[0].containers[0].ns
    }
}

fn name(kind: Kind) -> &'static str {
    match kind {
        Kind::Netpath => "netpath (eBPF), decap by the VXLAN device",
        Kind::NetpathUnderlay => "netpath (eBPF), decap on the underlay",
        Kind::Kernel => "kernel VXLAN + FDB + bridge",
    }
}

fn setup(exe: &Path, kind: Kind) -> Result<OverlayLab> {
    let lab = Lab::without_daemon(match kind {
        Kind::Netpath => "bench-ov-np",
        Kind::NetpathUnderlay => "bench-ov-ul",
        Kind::Kernel => "bench-ov-k",
    });
    // The lab helpers assert as they go: a failure here becomes this section's error.
    let hosts = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| two_hosts(&lab, kind, &[CLIENT], &[SERVER])))
        .map_err(|p| {
            anyhow!("setting up the two hosts: {}", p.downcast_ref::<String>().map_or("a panic", |s| s.as_str()))
        })?;
    let server =
        in_ns(&hosts[1].containers[0].ns, exe.to_str().context("exe path")?, &["__serve", "--max-secs", "3600"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the servers")?;
    let l = OverlayLab { kind, server, hosts: Some(hosts), _lab: lab };
    let probe = in_ns(
        l.client_ns(),
        exe.to_str().context("exe path")?,
        &["__probe", &format!("{}:{CONN_PORT}", SERVER.1), "--timeout-secs", "30"],
    );
    check(probe, None, Duration::from_secs(40)).context("the server across the overlay never answered")?;
    Ok(l)
}

/// One repetition's figures.
#[derive(Clone, Copy)]
struct Figures {
    /// One stream with CUBIC (Linux's default congestion control).
    gbps: f64,
    /// The CPU that stream took, client and server processes together (iperf3's own
    /// accounting: the path's softirq work runs in their context), per Gbit/s.
    cpu_per_gbps: f64,
    /// The same stream with both ends pinned to CPU 0 (`iperf3 -A 0,0`), per Gbit/s: the
    /// whole path then runs on one CPU, so this is its cost without the scheduler's part (where
    /// the two ends land moves the unpinned stream 2-3×). The steadiest figure of the section.
    cpu_per_gbps_one_cpu: f64,
    /// One stream with BBR (NaN where the kernel has none).
    gbps_bbr: f64,
    /// That stream as its sender saw it (iperf3's TCP_INFO): retransmitted segments, mean
    /// smoothed RTT (µs) and the largest cwnd (KiB). BBR's rate follows its own model, so
    /// these say why a variant's BBR figure differs where the CUBIC one does not.
    bbr_retrans: f64,
    bbr_rtt_us: f64,
    bbr_cwnd_kib: f64,
    p50: f64,
    p99: f64,
}

/// One repetition. The stream runs with CUBIC, whatever the machine's default: BBR paces at
/// its own bandwidth estimate, which in this lab stays near 11 Gbit/s on either datapath (the
/// figure then measures the estimator, not the path; CUBIC carries 25-30 Gbit/s here). BBR's
/// figure is kept beside it, and the CPU the CUBIC stream cost per Gbit/s, which moves far
/// less with the machine's other load than the throughput does.
fn measure(l: &OverlayLab, secs: u32, bbr: bool) -> Result<Figures> {
    let limit = Duration::from_secs(u64::from(secs) + 30);
    let t = secs.to_string();
    let port = IPERF_PORT.to_string();
    let iperf = |cc: &str, extra: &[&str]| -> Result<String> {
        let mut args = vec!["-c", SERVER.1, "-p", &port, "-t", &t, "-J", "-C", cc];
        args.extend_from_slice(extra);
        check(in_ns(l.client_ns(), "iperf3", &args), None, limit)
    };
    // Gbit/s and CPU % (client and server processes) per Gbit/s.
    let stream = |extra: &[&str]| -> Result<(f64, f64)> {
        let out = iperf("cubic", extra)?;
        let gbps = parse_iperf_tcp(&out)?;
        let j: serde_json::Value = serde_json::from_str(&out).context("iperf3 JSON")?;
        let cpu = &j["end"]["cpu_utilization_percent"];
        let cpu_total = cpu["host_total"].as_f64().context("no host CPU")?
            + cpu["remote_total"].as_f64().context("no remote CPU")?;
        Ok((gbps, cpu_total / gbps))
    };
    let (gbps, cpu_per_gbps) = stream(&[])?;
    // The server side's affinity is the client's to ask for (the server resets it after the test).
    let (_, cpu_per_gbps_one_cpu) = stream(&["-A", "0,0"])?;
    let (gbps_bbr, bbr_retrans, bbr_rtt_us, bbr_cwnd_kib) = if bbr {
        let out = iperf("bbr", &[])?;
        let j: serde_json::Value = serde_json::from_str(&out).context("iperf3 JSON")?;
        let s = &j["end"]["streams"][0]["sender"];
        let f = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
        (parse_iperf_tcp(&out)?, f("retransmits"), f("mean_rtt"), f("max_snd_cwnd") / 1024.0)
    } else {
        (f64::NAN, f64::NAN, f64::NAN, f64::NAN)
    };
    let pp = ["pp", "--tcp", "-i", SERVER.1, "-p", &SOCKPERF_PORT.to_string(), "-t", &t, "--full-rtt"];
    let out = check(in_ns(l.client_ns(), "sockperf", &pp), None, limit)?;
    let p = |q: &str| parse_sockperf_percentile(&out, q).with_context(|| format!("no p{q} in {}", tail(&out)));
    Ok(Figures {
        gbps,
        cpu_per_gbps,
        cpu_per_gbps_one_cpu,
        gbps_bbr,
        bbr_retrans,
        bbr_rtt_us,
        bbr_cwnd_kib,
        p50: p("50.000")?,
        p99: p("99.000")?,
    })
}

/// Sets up both labs, prints each one's host and container namespaces, and holds them for
/// `secs` or until a stop is requested (`__overlay-hold`).
pub fn hold(exe: &Path, secs: Duration) -> Result<()> {
    let mut labs = vec![];
    for kind in KINDS {
        let l = setup(exe, kind)?;
        let hosts = l.hosts.as_ref().expect("hosts");
        println!(
            "{}: hosts {} {}, client {} ({}), server {} ({})",
            name(kind),
            hosts[0].ns.display(),
            hosts[1].ns.display(),
            hosts[0].containers[0].ns.display(),
            CLIENT.1,
            hosts[1].containers[0].ns.display(),
            SERVER.1
        );
        labs.push(l);
    }
    println!("ready");
    let end = Instant::now() + secs;
    while Instant::now() < end && !stop_requested() {
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// The variants, in the table's order: netpath with the VXLAN device decapsulating, netpath
/// decapsulating on the underlay (what the daemon attaches), the kernel's.
const KINDS: [Kind; 3] = [Kind::Netpath, Kind::NetpathUnderlay, Kind::Kernel];

/// `np`'s throughput over the kernel's, repetition by repetition (each pair ran back to
/// back): the median and the range, and each variant's own range.
fn ratio_spread(what: &str, np: &[Figures], k: &[Figures]) -> String {
    let pairs: Vec<f64> = np.iter().zip(k).map(|(a, b)| a.gbps / b.gbps).collect();
    let range = |v: &[f64]| {
        let (lo, hi) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        format!("{lo:.2}–{hi:.2}")
    };
    let gbps = |v: &[Figures]| v.iter().map(|x| x.gbps).collect::<Vec<_>>();
    format!(
        "Repetition by repetition (back to back): {what}/kernel throughput {:.2}× median, {}× range; \
         {what} {} Gbit/s, kernel {} Gbit/s.\n",
        median(&pairs).unwrap_or(f64::NAN),
        range(&pairs),
        range(&gbps(np)),
        range(&gbps(k))
    )
}

/// Runs the overlay section; returns its markdown.
pub fn run(exe: &Path, reps: usize, secs: u32) -> Result<String> {
    let started = Instant::now();
    let mut labs = vec![];
    for kind in KINDS {
        eprintln!("bench: overlay: setting up {}", name(kind));
        labs.push(setup(exe, kind)?);
    }
    let bbr = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
        .is_ok_and(|a| a.split_whitespace().any(|c| c == "bbr"));
    let mut results: Vec<Vec<Figures>> = vec![vec![]; labs.len()];
    // Both variants in each repetition, in turn first (ABBA...), so that drift and whatever
    // the first run of a pair meets hit both alike.
    for rep in 0..reps {
        let order: Vec<usize> = if rep % 2 == 0 { (0..labs.len()).collect() } else { (0..labs.len()).rev().collect() };
        for i in order {
            let l = &labs[i];
            if stop_requested() {
                bail!("interrupted");
            }
            let r = measure(l, secs, bbr).with_context(|| format!("measuring {}", name(l.kind)))?;
            eprintln!(
                "bench: overlay: {}, rep {}: {:.2} Gbit/s ({:.2} CPU %/Gbit/s, {:.2} on one CPU; BBR {:.2}: {:.0} retransmits, RTT {:.0} µs, cwnd ≤ {:.0} KiB), RTT p50 {:.1} µs, p99 {:.1} µs",
                name(l.kind),
                rep + 1,
                r.gbps,
                r.cpu_per_gbps,
                r.cpu_per_gbps_one_cpu,
                r.gbps_bbr,
                r.bbr_retrans,
                r.bbr_rtt_us,
                r.bbr_cwnd_kib,
                r.p50,
                r.p99
            );
            results[i].push(r);
        }
    }
    let med = |v: &[Figures], f: fn(&Figures) -> f64| median(&v.iter().map(f).collect::<Vec<_>>()).unwrap_or(f64::NAN);
    let mut md = String::from("## Overlay (cross-host)\n\n");
    md.push_str(&format!("- {reps} repetition(s), {secs}s per run; took {:.0}s\n\n", started.elapsed().as_secs_f64()));
    md.push_str(
        "| overlay datapath | TCP Gbit/s ↑ | CPU % per Gbit/s ↓ | same, ends on one CPU, least ↓ | TCP Gbit/s, BBR ↑ | RTT p50 µs ↓ | RTT p99 µs ↓ |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    let mut cells = vec![];
    for (l, r) in labs.iter().zip(&results) {
        let c = Figures {
            gbps: med(r, |x| x.gbps),
            cpu_per_gbps: med(r, |x| x.cpu_per_gbps),
            // The least: on one CPU the figure only grows with interference (another job's
            // time slices, its softirq work run in this stream's context), never shrinks.
            cpu_per_gbps_one_cpu: r.iter().map(|x| x.cpu_per_gbps_one_cpu).fold(f64::NAN, f64::min),
            gbps_bbr: med(r, |x| x.gbps_bbr),
            bbr_retrans: med(r, |x| x.bbr_retrans),
            bbr_rtt_us: med(r, |x| x.bbr_rtt_us),
            bbr_cwnd_kib: med(r, |x| x.bbr_cwnd_kib),
            p50: med(r, |x| x.p50),
            p99: med(r, |x| x.p99),
        };
        md.push_str(&format!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} |\n",
            name(l.kind),
            c.gbps,
            c.cpu_per_gbps,
            c.cpu_per_gbps_one_cpu,
            c.gbps_bbr,
            c.p50,
            c.p99
        ));
        cells.push(c);
    }
    if let [dev, ul, k] = cells[..] {
        md.push('\n');
        for (what, np) in [("netpath, device decap", dev), ("netpath, underlay decap", ul)] {
            md.push_str(&format!(
                "{what}: {:.2}× the kernel VXLAN's TCP throughput (target ≥ 1.0×) at {:.2}× its CPU per Gbit/s \
                 ({:.2}× with both ends on one CPU); {:.2}× with BBR; {:.2}× its p50 round trip.\n",
                np.gbps / k.gbps,
                np.cpu_per_gbps / k.cpu_per_gbps,
                np.cpu_per_gbps_one_cpu / k.cpu_per_gbps_one_cpu,
                np.gbps_bbr / k.gbps_bbr,
                np.p50 / k.p50
            ));
        }
        // The spread says how far to trust that ratio: one stream on two shared vCPUs moves
        // with where the scheduler puts its ends and with the machine's other load.
        if let [dev_reps, ul_reps, k_reps] = &results[..] {
            md.push_str(&ratio_spread("netpath, device decap", dev_reps, k_reps));
            md.push_str(&ratio_spread("netpath, underlay decap", ul_reps, k_reps));
        }
        md.push_str("The BBR stream as its sender saw it (medians):");
        for (l, c) in labs.iter().zip(&cells) {
            md.push_str(&format!(
                " {}: {:.0} retransmits, mean RTT {:.0} µs, cwnd ≤ {:.0} KiB;",
                name(l.kind),
                c.bbr_retrans,
                c.bbr_rtt_us,
                c.bbr_cwnd_kib
            ));
        }
        md.pop();
        md.push_str(".\n");
    }
    // The cluster rows need the datapath labs gone (CPU, and their namespaces).
    drop(labs);
    let samples = (reps * 3 + 1).max(5);
    match crate::overlay_cluster::measure(exe, samples, reps, secs) {
        Ok(f) => md.push_str(&crate::overlay_cluster::markdown(&f)),
        Err(e) => md.push_str(&format!("\ncluster rows not run: {e:#}\n")),
    }
    md.push_str(
        "\nMethod: two host namespaces on an underlay bridge (MTU 1500), a container on each (MTU 1450), \
         iperf3 (one TCP stream, CUBIC, then the same with both ends pinned to CPU 0, then BBR) and sockperf ping-pong over TCP from one to the other. netpath: its eBPF \
         object and VXLAN device without a daemon, programmed through the daemon's overlay API, once with the device \
         decapsulating everything (`vxlan_in`), once with `underlay_in` on the underlay interface ahead of it (as the \
         daemon attaches it: non-GSO packets for local containers are decapsulated there). kernel: a \
         bridge with a VXLAN port (nolearning, proxy ARP) and static FDB and neighbour entries, as Docker's \
         overlay driver programs them, but with netpath's outer UDP checksum setting (zero; the kernel's and \
         Docker's default is on, at no measurable cost here) and no br_netfilter hooks on its bridge (Docker \
         hosts load br_netfilter; here it depends on what ran before, and its hooks cost the kernel about 4% \
         more CPU per Gbit/s): the baseline at its best, the same on every run. Cells are medians over \
         repetitions, but for the stream pinned to one CPU: the least CPU per Gbit/s of the repetitions. Cluster rows: two daemons joined \
         through etcd in the lab, an attachable overlay; the name probe asks every 2 ms; connection rates \
         are the bench's accept-and-close client and server.\n",
    );
    Ok(md)
}
