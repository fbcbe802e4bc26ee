//! `vmms`: the reference daemon and CLI, assembled from the vmms crates.
//!
//! ```text
//! cargo run --release --example vmms -- demo          # daemon + VM + console, nothing to download
//! vmms serve [--store DIR] [--socket-group NAME]      # the daemon (VMMS), default store ./vmms-data
//!       [--cim-listen ADDR] [--no-cim]               # + CIM-XML on 127.0.0.1:5988 (store also from $VMMS_STORE)
//! vmms new-vm web1 [--vcpus N] [--memory-mib N] [--kernel P --initrd P --cmdline S] [--disk P]
//!                  [--recovery none|restart]
//! vmms get-vm [NAME|GUID] [--output json]
//! vmms start-vm|suspend-vm|resume-vm|save-vm|restart-vm|remove-vm NAME
//! vmms stop-vm NAME [--turn-off]
//! vmms console NAME                                   # COM1; Ctrl-] detaches
//! vmms connect-vm NAME [--launch]                     # COM1 over RDP (FreeRDP /vmconnect)
//! vmms get-vm-event [NAME]
//! vmms stop-daemon                                    # the daemon exits; VMs keep running
//! vmms new-vmswitch NAME --private|--internal [--subnet CIDR]|--external IFACE
//! vmms get-vmswitch [NAME] | remove-vmswitch NAME
//! vmms add-vmnetworkadapter VM [--switch NAME] [--mac M]
//! vmms connect-vmnetworkadapter VM --switch NAME | disconnect-vmnetworkadapter VM
//! vmms get-vmnetworkadapter [VM] [--output json]
//! ```
//!
//! One executable plays every role: `serve` is the daemon (vmm-core's service with
//! worker-manager's `ProcessLauncher`), each running VM is this same binary re-executed as
//! `vmms worker --vm <GUID> --store <DIR>` (a worker process per VM, in its own session, so VMs
//! survive a daemon restart), and every other verb is a client of the daemon's socket.

/// `println!` that ignores a closed stdout: `vmms get-vm | head -1` must not panic.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// A line of the daemon's log (`log.rs`): never waits on stdout, never panics over it.
macro_rules! log {
    ($($arg:tt)*) => {
        crate::log::line(format!($($arg)*))
    };
}

mod api;
mod backup;
mod checkpoint;
mod cim;
mod cli;
mod cluster_cli;
mod cluster_node;
mod connect_vm;
mod console;
mod daemon;
mod demo;
mod listener;
mod log;
mod rdp;
mod switch;
mod switch_cli;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use vmm_core::{RequestedState, VmId};
use worker_manager::worker::{self, WorkerOptions};

use crate::api::VmSpec;
use crate::cli::{Cli, CliError, Output};

