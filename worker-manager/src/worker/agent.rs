//! The worker's integration services: the guest's agent on COM2, driven by one thread.
//!
//! The worker owns COM2 (Hyper-V's VMBus integration channel; here the qemu-guest-agent protocol
//! a Linux guest's `qemu-ga` speaks on its second serial port, and the test guest too). Guest
//! output goes into a ring on the vCPU thread, as COM1's does ([`ConsoleLog`]: a copy, no
//! allocation); the agent thread reads it through an [`AgentClient`].
//!
//! The thread serves three things, one at a time: the parent's [`GuestAgentRequest`]s (so they
//! never wait behind run control on the main thread, nor hold it up), the heartbeat, and the
//! freeze hold limit: once the limit of a freeze has passed without a thaw, the thread thaws the
//! guest itself, so no parent — nor a parent's crash — keeps the guest's file systems frozen.
//!
//! The heartbeat rides on the parent's own: a status request ([`AgentHandle::nudge`]) has the
//! thread `guest-ping` the agent, at most once per [`HEARTBEAT_INTERVAL`], while the report
//! answers at once with the last finding. A change is broadcast as [`Notice::GuestHeartbeat`].
//! So a worker nobody asks about does not wake up at all (the idle test), and one whose parent
//! watches it learns within a heartbeat whether the guest's agent answers.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use partition::devices::serial::Uart;
use vmm_core::integration::GuestHeartbeat;

use super::console::{ConsoleLog, ConsoleSink};
use super::control::{Peer, WorkerShared};
use super::machine::lock;
use crate::guest_agent::{AgentClient, AgentError, AgentTransport};
use crate::protocol::{
    Failure, FailureKind, FromWorker, GuestAgentReply, GuestAgentRequest, GuestState, Notice, Reply,
};

/// The heartbeat pings a running guest's agent at most this often.
pub(crate) const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// How long a heartbeat ping may take (generous: a loaded host delays a polling guest).
pub(crate) const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the agent has to answer the thaw the hold limit sends; retried until it works.
const HOLD_THAW_TIMEOUT: Duration = Duration::from_secs(2);
/// After a failed hold-limit thaw, when the next try comes.
const HOLD_THAW_RETRY: Duration = Duration::from_millis(500);

/// What the agent thread is asked to do.
pub(crate) enum Job {
    /// A parent's request; the reply goes to `peer`.
    Call {
        id: u64,
        request: GuestAgentRequest,
        peer: Arc<Peer>,
    },
    /// `guest-shutdown` for the main thread's shutdown request.
    Shutdown {
        timeout: Duration,
        done: Sender<Result<(), AgentError>>,
    },
    /// A heartbeat ping is due.
    Heartbeat,
}

/// COM2 as the worker's threads share it.
#[derive(Debug, Default)]
struct Channel {
    /// The running partition's COM2 (`None` while no guest runs).
    uart: Mutex<Option<Arc<Uart>>>,
    /// Guest output on COM2.
    output: Arc<ConsoleLog>,
    /// The heartbeat's last finding; `None` while no guest runs.
    heartbeat: Mutex<Option<GuestHeartbeat>>,
    /// Bumped whenever another guest (a reset's) is attached: the client resynchronises.
    generation: Mutex<u64>,
    /// When the last heartbeat ping was asked for.
    last_nudge: Mutex<Option<Instant>>,
    /// A freeze may be in effect (asked for, not yet thawed nor past its hold limit).
    may_be_frozen: AtomicBool,
    /// The guest answered a freeze and no thaw has been sent since (cleared before any thaw
    /// goes out, the hold limit's included): its file systems are quiescent right now.
    freeze_held: AtomicBool,
}

/// The handle the other worker threads hold.
#[derive(Debug)]
pub(crate) struct AgentHandle {
    jobs: Sender<Job>,
    channel: Arc<Channel>,
}

/// The agent thread's end of the job queue.
pub(crate) struct AgentJobs(Receiver<Job>);

impl AgentHandle {
    /// A handle and the queue the agent thread ([`serve`]) takes its jobs from.
    pub(crate) fn new() -> (Self, AgentJobs) {
        let (jobs, rx) = mpsc::channel();
        let handle = AgentHandle {
            jobs,
            channel: Arc::new(Channel::default()),
        };
        (handle, AgentJobs(rx))
    }

