//! The firewall compiler: rules (ordered by rank) → the two longest-prefix tries the datapath
//! looks new flows up in (the design is in netpath-ebpf/src/firewall.rs), the diff that
//! brings the kernel's tries from what they hold to what they should, and a model of the
//! datapath's decision (used to cut established flows a new rule denies, and in tests).
//!
//! Pure: no kernel, no daemon state. The daemon turns its rules into [`Rule`]s.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use netpath_common::{
    PolicyPortKey, PolicySrcKey, PolicyVerdict, net_flags, policy_action, policy_rule, policy_target, proto,
};

/// What a rule guards: `policy_target::*` and the container address (wire order) or network id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    pub kind: u32,
    pub id: u32,
}

impl Target {
    pub const ANY: Target = Target { kind: policy_target::ANY, id: 0 };
    pub fn network(net_id: u32) -> Self {
        Target { kind: policy_target::NETWORK, id: net_id }
    }
    pub fn container(addr: Ipv4Addr) -> Self {
        Target { kind: policy_target::CONTAINER, id: crate::datapath::wire_addr(addr) }
    }
}

/// One rule as the compiler takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Lower is evaluated first; unique.
    pub rank: u32,
    /// Reported in flow events.
    pub id: u32,
    pub allow: bool,
    pub target: Target,
    pub src: Ipv4Net,
    /// None: every protocol.
    pub proto: Option<u8>,
    /// Inclusive; None: every port (and port-less packets).
    pub ports: Option<(u16, u16)>,
}

impl Rule {
    fn verdict(&self) -> PolicyVerdict {
        let action = if self.allow { policy_action::ALLOW } else { policy_action::DENY };
        PolicyVerdict { rank: self.rank, rule: self.id, action }
    }
}

/// A block of the 24-bit (protocol << 16 | port) space: its value and how many leading bits
/// of it count (0: everything, 8: one protocol, 8 + n: a port block of that protocol).
pub type Block = (u32, u8);

fn mask24(len: u8) -> u32 {
    if len == 0 { 0 } else { 0x00ff_ffff & !((1u32 << (24 - u32::from(len))) - 1) }
}

/// A port range as the fewest prefix blocks (start, prefix length over 16 bits).
pub fn port_blocks(lo: u16, hi: u16) -> Vec<(u32, u8)> {
    let (mut a, b) = (u32::from(lo), u32::from(hi));
    let mut out = vec![];
    while a <= b {
        let mut k = 0;
        while k < 16 && a.is_multiple_of(1 << (k + 1)) && a + (1 << (k + 1)) - 1 <= b {
            k += 1;
        }
        out.push((a, 16 - k as u8));
        a += 1 << k;
    }
    out
}

/// The blocks a rule covers. Ports without a protocol mean TCP and UDP (the protocols with ports).
fn blocks(r: &Rule) -> Vec<Block> {
    match (r.proto, r.ports) {
        (None, None) => vec![(0, 0)],
        (Some(p), None) => vec![(u32::from(p) << 16, 8)],
        (p, Some((lo, hi))) => {
            let protos = p.map_or(vec![proto::TCP, proto::UDP], |p| vec![p]);
            let mut v = vec![];
            for pr in protos {
                for (start, len) in port_blocks(lo, hi) {
                    v.push(((u32::from(pr) << 16) | start, 8 + len));
                }
            }
            v
        }
    }
}

/// The rules compiled: for every (target, source prefix) of the rules, its set's verdict per
/// (protocol, port) block.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Compiled {
    pub sets: HashMap<(Target, Ipv4Net), HashMap<Block, PolicyVerdict>>,
}

