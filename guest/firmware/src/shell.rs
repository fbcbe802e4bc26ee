//! The main loop and the console shell.
//!
//! Each pass advances the status block's counter, serves the integration agent on COM2, appends
//! a batch of records while `writeloop` runs (and no freeze holds it), and polls COM1; with
//! nothing to do it asks the VMM to park the vCPU for the idle period (a CPL3 guest cannot
//! `hlt`). Reply formats are listed in `protocol.rs`; tests parse them.

use crate::agent::{Agent, AgentHost};
use crate::command::{Command, Edit, LineEditor};
use crate::io;
use crate::netstack::NetStack;
use crate::protocol::{
    AGENT_SHUTDOWN_LINE, ERROR_PREFIX, PROMPT, STATUS_FROZEN, STATUS_WRITELOOP, WRITELOOP_BATCH,
};
use crate::records::RecordLog;
use crate::serial::Serial;
use crate::status;

const HELP: &str = "commands: echo <text>, status, write <n> [per-request], writeloop, stop, dirty <n>, udp <ip> <port> <n> [size], ping <ip> <n>, halt, reboot, help (COM2: guest agent)";
/// Bytes of agent input taken per main-loop pass at most (the receive FIFO holds 64).
const AGENT_BYTES_PER_PASS: usize = 64;
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
    /// COM2 and the agent serving it (`None`: `agent=off`).
    channel: Option<Serial>,
    agent: Agent,
}

impl Shell {
    /// A shell on `serial`, appending to `log` (if there is a disk), answering on `net` (if
    /// there is a network adapter), with the integration agent on `channel` (COM2) if given.
    pub fn new(
        serial: Serial,
        channel: Option<Serial>,
        log: Option<RecordLog>,
        net: Option<NetStack>,
        dirty: DirtyRange,
        idle_us: u32,
    ) -> Self {
        Self {
            serial,
            editor: LineEditor::default(),
            machine: Machine {
                log,
                net,
                dirty,
                writeloop: false,
                frozen: false,
            },
            idle_us,
            channel,
            agent: Agent::default(),
        }
    }

    /// The same shell with `agent` serving COM2 instead of the default one.
    pub fn with_agent(mut self, agent: Agent) -> Self {
        self.agent = agent;
        self
    }

    /// Runs the main loop forever.
    pub fn run(mut self) -> ! {
        self.serial.write_bytes(PROMPT.as_bytes());
        loop {
            status::tick(io::rdtsc());
            let frames = self.machine.net.as_mut().map_or(0, NetStack::poll);
            let agent_bytes = self.serve_agent();
            let wrote = self.machine.write_loop_pass(&mut self.serial);
            match self.serial.read_byte() {
                Some(byte) => self.receive(byte),
                None if self.idle_us > 0 && frames == 0 && agent_bytes == 0 && !wrote => {
                    io::idle(self.idle_us)
                }
                None => {}
            }
        }
    }

    /// Takes what the host sent on COM2 and answers it; returns the bytes taken.
    fn serve_agent(&mut self) -> usize {
        let Some(channel) = self.channel.as_mut() else {
            return 0;
        };
        let mut taken = 0;
        while taken < AGENT_BYTES_PER_PASS {
            let Some(byte) = channel.read_byte() else {
                break;
            };
            taken += 1;
            let mut host = AgentDisk {
                log: &mut self.machine.log,
                shutdown: None,
            };
            self.agent.receive(byte, &mut host, channel);
            let shutdown = host.shutdown;
            if self.machine.frozen != self.agent.frozen() {
                self.machine.frozen = self.agent.frozen();
                self.machine.publish_flags();
            }
            match shutdown {
                Some(false) => {
                    self.serial
                        .write_line(format_args!("{AGENT_SHUTDOWN_LINE}"));
                    io::power_off();
                }
                Some(true) => {
                    self.serial
                        .write_line(format_args!("{AGENT_SHUTDOWN_LINE}"));
                    io::reset();
                }
                None => {}
            }
        }
        taken
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

/// The agent's view of the machine: the record log it freezes.
struct AgentDisk<'a> {
    log: &'a mut Option<RecordLog>,
    /// Set by `guest-shutdown`: power off (`false`) or reset (`true`) once the agent returns.
    shutdown: Option<bool>,
}

impl AgentHost for AgentDisk<'_> {
    fn freeze(&mut self) -> u32 {
        // Appends complete before they return, so nothing is in flight: make it durable. A
        // device that cannot flush has nothing cached to lose either.
        match self.log.as_mut() {
            Some(log) => {
                let _ = log.flush();
                1
            }
            None => 0,
        }
    }

    fn thaw(&mut self) -> u32 {
        u32::from(self.log.is_some())
    }

    fn shutdown(&mut self, reboot: bool) {
        self.shutdown = Some(reboot);
    }
}

/// What the commands act on.
#[derive(Debug)]
struct Machine {
    log: Option<RecordLog>,
    net: Option<NetStack>,
    dirty: DirtyRange,
    /// `writeloop` runs.
    writeloop: bool,
    /// The agent holds a freeze: no record is written.
    frozen: bool,
}

impl Machine {
    /// One pass of `writeloop`: a batch of records unless stopped or frozen; whether it wrote.
    /// An error ends the loop with a line on the console.
    fn write_loop_pass(&mut self, serial: &mut Serial) -> bool {
        if !self.writeloop || self.frozen {
            return false;
        }
        let result = match self.log.as_mut() {
            Some(log) => log.append(WRITELOOP_BATCH, u64::MAX).map(drop),
            None => return false,
        };
        if let Err(error) = result {
            self.writeloop = false;
            self.publish_flags();
            serial.write_line(format_args!("writeloop stopped: {error}"));
            return false;
        }
        true
    }

    fn publish_flags(&self) {
        let mut flags = 0;
        if self.frozen {
            flags |= STATUS_FROZEN;
        }
        if self.writeloop {
            flags |= STATUS_WRITELOOP;
        }
        status::set_flags(flags);
    }

    fn records(&self) -> u64 {
        self.log.as_ref().map_or(0, RecordLog::len)
    }

    fn execute(&mut self, command: Command<'_>, serial: &mut Serial) {
        match command {
            Command::Empty => {}
            Command::Echo(text) => serial.write_line(format_args!("{text}")),
            Command::Status => {
                let block = status::read();
                serial.write_line(format_args!(
                    "counter={} records={} ticks={} frozen={} writeloop={}",
                    block.counter,
                    block.records_written,
                    block.ticks,
                    u8::from(self.frozen),
                    u8::from(self.writeloop)
                ));
            }
            Command::Write { .. } if self.frozen => {
                serial.write_line(format_args!("{ERROR_PREFIX}frozen"))
            }
            Command::WriteLoop => match &self.log {
                None => serial.write_line(format_args!("{ERROR_PREFIX}no disk")),
                Some(_) => {
                    self.writeloop = true;
                    self.publish_flags();
                    serial.write_line(format_args!("writeloop started, total {}", self.records()));
                }
            },
            Command::Stop if self.writeloop => {
                self.writeloop = false;
                self.publish_flags();
                serial.write_line(format_args!("writeloop stopped, total {}", self.records()));
            }
            Command::Stop => serial.write_line(format_args!("writeloop is not running")),
            Command::Write { count, per_request } => match self
                .log
                .as_mut()
                .map(|log| log.append(count, per_request.unwrap_or(u64::MAX)))
            {
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
            } => match self
                .net
                .as_mut()
                .map(|net| net.send_udp(ip, port, count, size))
            {
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
