//! `netpath system flows`: the NAT table, or (`--follow`) flow events as they happen.

use std::io::Write;

use anyhow::{Result, bail};
use serde_json::Value;

use crate::api::client::{Client, seg};

pub async fn run(c: &Client, follow: bool, container: Option<String>, json: bool) -> Result<u8> {
    if !follow {
        println!("{}", serde_json::to_string_pretty(&c.get("/datapath/flows").await?)?);
        return Ok(0);
    }
    let path = match &container {
        Some(name) => format!("/datapath/flows/events?container={}", seg(name)),
        None => "/datapath/flows/events".to_string(),
    };
    let mut out = std::io::stdout().lock();
    let mut closed = false;
    let lines = c.get_lines(&path, |line| {
        let text = if json {
            line.to_string()
        } else {
            match serde_json::from_str::<Value>(line) {
                Ok(v) => human(&v),
                Err(_) => line.to_string(),
            }
        };
        // A closed stdout (`| head`) ends it quietly.
        closed = writeln!(out, "{text}").is_err();
        !closed
    });
    tokio::select! {
        r = lines => {
            r?;
            if !closed {
                bail!("the daemon ended the stream (is it stopping?)");
            }
        }
        // Ctrl-C: the connection closes with this process; the daemon notices.
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(0)
}

/// One event as a line for people: when, what, the tuple as it came and as it left, where,
/// why, and which containers.
fn human(v: &Value) -> String {
    let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
    let time = s("time");
    if v["event"] == "lost" {
        return format!("{time}  lost     {} events ({})", v["count"], s("reason"));
    }
    let mut line = format!("{time}  {:<7}  {:<4}  {} > {}", s("event"), s("proto"), s("src"), s("dst"));
    if let (Some(ts), Some(td)) = (v["translated_src"].as_str(), v["translated_dst"].as_str())
        && (ts != v["src"] || td != v["dst"])
    {
        line.push_str(&format!("  as {ts} > {td}"));
    }
    for k in ["hook", "nat", "reason", "rule", "state", "interface"] {
        if let Some(x) = v[k].as_str().filter(|x| *x != "none") {
            line.push_str(if k == "rule" { "  rule " } else { "  " });
            line.push_str(x);
        }
    }
    let (sc, dc) = (v["src_container"].as_str(), v["dst_container"].as_str());
    if sc.is_some() || dc.is_some() {
        line.push_str(&format!("  [{} > {}]", sc.unwrap_or("-"), dc.unwrap_or("-")));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_flow_reads_as_one_line() {
        let v: Value = serde_json::from_str(
            r#"{"time":"2026-01-01T00:00:00.000Z","event":"new","proto":"tcp","src":"198.51.100.2:40000",
            "dst":"198.51.100.1:8080","translated_src":"198.51.100.2:40000","translated_dst":"172.17.0.2:8",
            "hook":"uplink-in","verdict":"forwarded","nat":"dnat","reason":null,"src_container":null,
            "dst_container":"web"}"#,
        )
        .unwrap();
        assert_eq!(
            human(&v),
            "2026-01-01T00:00:00.000Z  new      tcp   198.51.100.2:40000 > 198.51.100.1:8080  \
             as 198.51.100.2:40000 > 172.17.0.2:8  uplink-in  dnat  [- > web]"
        );
    }

    #[test]
    fn a_policy_drop_shows_its_rule() {
        let v: Value = serde_json::from_str(
            r#"{"time":"t","event":"drop","proto":"tcp","src":"198.51.100.9:5","dst":"198.51.100.1:8080",
            "hook":"uplink-in","reason":"policy-denied","rule":"block-far","interface":"eth0"}"#,
        )
        .unwrap();
        assert_eq!(
            human(&v),
            "t  drop     tcp   198.51.100.9:5 > 198.51.100.1:8080  uplink-in  policy-denied  rule block-far  eth0"
        );
    }

    #[test]
    fn a_drop_shows_its_reason() {
        let v: Value = serde_json::from_str(
            r#"{"time":"t","event":"drop","proto":"udp","src":"172.18.0.2:5","dst":"172.19.0.2:6",
            "translated_src":null,"translated_dst":null,"hook":"from-container","verdict":"dropped","nat":null,
            "reason":"isolation","src_container":"a","dst_container":"b","interface":"veth01234567"}"#,
        )
        .unwrap();
        assert_eq!(
            human(&v),
            "t  drop     udp   172.18.0.2:5 > 172.19.0.2:6  from-container  isolation  veth01234567  [a > b]"
        );
    }
}
