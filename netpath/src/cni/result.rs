//! ADD's result in the version the config names. 0.3.x and 0.4.0 results tag each IP with
//! `"version": "4"`; 1.0.0 dropped that field (a 1.0.0 runtime rejects it). 1.1.0 results
//! read like 1.0.0 ones.

use serde_json::{Value, json};

use super::{CniError, code, ver};
use crate::api::attach::Attachment;

/// Our interfaces, IP, default route and DNS, appended to `prev` (a chain's earlier result)
/// if there is one.
pub fn build(version: &str, a: &Attachment, prev: Option<&Value>) -> Result<Value, CniError> {
    let mut interfaces: Vec<Value> = vec![];
    let mut ips: Vec<Value> = vec![];
    let mut routes: Vec<Value> = vec![];
    let mut dns = Value::Null;
    if let Some(p) = prev {
        if !p.is_object() {
            return Err(CniError {
                code: code::DECODE,
                msg: "prevResult is not an object".into(),
                details: String::new(),
            });
        }
        interfaces = p["interfaces"].as_array().cloned().unwrap_or_default();
        ips = p["ips"].as_array().cloned().unwrap_or_default();
        routes = p["routes"].as_array().cloned().unwrap_or_default();
        dns = p["dns"].clone();
    }
    interfaces.push(json!({ "name": a.bridge, "mac": a.bridge_mac }));
    interfaces.push(json!({ "name": a.key.ifname, "mac": a.mac, "sandbox": a.netns }));
    let mut ip = json!({
        "address": format!("{}/{}", a.ip, a.prefix),
        "gateway": a.gateway,
        "interface": interfaces.len() - 1,
    });
    if ver(version) < (1, 0, 0) {
        ip["version"] = json!("4");
    }
    ips.push(ip);
    routes.push(json!({ "dst": "0.0.0.0/0", "gw": a.gateway }));
    let mut out = json!({ "cniVersion": version, "interfaces": interfaces, "ips": ips, "routes": routes });
    if dns.is_null() || dns.as_object().is_some_and(|o| o.is_empty()) {
        let mut d = serde_json::Map::new();
        if !a.nameservers.is_empty() {
            d.insert("nameservers".into(), json!(a.nameservers));
        }
        if !a.search.is_empty() {
            d.insert("search".into(), json!(a.search));
        }
        if !a.options.is_empty() {
            d.insert("options".into(), json!(a.options));
        }
        dns = Value::Object(d);
    }
    out["dns"] = dns;
    Ok(out)
}
