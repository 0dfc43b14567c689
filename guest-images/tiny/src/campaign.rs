//! The hostile campaign for the disk (`arkvm.mode=campaign`): round after round of random and
//! adversarial descriptor chains on disk 0, with canary regions of guest memory that the
//! device must never write.
//!
//! Memory at 8 MiB (the arena) is laid out as canary A (128 KiB), W (128 KiB), canary B
//! (256 KiB), T (64 KiB). Only W is ever offered to the device as a writable buffer (or
//! addresses outside guest memory, including ranges that would wrap around the address space).
//! T holds request headers and indirect tables, which the device only reads; its checksum is
//! taken after it is written and checked after the round. Chains may name the canaries, T and
//! the guest's code as device-readable buffers. The canaries are checked word by word every
//! round. The queue size, chains, flags, next indexes, heads, available index and notifications
//! are random; a device that reports DEVICE_NEEDS_RESET is reset; now and then a good request
//! must still work.

use crate::blk::{Blk, Desc, DESC_INDIRECT, DESC_NEXT, DESC_WRITE, S_OK, T_FLUSH, T_GET_ID, T_IN};
use crate::blk::{SECTOR, T_OUT};
use crate::virtio_mmio::{reg, status, Mmio};
use crate::{gprintln, tsc};
use core::ptr::{read_volatile, write_volatile};

const CA: u64 = 8 << 20;
const CA_LEN: u64 = 128 << 10;
const W: u64 = CA + CA_LEN;
const W_LEN: u64 = 128 << 10;
const CB: u64 = W + W_LEN;
const CB_LEN: u64 = 256 << 10;
/// Headers (256 slots of 16 bytes), then indirect tables (16 of 2 KiB).
const T: u64 = CB + CB_LEN;
const T_LEN: u64 = 64 << 10;
const TABLES: u64 = T + 4096;
const TABLE_BYTES: u64 = 2048;
/// The header slot of the good requests (random chains only read it).
const GOOD_HEADER: u64 = T + 16 * 255;
/// Outside every memory slot (1 TiB).
const OUTSIDE: u64 = 1 << 40;
/// How long a round waits for the device (then it is reset and the round counts as a timeout).
const WAIT_MS: u64 = 2000;
/// How long a good request may take before it counts as failed (generous: loaded hosts).
const GOOD_WAIT_MS: u64 = 30_000;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
}

/// The canary word at byte offset `off` of the arena.
fn canary_word(seed: u64, off: u64) -> u64 {
    Rng(seed ^ off.wrapping_mul(0x2545_F491_4F6C_DD1D)).next()
}

fn canaries() -> [(u64, u64); 2] {
    [(CA, CA_LEN), (CB, CB_LEN)]
}

fn fill_canaries(seed: u64) {
    for (base, len) in canaries() {
        for off in (0..len).step_by(8) {
            // SAFETY: the arena lies in guest RAM (the test gives 64 MiB), identity-mapped for
            // CPL3 by `paging::map_memory`; nothing else in the guest uses it.
            unsafe { write_volatile((base + off) as *mut u64, canary_word(seed, base + off)) };
        }
    }
}

/// The address of the first changed canary word, if any.
fn check_canaries(seed: u64) -> Option<u64> {
    for (base, len) in canaries() {
        for off in (0..len).step_by(8) {
            // SAFETY: as in `fill_canaries`.
            let v = unsafe { read_volatile((base + off) as *const u64) };
            if v != canary_word(seed, base + off) {
                return Some(base + off);
            }
        }
    }
    None
}

fn t_checksum() -> u64 {
    let mut h = 0xCBF2_9CE4_8422_2325u64;
    for off in (0..T_LEN).step_by(8) {
        // SAFETY: as in `fill_canaries`.
        let v = unsafe { read_volatile((T + off) as *const u64) };
        h = (h ^ v).wrapping_mul(0x0100_0000_01B3).rotate_left(5);
    }
    h
}

fn write_header(addr: u64, kind: u32, sector: u64) {
    // SAFETY: `addr` is a header slot in T (see `fill_canaries`).
    unsafe {
        write_volatile(addr as *mut u32, kind);
        write_volatile((addr + 4) as *mut u32, 0);
        write_volatile((addr + 8) as *mut u64, sector);
    }
}

