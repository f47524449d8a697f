//! `netpath` and `netpath-direct`: the real daemon in the lab (`Lab::new`), the servers in a
//! container made by `netpath run -d`. With a [`Publish`] the container is published with
//! `-p` (filler ports as one range) and the client goes to 198.51.100.1; without, the client
//! routes to the container's address on a `nat-unprotected` network (tracked, not translated).
//! `macvlan`: the container is on a macvlan network of the host's eth0, on the client's own
//! subnet: the client reaches it at its address, frames going straight from eth0 to it.
//! `netpath-cni` is `netpath` whose attach figure wires through the CNI plugin, as a runtime.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netpath_tests::Lab;

use super::{
    Ctx, NotAvailable, Publish, SUBNET, Target, Variant, attach_port, check_port, forwarding, route_client_to_subnet,
    serve_argv, wait_ready,
};
use crate::serve::CONN_PORT;
use crate::util::{check, output};

const NETWORK: &str = "benchnet";
const SERVER: &str = "srv";
const NP_TIMEOUT: Duration = Duration::from_secs(120);
/// The lab's eth0 link (host 198.51.100.1, client .2) and the part macvlan containers get.
const MACVLAN_SUBNET: &str = "198.51.100.0/24";
const MACVLAN_RANGE: &str = "198.51.100.128/25";

pub struct Netpath {
    label: String,
    publish: Option<Publish>,
    macvlan: bool,
    ctr_ip: std::net::Ipv4Addr,
    running: bool,
    /// Attach through `netpath-cni ADD` (the `netpath-cni` row).
    cni: bool,
    lab: Lab,
}

/// How a netpath row wires its container and runs its daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    Bridge,
    Macvlan,
    /// Bridge, attach figure through the CNI plugin.
    Cni,
    /// Bridge, `netpath daemon --xdp native`, a client sending full checksums.
    Xdp,
    /// The same with `--xdp generic`.
    XdpGeneric,
}

impl Netpath {
    pub fn setup(label: String, publish: Option<Publish>, flavour: Flavour, ctx: &Ctx) -> Result<Netpath> {
        let (macvlan, cni) = (flavour == Flavour::Macvlan, flavour == Flavour::Cni);
        let bin = binary()?;
        if cni && !bin.with_file_name("netpath-cni").is_file() {
            bail!("no netpath-cni next to {}: run `cargo build --release -p netpath`", bin.display());
        }
        let tag = match (&publish, flavour) {
            (_, Flavour::Xdp | Flavour::XdpGeneric) => "bench-netpath-xdp",
            (Some(_), _) => "bench-netpath",
            (None, Flavour::Macvlan) => "bench-netpath-macvlan",
            (None, _) => "bench-netpath-direct",
        };
        let xdp = match flavour {
            Flavour::Xdp => Some("native"),
            Flavour::XdpGeneric => Some("generic"),
            _ => None,
        };
        let lab = if let Some(mode) = xdp {
            let lab = Lab::with_daemon_args(tag, &["--xdp", mode]);
            lab.client_sends_full_checksums();
            lab
        } else {
            Lab::new(tag)
        };
        forwarding(&lab.host_ns)?;
        // Routed rows reach the container by its address: the network must let them in
        // (Docker's default gateway mode, `nat`, only opens published host ports).
        let mut create = vec!["network", "create", "--subnet", SUBNET];
        if macvlan {
            // The client's own subnet, the upper half handed out (the lab's eth0 link).
            create = vec!["network", "create", "-d", "macvlan", "--subnet", MACVLAN_SUBNET];
            create.extend(["--ip-range", MACVLAN_RANGE, "--gateway", netpath_tests::CLIENT_IP, "-o", "parent=eth0"]);
        } else if publish.is_none() {
            create.extend(["-o", "com.docker.network.bridge.gateway_mode_ipv4=nat-unprotected"]);
        }
        create.push(NETWORK);
        np(&lab, &create)?;
        let mut args: Vec<String> = ["run", "-d", "--name", SERVER, "--network", NETWORK].map(String::from).to_vec();
        if let Some(p) = &publish {
            args.extend(publish_args(p));
        }
        args.push("--".into());
        let extra = check_port(publish.as_ref());
        args.extend(serve_argv(ctx, extra)?);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = output(lab.np_cmd(&argv), None, NP_TIMEOUT)?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            if publish.is_some() && err.contains("unexpected argument") {
                return Err(NotAvailable { reason: "no -p yet".into(), detail: Some(crate::util::tail(&err)) }.into());
            }
            bail!("netpath run failed ({}): {}", out.status, crate::util::tail(&err));
        }
        let mut v =
            Netpath { label, publish, macvlan, ctr_ip: std::net::Ipv4Addr::UNSPECIFIED, running: true, cni, lab };
        let inspect: serde_json::Value = serde_json::from_str(&np(&v.lab, &["inspect", SERVER])?)?;
        v.ctr_ip = inspect[0]["NetworkSettings"]["Networks"][NETWORK]["IPAddress"]
            .as_str()
            .context("no address in `netpath inspect srv`")?
            .parse()?;
        if v.publish.is_none() && !v.macvlan {
            route_client_to_subnet(&v.lab)?;
        }
        let lab = &v.lab;
        wait_ready(ctx, &lab.client_ns, v.target(), extra, || lab.np_cmd(&["exec", SERVER, "--", "ss", "-Hltn"]))?;
        Ok(v)
    }
}

