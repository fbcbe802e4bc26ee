//! Booting a kernel: load it with linux-loader, describe the machine to it (zero page or PVH start
//! info, e820 map, command line, initrd) and put the boot vCPU in the state its entry protocol wants.

mod acpi;
mod cpu;
mod cpuid;
mod mptable;
mod params;

use std::io::Cursor;

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

pub(crate) use cpu::{configure_boot_vcpu, configure_lapic, configure_msrs};
pub(crate) use cpuid::vcpu_cpuid;

use crate::config::{BootProtocol, BootSource, KernelImage};
use crate::error::{Error, Result};
use crate::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MMIO_GAP_START};
use crate::memory::PartitionMemory;

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// 64-bit Linux boot protocol: long mode, identity-mapped, RSI = zero page.
    Linux64 {
        /// Entry address.
        rip: u64,
    },
    /// PVH: 32-bit protected mode without paging, EBX = `hvm_start_info`.
    Pvh {
        /// Entry address.
        rip: u64,
    },
}

/// A kernel in guest memory, ready for its vCPU to be pointed at it.
#[derive(Debug)]
pub(crate) struct LoadedKernel {
    pub entry: EntryPoint,
}

/// What the firmware tables (ACPI and MP table) describe: the parts of the machine a guest cannot
/// probe for.
#[derive(Clone, Debug)]
pub(crate) struct MachineDescription {
    /// vCPUs; vCPU `n` has local APIC ID `n`.
    pub vcpus: u8,
    /// The virtio-mmio transports, in device order.
    pub virtio_mmio: Vec<VirtioMmioDevice>,
}

/// One virtio-mmio transport's window and interrupt.
#[derive(Clone, Copy, Debug)]
pub(crate) struct VirtioMmioDevice {
    /// Guest-physical base of the register window.
    pub base: u64,
    /// Size of the window.
    pub len: u64,
    /// The GSI (IOAPIC pin) it raises.
    pub gsi: u32,
}

impl MachineDescription {
    /// The IOAPIC's ID: the first one after the vCPUs' APIC IDs (the MP specification wants IDs
    /// unique on the APIC bus), or 0 when 255 vCPUs use every other xAPIC ID.
    pub(crate) fn ioapic_id(&self) -> u8 {
        if self.vcpus < u8::MAX { self.vcpus } else { 0 }
    }
}

/// Writes the ACPI tables and the MP table for `machine`; returns the RSDP's address.
pub(crate) fn write_system_tables(
    memory: &PartitionMemory,
    machine: &MachineDescription,
) -> Result<u64> {
    mptable::write(memory, machine)?;
    Ok(acpi::write(memory, machine)?.rsdp)
}

/// Loads kernel, initrd and command line into `memory` and writes the boot structures, the zero
/// page or PVH start info pointing at the ACPI tables written for `machine`.
pub(crate) fn load(
    memory: &PartitionMemory,
    boot: &BootSource,
    cmdline: &str,
    machine: &MachineDescription,
) -> Result<LoadedKernel> {
    let image = read_kernel(&boot.kernel)?;
    let (entry, kernel_end, header) = load_kernel(memory, &image, boot.protocol)?;
    let initrd = match &boot.initrd {
        Some(path) => Some(load_initrd(memory, path, kernel_end)?),
        None => None,
    };
    write_cmdline(memory, cmdline)?;
    let rsdp = write_system_tables(memory, machine)?;
    match entry {
        EntryPoint::Linux64 { .. } => {
            params::write_zero_page(memory, header, cmdline.len(), initrd, rsdp)?
        }
        EntryPoint::Pvh { .. } => params::write_pvh_start_info(memory, initrd, rsdp)?,
    }
    Ok(LoadedKernel { entry })
}

fn read_kernel(image: &KernelImage) -> Result<Vec<u8>> {
    match image {
        KernelImage::Path(path) => std::fs::read(path).map_err(|source| Error::ReadFile {
            path: path.clone(),
            source,
        }),
        KernelImage::Bytes(bytes) => Ok(bytes.to_vec()),
    }
}

