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
mod cim;
mod cli;
mod connect_vm;
mod console;
mod daemon;
mod demo;
mod listener;
mod log;
mod rdp;

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
        #[command(flatten)]
        cim: cim::CimArgs,
        #[command(flatten)]
        rdp: rdp::RdpArgs,
    },
    /// Start a daemon, define and start a VM on the embedded test guest, show it and its console.
    Demo,
    /// The worker process of one VM (started by the daemon).
    #[command(hide = true)]
    Worker {
        /// The VM.
        #[arg(long)]
        vm: VmId,
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
        /// A raw disk image (repeatable); a relative path is taken from the current folder.
        #[arg(long)]
        disk: Vec<PathBuf>,
        /// What to do when the VM's worker fails.
        #[arg(long, default_value = "restart", value_parser = ["none", "restart"])]
        recovery: String,
    },
    /// Show VMs: state, its EnabledState code, health, CPUs, memory, worker PID, uptime.
    GetVm {
        /// A name or GUID; all VMs when omitted.
        target: Option<String>,
    },
    /// Start (boot, or restore a saved VM).
    StartVm { target: String },
    /// Shut down. Without `--turn-off` the guest is asked to power off — the test guest gets
    /// `halt` typed on its console — and is turned off if it has not within `--timeout`
    /// seconds; guests without a shutdown path (a `--kernel` VM) are turned off, with a note.
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
            cim,
            rdp,
        } => {
            let options = daemon::ServeOptions {
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
