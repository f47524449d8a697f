//! The datapaths under comparison. Each one builds its own netns lab:
//!
//! ```text
//! client netns ──veth── host netns eth0 (198.51.100.1) ── bridge ── container netns (servers)
//! ```
//!
//! and hands the figures a [`Target`]: where the client connects (the container's address
//! for routed variants, 198.51.100.1 and the published host ports for NAT variants).

mod cni;
pub mod docker;
pub mod netavark;
pub mod netpath;

pub use netpath::stale_binary_warning;
mod plain;

use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netpath_tests::{HOST_ETH0_IP, Lab};

use crate::serve::{CONN_PORT, IPERF_PORT, SOCKPERF_PORT};
use crate::util::{check, in_ns, ns_check, stop_child};

/// The container subnet of every lab (TEST-NET-3: documentation addresses, routed nowhere).
pub const SUBNET: &str = "203.0.113.0/24";
pub const GATEWAY: &str = "203.0.113.1";
pub const CTR_IP: &str = "203.0.113.2";
/// Host ports the measured services are published on (container ports in `serve`).
pub const IPERF_HOST_PORT: u16 = 15201;
pub const SOCKPERF_HOST_PORT: u16 = 31111;
pub const CONN_HOST_PORT: u16 = 18080;
/// Filler ports (published, nothing listens) start here: `-p 20000-N:20000-N`.
pub const FILLER_START: u16 = 20000;
/// Extra containers wired for the attach-time figure publish `ATTACH_PORT_BASE + n`.
pub const ATTACH_PORT_BASE: u16 = 40000;

/// What every figure needs from a variant.
pub trait Variant {
    /// Row label, e.g. `iptables` or `iptables @10k`.
    fn label(&self) -> String;
    /// Where the client sends traffic.
    fn target(&self) -> Target;
    /// The client namespace (traffic generators run here).
    fn client_ns(&self) -> &Path;
    /// Wires one more container the way this variant wires containers (with one published
    /// port where it publishes ports), returns how long the wiring took, then unwires it.
    fn attach_once(&mut self, n: usize) -> Result<Duration>;
    /// Undoes what setup did outside the lab's namespaces' lifetime (netavark teardown, CNI
    /// DEL, netpath rm); the lab itself is removed when the variant is dropped.
    fn teardown(&mut self) -> Result<()>;
    /// The namespace a restartable daemon runs in (None: no daemon, the kernel state is all).
    fn host_ns(&self) -> Option<&Path> {
        None
    }
    /// True for rows that only time wiring (their datapath is another row's).
    fn attach_only(&self) -> bool {
        false
    }
    /// The daemon's datapath counters (`netpath system datapath`), for rows that have one.
    fn datapath_counters(&self) -> Result<serde_json::Value> {
        bail!("{} has no netpath datapath", self.label())
    }
    /// The lab host's namespace (its `eth0` is the uplink the client's frames arrive on).
    fn uplink_ns(&self) -> Result<&Path> {
        bail!("{} has no lab host namespace", self.label())
    }
    /// A command run inside the measured container (its namespace, the host's files).
    fn container_cmd(&self, prog: &str, args: &[&str]) -> Result<Command> {
        let _ = (prog, args);
        bail!("{} cannot run commands in its container", self.label())
    }
    /// Stops the variant's daemon and starts it again (see [`Variant::host_ns`]).
    fn restart(&mut self) -> Result<()> {
        bail!("{} has no daemon to restart", self.label())
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub ip: Ipv4Addr,
    pub iperf: u16,
    pub sockperf: u16,
    pub conn: u16,
}

impl Target {
    fn routed(ip: Ipv4Addr) -> Target {
        Target { ip, iperf: IPERF_PORT, sockperf: SOCKPERF_PORT, conn: CONN_PORT }
    }
    fn published() -> Target {
        Target {
            ip: HOST_ETH0_IP.parse().expect("HOST_ETH0_IP"),
            iperf: IPERF_HOST_PORT,
            sockperf: SOCKPERF_HOST_PORT,
            conn: CONN_HOST_PORT,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Bridge + veth made with `ip`, client routes to the container: the limit.
    Direct,
    /// Direct plumbing plus Docker libnetwork's iptables rules for published ports.
    Iptables,
    /// Debian's netavark (podman's network stack), bridge driver + port mappings.
    Netavark,
    /// containernetworking-plugins: bridge + host-local + portmap.
    Cni,
    /// The netpath daemon, container published with `-p`.
    Netpath,
    /// The same with `netpath daemon --xdp native`: uplink_xdp ahead of TC on the uplink. Its
    /// client sends full checksums (as frames off a wire carry; see `Lab::client_sends_full_checksums`).
    NetpathXdp,
    /// `--xdp generic` (the XDP section only: not in [`Kind::ALL`]).
    NetpathXdpGeneric,
    /// The netpath daemon, container reached by its address (routing, no NAT).
    NetpathDirect,
    /// The netpath daemon, container on a macvlan network of the host's eth0: on the client's
    /// own subnet, reached at its address with no bridge, veth, routing or NAT on the way.
    NetpathMacvlan,
    /// The netpath daemon wiring through its CNI plugin (`netpath-cni ADD` with a port
    /// mapping): attach figure only, the datapath is `netpath`'s.
    NetpathCni,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Direct,
        Kind::NetpathDirect,
        Kind::NetpathMacvlan,
        Kind::Iptables,
        Kind::Netavark,
        Kind::Cni,
        Kind::Netpath,
        Kind::NetpathXdp,
        Kind::NetpathCni,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Iptables => "iptables",
            Kind::Netavark => "netavark",
            Kind::Cni => "cni",
            Kind::Netpath => "netpath",
            Kind::NetpathXdp => "netpath-xdp",
            Kind::NetpathXdpGeneric => "netpath-xdp-generic",
            Kind::NetpathDirect => "netpath-direct",
            Kind::NetpathMacvlan => "netpath-macvlan",
            Kind::NetpathCni => "netpath-cni",
        }
    }

