//! The time-stamp counter: reading it and finding its frequency from CPUID.
//!
//! Assumption (documented in README.md): the TSC is invariant. Its frequency comes from CPUID
//! (leaf 0x15, else 0x16, else the hypervisor leaf 0x40000010), else from the median of three
//! 10 ms windows timed against PIT channel 2's counter (ports 0x42/0x43/0x61), else 2 GHz is
//! assumed. Only the `rate_pages` throttle, bounded waits and bench figures depend on it.

use crate::serial::{inb, outb};

/// Reads the TSC.
pub fn rdtsc() -> u64 {
    // SAFETY: `rdtsc` only reads the counter (CR4.TSD is clear, so it works in CPL3).
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, 0);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// Where the TSC frequency came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TscSource {
    /// CPUID leaf 0x15 (crystal ratio).
    Leaf15,
    /// CPUID leaf 0x16 (base MHz).
    Leaf16,
    /// Hypervisor leaf 0x40000010 (kHz).
    Hypervisor,
    /// Timed against PIT channel 2.
    Pit,
    /// Nothing reported it: 2 GHz assumed.
    Assumed,
}

/// PIT input clock in Hz.
const PIT_HZ: u64 = 1_193_182;
/// Calibration window in milliseconds (three windows are timed; the median wins).
const PIT_MS: u64 = 10;

/// Latches and reads PIT channel 2's count, bracketed by TSC reads: `(count, tsc_mid, tsc_span)`.
fn pit_read() -> (u64, u64, u64) {
    let t0 = rdtsc();
    outb(0x43, 0x80);
    let lo = u64::from(inb(0x42));
    let hi = u64::from(inb(0x42));
    let t1 = rdtsc();
    (lo | (hi << 8), t0 / 2 + t1 / 2, t1 - t0)
}

/// Times about `PIT_MS` of PIT channel 2 against the TSC by reading the counter itself (so
/// the latency of starting the timer and of each port access cancels out). `None` when the
/// PIT does not count.
fn pit_calibrate() -> Option<u64> {
    // Gate on, speaker off; channel 2, lobyte/hibyte, mode 0, start at 0xFFFF (55 ms).
    outb(0x61, (inb(0x61) & !0x02) | 0x01);
    outb(0x43, 0xB0);
    outb(0x42, 0xFF);
    outb(0x42, 0xFF);
    let want = PIT_HZ * PIT_MS / 1000;
    let (c0, m0, s0) = pit_read();
    let start = rdtsc();
    loop {
        let (c1, m1, s1) = pit_read();
        let ticks = c0.wrapping_sub(c1);
        if c1 <= c0 && ticks >= want {
            // Reject samples whose bracketing reads were slow (preempted vCPU).
            if (s0 + s1) * 50 > m1 - m0 {
                return None;
            }
            return Some((m1 - m0) * PIT_HZ / ticks / 1000);
        }
        // 200 M cycles is over 40 ms even at 5 GHz: the PIT is stuck or absent.
        if c1 > c0 || rdtsc().wrapping_sub(start) > 200_000_000 {
            return None;
        }
    }
}

static mut CACHED: Option<(u64, TscSource)> = None;

/// TSC ticks per millisecond and where that figure came from (computed once).
pub fn khz() -> (u64, TscSource) {
    // SAFETY: the guest is single-threaded; this is the only access to CACHED.
    if let Some(v) = unsafe { core::ptr::read(core::ptr::addr_of!(CACHED)) } {
        return v;
    }
    let v = find_khz();
    // SAFETY: as above.
    unsafe { core::ptr::write(core::ptr::addr_of_mut!(CACHED), Some(v)) };
    v
}

fn find_khz() -> (u64, TscSource) {
    let max = cpuid(0).0;
    if max >= 0x15 {
        let (den, num, crystal, _) = cpuid(0x15);
        if den != 0 && num != 0 && crystal != 0 {
            return (
                u64::from(crystal) * u64::from(num) / u64::from(den) / 1000,
                TscSource::Leaf15,
            );
        }
    }
    if max >= 0x16 {
        let mhz = cpuid(0x16).0 & 0xffff;
        if mhz != 0 {
            return (u64::from(mhz) * 1000, TscSource::Leaf16);
        }
    }
    if cpuid(0x4000_0000).0 >= 0x4000_0010 {
        let khz = cpuid(0x4000_0010).0;
        if khz != 0 {
            return (u64::from(khz), TscSource::Hypervisor);
        }
    }
    // The vCPU can be descheduled inside a window (shared hosts), which skews one sample
    // either way; the median of three is robust to one bad window.
    let mut samples = [0u64; 3];
    let mut n = 0;
    for attempt in 0..6 {
        if attempt == 1 && n == 0 {
            break; // the first attempt failed outright: no usable PIT
        }
        if let Some(v) = pit_calibrate() {
            samples[n] = v;
            n += 1;
            if n == samples.len() {
                samples.sort_unstable();
                return (samples[1], TscSource::Pit);
            }
        }
    }
    (2_000_000, TscSource::Assumed)
}
