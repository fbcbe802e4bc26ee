//! Reacting to workers: what they report on their own (guest power-off, guest reset, crash, lost
//! heartbeat), the recovery action, and re-attaching to live workers when the service starts.
//!
//! Worker events arrive on one channel and are handled by one thread. An event is acted on only
//! if it comes from the VM's current worker (its sink's generation matches) and no operation
//! owns the VM; during an operation it is held and handled when the operation ends, so that only
//! one party ever changes a VM at a time. Stopping a worker the guest or a crash finished
//! ("reaping": turning it off so that its process and runtime folder are gone) runs on its own
//! thread with the VM claimed, so nothing can start a second worker for the VM meanwhile.

use std::sync::mpsc::Receiver;
use std::sync::{Arc, Weak};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::catalog::VmRecord;
use crate::config::{AutomaticRecoveryAction, AutomaticStartAction, VmConfig, VmId};
use crate::error::error_chain;
use crate::event::EventKind;
use crate::job::{JobId, JobKind};
use crate::operation;
use crate::service::Inner;
use crate::state::{EnabledState, HealthState, RequestedState, ReturnCode};
use crate::worker::{
    EventSink, LaunchMode, StopReason, Worker, WorkerError, WorkerEvent, WorkerStatus,
};

/// At most this many recovery restarts of one VM within [`RECOVERY_WINDOW`]; a guest that keeps
/// crashing is then left off instead of restarted forever.
pub const MAX_RECOVERY_RESTARTS: usize = 3;
/// The window [`MAX_RECOVERY_RESTARTS`] counts in.
pub const RECOVERY_WINDOW: Duration = Duration::from_secs(10 * 60);

/// What a worker sink delivers to the service's event thread.
#[derive(Debug)]
pub(crate) enum WorkerMessage {
    /// An event from the worker of `vm` launched or re-attached with `generation`.
    Event {
        vm: VmId,
        generation: u64,
        event: WorkerEvent,
    },
    /// The service is gone: the event thread ends.
    Shutdown,
}

/// What [`recover_on_start`](crate::VirtualSystemManagementService::recover_on_start) did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartupReport {
    /// VMs whose live worker was found and re-attached.
    pub reattached: Vec<VmId>,
    /// VMs started by their automatic start action, with the start job.
    pub auto_started: Vec<(VmId, JobId)>,
    /// VMs for which something failed, with the reason (also in their status description).
    pub failed: Vec<(VmId, String)>,
}

/// A sink whose events reach the event thread tagged with `vm` and `generation`.
pub(crate) fn sink(inner: &Inner, vm: VmId, generation: u64) -> EventSink {
    let tx = inner.worker_events.clone();
    EventSink::new(vm, move |event| {
        tx.send(WorkerMessage::Event {
            vm,
            generation,
            event,
        })
        .is_ok()
    })
}

/// The event thread's loop; ends when the service is dropped.
pub(crate) fn dispatch(service: Weak<Inner>, messages: Receiver<WorkerMessage>) {
    while let Ok(WorkerMessage::Event {
        vm,
        generation,
        event,
    }) = messages.recv()
    {
        let Some(inner) = service.upgrade() else {
            break;
        };
        on_worker_event(&inner, vm, generation, event);
    }
}

