//! The overlay section's cluster rows, with the real daemons: two nodes joined through a real
//! etcd (the tests' `ClusterLab`: hosts on an underlay bridge, etcd in the lab) and an
//! attachable overlay between them.
//!
//! - Name latency: from `netpath run` on node A until the new container's name resolves on
//!   node B and the container answers there (a TCP connection through the tunnel). A probe
//!   (`__name-probe`, this binary) runs in a container on B before the `run` starts, asking
//!   B's embedded DNS every 2 ms; it prints the wall-clock time of its first answered
//!   connection, which the bench compares with the time the `run` started.
//! - Routing mesh: new TCP connections per second to a published (`mode=ingress`) service port
//!   on the node running the task and on the node without it (forwarded through the tunnel
//!   from that node's address), against a container on that other node connecting straight to
//!   the task's overlay address.

use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use netpath_tests::HOST_ETH0_IP;
use netpath_tests::cluster::ClusterLab;

use crate::serve::CONN_PORT;
use crate::stats::{median, percentile};
use crate::util::{conn_rate, stop_requested};

const NETWORK: &str = "benchov";
const SUBNET: &str = "10.211.0.0/24";
/// The routing mesh's published port.
const MESH_PORT: u16 = 8090;
/// The port the named containers answer on.
const NAME_PORT: u16 = 80;

/// What the cluster rows measured.
pub struct Figures {
    /// ms from `run` on A until the name answers on B, one per sample.
    pub name_ms: Vec<f64>,
    /// conn/s medians: published port on the task's node, on the other node, direct to the task.
    pub mesh_here: f64,
    pub mesh_there: f64,
    pub direct: f64,
}

