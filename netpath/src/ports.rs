//! Published ports: parsing `-p`/`--expose` the way Docker does, and the bindings they become.

use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => netpath_common::proto::TCP,
            Proto::Udp => netpath_common::proto::UDP,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// One published port, resolved: host address (None = every address), host port, container port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub container_port: u16,
    pub proto: Proto,
}

impl Binding {
    /// Two bindings clash when they share port and protocol and their addresses overlap
    /// (equal, or either one is every address).
    pub fn clashes(&self, other: &Binding) -> bool {
        self.host_port == other.host_port
            && self.proto == other.proto
            && (self.host_ip.is_none() || other.host_ip.is_none() || self.host_ip == other.host_ip)
    }
}

impl fmt::Display for Binding {
    /// Like `docker port`: `80/tcp -> 0.0.0.0:8080`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ip = self.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED);
        write!(f, "{}/{} -> {}:{}", self.container_port, self.proto.as_str(), ip, self.host_port)
    }
}

/// Ports a container says it serves (`--expose`, Docker's `ExposedPorts`), a range per flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exposed {
    pub from: u16,
    pub to: u16,
    pub proto: Proto,
}

impl Exposed {
    pub fn covers(&self, port: u16, proto: Proto) -> bool {
        self.proto == proto && (self.from..=self.to).contains(&port)
    }
}

impl fmt::Display for Exposed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.from == self.to {
            write!(f, "{}/{}", self.from, self.proto.as_str())
        } else {
            write!(f, "{}-{}/{}", self.from, self.to, self.proto.as_str())
        }
    }
}

/// A `-p` request before host ports are picked: `host_ports` None means "any free ones".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub host_ip: Option<Ipv4Addr>,
    pub host_ports: Option<(u16, u16)>,
    pub container_ports: (u16, u16),
    pub proto: Proto,
}

fn parse_port(s: &str, what: &str, spec: &str) -> Result<u16> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(bad_request!("invalid {what} {s:?} in {spec:?}: expected a port number 1-65535")),
    }
}

fn parse_range(s: &str, what: &str, spec: &str) -> Result<(u16, u16)> {
    match s.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (parse_port(a, what, spec)?, parse_port(b, what, spec)?);
            if a > b {
                return Err(bad_request!("invalid {what} range {s:?} in {spec:?}: start is above end"));
            }
            Ok((a, b))
        }
        None => {
            let p = parse_port(s, what, spec)?;
            Ok((p, p))
        }
    }
}

fn split_proto(spec: &str) -> Result<(&str, Proto)> {
    match spec.rsplit_once('/') {
        Some((rest, "tcp")) => Ok((rest, Proto::Tcp)),
        Some((rest, "udp")) => Ok((rest, Proto::Udp)),
        Some((_, p)) => Err(bad_request!("invalid protocol {p:?} in {spec:?}: use tcp or udp")),
        None => Ok((spec, Proto::Tcp)),
    }
}

/// Parses `[HOSTIP:][HOSTPORT[-END]:]CONTAINERPORT[-END][/tcp|/udp]`, as `docker run -p`.
pub fn parse_publish(spec: &str) -> Result<Publish> {
    let (rest, proto) = split_proto(spec)?;
    let parts: Vec<&str> = rest.split(':').collect();
    let (ip, host, ctr) = match parts.as_slice() {
        [c] => (None, None, *c),
        [h, c] => (None, Some(*h), *c),
        [ip, h, c] => (Some(*ip), Some(*h), *c),
        _ => {
            return Err(bad_request!("invalid port spec {spec:?}: expected [HOSTIP:][HOSTPORT:]CONTAINERPORT[/PROTO]"));
        }
    };
    let host_ip = match ip {
        None | Some("") | Some("0.0.0.0") => None,
        Some(s) => Some(
            s.parse::<Ipv4Addr>().map_err(|_| bad_request!("invalid host address {s:?} in {spec:?}: expected IPv4"))?,
        ),
    };
    let container_ports = parse_range(ctr, "container port", spec)?;
    let host_ports = match host {
        None | Some("") => None,
        Some(h) => {
            let r = parse_range(h, "host port", spec)?;
            if r.1 - r.0 != container_ports.1 - container_ports.0 {
                return Err(bad_request!(
                    "invalid port spec {spec:?}: host range {}-{} and container range {}-{} differ in size",
                    r.0,
                    r.1,
                    container_ports.0,
                    container_ports.1
                ));
            }
            Some(r)
        }
    };
    Ok(Publish { host_ip, host_ports, container_ports, proto })
}

