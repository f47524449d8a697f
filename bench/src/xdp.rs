//! The XDP section: netpath with `--xdp native` and `--xdp generic` (uplink_xdp ahead of TC
//! on the uplink) beside netpath (TC only) and `direct` (plain routing to the container), each
//! in its own lab.
//!
//! Packet rates come from an XDP-native sender (`xdpgen`: BPF_PROG_RUN live frames on the
//! client's veth), so the lab host's uplink receives XDP frames with no socket buffer, as
//! from a NIC driver; the uplink has GRO on, which gives its veth the NAPI such frames need
//! (with no XDP program the veth builds an skb from each: kernel routing, TC):
//! - UDP 64 B: one generator thread to the published port (direct: the container's address),
//!   counted by a UDP socket in the container (`__udp-sink`, recvmmsg, busy-polling);
//! - flood: 64 B UDP to the container's address (closed in `nat` mode: both datapaths drop it
//!   as `direct-access`) from the same one thread, what each datapath drops per second
//!   (its counter), and a sockperf ping-pong's p99 on the published port meanwhile; and a
//!   ceiling, the same flood into a bare XDP_DROP (the generator's and the veth's own cost).
//!
//! TCP 1 stream and the RTT use ordinary sockets (iperf3, sockperf) and a client sending full
//! checksums (`ethtool -K eth0 tx off`), as frames off a wire carry: uplink_xdp leaves a
//! checksum a local stack left to offload to TC. With it the client also stops sending TSO
//! super-frames, so TCP figures here are lower than the main table's.

use std::net::SocketAddrV4;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netpath_tests::{CLIENT_IP, HOST_ETH0_IP};

use crate::figures::{self, Durations};
use crate::serve::IPERF_PORT;
use crate::stats::median;
use crate::util::{ns_check, stop_child, stop_requested, wait_until};
use crate::variants::{self, CTR_IP, Config, Ctx, Kind, SUBNET, Variant};

/// Where the flood goes: the container's address, a port nothing listens on.
const FLOOD_PORT: u16 = 9;
/// The generator's source port.
const GEN_SRC_PORT: u16 = 7000;
/// Generator threads. One: the lab's uplink is a single-queue veth, so one CPU's NAPI takes
/// every frame whatever the number of senders (a second thread only fills its ring, measured:
/// millions of xmit errors), and the generator's thread runs that NAPI in its own softirq, so
/// one thread already sends at the rate the receive path takes. The other CPU is the
/// container's reader's and the ping-pong's.
const GEN_THREADS: usize = 1;

/// A row: its label, kind, lab, samples, and the MAC of its lab host's uplink.
type Row = (String, Kind, Box<dyn Variant>, Samples, String);

#[derive(Default)]
struct Samples {
    udp_sent_kpps: Vec<f64>,
    udp_overflow_kpps: Vec<f64>,
    udp_kpps: Vec<f64>,
    tcp1: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    flood_sent_kpps: Vec<f64>,
    dropped_kpps: Vec<f64>,
    p99_loaded: Vec<f64>,
}

/// Packets the datapath dropped as `direct-access` so far.
fn direct_access_drops(v: &dyn Variant) -> Result<f64> {
    let c = v.datapath_counters()?;
    c["drops"]["direct-access"].as_f64().context("no direct-access counter")
}

/// The MAC of the lab host's uplink (the generator's frames are addressed to it).
fn uplink_mac(v: &dyn Variant) -> Result<String> {
    let out = ns_check(v.uplink_ns()?, "ip", &["-j", "link", "show", "eth0"])?;
    let j: serde_json::Value = serde_json::from_str(&out).context("ip -j link")?;
    Ok(j[0]["address"].as_str().context("no address in ip -j link")?.to_string())
}

