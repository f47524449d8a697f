//! `netpath run | exec | ps | inspect | rm | stop | logs | attach`

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use hyper::Method;
use serde_json::Value;

use super::{s, table};
use crate::api::client::{Client, seg};
use crate::api::{ContainerCreate, ProcessReport};
use crate::daemon::process;

#[derive(Subcommand)]
pub enum ContainerCmd {
    /// Create a container (a network namespace) wired to a network and run a command in it.
    Run {
        /// Run in the background, supervised by the daemon (output: `netpath logs`).
        #[arg(short, long)]
        detach: bool,
        /// Remove the container when the command exits (foreground only).
        #[arg(long, conflicts_with = "detach")]
        rm: bool,
        /// The container's name (it resolves on user-defined networks).
        #[arg(long)]
        name: String,
        /// bridge (default), host, none or a user-defined network.
        #[arg(long)]
        network: Option<String>,
        /// Join this service as one of its backends (on its first network unless --network).
        #[arg(long)]
        service: Option<String>,
        /// Static IPv4 address on that network.
        #[arg(long)]
        ip: Option<String>,
        /// Publish a port: [HOSTIP:][HOSTPORT[-END]:]CONTAINERPORT[-END][/tcp|/udp] (repeatable).
        #[arg(short = 'p', long = "publish")]
        publish: Vec<String>,
        /// Publish every --expose'd port on a free host port.
        #[arg(short = 'P', long)]
        publish_all: bool,
        /// A port the container serves: PORT[-END][/tcp|/udp] (repeatable; used by -P).
        #[arg(long)]
        expose: Vec<String>,
        /// A DNS name for the container on its network (repeatable; user-defined networks).
        #[arg(long = "alias", alias = "network-alias")]
        aliases: Vec<String>,
        /// An upstream DNS server for the container instead of the host's (repeatable).
        #[arg(long)]
        dns: Vec<String>,
        /// A DNS search domain for the container instead of the host's (repeatable).
        #[arg(long)]
        dns_search: Vec<String>,
        /// The container's host name (default: its short ID).
        #[arg(long)]
        hostname: Option<String>,
        /// Only sources in FROM (a CIDR or an address) may open connections to the container,
        /// on PORT (TCP and UDP) if given (repeatable); everyone else is denied, counted as
        /// policy-denied. Firewall rules (`netpath firewall`) are evaluated first.
        #[arg(long, value_name = "FROM[:PORT]")]
        ingress_allow: Vec<String>,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Run a command inside a container's network namespace.
    Exec {
        name: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// List containers (running ones; -a for all).
    Ps {
        #[arg(short, long)]
        all: bool,
        /// `json`: one JSON object per container and line.
        #[arg(long, value_parser = super::parse_format, default_value = "table")]
        format: super::Format,
    },
    /// Show one or more containers as JSON (addresses, interfaces, datapath counters).
    Inspect {
        /// `json`: one compact JSON object per line instead of an indented array.
        #[arg(long, value_parser = super::parse_format, default_value = "table")]
        format: super::Format,
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove containers, with every link, address and allocation they had.
    Rm {
        /// Stop a running container first.
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Stop a container's process (SIGTERM, then SIGKILL after 5s).
    Stop {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Print a detached container's output.
    Logs { name: String },
    /// List a container's published ports, like `docker port`.
    Port { name: String },
    /// Wire an existing network namespace as a container (for runtimes and tests).
    Attach {
        #[arg(long)]
        netns: String,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "bridge")]
        network: String,
        #[arg(long)]
        ip: Option<String>,
    },
}

/// How the daemon says a container's processes are isolated (its inspect JSON): their own
/// /etc files and hostname, except on the host network.
fn isolation(v: &Value) -> Option<process::Isolation> {
    if v["HostConfig"]["NetworkMode"] == "host" {
        return None;
    }
    let path = |k: &str| v[k].as_str().filter(|s| !s.is_empty()).map(PathBuf::from);
    Some(process::Isolation {
        mount_template: path("MountTemplate"),
        netns_dir: path("NetnsDir"),
        resolv_conf: path("ResolvConfPath")?,
        hosts: path("HostsPath")?,
        hostname_file: path("HostnamePath")?,
        hostname: v["Config"]["Hostname"].as_str()?.to_string(),
    })
}

/// Runs `cmd` in container `v`'s namespace with the terminal's stdio; returns its exit code.
fn run_in(v: &Value, cmd: &[String], on_start: impl FnOnce(u32)) -> Result<i32> {
    let (prog, args) = cmd.split_first().context("no command given")?;
    let fd = process::open_netns(Path::new(&s(&v["NetworkSettings"]["SandboxKey"])))?;
    let mut c = std::process::Command::new(prog);
    c.args(args);
    process::enter_in_child(&mut c, Some(fd), isolation(v).as_ref(), false)?;
    let mut child = c.spawn().with_context(|| format!("starting {prog:?}"))?;
    on_start(child.id());
    let st = child.wait()?;
    use std::os::unix::process::ExitStatusExt;
    Ok(st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0)))
}

fn exit_byte(code: i32) -> u8 {
    u8::try_from(code).unwrap_or(1)
}

pub async fn run(c: &Client, cmd: ContainerCmd) -> Result<u8> {
    match cmd {
        ContainerCmd::Run {
            detach,
            rm,
            name,
            network,
            ip,
            publish,
            publish_all,
            expose,
            aliases,
            dns,
            dns_search,
            hostname,
            ingress_allow,
            cmd,
            service,
        } => {
            let network = match (&network, &service) {
                (Some(n), _) => n.clone(),
                (None, Some(svc)) => {
                    let v = c.get(&format!("/services/{}", seg(svc))).await?;
                    s(&v["Spec"]["TaskTemplate"]["Networks"][0]["Name"])
                }
                (None, None) => "bridge".to_string(),
            };
            let req = ContainerCreate {
                name: name.clone(),
                network: Some(network),
                ip,
                cmd: cmd.clone(),
                detach,
                publish,
                publish_all,
                expose,
                aliases,
                dns,
                dns_search,
                hostname,
                ingress_allow,
                ..Default::default()
            };
            let v = c.post("/containers", &req).await?;
            for w in v["Warnings"].as_array().into_iter().flatten() {
                eprintln!("WARNING: {}", s(w));
            }
            if let Some(svc) = &service {
                let join = crate::api::ServiceUpdate { add_backend: vec![name.clone()], ..Default::default() };
                if let Err(e) = c.post(&format!("/services/{}", seg(svc)), &join).await {
                    let _ = c.delete(&format!("/containers/{}?force=true", seg(&name))).await;
                    return Err(e.context(format!("joining service {svc}")));
                }
            }
            if detach {
                if v["State"]["Error"].as_str().is_some_and(|e| !e.is_empty()) {
                    bail!("container {name} created but its command failed to start: see `netpath logs {name}`");
                }
                println!("{}", s(&v["Id"]));
                return Ok(0);
            }
            let path = format!("/containers/{}/process", seg(&name));
            let mut pid = None;
            let code = run_in(&v, &cmd, |p| pid = Some(p));
            if let Some(p) = pid {
                // Best effort: the container's status is informational.
                let _ = c.post(&path, &ProcessReport { pid: Some(p), exit_code: None }).await;
            }
            let code = match code {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("Error: {e:#}");
                    127
                }
            };
            let _ = c.post(&path, &ProcessReport { pid: None, exit_code: Some(code) }).await;
            if rm {
                c.delete(&format!("/containers/{}?force=true", seg(&name))).await?;
            }
            Ok(exit_byte(code))
        }
        ContainerCmd::Exec { name, cmd } => {
            let v = c.get(&format!("/containers/{}", seg(&name))).await?;
            Ok(exit_byte(run_in(&v, &cmd, |_| {})?))
        }
        ContainerCmd::Ps { all, format } => {
            let body = c.request(Method::GET, &format!("/containers?all={all}"), None::<&()>).await?;
            if format == super::Format::Json {
                let v: Vec<Value> = serde_json::from_slice(&body).context("the daemon sent invalid JSON")?;
                super::json_lines(&v);
                return Ok(0);
            }
            // Typed, not a JSON tree: ten thousand rows parse in milliseconds.
            let list: Vec<PsEntry> = serde_json::from_slice(&body).context("the daemon sent invalid JSON")?;
            let rows = list.iter().map(PsEntry::row).collect();
            table(&["CONTAINER ID", "NAME", "STATUS", "NETWORKS", "IP ADDRESS", "COMMAND"], rows);
            Ok(0)
        }
        ContainerCmd::Inspect { names, format } => {
            let mut out = vec![];
            for n in names {
                out.push(c.get(&format!("/containers/{}", seg(&n))).await?);
            }
            match format {
                super::Format::Json => super::json_lines(&out),
                super::Format::Table => println!("{}", serde_json::to_string_pretty(&out)?),
            }
            Ok(0)
        }
        ContainerCmd::Rm { force, names } => {
            let mut failed = false;
            for n in names {
                match c.delete(&format!("/containers/{}?force={force}", seg(&n))).await {
                    Ok(()) => println!("{n}"),
                    Err(e) => {
                        eprintln!("Error: {e:#}");
                        failed = true;
                    }
                }
            }
            Ok(u8::from(failed))
        }
        ContainerCmd::Stop { names } => {
            for n in names {
                c.post(&format!("/containers/{}/stop", seg(&n)), &()).await?;
                println!("{n}");
            }
            Ok(0)
        }
        ContainerCmd::Logs { name } => {
            let b = c.request(Method::GET, &format!("/containers/{}/logs", seg(&name)), None::<&()>).await?;
            use std::io::Write;
            std::io::stdout().write_all(&b)?;
            Ok(0)
        }
        ContainerCmd::Port { name } => {
            let v = c.get(&format!("/containers/{}/ports", seg(&name))).await?;
            let bindings: Vec<crate::ports::Binding> = serde_json::from_value(v)?;
            for b in bindings {
                println!("{b}");
            }
            Ok(0)
        }
        ContainerCmd::Attach { netns, name, network, ip } => {
            let netns = std::fs::canonicalize(&netns).with_context(|| format!("--netns {netns}"))?;
            let v = c
                .post(
                    "/containers",
                    &ContainerCreate {
                        name,
                        network: Some(network),
                        ip,
                        cmd: vec![],
                        netns: Some(netns.display().to_string()),
                        ..Default::default()
                    },
                )
                .await?;
            println!("{}", s(&v["Id"]));
            Ok(0)
        }
    }
}

