//! One DNS request in, one decision out: answer it from the name table, forward it, or drop
//! it. Pure functions over bytes (parsing and encoding by hickory-proto), so every malformed
//! input can be tested without sockets.

use std::net::Ipv4Addr;

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, PTR};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

/// What the resolver knows, as the asking container sees it.
pub trait Names {
    /// Addresses of `qname` (lowercase, no trailing dot), `None` when it is no container's.
    fn resolve(&self, qname: &str) -> Option<Vec<Ipv4Addr>>;
    /// `name.network` of a container address.
    fn reverse(&self, ip: Ipv4Addr) -> Option<String>;
}

/// The UDP payload every DNS client accepts (RFC 1035).
pub const MIN_UDP: usize = 512;
/// The largest UDP answer we send, whatever a client advertises (the DNS flag day 2020 value:
/// no IP fragmentation on common paths).
pub const MAX_UDP: usize = 1232;

#[derive(Debug)]
pub enum Outcome {
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// Not ours: ask upstream.
    Forward(Forward),
    /// Not worth an answer (a response, or too short to carry an ID to answer to).
    Drop,
}

/// A query to forward, with what is needed to answer the client whatever upstream does.
#[derive(Debug, Clone)]
pub struct Forward {
    /// The client's message as it sent it.
    pub query: Vec<u8>,
    /// The client's parsed message (for SERVFAIL and truncated answers).
    request: Message,
    /// The largest answer the client takes over this transport.
    pub limit: usize,
}

/// The UDP answer size a request allows: 512 without EDNS, its advertised size (capped) with.
fn udp_limit(req: &Message) -> usize {
    req.edns.as_ref().map_or(MIN_UDP, |e| (e.max_payload() as usize).clamp(MIN_UDP, MAX_UDP))
}

/// A response to `req` with its ID, opcode, RD and question, no records yet.
fn response_to(req: &Message, code: ResponseCode) -> Message {
    let mut m = Message::error_msg(req.metadata.id, req.metadata.op_code, code);
    m.metadata.recursion_desired = req.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.checking_disabled = req.metadata.checking_disabled;
    m.add_queries(req.queries.iter().cloned());
    if req.edns.is_some() {
        let mut e = Edns::new();
        e.set_max_payload(MAX_UDP as u16);
        m.set_edns(e);
    }
    m
}

/// Encodes `m`; if it exceeds `limit`, sends the header and question only, with TC set, so
/// the client asks again over TCP.
fn encode(m: &Message, limit: usize) -> Option<Vec<u8>> {
    let b = m.to_vec().ok()?;
    if b.len() <= limit {
        return Some(b);
    }
    m.truncate().to_vec().ok()
}

/// An error answer from the header alone (the rest did not parse).
fn header_error(h: &Header, code: ResponseCode) -> Option<Vec<u8>> {
    let mut m = Message::error_msg(h.metadata.id, h.metadata.op_code, code);
    m.metadata.recursion_desired = h.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.to_vec().ok()
}

/// Decides what to do with one request. `tcp`: it came over TCP (no UDP size limit);
/// `rotate`: how far to rotate a multi-address answer (a counter, per query); `ttl` of our
/// records. Never panics, whatever the bytes.
pub fn handle(bytes: &[u8], tcp: bool, names: &dyn Names, rotate: usize, ttl: u32) -> Outcome {
    let Ok(header) = Header::read(&mut BinDecoder::new(bytes)) else {
        return Outcome::Drop;
    };
    if header.metadata.message_type != MessageType::Query {
        // Answering responses could make two resolvers bounce packets forever.
        return Outcome::Drop;
    }
    let reply = |code| header_error(&header, code).map_or(Outcome::Drop, Outcome::Reply);
    if header.metadata.op_code != OpCode::Query {
        return reply(ResponseCode::NotImp);
    }
    // One question, as every resolver sends; a query carries no answers (RFC 9619).
    if header.counts.queries != 1 || header.counts.answers != 0 {
        return reply(ResponseCode::FormErr);
    }
    let req = match Message::from_vec(bytes) {
        Ok(m) => m,
        Err(_) => return reply(ResponseCode::FormErr),
    };
    let limit = if tcp { u16::MAX as usize } else { udp_limit(&req) };
    let q = &req.queries[0];
    if q.query_class() != DNSClass::IN {
        return Outcome::Reply(encode(&response_to(&req, ResponseCode::NotImp), limit).unwrap_or_default());
    }
    match answer(&req, q, names, rotate, ttl) {
        Some(m) => encode(&m, limit).map_or(Outcome::Drop, Outcome::Reply),
        None => Outcome::Forward(Forward { query: bytes.to_vec(), request: req, limit }),
    }
}

