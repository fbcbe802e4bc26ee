//! The vmms test guest: a freestanding program the vmms partitions boot like a Linux kernel.
//!
//! `boot.rs` takes the few steps that need CPL0 and drops to CPL3, where [`guest_main`] runs at
//! native speed on a software KVM: it reads the boot parameters, brings up COM1 and the
//! virtio-blk disk, then either runs a benchmark loop (`bench=<mode>`) or the console shell and
//! main loop, which also serves the integration agent on COM2 (`agent.rs`). What the host and the guest agree on is in `protocol.rs`.

#![no_std]
#![no_main]

mod agent;
mod bench;
mod boot;
mod bootparams;
mod cmdline;
mod command;
mod io;
mod mem;
mod netstack;
#[allow(
    dead_code,
    reason = "shared with the host crate, which uses what the guest does not"
)]
mod protocol;
mod records;
mod serial;
mod shell;
mod status;
mod virtio_blk;
mod virtio_mmio;
mod virtio_net;

use core::panic::PanicInfo;

use bench::BenchMode;
use bootparams::{COMMAND_LINE_MAX, Range, ZERO_PAGE_SIZE, ZeroPage};
use cmdline::{Cmdline, VIRTIO_MMIO_KEY, parse_virtio_mmio_device};
use netstack::NetStack;
use protocol::{
    AGENT_CMDLINE_KEY, BANNER, BENCH_CMDLINE_KEY, BENCH_MMIO_ADDR, DEFAULT_IDLE_US, DIRTY_BASE,
    DISK_LINE_PREFIX, ERROR_PREFIX, IDLE_CMDLINE_KEY, IP_CMDLINE_KEY, NET_LINE_PREFIX,
    PANIC_PREFIX,
};
use records::RecordLog;
use serial::Serial;
use shell::{DirtyRange, Shell};
use virtio_blk::VirtioBlk;
use virtio_net::{DEVICE_ID_NET, VirtioNet};

/// End of the identity map `boot.rs` builds: everything the guest touches lies below.
const IDENTITY_MAP_END: u64 = 1 << 32;

/// The guest's program at CPL3. `zero_page` is the guest-physical address of `boot_params` the VMM
/// passed in RSI.
extern "sysv64" fn guest_main(zero_page: u64) -> ! {
    let zero_page = copy_zero_page(zero_page);
    let zero_page = ZeroPage::new(&zero_page);
    let (cmdline_bytes, cmdline_len) = copy_command_line(&zero_page);
    let cmdline = Cmdline::from_bytes(&cmdline_bytes[..cmdline_len]);

    status::init(DIRTY_BASE);
    let mut serial = Serial::init_com1();

    if let Some(name) = cmdline.value(BENCH_CMDLINE_KEY) {
        run_bench(&mut serial, &zero_page, name);
    }

    let log = open_disk(&mut serial, &zero_page, &cmdline);
    let net = open_net(&mut serial, &zero_page, &cmdline);
    let idle_us = cmdline
        .value(IDLE_CMDLINE_KEY)
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_IDLE_US);
    let dirty_end = zero_page
        .ram()
        .find(|ram| ram.start <= DIRTY_BASE && DIRTY_BASE < ram.end)
        .map_or(DIRTY_BASE, |ram| ram.end.min(IDENTITY_MAP_END));
    // SAFETY: `[DIRTY_BASE, dirty_end)` is RAM per e820, inside the identity map, above the image
    // (link.ld asserts the image ends below DIRTY_BASE) and used by nothing else.
    let dirty = unsafe { DirtyRange::new(DIRTY_BASE, dirty_end) };

    serial.write_line(format_args!("{BANNER}"));
    // `agent=off`: COM2 stays unprogrammed and unread, as in a guest without integration services.
    // `agent=hang-freeze`: the agent answers but never completes a freeze.
    let agent_mode = cmdline.value(AGENT_CMDLINE_KEY);
    let channel = (agent_mode != Some("off")).then(Serial::init_com2);
    let shell = Shell::new(serial, channel, log, net, dirty, idle_us);
    match agent_mode {
        Some("hang-freeze") => shell.with_agent(agent::Agent::hanging_on_freeze()),
        _ => shell,
    }
    .run()
}

