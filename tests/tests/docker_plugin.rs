//! Docker's remote network + IPAM driver API, driven over the plugin socket with the requests
//! dockerd sends, in its order; the test plays dockerd's part between them (moving the
//! interface into the sandbox, addressing it), then checks traffic and cleanup.

use std::path::Path;
use std::process::{Command, Stdio};

use netpath_tests::{CLIENT_IP, DaemonOpts, HOST_ETH0_IP, Lab, in_ns, must};
use serde_json::{Value, json};

const MEDIA: &str = "application/vnd.docker.plugins.v1.2+json";

/// One plugin call as dockerd makes it: POST /Method with a JSON body. Returns the HTTP
/// status and the JSON answer, and checks the answer's media type.
fn call(sock: &Path, method: &str, body: &Value) -> (u16, Value) {
    let out = must({
        let mut c = Command::new("curl");
        c.args(["-sS", "--unix-socket"])
            .arg(sock)
            .args(["-X", "POST", "-H", &format!("Content-Type: {MEDIA}"), "--data-binary", &body.to_string()])
            .args(["-w", "\n%{http_code} %{content_type}", &format!("http://plugin/{method}")])
            .stdin(Stdio::null());
        c
    });
    let (body, tail) = out.rsplit_once('\n').unwrap();
    let (code, ctype) = tail.split_once(' ').unwrap();
    assert_eq!(ctype, MEDIA, "{method}");
    (code.parse().unwrap(), serde_json::from_str(body).unwrap_or_else(|e| panic!("{method}: {e}: {body}")))
}

/// A call that must succeed (200, no `Err`).
fn ok(sock: &Path, method: &str, body: Value) -> Value {
    let (code, v) = call(sock, method, &body);
    assert_eq!(code, 200, "{method}: {v}");
    assert!(v.get("Err").is_none_or(|e| e.as_str() == Some("")), "{method}: {v}");
    v
}

/// A process parked in a namespace: `ip link set ... netns PID` moves links there, as
/// dockerd does with the sandbox's path.
fn parked(ns: &Path) -> std::process::Child {
    in_ns(ns, "sleep", &["600"]).spawn().unwrap()
}

/// What dockerd does after Join: move SrcName into the sandbox, name it DstPrefix+0, give it
/// the endpoint's address, bring it up, route by the gateway.
fn plumb(lab: &Lab, sandbox: &Path, pid: u32, join: &Value, addr: &str) {
    let src = join["InterfaceName"]["SrcName"].as_str().unwrap();
    let dst = format!("{}0", join["InterfaceName"]["DstPrefix"].as_str().unwrap());
    must(lab.host("ip", &["link", "set", src, "netns", &pid.to_string()]));
    must(in_ns(sandbox, "ip", &["link", "set", src, "name", &dst]));
    must(in_ns(sandbox, "ip", &["addr", "add", addr, "dev", &dst]));
    must(in_ns(sandbox, "ip", &["link", "set", &dst, "up"]));
    must(in_ns(sandbox, "ip", &["route", "add", "default", "via", join["Gateway"].as_str().unwrap()]));
}

/// What dockerd does on Leave: rename the interface back and move it to the host.
fn unplumb(lab: &Lab, sandbox: &Path, src: &str) {
    let pid = lab.daemon_pid().unwrap().to_string();
    must(in_ns(sandbox, "ip", &["link", "set", "eth0", "down"]));
    must(in_ns(sandbox, "ip", &["link", "set", "eth0", "name", src]));
    must(in_ns(sandbox, "ip", &["link", "set", src, "netns", &pid]));
}

#[test]
fn dockerd_creates_joins_publishes_leaves_and_deletes() {
    dockerd_lifecycle("docker", &[]);
}

#[test]
fn dockerd_endpoints_take_xdp_redirects() {
    // With XDP on the uplink, a published port of a Docker endpoint is served like a netpath
    // container's: uplink_xdp redirects its packets to the endpoint's veth (GRO went on at
    // Join, before dockerd moved the interface), and again after a restart (the interface is
    // found by index in the sandbox, where dockerd renamed it).
    dockerd_lifecycle("dockerxdp", &["--xdp", "native"]);
}

