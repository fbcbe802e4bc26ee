//! The worker's control socket: handshake, status answered on the spot, every other request
//! handed to the main thread, and notices broadcast to every connected parent.
//!
//! Any number of parents may connect over the worker's life (a restarted daemon, a test, a
//! diagnostic tool), also at once. A parent that disconnects changes nothing for the guest.

use std::io::BufReader;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use partition::devices::serial::Uart;
use partition::memory::PartitionMemory;
use vm_memory::{Bytes, GuestAddress};
use vmm_core::VmId;
use vmm_sys_util::eventfd::EventFd;
use vmms_guest::protocol::{
    STATUS_BLOCK_SIZE, STATUS_FROZEN, STATUS_GPA, STATUS_MAGIC, STATUS_WRITELOOP, StatusBlock,
};

use super::agent::{AgentHandle, Job};
use super::console::ConsoleLog;
use super::machine::lock;
use crate::process::rss_kib;
use crate::protocol::{
    Confinement, Failure, FromWorker, GuestState, PROTOCOL_VERSION, ProtocolError, Reply, Request,
    TestGuestCounters, ToWorker, WorkerReport, read_frame, write_frame,
};

/// How long a new connection may take to say hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on writing one frame to a parent that stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// One connected parent; frames to it are written whole under its lock.
#[derive(Debug)]
pub(crate) struct Peer {
    id: u64,
    writer: Mutex<UnixStream>,
}

impl Peer {
    /// Sends `message`; `false` if the parent is gone.
    pub(crate) fn send(&self, message: &FromWorker) -> bool {
        write_frame(&mut *lock(&self.writer), message).is_ok()
    }
}

/// A request for the main thread, with the connection its reply goes to.
#[derive(Debug)]
pub(crate) struct Command {
    pub(crate) id: u64,
    pub(crate) request: Request,
    pub(crate) peer: Arc<Peer>,
}

/// The sending half of the main thread's request queue: a channel whose every send also signals
/// an eventfd, so the main thread can sleep in `poll` on requests and the guest's stop together.
#[derive(Debug)]
pub(crate) struct CommandSender {
    tx: Sender<Command>,
    ready: EventFd,
}

impl CommandSender {
    /// Queues `command` and wakes the main thread; gives it back if the main thread is gone.
    pub(crate) fn send(&self, command: Command) -> Result<(), Command> {
        self.tx.send(command).map_err(|unsent| unsent.0)?;
        // Only fails if the counter would overflow, and then the main thread is awake anyway.
        let _ = self.ready.write(1);
        Ok(())
    }
}

/// The main thread's end of the request queue.
#[derive(Debug)]
pub(crate) struct CommandReceiver {
    rx: Receiver<Command>,
    ready: EventFd,
}

/// What [`CommandReceiver::take`] found.
pub(crate) enum Taken {
    Command(Command),
    Empty,
    /// Every sender is gone: no request can come any more.
    Closed,
}

impl CommandReceiver {
    /// Readable while requests may be waiting.
    pub(crate) fn ready_fd(&self) -> RawFd {
        self.ready.as_raw_fd()
    }

    /// Clears the readiness signal; call before draining with [`take`](Self::take), so a request
    /// queued during the drain signals again.
    pub(crate) fn clear(&self) {
        // EAGAIN when nothing was signalled: nothing to clear.
        let _ = self.ready.read();
    }

    /// The next queued request, without waiting.
    pub(crate) fn take(&self) -> Taken {
        match self.rx.try_recv() {
            Ok(command) => Taken::Command(command),
            Err(TryRecvError::Empty) => Taken::Empty,
            Err(TryRecvError::Disconnected) => Taken::Closed,
        }
    }
}

/// A request queue for the main thread.
pub(crate) fn command_queue() -> std::io::Result<(CommandSender, CommandReceiver)> {
    let ready = EventFd::new(libc::EFD_NONBLOCK)?;
    let (tx, rx) = mpsc::channel();
    let sender = CommandSender {
        tx,
        ready: ready.try_clone()?,
    };
    Ok((sender, CommandReceiver { rx, ready }))
}

/// What the guest currently is, as the connection threads see it.
#[derive(Debug)]
struct GuestView {
    state: GuestState,
    memory: Option<PartitionMemory>,
    com1: Option<Arc<Uart>>,
}

