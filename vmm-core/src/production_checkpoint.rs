//! Production checkpoints of a running VM: the guest is quiesced through its integration agent
//! (the path a backup's PrepareForSnapshot takes), its disks are switched to overlays while it is
//! frozen, and it is thawed; no memory is captured. A guest that cannot be quiesced gets a
//! standard checkpoint instead (type 3) or none at all (type 4, Hyper-V's production-only).
//!
//! A frozen guest is never left frozen: [`FrozenGuest`] thaws it on every path, and the worker
//! thaws it by itself at the hold limit should the service die inside the window.

use std::time::Duration;

use crate::error_chain;
use crate::worker::{Worker, WorkerError, WorkerStatus};

/// How long the agent gets to answer a ping before the guest counts as having none running.
const PING_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a freeze may take to be answered, and how long the worker lets it be held before it
/// thaws the guest itself (VSS's flush-and-hold window).
pub(crate) const FREEZE_LIMIT: Duration = Duration::from_secs(10);
/// How long a thaw may take to be answered.
const THAW_TIMEOUT: Duration = Duration::from_secs(5);

/// The outcome of asking the guest to freeze.
pub(crate) enum Quiesce<'a> {
    /// The guest's file systems are frozen until the value is dropped.
    Frozen(FrozenGuest<'a>),
    /// The guest could not be quiesced, and why (for the checkpoint record and the job).
    NotQuiesced(String),
}

/// A guest frozen by its agent: thawed when dropped. A thaw that fails (or a service that dies
/// before it) is covered by the worker's hold limit, which thaws the guest by itself.
#[derive(Debug)]
pub(crate) struct FrozenGuest<'a> {
    worker: &'a dyn Worker,
}

impl Drop for FrozenGuest<'_> {
    fn drop(&mut self) {
        let _ = self.worker.thaw_guest(THAW_TIMEOUT);
    }
}

/// Asks the guest's agent to freeze its file systems, held at most [`FREEZE_LIMIT`].
/// [`WorkerError::Gone`] is the only error: anything else means the guest cannot be quiesced.
pub(crate) fn quiesce(worker: &dyn Worker) -> Result<Quiesce<'_>, WorkerError> {
    if worker.status() == WorkerStatus::Paused {
        return Ok(Quiesce::NotQuiesced(
            "the VM is paused: its guest cannot be asked to freeze".into(),
        ));
    }
    match worker.guest_agent_ping(PING_TIMEOUT) {
        Ok(()) => {}
        Err(WorkerError::Gone) => return Err(WorkerError::Gone),
        Err(error) => {
            return Ok(Quiesce::NotQuiesced(format!(
                "the guest agent does not answer: {}",
                error_chain(&error)
            )));
        }
    }
    match worker.freeze_guest(FREEZE_LIMIT, FREEZE_LIMIT) {
        Ok(_) => Ok(Quiesce::Frozen(FrozenGuest { worker })),
        Err(WorkerError::Gone) => Err(WorkerError::Gone),
        Err(error) => Ok(Quiesce::NotQuiesced(format!(
            "the guest agent did not freeze the guest: {}",
            error_chain(&error)
        ))),
    }
}
