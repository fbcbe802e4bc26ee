//! What the polled virtio drivers share: the virtio-mmio (version 2, "modern") register window,
//! the device initialisation up to FEATURES_OK, and the split virtqueue layout, sized by each
//! driver at compile time. Register layout and sequences follow the virtio 1.2 specification,
//! sections 4.2.2 (MMIO registers), 3.1.1 (driver initialisation) and 2.7 (split virtqueues).

use core::fmt;
use core::ptr::{addr_of, addr_of_mut, write_volatile};

use crate::io::Mmio;

pub const MAGIC_VALUE: usize = 0x000;
pub const VERSION: usize = 0x004;
pub const DEVICE_ID: usize = 0x008;
const DEVICE_FEATURES: usize = 0x010;
const DEVICE_FEATURES_SEL: usize = 0x014;
const DRIVER_FEATURES: usize = 0x020;
const DRIVER_FEATURES_SEL: usize = 0x024;
const QUEUE_SEL: usize = 0x030;
const QUEUE_NUM_MAX: usize = 0x034;
const QUEUE_NUM: usize = 0x038;
const QUEUE_READY: usize = 0x044;
pub const QUEUE_NOTIFY: usize = 0x050;
pub const STATUS: usize = 0x070;
const QUEUE_DESC_LOW: usize = 0x080;
const QUEUE_DESC_HIGH: usize = 0x084;
const QUEUE_DRIVER_LOW: usize = 0x090;
const QUEUE_DRIVER_HIGH: usize = 0x094;
const QUEUE_DEVICE_LOW: usize = 0x0a0;
const QUEUE_DEVICE_HIGH: usize = 0x0a4;
pub const CONFIG_GENERATION: usize = 0x0fc;
/// Where the device-specific configuration space starts.
pub const CONFIG: usize = 0x100;

pub const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_FAILED: u32 = 128;

/// `VIRTIO_F_VERSION_1`: the only transport feature the drivers need (and insist on).
pub const F_VERSION_1: u64 = 1 << 32;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
/// The polling drivers want no interrupts (a guest interrupt runs CPL0 code, which a software
/// KVM emulates instruction by instruction).
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Why a device could not be brought up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeError {
    /// The announced window is too small, beyond the identity map or overlaps RAM.
    BadWindow,
    /// No virtio-mmio magic value in the window.
    NotVirtio,
    /// A legacy (version 1) or unknown transport version.
    UnsupportedVersion(u32),
    /// A virtio device of another kind than the driver's (0: a placeholder without a device).
    WrongDevice(u32),
    /// The device does not offer `VIRTIO_F_VERSION_1`.
    NotModern,
    /// The device cleared FEATURES_OK.
    FeaturesRejected,
    /// A queue does not exist, is too small for the driver, or is already live.
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
            Self::WrongDevice(id) => write!(f, "virtio device id {id} is not this driver's"),
            Self::NotModern => f.write_str("device lacks VIRTIO_F_VERSION_1"),
            Self::FeaturesRejected => f.write_str("device rejected the features"),
            Self::QueueUnavailable => f.write_str("queue unavailable"),
            Self::Busy => f.write_str("driver already active"),
        }
    }
}

/// The device ID in `regs`, or 0 if the window is not a version 2 virtio-mmio device.
pub fn device_id(regs: &Mmio) -> u32 {
    if regs.read32(MAGIC_VALUE) != MMIO_MAGIC || regs.read32(VERSION) != 2 {
        return 0;
    }
    regs.read32(DEVICE_ID)
}

/// Checks that `regs` holds a version 2 virtio-mmio device with ID `expected`.
pub fn expect_device(regs: &Mmio, expected: u32) -> Result<(), ProbeError> {
    if regs.read32(MAGIC_VALUE) != MMIO_MAGIC {
        return Err(ProbeError::NotVirtio);
    }
    match regs.read32(VERSION) {
        2 => {}
        version => return Err(ProbeError::UnsupportedVersion(version)),
    }
    match regs.read32(DEVICE_ID) {
        id if id == expected => Ok(()),
        id => Err(ProbeError::WrongDevice(id)),
    }
}

