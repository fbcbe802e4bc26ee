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
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress, MmapRegion,
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
#[cfg(test)]
pub(crate) fn map_memory_file(file: &File, ranges: &[RamRange]) -> Result<PartitionMemory> {
    map_memory_layers(file, &[], ranges)
}

/// Guest memory mapped copy-on-write from a chain of memory images: `base`, a full image, then
/// each of `deltas` in order, images of the same length holding only the pages dirtied since the
/// image before them (holes elsewhere).
///
/// The base is mapped as one private mapping per RAM range; each delta's data runs (found with
/// `SEEK_DATA`/`SEEK_HOLE`, no data read) are mapped `MAP_FIXED | MAP_PRIVATE` over it, so a page
/// reads from the newest layer that has it. Nothing is read up front: the cost is one mapping per
/// data run, flat in memory size.
pub(crate) fn map_memory_layers(
    base: &File,
    deltas: &[File],
    ranges: &[RamRange],
) -> Result<PartitionMemory> {
    let needed: u64 = ranges.iter().map(|r| r.len).sum();
    for file in std::iter::once(base).chain(deltas) {
        let file_len = file.metadata().map_err(Error::MemoryFile)?.len();
        if file_len < needed {
            return Err(Error::MemoryFileTooShort {
                len: file_len,
                needed,
            });
        }
    }
    let page = NonZeroUsize::new(PAGE_SIZE as usize).expect("page size is non-zero");
    let mut regions = Vec::with_capacity(ranges.len());
    let mut offset = 0u64;
    for range in ranges {
        let len = range.len as usize;
        let file = base.try_clone().map_err(Error::MemoryFile)?;
        let mapping: MmapRegion<AtomicBitmap> =
            MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::new(len, page))
                .with_file_offset(FileOffset::new(file, offset))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .build()
                .map_err(|e| Error::GuestMemory(e.to_string()))?;
        for delta in deltas {
            for run in data_pages(delta, offset, range.len).map_err(Error::MemoryFile)? {
                map_over(&mapping, delta, offset, &run)?;
            }
        }
        let region = GuestRegionMmap::new(mapping, GuestAddress(range.start))
            .ok_or_else(|| Error::GuestMemory("memory range wraps".into()))?;
        regions.push(Arc::new(region));
        offset += range.len;
    }
    PartitionMemory::from_arc_regions(regions).map_err(|e| Error::GuestMemory(e.to_string()))
}

