//! The block-backend seam: what a virtual disk's bytes come from.
//!
//! virtio-blk moves bytes between guest memory and a [`BlockBackend`], nothing else: it knows no
//! image format. The partition opens a raw image file itself ([`RawImage`]) when a disk is given by
//! path; an integrator that wants another format (qcow2, a differencing disk, a checkpoint overlay)
//! opens it and hands the partition an `Arc<dyn BlockBackend>` per disk instead
//! ([`DiskConfig::backend`](crate::DiskConfig::backend)).
//!
//! Backends are called with `&self` from whichever thread serves the disk (a vCPU on the
//! synchronous path, the disk's I/O thread otherwise), so they do their own locking. The buffers
//! are guest memory ([`GuestBuffer`]): a backend reads into them and writes from them directly, and
//! marks what it writes into guest memory in the memory's dirty bitmap so dirty-page tracking
//! (checkpoints, live migration) sees the device's writes next to the guest's own.
//!
//! Two running VMs must never write one image: [`RawImage::open`] takes an OFD lock on it (a write
//! lock for a writable disk, a read lock for a read-only one, as QEMU does) and fails with
//! [`BlockError::DiskLocked`] when another open file description holds a conflicting one. Other
//! backends take the same lock with [`lock_image`].

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use vm_memory::VolatileSlice;
use vm_memory::bitmap::{AtomicBitmap, BS, Bitmap};

/// Size of a sector: every backend's size is a multiple of it.
pub const SECTOR_SIZE: u64 = 512;

/// A contiguous piece of guest memory a request reads into or writes from.
///
/// Its bitmap is the memory's dirty bitmap: bytes a backend reads into the buffer must be marked
/// with `buf.bitmap().mark_dirty(offset, len)` (or by copying through vm-memory's volatile I/O,
/// which marks them).
pub type GuestBuffer<'a> = VolatileSlice<'a, BS<'a, AtomicBitmap>>;

/// A virtual disk's bytes. Object safe; every method takes `&self` (called from an I/O thread or
/// a vCPU).
///
/// Requests from one disk may arrive from several threads at once on future multi-queue devices;
/// today a disk serves one request at a time, in the driver's order, and a [`flush`](Self::flush)
/// comes after the writes it must make durable have returned.
pub trait BlockBackend: Send + Sync + std::fmt::Debug {
    /// The disk's size in bytes, a multiple of [`SECTOR_SIZE`]; it does not change while the disk
    /// is attached.
    fn size(&self) -> u64;

    /// Whether the backend refuses writes (the guest is then told the disk is read-only).
    fn read_only(&self) -> bool;

