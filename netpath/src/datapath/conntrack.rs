//! Conntrack housekeeping: idle timeouts and expiry (pure, unit-tested; the datapath only
//! refreshes `last_seen_ns`).

use std::collections::HashMap;
use std::time::Duration;

use netpath_common::{CtEntry, Tuple, ct_state, proto};

/// How long a flow may stay idle, by protocol and progress (as Cilium and conntrack do:
/// long for established TCP, short for half-open and closing ones).
pub fn ct_timeout(proto_nr: u8, state: u8) -> Duration {
    let secs = match (proto_nr, state) {
        (proto::TCP, ct_state::ESTABLISHED) => 6 * 3600,
        (proto::TCP, ct_state::CLOSING) => 10,
        (proto::TCP, _) => 60,
        (proto::UDP, ct_state::ESTABLISHED) => 120,
        (_, _) => 30,
    };
    Duration::from_secs(secs)
}

/// Keys of the entries to delete: flows whose newest activity (either direction) is older
/// than their timeout, judged on the furthest state either direction reached; and orphans
/// whose partner is gone (LRU eviction), once they are idle too.
pub fn expired(entries: &HashMap<Tuple, CtEntry>, now_ns: u64) -> Vec<Tuple> {
    let mut out = vec![];
    for (k, e) in entries {
        let partner = entries.get(&e.xlate.reversed());
        let last = partner.map_or(e.last_seen_ns, |p| p.last_seen_ns.max(e.last_seen_ns));
        let state = partner.map_or(e.state, |p| p.state.max(e.state));
        let idle = Duration::from_nanos(now_ns.saturating_sub(last));
        if idle > ct_timeout(k.proto, state) {
            out.push(*k);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use netpath_common::hook;

    const S: u64 = 1_000_000_000;

    fn pair(proto_nr: u8, last_fwd: u64, last_rev: u64, st_fwd: u8, st_rev: u8) -> HashMap<Tuple, CtEntry> {
        let orig = Tuple::new(1, 2, 10, 20, proto_nr);
        let x = Tuple::new(1, 3, 10, 30, proto_nr);
        let mut m = HashMap::new();
        m.insert(
            orig,
            CtEntry { xlate: x, last_seen_ns: last_fwd, hook: hook::UPLINK_IN, state: st_fwd, ..Default::default() },
        );
        m.insert(
            x.reversed(),
            CtEntry {
                xlate: orig.reversed(),
                last_seen_ns: last_rev,
                hook: hook::UPLINK_OUT,
                state: st_rev,
                is_reply: 1,
                ..Default::default()
            },
        );
        m
    }

    #[test]
    fn a_flow_lives_while_either_direction_is_active() {
        // One-way UDP stream from the server: the forward entry is old, the reply fresh.
        let m = pair(proto::UDP, 0, 100 * S, ct_state::NEW, ct_state::ESTABLISHED);
        assert!(expired(&m, 150 * S).is_empty());
        assert_eq!(expired(&m, 300 * S).len(), 2, "both entries go together");
    }

    #[test]
    fn tcp_timeouts_follow_state() {
        let half_open = pair(proto::TCP, 0, 0, ct_state::NEW, ct_state::NEW);
        assert!(expired(&half_open, 59 * S).is_empty());
        assert_eq!(expired(&half_open, 61 * S).len(), 2);
        let est = pair(proto::TCP, 0, 0, ct_state::NEW, ct_state::ESTABLISHED);
        assert!(expired(&est, 3600 * S).is_empty());
        let closing = pair(proto::TCP, 0, 0, ct_state::CLOSING, ct_state::ESTABLISHED);
        assert_eq!(expired(&closing, 11 * S).len(), 2);
    }

    #[test]
    fn orphans_expire_on_their_own_clock() {
        let mut m = pair(proto::UDP, 0, 0, ct_state::NEW, ct_state::NEW);
        let orig = Tuple::new(1, 2, 10, 20, proto::UDP);
        m.retain(|k, _| *k == orig);
        assert!(expired(&m, 10 * S).is_empty());
        assert_eq!(expired(&m, 31 * S), vec![orig]);
    }
}
