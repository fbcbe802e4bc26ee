//! The start of every bench that re-executes itself as the vmms worker (as the reference binary
//! does): the worker's own entry point, and the skip where there is no KVM.

use std::ffi::OsStr;
use std::path::Path;
use std::process::ExitCode;

use worker_manager::worker::{self, WorkerOptions};

/// `Some(exit code)` when this process is not to run benchmarks: it was started as a worker
/// (`<bench> worker ...`, which then ran to its end), or /dev/kvm is absent (said on stderr).
pub fn run_worker_or_skip() -> Option<ExitCode> {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() == Some(OsStr::new("worker")) {
        let options = WorkerOptions::from_args(args, vmms::guest::ELF).expect("worker arguments");
        return Some(worker::run(options));
    }
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipped: /dev/kvm is not available on this host");
        return Some(ExitCode::SUCCESS);
    }
    None
}