    /// Connects the running partition's COM2 (`None`: the guest is gone). A new guest starts
    /// with [`GuestHeartbeat::NoContact`].
    pub(crate) fn attach(&self, com2: Option<Arc<Uart>>) {
        if let Some(uart) = &com2 {
            uart.set_sink(Box::new(ConsoleSink::new(Arc::clone(&self.channel.output))));
        }
        *lock(&self.channel.heartbeat) = com2.as_ref().map(|_| GuestHeartbeat::NoContact);
        *lock(&self.channel.uart) = com2;
        *lock(&self.channel.generation) += 1;
    }

    /// Whether the guest's file systems may be frozen by a freeze this worker relayed.
    pub(crate) fn may_be_frozen(&self) -> bool {
        self.channel.may_be_frozen.load(Ordering::Acquire)
    }

    /// Whether the guest acknowledged a freeze this worker relayed and no thaw was sent since:
    /// what a production checkpoint checks, with the guest paused, before it commits.
    pub(crate) fn freeze_held(&self) -> bool {
        self.channel.freeze_held.load(Ordering::Acquire)
    }

    /// The heartbeat's last finding (`None` while no guest runs).
    pub(crate) fn heartbeat(&self) -> Option<GuestHeartbeat> {
        *lock(&self.channel.heartbeat)
    }

    /// A parent asked how the worker is: have the agent pinged, unless that happened within
    /// [`HEARTBEAT_INTERVAL`]. Never waits.
    pub(crate) fn nudge(&self) {
        let mut last = lock(&self.channel.last_nudge);
        if last.is_some_and(|at| at.elapsed() < HEARTBEAT_INTERVAL)
            || lock(&self.channel.uart).is_none()
        {
            return;
        }
        *last = Some(Instant::now());
        // A gone agent thread has nobody to ping for.
        let _ = self.jobs.send(Job::Heartbeat);
    }

    /// Queues a parent's request; gives it back if the agent thread is gone.
    pub(crate) fn submit(&self, job: Job) -> Result<(), Job> {
        self.jobs.send(job).map_err(|unsent| unsent.0)
    }

    /// Asks the guest's agent to power the guest off (`guest-shutdown`), waiting up to
    /// `timeout` for the agent to be in step first.
    pub(crate) fn shutdown(&self, timeout: Duration) -> Result<(), AgentError> {
        let (done, result) = mpsc::channel();
        self.submit(Job::Shutdown { timeout, done })
            .map_err(|_| AgentError::Closed)?;
        // The thread may be busy with a ping first.
        result
            .recv_timeout(timeout + HEARTBEAT_TIMEOUT + Duration::from_secs(1))
            .unwrap_or(Err(AgentError::Timeout {
                command: "guest-shutdown".into(),
                waited: timeout,
            }))
    }
}

/// COM2 as an [`AgentTransport`]: writes go into the UART's receive FIFO as the guest drains
/// it, reads follow the output ring from where the client started.
struct Com2 {
    channel: Arc<Channel>,
    position: u64,
    chunk: Vec<u8>,
    taken: usize,
    generation: u64,
}

impl Com2 {
    fn new(channel: Arc<Channel>) -> Self {
        let position = channel.output.end();
        Com2 {
            channel,
            position,
            chunk: Vec::new(),
            taken: 0,
            generation: 0,
        }
    }

    /// Whether another guest was attached since the last call.
    fn guest_changed(&mut self) -> bool {
        let now = *lock(&self.channel.generation);
        std::mem::replace(&mut self.generation, now) != now
    }
}

impl AgentTransport for Com2 {
    fn send(&mut self, bytes: &[u8], timeout: Duration) -> io::Result<()> {
        let uart = lock(&self.channel.uart)
            .clone()
            .ok_or(io::ErrorKind::NotConnected)?;
        uart.send_all(bytes, timeout)
    }

