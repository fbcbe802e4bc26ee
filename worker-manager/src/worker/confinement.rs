//! Confining a worker, so that a guest that escapes our device emulation owns one unprivileged,
//! walled-in process instead of the host.
//!
//! In order, as the worker starts:
//! 1. [`close_inherited_fds`]: nothing but stdio, the readiness pipe and the worker lock survives
//!    from the parent.
//! 2. [`restrict_process`], before any thread exists (Landlock applies to the calling thread and
//!    the threads it creates later): no new privileges, no core dumps (guest memory must not land
//!    in a core file), a descriptor limit, and a Landlock domain in which the filesystem is the
//!    VM's own folder, its runtime folder, its disks, its kernel and `/dev/kvm`, and no TCP port
//!    may be bound or connected.
//! 3. [`install_seccomp`], after set-up and before the first `KVM_RUN`: the syscall allowlist of
//!    [`super::syscalls`] (compiled by [`super::syscall_filter`]), on every thread at once;
//!    anything else kills the process, which the supervisor reports like any crash ("bad system
//!    call").
//!
//! A pool worker does what no VM decides while it waits ([`confine_idle`]: step 2 but Landlock's
//! VM rules, and step 3), and only completes Landlock once it is assigned.
//!
//! `--no-confinement` (the daemon's, passed to its workers) skips 2 and 3 for debugging; the
//! worker's status report says what it runs under either way.

use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::OnceLock;

use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, LandlockStatus, PathBeneath, PathFd,
    Ruleset, RulesetAttr, RulesetCreated, RulesetCreatedAttr, RulesetStatus, Scope,
};
use seccompiler::BpfProgram;

use crate::protocol::Confinement;

/// Descriptor limit of a confined worker: its sockets, a few per control or console
/// connection, disks, eventfds, and the KVM fds of a reset VM, with room to spare.
pub(crate) const MAX_OPEN_FILES: u64 = 512;

/// The newest Landlock ABI this code knows; older kernels get what they support.
const LANDLOCK_ABI: ABI = ABI::V6;

