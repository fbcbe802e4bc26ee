//! [`ProcessWorker`]: the parent's handle on one worker process, and the two threads that watch
//! it — exit (a pidfd: seen the moment the process ends, child or not) and heartbeat (a status
//! request every interval: a worker that stops answering is reported as lost).
//!
//! Every way a worker can end reaches the service exactly once, as one `WorkerEvent::Stopped`:
//! the guest's own stop (a notice from the worker), the process's death, or a lost heartbeat —
//! whichever is seen first — and none at all for the exits the service asked for (save,
//! turn-off).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use std::os::fd::AsRawFd;

use vmm_core::integration::{BackupCaptureReport, BackupCaptureRequest, BackupMergeRequest};
use vmm_core::integration::{GuestAgentInfo, GuestFreezeStatus, GuestHeartbeat};
use vmm_core::{
    CheckpointReport, CheckpointRequest, EventSink, StopReason, VmId, Worker, WorkerError,
    WorkerEvent, WorkerStatus,
};
use vmm_sys_util::eventfd::EventFd;

use crate::client::ControlClient;
use crate::error::Error;
use crate::launcher::LauncherOptions;
use crate::process::{ExitStatus, PidFd, poll_readable, reap_child};
use crate::protocol::{
    GuestAgentReply, GuestAgentRequest, GuestState, Notice, Reply, Request, WorkerReport,
};
use crate::runtime::RuntimeDir;

/// After a save or turn-off reply, how long the worker gets to exit before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(3);
/// How long a killed worker gets to disappear.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How long the exit watcher waits for the last notices of a worker that exited.
/// Generous: on a loaded host the connection's reader thread may wait its turn for a while.
const NOTICE_DRAIN: Duration = Duration::from_secs(2);

/// What is known about the process's end.
#[derive(Debug, Default)]
struct ExitState {
    /// Set once the process has exited; holds its status when we could reap it.
    exited: Option<Option<ExitStatus>>,
    /// Set once the worker said its guest stopped (whether or not that was reported).
    guest_stopped: Option<StopReason>,
}

/// Everything the handle and the watcher threads share about one worker.
#[derive(Debug)]
pub(crate) struct Supervised {
    vm: VmId,
    pidfd: PidFd,
    runtime: RuntimeDir,
    options: LauncherOptions,
    client: Mutex<Option<Arc<ControlClient>>>,
    events: EventSink,
    /// A `Stopped` event was sent (or is no longer wanted): never send another.
    reported: AtomicBool,
    /// The service asked the worker to end (save, turn-off): its exit is not a failure.
    finishing: AtomicBool,
    /// It is not answering its heartbeat: turn-off kills without asking first.
    hung: AtomicBool,
    exit: Mutex<ExitState>,
    exit_changed: Condvar,
    /// Readable once the handle is dropped: the watcher threads end.
    cancel: EventFd,
    /// What the worker last said of its guest's agent (notices and heartbeat reports): read by
    /// every `get-vm` without a round trip.
    guest_heartbeat: Mutex<Option<GuestHeartbeat>>,
}

