//! The docker-like CLI. Every verb except `daemon` is a client of the daemon's API.

mod container;
mod firewall;
mod flows;
mod network;
mod service;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::api::DEFAULT_SOCKET;
use crate::api::client::Client;

#[derive(Parser)]
#[command(name = "netpath", version, about = "Container networking with an eBPF datapath")]
pub struct Cli {
    /// The daemon's API socket.
    #[arg(long, global = true, env = "NETPATH_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon (in the network namespace that plays "host").
    ///
    /// Containers, their wiring and the datapath outlive the daemon: stop it (SIGTERM) and
    /// start it again, or upgrade it, and flows keep going; the new daemon adopts them.
    Daemon {
        /// Where the daemon keeps its state (one file per network and container), container
        /// namespaces and logs.
        #[arg(long, default_value = "/var/lib/netpath")]
        state_dir: PathBuf,
        /// Where maps and links are pinned; made a bpffs mount if it is not on one.
        #[arg(long, default_value = "/sys/fs/bpf/netpath")]
        bpffs: PathBuf,
        /// Interface(s) facing the outside (repeatable). Default: every interface that is not
        /// netpath's own, followed as interfaces come and go.
        #[arg(long = "uplink")]
        uplinks: Vec<String>,
        /// On SIGTERM, stop every container's process and take the datapath off every
        /// interface (the default leaves both running for the next daemon to adopt).
        #[arg(long)]
        shutdown_containers: bool,
        /// The resolver configuration whose nameservers the embedded DNS server forwards to.
        #[arg(long, default_value = "/etc/resolv.conf")]
        resolv_conf: PathBuf,
        /// Serve Prometheus metrics at http://ADDR:PORT/metrics (off by default).
        #[arg(long, value_name = "ADDR:PORT")]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Load this eBPF object instead of the embedded one (development and upgrade tests).
        #[arg(long, hide = true)]
        ebpf_object: Option<PathBuf>,
        /// Serve Docker's remote network and IPAM driver API (`docker network create -d
        /// netpath`) on this socket; without PATH, where dockerd looks for plugins.
        #[arg(long, value_name = "PATH", num_args = 0..=1, default_missing_value = crate::docker::DEFAULT_SOCKET)]
        docker_plugin_socket: Option<PathBuf>,
        /// Send known flows through the kernel's forwarding path instead of handing them
        /// straight between uplink and container veth, so that the host's own netfilter
        /// FORWARD rules (iptables, nftables) still see them. Costs throughput.
        #[arg(long)]
        keep_host_firewall: bool,
        /// XDP on the uplinks, ahead of TC: published ports and known flows go straight to the
        /// container's veth and what TC would drop is dropped before the stack sees it; the
        /// rest passes to TC unchanged. `auto`: native on uplinks whose driver has native XDP,
        /// except veths (their frames mostly come from a local stack); TC alone elsewhere.
        /// Switching (a restart with another value) keeps every flow.
        #[arg(long, value_enum, default_value_t = crate::datapath::XdpSetting::Off)]
        xdp: crate::datapath::XdpSetting,
        /// Join a cluster whose state is in etcd (v3 API): overlay networks spanning hosts.
        /// Without it the daemon is single-host on its own state.
        #[arg(long, value_name = "etcd://HOST:PORT[,HOST:PORT...]", requires = "node_ip")]
        cluster_store: Option<String>,
        /// This node's underlay address: where the other nodes send its VXLAN traffic.
        #[arg(long, value_name = "IP", requires = "cluster_store")]
        node_ip: Option<std::net::Ipv4Addr>,
        /// This node's name in the cluster (default: the hostname).
        #[arg(long, value_name = "NAME", requires = "cluster_store")]
        node_name: Option<String>,
        /// Where VXLAN for this node's containers is decapsulated: by the VXLAN device
        /// (`device`, the default: the faster round trip in the quiet bench) or in TC on the
        /// underlay interface ahead of it (`underlay`: non-GSO packets only on this kernel).
        #[arg(long, value_parser = ["device", "underlay"], default_value = "device", requires = "cluster_store")]
        overlay_decap: String,
    },
    /// Cluster nodes (with --cluster-store).
    #[command(subcommand)]
    Node(NodeCmd),
    /// Versions: this CLI, its embedded eBPF object and, if one answers, the daemon's.
    Version,
    /// Manage networks.
    #[command(subcommand)]
    Network(network::NetworkCmd),
    /// Manage services (a VIP per network, load-balanced over tasks in eBPF).
    #[command(subcommand)]
    Service(service::ServiceCmd),
    /// Filter new connections to containers (a DOCKER-USER chain, evaluated in eBPF).
    #[command(subcommand)]
    Firewall(firewall::FirewallCmd),
    /// Datapath diagnostics.
    #[command(subcommand)]
    System(SystemCmd),
    #[command(flatten)]
    Container(container::ContainerCmd),
    /// Internal: builds the template mount namespace for the daemon.
    #[command(name = crate::daemon::process::MOUNT_TEMPLATE, hide = true)]
    MountTemplate { netns_dir: PathBuf },
    /// Internal: starts supervisors for the daemon (its stdin: the daemon's socket).
    #[command(name = crate::daemon::spawner::SPAWNER, hide = true)]
    Spawner,
    /// Internal: supervises a detached container process for the daemon.
    #[command(name = crate::daemon::process::SUPERVISE, hide = true)]
    Supervise {
        exit_file: PathBuf,
        /// Fork, write the supervisor's pid here, and let the first half exit.
        #[arg(long)]
        pid_file: Option<PathBuf>,
        /// Wait for stdin to end before running the command (the daemon is still wiring).
        #[arg(long)]
        hold: bool,
        /// The network namespace to enter first.
        #[arg(long)]
        netns: Option<PathBuf>,
        /// Isolation (see process::Isolation): the template mount namespace to copy...
        #[arg(long)]
        mount_template: Option<PathBuf>,
        /// ... or, without one, the namespace-file directory to unmount in the copy.
        #[arg(long)]
        netns_dir: Option<PathBuf>,
        /// The container's own /etc files and hostname (all four, or no isolation).
        #[arg(long, requires_all = ["hosts", "hostname_file", "hostname"])]
        resolv_conf: Option<PathBuf>,
        #[arg(long)]
        hosts: Option<PathBuf>,
        #[arg(long)]
        hostname_file: Option<PathBuf>,
        #[arg(long)]
        hostname: Option<String>,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// List the cluster's nodes: name, underlay address, liveness (its etcd lease).
    #[command(alias = "list")]
    Ls {
        /// `json`: one JSON object per node and line.
        #[arg(long, value_parser = parse_format, default_value = "table")]
        format: Format,
    },
    /// Forget a node that is down for good: its record and the addresses its containers held
    /// (they stay taken while it is down, as it may come back with them).
    #[command(alias = "remove")]
    Rm { name: String },
}

#[derive(Subcommand)]
enum SystemCmd {
    /// The daemon as JSON: ready (first reconcile done) and how long it took, counts,
    /// uplinks, state and pin directories.
    Info,
    /// Datapath counters as JSON: drops by reason, conntrack activity and size.
    Datapath,
    /// The NAT table as JSON (what each entry matches and rewrites to), or with --follow
    /// flow events as they happen: new flows (as they arrived and as translated), the first
    /// FIN/RST of each, flows that expired, drops with their reason.
    Flows {
        /// Stream events until interrupted (Ctrl-C), one line each.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Only events of this container (any of its addresses, on either side of a flow).
        #[arg(long, requires = "follow")]
        container: Option<String>,
        /// One JSON object per line, as the daemon sends them.
        #[arg(long, requires = "follow")]
        json: bool,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Daemon {
            state_dir,
            bpffs,
            uplinks,
            shutdown_containers,
            resolv_conf,
            metrics_addr,
            ebpf_object,
            docker_plugin_socket,
            keep_host_firewall,
            xdp,
            cluster_store,
            node_ip,
            node_name,
            overlay_decap,
        } => {
            crate::daemon::without_thread_caches();
            let cluster = match cluster_config(cluster_store, node_ip, node_name, overlay_decap == "underlay") {
                Ok(c) => c,
                Err(e) => return fail(e),
            };
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env("NETPATH_LOG").unwrap_or_else(|_| "info".into()),
                )
                .with_writer(std::io::stderr)
                .init();
            let cfg = crate::daemon::Config {
                state_dir,
                socket: cli.socket,
                bpffs,
                uplinks,
                shutdown_containers,
                resolv_conf,
                metrics_addr,
                ebpf_object,
                docker_plugin_socket,
                keep_host_firewall,
                xdp,
                cluster,
            };
            // Much of the daemon's work is syscalls that wait out RCU grace periods (mounts,
            // link and program changes): more workers than CPUs keep a few such waits from
            // stalling every other request.
            crate::daemon::limit_arenas();
            let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads((4 * cpus).max(8))
                // Blocking threads (state fsyncs, flushes) come in bursts, e.g. during a
                // reconcile: let idle ones go soon, with the stacks and arena memory they hold.
                .thread_keep_alive(std::time::Duration::from_secs(1))
                .enable_all()
                .build()
                .expect("tokio runtime");
            match rt.block_on(crate::api::server::run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Cmd::Spawner => ExitCode::from(crate::daemon::spawner::serve() as u8),
        Cmd::MountTemplate { netns_dir } => match crate::daemon::process::mount_template_child(&netns_dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        },
        Cmd::Supervise {
            exit_file,
            pid_file,
            hold,
            netns,
            mount_template,
            netns_dir,
            resolv_conf,
            hosts,
            hostname_file,
            hostname,
            cmd,
        } => {
            let isolation = match (resolv_conf, hosts, hostname_file, hostname) {
                (Some(resolv_conf), Some(hosts), Some(hostname_file), Some(hostname)) => {
                    Some(crate::daemon::process::Isolation {
                        mount_template,
                        netns_dir,
                        resolv_conf,
                        hosts,
                        hostname_file,
                        hostname,
                    })
                }
                _ => None,
            };
            let into = crate::daemon::process::SuperviseIn { netns, isolation };
            let code = crate::daemon::process::supervise(&exit_file, pid_file.as_deref(), hold, &into, &cmd);
            ExitCode::from(u8::try_from(code).unwrap_or(255))
        }
        Cmd::Version => run_client(&cli.socket, |c| async move {
            println!("netpath {}", env!("CARGO_PKG_VERSION"));
            println!("eBPF object: {}", crate::datapath::object_id(crate::datapath::EBPF_OBJECT));
            match c.get("/version").await {
                Ok(v) => {
                    let field = |k: &str| v[k].as_str().unwrap_or("?").to_string();
                    println!("daemon: netpath {}", field("version"));
                    println!("daemon eBPF object: {}", field("ebpf_object"));
                }
                Err(e) => println!("daemon: not reachable ({e:#})"),
            }
            Ok(0)
        }),
        Cmd::Node(NodeCmd::Ls { format }) => run_client(&cli.socket, |c| async move {
            let v = c.get("/nodes").await?;
            let nodes = v.as_array().cloned().unwrap_or_default();
            if format == Format::Json {
                json_lines(&nodes);
                return Ok(0);
            }
            let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
            let rows = nodes
                .iter()
                .map(|n| {
                    let name = if n["Self"] == true { format!("{} *", s(&n["Name"])) } else { s(&n["Name"]) };
                    vec![name, s(&n["Addr"]), s(&n["Status"]), s(&n["Version"])]
                })
                .collect();
            table(&["NAME", "ADDRESS", "STATUS", "VERSION"], rows);
            Ok(0)
        }),
        Cmd::Node(NodeCmd::Rm { name }) => run_client(&cli.socket, |c| async move {
            c.delete(&format!("/nodes/{}", crate::api::client::seg(&name))).await?;
            println!("{name}");
            Ok(0)
        }),
        Cmd::Network(n) => run_client(&cli.socket, |c| async move { network::run(&c, n).await }),
        Cmd::Service(sc) => run_client(&cli.socket, |c| async move { service::run(&c, sc).await }),
        Cmd::Firewall(f) => run_client(&cli.socket, |c| async move { firewall::run(&c, f).await }),
        Cmd::System(SystemCmd::Flows { follow, container, json }) => {
            run_client(&cli.socket, |c| async move { flows::run(&c, follow, container, json).await })
        }
        Cmd::System(sc) => run_client(&cli.socket, |c| async move {
            let path = match sc {
                SystemCmd::Info => "/system/info",
                SystemCmd::Datapath => "/datapath/counters",
                SystemCmd::Flows { .. } => unreachable!("handled above"),
            };
            println!("{}", serde_json::to_string_pretty(&c.get(path).await?)?);
            Ok(0)
        }),
        Cmd::Container(cc) => run_client(&cli.socket, |c| async move { container::run(&c, cc).await }),
    }
}

/// `--cluster-store`, `--node-ip`, `--node-name`, `--overlay-decap` → the cluster's
/// configuration (None without a store).
fn cluster_config(
    store: Option<String>,
    node_ip: Option<std::net::Ipv4Addr>,
    node_name: Option<String>,
    underlay_decap: bool,
) -> anyhow::Result<Option<crate::cluster::ClusterConfig>> {
    let Some(store) = store else { return Ok(None) };
    let endpoints = crate::cluster::parse_store_url(&store)?;
    let node_ip = node_ip.ok_or_else(|| anyhow::anyhow!("--cluster-store needs --node-ip"))?;
    let node_name = match node_name {
        Some(n) => n,
        None => nix::unistd::gethostname()?.to_string_lossy().into_owned(),
    };
    if !crate::dns::valid_name(&node_name) || node_name.contains('/') {
        anyhow::bail!("invalid --node-name {node_name:?}: use letters, digits, '-' and '.'");
    }
    Ok(Some(crate::cluster::ClusterConfig { store, endpoints, node_name, node_ip, underlay_decap }))
}

fn fail(e: anyhow::Error) -> ExitCode {
    eprintln!("Error: {e:#}");
    ExitCode::FAILURE
}

/// Runs a client verb; it returns the process exit code (non-zero codes of commands run by
/// `run`/`exec` pass through).
fn run_client<F, Fut>(socket: &std::path::Path, f: F) -> ExitCode
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<u8>>,
{
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    match rt.block_on(f(Client::new(socket))) {
        Ok(code) => ExitCode::from(code),
        Err(e) => fail(e),
    }
}

/// `--format`: `json` (or Docker's `{{json .}}`) prints one compact JSON object per line for
/// scripts; `table` (the default) the columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Table,
    Json,
}

pub(crate) fn parse_format(s: &str) -> Result<Format, String> {
    match s.trim() {
        "table" => Ok(Format::Table),
        "json" | "{{json .}}" => Ok(Format::Json),
        _ => Err(format!("unsupported format {s:?}: use json, '{{{{json .}}}}' or table")),
    }
}

/// Prints each object on a line of its own (`--format json`).
/// A JSON value as a table cell: strings bare, null empty.
fn s(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        v => v.to_string(),
    }
}

fn json_lines(items: &[serde_json::Value]) {
    for v in items {
        println!("{v}");
    }
}

/// Prints rows as left-aligned columns, like docker's tables (in one buffered write: a
/// line at a time cost a write per row).
fn table(header: &[&str], rows: Vec<Vec<String>>) {
    use std::io::Write;
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, c) in cells.enumerate() {
            if i > 0 {
                l.push_str("   ");
            }
            l.push_str(&format!("{c:<width$}", width = w[i]));
        }
        writeln!(out, "{}", l.trim_end())
    };
    let _ = line(&mut header.iter().copied());
    for r in &rows {
        if line(&mut r.iter().map(String::as_str)).is_err() {
            break; // stdout closed (`| head`): nothing more to print
        }
    }
}
