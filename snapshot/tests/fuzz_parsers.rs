//! Fuzz targets for the snapshot crate's parsers of untrusted bytes, run on the stable
//! toolchain with structure-aware random inputs (`proptest`):
//!
//! | target | parser | inputs |
//! |---|---|---|
//! | `state_files` | `read_state` | mutated state files; the same with the CRC made right again |
//! | `snapshot_manifests` | `Manifest::decode` | mutated manifests; mutated JSON sealed again |
//! | `sealed_json_documents` | `sealed_json::unseal` | the same, as any JSON document |
//! | `point_manifests` | `PointManifest::decode` | plain and encrypted points, mutated; JSON sealed again |
//! | `chunk_objects` | `repo::decode_chunk` | plain, zstd and sealed chunks, mutated; zstd with its CRC made right |
//! | `dr_messages` | `dr::Message::decode` | every message type, mutated |
//! | `dr_frames_after_a_handshake` | `SecureLink::recv_frame` | sealed frames, mutated, after a good handshake |
//!
//! Every input must give `Ok` or a typed `Err`, never a panic, and no single allocation made
//! while parsing may be larger than a constant times the input's size plus the parser's fixed
//! buffers: a length field must never size an allocation by itself. A global allocator that
//! notes the largest request checks that. The mutations are described in `fuzz_support`.
//!
//! Each target runs 4096 cases by default (the DR frames 2048), about 5 s in all in a release
//! build; `ARKVM_FUZZ_CASES=N` sets the count of every target for a long run. See
//! `docs/fuzzing.md`.

mod fuzz_support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};

use proptest::prelude::*;
use serde::{Deserialize, Serialize};

use fuzz_support::{apply, DEFAULT_CASES};
use fuzz_support::{config, inputs, largest_allocation, mutation, proportional_bound};
use snapshot::chunk::{chunk_count, chunk_table_hash, MAX_CHUNK_SIZE};
use snapshot::dr::{CommitReport, LinkKey, Message, OfferHeader, SecureLink};
use snapshot::manifest::ChunkTable;
use snapshot::repo::{
    chunk_id, decode_chunk, encode_chunk, ChunkCodecError, PointManifest, PointObject, PointStats,
    RepoKey,
};
use snapshot::sealed_json::unseal;
use snapshot::{read_state, write_state, ContentHash, Manifest, PartEntry, PartKind, CHUNK_SIZE};

#[global_allocator]
static ALLOCATOR: fuzz_support::Watching = fuzz_support::Watching;

/// Asserts that the largest allocation of a parse stayed within its bound.
fn assert_bounded(what: &str, input_len: usize, largest: usize, fixed: usize) {
    let bound = proportional_bound(input_len, fixed);
    assert!(
        largest <= bound,
        "{what}: an input of {input_len} bytes made an allocation of {largest} bytes \
         (bound {bound})"
    );
}

/// Random bytes of a random length up to `max`.
fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> + Clone {
    proptest::collection::vec(any::<u8>(), 0..max)
}

/// A random content hash.
fn hash() -> impl Strategy<Value = ContentHash> + Clone {
    any::<[u8; 32]>().prop_map(ContentHash::from_bytes)
}

// --- Sealed JSON --------------------------------------------------------------------------

/// The text before a seal's hex digits, and after them (as `sealed_json` writes them).
const SEAL_KEY: &[u8] = b",\n  \"manifest_blake3\": \"";
const SEAL_END: &[u8] = b"\"\n}\n";

/// Mutates the JSON text of a sealed document, then seals it again, so that the parse behind
/// the seal is reached.
fn mutate_and_reseal(sealed: Vec<u8>, mutations: &[fuzz_support::Mutation]) -> Vec<u8> {
    let tail = SEAL_KEY.len() + 64 + SEAL_END.len();
    let Some(body_len) = sealed.len().checked_sub(tail) else {
        return sealed;
    };
    let mut body = apply(sealed[..body_len].to_vec(), mutations);
    body.extend_from_slice(SEAL_KEY);
    let hash = ContentHash::of(&body);
    body.extend_from_slice(hash.to_hex().as_bytes());
    body.extend_from_slice(SEAL_END);
    body
}