/// Maps pages `run` of `file` (from image offset `image_offset`) privately over the same pages
/// of `mapping`.
fn map_over(
    mapping: &MmapRegion<AtomicBitmap>,
    file: &File,
    image_offset: u64,
    run: &Range<u64>,
) -> Result<()> {
    let start = run.start * PAGE_SIZE;
    let len = (run.end - run.start) * PAGE_SIZE;
    if start + len > mapping.size() as u64 {
        return Err(Error::GuestMemory("delta run past its range".into()));
    }
    let file_offset = libc::off_t::try_from(image_offset + start)
        .map_err(|_| Error::GuestMemory("delta offset too large".into()))?;
    // SAFETY: `[start, start + len)` lies inside `mapping`, a live private mapping this function's
    // caller owns and has not handed to anyone yet (no reference into it exists), so replacing
    // those pages with a private mapping of the same size and protection changes nothing but
    // their contents; `mapping` unmaps the whole range, these pages included, when dropped. The
    // descriptor is valid for the call.
    let mapped = unsafe {
        libc::mmap(
            mapping.as_ptr().add(start as usize).cast(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            file_offset,
        )
    };
    if mapped == libc::MAP_FAILED {
        return Err(Error::MemoryFile(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Writes the memory image of `memory` into `out` from its current position, which it leaves at
/// the image's end; anything the file held from that position on is dropped first, so the pages
/// left out read as zeros. Returns the bytes of data written.
///
/// A page is written when it holds something: the guest or the VMM touched it (found through the
/// process's pagemap, without reading memory), or, for memory restored from an image, that image has
/// data there. Where the pagemap cannot be read, every page is written.
///
/// `layers` are the image files the memory was restored from (base first, see
/// [`map_memory_layers`]); pages with data in any of them are written too.
pub(crate) fn save_memory(
    memory: &PartitionMemory,
    layers: &[File],
    out: &mut File,
) -> Result<u64> {
    let base = out.stream_position().map_err(Error::MemoryFile)?;
    let total: u64 = memory.iter().map(|region| region.len()).sum();
    out.set_len(base).map_err(Error::MemoryFile)?;
    out.set_len(base + total).map_err(Error::MemoryFile)?;
    let runs = pages_with_data(memory, layers)?;
    let written = write_runs(memory, &runs, out, base)?;
    out.seek(SeekFrom::Start(base + total))
        .map_err(Error::MemoryFile)?;
    Ok(written)
}

/// The pages of every region of `memory` that hold something (see [`save_memory`]), one run
/// list per region in address order. Where the pagemap cannot be read, every page.
pub(crate) fn pages_with_data(memory: &PartitionMemory, layers: &[File]) -> Result<Vec<PageRuns>> {
    let pagemap = File::open(PAGEMAP).ok();
    let mut image_offset = 0u64;
    let mut all = Vec::new();
    for region in memory.iter() {
        let len = region.len();
        let mut runs = match &pagemap {
            Some(pagemap) => {
                let host = region
                    .get_host_address(MemoryRegionAddress(0))
                    .map_err(|e| Error::GuestMemory(e.to_string()))?;
                private_pages(pagemap, host as usize, len as usize).map_err(Error::MemoryFile)?
            }
            None => std::iter::once(0..len / PAGE_SIZE).collect(),
        };
        for layer in layers {
            let data = data_pages(layer, image_offset, len).map_err(Error::MemoryFile)?;
            runs = union(&runs, &data);
        }
        all.push(runs);
        image_offset += len;
    }
    Ok(all)
}

/// Copies pages `runs` (one list per region of `memory`, in address order) into the image file
/// `out`, whose byte `base` is the image's start; returns the bytes written. Positional writes
/// only: `out`'s position is unchanged, and several callers may share it. Reads memory as it is:
/// pages the guest writes meanwhile may be copied torn, which a caller copying from a running
/// guest repairs by copying the pages its dirty log names again once the guest is paused.
pub(crate) fn write_runs(
    memory: &PartitionMemory,
    runs: &[PageRuns],
    out: &File,
    base: u64,
) -> Result<u64> {
    let mut region_offset = base;
    let mut written = 0u64;
    for (region, runs) in memory.iter().zip(runs) {
        for run in runs {
            written += write_run(region, run, region_offset, out)?;
        }
        region_offset += region.len();
    }
    Ok(written)
}

/// Copies pages `run` of `region` to `out` at `region_offset` plus their offset in the region.
fn write_run(
    region: &GuestRegionMmap<AtomicBitmap>,
    run: &Range<u64>,
    region_offset: u64,
    out: &File,
) -> Result<u64> {
    let start = run.start * PAGE_SIZE;
    let len = (run.end - run.start) * PAGE_SIZE;
    if start + len > region.len() {
        return Err(Error::GuestMemory("page run past its region".into()));
    }
    let slice = region
        .get_slice(MemoryRegionAddress(start), len as usize)
        .map_err(|e| Error::GuestMemory(e.to_string()))?;
    let guard = slice.ptr_guard();
    let mut done = 0usize;
    while done < len as usize {
        let at = libc::off_t::try_from(region_offset + start + done as u64)
            .map_err(|_| Error::GuestMemory("image offset too large".into()))?;
        // SAFETY: `guard` points at `len` readable bytes of mapped guest memory that stay mapped
        // while `slice` borrows the region; pwrite only reads `len - done` of them from `done`.
        // The descriptor is valid: `out` is an open file.
        let n = unsafe {
            libc::pwrite(
                out.as_raw_fd(),
                guard.as_ptr().add(done).cast(),
                len as usize - done,
                at,
            )
        };
        match usize::try_from(n) {
            Ok(0) => return Err(Error::MemoryFile(std::io::ErrorKind::WriteZero.into())),
            Ok(n) => done += n,
            Err(_) => {
                let error = std::io::Error::last_os_error();
                if error.kind() != std::io::ErrorKind::Interrupted {
                    return Err(Error::MemoryFile(error));
                }
            }
        }
    }
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
        save_memory(&memory, &[], &mut file).unwrap();

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

        let written = save_memory(&memory, &[], &mut file).unwrap();
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

        let written = save_memory(&memory, &[], &mut file).unwrap();
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
        save_memory(&memory, &[], &mut first).unwrap();
        let restored = map_memory_file(&first, &ranges).unwrap();
        // One page from the image overwritten, one new, one from the image only read.
        write_pages(&restored, [6, 1500], 0xbbbb);
        let _ = restored.read_obj::<u32>(GuestAddress(300 * PAGE_SIZE));
        let mut second = tempfile::tempfile().unwrap();

        let written = save_memory(&restored, &[first.try_clone().unwrap()], &mut second).unwrap();
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

        let written = save_memory(&memory, &[], &mut file).unwrap();
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

        save_memory(&memory, &[], &mut file).unwrap();
        let restored = map_memory_file(&file, &ranges).unwrap();

        assert_eq!(file.metadata().unwrap().len(), 2 << 20);
        assert_eq!(contents(&restored), contents(&memory));
    }

    #[test]
    fn delta_layers_map_over_the_base_and_later_saves_keep_every_layer() {
        let ranges = ram_ranges(8 << 20);
        let memory = create_memory(&ranges).unwrap();
        write_pages(&memory, [1, 2, 3, 900], 0x1111);
        let mut base = tempfile::tempfile().unwrap();
        save_memory(&memory, &[], &mut base).unwrap();
        // The guest runs on: pages 2 and 1500 change, and that is all a delta holds.
        write_pages(&memory, [2, 1500], 0x2222);
        let delta = tempfile::tempfile().unwrap();
        delta.set_len(8 << 20).unwrap();
        let runs = vec![vec![2..3, 1500..1501]];
        let written = write_runs(&memory, &runs, &delta, 0).unwrap();

        let restored = map_memory_layers(&base, &[delta.try_clone().unwrap()], &ranges).unwrap();
        let layers = [base.try_clone().unwrap(), delta.try_clone().unwrap()];
        let mut again = tempfile::tempfile().unwrap();
        save_memory(&restored, &layers, &mut again).unwrap();
        let from_save = map_memory_file(&again, &ranges).unwrap();

        assert_eq!(written, 2 * PAGE_SIZE);
        assert!(allocated_bytes(&delta) <= 16 * PAGE_SIZE);
        assert_eq!(contents(&restored), contents(&memory));
        assert_eq!(contents(&from_save), contents(&memory));
    }

    #[test]
    fn memory_file_shorter_than_the_ranges_is_rejected() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(4096).unwrap();

        let err = map_memory_file(&file, &ram_ranges(2 << 20)).unwrap_err();

        assert!(matches!(err, Error::MemoryFileTooShort { .. }));
    }
}
