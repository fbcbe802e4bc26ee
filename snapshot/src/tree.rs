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
            let json = br#"{"version":1,"now":"0c0e2a52-5a0f-4f4e-9d7e-6d1b2a1f3c41","checkpoints":[
                {"id":"0c0e2a52-5a0f-4f4e-9d7e-6d1b2a1f3c41","name":"a","parent":null,
                 "created":{"secs_since_epoch":0,"nanos_since_epoch":0},"requested_type":"Standard",
                 "consistency":"Off","has_saved_state":false}]}"#;
            let mut json = json.to_vec();
            let i = flip % json.len();
            json[i] = byte;
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("tree.json");
            std::fs::write(&path, &json).expect("write");
            let _ = CheckpointTree::load(&path);
        }
    }
}
