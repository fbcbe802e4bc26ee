//! Notification suppression: the I/O thread's polling window never loses a request, and never
//! leaves the driver believing the device polls when it does not.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
use virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY;
use vm_memory::{Bytes, GuestAddress};

use super::super::data_path::Polled;
use super::super::driver::{Buffer, Driver, guest_memory, used_flags, used_idx};
use super::super::{Block, BlockConfig, ChangedBlockMap};
use super::*;

const SECTORS: u64 = 64;
const HEADER: u64 = 0x10000;
const DATA: u64 = 0x11000;
const STATUS_BYTE: u64 = 0x12000;
const NO_NOTIFY: u16 = VRING_USED_F_NO_NOTIFY as u16;

fn transport(memory: &PartitionMemory) -> MmioTransport<Block> {
    let image = tempfile::tempfile().unwrap();
    image.set_len(SECTORS * 512).unwrap();
    let changed = Arc::new(ChangedBlockMap::new(SECTORS * 512, 4096).unwrap());
    let backend = Arc::new(crate::block::RawImage::from_file(image, false).unwrap());
    let block = Block::new(backend, BlockConfig::default(), changed).unwrap();
    MmioTransport::new(
        block,
        memory.clone(),
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    )
    .unwrap()
}

/// Makes a one-sector read of sector `sector % SECTORS` available, without notifying.
fn publish_read(memory: &PartitionMemory, driver: &mut Driver, sector: u64) {
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    header[8..].copy_from_slice(&(sector % SECTORS).to_le_bytes());
    memory.write_slice(&header, GuestAddress(HEADER)).unwrap();
    driver.publish(
        memory,
        &[
            Buffer::readable(HEADER, 16),
            Buffer::writable(DATA, 512),
            Buffer::writable(STATUS_BYTE, 1),
        ],
    );
}

/// What Linux's driver does after making a buffer available: notify unless the device said
/// `VRING_USED_F_NO_NOTIFY` (checked after a full fence). Returns whether it notified.
fn kick_if_wanted(memory: &PartitionMemory, notify: impl FnOnce()) -> bool {
    std::sync::atomic::fence(Ordering::SeqCst);
    if used_flags(memory) & NO_NOTIFY == 0 {
        notify();
        true
    } else {
        false
    }
}

/// Waits (generously: the machine may be loaded) until the used ring holds `count` entries.
fn wait_for_used(memory: &PartitionMemory, count: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if used_idx(memory) == count {
            return true;
        }
        std::hint::spin_loop();
    }
    false
}

/// Waits (as generously) until the device sets `VRING_USED_F_NO_NOTIFY`; whether it did.
fn wait_for_suppressed(memory: &PartitionMemory) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while used_flags(memory) & NO_NOTIFY == 0 && Instant::now() < deadline {
        std::hint::spin_loop();
    }
    used_flags(memory) & NO_NOTIFY != 0
}

/// Starts queue 0's polling window on a thread of its own: one no scheduling delay of the tests
/// outlasts (30 s), which they end by wanting the queues.
fn start_polling(transport: &Arc<MmioTransport<Block>>) -> std::thread::JoinHandle<Polled> {
    let transport = Arc::clone(transport);
    std::thread::spawn(move || transport.path.notify_polling(0, Duration::from_secs(30)))
}

#[test]
fn polling_serves_a_request_made_available_without_a_notification() {
    let memory = guest_memory();
    let transport = Arc::new(transport(&memory));
    let mut driver = Driver::start(transport.as_ref());
    publish_read(&memory, &mut driver, 0);
    let polling = start_polling(&transport);
    assert!(wait_for_used(&memory, 1));
    let suppressed = wait_for_suppressed(&memory);

    // The driver saw VRING_USED_F_NO_NOTIFY, so it does not notify. (Checking the flag again
    // after publishing would race the device, which clears it while it serves what it found.)
    publish_read(&memory, &mut driver, 1);

    assert!(suppressed, "the device never suppressed notifications");
    assert!(wait_for_used(&memory, 2), "used idx {}", used_idx(&memory));
    // Wanting the queues ends the window (as a pause or a register access does).
    transport.quiesce();
    let polled = polling.join().unwrap();
    assert_eq!(polled.caught, 1);
    assert_eq!(used_flags(&memory) & NO_NOTIFY, 0);
}

#[test]
fn polling_ends_when_another_thread_wants_the_queues_and_leaves_notifications_on() {
    let memory = guest_memory();
    let transport = Arc::new(transport(&memory));
    let mut driver = Driver::start(transport.as_ref());
    publish_read(&memory, &mut driver, 0);
    let polling = start_polling(&transport);
    wait_for_suppressed(&memory);

    let started = Instant::now();
    transport.quiesce();
    let state = transport.state();

    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(used_flags(&memory) & NO_NOTIFY, 0);
    assert_eq!(state.queues[0].next_used, 1);
    assert_eq!(polling.join().unwrap().caught, 0);
}

#[test]
fn no_request_is_lost_between_polling_windows() {
    // The device's windows are short and of several lengths, so the driver often posts just as
    // one ends: the device then either sees the request when it re-checks the ring, or the
    // driver sees notifications enabled again and notifies.
    const REQUESTS: u16 = 3000;
    let memory = guest_memory();
    let transport = Arc::new(transport(&memory));
    let notify = EventFd::new(0).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let device = {
        let (transport, notify, stop) = (
            Arc::clone(&transport),
            notify.try_clone().unwrap(),
            Arc::clone(&stop),
        );
        std::thread::spawn(move || {
            let mut caught = 0;
            for window in [2, 20, 100, 500].into_iter().cycle() {
                if notify.read().is_err() || stop.load(Ordering::Acquire) {
                    break;
                }
                caught += transport
                    .path
                    .notify_polling(0, Duration::from_micros(window))
                    .caught;
            }
            caught
        })
    };
    let mut driver = Driver::start(transport.as_ref());
    let mut notifications = 0u32;

    let mut served = true;
    for request in 0..REQUESTS {
        publish_read(&memory, &mut driver, u64::from(request));
        if kick_if_wanted(&memory, || notify.write(1).unwrap()) {
            notifications += 1;
        }
        if !wait_for_used(&memory, request + 1) {
            served = false;
            break;
        }
        // A driver's own work between requests, around the device's window.
        let pause = Instant::now() + Duration::from_nanos(u64::from(request % 7) * 1000);
        while Instant::now() < pause {
            std::hint::spin_loop();
        }
    }
    stop.store(true, Ordering::Release);
    notify.write(1).unwrap();
    let caught = device.join().unwrap();

    assert!(served, "request lost: used idx {}", used_idx(&memory));
    assert_eq!(transport.state().queues[0].next_used, REQUESTS);
    // Each request was notified or caught by a window (a request posted just as notifications
    // came back on may be both).
    assert!(notifications + caught >= u32::from(REQUESTS));
    assert!(caught > 0, "the windows never caught a request");
    assert_eq!(used_flags(&memory) & NO_NOTIFY, 0);
}

#[test]
fn activation_clears_a_stale_no_notify_flag() {
    let memory = guest_memory();
    let transport = transport(&memory);
    memory
        .write_obj(NO_NOTIFY, GuestAddress(super::super::driver::USED_RING))
        .unwrap();

    Driver::start(&transport);

    assert_eq!(used_flags(&memory) & NO_NOTIFY, 0);
}
