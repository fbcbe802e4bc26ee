//! The virtio-mmio transport, version 2 ("modern"), virtio 1.x section 4.2.
//!
//! One 4 KiB window per device: 32-bit registers below 0x100, the device's config space from 0x100.
//! The driver discovers the device, negotiates features, places the virtqueues and sets
//! `DRIVER_OK`; from then on a write to `QueueNotify` makes the device serve that queue, right there
//! on the writing vCPU's thread.

use std::sync::atomic::{Ordering, fence};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_CONFIG_GENERATION, VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL, VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING,
    VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INTERRUPT_STATUS, VIRTIO_MMIO_MAGIC_VALUE,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH, VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_NOTIFY, VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_NUM_MAX, VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_USED_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_SHM_BASE_HIGH,
    VIRTIO_MMIO_SHM_LEN_LOW, VIRTIO_MMIO_STATUS, VIRTIO_MMIO_VENDOR_ID, VIRTIO_MMIO_VERSION,
};
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::{VirtioDevice, VirtioError};
use crate::bus::BusDevice;
use crate::memory::PartitionMemory;

/// "virt" in little-endian: what `MagicValue` reads.
const MAGIC_VALUE: u32 = 0x7472_6976;
/// The register layout without the legacy (version 1) page-based queue registers.
const MMIO_VERSION: u32 = 2;
/// `VendorID`: "VMMS" read as a little-endian word. Drivers match on it only for quirks.
const VENDOR_ID: u32 = u32::from_le_bytes(*b"VMMS");

const ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
const FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
/// The initialization steps of virtio 1.x section 3.1.1, each with the status it requires.
const INIT_STEPS: [(u32, u32); 4] = [
    (0, ACKNOWLEDGE),
    (ACKNOWLEDGE, DRIVER),
    (ACKNOWLEDGE | DRIVER, FEATURES_OK),
    (ACKNOWLEDGE | DRIVER | FEATURES_OK, DRIVER_OK),
];

/// A virtio device on the MMIO bus: the register window of one device (virtio-mmio version 2).
///
/// Insert it into the partition's MMIO bus at `VIRTIO_MMIO_BASE + n * VIRTIO_MMIO_SIZE` and
/// announce it to Linux with `virtio_mmio.device=4K@<base>:<gsi>`. The transport owns the
/// virtqueues and the device status; the device model `D` serves the queues.
///
/// Accesses that are not 32-bit and aligned (below 0x100), or hit no register, are ignored and
/// read as zero. Driver mistakes never panic: the transport ignores out-of-order status writes,
/// refuses `FEATURES_OK` for features it did not offer, and puts the device into
/// `DEVICE_NEEDS_RESET` if the queues it was given do not lie in guest memory.
#[derive(Debug)]
pub struct MmioTransport<D> {
    memory: PartitionMemory,
    interrupt: EventFd,
    /// Everything the registers change; taken by each access, never held across devices.
    inner: Mutex<Inner<D>>,
}

