//! The address-range bus that vCPU exits dispatch through.
//!
//! Two instances exist per partition: one for port I/O and one for MMIO. Both are built before the
//! vCPUs start and never change afterwards, so the exit path reads them without a lock: a lookup is a
//! binary search over a sorted slice, with no allocation.

use std::fmt;
use std::sync::Arc;

use crate::error::BusError;

/// A device that answers guest accesses to an address range.
///
/// `offset` is relative to the base address the device was inserted at, so one device type can sit at
/// several bases (COM1 and COM2 are the same type). Methods take `&self`: a device keeps its own
/// interior mutability (usually one `Mutex` of its own), so two vCPUs touching two devices never
/// contend, and no lock is global.
///
/// ```
/// use std::sync::atomic::{AtomicU8, Ordering};
/// use partition::bus::{Bus, BusDevice};
///
/// #[derive(Debug, Default)]
/// struct Scratch(AtomicU8);
/// impl BusDevice for Scratch {
///     fn read(&self, _offset: u64, data: &mut [u8]) { data.fill(self.0.load(Ordering::Relaxed)); }
///     fn write(&self, _offset: u64, data: &[u8]) { self.0.store(data[0], Ordering::Relaxed); }
/// }
///
/// let mut bus = Bus::new();
/// bus.insert(std::sync::Arc::new(Scratch::default()), 0x80, 1).unwrap();
/// assert!(bus.write(0x80, &[7]));
/// let mut byte = [0];
/// assert!(bus.read(0x80, &mut byte));
/// assert_eq!(byte, [7]);
/// ```
pub trait BusDevice: Send + Sync {
    /// The guest reads `data.len()` bytes at `offset`; fill `data`.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&self, offset: u64, data: &[u8]);
}

/// One registered range: `[base, base + len)`.
#[derive(Clone)]
struct BusEntry {
    base: u64,
    len: u64,
    device: Arc<dyn BusDevice>,
}

/// A set of non-overlapping address ranges, each owned by one device.
#[derive(Clone, Default)]
pub struct Bus {
    /// Sorted by `base`; ranges never overlap (checked by [`Bus::insert`]).
    entries: Vec<BusEntry>,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        for entry in &self.entries {
            list.entry(&format_args!(
                "{:#x}..{:#x}",
                entry.base,
                entry.base + entry.len
            ));
        }
        list.finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Gives `device` the range `[base, base + len)`.
    ///
    /// Fails on an empty range, one that wraps around the address space, or one that overlaps a range
    /// already on the bus.
    pub fn insert(
        &mut self,
        device: Arc<dyn BusDevice>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let at = self.entries.partition_point(|e| e.base < base);
        let overlaps_prev = at > 0 && self.entries[at - 1].base + self.entries[at - 1].len > base;
        let overlaps_next = at < self.entries.len() && self.entries[at].base < end;
        if overlaps_prev || overlaps_next {
            let other = if overlaps_prev {
                &self.entries[at - 1]
            } else {
                &self.entries[at]
            };
            return Err(BusError::Overlap {
                base,
                len,
                other_base: other.base,
                other_len: other.len,
            });
        }
        self.entries.insert(at, BusEntry { base, len, device });
        Ok(())
    }

    /// The device owning `addr` and the offset of `addr` inside its range.
    #[inline]
    fn resolve(&self, addr: u64) -> Option<(&dyn BusDevice, u64)> {
        // The last range starting at or below `addr` is the only candidate.
        let at = self.entries.partition_point(|e| e.base <= addr);
        let entry = self.entries.get(at.checked_sub(1)?)?;
        let offset = addr - entry.base;
        (offset < entry.len).then_some((entry.device.as_ref(), offset))
    }

    /// Dispatches a guest read; `false` when no device owns `addr` (`data` is left untouched).
    #[inline]
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((device, offset)) => {
                device.read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a guest write; `false` when no device owns `addr`.
    #[inline]
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((device, offset)) => {
                device.write(offset, data);
                true
            }
            None => false,
        }
    }

    /// How many ranges are registered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no range is registered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[derive(Default)]
    struct Recorder {
        last_offset: AtomicU64,
    }

    impl BusDevice for Recorder {
        fn read(&self, offset: u64, data: &mut [u8]) {
            self.last_offset.store(offset, Ordering::Relaxed);
            data.fill(0xab);
        }
        fn write(&self, offset: u64, _data: &[u8]) {
            self.last_offset.store(offset, Ordering::Relaxed);
        }
    }

    #[test]
    fn write_reaches_device_with_offset_relative_to_base() {
        let device = Arc::new(Recorder::default());
        let mut bus = Bus::new();
        bus.insert(device.clone(), 0x3f8, 8).unwrap();

        assert!(bus.write(0x3fd, &[1]));

        assert_eq!(device.last_offset.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn address_just_past_range_is_unclaimed() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Recorder::default()), 0x3f8, 8).unwrap();

        assert!(!bus.read(0x400, &mut [0]));
    }

    #[test]
    fn address_below_first_range_is_unclaimed() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Recorder::default()), 0x3f8, 8).unwrap();

        assert!(!bus.write(0x3f7, &[0]));
    }

    #[test]
    fn overlapping_insert_is_rejected() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Recorder::default()), 0x1000, 0x100)
            .unwrap();

        let err = bus
            .insert(Arc::new(Recorder::default()), 0x10ff, 0x10)
            .unwrap_err();

        assert!(matches!(
            err,
            BusError::Overlap {
                other_base: 0x1000,
                ..
            }
        ));
    }

    #[test]
    fn insert_below_existing_range_that_reaches_into_it_is_rejected() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Recorder::default()), 0x1000, 0x100)
            .unwrap();

        let err = bus
            .insert(Arc::new(Recorder::default()), 0xff0, 0x11)
            .unwrap_err();

        assert!(matches!(err, BusError::Overlap { .. }));
    }

    #[test]
    fn empty_and_wrapping_ranges_are_rejected() {
        let mut bus = Bus::new();

        assert!(bus.insert(Arc::new(Recorder::default()), 0x10, 0).is_err());
        assert!(
            bus.insert(Arc::new(Recorder::default()), u64::MAX, 2)
                .is_err()
        );
    }

    #[test]
    fn each_of_many_devices_gets_its_own_accesses() {
        let devices: Vec<_> = (0..32).map(|_| Arc::new(Recorder::default())).collect();
        let mut bus = Bus::new();
        for (i, d) in devices.iter().enumerate().rev() {
            bus.insert(d.clone(), 0x1000 * i as u64, 0x10).unwrap();
        }

        for i in 0..32u64 {
            assert!(bus.write(0x1000 * i + 3, &[0]));
        }

        assert!(
            devices
                .iter()
                .all(|d| d.last_offset.load(Ordering::Relaxed) == 3)
        );
    }
}
