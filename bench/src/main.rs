//! netpath-bench: compares container datapaths on this machine, each inside its own netns lab.
//!
//! `cargo xtask bench [ARGS]` runs it (after building the eBPF object). Every variant gets a
//! lab (client ── host eth0 ── bridge ── container); the figures run round-robin over the
//! variants in each repetition, so drift hits all of them alike; the table (medians, ratios
//! against `direct`) goes to stdout and to bench/results/latest.{md,svg}.

mod dns;
mod figures;
mod firewall;
mod overlay;
mod overlay_cluster;
mod progcost;
mod report;
mod scale;
mod serve;
mod services;
mod stats;
mod util;
mod variants;
mod xdp;
mod xdpgen;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use figures::{Durations, Figure, Metric};
use report::{Report, Row, Status};
use variants::{Config, Ctx, Kind, NotAvailable, Variant};

#[derive(Parser)]
#[command(
    name = "netpath-bench",
    about = "Benchmarks netpath against direct routing, Docker-style iptables, netavark and CNI in netns labs",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    internal: Option<Internal>,
    /// Smoke run: 1 repetition, 1-second load figures, 1 attach sample (about a minute).
    #[arg(long)]
    quick: bool,
    /// Repetitions (each figure's cell is the median over them). Default 3 (1 with --quick).
    #[arg(long)]
    reps: Option<usize>,
    /// Seconds each load figure runs. Default 3 (1 with --quick).
    #[arg(long)]
    secs: Option<u32>,
    /// Variants to run (comma-separated): direct, netpath-direct, netpath-macvlan, iptables,
    /// netavark, cni, netpath, netpath-xdp, netpath-cni (attach figure only).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Figures to run (comma-separated): tcp1, tcp4, udp, latency, conn, attach, restart.
    #[arg(long, value_delimiter = ',')]
    figures: Vec<String>,
    /// Published-port counts for the publishing variants.
    #[arg(long, value_delimiter = ',', default_value = "1,10000")]
    ports: Vec<u32>,
    /// Containers wired per repetition for the attach figure. Default 3 (1 with --quick).
    #[arg(long)]
    attach_samples: Option<usize>,
    /// Time limit for one wiring step of a variant's setup (e.g. CNI ADD with 10,000 ports).
    #[arg(long, default_value_t = 240)]
    setup_timeout: u64,
    /// The cni variant is reported n/a above this many published ports (portmap is quadratic).
    #[arg(long, default_value_t = 1000)]
    cni_max_ports: u32,
    /// The DNS section (netpath's embedded server vs aardvark-dns): include, skip, or only.
    #[arg(long, default_value = "include", value_parser = ["include", "skip", "only"])]
    dns: String,
    /// The overlay section (container to container across two hosts: netpath's VXLAN
    /// datapath vs the kernel's VXLAN with static FDB and a bridge): include, skip, or only.
    #[arg(long, default_value = "include", value_parser = ["include", "skip", "only"])]
    overlay: String,
    /// The scale section (run/rm/restart/ps cost against container count, netpath vs
    /// netavark): include, skip, or only.
    #[arg(long, default_value = "include", value_parser = ["include", "skip", "only"])]
    scale: String,
    /// The services section (new conn/s through a VIP with 3 backends, netpath vs
    /// kube-proxy-style iptables): include, skip, or only.
    #[arg(long, default_value = "include", value_parser = ["include", "skip", "only"])]
    services: String,
    /// Service counts for the services section (10,000 take about a minute to create).
    #[arg(long, value_delimiter = ',', default_value = "1,10000")]
    service_counts: Vec<u32>,
    /// The firewall section (new conn/s to a published port with 1 and many rules, netpath vs
    /// the same rules in Docker's DOCKER-USER chain, and --keep-host-firewall): include,
    /// skip, or only.
    #[arg(long, default_value = "include", value_parser = ["include", "skip", "only"])]
    firewall: String,
    /// The XDP section (netpath with `--xdp native` beside netpath and direct: UDP 64 B
    /// packets/s, TCP 1 stream, RTT; and a flood to a closed container address during a
    /// ping-pong): include, skip, or only.
    #[arg(long, default_value = "include", value_parser = ["include", "skip", "only"])]
    xdp: String,
    /// Rule counts for the firewall section.
    #[arg(long, value_delimiter = ',', default_value = "1,10000")]
    firewall_rules: Vec<u32>,
    /// Container counts for the scale section (10000 takes a few minutes more).
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000")]
    scale_counts: Vec<usize>,
    /// run/rm cycles of the scale section's churn figure (0: skip it).
    #[arg(long, default_value_t = 1000)]
    scale_churn: usize,
    /// Where latest.md and latest.svg go.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    out: PathBuf,
}

