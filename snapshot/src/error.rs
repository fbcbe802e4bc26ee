//! The snapshot crate's error type.

use std::io;
use std::path::PathBuf;

/// Everything a disk or checkpoint operation can fail with.
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
    /// The image library failed on an image (corrupt metadata, I/O error inside the image).
    #[error("disk image {path}")]
    Image {
        /// The image file.
        path: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// The file's first bytes are neither a qcow2 header nor usable as a raw image.
    #[error("{path} is not a usable disk image: {reason}")]
    UnknownFormat {
        /// The file.
        path: PathBuf,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A qcow2 feature this crate does not support (external data file, unknown backing format).
    #[error("{path}: unsupported qcow2 feature: {feature}")]
    Unsupported {
        /// The image file.
        path: PathBuf,
        /// The feature.
        feature: String,
    },
    /// A backing file named by an image does not exist.
    #[error("backing file {backing} of {image} is missing")]
    MissingBacking {
        /// The image that names it.
        image: PathBuf,
        /// The resolved backing path.
        backing: PathBuf,
    },
    /// Another open file description (this or another process, e.g. QEMU) holds a conflicting
    /// lock on the image.
    #[error(
        "disk image {path} is in use: another process holds a conflicting lock (wanted {wanted})"
    )]
    ImageLocked {
        /// The image file.
        path: PathBuf,
        /// The access that was refused ("write" or "read").
        wanted: &'static str,
    },
    /// The backing chain is longer than [`crate::MAX_CHAIN_DEPTH`] (or loops).
    #[error("backing chain of {path} is deeper than {limit} layers")]
    ChainTooDeep {
        /// The top image.
        path: PathBuf,
        /// The limit.
        limit: usize,
    },
    /// A disk size is zero or not a multiple of 512.
    #[error("disk size {size} is not a positive multiple of 512")]
    BadSize {
        /// The size asked for.
        size: u64,
    },
    /// A JSON record (tree, journal, config) is malformed.
    #[error("{path} is corrupt")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parse failure.
        #[source]
        source: serde_json::Error,
    },
    /// A JSON record parsed but breaks the rules (unknown version, dangling parent, loop).
    #[error("{path} is invalid: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// No checkpoint with this id or name.
    #[error("no checkpoint {0}")]
    CheckpointNotFound(String),
    /// A checkpoint name is ambiguous (several checkpoints share it); use the id.
    #[error("checkpoint name {0} is ambiguous; use its id")]
    AmbiguousName(String),
    /// A checkpoint's folder lacks a file it needs (config or saved-state memory).
    #[error("checkpoint {checkpoint} is incomplete: {missing} is missing")]
    CheckpointIncomplete {
        /// The checkpoint id.
        checkpoint: String,
        /// The missing file.
        missing: PathBuf,
    },
    /// The operation needs the VM in another state (e.g. apply needs Off or Saved).
    #[error("the virtual machine is {state}; the operation needs it {needed}")]
    InvalidState {
        /// The current state.
        state: &'static str,
        /// What the operation needs.
        needed: &'static str,
    },
    /// A production-only checkpoint was asked for where the guest cannot be quiesced (a Saved
    /// VM; a running one whose agent did not freeze it).
    #[error("a production-only checkpoint needs the guest quiescing through its running agent")]
    ProductionUnavailable,
    /// A checkpoint name is empty, too long or has control characters.
    #[error("invalid checkpoint name: {0}")]
    InvalidName(String),
    /// An unfinished operation was found; run [`crate::recover`] first.
    #[error("an interrupted {0} operation must be recovered first")]
    RecoveryNeeded(String),
    /// The import target already exists.
    #[error("{0} already exists")]
    AlreadyExists(PathBuf),
    /// A disk of the VM lies outside its folder and cannot be exported chained.
    #[error("disk {0} lies outside the virtual machine's folder; export it flattened")]
    DiskOutsideFolder(PathBuf),
    /// The worker did not commit a running checkpoint; nothing of it was kept.
    #[error("the worker did not take the checkpoint; the virtual machine is unchanged")]
    NotTaken,
    /// Recovery gave up waiting for a worker still taking a checkpoint.
    #[error("a worker is still taking the checkpoint in {0}")]
    WorkerStillCheckpointing(PathBuf),
    /// A failure in vmm-core's terms that has no closer match here.
    #[error(transparent)]
    Service(vmm_core::CheckpointError),
}

impl Error {
    /// Wraps an I/O failure on `path` during `op`.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// Wraps an image library failure on `path`.
    pub(crate) fn image(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Image {
            path: path.into(),
            source,
        }
    }
}

/// The snapshot crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<vmm_core::CheckpointError> for Error {
    fn from(error: vmm_core::CheckpointError) -> Self {
        use vmm_core::CheckpointError as E;
        match error {
            E::NotFound(name) => Error::CheckpointNotFound(name),
            E::AmbiguousName(name) => Error::AmbiguousName(name),
            E::InvalidName(name) => Error::InvalidName(name),
            other => Error::Service(other),
        }
    }
}

/// The service's view of a failure: what the caller did wrong or what state forbids it, apart
/// from everything else (which keeps this error as its source).
impl From<Error> for vmm_core::CheckpointError {
    fn from(error: Error) -> Self {
        use vmm_core::CheckpointError as E;
        match error {
            Error::CheckpointNotFound(name) => E::NotFound(name),
            Error::AmbiguousName(name) => E::AmbiguousName(name),
            Error::InvalidName(name) => E::InvalidName(name),
            Error::InvalidState { .. }
            | Error::ProductionUnavailable
            | Error::RecoveryNeeded(_)
            | Error::ImageLocked { .. } => E::InvalidState(error.to_string()),
            Error::AlreadyExists(_) | Error::DiskOutsideFolder(_) | Error::BadSize { .. } => {
                E::InvalidParameter(error.to_string())
            }
            Error::Service(inner) => inner,
            other => E::Failed(Box::new(other)),
        }
    }
}