/// Our answer to `q`, or `None` when the name is not ours to answer.
fn answer(req: &Message, q: &Query, names: &dyn Names, rotate: usize, ttl: u32) -> Option<Message> {
    let qname = q.name().to_ascii().to_ascii_lowercase();
    let qname = qname.strip_suffix('.').unwrap_or(&qname);
    if q.query_type() == RecordType::PTR {
        let ip = reverse_v4(qname)?;
        let target = names.reverse(ip)?;
        let mut m = response_to(req, ResponseCode::NoError);
        m.metadata.authoritative = true;
        let target = Name::from_ascii(format!("{target}.")).ok()?;
        m.add_answer(Record::from_rdata(q.name().clone(), ttl, RData::PTR(PTR(target))));
        return Some(m);
    }
    let mut addrs = names.resolve(qname)?;
    let mut m = response_to(req, ResponseCode::NoError);
    m.metadata.authoritative = true;
    // Other types (AAAA until IPv6, MX, TXT, ...) of a container name: the name exists, with
    // no such records (NOERROR, no answers), so clients fall back to the A records.
    if matches!(q.query_type(), RecordType::A | RecordType::ANY) && !addrs.is_empty() {
        let n = addrs.len();
        addrs.rotate_left(rotate % n);
        for ip in addrs {
            m.add_answer(Record::from_rdata(q.name().clone(), ttl, RData::A(A(ip))));
        }
    }
    Some(m)
}

