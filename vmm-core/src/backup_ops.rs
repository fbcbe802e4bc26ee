//! Backups as service operations: a backup runs as a job that owns its VM like every other
//! operation (so it never races a start, a save or a checkpoint of the same VM), and restores
//! bring the VM they create or replace into the catalog.
//!
//! The session itself (freeze, capture, copy, merge) and the set format belong to the installed
//! [`VirtualSystemBackupService`]; this module decides whether a backup may run, hands it the
//! worker of a running VM, and publishes what it made.

use std::path::Path;
use std::sync::Arc;
use std::thread;

use crate::backup::{
    BackupError, BackupReport, BackupRequest, BackupSetInfo, RestoreTarget,
    VirtualSystemBackupService,
};
use crate::catalog::VmRecord;
use crate::checkpoint::NoProgress;
use crate::config::VmId;
use crate::error::{Error, error_chain};
use crate::event::EventKind;
use crate::job::{JobId, JobKind, JobOutcome, JobProgress};
use crate::return_code::backup_code;
use crate::service::{Inner, VirtualSystemManagementService};
use crate::state::{EnabledState, ReturnCode};
use crate::supervision;
use crate::worker::Worker;

impl VirtualSystemManagementService {
    /// Installs the backup service that backup operations use (the `vss-writer` crate's
    /// `VssWriter`, or an integrator's own). Without one, backup calls fail with
    /// [`Error::NoBackupService`]. Returns `false` if one was installed already (it stays).
    pub fn set_backup_service(&self, service: Arc<dyn VirtualSystemBackupService>) -> bool {
        self.inner.backups.set(service).is_ok()
    }

    /// Backs the VM up into `request.target`, whatever its steady state: online through its
    /// worker when it runs, straight from its disks when it is Off or Saved. Returns 4096 and the
    /// job; 32774 while another operation owns the VM; 32775 in a transitional or degraded
    /// state. The set's manifest ([`describe_backup`](Self::describe_backup)) reports what the
    /// session did.
    pub fn backup_system(
        &self,
        id: VmId,
        request: BackupRequest,
    ) -> crate::Result<(ReturnCode, Option<JobId>)> {
        backup_service(&self.inner)?;
        if request.target.exists() {
            return Err(BackupError::InvalidParameter(format!(
                "{} exists already: a backup set needs a new folder",
                request.target.display()
            ))
            .into());
        }
        let mut catalog = self.inner.lock_catalog();
        let record = catalog.vms.get_mut(&id).ok_or(Error::VmNotFound(id))?;
        let worker = match record.state {
            EnabledState::Running | EnabledState::Paused => match record.worker.clone() {
                Some(worker) => Some(worker),
                None => return Ok((ReturnCode::InvalidState, None)),
            },
            _ => None,
        };
        Ok(begin(&self.inner, record, request, worker))
    }

    /// What a backup set holds, from its manifest.
    pub fn describe_backup(&self, set: &Path) -> crate::Result<BackupSetInfo> {
        Ok(backup_service(&self.inner)?.describe(set)?)
    }

    /// Checks a backup set and the sets it builds on, reading every extent.
    pub fn verify_backup(&self, set: &Path) -> crate::Result<BackupSetInfo> {
        Ok(backup_service(&self.inner)?.verify(set, &mut NoProgress)?)
    }

    /// Restores a backup set as a new VM (Off) or over the backed-up VM, which must be Off.
    /// Returns the VM's id.
    pub fn restore_backup(&self, set: &Path, target: RestoreTarget) -> crate::Result<VmId> {
        let service = backup_service(&self.inner)?;
        let vms_dir = self.inner.store.vms_dir();
        match target {
            RestoreTarget::NewVm { .. } => {
                let id = service.restore(set, &vms_dir, &target, &mut NoProgress)?;
                self.adopt_restored(id)?;
                Ok(id)
            }
            RestoreTarget::ReplaceVm => {
                let vm = service.describe(set)?.vm;
                self.claim_off(vm)?;
                let restored =
                    self.inner.store.guard(vm).and_then(|()| {
                        Ok(service.restore(set, &vms_dir, &target, &mut NoProgress)?)
                    });
                let reloaded = self.inner.store.read_config(vm);
                let mut catalog = self.inner.lock_catalog();
                if let Some(record) = catalog.vms.get_mut(&vm) {
                    if let Ok(config) = reloaded
                        && record.config.as_ref() != Some(&config)
                    {
                        record.config = Some(config);
                        self.inner.events.publish(vm, EventKind::Modified);
                    }
                    supervision::release(&self.inner, record);
                }
                restored
            }
        }
    }

