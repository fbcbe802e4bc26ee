//! The checkpoint tree of one VM (`checkpoints/tree.json`): Hyper-V's snapshot VSSDs with their
//! `Parent` links, and the VM's "Now" position (`Msvm_MostCurrentSnapshotInBranch`).
//!
//! The tree's data is vmm-core's (it crosses the service seam); this crate owns its file.

use std::path::Path;

pub use vmm_core::checkpoint::{
    Checkpoint, CheckpointId, CheckpointTree, CheckpointType, Consistency, MAX_NAME_LEN,
    TREE_VERSION,
};

use crate::durable::write_atomic;
use crate::error::{Error, Result};

/// `tree.json` on disk: load with validation, save atomically.
pub trait TreeFile: Sized {
    /// Loads and validates `path`; a missing file is an empty tree.
    fn load(path: &Path) -> Result<Self>;
    /// Writes the tree atomically.
    fn save(&self, path: &Path) -> Result<()>;
}

impl TreeFile for CheckpointTree {
    fn load(path: &Path) -> Result<Self> {
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

    fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(|source| Error::Corrupt {
            path: path.to_path_buf(),
            source,
        })?;
        write_atomic(path, &json)
    }
}

/// Checks a checkpoint name: 1..=100 characters, no control characters.
pub fn validate_name(name: &str) -> Result<()> {
    vmm_core::checkpoint::validate_name(name).map_err(Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::SystemTime;

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
