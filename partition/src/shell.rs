//! [`VmShell`]: a KVM VM created before anyone knows what it will run.
//!
//! Creating a VM (`KVM_CREATE_VM`) is the costliest part of a partition's set-up that depends on
//! nothing in its configuration: 0.15 ms for a process that has created VMs before, and about
//! 1.2 ms for its first, which also pays KVM's first-use set-up for the process (traced on the
//! software KVM of the test hosts). A process that will run a VM later, such as a worker waiting
//! in a pool for its assignment, creates the shell while it has time, and the partition it builds
//! then adopts it with [`PartitionBuilder::shell`](crate::PartitionBuilder::shell).
//!
//! A bare shell ([`VmShell::create`]) holds only what every partition sets the same way: the VM,
//! its TSS region and its identity-map page. Everything that the configuration decides comes
//! after, in the order [`Partition::new`](crate::Partition::new) uses: memory slots, then the
//! in-kernel irqchip and PIT (a memory-slot change made after those waits for SRCU grace periods
//! they start), then the vCPUs.
//!
//! Those later steps are where a start sleeps: `KVM_CREATE_IRQCHIP` and `KVM_CREATE_PIT2` each
//! wait for grace periods and the PIT for a kernel thread, 0.2-4 ms on a loaded host. They depend
//! only on the VM's [`VmShape`] (memory size, vCPU count, dirty logging), so a process that can
//! guess the shape builds the shell out to it ahead of time ([`VmShell::create_for`]), in that
//! same order; a partition of that shape then only loads its boot source and adds its devices.
//! A partition of another shape does not use the built-out VM: it is torn down (off the caller's
//! thread) and a fresh VM is created, so a wrong guess costs what no guess would have.
//!
//! Setting the TSS and identity-map addresses before any memory slot is valid on every x86
//! KVM: the KVM API documentation orders neither against memory slots (the regions must only not
//! overlap one, and they lie in the MMIO gap), `KVM_SET_IDENTITY_MAP_ADDR` must only precede the
//! first vCPU, and QEMU sets both in `kvm_arch_init`, before it registers any guest memory.

use std::sync::Arc;

use kvm_ioctls::VmFd;

use crate::config::{KernelImage, PartitionConfig};
use crate::error::{Error, Result};
use crate::host;
use crate::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};
use crate::memory::{PartitionMemory, create_memory, ram_ranges};
use crate::teardown::VmHandle;
use crate::vcpu::Vcpu;

/// What a VM's memory slots, in-kernel devices and vCPUs depend on: a shell built out to a shape
/// serves exactly the partitions of that shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VmShape {
    /// Guest memory in MiB ([`PartitionConfig::memory_mib`]).
    pub memory_mib: u64,
    /// vCPUs ([`PartitionConfig::vcpus`]).
    pub vcpus: u8,
    /// Memory slots log dirty pages ([`PartitionConfig::dirty_log`]).
    pub dirty_log: bool,
}

impl VmShape {
    /// The shape of the partition `config` describes.
    pub fn of(config: &PartitionConfig) -> Self {
        VmShape {
            memory_mib: config.memory_mib,
            vcpus: config.vcpus,
            dirty_log: config.dirty_log,
        }
    }
}

/// What a shell built out to a shape holds beyond the bare VM. Field order is drop order: the
/// vCPUs close before the VM, whose handle destroys it off the dropping thread.
#[derive(Debug)]
pub(crate) struct BuiltOut {
    pub(crate) shape: VmShape,
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) memory: PartitionMemory,
    pub(crate) vm: VmHandle,
}

