//! The Linux "zero page" (`struct boot_params`): what the guest takes from it.
//!
//! Only two things: the e820 memory map (where RAM is) and the command line's address. Offsets are
//! those of `arch/x86/include/uapi/asm/bootparam.h`. This module parses a copy of the page and is
//! compiled into the host crate's tests as well.

/// Size of `struct boot_params`.
pub const ZERO_PAGE_SIZE: usize = 4096;
/// Longest command line the guest reads, including the NUL (Linux's `COMMAND_LINE_SIZE`).
pub const COMMAND_LINE_MAX: usize = 2048;

const E820_ENTRIES_OFFSET: usize = 0x1e8;
const CMD_LINE_PTR_OFFSET: usize = 0x228;
const E820_TABLE_OFFSET: usize = 0x2d0;
const E820_ENTRY_SIZE: usize = 20;
/// Capacity of `e820_table` in the zero page (`E820_MAX_ENTRIES_ZEROPAGE`).
const E820_MAX_ENTRIES: usize = 128;
const E820_TYPE_RAM: u32 = 1;

/// A half-open range `[start, end)` of guest-physical addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    /// First address in the range.
    pub start: u64,
    /// First address after the range.
    pub end: u64,
}

/// A parsed view of a copy of the zero page.
#[derive(Debug)]
pub struct ZeroPage<'a> {
    bytes: &'a [u8; ZERO_PAGE_SIZE],
}

impl<'a> ZeroPage<'a> {
    /// Wraps a copy of the zero page.
    pub fn new(bytes: &'a [u8; ZERO_PAGE_SIZE]) -> Self {
        Self { bytes }
    }

    /// The usable-RAM (type 1) ranges of the e820 map, in table order. Entries past the table's
    /// capacity, empty ones and ones that would wrap around the address space are skipped.
    pub fn ram(&self) -> impl Iterator<Item = Range> + '_ {
        let count = usize::from(self.bytes[E820_ENTRIES_OFFSET]).min(E820_MAX_ENTRIES);
        (0..count).filter_map(move |index| {
            let at = E820_TABLE_OFFSET + index * E820_ENTRY_SIZE;
            let start = self.u64_at(at);
            let size = self.u64_at(at + 8);
            let kind = self.u32_at(at + 16);
            let end = start.checked_add(size)?;
            (kind == E820_TYPE_RAM && size > 0).then_some(Range { start, end })
        })
    }

    /// `hdr.cmd_line_ptr`: guest-physical address of the NUL-terminated command line (0 if none).
    pub fn command_line_address(&self) -> u64 {
        u64::from(self.u32_at(CMD_LINE_PTR_OFFSET))
    }

    /// Whether any byte of `range` is RAM according to the e820 map.
    pub fn overlaps_ram(&self, range: Range) -> bool {
        self.ram()
            .any(|ram| ram.start < range.end && range.start < ram.end)
    }

    fn u64_at(&self, at: usize) -> u64 {
        let mut word = [0; 8];
        word.copy_from_slice(&self.bytes[at..at + 8]);
        u64::from_le_bytes(word)
    }

    fn u32_at(&self, at: usize) -> u32 {
        let mut word = [0; 4];
        word.copy_from_slice(&self.bytes[at..at + 4]);
        u32::from_le_bytes(word)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_with_e820(entries: &[(u64, u64, u32)]) -> Box<[u8; ZERO_PAGE_SIZE]> {
        let mut page = Box::new([0u8; ZERO_PAGE_SIZE]);
        page[E820_ENTRIES_OFFSET] = entries.len() as u8;
        for (index, &(addr, size, kind)) in entries.iter().enumerate() {
            let at = E820_TABLE_OFFSET + index * E820_ENTRY_SIZE;
            page[at..at + 8].copy_from_slice(&addr.to_le_bytes());
            page[at + 8..at + 16].copy_from_slice(&size.to_le_bytes());
            page[at + 16..at + 20].copy_from_slice(&kind.to_le_bytes());
        }
        page
    }

    #[test]
    fn ram_lists_only_type_1_entries() {
        let page = page_with_e820(&[
            (0, 0x9fc00, 1),
            (0x9fc00, 0x400, 2),
            (0x10_0000, 0x7f0_0000, 1),
        ]);

        let ram: Vec<Range> = ZeroPage::new(&page).ram().collect();

        assert_eq!(
            ram,
            [
                Range {
                    start: 0,
                    end: 0x9fc00
                },
                Range {
                    start: 0x10_0000,
                    end: 0x800_0000
                }
            ]
        );
    }

    #[test]
    fn entry_count_beyond_table_capacity_is_clamped() {
        let mut page = page_with_e820(&[(0x10_0000, 0x10_0000, 1)]);
        page[E820_ENTRIES_OFFSET] = 255;

        let count = ZeroPage::new(&page).ram().count();

        assert_eq!(count, 1);
    }

    #[test]
    fn wrapping_entry_is_skipped() {
        let page = page_with_e820(&[(u64::MAX - 10, 100, 1)]);

        assert_eq!(ZeroPage::new(&page).ram().count(), 0);
    }

    #[test]
    fn mmio_window_outside_ram_does_not_overlap_it() {
        let page = page_with_e820(&[(0x10_0000, 0x800_0000, 1)]);
        let zero_page = ZeroPage::new(&page);

        assert!(!zero_page.overlaps_ram(Range {
            start: 0xd000_0000,
            end: 0xd000_1000
        }));
        assert!(zero_page.overlaps_ram(Range {
            start: 0x80f_f000,
            end: 0x810_1000
        }));
    }

    #[test]
    fn command_line_address_reads_cmd_line_ptr() {
        let mut page = page_with_e820(&[]);
        page[CMD_LINE_PTR_OFFSET..CMD_LINE_PTR_OFFSET + 4]
            .copy_from_slice(&0x2_0000u32.to_le_bytes());

        assert_eq!(ZeroPage::new(&page).command_line_address(), 0x2_0000);
    }
}
