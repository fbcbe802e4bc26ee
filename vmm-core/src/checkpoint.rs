//! The seam to the Snapshot Manager: `Msvm_VirtualSystemSnapshotService` as a trait, and the
//! checkpoint tree's data that crosses it.
//!
//! vmm-core runs checkpoint operations as service operations (a job, one operation per VM, the
//! state rules of Hyper-V); the files — tree, configs, saved states, disk layers, the journal
//! that makes each operation all-or-nothing — belong to whoever implements
//! [`VirtualSystemSnapshotService`] (the `snapshot` crate). A checkpoint of a running VM needs
//! both sides and the worker: the implementation prepares it ([`RunningCheckpoint`]), the worker
//! takes it ([`crate::Worker::checkpoint`]), the implementation finishes it.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::VmId;
use crate::worker::CheckpointRequest;

/// Schema version of a checkpoint tree.
pub const TREE_VERSION: u32 = 1;

/// Longest checkpoint name, as Hyper-V's `ElementName` of a snapshot.
pub const MAX_NAME_LEN: usize = 100;

/// A checkpoint's identity (Hyper-V's snapshot `InstanceID` GUID).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CheckpointId(Uuid);

impl CheckpointId {
    /// A fresh random id.
    pub fn new_random() -> Self {
        CheckpointId(Uuid::new_v4())
    }
}

impl fmt::Display for CheckpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl FromStr for CheckpointId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(CheckpointId)
    }
}

/// The checkpoint type asked for (`Msvm_VirtualSystemSettingData.UserSnapshotType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckpointType {
    /// 5: config + saved state + memory + disks; no guest cooperation.
    Standard,
    /// 3: production, falling back to standard when the guest cannot be quiesced.
    Production,
    /// 4: production only: fails when the guest cannot be quiesced.
    ProductionOnly,
}

impl CheckpointType {
    /// Hyper-V's `UserSnapshotType` value.
    pub fn user_snapshot_type(self) -> u16 {
        match self {
            CheckpointType::Standard => 5,
            CheckpointType::Production => 3,
            CheckpointType::ProductionOnly => 4,
        }
    }
}

impl FromStr for CheckpointType {
    type Err = CheckpointError;
    /// The CLI's words (`standard`, `production`, `production-only`) or the `UserSnapshotType`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "standard" | "5" => Ok(CheckpointType::Standard),
            "production" | "3" => Ok(CheckpointType::Production),
            "production-only" | "productiononly" | "4" => Ok(CheckpointType::ProductionOnly),
            _ => Err(CheckpointError::InvalidParameter(format!(
                "checkpoint type {s:?} (standard, production or production-only)"
            ))),
        }
    }
}

/// What a checkpoint actually holds (recorded next to what was asked for).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Consistency {
    /// Disks of a VM that was off: consistent without guest help; applies to an Off VM.
    Off,
    /// Standard: the VM's saved state is part of the checkpoint; applies to a Saved VM.
    SavedState,
    /// Production asked for, standard taken (the guest could not be quiesced).
    StandardFallback,
    /// Production: the guest's integration agent froze its file systems while the disks were
    /// switched (application-consistent disks); no memory or device state, so applying it
    /// leaves the VM Off and it boots from these disks.
    Production,
}

/// One node of the tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Identity; also the name of its folder `checkpoints/<id>/`.
    pub id: CheckpointId,
    /// Display name (`ElementName`), 1..=100 characters.
    pub name: String,
    /// The checkpoint this one was taken on top of (`Parent`); `None` for a root.
    pub parent: Option<CheckpointId>,
    /// When it was taken (`CreationTime`).
    pub created: SystemTime,
    /// The type asked for.
    pub requested_type: CheckpointType,
    /// What was taken.
    pub consistency: Consistency,
    /// Whether the checkpoint holds a saved state (applying it leaves the VM Saved).
    pub has_saved_state: bool,
    /// Why a production checkpoint of a running VM was taken as a standard one
    /// ([`Consistency::StandardFallback`]): what stopped the guest from being quiesced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiesce_failure: Option<String>,
}

