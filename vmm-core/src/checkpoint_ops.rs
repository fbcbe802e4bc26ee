//! Checkpoint operations as service operations: `Msvm_VirtualSystemSnapshotService`'s methods
//! (and export/import) run as jobs that own their VM like every other operation, so a
//! checkpoint never races a start, a save or another checkpoint of the same VM.
//!
//! The files are the installed [`VirtualSystemSnapshotService`]'s business; this module decides
//! *whether* an operation may run (Hyper-V's rules: create on a running, paused, off or saved
//! VM; apply only on an Off or Saved one), drives the worker for a running VM's checkpoint, and
//! settles the record afterwards (the live config moved to new disk layers, apply leaves the VM
//! Off or Saved).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;

use crate::catalog::VmRecord;
use crate::checkpoint::{
    Checkpoint, CheckpointError, CheckpointId, CheckpointTree, CheckpointType, CreateRequest,
    ExportMode, ImportMode, Recovery, RunningCapture, VirtualSystemSnapshotService,
};
use crate::config::VmId;
use crate::error::{Error, error_chain};
use crate::event::EventKind;
use crate::job::{JobId, JobKind, JobOutcome, JobProgress};
use crate::production_checkpoint::{self, FrozenGuest, Quiesce};
use crate::return_code::checkpoint_code;
use crate::service::{Inner, VirtualSystemManagementService};
use crate::state::{EnabledState, RequestedState, ReturnCode};
use crate::supervision;
use crate::worker::{Worker, WorkerError};
use crate::{fault, operation};

/// What a checkpoint job does, prepared under the catalog lock.
enum Work {
    Create {
        request: CreateRequest,
        /// The worker of a running or paused VM; `None` for an Off or Saved one.
        worker: Option<Arc<dyn Worker>>,
    },
    Apply {
        checkpoint: CheckpointId,
        /// Start the VM once applied (the revert-to-checkpoint recovery action).
        then_start: bool,
    },
    Destroy {
        checkpoint: CheckpointId,
        subtree: bool,
    },
    Export {
        target: PathBuf,
        mode: ExportMode,
    },
}

impl VirtualSystemManagementService {
    /// Installs the snapshot service that checkpoint operations use (the `snapshot` crate's
    /// `FolderSnapshotService`, or an integrator's own). Without one, checkpoint calls fail with
    /// [`Error::NoSnapshotService`]. Returns `false` if one was installed already (it stays).
    pub fn set_snapshot_service(&self, service: Arc<dyn VirtualSystemSnapshotService>) -> bool {
        self.inner.snapshots.set(service).is_ok()
    }

    /// `CreateSnapshot`: a checkpoint of the VM, whatever its state — with the worker's help
    /// for a running or paused one. Returns 4096 and the job; 32774 while another operation owns
    /// the VM; 32775 in a transitional or degraded state.
    pub fn create_snapshot(
        &self,
        id: VmId,
        request: CreateRequest,
    ) -> crate::Result<(ReturnCode, Option<JobId>)> {
        if let Some(name) = &request.name {
            crate::checkpoint::validate_name(name)?;
        }
        snapshot_service(&self.inner)?;
        let mut catalog = self.inner.lock_catalog();
        let record = catalog.vms.get_mut(&id).ok_or(Error::VmNotFound(id))?;
        let worker = match record.state {
            EnabledState::Running | EnabledState::Paused => match record.worker.clone() {
                Some(worker) => Some(worker),
                None => return Ok((ReturnCode::InvalidState, None)),
            },
            _ => None,
        };
        let work = Work::Create { request, worker };
        Ok(begin(
            &self.inner,
            record,
            JobKind::CreateSnapshot,
            any_steady_state,
            work,
        ))
    }

