//! What the test guest and the host agree on: fixed addresses, the shell's replies, the on-disk
//! record format and the benchmark ports.
//!
//! This file is compiled twice: into the freestanding guest, and into the host crate `vmms-guest`
//! (via `#[path]`) so host tests verify exactly the format the guest writes. It must stay `no_std`
//! and free of allocation.

/// Guest-physical address of the [`StatusBlock`]: the first page of the guest image.
pub const STATUS_GPA: u64 = 0x10_0000;

/// `StatusBlock::magic` once the guest has initialised it ("VMMSGST1").
pub const STATUS_MAGIC: u64 = u64::from_le_bytes(*b"VMMSGST1");

/// Live counters the guest publishes at [`STATUS_GPA`], readable by the host through guest memory
/// (for instance while the partition is paused).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatusBlock {
    /// [`STATUS_MAGIC`] once the guest is up.
    pub magic: u64,
    /// Advances continuously while the guest's main loop runs.
    pub counter: u64,
    /// Records appended to the disk since this disk was formatted (the next record's sequence number).
    pub records_written: u64,
    /// TSC reading at the last main-loop pass.
    pub ticks: u64,
    /// Base guest-physical address of the page range that `dirty N` touches.
    pub dirty_base: u64,
    /// [`STATUS_FROZEN`] and [`STATUS_WRITELOOP`].
    pub flags: u64,
}

/// [`StatusBlock::flags`]: the integration agent froze the guest's disk writes
/// (`guest-fsfreeze-freeze`); no record is written until a thaw.
pub const STATUS_FROZEN: u64 = 1 << 0;
/// [`StatusBlock::flags`]: the `writeloop` workload runs (it pauses while frozen).
pub const STATUS_WRITELOOP: u64 = 1 << 1;

/// Size of [`StatusBlock`] in guest memory.
pub const STATUS_BLOCK_SIZE: usize = core::mem::size_of::<StatusBlock>();

impl StatusBlock {
    /// Decodes a status block from the bytes at [`STATUS_GPA`] (native little-endian layout, fields
    /// in declaration order). `None` if `bytes` is shorter than [`STATUS_BLOCK_SIZE`].
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let word = |index: usize| {
            let at = index * 8;
            let field: [u8; 8] = bytes.get(at..at + 8)?.try_into().ok()?;
            Some(u64::from_le_bytes(field))
        };
        Some(Self {
            magic: word(0)?,
            counter: word(1)?,
            records_written: word(2)?,
            ticks: word(3)?,
            dirty_base: word(4)?,
            flags: word(5)?,
        })
    }
}

/// Guest-physical address of the first page `dirty <n>` writes to (16 MiB, above the guest image).
/// The guest also publishes it in [`StatusBlock::dirty_base`].
pub const DIRTY_BASE: u64 = 0x100_0000;

/// Size of one on-disk record and the disk block it occupies.
pub const RECORD_SIZE: usize = 4096;
/// `Record::magic` ("VMMSREC1").
pub const RECORD_MAGIC: u64 = u64::from_le_bytes(*b"VMMSREC1");
/// Byte offset of the checksum: the last 8 bytes of a record.
pub const RECORD_CHECKSUM_OFFSET: usize = RECORD_SIZE - 8;

/// Record `seq` lives at byte offset `seq * RECORD_SIZE` of the disk. Layout (little-endian):
/// `[0..8)` magic, `[8..16)` seq, `[16..RECORD_CHECKSUM_OFFSET)` payload where byte `i` is
/// `payload_byte(seq, i)`, `[RECORD_CHECKSUM_OFFSET..)` FNV-1a 64 of everything before it.
pub fn payload_byte(seq: u64, index: usize) -> u8 {
    (seq.wrapping_mul(31).wrapping_add(index as u64) & 0xff) as u8
}

/// FNV-1a 64 over `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= b as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Fills `buf` with record `seq`.
pub fn encode_record(seq: u64, buf: &mut [u8; RECORD_SIZE]) {
    buf[0..8].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    buf[8..16].copy_from_slice(&seq.to_le_bytes());
    for (i, b) in buf[16..RECORD_CHECKSUM_OFFSET].iter_mut().enumerate() {
        *b = payload_byte(seq, i);
    }
    let sum = fnv1a64(&buf[..RECORD_CHECKSUM_OFFSET]);
    buf[RECORD_CHECKSUM_OFFSET..].copy_from_slice(&sum.to_le_bytes());
}

