//! `netpath-cni`: a CNI plugin (spec 1.1; configs of 0.3.1, 0.4.0 and 1.0.0 answered in their
//! own result format) that asks the running daemon to wire the runtime's namespace to a
//! netpath network. The plugin itself holds no state: ADD, DEL, CHECK and GC are single
//! requests on the daemon's socket, keyed by (network, container id, interface name).

mod result;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::attach::{Attach, AttachGc, AttachKey, Attachment, PortMapping, ValidAttachment};
use crate::api::client::{ApiError, Client, Unreachable};

/// Every version this plugin answers, oldest first (VERSION lists them all).
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.1", "0.4.0", "1.0.0", "1.1.0"];
const LATEST: &str = "1.1.0";

/// The spec's error codes (SPEC.md, "Error").
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot serve ADDs now.
    pub const NOT_AVAILABLE: u32 = 50;
    /// netpath's own (100+): the daemon refused or failed the request.
    pub const DAEMON: u32 = 100;
}

#[derive(Debug)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

fn err(code: u32, msg: impl Into<String>) -> CniError {
    CniError { code, msg: msg.into(), details: String::new() }
}

impl CniError {
    pub fn to_json(&self, version: &str) -> Value {
        json!({ "cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details })
    }
}

/// A daemon failure as a CNI error: no daemon means "try again later" (it may be starting),
/// a refused request is the config's fault.
fn daemon_err(e: anyhow::Error) -> CniError {
    if let Some(u) = e.downcast_ref::<Unreachable>() {
        return CniError {
            code: code::TRY_AGAIN_LATER,
            msg: "the netpath daemon is not running".into(),
            details: u.0.clone(),
        };
    }
    match e.downcast_ref::<ApiError>() {
        Some(a) if a.status == 400 || a.status == 404 => err(code::INVALID_CONFIG, a.message.clone()),
        Some(a) => err(code::DAEMON, a.message.clone()),
        None => {
            CniError { code: code::IO_FAILURE, msg: "talking to the netpath daemon".into(), details: format!("{e:#}") }
        }
    }
}

/// The environment a runtime sets (SPEC.md, "Parameters").
#[derive(Debug, Default, Clone)]
pub struct Env {
    pub command: String,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
}

impl Env {
    pub fn from_process() -> Self {
        let v = |k: &str| std::env::var(k).ok().filter(|s| !s.is_empty());
        Env {
            command: v("CNI_COMMAND").unwrap_or_default(),
            container_id: v("CNI_CONTAINERID"),
            netns: v("CNI_NETNS"),
            ifname: v("CNI_IFNAME"),
            args: v("CNI_ARGS"),
        }
    }

    fn require(&self, what: &str, v: &Option<String>) -> Result<String, CniError> {
        v.clone().ok_or_else(|| err(code::INVALID_ENV, format!("{what} is required for {}", self.command)))
    }

    fn container_id(&self) -> Result<String, CniError> {
        let id = self.require("CNI_CONTAINERID", &self.container_id)?;
        // The spec's rule: alphanumerics, underscore, dot and hyphen, starting alphanumeric.
        let ok = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && id.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !ok {
            return Err(err(code::INVALID_ENV, format!("invalid CNI_CONTAINERID {id:?}")));
        }
        Ok(id)
    }

    fn ifname(&self) -> Result<String, CniError> {
        let n = self.require("CNI_IFNAME", &self.ifname)?;
        let ok = n.len() < 16
            && n != "."
            && n != ".."
            && !n.chars().any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
        if !ok {
            return Err(err(code::INVALID_ENV, format!("invalid CNI_IFNAME {n:?}")));
        }
        Ok(n)
    }

    /// `IP=a.b.c.d` in CNI_ARGS (the convention of the reference IPAM plugins).
    fn requested_ip(&self) -> Option<String> {
        self.args.as_deref()?.split(';').find_map(|kv| kv.strip_prefix("IP=")).map(str::to_string)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RuntimeConfig {
    #[serde(default)]
    port_mappings: Vec<PortMapping>,
    /// The `ips` capability: a fixed address (the first IPv4 one, prefix ignored).
    #[serde(default)]
    ips: Vec<String>,
}

/// The network configuration on stdin (SPEC.md "Network configuration" plus netpath's keys).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// The daemon's API socket.
    pub socket: Option<PathBuf>,
    /// The netpath network; default: the config's `name`.
    pub network: Option<String>,
    /// Create the network with these when it does not exist yet.
    pub subnet: Option<String>,
    pub gateway: Option<String>,
    #[serde(default)]
    runtime_config: RuntimeConfig,
    pub prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<GcAttachment>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GcAttachment {
    #[serde(rename = "containerID")]
    container_id: String,
    ifname: String,
}

impl NetConf {
    fn network(&self) -> &str {
        self.network.as_deref().unwrap_or(&self.name)
    }
    fn client(&self) -> Client {
        Client::new(self.socket.as_deref().unwrap_or(Path::new(crate::api::DEFAULT_SOCKET)))
    }
}

/// "1.0.0" → (1, 0, 0); anything else sorts below every real version.
fn ver(v: &str) -> (u32, u32, u32) {
    let mut p = v.split('.').map(|x| x.parse::<u32>().unwrap_or(0));
    (p.next().unwrap_or(0), p.next().unwrap_or(0), p.next().unwrap_or(0))
}

/// Parses stdin. Fields are checked here, so a bad config fails before anything is asked.
pub fn parse_conf(stdin: &[u8]) -> Result<NetConf, CniError> {
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| CniError {
        code: code::DECODE,
        msg: "invalid network configuration JSON".into(),
        details: e.to_string(),
    })?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError {
            code: code::INCOMPATIBLE_VERSION,
            msg: format!("unsupported cniVersion {:?}", conf.cni_version),
            details: format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        });
    }
    if conf.name.is_empty() {
        return Err(err(code::INVALID_CONFIG, "the network configuration has no name"));
    }
    if conf.gateway.is_some() && conf.subnet.is_none() {
        return Err(err(code::INVALID_CONFIG, "gateway needs subnet"));
    }
    Ok(conf)
}

/// Runs one command. Ok(Some) is the JSON to print, Ok(None) prints nothing.
pub async fn run(env: &Env, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    if env.command == "VERSION" {
        // The runtime may send {"cniVersion": ...}; the answer is the same whatever it asked.
        return Ok(Some(json!({ "cniVersion": LATEST, "supportedVersions": SUPPORTED_VERSIONS })));
    }
    let conf = parse_conf(stdin)?;
    let v = ver(&conf.cni_version);
    let needs = |min: (u32, u32, u32), what: &str| {
        if v < min {
            Err(err(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "{what} needs cniVersion {}.{}.{} or later, the config has {}",
                    min.0, min.1, min.2, conf.cni_version
                ),
            ))
        } else {
            Ok(())
        }
    };
    match env.command.as_str() {
        "ADD" => add(env, &conf).await.map(Some),
        "DEL" => del(env, &conf).await.map(|_| None),
        "CHECK" => {
            needs((0, 4, 0), "CHECK")?;
            check(env, &conf).await.map(|_| None)
        }
        "GC" => {
            needs((1, 1, 0), "GC")?;
            gc(&conf).await.map(|_| None)
        }
        "STATUS" => {
            needs((1, 1, 0), "STATUS")?;
            status(&conf).await.map(|_| None)
        }
        "" => Err(err(code::INVALID_ENV, "CNI_COMMAND is not set")),
        c => Err(err(code::INVALID_ENV, format!("unknown CNI_COMMAND {c:?}"))),
    }
}

