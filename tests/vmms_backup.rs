//! Backups through the daemon and the CLI (`backup-vm`, `get-vm-backup`, `test-vm-backup`,
//! `restore-vm-backup`): sets of VMs that are off, sets that are damaged, and restores. Real
//! daemon, real workers, the test guest, the real `qemu-img`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod vmms_common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use vmms_common::{Daemon, path_str, qemu_img_check_all};

/// `get-vm-backup SET -o json`.
fn describe(daemon: &Daemon, set: &Path) -> Value {
    let text = daemon.ok(&["get-vm-backup", path_str(set), "--output", "json"]);
    serde_json::from_str(&text).expect("get-vm-backup json")
}

/// `qemu-img compare` of two images (any formats, through their chains).
fn images_equal(a: &Path, b: &Path) -> bool {
    let out = Command::new("qemu-img")
        .args(["compare", "-U"])
        .arg(a)
        .arg(b)
        .output()
        .expect("qemu-img runs");
    out.status.success()
}

/// A VM with an 8 MiB disk holding `records` records, turned off again.
fn off_vm_with_records(daemon: &Daemon, name: &str, records: u64) {
    daemon.new_vm(name, &["--new-disk", "8M"]);
    daemon.ok(&["start-vm", name]);
    let expected = format!("wrote {records} records, total {records}");
    daemon.console_command(name, &format!("write {records}"), &expected);
    daemon.ok(&["stop-vm", name, "--turn-off"]);
    daemon.wait_state(name, 3);
}

#[test]
fn backup_of_an_off_vm_restores_as_a_new_vm_with_the_same_disk() {
    let daemon = Daemon::start();
    off_vm_with_records(&daemon, "web", 40);
    let sets = tempfile::tempdir().expect("tempdir");
    let set = sets.path().join("monday");

    daemon.ok(&["backup-vm", "web", "--to", path_str(&set)]);
    daemon.ok(&["test-vm-backup", path_str(&set)]);
    let id = daemon.ok(&["restore-vm-backup", path_str(&set), "--as", "web-copy"]);

    let info = describe(&daemon, &set);
    assert_eq!(info["vm_name"], "web");
    assert_eq!(info["report"]["kind"], "Full");
    assert_eq!(info["report"]["consistency"], "CrashConsistent");
    assert!(
        info["report"]["consistency_reason"]
            .as_str()
            .is_some_and(|r| r.contains("not running")),
        "{info}"
    );
    assert!(info["report"]["bytes_copied"].as_u64().unwrap() >= 40 * 4096);
    let copy = daemon.vm("web-copy");
    assert_eq!(copy["id"].as_str(), Some(id.trim()));
    assert_ne!(copy["id"], daemon.vm("web")["id"]);
    assert!(images_equal(
        &daemon.disk("web", 0),
        &daemon.disk("web-copy", 0)
    ));
    qemu_img_check_all(&set);
    qemu_img_check_all(&daemon.vm_dir("web-copy"));
}

#[test]
fn restore_over_an_off_vm_brings_back_its_disk() {
    let daemon = Daemon::start();
    off_vm_with_records(&daemon, "db", 10);
    let sets = tempfile::tempdir().expect("tempdir");
    let set = sets.path().join("full");
    daemon.ok(&["backup-vm", "db", "--to", path_str(&set)]);
    daemon.ok(&["start-vm", "db"]);
    daemon.console_command("db", "write 5", "wrote 5 records, total 15");
    daemon.ok(&["stop-vm", "db", "--turn-off"]);
    daemon.wait_state("db", 3);

    daemon.ok(&["restore-vm-backup", path_str(&set)]);

    let vms = daemon.vms();
    assert_eq!(vms.len(), 1, "no second VM: {vms:?}");
    let disk = daemon.disk("db", 0);
    let image = fs::File::open(&disk).expect("open restored disk");
    drop(image);
    let raw = tempfile::tempdir().expect("tempdir");
    let flat = raw.path().join("flat.raw");
    let converted = Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw"])
        .arg(&disk)
        .arg(&flat)
        .status()
        .expect("qemu-img");
    assert!(converted.success());
    let records = vmms_guest::count_records(fs::File::open(&flat).expect("flat")).expect("count");
    assert_eq!(
        records, 10,
        "the disk is back to the 10 records of the backup"
    );
}