/// A VM created ahead of its partition (see the module notes); a [`PartitionBuilder`] given it
/// with [`shell`] builds into it instead of creating a VM of its own.
///
/// A shell belongs to the process that created it (KVM binds a VM to the address space it was
/// created in) and serves one partition. Dropping an unused bare shell destroys its VM, which is
/// cheap: it has no memory slots, irqchip or PIT yet; a built-out one is destroyed off the
/// dropping thread, as a partition is.
///
/// ```
/// use std::sync::Arc;
/// use partition::{KernelImage, Partition, PartitionConfig, VmShape, VmShell};
///
/// # if !std::path::Path::new("/dev/kvm").exists() { return Ok(()); }
/// // Ahead of time, before the configuration is known:
/// let shell = VmShell::create()?;
///
/// // Later, when it is: the partition adopts the VM instead of creating one.
/// let mut config = PartitionConfig::new(KernelImage::Bytes(Arc::from(vmms_guest::ELF)), "");
/// config.memory_mib = 16;
/// let mut vm = Partition::builder(config.clone()).shell(shell).build()?;
/// vm.resume()?;
/// vm.stop();
///
/// // Knowing the shape ahead, everything but the boot source and the devices is done ahead.
/// let built_out = VmShell::create_for(VmShape::of(&config))?;
/// assert_eq!(built_out.shape(), Some(VmShape::of(&config)));
/// let mut vm = Partition::builder(config).shell(built_out).build()?;
/// vm.resume()?;
/// vm.stop();
/// # Ok::<(), partition::Error>(())
/// ```
///
/// [`PartitionBuilder`]: crate::PartitionBuilder
/// [`shell`]: crate::PartitionBuilder::shell
#[derive(Debug)]
pub struct VmShell(Shell);

#[derive(Debug)]
enum Shell {
    Bare(VmFd),
    BuiltOut(Box<BuiltOut>),
}

impl VmShell {
    /// Creates the VM and sets its TSS and identity-map addresses.
    pub fn create() -> Result<Self> {
        Ok(VmShell(Shell::Bare(bare_vm()?)))
    }

    /// Creates the VM and builds it out to `shape` (see the module notes): guest memory mapped
    /// (not touched) and given to KVM, the in-kernel irqchip and PIT, and the vCPUs with their
    /// CPUID, MSRs and local APIC, in the order [`Partition::new`](crate::Partition::new) uses.
    pub fn create_for(shape: VmShape) -> Result<Self> {
        let mut check = PartitionConfig::new(KernelImage::Bytes(Arc::from([])), "");
        check.memory_mib = shape.memory_mib;
        check.vcpus = shape.vcpus;
        check.validate(host::max_vcpus()?)?;
        let ranges = ram_ranges(shape.memory_mib << 20);
        let memory = create_memory(&ranges)?;
        let vm = crate::partition::create_vm(Some(bare_vm()?), &memory, shape.dirty_log)?;
        let vcpus = crate::partition::create_vcpus(&vm, shape.vcpus)?;
        Ok(VmShell(Shell::BuiltOut(Box::new(BuiltOut {
            shape,
            vcpus,
            memory,
            vm,
        }))))
    }

    /// The shape the shell was built out to; `None` for a bare shell.
    pub fn shape(&self) -> Option<VmShape> {
        match &self.0 {
            Shell::Bare(_) => None,
            Shell::BuiltOut(built) => Some(built.shape),
        }
    }

    /// What a partition of `shape` takes from the shell: the bare VM, or everything built out
    /// when the shapes agree (`None` and the shell is dropped when they do not).
    pub(crate) fn take(self, shape: Option<VmShape>) -> Option<Adopted> {
        match self.0 {
            Shell::Bare(vm) => Some(Adopted::Bare(vm)),
            Shell::BuiltOut(built) if Some(built.shape) == shape => Some(Adopted::BuiltOut(built)),
            // Another shape: dropped here, its VM destroyed on a teardown thread.
            Shell::BuiltOut(_) => None,
        }
    }
}

/// What a partition adopts from a shell.
#[derive(Debug)]
pub(crate) enum Adopted {
    /// A VM with its TSS and identity-map addresses set, nothing else.
    Bare(VmFd),
    /// A VM built out to the partition's shape.
    BuiltOut(Box<BuiltOut>),
}

/// `KVM_CREATE_VM`, then the TSS and identity-map addresses.
pub(crate) fn bare_vm() -> Result<VmFd> {
    let vm = host::kvm()?.create_vm().map_err(Error::Kvm)?;
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(Error::Kvm)?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(Error::Kvm)?;
    Ok(vm)
}
