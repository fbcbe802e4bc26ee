//! ApplySnapshot on an Off or Saved VM: the live config becomes the checkpoint's, each disk a
//! new overlay on the checkpoint's (read-only) layer; a checkpoint with saved state leaves the
//! VM Saved, one without leaves it Off. The previous "Now" layers that no checkpoint owns are
//! discarded, as Hyper-V discards the un-checkpointed state.

use std::path::PathBuf;

use serde_json::Value;

use crate::disk::{Disk, create_overlay};
use crate::durable::{link_dir, remove_dir_all, remove_file, rename, size_of};
use crate::error::{Error, Result};
use crate::folder::{MEMORY_FILE, STATE_DIR, STATE_FILE, VmFolder, write_config};
use crate::journal::{JOURNAL_VERSION, JournalEntry, Operation, Stage};
use crate::ops::{begin, checkpoint_disks, layered, new_layer_path, owned_layers};
use crate::progress::Progress;
use crate::tree::CheckpointId;
use crate::tree::TreeFile;
use vmm_core::fault::point as fault_point;

/// Applies checkpoint `id` to the VM in `folder` (which must not be running).
pub fn apply_checkpoint(
    folder: &VmFolder,
    id: CheckpointId,
    progress: &mut dyn Progress,
) -> Result<()> {
    begin(folder)?;
    let tree = folder.tree()?;
    let checkpoint = tree
        .get(id)
        .ok_or_else(|| Error::CheckpointNotFound(id.to_string()))?
        .clone();
    let (cp_config, cp_disks) = checkpoint_disks(folder, id)?;
    let cp_state = folder.checkpoint_dir(id).join(STATE_DIR);
    if checkpoint.has_saved_state {
        for file in [STATE_FILE, MEMORY_FILE] {
            if !cp_state.join(file).is_file() {
                return Err(Error::CheckpointIncomplete {
                    checkpoint: id.to_string(),
                    missing: cp_state.join(file),
                });
            }
        }
    }
    let live_config = folder.config()?;
    let live_disks = folder.disks(&live_config, &folder.config_path())?;
    let owned = owned_layers(folder, &tree, None)?;
    let discard_layers = discardable(folder, &live_disks, &owned)?;

    let mut paths = Vec::new();
    let mut new_layers = Vec::new();
    for disk in &cp_disks {
        if disk.read_only {
            paths.push(disk.path.clone());
        } else {
            let layer = new_layer_path(folder, &disk.path);
            paths.push(layer.clone());
            new_layers.push(layer);
        }
    }
    let new_config = folder.with_disk_paths(&cp_config, &paths);

    let journal = folder.journal_path();
    let mut entry = JournalEntry {
        version: JOURNAL_VERSION,
        stage: Stage::Prepared,
        operation: Operation::Apply {
            checkpoint: id,
            new_layers: new_layers.clone(),
            discard_layers: discard_layers.clone(),
            new_config: new_config.clone(),
            with_state: checkpoint.has_saved_state,
        },
    };
    // The disks are about to change under no worker: what their change tracking says since its
    // reference point no longer holds, so the next backup must be full.
    remove_file(&folder.change_tracking_path())?;
    entry.write(&journal)?;
    fault_point("snapshot.apply-journal");

    let prepared = (|| {
        for (disk, layer) in layered(&cp_disks).zip(&new_layers) {
            create_overlay(layer, &disk.path)?;
            fault_point("snapshot.apply-overlay");
        }
        if checkpoint.has_saved_state {
            let staging = folder.state_staging_dir();
            remove_dir_all(&staging)?;
            progress.add_total(size_of(&cp_state));
            link_dir(&cp_state, &staging, progress)?;
            fault_point("snapshot.apply-state-copied");
        }
        Ok(())
    })();
    if let Err(e) = prepared {
        // Nothing the VM uses changed yet: undo, and report the first failure.
        let _ = roll_back(folder, &new_layers);
        return Err(e);
    }

    entry.stage = Stage::Committed;
    entry.write(&journal)?;
    fault_point("snapshot.apply-committed");
    finish(
        folder,
        id,
        &new_config,
        &discard_layers,
        checkpoint.has_saved_state,
    )
}

/// Live layers that are our overlays on a checkpoint's layer and owned by no checkpoint: the
/// un-checkpointed "Now" state that apply throws away. Anything else (a user's base image, a disk
/// outside the VM folder) is never removed.
fn discardable(
    folder: &VmFolder,
    live: &[crate::folder::DiskEntry],
    owned: &[PathBuf],
) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for disk in layered(live) {
        let inside = disk.path.starts_with(folder.disks_dir());
        if !inside || owned.contains(&disk.path) || !disk.path.exists() {
            continue;
        }
        let backing = Disk::open_layer_only(&disk.path)?
            .backing_file()
            .map(PathBuf::from);
        if backing.is_some_and(|b| owned.contains(&b)) {
            out.push(disk.path.clone());
        }
    }
    Ok(out)
}

/// The steps after the commit point; idempotent.
pub(crate) fn finish(
    folder: &VmFolder,
    id: CheckpointId,
    new_config: &Value,
    discard_layers: &[PathBuf],
    with_state: bool,
) -> Result<()> {
    swap_state(folder, with_state)?;
    fault_point("snapshot.apply-state");
    let mut tree = folder.tree()?;
    if tree.now != Some(id) {
        tree.now = Some(id);
        tree.save(&folder.tree_path())?;
    }
    fault_point("snapshot.apply-tree");
    write_config(&folder.config_path(), new_config)?;
    fault_point("snapshot.apply-config");
    for layer in discard_layers {
        remove_file(layer)?;
    }
    fault_point("snapshot.apply-discard");
    JournalEntry::clear(&folder.journal_path())
}

/// Moves the staged saved state into `state/` (or removes `state/` when the checkpoint has
/// none), by renames that a re-run after a crash completes.
fn swap_state(folder: &VmFolder, with_state: bool) -> Result<()> {
    let (state, staging, retired) = (
        folder.state_dir(),
        folder.state_staging_dir(),
        folder.state_retired_dir(),
    );
    if !with_state || staging.is_dir() {
        if state.is_dir() {
            remove_dir_all(&retired)?;
            rename(&state, &retired)?;
        }
        if with_state {
            rename(&staging, &state)?;
        }
    }
    remove_dir_all(&retired)
}

/// Undoes an apply that did not reach its commit point.
pub(crate) fn roll_back(folder: &VmFolder, new_layers: &[PathBuf]) -> Result<()> {
    for layer in new_layers {
        remove_file(layer)?;
    }
    remove_dir_all(&folder.state_staging_dir())?;
    JournalEntry::clear(&folder.journal_path())
}