/// Valid sealed documents from `valid`, mutated before or after sealing, or random bytes.
fn sealed_inputs(valid: impl Strategy<Value = Vec<u8>> + Clone) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => inputs(valid.clone()),
        1 => (valid, proptest::collection::vec(mutation(), 1..6))
            .prop_map(|(sealed, ms)| mutate_and_reseal(sealed, &ms)),
    ]
}

// --- State files --------------------------------------------------------------------------

/// A state shaped like a device's: numbers, strings, nesting and options.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct SampleState {
    regs: Vec<u64>,
    name: String,
    flag: bool,
    queues: Vec<(u16, Option<u32>)>,
    blob: Vec<u8>,
}

fn sample_state() -> impl Strategy<Value = SampleState> + Clone {
    (
        proptest::collection::vec(any::<u64>(), 0..16),
        "[ -~]{0,24}",
        any::<bool>(),
        proptest::collection::vec((any::<u16>(), any::<Option<u32>>()), 0..8),
        bytes(64),
    )
        .prop_map(|(regs, name, flag, queues, blob)| SampleState {
            regs,
            name,
            flag,
            queues,
            blob,
        })
}

fn state_file() -> impl Strategy<Value = Vec<u8>> + Clone {
    sample_state().prop_map(|state| {
        let mut out = Vec::new();
        write_state(&mut out, &state).expect("a sample state writes");
        out
    })
}

/// Makes the trailing CRC32 right again after a mutation, so the version and the JSON
/// behind it are reached.
fn fix_state_crc(mut bytes: Vec<u8>) -> Vec<u8> {
    if bytes.len() >= 24 {
        let end = bytes.len() - 4;
        let crc = crc32(&bytes[..end]);
        bytes[end..].copy_from_slice(&crc.to_le_bytes());
    }
    bytes
}

/// CRC32 (IEEE), bit by bit: the fuzz targets do not depend on the crate's CRC library.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The payload limit the target reads with: small, so that a length under it but far past
/// the input shows whether the reader trusts it.
const STATE_LIMIT: u64 = 16 << 20;

proptest! {
    #![proptest_config(config(DEFAULT_CASES))]

    #[test]
    fn state_files(
        input in prop_oneof![
            2 => inputs(state_file()),
            1 => (state_file(), proptest::collection::vec(mutation(), 1..6))
                .prop_map(|(b, ms)| fix_state_crc(apply(b, &ms))),
        ]
    ) {
        let (result, largest) =
            largest_allocation(|| read_state::<SampleState>(&mut &input[..], STATE_LIMIT));
        // The reader reserves up to 1 MiB up front for a payload the header announces.
        assert_bounded("read_state", input.len(), largest, 1 << 20);
        if let Ok(state) = result {
            // Whatever it accepts writes and reads back the same.
            let mut again = Vec::new();
            write_state(&mut again, &state).unwrap();
            let back: SampleState = read_state(&mut &again[..], STATE_LIMIT).unwrap();
            prop_assert_eq!(back, state);
        }
    }
}

// --- Snapshot manifests -------------------------------------------------------------------

fn part_name() -> impl Strategy<Value = String> + Clone {
    "[A-Za-z0-9_-][A-Za-z0-9._-]{0,12}"
}

/// A part with a chunk table consistent with its size and hash when it is memory.
fn part(index: usize) -> impl Strategy<Value = PartEntry> + Clone {
    (
        part_name(),
        prop_oneof![
            Just(PartKind::State),
            Just(PartKind::Raw),
            Just(PartKind::Memory)
        ],
        0u64..200_000,
        0u32..4,
        hash(),
    )
        .prop_map(move |(name, kind, size, shift, blake3)| {
            let name = format!("{name}{index}");
            if kind != PartKind::Memory {
                return PartEntry {
                    name,
                    kind,
                    size,
                    blake3,
                    chunks: None,
                };
            }
            let chunk_size = 4096u64 << shift;
            let hashes: Vec<ContentHash> = (0..chunk_count(size, chunk_size))
                .map(|i| ContentHash::of(&i.to_le_bytes()))
                .collect();
            PartEntry {
                name,
                kind,
                size,
                blake3: chunk_table_hash(&hashes),
                chunks: Some(ChunkTable { chunk_size, hashes }),
            }
        })
}