impl Compiled {
    pub fn compile(rules: &[Rule]) -> Self {
        let mut by_target: HashMap<Target, HashMap<Ipv4Net, Vec<&Rule>>> = HashMap::new();
        for r in rules {
            by_target.entry(r.target).or_default().entry(r.src.trunc()).or_default().push(r);
        }
        let mut sets = HashMap::new();
        for (t, prefixes) in &by_target {
            for p in prefixes.keys() {
                // Every rule whose source prefix contains p: p's ancestors, p included.
                let mut best: HashMap<Block, PolicyVerdict> = HashMap::new();
                for len in 0..=p.prefix_len() {
                    let a = Ipv4Net::new(p.network(), len).expect("length within /32").trunc();
                    for r in prefixes.get(&a).into_iter().flatten() {
                        let v = r.verdict();
                        for b in blocks(r) {
                            best.entry(b)
                                .and_modify(|x| {
                                    if v.rank < x.rank {
                                        *x = v
                                    }
                                })
                                .or_insert(v);
                        }
                    }
                }
                // A block's verdict: the best of every block containing it (itself included).
                let resolved = best
                    .keys()
                    .map(|&(v, l)| {
                        let top = (0..=l).filter_map(|a| best.get(&(v & mask24(a), a))).min_by_key(|x| x.rank);
                        ((v, l), *top.expect("the block itself"))
                    })
                    .collect();
                sets.insert((*t, *p), resolved);
            }
        }
        Compiled { sets }
    }

    pub fn src_entries(&self) -> usize {
        self.sets.len()
    }

    pub fn port_entries(&self) -> usize {
        self.sets.values().map(|s| s.len()).sum()
    }

    /// The datapath's lookup of one target, modelled: longest source prefix, then longest
    /// (protocol, port) block.
    pub fn lookup(&self, t: Target, saddr: Ipv4Addr, proto_nr: u8, port: u16) -> Option<PolicyVerdict> {
        let set = (0..=32u8)
            .rev()
            .find_map(|len| self.sets.get(&(t, Ipv4Net::new(saddr, len).expect("len ≤ 32").trunc())))?;
        let v = (u32::from(proto_nr) << 16) | u32::from(port);
        (0..=24u8).rev().find_map(|l| set.get(&(v & mask24(l), l))).copied()
    }

    /// The datapath's decision, modelled (netpath-ebpf/src/firewall.rs `denied_to`): the rule
    /// denying a new flow from `saddr` to container `daddr` on network (`net_id`, `flags`),
    /// or None. `port`: the destination port as the container sees it (ignored for ICMP).
    #[allow(clippy::too_many_arguments)]
    pub fn denied(
        &self,
        saddr: Ipv4Addr,
        daddr: Ipv4Addr,
        net_id: u32,
        flags: u32,
        same_network: bool,
        proto_nr: u8,
        port: u16,
    ) -> Option<u32> {
        let port = if proto_nr == proto::ICMP { 0 } else { port };
        let mut v = self.lookup(Target::container(daddr), saddr, proto_nr, port);
        if !same_network || flags & net_flags::DEFAULT_DENY != 0 {
            for t in [Target::network(net_id), Target::ANY] {
                if let Some(x) = self.lookup(t, saddr, proto_nr, port)
                    && v.is_none_or(|y| x.rank < y.rank)
                {
                    v = Some(x);
                }
            }
        }
        match v {
            Some(v) if v.action == policy_action::ALLOW => None,
            Some(v) => Some(v.rule),
            None if same_network && flags & net_flags::DEFAULT_DENY != 0 => {
                Some(policy_rule::NETWORK_DEFAULT_DENY | net_id)
            }
            None => None,
        }
    }
}

/// A POLICY_SRC entry as the kernel keys it: (prefix length, key data).
pub type SrcKey = (u32, PolicySrcKey);
/// A POLICY_PORTS entry as the kernel keys it.
pub type PortKey = (u32, PolicyPortKey);

pub fn src_key(t: Target, p: Ipv4Net) -> SrcKey {
    let data = PolicySrcKey { kind: t.kind, target: t.id, saddr: crate::datapath::wire_addr(p.network()) };
    (64 + u32::from(p.prefix_len()), data)
}

pub fn port_key(set: u32, (v, l): Block) -> PortKey {
    let port = ((v & 0xffff) as u16).to_be_bytes();
    (32 + u32::from(l), PolicyPortKey { set, proto: (v >> 16) as u8, port, _pad: 0 })
}

