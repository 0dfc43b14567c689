//! The chains of the hostile campaign (`campaign.rs`): the arena layout, the PRNG, and random
//! and request-shaped descriptor chains that keep the rule of the campaign: only W (or memory
//! outside the guest) is ever offered device-writable; indirect tables live in T.

use crate::blk::{Blk, Desc, DESC_INDIRECT, DESC_NEXT, DESC_WRITE, T_FLUSH, T_GET_ID, T_IN, T_OUT};
use core::ptr::write_volatile;

pub(crate) const CA: u64 = 8 << 20;
pub(crate) const CA_LEN: u64 = 128 << 10;
pub(crate) const W: u64 = CA + CA_LEN;
pub(crate) const W_LEN: u64 = 128 << 10;
pub(crate) const CB: u64 = W + W_LEN;
pub(crate) const CB_LEN: u64 = 256 << 10;
/// Headers (256 slots of 16 bytes), then indirect tables (16 of 2 KiB).
pub(crate) const T: u64 = CB + CB_LEN;
pub(crate) const T_LEN: u64 = 64 << 10;
pub(crate) const TABLES: u64 = T + 4096;
pub(crate) const TABLE_BYTES: u64 = 2048;
/// The header slot of the good requests (random chains only read it).
pub(crate) const GOOD_HEADER: u64 = T + 16 * 255;
/// Outside every memory slot (1 TiB).
pub(crate) const OUTSIDE: u64 = 1 << 40;

pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    pub(crate) fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
}

pub(crate) fn write_header(addr: u64, kind: u32, sector: u64) {
    // SAFETY: `addr` is a header slot in T (see `fill_canaries`).
    unsafe {
        write_volatile(addr as *mut u32, kind);
        write_volatile((addr + 4) as *mut u32, 0);
        write_volatile((addr + 8) as *mut u64, sector);
    }
}

/// A length for a buffer the device only reads.
pub(crate) fn any_len(r: &mut Rng) -> u32 {
    match r.below(9) {
        0 => 0,
        1 => 1,
        2 => 16,
        3 => 512,
        4 => 4096,
        5 => u32::MAX,
        6 => 1 << 31,
        7 => r.next() as u32,
        _ => (r.below(129) * 512) as u32,
    }
}

/// A device-writable buffer: inside W (never past its end), or outside guest memory.
pub(crate) fn writable(r: &mut Rng) -> (u64, u32) {
    match r.below(10) {
        0 => (OUTSIDE + r.below(1 << 20), any_len(r)),
        // Wraps around the address space onto all of low memory, canaries included.
        1 => (u64::MAX - r.below(4096), u32::MAX - r.below(4096) as u32),
        2 => (0xD000_0000 + r.below(0x8000), any_len(r)),
        _ => {
            let off = if r.one_in(2) {
                r.below(W_LEN / 512) * 512
            } else {
                r.below(W_LEN)
            };
            let room = W_LEN - off;
            let len = match r.below(5) {
                0 => room,
                1 => 1,
                _ => u64::from(any_len(r)).min(room),
            };
            (W + off, len as u32)
        }
    }
}

/// A buffer the device only reads: anywhere, canaries and code included.
pub(crate) fn readable(r: &mut Rng) -> (u64, u32) {
    let addr = match r.below(10) {
        0 => CA + r.below(CA_LEN),
        1 => CB + r.below(CB_LEN),
        2 => W + r.below(W_LEN),
        3 => T + 16 * r.below(256),
        4 => 0x20_0000 + r.below(0x1000),
        5 => 0,
        6 => OUTSIDE,
        7 => u64::MAX - r.below(4096),
        8 => r.below(64 << 20),
        _ => r.next(),
    };
    (addr, any_len(r))
}

/// Flags with WRITE and INDIRECT resolved: INDIRECT never comes with WRITE.
pub(crate) fn random_flags(r: &mut Rng) -> u16 {
    let f = match r.below(12) {
        0 => r.next() as u16,
        1 => DESC_INDIRECT | (r.below(2) as u16),
        _ => r.below(4) as u16,
    };
    if f & DESC_INDIRECT != 0 {
        f & !DESC_WRITE
    } else {
        f
    }
}

