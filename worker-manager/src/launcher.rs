//! [`ProcessLauncher`]: starts one worker process per running VM and finds live ones again
//! after the service restarts ([`vmm_core::WorkerLauncher`]).

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use vmm_core::{EventSink, LaunchMode, VmConfig, VmId, Worker, WorkerError, WorkerLauncher, fault};

use crate::client::ControlClient;
use crate::error::{Error, Result};
use crate::pool::{
    Assignment, IdleWorker, PoolMessage, PoolSpawner, WorkerPool, send_assignment, send_lock,
};
use crate::process::{ExitStatus, PidFd, poll_readable, reap_child};
use crate::protocol::{ProtocolError, WorkerReport, read_frame};
use crate::runtime::{RuntimeDir, StoreLayout};
use crate::supervisor::{ProcessWorker, Supervised};
use crate::worker::READY_FD_ENV;
use crate::worker_lock::{LOCK_FD_ENV, WorkerLock};

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
    /// Silence after which a worker is reported not responding (HealthState 20; nothing is done
    /// to it yet).
    pub heartbeat_timeout: Duration,
    /// Silence after which a worker is reported hung: the VM's recovery action then decides
    /// whether it is killed (restart) or left alone (none). A worker stopped for a while (a
    /// debugger, SIGSTOP, a host under memory pressure) must not be killed on a hair trigger.
    pub hang_timeout: Duration,
    /// Confine workers (seccomp, Landlock, no new privileges, rlimits); `false` passes
    /// `--no-confinement`, for debugging only.
    pub confine: bool,
    /// Workers kept started and idle, so that a VM's start does not wait for a process to be
    /// spawned (see the `pool` module notes); 0 spawns each VM's worker when it starts. The
    /// pool fills once the launcher first launches a worker or is asked to
    /// ([`ProcessLauncher::fill_pool`]).
    pub pool_size: usize,
}