/// A VM's checkpoints and its "Now" position (`Msvm_MostCurrentSnapshotInBranch`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointTree {
    /// Schema version ([`TREE_VERSION`]).
    pub version: u32,
    /// Every checkpoint, oldest first.
    pub checkpoints: Vec<Checkpoint>,
    /// The checkpoint the VM's current state descends from; `None` when it descends from none.
    pub now: Option<CheckpointId>,
}

impl Default for CheckpointTree {
    fn default() -> Self {
        CheckpointTree {
            version: TREE_VERSION,
            checkpoints: Vec::new(),
            now: None,
        }
    }
}

impl CheckpointTree {
    /// Checks the rules: known version, unique ids, parents and "Now" exist, no cycles, names valid.
    pub fn validate(&self) -> Result<(), String> {
        if self.version != TREE_VERSION {
            return Err(format!("unknown version {}", self.version));
        }
        let mut ids = HashSet::new();
        for cp in &self.checkpoints {
            if !ids.insert(cp.id) {
                return Err(format!("checkpoint {} appears twice", cp.id));
            }
            validate_name(&cp.name).map_err(|e| e.to_string())?;
        }
        for cp in &self.checkpoints {
            if let Some(parent) = cp.parent
                && !ids.contains(&parent)
            {
                return Err(format!("checkpoint {} has unknown parent {parent}", cp.id));
            }
            // Walking up must end within as many steps as there are nodes.
            let mut current = cp.parent;
            let mut steps = 0;
            while let Some(p) = current {
                steps += 1;
                if steps > self.checkpoints.len() {
                    return Err(format!("checkpoint {} is in a parent loop", cp.id));
                }
                current = self.get(p).and_then(|c| c.parent);
            }
        }
        if let Some(now) = self.now
            && !ids.contains(&now)
        {
            return Err(format!("now points at unknown checkpoint {now}"));
        }
        Ok(())
    }

    /// The checkpoint with this id.
    pub fn get(&self, id: CheckpointId) -> Option<&Checkpoint> {
        self.checkpoints.iter().find(|c| c.id == id)
    }

    /// Finds a checkpoint by id or by (unique) name, as the CLI's `CP` argument names it.
    pub fn find(&self, id_or_name: &str) -> Result<&Checkpoint, CheckpointError> {
        if let Ok(id) = id_or_name.parse::<CheckpointId>()
            && let Some(cp) = self.get(id)
        {
            return Ok(cp);
        }
        let mut named = self.checkpoints.iter().filter(|c| c.name == id_or_name);
        match (named.next(), named.next()) {
            (Some(cp), None) => Ok(cp),
            (Some(_), Some(_)) => Err(CheckpointError::AmbiguousName(id_or_name.to_string())),
            (None, _) => Err(CheckpointError::NotFound(id_or_name.to_string())),
        }
    }

    /// The direct children of `id`.
    pub fn children(&self, id: CheckpointId) -> Vec<CheckpointId> {
        self.checkpoints
            .iter()
            .filter(|c| c.parent == Some(id))
            .map(|c| c.id)
            .collect()
    }

    /// `id` and everything below it, children before parents (the order to delete them in).
    pub fn subtree_post_order(&self, id: CheckpointId) -> Vec<CheckpointId> {
        let mut out = Vec::new();
        for child in self.children(id) {
            out.extend(self.subtree_post_order(child));
        }
        out.push(id);
        out
    }

    /// Removes `id`: its children take its parent, and "Now" moves to its parent if it was `id`.
    pub fn remove(&mut self, id: CheckpointId) {
        let Some(parent) = self.get(id).map(|c| c.parent) else {
            return;
        };
        for cp in &mut self.checkpoints {
            if cp.parent == Some(id) {
                cp.parent = parent;
            }
        }
        if self.now == Some(id) {
            self.now = parent;
        }
        self.checkpoints.retain(|c| c.id != id);
    }
}

