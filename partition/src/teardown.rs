//! Closing a KVM VM without making its owner wait for the kernel.
//!
//! The last close of a VM file descriptor destroys the VM in the closing thread. With the in-kernel
//! PIT that means waiting for SRCU grace periods (`kvm_free_pit` → `kvm_pit_set_reinject` →
//! `kvm_unregister_irq_ack_notifier` → `synchronize_srcu`): 14 ms on the test hosts, asleep rather
//! than busy, and no work of ours. Unmapping a guest's memory after it costs time in proportion to
//! the memory the guest touched. [`VmHandle`] does both on a short-lived thread of its own, so
//! dropping a partition costs its owner one thread spawn, and a process that stops many VMs
//! destroys them side by side instead of one after the other.

use std::ops::Deref;

use kvm_ioctls::VmFd;

use crate::memory::PartitionMemory;

/// Stack of a teardown thread: it only closes a descriptor and drops mappings.
const TEARDOWN_STACK: usize = 64 << 10;

/// A VM file descriptor that keeps the guest memory KVM maps alive until the VM is destroyed, and
/// destroys it off the dropping thread.
///
/// Every vCPU descriptor must be closed before the handle is dropped (each holds a reference on the
/// VM, and the last reference pays the teardown); [`Partition`](crate::Partition) declares its
/// vCPUs before its handle, so they drop first.
#[derive(Debug)]
pub(crate) struct VmHandle {
    /// `None` only inside `drop`.
    fd: Option<VmFd>,
    memory: Option<PartitionMemory>,
}

impl VmHandle {
    /// Takes ownership of `fd`, whose memory slots map `memory`.
    pub(crate) fn new(fd: VmFd, memory: PartitionMemory) -> Self {
        Self {
            fd: Some(fd),
            memory: Some(memory),
        }
    }
}

impl Deref for VmHandle {
    type Target = VmFd;

    fn deref(&self) -> &VmFd {
        self.fd
            .as_ref()
            .expect("the VM descriptor is taken only when the handle is dropped")
    }
}

/// What is left of a VM once its owner let go. Field order is drop order: the VM goes before the
/// memory its slots map.
struct Remains {
    _fd: Option<VmFd>,
    _memory: Option<PartitionMemory>,
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        let remains = Remains {
            _fd: self.fd.take(),
            _memory: self.memory.take(),
        };
        // If no thread can be made, the closure, and with it `remains`, is dropped right here:
        // the owner then waits, which beats leaking the VM.
        let _ = std::thread::Builder::new()
            .name("vm-teardown".into())
            .stack_size(TEARDOWN_STACK)
            .spawn(move || drop(remains));
    }
}