fn key(env: &Env, conf: &NetConf) -> Result<AttachKey, CniError> {
    Ok(AttachKey { network: conf.network().to_string(), container_id: env.container_id()?, ifname: env.ifname()? })
}

async fn add(env: &Env, conf: &NetConf) -> Result<Value, CniError> {
    let key = key(env, conf)?;
    let netns = env.require("CNI_NETNS", &env.netns)?;
    if !crate::netlink::netns::is_mounted(Path::new(&netns)) {
        return Err(err(code::UNKNOWN_CONTAINER, format!("CNI_NETNS {netns} is not a network namespace")));
    }
    let ip = env.requested_ip().or_else(|| {
        conf.runtime_config.ips.iter().find_map(|s| {
            let a = s.split('/').next()?;
            a.parse::<std::net::Ipv4Addr>().ok().map(|a| a.to_string())
        })
    });
    let req = Attach {
        key,
        netns,
        subnet: conf.subnet.clone(),
        gateway: conf.gateway.clone(),
        ip,
        ports: conf.runtime_config.port_mappings.clone(),
    };
    let v = conf.client().post("/attachments", &req).await.map_err(daemon_err)?;
    let a: Attachment = serde_json::from_value(v).map_err(|e| CniError {
        code: code::DECODE,
        msg: "unexpected answer from the daemon".into(),
        details: e.to_string(),
    })?;
    result::build(&conf.cni_version, &a, conf.prev_result.as_ref())
}

