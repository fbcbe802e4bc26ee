//! The seam between the service and the worker processes (Hyper-V's VMMS ↔ `vmwp.exe`).
//!
//! vmm-core never starts a process itself. It asks a [`WorkerLauncher`] for a [`Worker`] when a
//! virtual machine starts, calls the worker's methods for pause, resume, save, reset and turn-off,
//! and listens on an [`EventSink`] for what the worker reports on its own (the guest powered off
//! or rebooted, the worker crashed or stopped answering). The worker-manager crate implements
//! both traits over one process per VM and a Unix-socket control protocol; an integrator can
//! implement them over anything else.
//!
//! Rules every implementation keeps:
//! - Every method returns within a bounded time (the worker manager's request timeout); a hung
//!   worker yields [`WorkerError::Timeout`], never a hung service thread.
//! - [`WorkerError::Gone`] means the worker process no longer exists; the service then treats the
//!   VM as lost (unless it was being turned off, when gone is what was wanted).
//! - Dropping a `Worker` detaches from it and does **not** stop it: workers outlive the service
//!   and are found again by [`WorkerLauncher::reattach`].
//! - Events are sent on the sink handed to `launch` / `reattach` and never after the worker's
//!   process has been reaped; the service ignores events from workers it has already replaced.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{VmConfig, VmId};
use crate::integration::{
    BackupCaptureReport, BackupCaptureRequest, BackupMergeRequest, GuestAgentInfo,
    GuestFreezeStatus, GuestHeartbeat,
};

/// How a new worker brings up its guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaunchMode {
    /// Cold boot from the configuration's boot source.
    Boot,
    /// Restore the state a previous worker saved into `state_dir` (the VM's `state/` folder).
    ///
    /// The saved state is consumed: once the guest runs from it, the folder must be gone, so that
    /// a crash of the service at any later instant can never restore it a second time on top of
    /// disks that have moved on. A worker should remove it itself before it reports ready (the
    /// worker-manager crate's workers do); the service also removes whatever is left once
    /// `launch` returns, for launchers that do not.
    RestoreSaved {
        /// The saved state written by [`Worker::save`].
        state_dir: PathBuf,
    },
}

/// What a worker says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WorkerStatus {
    /// The guest's vCPUs are running.
    Running,
    /// The guest is paused.
    Paused,
    /// The guest's state is being saved (for instance a save that an earlier service started);
    /// the worker ends as [`StopReason::Saved`] or, if the save fails, runs on.
    Saving,
    /// The process is alive but did not answer in time.
    NotResponding,
    /// The process is gone.
    Exited,
}

/// The signal a seccomp filter kills with (`SECCOMP_RET_KILL_PROCESS`).
const SIGSYS: i32 = 31;

/// Why a guest stopped or its worker went away, as reported by the worker manager.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StopReason {
    /// The guest powered itself off (ACPI / i8042 poweroff). The VM becomes Off; not a failure.
    GuestPowerOff,
    /// The guest reset itself (reboot). The service starts a fresh worker and keeps the VM
    /// Running; not a failure.
    GuestReset,
    /// The worker saved the guest's state into the VM's `state/` folder and exited, without the
    /// current service having asked (a save that a previous service started). The VM is Saved;
    /// not a failure.
    Saved,
    /// The guest triple-faulted (KVM shutdown exit).
    TripleFault,
    /// The partition stopped on an internal error (emulation failure, unhandled exit, …).
    GuestCrash {
        /// What the worker reported.
        detail: String,
    },
    /// The worker process exited without being asked to.
    WorkerExited {
        /// Its exit code, if it exited normally.
        code: Option<i32>,
        /// The signal that killed it, if any.
        signal: Option<i32>,
    },
    /// The worker stopped answering its heartbeat.
    HeartbeatLost {
        /// How long it had been silent when given up on.
        silent_for: Duration,
    },
}

