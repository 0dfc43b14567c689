//! A [`MemorySink`] that takes chunks from the copier at memory speed and has a pool of worker
//! threads store them through the sink behind it (for a backup point: zero check, hash,
//! compress, seal and store, see [`crate::repo::ObjectWriter`]), so that a copier's I/O and CPU
//! work run in parallel and off the copy path. Works over any sink, so any chunk store.
//!
//! ```text
//!   copier ──write_chunk (memcpy into a free buffer)──▶ bounded queue ──▶ worker 1..N ──▶ inner sink
//! ```
//!
//! Chunk `i` always goes to worker `i % N`, whose queue is first in, first out: a chunk written
//! twice (pre-copy's re-copy rounds) is stored in the order it was written, so the later bytes
//! win. Each queue holds at most `depth` chunks, so a copier faster than the workers waits for
//! a free slot (memory stays bounded). The first error a worker meets is kept: later `write_chunk`s
//! fail at once and [`PipelineSink::finish`] returns it.
//!
//! Worker threads are named `backup-worker`; they use `futex` (the queue), `mmap`/`munmap`
//! (buffers), and what the inner sink uses (for a local store: `openat`, `write`, `fsync`,
//! `renameat`, `linkat`, `unlinkat`, `newfstatat`).

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::error::lock;
use crate::sink::{MemorySink, MemorySinkError};

struct Job {
    index: u64,
    data: Vec<u8>,
}

struct Shared {
    inner: Arc<dyn MemorySink>,
    error: Mutex<Option<MemorySinkError>>,
    /// Buffers to reuse.
    free: Mutex<Vec<Vec<u8>>>,
}

/// Stores chunks through `inner` on a pool of worker threads.
pub struct PipelineSink {
    shared: Arc<Shared>,
    /// One queue per worker; emptied by `finish`.
    tx: Mutex<Vec<SyncSender<Job>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl PipelineSink {
    /// Starts `workers` threads (at least 1) storing through `inner`, with at most `depth`
    /// chunks queued per worker. The workers run at nice value `nice` (added to the caller's,
    /// by `setpriority`), so that a live guest's vCPUs go first on a busy host.
    pub fn new(
        inner: Arc<dyn MemorySink>,
        workers: usize,
        depth: usize,
        nice: i32,
    ) -> Result<Self, MemorySinkError> {
        let shared = Arc::new(Shared {
            inner,
            error: Mutex::new(None),
            free: Mutex::new(Vec::new()),
        });
        let mut handles = Vec::new();
        let mut senders = Vec::new();
        for _ in 0..workers.max(1) {
            let (tx, rx) = sync_channel::<Job>(depth.max(1));
            let s = shared.clone();
            let spawned = std::thread::Builder::new()
                .name("backup-worker".into())
                .spawn(move || {
                    lower_priority(nice);
                    work(&s, &rx)
                });
            match spawned {
                Ok(h) => {
                    handles.push(h);
                    senders.push(tx);
                }
                Err(e) => {
                    drop(senders);
                    for h in handles {
                        let _ = h.join();
                    }
                    return Err(MemorySinkError::Spawn(e));
                }
            }
        }
        Ok(Self {
            shared,
            tx: Mutex::new(senders),
            workers: Mutex::new(handles),
        })
    }

    /// Waits until every queued chunk is stored and the workers have ended; returns the first
    /// error any of them met.
    pub fn finish(&self) -> Result<(), MemorySinkError> {
        self.stop();
        match lock(&self.shared.error).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn stop(&self) {
        drop(std::mem::take(&mut *lock(&self.tx)));
        let workers = std::mem::take(&mut *lock(&self.workers));
        for w in workers {
            let _ = w.join();
        }
    }
}

/// Lowers the calling thread's scheduling priority by `nice` (best effort: a failure leaves it
/// as it was).
pub fn lower_priority(nice: i32) {
    if nice <= 0 {
        return;
    }
    // SAFETY: plain syscalls on the calling thread; they touch no memory of ours.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        libc::setpriority(libc::PRIO_PROCESS, tid, (now + nice).min(19));
    }
}

fn work(shared: &Shared, rx: &Receiver<Job>) {
    loop {
        let job = match rx.recv() {
            Ok(j) => j,
            Err(_) => return,
        };
        let failed = lock(&shared.error).is_some();
        if !failed {
            if let Err(e) = shared.inner.write_chunk(job.index, &job.data) {
                lock(&shared.error).get_or_insert(e);
            }
        }
        lock(&shared.free).push(job.data);
    }
}

impl MemorySink for PipelineSink {
    fn chunk_size(&self) -> u64 {
        self.shared.inner.chunk_size()
    }

