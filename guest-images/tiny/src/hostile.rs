//! The hostile disk workload: malformed descriptor chains that a VMM must survive.
//!
//! Each case runs on a freshly initialised disk 0, waits a bounded time for an answer, reports
//! `HOSTILE <case> status=<n>` (a status byte was written), `needs-reset` (DEVICE_NEEDS_RESET,
//! whether or not the chain was also returned), `status=255` (returned unanswered, no
//! NEEDS_RESET) or `no-reply`, and resets the device. Then a
//! write/read check on disk 1 (disk 0 if there is only one) prints `HOSTILE SURVIVED`.

use crate::blk::{
    Blk, Desc, DESC_INDIRECT, DESC_NEXT, DESC_WRITE, F_INDIRECT_DESC, S_OK, T_IN, T_OUT,
};
use crate::virtio_mmio::{status, Mmio};
use crate::{gprintln, tsc};

/// Outside every memory slot arkvm creates (1 TiB).
const OUTSIDE: u64 = 1 << 40;
/// How long to wait for an answer to a malformed chain.
const WAIT_MS: u64 = 500;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Case {
    OutsideMemory,
    Loop,
    TooLong,
    WrongDirection,
    HeaderOnly,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::OutsideMemory => "outside-memory",
            Case::Loop => "loop",
            Case::TooLong => "too-long",
            Case::WrongDirection => "wrong-direction",
            Case::HeaderOnly => "header-only",
        }
    }
}

const CASES: [Case; 5] = [
    Case::OutsideMemory,
    Case::Loop,
    Case::TooLong,
    Case::WrongDirection,
    Case::HeaderOnly,
];

/// Posts the malformed chain of `case` on slot 0's buffers (descriptor 0 is the head).
fn post(b: &mut Blk, case: Case) {
    let header = b.header_addr(0);
    let st = b.status_addr(0);
    let data = b.data_addr(0);
    let q = usize::from(b.qsize());
    b.set_status(0, 0xFF);
    let status_desc = |next| Desc {
        addr: st,
        len: 1,
        flags: DESC_WRITE,
        next,
    };
    match case {
        Case::OutsideMemory => {
            b.set_header(0, T_IN, 0);
            b.set_desc(
                0,
                Desc {
                    addr: header,
                    len: 16,
                    flags: DESC_NEXT,
                    next: 1,
                },
            );
            b.set_desc(
                1,
                Desc {
                    addr: OUTSIDE,
                    len: 4096,
                    flags: DESC_NEXT | DESC_WRITE,
                    next: 2,
                },
            );
            b.set_desc(2, status_desc(0));
        }
        Case::Loop => {
            b.set_header(0, T_IN, 0);
            b.set_desc(
                0,
                Desc {
                    addr: header,
                    len: 16,
                    flags: DESC_NEXT,
                    next: 1,
                },
            );
            b.set_desc(
                1,
                Desc {
                    addr: data,
                    len: 512,
                    flags: DESC_NEXT | DESC_WRITE,
                    next: 0,
                },
            );
        }
        Case::TooLong => {
            b.set_header(0, T_IN, 0);
            if b.features() & F_INDIRECT_DESC != 0 {
                // A loop-free indirect table of 2 * queue size descriptors.
                let table = b.data_addr(1);
                let n = 2 * q;
                let entries = b.data(1).as_mut_ptr() as *mut Desc;
                for i in 0..n {
                    let d = if i == 0 {
                        Desc {
                            addr: header,
                            len: 16,
                            flags: DESC_NEXT,
                            next: 1,
                        }
                    } else if i == n - 1 {
                        status_desc(0)
                    } else {
                        let addr = data + 512 * (i as u64 - 1);
                        Desc {
                            addr,
                            len: 512,
                            flags: DESC_NEXT | DESC_WRITE,
                            next: i as u16 + 1,
                        }
                    };
                    // SAFETY: slot 1's 64 KiB buffer holds 4096 descriptors; n <= 128, and no
                    // request uses slot 1 while the hostile cases run.
                    unsafe { core::ptr::write_volatile(entries.add(i), d) };
                }
                b.set_desc(
                    0,
                    Desc {
                        addr: table,
                        len: (16 * n) as u32,
                        flags: DESC_INDIRECT,
                        next: 0,
                    },
                );
                gprintln!("HOSTILE-INFO too-long indirect=1 descriptors={n} queue={q}");
            } else {
                // Every descriptor of the table, the last one leading back to the first data
                // descriptor: the walk exceeds the queue size.
                b.set_desc(
                    0,
                    Desc {
                        addr: header,
                        len: 16,
                        flags: DESC_NEXT,
                        next: 1,
                    },
                );
                for i in 1..q {
                    let next = if i == q - 1 { 1 } else { i as u16 + 1 };
                    let addr = data + 512 * (i as u64 - 1);
                    b.set_desc(
                        i,
                        Desc {
                            addr,
                            len: 512,
                            flags: DESC_NEXT | DESC_WRITE,
                            next,
                        },
                    );
                }
                gprintln!("HOSTILE-INFO too-long indirect=0 descriptors>{q} queue={q}");
            }
        }
        Case::WrongDirection => {
            b.set_header(0, T_IN, 0);
            b.set_desc(
                0,
                Desc {
                    addr: header,
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
                    flags: DESC_NEXT,
                    next: 2,
                },
            );
            b.set_desc(2, status_desc(0));
        }
        Case::HeaderOnly => {
            b.set_header(0, T_OUT, 0);
            b.set_desc(
                0,
                Desc {
                    addr: header,
                    len: 16,
                    flags: 0,
                    next: 0,
                },
            );
        }
    }
    b.push_avail(0);
    b.notify();
}

