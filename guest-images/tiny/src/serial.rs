//! Port I/O, the 8250 console at 0x3f8, the i8042 reset, and the `gprintln!` macro.
//!
//! Works in CPL0 (fault handler) and in CPL3 (IOPL=3). Lines end with a bare `\n`.

use core::fmt::{self, Write};

/// 8250 transmit holding register.
const COM1_THR: u16 = 0x3f8;
/// 8250 line status register; bit 5 = THR empty.
const COM1_LSR: u16 = 0x3fd;
/// i8042 command port; 0xFE pulses the reset line.
const I8042_CMD: u16 = 0x64;

/// Writes one byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects; the guest runs with IOPL=3 (or CPL0) and only
    // touches ports arkvm emulates.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value,
            options(nomem, nostack, preserves_flags))
    }
}

/// Reads one byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as in `outb`.
    unsafe {
        core::arch::asm!("in al, dx", in("dx") port, out("al") value,
            options(nomem, nostack, preserves_flags))
    }
    value
}

/// Writes one byte to the console.
pub fn put_byte(b: u8) {
    // Bounded wait so a console without LSR emulation cannot hang the guest.
    for _ in 0..10_000 {
        if inb(COM1_LSR) & 0x20 != 0 {
            break;
        }
    }
    outb(COM1_THR, b);
}

/// Writes a string to the console byte by byte (no `core::fmt`; safe in CPL0).
pub fn put_str(s: &str) {
    for b in s.bytes() {
        put_byte(b);
    }
}

/// The serial console as a `core::fmt::Write` sink.
pub struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            put_byte(b);
        }
        Ok(())
    }
}

/// Prints formatted text on the console (used by `gprint!`/`gprintln!`).
pub fn print_fmt(args: fmt::Arguments<'_>) {
    // Console::write_str never fails.
    let _ = Console.write_fmt(args);
}

/// Prints to the serial console.
#[macro_export]
macro_rules! gprint {
    ($($arg:tt)*) => { $crate::serial::print_fmt(format_args!($($arg)*)) };
}

/// Prints a line (terminated by `\n`) to the serial console.
#[macro_export]
macro_rules! gprintln {
    ($($arg:tt)*) => {{
        $crate::serial::print_fmt(format_args!($($arg)*));
        $crate::serial::print_fmt(format_args!("\n"));
    }};
}

/// Asks arkvm for a reset (`out 0x64, 0xFE`), which ends `arkvm run` with status 0.
pub fn reset() -> ! {
    outb(I8042_CMD, 0xFE);
    loop {
        core::hint::spin_loop();
    }
}
