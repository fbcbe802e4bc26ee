//! virtio-blk requests served end to end: a driver builds chains in guest memory and notifies the
//! transport through its registers; the tests look at the image, guest memory and the map.

use std::fs::File;
use std::os::unix::fs::FileExt;

use proptest::prelude::*;
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_DISCARD;
use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK;
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryRegion, MmapRegion};
use vmm_sys_util::eventfd::EventFd;

use super::super::MmioTransport;
use super::super::driver::{
    AVAIL_RING, Buffer, DESC_TABLE, Driver, MEMORY_SIZE, QUEUE_SIZE, USED_RING, add_status,
    device_features, guest_memory, negotiate, read_register, setup_queue, used_elem, used_idx,
    write_register,
};
use super::*;
use crate::block::{BlockBackend, GuestBuffer, RawImage};
use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET;
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INTERRUPT_STATUS, VIRTIO_MMIO_STATUS,
};

const SECTORS: u64 = 64;
const IMAGE_LEN: u64 = SECTORS * SECTOR_SIZE;
const CHANGED_BLOCK: u64 = 4096;
const HEADER: u64 = 0x10000;
const DATA: u64 = 0x20000;
const STATUS: u64 = 0x30000;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// A writable raw backend over (a clone of) `image`.
fn raw(image: &File) -> Arc<dyn BlockBackend> {
    Arc::new(RawImage::from_file(image.try_clone().unwrap(), false).unwrap())
}

/// The byte the fresh image holds at `offset`.
fn pattern(offset: u64) -> u8 {
    (offset % 251) as u8
}

/// A running virtio-blk disk over a patterned image, with the driver at `DRIVER_OK`.
struct Disk {
    memory: PartitionMemory,
    transport: MmioTransport<Block>,
    image: File,
    changed: Arc<ChangedBlockMap>,
    driver: Driver,
}

impl Disk {
    fn new(config: BlockConfig) -> Self {
        Self::with_features(config, None)
    }

    /// A disk whose driver accepts only `features`, or everything offered.
    fn with_features(config: BlockConfig, features: Option<u64>) -> Self {
        let image = tempfile::tempfile().unwrap();
        let bytes: Vec<u8> = (0..IMAGE_LEN).map(pattern).collect();
        image.write_all_at(&bytes, 0).unwrap();
        let changed = Arc::new(ChangedBlockMap::new(IMAGE_LEN, CHANGED_BLOCK).unwrap());
        let block = Block::new(raw(&image), config, Arc::clone(&changed)).unwrap();
        let memory = guest_memory();
        let interrupt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let transport = MmioTransport::new(block, memory.clone(), interrupt).unwrap();
        let driver = match features {
            None => Driver::start(&transport),
            Some(features) => {
                negotiate(&transport, features);
                setup_queue(&transport);
                add_status(&transport, VIRTIO_CONFIG_S_DRIVER_OK);
                Driver::default()
            }
        };
        Self {
            memory,
            transport,
            image,
            changed,
            driver,
        }
    }

    /// Submits `buffers` as one chain; returns (status byte, used length) once it completed.
    fn submit(&mut self, buffers: &[Buffer]) -> (u8, u32) {
        self.memory.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let completed = used_idx(&self.memory);
        self.driver.submit(&self.memory, &self.transport, buffers);
        assert_eq!(
            used_idx(&self.memory),
            completed.wrapping_add(1),
            "request not completed"
        );
        let status = self.memory.read_obj(GuestAddress(STATUS)).unwrap();
        (status, used_elem(&self.memory, completed).1)
    }

    /// A request of `kind` at `sector`: header at [`HEADER`], then `data`, then the status byte.
    fn request(&mut self, kind: u32, sector: u64, data: &[Buffer]) -> (u8, u32) {
        write_header(&self.memory, HEADER, kind, sector);
        let mut chain = vec![Buffer::readable(HEADER, 16)];
        chain.extend_from_slice(data);
        chain.push(Buffer::writable(STATUS, 1));
        self.submit(&chain)
    }