async fn del(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    let key = key(env, conf)?;
    let path = format!("/attachments?{}", key.query());
    conf.client().delete(&path).await.map_err(daemon_err)
}

/// CHECK: the daemon still has the attachment, and the interface in the namespace still has
/// the address and MAC it was given (and that prevResult says it has).
async fn check(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    let key = key(env, conf)?;
    let netns = env.require("CNI_NETNS", &env.netns)?;
    let v = conf.client().get(&format!("/attachments?{}", key.query())).await.map_err(|e| {
        let mut e = daemon_err(e);
        if e.code == code::INVALID_CONFIG {
            e.code = code::UNKNOWN_CONTAINER;
        }
        e
    })?;
    let a: Attachment = serde_json::from_value(v).map_err(|e| CniError {
        code: code::DECODE,
        msg: "unexpected answer from the daemon".into(),
        details: e.to_string(),
    })?;
    let fail = |m: String| err(code::DAEMON, m);
    let same_ns = crate::netlink::netns::inode(Path::new(&netns));
    if same_ns.is_none() || same_ns != crate::netlink::netns::inode(Path::new(&a.netns)) {
        return Err(fail(format!("{} is attached in {}, not in {netns}", key.ifname, a.netns)));
    }
    if let Some(prev) = &conf.prev_result {
        let want = format!("{}/{}", a.ip, a.prefix);
        let listed = prev["ips"].as_array().into_iter().flatten().any(|i| i["address"] == want.as_str());
        if !listed {
            return Err(fail(format!("prevResult does not list {want}")));
        }
    }
    let nl = crate::netlink::Netlink::in_netns(Path::new(&netns)).map_err(|e| fail(format!("{e:#}")))?;
    let links = nl.links().await.map_err(|e| fail(format!("{e:#}")))?;
    let link = links
        .iter()
        .find(|l| l.name == key.ifname)
        .ok_or_else(|| fail(format!("{} is missing in {netns}", key.ifname)))?;
    let mac = link.mac.as_deref().and_then(|m| <[u8; 6]>::try_from(m).ok()).map(|m| crate::ipam::format_mac(&m));
    if mac.as_deref() != Some(a.mac.as_str()) {
        return Err(fail(format!("{} has MAC {mac:?}, expected {}", key.ifname, a.mac)));
    }
    let addrs = nl.addresses_v4(Some(link.index)).await.map_err(|e| fail(format!("{e:#}")))?;
    if !addrs.iter().any(|(ip, p)| ip.to_string() == a.ip && *p == a.prefix) {
        return Err(fail(format!("{} lost its address {}/{}", key.ifname, a.ip, a.prefix)));
    }
    Ok(())
}

async fn gc(conf: &NetConf) -> Result<(), CniError> {
    let valid = conf
        .valid_attachments
        .iter()
        .flatten()
        .map(|v| ValidAttachment { container_id: v.container_id.clone(), ifname: v.ifname.clone() })
        .collect();
    let req = AttachGc { network: conf.network().to_string(), valid };
    conf.client().post("/attachments/gc", &req).await.map_err(daemon_err).map(drop)
}

async fn status(conf: &NetConf) -> Result<(), CniError> {
    match conf.client().request(hyper::Method::GET, "/_ping", None::<&()>).await {
        Ok(_) => Ok(()),
        Err(e) => Err(CniError {
            code: code::NOT_AVAILABLE,
            msg: "the netpath daemon is not available".into(),
            details: format!("{e:#}"),
        }),
    }
}

/// The plugin's entry point: env and stdin in, result or error JSON on stdout.
pub fn main() -> ExitCode {
    let env = Env::from_process();
    let mut stdin = vec![];
    // VERSION may come with nothing on stdin; every other command fails on the empty config.
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let version = serde_json::from_slice::<Value>(&stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_string))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| LATEST.to_string());
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return print_err(&version, &err(code::IO_FAILURE, format!("starting the runtime: {e}"))),
    };
    match rt.block_on(run(&env, &stdin)) {
        Ok(Some(v)) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => print_err(&version, &e),
    }
}

fn print_err(version: &str, e: &CniError) -> ExitCode {
    println!("{}", e.to_json(version));
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests;
