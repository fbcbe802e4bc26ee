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
    /// The configuration asks for more memory than can be mapped.
    #[error("memory size {mib} MiB is too large")]
    MemoryTooLarge {
        /// Requested size.
        mib: u64,
    },
    /// A disk's changed-block granularity is not a power of two of at least 512.
    #[error("changed-block size {size} is not a power of two >= 512")]
    InvalidChangedBlockSize {
        /// Requested size.
        size: u64,
    },
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("kvm ioctl failed")]
    Kvm(#[source] kvm_ioctls::Error),
    /// Guest memory could not be created, mapped or accessed.
    #[error("guest memory: {0}")]
    GuestMemory(String),
    /// The memory file could not be read or written.
    #[error("memory file")]
    MemoryFile(#[source] std::io::Error),
    /// The memory file is shorter than the memory it should hold.
    #[error("memory file holds {len} bytes, {needed} needed")]
    MemoryFileTooShort {
        /// File length.
        len: u64,
        /// Bytes of RAM to map.
        needed: u64,
    },
    /// The kernel image is malformed, truncated, or does not fit in guest memory.
    #[error("cannot load kernel")]
    KernelLoad(#[source] linux_loader::loader::Error),
    /// The kernel file is shorter than its own header says.
    #[error("kernel image is truncated: {found} bytes, header says {expected}")]
    KernelTruncated {
        /// Length the header implies.
        expected: u64,
        /// Length of the file.
        found: u64,
    },
    /// The kernel is neither an ELF nor a bzImage.
    #[error("kernel image is neither ELF nor bzImage")]
    UnknownKernelFormat,
    /// PVH boot was requested for a kernel without a PVH entry note.
    #[error("kernel has no PVH entry point")]
    NoPvhEntry,
    /// The initrd does not fit between the kernel and the end of low memory.
    #[error("initrd of {size} bytes does not fit in the {available} bytes above the kernel")]
    InitrdTooLarge {
        /// Initrd size.
        size: u64,
        /// Room available.
        available: u64,
    },
    /// The command line is longer than the kernel accepts.
    #[error("command line of {len} bytes exceeds {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The command line contains a NUL byte.
    #[error("command line contains a nul byte")]
    CmdlineHasNul,
    /// The ACPI or MP tables for this machine do not fit their area below 1 MiB.
    #[error("system tables of {size} bytes exceed their {available}-byte area")]
    SystemTablesTooLarge {
        /// Bytes the tables need.
        size: u64,
        /// Bytes their area holds.
        available: u64,
    },
    /// More MSRs than KVM's list type holds.
    #[error("too many msrs")]
    MsrsTooMany,
    /// KVM refused to set or read an MSR.
    #[error("kvm rejected msr {index:#x}")]
    MsrRejected {
        /// The MSR.
        index: u32,
    },
    /// Saved state is malformed.
    #[error("invalid saved state: {0}")]
    InvalidState(String),
    /// Saved state has a version this build cannot restore.
    #[error("saved state version {found} is not supported (expected {supported})")]
    StateVersion {
        /// Version found.
        found: u32,
        /// Version this build writes.
        supported: u32,
    },
    /// Saved state describes another machine (vCPU count or memory size) than the configuration.
    #[error("saved state does not match the configuration (vcpus or memory)")]
    StateMismatch,
    /// A network adapter's MAC is multicast or all zeros.
    #[error("mac address {mac} is not a unicast address")]
    InvalidMac {
        /// The address given.
        mac: crate::devices::virtio::MacAddress,
    },
    /// The vCPU kick signal handler could not be installed.
    #[error("cannot install the vcpu kick signal handler")]
    Signal(#[source] std::io::Error),
    /// A vCPU thread could not be started.
    #[error("cannot spawn vcpu thread")]
    SpawnVcpu(#[source] std::io::Error),
    /// An eventfd could not be created.
    #[error("cannot create eventfd")]
    EventFd(#[source] std::io::Error),
    /// A disk's backend could not be replaced: no such disk, or the new backend's size or
    /// read-only flag differ from what the guest was told.
    #[error("cannot replace the backend of disk {index}")]
    DiskReplacement {
        /// The disk (configuration order).
        index: usize,
    },
    /// The operation is not possible in the partition's current run state.
    #[error("cannot {operation} a partition that is {state}")]
    InvalidRunState {
        /// What was asked.
        operation: &'static str,
        /// The state it is in.
        state: String,
    },
    /// A disk image could not be opened, or is locked by another virtual machine
    /// ([`BlockError::DiskLocked`](crate::block::BlockError::DiskLocked)).
    #[error(transparent)]
    Block(#[from] crate::block::BlockError),
    /// A virtio device could not be created or restored.
    #[error("virtio device")]
    Virtio(#[from] crate::devices::virtio::VirtioError),
    /// The dirty log was read but the partition was built without `dirty_log`.
    #[error("dirty-page logging is not enabled for this partition")]
    DirtyLogDisabled,
}

/// Result of partition operations.
pub type Result<T> = std::result::Result<T, Error>;