/// The netpath binary the lab will run. `cargo run -p netpath-bench` builds the library, not
/// this binary, so it may be missing or older than the sources.
fn binary() -> Result<PathBuf> {
    let bin = std::env::var_os("NETPATH_BIN").map(PathBuf::from).or_else(|| {
        let exe = std::env::current_exe().ok()?;
        exe.parent().map(|d| d.join("netpath")).filter(|p| p.is_file())
    });
    match bin {
        Some(b) if b.is_file() => Ok(b),
        _ => bail!("no netpath binary next to this one: run `cargo build --release -p netpath` first"),
    }
}

/// Set when the netpath binary is older than a source file of netpath, netpath-common or
/// netpath-ebpf (the figures would then describe older code).
pub fn stale_binary_warning() -> Option<String> {
    let bin = binary().ok()?;
    let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    let newer = ["netpath", "netpath-common", "netpath-ebpf"]
        .iter()
        .filter_map(|c| newest_under(&root.join(c).join("src")))
        .filter(|(t, _)| *t > built)
        .max_by_key(|(t, _)| *t)?;
    Some(format!(
        "{} is older than {}: rebuild it (`cargo xtask build-ebpf --release && cargo build --release -p netpath`)",
        bin.display(),
        newer.1.display()
    ))
}

fn newest_under(dir: &Path) -> Option<(std::time::SystemTime, PathBuf)> {
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        let cand =
            if p.is_dir() { newest_under(&p) } else { e.metadata().and_then(|m| m.modified()).ok().map(|t| (t, p)) };
        if let Some(c) = cand
            && best.as_ref().is_none_or(|b| c.0 > b.0)
        {
            best = Some(c);
        }
    }
    best
}

/// `-p` flags: the filler range first, then each measured service (`HOST:CTR/proto`).
fn publish_args(p: &Publish) -> Vec<String> {
    let mut v = Vec::new();
    if let Some((a, b)) = p.filler_range() {
        v.extend(["-p".into(), format!("{a}-{b}:{a}-{b}/tcp")]);
    }
    for m in &p.measured {
        v.extend(["-p".into(), format!("{}:{}/{}", m.host, m.ctr, m.proto.as_str())]);
    }
    v
}

/// Runs the CLI against the lab's daemon; a failure is an error carrying its stderr.
fn np(lab: &Lab, args: &[&str]) -> Result<String> {
    check(lab.np_cmd(args), None, NP_TIMEOUT)
        .with_context(|| format!("daemon log: {}", crate::util::tail(&lab.daemon_log())))
}

impl Variant for Netpath {
    fn label(&self) -> String {
        self.label.clone()
    }

