//! Crash safety of checkpoint operations through the daemon: `VMMS_FAULT=<step>` kills the
//! daemon at each step of create, apply, delete (merge) and export; a restarted daemon must
//! leave a consistent store: the operation happened or it did not, every image passes
//! `qemu-img check`, the disk holds exactly the data of one of the two outcomes, and the next
//! operation works.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod vmms_common;

use std::path::PathBuf;

use serde_json::Value;
use vmms::snapshot::open_disk;
use vmms_common::{Daemon, qemu_img_check_all, wait_until};

/// Where the test writes its marker on the disk.
const MARKER_AT: u64 = 1 << 20;

fn vm_dir(daemon: &Daemon) -> PathBuf {
    let id = daemon.vm("f")["id"].as_str().expect("id").to_owned();
    daemon.path().join("vms").join(id)
}

/// The live disk of VM `f` as its config names it.
fn live_disk(daemon: &Daemon) -> PathBuf {
    let path = daemon.vm("f")["config"]["disks"][0]["path"]
        .as_str()
        .expect("disk path")
        .to_owned();
    vm_dir(daemon).join("disks").join(path)
}

/// Writes `marker` into the (off) VM's live disk, as a guest would have.
fn write_marker(daemon: &Daemon, marker: &[u8; 8]) {
    let disk = open_disk(&live_disk(daemon), false).expect("open live disk");
    disk.write(MARKER_AT, marker).expect("write marker");
    disk.flush().expect("flush");
}

fn read_marker(daemon: &Daemon) -> [u8; 8] {
    let disk = open_disk(&live_disk(daemon), true).expect("open live disk");
    let mut marker = [0u8; 8];
    disk.read(MARKER_AT, &mut marker).expect("read marker");
    marker
}

fn checkpoint_names(daemon: &Daemon) -> Vec<String> {
    daemon.checkpoint_names("f")
}

