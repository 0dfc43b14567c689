//! The disk guest: a polling virtio-blk driver in CPL3 with several workloads selected by
//! `arkvm.mode=` (roundtrip, readonly, numbered, scatter, hostile, campaign, bench).
//!
//! See README.md for the options and the exact output lines.
#![no_std]
#![no_main]

use arkvm_tiny_guests::blk::{Blk, SECTOR, S_IOERR, S_OK, T_GET_ID, T_IN, T_OUT};
use arkvm_tiny_guests::cmdline::Cmdline;
use arkvm_tiny_guests::status::{self, Field};
use arkvm_tiny_guests::virtio_mmio::{find_devices, Mmio, DEVICE_ID_BLOCK};
use arkvm_tiny_guests::{
    bootparams, campaign, diskpattern, fault, gprint, gprintln, hostile, serial, tsc,
};

/// Bytes per numbered block.
const BLOCK: u64 = 4096;
/// Scatter block unit (changed-block tracking granularity).
const SCATTER_UNIT: u64 = 64 * 1024;

fn open_disk(mmio: Mmio, qm: usize) -> Blk {
    match Blk::init(mmio, qm, 0) {
        Ok(b) => b,
        Err(e) => {
            gprintln!("DISK INIT-FAILED base={:#x}: {e}", mmio.base());
            fault()
        }
    }
}

fn get_id(b: &mut Blk) {
    let slot = b.alloc_slot().expect("a fresh device has free slots");
    b.data(slot)[..20].fill(0);
    let st = b.io_on(slot, T_GET_ID, 0, 20);
    if st == S_OK {
        gprint!("DISK-ID ");
        for &c in b.data(slot)[..20].iter().take_while(|&&c| c != 0) {
            let c = if c.is_ascii_graphic() { c } else { b'?' };
            gprint!("{}", c as char);
        }
        gprintln!("");
    } else {
        gprintln!("DISK-ID status={st}");
    }
    b.free_slot(slot);
}

fn roundtrip(b: &mut Blk) -> ! {
    get_id(b);
    let size = b.capacity();
    let chunk = b.max_request() as u64;
    let n = size.div_ceil(chunk);
    let mut bad: Option<(u64, u8)> = None;
    let mut note = |off: u64, st: u8| {
        if bad.is_none_or(|(o, _)| off < o) {
            bad = Some((off, st));
        }
    };
    b.pipeline(
        n,
        |op, buf| {
            let off = op * chunk;
            let len = (size - off).min(chunk) as usize;
            diskpattern::fill(off, &mut buf[..len]);
            (T_OUT, off / SECTOR, len)
        },
        |op, st, _| {
            if st != S_OK {
                note(op * chunk, st);
            }
        },
    );
    let fst = b.flush();
    if fst != S_OK {
        gprintln!("FLUSH status={fst}");
    }
    b.pipeline(
        n,
        |op, _| {
            let off = op * chunk;
            (T_IN, off / SECTOR, (size - off).min(chunk) as usize)
        },
        |op, st, buf| {
            let off = op * chunk;
            if st != S_OK {
                note(off, st);
            } else if let Some(i) = diskpattern::first_mismatch(off, buf) {
                note(off + i as u64, S_OK);
            }
        },
    );
    match bad {
        None => gprintln!("ROUNDTRIP OK bytes={size}"),
        Some((off, S_OK)) => gprintln!("ROUNDTRIP BAD offset={off:#x}"),
        Some((off, st)) => gprintln!("ROUNDTRIP BAD offset={off:#x} status={st}"),
    }
    serial::reset()
}

fn readonly(b: &mut Blk) -> ! {
    let slot = b.alloc_slot().expect("a fresh device has free slots");
    b.data(slot)[..SECTOR as usize].fill(0x5A);
    let st = b.io_on(slot, T_OUT, 0, SECTOR as usize);
    if st == S_IOERR {
        gprintln!("READONLY-REJECTED");
    } else {
        gprintln!("READONLY-ACCEPTED status={st}");
    }
    let st = b.io_on(slot, T_IN, 0, SECTOR as usize);
    if st == S_OK {
        gprintln!("READ-OK");
    } else {
        gprintln!("READ-FAILED status={st}");
    }
    serial::reset()
}

