//! The service object: Hyper-V's `Msvm_VirtualSystemManagementService` and the VMMS behind it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread;
use std::time::Duration;

use crate::catalog::{Catalog, ComputerSystem, VmRecord};
use crate::checkpoint::VirtualSystemSnapshotService;
use crate::cluster::ClusterCoordinator;
use crate::config::{CONFIG_VERSION, VmConfig, VmId};
use crate::error::{Error, Result};
use crate::event::{Event, EventBus, EventKind};
use crate::fault;
use crate::job::{Job, JobId, JobKind, JobTable};
use crate::operation;
use crate::state::{EnabledState, RequestedState, ReturnCode};
use crate::store::Store;
use crate::supervision::{self, WorkerMessage};
use crate::worker::WorkerLauncher;

pub use crate::supervision::{MAX_RECOVERY_RESTARTS, RECOVERY_WINDOW, StartupReport};

/// The virtual machine management service: catalog, state machine, jobs and events.
///
/// Cheap to clone (all clones share one service); every method may be called from any thread.
/// One operation runs per VM at a time — a request on a VM that is busy gets
/// [`ReturnCode::SystemInUse`] (32774) rather than being queued or overriding the first, so a
/// client always knows which of its requests took effect — while operations on different VMs run
/// in parallel, each on its own thread.
///
/// Dropping the last clone stops listening to workers but does not stop them: running VMs keep
/// running and a new service finds them with [`recover_on_start`](Self::recover_on_start).
#[derive(Debug, Clone)]
pub struct VirtualSystemManagementService {
    pub(crate) inner: Arc<Inner>,
}

/// State shared by the service handle, operation threads and the worker-event thread.
///
/// Lock order: `catalog`, then the job table's lock, then the event bus's lock. No lock is held
/// across a call into a [`Worker`](crate::Worker) or the [`WorkerLauncher`], nor across store
/// I/O.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) store: Store,
    pub(crate) launcher: Arc<dyn WorkerLauncher>,
    pub(crate) catalog: Mutex<Catalog>,
    pub(crate) jobs: JobTable,
    pub(crate) events: EventBus,
    pub(crate) worker_events: Sender<WorkerMessage>,
    /// Checkpoint operations' files; set once by the integrator.
    pub(crate) snapshots: OnceLock<Arc<dyn VirtualSystemSnapshotService>>,
    pub(crate) backups: OnceLock<Arc<dyn crate::backup::VirtualSystemBackupService>>,
    /// Set by the first `recover_on_start`; later calls do nothing.
    recovered: AtomicBool,
    /// The threads state-change operations run on, and the work beside them (a start's
    /// durable "was running" marker while its worker launches).
    pub(crate) operation_threads: crate::operation_threads::OperationThreads,
}

impl Inner {
    /// Locks the catalog. A panic on another thread must not make every VM unmanageable, and
    /// each record is left consistent between statements, so a poisoned lock is taken over.
    pub(crate) fn lock_catalog(&self) -> MutexGuard<'_, Catalog> {
        self.catalog.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Workers keep clones of the sender, so the event thread would never see the channel
        // close; tell it explicitly. It may already be gone, which is fine.
        let _ = self.worker_events.send(WorkerMessage::Shutdown);
    }
}

impl VirtualSystemManagementService {
    /// Opens the store at `root` (creating it if needed) and loads every VM in it. VMs come up
    /// Off, or Saved where a saved state exists; call [`recover_on_start`](Self::recover_on_start)
    /// next to find running workers and apply automatic start actions.
    pub fn open(root: impl Into<PathBuf>, launcher: Arc<dyn WorkerLauncher>) -> Result<Self> {
        Self::open_in(Store::open(root)?, launcher)
    }

    /// [`open`](Self::open) for a node of a cluster sharing the store: every write about a VM
    /// is first allowed by `coordinator` (see [`ClusterCoordinator`]).
    pub fn open_clustered(
        root: impl Into<PathBuf>,
        launcher: Arc<dyn WorkerLauncher>,
        coordinator: Arc<dyn ClusterCoordinator>,
    ) -> Result<Self> {
        Self::open_in(Store::open_with(root, Some(coordinator))?, launcher)
    }

    fn open_in(store: Store, launcher: Arc<dyn WorkerLauncher>) -> Result<Self> {
        let catalog = Catalog::load(&store)?;
        let (worker_events, receiver) = mpsc::channel();
        let inner = Arc::new(Inner {
            store,
            launcher,
            catalog: Mutex::new(catalog),
            jobs: JobTable::default(),
            events: EventBus::default(),
            worker_events,
            snapshots: OnceLock::new(),
            backups: OnceLock::new(),
            recovered: AtomicBool::new(false),
            operation_threads: crate::operation_threads::OperationThreads::default(),
        });
        let weak = Arc::downgrade(&inner);
        thread::Builder::new()
            .name("vmms-worker-events".into())
            .spawn(move || supervision::dispatch(weak, receiver))
            .map_err(Error::Thread)?;
        Ok(VirtualSystemManagementService { inner })
    }

