//! Disks of a running partition: image locking between VMs, backends handed in by the
//! integrator, requests in flight across pause, capture and restore, both I/O modes, and guests
//! that break their disk.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::Capture;
use partition::block::{BlockBackend, BlockError, GuestBuffer, RawImage};
use partition::{
    DiskConfig, DiskIo, Error, ExitReason, KernelImage, Partition, PartitionConfig, PartitionState,
};
use vm_memory::{Bytes, GuestAddress};
use vmms_guest::protocol::{self, BANNER, PROMPT, RECORD_SIZE, STATUS_GPA, StatusBlock};

const TIMEOUT: Duration = Duration::from_secs(30);
const DISK_BYTES: u64 = 4 << 20;

fn guest_config(disk: DiskConfig) -> PartitionConfig {
    let mut config = PartitionConfig::new(KernelImage::Bytes(Arc::from(vmms_guest::ELF)), "");
    config.memory_mib = 32;
    config.disks.push(disk);
    config
}

fn blank_disk(dir: &Path) -> PathBuf {
    let path = dir.join("disk.img");
    File::create(&path).unwrap().set_len(DISK_BYTES).unwrap();
    path
}

/// Types `command` on COM1 of a running test guest and waits for the reply's prompt; returns the
/// output after the echo.
fn run(vm: &Partition, out: &Capture, from: usize, command: &str) -> (String, usize) {
    vm.com1()
        .send_all(format!("{command}\r").as_bytes(), TIMEOUT)
        .unwrap();
    let echoed = out.wait_for(&format!("{command}\r\n"), from, TIMEOUT);
    let end = out.wait_for(PROMPT, echoed, TIMEOUT);
    (
        out.text()[echoed..end - PROMPT.len()].trim_end().to_owned(),
        end,
    )
}

/// Starts `vm` with COM1 captured and waits for the shell.
fn start(vm: &mut Partition) -> (Capture, usize) {
    let out = Capture::default();
    vm.com1().set_sink(Box::new(out.clone()));
    vm.resume().unwrap();
    let seen = out.wait_for(BANNER, 0, TIMEOUT);
    let seen = out.wait_for(PROMPT, seen, TIMEOUT);
    (out, seen)
}

#[test]
fn second_vm_on_a_writable_image_is_refused_as_locked() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let path = blank_disk(dir.path());
    let _first = Partition::new(guest_config(DiskConfig::new(&path))).unwrap();

    let second = Partition::new(guest_config(DiskConfig::new(&path))).unwrap_err();

    assert!(
        matches!(&second, Error::Block(BlockError::DiskLocked { path: p }) if *p == path),
        "{second:?}"
    );
    assert!(
        second
            .to_string()
            .contains("in use by another virtual machine")
    );
}

#[test]
fn image_is_free_again_once_its_vm_is_gone() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let path = blank_disk(dir.path());
    drop(Partition::new(guest_config(DiskConfig::new(&path))).unwrap());

    let again = Partition::new(guest_config(DiskConfig::new(&path)));

    assert!(again.is_ok());
}

/// A backend that counts the bytes it moves, over a raw image; optionally slow, so that a request
/// is almost always in flight (the polling guest waits for each one).
#[derive(Debug)]
struct Counting {
    inner: RawImage,
    written: AtomicU64,
    flushes: AtomicU64,
    write_delay: Duration,
}

impl Counting {
    fn open(path: &Path) -> Arc<Self> {
        Self::slow(path, Duration::ZERO)
    }

    fn slow(path: &Path, write_delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            inner: RawImage::open(path, false).unwrap(),
            written: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            write_delay,
        })
    }

    fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

impl BlockBackend for Counting {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read_at(&self, offset: u64, buf: &GuestBuffer<'_>) -> std::io::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &GuestBuffer<'_>) -> std::io::Result<()> {
        std::thread::sleep(self.write_delay);
        self.written.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.inner.write_at(offset, buf)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.inner.flush()
    }
}

