//! `vmms serve --cluster <etcd endpoints> --node <name>`: the daemon as a cluster node.
//!
//! All nodes share one store. A node keeps its own runtime in `<store>/nodes/<name>/` — its lock,
//! socket, event history, `run/` folder of worker runtimes and `backups/` — and sees the shared
//! `<store>/vms/` through a `vms` link there, so vmm-core and worker-manager work unchanged on
//! `<store>/nodes/<name>` as their store. The CLI of a node uses that folder as `--store`.
//! `<store>/nodes/<name>/cluster.json` tells the CLI where etcd is.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cluster_resource::{Agent, ClusterNode, ClusterOptions, ownership};
use serde::{Deserialize, Serialize};
use vmm_core::{VirtualSystemManagementService, VmId};

/// What `<node store>/cluster.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterFile {
    pub endpoints: String,
    pub node: String,
    pub prefix: String,
}

/// The file naming the cluster of a node store.
pub fn cluster_file(node_store: &Path) -> PathBuf {
    node_store.join("cluster.json")
}

/// Reads `cluster.json` of a node store, if it is one.
pub fn read_cluster_file(node_store: &Path) -> Option<ClusterFile> {
    let bytes = std::fs::read(cluster_file(node_store)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Makes `<store>/nodes/<node>` with its `vms` link to the shared `<store>/vms`, and writes its
/// `cluster.json`; returns the node's store.
pub fn prepare(store: &Path, options: &ClusterOptions) -> Result<PathBuf, String> {
    let shared_vms = store.join("vms");
    let node_store = store.join("nodes").join(&options.node);
    for dir in [&shared_vms, &node_store] {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let link = node_store.join("vms");
    match std::fs::read_link(&link) {
        Ok(target) if target == Path::new("../../vms") => {}
        Ok(_) | Err(_) if link.is_dir() && !link.is_symlink() => {
            return Err(format!(
                "{} is a folder: a node's store must link to the shared vms/",
                link.display()
            ));
        }
        _ => {
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink("../../vms", &link)
                .map_err(|e| format!("cannot link {}: {e}", link.display()))?;
        }
    }
    let file = ClusterFile {
        endpoints: options.endpoints.clone(),
        node: options.node.clone(),
        prefix: options.prefix.clone(),
    };
    let json = serde_json::to_vec_pretty(&file).map_err(|e| e.to_string())?;
    vmm_core::atomic_file::write_atomic(&cluster_file(&node_store), &json)
        .map_err(|e| format!("cannot write cluster.json: {e}"))?;
    Ok(node_store)
}

/// Joins the cluster (lease granted, kept alive).
pub fn join(node_store: &Path, options: &ClusterOptions) -> Result<Arc<ClusterNode>, String> {
    ClusterNode::join(options, node_store.join("vms"))
        .map_err(|e| format!("cannot join the cluster: {}", vmm_core::error_chain(&e)))
}

/// Starts the node's agent (self-fencing, failover, moves).
pub fn start_agent(
    node: &Arc<ClusterNode>,
    service: &VirtualSystemManagementService,
) -> Result<(), String> {
    Agent::start(Arc::clone(node), service.clone())
        .map(drop)
        .map_err(|e| format!("cannot start the cluster agent: {e}"))?;
    log!(
        "vmms: cluster node {} (lease TTL {:?}) on {}",
        node.name(),
        node.lease().ttl(),
        node.etcd().endpoints().join(",")
    );
    Ok(())
}

/// The owner node of `vm` for `get-vm` (this node without asking etcd when it holds the token).
pub fn owner(node: &ClusterNode, vm: VmId) -> Option<String> {
    if node.token(vm).is_some() {
        return Some(node.name().to_owned());
    }
    ownership::owner(node.etcd(), node.keys(), vm)
        .ok()
        .flatten()
        .map(|o| o.node)
}

/// Parses `--lease-ttl`.
pub fn options(endpoints: String, node: String, ttl_s: u64, prefix: String) -> ClusterOptions {
    ClusterOptions {
        endpoints,
        node,
        ttl: Duration::from_secs(ttl_s),
        prefix,
    }
}
