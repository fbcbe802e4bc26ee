//! The data path of a virtio-mmio device: its virtqueues, the device model that serves them, and
//! its interrupt. Shared by the transport (register accesses on vCPU threads) and the device's I/O
//! thread (queue notifications that arrive through ioeventfds).
//!
//! One lock guards the queues and the device, held for a whole batch of requests: whoever holds
//! it owns the queues, so a capture, a reset or a quiesce that takes it waits for the batch in
//! flight and then sees every request either finished (its used entry written) or untouched. The
//! interrupt status and the "needs reset" flag are atomics so the driver's interrupt handler
//! (read `InterruptStatus`, write `InterruptACK`) never waits behind a batch.

use std::sync::atomic::AtomicUsize;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering, fence};
use std::sync::{Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::VirtioDevice;
use crate::memory::PartitionMemory;

/// The queues and the device model, owned by whoever holds the lock.
#[derive(Debug)]
pub(super) struct Queues<D> {
    pub(super) device: D,
    pub(super) queues: Vec<Queue>,
    /// `DRIVER_OK` is set and the device is neither reset nor broken: notifications are served.
    pub(super) running: bool,
}

/// Everything a queue notification needs, shared between the transport and the I/O thread.
#[derive(Debug)]
pub(super) struct DataPath<D> {
    pub(super) memory: PartitionMemory,
    /// The device's interrupt: an eventfd the partition registers as a KVM irqfd.
    interrupt: EventFd,
    /// `InterruptStatus`: causes the driver has not acknowledged yet.
    interrupt_status: AtomicU32,
    /// The data path found the driver broke the device (`DEVICE_NEEDS_RESET`); cleared by a reset.
    needs_reset: AtomicBool,
    /// The partition is paused: notifications and backend input wait (see
    /// [`MmioTransport::set_paused`](super::MmioTransport::set_paused)).
    paused: AtomicBool,
    /// Threads waiting for [`lock`](Self::lock): a polling window ends early for them.
    waiting: AtomicUsize,
    queues: Mutex<Queues<D>>,
}

impl<D: VirtioDevice> DataPath<D> {
    pub(super) fn new(
        memory: PartitionMemory,
        interrupt: EventFd,
        interrupt_status: u32,
        queues: Queues<D>,
    ) -> Self {
        Self {
            memory,
            interrupt,
            interrupt_status: AtomicU32::new(interrupt_status),
            needs_reset: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            queues: Mutex::new(queues),
        }
    }

    /// Takes the queues, waiting for a batch in flight to finish.
    pub(super) fn lock(&self) -> MutexGuard<'_, Queues<D>> {
        // A panic while serving cannot leave a queue half-updated in a way that matters more than
        // losing the device, so keep serving.
        match self.queues.try_lock() {
            Ok(queues) => return queues,
            Err(TryLockError::Poisoned(poisoned)) => return poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => {}
        }
        // Someone holds the queues, perhaps the I/O thread polling: tell it to stop.
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        queues
    }

    pub(super) fn interrupt(&self) -> &EventFd {
        &self.interrupt
    }

    pub(super) fn interrupt_status(&self) -> u32 {
        self.interrupt_status.load(Ordering::Acquire)
    }

    pub(super) fn acknowledge(&self, causes: u32) {
        self.interrupt_status.fetch_and(!causes, Ordering::AcqRel);
    }

    pub(super) fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    /// Forgets the interrupt status and a broken state: the driver reset the device.
    pub(super) fn clear(&self) {
        self.interrupt_status.store(0, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
    }

    /// Raises the device's interrupt for `cause`.
    pub(super) fn signal(&self, cause: u32) {
        self.interrupt_status.fetch_or(cause, Ordering::AcqRel);
        // Writing fails only if the counter is about to overflow, i.e. an interrupt is already
        // pending and the driver will look at `InterruptStatus` anyway.
        let _ = self.interrupt.write(1);
    }

    /// Raises the interrupt again if a cause is pending (after a restore: a spare interrupt is
    /// harmless; a lost one would stall the driver).
    pub(super) fn resignal(&self) -> std::io::Result<()> {
        if self.interrupt_status() != 0 {
            self.interrupt.write(1)?;
        }
        Ok(())
    }

    /// Puts the device into `DEVICE_NEEDS_RESET` and tells the driver with a configuration-change
    /// interrupt (virtio 1.x section 2.1.2): it stops serving until the driver resets it.
    pub(super) fn mark_broken(&self, queues: &mut Queues<D>) {
        queues.running = false;
        self.needs_reset.store(true, Ordering::Release);
        self.signal(VIRTIO_MMIO_INT_CONFIG);
    }

    /// The driver notified queue `index`: serve everything it made available. A notification for
    /// a queue the driver never set up breaks the device; one before `DRIVER_OK` (or after a
    /// reset or a break) is ignored.
    pub(super) fn notify(&self, index: u32) {
        self.notify_polling(index, Duration::ZERO);
    }

    /// [`notify`](Self::notify), then, if that served a request and `window` is not zero, polls
    /// the queue's available ring with the driver's notifications suppressed
    /// (`VRING_USED_F_NO_NOTIFY`) and serves what the driver adds, until nothing came for
    /// `window`, or until another thread wants the lock. The lock is held throughout, and
    /// notifications are enabled again (and the ring checked once more) before it is released:
    /// whoever takes the lock (a capture, a reset, a pause, a register access) finds the driver
    /// notifying.
    pub(super) fn notify_polling(&self, index: u32, window: Duration) -> Polled {
        let mut queues = self.lock();
        if !queues.running || self.paused() {
            return Polled::default();
        }
        let ready = usize::try_from(index)
            .ok()
            .filter(|&i| queues.queues.get(i).is_some_and(Queue::ready));
        let Some(index) = ready else {
            self.mark_broken(&mut queues);
            return Polled::default();
        };
        let mut polled = Polled::default();
        if self.serve(&mut queues, index) {
            polled.served_at = Some(Instant::now());
        }
        if polled.served_at.is_none() || window.is_zero() {
            return polled;
        }
        while queues.running && self.waiting.load(Ordering::Acquire) == 0 {
            let Some(queue) = queues.queues.get_mut(index) else {
                break;
            };
            let arrived = poll_available(&self.memory, queue, window, &self.waiting);
            // Enabled again, then the index read once more (virtio 1.x section 2.7.10): a chain
            // made available meanwhile is either seen here or notified.
            let pending = queue.enable_notification(&self.memory).unwrap_or(false);
            if !arrived && !pending {
                break;
            }
            polled.caught += 1;
            if self.serve(&mut queues, index) {
                polled.served_at = Some(Instant::now());
            }
        }
        polled
    }

    /// Serves every ready queue's available buffers now, on this thread: the quiesce before a
    /// capture (nothing is left in flight or waiting) and the catch-up after a restore.
    pub(super) fn serve_pending(&self) {
        let mut queues = self.lock();
        for index in 0..queues.queues.len() {
            if queues.running && queues.queues[index].ready() {
                self.serve(&mut queues, index);
            }
        }
    }

    /// Stops (or restarts) serving notifications and backend input; a notification that arrives
    /// meanwhile is served by the [`serve_pending`](Self::serve_pending) after the restart.
    pub(super) fn set_paused(&self, paused: bool) {
        // Taking the lock waits for a batch in flight, so none runs once this returns.
        let _queues = self.lock();
        self.paused.store(paused, Ordering::Release);
    }

    pub(super) fn paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// The device's backend has input for queue `index` (see [`VirtioDevice::backend`]): serve
    /// it. Returns whether the backend should still be watched: `false` while the device cannot
    /// take input (not running, paused, or the queue is out of buffers) until the driver notifies.
    pub(super) fn serve_backend(&self, index: usize) -> bool {
        let mut queues = self.lock();
        if !queues.running || self.paused() || !queues.queues.get(index).is_some_and(Queue::ready) {
            return false;
        }
        self.serve(&mut queues, index);
        queues.running && !queues.device.backend_starved()
    }

    /// Serves queue `index`; returns whether a buffer was used.
    fn serve(&self, queues: &mut Queues<D>, index: usize) -> bool {
        let Queues {
            device, queues: q, ..
        } = queues;
        let Some(queue) = q.get_mut(index) else {
            return false;
        };
        match device.process_queue(&self.memory, index, queue) {
            Ok(true) => {
                if driver_wants_interrupt(&self.memory, queue) {
                    self.signal(VIRTIO_MMIO_INT_VRING);
                }
                true
            }
            Ok(false) => false,
            Err(_) => {
                self.mark_broken(queues);
                false
            }
        }
    }
}

/// What one served notification did, for the I/O thread's adaptive polling window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Polled {
    /// When the last buffer was used (`None`: the notification found nothing to serve).
    pub(super) served_at: Option<Instant>,
    /// Batches the polling window found that the driver made available without notifying.
    pub(super) caught: u32,
}

/// Spins for up to `window` with the driver's notifications of `queue` suppressed, until the
/// driver makes a buffer available (returns `true`) or another thread wants the queues
/// (`waiting`). Leaves notifications suppressed: the caller enables them again.
fn poll_available(
    memory: &PartitionMemory,
    queue: &mut Queue,
    window: Duration,
    waiting: &AtomicUsize,
) -> bool {
    if queue.disable_notification(memory).is_err() {
        return false;
    }
    let next = queue.next_avail();
    let deadline = Instant::now() + window;
    loop {
        match queue.avail_idx(memory, Ordering::Acquire) {
            Ok(index) if index.0 != next => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
        if Instant::now() >= deadline || waiting.load(Ordering::Relaxed) != 0 {
            return false;
        }
        std::hint::spin_loop();
    }
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
