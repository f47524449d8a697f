//! The DNS section: netpath's embedded server against aardvark-dns (podman's, Debian package
//! `aardvark-dns`, configured by hand with the same names), asked by the same client from the
//! same container in the same lab, and both against asking the upstream directly.
//!
//! Lab: the real netpath daemon with a user-defined network, `NAMED` named containers and a
//! client container; dnsmasq in the client namespace plays the upstream (the lab's
//! `--resolv-conf`); aardvark-dns runs in the host namespace on the network's gateway address,
//! in a mount namespace whose /etc/resolv.conf is the lab's, so it never asks the machine's
//! resolver. The client (`__dns-client`, this binary) runs inside the client container.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use netpath_tests::dns::{EXT_NAME, Upstream};
use netpath_tests::{CLIENT_IP, Lab, in_ns};

use crate::stats::{median, percentile};
use crate::util::{check, stop_requested};

const NETWORK: &str = "dnsnet";
const SUBNET: &str = "10.53.0.0/24";
const GATEWAY: &str = "10.53.0.1";
const NAMED: usize = 8;
const AARDVARK: &str = "/usr/lib/podman/aardvark-dns";
const AARDVARK_PORT: u16 = 53;
const T: Duration = Duration::from_secs(60);

/// What one client run measured.
#[derive(Debug, Default, Clone)]
pub struct Run {
    pub qps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub lost: u64,
}

/// One row's samples over the repetitions.
#[derive(Default)]
struct Samples {
    qps: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    lost: u64,
}

struct Target {
    label: &'static str,
    server: SocketAddr,
    names: Vec<String>,
    /// Closed-loop throughput run (else only the one-at-a-time latency run).
    throughput: bool,
}

struct DnsLab {
    _lab: Lab,
    _upstream: Upstream,
    client_ns: PathBuf,
    aardvark_pid: Option<i32>,
}

impl Drop for DnsLab {
    fn drop(&mut self) {
        if let Some(pid) = self.aardvark_pid {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
        }
    }
}

fn np(lab: &Lab, args: &[&str]) -> Result<String> {
    check(lab.np_cmd(args), None, T)
}

fn setup() -> Result<DnsLab> {
    if !std::path::Path::new(AARDVARK).is_file() {
        bail!("{AARDVARK} is missing (apt-get install aardvark-dns)");
    }
    let lab = Lab::new("bench-dns");
    lab.set_upstreams(&[CLIENT_IP]);
    let upstream = Upstream::start(&lab, &lab.client_ns, CLIENT_IP, "203.0.113.7");
    np(&lab, &["network", "create", "--subnet", SUBNET, "--gateway", GATEWAY, NETWORK])?;
    let mut conf = format!("{GATEWAY}\n");
    for i in 0..NAMED {
        let name = format!("srv{i}");
        np(
            &lab,
            &["run", "-d", "--name", &name, "--network", NETWORK, "--alias", &format!("svc{i}"), "--", "sleep", "3600"],
        )?;
        let v: serde_json::Value = serde_json::from_str(&np(&lab, &["inspect", &name])?)?;
        let id = v[0]["Id"].as_str().context("no Id")?;
        let ip = v[0]["NetworkSettings"]["Networks"][NETWORK]["IPAddress"].as_str().context("no address")?;
        // aardvark's format: ID IPV4S IPV6S NAMES (the same names netpath answers).
        conf.push_str(&format!("{id} {ip}  {name},svc{i},{}\n", &id[..12]));
    }
    np(&lab, &["run", "-d", "--name", "client", "--network", NETWORK, "--", "sleep", "3600"])?;
    let v: serde_json::Value = serde_json::from_str(&np(&lab, &["inspect", "client"])?)?;
    let client_ns = PathBuf::from(v[0]["NetworkSettings"]["SandboxKey"].as_str().context("no SandboxKey")?);

    let dir = lab.dir.join("aardvark");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(NETWORK), conf)?;
    // aardvark forwards to /etc/resolv.conf's servers: give it the lab's in a private mount
    // namespace. `run` returns once the server (a forked child) is up.
    let script = format!(
        "mount --bind {} /etc/resolv.conf && exec {AARDVARK} --config {} -p {AARDVARK_PORT} run",
        lab.resolv_conf.display(),
        dir.display()
    );
    check(in_ns(&lab.host_ns, "unshare", &["--mount", "--propagation", "private", "sh", "-c", &script]), None, T)?;
    let pid = std::fs::read_to_string(dir.join("aardvark.pid")).ok().and_then(|s| s.trim().parse().ok());
    Ok(DnsLab { _lab: lab, _upstream: upstream, client_ns, aardvark_pid: pid })
}