fn manifest() -> impl Strategy<Value = Vec<u8>> + Clone {
    (
        any::<u64>(),
        proptest::collection::vec(0..1usize, 0..5),
        part(0),
        part(1),
        part(2),
        part(3),
        part(4),
    )
        .prop_map(|(created_unix_ms, count, p0, p1, p2, p3, p4)| {
            let mut parts = vec![p0, p1, p2, p3, p4];
            parts.truncate(count.len());
            Manifest {
                format_version: snapshot::FORMAT_VERSION,
                created_unix_ms,
                parts,
            }
            .encode()
            .expect("a manifest encodes")
        })
}

proptest! {
    #![proptest_config(config(DEFAULT_CASES))]

    #[test]
    fn snapshot_manifests(input in sealed_inputs(manifest())) {
        let (result, largest) = largest_allocation(|| Manifest::decode(&input));
        assert_bounded("Manifest::decode", input.len(), largest, 0);
        if let Ok(manifest) = result {
            prop_assert!(manifest.validate().is_ok());
        }
    }

    #[test]
    fn sealed_json_documents(input in sealed_inputs(manifest())) {
        let (result, largest) = largest_allocation(|| unseal(&input, 1 << 20));
        assert_bounded("unseal", input.len(), largest, 0);
        if let Ok(value) = result {
            prop_assert!(value.is_object());
        }
    }
}

// --- Backup-point manifests ---------------------------------------------------------------

const POINT_ID: &str = "20260101T000000.000000000Z-vm1-00000001";

fn point_object(index: usize) -> impl Strategy<Value = PointObject> + Clone {
    (part_name(), 0u64..5_000_000, 0u32..6).prop_map(move |(name, size, shift)| {
        let chunk_size = (64u64 << 10) << shift;
        let chunks: Vec<ContentHash> = (0..chunk_count(size, chunk_size))
            .map(|i| ContentHash::of(&i.to_le_bytes()))
            .collect();
        PointObject {
            name: format!("{name}{index}"),
            kind: PartKind::Raw,
            size,
            chunk_size,
            blake3: chunk_table_hash(&chunks),
            chunks,
        }
    })
}

fn point(key: Option<RepoKey>) -> impl Strategy<Value = Vec<u8>> + Clone {
    (
        any::<u64>(),
        any::<bool>(),
        point_object(0),
        point_object(1),
        0usize..3,
    )
        .prop_map(move |(created_unix_ms, parent, o0, o1, count)| {
            let mut objects = vec![o0, o1];
            objects.truncate(count);
            PointManifest {
                format_version: snapshot::FORMAT_VERSION,
                id: POINT_ID.into(),
                vm: "vm1".into(),
                created_unix_ms,
                parent: parent.then(|| "20251231T000000.000000000Z-vm1-00000000".into()),
                objects,
                stats: PointStats::default(),
            }
            .encode(key.as_ref())
            .expect("a point encodes")
        })
}

proptest! {
    #![proptest_config(config(DEFAULT_CASES))]

    #[test]
    fn point_manifests(
        (input, encrypted) in prop_oneof![
            3 => sealed_inputs(point(None)).prop_map(|b| (b, false)),
            1 => inputs(point(Some(RepoKey::from_secret([7; 32])))).prop_map(|b| (b, true)),
        ]
    ) {
        let key = encrypted.then(|| RepoKey::from_secret([7; 32]));
        let (result, largest) =
            largest_allocation(|| PointManifest::decode(POINT_ID, &input, key.as_ref()));
        assert_bounded("PointManifest::decode", input.len(), largest, 0);
        if let Ok(point) = result {
            prop_assert_eq!(point.id, POINT_ID);
        }
    }
}

// --- Chunk objects ------------------------------------------------------------------------

/// Chunk contents: compressible (runs), incompressible (random), or empty.
fn chunk_data() -> impl Strategy<Value = Vec<u8>> + Clone {
    prop_oneof![
        (any::<u8>(), 0usize..300_000).prop_map(|(b, n)| vec![b; n]),
        proptest::collection::vec((any::<u8>(), 1usize..200), 0..64)
            .prop_map(|runs| runs.into_iter().flat_map(|(b, n)| vec![b; n]).collect()),
        bytes(8192),
    ]
}