/// Why a block is not a valid record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordError {
    /// The block does not start with [`RECORD_MAGIC`] (never written).
    NoMagic,
    /// The block holds another sequence number than its position says.
    WrongSequence {
        /// The sequence number found in the block.
        found: u64,
    },
    /// The checksum does not match the contents (a torn or corrupted write).
    BadChecksum,
    /// The payload differs from what the sequence number implies.
    BadPayload,
}

impl core::fmt::Display for RecordError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoMagic => f.write_str("no record magic"),
            Self::WrongSequence { found } => write!(f, "holds sequence number {found}"),
            Self::BadChecksum => f.write_str("checksum mismatch"),
            Self::BadPayload => f.write_str("payload mismatch"),
        }
    }
}

/// Checks that `block` is record `seq`, intact.
pub fn verify_record(seq: u64, block: &[u8; RECORD_SIZE]) -> Result<(), RecordError> {
    let word = |at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&block[at..at + 8]);
        u64::from_le_bytes(w)
    };
    if word(0) != RECORD_MAGIC {
        return Err(RecordError::NoMagic);
    }
    if word(8) != seq {
        return Err(RecordError::WrongSequence { found: word(8) });
    }
    if word(RECORD_CHECKSUM_OFFSET) != fnv1a64(&block[..RECORD_CHECKSUM_OFFSET]) {
        return Err(RecordError::BadChecksum);
    }
    let payload_ok = block[16..RECORD_CHECKSUM_OFFSET]
        .iter()
        .enumerate()
        .all(|(i, &b)| b == payload_byte(seq, i));
    if payload_ok {
        Ok(())
    } else {
        Err(RecordError::BadPayload)
    }
}

/// The first line the guest prints on COM1 once its main loop runs.
pub const BANNER: &str = "vmms test guest ready";
/// The shell prompt on COM1.
pub const PROMPT: &str = "> ";
/// Every line the guest prints ends with this.
pub const LINE_END: &str = "\r\n";

// The console, line by line. Before the banner the guest prints one [`DISK_LINE_PREFIX`] line:
//   `disk: none`                              no virtio-mmio device on the command line
//   `disk: <sectors> sectors, <n> records`    the disk is up; the next record is number <n>
//   `disk: error: <reason>`                   a device is announced but could not be used
// then [`BANNER`] and [`PROMPT`]. The shell echoes what it receives (a line ends at `\r` or `\n`,
// backspace and DEL erase), then answers each line with one reply line and prints [`PROMPT`] again.
// An empty line gets no reply. Commands and replies:
//   `echo <text>`   `<text>`
//   `status`        `counter=<dec> records=<dec> ticks=<dec>` (the [`StatusBlock`] fields)
//   `status`        also ` frozen=<0|1> writeloop=<0|1>` after `ticks` (see [`StatusBlock::flags`])
//   `write <n>`     `wrote <n> records, total <m>`: appends records `m-n .. m` and flushes the disk
//                   (if the device offers flush) before replying; nothing is written if they do not
//                   all fit; `error: frozen` while the agent holds a freeze
//   `writeloop`     `writeloop started, total <m>`: from now on every main-loop pass appends
//                   [`WRITELOOP_BATCH`] records (flushed), pausing while frozen, until `stop` or an
//                   error (then one line `writeloop stopped: <reason>` appears on its own)
//   `stop`          `writeloop stopped, total <m>` (or `writeloop is not running`)
//   `dirty <n>`     `dirtied <n> pages at 0x<hex>`: stores one byte into each of `n` consecutive
//                   4 KiB pages from [`DIRTY_BASE`]
//   `halt`          `halting`, then ACPI power-off
//   `reboot`        `rebooting`, then i8042 reset
//   `help`          one line listing the commands
//   anything else   `unknown command: <word>`
// A command that fails replies `error: <reason>` ([`ERROR_PREFIX`]), e.g. `error: no disk`,
// `error: disk full`, `error: disk is read-only`, `error: device error`, `error: bad number: <arg>`,
// `error: not enough memory`.
// Fatal conditions print one line and power the guest off:
//   `guest exception <vector, decimal> error=0x<hex> rip=0x<hex>` (a CPU exception;
//                   ` cr2=0x<hex>` follows for a page fault), see [`EXCEPTION_PREFIX`]
//   `guest panic: <file>:<line>: <message>`, see [`PANIC_PREFIX`]

