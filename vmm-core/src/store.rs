//! The service's folder on disk (DESIGN.md §5) and every path in it.
//!
//! ```text
//! <root>/vms/<GUID>/config.json     the definition, replaced atomically
//! <root>/vms/<GUID>/state/          saved state of a Saved VM (present = Saved)
//! <root>/vms/<GUID>/state.saving/   a save being written; the worker renames it to state/
//! <root>/vms/<GUID>/disks/          disk images
//! <root>/vms/<GUID>/checkpoints/    the checkpoint tree (snapshot crate)
//! <root>/vms/<GUID>/was-running     marker: the VM was running when last seen (automatic start)
//! <root>/backups/                   backups (vss-writer crate)
//! <root>/run/<GUID>/                live worker runtime (worker-manager crate)
//! ```
//!
//! Whole-folder changes are atomic too: a new VM folder is built under a temporary name and
//! renamed into place; a destroyed one is renamed away before it is deleted; saved state is
//! written into `state.saving/` and renamed to `state/` (by the worker) only once complete. Temporaries
//! (see [`is_temporary`](crate::atomic_file::is_temporary)) are ignored and cleaned up on open.
//! One service owns a store at a time.
//!
//! The store is private to its owner whatever the caller's umask: folders are 0700 (the root,
//! `vms/`, `run/`, `backups/` are tightened on every open, also when they already existed) and
//! files 0600 ([`write_atomic`]). Configs hold kernel command lines; saved states hold guest memory.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use std::sync::Arc;

use crate::atomic_file::{
    create_marker, is_temporary, rename_durable, sync_dir, temporary_sibling, write_atomic,
};
use crate::cluster::ClusterCoordinator;
use crate::config::{VmConfig, VmId};
use crate::error::{Error, Result};

const CONFIG_FILE: &str = "config.json";
const STATE_DIR: &str = "state";
const SAVING_DIR: &str = "state.saving";
const DISKS_DIR: &str = "disks";
const CHECKPOINTS_DIR: &str = "checkpoints";
const RUNNING_MARKER: &str = "was-running";
/// Mode of every folder of the store.
const PRIVATE_DIR_MODE: u32 = 0o700;

/// The service's folder: path helpers for every crate, and the catalog's own reads and writes.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    /// In a cluster: asked before every write about a VM (see [`ClusterCoordinator`]).
    coordinator: Option<Arc<dyn ClusterCoordinator>>,
}

