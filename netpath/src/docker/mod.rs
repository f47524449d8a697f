//! Docker's remote network driver and IPAM driver plugin API (moby's libnetwork
//! `docs/remote.md` and `docs/ipam.md`), served by the daemon on its own unix socket
//! (`--docker-plugin-socket`), where dockerd discovers it as the `netpath` plugin:
//! `docker network create -d netpath --ipam-driver netpath NAME`.
//!
//! Networks and joined endpoints live in the daemon's state like any other; what only
//! exists between dockerd's calls (IPAM pools and addresses, endpoints created but not yet
//! joined) is kept in one small file of the state dir, rewritten on each change, so a
//! restarted daemon answers dockerd as before.

mod ipam;

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::api::NetworkCreate;
use crate::daemon::Shared;
use crate::error::Error;
use crate::ports::{Proto, Publish};

pub const DEFAULT_SOCKET: &str = "/run/docker/plugins/netpath.sock";
/// dockerd's plugin protocol media type.
pub const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1.2+json";

/// The netpath network standing for a Docker network.
pub fn network_name(network_id: &str) -> String {
    format!("docker-{}", &network_id[..network_id.len().min(12)])
}

/// An endpoint between CreateEndpoint and DeleteEndpoint.
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
struct Endpoint {
    network_id: String,
    ip: Ipv4Addr,
    mac: Option<[u8; 6]>,
}

pub struct Plugin {
    daemon: Shared,
    file: PathBuf,
    state: Mutex<Saved>,
}

/// What the plugin keeps between calls.
#[derive(Debug, Default, serde::Serialize, Deserialize)]
struct Saved {
    endpoints: HashMap<String, Endpoint>,
    ipam: ipam::Pools,
}

impl Plugin {
    /// Writes the plugin's state (tmp + rename: a crash leaves the old or the new file).
    fn save(&self, s: &Saved) -> Result<(), Answer> {
        let tmp = self.file.with_extension("tmp");
        let write = || -> anyhow::Result<()> {
            std::fs::write(&tmp, serde_json::to_vec(s)?)?;
            std::fs::rename(&tmp, &self.file)?;
            Ok(())
        };
        write().map_err(|e| Error::Internal(e.context("saving the docker plugin's state")).into())
    }
}

type Plug = Arc<Plugin>;

/// A plugin answer: JSON in dockerd's media type; failures as `{"Err": "..."}`.
#[derive(Debug)]
struct Answer(StatusCode, Value);

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        (self.0, [(header::CONTENT_TYPE, CONTENT_TYPE)], self.1.to_string()).into_response()
    }
}

impl From<Error> for Answer {
    fn from(e: Error) -> Self {
        if let Error::Internal(e) = &e {
            warn!("docker plugin request failed: {e:#}");
        }
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Answer(status, json!({ "Err": e.to_string() }))
    }
}

type Reply = Result<Answer, Answer>;

fn ok(v: Value) -> Reply {
    Ok(Answer(StatusCode::OK, v))
}

fn parse<T: DeserializeOwned>(b: &Bytes) -> Result<T, Answer> {
    // dockerd sends `null` bodies for argument-less calls.
    let b: &[u8] = if b.is_empty() { b"{}" } else { b };
    serde_json::from_slice(b).map_err(|e| Error::BadRequest(format!("invalid request body: {e}")).into())
}

