//! Backup verbs (Windows Server Backup / a backup application driving Hyper-V's VSS writer):
//! `backup-vm`, `get-vm-backup`, `test-vm-backup`, `restore-vm-backup`. The CLI side, the
//! request they send, and the daemon side that runs them on vmm-core's service.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use vmm_core::backup::{BackupRequest, BackupSetInfo, FreezePolicy, RestoreTarget};
use vmm_core::{Job, JobId, VirtualSystemManagementService, VmId};

use crate::api::{ApiError, Client, Request, StateChange, describe_code};
use crate::cli::{Cli, CliError, Output};

/// The backup verbs.
#[derive(Debug, clap::Subcommand)]
pub enum BackupVerb {
    /// Back a VM up into a new folder while it runs (app-consistent when its guest agent
    /// answers, crash-consistent otherwise).
    BackupVm {
        /// The VM.
        target: String,
        /// The set's folder (must not exist). An incremental must sit next to the last set.
        #[arg(long)]
        to: PathBuf,
        /// Copy only what changed since the VM's last backup (full when that is not known).
        #[arg(long)]
        incremental: bool,
        /// The longest the guest may stay frozen, in seconds.
        #[arg(long, default_value_t = 10.0)]
        freeze_limit: f64,
        /// Fail rather than take a crash-consistent backup when the guest cannot be frozen.
        #[arg(long)]
        require_app_consistent: bool,
    },
    /// Show what a backup set holds: VM, time, consistency, full or incremental, its chain.
    GetVmBackup {
        /// The set's folder.
        set: PathBuf,
    },
    /// Verify a backup set and the sets it builds on (every extent's checksum).
    TestVmBackup {
        /// The set's folder.
        set: PathBuf,
    },
    /// Restore a backup set: as a new VM with `--as`, else over the backed-up VM (which must be
    /// Off) or as that VM when it is gone.
    RestoreVmBackup {
        /// The set's folder.
        set: PathBuf,
        /// Restore as a new VM with this name (and a new id).
        #[arg(long = "as")]
        as_name: Option<String>,
    },
}

/// What the CLI asks the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum BackupCall {
    Backup {
        target: String,
        to: PathBuf,
        incremental: bool,
        freeze_limit_ms: u64,
        require_app_consistent: bool,
    },
    Describe {
        set: PathBuf,
    },
    Verify {
        set: PathBuf,
    },
    Restore {
        set: PathBuf,
        as_name: Option<String>,
    },
}

