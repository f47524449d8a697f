//! The none and host drivers, connecting/disconnecting containers to more networks, and
//! `netpath attach` of a namespace the daemon does not own.

mod common;

use common::*;
use netpath_tests::{HOST_ETH0_IP, Lab, in_ns, must};

#[test]
fn a_container_on_none_has_only_lo_and_no_address() {
    let lab = Lab::new("none");
    let host_links = lab.links(&lab.host_ns);
    lab.np(&["run", "-d", "--name", "iso", "--network", "none", "--", "sleep", "600"]);

    assert_eq!(container_links(&lab, "iso"), ["lo"]);
    let a = addrs(&lab.np(&["exec", "iso", "--", "ip", "-o", "-4", "addr"]));
    assert_eq!(a, ["127.0.0.1/8"], "only loopback is addressed");
    let routes = lab.np(&["exec", "iso", "--", "ip", "-4", "route"]);
    assert!(routes.trim().is_empty(), "no routes on none: {routes}");

    let v = lab.inspect("iso");
    let nets = v["NetworkSettings"]["Networks"].as_object().unwrap();
    assert_eq!(nets.keys().collect::<Vec<_>>(), ["none"], "{v}");
    assert_eq!(nets["none"]["IPAddress"].as_str().unwrap_or(""), "", "{v}");
    assert_eq!(v["State"]["Status"], "running");
    // Its own namespace, nothing added on the host side.
    assert_ne!(v["NetworkSettings"]["SandboxKey"].as_str().unwrap(), "");
    assert_eq!(lab.links(&lab.host_ns), host_links);
    assert_eq!(network_members(&lab, "none"), ["iso"]);

    lab.np(&["rm", "-f", "iso"]);
    assert!(network_members(&lab, "none").is_empty());
}

#[test]
fn a_container_on_host_shares_the_host_namespace() {
    let lab = Lab::new("host");
    let host_links = lab.links(&lab.host_ns);
    assert!(host_links.contains(&"eth0".to_string()) && host_links.contains(&"netpath0".to_string()));

    // A foreground command sees exactly the links of the daemon's (host) namespace.
    let out = lab.np(&["run", "--network", "host", "--name", "h", "--", "ip", "-o", "link"]);
    assert_eq!(link_names(&out), host_links, "{out}");

    lab.np(&["run", "-d", "--network", "host", "--name", "hd", "--", "sleep", "600"]);
    assert_eq!(container_addrs(&lab, "hd", "eth0"), [format!("{HOST_ETH0_IP}/24")]);
    let v = lab.inspect("hd");
    assert_eq!(v["NetworkSettings"]["Networks"].as_object().unwrap().keys().collect::<Vec<_>>(), ["host"]);
    assert_eq!(v["NetworkSettings"]["Networks"]["host"]["IPAddress"].as_str().unwrap_or(""), "");
    // No veth was made for either of them.
    assert_eq!(lab.links(&lab.host_ns), host_links);
    // It stays in the host's namespace, so it cannot leave the host network.
    let before = lab.np(&["inspect", "hd"]);
    let err = lab.np_fails(&["network", "disconnect", "host", "hd"]);
    assert!(err.contains("cannot be disconnected from the host network"), "{err}");
    assert_eq!(lab.np(&["inspect", "hd"]), before);
    // Removing a host container must not touch the host's links.
    lab.np(&["rm", "-f", "hd", "h"]);
    assert_eq!(lab.links(&lab.host_ns), host_links);
    assert!(must(lab.host("ip", &["-o", "-4", "addr", "show", "dev", "eth0"])).contains(HOST_ETH0_IP));
}

