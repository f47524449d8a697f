//! `netpath network ...`

use anyhow::Result;
use clap::Subcommand;
use serde_json::Value;

use super::table;
use crate::api::client::{Client, seg};
use crate::api::{Connect, Disconnect, NetworkCreate};

#[derive(Subcommand)]
pub enum NetworkCmd {
    /// Create a network.
    Create {
        #[arg(short, long, default_value = "bridge")]
        driver: String,
        /// Subnet in CIDR form; the next free /16 from 172.18.0.0 when omitted.
        #[arg(long)]
        subnet: Option<String>,
        /// Gateway address (default: first address of the subnet).
        #[arg(long)]
        gateway: Option<String>,
        /// Allocate container addresses from this sub-range.
        #[arg(long)]
        ip_range: Option<String>,
        /// Driver option KEY=VALUE (repeatable). bridge:
        /// com.docker.network.bridge.gateway_mode_ipv4=nat|nat-unprotected|routed,
        /// com.docker.network.bridge.enable_icc=true|false,
        /// com.docker.network.bridge.enable_ip_masquerade=true|false,
        /// com.docker.network.driver.mtu=N, com.docker.network.bridge.name=NAME,
        /// netpath.default_deny=true (new flows between its containers need a `netpath
        /// firewall` rule allowing them). macvlan: parent=IFACE[.VID], macvlan_mode=bridge|private|vepa|passthru,
        /// netpath.macvlan.host_access=true (the host reaches the containers).
        /// overlay (needs the daemon's --cluster-store): none; `encrypted` is refused (this
        /// kernel has neither ESP nor WireGuard).
        #[arg(short, long = "opt", value_name = "KEY=VALUE", value_parser = parse_driver_opt)]
        opt: Vec<(String, String)>,
        /// No traffic leaves the network or enters it from outside (bridge).
        #[arg(long)]
        internal: bool,
        /// Metadata KEY=VALUE shown by inspect (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// An address of the subnet IPAM must not hand out, NAME=IP (repeatable).
        #[arg(long = "aux-address", value_name = "NAME=IP", value_parser = parse_opt)]
        aux_addresses: Vec<(String, String)>,
        /// overlay: standalone containers (`run --network`) may join, not only services' tasks.
        #[arg(long)]
        attachable: bool,
        name: String,
    },
    /// Remove every user-defined network no container uses.
    Prune {
        /// Do not ask for confirmation (netpath never asks: accepted for Docker's scripts).
        #[arg(short, long)]
        force: bool,
    },
    /// List networks.
    #[command(alias = "list")]
    Ls {
        /// Only print names.
        #[arg(short, long)]
        quiet: bool,
        /// `json`: one JSON object per network and line.
        #[arg(long, value_parser = super::parse_format, default_value = "table")]
        format: super::Format,
    },
    /// Show one or more networks as JSON.
    Inspect {
        /// `json`: one compact JSON object per line instead of an indented array.
        #[arg(long, value_parser = super::parse_format, default_value = "table")]
        format: super::Format,
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove one or more networks.
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Connect a container to a network (it gets the next ethN).
    Connect {
        #[arg(long)]
        ip: Option<String>,
        /// A DNS name for the container on this network (repeatable).
        #[arg(long = "alias")]
        aliases: Vec<String>,
        network: String,
        container: String,
    },
    /// Disconnect a container from a network.
    Disconnect { network: String, container: String },
}

fn parse_opt(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// `-o KEY=VALUE`, and Docker's valueless overlay flag `-o encrypted` (the daemon refuses it
/// with the reason).
fn parse_driver_opt(s: &str) -> Result<(String, String), String> {
    if s == "encrypted" { Ok((s.to_string(), String::new())) } else { parse_opt(s) }
}

/// Docker takes `--label K` as K with an empty value.
fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').unwrap_or((s, ""));
    if k.is_empty() { Err(format!("{s:?} is not KEY=VALUE")) } else { Ok((k.to_string(), v.to_string())) }
}

fn s(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

pub async fn run(c: &Client, cmd: NetworkCmd) -> Result<u8> {
    match cmd {
        NetworkCmd::Create {
            driver,
            subnet,
            gateway,
            ip_range,
            opt,
            internal,
            labels,
            aux_addresses,
            attachable,
            name,
        } => {
            let req = NetworkCreate {
                name,
                driver: Some(driver),
                subnet,
                gateway,
                ip_range,
                options: opt.into_iter().collect(),
                internal,
                labels: labels.into_iter().collect(),
                aux_addresses: aux_addresses.into_iter().collect(),
                attachable,
            };
            let v = c.post("/networks", &req).await?;
            println!("{}", s(&v["Id"]));
        }
        NetworkCmd::Prune { force: _ } => {
            let v = c.post("/networks/prune", &serde_json::json!({})).await?;
            let gone = v["NetworksDeleted"].as_array().cloned().unwrap_or_default();
            if !gone.is_empty() {
                println!("Deleted Networks:");
                gone.iter().for_each(|n| println!("{}", s(n)));
            }
        }
        NetworkCmd::Ls { quiet, format } => {
            let v = c.get("/networks").await?;
            let nets = v.as_array().cloned().unwrap_or_default();
            if quiet {
                nets.iter().for_each(|n| println!("{}", s(&n["Name"])));
                return Ok(0);
            }
            if format == super::Format::Json {
                super::json_lines(&nets);
                return Ok(0);
            }
            let rows = nets
                .iter()
                .map(|n| {
                    vec![
                        s(&n["Id"]).chars().take(12).collect(),
                        s(&n["Name"]),
                        s(&n["Driver"]),
                        n["IPAM"]["Config"][0]["Subnet"].as_str().unwrap_or("").to_string(),
                    ]
                })
                .collect();
            table(&["NETWORK ID", "NAME", "DRIVER", "SUBNET"], rows);
        }
        NetworkCmd::Inspect { names, format } => {
            let mut out = vec![];
            for n in names {
                out.push(c.get(&format!("/networks/{}", seg(&n))).await?);
            }
            match format {
                super::Format::Json => super::json_lines(&out),
                super::Format::Table => println!("{}", serde_json::to_string_pretty(&out)?),
            }
        }
        NetworkCmd::Rm { names } => {
            let mut failed = false;
            for n in names {
                match c.delete(&format!("/networks/{}", seg(&n))).await {
                    Ok(()) => println!("{n}"),
                    Err(e) => {
                        eprintln!("Error: {e:#}");
                        failed = true;
                    }
                }
            }
            return Ok(u8::from(failed));
        }
        NetworkCmd::Connect { ip, aliases, network, container } => {
            c.post(&format!("/networks/{}/connect", seg(&network)), &Connect { container, ip, aliases }).await?;
        }
        NetworkCmd::Disconnect { network, container } => {
            c.post(&format!("/networks/{}/disconnect", seg(&network)), &Disconnect { container }).await?;
        }
    }
    Ok(0)
}
