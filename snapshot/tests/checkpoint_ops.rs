//! Offline checkpoint operations on real VM folders with real qcow2 chains, checked with the real
//! `qemu-img` after every step.

mod common_qemu;
mod common_vm;

use common_qemu::{assert_images_clean, qemu_img};
use common_vm::*;
use snapshot::{
    Allocation, CheckpointType, Consistency, CreateRequest, Error, NoProgress, ProgressCounter,
    apply_checkpoint, backing_chain, create_checkpoint, delete_checkpoint, delete_checkpoint_tree,
    open_disk, rename_checkpoint,
};

fn standard(name: &str) -> CreateRequest {
    CreateRequest {
        name: Some(name.into()),
        checkpoint_type: CheckpointType::Standard,
    }
}

#[test]
fn create_moves_the_vm_onto_an_overlay_of_the_checkpoint_layer() {
    let root = tempfile::tempdir().expect("tempdir");
    let vm = make_vm(root.path(), 1);
    let before = live_disk(&vm, 0);
    write_record(&vm, 0, 3, 0x11);

    let cp = create_checkpoint(&vm, &standard("first"), &mut NoProgress).expect("create");

    let tree = vm.tree().expect("tree");
    let live = live_disk(&vm, 0);
    assert_eq!(tree.now, Some(cp.id));
    assert_eq!(cp.consistency, Consistency::Off);
    assert_eq!(
        backing_chain(&live).expect("chain"),
        [live.clone(), before.clone()]
    );
    assert_eq!(read_record(&vm, 0, 3), 0x11);
    let info = qemu_img(&[
        "info",
        "--backing-chain",
        "--output=json",
        live.to_str().expect("utf8"),
    ]);
    assert!(info.contains("disk0.qcow2"), "{info}");
    assert_images_clean(disk_files(&vm));
}

#[test]
fn apply_brings_back_the_disk_as_it_was_and_drops_the_discarded_layer() {
    let root = tempfile::tempdir().expect("tempdir");
    let vm = make_vm(root.path(), 1);
    write_record(&vm, 0, 0, 0x11);
    let cp = create_checkpoint(&vm, &standard("a"), &mut NoProgress).expect("create");
    write_record(&vm, 0, 0, 0x22);
    write_record(&vm, 0, 1, 0x22);
    let discarded = live_disk(&vm, 0);

    apply_checkpoint(&vm, cp.id, &mut NoProgress).expect("apply");

    assert_eq!(read_record(&vm, 0, 0), 0x11);
    assert_eq!(read_record(&vm, 0, 1), 0);
    assert!(!discarded.exists());
    assert_eq!(disk_files(&vm).len(), 2);
    assert_images_clean(disk_files(&vm));
}

#[test]
fn apply_invalidates_the_vms_change_tracking_and_create_keeps_it() {
    let root = tempfile::tempdir().expect("tempdir");
    let vm = make_vm(root.path(), 1);
    let tracking = vm.change_tracking_path();
    std::fs::write(&tracking, b"{\"clean\":true}").expect("tracking file");
    let cp = create_checkpoint(&vm, &standard("a"), &mut NoProgress).expect("create");
    let kept_by_create = tracking.exists();
    write_record(&vm, 0, 0, 0x22);

    apply_checkpoint(&vm, cp.id, &mut NoProgress).expect("apply");

    assert!(
        kept_by_create,
        "a checkpoint does not change the disks' contents"
    );
    assert!(
        !tracking.exists(),
        "the applied disks changed under no worker"
    );
}

#[test]
fn checkpoint_of_a_saved_vm_keeps_its_state_and_apply_leaves_it_saved() {
    let root = tempfile::tempdir().expect("tempdir");
    let vm = make_vm(root.path(), 1);
    save_vm(&vm, 0x5a);
    let cp = create_checkpoint(&vm, &standard("saved"), &mut NoProgress).expect("create");
    std::fs::remove_dir_all(vm.state_dir()).expect("start+stop discards the saved state");

    apply_checkpoint(&vm, cp.id, &mut NoProgress).expect("apply");

    assert_eq!(cp.consistency, Consistency::SavedState);
    assert_eq!(saved_tag(&vm), Some(0x5a));
}

#[test]
fn apply_of_a_checkpoint_without_state_turns_a_saved_vm_off() {
    let root = tempfile::tempdir().expect("tempdir");
    let vm = make_vm(root.path(), 1);
    let cp = create_checkpoint(&vm, &standard("off"), &mut NoProgress).expect("create");
    save_vm(&vm, 0x77);

    apply_checkpoint(&vm, cp.id, &mut NoProgress).expect("apply");

    assert!(!vm.is_saved());
}

#[test]
fn production_checkpoint_of_a_saved_vm_falls_back_to_standard_and_is_recorded() {
    let root = tempfile::tempdir().expect("tempdir");
    let vm = make_vm(root.path(), 1);
    save_vm(&vm, 1);
    let request = CreateRequest {
        name: None,
        checkpoint_type: CheckpointType::Production,
    };

    let cp = create_checkpoint(&vm, &request, &mut NoProgress).expect("create");

    let stored = vm.tree().expect("tree").get(cp.id).cloned().expect("node");
    assert_eq!(stored.consistency, Consistency::StandardFallback);
    assert_eq!(stored.requested_type, CheckpointType::Production);
    assert!(stored.name.starts_with("test-vm ("), "{}", stored.name);
}

