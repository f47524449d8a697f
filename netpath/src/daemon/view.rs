//! Docker-shaped JSON views of networks and containers (`inspect`, `ls`, `ps`).

use std::collections::HashMap;

use serde::Serialize;
use serde_json::{Map, Value, json};

use super::Daemon;
use crate::ipam::format_mac;
use crate::netlink::LinkStats;
use crate::state::{Container, Network, Sandbox, State};

impl Daemon {
    pub(super) fn network_json(&self, st: &State, n: &Network) -> Value {
        let mut containers = Map::new();
        for (c, e) in st.endpoints_on(&n.id) {
            let prefix = n.ipam.map(|i| i.subnet.prefix_len()).unwrap_or(0);
            containers.insert(
                c.name.clone(),
                json!({
                    "Name": c.name,
                    "EndpointID": e.id,
                    "MacAddress": e.mac.map(|m| format_mac(&m)).unwrap_or_default(),
                    "IPv4Address": e.ipv4.map(|ip| format!("{ip}/{prefix}")).unwrap_or_default(),
                }),
            );
        }
        let config: Vec<Value> = n
            .ipam
            .iter()
            .map(|i| {
                let mut c = json!({ "Subnet": i.subnet.to_string(), "Gateway": i.gateway.to_string() });
                if let Some(r) = i.ip_range {
                    c["IPRange"] = json!(r.to_string());
                }
                if !n.opts.aux_addresses.is_empty() {
                    let aux: Map<String, Value> =
                        n.opts.aux_addresses.iter().map(|(k, v)| (k.clone(), json!(v.to_string()))).collect();
                    c["AuxiliaryAddresses"] = Value::Object(aux);
                }
                c
            })
            .collect();
        let mut options = Map::new();
        if let Some(o) = &n.opts.overlay {
            // Docker's name for it; the local bridge is named below like a bridge network's.
            options.insert("com.docker.network.driver.overlay.vxlanid_list".into(), json!(o.vni.to_string()));
        }
        if let Some(b) = &n.bridge {
            options.insert("com.docker.network.bridge.name".into(), json!(b));
            options.insert(crate::state::GATEWAY_MODE_OPT.into(), json!(n.gateway_mode.as_str()));
            options.insert("com.docker.network.bridge.enable_icc".into(), json!(n.opts.icc.to_string()));
            options
                .insert("com.docker.network.bridge.enable_ip_masquerade".into(), json!(n.opts.masquerade.to_string()));
            if let Some(mtu) = n.opts.mtu {
                options.insert("com.docker.network.driver.mtu".into(), json!(mtu.to_string()));
            }
            if n.opts.default_deny {
                options.insert("netpath.default_deny".into(), json!("true"));
            }
        }
        if let Some(mv) = &n.opts.macvlan {
            options.insert("parent".into(), json!(mv.parent));
            options.insert("macvlan_mode".into(), json!(mv.mode.as_str()));
            if let Some((shim, ip)) = &mv.host_shim {
                options.insert("netpath.macvlan.host_access".into(), json!("true"));
                options.insert("netpath.macvlan.host_interface".into(), json!(shim));
                options.insert("netpath.macvlan.host_address".into(), json!(ip.to_string()));
            }
        }
        let mut peers = None;
        if let (Some(_), Some(c)) = (&n.opts.overlay, &self.cluster) {
            // Docker's Peers: the nodes with containers on this overlay (alive ones).
            let snap = c.snapshot();
            let nodes: std::collections::BTreeSet<&str> =
                snap.endpoints.values().filter(|e| e.network_id == n.id).map(|e| e.node.as_str()).collect();
            let list = nodes.into_iter().filter_map(|name| snap.alive.get(name));
            peers = Some(list.map(|p| json!({ "Name": p.name, "IP": p.addr.to_string() })).collect::<Vec<_>>());
        }
        let mut v = json!({
            "Name": n.name,
            "Id": n.id,
            "Created": rfc3339(n.created),
            "Scope": if n.opts.overlay.is_some() { "swarm" } else { "local" },
            "Attachable": n.opts.overlay.as_ref().is_some_and(|o| o.attachable),
            "Driver": n.driver.as_str(),
            "IPAM": { "Driver": "default", "Config": config },
            "Internal": n.opts.internal,
            "Containers": containers,
            "Options": options,
            "Labels": n.opts.labels,
        });
        if let Some(p) = peers {
            v["Peers"] = Value::Array(p);
        }
        v
    }

    /// The exit code of a container's process, if it ended: recorded, or written by its
    /// supervisor since housekeeping last looked.
    fn exit_code(&self, c: &Container, running: bool) -> Option<i32> {
        let p = c.process.as_ref()?;
        ended_with(p.exit_code, running, || p.detached.then(|| self.store.exit_path(&c.id)))
    }