    fn image_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        self.image.read_exact_at(&mut bytes, offset).unwrap();
        bytes
    }

    fn image_is_pristine(&self) -> bool {
        self.image_bytes(0, IMAGE_LEN as usize)
            .into_iter()
            .enumerate()
            .all(|(i, b)| b == pattern(i as u64))
    }

    fn marked_blocks(&self) -> Vec<u64> {
        self.changed.snapshot().iter().collect()
    }
}

fn write_header(memory: &PartitionMemory, at: u64, kind: u32, sector: u64) {
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&kind.to_le_bytes());
    header[8..].copy_from_slice(&sector.to_le_bytes());
    memory.write_slice(&header, GuestAddress(at)).unwrap();
}

fn is_dirty(memory: &PartitionMemory, addr: u64) -> bool {
    let region = memory.find_region(GuestAddress(addr)).unwrap();
    region.bitmap().dirty_at(addr as usize)
}

#[test]
fn write_request_writes_the_image_and_marks_exactly_the_touched_blocks() {
    let mut disk = Disk::new(BlockConfig::default());
    disk.memory
        .write_slice(&[0xab; 1024], GuestAddress(DATA))
        .unwrap();

    let (status, used) = disk.request(VIRTIO_BLK_T_OUT, 7, &[Buffer::readable(DATA, 1024)]);

    assert_eq!((status, used), (OK, 1));
    assert_eq!(disk.image_bytes(7 * 512, 1024), vec![0xab; 1024]);
    assert_eq!(disk.image_bytes(7 * 512 - 1, 1), [pattern(7 * 512 - 1)]);
    assert_eq!(disk.marked_blocks(), [0, 1]);
}

#[test]
fn write_gathered_from_several_buffers_lands_in_order() {
    let mut disk = Disk::new(BlockConfig::default());
    disk.memory
        .write_slice(&[1; 512], GuestAddress(DATA))
        .unwrap();
    disk.memory
        .write_slice(&[2; 512], GuestAddress(DATA + 0x8000))
        .unwrap();

    let (status, _) = disk.request(
        VIRTIO_BLK_T_OUT,
        8,
        &[
            Buffer::readable(DATA, 512),
            Buffer::readable(DATA + 0x8000, 512),
        ],
    );

    assert_eq!(status, OK);
    assert_eq!(
        disk.image_bytes(8 * 512, 1024),
        [[1; 512], [2; 512]].concat()
    );
    assert_eq!(disk.marked_blocks(), [1]);
}

#[test]
fn read_request_fills_guest_memory_and_marks_it_dirty() {
    let mut disk = Disk::new(BlockConfig::default());
    // The driver's own set-up writes must not count: start from a clean log.
    disk.memory
        .iter()
        .for_each(|region| MmapRegion::bitmap(region).reset());

    let (status, used) = disk.request(VIRTIO_BLK_T_IN, 2, &[Buffer::writable(DATA, 1536)]);

    let mut bytes = vec![0; 1536];
    disk.memory
        .read_slice(&mut bytes, GuestAddress(DATA))
        .unwrap();
    assert_eq!((status, used), (OK, 1537));
    assert_eq!(bytes, disk.image_bytes(1024, 1536));
    assert!(is_dirty(&disk.memory, DATA));
    assert!(!is_dirty(&disk.memory, DATA + 0x4000));
}

#[test]
fn read_scattered_over_several_buffers_fills_each_in_order() {
    let mut disk = Disk::new(BlockConfig::default());

    disk.request(
        VIRTIO_BLK_T_IN,
        0,
        &[
            Buffer::writable(DATA, 512),
            Buffer::writable(DATA + 0x8000, 512),
        ],
    );

    let (mut first, mut second) = (vec![0; 512], vec![0; 512]);
    disk.memory
        .read_slice(&mut first, GuestAddress(DATA))
        .unwrap();
    disk.memory
        .read_slice(&mut second, GuestAddress(DATA + 0x8000))
        .unwrap();
    assert_eq!([first, second].concat(), disk.image_bytes(0, 1024));
}

