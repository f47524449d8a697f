//! Flow events for `netpath system flows --follow`: new flows, the first FIN/RST of a flow,
//! drops. Written to the FLOW_EVENTS ring buffer only while the daemon has set
//! CONFIG[FLOW_EVENTS] (someone follows); otherwise each call costs one array lookup.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use netpath_common::{CtEntry, FlowEvent, Tuple, config, ct_stat, ct_state, flow_event};

use crate::maps::{CONFIG, CT, CT_STATS, FLOW_EVENTS, count};
use crate::parse::Packet;

/// True while someone follows flow events.
#[inline(always)]
fn enabled() -> bool {
    CONFIG.get(config::FLOW_EVENTS).is_some_and(|on| *on != 0)
}

/// A NEW or CLOSED event. Not inlined, like [`emit_drop`]: one copy of the writer per
/// program rather than one per call site (a BPF-to-BPF call, taken only while someone
/// follows). Subprograms take at most five arguments.
#[inline(never)]
fn emit_flow(kind: u8, hook: u8, orig: &Tuple, xlate: &Tuple) {
    emit(kind, hook, orig, xlate, 1, 0, 0, 0);
}

/// A DROP event: no translation. `reason_rule`: the drop reason in the low 32 bits, the
/// firewall rule (policy-denied) in the high ones — five arguments at most.
#[inline(never)]
fn emit_drop(hook: u8, orig: &Tuple, ports: u8, reason_rule: u64, ifindex: u32) {
    let (reason, rule) = (reason_rule as u32, (reason_rule >> 32) as u32);
    emit(flow_event::DROP, hook, orig, &Tuple::new(0, 0, 0, 0, 0), ports, reason, ifindex, rule);
}

/// Writes one event straight into the ring (no copy on the 512-byte stack), every field set
/// (padding included) so no byte of an earlier record leaks to the reader. A full ring is
/// counted, never waited for.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn emit(kind: u8, hook: u8, orig: &Tuple, xlate: &Tuple, ports: u8, reason: u32, ifindex: u32, rule: u32) {
    let Some(mut slot) = FLOW_EVENTS.reserve::<FlowEvent>(0) else {
        count(&CT_STATS, ct_stat::EVENTS_LOST);
        return;
    };
    let e = slot.as_mut_ptr();
    // SAFETY: `e` points at a reserved record of size_of::<FlowEvent>() bytes, 8-byte
    // aligned; every field is written before it is submitted.
    unsafe {
        put(&raw mut (*e).ts_ns, bpf_ktime_get_ns());
        put_tuple(&raw mut (*e).orig, orig);
        put_tuple(&raw mut (*e).xlate, xlate);
        put(&raw mut (*e).reason, reason);
        put(&raw mut (*e).ifindex, ifindex);
        put(&raw mut (*e).kind, kind);
        put(&raw mut (*e).hook, hook);
        put(&raw mut (*e).ports, ports);
        put(&raw mut (*e)._pad1, 0);
        put(&raw mut (*e).rule, rule);
    }
    slot.submit(0);
}

/// One store, kept as it is: LLVM merges plain stores of zeros into a memset call, which
/// the verifier rejects (the same trap as zeroing a CtEntry or the FIB parameters).
///
/// SAFETY: `dst` valid for a write of T.
#[inline(always)]
unsafe fn put<T>(dst: *mut T, v: T) {
    // SAFETY: as the caller promised.
    unsafe { dst.write_volatile(v) }
}

/// SAFETY: `dst` valid for a write of a Tuple.
#[inline(always)]
unsafe fn put_tuple(dst: *mut Tuple, t: &Tuple) {
    // SAFETY: fields of a valid Tuple pointer.
    unsafe {
        put(&raw mut (*dst).saddr, t.saddr);
        put(&raw mut (*dst).daddr, t.daddr);
        put(&raw mut (*dst).sport, t.sport);
        put(&raw mut (*dst).dport, t.dport);
        put(&raw mut (*dst).proto, t.proto);
        put(&raw mut (*dst)._pad1, 0);
        put(&raw mut (*dst)._pad2, 0);
    }
}

/// A flow was tracked: `orig` is translated to `xlate` at `hook`.
#[inline(always)]
pub fn new_flow(orig: &Tuple, xlate: &Tuple, hook: u8) {
    if enabled() {
        emit_flow(flow_event::NEW, hook, orig, xlate);
    }
}

/// The entry `e`, keyed `key`, sees its first FIN or RST. Reported unless the other
/// direction's entry saw one first (then the flow was reported already), in the flow's
/// original direction whichever side closes.
#[inline(always)]
pub fn closing(key: &Tuple, e: &CtEntry) {
    if !enabled() {
        return;
    }
    // SAFETY: plain lookup, value copied.
    let partner = unsafe { CT.get(&e.xlate.reversed()) }.copied();
    if partner.is_some_and(|p| p.state == ct_state::CLOSING) {
        return;
    }
    if e.is_reply == 0 {
        emit_flow(flow_event::CLOSED, e.hook, key, &e.xlate);
    } else {
        // A reply entry is keyed by the flow's translation reversed and translates back to
        // its original tuple reversed; the hook is the forward entry's.
        let hook = partner.map_or(0, |p| p.hook);
        emit_flow(flow_event::CLOSED, hook, &e.xlate.reversed(), &key.reversed());
    }
}

/// `p` is dropped at `hook` for `reason` (netpath_common::drop_reason).
#[inline(always)]
pub fn dropped(p: &Packet, hook: u8, reason: u32) {
    if enabled() {
        emit_drop(hook, &p.tuple, u8::from(p.translatable), u64::from(reason), p.ifindex);
    }
}

/// `p` is dropped at `hook` for `reason` by firewall rule `rule`.
#[inline(always)]
pub fn dropped_by_rule(p: &Packet, hook: u8, reason: u32, rule: u32) {
    if enabled() {
        let reason_rule = u64::from(reason) | (u64::from(rule) << 32);
        emit_drop(hook, &p.tuple, u8::from(p.translatable), reason_rule, p.ifindex);
    }
}
