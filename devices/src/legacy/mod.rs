//! Legacy PC devices: the 8250 serial port and the i8042 reset line.

pub mod i8042;
pub mod serial;
