//! The one mapping from the service's [`Error`]s to Hyper-V's return codes.
//!
//! Hyper-V's methods answer with a number, not an exception: every front end (the daemon's
//! socket, the CIM-XML provider, a job's `ErrorCode`) has to turn a failed call into one of the
//! vendor codes of [`ReturnCode`]. Doing it here, in one exhaustive `match`, means a new error
//! variant cannot be added without deciding its code, and no front end falls back to 32768 for an
//! error it did not know about.

use std::io::ErrorKind;

use crate::error::Error;
use crate::state::ReturnCode;

/// The Hyper-V return code a method reports when the service fails with `error`.
///
/// - A reference or argument that names nothing, or a definition that fails validation:
///   [`ReturnCode::InvalidParameter`] (32773).
/// - The virtual machine is in a state that forbids the call (running, degraded):
///   [`ReturnCode::InvalidState`] (32775).
/// - Another operation owns the virtual machine: [`ReturnCode::SystemInUse`] (32774).
/// - A job did not end in time: [`ReturnCode::Timeout`] (32772).
/// - Store I/O: [`ReturnCode::FileNotFound`], [`ReturnCode::AccessDenied`] or
///   [`ReturnCode::OutOfMemory`] where the operating system said so, else
///   [`ReturnCode::Failed`] (32768), as for every other failure of the host itself.
pub fn return_code(error: &Error) -> ReturnCode {
    match error {
        Error::InvalidConfig(_) => ReturnCode::InvalidParameter,
        Error::VmNotFound(_) => ReturnCode::InvalidParameter,
        Error::VmExists(_) => ReturnCode::InvalidParameter,
        Error::NotStopped { .. } => ReturnCode::InvalidState,
        Error::ChangeRequiresOff { .. } => ReturnCode::InvalidState,
        Error::Busy(_) => ReturnCode::SystemInUse,
        Error::Degraded(_) => ReturnCode::InvalidState,
        Error::Io { source, .. } => match source.kind() {
            ErrorKind::NotFound => ReturnCode::FileNotFound,
            ErrorKind::PermissionDenied => ReturnCode::AccessDenied,
            ErrorKind::OutOfMemory => ReturnCode::OutOfMemory,
            _ => ReturnCode::Failed,
        },
        Error::ParseConfig { .. } => ReturnCode::Failed,
        Error::ParseEvents { .. } => ReturnCode::Failed,
        Error::ConfigIdMismatch { .. } => ReturnCode::Failed,
        Error::EncodeConfig(..) => ReturnCode::Failed,
        Error::JobNotFound(_) => ReturnCode::InvalidParameter,
        Error::JobTimeout { .. } => ReturnCode::Timeout,
        Error::Thread(_) => ReturnCode::Failed,
        Error::Checkpoint(error) => checkpoint_code(error),
        Error::NoSnapshotService => ReturnCode::NotSupported,
        Error::Backup(error) => backup_code(error),
        Error::NoBackupService => ReturnCode::NotSupported,
    }
}

impl From<&Error> for ReturnCode {
    fn from(error: &Error) -> Self {
        return_code(error)
    }
}

/// The return code of a checkpoint operation's failure.
pub(crate) fn checkpoint_code(error: &crate::checkpoint::CheckpointError) -> ReturnCode {
    use crate::checkpoint::CheckpointError as E;
    match error {
        E::NotFound(_) | E::AmbiguousName(_) | E::InvalidName(_) | E::InvalidParameter(_) => {
            ReturnCode::InvalidParameter
        }
        E::InvalidState(_) => ReturnCode::InvalidState,
        _ => ReturnCode::Failed,
    }
}

