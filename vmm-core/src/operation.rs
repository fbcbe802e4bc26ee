//! Carrying out one accepted state change: the job thread behind `RequestStateChange`.
//!
//! [`begin`] runs with the catalog locked: it consults the transition table, marks the VM busy,
//! shows the transitional state and spawns a thread. The thread makes the slow calls (launcher,
//! worker, store) with no lock held, then [`finish`] takes the lock again to settle the VM in its
//! target state (or back where it came from), end the job and deal with any worker stop that
//! was reported meanwhile.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread;

use crate::catalog::VmRecord;
use crate::config::{VmConfig, VmId};
use crate::error::{Error, error_chain};
use crate::event::EventKind;
use crate::job::{JobId, JobKind};
use crate::service::Inner;
use crate::state::{
    EnabledState, HealthState, RequestedState, ReturnCode, Transition, TransitionAction, transition,
};
use crate::supervision::{self, sink};
use crate::worker::{EventSink, LaunchMode, StopReason, Worker, WorkerError};

/// The slow part of an operation, prepared under the lock and run without it.
enum Step {
    Launch {
        config: Box<VmConfig>,
        mode: LaunchMode,
        events: EventSink,
    },
    Pause(Arc<dyn Worker>),
    Resume(Arc<dyn Worker>),
    Save(Arc<dyn Worker>),
    Reset(Arc<dyn Worker>),
    TurnOff(Arc<dyn Worker>),
    DiscardSavedState,
}

/// How a step succeeded, i.e. what became of the worker.
enum Done {
    /// A new worker runs the guest.
    Launched(Box<dyn Worker>),
    /// The same worker carries on.
    WorkerKept,
    /// The worker exited as asked (save, turn-off).
    WorkerFinished,
    /// No worker was involved.
    NoWorker,
}

/// What became of the worker when a step failed.
enum Fate {
    /// Still attached and presumably fine.
    Kept,
    /// It disappeared: handled as a lost worker once the job has ended.
    Lost,
    /// It exited as asked, but the step failed after that (e.g. saved state not committed).
    Finished,
}

/// How a step failed.
struct Failure {
    code: ReturnCode,
    description: String,
    fate: Fate,
    /// Where the VM settles instead of the state it came from, with critical health.
    critical: Option<EnabledState>,
}

impl Failure {
    fn new(code: ReturnCode, description: String) -> Self {
        Failure {
            code,
            description,
            fate: Fate::Kept,
            critical: None,
        }
    }

    fn from_worker(context: &str, error: &WorkerError) -> Self {
        let code = match error {
            WorkerError::Gone => ReturnCode::SystemNotAvailable,
            WorkerError::Timeout(_) => ReturnCode::Timeout,
            WorkerError::Refused { .. } | WorkerError::Failed(_) => ReturnCode::Failed,
        };
        let mut failure = Failure::new(code, format!("{context}: {}", error_chain(error)));
        if matches!(error, WorkerError::Gone) {
            failure.fate = Fate::Lost;
        }
        failure
    }

    fn from_store(context: &str, error: &Error) -> Self {
        let code = match error {
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                ReturnCode::FileNotFound
            }
            _ => ReturnCode::Failed,
        };
        Failure::new(code, format!("{context}: {}", error_chain(error)))
    }
}

/// An operation handed to its thread.
struct Operation {
    vm: VmId,
    job: JobId,
    transition: Transition,
    previous: EnabledState,
    step: Step,
}

