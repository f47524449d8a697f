//! The CNI plugin as runtimes run it: `netpath-cni` executed with CNI_* variables and the
//! network config on stdin, its stdout checked against the spec's result and error shapes,
//! chained with the reference plugins of Debian's containernetworking-plugins.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use netpath_tests::{CLIENT_IP, HOST_ETH0_IP, Lab, in_ns, must};
use serde_json::{Value, json};

const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

fn cni_bin() -> std::path::PathBuf {
    netpath_tests::netpath_bin().with_file_name("netpath-cni")
}

/// What a runtime sees of one plugin run: exit status and the JSON on stdout (if any).
struct Run {
    ok: bool,
    out: Value,
}

/// Executes a CNI plugin as a runtime does (libcni's invoke): env in, config on stdin.
fn exec_plugin(plugin: &Path, cmd: &str, cid: &str, netns: Option<&Path>, ifname: &str, conf: &Value) -> Run {
    let mut c = Command::new(plugin);
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", cid)
        .env("CNI_IFNAME", ifname)
        .env("CNI_PATH", format!("{}:{REFERENCE_PLUGINS}", cni_bin().parent().unwrap().display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(ns) = netns {
        c.env("CNI_NETNS", ns);
    }
    let mut child = c.spawn().unwrap_or_else(|e| panic!("running {}: {e}", plugin.display()));
    child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{cmd}: stdout is not JSON ({e}): {text}"))
    };
    Run { ok: out.status.success(), out: v }
}

fn np_cni(cmd: &str, cid: &str, netns: Option<&Path>, ifname: &str, conf: &Value) -> Run {
    exec_plugin(&cni_bin(), cmd, cid, netns, ifname, conf)
}

/// Runs and asserts success, returning stdout's JSON.
fn ok(cmd: &str, cid: &str, netns: Option<&Path>, ifname: &str, conf: &Value) -> Value {
    let r = np_cni(cmd, cid, netns, ifname, conf);
    assert!(r.ok, "{cmd} {cid} {ifname} failed: {}", r.out);
    r.out
}

/// Runs and asserts failure with the spec's error shape; returns the code.
fn fails(cmd: &str, cid: &str, netns: Option<&Path>, ifname: &str, conf: &Value) -> (u64, String) {
    let r = np_cni(cmd, cid, netns, ifname, conf);
    assert!(!r.ok, "{cmd} unexpectedly succeeded: {}", r.out);
    assert!(r.out["cniVersion"].is_string(), "error without cniVersion: {}", r.out);
    assert!(r.out["msg"].as_str().is_some_and(|m| !m.is_empty()), "error without msg: {}", r.out);
    (r.out["code"].as_u64().expect("error code"), r.out["msg"].as_str().unwrap().to_string())
}

/// `base` with the keys of `extra` added or replaced.
fn with(base: &Value, extra: Value) -> Value {
    let mut v = base.clone();
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

fn conf(lab: &Lab, version: &str, name: &str, subnet: &str) -> Value {
    json!({
        "cniVersion": version,
        "name": name,
        "type": "netpath-cni",
        "socket": lab.socket,
        "subnet": subnet,
    })
}

/// Rows of `ps -a` (the header aside).
fn container_count(lab: &Lab) -> usize {
    lab.np(&["ps", "-a"]).lines().count() - 1
}

fn ping(from: &Path, ip: &str) -> bool {
    in_ns(from, "ping", &["-c", "1", "-W", "2", ip]).stdout(Stdio::null()).status().unwrap().success()
}

fn addr_of(ns: &Path, dev: &str) -> Vec<String> {
    must(in_ns(ns, "ip", &["-o", "-4", "addr", "show", "dev", dev]))
        .lines()
        .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1).map(str::to_string))
        .collect()
}

