//! Which pages of guest memory hold anything, found without reading the memory.
//!
//! Two sources, both answered by the kernel from its own bookkeeping:
//! - `/proc/self/pagemap` says, per page of a mapping of this process, whether a page of the
//!   process's own is there: present in RAM or swapped out, not a page-cache page of a file
//!   mapping, and not the shared zero page a read of untouched memory maps. In anonymous guest
//!   memory those are exactly the pages anyone wrote; in memory mapped copy-on-write from a saved
//!   image they are the pages written since the restore.
//! - `SEEK_DATA`/`SEEK_HOLE` on the saved image say which of its pages have data; the rest read as
//!   zeros. Those pages, where nobody wrote since the restore, still hold what the image gave them.
//!
//! Pagemap entries are read (2 MiB of them for 1 GiB of memory, a few milliseconds, mostly for
//! page tables that do not exist, which the kernel skips quickly). Telling the zero page apart needs
//! page frame numbers, which the kernel shows only to a process with `CAP_SYS_ADMIN`; without them
//! a page that was only ever read counts as written, which costs space in the image, never
//! exactness. (The `PAGEMAP_SCAN` ioctl of Linux 6.7 would tell it apart unprivileged, but an
//! ioctl outside KVM's is what a confined worker's seccomp filter refuses; plain reads are not.)

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use std::sync::OnceLock;
use std::sync::atomic::Ordering;

use vm_memory::{Bytes, MmapRegion, VolatileMemory};
use vmm_sys_util::seek_hole::SeekHole;

use super::PAGE_SIZE;

/// Page is present in RAM.
const PM_PRESENT: u64 = 1 << 63;
/// Page is swapped out.
const PM_SWAP: u64 = 1 << 62;
/// Page is a page-cache page of a file (or shared anonymous memory), not a private copy.
const PM_FILE: u64 = 1 << 61;
/// Pagemap entries read per system call (512 KiB of entries, 256 MiB of memory).
const ENTRIES_PER_READ: usize = 64 << 10;

/// Bits 0-54: the page frame number of a present page (zero when the kernel hides it).
const PM_PFN_MASK: u64 = (1 << 55) - 1;

/// Page ranges (page indices from the start of a region), sorted and not touching one another.
pub(crate) type PageRuns = Vec<Range<u64>>;

/// Adds page `page` to `runs`, whose last run ends at or before it.
fn push_page(runs: &mut PageRuns, page: u64) {
    match runs.last_mut() {
        Some(last) if last.end == page => last.end += 1,
        _ => runs.push(page..page + 1),
    }
}

/// The page frame number of the shared zero page, if this process may see frame numbers.
fn zero_page_frame(pagemap: &File) -> Option<u64> {
    static FRAME: OnceLock<Option<u64>> = OnceLock::new();
    *FRAME.get_or_init(|| {
        // A fresh anonymous page that is only read maps the zero page.
        let probe = MmapRegion::<()>::new(PAGE_SIZE as usize).ok()?;
        let _: u8 = probe.as_volatile_slice().load(0, Ordering::Relaxed).ok()?;
        let mut raw = [0u8; 8];
        let index = probe.as_ptr() as u64 / PAGE_SIZE;
        pagemap.read_exact_at(&mut raw, index * 8).ok()?;
        let entry = u64::from_ne_bytes(raw);
        let frame = entry & PM_PFN_MASK;
        (entry & PM_PRESENT != 0 && frame != 0).then_some(frame)
    })
}

/// The pages of `[address, address + len)` in this process that hold a private page: present
/// or swapped, not a file's page-cache page, and not the zero page (when frame numbers are
/// visible, see the module notes). `address` and `len` are page-aligned.
pub(crate) fn private_pages(pagemap: &File, address: usize, len: usize) -> io::Result<PageRuns> {
    let zero_frame = zero_page_frame(pagemap);
    let first = (address as u64) / PAGE_SIZE;
    let count = (len as u64) / PAGE_SIZE;
    let mut runs = PageRuns::new();
    let mut buffer = vec![0u8; ENTRIES_PER_READ.min(count as usize) * 8];
    let mut done = 0u64;
    while done < count {
        let entries = (count - done).min(ENTRIES_PER_READ as u64) as usize;
        let bytes = &mut buffer[..entries * 8];
        pagemap.read_exact_at(bytes, (first + done) * 8)?;
        for (i, entry) in bytes.chunks_exact(8).enumerate() {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(entry);
            let entry = u64::from_ne_bytes(raw);
            let present = entry & PM_PRESENT != 0;
            let zero_page = present && zero_frame == Some(entry & PM_PFN_MASK);
            let private = entry & PM_SWAP != 0 || (present && entry & PM_FILE == 0 && !zero_page);
            if private {
                push_page(&mut runs, done + i as u64);
            }
        }
        done += entries as u64;
    }
    Ok(runs)
}