/// Starts `requested` on `record` if the state machine allows it (catalog locked).
pub(crate) fn begin(
    inner: &Arc<Inner>,
    record: &mut VmRecord,
    requested: RequestedState,
    kind: JobKind,
) -> (ReturnCode, Option<JobId>) {
    if record.busy {
        return (ReturnCode::SystemInUse, None);
    }
    if record.is_degraded() && requested != RequestedState::TurnOff {
        return (ReturnCode::InvalidState, None);
    }
    let transition = match transition(record.state, requested) {
        Ok(transition) => transition,
        Err(code) => return (code, None),
    };
    let Some(step) = prepare(inner, record, transition.action) else {
        // The table allowed it, but the record lacks what the step needs (no worker attached to
        // a VM shown running): refuse rather than pretend.
        return (ReturnCode::InvalidState, None);
    };
    let previous = record.state;
    let job = inner.jobs.create(kind, record.id);
    record.busy = true;
    record.held = None;
    record.requested = requested;
    record.set_state(transition.pending, &inner.events);

    let op = Operation {
        vm: record.id,
        job,
        transition,
        previous,
        step,
    };
    let thread_inner = Arc::clone(inner);
    let spawned = thread::Builder::new()
        .name(format!("vmms-op-{}", short_id(record.id)))
        .spawn(move || run(thread_inner, op));
    match spawned {
        Ok(_) => (ReturnCode::JobStarted, Some(job)),
        Err(error) => {
            record.busy = false;
            record.requested = RequestedState::NotApplicable;
            record.set_state(previous, &inner.events);
            let text = format!("cannot start operation thread: {error}");
            inner
                .jobs
                .finish(job, Some((ReturnCode::Failed.code(), text)), |_| {});
            (ReturnCode::Failed, None)
        }
    }
}

/// Gathers what the step needs from the record (catalog locked). Launches get a fresh event
/// generation so that events from any earlier worker are recognised as stale.
fn prepare(inner: &Inner, record: &mut VmRecord, action: TransitionAction) -> Option<Step> {
    let worker = record.worker.clone();
    let step = match action {
        TransitionAction::Boot | TransitionAction::RestoreSavedState => {
            let config = Box::new(record.config.clone()?);
            let mode = if action == TransitionAction::Boot {
                LaunchMode::Boot
            } else {
                LaunchMode::RestoreSaved {
                    state_dir: inner.store.state_dir(record.id),
                }
            };
            record.generation += 1;
            Step::Launch {
                config,
                mode,
                events: sink(inner, record.id, record.generation),
            }
        }
        TransitionAction::Pause => Step::Pause(worker?),
        TransitionAction::Resume => Step::Resume(worker?),
        TransitionAction::Save => Step::Save(worker?),
        TransitionAction::Reset => Step::Reset(worker?),
        TransitionAction::TurnOff => Step::TurnOff(worker?),
        TransitionAction::DiscardSavedState => Step::DiscardSavedState,
    };
    Some(step)
}

fn run(inner: Arc<Inner>, op: Operation) {
    let result = execute(&inner, op.vm, &op.step);
    finish(&inner, op, result);
}

/// The slow calls, with no lock held.
fn execute(inner: &Inner, vm: VmId, step: &Step) -> Result<Done, Failure> {
    let store = &inner.store;
    match step {
        Step::Launch {
            config,
            mode,
            events,
        } => {
            let worker = inner
                .launcher
                .launch(config, mode.clone(), events.clone())
                .map_err(|e| Failure::from_worker("cannot start worker", &e))?;
            if let LaunchMode::RestoreSaved { .. } = mode {
                // A saved state left behind after a restore would be restored again after a
                // host restart, on top of disks that have moved on: consume it or undo.
                if let Err(error) = store.discard_saved_state(vm) {
                    let _ = worker.turn_off();
                    return Err(Failure::from_store("cannot consume saved state", &error));
                }
            }
            mark_running(inner, vm, true);
            Ok(Done::Launched(worker))
        }
        Step::Pause(worker) => call(worker.pause(), "pause failed"),
        Step::Resume(worker) => call(worker.resume(), "resume failed"),
        Step::Reset(worker) => call(worker.reset(), "reset failed"),
        Step::Save(worker) => save(inner, vm, worker.as_ref()),
        Step::TurnOff(worker) => match worker.turn_off() {
            Ok(()) | Err(WorkerError::Gone) => {
                mark_running(inner, vm, false);
                Ok(Done::WorkerFinished)
            }
            Err(error) => Err(Failure::from_worker("turn off failed", &error)),
        },
        Step::DiscardSavedState => store
            .discard_saved_state(vm)
            .map(|()| Done::NoWorker)
            .map_err(|e| Failure::from_store("cannot delete saved state", &e)),
    }
}