/// Starts the benchmark loop `name`; returns only if there is no such benchmark.
fn run_bench(serial: &mut Serial, zero_page: &ZeroPage<'_>, name: &str) {
    let Some(mode) = BenchMode::parse(name) else {
        serial.write_line(format_args!("{ERROR_PREFIX}unknown bench mode: {name}"));
        return;
    };
    if mode.uses_mmio()
        && zero_page.overlaps_ram(Range {
            start: BENCH_MMIO_ADDR,
            end: BENCH_MMIO_ADDR + 4,
        })
    {
        serial.write_line(format_args!(
            "{ERROR_PREFIX}bench address {BENCH_MMIO_ADDR:#x} is RAM"
        ));
        return;
    }
    serial.write_line(format_args!("bench {name}"));
    // SAFETY: BENCH_MMIO_ADDR lies below 4 GiB (in the identity map) and is not RAM (checked above).
    unsafe { bench::run(mode) }
}

/// Brings up the first virtio-blk device on the command line and opens its record log, printing
/// the outcome as the `disk: ` line.
fn open_disk(
    serial: &mut Serial,
    zero_page: &ZeroPage<'_>,
    cmdline: &Cmdline<'_>,
) -> Option<RecordLog> {
    // The first device that is not a network adapter.
    let Some(device) = cmdline
        .values(VIRTIO_MMIO_KEY)
        .filter_map(parse_virtio_mmio_device)
        .find(|device| device_id(zero_page, device) != Some(DEVICE_ID_NET))
    else {
        serial.write_line(format_args!("{DISK_LINE_PREFIX}none"));
        return None;
    };
    let window = Range {
        start: device.base,
        end: device.base + device.size,
    };
    if !virtio_blk::window_usable(device.base, device.size) || zero_page.overlaps_ram(window) {
        serial.write_line(format_args!(
            "{DISK_LINE_PREFIX}{ERROR_PREFIX}{}",
            virtio_mmio::ProbeError::BadWindow
        ));
        return None;
    }
    // SAFETY: the window lies in the identity map and is not RAM (checked above), so it holds no
    // object of the program; it is the only `Mmio` created for it.
    let regs = unsafe { io::Mmio::new(device.base, device.size) };
    let disk = match VirtioBlk::probe(regs) {
        Ok(disk) => disk,
        Err(error) => {
            serial.write_line(format_args!("{DISK_LINE_PREFIX}{ERROR_PREFIX}{error}"));
            return None;
        }
    };
    match RecordLog::open(disk) {
        Ok(log) => {
            serial.write_line(format_args!(
                "{DISK_LINE_PREFIX}{} sectors, {} records",
                log.capacity_sectors(),
                log.len()
            ));
            Some(log)
        }
        Err(error) => {
            serial.write_line(format_args!(
                "{DISK_LINE_PREFIX}{ERROR_PREFIX}{}",
                records::AppendError::Device(error)
            ));
            None
        }
    }
}

/// The virtio device ID in `device`'s window, if the window is usable (see
/// [`virtio_blk::window_usable`]) and not RAM.
fn device_id(zero_page: &ZeroPage<'_>, device: &cmdline::VirtioMmioDevice) -> Option<u32> {
    let window = Range {
        start: device.base,
        end: device.base + device.size,
    };
    if !virtio_blk::window_usable(device.base, device.size) || zero_page.overlaps_ram(window) {
        return None;
    }
    // SAFETY: the window lies in the identity map and is not RAM (checked above); this `Mmio`
    // lives only for the read, before any driver takes the window.
    let regs = unsafe { io::Mmio::new(device.base, device.size) };
    Some(virtio_mmio::device_id(&regs))
}