/// A length for a buffer the device only reads.
fn any_len(r: &mut Rng) -> u32 {
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
fn writable(r: &mut Rng) -> (u64, u32) {
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
fn readable(r: &mut Rng) -> (u64, u32) {
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
fn random_flags(r: &mut Rng) -> u16 {
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
fn desc_for(r: &mut Rng, flags: u16, next: u16) -> Desc {
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
fn random_next(r: &mut Rng, i: u16, n: u16) -> u16 {
    match r.below(8) {
        0 => r.next() as u16,
        1 => i,
        2 => r.below(u64::from(i) + 1) as u16,
        3 => n,
        4..=5 => i.wrapping_add(1),
        _ => r.below(u64::from(n.max(1))) as u16,
    }
}

fn random_desc(r: &mut Rng, i: u16, n: u16) -> Desc {
    let flags = random_flags(r);
    let next = random_next(r, i, n);
    desc_for(r, flags, next)
}

/// Fills indirect table `k` with `n` random descriptors.
fn fill_table(r: &mut Rng, k: u64) {
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
fn random_header(r: &mut Rng, h: u64, sectors: u64) -> u64 {
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
fn shaped_chain(r: &mut Rng, b: &mut Blk, start: u16, room: u16, sectors: u64) -> u16 {
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

/// Counts of a campaign.
#[derive(Default)]
struct Tally {
    rounds: u64,
    resets: u64,
    driver_resets: u64,
    answered: u64,
    timeouts: u64,
    good_ok: u64,
    good_bad: u64,
    bad_used: u64,
}

/// Waits until `want` more used entries arrived or the device asks for a reset; returns
/// (answered, needs_reset, timed_out).
fn wait_round(b: &mut Blk, want: u64, ticks: u64, bad_used: &mut u64) -> (u64, bool, bool) {
    let t0 = tsc::rdtsc();
    let mut got = 0;
    let mut spins = 0u64;
    loop {
        while let Some(c) = b.poll_used() {
            got += 1;
            if c.id >= u32::from(b.qsize()) {
                *bad_used += 1;
                gprintln!("CAMPAIGN BAD-USED id={} len={}", c.id, c.len);
            }
        }
        if got >= want {
            return (got, false, false);
        }
        spins += 1;
        if spins % 256 == 0 {
            if b.mmio().status() & status::NEEDS_RESET != 0 {
                return (got, true, false);
            }
            if tsc::rdtsc().wrapping_sub(t0) > ticks {
                return (got, false, true);
            }
        }
        core::hint::spin_loop();
    }
}

/// One good request on descriptors 0..2 (header in T, data and status in W); its status, or
/// None when it was not answered in time.
fn good_io(b: &mut Blk, kind: u32, sector: u64, data: u64, ticks: u64) -> Option<u8> {
    write_header(GOOD_HEADER, kind, sector);
    let st = W + W_LEN - 1;
    // SAFETY: the status byte lies in W (see `fill_canaries`).
    unsafe { write_volatile(st as *mut u8, 0xFF) };
    let dflags = if kind == T_IN { DESC_WRITE } else { 0 };
    b.set_desc(
        0,
        Desc {
            addr: GOOD_HEADER,
            len: 16,
            flags: DESC_NEXT,
            next: 1,
        },
    );
    b.set_desc(
        1,
        Desc {
            addr: data,
            len: 4096,
            flags: dflags | DESC_NEXT,
            next: 2,
        },
    );
    b.set_desc(
        2,
        Desc {
            addr: st,
            len: 1,
            flags: DESC_WRITE,
            next: 0,
        },
    );
    b.push_avail(0);
    b.notify();
    let mut ignored = 0;
    let (got, _, _) = wait_round(b, 1, ticks, &mut ignored);
    // SAFETY: as above.
    (got == 1).then(|| unsafe { read_volatile(st as *const u8) })
}

/// Writes a page of `pattern` at `sector` and reads it back into another place of W.
fn good_roundtrip(b: &mut Blk, sector: u64, pattern: u8, ticks: u64) -> bool {
    let (src, dst) = (W + 0x1000, W + 0x3000);
    for i in 0..4096u64 {
        // SAFETY: both pages lie in W.
        unsafe {
            write_volatile((src + i) as *mut u8, pattern ^ i as u8);
            write_volatile((dst + i) as *mut u8, 0);
        }
    }
    let w = good_io(b, T_OUT, sector, src, ticks);
    let rd = good_io(b, T_IN, sector, dst, ticks);
    // SAFETY: as above.
    let same =
        (0..4096u64).all(|i| unsafe { read_volatile((dst + i) as *const u8) } == pattern ^ i as u8);
    w == Some(S_OK) && rd == Some(S_OK) && same
}

fn open(mmio: Mmio, r: &mut Rng) -> Option<Blk> {
    let limit = 2usize << r.below(6);
    match Blk::init_sized(mmio, 0, 0, limit) {
        Ok(b) => Some(b),
        Err(e) => {
            gprintln!("CAMPAIGN INIT-FAILED {e}");
            None
        }
    }
}

/// Runs the campaign on `disk` for `rounds` rounds or `seconds` seconds (whichever ends
/// first), printing progress every `every` rounds; returns whether the canaries held and the
/// final good request worked.
pub fn run(disk: Mmio, seed: u64, rounds: u64, seconds: u64, every: u64) -> bool {
    let (khz, _) = tsc::khz();
    let ticks = khz * WAIT_MS;
    let good_ticks = khz * GOOD_WAIT_MS;
    let end = tsc::rdtsc().wrapping_add(khz.saturating_mul(seconds.saturating_mul(1000)));
    let mut r = Rng(seed);
    fill_canaries(seed);
    gprintln!("CAMPAIGN START seed={seed} rounds={rounds} seconds={seconds}");
    let mut t = Tally::default();
    let mut dev: Option<Blk> = None;
    let mut canary_bad = None;
    while t.rounds < rounds && tsc::rdtsc() < end {
        if dev.is_none() {
            dev = open(disk, &mut r);
        }
        let Some(b) = dev.as_mut() else { break };
        let sectors = b.capacity() / SECTOR;
        let q = b.qsize();
        for k in 0..16 {
            if r.one_in(4) {
                fill_table(&mut r, k);
            }
        }
        let mut heads = [0u16; 4];
        let nheads = 1 + r.below(4) as usize;
        let mut start = 0u16;
        for h in heads.iter_mut().take(nheads) {
            *h = start % q;
            if start >= q {
                continue;
            }
            if r.one_in(3) {
                let n = 1 + r.below(u64::from(q - start)) as u16;
                for i in start..start + n {
                    let d = random_desc(&mut r, i, q);
                    b.set_desc(usize::from(i), d);
                }
                start += n;
            } else {
                start += shaped_chain(&mut r, b, start, q - start, sectors);
            }
        }
        let sum_t = t_checksum();
        let before = b.avail_idx();
        for &h in &heads[..nheads] {
            let head = match r.below(16) {
                0 => r.next() as u16,
                1 => q + r.below(4) as u16,
                _ => h,
            };
            b.push_avail(head);
        }
        if r.one_in(16) {
            let bogus = r.next() as u16;
            b.set_avail_idx(bogus);
        }
        let delta = u64::from(b.avail_idx().wrapping_sub(before));
        if r.one_in(16) {
            b.mmio()
                .write(reg::QUEUE_NOTIFY, 1 + r.below(0xFFFF) as u32);
        }
        b.notify();
        let want = if delta <= u64::from(q) {
            delta
        } else {
            u64::MAX
        };
        let (got, mut needs_reset, timed_out) = wait_round(b, want, ticks, &mut t.bad_used);
        // A device may return a chain and then find the queue broken.
        needs_reset |= b.mmio().status() & status::NEEDS_RESET != 0;
        t.answered += got;
        t.rounds += 1;
        // Checked before a good request rewrites its header in T.
        if t_checksum() != sum_t {
            gprintln!("CAMPAIGN T-CHANGED round={}", t.rounds);
            canary_bad = Some(T);
        }
        if needs_reset || timed_out {
            if needs_reset {
                t.resets += 1;
            } else {
                t.timeouts += 1;
                gprintln!(
                    "CAMPAIGN TIMEOUT round={} want={want} got={got} qsize={q}",
                    t.rounds
                );
            }
            if !b.mmio().reset() {
                gprintln!("CAMPAIGN RESET-TIMEOUT round={}", t.rounds);
            }
            dev = None;
        } else if r.one_in(4) {
            let sector = r.below(sectors.saturating_sub(8).max(1));
            if good_roundtrip(b, sector, t.rounds as u8, good_ticks) {
                t.good_ok += 1;
            } else if b.mmio().status() & status::NEEDS_RESET != 0 {
                t.resets += 1;
                b.mmio().reset();
                dev = None;
            } else {
                t.good_bad += 1;
                gprintln!("CAMPAIGN GOOD-FAILED round={} sector={sector}", t.rounds);
                b.mmio().reset();
                dev = None;
            }
        } else if r.one_in(8) {
            t.driver_resets += 1;
            b.mmio().reset();
            dev = None;
        }
        if let Some(a) = canary_bad.or_else(|| check_canaries(seed)) {
            gprintln!("CAMPAIGN CANARY-CHANGED round={} addr={a:#x}", t.rounds);
            canary_bad = Some(a);
            break;
        }
        if t.rounds % every.max(1) == 0 {
            gprintln!(
                "CAMPAIGN round={} resets={} driver_resets={} answered={} timeouts={} good={}",
                t.rounds,
                t.resets,
                t.driver_resets,
                t.answered,
                t.timeouts,
                t.good_ok
            );
        }
    }
    if let Some(b) = dev.as_mut() {
        b.mmio().reset();
    }
    let disk_ok = match Blk::init(disk, 0, 0) {
        Ok(mut b) => good_roundtrip(&mut b, 8, 0x5A, good_ticks),
        Err(_) => false,
    };
    gprintln!("CAMPAIGN DISK {}", if disk_ok { "ok" } else { "bad" });
    gprintln!(
        "CAMPAIGN DONE rounds={} resets={} driver_resets={} answered={} timeouts={} good={} good_failed={} bad_used={} canary={}",
        t.rounds,
        t.resets,
        t.driver_resets,
        t.answered,
        t.timeouts,
        t.good_ok,
        t.good_bad,
        t.bad_used,
        if canary_bad.is_none() { "ok" } else { "BAD" }
    );
    canary_bad.is_none() && disk_ok && t.good_bad == 0 && t.bad_used == 0
}