impl StopReason {
    /// Whether this is a failure (HealthState 25 and the recovery action), as opposed to the
    /// guest's own power-off or reboot.
    pub const fn is_failure(&self) -> bool {
        !matches!(
            self,
            StopReason::GuestPowerOff | StopReason::GuestReset | StopReason::Saved
        )
    }
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::GuestPowerOff => f.write_str("guest powered off"),
            StopReason::GuestReset => f.write_str("guest reset"),
            StopReason::Saved => f.write_str("guest state saved"),
            StopReason::TripleFault => f.write_str("guest triple fault"),
            StopReason::GuestCrash { detail } => write!(f, "guest crashed: {detail}"),
            StopReason::WorkerExited {
                code: Some(code), ..
            } => {
                write!(f, "worker exited with code {code}")
            }
            StopReason::WorkerExited {
                signal: Some(SIGSYS),
                ..
            } => f.write_str("worker killed by its seccomp filter: bad system call"),
            StopReason::WorkerExited {
                signal: Some(signal),
                ..
            } => {
                write!(f, "worker killed by signal {signal}")
            }
            StopReason::WorkerExited { .. } => f.write_str("worker exited"),
            StopReason::HeartbeatLost { silent_for } => {
                write!(f, "worker heartbeat lost after {silent_for:?}")
            }
        }
    }
}

/// Something a worker reports without being asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum WorkerEvent {
    /// The guest stopped or the worker went away. After this the worker is finished: the
    /// service turns it off (to reap it) and acts on the reason.
    Stopped(StopReason),
    /// The guest's run state changed without the service asking (a save started by an earlier
    /// service failed and the guest runs again, for instance). Ignored while an operation owns
    /// the VM: the operation knows better.
    StateChanged(WorkerStatus),
    /// The worker has not answered for `silent_for`. Reported as a health state; nothing is
    /// done to the worker yet.
    NotResponding {
        /// How long it has been silent.
        silent_for: Duration,
    },
    /// The worker answers again after [`WorkerEvent::NotResponding`].
    Responding,
    /// Still silent after the hang timeout: the VM's recovery action decides whether the worker
    /// is killed (restart, revert) or left alone (none).
    Hung {
        /// How long it has been silent.
        silent_for: Duration,
    },
}

/// Where a worker sends its [`WorkerEvent`]s. Cheap to clone; safe to use from any thread.
#[derive(Clone)]
pub struct EventSink {
    vm: VmId,
    deliver: Arc<dyn Fn(WorkerEvent) -> bool + Send + Sync>,
}

impl EventSink {
    /// A sink for `vm` that hands every event to `deliver`, which returns `false` once nobody
    /// listens any more. The service builds its own; this is public so that worker
    /// implementations can be tested against a plain channel.
    ///
    /// ```
    /// use std::sync::mpsc;
    /// use vmm_core::{EventSink, StopReason, VmId, WorkerEvent};
    ///
    /// let (tx, rx) = mpsc::channel();
    /// let sink = EventSink::new(VmId::new_random(), move |event| tx.send(event).is_ok());
    /// assert!(sink.send(WorkerEvent::Stopped(StopReason::GuestPowerOff)));
    /// assert_eq!(rx.recv().unwrap(), WorkerEvent::Stopped(StopReason::GuestPowerOff));
    /// ```
    pub fn new(vm: VmId, deliver: impl Fn(WorkerEvent) -> bool + Send + Sync + 'static) -> Self {
        EventSink {
            vm,
            deliver: Arc::new(deliver),
        }
    }

    /// The virtual machine this sink reports for.
    pub fn vm(&self) -> VmId {
        self.vm
    }

    /// Reports `event`; `false` when the receiving side is gone (the worker can stop reporting).
    pub fn send(&self, event: WorkerEvent) -> bool {
        (self.deliver)(event)
    }
}

impl fmt::Debug for EventSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventSink")
            .field("vm", &self.vm)
            .finish_non_exhaustive()
    }
}