/// A descriptor with `flags`, its buffer chosen by the rules of the module docs.
pub(crate) fn desc_for(r: &mut Rng, flags: u16, next: u16) -> Desc {
    let (addr, len) = if flags & DESC_INDIRECT != 0 {
        let table = TABLES + TABLE_BYTES * r.below(16);
        let len = match r.below(6) {
            0 => 0,
            1 => u32::MAX,
            2 => (16 * r.below(8192) + r.below(16)) as u32,
            _ => (16 * (1 + r.below(TABLE_BYTES / 16))) as u32,
        };
        if r.one_in(8) {
            (OUTSIDE, len)
        } else {
            (table, len)
        }
    } else if flags & DESC_WRITE != 0 {
        writable(r)
    } else {
        readable(r)
    };
    Desc {
        addr,
        len,
        flags,
        next,
    }
}

/// A random `next` for descriptor `i` of a table of `n`.
pub(crate) fn random_next(r: &mut Rng, i: u16, n: u16) -> u16 {
    match r.below(8) {
        0 => r.next() as u16,
        1 => i,
        2 => r.below(u64::from(i) + 1) as u16,
        3 => n,
        4..=5 => i.wrapping_add(1),
        _ => r.below(u64::from(n.max(1))) as u16,
    }
}

pub(crate) fn random_desc(r: &mut Rng, i: u16, n: u16) -> Desc {
    let flags = random_flags(r);
    let next = random_next(r, i, n);
    desc_for(r, flags, next)
}

/// Fills indirect table `k` with `n` random descriptors.
pub(crate) fn fill_table(r: &mut Rng, k: u64) {
    let n = r.below(TABLE_BYTES / 16 + 1) as u16;
    for i in 0..n {
        let d = random_desc(r, i, n);
        // SAFETY: the table lies in T (see `fill_canaries`); 16 * n <= TABLE_BYTES.
        unsafe {
            write_volatile(
                (TABLES + TABLE_BYTES * k + 16 * u64::from(i)) as *mut Desc,
                d,
            )
        };
    }
}

/// A request header in slot `h` of T with a likely or unlikely type and sector.
pub(crate) fn random_header(r: &mut Rng, h: u64, sectors: u64) -> u64 {
    let kind = match r.below(8) {
        0..=2 => T_IN,
        3..=4 => T_OUT,
        5 => T_FLUSH,
        6 => T_GET_ID,
        _ => r.next() as u32,
    };
    let sector = match r.below(6) {
        0 => sectors.saturating_sub(r.below(4)),
        1 => u64::MAX - r.below(2),
        2 => r.next(),
        _ => r.below(sectors.max(1)),
    };
    let addr = T + 16 * h;
    write_header(addr, kind, sector);
    addr
}

/// A chain shaped like a request (header, data, status) at descriptors `start..`, then
/// mutated; returns how many descriptors it took.
pub(crate) fn shaped_chain(r: &mut Rng, b: &mut Blk, start: u16, room: u16, sectors: u64) -> u16 {
    let q = b.qsize();
    let n = (2 + r.below(4) as u16).min(room);
    let slot = r.below(255);
    let header = random_header(r, slot, sectors);
    for k in 0..n {
        let i = start + k;
        let next = if k + 1 < n { i + 1 } else { 0 };
        let more = if k + 1 < n { DESC_NEXT } else { 0 };
        let mut d = if k == 0 {
            Desc {
                addr: header,
                len: 16,
                flags: more,
                next,
            }
        } else if k + 1 == n {
            let (addr, _) = writable(r);
            Desc {
                addr,
                len: 1,
                flags: DESC_WRITE,
                next,
            }
        } else {
            let write = if r.one_in(2) { DESC_WRITE } else { 0 };
            desc_for(r, write | more, next)
        };
        if d.flags & DESC_WRITE != 0 && !(W..W + W_LEN).contains(&d.addr) {
            // Keep the status byte and data inside W or outside memory: re-pick in W.
            d.addr = W + r.below(W_LEN - 1);
            d.len = d.len.min((W + W_LEN - d.addr) as u32).max(1);
        }
        b.set_desc(usize::from(i), d);
    }
    for _ in 0..r.below(3) {
        let i = start + r.below(u64::from(n)) as u16;
        let d = match r.below(4) {
            0 => random_desc(r, i, q),
            1 => {
                let flags = random_flags(r);
                desc_for(r, flags, i + 1)
            }
            2 => {
                let next = random_next(r, i, q);
                desc_for(r, DESC_NEXT, next)
            }
            _ => desc_for(r, DESC_WRITE | DESC_NEXT, start),
        };
        b.set_desc(usize::from(i), d);
    }
    n
}