    /// The kernel's counters of each endpoint's host-side veth, by endpoint id: one RTM_GETLINK
    /// each (`inspect` shows them; `ps` does not ask: it lists many containers).
    pub(super) async fn endpoint_counters(&self, c: &Container) -> HashMap<String, LinkStats> {
        let mut out = HashMap::new();
        for e in &c.endpoints {
            let Some(idx) = e.host_ifname.as_deref().and_then(|h| nix::net::if_::if_nametoindex(h).ok()) else {
                continue;
            };
            match self.nl.stats_of(idx).await {
                Ok(Some(s)) => {
                    out.insert(e.id.clone(), s);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("container {}: {e:#}", c.name),
            }
        }
        out
    }

    /// A container as `inspect` shows it, with the endpoints' `counters` (see
    /// [`Self::endpoint_counters`]; an endpoint without any shows none).
    pub(super) fn container_json(&self, c: &Container, counters: &HashMap<String, LinkStats>) -> Value {
        let running = Self::is_running(c);
        let nets: Vec<Option<Network>> = {
            let st = self.state();
            c.endpoints.iter().map(|e| st.network_by_id(&e.network_id).cloned()).collect()
        };
        let status = status(c.process.is_some(), running);
        let mut networks = Map::new();
        let first_net = nets.first().cloned().flatten();
        for (e, n) in c.endpoints.iter().zip(nets) {
            let Some(n) = n else {
                continue;
            };
            let counters = counters.get(&e.id).map(counters_json);
            networks.insert(
                n.name.clone(),
                json!({
                    "NetworkID": n.id,
                    "EndpointID": e.id,
                    "Gateway": n.ipam.map(|i| i.gateway.to_string()).unwrap_or_default(),
                    "IPAddress": e.ipv4.map(|i| i.to_string()).unwrap_or_default(),
                    "IPPrefixLen": n.ipam.map(|i| i.subnet.prefix_len()).unwrap_or(0),
                    "MacAddress": e.mac.map(|m| format_mac(&m)).unwrap_or_default(),
                    "Interface": e.ifname,
                    "Aliases": e.aliases,
                    "HostInterface": e.host_ifname,
                    "Counters": counters,
                }),
            );
        }
        let sandbox_key = match &c.sandbox {
            Sandbox::Netns { path, .. } => path.display().to_string(),
            Sandbox::Host => format!("/proc/{}/ns/net", std::process::id()),
        };
        let p = c.process.as_ref();
        // Docker's shape: {"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"}]}.
        let mut ports = Map::new();
        for b in &c.ports {
            let k = format!("{}/{}", b.container_port, b.proto.as_str());
            let entry = ports.entry(k).or_insert_with(|| json!([]));
            entry.as_array_mut().unwrap().push(json!({
                "HostIp": b.host_ip.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED).to_string(),
                "HostPort": b.host_port.to_string(),
            }));
        }
        // Docker's name for the network mode is the network the container was started on.
        let mode = first_net.map(|n| n.name);
        let etc = self.dns.etc_paths(&c.id);
        json!({
            "Id": c.id,
            "Name": c.name,
            "Created": rfc3339(c.created),
            "ResolvConfPath": etc.resolv_conf,
            // Where the daemon mounts container namespaces (processes started in a container
            // unmount it in their own mount namespace).
            "NetnsDir": self.store.netns_dir(),
            "MountTemplate": self.store.mount_template(),
            "HostsPath": etc.hosts,
            "HostnamePath": etc.hostname,
            "HostConfig": {
                "NetworkMode": if c.sandbox == Sandbox::Host { Some("host".to_string()) } else { mode },
                "Dns": c.dns,
                "DnsSearch": c.dns_search,
            },
            "State": {
                "Status": status,
                "Running": running,
                "Pid": if running { p.and_then(|p| p.pid) } else { None },
                "Error": p.and_then(|p| p.start_error.clone()).unwrap_or_default(),
                "ExitCode": self.exit_code(c, running),
            },
            "Config": {
                "Cmd": p.map(|p| p.cmd.clone()).unwrap_or_default(),
                "Detached": p.is_some_and(|p| p.detached),
                "Hostname": c.hostname(),
                "Labels": c.labels,
                "ExposedPorts": exposed_ports(c),
            },
            "LogPath": self.store.log_path(&c.id).display().to_string(),
            "NetworkSettings": { "SandboxKey": sandbox_key, "Networks": networks, "Ports": ports },
        })
    }
}

