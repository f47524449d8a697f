//! `cni`: containernetworking-plugins invoked the way a CNI runtime (libcni) invokes a
//! network configuration list: `bridge` (with `host-local` IPAM) then `portmap` as a chained
//! plugin with `runtimeConfig.portMappings` and the previous result; DEL in reverse order.
//! host-local keeps its allocations under the lab dir (`dataDir`), so nothing is left in
//! /var/lib/cni.
//!
//! portmap has no port ranges: every published port is its own mapping and its own rules,
//! and it installs them one `iptables` call at a time, each re-reading the growing ruleset.
//! Measured here (plugins 1.1.1, iptables-nft 1.8.9): ADD with 250 mappings 7 s, 1,000
//! mappings 47 s, 10,000 not finished after 240 s. So above `--cni-max-ports` (default
//! 1,000) the variant is reported as n/a instead of spending the bench's time budget on it.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netpath_tests::Lab;
use serde_json::{Value, json};

use super::{
    Ctx, GATEWAY, NotAvailable, PortMap, Proto, Publish, SUBNET, Target, Variant, attach_port, check_port, kill_server,
    routing_lab, start_servers, wait_ready,
};
use crate::serve::CONN_PORT;
use crate::util::{check, in_ns};

pub const CNI_PATH: &str = "/usr/lib/cni";
const BRIDGE: &str = "cni0";
const NETWORK: &str = "benchnet";

pub struct Cni {
    label: String,
    ipam_dir: PathBuf,
    /// The wired container: id, ports and the chain's final result (for DEL).
    wired: Option<Wired>,
    server: Option<Child>,
    ctr_ns: PathBuf,
    lab: Lab,
}

struct Wired {
    id: String,
    maps: Vec<PortMap>,
    result: Value,
}

impl Cni {
    pub fn setup(label: String, publish: Publish, ctx: &Ctx) -> Result<Cni> {
        for p in ["bridge", "host-local", "portmap"] {
            if !Path::new(CNI_PATH).join(p).is_file() {
                bail!("{CNI_PATH}/{p} is missing: apt-get install containernetworking-plugins");
            }
        }
        if publish.all().len() > ctx.cni_max_ports as usize {
            return Err(NotAvailable {
                reason: "portmap ADD too slow".into(),
                detail: Some(format!(
                    "portmap installs one iptables rule per call; ADD with 1,000 mappings took 47 s here and \
                     10,000 did not finish within 240 s (raise --cni-max-ports to try; limit per step: \
                     --setup-timeout, now {} s)",
                    ctx.setup_timeout.as_secs()
                )),
            }
            .into());
        }
        let lab = routing_lab("bench-cni")?;
        let ipam_dir = lab.dir.join("cni-ipam");
        let ctr_ns = lab.add_ns("ctr");
        let mut v = Cni { label, ipam_dir, wired: None, server: None, ctr_ns, lab };
        let maps = publish.all();
        let result = v.add("bench-ctr", &v.ctr_ns.clone(), &maps, ctx.setup_timeout).context("CNI ADD")?;
        v.wired = Some(Wired { id: "bench-ctr".into(), maps, result });
        let extra = check_port(Some(&publish));
        v.server = Some(start_servers(ctx, &v.ctr_ns, extra)?);
        let ctr_ns = v.ctr_ns.clone();
        wait_ready(ctx, &v.lab.client_ns, v.target(), extra, || in_ns(&ctr_ns, "ss", &["-Hltn"]))?;
        Ok(v)
    }