/// Makes the CRC behind a zstd chunk object right again after a mutation.
fn fix_chunk_crc(mut stored: Vec<u8>) -> Vec<u8> {
    if stored.first() == Some(&b'Z') && stored.len() >= 5 {
        let end = stored.len() - 4;
        let crc = crc32(&stored[1..end]);
        stored[end..].copy_from_slice(&crc.to_le_bytes());
    }
    stored
}

proptest! {
    #![proptest_config(config(DEFAULT_CASES))]

    #[test]
    fn chunk_objects(
        (data, encrypted, mutations, fix_crc, random) in (
            chunk_data(),
            any::<bool>(),
            proptest::collection::vec(mutation(), 0..6),
            any::<bool>(),
            prop_oneof![4 => Just(None), 1 => bytes(4096).prop_map(Some)],
        )
    ) {
        let key = encrypted.then(|| RepoKey::from_secret([9; 32]));
        let id = chunk_id(&data, key.as_ref());
        let input = match random {
            Some(random) => random,
            None => {
                let stored = apply(encode_chunk(&id, &data, key.as_ref()), &mutations);
                if fix_crc { fix_chunk_crc(stored) } else { stored }
            }
        };
        let (result, largest) = largest_allocation(|| decode_chunk(&id, &input, key.as_ref()));
        // Decoding keeps a working buffer of one default chunk, and may legitimately
        // decompress a small object into a chunk of up to MAX_CHUNK_SIZE bytes: the bound is
        // that the data itself is never larger than what the id names.
        assert_bounded("decode_chunk", input.len(), largest, 2 * CHUNK_SIZE.max(data.len()));
        if let Ok(decoded) = result {
            prop_assert_eq!(decoded, data);
        }
    }
}

/// A zstd bomb: a small object that decompresses to one byte more than any chunk may hold is
/// refused, and the decoder never holds more than the limit (no doubling past it).
#[test]
fn a_chunk_that_decompresses_past_the_limit_is_refused_within_the_limit() {
    let data = vec![0u8; MAX_CHUNK_SIZE as usize + 1];
    let id = chunk_id(&data, None);
    let stored = encode_chunk(&id, &data, None);
    assert!(stored.len() < 64 << 10, "{}", stored.len());
    drop(data);
    let (result, largest) = largest_allocation(|| decode_chunk(&id, &stored, None));
    assert!(
        matches!(result, Err(ChunkCodecError::TooLarge { .. })),
        "{result:?}"
    );
    assert!(
        largest <= MAX_CHUNK_SIZE as usize + (4 << 20),
        "a {}-byte object made the decoder allocate {largest} bytes",
        stored.len()
    );
}

// --- DR messages --------------------------------------------------------------------------

/// Encoded messages of every type.
fn message() -> impl Strategy<Value = Vec<u8>> + Clone {
    prop_oneof![
        (
            "[A-Za-z0-9._-]{1,40}",
            "[A-Za-z0-9._-]{1,20}",
            any::<bool>(),
            any::<Option<u64>>(),
            proptest::collection::vec(hash(), 0..20),
        )
            .prop_map(|(point_id, vm, encrypted, pause_us, ids)| {
                let header = OfferHeader {
                    point_id,
                    vm,
                    encrypted,
                    pause_us,
                };
                Message::encode_offer(&header, &ids)
            }),
        proptest::collection::vec(any::<u32>(), 0..40).prop_map(|n| Message::Need(n).encode()),
        (hash(), bytes(512)).prop_map(|(id, stored)| Message::Chunk { id, stored }.encode()),
        bytes(512).prop_map(|m| Message::Manifest(m).encode()),
        ("[ -~]{0,30}", any::<bool>(), any::<u64>(), any::<u64>()).prop_map(
            |(point_id, already_present, points_kept, points_pruned)| {
                Message::Committed(CommitReport {
                    point_id,
                    already_present,
                    points_kept,
                    points_pruned,
                })
                .encode()
            }
        ),
        "[ -~]{0,60}".prop_map(|why| Message::Refused(why).encode()),
        Just(Message::StatusRequest.encode()),
        (any::<u64>(), "[a-z]{0,10}")
            .prop_map(|(n, s)| Message::Status(serde_json::json!({"points": n, "vm": s})).encode()),
    ]
}

