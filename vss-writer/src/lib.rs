//! Hyper-V's VSS writer rebuilt over KVM: online backup of running virtual machines.
//!
//! [`VssWriter`] implements vmm-core's [`VirtualSystemBackupService`]. A session quiesces the
//! guest through its agent (the worker's integration channel; a qemu-guest-agent in a Linux
//! guest), has the worker switch every writable disk to an overlay at one instant, thaws the
//! guest, copies the frozen images into a backup set, and has the worker merge the overlays back
//! while the guest runs on (see [`session`]). An incremental set holds only the blocks the disks'
//! change tracking (Hyper-V's Resilient Change Tracking) reports changed since the last backup.
//!
//! A set is a folder: `manifest.json` ([`manifest::Manifest`]: the VM's definition, the
//! consistency, the reference point, a SHA-256 per stored extent) and one qcow2 image per disk.
//! An incremental's images are backed by the previous set's (`../<set>/disk0.qcow2`), so
//! `qemu-img` reads any point of a chain, and a chain of sibling folders can move as a whole.
//!
//! ```no_run
//! use std::sync::Arc;
//! use vmm_core::backup::BackupRequest;
//! # fn demo(service: &vmm_core::VirtualSystemManagementService, vm: vmm_core::VmId)
//! # -> vmm_core::Result<()> {
//! service.set_backup_service(Arc::new(vss_writer::VssWriter::new()));
//! let mut request = BackupRequest::new("/var/backups/web/monday");
//! request.incremental = true;
//! let (_code, job) = service.backup_system(vm, request)?;
//! # let _ = job; Ok(()) }
//! ```

use std::path::{Component, Path, PathBuf};

use snapshot::folder::CHANGE_TRACKING_FILE;
use snapshot::{Disk, Progress, commit_into_backing, create_qcow2};
use uuid::Uuid;
use vmm_core::backup::{
    BackupError, BackupReport, BackupRequest, BackupSetInfo, RestoreTarget,
    VirtualSystemBackupService,
};
use vmm_core::{DiskConfig, DiskOverlay, VmConfig, VmId, Worker, error_chain};

mod copy;
mod error;
pub mod manifest;
pub mod records;
pub mod session;

pub use error::{Error, Result};

use crate::copy::{Zeros, allocated_ranges, check_sums, copy_ranges, total};
use crate::manifest::Manifest;
use crate::records::{LastBackup, SessionJournal};

/// The longest chain of sets: each set's images are a layer of one backing chain, which
/// opens at most this deep.
pub const MAX_CHAIN: usize = snapshot::MAX_CHAIN_DEPTH;

/// The backup service over a folder store: sessions, sets, verify, restore, crash recovery.
#[derive(Debug, Default, Clone)]
pub struct VssWriter {}

impl VssWriter {
    /// A writer; it keeps no state of its own between calls (everything is in the VM's folder
    /// and in the sets).
    pub fn new() -> Self {
        VssWriter {}
    }
}

impl VirtualSystemBackupService for VssWriter {
    fn backup(
        &self,
        vm_dir: &Path,
        config: &VmConfig,
        worker: Option<&dyn Worker>,
        request: &BackupRequest,
        progress: &mut dyn Progress,
    ) -> std::result::Result<BackupReport, BackupError> {
        Ok(session::run(vm_dir, config, worker, request, progress)?)
    }

    fn describe(&self, set: &Path) -> std::result::Result<BackupSetInfo, BackupError> {
        let chain = read_chain(set)?;
        Ok(info_of(&chain))
    }

    fn verify(
        &self,
        set: &Path,
        progress: &mut dyn Progress,
    ) -> std::result::Result<BackupSetInfo, BackupError> {
        let chain = read_chain(set)?;
        verify_chain(&chain, progress)?;
        Ok(info_of(&chain))
    }

    fn restore(
        &self,
        set: &Path,
        vms_dir: &Path,
        target: &RestoreTarget,
        progress: &mut dyn Progress,
    ) -> std::result::Result<VmId, BackupError> {
        let chain = read_chain(set)?;
        verify_chain(&chain, &mut snapshot::NoProgress)?;
        Ok(restore_chain(&chain, vms_dir, target, progress)?)
    }