/// A daemon whose VM `f` has a new qcow2 disk holding marker `A`, then `prepare` done, then
/// `operation` run with the daemon set to die at `step`; returns the daemon restarted without
/// the fault.
fn crash_at(step: &str, prepare: impl Fn(&Daemon), operation: &[&str]) -> Daemon {
    let mut daemon = Daemon::start_with(&[], &[]);
    daemon.new_vm("f", &["--new-disk", "8M", "--recovery", "none"]);
    write_marker(&daemon, b"marker-A");
    prepare(&daemon);
    daemon.kill9();
    daemon.spawn_with(&[], &[("VMMS_FAULT", step)]);

    let out = daemon.vmms(operation);

    assert!(
        !out.status.success(),
        "{step}: {operation:?} finished although the daemon was to die: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    daemon.wait_exit();
    daemon.spawn();
    wait_until(&format!("{step}: f settles"), || {
        daemon.vm("f")["operational_status"] != 11
    });
    daemon
}

/// What every outcome must satisfy: no journal left, images clean, the tree readable, and a
/// new checkpoint possible.
fn assert_consistent(daemon: &Daemon, step: &str) {
    let dir = vm_dir(daemon);
    assert!(
        !dir.join("checkpoints/journal.json").exists(),
        "{step}: journal left behind"
    );
    qemu_img_check_all(&dir);
    let before = checkpoint_names(daemon);
    daemon.ok(&["checkpoint-vm", "f", "--name", "after"]);
    let mut after = checkpoint_names(daemon);
    after.retain(|n| n != "after");
    assert_eq!(before, after, "{step}: the next checkpoint changed others");
    qemu_img_check_all(&dir);
}

#[test]
fn create_survives_a_daemon_kill_at_every_step() {
    for step in [
        "snapshot.create-journal",
        "snapshot.create-folder",
        "snapshot.create-overlay",
        "snapshot.create-committed",
        "snapshot.create-tree",
        "snapshot.create-config",
    ] {
        let daemon = crash_at(step, |_| {}, &["checkpoint-vm", "f", "--name", "cp"]);

        let names = checkpoint_names(&daemon);
        assert!(
            names.is_empty() || names == ["cp"],
            "{step}: half a checkpoint: {names:?}"
        );
        assert_eq!(&read_marker(&daemon), b"marker-A", "{step}: data lost");
        assert_consistent(&daemon, step);
    }
}

#[test]
fn apply_survives_a_daemon_kill_at_every_step() {
    for step in [
        "snapshot.apply-journal",
        "snapshot.apply-overlay",
        "snapshot.apply-committed",
        "snapshot.apply-state",
        "snapshot.apply-tree",
        "snapshot.apply-config",
        "snapshot.apply-discard",
    ] {
        let prepare = |daemon: &Daemon| {
            daemon.ok(&["checkpoint-vm", "f", "--name", "a"]);
            write_marker(daemon, b"marker-B");
        };
        let daemon = crash_at(step, prepare, &["restore-vm-checkpoint", "f", "a"]);

        let marker = read_marker(&daemon);
        assert!(
            &marker == b"marker-A" || &marker == b"marker-B",
            "{step}: disk holds neither outcome: {marker:?}"
        );
        assert_eq!(checkpoint_names(&daemon), ["a"], "{step}");
        assert_consistent(&daemon, step);
    }
}

#[test]
fn delete_survives_a_daemon_kill_at_every_step() {
    for step in [
        "snapshot.delete-journal",
        "snapshot.delete-committed",
        "snapshot.delete-renamed",
        "snapshot.delete-folder",
        "snapshot.delete-tree",
    ] {
        let prepare = |daemon: &Daemon| {
            daemon.ok(&["checkpoint-vm", "f", "--name", "a"]);
            write_marker(daemon, b"marker-B");
            daemon.ok(&["checkpoint-vm", "f", "--name", "b"]);
            write_marker(daemon, b"marker-C");
        };
        let daemon = crash_at(step, prepare, &["remove-vm-checkpoint", "f", "a"]);

        let names = checkpoint_names(&daemon);
        assert!(
            names == ["a", "b"] || names == ["b"],
            "{step}: unexpected tree {names:?}"
        );
        assert_eq!(&read_marker(&daemon), b"marker-C", "{step}: data lost");
        daemon.ok(&["restore-vm-checkpoint", "f", "b"]);
        assert_eq!(
            &read_marker(&daemon),
            b"marker-B",
            "{step}: checkpoint b no longer holds its data"
        );
        assert_consistent(&daemon, step);
    }
}

#[test]
fn export_survives_a_daemon_kill_at_every_step() {
    for step in [
        "snapshot.export-journal",
        "snapshot.export-copied",
        "snapshot.export-renamed",
    ] {
        let target = tempfile::tempdir().expect("tempdir");
        let to = target.path().join("export");
        let to_arg = to.to_str().expect("utf-8").to_owned();
        let daemon = crash_at(step, |_| {}, &["export-vm", "f", "--to", &to_arg]);

        let leftovers: Vec<_> = std::fs::read_dir(target.path())
            .expect("list")
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n != "export")
            .collect();
        assert!(leftovers.is_empty(), "{step}: staging left: {leftovers:?}");
        if !to.exists() {
            daemon.ok(&["export-vm", "f", "--to", &to_arg]);
        }
        let other = Daemon::start();
        other.ok(&["import-vm", &to_arg]);
        assert_eq!(other.vms().len(), 1, "{step}");
        assert_consistent(&daemon, step);
    }
}

/// Records on VM `f`'s live disk (off).
fn records(daemon: &Daemon) -> u64 {
    let disk = open_disk(&live_disk(daemon), true).expect("open live disk");
    let mut image = vec![0u8; 1 << 20];
    disk.read(0, &mut image).expect("read disk");
    vmms::guest::count_records(&image[..]).expect("count records")
}

/// Waits until VM `f` is steady and no operation owns it.
fn settle(daemon: &Daemon) -> Value {
    let mut vm = Value::Null;
    wait_until("f settles", || {
        vm = daemon.vm("f");
        [2, 3, 6, 9].contains(&vm["enabled_state"].as_u64().unwrap_or(0))
            && vm["operational_status"] != 11
    });
    vm
}