/// A result as the spec shapes it for `version` (SPEC.md "Success"; 0.3.1/0.4.0 tag IPs).
fn assert_result_shape(r: &Value, version: &str, ifname: &str, netns: &Path) {
    assert_eq!(r["cniVersion"], version, "{r}");
    let ifs = r["interfaces"].as_array().expect("interfaces");
    for i in ifs {
        let mac = i["mac"].as_str().unwrap_or_else(|| panic!("interface without mac: {r}"));
        assert_eq!(mac.len(), 17, "{mac}");
    }
    let ips = r["ips"].as_array().expect("ips");
    assert_eq!(ips.len(), 1, "{r}");
    let idx = ips[0]["interface"].as_u64().expect("ips[0].interface") as usize;
    assert_eq!(ifs[idx]["name"], ifname);
    assert_eq!(Path::new(ifs[idx]["sandbox"].as_str().expect("sandbox")), netns);
    assert!(ips[0]["address"].as_str().unwrap().contains('/'), "address in CIDR form: {r}");
    assert!(ips[0]["gateway"].is_string());
    let old = version.starts_with("0.");
    assert_eq!(ips[0].get("version").and_then(Value::as_str), old.then_some("4"), "{version}: {r}");
    assert_eq!(r["routes"][0]["dst"], "0.0.0.0/0");
    assert!(r["dns"].is_object());
}

#[test]
fn add_check_del_in_every_version_and_traffic_flows_between_attachments() {
    let mut lab = Lab::new("cni-basic");
    let host_links = lab.links(&lab.host_ns);
    for (n, version) in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"].into_iter().enumerate() {
        let net = format!("cni{n}");
        let conf = conf(&lab, version, &net, &format!("10.93.{n}.0/24"));
        let (a, b) = (lab.add_ns(&format!("a{n}")), lab.add_ns(&format!("b{n}")));
        let ra = ok("ADD", "ctr-a", Some(&a), "eth0", &conf);
        let rb = ok("ADD", "ctr-b", Some(&b), "net1", &conf);
        assert_result_shape(&ra, version, "eth0", &a);
        assert_result_shape(&rb, version, "net1", &b);
        let ip_b = rb["ips"][0]["address"].as_str().unwrap().to_string();
        assert_eq!(addr_of(&b, "net1"), [ip_b.as_str()], "the result says what the namespace has");
        assert_eq!(lab.links(&b), ["lo", "net1"]);
        let ip_b = ip_b.split('/').next().unwrap();
        assert!(ping(&a, ip_b), "{version}: a reaches b");
        // The network was made from the config's subnet; the attachment shows in inspect.
        assert_eq!(lab.inspect_network(&net)["IPAM"]["Config"][0]["Subnet"], format!("10.93.{n}.0/24"));
        if version != "0.3.1" {
            ok("CHECK", "ctr-a", Some(&a), "eth0", &with(&conf, json!({ "prevResult": ra })));
        } else {
            let (code, _) = fails("CHECK", "ctr-a", Some(&a), "eth0", &conf);
            assert_eq!(code, 1, "CHECK needs 0.4.0");
        }
        ok("DEL", "ctr-b", Some(&b), "net1", &conf);
        assert_eq!(lab.links(&b), ["lo"], "DEL took the interface out");
        ok("DEL", "ctr-b", Some(&b), "net1", &conf); // DEL is idempotent
        if version != "0.3.1" {
            let (code, _) = fails("CHECK", "ctr-b", Some(&b), "net1", &conf);
            assert_eq!(code, 3, "CHECK of a deleted attachment: container unknown");
        }
        if version == "1.1.0" {
            // Attachments outlive a daemon restart, wired and known.
            lab.restart_daemon();
            ok("CHECK", "ctr-a", Some(&a), "eth0", &conf);
            let ip_a = ra["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().to_string();
            let rb = ok("ADD", "ctr-b", Some(&b), "net1", &conf);
            assert!(ping(&b, &ip_a));
            ok("DEL", "ctr-b", Some(&b), "net1", &conf);
            let _ = rb;
        }
        ok("DEL", "ctr-a", Some(&a), "eth0", &conf);
        assert_eq!(lab.links(&a), ["lo"]);
        lab.np(&["network", "rm", &net]);
    }
    assert_eq!(lab.links(&lab.host_ns), host_links, "no link left on the host");
    assert_eq!(container_count(&lab), 0, "no attachment record left");
}