/// Parses `--expose PORT[-END][/PROTO]`.
pub fn parse_expose(spec: &str) -> Result<Publish> {
    let (rest, proto) = split_proto(spec)?;
    Ok(Publish { host_ip: None, host_ports: None, container_ports: parse_range(rest, "port", spec)?, proto })
}

/// Host ports handed out when none is given (`-p 80`, `-P`): Docker's default range.
pub const EPHEMERAL: std::ops::RangeInclusive<u16> = 49153..=65535;

/// Turns requests into bindings, picking free ephemeral host ports where none was given and
/// refusing any clash with `taken` (other containers' bindings) or within the request.
pub fn resolve(reqs: &[Publish], taken: &[Binding]) -> Result<Vec<Binding>> {
    let mut out: Vec<Binding> = vec![];
    for r in reqs {
        for (i, cport) in (r.container_ports.0..=r.container_ports.1).enumerate() {
            let b = match r.host_ports {
                Some((h, _)) => {
                    Binding { host_ip: r.host_ip, host_port: h + i as u16, container_port: cport, proto: r.proto }
                }
                None => {
                    let free = EPHEMERAL.clone().find(|p| {
                        let cand = Binding { host_ip: r.host_ip, host_port: *p, container_port: cport, proto: r.proto };
                        !taken.iter().chain(out.iter()).any(|t| t.clashes(&cand))
                    });
                    let p = free
                        .ok_or_else(|| crate::conflict!("no free host port left for {cport}/{}", r.proto.as_str()))?;
                    Binding { host_ip: r.host_ip, host_port: p, container_port: cport, proto: r.proto }
                }
            };
            if let Some(t) = taken.iter().chain(out.iter()).find(|t| t.clashes(&b)) {
                return Err(crate::conflict!(
                    "host port {}:{}/{} is already allocated ({t})",
                    b.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
                    b.host_port,
                    b.proto.as_str()
                ));
            }
            out.push(b);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    fn p(s: &str) -> Publish {
        parse_publish(s).unwrap()
    }

    #[test]
    fn docker_forms_parse() {
        assert_eq!(p("80"), Publish { host_ip: None, host_ports: None, container_ports: (80, 80), proto: Proto::Tcp });
        assert_eq!(p("8080:80").host_ports, Some((8080, 8080)));
        assert_eq!(p("8080:80/udp").proto, Proto::Udp);
        let q = p("127.0.0.1:8080:80/tcp");
        assert_eq!((q.host_ip, q.host_ports), (Some(Ipv4Addr::LOCALHOST), Some((8080, 8080))));
        assert_eq!(p("127.0.0.1::80").host_ports, None);
        assert_eq!(p("0.0.0.0:8080:80").host_ip, None);
        let r = p("8000-8010:80-90");
        assert_eq!((r.host_ports, r.container_ports), (Some((8000, 8010)), (80, 90)));
    }

    #[test]
    fn bad_specs_are_clear_errors() {
        for bad in ["", "x", "0", "65536", "80/sctp", "1:2:3:4", "8000-8010:80", "90-80", "nope:8080:80", ":80:80:80"] {
            match parse_publish(bad) {
                Err(Error::BadRequest(m)) => assert!(m.contains(bad) || bad.is_empty(), "{bad}: {m}"),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn resolve_ranges_ephemeral_and_clashes() {
        let got = resolve(&[p("8000-8002:80-82")], &[]).unwrap();
        assert_eq!(
            got.iter().map(|b| (b.host_port, b.container_port)).collect::<Vec<_>>(),
            vec![(8000, 80), (8001, 81), (8002, 82)]
        );

        let taken = resolve(&[p("8080:80")], &[]).unwrap();
        let e = resolve(&[p("8080:81")], &taken).unwrap_err();
        assert!(matches!(e, Error::Conflict(_)), "{e}");
        // Same port on UDP, or on another specific address vs a specific one, is fine...
        assert!(resolve(&[p("8080:80/udp")], &taken).is_ok());
        let local = resolve(&[p("127.0.0.1:9000:80")], &[]).unwrap();
        assert!(resolve(&[p("127.0.0.2:9000:80")], &local).is_ok());
        // ...but every-address clashes with any specific address.
        assert!(resolve(&[p("9000:80")], &local).is_err());
        // Within one request too.
        assert!(resolve(&[p("7000:80"), p("7000:81")], &[]).is_err());

        let eph = resolve(&[p("80"), p("81")], &taken).unwrap();
        assert_eq!(eph[0].host_port, 49153);
        assert_eq!(eph[1].host_port, 49154);
    }

    #[test]
    fn display_matches_docker_port() {
        let b = resolve(&[p("8080:80")], &[]).unwrap()[0];
        assert_eq!(b.to_string(), "80/tcp -> 0.0.0.0:8080");
    }
}
