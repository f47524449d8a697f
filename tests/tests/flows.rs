//! `netpath system flows --follow` end to end: the CLI follows the daemon's flow events while
//! the lab's client connects through published ports; `--container` filters; the datapath
//! writes events only while someone follows; Ctrl-C and a stopping daemon end it cleanly.

mod common;

use std::io::BufRead;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use netpath_tests::{CLIENT_IP, HOST_ETH0_IP, Lab, in_ns, must};
use serde_json::Value;

/// A running `netpath system flows --follow --json`, its lines collected by a thread.
struct Follower {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Every line read so far.
    seen: Vec<Value>,
}

impl Follower {
    fn start(lab: &Lab, extra: &[&str]) -> Follower {
        let mut args = vec!["system", "flows", "--follow", "--json"];
        args.extend_from_slice(extra);
        let mut child = lab.np_cmd(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Follower { child, lines, seen: vec![] }
    }

    /// Reads lines until one satisfies `want` (bounded by `within`); returns it.
    fn wait_for(&mut self, what: &str, within: Duration, want: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + within;
        if let Some(v) = self.seen.iter().find(|v| want(v)) {
            return v.clone();
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let v: Value = serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
                    self.seen.push(v.clone());
                    if want(&v) {
                        return v;
                    }
                }
                Err(_) => panic!("no {what} within {within:?}; lines so far:\n{:#?}", self.seen),
            }
        }
    }

    /// Sends SIGINT (Ctrl-C) and waits (bounded) for the exit; returns its status and stderr.
    fn interrupt(mut self) -> (std::process::ExitStatus, String) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
        self.wait_exit()
    }

    fn wait_exit(&mut self) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                use std::io::Read;
                let _ = self.child.stderr.take().unwrap().read_to_string(&mut err);
                return (st, err);
            }
            assert!(Instant::now() < deadline, "the follower did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether the datapath writes flow events now, as `netpath system datapath` says.
fn events_on(lab: &Lab) -> bool {
    let v: Value = serde_json::from_str(&lab.np(&["system", "datapath"])).unwrap();
    v["flow_events"].as_bool().unwrap_or_else(|| panic!("no flow_events in {v}"))
}

/// Waits (bounded) until the datapath's flow-event switch is `on`.
fn wait_events(lab: &Lab, on: bool) {
    for _ in 0..200 {
        if events_on(lab) == on {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("flow events never turned {}", if on { "on" } else { "off" });
}

/// A connection from the client namespace to the host's published `port`; the address the
/// server saw. Returns it with the client's source port, which it picks itself.
fn connect_from_client(lab: &Lab, port: u16, sport: u16) -> String {
    let cmd = format!("socat -t 10 - TCP:{HOST_ETH0_IP}:{port},connect-timeout=5,sourceport={sport} </dev/null");
    must(in_ns(&lab.client_ns, "sh", &["-c", &cmd])).trim().to_string()
}

fn is(v: &Value, event: &str, src: &str) -> bool {
    v["event"] == event && v["src"] == src
}

#[test]
fn following_shows_a_published_flow_new_closed_and_expired_and_stops_on_ctrl_c() {
    let lab = Lab::new("flows");
    common::whoami_server_with(&lab, "web", &["-p", "8080:8"]);
    let web = lab.ip_of("web", "bridge");
    assert!(!events_on(&lab), "nobody follows yet: the datapath writes no events");

    let mut f = Follower::start(&lab, &[]);
    wait_events(&lab, true);
    assert_eq!(connect_from_client(&lab, 8080, 41001), CLIENT_IP);
    let src = format!("{CLIENT_IP}:41001");
    let new = f.wait_for("new event", Duration::from_secs(10), |v| is(v, "new", &src));
    assert_eq!(new["dst"], format!("{HOST_ETH0_IP}:8080"), "{new}");
    assert_eq!(new["translated_src"], src, "the client's address is kept: {new}");
    assert_eq!(new["translated_dst"], format!("{web}:8"), "{new}");
    assert_eq!((new["proto"].as_str(), new["hook"].as_str()), (Some("tcp"), Some("uplink-in")), "{new}");
    assert_eq!((new["nat"].as_str(), new["verdict"].as_str()), (Some("dnat"), Some("forwarded")), "{new}");
    assert_eq!(new["dst_container"], "web", "{new}");
    assert!(new["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{new}");
    let closed = f.wait_for("closed event", Duration::from_secs(10), |v| is(v, "closed", &src));
    assert_eq!(closed["translated_dst"], new["translated_dst"], "{closed}");
    // A closed flow is swept after its 10 s closing timeout (housekeeping runs every 5 s).
    let expired = f.wait_for("expired event", Duration::from_secs(30), |v| is(v, "expired", &src));
    assert_eq!((expired["state"].as_str(), expired["dst_container"].as_str()), (Some("closing"), Some("web")));
    let n = |f: &Follower, e: &str| f.seen.iter().filter(|v| is(v, e, &src)).count();
    assert_eq!((n(&f, "new"), n(&f, "closed"), n(&f, "expired")), (1, 1, 1), "{:#?}", f.seen);

    let (status, stderr) = f.interrupt();
    assert!(status.success(), "Ctrl-C ends it cleanly: {status}, {stderr}");
    // The daemon notices the follower left and switches events off again.
    wait_events(&lab, false);
    assert!(lab.daemon_log().contains("flow events off"), "{}", lab.daemon_log());
}

#[test]
fn container_filter_follows_one_containers_addresses_and_drops() {
    let lab = Lab::new("flowsfilter");
    common::whoami_server_with(&lab, "web", &["-p", "8080:8"]);
    common::whoami_server_with(&lab, "api", &["-p", "8081:8"]);
    lab.np(&["network", "create", "--subnet", "10.78.0.0/24", "other"]);
    lab.np(&["run", "-d", "--name", "far", "--network", "other", "--", "sleep", "600"]);
    let err = lab.np_fails(&["system", "flows", "--follow", "--container", "nosuch"]);
    assert!(err.contains("container nosuch not found"), "{err}");

    let mut all = Follower::start(&lab, &[]);
    let mut api = Follower::start(&lab, &["--container", "api"]);
    wait_events(&lab, true);
    assert_eq!(connect_from_client(&lab, 8080, 41002), CLIENT_IP);
    assert_eq!(connect_from_client(&lab, 8081, 41003), CLIENT_IP);
    // api tries a container of another network: isolated, dropped at its own veth.
    let far = lab.ip_of("far", "other");
    assert!(!lab.try_np(&["exec", "api", "--", "ping", "-c", "1", "-W", "1", &far]).status.success());

    let drop = api.wait_for("isolation drop", Duration::from_secs(10), |v| v["event"] == "drop");
    assert_eq!((drop["reason"].as_str(), drop["hook"].as_str()), (Some("isolation"), Some("from-container")));
    assert_eq!((drop["src_container"].as_str(), drop["dst_container"].as_str()), (Some("api"), Some("far")));
    assert_eq!(
        (drop["src"].as_str(), drop["dst"].as_str()),
        (Some(lab.ip_of("api", "bridge").as_str()), Some(far.as_str()))
    );
    assert_eq!(drop["verdict"], "dropped");
    // Events come in order: by now both flows were announced to everyone.
    let web_src = format!("{CLIENT_IP}:41002");
    let api_src = format!("{CLIENT_IP}:41003");
    all.wait_for("web's flow", Duration::from_secs(10), |v| is(v, "new", &web_src));
    let got = api.wait_for("api's flow", Duration::from_secs(10), |v| is(v, "new", &api_src));
    assert_eq!(got["dst_container"], "api");
    assert!(
        api.seen.iter().all(|v| v["src_container"] == "api" || v["dst_container"] == "api"),
        "only api's events: {:#?}",
        api.seen
    );
    // The unfiltered follower also saw api's flow and the drop.
    all.wait_for("api's flow", Duration::from_secs(10), |v| is(v, "new", &api_src));
    all.wait_for("the drop", Duration::from_secs(10), |v| v["event"] == "drop" && v["reason"] == "isolation");

    // One follower leaving keeps events on for the other; the last one switches them off.
    let (st, _) = api.interrupt();
    assert!(st.success());
    std::thread::sleep(Duration::from_millis(300));
    assert!(events_on(&lab), "a follower is still there");
    assert_eq!(connect_from_client(&lab, 8080, 41004), CLIENT_IP);
    all.wait_for("a later flow", Duration::from_secs(10), |v| is(v, "new", &format!("{CLIENT_IP}:41004")));
    let (st, _) = all.interrupt();
    assert!(st.success());
    wait_events(&lab, false);
}

#[test]
fn a_stopping_daemon_ends_its_followers_and_a_new_one_starts_with_events_off() {
    let mut lab = Lab::new("flowsstop");
    let mut f = Follower::start(&lab, &[]);
    wait_events(&lab, true);
    lab.stop_daemon();
    let (status, stderr) = f.wait_exit();
    assert!(!status.success() && stderr.contains("ended the stream"), "{status}: {stderr}");
    // It stopped by itself (SIGTERM), not killed after waiting for the follower.
    assert!(lab.daemon_log().contains("netpath daemon stopped"), "{}", lab.daemon_log());
    drop(f);
    lab.start_daemon();
    assert!(!events_on(&lab));
    // Following works again after the restart (the pinned ring is reused).
    common::whoami_server_with(&lab, "web", &["-p", "8080:8"]);
    let mut f = Follower::start(&lab, &[]);
    wait_events(&lab, true);
    assert_eq!(connect_from_client(&lab, 8080, 41005), CLIENT_IP);
    f.wait_for("new event", Duration::from_secs(10), |v| is(v, "new", &format!("{CLIENT_IP}:41005")));
}