    /// `ApplySnapshot`: the VM becomes checkpoint `checkpoint` (an id or a unique name): Saved
    /// when it holds a saved state, else Off. The VM must be Off or Saved (32775 otherwise).
    pub fn apply_snapshot(
        &self,
        id: VmId,
        checkpoint: &str,
    ) -> crate::Result<(ReturnCode, Option<JobId>)> {
        let checkpoint = self.find_checkpoint(id, checkpoint)?;
        let mut catalog = self.inner.lock_catalog();
        let record = catalog.vms.get_mut(&id).ok_or(Error::VmNotFound(id))?;
        let work = Work::Apply {
            checkpoint,
            then_start: false,
        };
        Ok(begin(
            &self.inner,
            record,
            JobKind::ApplySnapshot,
            off_or_saved,
            work,
        ))
    }

    /// `DestroySnapshot` (or `DestroySnapshotTree` with `subtree`): deletes the checkpoint,
    /// merging the disk layers no longer needed. Layers a running worker has open cannot be
    /// merged (no online merge yet): that fails with 32775 and changes nothing.
    pub fn destroy_snapshot(
        &self,
        id: VmId,
        checkpoint: &str,
        subtree: bool,
    ) -> crate::Result<(ReturnCode, Option<JobId>)> {
        let checkpoint = self.find_checkpoint(id, checkpoint)?;
        let kind = if subtree {
            JobKind::DestroySnapshotTree
        } else {
            JobKind::DestroySnapshot
        };
        let mut catalog = self.inner.lock_catalog();
        let record = catalog.vms.get_mut(&id).ok_or(Error::VmNotFound(id))?;
        let work = Work::Destroy {
            checkpoint,
            subtree,
        };
        Ok(begin(&self.inner, record, kind, any_steady_state, work))
    }

    /// Renames a checkpoint (`ModifySystemSettings` on the snapshot's `ElementName`); quick, so
    /// no job, but it owns the VM while it writes.
    pub fn rename_snapshot(&self, id: VmId, checkpoint: &str, name: &str) -> crate::Result<()> {
        let service = snapshot_service(&self.inner)?;
        let checkpoint = self.find_checkpoint(id, checkpoint)?;
        claim(&self.inner, id)?;
        if let Err(error) = self.inner.store.guard(id) {
            release(&self.inner, id);
            return Err(error);
        }
        let renamed = service.rename_snapshot(&self.inner.store.vm_dir(id), checkpoint, name);
        release(&self.inner, id);
        Ok(renamed?)
    }

    /// The VM's checkpoint tree and its "Now" position.
    pub fn snapshots(&self, id: VmId) -> crate::Result<CheckpointTree> {
        let service = snapshot_service(&self.inner)?;
        if !self.inner.lock_catalog().vms.contains_key(&id) {
            return Err(Error::VmNotFound(id));
        }
        Ok(service.snapshots(&self.inner.store.vm_dir(id))?)
    }

    /// `ExportSystemDefinition`: copies the VM (config, saved state, disks; and in
    /// [`ExportMode::Chained`] every checkpoint) into `target`, which must not exist. The VM must
    /// be Off or Saved.
    pub fn export_system(
        &self,
        id: VmId,
        target: PathBuf,
        mode: ExportMode,
    ) -> crate::Result<(ReturnCode, Option<JobId>)> {
        snapshot_service(&self.inner)?;
        let mut catalog = self.inner.lock_catalog();
        let record = catalog.vms.get_mut(&id).ok_or(Error::VmNotFound(id))?;
        let work = Work::Export { target, mode };
        Ok(begin(
            &self.inner,
            record,
            JobKind::ExportSystem,
            off_or_saved,
            work,
        ))
    }

    /// `ImportSystemDefinition`: adds the VM exported in `source` to this store (a new id, or
    /// the exported one) and returns its id. It comes up Off, or Saved with a saved state.
    pub fn import_system(&self, source: &Path, mode: ImportMode) -> crate::Result<VmId> {
        let service = snapshot_service(&self.inner)?;
        let mut progress = crate::checkpoint::NoProgress;
        let id = service.import(source, &self.inner.store.vms_dir(), mode, &mut progress)?;
        let config = self.inner.store.read_config(id)?;
        let saved = self.inner.store.has_saved_state(id);
        let mut catalog = self.inner.lock_catalog();
        catalog
            .vms
            .insert(id, VmRecord::new(id, Some(config), saved));
        self.inner.events.publish(id, EventKind::Defined);
        Ok(id)
    }