/// A checkpoint of a running VM, as the service asks a worker for it
/// ([`Worker::checkpoint`]).
///
/// The worker copies guest memory while the guest runs (pre-copy with KVM's dirty log), then in
/// one short pause writes the pages dirtied meanwhile and the device and vCPU state, switches
/// every listed disk to its new overlay, and commits `staging` by renaming it to `state_dir`
/// before the guest runs again. The rename is the commit point: once `state_dir` exists the
/// guest writes to the overlays; before it, the guest never ran on them, so a crash of either
/// process leaves the VM on its old images and the service can remove whatever was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRequest {
    /// An existing, empty folder for the checkpoint's saved state (the same files as
    /// [`Worker::save`] writes, plus any memory delta files).
    pub staging: PathBuf,
    /// Where the committed state goes; must not exist.
    pub state_dir: PathBuf,
    /// The committed state folder of the checkpoint "Now" descends from, when its memory image
    /// may serve as the base of a delta: the worker then writes only the pages dirtied since that
    /// checkpoint was taken (or since its guest was restored from it), and a full image whenever
    /// it cannot prove the delta exact.
    pub parent_state_dir: Option<PathBuf>,
    /// The new overlay of each writable disk, created by the worker on top of the disk's current
    /// image inside the pause; the guest continues on it.
    pub overlays: Vec<DiskOverlay>,
    /// What is captured besides the disks.
    #[serde(default)]
    pub content: CheckpointContent,
}

/// What a running checkpoint captures ([`CheckpointRequest::content`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckpointContent {
    /// Memory, device and vCPU state with the disks (a standard checkpoint).
    #[default]
    SavedState,
    /// The disks only, for a production checkpoint: the guest's file systems are frozen by its
    /// integration agent ([`Worker::freeze_guest`]). The worker refuses
    /// ([`WorkerError::InvalidState`]) unless a freeze it relayed is held, and commits only if it
    /// is still held once the disks are switched, inside the pause (no thaw was sent, not even at
    /// the hold limit). Nothing is written to `staging`: committing it (the same rename to
    /// `state_dir`) is only the commit point.
    FrozenDisks,
}

/// One disk's new top layer in a [`CheckpointRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskOverlay {
    /// Index of the disk in the VM configuration's `disks`.
    pub disk: usize,
    /// The overlay file to create; must not exist.
    pub path: PathBuf,
}

/// What a running checkpoint cost, as the worker measured it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointReport {
    /// How long the guest's vCPUs were paused.
    pub pause: Duration,
    /// From the request to the commit.
    pub total: Duration,
    /// Bytes of guest memory written into the checkpoint (data, not holes).
    pub memory_bytes: u64,
    /// Whether the memory was written as a delta on `parent_state_dir`'s image.
    pub delta: bool,
    /// Pages the guest dirtied while the pre-copy ran (written again in the pause).
    pub pages_dirtied_during_copy: u64,
}

/// Why a worker call failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The worker process no longer exists.
    #[error("worker is gone")]
    Gone,
    /// The worker did not answer in time.
    #[error("worker did not answer within {0:?}")]
    Timeout(Duration),
    /// The worker answered but refused (e.g. an operation its guest does not support).
    #[error("worker refused: {reason}")]
    Refused {
        /// What the worker said.
        reason: String,
    },
    /// The operation is not allowed in the guest's current state (Hyper-V's 32775); the worker
    /// and its guest are unchanged.
    #[error("invalid state for this operation: {reason}")]
    InvalidState {
        /// What the worker said.
        reason: String,
    },
    /// Anything else (spawning, I/O, protocol, the partition's own errors).
    #[error("worker operation failed")]
    Failed(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
}

impl WorkerError {
    /// Wraps any error as [`WorkerError::Failed`].
    pub fn failed(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        WorkerError::Failed(Box::new(error))
    }
}

/// One running virtual machine's worker, as the service drives it.
///
/// Calls for one VM never overlap (the service runs one operation per VM at a time), but they
/// arrive on different threads over the worker's life.
///
/// ```
/// use std::path::Path;
/// use vmm_core::{Worker, WorkerError, WorkerStatus};
///
/// /// A worker that is always running and does nothing (a sketch: real ones talk to a process).
/// #[derive(Debug)]
/// struct Idle;
///
/// impl Worker for Idle {
///     fn pid(&self) -> u32 { std::process::id() }
///     fn status(&self) -> WorkerStatus { WorkerStatus::Running }
///     fn pause(&self) -> Result<(), WorkerError> { Ok(()) }
///     fn resume(&self) -> Result<(), WorkerError> { Ok(()) }
///     fn save(&self, _staging: &Path, _state_dir: &Path) -> Result<(), WorkerError> { Ok(()) }
///     fn reset(&self) -> Result<(), WorkerError> { Ok(()) }
///     fn turn_off(&self) -> Result<(), WorkerError> { Ok(()) }
/// }
///
/// let worker: Box<dyn Worker> = Box::new(Idle);
/// assert_eq!(worker.status(), WorkerStatus::Running);
/// ```
pub trait Worker: Send + Sync + fmt::Debug {
    /// The worker's process id (`Msvm_ComputerSystem.ProcessID`).
    fn pid(&self) -> u32;