/// Starts `__xdp-gen` in the client namespace: 64 B UDP to `dst` for `secs`.
fn spawn_gen(v: &dyn Variant, exe: &Path, mac: &str, dst: SocketAddrV4, threads: usize, secs: f64) -> Result<Child> {
    let src = format!("{CLIENT_IP}:{GEN_SRC_PORT}");
    let args = [
        "__xdp-gen",
        "eth0",
        "--dst-mac",
        mac,
        "--src",
        &src,
        "--dst",
        &dst.to_string(),
        "--threads",
        &threads.to_string(),
        "--secs",
        &secs.to_string(),
    ];
    let mut c = netpath_tests::in_ns(v.client_ns(), exe.to_str().context("exe path")?, &args);
    spawn_piped(&mut c).context("starting the XDP generator")
}

fn spawn_piped(c: &mut Command) -> Result<Child> {
    Ok(c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?)
}

/// Waits for a helper that prints one JSON object; returns it.
fn finish(mut child: Child, what: &str, within: Duration) -> Result<serde_json::Value> {
    let status = wait_until(&mut child, Instant::now() + within)?;
    let (mut out, mut err) = (String::new(), String::new());
    use std::io::Read;
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    stop_child(&mut child);
    if !status.is_some_and(|s| s.success()) {
        bail!("{what} failed ({status:?}): {}", crate::util::tail(&err));
    }
    serde_json::from_str(out.trim()).with_context(|| format!("{what} JSON: {out:?}"))
}

fn num(j: &serde_json::Value, what: &str, field: &str) -> Result<f64> {
    j[field].as_f64().with_context(|| format!("no {field} from {what}: {j}"))
}

/// What the generator sent: (frames, seconds it ran).
fn finish_gen(child: Child, secs: f64) -> Result<(f64, f64)> {
    let what = "the XDP generator";
    let j = finish(child, what, Duration::from_secs_f64(secs + 30.0))?;
    Ok((num(&j, what, "sent")?, num(&j, what, "secs")?))
}

/// UDP 64 B: the generator to the published port (direct: the container's port) while a
/// socket in the container counts. Returns (sent kpps, received kpps, socket overflows kpps),
/// all over the generator's run.
fn udp_figure(v: &dyn Variant, exe: &Path, mac: &str, d: Durations) -> Result<(f64, f64, f64)> {
    let secs = f64::from(d.secs);
    let t = v.target();
    let sink_secs = (secs + 2.0).to_string();
    let port = IPERF_PORT.to_string();
    let exe_s = exe.to_str().context("exe path")?;
    let sink = spawn_piped(&mut v.container_cmd(exe_s, &["__udp-sink", &port, "--secs", &sink_secs])?)
        .context("starting the UDP sink")?;
    std::thread::sleep(Duration::from_millis(500));
    let gen_child = spawn_gen(v, exe, mac, SocketAddrV4::new(t.ip, t.iperf), GEN_THREADS, secs)?;
    let sent = finish_gen(gen_child, secs);
    let what = "the UDP sink";
    let j = finish(sink, what, Duration::from_secs_f64(secs + 30.0))?;
    let (sent, took) = sent?;
    let got = num(&j, what, "received")?;
    let overflow = j["snmp"]["RcvbufErrors"].as_f64().unwrap_or(f64::NAN);
    Ok((sent / took / 1e3, got / took / 1e3, overflow / took / 1e3))
}

/// The flood figure: the generator floods the closed container address while sockperf runs
/// on the published port. Returns (sent kpps, dropped kpps, loaded p99 µs).
fn flood_figure(v: &dyn Variant, exe: &Path, mac: &str, d: Durations) -> Result<(f64, f64, f64)> {
    let flood_secs = f64::from(d.secs) + 1.0;
    let before = direct_access_drops(v)?;
    let to = SocketAddrV4::new(CTR_IP.parse()?, FLOOD_PORT);
    let child = spawn_gen(v, exe, mac, to, GEN_THREADS, flood_secs)?;
    std::thread::sleep(Duration::from_millis(300));
    let loaded = figures::tcp_latency(v, d);
    let (sent, took) = finish_gen(child, flood_secs)?;
    let (_, p99) = loaded?;
    let after = direct_access_drops(v)?;
    Ok((sent / took / 1e3, (after - before) / took / 1e3, p99))
}

