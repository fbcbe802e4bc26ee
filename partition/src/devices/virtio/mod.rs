//! Virtio devices of a partition: the virtio-mmio transport, virtio-blk and virtio-net.
//!
//! Hyper-V gives a child partition synthetic devices on VMBus; a KVM guest gets the portable
//! equivalent, virtio (OASIS virtio 1.x, "modern" devices only). The parts:
//!
//! - [`VirtioDevice`]: what a device model implements: its type, queues, features, config space,
//!   activation, reset, queue processing and state.
//! - [`MmioTransport`]: the virtio-mmio register window (version 2) that puts one device on the
//!   partition's MMIO bus as a [`BusDevice`](crate::bus::BusDevice). It owns the virtqueues and the
//!   device status, and raises the device's interrupt through an `EventFd` (a KVM irqfd).
//! - [`Block`]: virtio-blk over a [`BlockBackend`](crate::block::BlockBackend) (a raw image or
//!   any format an integrator opens), recording every write in a [`ChangedBlockMap`] (Hyper-V's
//!   Resilient Change Tracking) so backups can copy only what changed.
//! - [`Net`]: virtio-net over a [`Tap`] (Hyper-V's synthetic network adapter): MAC, link status,
//!   merged receive buffers and the checksum/TSO offloads TAP's vnet header carries.
//!
//! Queue notifications are served by the device's I/O thread: the partition registers the
//! transport's notification eventfds as KVM ioeventfds on `QueueNotify`, so a notification costs
//! the vCPU an exit that ends in the kernel, and the thread serves the whole available ring per
//! wake-up. A disk may instead be served synchronously, on the vCPU thread that wrote
//! `QueueNotify` (no extra thread). Either way the request path neither allocates nor logs.

mod blk;
mod changed_blocks;
mod data_path;
#[cfg(test)]
mod driver;
mod io_thread;
mod mmio;
mod net;
mod net_tap;
#[cfg(test)]
mod net_tests;
mod poll_window;

use std::os::fd::RawFd;

use serde::Serialize;
use serde::de::DeserializeOwned;
use virtio_queue::Queue;

use crate::memory::PartitionMemory;

pub use blk::{Block, BlockConfig, BlockState, SECTOR_SIZE};
pub use changed_blocks::{ChangedBlockIter, ChangedBlockMap, ChangedBlocks};
pub use mmio::{MmioTransport, MmioTransportState, QUEUE_NOTIFY_OFFSET, VirtqueueState};
pub use net::{MacAddress, MacParseError, Net, NetState, RX_QUEUE, TX_QUEUE};
pub use net_tap::{Tap, VNET_HDR_LEN};

/// A virtio device model, as the transport sees it.
///
/// The transport owns the virtqueues and the guest memory handle and lends them to the device for
/// each notification, so a device holds only its own backend (a file, a socket) and its config.
/// All methods run with the transport's queue lock held; a device needs no locking of its own.
/// [`process_queue`](Self::process_queue) runs on the device's I/O thread or on a vCPU thread.
///
/// ```
/// use partition::devices::virtio::{MmioTransport, VirtioDevice, VirtioError};
/// use partition::bus::BusDevice;
/// use partition::memory::PartitionMemory;
/// use virtio_queue::{Queue, QueueOwnedT, QueueT};
/// use vm_memory::GuestAddress;
/// use vmm_sys_util::eventfd::EventFd;
///
/// /// Completes every buffer it is given without looking at it.
/// #[derive(Debug)]
/// struct Sink;
///
/// impl VirtioDevice for Sink {
///     type State = ();
///     fn device_type(&self) -> u32 { 0x7f }
///     fn queue_max_sizes(&self) -> &[u16] { &[16] }
///     fn features(&self) -> u64 { 1 << 32 } // VIRTIO_F_VERSION_1
///     fn read_config(&self, _offset: u64, _data: &mut [u8]) {}
///     fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
///     fn activate(&mut self, _features: u64) -> Result<(), VirtioError> { Ok(()) }
///     fn reset(&mut self) {}
///     fn process_queue(
///         &mut self,
///         memory: &PartitionMemory,
///         index: usize,
///         queue: &mut Queue,
///     ) -> Result<bool, VirtioError> {
///         let broken = |_| VirtioError::BrokenQueue { index };
///         let mut used = false;
///         while let Some(chain) = queue.iter(memory).map_err(broken)?.next() {
///             queue.add_used(memory, chain.head_index(), 0).map_err(broken)?;
///             used = true;
///         }
///         Ok(used)
///     }
///     fn state(&self) {}
///     fn restore(&mut self, _state: &()) -> Result<(), VirtioError> { Ok(()) }
/// }
///
/// let memory = PartitionMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
/// let transport = MmioTransport::new(Sink, memory, EventFd::new(libc::EFD_NONBLOCK).unwrap()).unwrap();
/// let mut magic = [0u8; 4];
/// transport.read(0, &mut magic);
/// assert_eq!(&magic, b"virt");
/// ```
pub trait VirtioDevice: Send {
    /// What [`VirtioDevice::state`] captures beyond the transport's own state.
    type State: Serialize + DeserializeOwned;

