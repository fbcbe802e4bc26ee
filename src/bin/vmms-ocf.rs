//! `vmms-ocf`: an OCF resource agent (Pacemaker) running one VM of a vmms store.
//!
//! Install it as `/usr/lib/ocf/resource.d/vmms/vm` (a copy or a link) and configure
//! `OCF_RESKEY_store` and `OCF_RESKEY_vm`. Each call opens the store's service in-process for the
//! one action, serialised with any other call by the store's lock; the VM's worker (this same
//! executable run as `vmms-ocf worker …`) lives on in its own session between calls and the next
//! call re-attaches to it. A store served by a `vmms serve` daemon cannot be driven by the agent
//! at the same time (the lock says so).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster_resource::ocf::{
    self, Action, OCF_ERR_ARGS, OCF_ERR_GENERIC, OCF_ERR_INSTALLED, OCF_ERR_UNIMPLEMENTED, Params,
};
use vmm_core::{VirtualSystemManagementService, WorkerLauncher};
use worker_manager::ProcessLauncher;
use worker_manager::worker::{self, WorkerOptions};

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let Some(action) = args.get(1).and_then(|a| a.to_str()) else {
        eprintln!(
            "usage: vmms-ocf start|stop|monitor|meta-data|validate-all|migrate_to|migrate_from"
        );
        return ExitCode::from(OCF_ERR_ARGS);
    };
    if action == "worker" {
        return match WorkerOptions::from_args(args[2..].iter().cloned(), vmms::guest::ELF) {
            Ok(options) => worker::run(options),
            Err(error) => {
                eprintln!("vmms-ocf worker: {error}");
                ExitCode::from(OCF_ERR_ARGS)
            }
        };
    }
    let Some(action) = Action::parse(action) else {
        eprintln!("vmms-ocf: action {action} is not implemented");
        return ExitCode::from(OCF_ERR_UNIMPLEMENTED);
    };
    if action == Action::MetaData {
        print!("{}", ocf::meta_data());
        return ExitCode::SUCCESS;
    }
    let params = match Params::from_env(|k| std::env::var(k).ok()) {
        Ok(params) => params,
        Err((code, message)) => {
            eprintln!("vmms-ocf: {message}");
            return ExitCode::from(code);
        }
    };
    let (code, message) = act(action, &params);
    if !message.is_empty() {
        eprintln!("vmms-ocf {action:?}: {message}");
    }
    ExitCode::from(code)
}

fn act(action: Action, params: &Params) -> (u8, String) {
    if !params.store.join("vms").is_dir() {
        // validate-all and probes on a node without the store: not installed here.
        return match action {
            Action::Monitor => (
                ocf::OCF_NOT_RUNNING,
                "store not present on this node".into(),
            ),
            Action::Stop => (ocf::OCF_SUCCESS, "store not present on this node".into()),
            _ => (
                OCF_ERR_INSTALLED,
                format!("no vmms store at {}", params.store.display()),
            ),
        };
    }
    // SAFETY: umask only sets this process's file mode creation mask (workers inherit it).
    unsafe { libc::umask(0o077) };
    let _lock = match lock(&params.store, params.timeout) {
        Ok(lock) => lock,
        Err(message) => return (OCF_ERR_GENERIC, message),
    };
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(error) => return (OCF_ERR_INSTALLED, format!("own executable: {error}")),
    };
    let launcher: Arc<dyn WorkerLauncher> =
        Arc::new(ProcessLauncher::new(&params.store, exe, ["worker"]));
    let service = match VirtualSystemManagementService::open(&params.store, launcher) {
        Ok(service) => service,
        Err(error) => return (OCF_ERR_GENERIC, vmm_core::error_chain(&error)),
    };
    service.recover_on_start();
    ocf::run(action, params, service)
}

/// The store's lock, waited for up to `timeout` (another agent call may hold it).
fn lock(store: &std::path::Path, timeout: Duration) -> Result<File, String> {
    let path = store.join("vmms.lock");
    let file = File::create(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let deadline = Instant::now() + timeout;
    loop {
        // SAFETY: flock only acts on the descriptor `file` owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(file);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{} is locked (a vmms daemon serves it?)",
                store.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