fn on_worker_event(inner: &Arc<Inner>, vm: VmId, generation: u64, event: WorkerEvent) {
    let mut catalog = inner.lock_catalog();
    let Some(record) = catalog.vms.get_mut(&vm) else {
        return;
    };
    if !record.owner.is_current(generation) {
        return;
    }
    let events = &inner.events;
    match event {
        WorkerEvent::Stopped(reason) => stopped(inner, record, reason),
        WorkerEvent::StateChanged(status) => {
            // During an operation the operation decides the state.
            if record.owner.is_claimed() {
                return;
            }
            let state = match status {
                WorkerStatus::Running => EnabledState::Running,
                WorkerStatus::Paused => EnabledState::Paused,
                WorkerStatus::Saving => EnabledState::Saving,
                WorkerStatus::NotResponding | WorkerStatus::Exited => return,
            };
            record.set_state(state, events);
        }
        WorkerEvent::NotResponding { silent_for } => {
            record.status_description = Some(format!(
                "the worker has not answered for {} s",
                silent_for.as_secs()
            ));
            record.set_health(HealthState::MajorFailure, events);
            events.publish(
                record.id,
                EventKind::WorkerNotResponding {
                    silent_for_ms: u64::try_from(silent_for.as_millis()).unwrap_or(u64::MAX),
                },
            );
        }
        WorkerEvent::Responding => {
            if record.health == HealthState::MajorFailure {
                record.status_description = None;
                record.set_health(HealthState::Ok, events);
                events.publish(record.id, EventKind::WorkerResponding);
            }
        }
        WorkerEvent::Hung { silent_for } => {
            let action = record.config.as_ref().map(|c| c.automatic_recovery_action);
            if matches!(action, None | Some(AutomaticRecoveryAction::None)) {
                // Nothing may be done to the guest: it stays reported as not responding and
                // comes back by itself if the worker answers again.
                return;
            }
            stopped(inner, record, StopReason::HeartbeatLost { silent_for });
        }
    }
}

/// The current worker stopped: handled now, or when the operation that owns the VM ends.
fn stopped(inner: &Arc<Inner>, record: &mut VmRecord, reason: StopReason) {
    if record.owner.is_claimed() {
        record.owner.hold(reason);
    } else {
        handle_stop(inner, record, reason);
    }
}

/// Ends whatever owned the VM (an operation, a reap, a re-attach) and handles a stop that was
/// reported meanwhile, if the worker it concerns is still attached. Every claim ends here.
pub(crate) fn release(inner: &Arc<Inner>, record: &mut VmRecord) {
    if let Some(reason) = record.owner.release() {
        handle_stop(inner, record, reason);
    }
}

/// What to do once a finished worker has been reaped.
enum AfterReap {
    /// Nothing more (guest powered off).
    Nothing,
    /// The worker saved the guest and exited: Saved if the saved state is there.
    Saved,
    /// The worker ended while saving: Saved if the saved state is there, else lost for the
    /// reason given.
    SavedOrLost(StopReason),
    /// Boot a fresh worker and keep the VM Running (guest reset).
    Relaunch { config: VmConfig, events: EventSink },
    /// Apply the recovery action (worker lost).
    Recover,
}

/// The current worker stopped for `reason` (catalog locked, VM not claimed).
fn handle_stop(inner: &Arc<Inner>, record: &mut VmRecord, reason: StopReason) {
    let Some(old) = record.worker.take() else {
        return;
    };
    let generation = record.owner.next_generation();
    let events = &inner.events;
    let next = match (&reason, record.config.clone()) {
        (StopReason::GuestReset, Some(config)) => AfterReap::Relaunch {
            config,
            events: sink(inner, record.id, generation),
        },
        (StopReason::Saved, _) => AfterReap::Saved,
        // A worker that ended while saving (re-attached mid-save, its last words lost) may have
        // committed first: then the VM is Saved, not lost. The reap looks.
        (_, _) if record.state == EnabledState::Saving => AfterReap::SavedOrLost(reason.clone()),
        (StopReason::GuestPowerOff | StopReason::GuestReset, _) => {
            record.set_state(EnabledState::Off, events);
            AfterReap::Nothing
        }
        (failure, _) => {
            events.publish(
                record.id,
                EventKind::WorkerLost {
                    reason: failure.clone(),
                },
            );
            record.status_description = Some(failure.to_string());
            record.set_health(HealthState::CriticalFailure, events);
            record.set_state(EnabledState::Off, events);
            AfterReap::Recover
        }
    };
    // Not claimed (the caller's rule), so this succeeds: nothing can start a second worker for
    // the VM while the old one is being reaped.
    let _ = record.owner.claim();
    let thread_inner = Arc::clone(inner);
    let vm = record.id;
    let spawned = thread::Builder::new()
        .name("vmms-reap".into())
        .spawn(move || reap(thread_inner, vm, old, next));
    if spawned.is_err() {
        // The closure (and with it the old worker) is gone: the worker is detached, not stopped.
        let _ = record.owner.release();
        record.status_description = Some("cannot start a thread to stop the worker".into());
        record.set_health(HealthState::CriticalFailure, events);
        record.set_state(EnabledState::Off, events);
    }
}

