//! [`ProcessLauncher`]: starts one worker process per running VM and finds live ones again
//! after the service restarts ([`vmm_core::WorkerLauncher`]).

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use vmm_core::{EventSink, LaunchMode, VmConfig, VmId, Worker, WorkerError, WorkerLauncher};

use crate::error::{Error, Result};
use crate::process::{ExitStatus, PidFd, cmdline_has_arg, reap_child};
use crate::protocol::WorkerReport;
use crate::runtime::{RuntimeDir, StoreLayout};
use crate::supervisor::{ProcessWorker, Supervised};
use crate::worker::READY_FD_ENV;

/// Timeouts of the parent side. The defaults suit the embedded test guest and small VMs on a
/// loaded host; a daemon running large guests raises `save_timeout`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LauncherOptions {
    /// From spawning a worker to its guest running.
    pub launch_timeout: Duration,
    /// For one control request (status, pause, resume, reset, turn-off) and for connecting.
    pub request_timeout: Duration,
    /// For a save (pause + state + memory written and fsynced).
    pub save_timeout: Duration,
    /// Time between heartbeats.
    pub heartbeat_interval: Duration,
    /// Silence after which a worker is reported lost (`StopReason::HeartbeatLost`).
    pub heartbeat_timeout: Duration,
}

impl Default for LauncherOptions {
    fn default() -> Self {
        LauncherOptions {
            launch_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            save_timeout: Duration::from_secs(120),
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(5),
        }
    }
}

/// Spawns and re-finds worker processes (Hyper-V's worker process manager).
///
/// A worker is `program args… --vm <GUID> --store <DIR> [--restore <DIR>]`, started in its own
/// session with stdin from `/dev/null` and stdout/stderr into `<store>/run/<GUID>/worker.log`, so
/// it outlives the daemon. The program must end in [`crate::worker::run`].
#[derive(Debug)]
pub struct ProcessLauncher {
    store: StoreLayout,
    program: PathBuf,
    args: Vec<OsString>,
    options: LauncherOptions,
    live: Mutex<HashMap<VmId, Weak<Supervised>>>,
}

impl ProcessLauncher {
    /// A launcher for the store at `store_root` running `program` with `args` before the worker
    /// arguments (the reference daemon passes its own executable and `["worker"]`).
    pub fn new(
        store_root: impl Into<PathBuf>,
        program: impl Into<PathBuf>,
        args: impl IntoIterator<Item = impl Into<OsString>>,
    ) -> Self {
        ProcessLauncher {
            store: StoreLayout::new(store_root),
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            options: LauncherOptions::default(),
            live: Mutex::new(HashMap::new()),
        }
    }

    /// Replaces the timeouts.
    pub fn with_options(mut self, options: LauncherOptions) -> Self {
        self.options = options;
        self
    }

    /// The timeouts in use.
    pub fn options(&self) -> &LauncherOptions {
        &self.options
    }

    /// The runtime folder of `vm`'s worker (its console socket is there).
    pub fn runtime_dir(&self, vm: VmId) -> RuntimeDir {
        self.store.runtime(vm)
    }

    /// Asks `vm`'s attached worker for its [`WorkerReport`], waiting at most `timeout`; `None`
    /// when no worker is attached for `vm`.
    pub fn report(&self, vm: VmId, timeout: Duration) -> Option<Result<WorkerReport>> {
        let supervised = self.lock_live().get(&vm).and_then(Weak::upgrade)?;
        let report = supervised.client().and_then(|c| c.status(timeout));
        if let Ok(report) = &report {
            supervised.check_report(report);
        }
        Some(report)
    }

