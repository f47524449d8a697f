//! The measurements. Each figure runs one client tool in the variant's client namespace
//! against its [`Target`] and returns one or more [`Metric`] values.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::util::{in_ns, output, tail};
use crate::variants::Variant;

/// What a figure measures (one run of one tool).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Figure {
    Tcp1,
    Tcp4,
    Udp,
    Latency,
    Conn,
    Attach,
    /// The daemon stopped and started under an iperf3 stream (rows with a daemon).
    Restart,
}

impl Figure {
    pub const ALL: [Figure; 7] =
        [Figure::Tcp1, Figure::Tcp4, Figure::Udp, Figure::Latency, Figure::Conn, Figure::Attach, Figure::Restart];

    pub fn name(self) -> &'static str {
        match self {
            Figure::Tcp1 => "tcp1",
            Figure::Tcp4 => "tcp4",
            Figure::Udp => "udp",
            Figure::Latency => "latency",
            Figure::Conn => "conn",
            Figure::Attach => "attach",
            Figure::Restart => "restart",
        }
    }

    pub fn parse(s: &str) -> Result<Figure> {
        Figure::ALL.into_iter().find(|f| f.name() == s).with_context(|| {
            format!(
                "unknown figure {s:?} (known: {})",
                Figure::ALL.iter().map(|f| f.name()).collect::<Vec<_>>().join(", ")
            )
        })
    }

    pub fn metrics(self) -> &'static [Metric] {
        match self {
            Figure::Tcp1 => &[Metric::Tcp1],
            Figure::Tcp4 => &[Metric::Tcp4],
            Figure::Udp => &[Metric::UdpPps],
            Figure::Latency => &[Metric::RttP50, Metric::RttP99],
            Figure::Conn => &[Metric::ConnRate],
            Figure::Attach => &[Metric::Attach],
            Figure::Restart => &[Metric::RestartStall, Metric::RestartResets],
        }
    }
}

/// One column of the results table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    Tcp1,
    Tcp4,
    UdpPps,
    RttP50,
    RttP99,
    ConnRate,
    Attach,
    RestartStall,
    RestartResets,
}

impl Metric {
    pub const ALL: [Metric; 9] = [
        Metric::Tcp1,
        Metric::Tcp4,
        Metric::UdpPps,
        Metric::RttP50,
        Metric::RttP99,
        Metric::ConnRate,
        Metric::Attach,
        Metric::RestartStall,
        Metric::RestartResets,
    ];

    pub fn title(self) -> &'static str {
        match self {
            Metric::Tcp1 => "TCP 1 stream",
            Metric::Tcp4 => "TCP 4 streams",
            Metric::UdpPps => "UDP 64 B received",
            Metric::RttP50 => "TCP RTT p50",
            Metric::RttP99 => "TCP RTT p99",
            Metric::ConnRate => "new TCP conns",
            Metric::Attach => "attach one container",
            Metric::RestartStall => "restart: longest stall",
            Metric::RestartResets => "restart: resets",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Metric::Tcp1 | Metric::Tcp4 => "Gbit/s",
            Metric::UdpPps => "kpps",
            Metric::RttP50 | Metric::RttP99 => "µs",
            Metric::ConnRate => "conn/s",
            Metric::Attach | Metric::RestartStall => "ms",
            Metric::RestartResets => "count",
        }
    }

    pub fn higher_is_better(self) -> bool {
        !matches!(self, Metric::RttP50 | Metric::RttP99 | Metric::Attach | Metric::RestartStall | Metric::RestartResets)
    }

    /// Formats a value with a precision that suits its size.
    pub fn fmt(self, v: f64) -> String {
        match v.abs() {
            x if x >= 1000.0 => format!("{v:.0}"),
            x if x >= 100.0 => format!("{v:.0}"),
            x if x >= 10.0 => format!("{v:.1}"),
            _ => format!("{v:.2}"),
        }
    }
}

/// How long each load figure runs.
#[derive(Debug, Clone, Copy)]
pub struct Durations {
    pub secs: u32,
}

impl Durations {
    /// A tool's time limit: its own duration plus generous slack for start-up and teardown.
    fn limit(self) -> Duration {
        Duration::from_secs(u64::from(self.secs) + 30)
    }
}