    pub fn parse(s: &str) -> Result<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s).with_context(|| {
            format!(
                "unknown variant {s:?} (known: {})",
                Kind::ALL.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
            )
        })
    }

    /// Whether the client reaches the server through published ports (DNAT).
    pub fn publishes(self) -> bool {
        matches!(
            self,
            Kind::Iptables
                | Kind::Netavark
                | Kind::Cni
                | Kind::Netpath
                | Kind::NetpathXdp
                | Kind::NetpathXdpGeneric
                | Kind::NetpathCni
        )
    }
}

/// One row of the results: a variant, and for publishing variants how many ports are published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    pub kind: Kind,
    pub ports: u32,
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind.publishes() {
            write!(f, "{} @{}", self.kind.name(), ports_label(self.ports))
        } else {
            f.write_str(self.kind.name())
        }
    }
}

pub fn ports_label(n: u32) -> String {
    if n >= 1000 && n.is_multiple_of(1000) { format!("{}k", n / 1000) } else { n.to_string() }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// One published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMap {
    pub host: u16,
    pub ctr: u16,
    pub proto: Proto,
}

/// What a publishing variant publishes: the measured services plus filler ports (host port p
/// → container port p, TCP, nothing listening) up to the configured total. Filler entries
/// are installed first, so a linear rule list puts the measured ones last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub measured: Vec<PortMap>,
    pub filler: u16,
}

impl Publish {
    pub fn new(total: u32) -> Result<Publish> {
        let measured = vec![
            PortMap { host: IPERF_HOST_PORT, ctr: IPERF_PORT, proto: Proto::Tcp },
            PortMap { host: IPERF_HOST_PORT, ctr: IPERF_PORT, proto: Proto::Udp },
            PortMap { host: SOCKPERF_HOST_PORT, ctr: SOCKPERF_PORT, proto: Proto::Tcp },
            PortMap { host: CONN_HOST_PORT, ctr: CONN_PORT, proto: Proto::Tcp },
        ];
        let filler = total.saturating_sub(measured.len() as u32);
        let last = u32::from(FILLER_START) + filler;
        if last > u32::from(SOCKPERF_HOST_PORT) {
            bail!("at most {} published ports are supported", u32::from(SOCKPERF_HOST_PORT) - u32::from(FILLER_START));
        }
        Ok(Publish { measured, filler: filler as u16 })
    }

    /// First and last filler port, if there are any.
    pub fn filler_range(&self) -> Option<(u16, u16)> {
        (self.filler > 0).then(|| (FILLER_START, FILLER_START + self.filler - 1))
    }