#[test]
fn connect_adds_eth1_that_carries_traffic_and_disconnect_removes_it() {
    let lab = Lab::new("connect");
    lab.np(&["network", "create", "--subnet", "10.91.1.0/24", "n1"]);
    lab.np(&["network", "create", "--subnet", "10.91.2.0/24", "n2"]);
    lab.np(&["run", "-d", "--name", "c", "--network", "n1", "--", "sleep", "600"]);
    whoami_server(&lab, "d", "n2");
    let d_ip = lab.ip_of("d", "n2");
    let host_links = lab.links(&lab.host_ns);
    assert_eq!(container_links(&lab, "c"), ["lo", "eth0"]);

    lab.np(&["network", "connect", "n2", "c"]);
    let c_n2 = lab.ip_of("c", "n2");
    assert!(c_n2.starts_with("10.91.2."), "{c_n2}");
    assert_ne!(c_n2, d_ip);
    assert_eq!(container_links(&lab, "c"), ["lo", "eth0", "eth1"]);
    assert_eq!(container_addrs(&lab, "c", "eth1"), [format!("{c_n2}/24")]);
    assert_eq!(container_addrs(&lab, "c", "eth0"), [format!("{}/24", lab.ip_of("c", "n1"))]);
    let v = lab.inspect("c");
    let nets = &v["NetworkSettings"]["Networks"];
    assert_eq!(nets.as_object().unwrap().len(), 2, "{v}");
    assert_eq!(nets["n1"]["Interface"], "eth0");
    assert_eq!(nets["n2"]["Interface"], "eth1");
    assert_eq!(network_members(&lab, "n2"), ["c", "d"]);
    // The default route stays on the first network.
    let routes = lab.np(&["exec", "c", "--", "ip", "-4", "route"]);
    assert!(routes.contains("default via 10.91.1.1 dev eth0"), "{routes}");

    // Traffic to d goes out of eth1, with c's address on n2 as its source.
    assert_eq!(whoami(&lab, "c", &d_ip), c_n2);
    assert!(counter(&lab, "c", "n2", "TxPackets") > 0);

    lab.np(&["network", "disconnect", "n2", "c"]);
    assert_eq!(container_links(&lab, "c"), ["lo", "eth0"]);
    assert_eq!(network_members(&lab, "n2"), ["d"]);
    let v = lab.inspect("c");
    assert_eq!(v["NetworkSettings"]["Networks"].as_object().unwrap().keys().collect::<Vec<_>>(), ["n1"], "{v}");
    assert_eq!(lab.links(&lab.host_ns), host_links, "the veth of eth1 is gone from the host");
    // Nothing of n2 is left inside c: no address, no route.
    let routes = lab.np(&["exec", "c", "--", "ip", "-4", "route"]);
    assert!(!routes.contains("10.91.2."), "{routes}");
    assert!(!lab.np(&["exec", "c", "--", "ip", "-o", "-4", "addr"]).contains("10.91.2."));

    // Connect again with a static address.
    lab.np(&["network", "connect", "--ip", "10.91.2.50", "n2", "c"]);
    assert_eq!(lab.ip_of("c", "n2"), "10.91.2.50");
    assert_eq!(container_addrs(&lab, "c", "eth1"), ["10.91.2.50/24"]);
    assert_eq!(whoami(&lab, "c", &d_ip), "10.91.2.50");

    // Connecting twice is an error that changes nothing.
    let before = lab.np(&["inspect", "c"]);
    let err = lab.np_fails(&["network", "connect", "n2", "c"]);
    assert!(err.contains("already connected"), "{err}");
    let err = lab.np_fails(&["network", "connect", "--ip", "10.91.2.60", "n2", "c"]);
    assert!(err.contains("already connected"), "{err}");
    assert_eq!(strip_counters(&lab.np(&["inspect", "c"])), strip_counters(&before));
    assert_eq!(container_links(&lab, "c"), ["lo", "eth0", "eth1"]);
}

/// Inspect output without the (moving) datapath counters.
fn strip_counters(inspect: &str) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_str(inspect).unwrap();
    for c in v.as_array_mut().unwrap() {
        for (_, n) in c["NetworkSettings"]["Networks"].as_object_mut().unwrap() {
            n.as_object_mut().unwrap().remove("Counters");
        }
    }
    v
}