pub fn router(daemon: Shared) -> anyhow::Result<Router> {
    let file = daemon.config().state_dir.join("docker-plugin.json");
    let state = match std::fs::read(&file) {
        Ok(b) => serde_json::from_slice(&b).with_context(|| format!("reading {}", file.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Saved::default(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    let plug = Arc::new(Plugin { daemon, file, state: Mutex::new(state) });
    Ok(Router::new().route("/{method}", post(dispatch)).with_state(plug))
}

/// Serves the plugin API on `socket` until the daemon stops.
pub async fn serve(daemon: Shared, socket: &Path) -> anyhow::Result<()> {
    if socket.exists() {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            anyhow::bail!("another process serves the docker plugin socket {}", socket.display());
        }
        std::fs::remove_file(socket).with_context(|| format!("removing stale socket {}", socket.display()))?;
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let router = router(daemon)?;
    let l = tokio::net::UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    info!("docker network and IPAM plugin API on {}", socket.display());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(l, router).await {
            warn!("docker plugin API: {e}");
        }
    });
    Ok(())
}

async fn dispatch(State(p): State<Plug>, UrlPath(method): UrlPath<String>, b: Bytes) -> Response {
    let r = match method.as_str() {
        "Plugin.Activate" => ok(json!({ "Implements": ["NetworkDriver", "IpamDriver"] })),
        "NetworkDriver.GetCapabilities" => {
            // In a cluster (etcd) the networks are the cluster's: dockerd then keeps one network
            // for every node, as with its own overlay driver.
            let scope = if p.daemon.clustered() { "global" } else { "local" };
            ok(json!({ "Scope": scope, "ConnectivityScope": scope }))
        }
        "NetworkDriver.CreateNetwork" => p.create_network(&b).await,
        "NetworkDriver.DeleteNetwork" => p.delete_network(&b).await,
        "NetworkDriver.CreateEndpoint" => p.create_endpoint(&b),
        "NetworkDriver.EndpointOperInfo" => ok(json!({ "Value": {} })),
        "NetworkDriver.DeleteEndpoint" => p.delete_endpoint(&b).await,
        "NetworkDriver.Join" => p.join(&b).await,
        "NetworkDriver.Leave" => ok(json!({})),
        "NetworkDriver.ProgramExternalConnectivity" => p.program(&b).await,
        "NetworkDriver.RevokeExternalConnectivity" => p.revoke(&b).await,
        "NetworkDriver.DiscoverNew" | "NetworkDriver.DiscoverDelete" => ok(json!({})),
        "NetworkDriver.AllocateNetwork" | "NetworkDriver.FreeNetwork" => ok(json!({})),
        m if m.starts_with("IpamDriver.") => p.ipam(m, &b),
        m => Err(Answer(StatusCode::NOT_FOUND, json!({ "Err": format!("unknown method {m}") }))),
    };
    match r {
        Ok(a) | Err(a) => a.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct IpamData {
    #[serde(default)]
    pool: String,
    #[serde(default)]
    gateway: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CreateNetwork {
    #[serde(rename = "NetworkID")]
    network_id: String,
    #[serde(default)]
    options: Value,
    #[serde(default, rename = "IPv4Data")]
    ipv4_data: Option<Vec<IpamData>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NetworkRef {
    #[serde(rename = "NetworkID")]
    network_id: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct Interface {
    #[serde(default)]
    address: String,
    #[serde(default, rename = "AddressIPv6")]
    address_ipv6: String,
    #[serde(default)]
    mac_address: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct EndpointReq {
    #[serde(rename = "NetworkID")]
    network_id: String,
    #[serde(rename = "EndpointID")]
    endpoint_id: String,
    #[serde(default)]
    interface: Option<Interface>,
    #[serde(default)]
    sandbox_key: String,
    #[serde(default)]
    options: Value,
}

/// "a.b.c.d/len" or "a.b.c.d" → the address.
fn addr_of(s: &str, what: &str) -> Result<Ipv4Addr, Answer> {
    s.split('/').next().unwrap_or_default().parse().map_err(|_| bad(format!("invalid {what} {s:?}")))
}

fn bad(m: String) -> Answer {
    Error::BadRequest(m).into()
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let v: Vec<u8> = s.split(':').filter_map(|x| u8::from_str_radix(x, 16).ok()).collect();
    <[u8; 6]>::try_from(v).ok()
}

impl Plugin {
    async fn create_network(&self, b: &Bytes) -> Reply {
        let req: CreateNetwork = parse(b)?;
        let data = req.ipv4_data.unwrap_or_default();
        let Some(v4) = data.first().filter(|d| !d.pool.is_empty()) else {
            return Err(bad("netpath networks need an IPv4 pool".into()));
        };
        // Driver options (`docker network create -o K=V`) arrive under this key.
        let mut options = BTreeMap::new();
        if let Some(generic) = req.options.get("com.docker.network.generic").and_then(Value::as_object) {
            for (k, v) in generic {
                options.insert(k.clone(), v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()));
            }
        }
        let gateway = (!v4.gateway.is_empty()).then(|| addr_of(&v4.gateway, "gateway")).transpose()?;
        let create = NetworkCreate {
            name: network_name(&req.network_id),
            subnet: Some(v4.pool.clone()),
            gateway: gateway.map(|g| g.to_string()),
            options,
            ..Default::default()
        };
        self.daemon.create_network(create).await?;
        ok(json!({}))
    }

    async fn delete_network(&self, b: &Bytes) -> Reply {
        let req: NetworkRef = parse(b)?;
        match self.daemon.remove_network(&network_name(&req.network_id)).await {
            Ok(()) | Err(Error::NotFound(_)) => ok(json!({})),
            Err(e) => Err(e.into()),
        }
    }

    fn create_endpoint(&self, b: &Bytes) -> Reply {
        let req: EndpointReq = parse(b)?;
        let iface = req.interface.unwrap_or_default();
        if !iface.address_ipv6.is_empty() {
            return Err(bad("netpath networks are IPv4 only".into()));
        }
        if iface.address.is_empty() {
            return Err(bad("no IPv4 address for the endpoint: the network needs an IPAM driver".into()));
        }
        let ip = addr_of(&iface.address, "address")?;
        let mac = if iface.mac_address.is_empty() {
            None
        } else {
            Some(parse_mac(&iface.mac_address).ok_or_else(|| bad(format!("invalid MAC {:?}", iface.mac_address)))?)
        };
        let ep = Endpoint { network_id: req.network_id, ip, mac };
        let mut st = self.state.lock().unwrap();
        st.endpoints.insert(req.endpoint_id.clone(), ep);
        if let Err(e) = self.save(&st) {
            st.endpoints.remove(&req.endpoint_id);
            return Err(e);
        }
        // dockerd gave the address (and maybe the MAC): the answer must not repeat them.
        ok(json!({}))
    }

    async fn delete_endpoint(&self, b: &Bytes) -> Reply {
        let req: EndpointReq = parse(b)?;
        self.daemon.docker_delete_endpoint(&req.endpoint_id).await?;
        let mut st = self.state.lock().unwrap();
        if st.endpoints.remove(&req.endpoint_id).is_some() {
            self.save(&st)?;
        }
        ok(json!({}))
    }

    async fn join(&self, b: &Bytes) -> Reply {
        let req: EndpointReq = parse(b)?;
        let ep = self.state.lock().unwrap().endpoints.get(&req.endpoint_id).cloned();
        let ep = ep.ok_or_else(|| Answer::from(Error::NotFound(format!("endpoint {} not found", req.endpoint_id))))?;
        if ep.network_id != req.network_id {
            return Err(bad(format!("endpoint {} is not on network {}", req.endpoint_id, req.network_id)));
        }
        if req.sandbox_key.is_empty() {
            return Err(bad("Join without a SandboxKey".into()));
        }
        let name = network_name(&req.network_id);
        let j = self.daemon.docker_join(&req.endpoint_id, &name, &req.sandbox_key, ep.ip, ep.mac).await?;
        ok(json!({
            "InterfaceName": { "SrcName": j.src_name, "DstPrefix": "eth" },
            "Gateway": j.gateway.to_string(),
            "GatewayIPv6": "",
            "StaticRoutes": [],
            "DisableGatewayService": false,
        }))
    }

    /// The endpoint's published ports, from dockerd's `com.docker.network.portmap`.
    async fn program(&self, b: &Bytes) -> Reply {
        let req: EndpointReq = parse(b)?;
        let mut reqs = vec![];
        for m in req.options.get("com.docker.network.portmap").and_then(Value::as_array).into_iter().flatten() {
            let proto = match m["Proto"].as_u64() {
                Some(6) => Proto::Tcp,
                Some(17) => Proto::Udp,
                p => return Err(bad(format!("unsupported protocol {p:?} in a port mapping"))),
            };
            let port = |k: &str| m[k].as_u64().and_then(|p| u16::try_from(p).ok()).unwrap_or(0);
            let (cport, hport) = (port("Port"), port("HostPort"));
            if cport == 0 {
                return Err(bad(format!("port mapping without a container port: {m}")));
            }
            let host_ip = match m["HostIP"].as_str().unwrap_or("") {
                "" | "0.0.0.0" => None,
                s => Some(addr_of(s, "HostIP")?),
            };
            // HostPort 0: any free port, as `-p 80`.
            let host_ports = (hport != 0).then_some((hport, hport));
            reqs.push(Publish { host_ip, host_ports, container_ports: (cport, cport), proto });
        }
        self.daemon.docker_publish(&req.endpoint_id, &reqs).await?;
        self.daemon.docker_xdp_ready(&req.endpoint_id).await;
        ok(json!({}))
    }

    async fn revoke(&self, b: &Bytes) -> Reply {
        let req: EndpointReq = parse(b)?;
        self.daemon.docker_publish(&req.endpoint_id, &[]).await?;
        ok(json!({}))
    }

    fn ipam(&self, method: &str, b: &Bytes) -> Reply {
        let body: Value = parse(b)?;
        let mut st = self.state.lock().unwrap();
        let before = serde_json::to_value(&st.ipam).unwrap_or_default();
        let pools = &mut st.ipam;
        let v = match method {
            "IpamDriver.GetCapabilities" => json!({ "RequiresMACAddress": false, "RequiresRequestReplay": false }),
            "IpamDriver.GetDefaultAddressSpaces" => json!({
                "LocalDefaultAddressSpace": ipam::LOCAL_SPACE,
                "GlobalDefaultAddressSpace": ipam::GLOBAL_SPACE,
            }),
            "IpamDriver.RequestPool" => pools.request_pool(&body, &self.daemon.subnets())?,
            "IpamDriver.ReleasePool" => pools.release_pool(&body)?,
            "IpamDriver.RequestAddress" => pools.request_address(&body)?,
            "IpamDriver.ReleaseAddress" => pools.release_address(&body)?,
            m => return Err(Answer(StatusCode::NOT_FOUND, json!({ "Err": format!("unknown method {m}") }))),
        };
        if serde_json::to_value(&st.ipam).unwrap_or_default() != before
            && let Err(e) = self.save(&st)
        {
            st.ipam = serde_json::from_value(before).unwrap_or_default();
            return Err(e);
        }
        ok(v)
    }
}
