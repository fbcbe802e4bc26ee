//! The virtio-mmio transport, version 2 ("modern"), virtio 1.x section 4.2.
//!
//! One 4 KiB window per device: 32-bit registers below 0x100, the device's config space from 0x100.
//! The driver discovers the device, negotiates features, places the virtqueues and sets
//! `DRIVER_OK`; from then on a write to `QueueNotify` makes the device serve that queue: on the
//! device's I/O thread when one is started ([`MmioTransport::start_io_thread`]; the partition then
//! routes the write to it through an ioeventfd, without a userspace exit), otherwise right there on
//! the writing vCPU's thread.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_CONFIG_GENERATION, VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL, VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INTERRUPT_ACK,
    VIRTIO_MMIO_INTERRUPT_STATUS, VIRTIO_MMIO_MAGIC_VALUE, VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
    VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_NOTIFY, VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_NUM_MAX,
    VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_QUEUE_SEL, VIRTIO_MMIO_QUEUE_USED_HIGH,
    VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_SHM_BASE_HIGH, VIRTIO_MMIO_SHM_LEN_LOW,
    VIRTIO_MMIO_STATUS, VIRTIO_MMIO_VENDOR_ID, VIRTIO_MMIO_VERSION,
};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::data_path::{DataPath, Queues};
use super::io_thread::IoThread;
use super::{VirtioDevice, VirtioError};
use crate::bus::BusDevice;
use crate::memory::PartitionMemory;

/// Offset of the `QueueNotify` register in the window: where the partition puts the ioeventfds.
pub const QUEUE_NOTIFY_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;

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
/// read as zero. Driver mistakes never panic: the transport ignores out-of-order status writes
/// and refuses `FEATURES_OK` for features it did not offer. It puts the device into
/// `DEVICE_NEEDS_RESET` (with a configuration-change interrupt) when the queues it was given do
/// not lie in guest memory, when the driver notifies a queue it never set up, and when the device
/// model finds a queue broken (a descriptor outside guest memory); a broken device serves nothing
/// until the driver resets it.
#[derive(Debug)]
pub struct MmioTransport<D> {
    path: Arc<DataPath<D>>,
    /// The registers; lock order: `registers` before the data path's queues.
    registers: Mutex<Registers>,
    /// Serves notifications off the vCPU threads, once started.
    io_thread: Option<IoThread>,
}