/// The daemon side: runs `call` on the service. `resolve` turns a VM name or GUID into its id.
pub fn serve(
    vmms: &VirtualSystemManagementService,
    resolve: impl Fn(&str) -> Result<VmId, ApiError>,
    call: BackupCall,
) -> Result<serde_json::Value, ApiError> {
    match call {
        BackupCall::Backup {
            target,
            to,
            incremental,
            freeze_limit_ms,
            require_app_consistent,
        } => {
            let id = resolve(&target)?;
            let request = BackupRequest {
                target: to,
                incremental,
                freeze_limit: Duration::from_millis(freeze_limit_ms),
                freeze_policy: if require_app_consistent {
                    FreezePolicy::Fail
                } else {
                    FreezePolicy::FallBackToCrashConsistent
                },
            };
            let (code, job) = vmms.backup_system(id, request).map_err(api)?;
            let name = vmms.get_vm(id).map_err(api)?.name;
            to_json(&StateChange {
                vm: id,
                name,
                code: code.code(),
                job,
            })
        }
        BackupCall::Describe { set } => to_json(&vmms.describe_backup(&set).map_err(api)?),
        BackupCall::Verify { set } => to_json(&vmms.verify_backup(&set).map_err(api)?),
        BackupCall::Restore { set, as_name } => {
            let target = match as_name {
                Some(name) => RestoreTarget::NewVm { name: Some(name) },
                None => {
                    let vm = vmms.describe_backup(&set).map_err(api)?.vm;
                    if vmms.get_vm(vm).is_ok() {
                        RestoreTarget::ReplaceVm
                    } else {
                        RestoreTarget::NewVm { name: None }
                    }
                }
            };
            to_json(&vmms.restore_backup(&set, target).map_err(api)?)
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

/// The CLI side of one backup verb.
pub fn run(store: &std::path::Path, output: Output, verb: BackupVerb) -> Result<(), CliError> {
    // The daemon reads and writes the sets: paths must not depend on this process's folder.
    let absolute = |path: PathBuf| std::path::absolute(&path).unwrap_or(path);
    let (name, target, call) = match verb {
        BackupVerb::BackupVm {
            target,
            to,
            incremental,
            freeze_limit,
            require_app_consistent,
        } => (
            "backup-vm",
            target.clone(),
            BackupCall::Backup {
                target,
                to: absolute(to),
                incremental,
                freeze_limit_ms: (freeze_limit.max(0.0) * 1000.0) as u64,
                require_app_consistent,
            },
        ),
        BackupVerb::GetVmBackup { set } => {
            let set = absolute(set);
            (
                "get-vm-backup",
                set.display().to_string(),
                BackupCall::Describe { set },
            )
        }
        BackupVerb::TestVmBackup { set } => {
            let set = absolute(set);
            (
                "test-vm-backup",
                set.display().to_string(),
                BackupCall::Verify { set },
            )
        }
        BackupVerb::RestoreVmBackup { set, as_name } => {
            let set = absolute(set);
            (
                "restore-vm-backup",
                set.display().to_string(),
                BackupCall::Restore { set, as_name },
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
    let request = Request::Backup { call: call.clone() };
    match call {
        BackupCall::Backup { to, .. } => {
            let started = Instant::now();
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
                }
                (code, _) => return Err(fail(ApiError::with_code(code, describe_code(code)))),
            }
            let describe = Request::Backup {
                call: BackupCall::Describe { set: to },
            };
            let info: BackupSetInfo = client.call(&describe).map_err(fail)?;
            match output {
                Output::Json => crate::cli::print_json(&info),
                Output::Table => print_done(&info, started.elapsed()),
            }
            Ok(())
        }
        BackupCall::Describe { .. } | BackupCall::Verify { .. } => {
            let info: BackupSetInfo = client.call(&request).map_err(fail)?;
            match output {
                Output::Json => crate::cli::print_json(&info),
                Output::Table => print_info(&info),
            }
            Ok(())
        }
        BackupCall::Restore { .. } => {
            let id: VmId = client.call(&request).map_err(fail)?;
            match output {
                Output::Json => crate::cli::print_json(&id),
                Output::Table => out!("{id}"),
            }
            Ok(())
        }
    }
}

/// Waits for `job`: on a terminal a bar with bytes, rate and ETA.
fn follow(client: &mut Client, job: JobId) -> Result<Job, ApiError> {
    let terminal = std::io::stdout().is_terminal();
    let mut bar: Option<ProgressBar> = None;
    loop {
        let current: Job = client.call(&Request::WaitJob {
            job,
            timeout_ms: if terminal { 200 } else { 10 * 60 * 1000 },
        })?;
        if current.state.is_terminal() {
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            return Ok(current);
        }
        if terminal && current.bytes_total > 0 {
            let bar = bar.get_or_insert_with(|| {
                let bar = ProgressBar::new(current.bytes_total);
                bar.set_style(
                    ProgressStyle::with_template(
                        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                bar.set_message(current.kind.description());
                bar
            });
            bar.set_length(current.bytes_total);
            bar.set_position(current.bytes_processed);
        }
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn print_done(info: &BackupSetInfo, took: Duration) {
    let report = &info.report;
    let seconds = took.as_secs_f64().max(1e-6);
    out!(
        "backed up '{}' to {}: {} {}, {:.1} MiB copied in {:.2} s ({:.1} MiB/s)",
        info.vm_name,
        report.set.display(),
        report.kind,
        report.consistency,
        mib(report.bytes_copied),
        seconds,
        mib(report.bytes_copied) / seconds
    );
    print_reasons(info);
}

fn print_info(info: &BackupSetInfo) {
    let report = &info.report;
    out!("VM:           {} ({})", info.vm_name, info.vm);
    out!("Taken:        {}", wmi_model::iso8601(info.created));
    out!("Kind:         {}", report.kind);
    out!("Consistency:  {}", report.consistency);
    out!("Data:         {:.1} MiB", mib(report.bytes_copied));
    for (depth, set) in info.chain.iter().enumerate() {
        let label = if depth == 0 { "Chain:" } else { "" };
        out!("{label:<14}{}", set.display());
    }
    print_reasons(info);
}

fn print_reasons(info: &BackupSetInfo) {
    let report = &info.report;
    if let Some(window) = report.freeze_window {
        out!("Guest frozen: {:.1} ms", window.as_secs_f64() * 1000.0);
    }
    if let Some(reason) = &report.consistency_reason {
        out!("Why {}: {reason}", report.consistency);
    }
    if let Some(reason) = &report.full_reason {
        out!("Why full: {reason}");
    }
}
