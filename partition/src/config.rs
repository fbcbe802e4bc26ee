//! What a partition is built from.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::block::BlockBackend;
use crate::devices::virtio::{MacAddress, Tap};
use crate::error::{Error, Result};

/// Smallest guest memory accepted: room for the boot structures below 1 MiB, a kernel and its heap.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Default block granularity of a disk's changed-block map.
pub const DEFAULT_CHANGED_BLOCK_SIZE: u64 = 64 * 1024;

/// A kernel image, from a file or from memory (the embedded test guest).
#[derive(Clone, Serialize, Deserialize)]
pub enum KernelImage {
    /// Read from this path when the partition is built.
    Path(PathBuf),
    /// An image already in memory.
    #[serde(skip)]
    Bytes(Arc<[u8]>),
}

impl std::fmt::Debug for KernelImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Path(path) => f.debug_tuple("Path").field(path).finish(),
            Self::Bytes(bytes) => write!(f, "Bytes({} bytes)", bytes.len()),
        }
    }
}

/// Which entry protocol to start a kernel with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum BootProtocol {
    /// PVH when an ELF kernel carries the Xen PVH entry note, the 64-bit Linux boot protocol otherwise.
    #[default]
    Auto,
    /// The 64-bit Linux boot protocol (long mode, `boot_params` in RSI), ignoring any PVH note.
    Linux64,
    /// The PVH entry (32-bit protected mode, `hvm_start_info` in EBX); fails if the kernel has none.
    Pvh,
}

/// The kernel, initrd and command line.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BootSource {
    /// A bzImage or a 64-bit ELF (vmlinux, or ELF with a PVH note).
    pub kernel: KernelImage,
    /// An initramfs to load next to the kernel.
    pub initrd: Option<PathBuf>,
    /// The command line; the partition appends the `virtio_mmio.device=` entries of its disks.
    pub cmdline: String,
    /// The entry protocol.
    #[serde(default)]
    pub protocol: BootProtocol,
}

/// Where a disk's requests are served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskIo {
    /// On the disk's own I/O thread. The guest's queue notification is a KVM ioeventfd (the
    /// vCPU's exit ends in the kernel and the vCPU runs on while the request is served) and the
    /// completion interrupt an irqfd; the thread serves the whole available ring per wake-up.
    #[default]
    IoThread,
    /// On the vCPU that notified, inside its MMIO exit: no extra thread, but the vCPU waits for
    /// every request and each notification is a full exit to userspace.
    Synchronous,
}

/// A virtio-blk disk: a raw image file the partition opens, or a backend the integrator opened.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiskConfig {
    /// The image file. Without a [`backend`](Self::backend) the partition opens it as a raw image
    /// (it must be a regular file whose size is a multiple of 512) and locks it against other
    /// VMs; with one it only names the disk.
    pub path: PathBuf,
    /// Refuse guest writes.
    #[serde(default)]
    pub read_only: bool,
    /// Granularity of the changed-block map (a power of two, at least 512).
    #[serde(default = "default_changed_block_size")]
    pub changed_block_size: u64,
    /// The disk's bytes, opened by the integrator (a qcow2 image, a checkpoint's differencing
    /// disk): the partition uses it instead of opening `path`. The integrator locks what it opens
    /// ([`lock_image`](crate::block::lock_image)). Not serialized: a saved configuration names
    /// the path, and whoever restores it opens the backend again.
    #[serde(skip)]
    pub backend: Option<Arc<dyn BlockBackend>>,
    /// Where requests are served: the disk's I/O thread (default) or the notifying vCPU.
    #[serde(default)]
    pub io: DiskIo,
}

fn default_changed_block_size() -> u64 {
    DEFAULT_CHANGED_BLOCK_SIZE
}

impl DiskConfig {
    /// A writable disk with the default changed-block granularity.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            read_only: false,
            changed_block_size: DEFAULT_CHANGED_BLOCK_SIZE,
            backend: None,
            io: DiskIo::IoThread,
        }
    }

    /// A disk over an already opened `backend`, named `path`, with the default changed-block
    /// granularity; read-only if the backend is.
    pub fn with_backend(path: impl Into<PathBuf>, backend: Arc<dyn BlockBackend>) -> Self {
        Self {
            read_only: backend.read_only(),
            backend: Some(backend),
            ..Self::new(path)
        }
    }
}

/// A virtio-net adapter: its MAC and the TAP it is connected to.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NicConfig {
    /// The adapter's address (unicast).
    pub mac: MacAddress,
    /// The TAP interface the partition opens (creating it if it does not exist) when no
    /// [`tap`](Self::tap) is given; with one it only names the adapter's host end.
    pub tap_name: String,
    /// A TAP the integrator opened (with `IFF_VNET_HDR`), e.g. one a daemon created and passed
    /// to a confined worker that cannot open `/dev/net/tun` itself. Not serialized.
    #[serde(skip)]
    pub tap: Option<Arc<Tap>>,
}

impl NicConfig {
    /// An adapter with address `mac` on the TAP interface `tap_name`, opened at build time.
    pub fn new(mac: MacAddress, tap_name: impl Into<String>) -> Self {
        Self {
            mac,
            tap_name: tap_name.into(),
            tap: None,
        }
    }
}

