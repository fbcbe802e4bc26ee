//! Errors of the partition crate.

use std::path::PathBuf;

/// A bus range could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The range is empty or wraps around the address space.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Requested base.
        base: u64,
        /// Requested length.
        len: u64,
    },
    /// The range overlaps one already registered.
    #[error("bus range {base:#x}+{len:#x} overlaps {other_base:#x}+{other_len:#x}")]
    Overlap {
        /// Requested base.
        base: u64,
        /// Requested length.
        len: u64,
        /// Base of the range already there.
        other_base: u64,
        /// Length of the range already there.
        other_len: u64,
    },
}

/// Everything that can go wrong building, running or capturing a partition.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A device range clashes with another.
    #[error("device layout")]
    Bus(#[from] BusError),
    /// The configuration asks for zero vCPUs or more than KVM allows.
    #[error("invalid vCPU count {count} (1..={max})")]
    InvalidVcpuCount {
        /// Requested count.
        count: u8,
        /// KVM's limit on this host.
        max: usize,
    },
    /// The configuration asks for less memory than a guest can boot in.
    #[error("memory size {mib} MiB is below the minimum of {min_mib} MiB")]
    MemoryTooSmall {
        /// Requested size.
        mib: u64,
        /// Smallest accepted size.
        min_mib: u64,
    },
    /// A file named in the configuration could not be opened or read.
    #[error("cannot read {}", path.display())]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A disk path names something that is not a regular file.
    #[error("disk {} is not a regular file", path.display())]
    DiskNotAFile {
        /// The path.
        path: PathBuf,
    },
}

/// Result of partition operations.
pub type Result<T> = std::result::Result<T, Error>;
