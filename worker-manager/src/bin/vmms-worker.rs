//! A stand-alone worker binary: the worker side of this crate with the embedded test guest as the
//! default boot image. `ProcessLauncher::new(store, "vmms-worker", Vec::<String>::new())` runs it;
//! the crate's integration tests do.
//!
//! ```text
//! vmms-worker --vm <GUID> --store <DIR> [--restore <DIR>]
//! ```

use std::process::ExitCode;

use worker_manager::worker::{self, WorkerOptions};

fn main() -> ExitCode {
    match WorkerOptions::from_args(std::env::args_os().skip(1), vmms_guest::ELF) {
        Ok(options) => worker::run(options),
        Err(error) => {
            eprintln!("vmms-worker: {error}");
            ExitCode::from(64)
        }
    }
}