/// Loads an ELF or a bzImage, picking the entry protocol.
fn load_kernel(
    memory: &PartitionMemory,
    image: &[u8],
    protocol: BootProtocol,
) -> Result<(EntryPoint, u64, Option<setup_header>)> {
    let mut cursor = Cursor::new(image);
    let himem = Some(GuestAddress(HIMEM_START));
    if image.starts_with(b"\x7fELF") {
        let result = Elf::load(memory, None, &mut cursor, himem).map_err(Error::KernelLoad)?;
        let end = result.kernel_end;
        let entry = match (protocol, result.pvh_boot_cap) {
            (BootProtocol::Linux64, _)
            | (BootProtocol::Auto, PvhBootCapability::PvhEntryNotPresent) => EntryPoint::Linux64 {
                rip: result.kernel_load.0,
            },
            (BootProtocol::Auto | BootProtocol::Pvh, PvhBootCapability::PvhEntryPresent(addr)) => {
                EntryPoint::Pvh { rip: addr.0 }
            }
            (BootProtocol::Pvh, _) => return Err(Error::NoPvhEntry),
            (BootProtocol::Auto, PvhBootCapability::PvhEntryIgnored) => EntryPoint::Linux64 {
                rip: result.kernel_load.0,
            },
        };
        return Ok((entry, end, None));
    }
    if image.get(0x202..0x206) == Some(b"HdrS") {
        if protocol == BootProtocol::Pvh {
            return Err(Error::NoPvhEntry);
        }
        check_bzimage_length(image)?;
        let result = BzImage::load(memory, None, &mut cursor, himem).map_err(Error::KernelLoad)?;
        // The 64-bit entry (startup_64) sits 0x200 bytes into the protected-mode kernel.
        let rip = result.kernel_load.0 + 0x200;
        return Ok((
            EntryPoint::Linux64 { rip },
            result.kernel_end,
            result.setup_header,
        ));
    }
    Err(Error::UnknownKernelFormat)
}

/// Refuses a bzImage shorter than its header says: linux-loader would load the stump and the guest
/// would crash or hang somewhere in the missing code instead of failing here.
fn check_bzimage_length(image: &[u8]) -> Result<()> {
    let setup_sects = match image.get(0x1f1) {
        Some(0) | None => 4,
        Some(&n) => u64::from(n),
    };
    let syssize = image
        .get(0x1f4..0x1f8)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(0);
    let expected = (setup_sects + 1) * 512 + u64::from(syssize) * 16;
    let found = image.len() as u64;
    if found < expected {
        return Err(Error::KernelTruncated { expected, found });
    }
    Ok(())
}