    /// Fills the whole of `buf` from the disk at byte `offset`; bytes never written (unallocated
    /// clusters, holes) read as zeros. Marks the guest pages it wrote dirty. The caller keeps
    /// `offset + buf.len()` within [`size`](Self::size).
    fn read_at(&self, offset: u64, buf: &GuestBuffer<'_>) -> io::Result<()>;

    /// Writes the whole of `buf` to the disk at byte `offset`. The caller keeps
    /// `offset + buf.len()` within [`size`](Self::size) and never calls it on a read-only backend.
    fn write_at(&self, offset: u64, buf: &GuestBuffer<'_>) -> io::Result<()>;

    /// Makes every write that has returned durable (`fdatasync` or its equivalent, metadata the
    /// data needs included).
    fn flush(&self) -> io::Result<()>;
}

/// The backend a virtio-blk device uses, replaceable while the partition is paused
/// ([`Partition::replace_disk_backend`](crate::Partition::replace_disk_backend)): a running
/// checkpoint switches each disk to a new overlay in its one short pause.
///
/// Each request takes a shared read lock (uncontended: one atomic operation) to borrow the
/// current backend; replacing takes the write lock, which nothing contends for either, since
/// a paused partition serves no requests.
#[derive(Debug)]
pub struct BackendSlot {
    current: std::sync::RwLock<std::sync::Arc<dyn BlockBackend>>,
    size: u64,
    read_only: bool,
}

impl BackendSlot {
    /// A slot holding `backend`, whose size and read-only flag every replacement must keep.
    pub fn new(backend: std::sync::Arc<dyn BlockBackend>) -> Self {
        BackendSlot {
            size: backend.size(),
            read_only: backend.read_only(),
            current: std::sync::RwLock::new(backend),
        }
    }

    /// The backend requests go to now.
    pub fn current(&self) -> std::sync::Arc<dyn BlockBackend> {
        self.read().clone()
    }

    /// Puts `backend` in place and returns the one it replaces. Refused (and `backend` given
    /// back) when its size or read-only flag differ from the slot's: the guest was told those.
    pub fn replace(
        &self,
        backend: std::sync::Arc<dyn BlockBackend>,
    ) -> Result<std::sync::Arc<dyn BlockBackend>, std::sync::Arc<dyn BlockBackend>> {
        if backend.size() != self.size || backend.read_only() != self.read_only {
            return Err(backend);
        }
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(std::mem::replace(&mut *current, backend))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, std::sync::Arc<dyn BlockBackend>> {
        // The lock guards a plain Arc that is replaced whole: a panic elsewhere leaves it valid.
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl BlockBackend for BackendSlot {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, offset: u64, buf: &GuestBuffer<'_>) -> io::Result<()> {
        self.read().read_at(offset, buf)
    }

    fn write_at(&self, offset: u64, buf: &GuestBuffer<'_>) -> io::Result<()> {
        self.read().write_at(offset, buf)
    }

    fn flush(&self) -> io::Result<()> {
        self.read().flush()
    }
}

/// Why a disk image could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened or its size read.
    #[error("cannot open disk image {}", path.display())]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Another open of the image (another VM, or another disk of this one) holds a lock that
    /// conflicts with this one: a write lock, or a read lock when this open wants to write.
    #[error("disk image {} is in use by another virtual machine (locked)", path.display())]
    DiskLocked {
        /// The image.
        path: PathBuf,
    },
    /// The lock could not be taken for another reason than a conflict (a file system without
    /// OFD locks).
    #[error("cannot lock disk image {}", path.display())]
    Lock {
        /// The image.
        path: PathBuf,
        /// What fcntl said.
        #[source]
        source: io::Error,
    },
    /// The image's size is not a whole number of sectors.
    #[error("disk image {} has {len} bytes, not a multiple of {SECTOR_SIZE}", path.display())]
    NotSectorAligned {
        /// The image.
        path: PathBuf,
        /// Its size in bytes.
        len: u64,
    },
}

/// Takes an OFD (open file description) lock on the whole of `file`: a write lock when `write`,
/// a read lock otherwise. The lock lives as long as the open file description (every clone of
/// `file`'s descriptor) and conflicts with any other open of the same file, in this process or
/// another, that holds a write lock, or a read lock when `write` is asked.
///
/// Backends other than [`RawImage`] call it on every file they open: images they write with
/// `write`, backing files they only read without.
pub fn lock_image(file: &File, path: &Path, write: bool) -> Result<(), BlockError> {
    let lock = libc::flock {
        l_type: if write { libc::F_WRLCK } else { libc::F_RDLCK } as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        // Zero: to the end of the file, however it grows.
        l_len: 0,
        // OFD locks require a zero pid.
        l_pid: 0,
    };
    // SAFETY: `file` is an open descriptor and `lock` a fully initialized flock that fcntl only
    // reads for F_OFD_SETLK.
    let result = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    if result == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EAGAIN | libc::EACCES) => Err(BlockError::DiskLocked {
            path: path.to_path_buf(),
        }),
        _ => Err(BlockError::Lock {
            path: path.to_path_buf(),
            source: error,
        }),
    }
}

/// A raw disk image: the file's bytes are the disk's bytes.
///
/// Reads and writes are `pread`/`pwrite` straight between the file and guest memory: no bounce
/// buffer, no allocation, one syscall per contiguous piece (more only if the kernel moves less).
#[derive(Debug)]
pub struct RawImage {
    file: File,
    size: u64,
    read_only: bool,
}

impl RawImage {
    /// Opens the image at `path` (read-only or read-write) and locks it against every other
    /// writer ([`lock_image`]); fails with [`BlockError::DiskLocked`] if another VM has it.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        lock_image(&file, path, !read_only)?;
        Self::from_file(file, read_only).map_err(|error| match error {
            BlockError::Open { source, .. } => BlockError::Open {
                path: path.to_path_buf(),
                source,
            },
            BlockError::NotSectorAligned { len, .. } => BlockError::NotSectorAligned {
                path: path.to_path_buf(),
                len,
            },
            other => other,
        })
    }