#[test]
fn production_only_checkpoint_of_a_saved_vm_fails_and_changes_nothing() {
    let root = tempfile::tempdir().expect("tempdir");
    let vm = make_vm(root.path(), 1);
    save_vm(&vm, 1);
    let before = snapshot_of(vm.dir());
    let request = CreateRequest {
        name: None,
        checkpoint_type: CheckpointType::ProductionOnly,
    };

    let result = create_checkpoint(&vm, &request, &mut NoProgress);

    assert!(matches!(result, Err(Error::ProductionUnavailable)));
    assert!(snapshot_of(vm.dir()) == before, "the VM folder changed");
}

#[test]
fn rename_changes_only_the_name() {
    let root = tempfile::tempdir().expect("tempdir");
    let vm = make_vm(root.path(), 1);
    let cp = create_checkpoint(&vm, &standard("old"), &mut NoProgress).expect("create");

    rename_checkpoint(&vm, cp.id, "new name").expect("rename");

    let tree = vm.tree().expect("tree");
    assert_eq!(tree.find("new name").expect("found").id, cp.id);
    assert!(matches!(
        tree.find("old"),
        Err(vmm_core::CheckpointError::NotFound(_))
    ));
}

/// Builds: root A (block0=1) → B (block0=2) → C (block0=3), and a branch from A: D (block1=4);
/// then "Now" on D's branch with block2=5. Returns (A, B, C, D).
fn three_level_tree_with_a_branch(vm: &snapshot::VmFolder) -> [snapshot::Checkpoint; 4] {
    write_record(vm, 0, 0, 1);
    let a = create_checkpoint(vm, &standard("A"), &mut NoProgress).expect("A");
    write_record(vm, 0, 0, 2);
    let b = create_checkpoint(vm, &standard("B"), &mut NoProgress).expect("B");
    write_record(vm, 0, 0, 3);
    let c = create_checkpoint(vm, &standard("C"), &mut NoProgress).expect("C");
    apply_checkpoint(vm, a.id, &mut NoProgress).expect("apply A");
    write_record(vm, 0, 1, 4);
    let d = create_checkpoint(vm, &standard("D"), &mut NoProgress).expect("D");
    write_record(vm, 0, 2, 5);
    [a, b, c, d]
}

fn assert_applies_to(vm: &snapshot::VmFolder, cp: &snapshot::Checkpoint, blocks: [u8; 3]) {
    apply_checkpoint(vm, cp.id, &mut NoProgress).expect("apply");
    let seen = [
        read_record(vm, 0, 0),
        read_record(vm, 0, 1),
        read_record(vm, 0, 2),
    ];
    assert_eq!(seen, blocks, "checkpoint {}", cp.name);
    assert_images_clean(disk_files(vm));
}

#[test]
fn deleting_a_middle_checkpoint_merges_its_layer_and_keeps_every_other_exact() {
    let root = tempfile::tempdir().expect("tempdir");
    let vm = make_vm(root.path(), 1);
    let [a, b, c, d] = three_level_tree_with_a_branch(&vm);
    let files_before = disk_files(&vm).len();
    let c_layer_depth = |vm: &snapshot::VmFolder| {
        let (cfg_path, tree) = (
            vm.checkpoint_dir(c.id).join("config.json"),
            vm.tree().expect("tree"),
        );
        let cfg = snapshot::folder::read_config(&cfg_path).expect("cfg");
        let _ = tree;
        backing_chain(&vm.disks(&cfg, &cfg_path).expect("disks")[0].path)
            .expect("chain")
            .len()
    };
    let depth_before = c_layer_depth(&vm);
    let mut progress = ProgressCounter::default();

    delete_checkpoint(&vm, b.id, &mut progress).expect("delete B");

    assert_images_clean(disk_files(&vm));
    let tree = vm.tree().expect("tree");
    assert_eq!(tree.get(c.id).and_then(|n| n.parent), Some(a.id));
    assert_eq!(disk_files(&vm).len(), files_before - 1);
    assert_eq!(c_layer_depth(&vm), depth_before - 1);
    assert_eq!(progress.percent(), 100);
    assert_applies_to(&vm, &c, [3, 0, 0]);
    assert_applies_to(&vm, &d, [1, 4, 0]);
    assert_applies_to(&vm, &a, [1, 0, 0]);
}

#[test]
fn deleting_a_subtree_removes_its_nodes_and_layers_and_leaves_the_rest_exact() {
    let root = tempfile::tempdir().expect("tempdir");
    let vm = make_vm(root.path(), 1);
    let [a, b, c, d] = three_level_tree_with_a_branch(&vm);

    delete_checkpoint_tree(&vm, b.id, &mut NoProgress).expect("delete subtree B");

    assert_images_clean(disk_files(&vm));
    let tree = vm.tree().expect("tree");
    assert!(tree.get(b.id).is_none() && tree.get(c.id).is_none());
    assert!(!vm.checkpoint_dir(b.id).exists() && !vm.checkpoint_dir(c.id).exists());
    assert_eq!(tree.now, Some(d.id));
    assert_eq!(read_record(&vm, 0, 2), 5);
    assert_applies_to(&vm, &d, [1, 4, 0]);
    assert_applies_to(&vm, &a, [1, 0, 0]);
}