    /// The virtio device ID (`VIRTIO_ID_BLOCK` = 2, ...).
    fn device_type(&self) -> u32;

    /// The largest size of each virtqueue; the length is the number of queues. Each size is a
    /// power of two no larger than 32768.
    fn queue_max_sizes(&self) -> &[u16];

    /// The feature bits the device offers; must include `VIRTIO_F_VERSION_1`.
    fn features(&self) -> u64;

    /// The driver reads `data.len()` bytes of config space at `offset`. Bytes outside the config
    /// space stay as they are (the transport zeroes `data` first).
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// The driver writes `data` to config space at `offset`; read-only fields ignore it.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// The driver set `DRIVER_OK` having accepted `features` (a subset of [`VirtioDevice::features`]).
    ///
    /// An error puts the device into `DEVICE_NEEDS_RESET`.
    fn activate(&mut self, features: u64) -> Result<(), VirtioError>;

    /// The driver reset the device (wrote 0 to `Status`): forget everything negotiated.
    fn reset(&mut self);

    /// The driver notified queue `index`: serve the available buffers of `queue`.
    ///
    /// Returns whether any buffer was put into the used ring, i.e. whether the driver may need an
    /// interrupt, or an error when the driver broke the queue (an available index beyond the ring,
    /// a descriptor outside guest memory): the transport then puts the device into
    /// `DEVICE_NEEDS_RESET`. May run on a vCPU thread in the middle of an MMIO exit: must not
    /// allocate, log or block on anything but the device's own backend, and must never panic on
    /// guest input.
    fn process_queue(
        &mut self,
        memory: &PartitionMemory,
        index: usize,
        queue: &mut Queue,
    ) -> Result<bool, VirtioError>;

    /// Captures the device's own state; only called while the partition's vCPUs are parked.
    fn state(&self) -> Self::State;

    /// A descriptor whose readability means queue `.1` has work without a notification (a
    /// network device's TAP: frames arrived for the receive queue). The device's I/O thread
    /// watches it and serves that queue when it is readable. `None` (the default): the device
    /// moves data only when the driver notifies.
    fn backend(&self) -> Option<(RawFd, usize)> {
        None
    }

    /// Whether the I/O thread should poll queue `index` for a short while after serving it, with
    /// the driver's notifications suppressed (`VRING_USED_F_NO_NOTIFY`), so a driver that submits
    /// request after request does not exit to notify each. For queues the driver fills with work
    /// (a disk's requests); not for queues of buffers the device fills (a NIC's receive queue).
    /// Default: no.
    fn polls_queue(&self, _index: usize) -> bool {
        false
    }

    /// After serving the [`backend`](Self::backend)'s queue: whether input is waiting that found
    /// no buffer. The I/O thread then stops watching the backend until the driver notifies that
    /// queue (it added buffers), instead of spinning on a readable descriptor.
    fn backend_starved(&self) -> bool {
        false
    }

    /// Loads a state captured by [`VirtioDevice::state`] into a freshly built device, before the
    /// transport re-activates it.
    fn restore(&mut self, state: &Self::State) -> Result<(), VirtioError>;
}

