//! The vss-writer crate's error type, and how it crosses vmm-core's seam.

use std::io;
use std::path::PathBuf;

use vmm_core::WorkerError;
use vmm_core::backup::BackupError;

/// Everything a backup, verify or restore can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder could not be read, written, created or removed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// A disk image or a file of the VM's folder could not be opened, read, written or
    /// removed (the snapshot crate's images and durable file operations).
    #[error(transparent)]
    Snapshot(#[from] snapshot::Error),
    /// A disk image read or write failed inside an opened image.
    #[error("{op} {path} at offset {offset}")]
    DiskIo {
        /// What was being done.
        op: &'static str,
        /// The image.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// A set is damaged, incomplete or not a set.
    #[error("backup set {set} is not valid: {reason}")]
    InvalidSet {
        /// The set's folder.
        set: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The request is not usable as given.
    #[error("{0}")]
    InvalidParameter(String),
    /// The VM is not in a state the operation accepts.
    #[error("{0}")]
    InvalidState(String),
    /// The guest could not be quiesced and the policy says fail.
    #[error("{0}")]
    QuiesceFailed(String),
    /// The VM's worker failed a step of the session.
    #[error("worker: {step}")]
    Worker {
        /// The step.
        step: &'static str,
        /// What the worker said.
        #[source]
        source: WorkerError,
    },
    /// A record could not be encoded.
    #[error("encode")]
    Encode(#[source] serde_json::Error),
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for BackupError {
    fn from(error: Error) -> Self {
        match error {
            Error::InvalidSet { set, reason } => BackupError::InvalidSet { set, reason },
            Error::InvalidParameter(text) => BackupError::InvalidParameter(text),
            Error::InvalidState(text) => BackupError::InvalidState(text),
            Error::QuiesceFailed(text) => BackupError::QuiesceFailed(text),
            Error::Worker { step, source } => BackupError::Worker {
                step: step.into(),
                source,
            },
            other => BackupError::Storage {
                context: "backup storage".into(),
                source: Box::new(other),
            },
        }
    }
}
