//! A minimal i8042 keyboard controller: enough for a guest to ask for a reset (0xFE to port 0x64).

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use snapshot::Persist;

/// The command that pulses the CPU reset line.
const CMD_RESET_CPU: u8 = 0xfe;
/// Status register: the output buffer is empty and the input buffer too.
const STATUS_IDLE: u8 = 0x00;

/// The i8042 controller; it signals `reset_evt` when the guest asks for a reset.
pub struct I8042Device {
    reset_evt: EventFd,
}

impl I8042Device {
    /// The first port the device decodes (data port 0x60 up to command port 0x64).
    pub const PORT_BASE: u64 = 0x60;
    /// The number of ports it decodes.
    pub const PORT_LEN: u64 = 5;
    const COMMAND_OFFSET: u64 = 4;

    /// Creates the controller.
    pub fn new(reset_evt: EventFd) -> Self {
        Self { reset_evt }
    }
}

impl BusDevice for I8042Device {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(STATUS_IDLE);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == Self::COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            if let Err(e) = self.reset_evt.write(1) {
                tracing::error!("failed to signal guest reset: {e}");
            }
        }
    }
}

/// The controller's saved state: it has no registers that outlive a port access, so there is
/// nothing to keep, but it is saved like every device so that a snapshot lists it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {}

/// The runtime handle an i8042 controller is rebuilt with.
pub struct I8042ConstructorArgs {
    /// Signalled when the guest asks for a reset.
    pub reset_evt: EventFd,
}

impl Persist for I8042Device {
    type State = I8042State;
    type ConstructorArgs = I8042ConstructorArgs;
    type Error = std::convert::Infallible;

    fn save(&self) -> I8042State {
        I8042State {}
    }

    fn restore(
        args: I8042ConstructorArgs,
        _state: &I8042State,
    ) -> Result<Self, std::convert::Infallible> {
        Ok(Self::new(args.reset_evt))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042Device::new(evt.try_clone().unwrap());
        dev.write(0, &[CMD_RESET_CPU]);
        assert!(
            evt.read().is_err(),
            "a write to the data port must not reset"
        );
        dev.write(4, &[0x20]);
        assert!(evt.read().is_err());
        dev.write(4, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn state_round_trip_keeps_the_reset_line() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = I8042Device::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let state = dev.save();
        let json = serde_json::to_string(&state).unwrap();
        assert_eq!(json, "{}");
        let back: I8042State = serde_json::from_str(&json).unwrap();
        let mut dev = I8042Device::restore(
            I8042ConstructorArgs {
                reset_evt: evt.try_clone().unwrap(),
            },
            &back,
        )
        .unwrap();
        dev.write(4, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