fn reap(inner: Arc<Inner>, vm: VmId, old: Arc<dyn Worker>, next: AfterReap) {
    // The worker has finished or failed; make sure its process is gone before anything else
    // uses the VM's runtime folder. Errors mean it is already gone or unkillable: nothing more
    // can be done here either way.
    let _ = old.turn_off();
    drop(old);
    let mut saved = false;
    let relaunched = match &next {
        AfterReap::Relaunch { config, events } => Some(inner.launcher.launch(
            config,
            LaunchMode::Boot,
            events.clone(),
        )),
        AfterReap::Saved | AfterReap::SavedOrLost(_) => {
            saved = inner.store.has_saved_state(vm);
            let _ = inner.store.set_running_marker(vm, false);
            None
        }
        AfterReap::Nothing | AfterReap::Recover => {
            let _ = inner.store.set_running_marker(vm, false);
            None
        }
    };
    let mut catalog = inner.lock_catalog();
    let Some(record) = catalog.vms.get_mut(&vm) else {
        return;
    };
    let events = &inner.events;
    match (next, relaunched) {
        (AfterReap::Relaunch { .. }, Some(Ok(worker))) => {
            record.worker = Some(Arc::from(worker));
            record.set_state(EnabledState::Running, events);
        }
        (AfterReap::Relaunch { .. }, Some(Err(error))) => relaunch_failed(&inner, record, &error),
        (AfterReap::Saved | AfterReap::SavedOrLost(_), _) if saved => {
            record.set_state(EnabledState::Saved, events);
        }
        (AfterReap::SavedOrLost(reason), _) => {
            events.publish(
                record.id,
                EventKind::WorkerLost {
                    reason: reason.clone(),
                },
            );
            record.status_description = Some(reason.to_string());
            record.set_health(HealthState::CriticalFailure, events);
            record.set_state(EnabledState::Off, events);
            let _ = record.owner.release();
            recover(&inner, record);
            return;
        }
        (AfterReap::Saved, _) => {
            record.status_description =
                Some("the worker reported a save but left no saved state".into());
            record.set_health(HealthState::CriticalFailure, events);
            record.set_state(EnabledState::Off, events);
        }
        (AfterReap::Recover, _) => {
            // The recovery start claims the VM itself, so the reap's claim ends first.
            let _ = record.owner.release();
            recover(&inner, record);
            return;
        }
        _ => {}
    }
    release(&inner, record);
}

fn relaunch_failed(inner: &Inner, record: &mut VmRecord, error: &WorkerError) {
    record.status_description = Some(format!(
        "cannot restart after guest reset: {}",
        error_chain(error)
    ));
    record.set_health(HealthState::CriticalFailure, &inner.events);
    record.set_state(EnabledState::Off, &inner.events);
}

