//! Checkpoints through the daemon and the CLI: the checkpoint tree of offline, saved and running
//! VMs, apply, delete (merge), export/import into another daemon, bad input, crashes in the
//! middle of an operation and the revert-to-checkpoint recovery action. Real daemon, real
//! workers, the test guest, the real `qemu-img`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod vmms_common;

use std::fs;
use std::path::Path;

use serde_json::Value;
use vmms_common::{Daemon, qemu_img_check_all, wait_until};

/// `get-vm-checkpoint TARGET -o json`.
fn tree(daemon: &Daemon, target: &str) -> Value {
    let text = daemon.ok(&["get-vm-checkpoint", target, "--output", "json"]);
    serde_json::from_str(&text).expect("get-vm-checkpoint json")
}

/// The checkpoint named `name` in `tree`.
fn node<'a>(tree: &'a Value, name: &str) -> &'a Value {
    tree["checkpoints"]
        .as_array()
        .expect("checkpoints")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no checkpoint {name} in {tree}"))
}

/// The sorted checkpoint names of a `get-vm-checkpoint -o json` answer.
fn names(tree: &Value) -> Vec<String> {
    let mut names: Vec<String> = tree["checkpoints"]
        .as_array()
        .expect("checkpoints")
        .iter()
        .filter_map(|c| c["name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    names
}

fn qcow2_layers(dir: &Path) -> usize {
    fs::read_dir(dir.join("disks"))
        .expect("disks")
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "qcow2"))
        .count()
}

#[test]
fn new_disk_is_a_qcow2_image_in_the_vm_folder() {
    let daemon = Daemon::start();

    daemon.new_vm("d", &["--new-disk", "8M"]);

    let dir = daemon.vm_dir("d");
    let image = dir.join("disks/disk0.qcow2");
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output", "json"])
        .arg(&image)
        .output()
        .expect("qemu-img");
    let info: Value = serde_json::from_slice(&info.stdout).expect("info json");
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 8 << 20);
    let config = &daemon.vm("d")["config"]["disks"][0]["path"];
    assert_eq!(config, "disk0.qcow2");
    qemu_img_check_all(&dir);
}

#[test]
fn bad_new_disk_size_is_refused_and_defines_nothing() {
    let daemon = Daemon::start();

    let refusal = daemon.fails(&["new-vm", "d", "--new-disk", "12Q"]);

    assert!(refusal.contains("size suffix"), "{refusal}");
    assert!(daemon.vms().is_empty());
}

#[test]
fn offline_tree_branches_merges_and_deletes_subtrees() {
    let daemon = Daemon::start();
    daemon.new_vm("t", &["--new-disk", "8M"]);
    let dir = daemon.vm_dir("t");

    daemon.ok(&["checkpoint-vm", "t", "--name", "a"]);
    daemon.ok(&["checkpoint-vm", "t", "--name", "b"]);
    daemon.ok(&["restore-vm-checkpoint", "t", "a"]);
    daemon.ok(&["checkpoint-vm", "t", "--name", "c"]);
    qemu_img_check_all(&dir);
    let three = tree(&daemon, "t");
    let (a, b, c) = (node(&three, "a"), node(&three, "b"), node(&three, "c"));
    assert_eq!(b["parent"], a["id"]);
    assert_eq!(c["parent"], a["id"]);
    assert_eq!(three["now"], c["id"]);
    assert_eq!(
        (a["now_descends"].as_bool(), b["now_descends"].as_bool()),
        (Some(true), Some(false))
    );
    let layers_before = qcow2_layers(&dir);

    daemon.ok(&["rename-vm-checkpoint", "t", "b", "b2"]);
    daemon.ok(&["remove-vm-checkpoint", "t", "a"]);
    qemu_img_check_all(&dir);
    let merged = tree(&daemon, "t");
    assert_eq!(names(&merged), ["b2", "c"]);
    assert!(node(&merged, "b2")["parent"].is_null());
    assert!(node(&merged, "c")["parent"].is_null());
    assert!(qcow2_layers(&dir) < layers_before, "the chain shrank");

    daemon.ok(&["remove-vm-checkpoint", "t", "c", "--include-children"]);
    qemu_img_check_all(&dir);
    assert_eq!(names(&tree(&daemon, "t")), ["b2"]);
    assert!(tree(&daemon, "t")["now"].is_null());
}