fn le(buf: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&buf[8 * i..8 * i + 8]);
    u64::from_le_bytes(w)
}

fn numbered(b: &mut Blk, c: &Cmdline) -> ! {
    let mut blocks = b.capacity() / BLOCK;
    if let Some(cap) = c.get_list("arkvm.blocks").next() {
        blocks = blocks.min(cap);
    }
    if blocks == 0 {
        gprintln!("DISK-NUMBERED no blocks");
        fault();
    }
    let max_gens = c.get_u64("arkvm.gens");
    let every = 1000u64.div_ceil(blocks).max(1);
    status::set(Field::DiskBlocks, blocks);
    gprintln!("DISK-NUMBERED blocks={blocks} print_every={every}");
    let slot = b.alloc_slot().expect("a fresh device has free slots");
    let mut gen = 1u64;
    loop {
        status::set(Field::DiskGen, gen);
        for i in 0..blocks {
            let st = b.io_on(slot, T_IN, i * BLOCK / SECTOR, SECTOR as usize);
            let buf = b.data(slot);
            let (fg, fi) = (le(buf, 0), le(buf, 1));
            let expect_ok = if gen == 1 {
                fg == 0 && fi == 0
            } else {
                fg == gen - 1 && fi == i
            };
            if st != S_OK || !expect_ok {
                gprintln!(
                    "DISK-TORN block={i} expected={} found={fg},{fi} status={st}",
                    gen - 1
                );
                fault();
            }
            for (k, w) in buf[..BLOCK as usize].chunks_exact_mut(8).enumerate() {
                let v = match k {
                    0 => gen,
                    1 => i,
                    _ => gen ^ (i << 20) ^ k as u64,
                };
                w.copy_from_slice(&v.to_le_bytes());
            }
            let st = b.io_on(slot, T_OUT, i * BLOCK / SECTOR, BLOCK as usize);
            if st != S_OK {
                gprintln!("DISK-WRITE-FAILED block={i} status={st}");
                fault();
            }
            status::set(Field::DiskLast, gen * blocks + i);
        }
        if gen % every == 0 {
            gprintln!("DISKGEN {gen} LAST {}", gen * blocks + blocks - 1);
        }
        if max_gens == Some(gen) {
            gprintln!("DISK DONE gens={gen}");
            serial::reset();
        }
        gen += 1;
    }
}

fn scatter(b: &mut Blk, c: &Cmdline) -> ! {
    let slot = b.alloc_slot().expect("a fresh device has free slots");
    let mut count = 0u64;
    for blk_no in c.get_list("arkvm.blocks") {
        let off = blk_no.saturating_mul(SCATTER_UNIT);
        if off.saturating_add(BLOCK) > b.capacity() {
            gprintln!("SCATTER SKIP block={blk_no} (beyond the disk)");
            continue;
        }
        b.data(slot)[..BLOCK as usize].fill(blk_no as u8 ^ 0xC3);
        let st = b.io_on(slot, T_OUT, off / SECTOR, BLOCK as usize);
        if st != S_OK {
            gprintln!("SCATTER FAILED block={blk_no} status={st}");
            fault();
        }
        count += 1;
    }
    b.free_slot(slot);
    let st = b.flush();
    if st != S_OK {
        gprintln!("FLUSH status={st}");
    }
    gprintln!("SCATTER DONE n={count}");
    serial::reset()
}

