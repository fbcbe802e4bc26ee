//! The steps of a worker's start that read what the service prepared (the VM's configuration,
//! its saved state) and decide what the worker may touch and when the runtime folder is its own;
//! `Machine::start` runs them in order.

use std::fs;
use std::os::unix::net::UnixListener;
use std::path::Path;

use partition::{KernelImage, Partition, PartitionBuilder, PartitionConfig, PartitionState};
use vmm_core::{VmConfig, VmId};

use super::confinement::FilesystemView;
use super::disks;
use super::machine::STATE_FILE;
use super::pool::Handover;
use super::state_folder;
use crate::error::{Error, Result};
use crate::runtime::{RuntimeDir, StoreLayout};
use crate::worker_lock::WorkerLock;

/// What a confined worker may touch: its VM's folder and runtime folder, its disks (writable
/// unless read-only), its kernel and initrd, and the folder it restores from.
pub(super) fn filesystem_view(
    layout: &StoreLayout,
    vm: &VmConfig,
    config: &PartitionConfig,
    restore: Option<&Path>,
) -> FilesystemView {
    let mut view = FilesystemView {
        writable_dirs: vec![
            layout.vm_dir(vm.id),
            layout.runtime(vm.id).path().to_owned(),
        ],
        ..FilesystemView::default()
    };
    // Consuming a saved state renames it within its parent.
    if let Some(parent) = restore.and_then(Path::parent) {
        view.writable_dirs.push(parent.to_owned());
    }
    for disk in &config.disks {
        let list = if disk.read_only {
            &mut view.readable
        } else {
            &mut view.writable_files
        };
        list.push(disk.path.clone());
    }
    if let KernelImage::Path(kernel) = &config.boot.kernel {
        view.readable.push(kernel.clone());
    }
    view.readable.extend(config.boot.initrd.clone());
    // A checkpoint's new overlay is created on the disk's current image and opened with the whole
    // chain below it.
    view.readable.extend(disks::backing_files(config));
    // A path that does not exist cannot carry a rule; building the partition then fails with
    // its own error about it, which is what the user needs to read.
    view.writable_files.retain(|p| p.exists());
    view.readable.retain(|p| p.exists());
    view
}

/// How a worker comes to hold its VM's lock.
pub(super) enum VmLock<'a> {
    /// Taken (or inherited) by an exec'd worker at its start.
    Held(WorkerLock),
    /// To be handed over by the launcher to a pool worker, with the listeners it prepared.
    HandedOver(Handover<'a>),
}

impl VmLock<'_> {
    /// The lock, and the listeners when a pool worker prepared them; a pool worker waits for
    /// the hand-over here, once everything that writes nothing in the runtime folder is done.
    pub(super) fn take(
        self,
        runtime: &RuntimeDir,
    ) -> Result<(WorkerLock, Option<(UnixListener, UnixListener)>)> {
        match self {
            VmLock::Held(lock) => Ok((lock, None)),
            VmLock::HandedOver(handover) => {
                let (lock, listeners) = handover
                    .take_over()
                    .map_err(|e| Error::io(runtime.path(), e))?;
                let lock = WorkerLock::from_file(lock)
                    .map_err(|e| Error::io(runtime.lock_file(), e))?
                    .ok_or(Error::AlreadyRunning)?;
                Ok((lock, Some(listeners)))
            }
        }
    }
}

/// Reads and checks the VM's `config.json`.
pub(super) fn read_config(layout: &StoreLayout, vm_id: VmId) -> Result<VmConfig> {
    let path = layout.config_path(vm_id);
    let config_error = |source: Box<dyn std::error::Error + Send + Sync>| Error::Config {
        path: path.clone(),
        source,
    };
    let bytes = fs::read(&path).map_err(|e| config_error(Box::new(e)))?;
    let config: VmConfig = serde_json::from_slice(&bytes).map_err(|e| config_error(Box::new(e)))?;
    config.validate().map_err(|e| config_error(Box::new(e)))?;
    if config.id != vm_id {
        return Err(config_error(
            format!("it describes virtual machine {}", config.id).into(),
        ));
    }
    Ok(config)
}

/// Rebuilds a partition from a saved-state folder, and gives the folder's identity when it has
/// a memory manifest. The memory files are mapped copy-on-write, so the folder may be deleted as
/// soon as this returns.
pub(super) fn restore(
    builder: PartitionBuilder,
    dir: &Path,
) -> Result<(Partition, Option<String>)> {
    let state_path = dir.join(STATE_FILE);
    let bytes = fs::read(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state = PartitionState::from_json(&bytes).map_err(|e| Error::Config {
        path: state_path.clone(),
        source: Box::new(e),
    })?;
    let layers = state_folder::open_memory(dir)?;
    let partition = builder.restore_layered(&state, &layers.base, &layers.deltas)?;
    Ok((partition, layers.state_id))
}

/// Removes a saved-state folder the guest now runs from: renamed away first (so a crash never
/// leaves half of it under its real name), then deleted. The memory file stays readable through
/// the guest's private mapping of it.
pub(super) fn consume_saved_state(dir: &Path) -> Result<()> {
    let doomed = vmm_core::atomic_file::temporary_sibling(dir).map_err(|e| Error::io(dir, e))?;
    vmm_core::atomic_file::rename_durable(dir, &doomed).map_err(|e| Error::io(dir, e))?;
    // Renamed away, it is no saved state any more; a leftover is a temporary the service tidies.
    let _ = fs::remove_dir_all(&doomed);
    Ok(())
}