/// Docker's `Config.ExposedPorts`: `{"80/tcp": {}}` for each `--expose`d and published port.
fn exposed_ports(c: &Container) -> Value {
    let mut m = Map::new();
    for e in &c.exposed {
        for p in e.from..=e.to {
            m.insert(format!("{p}/{}", e.proto.as_str()), json!({}));
        }
    }
    for b in &c.ports {
        m.insert(format!("{}/{}", b.container_port, b.proto.as_str()), json!({}));
    }
    Value::Object(m)
}

/// An endpoint's counters from the container's side (like `docker stats`): `Rx` is what the
/// container received, which its host-side veth (`host`) sent, and the other way round.
pub(super) fn counters_json(host: &LinkStats) -> Value {
    let c = host.peer_view();
    json!({ "RxPackets": c.rx_packets, "RxBytes": c.rx_bytes, "TxPackets": c.tx_packets, "TxBytes": c.tx_bytes })
}

/// One row of `ps`, copied out of the state under its lock: what `ps` shows and no more (a
/// clone of every container record and a JSON tree per row held tens of MiB for a moment
/// at 10,000 containers, which stayed in the daemon's RSS until the next trim).
pub(super) struct PsRow {
    id: String,
    name: String,
    created: u64,
    process: Option<PsProcess>,
    networks: Vec<(String, String)>,
}

struct PsProcess {
    pid: Option<(u32, Option<u64>)>,
    cmd: Vec<String>,
    exit_code: Option<i32>,
    /// Where its supervisor records the exit (detached, no code recorded yet).
    exit_file: Option<std::path::PathBuf>,
}

impl PsRow {
    pub(super) fn of(
        c: &Container,
        network_names: &HashMap<String, String>,
        exit_file: impl Fn() -> std::path::PathBuf,
    ) -> Self {
        let process = c.process.as_ref().map(|p| PsProcess {
            pid: p.pid.map(|pid| (pid, p.start_time)),
            cmd: p.cmd.clone(),
            exit_code: p.exit_code,
            exit_file: (p.detached && p.exit_code.is_none()).then(exit_file),
        });
        let networks = c
            .endpoints
            .iter()
            .filter_map(|e| {
                let n = network_names.get(&e.network_id)?;
                Some((n.clone(), e.ipv4.map(|i| i.to_string()).unwrap_or_default()))
            })
            .collect();
        PsRow { id: c.id.clone(), name: c.name.clone(), created: c.created, process, networks }
    }

    fn running(&self) -> bool {
        self.process.as_ref().and_then(|p| p.pid).is_some_and(|(pid, t)| super::process::is_alive(pid, t))
    }
}

/// Every ready container's `ps` row, copied out of `st` (the caller holds its lock).
pub(super) fn ps_rows(st: &State, store: &crate::state::Store) -> Vec<PsRow> {
    let names = st.networks().map(|n| (n.id.clone(), n.name.clone())).collect();
    st.containers()
        .filter(|c| c.phase == crate::state::Phase::Ready)
        .map(|c| PsRow::of(c, &names, || store.exit_path(&c.id)))
        .collect()
}

/// `ps`'s answer: a container as `inspect` shows it, only the fields `ps` lists (keys in
/// the order serde_json's maps give them everywhere else). Reads /proc once per row: run it
/// off the async workers.
pub(super) fn ps_json(rows: &[PsRow], all: bool) -> Vec<u8> {
    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    struct Entry<'a> {
        config: Config<'a>,
        created: String,
        id: &'a str,
        name: &'a str,
        network_settings: Settings<'a>,
        state: PsState,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    struct Config<'a> {
        cmd: &'a [String],
    }
    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    struct Settings<'a> {
        networks: std::collections::BTreeMap<&'a str, Addr<'a>>,
    }
    #[derive(Serialize)]
    struct Addr<'a> {
        #[serde(rename = "IPAddress")]
        ip: &'a str,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    struct PsState {
        exit_code: Option<i32>,
        running: bool,
        status: &'static str,
    }
    let mut rows: Vec<&PsRow> = rows.iter().collect();
    rows.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
    let entries: Vec<Entry> = rows
        .into_iter()
        .filter_map(|r| {
            let running = r.running();
            if !all && !running {
                return None;
            }
            let p = r.process.as_ref();
            let status = status(p.is_some(), running);
            let exit_code = p.and_then(|p| ended_with(p.exit_code, running, || p.exit_file.clone()));
            Some(Entry {
                config: Config { cmd: p.map(|p| p.cmd.as_slice()).unwrap_or_default() },
                created: rfc3339(r.created),
                id: &r.id,
                name: &r.name,
                network_settings: Settings {
                    networks: r.networks.iter().map(|(n, ip)| (n.as_str(), Addr { ip })).collect(),
                },
                state: PsState { exit_code, running, status },
            })
        })
        .collect();
    serde_json::to_vec(&entries).unwrap_or_else(|_| b"[]".to_vec())
}