    /// The store this service owns (path helpers for the other crates).
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Re-attaches workers that outlived the previous service, shows VMs with saved state as
    /// Saved, and applies each VM's automatic start action. Call once, after [`open`](Self::open);
    /// later calls return an empty report (a VM turned off since must not be auto-started again).
    pub fn recover_on_start(&self) -> StartupReport {
        if self.inner.recovered.swap(true, Ordering::SeqCst) {
            return StartupReport::default();
        }
        supervision::recover_on_start(&self.inner)
    }

    /// `DefineSystem`: validates and persists a new VM (Off) and returns its id.
    pub fn define_system(&self, config: VmConfig) -> Result<VmId> {
        config.validate_definition()?;
        let id = config.id;
        if self.inner.lock_catalog().vms.contains_key(&id) {
            return Err(Error::VmExists(id));
        }
        self.inner.store.create_vm(&config)?;
        let mut catalog = self.inner.lock_catalog();
        catalog
            .vms
            .insert(id, VmRecord::new(id, Some(config), false));
        self.inner.events.publish(id, EventKind::Defined);
        Ok(id)
    }

    /// `DestroySystem`: removes an Off or Saved VM and its whole folder (saved state, disks,
    /// checkpoints). Degraded VMs may be destroyed too.
    pub fn destroy_system(&self, id: VmId) -> Result<()> {
        {
            let mut catalog = self.inner.lock_catalog();
            let record = catalog.vms.get_mut(&id).ok_or(Error::VmNotFound(id))?;
            if record.owner.is_claimed() {
                return Err(Error::Busy(id));
            }
            if !matches!(record.state, EnabledState::Off | EnabledState::Saved) {
                return Err(Error::NotStopped {
                    id,
                    state: record.state,
                });
            }
            let _claimed = record.owner.claim();
        }
        fault::point("remove.before-store");
        let removed = self.inner.store.remove_vm(id);
        let mut catalog = self.inner.lock_catalog();
        match removed {
            Ok(()) => {
                catalog.vms.remove(&id);
                self.inner.events.publish(id, EventKind::Destroyed);
                Ok(())
            }
            Err(error) => {
                if let Some(record) = catalog.vms.get_mut(&id) {
                    supervision::release(&self.inner, record);
                }
                Err(error)
            }
        }
    }

    /// `ModifySystemSettings`: replaces the configuration of the VM `config.id` names.
    ///
    /// `created` and `version` are kept from the stored definition. While the VM is not Off only
    /// the name and the automatic actions may change: processors, memory, boot source and disks
    /// are part of a running or saved guest ([`Error::ChangeRequiresOff`]).
    pub fn modify_system_settings(&self, config: VmConfig) -> Result<()> {
        config.validate_definition()?;
        let id = config.id;
        let config = {
            let mut catalog = self.inner.lock_catalog();
            let record = catalog.vms.get_mut(&id).ok_or(Error::VmNotFound(id))?;
            if record.owner.is_claimed() {
                return Err(Error::Busy(id));
            }
            let old = record.config.as_ref().ok_or(Error::Degraded(id))?;
            let config = VmConfig {
                created: old.created,
                version: CONFIG_VERSION,
                ..config
            };
            if record.state != EnabledState::Off
                && let Some(setting) = setting_requiring_off(old, &config)
            {
                return Err(Error::ChangeRequiresOff {
                    id,
                    setting,
                    state: record.state,
                });
            }
            let _claimed = record.owner.claim();
            config
        };
        let written = self.inner.store.write_config(&config);
        let mut catalog = self.inner.lock_catalog();
        let Some(record) = catalog.vms.get_mut(&id) else {
            return Err(Error::VmNotFound(id));
        };
        if written.is_ok() {
            record.config = Some(config);
            self.inner.events.publish(id, EventKind::Modified);
        }
        supervision::release(&self.inner, record);
        written
    }

    /// `RequestStateChange`: checks the request against the state machine at once and, if it is
    /// valid, starts a job for it.
    ///
    /// Returns [`ReturnCode::JobStarted`] (4096) and the job; or a refusal with no job and
    /// nothing changed: [`ReturnCode::InvalidState`] (32775) for a request the current state
    /// does not allow (a degraded VM allows only turn-off), [`ReturnCode::SystemInUse`] (32774)
    /// while another operation owns the VM, [`ReturnCode::InvalidParameter`] for
    /// `NotApplicable`. Only an unknown VM is an `Err`.
    pub fn request_state_change(
        &self,
        id: VmId,
        requested: RequestedState,
    ) -> Result<(ReturnCode, Option<JobId>)> {
        let mut catalog = self.inner.lock_catalog();
        let record = catalog.vms.get_mut(&id).ok_or(Error::VmNotFound(id))?;
        let kind = JobKind::RequestStateChange { requested };
        Ok(operation::begin(&self.inner, record, requested, kind))
    }

