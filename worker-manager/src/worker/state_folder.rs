//! A saved-state folder: written by a save (state and memory, owner-only, fsynced), and read back
//! as its memory files: one full image, or a chain of images listed by a manifest.
//!
//! A folder written by a save (`save-vm`) holds `state.json` and `memory.bin`, one full sparse
//! image. A folder written by a running checkpoint also holds `memory.json`, a
//! [`MemoryManifest`]: the folder's own identity and its memory layers in chain order, a full
//! image first and then deltas (images as long as memory holding only the pages dirtied since the
//! layer before; holes elsewhere). Every layer is a file *in the folder*: a delta checkpoint
//! hard-links its parent's layers into its own folder under the same names, so a committed folder
//! is self-contained (it can be copied, hard-linked or exported alone) and committed layers are
//! never written again. A folder without a manifest is a single full image as before.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use partition::Partition;
use vmm_core::fault;

use serde::{Deserialize, Serialize};

use super::machine::{MEMORY_FILE, STATE_FILE};
use crate::error::{Error, Result};
use crate::runtime::create_private;

/// Name of the memory manifest in a state folder.
pub const MEMORY_MANIFEST: &str = "memory.json";

/// The longest chain of memory layers a checkpoint builds on; the next checkpoint writes a full
/// image instead (each layer costs mappings at restore).
pub const MAX_MEMORY_LAYERS: usize = 16;

/// Version of [`MemoryManifest`]'s format.
const MANIFEST_VERSION: u32 = 1;

/// `memory.json`: what a checkpoint's memory is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryManifest {
    /// Format version (1).
    pub version: u32,
    /// A random identity of this committed state: a worker that took it, or whose guest was
    /// restored from it, knows its dirty pages since, and may write the next checkpoint as a
    /// delta on it. Copies of the folder keep it (they hold the same memory).
    pub state_id: String,
    /// File names of the layers in this folder, the full image first, each later one a delta on
    /// those before it.
    pub layers: Vec<String>,
}

impl MemoryManifest {
    /// A manifest for a fresh state with `layers`.
    pub(crate) fn new(layers: Vec<String>) -> Self {
        MemoryManifest {
            version: MANIFEST_VERSION,
            state_id: uuid::Uuid::new_v4().to_string(),
            layers,
        }
    }

    /// Reads `dir`'s manifest; `Ok(None)` when it has none (a single `memory.bin`).
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(MEMORY_MANIFEST);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, e)),
        };
        let bad = |reason: &str| Error::Config {
            path: path.clone(),
            source: reason.to_owned().into(),
        };
        let manifest: MemoryManifest =
            serde_json::from_slice(&bytes).map_err(|e| Error::Config {
                path: path.clone(),
                source: Box::new(e),
            })?;
        if manifest.version != MANIFEST_VERSION {
            return Err(bad("unknown memory manifest version"));
        }
        if manifest.layers.is_empty() || manifest.layers.len() > MAX_MEMORY_LAYERS {
            return Err(bad("memory manifest lists no layers or too many"));
        }
        if manifest.layers.iter().any(|name| !is_plain_name(name)) {
            return Err(bad("memory layer names must be plain file names"));
        }
        Ok(Some(manifest))
    }

    /// Name of the delta layer that follows this chain.
    pub(crate) fn next_layer_name(&self) -> String {
        format!("memory.{}.bin", self.layers.len())
    }
}

/// A file name with no folder part, not `.`/`..`, not hidden.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && !name.contains('/')
        && !name.contains('\0')
        && name.len() <= 255
}

/// The memory files a state folder restores from: the base image and the deltas over it, and
/// the folder's identity when it has a manifest.
pub(crate) struct MemoryLayers {
    pub(crate) base: File,
    pub(crate) deltas: Vec<File>,
    pub(crate) state_id: Option<String>,
}

/// Opens the memory of the state folder `dir` (see the module notes).
pub(crate) fn open_memory(dir: &Path) -> Result<MemoryLayers> {
    let open = |name: &str| {
        let path = dir.join(name);
        File::open(&path).map_err(|e| Error::io(path, e))
    };
    match MemoryManifest::read(dir)? {
        None => Ok(MemoryLayers {
            base: open(MEMORY_FILE)?,
            deltas: Vec::new(),
            state_id: None,
        }),
        Some(manifest) => {
            let mut files = manifest
                .layers
                .iter()
                .map(|name| open(name))
                .collect::<Result<Vec<_>>>()?;
            let base = files.remove(0);
            Ok(MemoryLayers {
                base,
                deltas: files,
                state_id: Some(manifest.state_id),
            })
        }
    }
}

/// Writes `state.json` and `memory.bin` into `dir`, each fsynced, then the folder; returns the
/// memory bytes written.
pub(crate) fn write_saved_state(partition: &Partition, dir: &Path) -> Result<u64> {
    let state = partition.capture_state()?;
    let state_path = dir.join(STATE_FILE);
    let json = state.to_json().map_err(|e| Error::Config {
        path: state_path.clone(),
        source: Box::new(e),
    })?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e| Error::io(path, e)
    };
    let mut file = create_private(&state_path).map_err(io(&state_path))?;
    file.write_all(&json).map_err(io(&state_path))?;
    file.sync_all().map_err(io(&state_path))?;
    fault::point("worker.save.after-state-file");
    let memory_path = dir.join(MEMORY_FILE);
    let mut memory = create_private(&memory_path).map_err(io(&memory_path))?;
    let bytes = partition.save_memory(&mut memory)?;
    memory.sync_all().map_err(io(&memory_path))?;
    vmm_core::atomic_file::sync_dir(dir).map_err(io(dir))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_manifest(dir: &Path, json: &str) {
        std::fs::write(dir.join(MEMORY_MANIFEST), json).unwrap();
    }

    #[test]
    fn folder_without_a_manifest_is_one_full_image() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(MEMORY_FILE), [0u8; 4096]).unwrap();

        let layers = open_memory(dir.path()).unwrap();

        assert!(layers.deltas.is_empty());
        assert_eq!(layers.state_id, None);
    }

    #[test]
    fn manifest_lists_the_layers_in_chain_order() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["memory.bin", "memory.1.bin"] {
            std::fs::write(dir.path().join(name), [0u8; 4096]).unwrap();
        }
        let manifest = MemoryManifest::new(vec!["memory.bin".into(), "memory.1.bin".into()]);
        write_manifest(dir.path(), &serde_json::to_string(&manifest).unwrap());

        let layers = open_memory(dir.path()).unwrap();

        assert_eq!(layers.deltas.len(), 1);
        assert_eq!(layers.state_id.as_deref(), Some(manifest.state_id.as_str()));
        assert_eq!(manifest.next_layer_name(), "memory.2.bin");
    }

    #[test]
    fn manifest_naming_a_file_outside_the_folder_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_manifest(
            dir.path(),
            r#"{"version":1,"state_id":"x","layers":["../../etc/passwd"]}"#,
        );

        assert!(matches!(
            MemoryManifest::read(dir.path()),
            Err(Error::Config { .. })
        ));
    }

    #[test]
    fn manifest_with_a_missing_layer_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        write_manifest(
            dir.path(),
            r#"{"version":1,"state_id":"x","layers":["memory.bin"]}"#,
        );

        let error = open_memory(dir.path()).err().unwrap();

        assert!(matches!(error, Error::Io { path, .. } if path.ends_with("memory.bin")));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_manifests_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join(MEMORY_MANIFEST), &bytes).unwrap();
            let _ = MemoryManifest::read(dir.path());
        }
    }
}