impl Default for LauncherOptions {
    fn default() -> Self {
        LauncherOptions {
            launch_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            save_timeout: Duration::from_secs(120),
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(5),
            hang_timeout: Duration::from_secs(30),
            confine: true,
            pool_size: 1,
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
    pool: WorkerPool,
}

impl ProcessLauncher {
    /// A launcher for the store at `store_root` running `program` with `args` before the worker
    /// arguments (the reference daemon passes its own executable and `["worker"]`).
    pub fn new(
        store_root: impl Into<PathBuf>,
        program: impl Into<PathBuf>,
        args: impl IntoIterator<Item = impl Into<OsString>>,
    ) -> Self {
        let store = StoreLayout::new(store_root);
        let program = program.into();
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let options = LauncherOptions::default();
        let pool = pool_for(&store, &program, &args, &options);
        ProcessLauncher {
            store,
            program,
            args,
            options,
            live: Mutex::new(HashMap::new()),
            pool,
        }
    }

    /// Replaces the timeouts, the confinement switch and the pool size.
    pub fn with_options(mut self, options: LauncherOptions) -> Self {
        self.pool = pool_for(&self.store, &self.program, &self.args, &options);
        self.options = options;
        self
    }

    /// Starts filling the pool of idle workers in the background (a daemon calls this once it
    /// is up; the first launch does it otherwise). Nothing happens when the pool size is 0.
    pub fn fill_pool(&self) {
        self.pool.fill();
    }

    /// The pids of the workers idle in the pool now.
    pub fn idle_workers(&self) -> Vec<u32> {
        self.pool.idle_pids()
    }

    /// Why the pool could not start its last worker, while none has started since (a worker
    /// program that does not understand `--pool`, a host without `/dev/kvm`, …). Launches then
    /// spawn their workers themselves.
    pub fn pool_error(&self) -> Option<String> {
        self.pool.last_error()
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

    /// Starts the VM's worker (an idle one from the pool when there is one, a new process
    /// otherwise) and waits until it reports ready.
    ///
    /// The runtime folder's lock is taken before the worker exists (or may touch the runtime
    /// folder) and handed to it, so a service that looks at any instant from here on (a daemon
    /// restarted while this one is killed mid-launch) sees that a worker runs or is starting. A
    /// pool worker gets its assignment first and builds the VM while the lock is taken.
    fn spawn(
        &self,
        vm: VmId,
        restore: Option<&Path>,
        handed_off: &mut dyn FnMut(),
    ) -> Result<Started> {
        let runtime = self.store.runtime(vm);
        // A pool worker starts on its VM at once and builds it while the lock is taken here;
        // it writes nothing in the runtime folder before it has the lock.
        let assignment = Assignment {
            vm,
            restore: restore.map(Path::to_path_buf),
        };
        let idle = self.pool.take().and_then(|idle| {
            if send_assignment(&idle.channel, &assignment).is_ok() {
                return Some(idle);
            }
            // It died while idle: a new process is started instead.
            idle.kill(self.store.root());
            None
        });
        let lock = match self.lock_runtime(&runtime, idle.is_some()) {
            Ok(lock) => lock,
            Err(error) => {
                // Whatever the worker built for the VM is not to run.
                if let Some(idle) = idle {
                    idle.kill(self.store.root());
                }
                return Err(error);
            }
        };
        // The worker's files, prepared while it waited, become the VM's. Files that cannot be
        // moved (the idle folder tampered with) cost that worker, not the start.
        let idle = idle.and_then(|idle| {
            match runtime.take_in(&self.store.idle_folder(idle.pidfd.pid())) {
                Ok(()) => Some(idle),
                Err(_) => {
                    idle.kill(self.store.root());
                    None
                }
            }
        });
        fault::point("launch.locked");
        if let Some(idle) = idle {
            // Unsent only when the worker already ended (it said why, which is read next).
            let _ = send_lock(&idle.channel, lock.as_raw_fd());
            // The worker has its copy: the lock is held by it alone from here on.
            drop(lock);
            fault::point("launch.after-spawn");
            handed_off();
            return self.await_pool_ready(idle, &runtime);
        }
        let log = runtime
            .start_log()
            .map_err(|e| Error::io(runtime.log_file(), e))?;
        self.spawn_process(vm, restore, &runtime, lock, log, handed_off)
            .map(|pidfd| Started {
                pidfd,
                channel: None,
            })
    }

    /// Creates (or checks) the VM's runtime folder and takes its lock, so that no other worker
    /// runs or starts for the VM, then removes what an earlier worker left there.
    ///
    /// A pool worker brings its own log and moves it in without following a link; one planted as
    /// `worker.log` is refused all the same, as `start_log` refuses it for a spawned worker.
    fn lock_runtime(&self, runtime: &RuntimeDir, pooled: bool) -> Result<WorkerLock> {
        runtime.create().map_err(|e| Error::io(runtime.path(), e))?;
        let lock = WorkerLock::try_acquire(runtime)
            .map_err(|e| Error::io(runtime.lock_file(), e))?
            .ok_or(Error::AlreadyRunning)?;
        // We hold the lock, so no worker owns what is left in the folder.
        runtime.remove_stale_files();
        if pooled {
            runtime
                .check_log_file()
                .map_err(|e| Error::io(runtime.log_file(), e))?;
        }
        Ok(lock)
    }

    /// Waits for the pool worker that was just assigned its VM to report ready.
    fn await_pool_ready(&self, idle: IdleWorker, runtime: &RuntimeDir) -> Result<Started> {
        match read_pool_ready(&idle.channel, self.options.launch_timeout) {
            Ok(PoolReady::Ready(report)) => {
                fault::point("launch.after-ready");
                let IdleWorker { pidfd, channel } = idle;
                self.pool.remove_folder_later(pidfd.pid());
                Ok(Started {
                    pidfd,
                    channel: Some((channel, report)),
                })
            }
            outcome => {
                let outcome = outcome.map(|said| match said {
                    PoolReady::Line(line) => line,
                    PoolReady::Ready(_) => "ready".to_owned(),
                });
                let pid = idle.pidfd.pid();
                let status = idle.kill(self.store.root());
                runtime.remove_live_files(pid);
                Err(start_failure(outcome, status, runtime))
            }
        }
    }

    /// Spawns a new worker process for `vm` and waits for its readiness line.
    fn spawn_process(
        &self,
        vm: VmId,
        restore: Option<&Path>,
        runtime: &RuntimeDir,
        lock: WorkerLock,
        log: File,
        handed_off: &mut dyn FnMut(),
    ) -> Result<PidFd> {
        let log_path = runtime.log_file();
        let log_err = log.try_clone().map_err(|e| Error::io(&log_path, e))?;
        let (ready_rx, ready_tx) = io::pipe().map_err(|e| Error::io("pipe", e))?;
        let ready_fd = ready_tx.as_raw_fd();
        let lock_fd = lock.as_raw_fd();

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
        if !self.options.confine {
            command.arg("--no-confinement");
        }
        command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .env(READY_FD_ENV, ready_fd.to_string())
            .env(LOCK_FD_ENV, lock_fd.to_string());
        let spawned = spawn_worker(&mut command, [ready_fd, lock_fd], &self.program);
        // The child has its copies; ours must go so that the pipe reports EOF if the child dies
        // and the lock is held by the child alone.
        drop(ready_tx);
        drop(lock);
        drop(command);
        let pid = spawned?;
        fault::point("launch.after-spawn");
        handed_off();
        let pidfd = PidFd::open(pid).map_err(|e| Error::io(format!("/proc/{pid}"), e))?;

        match read_ready(ready_rx, self.options.launch_timeout) {
            Ok(line) if line == "ready" => {
                fault::point("launch.after-ready");
                Ok(pidfd)
            }
            outcome => {
                // It never became ready: make sure it is gone, then say why.
                let _ = pidfd.send_signal(libc::SIGKILL);
                let _ = pidfd.wait(None, Some(Duration::from_secs(5)));
                let status = reap_child(pid);
                runtime.remove_live_files(pid);
                Err(start_failure(outcome, status, runtime))
            }
        }
    }

    /// Finds the worker that holds `runtime`'s lock through its control socket, waiting while it
    /// is still starting (its socket not yet there). `Ok(None)` once the lock is free: there is no
    /// worker, or it died meanwhile.
    fn find_live_worker(&self, vm: VmId, runtime: &RuntimeDir) -> Result<Option<PidFd>> {
        let deadline = Instant::now() + self.options.launch_timeout;
        loop {
            let held =
                WorkerLock::is_held(runtime).map_err(|e| Error::io(runtime.lock_file(), e))?;
            if !held {
                return Ok(None);
            }
            match identify(vm, runtime, self.options.request_timeout) {
                Ok(pidfd) => return Ok(Some(pidfd)),
                // Another user's process, or another VM's worker: never adopt it.
                Err(error @ (Error::ForeignPeer { .. } | Error::WrongWorker { .. })) => {
                    return Err(error);
                }
                Err(error) if Instant::now() >= deadline => return Err(error),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
    /// Supervises the worker `pidfd` and asks for its first report (which also reports a guest
    /// that stopped while nobody was connected).
    /// A pool worker's socket pair (`channel`) becomes its control connection, and the report
    /// it came with is its first.
    fn attach(
        &self,
        vm: VmId,
        pidfd: PidFd,
        channel: Option<(UnixStream, Box<WorkerReport>)>,
        events: EventSink,
    ) -> Result<(Arc<Supervised>, Result<WorkerReport>)> {
        let runtime = self.store.runtime(vm);
        let supervised = Supervised::start(vm, pidfd, runtime, self.options.clone(), events)?;
        let first = channel.and_then(|(channel, report)| {
            // Without the pair the worker is still reachable through its control socket.
            supervised.adopt(channel).ok().map(|()| *report)
        });
        let report = match first {
            Some(report) => Ok(report),
            None => supervised
                .client()
                .and_then(|c| c.status(self.options.request_timeout)),
        };
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
        self.launch_handing_off(vm, mode, events, &mut || {})
    }

    /// Hands off once a pool worker has the VM's lock (its files moved in), or once a new
    /// worker process is spawned.
    fn launch_handing_off(
        &self,
        vm: &VmConfig,
        mode: LaunchMode,
        events: EventSink,
        handed_off: &mut dyn FnMut(),
    ) -> std::result::Result<Box<dyn Worker>, WorkerError> {
        let restore = match &mode {
            LaunchMode::Boot => None,
            LaunchMode::RestoreSaved { state_dir } => Some(state_dir.as_path()),
        };
        // The replacement for the worker this launch takes prepares for a VM like this one.
        self.pool.expect_shape(vm.memory_mib, vm.vcpus);
        let started = self.spawn(vm.id, restore, handed_off);
        // The pool (re)fills after the first launch, a moment after this one's worker was taken.
        self.pool.fill();
        let started = started?;
        let (supervised, report) = self.attach(vm.id, started.pidfd, started.channel, events)?;
        fault::point("launch.attached");
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
        if !runtime.path().exists() {
            return Ok(None);
        }
        let Some(pidfd) = self.find_live_worker(vm, &runtime)? else {
            // Nobody holds the lock: what the folder holds is left over from a dead worker.
            if let Some(lock) =
                WorkerLock::try_acquire(&runtime).map_err(|e| Error::io(runtime.lock_file(), e))?
            {
                runtime.remove_stale_files();
                drop(lock);
            }
            return Ok(None);
        };
        let pid = pidfd.pid();
        let (supervised, report) = self.attach(vm, pidfd, None, events)?;
        if report.is_err() && supervised.process_gone() {
            supervised.abandon();
            runtime.remove_live_files(pid);
            return Ok(None);
        }
        // Alive and ours but possibly not answering: attached either way. A silent worker's
        // status says NotResponding; its heartbeat reports it hung if it stays silent.
        Ok(Some(Box::new(ProcessWorker::new(supervised))))
    }
}

/// The pid of the worker serving `runtime`'s control socket, proven by the socket's peer
/// credentials and the handshake (see [`ControlClient::connect`]), with a pidfd on it.
fn identify(vm: VmId, runtime: &RuntimeDir, timeout: Duration) -> Result<PidFd> {
    let client = ControlClient::connect(&runtime.control_socket(), Some(vm), timeout, |_| {})?;
    let pidfd = PidFd::open(client.pid()).map_err(|e| Error::io("pidfd_open", e))?;
    // The pid could in theory have been recycled between the handshake and pidfd_open; a
    // worker that still answers on the same connection after it proves it was not.
    client.status(timeout)?;
    Ok(pidfd)
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

/// A worker started for a VM: its pidfd and, for a pool worker, its control connection and the
/// report it sent with its readiness.
struct Started {
    pidfd: PidFd,
    channel: Option<(UnixStream, Box<WorkerReport>)>,
}

/// The pool a launcher with `options` keeps, starting workers as the launcher would.
fn pool_for(
    store: &StoreLayout,
    program: &Path,
    args: &[OsString],
    options: &LauncherOptions,
) -> WorkerPool {
    WorkerPool::new(
        PoolSpawner {
            program: program.to_path_buf(),
            args: args.to_vec(),
            store: store.root().to_path_buf(),
            confine: options.confine,
            shape: Default::default(),
        },
        options.pool_size,
    )
}

/// A pool worker's answer to its assignment.
enum PoolReady {
    /// Its guest runs; its first report.
    Ready(Box<WorkerReport>),
    /// What it said instead, as an exec'd worker's line (`error: …`).
    Line(String),
}

/// A pool worker's answer to its assignment (errors as [`read_ready`] gives them).
fn read_pool_ready(channel: &UnixStream, timeout: Duration) -> Result<PoolReady> {
    channel
        .set_read_timeout(Some(timeout))
        .map_err(|e| Error::io("pool socket", e))?;
    let said = read_frame::<PoolMessage>(&mut &*channel);
    channel
        .set_read_timeout(None)
        .map_err(|e| Error::io("pool socket", e))?;
    match said {
        Ok(Some(PoolMessage::Ready { report })) => Ok(PoolReady::Ready(report)),
        Ok(Some(PoolMessage::Failed { reason })) => Ok(PoolReady::Line(format!("error: {reason}"))),
        Ok(Some(PoolMessage::Idle)) => Ok(PoolReady::Line(
            "error: pool worker answered idle".to_owned(),
        )),
        Ok(None) => Err(Error::Disconnected),
        Err(ProtocolError::Io(e))
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Err(Error::Timeout(timeout))
        }
        Err(_) => Err(Error::Disconnected),
    }
}

/// Spawns a worker from `command`, prepared by [`prepare_child`] to keep `keep` open across
/// exec; returns its pid. The child is reaped by the exit watcher (waitpid), not through
/// `Child`, so the handle is let go at once.
pub(crate) fn spawn_worker<const N: usize>(
    command: &mut Command,
    keep: [RawFd; N],
    program: &Path,
) -> Result<u32> {
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (setsid, sigprocmask, fcntl) on values it owns.
    unsafe {
        command.pre_exec(move || prepare_child(&keep));
    }
    let child = command.spawn().map_err(|source| Error::Spawn {
        program: program.to_path_buf(),
        source,
    })?;
    Ok(child.id())
}

/// In the forked child, before exec: a session of its own (no terminal signals, survives the
/// daemon), an empty signal mask, and the given descriptors (readiness pipe and worker lock, or a
/// pool worker's socket pair) kept open across exec.
pub(crate) fn prepare_child(keep: &[RawFd]) -> io::Result<()> {
    // SAFETY: setsid, sigemptyset, sigprocmask and fcntl are async-signal-safe and act only on
    // this (single-threaded, just forked) process and its own descriptors.
    unsafe {
        if libc::setsid() < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        for &fd in keep {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
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
        let readable = poll_readable(&[pipe.as_raw_fd()], Some(left))
            .map_err(|e| Error::io("ready pipe", e))?;
        if readable.is_none() {
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