#[test]
fn checkpoint_of_a_saved_vm_applies_back_to_its_saved_state() {
    require_kvm!();
    let daemon = Daemon::start();
    daemon.new_vm("s", &["--recovery", "none"]);
    daemon.ok(&["start-vm", "s"]);
    daemon.counter_above("s", 0);
    daemon.ok(&["save-vm", "s"]);
    let id = daemon.vm("s")["id"].as_str().expect("id").to_owned();
    let at_checkpoint = daemon.saved_counter(&id);
    daemon.ok(&["checkpoint-vm", "s", "--name", "saved"]);
    daemon.ok(&["start-vm", "s"]);
    daemon.counter_above("s", at_checkpoint + 1000);
    daemon.ok(&["stop-vm", "s", "--turn-off"]);

    daemon.ok(&["restore-vm-checkpoint", "s", "saved"]);

    assert_eq!(daemon.vm("s")["enabled_state"], 6, "Saved");
    assert_eq!(daemon.saved_counter(&id), at_checkpoint);
    daemon.ok(&["start-vm", "s"]);
    let resumed = daemon.counter("s");
    assert!(resumed >= at_checkpoint, "{resumed} < {at_checkpoint}");
    daemon.ok(&["stop-vm", "s", "--turn-off"]);
}

#[test]
fn apply_on_a_running_vm_is_refused() {
    require_kvm!();
    let daemon = Daemon::start();
    daemon.new_vm("r", &["--recovery", "none"]);
    daemon.ok(&["checkpoint-vm", "r", "--name", "off"]);
    daemon.ok(&["start-vm", "r"]);

    let refusal = daemon.fails(&["restore-vm-checkpoint", "r", "off"]);

    // Production-only checkpoints of a running VM: tests/vmms_production_checkpoints.rs.
    assert!(refusal.contains("32775"), "{refusal}");
    assert_eq!(names(&tree(&daemon, "r")), ["off"]);
    assert_eq!(daemon.vm("r")["enabled_state"], 2);
    daemon.ok(&["stop-vm", "r", "--turn-off"]);
}

#[test]
fn unknown_checkpoint_and_bad_names_are_clear_errors() {
    let daemon = Daemon::start();
    daemon.new_vm("n", &[]);
    daemon.ok(&["checkpoint-vm", "n", "--name", "x"]);
    daemon.ok(&["checkpoint-vm", "n", "--name", "x"]);

    let unknown = daemon.fails(&["restore-vm-checkpoint", "n", "nope"]);
    let ambiguous = daemon.fails(&["remove-vm-checkpoint", "n", "x"]);
    let empty = daemon.fails(&["checkpoint-vm", "n", "--name", ""]);
    let bad_type = daemon.fails(&["checkpoint-vm", "n", "--type", "fast"]);

    assert!(unknown.contains("no checkpoint nope"), "{unknown}");
    assert!(ambiguous.contains("ambiguous"), "{ambiguous}");
    assert!(empty.contains("invalid checkpoint name"), "{empty}");
    assert!(bad_type.contains("checkpoint type"), "{bad_type}");
    assert_eq!(names(&tree(&daemon, "n")), ["x", "x"]);
}

#[test]
fn production_checkpoints_of_an_off_vm_need_no_quiescing() {
    let daemon = Daemon::start();
    daemon.new_vm("p", &[]);

    daemon.ok(&[
        "checkpoint-vm",
        "p",
        "--name",
        "prod",
        "--type",
        "production",
    ]);
    daemon.ok(&[
        "checkpoint-vm",
        "p",
        "--name",
        "only",
        "--type",
        "production-only",
    ]);

    let listed = tree(&daemon, "p");
    let (prod, only) = (node(&listed, "prod"), node(&listed, "only"));
    assert_eq!(
        (&prod["type"], &prod["consistency"]),
        (&"production".into(), &"off".into())
    );
    assert_eq!(only["type"], "production-only");
}