#[test]
fn version_status_and_errors_use_the_specs_codes() {
    let lab = Lab::new("cni-errors");
    let ns = lab.add_ns("c");
    let v = ok("VERSION", "", None, "", &json!({ "cniVersion": "1.1.0" }));
    let versions: Vec<&str> = v["supportedVersions"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
    for want in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        assert!(versions.contains(&want), "{want} in {versions:?}");
    }
    let good = conf(&lab, "1.1.0", "errs", "10.94.0.0/24");
    assert!(np_cni("STATUS", "", None, "", &good).ok);

    // No daemon on the socket: try again later (ADD), not available (STATUS).
    let down = with(&good, json!({ "socket": lab.dir.join("nobody.sock") }));
    assert_eq!(fails("ADD", "c1", Some(&ns), "eth0", &down).0, 11);
    assert_eq!(fails("DEL", "c1", Some(&ns), "eth0", &down).0, 11);
    assert_eq!(fails("STATUS", "", None, "", &down).0, 50);
    // Invalid config: a network that does not exist and no subnet to make it from; a bad
    // subnet; a gateway without subnet; an unknown version; a protocol netpath cannot publish.
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("subnet");
    assert_eq!(fails("ADD", "c1", Some(&ns), "eth0", &missing).0, 7);
    let bad = with(&good, json!({ "subnet": "10.94.0.0/33" }));
    assert_eq!(fails("ADD", "c1", Some(&ns), "eth0", &bad).0, 7);
    let bad = json!({ "cniVersion": "1.1.0", "name": "errs", "gateway": "10.94.0.1" });
    assert_eq!(fails("ADD", "c1", Some(&ns), "eth0", &bad).0, 7);
    assert_eq!(fails("ADD", "c1", Some(&ns), "eth0", &with(&good, json!({ "cniVersion": "9.9.9" }))).0, 1);
    let bad_ports = with(
        &good,
        json!({ "runtimeConfig": { "portMappings": [{"hostPort": 80, "containerPort": 80, "protocol": "sctp"}] } }),
    );
    assert_eq!(fails("ADD", "c1", Some(&ns), "eth0", &bad_ports).0, 7);
    // Bad environment: no such namespace, a bad container id.
    assert_eq!(fails("ADD", "c1", Some(Path::new("/nonexistent/ns")), "eth0", &good).0, 3);
    assert_eq!(fails("ADD", "bad id", Some(&ns), "eth0", &good).0, 4);
    // Nothing of it left a trace.
    assert_eq!(lab.links(&ns), ["lo"]);
    assert_eq!(container_count(&lab), 0, "no attachment record left");

    // The same key twice: the same namespace gets its result again, another one a conflict.
    let r1 = ok("ADD", "c1", Some(&ns), "eth0", &good);
    let r2 = ok("ADD", "c1", Some(&ns), "eth0", &good);
    assert_eq!(r1, r2);
    let other = lab.add_ns("other");
    let (code, msg) = fails("ADD", "c1", Some(&other), "eth0", &good);
    assert_eq!(code, 100, "{msg}");
    assert_eq!(lab.links(&other), ["lo"]);
    ok("DEL", "c1", Some(&ns), "eth0", &good);
}

