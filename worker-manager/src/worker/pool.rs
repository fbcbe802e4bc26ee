//! A worker started into the launcher's pool (`--pool`): it warms up, says it is idle, waits for
//! its VM, then starts that VM exactly as an exec'd worker does (see `crate::pool` for the
//! exchange with the parent).
//!
//! While idle it holds no VM's data and runs no guest (its one KVM VM, created ahead and maybe
//! built out to the likely shape, has no guest in it); it has bound its control and console
//! sockets and created its log in a folder of its own (`super::idle_folder`), and then confined
//! what no VM decides: no new privileges, no core dumps, the descriptor limit and the seccomp
//! allowlist, which also serves the set-up after the assignment. Landlock's rules are the VM's
//! (its folders and disks): they go on after the assignment, on the same single thread as in an
//! exec'd worker. Warming up creates no thread, so Landlock, which binds the calling thread and
//! the threads it creates later, still covers the whole process.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;

use partition::{VmShape, VmShell};
use vmm_core::error_chain;

use super::idle_folder::IdleFolder;
use super::machine::{Machine, Prepared};
use super::{EXIT_START_FAILED, WorkerOptions, confinement, fd_is_open, log_start, start_trace};
use crate::pool::{
    POOL_FD_ENV, POOL_SHAPE_ENV, PoolMessage, parse_shape, receive_assignment, receive_lock,
};
use crate::protocol::write_frame;
use crate::runtime::StoreLayout;

/// The life of a pool worker: the process's exit code. An idle worker whose parent goes away
/// exits with success: there was nothing to run.
pub(super) fn run(options: WorkerOptions<'_>) -> ExitCode {
    super::unblock_signals();
    let Some(channel) = channel_from_env() else {
        log_line!("error: {POOL_FD_ENV} names no open descriptor; --pool is for the launcher");
        return ExitCode::from(EXIT_START_FAILED);
    };
    // Exactly what the parent meant to pass survives: stdio and the socket pair.
    confinement::close_inherited_fds(&[channel.as_raw_fd()]);
    let shape = std::env::var(POOL_SHAPE_ENV)
        .ok()
        .and_then(|value| parse_shape(&value))
        .map(|(memory_mib, vcpus)| VmShape {
            memory_mib,
            vcpus,
            // A worker's partitions always log dirty pages (see `Machine::start`).
            dirty_log: true,
        });
    let layout = StoreLayout::new(&options.store);
    let warm = warm_up(options.confine, shape).and_then(|shell| {
        let folder = IdleFolder::prepare(layout.idle_folder(std::process::id()))
            .map_err(|e| format!("preparing the sockets and log while idle: {e}"))?;
        // From here on the worker writes to what becomes the VM's worker.log, as an exec'd
        // one does.
        redirect_output(folder.log()).map_err(|e| format!("worker.log: {e}"))?;
        // Last: the filter has no room for binding sockets or redirecting output.
        let confinement = if options.confine {
            Some(confinement::confine_idle().map_err(|e| error_chain(&e))?)
        } else {
            None
        };
        Ok((shell, confinement, folder))
    });
    let (shell, confinement, folder) = match warm {
        Ok(warm) => warm,
        Err(reason) => {
            let _ = write_frame(&mut &channel, &PoolMessage::Failed { reason });
            return ExitCode::from(EXIT_START_FAILED);
        }
    };
    if write_frame(&mut &channel, &PoolMessage::Idle).is_err() {
        return ExitCode::SUCCESS;
    }
    let (assignment, lock) = match receive_assignment(&channel) {
        Ok(Some(received)) => received,
        // The parent went away (or dropped its pool): nothing to run.
        Ok(None) => return ExitCode::SUCCESS,
        Err(error) => {
            let reason = format!("assignment: {error}");
            let _ = write_frame(&mut &channel, &PoolMessage::Failed { reason });
            return ExitCode::from(EXIT_START_FAILED);
        }
    };
    start_trace::begin_at("assigned");
    let vm = assignment.vm;
    let options = WorkerOptions {
        vm: Some(vm),
        restore: assignment.restore,
        ..options
    };
    log_start(vm, &options, " (pool worker)");
    match shell.shape() {
        Some(shape) => log_line!(
            "worker {vm}: building into the VM created while idle, built out to {} MiB, {} vCPUs",
            shape.memory_mib,
            shape.vcpus
        ),
        None => log_line!("worker {vm}: building into the VM created while idle"),
    }
    start_trace::mark("log");
    let prepared = Prepared {
        handover: Some(Handover {
            channel: &channel,
            lock,
            folder,
        }),
        shell: Some(shell),
        confinement,
    };
    match Machine::start(&options, vm, prepared) {
        Ok(machine) => {
            let report = Box::new(machine.report());
            let told = write_frame(&mut &channel, &PoolMessage::Ready { report });
            start_trace::mark("ready");
            log_line!("worker {vm}: guest running");
            start_trace::log(vm);
            // A parent gone since is no reason to stop: the next one connects to control.sock.
            if told.is_ok()
                && let Err(error) = machine.adopt_parent(channel)
            {
                log_line!("worker {vm}: pool connection: {}", error_chain(&error));
            }
            machine.serve()
        }
        Err(error) => {
            let reason = error_chain(&error);
            log_line!("error: {reason}");
            let _ = write_frame(&mut &channel, &PoolMessage::Failed { reason });
            ExitCode::from(EXIT_START_FAILED)
        }
    }
}

