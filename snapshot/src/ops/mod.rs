//! The offline checkpoint operations on one VM folder, each journaled (see [`crate::journal`]).

pub mod apply;
pub mod create;
pub mod delete;
pub mod export;
pub mod recover;
pub mod running;

use std::path::{Path, PathBuf};

use crate::durable::create_dir_all;
use crate::error::{Error, Result};
use crate::folder::{DiskEntry, VmFolder, read_config};
use crate::journal::JournalEntry;
use crate::tree::{CheckpointId, CheckpointTree};

/// Refuses to start while an interrupted operation awaits [`recover::recover`]; makes sure
/// `checkpoints/` exists.
pub(crate) fn begin(folder: &VmFolder) -> Result<()> {
    if let Some(entry) = JournalEntry::read(&folder.journal_path())? {
        return Err(Error::RecoveryNeeded(entry.operation.name().into()));
    }
    create_dir_all(&folder.checkpoints_dir())
}

/// A fresh layer name next to the VM's disks: `<stem>~<8 hex>.qcow2`, where stem is the disk's
/// original name (before any `~`), so layers of one disk sort together.
pub(crate) fn new_layer_path(folder: &VmFolder, current: &Path) -> PathBuf {
    let name = current
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "disk".into());
    let stem = name.split('~').next().unwrap_or("disk");
    let tag = uuid::Uuid::new_v4().simple().to_string();
    folder
        .disks_dir()
        .join(format!("{stem}~{}.qcow2", &tag[..8]))
}

/// The layered (writable) disks of a config.
pub(crate) fn layered(disks: &[DiskEntry]) -> impl Iterator<Item = &DiskEntry> {
    disks.iter().filter(|d| !d.read_only)
}

/// A checkpoint's config and its disks (layers it owns).
pub(crate) fn checkpoint_disks(
    folder: &VmFolder,
    id: CheckpointId,
) -> Result<(serde_json::Value, Vec<DiskEntry>)> {
    let path = folder.checkpoint_dir(id).join(crate::folder::CONFIG_FILE);
    if !path.is_file() {
        return Err(Error::CheckpointIncomplete {
            checkpoint: id.to_string(),
            missing: path,
        });
    }
    let config = read_config(&path)?;
    let disks = folder.disks(&config, &path)?;
    Ok((config, disks))
}

/// Every layer some checkpoint of the tree owns (except `except`).
pub(crate) fn owned_layers(
    folder: &VmFolder,
    tree: &CheckpointTree,
    except: Option<CheckpointId>,
) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for cp in tree.checkpoints.iter().filter(|c| Some(c.id) != except) {
        let (_, disks) = checkpoint_disks(folder, cp.id)?;
        out.extend(layered(&disks).map(|d| d.path.clone()));
    }
    Ok(out)
}