    fn lock_live(&self) -> std::sync::MutexGuard<'_, HashMap<VmId, Weak<Supervised>>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn register(&self, supervised: &Arc<Supervised>) {
        let mut live = self.lock_live();
        live.retain(|_, weak| weak.strong_count() > 0);
        live.insert(supervised.vm(), Arc::downgrade(supervised));
    }

    /// Spawns the worker and waits for its readiness line.
    fn spawn(&self, vm: VmId, restore: Option<&Path>) -> Result<PidFd> {
        let runtime = self.store.runtime(vm);
        runtime.create().map_err(|e| Error::io(runtime.path(), e))?;
        if let Some(pid) = live_worker(&runtime, vm) {
            return Err(Error::AlreadyRunning { pid });
        }
        runtime.remove_live_files(0);
        let log_path = runtime.log_file();
        // Never through a link: a link planted here would have our truncate hit its target.
        let log = File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&log_path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "worker.log is a symbolic link; refusing to follow it",
                ),
                _ => e,
            })
            .map_err(|e| Error::io(&log_path, e))?;
        let log_err = log.try_clone().map_err(|e| Error::io(&log_path, e))?;
        let (ready_rx, ready_tx) = io::pipe().map_err(|e| Error::io("pipe", e))?;
        let ready_fd = ready_tx.as_raw_fd();

        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .arg("--vm")
            .arg(vm.to_string())
            .arg("--store")
            .arg(self.store.root());
        if let Some(dir) = restore {
            command.arg("--restore").arg(dir);
        }
        command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .env(READY_FD_ENV, ready_fd.to_string());
        // SAFETY: the closure runs in the forked child before exec and calls only
        // async-signal-safe functions (setsid, sigprocmask, fcntl) on values it owns.
        unsafe {
            command.pre_exec(move || prepare_child(ready_fd));
        }
        let spawned = command.spawn();
        // The child has its copy; ours must go so that the pipe reports EOF if the child dies.
        drop(ready_tx);
        drop(command);
        let child = spawned.map_err(|source| Error::Spawn {
            program: self.program.clone(),
            source,
        })?;
        let pid = child.id();
        // The child is reaped by the exit watcher (waitpid), not through `Child`.
        drop(child);
        let pidfd = PidFd::open(pid).map_err(|e| Error::io(format!("/proc/{pid}"), e))?;

        match read_ready(ready_rx, self.options.launch_timeout) {
            Ok(line) if line == "ready" => Ok(pidfd),
            outcome => {
                // It never became ready: make sure it is gone, then say why.
                let _ = pidfd.send_signal(libc::SIGKILL);
                let _ = pidfd.wait(None, Some(Duration::from_secs(5)));
                let status = reap_child(pid);
                runtime.remove_live_files(pid);
                Err(start_failure(outcome, status, &runtime))
            }
        }
    }

    /// Supervises the worker `pidfd` and asks for its first report (which also reports a guest
    /// that stopped while nobody was connected).
    fn attach(
        &self,
        vm: VmId,
        pidfd: PidFd,
        events: EventSink,
    ) -> Result<(Arc<Supervised>, Result<WorkerReport>)> {
        let runtime = self.store.runtime(vm);
        let supervised = Supervised::start(vm, pidfd, runtime, self.options.clone(), events)?;
        let report = supervised
            .client()
            .and_then(|c| c.status(self.options.request_timeout));
        if let Ok(report) = &report {
            supervised.check_report(report);
        }
        self.register(&supervised);
        Ok((supervised, report))
    }
}

impl WorkerLauncher for ProcessLauncher {
    fn launch(
        &self,
        vm: &VmConfig,
        mode: LaunchMode,
        events: EventSink,
    ) -> std::result::Result<Box<dyn Worker>, WorkerError> {
        let restore = match &mode {
            LaunchMode::Boot => None,
            LaunchMode::RestoreSaved { state_dir } => Some(state_dir.as_path()),
        };
        let pidfd = self.spawn(vm.id, restore)?;
        let (supervised, report) = self.attach(vm.id, pidfd, events)?;
        match report {
            Ok(_) => Ok(Box::new(ProcessWorker::new(supervised))),
            Err(error) => {
                // Ready but unreachable: nobody could drive it, so it must not linger.
                supervised.abandon();
                Err(error.into())
            }
        }
    }