/// Checks a checkpoint name: 1..=100 characters, no control characters.
pub fn validate_name(name: &str) -> Result<(), CheckpointError> {
    let len = name.chars().count();
    if len == 0 || len > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(CheckpointError::InvalidName(
            name.chars().take(MAX_NAME_LEN).collect(),
        ));
    }
    Ok(())
}

/// What CreateSnapshot is asked to make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateRequest {
    /// The name; `None` gives Hyper-V's default `"<VM name> (MM/DD/YYYY - hh:mm:ss AM/PM)"`.
    pub name: Option<String>,
    /// The type asked for.
    pub checkpoint_type: CheckpointType,
}

/// How a running VM's checkpoint is taken, as the service decided after asking the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunningCapture {
    /// Memory, device state and disks (standard). For a production checkpoint this is the
    /// fallback, and `quiesce_failure` says why the guest could not be quiesced.
    SavedState {
        /// Why a production checkpoint fell back to standard; `None` for a standard one.
        quiesce_failure: Option<String>,
    },
    /// The disks only, switched while the guest's agent holds its file systems frozen
    /// (production, application-consistent).
    FrozenDisks,
}

/// A checkpoint of a running VM between its two halves: prepared (journaled, folders made) and
/// waiting for the worker to take it, then finished by
/// [`VirtualSystemSnapshotService::finish_running_snapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningCheckpoint {
    /// The node the tree gains when the worker commits.
    pub checkpoint: Checkpoint,
    /// What to hand to [`crate::Worker::checkpoint`].
    pub request: CheckpointRequest,
}

/// How an export lays out disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExportMode {
    /// One standalone qcow2 per disk holding the current contents; no checkpoints.
    Flattened,
    /// Every layer as it is, with the checkpoint tree and every checkpoint.
    Chained,
}

/// How an import names the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImportMode {
    /// A fresh VM id (Hyper-V's `Import-VM -Copy -GenerateNewId`).
    NewId,
    /// The id in the export (fails if the store has it already).
    SameId,
}

/// What recovery did with an operation a crash interrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// No operation was in flight.
    Clean,
    /// The named operation had not reached its commit point and was undone.
    RolledBack(&'static str),
    /// The named operation had passed its commit point and was finished.
    RolledForward(&'static str),
}

/// Receives progress of one long operation (copies, merges): jobs' `PercentComplete`, the
/// CLI's progress bars. Called from the thread running the operation.
pub trait Progress {
    /// The operation will move about `bytes` more bytes in total (totals add up).
    fn add_total(&mut self, bytes: u64);
    /// `bytes` more bytes were moved.
    fn advance(&mut self, bytes: u64);
}

/// Discards progress.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn add_total(&mut self, _bytes: u64) {}
    fn advance(&mut self, _bytes: u64) {}
}

/// Counts progress; [`percent`](Self::percent) gives a job's `PercentComplete`.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProgressCounter {
    /// Bytes announced.
    pub total: u64,
    /// Bytes done.
    pub done: u64,
}

impl ProgressCounter {
    /// 0..=100; 100 when nothing was announced.
    pub fn percent(&self) -> u8 {
        if self.total == 0 {
            return 100;
        }
        (self.done.min(self.total) * 100 / self.total) as u8
    }
}

impl Progress for ProgressCounter {
    fn add_total(&mut self, bytes: u64) {
        self.total += bytes;
    }
    fn advance(&mut self, bytes: u64) {
        self.done += bytes;
    }
}

/// Why a checkpoint operation failed, in the terms the service answers with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// No checkpoint has this id or name.
    #[error("no checkpoint {0}")]
    NotFound(String),
    /// Several checkpoints have this name.
    #[error("checkpoint name {0} is ambiguous; use its id")]
    AmbiguousName(String),
    /// The name is empty, too long or has control characters.
    #[error("invalid checkpoint name: {0}")]
    InvalidName(String),
    /// A parameter is malformed.
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
    /// The VM or the checkpoint is not in a state that allows this (32775).
    #[error("{0}")]
    InvalidState(String),
    /// Anything else: I/O, corrupt files, disk images.
    #[error("{0}")]
    Failed(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
}

