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

use crate::blk::{Blk, Desc, DESC_NEXT, DESC_WRITE, SECTOR, S_OK, T_IN, T_OUT};
use crate::campaign_chains::{
    fill_table, random_desc, shaped_chain, write_header, Rng, CA, CA_LEN, CB, CB_LEN, GOOD_HEADER,
    T, T_LEN, W, W_LEN,
};
use crate::virtio_mmio::{reg, status, Mmio};
use crate::{gprintln, tsc};
use core::ptr::{read_volatile, write_volatile};

/// How long a round waits for the device (then it is reset and the round counts as a timeout).
const WAIT_MS: u64 = 2000;
/// How long a good request may take before it counts as failed (generous: loaded hosts).
const GOOD_WAIT_MS: u64 = 30_000;

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
