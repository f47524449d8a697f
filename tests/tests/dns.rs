//! Embedded DNS at 127.0.0.11, end to end: a real daemon in a netns lab, containers asking
//! with `getent` and `dig` (their own /etc/resolv.conf says where), and an upstream resolver
//! (dnsmasq) in the lab's "client" namespace, which plays the outside world.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use netpath_tests::dns::{EXT_NAME, Upstream};
use netpath_tests::{CLIENT_IP, Lab, in_ns, must};

/// The address the lab's upstream gives `EXT_NAME`.
const EXT_IP: &str = "203.0.113.7";

/// A lab whose upstream resolver is dnsmasq at the client namespace's address.
fn lab_with_upstream(tag: &str) -> (Lab, Upstream) {
    let lab = Lab::new(tag);
    lab.set_upstreams(&[CLIENT_IP]);
    let up = Upstream::start(&lab, &lab.client_ns, CLIENT_IP, EXT_IP);
    (lab, up)
}

/// `getent hosts NAME` inside a container: the addresses it printed (empty if not found).
fn getent(lab: &Lab, ctr: &str, name: &str) -> Vec<String> {
    let out = lab.try_np(&["exec", ctr, "--", "getent", "hosts", name]);
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split_whitespace().next()).map(String::from).collect()
}

/// `dig` inside a container, against the nameserver its resolv.conf names; full output.
fn dig(lab: &Lab, ctr: &str, args: &[&str]) -> String {
    let mut a = vec!["exec", ctr, "--", "dig", "+tries=1", "+timeout=8"];
    a.extend_from_slice(args);
    lab.np(&a)
}

fn dig_short(lab: &Lab, ctr: &str, args: &[&str]) -> Vec<String> {
    let mut a = vec!["+short"];
    a.extend_from_slice(args);
    dig(lab, ctr, &a).lines().map(String::from).collect()
}

/// The `status:` of a dig answer.
fn status(dig_out: &str) -> String {
    dig_out
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or_else(|| panic!("no status in:\n{dig_out}"))
        .to_string()
}

/// A detached container that just sleeps, with extra `run` flags.
fn sleeper(lab: &Lab, name: &str, flags: &[&str]) {
    let mut a = vec!["run", "-d", "--name", name];
    a.extend_from_slice(flags);
    a.extend_from_slice(&["--", "sleep", "600"]);
    lab.np(&a);
}

