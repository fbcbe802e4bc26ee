//! A paravirtual idle port for guests that poll at CPL3 and so cannot `hlt`.
//!
//! A 32-bit write of N parks the writing vCPU for up to N microseconds (capped at
//! [`MAX_IDLE_US`]). The sleep is a plain `nanosleep`, which the vCPU kick signal interrupts, so a
//! pause or stop request still takes effect at once. A guest that never writes here is unaffected.

use crate::bus::BusDevice;

/// Longest single idle period honoured, so a bogus value cannot hold a vCPU for long.
pub const MAX_IDLE_US: u32 = 10_000;

/// The idle port device.
#[derive(Debug, Default)]
pub struct IdlePort;

impl BusDevice for IdlePort {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, _offset: u64, data: &[u8]) {
        let mut raw = [0u8; 4];
        for (r, d) in raw.iter_mut().zip(data) {
            *r = *d;
        }
        let micros = u32::from_le_bytes(raw).min(MAX_IDLE_US);
        if micros == 0 {
            return;
        }
        let request = libc::timespec {
            tv_sec: 0,
            tv_nsec: i64::from(micros) * 1000,
        };
        // SAFETY: `request` is a valid timespec and a null remainder pointer is allowed; an EINTR
        // return (the vCPU was kicked) is exactly the early wake-up we want.
        unsafe { libc::nanosleep(&request, std::ptr::null_mut()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn write_parks_the_caller_for_the_requested_time() {
        let start = Instant::now();

        IdlePort.write(0, &2000u32.to_le_bytes());

        assert!(start.elapsed() >= Duration::from_micros(2000));
    }

    #[test]
    fn huge_request_is_capped() {
        let start = Instant::now();

        IdlePort.write(0, &u32::MAX.to_le_bytes());

        assert!(start.elapsed() < Duration::from_secs(1));
    }
}
