//! The memory guest: rewrites every 4 KiB page of its region generation by generation and
//! checks, before writing a page, that it still holds the previous generation. A torn memory
//! image (a snapshot mixing two instants) fails that check and the guest prints `TORN`.
//!
//! See README.md for the options (`arkvm.passes`, `arkvm.region_mb`, `arkvm.hot_pct`,
//! `arkvm.rate_pages`, `arkvm.interval`, `arkvm.fill`) and the exact output lines.
#![no_std]
#![no_main]

use arkvm_tiny_guests::bootparams;
use arkvm_tiny_guests::cmdline::Cmdline;
use arkvm_tiny_guests::fill::{fill_page, Fill, Rng, FILL_END, FILL_START};
use arkvm_tiny_guests::region::{hot_pages, print_interval, Region, PAGE};
use arkvm_tiny_guests::status::{self, Field};
use arkvm_tiny_guests::{fault, gprintln, serial, tsc};
use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
use core::ptr::{read_volatile, write_volatile};

/// How far ahead (in pages) the sweep prefetches; 4 KiB strides defeat the hardware
/// prefetcher, and each page needs two cache lines.
const PREFETCH_PAGES: u64 = 8;
/// Offset (in u64 words) of the page's second generation word: byte offset 4088.
const LAST_WORD: usize = 511;

/// Paces page writes to `rate` per millisecond of TSC time (no pacing when `rate` is 0).
struct Throttle {
    rate: u64,
    ticks_per_ms: u64,
    left: u64,
    deadline: u64,
}

impl Throttle {
    fn new(rate: u64, ticks_per_ms: u64) -> Self {
        Throttle {
            rate,
            ticks_per_ms,
            left: rate,
            deadline: tsc::rdtsc() + ticks_per_ms,
        }
    }

    /// How many pages may be written before the next `wait`.
    fn budget(&self, want: u64) -> u64 {
        if self.rate == 0 {
            want
        } else {
            want.min(self.left)
        }
    }

    /// Accounts `done` page writes; spins until the next tick when the budget is used up.
    fn spent(&mut self, done: u64) {
        if self.rate == 0 {
            return;
        }
        self.left -= done;
        if self.left > 0 {
            return;
        }
        let mut now = tsc::rdtsc();
        // The TSC can step backwards across a snapshot restore: never wait more than a tick.
        if self.deadline > now + self.ticks_per_ms {
            self.deadline = now + self.ticks_per_ms;
        }
        while now < self.deadline {
            core::hint::spin_loop();
            now = tsc::rdtsc();
        }
        // Falling far behind (e.g. after a pause or a restore) does not earn a burst.
        self.deadline = if now > self.deadline + 10 * self.ticks_per_ms {
            now + self.ticks_per_ms
        } else {
            self.deadline + self.ticks_per_ms
        };
        self.left = self.rate;
    }
}

extern "C" {
    /// The end of the guest's image (link.ld); the image starts at 2 MiB.
    static _end: u8;
}

/// Where the image starts (link.ld).
const IMAGE_START: usize = 0x20_0000;

/// Fills every page's bytes between its generation words for `fill` (before generation 1).
fn fill_region(region: &Region, pages: u64, fill: Fill) {
    if fill == Fill::Zero {
        return;
    }
    // SAFETY: the image [2 MiB, _end) is mapped and readable from CPL3 (the guest runs from
    // it) and nothing writes it while this shared view lives.
    let code = unsafe {
        let end = core::ptr::addr_of!(_end) as usize;
        core::slice::from_raw_parts(IMAGE_START as *const u8, end.saturating_sub(IMAGE_START))
    };
    let mut rng = Rng::new(tsc::rdtsc());
    let mut index = 0u64;
    region.for_span(0, pages, |addr, n| {
        for i in 0..n {
            let page = (addr + i * PAGE) as usize;
            // SAFETY: the page lies in e820 RAM above 4 MiB, identity-mapped, owned by this
            // loop alone; the filler bytes never overlap the generation words.
            let bytes = unsafe {
                core::slice::from_raw_parts_mut(
                    (page + FILL_START) as *mut u8,
                    FILL_END - FILL_START,
                )
            };
            fill_page(fill, index, bytes, &mut rng, code);
            index += 1;
        }
    });
}

fn torn(addr: u64, expected: u64, found: u64) -> ! {
    gprintln!("TORN page={addr:#x} expected={expected} found={found:#x}");
    fault()
}