/// xorshift64: the random offsets of the bench.
fn next_random(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn bench(b: &mut Blk, c: &Cmdline) -> ! {
    let size = b.capacity();
    let chunk = b.max_request() as u64;
    let pages = size / BLOCK;
    let ops = c.get_u64("arkvm.ops").unwrap_or(pages);
    let phases = c
        .get("arkvm.phases")
        .unwrap_or("seqwrite,seqread,randwrite,randread");
    let (khz, _) = tsc::khz();
    gprintln!(
        "BENCH-SETUP disk_bytes={size} slots={} qsize={} tsc_khz={khz}",
        b.slots(),
        b.qsize()
    );
    for name in phases.split(',') {
        let (kind, random) = match name {
            "seqwrite" => (T_OUT, false),
            "seqread" => (T_IN, false),
            "randwrite" => (T_OUT, true),
            "randread" => (T_IN, true),
            _ => {
                gprintln!("BENCH-SKIP {name}");
                continue;
            }
        };
        if random && pages == 0 {
            gprintln!("BENCH-SKIP {name}");
            continue;
        }
        let n = if random { ops } else { size.div_ceil(chunk) };
        let mut seed = 0x2545_F491_4F6C_DD1D_u64;
        let mut bytes = 0u64;
        let mut errors = 0u64;
        gprintln!("BENCH-BEGIN {name}");
        let t0 = tsc::rdtsc();
        b.pipeline(
            n,
            |op, buf| {
                let (off, len) = if random {
                    ((next_random(&mut seed) % pages) * BLOCK, BLOCK as usize)
                } else {
                    (op * chunk, (size - op * chunk).min(chunk) as usize)
                };
                if kind == T_OUT {
                    buf[..8].copy_from_slice(&op.to_le_bytes());
                }
                bytes += len as u64;
                (kind, off / SECTOR, len)
            },
            |_, st, _| {
                if st != S_OK {
                    errors += 1;
                }
            },
        );
        let cycles = tsc::rdtsc() - t0;
        gprintln!("BENCH-END {name} bytes={bytes}");
        gprintln!("BENCH-INFO {name} ops={n} errors={errors} tsc_cycles={cycles}");
    }
    let st = b.flush();
    gprintln!("BENCH-DONE flush_status={st}");
    serial::reset()
}

/// Entered in CPL3 by the prologue.
#[no_mangle]
extern "C" fn guest_main(boot_params: u64) -> ! {
    status::set(Field::Magic, status::STATUS_MAGIC);
    let (_, text) = bootparams::from_guest(boot_params);
    let c = Cmdline::new(text);
    let (disks, n) = find_devices(DEVICE_ID_BLOCK);
    let mode = c.get("arkvm.mode").unwrap_or("roundtrip");
    gprintln!("DISKGUEST mode={mode} disks={n}");
    if n == 0 {
        gprintln!("DISKGUEST no virtio-blk device");
        fault();
    }
    if mode == "campaign" {
        let seed = c.get_u64("arkvm.seed").unwrap_or(1);
        let rounds = c.get_u64("arkvm.rounds").unwrap_or(u64::MAX);
        let seconds = c.get_u64("arkvm.seconds").unwrap_or(u64::MAX / 1000);
        let every = c.get_u64("arkvm.every").unwrap_or(1000);
        campaign::run(disks[0], seed, rounds, seconds, every);
        if c.get("arkvm.then") == Some("exit") {
            serial::reset();
        }
        gprintln!("CAMPAIGN IDLE");
        loop {
            core::hint::spin_loop();
        }
    }
    if mode == "hostile" {
        hostile::run(&disks[..n]);
        serial::reset();
    }
    let mut b = open_disk(disks[0], 0);
    gprintln!(
        "DISK0 bytes={} features={:#x} qsize={} slots={}",
        b.capacity(),
        b.features(),
        b.qsize(),
        b.slots()
    );
    match mode {
        "roundtrip" => roundtrip(&mut b),
        "readonly" => readonly(&mut b),
        "numbered" => numbered(&mut b, &c),
        "scatter" => scatter(&mut b, &c),
        "bench" => bench(&mut b, &c),
        _ => {
            gprintln!("DISKGUEST unknown mode {mode}");
            fault()
        }
    }
}
