//! Cluster verbs: `get-cluster-node` (nodes, their leases and etcd's health) and `move-vm NAME
//! --to NODE` (quick migration: saved on its owner, restored on the target; prints the guest's
//! downtime). Both read the node store's `cluster.json` (written by `serve --cluster`) to find
//! etcd; `--store` is the node's folder, `<shared store>/nodes/<name>`.

use std::time::{Duration, Instant};

use cluster_resource::{
    ClusterOptions, Etcd, EtcdTimeouts, MoveRequest, MoveStatus, NodeRecord, ownership,
    ownership::Keys, unix_ms,
};
use serde::Serialize;

use crate::api::ApiError;
use crate::cli::{Cli, CliError, Output};
use crate::cluster_node::read_cluster_file;

/// `vmms serve` flags of cluster mode.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// Run as a node of the cluster whose etcd endpoints these are (comma-separated
    /// `host:port`). The store is then shared by every node.
    #[arg(long, requires = "node")]
    pub cluster: Option<String>,
    /// This node's name in the cluster.
    #[arg(long, requires = "cluster")]
    pub node: Option<String>,
    /// Seconds of the node's lease: a node not heard of for this long loses its VMs.
    #[arg(long, default_value_t = 3)]
    pub lease_ttl: u64,
    /// Prefix of the cluster's keys in etcd.
    #[arg(long, default_value = cluster_resource::ownership::DEFAULT_PREFIX)]
    pub cluster_prefix: String,
}

impl ClusterArgs {
    /// The cluster options, when `--cluster` is given.
    pub fn options(&self) -> Option<ClusterOptions> {
        Some(crate::cluster_node::options(
            self.cluster.clone()?,
            self.node.clone()?,
            self.lease_ttl,
            self.cluster_prefix.clone(),
        ))
    }
}

/// One row of `get-cluster-node`.
#[derive(Debug, Serialize)]
struct NodeView {
    node: String,
    lease: String,
    ttl_s: i64,
    remaining_s: i64,
    pid: u32,
    owned_vms: usize,
}

/// One etcd endpoint's health.
#[derive(Debug, Serialize)]
struct EndpointView {
    endpoint: String,
    healthy: bool,
    detail: String,
}

#[derive(Debug, Serialize)]
struct ClusterView {
    nodes: Vec<NodeView>,
    etcd: Vec<EndpointView>,
}

fn connect(cli: &Cli<'_>) -> Result<(Etcd, Keys, String), CliError> {
    let file = read_cluster_file(cli.store).ok_or_else(|| {
        fail(
            cli,
            format!(
                "{} is not a cluster node's store (no cluster.json); use --store <store>/nodes/<node>",
                cli.store.display()
            ),
        )
    })?;
    let etcd = Etcd::new(&file.endpoints, EtcdTimeouts::default()).map_err(|e| fail(cli, e))?;
    Ok((etcd, Keys::new(&file.prefix), file.node))
}

fn fail(cli: &Cli<'_>, error: impl ToString) -> CliError {
    CliError {
        verb: cli.verb,
        target: cli.target.clone(),
        error: ApiError::new(error.to_string()),
    }
}

/// `get-cluster-node`.
pub fn get_cluster_node(cli: &Cli<'_>) -> Result<(), CliError> {
    let (etcd, keys, _) = connect(cli)?;
    let owners = ownership::owners(&etcd, &keys).map_err(|e| fail(cli, e))?;
    let mut nodes = Vec::new();
    for (_, value) in ownership::list(&etcd, &keys.nodes()).map_err(|e| fail(cli, e))? {
        let Ok(record) = serde_json::from_str::<NodeRecord>(&value) else {
            continue;
        };
        let lease = record.lease;
        let remaining = etcd
            .call(|mut c| async move { c.lease_time_to_live(lease, None).await })
            .map_or(-1, |r| r.ttl());
        nodes.push(NodeView {
            owned_vms: owners.values().filter(|o| o.node == record.node).count(),
            node: record.node,
            lease: format!("{lease:x}"),
            ttl_s: record.ttl_s,
            remaining_s: remaining,
            pid: record.pid,
        });
    }
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    let etcd_view = etcd
        .health()
        .into_iter()
        .map(|(endpoint, result)| match result {
            Ok((leader, index)) => EndpointView {
                endpoint,
                healthy: true,
                detail: format!("leader {leader:x}, raft index {index}"),
            },
            Err(error) => EndpointView {
                endpoint,
                healthy: false,
                detail: error,
            },
        })
        .collect();
    let view = ClusterView {
        nodes,
        etcd: etcd_view,
    };
    match cli.output {
        Output::Json => out!(
            "{}",
            serde_json::to_string_pretty(&view).map_err(|e| fail(cli, e))?
        ),
        Output::Table => {
            out!(
                "{:<16} {:<18} {:>6} {:>10} {:>8} {:>4}",
                "Node",
                "Lease",
                "TTL",
                "Remaining",
                "PID",
                "VMs"
            );
            for n in &view.nodes {
                out!(
                    "{:<16} {:<18} {:>6} {:>10} {:>8} {:>4}",
                    n.node,
                    n.lease,
                    n.ttl_s,
                    n.remaining_s,
                    n.pid,
                    n.owned_vms
                );
            }
            for e in &view.etcd {
                let health = if e.healthy { "healthy" } else { "unhealthy" };
                out!("etcd {} {health}: {}", e.endpoint, e.detail);
            }
        }
    }
    Ok(())
}

/// `move-vm NAME --to NODE`: asks the owner to save the VM and hand it to `to`, then waits for
/// the target to report it running.
pub fn move_vm(cli: &Cli<'_>, to: &str, timeout: Duration) -> Result<(), CliError> {
    let vm = cli.find()?;
    let (etcd, keys, _) = connect(cli)?;
    let target_known = ownership::read(&etcd, &keys.node(to))
        .map_err(|e| fail(cli, e))?
        .is_some();
    if !target_known {
        return Err(fail(cli, format!("no live node named {to}")));
    }
    let owner = ownership::owner(&etcd, &keys, vm.id).map_err(|e| fail(cli, e))?;
    let Some(owner) = owner else {
        return Err(fail(cli, "the VM is not running on any node"));
    };
    let request = MoveRequest {
        to: to.to_owned(),
        id: unix_ms(),
    };
    let value = serde_json::to_string(&request).map_err(|e| fail(cli, e))?;
    ownership::write(&etcd, &keys.move_request(vm.id), &value).map_err(|e| fail(cli, e))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        let found = ownership::read(&etcd, &keys.move_status(vm.id))
            .ok()
            .flatten()
            .and_then(|v| serde_json::from_str::<MoveStatus>(&v).ok())
            .filter(|s| s.request == request);
        if let Some(status) = found {
            break status;
        }
        if Instant::now() >= deadline {
            return Err(fail(
                cli,
                format!("the move did not finish within {timeout:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if let Some(error) = &status.error {
        return Err(fail(cli, format!("move failed: {error}")));
    }
    let downtime = status.downtime_ms.unwrap_or_default();
    match cli.output {
        Output::Json => out!(
            "{}",
            serde_json::json!({
                "vm": vm.id, "name": vm.name, "from": owner.node, "to": to, "downtime_ms": downtime
            })
        ),
        Output::Table => out!(
            "moved {} from {} to {to}; guest downtime {downtime} ms",
            vm.name,
            owner.node
        ),
    }
    Ok(())
}
