//! The marker guest: prints `ARKVM-MARKER-OK` and asks for a reset.
#![no_std]
#![no_main]

use arkvm_tiny_guests::{gprintln, serial, status};

/// Entered in CPL3 by the prologue.
#[no_mangle]
extern "C" fn guest_main(_boot_params: u64) -> ! {
    status::set(status::Field::Magic, status::STATUS_MAGIC);
    gprintln!("ARKVM-MARKER-OK");
    serial::reset()
}
