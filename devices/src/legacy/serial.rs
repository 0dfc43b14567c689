//! The 8250 UART at 0x3f8, built on vm-superio, with its output going to a writer (stdout).

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState as UartState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use snapshot::Persist;

/// Raises the serial port's interrupt line through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// Why the serial port could not be restored or fed.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The saved receive FIFO is larger than the UART's.
    #[error("saved serial state is invalid: {0}")]
    BadState(String),
}

/// The serial port's saved registers and receive FIFO.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<UartState> for SerialState {
    fn from(s: UartState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialState> for UartState {
    fn from(s: &SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// The guest's serial console.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl SerialDevice {
    /// The port where the device sits (COM1).
    pub const PORT_BASE: u64 = 0x3f8;
    /// The number of ports it decodes.
    pub const PORT_LEN: u64 = 8;

    /// Creates a serial port that writes to `out` and signals `irq`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// Feeds bytes typed by the user to the guest; returns how many fitted in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Room left in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(value), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.uart.write(off, *value) {
                tracing::debug!("serial write failed: {e:?}");
            }
        }
    }
}

/// The runtime handles a serial port is rebuilt with.
pub struct SerialConstructorArgs {
    pub irq: EventFd,
    pub out: Box<dyn Write + Send>,
}

impl Persist for SerialDevice {
    type State = SerialState;
    type ConstructorArgs = SerialConstructorArgs;
    type Error = SerialError;

    fn save(&self) -> SerialState {
        self.uart.state().into()
    }

    fn restore(args: SerialConstructorArgs, state: &SerialState) -> Result<Self, SerialError> {
        let uart = Serial::from_state(&state.into(), IrqTrigger(args.irq), NoEvents, args.out)
            .map_err(|e| SerialError::BadState(format!("{e:?}")))?;
        Ok(Self { uart })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_and_state_round_trip() {
        let out = Shared::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq, Box::new(out.clone()));
        for b in b"hi" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
        dev.write(7, &[0x5a]); // scratch register
        assert_eq!(dev.enqueue_input(b"xy"), 2);
        let state = dev.save();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut back = SerialDevice::restore(
            SerialConstructorArgs {
                irq,
                out: Box::new(std::io::sink()),
            },
            &state,
        )
        .unwrap();
        let mut b = [0u8];
        back.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        back.read(0, &mut b);
        assert_eq!(b[0], b'x');
    }
}
