//! The i8042 keyboard controller, reduced to what guests use it for: resetting the machine.

use std::sync::{Arc, Mutex};

use vm_superio::{I8042Device, Trigger};

use crate::bus::BusDevice;
use crate::exit::ExitReason;
use crate::vcpu::RunControl;

/// Ends the partition's run with [`ExitReason::Reset`] when the guest pulses the reset line.
#[derive(Debug)]
pub(crate) struct ResetLine(pub Arc<RunControl>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request_stop(ExitReason::Reset);
        Ok(())
    }
}

/// The controller at ports 0x60-0x64 (register offsets 0-4).
#[derive(Debug)]
pub struct I8042(Mutex<I8042Device<ResetLine>>);

impl I8042 {
    pub(crate) fn new(control: Arc<RunControl>) -> Self {
        Self(Mutex::new(I8042Device::new(ResetLine(control))))
    }
}

/// Port 0x64 status: output buffer full is what Linux's reboot path and probes expect of an idle
/// controller with nothing behind it, and the input buffer is always free.
const STATUS_OFFSET: u64 = 4;
const STATUS_IDLE: u8 = 0x01;

impl BusDevice for I8042 {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let value = if offset == STATUS_OFFSET {
            STATUS_IDLE
        } else {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read(offset as u8)
        };
        data.fill(value);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [value]) = (u8::try_from(offset), data) {
            let _ = self
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write(offset, *value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writing_fe_to_the_command_port_resets_the_partition() {
        let control = Arc::new(RunControl::default());
        let i8042 = I8042::new(control.clone());

        i8042.write(4, &[0xfe]);

        assert_eq!(control.exit_reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn other_commands_do_nothing() {
        let control = Arc::new(RunControl::default());
        let i8042 = I8042::new(control.clone());

        i8042.write(4, &[0xad]);
        i8042.write(0, &[0xfe]);

        assert_eq!(control.exit_reason(), None);
    }
}
