//! The register interface of the transport, driven through `BusDevice` the way a guest does.

use std::sync::Arc;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_T_FLUSH};
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use vm_memory::{Bytes, GuestAddress};

use super::super::driver::{
    AVAIL_RING, Buffer, DESC_TABLE, Driver, MEMORY_SIZE, add_status, device_features, guest_memory,
    negotiate, read_register, setup_queue, used_idx, write_register,
};
use super::super::{Block, BlockConfig, ChangedBlockMap};
use super::*;
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;

const SECTORS: u64 = 64;
const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
const HEADER: u64 = 0x10000;
const STATUS_BYTE: u64 = 0x11000;

fn block() -> Block {
    let image = tempfile::tempfile().unwrap();
    image.set_len(SECTORS * 512).unwrap();
    let changed = Arc::new(ChangedBlockMap::new(SECTORS * 512, 4096).unwrap());
    let backend = Arc::new(crate::block::RawImage::from_file(image, false).unwrap());
    Block::new(backend, BlockConfig::default(), changed).unwrap()
}

fn interrupt() -> EventFd {
    EventFd::new(libc::EFD_NONBLOCK).unwrap()
}

fn transport(memory: &PartitionMemory) -> MmioTransport<Block> {
    MmioTransport::new(block(), memory.clone(), interrupt()).unwrap()
}

/// Submits a flush request: the smallest request a block device completes.
fn submit_flush(memory: &PartitionMemory, driver: &mut Driver, device: &dyn BusDevice) {
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&VIRTIO_BLK_T_FLUSH.to_le_bytes());
    memory.write_slice(&header, GuestAddress(HEADER)).unwrap();
    driver.submit(
        memory,
        device,
        &[
            Buffer::readable(HEADER, 16),
            Buffer::writable(STATUS_BYTE, 1),
        ],
    );
}

fn interrupts_signalled(transport: &MmioTransport<Block>) -> u64 {
    transport.interrupt().read().unwrap_or(0)
}

#[test]
fn magic_value_reads_virt() {
    let memory = guest_memory();
    let transport = transport(&memory);

    assert_eq!(
        read_register(&transport, VIRTIO_MMIO_MAGIC_VALUE),
        0x7472_6976
    );
}

#[test]
fn version_reads_2_and_device_id_reads_block() {
    let memory = guest_memory();
    let transport = transport(&memory);

    assert_eq!(read_register(&transport, VIRTIO_MMIO_VERSION), 2);
    assert_eq!(read_register(&transport, VIRTIO_MMIO_DEVICE_ID), 2);
}

#[test]
fn misaligned_register_read_returns_zero() {
    let memory = guest_memory();
    let transport = transport(&memory);
    let mut bytes = [0xff; 4];

    transport.read(2, &mut bytes);

    assert_eq!(bytes, [0; 4]);
}

#[test]
fn narrow_register_read_returns_zero() {
    let memory = guest_memory();
    let transport = transport(&memory);
    let mut bytes = [0xff; 2];

    transport.read(u64::from(VIRTIO_MMIO_MAGIC_VALUE), &mut bytes);

    assert_eq!(bytes, [0; 2]);
}

#[test]
fn narrow_status_write_is_ignored() {
    let memory = guest_memory();
    let transport = transport(&memory);

    transport.write(u64::from(VIRTIO_MMIO_STATUS), &[1]);

    assert_eq!(read_register(&transport, VIRTIO_MMIO_STATUS), 0);
}

#[test]
fn access_past_the_config_space_reads_zero() {
    let memory = guest_memory();
    let transport = transport(&memory);
    let mut bytes = [0xff; 4];

    transport.read(0xffc, &mut bytes);

    assert_eq!(bytes, [0; 4]);
}

