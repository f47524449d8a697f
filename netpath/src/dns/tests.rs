//! Bad input: a corpus of malformed messages, each with the answer it must get, and a property
//! test that the request entry point never panics and answers only with well-formed replies.

use std::net::Ipv4Addr;

use hickory_proto::op::{Message, ResponseCode};
use proptest::prelude::*;

use super::message::{Names, Outcome, handle};

struct One;
impl Names for One {
    fn resolve(&self, q: &str) -> Option<Vec<Ipv4Addr>> {
        (q == "web").then(|| vec![Ipv4Addr::new(10, 0, 0, 2)])
    }
    fn reverse(&self, _: Ipv4Addr) -> Option<String> {
        None
    }
}

/// A header: id 0xbeef, the given flags bytes and counts.
fn header(flags: [u8; 2], counts: [u16; 4]) -> Vec<u8> {
    let mut h = vec![0xbe, 0xef, flags[0], flags[1]];
    counts.iter().for_each(|c| h.extend_from_slice(&c.to_be_bytes()));
    h
}

/// "web" A IN as question bytes.
const Q_WEB: &[u8] = b"\x03web\x00\x00\x01\x00\x01";

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

#[derive(Debug, PartialEq)]
enum Want {
    Drop,
    Code(ResponseCode),
}

fn corpus() -> Vec<(&'static str, Vec<u8>, Want)> {
    use ResponseCode::*;
    let q = header([0x01, 0x00], [1, 0, 0, 0]); // standard query, RD
    let label63 = [&[63u8][..], &[b'a'; 63]].concat();
    let long_name: Vec<u8> = [label63.repeat(4), vec![0]].concat(); // 256 bytes: over the 255 limit
    let many_labels: Vec<u8> = [b"\x01a".repeat(200), vec![0]].concat();
    vec![
        ("empty", vec![], Want::Drop),
        ("one byte", vec![0x12], Want::Drop),
        ("short header", vec![0; 11], Want::Drop),
        ("header only, no question", header([0x01, 0], [0, 0, 0, 0]), Want::Code(FormErr)),
        ("question count says 1, no bytes", q.clone(), Want::Code(FormErr)),
        ("question cut in the name", cat(&[&q, b"\x03we"]), Want::Code(FormErr)),
        ("question cut before its class", cat(&[&q, b"\x03web\x00\x00\x01"]), Want::Code(FormErr)),
        ("two questions", cat(&[&header([1, 0], [2, 0, 0, 0]), Q_WEB, Q_WEB]), Want::Code(FormErr)),
        ("65535 questions", cat(&[&header([1, 0], [65535, 0, 0, 0]), Q_WEB]), Want::Code(FormErr)),
        ("a query with answers", cat(&[&header([1, 0], [1, 1, 0, 0]), Q_WEB]), Want::Code(FormErr)),
        ("pointer to itself", cat(&[&q, b"\xc0\x0c\x00\x01\x00\x01"]), Want::Code(FormErr)),
        ("pointers to each other", cat(&[&q, b"\x01a\xc0\x10\xc0\x0c\x00\x01\x00\x01"]), Want::Code(FormErr)),
        ("pointer past the end", cat(&[&q, b"\xc0\xff\x00\x01\x00\x01"]), Want::Code(FormErr)),
        ("reserved label type 0x40", cat(&[&q, b"\x41a\x00\x00\x01\x00\x01"]), Want::Code(FormErr)),
        ("name over 255 bytes", cat(&[&q, &long_name, b"\x00\x01\x00\x01"]), Want::Code(FormErr)),
        ("200 labels", cat(&[&q, &many_labels, b"\x00\x01\x00\x01"]), Want::Code(FormErr)),
        ("additional count with nothing", cat(&[&header([1, 0], [1, 0, 0, 3]), Q_WEB]), Want::Code(FormErr)),
        ("a response", cat(&[&header([0x81, 0x80], [1, 0, 0, 0]), Q_WEB]), Want::Drop),
        ("opcode STATUS", cat(&[&header([0x11, 0], [1, 0, 0, 0]), Q_WEB]), Want::Code(NotImp)),
        ("opcode UPDATE", cat(&[&header([0x29, 0], [1, 0, 0, 0]), Q_WEB]), Want::Code(NotImp)),
        ("opcode 15", cat(&[&header([0x79, 0], [1, 0, 0, 0]), Q_WEB]), Want::Code(NotImp)),
        ("class CHAOS", cat(&[&q, b"\x03web\x00\x00\x01\x00\x03"]), Want::Code(NotImp)),
        ("class 0", cat(&[&q, b"\x03web\x00\x00\x01\x00\x00"]), Want::Code(NotImp)),
        ("well-formed, for contrast", cat(&[&q, Q_WEB]), Want::Code(NoError)),
        ("trailing garbage ignored", cat(&[&q, Q_WEB, b"\xff\xff\xff"]), Want::Code(NoError)),
    ]
}

#[test]
fn malformed_messages_get_formerr_notimp_or_nothing() {
    for (what, bytes, want) in corpus() {
        for tcp in [false, true] {
            let got = match handle(&bytes, tcp, &One, 0, 5) {
                Outcome::Drop => Want::Drop,
                Outcome::Reply(b) => {
                    let m = Message::from_vec(&b).unwrap_or_else(|e| panic!("{what}: our reply does not parse: {e}"));
                    assert_eq!(m.metadata.id, 0xbeef, "{what}: reply ID");
                    Want::Code(m.metadata.response_code)
                }
                Outcome::Forward(_) => panic!("{what}: forwarded"),
            };
            assert_eq!(got, want, "{what} (tcp: {tcp})");
        }
    }
}

fn check_any(bytes: &[u8]) -> Result<(), TestCaseError> {
    match handle(bytes, false, &One, 7, 5) {
        Outcome::Reply(b) => {
            let m = Message::from_vec(&b).map_err(|e| TestCaseError::fail(format!("reply does not parse: {e}")))?;
            prop_assert_eq!(&b[..2], &bytes[..2], "reply carries the query's ID");
            prop_assert!(b.len() <= 512 || m.edns.is_some(), "UDP reply over 512 bytes without EDNS");
        }
        Outcome::Forward(f) => prop_assert_eq!(f.query.as_slice(), bytes),
        Outcome::Drop => {}
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        check_any(&bytes)?;
    }

    /// Random bytes rarely get past the header; these start as a real query and then mutate.
    #[test]
    fn mutated_queries_never_panic(
        flips in proptest::collection::vec((0usize..64, any::<u8>()), 1..8),
        cut in 0usize..64,
        tail in proptest::collection::vec(any::<u8>(), 0..32),
    ) {
        let mut b = cat(&[&header([0x01, 0x00], [1, 0, 0, 1]), b"\x03web\x07example\x00\x00\x01\x00\x01",
            b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"]);
        for (i, v) in flips {
            let n = b.len();
            b[i % n] = v;
        }
        b.truncate(b.len().saturating_sub(cut % 8));
        b.extend(tail);
        check_any(&b)?;
    }
}
