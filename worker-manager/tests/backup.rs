//! A backup's capture and merge of a running guest's disks, done by its worker, and the change
//! tracking (Resilient Change Tracking) that makes the next backup incremental: the image below
//! the capture's overlay is frozen at the capture while the guest writes on, the merge brings
//! every later write back into it, the reported changed blocks are exactly the guest's writes
//! since the previous capture, and the tracking survives clean stops and saves but not a killed
//! worker.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use common::images::{assert_clean, qemu_img};
use common::{Console, Fixture, TIMEOUT, counter};
use vmm_core::integration::{
    BackupCaptureReport, BackupCaptureRequest, BackupMergeRequest, ChangedBlocks, ReferencePointId,
};
use vmm_core::{
    DiskConfig, DiskOverlay, LaunchMode, VmConfig, Worker, WorkerError, WorkerLauncher,
};
use vmms_guest::protocol::{BANNER, RECORD_SIZE};
use worker_manager::{LauncherOptions, ProcessLauncher};

/// A defined VM with one 4 MiB qcow2 disk.
struct Vm {
    config: VmConfig,
    dir: PathBuf,
}

impl Vm {
    fn new(fixture: &Fixture, name: &str) -> Vm {
        let mut config = VmConfig::new(name);
        config.memory_mib = 16;
        config.disks = vec![DiskConfig {
            path: "disk0.qcow2".into(),
            read_only: false,
        }];
        fixture.define(&config);
        let dir = fixture.dir.path().join("vms").join(config.id.to_string());
        let disk = dir.join("disks/disk0.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", disk.to_str().unwrap(), "4M"]);
        Vm { config, dir }
    }

    fn image(&self) -> PathBuf {
        self.dir.join("disks/disk0.qcow2")
    }

    fn overlay(&self, name: &str) -> PathBuf {
        self.dir.join("disks").join(format!("disk0-{name}.qcow2"))
    }

    fn capture(&self, name: &str, reference: ReferencePointId) -> BackupCaptureRequest {
        BackupCaptureRequest {
            overlays: vec![DiskOverlay {
                disk: 0,
                path: self.overlay(name),
            }],
            reference,
        }
    }

    fn merge(&self, name: &str, keep_reference: bool) -> BackupMergeRequest {
        BackupMergeRequest {
            overlays: vec![DiskOverlay {
                disk: 0,
                path: self.overlay(name),
            }],
            keep_reference,
        }
    }

    fn tracking_file(&self) -> PathBuf {
        self.dir.join("change-tracking.json")
    }
}

/// The guest's console with a running count of the records it wrote.
struct Guest {
    console: Console,
    records: u64,
}

impl Guest {
    fn attach(fixture: &Fixture, vm: &Vm, records: u64) -> Guest {
        let mut console =
            Console::attach(&fixture.launcher.runtime_dir(vm.config.id).console_socket());
        console.wait_for(BANNER, 0);
        Guest { console, records }
    }

    /// Appends `count` records; returns their sequence numbers.
    fn write(&mut self, count: u64) -> std::ops::Range<u64> {
        let from = self.console.text().len();
        let total = self.records + count;
        self.console.send(&format!("write {count}\r"));
        self.console
            .wait_for(&format!("wrote {count} records, total {total}"), from);
        let written = self.records..total;
        self.records = total;
        written
    }
}

/// The guest writing records without pause on another thread until told to stop.
struct BusyGuest {
    stop: Arc<AtomicBool>,
    writer: JoinHandle<Guest>,
}

impl BusyGuest {
    fn start(mut guest: Guest) -> BusyGuest {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let writer = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                guest.write(2);
            }
            guest
        });
        BusyGuest { stop, writer }
    }

    /// Stops the writer after its current command; the guest and its record count.
    fn stop(self) -> Guest {
        self.stop.store(true, Ordering::Relaxed);
        self.writer.join().expect("the writer thread")
    }
}

/// Waits until `vm`'s guest reports more than `records` records written.
fn wait_records_beyond(fixture: &Fixture, vm: &Vm, records: u64) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let report = fixture
            .launcher
            .report(vm.config.id, TIMEOUT)
            .unwrap()
            .unwrap();
        if report.test_guest.unwrap().records > records {
            return;
        }
        assert!(Instant::now() < deadline, "the guest does not write");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The valid records at the start of `image`, read while a worker may hold it open (`-U`).
