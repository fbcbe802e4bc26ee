//! The memory image of a saved partition, and the mapping that restores from it.
//!
//! The image is a file as long as guest memory, the RAM ranges one after another in address order.
//! Only pages that hold something are written; every other page is a hole, which costs no disk and
//! reads back as zeros: exactly what a page nobody touched holds. Saving therefore costs what the
//! guest used, not what it was given. Restoring maps the image copy-on-write, so it costs the same
//! for any size, and the same mapping reads holes as zeros.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::num::NonZeroUsize;
use std::ops::Range;
use std::sync::Arc;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress, MmapRegion, WriteVolatile,
};

use super::touched::{PageRuns, data_pages, private_pages, union};
use super::{PAGE_SIZE, PartitionMemory, RamRange};
use crate::error::{Error, Result};

/// Where the kernel reports the pages of this process's mappings.
const PAGEMAP: &str = "/proc/self/pagemap";

/// Guest memory mapped copy-on-write from a memory image written by [`save_memory`].
///
/// Pages are read from the file only when first touched and guest writes never reach the file, so a
/// restore costs the same for 64 MiB as for 64 GiB, and the file can be restored again. Holes in
/// the file read as zeros.
pub(crate) fn map_memory_file(file: &File, ranges: &[RamRange]) -> Result<PartitionMemory> {
    let file_len = file.metadata().map_err(Error::MemoryFile)?.len();
    let needed: u64 = ranges.iter().map(|r| r.len).sum();
    if file_len < needed {
        return Err(Error::MemoryFileTooShort {
            len: file_len,
            needed,
        });
    }
    let page = NonZeroUsize::new(PAGE_SIZE as usize).expect("page size is non-zero");
    let mut regions = Vec::with_capacity(ranges.len());
    let mut offset = 0u64;
    for range in ranges {
        let len = range.len as usize;
        let file = file.try_clone().map_err(Error::MemoryFile)?;
        let mapping: MmapRegion<AtomicBitmap> =
            MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::new(len, page))
                .with_file_offset(FileOffset::new(file, offset))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .build()
                .map_err(|e| Error::GuestMemory(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(range.start))
            .ok_or_else(|| Error::GuestMemory("memory range wraps".into()))?;
        regions.push(Arc::new(region));
        offset += range.len;
    }
    PartitionMemory::from_arc_regions(regions).map_err(|e| Error::GuestMemory(e.to_string()))
}

/// Writes the memory image of `memory` into `out` from its current position, which it leaves at
/// the image's end; anything the file held from that position on is dropped first, so the pages
/// left out read as zeros. Returns the bytes of data written.
///
/// A page is written when it holds something: the guest or the VMM touched it (found through the
/// process's pagemap, without reading memory), or, for memory restored from an image, that image has
/// data there. Where the pagemap cannot be read, every page is written.
pub(crate) fn save_memory(memory: &PartitionMemory, out: &mut File) -> Result<u64> {
    let base = out.stream_position().map_err(Error::MemoryFile)?;
    let total: u64 = memory.iter().map(|region| region.len()).sum();
    out.set_len(base).map_err(Error::MemoryFile)?;
    out.set_len(base + total).map_err(Error::MemoryFile)?;
    let pagemap = File::open(PAGEMAP).ok();
    let mut region_offset = base;
    let mut written = 0u64;
    for region in memory.iter() {
        let runs = match &pagemap {
            Some(pagemap) => pages_with_data(pagemap, region)?,
            None => std::iter::once(0..region.len() / PAGE_SIZE).collect(),
        };
        for run in runs {
            written += write_run(region, &run, region_offset, out)?;
        }
        region_offset += region.len();
    }
    out.seek(SeekFrom::Start(base + total))
        .map_err(Error::MemoryFile)?;
    Ok(written)
}