/// State shared by the main thread and the socket threads.
#[derive(Debug)]
pub(crate) struct WorkerShared {
    vm: VmId,
    pid: u32,
    started: Instant,
    restored: bool,
    test_guest: bool,
    guest: Mutex<GuestView>,
    peers: Mutex<Vec<Arc<Peer>>>,
    next_peer: AtomicU64,
    commands: CommandSender,
    console: Arc<ConsoleLog>,
    confinement: Mutex<Confinement>,
    /// The guest's integration agent (COM2), served by the agent thread.
    agent: AgentHandle,
}

impl WorkerShared {
    pub(crate) fn new(
        vm: VmId,
        restored: bool,
        test_guest: bool,
        console: Arc<ConsoleLog>,
        commands: CommandSender,
        agent: AgentHandle,
    ) -> Self {
        WorkerShared {
            vm,
            pid: std::process::id(),
            started: Instant::now(),
            restored,
            test_guest,
            guest: Mutex::new(GuestView {
                state: GuestState::Paused,
                memory: None,
                com1: None,
            }),
            peers: Mutex::new(Vec::new()),
            next_peer: AtomicU64::new(0),
            commands,
            console,
            confinement: Mutex::new(Confinement::default()),
            agent,
        }
    }

    /// The guest's integration agent.
    pub(crate) fn agent(&self) -> &AgentHandle {
        &self.agent
    }

    /// Records what the worker runs under, for status reports.
    pub(crate) fn set_confinement(&self, confinement: Confinement) {
        *lock(&self.confinement) = confinement;
    }

    /// What the worker runs under.
    pub(crate) fn confinement(&self) -> Confinement {
        lock(&self.confinement).clone()
    }

    /// Changes part of what the worker runs under.
    pub(crate) fn update_confinement(&self, change: impl FnOnce(&mut Confinement)) {
        change(&mut lock(&self.confinement));
    }

    pub(crate) fn vm(&self) -> VmId {
        self.vm
    }

    pub(crate) fn console(&self) -> Arc<ConsoleLog> {
        Arc::clone(&self.console)
    }

    pub(crate) fn state(&self) -> GuestState {
        lock(&self.guest).state.clone()
    }

    pub(crate) fn set_state(&self, state: GuestState) {
        lock(&self.guest).state = state;
    }

    /// Publishes the running partition's memory and COM1 (or that there is none).
    pub(crate) fn set_guest(&self, memory: Option<PartitionMemory>, com1: Option<Arc<Uart>>) {
        let mut guest = lock(&self.guest);
        guest.memory = memory;
        guest.com1 = com1;
    }

    /// COM1 of the running partition, for console input.
    pub(crate) fn com1(&self) -> Option<Arc<Uart>> {
        lock(&self.guest).com1.clone()
    }

    /// The answer to [`Request::Status`] (which also has the guest's agent pinged, in the
    /// background, when that is due).
    pub(crate) fn report(&self) -> WorkerReport {
        self.agent.nudge();
        let (state, memory) = {
            let guest = lock(&self.guest);
            (guest.state.clone(), guest.memory.clone())
        };
        let test_guest = match (self.test_guest, memory) {
            (true, Some(memory)) => test_guest_counters(&memory),
            _ => None,
        };
        WorkerReport {
            vm: self.vm,
            pid: self.pid,
            state,
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            restored: self.restored,
            rss_kib: rss_kib(self.pid).unwrap_or(0),
            test_guest,
            confinement: self.confinement(),
            guest_heartbeat: self.agent.heartbeat(),
        }
    }

    /// Sends `message` to every connected parent, forgetting those that are gone.
    pub(crate) fn broadcast(&self, message: &FromWorker) {
        let peers: Vec<Arc<Peer>> = lock(&self.peers).clone();
        let gone: Vec<u64> = peers
            .iter()
            .filter(|peer| !peer.send(message))
            .map(|peer| peer.id)
            .collect();
        if !gone.is_empty() {
            lock(&self.peers).retain(|peer| !gone.contains(&peer.id));
        }
    }
}

/// The test guest's status block, if the guest has initialised it.
fn test_guest_counters(memory: &PartitionMemory) -> Option<TestGuestCounters> {
    let mut bytes = [0u8; STATUS_BLOCK_SIZE];
    memory
        .read_slice(&mut bytes, GuestAddress(STATUS_GPA))
        .ok()?;
    let block = StatusBlock::from_bytes(&bytes)?;
    (block.magic == STATUS_MAGIC).then_some(TestGuestCounters {
        counter: block.counter,
        records: block.records_written,
        frozen: block.flags & STATUS_FROZEN != 0,
        writeloop: block.flags & STATUS_WRITELOOP != 0,
    })
}

