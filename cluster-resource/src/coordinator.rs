//! A daemon as a cluster node: its lease, the VMs it owns and their fencing tokens, the
//! [`ClusterCoordinator`] vmm-core asks before writing, and the launcher that starts a worker
//! only for a VM this node owns.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use vmm_core::{
    ClusterCoordinator, EventSink, FENCE_FILE, LaunchMode, VmConfig, VmId, Worker, WorkerError,
    WorkerLauncher, atomic_file, error_chain,
};

use crate::error::{ClusterError, Result};
use crate::etcd::{Etcd, EtcdTimeouts};
use crate::node::NodeLease;
use crate::ownership::{self, Keys};

/// How a daemon joins a cluster (`vmms serve --cluster … --node …`).
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// etcd endpoints, comma-separated.
    pub endpoints: String,
    /// This node's name (unique in the cluster).
    pub node: String,
    /// Lease TTL (default 3 s).
    pub ttl: Duration,
    /// Key prefix (default `/vmms`).
    pub prefix: String,
}

/// How long a launch waits for the previous owner's worker to let go of the disks.
const DISK_RELEASE_WAIT: Duration = Duration::from_secs(15);

/// This daemon as a member of the cluster.
#[derive(Debug)]
pub struct ClusterNode {
    etcd: Arc<Etcd>,
    keys: Keys,
    lease: Arc<NodeLease>,
    /// `<store>/vms`: where the fence files are.
    vms_dir: PathBuf,
    /// Fencing tokens of the VMs this node owns under its current lease.
    owned: Mutex<HashMap<VmId, i64>>,
    /// Set while self-fenced (lease not current): nothing is started or written.
    fenced: AtomicBool,
}

impl ClusterNode {
    /// Connects to etcd, registers the node under a new lease and keeps it alive.
    pub fn join(options: &ClusterOptions, vms_dir: PathBuf) -> Result<Arc<Self>> {
        if options.node.is_empty() || options.node.contains(['/', ' ']) {
            return Err(ClusterError::Invalid {
                what: "node name",
                why: format!(
                    "{:?} must be non-empty, without '/' or spaces",
                    options.node
                ),
            });
        }
        let etcd = Arc::new(Etcd::new(&options.endpoints, EtcdTimeouts::default())?);
        let keys = Keys::new(&options.prefix);
        let lease =
            NodeLease::register(Arc::clone(&etcd), keys.clone(), &options.node, options.ttl)?;
        lease.keep_alive()?;
        Ok(Arc::new(ClusterNode {
            etcd,
            keys,
            lease,
            vms_dir,
            owned: Mutex::new(HashMap::new()),
            fenced: AtomicBool::new(false),
        }))
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        self.lease.name()
    }

    /// The etcd connection.
    pub fn etcd(&self) -> &Etcd {
        &self.etcd
    }

    /// The key layout.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The node's lease.
    pub fn lease(&self) -> &NodeLease {
        &self.lease
    }

    /// The fencing token this node holds for `vm`, if it owns it.
    pub fn token(&self, vm: VmId) -> Option<i64> {
        self.owned().get(&vm).copied()
    }

    /// The VMs this node owns.
    pub fn owned_vms(&self) -> Vec<VmId> {
        self.owned().keys().copied().collect()
    }

    fn owned(&self) -> std::sync::MutexGuard<'_, HashMap<VmId, i64>> {
        self.owned.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the node is self-fenced now.
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    /// Self-fencing: forget every token (they are about to be, or are, stale) and refuse every
    /// start and write until [`unfence`](Self::unfence).
    pub fn fence(&self) -> Vec<VmId> {
        self.fenced.store(true, Ordering::SeqCst);
        self.lease.abandon();
        self.owned().drain().map(|(vm, _)| vm).collect()
    }

    /// Ends self-fencing once a new lease is current.
    pub fn unfence(&self) {
        self.fenced.store(false, Ordering::SeqCst);
    }

    /// Campaigns for `vm`: its fencing token if this node owns it now (won, or already held
    /// under the current lease); [`ClusterError::OwnedElsewhere`] if another node does.
    pub fn acquire(&self, vm: VmId) -> Result<i64> {
        if self.is_fenced() {
            return Err(ClusterError::LeaseNotCurrent);
        }
        let lease = self.lease.current().ok_or(ClusterError::LeaseNotCurrent)?;
        let owner = ownership::campaign(&self.etcd, &self.keys, vm, self.name(), lease)?;
        if owner.node == self.name() && owner.lease == lease {
            self.owned().insert(vm, owner.token);
            Ok(owner.token)
        } else {
            Err(ClusterError::OwnedElsewhere {
                vm,
                owner: owner.node,
            })
        }
    }

