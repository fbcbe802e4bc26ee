//! What a software KVM needs that hardware KVM does not.
//!
//! Some hosts (for example nested clouds running the `kvm_pvm` module) provide /dev/kvm without VT-x
//! or SVM: guest kernel code is emulated. That emulator cannot execute a few instructions Linux uses
//! early (`int3` in the self-test, `fwait`) and reports them as `KVM_EXIT_INTERNAL_ERROR`; it also
//! mishandles `cmpxchg16b`. Everything here is gated on [`is_software_kvm`], so on hardware KVM the
//! functions do nothing and the exits they handle never reach them.

use std::sync::OnceLock;

use kvm_bindings::CpuId;
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::exit::ExitReason;
use crate::memory::PartitionMemory;

/// Kernel command-line flags a Linux guest needs on a software KVM: the emulator cannot run `xrstor`
/// or `fsgsbase`, and host CPUID bits leak into the guest, so features it cannot emulate are masked
/// by the kernel itself. Empty on hardware KVM.
pub const LINUX_CMDLINE_FLAGS: &str = "noxsave nofsgsbase clearcpuid=popcnt,rdrand,rdseed,smap,smep,\
pcid,invpcid,rdpid,rdtscp,sse4_1,sse4_2,ssse3,pclmulqdq,aes,sha_ni,bmi1,bmi2,adx,movbe,f16c,fma,avx,\
avx2,gfni,vaes,vpclmulqdq,pku,clwb,clflushopt,erms,fsrm,abm";

/// Whether /dev/kvm on this host is a software implementation (kvm_pvm).
pub fn is_software_kvm() -> bool {
    static DETECTED: OnceLock<bool> = OnceLock::new();
    *DETECTED.get_or_init(|| std::path::Path::new("/sys/module/kvm_pvm").exists())
}

/// The command-line flags to add for this host: [`LINUX_CMDLINE_FLAGS`] on software KVM, nothing
/// on hardware KVM.
pub fn linux_cmdline_flags() -> &'static str {
    if is_software_kvm() {
        LINUX_CMDLINE_FLAGS
    } else {
        ""
    }
}

/// Clears CPUID bits the software emulator cannot honour (CX16: `lock cmpxchg16b` fails there).
pub(crate) fn adjust_cpuid(cpuid: &mut CpuId) {
    if !is_software_kvm() {
        return;
    }
    const CPUID_1_ECX_CX16: u32 = 1 << 13;
    for entry in cpuid.as_mut_slice() {
        if entry.function == 1 {
            entry.ecx &= !CPUID_1_ECX_CX16;
        }
    }
}

/// What to do after a `KVM_EXIT_INTERNAL_ERROR`.
pub(crate) enum InternalErrorAction {
    /// The instruction was handled; run on.
    Resume,
    /// Stop the partition with this reason.
    Stop(ExitReason),
}

const OPCODE_FWAIT: u8 = 0x9b;
const OPCODE_INT3: u8 = 0xcc;
const BREAKPOINT_VECTOR: u8 = 3;

/// Steps over `fwait` (a no-op without pending x87 exceptions) and delivers `int3` as the #BP it is;
/// anything else, and everything on hardware KVM, stops the partition with the instruction bytes.
pub(crate) fn handle_internal_error(
    vcpu: &mut VcpuFd,
    memory: &PartitionMemory,
) -> InternalErrorAction {
    // SAFETY: this runs right after KVM_RUN returned KVM_EXIT_INTERNAL_ERROR, so `internal` is the
    // union member KVM filled in.
    let suberror = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
    let Ok(mut regs) = vcpu.get_regs() else {
        return InternalErrorAction::Stop(ExitReason::InternalError {
            suberror,
            rip: 0,
            instruction: Vec::new(),
        });
    };
    let instruction = read_instruction(vcpu, memory, regs.rip);
    let rip = regs.rip;
    let stop = |instruction: Vec<u8>| {
        InternalErrorAction::Stop(ExitReason::InternalError {
            suberror,
            rip,
            instruction,
        })
    };
    if !is_software_kvm() {
        return stop(instruction);
    }
    match instruction.first() {
        Some(&OPCODE_FWAIT) => {
            regs.rip += 1;
            match vcpu.set_regs(&regs) {
                Ok(()) => InternalErrorAction::Resume,
                Err(_) => stop(instruction),
            }
        }
        Some(&OPCODE_INT3) => {
            // A trap: the #BP frame points after the int3, as on hardware.
            regs.rip += 1;
            let injected = vcpu.set_regs(&regs).and_then(|()| {
                let mut events = vcpu.get_vcpu_events()?;
                events.exception.injected = 1;
                events.exception.nr = BREAKPOINT_VECTOR;
                events.exception.has_error_code = 0;
                events.exception.error_code = 0;
                vcpu.set_vcpu_events(&events)
            });
            match injected {
                Ok(()) => InternalErrorAction::Resume,
                Err(_) => stop(instruction),
            }
        }
        _ => stop(instruction),
    }
}

/// Up to 15 instruction bytes at `rip` (translated through the guest's page tables).
fn read_instruction(vcpu: &VcpuFd, memory: &PartitionMemory, rip: u64) -> Vec<u8> {
    let Ok(translation) = vcpu.translate_gva(rip) else {
        return Vec::new();
    };
    if translation.valid == 0 {
        return Vec::new();
    }
    let mut bytes = Vec::with_capacity(15);
    for i in 0..15u64 {
        match memory.read_obj::<u8>(GuestAddress(translation.physical_address + i)) {
            Ok(b) => bytes.push(b),
            Err(_) => break,
        }
    }
    bytes
}
