//! One VM's folder in the store (DESIGN.md §5):
//! `vms/<GUID>/{config.json, disks/, state/, checkpoints/{tree.json, journal.json, <cp-guid>/}}`.
//!
//! The VM's `config.json` belongs to vmm-core; this crate reads and rewrites only the fields it
//! must (`id` and each disk's `path`, `read_only`) and keeps every other field as it found it,
//! so it does not depend on vmm-core's config type.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::durable::write_atomic;
use crate::error::{Error, Result};
use crate::tree::TreeFile;
use crate::tree::{CheckpointId, CheckpointTree};

/// Name of the VM's (and a checkpoint's) configuration file.
pub const CONFIG_FILE: &str = "config.json";
/// The saved state folder of a Saved VM (and of a checkpoint with saved state).
pub const STATE_DIR: &str = "state";
/// The device/vCPU state file inside a state folder.
pub const STATE_FILE: &str = "state.json";
/// The guest memory file inside a state folder.
pub const MEMORY_FILE: &str = "memory.bin";
/// The VM's persistent change tracking (Resilient Change Tracking): its worker keeps the disks'
/// changed-block maps here across clean stops. An offline change of the disks' contents (a
/// checkpoint applied) removes it, so the next backup is full.
pub const CHANGE_TRACKING_FILE: &str = "change-tracking.json";

/// Paths of one VM folder.
#[derive(Debug, Clone)]
pub struct VmFolder {
    dir: PathBuf,
}

/// One disk of a config: its resolved path and whether the guest sees it read-only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskEntry {
    /// The image (resolved against `disks/`).
    pub path: PathBuf,
    /// Read-only disks are shared by every checkpoint and never layered.
    pub read_only: bool,
}

impl VmFolder {
    /// The folder `dir` (`vms/<GUID>`).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        VmFolder { dir: dir.into() }
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `config.json`.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join(CONFIG_FILE)
    }

    /// `change-tracking.json`.
    pub fn change_tracking_path(&self) -> PathBuf {
        self.dir.join(CHANGE_TRACKING_FILE)
    }

    /// `disks/`.
    pub fn disks_dir(&self) -> PathBuf {
        self.dir.join("disks")
    }

    /// `state/`: present exactly when the VM is Saved.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join(STATE_DIR)
    }

    /// Where a new saved state is assembled before it replaces `state/`.
    pub(crate) fn state_staging_dir(&self) -> PathBuf {
        self.dir.join(".state.new")
    }

    /// Where the old saved state waits while the new one moves in.
    pub(crate) fn state_retired_dir(&self) -> PathBuf {
        self.dir.join(".state.old")
    }

    /// `checkpoints/`.
    pub fn checkpoints_dir(&self) -> PathBuf {
        self.dir.join("checkpoints")
    }

    /// `checkpoints/tree.json`.
    pub fn tree_path(&self) -> PathBuf {
        self.checkpoints_dir().join("tree.json")
    }

    /// `checkpoints/journal.json`: the operation in flight, if any.
    pub fn journal_path(&self) -> PathBuf {
        self.checkpoints_dir().join("journal.json")
    }

    /// `checkpoints/<id>/`.
    pub fn checkpoint_dir(&self, id: CheckpointId) -> PathBuf {
        self.checkpoints_dir().join(id.to_string())
    }

    /// Where a checkpoint's folder is assembled before it is renamed into place.
    pub(crate) fn checkpoint_staging_dir(&self, id: CheckpointId) -> PathBuf {
        self.checkpoints_dir().join(format!(".{id}.new"))
    }

    /// Whether the VM is Saved (has a saved state).
    pub fn is_saved(&self) -> bool {
        self.state_dir().is_dir()
    }

    /// Loads the checkpoint tree.
    pub fn tree(&self) -> Result<CheckpointTree> {
        CheckpointTree::load(&self.tree_path())
    }

    /// Loads the VM's config.
    pub fn config(&self) -> Result<Value> {
        read_config(&self.config_path())
    }

    /// Resolves a config's disks against this folder's `disks/`.
    pub fn disks(&self, config: &Value, config_path: &Path) -> Result<Vec<DiskEntry>> {
        let Some(disks) = config.get("disks").and_then(Value::as_array) else {
            return Err(invalid(config_path, "no disks array"));
        };
        disks
            .iter()
            .map(|d| {
                let path = d
                    .get("path")
                    .and_then(Value::as_str)
                    .ok_or_else(|| invalid(config_path, "a disk has no path"))?;
                let read_only = d.get("read_only").and_then(Value::as_bool).unwrap_or(false);
                Ok(DiskEntry {
                    path: self.disks_dir().join(path),
                    read_only,
                })
            })
            .collect()
    }

    /// A copy of `config` with disk `i`'s path set to `path` (stored relative to `disks/` when
    /// inside it, so the folder can move).
    pub fn with_disk_paths(&self, config: &Value, paths: &[PathBuf]) -> Value {
        let mut config = config.clone();
        if let Some(disks) = config.get_mut("disks").and_then(Value::as_array_mut) {
            for (disk, path) in disks.iter_mut().zip(paths) {
                let stored = self.relative_disk_path(path);
                disk["path"] = Value::String(stored.to_string_lossy().into_owned());
            }
        }
        config
    }

    /// `path` relative to `disks/` when it is inside it, else as given.
    pub fn relative_disk_path(&self, path: &Path) -> PathBuf {
        path.strip_prefix(self.disks_dir())
            .map(Path::to_path_buf)
            .unwrap_or_else(|_| path.to_path_buf())
    }
}

/// Reads a config file as JSON.
pub fn read_config(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
    serde_json::from_slice(&bytes).map_err(|source| Error::Corrupt {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a config file atomically.
pub fn write_config(path: &Path, config: &Value) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(config).map_err(|source| Error::Corrupt {
        path: path.to_path_buf(),
        source,
    })?;
    write_atomic(path, &bytes)
}

fn invalid(path: &Path, reason: &str) -> Error {
    Error::Invalid {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}
