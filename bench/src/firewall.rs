//! The firewall section: new TCP connections per second from the lab's outside client to a
//! published port, with 1 and with many firewall rules, through netpath (rules compiled into
//! LPM tries, evaluated in eBPF) and through Docker's iptables with the same rules in the
//! DOCKER-USER chain, in the same run; and netpath with `--keep-host-firewall` (no fast path).
//!
//! The rules: N - 1 fillers denying other sources (`10.a.b.0/24`, each its own prefix) the
//! server's port, then the rule that lets the client's prefix in — last, so that a linear
//! chain walks every filler for each new connection, as a DOCKER-USER list of blocked
//! networks does. iptables gets Docker's own ruleset (bench/src/variants/docker.rs) with the
//! fillers and the allow in DOCKER-USER, behind the usual ESTABLISHED,RELATED shortcut.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netpath_tests::{CLIENT_IP, DaemonOpts, HOST_ETH0_IP, Lab, in_ns};

use crate::serve::{CONN_PORT, IPERF_PORT};
use crate::stats::median;
use crate::util::{check, conn_rate, iperf_tcp, ns_check, stop_child, stop_requested};
use crate::variants::docker;
use crate::variants::{PortMap, Proto};

const T: Duration = Duration::from_secs(600);
/// The published host port (→ CONN_PORT in the server).
const HOST_PORT: u16 = 9090;
/// Rules sent to the daemon per request (its request bodies are capped at 2 MB).
const BATCH: usize = 2000;

struct FwLab {
    lab: Lab,
    servers: Vec<Child>,
}

impl Drop for FwLab {
    fn drop(&mut self) {
        for s in &mut self.servers {
            stop_child(s);
        }
    }
}

/// The filler sources: distinct /24s of 10.0.0.0/8.
fn filler(i: u32) -> String {
    format!("10.{}.{}.0/24", i / 250, i % 250)
}

fn client_prefix() -> String {
    let o: Vec<&str> = CLIENT_IP.split('.').collect();
    format!("{}.{}.{}.0/24", o[0], o[1], o[2])
}

/// POSTs `body` to the daemon's API over its unix socket (the bench has no HTTP client).
fn post(socket: &Path, path: &str, body: &str) -> Result<()> {
    let mut s = std::os::unix::net::UnixStream::connect(socket).context("connecting to the daemon")?;
    s.set_read_timeout(Some(T))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: netpath\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp.split_whitespace().nth(1).unwrap_or("");
    if !status.starts_with('2') {
        bail!("POST {path}: {}", resp.lines().last().unwrap_or(&resp));
    }
    Ok(())
}

fn netpath_lab(exe: &Path, rules: u32, keep_host_firewall: bool) -> Result<FwLab> {
    let mut lab = Lab::without_daemon("bench-fw");
    let args = if keep_host_firewall { vec!["--keep-host-firewall".to_string()] } else { vec![] };
    lab.start_daemon_with(&DaemonOpts { args, ..Default::default() });
    let serve = format!("{} __serve --max-secs 3600", exe.display());
    let publish = format!("{HOST_PORT}:{CONN_PORT}");
    let iperf = format!("{IPERF_PORT}:{IPERF_PORT}");
    let run = ["run", "-d", "--name", "srv", "-p", &publish, "-p", &iperf, "--", "sh", "-c", &serve];
    check(lab.np_cmd(&run), None, T)?;
    let rule = |name: String, action: &str, from: String| {
        serde_json::json!({ "name": name, "action": action, "from": from, "to_container": "srv",
            "port": CONN_PORT.to_string(), "proto": "tcp" })
    };
    let mut all: Vec<serde_json::Value> =
        (0..rules.saturating_sub(1)).map(|i| rule(format!("f{i}"), "deny", filler(i))).collect();
    all.push(rule("client".into(), "allow", client_prefix()));
    for chunk in all.chunks(BATCH) {
        post(&lab.socket, "/firewall/rules", &serde_json::Value::Array(chunk.to_vec()).to_string())?;
    }
    Ok(FwLab { lab, servers: vec![] })
}

