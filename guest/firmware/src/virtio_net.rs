//! A polled virtio-net driver over the virtio-mmio (version 2) transport.
//!
//! Receive queue 0 is kept full of [`RX_BUFFERS`] buffers; the main loop polls its used ring
//! ([`VirtioNet::poll`]) and hands each frame to the caller, then gives the buffers back with one
//! notification per batch. Transmit queue 1 has [`QUEUE_SIZE`] slots used round robin; a send
//! waits only when every slot is still in flight. Features: VERSION_1 and MAC, nothing else, so
//! every frame carries a plain 12-byte header (no offloads, `num_buffers` 1).

use core::cell::UnsafeCell;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{AtomicBool, Ordering, fence};

use crate::io::{Mmio, rdtsc};
use crate::virtio_mmio::{
    CONFIG, DESC_F_WRITE, Descriptor, F_VERSION_1, ProbeError, QUEUE_NOTIFY, STATUS, STATUS_FAILED,
    SplitRing, driver_ok, expect_device, negotiate, setup_queue,
};

/// `struct virtio_net_config::mac`.
const CONFIG_MAC: usize = CONFIG;
/// virtio device ID of a network card.
pub const DEVICE_ID_NET: u32 = 1;

const F_MAC: u64 = 1 << 5;

/// Entries of each queue. 32 receive buffers of [`BUFFER_SIZE`] make 128 KiB posted: devices
/// that read their TAP only with room for a 64 KiB frame posted (Firecracker) serve it too.
const QUEUE_SIZE: usize = 32;
/// Receive buffers posted.
const RX_BUFFERS: usize = QUEUE_SIZE;
/// Bytes of each buffer: header and a full Ethernet frame, a page.
const BUFFER_SIZE: usize = 4096;
/// The virtio-net header (`virtio_net_hdr_v1`).
pub const HEADER_LEN: usize = 12;
/// Largest frame [`VirtioNet::send`] takes.
pub const MAX_FRAME: usize = BUFFER_SIZE - HEADER_LEN;
const TX_TIMEOUT_TICKS: u64 = 1 << 34;

const RX: usize = 0;
const TX: usize = 1;

#[repr(C, align(4096))]
struct Buffers([[u8; BUFFER_SIZE]; QUEUE_SIZE]);

#[repr(C, align(4096))]
struct Dma {
    rings: [SplitRing<QUEUE_SIZE>; 2],
    buffers: [Buffers; 2],
}

struct DmaArea(UnsafeCell<Dma>);

// SAFETY: handed out once (`DMA_TAKEN`) to the single driver instance; the guest has no threads.
unsafe impl Sync for DmaArea {}

const EMPTY_BUFFERS: Buffers = Buffers([[0; BUFFER_SIZE]; QUEUE_SIZE]);

static DMA: DmaArea = DmaArea(UnsafeCell::new(Dma {
    rings: [SplitRing::EMPTY, SplitRing::EMPTY],
    buffers: [EMPTY_BUFFERS, EMPTY_BUFFERS],
}));
static DMA_TAKEN: AtomicBool = AtomicBool::new(false);

/// Why a frame was not sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendError {
    /// Longer than [`MAX_FRAME`].
    TooLong,
    /// Every transmit slot stayed in flight.
    Timeout,
}

/// A live virtio-net device.
#[derive(Debug)]
pub struct VirtioNet {
    regs: Mmio,
    dma: *mut Dma,
    mac: [u8; 6],
    rx_last_used: u16,
    rx_next_avail: u16,
    tx_next_avail: u16,
    tx_last_used: u16,
}

impl VirtioNet {
    /// Brings up the network device in `regs` (a window the caller checked).
    pub fn probe(regs: Mmio) -> Result<Self, ProbeError> {
        expect_device(&regs, DEVICE_ID_NET)?;
        if DMA_TAKEN.swap(true, Ordering::AcqRel) {
            return Err(ProbeError::Busy);
        }
        let mut net = Self {
            regs,
            dma: DMA.0.get(),
            mac: [0; 6],
            rx_last_used: 0,
            rx_next_avail: 0,
            tx_next_avail: 0,
            tx_last_used: 0,
        };
        if let Err(error) = net.initialise() {
            net.regs.write32(STATUS, STATUS_FAILED);
            return Err(error);
        }
        Ok(net)
    }