fn records_in(image: &Path) -> u64 {
    let raw = image.with_extension("read.raw");
    let _ = fs::remove_file(&raw);
    qemu_img(&[
        "convert",
        "-U",
        "-O",
        "raw",
        image.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let count = vmms_guest::count_records(fs::File::open(&raw).unwrap()).unwrap();
    fs::remove_file(&raw).unwrap();
    count
}

/// The indices of the blocks `changes` marks.
fn changed(changes: &ChangedBlocks) -> BTreeSet<u64> {
    let blocks = changes.disk_size.div_ceil(changes.block_size);
    (0..blocks).filter(|&b| changes.is_changed(b)).collect()
}

/// The blocks of `block_size` that records `seqs` occupy.
fn blocks_of(seqs: impl IntoIterator<Item = u64>, block_size: u64) -> BTreeSet<u64> {
    seqs.into_iter()
        .map(|seq| seq * RECORD_SIZE as u64 / block_size)
        .collect()
}

fn capture(worker: &dyn Worker, request: &BackupCaptureRequest) -> BackupCaptureReport {
    worker
        .backup_capture(request)
        .unwrap_or_else(|e| panic!("capture: {e:?}"))
}

fn wait_counter_moves(fixture: &Fixture, vm: &Vm) {
    let start = counter(&fixture.launcher, vm.config.id);
    let deadline = Instant::now() + TIMEOUT;
    while counter(&fixture.launcher, vm.config.id) <= start {
        assert!(Instant::now() < deadline, "the guest counter does not move");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn capture_freezes_the_image_and_merge_brings_later_writes_back_while_the_guest_runs() {
    require_kvm!();
    let fixture = Fixture::new();
    let vm = Vm::new(&fixture, "capture");
    let worker = fixture.boot(&vm.config);
    let mut guest = Guest::attach(&fixture, &vm, 0);
    guest.write(20);
    let first = ReferencePointId::new_random();

    let report = capture(worker.as_ref(), &vm.capture("b1", first));
    wait_counter_moves(&fixture, &vm);
    guest.write(44);
    let image_while_captured = records_in(&vm.image());
    let again = worker.backup_capture(&vm.capture("b1x", ReferencePointId::new_random()));
    worker.backup_merge(&vm.merge("b1", true)).unwrap();
    let after_merge = records_in(&vm.image());
    worker.backup_merge(&vm.merge("b1", true)).unwrap();
    guest.write(4);
    worker.turn_off().unwrap();

    assert_eq!(report.previous_reference, None);
    assert_eq!(
        report.untracked_reason.as_deref(),
        Some("no reference point yet")
    );
    assert_eq!(report.changes.len(), 1);
    assert!(report.quiesce < std::time::Duration::from_secs(5));
    assert_eq!(image_while_captured, 20, "the captured image changed");
    assert!(
        matches!(again, Err(WorkerError::InvalidState { .. })),
        "{again:?}"
    );
    assert!(!vm.overlay("b1x").exists());
    assert_eq!(after_merge, 64, "the merge lost the guest's later writes");
    assert!(!vm.overlay("b1").exists(), "the overlay was not removed");
    assert_eq!(records_in(&vm.image()), 68, "writes after the merge");
    assert_clean(&vm.image());
}

#[test]
fn changed_blocks_are_exactly_the_writes_since_the_previous_capture() {
    require_kvm!();
    let fixture = Fixture::new();
    let vm = Vm::new(&fixture, "changes");
    let worker = fixture.boot(&vm.config);
    let mut guest = Guest::attach(&fixture, &vm, 0);
    let before_first = guest.write(40);
    let first = ReferencePointId::new_random();
    let second = ReferencePointId::new_random();

    let full = capture(worker.as_ref(), &vm.capture("b1", first));
    let during_first = guest.write(10);
    worker.backup_merge(&vm.merge("b1", true)).unwrap();
    let after_first = guest.write(30);
    let incremental = capture(worker.as_ref(), &vm.capture("b2", second));
    worker.backup_merge(&vm.merge("b2", true)).unwrap();
    worker.turn_off().unwrap();

    let block = full.changes[0].block_size;
    assert_eq!(changed(&full.changes[0]), blocks_of(before_first, block));
    assert_eq!(incremental.previous_reference, Some(first));
    assert_eq!(incremental.untracked_reason, None);
    assert_eq!(
        changed(&incremental.changes[0]),
        blocks_of(during_first.chain(after_first), block)
    );
    assert_eq!(records_in(&vm.image()), 80);
    assert_clean(&vm.image());
}

#[test]
fn tracking_survives_a_clean_stop_and_a_save_but_not_a_killed_worker() {
    require_kvm!();
    let fixture = Fixture::new();
    let vm = Vm::new(&fixture, "persist");
    let first = ReferencePointId::new_random();
    let worker = fixture.boot(&vm.config);
    let mut guest = Guest::attach(&fixture, &vm, 0);
    guest.write(40);
    capture(worker.as_ref(), &vm.capture("b1", first));
    worker.backup_merge(&vm.merge("b1", true)).unwrap();
    let before_stop = guest.write(10);
    worker.turn_off().unwrap();
    let clean_file = fs::read_to_string(vm.tracking_file()).unwrap();

    // A clean stop and start, then a save and restore.
    let worker = fixture.boot(&vm.config);
    let mut guest = Guest::attach(&fixture, &vm, 50);
    let before_save = guest.write(10);
    let (staging, state_dir) = fixture.save_paths(vm.config.id);
    worker.save(&staging, &state_dir).unwrap();
    let worker = fixture
        .launcher
        .launch(
            &vm.config,
            LaunchMode::RestoreSaved {
                state_dir: state_dir.clone(),
            },
            fixture.sink(),
        )
        .expect("restore");
    let mut guest = Guest {
        console: Console::attach(&fixture.launcher.runtime_dir(vm.config.id).console_socket()),
        records: 60,
    };
    let after_restore = guest.write(10);
    let second = ReferencePointId::new_random();
    let incremental = capture(worker.as_ref(), &vm.capture("b2", second));
    worker.backup_merge(&vm.merge("b2", true)).unwrap();

    // A worker killed with -9: its tracking cannot be trusted.
    // SAFETY: kill only sends a signal to the worker this test started.
    unsafe { libc::kill(worker.pid() as i32, libc::SIGKILL) };
    fixture.next_event();
    let _ = worker.turn_off();
    let worker = fixture.boot(&vm.config);
    let after_kill = capture(
        worker.as_ref(),
        &vm.capture("b3", ReferencePointId::new_random()),
    );
    worker.backup_merge(&vm.merge("b3", false)).unwrap();
    let after_abort = capture(
        worker.as_ref(),
        &vm.capture("b4", ReferencePointId::new_random()),
    );
    worker.backup_merge(&vm.merge("b4", true)).unwrap();
    worker.turn_off().unwrap();

    assert!(clean_file.contains("\"clean\":true"), "{clean_file}");
    assert_eq!(incremental.previous_reference, Some(first));
    let block = incremental.changes[0].block_size;
    assert_eq!(
        changed(&incremental.changes[0]),
        blocks_of(before_stop.chain(before_save).chain(after_restore), block),
        "changes since the first capture, across a clean stop and a save"
    );
    assert_eq!(after_kill.previous_reference, None);
    assert_eq!(
        after_kill.untracked_reason.as_deref(),
        Some("the VM stopped uncleanly")
    );
    assert_eq!(after_abort.previous_reference, None);
    assert_eq!(
        after_abort.untracked_reason.as_deref(),
        Some("the previous backup was aborted")
    );
    assert_eq!(records_in(&vm.image()), 70);
    assert_clean(&vm.image());
}

#[test]
fn failed_capture_leaves_the_disk_its_tracking_and_no_overlay() {
    require_kvm!();
    let fixture = Fixture::new();
    let vm = Vm::new(&fixture, "failed");
    let worker = fixture.boot(&vm.config);
    let mut guest = Guest::attach(&fixture, &vm, 0);
    guest.write(20);
    let first = ReferencePointId::new_random();
    capture(worker.as_ref(), &vm.capture("b1", first));
    worker.backup_merge(&vm.merge("b1", true)).unwrap();
    let since_first = guest.write(20);
    fs::write(vm.overlay("taken"), b"someone else's file").unwrap();
    let mut nowhere = vm.capture("nowhere", ReferencePointId::new_random());
    nowhere.overlays[0].path = vm.dir.join("missing/disk0-nowhere.qcow2");

    let exists = worker.backup_capture(&vm.capture("taken", ReferencePointId::new_random()));
    let uncreatable = worker.backup_capture(&nowhere);
    let more = guest.write(5);
    let next = capture(
        worker.as_ref(),
        &vm.capture("b2", ReferencePointId::new_random()),
    );
    worker.backup_merge(&vm.merge("b2", true)).unwrap();
    worker.turn_off().unwrap();

    assert!(exists.is_err(), "{exists:?}");
    assert!(uncreatable.is_err(), "{uncreatable:?}");
    assert_eq!(
        fs::read(vm.overlay("taken")).unwrap(),
        b"someone else's file"
    );
    assert!(!nowhere.overlays[0].path.exists());
    assert_eq!(
        next.previous_reference,
        Some(first),
        "the reference point moved"
    );
    let block = next.changes[0].block_size;
    assert_eq!(
        changed(&next.changes[0]),
        blocks_of(since_first.chain(more), block),
        "the failed captures lost or took tracked blocks"
    );
    assert_eq!(records_in(&vm.image()), 45);
    assert_clean(&vm.image());
}

#[test]
fn busy_guest_loses_no_record_through_capture_and_merge() {
    require_kvm!();
    let fixture = Fixture::new();
    let vm = Vm::new(&fixture, "busy");
    let worker = fixture.boot(&vm.config);
    let mut guest = Guest::attach(&fixture, &vm, 0);
    guest.write(8);
    let busy = BusyGuest::start(guest);
    wait_records_beyond(&fixture, &vm, 10);

    let report = capture(
        worker.as_ref(),
        &vm.capture("b1", ReferencePointId::new_random()),
    );
    let at_capture = records_in(&vm.image());
    wait_records_beyond(&fixture, &vm, at_capture + 10);
    let still = records_in(&vm.image());
    worker.backup_merge(&vm.merge("b1", true)).unwrap();
    wait_records_beyond(&fixture, &vm, records_in(&vm.image()) + 4);
    let guest = busy.stop();
    worker.turn_off().unwrap();
    let log = fs::read_to_string(fixture.launcher.runtime_dir(vm.config.id).log_file()).unwrap();
    for line in log.lines().filter(|l| l.contains("backup")) {
        eprintln!("{line}");
    }

    assert!(at_capture >= 10, "records before the capture: {at_capture}");
    assert_eq!(still, at_capture, "the captured image changed");
    let block = report.changes[0].block_size;
    assert_eq!(
        changed(&report.changes[0]),
        blocks_of(0..at_capture, block),
        "the capture's changes are the records up to it"
    );
    assert!(!vm.overlay("b1").exists());
    assert_eq!(records_in(&vm.image()), guest.records, "a record was lost");
    assert_clean(&vm.image());
}

/// A launcher whose workers run with `VMMS_FAULT=<step>` (through `env`).
fn launcher_dying_at(fixture: &Fixture, step: &str) -> ProcessLauncher {
    ProcessLauncher::new(
        fixture.dir.path(),
        "/usr/bin/env",
        [
            format!("{}={step}", vmm_core::fault::FAULT_ENV),
            env!("CARGO_BIN_EXE_vmms-worker").to_owned(),
        ],
    )
    .with_options(LauncherOptions::default())
}

#[test]
fn worker_killed_during_the_merge_leaves_a_chain_an_offline_commit_finishes() {
    require_kvm!();
    let fixture = Fixture::new();
    let launcher = launcher_dying_at(&fixture, "worker.backup.merge-before-pause");
    let vm = Vm::new(&fixture, "killed");
    let worker = launcher
        .launch(&vm.config, LaunchMode::Boot, fixture.sink())
        .expect("launch");
    let mut guest = Guest {
        console: Console::attach(&launcher.runtime_dir(vm.config.id).console_socket()),
        records: 0,
    };
    guest.console.wait_for(BANNER, 0);
    guest.write(10);
    capture(
        worker.as_ref(),
        &vm.capture("b1", ReferencePointId::new_random()),
    );
    guest.write(30);

    let merged = worker.backup_merge(&vm.merge("b1", true));
    let _ = worker.turn_off();
    snapshot::commit_into_backing(&vm.overlay("b1"), &mut snapshot::NoProgress).unwrap();
    fs::remove_file(vm.overlay("b1")).unwrap();
    let worker = fixture.boot(&vm.config);
    let next = capture(
        worker.as_ref(),
        &vm.capture("b2", ReferencePointId::new_random()),
    );
    worker.backup_merge(&vm.merge("b2", true)).unwrap();
    worker.turn_off().unwrap();

    assert!(merged.is_err(), "{merged:?}");
    assert_eq!(records_in(&vm.image()), 40);
    assert_clean(&vm.image());
    assert_eq!(next.previous_reference, None);
    assert_eq!(
        next.untracked_reason.as_deref(),
        Some("the VM stopped uncleanly")
    );
}

#[test]
fn tracking_carries_on_across_a_reset_and_a_guest_power_off() {
    require_kvm!();
    let fixture = Fixture::new();
    let vm = Vm::new(&fixture, "reset");
    let first = ReferencePointId::new_random();
    let worker = fixture.boot(&vm.config);
    let mut guest = Guest::attach(&fixture, &vm, 0);
    guest.write(40);
    capture(worker.as_ref(), &vm.capture("b1", first));
    worker.backup_merge(&vm.merge("b1", true)).unwrap();
    let before_reset = guest.write(10);
    let from = guest.console.text().len();
    worker.reset().unwrap();
    // The rebooted guest prints its banner again on the same console.
    guest.console.wait_for(BANNER, from);
    let after_reset = guest.write(10);
    guest.console.send("halt\r");
    fixture.next_event();
    worker.turn_off().unwrap();

    let worker = fixture.boot(&vm.config);
    let mut guest = Guest::attach(&fixture, &vm, 60);
    let after_power_off = guest.write(10);
    let next = capture(
        worker.as_ref(),
        &vm.capture("b2", ReferencePointId::new_random()),
    );
    worker.backup_merge(&vm.merge("b2", true)).unwrap();
    worker.turn_off().unwrap();

    assert_eq!(next.previous_reference, Some(first));
    let block = next.changes[0].block_size;
    assert_eq!(
        changed(&next.changes[0]),
        blocks_of(
            before_reset.chain(after_reset).chain(after_power_off),
            block
        )
    );
    assert_eq!(records_in(&vm.image()), 70);
}

#[test]
fn merge_after_the_guest_powered_off_commits_the_overlay_and_an_abort_drops_tracking() {
    require_kvm!();
    let fixture = Fixture::new();
    let vm = Vm::new(&fixture, "off");
    let worker = fixture.boot(&vm.config);
    let mut guest = Guest::attach(&fixture, &vm, 0);
    guest.write(10);
    capture(
        worker.as_ref(),
        &vm.capture("b1", ReferencePointId::new_random()),
    );
    guest.write(20);
    guest.console.send("halt\r");
    fixture.next_event();

    let merged = worker.backup_merge(&vm.merge("b1", false));
    worker.turn_off().unwrap();
    let worker = fixture.boot(&vm.config);
    let next = capture(
        worker.as_ref(),
        &vm.capture("b2", ReferencePointId::new_random()),
    );
    worker.backup_merge(&vm.merge("b2", true)).unwrap();
    worker.turn_off().unwrap();

    merged.unwrap();
    assert!(!vm.overlay("b1").exists());
    assert_eq!(records_in(&vm.image()), 30);
    assert_clean(&vm.image());
    assert_eq!(next.previous_reference, None);
    assert_eq!(
        next.untracked_reason.as_deref(),
        Some("the previous backup was aborted")
    );
}

#[test]
fn capture_and_merge_of_a_paused_guest_leave_it_paused() {
    require_kvm!();
    let fixture = Fixture::new();
    let vm = Vm::new(&fixture, "paused");
    let worker = fixture.boot(&vm.config);
    let mut guest = Guest::attach(&fixture, &vm, 0);
    guest.write(10);
    worker.pause().unwrap();

    capture(
        worker.as_ref(),
        &vm.capture("b1", ReferencePointId::new_random()),
    );
    let after_capture = worker.status();
    worker.backup_merge(&vm.merge("b1", true)).unwrap();
    let after_merge = worker.status();
    worker.resume().unwrap();
    guest.write(5);
    worker.turn_off().unwrap();

    assert_eq!(after_capture, vmm_core::WorkerStatus::Paused);
    assert_eq!(after_merge, vmm_core::WorkerStatus::Paused);
    assert!(!vm.overlay("b1").exists());
    assert_eq!(records_in(&vm.image()), 15);
}