/// What the bench runs inside lab namespaces.
#[derive(Subcommand)]
enum Internal {
    /// The container's servers: iperf3 -s, sockperf sr --tcp, the accept-and-close server.
    #[command(name = "__serve", hide = true)]
    Serve {
        #[arg(long, default_value_t = 7200)]
        max_secs: u64,
        /// Also accept on this port (the last filler port).
        #[arg(long)]
        extra_port: Option<u16>,
    },
    /// The connection-rate client (prints JSON).
    #[command(name = "__conn-client", hide = true)]
    ConnClient {
        /// One address, or several (comma-separated) taken in turn.
        #[arg(value_delimiter = ',', required = true)]
        addr: Vec<SocketAddr>,
        #[arg(long)]
        secs: f64,
        #[arg(long, default_value_t = 10_000_000)]
        max: u64,
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// The DNS client (prints JSON): UDP A queries for NAMES, `window` in flight per thread.
    #[command(name = "__dns-client", hide = true)]
    DnsClient {
        server: SocketAddr,
        #[arg(long)]
        secs: f64,
        #[arg(long, default_value_t = 1)]
        window: usize,
        #[arg(long, default_value_t = 1)]
        threads: usize,
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// In a container: asks its DNS server for NAME until it answers and NAME:PORT accepts a
    /// connection; prints `asking`, then the wall-clock time (µs) of that answer.
    #[command(name = "__name-probe", hide = true)]
    NameProbe {
        name: String,
        port: u16,
        #[arg(long, default_value_t = 20)]
        timeout_secs: u64,
    },
    /// The XDP-native generator (see xdpgen.rs): 64-byte UDP frames from SRC to DST out of
    /// IFNAME by BPF_PROG_RUN live frames, for SECS; prints how many it handed over (JSON).
    #[command(name = "__xdp-gen", hide = true)]
    XdpGen {
        ifname: String,
        #[arg(long)]
        dst_mac: String,
        #[arg(long)]
        src: std::net::SocketAddrV4,
        #[arg(long)]
        dst: std::net::SocketAddrV4,
        #[arg(long, default_value_t = 1)]
        threads: usize,
        #[arg(long)]
        secs: f64,
    },
    /// A bare XDP_DROP on IFNAME for SECS (the flood's ceiling, see xdpgen.rs); prints how
    /// many frames it dropped (JSON).
    #[command(name = "__xdp-drop", hide = true)]
    XdpDrop {
        ifname: String,
        #[arg(long)]
        secs: f64,
    },
    /// What uplink_xdp and uplink_in cost on the flood's frame, the programs alone
    /// (BPF_PROG_RUN, see progcost.rs), with the embedded object or OBJECT; prints JSON.
    #[command(name = "__xdp-prog-cost", hide = true)]
    XdpProgCost {
        #[arg(long)]
        object: Option<PathBuf>,
    },
    /// Counts UDP datagrams received on PORT for SECS (prints JSON).
    #[command(name = "__udp-sink", hide = true)]
    UdpSink {
        port: u16,
        #[arg(long)]
        secs: f64,
    },
    /// Sets up the overlay section's two labs (netpath's and the kernel's), prints their
    /// namespaces and holds them for SECS (or until SIGINT/SIGTERM): for profiling the two
    /// datapaths by hand (perf, bpftool, ethtool) under the section's own traffic.
    #[command(name = "__overlay-hold", hide = true)]
    OverlayHold {
        #[arg(long, default_value_t = 1800)]
        secs: u64,
    },
    /// Waits until the accept server answers at ADDR.
    #[command(name = "__probe", hide = true)]
    Probe {
        addr: SocketAddr,
        #[arg(long, default_value_t = 15)]
        timeout_secs: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.internal {
        Some(Internal::Serve { max_secs, extra_port }) => serve::serve(max_secs, extra_port).map(|_| ExitCode::SUCCESS),
        Some(Internal::ConnClient { addr, secs, max, threads }) => {
            serve::conn_client(&addr, secs, max, threads).map(|st| {
                let j = serde_json::json!({
                    "conns": st.conns, "errors": st.errors, "secs": st.secs, "first_error": st.first_error
                });
                println!("{j}");
                ExitCode::SUCCESS
            })
        }
        Some(Internal::DnsClient { server, secs, window, threads, names }) => {
            dns::dns_client(server, &names, secs, window, threads).map(|_| ExitCode::SUCCESS)
        }
        Some(Internal::NameProbe { name, port, timeout_secs }) => {
            overlay_cluster::name_probe(&name, port, Duration::from_secs(timeout_secs)).map(|_| ExitCode::SUCCESS)
        }
        Some(Internal::XdpGen { ifname, dst_mac, src, dst, threads, secs }) => {
            xdpgen::run(&ifname, &dst_mac, src, dst, threads, secs).map(|(sent, took)| {
                println!("{}", serde_json::json!({ "sent": sent, "secs": took }));
                ExitCode::SUCCESS
            })
        }
        Some(Internal::XdpDrop { ifname, secs }) => xdpgen::drop_all(&ifname, secs).map(|dropped| {
            println!("{}", serde_json::json!({ "dropped": dropped, "secs": secs }));
            ExitCode::SUCCESS
        }),
        Some(Internal::XdpProgCost { object }) => progcost::run(object.as_deref()).map(|(xdp, tc)| {
            println!("{}", serde_json::json!({ "uplink_xdp_ns": xdp, "uplink_in_ns": tc }));
            ExitCode::SUCCESS
        }),
        Some(Internal::UdpSink { port, secs }) => {
            let before = xdpgen::udp_snmp().unwrap_or_default();
            xdpgen::sink(port, secs).map(|got| {
                // The namespace's UDP counters over the run (RcvbufErrors: the socket's queue was full).
                let snmp: std::collections::BTreeMap<_, _> = xdpgen::udp_snmp()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| {
                        let d = v.saturating_sub(before.get(&k).copied().unwrap_or(0));
                        (k, d)
                    })
                    .collect();
                println!("{}", serde_json::json!({ "received": got, "secs": secs, "snmp": snmp }));
                ExitCode::SUCCESS
            })
        }
        Some(Internal::OverlayHold { secs }) => {
            util::install_stop_handler();
            std::env::current_exe()
                .context("locating this binary")
                .and_then(|exe| overlay::hold(&exe, Duration::from_secs(secs)))
                .map(|_| ExitCode::SUCCESS)
        }
        Some(Internal::Probe { addr, timeout_secs }) => {
            serve::probe(addr, Duration::from_secs(timeout_secs)).map(|_| ExitCode::SUCCESS)
        }
        None => bench(&cli),
    };
    r.unwrap_or_else(|e| {
        eprintln!("netpath-bench: error: {e:#}");
        ExitCode::FAILURE
    })
}

struct Plan {
    configs: Vec<Config>,
    figures: Vec<Figure>,
    reps: usize,
    durations: Durations,
    attach_samples: usize,
}

impl Plan {
    fn from_cli(cli: &Cli) -> Result<Plan> {
        let kinds: Vec<Kind> = if cli.only.is_empty() {
            Kind::ALL.to_vec()
        } else {
            cli.only.iter().map(|s| Kind::parse(s.trim())).collect::<Result<_>>()?
        };
        let figures: Vec<Figure> = if cli.figures.is_empty() {
            Figure::ALL.to_vec()
        } else {
            cli.figures.iter().map(|s| Figure::parse(s.trim())).collect::<Result<_>>()?
        };
        if cli.ports.is_empty() || cli.ports.contains(&0) {
            bail!("--ports needs positive counts");
        }
        let mut configs = Vec::new();
        for k in Kind::ALL.into_iter().filter(|k| kinds.contains(k)) {
            if k.publishes() {
                configs.extend(cli.ports.iter().map(|&ports| Config { kind: k, ports }));
            } else {
                configs.push(Config { kind: k, ports: 1 });
            }
        }
        let quick = cli.quick;
        Ok(Plan {
            configs,
            figures,
            reps: cli.reps.unwrap_or(if quick { 1 } else { 3 }).max(1),
            durations: Durations { secs: cli.secs.unwrap_or(if quick { 1 } else { 3 }).max(1) },
            attach_samples: cli.attach_samples.unwrap_or(if quick { 1 } else { 3 }).max(1),
        })
    }
}

fn bench(cli: &Cli) -> Result<ExitCode> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the bench builds network namespaces and must run as root");
    }
    let plan = Plan::from_cli(cli)?;
    util::install_stop_handler();
    let exe = std::env::current_exe().context("locating this binary")?;
    if cli.scale == "only" {
        let (md, svg) = scale::run(
            &cli.scale_counts,
            if cli.quick { 3 } else { 10 },
            if cli.quick { 100 } else { cli.scale_churn },
        )?;
        println!("{md}");
        std::fs::create_dir_all(&cli.out)?;
        std::fs::write(cli.out.join("scale.md"), &md)?;
        std::fs::write(cli.out.join("scale.svg"), &svg)?;
        eprintln!("bench: wrote {}/scale.md and scale.svg", cli.out.display());
        return Ok(ExitCode::SUCCESS);
    }
    if cli.overlay == "only" {
        let md = overlay::run(&exe, plan.reps, plan.durations.secs)?;
        println!("{md}");
        std::fs::create_dir_all(&cli.out)?;
        std::fs::write(cli.out.join("overlay.md"), &md)?;
        eprintln!("bench: wrote {}/overlay.md", cli.out.display());
        return Ok(ExitCode::SUCCESS);
    }
    if cli.services == "only" {
        let md = services::run(&exe, &cli.service_counts, plan.reps, plan.durations.secs)?;
        println!("{md}");
        std::fs::create_dir_all(&cli.out)?;
        std::fs::write(cli.out.join("services.md"), &md)?;
        eprintln!("bench: wrote {}/services.md", cli.out.display());
        return Ok(ExitCode::SUCCESS);
    }
    if cli.firewall == "only" {
        let md = firewall::run(&exe, &cli.firewall_rules, plan.reps, plan.durations.secs)?;
        println!("{md}");
        std::fs::create_dir_all(&cli.out)?;
        std::fs::write(cli.out.join("firewall.md"), &md)?;
        eprintln!("bench: wrote {}/firewall.md", cli.out.display());
        return Ok(ExitCode::SUCCESS);
    }
    if cli.xdp == "only" {
        let md = xdp::run(&exe, plan.reps, plan.durations.secs)?;
        println!("{md}");
        std::fs::create_dir_all(&cli.out)?;
        std::fs::write(cli.out.join("xdp.md"), &md)?;
        eprintln!("bench: wrote {}/xdp.md", cli.out.display());
        return Ok(ExitCode::SUCCESS);
    }
    if cli.dns == "only" {
        let md = dns::run(&exe, plan.reps, plan.durations.secs)?;
        println!("{md}");
        std::fs::create_dir_all(&cli.out)?;
        std::fs::write(cli.out.join("dns.md"), &md)?;
        eprintln!("bench: wrote {}/dns.md", cli.out.display());
        return Ok(ExitCode::SUCCESS);
    }
    let ctx = Ctx {
        exe: exe.clone(),
        setup_timeout: Duration::from_secs(cli.setup_timeout),
        cni_max_ports: cli.cni_max_ports,
    };
    let started = Instant::now();
    let command = command_line();
    eprintln!(
        "bench: {} variants × {} figures × {} reps ({}s runs)",
        plan.configs.len(),
        plan.figures.len(),
        plan.reps,
        plan.durations.secs
    );