    /// `Msvm_ShutdownComponent.InitiateShutdown`: asks the guest of a running VM to shut itself
    /// down and waits up to `timeout` for it to power off; turns it off if the guest cannot be
    /// asked (no shutdown integration, paused) or does not comply in time — then the job ends
    /// `CompletedWithWarnings` and says so.
    ///
    /// The shutdown is an operation like any other: it owns the VM until the guest is off, so a
    /// save or another stop asked meanwhile gets [`ReturnCode::SystemInUse`], and the turn-off
    /// acts only on the worker whose guest it asked. Returns 4096 and the job, or 32775 for a VM
    /// that is not running or paused.
    pub fn initiate_shutdown(
        &self,
        id: VmId,
        timeout: Duration,
    ) -> Result<(ReturnCode, Option<JobId>)> {
        let mut catalog = self.inner.lock_catalog();
        let record = catalog.vms.get_mut(&id).ok_or(Error::VmNotFound(id))?;
        Ok(operation::begin_shutdown(&self.inner, record, timeout))
    }

    /// One VM as clients see it.
    pub fn get_vm(&self, id: VmId) -> Result<ComputerSystem> {
        let catalog = self.inner.lock_catalog();
        catalog
            .vms
            .get(&id)
            .map(VmRecord::snapshot)
            .ok_or(Error::VmNotFound(id))
    }

    /// Every VM, ordered by name, then id.
    pub fn list_vms(&self) -> Vec<ComputerSystem> {
        let mut vms: Vec<ComputerSystem> = self
            .inner
            .lock_catalog()
            .vms
            .values()
            .map(VmRecord::snapshot)
            .collect();
        vms.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        vms
    }

    /// Every job still kept (running ones and those that ended within
    /// [`JOB_RETENTION`](crate::JOB_RETENTION)), oldest first.
    pub fn jobs(&self) -> Vec<Job> {
        self.inner.jobs.list()
    }

    /// One job.
    pub fn job(&self, id: JobId) -> Result<Job> {
        self.inner.jobs.get(id).ok_or(Error::JobNotFound(id))
    }

    /// Blocks until the job ends or `timeout` passes. When it returns the job, the VM's state
    /// already reflects the job's outcome.
    pub fn wait_for_job(&self, id: JobId, timeout: Duration) -> Result<Job> {
        self.inner.jobs.wait(id, timeout)
    }

    /// Every event from now on, in order. Drop the receiver to unsubscribe.
    pub fn subscribe(&self) -> Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Re-reads a VM that another node of a cluster may have defined, changed, saved or
    /// removed in the shared store: loaded if new, its configuration and Off/Saved state read
    /// again if it is Off or Saved here and no operation holds it, forgotten if its folder is
    /// gone. A VM this service runs is left alone. Returns whether the VM is known afterwards.
    pub fn refresh_vm(&self, id: VmId) -> bool {
        let store = &self.inner.store;
        let present = store.vm_dir(id).is_dir();
        let config = present.then(|| store.read_config(id));
        let saved = store.has_saved_state(id);
        let mut catalog = self.inner.lock_catalog();
        let idle = |record: &VmRecord| {
            record.worker.is_none()
                && !record.owner.is_claimed()
                && matches!(record.state, EnabledState::Off | EnabledState::Saved)
        };
        match (catalog.vms.get_mut(&id), config) {
            (Some(record), None) if idle(record) => {
                catalog.vms.remove(&id);
                self.inner.events.publish(id, EventKind::Destroyed);
                false
            }
            (Some(record), Some(config)) if idle(record) => {
                if let Ok(config) = config {
                    record.config = Some(config);
                }
                let state = if saved {
                    EnabledState::Saved
                } else {
                    EnabledState::Off
                };
                record.set_state(state, &self.inner.events);
                true
            }
            (Some(_), _) => true,
            (None, Some(Ok(config))) => {
                catalog
                    .vms
                    .insert(id, VmRecord::new(id, Some(config), saved));
                self.inner.events.publish(id, EventKind::Defined);
                true
            }
            (None, _) => false,
        }
    }
}

/// The first setting that differs between `old` and `new` and needs the VM off to change.
fn setting_requiring_off(old: &VmConfig, new: &VmConfig) -> Option<&'static str> {
    if old.vcpus != new.vcpus {
        Some("vcpus")
    } else if old.memory_mib != new.memory_mib {
        Some("memory_mib")
    } else if old.boot != new.boot {
        Some("boot")
    } else if old.disks != new.disks {
        Some("disks")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AutomaticStartAction;

    #[test]
    fn name_and_automatic_actions_may_change_on_a_running_vm() {
        let old = VmConfig::new("a");
        let new = VmConfig {
            name: "b".into(),
            automatic_start_action: AutomaticStartAction::AlwaysStart,
            ..old.clone()
        };

        assert_eq!(setting_requiring_off(&old, &new), None);
    }

    #[test]
    fn memory_change_needs_the_vm_off() {
        let old = VmConfig::new("a");
        let new = VmConfig {
            memory_mib: old.memory_mib * 2,
            ..old.clone()
        };

        assert_eq!(setting_requiring_off(&old, &new), Some("memory_mib"));
    }
}
