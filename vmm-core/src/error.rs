//! Errors of the vmm-core crate.

use std::path::PathBuf;
use std::time::Duration;

use crate::config::{ConfigError, VmId};
use crate::job::JobId;
use crate::state::EnabledState;

/// Everything that can go wrong in the service, its catalog or its store.
///
/// A refused `RequestStateChange` is not an error: it is a [`ReturnCode`](crate::ReturnCode), as
/// in Hyper-V. Errors are for calls that have no return code of their own (define, destroy,
/// modify, queries) and for the store underneath.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration failed validation.
    #[error("invalid virtual machine configuration")]
    InvalidConfig(#[from] ConfigError),
    /// No virtual machine has this id.
    #[error("virtual machine {0} not found")]
    VmNotFound(VmId),
    /// A virtual machine with this id is already defined.
    #[error("virtual machine {0} already exists")]
    VmExists(VmId),
    /// The operation needs the virtual machine off or saved (DestroySystem's rule).
    #[error("virtual machine {id} is {state}; it must be off or saved")]
    NotStopped {
        /// The virtual machine.
        id: VmId,
        /// Its state when asked.
        state: EnabledState,
    },
    /// A setting that only an off virtual machine may change was changed.
    #[error("cannot change {setting} while virtual machine {id} is {state}")]
    ChangeRequiresOff {
        /// The virtual machine.
        id: VmId,
        /// The setting that differs.
        setting: &'static str,
        /// Its state when asked.
        state: EnabledState,
    },
    /// Another operation owns the virtual machine right now.
    #[error("virtual machine {0} is busy with another operation")]
    Busy(VmId),
    /// The virtual machine's configuration could not be read; only turn-off and destroy are
    /// allowed until that is fixed.
    #[error("virtual machine {0} is degraded: its configuration cannot be read")]
    Degraded(VmId),
    /// A file or folder of the store could not be read or written.
    #[error("store i/o on {}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A configuration file is not valid JSON of the expected shape.
    #[error("cannot parse {}", path.display())]
    ParseConfig {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The saved event history is not valid JSON of the expected shape (or cannot be encoded).
    #[error("cannot parse the event history {}", path.display())]
    ParseEvents {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A `config.json` names a different virtual machine than the folder it sits in.
    #[error("{} names virtual machine {found}", path.display())]
    ConfigIdMismatch {
        /// The file.
        path: PathBuf,
        /// The id inside it.
        found: VmId,
    },
    /// A configuration could not be encoded (does not happen for well-formed values).
    #[error("cannot encode the configuration of {0}")]
    EncodeConfig(VmId, #[source] serde_json::Error),
    /// No job has this id (it may have expired after its retention time).
    #[error("job {0} not found")]
    JobNotFound(JobId),
    /// The job did not reach a terminal state in time.
    #[error("job {job} still running after {waited:?}")]
    JobTimeout {
        /// The job.
        job: JobId,
        /// How long the caller waited.
        waited: Duration,
    },
    /// The snapshot service refused or failed a checkpoint operation.
    #[error("checkpoint operation failed")]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    /// Checkpoints were asked for but no snapshot service is installed.
    #[error("this service has no checkpoint support (no snapshot service installed)")]
    NoSnapshotService,
    /// The backup service refused or failed a backup operation.
    #[error("backup operation failed")]
    Backup(#[from] crate::backup::BackupError),
    /// A backup was asked for but no backup service is installed.
    #[error("this service has no backup support (no backup service installed)")]
    NoBackupService,
    /// The operating system refused to start a thread for an operation.
    #[error("cannot start an operation thread")]
    Thread(#[source] std::io::Error),
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

/// Result type of the vmm-core crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Renders an error and every `source()` under it as one line (`outer: inner: innermost`).
///
/// Job descriptions and status texts are read by people and sent over the wire as one string, so
/// they carry the whole chain rather than only the outermost message.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chain_joins_every_source() {
        let error = Error::io("/x/config.json", std::io::Error::other("disk on fire"));

        let text = error_chain(&error);

        assert_eq!(text, "store i/o on /x/config.json: disk on fire");
    }
}