/// Runs the client inside the client container; returns what it measured.
fn client(dl: &DnsLab, exe: &std::path::Path, t: &Target, secs: f64, window: usize, threads: usize) -> Result<Run> {
    let mut c = in_ns(&dl.client_ns, exe.to_str().unwrap(), &["__dns-client"]);
    c.arg(t.server.to_string())
        .args(["--secs", &secs.to_string(), "--window", &window.to_string(), "--threads", &threads.to_string()])
        .args(&t.names);
    let out = check(c, None, Duration::from_secs_f64(secs + 30.0))?;
    let v: serde_json::Value = serde_json::from_str(out.trim()).context("client output")?;
    Ok(Run {
        qps: v["qps"].as_f64().unwrap_or(0.0),
        p50_us: v["p50_us"].as_f64().unwrap_or(f64::NAN),
        p99_us: v["p99_us"].as_f64().unwrap_or(f64::NAN),
        lost: v["lost"].as_u64().unwrap_or(0),
    })
}

/// Runs the DNS section; returns its markdown.
pub fn run(exe: &std::path::Path, reps: usize, secs: u32) -> Result<String> {
    let started = Instant::now();
    let dl = setup()?;
    let container_names: Vec<String> = (0..NAMED).flat_map(|i| [format!("srv{i}"), format!("svc{i}")]).collect();
    let ext = vec![EXT_NAME.to_string()];
    let netpath: SocketAddr = "127.0.0.11:53".parse()?;
    let aardvark: SocketAddr = SocketAddr::new(GATEWAY.parse()?, AARDVARK_PORT);
    let direct: SocketAddr = SocketAddr::new(CLIENT_IP.parse()?, 53);
    let targets = [
        Target { label: "netpath, container names", server: netpath, names: container_names.clone(), throughput: true },
        Target { label: "aardvark-dns, container names", server: aardvark, names: container_names, throughput: true },
        Target { label: "netpath, forwarded name", server: netpath, names: ext.clone(), throughput: false },
        Target { label: "aardvark-dns, forwarded name", server: aardvark, names: ext.clone(), throughput: false },
        Target { label: "upstream asked directly", server: direct, names: ext, throughput: false },
    ];
    let mut samples: Vec<Samples> = targets.iter().map(|_| Samples::default()).collect();
    let secs = f64::from(secs);
    for rep in 0..reps {
        for k in 0..targets.len() {
            if stop_requested() {
                bail!("interrupted");
            }
            let i = (k + rep) % targets.len();
            let t = &targets[i];
            let s = &mut samples[i];
            // Latency: one query at a time, so it is the server's time, not queueing.
            let lat = client(&dl, exe, t, secs, 1, 1)?;
            s.p50.push(lat.p50_us);
            s.p99.push(lat.p99_us);
            s.lost += lat.lost;
            if t.throughput {
                // Throughput: two client threads with 16 queries in flight each.
                let load = client(&dl, exe, t, secs, 16, 2)?;
                s.qps.push(load.qps);
                s.lost += load.lost;
            }
            eprintln!("bench: dns rep {}: {}: p50 {:.0} µs, p99 {:.0} µs", rep + 1, t.label, lat.p50_us, lat.p99_us);
        }
    }
    let med = |v: &[f64]| median(v).unwrap_or(f64::NAN);
    let mut md = String::from("## DNS\n\n");
    md.push_str(&format!(
        "- {reps} repetition(s), {secs:.0}s per run; aardvark-dns {}, upstream dnsmasq {}; took {:.0}s\n\n",
        pkg_version("aardvark-dns"),
        pkg_version("dnsmasq-base"),
        started.elapsed().as_secs_f64()
    ));
    md.push_str("| server | queries/s ↑ | p50 (µs) ↓ | p99 (µs) ↓ | lost |\n| --- | ---: | ---: | ---: | ---: |\n");
    for (t, s) in targets.iter().zip(&samples) {
        let qps = if s.qps.is_empty() { "–".to_string() } else { format!("{:.0}", med(&s.qps)) };
        md.push_str(&format!("| {} | {qps} | {:.0} | {:.0} | {} |\n", t.label, med(&s.p50), med(&s.p99), s.lost));
    }
    let ratio = med(&samples[0].qps) / med(&samples[1].qps);
    let overhead = med(&samples[2].p50) - med(&samples[4].p50);
    md.push_str(&format!(
        "\nnetpath answers container names at {ratio:.2}× aardvark-dns's rate (target ≥ 1.2×), p99 {:.0} µs vs \
         {:.0} µs (target: below); forwarding adds {overhead:.0} µs at p50 over asking the upstream directly \
         (target ≤ 100 µs).\n\n",
        med(&samples[0].p99),
        med(&samples[1].p99),
    ));
    md.push_str(
        "Method: the client (`netpath-bench __dns-client`) runs in a container of the same network and sends A \
         queries over UDP, cycling through the names (container names and aliases; or `ext.test`, which the \
         upstream answers). Latency: one query in flight, p50/p99 over every answer of the run; queries/s: two \
         threads with 16 queries in flight each, answers per second. netpath is asked at 127.0.0.11 (its socket \
         in the container's namespace), aardvark-dns at the network's gateway (as podman's containers ask it), \
         the upstream (dnsmasq in the client namespace) by its address, through the container's masquerade. \
         Rows rotate within each repetition; cells are medians over repetitions; `lost`: queries unanswered \
         within 1 s, summed.\n",
    );
    drop(dl);
    Ok(md)
}

