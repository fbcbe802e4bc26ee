//! The boot state of a vCPU: segments, control registers, page tables, FPU, MSRs and local APIC.

use kvm_bindings::{Msrs, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::EntryPoint;
use crate::error::{Error, Result};
use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    PVH_INFO_START, ZERO_PAGE_START,
};
use crate::memory::PartitionMemory;

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// A GDT descriptor from its flags (access byte and the high nibble of the flags), base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The KVM segment register matching GDT entry `entry` at `index`.
fn segment(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let mut limit = ((entry >> 32) & 0x000f_0000) | (entry & 0xffff);
    let granularity = ((entry >> 55) & 1) as u8;
    if granularity == 1 {
        limit = (limit << 12) | 0xfff;
    }
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit: limit as u32,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granularity,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

fn write_u64s(memory: &PartitionMemory, addr: u64, values: &[u64]) -> Result<()> {
    for (i, v) in values.iter().enumerate() {
        memory
            .write_obj(*v, GuestAddress(addr + 8 * i as u64))
            .map_err(|e| Error::GuestMemory(e.to_string()))?;
    }
    Ok(())
}

/// Identity-maps the first 1 GiB with 2 MiB pages: enough for any kernel's early boot code.
fn write_page_tables(memory: &PartitionMemory) -> Result<()> {
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    write_u64s(memory, PML4_START, &[PDPTE_START | PRESENT_RW])?;
    write_u64s(memory, PDPTE_START, &[PDE_START | PRESENT_RW])?;
    let pd: Vec<u64> = (0..512u64).map(|i| (i << 21) | PRESENT_RW | HUGE).collect();
    write_u64s(memory, PDE_START, &pd)
}

/// Puts the boot vCPU at `entry` with the registers and memory structures its protocol defines.
pub(crate) fn configure_boot_vcpu(
    vcpu: &VcpuFd,
    memory: &PartitionMemory,
    entry: EntryPoint,
) -> Result<()> {
    let mut sregs = vcpu.get_sregs().map_err(Error::Kvm)?;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    let gdt: [u64; 4] = match entry {
        EntryPoint::Linux64 { rip } => {
            regs.rip = rip;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
            [
                0,
                gdt_entry(0xa09b, 0, 0xfffff),
                gdt_entry(0xc093, 0, 0xfffff),
                gdt_entry(0x808b, 0, 0xfffff),
            ]
        }
        EntryPoint::Pvh { rip } => {
            regs.rip = rip;
            regs.rbx = PVH_INFO_START;
            [
                0,
                gdt_entry(0xc09b, 0, 0xfffff),
                gdt_entry(0xc093, 0, 0xfffff),
                gdt_entry(0x008b, 0, 0x67),
            ]
        }
    };
    write_u64s(memory, BOOT_GDT_START, &gdt)?;
    write_u64s(memory, BOOT_IDT_START, &[0])?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    let code = segment(gdt[1], 1);
    let data = segment(gdt[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[3], 3);
    match entry {
        EntryPoint::Linux64 { .. } => {
            write_page_tables(memory)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 = CR4_PAE;
            sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        EntryPoint::Pvh { .. } => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    vcpu.set_sregs(&sregs).map_err(Error::Kvm)?;
    vcpu.set_regs(&regs).map_err(Error::Kvm)?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(Error::Kvm)
}

/// The MSRs a kernel expects zeroed or set at reset, as Firecracker and Cloud Hypervisor set them.
pub(crate) fn configure_msrs(vcpu: &VcpuFd) -> Result<()> {
    const IA32_SYSENTER_CS: u32 = 0x174;
    const IA32_SYSENTER_ESP: u32 = 0x175;
    const IA32_SYSENTER_EIP: u32 = 0x176;
    const STAR: u32 = 0xc000_0081;
    const LSTAR: u32 = 0xc000_0082;
    const CSTAR: u32 = 0xc000_0083;
    const SYSCALL_MASK: u32 = 0xc000_0084;
    const KERNEL_GS_BASE: u32 = 0xc000_0102;
    const IA32_TSC: u32 = 0x10;
    const IA32_MISC_ENABLE: u32 = 0x1a0;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    const MTRR_DEF_TYPE: u32 = 0x2ff;
    const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;
    let entries = [
        (IA32_SYSENTER_CS, 0),
        (IA32_SYSENTER_ESP, 0),
        (IA32_SYSENTER_EIP, 0),
        (STAR, 0),
        (CSTAR, 0),
        (KERNEL_GS_BASE, 0),
        (SYSCALL_MASK, 0),
        (LSTAR, 0),
        (IA32_TSC, 0),
        (IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ];
    let list: Vec<_> = entries
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&list).map_err(|_| Error::MsrsTooMany)?;
    let set = vcpu.set_msrs(&msrs).map_err(Error::Kvm)?;
    if set != list.len() {
        return Err(Error::MsrRejected {
            index: list[set].index,
        });
    }
    Ok(())
}

/// Routes the legacy PIC through LINT0 (ExtINT) and NMIs through LINT1, as a BIOS leaves them.
pub(crate) fn configure_lapic(vcpu: &VcpuFd) -> Result<()> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_EXTINT: u32 = 0x7;
    const APIC_MODE_NMI: u32 = 0x4;
    let mut lapic = vcpu.get_lapic().map_err(Error::Kvm)?;
    let mut set_mode = |offset: usize, mode: u32| {
        let mut reg = [0u8; 4];
        for (b, r) in reg.iter_mut().zip(&lapic.regs[offset..offset + 4]) {
            *b = *r as u8;
        }
        let value = (u32::from_le_bytes(reg) & !0x700) | (mode << 8);
        for (r, b) in lapic.regs[offset..offset + 4]
            .iter_mut()
            .zip(value.to_le_bytes())
        {
            *r = b as _;
        }
    };
    set_mode(APIC_LVT0, APIC_MODE_EXTINT);
    set_mode(APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(Error::Kvm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_code_descriptor_decodes_as_64_bit_ring0_code() {
        let seg = segment(gdt_entry(0xa09b, 0, 0xfffff), 1);

        assert_eq!(
            (seg.selector, seg.l, seg.db, seg.dpl, seg.type_, seg.present),
            (8, 1, 0, 0, 0xb, 1)
        );
        assert_eq!(seg.limit, 0xffff_ffff);
    }

    #[test]
    fn pvh_tss_descriptor_keeps_its_byte_limit() {
        let seg = segment(gdt_entry(0x008b, 0, 0x67), 3);

        assert_eq!((seg.limit, seg.g, seg.type_), (0x67, 0, 0xb));
    }
}
