//! The checkpoint tree of one VM (`checkpoints/tree.json`): Hyper-V's snapshot VSSDs with their
//! `Parent` links, and the VM's "Now" position (`Msvm_MostCurrentSnapshotInBranch`).

use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::durable::write_atomic;
use crate::error::{Error, Result};

/// Schema version of `tree.json` written by this crate.
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

/// What a checkpoint actually holds (recorded next to what was asked for).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Consistency {
    /// Disks of a VM that was off: consistent without guest help; applies to an Off VM.
    Off,
    /// Standard: the VM's saved state is part of the checkpoint; applies to a Saved VM.
    SavedState,
    /// Production asked for, standard taken (the guest could not be quiesced).
    StandardFallback,
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
    /// Whether `checkpoints/<id>/state/` holds a saved state (applying leaves the VM Saved).
    pub has_saved_state: bool,
}

/// A VM's checkpoints and its "Now" position.
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
    /// Loads and validates `path`; a missing file is an empty tree.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(Error::io("read", path, e)),
        };
        let tree: CheckpointTree =
            serde_json::from_slice(&bytes).map_err(|source| Error::Corrupt {
                path: path.to_path_buf(),
                source,
            })?;
        tree.validate().map_err(|reason| Error::Invalid {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(tree)
    }

    /// Writes the tree atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(|source| Error::Corrupt {
            path: path.to_path_buf(),
            source,
        })?;
        write_atomic(path, &json)
    }

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

    /// Finds a checkpoint by id or by (unique) name.
    pub fn find(&self, id_or_name: &str) -> Result<&Checkpoint> {
        if let Ok(id) = id_or_name.parse::<CheckpointId>()
            && let Some(cp) = self.get(id)
        {
            return Ok(cp);
        }
        let mut named = self.checkpoints.iter().filter(|c| c.name == id_or_name);
        match (named.next(), named.next()) {
            (Some(cp), None) => Ok(cp),
            (Some(_), Some(_)) => Err(Error::AmbiguousName(id_or_name.to_string())),
            (None, _) => Err(Error::CheckpointNotFound(id_or_name.to_string())),
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
pub fn validate_name(name: &str) -> Result<()> {
    let len = name.chars().count();
    if len == 0 || len > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(Error::InvalidName(
            name.chars().take(MAX_NAME_LEN).collect(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cp(parent: Option<CheckpointId>, name: &str) -> Checkpoint {
        Checkpoint {
            id: CheckpointId::new_random(),
            name: name.into(),
            parent,
            created: SystemTime::UNIX_EPOCH,
            requested_type: CheckpointType::Standard,
            consistency: Consistency::Off,
            has_saved_state: false,
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
            ..Default::default()
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
            ..Default::default()
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
            ..Default::default()
        };

        assert_eq!(tree.subtree_post_order(a.id), [c.id, b.id, a.id]);
    }

    proptest! {
        #[test]
        fn loading_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("tree.json");
            std::fs::write(&path, &bytes).expect("write");
            let _ = CheckpointTree::load(&path);
        }

        #[test]
        fn loading_mutated_trees_never_panics(flip in 0usize..400, byte in any::<u8>()) {
            let a = cp(None, "a");
            let tree = CheckpointTree { now: Some(a.id), checkpoints: vec![a.clone(), cp(Some(a.id), "b")], ..Default::default() };
            let mut json = serde_json::to_vec(&tree).expect("json");
            let i = flip % json.len();
            json[i] = byte;
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("tree.json");
            std::fs::write(&path, &json).expect("write");
            let _ = CheckpointTree::load(&path);
        }
    }
}
