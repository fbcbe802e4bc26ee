//! Why a partition stopped running.

use serde::{Deserialize, Serialize};

/// Why a partition's run ended. Every run ends with exactly one reason: the first vCPU (or the host)
/// to stop the partition sets it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitReason {
    /// The host asked the partition to stop.
    Stopped,
    /// The guest powered off (ACPI PM1a SLP_EN, or a KVM system-event shutdown).
    PowerOff,
    /// The guest reset itself (i8042 pulse, or a KVM system-event reset).
    Reset,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault,
    /// KVM could not emulate an instruction.
    InternalError {
        /// KVM's sub-error code (1 = emulation failure).
        suberror: u32,
        /// Guest RIP of the instruction.
        rip: u64,
        /// Up to 15 bytes of the instruction, when they could be read.
        instruction: Vec<u8>,
    },
    /// KVM refused to enter the guest (invalid vCPU state).
    FailEntry {
        /// Hardware entry-failure reason.
        reason: u64,
    },
    /// The guest caused an exit this partition does not handle.
    UnhandledExit {
        /// The exit, as KVM reported it.
        exit: String,
    },
    /// A host-side failure (an ioctl failed).
    HostError {
        /// What failed.
        message: String,
    },
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stopped => write!(f, "stopped by the host"),
            Self::PowerOff => write!(f, "guest powered off"),
            Self::Reset => write!(f, "guest reset"),
            Self::TripleFault => write!(f, "triple fault"),
            Self::InternalError {
                suberror,
                rip,
                instruction,
            } => {
                write!(f, "internal error {suberror} at rip {rip:#x}, instruction")?;
                for b in instruction {
                    write!(f, " {b:02x}")?;
                }
                Ok(())
            }
            Self::FailEntry { reason } => write!(f, "vm entry failed, reason {reason:#x}"),
            Self::UnhandledExit { exit } => write!(f, "unhandled exit {exit}"),
            Self::HostError { message } => write!(f, "host error: {message}"),
        }
    }
}