#[test]
fn names_aliases_short_ids_and_reverse_names_resolve() {
    let lab = Lab::new("dns-names");
    lab.np(&["network", "create", "appnet"]);
    sleeper(&lab, "web", &["--network", "appnet", "--alias", "www", "--alias", "svc"]);
    sleeper(&lab, "web2", &["--network", "appnet", "--alias", "svc"]);
    sleeper(&lab, "client", &["--network", "appnet"]);
    let (web, web2) = (lab.ip_of("web", "appnet"), lab.ip_of("web2", "appnet"));
    let short: String = lab.inspect("web")["Id"].as_str().unwrap()[..12].to_string();

    assert_eq!(getent(&lab, "client", "web"), [web.as_str()]);
    assert_eq!(getent(&lab, "client", "www"), [web.as_str()], "alias");
    assert_eq!(getent(&lab, "client", &short), [web.as_str()], "short ID");
    assert_eq!(getent(&lab, "client", "web.appnet"), [web.as_str()], "NAME.NETWORK");
    assert_eq!(getent(&lab, "client", "WEB"), [web.as_str()], "case-insensitive");
    assert_eq!(getent(&lab, "client", "client"), [lab.ip_of("client", "appnet")], "itself");

    // One alias, two containers: both addresses, the order rotating between queries.
    let mut firsts = std::collections::HashSet::new();
    for _ in 0..4 {
        let mut a = dig_short(&lab, "client", &["svc"]);
        firsts.insert(a[0].clone());
        a.sort();
        let mut want = vec![web.clone(), web2.clone()];
        want.sort();
        assert_eq!(a, want);
    }
    assert_eq!(firsts.len(), 2, "the first address never changed");

    assert_eq!(dig_short(&lab, "client", &["-x", &web]), ["web.appnet."], "PTR");
    let aaaa = dig(&lab, "client", &["AAAA", "web"]);
    assert_eq!(status(&aaaa), "NOERROR");
    assert!(aaaa.contains("ANSWER: 0,"), "AAAA of a container name has no records:\n{aaaa}");
    let a = dig(&lab, "client", &["web"]);
    let ttl: u32 = a
        .lines()
        .find(|l| l.starts_with("web.") && l.contains("\tA\t"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no A record:\n{a}"));
    assert!(ttl <= 5, "container records have a short TTL, got {ttl}");

    // Over TCP too.
    assert_eq!(dig_short(&lab, "client", &["+tcp", "www"]), [web.as_str()]);
}

#[test]
fn scope_follows_networks_and_changes_show_on_the_next_query() {
    let lab = Lab::new("dns-scope");
    lab.np(&["network", "create", "neta"]);
    lab.np(&["network", "create", "netb"]);
    sleeper(&lab, "x", &["--network", "neta"]);
    sleeper(&lab, "y", &["--network", "netb"]);
    sleeper(&lab, "both", &["--network", "neta"]);
    lab.np(&["network", "connect", "netb", "both"]);

    assert!(getent(&lab, "x", "y").is_empty(), "no shared network");
    assert_eq!(getent(&lab, "both", "x"), [lab.ip_of("x", "neta")]);
    assert_eq!(getent(&lab, "both", "y"), [lab.ip_of("y", "netb")], "a container on two networks resolves both");

    lab.np(&["network", "connect", "--alias", "yy", "neta", "y"]);
    let y_a = lab.ip_of("y", "neta");
    assert_eq!(getent(&lab, "x", "y"), [y_a.as_str()], "connect");
    assert_eq!(getent(&lab, "x", "yy"), [y_a.as_str()], "connect --alias");
    lab.np(&["network", "disconnect", "neta", "y"]);
    assert!(getent(&lab, "x", "y").is_empty(), "disconnect");
    assert!(getent(&lab, "x", "yy").is_empty(), "disconnect removes the alias");

    let old_ip = lab.ip_of("both", "neta");
    lab.np(&["rm", "-f", "both"]);
    assert!(getent(&lab, "x", "both").is_empty(), "rm");
    let new_ip = format!("{}.200", old_ip.rsplit_once('.').unwrap().0);
    sleeper(&lab, "both", &["--network", "neta", "--ip", &new_ip]);
    assert_eq!(getent(&lab, "x", "both"), [new_ip], "re-created: the new address at once");
}

#[test]
fn default_bridge_resolves_no_names_but_external_ones() {
    let (lab, _up) = lab_with_upstream("dns-bridge");
    sleeper(&lab, "b1", &[]);
    sleeper(&lab, "b2", &[]);
    let resolv = lab.np(&["exec", "b2", "--", "cat", "/etc/resolv.conf"]);
    assert!(resolv.contains(&format!("nameserver {CLIENT_IP}")), "a copy of the host's servers:\n{resolv}");
    assert!(!resolv.contains("127.0.0.11"), "{resolv}");
    // Nothing asks 127.0.0.11 there, so the daemon holds no socket in it (descriptors are
    // what caps the number of containers a daemon can serve).
    let socks = lab.np(&["exec", "b2", "--", "ss", "-Hlnu"]);
    assert!(!socks.contains("127.0.0.11"), "no embedded server on the default bridge:\n{socks}");
    assert!(getent(&lab, "b2", "b1").is_empty(), "no names on the default bridge");
    assert_eq!(getent(&lab, "b2", EXT_NAME), [EXT_IP], "external names through the host's upstream");
}

#[test]
fn internal_networks_resolve_names_but_forward_nothing() {
    let (lab, _up) = lab_with_upstream("dns-internal");
    lab.np(&["network", "create", "--internal", "--subnet", "10.91.0.0/24", "inner"]);
    lab.np(&["network", "create", "--subnet", "10.92.0.0/24", "outer"]);
    sleeper(&lab, "i1", &["--network", "inner"]);
    sleeper(&lab, "i2", &["--network", "inner"]);
    sleeper(&lab, "both", &["--network", "inner"]);
    lab.np(&["network", "connect", "outer", "both"]);
    assert_eq!(getent(&lab, "i2", "i1").len(), 1, "names resolve on an internal network");
    // No way out, so no forwarding either (as Docker 26+): a fast SERVFAIL, not a timeout.
    let t = Instant::now();
    assert_eq!(status(&dig(&lab, "i2", &[EXT_NAME])), "SERVFAIL");
    assert!(t.elapsed() < Duration::from_secs(3), "refused at once, took {:?}", t.elapsed());
    // A container with a way out (a second, ordinary network) still gets forwarding.
    assert_eq!(dig_short(&lab, "both", &[EXT_NAME]), [EXT_IP]);
}

#[test]
fn forwarding_relays_nxdomain_servfail_and_big_answers() {
    let (lab, _up) = lab_with_upstream("dns-forward");
    // A second upstream with another answer, and an address where no resolver listens.
    must(in_ns(&lab.client_ns, "ip", &["addr", "add", "198.51.100.3/24", "dev", "eth0"]));
    must(in_ns(&lab.client_ns, "ip", &["addr", "add", "198.51.100.4/24", "dev", "eth0"]));
    let _other = Upstream::start(&lab, &lab.client_ns, "198.51.100.3", "203.0.113.99");
    lab.np(&["network", "create", "appnet"]);
    sleeper(&lab, "c", &["--network", "appnet", "--dns-search", "corp.test"]);

    let resolv = lab.np(&["exec", "c", "--", "cat", "/etc/resolv.conf"]);
    assert!(resolv.contains("nameserver 127.0.0.11\n"), "{resolv}");
    assert!(resolv.contains("search corp.test\n"), "{resolv}");
    assert_eq!(getent(&lab, "c", EXT_NAME), [EXT_IP], "forwarded to the host's upstream");
    assert_eq!(dig_short(&lab, "c", &["+tcp", EXT_NAME]), [EXT_IP], "forwarded over TCP");
    let nx = dig(&lab, "c", &["nope.test"]);
    assert_eq!(status(&nx), "NXDOMAIN", "{nx}");
    let nx = dig(&lab, "c", &["nosuchcontainer"]);
    assert_eq!(status(&nx), "NXDOMAIN", "unknown single names are the upstream's to deny:\n{nx}");

    // The upstream truncates at 512 bytes; the daemon fetches the whole answer over TCP and
    // the client gets it over UDP (+ignore: dig does not retry over TCP itself).
    let big = dig(&lab, "c", &["+ignore", "+bufsize=1232", "TXT", "big.test"]);
    assert!(!big.contains(" tc") && big.contains(&"3".repeat(200)), "TCP fallback:\n{big}");
    let small = dig(&lab, "c", &["+ignore", "+noedns", "TXT", "big.test"]);
    assert!(small.contains("flags: qr tc") || small.contains(" tc "), "512-byte client gets TC:\n{small}");

    // --dns replaces the host's upstreams; an upstream that is down means SERVFAIL.
    sleeper(&lab, "own", &["--network", "appnet", "--dns", "198.51.100.3"]);
    assert_eq!(getent(&lab, "own", EXT_NAME), ["203.0.113.99"]);
    assert_eq!(getent(&lab, "own", "c"), [lab.ip_of("c", "appnet")], "container names still resolve");
    sleeper(&lab, "dead", &["--network", "appnet", "--dns", "198.51.100.4"]);
    let sf = dig(&lab, "dead", &[EXT_NAME]);
    assert_eq!(status(&sf), "SERVFAIL", "{sf}");
    let insp = lab.inspect("own");
    assert_eq!(insp["HostConfig"]["Dns"][0], "198.51.100.3");
}

#[test]
fn a_slow_upstream_does_not_stall_other_containers() {
    let (lab, _up) = lab_with_upstream("dns-slow");
    // An upstream that reads queries and never answers.
    must(in_ns(&lab.client_ns, "ip", &["addr", "add", "198.51.100.5/24", "dev", "eth0"]));
    let mut hole = in_ns(&lab.client_ns, "socat", &["-u", "UDP-RECV:53,bind=198.51.100.5", "OPEN:/dev/null"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    lab.np(&["network", "create", "appnet"]);
    sleeper(&lab, "stuck", &["--network", "appnet", "--dns", "198.51.100.5"]);
    sleeper(&lab, "fine", &["--network", "appnet"]);
    let mut slow: Command = lab.np_cmd(&["exec", "stuck", "--", "dig", "+tries=1", "+timeout=20", "slow.test"]);
    let slow = slow.stdout(Stdio::piped()).spawn().unwrap();
    // While that query waits on its upstream, the other container's lookups go through.
    for _ in 0..5 {
        assert_eq!(getent(&lab, "fine", "stuck"), [lab.ip_of("stuck", "appnet")]);
        assert_eq!(getent(&lab, "fine", EXT_NAME), [EXT_IP]);
    }
    // And the stuck one gets an answer (SERVFAIL) before its own 20 s timeout.
    let out = slow.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert_eq!(status(&out), "SERVFAIL", "{out}");
    let _ = hole.kill();
    let _ = hole.wait();
}

#[test]
fn containers_see_their_own_files_and_hostname_in_run_run_d_and_exec() {
    let lab = Lab::new("dns-files");
    lab.np(&["network", "create", "appnet"]);
    let show = "cat /etc/resolv.conf; echo ---; cat /etc/hosts; echo ---; hostname; cat /etc/hostname";
    lab.np(&[
        "run",
        "-d",
        "--name",
        "d",
        "--network",
        "appnet",
        "--alias",
        "dee",
        "--",
        "sh",
        "-c",
        &format!("{show}; sleep 600"),
    ]);
    let id = lab.inspect("d")["Id"].as_str().unwrap().to_string();
    let exec = lab.np(&["exec", "d", "--", "sh", "-c", show]);
    let ip = lab.ip_of("d", "appnet");
    assert!(exec.contains("nameserver 127.0.0.11"), "{exec}");
    assert!(exec.contains(&format!("{ip}\t{} d dee\n", &id[..12])), "hosts: address, hostname, name, alias:\n{exec}");
    assert!(exec.trim_end().ends_with(&format!("{0}\n{0}", &id[..12])), "hostname is the short ID:\n{exec}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while lab.np(&["logs", "d"]).matches("---").count() < 2 {
        assert!(Instant::now() < deadline, "no output from the detached container");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(lab.np(&["logs", "d"]), exec, "run -d sees what exec sees");

    let fg =
        lab.np(&["run", "--rm", "--name", "fg", "--network", "appnet", "--hostname", "box", "--", "sh", "-c", show]);
    assert!(fg.contains("nameserver 127.0.0.11"), "{fg}");
    assert!(fg.trim_end().ends_with("box\nbox"), "--hostname:\n{fg}");
    assert!(fg.contains("\tbox fg\n"), "{fg}");

    // The host's own files and hostname are untouched.
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_ne!(host_name.trim(), "box");
    assert!(!std::fs::read_to_string("/etc/resolv.conf").unwrap().contains("127.0.0.11"));
}

#[test]
fn restarted_daemon_serves_the_same_containers() {
    let mut lab = Lab::new("dns-restart");
    lab.np(&["network", "create", "appnet"]);
    sleeper(&lab, "a", &["--network", "appnet", "--alias", "alpha"]);
    sleeper(&lab, "b", &["--network", "appnet"]);
    assert_eq!(getent(&lab, "b", "alpha"), [lab.ip_of("a", "appnet")]);
    lab.restart_daemon();
    assert_eq!(getent(&lab, "b", "alpha"), [lab.ip_of("a", "appnet")]);
    assert_eq!(getent(&lab, "a", "b"), [lab.ip_of("b", "appnet")]);
}

#[test]
fn garbage_never_stops_the_server() {
    let lab = Lab::new("dns-garbage");
    lab.np(&["network", "create", "appnet"]);
    sleeper(&lab, "a", &["--network", "appnet"]);
    sleeper(&lab, "b", &["--network", "appnet"]);
    // Garbage, a short header, a compression loop, a response; over UDP and TCP.
    let py = r#"
import socket
msgs = [b"", b"\x00", b"\xff" * 11, b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01",
        b"\x12\x34\x81\x80" + b"\x00" * 8, bytes(range(256)) * 4]
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for m in msgs:
    u.sendto(m, ("127.0.0.11", 53))
for m in msgs:
    t = socket.create_connection(("127.0.0.11", 53), timeout=5)
    t.sendall(len(m).to_bytes(2, "big") + m)
    t.close()
t = socket.create_connection(("127.0.0.11", 53), timeout=5)
t.sendall(b"\x40\x00" + b"\x00" * 10)
t.close()
"#;
    lab.np(&["exec", "a", "--", "python3", "-c", py]);
    assert_eq!(getent(&lab, "a", "b"), [lab.ip_of("b", "appnet")]);
    assert_eq!(dig_short(&lab, "a", &["+tcp", "b"]), [lab.ip_of("b", "appnet")]);
}

#[test]
fn bad_dns_options_are_refused_and_change_nothing() {
    let lab = Lab::new("dns-bad");
    lab.np(&["network", "create", "appnet"]);
    for (flags, want) in [
        (&["--network", "appnet", "--dns", "not-an-ip"][..], "invalid --dns"),
        (&["--network", "appnet", "--dns-search", "bad domain"][..], "invalid --dns-search"),
        (&["--network", "appnet", "--hostname=-x"][..], "invalid --hostname"),
        (&["--network", "appnet", "--alias", "a b"][..], "invalid alias"),
        (&["--alias", "x"][..], "user-defined networks"),
        (&["--network", "host", "--hostname", "h"][..], "--network host"),
    ] {
        let mut a = vec!["run", "-d", "--name", "bad"];
        a.extend_from_slice(flags);
        a.extend_from_slice(&["--", "sleep", "1"]);
        let err = lab.np_fails(&a);
        assert!(err.contains(want), "{flags:?}: {err}");
    }
    assert!(lab.try_np(&["inspect", "bad"]).stderr.starts_with(b"Error"), "nothing was created");
    sleeper(&lab, "ok", &["--network", "appnet"]);
    let err = lab.np_fails(&["network", "connect", "--alias", "a", "bridge", "ok"]);
    assert!(err.contains("user-defined networks"), "{err}");
    lab.np(&["network", "create", "other"]);
    let err = lab.np_fails(&["network", "connect", "--alias", "a..b", "other", "ok"]);
    assert!(err.contains("invalid alias"), "{err}");
    assert_eq!(lab.inspect("ok")["NetworkSettings"]["Networks"].as_object().unwrap().len(), 1);
    let containers = std::fs::read_dir(lab.state_dir.join("containers")).unwrap().count();
    // ok's log and its files directory.
    assert_eq!(containers, 2, "refused containers left no files");
}