fn pkg_version(p: &str) -> String {
    std::process::Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", p])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or("?".into(), |o| String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The client: `threads` UDP sockets, each keeping `window` queries in flight for `secs`,
/// cycling through `names`. Prints JSON: qps, p50_us, p99_us, lost.
pub fn dns_client(server: SocketAddr, names: &[String], secs: f64, window: usize, threads: usize) -> Result<()> {
    if names.is_empty() {
        bail!("no names to ask");
    }
    let queries: Vec<Vec<u8>> = names
        .iter()
        .map(|n| {
            let mut m = Message::query();
            m.metadata.recursion_desired = true;
            m.add_query(Query::query(Name::from_ascii(format!("{n}."))?, RecordType::A));
            Ok(m.to_vec()?)
        })
        .collect::<Result<_>>()?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let handles: Vec<_> = (0..threads.max(1))
        .map(|t| {
            let queries = queries.clone();
            std::thread::spawn(move || one_socket(server, &queries, deadline, window.max(1), t))
        })
        .collect();
    let (mut lat, mut answered, mut lost) = (vec![], 0u64, 0u64);
    for h in handles {
        let (l, a, x) = h.join().map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        lat.extend(l);
        answered += a;
        lost += x;
    }
    let took = start.elapsed().as_secs_f64();
    let j = serde_json::json!({
        "qps": answered as f64 / took,
        "p50_us": percentile(&lat, 50.0),
        "p99_us": percentile(&lat, 99.0),
        "lost": lost,
    });
    println!("{j}");
    Ok(())
}

/// Latencies (µs), answers and losses of one socket.
fn one_socket(
    server: SocketAddr,
    queries: &[Vec<u8>],
    deadline: Instant,
    window: usize,
    seed: usize,
) -> Result<(Vec<f64>, u64, u64)> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.connect(server)?;
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    // In flight: id → (sent at); ids are unique within the window.
    let mut inflight: std::collections::HashMap<u16, Instant> = Default::default();
    let (mut next_id, mut k) = ((seed as u16).wrapping_mul(7919), seed);
    let (mut lat, mut answered, mut lost) = (Vec::new(), 0u64, 0u64);
    let mut buf = [0u8; 4096];
    let mut send = |inflight: &mut std::collections::HashMap<u16, Instant>| -> Result<()> {
        next_id = next_id.wrapping_add(1);
        let mut q = queries[k % queries.len()].clone();
        k += 1;
        q[..2].copy_from_slice(&next_id.to_be_bytes());
        s.send(&q)?;
        inflight.insert(next_id, Instant::now());
        Ok(())
    };
    while Instant::now() < deadline {
        while inflight.len() < window {
            send(&mut inflight)?;
        }
        match s.recv(&mut buf) {
            Ok(n) if n >= 12 => {
                let id = u16::from_be_bytes([buf[0], buf[1]]);
                if let Some(t) = inflight.remove(&id) {
                    lat.push(t.elapsed().as_secs_f64() * 1e6);
                    answered += 1;
                }
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(e.into()),
        }
        // Queries unanswered for a second are lost; their slots go to new ones.
        let before = inflight.len();
        inflight.retain(|_, t| t.elapsed() < Duration::from_secs(1));
        lost += (before - inflight.len()) as u64;
    }
    Ok((lat, answered, lost))
}
