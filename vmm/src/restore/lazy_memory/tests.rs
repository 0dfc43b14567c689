//! The loader over anonymous memory, with a fake source.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use snapshot::{ChunkSource, ChunkSourceError, SnapshotError};

use super::*;
use crate::vstate::vcpu::{ExitSignal, GuestExit};

const MIB: u64 = 1 << 20;

/// Four 1 MiB chunks: chunk i is filled with byte i+1, except chunk 1 which is zero; `bad`
/// fails its check; `flaky` fails with a transient I/O error `flaky_times` times; `gated`
/// blocks until `open` is set.
#[derive(Default)]
struct FakeSource {
    bad: Option<u64>,
    flaky: Option<u64>,
    flaky_left: AtomicU32,
    gated: Option<u64>,
    open: AtomicBool,
    gate_entered: AtomicBool,
}

impl ChunkSource for FakeSource {
    fn size(&self) -> u64 {
        4 * MIB
    }
    fn chunk_size(&self) -> u64 {
        MIB
    }
    fn chunk_count(&self) -> u64 {
        4
    }
    fn is_zero_chunk(&self, index: u64) -> bool {
        index == 1
    }
    fn read_chunk(&self, index: u64, buf: &mut [u8]) -> Result<(), ChunkSourceError> {
        if Some(index) == self.bad {
            return Err(SnapshotError::ChunkCorrupt {
                name: "memory".into(),
                path: "memory".into(),
                index,
            }
            .into());
        }
        if Some(index) == self.flaky
            && self
                .flaky_left
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok()
        {
            return Err(SnapshotError::Io {
                action: "read".into(),
                path: "memory".into(),
                source: std::io::Error::from(std::io::ErrorKind::TimedOut),
            }
            .into());
        }
        if Some(index) == self.gated {
            self.gate_entered.store(true, Ordering::Release);
            while !self.open.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        buf.fill(index as u8 + 1);
        Ok(())
    }
}

/// Anonymous memory for the loader to fill, unmapped on drop.
struct Mapping(*mut libc::c_void, usize);

impl Mapping {
    fn new(len: usize) -> Self {
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Self(p, len)
    }

    /// Reads one byte (which may fault into the loader).
    fn byte(&self, at: usize) -> u8 {
        assert!(at < self.1);
        // SAFETY: inside the mapping; a volatile read so it really touches the page.
        unsafe { std::ptr::read_volatile((self.0 as *const u8).add(at)) }
    }
}

// SAFETY: the mapping is plain memory; the tests only read it (volatile) from several threads.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer used (the loader was dropped first).
        unsafe { libc::munmap(self.0, self.1) };
    }
}

fn start(mem: &Mapping, source: Arc<FakeSource>) -> (LazyMemory, Arc<ExitSignal>) {
    let layout = snapshot::MemoryLayout::back_to_back(&[(0, 4 * MIB)], MIB)
        .unwrap()
        .mapped_at(vec![mem.0 as u64])
        .unwrap();
    let exit = Arc::new(ExitSignal::new().unwrap());
    let lazy = LazyMemory::start(source, layout, "fake", exit.clone()).unwrap();
    (lazy, exit)
}

#[test]
fn every_chunk_comes_from_the_source_and_zero_chunks_are_zero() {
    let mem = Mapping::new(4 * MIB as usize);
    let (lazy, exit) = start(&mem, Arc::new(FakeSource::default()));
    assert_eq!(mem.byte(3 * MIB as usize + 5), 4);
    lazy.wait_all_loaded().unwrap();
    for i in 0..4usize {
        let want = if i == 1 { 0 } else { i as u8 + 1 };
        for at in [0, 4095, 4096, MIB as usize - 1] {
            assert_eq!(mem.byte(i * MIB as usize + at), want, "chunk {i}");
        }
    }
    assert!(lazy.wait_loaded(Duration::from_secs(10)));
    let info = lazy.info();
    assert!(info.fully_loaded);
    assert_eq!((info.chunks_loaded, info.bytes_loaded), (4, 4 * MIB));
    assert_eq!(info.bytes_read, 3 * MIB, "the zero chunk is not read");
    assert_eq!(info.collapse, progress::CollapseState::Done);
    assert_eq!(info.chunks_waited_for, 0);
    assert!(exit.reason().is_none());
    drop(lazy);
}

#[test]
fn a_chunk_that_fails_its_check_ends_the_vm_with_the_typed_error() {
    let mem = Mapping::new(4 * MIB as usize);
    let source = Arc::new(FakeSource {
        bad: Some(2),
        ..Default::default()
    });
    let (lazy, exit) = start(&mem, source);
    let e = lazy.wait_all_loaded().unwrap_err();
    assert!(
        matches!(
            &e,
            LazyMemoryError::Read {
                index: 2,
                source: ChunkSourceError::Snapshot(_),
                ..
            }
        ),
        "{e:?}"
    );
    assert!(matches!(
        exit.reason(),
        Some(GuestExit::RestoreFailed { detail })
            if detail.contains("chunk 2 of fake")
    ));
    assert!(lazy.info().error.is_some_and(|d| d.contains("chunk 2")));
    assert!(!lazy.wait_loaded(Duration::from_millis(10)));
    lazy.vm_ending();
    drop(lazy);
}

#[test]
fn a_transient_read_error_is_retried() {
    let mem = Mapping::new(4 * MIB as usize);
    let source = Arc::new(FakeSource {
        flaky: Some(3),
        flaky_left: AtomicU32::new(2),
        ..Default::default()
    });
    let (lazy, exit) = start(&mem, source.clone());
    lazy.wait_all_loaded().unwrap();
    assert_eq!(mem.byte(3 * MIB as usize), 4);
    assert_eq!(source.flaky_left.load(Ordering::Acquire), 0);
    assert!(exit.reason().is_none());
    drop(lazy);
}

#[test]
fn a_slow_chunk_does_not_hold_up_faults_on_other_chunks() {
    let mem = Arc::new(Mapping::new(4 * MIB as usize));
    let source = Arc::new(FakeSource {
        gated: Some(0),
        ..Default::default()
    });
    let (lazy, exit) = start(&mem, source.clone());
    let m = mem.clone();
    let waiter = std::thread::spawn(move || m.byte(10));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !source.gate_entered.load(Ordering::Acquire) {
        assert!(Instant::now() < deadline, "chunk 0 was never read");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Chunk 0's read is stuck; chunk 3 comes in anyway, on demand or by prefetch.
    let t = Instant::now();
    assert_eq!(mem.byte(3 * MIB as usize + 7), 4);
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(!lazy.is_done());
    // Faults wait on chunk 0 and nothing else comes in: after 3 s the monitor warns (once).
    let deadline = Instant::now() + Duration::from_secs(30);
    while lazy.info().stall_warnings == 0 {
        assert!(
            Instant::now() < deadline,
            "no stall warning: {:?}",
            lazy.info()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let info = lazy.info();
    assert_eq!(info.stall_warnings, 1, "{info:?}");
    assert!(info.chunks_waited_for >= 1, "{info:?}");
    assert!(info.ms_since_last_chunk >= 3000, "{info:?}");
    source.open.store(true, Ordering::Release);
    assert_eq!(waiter.join().unwrap(), 1);
    lazy.wait_all_loaded().unwrap();
    assert_eq!(lazy.info().chunks_waited_for, 0);
    assert!(exit.reason().is_none());
    drop(lazy);
}