/// The answer to one case. A used entry whose status byte is still 0xFF was returned without
/// an answer; a device may then raise NEEDS_RESET just after, so that is waited for too.
fn outcome(b: &mut Blk, ticks: u64) -> Outcome {
    let t0 = tsc::rdtsc();
    let mut used = false;
    loop {
        if !used && b.poll_used().is_some() {
            let st = b.status_of(0);
            if st != 0xFF {
                return Outcome::Status(st);
            }
            used = true;
        }
        if b.mmio().status() & status::NEEDS_RESET != 0 {
            return Outcome::NeedsReset;
        }
        if tsc::rdtsc().wrapping_sub(t0) > ticks {
            return if used {
                Outcome::Status(0xFF)
            } else {
                Outcome::NoReply
            };
        }
        core::hint::spin_loop();
    }
}

enum Outcome {
    Status(u8),
    NeedsReset,
    NoReply,
}

/// A 4 KiB write and read-back at sector 8 (leaves sector 0 alone); true if it matched.
fn check_disk(b: &mut Blk) -> bool {
    let slot = b.alloc_slot().expect("a fresh device has free slots");
    for (i, x) in b.data(slot)[..4096].iter_mut().enumerate() {
        *x = (i as u8).wrapping_mul(7) ^ 0x3C;
    }
    let ok_w = b.io_on(slot, T_OUT, 8, 4096) == S_OK;
    b.data(slot)[..4096].fill(0);
    let ok_r = b.io_on(slot, T_IN, 8, 4096) == S_OK;
    let same = b.data(slot)[..4096]
        .iter()
        .enumerate()
        .all(|(i, &x)| x == (i as u8).wrapping_mul(7) ^ 0x3C);
    b.free_slot(slot);
    ok_w && ok_r && same
}

/// Runs the hostile cases on `disks[0]` and the survival check on `disks[1]` (or `disks[0]`).
pub fn run(disks: &[Mmio]) {
    let (khz, _) = tsc::khz();
    let ticks = khz * WAIT_MS;
    for case in CASES {
        let mut b = match Blk::init(disks[0], 0, F_INDIRECT_DESC) {
            Ok(b) => b,
            Err(e) => {
                gprintln!("HOSTILE {} init-failed: {e}", case.name());
                continue;
            }
        };
        post(&mut b, case);
        match outcome(&mut b, ticks) {
            Outcome::Status(s) => gprintln!("HOSTILE {} status={s}", case.name()),
            Outcome::NeedsReset => gprintln!("HOSTILE {} needs-reset", case.name()),
            Outcome::NoReply => gprintln!("HOSTILE {} no-reply", case.name()),
        }
        if !b.mmio().reset() {
            gprintln!("HOSTILE {} reset-timeout", case.name());
        }
    }
    // Disk 0 must work again after its reset.
    match Blk::init(disks[0], 0, 0) {
        Ok(mut b) => {
            let ok = check_disk(&mut b);
            gprintln!(
                "HOSTILE disk0-after-reset {}",
                if ok { "ok" } else { "bad" }
            );
        }
        Err(e) => gprintln!("HOSTILE disk0-after-reset init-failed: {e}"),
    }
    let other = if disks.len() > 1 { disks[1] } else { disks[0] };
    match Blk::init(other, 1, 0) {
        Ok(mut b) => {
            if check_disk(&mut b) {
                gprintln!("HOSTILE SURVIVED");
            } else {
                gprintln!("HOSTILE FAILED check on disk {:#x}", other.base());
            }
        }
        Err(e) => gprintln!("HOSTILE FAILED init of {:#x}: {e}", other.base()),
    }
}