    /// Creates an empty disk image of `size` bytes named `file_name` in the VM's `disks/` folder
    /// (`New-VM -NewVHDSizeBytes`) and returns its path. The VM must be Off; attach the disk with
    /// [`modify_system_settings`](Self::modify_system_settings).
    pub fn create_disk(&self, id: VmId, file_name: &str, size: u64) -> crate::Result<PathBuf> {
        let service = snapshot_service(&self.inner)?;
        let plain = Path::new(file_name)
            .file_name()
            .is_some_and(|name| name == file_name);
        if !plain {
            return Err(CheckpointError::InvalidParameter(format!(
                "disk file name {file_name:?} must be a plain file name"
            ))
            .into());
        }
        claim(&self.inner, id)?;
        let path = self.inner.store.disks_dir(id).join(file_name);
        let created = match self.get_vm(id).map(|vm| vm.enabled_state) {
            Ok(EnabledState::Off) => self
                .inner
                .store
                .guard(id)
                .and_then(|()| service.create_disk(&path, size).map_err(Error::from)),
            Ok(state) => Err(Error::NotStopped { id, state }),
            Err(error) => Err(error),
        };
        release(&self.inner, id);
        created.map(|()| path)
    }

    fn find_checkpoint(&self, id: VmId, id_or_name: &str) -> crate::Result<CheckpointId> {
        let tree = self.snapshots(id)?;
        Ok(tree.find(id_or_name)?.id)
    }
}

/// The installed snapshot service.
fn snapshot_service(inner: &Inner) -> crate::Result<Arc<dyn VirtualSystemSnapshotService>> {
    inner
        .snapshots
        .get()
        .cloned()
        .ok_or(Error::NoSnapshotService)
}

fn any_steady_state(state: EnabledState) -> bool {
    !state.is_transitional()
}

fn off_or_saved(state: EnabledState) -> bool {
    matches!(state, EnabledState::Off | EnabledState::Saved)
}

/// Claims VM `id` for a short synchronous operation.
fn claim(inner: &Arc<Inner>, id: VmId) -> crate::Result<()> {
    let mut catalog = inner.lock_catalog();
    let record = catalog.vms.get_mut(&id).ok_or(Error::VmNotFound(id))?;
    if record.is_degraded() {
        return Err(Error::Degraded(id));
    }
    if !record.owner.claim() {
        return Err(Error::Busy(id));
    }
    Ok(())
}

fn release(inner: &Arc<Inner>, id: VmId) {
    let mut catalog = inner.lock_catalog();
    if let Some(record) = catalog.vms.get_mut(&id) {
        supervision::release(inner, record);
    }
}

/// Claims the VM and runs `work` as a job on its own thread (catalog locked).
fn begin(
    inner: &Arc<Inner>,
    record: &mut VmRecord,
    kind: JobKind,
    allowed: fn(EnabledState) -> bool,
    work: Work,
) -> (ReturnCode, Option<JobId>) {
    if record.owner.is_claimed() {
        return (ReturnCode::SystemInUse, None);
    }
    if record.is_degraded() || !allowed(record.state) {
        return (ReturnCode::InvalidState, None);
    }
    if inner.snapshots.get().is_none() {
        return (ReturnCode::NotSupported, None);
    }
    if !record.owner.claim() {
        return (ReturnCode::SystemInUse, None);
    }
    let job = inner.jobs.create(kind, record.id);
    let vm = record.id;
    let thread_inner = Arc::clone(inner);
    let spawned = thread::Builder::new()
        .name(format!("vmms-cp-{}", &vm.to_string()[..8]))
        .spawn(move || {
            let result = execute(&thread_inner, vm, job, &work);
            finish(&thread_inner, vm, job, &work, result);
        });
    match spawned {
        Ok(_) => (ReturnCode::JobStarted, Some(job)),
        Err(error) => {
            let text = format!("cannot start operation thread: {error}");
            inner.jobs.finish(
                job,
                JobOutcome::Failed(ReturnCode::Failed.code(), text),
                |_| {},
            );
            supervision::release(inner, record);
            (ReturnCode::Failed, None)
        }
    }
}

