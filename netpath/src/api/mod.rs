//! The daemon's HTTP/JSON API on a unix socket (like Docker's), with a typed client.
//! Request bodies are defined here once and used by both sides.

pub mod attach;
pub mod client;
pub mod server;

use serde::{Deserialize, Serialize};

pub const DEFAULT_SOCKET: &str = "/run/netpath.sock";

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkCreate {
    pub name: String,
    pub driver: Option<String>,
    pub subnet: Option<String>,
    pub gateway: Option<String>,
    pub ip_range: Option<String>,
    /// Driver options, as `docker network create -o KEY=VALUE`.
    #[serde(default)]
    pub options: std::collections::BTreeMap<String, String>,
    /// `--internal`: no traffic leaves the network or enters it from outside.
    #[serde(default)]
    pub internal: bool,
    /// `--label K=V`.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// `--aux-address NAME=IP`: addresses IPAM must not hand out.
    #[serde(default)]
    pub aux_addresses: std::collections::BTreeMap<String, String>,
    /// `--attachable` (overlay): standalone containers may join, not only services' tasks.
    #[serde(default)]
    pub attachable: bool,
}

/// `service create`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceCreate {
    pub name: String,
    pub networks: Vec<String>,
    /// Signed so that a negative count gets a clear error rather than a parse failure.
    pub replicas: Option<i64>,
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub backends: Vec<String>,
    /// `published=P,target=T[,protocol=udp]` or `P:T[/udp]`.
    #[serde(default)]
    pub publish: Vec<String>,
    pub endpoint_mode: Option<String>,
    pub affinity: Option<String>,
    /// A task is healthy while it accepts TCP connections on this port.
    pub health_tcp: Option<u16>,
}

/// `service update` and `service scale`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceUpdate {
    pub replicas: Option<i64>,
    #[serde(default)]
    pub network_add: Vec<String>,
    #[serde(default)]
    pub network_rm: Vec<String>,
    #[serde(default)]
    pub add_backend: Vec<String>,
    #[serde(default)]
    pub rm_backend: Vec<String>,
}

/// `firewall add`.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirewallRuleCreate {
    /// Default `rule-<number>`.
    pub name: Option<String>,
    /// `allow` or `deny`.
    pub action: String,
    /// Source CIDR or address; default any.
    pub from: Option<String>,
    pub to_container: Option<String>,
    pub to_network: Option<String>,
    /// `P` or `P-Q`: the destination port(s) as the container sees them.
    pub port: Option<String>,
    /// `tcp`, `udp` or `icmp`.
    pub proto: Option<String>,
    /// Lower first; default 1000. Signed so that a negative one gets a clear error.
    pub priority: Option<i64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerCreate {
    pub name: String,
    /// Defaults to the `bridge` network.
    pub network: Option<String>,
    pub ip: Option<String>,
    pub cmd: Vec<String>,
    /// Run `cmd` supervised by the daemon, output to the container's log.
    #[serde(default)]
    pub detach: bool,
    /// Wire this existing namespace instead of making one (`netpath attach`).
    pub netns: Option<String>,
    /// `-p` specs, as Docker writes them.
    #[serde(default)]
    pub publish: Vec<String>,
    /// `-P`: publish every `expose`d port on a free host port.
    #[serde(default)]
    pub publish_all: bool,
    #[serde(default)]
    pub expose: Vec<String>,
    /// DNS aliases on `network` (`--alias`, user-defined networks only).
    #[serde(default)]
    pub aliases: Vec<String>,
    /// `--dns`: upstream resolver addresses instead of the host's.
    #[serde(default)]
    pub dns: Vec<String>,
    /// `--dns-search`: search domains instead of the host's.
    #[serde(default)]
    pub dns_search: Vec<String>,
    /// `--hostname` (default: the short ID).
    #[serde(default)]
    pub hostname: Option<String>,
    /// The interface's name inside the namespace (default eth0); with `netns` only.
    #[serde(default)]
    pub ifname: Option<String>,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// `--ingress-allow FROM[:PORT]`: only these sources may open connections to it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress_allow: Vec<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Connect {
    pub container: String,
    pub ip: Option<String>,
    /// DNS aliases on this network (`--alias`).
    #[serde(default)]
    pub aliases: Vec<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disconnect {
    pub container: String,
}

/// What the CLI reports about a process it runs in the foreground.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessReport {
    pub pid: Option<u32>,
    pub exit_code: Option<i32>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub message: String,
}