/// The pages of `region` that hold something (see [`save_memory`]).
fn pages_with_data(pagemap: &File, region: &GuestRegionMmap<AtomicBitmap>) -> Result<PageRuns> {
    let host = region
        .get_host_address(MemoryRegionAddress(0))
        .map_err(|e| Error::GuestMemory(e.to_string()))?;
    let len = region.len();
    let private = private_pages(pagemap, host as usize, len as usize).map_err(Error::MemoryFile)?;
    match region.file_offset() {
        Some(source) => {
            let data = data_pages(source.file(), source.start(), len).map_err(Error::MemoryFile)?;
            Ok(union(&private, &data))
        }
        None => Ok(private),
    }
}

/// Copies pages `run` of `region` to `out` at `region_offset` plus their offset in the region.
fn write_run(
    region: &GuestRegionMmap<AtomicBitmap>,
    run: &Range<u64>,
    region_offset: u64,
    out: &mut File,
) -> Result<u64> {
    let start = run.start * PAGE_SIZE;
    let len = (run.end - run.start) * PAGE_SIZE;
    let slice = region
        .get_slice(MemoryRegionAddress(start), len as usize)
        .map_err(|e| Error::GuestMemory(e.to_string()))?;
    out.seek(SeekFrom::Start(region_offset + start))
        .map_err(Error::MemoryFile)?;
    out.write_all_volatile(&slice)
        .map_err(|e| Error::MemoryFile(std::io::Error::other(e)))?;
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create_memory, ram_ranges};
    use std::os::unix::fs::MetadataExt;
    use vm_memory::Bytes;

    /// Every byte of `memory`, in address order.
    fn contents(memory: &PartitionMemory) -> Vec<u8> {
        let mut all = Vec::new();
        for region in memory.iter() {
            let mut bytes = vec![0u8; region.len() as usize];
            memory.read_slice(&mut bytes, region.start_addr()).unwrap();
            all.extend(bytes);
        }
        all
    }

    /// Writes `value` at the start of each of `pages` (page numbers from guest address 0).
    fn write_pages(memory: &PartitionMemory, pages: impl IntoIterator<Item = u64>, value: u32) {
        for page in pages {
            memory
                .write_obj(value, GuestAddress(page * PAGE_SIZE))
                .unwrap();
        }
    }

    fn allocated_bytes(file: &File) -> u64 {
        file.metadata().unwrap().blocks() * 512
    }

    #[test]
    fn saved_memory_maps_back_with_the_same_contents_and_private_writes() {
        let ranges = ram_ranges(2 << 20);
        let memory = create_memory(&ranges).unwrap();
        memory
            .write_obj(0xdead_beef_u32, GuestAddress(0x1234))
            .unwrap();
        let mut file = tempfile::tempfile().unwrap();
        save_memory(&memory, &mut file).unwrap();

        let restored = map_memory_file(&file, &ranges).unwrap();
        restored.write_obj(7u32, GuestAddress(0x2000)).unwrap();
        let again = map_memory_file(&file, &ranges).unwrap();

        assert_eq!(
            restored.read_obj::<u32>(GuestAddress(0x1234)).unwrap(),
            0xdead_beef
        );
        assert_eq!(again.read_obj::<u32>(GuestAddress(0x2000)).unwrap(), 0);
    }

    #[test]
    fn only_touched_pages_are_written_and_the_rest_are_holes() {
        let ranges = ram_ranges(16 << 20);
        let memory = create_memory(&ranges).unwrap();
        let pages = [0u64, 1, 2, 77, 1000, 4095];
        write_pages(&memory, pages, 0x5a5a_0001);
        let mut file = tempfile::tempfile().unwrap();

        let written = save_memory(&memory, &mut file).unwrap();
        let restored = map_memory_file(&file, &ranges).unwrap();

        assert_eq!(written, pages.len() as u64 * PAGE_SIZE);
        assert_eq!(file.metadata().unwrap().len(), 16 << 20);
        assert!(
            allocated_bytes(&file) <= 64 * PAGE_SIZE,
            "{} bytes allocated",
            allocated_bytes(&file)
        );
        assert_eq!(contents(&restored), contents(&memory));
    }

    #[test]
    fn memory_above_the_mmio_gap_lands_after_the_low_range() {
        let ranges = ram_ranges(4 << 30);
        let memory = create_memory(&ranges).unwrap();
        let high = ranges[1].start;
        memory.write_obj(0x1111_u32, GuestAddress(0x3000)).unwrap();
        memory
            .write_obj(0x2222_u32, GuestAddress(high + 0x5000))
            .unwrap();
        let mut file = tempfile::tempfile().unwrap();

        let written = save_memory(&memory, &mut file).unwrap();
        let restored = map_memory_file(&file, &ranges).unwrap();

        assert_eq!(written, 2 * PAGE_SIZE);
        assert_eq!(
            restored.read_obj::<u32>(GuestAddress(0x3000)).unwrap(),
            0x1111
        );
        assert_eq!(
            restored
                .read_obj::<u32>(GuestAddress(high + 0x5000))
                .unwrap(),
            0x2222
        );
    }

    #[test]
    fn second_save_of_restored_memory_keeps_image_pages_and_new_writes() {
        let ranges = ram_ranges(8 << 20);
        let memory = create_memory(&ranges).unwrap();
        write_pages(&memory, [5, 6, 300], 0xaaaa);
        let mut first = tempfile::tempfile().unwrap();
        save_memory(&memory, &mut first).unwrap();
        let restored = map_memory_file(&first, &ranges).unwrap();
        // One page from the image overwritten, one new, one from the image only read.
        write_pages(&restored, [6, 1500], 0xbbbb);
        let _ = restored.read_obj::<u32>(GuestAddress(300 * PAGE_SIZE));
        let mut second = tempfile::tempfile().unwrap();

        let written = save_memory(&restored, &mut second).unwrap();
        let again = map_memory_file(&second, &ranges).unwrap();

        assert_eq!(written, 4 * PAGE_SIZE);
        assert_eq!(contents(&again), contents(&restored));
    }

    #[test]
    fn memory_written_everywhere_saves_whole_and_restores_exactly() {
        let ranges = ram_ranges(4 << 20);
        let memory = create_memory(&ranges).unwrap();
        let pages = (4 << 20) / PAGE_SIZE;
        for page in 0..pages {
            let fill = vec![(page % 251) as u8 + 1; PAGE_SIZE as usize];
            memory
                .write_slice(&fill, GuestAddress(page * PAGE_SIZE))
                .unwrap();
        }
        let mut file = tempfile::tempfile().unwrap();

        let written = save_memory(&memory, &mut file).unwrap();
        let restored = map_memory_file(&file, &ranges).unwrap();

        assert_eq!(written, 4 << 20);
        assert_eq!(allocated_bytes(&file), 4 << 20);
        assert_eq!(contents(&restored), contents(&memory));
    }

    #[test]
    fn an_image_written_over_an_older_file_has_no_stale_pages() {
        let ranges = ram_ranges(2 << 20);
        let memory = create_memory(&ranges).unwrap();
        memory.write_obj(9u32, GuestAddress(0x4000)).unwrap();
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &vec![0xffu8; 3 << 20]).unwrap();
        file.rewind().unwrap();

        save_memory(&memory, &mut file).unwrap();
        let restored = map_memory_file(&file, &ranges).unwrap();

        assert_eq!(file.metadata().unwrap().len(), 2 << 20);
        assert_eq!(contents(&restored), contents(&memory));
    }

    #[test]
    fn memory_file_shorter_than_the_ranges_is_rejected() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(4096).unwrap();

        let err = map_memory_file(&file, &ram_ranges(2 << 20)).unwrap_err();

        assert!(matches!(err, Error::MemoryFileTooShort { .. }));
    }
}