/// The pages of `file`'s `[start, start + len)` that have data (anything not a hole), as page
/// indices from `start`, widened to whole pages. `start` and `len` are page-aligned.
pub(crate) fn data_pages(file: &File, start: u64, len: u64) -> io::Result<PageRuns> {
    // SEEK_DATA moves the file position; a private descriptor keeps that from anyone else.
    let mut file = file.try_clone()?;
    let end = start + len;
    let mut runs = PageRuns::new();
    let mut at = start;
    while at < end {
        let Some(data) = file.seek_data(at)? else {
            break;
        };
        if data >= end {
            break;
        }
        let hole = file.seek_hole(data)?.unwrap_or(end).min(end);
        let first = (data - start) / PAGE_SIZE;
        let last = (hole - start).div_ceil(PAGE_SIZE);
        match runs.last_mut() {
            Some(run) if run.end >= first => run.end = run.end.max(last),
            _ => runs.push(first..last),
        }
        at = hole;
    }
    Ok(runs)
}

/// The union of two sorted run lists, sorted, with touching runs merged.
pub(crate) fn union(a: &[Range<u64>], b: &[Range<u64>]) -> PageRuns {
    let mut all: Vec<&Range<u64>> = a.iter().chain(b).collect();
    all.sort_by_key(|r| r.start);
    let mut out = PageRuns::with_capacity(all.len());
    for run in all {
        match out.last_mut() {
            Some(last) if last.end >= run.start => last.end = last.end.max(run.end),
            _ => out.push(run.clone()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn union_merges_overlapping_and_touching_runs() {
        let a = [0..2, 10..12, 20..21];
        let b = [1..4, 12..13, 30..31];

        assert_eq!(union(&a, &b), vec![0..4, 10..13, 20..21, 30..31]);
    }

    #[test]
    fn pages_written_in_an_anonymous_mapping_are_the_private_ones() {
        use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        let memory = super::super::create_memory(&[super::super::RamRange {
            start: 0,
            len: 64 * PAGE_SIZE,
        }])
        .unwrap();
        for page in [3u64, 4, 40] {
            memory
                .write_obj(1u8, GuestAddress(page * PAGE_SIZE))
                .unwrap();
        }
        let region = memory.iter().next().unwrap();
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .unwrap();

        let runs = private_pages(&pagemap, host as usize, region.len() as usize).unwrap();

        assert_eq!(runs, vec![3..5, 40..41]);
    }

    #[test]
    fn pages_only_read_map_the_zero_page_and_are_not_private_where_frames_are_visible() {
        if zero_page_frame(&File::open("/proc/self/pagemap").unwrap()).is_none() {
            eprintln!("skipped: page frame numbers are hidden from this process");
            return;
        }
        use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        let memory = super::super::create_memory(&[super::super::RamRange {
            start: 0,
            len: 64 * PAGE_SIZE,
        }])
        .unwrap();
        memory.write_obj(1u8, GuestAddress(9 * PAGE_SIZE)).unwrap();
        for page in 10..20 {
            let _ = memory
                .read_obj::<u8>(GuestAddress(page * PAGE_SIZE))
                .unwrap();
        }
        let region = memory.iter().next().unwrap();
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .unwrap();

        let runs = private_pages(&pagemap, host as usize, region.len() as usize).unwrap();

        assert_eq!(runs, vec![9..10]);
    }

    #[test]
    fn data_pages_skip_holes_and_widen_to_pages() {
        let mut file = tempfile::tempfile().unwrap();
        file.set_len(64 * PAGE_SIZE).unwrap();
        file.write_all_at(b"x", 5 * PAGE_SIZE + 100).unwrap();
        file.write_all_at(&[7u8; 8192], 30 * PAGE_SIZE).unwrap();
        file.flush().unwrap();

        let runs = data_pages(&file, 0, 64 * PAGE_SIZE).unwrap();
        let from_page_8 = data_pages(&file, 8 * PAGE_SIZE, 32 * PAGE_SIZE).unwrap();

        assert_eq!(runs, vec![5..6, 30..32]);
        assert_eq!(from_page_8, vec![22..24]);
    }
}
