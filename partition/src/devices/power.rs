//! The ACPI PM1a control register: the one way a guest without ACPI tables can still power off.
//!
//! The port and bit layout are those of QEMU's PIIX4 PM device, so guests written for QEMU's
//! `isa`/`pc` machines power off here the same way.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::exit::ExitReason;
use crate::vcpu::RunControl;

/// SLP_EN: the write that carries it enters the sleep state in SLP_TYP; every state here is "off".
const SLP_EN: u16 = 1 << 13;

/// PM1a_CNT at [`PM1A_CONTROL_PORT`](crate::layout::PM1A_CONTROL_PORT).
#[derive(Debug)]
pub struct PowerControl(Arc<RunControl>);

impl PowerControl {
    pub(crate) fn new(control: Arc<RunControl>) -> Self {
        Self(control)
    }
}

impl BusDevice for PowerControl {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let value = match data {
            [lo] => u16::from(*lo),
            [lo, hi, ..] => u16::from_le_bytes([*lo, *hi]),
            [] => 0,
        };
        if offset == 0 && value & SLP_EN != 0 {
            self.0.request_stop(ExitReason::PowerOff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slp_en_powers_off() {
        let control = Arc::new(RunControl::default());

        PowerControl::new(control.clone()).write(0, &0x3400u16.to_le_bytes());

        assert_eq!(control.exit_reason(), Some(ExitReason::PowerOff));
    }

    #[test]
    fn write_without_slp_en_is_ignored() {
        let control = Arc::new(RunControl::default());

        PowerControl::new(control.clone()).write(0, &0x1400u16.to_le_bytes());

        assert_eq!(control.exit_reason(), None);
    }
}