impl Store {
    /// Opens (creating if needed) the store at `root`, makes its top folders owner-only (0700)
    /// and removes temporaries a crash left behind.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        Self::open_with(root, None)
    }

    /// [`open`](Self::open) for a store shared by a cluster: every write about a VM is first
    /// allowed by `coordinator` (temporaries are removed only in the folders of VMs it allows).
    pub fn open_with(
        root: impl Into<PathBuf>,
        coordinator: Option<Arc<dyn ClusterCoordinator>>,
    ) -> Result<Self> {
        let store = Store {
            root: root.into(),
            coordinator,
        };
        for dir in [
            store.root.clone(),
            store.vms_dir(),
            store.run_dir_root(),
            store.backups_dir(),
        ] {
            create_private_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            // Also when it existed: a store made by an older build, or under a loose umask.
            fs::set_permissions(&dir, fs::Permissions::from_mode(PRIVATE_DIR_MODE))
                .map_err(|e| Error::io(&dir, e))?;
        }
        store.remove_temporaries()?;
        Ok(store)
    }

    /// The store's root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/vms`: one folder per defined virtual machine.
    pub fn vms_dir(&self) -> PathBuf {
        self.root.join("vms")
    }

    /// `<root>/vms/<GUID>`: everything persistent about one virtual machine.
    pub fn vm_dir(&self, id: VmId) -> PathBuf {
        self.vms_dir().join(id.to_string())
    }

    /// `<root>/vms/<GUID>/config.json`.
    pub fn config_path(&self, id: VmId) -> PathBuf {
        self.vm_dir(id).join(CONFIG_FILE)
    }

    /// `<root>/vms/<GUID>/state`: the saved state of a Saved VM; its presence means Saved.
    pub fn state_dir(&self, id: VmId) -> PathBuf {
        self.vm_dir(id).join(STATE_DIR)
    }

    /// `<root>/vms/<GUID>/disks`.
    pub fn disks_dir(&self, id: VmId) -> PathBuf {
        self.vm_dir(id).join(DISKS_DIR)
    }

    /// `<root>/vms/<GUID>/checkpoints`.
    pub fn checkpoints_dir(&self, id: VmId) -> PathBuf {
        self.vm_dir(id).join(CHECKPOINTS_DIR)
    }

    /// `<root>/backups`.
    pub fn backups_dir(&self) -> PathBuf {
        self.root.join("backups")
    }

    /// `<root>/run`: the parent of every live worker's runtime folder.
    pub fn run_dir_root(&self) -> PathBuf {
        self.root.join("run")
    }

    /// `<root>/run/<GUID>`: a live worker's runtime folder (control socket, pid file). Owned by
    /// the worker manager; vmm-core never writes there.
    pub fn run_dir(&self, id: VmId) -> PathBuf {
        self.run_dir_root().join(id.to_string())
    }

    /// Whether the virtual machine has a complete saved state.
    pub fn has_saved_state(&self, id: VmId) -> bool {
        self.state_dir(id).is_dir()
    }

    /// Ids of every virtual machine folder, whatever the state of its `config.json`.
    pub(crate) fn vm_ids(&self) -> Result<Vec<VmId>> {
        let dir = self.vms_dir();
        let entries = fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&dir, e))?;
            // Names that are not GUIDs (temporaries, stray files) are not virtual machines.
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            let id = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<VmId>().ok());
            if let (true, Some(id)) = (is_dir, id) {
                ids.push(id);
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Reads and validates a virtual machine's `config.json`.
    pub(crate) fn read_config(&self, id: VmId) -> Result<VmConfig> {
        let path = self.config_path(id);
        let bytes = fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let config: VmConfig =
            serde_json::from_slice(&bytes).map_err(|source| Error::ParseConfig { path, source })?;
        config.validate()?;
        if config.id != id {
            return Err(Error::ConfigIdMismatch {
                path: self.config_path(id),
                found: config.id,
            });
        }
        Ok(config)
    }

    /// Asks the cluster, if any, whether this node may write the files of `id` now.
    pub(crate) fn guard(&self, id: VmId) -> Result<()> {
        match &self.coordinator {
            Some(coordinator) => coordinator.guard_write(id).map_err(|reason| {
                Error::io(
                    self.vm_dir(id),
                    io::Error::new(io::ErrorKind::PermissionDenied, reason),
                )
            }),
            None => Ok(()),
        }
    }

    /// Replaces a virtual machine's `config.json` atomically.
    pub(crate) fn write_config(&self, config: &VmConfig) -> Result<()> {
        self.guard(config.id)?;
        let path = self.config_path(config.id);
        write_atomic(&path, &encode(config)?).map_err(|e| Error::io(&path, e))
    }

    /// Creates a virtual machine's folder with its `config.json` and empty `disks/`, all at once:
    /// built under a temporary name, then renamed into place.
    pub(crate) fn create_vm(&self, config: &VmConfig) -> Result<()> {
        self.guard(config.id)?;
        let final_dir = self.vm_dir(config.id);
        if final_dir.exists() {
            return Err(Error::VmExists(config.id));
        }
        let tmp = temporary_sibling(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
        let result = (|| {
            create_private_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
            let disks = tmp.join(DISKS_DIR);
            create_private_dir(&disks).map_err(|e| Error::io(&disks, e))?;
            let config_path = tmp.join(CONFIG_FILE);
            write_atomic(&config_path, &encode(config)?).map_err(|e| Error::io(&config_path, e))?;
            rename_durable(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        result
    }

    /// Removes a virtual machine's folder: renamed away first (so a crash never leaves half a
    /// VM under its real name), then deleted.
    pub(crate) fn remove_vm(&self, id: VmId) -> Result<()> {
        self.guard(id)?;
        let dir = self.vm_dir(id);
        let doomed = temporary_sibling(&dir).map_err(|e| Error::io(&dir, e))?;
        rename_durable(&dir, &doomed).map_err(|e| Error::io(&dir, e))?;
        crate::fault::point("remove.after-rename");
        fs::remove_dir_all(&doomed).map_err(|e| Error::io(&doomed, e))
    }

    /// `<root>/vms/<GUID>/state.saving`: where a save in progress is written before the worker
    /// commits it as `state/`.
    ///
    /// Not a [temporary](crate::atomic_file::is_temporary) name on purpose: the store must not
    /// delete it on open, because the worker writing it may outlive a daemon restart. Recovery
    /// removes it only once it knows no worker runs the VM.
    pub fn saving_dir(&self, id: VmId) -> PathBuf {
        self.vm_dir(id).join(SAVING_DIR)
    }

    /// Prepares a save of a running VM: an empty `state.saving/` (a leftover of an earlier save
    /// that failed is removed), and no `state/` — beside a running guest a saved state can only
    /// be stale, and committing over it would fail. Returns the staging folder.
    pub(crate) fn begin_saved_state(&self, id: VmId) -> Result<PathBuf> {
        self.guard(id)?;
        self.discard_saved_state(id)?;
        self.remove_unfinished_save(id)?;
        let staging = self.saving_dir(id);
        create_private_dir(&staging).map_err(|e| Error::io(&staging, e))?;
        Ok(staging)
    }

    /// Drops the staging folder of a save that did not commit.
    pub(crate) fn remove_unfinished_save(&self, id: VmId) -> Result<()> {
        let staging = self.saving_dir(id);
        if !staging.exists() {
            return Ok(());
        }
        self.guard(id)?;
        match fs::remove_dir_all(&staging) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(&staging, e)),
        }
    }

    /// Whether a save was being written (a worker may still be writing it).
    pub fn has_unfinished_save(&self, id: VmId) -> bool {
        self.saving_dir(id).is_dir()
    }

    /// Removes the saved state (turn-off of a Saved VM, or after a successful restore).
    pub(crate) fn discard_saved_state(&self, id: VmId) -> Result<()> {
        let state = self.state_dir(id);
        if !state.exists() {
            return Ok(());
        }
        self.guard(id)?;
        let doomed = temporary_sibling(&state).map_err(|e| Error::io(&state, e))?;
        rename_durable(&state, &doomed).map_err(|e| Error::io(&state, e))?;
        fs::remove_dir_all(&doomed).map_err(|e| Error::io(&doomed, e))
    }

    /// Records whether the VM is running, for `StartIfPreviouslyRunning` after a host restart.
    pub(crate) fn set_running_marker(&self, id: VmId, running: bool) -> Result<()> {
        let marker = self.vm_dir(id).join(RUNNING_MARKER);
        if marker.exists() == running {
            return Ok(());
        }
        self.guard(id)?;
        let result = if running {
            create_marker(&marker)
        } else {
            match fs::remove_file(&marker) {
                Ok(()) => sync_dir(&self.vm_dir(id)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            }
        };
        result.map_err(|e| Error::io(&marker, e))
    }

    /// Whether the VM was running when the service last saw it.
    pub(crate) fn running_marker(&self, id: VmId) -> bool {
        self.vm_dir(id).join(RUNNING_MARKER).exists()
    }

    /// Removes temporaries under `vms/` and in each VM folder.
    fn remove_temporaries(&self) -> Result<()> {
        let vms = self.vms_dir();
        remove_temporaries_in(&vms)?;
        for id in self.vm_ids()? {
            if self.guard(id).is_err() {
                // Another node owns it: its temporaries may be writes in progress.
                continue;
            }
            remove_temporaries_in(&self.vm_dir(id))?;
        }
        Ok(())
    }
}

/// Creates one folder, owner-only whatever the umask (an explicit chmod: the umask can only
/// narrow the mode `mkdir` is given, and a caller's mask may be wider than ours).
fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new().mode(PRIVATE_DIR_MODE).create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(PRIVATE_DIR_MODE))
}

/// `mkdir -p` whose new folders are owner-only.
fn create_private_dir_all(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)
}