    fn reattach(
        &self,
        vm: VmId,
        events: EventSink,
    ) -> std::result::Result<Option<Box<dyn Worker>>, WorkerError> {
        let runtime = self.store.runtime(vm);
        let pid = match runtime.read_pid() {
            Ok(Some(pid)) => pid,
            Ok(None) => {
                runtime.remove_live_files(0);
                return Ok(None);
            }
            Err(e) => return Err(Error::io(runtime.pid_file(), e).into()),
        };
        let pidfd = match PidFd::open(pid) {
            Ok(pidfd) if cmdline_has_arg(pid, &vm.to_string()) => pidfd,
            // Dead, or the pid now belongs to an unrelated process: a stale entry.
            _ => {
                runtime.remove_live_files(pid);
                return Ok(None);
            }
        };
        let (supervised, report) = self.attach(vm, pidfd, events)?;
        if report.is_err() && supervised.process_gone() {
            supervised.abandon();
            runtime.remove_live_files(pid);
            return Ok(None);
        }
        // Alive and ours but possibly not answering: attached either way. A silent worker's
        // status says NotResponding and the service treats it as lost (turn-off kills it, the
        // recovery action follows).
        Ok(Some(Box::new(ProcessWorker::new(supervised))))
    }
}

/// Why a worker never became ready: its own error line, a timeout, or how it died (with the last
/// line of its log).
fn start_failure(
    outcome: Result<String>,
    status: Option<ExitStatus>,
    runtime: &RuntimeDir,
) -> Error {
    let message = match outcome {
        Ok(line) => line.strip_prefix("error: ").unwrap_or(&line).to_owned(),
        Err(Error::Timeout(waited)) => format!("not ready within {waited:?}"),
        Err(_) => {
            let how = match status {
                Some(ExitStatus {
                    signal: Some(signal),
                    ..
                }) => format!("killed by signal {signal}"),
                Some(ExitStatus {
                    code: Some(code), ..
                }) => format!("exit code {code}"),
                _ => "exited".to_owned(),
            };
            let last = runtime.last_log_line().unwrap_or_default();
            format!("worker ended during start-up ({how}): {last}")
        }
    };
    Error::StartFailed { message }
}

/// The pid of a live worker already serving `vm` from `runtime`, if there is one.
fn live_worker(runtime: &RuntimeDir, vm: VmId) -> Option<u32> {
    let pid = runtime.read_pid().ok()??;
    let alive = PidFd::open(pid).is_ok_and(|p| !p.has_exited());
    (alive && cmdline_has_arg(pid, &vm.to_string())).then_some(pid)
}

/// In the forked child, before exec: a session of its own (no terminal signals, survives the
/// daemon), an empty signal mask, and the readiness pipe kept open across exec.
fn prepare_child(ready_fd: RawFd) -> io::Result<()> {
    // SAFETY: setsid, sigemptyset, sigprocmask and fcntl are async-signal-safe and act only on
    // this (single-threaded, just forked) process and its own descriptor.
    unsafe {
        if libc::setsid() < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        if libc::fcntl(ready_fd, libc::F_SETFD, 0) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Reads the worker's one readiness line; EOF without one means it died.
fn read_ready(mut pipe: io::PipeReader, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    let mut line = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Timeout(timeout));
        }
        let mut fds = [libc::pollfd {
            fd: pipe.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let wait_ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `fds` is a valid array of one pollfd.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 1, wait_ms) };
        if rc < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::io("ready pipe", error));
        }
        if rc == 0 {
            continue;
        }
        let n = pipe
            .read(&mut buf)
            .map_err(|e| Error::io("ready pipe", e))?;
        if n == 0 {
            return Err(Error::Disconnected);
        }
        line.extend_from_slice(&buf[..n]);
        if let Some(end) = line.iter().position(|&b| b == b'\n') {
            return Ok(String::from_utf8_lossy(&line[..end]).trim().to_owned());
        }
        if line.len() > 64 * 1024 {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
    }
}