#[test]
fn corrupt_tree_is_reported_and_leaves_other_vms_and_the_daemon_serving() {
    let daemon = Daemon::start();
    daemon.new_vm("bad", &[]);
    daemon.new_vm("good", &[]);
    daemon.ok(&["checkpoint-vm", "bad", "--name", "one"]);
    let tree_file = daemon.vm_dir("bad").join("checkpoints/tree.json");
    fs::write(&tree_file, b"{\"version\": 1, \"checkpoints\": [tru").expect("corrupt");

    let listed = daemon.fails(&["get-vm-checkpoint", "bad"]);
    let created = daemon.fails(&["checkpoint-vm", "bad", "--name", "two"]);

    assert!(listed.contains("corrupt"), "{listed}");
    assert!(created.contains("corrupt"), "{created}");
    assert_eq!(
        fs::read(&tree_file).expect("tree"),
        b"{\"version\": 1, \"checkpoints\": [tru"
    );
    daemon.ok(&["checkpoint-vm", "good", "--name", "fine"]);
    assert_eq!(names(&tree(&daemon, "good")), ["fine"]);
}

#[test]
fn checkpoint_with_missing_memory_file_refuses_to_apply() {
    require_kvm!();
    let daemon = Daemon::start();
    daemon.new_vm("m", &["--recovery", "none"]);
    daemon.ok(&["start-vm", "m"]);
    daemon.ok(&["save-vm", "m"]);
    daemon.ok(&["checkpoint-vm", "m", "--name", "saved"]);
    daemon.ok(&["start-vm", "m"]);
    daemon.ok(&["stop-vm", "m", "--turn-off"]);
    let cp = node(&tree(&daemon, "m"), "saved")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let state = daemon.vm_dir("m").join(format!("checkpoints/{cp}/state"));
    fs::remove_file(state.join("memory.bin")).expect("remove memory");

    let refusal = daemon.fails(&["restore-vm-checkpoint", "m", "saved"]);

    assert!(refusal.contains("incomplete"), "{refusal}");
    assert_eq!(daemon.vm("m")["enabled_state"], 3, "still Off");
}

#[test]
fn export_and_import_into_another_daemon_keeps_the_guest_state() {
    require_kvm!();
    let source = Daemon::start();
    source.new_vm("e", &["--new-disk", "8M", "--recovery", "none"]);
    source.ok(&["start-vm", "e"]);
    source.console_command("e", "write 2", "wrote 2 records, total 2");
    source.ok(&["save-vm", "e"]);
    let id = source.vm("e")["id"].as_str().expect("id").to_owned();
    let saved = source.saved_counter(&id);
    source.ok(&["checkpoint-vm", "e", "--name", "kept"]);
    let export = tempfile::tempdir().expect("tempdir");
    let target = export.path().join("e-export");

    source.ok(&["export-vm", "e", "--to", target.to_str().expect("utf-8")]);
    let other = Daemon::start();
    let imported = other.ok(&["import-vm", target.to_str().expect("utf-8")]);

    assert_eq!(imported.trim(), id, "same id without --copy");
    assert_eq!(other.vm("e")["enabled_state"], 6, "Saved");
    assert_eq!(names(&tree(&other, "e")), ["kept"]);
    other.ok(&["start-vm", "e"]);
    let resumed = other.counter("e");
    assert!(resumed >= saved, "{resumed} < {saved}");
    other.console_command("e", "write 1", "wrote 1 records, total 3");
    other.ok(&["stop-vm", "e", "--turn-off"]);
    assert_eq!(records_on_live_disk(&other, "e"), 3);
    qemu_img_check_all(&other.vm_dir("e"));
    let copy = other.ok(&["import-vm", target.to_str().expect("utf-8"), "--copy"]);
    assert_ne!(copy.trim(), id, "--copy gives a new id");
}

#[test]
fn revert_recovery_puts_a_failed_vm_back_on_its_newest_checkpoint_and_starts_it() {
    require_kvm!();
    let daemon = Daemon::start();
    daemon.new_vm("v", &["--recovery", "revert"]);
    daemon.ok(&["checkpoint-vm", "v", "--name", "older"]);
    daemon.ok(&["start-vm", "v"]);
    daemon.ok(&["save-vm", "v"]);
    daemon.ok(&["checkpoint-vm", "v", "--name", "newest"]);
    daemon.ok(&["start-vm", "v"]);
    let first = daemon.vm("v")["process_id"].as_u64().expect("worker pid");

    vmms_common::kill9(first);

    wait_until("a new worker runs the reverted VM", || {
        let vm = daemon.vm("v");
        vm["enabled_state"] == 2 && vm["process_id"].as_u64().is_some_and(|p| p != first)
    });
    assert_eq!(
        tree(&daemon, "v")["now"],
        node(&tree(&daemon, "v"), "newest")["id"]
    );
    daemon.ok(&["stop-vm", "v", "--turn-off"]);
}

