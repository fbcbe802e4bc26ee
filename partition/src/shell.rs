//! [`VmShell`]: a KVM VM created before anyone knows what it will run.
//!
//! Creating a VM (`KVM_CREATE_VM`) is the costliest part of a partition's set-up that depends on
//! nothing in its configuration: 0.15 ms for a process that has created VMs before, and about
//! 1.2 ms for its first, which also pays KVM's first-use set-up for the process (traced on the
//! software KVM of the test hosts). A process that will run a VM later, such as a worker waiting
//! in a pool for its assignment, creates the shell while it has time, and the partition it builds
//! then adopts it with [`PartitionBuilder::shell`](crate::PartitionBuilder::shell).
//!
//! The shell holds only what every partition sets the same way: the VM, its TSS region and its
//! identity-map page. Everything that the configuration decides comes after, in the order
//! [`Partition::new`](crate::Partition::new) uses: memory slots, then the in-kernel irqchip and
//! PIT (a memory-slot change made after those waits for SRCU grace periods they start), then the
//! vCPUs. Setting the TSS and identity-map addresses before any memory slot is valid on every x86
//! KVM: the KVM API documentation orders neither against memory slots (the regions must only not
//! overlap one, and they lie in the MMIO gap), `KVM_SET_IDENTITY_MAP_ADDR` must only precede the
//! first vCPU, and QEMU sets both in `kvm_arch_init`, before it registers any guest memory.

use kvm_ioctls::VmFd;

use crate::error::{Error, Result};
use crate::host;
use crate::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

/// A VM created ahead of its partition (see the module notes); a [`PartitionBuilder`] given it
/// with [`shell`] builds into it instead of creating a VM of its own.
///
/// A shell belongs to the process that created it (KVM binds a VM to the address space it was
/// created in) and serves one partition. Dropping an unused shell destroys its VM, which is cheap:
/// it has no memory slots, irqchip or PIT yet.
///
/// ```
/// use std::sync::Arc;
/// use partition::{KernelImage, Partition, PartitionConfig, VmShell};
///
/// # if !std::path::Path::new("/dev/kvm").exists() { return Ok(()); }
/// // Ahead of time, before the configuration is known:
/// let shell = VmShell::create()?;
///
/// // Later, when it is: the partition adopts the VM instead of creating one.
/// let mut config = PartitionConfig::new(KernelImage::Bytes(Arc::from(vmms_guest::ELF)), "");
/// config.memory_mib = 16;
/// let mut vm = Partition::builder(config).shell(shell).build()?;
/// vm.resume()?;
/// vm.stop();
/// # Ok::<(), partition::Error>(())
/// ```
///
/// [`PartitionBuilder`]: crate::PartitionBuilder
/// [`shell`]: crate::PartitionBuilder::shell
#[derive(Debug)]
pub struct VmShell {
    vm: VmFd,
}

impl VmShell {
    /// Creates the VM and sets its TSS and identity-map addresses.
    pub fn create() -> Result<Self> {
        let vm = host::kvm()?.create_vm().map_err(Error::Kvm)?;
        vm.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(Error::Kvm)?;
        vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(Error::Kvm)?;
        Ok(VmShell { vm })
    }

    /// The VM, for the partition that adopts it.
    pub(crate) fn into_vm(self) -> VmFd {
        self.vm
    }
}