/// The flood table's ceiling, in the `direct` lab: the same flood into a bare `XDP_DROP` on
/// the uplink (`__xdp-drop`), what the generator and the veth get through when the receiver
/// does nothing. Returns (sent kpps, dropped kpps).
fn ceiling_figure(v: &dyn Variant, exe: &Path, mac: &str, d: Durations) -> Result<(f64, f64)> {
    let flood_secs = f64::from(d.secs) + 1.0;
    let exe_s = exe.to_str().context("exe path")?;
    let drop_secs = (flood_secs + 1.5).to_string();
    let mut c = netpath_tests::in_ns(v.uplink_ns()?, exe_s, &["__xdp-drop", "eth0", "--secs", &drop_secs]);
    let dropper = spawn_piped(&mut c).context("starting the bare XDP_DROP")?;
    std::thread::sleep(Duration::from_millis(500));
    let to = SocketAddrV4::new(CTR_IP.parse()?, FLOOD_PORT);
    let sent = spawn_gen(v, exe, mac, to, GEN_THREADS, flood_secs).and_then(|g| finish_gen(g, flood_secs));
    let what = "the bare XDP_DROP";
    let j = finish(dropper, what, Duration::from_secs_f64(flood_secs + 30.0))?;
    let (sent, took) = sent?;
    Ok((sent / took / 1e3, num(&j, what, "dropped")? / took / 1e3))
}

/// `__xdp-prog-cost` (progcost.rs) in a process of its own: it moves to a namespace of its
/// own. Returns (uplink_xdp, uplink_in) ns per run.
fn prog_cost(exe: &Path) -> Result<(f64, f64)> {
    let child = spawn_piped(Command::new(exe).arg("__xdp-prog-cost"))?;
    let what = "the per-program cost";
    let j = finish(child, what, Duration::from_secs(120))?;
    Ok((num(&j, what, "uplink_xdp_ns")?, num(&j, what, "uplink_in_ns")?))
}