    fn receive(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<usize> {
        if self.taken == self.chunk.len() {
            if lock(&self.channel.uart).is_none() {
                return Err(io::ErrorKind::NotConnected.into());
            }
            self.position = self
                .channel
                .output
                .read_from(self.position, &mut self.chunk, timeout);
            self.taken = 0;
        }
        let n = buf.len().min(self.chunk.len() - self.taken);
        buf[..n].copy_from_slice(&self.chunk[self.taken..self.taken + n]);
        self.taken += n;
        Ok(n)
    }
}

/// The agent thread's state.
struct Integration {
    client: AgentClient<Com2>,
    shared: Arc<WorkerShared>,
    /// When the freeze in effect must end, if the guest may be frozen.
    hold_until: Option<Instant>,
    /// Where [`AgentHandle::may_be_frozen`] reads whether `hold_until` is set.
    channel: Arc<Channel>,
}

impl Integration {
    /// Tells the other threads whether a freeze may be in effect; set before a freeze is even
    /// sent, so no state is captured between the freeze and its answer.
    fn publish_hold(&self) {
        self.channel
            .may_be_frozen
            .store(self.hold_until.is_some(), Ordering::Release);
    }

    /// Records whether an acknowledged freeze is held: set once the guest answers a freeze,
    /// cleared before any thaw is sent.
    fn set_freeze_held(&self, held: bool) {
        self.channel.freeze_held.store(held, Ordering::Release);
    }
}

/// The agent thread: runs until every handle is gone.
pub(crate) fn serve(jobs: AgentJobs, shared: Arc<WorkerShared>) {
    let channel = Arc::clone(&shared.agent().channel);
    let mut integration = Integration {
        client: AgentClient::new(Com2::new(Arc::clone(&channel))),
        shared,
        hold_until: None,
        channel,
    };
    loop {
        // Asleep until a job comes, or the freeze's hold limit.
        let job = match integration.hold_until {
            Some(hold) => match jobs
                .0
                .recv_timeout(hold.saturating_duration_since(Instant::now()))
            {
                Ok(job) => Some(job),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            },
            None => match jobs.0.recv() {
                Ok(job) => Some(job),
                Err(_) => return,
            },
        };
        if let Some(job) = job {
            integration.job(job);
        }
        integration.enforce_hold_limit();
        integration.publish_hold();
    }
}

impl Integration {
    fn job(&mut self, job: Job) {
        match job {
            Job::Call { id, request, peer } => {
                let result = self.call(&request).map(Reply::GuestAgent);
                peer.send(&FromWorker::Reply { id, result });
            }
            Job::Shutdown { timeout, done } => {
                self.prepare();
                let result = self.client.shutdown(timeout);
                if result.is_ok() {
                    log_line!(
                        "worker {}: asked the guest's agent to shut down",
                        self.shared.vm()
                    );
                }
                // The main thread may have given up waiting.
                let _ = done.send(result);
            }
            Job::Heartbeat => self.heartbeat(),
        }
    }

    /// Before talking to the agent: a new guest means a new stream (and no freeze of ours).
    fn prepare(&mut self) {
        if self.client.transport_mut().guest_changed() {
            self.client.invalidate();
            self.hold_until = None;
            self.set_freeze_held(false);
        }
    }

    /// Whether the agent can answer at all now; why not otherwise.
    fn reachable(&self) -> Result<(), Failure> {
        match self.shared.state() {
            GuestState::Running => Ok(()),
            GuestState::Paused | GuestState::Saving => Err(Failure::invalid_state(
                "the guest is paused: its integration agent cannot answer",
            )),
            GuestState::Stopped { reason } => Err(Failure::invalid_state(format!(
                "guest has stopped: {reason}"
            ))),
        }
    }

    fn call(&mut self, request: &GuestAgentRequest) -> Result<GuestAgentReply, Failure> {
        self.reachable()?;
        self.prepare();
        let client = &mut self.client;
        match *request {
            GuestAgentRequest::Ping { timeout } => {
                client.ping(timeout).map_err(|e| failure(&e))?;
                self.note_heartbeat(true);
                Ok(GuestAgentReply::Pong)
            }
            GuestAgentRequest::Info { timeout } => client
                .info(timeout)
                .map(GuestAgentReply::Info)
                .map_err(|e| failure(&e)),
            GuestAgentRequest::FreezeStatus { timeout } => client
                .fsfreeze_status(timeout)
                .map(GuestAgentReply::FreezeStatus)
                .map_err(|e| failure(&e)),
            GuestAgentRequest::Freeze {
                reply_timeout,
                hold_limit,
            } => self.freeze(reply_timeout, hold_limit),
            GuestAgentRequest::Thaw { timeout } => {
                self.channel.freeze_held.store(false, Ordering::Release);
                let count = client.fsfreeze_thaw(timeout).map_err(|e| failure(&e))?;
                self.hold_until = None;
                self.publish_hold();
                Ok(GuestAgentReply::Count(count))
            }
        }
    }