// COM2 carries the integration agent: the qemu-guest-agent protocol subset (guest-sync-delimited,
// guest-sync, guest-ping, guest-info, guest-fsfreeze-freeze/-thaw/-status, guest-shutdown), one
// JSON object per command, one line per reply, `0xFF` resynchronises. See the firmware's
// `agent.rs`. A freeze finishes the disk's in-flight writes (the log flushes) and holds the
// record workload; `guest-shutdown` prints [`AGENT_SHUTDOWN_LINE`] on COM1 and powers off.

/// Command-line key switching the integration agent off: `agent=off` makes a guest whose COM2
/// nothing answers (a guest without integration services, for tests); `agent=hang-freeze` one
/// whose agent answers everything but never completes a freeze.
pub const AGENT_CMDLINE_KEY: &str = "agent";

/// Records `writeloop` appends per main-loop pass.
pub const WRITELOOP_BATCH: u64 = 1;
/// The console line the guest prints when its agent was asked to shut it down.
pub const AGENT_SHUTDOWN_LINE: &str = "shutdown requested by the integration agent";

/// Start of the one line describing the disk, printed before [`BANNER`].
pub const DISK_LINE_PREFIX: &str = "disk: ";
/// Start of the line about the network adapter, printed after the disk line:
/// `net: <mac> <ip>`, `net: none`, or `net: error: <reason>`.
pub const NET_LINE_PREFIX: &str = "net: ";
/// Command-line key with the guest's IPv4 address (Linux's `ip=<client-ip>[:...]`; only the
/// first field is read).
pub const IP_CMDLINE_KEY: &str = "ip";
/// Start of every reply to a command that failed.
pub const ERROR_PREFIX: &str = "error: ";
/// Start of the line printed when the guest takes a CPU exception (then it powers off).
pub const EXCEPTION_PREFIX: &str = "guest exception ";
/// Start of the line printed when the guest panics (then it powers off).
pub const PANIC_PREFIX: &str = "guest panic: ";

/// Command-line key selecting a benchmark loop instead of the shell: `bench=<mode>`. The guest
/// prints `bench <mode>` and then does nothing but one access per loop pass, forever.
pub const BENCH_CMDLINE_KEY: &str = "bench";
/// `bench=pio-out`: one byte `out` to [`BENCH_PIO_PORT`] per pass.
pub const BENCH_PIO_OUT: &str = "pio-out";
/// `bench=pio-in`: one byte `in` from [`BENCH_PIO_PORT`] per pass.
pub const BENCH_PIO_IN: &str = "pio-in";
/// `bench=mmio-write`: one 4-byte store to [`BENCH_MMIO_ADDR`] per pass.
pub const BENCH_MMIO_WRITE: &str = "mmio-write";
/// `bench=mmio-read`: one 4-byte load from [`BENCH_MMIO_ADDR`] per pass.
pub const BENCH_MMIO_READ: &str = "mmio-read";
/// Benchmark port: the `pio-out` loop writes one byte here, `pio-in` reads one byte.
pub const BENCH_PIO_PORT: u16 = 0x510;
/// Benchmark MMIO address: `mmio-write` writes 4 bytes here, `mmio-read` reads 4 bytes. It lies in the
/// MMIO gap, above the virtio-mmio windows.
pub const BENCH_MMIO_ADDR: u64 = 0xd100_0000;

/// Paravirtual idle port: a 32-bit write of `n` asks the VMM to stop running this vCPU for up to `n`
/// microseconds (less if the VMM has something to deliver or wants the vCPU back). A polling guest
/// at CPL3 cannot `hlt`, so without this each idle guest would spin a host core. Command-line key
/// `idle_us=<n>` sets the guest's idle period; `idle_us=0` disables idling.
pub const IDLE_PORT: u16 = 0x511;
/// Command-line key setting the main loop's idle period: `idle_us=<n>`.
pub const IDLE_CMDLINE_KEY: &str = "idle_us";
/// Default idle period of the guest's main loop in microseconds.
pub const DEFAULT_IDLE_US: u32 = 1000;