/// Applies the VM's `AutomaticRecoveryAction` after its worker was lost (catalog locked).
fn recover(inner: &Arc<Inner>, record: &mut VmRecord) {
    let events = &inner.events;
    let Some(action) = record.config.as_ref().map(|c| c.automatic_recovery_action) else {
        return;
    };
    let skipped = |reason: String| EventKind::RecoverySkipped { action, reason };
    match action {
        AutomaticRecoveryAction::None => {}
        AutomaticRecoveryAction::RevertToSnapshot => {
            if let Some(reason) = restart_limit_reached(record) {
                events.publish(record.id, skipped(reason));
                return;
            }
            events.publish(record.id, EventKind::RecoveryStarted { action });
            if let Err(reason) = crate::checkpoint_ops::begin_revert(inner, record) {
                events.publish(record.id, skipped(reason));
            }
        }
        AutomaticRecoveryAction::Restart => {
            if let Some(reason) = restart_limit_reached(record) {
                events.publish(record.id, skipped(reason));
                return;
            }
            events.publish(record.id, EventKind::RecoveryStarted { action });
            let (code, _job) = operation::begin(
                inner,
                record,
                RequestedState::Start,
                JobKind::RecoveryRestart,
            );
            if code != ReturnCode::JobStarted {
                events.publish(record.id, skipped(format!("start refused: {code}")));
            }
        }
    }
}

/// Restart-loop protection shared by the recovery actions that start the VM again: counts this
/// attempt, or says why there is none.
fn restart_limit_reached(record: &mut VmRecord) -> Option<String> {
    record
        .recoveries
        .retain(|at| at.elapsed() < RECOVERY_WINDOW);
    if record.recoveries.len() >= MAX_RECOVERY_RESTARTS {
        return Some(format!(
            "{MAX_RECOVERY_RESTARTS} restarts within {} minutes",
            RECOVERY_WINDOW.as_secs() / 60
        ));
    }
    record.recoveries.push(Instant::now());
    None
}

/// Re-attaches live workers and applies automatic start actions, VM by VM.
pub(crate) fn recover_on_start(inner: &Arc<Inner>) -> StartupReport {
    let mut report = StartupReport::default();
    let mut ids: Vec<VmId> = inner.lock_catalog().vms.keys().copied().collect();
    ids.sort();
    for id in ids {
        recover_one(inner, id, &mut report);
    }
    report
}

