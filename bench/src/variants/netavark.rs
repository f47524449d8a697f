//! `netavark`: Debian's netavark (podman's network backend), bridge driver, firewall rules
//! through iptables, run inside the lab's host namespace as podman would run it on a host:
//! `netavark --config DIR setup NETNS` with the container's networks and port mappings on
//! stdin, `teardown` with the same JSON afterwards.
//!
//! podman turns a port range (`-p 20000-29995:20000-29995`) into one mapping with `range`, and
//! netavark into one DNAT rule with a port range, so the filler ports are one entry here.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netpath_tests::Lab;
use serde_json::{Value, json};

use super::{
    CTR_IP, Ctx, GATEWAY, PortMap, Proto, Publish, SUBNET, Target, Variant, attach_ip, attach_port, check_port,
    kill_server, routing_lab, start_servers, wait_ready,
};
use crate::serve::CONN_PORT;
use crate::util::{check, in_ns};

pub const NETAVARK: &str = "/usr/lib/podman/netavark";
const BRIDGE: &str = "nvbr0";

pub struct Netavark {
    label: String,
    publish: Publish,
    conf_dir: PathBuf,
    /// The setup JSON of the wired container, for teardown (None once torn down).
    wired: Option<String>,
    server: Option<Child>,
    ctr_ns: PathBuf,
    lab: Lab,
}

impl Netavark {
    pub fn setup(label: String, publish: Publish, ctx: &Ctx) -> Result<Netavark> {
        if !Path::new(NETAVARK).is_file() {
            bail!("{NETAVARK} is missing: apt-get install netavark");
        }
        let lab = routing_lab("bench-netavark")?;
        // Under the lab dir, so the lab's removal takes it too.
        let conf_dir = lab.dir.join("netavark");
        std::fs::create_dir_all(&conf_dir)?;
        let ctr_ns = lab.add_ns("ctr");
        let mut v = Netavark { label, publish, conf_dir, wired: None, server: None, ctr_ns, lab };
        let mut maps = Vec::new();
        if let Some((first, last)) = v.publish.filler_range() {
            maps.push(mapping(first, first, last - first + 1, Proto::Tcp));
        }
        maps.extend(v.publish.measured.iter().map(|m| mapping(m.host, m.ctr, 1, m.proto)));
        let cfg = config("bench-ctr", CTR_IP, &maps).to_string();
        v.run("setup", &v.ctr_ns, &cfg, ctx.setup_timeout).context("netavark setup")?;
        v.wired = Some(cfg);
        let extra = check_port(Some(&v.publish));
        v.server = Some(start_servers(ctx, &v.ctr_ns, extra)?);
        let ctr_ns = v.ctr_ns.clone();
        wait_ready(ctx, &v.lab.client_ns, v.target(), extra, || in_ns(&ctr_ns, "ss", &["-Hltn"]))?;
        Ok(v)
    }

    fn run(&self, verb: &str, netns: &Path, cfg: &str, timeout: Duration) -> Result<String> {
        let conf = self.conf_dir.to_str().context("config dir")?;
        let ns = netns.to_str().context("netns path")?;
        check(in_ns(&self.lab.host_ns, NETAVARK, &["--config", conf, verb, ns]), Some(cfg.as_bytes()), timeout)
    }
}

/// A port mapping as podman passes it to netavark.
pub fn netavark_mapping(host: u16, ctr: u16, range: u16, proto: Proto) -> Value {
    json!({"host_ip": "", "container_port": ctr, "host_port": host, "range": range, "protocol": proto.as_str()})
}

fn mapping(host: u16, ctr: u16, range: u16, proto: Proto) -> Value {
    netavark_mapping(host, ctr, range, proto)
}

fn config(name: &str, ip: &str, port_mappings: &[Value]) -> Value {
    netavark_config(name, ip, SUBNET, GATEWAY, port_mappings)
}

/// What podman passes to `netavark setup` for one container on one bridge network.
pub fn netavark_config(name: &str, ip: &str, subnet: &str, gateway: &str, port_mappings: &[Value]) -> Value {
    let id = format!("{:0>64}", name.bytes().map(|b| format!("{b:02x}")).collect::<String>());
    let id = &id[id.len() - 64..];
    json!({
        "container_id": id,
        "container_name": name,
        "port_mappings": port_mappings,
        "networks": {
            "benchnet": {"static_ips": [ip], "aliases": [], "interface_name": "eth0"}
        },
        "network_info": {
            "benchnet": {
                "name": "benchnet",
                "id": "b".repeat(64),
                "driver": "bridge",
                "network_interface": BRIDGE,
                "subnets": [{"subnet": subnet, "gateway": gateway}],
                "ipv6_enabled": false,
                "internal": false,
                "dns_enabled": false,
                "ipam_options": {"driver": "host-local"}
            }
        }
    })
}

impl Variant for Netavark {
    fn label(&self) -> String {
        self.label.clone()
    }

    fn target(&self) -> Target {
        Target::published()
    }

    fn client_ns(&self) -> &Path {
        &self.lab.client_ns
    }

    fn attach_once(&mut self, n: usize) -> Result<Duration> {
        let ns = self.lab.add_ns(&format!("att{n}"));
        let m = PortMap { host: attach_port(n), ctr: CONN_PORT, proto: Proto::Tcp };
        let cfg = config(&format!("att{n}"), &attach_ip(n), &[mapping(m.host, m.ctr, 1, m.proto)]).to_string();
        let t = Instant::now();
        self.run("setup", &ns, &cfg, Duration::from_secs(60)).context("netavark setup")?;
        let took = t.elapsed();
        self.run("teardown", &ns, &cfg, Duration::from_secs(60)).context("netavark teardown")?;
        Ok(took)
    }

    fn teardown(&mut self) -> Result<()> {
        kill_server(&mut self.server);
        if let Some(cfg) = self.wired.take() {
            self.run("teardown", &self.ctr_ns, &cfg, Duration::from_secs(120)).context("netavark teardown")?;
        }
        Ok(())
    }
}

impl Drop for Netavark {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("bench: {}: {e:#}", self.label);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_json_shape() {
        let v = config("bench-ctr", CTR_IP, &[mapping(20000, 20000, 9996, Proto::Tcp)]);
        assert_eq!(v["container_id"].as_str().unwrap().len(), 64);
        assert_eq!(v["networks"]["benchnet"]["static_ips"][0], CTR_IP);
        assert_eq!(v["network_info"]["benchnet"]["subnets"][0]["gateway"], GATEWAY);
        assert_eq!(v["port_mappings"][0]["range"], 9996);
        assert_eq!(v["port_mappings"][0]["protocol"], "tcp");
    }
}