/// A process's exit code: the one recorded in the state, or, once it is no longer running,
/// the one its supervisor wrote to `exit_file` (a detached process's) since housekeeping
/// last looked.
fn ended_with(
    recorded: Option<i32>,
    running: bool,
    exit_file: impl FnOnce() -> Option<std::path::PathBuf>,
) -> Option<i32> {
    recorded.or_else(|| if running { None } else { exit_file().as_deref().and_then(super::process::recorded_exit) })
}

/// Docker's status words, for a container with a process or without one.
fn status(has_process: bool, running: bool) -> &'static str {
    match (has_process, running) {
        (false, _) => "created",
        (true, true) => "running",
        (true, false) => "exited",
    }
}

fn tuple_json(t: &netpath_common::Tuple) -> Value {
    let a = |x: u32| std::net::Ipv4Addr::from(x.to_ne_bytes()).to_string();
    json!({
        "Proto": super::flows::proto_name(t.proto),
        "Src": format!("{}:{}", a(t.saddr), u16::from_be(t.sport)),
        "Dst": format!("{}:{}", a(t.daddr), u16::from_be(t.dport)),
    })
}

/// One NAT entry: the tuple it matches and the tuple packets leave with.
pub(super) fn flow_json(k: &netpath_common::Tuple, e: &netpath_common::CtEntry) -> Value {
    let hook = super::flows::hook_name(e.hook).unwrap_or("?");
    let state = match e.state {
        netpath_common::ct_state::ESTABLISHED => "established",
        netpath_common::ct_state::CLOSING => "closing",
        _ => "new",
    };
    json!({ "Match": tuple_json(k), "Rewrite": tuple_json(&e.xlate), "Hook": hook, "Reply": e.is_reply == 1, "State": state })
}

/// Seconds since the epoch as Docker prints times: RFC 3339 in UTC, `2026-11-25T22:31:41Z`.
pub(crate) fn rfc3339(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod time_tests {
    #[test]
    fn rfc3339_dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_795_732_301), "2026-11-26T22:31:41Z");
    }
}

#[cfg(test)]
mod ps_tests {
    use super::{PsProcess, PsRow, ps_json};

    fn row(name: &str, created: u64, process: Option<PsProcess>) -> PsRow {
        PsRow {
            id: format!("id-{name}"),
            name: name.into(),
            created,
            process,
            networks: vec![("appnet".into(), "10.1.0.2".into())],
        }
    }

    #[test]
    fn ps_lists_running_ones_by_creation_or_all_with_their_exit_codes() {
        let exit = std::env::temp_dir().join(format!("netpath-ps-test-{}", std::process::id()));
        std::fs::write(&exit, "143\n").unwrap();
        let me = std::process::id();
        let rows = || {
            vec![
                // This test's own process: alive, whatever its start time was recorded as.
                row(
                    "b-running",
                    20,
                    Some(PsProcess {
                        pid: Some((me, None)),
                        cmd: vec!["sleep".into()],
                        exit_code: None,
                        exit_file: None,
                    }),
                ),
                row(
                    "a-exited",
                    10,
                    Some(PsProcess { pid: None, cmd: vec![], exit_code: None, exit_file: Some(exit.clone()) }),
                ),
                row("c-created", 30, None),
            ]
        };
        let v: serde_json::Value = serde_json::from_slice(&ps_json(&rows(), false)).unwrap();
        let names: Vec<&str> = v.as_array().unwrap().iter().map(|e| e["Name"].as_str().unwrap()).collect();
        assert_eq!(names, ["b-running"]);
        assert_eq!(
            v[0],
            serde_json::json!({
                "Id": "id-b-running", "Name": "b-running", "Created": "1970-01-01T00:00:20Z",
                "State": { "Status": "running", "Running": true, "ExitCode": null },
                "Config": { "Cmd": ["sleep"] },
                "NetworkSettings": { "Networks": { "appnet": { "IPAddress": "10.1.0.2" } } },
            })
        );
        let v: serde_json::Value = serde_json::from_slice(&ps_json(&rows(), true)).unwrap();
        let got: Vec<(&str, &str, Option<i64>)> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (e["Name"].as_str().unwrap(), e["State"]["Status"].as_str().unwrap(), e["State"]["ExitCode"].as_i64())
            })
            .collect();
        assert_eq!(
            got,
            [("a-exited", "exited", Some(143)), ("b-running", "running", None), ("c-created", "created", None)]
        );
        std::fs::remove_file(&exit).unwrap();
    }
}
