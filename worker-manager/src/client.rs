//! The parent's end of a worker's control connection: handshake, requests with ids and timeouts,
//! and unsolicited notices handed to a callback.
//!
//! One reader thread per connection routes replies to the callers waiting for them (so several
//! threads may have requests outstanding at once: a heartbeat never waits behind a save) and
//! notices to the callback. When the connection ends every waiting caller gets
//! [`Error::Disconnected`] at once.

use std::collections::HashMap;
use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Duration;

use vmm_core::VmId;

use crate::error::{Error, Result};
use crate::process::{is_trusted_uid, peer_credentials};
use crate::protocol::{
    Failure, FromWorker, Notice, PROTOCOL_VERSION, ProtocolError, Reply, Request, ToWorker,
    WorkerReport, read_frame, write_frame,
};

/// Bound on a single frame write: a worker that stopped reading (hung, SIGSTOPped) must not block
/// a caller forever once the socket buffer is full.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

type ReplySender = Sender<std::result::Result<Reply, Failure>>;

/// Requests waiting for their reply.
#[derive(Debug, Default)]
struct Pending {
    waiting: HashMap<u64, ReplySender>,
    /// The connection has ended; nothing more will be answered.
    closed: bool,
}

#[derive(Debug, Default)]
struct Shared {
    pending: Mutex<Pending>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // Entries are inserted and removed whole; a panic elsewhere leaves the map consistent.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A handshaken control connection to one worker.
#[derive(Debug)]
pub struct ControlClient {
    writer: Mutex<UnixStream>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    vm: VmId,
    pid: u32,
}

impl ControlClient {
    /// Connects to the control socket at `path`, checks that the process serving it is of our
    /// user (or root) and is the process the handshake names (peer credentials), does the version
    /// handshake within `timeout`, and checks the worker runs `expected` (when given). Notices go to `on_notice`, on the
    /// connection's reader thread.
    pub fn connect(
        path: &Path,
        expected: Option<VmId>,
        timeout: Duration,
        on_notice: impl Fn(Notice) + Send + 'static,
    ) -> Result<Self> {
        let stream = UnixStream::connect(path).map_err(|e| Error::io(path, e))?;
        // Identity comes from the kernel, not from the peer's own words: the process that serves
        // the socket must be ours and must be the one the handshake names.
        let (peer_pid, peer_uid) = peer_credentials(&stream).map_err(|e| Error::io(path, e))?;
        if !is_trusted_uid(peer_uid) {
            return Err(Error::ForeignPeer {
                pid: peer_pid,
                uid: peer_uid,
            });
        }
        let (vm, pid) = handshake(&stream, timeout).map_err(|e| match e {
            Error::Protocol(ProtocolError::Io(io)) if is_timeout(&io) => Error::Timeout(timeout),
            other => other,
        })?;
        if pid != peer_pid {
            return Err(Error::ForeignPeer {
                pid: peer_pid,
                uid: peer_uid,
            });
        }
        if expected.is_some_and(|want| want != vm) {
            return Err(Error::WrongWorker { vm, pid });
        }
        Self::over(stream, vm, pid, on_notice).map_err(|e| Error::io(path, e))
    }

    /// The control connection over a pool worker's socket pair, once the worker reported ready
    /// on it: no handshake, since the pair was private to the two processes from the start and
    /// the parent spawned `pid` itself.
    pub(crate) fn adopt(
        stream: UnixStream,
        vm: VmId,
        pid: u32,
        on_notice: impl Fn(Notice) + Send + 'static,
    ) -> Result<Self> {
        Self::over(stream, vm, pid, on_notice).map_err(|e| Error::io("pool socket", e))
    }

    /// Starts the reader thread of a handshaken connection.
    fn over(
        stream: UnixStream,
        vm: VmId,
        pid: u32,
        on_notice: impl Fn(Notice) + Send + 'static,
    ) -> std::io::Result<Self> {
        stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        let reader = stream.try_clone()?;
        let shared = Arc::new(Shared::default());
        let thread_shared = Arc::clone(&shared);
        thread::Builder::new()
            .name(format!("wm-ctl-{pid}"))
            .spawn(move || read_loop(reader, &thread_shared, on_notice))?;
        Ok(ControlClient {
            writer: Mutex::new(stream),
            shared,
            next_id: AtomicU64::new(1),
            vm,
            pid,
        })
    }

