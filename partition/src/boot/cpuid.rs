//! The CPUID a vCPU reports: what KVM supports, with this vCPU's APIC ID and topology filled in.

use kvm_bindings::CpuId;

use crate::error::Result;
use crate::host;

/// KVM's supported CPUID (asked once per process) with per-vCPU fields set for vCPU `index` of
/// `count`.
pub(crate) fn vcpu_cpuid(index: u8, count: u8) -> Result<CpuId> {
    let mut cpuid = host::supported_cpuid()?.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                // EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
                entry.ebx =
                    (entry.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (u32::from(count) << 16);
                // HTT: the count above is meaningful.
                entry.edx |= 1 << 28;
            }
            0xb | 0x1f => {
                // x2APIC ID of this vCPU in every sub-leaf.
                entry.edx = u32::from(index);
            }
            _ => {}
        }
    }
    crate::software_kvm::adjust_cpuid(&mut cpuid);
    Ok(cpuid)
}