#[test]
fn disk_given_as_a_backend_serves_the_guest_and_tracks_its_changes() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let path = blank_disk(dir.path());
    let backend = Counting::open(&path);
    let mut disk = DiskConfig::with_backend("counting", backend.clone());
    disk.changed_block_size = RECORD_SIZE as u64;
    let mut vm = Partition::new(guest_config(disk)).unwrap();
    let (out, seen) = start(&mut vm);
    vm.changed_blocks(0).unwrap().take();

    let (reply, _) = run(&vm, &out, seen, "write 20");

    let blocks: Vec<u64> = vm.changed_blocks(0).unwrap().take().iter().collect();
    assert_eq!(reply, "wrote 20 records, total 20");
    assert_eq!(backend.written(), 20 * RECORD_SIZE as u64);
    assert!(backend.flushes.load(Ordering::Relaxed) >= 1);
    assert_eq!(blocks, (0..20).collect::<Vec<_>>());
    vmms_guest::verify_records(File::open(&path).unwrap(), 20).unwrap();
}

#[test]
fn synchronous_disk_serves_the_guest_on_the_vcpu_with_the_same_results() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let path = blank_disk(dir.path());
    let mut disk = DiskConfig::new(&path);
    disk.io = DiskIo::Synchronous;
    disk.changed_block_size = RECORD_SIZE as u64;
    let mut vm = Partition::new(guest_config(disk)).unwrap();
    let (out, seen) = start(&mut vm);
    vm.changed_blocks(0).unwrap().take();

    let (reply, _) = run(&vm, &out, seen, "write 40");

    let blocks: Vec<u64> = vm.changed_blocks(0).unwrap().take().iter().collect();
    assert_eq!(reply, "wrote 40 records, total 40");
    assert_eq!(blocks, (0..40).collect::<Vec<_>>());
    vmms_guest::verify_records(File::open(&path).unwrap(), 40).unwrap();
}

fn status(vm: &Partition) -> StatusBlock {
    let mut bytes = [0u8; protocol::STATUS_BLOCK_SIZE];
    vm.memory()
        .read_slice(&mut bytes, GuestAddress(STATUS_GPA))
        .unwrap();
    StatusBlock::from_bytes(&bytes).unwrap()
}

/// Waits until the guest has appended more than `records` records.
fn wait_records_above(vm: &Partition, records: u64) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    while status(vm).records_written <= records {
        assert!(
            std::time::Instant::now() < deadline,
            "guest stopped writing"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Records of the long workloads below: long enough to pause in the middle many times.
const LONG_WRITE: u64 = 600;
/// How long each write takes in the workloads below: the guest spends most of its time waiting
/// for a request in flight, so that is where the pauses land.
const SLOW_WRITE: Duration = Duration::from_millis(1);

#[test]
fn requests_in_flight_at_each_pause_are_finished_once_and_none_is_left_waiting() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let path = blank_disk(dir.path());
    let backend = Counting::slow(&path, SLOW_WRITE);
    let mut vm = Partition::new(guest_config(DiskConfig::with_backend(
        "counting",
        backend.clone(),
    )))
    .unwrap();
    let (out, seen) = start(&mut vm);
    vm.com1()
        .send_all(format!("write {LONG_WRITE}\r").as_bytes(), TIMEOUT)
        .unwrap();

    let mut pauses = 0;
    let mut pending_at_a_pause = Vec::new();
    while status(&vm).records_written < LONG_WRITE && pauses < 50 {
        std::thread::sleep(Duration::from_millis(1));
        vm.pause().unwrap();
        let queue = vm.capture_state().unwrap().devices.disks[0]
            .transport
            .queues[0];
        let avail_idx: u16 = vm
            .memory()
            .read_obj(GuestAddress(queue.avail_ring + 2))
            .unwrap();
        if (avail_idx, queue.next_used) != (queue.next_avail, queue.next_avail) {
            pending_at_a_pause.push((avail_idx, queue.next_avail, queue.next_used));
        }
        pauses += 1;
        vm.resume().unwrap();
    }
    let reply = out.wait_for(
        &format!("wrote {LONG_WRITE} records, total {LONG_WRITE}"),
        seen,
        TIMEOUT,
    );

    assert!(reply > seen);
    assert!(pauses > 1, "the workload ended before a second pause");
    assert_eq!(pending_at_a_pause, []);
    assert_eq!(backend.written(), LONG_WRITE * RECORD_SIZE as u64);
    vmms_guest::verify_records(File::open(&path).unwrap(), LONG_WRITE).unwrap();
}

#[test]
fn guest_restored_from_a_capture_mid_workload_finishes_it_with_no_request_lost_or_repeated() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let path = blank_disk(dir.path());
    let before = Counting::slow(&path, SLOW_WRITE);
    let mut vm = Partition::new(guest_config(DiskConfig::with_backend(
        "counting",
        before.clone(),
    )))
    .unwrap();
    let (out, seen) = start(&mut vm);
    vm.com1()
        .send_all(format!("write {LONG_WRITE}\r").as_bytes(), TIMEOUT)
        .unwrap();
    wait_records_above(&vm, 16);
    vm.pause().unwrap();
    let records_at_pause = status(&vm).records_written;
    let state = vm.capture_state().unwrap().to_json().unwrap();
    let memory_path = dir.path().join("memory.bin");
    vm.save_memory(&mut File::create(&memory_path).unwrap())
        .unwrap();
    assert!(!out.text()[seen..].contains("wrote"));
    drop(vm);
    // The image stays locked while anything holds the first backend.
    let written_before = before.written();
    drop(before);

    let after = Counting::open(&path);
    let state = PartitionState::from_json(&state).unwrap();
    let mut restored = Partition::builder(guest_config(DiskConfig::with_backend(
        "counting",
        after.clone(),
    )))
    .restore(&state, &File::open(&memory_path).unwrap())
    .unwrap();
    let out = Capture::default();
    restored.com1().set_sink(Box::new(out.clone()));
    restored.resume().unwrap();
    out.wait_for(
        &format!("wrote {LONG_WRITE} records, total {LONG_WRITE}"),
        0,
        TIMEOUT,
    );

    assert!(records_at_pause > 0 && records_at_pause < LONG_WRITE);
    assert_eq!(
        written_before + after.written(),
        LONG_WRITE * RECORD_SIZE as u64
    );
    vmms_guest::verify_records(File::open(&path).unwrap(), LONG_WRITE).unwrap();
}