    /// The network configuration list's plugins, in order.
    fn plugins(&self) -> Vec<Value> {
        vec![
            json!({
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": SUBNET, "gateway": GATEWAY}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": self.ipam_dir,
                }
            }),
            json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}),
        ]
    }

    /// One plugin invocation per the CNI spec: config on stdin, parameters in the environment.
    fn invoke(&self, cmd: &str, id: &str, netns: &Path, conf: Value, timeout: Duration) -> Result<String> {
        let ty = conf["type"].as_str().context("plugin type")?.to_string();
        let mut c = in_ns(&self.lab.host_ns, &format!("{CNI_PATH}/{ty}"), &[]);
        c.env("CNI_COMMAND", cmd)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", CNI_PATH);
        check(c, Some(conf.to_string().as_bytes()), timeout).with_context(|| format!("CNI {cmd} with plugin {ty}"))
    }

    /// Runs the chain's ADD and returns the last plugin's result.
    fn add(&self, id: &str, netns: &Path, maps: &[PortMap], timeout: Duration) -> Result<Value> {
        let mut prev: Option<Value> = None;
        for plugin in self.plugins() {
            let conf = plugin_conf(plugin, prev.as_ref(), maps);
            let out = self.invoke("ADD", id, netns, conf, timeout)?;
            prev =
                Some(serde_json::from_str(&out).with_context(|| format!("CNI result: {}", crate::util::tail(&out)))?);
        }
        prev.context("empty plugin chain")
    }

    fn del(&self, id: &str, netns: &Path, maps: &[PortMap], result: &Value, timeout: Duration) -> Result<()> {
        let mut errors = Vec::new();
        for plugin in self.plugins().into_iter().rev() {
            let conf = plugin_conf(plugin, Some(result), maps);
            if let Err(e) = self.invoke("DEL", id, netns, conf, timeout) {
                errors.push(format!("{e:#}"));
            }
        }
        if errors.is_empty() { Ok(()) } else { bail!("{}", errors.join("; ")) }
    }
}

/// A plugin's stdin: its own object plus the list's name and version, the previous result and
/// the runtime config for the capabilities it declares.
fn plugin_conf(mut plugin: Value, prev: Option<&Value>, maps: &[PortMap]) -> Value {
    plugin["cniVersion"] = json!("1.0.0");
    plugin["name"] = json!(NETWORK);
    if let Some(p) = prev {
        plugin["prevResult"] = p.clone();
    }
    if plugin["capabilities"]["portMappings"] == json!(true) {
        let pm: Vec<Value> = maps
            .iter()
            .map(|m| json!({"hostPort": m.host, "containerPort": m.ctr, "protocol": m.proto.as_str()}))
            .collect();
        plugin["runtimeConfig"] = json!({"portMappings": pm});
    }
    plugin
}

impl Variant for Cni {
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
        let id = format!("att{n}");
        let maps = [PortMap { host: attach_port(n), ctr: CONN_PORT, proto: Proto::Tcp }];
        let t = Instant::now();
        let result = self.add(&id, &ns, &maps, Duration::from_secs(120))?;
        let took = t.elapsed();
        self.del(&id, &ns, &maps, &result, Duration::from_secs(120))?;
        Ok(took)
    }

    fn teardown(&mut self) -> Result<()> {
        kill_server(&mut self.server);
        if let Some(w) = self.wired.take() {
            self.del(&w.id, &self.ctr_ns, &w.maps, &w.result, Duration::from_secs(600))?;
        }
        Ok(())
    }
}

impl Drop for Cni {
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
    fn chained_conf_carries_prev_result_and_port_mappings() {
        let maps = [PortMap { host: 18080, ctr: 8080, proto: Proto::Tcp }];
        let prev = json!({"cniVersion": "1.0.0", "ips": [{"address": "203.0.113.2/24"}]});
        let c = plugin_conf(json!({"type": "portmap", "capabilities": {"portMappings": true}}), Some(&prev), &maps);
        assert_eq!(c["name"], NETWORK);
        assert_eq!(c["prevResult"]["ips"][0]["address"], "203.0.113.2/24");
        assert_eq!(c["runtimeConfig"]["portMappings"][0]["hostPort"], 18080);
        let b = plugin_conf(json!({"type": "bridge"}), None, &maps);
        assert!(b.get("prevResult").is_none() && b.get("runtimeConfig").is_none());
    }
}