    /// Asks the worker how it is; answers [`WorkerStatus::NotResponding`] rather than block
    /// past the worker manager's timeout.
    fn status(&self) -> WorkerStatus;

    /// Parks every vCPU. Returns once the guest is paused.
    fn pause(&self) -> Result<(), WorkerError>;

    /// Lets the vCPUs run again.
    fn resume(&self) -> Result<(), WorkerError>;

    /// Captures the complete VM state (devices, vCPUs, memory) into the empty folder `staging`,
    /// makes it durable, and commits it by renaming `staging` to `state_dir` (the VM's `state/`);
    /// then stops the partition and the process exits after replying.
    ///
    /// The worker commits, not the service, so that a save finished while no service listens
    /// (the daemon was stopped or killed meanwhile) is a saved state all the same. On any failure
    /// before the commit the guest runs on and `state_dir` is untouched.
    fn save(&self, staging: &Path, state_dir: &Path) -> Result<(), WorkerError>;

    /// Asks the guest to shut itself down and waits up to `timeout` for it to power off. `Ok`
    /// once it has (the worker then waits to be turned off); [`WorkerError::Timeout`] when it did
    /// not comply in time, [`WorkerError::Refused`] when the guest has no way to be asked. The
    /// guest is left as it is on error: the service decides whether to turn it off.
    fn shutdown(&self, timeout: Duration) -> Result<(), WorkerError> {
        let _ = timeout;
        Err(WorkerError::Refused {
            reason: "the guest has no shutdown integration".into(),
        })
    }

    /// Takes a checkpoint of the running (or paused) guest as `request` describes, leaving it in
    /// the run state it was in. On any failure before the commit the guest runs on its old disks
    /// and `request.state_dir` does not exist. The worker finishes a checkpoint it has begun even
    /// when the caller goes away (a daemon killed meanwhile finds it committed or not begun).
    fn checkpoint(&self, request: &CheckpointRequest) -> Result<CheckpointReport, WorkerError> {
        let _ = request;
        Err(WorkerError::Refused {
            reason: "this worker cannot take checkpoints of a running guest".into(),
        })
    }

    /// Whether the guest's integration agent answers (Hyper-V's heartbeat): a `guest-sync`
    /// and `guest-ping` round trip within `timeout`. [`WorkerError::Refused`] when the VM has no
    /// integration channel; [`WorkerError::Timeout`] when nothing answers.
    fn guest_agent_ping(&self, timeout: Duration) -> Result<(), WorkerError> {
        let _ = timeout;
        Err(no_integration())
    }

    /// The guest agent's version and commands (`guest-info`).
    fn guest_agent_info(&self, timeout: Duration) -> Result<GuestAgentInfo, WorkerError> {
        let _ = timeout;
        Err(no_integration())
    }

    /// Asks the guest to flush and freeze its file systems (`guest-fsfreeze-freeze`) and waits
    /// up to `reply_timeout` for the answer: the number of file systems frozen. The worker thaws
    /// the guest itself once `hold_limit` has passed since the request, unless
    /// [`Worker::thaw_guest`] came first, so no caller (nor a caller's crash) holds the guest
    /// frozen past the limit. On a timeout the worker sends a thaw as well.
    fn freeze_guest(
        &self,
        reply_timeout: Duration,
        hold_limit: Duration,
    ) -> Result<u32, WorkerError> {
        let _ = (reply_timeout, hold_limit);
        Err(no_integration())
    }

    /// Thaws the guest's file systems (`guest-fsfreeze-thaw`): the number thawed.
    fn thaw_guest(&self, timeout: Duration) -> Result<u32, WorkerError> {
        let _ = timeout;
        Err(no_integration())
    }

    /// Whether the guest's file systems are frozen (`guest-fsfreeze-status`).
    fn guest_freeze_status(&self, timeout: Duration) -> Result<GuestFreezeStatus, WorkerError> {
        let _ = timeout;
        Err(no_integration())
    }