#[test]
fn a_running_vm_cannot_be_restored_over() {
    let daemon = Daemon::start();
    off_vm_with_records(&daemon, "busy", 2);
    let sets = tempfile::tempdir().expect("tempdir");
    let set = sets.path().join("s");
    daemon.ok(&["backup-vm", "busy", "--to", path_str(&set)]);
    daemon.ok(&["start-vm", "busy"]);
    let config_before = daemon.vm("busy")["config"].clone();

    let error = daemon.fails(&["restore-vm-backup", path_str(&set)]);

    assert!(
        error.contains("32775") || error.to_lowercase().contains("stop"),
        "{error}"
    );
    assert_eq!(daemon.vm("busy")["config"], config_before);
}

#[test]
fn a_backup_into_an_existing_folder_is_refused_and_writes_nothing() {
    let daemon = Daemon::start();
    off_vm_with_records(&daemon, "v", 1);
    let sets = tempfile::tempdir().expect("tempdir");

    let error = daemon.fails(&["backup-vm", "v", "--to", path_str(sets.path())]);

    assert!(error.contains("exists already"), "{error}");
    assert_eq!(fs::read_dir(sets.path()).expect("dir").count(), 0);
}

/// A valid set of an off VM, for the damage tests.
fn damaged_fixture(daemon: &Daemon) -> (tempfile::TempDir, PathBuf) {
    off_vm_with_records(daemon, "src", 20);
    let sets = tempfile::tempdir().expect("tempdir");
    let set = sets.path().join("set");
    daemon.ok(&["backup-vm", "src", "--to", path_str(&set)]);
    (sets, set)
}

#[test]
fn a_corrupt_manifest_fails_verify_and_restore_and_defines_nothing() {
    let daemon = Daemon::start();
    let (_sets, set) = damaged_fixture(&daemon);
    let manifest = set.join("manifest.json");
    let mut text = fs::read_to_string(&manifest).expect("manifest");
    text.truncate(text.len() / 2);
    fs::write(&manifest, text).expect("damage");

    let verify = daemon.fails(&["test-vm-backup", path_str(&set)]);
    let restore = daemon.fails(&["restore-vm-backup", path_str(&set), "--as", "x"]);

    assert!(verify.contains("not a backup manifest"), "{verify}");
    assert!(restore.contains("not a backup manifest"), "{restore}");
    assert_eq!(daemon.vms().len(), 1);
}

#[test]
fn an_altered_data_byte_fails_verify_and_restore() {
    let daemon = Daemon::start();
    let (_sets, set) = damaged_fixture(&daemon);
    let image = set.join("disk0.qcow2");
    let map = Command::new("qemu-img")
        .args(["map", "--output", "json"])
        .arg(&image)
        .output()
        .expect("qemu-img map");
    let map: Value = serde_json::from_slice(&map.stdout).expect("map json");
    let data = map
        .as_array()
        .expect("extents")
        .iter()
        .find(|e| e["data"] == true)
        .expect("a data extent");
    let file_offset = data["offset"].as_u64().expect("offset") + 100;
    let mut bytes = fs::read(&image).expect("image");
    bytes[file_offset as usize] ^= 0xff;
    fs::write(&image, bytes).expect("alter");

    let verify = daemon.fails(&["test-vm-backup", path_str(&set)]);
    let restore = daemon.fails(&["restore-vm-backup", path_str(&set), "--as", "x"]);

    assert!(verify.contains("do not match their checksum"), "{verify}");
    assert!(restore.contains("do not match their checksum"), "{restore}");
    assert_eq!(daemon.vms().len(), 1);
}

#[test]
fn a_truncated_data_file_fails_verify() {
    let daemon = Daemon::start();
    let (_sets, set) = damaged_fixture(&daemon);
    let image = set.join("disk0.qcow2");
    let length = fs::metadata(&image).expect("meta").len();
    fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .and_then(|f| f.set_len(length / 3))
        .expect("truncate");

    let verify = daemon.fails(&["test-vm-backup", path_str(&set)]);

    assert!(verify.contains("is not valid"), "{verify}");
}

#[test]
fn describing_a_folder_that_is_not_a_set_says_so() {
    let daemon = Daemon::start();
    let empty = tempfile::tempdir().expect("tempdir");

    let error = daemon.fails(&["get-vm-backup", path_str(empty.path())]);

    assert!(error.contains("cannot read manifest.json"), "{error}");
}
