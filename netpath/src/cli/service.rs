//! `netpath service ...`: Docker swarm's service verbs, on one host.

use anyhow::{Result, bail};
use clap::Subcommand;
use serde_json::Value;

use super::{s, table};
use crate::api::client::{Client, seg};
use crate::api::{ServiceCreate, ServiceUpdate};

#[derive(Subcommand)]
pub enum ServiceCmd {
    /// Create a service: a VIP on each of its networks spreading connections over its tasks.
    Create {
        /// The service's name: DNS answers it with the VIP, its tasks are NAME.1..N.
        #[arg(long)]
        name: String,
        /// A network of the service (repeatable; at least one).
        #[arg(long = "network", required = true)]
        networks: Vec<String>,
        /// Run N tasks (containers NAME.1..N) with the command after `--`, restarted when they exit.
        #[arg(long, allow_negative_numbers = true)]
        replicas: Option<i64>,
        /// An existing container that joins as a backend (repeatable).
        #[arg(long = "backend")]
        backends: Vec<String>,
        /// published=P,target=T[,protocol=tcp|udp][,mode=ingress|host] (repeatable; mode=host: only
        /// where a task runs, which on one host is where they all run).
        #[arg(long = "publish")]
        publish: Vec<String>,
        /// P:T[/udp], as `--publish` (repeatable).
        #[arg(short = 'p')]
        ports: Vec<String>,
        /// vip (default): one address spreads connections; dnsrr: DNS answers the tasks' addresses.
        #[arg(long)]
        endpoint_mode: Option<String>,
        /// none (default) or client-ip: a client always reaches the same task.
        #[arg(long)]
        affinity: Option<String>,
        /// A task takes connections only while it accepts TCP connections on PORT (checked
        /// every 300 ms; one that stops leaves the tables within a second).
        #[arg(long, value_name = "PORT")]
        health_cmd_tcp: Option<u16>,
        /// The tasks' command and its arguments (after `--`).
        #[arg(last = true)]
        cmd: Vec<String>,
    },
    /// List services.
    #[command(alias = "list")]
    Ls,
    /// Show services as JSON (VIPs per network, ports, tasks).
    Inspect {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// List a service's tasks with their addresses and state.
    Ps { name: String },
    /// Change a service live.
    Update {
        /// Run N tasks (as `service scale NAME=N`).
        #[arg(long, allow_negative_numbers = true)]
        replicas: Option<i64>,
        /// Put the service on one more network: a VIP there, its tasks connected (repeatable).
        #[arg(long)]
        network_add: Vec<String>,
        /// Take the service off a network: its VIP there goes (repeatable).
        #[arg(long)]
        network_rm: Vec<String>,
        /// An existing container that joins as a backend (repeatable).
        #[arg(long)]
        add_backend: Vec<String>,
        /// A backend container that leaves the service (repeatable; the container stays).
        #[arg(long)]
        rm_backend: Vec<String>,
        name: String,
    },
    /// Set replica counts: NAME=N ...
    Scale {
        #[arg(required = true)]
        specs: Vec<String>,
    },
    /// Remove services and their tasks.
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

fn ports(v: &Value) -> String {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|p| match p["PublishedPort"].as_u64() {
            Some(pp) => format!("*:{pp}->{}/{}", p["TargetPort"], s(&p["Protocol"])),
            None => format!("{}/{}", p["TargetPort"], s(&p["Protocol"])),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub async fn run(c: &Client, cmd: ServiceCmd) -> Result<u8> {
    match cmd {
        ServiceCmd::Create {
            name,
            networks,
            replicas,
            backends,
            mut publish,
            ports,
            endpoint_mode,
            affinity,
            health_cmd_tcp,
            cmd,
        } => {
            publish.extend(ports);
            let req = ServiceCreate {
                name,
                networks,
                replicas,
                cmd,
                backends,
                publish,
                endpoint_mode,
                affinity,
                health_tcp: health_cmd_tcp,
            };
            let v = c.post("/services", &req).await?;
            println!("{}", s(&v["ID"]));
        }
        ServiceCmd::Ls => {
            let v = c.get("/services").await?;
            let rows = v
                .as_array()
                .into_iter()
                .flatten()
                .map(|x| {
                    vec![
                        s(&x["ID"]).chars().take(12).collect(),
                        s(&x["Name"]),
                        s(&x["Mode"]),
                        s(&x["Replicas"]),
                        ports(&x["Ports"]),
                    ]
                })
                .collect();
            table(&["ID", "NAME", "MODE", "REPLICAS", "PORTS"], rows);
        }
        ServiceCmd::Inspect { names } => {
            let mut out = vec![];
            for n in names {
                out.push(c.get(&format!("/services/{}", seg(&n))).await?);
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        ServiceCmd::Ps { name } => {
            let v = c.get(&format!("/services/{}/tasks", seg(&name))).await?;
            let rows = v
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| {
                    let addrs: Vec<String> = t["Addresses"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|a| format!("{}={}", s(&a["Network"]), s(&a["Addr"])))
                        .collect();
                    vec![s(&t["Name"]), s(&t["Kind"]), s(&t["State"]), addrs.join(",")]
                })
                .collect();
            table(&["NAME", "KIND", "STATE", "ADDRESSES"], rows);
        }
        ServiceCmd::Update { replicas, network_add, network_rm, add_backend, rm_backend, name } => {
            let req = ServiceUpdate { replicas, network_add, network_rm, add_backend, rm_backend };
            c.post(&format!("/services/{}", seg(&name)), &req).await?;
            println!("{name}");
        }
        ServiceCmd::Scale { specs } => {
            for spec in specs {
                let Some((name, n)) = spec.split_once('=') else { bail!("invalid scale spec {spec:?}: use NAME=N") };
                let Ok(n) = n.parse::<i64>() else { bail!("invalid replicas {n:?} in {spec:?}: use NAME=N") };
                let req = ServiceUpdate { replicas: Some(n), ..Default::default() };
                c.post(&format!("/services/{}", seg(name)), &req).await?;
                println!("{name} scaled to {n}");
            }
        }
        ServiceCmd::Rm { names } => {
            for n in names {
                c.delete(&format!("/services/{}", seg(&n))).await?;
                println!("{n}");
            }
        }
    }
    Ok(0)
}
