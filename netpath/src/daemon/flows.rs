//! Flow events (`netpath system flows --follow`): one task reads the datapath's ring buffer
//! and fans the events out to every follower through a broadcast channel. The programs write
//! events only while at least one follower is connected (CONFIG[FLOW_EVENTS]); the first
//! follower switches them on, the last one to leave off again.
//!
//! Each event becomes one NDJSON line, rendered once for every follower, with the container
//! names its addresses belong to (for `--container`). A follower too slow for the others
//! loses the oldest events it has not read and gets a `lost` line saying how many; the
//! ring-buffer full case (the reader too slow for the datapath) is reported the same way.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Stream;
use netpath_common::{CtEntry, FlowEvent, Tuple, ct_state, drop_reason, flow_event, hook, proto};
use serde_json::{Value, json};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{broadcast, watch};
use tracing::{info, warn};

use super::Daemon;
use crate::datapath::FlowEventRing;
use crate::error::Result;

/// Events a follower may fall behind by before it loses the oldest.
const BACKLOG: usize = 2048;
/// Records the reader takes from the ring at a time.
const BATCH: usize = 256;

/// One event as followers get it.
#[derive(Debug)]
pub struct Record {
    /// The NDJSON line, newline included.
    line: Bytes,
    /// The containers whose addresses the event names (source side, destination side).
    containers: [Option<String>; 2],
    /// For every follower whatever its filter (losses).
    to_all: bool,
}

pub struct FlowEvents {
    tx: broadcast::Sender<Arc<Record>>,
    /// Followers connected; the datapath writes events while there is one.
    followers: Mutex<usize>,
    /// Set when the daemon stops: every follower's stream ends (the API waits for them).
    stop: watch::Sender<bool>,
    /// False when the loaded eBPF object has no flow events (one from before them).
    available: bool,
}

impl FlowEvents {
    pub fn new(available: bool) -> Self {
        Self { tx: broadcast::channel(BACKLOG).0, followers: Mutex::new(0), stop: watch::channel(false).0, available }
    }
}

/// A follower's place: leaving (dropping it) switches events off when it was the last.
struct Following(Arc<Daemon>);

impl Drop for Following {
    fn drop(&mut self) {
        self.0.follower_left();
    }
}

/// One follower's end of the broadcast. `P` is held for as long as the stream lives (its
/// place among the followers).
struct Follower<P> {
    rx: broadcast::Receiver<Arc<Record>>,
    container: Option<String>,
    stop: watch::Receiver<bool>,
    _place: P,
}

impl<P: Send + 'static> Follower<P> {
    fn wants(&self, r: &Record) -> bool {
        r.to_all || self.container.as_ref().is_none_or(|c| r.containers.iter().any(|n| n.as_ref() == Some(c)))
    }

    /// The lines this follower gets, until `stop` or the channel closes. Falling behind by
    /// more than the channel holds costs the oldest events, replaced by one `lost` line.
    fn lines(self) -> impl Stream<Item = std::result::Result<Bytes, Infallible>> + Send + 'static {
        futures::stream::unfold(self, |mut f| async move {
            loop {
                let r = tokio::select! {
                    r = f.rx.recv() => r,
                    _ = f.stop.wait_for(|s| *s) => return None,
                };
                let line = match r {
                    Ok(rec) if f.wants(&rec) => rec.line.clone(),
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(n)) => lost_line(n, "follower-too-slow"),
                    Err(broadcast::error::RecvError::Closed) => return None,
                };
                return Some((Ok(line), f));
            }
        })
    }
}