/// Why confinement could not be put in place.
#[derive(Debug, thiserror::Error)]
pub enum ConfinementError {
    /// A prctl or rlimit call failed.
    #[error("{what} failed")]
    Process {
        /// The call.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The Landlock ruleset could not be built or applied.
    #[error("landlock")]
    Landlock(#[from] landlock::RulesetError),
    /// A path the worker needs could not be opened for a Landlock rule.
    #[error("landlock rule")]
    LandlockPath(#[from] landlock::PathFdError),
    /// The seccomp filter could not be built.
    #[error("seccomp filter")]
    SeccompBuild(#[from] super::syscall_filter::FilterError),
    /// The seccomp filter could not be installed.
    #[error("seccomp install")]
    SeccompInstall(#[from] seccompiler::Error),
}

/// What the worker may touch on the filesystem.
#[derive(Debug, Clone, Default)]
pub(crate) struct FilesystemView {
    /// Read, write, create and remove anything beneath.
    pub(crate) writable_dirs: Vec<PathBuf>,
    /// Read and write (disk images).
    pub(crate) writable_files: Vec<PathBuf>,
    /// Read only (kernel, initrd, read-only disks, backing files).
    pub(crate) readable: Vec<PathBuf>,
}

/// Closes every descriptor above stderr except `keep` (the readiness pipe and the worker lock):
/// a worker starts with exactly what it was meant to inherit.
pub(crate) fn close_inherited_fds(keep: &[RawFd]) {
    for (first, last) in ranges_to_close(keep) {
        close_range(first, last);
    }
}

/// The descriptor ranges above stderr that hold none of `keep`.
fn ranges_to_close(keep: &[RawFd]) -> Vec<(u32, u32)> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter_map(|&fd| u32::try_from(fd).ok())
        .filter(|&fd| fd > 2)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut ranges = Vec::new();
    let mut first = 3u32;
    for fd in keep {
        if fd > first {
            ranges.push((first, fd - 1));
        }
        first = fd + 1;
    }
    ranges.push((first, u32::MAX));
    ranges
}

fn close_range(first: u32, last: u32) {
    // SAFETY: close_range only closes descriptors in the range; the ones this process still
    // needs were excluded by the caller, and nothing else in it owns descriptors yet (this runs
    // first thing in the worker, single-threaded).
    unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) };
}

/// Step 2: no new privileges, no core dumps, a descriptor limit, and the Landlock domain. A pool
/// worker that confined itself while idle ([`confine_idle`]) has the first three already and
/// completes its Landlock ruleset with the VM's rules.
pub(crate) fn restrict_process(
    view: &FilesystemView,
    idle: Option<IdleConfinement>,
) -> Result<Confinement, ConfinementError> {
    // The filter is on already when the worker confined itself while idle.
    let seccomp = idle.is_some();
    let base = match idle {
        Some(IdleConfinement(base)) => base,
        None => {
            restrict_basics()?;
            landlock_base()?
        }
    };
    let landlock = apply_landlock(view, base)?;
    Ok(Confinement {
        enabled: true,
        no_new_privs: true,
        seccomp,
        landlock,
    })
}

/// What a pool worker confined while it waited, before it knew its VM: no new privileges, no
/// core dumps, the descriptor limit and the seccomp allowlist are on; the Landlock ruleset holds
/// the rules no VM decides, for [`restrict_process`] to complete with the VM's.
#[derive(Debug)]
pub(crate) struct IdleConfinement(LandlockBase);

/// Confines a pool worker while it waits (see [`IdleConfinement`]).
///
/// Installing the filter costs ~0.1 ms, more on a busy host (the kernel compiles it), which a
/// start would wait for. The allowlist serves what the worker does once assigned (its runtime
/// folder, Landlock, restoring a saved state, attaching a TAP) as much as what it does later;
/// those calls reach nothing a running worker cannot (see `syscalls`).
pub(crate) fn confine_idle() -> Result<IdleConfinement, ConfinementError> {
    restrict_basics()?;
    let base = landlock_base()?;
    install_seccomp()?;
    Ok(IdleConfinement(base))
}

fn restrict_basics() -> Result<(), ConfinementError> {
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")?;
    prctl(libc::PR_SET_DUMPABLE, 0, "PR_SET_DUMPABLE")?;
    set_rlimit(libc::RLIMIT_CORE, 0, "RLIMIT_CORE")?;
    set_rlimit(libc::RLIMIT_NOFILE, MAX_OPEN_FILES, "RLIMIT_NOFILE")
}

/// A Landlock ruleset holding the rules no VM decides.
#[derive(Debug)]
struct LandlockBase(RulesetCreated);

/// The ruleset (every filesystem access handled, TCP bind and connect, abstract sockets and
/// signals scoped) with `/dev/kvm` and the worker's own `/proc` entry in it.
fn landlock_base() -> Result<LandlockBase, ConfinementError> {
    let abi = LANDLOCK_ABI;
    let all = AccessFs::from_all(abi);
    let ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(all)?
        .handle_access(AccessNet::BindTcp | AccessNet::ConnectTcp)?
        .scope(Scope::AbstractUnixSocket | Scope::Signal)?
        .create()?;
    // /dev/kvm: a reset opens it again and creates a VM through it.
    let kvm = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev;
    let ruleset = ruleset.add_rule(PathBeneath::new(PathFd::new("/dev/kvm")?, all & kvm))?;
    // Its own /proc entry: the status report reads the worker's resident memory.
    let read = AccessFs::from_read(abi);
    let ruleset = ruleset.add_rule(PathBeneath::new(PathFd::new("/proc/self")?, read))?;
    Ok(LandlockBase(ruleset))
}

fn apply_landlock(view: &FilesystemView, base: LandlockBase) -> Result<String, ConfinementError> {
    let abi = LANDLOCK_ABI;
    let all = AccessFs::from_all(abi);
    let read = AccessFs::from_read(abi);
    // A file can only carry file rights (a directory's would be refused).
    let file_rw = all & (AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate);
    let LandlockBase(mut ruleset) = base;
    for dir in &view.writable_dirs {
        ruleset = ruleset.add_rule(PathBeneath::new(PathFd::new(dir)?, all))?;
    }
    for file in &view.writable_files {
        ruleset = ruleset.add_rule(PathBeneath::new(PathFd::new(file)?, file_rw))?;
    }
    for path in &view.readable {
        let access = if path.is_dir() {
            read
        } else {
            read & AccessFs::ReadFile
        };
        ruleset = ruleset.add_rule(PathBeneath::new(PathFd::new(path)?, access))?;
    }
    let status = ruleset.restrict_self()?;
    Ok(describe(status.ruleset, status.landlock))
}

fn describe(ruleset: RulesetStatus, kernel: LandlockStatus) -> String {
    let abi = match kernel {
        LandlockStatus::Available { effective_abi, .. } => {
            format!(" (ABI {})", effective_abi as i32)
        }
        LandlockStatus::NotEnabled => " (disabled in this kernel)".to_owned(),
        LandlockStatus::NotImplemented => " (not in this kernel)".to_owned(),
    };
    let how = match ruleset {
        RulesetStatus::FullyEnforced => "fully enforced",
        RulesetStatus::PartiallyEnforced => "partially enforced",
        RulesetStatus::NotEnforced => "not enforced",
    };
    format!("{how}{abi}")
}

/// Step 3: the syscall allowlist on every thread (`clone3` answered `ENOSYS`, so that thread
/// creation goes through `clone`, whose flags the allowlist can check).
pub(crate) fn install_seccomp() -> Result<(), ConfinementError> {
    seccompiler::apply_filter_all_threads(compiled_program()?)?;
    Ok(())
}

/// The filter of [`install_seccomp`], compiled once per process: a pool worker compiles it
/// while it waits for its VM, so a start does not wait for it. The filter depends on nothing
/// about the VM.
pub(crate) fn compiled_program() -> Result<&'static BpfProgram, ConfinementError> {
    static PROGRAM: OnceLock<BpfProgram> = OnceLock::new();
    if let Some(program) = PROGRAM.get() {
        return Ok(program);
    }
    let program = super::syscall_filter::compile(&super::syscalls::allowlist())?;
    Ok(PROGRAM.get_or_init(|| program))
}

/// Installs a worker's seccomp filter on the calling thread only (and so on the threads it
/// starts later, vCPU threads included). For benchmarks that compare exits with and without the
/// filter in one process, and for integrators who confine their own vCPU threads.
pub fn install_seccomp_on_current_thread() -> Result<(), ConfinementError> {
    seccompiler::apply_filter(compiled_program()?)?;
    Ok(())
}

/// Environment variable of the confinement tests: `<vm name>:<attempt>` makes that VM's worker
/// try, once it is confined, one thing a guest that escaped might: `open-shadow` (read
/// /etc/shadow), `write-outside` (create a file outside its folders), `exec` (execve) or `socket`
/// (open a TCP socket). What happened is written to the worker's log; the last two are expected
/// to kill the process. Like `VMMS_FAULT`, only tests set it.
pub const TEST_ESCAPE_ENV: &str = "VMMS_TEST_ESCAPE";

/// Starts the attempt [`TEST_ESCAPE_ENV`] asks of the VM named `vm_name`, if any, a moment after
/// the guest started (so the launch itself succeeds).
pub(crate) fn start_test_escape(vm_name: &str) {
    let Ok(spec) = std::env::var(TEST_ESCAPE_ENV) else {
        return;
    };
    let Some((name, attempt)) = spec.split_once(':') else {
        return;
    };
    if name != vm_name {
        return;
    }
    let attempt = attempt.to_owned();
    let _ = std::thread::Builder::new()
        .name("test-escape".into())
        .spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            let outcome = try_escape(&attempt);
            log_line!("escape {attempt}: {outcome}");
        });
}