/// Why a checkpoint job failed.
struct Failure {
    code: ReturnCode,
    description: String,
}

impl From<CheckpointError> for Failure {
    fn from(error: CheckpointError) -> Self {
        Failure {
            code: checkpoint_code(&error),
            description: error_chain(&error),
        }
    }
}

/// What a job did: the event that announces what changed, and a warning when it did not
/// quite do what was asked (a production checkpoint taken as standard).
struct Done {
    event: Option<EventKind>,
    warning: Option<String>,
}

/// The slow part, with no lock held.
fn execute(inner: &Inner, vm: VmId, job: JobId, work: &Work) -> Result<Done, Failure> {
    // In a cluster only the VM's owner may change its files (an export only reads them).
    if !matches!(work, Work::Export { .. }) {
        inner.store.guard(vm).map_err(|error| Failure {
            code: crate::return_code(&error),
            description: error_chain(&error),
        })?;
    }
    let Some(service) = inner.snapshots.get() else {
        return Err(Failure {
            code: ReturnCode::NotSupported,
            description: Error::NoSnapshotService.to_string(),
        });
    };
    let vm_dir = inner.store.vm_dir(vm);
    let mut progress = JobProgress::new(&inner.jobs, job);
    let mut warning = None;
    let event = match work {
        Work::Create {
            request,
            worker: None,
        } => {
            let taken = service.create_snapshot(&vm_dir, request, &mut progress)?;
            Some(EventKind::CheckpointCreated {
                checkpoint: taken.id,
            })
        }
        Work::Create {
            request,
            worker: Some(worker),
        } => {
            let taken = create_running(service.as_ref(), &vm_dir, request, worker.as_ref())?;
            warning = taken.warning;
            Some(EventKind::CheckpointCreated {
                checkpoint: taken.checkpoint.id,
            })
        }
        Work::Apply { checkpoint, .. } => {
            service.apply_snapshot(&vm_dir, *checkpoint, &mut progress)?;
            Some(EventKind::CheckpointApplied {
                checkpoint: *checkpoint,
            })
        }
        Work::Destroy {
            checkpoint,
            subtree,
        } => {
            let doomed = if *subtree {
                service.snapshots(&vm_dir)?.subtree_post_order(*checkpoint)
            } else {
                vec![*checkpoint]
            };
            if *subtree {
                service.destroy_snapshot_tree(&vm_dir, *checkpoint, &mut progress)?;
            } else {
                service.destroy_snapshot(&vm_dir, *checkpoint, &mut progress)?;
            }
            Some(EventKind::CheckpointsDeleted {
                checkpoints: doomed,
            })
        }
        Work::Export { target, mode } => {
            service.export(&vm_dir, target, *mode, &mut progress)?;
            None
        }
    };
    Ok(Done { event, warning })
}

/// A running VM's checkpoint as it was taken, and why a production one fell back to standard.
struct Taken {
    checkpoint: Checkpoint,
    warning: Option<String>,
}