/// Runs a figure once (attach: `attach_samples` wirings, each a sample).
pub fn measure(
    fig: Figure,
    v: &mut dyn Variant,
    d: Durations,
    exe: &std::path::Path,
    attach_samples: usize,
    attach_counter: &mut usize,
) -> Result<Vec<(Metric, f64)>> {
    if v.attach_only() && fig != Figure::Attach {
        return Ok(vec![]);
    }
    Ok(match fig {
        Figure::Tcp1 => vec![(Metric::Tcp1, tcp_throughput(v, 1, d)?)],
        Figure::Tcp4 => vec![(Metric::Tcp4, tcp_throughput(v, 4, d)?)],
        Figure::Udp => vec![(Metric::UdpPps, udp_rate(v, d)?)],
        Figure::Latency => {
            let (p50, p99) = tcp_latency(v, d)?;
            vec![(Metric::RttP50, p50), (Metric::RttP99, p99)]
        }
        Figure::Conn => vec![(Metric::ConnRate, conn_rate(v, d, exe)?)],
        Figure::Attach => {
            let mut out = Vec::new();
            for _ in 0..attach_samples {
                *attach_counter += 1;
                out.push((Metric::Attach, attach_time(v, *attach_counter)?));
            }
            out
        }
        Figure::Restart => match v.host_ns() {
            Some(_) => {
                let (stall, resets) = restart_under_load(v, d)?;
                vec![(Metric::RestartStall, stall), (Metric::RestartResets, resets)]
            }
            None => vec![],
        },
    })
}

/// TCP resets sent from namespace `ns` so far (the host answers packets of flows it does not
/// know, such as those of a datapath that went away, with one).
fn out_rsts(ns: &std::path::Path) -> Result<u64> {
    let snmp = output(in_ns(ns, "cat", &["/proc/net/snmp"]), None, Duration::from_secs(10))?;
    let snmp = String::from_utf8_lossy(&snmp.stdout).into_owned();
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().context("no Tcp: line")?, tcp.next().context("no Tcp: values")?);
    let i = names.split_whitespace().position(|n| n == "OutRsts").context("no OutRsts")?;
    values.split_whitespace().nth(i).context("short Tcp: line")?.parse().context("OutRsts")
}

/// The longest stretch of consecutive iperf3 intervals that moved no byte, in ms, and the
/// end of the last interval that moved some (s).
pub fn longest_stall(j: &Value) -> (f64, f64) {
    let (mut longest, mut run, mut last_moved) = (0.0f64, 0.0, 0.0);
    for i in j["intervals"].as_array().into_iter().flatten() {
        let s = &i["sum"];
        if s["bytes"].as_u64().unwrap_or(0) == 0 {
            run += s["seconds"].as_f64().unwrap_or(0.0);
            longest = longest.max(run);
        } else {
            run = 0.0;
            last_moved = s["end"].as_f64().unwrap_or(last_moved);
        }
    }
    (longest * 1e3, last_moved)
}

/// One iperf3 stream (0.1 s intervals) while the variant's daemon is stopped and started
/// again: the longest stall (ms) and the resets (the host's, plus one if the stream died).
pub fn restart_under_load(v: &mut dyn Variant, d: Durations) -> Result<(f64, f64)> {
    let host = v.host_ns().context("no daemon")?.to_path_buf();
    let t = v.target();
    let secs = d.secs.max(3) + 3;
    let args: Vec<String> = ["-c", &t.ip.to_string(), "-p", &t.iperf.to_string(), "-t", &secs.to_string()]
        .into_iter()
        .chain(["-i", "0.1", "-J"])
        .map(String::from)
        .collect();
    let rsts = out_rsts(&host)?;
    let client = v.client_ns().to_path_buf();
    let limit = Durations { secs }.limit();
    let stream = std::thread::spawn(move || {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        output(in_ns(&client, "iperf3", &argv), None, limit)
    });
    std::thread::sleep(Duration::from_millis(1500));
    let restarted = v.restart();
    let out = stream.join().map_err(|_| anyhow::anyhow!("iperf3 thread panicked"))??;
    restarted?;
    let resets = (out_rsts(&host)? - rsts) as f64;
    let j: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let (stall, last_moved) = longest_stall(&j);
    if out.status.success() && j.get("error").is_none() {
        Ok((stall, resets))
    } else {
        // The stream died: it stalled from its last byte to the end, and was reset.
        Ok((stall.max((f64::from(secs) - last_moved) * 1e3), resets.max(1.0)))
    }
}