    /// `guest-fsfreeze-freeze` under the hold limit; a freeze whose answer does not come in
    /// time is thawed at once (the agent may have frozen without being able to say so).
    fn freeze(
        &mut self,
        reply_timeout: Duration,
        hold_limit: Duration,
    ) -> Result<GuestAgentReply, Failure> {
        let previous = self.hold_until;
        let limit = Instant::now() + hold_limit;
        self.hold_until = Some(previous.map_or(limit, |p| p.min(limit)));
        self.publish_hold();
        match self.client.fsfreeze_freeze(reply_timeout) {
            Ok(count) => {
                self.set_freeze_held(true);
                log_line!(
                    "worker {}: guest froze {count} file system(s), held at most {hold_limit:?}",
                    self.shared.vm()
                );
                Ok(GuestAgentReply::Count(count))
            }
            Err(error @ (AgentError::Timeout { .. } | AgentError::Io(_))) => {
                self.set_freeze_held(false);
                if self.client.fsfreeze_thaw(reply_timeout).is_ok() {
                    self.hold_until = previous;
                }
                Err(failure(&error))
            }
            Err(error) => {
                // The agent answered: it froze nothing (qemu-ga thaws what it froze on error).
                self.hold_until = previous;
                Err(failure(&error))
            }
        }
    }

    /// Thaws the guest once the hold limit has passed; a failed thaw is retried shortly.
    fn enforce_hold_limit(&mut self) {
        let Some(hold) = self.hold_until else { return };
        if Instant::now() < hold {
            return;
        }
        self.prepare();
        if self.hold_until.is_none() {
            return;
        }
        if self.reachable().is_err() {
            // A stopped guest holds nothing any more; a paused one is thawed once it runs.
            self.hold_until = match self.shared.state() {
                GuestState::Stopped { .. } => None,
                _ => Some(Instant::now() + HOLD_THAW_RETRY),
            };
            return;
        }
        self.set_freeze_held(false);
        match self.client.fsfreeze_thaw(HOLD_THAW_TIMEOUT) {
            Ok(count) => {
                self.hold_until = None;
                log_line!(
                    "worker {}: the freeze reached its hold limit: thawed {count} file system(s)",
                    self.shared.vm()
                );
            }
            Err(error) => {
                self.hold_until = Some(Instant::now() + HOLD_THAW_RETRY);
                log_line!(
                    "worker {}: thaw at the hold limit failed, retrying: {error}",
                    self.shared.vm()
                );
            }
        }
    }

    /// One heartbeat ping, while the guest runs.
    fn heartbeat(&mut self) {
        if self.reachable().is_err() {
            return;
        }
        self.prepare();
        let answered = self.client.ping(HEARTBEAT_TIMEOUT).is_ok();
        self.note_heartbeat(answered);
    }

    /// Records a ping's outcome, announcing a change.
    fn note_heartbeat(&self, answered: bool) {
        let agent = self.shared.agent();
        let changed = {
            let mut heartbeat = lock(&agent.channel.heartbeat);
            let Some(last) = *heartbeat else { return };
            let next = match (answered, last) {
                (true, _) => GuestHeartbeat::Ok,
                (false, GuestHeartbeat::NoContact) => GuestHeartbeat::NoContact,
                (false, _) => GuestHeartbeat::LostCommunication,
            };
            *heartbeat = Some(next);
            (next != last).then_some(next)
        };
        if let Some(heartbeat) = changed {
            self.shared
                .broadcast(&FromWorker::Event(Notice::GuestHeartbeat { heartbeat }));
        }
    }
}

/// An agent error as a reply.
fn failure(error: &AgentError) -> Failure {
    let message = vmm_core::error_chain(error);
    match error {
        AgentError::Timeout { .. } => Failure {
            kind: FailureKind::TimedOut,
            message,
        },
        AgentError::Closed => Failure::invalid_state("guest is not running"),
        AgentError::CommandNotFound { .. } => Failure::refused(message),
        AgentError::CommandFailed { .. }
        | AgentError::UnexpectedAnswer { .. }
        | AgentError::Io(_) => Failure::failed(message),
    }
}
