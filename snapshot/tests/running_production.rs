//! The file side of production checkpoints of a running VM (disks only, switched while the
//! guest is frozen): prepare, the worker's commit (simulated here: the overlays made and the
//! empty staging folder renamed to its marker), finish, and recovery after a crash on either
//! side of the commit point. Real VM folders, real qcow2 chains checked with `qemu-img`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common_qemu;
mod common_vm;

use std::path::{Path, PathBuf};

use common_qemu::assert_images_clean;
use common_vm::*;
use snapshot::journal::{JournalEntry, Stage};
use snapshot::{
    CheckpointType, Consistency, CreateRequest, DISKS_SWITCHED, Error, NoProgress, Recovery,
    RunningCapture, RunningCheckpoint, VmFolder, apply_checkpoint, create_overlay,
    finish_running_checkpoint, prepare_running_checkpoint, recover,
};
use vmm_core::CheckpointContent;

fn production(name: &str, checkpoint_type: CheckpointType) -> CreateRequest {
    CreateRequest {
        name: Some(name.into()),
        checkpoint_type,
    }
}

/// The checkpoint's staging folder (`checkpoints/.<id>.new`), parent of the worker's.
fn staging_of(running: &RunningCheckpoint) -> PathBuf {
    running
        .request
        .staging
        .parent()
        .expect("staging folder")
        .to_path_buf()
}

/// What the worker does up to its commit point: each overlay made on the disk's current
/// image; with `commit`, the (empty) staging folder renamed to `state_dir`.
fn worker_switches(vm: &VmFolder, running: &RunningCheckpoint, commit: bool) {
    for overlay in &running.request.overlays {
        create_overlay(&overlay.path, &live_disk(vm, overlay.disk)).expect("overlay");
    }
    if commit {
        std::fs::rename(&running.request.staging, &running.request.state_dir).expect("commit");
    }
}

fn overlay_paths(running: &RunningCheckpoint) -> Vec<PathBuf> {
    running
        .request
        .overlays
        .iter()
        .map(|o| o.path.clone())
        .collect()
}

#[test]
fn prepare_asks_the_worker_for_the_disks_only_and_records_a_production_node() {
    let root = tempfile::tempdir().expect("tempdir");
    let vm = make_vm(root.path(), 2);

    let running = prepare_running_checkpoint(
        &vm,
        &production("app", CheckpointType::ProductionOnly),
        &RunningCapture::FrozenDisks,
    )
    .expect("prepare");

    assert_eq!(running.request.content, CheckpointContent::FrozenDisks);
    assert_eq!(running.checkpoint.consistency, Consistency::Production);
    assert!(!running.checkpoint.has_saved_state);
    assert!(running.request.parent_state_dir.is_none());
    assert_eq!(
        running
            .request
            .state_dir
            .file_name()
            .and_then(|n| n.to_str()),
        Some(DISKS_SWITCHED)
    );
    assert_eq!(running.request.overlays.len(), 2);
    assert!(running.request.staging.is_dir());
}

#[test]
fn committed_production_checkpoint_joins_the_tree_without_state_and_applies_to_off() {
    let root = tempfile::tempdir().expect("tempdir");
    let vm = make_vm(root.path(), 1);
    write_record(&vm, 0, 0, 0x11);
    let running = prepare_running_checkpoint(
        &vm,
        &production("app", CheckpointType::Production),
        &RunningCapture::FrozenDisks,
    )
    .expect("prepare");
    worker_switches(&vm, &running, true);

    let cp = finish_running_checkpoint(&vm, &running).expect("finish");

    let tree = vm.tree().expect("tree");
    let folder = vm.checkpoint_dir(cp.id);
    assert_eq!(tree.now, Some(cp.id));
    assert_eq!(
        tree.get(cp.id).map(|c| c.consistency),
        Some(Consistency::Production)
    );
    assert_eq!(live_disk(&vm, 0), running.request.overlays[0].path);
    assert!(folder.join("config.json").is_file());
    assert!(!folder.join("state").exists(), "no saved state");
    assert!(!folder.join(DISKS_SWITCHED).exists(), "the marker is gone");
    assert!(!staging_of(&running).exists());
    assert!(
        JournalEntry::read(&vm.journal_path())
            .expect("journal")
            .is_none()
    );
    write_record(&vm, 0, 0, 0x22);
    apply_checkpoint(&vm, cp.id, &mut NoProgress).expect("apply");
    assert!(
        !vm.is_saved(),
        "a production checkpoint applies to an Off VM"
    );
    assert_eq!(read_record(&vm, 0, 0), 0x11);
    assert_images_clean(disk_files(&vm));
}

