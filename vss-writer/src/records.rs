//! What a backup keeps in the VM's folder between sessions and across crashes.
//!
//! - `backup-session.json`, the session journal: written before the disks are switched to
//!   overlays and removed once they are merged back, so a service that dies in between knows at
//!   start-up which overlays to merge and which partial set to remove.
//! - `backup-reference.json`: the reference point and set of the VM's last completed backup, the
//!   base the next incremental builds on.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vmm_core::DiskOverlay;
use vmm_core::integration::ReferencePointId;

use crate::error::{Error, Result};

/// The session journal's file name in the VM's folder.
pub const SESSION_FILE: &str = "backup-session.json";
/// The last backup's record in the VM's folder.
pub const REFERENCE_FILE: &str = "backup-reference.json";

/// A session in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionJournal {
    /// The set being written (removed unless it has its manifest).
    pub set: PathBuf,
    /// The overlays the capture creates (some may not exist yet).
    pub overlays: Vec<DiskOverlay>,
}

/// The VM's last completed backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastBackup {
    /// The reference point its capture started.
    pub reference: ReferencePointId,
    /// Its set's folder (absolute).
    pub set: PathBuf,
    /// Its set's id.
    pub set_id: Uuid,
}

impl SessionJournal {
    /// Writes the journal durably.
    pub fn write(&self, vm_dir: &Path) -> Result<()> {
        write_json(&vm_dir.join(SESSION_FILE), self)
    }

    /// The journal of an interrupted session, if any.
    pub fn read(vm_dir: &Path) -> Result<Option<SessionJournal>> {
        read_json(&vm_dir.join(SESSION_FILE))
    }

    /// Ends the session's record.
    pub fn clear(vm_dir: &Path) -> Result<()> {
        Ok(snapshot::durable::remove_file(&vm_dir.join(SESSION_FILE))?)
    }
}

impl LastBackup {
    /// Records the VM's last backup durably.
    pub fn write(&self, vm_dir: &Path) -> Result<()> {
        write_json(&vm_dir.join(REFERENCE_FILE), self)
    }

    /// The VM's last backup, if one is recorded. An unreadable record counts as none (the next
    /// backup is then full, which is always safe).
    pub fn read(vm_dir: &Path) -> Option<LastBackup> {
        read_json(&vm_dir.join(REFERENCE_FILE)).ok().flatten()
    }

    /// Forgets the last backup (its reference no longer describes the disks).
    pub fn clear(vm_dir: &Path) -> Result<()> {
        Ok(snapshot::durable::remove_file(
            &vm_dir.join(REFERENCE_FILE),
        )?)
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(Error::Encode)?;
    vmm_core::atomic_file::write_atomic(path, &bytes).map_err(|e| Error::Io {
        op: "write",
        path: path.to_path_buf(),
        source: e,
    })
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::InvalidParameter(format!("{} is damaged: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Io {
            op: "read",
            path: path.to_path_buf(),
            source: e,
        }),
    }
}