    // Setup: one lab per row. Failures and missing features become rows without figures.
    let mut rows = Vec::new();
    let mut setup_notes = Vec::new();
    if plan.configs.iter().any(|c| {
        matches!(
            c.kind,
            Kind::Netpath
                | Kind::NetpathXdp
                | Kind::NetpathXdpGeneric
                | Kind::NetpathDirect
                | Kind::NetpathMacvlan
                | Kind::NetpathCni
        )
    }) && let Some(w) = variants::stale_binary_warning()
    {
        eprintln!("bench: warning: {w}");
        setup_notes.push(format!("warning: {w}"));
    }
    let mut live: Vec<Option<Box<dyn Variant>>> = Vec::new();
    for cfg in &plan.configs {
        if util::stop_requested() {
            bail!("interrupted");
        }
        let t = Instant::now();
        eprintln!("bench: setting up {cfg}");
        match variants::setup(*cfg, &ctx) {
            Ok(v) => {
                eprintln!("bench: {cfg} ready in {:.1}s", t.elapsed().as_secs_f64());
                rows.push(Row::new(cfg.to_string(), cfg.kind, Status::Ok));
                live.push(Some(v));
            }
            Err(e) => {
                let status = match e.downcast_ref::<NotAvailable>() {
                    Some(na) => {
                        if let Some(d) = &na.detail {
                            setup_notes.push(format!("{cfg}: n/a: {d}"));
                        }
                        Status::NotAvailable(na.reason.clone())
                    }
                    None => Status::Failed(format!("{e:#}")),
                };
                eprintln!("bench: {cfg}: not run: {e:#}");
                rows.push(Row::new(cfg.to_string(), cfg.kind, status));
                live.push(None);
            }
        }
    }

