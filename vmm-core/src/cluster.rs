//! The seam to a cluster (Hyper-V's Cluster Resource Control, HVCLUSRES.DLL): who may write a
//! virtual machine's files.
//!
//! In a cluster every node sees one shared store, but a VM's files may be written only by the
//! node that owns the VM now. A [`ClusterCoordinator`] (the cluster-resource crate implements it
//! on etcd, with the ownership key's create revision as fencing token) is asked before every
//! write the service makes about a VM; a refusal fails that write with
//! [`PermissionDenied`](std::io::ErrorKind::PermissionDenied), so the operation fails and nothing
//! is written. Without a coordinator (one host, one store) every write is allowed, as before.

use std::fmt::Debug;

use crate::config::VmId;

/// File in a VM's folder holding the fencing token of the owner that last started a worker for
/// it (decimal). A worker started under an older token stops itself when it sees a newer one.
pub const FENCE_FILE: &str = "fence";

/// Decides whether this node may write a virtual machine's files now.
pub trait ClusterCoordinator: Send + Sync + Debug {
    /// Allows a write about `vm` (its configuration, saved state, markers, folder) or says why
    /// not. Called before each write, outside the service's locks; it may ask the cluster.
    fn guard_write(&self, vm: VmId) -> Result<(), String>;
}
