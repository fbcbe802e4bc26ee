//! The worker side: what runs inside one worker process (Hyper-V's `vmwp.exe`).
//!
//! A worker binary — the reference daemon re-executing itself as `vmms worker …`, the
//! `vmms-worker` binary of this crate, or an integrator's own — parses its command line into
//! [`WorkerOptions`] and calls [`run`]. `run` reads the VM's `config.json`, builds (or restores)
//! the [`Partition`](partition::Partition), serves `control.sock` and `console.sock` in the VM's
//! runtime folder, writes the pid file, tells the parent it is ready, and runs the guest until it
//! is told to save or turn off.

/// `eprintln!` in one `write(2)`, and without its panic on a failed write.
///
/// std's stderr is unbuffered: `eprintln!` writes a line piece by piece, a syscall for each
/// literal and argument (a dozen for some of the start's lines, ~40 µs of a start here), and
/// another thread's line can land between the pieces. A worker whose log cannot be written
/// (a full disk) must go on running its guest.
macro_rules! log_line {
    ($($arg:tt)*) => {{
        let mut line = ::std::format!($($arg)*);
        line.push('\n');
        let _ = ::std::io::Write::write_all(&mut ::std::io::stderr().lock(), line.as_bytes());
    }};
}

mod agent;
mod backup;
mod change_tracking;
mod checkpoint;
mod confinement;
mod console;
mod control;
mod disks;
pub mod fence;
mod frozen_checkpoint;
mod idle_folder;
mod listeners;
mod machine;
mod network;
mod overlays;
mod pool;
mod set_up;
pub mod start_trace;
mod state_folder;
mod syscall_filter;
mod syscalls;

use std::ffi::OsString;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;

use vmm_core::{VmId, error_chain};

use crate::error::{Error, Result};
use crate::worker_lock::LOCK_FD_ENV;

pub use confinement::{ConfinementError, TEST_ESCAPE_ENV, install_seccomp_on_current_thread};
pub use machine::{MEMORY_FILE, STATE_FILE, partition_config, stop_reason};
pub use state_folder::{MAX_MEMORY_LAYERS, MEMORY_MANIFEST, MemoryManifest};
pub use syscalls::{ALLOWANCE_MARGIN, allowlist_names};

/// Environment variable naming the descriptor on which a worker reports readiness to its parent:
/// one line, `ready` or `error: <reason>`, then the descriptor is closed.
pub const READY_FD_ENV: &str = "VMMS_WORKER_READY_FD";

/// Exit code of a worker that could not bring its guest up.
pub const EXIT_START_FAILED: u8 = 2;

/// What a worker process is asked to run.
#[derive(Debug, Clone)]
pub struct WorkerOptions<'a> {
    /// The virtual machine (its `config.json` is read from the store); `None` for a worker
    /// started into the launcher's pool (`--pool`), which is told its VM later.
    pub vm: Option<VmId>,
    /// The store's root folder.
    pub store: PathBuf,
    /// Restore the saved state in this folder (`state.json` + `memory.bin`) instead of booting.
    pub restore: Option<PathBuf>,
    /// The image booted for [`BootSource::TestGuest`](vmm_core::BootSource::TestGuest); the
    /// reference binaries pass `vmms_guest::ELF`.
    pub default_kernel: &'a [u8],
    /// Confine the process (seccomp, Landlock, no new privileges, rlimits); off only for
    /// debugging (`--no-confinement`).
    pub confine: bool,
}

impl<'a> WorkerOptions<'a> {
    /// Parses the worker command line `--vm <GUID> --store <DIR> [--restore <DIR>]
    /// [--no-confinement]`, or `--pool --store <DIR> [--no-confinement]` for a pool worker (what
    /// [`ProcessLauncher`](crate::ProcessLauncher) appends to the program's own arguments).
    pub fn from_args(
        args: impl IntoIterator<Item = OsString>,
        default_kernel: &'a [u8],
    ) -> Result<Self> {
        let mut vm = None;
        let mut store = None;
        let mut restore = None;
        let mut confine = true;
        let mut pool = false;
        let mut args = args.into_iter();
        while let Some(flag) = args.next() {
            let mut value = || {
                args.next().ok_or_else(|| {
                    Error::Usage(format!("{} needs a value", flag.to_string_lossy()))
                })
            };
            match flag.to_str() {
                Some("--vm") => {
                    let text = value()?;
                    let id = text
                        .to_str()
                        .and_then(|t| t.parse::<VmId>().ok())
                        .ok_or_else(|| {
                            Error::Usage(format!("--vm {}: not a GUID", text.to_string_lossy()))
                        })?;
                    vm = Some(id);
                }
                Some("--store") => store = Some(PathBuf::from(value()?)),
                Some("--restore") => restore = Some(PathBuf::from(value()?)),
                Some("--no-confinement") => confine = false,
                Some(crate::pool::POOL_FLAG) => pool = true,
                _ => {
                    return Err(Error::Usage(format!(
                        "unexpected argument {}",
                        flag.to_string_lossy()
                    )));
                }
            }
        }
        let vm = match (vm, pool) {
            (Some(_), true) => {
                return Err(Error::Usage("--vm and --pool exclude each other".into()));
            }
            (None, false) => return Err(Error::Usage("--vm is required".into())),
            (vm, _) => vm,
        };
        if pool && restore.is_some() {
            return Err(Error::Usage("--restore needs --vm".into()));
        }
        Ok(WorkerOptions {
            vm,
            store: store.ok_or_else(|| Error::Usage("--store is required".into()))?,
            restore,
            default_kernel,
            confine,
        })
    }
}