    fn chunk_count(&self) -> u64 {
        self.shared.inner.chunk_count()
    }

    fn write_chunk(&self, index: u64, data: &[u8]) -> Result<(), MemorySinkError> {
        if let Some(e) = lock(&self.shared.error).as_ref() {
            return Err(MemorySinkError::PipelineFailed {
                earlier: crate::error_chain(e),
            });
        }
        let mut buf = lock(&self.shared.free).pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(data);
        let tx = {
            let senders = lock(&self.tx);
            let n = senders.len() as u64;
            n.checked_sub(1)
                .and_then(|_| senders.get((index % n) as usize).cloned())
        };
        let failed = || MemorySinkError::PipelineFailed {
            earlier: lock(&self.shared.error)
                .as_ref()
                .map_or_else(|| "a backup worker ended".into(), |e| crate::error_chain(e)),
        };
        match tx {
            Some(tx) => tx.send(Job { index, data: buf }).map_err(|_| failed()),
            None => Err(failed()),
        }
    }

    fn reuse_unchanged(&self, index: u64) -> Result<bool, MemorySinkError> {
        self.shared.inner.reuse_unchanged(index)
    }
}

impl Drop for PipelineSink {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Records chunks; refuses chunk `fail_at`.
    struct Recorder {
        seen: Mutex<Vec<(u64, Vec<u8>)>>,
        fail_at: u64,
        calls: AtomicU64,
    }

    impl MemorySink for Recorder {
        fn chunk_size(&self) -> u64 {
            4
        }
        fn chunk_count(&self) -> u64 {
            100
        }
        fn write_chunk(&self, index: u64, data: &[u8]) -> Result<(), MemorySinkError> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            if index == self.fail_at {
                return Err(MemorySinkError::PipelineFailed {
                    earlier: "test".into(),
                });
            }
            lock(&self.seen).push((index, data.to_vec()));
            Ok(())
        }
        fn reuse_unchanged(&self, _index: u64) -> Result<bool, MemorySinkError> {
            Ok(false)
        }
    }

    fn recorder(fail_at: u64) -> Arc<Recorder> {
        Arc::new(Recorder {
            seen: Mutex::new(Vec::new()),
            fail_at,
            calls: AtomicU64::new(0),
        })
    }

    #[test]
    fn every_chunk_arrives_once_with_its_bytes() {
        let rec = recorder(u64::MAX);
        let p = PipelineSink::new(rec.clone(), 3, 2, 0).unwrap();
        for i in 0..100u64 {
            p.write_chunk(i, &[i as u8; 4]).unwrap();
        }
        p.finish().unwrap();
        let mut seen = lock(&rec.seen).clone();
        seen.sort();
        assert_eq!(seen.len(), 100);
        for (i, (index, data)) in seen.iter().enumerate() {
            assert_eq!(*index, i as u64);
            assert_eq!(data, &vec![i as u8; 4]);
        }
    }

    #[test]
    fn a_chunk_written_twice_keeps_its_last_bytes() {
        let rec = recorder(u64::MAX);
        let p = PipelineSink::new(rec.clone(), 4, 1, 5).unwrap();
        for round in 0..20u8 {
            for i in 0..8u64 {
                p.write_chunk(i, &[round; 4]).unwrap();
            }
        }
        p.finish().unwrap();
        let seen = lock(&rec.seen).clone();
        for i in 0..8u64 {
            let last = seen.iter().rev().find(|(x, _)| *x == i).unwrap();
            assert_eq!(last.1, vec![19u8; 4], "chunk {i}");
        }
    }

    #[test]
    fn a_worker_error_is_returned_by_finish_and_stops_later_writes() {
        let rec = recorder(5);
        let p = PipelineSink::new(rec.clone(), 2, 1, 0).unwrap();
        for i in 0..100u64 {
            if p.write_chunk(i, &[0; 4]).is_err() {
                break;
            }
        }
        assert!(p.finish().is_err(), "the worker's error comes back");
        assert!(
            rec.calls.load(Ordering::Relaxed) < 100,
            "chunks after the error are not stored"
        );
        assert!(p.write_chunk(0, &[0; 4]).is_err(), "finished");
    }
}