/// A running VM's checkpoint. Standard: prepared by the snapshot service, taken by the worker
/// (memory, devices, disks), finished by the snapshot service whatever the worker answered (it
/// decides by the worker's commit). Production: the guest is quiesced first and only its disks
/// are switched while it is frozen; a guest that cannot be quiesced gets a standard checkpoint
/// (type 3) or none (type 4, 32775, nothing changed).
fn create_running(
    service: &dyn VirtualSystemSnapshotService,
    vm_dir: &Path,
    request: &CreateRequest,
    worker: &dyn Worker,
) -> Result<Taken, Failure> {
    let quiesce_failure = match request.checkpoint_type {
        CheckpointType::Standard => None,
        CheckpointType::Production | CheckpointType::ProductionOnly => {
            let quiesced = production_checkpoint::quiesce(worker).map_err(|e| not_taken(&e))?;
            match quiesced {
                Quiesce::Frozen(frozen) => {
                    match take_frozen(service, vm_dir, request, worker, frozen)? {
                        Ok(checkpoint) => {
                            return Ok(Taken {
                                checkpoint,
                                warning: None,
                            });
                        }
                        Err(reason) => Some(reason),
                    }
                }
                Quiesce::NotQuiesced(reason) => Some(reason),
            }
        }
    };
    if let Some(reason) = &quiesce_failure
        && request.checkpoint_type == CheckpointType::ProductionOnly
    {
        return Err(Failure {
            code: ReturnCode::InvalidState,
            description: format!(
                "production-only checkpoint not taken: quiescing the guest failed: {reason}"
            ),
        });
    }
    let capture = RunningCapture::SavedState {
        quiesce_failure: quiesce_failure.clone(),
    };
    let running = service.prepare_running_snapshot(vm_dir, request, &capture)?;
    fault::point("checkpoint.before-worker");
    let taken = worker.checkpoint(&running.request);
    fault::point("checkpoint.after-worker");
    let finished = service.finish_running_snapshot(vm_dir, &running);
    let checkpoint = match (taken, finished) {
        (_, Ok(checkpoint)) => checkpoint,
        (Err(error), Err(_)) => return Err(not_taken(&error)),
        (Ok(_), Err(error)) => return Err(error.into()),
    };
    Ok(Taken {
        checkpoint,
        warning: quiesce_failure.map(|reason| {
            format!(
                "production checkpoint taken as a standard one (with saved state): quiescing \
                 the guest failed: {reason}"
            )
        }),
    })
}

/// The production half: the disks switched while `frozen`, then the guest thawed. `Ok(Err)`
/// says why the disks were not switched inside the freeze (nothing was kept: the caller may
/// fall back to a standard checkpoint).
fn take_frozen(
    service: &dyn VirtualSystemSnapshotService,
    vm_dir: &Path,
    request: &CreateRequest,
    worker: &dyn Worker,
    frozen: FrozenGuest<'_>,
) -> Result<Result<Checkpoint, String>, Failure> {
    // Dropping `frozen` thaws the guest: on an error here, or once the worker answered.
    let running =
        service.prepare_running_snapshot(vm_dir, request, &RunningCapture::FrozenDisks)?;
    fault::point("checkpoint.before-worker");
    fault::point("checkpoint.production-frozen");
    let taken = worker.checkpoint(&running.request);
    drop(frozen);
    fault::point("checkpoint.after-worker");
    let finished = service.finish_running_snapshot(vm_dir, &running);
    match (taken, finished) {
        (_, Ok(checkpoint)) => Ok(Ok(checkpoint)),
        (Err(error @ (WorkerError::InvalidState { .. } | WorkerError::Refused { .. })), Err(_)) => {
            Ok(Err(format!(
                "the disks could not be switched while the guest was frozen: {}",
                error_chain(&error)
            )))
        }
        (Err(error), Err(_)) => Err(not_taken(&error)),
        (Ok(_), Err(error)) => Err(error.into()),
    }
}

/// The worker did not take the checkpoint.
fn not_taken(error: &WorkerError) -> Failure {
    Failure {
        code: worker_code(error),
        description: format!(
            "the worker did not take the checkpoint: {}",
            error_chain(error)
        ),
    }
}

