//! Positioned I/O between a disk image file and guest memory.
//!
//! vm-memory moves bytes between guest memory and a file with `read`/`write`, which need the file
//! offset set first (a second syscall, and a shared cursor). [`ImageCursor`] does the same with
//! `pread`/`pwrite` at an explicit offset, straight into or out of the guest's pages: no bounce
//! buffer, no allocation, one syscall per contiguous piece.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};

/// A position in a disk image that guest memory is read into or written from.
///
/// Implements vm-memory's volatile I/O traits so `GuestMemory::read_exact_volatile_from` /
/// `write_all_volatile_to` can drive it across region boundaries. Every byte read into guest
/// memory is marked in the memory's dirty bitmap. `offset` advances by the bytes moved, so after an
/// error it says how far the transfer got.
#[derive(Debug)]
pub(super) struct ImageCursor<'a> {
    file: &'a File,
    offset: u64,
}

impl<'a> ImageCursor<'a> {
    /// A cursor at byte `offset` of `file`.
    pub(super) fn new(file: &'a File, offset: u64) -> Self {
        Self { file, offset }
    }

    /// The image offset of the next byte to move.
    pub(super) fn offset(&self) -> u64 {
        self.offset
    }

    fn file_offset(&self) -> io::Result<libc::off_t> {
        libc::off_t::try_from(self.offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
    }
}

impl ReadVolatile for ImageCursor<'_> {
    /// Fills `buf` from the image unless the image ends first; retries interrupted and short reads.
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let mut done = 0;
        while done < buf.len() {
            let rest = buf.offset(done)?;
            let guard = rest.ptr_guard_mut();
            let offset = self.file_offset().map_err(VolatileMemoryError::IOError)?;
            // SAFETY: `guard` points at `rest.len()` bytes of mapped guest memory that stay mapped
            // while `buf` borrows it; `pread` writes at most that many bytes there. The descriptor
            // is valid: `self.file` borrows an open `File`.
            let read = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    guard.as_ptr().cast(),
                    rest.len(),
                    offset,
                )
            };
            match usize::try_from(read) {
                Ok(0) => break,
                Ok(read) => {
                    rest.bitmap().mark_dirty(0, read);
                    done += read;
                    self.offset += read as u64;
                }
                Err(_) => {
                    let error = io::Error::last_os_error();
                    if error.kind() != io::ErrorKind::Interrupted {
                        return Err(VolatileMemoryError::IOError(error));
                    }
                }
            }
        }
        Ok(done)
    }
}

impl WriteVolatile for ImageCursor<'_> {
    /// Writes some of `buf` to the image; callers loop (`write_all_volatile`) for the rest.
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let guard = buf.ptr_guard();
        let offset = self.file_offset().map_err(VolatileMemoryError::IOError)?;
        // SAFETY: `guard` points at `buf.len()` readable bytes of mapped guest memory that stay
        // mapped while `buf` borrows it; `pwrite` only reads them. The descriptor is valid:
        // `self.file` borrows an open `File`.
        let written = unsafe {
            libc::pwrite(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                buf.len(),
                offset,
            )
        };
        let written = usize::try_from(written)
            .map_err(|_| VolatileMemoryError::IOError(io::Error::last_os_error()))?;
        self.offset += written as u64;
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use vm_memory::bitmap::Bitmap;

    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

    use super::*;
    use crate::memory::PartitionMemory;

    fn image(bytes: &[u8]) -> File {
        let file = tempfile::tempfile().unwrap();
        file.write_all_at(bytes, 0).unwrap();
        file
    }

    fn is_dirty(memory: &PartitionMemory, addr: u64) -> bool {
        let region = memory.find_region(GuestAddress(addr)).unwrap();
        region.bitmap().dirty_at(addr as usize)
    }

    #[test]
    fn read_fills_guest_memory_from_the_offset_and_marks_it_dirty() {
        let memory = PartitionMemory::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
        let file = image(&[1, 2, 3, 4, 5, 6, 7, 8]);
        let mut cursor = ImageCursor::new(&file, 2);

        memory
            .read_exact_volatile_from(GuestAddress(0x2000), &mut cursor, 4)
            .unwrap();

        let mut bytes = [0; 4];
        memory.read_slice(&mut bytes, GuestAddress(0x2000)).unwrap();
        assert_eq!(bytes, [3, 4, 5, 6]);
        assert_eq!(cursor.offset(), 6);
        assert!(is_dirty(&memory, 0x2000));
        assert!(!is_dirty(&memory, 0x1000));
    }

    #[test]
    fn read_past_the_end_of_the_image_stops_short() {
        let memory = PartitionMemory::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
        let file = image(&[9; 8]);
        let mut cursor = ImageCursor::new(&file, 4);

        let result = memory.read_exact_volatile_from(GuestAddress(0), &mut cursor, 8);

        assert!(result.is_err());
        assert_eq!(cursor.offset(), 8);
    }

    #[test]
    fn write_copies_guest_memory_to_the_offset() {
        let memory = PartitionMemory::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
        memory.write_slice(&[7, 7, 7], GuestAddress(0x100)).unwrap();
        let file = image(&[0; 8]);
        let mut cursor = ImageCursor::new(&file, 5);

        memory
            .write_all_volatile_to(GuestAddress(0x100), &mut cursor, 3)
            .unwrap();

        let mut bytes = [0; 8];
        file.read_exact_at(&mut bytes, 0).unwrap();
        assert_eq!(bytes, [0, 0, 0, 0, 0, 7, 7, 7]);
        assert_eq!(cursor.offset(), 8);
    }

    #[test]
    fn transfer_spanning_two_regions_moves_every_byte() {
        let memory = PartitionMemory::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        let file = image(&(0..=255).collect::<Vec<u8>>());
        let mut cursor = ImageCursor::new(&file, 0);

        memory
            .read_exact_volatile_from(GuestAddress(0xf80), &mut cursor, 256)
            .unwrap();

        let mut bytes = [0; 256];
        memory.read_slice(&mut bytes, GuestAddress(0xf80)).unwrap();
        assert!(bytes.iter().enumerate().all(|(i, b)| usize::from(*b) == i));
    }
}