#[test]
fn header_split_over_two_descriptors_is_understood() {
    let mut disk = Disk::new(BlockConfig::default());
    write_header(&disk.memory, HEADER, VIRTIO_BLK_T_IN, 1);

    let (status, _) = disk.submit(&[
        Buffer::readable(HEADER, 8),
        Buffer::readable(HEADER + 8, 8),
        Buffer::writable(DATA, 512),
        Buffer::writable(STATUS, 1),
    ]);

    let mut bytes = vec![0; 512];
    disk.memory
        .read_slice(&mut bytes, GuestAddress(DATA))
        .unwrap();
    assert_eq!(status, OK);
    assert_eq!(bytes, disk.image_bytes(512, 512));
}

#[test]
fn read_only_disk_offers_ro_and_refuses_writes() {
    let mut disk = Disk::new(BlockConfig {
        read_only: true,
        ..Default::default()
    });

    let (status, _) = disk.request(VIRTIO_BLK_T_OUT, 0, &[Buffer::readable(DATA, 512)]);

    assert_ne!(device_features(&disk.transport) & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(status, IOERR);
    assert!(disk.image_is_pristine());
    assert_eq!(disk.changed.count(), 0);
}

#[test]
fn write_past_capacity_gets_ioerr_and_changes_nothing() {
    let mut disk = Disk::new(BlockConfig::default());

    let (status, _) = disk.request(
        VIRTIO_BLK_T_OUT,
        SECTORS - 1,
        &[Buffer::readable(DATA, 1024)],
    );

    assert_eq!(status, IOERR);
    assert!(disk.image_is_pristine());
    assert_eq!(disk.image.metadata().unwrap().len(), IMAGE_LEN);
    assert_eq!(disk.changed.count(), 0);
}

#[test]
fn read_past_capacity_gets_ioerr_and_leaves_guest_memory_alone() {
    let mut disk = Disk::new(BlockConfig::default());

    let (status, used) = disk.request(VIRTIO_BLK_T_IN, SECTORS, &[Buffer::writable(DATA, 512)]);

    let mut bytes = vec![0xff; 512];
    disk.memory
        .read_slice(&mut bytes, GuestAddress(DATA))
        .unwrap();
    assert_eq!((status, used), (IOERR, 1));
    assert_eq!(bytes, vec![0; 512]);
}

#[test]
fn sector_whose_byte_offset_overflows_gets_ioerr() {
    let mut disk = Disk::new(BlockConfig::default());

    let (status, _) = disk.request(
        VIRTIO_BLK_T_OUT,
        u64::MAX / 256,
        &[Buffer::readable(DATA, 512)],
    );

    assert_eq!(status, IOERR);
    assert!(disk.image_is_pristine());
}

#[test]
fn data_that_is_not_whole_sectors_gets_ioerr() {
    let mut disk = Disk::new(BlockConfig::default());

    let (status, _) = disk.request(VIRTIO_BLK_T_OUT, 0, &[Buffer::readable(DATA, 100)]);

    assert_eq!(status, IOERR);
    assert!(disk.image_is_pristine());
}

#[test]
fn flush_completes_ok() {
    let mut disk = Disk::new(BlockConfig::default());

    assert_eq!(disk.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
}

#[test]
fn write_without_flush_negotiated_completes() {
    let mut disk = Disk::with_features(BlockConfig::default(), Some(1 << VIRTIO_F_VERSION_1));
    disk.memory
        .write_slice(&[5; 512], GuestAddress(DATA))
        .unwrap();

    let (status, _) = disk.request(VIRTIO_BLK_T_OUT, 3, &[Buffer::readable(DATA, 512)]);

    assert_eq!(status, OK);
    assert_eq!(disk.image_bytes(3 * 512, 512), vec![5; 512]);
}

#[test]
fn get_id_returns_the_serial() {
    let mut disk = Disk::new(BlockConfig {
        serial: "vmms-disk-0".into(),
        ..Default::default()
    });

    let (status, used) = disk.request(VIRTIO_BLK_T_GET_ID, 0, &[Buffer::writable(DATA, 20)]);

    let mut id = [0xff; 20];
    disk.memory.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!((status, used), (OK, 21));
    assert_eq!(&id, b"vmms-disk-0\0\0\0\0\0\0\0\0\0");
}

#[test]
fn unknown_request_type_gets_unsupp() {
    let mut disk = Disk::new(BlockConfig::default());

    let (status, _) = disk.request(VIRTIO_BLK_T_DISCARD, 0, &[Buffer::readable(DATA, 16)]);

    assert_eq!(status, UNSUPP);
}

#[test]
fn chain_with_only_a_header_is_returned_unused() {
    let mut disk = Disk::new(BlockConfig::default());
    write_header(&disk.memory, HEADER, VIRTIO_BLK_T_IN, 0);

    disk.driver.submit(
        &disk.memory,
        &disk.transport,
        &[Buffer::readable(HEADER, 16)],
    );

    assert_eq!(used_idx(&disk.memory), 1);
    assert_eq!(used_elem(&disk.memory, 0).1, 0);
}

#[test]
fn write_whose_status_descriptor_is_not_writable_changes_nothing() {
    let mut disk = Disk::new(BlockConfig::default());
    write_header(&disk.memory, HEADER, VIRTIO_BLK_T_OUT, 0);

    disk.driver.submit(
        &disk.memory,
        &disk.transport,
        &[
            Buffer::readable(HEADER, 16),
            Buffer::readable(DATA, 512),
            Buffer::readable(STATUS, 1),
        ],
    );

    assert_eq!(used_elem(&disk.memory, 0).1, 0);
    assert!(disk.image_is_pristine());
}

#[test]
fn header_shorter_than_16_bytes_gets_ioerr() {
    let mut disk = Disk::new(BlockConfig::default());

    let (status, _) = disk.submit(&[Buffer::readable(HEADER, 8), Buffer::writable(STATUS, 1)]);

    assert_eq!(status, IOERR);
}

#[test]
fn buffer_outside_guest_memory_breaks_the_device_and_changes_nothing() {
    let mut disk = Disk::new(BlockConfig::default());
    write_header(&disk.memory, HEADER, VIRTIO_BLK_T_OUT, 0);

    disk.driver.submit(
        &disk.memory,
        &disk.transport,
        &[
            Buffer::readable(HEADER, 16),
            Buffer::readable(MEMORY_SIZE - 256, 512),
            Buffer::writable(STATUS, 1),
        ],
    );

    let status = read_register(&disk.transport, VIRTIO_MMIO_STATUS);
    assert_eq!(status & NEEDS_RESET, NEEDS_RESET);
    assert_eq!(
        read_register(&disk.transport, VIRTIO_MMIO_INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_CONFIG
    );
    assert_eq!(disk.transport.interrupt().read().unwrap(), 1);
    assert_eq!(used_idx(&disk.memory), 0);
    assert!(disk.image_is_pristine());
    assert_eq!(disk.changed.count(), 0);
}

#[test]
fn broken_device_serves_nothing_until_the_driver_resets_it() {
    let mut disk = Disk::new(BlockConfig::default());
    write_header(&disk.memory, HEADER, VIRTIO_BLK_T_FLUSH, 0);
    disk.driver.submit(
        &disk.memory,
        &disk.transport,
        &[
            Buffer::readable(HEADER, 16),
            Buffer::writable(MEMORY_SIZE + 0x1000, 1),
        ],
    );

    disk.driver.submit(
        &disk.memory,
        &disk.transport,
        &[Buffer::readable(HEADER, 16), Buffer::writable(STATUS, 1)],
    );
    let served_while_broken = used_idx(&disk.memory);
    write_register(&disk.transport, VIRTIO_MMIO_STATUS, 0);
    disk.memory
        .write_slice(&[0; 0x1000], GuestAddress(USED_RING))
        .unwrap();
    disk.driver = Driver::start(&disk.transport);
    let (status, _) = disk.request(VIRTIO_BLK_T_FLUSH, 0, &[]);

    assert_eq!(served_while_broken, 0);
    assert_eq!(status, OK);
    assert_eq!(
        read_register(&disk.transport, VIRTIO_MMIO_STATUS) & NEEDS_RESET,
        0
    );
}

#[test]
fn available_index_more_than_a_ring_ahead_breaks_the_device() {
    let disk = Disk::new(BlockConfig::default());
    disk.memory
        .write_obj(QUEUE_SIZE + 1, GuestAddress(AVAIL_RING + 2))
        .unwrap();

    write_register(&disk.transport, VIRTIO_MMIO_QUEUE_NOTIFY, 0);

    let status = read_register(&disk.transport, VIRTIO_MMIO_STATUS);
    assert_eq!(status & NEEDS_RESET, NEEDS_RESET);
    assert!(disk.image_is_pristine());
}

#[test]
fn readable_buffer_after_a_writable_one_gets_ioerr() {
    let mut disk = Disk::new(BlockConfig::default());
    write_header(&disk.memory, HEADER, VIRTIO_BLK_T_OUT, 0);

    let (status, _) = disk.submit(&[
        Buffer::writable(DATA + 0x1000, 16),
        Buffer::readable(HEADER, 16),
        Buffer::readable(DATA, 512),
        Buffer::writable(STATUS, 1),
    ]);

    assert_eq!(status, IOERR);
    assert!(disk.image_is_pristine());
}

/// A backend whose size is not whole sectors (a broken implementation).
#[derive(Debug)]
struct OddSize;

impl BlockBackend for OddSize {
    fn size(&self) -> u64 {
        1000
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, _offset: u64, _buf: &GuestBuffer<'_>) -> std::io::Result<()> {
        Ok(())
    }
    fn write_at(&self, _offset: u64, _buf: &GuestBuffer<'_>) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn backend_that_is_not_whole_sectors_is_refused() {
    let changed = Arc::new(ChangedBlockMap::new(1000, 512).unwrap());

    let result = Block::new(Arc::new(OddSize), BlockConfig::default(), changed);

    assert!(matches!(
        result,
        Err(VirtioError::ImageNotSectorAligned { len: 1000 })
    ));
}

#[test]
fn serial_longer_than_20_bytes_is_refused() {
    let image = tempfile::tempfile().unwrap();
    let changed = Arc::new(ChangedBlockMap::new(0, 512).unwrap());
    let config = BlockConfig {
        serial: "x".repeat(21),
        ..Default::default()
    };

    let result = Block::new(raw(&image), config, changed);

    assert!(matches!(
        result,
        Err(VirtioError::SerialTooLong { len: 21 })
    ));
}

#[test]
fn changed_block_map_smaller_than_the_disk_is_refused() {
    let image = tempfile::tempfile().unwrap();
    image.set_len(IMAGE_LEN).unwrap();
    let changed = Arc::new(ChangedBlockMap::new(IMAGE_LEN / 2, 512).unwrap());

    let result = Block::new(raw(&image), BlockConfig::default(), changed);

    assert!(matches!(
        result,
        Err(VirtioError::ChangedBlockMapTooSmall { .. })
    ));
}

#[test]
fn restore_refuses_a_disk_of_another_size() {
    let image = tempfile::tempfile().unwrap();
    image.set_len(IMAGE_LEN).unwrap();
    let changed = Arc::new(ChangedBlockMap::new(IMAGE_LEN, 512).unwrap());
    let mut block = Block::new(raw(&image), BlockConfig::default(), changed).unwrap();
    let state = BlockState {
        capacity_sectors: SECTORS + 1,
        read_only: false,
    };

    let result = block.restore(&state);

    assert!(matches!(
        result,
        Err(VirtioError::StateMismatch {
            what: "disk capacity"
        })
    ));
}

#[test]
fn restore_accepts_the_state_of_the_same_disk() {
    let disk = Disk::new(BlockConfig::default());
    let state = disk.transport.device_state();
    let mut block = Block::new(
        raw(&disk.image),
        BlockConfig::default(),
        Arc::clone(&disk.changed),
    )
    .unwrap();

    assert!(block.restore(&state).is_ok());
}

/// Any descriptor at all: addresses in, at the edge of and far outside guest memory.
fn any_descriptor() -> impl Strategy<Value = Descriptor> {
    let addr = prop_oneof![
        (0..16u64).prop_map(|i| HEADER + 16 * i),
        0..MEMORY_SIZE + 0x1000,
        Just(u64::MAX - 4),
        any::<u64>(),
    ];
    let len = prop_oneof![0..2048u32, any::<u32>()];
    (addr, len, 0..8u16, 0..QUEUE_SIZE + 4)
        .prop_map(|(addr, len, flags, next)| Descriptor::new(addr, len, flags, next))
}

/// Descriptor `index` of a table laid out as header, data, status triples, the way a driver
/// would; the data's direction and size vary, so both reads and writes complete.
fn plausible_descriptor(index: u16) -> BoxedStrategy<Descriptor> {
    let (next, chained) = (index + 1, VRING_DESC_F_NEXT as u16);
    match index % 3 {
        0 => (0..16u64)
            .prop_map(move |k| Descriptor::new(HEADER + 16 * k, 16, chained, next))
            .boxed(),
        1 => (0..64u64, 1..4u32, any::<bool>())
            .prop_map(move |(k, sectors, write)| {
                let flags = chained | if write { VRING_DESC_F_WRITE as u16 } else { 0 };
                Descriptor::new(DATA + 512 * k, 512 * sectors, flags, next)
            })
            .boxed(),
        _ => Just(Descriptor::new(
            STATUS + u64::from(index),
            1,
            VRING_DESC_F_WRITE as u16,
            0,
        ))
        .boxed(),
    }
}

/// A descriptor table with some plausible and some made-up entries.
fn descriptor_table() -> impl Strategy<Value = Vec<Descriptor>> {
    (0..QUEUE_SIZE)
        .map(|index| prop_oneof![3 => plausible_descriptor(index), 1 => any_descriptor()])
        .collect::<Vec<_>>()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn made_up_descriptor_tables_never_panic_and_every_change_is_marked(
        table in descriptor_table(),
        heads in prop::collection::vec(
            prop_oneof![(0..6u16).prop_map(|k| 3 * k), 0..QUEUE_SIZE + 4],
            1..=QUEUE_SIZE as usize,
        ),
        headers in prop::collection::vec(
            (prop_oneof![Just(VIRTIO_BLK_T_IN), Just(VIRTIO_BLK_T_OUT), 0..16u32], 0..SECTORS + 4),
            16,
        ),
    ) {
        let disk = Disk::new(BlockConfig::default());
        for (i, (kind, sector)) in headers.into_iter().enumerate() {
            write_header(&disk.memory, HEADER + 16 * i as u64, kind, sector);
        }
        for (i, desc) in table.into_iter().enumerate() {
            disk.memory.write_obj(desc, GuestAddress(DESC_TABLE + 16 * i as u64)).unwrap();
        }
        for (i, head) in heads.iter().enumerate() {
            disk.memory.write_obj(*head, GuestAddress(AVAIL_RING + 4 + 2 * i as u64)).unwrap();
        }
        disk.memory.write_obj(heads.len() as u16, GuestAddress(AVAIL_RING + 2)).unwrap();

        write_register(&disk.transport, VIRTIO_MMIO_QUEUE_NOTIFY, 0);

        let image = disk.image_bytes(0, IMAGE_LEN as usize);
        let unmarked_block_changed = image.chunks(CHANGED_BLOCK as usize).enumerate().any(|(block, bytes)| {
            let start = block as u64 * CHANGED_BLOCK;
            !disk.changed.is_marked(block as u64)
                && bytes.iter().enumerate().any(|(i, b)| *b != pattern(start + i as u64))
        });
        prop_assert_eq!(disk.image.metadata().unwrap().len(), IMAGE_LEN);
        prop_assert!(!unmarked_block_changed);
        prop_assert!(usize::from(used_idx(&disk.memory)) <= heads.len());
    }
}