/// What the kernel's tries hold (as this daemon wrote them, or found them at start), with
/// the set ids handed out, so that a change rewrites only the entries it changes.
#[derive(Debug, Default)]
pub struct Applied {
    pub src: HashMap<SrcKey, u32>,
    pub ports: HashMap<PortKey, PolicyVerdict>,
    /// Set ids free for the next change (not this one: a set id removed and reused in one
    /// change could briefly be read with the other set's entries).
    free: Vec<u32>,
    next: u32,
}

/// Kernel writes, in the order they must happen: a set's verdicts before the source entry
/// that points at it, removals after.
#[derive(Debug, Default)]
pub struct Plan {
    pub put_ports: Vec<(PortKey, PolicyVerdict)>,
    pub put_src: Vec<(SrcKey, u32)>,
    pub del_src: Vec<SrcKey>,
    pub del_ports: Vec<PortKey>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.put_ports.is_empty() && self.put_src.is_empty() && self.del_src.is_empty() && self.del_ports.is_empty()
    }
}

impl Applied {
    /// What the kernel holds now (a daemon starting): set ids in use stay as they are.
    pub fn from_kernel(src: Vec<(SrcKey, u32)>, ports: Vec<(PortKey, PolicyVerdict)>) -> Self {
        let src: HashMap<SrcKey, u32> = src.into_iter().collect();
        let next = src.values().copied().max().map_or(1, |m| m + 1);
        Applied { src, ports: ports.into_iter().collect(), free: vec![], next }
    }

    /// The writes that make the kernel hold `c`; [`Applied::done`] records them once made.
    pub fn plan(&mut self, c: &Compiled) -> Plan {
        let mut plan = Plan::default();
        let mut keep_src: HashMap<SrcKey, u32> = HashMap::new();
        let mut want_ports: HashMap<PortKey, PolicyVerdict> = HashMap::new();
        for ((t, p), set) in &c.sets {
            let k = src_key(*t, *p);
            let id = match self.src.get(&k) {
                Some(id) => *id,
                None => match self.free.pop() {
                    Some(id) => id,
                    None => {
                        self.next += 1;
                        self.next - 1
                    }
                },
            };
            keep_src.insert(k, id);
            for (b, v) in set {
                want_ports.insert(port_key(id, *b), *v);
            }
        }
        for (k, v) in &want_ports {
            if self.ports.get(k) != Some(v) {
                plan.put_ports.push((*k, *v));
            }
        }
        for (k, id) in &keep_src {
            if self.src.get(k) != Some(id) {
                plan.put_src.push((*k, *id));
            }
        }
        plan.del_src = self.src.keys().filter(|k| !keep_src.contains_key(k)).copied().collect();
        plan.del_ports = self.ports.keys().filter(|k| !want_ports.contains_key(k)).copied().collect();
        plan
    }

