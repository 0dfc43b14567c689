//! Fuzz target for the control socket's HTTP request parser: structure-aware random requests
//! (valid requests of every route, mutated; random bytes) go through the server's own path,
//! `MessageReader::read_request_head`, `body_length`, `read_body` and `route`, as many as one
//! connection holds. Every input must give requests or a typed error, never a panic, and a
//! body is never larger than the limit. 2048 cases by default; `ARKVM_FUZZ_CASES=N` for a long
//! run (docs/fuzzing.md).

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};

use super::http::{body_length, MessageReader};
use super::request::route;
use super::MAX_BODY_BYTES;

fn cases() -> u32 {
    std::env::var("ARKVM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048)
}

/// Valid requests: every route, bodies by length or chunked, keep-alive pipelines.
fn valid_request() -> impl Strategy<Value = Vec<u8>> {
    let routes = prop_oneof![
        Just(("GET", "/vm", "")),
        Just(("PUT", "/vm/pause", "")),
        Just(("PUT", "/vm/resume", "")),
        Just(("PUT", "/vm/shutdown", "")),
        Just(("GET", "/snapshot", "")),
        Just((
            "PUT",
            "/snapshot",
            r#"{"target":{"dir":"/tmp/x"},"mode":"live","strategy":"cow"}"#
        )),
        Just(("DELETE", "/snapshot", "")),
        Just(("GET", "/dr", "")),
        Just((
            "PUT",
            "/dr",
            r#"{"target":"127.0.0.1:1","interval_ms":1000,"key":"/k"}"#
        )),
        Just(("DELETE", "/dr", "")),
    ];
    (routes, any::<bool>(), 1usize..4).prop_map(|((method, target, body), chunked, repeat)| {
        let mut out = Vec::new();
        for _ in 0..repeat {
            out.extend_from_slice(format!("{method} {target} HTTP/1.1\r\nHost: x\r\n").as_bytes());
            if chunked {
                out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                for part in body.as_bytes().chunks(7) {
                    out.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
                    out.extend_from_slice(part);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n\r\n");
            } else {
                out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
                out.extend_from_slice(body.as_bytes());
            }
        }
        out
    })
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Remove(usize, usize),
    Insert(usize, Vec<u8>),
    /// A number where a length goes: huge, negative-looking, hex.
    Number(usize, String),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let numbers = prop_oneof![
        Just("18446744073709551616".to_string()),
        Just("-1".to_string()),
        Just("ffffffffffffffff".to_string()),
        Just("99999999999".to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| format!("{n:x}")),
    ];
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), 0usize..64).prop_map(|(i, n)| Mutation::Remove(i, n)),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..32)
        )
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<usize>(), numbers).prop_map(|(i, n)| Mutation::Number(i, n)),
    ]
}

fn apply(mut input: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let at = |i: usize, len: usize| if len == 0 { 0 } else { i % (len + 1) };
        match m {
            Mutation::Flip(i, b) if !input.is_empty() => {
                let n = input.len();
                input[i % n] ^= b | 1;
            }
            Mutation::Flip(..) => {}
            Mutation::Truncate(i) => input.truncate(at(*i, input.len())),
            Mutation::Remove(i, n) => {
                let s = at(*i, input.len());
                let e = (s + n).min(input.len());
                input.drain(s..e);
            }
            Mutation::Insert(i, b) => {
                let s = at(*i, input.len());
                input.splice(s..s, b.iter().copied());
            }
            Mutation::Number(i, n) => {
                let s = at(*i, input.len());
                input.splice(s..s, n.bytes());
            }
        }
    }
    input
}

fn input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => valid_request(),
        6 => (valid_request(), proptest::collection::vec(mutation(), 1..8))
            .prop_map(|(v, m)| apply(v, &m)),
        1 => proptest::collection::vec(any::<u8>(), 0..512),
    ]
}

/// The server's path over one connection's bytes; returns how many requests were routed.
fn serve_bytes(bytes: &[u8]) -> usize {
    let mut reader = MessageReader::new(bytes);
    let mut routed = 0;
    while let Ok(Some(head)) = reader.read_request_head() {
        let Ok(length) = body_length(&head.headers, true) else {
            break;
        };
        let Ok(body) = reader.read_body(length, MAX_BODY_BYTES) else {
            break;
        };
        assert!(body.len() <= MAX_BODY_BYTES);
        if route(&head.method, &head.target, &body).is_ok() {
            routed += 1;
        }
    }
    routed
}

proptest! {
    #![proptest_config(Config {
        cases: cases(),
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        ..Config::default()
    })]

    #[test]
    fn http_requests(bytes in input()) {
        serve_bytes(&bytes);
    }
}

#[test]
fn valid_requests_are_routed() {
    let one = b"GET /vm HTTP/1.1\r\n\r\nPUT /vm/pause HTTP/1.1\r\nContent-Length: 0\r\n\r\n";
    assert_eq!(serve_bytes(one), 2);
}
