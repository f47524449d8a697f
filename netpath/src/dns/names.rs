//! The name table: which names a container may resolve, scoped by the networks it shares with
//! the containers named. Pure data, updated incrementally: adding or removing one container
//! touches only its own names, whatever the number of others.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use super::{ContainerView, EndpointView};

/// Names and reverse names of one network.
#[derive(Debug, Default)]
struct NetIndex {
    /// Display name of the network (for `NAME.NETWORK` and PTR answers), lowercase.
    name: String,
    /// Lowercase name (container name, alias, short ID) → addresses, in the order the
    /// containers came up.
    names: HashMap<String, Vec<Ipv4Addr>>,
    /// Address → `name.network`.
    ptrs: HashMap<Ipv4Addr, String>,
    /// Address → when its container came up (orders `names`; addresses are unique per network).
    seq: HashMap<Ipv4Addr, u64>,
    /// Resolving endpoints on this network: the index goes with the last one.
    members: usize,
}

#[derive(Debug, Default)]
pub struct Table {
    /// Bumped per new container: alias answers list addresses in this order (then rotated).
    next_seq: u64,
    containers: HashMap<String, (u64, ContainerView)>,
    /// Network id → index; only networks with name resolution.
    nets: HashMap<String, NetIndex>,
    /// Network id → service names (lowercase: `NAME`, `tasks.NAME`) → addresses.
    services: ServiceNames,
}

/// Service names per network: network id → lowercase name → addresses.
type ServiceNames = HashMap<String, HashMap<String, Vec<Ipv4Addr>>>;

/// Length of the short container IDs that resolve, as Docker's.
pub const SHORT_ID: usize = 12;

/// The names one endpoint of `c` answers to, lowercase.
fn names_of(c: &ContainerView, e: &EndpointView) -> Vec<String> {
    let short = &c.id[..c.id.len().min(SHORT_ID)];
    let mut names: Vec<String> = std::iter::once(c.name.as_str())
        .chain(e.aliases.iter().map(String::as_str))
        .chain(std::iter::once(short))
        .map(str::to_ascii_lowercase)
        .collect();
    names.sort();
    names.dedup();
    names
}

impl Table {
    /// Adds or replaces a container; returns whether anything changed.
    pub fn upsert(&mut self, c: ContainerView) -> bool {
        let seq = match self.containers.remove(&c.id) {
            Some((seq, old)) if old == c => {
                self.containers.insert(c.id.clone(), (seq, old));
                return false;
            }
            Some((seq, old)) => {
                self.unindex(&old);
                seq
            }
            None => {
                self.next_seq += 1;
                self.next_seq
            }
        };
        self.index(seq, &c);
        self.containers.insert(c.id.clone(), (seq, c));
        true
    }

    /// Removes a container; returns it if it was there.
    pub fn remove(&mut self, id: &str) -> Option<ContainerView> {
        let (_, c) = self.containers.remove(id)?;
        self.unindex(&c);
        Some(c)
    }

    pub fn get(&self, id: &str) -> Option<&ContainerView> {
        self.containers.get(id).map(|(_, c)| c)
    }

    fn index(&mut self, seq: u64, c: &ContainerView) {
        for e in c.resolving() {
            let idx = self.nets.entry(e.network_id.clone()).or_default();
            idx.name = e.network_name.to_ascii_lowercase();
            idx.members += 1;
            let Some(ip) = e.ipv4 else { continue };
            idx.seq.insert(ip, seq);
            for n in names_of(c, e) {
                let addrs = idx.names.entry(n).or_default();
                if !addrs.contains(&ip) {
                    let at = addrs.partition_point(|a| idx.seq.get(a).copied().unwrap_or(0) < seq);
                    addrs.insert(at, ip);
                }
            }
            idx.ptrs.entry(ip).or_insert_with(|| format!("{}.{}", c.name, e.network_name));
        }
    }