/// The registers a driver writes, apart from the queues.
#[derive(Debug)]
struct Registers {
    offered_features: u64,
    status: u32,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    queue_select: u32,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Puts `device` behind a register window, in reset state. Notifications are served on the
    /// notifying thread until [`start_io_thread`](Self::start_io_thread).
    ///
    /// `memory` is the partition's guest memory (a clone shares the mapping). `interrupt` is the
    /// device's interrupt: the caller registers it as a KVM irqfd for the device's GSI; create it
    /// with `EFD_NONBLOCK` so signalling can never block.
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
        let queues = Queues {
            device,
            queues,
            running: false,
        };
        Ok(Self {
            path: Arc::new(DataPath::new(memory, interrupt, 0, queues)),
            registers: Mutex::new(Registers {
                offered_features,
                status: 0,
                device_features_select: 0,
                driver_features_select: 0,
                acked_features: 0,
                queue_select: 0,
            }),
            io_thread: None,
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
        let registers = Registers {
            offered_features,
            status: state.status,
            device_features_select: state.device_features_select,
            driver_features_select: state.driver_features_select,
            acked_features: state.acked_features,
            queue_select: state.queue_select,
        };
        let mut queues = Queues {
            device,
            queues,
            running: false,
        };
        if registers.is_running() {
            activate(&mut queues, &memory, registers.acked_features)?;
        }
        let path = DataPath::new(memory, interrupt, state.interrupt_status, queues);
        path.resignal().map_err(VirtioError::Interrupt)?;
        Ok(Self {
            path: Arc::new(path),
            registers: Mutex::new(registers),
            io_thread: None,
        })
    }

    /// Serves queue notifications on a thread of the device's own (named `name`) from now on.
    ///
    /// Returns the queues' notification eventfds, in queue order: the caller registers each as a
    /// KVM ioeventfd on this window's `QueueNotify` register ([`QUEUE_NOTIFY_OFFSET`]) with the
    /// queue's index as datamatch. A notification KVM does not match (a queue the device does
    /// not have) still arrives as an MMIO write and is handled on the vCPU. A transport started
    /// twice keeps its first thread.
    pub fn start_io_thread(&mut self, name: String) -> Result<&[EventFd], VirtioError>
    where
        D: 'static,
    {
        if self.io_thread.is_none() {
            let count = self.path.lock().queues.len();
            self.io_thread = Some(IoThread::spawn(name, Arc::clone(&self.path), count)?);
        }
        Ok(self.queue_notifiers())
    }

    /// The notification eventfds of the I/O thread (empty when notifications are served on the
    /// vCPU).
    pub fn queue_notifiers(&self) -> &[EventFd] {
        self.io_thread.as_ref().map_or(&[], IoThread::notifiers)
    }

    /// Serves everything the driver has made available, now, on the calling thread, after waiting
    /// for a batch in flight on the I/O thread.
    ///
    /// Call it once the vCPUs are parked and before capturing state: every request the guest
    /// submitted is then finished with its used entry written, none is half done and none waits,
    /// so the captured queues are exact. Call it after a restore too, before the vCPUs run: a
    /// request made available without its notification being served yet is picked up.
    pub fn quiesce(&self) {
        self.path.serve_pending();
    }

    /// Stops serving (`true`) or serves again (`false`). The partition pauses devices whose
    /// input comes from outside (a NIC's TAP) after parking its vCPUs, so nothing reaches guest
    /// memory while it is paused or its state is captured; frames wait in the TAP meanwhile.
    /// Unpausing serves whatever arrived and wakes the I/O thread so it watches its backend again.
    pub fn set_paused(&self, paused: bool) {
        self.path.set_paused(paused);
        if !paused {
            self.path.serve_pending();
            for notifier in self.queue_notifiers() {
                // A saturated counter wakes the thread anyway.
                let _ = notifier.write(1);
            }
        }
    }

    /// The transport's registers and queues, for a saved partition. Capture it only while the
    /// vCPUs are parked and after [`quiesce`](Self::quiesce), together with
    /// [`MmioTransport::device_state`].
    pub fn state(&self) -> MmioTransportState {
        let registers = self.lock();
        let queues = self.path.lock();
        MmioTransportState {
            status: self.status(&registers),
            device_features_select: registers.device_features_select,
            driver_features_select: registers.driver_features_select,
            acked_features: registers.acked_features,
            queue_select: registers.queue_select,
            interrupt_status: self.path.interrupt_status(),
            queues: queues.queues.iter().map(|q| q.state().into()).collect(),
        }
    }

    /// The device model's own state ([`VirtioDevice::state`]).
    pub fn device_state(&self) -> D::State {
        self.path.lock().device.state()
    }

    /// The eventfd the transport signals for the device's interrupt (to register as an irqfd).
    pub fn interrupt(&self) -> &EventFd {
        self.path.interrupt()
    }

    fn lock(&self) -> MutexGuard<'_, Registers> {
        // The registers are plain values, consistent after any panic.
        self.registers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The status the driver sees: its own bits, plus NEEDS_RESET if the data path broke.
    fn status(&self, registers: &Registers) -> u32 {
        if self.path.needs_reset() {
            registers.status | NEEDS_RESET
        } else {
            registers.status
        }
    }

    fn read_register(&self, offset: u32) -> u32 {
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.path.lock().device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => {
                let registers = self.lock();
                match registers.device_features_select {
                    0 => registers.offered_features as u32,
                    1 => (registers.offered_features >> 32) as u32,
                    _ => 0,
                }
            }
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.with_selected_queue(|q| q.max_size().into()),
            VIRTIO_MMIO_QUEUE_READY => self.with_selected_queue(|q| q.ready().into()),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.path.interrupt_status(),
            VIRTIO_MMIO_STATUS => self.status(&self.lock()),
            // No shared memory regions: a region that does not exist has length and base all ones.
            VIRTIO_MMIO_SHM_LEN_LOW..=VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            // The config space never changes behind the driver's back.
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    /// `f` of the queue `QueueSel` selects, or 0 if there is no such queue.
    fn with_selected_queue(&self, f: impl FnOnce(&Queue) -> u32) -> u32 {
        let select = self.lock().queue_select;
        let queues = self.path.lock();
        usize::try_from(select)
            .ok()
            .and_then(|index| queues.queues.get(index))
            .map_or(0, f)
    }

    fn write_register(&self, offset: u32, value: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.lock().device_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.lock().driver_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES => self.lock().ack_features(value),
            VIRTIO_MMIO_QUEUE_SEL => self.lock().queue_select = value,
            VIRTIO_MMIO_QUEUE_NUM => self.configure_queue(|queue| {
                if let Ok(size) = u16::try_from(value) {
                    // An invalid size is not taken; activation then sees the previous one.
                    let _ = queue.try_set_size(size);
                }
            }),
            VIRTIO_MMIO_QUEUE_READY => self.configure_queue(|queue| queue.set_ready(value == 1)),
            VIRTIO_MMIO_QUEUE_DESC_LOW..=VIRTIO_MMIO_QUEUE_USED_HIGH => {
                self.configure_queue(|queue| set_ring_address(queue, offset, value))
            }
            // Reaches here when served on the vCPU, or when no ioeventfd matched the value.
            VIRTIO_MMIO_QUEUE_NOTIFY => self.path.notify(value),
            VIRTIO_MMIO_INTERRUPT_ACK => self.path.acknowledge(value),
            VIRTIO_MMIO_STATUS => self.write_status(value),
            _ => {}
        }
    }

    /// Applies `f` to the selected queue, if the driver may configure queues now: after
    /// `FEATURES_OK`, before `DRIVER_OK` (virtio 1.x section 3.1.1 step 7).
    fn configure_queue(&self, f: impl FnOnce(&mut Queue)) {
        let registers = self.lock();
        if self.status(&registers) != ACKNOWLEDGE | DRIVER | FEATURES_OK {
            return;
        }
        let mut queues = self.path.lock();
        if let Some(queue) = usize::try_from(registers.queue_select)
            .ok()
            .and_then(|index| queues.queues.get_mut(index))
        {
            f(queue);
        }
    }

    fn write_status(&self, value: u32) {
        let mut registers = self.lock();
        if value == 0 {
            self.reset(&mut registers);
            return;
        }
        for (required, step) in INIT_STEPS {
            if value & step == 0 || registers.status & step != 0 {
                continue;
            }
            if registers.status & !(FAILED | NEEDS_RESET) != required {
                break;
            }
            match step {
                FEATURES_OK if !registers.features_acceptable() => break,
                DRIVER_OK => {
                    // A device the driver already failed, or one that broke, stays down.
                    let down =
                        registers.status & (NEEDS_RESET | FAILED) != 0 || self.path.needs_reset();
                    if !down {
                        let mut queues = self.path.lock();
                        if activate(&mut queues, &self.path.memory, registers.acked_features)
                            .is_err()
                        {
                            registers.status |= NEEDS_RESET;
                            self.path.signal(VIRTIO_MMIO_INT_CONFIG);
                        }
                    }
                }
                _ => {}
            }
            registers.status |= step;
        }
        registers.status |= value & FAILED;
        if registers.status & FAILED != 0 {
            self.path.lock().running = false;
        }
    }

    /// The driver wrote 0 to `Status`: forget everything negotiated. Waits for a batch in flight.
    fn reset(&self, registers: &mut Registers) {
        let mut queues = self.path.lock();
        queues.running = false;
        queues.device.reset();
        queues.queues.iter_mut().for_each(QueueT::reset);
        self.path.clear();
        registers.status = 0;
        registers.device_features_select = 0;
        registers.driver_features_select = 0;
        registers.acked_features = 0;
        registers.queue_select = 0;
    }
}

/// Checks that every ready queue lies in guest memory and activates the device: notifications
/// are served from now on.
fn activate<D: VirtioDevice>(
    queues: &mut Queues<D>,
    memory: &PartitionMemory,
    features: u64,
) -> Result<(), VirtioError> {
    if let Some(index) = queues
        .queues
        .iter()
        .position(|q| q.ready() && !q.is_valid(memory))
    {
        return Err(VirtioError::QueueOutsideMemory { index });
    }
    queues.device.activate(features)?;
    // The driver is notifying: a used ring that still says otherwise (a ring reused after a
    // reset, memory captured by an older build) would make it wait for a device that no longer
    // polls. The I/O thread suppresses notifications only while it polls, holding the queues.
    for (index, queue) in queues.queues.iter_mut().enumerate() {
        if queue.ready() {
            queue
                .enable_notification(memory)
                .map_err(|_| VirtioError::QueueOutsideMemory { index })?;
        }
    }
    queues.running = true;
    Ok(())
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let config = u64::from(VIRTIO_MMIO_CONFIG);
        if offset >= config {
            self.path.lock().device.read_config(offset - config, data);
            return;
        }
        let (Ok(offset), 4) = (u32::try_from(offset), data.len()) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let config = u64::from(VIRTIO_MMIO_CONFIG);
        if offset >= config {
            self.path.lock().device.write_config(offset - config, data);
            return;
        }
        let (Ok(offset), Ok(bytes)) = (u32::try_from(offset), <[u8; 4]>::try_from(data)) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

impl Registers {
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

#[cfg(test)]
#[path = "polling_tests.rs"]
mod polling_tests;