fn np(c: &ClusterLab, i: usize, args: &[&str]) -> Result<String> {
    let out = c.node(i).try_np(args);
    if !out.status.success() {
        bail!("netpath {args:?} on node{i}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wait_for(secs: u64, what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        if Instant::now() >= deadline {
            bail!("timed out after {secs} s waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The network namespace of container `name` on node `i`.
fn sandbox(c: &ClusterLab, i: usize, name: &str) -> Result<PathBuf> {
    let v: serde_json::Value = serde_json::from_str(&np(c, i, &["inspect", name])?)?;
    Ok(PathBuf::from(v[0]["NetworkSettings"]["SandboxKey"].as_str().context("no SandboxKey")?))
}

fn unix_us() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros())
}

/// One name-latency sample: `run` container `name` on node `a`, probed from container `probe`
/// on node `b`.
fn name_sample(c: &ClusterLab, exe: &Path, a: usize, b: usize, probe: &str, name: &str) -> Result<f64> {
    let exe = exe.to_str().context("exe path")?;
    let port = NAME_PORT.to_string();
    let mut child = c
        .node(b)
        .np_cmd(&["exec", probe, "--", exe, "__name-probe", name, &port, "--timeout-secs", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the name probe")?;
    let mut out = BufReader::new(child.stdout.take().context("probe stdout")?);
    let mut line = String::new();
    // The probe says when it asks (its first query sent), so the exec's own start-up is not counted.
    out.read_line(&mut line)?;
    if line.trim() != "asking" {
        let _ = child.kill();
        let _ = child.wait();
        bail!("the name probe did not start: {line:?}");
    }
    let t0 = unix_us();
    let listen = format!("TCP-LISTEN:{NAME_PORT},fork,reuseaddr");
    let run = np(c, a, &["run", "-d", "--name", name, "--network", NETWORK, "--", "socat", &listen, "SYSTEM:echo hi"]);
    let mut rest = String::new();
    out.read_to_string(&mut rest)?;
    let st = child.wait()?;
    run?;
    if !st.success() {
        bail!("the name probe failed ({st}): {rest}");
    }
    let at: u128 = rest.trim().parse().with_context(|| format!("probe output {rest:?}"))?;
    Ok(at.saturating_sub(t0) as f64 / 1000.0)
}

/// Runs in a container: asks the container's DNS server (its /etc/resolv.conf) for `name`
/// every 2 ms and, once it has an address, connects to `port` there and reads a byte. Prints
/// `asking` when it starts, then the wall-clock time (µs since the epoch) of its first
/// answered connection.
pub fn name_probe(name: &str, port: u16, timeout: Duration) -> Result<()> {
    let resolv = std::fs::read_to_string("/etc/resolv.conf").context("reading /etc/resolv.conf")?;
    let server: Ipv4Addr = resolv
        .lines()
        .find_map(|l| l.strip_prefix("nameserver").and_then(|a| a.trim().parse().ok()))
        .context("no IPv4 nameserver in /etc/resolv.conf")?;
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.connect((server, 53))?;
    s.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut q = Message::query();
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(Name::from_ascii(format!("{name}."))?, RecordType::A));
    let deadline = Instant::now() + timeout;
    println!("asking");
    let mut buf = [0u8; 1500];
    let mut id: u16 = 0;
    while Instant::now() < deadline {
        id = id.wrapping_add(1);
        q.metadata.id = id;
        s.send(&q.to_vec()?)?;
        if let Ok(n) = s.recv(&mut buf)
            && let Ok(m) = Message::from_vec(&buf[..n])
            && m.metadata.id == id
            && let Some(addr) = m.answers.iter().find_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            && answers(SocketAddr::from((addr, port)))
        {
            println!("{}", unix_us());
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Err(anyhow!("{name} did not answer within {timeout:?}"))
}

fn answers(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(1))
}

/// The running tasks of service `svc` on node `i`.
fn running_tasks(c: &ClusterLab, i: usize, svc: &str) -> Vec<String> {
    let out = c.node(i).try_np(&["service", "inspect", svc]);
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else { return vec![] };
    v[0]["Tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["State"] == "running")
        .filter_map(|t| t["Name"].as_str().map(str::to_string))
        .collect()
}

/// Sets up the two-node cluster and measures; `samples` name-latency samples, `reps`
/// repetitions of `secs` for each connection rate.
pub fn measure(exe: &Path, samples: usize, reps: usize, secs: u32) -> Result<Figures> {
    let c = std::panic::catch_unwind(|| ClusterLab::new("bench-ovc", 2)).map_err(|p| {
        anyhow!("setting up the cluster: {}", p.downcast_ref::<String>().map_or("a panic", |s| s.as_str()))
    })?;
    wait_for(30, "both nodes ready", || {
        let ls = c.node_ls(0);
        ls.len() == 2 && ls.iter().all(|(_, s)| s == "ready")
    })?;
    np(&c, 0, &["network", "create", "-d", "overlay", "--attachable", "--subnet", SUBNET, NETWORK])?;
    for i in 0..2 {
        let probe = format!("probe{i}");
        wait_for(10, "the network on every node", || {
            c.node(i).try_np(&["network", "inspect", NETWORK]).status.success()
        })?;
        np(&c, i, &["run", "-d", "--name", &probe, "--network", NETWORK, "--", "sleep", "3600"])?;
    }
    let mut name_ms = vec![];
    for k in 0..samples {
        if stop_requested() {
            bail!("interrupted");
        }
        let name = format!("web{k}");
        let ms = name_sample(&c, exe, 0, 1, "probe1", &name).with_context(|| format!("name sample {k}"))?;
        eprintln!("bench: overlay: run on node0 until {name} answers on node1: {ms:.0} ms");
        name_ms.push(ms);
        np(&c, 0, &["rm", "-f", &name])?;
    }

    let exe_s = exe.to_str().context("exe path")?;
    let publish = format!("{MESH_PORT}:{CONN_PORT}");
    np(
        &c,
        0,
        &[
            "service",
            "create",
            "--name",
            "mesh",
            "--network",
            NETWORK,
            "--replicas",
            "1",
            "--publish",
            &publish,
            "--",
            exe_s,
        ]
        .into_iter()
        .chain(["__serve", "--max-secs", "3600"])
        .collect::<Vec<_>>(),
    )?;
    // Where the one task runs: each node's `service inspect` lists the tasks it runs.
    let mut with = None;
    wait_for(30, "the mesh service's task running", || {
        with = (0..2).find_map(|i| running_tasks(&c, i, "mesh").into_iter().next().map(|t| (i, t)));
        with.is_some()
    })?;
    let (with, task) = with.context("no task")?;
    let other = 1 - with;
    let v: serde_json::Value = serde_json::from_str(&np(&c, with, &["inspect", &task])?)?;
    let task_ip = v[0]["NetworkSettings"]["Networks"][NETWORK]["IPAddress"]
        .as_str()
        .filter(|a| !a.is_empty())
        .context("the task's address")?
        .to_string();
    let published = format!("{HOST_ETH0_IP}:{MESH_PORT}");
    let direct_addr = format!("{task_ip}:{CONN_PORT}");
    let other_probe = sandbox(&c, other, &format!("probe{other}"))?;
    let (mut here, mut there, mut direct) = (vec![], vec![], vec![]);
    for _ in 0..reps {
        if stop_requested() {
            bail!("interrupted");
        }
        here.push(conn_rate(exe, &c.node(with).client_ns, &published, secs).context("the mesh on the task's node")?);
        there.push(conn_rate(exe, &c.node(other).client_ns, &published, secs).context("the mesh on the other node")?);
        direct.push(conn_rate(exe, &other_probe, &direct_addr, secs).context("straight to the task")?);
        eprintln!(
            "bench: overlay: mesh conn/s: task's node {:.0}, other node {:.0}, direct {:.0}",
            here.last().unwrap(),
            there.last().unwrap(),
            direct.last().unwrap()
        );
    }
    let m = |v: &[f64]| median(v).unwrap_or(f64::NAN);
    Ok(Figures { name_ms, mesh_here: m(&here), mesh_there: m(&there), direct: m(&direct) })
}

/// The rows' markdown.
pub fn markdown(f: &Figures) -> String {
    let p = |q: f64| percentile(&f.name_ms, q).unwrap_or(f64::NAN);
    format!(
        "\n| cluster (2 daemons, real etcd) | value |\n| --- | ---: |\n\
         | `run` on node A until its name answers on node B, median ms ↓ (target < 1000) | {:.0} |\n\
         | same, p99 ms ({} samples) ↓ | {:.0} |\n\
         | published port, node with the task, conn/s ↑ | {:.0} |\n\
         | published port, node without the task (routing mesh), conn/s ↑ | {:.0} |\n\
         | straight to the task from a container on the other node, conn/s ↑ | {:.0} |\n\
         \nThe routing mesh from a node without the task: {:.2}× a direct connection to the task across the \
         tunnel, {:.2}× the published port where the task runs.\n",
        p(50.0),
        f.name_ms.len(),
        p(99.0),
        f.mesh_here,
        f.mesh_there,
        f.direct,
        f.mesh_there / f.direct,
        f.mesh_there / f.mesh_here,
    )
}
