//! One backup session, in Hyper-V's VSS order: PrepareForBackup (check, journal) →
//! PrepareForSnapshot (the guest agent freezes the guest) → the disks' point-in-time capture
//! (the worker switches them to overlays) → Thaw → PostSnapshot (full or incremental decided
//! from the change tracking) → copy → the manifest (the set's commit point) → BackupComplete
//! (the overlays are merged back while the guest runs). Any failure aborts: the guest is thawed,
//! the disks go back to their images with nothing lost, the partial set is removed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use snapshot::{Disk, DiskFormat, Progress, create_overlay_named, create_qcow2};
use uuid::Uuid;
use vmm_core::backup::{BackupConsistency, BackupKind, BackupReport, BackupRequest, FreezePolicy};
use vmm_core::integration::{
    BackupCaptureReport, BackupCaptureRequest, BackupMergeRequest, ChangedBlocks, ReferencePointId,
};
use vmm_core::{DiskOverlay, VmConfig, Worker, WorkerError, WorkerStatus, error_chain, fault};

use crate::copy::{Zeros, allocated_ranges, copy_ranges, total};
use crate::error::{Error, Result};
use crate::manifest::{BaseLink, DiskEntry, FORMAT, Manifest};
use crate::records::{LastBackup, SessionJournal};
use crate::{disk_path, merge_offline};

/// How long the agent gets to answer a ping before the guest counts as having none running.
const PING_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a thaw may take to be answered.
const THAW_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether the guest is frozen for the capture.
enum Quiesce {
    /// Frozen since this instant.
    Frozen(Instant),
    /// Not frozen, and why.
    NotFrozen(String),
}

/// Runs a whole session. `worker` is `None` for a VM that is not running.
pub(crate) fn run(
    vm_dir: &Path,
    config: &VmConfig,
    worker: Option<&dyn Worker>,
    request: &BackupRequest,
    progress: &mut dyn Progress,
) -> Result<BackupReport> {
    let set = prepare_set_folder(&request.target)?;
    let disks: Vec<PathBuf> = config
        .disks
        .iter()
        .map(|d| disk_path(vm_dir, &d.path))
        .collect();
    let overlays = match worker {
        Some(_) => overlays_for(config, &disks),
        None => Vec::new(),
    };
    let journal = SessionJournal {
        set: set.clone(),
        overlays: overlays.clone(),
    };
    if let Err(error) = journal.write(vm_dir) {
        let _ = std::fs::remove_dir(&set);
        return Err(error);
    }
    let mut session = Session {
        vm_dir,
        config,
        worker,
        request,
        set: &set,
        disks: &disks,
        overlays: &overlays,
        captured: false,
    };
    match session.run(progress) {
        Ok(report) => Ok(report),
        Err(error) => {
            session.abort();
            Err(error)
        }
    }
}

/// Creates the set's folder, which must not exist yet; returns it absolute.
fn prepare_set_folder(target: &Path) -> Result<PathBuf> {
    let set = std::path::absolute(target).map_err(|e| Error::Io {
        op: "resolve",
        path: target.to_path_buf(),
        source: e,
    })?;
    if set.file_name().is_none() {
        return Err(Error::InvalidParameter(format!(
            "{} cannot be a backup set folder",
            set.display()
        )));
    }
    std::fs::create_dir(&set).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => Error::InvalidParameter(format!(
            "{} exists already: a backup set needs a new folder",
            set.display()
        )),
        _ => Error::Io {
            op: "create",
            path: set.clone(),
            source: e,
        },
    })?;
    Ok(set)
}

/// One overlay per writable disk, next to the disk's image.
fn overlays_for(config: &VmConfig, disks: &[PathBuf]) -> Vec<DiskOverlay> {
    let tag = Uuid::new_v4().simple().to_string();
    config
        .disks
        .iter()
        .zip(disks)
        .enumerate()
        .filter(|(_, (disk, _))| !disk.read_only)
        .map(|(index, (_, path))| {
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "disk".into());
            let folder = path.parent().unwrap_or(Path::new("."));
            DiskOverlay {
                disk: index,
                path: folder.join(format!("{stem}~backup-{}.qcow2", &tag[..8])),
            }
        })
        .collect()
}

