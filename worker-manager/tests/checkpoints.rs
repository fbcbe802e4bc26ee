//! Checkpoints of a running guest, taken by its worker: the guest keeps running, its disks move
//! to overlays in one short pause, memory is pre-copied (a second checkpoint writes a delta), and
//! a new worker restored from the checkpoint continues exactly where it was taken. A worker
//! killed at any step leaves the old images intact and no half-made state folder.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::images::{assert_clean, count_records, qemu_img};
use common::{Console, Fixture, counter, wait_until};
use vmm_core::{
    CheckpointReport, CheckpointRequest, DiskConfig, DiskOverlay, LaunchMode, VmConfig, Worker,
    WorkerError, WorkerLauncher,
};
use vmms_guest::protocol::{BANNER, STATUS_BLOCK_SIZE, STATUS_GPA, StatusBlock};
use worker_manager::{LauncherOptions, MEMORY_MANIFEST, MemoryManifest, ProcessLauncher};

/// A defined VM with one qcow2 disk made by `qemu-img create`.
struct Vm {
    config: VmConfig,
    dir: PathBuf,
}

impl Vm {
    fn new(fixture: &Fixture, name: &str, memory_mib: u64) -> Vm {
        let mut config = VmConfig::new(name);
        config.memory_mib = memory_mib;
        config.disks = vec![DiskConfig {
            path: "disk0.qcow2".into(),
            read_only: false,
        }];
        fixture.define(&config);
        let dir = fixture.dir.path().join("vms").join(config.id.to_string());
        fs::create_dir_all(dir.join("checkpoints")).unwrap();
        let disk = dir.join("disks/disk0.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", disk.to_str().unwrap(), "4M"]);
        Vm { config, dir }
    }

    fn disk(&self, name: &str) -> PathBuf {
        self.dir.join("disks").join(name)
    }

    /// The request for checkpoint `name`: staging and state under `checkpoints/`, the disk's
    /// overlay `disks/disk0-<name>.qcow2`.
    fn request(&self, name: &str, parent: Option<&Path>) -> CheckpointRequest {
        let staging = self
            .dir
            .join("checkpoints")
            .join(format!(".{name}.staging"));
        fs::create_dir(&staging).unwrap();
        CheckpointRequest {
            staging,
            state_dir: self.dir.join("checkpoints").join(name),
            parent_state_dir: parent.map(Path::to_path_buf),
            overlays: vec![DiskOverlay {
                disk: 0,
                path: self.disk(&format!("disk0-{name}.qcow2")),
            }],
            content: vmm_core::CheckpointContent::SavedState,
        }
    }

    /// Points the VM's disk at `name` (in `disks/`).
    fn use_disk(&mut self, fixture: &Fixture, name: &str) {
        self.config.disks[0].path = name.into();
        fixture.define(&self.config);
    }
}

/// Boots `vm`, waits for the banner and writes `records` records.
fn boot_with_records(fixture: &Fixture, vm: &Vm, records: u64) -> (Box<dyn Worker>, Console) {
    let worker = fixture.boot(&vm.config);
    let mut console = Console::attach(&fixture.launcher.runtime_dir(vm.config.id).console_socket());
    let at = console.wait_for(BANNER, 0);
    write_records(&mut console, records, records, at);
    (worker, console)
}

fn write_records(console: &mut Console, count: u64, total: u64, from: usize) -> usize {
    console.send(&format!("write {count}\r"));
    console.wait_for(&format!("wrote {count} records, total {total}"), from)
}

/// The test guest's status block in a committed state folder's memory (newest layer that has
/// the page wins).
fn saved_status(state_dir: &Path) -> StatusBlock {
    let manifest = MemoryManifest::read(state_dir)
        .unwrap()
        .expect("a manifest");
    for layer in manifest.layers.iter().rev() {
        let image = fs::read(state_dir.join(layer)).unwrap();
        let at = STATUS_GPA as usize;
        if let Some(block) = StatusBlock::from_bytes(&image[at..at + STATUS_BLOCK_SIZE])
            && block.counter != 0
        {
            return block;
        }
    }
    panic!("no layer of {} holds the status block", state_dir.display());
}

/// Copies a committed state folder to the VM's `state/` (as a service applying the checkpoint
/// would, with hard links) and restores a new worker from it.
fn restore_from(fixture: &Fixture, vm: &Vm, state_dir: &Path) -> Box<dyn Worker> {
    let state = vm.dir.join("state");
    fs::create_dir(&state).unwrap();
    for entry in fs::read_dir(state_dir).unwrap() {
        let entry = entry.unwrap();
        fs::hard_link(entry.path(), state.join(entry.file_name())).unwrap();
    }
    fixture
        .launcher
        .launch(
            &vm.config,
            LaunchMode::RestoreSaved { state_dir: state },
            fixture.sink(),
        )
        .expect("restore from the checkpoint")
}