/// The return code of a failed backup operation.
pub(crate) fn backup_code(error: &crate::backup::BackupError) -> ReturnCode {
    use crate::backup::BackupError as E;
    use crate::worker::WorkerError;
    match error {
        E::InvalidParameter(_) | E::InvalidSet { .. } => ReturnCode::InvalidParameter,
        E::InvalidState(_)
        | E::Worker {
            source: WorkerError::InvalidState { .. },
            ..
        } => ReturnCode::InvalidState,
        E::Worker {
            source: WorkerError::Timeout(_),
            ..
        } => ReturnCode::Timeout,
        E::Worker {
            source: WorkerError::Gone,
            ..
        } => ReturnCode::SystemNotAvailable,
        _ => ReturnCode::Failed,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;
    use crate::config::{ConfigError, VmId};
    use crate::job::JobId;
    use crate::state::EnabledState;

    fn vm() -> VmId {
        VmId::new_random()
    }

    fn io(kind: ErrorKind) -> Error {
        Error::Io {
            path: PathBuf::from("/store/vms/x/config.json"),
            source: std::io::Error::from(kind),
        }
    }

    fn json_error() -> serde_json::Error {
        serde_json::from_str::<u32>("{").expect_err("not a number")
    }

    fn any_job() -> JobId {
        "8c5f0f4a-7a4b-4a5e-9d7f-3c1d2e3f4a5b"
            .parse()
            .expect("a valid GUID")
    }

    #[test]
    fn invalid_config_is_invalid_parameter() {
        let error = Error::InvalidConfig(ConfigError::NoVcpus);
        assert_eq!(return_code(&error).code(), 32773);
    }

    #[test]
    fn unknown_vm_is_invalid_parameter() {
        assert_eq!(return_code(&Error::VmNotFound(vm())).code(), 32773);
    }

    #[test]
    fn duplicate_vm_is_invalid_parameter() {
        assert_eq!(return_code(&Error::VmExists(vm())).code(), 32773);
    }

    #[test]
    fn destroying_a_running_vm_is_invalid_state() {
        let error = Error::NotStopped {
            id: vm(),
            state: EnabledState::Running,
        };
        assert_eq!(return_code(&error).code(), 32775);
    }

    #[test]
    fn changing_hardware_of_a_running_vm_is_invalid_state() {
        let error = Error::ChangeRequiresOff {
            id: vm(),
            setting: "vcpus",
            state: EnabledState::Running,
        };
        assert_eq!(return_code(&error).code(), 32775);
    }

    #[test]
    fn busy_vm_is_system_in_use() {
        assert_eq!(return_code(&Error::Busy(vm())).code(), 32774);
    }

    #[test]
    fn degraded_vm_is_invalid_state() {
        assert_eq!(return_code(&Error::Degraded(vm())).code(), 32775);
    }

    #[test]
    fn missing_file_is_file_not_found() {
        assert_eq!(return_code(&io(ErrorKind::NotFound)).code(), 32779);
    }

    #[test]
    fn permission_denied_is_access_denied() {
        assert_eq!(return_code(&io(ErrorKind::PermissionDenied)).code(), 32769);
    }

    #[test]
    fn out_of_memory_io_is_out_of_memory() {
        assert_eq!(return_code(&io(ErrorKind::OutOfMemory)).code(), 32778);
    }

    #[test]
    fn other_io_is_failed() {
        assert_eq!(return_code(&io(ErrorKind::Other)).code(), 32768);
    }

    #[test]
    fn unparsable_config_is_failed() {
        let error = Error::ParseConfig {
            path: PathBuf::from("config.json"),
            source: json_error(),
        };
        assert_eq!(return_code(&error).code(), 32768);
    }

    #[test]
    fn unparsable_event_history_is_failed() {
        let error = Error::ParseEvents {
            path: PathBuf::from("events.json"),
            source: json_error(),
        };
        assert_eq!(return_code(&error).code(), 32768);
    }

    #[test]
    fn config_of_another_vm_is_failed() {
        let error = Error::ConfigIdMismatch {
            path: PathBuf::from("config.json"),
            found: vm(),
        };
        assert_eq!(return_code(&error).code(), 32768);
    }

    #[test]
    fn unencodable_config_is_failed() {
        assert_eq!(
            return_code(&Error::EncodeConfig(vm(), json_error())).code(),
            32768
        );
    }

    #[test]
    fn unknown_job_is_invalid_parameter() {
        assert_eq!(return_code(&Error::JobNotFound(any_job())).code(), 32773);
    }

    #[test]
    fn job_wait_timeout_is_timeout() {
        let error = Error::JobTimeout {
            job: any_job(),
            waited: Duration::from_secs(1),
        };
        assert_eq!(return_code(&error).code(), 32772);
    }

    #[test]
    fn thread_failure_is_failed() {
        let error = Error::Thread(std::io::Error::from(ErrorKind::WouldBlock));
        assert_eq!(return_code(&error).code(), 32768);
    }

    #[test]
    fn from_ref_matches_the_function() {
        let error = Error::Busy(vm());
        assert_eq!(ReturnCode::from(&error), return_code(&error));
    }
}
