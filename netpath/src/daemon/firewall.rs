//! The firewall (`netpath firewall add/ls/rm`, `run --ingress-allow`, networks'
//! `netpath.default_deny`): rules are state like networks and containers (one file each), and
//! every change recompiles the lot into the datapath's tries (crate::firewall), writes only
//! the entries that changed, then cuts the established flows the new rules deny.
//!
//! One change at a time (`sync`): compiling reads every rule and the containers they name.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Mutex;

use ipnet::Ipv4Net;
use netpath_common::{hook, net_flags, policy_rule};
use serde_json::{Value, json};
use tracing::{info, warn};

use super::{Daemon, spawn_io, valid_name};
use crate::api::FirewallRuleCreate;
use crate::error::Result;
use crate::firewall::{Applied, Compiled, Rule, Target};
use crate::state::store::Op;
use crate::state::{self, DriverKind, FirewallRule, IngressAllow, Phase, RuleAction, RuleProto, RuleTarget, State};

/// Rule numbers the daemon gives `firewall add` rules stay below this; the implicit rules of
/// `--ingress-allow` are numbered from here (one number per container).
const INGRESS_RULES: u32 = 0x4000_0000;
/// Ranks: user rules first (by priority, then age), then containers' --ingress-allow, then
/// their implicit deny.
const INGRESS_ALLOW_RANK: u32 = 0x4000_0000;
const INGRESS_DENY_RANK: u32 = 0x6000_0000;
/// `--priority` when none is given.
pub const DEFAULT_PRIORITY: u32 = 1000;

#[derive(Default)]
pub struct Firewall {
    /// What the kernel's tries hold; None until the first sync read them.
    applied: Mutex<Option<Applied>>,
    /// Rule numbers → names, for flow events.
    names: Mutex<HashMap<u32, String>>,
    /// Networks (by datapath id) with a container that has rules of its own.
    policed: Mutex<HashSet<u32>>,
    /// One compile-and-apply at a time.
    sync: tokio::sync::Mutex<()>,
}

/// The compiler's input from the daemon's state, and what goes with it.
struct Input {
    rules: Vec<Rule>,
    names: HashMap<u32, String>,
    policed: HashSet<u32>,
    /// Container address → (network id, its flags' firewall bits), for cutting flows.
    containers: HashMap<u32, (u32, u32)>,
}

fn net_of(st: &State, id: &str) -> Option<(u32, u32)> {
    let n = st.network_by_id(id)?;
    (n.driver == DriverKind::Bridge).then(|| {
        let flags = if n.opts.default_deny { net_flags::DEFAULT_DENY } else { 0 };
        (n.index, flags)
    })
}

/// A container's addresses on bridge networks (the datapath's), with their network's id and
/// firewall flags.
fn addresses(st: &State, c: &state::Container) -> Vec<(Ipv4Addr, (u32, u32))> {
    c.endpoints.iter().filter_map(|e| Some((e.ipv4?, net_of(st, &e.network_id)?))).collect()
}