#[test]
fn none_and_host_containers_cannot_be_connected() {
    let lab = Lab::new("connrefuse");
    lab.np(&["network", "create", "--subnet", "10.94.0.0/24", "n"]);
    lab.np(&["run", "-d", "--name", "iso", "--network", "none", "--", "sleep", "600"]);
    lab.np(&["run", "-d", "--name", "hc", "--network", "host", "--", "sleep", "600"]);
    lab.np(&["run", "-d", "--name", "b", "--network", "n", "--", "sleep", "600"]);
    let host_links = lab.links(&lab.host_ns);
    let before = (strip_counters(&lab.np(&["inspect", "iso", "hc", "b"])), lab.np(&["network", "inspect", "n"]));

    for c in ["iso", "hc"] {
        let err = lab.np_fails(&["network", "connect", "n", c]);
        assert!(err.contains("cannot join other networks"), "{c}: {err}");
    }
    for net in ["none", "host"] {
        let err = lab.np_fails(&["network", "connect", net, "b"]);
        assert!(err.contains(&format!("cannot be connected to the {net} network")), "{net}: {err}");
    }
    assert_eq!(container_links(&lab, "iso"), ["lo"]);
    assert_eq!(container_links(&lab, "b"), ["lo", "eth0"]);
    assert_eq!(lab.links(&lab.host_ns), host_links);
    let after = (strip_counters(&lab.np(&["inspect", "iso", "hc", "b"])), lab.np(&["network", "inspect", "n"]));
    assert_eq!(after, before);
}

#[test]
fn attach_wires_a_foreign_namespace_and_rm_leaves_the_namespace() {
    let lab = Lab::new("attach");
    lab.np(&["network", "create", "--subnet", "10.92.0.0/24", "n"]);
    echo_server(&lab, "srv", "n");
    let ext = lab.add_ns("ext");
    let host_links = lab.links(&lab.host_ns);
    assert_eq!(lab.links(&ext), ["lo"]);

    lab.np(&["attach", "--netns", ext.to_str().unwrap(), "--name", "x", "--network", "n"]);
    let ip = lab.ip_of("x", "n");
    assert!(ip.starts_with("10.92.0."), "{ip}");
    assert_eq!(lab.links(&ext), ["lo", "eth0"]);
    let a = addrs(&must(in_ns(&ext, "ip", &["-o", "-4", "addr", "show", "dev", "eth0"])));
    assert_eq!(a, [format!("{ip}/24")]);
    let v = lab.inspect("x");
    assert_eq!(
        std::path::Path::new(v["NetworkSettings"]["SandboxKey"].as_str().unwrap()),
        std::fs::canonicalize(&ext).unwrap()
    );
    assert_eq!(v["NetworkSettings"]["Networks"]["n"]["MacAddress"].as_str().unwrap(), {
        let o: Vec<u8> = ip.split('.').map(|x| x.parse().unwrap()).collect();
        format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
    });
    assert!(network_members(&lab, "n").contains(&"x".to_string()));
    // The attached namespace talks to a container on the network.
    assert_eq!(echo_from_ns(&ext, &lab.ip_of("srv", "n"), "from-ext"), "from-ext");
    // exec works on an attached container too.
    assert_eq!(container_links(&lab, "x"), ["lo", "eth0"]);

    lab.np(&["rm", "x"]);
    assert_eq!(lab.links(&ext), ["lo"], "eth0 removed from the attached namespace");
    assert!(ext.exists(), "the namespace file is not the daemon's to remove");
    assert!(netpath::netlink::netns::is_mounted(&ext), "{} is still a namespace", ext.display());
    assert_eq!(lab.links(&lab.host_ns), host_links);
    assert!(!network_members(&lab, "n").contains(&"x".to_string()));
    assert!(!lab.np(&["ps", "-a"]).contains(" x "));
}