    /// Adds a VM a restore created to the catalog.
    fn adopt_restored(&self, id: VmId) -> crate::Result<()> {
        let config = self.inner.store.read_config(id)?;
        let mut catalog = self.inner.lock_catalog();
        catalog
            .vms
            .insert(id, VmRecord::new(id, Some(config), false));
        self.inner.events.publish(id, EventKind::Defined);
        Ok(())
    }

    /// Claims VM `id` for a restore over it: it must exist, be Off and not be busy.
    fn claim_off(&self, id: VmId) -> crate::Result<()> {
        let mut catalog = self.inner.lock_catalog();
        let record = catalog.vms.get_mut(&id).ok_or(Error::VmNotFound(id))?;
        if record.state != EnabledState::Off || record.is_degraded() {
            return Err(Error::NotStopped {
                id,
                state: record.state,
            });
        }
        if !record.owner.claim() {
            return Err(Error::Busy(id));
        }
        Ok(())
    }
}

/// The installed backup service.
fn backup_service(inner: &Inner) -> crate::Result<Arc<dyn VirtualSystemBackupService>> {
    inner.backups.get().cloned().ok_or(Error::NoBackupService)
}

/// Claims the VM and runs the session as a job on its own thread (catalog locked).
fn begin(
    inner: &Arc<Inner>,
    record: &mut VmRecord,
    request: BackupRequest,
    worker: Option<Arc<dyn Worker>>,
) -> (ReturnCode, Option<JobId>) {
    if record.owner.is_claimed() {
        return (ReturnCode::SystemInUse, None);
    }
    if record.is_degraded() || record.state.is_transitional() {
        return (ReturnCode::InvalidState, None);
    }
    let Some(config) = record.config.clone() else {
        return (ReturnCode::InvalidState, None);
    };
    if !record.owner.claim() {
        return (ReturnCode::SystemInUse, None);
    }
    let job = inner.jobs.create(JobKind::BackupSystem, record.id);
    let vm = record.id;
    let thread_inner = Arc::clone(inner);
    let spawned = thread::Builder::new()
        .name(format!("vmms-backup-{}", &vm.to_string()[..8]))
        .spawn(move || {
            let result = execute(&thread_inner, vm, job, &config, &request, worker);
            finish(&thread_inner, vm, job, result);
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

/// The session, with no lock held.
fn execute(
    inner: &Inner,
    vm: VmId,
    job: JobId,
    config: &crate::VmConfig,
    request: &BackupRequest,
    worker: Option<Arc<dyn Worker>>,
) -> Result<BackupReport, (ReturnCode, String)> {
    let failed = |error: Error| (crate::return_code(&error), error_chain(&error));
    // In a cluster only the VM's owner may change its files; a backup switches its disks.
    inner.store.guard(vm).map_err(failed)?;
    let service = backup_service(inner).map_err(failed)?;
    let mut progress = JobProgress::new(&inner.jobs, job);
    service
        .backup(
            &inner.store.vm_dir(vm),
            config,
            worker.as_deref(),
            request,
            &mut progress,
        )
        .map_err(|error| (backup_code(&error), error_chain(&error)))
}

/// Ends the job (with a warning when the set is not what was asked), announces the set, and
/// releases the VM.
fn finish(
    inner: &Arc<Inner>,
    vm: VmId,
    job: JobId,
    result: Result<BackupReport, (ReturnCode, String)>,
) {
    let mut catalog = inner.lock_catalog();
    let Some(record) = catalog.vms.get_mut(&vm) else {
        return;
    };
    let events = &inner.events;
    let outcome = match &result {
        Ok(report) => {
            events.publish(
                vm,
                EventKind::BackupCompleted {
                    set: report.set.clone(),
                    kind: report.kind,
                    consistency: report.consistency,
                },
            );
            let warnings: Vec<String> = [&report.full_reason, &report.consistency_reason]
                .into_iter()
                .flatten()
                .cloned()
                .collect();
            if warnings.is_empty() {
                JobOutcome::Completed
            } else {
                JobOutcome::CompletedWithWarnings(warnings.join("; "))
            }
        }
        Err((code, description)) => JobOutcome::Failed(code.code(), description.clone()),
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
}

/// Undoes a backup session a crash interrupted (start-up, after the re-attach). Returns whether
/// there was one.
pub(crate) fn recover_interrupted(
    inner: &Inner,
    vm: VmId,
    worker: Option<&dyn Worker>,
) -> Result<bool, BackupError> {
    let Some(service) = inner.backups.get() else {
        return Ok(false);
    };
    service.recover(&inner.store.vm_dir(vm), worker)
}