/// Runs a client tool in the client namespace; returns stdout, or an error with its output.
fn client_tool(v: &dyn Variant, prog: &str, args: &[String], limit: Duration) -> Result<String> {
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = output(in_ns(v.client_ns(), prog, &argv), None, limit)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        // iperf3 -J reports its error inside the JSON.
        let json_err = serde_json::from_str::<Value>(&stdout).ok().and_then(|j| j["error"].as_str().map(String::from));
        bail!(
            "{prog} failed ({}): {}",
            out.status,
            json_err.unwrap_or_else(|| tail(&(String::from_utf8_lossy(&out.stderr).into_owned() + &stdout)))
        );
    }
    Ok(stdout)
}

/// `iperf3 -c -P n -J`: received throughput, Gbit/s.
pub fn tcp_throughput(v: &dyn Variant, streams: u32, d: Durations) -> Result<f64> {
    let t = v.target();
    let args =
        ["-c", &t.ip.to_string(), "-p", &t.iperf.to_string(), "-t", &d.secs.to_string(), "-P", &streams.to_string()];
    let mut args: Vec<String> = args.map(String::from).to_vec();
    args.push("-J".into());
    let out = client_tool(v, "iperf3", &args, d.limit())?;
    parse_iperf_tcp(&out)
}

pub fn parse_iperf_tcp(json: &str) -> Result<f64> {
    let j: Value = serde_json::from_str(json).context("iperf3 JSON")?;
    if let Some(e) = j["error"].as_str() {
        bail!("iperf3: {e}");
    }
    let bps = j["end"]["sum_received"]["bits_per_second"].as_f64().context("no end.sum_received.bits_per_second")?;
    Ok(bps / 1e9)
}

/// `iperf3 -u -l 64 -b 0`: packets the server received per second, in thousands.
pub fn udp_rate(v: &dyn Variant, d: Durations) -> Result<f64> {
    let t = v.target();
    let args = [
        "-c",
        &t.ip.to_string(),
        "-p",
        &t.iperf.to_string(),
        "-u",
        "-l",
        "64",
        "-b",
        "0",
        "-t",
        &d.secs.to_string(),
        "-J",
    ];
    let out = client_tool(v, "iperf3", &args.map(String::from), d.limit())?;
    parse_iperf_udp(&out)
}

pub fn parse_iperf_udp(json: &str) -> Result<f64> {
    let j: Value = serde_json::from_str(json).context("iperf3 JSON")?;
    if let Some(e) = j["error"].as_str() {
        bail!("iperf3: {e}");
    }
    // iperf 3.12: end.sum_received is the server's view (packets = sequence numbers seen up to
    // the last one, lost_packets = gaps); older versions only have end.sum with the same fields.
    let sum = if j["end"]["sum_received"].is_object() { &j["end"]["sum_received"] } else { &j["end"]["sum"] };
    let packets = sum["packets"].as_f64().context("no end.sum.packets")?;
    let lost = sum["lost_packets"].as_f64().context("no end.sum.lost_packets")?;
    let secs = sum["seconds"].as_f64().filter(|s| *s > 0.0).context("no end.sum.seconds")?;
    Ok((packets - lost) / secs / 1e3)
}

/// `sockperf ping-pong --tcp --full-rtt`: round-trip p50 and p99, µs.
pub fn tcp_latency(v: &dyn Variant, d: Durations) -> Result<(f64, f64)> {
    let t = v.target();
    let args = [
        "pp",
        "--tcp",
        "-i",
        &t.ip.to_string(),
        "-p",
        &t.sockperf.to_string(),
        "-t",
        &d.secs.to_string(),
        "--full-rtt",
    ];
    let out = client_tool(v, "sockperf", &args.map(String::from), d.limit())?;
    let p = |q: &str| {
        parse_sockperf_percentile(&out, q).with_context(|| format!("no p{q} in sockperf output: {}", tail(&out)))
    };
    Ok((p("50.000")?, p("99.000")?))
}

