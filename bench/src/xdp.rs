//! The XDP section: netpath with `--xdp native` and `--xdp generic` (uplink_xdp ahead of TC
//! on the uplink) beside netpath (TC only) and `direct` (plain routing to the container), each
//! in its own lab:
//! UDP 64 B packets/s and one TCP stream through a published port (direct: to the container's
//! address), the ping-pong RTT; then, on the two netpath rows, a flood of 64-byte UDP frames
//! from the outside client to the container's address (closed in `nat` mode: both datapaths
//! drop it as `direct-access`) while a sockperf ping-pong runs on the published port: what
//! each drops per second, and the ping-pong's p99 loaded against unloaded.
//!
//! Every row's client sends full checksums (`ethtool -K eth0 tx off`), as frames off a wire
//! carry: uplink_xdp leaves a checksum a local stack left to offload to TC, and a veth client
//! would otherwise leave every one. With it the client also stops sending TSO super-frames,
//! so TCP figures here are lower than the main table's.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netpath_tests::HOST_ETH0_IP;

use crate::figures::{self, Durations};
use crate::stats::median;
use crate::util::{ns_check, stop_child, stop_requested, wait_until};
use crate::variants::{self, CTR_IP, Config, Ctx, Kind, SUBNET, Variant};

/// Where the flood goes: the container's address, a port nothing listens on.
const FLOOD_PORT: u16 = 9;

/// `__udp-flood`: 64-byte frames with their FCS (14 + 20 + 8 + 18 B of payload + 4) to `addr`
/// from one thread for `secs`, 64 per sendmmsg call (a send call per packet would make the
/// sender, not the datapath, the bottleneck sooner). Returns how many were sent.
pub fn flood(addr: SocketAddr, secs: f64) -> Result<u64> {
    use std::os::fd::AsRawFd;
    const BATCH: usize = 64;
    let s = UdpSocket::bind("0.0.0.0:0").context("binding the flood socket")?;
    s.connect(addr).context("connecting the flood socket")?;
    let mut payload = [0u8; 18];
    // SAFETY: plain C structs of pointers and integers; all-zero is valid for both.
    let mut iov: libc::iovec = unsafe { std::mem::zeroed() };
    iov.iov_base = payload.as_mut_ptr().cast();
    iov.iov_len = payload.len();
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH)
        .map(|_| {
            // SAFETY: as above.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = &mut iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut sent = 0u64;
    while Instant::now() < end {
        for _ in 0..16 {
            // SAFETY: `msgs` holds BATCH headers pointing at `iov` and `payload`, all alive.
            let n = unsafe { libc::sendmmsg(s.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
            if n > 0 {
                sent += n as u64;
            }
        }
    }
    Ok(sent)
}

#[derive(Default)]
struct Samples {
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

/// The flood figure: a flood to the closed container address while sockperf runs on the
/// published port. Returns (sent kpps, dropped kpps, loaded p99 µs).
fn flood_figure(v: &dyn Variant, exe: &Path, d: Durations) -> Result<(f64, f64, f64)> {
    let ns = v.client_ns();
    let flood_secs = f64::from(d.secs) + 1.0;
    let before = direct_access_drops(v)?;
    let to = format!("{CTR_IP}:{FLOOD_PORT}");
    let mut child = netpath_tests::in_ns(
        ns,
        exe.to_str().context("exe path")?,
        &["__udp-flood", &to, "--secs", &flood_secs.to_string()],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .context("starting the flood")?;
    std::thread::sleep(Duration::from_millis(300));
    let loaded = figures::tcp_latency(v, d);
    let status = wait_until(&mut child, Instant::now() + Duration::from_secs_f64(flood_secs + 30.0))?;
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        use std::io::Read;
        let _ = o.read_to_string(&mut out);
    }
    stop_child(&mut child);
    if !status.is_some_and(|s| s.success()) {
        bail!("the flood client failed ({status:?})");
    }
    let (_, p99) = loaded?;
    let after = direct_access_drops(v)?;
    let j: serde_json::Value = serde_json::from_str(out.trim()).context("flood client JSON")?;
    let sent = j["sent"].as_f64().context("sent")?;
    Ok((sent / flood_secs / 1e3, (after - before) / flood_secs / 1e3, p99))
}

/// Runs the XDP section; returns its markdown.
pub fn run(exe: &Path, reps: usize, secs: u32) -> Result<String> {
    let started = Instant::now();
    let d = Durations { secs };
    let ctx = Ctx { exe: exe.to_path_buf(), setup_timeout: Duration::from_secs(240), cni_max_ports: 1000 };
    let kinds = [Kind::Direct, Kind::Netpath, Kind::NetpathXdp, Kind::NetpathXdpGeneric];
    let mut rows: Vec<(String, Kind, Box<dyn Variant>, Samples)> = vec![];
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
        rows.push((cfg.to_string(), kind, v, Samples::default()));
    }
    for rep in 0..reps {
        for (label, kind, v, s) in rows.iter_mut() {
            if stop_requested() {
                bail!("interrupted");
            }
            let v = v.as_ref();
            let udp = figures::udp_rate(v, d)?;
            let tcp = figures::tcp_throughput(v, 1, d)?;
            let (p50, p99) = figures::tcp_latency(v, d)?;
            eprintln!(
                "bench: xdp: {label} rep {}: UDP {udp:.0} kpps, TCP {tcp:.2} Gbit/s, RTT p50 {p50:.1} p99 {p99:.1} µs",
                rep + 1
            );
            s.udp_kpps.push(udp);
            s.tcp1.push(tcp);
            s.p50.push(p50);
            s.p99.push(p99);
            if *kind != Kind::Direct {
                let (sent, dropped, loaded) = flood_figure(v, exe, d)?;
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
        "| datapath | UDP 64 B (kpps) ↑ | × direct | TCP 1 stream (Gbit/s) ↑ | RTT p50 (µs) ↓ | RTT p99 (µs) ↓ |\n\
         | --- | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for (label, _, _, s) in &rows {
        let udp = med(&s.udp_kpps);
        md.push_str(&format!(
            "| {label} | {udp:.0} | {:.2} | {:.2} | {:.1} | {:.1} |\n",
            udp / udp_direct,
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
    for (label, kind, _, s) in &rows {
        if *kind == Kind::Direct {
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
        md.push_str(&format!(
            "netpath-xdp-generic: UDP {:.2}× netpath, TCP {:.2}×, drops {:.2}×.\n",
            med(&g.udp_kpps) / med(&tc.udp_kpps),
            med(&g.tcp1) / med(&tc.tcp1),
            med(&g.dropped_kpps) / med(&tc.dropped_kpps),
        ));
    }
    md.push_str(
        "\nMethod: one lab per row as in the main table (`@1`), every client sending full checksums (no TX \
         offload, hence no TSO: TCP is lower than in the main table). UDP: iperf3 -u -l 64 -b 0, packets the \
         server received per second; TCP: iperf3, one stream; RTT: sockperf ping-pong --tcp. Flood: one \
         thread of `netpath-bench __udp-flood` (18 B payloads, sendmmsg by 64) for the run plus a second, sockperf starting \
         0.3 s in; dropped: the datapath's `direct-access` counter. Cells are medians over repetitions.\n",
    );
    for (_, _, mut v, _) in rows {
        let _ = v.teardown();
    }
    Ok(md)
}