    // Measure: per repetition, per figure, every live variant in turn (rotated per rep).
    let mut attach_counter = 0usize;
    let n = live.len();
    'reps: for rep in 0..plan.reps {
        for &fig in &plan.figures {
            for k in 0..n {
                let i = (k + rep) % n;
                let Some(v) = live[i].as_deref_mut() else { continue };
                if util::stop_requested() {
                    eprintln!("bench: interrupted, tearing down");
                    break 'reps;
                }
                let r = figures::measure(fig, v, plan.durations, &exe, plan.attach_samples, &mut attach_counter);
                match r {
                    Ok(values) => {
                        let shown: Vec<String> =
                            values.iter().map(|(m, x)| format!("{} {} {}", m.title(), m.fmt(*x), m.unit())).collect();
                        eprintln!("bench: [{}/{}] {}: {}", rep + 1, plan.reps, v.label(), shown.join(", "));
                        for (m, x) in values {
                            rows[i].samples.entry(m).or_default().push(x);
                        }
                    }
                    Err(e) => {
                        eprintln!("bench: [{}/{}] {}: {}: {e:#}", rep + 1, plan.reps, v.label(), fig.name());
                        for m in fig.metrics() {
                            rows[i].errors.push((m.title().to_string(), format!("{e:#}")));
                        }
                    }
                }
            }
        }
    }

    // Teardown (labs are removed as the variants drop).
    let mut notes = setup_notes;
    for (i, v) in live.iter_mut().enumerate() {
        if let Some(v) = v.as_deref_mut()
            && let Err(e) = v.teardown()
        {
            notes.push(format!("{}: teardown: {e:#}", rows[i].label));
        }
    }
    drop(live);
    let interrupted = util::stop_requested();

    let metrics: Vec<Metric> =
        Metric::ALL.into_iter().filter(|m| plan.figures.iter().any(|f| f.metrics().contains(m))).collect();
    notes.extend(method_notes());
    let report = Report { command, header: header(&plan, started.elapsed()), metrics, rows: &rows, notes };
    let mut md = report.markdown();
    if cli.dns == "include" && !interrupted {
        match dns::run(&exe, plan.reps, plan.durations.secs) {
            Ok(d) => {
                std::fs::create_dir_all(&cli.out)?;
                std::fs::write(cli.out.join("dns.md"), &d)?;
                md.push_str(&format!("\n{d}"));
            }
            Err(e) => md.push_str(&format!("\n## DNS\n\nnot run: {e:#}\n")),
        }
    }
    if cli.services == "include" && !interrupted {
        match services::run(&exe, &cli.service_counts, plan.reps, plan.durations.secs) {
            Ok(d) => {
                std::fs::create_dir_all(&cli.out)?;
                std::fs::write(cli.out.join("services.md"), &d)?;
                md.push_str(&format!("\n{d}"));
            }
            Err(e) => md.push_str(&format!("\n## Services\n\nnot run: {e:#}\n")),
        }
    }
    if cli.firewall == "include" && !interrupted {
        match firewall::run(&exe, &cli.firewall_rules, plan.reps, plan.durations.secs) {
            Ok(d) => {
                std::fs::create_dir_all(&cli.out)?;
                std::fs::write(cli.out.join("firewall.md"), &d)?;
                md.push_str(&format!("\n{d}"));
            }
            Err(e) => md.push_str(&format!("\n## Firewall\n\nnot run: {e:#}\n")),
        }
    }
    if cli.xdp == "include" && !interrupted {
        match xdp::run(&exe, plan.reps, plan.durations.secs) {
            Ok(d) => {
                std::fs::create_dir_all(&cli.out)?;
                std::fs::write(cli.out.join("xdp.md"), &d)?;
                md.push_str(&format!("\n{d}"));
            }
            Err(e) => md.push_str(&format!("\n## XDP\n\nnot run: {e:#}\n")),
        }
    }
    if cli.scale == "include" && !interrupted {
        match scale::run(
            &cli.scale_counts,
            if cli.quick { 3 } else { 10 },
            if cli.quick { 100 } else { cli.scale_churn },
        ) {
            Ok((d, svg)) => {
                std::fs::create_dir_all(&cli.out)?;
                std::fs::write(cli.out.join("scale.md"), &d)?;
                std::fs::write(cli.out.join("scale.svg"), &svg)?;
                md.push_str(&format!("\n{d}\n![scale](scale.svg)\n"));
            }
            Err(e) => md.push_str(&format!("\n## Scale\n\nnot run: {e:#}\n")),
        }
    }
    if cli.overlay == "include" && !interrupted {
        match overlay::run(&exe, plan.reps, plan.durations.secs) {
            Ok(d) => {
                std::fs::create_dir_all(&cli.out)?;
                std::fs::write(cli.out.join("overlay.md"), &d)?;
                md.push_str(&format!("\n{d}"));
            }
            Err(e) => md.push_str(&format!("\n## Overlay (cross-host)\n\nnot run: {e:#}\n")),
        }
    }
    println!("{md}");
    if interrupted {
        eprintln!("bench: interrupted: {}/latest.* left as they were", cli.out.display());
        return Ok(ExitCode::from(130));
    }
    std::fs::create_dir_all(&cli.out).with_context(|| format!("creating {}", cli.out.display()))?;
    std::fs::write(cli.out.join("latest.md"), &md)?;
    std::fs::write(cli.out.join("latest.svg"), report.svg())?;
    eprintln!("bench: wrote {}/latest.md and latest.svg in {:.0}s", cli.out.display(), started.elapsed().as_secs_f64());
    let measured = rows.iter().any(|r| !r.samples.is_empty());
    Ok(if measured { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The command as typed (argv with shell quoting where needed).
fn command_line() -> String {
    let mut args = std::env::args();
    let prog = args.next().map(|p| p.rsplit('/').next().unwrap_or(&p).to_string()).unwrap_or_default();
    let rest: Vec<String> = args.map(|a| shell_quote(&a)).collect();
    let join = |head: &str| if rest.is_empty() { head.to_string() } else { format!("{head} {}", rest.join(" ")) };
    format!("`{}` (what `{}` runs)", join(&prog), join("cargo xtask bench"))
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_=,./:@".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn header(plan: &Plan, took: Duration) -> Vec<String> {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let date = Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]).output().ok();
    let date = date.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    let versions: Vec<String> = ["iperf3", "sockperf", "iptables", "netavark", "containernetworking-plugins"]
        .iter()
        .map(|p| {
            let v = Command::new("dpkg-query").args(["-W", "-f=${Version}", p]).output().ok();
            let v = v.filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
            format!("{p} {}", v.unwrap_or_else(|| "?".into()))
        })
        .collect();
    vec![
        format!("{date}, Linux {}, {cpus} CPUs; took {:.0}s", kernel.trim(), took.as_secs_f64()),
        format!(
            "{} repetition(s), {}s per load run, {} attach sample(s) per repetition",
            plan.reps, plan.durations.secs, plan.attach_samples
        ),
        format!("tools: {}", versions.join(", ")),
    ]
}

fn method_notes() -> Vec<String> {
    vec![
        "Lab per row: client netns ── veth ── host netns eth0 198.51.100.1 ── bridge ── container netns \
         (203.0.113.0/24). Servers in the container, clients in the client netns; routed rows reach the \
         container's address, `@N` rows reach 198.51.100.1 on published host ports."
            .into(),
        "`@1`: only the measured services are published (iperf3 tcp+udp, sockperf, accept server: 4 mappings); \
         `@10k`: plus filler TCP ports 20000-29995 to 10,000 mappings, installed before the measured ones. \
         iptables: one Docker-style rule set per port (DNAT, ACCEPT, hairpin MASQUERADE); netavark: one \
         range mapping, as podman passes `-p A-B:A-B`; cni: portmap has no ranges, one mapping per port."
            .into(),
        "Figures: iperf3 -c -P1 / -P4 (received Gbit/s); iperf3 -u -l 64 -b 0 (packets the server \
         received per s); sockperf ping-pong --tcp --full-rtt (round-trip percentiles); new TCP \
         connections: 2 client threads connect, read one byte, close with RST (no TIME_WAIT), against \
         an accept-write-close server; attach: wiring one more container (with one published port where \
         the variant publishes) on the same host: ip commands (+ iptables-restore) for direct/iptables, \
         netavark setup, CNI ADD bridge+portmap, netpath attach (netpath-direct), netpath run -d -p, or \
         netpath-cni ADD with one portMapping (netpath-cni, attach only); \
         restart (rows with a daemon): one iperf3 -c stream (0.1 s intervals) while the daemon is stopped \
         (SIGTERM) and started again; the longest run of intervals that moved no byte, and the TCP resets \
         the host namespace sent (plus one if the stream died)."
            .into(),
    ]
}