/// Errors of the virtio devices and their transport.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// The disk's backend is not a whole number of 512-byte sectors.
    #[error("disk size {len} is not a multiple of {SECTOR_SIZE}")]
    ImageNotSectorAligned {
        /// The image's length in bytes.
        len: u64,
    },
    /// The serial number does not fit virtio-blk's 20-byte ID.
    #[error("disk serial is {len} bytes, at most 20 fit")]
    SerialTooLong {
        /// The serial's length in bytes.
        len: usize,
    },
    /// A changed-block granularity that is not a power of two of at least one sector.
    #[error("changed-block size {block_size} is not a power of two of at least 512")]
    InvalidBlockSize {
        /// The requested granularity.
        block_size: u64,
    },
    /// The changed-block map is smaller than the disk it tracks.
    #[error("changed-block map covers {map_bytes} bytes, disk has {disk_bytes}")]
    ChangedBlockMapTooSmall {
        /// Bytes the map covers.
        map_bytes: u64,
        /// Bytes of the disk.
        disk_bytes: u64,
    },
    /// Two changed-block sets of different geometry cannot be merged.
    #[error("changed-block geometry {found_blocks}x{found_size} does not match {blocks}x{size}")]
    ChangedBlockGeometry {
        /// Blocks of the map.
        blocks: u64,
        /// Block size of the map.
        size: u64,
        /// Blocks of the set given.
        found_blocks: u64,
        /// Block size of the set given.
        found_size: u64,
    },
    /// A serialized changed-block set whose bits do not match its block count.
    #[error("changed-block set does not fit its {block_count} blocks")]
    MalformedChangedBlocks {
        /// The block count the set claims.
        block_count: u64,
    },
    /// A device declared a queue size virtio does not allow.
    #[error("queue {index} maximum size {max_size} is not a power of two in 1..=32768")]
    InvalidQueueMaxSize {
        /// The queue.
        index: usize,
        /// The size declared.
        max_size: u16,
    },
    /// A saved transport state has a different number of queues than the device.
    #[error("saved state has {found} queues, device has {expected}")]
    QueueCount {
        /// Queues of the device.
        expected: usize,
        /// Queues in the state.
        found: usize,
    },
    /// A saved queue state is not one the device could have produced.
    #[error("saved state of queue {index} is invalid")]
    InvalidQueueState {
        /// The queue.
        index: usize,
        /// What virtio-queue rejected.
        #[source]
        source: virtio_queue::Error,
    },
    /// A saved queue's maximum size differs from the device's.
    #[error("saved queue {index} has maximum size {found}, device offers {expected}")]
    QueueMaxSize {
        /// The queue.
        index: usize,
        /// The device's maximum.
        expected: u16,
        /// The saved maximum.
        found: u16,
    },
    /// A saved transport state accepted features the device does not offer.
    #[error("saved features {acked:#x} are not a subset of the offered {offered:#x}")]
    FeaturesNotOffered {
        /// Features in the state.
        acked: u64,
        /// Features the device offers.
        offered: u64,
    },
    /// A ready queue's rings do not lie in guest memory.
    #[error("queue {index} rings lie outside guest memory")]
    QueueOutsideMemory {
        /// The queue.
        index: usize,
    },
    /// A saved device state does not match the device it is restored into.
    #[error("saved {what} does not match the device")]
    StateMismatch {
        /// The mismatching property.
        what: &'static str,
    },
    /// The interrupt eventfd could not be signalled.
    #[error("cannot signal the device interrupt")]
    Interrupt(#[source] std::io::Error),
    /// The driver broke a queue (its available ring or a descriptor chain): the device needs a
    /// reset.
    #[error("queue {index} is broken")]
    BrokenQueue {
        /// The queue.
        index: usize,
    },
    /// The device's I/O thread or its eventfds could not be created.
    #[error("cannot start the device's i/o thread")]
    IoThread(#[source] std::io::Error),
    /// A TAP device could not be opened or configured.
    #[error("cannot set up tap device {name:?}")]
    Tap {
        /// The interface name (empty for a descriptor handed in).
        name: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
}