#[test]
fn published_ports_several_interfaces_gc_and_a_vanished_namespace() {
    let lab = Lab::new("cni-ports");
    let host_links = lab.links(&lab.host_ns);
    let web = lab.add_ns("web");
    let net1 = json!({
        "cniVersion": "1.0.0", "name": "front", "type": "netpath-cni", "socket": lab.socket,
        "subnet": "10.95.0.0/24", "gateway": "10.95.0.254",
        "runtimeConfig": { "portMappings": [{"hostPort": 8080, "containerPort": 8, "protocol": "tcp"}] },
    });
    let net2 = conf(&lab, "1.0.0", "back", "10.96.0.0/24");
    let r = ok("ADD", "web", Some(&web), "eth0", &net1);
    assert_eq!(r["ips"][0]["gateway"], "10.95.0.254");
    let r2 = ok("ADD", "web", Some(&web), "eth1", &net2);
    assert_eq!(addr_of(&web, "eth1"), [r2["ips"][0]["address"].as_str().unwrap()]);

    // Its namespace has one DNS server for both interfaces: names on either network resolve.
    lab.np(&["run", "-d", "--name", "fpeer", "--network", "front", "--", "sleep", "600"]);
    lab.np(&["run", "-d", "--name", "bpeer", "--network", "back", "--", "sleep", "600"]);
    for (name, net) in [("fpeer", "front"), ("bpeer", "back")] {
        let out = must(in_ns(&web, "dig", &["+short", "+tries=1", "+timeout=5", "@127.0.0.11", name]));
        assert_eq!(out.trim(), lab.ip_of(name, net), "{name} from the namespace of two attachments");
    }
    lab.np(&["rm", "-f", "fpeer", "bpeer"]);

    // A server in the runtime's namespace, reached from outside through the published port.
    let mut srv = in_ns(&web, "socat", &["TCP-LISTEN:8,fork,reuseaddr", "SYSTEM:echo $SOCAT_PEERADDR"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if !must(in_ns(&web, "ss", &["-Hltn", "sport = :8"])).trim().is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(30));
    }
    let seen = must(in_ns(
        &lab.client_ns,
        "sh",
        &["-c", &format!("socat -t 10 - TCP:{HOST_ETH0_IP}:8080,connect-timeout=5 </dev/null")],
    ));
    assert_eq!(seen.trim(), CLIENT_IP, "published port, client address kept");

    // GC keeps what the runtime lists and removes the rest.
    let other = lab.add_ns("other");
    ok("ADD", "stale", Some(&other), "eth0", &net2);
    let gc = with(&net2, json!({ "cni.dev/valid-attachments": [{"containerID": "web", "ifname": "eth1"}] }));
    ok("GC", "", None, "", &with(&gc, json!({ "cniVersion": "1.1.0" })));
    assert_eq!(lab.links(&other), ["lo"], "GC removed the attachment nobody listed");
    assert_eq!(lab.links(&web), ["lo", "eth0", "eth1"], "listed and other networks' attachments stay");

    // The runtime deletes the namespace before DEL (a crashed pod): DEL still cleans up.
    netpath::netlink::netns::remove(&web).unwrap();
    let _ = srv.kill();
    let _ = srv.wait();
    ok("DEL", "web", Some(&web), "eth0", &net1);
    ok("DEL", "web", None, "eth1", &net2);
    assert_eq!(container_count(&lab), 0, "no attachment record left");
    lab.np(&["network", "rm", "front", "back"]);
    assert_eq!(lab.links(&lab.host_ns), host_links, "the host veths went");
    let refused = in_ns(
        &lab.client_ns,
        "sh",
        &["-c", &format!("socat -t 2 - TCP:{HOST_ETH0_IP}:8080,connect-timeout=2 </dev/null")],
    )
    .output()
    .unwrap();
    assert!(!refused.status.success(), "the published port closed with DEL");
}

