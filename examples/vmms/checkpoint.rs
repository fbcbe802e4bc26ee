//! Checkpoint verbs (Hyper-V's `Checkpoint-VM`, `Get-VMCheckpoint`, `Restore-VMCheckpoint`,
//! `Remove-VMCheckpoint`, `Rename-VMCheckpoint`, `Export-VM`, `Import-VM`): the CLI side, the
//! request they send, and the daemon side that runs them on vmm-core's service.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use vmm_core::checkpoint::{Checkpoint, CheckpointTree, CreateRequest, ExportMode, ImportMode};
use vmm_core::{Job, JobId, VirtualSystemManagementService, VmId};

use crate::api::{ApiError, Client, Request, StateChange, describe_code};
use crate::cli::{Cli, CliError, Output};

/// The checkpoint verbs.
#[derive(Debug, clap::Subcommand)]
pub enum CheckpointVerb {
    /// Take a checkpoint of a VM (running, paused, off or saved).
    CheckpointVm {
        /// The VM.
        target: String,
        /// The checkpoint's name (default: Hyper-V's "<VM> (date - time)").
        #[arg(long)]
        name: Option<String>,
        /// standard, production (falls back to standard) or production-only.
        #[arg(long = "type", default_value = "standard")]
        kind: String,
    },
    /// Show a VM's checkpoint tree and where "Now" is.
    GetVmCheckpoint {
        /// The VM.
        target: String,
    },
    /// Apply a checkpoint to an Off or Saved VM (a standard checkpoint leaves it Saved).
    RestoreVmCheckpoint {
        /// The VM.
        target: String,
        /// The checkpoint: its name or id.
        checkpoint: String,
    },
    /// Delete a checkpoint, merging its disk layers.
    RemoveVmCheckpoint {
        /// The VM.
        target: String,
        /// The checkpoint: its name or id.
        checkpoint: String,
        /// Delete everything below it too.
        #[arg(long)]
        include_children: bool,
    },
    /// Rename a checkpoint.
    RenameVmCheckpoint {
        /// The VM.
        target: String,
        /// The checkpoint: its name or id.
        checkpoint: String,
        /// The new name.
        new_name: String,
    },
    /// Export an Off or Saved VM with its checkpoints into a new folder.
    ExportVm {
        /// The VM.
        target: String,
        /// The folder to create.
        #[arg(long)]
        to: PathBuf,
        /// One flattened image per disk and no checkpoints.
        #[arg(long)]
        flatten: bool,
    },
    /// Import an exported VM into this store.
    ImportVm {
        /// The export folder.
        from: PathBuf,
        /// Give the VM a new id (keep the exported id otherwise).
        #[arg(long)]
        copy: bool,
    },
}

/// What the CLI asks the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum CheckpointCall {
    Create {
        target: String,
        name: Option<String>,
        kind: String,
    },
    List {
        target: String,
    },
    Apply {
        target: String,
        checkpoint: String,
    },
    Remove {
        target: String,
        checkpoint: String,
        include_children: bool,
    },
    Rename {
        target: String,
        checkpoint: String,
        new_name: String,
    },
    Export {
        target: String,
        to: PathBuf,
        flatten: bool,
    },
    Import {
        from: PathBuf,
        copy: bool,
    },
}

/// One checkpoint as `get-vm-checkpoint -o json` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointView {
    pub id: String,
    pub name: String,
    pub parent: Option<String>,
    /// `standard`, `production` or `production-only` (what was asked for).
    #[serde(rename = "type")]
    pub kind: String,
    /// What was taken: `off`, `saved-state`, `standard-fallback` or `production`
    /// (application-consistent disks, no saved state).
    pub consistency: String,
    /// Whether it holds a saved state (applying it leaves the VM Saved, else Off).
    #[serde(default)]
    pub has_saved_state: bool,
    /// For `standard-fallback`: why the guest could not be quiesced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiesce_failure: Option<String>,
    pub created: SystemTime,
    /// Whether "Now" descends from this checkpoint (it or one of its children is "Now"'s
    /// parent chain).
    pub now_descends: bool,
    /// Whether this is "Now"'s direct parent.
    pub is_now_parent: bool,
}

/// The answer to `get-vm-checkpoint`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointList {
    pub vm: VmId,
    pub name: String,
    pub now: Option<String>,
    pub checkpoints: Vec<CheckpointView>,
}

impl CheckpointList {
    fn new(vm: VmId, name: String, tree: &CheckpointTree) -> Self {
        let mut chain = Vec::new();
        let mut at = tree.now;
        while let Some(id) = at {
            chain.push(id);
            at = tree.get(id).and_then(|c| c.parent);
        }
        let checkpoints = tree
            .checkpoints
            .iter()
            .map(|c| view(c, chain.contains(&c.id), tree.now == Some(c.id)))
            .collect();
        CheckpointList {
            vm,
            name,
            now: tree.now.map(|id| id.to_string()),
            checkpoints,
        }
    }
}

