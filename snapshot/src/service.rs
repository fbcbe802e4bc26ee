//! vmm-core's [`VirtualSystemSnapshotService`] over the files of one VM folder.

use std::path::Path;

use vmm_core::checkpoint::{
    CheckpointError, CreateRequest, ExportMode, ImportMode, Progress, Recovery, RunningCapture,
    RunningCheckpoint, VirtualSystemSnapshotService,
};
use vmm_core::{VmId, fault::point as fault_point};

use crate::disk::create_qcow2;
use crate::error::Result;
use crate::folder::VmFolder;
use crate::ops::apply::apply_checkpoint;
use crate::ops::create::create_checkpoint;
use crate::ops::delete::{delete_checkpoint, delete_checkpoint_tree};
use crate::ops::export::{export_vm, import_vm};
use crate::ops::recover::recover;
use crate::ops::running;
use crate::tree::{Checkpoint, CheckpointId, CheckpointTree, TreeFile, validate_name};

/// Checkpoints in the VM folder (`checkpoints/`: tree, journal, one folder per checkpoint),
/// disks as qcow2 chains. Stateless: every call works on the folder it is given.
#[derive(Debug, Default, Clone, Copy)]
pub struct FolderSnapshotService;

impl VirtualSystemSnapshotService for FolderSnapshotService {
    fn create_snapshot(
        &self,
        vm_dir: &Path,
        request: &CreateRequest,
        progress: &mut dyn Progress,
    ) -> Result<Checkpoint, CheckpointError> {
        Ok(create_checkpoint(
            &VmFolder::new(vm_dir),
            request,
            progress,
        )?)
    }

    fn prepare_running_snapshot(
        &self,
        vm_dir: &Path,
        request: &CreateRequest,
        capture: &RunningCapture,
    ) -> Result<RunningCheckpoint, CheckpointError> {
        Ok(running::prepare(&VmFolder::new(vm_dir), request, capture)?)
    }

    fn finish_running_snapshot(
        &self,
        vm_dir: &Path,
        running: &RunningCheckpoint,
    ) -> Result<Checkpoint, CheckpointError> {
        Ok(running::finish(&VmFolder::new(vm_dir), running)?)
    }

    fn apply_snapshot(
        &self,
        vm_dir: &Path,
        id: CheckpointId,
        progress: &mut dyn Progress,
    ) -> Result<(), CheckpointError> {
        Ok(apply_checkpoint(&VmFolder::new(vm_dir), id, progress)?)
    }

    fn destroy_snapshot(
        &self,
        vm_dir: &Path,
        id: CheckpointId,
        progress: &mut dyn Progress,
    ) -> Result<(), CheckpointError> {
        Ok(delete_checkpoint(&VmFolder::new(vm_dir), id, progress)?)
    }

    fn destroy_snapshot_tree(
        &self,
        vm_dir: &Path,
        id: CheckpointId,
        progress: &mut dyn Progress,
    ) -> Result<(), CheckpointError> {
        Ok(delete_checkpoint_tree(
            &VmFolder::new(vm_dir),
            id,
            progress,
        )?)
    }

    fn rename_snapshot(
        &self,
        vm_dir: &Path,
        id: CheckpointId,
        name: &str,
    ) -> Result<(), CheckpointError> {
        Ok(rename_checkpoint(&VmFolder::new(vm_dir), id, name)?)
    }

    fn snapshots(&self, vm_dir: &Path) -> Result<CheckpointTree, CheckpointError> {
        Ok(VmFolder::new(vm_dir).tree()?)
    }

    fn export(
        &self,
        vm_dir: &Path,
        target: &Path,
        mode: ExportMode,
        progress: &mut dyn Progress,
    ) -> Result<(), CheckpointError> {
        Ok(export_vm(&VmFolder::new(vm_dir), target, mode, progress)?)
    }

    fn import(
        &self,
        source: &Path,
        vms_dir: &Path,
        mode: ImportMode,
        progress: &mut dyn Progress,
    ) -> Result<VmId, CheckpointError> {
        Ok(import_vm(source, vms_dir, mode, progress)?)
    }

    fn create_disk(&self, path: &Path, size: u64) -> Result<(), CheckpointError> {
        Ok(create_qcow2(path, size)?)
    }

    fn recover(&self, vm_dir: &Path) -> Result<Recovery, CheckpointError> {
        Ok(recover(vm_dir)?)
    }
}

/// Renames a checkpoint: one atomic write of the tree, so no journal.
pub fn rename_checkpoint(folder: &VmFolder, id: CheckpointId, name: &str) -> Result<()> {
    validate_name(name)?;
    crate::ops::begin(folder)?;
    let mut tree = folder.tree()?;
    let checkpoint = tree
        .checkpoints
        .iter_mut()
        .find(|c| c.id == id)
        .ok_or_else(|| crate::Error::CheckpointNotFound(id.to_string()))?;
    checkpoint.name = name.to_string();
    fault_point("snapshot.rename");
    tree.save(&folder.tree_path())
}