    /// Every mapping, filler first.
    pub fn all(&self) -> Vec<PortMap> {
        let mut v: Vec<PortMap> = match self.filler_range() {
            Some((a, b)) => (a..=b).map(|p| PortMap { host: p, ctr: p, proto: Proto::Tcp }).collect(),
            None => Vec::new(),
        };
        v.extend(&self.measured);
        v
    }
}

/// Shared by every factory: what a setup needs to know.
pub struct Ctx {
    /// This binary (run inside namespaces for `__serve`, `__probe`, `__conn-client`).
    pub exe: PathBuf,
    /// Limit for one wiring step (netavark setup, CNI ADD with many ports, ...).
    pub setup_timeout: Duration,
    /// Above this many published ports the cni variant is not attempted (see `cni.rs`).
    pub cni_max_ports: u32,
}

/// A variant's setup did not fail: the feature is missing or out of reach here (cells say
/// "n/a (reason)"; the detail goes in the notes).
#[derive(Debug)]
pub struct NotAvailable {
    pub reason: String,
    pub detail: Option<String>,
}

impl fmt::Display for NotAvailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)?;
        if let Some(d) = &self.detail {
            write!(f, ": {d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for NotAvailable {}

/// Builds a variant's lab, wires its container, starts the servers and checks that the
/// client reaches them. Panics from the lab helpers become errors (the partly built lab is
/// removed while unwinding).
pub fn setup(cfg: Config, ctx: &Ctx) -> Result<Box<dyn Variant>> {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<Box<dyn Variant>> {
        let publish = if cfg.kind.publishes() { Some(Publish::new(cfg.ports)?) } else { None };
        let label = cfg.to_string();
        Ok(match cfg.kind {
            Kind::Direct => Box::new(plain::Plain::setup(label, None, ctx)?),
            Kind::Iptables => Box::new(plain::Plain::setup(label, publish, ctx)?),
            Kind::Netavark => Box::new(netavark::Netavark::setup(label, publish.expect("publishes"), ctx)?),
            Kind::Cni => Box::new(cni::Cni::setup(label, publish.expect("publishes"), ctx)?),
            Kind::Netpath | Kind::NetpathDirect => {
                Box::new(netpath::Netpath::setup(label, publish, netpath::Flavour::Bridge, ctx)?)
            }
            Kind::NetpathXdp => Box::new(netpath::Netpath::setup(label, publish, netpath::Flavour::Xdp, ctx)?),
            Kind::NetpathXdpGeneric => {
                Box::new(netpath::Netpath::setup(label, publish, netpath::Flavour::XdpGeneric, ctx)?)
            }
            Kind::NetpathMacvlan => Box::new(netpath::Netpath::setup(label, None, netpath::Flavour::Macvlan, ctx)?),
            Kind::NetpathCni => Box::new(netpath::Netpath::setup(label, publish, netpath::Flavour::Cni, ctx)?),
        })
    }));
    match r {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            bail!("setup panicked: {}", crate::util::tail(&msg))
        }
    }
}

// ---- plumbing shared by the variants ----

/// A fresh lab without the netpath daemon, with forwarding on in the host namespace.
fn routing_lab(tag: &str) -> Result<Lab> {
    let lab = Lab::without_daemon(tag);
    forwarding(&lab.host_ns)?;
    Ok(lab)
}

fn forwarding(host_ns: &Path) -> Result<()> {
    ns_check(host_ns, "sysctl", &["-qw", "net.ipv4.ip_forward=1"]).map(drop)
}

/// The client's route to the container subnet, via the host (routed variants only).
fn route_client_to_subnet(lab: &Lab) -> Result<()> {
    ns_check(&lab.client_ns, "ip", &["route", "add", SUBNET, "via", HOST_ETH0_IP]).map(drop)
}