/// Runs the XDP section; returns its markdown.
pub fn run(exe: &Path, reps: usize, secs: u32) -> Result<String> {
    let started = Instant::now();
    let d = Durations { secs };
    let ctx = Ctx { exe: exe.to_path_buf(), setup_timeout: Duration::from_secs(240), cni_max_ports: 1000 };
    let kinds = [Kind::Direct, Kind::Netpath, Kind::NetpathXdp, Kind::NetpathXdpGeneric];
    let mut rows: Vec<Row> = vec![];
    for kind in kinds {
        if stop_requested() {
            bail!("interrupted");
        }
        let cfg = Config { kind, ports: 1 };
        eprintln!("bench: xdp: setting up {cfg}");
        let v = variants::setup(cfg, &ctx).with_context(|| format!("setting up {cfg}"))?;
        ns_check(v.client_ns(), "ethtool", &["-K", "eth0", "tx", "off"])?;
        if kind != Kind::Direct {
            // The flood goes to the container's address, which the client routes via the host.
            ns_check(v.client_ns(), "ip", &["route", "replace", SUBNET, "via", HOST_ETH0_IP])?;
        }
        // NAPI on the uplink's veth, without which it refuses the generator's XDP frames.
        ns_check(v.uplink_ns()?, "ethtool", &["-K", "eth0", "gro", "on"])?;
        let mac = uplink_mac(v.as_ref())?;
        rows.push((cfg.to_string(), kind, v, Samples::default(), mac));
    }
    for rep in 0..reps {
        for (label, kind, v, s, mac) in rows.iter_mut() {
            if stop_requested() {
                bail!("interrupted");
            }
            let v = v.as_ref();
            let (udp_sent, udp, overflow) = udp_figure(v, exe, mac, d)?;
            let tcp = figures::tcp_throughput(v, 1, d)?;
            let (p50, p99) = figures::tcp_latency(v, d)?;
            eprintln!(
                "bench: xdp: {label} rep {}: UDP {udp:.0} kpps ({udp_sent:.0} sent, {overflow:.0} socket overflows), TCP {tcp:.2} Gbit/s, RTT p50 {p50:.1} p99 {p99:.1} µs",
                rep + 1
            );
            s.udp_sent_kpps.push(udp_sent);
            s.udp_overflow_kpps.push(overflow);
            s.udp_kpps.push(udp);
            s.tcp1.push(tcp);
            s.p50.push(p50);
            s.p99.push(p99);
            if *kind == Kind::Direct {
                let (sent, dropped) = ceiling_figure(v, exe, mac, d)?;
                eprintln!("bench: xdp: bare XDP_DROP rep {}: {sent:.0} kpps sent, {dropped:.0} kpps dropped", rep + 1);
                s.flood_sent_kpps.push(sent);
                s.dropped_kpps.push(dropped);
            } else {
                let (sent, dropped, loaded) = flood_figure(v, exe, mac, d)?;
                eprintln!(
                    "bench: xdp: {label} rep {}: flood {sent:.0} kpps sent, {dropped:.0} kpps dropped, p99 loaded {loaded:.1} µs",
                    rep + 1
                );
                s.flood_sent_kpps.push(sent);
                s.dropped_kpps.push(dropped);
                s.p99_loaded.push(loaded);
            }
        }
    }
    let med = |v: &[f64]| median(v).unwrap_or(f64::NAN);
    let find = |k: Kind| rows.iter().find(|r| r.1 == k).map(|r| &r.3);
    let udp_direct = find(Kind::Direct).map_or(f64::NAN, |s| med(&s.udp_kpps));
    let mut md = String::from("## XDP\n\n");
    md.push_str(&format!("- {reps} repetition(s), {secs}s per run; took {:.0}s\n\n", started.elapsed().as_secs_f64()));
    md.push_str(
        "| datapath | UDP 64 B received (kpps) ↑ | × direct | UDP sent (kpps) | socket full (kpps) | TCP 1 stream (Gbit/s) ↑ | RTT p50 (µs) ↓ | RTT p99 (µs) ↓ |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for (label, _, _, s, _) in &rows {
        let udp = med(&s.udp_kpps);
        md.push_str(&format!(
            "| {label} | {udp:.0} | {:.2} | {:.0} | {:.0} | {:.2} | {:.1} | {:.1} |\n",
            udp / udp_direct,
            med(&s.udp_sent_kpps),
            med(&s.udp_overflow_kpps),
            med(&s.tcp1),
            med(&s.p50),
            med(&s.p99)
        ));
    }
    md.push_str(
        "\nFlood: 64 B UDP frames from the outside client to the container's (closed) address while a sockperf \
         ping-pong runs on the published port.\n\n\
         | datapath | flood sent (kpps) | dropped (kpps) ↑ | ping-pong p99 unloaded (µs) | loaded (µs) | loaded / unloaded ↓ |\n\
         | --- | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for (label, kind, _, s, _) in &rows {
        if *kind == Kind::Direct {
            md.push_str(&format!(
                "| ceiling: bare XDP_DROP ({label} lab) | {:.0} | {:.0} | — | — | — |\n",
                med(&s.flood_sent_kpps),
                med(&s.dropped_kpps)
            ));
            continue;
        }
        md.push_str(&format!(
            "| {label} | {:.0} | {:.0} | {:.1} | {:.1} | {:.2} |\n",
            med(&s.flood_sent_kpps),
            med(&s.dropped_kpps),
            med(&s.p99),
            med(&s.p99_loaded),
            med(&s.p99_loaded) / med(&s.p99)
        ));
    }
    if let (Some(tc), Some(x), Some(g)) = (find(Kind::Netpath), find(Kind::NetpathXdp), find(Kind::NetpathXdpGeneric)) {
        md.push_str(&format!(
            "\nnetpath-xdp: UDP {:.2}× direct (target ≥ 1.5×), {:.2}× netpath; TCP {:.2}× netpath; drops {:.2}× \
             netpath's (target ≥ 3×); loaded p99 {:.2}× its unloaded (target ≤ 1.2×; netpath: {:.2}×).\n",
            med(&x.udp_kpps) / udp_direct,
            med(&x.udp_kpps) / med(&tc.udp_kpps),
            med(&x.tcp1) / med(&tc.tcp1),
            med(&x.dropped_kpps) / med(&tc.dropped_kpps),
            med(&x.p99_loaded) / med(&x.p99),
            med(&tc.p99_loaded) / med(&tc.p99),
        ));
        // The programs alone on the flood's frame, after the labs (which it does not touch).
        match prog_cost(exe) {
            Ok((xdp_ns, tc_ns)) => md.push_str(&format!(
                "Per program on the flood's frame (BPF_PROG_RUN, 2 million runs, median of 5): uplink_xdp \
                 {xdp_ns:.0} ns, uplink_in {tc_ns:.0} ns.\n"
            )),
            Err(e) => eprintln!("bench: xdp: per-program cost: {e:#}"),
        }
        if let Some(c) = find(Kind::Direct) {
            // Per frame: what the generator and the veth cost with a receiver that does
            // nothing, and what each datapath adds to that.
            let ns = |kpps: f64| 1e6 / kpps;
            let ceiling = ns(med(&c.dropped_kpps));
            md.push_str(&format!(
                "Per dropped frame: {ceiling:.0} ns with a bare XDP_DROP (the generator, the veth, the XDP \
                 call); uplink_xdp adds {:.0} ns, TC {:.0} ns. netpath-xdp drops {:.0}% of the ceiling.\n",
                ns(med(&x.dropped_kpps)) - ceiling,
                ns(med(&tc.dropped_kpps)) - ceiling,
                100.0 * med(&x.dropped_kpps) / med(&c.dropped_kpps),
            ));
        }
        md.push_str(&format!(
            "netpath-xdp-generic: UDP {:.2}× netpath, TCP {:.2}×, drops {:.2}×.\n",
            med(&g.udp_kpps) / med(&tc.udp_kpps),
            med(&g.tcp1) / med(&tc.tcp1),
            med(&g.dropped_kpps) / med(&tc.dropped_kpps),
        ));
    }
    md.push_str(
        "\nMethod: one lab per row as in the main table (`@1`); the lab host's uplink (a veth) has GRO on. \
         UDP and the flood come from an XDP-native generator (`netpath-bench __xdp-gen`: an `XDP_TX` program \
         run by BPF_PROG_RUN in live-frames mode on the client's veth), so the uplink receives XDP frames, no \
         socket buffers, as from a NIC driver; the generator's thread also runs the receive path (softirq \
         on its CPU), so its rate follows the receiver's cost per packet. UDP: 60 B frames (64 with FCS, full \
         checksums) to the published port (direct: the container's address) from 1 thread (the uplink veth \
         has one queue: one CPU's NAPI takes every frame), counted by a UDP socket in the container \
         (`__udp-sink`, recvmmsg busy-polling on the other CPU: a sleeping reader costs a cross-CPU wakeup); \
         `socket full`: datagrams the container's stack had for it but its queue could not take (RcvbufErrors). \
         Flood: the same frames to the container's closed address from 1 thread for the run plus a second, \
         sockperf starting 0.3 s in; dropped: the datapath's `direct-access` counter. Ceiling: the same flood \
         in the direct lab into a bare `XDP_DROP` on the uplink (`__xdp-drop`, native, no ping-pong), dropped \
         counted by the veth. TCP: iperf3, one stream; RTT: \
         sockperf ping-pong --tcp, both from ordinary sockets with full checksums (no TX offload, hence no \
         TSO: TCP is lower than in the main table). Cells are medians over repetitions.\n",
    );
    for (_, _, mut v, _, _) in rows {
        let _ = v.teardown();
    }
    Ok(md)
}