    fn unindex(&mut self, c: &ContainerView) {
        for e in c.resolving() {
            let Some(idx) = self.nets.get_mut(&e.network_id) else { continue };
            idx.members = idx.members.saturating_sub(1);
            if let Some(ip) = e.ipv4 {
                for n in names_of(c, e) {
                    if let Some(addrs) = idx.names.get_mut(&n) {
                        addrs.retain(|a| *a != ip);
                        if addrs.is_empty() {
                            idx.names.remove(&n);
                        }
                    }
                }
                idx.ptrs.remove(&ip);
                idx.seq.remove(&ip);
            }
            if idx.members == 0 {
                self.nets.remove(&e.network_id);
            }
        }
    }

    /// Replaces one service's names: the `old` (network id, name) pairs go, the `new` ones are
    /// set. Costs that service's names, not every service's.
    pub fn replace_service_names(&mut self, old: &[(String, String)], new: Vec<(String, String, Vec<Ipv4Addr>)>) {
        for (net, name) in old {
            if let Some(names) = self.services.get_mut(net) {
                names.remove(name);
                if names.is_empty() {
                    self.services.remove(net);
                }
            }
        }
        for (net, name, addrs) in new {
            self.services.entry(net).or_default().insert(name, addrs);
        }
    }

    /// The networks `asker` resolves names on, in its endpoint order.
    fn scopes<'a>(&'a self, asker: &'a str) -> impl Iterator<Item = &'a NetIndex> + 'a {
        self.get(asker).into_iter().flat_map(|c| c.resolving()).filter_map(|e| self.nets.get(&e.network_id))
    }

    /// Addresses of `qname` (lowercase, no trailing dot) as `asker` sees them: the first of its
    /// networks that knows the name answers (as Docker's resolver does); `NAME.NETWORK` looks in
    /// that network only. `None`: not a name of a container it shares a network with.
    pub fn resolve<'a>(&'a self, asker: &'a str, qname: &str) -> Option<&'a [Ipv4Addr]> {
        // Services of the asker's networks first, as swarm's resolver answers them.
        let svc =
            self.get(asker).into_iter().flat_map(|c| c.resolving()).find_map(|e| {
                self.services.get(&e.network_id)?.get(qname).filter(|a| !a.is_empty()).map(Vec::as_slice)
            });
        if svc.is_some() {
            return svc;
        }
        if let Some(a) = self.scopes(asker).find_map(|n| n.names.get(qname)) {
            return Some(a);
        }
        // Network names may contain dots too: match the suffix against each network's name.
        self.scopes(asker).find_map(|n| {
            let prefix = qname.strip_suffix(n.name.as_str())?.strip_suffix('.')?;
            n.names.get(prefix).map(Vec::as_slice)
        })
    }

    /// The `name.network` of a container address `asker` shares a network with.
    pub fn reverse<'a>(&'a self, asker: &'a str, ip: Ipv4Addr) -> Option<&'a str> {
        self.scopes(asker).find_map(|n| n.ptrs.get(&ip)).map(String::as_str)
    }
}

/// True for a name DNS can carry as we use it: dot-separated labels of letters, digits, '-'
/// and '_', each 1-63 long, at most 253 in all, not starting or ending with '-'.
pub fn valid_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

#[cfg(test)]
mod tests {
    use super::super::EndpointView;
    use super::*;

    fn ep(net: &str, ip: &str, aliases: &[&str]) -> EndpointView {
        EndpointView {
            network_id: format!("id-{net}"),
            network_name: net.into(),
            resolves: net != "bridge",
            ipv4: Some(ip.parse().unwrap()),
            aliases: aliases.iter().map(|s| s.to_string()).collect(),
            internal: false,
        }
    }

