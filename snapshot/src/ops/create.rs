//! CreateSnapshot of an Off or Saved VM: the checkpoint keeps the config (and saved state); every
//! writable disk's current layer becomes the checkpoint's (read-only from now on) and the VM
//! continues on a fresh overlay.

use std::path::PathBuf;
use std::time::SystemTime;

use serde_json::Value;

use crate::disk::create_overlay;
use crate::durable::{link_dir, remove_dir_all, remove_file, rename, size_of};
use crate::error::{Error, Result};
use crate::folder::{CONFIG_FILE, STATE_DIR, VmFolder, write_config};
use crate::journal::{JOURNAL_VERSION, JournalEntry, Operation, Stage};
use crate::ops::{begin, layered, new_layer_path};
use crate::progress::Progress;
use crate::tree::TreeFile;
use crate::tree::{Checkpoint, CheckpointId, CheckpointType, Consistency, validate_name};
use vmm_core::fault::point as fault_point;

pub use vmm_core::checkpoint::CreateRequest;

/// Creates a checkpoint of the (Off or Saved) VM in `folder`; returns it.
pub fn create_checkpoint(
    folder: &VmFolder,
    request: &CreateRequest,
    progress: &mut dyn Progress,
) -> Result<Checkpoint> {
    begin(folder)?;
    let tree = folder.tree()?;
    let config = folder.config()?;
    let disks = folder.disks(&config, &folder.config_path())?;
    let saved = folder.is_saved();
    let consistency = match (request.checkpoint_type, saved) {
        (CheckpointType::ProductionOnly, true) => return Err(Error::ProductionUnavailable),
        (CheckpointType::Production, true) => Consistency::StandardFallback,
        (CheckpointType::Standard, true) => Consistency::SavedState,
        (_, false) => Consistency::Off,
    };
    let checkpoint = new_node(&tree, &config, request, consistency, saved)?;
    let mut live_paths = Vec::new();
    let mut new_layers = Vec::new();
    for disk in &disks {
        if disk.read_only {
            live_paths.push(disk.path.clone());
        } else {
            let layer = new_layer_path(folder, &disk.path);
            live_paths.push(layer.clone());
            new_layers.push(layer);
        }
    }
    let new_config = folder.with_disk_paths(&config, &live_paths);
    let current_paths: Vec<PathBuf> = disks.iter().map(|d| d.path.clone()).collect();
    let checkpoint_config = folder.with_disk_paths(&config, &current_paths);

    let journal = folder.journal_path();
    let mut entry = JournalEntry {
        version: JOURNAL_VERSION,
        stage: Stage::Prepared,
        operation: Operation::Create {
            checkpoint: checkpoint.clone(),
            new_layers: new_layers.clone(),
            new_config: new_config.clone(),
        },
    };
    entry.write(&journal)?;
    fault_point("snapshot.create-journal");

    let prepared = (|| {
        write_checkpoint_folder(folder, checkpoint.id, &checkpoint_config, saved, progress)?;
        fault_point("snapshot.create-folder");
        for (disk, layer) in layered(&disks).zip(&new_layers) {
            create_overlay(layer, &disk.path)?;
            fault_point("snapshot.create-overlay");
        }
        Ok(())
    })();
    if let Err(e) = prepared {
        // Nothing the VM uses changed yet: undo, and report the first failure.
        let _ = roll_back(folder, &checkpoint, &new_layers);
        return Err(e);
    }

    entry.stage = Stage::Committed;
    entry.write(&journal)?;
    fault_point("snapshot.create-committed");
    finish(folder, &checkpoint, &new_config)?;
    Ok(checkpoint)
}

/// The tree node a create makes: under "Now", named as asked or by Hyper-V's default.
pub(crate) fn new_node(
    tree: &crate::tree::CheckpointTree,
    config: &Value,
    request: &CreateRequest,
    consistency: Consistency,
    has_saved_state: bool,
) -> Result<Checkpoint> {
    let created = SystemTime::now();
    let name = match &request.name {
        Some(name) => name.clone(),
        None => default_name(config, created),
    };
    validate_name(&name)?;
    Ok(Checkpoint {
        id: CheckpointId::new_random(),
        name,
        parent: tree.now,
        created,
        requested_type: request.checkpoint_type,
        consistency,
        has_saved_state,
        quiesce_failure: None,
    })
}

/// Assembles `checkpoints/.<id>.new/` (config, saved state) and renames it into place.
fn write_checkpoint_folder(
    folder: &VmFolder,
    id: CheckpointId,
    config: &Value,
    saved: bool,
    progress: &mut dyn Progress,
) -> Result<()> {
    let staging = folder.checkpoint_staging_dir(id);
    remove_dir_all(&staging)?;
    std::fs::create_dir(&staging).map_err(|e| Error::io("create", &staging, e))?;
    write_config(&staging.join(CONFIG_FILE), config)?;
    if saved {
        progress.add_total(size_of(&folder.state_dir()));
        link_dir(&folder.state_dir(), &staging.join(STATE_DIR), progress)?;
        fault_point("snapshot.create-state-copied");
    }
    rename(&staging, &folder.checkpoint_dir(id))
}

/// The steps after the commit point; idempotent.
pub(crate) fn finish(folder: &VmFolder, checkpoint: &Checkpoint, new_config: &Value) -> Result<()> {
    let mut tree = folder.tree()?;
    if tree.get(checkpoint.id).is_none() {
        tree.checkpoints.push(checkpoint.clone());
        tree.now = Some(checkpoint.id);
        tree.save(&folder.tree_path())?;
    }
    fault_point("snapshot.create-tree");
    write_config(&folder.config_path(), new_config)?;
    fault_point("snapshot.create-config");
    JournalEntry::clear(&folder.journal_path())
}

/// Undoes a create that did not reach its commit point.
pub(crate) fn roll_back(
    folder: &VmFolder,
    checkpoint: &Checkpoint,
    new_layers: &[PathBuf],
) -> Result<()> {
    for layer in new_layers {
        remove_file(layer)?;
    }
    remove_dir_all(&folder.checkpoint_staging_dir(checkpoint.id))?;
    remove_dir_all(&folder.checkpoint_dir(checkpoint.id))?;
    JournalEntry::clear(&folder.journal_path())
}

/// Hyper-V's default checkpoint name: `"<VM name> (MM/DD/YYYY - hh:mm:ss AM/PM)"` (UTC here),
/// cut to 100 characters.
fn default_name(config: &Value, at: SystemTime) -> String {
    let vm = config.get("name").and_then(Value::as_str).unwrap_or("VM");
    let secs = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    let (h, min, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let (h12, ampm) = match h {
        0 => (12, "AM"),
        1..=11 => (h, "AM"),
        12 => (12, "PM"),
        _ => (h - 12, "PM"),
    };
    let stamp = format!(" ({m:02}/{d:02}/{y:04} - {h12}:{min:02}:{s:02} {ampm})");
    let room = crate::tree::MAX_NAME_LEN - stamp.chars().count();
    let vm: String = vm.chars().filter(|c| !c.is_control()).take(room).collect();
    format!("{vm}{stamp}")
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_name_follows_hyper_v_format() {
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_764_377_445);

        let name = default_name(&serde_json::json!({"name": "web"}), at);

        assert_eq!(name, "web (11/29/2025 - 12:50:45 AM)");
    }
}