struct Session<'a> {
    vm_dir: &'a Path,
    config: &'a VmConfig,
    worker: Option<&'a dyn Worker>,
    request: &'a BackupRequest,
    set: &'a Path,
    disks: &'a [PathBuf],
    overlays: &'a [DiskOverlay],
    /// The worker may have switched disks to overlays: an abort must merge them back.
    captured: bool,
}

/// What the capture step found.
struct Capture {
    consistency: BackupConsistency,
    consistency_reason: Option<String>,
    freeze_window: Option<Duration>,
    tracking: Option<BackupCaptureReport>,
}

impl Session<'_> {
    fn run(&mut self, progress: &mut dyn Progress) -> Result<BackupReport> {
        let reference = ReferencePointId::new_random();
        let capture = match self.worker {
            Some(worker) => self.capture_online(worker, reference)?,
            None => Capture {
                consistency: BackupConsistency::CrashConsistent,
                consistency_reason: Some(
                    "the VM was not running: its disks are as it left them".into(),
                ),
                freeze_window: None,
                tracking: None,
            },
        };
        fault::point("backup.after-capture");
        let (base, full_reason) = self.choose_base(capture.tracking.as_ref());
        let set_id = Uuid::new_v4();
        let entries = self.copy_disks(base.as_ref(), capture.tracking.as_ref(), progress)?;
        fault::point("backup.after-copy");
        let manifest = Manifest {
            format: FORMAT.into(),
            tool_version: format!("vss-writer {}", env!("CARGO_PKG_VERSION")),
            set_id,
            created: SystemTime::now(),
            vm: self.config.clone(),
            kind: if base.is_some() {
                BackupKind::Incremental
            } else {
                BackupKind::Full
            },
            full_reason,
            consistency: capture.consistency,
            consistency_reason: capture.consistency_reason,
            freeze_window_us: capture
                .freeze_window
                .map(|w| u64::try_from(w.as_micros()).unwrap_or(u64::MAX)),
            reference,
            base: base.as_ref().map(|b| b.link.clone()),
            disks: entries,
        };
        manifest.write(self.set)?;
        fault::point("backup.after-manifest");
        self.complete(reference, set_id)?;
        Ok(crate::report_of(self.set, &manifest))
    }

    /// PrepareForSnapshot, the capture and Thaw.
    fn capture_online(
        &mut self,
        worker: &dyn Worker,
        reference: ReferencePointId,
    ) -> Result<Capture> {
        let quiesce = self.quiesce(worker)?;
        fault::point("backup.before-capture");
        self.captured = true;
        let captured = worker.backup_capture(&BackupCaptureRequest {
            overlays: self.overlays.to_vec(),
            reference,
        });
        let captured_at = Instant::now();
        let (consistency, reason, window) = match quiesce {
            Quiesce::Frozen(since) => {
                // A thaw that fails is covered by the worker's hold limit, which thaws the
                // guest by itself; the capture happened inside the freeze either way.
                let _ = worker.thaw_guest(THAW_TIMEOUT);
                let window = since.elapsed();
                if captured_at.duration_since(since) > self.request.freeze_limit {
                    (
                        BackupConsistency::CrashConsistent,
                        Some(format!(
                            "the capture came after the freeze limit ({:?}): the guest was \
                             already thawed",
                            self.request.freeze_limit
                        )),
                        Some(window),
                    )
                } else {
                    (BackupConsistency::ApplicationConsistent, None, Some(window))
                }
            }
            Quiesce::NotFrozen(reason) => (BackupConsistency::CrashConsistent, Some(reason), None),
        };
        let tracking = captured.map_err(|source| Error::Worker {
            step: "capture the disks",
            source,
        })?;
        if consistency == BackupConsistency::CrashConsistent
            && self.request.freeze_policy == FreezePolicy::Fail
        {
            return Err(Error::QuiesceFailed(reason.unwrap_or_default()));
        }
        Ok(Capture {
            consistency,
            consistency_reason: reason,
            freeze_window: window,
            tracking: Some(tracking),
        })
    }

    /// Asks the guest's agent to freeze, within the request's limit; the policy decides
    /// whether a guest that cannot be frozen fails the session.
    fn quiesce(&self, worker: &dyn Worker) -> Result<Quiesce> {
        let not_frozen = |reason: String| match self.request.freeze_policy {
            FreezePolicy::FallBackToCrashConsistent => Ok(Quiesce::NotFrozen(reason)),
            FreezePolicy::Fail => Err(Error::QuiesceFailed(reason)),
        };
        if worker.status() == WorkerStatus::Paused {
            return not_frozen("the VM is paused: its guest cannot be asked to freeze".into());
        }
        match worker.guest_agent_ping(PING_TIMEOUT) {
            Ok(()) => {}
            Err(WorkerError::Gone) => {
                return Err(Error::Worker {
                    step: "reach the guest agent",
                    source: WorkerError::Gone,
                });
            }
            Err(error) => {
                return not_frozen(format!(
                    "the guest agent does not answer: {}",
                    error_chain(&error)
                ));
            }
        }
        let since = Instant::now();
        let limit = self.request.freeze_limit;
        match worker.freeze_guest(limit, limit) {
            Ok(_) => Ok(Quiesce::Frozen(since)),
            Err(WorkerError::Gone) => Err(Error::Worker {
                step: "freeze the guest",
                source: WorkerError::Gone,
            }),
            Err(error) => not_frozen(format!(
                "the guest agent did not freeze the guest: {}",
                error_chain(&error)
            )),
        }
    }

    /// PostSnapshot: the base an incremental builds on, or why the set is full.
    fn choose_base(
        &self,
        tracking: Option<&BackupCaptureReport>,
    ) -> (Option<Base>, Option<String>) {
        if !self.request.incremental {
            return (None, None);
        }
        let Some(last) = LastBackup::read(self.vm_dir) else {
            return (
                None,
                Some("the VM has no earlier backup to build on".into()),
            );
        };
        let Some(tracking) = tracking else {
            return (
                None,
                Some(
                    "the VM is not running: its changes are known only to a running worker".into(),
                ),
            );
        };
        if tracking.previous_reference != Some(last.reference) {
            let why = tracking
                .untracked_reason
                .clone()
                .unwrap_or_else(|| "the change tracking does not reach back to it".into());
            return (
                None,
                Some(format!(
                    "the changes since the last backup ({}) are not known: {why}",
                    last.set.display()
                )),
            );
        }
        match Base::open(self.set, &last) {
            Ok(base) if base.depth >= crate::MAX_CHAIN => (
                None,
                Some(format!(
                    "the chain of sets has reached {} sets, as deep as an image chain opens",
                    crate::MAX_CHAIN
                )),
            ),
            Ok(base) => (Some(base), None),
            Err(reason) => (None, Some(reason)),
        }
    }

    /// Copies every disk into the set: everything allocated for a full set, the changed blocks
    /// on top of the base's image for an incremental.
    fn copy_disks(
        &self,
        base: Option<&Base>,
        tracking: Option<&BackupCaptureReport>,
        progress: &mut dyn Progress,
    ) -> Result<Vec<DiskEntry>> {
        let mut plans = Vec::new();
        for (index, path) in self.disks.iter().enumerate() {
            let source = Disk::open(path, true)?;
            let size = source.size();
            let changes = tracking.and_then(|t| t.changes.iter().find(|c| c.disk == index));
            let (ranges, changed) = match base {
                Some(_) => {
                    let ranges = changes
                        .map(ChangedBlocks::changed_ranges)
                        .unwrap_or_default();
                    let changed = total(&ranges);
                    (ranges, changed)
                }
                None => {
                    let ranges = allocated_ranges(path)?;
                    let changed = total(&ranges);
                    (ranges, changed)
                }
            };
            plans.push((index, source, size, ranges, changed));
        }
        progress.add_total(plans.iter().map(|p| total(&p.3)).sum());
        let mut entries = Vec::new();
        for (index, source, size, ranges, changed) in plans {
            let file = format!("disk{index}.qcow2");
            let target_path = self.set.join(&file);
            let zeros = match base {
                Some(base) => {
                    let backing = base.disk_file(index).ok_or_else(|| {
                        Error::InvalidParameter(format!(
                            "the base set has no disk {index}: take a full backup"
                        ))
                    })?;
                    create_overlay_named(&target_path, &backing, size, DiskFormat::Qcow2)?;
                    Zeros::Write
                }
                None => {
                    create_qcow2(&target_path, size)?;
                    Zeros::Skip
                }
            };
            let target = Disk::open(&target_path, false)?;
            let extents = copy_ranges(&source, &target, &ranges, zeros, progress)?;
            entries.push(DiskEntry {
                index,
                file,
                size,
                bytes_changed: changed,
                extents,
            });
        }
        vmm_core::atomic_file::sync_dir(self.set).map_err(|e| Error::Io {
            op: "sync",
            path: self.set.to_path_buf(),
            source: e,
        })?;
        Ok(entries)
    }

    /// BackupComplete: the overlays merge back with change tracking kept, and the set becomes
    /// the VM's last backup.
    fn complete(&mut self, reference: ReferencePointId, set_id: Uuid) -> Result<()> {
        if let Some(worker) = self.worker {
            let merged = worker.backup_merge(&BackupMergeRequest {
                overlays: self.overlays.to_vec(),
                keep_reference: true,
            });
            match merged {
                Ok(()) => {}
                // The set is complete; a worker that died meanwhile left its overlays, which
                // merge offline just as well (its change tracking is lost with it, so the next
                // backup will be full and say why).
                Err(WorkerError::Gone) => merge_offline(self.overlays)?,
                Err(source) => {
                    return Err(Error::Worker {
                        step: "merge the backup overlays",
                        source,
                    });
                }
            }
        }
        self.captured = false;
        fault::point("backup.after-merge");
        LastBackup {
            reference,
            set: self.set.to_path_buf(),
            set_id,
        }
        .write(self.vm_dir)?;
        SessionJournal::clear(self.vm_dir)
    }

    /// Undoes whatever the session did (best effort, every step tried). The journal stays when
    /// the overlays could not be merged, so start-up (or the next start of the VM) finishes it.
    fn abort(&mut self) {
        if let Some(worker) = self.worker {
            // A guest frozen by this session must not wait for the hold limit.
            if let Ok(vmm_core::integration::GuestFreezeStatus::Frozen) =
                worker.guest_freeze_status(PING_TIMEOUT)
            {
                let _ = worker.thaw_guest(THAW_TIMEOUT);
            }
        }
        let merged = if self.captured {
            undo_capture(self.worker, self.overlays)
        } else {
            true
        };
        if !self.set.join(crate::manifest::MANIFEST_FILE).exists() {
            let _ = std::fs::remove_dir_all(self.set);
        }
        if merged {
            let _ = SessionJournal::clear(self.vm_dir);
        }
    }
}

