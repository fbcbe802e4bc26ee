//! Guest memory of a partition.

use vm_memory::bitmap::AtomicBitmap;

/// The guest memory type every device of a partition works on.
///
/// Regions carry an [`AtomicBitmap`] so writes made by the VMM itself (a virtio device filling a read
/// buffer) are tracked next to the guest's own writes that KVM's dirty log sees; both feed the
/// partition's dirty-page log.
pub type PartitionMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;