/// `Msvm_VirtualSystemSnapshotService`: the checkpoint operations on one VM folder
/// (`vms/<GUID>`). The service calls them one operation per VM at a time and only in the states
/// Hyper-V allows (create on any VM; apply on an Off or Saved VM); the implementation makes each
/// one all-or-nothing across crashes and finishes or undoes an interrupted one in
/// [`recover`](Self::recover).
pub trait VirtualSystemSnapshotService: Send + Sync + fmt::Debug {
    /// CreateSnapshot of an Off or Saved VM: a new checkpoint under "Now"; "Now" moves to it.
    fn create_snapshot(
        &self,
        vm_dir: &Path,
        request: &CreateRequest,
        progress: &mut dyn Progress,
    ) -> Result<Checkpoint, CheckpointError>;

    /// CreateSnapshot of a running VM, first half: records the operation and names the folder
    /// and overlays the worker is to fill and create, for a checkpoint taken as `capture` says
    /// (the service has frozen the guest already for [`RunningCapture::FrozenDisks`]).
    fn prepare_running_snapshot(
        &self,
        vm_dir: &Path,
        request: &CreateRequest,
        capture: &RunningCapture,
    ) -> Result<RunningCheckpoint, CheckpointError>;

    /// Second half, after the worker answered (whatever it answered): the checkpoint joins the
    /// tree and the live config moves to the overlays when the worker committed; otherwise what
    /// was prepared is removed and the error says the checkpoint was not taken.
    fn finish_running_snapshot(
        &self,
        vm_dir: &Path,
        running: &RunningCheckpoint,
    ) -> Result<Checkpoint, CheckpointError>;

    /// ApplySnapshot: the VM becomes the checkpoint's (Saved if it has saved state, else Off).
    fn apply_snapshot(
        &self,
        vm_dir: &Path,
        id: CheckpointId,
        progress: &mut dyn Progress,
    ) -> Result<(), CheckpointError>;

    /// DestroySnapshot: deletes one checkpoint, merging its disk layers.
    fn destroy_snapshot(
        &self,
        vm_dir: &Path,
        id: CheckpointId,
        progress: &mut dyn Progress,
    ) -> Result<(), CheckpointError>;

    /// DestroySnapshotTree: deletes a checkpoint and all below it.
    fn destroy_snapshot_tree(
        &self,
        vm_dir: &Path,
        id: CheckpointId,
        progress: &mut dyn Progress,
    ) -> Result<(), CheckpointError>;

    /// Renames a checkpoint (ModifySystemSettings on the snapshot's `ElementName`).
    fn rename_snapshot(
        &self,
        vm_dir: &Path,
        id: CheckpointId,
        name: &str,
    ) -> Result<(), CheckpointError>;

    /// The checkpoint tree.
    fn snapshots(&self, vm_dir: &Path) -> Result<CheckpointTree, CheckpointError>;

    /// Exports the VM into `target`, which must not exist (Hyper-V's `Export-VM`).
    fn export(
        &self,
        vm_dir: &Path,
        target: &Path,
        mode: ExportMode,
        progress: &mut dyn Progress,
    ) -> Result<(), CheckpointError>;

    /// Imports an export folder into `vms_dir` (Hyper-V's `Import-VM`); returns the VM's id.
    fn import(
        &self,
        source: &Path,
        vms_dir: &Path,
        mode: ImportMode,
        progress: &mut dyn Progress,
    ) -> Result<VmId, CheckpointError>;

    /// Creates an empty disk image of `size` bytes at `path` (Hyper-V's
    /// `New-VM -NewVHDSizeBytes`), in the format the implementation layers checkpoints on.
    fn create_disk(&self, path: &Path, size: u64) -> Result<(), CheckpointError>;

    /// Finishes or rolls back an operation a crash interrupted. Waits for a worker that is still
    /// taking a running checkpoint the crashed service asked for.
    fn recover(&self, vm_dir: &Path) -> Result<Recovery, CheckpointError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp(parent: Option<CheckpointId>, name: &str) -> Checkpoint {
        Checkpoint {
            id: CheckpointId::new_random(),
            name: name.into(),
            parent,
            created: SystemTime::UNIX_EPOCH,
            requested_type: CheckpointType::Standard,
            consistency: Consistency::Off,
            has_saved_state: false,
            quiesce_failure: None,
        }
    }