    /// Gives up `vm` (a guarded delete of its ownership key).
    pub fn release(&self, vm: VmId) -> Result<()> {
        let token = self.owned().remove(&vm);
        match token {
            Some(token) if self.lease.current().is_some() => {
                ownership::release(&self.etcd, &self.keys, vm, token)
            }
            _ => Ok(()),
        }
    }

    /// Forgets `vm` without touching etcd (it was taken over or handed off).
    pub fn forget(&self, vm: VmId) {
        self.owned().remove(&vm);
    }

    /// Checks the token of `vm` in etcd (a guarded empty transaction).
    pub fn check(&self, vm: VmId) -> Result<i64> {
        if self.is_fenced() || self.lease.current().is_none() {
            return Err(ClusterError::LeaseNotCurrent);
        }
        let token = self.token(vm).ok_or(ClusterError::OwnershipLost(vm))?;
        match ownership::guarded(&self.etcd, &self.keys, vm, token, Vec::new()) {
            Err(ClusterError::OwnershipLost(_)) => {
                self.forget(vm);
                Err(ClusterError::OwnershipLost(vm))
            }
            other => other.map(|()| token),
        }
    }

    /// Writes `token` to the VM's fence file, after checking it is current: from then on a
    /// worker started under an older token stops itself.
    pub fn write_fence(&self, vm: VmId, token: i64) -> Result<()> {
        if self.check(vm)? != token {
            return Err(ClusterError::OwnershipLost(vm));
        }
        let path = self.vms_dir.join(vm.to_string()).join(FENCE_FILE);
        atomic_file::write_atomic(&path, token.to_string().as_bytes())
            .map_err(|source| ClusterError::Fence { vm, source })
    }
}

impl ClusterCoordinator for ClusterNode {
    fn guard_write(&self, vm: VmId) -> std::result::Result<(), String> {
        if self.is_fenced() {
            return Err("node is self-fenced (lease not current)".into());
        }
        let lease = self
            .lease
            .current()
            .ok_or_else(|| "node lease is not current".to_owned())?;
        if self.token(vm).is_some() {
            return self.check(vm).map(drop).map_err(|e| e.to_string());
        }
        match ownership::owner(&self.etcd, &self.keys, vm) {
            Ok(None) => Ok(()),
            Ok(Some(owner)) if owner.node == self.name() && owner.lease == lease => {
                self.owned().insert(vm, owner.token);
                Ok(())
            }
            Ok(Some(owner)) => Err(format!("owned by node {}", owner.node)),
            Err(error) => Err(error.to_string()),
        }
    }
}

/// A [`WorkerLauncher`] that starts a worker only for a VM this node owns: it campaigns for the
/// VM, writes the fencing token to the VM's fence file (so any older worker stops itself), then
/// launches, waiting while the previous owner's worker still holds the disks.
#[derive(Debug)]
pub struct FencedLauncher {
    node: Arc<ClusterNode>,
    inner: Arc<dyn WorkerLauncher>,
}

impl FencedLauncher {
    /// Wraps `inner` (worker-manager's process launcher).
    pub fn new(node: Arc<ClusterNode>, inner: Arc<dyn WorkerLauncher>) -> Self {
        FencedLauncher { node, inner }
    }
}

impl WorkerLauncher for FencedLauncher {
    fn launch(
        &self,
        vm: &VmConfig,
        mode: LaunchMode,
        events: EventSink,
    ) -> std::result::Result<Box<dyn Worker>, WorkerError> {
        self.launch_handing_off(vm, mode, events, &mut || {})
    }

    fn launch_handing_off(
        &self,
        vm: &VmConfig,
        mode: LaunchMode,
        events: EventSink,
        handed_off: &mut dyn FnMut(),
    ) -> std::result::Result<Box<dyn Worker>, WorkerError> {
        let refused = |e: ClusterError| WorkerError::Refused {
            reason: e.to_string(),
        };
        let token = self.node.acquire(vm.id).map_err(refused)?;
        self.node.write_fence(vm.id, token).map_err(refused)?;
        let deadline = Instant::now() + DISK_RELEASE_WAIT;
        loop {
            match self
                .inner
                .launch_handing_off(vm, mode.clone(), events.clone(), handed_off)
            {
                Err(error)
                    if error_chain(&error).contains("locked")
                        && Instant::now() < deadline
                        && self.node.token(vm.id) == Some(token) =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                other => return other,
            }
        }
    }

    fn reattach(
        &self,
        vm: VmId,
        events: EventSink,
    ) -> std::result::Result<Option<Box<dyn Worker>>, WorkerError> {
        self.inner.reattach(vm, events)
    }
}