/// Brings up the first virtio-net device on the command line with the address of `ip=`,
/// printing the outcome as the `net: ` line.
fn open_net(
    serial: &mut Serial,
    zero_page: &ZeroPage<'_>,
    cmdline: &Cmdline<'_>,
) -> Option<NetStack> {
    let Some(device) = cmdline
        .values(VIRTIO_MMIO_KEY)
        .filter_map(parse_virtio_mmio_device)
        .find(|device| device_id(zero_page, device) == Some(DEVICE_ID_NET))
    else {
        serial.write_line(format_args!("{NET_LINE_PREFIX}none"));
        return None;
    };
    let ip = cmdline
        .value(IP_CMDLINE_KEY)
        .and_then(|value| command::parse_ipv4(value.split(':').next().unwrap_or_default()))
        .unwrap_or([0; 4]);
    // SAFETY: `device_id` checked the window (identity map, not RAM); this is the only `Mmio`
    // that outlives the check for it.
    let regs = unsafe { io::Mmio::new(device.base, device.size) };
    match VirtioNet::probe(regs) {
        Ok(nic) => {
            let net = NetStack::new(nic, ip);
            let [a, b, c, d, e, f] = net.mac();
            let [i, j, k, l] = net.ip();
            serial.write_line(format_args!(
                "{NET_LINE_PREFIX}{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x} {i}.{j}.{k}.{l}"
            ));
            Some(net)
        }
        Err(error) => {
            serial.write_line(format_args!("{NET_LINE_PREFIX}{ERROR_PREFIX}{error}"));
            None
        }
    }
}

/// Copies `boot_params` out of guest memory. A zero page the identity map does not cover (a VMM
/// bug) reads as all zeros: no RAM, no command line.
fn copy_zero_page(address: u64) -> [u8; ZERO_PAGE_SIZE] {
    let mapped = address != 0
        && address
            .checked_add(ZERO_PAGE_SIZE as u64)
            .is_some_and(|end| end <= IDENTITY_MAP_END);
    if !mapped {
        return [0; ZERO_PAGE_SIZE];
    }
    // SAFETY: the boot protocol puts `boot_params` at `address` in RAM, inside the identity map
    // (checked above), and nothing in the guest writes to it.
    unsafe { core::ptr::read_unaligned(address as *const [u8; ZERO_PAGE_SIZE]) }
}

/// Copies the NUL-terminated command line out of guest memory, as far as it lies in RAM and at most
/// [`COMMAND_LINE_MAX`] - 1 bytes; returns the buffer and the line's length.
fn copy_command_line(zero_page: &ZeroPage<'_>) -> ([u8; COMMAND_LINE_MAX], usize) {
    let mut line = [0u8; COMMAND_LINE_MAX];
    let start = zero_page.command_line_address();
    let Some(ram) = zero_page
        .ram()
        .find(|ram| start != 0 && ram.start <= start && start < ram.end)
    else {
        return (line, 0);
    };
    let available = ram
        .end
        .min(IDENTITY_MAP_END)
        .saturating_sub(start)
        .min(COMMAND_LINE_MAX as u64 - 1);
    let mut len = 0;
    while len < available as usize {
        // SAFETY: `start + len` lies in a RAM range of the e820 map inside the identity map (bounded
        // by `available` above); the VMM wrote the command line there and nothing in the guest
        // writes to it.
        let byte = unsafe { core::ptr::read_volatile((start as usize + len) as *const u8) };
        if byte == 0 {
            break;
        }
        line[len] = byte;
        len += 1;
    }
    (line, len)
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    let mut serial = Serial::attach_com1();
    match info.location() {
        Some(location) => serial.write_line(format_args!(
            "{PANIC_PREFIX}{}:{}: {}",
            location.file(),
            location.line(),
            info.message()
        )),
        None => serial.write_line(format_args!("{PANIC_PREFIX}{}", info.message())),
    }
    io::power_off()
}