impl Supervised {
    /// Starts supervising the worker `pidfd`, reachable at `runtime`'s control socket: connects
    /// (when `connect`), then starts the exit watcher and heartbeat threads.
    pub(crate) fn start(
        vm: VmId,
        pidfd: PidFd,
        runtime: RuntimeDir,
        options: LauncherOptions,
        events: EventSink,
    ) -> Result<Arc<Self>, Error> {
        let cancel = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::io("eventfd", e))?;
        let supervised = Arc::new(Supervised {
            vm,
            pidfd,
            runtime,
            options,
            client: Mutex::new(None),
            events,
            reported: AtomicBool::new(false),
            finishing: AtomicBool::new(false),
            hung: AtomicBool::new(false),
            exit: Mutex::new(ExitState::default()),
            exit_changed: Condvar::new(),
            cancel,
            guest_heartbeat: Mutex::new(None),
        });
        let pid = supervised.pid();
        let watcher = Arc::clone(&supervised);
        std::thread::Builder::new()
            .name(format!("wm-exit-{pid}"))
            .spawn(move || watcher.watch_exit())
            .map_err(Error::Thread)?;
        let heart = Arc::clone(&supervised);
        std::thread::Builder::new()
            .name(format!("wm-beat-{pid}"))
            .spawn(move || heart.heartbeat())
            .map_err(Error::Thread)?;
        Ok(supervised)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pidfd.pid()
    }

    pub(crate) fn vm(&self) -> VmId {
        self.vm
    }

    fn lock_exit(&self) -> std::sync::MutexGuard<'_, ExitState> {
        self.exit.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn has_exited(&self) -> bool {
        self.lock_exit().exited.is_some()
    }

    /// The live control connection, connecting (again) if there is none.
    pub(crate) fn client(self: &Arc<Self>) -> Result<Arc<ControlClient>, Error> {
        let mut slot = self.client.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(client) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(Arc::clone(client));
        }
        let client = ControlClient::connect(
            &self.runtime.control_socket(),
            Some(self.vm),
            self.options.request_timeout,
            self.notice_handler(),
        )?;
        if client.pid() != self.pid() {
            return Err(Error::WrongWorker {
                vm: client.vm(),
                pid: client.pid(),
            });
        }
        let client = Arc::new(client);
        *slot = Some(Arc::clone(&client));
        Ok(client)
    }

    /// Makes a pool worker's socket pair, on which it just reported ready, the control
    /// connection (see the `pool` module notes).
    pub(crate) fn adopt(
        self: &Arc<Self>,
        channel: std::os::unix::net::UnixStream,
    ) -> Result<(), Error> {
        let client = ControlClient::adopt(channel, self.vm, self.pid(), self.notice_handler())?;
        *self.client.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(client));
        Ok(())
    }

    /// What a control connection does with the worker's notices.
    fn notice_handler(self: &Arc<Self>) -> impl Fn(Notice) + Send + 'static {
        let weak: Weak<Supervised> = Arc::downgrade(self);
        move |notice| {
            if let Some(supervised) = weak.upgrade() {
                supervised.on_notice(notice);
            }
        }
    }

    fn on_notice(&self, notice: Notice) {
        match notice {
            Notice::GuestStopped { reason } => {
                self.note_guest_stopped(&reason);
                self.report(reason);
            }
            Notice::StateChanged { state } => {
                if let Some(status) = worker_status(&state)
                    && !self.finishing.load(Ordering::SeqCst)
                {
                    self.events.send(WorkerEvent::StateChanged(status));
                }
            }
            Notice::GuestHeartbeat { heartbeat } => self.set_guest_heartbeat(Some(heartbeat)),
        }
    }

    fn set_guest_heartbeat(&self, heartbeat: Option<GuestHeartbeat>) {
        *self
            .guest_heartbeat
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = heartbeat;
    }

    fn guest_heartbeat(&self) -> Option<GuestHeartbeat> {
        if self.has_exited() {
            return None;
        }
        *self
            .guest_heartbeat
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn note_guest_stopped(&self, reason: &StopReason) {
        self.lock_exit()
            .guest_stopped
            .get_or_insert_with(|| reason.clone());
        self.exit_changed.notify_all();
    }

    /// Waits until the worker says its guest stopped, or the process exits, or `timeout` passes.
    fn wait_guest_stopped(&self, timeout: Duration) -> Option<StopReason> {
        let state = self.lock_exit();
        let (state, _) = self
            .exit_changed
            .wait_timeout_while(state, timeout, |s| {
                s.guest_stopped.is_none() && s.exited.is_none()
            })
            .unwrap_or_else(PoisonError::into_inner);
        match (&state.guest_stopped, state.exited) {
            (Some(reason), _) => Some(reason.clone()),
            (None, Some(status)) => Some(StopReason::WorkerExited {
                code: status.and_then(|s| s.code),
                signal: status.and_then(|s| s.signal),
            }),
            (None, None) => None,
        }
    }

    /// Reports the worker's end to the service, once, unless the service asked for it.
    fn report(&self, reason: StopReason) {
        if self.finishing.load(Ordering::SeqCst) || self.reported.swap(true, Ordering::SeqCst) {
            return;
        }
        self.events.send(WorkerEvent::Stopped(reason));
    }

    /// A report's news the notice may have missed (it was sent while nobody was connected).
    pub(crate) fn check_report(&self, report: &WorkerReport) {
        self.set_guest_heartbeat(report.guest_heartbeat);
        if let GuestState::Stopped { reason } = &report.state {
            self.note_guest_stopped(reason);
            self.report(reason.clone());
        }
    }

    /// Exit watcher thread: waits on the pidfd, reaps, cleans up, reports.
    fn watch_exit(&self) {
        match self.pidfd.wait(Some(self.cancel.as_raw_fd()), None) {
            Ok(true) => {}
            // Cancelled (the handle was dropped: detached) or poll failed.
            Ok(false) | Err(_) => return,
        }
        // Only a parent can reap; for a re-attached worker the status stays unknown.
        let status = reap_child(self.pid());
        // What the worker said last (its guest saved, powered off) may still be in the socket
        // behind the exit: read it before deciding why the worker ended.
        self.drain_notices();
        // Clean up before announcing the exit: whoever waits for it (turn-off) may start the
        // VM's next worker at once, whose files must not be mistaken for these.
        self.runtime.remove_live_files(self.pid());
        let said = {
            let mut exit = self.lock_exit();
            exit.exited = Some(status);
            exit.guest_stopped.clone()
        };
        self.exit_changed.notify_all();
        let (code, signal) = status.map_or((None, None), |s| (s.code, s.signal));
        self.report(said.unwrap_or(StopReason::WorkerExited { code, signal }));
    }

    /// Waits (briefly) until the control connection has delivered everything the exited worker
    /// sent: its reader sees the end of the stream only after the last notice.
    fn drain_notices(&self) {
        let client = self
            .client
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(client) = client else { return };
        let deadline = Instant::now() + NOTICE_DRAIN;
        while !client.is_closed() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Heartbeat thread: one status request per interval. Silence past the heartbeat timeout is
    /// reported as not responding, past the hang timeout as hung (the service applies the VM's
    /// recovery action); an answer after either is reported too. It runs until the process
    /// exits or the handle is dropped.
    fn heartbeat(self: Arc<Self>) {
        let mut last_answer = Instant::now();
        let mut not_responding = false;
        let mut hung = false;
        loop {
            if !self.sleep(self.options.heartbeat_interval) {
                return;
            }
            if self.has_exited() || self.reported.load(Ordering::SeqCst) {
                return;
            }
            let answer = self
                .client()
                .and_then(|c| c.status(self.options.heartbeat_timeout));
            match answer {
                Ok(report) => {
                    last_answer = Instant::now();
                    if not_responding {
                        not_responding = false;
                        hung = false;
                        self.hung.store(false, Ordering::SeqCst);
                        self.notify(WorkerEvent::Responding);
                    }
                    self.check_report(&report);
                }
                Err(_) if self.has_exited() || self.pidfd.has_exited() => return,
                Err(_) => {
                    let silent_for = last_answer.elapsed();
                    if !not_responding && silent_for >= self.options.heartbeat_timeout {
                        not_responding = true;
                        self.hung.store(true, Ordering::SeqCst);
                        self.notify(WorkerEvent::NotResponding { silent_for });
                    }
                    if !hung && silent_for >= self.options.hang_timeout {
                        hung = true;
                        self.notify(WorkerEvent::Hung { silent_for });
                    }
                }
            }
        }
    }

    /// Sends a health event, unless the service asked the worker to end.
    fn notify(&self, event: WorkerEvent) {
        if !self.finishing.load(Ordering::SeqCst) {
            self.events.send(event);
        }
    }

    /// Sleeps `period` unless cancelled first (`false`).
    fn sleep(&self, period: Duration) -> bool {
        !matches!(self.cancelled_within(period), Ok(true))
    }

    /// Whether the cancel eventfd became readable within `period`.
    fn cancelled_within(&self, period: Duration) -> std::io::Result<bool> {
        Ok(poll_readable(&[self.cancel.as_raw_fd()], Some(period))? == Some(0))
    }

    /// Waits until the process has exited or `timeout` passes; whether it exited.
    fn wait_exit(&self, timeout: Duration) -> bool {
        let state = self.lock_exit();
        let (state, _) = self
            .exit_changed
            .wait_timeout_while(state, timeout, |s| s.exited.is_none())
            .unwrap_or_else(PoisonError::into_inner);
        state.exited.is_some()
    }

    /// Sends `request` and maps the outcome onto the service's error vocabulary.
    fn call(self: &Arc<Self>, request: Request, timeout: Duration) -> Result<Reply, WorkerError> {
        if self.has_exited() {
            return Err(WorkerError::Gone);
        }
        let result = self.client().and_then(|c| c.request(request, timeout));
        result.map_err(|error| match error {
            Error::Timeout(waited) => WorkerError::Timeout(waited),
            Error::Rejected(failure) => failure.into(),
            // A dropped connection or a refused connect: gone if the process is gone.
            other => {
                if self.wait_exit(Duration::from_millis(200)) {
                    WorkerError::Gone
                } else {
                    WorkerError::failed(other)
                }
            }
        })
    }

    /// Ends the process: asks (unless `ask` is false: it was already told and replied), waits a
    /// grace period if it answered, and kills it otherwise. `Ok` once it is gone.
    fn end(self: &Arc<Self>, ask: bool) -> Result<(), WorkerError> {
        self.finishing.store(true, Ordering::SeqCst);
        let answered = !ask
            || (!self.has_exited()
                && !self.hung.load(Ordering::SeqCst)
                && self
                    .call(
                        Request::TurnOff,
                        self.options.request_timeout.min(EXIT_GRACE),
                    )
                    .is_ok());
        // A worker that answered exits by itself in a moment; one that did not is killed now.
        let left_by_itself = answered && self.wait_exit(EXIT_GRACE);
        if !left_by_itself && !self.has_exited() {
            self.pidfd
                .send_signal(libc::SIGKILL)
                .map_err(WorkerError::failed)?;
            if !self.wait_exit(KILL_WAIT) {
                return Err(WorkerError::Timeout(KILL_WAIT));
            }
        }
        self.runtime.remove_live_files(self.pid());
        Ok(())
    }

    /// Whether the process has exited (seen by the watcher, or by the pidfd directly).
    pub(crate) fn process_gone(&self) -> bool {
        self.has_exited() || self.pidfd.has_exited()
    }

    /// Gives up on a worker nobody can drive: kills it without reporting, stops watching.
    pub(crate) fn abandon(&self) {
        self.finishing.store(true, Ordering::SeqCst);
        let _ = self.pidfd.send_signal(libc::SIGKILL);
        if self.wait_exit(KILL_WAIT) {
            self.runtime.remove_live_files(self.pid());
        }
        self.detach();
    }

    fn detach(&self) {
        // Ends both watcher threads; the worker keeps running.
        let _ = self.cancel.write(1);
        let client = self
            .client
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(client);
    }
}

/// What a worker's guest state means to the service; `None` for a stopped guest (reported as a
/// stop, not a state).
fn worker_status(state: &GuestState) -> Option<WorkerStatus> {
    match state {
        GuestState::Running => Some(WorkerStatus::Running),
        GuestState::Paused => Some(WorkerStatus::Paused),
        GuestState::Saving => Some(WorkerStatus::Saving),
        GuestState::Stopped { .. } => None,
    }
}

/// One worker process as the service drives it ([`vmm_core::Worker`]).
///
/// Dropping it detaches: the watcher threads stop and the process keeps running, to be found
/// again by [`ProcessLauncher::reattach`](crate::ProcessLauncher).
#[derive(Debug)]
pub struct ProcessWorker {
    inner: Arc<Supervised>,
}

impl ProcessWorker {
    pub(crate) fn new(inner: Arc<Supervised>) -> Self {
        ProcessWorker { inner }
    }

    /// The virtual machine this worker runs.
    pub fn vm(&self) -> VmId {
        self.inner.vm()
    }

    /// The worker's full status report (guest state, uptime, memory, test-guest counters).
    pub fn report(&self) -> Result<WorkerReport, Error> {
        let report = self
            .inner
            .client()?
            .status(self.inner.options.request_timeout)?;
        self.inner.check_report(&report);
        Ok(report)
    }

    /// Where the worker's sockets and log are.
    pub fn runtime_dir(&self) -> &RuntimeDir {
        &self.inner.runtime
    }
}

impl ProcessWorker {
    /// Sends a guest-agent request; a timeout (the worker's wait for the agent, or ours for
    /// the worker) is reported as `timeout`, the time the caller gave the agent.
    fn agent_call(
        &self,
        request: GuestAgentRequest,
        timeout: Duration,
    ) -> Result<GuestAgentReply, WorkerError> {
        let inner = &self.inner;
        // The worker's own deadline comes first; ours only catches a worker that went silent.
        let wait = request.agent_time() + inner.options.request_timeout;
        match inner.call(Request::GuestAgent(request), wait) {
            Ok(Reply::GuestAgent(reply)) => Ok(reply),
            Ok(other) => Err(WorkerError::failed(Error::Protocol(
                crate::protocol::ProtocolError::Unexpected(format!(
                    "{other:?} in answer to a guest-agent request"
                )),
            ))),
            Err(WorkerError::Timeout(_)) => Err(WorkerError::Timeout(timeout)),
            Err(other) => Err(other),
        }
    }
}

fn unexpected_agent_reply(reply: &GuestAgentReply, request: &str) -> WorkerError {
    WorkerError::failed(Error::Protocol(crate::protocol::ProtocolError::Unexpected(
        format!("{reply:?} in answer to guest-agent {request}"),
    )))
}

impl Drop for ProcessWorker {
    fn drop(&mut self) {
        self.inner.detach();
    }
}

impl Worker for ProcessWorker {
    fn pid(&self) -> u32 {
        self.inner.pid()
    }

    fn status(&self) -> WorkerStatus {
        if self.inner.has_exited() {
            return WorkerStatus::Exited;
        }
        match self.report() {
            // A stopped guest has been reported through the event sink; the process itself is
            // alive and answering until it is turned off.
            Ok(report) => worker_status(&report.state).unwrap_or(WorkerStatus::Running),
            Err(_) if self.inner.has_exited() || self.inner.pidfd.has_exited() => {
                WorkerStatus::Exited
            }
            Err(_) => WorkerStatus::NotResponding,
        }
    }

    fn pause(&self) -> Result<(), WorkerError> {
        let timeout = self.inner.options.request_timeout;
        self.inner.call(Request::Pause, timeout).map(drop)
    }

    fn resume(&self) -> Result<(), WorkerError> {
        let timeout = self.inner.options.request_timeout;
        self.inner.call(Request::Resume, timeout).map(drop)
    }

    fn save(&self, staging: &Path, state_dir: &Path) -> Result<(), WorkerError> {
        let inner = &self.inner;
        inner.finishing.store(true, Ordering::SeqCst);
        let request = Request::Save {
            staging: staging.to_path_buf(),
            state_dir: state_dir.to_path_buf(),
        };
        match inner.call(request, inner.options.save_timeout) {
            // The state is committed; the process now exits (or is made to).
            Ok(_) => inner.end(false),
            Err(error) => {
                if !inner.has_exited() {
                    inner.finishing.store(false, Ordering::SeqCst);
                }
                Err(error)
            }
        }
    }

    fn checkpoint(&self, request: &CheckpointRequest) -> Result<CheckpointReport, WorkerError> {
        let inner = &self.inner;
        match inner.call(
            Request::Checkpoint(request.clone()),
            inner.options.save_timeout,
        )? {
            Reply::Checkpoint(report) => Ok(report),
            other => Err(WorkerError::failed(Error::Protocol(
                crate::protocol::ProtocolError::Unexpected(format!(
                    "{other:?} in answer to Checkpoint"
                )),
            ))),
        }
    }

    fn backup_capture(
        &self,
        request: &BackupCaptureRequest,
    ) -> Result<BackupCaptureReport, WorkerError> {
        let inner = &self.inner;
        match inner.call(
            Request::BackupCapture(request.clone()),
            inner.options.save_timeout,
        )? {
            Reply::BackupCaptured(report) => Ok(report),
            other => Err(unexpected(&other, "BackupCapture")),
        }
    }

    fn backup_merge(&self, request: &BackupMergeRequest) -> Result<(), WorkerError> {
        let inner = &self.inner;
        match inner.call(
            Request::BackupMerge(request.clone()),
            inner.options.save_timeout,
        )? {
            Reply::BackupMerged(_) => Ok(()),
            other => Err(unexpected(&other, "BackupMerge")),
        }
    }

    fn shutdown(&self, timeout: Duration) -> Result<(), WorkerError> {
        let inner = &self.inner;
        inner.call(Request::Shutdown, inner.options.request_timeout)?;
        match inner.wait_guest_stopped(timeout) {
            Some(StopReason::GuestPowerOff) => Ok(()),
            Some(other) => Err(WorkerError::Refused {
                reason: format!("the guest did not power off: {other}"),
            }),
            None => Err(WorkerError::Timeout(timeout)),
        }
    }

    fn reset(&self) -> Result<(), WorkerError> {
        let timeout = self.inner.options.request_timeout;
        self.inner.call(Request::Reset, timeout).map(drop)
    }

    fn guest_agent_ping(&self, timeout: Duration) -> Result<(), WorkerError> {
        match self.agent_call(GuestAgentRequest::Ping { timeout }, timeout)? {
            GuestAgentReply::Pong => Ok(()),
            other => Err(unexpected_agent_reply(&other, "Ping")),
        }
    }

    fn guest_agent_info(&self, timeout: Duration) -> Result<GuestAgentInfo, WorkerError> {
        match self.agent_call(GuestAgentRequest::Info { timeout }, timeout)? {
            GuestAgentReply::Info(info) => Ok(info),
            other => Err(unexpected_agent_reply(&other, "Info")),
        }
    }

    fn freeze_guest(
        &self,
        reply_timeout: Duration,
        hold_limit: Duration,
    ) -> Result<u32, WorkerError> {
        let request = GuestAgentRequest::Freeze {
            reply_timeout,
            hold_limit,
        };
        match self.agent_call(request, reply_timeout)? {
            GuestAgentReply::Count(count) => Ok(count),
            other => Err(unexpected_agent_reply(&other, "Freeze")),
        }
    }

    fn thaw_guest(&self, timeout: Duration) -> Result<u32, WorkerError> {
        match self.agent_call(GuestAgentRequest::Thaw { timeout }, timeout)? {
            GuestAgentReply::Count(count) => Ok(count),
            other => Err(unexpected_agent_reply(&other, "Thaw")),
        }
    }

    fn guest_freeze_status(&self, timeout: Duration) -> Result<GuestFreezeStatus, WorkerError> {
        match self.agent_call(GuestAgentRequest::FreezeStatus { timeout }, timeout)? {
            GuestAgentReply::FreezeStatus(status) => Ok(status),
            other => Err(unexpected_agent_reply(&other, "FreezeStatus")),
        }
    }

    fn guest_heartbeat(&self) -> Option<GuestHeartbeat> {
        self.inner.guest_heartbeat()
    }

    fn turn_off(&self) -> Result<(), WorkerError> {
        self.inner.end(true)
    }
}

/// A reply of the wrong kind for `request`.
fn unexpected(reply: &Reply, request: &str) -> WorkerError {
    WorkerError::failed(Error::Protocol(crate::protocol::ProtocolError::Unexpected(
        format!("{reply:?} in answer to {request}"),
    )))
}
