//! The firewall: `netpath firewall` rules, `run --ingress-allow` and networks'
//! `netpath.default_deny`, evaluated for every new flow to a container — from an uplink
//! (published ports, routed access), from another network (routed, hairpin), and inside a
//! network where a container or the network asks for it.
//!
//! Design: the cost of a decision must not grow with the number of rules, so nothing here walks
//! a rule list. The daemon compiles the rules (netpath/src/firewall.rs) into two
//! longest-prefix-match tries:
//!
//! - `POLICY_SRC`, keyed by (target, source prefix): a target is a container address, a
//!   network, or "any destination"; the value is a rule *set* id. The daemon gives every
//!   distinct (target, source prefix) of the rules an entry whose set holds every rule of that
//!   target whose source prefix *contains* it. Prefixes that contain one address are nested,
//!   so the longest match for a source holds exactly the rules whose source matches.
//! - `POLICY_PORTS`, keyed by (set, protocol, port) as one bit string — a rule without a
//!   protocol covers the set's whole space, one with a protocol its 8 bits, a port range the
//!   prefix blocks it splits into — holds the best-ranked verdict of every rule of the set
//!   whose block contains the entry's block. By the same nesting, the longest match for a
//!   (protocol, port) is the best rule of the set covering it.
//!
//! A decision is therefore at most three (target) times two trie lookups, whatever the number
//! of rules; the lowest rank among the (up to) three verdicts wins, and no verdict is Docker's
//! default: allow. The price is paid in userspace and memory: a broad rule is copied into the
//! set of every narrower prefix of its target (a few entries per rule in the common cases of
//! many distinct sources under a handful of broad rules).
//!
//! Only new flows are evaluated (no conntrack entry yet). Flows the firewall lets into a
//! network that tracks nothing else (its own containers' traffic) are tracked here, so their
//! replies pass without being mistaken for new flows.

use aya_ebpf::maps::lpm_trie::Key;
use netpath_common::{
    EndpointInfo, NetworkInfo, PolicyPortKey, PolicySrcKey, PolicyVerdict, net_flags, policy_action, policy_rule,
    policy_target, proto,
};

use crate::maps::{NETWORKS, POLICY_PORTS, POLICY_SRC};
use crate::parse::Packet;

/// Where a new flow comes from, relative to the destination container's network.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum From {
    /// From outside (an uplink) or from another network: every rule applies.
    Elsewhere,
    /// From a container of the destination's own network: rules naming the container apply,
    /// and with `default_deny` every rule, with deny as the default.
    SameNetwork,
}

/// No rule covers the flow. (A plain value rather than an Option: LLVM may copy an Option's
/// payload uninitialised when it is None, and the verifier refuses to read an unset register.)
const NONE: PolicyVerdict = PolicyVerdict { rank: u32::MAX, rule: 0, action: 0 };

/// The verdict of one target (NONE if no rule of it covers the flow).
#[inline(always)]
fn lookup(kind: u32, target: u32, saddr: u32, proto_nr: u8, port: u16) -> PolicyVerdict {
    let Some(set) = POLICY_SRC.get(Key::new(64 + 32, PolicySrcKey { kind, target, saddr })) else { return NONE };
    let key = PolicyPortKey { set: *set, proto: proto_nr, port: port.to_ne_bytes(), _pad: 0 };
    match POLICY_PORTS.get(Key::new(32 + 8 + 16, key)) {
        Some(v) => PolicyVerdict { rank: v.rank, rule: v.rule, action: v.action },
        None => NONE,
    }
}

/// The rule denying a new flow of `p` to container address `daddr`, port `dport` (network
/// byte order, as translated) on network `net`: None when it may pass.
#[inline(always)]
pub fn denied_to(p: &Packet, daddr: u32, dport: u16, net: &NetworkInfo, from: From) -> Option<u32> {
    let proto_nr = p.tuple.proto;
    // ICMP has no port; untranslatable packets (fragments, other protocols) show none: either
    // meets only the rules without ports.
    let port = if p.translatable && proto_nr != proto::ICMP { dport } else { 0 };
    let mut v = lookup(policy_target::CONTAINER, daddr, p.saddr, proto_nr, port);
    if from == From::Elsewhere || net.flags & net_flags::DEFAULT_DENY != 0 {
        let n = lookup(policy_target::NETWORK, net.net_id, p.saddr, proto_nr, port);
        if n.rank < v.rank {
            v = n;
        }
        let a = lookup(policy_target::ANY, 0, p.saddr, proto_nr, port);
        if a.rank < v.rank {
            v = a;
        }
    }
    if v.action == policy_action::ALLOW {
        return None;
    }
    if v.action == policy_action::DENY {
        return Some(v.rule);
    }
    if from == From::SameNetwork && net.flags & net_flags::DEFAULT_DENY != 0 {
        return Some(policy_rule::NETWORK_DEFAULT_DENY | net.net_id);
    }
    None
}

/// [`denied_to`] for a flow to `daddr`, which may not be a container at all (then nothing
/// applies: the firewall guards containers). `src`: the sending container, if one sends.
#[inline(always)]
pub fn denied(p: &Packet, daddr: u32, dport: u16, src: Option<&EndpointInfo>) -> Option<u32> {
    let net = NETWORKS.get(Key::new(32, daddr))?;
    if net.gateway == daddr {
        return None; // the host's own address on that network
    }
    let from = if src.is_some_and(|s| s.net_id == net.net_id) { From::SameNetwork } else { From::Elsewhere };
    denied_to(p, daddr, dport, net, from)
}

/// A packet between two containers of one network, which netpath otherwise leaves alone: the
/// network's NetworkInfo when the firewall must look at it (a container of the network has
/// rules of its own, or the network denies by default).
#[inline(always)]
pub fn guarded_network(p: &Packet, src: Option<&EndpointInfo>) -> Option<NetworkInfo> {
    let src = src?;
    guarded_destination(p).filter(|net| net.net_id == src.net_id)
}

/// The network of `p`'s destination container when the firewall must look at flows inside it
/// (a container of it has rules of its own, or it denies by default). Also for a flow another
/// node's container of an overlay sends to one here (`vxlan_in`): its sender's node did not
/// look, as the rules of a container live where it runs.
#[inline(always)]
pub fn guarded_destination(p: &Packet) -> Option<NetworkInfo> {
    let net = *NETWORKS.get(Key::new(32, p.daddr))?;
    let guarded = net.flags & (net_flags::DEFAULT_DENY | net_flags::POLICED) != 0;
    (guarded && net.gateway != p.daddr).then_some(net)
}