    /// The device's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn initialise(&mut self) -> Result<(), ProbeError> {
        let regs = &self.regs;
        let accepted = negotiate(regs, F_VERSION_1 | F_MAC)?;
        if accepted & F_MAC != 0 {
            let low = regs.read32(CONFIG_MAC).to_le_bytes();
            let high = regs.read32(CONFIG_MAC + 4).to_le_bytes();
            self.mac = [low[0], low[1], low[2], low[3], high[0], high[1]];
        }
        for queue in [RX, TX] {
            // SAFETY: the ring is the driver's own, in its static DMA area; nothing is in flight.
            let size =
                unsafe { setup_queue(regs, queue as u32, addr_of_mut!((*self.dma).rings[queue]))? };
            // The slots are used round robin modulo QUEUE_SIZE: a smaller queue would not do.
            if usize::from(size) != QUEUE_SIZE {
                return Err(ProbeError::QueueUnavailable);
            }
        }
        // Every receive buffer goes to the device before it starts.
        let dma = self.dma;
        for slot in 0..RX_BUFFERS {
            // SAFETY: the device does not run yet; field addresses stay inside the DMA area.
            unsafe {
                let address = addr_of!((*dma).buffers[RX].0[slot]) as u64;
                write_volatile(
                    addr_of_mut!((*dma).rings[RX].descriptors[slot]),
                    Descriptor {
                        address,
                        length: BUFFER_SIZE as u32,
                        flags: DESC_F_WRITE,
                        next: 0,
                    },
                );
                write_volatile(addr_of_mut!((*dma).rings[RX].avail.ring[slot]), slot as u16);
            }
        }
        self.rx_next_avail = RX_BUFFERS as u16;
        fence(Ordering::SeqCst);
        // SAFETY: the avail index of the receive ring, in the DMA area.
        unsafe {
            write_volatile(
                addr_of_mut!((*dma).rings[RX].avail.index),
                self.rx_next_avail,
            )
        };
        driver_ok(&self.regs);
        self.regs.write32(QUEUE_NOTIFY, RX as u32);
        Ok(())
    }

    /// Hands every received frame (without its header) to `handle`, then returns the buffers
    /// to the device. Returns the number of frames.
    pub fn poll(&mut self, mut handle: impl FnMut(&mut Self, &[u8])) -> usize {
        let dma = self.dma;
        let mut frames = 0;
        let mut frame = [0u8; MAX_FRAME];
        loop {
            // SAFETY: volatile read of the used index the device writes.
            let used = unsafe { read_volatile(addr_of!((*dma).rings[RX].used.index)) };
            if used == self.rx_last_used {
                break;
            }
            fence(Ordering::SeqCst);
            let slot = usize::from(self.rx_last_used) % QUEUE_SIZE;
            // SAFETY: the device published this element; the buffer it names is done.
            let element = unsafe { read_volatile(addr_of!((*dma).rings[RX].used.ring[slot])) };
            self.rx_last_used = self.rx_last_used.wrapping_add(1);
            let buffer = element.id as usize % QUEUE_SIZE;
            let len = (element.length as usize).min(BUFFER_SIZE);
            if len > HEADER_LEN {
                let n = len - HEADER_LEN;
                // SAFETY: the device finished writing buffer `buffer` and does not own it until
                // it is posted again below.
                let data = unsafe { &(*dma).buffers[RX].0[buffer] };
                frame[..n].copy_from_slice(&data[HEADER_LEN..len]);
                handle(self, &frame[..n]);
                frames += 1;
            }
            // Post the buffer again (its descriptor is unchanged).
            let avail_slot = usize::from(self.rx_next_avail) % QUEUE_SIZE;
            // SAFETY: the avail ring entry the device has consumed (it returned the buffer).
            unsafe {
                write_volatile(
                    addr_of_mut!((*dma).rings[RX].avail.ring[avail_slot]),
                    buffer as u16,
                );
            }
            self.rx_next_avail = self.rx_next_avail.wrapping_add(1);
            fence(Ordering::SeqCst);
            // SAFETY: the receive ring's avail index.
            unsafe {
                write_volatile(
                    addr_of_mut!((*dma).rings[RX].avail.index),
                    self.rx_next_avail,
                )
            };
        }
        if frames > 0 {
            fence(Ordering::SeqCst);
            self.regs.write32(QUEUE_NOTIFY, RX as u32);
        }
        frames
    }

    /// Sends one Ethernet frame (`fill` writes `len` bytes of it).
    pub fn send(&mut self, len: usize, fill: impl FnOnce(&mut [u8])) -> Result<(), SendError> {
        if len > MAX_FRAME {
            return Err(SendError::TooLong);
        }
        let dma = self.dma;
        let started = rdtsc();
        loop {
            // SAFETY: volatile read of the transmit used index.
            let used = unsafe { read_volatile(addr_of!((*dma).rings[TX].used.index)) };
            self.tx_last_used = used;
            if self.tx_next_avail.wrapping_sub(used) < QUEUE_SIZE as u16 {
                break;
            }
            if rdtsc().wrapping_sub(started) > TX_TIMEOUT_TICKS {
                return Err(SendError::Timeout);
            }
            core::hint::spin_loop();
        }
        fence(Ordering::SeqCst);
        let slot = usize::from(self.tx_next_avail) % QUEUE_SIZE;
        // SAFETY: slot `slot` is not in flight (fewer than QUEUE_SIZE are, checked above, and
        // slots are used in order); its buffer and descriptor are ours until published.
        unsafe {
            let buffer = &mut (*dma).buffers[TX].0[slot];
            buffer[..HEADER_LEN].fill(0);
            fill(&mut buffer[HEADER_LEN..HEADER_LEN + len]);
            let address = addr_of!((*dma).buffers[TX].0[slot]) as u64;
            write_volatile(
                addr_of_mut!((*dma).rings[TX].descriptors[slot]),
                Descriptor {
                    address,
                    length: (HEADER_LEN + len) as u32,
                    flags: 0,
                    next: 0,
                },
            );
            write_volatile(addr_of_mut!((*dma).rings[TX].avail.ring[slot]), slot as u16);
        }
        fence(Ordering::SeqCst);
        self.tx_next_avail = self.tx_next_avail.wrapping_add(1);
        // SAFETY: the transmit ring's avail index.
        unsafe {
            write_volatile(
                addr_of_mut!((*dma).rings[TX].avail.index),
                self.tx_next_avail,
            )
        };
        fence(Ordering::SeqCst);
        self.regs.write32(QUEUE_NOTIFY, TX as u32);
        Ok(())
    }
}
