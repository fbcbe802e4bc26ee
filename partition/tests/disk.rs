//! Disks of a running partition: image locking between VMs and backends handed in by the
//! integrator.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::Capture;
use partition::block::{BlockBackend, BlockError, GuestBuffer, RawImage};
use partition::{DiskConfig, Error, KernelImage, Partition, PartitionConfig};
use vmms_guest::protocol::{BANNER, PROMPT, RECORD_SIZE};

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

/// A backend that counts the bytes it moves, over a raw image.
#[derive(Debug)]
struct Counting {
    inner: RawImage,
    written: AtomicU64,
    flushes: AtomicU64,
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
    let backend = Arc::new(Counting {
        inner: RawImage::open(&path, false).unwrap(),
        written: AtomicU64::new(0),
        flushes: AtomicU64::new(0),
    });
    let mut disk = DiskConfig::with_backend("counting", backend.clone());
    disk.changed_block_size = RECORD_SIZE as u64;
    let mut vm = Partition::new(guest_config(disk)).unwrap();
    let (out, seen) = start(&mut vm);
    vm.changed_blocks(0).unwrap().take();

    let (reply, _) = run(&vm, &out, seen, "write 20");

    let blocks: Vec<u64> = vm.changed_blocks(0).unwrap().take().iter().collect();
    assert_eq!(reply, "wrote 20 records, total 20");
    assert_eq!(
        backend.written.load(Ordering::Relaxed),
        20 * RECORD_SIZE as u64
    );
    assert!(backend.flushes.load(Ordering::Relaxed) >= 1);
    assert_eq!(blocks, (0..20).collect::<Vec<_>>());
    vmms_guest::verify_records(File::open(&path).unwrap(), 20).unwrap();
}