/// Runs a worker to the end: the process's exit code. Success means the guest was saved or turned
/// off as asked; [`EXIT_START_FAILED`] that it never ran (the reason is on stderr and, when
/// started by a [`ProcessLauncher`](crate::ProcessLauncher), sent to the parent).
///
/// A pool worker (`vm` is `None`) first warms up and waits for its VM (the `pool` module).
pub fn run(options: WorkerOptions<'_>) -> ExitCode {
    one_malloc_arena();
    let Some(vm) = options.vm else {
        return pool::run(options);
    };
    start_trace::begin();
    unblock_signals();
    let ready = ReadyPipe::from_env();
    // Exactly what the parent meant to pass survives: stdio, the readiness pipe, the lock.
    confinement::close_inherited_fds(&[ready.raw_fd(), inherited_fd(LOCK_FD_ENV)]);
    log_start(vm, &options, "");
    match machine::Machine::start(&options, vm, machine::Prepared::default()) {
        Ok(machine) => {
            ready.send("ready");
            start_trace::mark("ready");
            log_line!("worker {vm}: guest running");
            start_trace::log(vm);
            machine.serve()
        }
        Err(error) => {
            let reason = error_chain(&error);
            log_line!("error: {reason}");
            ready.send(&format!("error: {reason}"));
            ExitCode::from(EXIT_START_FAILED)
        }
    }
}

/// Has every thread allocate from glibc's main arena. By default a thread's first allocation
/// creates an arena of its own (a 64 MiB reservation, then page faults as it is used) when no
/// arena is free, which in a fresh worker is every thread: the vCPU thread paid for one before its
/// first `KVM_RUN`, on the path to the guest's first byte. A worker's threads allocate little
/// (the vCPU exit path nothing at all), so sharing one arena costs no contention worth having
/// arenas for, and each thread's arena no longer adds to the worker's memory.
fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator tunable; this runs before the worker starts any
    // thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// The worker log's first line.
pub(crate) fn log_start(vm: VmId, options: &WorkerOptions<'_>, how: &str) {
    log_line!(
        "worker {vm}: pid {}, {}{how}",
        std::process::id(),
        match &options.restore {
            Some(dir) => format!("restoring {}", dir.display()),
            None => "booting".to_owned(),
        }
    );
}

/// Clears the signal mask inherited from the parent: the partition kicks vCPU threads with a
/// real-time signal, and a daemon that blocks SIGTERM for its own signal thread must not pass
/// that on.
pub(crate) fn unblock_signals() {
    // SAFETY: sigemptyset initialises the set; sigprocmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

/// The readiness descriptor handed down by the parent, if any.
struct ReadyPipe(Option<std::fs::File>);

impl ReadyPipe {
    fn from_env() -> Self {
        let fd = std::env::var(READY_FD_ENV)
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
            .filter(|&fd| fd > 2 && fd_is_open(fd));
        // SAFETY: the parent passed this descriptor for us alone; it is open (checked above) and
        // nothing else in this process owns it.
        ReadyPipe(fd.map(|fd| std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) })))
    }

    fn raw_fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.0.as_ref().map_or(-1, AsRawFd::as_raw_fd)
    }

    fn send(self, line: &str) {
        if let Some(mut file) = self.0 {
            // The parent may have given up waiting; then nobody needs the line.
            let _ = writeln!(file, "{line}");
        }
    }
}

/// The descriptor number an environment variable names (-1 when none).
fn inherited_fd(variable: &str) -> i32 {
    std::env::var(variable)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1)
}

pub(crate) fn fd_is_open(fd: i32) -> bool {
    // SAFETY: F_GETFD only queries the descriptor's flags.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn worker_command_line_parses() {
        let vm = VmId::new_random();
        let line = args(&["--vm", &vm.to_string(), "--store", "/s", "--restore", "/r"]);

        let options = WorkerOptions::from_args(line, b"elf").unwrap();

        assert_eq!(options.vm, Some(vm));
        assert_eq!(options.store, PathBuf::from("/s"));
        assert_eq!(options.restore, Some(PathBuf::from("/r")));
    }

    #[test]
    fn missing_vm_is_a_usage_error() {
        let result = WorkerOptions::from_args(args(&["--store", "/s"]), b"");

        assert!(matches!(result, Err(Error::Usage(m)) if m.contains("--vm")));
    }

    #[test]
    fn bad_guid_is_a_usage_error() {
        let result = WorkerOptions::from_args(args(&["--vm", "web1", "--store", "/s"]), b"");

        assert!(matches!(result, Err(Error::Usage(m)) if m.contains("not a GUID")));
    }
}