/// The records on VM `target`'s live disk (it must be off: the image is read directly).
fn records_on_live_disk(daemon: &Daemon, target: &str) -> u64 {
    let path = daemon.vm(target)["config"]["disks"][0]["path"]
        .as_str()
        .expect("disk path")
        .to_owned();
    let disk = vmms::snapshot::open_disk(&daemon.vm_dir(target).join("disks").join(path), true)
        .expect("open live disk");
    let mut image = vec![0u8; 8 << 20];
    disk.read(0, &mut image).expect("read disk");
    vmms::guest::count_records(&image[..]).expect("count records")
}

#[test]
fn running_checkpoint_applied_later_continues_exactly_where_it_was_taken() {
    require_kvm!();
    let daemon = Daemon::start();
    daemon.new_vm("run", &["--new-disk", "8M", "--recovery", "none"]);
    daemon.ok(&["start-vm", "run"]);
    daemon.console_command("run", "write 3", "wrote 3 records, total 3");

    daemon.ok(&["checkpoint-vm", "run", "--name", "three"]);

    assert_eq!(
        daemon.vm("run")["enabled_state"],
        2,
        "the guest kept running"
    );
    let at_checkpoint = daemon.counter("run");
    daemon.console_command("run", "write 4", "wrote 4 records, total 7");
    daemon.ok(&["stop-vm", "run", "--turn-off"]);
    assert_eq!(records_on_live_disk(&daemon, "run"), 7);
    qemu_img_check_all(&daemon.vm_dir("run"));

    daemon.ok(&["restore-vm-checkpoint", "run", "three"]);
    assert_eq!(daemon.vm("run")["enabled_state"], 6, "Saved");
    daemon.ok(&["start-vm", "run"]);
    assert_eq!(daemon.worker_report("run")["restored"], true);
    let resumed = daemon.counter("run");
    assert!(
        resumed + 1_000_000 >= at_checkpoint,
        "the counter went back: {resumed} vs {at_checkpoint}"
    );
    daemon.console_command("run", "write 1", "wrote 1 records, total 4");
    daemon.ok(&["stop-vm", "run", "--turn-off"]);
    assert_eq!(records_on_live_disk(&daemon, "run"), 4);
    qemu_img_check_all(&daemon.vm_dir("run"));
}

#[test]
fn deleting_a_checkpoint_whose_layer_a_running_vm_reads_is_refused() {
    require_kvm!();
    let daemon = Daemon::start();
    daemon.new_vm("busy", &["--new-disk", "8M", "--recovery", "none"]);
    daemon.ok(&["checkpoint-vm", "busy", "--name", "base"]);
    daemon.ok(&["start-vm", "busy"]);

    let refusal = daemon.fails(&["remove-vm-checkpoint", "busy", "base"]);

    assert!(refusal.contains("32775"), "{refusal}");
    assert_eq!(names(&tree(&daemon, "busy")), ["base"]);
    daemon.ok(&["stop-vm", "busy", "--turn-off"]);
    daemon.ok(&["remove-vm-checkpoint", "busy", "base"]);
    qemu_img_check_all(&daemon.vm_dir("busy"));
}

/// Applies checkpoint `cp` of `target`, starts it, and checks that the guest continues from
/// exactly `records` records on its disk.
fn assert_applies_to(daemon: &Daemon, target: &str, cp: &str, records: u64) {
    daemon.ok(&["restore-vm-checkpoint", target, cp]);
    daemon.ok(&["start-vm", target]);
    let total = records + 1;
    daemon.console_command(
        target,
        "write 1",
        &format!("wrote 1 records, total {total}"),
    );
    daemon.ok(&["stop-vm", target, "--turn-off"]);
    assert_eq!(
        records_on_live_disk(daemon, target),
        total,
        "checkpoint {cp}"
    );
    qemu_img_check_all(&daemon.vm_dir(target));
}

