//! The status page: live counters the host reads from guest memory at [`STATUS_GPA`].
//!
//! `link.ld` puts the `.status` section first in the image, so [`STATUS`] sits exactly at
//! [`STATUS_GPA`]. Every store is volatile: the host may read the page at any moment (for instance
//! while the partition is paused), so each value must really be in memory when the next main-loop
//! pass begins.

use core::cell::UnsafeCell;
use core::ptr::{addr_of_mut, read_volatile, write_volatile};

#[cfg(doc)]
use crate::protocol::STATUS_GPA;
use crate::protocol::{STATUS_MAGIC, StatusBlock};

/// The guest's one [`StatusBlock`].
struct StatusPage(UnsafeCell<StatusBlock>);

// SAFETY: the guest runs one vCPU with interrupts off and no threads: nothing in the guest ever
// accesses the page concurrently. (The host reads it from outside, which `volatile` accounts for.)
unsafe impl Sync for StatusPage {}

#[unsafe(link_section = ".status")]
static STATUS: StatusPage = StatusPage(UnsafeCell::new(StatusBlock {
    magic: 0,
    counter: 0,
    records_written: 0,
    ticks: 0,
    dirty_base: 0,
    flags: 0,
}));

/// Resets the block for a fresh boot and marks it valid (the magic is stored last).
pub fn init(dirty_base: u64) {
    let block = STATUS.0.get();
    // SAFETY: `block` points to the static status block; see `StatusPage`'s `Sync` for exclusivity.
    unsafe {
        write_volatile(addr_of_mut!((*block).counter), 0);
        write_volatile(addr_of_mut!((*block).records_written), 0);
        write_volatile(addr_of_mut!((*block).ticks), 0);
        write_volatile(addr_of_mut!((*block).dirty_base), dirty_base);
        write_volatile(addr_of_mut!((*block).flags), 0);
        write_volatile(addr_of_mut!((*block).magic), STATUS_MAGIC);
    }
}

/// Records one main-loop pass: advances the counter and stamps the TSC value `ticks`.
pub fn tick(ticks: u64) {
    let block = STATUS.0.get();
    // SAFETY: as in `init`.
    unsafe {
        let counter = read_volatile(addr_of_mut!((*block).counter));
        write_volatile(addr_of_mut!((*block).counter), counter.wrapping_add(1));
        write_volatile(addr_of_mut!((*block).ticks), ticks);
    }
}

/// Publishes the number of records on the disk (the next record's sequence number).
pub fn set_records_written(records: u64) {
    let block = STATUS.0.get();
    // SAFETY: as in `init`.
    unsafe { write_volatile(addr_of_mut!((*block).records_written), records) }
}

/// Publishes the workload's flags (`protocol::STATUS_FROZEN`, `protocol::STATUS_WRITELOOP`).
pub fn set_flags(flags: u64) {
    let block = STATUS.0.get();
    // SAFETY: as in `init`.
    unsafe { write_volatile(addr_of_mut!((*block).flags), flags) }
}

/// The current contents of the block.
pub fn read() -> StatusBlock {
    // SAFETY: as in `init`.
    unsafe { read_volatile(STATUS.0.get()) }
}
