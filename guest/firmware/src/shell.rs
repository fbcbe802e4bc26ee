//! The main loop and the console shell.
//!
//! Each pass advances the status block's counter and polls COM1; with nothing to read it asks the
//! VMM to park the vCPU for the idle period (a CPL3 guest cannot `hlt`). Reply formats are listed
//! in `protocol.rs`; tests parse them.

use crate::command::{Command, Edit, LineEditor};
use crate::io;
use crate::netstack::NetStack;
use crate::protocol::{ERROR_PREFIX, PROMPT};
use crate::records::RecordLog;
use crate::serial::Serial;
use crate::status;

const HELP: &str = "commands: echo <text>, status, write <n>, dirty <n>, udp <ip> <port> <n> [size], ping <ip> <n>, halt, reboot, help";
const PAGE_SIZE: u64 = 4096;

/// RAM the `dirty` command may write: `[base, end)`, owned by nothing else in the guest.
#[derive(Clone, Copy, Debug)]
pub struct DirtyRange {
    base: u64,
    end: u64,
}

impl DirtyRange {
    /// Claims `[base, end)` for the `dirty` command (empty if `end <= base`).
    ///
    /// # Safety
    ///
    /// The range must be RAM inside the identity map that no object of the program occupies, and
    /// nothing else may write to it.
    pub unsafe fn new(base: u64, end: u64) -> Self {
        Self {
            base,
            end: end.max(base),
        }
    }

    /// Stores `value` into the first byte of each of the first `pages` pages; `None` (and nothing
    /// written) if the range is shorter.
    fn dirty(&self, pages: u64, value: u8) -> Option<u64> {
        let bytes = pages.checked_mul(PAGE_SIZE)?;
        if bytes > self.end - self.base {
            return None;
        }
        for page in 0..pages {
            let address = self.base + page * PAGE_SIZE;
            // SAFETY: `address` lies in the range `new`'s contract reserves for this purpose.
            unsafe { core::ptr::write_volatile(address as *mut u8, value) };
        }
        Some(self.base)
    }
}

/// The console shell and the guest's main loop.
#[derive(Debug)]
pub struct Shell {
    serial: Serial,
    editor: LineEditor,
    machine: Machine,
    idle_us: u32,
}

impl Shell {
    /// A shell on `serial`, appending to `log` (if there is a disk), answering on `net` (if
    /// there is a network adapter).
    pub fn new(
        serial: Serial,
        log: Option<RecordLog>,
        net: Option<NetStack>,
        dirty: DirtyRange,
        idle_us: u32,
    ) -> Self {
        Self {
            serial,
            editor: LineEditor::default(),
            machine: Machine { log, net, dirty },
            idle_us,
        }
    }

    /// Runs the main loop forever.
    pub fn run(mut self) -> ! {
        self.serial.write_bytes(PROMPT.as_bytes());
        loop {
            status::tick(io::rdtsc());
            let frames = self.machine.net.as_mut().map_or(0, NetStack::poll);
            match self.serial.read_byte() {
                Some(byte) => self.receive(byte),
                None if self.idle_us > 0 && frames == 0 => io::idle(self.idle_us),
                None => {}
            }
        }
    }

    fn receive(&mut self, byte: u8) {
        match self.editor.feed(byte) {
            Edit::None => {}
            Edit::Echo(byte) => self.serial.write_bytes(&[byte]),
            Edit::Erase => self.serial.write_bytes(b"\x08 \x08"),
            Edit::Submit => {
                self.serial.write_bytes(b"\r\n");
                let command = Command::parse(self.editor.line());
                self.machine.execute(command, &mut self.serial);
                self.serial.write_bytes(PROMPT.as_bytes());
            }
        }
    }
}

/// What the commands act on.
#[derive(Debug)]
struct Machine {
    log: Option<RecordLog>,
    net: Option<NetStack>,
    dirty: DirtyRange,
}

impl Machine {
    fn execute(&mut self, command: Command<'_>, serial: &mut Serial) {
        match command {
            Command::Empty => {}
            Command::Echo(text) => serial.write_line(format_args!("{text}")),
            Command::Status => {
                let block = status::read();
                serial.write_line(format_args!(
                    "counter={} records={} ticks={}",
                    block.counter, block.records_written, block.ticks
                ));
            }
            Command::Write(count) => match self.log.as_mut().map(|log| log.append(count)) {
                Some(Ok(total)) => {
                    serial.write_line(format_args!("wrote {count} records, total {total}"))
                }
                Some(Err(error)) => serial.write_line(format_args!("{ERROR_PREFIX}{error}")),
                None => serial.write_line(format_args!("{ERROR_PREFIX}no disk")),
            },
            Command::Dirty(pages) => match self.dirty.dirty(pages, status::read().counter as u8) {
                Some(base) => serial.write_line(format_args!("dirtied {pages} pages at {base:#x}")),
                None => serial.write_line(format_args!("{ERROR_PREFIX}not enough memory")),
            },
            Command::Udp {
                ip,
                port,
                count,
                size,
            } => match self.net.as_mut().map(|net| net.send_udp(ip, port, count, size)) {
                Some(Ok(())) => serial.write_line(format_args!(
                    "sent {count} datagrams to {}.{}.{}.{}:{port}",
                    ip[0], ip[1], ip[2], ip[3]
                )),
                Some(Err(error)) => serial.write_line(format_args!("{ERROR_PREFIX}{error}")),
                None => serial.write_line(format_args!("{ERROR_PREFIX}no network")),
            },
            Command::Ping { ip, count } => match self.net.as_mut().map(|net| net.ping(ip, count)) {
                Some(Ok(replies)) => {
                    serial.write_line(format_args!("ping: {replies}/{count} replies"))
                }
                Some(Err(error)) => serial.write_line(format_args!("{ERROR_PREFIX}{error}")),
                None => serial.write_line(format_args!("{ERROR_PREFIX}no network")),
            },
            Command::BadArguments(argument) => {
                serial.write_line(format_args!("{ERROR_PREFIX}bad arguments: {argument}"))
            }
            Command::Halt => {
                serial.write_line(format_args!("halting"));
                io::power_off();
            }
            Command::Reboot => {
                serial.write_line(format_args!("rebooting"));
                io::reset();
            }
            Command::Help => serial.write_line(format_args!("{HELP}")),
            Command::BadNumber(argument) => {
                serial.write_line(format_args!("{ERROR_PREFIX}bad number: {argument}"))
            }
            Command::Unknown(word) => serial.write_line(format_args!("unknown command: {word}")),
        }
    }
}