/// Hyper-V's management architecture over KVM: daemon, workers and CLI in one binary.
#[derive(Debug, Parser)]
#[command(name = "vmms", version)]
struct Args {
    /// The store: VM definitions, saved states, runtime sockets.
    #[arg(long, global = true, env = "VMMS_STORE", default_value = "./vmms-data")]
    store: PathBuf,
    /// How results are printed.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Debug, Subcommand)]
enum Verb {
    /// Run the daemon (VMMS) for the store. Root and the user running it may use it; so may the
    /// members of `--socket-group`.
    Serve {
        /// Let the members of this group (name or number) use the daemon's socket too.
        #[arg(long)]
        socket_group: Option<String>,
        /// Seconds a client connection may sit idle between requests before it is closed.
        #[arg(long, default_value_t = 60)]
        idle_timeout: u64,
        /// Seconds a client may take to send one request line once it began.
        #[arg(long, default_value_t = 10)]
        request_timeout: u64,
        /// Seconds of worker silence before its VM is reported not responding (HealthState 20).
        #[arg(long, default_value_t = 5)]
        heartbeat_timeout: u64,
        /// Seconds of worker silence before the VM's recovery action applies (restart kills and
        /// restarts a hung worker; none leaves it alone).
        #[arg(long, default_value_t = 30)]
        hang_timeout: u64,
        /// Run workers without seccomp, Landlock and rlimits (debugging only).
        #[arg(long)]
        no_confinement: bool,
        /// Worker processes kept started and idle, so that a VM's start does not wait for one to
        /// be spawned (0: spawn each when its VM starts).
        #[arg(long, default_value_t = 1)]
        worker_pool: usize,
        #[command(flatten)]
        cim: cim::CimArgs,
        #[command(flatten)]
        cluster: cluster_cli::ClusterArgs,
        #[command(flatten)]
        rdp: rdp::RdpArgs,
    },
    /// Start a daemon, define and start a VM on the embedded test guest, show it and its console.
    Demo,
    /// The worker process of one VM (started by the daemon).
    #[command(hide = true)]
    Worker {
        /// The VM.
        #[arg(long, required_unless_present = "pool", conflicts_with = "pool")]
        vm: Option<VmId>,
        /// Start idle in the daemon's worker pool and wait to be given a VM.
        #[arg(long)]
        pool: bool,
        /// Restore this saved state instead of booting.
        #[arg(long)]
        restore: Option<PathBuf>,
        /// Run without seccomp, Landlock and rlimits (debugging only).
        #[arg(long)]
        no_confinement: bool,
    },
    /// Define a VM (default: the embedded test guest, 1 vCPU, 64 MiB).
    NewVm {
        /// Display name.
        name: String,
        /// Virtual processors.
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        /// Memory in MiB.
        #[arg(long, default_value_t = 64)]
        memory_mib: u64,
        /// Boot this kernel instead of the test guest.
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Initramfs for `--kernel`.
        #[arg(long, requires = "kernel")]
        initrd: Option<PathBuf>,
        /// Kernel command line (default `console=ttyS0`).
        #[arg(long, requires = "kernel")]
        cmdline: Option<String>,
        /// A raw or qcow2 disk image (repeatable); a relative path is taken from the current
        /// folder.
        #[arg(long)]
        disk: Vec<PathBuf>,
        /// Create a new empty qcow2 disk of this size (e.g. `64M`, `1G`) as the first disk.
        #[arg(long, value_parser = parse_size)]
        new_disk: Option<u64>,
        /// What to do when the VM's worker fails (revert: to its newest checkpoint, then start).
        #[arg(long, default_value = "restart", value_parser = ["none", "restart", "revert"])]
        recovery: String,
    },
    /// Show VMs: state, its EnabledState code, health, CPUs, memory, worker PID, uptime.
    GetVm {
        /// A name or GUID; all VMs when omitted.
        target: Option<String>,
    },
    /// Start (boot, or restore a saved VM).
    StartVm { target: String },
    /// Shut down. Without `--turn-off` the guest is asked to power off through its integration
    /// agent on COM2 (`guest-shutdown`) and is turned off if it has not within `--timeout`
    /// seconds; a guest whose agent does not answer is turned off, with a note.
    StopVm {
        target: String,
        /// Power off at once (RequestedState 3).
        #[arg(long)]
        turn_off: bool,
        /// Seconds to wait for a graceful shutdown.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// Pause (RequestedState 9).
    SuspendVm { target: String },
    /// Resume a paused VM.
    ResumeVm { target: String },
    /// Save the VM's state to disk and stop its worker (RequestedState 6).
    SaveVm { target: String },
    /// Hard reset (RequestedState 11).
    RestartVm { target: String },
    /// Delete an Off or Saved VM and its files.
    RemoveVm { target: String },
    /// Attach this terminal to the VM's COM1 (Ctrl-] detaches).
    Console { target: String },
    /// Print the FreeRDP command line for the VM's console (`--launch` runs it).
    ConnectVm {
        target: String,
        /// Run the client instead of printing its command line.
        #[arg(long)]
        launch: bool,
    },
    /// Recent events (state and health changes, lost workers, recovery, jobs).
    GetVmEvent { target: Option<String> },
    /// Stop the daemon; running VMs keep running.
    StopDaemon,
    #[command(flatten)]
    Checkpoint(checkpoint::CheckpointVerb),
    /// Online backup, verify and restore.
    #[command(flatten)]
    Backup(backup::BackupVerb),
    /// Virtual switches and network adapters.
    #[command(flatten)]
    Network(switch_cli::NetVerb),
    /// Cluster nodes, their leases and etcd's health (`--store` is a node's folder).
    GetClusterNode,
    /// Quick migration: save the VM on its owner node, restore it on `--to`; prints the downtime.
    MoveVm {
        target: String,
        /// The target node.
        #[arg(long)]
        to: String,
        /// Seconds to wait for the move.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let store = args.store;
    let output = args.output;
    let cli = |verb: &'static str, target: Option<String>| Cli {
        store: &store,
        output,
        verb,
        target,
    };
    let result: Result<(), CliError> = match args.verb {
        Verb::Worker {
            vm,
            pool: _,
            restore,
            no_confinement,
        } => {
            return worker::run(WorkerOptions {
                vm,
                store,
                restore,
                default_kernel: vmms::guest::ELF,
                confine: !no_confinement,
            });
        }
        Verb::Serve {
            socket_group,
            idle_timeout,
            request_timeout,
            heartbeat_timeout,
            hang_timeout,
            no_confinement,
            worker_pool,
            cim,
            cluster,
            rdp,
        } => {
            let options = daemon::ServeOptions {
                cluster: cluster.options(),
                socket_group,
                timeouts: listener::Timeouts {
                    idle: Duration::from_secs(idle_timeout),
                    request: Duration::from_secs(request_timeout),
                },
            };
            let supervision = daemon::Supervision {
                heartbeat_timeout: Duration::from_secs(heartbeat_timeout),
                hang_timeout: Duration::from_secs(hang_timeout),
                confine_workers: !no_confinement,
                worker_pool,
            };
            daemon::serve(&store, &options, &supervision, &cim, &rdp).map_err(|e| plain("serve", e))
        }
        Verb::Demo => demo::demo(&store).map_err(|e| plain("demo", e)),
        Verb::NewVm {
            name,
            vcpus,
            memory_mib,
            kernel,
            initrd,
            cmdline,
            disk,
            new_disk,
            recovery,
        } => {
            // The daemon and its workers run elsewhere: paths must not depend on this folder.
            let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
            cli("new-vm", Some(name.clone())).new_vm(VmSpec {
                name,
                vcpus,
                memory_mib,
                kernel: kernel.map(absolute),
                initrd: initrd.map(absolute),
                cmdline,
                disks: disk.into_iter().map(absolute).collect(),
                new_disk,
                recovery,
            })
        }
        Verb::GetVm { target } => cli("get-vm", target).get_vm(),
        Verb::StartVm { target } => {
            cli("start-vm", Some(target)).change_state(RequestedState::Start)
        }
        Verb::StopVm {
            target,
            turn_off: true,
            ..
        } => cli("stop-vm", Some(target)).change_state(RequestedState::TurnOff),
        Verb::StopVm {
            target, timeout, ..
        } => cli("stop-vm", Some(target)).shutdown(Duration::from_secs(timeout)),
        Verb::SuspendVm { target } => {
            cli("suspend-vm", Some(target)).change_state(RequestedState::Pause)
        }
        Verb::ResumeVm { target } => cli("resume-vm", Some(target)).resume(),
        Verb::SaveVm { target } => cli("save-vm", Some(target)).change_state(RequestedState::Save),
        Verb::RestartVm { target } => {
            cli("restart-vm", Some(target)).change_state(RequestedState::Reset)
        }
        Verb::RemoveVm { target } => cli("remove-vm", Some(target)).remove_vm(),
        Verb::Console { target } => console_verb(&cli("console", Some(target))),
        Verb::ConnectVm { target, launch } => {
            connect_vm::connect_vm(&cli("connect-vm", Some(target)), launch)
        }
        Verb::GetVmEvent { target } => cli("get-vm-event", target).get_events(),
        Verb::StopDaemon => cli("stop-daemon", None).stop_daemon(),
        Verb::Checkpoint(verb) => checkpoint::run(&store, output, verb),
        Verb::Backup(verb) => backup::run(&store, output, verb),
        Verb::Network(verb) => switch_cli::run(&store, output, verb),
        Verb::GetClusterNode => cluster_cli::get_cluster_node(&cli("get-cluster-node", None)),
        Verb::MoveVm {
            target,
            to,
            timeout,
        } => cluster_cli::move_vm(
            &cli("move-vm", Some(target)),
            &to,
            Duration::from_secs(timeout),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            use std::io::Write as _;
            // A closed stderr must not turn a clean failure into a panic.
            let _ = writeln!(std::io::stderr().lock(), "{error}");
            ExitCode::FAILURE
        }
    }
}

/// A size with an optional binary suffix: `65536`, `64K`, `64M`, `2G` (Hyper-V's
/// `-NewVHDSizeBytes 64MB`).
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size (e.g. 64M)"))?;
    let shift = match suffix.to_ascii_uppercase().trim_end_matches(['B', 'I']) {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("unknown size suffix {suffix:?} (K, M, G, T)")),
    };
    number
        .checked_shl(shift)
        .filter(|n| n >> shift == number)
        .ok_or_else(|| format!("{text:?} is too large"))
}

fn plain(verb: &'static str, message: String) -> CliError {
    CliError {
        verb,
        target: None,
        error: api::ApiError::new(message),
    }
}

fn console_verb(cli: &Cli<'_>) -> Result<(), CliError> {
    let vm = cli.find()?;
    if vm.process_id.is_none() {
        return Err(CliError {
            verb: cli.verb,
            target: cli.target.clone(),
            error: api::ApiError::with_code(
                32775,
                format!("the VM is {}; only a running VM has a console", vm.state),
            ),
        });
    }
    console::attach(cli.store, vm.id, &vm.name).map_err(|e| CliError {
        verb: cli.verb,
        target: cli.target.clone(),
        error: api::ApiError::new(e),
    })
}