/// A `ps` row as the daemon sends it (the fields of `inspect` that `ps` shows).
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PsEntry {
    id: String,
    name: String,
    state: PsState,
    #[serde(default)]
    config: PsConfig,
    #[serde(default)]
    network_settings: PsSettings,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PsState {
    status: String,
    exit_code: Option<i64>,
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct PsConfig {
    #[serde(default)]
    cmd: Option<Vec<String>>,
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct PsSettings {
    #[serde(default)]
    networks: std::collections::BTreeMap<String, PsAddr>,
}

#[derive(serde::Deserialize)]
struct PsAddr {
    #[serde(rename = "IPAddress", default)]
    ip: Option<String>,
}

impl PsEntry {
    fn row(&self) -> Vec<String> {
        let nets = &self.network_settings.networks;
        let ips: Vec<&str> = nets.values().filter_map(|n| n.ip.as_deref()).filter(|ip| !ip.is_empty()).collect();
        let status = match (self.state.status.as_str(), self.state.exit_code) {
            ("exited", Some(n)) => format!("exited ({n})"),
            (st, _) => st.to_string(),
        };
        vec![
            self.id.chars().take(12).collect(),
            self.name.clone(),
            status,
            nets.keys().map(String::as_str).collect::<Vec<_>>().join(","),
            ips.join(","),
            self.config.cmd.as_deref().unwrap_or_default().join(" "),
        ]
    }
}