/// Places the initrd as high as possible below the MMIO gap (and below 2 GiB, where every kernel can
/// reach it), above the kernel. Returns (address, size).
fn load_initrd(
    memory: &PartitionMemory,
    path: &std::path::Path,
    kernel_end: u64,
) -> Result<(u64, u64)> {
    let bytes = std::fs::read(path).map_err(|source| Error::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    let size = bytes.len() as u64;
    let low_end = memory
        .iter()
        .map(|r| r.start_addr().0 + r.len())
        .filter(|end| *end <= MMIO_GAP_START)
        .max()
        .unwrap_or(0)
        .min(0x8000_0000);
    let addr = low_end.checked_sub(size).map(|a| a & !0xfff);
    match addr {
        Some(addr) if addr >= kernel_end && size > 0 => {
            memory
                .write_slice(&bytes, GuestAddress(addr))
                .map_err(|e| Error::GuestMemory(e.to_string()))?;
            Ok((addr, size))
        }
        _ => Err(Error::InitrdTooLarge {
            size,
            available: low_end.saturating_sub(kernel_end),
        }),
    }
}

fn write_cmdline(memory: &PartitionMemory, cmdline: &str) -> Result<()> {
    if cmdline.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(Error::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX_SIZE - 1,
        });
    }
    if cmdline.bytes().any(|b| b == 0) {
        return Err(Error::CmdlineHasNul);
    }
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    memory
        .write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|e| Error::GuestMemory(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create_memory, ram_ranges};

    fn memory() -> PartitionMemory {
        create_memory(&ram_ranges(32 << 20)).unwrap()
    }

    use vmms_guest::fixture::tiny_elf;

    /// A bzImage header claiming a 64-bit-capable protected-mode kernel of `code`.
    fn tiny_bzimage(code: &[u8]) -> Vec<u8> {
        let setup_sects = 4u8;
        let mut image = vec![0u8; (usize::from(setup_sects) + 1) * 512];
        image[0x1f1] = setup_sects;
        image[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
        image[0x211] = 0x01; // loadflags: LOADED_HIGH
        image[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        image.extend_from_slice(code);
        image
    }

    #[test]
    fn elf_without_pvh_note_enters_at_its_entry_in_long_mode() {
        let mem = memory();

        let (entry, _, header) =
            load_kernel(&mem, &tiny_elf(&[0xf4; 16]), BootProtocol::Auto).unwrap();

        assert_eq!(entry, EntryPoint::Linux64 { rip: 0x10_0000 });
        assert!(header.is_none());
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_0000)).unwrap(), 0xf4);
    }

    #[test]
    fn elf_without_pvh_note_cannot_be_forced_to_pvh() {
        let err = load_kernel(&memory(), &tiny_elf(&[0xf4; 16]), BootProtocol::Pvh).unwrap_err();

        assert!(matches!(err, Error::NoPvhEntry));
    }

    #[test]
    fn bzimage_enters_0x200_into_the_protected_mode_kernel() {
        let mem = memory();

        let (entry, _, header) =
            load_kernel(&mem, &tiny_bzimage(&[0x90; 1024]), BootProtocol::Auto).unwrap();

        assert_eq!(entry, EntryPoint::Linux64 { rip: 0x10_0200 });
        assert_eq!(header.map(|h| h.setup_sects), Some(4));
    }

    #[test]
    fn truncated_elf_is_a_load_error() {
        let elf = tiny_elf(&[0xf4; 64]);

        let err = load_kernel(&memory(), &elf[..0x60], BootProtocol::Auto).unwrap_err();

        assert!(matches!(err, Error::KernelLoad(_)));
    }

    #[test]
    fn bzimage_cut_inside_its_setup_is_truncated() {
        let image = tiny_bzimage(&[0x90; 1024]);

        let err = load_kernel(&memory(), &image[..0x400], BootProtocol::Auto).unwrap_err();

        assert!(matches!(err, Error::KernelTruncated { .. }));
    }

    #[test]
    fn bzimage_shorter_than_its_syssize_is_truncated() {
        let mut image = tiny_bzimage(&[0x90; 1024]);
        image[0x1f4..0x1f8].copy_from_slice(&128u32.to_le_bytes()); // claims 2 KiB of kernel

        let err = load_kernel(&memory(), &image, BootProtocol::Auto).unwrap_err();

        assert!(matches!(
            err,
            Error::KernelTruncated {
                expected: 4608,
                found: 3584
            }
        ));
    }

    #[test]
    fn garbage_is_an_unknown_format() {
        let err = load_kernel(&memory(), &[0x55; 4096], BootProtocol::Auto).unwrap_err();

        assert!(matches!(err, Error::UnknownKernelFormat));
    }

    #[test]
    fn initrd_larger_than_memory_above_the_kernel_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("initrd");
        std::fs::write(&path, vec![0u8; 40 << 20]).unwrap();

        let err = load_initrd(&memory(), &path, 0x20_0000).unwrap_err();

        assert!(matches!(err, Error::InitrdTooLarge { .. }));
    }

    #[test]
    fn initrd_lands_page_aligned_at_the_top_of_low_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("initrd");
        std::fs::write(&path, vec![0xa5u8; 5000]).unwrap();
        let mem = memory();

        let (addr, size) = load_initrd(&mem, &path, 0x20_0000).unwrap();

        assert_eq!((addr, size), ((32 << 20) - 8192, 5000));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(addr + 4999)).unwrap(), 0xa5);
    }

    #[test]
    fn overlong_cmdline_is_rejected() {
        let err = write_cmdline(&memory(), &"x".repeat(CMDLINE_MAX_SIZE)).unwrap_err();

        assert!(matches!(err, Error::CmdlineTooLong { .. }));
    }
}