fn input(st: &State) -> Input {
    let mut rules = vec![];
    let mut names = HashMap::new();
    let mut policed = HashSet::new();
    let mut user: Vec<&FirewallRule> = st.rules().collect();
    user.sort_by_key(|r| (r.priority, r.num));
    for (rank, r) in user.iter().enumerate() {
        names.insert(r.num, r.name.clone());
        let targets: Vec<Target> = match &r.to {
            RuleTarget::Any => vec![Target::ANY],
            RuleTarget::Network(n) => st
                .network(n)
                .filter(|n| n.driver == DriverKind::Bridge)
                .map(|n| Target::network(n.index))
                .into_iter()
                .collect(),
            RuleTarget::Container(c) => match st.container(c).filter(|c| c.phase != Phase::Removing) {
                Some(c) => addresses(st, c)
                    .into_iter()
                    .map(|(a, (net, _))| {
                        policed.insert(net);
                        Target::container(a)
                    })
                    .collect(),
                None => vec![],
            },
        };
        for t in targets {
            rules.push(Rule {
                rank: rank as u32 + 1,
                id: r.num,
                allow: r.action == RuleAction::Allow,
                target: t,
                src: r.from.unwrap_or_default(),
                proto: r.proto.map(RuleProto::number),
                ports: r.ports,
            });
        }
    }
    let mut containers = HashMap::new();
    let mut k = 0u32;
    for c in st.containers().filter(|c| c.phase != Phase::Removing) {
        let addrs = addresses(st, c);
        for (a, n) in &addrs {
            containers.insert(crate::datapath::wire_addr(*a), *n);
        }
        if c.ingress_allow.is_empty() || addrs.is_empty() {
            continue;
        }
        let id = INGRESS_RULES + k;
        names.insert(id, format!("{} --ingress-allow", c.name));
        for (a, (net, _)) in addrs {
            policed.insert(net);
            let t = Target::container(a);
            for (i, ia) in c.ingress_allow.iter().enumerate() {
                rules.push(Rule {
                    rank: INGRESS_ALLOW_RANK + k * 64 + i as u32,
                    id,
                    allow: true,
                    target: t,
                    src: ia.from,
                    proto: None,
                    ports: ia.port.map(|p| (p, p)),
                });
            }
            rules.push(Rule {
                rank: INGRESS_DENY_RANK + k,
                id,
                allow: false,
                target: t,
                src: Ipv4Net::default(),
                proto: None,
                ports: None,
            });
        }
        k += 1;
    }
    for n in st.networks().filter(|n| n.opts.default_deny) {
        names.insert(policy_rule::NETWORK_DEFAULT_DENY | n.index, format!("network {} default_deny", n.name));
    }
    Input { rules, names, policed, containers }
}

/// `FROM` of `--from` and `--ingress-allow`: a CIDR, or one address (a /32).
pub fn parse_source(what: &str, s: &str) -> Result<Ipv4Net> {
    if let Ok(a) = s.parse::<Ipv4Addr>() {
        return Ok(Ipv4Net::from(a));
    }
    let n: Ipv4Net =
        s.parse().map_err(|_| bad_request!("invalid {what} {s:?}: expected an IPv4 CIDR (10.0.0.0/8) or address"))?;
    if n.trunc() != n {
        return Err(bad_request!("invalid {what} {s:?}: host bits set (did you mean {}?)", n.trunc()));
    }
    Ok(n)
}

/// `--port P[-Q]`.
fn parse_ports(s: &str) -> Result<(u16, u16)> {
    let p = |x: &str| {
        x.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad_request!("invalid --port {s:?}: ports are 1 to 65535"))
    };
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (p(a)?, p(b)?),
        None => (p(s)?, p(s)?),
    };
    if hi < lo {
        return Err(bad_request!("invalid --port {s:?}: the range ends before it starts"));
    }
    Ok((lo, hi))
}

/// `run --ingress-allow FROM[:PORT]`.
pub fn parse_ingress_allow(s: &str) -> Result<IngressAllow> {
    let (from, port) = match s.rsplit_once(':') {
        Some((f, p)) => {
            let port = p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad_request!("invalid --ingress-allow {s:?}: the port must be 1 to 65535"))?;
            (f, Some(port))
        }
        None => (s, None),
    };
    Ok(IngressAllow { from: parse_source("--ingress-allow", from)?, port })
}

