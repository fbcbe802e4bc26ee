//! A polled virtio-blk driver over the virtio-mmio (version 2, "modern") transport.
//!
//! One split virtqueue, one request in flight, no interrupts: the driver publishes a request,
//! notifies the device (one MMIO write, one VM exit) and spins on the used ring at CPL3, where
//! spinning is native. The rings and buffers live in a static [`Dma`] area; the guest runs on an
//! identity map, so their addresses are guest-physical addresses. Register layout and the
//! initialisation sequence follow the virtio 1.2 specification, sections 4.2.2 and 3.1.1.

use core::cell::UnsafeCell;
use core::fmt;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{AtomicBool, Ordering, fence};

use crate::io::{Mmio, rdtsc};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: usize = 512;
/// Largest transfer of one request (the size of the data buffer).
pub const MAX_TRANSFER: usize = 64 * 1024;

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
const CONFIG_GENERATION: usize = 0x0fc;
/// `struct virtio_blk_config::capacity` (u64, in sectors).
const CONFIG_CAPACITY: usize = 0x100;
/// The window must reach the capacity field.
const MIN_WINDOW: u64 = 0x108;

const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
const DEVICE_ID_BLOCK: u32 = 2;

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_FAILED: u32 = 128;

/// Feature bits, numbered as in the specification.
const F_BLK_RO: u64 = 1 << 5;
const F_BLK_FLUSH: u64 = 1 << 9;
const F_VERSION_1: u64 = 1 << 32;

const REQUEST_IN: u32 = 0;
const REQUEST_OUT: u32 = 1;
const REQUEST_FLUSH: u32 = 4;
const REQUEST_STATUS_OK: u8 = 0;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Queue size the driver asks for (fewer if the device offers fewer).
const QUEUE_SIZE: usize = 16;
/// TSC ticks to wait for a completion before declaring the device dead (seconds at any clock rate
/// a VM has).
const COMPLETION_TIMEOUT_TICKS: u64 = 1 << 36;

/// Why the disk could not be brought up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeError {
    /// The announced window is too small, beyond the identity map or overlaps RAM.
    BadWindow,
    /// No virtio-mmio magic value in the window.
    NotVirtio,
    /// A legacy (version 1) or unknown transport version.
    UnsupportedVersion(u32),
    /// A virtio device, but not a block device (0: a placeholder without a device).
    NotBlock(u32),
    /// The device does not offer `VIRTIO_F_VERSION_1`.
    NotModern,
    /// The device cleared FEATURES_OK.
    FeaturesRejected,
    /// Queue 0 does not exist or is already live.
    QueueUnavailable,
    /// Another driver instance owns the DMA area.
    Busy,
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadWindow => f.write_str("unusable mmio window"),
            Self::NotVirtio => f.write_str("not a virtio-mmio device"),
            Self::UnsupportedVersion(v) => write!(f, "virtio-mmio version {v}, need 2"),
            Self::NotBlock(id) => write!(f, "device id {id} is not a block device"),
            Self::NotModern => f.write_str("device lacks VIRTIO_F_VERSION_1"),
            Self::FeaturesRejected => f.write_str("device rejected the features"),
            Self::QueueUnavailable => f.write_str("queue 0 unavailable"),
            Self::Busy => f.write_str("driver already active"),
        }
    }
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestError {
    /// The device answered with a status other than OK (1: I/O error, 2: unsupported).
    Device(u8),
    /// The device did not complete the request in time.
    Timeout,
    /// The device completed another descriptor chain than the one in flight.
    BadCompletion,
}

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

#[repr(C)]
struct RequestHeader {
    kind: u32,
    reserved: u32,
    sector: u64,
}

/// Memory shared with the device: rings, request header, status byte and data buffer.
#[repr(C, align(4096))]
struct Dma {
    descriptors: [Descriptor; QUEUE_SIZE],
    avail: AvailRing,
    used: UsedRing,
    header: RequestHeader,
    status: u8,
    data: DataBuffer,
}

#[repr(C, align(4096))]
struct DataBuffer([u8; MAX_TRANSFER]);

/// The one DMA area (zero-filled `.bss`).
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

static DMA: DmaArea = DmaArea(UnsafeCell::new(Dma {
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
    header: RequestHeader {
        kind: 0,
        reserved: 0,
        sector: 0,
    },
    status: 0,
    data: DataBuffer([0; MAX_TRANSFER]),
}));
static DMA_TAKEN: AtomicBool = AtomicBool::new(false);

/// A live virtio-blk device.
#[derive(Debug)]
pub struct VirtioBlk {
    regs: Mmio,
    dma: *mut Dma,
    queue_size: u16,
    next_avail: u16,
    last_used: u16,
    capacity: u64,
    flush: bool,
    read_only: bool,
}