fn view(c: &Checkpoint, now_descends: bool, is_now_parent: bool) -> CheckpointView {
    use vmm_core::checkpoint::{CheckpointType, Consistency};
    CheckpointView {
        id: c.id.to_string(),
        name: c.name.clone(),
        parent: c.parent.map(|p| p.to_string()),
        kind: match c.requested_type {
            CheckpointType::Standard => "standard",
            CheckpointType::Production => "production",
            CheckpointType::ProductionOnly => "production-only",
        }
        .into(),
        consistency: match c.consistency {
            Consistency::Off => "off",
            Consistency::SavedState => "saved-state",
            Consistency::StandardFallback => "standard-fallback",
            Consistency::Production => "production",
        }
        .into(),
        has_saved_state: c.has_saved_state,
        quiesce_failure: c.quiesce_failure.clone(),
        created: c.created,
        now_descends,
        is_now_parent,
    }
}

/// The daemon side: runs `call` on the service. `resolve` turns a VM name or GUID into its id.
pub fn serve(
    vmms: &VirtualSystemManagementService,
    resolve: impl Fn(&str) -> Result<VmId, ApiError>,
    call: CheckpointCall,
) -> Result<serde_json::Value, ApiError> {
    let started = |target: &str, (code, job): (vmm_core::ReturnCode, Option<JobId>)| {
        let id = resolve(target)?;
        let name = vmms.get_vm(id).map_err(api)?.name;
        to_json(&StateChange {
            vm: id,
            name,
            code: code.code(),
            job,
        })
    };
    match call {
        CheckpointCall::Create { target, name, kind } => {
            let id = resolve(&target)?;
            let checkpoint_type = kind.parse().map_err(|e| api(vmm_core::Error::from(e)))?;
            let request = CreateRequest {
                name,
                checkpoint_type,
            };
            started(&target, vmms.create_snapshot(id, request).map_err(api)?)
        }
        CheckpointCall::List { target } => {
            let id = resolve(&target)?;
            let name = vmms.get_vm(id).map_err(api)?.name;
            let tree = vmms.snapshots(id).map_err(api)?;
            to_json(&CheckpointList::new(id, name, &tree))
        }
        CheckpointCall::Apply { target, checkpoint } => {
            let id = resolve(&target)?;
            started(&target, vmms.apply_snapshot(id, &checkpoint).map_err(api)?)
        }
        CheckpointCall::Remove {
            target,
            checkpoint,
            include_children,
        } => {
            let id = resolve(&target)?;
            let begun = vmms
                .destroy_snapshot(id, &checkpoint, include_children)
                .map_err(api)?;
            started(&target, begun)
        }
        CheckpointCall::Rename {
            target,
            checkpoint,
            new_name,
        } => {
            let id = resolve(&target)?;
            vmms.rename_snapshot(id, &checkpoint, &new_name)
                .map_err(api)?;
            Ok(serde_json::Value::Null)
        }
        CheckpointCall::Export {
            target,
            to,
            flatten,
        } => {
            let id = resolve(&target)?;
            let mode = if flatten {
                ExportMode::Flattened
            } else {
                ExportMode::Chained
            };
            started(&target, vmms.export_system(id, to, mode).map_err(api)?)
        }
        CheckpointCall::Import { from, copy } => {
            let mode = if copy {
                ImportMode::NewId
            } else {
                ImportMode::SameId
            };
            let id = vmms.import_system(&from, mode).map_err(api)?;
            to_json(&id)
        }
    }
}

fn to_json<T: Serialize>(value: &T) -> Result<serde_json::Value, ApiError> {
    serde_json::to_value(value).map_err(|e| ApiError::new(e.to_string()))
}

fn api(error: vmm_core::Error) -> ApiError {
    ApiError::with_code(
        vmm_core::return_code(&error).code(),
        vmm_core::error_chain(&error),
    )
}