    fn ctr(id: &str, name: &str, eps: Vec<EndpointView>) -> ContainerView {
        ContainerView {
            id: format!("{id:0<64}"),
            name: name.into(),
            hostname: id.into(),
            netns: None,
            endpoints: eps,
            dns: vec![],
            dns_search: vec![],
            host_network: false,
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn id(s: &str) -> String {
        format!("{s:0<64}")
    }

    #[test]
    fn names_aliases_and_short_ids_resolve_within_shared_networks_only() {
        let mut t = Table::default();
        t.upsert(ctr("aaa", "web", vec![ep("front", "10.1.0.2", &["www"])]));
        t.upsert(ctr("bbb", "db", vec![ep("back", "10.2.0.2", &[])]));
        t.upsert(ctr("ccc", "app", vec![ep("front", "10.1.0.3", &[]), ep("back", "10.2.0.3", &[])]));
        t.upsert(ctr("ddd", "old", vec![ep("bridge", "172.17.0.2", &[])]));
        let app = id("ccc");
        assert_eq!(t.resolve(&app, "web"), Some(&[ip("10.1.0.2")][..]));
        assert_eq!(t.resolve(&app, "www"), Some(&[ip("10.1.0.2")][..]));
        assert_eq!(t.resolve(&app, "db"), Some(&[ip("10.2.0.2")][..]));
        assert_eq!(t.resolve(&app, "aaa000000000"), Some(&[ip("10.1.0.2")][..]), "short id");
        assert_eq!(t.resolve(&app, "app"), Some(&[ip("10.1.0.3")][..]), "itself, first network first");
        assert_eq!(t.resolve(&app, "app.back"), Some(&[ip("10.2.0.3")][..]), "NAME.NETWORK");
        assert_eq!(t.resolve(&app, "web.back"), None, "not on that network");
        assert_eq!(t.resolve(&app, "old"), None, "default bridge has no names");
        let web = id("aaa");
        assert_eq!(t.resolve(&web, "db"), None, "no shared network");
        assert_eq!(t.resolve(&id("ddd"), "web"), None, "a bridge container resolves nothing");
        assert_eq!(t.reverse(&web, ip("10.1.0.3")), Some("app.front"));
        assert_eq!(t.reverse(&web, ip("10.2.0.2")), None);
        assert_eq!(t.resolve("unknown", "web"), None);
    }

    #[test]
    fn shared_aliases_list_every_address_and_removal_is_immediate() {
        let mut t = Table::default();
        t.upsert(ctr("a1", "one", vec![ep("n", "10.0.0.2", &["svc"])]));
        t.upsert(ctr("a2", "two", vec![ep("n", "10.0.0.3", &["svc"])]));
        let asker = id("a1");
        assert_eq!(t.resolve(&asker, "svc"), Some(&[ip("10.0.0.2"), ip("10.0.0.3")][..]));
        assert!(t.remove(&id("a2")).is_some());
        assert_eq!(t.resolve(&asker, "svc"), Some(&[ip("10.0.0.2")][..]));
        assert_eq!(t.resolve(&asker, "two"), None);
        // Re-created with a new address: the new one at once.
        t.upsert(ctr("a3", "two", vec![ep("n", "10.0.0.9", &[])]));
        assert_eq!(t.resolve(&asker, "two"), Some(&[ip("10.0.0.9")][..]));
        // Disconnected (endpoint gone): gone; an unchanged upsert reports no change.
        assert!(t.upsert(ctr("a3", "two", vec![])));
        assert!(!t.upsert(ctr("a3", "two", vec![])));
        assert_eq!(t.resolve(&asker, "two"), None);
    }

    #[test]
    fn names_are_case_insensitive_and_dotted_network_names_work() {
        let mut t = Table::default();
        t.upsert(ctr("a1", "Web", vec![ep("my.net", "10.0.0.2", &[])]));
        t.upsert(ctr("a2", "x", vec![ep("my.net", "10.0.0.3", &[])]));
        assert_eq!(t.resolve(&id("a2"), "web"), Some(&[ip("10.0.0.2")][..]));
        assert_eq!(t.resolve(&id("a2"), "web.my.net"), Some(&[ip("10.0.0.2")][..]));
    }

    #[test]
    fn name_validation() {
        for ok in ["web", "my-alias", "a.b.c", "x_y", "example.com.", &"a".repeat(63)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", ".", "-a", "a-", "a..b", "a b", "ä", &"a".repeat(64), &["abc"; 70].join(".")] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
