//! Where a backup's time goes, stage by stage (zero check, hash, compress, seal, store), so that
//! its throughput can be compared with the disk's: every stage adds the nanoseconds it spent and
//! the bytes it handled, from any number of threads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// The stages a new chunk passes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Recognising an all-zero chunk (every chunk pays this).
    ZeroCheck,
    /// blake3 (keyed in an encrypted repository).
    Hash,
    /// zstd.
    Compress,
    /// ChaCha20-Poly1305 (encrypted repositories only).
    Seal,
    /// The chunk store's `contains` and `put_if_absent`.
    Store,
}

const STAGES: [Stage; 5] = [
    Stage::ZeroCheck,
    Stage::Hash,
    Stage::Compress,
    Stage::Seal,
    Stage::Store,
];

impl Stage {
    /// The stage's name in logs and benchmarks.
    pub fn name(self) -> &'static str {
        match self {
            Stage::ZeroCheck => "zero-check",
            Stage::Hash => "hash",
            Stage::Compress => "compress",
            Stage::Seal => "seal",
            Stage::Store => "store",
        }
    }
}

/// Time and bytes per stage, added to from any thread.
#[derive(Default)]
pub struct StageTimes {
    nanos: [AtomicU64; 5],
    /// CPU time of the threads in the stage (what it costs without waiting for a CPU or I/O).
    cpu_nanos: [AtomicU64; 5],
    bytes: [AtomicU64; 5],
    zero_chunks: AtomicU64,
}

impl StageTimes {
    /// Runs `f` as `stage` over `bytes` bytes, and adds its time.
    pub fn time<T>(&self, stage: Stage, bytes: usize, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let c = thread_cpu_nanos();
        let r = f();
        let i = stage as usize;
        self.nanos[i].fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.cpu_nanos[i].fetch_add(thread_cpu_nanos().saturating_sub(c), Ordering::Relaxed);
        self.bytes[i].fetch_add(bytes as u64, Ordering::Relaxed);
        r
    }

    /// Counts a chunk recognised as all zeros (it was not hashed, compressed or stored again).
    pub fn count_zero_chunk(&self) {
        self.zero_chunks.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `other` into these times.
    pub fn add(&self, other: &StageTimes) {
        for i in 0..STAGES.len() {
            self.nanos[i].fetch_add(other.nanos[i].load(Ordering::Relaxed), Ordering::Relaxed);
            self.cpu_nanos[i].fetch_add(
                other.cpu_nanos[i].load(Ordering::Relaxed),
                Ordering::Relaxed,
            );
            self.bytes[i].fetch_add(other.bytes[i].load(Ordering::Relaxed), Ordering::Relaxed);
        }
        self.zero_chunks
            .fetch_add(other.zero_chunks.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// One line for the log: per stage, the bytes, the busy time and the throughput while busy
    /// (MB/s of one thread), and the zero chunks.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for (i, stage) in STAGES.iter().enumerate() {
            let ns = self.nanos[i].load(Ordering::Relaxed);
            let bytes = self.bytes[i].load(Ordering::Relaxed);
            if bytes == 0 && ns == 0 {
                continue;
            }
            let cpu = self.cpu_nanos[i].load(Ordering::Relaxed);
            let rate = |ns: u64| {
                if ns > 0 {
                    bytes as f64 * 1e3 / ns as f64
                } else {
                    0.0
                }
            };
            out.push_str(&format!(
                "{}={}B/{}us/{:.0}MB/s(cpu {:.0}MB/s) ",
                stage.name(),
                bytes,
                ns / 1000,
                rate(ns),
                rate(cpu)
            ));
        }
        out.push_str(&format!(
            "zero_chunks={}",
            self.zero_chunks.load(Ordering::Relaxed)
        ));
        out
    }
}

/// The calling thread's CPU time in nanoseconds (0 if the clock cannot be read).
fn thread_cpu_nanos() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_add_up_and_summarise() {
        let t = StageTimes::default();
        let v = t.time(Stage::Hash, 1000, || 7);
        assert_eq!(v, 7);
        t.count_zero_chunk();
        let total = StageTimes::default();
        total.add(&t);
        total.add(&t);
        let s = total.summary();
        assert!(s.contains("hash=2000B/"), "{s}");
        assert!(s.contains("zero_chunks=2"), "{s}");
        assert!(!s.contains("seal="), "{s}");
    }
}
