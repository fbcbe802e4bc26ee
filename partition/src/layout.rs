//! Where things live in guest-physical and port space.
//!
//! The low-memory layout follows what Linux's 64-bit boot protocol expects and what Firecracker and
//! Cloud Hypervisor use, so a kernel booted here sees the machine it would see there. The MMIO gap
//! below 4 GiB holds the virtio-mmio windows; RAM that would fall into it continues above 4 GiB.

/// The boot GDT (null, 64-bit code, data, TSS).
pub const BOOT_GDT_START: u64 = 0x500;
/// The boot IDT (empty: the kernel installs its own before it enables interrupts).
pub const BOOT_IDT_START: u64 = 0x520;
/// The PVH `hvm_start_info` structure.
pub const PVH_INFO_START: u64 = 0x6000;
/// The PVH memory map that `hvm_start_info` points at (after the start info).
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// Linux's "zero page" (`struct boot_params`); RSI points here on 64-bit entry.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// The initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4 of the boot identity map.
pub const PML4_START: u64 = 0x9000;
/// The page-directory-pointer table of the boot identity map.
pub const PDPTE_START: u64 = 0xa000;
/// The page directory of the boot identity map: the first 1 GiB in 2 MiB pages.
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line accepted, including the NUL (Linux's default `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area: low RAM ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// Where kernels are loaded (1 MiB), and the start of the second e820 RAM range.
pub const HIMEM_START: u64 = 0x10_0000;

/// The MP table (floating pointer, then the configuration table): at the start of the last KiB of
/// base memory, one of the places Linux's MP-table scan searches. Runs up to [`ACPI_START`], inside
/// the e820-reserved range `[EBDA_START, HIMEM_START)`.
pub const MPTABLE_START: u64 = EBDA_START;
/// The ACPI tables: the RSDP first, in the BIOS area `0xe0000..0x100000` that a guest without a boot
/// protocol pointer scans, then XSDT, FACS, DSDT, FADT and MADT up to [`HIMEM_START`]. Reserved in
/// the e820 map.
pub const ACPI_START: u64 = 0xe_0000;

/// The in-kernel IOAPIC's MMIO window (KVM's fixed address; 24 pins, GSI 0-23).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Number of IOAPIC pins, and so of GSIs.
pub const IOAPIC_PINS: u8 = 24;
/// The local APICs' MMIO window (the architectural default address).
pub const APIC_START: u64 = 0xfee0_0000;

/// Start of the 32-bit MMIO gap: RAM never occupies `[MMIO_GAP_START, MMIO_GAP_END)`.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio window; device `n` sits at `VIRTIO_MMIO_BASE + n * VIRTIO_MMIO_SIZE`.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// GSI of virtio-mmio device 0; device `n` uses `VIRTIO_IRQ_BASE + n`.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Where the KVM TSS lives (three pages just below the LAPIC/IOAPIC window).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// The identity-map page KVM needs on VT-x (a page just below the TSS).
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// COM1: the console UART.
pub const COM1_PORT: u16 = 0x3f8;
/// The GSI of the ACPI system control interrupt (never raised: no fixed or general-purpose events).
pub const SCI_IRQ: u32 = 9;
/// COM1's interrupt line.
pub const COM1_IRQ: u32 = 4;
/// COM2: the integration-channel UART.
pub const COM2_PORT: u16 = 0x2f8;
/// COM2's interrupt line.
pub const COM2_IRQ: u32 = 3;
/// Size of one 8250 UART's register window.
pub const UART_PORT_SIZE: u64 = 8;
/// The i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// The i8042 command/status port; writing 0xfe here resets the machine.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// The CMOS/RTC index and data ports.
pub const CMOS_PORT: u16 = 0x70;
/// The ACPI PM1a event block (status and enable registers, 4 bytes) in QEMU's PIIX4 layout; the
/// FADT names it because the ACPI specification requires one.
pub const PM1A_EVENT_PORT: u16 = 0x600;
/// The ACPI PM1a control register (the port QEMU's PIIX4 uses): writing SLP_EN powers off.
pub const PM1A_CONTROL_PORT: u16 = 0x604;
/// The paravirtual idle port (see [`IdlePort`](crate::devices::idle::IdlePort)).
pub const IDLE_PORT: u16 = 0x511;