fn try_escape(attempt: &str) -> String {
    let refused = |result: io::Result<()>| match result {
        Ok(()) => "SUCCEEDED".to_owned(),
        Err(error) => format!("refused ({error})"),
    };
    match attempt {
        "open-shadow" => refused(std::fs::read("/etc/shadow").map(drop)),
        "write-outside" => {
            let path = std::env::temp_dir().join(format!("vmms-escape-{}", std::process::id()));
            refused(std::fs::write(path, b"escaped"))
        }
        "exec" => {
            let error = std::process::Command::new("/bin/true").status();
            refused(error.map(drop))
        }
        "socket" => refused(std::net::TcpListener::bind("127.0.0.1:0").map(drop)),
        other => format!("unknown attempt {other}"),
    }
}

fn prctl(
    option: libc::c_int,
    value: libc::c_ulong,
    what: &'static str,
) -> Result<(), ConfinementError> {
    // SAFETY: PR_SET_NO_NEW_PRIVS and PR_SET_DUMPABLE take plain integers and affect only this
    // process.
    let rc = unsafe { libc::prctl(option, value, 0, 0, 0) };
    if rc < 0 {
        return Err(ConfinementError::Process {
            what,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn set_rlimit(
    resource: libc::__rlimit_resource_t,
    value: u64,
    what: &'static str,
) -> Result<(), ConfinementError> {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit reads the rlimit struct we pass and affects only this process.
    let rc = unsafe { libc::setrlimit(resource, &limit) };
    if rc < 0 {
        return Err(ConfinementError::Process {
            what,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_skip_kept_descriptors_and_stdio() {
        let ranges = ranges_to_close(&[9, 4, 2, 9]);

        assert_eq!(ranges, [(3, 3), (5, 8), (10, u32::MAX)]);
    }

    #[test]
    fn nothing_kept_closes_everything_above_stderr() {
        assert_eq!(ranges_to_close(&[]), [(3, u32::MAX)]);
    }

    #[test]
    fn kernel_accepts_the_filter_and_clone3_fails_with_enosys() {
        // On a thread of its own: the filter binds that thread only, and it ends right after.
        let outcome = std::thread::spawn(|| {
            install_seccomp_on_current_thread()?;
            // SAFETY: clone3 with a null argument block is refused before it reads anything
            // (by the filter, or by the kernel with EFAULT/EINVAL without one).
            let rc = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
            Ok::<_, ConfinementError>((rc, io::Error::last_os_error().raw_os_error()))
        })
        .join()
        .unwrap();

        let (rc, errno) = outcome.unwrap();
        assert_eq!((rc, errno), (-1, Some(libc::ENOSYS)));
    }
}