/// Serves one parent that connected to `control.sock`, on a thread of its own.
pub(crate) fn accept(stream: UnixStream, shared: &Arc<WorkerShared>) {
    let shared = Arc::clone(shared);
    // Without a thread this parent cannot be served; it sees the connection close.
    let _ = std::thread::Builder::new()
        .name("control-conn".into())
        .spawn(move || {
            if let Err(error) = connection(stream, &shared) {
                log_line!("worker {}: control connection: {error}", shared.vm);
            }
        });
}

fn connection(stream: UnixStream, shared: &WorkerShared) -> Result<(), ProtocolError> {
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = &stream;
    match read_frame::<ToWorker>(&mut reader)? {
        Some(ToWorker::Hello { version }) if version == PROTOCOL_VERSION => {}
        Some(ToWorker::Hello { version }) => {
            let reason = format!("protocol version {version} is not {PROTOCOL_VERSION}");
            write_frame(&mut writer, &FromWorker::Refused { reason })?;
            return Err(ProtocolError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: version,
            });
        }
        Some(other) => {
            let reason = "the first message must be Hello".to_owned();
            write_frame(&mut writer, &FromWorker::Refused { reason })?;
            return Err(ProtocolError::Unexpected(format!("{other:?}")));
        }
        None => return Ok(()),
    }
    write_frame(
        &mut writer,
        &FromWorker::Hello {
            version: PROTOCOL_VERSION,
            vm: shared.vm,
            pid: shared.pid,
        },
    )?;
    serve_parent(stream, reader, shared)
}

/// Serves a pool worker's socket pair as a connection whose handshake is done (the pair was
/// private to the worker and the parent that spawned it from the start).
pub(crate) fn adopt(stream: UnixStream, shared: &WorkerShared) {
    let served = stream
        .try_clone()
        .map_err(ProtocolError::from)
        .and_then(|reader| serve_parent(stream, BufReader::new(reader), shared));
    if let Err(error) = served {
        log_line!("worker {}: control connection: {error}", shared.vm);
    }
}

/// Answers a handshaken parent's requests until it disconnects.
fn serve_parent(
    stream: UnixStream,
    mut reader: BufReader<UnixStream>,
    shared: &WorkerShared,
) -> Result<(), ProtocolError> {
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let peer = Arc::new(Peer {
        id: shared.next_peer.fetch_add(1, Ordering::Relaxed),
        writer: Mutex::new(stream),
    });
    lock(&shared.peers).push(Arc::clone(&peer));
    let result = requests(&mut reader, shared, &peer);
    lock(&shared.peers).retain(|p| p.id != peer.id);
    result
}

fn requests(
    reader: &mut BufReader<UnixStream>,
    shared: &WorkerShared,
    peer: &Arc<Peer>,
) -> Result<(), ProtocolError> {
    while let Some(message) = read_frame::<ToWorker>(reader)? {
        match message {
            ToWorker::Request {
                id,
                request: Request::Status,
            } => {
                let reply = Reply::Status(shared.report());
                peer.send(&FromWorker::Reply {
                    id,
                    result: Ok(reply),
                });
            }
            ToWorker::Request {
                id,
                request: Request::GuestAgent(request),
            } => {
                let job = Job::Call {
                    id,
                    request,
                    peer: Arc::clone(peer),
                };
                if shared.agent.submit(job).is_err() {
                    peer.send(&FromWorker::Reply {
                        id,
                        result: Err(Failure::invalid_state("worker is shutting down")),
                    });
                }
            }
            ToWorker::Request { id, request } => {
                let command = Command {
                    id,
                    request,
                    peer: Arc::clone(peer),
                };
                if let Err(command) = shared.commands.send(command) {
                    command.peer.send(&FromWorker::Reply {
                        id: command.id,
                        result: Err(Failure::invalid_state("worker is shutting down")),
                    });
                }
            }
            ToWorker::Hello { .. } => {
                return Err(ProtocolError::Unexpected("second Hello".into()));
            }
        }
    }
    Ok(())
}