/// Puts the disks back on their images with change tracking dropped: through the worker while it
/// lives, offline once it is gone. Returns whether every overlay is gone.
pub(crate) fn undo_capture(worker: Option<&dyn Worker>, overlays: &[DiskOverlay]) -> bool {
    if overlays.is_empty() {
        return true;
    }
    let request = BackupMergeRequest {
        overlays: overlays.to_vec(),
        keep_reference: false,
    };
    match worker.map(|w| w.backup_merge(&request)) {
        Some(Ok(())) => true,
        Some(Err(WorkerError::Gone)) | None => merge_offline(overlays).is_ok(),
        Some(Err(_)) => false,
    }
}

/// The set an incremental builds on.
struct Base {
    link: BaseLink,
    manifest: Manifest,
    /// Sets in its chain, itself included.
    depth: usize,
}

impl Base {
    /// The last backup's set, if it is still there and is the one recorded.
    fn open(set: &Path, last: &LastBackup) -> std::result::Result<Base, String> {
        let chain = crate::read_chain(&last.set)
            .map_err(|e| format!("the last backup's set cannot be read: {}", error_chain(&e)))?;
        let depth = chain.len();
        let Some((_, manifest)) = chain.into_iter().next() else {
            return Err("the last backup's set holds nothing".into());
        };
        if manifest.set_id != last.set_id {
            return Err(format!(
                "{} is no longer the last backup's set",
                last.set.display()
            ));
        }
        let siblings = set.parent().is_some() && set.parent() == last.set.parent();
        let Some(name) = last.set.file_name().filter(|_| siblings) else {
            return Err(format!(
                "the last backup's set {} is not in the same folder as {}: an incremental \
                 set must sit next to its base",
                last.set.display(),
                set.display()
            ));
        };
        Ok(Base {
            link: BaseLink {
                path: Path::new("..").join(name),
                set_id: manifest.set_id,
            },
            manifest,
            depth,
        })
    }

    /// The backing name of disk `index`'s image, relative to the new set's folder.
    fn disk_file(&self, index: usize) -> Option<String> {
        let entry = self.manifest.disks.iter().find(|d| d.index == index)?;
        Some(
            self.link
                .path
                .join(&entry.file)
                .to_string_lossy()
                .into_owned(),
        )
    }
}
