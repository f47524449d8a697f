//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), as katran uses it: each backend
//! fills the table in the order of its own permutation of the slots, round-robin with the
//! others, so every backend gets M/N slots (±1) and removing one changes little more than the
//! slots it held. The datapath indexes the table by a flow's hash modulo M.

use std::net::Ipv4Addr;

/// A backend's seed: a stable 64-bit hash of its address (FNV-1a), two seeds per backend.
fn fnv(seed: u64, data: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // FNV's low bits mix poorly: finish with a 64-bit avalanche (splitmix64).
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The lookup table of `m` entries (a prime) over `backends`: each entry is an index into
/// `backends`. Empty when there is no backend. The order of `backends` does not matter.
pub fn table(backends: &[Ipv4Addr], m: usize) -> Vec<Ipv4Addr> {
    let mut sorted = backends.to_vec();
    sorted.sort();
    sorted.dedup();
    let n = sorted.len();
    if n == 0 {
        return vec![];
    }
    let perms: Vec<(usize, usize)> = sorted
        .iter()
        .map(|b| {
            let o = b.octets();
            let offset = (fnv(0x5eed_0001, &o) % m as u64) as usize;
            let skip = (fnv(0x5eed_0002, &o) % (m as u64 - 1) + 1) as usize;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0usize; n];
    let mut entry: Vec<Option<usize>> = vec![None; m];
    let mut filled = 0;
    'fill: loop {
        for i in 0..n {
            let (offset, skip) = perms[i];
            let mut c = (offset + next[i] * skip) % m;
            while entry[c].is_some() {
                next[i] += 1;
                c = (offset + next[i] * skip) % m;
            }
            entry[c] = Some(i);
            next[i] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    entry.into_iter().map(|e| sorted[e.expect("every slot filled")]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn addrs(n: u8) -> Vec<Ipv4Addr> {
        (1..=n).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect()
    }

    fn counts(t: &[Ipv4Addr]) -> HashMap<Ipv4Addr, usize> {
        let mut c = HashMap::new();
        for a in t {
            *c.entry(*a).or_default() += 1;
        }
        c
    }

    const M: usize = netpath_common::MAGLEV_M as usize;

    #[test]
    fn every_backend_gets_its_share_within_a_few_percent() {
        for n in [1u8, 2, 3, 5, 10, 25] {
            let t = table(&addrs(n), M);
            assert_eq!(t.len(), M);
            let c = counts(&t);
            assert_eq!(c.len(), n as usize, "every backend has slots");
            let share = M as f64 / f64::from(n);
            for (a, k) in c {
                // Maglev's round-robin fill: floor or ceil of M/N.
                assert!((k as f64 - share).abs() <= 1.0, "{n} backends: {a} has {k} slots, share {share:.1}");
            }
        }
    }

    #[test]
    fn removing_one_of_n_backends_remaps_little_more_than_its_slots() {
        for n in [3u8, 5, 10] {
            let all = addrs(n);
            let before = table(&all, M);
            let gone = all[n as usize / 2];
            let rest: Vec<_> = all.iter().copied().filter(|a| *a != gone).collect();
            let after = table(&rest, M);
            assert!(after.iter().all(|a| *a != gone));
            let moved_others = before.iter().zip(&after).filter(|(b, a)| **b != gone && b != a).count();
            let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
            // The removed backend's 1/N must move; of the others' slots, at most a few percent.
            assert!(moved_others * 100 <= M * 5, "{n}: {moved_others} slots of remaining backends moved");
            assert!(moved * 100 <= M * (100 / n as usize + 5), "{n}: {moved} of {M} slots moved");
        }
    }

    #[test]
    fn the_order_backends_are_given_in_does_not_matter() {
        let mut a = addrs(7);
        let t1 = table(&a, M);
        a.reverse();
        assert_eq!(t1, table(&a, M));
        assert!(table(&[], M).is_empty());
    }
}
