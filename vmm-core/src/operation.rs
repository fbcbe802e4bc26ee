//! Carrying out one accepted state change: the job thread behind `RequestStateChange`.
//!
//! [`begin`] runs with the catalog locked: it consults the transition table, claims the VM,
//! shows the transitional state and spawns a thread. The thread makes the slow calls (launcher,
//! worker, store) with no lock held, then [`finish`] takes the lock again to settle the VM in its
//! target state (or back where it came from), end the job and deal with any worker stop that
//! was reported meanwhile.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::catalog::VmRecord;
use crate::config::{VmConfig, VmId};
use crate::error::{Error, error_chain};
use crate::event::EventKind;
use crate::fault;
use crate::job::{JobId, JobKind, JobOutcome};
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
    /// Ask the guest to shut down (when `ask`), turn it off if that fails.
    Shutdown {
        worker: Arc<dyn Worker>,
        timeout: Duration,
        ask: bool,
    },
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
    /// The worker was turned off instead of doing what was asked (a shutdown the guest could
    /// not do); the text says why.
    WorkerTurnedOff(String),
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
            WorkerError::InvalidState { .. } => ReturnCode::InvalidState,
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
    if record.owner.is_claimed() {
        return (ReturnCode::SystemInUse, None);
    }
    if record.is_degraded() && requested != RequestedState::TurnOff {
        return (ReturnCode::InvalidState, None);
    }
    match transition(record.state, requested) {
        Ok(transition) => begin_transition(inner, record, transition, requested, kind, None),
        Err(code) => (code, None),
    }
}

/// Starts a graceful shutdown (`InitiateShutdown`) of a running or paused VM (catalog locked):
/// the guest is asked (a paused one cannot be), and turned off if that fails within `timeout`.
pub(crate) fn begin_shutdown(
    inner: &Arc<Inner>,
    record: &mut VmRecord,
    timeout: Duration,
) -> (ReturnCode, Option<JobId>) {
    if record.owner.is_claimed() || record.state.is_transitional() {
        return (ReturnCode::SystemInUse, None);
    }
    if record.is_degraded() || !matches!(record.state, EnabledState::Running | EnabledState::Paused)
    {
        return (ReturnCode::InvalidState, None);
    }
    let shutdown = Transition {
        pending: EnabledState::Stopping,
        target: EnabledState::Off,
        action: TransitionAction::Shutdown,
    };
    let ask = record.state == EnabledState::Running;
    let options = ShutdownOptions { timeout, ask };
    begin_transition(
        inner,
        record,
        shutdown,
        RequestedState::TurnOff,
        JobKind::Shutdown,
        Some(options),
    )
}

/// What a shutdown step needs besides the worker.
#[derive(Debug, Clone, Copy)]
struct ShutdownOptions {
    timeout: Duration,
    ask: bool,
}

