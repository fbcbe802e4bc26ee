//! Port I/O, MMIO and the two ways out of the guest (power-off, reset).
//!
//! Every device access of the guest goes through these few functions, so the `unsafe` for
//! `in`/`out` and volatile device memory sits here once. The main loop runs at CPL3, where the
//! IOPL and the TSS I/O bitmap `boot.rs` sets up allow `in`/`out`; the exception handler runs at
//! CPL0, where they are allowed anyway.

use core::arch::asm;

use crate::protocol::IDLE_PORT;

/// The ACPI PM1a control register (PIIX4 layout, as QEMU and the vmms partition place it).
const PM1A_CONTROL_PORT: u16 = 0x604;
/// PM1a control value for power-off: SLP_TYP = 5 (S5), SLP_EN.
const PM1A_SLEEP_S5: u16 = (5 << 10) | (1 << 13);
/// The i8042 command port and its "pulse reset line" command.
const I8042_COMMAND_PORT: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// Writes `value` to I/O port `port`.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O touches no memory the program owns; every port the guest uses belongs to an
    // emulated device of the partition. `boot.rs` allows it at CPL3.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Writes the 16-bit `value` to I/O port `port`.
pub fn outw(port: u16, value: u16) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Writes the 32-bit `value` to I/O port `port`.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from I/O port `port`.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Reads the time-stamp counter (allowed at CPL3: the guest leaves CR4.TSD clear).
pub fn rdtsc() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: `rdtsc` only reads the TSC into edx:eax.
    unsafe {
        asm!("rdtsc", out("eax") low, out("edx") high, options(nomem, nostack, preserves_flags))
    }
    (u64::from(high) << 32) | u64::from(low)
}

/// Asks the VMM to park this vCPU for up to `micros` microseconds ([`IDLE_PORT`]).
pub fn idle(micros: u32) {
    outl(IDLE_PORT, micros);
}

/// Powers the machine off through ACPI PM1a. If the VMM ignores the request, the vCPU stays parked
/// on the idle port (a CPL3 guest cannot `hlt`).
pub fn power_off() -> ! {
    request_power_off();
    loop {
        idle(u32::MAX);
    }
}

/// Asks the VMM to power the machine off (ACPI PM1a SLP_EN with S5); returns if it does not.
pub fn request_power_off() {
    outw(PM1A_CONTROL_PORT, PM1A_SLEEP_S5);
}

/// Resets the machine through the i8042 controller, as Linux's `reboot=k` does.
pub fn reset() -> ! {
    outb(I8042_COMMAND_PORT, I8042_RESET);
    loop {
        idle(u32::MAX);
    }
}

/// A window of device registers in guest-physical space (identity-mapped, so the address is also a
/// pointer), accessed with single, volatile, naturally aligned 32-bit loads and stores.
#[derive(Debug)]
pub struct Mmio {
    base: usize,
    size: usize,
}

impl Mmio {
    /// Wraps the register window `[base, base + size)`.
    ///
    /// # Safety
    ///
    /// The window must be device memory inside the guest's identity map (below 4 GiB), holding no
    /// object of this program, and no other `Mmio` may cover it.
    pub unsafe fn new(base: u64, size: u64) -> Self {
        Self {
            base: base as usize,
            size: size as usize,
        }
    }

    /// Reads the 32-bit register at `offset`.
    ///
    /// # Panics
    ///
    /// If `offset` is not 4-byte aligned or outside the window (a driver bug, not device input).
    pub fn read32(&self, offset: usize) -> u32 {
        let address = self.register(offset);
        // SAFETY: `register` checked that the access is aligned and inside the window, which `new`'s
        // contract makes device memory owned by this `Mmio`.
        unsafe { core::ptr::read_volatile(address as *const u32) }
    }

    /// Writes the 32-bit register at `offset`.
    ///
    /// # Panics
    ///
    /// As [`Mmio::read32`].
    pub fn write32(&self, offset: usize, value: u32) {
        let address = self.register(offset);
        // SAFETY: as for `read32`.
        unsafe { core::ptr::write_volatile(address as *mut u32, value) }
    }

    fn register(&self, offset: usize) -> usize {
        assert!(
            offset.is_multiple_of(4) && offset + 4 <= self.size,
            "mmio register {offset:#x} out of window"
        );
        self.base + offset
    }
}

/// Stores `value` at guest-physical `address` with one volatile 4-byte access (the benchmark's MMIO
/// write). Kept apart from [`Mmio`] so the loop compiles to a single `mov`.
///
/// # Safety
///
/// `address` must be 4-byte aligned device memory inside the identity map, holding no object of
/// this program.
pub unsafe fn mmio_write32(address: u64, value: u32) {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::write_volatile(address as *mut u32, value) }
}

/// Loads a 4-byte value from guest-physical `address` (the benchmark's MMIO read).
///
/// # Safety
///
/// As [`mmio_write32`].
pub unsafe fn mmio_read32(address: u64) -> u32 {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::read_volatile(address as *const u32) }
}