impl Daemon {
    /// Starts following flow events, those of container `container` (name or ID: any of
    /// its addresses, on either side of a flow) or all. The stream yields NDJSON lines
    /// until the daemon stops; dropping it (the client went away) is leaving.
    pub fn follow_flows(
        self: &Arc<Self>,
        container: Option<&str>,
    ) -> Result<impl Stream<Item = std::result::Result<Bytes, Infallible>> + Send + 'static + use<>> {
        if !self.flows.available {
            return Err(conflict!(
                "the datapath this daemon runs (eBPF object {}) writes no flow events",
                self.datapath_object_id()
            ));
        }
        let container = match container {
            Some(c) => {
                let st = self.state();
                Some(st.container(c).ok_or_else(|| not_found!("container {c} not found"))?.name.clone())
            }
            None => None,
        };
        // Subscribed before the datapath starts writing: the first event is not missed.
        let rx = self.flows.tx.subscribe();
        self.follower_joined()?;
        let f = Follower { rx, container, stop: self.flows.stop.subscribe(), _place: Following(self.clone()) };
        Ok(f.lines())
    }

    fn follower_joined(&self) -> Result<()> {
        let mut n = self.flows.followers.lock().unwrap_or_else(|e| e.into_inner());
        if *n == 0 {
            self.dp().set_flow_events(true)?;
            info!("flow events on: a follower connected");
        }
        *n += 1;
        Ok(())
    }

    fn follower_left(&self) {
        let mut n = self.flows.followers.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.saturating_sub(1);
        if *n == 0 {
            match self.dp().set_flow_events(false) {
                Ok(()) => info!("flow events off: no follower left"),
                Err(e) => warn!("switching flow events off: {e:#}"),
            }
        }
    }

    /// Ends every follower's stream (the daemon is stopping) and switches events off.
    pub fn stop_flow_events(&self) {
        self.flows.stop.send_replace(true);
        if self.flows.available
            && let Err(e) = self.dp().set_flow_events(false)
        {
            warn!("switching flow events off: {e:#}");
        }
    }

    /// Reads the datapath's flow events for as long as the daemon runs and hands them to the
    /// followers (none: they are dropped unread; the datapath writes none then anyway).
    pub(super) async fn read_flow_events(self: Arc<Self>, ring: FlowEventRing) {
        // SAFETY: the ring owns its map descriptor, which stays open (and the same) for as
        // long as the AsyncFd owns the ring.
        let mut fd = match unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) } {
            Ok(fd) => fd,
            Err(e) => {
                warn!("flow events unavailable: waiting on the ring buffer: {e}");
                return;
            }
        };
        let mut lost_seen = self.dp().flow_events_lost().unwrap_or(0);
        let mut lost_checked = Instant::now();
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let mut guard = match fd.readable_mut().await {
                Ok(g) => g,
                Err(e) => {
                    warn!("reading flow events: {e}; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if guard.get_inner_mut().drain(&mut batch, BATCH) < BATCH {
                guard.clear_ready();
            }
            drop(guard);
            self.publish(&batch, None);
            batch.clear();
            // The ring only fills while events flow, so this runs when it matters.
            if lost_checked.elapsed() >= Duration::from_secs(1) {
                lost_checked = Instant::now();
                let lost = self.dp().flow_events_lost().unwrap_or(lost_seen);
                if lost > lost_seen && self.flows.tx.receiver_count() > 0 {
                    let line = lost_line(lost - lost_seen, "ring-buffer-full");
                    let _ = self.flows.tx.send(Arc::new(Record { line, containers: [None, None], to_all: true }));
                }
                lost_seen = lost;
            }
        }
    }

    /// Flows the idle-timeout sweep removed (both entries of each): `expired` events.
    pub(super) fn flows_expired(&self, gone: &[(Tuple, CtEntry)]) {
        if gone.is_empty() || self.flows.tx.receiver_count() == 0 {
            return;
        }
        let entries: HashMap<Tuple, CtEntry> = gone.iter().copied().collect();
        let now = clock_ns(libc::CLOCK_MONOTONIC);
        let mut events = vec![];
        let mut states = vec![];
        for (k, e) in gone {
            let partner = entries.get(&e.xlate.reversed());
            // Each flow once, in its original direction (a reply entry without its partner too).
            let (orig, xlate, hk) = match (e.is_reply, partner) {
                (0, _) => (*k, e.xlate, e.hook),
                (_, None) => (e.xlate.reversed(), k.reversed(), 0),
                _ => continue,
            };
            let ports = u8::from(matches!(k.proto, proto::TCP | proto::UDP));
            events.push(FlowEvent {
                ts_ns: now,
                orig,
                xlate,
                kind: flow_event::EXPIRED,
                hook: hk,
                ports,
                ..Default::default()
            });
            states.push(partner.map_or(e.state, |p| p.state.max(e.state)));
        }
        self.publish(&events, Some(&states));
    }

    /// Renders events for the followers; `states`: the conntrack state of each (expired ones).
    fn publish(&self, events: &[FlowEvent], states: Option<&[u8]>) {
        if events.is_empty() || self.flows.tx.receiver_count() == 0 {
            return;
        }
        let names = self.address_names();
        let rule = |n: u32| self.rule_name(n);
        let mut ifnames = HashMap::new();
        let wall = clock_ns(libc::CLOCK_REALTIME).wrapping_sub(clock_ns(libc::CLOCK_MONOTONIC));
        for (i, e) in events.iter().enumerate() {
            let ifname = (e.ifindex != 0).then(|| {
                ifnames
                    .entry(e.ifindex)
                    .or_insert_with(|| {
                        nix::net::if_::if_indextoname(e.ifindex)
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_else(|_| format!("if{}", e.ifindex))
                    })
                    .clone()
            });
            let state = states.and_then(|s| s.get(i).copied());
            let rule_name = (e.kind == flow_event::DROP && e.reason == drop_reason::POLICY_DENIED)
                .then(|| rule(e.rule).unwrap_or_else(|| format!("rule #{}", e.rule)));
            let mut rec = render(e, e.ts_ns.wrapping_add(wall), state, ifname.as_deref(), &names);
            if let Some(r) = rule_name {
                rec = with_rule(rec, &r);
            }
            let _ = self.flows.tx.send(Arc::new(rec));
        }
    }

    /// Container names by address (as the datapath keeps addresses).
    fn address_names(&self) -> HashMap<u32, String> {
        let st = self.state();
        let mut m = HashMap::new();
        for c in st.containers() {
            for ip in c.endpoints.iter().filter_map(|e| e.ipv4) {
                m.insert(crate::datapath::wire_addr(ip), c.name.clone());
            }
        }
        m
    }
}