fn worker_code(error: &WorkerError) -> ReturnCode {
    match error {
        WorkerError::InvalidState { .. } => ReturnCode::InvalidState,
        WorkerError::Timeout(_) => ReturnCode::Timeout,
        WorkerError::Gone => ReturnCode::SystemNotAvailable,
        _ => ReturnCode::Failed,
    }
}

/// Settles the record after the job: the config may name new disk layers, apply changes the
/// state; ends the job and releases the VM (catalog locked inside).
fn finish(inner: &Arc<Inner>, vm: VmId, job: JobId, work: &Work, result: Result<Done, Failure>) {
    let config = inner.store.read_config(vm);
    let saved = inner.store.has_saved_state(vm);
    let mut catalog = inner.lock_catalog();
    let Some(record) = catalog.vms.get_mut(&vm) else {
        return;
    };
    let events = &inner.events;
    // Even a failed operation may have rolled something forward; the store is the truth.
    if let Ok(config) = config
        && record.config.as_ref() != Some(&config)
    {
        record.config = Some(config);
        events.publish(vm, EventKind::Modified);
    }
    if let Work::Apply { .. } = work
        && result.is_ok()
    {
        let state = if saved {
            EnabledState::Saved
        } else {
            EnabledState::Off
        };
        record.set_state(state, events);
    }
    if let Ok(Done {
        event: Some(event), ..
    }) = &result
    {
        events.publish(vm, event.clone());
    }
    let outcome = match &result {
        Ok(Done {
            warning: Some(warning),
            ..
        }) => JobOutcome::CompletedWithWarnings(warning.clone()),
        Ok(_) => JobOutcome::Completed,
        Err(failure) => JobOutcome::Failed(failure.code.code(), failure.description.clone()),
    };
    inner.jobs.finish(job, outcome, |job| {
        events.publish(
            vm,
            EventKind::JobCompleted {
                job: job.id,
                state: job.state,
            },
        );
    });
    supervision::release(inner, record);
    if let (
        Work::Apply {
            then_start: true, ..
        },
        Ok(_),
    ) = (work, &result)
    {
        let (code, _job) = operation::begin(
            inner,
            record,
            RequestedState::Start,
            JobKind::RecoveryRestart,
        );
        if code != ReturnCode::JobStarted {
            events.publish(
                vm,
                EventKind::RecoverySkipped {
                    action: crate::AutomaticRecoveryAction::RevertToSnapshot,
                    reason: format!("start after revert refused: {code}"),
                },
            );
        }
    }
}

/// The revert-to-checkpoint recovery action (catalog locked): applies the VM's newest
/// checkpoint and starts it. Returns why it could not begin.
pub(crate) fn begin_revert(inner: &Arc<Inner>, record: &mut VmRecord) -> Result<(), String> {
    let Some(service) = inner.snapshots.get() else {
        return Err(Error::NoSnapshotService.to_string());
    };
    let tree = service
        .snapshots(&inner.store.vm_dir(record.id))
        .map_err(|e| error_chain(&e))?;
    let Some(newest) = tree.checkpoints.iter().max_by_key(|c| c.created) else {
        return Err("the virtual machine has no checkpoint".into());
    };
    let work = Work::Apply {
        checkpoint: newest.id,
        then_start: true,
    };
    match begin(inner, record, JobKind::RecoveryRevert, off_or_saved, work) {
        (ReturnCode::JobStarted, _) => Ok(()),
        (code, _) => Err(format!("revert refused: {code}")),
    }
}

/// Finishes or undoes a checkpoint operation a crash interrupted (start-up, before the VM is
/// shown). Returns whether the VM's files changed.
pub(crate) fn recover_interrupted(inner: &Inner, vm: VmId) -> Result<bool, CheckpointError> {
    let Some(service) = inner.snapshots.get() else {
        return Ok(false);
    };
    let recovery = service.recover(&inner.store.vm_dir(vm))?;
    Ok(recovery != Recovery::Clean)
}
