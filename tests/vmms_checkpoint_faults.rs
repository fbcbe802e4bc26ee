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
    let text = daemon.ok(&["get-vm-checkpoint", "f", "--output", "json"]);
    let tree: Value = serde_json::from_str(&text).expect("json");
    let mut names: Vec<String> = tree["checkpoints"]
        .as_array()
        .expect("checkpoints")
        .iter()
        .map(|c| c["name"].as_str().expect("name").to_owned())
        .collect();
    names.sort();
    names
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
