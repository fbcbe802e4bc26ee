//! Errors of the cluster-resource crate.

use vmm_core::VmId;

/// What failed in the cluster layer.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No listed etcd endpoint answered within the retry budget.
    #[error("etcd unreachable ({endpoints}): {last}")]
    EtcdUnreachable {
        /// The endpoints tried.
        endpoints: String,
        /// The last error seen.
        last: String,
    },
    /// etcd answered with something this crate does not understand.
    #[error("unexpected etcd answer: {0}")]
    Protocol(String),
    /// The node's lease is not current (expired, or not renewed in time): it may not act.
    #[error("node lease is not current")]
    LeaseNotCurrent,
    /// Another node owns the virtual machine.
    #[error("virtual machine {vm} is owned by node {owner}")]
    OwnedElsewhere {
        /// The VM.
        vm: VmId,
        /// Its owner.
        owner: String,
    },
    /// This node's ownership of the virtual machine is gone (its fencing token is stale).
    #[error("ownership of virtual machine {0} was lost (stale fencing token)")]
    OwnershipLost(VmId),
    /// A request the service refused or a job that failed.
    #[error("virtual machine service: {0}")]
    Service(String),
    /// Writing the fence file.
    #[error("cannot write the fence file of {vm}")]
    Fence {
        /// The VM.
        vm: VmId,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A runtime or thread could not be started.
    #[error("cannot start {what}")]
    Start {
        /// What.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An operation did not finish within its pending timeout.
    #[error("{what} did not finish within {seconds} s")]
    PendingTimeout {
        /// The operation.
        what: &'static str,
        /// The timeout.
        seconds: u64,
    },
    /// Bad input (an option, a parameter).
    #[error("invalid {what}: {why}")]
    Invalid {
        /// What.
        what: &'static str,
        /// Why.
        why: String,
    },
}

/// Result of this crate.
pub type Result<T, E = ClusterError> = std::result::Result<T, E>;

impl From<vmm_core::Error> for ClusterError {
    fn from(error: vmm_core::Error) -> Self {
        ClusterError::Service(vmm_core::error_chain(&error))
    }
}
