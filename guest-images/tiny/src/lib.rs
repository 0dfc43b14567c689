//! Shared runtime of the arkvm tiny test guests: CPL0 prologue, serial console, boot_params and
//! command-line parsing, the status page, and a polling virtio-mmio block driver.
//!
//! Each guest binary (`src/bin/*.rs`) defines `guest_main`, which the prologue enters in CPL3
//! with IOPL=3, interrupts off, and the guest-physical address of `boot_params` as argument:
//!
//! ```ignore
//! #[no_mangle]
//! extern "C" fn guest_main(boot_params: u64) -> ! { ... }
//! ```
//!
//! The pure logic (parsing, patterns, region arithmetic) also builds with `std` for host unit
//! tests (`cargo test --lib`); the bare-metal parts are compiled out there.
#![cfg_attr(not(test), no_std)]

#[cfg(not(test))]
mod boot;
#[cfg(not(test))]
mod mem;

pub mod blk;
pub mod bootparams;
pub mod campaign;
pub mod campaign_chains;
pub mod cmdline;
pub mod diskpattern;
pub mod fill;
pub mod hostile;
pub mod net;
pub mod paging;
pub mod region;
pub mod serial;
pub mod status;
pub mod tsc;
pub mod virtio_mmio;

/// Prints a deliberate fault message context and faults (`ud2`): the fault handler prints
/// `GUEST FAULT vec=6 ...` and triple-faults, so arkvm exits non-zero.
pub fn fault() -> ! {
    // SAFETY: `ud2` only raises #UD; the CPL0 handler never returns.
    unsafe { core::arch::asm!("ud2", options(noreturn, nomem, nostack)) }
}

/// The precompiled `core` references this symbol from unwind tables even with panic=abort;
/// nothing ever calls it (the unwind tables are discarded by the linker script).
#[cfg(not(test))]
#[no_mangle]
extern "C" fn rust_eh_personality() {}

#[cfg(not(test))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    serial::print_fmt(format_args!("GUEST PANIC {info}\n"));
    fault()
}