/// The CLI side of one checkpoint verb.
pub fn run(store: &std::path::Path, output: Output, verb: CheckpointVerb) -> Result<(), CliError> {
    let (name, target, call) = match verb {
        CheckpointVerb::CheckpointVm { target, name, kind } => (
            "checkpoint-vm",
            target.clone(),
            CheckpointCall::Create { target, name, kind },
        ),
        CheckpointVerb::GetVmCheckpoint { target } => (
            "get-vm-checkpoint",
            target.clone(),
            CheckpointCall::List { target },
        ),
        CheckpointVerb::RestoreVmCheckpoint { target, checkpoint } => (
            "restore-vm-checkpoint",
            target.clone(),
            CheckpointCall::Apply { target, checkpoint },
        ),
        CheckpointVerb::RemoveVmCheckpoint {
            target,
            checkpoint,
            include_children,
        } => (
            "remove-vm-checkpoint",
            target.clone(),
            CheckpointCall::Remove {
                target,
                checkpoint,
                include_children,
            },
        ),
        CheckpointVerb::RenameVmCheckpoint {
            target,
            checkpoint,
            new_name,
        } => (
            "rename-vm-checkpoint",
            target.clone(),
            CheckpointCall::Rename {
                target,
                checkpoint,
                new_name,
            },
        ),
        CheckpointVerb::ExportVm {
            target,
            to,
            flatten,
        } => {
            // The daemon writes it: the path must not depend on this process's folder.
            let to = std::path::absolute(&to).unwrap_or(to);
            (
                "export-vm",
                target.clone(),
                CheckpointCall::Export {
                    target,
                    to,
                    flatten,
                },
            )
        }
        CheckpointVerb::ImportVm { from, copy } => {
            let from = std::path::absolute(&from).unwrap_or(from);
            (
                "import-vm",
                from.display().to_string(),
                CheckpointCall::Import { from, copy },
            )
        }
    };
    let cli = Cli {
        store,
        output,
        verb: name,
        target: Some(target),
    };
    let fail = |error: ApiError| CliError {
        verb: name,
        target: cli.target.clone(),
        error,
    };
    let mut client = cli.connect()?;
    let request = Request::Checkpoint { call: call.clone() };
    match call {
        CheckpointCall::List { .. } => {
            let list: CheckpointList = client.call(&request).map_err(fail)?;
            match output {
                Output::Json => crate::cli::print_json(&list),
                Output::Table => print_tree(&list),
            }
            Ok(())
        }
        CheckpointCall::Rename { .. } => client
            .call::<serde_json::Value>(&request)
            .map(drop)
            .map_err(fail),
        CheckpointCall::Import { .. } => {
            let id: VmId = client.call(&request).map_err(fail)?;
            match output {
                Output::Json => crate::cli::print_json(&id),
                Output::Table => out!("{id}"),
            }
            Ok(())
        }
        _ => {
            let change: StateChange = client.call(&request).map_err(fail)?;
            match (change.code, change.job) {
                (4096, Some(job)) => {
                    let job = follow(&mut client, job).map_err(fail)?;
                    if !job.state.is_success() {
                        return Err(fail(ApiError::with_code(
                            job.error_code,
                            job.error_description
                                .unwrap_or_else(|| describe_code(job.error_code).into()),
                        )));
                    }
                    // CompletedWithWarnings: e.g. a production checkpoint taken as standard.
                    if let Some(warning) = job.error_description {
                        eprintln!("warning: {warning}");
                    }
                    Ok(())
                }
                (0, _) => Ok(()),
                (code, _) => Err(fail(ApiError::with_code(code, describe_code(code)))),
            }
        }
    }
}

/// Waits for `job`; a progress bar on a terminal once it has run for a second.
fn follow(client: &mut Client, job: JobId) -> Result<Job, ApiError> {
    let terminal = std::io::stdout().is_terminal();
    let started = std::time::Instant::now();
    let mut bar: Option<ProgressBar> = None;
    loop {
        let current: Job = client.call(&Request::WaitJob {
            job,
            timeout_ms: if terminal { 100 } else { 10 * 60 * 1000 },
        })?;
        if current.state.is_terminal() {
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            return Ok(current);
        }
        if terminal && started.elapsed() >= Duration::from_secs(1) {
            let bar = bar.get_or_insert_with(|| {
                let bar = ProgressBar::new(100);
                bar.set_style(
                    ProgressStyle::with_template("{msg} [{bar:30}] {pos}% [{elapsed}]")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                bar.set_message(current.kind.description());
                bar
            });
            bar.set_position(u64::from(current.percent_complete));
        }
    }
}

/// The tree, children indented under their parents, "Now" marked where it hangs.
fn print_tree(list: &CheckpointList) {
    if list.checkpoints.is_empty() {
        out!("'{}' has no checkpoints", list.name);
        return;
    }
    let roots: Vec<&CheckpointView> = list
        .checkpoints
        .iter()
        .filter(|c| c.parent.is_none())
        .collect();
    for root in roots {
        print_node(list, root, 0);
    }
    if list.now.is_none() {
        out!("Now");
    }
}

fn print_node(list: &CheckpointList, node: &CheckpointView, depth: usize) {
    let indent = "  ".repeat(depth);
    out!(
        "{indent}{}  [{}, {}]  {}",
        node.name,
        node.kind,
        node.consistency,
        node.id
    );
    for child in list
        .checkpoints
        .iter()
        .filter(|c| c.parent.as_deref() == Some(node.id.as_str()))
    {
        print_node(list, child, depth + 1);
    }
    if node.is_now_parent {
        out!("{indent}  Now");
    }
}
