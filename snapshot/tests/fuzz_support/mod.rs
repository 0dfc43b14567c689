//! Shared parts of the fuzz targets: the case count, mutations of valid encodings, and a
//! global allocator that records the largest single allocation a parser makes.
//!
//! A mutation strategy takes valid encodings and applies 1 to 8 of: a flipped bit, a set
//! byte, a truncation, a removed or inserted range, a range of the input copied over another
//! place (a splice), or a u32/u64 (either byte order) of an extreme value written anywhere,
//! which is how length fields get huge. A quarter of the inputs are random bytes instead.

#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::Config;

/// Cases per target unless `ARKVM_FUZZ_CASES` says otherwise.
pub const DEFAULT_CASES: u32 = 4096;

/// The proptest configuration of a target: `ARKVM_FUZZ_CASES` cases (default `default`),
/// no failure files (a crash found is kept as a named regression test instead).
pub fn config(default: u32) -> Config {
    let cases = std::env::var("ARKVM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 2048,
        ..Config::default()
    }
}

/// One change to an encoding.
#[derive(Clone, Debug)]
pub enum Mutation {
    /// Flips one bit.
    FlipBit(Index, u8),
    /// Sets one byte.
    SetByte(Index, u8),
    /// Cuts the input at a point.
    Truncate(Index),
    /// Removes up to this many bytes from a point.
    Remove(Index, usize),
    /// Inserts bytes at a point.
    Insert(Index, Vec<u8>),
    /// Copies up to this many bytes from the first point over the second.
    Splice(Index, Index, usize),
    /// Writes a 32-bit value at a point, little- or big-endian.
    Put32(Index, u32, bool),
    /// Writes a 64-bit value at a point, little- or big-endian.
    Put64(Index, u64, bool),
}

/// Values that make length fields interesting: extremes, powers of two and their neighbours.
fn extreme_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0),
        Just(u64::MAX),
        Just(u64::MAX / 2),
        Just(u32::MAX as u64),
        (0u32..64).prop_map(|shift| 1u64 << shift),
        (0u32..64).prop_map(|shift| (1u64 << shift).wrapping_sub(1)),
        (0u32..64).prop_map(|shift| (1u64 << shift) + 1),
        any::<u64>(),
    ]
}

/// One mutation.
pub fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit(at, bit)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(at, v)| Mutation::SetByte(at, v)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => (any::<Index>(), 1usize..64).prop_map(|(at, n)| Mutation::Remove(at, n)),
        1 => (any::<Index>(), proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert(at, bytes)),
        1 => (any::<Index>(), any::<Index>(), 1usize..256)
            .prop_map(|(from, to, n)| Mutation::Splice(from, to, n)),
        2 => (any::<Index>(), extreme_u64(), any::<bool>())
            .prop_map(|(at, v, be)| Mutation::Put32(at, v as u32, be)),
        1 => (any::<Index>(), extreme_u64(), any::<bool>())
            .prop_map(|(at, v, be)| Mutation::Put64(at, v, be)),
    ]
}

/// Applies `mutations` to `bytes` in order.
pub fn apply(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len();
        match m {
            Mutation::FlipBit(at, bit) if len > 0 => bytes[at.index(len)] ^= 1 << bit,
            Mutation::SetByte(at, v) if len > 0 => bytes[at.index(len)] = *v,
            Mutation::Truncate(at) => bytes.truncate(at.index(len + 1)),
            Mutation::Remove(at, n) if len > 0 => {
                let start = at.index(len);
                let end = (start + n).min(len);
                bytes.drain(start..end);
            }
            Mutation::Insert(at, new) => {
                let at = at.index(len + 1);
                bytes.splice(at..at, new.iter().copied());
            }
            Mutation::Splice(from, to, n) if len > 0 => {
                let (from, to) = (from.index(len), to.index(len));
                let n = (*n).min(len - from).min(len - to);
                let piece = bytes[from..from + n].to_vec();
                bytes[to..to + n].copy_from_slice(&piece);
            }
            Mutation::Put32(at, v, be) if len >= 4 => {
                let at = at.index(len - 3);
                let v = if *be {
                    v.to_be_bytes()
                } else {
                    v.to_le_bytes()
                };
                bytes[at..at + 4].copy_from_slice(&v);
            }
            Mutation::Put64(at, v, be) if len >= 8 => {
                let at = at.index(len - 7);
                let v = if *be {
                    v.to_be_bytes()
                } else {
                    v.to_le_bytes()
                };
                bytes[at..at + 8].copy_from_slice(&v);
            }
            _ => {}
        }
    }
    bytes
}

/// Inputs for a parser: mostly valid encodings with 1 to 8 mutations, some unchanged, and
/// some random bytes.
pub fn inputs(valid: impl Strategy<Value = Vec<u8>> + Clone) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => (valid.clone(), proptest::collection::vec(mutation(), 1..8))
            .prop_map(|(bytes, ms)| apply(bytes, &ms)),
        1 => valid,
        2 => proptest::collection::vec(any::<u8>(), 0..4096),
    ]
}

thread_local! {
    /// Whether this thread's allocations are being watched.
    static WATCHING: Cell<bool> = const { Cell::new(false) };
    /// The largest allocation (or reallocation) seen while watching.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

/// The system allocator, noting the largest request made by a watching thread.
pub struct Watching;

impl Watching {
    fn note(size: usize) {
        // try_with: the thread-locals may already be gone while a thread exits.
        let _ = WATCHING.try_with(|watching| {
            if watching.get() {
                let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
            }
        });
    }
}

// SAFETY: every call is passed on unchanged to the system allocator; the bookkeeping only
// touches const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for Watching {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::note(layout.size());
        // SAFETY: the caller's contract for `alloc` is passed on as it is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::note(layout.size());
        // SAFETY: the caller's contract for `alloc_zeroed` is passed on as it is.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc` is passed on as it is.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::note(new_size);
        // SAFETY: the caller's contract for `realloc` is passed on as it is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Runs `f` on this thread and returns its result with the largest single allocation it made.
pub fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|largest| largest.set(0));
    WATCHING.with(|watching| watching.set(true));
    let result = f();
    WATCHING.with(|watching| watching.set(false));
    (result, LARGEST.with(Cell::get))
}

/// The allocation a parser may make for an input of `len` bytes without a length field
/// driving it: proportional to the input (JSON values are larger than their text), or a fixed
/// working buffer of `fixed` bytes.
pub fn proportional_bound(len: usize, fixed: usize) -> usize {
    64 * len + fixed + (64 << 10)
}