/// Resets the device and negotiates features up to FEATURES_OK (virtio 1.2, 3.1.1 steps 1–6):
/// accepts what the device offers of `wanted` (which must include [`F_VERSION_1`]) and returns
/// it. The caller then sets up its queues and calls [`driver_ok`].
pub fn negotiate(regs: &Mmio, wanted: u64) -> Result<u64, ProbeError> {
    // Reset, and wait until the device reports it (4.2.3.1).
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
    let accepted = offered & wanted;
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
    Ok(accepted)
}

/// Tells the device the driver is ready (DRIVER_OK): it may use the queues from now on.
pub fn driver_ok(regs: &Mmio) {
    regs.write32(
        STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
    );
}

/// Reads a 64-bit configuration field as two 32-bit halves, retrying if the device changed its
/// configuration in between (virtio 1.2, 4.2.2.2).
pub fn read_config_u64(regs: &Mmio, offset: usize) -> u64 {
    loop {
        let generation = regs.read32(CONFIG_GENERATION);
        let low = regs.read32(offset);
        let high = regs.read32(offset + 4);
        if regs.read32(CONFIG_GENERATION) == generation {
            return (u64::from(high) << 32) | u64::from(low);
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Descriptor {
    pub address: u64,
    pub length: u32,
    pub flags: u16,
    pub next: u16,
}

impl Descriptor {
    pub const EMPTY: Self = Self {
        address: 0,
        length: 0,
        flags: 0,
        next: 0,
    };
}

#[repr(C)]
pub struct AvailRing<const N: usize> {
    pub flags: u16,
    pub index: u16,
    pub ring: [u16; N],
    pub used_event: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct UsedElement {
    pub id: u32,
    pub length: u32,
}

#[repr(C)]
pub struct UsedRing<const N: usize> {
    pub flags: u16,
    pub index: u16,
    pub ring: [UsedElement; N],
    pub avail_event: u16,
}

/// One split virtqueue of `N` entries: its three parts back to back, page aligned.
#[repr(C, align(4096))]
pub struct SplitRing<const N: usize> {
    pub descriptors: [Descriptor; N],
    pub avail: AvailRing<N>,
    pub used: UsedRing<N>,
}

impl<const N: usize> SplitRing<N> {
    /// A ring with no request: what a zero-filled `.bss` holds.
    pub const EMPTY: Self = Self {
        descriptors: [Descriptor::EMPTY; N],
        avail: AvailRing {
            flags: 0,
            index: 0,
            ring: [0; N],
            used_event: 0,
        },
        used: UsedRing {
            flags: 0,
            index: 0,
            ring: [UsedElement { id: 0, length: 0 }; N],
            avail_event: 0,
        },
    };
}

/// Sets up queue `queue` on `ring` with as many entries as the device allows, at most `N`, and
/// returns that number. The ring's indices start at 0 and interrupts are suppressed.
///
/// # Safety
/// `ring` points at a ring the driver owns that stays put while the device runs, in the
/// guest's identity map (its addresses are guest-physical), and no request is in flight on it.
pub unsafe fn setup_queue<const N: usize>(
    regs: &Mmio,
    queue: u32,
    ring: *mut SplitRing<N>,
) -> Result<u16, ProbeError> {
    regs.write32(QUEUE_SEL, queue);
    let max = regs.read32(QUEUE_NUM_MAX);
    if max == 0 || regs.read32(QUEUE_READY) != 0 {
        return Err(ProbeError::QueueUnavailable);
    }
    // At most N, which every driver keeps far below u16::MAX.
    let size = max.min(N as u32) as u16;
    regs.write32(QUEUE_NUM, u32::from(size));
    // SAFETY: the caller's contract: `ring` is ours and idle; field addresses read nothing.
    let (descriptors, avail, used) = unsafe {
        write_volatile(addr_of_mut!((*ring).avail.flags), AVAIL_F_NO_INTERRUPT);
        write_volatile(addr_of_mut!((*ring).avail.index), 0);
        write_volatile(addr_of_mut!((*ring).used.index), 0);
        (
            addr_of!((*ring).descriptors) as u64,
            addr_of!((*ring).avail) as u64,
            addr_of!((*ring).used) as u64,
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
    Ok(size)
}