fn take(worker: &dyn Worker, request: &CheckpointRequest) -> CheckpointReport {
    worker.checkpoint(request).expect("checkpoint")
}

#[test]
fn running_checkpoint_keeps_the_guest_running_and_moves_later_writes_to_the_overlay() {
    require_kvm!();
    let fixture = Fixture::new();
    let vm = Vm::new(&fixture, "running", 16);
    let (worker, mut console) = boot_with_records(&fixture, &vm, 3);
    let request = vm.request("cp1", None);

    let report = worker.checkpoint(&request).unwrap_or_else(|e| {
        let log = fs::read_to_string(fixture.launcher.runtime_dir(vm.config.id).log_file());
        panic!("checkpoint: {e:?}\n{log:?}")
    });
    let at_checkpoint = counter(&fixture.launcher, vm.config.id);
    wait_until("the guest counter advances after the checkpoint", || {
        counter(&fixture.launcher, vm.config.id) > at_checkpoint
    });
    let from = console.text().len();
    write_records(&mut console, 2, 5, from);
    worker.turn_off().unwrap();

    let overlay = &request.overlays[0].path;
    assert!(!request.staging.exists(), "staging was committed");
    assert!(request.state_dir.join("state.json").is_file());
    assert!(request.state_dir.join(MEMORY_MANIFEST).is_file());
    assert!(!report.delta);
    assert!(report.memory_bytes > 0);
    assert!(report.pause <= report.total);
    assert_clean(&vm.disk("disk0.qcow2"));
    assert_clean(overlay);
    assert_eq!(
        count_records(&vm.disk("disk0.qcow2")),
        3,
        "old image changed"
    );
    assert_eq!(count_records(overlay), 5);
    let chain = qemu_img(&["info", "--backing-chain", overlay.to_str().unwrap()]);
    assert!(chain.contains("disk0.qcow2"), "{chain}");
}

#[test]
fn restored_checkpoint_continues_the_counter_and_holds_exactly_its_records() {
    require_kvm!();
    let fixture = Fixture::new();
    let mut vm = Vm::new(&fixture, "restore", 16);
    let (worker, mut console) = boot_with_records(&fixture, &vm, 3);
    let request = vm.request("cp1", None);
    take(worker.as_ref(), &request);
    let from = console.text().len();
    write_records(&mut console, 4, 7, from);
    worker.turn_off().unwrap();
    let saved = saved_status(&request.state_dir);
    // The checkpoint's layers under a fresh overlay, as applying it lays them out.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "disk0.qcow2",
        "-F",
        "qcow2",
        vm.disk("applied.qcow2").to_str().unwrap(),
    ]);
    vm.use_disk(&fixture, "applied.qcow2");

    let restored = restore_from(&fixture, &vm, &request.state_dir);
    let after = counter(&fixture.launcher, vm.config.id);
    let mut console = Console::attach(&fixture.launcher.runtime_dir(vm.config.id).console_socket());
    write_records(&mut console, 1, 4, 0);
    restored.turn_off().unwrap();

    assert_eq!(saved.records_written, 3);
    assert!(
        after >= saved.counter,
        "restored counter {after} is below the checkpoint's {}",
        saved.counter
    );
    assert_clean(&vm.disk("applied.qcow2"));
    assert_eq!(count_records(&vm.disk("applied.qcow2")), 4);
}

#[test]
fn second_checkpoint_writes_a_small_delta_that_restores_exactly() {
    require_kvm!();
    let fixture = Fixture::new();
    let mut vm = Vm::new(&fixture, "delta", 64);
    let (worker, mut console) = boot_with_records(&fixture, &vm, 2);
    // Give the first checkpoint something to copy: 8 MiB of guest memory written.
    let from = console.text().len();
    console.send("dirty 2048\r");
    console.wait_for("dirtied 2048 pages", from);
    let first = vm.request("cp1", None);
    let first_report = take(worker.as_ref(), &first);
    let from = console.text().len();
    write_records(&mut console, 1, 3, from);
    let second = vm.request("cp2", Some(&first.state_dir));

    let second_report = take(worker.as_ref(), &second);
    worker.turn_off().unwrap();
    let saved = saved_status(&second.state_dir);
    let manifest = MemoryManifest::read(&second.state_dir).unwrap().unwrap();
    vm.use_disk(&fixture, "disk0-cp2.qcow2");
    // The guest ran on the second overlay after the checkpoint: start from a fresh one on it.
    let top = vm.disk("disk0-cp2.qcow2");
    fs::remove_file(&top).unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "disk0-cp1.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    let restored = restore_from(&fixture, &vm, &second.state_dir);
    let after = counter(&fixture.launcher, vm.config.id);
    let mut console = Console::attach(&fixture.launcher.runtime_dir(vm.config.id).console_socket());
    write_records(&mut console, 1, 4, 0);
    restored.turn_off().unwrap();

    assert!(!first_report.delta);
    assert!(second_report.delta, "{second_report:?}");
    assert!(
        second_report.memory_bytes * 8 < first_report.memory_bytes,
        "delta {} bytes vs full {} bytes",
        second_report.memory_bytes,
        first_report.memory_bytes
    );
    assert_eq!(manifest.layers, ["memory.bin", "memory.1.bin"]);
    assert_eq!(saved.records_written, 3);
    assert!(after >= saved.counter);
    assert_eq!(count_records(&top), 4);
    assert_clean(&top);
}

