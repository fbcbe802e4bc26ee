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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::VmConfig;
    use crate::store::Store;

    /// Allows writes about one VM only.
    #[derive(Debug)]
    struct OwnsOnly(VmId);

    impl ClusterCoordinator for OwnsOnly {
        fn guard_write(&self, vm: VmId) -> Result<(), String> {
            if vm == self.0 {
                Ok(())
            } else {
                Err("owned by node b".into())
            }
        }
    }

    #[test]
    fn writes_about_a_vm_another_node_owns_are_refused_and_change_nothing() {
        let root = tempfile::tempdir().expect("temp dir");
        let mine = VmConfig::new("mine");
        let theirs = VmConfig::new("theirs");
        Store::open(root.path())
            .and_then(|s| s.create_vm(&mine).and_then(|()| s.create_vm(&theirs)))
            .expect("vms");
        let store = Store::open_with(root.path(), Some(Arc::new(OwnsOnly(mine.id))))
            .expect("clustered store");
        let before = std::fs::read(store.config_path(theirs.id)).expect("config");

        let renamed = VmConfig {
            name: "renamed".into(),
            ..theirs.clone()
        };
        let refused = store.write_config(&renamed);
        let marker = store.set_running_marker(theirs.id, true);

        assert!(matches!(refused, Err(crate::Error::Io { source, .. })
            if source.kind() == std::io::ErrorKind::PermissionDenied));
        assert!(marker.is_err());
        assert_eq!(
            std::fs::read(store.config_path(theirs.id)).expect("config"),
            before
        );
        assert!(store.set_running_marker(mine.id, true).is_ok());
    }
}
