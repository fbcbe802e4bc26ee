//! A polled virtio-blk driver over the virtio-mmio (version 2, "modern") transport.
//!
//! One split virtqueue, one request in flight, no interrupts: the driver publishes a request,
//! notifies the device (one MMIO write, one VM exit) unless the device asked not to be notified
//! (`VRING_USED_F_NO_NOTIFY`: it is polling the available ring; Linux's driver honours it too),
//! and spins on the used ring at CPL3, where spinning is native. The rings and buffers live in a static [`Dma`] area; the guest runs on an
//! identity map, so their addresses are guest-physical addresses. The transport and the ring
//! layout are [`crate::virtio_mmio`]'s, shared with the virtio-net driver.

use core::cell::UnsafeCell;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{AtomicBool, Ordering, fence};

use crate::io::{Mmio, rdtsc};
use crate::virtio_mmio::{
    CONFIG, DESC_F_NEXT, DESC_F_WRITE, Descriptor, F_VERSION_1, ProbeError, QUEUE_NOTIFY, STATUS,
    STATUS_FAILED, SplitRing, driver_ok, expect_device, negotiate, read_config_u64, setup_queue,
};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: usize = 512;
/// Largest transfer of one request (the size of the data buffer).
pub const MAX_TRANSFER: usize = 64 * 1024;

/// `struct virtio_blk_config::capacity` (u64, in sectors).
const CONFIG_CAPACITY: usize = CONFIG;
/// The window must reach the capacity field.
const MIN_WINDOW: u64 = 0x108;

const DEVICE_ID_BLOCK: u32 = 2;

/// Feature bits, numbered as in the specification.
const F_BLK_RO: u64 = 1 << 5;
const F_BLK_FLUSH: u64 = 1 << 9;

const REQUEST_IN: u32 = 0;
const REQUEST_OUT: u32 = 1;
const REQUEST_FLUSH: u32 = 4;
const REQUEST_STATUS_OK: u8 = 0;

/// The device polls the available ring and asks not to be notified (virtio 1.2, 2.7.10).
const USED_F_NO_NOTIFY: u16 = 1;

/// Queue size the driver asks for (fewer if the device offers fewer).
const QUEUE_SIZE: usize = 16;
/// TSC ticks to wait for a completion before declaring the device dead (seconds at any clock rate
/// a VM has).
const COMPLETION_TIMEOUT_TICKS: u64 = 1 << 36;

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
struct RequestHeader {
    kind: u32,
    reserved: u32,
    sector: u64,
}

/// Memory shared with the device: rings, request header, status byte and data buffer.
#[repr(C, align(4096))]
struct Dma {
    ring: SplitRing<QUEUE_SIZE>,
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

static DMA: DmaArea = DmaArea(UnsafeCell::new(Dma {
    ring: SplitRing::EMPTY,
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
        expect_device(&regs, DEVICE_ID_BLOCK)?;
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
        let accepted = negotiate(&self.regs, F_VERSION_1 | F_BLK_FLUSH | F_BLK_RO)?;
        self.flush = accepted & F_BLK_FLUSH != 0;
        self.read_only = accepted & F_BLK_RO != 0;
        // SAFETY: the ring is the driver's own, in its static DMA area; nothing is in flight.
        self.queue_size = unsafe { setup_queue(&self.regs, 0, addr_of_mut!((*self.dma).ring))? };
        driver_ok(&self.regs);
        self.capacity = read_config_u64(&self.regs, CONFIG_CAPACITY);
        Ok(())
    }

    /// Runs one request: header, optional data (device-writable for reads), status byte.
    fn submit(&mut self, kind: u32, sector: u64, len: usize) -> Result<(), RequestError> {
        let dma = self.dma;
        let mut chain = [Descriptor::EMPTY; 3];
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
                write_volatile(addr_of_mut!((*dma).ring.descriptors[index]), *descriptor);
            }
            write_volatile(addr_of_mut!((*dma).ring.avail.ring[slot]), 0);
            // Descriptors and ring entry before the index the device polls (virtio 1.2, 2.7.13).
            fence(Ordering::SeqCst);
            self.next_avail = self.next_avail.wrapping_add(1);
            write_volatile(addr_of_mut!((*dma).ring.avail.index), self.next_avail);
            // The index before the device's flags (virtio 1.2, 2.7.13.4): a device that clears
            // NO_NOTIFY and then re-reads the index sees either this request or our notification.
            fence(Ordering::SeqCst);
        }
        // SAFETY: a volatile read of the used ring's flags, which the device writes.
        let flags = unsafe { read_volatile(addr_of!((*dma).ring.used.flags)) };
        if flags & USED_F_NO_NOTIFY == 0 {
            self.regs.write32(QUEUE_NOTIFY, 0);
        }

        let started = rdtsc();
        // SAFETY: volatile reads of the used index the device writes.
        while unsafe { read_volatile(addr_of!((*dma).ring.used.index)) } == self.last_used {
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
                read_volatile(addr_of!((*dma).ring.used.ring[slot])),
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

/// Checks a transfer length against the driver's contract (a caller bug otherwise).
fn checked_transfer(len: usize) -> usize {
    assert!(
        len.is_multiple_of(SECTOR_SIZE) && len <= MAX_TRANSFER,
        "bad virtio-blk transfer length {len}"
    );
    len
}