/// Claims the VM, shows the pending state and runs `transition` on its own thread.
fn begin_transition(
    inner: &Arc<Inner>,
    record: &mut VmRecord,
    transition: Transition,
    requested: RequestedState,
    kind: JobKind,
    shutdown: Option<ShutdownOptions>,
) -> (ReturnCode, Option<JobId>) {
    if !record.owner.claim() {
        return (ReturnCode::SystemInUse, None);
    }
    let Some(step) = prepare(inner, record, transition.action, shutdown) else {
        // The table allowed it, but the record lacks what the step needs (no worker attached to
        // a VM shown running): refuse rather than pretend.
        supervision::release(inner, record);
        return (ReturnCode::InvalidState, None);
    };
    let previous = record.state;
    let job = inner.jobs.create(kind, record.id);
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
    let spawned = inner.operation_threads.run(move || run(thread_inner, op));
    match spawned {
        Ok(()) => (ReturnCode::JobStarted, Some(job)),
        Err(error) => {
            record.requested = RequestedState::NotApplicable;
            record.set_state(previous, &inner.events);
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

/// Gathers what the step needs from the record (catalog locked). Launches get a fresh event
/// generation so that events from any earlier worker are recognised as stale.
fn prepare(
    inner: &Inner,
    record: &mut VmRecord,
    action: TransitionAction,
    shutdown: Option<ShutdownOptions>,
) -> Option<Step> {
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
            let generation = record.owner.next_generation();
            Step::Launch {
                config,
                mode,
                events: sink(inner, record.id, generation),
            }
        }
        TransitionAction::Pause => Step::Pause(worker?),
        TransitionAction::Resume => Step::Resume(worker?),
        TransitionAction::Save => Step::Save(worker?),
        TransitionAction::Reset => Step::Reset(worker?),
        TransitionAction::TurnOff => Step::TurnOff(worker?),
        TransitionAction::Shutdown => {
            let ShutdownOptions { timeout, ask } = shutdown?;
            Step::Shutdown {
                worker: worker?,
                timeout,
                ask,
            }
        }
        TransitionAction::DiscardSavedState => Step::DiscardSavedState,
    };
    Some(step)
}

fn run(inner: Arc<Inner>, op: Operation) {
    let result = execute(&inner, op.vm, &op.step);
    finish(&inner, op, result);
}

/// The slow calls, with no lock held.
fn execute(inner: &Arc<Inner>, vm: VmId, step: &Step) -> Result<Done, Failure> {
    let store = &inner.store;
    match step {
        Step::Launch {
            config,
            mode,
            events,
        } => {
            fault::point("start.before-launch");
            // A backup whose worker died on its overlays: merge them back before a worker
            // opens the images, or the guest would start without its latest writes.
            crate::backup_ops::recover_interrupted(inner, vm, None).map_err(|e| {
                Failure::new(
                    ReturnCode::Failed,
                    format!("cannot undo an interrupted backup: {}", error_chain(&e)),
                )
            })?;
            let launched = launch_marked_running(inner, vm, |handed_off| {
                inner
                    .launcher
                    .launch_handing_off(config, mode.clone(), events.clone(), handed_off)
            });
            let worker = launched.map_err(|e| {
                let mut failure = Failure::from_worker("cannot start worker", &e);
                if matches!(mode, LaunchMode::RestoreSaved { .. }) && !store.has_saved_state(vm) {
                    // The worker consumed the saved state and then failed: its guest is gone.
                    failure.critical = Some(EnabledState::Off);
                }
                failure
            })?;
            fault::point("start.after-launch");
            if let LaunchMode::RestoreSaved { .. } = mode {
                // The worker consumed the saved state when its guest came up; a launcher that
                // does not leaves it to us. Either way it must not be restored twice.
                if let Err(error) = store.discard_saved_state(vm) {
                    let _ = worker.turn_off();
                    mark_running(inner, vm, false);
                    return Err(Failure::from_store("cannot consume saved state", &error));
                }
            }
            Ok(Done::Launched(worker))
        }
        Step::Pause(worker) => call(worker.pause(), "pause failed"),
        Step::Resume(worker) => call(worker.resume(), "resume failed"),
        Step::Reset(worker) => call(worker.reset(), "reset failed"),
        Step::Save(worker) => save(inner, vm, worker.as_ref()),
        Step::TurnOff(worker) => {
            turn_off(inner, vm, worker.as_ref()).map(|()| Done::WorkerFinished)
        }
        Step::Shutdown {
            worker,
            timeout,
            ask,
        } => shutdown(inner, vm, worker.as_ref(), *timeout, *ask),
        Step::DiscardSavedState => store
            .discard_saved_state(vm)
            .map(|()| Done::NoWorker)
            .map_err(|e| Failure::from_store("cannot delete saved state", &e)),
    }
}

fn turn_off(inner: &Inner, vm: VmId, worker: &dyn Worker) -> Result<(), Failure> {
    match worker.turn_off() {
        Ok(()) | Err(WorkerError::Gone) => {
            mark_running(inner, vm, false);
            Ok(())
        }
        Err(error) => Err(Failure::from_worker("turn off failed", &error)),
    }
}

/// Asks the guest to power itself off; turns it off when it cannot be asked or does not comply.
/// Either way the worker that is turned off is the one this operation was started on.
fn shutdown(
    inner: &Inner,
    vm: VmId,
    worker: &dyn Worker,
    timeout: Duration,
    ask: bool,
) -> Result<Done, Failure> {
    fault::point("shutdown.before-request");
    let asked = if ask {
        worker.shutdown(timeout)
    } else {
        Err(WorkerError::Refused {
            reason: "a paused guest cannot shut down".into(),
        })
    };
    fault::point("shutdown.after-request");
    turn_off(inner, vm, worker)?;
    Ok(match asked {
        Ok(()) => Done::WorkerFinished,
        Err(WorkerError::Timeout(waited)) => Done::WorkerTurnedOff(format!(
            "turned off: the guest did not shut down within {waited:?}"
        )),
        Err(error) => Done::WorkerTurnedOff(format!("turned off: {}", error_chain(&error))),
    })
}

fn call(result: Result<(), WorkerError>, context: &str) -> Result<Done, Failure> {
    result
        .map(|()| Done::WorkerKept)
        .map_err(|e| Failure::from_worker(context, &e))
}

/// Saves into the staging folder; the worker commits it as the VM's saved state.
///
/// The commit is the worker's, so what decides the outcome is whether `state/` exists afterwards:
/// a worker that committed and then died before it could reply has still saved the guest.
fn save(inner: &Inner, vm: VmId, worker: &dyn Worker) -> Result<Done, Failure> {
    let store = &inner.store;
    let staging: PathBuf = store
        .begin_saved_state(vm)
        .map_err(|e| Failure::from_store("cannot prepare saved state folder", &e))?;
    fault::point("save.before-worker");
    let saved = worker.save(&staging, &store.state_dir(vm));
    fault::point("save.after-worker");
    let committed = store.has_saved_state(vm);
    match saved {
        Ok(()) if committed => {}
        Ok(()) => {
            let mut failure = Failure::new(
                ReturnCode::Failed,
                "the worker reported a save but left no saved state".into(),
            );
            failure.fate = Fate::Finished;
            failure.critical = Some(EnabledState::Off);
            return Err(failure);
        }
        Err(_) if committed => {
            // Committed, then lost before replying: saved all the same. Make sure it is gone.
            let _ = worker.turn_off();
        }
        Err(error) => {
            let _ = store.remove_unfinished_save(vm);
            return Err(Failure::from_worker("save failed", &error));
        }
    }
    mark_running(inner, vm, false);
    Ok(Done::WorkerFinished)
}

/// Runs `launch` while the VM's "was running" marker is made durable beside it (a write and an
/// fsync that would otherwise come after the worker's start, on the path its user waits on);
/// returns once both are done. A launch that fails takes the marker away again.
///
/// The marker's write starts when `launch` calls the hand-off callback it is given (see
/// [`WorkerLauncher::launch_handing_off`](crate::WorkerLauncher::launch_handing_off)): from then
/// on the service only waits, while before it the launcher and the waking worker need the CPUs.
///
/// The marker only decides `StartIfPreviouslyRunning` when a service finds the VM without a
/// worker; a running worker is found again by its lock, marker or not. So whichever of the two a
/// crash interrupts, a restarted service is right: with the marker but no worker it starts the
/// VM only if its automatic start action asks for a VM that was meant to run, and otherwise
/// clears the marker; with a worker but no marker (killed while the marker's write was still
/// under way) it re-attaches the worker and writes the marker then.
fn launch_marked_running<T, E>(
    inner: &Arc<Inner>,
    vm: VmId,
    launch: impl FnOnce(&mut dyn FnMut()) -> Result<T, E>,
) -> Result<T, E> {
    let (done_tx, done) = std::sync::mpsc::channel();
    // Taken by the first call: the sender goes to the marker's thread, so that `done` ends
    // when that thread does.
    let mut done_tx = Some(done_tx);
    let mut marker = None;
    let mut start_marker = || {
        let Some(done_tx) = done_tx.take() else {
            return;
        };
        let marker_inner = Arc::clone(inner);
        marker = Some(inner.operation_threads.run(move || {
            mark_running(&marker_inner, vm, true);
            fault::point("start.after-marker");
            let _ = done_tx.send(());
        }));
    };
    let launched = launch(&mut start_marker);
    match marker {
        Some(Ok(())) => {
            // An error means the work ended before it was done (a panic): write it here.
            if done.recv().is_err() {
                mark_running(inner, vm, true);
            }
        }
        // No thread to spare, or the launch never handed off: the marker the slow way, after
        // the launch.
        Some(Err(_)) | None => {
            if launched.is_ok() {
                mark_running(inner, vm, true);
                fault::point("start.after-marker");
            }
        }
    }
    if launched.is_err() {
        mark_running(inner, vm, false);
    }
    launched
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
        // Claimed VMs cannot be destroyed, so this does not happen; end the job honestly anyway.
        let text = "virtual machine vanished during the operation".to_owned();
        inner.jobs.finish(
            op.job,
            JobOutcome::Failed(ReturnCode::Failed.code(), text),
            |_| {},
        );
        return;
    };
    let events = &inner.events;
    let outcome = match result {
        Ok(done) => {
            let mut outcome = JobOutcome::Completed;
            match done {
                Done::Launched(worker) => {
                    record.worker = Some(Arc::from(worker));
                    record.status_description = None;
                    record.set_health(HealthState::Ok, events);
                }
                Done::WorkerFinished => detach_worker(record),
                Done::WorkerTurnedOff(why) => {
                    detach_worker(record);
                    outcome = JobOutcome::CompletedWithWarnings(why);
                }
                Done::WorkerKept | Done::NoWorker => {}
            }
            record.set_state(op.transition.target, events);
            outcome
        }
        Err(failure) => {
            match failure.fate {
                Fate::Kept => {}
                Fate::Lost => record.owner.hold(StopReason::WorkerExited {
                    code: None,
                    signal: None,
                }),
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
            JobOutcome::Failed(failure.code.code(), failure.description)
        }
    };
    record.requested = RequestedState::NotApplicable;
    inner.jobs.finish(op.job, outcome, |job| {
        events.publish(
            op.vm,
            EventKind::JobCompleted {
                job: job.id,
                state: job.state,
            },
        );
    });
    supervision::release(inner, record);
}

/// Forgets the worker; its late events (and a stop held for it) become stale.
fn detach_worker(record: &mut VmRecord) {
    record.worker = None;
    record.owner.next_generation();
}