#[test]
fn every_checkpoint_of_a_branched_tree_applies_exactly_after_merges_and_subtree_deletes() {
    require_kvm!();
    let daemon = Daemon::start();
    daemon.new_vm("tree", &["--new-disk", "8M", "--recovery", "none"]);
    daemon.ok(&["start-vm", "tree"]);
    for (n, cp) in [(1, "a"), (2, "b"), (3, "c")] {
        daemon.console_command("tree", "write 1", &format!("wrote 1 records, total {n}"));
        daemon.ok(&["checkpoint-vm", "tree", "--name", cp]);
    }
    daemon.ok(&["stop-vm", "tree", "--turn-off"]);
    daemon.ok(&["restore-vm-checkpoint", "tree", "a"]);
    daemon.ok(&["start-vm", "tree"]);
    daemon.console_command("tree", "write 3", "wrote 3 records, total 4");
    daemon.ok(&["checkpoint-vm", "tree", "--name", "d"]);
    daemon.ok(&["stop-vm", "tree", "--turn-off"]);
    let dir = daemon.vm_dir("tree");
    qemu_img_check_all(&dir);
    let layers = qcow2_layers(&dir);

    daemon.ok(&["remove-vm-checkpoint", "tree", "b"]);

    let merged = tree(&daemon, "tree");
    assert_eq!(names(&merged), ["a", "c", "d"]);
    assert_eq!(node(&merged, "c")["parent"], node(&merged, "a")["id"]);
    assert!(qcow2_layers(&dir) < layers, "the chain shrank");
    qemu_img_check_all(&dir);
    assert_applies_to(&daemon, "tree", "c", 3);
    assert_applies_to(&daemon, "tree", "a", 1);
    assert_applies_to(&daemon, "tree", "d", 4);

    daemon.ok(&["remove-vm-checkpoint", "tree", "c", "--include-children"]);
    assert_eq!(names(&tree(&daemon, "tree")), ["a", "d"]);
    assert_applies_to(&daemon, "tree", "d", 4);
    assert_applies_to(&daemon, "tree", "a", 1);
    daemon.ok(&["remove-vm-checkpoint", "tree", "a", "--include-children"]);
    assert!(names(&tree(&daemon, "tree")).is_empty());
    qemu_img_check_all(&dir);
    daemon.ok(&["start-vm", "tree"]);
    daemon.console_command("tree", "write 1", "wrote 1 records, total 3");
    daemon.ok(&["stop-vm", "tree", "--turn-off"]);
}

#[test]
fn corrupt_qcow2_and_missing_backing_file_fail_the_start_clearly() {
    require_kvm!();
    let daemon = Daemon::start();
    let truncated = daemon.path().join("truncated.qcow2");
    fs::write(&truncated, b"QFI\xfb\x00\x00\x00\x03\x00").expect("write");
    let base = daemon.path().join("base.qcow2");
    let top = daemon.path().join("top.qcow2");
    let made = std::process::Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            base.to_str().expect("utf-8"),
            "8M",
        ])
        .status()
        .expect("qemu-img");
    assert!(made.success());
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .args([base.to_str().expect("utf-8"), top.to_str().expect("utf-8")])
        .status()
        .expect("qemu-img");
    assert!(made.success());
    fs::remove_file(&base).expect("remove base");
    daemon.new_vm("t", &["--disk", truncated.to_str().expect("utf-8")]);
    daemon.new_vm("m", &["--disk", top.to_str().expect("utf-8")]);
    daemon.new_vm("fine", &["--recovery", "none"]);

    let bad_header = daemon.fails(&["start-vm", "t"]);
    let no_backing = daemon.fails(&["start-vm", "m"]);

    assert!(bad_header.contains("truncated.qcow2"), "{bad_header}");
    assert!(no_backing.contains("base.qcow2"), "{no_backing}");
    assert_eq!(daemon.vm("t")["enabled_state"], 3);
    assert_eq!(daemon.vm("m")["enabled_state"], 3);
    daemon.ok(&["start-vm", "fine"]);
    daemon.ok(&["stop-vm", "fine", "--turn-off"]);
}