#[test]
fn deleting_now_s_parent_merges_it_into_the_live_disk() {
    let root = tempfile::tempdir().expect("tempdir");
    let vm = make_vm(root.path(), 1);
    write_record(&vm, 0, 0, 1);
    let a = create_checkpoint(&vm, &standard("A"), &mut NoProgress).expect("A");
    write_record(&vm, 0, 1, 2);
    let live = live_disk(&vm, 0);

    delete_checkpoint(&vm, a.id, &mut NoProgress).expect("delete");

    assert_eq!(live_disk(&vm, 0), live);
    assert_eq!(
        backing_chain(&live).expect("chain"),
        std::slice::from_ref(&live)
    );
    assert_eq!((read_record(&vm, 0, 0), read_record(&vm, 0, 1)), (1, 2));
    assert_eq!(vm.tree().expect("tree").now, None);
    let map = open_disk(&live, true)
        .expect("open")
        .allocation_map()
        .expect("map");
    assert_eq!(map[0].allocation, Allocation::Data);
    assert_images_clean(disk_files(&vm));
}

#[test]
fn checkpoint_while_the_disk_is_open_for_writing_fails_with_a_lock_error() {
    let root = tempfile::tempdir().expect("tempdir");
    let vm = make_vm(root.path(), 1);
    let running = open_disk(&live_disk(&vm, 0), false).expect("worker holds the disk");
    let before = snapshot_of(vm.dir());

    let result = create_checkpoint(&vm, &standard("x"), &mut NoProgress);

    drop(running);
    assert!(
        matches!(result, Err(Error::ImageLocked { .. })),
        "{result:?}"
    );
    let after: Vec<_> = snapshot_of(vm.dir())
        .into_iter()
        .filter(|(p, _)| !p.ends_with("tree.json"))
        .collect();
    assert_eq!(after, before);
}

#[test]
fn two_disks_are_layered_together() {
    let root = tempfile::tempdir().expect("tempdir");
    let vm = make_vm(root.path(), 2);
    write_record(&vm, 1, 0, 9);
    let cp = create_checkpoint(&vm, &standard("both"), &mut NoProgress).expect("create");
    write_record(&vm, 1, 0, 10);

    apply_checkpoint(&vm, cp.id, &mut NoProgress).expect("apply");

    assert_eq!(read_record(&vm, 1, 0), 9);
    assert_eq!(backing_chain(&live_disk(&vm, 0)).expect("chain").len(), 2);
    assert_images_clean(disk_files(&vm));
}

#[test]
fn deleting_a_checkpoint_two_branches_grow_from_rebases_both_and_removes_its_layer() {
    let root = tempfile::tempdir().expect("tempdir");
    let vm = make_vm(root.path(), 1);
    let [a, b, c, d] = three_level_tree_with_a_branch(&vm);
    let files_before = disk_files(&vm).len();

    delete_checkpoint(&vm, a.id, &mut NoProgress).expect("delete A");

    assert_images_clean(disk_files(&vm));
    assert_eq!(disk_files(&vm).len(), files_before - 1);
    assert!(!vm.disks_dir().join("disk0.qcow2").exists());
    assert_eq!(read_record(&vm, 0, 2), 5);
    assert_applies_to(&vm, &b, [2, 0, 0]);
    assert_applies_to(&vm, &c, [3, 0, 0]);
    assert_applies_to(&vm, &d, [1, 4, 0]);
}

#[test]
fn deleting_the_checkpoint_that_owns_a_raw_base_disk_folds_it_into_the_overlay() {
    let root = tempfile::tempdir().expect("tempdir");
    let vm = make_vm(root.path(), 0);
    let raw = vm.disks_dir().join("disk0.raw");
    std::fs::write(&raw, vec![0u8; DISK_SIZE as usize]).expect("raw disk");
    let mut config = vm.config().expect("config");
    config["disks"] = serde_json::json!([{"path": "disk0.raw", "read_only": false}]);
    snapshot::folder::write_config(&vm.config_path(), &config).expect("config");
    write_record(&vm, 0, 0, 1);
    let a = create_checkpoint(&vm, &standard("A"), &mut NoProgress).expect("A");
    write_record(&vm, 0, 1, 2);

    delete_checkpoint(&vm, a.id, &mut NoProgress).expect("delete A");

    let live = live_disk(&vm, 0);
    assert!(!raw.exists());
    assert_eq!(
        backing_chain(&live).expect("chain"),
        std::slice::from_ref(&live)
    );
    assert_eq!((read_record(&vm, 0, 0), read_record(&vm, 0, 1)), (1, 2));
    assert_images_clean(disk_files(&vm));
}