#[test]
fn checkpoint_of_a_stopped_guest_is_refused_as_invalid_state() {
    require_kvm!();
    let fixture = Fixture::new();
    let vm = Vm::new(&fixture, "stopped", 16);
    let (worker, mut console) = boot_with_records(&fixture, &vm, 1);
    console.send("halt\r");
    fixture.next_event();
    let request = vm.request("cp1", None);

    let refused = worker.checkpoint(&request);
    worker.turn_off().unwrap();

    assert!(
        matches!(refused, Err(WorkerError::InvalidState { .. })),
        "{refused:?}"
    );
    assert!(!request.state_dir.exists());
    assert!(!request.overlays[0].path.exists());
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
fn worker_killed_at_any_checkpoint_step_leaves_old_images_and_no_half_state() {
    require_kvm!();
    for step in [
        "after-precopy",
        "after-pause",
        "after-overlays",
        "before-commit",
        "after-commit",
    ] {
        let fixture = Fixture::new();
        let launcher = launcher_dying_at(&fixture, &format!("worker.checkpoint.{step}"));
        let vm = Vm::new(&fixture, step, 16);
        let worker = launcher
            .launch(&vm.config, LaunchMode::Boot, fixture.sink())
            .expect("launch");
        let mut console = Console::attach(&launcher.runtime_dir(vm.config.id).console_socket());
        let at = console.wait_for(BANNER, 0);
        write_records(&mut console, 2, 2, at);
        let request = vm.request("cp1", None);

        let outcome = worker.checkpoint(&request);
        let _ = worker.turn_off();

        assert!(outcome.is_err(), "{step}: the worker died, yet {outcome:?}");
        assert_clean(&vm.disk("disk0.qcow2"));
        assert_eq!(count_records(&vm.disk("disk0.qcow2")), 2, "{step}");
        let overlay = &request.overlays[0].path;
        if overlay.exists() {
            assert_clean(overlay);
            assert_eq!(count_records(overlay), 2, "{step}");
        }
        if request.state_dir.exists() {
            let status = saved_status(&request.state_dir);
            assert!(request.state_dir.join("state.json").is_file(), "{step}");
            assert_eq!(status.records_written, 2, "{step}");
        }
        assert_eq!(
            request.state_dir.exists(),
            step == "after-commit",
            "{step}: state folder"
        );
    }
}

#[test]
fn worker_restored_from_a_checkpoint_writes_its_next_checkpoint_as_a_delta_on_it() {
    require_kvm!();
    let fixture = Fixture::new();
    let mut vm = Vm::new(&fixture, "chain", 32);
    let (worker, _console) = boot_with_records(&fixture, &vm, 2);
    let first = vm.request("cp1", None);
    take(worker.as_ref(), &first);
    worker.turn_off().unwrap();
    fs::remove_file(vm.disk("disk0-cp1.qcow2")).unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "disk0.qcow2",
        "-F",
        "qcow2",
        vm.disk("disk0-cp1.qcow2").to_str().unwrap(),
    ]);
    vm.use_disk(&fixture, "disk0-cp1.qcow2");
    let restored = restore_from(&fixture, &vm, &first.state_dir);
    let mut console = Console::attach(&fixture.launcher.runtime_dir(vm.config.id).console_socket());
    write_records(&mut console, 1, 3, 0);
    let second = vm.request("cp2", Some(&first.state_dir));

    let report = take(restored.as_ref(), &second);
    restored.turn_off().unwrap();
    fs::remove_dir_all(vm.dir.join("state")).ok();
    let saved = saved_status(&second.state_dir);
    let top = vm.disk("disk0-cp2.qcow2");
    fs::remove_file(&top).unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "disk0-cp1.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    vm.use_disk(&fixture, "disk0-cp2.qcow2");
    let again = restore_from(&fixture, &vm, &second.state_dir);
    let after = counter(&fixture.launcher, vm.config.id);
    let mut console = Console::attach(&fixture.launcher.runtime_dir(vm.config.id).console_socket());
    write_records(&mut console, 1, 4, 0);
    again.turn_off().unwrap();

    assert!(report.delta, "{report:?}");
    assert_eq!(saved.records_written, 3);
    assert!(after >= saved.counter);
    assert_eq!(count_records(&top), 4);
    assert_clean(&top);
}
