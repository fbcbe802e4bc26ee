//! The seam vmm-core drives: the operations of `Msvm_VirtualSystemSnapshotService`, on one VM
//! folder, for a VM that is Off or Saved.

use std::path::Path;

use crate::error::Result;
use crate::folder::VmFolder;
use crate::ops::apply::apply_checkpoint;
use crate::ops::create::{CreateRequest, create_checkpoint};
use crate::ops::delete::{delete_checkpoint, delete_checkpoint_tree};
use crate::ops::export::{ExportMode, ImportMode, export_vm, import_vm};
use crate::ops::recover::{Recovery, recover};
use crate::progress::Progress;
use crate::tree::{Checkpoint, CheckpointId, CheckpointTree, validate_name};

/// `Msvm_VirtualSystemSnapshotService` for offline VMs. Every method works on one VM folder
/// (`vms/<GUID>`); the caller guarantees one operation per VM at a time and that the VM is not
/// running (a running VM's disks are locked, so a mistake fails with [`crate::Error::ImageLocked`]
/// rather than corrupting them). Long copies report through `progress`.
pub trait VirtualSystemSnapshotService: Send + Sync {
    /// CreateSnapshot: a new checkpoint under "Now"; "Now" moves to it.
    fn create_snapshot(
        &self,
        vm_dir: &Path,
        request: &CreateRequest,
        progress: &mut dyn Progress,
    ) -> Result<Checkpoint>;
    /// ApplySnapshot: the VM becomes the checkpoint's (Saved if it has saved state, else Off).
    fn apply_snapshot(
        &self,
        vm_dir: &Path,
        id: CheckpointId,
        progress: &mut dyn Progress,
    ) -> Result<()>;
    /// DestroySnapshot: delete one checkpoint, merging its disk layers.
    fn destroy_snapshot(
        &self,
        vm_dir: &Path,
        id: CheckpointId,
        progress: &mut dyn Progress,
    ) -> Result<()>;
    /// DestroySnapshotTree: delete a checkpoint and all below it.
    fn destroy_snapshot_tree(
        &self,
        vm_dir: &Path,
        id: CheckpointId,
        progress: &mut dyn Progress,
    ) -> Result<()>;
    /// Renames a checkpoint (ModifySystemSettings on the snapshot's `ElementName`).
    fn rename_snapshot(&self, vm_dir: &Path, id: CheckpointId, name: &str) -> Result<()>;
    /// The checkpoint tree (for `Msvm_SnapshotOfVirtualSystem` and friends).
    fn snapshots(&self, vm_dir: &Path) -> Result<CheckpointTree>;
    /// Exports the VM (Hyper-V's `Export-VM`).
    fn export(
        &self,
        vm_dir: &Path,
        target: &Path,
        mode: ExportMode,
        progress: &mut dyn Progress,
    ) -> Result<()>;
    /// Imports an export folder into the store's `vms/` folder (Hyper-V's `Import-VM`); returns
    /// the VM's id.
    fn import(
        &self,
        source: &Path,
        vms_dir: &Path,
        mode: ImportMode,
        progress: &mut dyn Progress,
    ) -> Result<uuid::Uuid>;
    /// Finishes or rolls back an operation a crash interrupted.
    fn recover(&self, vm_dir: &Path) -> Result<Recovery>;
}

/// The file-based implementation: checkpoints in the VM folder, disks as qcow2 chains.
#[derive(Debug, Default, Clone, Copy)]
pub struct OfflineSnapshotService;

impl VirtualSystemSnapshotService for OfflineSnapshotService {
    fn create_snapshot(
        &self,
        vm_dir: &Path,
        request: &CreateRequest,
        progress: &mut dyn Progress,
    ) -> Result<Checkpoint> {
        create_checkpoint(&VmFolder::new(vm_dir), request, progress)
    }

    fn apply_snapshot(
        &self,
        vm_dir: &Path,
        id: CheckpointId,
        progress: &mut dyn Progress,
    ) -> Result<()> {
        apply_checkpoint(&VmFolder::new(vm_dir), id, progress)
    }

    fn destroy_snapshot(
        &self,
        vm_dir: &Path,
        id: CheckpointId,
        progress: &mut dyn Progress,
    ) -> Result<()> {
        delete_checkpoint(&VmFolder::new(vm_dir), id, progress)
    }

    fn destroy_snapshot_tree(
        &self,
        vm_dir: &Path,
        id: CheckpointId,
        progress: &mut dyn Progress,
    ) -> Result<()> {
        delete_checkpoint_tree(&VmFolder::new(vm_dir), id, progress)
    }

    fn rename_snapshot(&self, vm_dir: &Path, id: CheckpointId, name: &str) -> Result<()> {
        rename_checkpoint(&VmFolder::new(vm_dir), id, name)
    }

    fn snapshots(&self, vm_dir: &Path) -> Result<CheckpointTree> {
        VmFolder::new(vm_dir).tree()
    }

    fn export(
        &self,
        vm_dir: &Path,
        target: &Path,
        mode: ExportMode,
        progress: &mut dyn Progress,
    ) -> Result<()> {
        export_vm(&VmFolder::new(vm_dir), target, mode, progress)
    }

    fn import(
        &self,
        source: &Path,
        vms_dir: &Path,
        mode: ImportMode,
        progress: &mut dyn Progress,
    ) -> Result<uuid::Uuid> {
        import_vm(source, vms_dir, mode, progress)
    }

    fn recover(&self, vm_dir: &Path) -> Result<Recovery> {
        recover(vm_dir)
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
    tree.save(&folder.tree_path())
}