proptest! {
    #![proptest_config(config(DEFAULT_CASES))]

    #[test]
    fn dr_messages(input in inputs(message())) {
        let (result, largest) = largest_allocation(|| Message::decode(&input));
        assert_bounded("Message::decode", input.len(), largest, 0);
        if let Ok(message) = result {
            // What decodes encodes back to a message that decodes the same. A status is any
            // JSON, and serde_json reads a decimal with more digits than an f64 holds to
            // within one unit in the last place, so a float in it may move by that much.
            let again = Message::decode(&message.encode()).unwrap();
            if matches!(message, Message::Status(_)) {
                prop_assert_eq!(again.name(), message.name());
            } else {
                prop_assert_eq!(again, message);
            }
        }
    }
}

/// Found by the 1,000,000-case run of `dr_messages`: a status whose number has more digits
/// than an f64 holds decodes, and its encoding decodes again, to within one unit in the last
/// place of the float.
#[test]
fn a_status_with_a_long_decimal_decodes_and_encodes_again() {
    let input = b"\x08{\"points\":13.09696896826177665,\"vm\":\"\"}";
    let message = Message::decode(input).unwrap();
    let again = Message::decode(&message.encode()).unwrap();
    let (Message::Status(first), Message::Status(second)) = (&message, &again) else {
        panic!("{message:?} {again:?}");
    };
    let (a, b) = (
        first["points"].as_f64().unwrap(),
        second["points"].as_f64().unwrap(),
    );
    assert!((a - b).abs() <= f64::EPSILON * a.abs(), "{a} {b}");
    assert_eq!(second["vm"], "");
}

// --- DR frames after a good handshake -----------------------------------------------------

/// A client and a server link over loopback, and raw handles on both sockets: one to read
/// what the client sealed before the server sees it, one to write in the client's place.
struct RawLinks {
    client: SecureLink,
    server: SecureLink,
    /// The server's socket: reads the client's frames raw.
    tap: TcpStream,
    /// The client's socket: writes bytes as if the client sent them.
    inject: TcpStream,
}

fn raw_links() -> RawLinks {
    let key = LinkKey::from_secret([3; 32]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server_key = key.clone();
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let tap = stream.try_clone().unwrap();
        (SecureLink::server(stream, &server_key).unwrap(), tap)
    });
    let stream = TcpStream::connect(addr).unwrap();
    let inject = stream.try_clone().unwrap();
    let client = SecureLink::client(stream, &key).unwrap();
    let (server, tap) = server.join().unwrap();
    RawLinks {
        client,
        server,
        tap,
        inject,
    }
}

proptest! {
    #![proptest_config(config(DEFAULT_CASES / 2))]

    #[test]
    fn dr_frames_after_a_handshake(
        (plain, mutations, random) in (
            prop_oneof![bytes(100), bytes(150_000)],
            proptest::collection::vec(mutation(), 0..6),
            prop_oneof![4 => Just(None), 1 => bytes(4096).prop_map(Some)],
        )
    ) {
        let RawLinks { mut client, mut server, mut tap, mut inject } = raw_links();
        client.send_frame(&plain).unwrap();
        let mut sealed = vec![0u8; client.bytes_sent() as usize];
        tap.read_exact(&mut sealed).unwrap();
        let input = match random {
            Some(random) => random,
            None => apply(sealed, &mutations),
        };
        // Written from another thread: the socket buffer may hold less than the input.
        let writer = {
            let input = input.clone();
            std::thread::spawn(move || {
                let _ = inject.write_all(&input);
                let _ = inject.shutdown(Shutdown::Write);
            })
        };
        let (result, largest) = largest_allocation(|| server.recv_frame());
        drop(server);
        writer.join().unwrap();
        assert_bounded("recv_frame", input.len(), largest, 0);
        // Noise authenticates every message: whatever opens is the frame that was sealed.
        if let Ok(Some(frame)) = result {
            prop_assert_eq!(frame, plain);
        }
    }
}
