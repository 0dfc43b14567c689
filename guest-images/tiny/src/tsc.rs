//! The time-stamp counter: reading it and finding its frequency from CPUID.
//!
//! Assumption (documented in README.md): the TSC is invariant. Its frequency comes from CPUID
//! (leaf 0x15, else 0x16, else the hypervisor leaf 0x40000010), else from timing 20 ms of PIT
//! channel 2 (ports 0x42/0x43/0x61, as Linux's `pit_calibrate_tsc` does), else 2 GHz is
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
/// Calibration window in milliseconds.
const PIT_MS: u64 = 20;

/// Times `PIT_MS` of PIT channel 2 in one-shot mode with the TSC. `None` when the PIT does
/// not behave (no PIT, or its output never or instantly goes high).
fn pit_calibrate() -> Option<u64> {
    // Gate on, speaker off; channel 2, lobyte/hibyte, mode 0 (interrupt on terminal count).
    outb(0x61, (inb(0x61) & !0x02) | 0x01);
    outb(0x43, 0xB0);
    let latch = PIT_HZ * PIT_MS / 1000;
    outb(0x42, (latch & 0xff) as u8);
    outb(0x42, (latch >> 8) as u8);
    let t0 = rdtsc();
    let mut polls = 0u64;
    if inb(0x61) & 0x20 != 0 {
        return None;
    }
    loop {
        polls += 1;
        if inb(0x61) & 0x20 != 0 {
            break;
        }
        // Give up after ~1 s at 10 GHz, i.e. well past any plausible 20 ms.
        if rdtsc().wrapping_sub(t0) > 10_000_000_000 {
            return None;
        }
    }
    let t1 = rdtsc();
    // A handful of polls means the output was stuck high, not a real countdown.
    if polls < 4 {
        return None;
    }
    Some((t1 - t0) / PIT_MS)
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
    if let Some(khz) = pit_calibrate() {
        return (khz, TscSource::Pit);
    }
    (2_000_000, TscSource::Assumed)
}