    /// Records a plan as carried out.
    pub fn done(&mut self, plan: &Plan) {
        let kept: HashSet<u32> = self.src.iter().filter(|(k, _)| !plan.del_src.contains(k)).map(|(_, v)| *v).collect();
        for k in &plan.del_src {
            if let Some(id) = self.src.remove(k)
                && !kept.contains(&id)
                && !plan.put_src.iter().any(|(_, x)| *x == id)
            {
                self.free.push(id);
            }
        }
        for (k, id) in &plan.put_src {
            self.src.insert(*k, *id);
        }
        for k in &plan.del_ports {
            self.ports.remove(k);
        }
        for (k, v) in &plan.put_ports {
            self.ports.insert(*k, *v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn rule(rank: u32, allow: bool, t: Target, src: &str, proto: Option<u8>, ports: Option<(u16, u16)>) -> Rule {
        Rule { rank, id: rank, allow, target: t, src: net(src), proto, ports }
    }

    /// The plain definition: the first rule by rank that matches, of the targets that apply.
    fn naive(rules: &[Rule], targets: &[Target], saddr: Ipv4Addr, proto_nr: u8, port: u16) -> Option<u32> {
        let mut rs: Vec<&Rule> = rules.iter().collect();
        rs.sort_by_key(|r| r.rank);
        rs.into_iter()
            .find(|r| {
                targets.contains(&r.target)
                    && r.src.contains(&saddr)
                    && r.proto.is_none_or(|p| p == proto_nr)
                    && match r.ports {
                        None => true,
                        Some((lo, hi)) => {
                            matches!(proto_nr, proto::TCP | proto::UDP) && port != 0 && (lo..=hi).contains(&port)
                        }
                    }
            })
            .map(|r| r.id)
    }

    #[test]
    fn port_ranges_split_into_prefix_blocks() {
        assert_eq!(port_blocks(80, 80), vec![(80, 16)]);
        assert_eq!(port_blocks(0, 65535), vec![(0, 0)]);
        assert_eq!(port_blocks(8000, 8003), vec![(8000, 14)]);
        assert_eq!(port_blocks(1, 65535).len(), 16);
        let b = port_blocks(1000, 2000);
        let covered: u32 = b.iter().map(|(_, l)| 1u32 << (16 - l)).sum();
        assert_eq!(covered, 1001);
    }

    #[test]
    fn the_longest_prefix_holds_every_rule_that_matches_in_rank_order() {
        let c = Target::container(ip("172.18.0.2"));
        let rules = vec![
            rule(1, true, c, "10.1.2.0/24", Some(proto::TCP), Some((80, 80))),
            rule(2, false, c, "10.0.0.0/8", None, None),
            rule(3, true, c, "10.1.2.3/32", None, None),
            rule(4, true, c, "0.0.0.0/0", Some(proto::TCP), Some((1, 1024))),
        ];
        let k = Compiled::compile(&rules);
        let v = |s: &str, p: u8, port: u16| k.lookup(c, ip(s), p, port).map(|v| v.rule);
        assert_eq!(v("10.1.2.3", proto::TCP, 80), Some(1), "priority beats the longer prefix");
        assert_eq!(v("10.1.2.3", proto::TCP, 81), Some(2), "the /8 deny outranks the /32 allow");
        assert_eq!(v("10.9.9.9", proto::UDP, 53), Some(2));
        assert_eq!(v("192.0.2.1", proto::TCP, 443), Some(4));
        assert_eq!(v("192.0.2.1", proto::TCP, 8080), None, "no rule: the default");
        assert_eq!(v("192.0.2.1", proto::ICMP, 0), None);
    }

    #[test]
    fn compiled_lookups_agree_with_first_match_on_random_rules() {
        let mut seed = 0x1234_5678_u64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let targets = [Target::ANY, Target::network(3), Target::container(ip("172.18.0.9"))];
        for round in 0..40 {
            let n = 1 + rnd(30) as u32;
            let mut rules = vec![];
            for i in 0..n {
                let len = [0, 8, 16, 24, 28, 32][rnd(6) as usize];
                let a = Ipv4Addr::from(0x0a00_0000 | (rnd(4) << 16 | rnd(4) << 8 | rnd(4)) as u32);
                let proto_nr = [None, Some(proto::TCP), Some(proto::UDP), Some(proto::ICMP)][rnd(4) as usize];
                let ports = if proto_nr == Some(proto::ICMP) || rnd(3) == 0 {
                    None
                } else {
                    let lo = 1 + rnd(100) as u16;
                    Some((lo, lo + rnd(40) as u16))
                };
                let t = targets[rnd(3) as usize];
                rules.push(Rule {
                    rank: i * 3 + 1,
                    id: 100 + i,
                    allow: rnd(2) == 0,
                    target: t,
                    src: Ipv4Net::new(a, len).unwrap().trunc(),
                    proto: proto_nr,
                    ports,
                });
            }
            let k = Compiled::compile(&rules);
            for _ in 0..300 {
                let s = Ipv4Addr::from(0x0a00_0000 | (rnd(4) << 16 | rnd(4) << 8 | rnd(4)) as u32);
                let p = [proto::TCP, proto::UDP, proto::ICMP, 47][rnd(4) as usize];
                let port = if matches!(p, proto::TCP | proto::UDP) { rnd(150) as u16 } else { 0 };
                for t in targets {
                    let want = naive(&rules, &[t], s, p, port);
                    assert_eq!(k.lookup(t, s, p, port).map(|v| v.rule), want, "round {round} {t:?} {s} {p}/{port}");
                }
            }
        }
    }

    #[test]
    fn decisions_follow_targets_default_allow_and_default_deny() {
        let web = ip("172.18.0.2");
        let rules = vec![
            rule(1, false, Target::ANY, "203.0.113.0/24", None, None),
            rule(2, true, Target::network(1), "172.18.0.3/32", Some(proto::TCP), Some((80, 80))),
        ];
        let k = Compiled::compile(&rules);
        assert_eq!(k.denied(ip("203.0.113.7"), web, 1, 0, false, proto::TCP, 80), Some(1));
        assert_eq!(k.denied(ip("198.51.100.7"), web, 1, 0, false, proto::TCP, 80), None, "default allow");
        // Inside a network, only rules naming the container apply, unless it denies by default.
        assert_eq!(k.denied(ip("203.0.113.7"), web, 1, 0, true, proto::TCP, 80), None);
        let dd = net_flags::DEFAULT_DENY;
        assert_eq!(k.denied(ip("172.18.0.3"), web, 1, dd, true, proto::TCP, 80), None, "explicitly allowed");
        assert_eq!(
            k.denied(ip("172.18.0.3"), web, 1, dd, true, proto::TCP, 81),
            Some(policy_rule::NETWORK_DEFAULT_DENY | 1)
        );
        assert_eq!(k.denied(ip("172.18.0.4"), web, 1, dd, false, proto::TCP, 81), None, "from elsewhere: allow");
    }

    #[test]
    fn many_distinct_sources_under_a_broad_rule_cost_a_few_entries_each() {
        let c = Target::container(ip("172.18.0.2"));
        let mut rules: Vec<Rule> = (0..10_000u32)
            .map(|i| {
                let src = format!("10.{}.{}.0/24", i / 250, i % 250);
                rule(i + 1, false, c, &src, Some(proto::TCP), Some((8080, 8080)))
            })
            .collect();
        rules.push(rule(10_001, true, c, "0.0.0.0/0", None, None));
        let k = Compiled::compile(&rules);
        assert_eq!(k.src_entries(), 10_001);
        assert_eq!(k.port_entries(), 10_000 * 2 + 1, "each /24's own deny and the broad allow, copied once");
        assert_eq!(k.lookup(c, ip("10.3.7.9"), proto::TCP, 8080).map(|v| v.rule), Some(758));
        assert_eq!(k.lookup(c, ip("10.3.7.9"), proto::TCP, 80).map(|v| v.rule), Some(10_001));
    }

    #[test]
    fn plans_write_sets_before_pointing_at_them_and_only_what_changed() {
        let c = Target::container(ip("172.18.0.2"));
        let mut a = Applied::default();
        let k1 = Compiled::compile(&[rule(1, false, c, "10.0.0.0/8", None, None)]);
        let p = a.plan(&k1);
        assert_eq!((p.put_ports.len(), p.put_src.len(), p.del_src.len(), p.del_ports.len()), (1, 1, 0, 0));
        a.done(&p);
        assert!(a.plan(&k1).is_empty(), "nothing changed");
        let k2 = Compiled::compile(&[
            rule(1, false, c, "10.0.0.0/8", None, None),
            rule(2, true, c, "10.1.0.0/16", Some(proto::TCP), Some((22, 22))),
        ]);
        let p = a.plan(&k2);
        assert_eq!(p.put_src.len(), 1, "only the new prefix");
        assert_eq!(p.put_ports.len(), 2, "its set: the /8's deny and its own allow");
        a.done(&p);
        let p = a.plan(&Compiled::default());
        assert_eq!((p.del_src.len(), p.del_ports.len()), (2, 3));
        a.done(&p);
        assert!(a.src.is_empty() && a.ports.is_empty());
        // Freed set ids are handed out again by a later change.
        let p = a.plan(&k1);
        assert!(p.put_src[0].1 <= 2);
    }
}