/// A policy-denied drop's record with the rule that denied it (`"rule": NAME`).
fn with_rule(mut rec: Record, rule: &str) -> Record {
    if let Ok(Value::Object(mut m)) = serde_json::from_slice::<Value>(&rec.line) {
        m.insert("rule".into(), json!(rule));
        rec.line = Bytes::from(format!("{}\n", Value::Object(m)));
    }
    rec
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn lost_line(n: u64, reason: &str) -> Bytes {
    let v = json!({ "time": rfc3339(clock_ns(libc::CLOCK_REALTIME)), "event": "lost", "count": n, "reason": reason });
    Bytes::from(format!("{v}\n"))
}

/// Nanoseconds since the epoch as RFC 3339 UTC with milliseconds.
fn rfc3339(ns: u64) -> String {
    let secs = super::view::rfc3339(ns / 1_000_000_000);
    // `...T22:31:41Z` → `...T22:31:41.123Z`
    format!("{}.{:03}Z", secs.trim_end_matches('Z'), ns % 1_000_000_000 / 1_000_000)
}

pub(super) fn proto_name(p: u8) -> String {
    match p {
        proto::TCP => "tcp".into(),
        proto::UDP => "udp".into(),
        proto::ICMP => "icmp".into(),
        n => n.to_string(),
    }
}

pub(super) fn hook_name(h: u8) -> Option<&'static str> {
    hook::name(h)
}

fn addr(a: u32) -> Ipv4Addr {
    Ipv4Addr::from(a.to_ne_bytes())
}

/// An endpoint of a tuple: address and port where the event has ports (TCP, UDP).
fn endpoint(a: u32, port: u16, ports: bool) -> String {
    if ports { format!("{}:{}", addr(a), u16::from_be(port)) } else { addr(a).to_string() }
}

