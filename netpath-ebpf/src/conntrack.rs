//! Connection tracking for NAT: two entries per flow (one per direction) in a preallocated
//! hash. The datapath creates and refreshes entries; the daemon expires idle ones. A full
//! table refuses new flows (`ct-full`) and leaves established ones alone.

use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};
use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use netpath_common::{CtEntry, Tuple, ct_ports, ct_stat, ct_state, drop_reason, hook, proto};

use crate::events;
use crate::maps::{CT, CT_PORTS, CT_STATS, count};
use crate::parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

/// The translation for `p` if a flow exists whose entry applies at `hook`; refreshes it.
#[inline(always)]
pub fn lookup(p: &Packet, hook: u8) -> Option<Tuple> {
    match lookup_any(p) {
        Some((h, x)) if h == hook => Some(x),
        _ => None,
    }
}

/// [`lookup`] at the uplink's ingress, for a packet from outside: CT_PORTS first, whose clear
/// bit says no entry applying there has the packet's protocol and destination port, so the
/// hash lookup (most of the cost of a packet a flood sends to a closed port) would miss.
/// An entry of another hook is then not refreshed by a packet from outside that shares its
/// key (which only a forged packet does).
#[inline(always)]
pub fn lookup_inbound(p: &Packet) -> Option<Tuple> {
    if !may_apply_inbound(&p.tuple) {
        return None;
    }
    lookup(p, hook::UPLINK_IN)
}

/// False when CT holds no entry applying at the uplink's ingress with `t`'s protocol and
/// destination port: its bit is clear in a complete CT_PORTS.
#[inline(always)]
fn may_apply_inbound(t: &Tuple) -> bool {
    let Some((word, mask)) = ct_ports::bit(t.proto, t.dport) else { return true };
    // Complete only once the daemon vouches for every entry's bit (or it never may be).
    if CT_PORTS.get(ct_ports::COMPLETE).is_none_or(|c| *c == 0) {
        return true;
    }
    CT_PORTS.get(word).is_none_or(|w| *w & mask != 0)
}

/// Sets the CT_PORTS bit of `key`, an entry about to apply at the uplink's ingress, before it
/// is inserted (so no packet can match an entry its bit hides). Err: no bit to set (the array
/// is not the one this build defines), and so no entry.
#[inline(always)]
fn mark_inbound(key: &Tuple) -> Result<(), u32> {
    let Some((word, mask)) = ct_ports::bit(key.proto, key.dport) else { return Ok(()) };
    let w = CT_PORTS.get_ptr_mut(word).ok_or(drop_reason::CT_INSERT_FAILED)?;
    // Read first: a port's bit is set once, then new flows to it only read it (the word's
    // cache line is not bounced between CPUs at every new flow).
    // SAFETY: a map value, valid for the program run; other CPUs only OR bits into it.
    if unsafe { core::ptr::read_volatile(w) } & mask == 0 {
        // Atomic: another CPU (or the daemon) may be setting another bit of the word. The
        // insert after it publishes the entry with release semantics, so the bit is visible
        // before the entry can be found.
        // SAFETY: as above; u64 map values are 8-byte aligned.
        unsafe { atomic_or(w, mask) };
    }
    Ok(())
}

/// `*w |= mask` as one atomic instruction (BPF_ATOMIC | BPF_OR), which core's AtomicU64 does
/// not offer on this target.
///
/// SAFETY: `w` must be valid for writes and 8-byte aligned.
#[cfg(target_arch = "bpf")]
#[inline(always)]
unsafe fn atomic_or(w: *mut u64, mask: u64) {
    // SAFETY: as the caller promised.
    unsafe {
        core::arch::asm!("lock *(u64 *)({0} + 0) |= {1}", in(reg) w, in(reg) mask, options(nostack, preserves_flags))
    };
}

/// Off the BPF target (never run: the crate builds only for it).
#[cfg(not(target_arch = "bpf"))]
#[inline(always)]
unsafe fn atomic_or(w: *mut u64, mask: u64) {
    // SAFETY: as the caller promised.
    unsafe { *w |= mask };
}

/// The hook and translation of `p`'s flow, whichever hook its entry applies at; refreshes it.
/// Lets a container's veth act early on a flow that would be translated at the uplink.
#[inline(always)]
pub fn lookup_any(p: &Packet) -> Option<(u8, Tuple)> {
    let e = CT.get_ptr_mut(&p.tuple)?;
    // SAFETY: map value pointer valid for this program run; racing writers only touch
    // last_seen/state, which tolerate lost updates.
    let e = unsafe { &mut *e };
    // SAFETY: helper without arguments.
    e.last_seen_ns = unsafe { bpf_ktime_get_ns() };
    if p.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        if e.state != ct_state::CLOSING {
            events::closing(&p.tuple, e);
        }
        e.state = ct_state::CLOSING;
    } else if e.is_reply == 1 && e.state == ct_state::NEW {
        e.state = ct_state::ESTABLISHED;
    }
    Some((e.hook, e.xlate))
}

