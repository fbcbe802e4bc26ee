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
use crate::virtio_blk::ProbeError;

const MAGIC_VALUE: usize = 0x000;
const VERSION: usize = 0x004;
const DEVICE_ID: usize = 0x008;
const DEVICE_FEATURES: usize = 0x010;
const DEVICE_FEATURES_SEL: usize = 0x014;
const DRIVER_FEATURES: usize = 0x020;
const DRIVER_FEATURES_SEL: usize = 0x024;
const QUEUE_SEL: usize = 0x030;
const QUEUE_NUM_MAX: usize = 0x034;
const QUEUE_NUM: usize = 0x038;
const QUEUE_READY: usize = 0x044;
const QUEUE_NOTIFY: usize = 0x050;
const STATUS: usize = 0x070;
const QUEUE_DESC_LOW: usize = 0x080;
const QUEUE_DESC_HIGH: usize = 0x084;
const QUEUE_DRIVER_LOW: usize = 0x090;
const QUEUE_DRIVER_HIGH: usize = 0x094;
const QUEUE_DEVICE_LOW: usize = 0x0a0;
const QUEUE_DEVICE_HIGH: usize = 0x0a4;
const CONFIG_MAC: usize = 0x100;

const MMIO_MAGIC: u32 = 0x7472_6976;
/// virtio device ID of a network card.
pub const DEVICE_ID_NET: u32 = 1;

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_FAILED: u32 = 128;

const F_MAC: u64 = 1 << 5;
const F_VERSION_1: u64 = 1 << 32;

const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;

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

#[repr(C)]
#[derive(Clone, Copy)]
struct Descriptor {
    address: u64,
    length: u32,
    flags: u16,
    next: u16,
}

#[repr(C)]
struct AvailRing {
    flags: u16,
    index: u16,
    ring: [u16; QUEUE_SIZE],
    used_event: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UsedElement {
    id: u32,
    length: u32,
}

#[repr(C)]
struct UsedRing {
    flags: u16,
    index: u16,
    ring: [UsedElement; QUEUE_SIZE],
    avail_event: u16,
}

#[repr(C, align(4096))]
struct Ring {
    descriptors: [Descriptor; QUEUE_SIZE],
    avail: AvailRing,
    used: UsedRing,
}

#[repr(C, align(4096))]
struct Buffers([[u8; BUFFER_SIZE]; QUEUE_SIZE]);

#[repr(C, align(4096))]
struct Dma {
    rings: [Ring; 2],
    buffers: [Buffers; 2],
}

struct DmaArea(UnsafeCell<Dma>);

// SAFETY: handed out once (`DMA_TAKEN`) to the single driver instance; the guest has no threads.
unsafe impl Sync for DmaArea {}

const NO_DESCRIPTOR: Descriptor = Descriptor {
    address: 0,
    length: 0,
    flags: 0,
    next: 0,
};
const NO_ELEMENT: UsedElement = UsedElement { id: 0, length: 0 };
const EMPTY_RING: Ring = Ring {
    descriptors: [NO_DESCRIPTOR; QUEUE_SIZE],
    avail: AvailRing {
        flags: 0,
        index: 0,
        ring: [0; QUEUE_SIZE],
        used_event: 0,
    },
    used: UsedRing {
        flags: 0,
        index: 0,
        ring: [NO_ELEMENT; QUEUE_SIZE],
        avail_event: 0,
    },
};
const EMPTY_BUFFERS: Buffers = Buffers([[0; BUFFER_SIZE]; QUEUE_SIZE]);

static DMA: DmaArea = DmaArea(UnsafeCell::new(Dma {
    rings: [EMPTY_RING, EMPTY_RING],
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
    /// Reads the device ID in `regs` (0 if the window is not virtio-mmio version 2).
    pub fn device_id(regs: &Mmio) -> u32 {
        if regs.read32(MAGIC_VALUE) != MMIO_MAGIC || regs.read32(VERSION) != 2 {
            return 0;
        }
        regs.read32(DEVICE_ID)
    }

    /// Brings up the network device in `regs` (a window the caller checked).
    pub fn probe(regs: Mmio) -> Result<Self, ProbeError> {
        if regs.read32(MAGIC_VALUE) != MMIO_MAGIC {
            return Err(ProbeError::NotVirtio);
        }
        if Self::device_id(&regs) != DEVICE_ID_NET {
            return Err(ProbeError::NotBlock(regs.read32(DEVICE_ID)));
        }
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
        regs.write32(STATUS, 0);
        while regs.read32(STATUS) != 0 {
            core::hint::spin_loop();
        }
        regs.write32(STATUS, STATUS_ACKNOWLEDGE);
        regs.write32(STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        regs.write32(DEVICE_FEATURES_SEL, 0);
        let low = regs.read32(DEVICE_FEATURES);
        regs.write32(DEVICE_FEATURES_SEL, 1);
        let offered = (u64::from(regs.read32(DEVICE_FEATURES)) << 32) | u64::from(low);
        if offered & F_VERSION_1 == 0 {
            return Err(ProbeError::NotModern);
        }
        let accepted = offered & (F_VERSION_1 | F_MAC);
        regs.write32(DRIVER_FEATURES_SEL, 0);
        regs.write32(DRIVER_FEATURES, accepted as u32);
        regs.write32(DRIVER_FEATURES_SEL, 1);
        regs.write32(DRIVER_FEATURES, (accepted >> 32) as u32);
        regs.write32(
            STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        if regs.read32(STATUS) & STATUS_FEATURES_OK == 0 {
            return Err(ProbeError::FeaturesRejected);
        }
        if accepted & F_MAC != 0 {
            let low = regs.read32(CONFIG_MAC).to_le_bytes();
            let high = regs.read32(CONFIG_MAC + 4).to_le_bytes();
            self.mac = [low[0], low[1], low[2], low[3], high[0], high[1]];
        }
        for queue in [RX, TX] {
            self.setup_queue(queue)?;
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
        let regs = &self.regs;
        regs.write32(
            STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        regs.write32(QUEUE_NOTIFY, RX as u32);
        Ok(())
    }

    fn setup_queue(&mut self, queue: usize) -> Result<(), ProbeError> {
        let regs = &self.regs;
        regs.write32(QUEUE_SEL, queue as u32);
        let max = regs.read32(QUEUE_NUM_MAX) as usize;
        if max < QUEUE_SIZE || regs.read32(QUEUE_READY) != 0 {
            return Err(ProbeError::QueueUnavailable);
        }
        regs.write32(QUEUE_NUM, QUEUE_SIZE as u32);
        let dma = self.dma;
        // SAFETY: the polling guest wants no interrupts; field addresses inside the DMA area.
        let (descriptors, avail, used) = unsafe {
            write_volatile(
                addr_of_mut!((*dma).rings[queue].avail.flags),
                AVAIL_F_NO_INTERRUPT,
            );
            (
                addr_of!((*dma).rings[queue].descriptors) as u64,
                addr_of!((*dma).rings[queue].avail) as u64,
                addr_of!((*dma).rings[queue].used) as u64,
            )
        };
        for (low, high, address) in [
            (QUEUE_DESC_LOW, QUEUE_DESC_HIGH, descriptors),
            (QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH, avail),
            (QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH, used),
        ] {
            regs.write32(low, address as u32);
            regs.write32(high, (address >> 32) as u32);
        }
        regs.write32(QUEUE_READY, 1);
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
