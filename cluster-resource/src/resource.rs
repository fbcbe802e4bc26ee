//! The cluster resource contract: what Windows' Resource Monitor asks of a resource DLL
//! (Open, Online, Offline, Terminate, LooksAlive, IsAlive) and what Pacemaker asks of an OCF
//! agent (start, stop, monitor), in one trait.
//!
//! Online and Offline may take long (a restore, a save): they return
//! [`Progress::Pending`] when the operation continues in the background, and the caller polls
//! [`ClusterResource::state`] until it leaves the pending state or the
//! [`ResourceTimeouts::pending`] runs out, then calls [`ClusterResource::terminate`], as the
//! Resource Monitor does with `PendingTimeout`.

use std::time::{Duration, Instant};

use crate::error::{ClusterError, Result};

/// A cluster resource's state, with the codes of `CLUSTER_RESOURCE_STATE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ResourceState {
    /// 2: online.
    Online,
    /// 3: offline.
    Offline,
    /// 4: failed.
    Failed,
    /// 129: coming online.
    OnlinePending,
    /// 130: going offline.
    OfflinePending,
}

impl ResourceState {
    /// The `CLUSTER_RESOURCE_STATE` code.
    pub fn code(self) -> u32 {
        match self {
            ResourceState::Online => 2,
            ResourceState::Offline => 3,
            ResourceState::Failed => 4,
            ResourceState::OnlinePending => 129,
            ResourceState::OfflinePending => 130,
        }
    }

    /// Whether an operation is still under way.
    pub fn is_pending(self) -> bool {
        matches!(
            self,
            ResourceState::OnlinePending | ResourceState::OfflinePending
        )
    }
}

/// What Online or Offline did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Done (`ERROR_SUCCESS`).
    Done,
    /// Continues in the background (`ERROR_IO_PENDING`); poll [`ClusterResource::state`].
    Pending,
}

/// Polling intervals and the pending limit (the Resource Monitor's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceTimeouts {
    /// `LooksAlivePollInterval` (5 s).
    pub looks_alive_interval: Duration,
    /// `IsAlivePollInterval` (60 s).
    pub is_alive_interval: Duration,
    /// `PendingTimeout` (180 s): the longest an operation may stay pending.
    pub pending: Duration,
}

impl Default for ResourceTimeouts {
    fn default() -> Self {
        ResourceTimeouts {
            looks_alive_interval: Duration::from_secs(5),
            is_alive_interval: Duration::from_secs(60),
            pending: Duration::from_secs(180),
        }
    }
}

/// A resource a cluster brings online and offline on one node (HVCLUSRES.DLL's entry points).
pub trait ClusterResource: Send + Sync {
    /// `Online`: bring the resource up here.
    fn online(&self) -> Result<Progress>;
    /// `Offline`: take it down gracefully (per its offline action).
    fn offline(&self) -> Result<Progress>;
    /// `Terminate`: take it down at once, without cleanup.
    fn terminate(&self) -> Result<()>;
    /// `LooksAlive`: a cheap check (≤ 300 ms).
    fn looks_alive(&self) -> bool;
    /// `IsAlive`: a thorough check.
    fn is_alive(&self) -> bool;
    /// The state now.
    fn state(&self) -> ResourceState;
}

/// Waits for a pending operation to reach `goal`, terminating the resource when `timeouts.pending`
/// passes first (the Resource Monitor's rule). A `Failed` state ends the wait as an error.
pub fn wait_pending(
    resource: &dyn ClusterResource,
    goal: ResourceState,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let state = resource.state();
        if state == goal {
            return Ok(());
        }
        if state == ResourceState::Failed {
            return Err(ClusterError::Service(format!(
                "resource failed while going {goal:?}"
            )));
        }
        if Instant::now() >= deadline {
            let _ = resource.terminate();
            return Err(ClusterError::PendingTimeout {
                what: if goal == ResourceState::Online {
                    "online"
                } else {
                    "offline"
                },
                seconds: timeout.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
