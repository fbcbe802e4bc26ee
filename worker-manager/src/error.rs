//! Errors of the worker-manager crate.

use std::path::PathBuf;
use std::time::Duration;

use vmm_core::{VmId, WorkerError};

use crate::protocol::ProtocolError;

/// Everything that can go wrong starting, talking to or running a worker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A control frame could not be read, written or understood.
    #[error("control protocol")]
    Protocol(#[from] ProtocolError),
    /// The worker program could not be started.
    #[error("cannot spawn worker program {}", program.display())]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The worker started but could not bring its guest up; `message` is what it reported.
    #[error("worker could not start the guest: {message}")]
    StartFailed {
        /// The worker's own account (its start-up error, or the last line of its log).
        message: String,
    },
    /// Another live worker already runs (or is starting) this virtual machine: it holds the
    /// runtime folder's lock.
    #[error("another worker already runs this virtual machine")]
    AlreadyRunning,
    /// The process serving a control socket is not one this side may trust: another user's, or
    /// not the process the handshake names.
    #[error(
        "control socket served by pid {pid} of uid {uid}, which is not this virtual machine's worker"
    )]
    ForeignPeer {
        /// The serving process, from the socket's peer credentials.
        pid: u32,
        /// Its user.
        uid: u32,
    },
    /// A file or socket of the worker's runtime folder or store could not be used.
    #[error("i/o on {}", path.display())]
    Io {
        /// The file, folder or socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The worker refused the handshake.
    #[error("worker refused the connection: {reason}")]
    Refused {
        /// What it said.
        reason: String,
    },
    /// The socket answered for another virtual machine or process than expected.
    #[error("control socket belongs to virtual machine {vm} (pid {pid}), not the one expected")]
    WrongWorker {
        /// The virtual machine it serves.
        vm: VmId,
        /// Its pid.
        pid: u32,
    },
    /// The control connection closed (the worker exited or dropped it).
    #[error("control connection closed")]
    Disconnected,
    /// The worker did not answer in time.
    #[error("worker did not answer within {0:?}")]
    Timeout(Duration),
    /// The worker answered the request with a typed failure.
    #[error("{0}")]
    Rejected(crate::protocol::Failure),
    /// The worker's command line was not understood.
    #[error("usage: {0}")]
    Usage(String),
    /// The virtual machine's configuration could not be read.
    #[error("cannot read configuration {}", path.display())]
    Config {
        /// The `config.json`.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The partition failed (build, restore, run control, state capture); its own message says
    /// what, so it is shown as is.
    #[error(transparent)]
    Partition(#[from] partition::Error),
    /// A disk image (or a file of its backing chain) is held by another virtual machine or
    /// process (QEMU-style image locks).
    #[error("disk image {} is in use by another virtual machine (locked)", path.display())]
    DiskLocked {
        /// The disk's top image.
        path: PathBuf,
        /// The lock conflict, naming the file.
        #[source]
        source: snapshot::Error,
    },
    /// A disk image (or one of its backing files) could not be opened or changed.
    #[error("disk {}", path.display())]
    Disk {
        /// The disk's top image.
        path: PathBuf,
        /// Why.
        #[source]
        source: snapshot::Error,
    },
    /// The worker could not be confined.
    #[error("cannot confine the worker")]
    Confinement(#[from] crate::worker::ConfinementError),
    /// The operating system refused a thread.
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
    /// The operating system refused an eventfd (the worker's request queue needs one).
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
}

impl Error {
    /// Wraps an I/O error with the path it happened on.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

impl From<Error> for WorkerError {
    fn from(error: Error) -> Self {
        match error {
            Error::Timeout(waited) => WorkerError::Timeout(waited),
            Error::Rejected(failure) => failure.into(),
            other => WorkerError::failed(other),
        }
    }
}

impl From<crate::protocol::Failure> for WorkerError {
    fn from(failure: crate::protocol::Failure) -> Self {
        use crate::protocol::FailureKind;
        match failure.kind {
            FailureKind::InvalidState => WorkerError::InvalidState {
                reason: failure.message,
            },
            FailureKind::Refused => WorkerError::Refused {
                reason: failure.message,
            },
            FailureKind::Failed => WorkerError::failed(failure),
            // The worker's own wait (for the guest's agent); the caller knows how long it was.
            FailureKind::TimedOut => WorkerError::Timeout(Duration::ZERO),
        }
    }
}

/// Result type of the worker-manager crate.
pub type Result<T> = std::result::Result<T, Error>;