fn encode(config: &VmConfig) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(config).map_err(|e| Error::EncodeConfig(config.id, e))
}

fn remove_temporaries_in(dir: &Path) -> Result<()> {
    let entries = fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries.flatten() {
        if !is_temporary(&entry.file_name()) {
            continue;
        }
        let path = entry.path();
        let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed.map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn open_temp_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open store");
        (dir, store)
    }

    #[test]
    fn created_vm_reads_back_equal() {
        let (_dir, store) = open_temp_store();
        let config = VmConfig::new("a");

        store.create_vm(&config).expect("create");

        assert_eq!(store.read_config(config.id).expect("read"), config);
        assert!(store.disks_dir(config.id).is_dir());
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("stat").permissions().mode() & 0o777
    }

    #[test]
    fn open_tightens_existing_store_folders_to_owner_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        for sub in ["", "vms", "run", "backups"] {
            let path = dir.path().join(sub);
            fs::create_dir_all(&path).expect("seed");
            fs::set_permissions(&path, fs::Permissions::from_mode(0o777)).expect("loosen");
        }

        let store = Store::open(dir.path()).expect("open");

        for path in [
            store.root().to_owned(),
            store.vms_dir(),
            store.run_dir_root(),
            store.backups_dir(),
        ] {
            assert_eq!(mode(&path), 0o700, "{}", path.display());
        }
    }

    #[test]
    fn created_vm_folders_and_config_are_owner_only() {
        let (_dir, store) = open_temp_store();
        let config = VmConfig::new("a");

        store.create_vm(&config).expect("create");

        assert_eq!(mode(&store.vm_dir(config.id)), 0o700);
        assert_eq!(mode(&store.disks_dir(config.id)), 0o700);
        assert_eq!(mode(&store.config_path(config.id)), 0o600);
    }

    #[test]
    fn creating_an_existing_vm_is_refused() {
        let (_dir, store) = open_temp_store();
        let config = VmConfig::new("a");
        store.create_vm(&config).expect("create");

        let result = store.create_vm(&config);

        assert!(matches!(result, Err(Error::VmExists(id)) if id == config.id));
    }

    #[test]
    fn vm_ids_skip_temporaries_and_stray_files() {
        let (_dir, store) = open_temp_store();
        let config = VmConfig::new("a");
        store.create_vm(&config).expect("create");
        let leftover = temporary_sibling(&store.vm_dir(VmId::new_random())).expect("temp name");
        fs::create_dir(&leftover).expect("seed leftover");
        fs::write(store.vms_dir().join("notes.txt"), b"hi").expect("seed stray");

        let ids = store.vm_ids().expect("list");

        assert_eq!(ids, [config.id]);
    }

    #[test]
    fn open_removes_leftover_temporaries() {
        let (dir, store) = open_temp_store();
        let config = VmConfig::new("a");
        store.create_vm(&config).expect("create");
        let leftover = temporary_sibling(&store.config_path(config.id)).expect("temp name");
        fs::write(&leftover, b"torn").expect("seed leftover");

        let _reopened = Store::open(dir.path()).expect("reopen");

        assert!(!leftover.exists());
    }

    #[test]
    fn removed_vm_folder_is_gone() {
        let (_dir, store) = open_temp_store();
        let config = VmConfig::new("a");
        store.create_vm(&config).expect("create");

        store.remove_vm(config.id).expect("remove");

        assert!(!store.vm_dir(config.id).exists());
        assert!(store.vm_ids().expect("list").is_empty());
    }

    #[test]
    fn save_staging_is_not_saved_state() {
        let (_dir, store) = open_temp_store();
        let config = VmConfig::new("a");
        store.create_vm(&config).expect("create");

        let staging = store.begin_saved_state(config.id).expect("begin");

        assert!(store.has_unfinished_save(config.id));
        assert!(!store.has_saved_state(config.id));
        assert_eq!(staging, store.saving_dir(config.id));
    }

    #[test]
    fn save_staging_survives_reopening_the_store() {
        let (dir, store) = open_temp_store();
        let config = VmConfig::new("a");
        store.create_vm(&config).expect("create");
        let staging = store.begin_saved_state(config.id).expect("begin");
        fs::write(staging.join("state.json"), b"{}").expect("worker writes");

        let _reopened = Store::open(dir.path()).expect("reopen");

        assert!(staging.join("state.json").is_file());
    }

    #[test]
    fn beginning_a_save_drops_a_stale_saved_state() {
        let (_dir, store) = open_temp_store();
        let config = VmConfig::new("a");
        store.create_vm(&config).expect("create");
        fs::create_dir(store.state_dir(config.id)).expect("stale state/");
        fs::write(store.state_dir(config.id).join("state.json"), b"{}").expect("stale file");

        store.begin_saved_state(config.id).expect("begin");

        assert!(!store.has_saved_state(config.id));
    }

    #[test]
    fn discarded_saved_state_is_gone() {
        let (_dir, store) = open_temp_store();
        let config = VmConfig::new("a");
        store.create_vm(&config).expect("create");
        let staging = store.begin_saved_state(config.id).expect("begin");
        crate::atomic_file::commit_dir(&staging, &store.state_dir(config.id)).expect("commit");

        store.discard_saved_state(config.id).expect("discard");

        assert!(!store.has_saved_state(config.id));
    }

    #[test]
    fn running_marker_follows_what_was_set() {
        let (_dir, store) = open_temp_store();
        let config = VmConfig::new("a");
        store.create_vm(&config).expect("create");

        store.set_running_marker(config.id, true).expect("set");
        let after_set = store.running_marker(config.id);
        store.set_running_marker(config.id, false).expect("clear");

        assert!(after_set);
        assert!(!store.running_marker(config.id));
    }

    #[test]
    fn config_naming_another_vm_is_refused() {
        let (_dir, store) = open_temp_store();
        let config = VmConfig::new("a");
        store.create_vm(&config).expect("create");
        let other = VmConfig {
            id: VmId::new_random(),
            ..config.clone()
        };
        fs::write(
            store.config_path(config.id),
            serde_json::to_vec(&other).expect("encode"),
        )
        .expect("overwrite");

        let result = store.read_config(config.id);

        assert!(matches!(result, Err(Error::ConfigIdMismatch { found, .. }) if found == other.id));
    }
}
