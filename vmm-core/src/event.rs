//! What happened to which virtual machine, for whoever listens (Hyper-V publishes these as
//! `__InstanceModificationEvent`s; the daemon turns them into log lines, CIM indications or
//! progress output).
//!
//! Each subscriber has its own unbounded channel and sees every event published after it
//! subscribed, in order. Dropping the receiver unsubscribes: the next publish prunes it.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::checkpoint::CheckpointId;
use crate::config::{AutomaticRecoveryAction, VmId};
use crate::job::{JobId, JobState};
use crate::state::{EnabledState, HealthState};
use crate::worker::StopReason;

/// One thing that happened to one virtual machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The virtual machine.
    pub vm: VmId,
    /// When the service noticed.
    pub time: SystemTime,
    /// What happened.
    pub kind: EventKind,
}

/// The kinds of [`Event`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// `DefineSystem` created the virtual machine.
    Defined,
    /// `ModifySystemSettings` changed its configuration.
    Modified,
    /// `DestroySystem` removed it.
    Destroyed,
    /// Its `EnabledState` changed.
    StateChanged {
        /// Before.
        previous: EnabledState,
        /// After.
        current: EnabledState,
    },
    /// Its `HealthState` changed.
    HealthChanged {
        /// Before.
        previous: HealthState,
        /// After.
        current: HealthState,
    },
    /// Its worker went away without being asked to (the guest is gone with it).
    WorkerLost {
        /// What the worker manager reported.
        reason: StopReason,
    },
    /// The recovery action is being carried out.
    RecoveryStarted {
        /// The action.
        action: AutomaticRecoveryAction,
    },
    /// The recovery action was not carried out.
    RecoverySkipped {
        /// The action that was configured.
        action: AutomaticRecoveryAction,
        /// Why not.
        reason: String,
    },
    /// The worker has not answered its heartbeat for this long (HealthState 20 meanwhile).
    WorkerNotResponding {
        /// Milliseconds of silence when reported.
        silent_for_ms: u64,
    },
    /// The worker answers again after not responding.
    WorkerResponding,
    /// A checkpoint was taken (`CreateSnapshot`).
    CheckpointCreated {
        /// The new checkpoint.
        checkpoint: CheckpointId,
    },
    /// A checkpoint was applied (`ApplySnapshot`): the VM is now what it holds.
    CheckpointApplied {
        /// The checkpoint.
        checkpoint: CheckpointId,
    },
    /// Checkpoints were deleted (`DestroySnapshot`, or `DestroySnapshotTree` for every one
    /// listed).
    CheckpointsDeleted {
        /// The checkpoints, children before parents.
        checkpoints: Vec<CheckpointId>,
    },
    /// A backup set of the VM was completed.
    BackupCompleted {
        /// The set's folder.
        set: std::path::PathBuf,
        /// Full or incremental.
        kind: crate::backup::BackupKind,
        /// How consistent it is.
        consistency: crate::backup::BackupConsistency,
    },
    /// A job ended.
    JobCompleted {
        /// The job.
        job: JobId,
        /// How it ended.
        state: JobState,
    },
}

/// Fan-out of [`Event`]s to every live subscriber.
#[derive(Debug, Default)]
pub(crate) struct EventBus {
    subscribers: Mutex<Vec<Sender<Event>>>,
}

impl EventBus {
    /// A new subscription: every event published from now on.
    pub(crate) fn subscribe(&self) -> Receiver<Event> {
        let (tx, rx) = mpsc::channel();
        self.subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(tx);
        rx
    }

    /// Sends `kind` about `vm` to every subscriber, dropping those whose receiver is gone.
    pub(crate) fn publish(&self, vm: VmId, kind: EventKind) {
        let event = Event {
            vm,
            time: SystemTime::now(),
            kind,
        };
        let mut subscribers = self
            .subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        subscribers.retain(|tx| tx.send(event.clone()).is_ok());
    }

    /// How many subscribers are still registered.
    #[cfg(test)]
    fn subscriber_count(&self) -> usize {
        self.subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_subscriber_receives_published_events_in_order() {
        let bus = EventBus::default();
        let first = bus.subscribe();
        let second = bus.subscribe();
        let vm = VmId::new_random();

        bus.publish(vm, EventKind::Defined);
        bus.publish(vm, EventKind::Destroyed);

        for rx in [first, second] {
            let kinds: Vec<EventKind> = rx.try_iter().map(|e| e.kind).collect();
            assert_eq!(kinds, [EventKind::Defined, EventKind::Destroyed]);
        }
    }

    #[test]
    fn subscriber_sees_nothing_published_before_it_subscribed() {
        let bus = EventBus::default();
        bus.publish(VmId::new_random(), EventKind::Defined);

        let late = bus.subscribe();

        assert!(late.try_recv().is_err());
    }

    #[test]
    fn dropped_subscriber_is_pruned_on_next_publish() {
        let bus = EventBus::default();
        let kept = bus.subscribe();
        drop(bus.subscribe());

        bus.publish(VmId::new_random(), EventKind::Defined);

        assert_eq!(bus.subscriber_count(), 1);
        assert_eq!(kept.try_iter().count(), 1);
    }

    #[test]
    fn event_round_trips_through_json() {
        let event = Event {
            vm: VmId::new_random(),
            time: SystemTime::now(),
            kind: EventKind::StateChanged {
                previous: EnabledState::Off,
                current: EnabledState::Starting,
            },
        };

        let json = serde_json::to_string(&event).expect("encode");

        assert_eq!(serde_json::from_str::<Event>(&json).expect("decode"), event);
    }
}
