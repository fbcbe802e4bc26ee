//! The seam to Hyper-V's VSS writer: backing up a virtual machine while it runs, and the backup
//! sets that result.
//!
//! The service decides *whether* a backup may run and owns the VM for its length (so it never
//! races a start, a save or a checkpoint); the installed [`VirtualSystemBackupService`] (the
//! `vss-writer` crate's, or an integrator's own) runs the session — the guest freeze through the
//! worker's integration channel, the disks' point-in-time capture, the copy, the merge — and
//! owns the set's format.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::checkpoint::Progress;
use crate::config::{VmConfig, VmId};
use crate::integration::ReferencePointId;
use crate::worker::{Worker, WorkerError};

/// What the caller asks of a backup (Hyper-V: the requester's backup options).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRequest {
    /// The set's folder; must not exist (its parent must).
    pub target: PathBuf,
    /// Copy only what changed since the VM's last backup. Falls back to a full backup (and the
    /// report says why) when the change tracking cannot vouch for that reference point.
    pub incremental: bool,
    /// The longest the guest's file systems may stay frozen (the default 10 s is VSS's hold
    /// limit); the worker thaws the guest itself at the limit.
    pub freeze_limit: Duration,
    /// What to do when the guest cannot be quiesced.
    pub freeze_policy: FreezePolicy,
}

impl BackupRequest {
    /// A full backup into `target` with the defaults: 10 s freeze limit, crash-consistent
    /// fallback.
    pub fn new(target: impl Into<PathBuf>) -> Self {
        BackupRequest {
            target: target.into(),
            incremental: false,
            freeze_limit: Duration::from_secs(10),
            freeze_policy: FreezePolicy::FallBackToCrashConsistent,
        }
    }
}

/// What a backup does when the guest's agent does not freeze it (Hyper-V's production checkpoint
/// fallback policies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FreezePolicy {
    /// Take the backup crash-consistent and say so in the set.
    FallBackToCrashConsistent,
    /// Fail the backup; the VM runs on untouched.
    Fail,
}

/// How consistent a set's disks are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackupConsistency {
    /// The guest's agent flushed and froze its file systems for the capture.
    ApplicationConsistent,
    /// The disks as a power cut would have left them.
    CrashConsistent,
}

impl fmt::Display for BackupConsistency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackupConsistency::ApplicationConsistent => "application-consistent",
            BackupConsistency::CrashConsistent => "crash-consistent",
        })
    }
}

/// Whether a set stands alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackupKind {
    /// Every allocated block of every disk.
    Full,
    /// The blocks changed since the set it builds on.
    Incremental,
}

impl fmt::Display for BackupKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackupKind::Full => "full",
            BackupKind::Incremental => "incremental",
        })
    }
}

/// What a backup session did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupReport {
    /// The set's folder.
    pub set: PathBuf,
    /// Full or incremental.
    pub kind: BackupKind,
    /// Why it is full although an incremental was asked.
    pub full_reason: Option<String>,
    /// How consistent it is, and why when not application-consistent.
    pub consistency: BackupConsistency,
    /// Why the guest was not quiesced, when it was not.
    pub consistency_reason: Option<String>,
    /// How long the guest's file systems were frozen, when they were.
    pub freeze_window: Option<Duration>,
    /// Bytes of disk data written into the set.
    pub bytes_copied: u64,
    /// Bytes the change tracking reported changed (the whole allocated disk for a full set).
    pub bytes_changed: u64,
    /// The reference point the next incremental builds on.
    pub reference: ReferencePointId,
}

/// What a set holds, read from its manifest (`get-vm-backup`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupSetInfo {
    /// The backed-up VM's id.
    pub vm: VmId,
    /// Its name when backed up.
    pub vm_name: String,
    /// When the disks were captured.
    pub created: SystemTime,
    /// The sets a restore reads, this one first, down to the full one.
    pub chain: Vec<PathBuf>,
    /// What the session that wrote the set reported.
    pub report: BackupReport,
}

/// Where a restore puts the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreTarget {
    /// A new VM with a new id, named as given (or as the backed-up VM).
    NewVm {
        /// The new VM's name.
        name: Option<String>,
    },
    /// The backed-up VM itself, which must be Off: its disks are replaced by the set's.
    ReplaceVm,
}

/// Why a backup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The request cannot be honoured as given.
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
    /// The set is damaged, incomplete or not a backup set; it was not used.
    #[error("backup set {set} is not valid: {reason}")]
    InvalidSet {
        /// The set's folder.
        set: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The guest could not be quiesced and the policy says fail.
    #[error("the guest could not be quiesced: {0}")]
    QuiesceFailed(String),
    /// The VM's worker failed a step.
    #[error("the worker could not {step}")]
    Worker {
        /// The step, as a verb phrase ("capture the disks").
        step: String,
        /// What the worker said.
        #[source]
        source: WorkerError,
    },
    /// The VM is not in a state this operation accepts.
    #[error("invalid state: {0}")]
    InvalidState(String),
    /// File system or image errors.
    #[error("{context}")]
    Storage {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

impl BackupError {
    /// Wraps a storage error with what was being done.
    pub fn storage(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        BackupError::Storage {
            context: context.into(),
            source: Box::new(source),
        }
    }
}

/// Hyper-V's backup entry points (the VSS writer in VMMS plus the WMI backup methods), as the
/// service drives them. Calls for one VM never overlap: the service owns the VM meanwhile.
pub trait VirtualSystemBackupService: Send + Sync + fmt::Debug {
    /// Backs up the VM in `vm_dir` with definition `config`. `worker` is the running (or paused)
    /// VM's worker, `None` for an Off or Saved VM. On failure the VM is as it was before: running
    /// on its original disks, nothing lost, no partial set left.
    fn backup(
        &self,
        vm_dir: &Path,
        config: &VmConfig,
        worker: Option<&dyn Worker>,
        request: &BackupRequest,
        progress: &mut dyn Progress,
    ) -> Result<BackupReport, BackupError>;

    /// Reads a set's manifest and chain (cheap: no data read).
    fn describe(&self, set: &Path) -> Result<BackupSetInfo, BackupError>;

    /// Checks a set and every set it builds on: manifests, chain links, images, and every
    /// extent's checksum.
    fn verify(&self, set: &Path, progress: &mut dyn Progress)
    -> Result<BackupSetInfo, BackupError>;

    /// Restores the VM a set holds (plus the sets it builds on) into `vms_dir`, as a new VM or
    /// over the (Off) backed-up one; returns its id. Nothing is changed when the set is invalid.
    fn restore(
        &self,
        set: &Path,
        vms_dir: &Path,
        target: &RestoreTarget,
        progress: &mut dyn Progress,
    ) -> Result<VmId, BackupError>;

    /// Undoes a session a crash interrupted (start-up, after the worker was re-attached): the
    /// disks go back to their images (merged by `worker` when the VM still runs), the partial
    /// set is removed, and change tracking is dropped so the next backup is full. Returns
    /// whether there was anything to undo.
    fn recover(&self, vm_dir: &Path, worker: Option<&dyn Worker>) -> Result<bool, BackupError>;
}
