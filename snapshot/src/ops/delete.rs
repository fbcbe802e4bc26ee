//! DestroySnapshot and DestroySnapshotTree: remove a checkpoint's config and state and merge its
//! disk layers so the chains shrink; its children take its parent.
//!
//! A deleted checkpoint's layer `L` is merged into its only child `K` by committing `K` into `L`
//! (so `L` then holds what `K` showed) and renaming `L` over `K`: `K`'s own children and every
//! config that names `K` stay valid, and the chain is one layer shorter. Both steps are idempotent
//! (the commit changes nothing `K` shows; the rename is atomic), so a crash is rolled forward. When
//! several branches grow from `L`, `L`'s data is copied up into each child, which is then rebased
//! onto `L`'s backing file ([`crate::rebase`]), and `L` is removed. A layer nothing uses any more
//! is removed. Layers are only ever merged or removed inside the VM's
//! own `disks/` folder: a base image elsewhere may be shared with other VMs.

use std::path::{Path, PathBuf};

use crate::commit::commit_into_backing;
use crate::disk::{Disk, DiskFormat};
use crate::durable::{remove_dir_all, remove_file, rename};
use crate::error::{Error, Result};
use crate::folder::VmFolder;
use crate::journal::{JOURNAL_VERSION, JournalEntry, Operation, Stage};
use crate::ops::{begin, checkpoint_disks, layered, owned_layers};
use crate::progress::Progress;
use crate::tree::CheckpointId;
use crate::tree::TreeFile;
use vmm_core::fault::point as fault_point;

/// Deletes checkpoint `id` (merging its layers).
pub fn delete_checkpoint(
    folder: &VmFolder,
    id: CheckpointId,
    progress: &mut dyn Progress,
) -> Result<()> {
    start(folder, id, false, progress)
}

/// Deletes checkpoint `id` and every checkpoint below it.
pub fn delete_checkpoint_tree(
    folder: &VmFolder,
    id: CheckpointId,
    progress: &mut dyn Progress,
) -> Result<()> {
    start(folder, id, true, progress)
}

fn start(
    folder: &VmFolder,
    id: CheckpointId,
    subtree: bool,
    progress: &mut dyn Progress,
) -> Result<()> {
    begin(folder)?;
    let tree = folder.tree()?;
    if tree.get(id).is_none() {
        return Err(Error::CheckpointNotFound(id.to_string()));
    }
    let checkpoints = if subtree {
        tree.subtree_post_order(id)
    } else {
        vec![id]
    };
    for &id in &checkpoints {
        ensure_not_in_use(folder, id)?;
    }
    let entry = JournalEntry {
        version: JOURNAL_VERSION,
        stage: Stage::Committed,
        operation: Operation::Delete {
            checkpoints: checkpoints.clone(),
        },
    };
    entry.write(&folder.journal_path())?;
    fault_point("snapshot.delete-journal");
    finish(folder, &checkpoints, progress)
}

/// Refuses, before anything is journaled, to merge a layer that a running VM reads: its worker
/// holds QEMU-style read locks on its whole chain, which a writer's lock conflicts with. (A
/// delete is always rolled forward once journaled, so it must not start what it cannot finish.)
fn ensure_not_in_use(folder: &VmFolder, id: CheckpointId) -> Result<()> {
    let (_, disks) = checkpoint_disks(folder, id)?;
    for disk in layered(&disks).filter(|d| d.path.starts_with(folder.disks_dir())) {
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk.path)
        {
            Ok(file) => file,
            // Already merged by an interrupted run: nothing to check.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io("open", &disk.path, e)),
        };
        crate::lock::lock_image(&file, &disk.path, crate::lock::LockMode::Write)?;
    }
    Ok(())
}

/// Deletes every checkpoint of `checkpoints` still present; idempotent.
pub(crate) fn finish(
    folder: &VmFolder,
    checkpoints: &[CheckpointId],
    progress: &mut dyn Progress,
) -> Result<()> {
    for &id in checkpoints {
        if folder.tree()?.get(id).is_some() {
            delete_one(folder, id, progress)?;
        }
        remove_dir_all(&folder.checkpoint_dir(id))?;
    }
    JournalEntry::clear(&folder.journal_path())
}

fn delete_one(folder: &VmFolder, id: CheckpointId, progress: &mut dyn Progress) -> Result<()> {
    let mut tree = folder.tree()?;
    let (_, disks) = checkpoint_disks(folder, id)?;
    let mut others = owned_layers(folder, &tree, Some(id))?;
    let live = folder.config()?;
    others.extend(layered(&folder.disks(&live, &folder.config_path())?).map(|d| d.path.clone()));
    for disk in layered(&disks) {
        merge_layer(folder, &disk.path, &others, progress)?;
    }
    tree.remove(id);
    tree.save(&folder.tree_path())?;
    fault_point("snapshot.delete-tree");
    remove_dir_all(&folder.checkpoint_dir(id))?;
    fault_point("snapshot.delete-folder");
    Ok(())
}

/// Merges (or removes) the layer `layer` that a deleted checkpoint owned. `others` are every
/// other layer in use (other checkpoints' and the live ones).
fn merge_layer(
    folder: &VmFolder,
    layer: &Path,
    others: &[PathBuf],
    progress: &mut dyn Progress,
) -> Result<()> {
    // Already merged by an interrupted run, outside our folder, or still used as-is elsewhere.
    if !layer.exists()
        || !layer.starts_with(folder.disks_dir())
        || others.iter().any(|o| o == layer)
    {
        return Ok(());
    }
    let mut children = Vec::new();
    for other in others.iter().filter(|o| o.exists()) {
        if let Some(parent) = parent_in_chain(other, layer)?
            && !children.contains(&parent)
        {
            children.push(parent);
        }
    }
    match children.as_slice() {
        [] => {
            remove_file(layer)?;
            fault_point("snapshot.delete-layer-removed");
        }
        // One child, both qcow2: fold the child into the layer and let the layer take its name.
        [child]
            if Disk::open_layer_only(layer)?.format() == DiskFormat::Qcow2
                && child.starts_with(folder.disks_dir()) =>
        {
            commit_into_backing(child, progress)?;
            fault_point("snapshot.delete-committed");
            rename(layer, child)?;
            fault_point("snapshot.delete-renamed");
        }
        // Several branches grow from this layer (or it is raw, so it cannot take a qcow2 child's
        // place): copy it up into each child and point each at its backing file; then nothing
        // uses it. A child outside our folder keeps it.
        children => {
            if children.iter().all(|c| c.starts_with(folder.disks_dir())) {
                for child in children {
                    crate::rebase::rebase_onto_grandparent(child, progress)?;
                    fault_point("snapshot.delete-rebased");
                }
                remove_file(layer)?;
                fault_point("snapshot.delete-layer-removed");
            }
        }
    }
    Ok(())
}

/// The layer directly above `layer` in `top`'s chain, if `layer` is in that chain.
fn parent_in_chain(top: &Path, layer: &Path) -> Result<Option<PathBuf>> {
    let chain = crate::disk::backing_chain(top)?;
    let position = chain.iter().position(|p| p == layer);
    Ok(position
        .and_then(|i| i.checked_sub(1))
        .map(|i| chain[i].clone()))
}
