//! [`Disk`] as partition's [`BlockBackend`]: the virtio-blk device reads and writes qcow2 chains
//! (and raw files) through it, straight from and into guest memory.
//!
//! imago is built in its synchronous mode here, so a device thread calls it directly: no runtime,
//! no thread hop. Reads mark the guest pages they fill dirty (imago's vm-memory guard does it when
//! the I/O vector is dropped), so dirty logging sees disk reads too.

use std::io;

use imago::io_buffers::{IoVector, IoVectorMut};
use partition::block::{BlockBackend, GuestBuffer};

use crate::disk::Disk;

impl BlockBackend for Disk {
    fn size(&self) -> u64 {
        Disk::size(self)
    }

    fn read_only(&self) -> bool {
        Disk::read_only(self)
    }

    fn read_at(&self, offset: u64, buf: &GuestBuffer<'_>) -> io::Result<()> {
        check_range(self, offset, buf.len())?;
        let (vector, _dirty_guard) = IoVectorMut::from_volatile_slice_one(buf);
        self.access.readv(vector, offset)
    }

    fn write_at(&self, offset: u64, buf: &GuestBuffer<'_>) -> io::Result<()> {
        if Disk::read_only(self) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "disk is read-only",
            ));
        }
        check_range(self, offset, buf.len())?;
        let (vector, _guard) = IoVector::from_volatile_slice_one(buf);
        self.access.writev(vector, offset)
    }

    fn flush(&self) -> io::Result<()> {
        Disk::flush(self)
    }
}

fn check_range(disk: &Disk, offset: u64, len: usize) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= Disk::size(disk) => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "request beyond the end of the disk",
        )),
    }
}
