//! Guest memory of a partition: its layout, its KVM memory slots, the dirty-page log, and saving it
//! to / mapping it back from a sparse image file (`image.rs`, with `touched.rs` finding the pages
//! that hold anything).

mod image;
mod touched;

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

pub(crate) use image::{map_memory_layers, pages_with_data, save_memory, write_runs};

use crate::error::{Error, Result};
use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// The guest memory type every device of a partition works on.
///
/// Regions carry an [`AtomicBitmap`] so writes made by the VMM itself (a virtio device filling a read
/// buffer) are tracked next to the guest's own writes that KVM's dirty log sees; both feed the
/// partition's dirty-page log.
pub type PartitionMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Size of a page in the dirty-page log.
pub const PAGE_SIZE: u64 = 4096;

/// One contiguous range of guest RAM, backed by one KVM memory slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamRange {
    /// Guest-physical start.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

/// The RAM ranges for `size` bytes of memory: below the MMIO gap, then the rest above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<RamRange> {
    let low = size.min(MMIO_GAP_START);
    let mut ranges = vec![RamRange { start: 0, len: low }];
    if size > low {
        ranges.push(RamRange {
            start: MMIO_GAP_END,
            len: size - low,
        });
    }
    ranges
}

/// Anonymous, zeroed guest memory for `ranges`.
pub(crate) fn create_memory(ranges: &[RamRange]) -> Result<PartitionMemory> {
    let ranges: Vec<_> = ranges
        .iter()
        .map(|r| (GuestAddress(r.start), r.len as usize))
        .collect();
    PartitionMemory::from_ranges(&ranges).map_err(|e| Error::GuestMemory(e.to_string()))
}

/// Gives every region of `memory` to KVM, one slot per region in address order.
pub(crate) fn register_memory(vm: &VmFd, memory: &PartitionMemory, dirty_log: bool) -> Result<()> {
    for (slot, region) in memory.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| Error::GuestMemory(e.to_string()))?;
        let entry = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if dirty_log {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the host range [host, host + len) is a live mapping owned by `memory`, and every
        // caller keeps that memory (an `Arc`-shared collection) alive as long as the VM exists: the
        // partition drops its VmFd before its memory.
        unsafe { vm.set_user_memory_region(entry) }.map_err(Error::Kvm)?;
    }
    Ok(())
}

/// The pages written since the log was last read, for one RAM range.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyRange {
    /// The range the bitmap covers.
    pub range: RamRange,
    /// One bit per 4 KiB page, little-endian words: bit `i` of word `w` is page `w * 64 + i`.
    pub bitmap: Vec<u64>,
}

impl DirtyRange {
    /// Guest-physical addresses of the dirty pages.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.bitmap.iter().enumerate().flat_map(move |(w, &word)| {
            (0..64)
                .filter(move |bit| word & (1 << bit) != 0)
                .map(move |bit| self.range.start + ((w as u64) * 64 + bit) * PAGE_SIZE)
        })
    }

    /// How many pages are dirty.
    pub fn count(&self) -> u64 {
        self.bitmap.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// No page of `range`.
    pub fn empty(range: RamRange) -> Self {
        let pages = range.len / PAGE_SIZE;
        DirtyRange {
            range,
            bitmap: vec![0; pages.div_ceil(64) as usize],
        }
    }

    /// Adds every page of `other` (which must cover the same range; another range is ignored).
    pub fn merge(&mut self, other: &DirtyRange) {
        if other.range != self.range {
            return;
        }
        for (word, more) in self.bitmap.iter_mut().zip(&other.bitmap) {
            *word |= more;
        }
    }

    /// The dirty pages as runs of page indices from the range's start, in order.
    pub(crate) fn runs(&self) -> touched::PageRuns {
        let pages = self.range.len / PAGE_SIZE;
        let mut runs = touched::PageRuns::new();
        for (w, &word) in self.bitmap.iter().enumerate() {
            let mut word = word;
            while word != 0 {
                let bit = u64::from(word.trailing_zeros());
                word &= word - 1;
                let page = w as u64 * 64 + bit;
                if page >= pages {
                    break;
                }
                match runs.last_mut() {
                    Some(last) if last.end == page => last.end += 1,
                    _ => runs.push(page..page + 1),
                }
            }
        }
        runs
    }

    /// The pages of `runs` (page indices from `range`'s start).
    pub(crate) fn from_runs(range: RamRange, runs: &[std::ops::Range<u64>]) -> Self {
        let mut out = DirtyRange::empty(range);
        for run in runs {
            for page in run.clone() {
                if let Some(word) = out.bitmap.get_mut((page / 64) as usize) {
                    *word |= 1 << (page % 64);
                }
            }
        }
        out
    }
}

/// Reads and clears the dirty-page log of every region: pages the guest wrote (KVM's log) or the VMM
/// wrote on the guest's behalf (the regions' bitmaps).
pub(crate) fn read_dirty_log(vm: &VmFd, memory: &PartitionMemory) -> Result<Vec<DirtyRange>> {
    let mut out = Vec::new();
    for (slot, region) in memory.iter().enumerate() {
        let mut bitmap = vm
            .get_dirty_log(slot as u32, region.len() as usize)
            .map_err(Error::Kvm)?;
        // The region derefs to its mapping, whose bitmap records the VMM's own writes.
        let vmm_bitmap = std::ops::Deref::deref(region).bitmap().get_and_reset();
        for (word, vmm_word) in bitmap.iter_mut().zip(vmm_bitmap) {
            *word |= vmm_word;
        }
        out.push(DirtyRange {
            range: RamRange {
                start: region.start_addr().0,
                len: region.len(),
            },
            bitmap,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range_from_zero() {
        assert_eq!(
            ram_ranges(64 << 20),
            vec![RamRange {
                start: 0,
                len: 64 << 20
            }]
        );
    }

    #[test]
    fn memory_larger_than_the_gap_continues_above_4g() {
        let ranges = ram_ranges(4 << 30);

        assert_eq!(
            ranges[0],
            RamRange {
                start: 0,
                len: MMIO_GAP_START
            }
        );
        assert_eq!(
            ranges[1],
            RamRange {
                start: MMIO_GAP_END,
                len: (4 << 30) - MMIO_GAP_START
            }
        );
    }

    #[test]
    fn dirty_range_runs_round_trip_and_merge() {
        let range = RamRange {
            start: 0,
            len: 200 * PAGE_SIZE,
        };
        let runs = vec![0..3, 63..66, 199..200];
        let mut dirty = DirtyRange::from_runs(range, &runs);

        assert_eq!(dirty.runs(), runs);
        dirty.merge(&DirtyRange::from_runs(range, &[3..4, 100..101]));
        assert_eq!(dirty.runs(), vec![0..4, 63..66, 100..101, 199..200]);
        assert_eq!(dirty.count(), 9);
    }

    #[test]
    fn dirty_range_lists_set_pages_by_address() {
        let dirty = DirtyRange {
            range: RamRange {
                start: 0x1000_0000,
                len: 1 << 20,
            },
            bitmap: vec![0b101, 1],
        };

        let pages: Vec<_> = dirty.pages().collect();

        assert_eq!(
            pages,
            vec![0x1000_0000, 0x1000_2000, 0x1000_0000 + 64 * 4096]
        );
        assert_eq!(dirty.count(), 3);
    }
}