fn rule_json(r: &FirewallRule) -> Value {
    let (kind, name) = match &r.to {
        RuleTarget::Any => ("any", None),
        RuleTarget::Container(c) => ("container", Some(c.as_str())),
        RuleTarget::Network(n) => ("network", Some(n.as_str())),
    };
    json!({
        "ID": r.id,
        "Name": r.name,
        "Action": r.action,
        "From": r.from.map_or("any".to_string(), |n| n.to_string()),
        "To": match name { Some(n) => format!("{kind}:{n}"), None => "any".into() },
        "Ports": r.ports.map(|(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") }),
        "Protocol": r.proto.map(RuleProto::as_str),
        "Priority": r.priority,
        "Number": r.num,
        "Created": r.created,
    })
}

impl Daemon {
    /// Before the first reconcile publishes the networks: which of them the firewall guards
    /// (so a restart never has them published without the flag for a moment).
    pub(super) fn firewall_preload(&self) {
        let policed = input(&self.state()).policed;
        *self.firewall.policed.lock().unwrap_or_else(|e| e.into_inner()) = policed;
    }

    /// The name of a firewall rule number, for flow events.
    pub(super) fn rule_name(&self, num: u32) -> Option<String> {
        self.firewall.names.lock().unwrap_or_else(|e| e.into_inner()).get(&num).cloned()
    }

    /// True when the firewall has something to do with container `c`: its own
    /// `--ingress-allow`, rules naming it, or its network's default_deny.
    pub(super) fn firewall_names(&self, c: &state::Container) -> bool {
        let st = self.state();
        !c.ingress_allow.is_empty()
            || st.rules().any(|r| r.to == RuleTarget::Container(c.name.clone()))
            || c.endpoints.iter().any(|e| st.network_by_id(&e.network_id).is_some_and(|n| n.opts.default_deny))
    }

    /// The NETWORKS flags the firewall adds to a network (see `publish_network`).
    pub(super) fn firewall_flags(&self, net_id: u32) -> u32 {
        let p = self.firewall.policed.lock().unwrap_or_else(|e| e.into_inner());
        if p.contains(&net_id) { net_flags::POLICED } else { 0 }
    }

    pub fn list_firewall_rules(&self) -> Value {
        let st = self.state();
        let mut v: Vec<&FirewallRule> = st.rules().collect();
        v.sort_by_key(|r| (r.priority, r.num));
        Value::Array(v.into_iter().map(rule_json).collect())
    }

    /// `firewall add`: checks the rule, compiles it with the others (refused if the tries would
    /// overflow), persists it, applies it, and cuts the established flows it denies.
    pub async fn add_firewall_rules(&self, reqs: Vec<FirewallRuleCreate>) -> Result<Value> {
        self.wait_ready().await;
        let _sync = self.firewall.sync.lock().await;
        let mut made = vec![];
        {
            let st = self.state();
            let mut num = st.rules().map(|r| r.num).max().unwrap_or(0);
            let mut names: HashSet<String> = HashSet::new();
            for req in reqs {
                num += 1;
                let r = self.check_rule(&st, req, num)?;
                if st.rule(&r.name).is_some() || !names.insert(r.name.clone()) {
                    return Err(conflict!("a firewall rule named {} exists already", r.name));
                }
                made.push(r);
            }
            if num >= INGRESS_RULES {
                return Err(conflict!("too many firewall rules"));
            }
        }
        // Compiled with the others first: a rule set the tries cannot hold changes nothing.
        let input = {
            let mut st = self.state();
            for r in &made {
                st.put_rule(r.clone());
            }
            let i = input(&st);
            for r in &made {
                st.remove_rule(&r.name);
            }
            i
        };
        check_size(&Compiled::compile(&input.rules))?;
        for (i, r) in made.iter().enumerate() {
            let rev = self.state().next_rev();
            let (store, rec) = (self.store.clone(), r.clone());
            if let Err(e) = spawn_io(move || store.write_rule(&rec.id, Op::Save(&rec), rev)).await {
                for r in &made[..i] {
                    let (store, id) = (self.store.clone(), r.id.clone());
                    let _ = spawn_io(move || store.write_rule(&id, Op::Delete, 0)).await;
                }
                return Err(e);
            }
        }
        {
            let mut st = self.state();
            for r in &made {
                st.put_rule(r.clone());
            }
        }
        self.apply_firewall().await?;
        for r in &made {
            info!("firewall rule {} added", r.name);
        }
        Ok(Value::Array(made.iter().map(rule_json).collect()))
    }

    fn check_rule(&self, st: &State, req: FirewallRuleCreate, num: u32) -> Result<FirewallRule> {
        let name = req.name.clone().unwrap_or_else(|| format!("rule-{num}"));
        valid_name("firewall rule", &name)?;
        let action = match req.action.as_str() {
            "allow" => RuleAction::Allow,
            "deny" => RuleAction::Deny,
            a => return Err(bad_request!("invalid action {a:?}: use allow or deny")),
        };
        let from = req.from.as_deref().map(|f| parse_source("--from", f)).transpose()?;
        let to = match (&req.to_container, &req.to_network) {
            (Some(_), Some(_)) => return Err(bad_request!("--to-container and --to-network exclude each other")),
            (Some(c), None) => {
                let c = st.container(c).ok_or_else(|| not_found!("container {c} not found"))?;
                RuleTarget::Container(c.name.clone())
            }
            (None, Some(n)) => {
                let n = st.network(n).ok_or_else(|| not_found!("network {n} not found"))?;
                if n.driver != DriverKind::Bridge {
                    return Err(bad_request!(
                        "network {} is a {} network: the firewall guards bridge networks",
                        n.name,
                        n.driver.as_str()
                    ));
                }
                RuleTarget::Network(n.name.clone())
            }
            (None, None) => RuleTarget::Any,
        };
        let proto = match req.proto.as_deref() {
            Some(p) => {
                Some(RuleProto::parse(p).ok_or_else(|| bad_request!("invalid --proto {p:?}: use tcp, udp or icmp"))?)
            }
            None => None,
        };
        let ports = req.port.as_deref().map(parse_ports).transpose()?;
        if ports.is_some() && proto == Some(RuleProto::Icmp) {
            return Err(bad_request!("--port needs --proto tcp or udp (ICMP has no ports)"));
        }
        let priority = match req.priority {
            None => DEFAULT_PRIORITY,
            Some(p) => u32::try_from(p)
                .ok()
                .filter(|p| *p <= 65_535)
                .ok_or_else(|| bad_request!("invalid --priority {p}: use 0 to 65535 (lower first)"))?,
        };
        Ok(FirewallRule {
            id: state::new_id(),
            num,
            name,
            action,
            from,
            to,
            ports,
            proto,
            priority,
            created: state::now(),
        })
    }

    /// `firewall rm`.
    pub async fn remove_firewall_rule(&self, name: &str) -> Result<()> {
        self.wait_ready().await;
        let _sync = self.firewall.sync.lock().await;
        let r = self.state().rule(name).cloned().ok_or_else(|| not_found!("firewall rule {name} not found"))?;
        let rev = self.state().next_rev();
        let (store, id) = (self.store.clone(), r.id.clone());
        spawn_io(move || store.write_rule(&id, Op::Delete, rev)).await?;
        self.state().remove_rule(name);
        self.apply_firewall().await?;
        info!("firewall rule {name} removed");
        Ok(())
    }

    /// Recompiles after a change elsewhere that rules may depend on (a container or network
    /// came or went). Costs nothing while no rule, `--ingress-allow` or `default_deny` exists.
    pub(super) async fn firewall_changed(&self) {
        let _sync = self.firewall.sync.lock().await;
        let idle = {
            let st = self.state();
            st.rules().next().is_none()
                && !st.containers().any(|c| !c.ingress_allow.is_empty())
                && !st.networks().any(|n| n.opts.default_deny)
        };
        let applied_empty =
            self.firewall.applied.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_some_and(|a| a.src.is_empty());
        if idle && applied_empty && self.firewall.policed.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
            return;
        }
        if let Err(e) = self.apply_firewall().await {
            warn!("firewall: {e:#}");
        }
    }

    /// Compiles the rules, brings the tries and the networks' flags in line, and cuts the
    /// established flows the rules now deny. Callers hold `firewall.sync`.
    async fn apply_firewall(&self) -> Result<()> {
        let input = input(&self.state());
        let compiled = Compiled::compile(&input.rules);
        check_size(&compiled)?;
        {
            let mut applied = self.firewall.applied.lock().unwrap_or_else(|e| e.into_inner());
            let mut dp = self.dp();
            if applied.is_none() {
                *applied = Some(dp.policy_entries()?);
            }
            let a = applied.as_mut().expect("set above");
            let plan = a.plan(&compiled);
            if !plan.is_empty() {
                if let Err(e) = dp.apply_policy(&plan) {
                    // Half written: the next change reads what the kernel holds again.
                    *applied = None;
                    return Err(e.into());
                }
                a.done(&plan);
            }
        }
        *self.firewall.names.lock().unwrap_or_else(|e| e.into_inner()) = input.names;
        let before = std::mem::replace(
            &mut *self.firewall.policed.lock().unwrap_or_else(|e| e.into_inner()),
            input.policed.clone(),
        );
        // Networks whose POLICED bit changes get their NETWORKS entry again (after the rules
        // are in: a network marked before its containers' rules exist would check nothing).
        let nets: Vec<_> = {
            let st = self.state();
            st.networks().filter(|n| before.contains(&n.index) != input.policed.contains(&n.index)).cloned().collect()
        };
        for n in &nets {
            self.publish_network(n)?;
        }
        self.cut_denied_flows(&compiled, &input.containers).await;
        Ok(())
    }

    /// Removes the tracked flows the firewall would now refuse as new flows.
    async fn cut_denied_flows(&self, compiled: &Compiled, containers: &HashMap<u32, (u32, u32)>) {
        if compiled.sets.is_empty() && !containers.values().any(|(_, f)| f & net_flags::DEFAULT_DENY != 0) {
            return;
        }
        let (table, compiled, containers) = (self.ct_table.clone(), compiled.clone(), containers.clone());
        let gone = tokio::task::spawn_blocking(move || {
            table.flush_where(|k, e| {
                let x = &e.xlate;
                let Some((net, flags)) = containers.get(&x.daddr) else { return false };
                let same = match e.hook {
                    hook::UPLINK_IN => false,
                    hook::FROM_CONTAINER => containers.get(&k.saddr).is_some_and(|(n, _)| n == net),
                    _ => return false,
                };
                let a = |w: u32| Ipv4Addr::from(w.to_ne_bytes());
                compiled.denied(a(k.saddr), a(x.daddr), *net, *flags, same, x.proto, u16::from_be(x.dport)).is_some()
            })
        })
        .await;
        match gone {
            Ok(Ok(gone)) if !gone.is_empty() => {
                info!("firewall: cut {} flows the rules now deny", gone.len() / 2);
                self.flows_expired(&gone);
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!("firewall: cutting denied flows: {e:#}"),
            Err(e) => warn!("firewall: cutting denied flows: {e}"),
        }
    }
}

fn check_size(c: &Compiled) -> Result<()> {
    let (src, ports) = (c.src_entries(), c.port_entries());
    if src > netpath_common::MAX_POLICY_SRC as usize || ports > netpath_common::MAX_POLICY_PORTS as usize {
        return Err(conflict!(
            "the firewall rules would take {src} source entries and {ports} port entries, more than the datapath holds ({} and {}); nothing was changed",
            netpath_common::MAX_POLICY_SRC,
            netpath_common::MAX_POLICY_PORTS
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_ports_and_ingress_allows_parse_or_say_why_not() {
        assert_eq!(parse_source("--from", "10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_source("--from", "10.1.2.3").unwrap().to_string(), "10.1.2.3/32");
        assert!(parse_source("--from", "10.0.0.1/8").unwrap_err().to_string().contains("10.0.0.0/8"));
        assert!(parse_source("--from", "10.0.0.0/33").is_err());
        assert!(parse_source("--from", "example").is_err());
        assert_eq!(parse_ports("80").unwrap(), (80, 80));
        assert_eq!(parse_ports("8000-8080").unwrap(), (8000, 8080));
        assert!(parse_ports("0").unwrap_err().to_string().contains("1 to 65535"));
        assert!(parse_ports("90-80").unwrap_err().to_string().contains("ends before"));
        assert!(parse_ports("x").is_err());
        let ia = parse_ingress_allow("10.0.0.0/8:443").unwrap();
        assert_eq!((ia.from.to_string(), ia.port), ("10.0.0.0/8".into(), Some(443)));
        assert_eq!(parse_ingress_allow("192.0.2.1").unwrap().port, None);
        assert!(parse_ingress_allow("10.0.0.0/8:0").is_err());
    }
}