    #[test]
    fn removing_a_middle_node_reparents_children_and_moves_now() {
        let a = cp(None, "a");
        let b = cp(Some(a.id), "b");
        let c = cp(Some(b.id), "c");
        let mut tree = CheckpointTree {
            now: Some(b.id),
            checkpoints: vec![a.clone(), b.clone(), c.clone()],
            ..CheckpointTree::default()
        };

        tree.remove(b.id);

        assert_eq!(tree.get(c.id).and_then(|c| c.parent), Some(a.id));
        assert_eq!(tree.now, Some(a.id));
        assert!(tree.validate().is_ok());
    }

    #[test]
    fn a_parent_loop_is_invalid() {
        let mut a = cp(None, "a");
        let b = cp(Some(a.id), "b");
        a.parent = Some(b.id);
        let tree = CheckpointTree {
            checkpoints: vec![a, b],
            ..CheckpointTree::default()
        };

        assert!(tree.validate().is_err());
    }

    #[test]
    fn subtree_lists_children_before_parents() {
        let a = cp(None, "a");
        let b = cp(Some(a.id), "b");
        let c = cp(Some(b.id), "c");
        let tree = CheckpointTree {
            checkpoints: vec![a.clone(), b.clone(), c.clone()],
            ..CheckpointTree::default()
        };

        assert_eq!(tree.subtree_post_order(a.id), [c.id, b.id, a.id]);
    }

    #[test]
    fn find_accepts_id_or_unique_name() {
        let a = cp(None, "a");
        let b = cp(Some(a.id), "b");
        let tree = CheckpointTree {
            now: Some(b.id),
            checkpoints: vec![a.clone(), b.clone()],
            ..CheckpointTree::default()
        };

        let by_name = tree.find("b").map(|c| c.id).ok();
        let by_id = tree.find(&a.id.to_string()).map(|c| c.id).ok();
        let missing = tree.find("c");

        assert_eq!((by_name, by_id), (Some(b.id), Some(a.id)));
        assert!(matches!(missing, Err(CheckpointError::NotFound(_))));
    }

    #[test]
    fn duplicate_names_are_ambiguous() {
        let tree = CheckpointTree {
            checkpoints: vec![cp(None, "x"), cp(None, "x")],
            ..CheckpointTree::default()
        };

        let found = tree.find("x");

        assert!(matches!(found, Err(CheckpointError::AmbiguousName(_))));
    }

    #[test]
    fn a_node_written_before_production_checkpoints_still_reads() {
        let old = r#"{"id":"6f1c2a52-3a63-4d7e-9c3e-0f4a8d5b2e11","name":"a","parent":null,
            "created":{"secs_since_epoch":0,"nanos_since_epoch":0},
            "requested_type":"Production","consistency":"StandardFallback",
            "has_saved_state":true}"#;

        let node: Checkpoint = serde_json::from_str(old).expect("an old node reads");
        let production = Checkpoint {
            consistency: Consistency::Production,
            has_saved_state: false,
            ..node.clone()
        };
        let written = serde_json::to_string(&production).expect("json");
        let back: Checkpoint = serde_json::from_str(&written).expect("round trip");

        assert_eq!(node.quiesce_failure, None);
        assert_eq!(back, production);
        assert!(!written.contains("quiesce_failure"), "{written}");
    }

    #[test]
    fn checkpoint_type_parses_cli_words() {
        let parsed: Vec<_> = ["standard", "production", "production-only"]
            .iter()
            .map(|s| s.parse::<CheckpointType>().ok())
            .collect();

        assert_eq!(
            parsed,
            [
                Some(CheckpointType::Standard),
                Some(CheckpointType::Production),
                Some(CheckpointType::ProductionOnly)
            ]
        );
        assert!("fast".parse::<CheckpointType>().is_err());
    }
}
