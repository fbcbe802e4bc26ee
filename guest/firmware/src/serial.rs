//! COM1 (the console) and COM2 (the integration agent's channel): polled 8250/16550A UARTs.
//!
//! Each register access is a VM exit (~25 µs from CPL3 on a software KVM), so the driver counts:
//! when the UART has a 16-byte FIFO (a 16550A, which vm-superio's UART reports) it writes up to 16
//! bytes per "transmitter empty" check, and it formats whole lines before sending them.

use core::fmt;

use crate::io::{inb, outb};
use crate::protocol::LINE_END;

/// COM1's I/O base.
const COM1: u16 = 0x3f8;
/// COM2's I/O base: the integration channel (see `agent.rs`).
const COM2: u16 = 0x2f8;

/// Register offsets (DLAB = 0 unless noted).
const DATA: u16 = 0;
const INTERRUPT_ENABLE: u16 = 1;
const DIVISOR_LOW: u16 = 0; // DLAB = 1
const DIVISOR_HIGH: u16 = 1; // DLAB = 1
const FIFO_CONTROL: u16 = 2; // write
const INTERRUPT_ID: u16 = 2; // read
const LINE_CONTROL: u16 = 3;
const MODEM_CONTROL: u16 = 4;
const LINE_STATUS: u16 = 5;

const LCR_DLAB: u8 = 0x80;
const LCR_8N1: u8 = 0x03;
/// FIFO enable, clear receive and transmit FIFOs.
const FCR_ENABLE_CLEAR: u8 = 0x07;
/// IIR bits 6-7 both set: the FIFO is enabled and works (16550A).
const IIR_FIFO_ENABLED: u8 = 0xc0;
/// DTR | RTS; OUT2 stays clear so the UART raises no interrupt line.
const MCR_DTR_RTS: u8 = 0x03;
const LSR_DATA_READY: u8 = 0x01;
const LSR_THR_EMPTY: u8 = 0x20;
const FIFO_DEPTH: u8 = 16;

/// The longest line [`Serial::write_line`] sends; longer lines are cut.
const MAX_LINE: usize = 256;

/// One UART: the console (COM1) or the agent's channel (COM2).
#[derive(Debug)]
pub struct Serial {
    base: u16,
    /// Bytes the transmitter accepts after it reports empty: 16 with a FIFO, else 1.
    burst: u8,
    /// Bytes that may still be written without checking the line status again.
    credit: u8,
}

impl Serial {
    /// Programs COM1 for polled use: no interrupts, 115200 8N1, FIFO on if present.
    pub fn init_com1() -> Self {
        Self::init(COM1)
    }

    /// Programs COM2, the integration agent's channel, like COM1.
    pub fn init_com2() -> Self {
        Self::init(COM2)
    }

    fn init(base: u16) -> Self {
        outb(base + INTERRUPT_ENABLE, 0);
        outb(base + LINE_CONTROL, LCR_DLAB);
        outb(base + DIVISOR_LOW, 1);
        outb(base + DIVISOR_HIGH, 0);
        outb(base + LINE_CONTROL, LCR_8N1);
        outb(base + FIFO_CONTROL, FCR_ENABLE_CLEAR);
        outb(base + MODEM_CONTROL, MCR_DTR_RTS);
        let fifo = inb(base + INTERRUPT_ID) & IIR_FIFO_ENABLED == IIR_FIFO_ENABLED;
        Self {
            base,
            burst: if fifo { FIFO_DEPTH } else { 1 },
            credit: 0,
        }
    }

    /// Uses COM1 as it is, one byte per "transmitter empty" check: for the fatal-error paths, which
    /// must not depend on (or disturb) the state the main program left.
    pub fn attach_com1() -> Self {
        Self {
            base: COM1,
            burst: 1,
            credit: 0,
        }
    }

    /// Sends `bytes`, waiting for room in the transmitter as needed.
    pub fn write_bytes(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            while self.credit == 0 {
                self.poll_line_status();
            }
            outb(self.base + DATA, byte);
            self.credit -= 1;
        }
    }

    /// Formats `args` and sends it as one line, followed by `\r\n`.
    pub fn write_line(&mut self, args: fmt::Arguments<'_>) {
        let mut line = LineBuffer::default();
        // A line longer than the buffer is cut; formatting itself cannot fail.
        let _ = fmt::write(&mut line, args);
        let _ = fmt::Write::write_str(&mut line, LINE_END);
        self.write_bytes(line.as_bytes());
    }

    /// Returns the next received byte, if one is waiting.
    pub fn read_byte(&mut self) -> Option<u8> {
        if self.poll_line_status() & LSR_DATA_READY == 0 {
            return None;
        }
        Some(inb(self.base + DATA))
    }

    /// Reads the line status, refilling the transmit credit when the transmitter is empty.
    fn poll_line_status(&mut self) -> u8 {
        let status = inb(self.base + LINE_STATUS);
        if status & LSR_THR_EMPTY != 0 {
            self.credit = self.burst;
        }
        status
    }
}

impl crate::agent::ReplySink for Serial {
    fn write_sentinel(&mut self) {
        self.write_bytes(&[crate::agent::SYNC_BYTE]);
    }
}

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.write_bytes(s.as_bytes());
        Ok(())
    }
}

/// A line being formatted; keeps the first [`MAX_LINE`] bytes (the `\r\n` always fits at the end).
#[derive(Debug)]
struct LineBuffer {
    bytes: [u8; MAX_LINE],
    len: usize,
}

impl Default for LineBuffer {
    fn default() -> Self {
        Self {
            bytes: [0; MAX_LINE],
            len: 0,
        }
    }
}

impl LineBuffer {
    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl fmt::Write for LineBuffer {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let is_line_end = s == LINE_END;
        let limit = if is_line_end {
            MAX_LINE
        } else {
            MAX_LINE - LINE_END.len()
        };
        let take = s.len().min(limit.saturating_sub(self.len));
        self.bytes[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}