    fn datapath_counters(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&np(&self.lab, &["system", "datapath"])?)?)
    }

    fn target(&self) -> Target {
        match self.publish {
            Some(_) => Target::published(),
            None => Target::routed(self.ctr_ip),
        }
    }

    fn client_ns(&self) -> &Path {
        &self.lab.client_ns
    }

    /// netpath-direct, netpath-macvlan: `netpath attach` of a namespace made elsewhere (what
    /// a runtime calls).
    /// netpath: `netpath run -d -p` of a `sleep` (attach has no `-p`), so it includes
    /// starting the process. netpath-cni: the plugin run as a runtime runs it, ADD with one
    /// port mapping (timed), then DEL.
    fn attach_once(&mut self, n: usize) -> Result<Duration> {
        let name = format!("att{n}");
        if self.cni {
            return self.cni_attach_once(n);
        }
        let t = Instant::now();
        if self.publish.is_some() {
            let p = format!("{}:{CONN_PORT}/tcp", attach_port(n));
            np(&self.lab, &["run", "-d", "--name", &name, "--network", NETWORK, "-p", &p, "--", "sleep", "600"])?;
        } else {
            let ns = self.lab.add_ns(&name);
            let ns = ns.to_str().context("netns path")?;
            np(&self.lab, &["attach", "--netns", ns, "--name", &name, "--network", NETWORK])?;
        }
        let took = t.elapsed();
        np(&self.lab, &["rm", "-f", &name])?;
        Ok(took)
    }

    fn attach_only(&self) -> bool {
        self.cni
    }

    fn host_ns(&self) -> Option<&Path> {
        Some(&self.lab.host_ns)
    }

    fn uplink_ns(&self) -> Result<&Path> {
        Ok(&self.lab.host_ns)
    }

    /// `netpath exec`, as a user would.
    fn container_cmd(&self, prog: &str, args: &[&str]) -> Result<std::process::Command> {
        let mut a = vec!["exec", SERVER, "--", prog];
        a.extend_from_slice(args);
        Ok(self.lab.np_cmd(&a))
    }

    /// SIGTERM, then a new daemon: the pinned datapath keeps forwarding meanwhile.
    fn restart(&mut self) -> Result<()> {
        self.lab.stop_daemon();
        self.lab.start_daemon();
        Ok(())
    }

    fn teardown(&mut self) -> Result<()> {
        if std::mem::take(&mut self.running) {
            np(&self.lab, &["rm", "-f", SERVER])?;
            np(&self.lab, &["network", "rm", NETWORK])?;
        }
        Ok(())
    }
}

impl Netpath {
    fn cni_attach_once(&mut self, n: usize) -> Result<Duration> {
        let id = format!("att{n}");
        let ns = self.lab.add_ns(&id);
        let conf = serde_json::json!({
            "cniVersion": "1.1.0", "name": NETWORK, "type": "netpath-cni", "socket": self.lab.socket,
            "runtimeConfig": { "portMappings": [{ "hostPort": attach_port(n), "containerPort": CONN_PORT, "protocol": "tcp" }] },
        });
        let run = |cmd: &str| -> Result<()> {
            let mut c = std::process::Command::new(binary()?.with_file_name("netpath-cni"));
            c.env("CNI_COMMAND", cmd)
                .env("CNI_CONTAINERID", &id)
                .env("CNI_NETNS", &ns)
                .env("CNI_IFNAME", "eth0")
                .env("CNI_PATH", "/usr/lib/cni")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            let mut child = c.spawn().context("running netpath-cni")?;
            use std::io::Write;
            child.stdin.take().context("stdin")?.write_all(conf.to_string().as_bytes())?;
            let out = child.wait_with_output()?;
            if !out.status.success() {
                bail!("netpath-cni {cmd} failed: {}", String::from_utf8_lossy(&out.stdout));
            }
            Ok(())
        };
        let t = Instant::now();
        run("ADD")?;
        let took = t.elapsed();
        run("DEL")?;
        Ok(took)
    }
}

impl Drop for Netpath {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("bench: {}: {e:#}", self.label);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_flags() {
        let p = Publish::new(10_000).unwrap();
        let a = publish_args(&p);
        assert_eq!(a[0], "-p");
        assert_eq!(a[1], "20000-29995:20000-29995/tcp");
        assert!(a.contains(&"15201:5201/udp".to_string()));
        assert_eq!(a.len(), 2 * 5);
        assert_eq!(publish_args(&Publish::new(1).unwrap()).len(), 2 * 4);
    }
}
