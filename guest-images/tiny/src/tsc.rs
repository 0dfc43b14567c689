//! The time-stamp counter: reading it and finding its frequency from CPUID.
//!
//! Assumption (documented in README.md): the TSC is invariant and runs at the frequency CPUID
//! reports (leaf 0x15, else 0x16, else the hypervisor leaf 0x40000010); if none reports it,
//! 2 GHz is assumed. Only the `rate_pages` throttle and bounded waits depend on it.

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
    /// Nothing reported it: 2 GHz assumed.
    Assumed,
}

/// TSC ticks per millisecond and where that figure came from.
pub fn khz() -> (u64, TscSource) {
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
    (2_000_000, TscSource::Assumed)
}
