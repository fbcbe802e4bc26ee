//! A minimal virtio driver for tests: it talks to a transport only through its MMIO registers and
//! builds split virtqueues in guest memory, the way Linux's virtio_mmio and virtio_ring do.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_DEVICE_FEATURES, VIRTIO_MMIO_DEVICE_FEATURES_SEL, VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    VIRTIO_MMIO_QUEUE_DESC_HIGH, VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_NOTIFY,
    VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_USED_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_STATUS,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

use crate::bus::BusDevice;
use crate::memory::PartitionMemory;

/// Entries of the test queue.
pub(super) const QUEUE_SIZE: u16 = 16;
/// Where the test queue's rings live.
pub(super) const DESC_TABLE: u64 = 0x1000;
pub(super) const AVAIL_RING: u64 = 0x2000;
pub(super) const USED_RING: u64 = 0x3000;
/// Size of the tests' guest memory, one region at 0.
pub(super) const MEMORY_SIZE: u64 = 0x10_0000;

/// Guest memory for a test: one region of [`MEMORY_SIZE`] bytes at address 0.
pub(super) fn guest_memory() -> PartitionMemory {
    PartitionMemory::from_ranges(&[(GuestAddress(0), MEMORY_SIZE as usize)])
        .expect("a small anonymous mapping")
}

/// A 32-bit register read, as a driver does it.
pub(super) fn read_register(device: &dyn BusDevice, offset: u32) -> u32 {
    let mut bytes = [0; 4];
    device.read(u64::from(offset), &mut bytes);
    u32::from_le_bytes(bytes)
}

/// A 32-bit register write, as a driver does it.
pub(super) fn write_register(device: &dyn BusDevice, offset: u32, value: u32) {
    device.write(u64::from(offset), &value.to_le_bytes());
}

/// One buffer of a descriptor chain.
#[derive(Clone, Copy, Debug)]
pub(super) struct Buffer {
    pub(super) addr: u64,
    pub(super) len: u32,
    pub(super) writable: bool,
}

impl Buffer {
    /// A buffer the device reads.
    pub(super) fn readable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            writable: false,
        }
    }

    /// A buffer the device writes.
    pub(super) fn writable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            writable: true,
        }
    }
}

/// The driver side of queue 0: which descriptors and available entries it used so far.
#[derive(Clone, Debug, Default)]
pub(super) struct Driver {
    next_desc: u16,
    avail_idx: u16,
}

impl Driver {
    /// Brings the device to `DRIVER_OK` with every feature it offers and queue 0 in place.
    pub(super) fn start(device: &dyn BusDevice) -> Self {
        let offered = device_features(device);
        negotiate(device, offered);
        setup_queue(device);
        add_status(device, VIRTIO_CONFIG_S_DRIVER_OK);
        Self::default()
    }

    /// Writes a chain of `buffers` into the descriptor table and makes it available, without
    /// notifying. Returns the chain's head index.
    pub(super) fn publish(&mut self, memory: &PartitionMemory, buffers: &[Buffer]) -> u16 {
        let head = self.next_desc;
        for (i, buffer) in buffers.iter().enumerate() {
            let index = self.next_desc;
            self.next_desc = (self.next_desc + 1) % QUEUE_SIZE;
            let mut flags = if buffer.writable {
                VRING_DESC_F_WRITE
            } else {
                0
            };
            if i + 1 < buffers.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            let desc = Descriptor::new(buffer.addr, buffer.len, flags as u16, self.next_desc);
            memory
                .write_obj(desc, GuestAddress(DESC_TABLE + 16 * u64::from(index)))
                .expect("descriptor table in memory");
        }
        let slot = AVAIL_RING + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE);
        memory
            .write_obj(head, GuestAddress(slot))
            .expect("avail ring in memory");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        memory
            .write_obj(self.avail_idx, GuestAddress(AVAIL_RING + 2))
            .expect("avail ring in memory");
        head
    }

    /// Publishes a chain and notifies queue 0.
    pub(super) fn submit(
        &mut self,
        memory: &PartitionMemory,
        device: &dyn BusDevice,
        buffers: &[Buffer],
    ) -> u16 {
        let head = self.publish(memory, buffers);
        write_register(device, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        head
    }
}

/// The 64 feature bits the device offers.
pub(super) fn device_features(device: &dyn BusDevice) -> u64 {
    write_register(device, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    let high = read_register(device, VIRTIO_MMIO_DEVICE_FEATURES);
    write_register(device, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    let low = read_register(device, VIRTIO_MMIO_DEVICE_FEATURES);
    (u64::from(high) << 32) | u64::from(low)
}

/// ACKNOWLEDGE, DRIVER, accept `features`, FEATURES_OK; returns the status read back.
pub(super) fn negotiate(device: &dyn BusDevice, features: u64) -> u32 {
    add_status(device, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    add_status(device, VIRTIO_CONFIG_S_DRIVER);
    write_register(device, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    write_register(device, VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
    write_register(device, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    write_register(device, VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
    add_status(device, VIRTIO_CONFIG_S_FEATURES_OK);
    read_register(device, VIRTIO_MMIO_STATUS)
}

/// Places queue 0 at [`DESC_TABLE`], [`AVAIL_RING`], [`USED_RING`] with [`QUEUE_SIZE`] entries and
/// enables it.
pub(super) fn setup_queue(device: &dyn BusDevice) {
    write_register(device, VIRTIO_MMIO_QUEUE_SEL, 0);
    write_register(device, VIRTIO_MMIO_QUEUE_NUM, u32::from(QUEUE_SIZE));
    for (low, high, addr) in [
        (
            VIRTIO_MMIO_QUEUE_DESC_LOW,
            VIRTIO_MMIO_QUEUE_DESC_HIGH,
            DESC_TABLE,
        ),
        (
            VIRTIO_MMIO_QUEUE_AVAIL_LOW,
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
            AVAIL_RING,
        ),
        (
            VIRTIO_MMIO_QUEUE_USED_LOW,
            VIRTIO_MMIO_QUEUE_USED_HIGH,
            USED_RING,
        ),
    ] {
        write_register(device, low, addr as u32);
        write_register(device, high, (addr >> 32) as u32);
    }
    write_register(device, VIRTIO_MMIO_QUEUE_READY, 1);
}

/// Sets one more status bit, keeping the others (Linux's `virtio_add_status`).
pub(super) fn add_status(device: &dyn BusDevice, bit: u32) {
    let status = read_register(device, VIRTIO_MMIO_STATUS);
    write_register(device, VIRTIO_MMIO_STATUS, status | bit);
}

/// The used ring's `idx`: how many chains the device has returned.
pub(super) fn used_idx(memory: &PartitionMemory) -> u16 {
    memory
        .read_obj(GuestAddress(USED_RING + 2))
        .expect("used ring in memory")
}

/// Used-ring entry `n`: (head index, bytes written).
pub(super) fn used_elem(memory: &PartitionMemory, n: u16) -> (u32, u32) {
    let at = USED_RING + 4 + 8 * u64::from(n % QUEUE_SIZE);
    let id = memory
        .read_obj(GuestAddress(at))
        .expect("used ring in memory");
    let len = memory
        .read_obj(GuestAddress(at + 4))
        .expect("used ring in memory");
    (id, len)
}

/// The used ring's `flags`: `VRING_USED_F_NO_NOTIFY` while the device polls.
pub(super) fn used_flags(memory: &PartitionMemory) -> u16 {
    memory
        .read_obj(GuestAddress(USED_RING))
        .expect("used ring in memory")
}