/// The address of a `d.c.b.a.in-addr.arpa` name.
fn reverse_v4(qname: &str) -> Option<Ipv4Addr> {
    let rest = qname.strip_suffix(".in-addr.arpa")?;
    let mut o = [0u8; 4];
    let mut parts = rest.split('.');
    for slot in o.iter_mut().rev() {
        *slot = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then(|| Ipv4Addr::from(o))
}

impl Forward {
    /// SERVFAIL for the client: every upstream failed.
    pub fn servfail(&self) -> Vec<u8> {
        encode(&response_to(&self.request, ResponseCode::ServFail), self.limit).unwrap_or_default()
    }

    /// The ID the client used (upstream queries go out with another).
    pub fn id(&self) -> u16 {
        self.request.metadata.id
    }

    /// The upstream's answer, made the client's: its ID back, truncated (TC) if it does not
    /// fit the client's transport. `None` if it is not a well-formed answer to this query.
    pub fn relay(&self, mut resp: Vec<u8>, sent_id: u16) -> Option<Vec<u8>> {
        let h = Header::read(&mut BinDecoder::new(&resp)).ok()?;
        if h.metadata.id != sent_id || h.metadata.message_type != MessageType::Response {
            return None;
        }
        // The ID is the first two bytes of every DNS message (RFC 1035 4.1.1).
        resp[..2].copy_from_slice(&self.id().to_be_bytes());
        if resp.len() <= self.limit {
            return Some(resp);
        }
        let m = Message::from_vec(&resp).ok()?;
        encode(&m, self.limit)
    }
}

/// What an upstream's answer means for trying the next one.
pub fn upstream_verdict(resp: &[u8]) -> Verdict {
    match Header::read(&mut BinDecoder::new(resp)) {
        Ok(h) if h.metadata.truncation => Verdict::Truncated,
        Ok(h) => match h.metadata.response_code {
            // The server could not answer: another one may.
            ResponseCode::ServFail | ResponseCode::Refused | ResponseCode::NotImp => Verdict::Failed,
            _ => Verdict::Answer,
        },
        Err(_) => Verdict::Failed,
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Answer,
    Truncated,
    Failed,
}

/// Copies `query` with another ID (for sending upstream).
pub fn with_id(query: &[u8], id: u16) -> Vec<u8> {
    let mut q = query.to_vec();
    if q.len() >= 2 {
        q[..2].copy_from_slice(&id.to_be_bytes());
    }
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;
    impl Names for Fixed {
        fn resolve(&self, q: &str) -> Option<Vec<Ipv4Addr>> {
            match q {
                "web" | "web.net" => Some(vec!["10.0.0.2".parse().unwrap()]),
                "svc" => Some(vec!["10.0.0.2".parse().unwrap(), "10.0.0.3".parse().unwrap()]),
                "big" => Some((0..200).map(|i| Ipv4Addr::new(10, 1, 0, i)).collect()),
                _ => None,
            }
        }
        fn reverse(&self, ip: Ipv4Addr) -> Option<String> {
            (ip == Ipv4Addr::new(10, 0, 0, 2)).then(|| "web.net".into())
        }
    }

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 0x1234;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    fn reply(bytes: &[u8], tcp: bool, rotate: usize) -> Message {
        match handle(bytes, tcp, &Fixed, rotate, 5) {
            Outcome::Reply(b) => Message::from_vec(&b).unwrap(),
            o => panic!("expected a reply, got {o:?}"),
        }
    }

    fn addrs(m: &Message) -> Vec<String> {
        m.answers
            .iter()
            .map(|r| match &r.data {
                RData::A(a) => a.0.to_string(),
                RData::PTR(p) => p.0.to_string(),
                d => format!("{d:?}"),
            })
            .collect()
    }

    #[test]
    fn container_names_are_answered_with_short_ttl() {
        let m = reply(&query("web.", RecordType::A), false, 0);
        assert_eq!(m.metadata.id, 0x1234);
        assert_eq!(m.metadata.message_type, MessageType::Response);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.recursion_desired && m.metadata.recursion_available);
        assert_eq!(addrs(&m), ["10.0.0.2"]);
        assert_eq!(m.answers[0].ttl, 5);
        assert_eq!(m.queries.len(), 1, "the question is echoed");
        assert_eq!(addrs(&reply(&query("WEB.NET", RecordType::A), false, 0)), ["10.0.0.2"], "case-insensitive");
    }

    #[test]
    fn aliases_rotate_per_query() {
        let a = addrs(&reply(&query("svc", RecordType::A), false, 0));
        let b = addrs(&reply(&query("svc", RecordType::A), false, 1));
        assert_eq!(a, ["10.0.0.2", "10.0.0.3"]);
        assert_eq!(b, ["10.0.0.3", "10.0.0.2"]);
    }

    #[test]
    fn aaaa_and_other_types_of_container_names_are_empty_noerror() {
        for t in [RecordType::AAAA, RecordType::MX, RecordType::TXT] {
            let m = reply(&query("web", t), false, 0);
            assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{t}");
            assert!(m.answers.is_empty(), "{t}");
        }
    }

    #[test]
    fn ptr_of_container_addresses_and_forwarding_of_the_rest() {
        let m = reply(&query("2.0.0.10.in-addr.arpa.", RecordType::PTR), false, 0);
        assert_eq!(addrs(&m), ["web.net."]);
        for (n, t) in [("3.0.0.10.in-addr.arpa.", RecordType::PTR), ("example.com.", RecordType::A)] {
            match handle(&query(n, t), false, &Fixed, 0, 5) {
                Outcome::Forward(f) => assert_eq!(f.id(), 0x1234),
                o => panic!("{n}: expected forward, got {o:?}"),
            }
        }
        assert_eq!(reverse_v4("4.3.2.1.in-addr.arpa"), Some(Ipv4Addr::new(1, 2, 3, 4)));
        for bad in ["3.2.1.in-addr.arpa", "5.4.3.2.1.in-addr.arpa", "x.3.2.1.in-addr.arpa", "256.3.2.1.in-addr.arpa"] {
            assert_eq!(reverse_v4(bad), None, "{bad}");
        }
    }

    #[test]
    fn big_answers_truncate_over_udp_and_not_over_tcp() {
        let m = reply(&query("big", RecordType::A), false, 0);
        assert!(m.metadata.truncation && m.answers.is_empty());
        let m = reply(&query("big", RecordType::A), true, 0);
        assert!(!m.metadata.truncation);
        assert_eq!(m.answers.len(), 200);
    }

    #[test]
    fn relay_restores_the_id_and_checks_the_answer() {
        let Outcome::Forward(f) = handle(&query("example.com.", RecordType::A), false, &Fixed, 0, 5) else {
            panic!("not forwarded")
        };
        let up = with_id(&f.query, 0x9999);
        assert_eq!(&up[..2], &[0x99, 0x99]);
        let mut resp = Message::from_vec(&up).unwrap();
        resp.metadata.message_type = MessageType::Response;
        resp.metadata.response_code = ResponseCode::NXDomain;
        let resp = resp.to_vec().unwrap();
        assert_eq!(upstream_verdict(&resp), Verdict::Answer);
        let out = Message::from_vec(&f.relay(resp.clone(), 0x9999).unwrap()).unwrap();
        assert_eq!(out.metadata.id, 0x1234);
        assert_eq!(out.metadata.response_code, ResponseCode::NXDomain);
        assert!(f.relay(resp, 0x9998).is_none(), "an answer to another query");
        let sf = Message::from_vec(&f.servfail()).unwrap();
        assert_eq!((sf.metadata.id, sf.metadata.response_code), (0x1234, ResponseCode::ServFail));
    }
}