/// A new TCP connection (`p`, a SYN of no tracked flow) whose replies a closed flow still
/// claims: the client reused its port at once after an RST or FIN, towards another address
/// (a backend straight, after reaching it through a VIP). The closed flow's two entries go,
/// as the kernel replaces a closed connection; else the new connection's replies would be
/// translated for the dead one. A live flow's claim is left alone.
#[inline(always)]
pub fn release_closed_claim(p: &Packet) {
    if !p.translatable || p.tuple.proto != proto::TCP || p.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return;
    }
    let reply_key = p.tuple.reversed();
    // SAFETY: plain lookup, fields copied.
    let Some((state, partner)) = (unsafe { CT.get(&reply_key) }).map(|e| (e.state, e.xlate.reversed())) else {
        return;
    };
    // The client's RST or FIN marks its own direction's entry; either one closed ends the flow.
    // SAFETY: plain lookup, field copied.
    let partner_state = unsafe { CT.get(&partner) }.map(|e| e.state);
    if state == ct_state::CLOSING || partner_state == Some(ct_state::CLOSING) {
        let _ = CT.remove(&reply_key);
        let _ = CT.remove(&partner);
    }
}

/// The translation of a tracked tuple at `hook`, without refreshing it (ICMP errors do not
/// keep a flow alive).
#[inline(always)]
pub fn peek(t: &Tuple, hook: u8) -> Option<Tuple> {
    // SAFETY: plain lookup, value copied.
    let e = unsafe { CT.get(t) }?;
    (e.hook == hook).then_some(e.xlate)
}

/// The hook and translation of a tracked tuple, without refreshing it.
#[inline(always)]
pub fn peek_any(t: &Tuple) -> Option<(u8, Tuple)> {
    // SAFETY: plain lookup, fields copied.
    let e = unsafe { CT.get(t) }?;
    Some((e.hook, e.xlate))
}

/// Records a new flow: `orig` is rewritten to `xlate` at `orig_hook`, and its replies
/// (`xlate.reversed()`) back to `orig.reversed()` at `reply_hook`. The reply entry goes in
/// first and only if free, so two flows can never claim the same translated tuple.
#[inline(always)]
pub fn create(orig: &Tuple, xlate: &Tuple, orig_hook: u8, reply_hook: u8) -> Result<(), u32> {
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let reply_key = xlate.reversed();
    if reply_hook == hook::UPLINK_IN {
        mark_inbound(&reply_key)?;
    }
    if orig_hook == hook::UPLINK_IN {
        mark_inbound(orig)?;
    }
    let reply =
        CtEntry { xlate: orig.reversed(), last_seen_ns: now, hook: reply_hook, is_reply: 1, ..Default::default() };
    CT.insert(&reply_key, &reply, u64::from(BPF_NOEXIST)).map_err(insert_failure)?;
    let fwd = entry(*xlate, now, orig_hook, 0);
    if let Err(e) = CT.insert(orig, &fwd, u64::from(BPF_ANY)) {
        let _ = CT.remove(&reply_key);
        return Err(insert_failure(e));
    }
    count(&CT_STATS, ct_stat::CREATED);
    events::new_flow(orig, xlate, orig_hook);
    Ok(())
}

/// The kernel's answer to a refused insert: E2BIG means the table is full; anything else
/// (EEXIST: the reply tuple belongs to another flow) is a clash.
#[inline(always)]
fn insert_failure(errno: i32) -> u32 {
    const E2BIG: i32 = 7;
    if errno == -E2BIG { drop_reason::CT_FULL } else { drop_reason::CT_INSERT_FAILED }
}

/// Builds an entry from an aligned, zeroed value: zeroing the unaligned tail field by field
/// would make LLVM emit a memset call, which the verifier rejects.
#[inline(always)]
fn entry(xlate: Tuple, now: u64, hook: u8, is_reply: u8) -> CtEntry {
    // SAFETY: CtEntry is plain integers; all-zero is a valid value.
    let mut e: CtEntry = unsafe { core::mem::zeroed() };
    e.xlate = xlate;
    e.last_seen_ns = now;
    e.hook = hook;
    e.is_reply = is_reply;
    e.state = ct_state::NEW;
    e
}

/// `orig` with its source changed to `saddr`, keeping the source port unless another flow
/// already uses the translated tuple (then a random one from 32768-60999 is tried).
#[inline(always)]
pub fn snat_tuple(orig: &Tuple, saddr: u32) -> Option<Tuple> {
    let mut x = *orig;
    x.saddr = saddr;
    for _ in 0..8 {
        // SAFETY: lookup only checks presence.
        if unsafe { CT.get(&x.reversed()) }.is_none() {
            return Some(x);
        }
        count(&CT_STATS, ct_stat::PORT_RETRIES);
        // SAFETY: helper without arguments.
        let r = unsafe { bpf_get_prandom_u32() };
        x.sport = (32768 + (r % 28232) as u16).to_be();
    }
    None
}
