//! The IPAM driver: pools (a requested subnet, or the next free default one) and the
//! addresses handed out of them.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Answer, bad};
use crate::error::Error;

pub const LOCAL_SPACE: &str = "netpath-local";
pub const GLOBAL_SPACE: &str = "netpath-global";
/// What dockerd puts in RequestAddress's options when it asks for a gateway.
const GATEWAY_REQUEST: &str = "com.docker.network.gateway";

#[derive(Debug, Serialize, Deserialize)]
struct Pool {
    subnet: Ipv4Net,
    used: BTreeSet<Ipv4Addr>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Pools {
    by_id: HashMap<String, Pool>,
}

fn field<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or("")
}

impl Pools {
    /// RequestPool: the pool named, if it is free, or the next free default pool.
    pub fn request_pool(&mut self, req: &Value, in_use: &[Ipv4Net]) -> Result<Value, Answer> {
        if req["V6"].as_bool() == Some(true) {
            return Err(bad("netpath's IPAM is IPv4 only".into()));
        }
        if !field(req, "SubPool").is_empty() {
            return Err(bad("sub-pools (--ip-range) are not supported by netpath's IPAM".into()));
        }
        let mut taken: Vec<Ipv4Net> = in_use.to_vec();
        taken.extend(self.by_id.values().map(|p| p.subnet));
        let subnet = match field(req, "Pool") {
            "" => crate::ipam::next_free_subnet(&taken).ok_or_else(|| bad("no free address pool left".into()))?,
            s => {
                let net = crate::ipam::parse_subnet(s).map_err(Answer::from)?;
                if self.by_id.values().any(|p| crate::ipam::overlaps(p.subnet, net)) {
                    return Err(Error::Conflict(format!("pool {net} overlaps another pool")).into());
                }
                net
            }
        };
        let id = format!("{LOCAL_SPACE}/{subnet}");
        self.by_id.insert(id.clone(), Pool { subnet, used: BTreeSet::new() });
        Ok(json!({ "PoolID": id, "Pool": subnet.to_string(), "Data": {} }))
    }

    pub fn release_pool(&mut self, req: &Value) -> Result<Value, Answer> {
        self.by_id.remove(field(req, "PoolID"));
        Ok(json!({}))
    }

    /// RequestAddress: the address asked for if free, the gateway (first host) when dockerd
    /// asks for one, else the next free host address.
    pub fn request_address(&mut self, req: &Value) -> Result<Value, Answer> {
        let id = field(req, "PoolID");
        let pool =
            self.by_id.get_mut(id).ok_or_else(|| Answer::from(Error::NotFound(format!("pool {id} not found"))))?;
        let gateway = req["Options"]["RequestAddressType"].as_str() == Some(GATEWAY_REQUEST);
        let ip = match field(req, "Address") {
            "" => {
                let mut hosts = pool.subnet.hosts();
                let first = if gateway { hosts.next().filter(|h| !pool.used.contains(h)) } else { None };
                first
                    .or_else(|| hosts.find(|h| !pool.used.contains(h)))
                    .ok_or_else(|| Answer::from(Error::Conflict(format!("pool {} is full", pool.subnet))))?
            }
            s => {
                let ip: Ipv4Addr =
                    s.split('/').next().unwrap_or("").parse().map_err(|_| bad(format!("invalid address {s:?}")))?;
                if !pool.subnet.contains(&ip) || ip == pool.subnet.network() || ip == pool.subnet.broadcast() {
                    return Err(bad(format!("{ip} is not a host address of {}", pool.subnet)));
                }
                if pool.used.contains(&ip) {
                    return Err(Error::Conflict(format!("{ip} is in use")).into());
                }
                ip
            }
        };
        pool.used.insert(ip);
        Ok(json!({ "Address": format!("{ip}/{}", pool.subnet.prefix_len()), "Data": {} }))
    }

    pub fn release_address(&mut self, req: &Value) -> Result<Value, Answer> {
        if let Some(p) = self.by_id.get_mut(field(req, "PoolID"))
            && let Ok(ip) = field(req, "Address").split('/').next().unwrap_or("").parse::<Ipv4Addr>()
        {
            p.used.remove(&ip);
        }
        Ok(json!({}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_and_addresses_as_dockerd_asks_for_them() {
        let mut p = Pools::default();
        let taken: Vec<Ipv4Net> = vec!["172.17.0.0/16".parse().unwrap()];
        let r = p.request_pool(&json!({"AddressSpace": LOCAL_SPACE, "Pool": "", "V6": false}), &taken).unwrap();
        assert_eq!(r["Pool"], "172.18.0.0/16");
        let id = r["PoolID"].as_str().unwrap().to_string();
        let gw = p.request_address(&json!({"PoolID": id, "Options": {"RequestAddressType": GATEWAY_REQUEST}})).unwrap();
        assert_eq!(gw["Address"], "172.18.0.1/16");
        let a = p.request_address(&json!({"PoolID": id})).unwrap();
        assert_eq!(a["Address"], "172.18.0.2/16");
        assert!(p.request_address(&json!({"PoolID": id, "Address": "172.18.0.2"})).is_err(), "in use");
        assert!(p.request_address(&json!({"PoolID": id, "Address": "10.0.0.1"})).is_err(), "outside");
        p.release_address(&json!({"PoolID": id, "Address": "172.18.0.2/16"})).unwrap();
        assert_eq!(
            p.request_address(&json!({"PoolID": id, "Address": "172.18.0.2"})).unwrap()["Address"],
            "172.18.0.2/16"
        );
        let r = p.request_pool(&json!({"Pool": ""}), &taken).unwrap();
        assert_eq!(r["Pool"], "172.19.0.0/16", "the next pool keeps clear of the first");
        assert!(p.request_pool(&json!({"Pool": "172.18.1.0/24"}), &taken).is_err(), "overlap");
        assert!(p.request_pool(&json!({"V6": true}), &taken).is_err());
        p.release_pool(&json!({"PoolID": id})).unwrap();
        assert!(p.request_address(&json!({"PoolID": id})).is_err(), "released");
    }
}