#[test]
fn running_checkpoint_survives_a_kill_of_the_daemon_or_the_worker_at_every_step() {
    require_kvm!();
    let steps = [
        "checkpoint.before-worker",
        "snapshot.running-journal",
        "worker.checkpoint.after-precopy",
        "worker.checkpoint.after-pause",
        "worker.checkpoint.after-overlays",
        "worker.checkpoint.before-commit",
        "worker.checkpoint.after-commit",
        "checkpoint.after-worker",
        "snapshot.running-committed",
        "snapshot.running-folder",
    ];
    for step in steps {
        let mut daemon = Daemon::start_with(&[], &[("VMMS_FAULT", step)]);
        daemon.new_vm("f", &["--new-disk", "8M", "--recovery", "none"]);
        daemon.ok(&["start-vm", "f"]);
        daemon.console_command("f", "write 3", "wrote 3 records, total 3");

        let out = daemon.vmms(&["checkpoint-vm", "f", "--name", "cp"]);

        // A worker killed right after its commit leaves a checkpoint that is taken: the
        // service rolls it forward and says so; every other kill interrupts the operation.
        if step != "worker.checkpoint.after-commit" {
            assert!(
                !out.status.success(),
                "{step}: the checkpoint was not interrupted"
            );
        }
        if step.starts_with("worker.") {
            settle(&daemon);
            daemon.kill9();
        } else {
            daemon.wait_exit();
        }
        daemon.spawn();
        let vm = settle(&daemon);
        let dir = vm_dir(&daemon);
        assert!(
            !dir.join("checkpoints/journal.json").exists(),
            "{step}: journal left behind"
        );
        let taken = checkpoint_names(&daemon) == ["cp"];
        if vm["enabled_state"] == 2 {
            // The guest ran on, on whichever disk its config names now.
            daemon.console_command("f", "write 1", "wrote 1 records, total 4");
            daemon.ok(&["stop-vm", "f", "--turn-off"]);
            assert_eq!(records(&daemon), 4, "{step}: the live disk lost records");
        } else {
            assert_eq!(vm["enabled_state"], 3, "{step}: {vm}");
            assert_eq!(
                records(&daemon),
                3,
                "{step}: records written before were lost"
            );
        }
        qemu_img_check_all(&dir);
        if taken {
            daemon.ok(&["restore-vm-checkpoint", "f", "cp"]);
            daemon.ok(&["start-vm", "f"]);
            daemon.console_command("f", "write 1", "wrote 1 records, total 4");
            daemon.ok(&["stop-vm", "f", "--turn-off"]);
            assert_eq!(
                records(&daemon),
                4,
                "{step}: the checkpoint's disk is not exact"
            );
            qemu_img_check_all(&dir);
        }
        daemon.ok(&["checkpoint-vm", "f", "--name", "next"]);
        qemu_img_check_all(&dir);
    }
}

#[test]
fn daemon_killed_while_the_worker_takes_a_checkpoint_finds_it_committed_on_restart() {
    require_kvm!();
    let fault = [("VMMS_FAULT", "worker.checkpoint.after-pause:delay=2000")];
    let mut daemon = Daemon::start_with(&[], &fault);
    daemon.new_vm("f", &["--new-disk", "8M", "--recovery", "none"]);
    daemon.ok(&["start-vm", "f"]);
    daemon.console_command("f", "write 3", "wrote 3 records, total 3");
    let worker = daemon.vm("f")["process_id"].as_u64().expect("worker");
    let store = daemon.path().to_path_buf();
    let cli = std::thread::spawn(move || {
        std::process::Command::new(vmms_common::vmms_binary())
            .args(["checkpoint-vm", "f", "--name", "cp", "--store"])
            .arg(&store)
            .output()
    });
    // The worker is inside the checkpoint once it has written into its staging folder (the
    // service makes that folder before it asks the worker; a kill before the ask is another case).
    let worker_writing = || {
        std::fs::read_dir(vm_dir(&daemon).join("checkpoints"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".new"))
            .any(|e| {
                std::fs::read_dir(e.path().join("state.saving"))
                    .is_ok_and(|mut files| files.next().is_some())
            })
    };
    wait_until("the worker is taking the checkpoint", worker_writing);

    daemon.kill9();
    let _ = cli.join();
    daemon.spawn();

    let vm = settle(&daemon);
    assert_eq!(
        vm["process_id"].as_u64(),
        Some(worker),
        "the same worker runs on"
    );
    assert_eq!(
        checkpoint_names(&daemon),
        ["cp"],
        "the worker's commit was kept"
    );
    assert!(!vm_dir(&daemon).join("checkpoints/journal.json").exists());
    daemon.console_command("f", "write 1", "wrote 1 records, total 4");
    daemon.ok(&["stop-vm", "f", "--turn-off"]);
    assert_eq!(records(&daemon), 4);
    daemon.ok(&["restore-vm-checkpoint", "f", "cp"]);
    daemon.ok(&["start-vm", "f"]);
    daemon.console_command("f", "write 1", "wrote 1 records, total 4");
    daemon.ok(&["stop-vm", "f", "--turn-off"]);
    qemu_img_check_all(&vm_dir(&daemon));
}