#[derive(Debug)]
struct Inner<D> {
    device: D,
    offered_features: u64,
    status: u32,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    queue_select: u32,
    interrupt_status: u32,
    queues: Vec<Queue>,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Puts `device` behind a register window, in reset state.
    ///
    /// `memory` is the partition's guest memory (a clone shares the mapping). `interrupt` is the
    /// device's interrupt: the caller registers it as a KVM irqfd for the device's GSI; create it
    /// with `EFD_NONBLOCK` so signalling can never block a vCPU.
    pub fn new(
        device: D,
        memory: PartitionMemory,
        interrupt: EventFd,
    ) -> Result<Self, VirtioError> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .enumerate()
            .map(|(index, &max_size)| {
                Queue::new(max_size)
                    .map_err(|_| VirtioError::InvalidQueueMaxSize { index, max_size })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let offered_features = device.features();
        Ok(Self {
            memory,
            interrupt,
            inner: Mutex::new(Inner {
                device,
                offered_features,
                status: 0,
                device_features_select: 0,
                driver_features_select: 0,
                acked_features: 0,
                queue_select: 0,
                interrupt_status: 0,
                queues,
            }),
        })
    }

    /// Rebuilds a transport captured by [`MmioTransport::state`] and
    /// [`MmioTransport::device_state`] around a freshly built `device` over the same guest memory.
    ///
    /// The queues continue exactly where they stopped. If the device was running it is activated
    /// again, and a pending interrupt is raised again (a spare interrupt is harmless; a lost one
    /// would stall the driver).
    pub fn restore(
        mut device: D,
        memory: PartitionMemory,
        interrupt: EventFd,
        state: &MmioTransportState,
        device_state: &D::State,
    ) -> Result<Self, VirtioError> {
        let max_sizes = device.queue_max_sizes();
        if state.queues.len() != max_sizes.len() {
            return Err(VirtioError::QueueCount {
                expected: max_sizes.len(),
                found: state.queues.len(),
            });
        }
        let queues = state
            .queues
            .iter()
            .zip(max_sizes)
            .enumerate()
            .map(|(index, (saved, &expected))| {
                if saved.max_size != expected {
                    return Err(VirtioError::QueueMaxSize {
                        index,
                        expected,
                        found: saved.max_size,
                    });
                }
                Queue::try_from(QueueState::from(*saved))
                    .map_err(|source| VirtioError::InvalidQueueState { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let offered_features = device.features();
        if state.acked_features & !offered_features != 0 {
            return Err(VirtioError::FeaturesNotOffered {
                acked: state.acked_features,
                offered: offered_features,
            });
        }
        device.restore(device_state)?;
        let mut inner = Inner {
            device,
            offered_features,
            status: state.status,
            device_features_select: state.device_features_select,
            driver_features_select: state.driver_features_select,
            acked_features: state.acked_features,
            queue_select: state.queue_select,
            interrupt_status: state.interrupt_status,
            queues,
        };
        if inner.is_running() {
            inner.activate(&memory)?;
        }
        if inner.interrupt_status != 0 {
            interrupt.write(1).map_err(VirtioError::Interrupt)?;
        }
        Ok(Self {
            memory,
            interrupt,
            inner: Mutex::new(inner),
        })
    }

    /// The transport's registers and queues, for a saved partition. Capture it only while the
    /// vCPUs are parked, together with [`MmioTransport::device_state`].
    pub fn state(&self) -> MmioTransportState {
        let inner = self.lock();
        MmioTransportState {
            status: inner.status,
            device_features_select: inner.device_features_select,
            driver_features_select: inner.driver_features_select,
            acked_features: inner.acked_features,
            queue_select: inner.queue_select,
            interrupt_status: inner.interrupt_status,
            queues: inner.queues.iter().map(|q| q.state().into()).collect(),
        }
    }

    /// The device model's own state ([`VirtioDevice::state`]).
    pub fn device_state(&self) -> D::State {
        self.lock().device.state()
    }

    /// The eventfd the transport signals for the device's interrupt (to register as an irqfd).
    pub fn interrupt(&self) -> &EventFd {
        &self.interrupt
    }

    fn lock(&self) -> MutexGuard<'_, Inner<D>> {
        // A panic while holding the lock cannot leave the registers half-updated in a way that
        // matters more than losing the device, so keep serving.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn signal(&self, inner: &mut Inner<D>, cause: u32) {
        inner.interrupt_status |= cause;
        // Writing fails only if the counter is about to overflow, i.e. an interrupt is already
        // pending and the driver will look at `InterruptStatus` anyway.
        let _ = self.interrupt.write(1);
    }

    fn write_register(&self, inner: &mut Inner<D>, offset: u32, value: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => inner.device_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => inner.driver_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES => inner.ack_features(value),
            VIRTIO_MMIO_QUEUE_SEL => inner.queue_select = value,
            VIRTIO_MMIO_QUEUE_NUM => {
                if let (Some(queue), Ok(size)) = (inner.queue_to_configure(), u16::try_from(value))
                {
                    // An invalid size is not taken; activation then sees the previous one.
                    let _ = queue.try_set_size(size);
                }
            }
            VIRTIO_MMIO_QUEUE_READY => {
                if let Some(queue) = inner.queue_to_configure() {
                    queue.set_ready(value == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW..=VIRTIO_MMIO_QUEUE_USED_HIGH => {
                if let Some(queue) = inner.queue_to_configure() {
                    set_ring_address(queue, offset, value);
                }
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(inner, value),
            VIRTIO_MMIO_INTERRUPT_ACK => inner.interrupt_status &= !value,
            VIRTIO_MMIO_STATUS => self.write_status(inner, value),
            _ => {}
        }
    }

    /// The driver notified a queue (the value is the queue index: no NOTIFICATION_DATA).
    fn notify(&self, inner: &mut Inner<D>, value: u32) {
        if !inner.is_running() {
            return;
        }
        let Inner { device, queues, .. } = inner;
        let Some((index, queue)) = usize::try_from(value)
            .ok()
            .and_then(|index| Some((index, queues.get_mut(index)?)))
        else {
            return;
        };
        if !queue.ready() {
            return;
        }
        if device.process_queue(&self.memory, index, queue)
            && driver_wants_interrupt(&self.memory, queue)
        {
            self.signal(inner, VIRTIO_MMIO_INT_VRING);
        }
    }

    fn write_status(&self, inner: &mut Inner<D>, value: u32) {
        if value == 0 {
            inner.reset();
            return;
        }
        for (required, step) in INIT_STEPS {
            if value & step == 0 || inner.status & step != 0 {
                continue;
            }
            if inner.status & !(FAILED | NEEDS_RESET) != required {
                break;
            }
            match step {
                FEATURES_OK if !inner.features_acceptable() => break,
                DRIVER_OK if inner.activate(&self.memory).is_err() => {
                    inner.status |= NEEDS_RESET;
                    self.signal(inner, VIRTIO_MMIO_INT_CONFIG);
                }
                _ => {}
            }
            inner.status |= step;
        }
        inner.status |= value & FAILED;
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let config = u64::from(VIRTIO_MMIO_CONFIG);
        if offset >= config {
            self.lock().device.read_config(offset - config, data);
            return;
        }
        let (Ok(offset), 4) = (u32::try_from(offset), data.len()) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        let value = self.lock().read_register(offset);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let config = u64::from(VIRTIO_MMIO_CONFIG);
        if offset >= config {
            self.lock().device.write_config(offset - config, data);
            return;
        }
        let (Ok(offset), Ok(bytes)) = (u32::try_from(offset), <[u8; 4]>::try_from(data)) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        let mut inner = self.lock();
        self.write_register(&mut inner, offset, u32::from_le_bytes(bytes));
    }
}

impl<D: VirtioDevice> Inner<D> {
    fn read_register(&self, offset: u32) -> u32 {
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_select {
                0 => self.offered_features as u32,
                1 => (self.offered_features >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            // No shared memory regions: a region that does not exist has length and base all ones.
            VIRTIO_MMIO_SHM_LEN_LOW..=VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            // The config space never changes behind the driver's back.
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(usize::try_from(self.queue_select).ok()?)
    }

    /// The selected queue, if the driver may configure queues now: after `FEATURES_OK`, before
    /// `DRIVER_OK` (virtio 1.x section 3.1.1 step 7).
    fn queue_to_configure(&mut self) -> Option<&mut Queue> {
        if self.status != ACKNOWLEDGE | DRIVER | FEATURES_OK {
            return None;
        }
        self.queues
            .get_mut(usize::try_from(self.queue_select).ok()?)
    }

    fn ack_features(&mut self, value: u32) {
        // Features are negotiated between DRIVER and FEATURES_OK; later writes are ignored.
        if self.status != ACKNOWLEDGE | DRIVER {
            return;
        }
        let value = u64::from(value);
        match self.driver_features_select {
            0 => self.acked_features = (self.acked_features & !0xffff_ffff) | value,
            1 => self.acked_features = (self.acked_features & 0xffff_ffff) | (value << 32),
            _ => {}
        }
    }

    /// Whether `FEATURES_OK` may be set: only offered features, and the modern interface.
    fn features_acceptable(&self) -> bool {
        self.acked_features & !self.offered_features == 0
            && self.acked_features & (1 << VIRTIO_F_VERSION_1) != 0
    }

    fn is_running(&self) -> bool {
        self.status & (DRIVER_OK | NEEDS_RESET | FAILED) == DRIVER_OK
    }

    fn activate(&mut self, memory: &PartitionMemory) -> Result<(), VirtioError> {
        if let Some(index) = self
            .queues
            .iter()
            .position(|q| q.ready() && !q.is_valid(memory))
        {
            return Err(VirtioError::QueueOutsideMemory { index });
        }
        self.device.activate(self.acked_features)
    }

    fn reset(&mut self) {
        self.device.reset();
        self.queues.iter_mut().for_each(QueueT::reset);
        self.status = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.acked_features = 0;
        self.queue_select = 0;
        self.interrupt_status = 0;
    }
}

/// Sets the low or high half of one of the three ring addresses.
fn set_ring_address(queue: &mut Queue, register: u32, value: u32) {
    let replace = |old: u64| {
        if register.is_multiple_of(8) {
            (old & !0xffff_ffff) | u64::from(value)
        } else {
            (old & 0xffff_ffff) | (u64::from(value) << 32)
        }
    };
    // A misaligned address is not taken; the driver sees the failure as a broken queue.
    let _ = match register {
        VIRTIO_MMIO_QUEUE_DESC_LOW | VIRTIO_MMIO_QUEUE_DESC_HIGH => {
            queue.try_set_desc_table_address(GuestAddress(replace(queue.desc_table())))
        }
        VIRTIO_MMIO_QUEUE_AVAIL_LOW | VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
            queue.try_set_avail_ring_address(GuestAddress(replace(queue.avail_ring())))
        }
        VIRTIO_MMIO_QUEUE_USED_LOW | VIRTIO_MMIO_QUEUE_USED_HIGH => {
            queue.try_set_used_ring_address(GuestAddress(replace(queue.used_ring())))
        }
        _ => Ok(()),
    };
}

/// Whether the driver asked for an interrupt when buffers are used (it may suppress them with
/// `VRING_AVAIL_F_NO_INTERRUPT`; EVENT_IDX is not offered).
fn driver_wants_interrupt(memory: &PartitionMemory, queue: &Queue) -> bool {
    // The used ring updates must be visible before the driver's flags are read (virtio 1.x
    // section 2.7.7.2), or an interrupt it asked for after seeing them could be lost.
    fence(Ordering::SeqCst);
    memory
        .load::<u16>(GuestAddress(queue.avail_ring()), Ordering::Acquire)
        .map_or(true, |flags| {
            u32::from(u16::from_le(flags)) & VRING_AVAIL_F_NO_INTERRUPT == 0
        })
}

/// The saved state of one virtqueue: virtio-queue's `QueueState`, serializable.
///
/// Fields added later get `#[serde(default)]` so older saved states still load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VirtqueueState {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// Whether the driver enabled the queue.
    pub ready: bool,
    /// Guest-physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest-physical address of the available (driver) ring.
    pub avail_ring: u64,
    /// Guest-physical address of the used (device) ring.
    pub used_ring: u64,
    /// Next available-ring entry the device will consume.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
    /// Whether VIRTIO_F_EVENT_IDX was negotiated.
    pub event_idx_enabled: bool,
}

impl From<QueueState> for VirtqueueState {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

impl From<VirtqueueState> for QueueState {
    fn from(q: VirtqueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// The saved state of a [`MmioTransport`]: its registers and queues.
///
/// Fields added later get `#[serde(default)]` so older saved states still load.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MmioTransportState {
    /// The device status byte the driver built up.
    pub status: u32,
    /// `DeviceFeaturesSel`.
    pub device_features_select: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_select: u32,
    /// The features the driver accepted.
    pub acked_features: u64,
    /// `QueueSel`.
    pub queue_select: u32,
    /// `InterruptStatus`: causes the driver has not acknowledged yet.
    pub interrupt_status: u32,
    /// Every queue of the device, in order.
    pub queues: Vec<VirtqueueState>,
}

#[cfg(test)]
#[path = "mmio_tests.rs"]
mod tests;
