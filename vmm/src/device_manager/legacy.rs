//! The legacy PC devices on the port I/O bus: the serial console (COM1, IRQ 4) and the i8042
//! controller, whose reset command wakes the event loop through the exit signal.

use devices::legacy::i8042::{I8042ConstructorArgs, I8042Device, I8042State};
use devices::legacy::serial::{SerialConstructorArgs, SerialDevice, SerialError, SerialState};
use snapshot::Persist;

use super::{DeviceArgs, DeviceManager, DeviceManagerError, Placement};

/// The kind of the serial port.
pub const SERIAL_KIND: &str = "serial";
/// The id of the serial port.
pub const SERIAL_ID: &str = "com1";
/// The IRQ line of the serial port (COM1).
pub const SERIAL_IRQ: u32 = 4;
/// The kind of the i8042 controller.
pub const I8042_KIND: &str = "i8042";
/// The id of the i8042 controller.
pub const I8042_ID: &str = "i8042";

/// Why a legacy device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum LegacyError {
    #[error("cannot restore the serial port")]
    RestoreSerial(#[source] SerialError),
    #[error("cannot create an event fd for the i8042 reset line")]
    ResetEvent(#[source] std::io::Error),
}

impl DeviceManager {
    /// Registers the serial port (output to `out`) and the i8042 controller.
    pub(super) fn add_legacy_devices(
        &mut self,
        out: Box<dyn std::io::Write + Send>,
    ) -> Result<(), DeviceManagerError> {
        let serial = self.add_pio_device(
            SERIAL_ID,
            SERIAL_KIND,
            Placement {
                base: SerialDevice::PORT_BASE,
                len: SerialDevice::PORT_LEN,
                irq: Some(SERIAL_IRQ),
            },
            |args: DeviceArgs<'_, SerialState>| {
                let irq = args
                    .irq
                    .expect("the manager connects the IRQ the placement asks for");
                match args.saved {
                    None => Ok(SerialDevice::new(irq, out)),
                    Some(state) => SerialDevice::restore(SerialConstructorArgs { irq, out }, state)
                        .map_err(LegacyError::RestoreSerial),
                }
            },
        )?;
        self.serial = Some(serial);

        // An exit event with no recorded reason is a reset request.
        let reset_evt = self
            .exit
            .eventfd()
            .try_clone()
            .map_err(LegacyError::ResetEvent)?;
        self.add_pio_device(
            I8042_ID,
            I8042_KIND,
            Placement {
                base: I8042Device::PORT_BASE,
                len: I8042Device::PORT_LEN,
                irq: None,
            },
            |args: DeviceArgs<'_, I8042State>| {
                let args_for = I8042ConstructorArgs { reset_evt };
                match args.saved {
                    None => Ok(I8042Device::new(args_for.reset_evt)),
                    Some(state) => I8042Device::restore(args_for, state),
                }
            },
        )?;
        Ok(())
    }
}
