//! The node's agent: self-fencing, failover and planned moves, on threads of its own.
//!
//! - **Self-fencing.** When the node's lease stops being current (not renewed for `TTL − margin`),
//!   every VM worker of this node is killed at once and every token forgotten, before the lease
//!   can have expired on the server; the node acts again only under a new lease.
//! - **Failover.** Every VM of the shared store that was running (its `was-running` marker is
//!   set) but has no owner — its owner's lease expired — is campaigned for; the winner starts it
//!   from its last durable state (its saved state if it has one, else a cold boot), unless its
//!   automatic recovery action is None. Ownership keys are watched, so a deletion wakes the agent
//!   at once; a scan every [`SCAN`] catches anything a lost watch missed.
//! - **Planned moves** (`move-vm NAME --to NODE`, Hyper-V's quick migration): the owner saves the
//!   VM, then in one guarded transaction deletes its ownership key and names the target; the
//!   target restores the VM and records the guest's downtime.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use etcd_client::{PutOptions, TxnOp, WatchOptions};
use serde::{Deserialize, Serialize};
use vmm_core::{
    AutomaticRecoveryAction, EnabledState, EventKind, JobState, RequestedState, ReturnCode,
    VirtualSystemManagementService, VmId,
};

use crate::coordinator::ClusterNode;
use crate::error::{ClusterError, Result};
use crate::node::unix_ms;
use crate::ownership;

/// Period of the ownership scan (and of the self-fencing check).
pub const SCAN: Duration = Duration::from_millis(200);

/// vmm-core's marker of a VM that was running when last seen (see `vmm_core::Store`).
const RUNNING_MARKER: &str = "was-running";

/// How long a save or a restore of a move may take.
const MOVE_STEP: Duration = Duration::from_secs(120);

/// A planned move asked by `move-vm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveRequest {
    /// Target node.
    pub to: String,
    /// Request id (Unix ms when asked).
    pub id: u64,
}

/// A move in flight from source to target (`<prefix>/handoff/<GUID>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handoff {
    /// The request.
    pub request: MoveRequest,
    /// The source node.
    pub from: String,
    /// When the source began saving (the guest stopped running), Unix ms.
    pub paused_ms: u64,
}

/// The outcome of a move (`<prefix>/move-status/<GUID>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveStatus {
    /// The request.
    pub request: MoveRequest,
    /// Source node.
    pub from: String,
    /// Guest downtime: from the start of the save to running on the target, ms.
    pub downtime_ms: Option<u64>,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// The agent of one node.
#[derive(Debug, Clone)]
pub struct Agent {
    node: Arc<ClusterNode>,
    service: VirtualSystemManagementService,
    /// VMs being moved away: their ownership is handed off, not released.
    moving: Arc<Mutex<HashSet<VmId>>>,
}

impl Agent {
    /// Starts the agent's threads.
    pub fn start(node: Arc<ClusterNode>, service: VirtualSystemManagementService) -> Result<Self> {
        let agent = Agent {
            node,
            service,
            moving: Arc::default(),
        };
        let (wake_tx, wake_rx) = std::sync::mpsc::channel::<()>();
        let spawn = |name: &str, body: Box<dyn FnOnce() + Send>| {
            thread::Builder::new()
                .name(name.into())
                .spawn(body)
                .map(drop)
                .map_err(|source| ClusterError::Start {
                    what: "a cluster agent thread",
                    source,
                })
        };
        let scanner = agent.clone();
        spawn(
            "cluster-scan",
            Box::new(move || scanner.scan_loop(&wake_rx)),
        )?;
        let watcher = agent.clone();
        spawn(
            "cluster-watch",
            Box::new(move || watcher.watch_owners(&wake_tx)),
        )?;
        let releaser = agent.clone();
        spawn(
            "cluster-events",
            Box::new(move || releaser.release_on_stop()),
        )?;
        Ok(agent)
    }

    fn scan_loop(&self, wake: &std::sync::mpsc::Receiver<()>) {
        let mut last_error = None;
        loop {
            let _ = wake.recv_timeout(SCAN);
            while wake.try_recv().is_ok() {}
            if self.node.lease().current().is_none() {
                if !self.node.is_fenced() {
                    self.self_fence();
                }
                continue;
            }
            if self.node.is_fenced() {
                // A new lease: a new membership, with nothing owned.
                self.node.unfence();
            }
            let outcome = self
                .failover()
                .and_then(|()| self.handle_handoffs())
                .and_then(|()| self.handle_moves())
                .err()
                // One line per kind of failure, not per endpoint named in it.
                .map(|e| match e {
                    ClusterError::EtcdUnreachable { .. } => "etcd unreachable".to_owned(),
                    other => other.to_string(),
                });
            if outcome != last_error {
                if let Some(error) = &outcome {
                    eprintln!("cluster: node {}: {error}", self.node.name());
                }
                last_error = outcome;
            }
        }
    }