#[test]
fn chained_with_the_reference_tuning_plugin() {
    let lab = Lab::new("cni-chain");
    let ns = lab.add_ns("pod");
    // A conflist as a runtime reads it (1.1 `cniVersions`): the runtime picks the newest
    // version that every plugin's VERSION lists (Debian's tuning stops at 1.0.0) and runs
    // each plugin in order, handing on the previous result.
    let conflist = json!({
        "cniVersion": "0.4.0",
        "cniVersions": ["0.4.0", "1.0.0", "1.1.0"],
        "name": "chain",
        "plugins": [
            { "type": "netpath-cni", "socket": lab.socket, "subnet": "10.97.0.0/24" },
            { "type": "tuning", "sysctl": { "net.ipv4.conf.eth0.arp_notify": "1" }, "mtu": 1400 },
        ],
    });
    let plugins = conflist["plugins"].as_array().unwrap();
    let path = |p: &Value| match p["type"].as_str().unwrap() {
        "netpath-cni" => cni_bin(),
        other => Path::new(REFERENCE_PLUGINS).join(other),
    };
    let supported: Vec<Vec<String>> = plugins
        .iter()
        .map(|p| {
            let r = exec_plugin(&path(p), "VERSION", "", None, "", &json!({ "cniVersion": "1.1.0" }));
            r.out["supportedVersions"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect()
        })
        .collect();
    let version = conflist["cniVersions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .rfind(|v| supported.iter().all(|s| s.iter().any(|x| x == v)))
        .expect("a version every plugin speaks");
    assert_eq!(version, "1.0.0");
    let plugin_conf = |p: &Value, prev: Option<&Value>| {
        let mut c = p.clone();
        c["cniVersion"] = json!(version);
        c["name"] = conflist["name"].clone();
        if let Some(prev) = prev {
            c["prevResult"] = prev.clone();
        }
        c
    };
    let mut prev: Option<Value> = None;
    for p in plugins {
        let r = exec_plugin(&path(p), "ADD", "pod1", Some(&ns), "eth0", &plugin_conf(p, prev.as_ref()));
        assert!(r.ok, "{} ADD: {}", p["type"], r.out);
        prev = Some(r.out);
    }
    let result = prev.unwrap();
    assert_result_shape(&result, version, "eth0", &ns);
    let sysctl = must(in_ns(&ns, "cat", &["/proc/sys/net/ipv4/conf/eth0/arp_notify"]));
    assert_eq!(sysctl.trim(), "1", "tuning ran on netpath's interface");
    assert!(must(in_ns(&ns, "ip", &["-o", "link", "show", "eth0"])).contains("mtu 1400"));
    // CHECK and DEL in the runtime's order (DEL in reverse).
    for p in plugins {
        let r = exec_plugin(&path(p), "CHECK", "pod1", Some(&ns), "eth0", &plugin_conf(p, Some(&result)));
        assert!(r.ok, "{} CHECK: {}", p["type"], r.out);
    }
    for p in plugins.iter().rev() {
        let r = exec_plugin(&path(p), "DEL", "pod1", Some(&ns), "eth0", &plugin_conf(p, Some(&result)));
        assert!(r.ok, "{} DEL: {}", p["type"], r.out);
    }
    assert_eq!(lab.links(&ns), ["lo"]);
}

#[test]
fn the_specs_example_conflist_with_netpath_as_its_interface_plugin() {
    let lab = Lab::new("cni-spec");
    let ns = lab.add_ns("db");
    // SPEC.md's example ("dbnet"), netpath-cni in the bridge plugin's place: its bridge and
    // ipam keys mean nothing to netpath and are ignored, as plugins ignore keys they do not
    // know; portmap is left out (netpath publishes ports itself, without iptables).
    let conflist = json!({
        "cniVersion": "1.0.0",
        "name": "dbnet",
        "plugins": [
            {
                "type": "netpath-cni",
                "socket": lab.socket,
                "subnet": "10.1.0.0/16",
                "gateway": "10.1.0.1",
                "bridge": "cni0",
                "keyA": ["some more", "plugin specific", "configuration"],
                "ipam": { "type": "host-local", "subnet": "10.1.0.0/16", "gateway": "10.1.0.1" },
                "dns": { "nameservers": ["10.1.0.1"] }
            },
            { "type": "tuning", "sysctl": { "net.core.somaxconn": "500" } }
        ]
    });
    let mut prev: Option<Value> = None;
    for p in conflist["plugins"].as_array().unwrap() {
        let mut c = p.clone();
        c["cniVersion"] = conflist["cniVersion"].clone();
        c["name"] = conflist["name"].clone();
        if let Some(prev) = &prev {
            c["prevResult"] = prev.clone();
        }
        let bin = if p["type"] == "netpath-cni" { cni_bin() } else { Path::new(REFERENCE_PLUGINS).join("tuning") };
        let r = exec_plugin(&bin, "ADD", "db1", Some(&ns), "eth0", &c);
        assert!(r.ok, "{}: {}", p["type"], r.out);
        prev = Some(r.out);
    }
    let r = prev.unwrap();
    assert_result_shape(&r, "1.0.0", "eth0", &ns);
    assert_eq!(r["ips"][0]["gateway"], "10.1.0.1");
    assert!(r["ips"][0]["address"].as_str().unwrap().starts_with("10.1."));
    assert_eq!(must(in_ns(&ns, "cat", &["/proc/sys/net/core/somaxconn"])).trim(), "500");
    let conf = with(&conflist["plugins"][0], json!({ "cniVersion": "1.0.0", "name": "dbnet" }));
    ok("DEL", "db1", Some(&ns), "eth0", &conf);
    assert_eq!(lab.links(&ns), ["lo"]);
}

#[test]
fn parallel_first_adds_share_the_network_they_all_create() {
    let lab = Lab::new("cni-parallel");
    let conf = conf(&lab, "1.1.0", "burst", "10.91.0.0/24");
    let nss: Vec<std::path::PathBuf> = (0..8).map(|i| lab.add_ns(&format!("p{i}"))).collect();
    let results: Vec<Value> = std::thread::scope(|s| {
        let hs: Vec<_> = nss
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                let conf = &conf;
                s.spawn(move || ok("ADD", &format!("pod{i}"), Some(ns), "eth0", conf))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ips: Vec<&str> = results.iter().map(|r| r["ips"][0]["address"].as_str().unwrap()).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 8, "eight distinct addresses: {ips:?}");
    assert_eq!(container_count(&lab), 8);
    let ip0 = results[0]["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap();
    assert!(ping(&nss[7], ip0), "pod7 reaches pod0");
    for (i, ns) in nss.iter().enumerate() {
        ok("DEL", &format!("pod{i}"), Some(ns), "eth0", &conf);
    }
    assert_eq!(container_count(&lab), 0);
}