    /// The last heartbeat of the guest's integration agent as the worker keeps it (it pings
    /// the agent periodically): read for every `get-vm`, so it must not ask the guest. `None`
    /// when the worker has no integration channel or no guest runs.
    fn guest_heartbeat(&self) -> Option<GuestHeartbeat> {
        None
    }

    /// A backup's point-in-time capture of the disks: see [`BackupCaptureRequest`]. On any
    /// failure every disk stays on its image, no overlay exists and the maps are untouched.
    fn backup_capture(
        &self,
        request: &BackupCaptureRequest,
    ) -> Result<BackupCaptureReport, WorkerError> {
        let _ = request;
        Err(WorkerError::Refused {
            reason: "this worker cannot capture disks for a backup".into(),
        })
    }

    /// Merges a capture's overlays back while the guest runs: see [`BackupMergeRequest`].
    fn backup_merge(&self, request: &BackupMergeRequest) -> Result<(), WorkerError> {
        let _ = request;
        Err(WorkerError::Refused {
            reason: "this worker cannot merge backup overlays".into(),
        })
    }

    /// Hard-resets the guest (works from running or paused; the guest runs afterwards).
    fn reset(&self) -> Result<(), WorkerError>;

    /// Powers the VM off at once and ends the process, killing it if it does not comply.
    /// Idempotent: on a worker that already exited it returns `Ok` or [`WorkerError::Gone`].
    fn turn_off(&self) -> Result<(), WorkerError>;
}

fn no_integration() -> WorkerError {
    WorkerError::Refused {
        reason: "the guest has no integration channel".into(),
    }
}

/// Starts and re-finds workers (Hyper-V's worker process manager).
pub trait WorkerLauncher: Send + Sync + fmt::Debug {
    /// Starts a worker for `vm` and returns once its guest is running (booted, or restored from
    /// `mode`'s saved state). The worker reports on `events` from then on.
    fn launch(
        &self,
        vm: &VmConfig,
        mode: LaunchMode,
        events: EventSink,
    ) -> Result<Box<dyn Worker>, WorkerError>;

    /// [`launch`](Self::launch), calling `handed_off` once the worker has everything it needs
    /// from the caller's side and only builds and starts its guest from there on: the service
    /// starts work it does beside the launch then, so that it does not take the CPU the hand-off
    /// needs. A launch that fails before the hand-off may not call it. The default calls it
    /// first.
    fn launch_handing_off(
        &self,
        vm: &VmConfig,
        mode: LaunchMode,
        events: EventSink,
        handed_off: &mut dyn FnMut(),
    ) -> Result<Box<dyn Worker>, WorkerError> {
        handed_off();
        self.launch(vm, mode, events)
    }

    /// Finds a worker for `vm` that outlived a previous service instance (its runtime folder,
    /// pid and control socket) and re-attaches to it. `Ok(None)` when there is none or it is
    /// dead (the launcher cleans up what it left). Runs for every VM, including degraded ones.
    fn reattach(&self, vm: VmId, events: EventSink)
    -> Result<Option<Box<dyn Worker>>, WorkerError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_power_off_and_reset_are_not_failures() {
        let failures = [
            StopReason::GuestPowerOff,
            StopReason::GuestReset,
            StopReason::Saved,
            StopReason::TripleFault,
            StopReason::GuestCrash {
                detail: "unhandled exit".into(),
            },
            StopReason::WorkerExited {
                code: None,
                signal: Some(9),
            },
            StopReason::HeartbeatLost {
                silent_for: Duration::from_secs(5),
            },
        ]
        .map(|r| r.is_failure());

        assert_eq!(failures, [false, false, false, true, true, true, true]);
    }

    #[test]
    fn stop_reason_names_the_signal() {
        let text = StopReason::WorkerExited {
            code: None,
            signal: Some(9),
        }
        .to_string();

        assert_eq!(text, "worker killed by signal 9");
    }

    #[test]
    fn sink_reports_when_receiver_is_gone() {
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = EventSink::new(VmId::new_random(), move |e| tx.send(e).is_ok());
        drop(rx);

        let delivered = sink.send(WorkerEvent::Stopped(StopReason::GuestPowerOff));

        assert!(!delivered);
    }
}