    /// The virtual machine the worker said it runs.
    pub fn vm(&self) -> VmId {
        self.vm
    }

    /// The pid the worker gave in the handshake.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed
    }

    /// Sends `request` and waits up to `timeout` for its reply.
    pub fn request(&self, request: Request, timeout: Duration) -> Result<Reply> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        {
            let mut pending = self.shared.lock();
            if pending.closed {
                return Err(Error::Disconnected);
            }
            pending.waiting.insert(id, tx);
        }
        let sent = {
            let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
            write_frame(&mut *writer, &ToWorker::Request { id, request })
        };
        if let Err(error) = sent {
            self.shared.lock().waiting.remove(&id);
            return Err(match error {
                ProtocolError::Io(io) if is_timeout(&io) => Error::Timeout(WRITE_TIMEOUT),
                ProtocolError::Io(_) => Error::Disconnected,
                other => Error::Protocol(other),
            });
        }
        match rx.recv_timeout(timeout) {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(failure)) => Err(Error::Rejected(failure)),
            Err(RecvTimeoutError::Timeout) => {
                self.shared.lock().waiting.remove(&id);
                Err(Error::Timeout(timeout))
            }
            Err(RecvTimeoutError::Disconnected) => Err(Error::Disconnected),
        }
    }

    /// Asks for the worker's [`WorkerReport`].
    pub fn status(&self, timeout: Duration) -> Result<WorkerReport> {
        match self.request(Request::Status, timeout)? {
            Reply::Status(report) => Ok(report),
            other => Err(Error::Protocol(ProtocolError::Unexpected(format!(
                "{other:?} in answer to Status"
            )))),
        }
    }
}

impl Drop for ControlClient {
    fn drop(&mut self) {
        // Ends the reader thread; the worker sees the disconnect and keeps running.
        let writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = writer.shutdown(std::net::Shutdown::Both);
    }
}

fn is_timeout(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Hello → Hello; returns the worker's vm and pid.
fn handshake(stream: &UnixStream, timeout: Duration) -> Result<(VmId, u32)> {
    let io = |e| Error::Protocol(ProtocolError::Io(e));
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut writer = stream;
    write_frame(
        &mut writer,
        &ToWorker::Hello {
            version: PROTOCOL_VERSION,
        },
    )?;
    let mut reader = stream;
    let answer: Option<FromWorker> = read_frame(&mut reader)?;
    stream.set_read_timeout(None).map_err(io)?;
    match answer {
        Some(FromWorker::Hello { version, vm, pid }) if version == PROTOCOL_VERSION => {
            Ok((vm, pid))
        }
        Some(FromWorker::Hello { version, .. }) => {
            Err(Error::Protocol(ProtocolError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: version,
            }))
        }
        Some(FromWorker::Refused { reason }) => Err(Error::Refused { reason }),
        Some(other) => Err(Error::Protocol(ProtocolError::Unexpected(format!(
            "{other:?} before the handshake"
        )))),
        None => Err(Error::Disconnected),
    }
}

fn read_loop(stream: UnixStream, shared: &Shared, on_notice: impl Fn(Notice)) {
    let mut reader = BufReader::new(stream);
    // Any error ends the connection: after a malformed frame the stream cannot be resynchronised.
    while let Ok(Some(message)) = read_frame::<FromWorker>(&mut reader) {
        match message {
            FromWorker::Reply { id, result } => {
                if let Some(tx) = shared.lock().waiting.remove(&id) {
                    // The caller may have timed out and left; nobody to tell then.
                    let _ = tx.send(result);
                }
            }
            FromWorker::Event(notice) => on_notice(notice),
            FromWorker::Hello { .. } | FromWorker::Refused { .. } => {}
        }
    }
    let mut pending = shared.lock();
    pending.closed = true;
    // Dropping the senders wakes every waiting caller with Disconnected.
    pending.waiting.clear();
}