    fn recover(
        &self,
        vm_dir: &Path,
        worker: Option<&dyn Worker>,
    ) -> std::result::Result<bool, BackupError> {
        let Some(journal) = SessionJournal::read(vm_dir)? else {
            return Ok(false);
        };
        if !session::undo_capture(worker, &journal.overlays) {
            return Err(Error::InvalidState(format!(
                "the overlays of an interrupted backup ({}) could not be merged back",
                journal.set.display()
            ))
            .into());
        }
        if !journal.set.join(manifest::MANIFEST_FILE).exists() {
            let _ = std::fs::remove_dir_all(&journal.set);
        }
        SessionJournal::clear(vm_dir)?;
        Ok(true)
    }
}

/// A disk path from a VM's configuration: absolute, or relative to its `disks/` folder.
pub(crate) fn disk_path(vm_dir: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        vm_dir.join("disks").join(path)
    }
}

/// Merges overlays into the images below them with no worker running (a crash left them), and
/// removes them. Overlays that do not exist were never created or are merged already.
pub(crate) fn merge_offline(overlays: &[DiskOverlay]) -> Result<()> {
    for overlay in overlays {
        if !overlay.path.exists() {
            continue;
        }
        commit_into_backing(&overlay.path, &mut snapshot::NoProgress)?;
        snapshot::durable::remove_file(&overlay.path)?;
    }
    Ok(())
}

/// The report a set's manifest records.
pub(crate) fn report_of(set: &Path, manifest: &Manifest) -> BackupReport {
    BackupReport {
        set: set.to_path_buf(),
        kind: manifest.kind,
        full_reason: manifest.full_reason.clone(),
        consistency: manifest.consistency,
        consistency_reason: manifest.consistency_reason.clone(),
        freeze_window: manifest
            .freeze_window_us
            .map(std::time::Duration::from_micros),
        bytes_copied: manifest.stored_bytes(),
        bytes_changed: manifest.disks.iter().map(|d| d.bytes_changed).sum(),
        reference: manifest.reference,
    }
}

/// A set and the sets below it: (folder, manifest), this one first, the full one last.
type Chain = Vec<(PathBuf, Manifest)>;

/// Reads a set's manifest and follows its base links down to a full set, checking each link.
pub(crate) fn read_chain(set: &Path) -> Result<Chain> {
    let set = std::path::absolute(set).map_err(|e| Error::Io {
        op: "resolve",
        path: set.to_path_buf(),
        source: e,
    })?;
    let mut chain: Chain = Vec::new();
    let mut current = set;
    loop {
        let manifest = Manifest::read(&current)?;
        let next = manifest.base.clone();
        if let Some((_, above)) = chain.last()
            && above.base.as_ref().map(|b| b.set_id) != Some(manifest.set_id)
        {
            return Err(Error::InvalidSet {
                set: current.clone(),
                reason: "it is not the set the incremental above it was taken on".into(),
            });
        }
        if let Some((_, above)) = chain.last()
            && above.vm.id != manifest.vm.id
        {
            return Err(Error::InvalidSet {
                set: current.clone(),
                reason: "it holds another VM than the set above it".into(),
            });
        }
        chain.push((current.clone(), manifest));
        let Some(base) = next else {
            return Ok(chain);
        };
        if chain.len() >= MAX_CHAIN {
            return Err(Error::InvalidSet {
                set: current,
                reason: format!("its chain is longer than {MAX_CHAIN} sets"),
            });
        }
        let below = normalize(&current.join(&base.path));
        if !below.join(manifest::MANIFEST_FILE).exists() {
            return Err(Error::InvalidSet {
                set: current,
                reason: format!("the set it builds on, {}, is missing", below.display()),
            });
        }
        current = below;
    }
}

/// `a/b/../c` → `a/c` (base links are `../<name>`, checked by the manifest parser).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

fn info_of(chain: &Chain) -> BackupSetInfo {
    let (set, top) = &chain[0];
    BackupSetInfo {
        vm: top.vm.id,
        vm_name: top.vm.name.clone(),
        created: top.created,
        chain: chain.iter().map(|(path, _)| path.clone()).collect(),
        report: report_of(set, top),
    }
}

/// Opens every set's images (which opens their backing chains: a missing link fails here) and
/// checks every stored extent's checksum.
fn verify_chain(chain: &Chain, progress: &mut dyn Progress) -> Result<()> {
    progress.add_total(chain.iter().map(|(_, m)| m.stored_bytes()).sum());
    for (set, manifest) in chain {
        let invalid = |reason: String| Error::InvalidSet {
            set: set.clone(),
            reason,
        };
        for entry in &manifest.disks {
            let image = set.join(&entry.file);
            let disk = Disk::open(&image, true).map_err(|e| {
                invalid(format!(
                    "disk {} cannot be opened: {}",
                    entry.index,
                    error_chain(&e)
                ))
            })?;
            if disk.size() != entry.size {
                return Err(invalid(format!(
                    "disk {} is {} bytes, the manifest says {}",
                    entry.index,
                    disk.size(),
                    entry.size
                )));
            }
            check_sums(&disk, &entry.extents, progress).map_err(invalid)?;
        }
    }
    Ok(())
}