/// 64-bit guest code that drives the first virtio-mmio window by hand, the way a buggy or hostile
/// driver would. Encodings are spelled out next to each emitter.
#[derive(Default)]
struct BadDriver(Vec<u8>);

/// The first disk's register window (the partition's `VIRTIO_MMIO_BASE`).
const WINDOW: u32 = 0xd000_0000;
const STATUS_REGISTER: u8 = 0x70;
const QUEUE_NOTIFY: u8 = 0x50;
/// Where the hand-made queue lives, in guest RAM above the code.
const DESC_TABLE: u32 = 0x20_0000;
const AVAIL_RING: u32 = 0x20_1000;
const USED_RING: u32 = 0x20_2000;

impl BadDriver {
    /// Maps the 2 MiB page holding the window (the boot identity map covers only the first GiB)
    /// and points rbx at the window.
    fn map_window() -> Self {
        let mut code = Self::default();
        // mov eax, 0xc003; mov [0xa018], rax: PDPTE 3 -> a page directory at 0xc000.
        code.mov_eax(0xc003);
        code.store_rax(0xa018);
        // mov eax, WINDOW | 0x83; mov [0xc000 + 8 * 128], rax: a present, writable 2 MiB page.
        code.mov_eax(WINDOW | 0x83);
        code.store_rax(0xc000 + 8 * ((WINDOW - 0xc000_0000) >> 21));
        // mov rax, cr3; mov cr3, rax: flush the TLB.
        code.0
            .extend_from_slice(&[0x0f, 0x20, 0xd8, 0x0f, 0x22, 0xd8]);
        // mov ebx, WINDOW
        code.0.push(0xbb);
        code.0.extend_from_slice(&WINDOW.to_le_bytes());
        code
    }

    fn mov_eax(&mut self, value: u32) {
        self.0.push(0xb8);
        self.0.extend_from_slice(&value.to_le_bytes());
    }

    /// mov [addr], rax (absolute disp32).
    fn store_rax(&mut self, addr: u32) {
        self.0.extend_from_slice(&[0x48, 0x89, 0x04, 0x25]);
        self.0.extend_from_slice(&addr.to_le_bytes());
    }

    /// mov dword [addr], value (absolute disp32).
    fn store_ram(&mut self, addr: u32, value: u32) {
        self.0.extend_from_slice(&[0xc7, 0x04, 0x25]);
        self.0.extend_from_slice(&addr.to_le_bytes());
        self.0.extend_from_slice(&value.to_le_bytes());
    }

    /// mov dword [rbx + register], value.
    fn write_register(&mut self, register: u8, value: u32) {
        self.0.extend_from_slice(&[0xc7, 0x83, register, 0, 0, 0]);
        self.0.extend_from_slice(&value.to_le_bytes());
    }

