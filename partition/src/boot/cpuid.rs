//! The CPUID a vCPU reports: what KVM supports, with this vCPU's APIC ID and topology filled in.

use kvm_bindings::CpuId;

use crate::error::Result;
use crate::host;
use crate::software_kvm;

/// KVM's paravirtual feature leaf.
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// The paravirtual features a guest uses through hypercalls (`vmcall`): kick a halted vCPU, send
/// IPIs, yield to a preempted vCPU. A software KVM (kvm_pvm) leaves a guest's `vmcall` hanging: a
/// Linux application processor sending its first PV IPI never returns, so there they are hidden
/// and the guest uses the local APIC and plain spinning instead.
const KVM_FEATURE_PV_UNHALT: u32 = 1 << 7;
const KVM_FEATURE_PV_SEND_IPI: u32 = 1 << 11;
const KVM_FEATURE_PV_SCHED_YIELD: u32 = 1 << 13;

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
            KVM_CPUID_FEATURES if software_kvm::is_software_kvm() => {
                entry.eax &=
                    !(KVM_FEATURE_PV_UNHALT | KVM_FEATURE_PV_SEND_IPI | KVM_FEATURE_PV_SCHED_YIELD);
            }
            _ => {}
        }
    }
    crate::software_kvm::adjust_cpuid(&mut cpuid);
    Ok(cpuid)
}