/// Writes the chain's disks as standalone images and the VM's definition, as a new VM or over
/// the backed-up one.
fn restore_chain(
    chain: &Chain,
    vms_dir: &Path,
    target: &RestoreTarget,
    progress: &mut dyn Progress,
) -> Result<VmId> {
    let (top_set, top) = &chain[0];
    let mut config = top.vm.clone();
    let (vm_dir, staging, prefix) = match target {
        RestoreTarget::NewVm { name } => {
            config.id = VmId::new_random();
            if let Some(name) = name {
                config.name = name.clone();
            }
            config.created = std::time::SystemTime::now();
            let vm_dir = vms_dir.join(config.id.to_string());
            let staging = vms_dir.join(format!(".{}.restoring", config.id));
            (vm_dir, Some(staging), String::new())
        }
        RestoreTarget::ReplaceVm => {
            let vm_dir = vms_dir.join(config.id.to_string());
            if !vm_dir.join("config.json").exists() {
                return Err(Error::InvalidState(format!(
                    "VM {} does not exist here: restore it as a new VM",
                    config.id
                )));
            }
            let tag = Uuid::new_v4().simple().to_string();
            (vm_dir, None, format!("restored-{}-", &tag[..8]))
        }
    };
    let folder = staging.clone().unwrap_or_else(|| vm_dir.clone());
    let result = write_restored(top_set, top, &folder, &prefix, &mut config, progress);
    let committed = result.and_then(|()| match &staging {
        Some(staging) => {
            vmm_core::atomic_file::rename_durable(staging, &vm_dir).map_err(|e| Error::Io {
                op: "rename",
                path: vm_dir.clone(),
                source: e,
            })
        }
        None => {
            // The disks changed without a worker seeing the writes: their change tracking and
            // the last backup no longer describe them.
            let _ = std::fs::remove_file(vm_dir.join(CHANGE_TRACKING_FILE));
            LastBackup::clear(&vm_dir)
        }
    });
    if committed.is_err()
        && let Some(staging) = &staging
    {
        let _ = std::fs::remove_dir_all(staging);
    }
    committed.map(|()| config.id)
}

/// Copies each disk of the chain into `folder/disks/<prefix>disk<i>.qcow2` and writes the
/// definition naming them into `folder/config.json`.
fn write_restored(
    top_set: &Path,
    top: &Manifest,
    folder: &Path,
    prefix: &str,
    config: &mut VmConfig,
    progress: &mut dyn Progress,
) -> Result<()> {
    let disks_dir = folder.join("disks");
    std::fs::create_dir_all(&disks_dir).map_err(|e| Error::Io {
        op: "create",
        path: disks_dir.clone(),
        source: e,
    })?;
    let mut plans = Vec::new();
    for entry in &top.disks {
        let image = top_set.join(&entry.file);
        let ranges = allocated_ranges(&image)?;
        plans.push((entry, image, ranges));
    }
    progress.add_total(plans.iter().map(|p| total(&p.2)).sum());
    for (entry, image, ranges) in plans {
        let name = format!("{prefix}disk{}.qcow2", entry.index);
        let path = disks_dir.join(&name);
        create_qcow2(&path, entry.size)?;
        let source = Disk::open(&image, true)?;
        let target = Disk::open(&path, false)?;
        copy_ranges(&source, &target, &ranges, Zeros::Skip, progress)?;
        let read_only = config.disks.get(entry.index).is_some_and(|d| d.read_only);
        if let Some(slot) = config.disks.get_mut(entry.index) {
            *slot = DiskConfig {
                path: PathBuf::from(name),
                read_only,
            };
        }
    }
    // Disks the set does not hold are not restored: drop them rather than name files that are
    // not there (a set holds every disk the VM had, so this only guards damaged definitions).
    let held: Vec<usize> = top.disks.iter().map(|d| d.index).collect();
    let mut index = 0;
    config.disks.retain(|_| {
        let keep = held.contains(&index);
        index += 1;
        keep
    });
    let bytes = serde_json::to_vec_pretty(config).map_err(Error::Encode)?;
    let path = folder.join("config.json");
    vmm_core::atomic_file::write_atomic(&path, &bytes).map_err(|e| Error::Io {
        op: "write",
        path,
        source: e,
    })
}