impl VirtioBlk {
    /// Brings up the virtio-blk device in the register window `regs` (whose bounds the caller has
    /// checked against the memory map, see [`ProbeError::BadWindow`]).
    pub fn probe(regs: Mmio) -> Result<Self, ProbeError> {
        if regs.read32(MAGIC_VALUE) != MMIO_MAGIC {
            return Err(ProbeError::NotVirtio);
        }
        match regs.read32(VERSION) {
            2 => {}
            version => return Err(ProbeError::UnsupportedVersion(version)),
        }
        match regs.read32(DEVICE_ID) {
            DEVICE_ID_BLOCK => {}
            id => return Err(ProbeError::NotBlock(id)),
        }
        if DMA_TAKEN.swap(true, Ordering::Acquire) {
            return Err(ProbeError::Busy);
        }
        let mut device = Self {
            regs,
            dma: DMA.0.get(),
            queue_size: 0,
            next_avail: 0,
            last_used: 0,
            capacity: 0,
            flush: false,
            read_only: false,
        };
        if let Err(error) = device.initialise() {
            device
                .regs
                .write32(STATUS, device.regs.read32(STATUS) | STATUS_FAILED);
            return Err(error);
        }
        Ok(device)
    }

    /// Capacity in sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the device refuses writes (`VIRTIO_BLK_F_RO`).
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Reads `len` bytes (a multiple of [`SECTOR_SIZE`], at most [`MAX_TRANSFER`]) from `sector` on;
    /// returns them in the DMA buffer.
    pub fn read(&mut self, sector: u64, len: usize) -> Result<&[u8], RequestError> {
        let len = checked_transfer(len);
        self.submit(REQUEST_IN, sector, len)?;
        // SAFETY: the device has finished writing the buffer (the used ring said so, and `submit`
        // fenced after reading it); nothing else refers to it while `self` is borrowed.
        let data = unsafe { &(*self.dma).data.0 };
        Ok(&data[..len])
    }

