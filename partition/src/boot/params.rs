//! The structures a kernel reads to learn about its machine: Linux's zero page and PVH's start info.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::error::{Error, Result};
use crate::layout::{
    CMDLINE_START, EBDA_START, HIMEM_START, PVH_INFO_START, PVH_MEMMAP_START, ZERO_PAGE_START,
};
use crate::memory::PartitionMemory;

pub(super) const E820_RAM: u32 = 1;
pub(super) const E820_RESERVED: u32 = 2;
/// `boot_params.hdr.type_of_loader`: "undefined" loader, what every VMM without an assigned ID uses.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// `hvm_start_info.magic`.
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

/// The memory map: low RAM below the EBDA, the EBDA to 1 MiB reserved (it holds the MP table and
/// the ACPI tables), then every RAM region.
pub(super) fn memory_map(memory: &PartitionMemory) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for region in memory.iter() {
        let start = region.start_addr().0.max(HIMEM_START);
        let end = region.start_addr().0 + region.len();
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

/// Writes `boot_params` for the 64-bit Linux boot protocol.
pub(super) fn write_zero_page(
    memory: &PartitionMemory,
    header: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<()> {
    let mut params = boot_params::default();
    match header {
        Some(hdr) => params.hdr = hdr,
        None => {
            params.hdr.boot_flag = 0xaa55;
            params.hdr.header = 0x5372_6448; // "HdrS"
            params.hdr.kernel_alignment = 0x0100_0000;
        }
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.acpi_rsdp_addr = rsdp;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32 + 1;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = memory_map(memory);
    if map.len() > params.e820_table.len() {
        return Err(Error::GuestMemory("too many e820 entries".into()));
    }
    for (slot, (addr, size, kind)) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *kind,
        };
    }
    params.e820_entries = map.len() as u8;
    memory
        .write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|e| Error::GuestMemory(e.to_string()))
}

/// Writes `hvm_start_info`, its memory map and (for an initrd) its module list, little-endian as the
/// PVH ABI defines them.
pub(super) fn write_pvh_start_info(
    memory: &PartitionMemory,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<()> {
    let map = memory_map(memory);
    let mut memmap = Vec::with_capacity(map.len() * 24);
    for (addr, size, kind) in &map {
        memmap.extend_from_slice(&addr.to_le_bytes());
        memmap.extend_from_slice(&size.to_le_bytes());
        memmap.extend_from_slice(&kind.to_le_bytes());
        memmap.extend_from_slice(&0u32.to_le_bytes());
    }
    let modlist_addr = PVH_MEMMAP_START + memmap.len() as u64;
    let mut info = Vec::with_capacity(56);
    info.extend_from_slice(&XEN_HVM_START_MAGIC_VALUE.to_le_bytes());
    info.extend_from_slice(&1u32.to_le_bytes()); // version
    info.extend_from_slice(&0u32.to_le_bytes()); // flags
    info.extend_from_slice(&u32::from(initrd.is_some()).to_le_bytes()); // nr_modules
    info.extend_from_slice(&(if initrd.is_some() { modlist_addr } else { 0 }).to_le_bytes());
    info.extend_from_slice(&CMDLINE_START.to_le_bytes());
    info.extend_from_slice(&rsdp.to_le_bytes()); // rsdp_paddr
    info.extend_from_slice(&PVH_MEMMAP_START.to_le_bytes());
    info.extend_from_slice(&(map.len() as u32).to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    let write = |bytes: &[u8], addr: u64| {
        memory
            .write_slice(bytes, GuestAddress(addr))
            .map_err(|e| Error::GuestMemory(e.to_string()))
    };
    write(&info, PVH_INFO_START)?;
    write(&memmap, PVH_MEMMAP_START)?;
    if let Some((addr, size)) = initrd {
        let mut module = Vec::with_capacity(32);
        module.extend_from_slice(&addr.to_le_bytes());
        module.extend_from_slice(&size.to_le_bytes());
        module.extend_from_slice(&[0u8; 16]);
        write(&module, modlist_addr)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create_memory, ram_ranges};

    #[test]
    fn zero_page_carries_e820_cmdline_and_initrd() {
        let mem = create_memory(&ram_ranges(64 << 20)).unwrap();

        write_zero_page(&mem, None, 10, Some((0x300_0000, 0x1000)), 0xe_0000).unwrap();

        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!(params.e820_entries, 3);
        let last = params.e820_table[2];
        assert_eq!(
            (last.addr, last.size),
            (HIMEM_START, (64 << 20) - HIMEM_START)
        );
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ params.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ params.acpi_rsdp_addr }, 0xe_0000);
    }

    #[test]
    fn pvh_start_info_has_magic_and_memory_map() {
        let mem = create_memory(&ram_ranges(64 << 20)).unwrap();

        write_pvh_start_info(&mem, None, 0xe_0000).unwrap();

        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(PVH_INFO_START)).unwrap(),
            XEN_HVM_START_MAGIC_VALUE
        );
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(PVH_INFO_START + 48))
                .unwrap(),
            3
        );
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(PVH_MEMMAP_START + 2 * 24))
                .unwrap(),
            HIMEM_START
        );
        // rsdp_paddr
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(PVH_INFO_START + 32))
                .unwrap(),
            0xe_0000
        );
    }
}