    /// An image over an already open `file` (open for writing too unless `read_only`), which the
    /// caller has locked if it needs to ([`lock_image`]).
    pub fn from_file(file: File, read_only: bool) -> Result<Self, BlockError> {
        let size = file
            .metadata()
            .map_err(|source| BlockError::Open {
                path: PathBuf::new(),
                source,
            })?
            .len();
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(BlockError::NotSectorAligned {
                path: PathBuf::new(),
                len: size,
            });
        }
        Ok(Self {
            file,
            size,
            read_only,
        })
    }

    /// The image file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

fn file_offset(offset: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

impl BlockBackend for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, offset: u64, buf: &GuestBuffer<'_>) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let rest = buf.offset(done).map_err(io::Error::other)?;
            let guard = rest.ptr_guard_mut();
            let at = file_offset(offset + done as u64)?;
            // SAFETY: `guard` points at `rest.len()` bytes of mapped guest memory that stay mapped
            // while `buf` borrows it; `pread` writes at most that many bytes there. The descriptor
            // is valid: `self.file` is an open `File`.
            let read = unsafe {
                libc::pread(self.file.as_raw_fd(), guard.as_ptr().cast(), rest.len(), at)
            };
            match usize::try_from(read) {
                // The file shrank under the disk: the request cannot be completed.
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(read) => {
                    rest.bitmap().mark_dirty(0, read);
                    done += read;
                }
                Err(_) => {
                    let error = io::Error::last_os_error();
                    if error.kind() != io::ErrorKind::Interrupted {
                        return Err(error);
                    }
                }
            }
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &GuestBuffer<'_>) -> io::Result<()> {
        if self.read_only {
            return Err(io::ErrorKind::PermissionDenied.into());
        }
        let mut done = 0;
        while done < buf.len() {
            let rest = buf.offset(done).map_err(io::Error::other)?;
            let guard = rest.ptr_guard();
            let at = file_offset(offset + done as u64)?;
            // SAFETY: `guard` points at `rest.len()` readable bytes of mapped guest memory that
            // stay mapped while `buf` borrows it; `pwrite` only reads them. The descriptor is
            // valid: `self.file` is an open `File`.
            let written = unsafe {
                libc::pwrite(self.file.as_raw_fd(), guard.as_ptr().cast(), rest.len(), at)
            };
            match usize::try_from(written) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => done += written,
                Err(_) => {
                    let error = io::Error::last_os_error();
                    if error.kind() != io::ErrorKind::Interrupted {
                        return Err(error);
                    }
                }
            }
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

    use super::*;
    use crate::memory::PartitionMemory;

    fn memory() -> PartitionMemory {
        PartitionMemory::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap()
    }

    fn image(bytes: &[u8]) -> RawImage {
        let file = tempfile::tempfile().unwrap();
        file.write_all_at(bytes, 0).unwrap();
        RawImage::from_file(file, false).unwrap()
    }

    fn is_dirty(memory: &PartitionMemory, addr: u64) -> bool {
        let region = memory.find_region(GuestAddress(addr)).unwrap();
        region.bitmap().dirty_at(addr as usize)
    }

    #[test]
    fn read_fills_the_buffer_from_the_offset_and_marks_it_dirty() {
        let memory = memory();
        let bytes: Vec<u8> = (0..1024u32).map(|i| i as u8).collect();
        let image = image(&bytes);

        let buf = memory.get_slice(GuestAddress(0x2000), 512).unwrap();
        image.read_at(512, &buf).unwrap();

        let mut read = [0; 512];
        memory.read_slice(&mut read, GuestAddress(0x2000)).unwrap();
        assert_eq!(read[..], bytes[512..]);
        assert!(is_dirty(&memory, 0x2000));
        assert!(!is_dirty(&memory, 0x1000));
    }

    #[test]
    fn read_past_the_end_of_the_file_fails() {
        let memory = memory();
        let image = image(&[9; 512]);

        let buf = memory.get_slice(GuestAddress(0), 1024).unwrap();

        assert!(image.read_at(0, &buf).is_err());
    }

    #[test]
    fn write_copies_the_buffer_to_the_offset() {
        let memory = memory();
        memory.write_slice(&[7; 512], GuestAddress(0x100)).unwrap();
        let image = image(&[0; 1536]);

        let buf = memory.get_slice(GuestAddress(0x100), 512).unwrap();
        image.write_at(512, &buf).unwrap();

        let mut bytes = [0; 1536];
        image.file().read_exact_at(&mut bytes, 0).unwrap();
        assert_eq!(bytes[..512], [0; 512]);
        assert_eq!(bytes[512..1024], [7; 512]);
        assert_eq!(bytes[1024..], [0; 512]);
    }

    #[test]
    fn read_only_image_refuses_writes() {
        let memory = memory();
        let file = tempfile::tempfile().unwrap();
        file.set_len(512).unwrap();
        let image = RawImage::from_file(file, true).unwrap();

        let buf = memory.get_slice(GuestAddress(0), 512).unwrap();

        assert!(image.read_only());
        assert!(image.write_at(0, &buf).is_err());
    }

    #[test]
    fn backend_slot_sends_requests_to_its_replacement() {
        let memory = memory();
        memory.write_slice(&[3; 512], GuestAddress(0)).unwrap();
        let first = std::sync::Arc::new(image(&[0; 1024]));
        let second = std::sync::Arc::new(image(&[0; 1024]));
        let slot = BackendSlot::new(first.clone());
        let buf = memory.get_slice(GuestAddress(0), 512).unwrap();

        let old = slot.replace(second.clone()).unwrap();
        slot.write_at(0, &buf).unwrap();

        let (mut a, mut b) = ([0; 512], [0; 512]);
        first.file().read_exact_at(&mut a, 0).unwrap();
        second.file().read_exact_at(&mut b, 0).unwrap();
        assert_eq!(old.size(), 1024);
        assert_eq!((a, b), ([0; 512], [3; 512]));
    }

    #[test]
    fn backend_slot_refuses_a_replacement_of_another_size() {
        let slot = BackendSlot::new(std::sync::Arc::new(image(&[0; 1024])));

        let refused = slot.replace(std::sync::Arc::new(image(&[0; 2048])));

        assert!(refused.is_err());
        assert_eq!(slot.current().size(), 1024);
    }

    #[test]
    fn image_that_is_not_whole_sectors_is_refused() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(1000).unwrap();

        let error = RawImage::from_file(file, false).unwrap_err();

        assert!(matches!(
            error,
            BlockError::NotSectorAligned { len: 1000, .. }
        ));
    }

    fn image_file(dir: &Path) -> PathBuf {
        let path = dir.join("disk.img");
        File::create(&path).unwrap().set_len(4096).unwrap();
        path
    }

    #[test]
    fn second_writable_open_of_an_image_is_refused_as_locked() {
        let dir = tempfile::tempdir().unwrap();
        let path = image_file(dir.path());
        let _first = RawImage::open(&path, false).unwrap();

        let second = RawImage::open(&path, false).unwrap_err();

        assert!(matches!(second, BlockError::DiskLocked { path: p } if p == path));
    }

    #[test]
    fn read_only_open_of_an_image_open_for_writing_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = image_file(dir.path());
        let _writer = RawImage::open(&path, false).unwrap();

        let reader = RawImage::open(&path, true).unwrap_err();

        assert!(matches!(reader, BlockError::DiskLocked { .. }));
    }

    #[test]
    fn writable_open_of_an_image_open_read_only_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = image_file(dir.path());
        let _reader = RawImage::open(&path, true).unwrap();

        let writer = RawImage::open(&path, false).unwrap_err();

        assert!(matches!(writer, BlockError::DiskLocked { .. }));
    }

    #[test]
    fn two_read_only_opens_share_an_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = image_file(dir.path());
        let _first = RawImage::open(&path, true).unwrap();

        let second = RawImage::open(&path, true);

        assert!(second.is_ok());
    }

    #[test]
    fn closing_the_holder_releases_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = image_file(dir.path());
        drop(RawImage::open(&path, false).unwrap());

        let again = RawImage::open(&path, false);

        assert!(again.is_ok());
    }
}