    /// Writes `len` bytes (a multiple of [`SECTOR_SIZE`], at most [`MAX_TRANSFER`]) at `sector`,
    /// after `fill` has put them into the DMA buffer.
    pub fn write(
        &mut self,
        sector: u64,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<(), RequestError> {
        let len = checked_transfer(len);
        {
            // SAFETY: no request is in flight (each `submit` waits for completion), so the device
            // does not access the buffer; the mutable borrow ends before the request is submitted.
            let data = unsafe { &mut (*self.dma).data.0 };
            fill(&mut data[..len]);
        }
        self.submit(REQUEST_OUT, sector, len)
    }

    /// Makes completed writes durable, if the device offers a flush; a no-op otherwise.
    pub fn flush(&mut self) -> Result<(), RequestError> {
        if self.flush {
            self.submit(REQUEST_FLUSH, 0, 0)
        } else {
            Ok(())
        }
    }

    fn initialise(&mut self) -> Result<(), ProbeError> {
        let regs = &self.regs;
        // Reset, and wait until the device reports it (virtio 1.2, 4.2.3.1).
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
        let accepted = offered & (F_VERSION_1 | F_BLK_FLUSH | F_BLK_RO);
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
        self.flush = accepted & F_BLK_FLUSH != 0;
        self.read_only = accepted & F_BLK_RO != 0;

        self.setup_queue()?;
        let regs = &self.regs;
        regs.write32(
            STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        self.capacity = read_config_u64(regs, CONFIG_CAPACITY);
        Ok(())
    }

    fn setup_queue(&mut self) -> Result<(), ProbeError> {
        let regs = &self.regs;
        regs.write32(QUEUE_SEL, 0);
        let max = regs.read32(QUEUE_NUM_MAX);
        if max == 0 || regs.read32(QUEUE_READY) != 0 {
            return Err(ProbeError::QueueUnavailable);
        }
        // Both are at most QUEUE_SIZE = 16, so the narrowing cannot truncate.
        self.queue_size = max.min(QUEUE_SIZE as u32) as u16;
        regs.write32(QUEUE_NUM, u32::from(self.queue_size));

        let dma = self.dma;
        // SAFETY: `dma` is the driver's own DMA area; no request is in flight yet.
        unsafe {
            write_volatile(addr_of_mut!((*dma).avail.flags), AVAIL_F_NO_INTERRUPT);
            write_volatile(addr_of_mut!((*dma).avail.index), 0);
            write_volatile(addr_of_mut!((*dma).used.index), 0);
        }
        // Identity map: these addresses are guest-physical.
        let set_address = |low: usize, high: usize, address: u64| {
            regs.write32(low, address as u32);
            regs.write32(high, (address >> 32) as u32);
        };
        // SAFETY: taking field addresses of the DMA area reads nothing.
        let (descriptors, avail, used) = unsafe {
            (
                addr_of!((*dma).descriptors) as u64,
                addr_of!((*dma).avail) as u64,
                addr_of!((*dma).used) as u64,
            )
        };
        set_address(QUEUE_DESC_LOW, QUEUE_DESC_HIGH, descriptors);
        set_address(QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH, avail);
        set_address(QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH, used);
        regs.write32(QUEUE_READY, 1);
        Ok(())
    }

    /// Runs one request: header, optional data (device-writable for reads), status byte.
    fn submit(&mut self, kind: u32, sector: u64, len: usize) -> Result<(), RequestError> {
        let dma = self.dma;
        let mut chain = [NO_DESCRIPTOR; 3];
        // SAFETY: field addresses only; the header is written while the device is idle.
        let (header, data, status) = unsafe {
            write_volatile(
                addr_of_mut!((*dma).header),
                RequestHeader {
                    kind,
                    reserved: 0,
                    sector,
                },
            );
            write_volatile(addr_of_mut!((*dma).status), 0xff);
            (
                addr_of!((*dma).header) as u64,
                addr_of!((*dma).data) as u64,
                addr_of!((*dma).status) as u64,
            )
        };
        chain[0] = Descriptor {
            address: header,
            length: 16,
            flags: DESC_F_NEXT,
            next: 1,
        };
        let mut count = 1;
        if len > 0 {
            let flags = DESC_F_NEXT | if kind == REQUEST_IN { DESC_F_WRITE } else { 0 };
            // `len` is at most MAX_TRANSFER (checked_transfer), so it fits in u32.
            chain[1] = Descriptor {
                address: data,
                length: len as u32,
                flags,
                next: 2,
            };
            count = 2;
        }
        chain[count - 1].next = count as u16;
        chain[count] = Descriptor {
            address: status,
            length: 1,
            flags: DESC_F_WRITE,
            next: 0,
        };
        count += 1;

        let slot = usize::from(self.next_avail % self.queue_size);
        // SAFETY: the device reads descriptors and the avail ring only after the index update below,
        // and has no request of ours in flight; indices stay below `queue_size` <= QUEUE_SIZE.
        unsafe {
            for (index, descriptor) in chain[..count].iter().enumerate() {
                write_volatile(addr_of_mut!((*dma).descriptors[index]), *descriptor);
            }
            write_volatile(addr_of_mut!((*dma).avail.ring[slot]), 0);
            // Descriptors and ring entry before the index the device polls (virtio 1.2, 2.7.13).
            fence(Ordering::SeqCst);
            self.next_avail = self.next_avail.wrapping_add(1);
            write_volatile(addr_of_mut!((*dma).avail.index), self.next_avail);
            fence(Ordering::SeqCst);
        }
        self.regs.write32(QUEUE_NOTIFY, 0);

        let started = rdtsc();
        // SAFETY: volatile reads of the used index the device writes.
        while unsafe { read_volatile(addr_of!((*dma).used.index)) } == self.last_used {
            if rdtsc().wrapping_sub(started) > COMPLETION_TIMEOUT_TICKS {
                return Err(RequestError::Timeout);
            }
            core::hint::spin_loop();
        }
        // The used element, status byte and data after the index (virtio 1.2, 2.7.14).
        fence(Ordering::SeqCst);
        let slot = usize::from(self.last_used % self.queue_size);
        self.last_used = self.last_used.wrapping_add(1);
        // SAFETY: the device has published this used element and the status byte.
        let (element, result) = unsafe {
            (
                read_volatile(addr_of!((*dma).used.ring[slot])),
                read_volatile(addr_of!((*dma).status)),
            )
        };
        if element.id != 0 {
            return Err(RequestError::BadCompletion);
        }
        match result {
            REQUEST_STATUS_OK => Ok(()),
            status => Err(RequestError::Device(status)),
        }
    }
}

/// Whether an MMIO window announced on the command line is fit for the driver: large enough and
/// inside the guest's identity map (below 4 GiB).
pub fn window_usable(base: u64, size: u64) -> bool {
    size >= MIN_WINDOW
        && base.checked_add(size).is_some_and(|end| end <= 1 << 32)
        && base.is_multiple_of(4096)
}

/// Reads a 64-bit configuration field as two 32-bit halves, retrying if the device changed its
/// configuration in between (virtio 1.2, 4.2.2.2).
fn read_config_u64(regs: &Mmio, offset: usize) -> u64 {
    loop {
        let generation = regs.read32(CONFIG_GENERATION);
        let low = regs.read32(offset);
        let high = regs.read32(offset + 4);
        if regs.read32(CONFIG_GENERATION) == generation {
            return (u64::from(high) << 32) | u64::from(low);
        }
    }
}

/// Checks a transfer length against the driver's contract (a caller bug otherwise).
fn checked_transfer(len: usize) -> usize {
    assert!(
        len.is_multiple_of(SECTOR_SIZE) && len <= MAX_TRANSFER,
        "bad virtio-blk transfer length {len}"
    );
    len
}