/// One event as an NDJSON line. `wall_ns`: when it happened, since the epoch.
fn render(
    e: &FlowEvent,
    wall_ns: u64,
    state: Option<u8>,
    ifname: Option<&str>,
    names: &HashMap<u32, String>,
) -> Record {
    let ports = e.ports != 0 && matches!(e.orig.proto, proto::TCP | proto::UDP);
    let (o, x) = (&e.orig, &e.xlate);
    let event = match e.kind {
        flow_event::NEW => "new",
        flow_event::CLOSED => "closed",
        flow_event::DROP => "drop",
        flow_event::EXPIRED => "expired",
        _ => "unknown",
    };
    let dropped = e.kind == flow_event::DROP;
    // Names for either side, as the flow arrived or as it was translated (a published
    // port's destination is the host's address, translated to the container's).
    let name = |a: u32, b: u32| names.get(&a).or_else(|| (!dropped).then(|| names.get(&b)).flatten()).cloned();
    let containers = [name(o.saddr, x.saddr), name(o.daddr, x.daddr)];
    let nat = match (o.saddr != x.saddr || o.sport != x.sport, o.daddr != x.daddr || o.dport != x.dport) {
        _ if dropped => None,
        (false, false) => Some("none"),
        (true, false) => Some("snat"),
        (false, true) => Some("dnat"),
        (true, true) => Some("dnat+snat"),
    };
    let reason = dropped.then(|| drop_reason::NAMES.get(e.reason as usize).copied().unwrap_or("unknown"));
    let state = state.map(|s| match s {
        ct_state::ESTABLISHED => "established",
        ct_state::CLOSING => "closing",
        _ => "new",
    });
    let mut v = json!({
        "time": rfc3339(wall_ns),
        "event": event,
        "proto": proto_name(o.proto),
        "src": endpoint(o.saddr, o.sport, ports),
        "dst": endpoint(o.daddr, o.dport, ports),
        "translated_src": (!dropped).then(|| endpoint(x.saddr, x.sport, ports)),
        "translated_dst": (!dropped).then(|| endpoint(x.daddr, x.dport, ports)),
        "hook": hook_name(e.hook),
        "verdict": if dropped { "dropped" } else { "forwarded" },
        "nat": nat,
        "reason": reason,
        "src_container": containers[0],
        "dst_container": containers[1],
    });
    if let Value::Object(m) = &mut v {
        if let Some(s) = state {
            m.insert("state".into(), json!(s));
        }
        if let Some(i) = ifname {
            m.insert("interface".into(), json!(i));
        }
    }
    Record { line: Bytes::from(format!("{v}\n")), containers, to_all: false }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: [u8; 4], sp: u16, d: [u8; 4], dp: u16) -> Tuple {
        Tuple::new(u32::from_ne_bytes(s), u32::from_ne_bytes(d), sp.to_be(), dp.to_be(), proto::TCP)
    }

    fn line(r: &Record) -> Value {
        let s = std::str::from_utf8(&r.line).unwrap();
        assert!(s.ends_with('\n') && !s[..s.len() - 1].contains('\n'), "one line: {s:?}");
        serde_json::from_str(s).unwrap()
    }

    fn record(i: usize, container: Option<&str>) -> Arc<Record> {
        let line = Bytes::from(format!("{{\"n\":{i}}}\n"));
        Arc::new(Record { line, containers: [None, container.map(str::to_string)], to_all: false })
    }

    async fn next(s: &mut (impl Stream<Item = std::result::Result<Bytes, Infallible>> + Unpin)) -> Value {
        use futures::StreamExt;
        let line = tokio::time::timeout(Duration::from_secs(5), s.next()).await.unwrap().unwrap().unwrap();
        serde_json::from_slice(&line).unwrap()
    }

    #[tokio::test]
    async fn a_slow_follower_loses_the_oldest_events_and_is_told_how_many() {
        let hub = FlowEvents::new(true);
        let stop = || hub.stop.subscribe();
        let slow = Follower { rx: hub.tx.subscribe(), container: None, stop: stop(), _place: () };
        let mut fast = Box::pin(Follower { rx: hub.tx.subscribe(), container: None, stop: stop(), _place: () }.lines());
        let mut slow = Box::pin(slow.lines());
        // The sender never waits: the fast follower keeps up while the slow one reads nothing.
        for i in 0..BACKLOG + 10 {
            hub.tx.send(record(i, None)).unwrap();
            assert_eq!(next(&mut fast).await["n"], i);
        }
        let lost = next(&mut slow).await;
        assert_eq!((lost["event"].as_str(), lost["count"].as_u64()), (Some("lost"), Some(10)), "{lost}");
        assert_eq!(lost["reason"], "follower-too-slow");
        assert_eq!(next(&mut slow).await["n"], 10, "then the oldest it still can have");
    }

    #[tokio::test]
    async fn a_container_filter_keeps_that_containers_events_and_losses() {
        let hub = FlowEvents::new(true);
        let f =
            Follower { rx: hub.tx.subscribe(), container: Some("web".into()), stop: hub.stop.subscribe(), _place: () };
        let mut s = Box::pin(f.lines());
        hub.tx.send(record(1, Some("api"))).unwrap();
        hub.tx.send(record(2, Some("web"))).unwrap();
        hub.tx
            .send(Arc::new(Record { line: lost_line(3, "ring-buffer-full"), containers: [None, None], to_all: true }))
            .unwrap();
        assert_eq!(next(&mut s).await["n"], 2);
        assert_eq!(next(&mut s).await["count"], 3);
        // Stopping the daemon ends the stream.
        hub.stop.send_replace(true);
        use futures::StreamExt;
        assert!(s.next().await.is_none());
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123_456_789), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_795_000_000_000_000_000), "2026-11-18T11:06:40.000Z");
    }

    #[test]
    fn a_published_flow_names_the_container_behind_the_host_address() {
        let web = u32::from_ne_bytes([172, 17, 0, 2]);
        let names = HashMap::from([(web, "web".to_string())]);
        let e = FlowEvent {
            orig: t([198, 51, 100, 2], 40000, [198, 51, 100, 1], 8080),
            xlate: t([198, 51, 100, 2], 40000, [172, 17, 0, 2], 8),
            kind: flow_event::NEW,
            hook: hook::UPLINK_IN,
            ports: 1,
            ..Default::default()
        };
        let r = render(&e, 0, None, None, &names);
        assert_eq!(r.containers, [None, Some("web".into())]);
        let v = line(&r);
        assert_eq!(v["event"], "new");
        assert_eq!(v["proto"], "tcp");
        assert_eq!(v["src"], "198.51.100.2:40000");
        assert_eq!(v["dst"], "198.51.100.1:8080");
        assert_eq!(v["translated_dst"], "172.17.0.2:8");
        assert_eq!(v["hook"], "uplink-in");
        assert_eq!(v["nat"], "dnat");
        assert_eq!(v["verdict"], "forwarded");
        assert_eq!(v["dst_container"], "web");
        assert!(v["reason"].is_null() && v["src_container"].is_null());
    }

    #[test]
    fn a_drop_has_its_reason_and_interface_and_no_translation() {
        let names = HashMap::from([(u32::from_ne_bytes([172, 18, 0, 2]), "a".to_string())]);
        let mut e = FlowEvent {
            orig: t([172, 18, 0, 2], 1234, [172, 19, 0, 2], 80),
            kind: flow_event::DROP,
            hook: hook::FROM_CONTAINER,
            reason: drop_reason::ISOLATION,
            ifindex: 7,
            ports: 1,
            ..Default::default()
        };
        let v = line(&render(&e, 0, None, Some("veth01234567"), &names));
        assert_eq!(v["event"], "drop");
        assert_eq!(v["reason"], "isolation");
        assert_eq!(v["verdict"], "dropped");
        assert_eq!(v["interface"], "veth01234567");
        assert_eq!(v["src_container"], "a");
        assert!(v["translated_src"].is_null() && v["nat"].is_null());
        // A fragment: addresses only.
        e.ports = 0;
        let v = line(&render(&e, 0, None, None, &names));
        assert_eq!((v["src"].as_str(), v["dst"].as_str()), (Some("172.18.0.2"), Some("172.19.0.2")));
    }

    #[test]
    fn a_policy_drop_names_its_rule() {
        let e = FlowEvent {
            orig: t([198, 51, 100, 9], 40000, [172, 17, 0, 2], 8),
            kind: flow_event::DROP,
            hook: hook::UPLINK_IN,
            reason: drop_reason::POLICY_DENIED,
            rule: 7,
            ports: 1,
            ..Default::default()
        };
        let v = line(&with_rule(render(&e, 0, None, None, &HashMap::new()), "others"));
        assert_eq!((v["reason"].as_str(), v["rule"].as_str()), (Some("policy-denied"), Some("others")));
    }

    #[test]
    fn an_expired_flow_says_its_last_state() {
        let e = FlowEvent {
            orig: t([172, 17, 0, 2], 5000, [203, 0, 113, 7], 443),
            xlate: t([198, 51, 100, 1], 5000, [203, 0, 113, 7], 443),
            kind: flow_event::EXPIRED,
            hook: hook::UPLINK_OUT,
            ports: 1,
            ..Default::default()
        };
        let v = line(&render(&e, 0, Some(ct_state::ESTABLISHED), None, &HashMap::new()));
        assert_eq!(
            (v["event"].as_str(), v["state"].as_str(), v["nat"].as_str()),
            (Some("expired"), Some("established"), Some("snat"))
        );
    }
}