#[test]
fn production_checkpoint_the_worker_did_not_commit_leaves_nothing() {
    let root = tempfile::tempdir().expect("tempdir");
    let vm = make_vm(root.path(), 1);
    let disk_before = live_disk(&vm, 0);
    let config_before = vm.config().expect("config");
    let running = prepare_running_checkpoint(
        &vm,
        &production("app", CheckpointType::ProductionOnly),
        &RunningCapture::FrozenDisks,
    )
    .expect("prepare");
    worker_switches(&vm, &running, false);

    let result = finish_running_checkpoint(&vm, &running);

    assert!(matches!(result, Err(Error::NotTaken)), "{result:?}");
    assert!(vm.tree().expect("tree").checkpoints.is_empty());
    assert_eq!(vm.config().expect("config"), config_before);
    assert_eq!(live_disk(&vm, 0), disk_before);
    assert!(overlay_paths(&running).iter().all(|p| !p.exists()));
    assert!(!staging_of(&running).exists());
    assert!(
        JournalEntry::read(&vm.journal_path())
            .expect("journal")
            .is_none()
    );
    assert_images_clean(disk_files(&vm));
}

/// Prepares a production checkpoint and lets the worker go as far as `commit` says; the
/// service "crashes" before finishing.
fn interrupted(root: &Path, commit: bool) -> (VmFolder, RunningCheckpoint) {
    let vm = make_vm(root, 1);
    let running = prepare_running_checkpoint(
        &vm,
        &production("app", CheckpointType::Production),
        &RunningCapture::FrozenDisks,
    )
    .expect("prepare");
    worker_switches(&vm, &running, commit);
    (vm, running)
}

#[test]
fn recovery_rolls_a_committed_production_checkpoint_forward() {
    let root = tempfile::tempdir().expect("tempdir");
    let (vm, running) = interrupted(root.path(), true);

    let recovery = recover(vm.dir()).expect("recover");

    assert_eq!(recovery, Recovery::RolledForward("running create"));
    let tree = vm.tree().expect("tree");
    assert_eq!(tree.now, Some(running.checkpoint.id));
    assert_eq!(live_disk(&vm, 0), running.request.overlays[0].path);
    assert!(
        !vm.checkpoint_dir(running.checkpoint.id)
            .join(DISKS_SWITCHED)
            .exists()
    );
    assert_eq!(recover(vm.dir()).expect("again"), Recovery::Clean);
    assert_images_clean(disk_files(&vm));
}

#[test]
fn recovery_removes_an_uncommitted_production_checkpoint_and_its_overlays() {
    let root = tempfile::tempdir().expect("tempdir");
    let (vm, running) = interrupted(root.path(), false);
    let disk_before = live_disk(&vm, 0);

    let recovery = recover(vm.dir()).expect("recover");

    assert_eq!(recovery, Recovery::RolledBack("running create"));
    assert!(vm.tree().expect("tree").checkpoints.is_empty());
    assert_eq!(live_disk(&vm, 0), disk_before);
    assert!(overlay_paths(&running).iter().all(|p| !p.exists()));
    assert!(!staging_of(&running).exists());
    assert_images_clean(disk_files(&vm));
}

#[test]
fn recovery_after_the_marker_was_removed_trusts_the_committed_journal() {
    let root = tempfile::tempdir().expect("tempdir");
    let (vm, running) = interrupted(root.path(), true);
    // A roll-forward that crashed after moving the folder and dropping the marker.
    let mut entry = JournalEntry::read(&vm.journal_path())
        .expect("journal")
        .expect("an entry");
    entry.stage = Stage::Committed;
    entry.write(&vm.journal_path()).expect("journal");
    let target = vm.checkpoint_dir(running.checkpoint.id);
    std::fs::remove_dir_all(&running.request.state_dir).expect("marker");
    std::fs::rename(staging_of(&running), &target).expect("move");

    let recovery = recover(vm.dir()).expect("recover");

    assert_eq!(recovery, Recovery::RolledForward("running create"));
    assert_eq!(vm.tree().expect("tree").now, Some(running.checkpoint.id));
    assert_eq!(live_disk(&vm, 0), running.request.overlays[0].path);
    assert!(overlay_paths(&running).iter().all(|p| p.exists()));
    assert_images_clean(disk_files(&vm));
}

#[test]
fn a_fallback_records_why_and_production_only_never_falls_back() {
    let root = tempfile::tempdir().expect("tempdir");
    let vm = make_vm(root.path(), 1);
    let capture = RunningCapture::SavedState {
        quiesce_failure: Some("the guest agent does not answer".into()),
    };

    let only = prepare_running_checkpoint(
        &vm,
        &production("only", CheckpointType::ProductionOnly),
        &capture,
    );
    let standard_disks_only = prepare_running_checkpoint(
        &vm,
        &production("std", CheckpointType::Standard),
        &RunningCapture::FrozenDisks,
    );
    let fallback = prepare_running_checkpoint(
        &vm,
        &production("fallback", CheckpointType::Production),
        &capture,
    )
    .expect("prepare");

    assert!(
        matches!(only, Err(Error::ProductionUnavailable)),
        "{only:?}"
    );
    assert!(standard_disks_only.is_err());
    assert_eq!(
        fallback.checkpoint.consistency,
        Consistency::StandardFallback
    );
    assert!(fallback.checkpoint.has_saved_state);
    assert_eq!(fallback.request.content, CheckpointContent::SavedState);
    assert_eq!(
        fallback.checkpoint.quiesce_failure.as_deref(),
        Some("the guest agent does not answer")
    );
}