fn recover_one(inner: &Arc<Inner>, id: VmId, report: &mut StartupReport) {
    let generation = {
        let mut catalog = inner.lock_catalog();
        let Some(record) = catalog.vms.get_mut(&id) else {
            return;
        };
        if record.worker.is_some() || !record.owner.claim() {
            return;
        }
        record.owner.next_generation()
    };
    let found = inner.launcher.reattach(id, sink(inner, id, generation));
    let status = match &found {
        Ok(Some(worker)) => Some(worker.status()),
        _ => None,
    };
    let untidy = reconcile_saved_state(inner, id, found.as_ref().ok(), status).err();
    // A checkpoint operation the previous service left half done: finished or undone now,
    // after the re-attach so that a worker still taking a running checkpoint is waited for.
    let interrupted = crate::checkpoint_ops::recover_interrupted(inner, id);
    // A backup session the previous service left half done: its overlays merged back (by the
    // re-attached worker when the VM still runs), its partial set removed.
    let found_worker = match &found {
        Ok(Some(worker)) => Some(worker.as_ref()),
        _ => None,
    };
    let backup_undone = crate::backup_ops::recover_interrupted(inner, id, found_worker);
    let reloaded = match (&interrupted, &backup_undone) {
        (Ok(true), _) | (_, Ok(true)) => inner.store.read_config(id).ok(),
        _ => None,
    };
    let saved = inner.store.has_saved_state(id);
    let was_running = inner.store.running_marker(id);
    if !was_running
        && matches!(
            status,
            Some(WorkerStatus::Running | WorkerStatus::Paused | WorkerStatus::NotResponding)
        )
    {
        // A service killed during a start may have left the worker running before the marker
        // was durable (the two are written side by side): the VM runs, so it was running.
        let _ = inner.store.set_running_marker(id, true);
    }

    let mut catalog = inner.lock_catalog();
    let Some(record) = catalog.vms.get_mut(&id) else {
        return;
    };
    let events = &inner.events;
    if let Some(error) = untidy {
        let text = format!("cannot tidy saved state: {}", error_chain(&error));
        record.status_description = Some(text.clone());
        report.failed.push((id, text));
    }
    if let Err(error) = &interrupted {
        let text = format!(
            "cannot recover a checkpoint operation: {}",
            error_chain(error)
        );
        record.status_description = Some(text.clone());
        report.failed.push((id, text));
    }
    if let Err(error) = &backup_undone {
        let text = format!("cannot undo an interrupted backup: {}", error_chain(error));
        record.status_description = Some(text.clone());
        report.failed.push((id, text));
    }
    if let Some(config) = reloaded {
        record.config = Some(config);
    }
    match found {
        Ok(Some(worker)) => {
            record.worker = Some(Arc::from(worker));
            let state = match status {
                Some(WorkerStatus::Paused) => EnabledState::Paused,
                Some(WorkerStatus::Saving) => EnabledState::Saving,
                Some(WorkerStatus::Running | WorkerStatus::NotResponding) => EnabledState::Running,
                Some(WorkerStatus::Exited) | None => {
                    record.owner.hold(StopReason::WorkerExited {
                        code: None,
                        signal: None,
                    });
                    EnabledState::Running
                }
            };
            record.set_state(state, events);
            if status == Some(WorkerStatus::NotResponding) {
                // Its heartbeat reports it hung (and the recovery action applies) if it stays
                // silent; until then it is only reported.
                record.status_description = Some("the worker is not responding".into());
                record.set_health(HealthState::MajorFailure, events);
            }
            report.reattached.push(id);
            release(inner, record);
        }
        Ok(None) => {
            // A worker may have committed a save after the catalog was loaded.
            if matches!(record.state, EnabledState::Off | EnabledState::Saved) {
                let state = if saved {
                    EnabledState::Saved
                } else {
                    EnabledState::Off
                };
                record.set_state(state, events);
            }
            release(inner, record);
            match automatic_start(inner, record, was_running) {
                Some(job) => report.auto_started.push((id, job)),
                // Off and staying off: "was running" no longer holds.
                None if was_running => {
                    drop(catalog);
                    let _ = inner.store.set_running_marker(id, false);
                }
                None => {}
            }
        }
        Err(error) => {
            let text = format!("cannot re-attach worker: {}", error_chain(&error));
            record.status_description = Some(text.clone());
            record.set_health(HealthState::CriticalFailure, events);
            report.failed.push((id, text));
            release(inner, record);
        }
    }
}

/// Makes the saved-state folders agree with what runs (no lock held): beside a guest that runs,
/// a saved state is stale (its guest has moved on; restoring it later would be a silent
/// rollback) and so is an unfinished save; without a worker, an unfinished save will never be
/// finished. A worker that is saving, or that did not answer, is left to finish.
fn reconcile_saved_state(
    inner: &Inner,
    id: VmId,
    found: Option<&Option<Box<dyn Worker>>>,
    status: Option<WorkerStatus>,
) -> crate::Result<()> {
    let store = &inner.store;
    match (found, status) {
        (Some(Some(_)), Some(WorkerStatus::Running | WorkerStatus::Paused)) => {
            store.discard_saved_state(id)?;
            store.remove_unfinished_save(id)
        }
        (Some(None), _) => store.remove_unfinished_save(id),
        _ => Ok(()),
    }
}

/// Starts an Off VM if its automatic start action says so (catalog locked).
fn automatic_start(inner: &Arc<Inner>, record: &mut VmRecord, was_running: bool) -> Option<JobId> {
    let action = record.config.as_ref()?.automatic_start_action;
    let wanted = match action {
        AutomaticStartAction::AlwaysStart => true,
        AutomaticStartAction::StartIfPreviouslyRunning => was_running,
        AutomaticStartAction::Nothing => false,
    };
    if !wanted || record.state != EnabledState::Off {
        return None;
    }
    match operation::begin(
        inner,
        record,
        RequestedState::Start,
        JobKind::AutomaticStart,
    ) {
        (ReturnCode::JobStarted, job) => job,
        _ => None,
    }
}