    /// ACKNOWLEDGE, DRIVER, accept VERSION_1 only, FEATURES_OK.
    fn negotiate(&mut self) {
        self.write_register(STATUS_REGISTER, 1);
        self.write_register(STATUS_REGISTER, 3);
        self.write_register(0x24, 1); // DriverFeaturesSel = 1
        self.write_register(0x20, 1); // bit 32: VERSION_1
        self.write_register(STATUS_REGISTER, 0xb);
    }

    /// Queue 0 with 16 entries at DESC_TABLE, AVAIL_RING, USED_RING, enabled.
    fn setup_queue(&mut self) {
        self.write_register(0x30, 0); // QueueSel
        self.write_register(0x38, 16); // QueueNum
        self.write_register(0x80, DESC_TABLE);
        self.write_register(0x90, AVAIL_RING);
        self.write_register(0xa0, USED_RING);
        self.write_register(0x44, 1); // QueueReady
    }

    fn driver_ok(&mut self) {
        self.write_register(STATUS_REGISTER, 0xf);
    }

    /// Waits until Status shows DEVICE_NEEDS_RESET, prints `R` on COM1 and powers off.
    fn report_needs_reset(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&[
            0x8b,
            0x43,
            STATUS_REGISTER, // wait: mov eax, [rbx + 0x70]
            0xa9,
            0x40,
            0,
            0,
            0, //          test eax, 0x40 (NEEDS_RESET)
            0x74,
            0xf6, //                   jz wait
            0x66,
            0xba,
            0xf8,
            0x03, //       mov dx, 0x3f8
            0xb0,
            b'R', //                   mov al, 'R'
            0xee, //                         out dx, al
            0x66,
            0xba,
            0x04,
            0x06, //       mov dx, 0x604
            0x66,
            0xb8,
            0x00,
            0x20, //       mov ax, 0x2000 (SLP_EN)
            0x66,
            0xef, //                   out dx, ax
            0xeb,
            0xfe, //                   jmp $
        ]);
        self.0
    }
}

/// Runs `code` with one disk served in `io` mode; returns what it printed and how it ended.
fn run_bad_driver(code: &[u8], io: DiskIo) -> (String, ExitReason, bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = blank_disk(dir.path());
    let mut config =
        PartitionConfig::new(KernelImage::Bytes(Arc::from(common::tiny_elf(code))), "");
    config.memory_mib = 32;
    let mut disk = DiskConfig::new(&path);
    disk.io = io;
    config.disks.push(disk);
    let mut vm = Partition::new(config).unwrap();
    let out = Capture::default();
    vm.com1().set_sink(Box::new(out.clone()));
    vm.resume().unwrap();
    let reason = vm.wait(Some(TIMEOUT)).expect("the guest never powered off");
    let untouched = std::fs::read(&path).unwrap().iter().all(|&b| b == 0);
    (out.text(), reason, untouched)
}

#[test]
fn guest_notifying_a_queue_it_never_set_up_gets_the_disk_marked_needs_reset() {
    require_kvm!();
    for io in [DiskIo::IoThread, DiskIo::Synchronous] {
        let mut driver = BadDriver::map_window();
        driver.negotiate();
        driver.driver_ok();
        driver.write_register(QUEUE_NOTIFY, 0);

        let (output, reason, untouched) = run_bad_driver(&driver.report_needs_reset(), io);

        assert_eq!(output, "R", "{io:?}");
        assert_eq!(reason, ExitReason::PowerOff, "{io:?}");
        assert!(untouched, "{io:?}");
    }
}

#[test]
fn guest_posting_a_chain_outside_its_memory_gets_the_disk_marked_needs_reset() {
    require_kvm!();
    for io in [DiskIo::IoThread, DiskIo::Synchronous] {
        let mut driver = BadDriver::map_window();
        driver.negotiate();
        driver.setup_queue();
        driver.driver_ok();
        // Descriptor 0: 16 device-readable bytes at 2 GiB, far past the guest's 32 MiB.
        driver.mov_eax(0x8000_0000);
        driver.store_rax(DESC_TABLE);
        driver.store_ram(DESC_TABLE + 8, 16);
        // Available ring: flags 0, idx 1 (ring[0] = descriptor 0 is already zero).
        driver.store_ram(AVAIL_RING, 1 << 16);
        driver.write_register(QUEUE_NOTIFY, 0);

        let (output, reason, untouched) = run_bad_driver(&driver.report_needs_reset(), io);

        assert_eq!(output, "R", "{io:?}");
        assert_eq!(reason, ExitReason::PowerOff, "{io:?}");
        assert!(untouched, "{io:?}");
    }
}