/// Checks that each page of `[first, first + count)` holds `expect` in both words and, if
/// `write` is set, then writes `expect + 1` into both.
fn sweep(region: &Region, first: u64, count: u64, expect: u64, write: bool, th: &mut Throttle) {
    region.for_span(first, count, |addr, n| {
        let mut addr = addr;
        let mut left = n;
        while left > 0 {
            let batch = if write { th.budget(left) } else { left };
            for i in 0..batch {
                let page = (addr + i * PAGE) as *mut u64;
                if i + PREFETCH_PAGES < batch {
                    let ahead = (addr + (i + PREFETCH_PAGES) * PAGE) as *const i8;
                    // SAFETY: prefetching has no architectural effect, even on unmapped
                    // addresses; `ahead` is inside the same range anyway.
                    unsafe {
                        _mm_prefetch::<_MM_HINT_T0>(ahead);
                        _mm_prefetch::<_MM_HINT_T0>(ahead.add(4088));
                    }
                }
                // SAFETY: the page lies in e820 RAM above 4 MiB, identity-mapped by the
                // prologue, and nothing but this loop (single-threaded, no interrupts, no
                // devices) touches it.
                let (a, b) = unsafe { (read_volatile(page), read_volatile(page.add(LAST_WORD))) };
                if a != expect || b != expect {
                    torn(addr + i * PAGE, expect, if a != expect { a } else { b });
                }
                if write {
                    // SAFETY: as above.
                    unsafe {
                        write_volatile(page, expect + 1);
                        write_volatile(page.add(LAST_WORD), expect + 1);
                    }
                }
            }
            if write {
                th.spent(batch);
            }
            addr += batch * PAGE;
            left -= batch;
        }
    });
}

/// Entered in CPL3 by the prologue.
#[no_mangle]
extern "C" fn guest_main(boot_params: u64) -> ! {
    status::set(Field::Magic, status::STATUS_MAGIC);
    let (bp, text) = bootparams::from_guest(boot_params);
    let cmdline = Cmdline::new(text);
    let region = Region::from_e820(bp.e820_entries(), cmdline.get_u64("arkvm.region_mb"));
    let pages = region.pages();
    gprintln!(
        "MEMGUEST region={:#x}-{:#x} pages={pages}",
        region.start(),
        region.end()
    );
    if pages == 0 {
        gprintln!("MEMGUEST no RAM above 4 MiB");
        fault();
    }
    let max_passes = cmdline.get_u64("arkvm.passes");
    let hot = hot_pages(pages, cmdline.get_u64("arkvm.hot_pct"));
    let rate = cmdline.get_u64("arkvm.rate_pages").unwrap_or(0);
    let (ticks_per_ms, source) = tsc::khz();
    let cold = pages - hot;
    let later_pages = if hot == 0 { pages } else { hot + hot.min(cold) };
    // `arkvm.interval=N`: a PASS line every N passes instead of about every 2^20 page visits.
    let interval = |per_pass| match cmdline.get_u64("arkvm.interval") {
        Some(n) if n > 0 => n,
        _ => print_interval(per_pass),
    };
    gprintln!(
        "MEMGUEST hot_pages={hot} rate_pages={rate} tsc_khz={ticks_per_ms} ({source:?}) interval={}",
        interval(later_pages)
    );
    let mut th = Throttle::new(rate, ticks_per_ms);
    let Some(fill) = Fill::parse(cmdline.get("arkvm.fill")) else {
        gprintln!("MEMGUEST bad arkvm.fill (zero, random or mixed)");
        fault();
    };
    if fill != Fill::Zero {
        fill_region(&region, pages, fill);
        gprintln!("MEMGUEST fill={}", fill.name());
    }

    // Generation 1: every page (fresh RAM holds 0 = "never written").
    let mut gen = 1u64;
    status::set(Field::MemGen, gen);
    sweep(&region, 0, pages, 0, true, &mut th);
    let mut passes = 1u64;
    let mut cold_cursor = 0u64;
    loop {
        status::set(Field::MemPasses, passes);
        let per_pass = if passes == 1 { pages } else { later_pages };
        if passes % interval(per_pass) == 0 {
            gprintln!("PASS {passes} GEN {gen}");
        }
        if max_passes == Some(passes) {
            gprintln!("DONE passes={passes}");
            serial::reset();
        }
        if hot == 0 {
            // Idle: no more writes; keep checking that every page still holds generation 1.
            sweep(&region, 0, pages, 1, false, &mut th);
        } else {
            gen += 1;
            status::set(Field::MemGen, gen);
            sweep(&region, 0, hot, gen - 1, true, &mut th);
            if cold > 0 {
                // Pages past the hot set were last written in generation 1: check a rotating
                // window of them, as many as the hot set, so a torn image is still caught.
                let n = hot.min(cold);
                let first = hot + cold_cursor;
                let run = n.min(cold - cold_cursor);
                sweep(&region, first, run, 1, false, &mut th);
                sweep(&region, hot, n - run, 1, false, &mut th);
                cold_cursor = (cold_cursor + n) % cold;
            }
        }
        passes += 1;
    }
}
