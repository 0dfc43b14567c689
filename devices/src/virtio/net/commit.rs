//! DR output commit: frames the guest transmits are held, tagged with the checkpoint epoch they
//! were sent in, and released to the tap only once a checkpoint taken after them is committed
//! at the DR site.
//!
//! The epoch is one counter for the whole VM. [`OutputCommit::advance`] is called just before a
//! DR checkpoint's instant and returns `k`: every frame tagged `<= k` left the TX ring before
//! the instant, so the checkpoint's guest state includes having sent it. When that checkpoint
//! is committed, [`OutputCommit::release_through`]`(k)` writes those frames to their taps.
//! Frames the device takes from the ring between `advance` and the instant get `k + 1`, which
//! only releases them one checkpoint later than needed.
//!
//! Memory is bounded per device: at most [`HELD_BYTES_MAX`] bytes or [`HELD_FRAMES_MAX`]
//! frames. At the bound the device stops taking frames off the TX ring (the guest sees a full
//! ring, as on a slow link) until a release makes room; nothing is dropped.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use vmm_sys_util::eventfd::EventFd;

use super::tap::Tap;
use snapshot::lock;

/// Most bytes of frames held per device.
pub const HELD_BYTES_MAX: usize = 32 << 20;
/// Most frames held per device.
pub const HELD_FRAMES_MAX: usize = 65_536;

struct Held {
    epoch: u64,
    at: Instant,
    frame: Vec<u8>,
}

#[derive(Default)]
struct HeldQueue {
    frames: VecDeque<Held>,
    bytes: usize,
    /// Set when the device stopped taking TX frames because the queue was full.
    blocked: bool,
}

/// What one device's gate has done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GateStats {
    /// Frames held right now.
    pub held_frames: u64,
    /// Bytes held right now.
    pub held_bytes: u64,
    /// Frames released after being held.
    pub released_frames: u64,
    /// The longest a released frame was held, in microseconds (since start).
    pub release_lag_max_us: u64,
    /// The hold time of the most recently released frame, in microseconds.
    pub release_lag_last_us: u64,
    /// Times the device stopped taking TX frames because the held queue was full.
    pub full_stalls: u64,
    /// Frames the tap refused (written and lost).
    pub tx_errors: u64,
}

/// The TX side of one device: its tap and the frames held for it.
pub struct TxGate {
    tap: Arc<Tap>,
    commit: Arc<OutputCommit>,
    held: Mutex<HeldQueue>,
    stats: Mutex<GateStats>,
    /// Signalled when a release made room again (the device's TX queue event).
    wake: EventFd,
}

/// What happened to a frame handed to the gate.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    /// Written to the tap (or lost there; counted).
    Written,
    /// Held until a checkpoint covers it.
    Held,
    /// Not taken: the held queue is full; retry after a release.
    Full,
}

impl TxGate {
    /// The gate of a device writing to `tap`; `wake` is signalled when a blocked device may
    /// take frames again.
    pub fn new(tap: Arc<Tap>, commit: Arc<OutputCommit>, wake: EventFd) -> Arc<Self> {
        let gate = Arc::new(Self {
            tap,
            commit: commit.clone(),
            held: Mutex::new(HeldQueue::default()),
            stats: Mutex::new(GateStats::default()),
            wake,
        });
        lock(&commit.gates).push(Arc::downgrade(&gate));
        gate
    }

    /// The tap.
    pub fn tap(&self) -> &Arc<Tap> {
        &self.tap
    }

    fn write(&self, frame: &[u8]) {
        if let Err(e) = self.tap.write_frame(frame) {
            tracing::debug!(
                "tap {}: frame of {} bytes lost: {e}",
                self.tap.name(),
                frame.len()
            );
            lock(&self.stats).tx_errors += 1;
        }
    }

    /// Sends one frame (without its virtio-net header): straight to the tap, or held while
    /// output commit is on.
    pub fn send(&self, frame: &[u8]) -> Sent {
        let mut held = lock(&self.held);
        if !self.commit.is_enabled() && held.frames.is_empty() {
            drop(held);
            self.write(frame);
            return Sent::Written;
        }
        if held.frames.len() >= HELD_FRAMES_MAX || held.bytes + frame.len() > HELD_BYTES_MAX {
            if !held.blocked {
                held.blocked = true;
                lock(&self.stats).full_stalls += 1;
            }
            return Sent::Full;
        }
        held.bytes += frame.len();
        held.frames.push_back(Held {
            epoch: self.commit.epoch(),
            at: Instant::now(),
            frame: frame.to_vec(),
        });
        if !self.commit.is_enabled() {
            // Output commit was just turned off: keep the order, flush what is held.
            drop(held);
            self.release_through(u64::MAX);
        }
        Sent::Held
    }

    /// Writes every held frame of epoch `<= epoch`, oldest first.
    fn release_through(&self, epoch: u64) {
        let mut held = lock(&self.held);
        let mut n = 0u64;
        let mut last_lag = None;
        let mut max_lag = 0u64;
        while held.frames.front().is_some_and(|h| h.epoch <= epoch) {
            let Some(h) = held.frames.pop_front() else {
                break;
            };
            held.bytes -= h.frame.len();
            let lag = h.at.elapsed().as_micros() as u64;
            max_lag = max_lag.max(lag);
            last_lag = Some(lag);
            self.write(&h.frame);
            n += 1;
        }
        let unblock = std::mem::take(&mut held.blocked);
        drop(held);
        if n > 0 {
            let mut s = lock(&self.stats);
            s.released_frames += n;
            s.release_lag_max_us = s.release_lag_max_us.max(max_lag);
            s.release_lag_last_us = last_lag.unwrap_or(s.release_lag_last_us);
        }
        if unblock {
            if let Err(e) = self.wake.write(1) {
                tracing::warn!("tap {}: cannot wake the TX queue: {e}", self.tap.name());
            }
        }
    }

    /// The gate's counters.
    pub fn stats(&self) -> GateStats {
        let held = lock(&self.held);
        let mut s = *lock(&self.stats);
        s.held_frames = held.frames.len() as u64;
        s.held_bytes = held.bytes as u64;
        s
    }
}

/// The output-commit switch and epoch counter shared by every network device of a VM.
#[derive(Default)]
pub struct OutputCommit {
    enabled: AtomicBool,
    epoch: AtomicU64,
    gates: Mutex<Vec<std::sync::Weak<TxGate>>>,
}

impl OutputCommit {
    /// A switch that is off.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Whether frames are held.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    /// Turns holding on or off; turning it off releases everything held.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::SeqCst);
        if !on {
            self.release_through(u64::MAX);
        }
    }

    /// The current epoch (what a frame sent now is tagged with).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Call just before a checkpoint's instant: returns `k`, the newest epoch that checkpoint
    /// covers, and starts epoch `k + 1`.
    pub fn advance(&self) -> u64 {
        self.epoch.fetch_add(1, Ordering::SeqCst)
    }

    /// A checkpoint covering epoch `k` was committed: release every frame tagged `<= k`.
    pub fn release_through(&self, k: u64) {
        let gates: Vec<_> = lock(&self.gates)
            .iter()
            .filter_map(|g| g.upgrade())
            .collect();
        for g in gates {
            g.release_through(k);
        }
    }

    /// Frames held in all devices.
    pub fn held_frames(&self) -> u64 {
        lock(&self.gates)
            .iter()
            .filter_map(|g| g.upgrade())
            .map(|g| g.stats().held_frames)
            .sum()
    }
}