/// Everything a [`Partition`](crate::Partition) is built from.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PartitionConfig {
    /// Virtual processors (at least 1).
    pub vcpus: u8,
    /// Guest memory in MiB (at least [`MIN_MEMORY_MIB`]).
    pub memory_mib: u64,
    /// What to boot.
    pub boot: BootSource,
    /// Disks, in the order they appear to the guest (`vda`, `vdb`, ...).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// Track the pages the guest writes (KVM dirty log), for incremental checkpoints.
    #[serde(default)]
    pub dirty_log: bool,
    /// Network adapters (virtio-net), after the disks on the MMIO bus, in the order the guest
    /// sees them (`eth0`, `eth1`, ...).
    #[serde(default)]
    pub nics: Vec<NicConfig>,
}

impl PartitionConfig {
    /// A configuration booting `kernel` with `cmdline`, 1 vCPU, 64 MiB, no disk.
    pub fn new(kernel: KernelImage, cmdline: impl Into<String>) -> Self {
        Self {
            vcpus: 1,
            memory_mib: 64,
            boot: BootSource {
                kernel,
                initrd: None,
                cmdline: cmdline.into(),
                protocol: BootProtocol::Auto,
            },
            disks: Vec::new(),
            dirty_log: false,
            nics: Vec::new(),
        }
    }

    /// Checks what can be checked without KVM: counts, sizes, and that named files exist.
    pub fn validate(&self, max_vcpus: usize) -> Result<()> {
        if self.vcpus == 0 || usize::from(self.vcpus) > max_vcpus {
            return Err(Error::InvalidVcpuCount {
                count: self.vcpus,
                max: max_vcpus,
            });
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(Error::MemoryTooSmall {
                mib: self.memory_mib,
                min_mib: MIN_MEMORY_MIB,
            });
        }
        // Keep the size representable in bytes and within what a host can plausibly map.
        if self.memory_mib > (1 << 24) {
            return Err(Error::MemoryTooLarge {
                mib: self.memory_mib,
            });
        }
        if let KernelImage::Path(path) = &self.boot.kernel {
            check_regular_file(path, |path| Error::ReadFile {
                path,
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            })?;
        }
        if let Some(initrd) = &self.boot.initrd {
            check_regular_file(initrd, |path| Error::ReadFile {
                path,
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            })?;
        }
        for disk in &self.disks {
            if disk.backend.is_none() {
                check_regular_file(&disk.path, |path| Error::DiskNotAFile { path })?;
            }
            let size = disk.changed_block_size;
            if size < 512 || !size.is_power_of_two() {
                return Err(Error::InvalidChangedBlockSize { size });
            }
        }
        for nic in &self.nics {
            if !nic.mac.is_unicast() {
                return Err(Error::InvalidMac { mac: nic.mac });
            }
        }
        Ok(())
    }
}

/// Fails with `not_file` when `path` exists but is not a regular file, and with a read error when it
/// does not exist at all.
fn check_regular_file(path: &PathBuf, not_file: impl FnOnce(PathBuf) -> Error) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|source| Error::ReadFile {
        path: path.clone(),
        source,
    })?;
    if meta.is_file() {
        Ok(())
    } else {
        Err(not_file(path.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PartitionConfig {
        PartitionConfig::new(KernelImage::Bytes(Arc::from(&b"kernel"[..])), "")
    }

    #[test]
    fn zero_vcpus_is_rejected() {
        let mut cfg = config();
        cfg.vcpus = 0;

        assert!(matches!(
            cfg.validate(8),
            Err(Error::InvalidVcpuCount { count: 0, .. })
        ));
    }

    #[test]
    fn more_vcpus_than_kvm_allows_is_rejected() {
        let mut cfg = config();
        cfg.vcpus = 9;

        assert!(matches!(
            cfg.validate(8),
            Err(Error::InvalidVcpuCount { count: 9, max: 8 })
        ));
    }

    #[test]
    fn memory_below_minimum_is_rejected() {
        let mut cfg = config();
        cfg.memory_mib = 4;

        assert!(matches!(
            cfg.validate(8),
            Err(Error::MemoryTooSmall { mib: 4, .. })
        ));
    }

    #[test]
    fn missing_kernel_file_is_a_read_error() {
        let mut cfg = config();
        cfg.boot.kernel = KernelImage::Path("/nonexistent/vmlinux".into());

        assert!(matches!(cfg.validate(8), Err(Error::ReadFile { .. })));
    }

    #[test]
    fn disk_that_is_a_directory_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config();
        cfg.disks.push(DiskConfig::new(dir.path()));

        assert!(matches!(cfg.validate(8), Err(Error::DiskNotAFile { .. })));
    }

    #[test]
    fn changed_block_size_must_be_a_power_of_two() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut cfg = config();
        let mut disk = DiskConfig::new(file.path());
        disk.changed_block_size = 3000;
        cfg.disks.push(disk);

        assert!(matches!(
            cfg.validate(8),
            Err(Error::InvalidChangedBlockSize { size: 3000 })
        ));
    }
}
