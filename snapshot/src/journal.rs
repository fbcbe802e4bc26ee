//! The journal of the operation in flight (`checkpoints/journal.json`).
//!
//! Every multi-step operation writes its entry before its first step, then works in two stages:
//! `Prepared` (only new files made, nothing the VM uses changed: a crash rolls back by deleting
//! them) and `Committed` (rewritten at the commit point: a crash rolls forward, every remaining
//! step being idempotent). [`crate::recover`] reads it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::durable::{remove_file, write_atomic};
use crate::error::{Error, Result};
use crate::tree::{Checkpoint, CheckpointId};

/// Schema version of the journal.
pub const JOURNAL_VERSION: u32 = 1;

/// How far an operation got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    /// Before the commit point: recovery undoes it.
    Prepared,
    /// After the commit point: recovery finishes it.
    Committed,
}

/// One operation in flight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Operation {
    /// Creating `checkpoint`: new live layers `new_layers`, the live config becomes `new_config`.
    Create {
        /// The new node.
        checkpoint: Checkpoint,
        /// Overlays made for the VM to continue on.
        new_layers: Vec<PathBuf>,
        /// The VM's config after the operation.
        new_config: Value,
    },
    /// Creating `checkpoint` of a running VM: its worker fills and commits the state folder and
    /// creates `new_layers`; the live config becomes `new_config` once it has committed.
    CreateRunning {
        /// The new node.
        checkpoint: Checkpoint,
        /// Overlays the worker creates and continues on.
        new_layers: Vec<PathBuf>,
        /// The VM's config after the operation.
        new_config: Value,
    },
    /// Applying `checkpoint`.
    Apply {
        /// The checkpoint applied.
        checkpoint: CheckpointId,
        /// Overlays made on the checkpoint's layers.
        new_layers: Vec<PathBuf>,
        /// The previous live layers that no checkpoint owns: removed once committed.
        discard_layers: Vec<PathBuf>,
        /// The VM's config after the operation.
        new_config: Value,
        /// Whether the VM ends Saved (the checkpoint's saved state is moved in).
        with_state: bool,
    },
    /// Deleting checkpoints, in this order (one, or a subtree children first). Always rolled
    /// forward: each merge is idempotent.
    Delete {
        /// The checkpoints to delete.
        checkpoints: Vec<CheckpointId>,
    },
    /// Exporting into `staging`, renamed to `target` when complete; a crash removes `staging`.
    Export {
        /// The folder being filled.
        staging: PathBuf,
        /// Its final name.
        target: PathBuf,
    },
}

impl Operation {
    /// A short name for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Operation::Create { .. } => "create",
            Operation::CreateRunning { .. } => "running create",
            Operation::Apply { .. } => "apply",
            Operation::Delete { .. } => "delete",
            Operation::Export { .. } => "export",
        }
    }
}

/// The journal file's contents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// [`JOURNAL_VERSION`].
    pub version: u32,
    /// The stage reached.
    pub stage: Stage,
    /// The operation.
    pub operation: Operation,
}

impl JournalEntry {
    /// Writes the entry (atomically, durably).
    pub fn write(&self, path: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|source| Error::Corrupt {
            path: path.to_path_buf(),
            source,
        })?;
        write_atomic(path, &bytes)
    }

    /// Reads the entry, if any.
    pub fn read(path: &Path) -> Result<Option<Self>> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read", path, e)),
        };
        let entry: JournalEntry =
            serde_json::from_slice(&bytes).map_err(|source| Error::Corrupt {
                path: path.to_path_buf(),
                source,
            })?;
        if entry.version != JOURNAL_VERSION {
            return Err(Error::Invalid {
                path: path.to_path_buf(),
                reason: format!("unknown journal version {}", entry.version),
            });
        }
        Ok(Some(entry))
    }

    /// Removes the journal: the operation is complete.
    pub fn clear(path: &Path) -> Result<()> {
        remove_file(path)
    }
}
