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
    /// The bounds of the held queue: bytes, frames.
    limits: (usize, usize),
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
            limits: (HELD_BYTES_MAX, HELD_FRAMES_MAX),
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
        let (max_bytes, max_frames) = self.limits;
        if held.frames.len() >= max_frames || held.bytes + frame.len() > max_bytes {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::net::test_tap::TestTap;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn gate(tap: &TestTap, commit: &Arc<OutputCommit>, limits: (usize, usize)) -> Arc<TxGate> {
        let wake = EventFd::new(EFD_NONBLOCK).unwrap();
        let g = TxGate::new(
            Arc::new(Tap::open(&tap.name).unwrap()),
            commit.clone(),
            wake,
        );
        // Only this test holds the Arc: set the small bounds before anyone sends.
        let mut g = Arc::try_unwrap(g).ok().unwrap();
        g.limits = limits;
        let g = Arc::new(g);
        lock(&commit.gates).push(Arc::downgrade(&g));
        g
    }

    #[test]
    fn frames_are_held_per_epoch_and_released_in_order() {
        let tap = TestTap::new("g");
        let commit = OutputCommit::new();
        let g = gate(&tap, &commit, (1 << 20, 3));
        assert_eq!(
            g.send(&[1u8; 60]),
            Sent::Written,
            "off: straight to the tap"
        );
        commit.set_enabled(true);
        assert_eq!(g.send(&[2u8; 60]), Sent::Held);
        let k = commit.advance();
        assert_eq!(g.send(&[3u8; 60]), Sent::Held);
        assert_eq!(g.send(&[4u8; 60]), Sent::Held);
        // The bound: a fourth frame is refused and the gate counts the stall.
        assert_eq!(g.send(&[5u8; 60]), Sent::Full);
        assert_eq!(g.stats().held_frames, 3);
        assert_eq!(g.stats().full_stalls, 1);
        commit.release_through(k);
        let s = g.stats();
        assert_eq!(
            (s.held_frames, s.released_frames),
            (2, 1),
            "only epoch {k} goes out"
        );
        assert_eq!(
            g.wake.read().unwrap(),
            1,
            "a release after a stall wakes the TX queue"
        );
        let k2 = commit.advance();
        commit.release_through(k2);
        assert_eq!(g.stats().held_frames, 0);
        assert_eq!(g.stats().released_frames, 3);
        // Turning it off releases everything at once.
        assert_eq!(g.send(&[6u8; 60]), Sent::Held);
        commit.set_enabled(false);
        assert_eq!(g.stats().held_frames, 0);
        assert_eq!(g.send(&[7u8; 60]), Sent::Written);
        assert_eq!(g.stats().tx_errors, 0);
    }
}
