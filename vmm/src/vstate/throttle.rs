//! vCPU throttling for pre-copy that converges (like QEMU's auto-converge): while a percentage
//! is set, every vCPU sleeps that share of each [`PERIOD`]. A kicker thread sends each vCPU the
//! kick signal once a period so that even a vCPU that never leaves `KVM_RUN` on its own (a guest
//! rewriting memory in a tight loop) comes back to its run loop, which then sleeps
//! ([`Vcpu`](super::vcpu::Vcpu) calls [`ThrottleClock::due`] after every exit).
//!
//! The state is process-wide: one arkvm process runs one VM.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vmm_sys_util::signal::SIGRTMIN;

/// The throttle's period: each vCPU runs `(100 - pct)` % of it and sleeps `pct` %.
pub const PERIOD: Duration = Duration::from_millis(10);
/// The highest percentage: a throttled vCPU always runs a little.
pub const MAX_PERCENT: u8 = 99;

static PERCENT: AtomicU8 = AtomicU8::new(0);
static KICKER_RUNNING: AtomicBool = AtomicBool::new(false);
/// The vCPU threads to kick (`pthread_t`), registered by the threads themselves.
static THREADS: Mutex<Vec<libc::pthread_t>> = Mutex::new(Vec::new());

/// The percentage now set (0: not throttled).
pub fn percent() -> u8 {
    PERCENT.load(Ordering::Relaxed)
}

/// Sets the throttle to `pct` % (capped at [`MAX_PERCENT`]; 0 lifts it) and starts the kicker
/// thread if it is not running. The kicker stops by itself once the throttle is lifted.
pub fn set_percent(pct: u8) -> std::io::Result<()> {
    let pct = pct.min(MAX_PERCENT);
    PERCENT.store(pct, Ordering::Relaxed);
    if pct == 0 || KICKER_RUNNING.swap(true, Ordering::AcqRel) {
        return Ok(());
    }
    let spawned = std::thread::Builder::new()
        .name("vcpu-throttle".into())
        .spawn(kick_loop);
    if let Err(e) = spawned {
        KICKER_RUNNING.store(false, Ordering::Release);
        PERCENT.store(0, Ordering::Relaxed);
        return Err(e);
    }
    Ok(())
}

/// Lifts the throttle.
pub fn lift() {
    PERCENT.store(0, Ordering::Relaxed);
}

fn kick_loop() {
    while percent() > 0 {
        {
            let threads = snapshot::lock(&THREADS);
            for &t in threads.iter() {
                // SAFETY: `t` is a live vCPU thread: it unregisters itself (under this lock)
                // before it ends. The kick handler only sets `immediate_exit`.
                unsafe { libc::pthread_kill(t, SIGRTMIN()) };
            }
        }
        std::thread::sleep(PERIOD);
    }
    KICKER_RUNNING.store(false, Ordering::Release);
    // A throttle set again between the last check and the store above needs a kicker.
    if percent() > 0 && !KICKER_RUNNING.swap(true, Ordering::AcqRel) {
        kick_loop();
    }
}

/// Registers the calling vCPU thread for kicks until the guard is dropped.
pub fn register_current() -> Registration {
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    snapshot::lock(&THREADS).push(me);
    Registration(me)
}

/// Unregisters its vCPU thread when dropped.
pub struct Registration(libc::pthread_t);

impl Drop for Registration {
    fn drop(&mut self) {
        let mut threads = snapshot::lock(&THREADS);
        if let Some(i) = threads.iter().position(|&t| t == self.0) {
            threads.swap_remove(i);
        }
    }
}

/// A vCPU's throttle clock: when it last slept.
pub struct ThrottleClock {
    period_start: Instant,
}

impl Default for ThrottleClock {
    fn default() -> Self {
        Self::new()
    }
}

impl ThrottleClock {
    /// A clock starting now.
    pub fn new() -> Self {
        Self {
            period_start: Instant::now(),
        }
    }

    /// How long the vCPU should sleep now, if at all: once it has run its share of a period.
    pub fn due(&mut self) -> Option<Duration> {
        let pct = u32::from(percent());
        if pct == 0 {
            return None;
        }
        let run = PERIOD * (100 - pct) / 100;
        if self.period_start.elapsed() < run {
            return None;
        }
        Some(PERIOD * pct / 100)
    }

    /// Starts the next period (after the sleep).
    pub fn restart(&mut self) {
        self.period_start = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleeps_its_share_once_the_run_share_is_spent() {
        let mut c = ThrottleClock::new();
        PERCENT.store(0, Ordering::Relaxed);
        assert_eq!(c.due(), None);
        PERCENT.store(60, Ordering::Relaxed);
        c.period_start = Instant::now() - PERIOD;
        assert_eq!(c.due(), Some(PERIOD * 60 / 100));
        c.restart();
        assert_eq!(c.due(), None);
        PERCENT.store(0, Ordering::Relaxed);
    }
}
