//! Prometheus metrics (`netpath daemon --metrics-addr ADDR:PORT`, off by default): table use,
//! drops by reason, per-container traffic, API request latency. Rendered on each scrape from
//! the maps, the state and the kernel's link counters (one link dump for every container), so
//! nothing is counted twice and an idle daemon does no work.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::{info, warn};

use super::{Daemon, Shared};
use crate::state::Container;

/// Upper bounds (seconds) of the API latency histogram's buckets.
const BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// API request latencies by (method, route).
#[derive(Default)]
pub struct ApiLatency {
    by_route: Mutex<BTreeMap<(String, String), Histogram>>,
}

impl ApiLatency {
    fn observe(&self, method: &str, route: &str, d: Duration) {
        let s = d.as_secs_f64();
        let mut m = self.by_route.lock().unwrap();
        let h = m.entry((method.to_string(), route.to_string())).or_default();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += s;
    }
}

/// Axum middleware: times every API request under its route pattern (not the raw path, which
/// would make one series per container name).
pub async fn time_requests(State(d): State<Shared>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| "other".into());
    let method = req.method().to_string();
    let t = Instant::now();
    let resp = next.run(req).await;
    d.api_latency.observe(&method, &route, t.elapsed());
    resp
}

/// Escapes a label value as the text format wants it.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: impl std::fmt::Display) {
        if labels.is_empty() {
            let _ = writeln!(self.0, "{name} {v}");
        } else {
            let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", label(v))).collect();
            let _ = writeln!(self.0, "{name}{{{}}} {v}", l.join(","));
        }
    }
}

impl Daemon {
    /// The metrics in the Prometheus text format (version 0.0.4).
    pub async fn render_metrics(&self) -> anyhow::Result<String> {
        let mut o = Out(String::new());
        let counters = self.datapath_counters()?;

        o.family("netpath_conntrack_entries", "gauge", "Entries in the connection-tracking (NAT) table, two per flow.");
        o.sample("netpath_conntrack_entries", &[], counters.ct_entries);
        o.family("netpath_conntrack_capacity", "gauge", "Entries the connection-tracking table holds at most.");
        o.sample("netpath_conntrack_capacity", &[], counters.ct_capacity);
        o.family("netpath_conntrack_events_total", "counter", "Connection-tracking events by kind.");
        let lost = netpath_common::ct_stat::NAMES[netpath_common::ct_stat::EVENTS_LOST as usize];
        for (k, v) in counters.conntrack.iter().filter(|(k, _)| **k != lost) {
            o.sample("netpath_conntrack_events_total", &[("event", k)], v);
        }
        o.family(
            "netpath_flow_events_lost_total",
            "counter",
            "Flow events the datapath could not hand to the daemon (ring buffer full).",
        );
        o.sample("netpath_flow_events_lost_total", &[], counters.conntrack.get(lost).copied().unwrap_or(0));
        o.family("netpath_drops_total", "counter", "Packets the datapath dropped, by reason.");
        for (k, v) in &counters.drops {
            o.sample("netpath_drops_total", &[("reason", k)], v);
        }
        o.family("netpath_published_ports", "gauge", "Published host ports in the datapath.");
        o.sample("netpath_published_ports", &[], counters.published_ports);

        let (containers, networks): (Vec<Container>, usize) = {
            let st = self.state();
            (st.containers().cloned().collect(), st.networks().count())
        };
        o.family("netpath_containers", "gauge", "Containers, by status.");
        let running = containers.iter().filter(|c| Self::is_running(c)).count();
        o.sample("netpath_containers", &[("status", "running")], running);
        o.sample("netpath_containers", &[("status", "other")], containers.len() - running);
        o.family("netpath_networks", "gauge", "Networks, the built-in ones included.");
        o.sample("netpath_networks", &[], networks);

        // Per endpoint, from the container's side (its host veth's counters, reversed): a
        // container on two networks has two series of each.
        let links = self.nl.stats_by_name().await?;
        let mut rows = vec![];
        for c in &containers {
            for e in &c.endpoints {
                let Some(s) = e.host_ifname.as_deref().and_then(|h| links.get(h)) else { continue };
                let net = self.state().network_by_id(&e.network_id).map(|n| n.name.clone()).unwrap_or_default();
                rows.push((c.name.clone(), net, s.peer_view()));
            }
        }
        for (name, field, help) in [
            ("netpath_container_rx_packets_total", 0, "Packets delivered to the container on this network."),
            ("netpath_container_rx_bytes_total", 1, "Bytes delivered to the container on this network."),
            ("netpath_container_tx_packets_total", 2, "Packets the container sent on this network."),
            ("netpath_container_tx_bytes_total", 3, "Bytes the container sent on this network."),
        ] {
            o.family(name, "counter", help);
            for (c, n, s) in &rows {
                let v = [s.rx_packets, s.rx_bytes, s.tx_packets, s.tx_bytes][field];
                o.sample(name, &[("container", c), ("network", n)], v);
            }
        }

        let lat = self.api_latency.by_route.lock().unwrap().clone();
        let name = "netpath_api_request_duration_seconds";
        o.family(name, "histogram", "Time the daemon took to answer API requests, by route.");
        for ((method, route), h) in &lat {
            for (i, b) in BUCKETS.iter().enumerate() {
                let le = b.to_string();
                o.sample(&format!("{name}_bucket"), &[("method", method), ("route", route), ("le", &le)], h.counts[i]);
            }
            o.sample(&format!("{name}_bucket"), &[("method", method), ("route", route), ("le", "+Inf")], h.count);
            o.sample(&format!("{name}_sum"), &[("method", method), ("route", route)], h.sum);
            o.sample(&format!("{name}_count"), &[("method", method), ("route", route)], h.count);
        }
        Ok(o.0)
    }
}

/// Serves GET /metrics on `addr` until the process ends.
pub async fn serve(d: Arc<Daemon>, addr: SocketAddr) -> anyhow::Result<()> {
    let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding the metrics address {addr}"))?;
    info!("metrics on http://{addr}/metrics");
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(|State(d): State<Shared>| async move {
                match d.render_metrics().await {
                    Ok(body) => ([("content-type", "text/plain; version=0.0.4")], body).into_response(),
                    Err(e) => {
                        warn!("rendering metrics: {e:#}");
                        (axum::http::StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")).into_response()
                    }
                }
            }),
        )
        .with_state(d);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(l, app).await {
            warn!("metrics server stopped: {e}");
        }
    });
    Ok(())
}