fn iptables_lab(exe: &Path, rules: u32) -> Result<FwLab> {
    let lab = Lab::without_daemon("bench-fw-ipt");
    let host = lab.host_ns.clone();
    ns_check(&host, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    ns_check(&host, "ip", &["link", "add", "br-fw", "type", "bridge"])?;
    ns_check(&host, "ip", &["addr", "add", "10.98.0.1/24", "dev", "br-fw"])?;
    ns_check(&host, "ip", &["link", "set", "br-fw", "up"])?;
    let srv = lab.add_ns("srv");
    let srv_s = srv.to_str().context("netns path")?;
    ns_check(&host, "ip", &["link", "add", "v-srv", "type", "veth", "peer", "name", "eth0", "netns", srv_s])?;
    ns_check(&host, "ip", &["link", "set", "v-srv", "master", "br-fw", "up"])?;
    ns_check(&srv, "ip", &["addr", "add", "10.98.0.2/24", "dev", "eth0"])?;
    ns_check(&srv, "ip", &["link", "set", "eth0", "up"])?;
    ns_check(&srv, "ip", &["route", "add", "default", "via", "10.98.0.1"])?;
    let server = in_ns(&srv, exe.to_str().context("exe path")?, &["__serve", "--max-secs", "3600"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the server")?;
    let m = [
        PortMap { host: HOST_PORT, ctr: CONN_PORT, proto: Proto::Tcp },
        PortMap { host: IPERF_PORT, ctr: IPERF_PORT, proto: Proto::Tcp },
    ];
    let mut user = String::from("-A DOCKER-USER -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN\n");
    for i in 0..rules.saturating_sub(1) {
        user.push_str(&format!(
            "-A DOCKER-USER -s {} -d 10.98.0.2/32 -p tcp -m tcp --dport {CONN_PORT} -j DROP\n",
            filler(i)
        ));
    }
    user.push_str(&format!(
        "-A DOCKER-USER -s {} -d 10.98.0.2/32 -p tcp -m tcp --dport {CONN_PORT} -j RETURN\n",
        client_prefix()
    ));
    let rules = docker::ruleset("br-fw", "10.98.0.0/24", &[("10.98.0.2", &m)])
        .replace("-A DOCKER-USER -j RETURN\n", &format!("{user}-A DOCKER-USER -j RETURN\n"));
    check(in_ns(&host, "iptables-restore", &["-w"]), Some(rules.as_bytes()), T)?;
    Ok(FwLab { lab, servers: vec![server] })
}

/// (datapath, rules, conn/s per repetition, Gbit/s per repetition, setup seconds)
type Row = (&'static str, u32, Vec<f64>, Vec<f64>, f64);

/// Runs the firewall section; returns its markdown.
pub fn run(exe: &Path, counts: &[u32], reps: usize, secs: u32) -> Result<String> {
    let started = Instant::now();
    let lo = counts.iter().copied().min().unwrap_or(1).max(1);
    let mut rows: Vec<Row> = vec![];
    let mut plan: Vec<(&str, u32)> = vec![];
    for &n in counts {
        plan.push(("netpath", n.max(1)));
        plan.push(("iptables", n.max(1)));
    }
    plan.push(("netpath --keep-host-firewall", lo));
    // Every lab first, then the repetitions round-robin over them: drift on a shared machine
    // hits every row alike.
    let mut labs = vec![];
    for (kind, n) in plan {
        if stop_requested() {
            bail!("interrupted");
        }
        let t = Instant::now();
        eprintln!("bench: firewall: setting up {kind} with {n} rules");
        let lab = match kind {
            "iptables" => iptables_lab(exe, n)?,
            "netpath" => netpath_lab(exe, n, false)?,
            _ => netpath_lab(exe, n, true)?,
        };
        rows.push((kind, n, vec![], vec![], t.elapsed().as_secs_f64()));
        labs.push(lab);
    }
    for rep in 0..reps {
        for (row, lab) in rows.iter_mut().zip(&labs) {
            if stop_requested() {
                bail!("interrupted");
            }
            let r = conn_rate(exe, &lab.lab.client_ns, &format!("{HOST_ETH0_IP}:{HOST_PORT}"), secs)?;
            let g = iperf_tcp(&lab.lab.client_ns, HOST_ETH0_IP, IPERF_PORT, secs)?;
            eprintln!("bench: firewall: {}, {} rules, rep {}: {r:.0} conn/s, {g:.2} Gbit/s", row.0, row.1, rep + 1);
            row.2.push(r);
            row.3.push(g);
        }
    }
    drop(labs);
    let med = |v: &[f64]| median(v).unwrap_or(f64::NAN);
    let rate = |k: &str, n: u32| rows.iter().find(|r| r.0 == k && r.1 == n).map_or(f64::NAN, |r| med(&r.2));
    let gbps = |k: &str, n: u32| rows.iter().find(|r| r.0 == k && r.1 == n).map_or(f64::NAN, |r| med(&r.3));
    let mut md = String::from("## Firewall\n\n");
    md.push_str(&format!(
        "- {reps} repetition(s), {secs}s per run, rules {counts:?}; took {:.0}s\n\n",
        started.elapsed().as_secs_f64()
    ));
    md.push_str(
        "| datapath | rules | new conn/s ↑ | TCP 1 stream (Gbit/s) ↑ | setup (s) |\n| --- | ---: | ---: | ---: | ---: |\n",
    );
    for (k, n, v, g, setup) in &rows {
        md.push_str(&format!("| {k} | {n} | {:.0} | {:.2} | {setup:.1} |\n", med(v), med(g)));
    }
    let hi = counts.iter().copied().max().unwrap_or(1).max(1);
    if hi != lo {
        md.push_str(&format!(
            "\nnetpath at {hi} rules: {:.2}× its rate at {lo} (target ≥ 0.9×); iptables at {hi}: {:.2}× its rate at {lo}; \
             netpath at {hi} is {:.1}× iptables at {hi}.\n",
            rate("netpath", hi) / rate("netpath", lo),
            rate("iptables", hi) / rate("iptables", lo),
            rate("netpath", hi) / rate("iptables", hi),
        ));
    }
    md.push_str(&format!(
        "\n`--keep-host-firewall` (known flows through the kernel's forwarding path instead of the uplink↔veth fast \
         path): {:.2}× netpath's new connections and {:.2}× its TCP throughput, at {lo} rules.\n",
        rate("netpath --keep-host-firewall", lo) / rate("netpath", lo),
        gbps("netpath --keep-host-firewall", lo) / gbps("netpath", lo),
    ));
    md.push_str(
        "\nMethod: the lab's outside client (`netpath-bench __conn-client`, two threads) connects to the host's \
         published port 9090 (→ 8080 in the server), reads one byte and closes with an RST, in a loop; then one iperf3 TCP stream to the published port 5201. Rules: N - 1 \
         fillers deny other /24s of 10.0.0.0/8 the server's port, then one allows the client's /24 (matched last). \
         netpath: `firewall` rules naming the container (sent to the API in batches). iptables: Docker's ruleset for \
         the published port with the same rules in DOCKER-USER after an ESTABLISHED,RELATED RETURN. Cells are \
         medians over repetitions.\n",
    );
    Ok(md)
}