    /// Kills every worker of this node at once and forgets every token.
    fn self_fence(&self) {
        let forgotten = self.node.fence();
        for vm in self.service.list_vms() {
            if let Some(pid) = vm.process_id.and_then(|p| i32::try_from(p).ok()) {
                // SAFETY: kill only sends SIGKILL to this node's worker of the VM.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        eprintln!(
            "cluster: node {} lease not current: self-fenced ({} VM(s) owned)",
            self.node.name(),
            forgotten.len()
        );
    }

    /// Campaigns for every VM that was running and has no owner, and starts those it wins.
    fn failover(&self) -> Result<()> {
        let owners = ownership::owners(self.node.etcd(), self.node.keys())?;
        for (vm, owner) in &owners {
            // A token this node holds but etcd does not show any more: lost (taken over).
            if let Some(token) = self.node.token(*vm)
                && (owner.token != token || owner.node != self.node.name())
            {
                self.node.forget(*vm);
            }
        }
        let Ok(entries) = std::fs::read_dir(self.service.store().vms_dir()) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let Some(vm) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<VmId>().ok())
            else {
                continue;
            };
            if self.service.get_vm(vm).is_err() {
                // Defined by another node since this one started: show it here too.
                self.service.refresh_vm(vm);
            }
            if owners.contains_key(&vm) || !entry.path().join(RUNNING_MARKER).exists() {
                continue;
            }
            if !self.service.refresh_vm(vm) {
                continue;
            }
            let Ok(system) = self.service.get_vm(vm) else {
                continue;
            };
            let recovers = system
                .config
                .as_ref()
                .is_some_and(|c| c.automatic_recovery_action != AutomaticRecoveryAction::None);
            if !recovers
                || !matches!(
                    system.enabled_state,
                    EnabledState::Off | EnabledState::Saved
                )
            {
                continue;
            }
            if self.node.acquire(vm).is_ok() {
                eprintln!(
                    "cluster: node {} took over {vm}; starting it from {}",
                    self.node.name(),
                    if system.enabled_state == EnabledState::Saved {
                        "its saved state"
                    } else {
                        "a cold boot"
                    }
                );
                let _ = self.service.request_state_change(vm, RequestedState::Start);
            }
        }
        Ok(())
    }

    /// Wakes the scan as soon as an ownership key is deleted (an owner's lease expired).
    fn watch_owners(&self, wake: &std::sync::mpsc::Sender<()>) {
        let prefix = self.node.keys().owners();
        loop {
            let watched = self.node.etcd().call(|mut c| {
                let prefix = prefix.clone();
                let wake = wake.clone();
                async move {
                    let mut stream = c
                        .watch(prefix, Some(WatchOptions::new().with_prefix()))
                        .await?;
                    while let Some(response) = stream.message().await? {
                        if !response.events().is_empty() {
                            let _ = wake.send(());
                        }
                    }
                    Ok(())
                }
            });
            // The stream ends on errors and timeouts (the request timeout bounds every call):
            // watch again; the scan covers the gap.
            let _ = watched;
            if wake.send(()).is_err() {
                return;
            }
        }
    }

    /// Releases the ownership of a VM that went Off or Saved here (not one being moved).
    fn release_on_stop(&self) {
        let events = self.service.subscribe();
        while let Ok(event) = events.recv() {
            if let EventKind::StateChanged { current, .. } = event.kind
                && matches!(current, EnabledState::Off | EnabledState::Saved)
                && self.node.token(event.vm).is_some()
                && !self.is_moving(event.vm)
            {
                // A worker that failed and is being restarted shows Off only after its recovery
                // gave up; a restart keeps the VM Running/Starting, so this is a real stop.
                let _ = self.node.release(event.vm);
            }
        }
    }

    fn is_moving(&self, vm: VmId) -> bool {
        self.moving
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&vm)
    }

    /// Carries out move requests for VMs this node owns.
    fn handle_moves(&self) -> Result<()> {
        let keys = self.node.keys();
        for (name, value) in ownership::list(self.node.etcd(), &keys.moves())? {
            let (Ok(vm), Ok(request)) = (
                name.parse::<VmId>(),
                serde_json::from_str::<MoveRequest>(&value),
            ) else {
                continue;
            };
            if self.node.token(vm).is_none() {
                continue;
            }
            let _ = ownership::remove(self.node.etcd(), &keys.move_request(vm));
            if request.to == self.node.name() {
                self.record_status(
                    vm,
                    &request,
                    None,
                    Some("already on the target node".into()),
                );
                continue;
            }
            let agent = self.clone();
            let _ = thread::Builder::new()
                .name("cluster-move".into())
                .spawn(move || agent.move_out(vm, request));
        }
        Ok(())
    }

    /// Source side of a move: save, then hand the ownership to the target in one transaction.
    fn move_out(&self, vm: VmId, request: MoveRequest) {
        self.moving
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(vm);
        let outcome = self.save_and_hand_off(vm, &request);
        self.moving
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&vm);
        if let Err(error) = outcome {
            self.record_status(vm, &request, None, Some(error.to_string()));
        }
    }

    fn save_and_hand_off(&self, vm: VmId, request: &MoveRequest) -> Result<()> {
        let paused_ms = unix_ms();
        let (code, job) = self
            .service
            .request_state_change(vm, RequestedState::Save)?;
        let job = match (code, job) {
            (ReturnCode::JobStarted, Some(job)) => job,
            (code, _) => {
                return Err(ClusterError::Service(format!(
                    "save refused with return code {}",
                    code.code()
                )));
            }
        };
        let job = self.service.wait_for_job(job, MOVE_STEP)?;
        if job.state != JobState::Completed {
            return Err(ClusterError::Service(format!("save ended {:?}", job.state)));
        }
        let token = self.node.check(vm)?;
        let handoff = Handoff {
            request: request.clone(),
            from: self.node.name().to_owned(),
            paused_ms,
        };
        let value = serde_json::to_string(&handoff)
            .map_err(|e| ClusterError::Protocol(format!("handoff: {e}")))?;
        let keys = self.node.keys();
        ownership::guarded(
            self.node.etcd(),
            keys,
            vm,
            token,
            vec![
                TxnOp::delete(keys.owner(vm), None),
                TxnOp::put(keys.handoff(vm), value, None::<PutOptions>),
            ],
        )?;
        self.node.forget(vm);
        Ok(())
    }

    /// Target side of a move: take the VM handed to this node and restore it.
    fn handle_handoffs(&self) -> Result<()> {
        let keys = self.node.keys();
        for (name, value) in ownership::list(self.node.etcd(), &keys.handoffs())? {
            let (Ok(vm), Ok(handoff)) = (
                name.parse::<VmId>(),
                serde_json::from_str::<Handoff>(&value),
            ) else {
                continue;
            };
            if handoff.request.to != self.node.name() {
                continue;
            }
            let _ = ownership::remove(self.node.etcd(), &keys.handoff(vm));
            let outcome = self.move_in(vm);
            match outcome {
                Ok(()) => {
                    let downtime = unix_ms().saturating_sub(handoff.paused_ms);
                    self.record_status(vm, &handoff.request, Some(downtime), None);
                }
                Err(error) => {
                    self.record_status(vm, &handoff.request, None, Some(error.to_string()))
                }
            }
        }
        Ok(())
    }

    fn move_in(&self, vm: VmId) -> Result<()> {
        if !self.service.refresh_vm(vm) {
            return Err(ClusterError::Service(format!("{vm} is not in the store")));
        }
        self.node.acquire(vm)?;
        let (code, job) = self
            .service
            .request_state_change(vm, RequestedState::Start)?;
        let Some(job) = job.filter(|_| code == ReturnCode::JobStarted) else {
            return Err(ClusterError::Service(format!(
                "start refused with return code {}",
                code.code()
            )));
        };
        let job = self.service.wait_for_job(job, MOVE_STEP)?;
        if job.state == JobState::Completed {
            Ok(())
        } else {
            Err(ClusterError::Service(format!(
                "start ended {:?}",
                job.state
            )))
        }
    }

    fn record_status(
        &self,
        vm: VmId,
        request: &MoveRequest,
        downtime_ms: Option<u64>,
        error: Option<String>,
    ) {
        let status = MoveStatus {
            request: request.clone(),
            from: self.node.name().to_owned(),
            downtime_ms,
            error,
        };
        if let Ok(value) = serde_json::to_string(&status) {
            let key = self.node.keys().move_status(vm);
            let _ = ownership::write(self.node.etcd(), &key, &value);
        }
    }
}