fn call(result: Result<(), WorkerError>, context: &str) -> Result<Done, Failure> {
    result
        .map(|()| Done::WorkerKept)
        .map_err(|e| Failure::from_worker(context, &e))
}

/// Saves into a staging folder and commits it as the VM's saved state.
fn save(inner: &Inner, vm: VmId, worker: &dyn Worker) -> Result<Done, Failure> {
    let store = &inner.store;
    let staging: PathBuf = store
        .begin_saved_state(vm)
        .map_err(|e| Failure::from_store("cannot prepare saved state folder", &e))?;
    if let Err(error) = worker.save(&staging) {
        store.abandon_saved_state(&staging);
        return Err(Failure::from_worker("save failed", &error));
    }
    if let Err(error) = store.commit_saved_state(vm, &staging) {
        // The worker has exited with the guest's state in the staging folder, which is not a
        // valid saved state: the guest is lost.
        store.abandon_saved_state(&staging);
        let mut failure = Failure::from_store("cannot commit saved state", &error);
        failure.fate = Fate::Finished;
        failure.critical = Some(EnabledState::Off);
        return Err(failure);
    }
    mark_running(inner, vm, false);
    Ok(Done::WorkerFinished)
}

/// Keeps the "was running" marker in step; a failure only weakens `StartIfPreviouslyRunning`
/// after a host restart, so it does not fail the operation.
fn mark_running(inner: &Inner, vm: VmId, running: bool) {
    let _ = inner.store.set_running_marker(vm, running);
}

/// Settles the VM after its step and ends the job (catalog locked inside).
fn finish(inner: &Arc<Inner>, op: Operation, result: Result<Done, Failure>) {
    let mut catalog = inner.lock_catalog();
    let Some(record) = catalog.vms.get_mut(&op.vm) else {
        // Busy VMs cannot be destroyed, so this does not happen; end the job honestly anyway.
        let text = "virtual machine vanished during the operation".to_owned();
        inner
            .jobs
            .finish(op.job, Some((ReturnCode::Failed.code(), text)), |_| {});
        return;
    };
    let events = &inner.events;
    let error = match result {
        Ok(done) => {
            match done {
                Done::Launched(worker) => {
                    record.worker = Some(Arc::from(worker));
                    record.status_description = None;
                    record.set_health(HealthState::Ok, events);
                }
                Done::WorkerFinished => detach_worker(record),
                Done::WorkerKept | Done::NoWorker => {}
            }
            record.set_state(op.transition.target, events);
            None
        }
        Err(failure) => {
            match failure.fate {
                Fate::Kept => {}
                Fate::Lost => {
                    record.held.get_or_insert(StopReason::WorkerExited {
                        code: None,
                        signal: None,
                    });
                }
                Fate::Finished => detach_worker(record),
            }
            match failure.critical {
                Some(state) => {
                    record.status_description = Some(failure.description.clone());
                    record.set_health(HealthState::CriticalFailure, events);
                    record.set_state(state, events);
                }
                None => record.set_state(op.previous, events),
            }
            Some((failure.code.code(), failure.description))
        }
    };
    record.requested = RequestedState::NotApplicable;
    record.busy = false;
    inner.jobs.finish(op.job, error, |job| {
        events.publish(
            op.vm,
            EventKind::JobCompleted {
                job: job.id,
                state: job.state,
            },
        );
    });
    supervision::after_operation(inner, record);
}

/// Forgets the worker; its late events become stale.
fn detach_worker(record: &mut VmRecord) {
    record.worker = None;
    record.generation += 1;
    record.held = None;
}

/// First block of a GUID, for thread names (Linux limits them to 15 bytes).
fn short_id(id: VmId) -> String {
    id.to_string().chars().take(8).collect()
}
