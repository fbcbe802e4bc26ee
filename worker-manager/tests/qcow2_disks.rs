//! Workers run their disks through the snapshot crate: qcow2 images made by the real `qemu-img`
//! (plain and on a backing file) hold the test guest's records across a restart, and `qemu-img`
//! reads them back and finds the images clean.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;

use common::images::{assert_clean, assert_records, count_records, qemu_img};
use common::{Console, Fixture};
use vmm_core::{DiskConfig, VmConfig};
use vmms_guest::protocol::BANNER;

/// A VM with one disk at `disks/<name>`, defined; returns it and the disk's path.
fn vm_with_disk(fixture: &Fixture, vm_name: &str, disk: &str) -> (VmConfig, PathBuf) {
    let mut config = VmConfig::new(vm_name);
    config.memory_mib = 16;
    config.disks = vec![DiskConfig {
        path: disk.into(),
        read_only: false,
    }];
    fixture.define(&config);
    let disks = fixture
        .dir
        .path()
        .join("vms")
        .join(config.id.to_string())
        .join("disks");
    (config, disks.join(disk))
}

/// Boots `vm`, writes `count` records, expects the total `total`, turns the worker off.
fn boot_and_write(fixture: &Fixture, vm: &VmConfig, count: u64, total: u64) {
    let worker = fixture.boot(vm);
    let mut console = Console::attach(&fixture.launcher.runtime_dir(vm.id).console_socket());
    let at = console.wait_for(BANNER, 0);
    console.send(&format!("write {count}\r"));
    console.wait_for(&format!("wrote {count} records, total {total}"), at);
    worker.turn_off().unwrap();
}

#[test]
fn qcow2_made_by_qemu_img_holds_the_guests_records_across_a_restart() {
    require_kvm!();
    let fixture = Fixture::new();
    let (vm, disk) = vm_with_disk(&fixture, "qcow2", "disk0.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", disk.to_str().unwrap(), "4M"]);

    boot_and_write(&fixture, &vm, 3, 3);
    assert_clean(&disk);
    assert_records(&disk, 3);
    boot_and_write(&fixture, &vm, 2, 5);

    assert_clean(&disk);
    assert_records(&disk, 5);
}

#[test]
fn qcow2_overlay_on_a_backing_file_takes_the_writes_and_leaves_the_base_alone() {
    require_kvm!();
    let fixture = Fixture::new();
    let (vm, disk) = vm_with_disk(&fixture, "chain", "disk0.qcow2");
    let base = disk.with_file_name("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "4M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        disk.to_str().unwrap(),
    ]);

    boot_and_write(&fixture, &vm, 4, 4);
    boot_and_write(&fixture, &vm, 1, 5);

    assert_clean(&disk);
    assert_clean(&base);
    assert_records(&disk, 5);
    assert_eq!(count_records(&base), 0, "the base was written");
    let chain = qemu_img(&["info", "--backing-chain", disk.to_str().unwrap()]);
    assert!(chain.contains("base.qcow2"), "{chain}");
}