#[test]
fn shared_memory_region_length_reads_all_ones() {
    let memory = guest_memory();
    let transport = transport(&memory);

    assert_eq!(read_register(&transport, VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
}

#[test]
fn device_offers_version_1_and_flush() {
    let memory = guest_memory();
    let transport = transport(&memory);

    let offered = device_features(&transport);

    assert_eq!(offered & VERSION_1, VERSION_1);
    assert_ne!(offered & (1 << VIRTIO_BLK_F_FLUSH), 0);
}

#[test]
fn features_ok_is_kept_when_the_driver_accepts_a_subset() {
    let memory = guest_memory();
    let transport = transport(&memory);

    let status = negotiate(&transport, VERSION_1);

    assert_eq!(status & FEATURES_OK, FEATURES_OK);
}

#[test]
fn features_ok_is_refused_for_a_feature_not_offered() {
    let memory = guest_memory();
    let transport = transport(&memory);

    let status = negotiate(&transport, VERSION_1 | (1 << 40));

    assert_eq!(status & FEATURES_OK, 0);
}

#[test]
fn features_ok_is_refused_without_version_1() {
    let memory = guest_memory();
    let transport = transport(&memory);

    let status = negotiate(&transport, 1 << VIRTIO_BLK_F_FLUSH);

    assert_eq!(status & FEATURES_OK, 0);
}

#[test]
fn driver_ok_before_features_ok_is_ignored() {
    let memory = guest_memory();
    let transport = transport(&memory);
    add_status(&transport, ACKNOWLEDGE);
    add_status(&transport, DRIVER);

    add_status(&transport, DRIVER_OK);

    assert_eq!(
        read_register(&transport, VIRTIO_MMIO_STATUS),
        ACKNOWLEDGE | DRIVER
    );
}

#[test]
fn queue_num_max_is_256_for_queue_0_and_0_past_the_last_queue() {
    let memory = guest_memory();
    let transport = transport(&memory);

    write_register(&transport, VIRTIO_MMIO_QUEUE_SEL, 0);
    let first = read_register(&transport, VIRTIO_MMIO_QUEUE_NUM_MAX);
    write_register(&transport, VIRTIO_MMIO_QUEUE_SEL, 1);
    let second = read_register(&transport, VIRTIO_MMIO_QUEUE_NUM_MAX);

    assert_eq!((first, second), (256, 0));
}

#[test]
fn queue_ready_reads_back_what_the_driver_set() {
    let memory = guest_memory();
    let transport = transport(&memory);
    negotiate(&transport, VERSION_1);

    setup_queue(&transport);

    assert_eq!(read_register(&transport, VIRTIO_MMIO_QUEUE_READY), 1);
}

#[test]
fn reset_clears_status_and_queues() {
    let memory = guest_memory();
    let transport = transport(&memory);
    Driver::start(&transport);

    write_register(&transport, VIRTIO_MMIO_STATUS, 0);

    assert_eq!(read_register(&transport, VIRTIO_MMIO_STATUS), 0);
    assert_eq!(read_register(&transport, VIRTIO_MMIO_QUEUE_READY), 0);
    assert_eq!(
        transport.state().queues[0],
        VirtqueueState {
            max_size: 256,
            size: 256,
            ..Default::default()
        }
    );
}

#[test]
fn notify_after_reset_serves_nothing() {
    let memory = guest_memory();
    let transport = transport(&memory);
    let mut driver = Driver::start(&transport);
    write_register(&transport, VIRTIO_MMIO_STATUS, 0);

    submit_flush(&memory, &mut driver, &transport);

    assert_eq!(used_idx(&memory), 0);
}

#[test]
fn queue_configuration_after_driver_ok_is_ignored() {
    let memory = guest_memory();
    let transport = transport(&memory);
    Driver::start(&transport);

    write_register(&transport, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x8000);

    assert_eq!(transport.state().queues[0].desc_table, DESC_TABLE);
}

#[test]
fn config_space_holds_the_capacity_in_sectors() {
    let memory = guest_memory();
    let transport = transport(&memory);
    let mut wide = [0; 8];

    let low = read_register(&transport, VIRTIO_MMIO_CONFIG);
    let high = read_register(&transport, VIRTIO_MMIO_CONFIG + 4);
    transport.read(u64::from(VIRTIO_MMIO_CONFIG), &mut wide);

    assert_eq!((low, high), (SECTORS as u32, 0));
    assert_eq!(u64::from_le_bytes(wide), SECTORS);
}

#[test]
fn queue_outside_memory_puts_the_device_into_needs_reset() {
    let memory = guest_memory();
    let transport = transport(&memory);
    negotiate(&transport, VERSION_1);
    setup_queue(&transport);
    write_register(&transport, VIRTIO_MMIO_QUEUE_USED_LOW, MEMORY_SIZE as u32);

    add_status(&transport, DRIVER_OK);

    let status = read_register(&transport, VIRTIO_MMIO_STATUS);
    assert_eq!(status & NEEDS_RESET, NEEDS_RESET);
    assert_eq!(
        read_register(&transport, VIRTIO_MMIO_INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_CONFIG
    );
}

#[test]
fn used_buffer_raises_the_interrupt_and_ack_clears_it() {
    let memory = guest_memory();
    let transport = transport(&memory);
    let mut driver = Driver::start(&transport);

    submit_flush(&memory, &mut driver, &transport);
    let raised = read_register(&transport, VIRTIO_MMIO_INTERRUPT_STATUS);
    write_register(&transport, VIRTIO_MMIO_INTERRUPT_ACK, raised);

    assert_eq!(used_idx(&memory), 1);
    assert_eq!(raised, VIRTIO_MMIO_INT_VRING);
    assert_eq!(interrupts_signalled(&transport), 1);
    assert_eq!(read_register(&transport, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
}

#[test]
fn no_interrupt_flag_suppresses_the_interrupt() {
    let memory = guest_memory();
    let transport = transport(&memory);
    let mut driver = Driver::start(&transport);
    memory
        .write_obj(VRING_AVAIL_F_NO_INTERRUPT as u16, GuestAddress(AVAIL_RING))
        .unwrap();

    submit_flush(&memory, &mut driver, &transport);

    assert_eq!(used_idx(&memory), 1);
    assert_eq!(interrupts_signalled(&transport), 0);
}

#[test]
fn state_survives_serialization() {
    let memory = guest_memory();
    let transport = transport(&memory);
    let mut driver = Driver::start(&transport);
    submit_flush(&memory, &mut driver, &transport);
    let state = transport.state();

    let json = serde_json::to_string(&state).unwrap();

    assert_eq!(
        serde_json::from_str::<MmioTransportState>(&json).unwrap(),
        state
    );
}

#[test]
fn restored_transport_continues_the_queue() {
    let memory = guest_memory();
    let original = transport(&memory);
    let mut driver = Driver::start(&original);
    submit_flush(&memory, &mut driver, &original);
    let (state, device_state) = (original.state(), original.device_state());

    let restored =
        MmioTransport::restore(block(), memory.clone(), interrupt(), &state, &device_state)
            .unwrap();
    submit_flush(&memory, &mut driver, &restored);

    assert_eq!(used_idx(&memory), 2);
    assert_eq!(restored.state().queues[0].next_avail, 2);
    assert_eq!(read_register(&restored, VIRTIO_MMIO_STATUS), state.status);
}

#[test]
fn restore_raises_a_pending_interrupt_again() {
    let memory = guest_memory();
    let original = transport(&memory);
    let mut driver = Driver::start(&original);
    submit_flush(&memory, &mut driver, &original);

    let restored = MmioTransport::restore(
        block(),
        memory.clone(),
        interrupt(),
        &original.state(),
        &original.device_state(),
    )
    .unwrap();

    assert_eq!(interrupts_signalled(&restored), 1);
}

#[test]
fn restore_refuses_a_state_with_another_queue_count() {
    let memory = guest_memory();
    let mut state = transport(&memory).state();
    state.queues.push(VirtqueueState::default());

    let result = MmioTransport::restore(block(), memory, interrupt(), &state, &block().state());

    assert!(matches!(
        result,
        Err(VirtioError::QueueCount {
            expected: 1,
            found: 2
        })
    ));
}

#[test]
fn restore_refuses_a_misaligned_ring() {
    let memory = guest_memory();
    let mut state = transport(&memory).state();
    state.queues[0].desc_table = 0x1004;

    let result = MmioTransport::restore(block(), memory, interrupt(), &state, &block().state());

    assert!(matches!(
        result,
        Err(VirtioError::InvalidQueueState { index: 0, .. })
    ));
}

#[test]
fn restore_refuses_features_the_device_does_not_offer() {
    let memory = guest_memory();
    let mut state = transport(&memory).state();
    state.acked_features = VERSION_1 | (1 << 50);

    let result = MmioTransport::restore(block(), memory, interrupt(), &state, &block().state());

    assert!(matches!(
        result,
        Err(VirtioError::FeaturesNotOffered { .. })
    ));
}

#[test]
fn notify_of_a_queue_never_set_up_breaks_the_device() {
    let memory = guest_memory();
    let transport = transport(&memory);
    negotiate(&transport, VERSION_1);
    add_status(&transport, DRIVER_OK);

    write_register(&transport, VIRTIO_MMIO_QUEUE_NOTIFY, 0);

    let status = read_register(&transport, VIRTIO_MMIO_STATUS);
    assert_eq!(status & NEEDS_RESET, NEEDS_RESET);
    assert_eq!(
        read_register(&transport, VIRTIO_MMIO_INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_CONFIG
    );
    assert_eq!(interrupts_signalled(&transport), 1);
}

#[test]
fn notify_of_a_queue_the_device_does_not_have_breaks_the_device() {
    let memory = guest_memory();
    let transport = transport(&memory);
    Driver::start(&transport);

    write_register(&transport, VIRTIO_MMIO_QUEUE_NOTIFY, 7);

    let status = read_register(&transport, VIRTIO_MMIO_STATUS);
    assert_eq!(status & NEEDS_RESET, NEEDS_RESET);
}

#[test]
fn notify_before_driver_ok_is_ignored() {
    let memory = guest_memory();
    let transport = transport(&memory);
    negotiate(&transport, VERSION_1);

    write_register(&transport, VIRTIO_MMIO_QUEUE_NOTIFY, 0);

    assert_eq!(
        read_register(&transport, VIRTIO_MMIO_STATUS) & NEEDS_RESET,
        0
    );
    assert_eq!(interrupts_signalled(&transport), 0);
}

#[test]
fn broken_state_survives_capture_and_restore() {
    let memory = guest_memory();
    let original = transport(&memory);
    Driver::start(&original);
    write_register(&original, VIRTIO_MMIO_QUEUE_NOTIFY, 3);

    let restored = MmioTransport::restore(
        block(),
        memory.clone(),
        interrupt(),
        &original.state(),
        &original.device_state(),
    )
    .unwrap();

    let status = read_register(&restored, VIRTIO_MMIO_STATUS);
    assert_eq!(status & NEEDS_RESET, NEEDS_RESET);
    assert_eq!(
        read_register(&restored, VIRTIO_MMIO_INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_CONFIG
    );
}

/// Publishes a flush request without notifying.
fn publish_flush(memory: &PartitionMemory, driver: &mut Driver) {
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&VIRTIO_BLK_T_FLUSH.to_le_bytes());
    memory.write_slice(&header, GuestAddress(HEADER)).unwrap();
    driver.publish(
        memory,
        &[
            Buffer::readable(HEADER, 16),
            Buffer::writable(STATUS_BYTE, 1),
        ],
    );
}

/// Waits (generously: the machine may be loaded) until the used ring holds `count` entries.
fn wait_for_used(memory: &PartitionMemory, count: u16) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if used_idx(memory) == count {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    false
}

#[test]
fn io_thread_serves_the_whole_available_ring_on_one_notification() {
    let memory = guest_memory();
    let mut transport = transport(&memory);
    let notifiers = transport.start_io_thread("blk-test".into()).unwrap().len();
    let mut driver = Driver::start(&transport);
    for _ in 0..5 {
        publish_flush(&memory, &mut driver);
    }

    // What KVM does when the guest writes 0 to QueueNotify.
    transport.queue_notifiers()[0].write(1).unwrap();

    assert_eq!(notifiers, 1);
    assert!(wait_for_used(&memory, 5), "used idx {}", used_idx(&memory));
    assert_eq!(
        read_register(&transport, VIRTIO_MMIO_INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_VRING
    );
}

#[test]
fn io_thread_breaks_the_device_for_a_queue_never_set_up() {
    let memory = guest_memory();
    let mut transport = transport(&memory);
    transport.start_io_thread("blk-test".into()).unwrap();
    negotiate(&transport, VERSION_1);
    add_status(&transport, DRIVER_OK);

    transport.queue_notifiers()[0].write(1).unwrap();

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while read_register(&transport, VIRTIO_MMIO_STATUS) & NEEDS_RESET == 0 {
        assert!(std::time::Instant::now() < deadline, "device never broke");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(
        read_register(&transport, VIRTIO_MMIO_INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_CONFIG
    );
}

#[test]
fn quiesce_finishes_every_available_request_and_the_state_shows_none_pending() {
    let memory = guest_memory();
    let mut transport = transport(&memory);
    transport.start_io_thread("blk-test".into()).unwrap();
    let mut driver = Driver::start(&transport);
    for _ in 0..3 {
        publish_flush(&memory, &mut driver);
    }

    transport.quiesce();

    let queue = transport.state().queues[0];
    assert_eq!(used_idx(&memory), 3);
    assert_eq!((queue.next_avail, queue.next_used), (3, 3));
}

#[test]
fn restored_transport_with_an_io_thread_continues_the_queue() {
    let memory = guest_memory();
    let original = transport(&memory);
    let mut driver = Driver::start(&original);
    submit_flush(&memory, &mut driver, &original);
    let (state, device_state) = (original.state(), original.device_state());
    drop(original);

    let mut restored =
        MmioTransport::restore(block(), memory.clone(), interrupt(), &state, &device_state)
            .unwrap();
    restored.start_io_thread("blk-test".into()).unwrap();
    publish_flush(&memory, &mut driver);
    restored.queue_notifiers()[0].write(1).unwrap();

    assert!(wait_for_used(&memory, 2), "used idx {}", used_idx(&memory));
    assert_eq!(restored.state().queues[0].next_avail, 2);
}

#[test]
fn dropping_the_transport_stops_its_io_thread() {
    let threads_named = |wanted: &str| {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter(|task| {
                let comm = task.as_ref().unwrap().path().join("comm");
                std::fs::read_to_string(comm).is_ok_and(|name| name.trim() == wanted)
            })
            .count()
    };
    let memory = guest_memory();
    let mut transport = transport(&memory);
    transport.start_io_thread("blk-drop-test".into()).unwrap();
    // The thread names itself once it runs.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while threads_named("blk-drop-test") == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let running = threads_named("blk-drop-test");

    drop(transport);

    assert_eq!(running, 1);
    assert_eq!(threads_named("blk-drop-test"), 0);
}