/// `ip` plumbing for one container on `bridge`: veth `host_if` in the host namespace, `eth0`
/// with `ip`/24 and a default route via the gateway in the container namespace.
fn wire_veth(host_ns: &Path, ctr_ns: &Path, bridge: &str, host_if: &str, ip: &str) -> Result<()> {
    let ctr = ctr_ns.to_str().context("netns path")?;
    ns_check(host_ns, "ip", &["link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ctr])?;
    ns_check(host_ns, "ip", &["link", "set", host_if, "master", bridge, "up"])?;
    ns_check(ctr_ns, "ip", &["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
    ns_check(ctr_ns, "ip", &["link", "set", "eth0", "up"])?;
    ns_check(ctr_ns, "ip", &["route", "add", "default", "via", GATEWAY])?;
    Ok(())
}

/// The last filler port of a publishing variant: the servers also accept there and
/// [`wait_ready`] checks that the client gets through it (host port = container port).
fn check_port(publish: Option<&Publish>) -> Option<u16> {
    publish.and_then(Publish::filler_range).map(|(_, last)| last)
}

/// Starts the servers (`netpath-bench __serve`) inside a container namespace.
fn start_servers(ctx: &Ctx, ctr_ns: &Path, extra: Option<u16>) -> Result<Child> {
    let argv = serve_argv(ctx, extra)?;
    let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
    let mut c = in_ns(ctr_ns, &argv[0], &args);
    c.stdin(std::process::Stdio::null());
    c.spawn().context("starting the servers in the container")
}

/// The command that serves inside a container (also for `netpath run`).
fn serve_argv(ctx: &Ctx, extra: Option<u16>) -> Result<Vec<String>> {
    let mut v = vec![ctx.exe.to_str().context("exe path")?.to_string(), "__serve".into()];
    if let Some(p) = extra {
        v.extend(["--extra-port".into(), p.to_string()]);
    }
    Ok(v)
}

/// Waits until the servers listen (`listening` runs `ss -Hltn` in the container), then until
/// the client gets an answer from the accept server through `target` (and through the last
/// filler port, `extra`, when there is one).
fn wait_ready(
    ctx: &Ctx,
    client_ns: &Path,
    target: Target,
    extra: Option<u16>,
    listening: impl Fn() -> Command,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let want: Vec<String> =
        [IPERF_PORT, SOCKPERF_PORT, CONN_PORT].into_iter().chain(extra).map(|p| format!(":{p} ")).collect();
    loop {
        let ss = check(listening(), None, Duration::from_secs(10)).unwrap_or_default();
        if want.iter().all(|w| ss.contains(w.as_str())) {
            break;
        }
        if Instant::now() > deadline {
            bail!("servers did not start listening in the container within 20s (ss: {})", crate::util::tail(&ss));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for port in std::iter::once(target.conn).chain(extra) {
        let addr = format!("{}:{port}", target.ip);
        check(
            in_ns(client_ns, ctx.exe.to_str().context("exe path")?, &["__probe", &addr]),
            None,
            Duration::from_secs(30),
        )
        .with_context(|| format!("the client cannot reach the container's accept server at {addr}"))?;
    }
    Ok(())
}

fn kill_server(server: &mut Option<Child>) {
    if let Some(mut c) = server.take() {
        stop_child(&mut c);
    }
}

/// Address of the n-th extra container wired for the attach-time figure.
fn attach_ip(n: usize) -> String {
    format!("203.0.113.{}", 10 + n % 240)
}

fn attach_port(n: usize) -> u16 {
    ATTACH_PORT_BASE + (n % 20000) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_counts_and_order() {
        let p = Publish::new(1).unwrap();
        assert_eq!(p.filler, 0);
        assert_eq!(p.all().len(), 4);
        assert_eq!(p.filler_range(), None);
        let p = Publish::new(10_000).unwrap();
        assert_eq!(p.filler_range(), Some((20000, 29995)));
        let all = p.all();
        assert_eq!(all.len(), 10_000);
        assert_eq!(all[0].host, FILLER_START);
        assert_eq!(all.last().unwrap().host, CONN_HOST_PORT);
        // Filler never collides with a measured host port.
        for m in &p.measured {
            assert!(!(20000..=29995).contains(&m.host));
        }
        assert!(Publish::new(20_000).is_err());
    }

    #[test]
    fn labels() {
        assert_eq!(Config { kind: Kind::Iptables, ports: 10_000 }.to_string(), "iptables @10k");
        assert_eq!(Config { kind: Kind::Netavark, ports: 1 }.to_string(), "netavark @1");
        assert_eq!(Config { kind: Kind::Direct, ports: 1 }.to_string(), "direct");
        assert_eq!(Kind::parse("netpath-direct").unwrap(), Kind::NetpathDirect);
        assert_eq!(Kind::parse("netpath-macvlan").unwrap(), Kind::NetpathMacvlan);
        assert!(Kind::parse("docker").is_err());
    }
}
