//! The block-backend seam: how virtio-blk reads and writes a disk without knowing its image format.

/// A slice of guest memory as the virtio-blk device hands it to a backend; writes through it are
/// recorded in the guest memory's dirty bitmap.
pub type GuestBuffer<'a> =
    vm_memory::VolatileSlice<'a, vm_memory::bitmap::BS<'a, vm_memory::bitmap::AtomicBitmap>>;

/// A disk image as the virtio-blk device sees it: a flat, byte-addressed range of sectors.
///
/// Implementations are called from a device thread (synchronously) and must be safe to share
/// between threads.
pub trait BlockBackend: Send + Sync + std::fmt::Debug {
    /// The disk size in bytes, a multiple of 512.
    fn size(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// Fills the whole of `buf` from `offset`; unallocated ranges read as zeros. Marks the written
    /// guest pages dirty.
    fn read_at(&self, offset: u64, buf: &GuestBuffer<'_>) -> std::io::Result<()>;
    /// Writes the whole of `buf` at `offset`.
    fn write_at(&self, offset: u64, buf: &GuestBuffer<'_>) -> std::io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> std::io::Result<()>;
}
