//! What this host's KVM offers, asked once per process and shared by every partition in it.
//!
//! Opening `/dev/kvm`, `KVM_GET_SUPPORTED_CPUID` (0.3 ms on the software KVM of the test hosts) and
//! the list of MSRs a vCPU can save give the same answers for as long as the process holds
//! `/dev/kvm` open (the module cannot be replaced under an open descriptor), so a process that
//! starts many partitions asks once.

use std::sync::OnceLock;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::error::{Error, Result};
use crate::state::saveable_msrs;

/// The value in `cell`, computing it with `init` if it is not there yet. An error is returned,
/// not kept, so the next caller tries again; two first callers may both compute it, one value wins.
fn get_or_try_init<T>(
    cell: &'static OnceLock<T>,
    init: impl FnOnce() -> Result<T>,
) -> Result<&'static T> {
    if let Some(value) = cell.get() {
        return Ok(value);
    }
    let value = init()?;
    Ok(cell.get_or_init(|| value))
}

/// Asks KVM everything a partition will need to know (opens `/dev/kvm`, reads the vCPU limit and
/// the supported CPUID) now, so that the first partition of this process does not wait for it: a
/// process that starts a VM later (a worker waiting in a pool) calls this while it has time.
pub fn prepare() -> Result<()> {
    max_vcpus()?;
    supported_cpuid()?;
    crate::software_kvm::is_software_kvm();
    Ok(())
}

/// The process's `/dev/kvm` handle.
pub(crate) fn kvm() -> Result<&'static Kvm> {
    static KVM: OnceLock<Kvm> = OnceLock::new();
    get_or_try_init(&KVM, || Kvm::new().map_err(Error::OpenKvm))
}

/// The most vCPUs one VM may have on this host.
pub(crate) fn max_vcpus() -> Result<usize> {
    static MAX: OnceLock<usize> = OnceLock::new();
    get_or_try_init(&MAX, || Ok(kvm()?.get_max_vcpus())).copied()
}

/// `KVM_GET_SUPPORTED_CPUID`: every leaf KVM can present to a guest, before per-vCPU edits.
pub(crate) fn supported_cpuid() -> Result<&'static CpuId> {
    static CPUID: OnceLock<CpuId> = OnceLock::new();
    get_or_try_init(&CPUID, || {
        kvm()?
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::Kvm)
    })
}

/// The MSRs a vCPU of this process can save, probed on `vcpu` the first time. Every vCPU gets the
/// same CPUID apart from its APIC ID, so the answer holds for all of them.
pub(crate) fn msrs_to_save(vcpu: &VcpuFd) -> Result<&'static [u32]> {
    static MSRS: OnceLock<Vec<u32>> = OnceLock::new();
    get_or_try_init(&MSRS, || saveable_msrs(kvm()?, vcpu)).map(Vec::as_slice)
}
