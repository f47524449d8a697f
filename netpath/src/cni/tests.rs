use super::*;

fn attachment() -> Attachment {
    Attachment {
        key: AttachKey { network: "n".into(), container_id: "c1".into(), ifname: "eth0".into() },
        name: "attach-x".into(),
        netns: "/run/netns/c1".into(),
        mac: "02:42:0a:58:00:02".into(),
        bridge: "np-n".into(),
        bridge_mac: "02:42:0a:58:00:01".into(),
        host_ifname: "veth1".into(),
        ip: "10.88.0.2".into(),
        prefix: 24,
        gateway: "10.88.0.1".into(),
        nameservers: vec!["127.0.0.11".into()],
        search: vec![],
        options: vec!["ndots:0".into()],
    }
}

#[test]
fn results_take_the_shape_of_the_configs_version() {
    for v in SUPPORTED_VERSIONS {
        let r = result::build(v, &attachment(), None).unwrap();
        assert_eq!(r["cniVersion"], v);
        let ip = &r["ips"][0];
        assert_eq!(ip["address"], "10.88.0.2/24");
        assert_eq!(ip["interface"], 1, "the container's interface, after the bridge");
        assert_eq!(r["interfaces"][1]["sandbox"], "/run/netns/c1");
        assert_eq!(r["interfaces"][1]["mac"], "02:42:0a:58:00:02");
        assert_eq!(r["routes"][0]["dst"], "0.0.0.0/0");
        assert_eq!(r["dns"]["nameservers"][0], "127.0.0.11");
        assert_eq!(ip.get("version").is_some(), ver(v) < (1, 0, 0), "{v}: {ip}");
    }
}

#[test]
fn a_chained_result_is_extended_not_replaced() {
    let prev = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "x0", "mac": "00:11:22:33:44:55"}],
        "ips": [{"address": "192.0.2.2/24", "interface": 0}], "dns": {"nameservers": ["192.0.2.53"]}});
    let r = result::build("1.0.0", &attachment(), Some(&prev)).unwrap();
    assert_eq!(r["interfaces"].as_array().unwrap().len(), 3);
    assert_eq!(r["ips"][1]["interface"], 2);
    assert_eq!(r["dns"]["nameservers"][0], "192.0.2.53", "the earlier plugin's DNS stays");
}

#[test]
fn bad_configs_get_the_specs_codes() {
    let e = parse_conf(b"{not json").unwrap_err();
    assert_eq!(e.code, code::DECODE);
    let e = parse_conf(br#"{"cniVersion":"0.2.0","name":"n","type":"netpath-cni"}"#).unwrap_err();
    assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
    let e = parse_conf(br#"{"cniVersion":"1.0.0","name":"n","gateway":"10.0.0.1"}"#).unwrap_err();
    assert_eq!(e.code, code::INVALID_CONFIG);
    let c = parse_conf(br#"{"cniVersion":"1.1.0","name":"n","type":"netpath-cni","extra":1}"#).unwrap();
    assert_eq!(c.network(), "n");
}

#[test]
fn env_is_checked_before_anything_is_asked() {
    let env = Env { command: "ADD".into(), container_id: Some("bad id".into()), ..Default::default() };
    assert_eq!(env.container_id().unwrap_err().code, code::INVALID_ENV);
    let env = Env { command: "ADD".into(), ifname: Some("much-too-long-name0".into()), ..Default::default() };
    assert_eq!(env.ifname().unwrap_err().code, code::INVALID_ENV);
    let env = Env { args: Some("IgnoreUnknown=1;IP=10.1.2.3".into()), ..Default::default() };
    assert_eq!(env.requested_ip().as_deref(), Some("10.1.2.3"));
}

#[test]
fn a_newer_daemons_extra_answer_fields_do_not_break_the_plugin() {
    let mut v = serde_json::to_value(attachment()).unwrap();
    v["something_new"] = json!(1);
    let a: Attachment = serde_json::from_value(v).unwrap();
    assert_eq!(a.key.ifname, "eth0");
}
