//! `netpath firewall ...`: rules on new connections to containers, evaluated in eBPF.

use anyhow::Result;
use clap::{ArgGroup, Subcommand};
use serde_json::Value;

use super::{Format, table};
use crate::api::FirewallRuleCreate;
use crate::api::client::{Client, seg};

#[derive(Subcommand)]
pub enum FirewallCmd {
    /// Add a rule. Rules apply to new connections to containers: from outside (published
    /// ports, routed access), from other networks, and, for rules naming a container or on a
    /// network with -o netpath.default_deny=true, from its own network. The first matching
    /// rule by priority decides; with none, the connection is allowed (as Docker). Ports are
    /// the container's (after a published port's translation, as DOCKER-USER sees them).
    #[command(group(ArgGroup::new("verdict").required(true).args(["allow", "deny"])))]
    Add {
        /// The rule's name (default rule-<number>).
        #[arg(long)]
        name: Option<String>,
        /// Let matching connections through.
        #[arg(long)]
        allow: bool,
        /// Drop matching connections (counted as policy-denied, the flow log names the rule).
        #[arg(long)]
        deny: bool,
        /// Source CIDR or address (default: any).
        #[arg(long, value_name = "CIDR")]
        from: Option<String>,
        /// Only connections to this container.
        #[arg(long, value_name = "NAME", conflicts_with = "to_network")]
        to_container: Option<String>,
        /// Only connections to containers of this network.
        #[arg(long, value_name = "NET")]
        to_network: Option<String>,
        /// Destination port or range P-Q (TCP and UDP unless --proto says which).
        #[arg(long, value_name = "P[-Q]")]
        port: Option<String>,
        /// tcp, udp or icmp (default: any protocol).
        #[arg(long)]
        proto: Option<String>,
        /// Lower numbers are evaluated first (0-65535, default 1000; ties: older first).
        #[arg(long, value_name = "N", allow_negative_numbers = true)]
        priority: Option<i64>,
    },
    /// List rules in evaluation order.
    #[command(alias = "list")]
    Ls {
        /// `table` (default) or `json` (one object per line).
        #[arg(long, value_parser = super::parse_format, default_value = "table")]
        format: Format,
    },
    /// Remove rules (established connections they denied may be opened again).
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "any".into(),
        v => v.to_string(),
    }
}

pub async fn run(c: &Client, cmd: FirewallCmd) -> Result<u8> {
    match cmd {
        FirewallCmd::Add { name, allow, deny: _, from, to_container, to_network, port, proto, priority } => {
            let req = FirewallRuleCreate {
                name,
                action: if allow { "allow" } else { "deny" }.into(),
                from,
                to_container,
                to_network,
                port,
                proto,
                priority,
            };
            let v = c.post("/firewall/rules", &req).await?;
            for r in v.as_array().into_iter().flatten() {
                println!("{}", s(&r["Name"]));
            }
        }
        FirewallCmd::Ls { format } => {
            let v = c.get("/firewall/rules").await?;
            let rules = v.as_array().cloned().unwrap_or_default();
            if format == Format::Json {
                super::json_lines(&rules);
                return Ok(0);
            }
            let rows = rules
                .iter()
                .map(|r| {
                    vec![
                        s(&r["Name"]),
                        s(&r["Action"]),
                        s(&r["From"]),
                        s(&r["To"]),
                        s(&r["Ports"]),
                        s(&r["Protocol"]),
                        s(&r["Priority"]),
                    ]
                })
                .collect();
            table(&["NAME", "ACTION", "FROM", "TO", "PORTS", "PROTO", "PRIORITY"], rows);
        }
        FirewallCmd::Rm { names } => {
            for n in names {
                c.delete(&format!("/firewall/rules/{}", seg(&n))).await?;
                println!("{n}");
            }
        }
    }
    Ok(0)
}
