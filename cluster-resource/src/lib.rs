//! Hyper-V's Cluster Resource Control (the "Virtual Machine" resource type behind
//! HVCLUSRES.DLL) rebuilt on an existing distributed engine, etcd.
//!
//! - [`ClusterResource`]: the resource contract (online, offline, terminate, looks-alive,
//!   is-alive, pending states and timeouts); [`VmResource`] implements it for one VM of a
//!   vmm-core service, with the VM resource's properties ([`OfflineAction`]).
//! - [`ClusterNode`]: a daemon as a cluster member — a lease kept alive in the background, VM
//!   ownership keys bound to it whose create revision is the fencing token, every write about an
//!   owned VM guarded by a transaction on that token (it implements vmm-core's
//!   [`ClusterCoordinator`](vmm_core::ClusterCoordinator)), and [`FencedLauncher`], which starts
//!   a worker only for an owned VM after writing its token to the VM's fence file.
//! - [`Agent`]: self-fencing, failover of VMs whose owner's lease expired, planned moves.
//! - [`ocf`]: the OCF resource agent contract for Pacemaker (the `vmms-ocf` binary).
//! - [`Etcd`]: a blocking etcd client that moves to the next endpoint when one is down.

mod coordinator;
mod error;
mod etcd;
mod failover;
mod node;
pub mod ocf;
pub mod ownership;
mod resource;
mod vm_resource;

pub use coordinator::{ClusterNode, ClusterOptions, FencedLauncher};
pub use error::{ClusterError, Result};
pub use etcd::{EndpointHealth, Etcd, EtcdTimeouts};
pub use failover::{Agent, Handoff, MoveRequest, MoveStatus, SCAN};
pub use node::{NodeLease, NodeRecord, unix_ms};
pub use resource::{ClusterResource, Progress, ResourceState, ResourceTimeouts, wait_pending};
pub use vm_resource::{OfflineAction, VmResource, VmResourceProperties, resource_state};
