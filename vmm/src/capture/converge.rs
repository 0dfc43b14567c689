//! When pre-copy rounds stop, and how hard the vCPUs are throttled meanwhile (auto-converge;
//! `docs/precopy.md`). Each round's dirty set is compared with what the round before it copied:
//! a set that did not shrink to half of it means the guest dirties memory faster than half the
//! copy rate, so the throttle goes up ([`FIRST_PCT`], then [`STEP_PCT`] a round, up to
//! [`MAX_PERCENT`](crate::vstate::throttle::MAX_PERCENT)). Rounds stop when the dirty set would
//! copy within the final-pause target at the measured copy rate, or after the round limit.
//!
//! Settings come from the VMM process's environment: `ARKVM_PRECOPY_THROTTLE=off` turns the
//! throttle off, `ARKVM_PRECOPY_MAX_ROUNDS` (default [`MAX_ROUNDS`]) and
//! `ARKVM_PRECOPY_TARGET_MS` (default [`TARGET_PAUSE_MS`]) change the limits.

use std::time::Duration;

use super::status::PrecopyStats;
use crate::vstate::throttle;

/// The default round limit after the first full copy.
pub const MAX_ROUNDS: u32 = 8;
/// The default final-pause target: the estimated time to copy the last dirty set.
pub const TARGET_PAUSE_MS: u64 = 50;
/// Dirty chunks few enough to copy in the final pause whatever the rate.
pub const CONVERGED_CHUNKS: usize = 16;
/// The first throttle step, in percent.
pub const FIRST_PCT: u8 = 20;
/// The step for every further round that does not shrink enough.
pub const STEP_PCT: u8 = 10;

/// The round controller of one pre-copy snapshot.
pub struct Converge {
    stats: PrecopyStats,
    copied_bytes: u64,
    copy_time: Duration,
    last_copied: u64,
}

impl Converge {
    /// A controller with the settings of the environment.
    pub fn from_env() -> Self {
        let env = |k: &str| std::env::var(k).ok();
        let throttle_enabled = !matches!(
            env("ARKVM_PRECOPY_THROTTLE").as_deref(),
            Some("off" | "0" | "false" | "no")
        );
        let max_rounds = env("ARKVM_PRECOPY_MAX_ROUNDS")
            .and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or(MAX_ROUNDS);
        let target_pause_ms = env("ARKVM_PRECOPY_TARGET_MS")
            .and_then(|v| v.parse().ok())
            .unwrap_or(TARGET_PAUSE_MS);
        Self::new(throttle_enabled, max_rounds, target_pause_ms)
    }

    /// A controller with these settings.
    pub fn new(throttle_enabled: bool, max_rounds: u32, target_pause_ms: u64) -> Self {
        Self {
            stats: PrecopyStats {
                throttle_enabled,
                max_rounds,
                target_pause_ms,
                ..PrecopyStats::default()
            },
            copied_bytes: 0,
            copy_time: Duration::ZERO,
            last_copied: 0,
        }
    }

    /// The round limit.
    pub fn max_rounds(&self) -> u32 {
        self.stats.max_rounds
    }

    /// Records a copy of `bytes` that took `time` (the full copy or a round).
    pub fn copied(&mut self, bytes: u64, time: Duration) {
        self.copied_bytes += bytes;
        self.copy_time += time;
        self.last_copied = bytes;
        let secs = self.copy_time.as_secs_f64();
        if secs > 0.0 {
            self.stats.copy_rate_bps = (self.copied_bytes as f64 / secs) as u64;
        }
    }

    /// Whether a round that found `chunks` dirty chunks (`bytes` in all) may end the rounds:
    /// the rest copies within the final-pause target.
    pub fn converged(&mut self, chunks: usize, bytes: u64) -> bool {
        self.stats.final_dirty_bytes = bytes;
        if chunks <= CONVERGED_CHUNKS {
            return true;
        }
        let rate = self.stats.copy_rate_bps;
        rate > 0 && bytes.saturating_mul(1000) / rate <= self.stats.target_pause_ms
    }

    /// The throttle after a round that found `bytes` dirty and did not converge: raised when
    /// they are more than half of what the round before copied. Returns the new percentage
    /// when it changed.
    pub fn next_throttle(&mut self, bytes: u64) -> Option<u8> {
        if !self.stats.throttle_enabled || bytes.saturating_mul(2) <= self.last_copied {
            return None;
        }
        let now = self.stats.throttle_pct;
        let next = if now == 0 {
            FIRST_PCT
        } else {
            now.saturating_add(STEP_PCT).min(throttle::MAX_PERCENT)
        };
        if next == now {
            return None;
        }
        self.stats.throttle_pct = next;
        Some(next)
    }

    /// What the status reports.
    pub fn stats(&self) -> PrecopyStats {
        self.stats.clone()
    }
}

/// Lifts the vCPU throttle when dropped, on every way out of the pre-copy worker.
pub struct LiftOnDrop;

impl Drop for LiftOnDrop {
    fn drop(&mut self) {
        throttle::lift();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn throttle_rises_while_the_dirty_set_does_not_shrink() {
        let mut c = Converge::new(true, 8, 50);
        c.copied(100 * MIB, Duration::from_secs(1));
        assert!(!c.converged(1000, 90 * MIB));
        assert_eq!(c.next_throttle(90 * MIB), Some(FIRST_PCT));
        c.copied(90 * MIB, Duration::from_millis(900));
        assert_eq!(c.next_throttle(80 * MIB), Some(FIRST_PCT + STEP_PCT));
        c.copied(80 * MIB, Duration::from_millis(800));
        // Shrank to under half: the throttle stays.
        assert_eq!(c.next_throttle(30 * MIB), None);
        for _ in 0..20 {
            c.copied(80 * MIB, Duration::from_millis(800));
            c.next_throttle(80 * MIB);
        }
        assert_eq!(c.stats().throttle_pct, throttle::MAX_PERCENT);
    }

    #[test]
    fn converges_when_the_rest_copies_within_the_target() {
        let mut c = Converge::new(true, 8, 50);
        c.copied(100 * MIB, Duration::from_secs(1));
        // 100 MiB/s: 5 MiB copies in 50 ms, 6 MiB does not.
        assert!(c.converged(1000, 5 * MIB));
        assert!(!c.converged(1000, 6 * MIB));
        assert!(c.converged(CONVERGED_CHUNKS, 6 * MIB));
        assert_eq!(c.stats().final_dirty_bytes, 6 * MIB);
    }

    #[test]
    fn throttle_off_never_throttles() {
        let mut c = Converge::new(false, 8, 50);
        c.copied(100 * MIB, Duration::from_secs(1));
        assert_eq!(c.next_throttle(100 * MIB), None);
        assert_eq!(c.stats().throttle_pct, 0);
    }
}