/// Create, join, publish, traffic, restart, leave, delete, as dockerd drives them, with the
/// daemon's flags `daemon_args` (`--xdp native`: the published port's packets must be XDP
/// redirects, before and after the restart).
fn dockerd_lifecycle(tag: &str, daemon_args: &[&str]) {
    let xdp = daemon_args.contains(&"native");
    let mut lab = Lab::without_daemon(tag);
    let sock = lab.dir.join("plugins/netpath.sock");
    let mut args: Vec<String> = daemon_args.iter().map(|a| a.to_string()).collect();
    args.extend(["--docker-plugin-socket".to_string(), sock.display().to_string()]);
    lab.start_daemon_with(&DaemonOpts { args: args.clone(), ..Default::default() });
    if xdp {
        // Frames off a wire carry full checksums; uplink_xdp leaves offloaded ones to TC.
        lab.client_sends_full_checksums();
    }
    let host_links = lab.links(&lab.host_ns);

    // Discovery and capabilities.
    let v = ok(&sock, "Plugin.Activate", json!(null));
    assert_eq!(v["Implements"], json!(["NetworkDriver", "IpamDriver"]));
    assert_eq!(ok(&sock, "NetworkDriver.GetCapabilities", json!(null))["Scope"], "local");
    ok(&sock, "IpamDriver.GetCapabilities", json!(null));
    let spaces = ok(&sock, "IpamDriver.GetDefaultAddressSpaces", json!(null));
    let space = spaces["LocalDefaultAddressSpace"].as_str().unwrap().to_string();
    let (code, v) = call(&sock, "NetworkDriver.NoSuchThing", &json!({}));
    assert_eq!(code, 404, "{v}");
    assert!(v["Err"].as_str().is_some_and(|e| !e.is_empty()));

    // docker network create -d netpath --ipam-driver netpath --subnet 10.98.0.0/24 n
    let pool = ok(
        &sock,
        "IpamDriver.RequestPool",
        json!({"AddressSpace": space, "Pool": "10.98.0.0/24", "SubPool": "", "Options": {}, "V6": false}),
    );
    let pool_id = pool["PoolID"].as_str().unwrap().to_string();
    let gw = ok(
        &sock,
        "IpamDriver.RequestAddress",
        json!({"PoolID": pool_id, "Address": "", "Options": {"RequestAddressType": "com.docker.network.gateway"}}),
    );
    let gw = gw["Address"].as_str().unwrap().to_string();
    assert_eq!(gw, "10.98.0.1/24");
    let nid = "4f1c9a2b7d3e".repeat(5) + "abcd";
    ok(
        &sock,
        "NetworkDriver.CreateNetwork",
        json!({"NetworkID": nid, "Options": {"com.docker.network.enable_ipv6": false, "com.docker.network.generic": {}},
               "IPv4Data": [{"AddressSpace": space, "Pool": "10.98.0.0/24", "Gateway": gw, "AuxAddresses": {}}],
               "IPv6Data": []}),
    );
    let net = format!("docker-{}", &nid[..12]);
    assert_eq!(lab.inspect_network(&net)["IPAM"]["Config"][0]["Gateway"], "10.98.0.1");

    // docker run --network n (twice): address, endpoint, join, plumbing, ports.
    let mut eps = vec![];
    for (i, name) in ["web", "cli"].into_iter().enumerate() {
        let sandbox = lab.add_ns(name);
        let park = parked(&sandbox);
        let addr = ok(&sock, "IpamDriver.RequestAddress", json!({"PoolID": pool_id, "Address": "", "Options": {}}));
        let addr = addr["Address"].as_str().unwrap().to_string();
        let eid = format!("{i}e0c1d2a3b4c5") + &"9".repeat(52);
        let v = ok(
            &sock,
            "NetworkDriver.CreateEndpoint",
            json!({"NetworkID": nid, "EndpointID": eid, "Options": {},
                   "Interface": {"Address": addr, "AddressIPv6": "", "MacAddress": ""}}),
        );
        assert!(v.get("Interface").is_none_or(|i| i.is_null() || i == &json!({})), "dockerd gave the address: {v}");
        ok(&sock, "NetworkDriver.EndpointOperInfo", json!({"NetworkID": nid, "EndpointID": eid}));
        let join = ok(
            &sock,
            "NetworkDriver.Join",
            json!({"NetworkID": nid, "EndpointID": eid, "SandboxKey": sandbox, "Options": {}}),
        );
        assert_eq!(join["Gateway"], "10.98.0.1");
        plumb(&lab, &sandbox, park.id(), &join, &addr);
        ok(
            &sock,
            "NetworkDriver.ProgramExternalConnectivity",
            json!({"NetworkID": nid, "EndpointID": eid, "Options": if name == "web" {
                json!({"com.docker.network.portmap": [{"Proto": 6, "IP": "", "Port": 8, "HostIP": "", "HostPort": 8080, "HostPortEnd": 8080}],
                       "com.docker.network.endpoint.exposedports": [{"Proto": 6, "Port": 8}]})
            } else { json!({}) }}),
        );
        eps.push((sandbox, park, addr, eid, join["InterfaceName"]["SrcName"].as_str().unwrap().to_string()));
    }
    // Joining an endpoint nobody created is refused with an Err.
    let (code, v) = call(
        &sock,
        "NetworkDriver.Join",
        &json!({"NetworkID": nid, "EndpointID": "nope", "SandboxKey": eps[0].0, "Options": {}}),
    );
    assert_ne!(code, 200);
    assert!(v["Err"].as_str().is_some_and(|e| e.contains("not found")), "{v}");

    // Traffic: container to container, and outside → published port → container.
    let (web, cli) = (&eps[0], &eps[1]);
    let web_ip = web.2.split('/').next().unwrap();
    assert!(in_ns(&cli.0, "ping", &["-c", "1", "-W", "2", web_ip]).stdout(Stdio::null()).status().unwrap().success());
    let mut srv = in_ns(&web.0, "socat", &["TCP-LISTEN:8,fork,reuseaddr", "SYSTEM:echo $SOCAT_PEERADDR"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if !must(in_ns(&web.0, "ss", &["-Hltn", "sport = :8"])).trim().is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(30));
    }
    let from_cli = must(in_ns(&cli.0, "sh", &["-c", &format!("socat -t 5 - TCP:{web_ip}:8 </dev/null")]));
    assert_eq!(from_cli.trim(), cli.2.split('/').next().unwrap());
    let client_ns = lab.client_ns.clone();
    let tcp = |ip: &str| {
        in_ns(&client_ns, "sh", &["-c", &format!("socat -t 5 - TCP:{ip}:8080,connect-timeout=3 </dev/null")])
            .output()
            .unwrap()
    };
    let redirects = lab.uplink_xdp_redirects();
    let out = tcp(HOST_ETH0_IP);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), CLIENT_IP, "published port, client address kept");
    assert_eq!(lab.uplink_xdp_redirects() > redirects, xdp, "XDP redirects to the endpoint");
    // The endpoints are containers to netpath: they survive a daemon restart.
    lab.stop_daemon();
    lab.start_daemon_with(&DaemonOpts { args, ..Default::default() });
    let redirects = lab.uplink_xdp_redirects();
    assert_eq!(String::from_utf8_lossy(&tcp(HOST_ETH0_IP).stdout).trim(), CLIENT_IP, "after a restart");
    assert_eq!(lab.uplink_xdp_redirects() > redirects, xdp, "XDP redirects to the endpoint after a restart");

    // docker stop / rm / network rm, in dockerd's order.
    for (sandbox, mut park, addr, eid, src) in eps {
        ok(&sock, "NetworkDriver.RevokeExternalConnectivity", json!({"NetworkID": nid, "EndpointID": eid}));
        ok(&sock, "NetworkDriver.Leave", json!({"NetworkID": nid, "EndpointID": eid}));
        unplumb(&lab, &sandbox, &src);
        ok(&sock, "NetworkDriver.DeleteEndpoint", json!({"NetworkID": nid, "EndpointID": eid}));
        ok(&sock, "IpamDriver.ReleaseAddress", json!({"PoolID": pool_id, "Address": addr}));
        assert_eq!(lab.links(&sandbox), ["lo"]);
        let _ = park.kill();
        let _ = park.wait();
    }
    assert!(!tcp(HOST_ETH0_IP).status.success(), "the published port closed");
    let _ = srv.kill();
    let _ = srv.wait();
    ok(&sock, "NetworkDriver.DeleteNetwork", json!({"NetworkID": nid}));
    ok(&sock, "IpamDriver.ReleaseAddress", json!({"PoolID": pool_id, "Address": gw}));
    ok(&sock, "IpamDriver.ReleasePool", json!({"PoolID": pool_id}));
    assert_eq!(lab.links(&lab.host_ns), host_links, "nothing left on the host");
    assert_eq!(lab.np(&["ps", "-a"]).lines().count(), 1, "no endpoint record left");
    assert!(lab.try_np(&["network", "inspect", &net]).status.code() != Some(0));
}