/// Finds `---> percentile 99.000 =   12.345` (µs) in sockperf's summary.
pub fn parse_sockperf_percentile(out: &str, q: &str) -> Option<f64> {
    out.lines().find_map(|l| {
        let rest = l.split("percentile").nth(1)?;
        let (pq, val) = rest.split_once('=')?;
        (pq.trim() == q).then(|| val.trim().parse().ok())?
    })
}

/// This binary's connect/close client against the container's accept server: conns/s.
pub fn conn_rate(v: &dyn Variant, d: Durations, exe: &std::path::Path) -> Result<f64> {
    let t = v.target();
    let args = ["__conn-client".to_string(), format!("{}:{}", t.ip, t.conn), "--secs".into(), d.secs.to_string()];
    let out = client_tool(v, exe.to_str().context("exe path")?, &args, d.limit())?;
    let j: Value = serde_json::from_str(&out).context("conn client JSON")?;
    let conns = j["conns"].as_f64().context("conns")?;
    let errors = j["errors"].as_f64().context("errors")?;
    let secs = j["secs"].as_f64().context("secs")?;
    if conns == 0.0 || errors > conns / 100.0 {
        bail!("{errors} of {} connections failed (first: {})", conns + errors, j["first_error"]);
    }
    Ok(conns / secs)
}

/// Wires (and unwires) one more container; ms.
pub fn attach_time(v: &mut dyn Variant, n: usize) -> Result<f64> {
    Ok(v.attach_once(n)?.as_secs_f64() * 1e3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockperf_percentiles() {
        let out = "sockperf: ---> <MAX> observation =  120.551\n\
                   sockperf: ---> percentile 99.999 =  120.551\n\
                   sockperf: ---> percentile 99.000 =   45.210\n\
                   sockperf: ---> percentile 90.000 =   30.001\n\
                   sockperf: ---> percentile 50.000 =   22.718\n";
        assert_eq!(parse_sockperf_percentile(out, "50.000"), Some(22.718));
        assert_eq!(parse_sockperf_percentile(out, "99.000"), Some(45.21));
        assert_eq!(parse_sockperf_percentile(out, "75.000"), None);
    }

    #[test]
    fn iperf_json() {
        let tcp = r#"{"end":{"sum_received":{"bits_per_second":9.5e9}}}"#;
        assert!((parse_iperf_tcp(tcp).unwrap() - 9.5).abs() < 1e-9);
        let udp = r#"{"end":{"sum":{"packets":1000000,"lost_packets":100000,"seconds":2.0}}}"#;
        assert!((parse_iperf_udp(udp).unwrap() - 450.0).abs() < 1e-9);
        let udp = r#"{"end":{"sum":{"packets":9,"lost_packets":0,"seconds":1.0},
                      "sum_received":{"packets":2000,"lost_packets":1000,"seconds":1.0}}}"#;
        assert!((parse_iperf_udp(udp).unwrap() - 1.0).abs() < 1e-9);
        assert!(parse_iperf_tcp("{}").is_err());
    }

    #[test]
    fn stalls_are_the_longest_run_of_empty_intervals() {
        let iv = |b: &[u64]| {
            let v: Vec<Value> = b
                .iter()
                .enumerate()
                .map(|(i, b)| serde_json::json!({"sum": {"bytes": b, "seconds": 0.1, "end": (i + 1) as f64 * 0.1}}))
                .collect();
            serde_json::json!({ "intervals": v })
        };
        let (ms, last) = longest_stall(&iv(&[5, 0, 0, 5, 0, 5]));
        assert!((ms - 200.0).abs() < 1e-6 && (last - 0.6).abs() < 1e-9, "{ms} {last}");
        assert_eq!(longest_stall(&iv(&[5, 5])).0, 0.0);
    }

    #[test]
    fn figure_names_round_trip() {
        for f in Figure::ALL {
            assert_eq!(Figure::parse(f.name()).unwrap(), f);
        }
        assert!(Figure::parse("bogus").is_err());
    }
}
