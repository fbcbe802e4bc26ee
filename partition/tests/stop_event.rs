//! The partition's stop event: a descriptor its owner can sleep on next to others, readable exactly
//! when the run has ended.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

use common::{print_and_power_off, tiny_elf};
use partition::{ExitReason, KernelImage, Partition, PartitionConfig};

fn config(code: &[u8]) -> PartitionConfig {
    let mut cfg = PartitionConfig::new(KernelImage::Bytes(Arc::from(tiny_elf(code))), "");
    cfg.memory_mib = 32;
    cfg
}

/// Whether `fd` becomes readable within `timeout`.
fn readable_within(fd: BorrowedFd<'_>, timeout: Duration) -> bool {
    let mut pollfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = i32::try_from(timeout.as_millis()).unwrap();
    // SAFETY: one valid pollfd that outlives the call.
    let ready = unsafe { libc::poll(&mut pollfd, 1, millis) };
    ready == 1 && pollfd.revents & libc::POLLIN != 0
}

#[test]
fn stop_event_becomes_readable_when_the_guest_powers_off() {
    require_kvm!();
    let mut vm = Partition::new(config(&print_and_power_off(b"bye"))).unwrap();

    vm.resume().unwrap();

    assert!(readable_within(vm.stop_event(), Duration::from_secs(60)));
    assert_eq!(vm.wait(Some(Duration::ZERO)), Some(ExitReason::PowerOff));
}

#[test]
fn stop_event_stays_quiet_while_the_guest_runs_and_fires_on_stop() {
    require_kvm!();
    // jmp $
    let mut vm = Partition::new(config(&[0xeb, 0xfe])).unwrap();
    vm.resume().unwrap();

    let quiet = !readable_within(vm.stop_event(), Duration::from_millis(300));
    vm.stop();

    assert!(quiet, "the event fired while the guest was running");
    assert!(readable_within(vm.stop_event(), Duration::ZERO));
}
