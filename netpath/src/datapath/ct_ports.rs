//! CT_PORTS: the bits in front of the conntrack lookup of packets from outside (see
//! netpath_common::ct_ports). A complete array has the bit of every entry CT holds that
//! applies at the uplink's ingress; the programs keep it so (a key's bit is set before the
//! entry is inserted) and read it to skip the lookup of a packet whose bit is clear.
//!
//! The daemon's part is at start, where it cannot vouch for the bits: a new array (the first
//! start of a build that has it, or one of another layout), a CT it migrates (the entries it
//! copies carry no bits), or an array a daemon left incomplete. Then [`invalidate`] clears
//! COMPLETE before any entry is copied or any new program runs, so every packet is looked up
//! meanwhile, and [`refill`], once the old programs are gone, sets the bits of every entry CT
//! holds and COMPLETE again. Bits are never cleared: a stale one costs a lookup, no verdict.

use std::sync::atomic::{Ordering, fence};

use anyhow::{Context, Result};
use aya::Ebpf;
use aya::maps::{Array, HashMap as BpfHashMap, Map};
use netpath_common::{CtEntry, Tuple, ct_ports, hook, map_names};

use super::mmap::{Mapped, array_fd};

/// Whether the object has the array (one from before it, `--ebpf-object`, does not).
pub(super) fn present(ebpf: &Ebpf) -> bool {
    ebpf.map(map_names::CT_PORTS).is_some()
}

/// Whether the array says its bits are complete.
pub(super) fn complete(ebpf: &Ebpf) -> Result<bool> {
    let a: Array<_, u64> = Array::try_from(map(ebpf)?)?;
    Ok(a.get(&ct_ports::COMPLETE, 0).context("reading CT_PORTS")? != 0)
}

/// Makes the programs look every packet up until [`refill`]. Only the daemon writes this
/// word, so a plain update (of that element alone) is safe beside the programs.
pub(super) fn invalidate(ebpf: &mut Ebpf) -> Result<()> {
    set_complete(ebpf, false)
}

/// Sets the bit of every entry CT holds that applies at the uplink's ingress, then COMPLETE.
/// Call once no program that leaves bits unset can insert entries any more. Returns the
/// number of such entries.
pub(super) fn refill(ebpf: &mut Ebpf) -> Result<usize> {
    let ct: BpfHashMap<_, Tuple, CtEntry> = BpfHashMap::try_from(
        ebpf.map(map_names::CT).with_context(|| format!("map {} missing from the eBPF object", map_names::CT))?,
    )?;
    let words = Words::map(ebpf)?;
    let mut n = 0;
    // A key deleted under the walk restarts it from the first (the kernel's get_next_key):
    // bounded, and not vouched for if the bound is reached.
    let bound = 2 * netpath_common::CT_MAX_ENTRIES as usize + 16;
    let mut walked = 0;
    for r in ct.iter() {
        // An error ends the walk (entries deleted meanwhile are skipped, not errors): the
        // bits would not cover what it did not reach.
        let (key, e) = r.context("walking CT")?;
        walked += 1;
        if walked > bound {
            anyhow::bail!("CT changed too fast to walk");
        }
        if e.hook != hook::UPLINK_IN {
            continue;
        }
        if let Some((word, mask)) = ct_ports::bit(key.proto, key.dport) {
            words.or(word, mask);
        }
        n += 1;
    }
    // COMPLETE goes after the bits, well after: a program that sees it set must not read a
    // word from before them (x86 keeps loads in order; a weaker CPU reorders them within
    // nanoseconds, not a millisecond).
    fence(Ordering::SeqCst);
    std::thread::sleep(std::time::Duration::from_millis(1));
    drop(words);
    set_complete(ebpf, true)?;
    Ok(n)
}

/// What CT_PORTS says, for tests and diagnostics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtPorts {
    /// Whether the bits cover every entry (else the programs look every packet up).
    pub complete: bool,
    /// The (protocol, port in host order) pairs whose bits are set.
    pub marked: Vec<(u8, u16)>,
}

/// Reads the whole array.
pub(super) fn marked(ebpf: &Ebpf) -> Result<CtPorts> {
    let words = Words::map(ebpf)?;
    let mut out = vec![];
    for proto_nr in [netpath_common::proto::TCP, netpath_common::proto::UDP] {
        for port in 0..=u16::MAX {
            let wire = port.to_be();
            let (word, mask) = ct_ports::bit(proto_nr, wire).expect("TCP and UDP have bits");
            if words.load(word) & mask != 0 {
                out.push((proto_nr, port));
            }
        }
    }
    Ok(CtPorts { complete: words.load(ct_ports::COMPLETE) != 0, marked: out })
}

fn map(ebpf: &Ebpf) -> Result<&Map> {
    ebpf.map(map_names::CT_PORTS).with_context(|| format!("map {} missing from the eBPF object", map_names::CT_PORTS))
}

fn set_complete(ebpf: &mut Ebpf, on: bool) -> Result<()> {
    let m = ebpf.map_mut(map_names::CT_PORTS).context("map CT_PORTS missing from the eBPF object")?;
    let mut a: Array<_, u64> = Array::try_from(m)?;
    a.set(ct_ports::COMPLETE, u64::from(on), 0).context("setting CT_PORTS' COMPLETE word")
}

/// The array mapped into this process (it is BPF_F_MMAPABLE): bits are set with atomic ORs,
/// as the programs set them. An update syscall would write the whole word and could undo a
/// bit a program set meanwhile.
struct Words(Mapped);

impl Words {
    fn map(ebpf: &Ebpf) -> Result<Self> {
        let fd = array_fd(ebpf, map_names::CT_PORTS)?;
        Ok(Self(Mapped::new(fd, ct_ports::MAX as usize * 8, map_names::CT_PORTS)?))
    }

    fn or(&self, i: u32, mask: u64) {
        self.0.u64_at(i as usize).fetch_or(mask, Ordering::SeqCst);
    }

    fn load(&self, i: u32) -> u64 {
        self.0.u64_at(i as usize).load(Ordering::SeqCst)
    }
}
