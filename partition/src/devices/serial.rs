//! 8250 UARTs (COM1 console, COM2 integration channel) on vm-superio, with pluggable byte sinks and
//! sources.
//!
//! Guest output goes to a sink the owner can swap at any time (a terminal, a log file, a console
//! server's socket); guest input is pushed by the owner with [`Uart::send`], bounded by the UART's
//! 64-byte FIFO so a fast source cannot overrun a guest that polls slowly.

use std::io::{self, Write};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Where a UART's output goes.
pub type SerialSink = Box<dyn Write + Send>;

/// The interrupt line of a UART: an eventfd the partition registers as a KVM irqfd.
#[derive(Debug)]
pub struct UartInterrupt(pub EventFd);

impl Trigger for UartInterrupt {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Forwards to the current sink, or drops output while none is attached.
struct SwappableSink(Option<SerialSink>);

impl Write for SwappableSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.0 {
            // A sink that fails (a closed console connection) must not stall the guest: drop bytes.
            Some(sink) => Ok(sink.write(buf).unwrap_or(buf.len())),
            None => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.0 {
            Some(sink) => sink.flush().or(Ok(())),
            None => Ok(()),
        }
    }
}

/// One 16550-compatible UART.
pub struct Uart {
    serial: Mutex<Serial<UartInterrupt, NoEvents, SwappableSink>>,
}

impl std::fmt::Debug for Uart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uart").finish_non_exhaustive()
    }
}

impl Uart {
    /// A UART raising `interrupt`, with no sink attached.
    pub fn new(interrupt: EventFd) -> Self {
        Self {
            serial: Mutex::new(Serial::new(UartInterrupt(interrupt), SwappableSink(None))),
        }
    }

    /// A UART restored from `state`.
    pub fn from_state(state: &UartState, interrupt: EventFd) -> Result<Self, crate::Error> {
        let serial = Serial::from_state(
            &state.to_superio(),
            UartInterrupt(interrupt),
            NoEvents,
            SwappableSink(None),
        )
        .map_err(|_| {
            crate::Error::InvalidState("serial input buffer larger than its FIFO".into())
        })?;
        Ok(Self {
            serial: Mutex::new(serial),
        })
    }

    /// Sends guest output to `sink` from now on (replacing any previous sink).
    pub fn set_sink(&self, sink: SerialSink) {
        self.lock().writer_mut().0 = Some(sink);
    }

    /// Detaches the sink; output is dropped until another is attached.
    pub fn take_sink(&self) -> Option<SerialSink> {
        self.lock().writer_mut().0.take()
    }

    /// Queues `bytes` as guest input. Returns how many fit in the receive FIFO (possibly 0); the
    /// caller retries the rest once the guest has read some.
    pub fn send(&self, bytes: &[u8]) -> usize {
        let mut serial = self.lock();
        let room = serial.fifo_capacity();
        let n = bytes.len().min(room);
        if n == 0 {
            return 0;
        }
        serial.enqueue_raw_bytes(&bytes[..n]).unwrap_or(0)
    }

    /// Queues all of `bytes`, waiting for the guest to drain the FIFO; fails with `TimedOut` when the
    /// guest reads nothing for `timeout`.
    pub fn send_all(&self, mut bytes: &[u8], timeout: std::time::Duration) -> io::Result<()> {
        let mut last_progress = std::time::Instant::now();
        while !bytes.is_empty() {
            let n = self.send(bytes);
            if n > 0 {
                bytes = &bytes[n..];
                last_progress = std::time::Instant::now();
            } else if last_progress.elapsed() > timeout {
                return Err(io::ErrorKind::TimedOut.into());
            } else {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        Ok(())
    }

    /// The UART's registers and pending input.
    pub fn state(&self) -> UartState {
        UartState::from_superio(&self.lock().state())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Serial<UartInterrupt, NoEvents, SwappableSink>> {
        self.serial.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl BusDevice for Uart {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let value = match u8::try_from(offset) {
            Ok(offset) if data.len() == 1 => self.lock().read(offset),
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [value]) = (u8::try_from(offset), data) {
            // A failing sink or interrupt is not the guest's problem; the byte is dropped.
            let _ = self.lock().write(offset, *value);
        }
    }
}

/// Saved registers and receive FIFO of a [`Uart`].
#[allow(missing_docs)]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UartState {
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

impl UartState {
    fn from_superio(s: &SerialState) -> Self {
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

    fn to_superio(&self) -> SerialState {
        SerialState {
            baud_divisor_low: self.baud_divisor_low,
            baud_divisor_high: self.baud_divisor_high,
            interrupt_enable: self.interrupt_enable,
            interrupt_identification: self.interrupt_identification,
            line_control: self.line_control,
            line_status: self.line_status,
            modem_control: self.modem_control,
            modem_status: self.modem_status,
            scratch: self.scratch,
            in_buffer: self.in_buffer.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Collect(Arc<Mutex<Vec<u8>>>);
    impl Write for Collect {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn uart() -> Uart {
        Uart::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())
    }

    #[test]
    fn guest_writes_to_thr_reach_the_sink() {
        let uart = uart();
        let out = Collect::default();
        uart.set_sink(Box::new(out.clone()));

        uart.write(0, b"h");
        uart.write(0, b"i");

        assert_eq!(*out.0.lock().unwrap(), b"hi");
    }

    #[test]
    fn sent_bytes_are_read_from_rbr_with_data_ready_set() {
        let uart = uart();
        assert_eq!(uart.send(b"ok"), 2);
        let mut lsr = [0];
        let mut rbr = [0];

        uart.read(5, &mut lsr);
        uart.read(0, &mut rbr);

        assert_eq!(lsr[0] & 1, 1);
        assert_eq!(rbr[0], b'o');
    }

    #[test]
    fn send_stops_at_fifo_capacity() {
        let uart = uart();

        let accepted = uart.send(&[b'x'; 100]);

        assert_eq!(accepted, 64);
        assert_eq!(uart.send(b"y"), 0);
    }

    #[test]
    fn state_round_trip_keeps_pending_input() {
        let uart = uart();
        uart.write(7, &[0x5a]); // scratch register
        uart.send(b"abc");

        let restored =
            Uart::from_state(&uart.state(), EventFd::new(libc::EFD_NONBLOCK).unwrap()).unwrap();

        assert_eq!(restored.state(), uart.state());
        assert_eq!(restored.state().scratch, 0x5a);
    }

    #[test]
    fn wide_access_is_ignored() {
        let uart = uart();
        let mut data = [0u8; 2];

        uart.read(0, &mut data);
        uart.write(0, &[1, 2]);

        assert_eq!(data, [0xff, 0xff]);
    }
}
