//! `direct` and `iptables`: a bridge and veths made with `ip` in the host namespace. With a
//! [`Publish`], Docker's iptables rules for those ports are loaded too and the client goes
//! through them; without, the client routes straight to the container.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use netpath_tests::Lab;

use super::{
    CTR_IP, Ctx, Publish, SUBNET, Target, Variant, attach_ip, attach_port, check_port, docker, kill_server,
    route_client_to_subnet, routing_lab, start_servers, wait_ready, wire_veth,
};
use crate::serve::CONN_PORT;
use crate::util::{check, in_ns, ns_check};

const BRIDGE: &str = "br0";

pub struct Plain {
    label: String,
    publish: Option<Publish>,
    server: Option<Child>,
    ctr_ns: PathBuf,
    lab: Lab,
}

impl Plain {
    pub fn setup(label: String, publish: Option<Publish>, ctx: &Ctx) -> Result<Plain> {
        let tag = if publish.is_some() { "bench-iptables" } else { "bench-direct" };
        let lab = routing_lab(tag)?;
        let host = lab.host_ns.clone();
        ns_check(&host, "ip", &["link", "add", BRIDGE, "type", "bridge"])?;
        ns_check(&host, "ip", &["addr", "add", &format!("{}/24", super::GATEWAY), "dev", BRIDGE])?;
        ns_check(&host, "ip", &["link", "set", BRIDGE, "up"])?;
        let ctr_ns = lab.add_ns("ctr");
        wire_veth(&host, &ctr_ns, BRIDGE, "vc0", CTR_IP)?;
        match &publish {
            Some(p) => {
                let all = p.all();
                let rules = docker::ruleset(BRIDGE, SUBNET, &[(CTR_IP, &all)]);
                restore(&host, &rules, false, ctx.setup_timeout).context("loading Docker's iptables rules")?;
            }
            None => route_client_to_subnet(&lab)?,
        }
        let mut v = Plain { label, publish, server: None, ctr_ns, lab };
        let extra = check_port(v.publish.as_ref());
        v.server = Some(start_servers(ctx, &v.ctr_ns, extra)?);
        let ctr_ns = v.ctr_ns.clone();
        wait_ready(ctx, &v.lab.client_ns, v.target(), extra, || in_ns(&ctr_ns, "ss", &["-Hltn"]))?;
        Ok(v)
    }
}

fn restore(ns: &Path, rules: &str, noflush: bool, timeout: Duration) -> Result<()> {
    let args: &[&str] = if noflush { &["--noflush"] } else { &[] };
    check(in_ns(ns, "iptables-restore", args), Some(rules.as_bytes()), timeout).map(drop)
}

impl Variant for Plain {
    fn label(&self) -> String {
        self.label.clone()
    }

    fn target(&self) -> Target {
        match self.publish {
            Some(_) => Target::published(),
            None => Target::routed(CTR_IP.parse().expect("CTR_IP")),
        }
    }

    fn client_ns(&self) -> &Path {
        &self.lab.client_ns
    }

    fn uplink_ns(&self) -> Result<&Path> {
        Ok(&self.lab.host_ns)
    }

    fn container_cmd(&self, prog: &str, args: &[&str]) -> Result<std::process::Command> {
        Ok(in_ns(&self.ctr_ns, prog, args))
    }

    fn attach_once(&mut self, n: usize) -> Result<Duration> {
        let host = self.lab.host_ns.clone();
        let ns = self.lab.add_ns(&format!("att{n}"));
        let (ip, veth) = (attach_ip(n), format!("va{n}"));
        let maps = [super::PortMap { host: attach_port(n), ctr: CONN_PORT, proto: super::Proto::Tcp }];
        let t = Instant::now();
        wire_veth(&host, &ns, BRIDGE, &veth, &ip)?;
        if self.publish.is_some() {
            restore(&host, &docker::container_delta('A', BRIDGE, &ip, &maps), true, Duration::from_secs(60))?;
        }
        let took = t.elapsed();
        if self.publish.is_some() {
            restore(&host, &docker::container_delta('D', BRIDGE, &ip, &maps), true, Duration::from_secs(60))?;
        }
        ns_check(&host, "ip", &["link", "del", &veth])?;
        Ok(took)
    }

    fn teardown(&mut self) -> Result<()> {
        // Everything lives in the lab's namespaces: stopping the servers is all there is.
        kill_server(&mut self.server);
        Ok(())
    }
}

impl Drop for Plain {
    fn drop(&mut self) {
        let _ = self.teardown();
    }
}