/// The VM's runtime folder, as a pool worker comes to own it: the launcher takes the VM's lock
/// and moves in what the worker prepared while idle, while the worker builds the VM's partition;
/// then it hands the lock over.
#[derive(Debug)]
pub(crate) struct Handover<'a> {
    channel: &'a UnixStream,
    /// The lock, when it came with the assignment.
    lock: Option<File>,
    folder: IdleFolder,
}

impl Handover<'_> {
    /// Waits for the VM's lock (usually there already): the lock, and the listeners, now at the
    /// VM's paths.
    pub(crate) fn take_over(self) -> io::Result<(File, (UnixListener, UnixListener))> {
        let lock = match self.lock {
            Some(lock) => lock,
            None => receive_lock(self.channel)?.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the launcher went away before it handed over the VM's lock",
                )
            })?,
        };
        Ok((lock, self.folder.into_listeners()?))
    }
}

/// What every VM's start needs and nothing about a VM decides, done while idle: KVM's facts
/// (`/dev/kvm` opened, CPUID and vCPU limit read), the compiled seccomp filter, and the VM itself
/// (a [`VmShell`]: the process's first `KVM_CREATE_VM` costs over a millisecond) for the
/// partition to be built into once the VM's configuration is known. Given the likely `shape`,
/// the VM is built out to it: memory slots, irqchip, PIT and vCPUs, whose creation sleeps.
fn warm_up(confine: bool, shape: Option<VmShape>) -> Result<VmShell, String> {
    partition::prepare_host().map_err(|e| error_chain(&e))?;
    if confine {
        confinement::compiled_program().map_err(|e| error_chain(&e))?;
    }
    let built_out = shape.map(VmShell::create_for);
    match built_out {
        Some(Ok(shell)) => Ok(shell),
        // A shape this host cannot build (too many vCPUs, too much memory to map): the VM
        // will not fit it either, and a bare VM serves any.
        Some(Err(_)) | None => VmShell::create().map_err(|e| error_chain(&e)),
    }
}

/// The socket pair's end the launcher passed in [`POOL_FD_ENV`].
fn channel_from_env() -> Option<UnixStream> {
    let fd = std::env::var(POOL_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .filter(|&fd| fd > 2 && fd_is_open(fd))?;
    // SAFETY: the parent passed this descriptor for us alone; it is open (checked above) and
    // nothing else in this process owns it.
    Some(UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Points stdout and stderr at the VM's `worker.log`.
fn redirect_output(log: &File) -> io::Result<()> {
    for target in [libc::STDOUT_FILENO, libc::STDERR_FILENO] {
        // SAFETY: dup2 only replaces descriptor `target` of this process with a copy of the log's.
        if unsafe { libc::dup2(log.as_raw_fd(), target) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
