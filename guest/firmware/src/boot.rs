//! Entry at CPL0 and the drop to CPL3.
//!
//! The VMM enters `boot_entry` the way the Linux 64-bit boot protocol enters a kernel: long mode on
//! its own identity map, interrupts off, RSI = guest-physical address of `boot_params`. On a
//! software KVM every CPL0 instruction is emulated (~1 µs each) while CPL3 code runs natively, so
//! the guest does only what needs CPL0 and leaves: eleven instructions load CR0 (SSE on), CR4,
//! CR3, GDT, IDT and TSS, and the twelfth, `iretq`, enters `user_start` at CPL3. Everything they
//! load — page tables, descriptor tables, the TSS and the IRET frame — is complete in the image:
//! the assembler and `link.ld` compute it. Measured on kvm_pvm: about 60 µs from the first guest
//! instruction to the first at CPL3.
//!
//! Port I/O stays allowed at CPL3 in two ways: RFLAGS.IOPL = 3 in the IRET frame (enough on VT-x
//! and SVM) and an all-zero I/O permission bitmap in the TSS. The bitmap is what works on kvm_pvm,
//! which drops IOPL on the way to CPL3 (a CPL3 `out` without it raises #GP(0) there).
//!
//! From then on the guest takes no interrupts (IF=0 for good) and no system calls; a CPU exception
//! enters the IDT stubs at CPL0 on the kernel stack (TSS.RSP0) and ends in [`exception_entry`],
//! which reports it on COM1 and powers off instead of letting the VM triple-fault.

use core::arch::{asm, global_asm};
use core::fmt::Write;

use crate::io;
use crate::serial::Serial;

/// CR0: PG | WP | NE | ET | MP | PE, with EM and TS clear so SSE instructions run.
const CR0: u32 = (1 << 31) | (1 << 16) | (1 << 5) | (1 << 4) | (1 << 1) | 1;
/// CR4: PAE (required in long mode) | OSFXSR | OSXMMEXCPT (SSE on). TSD stays clear: CPL3 may `rdtsc`.
const CR4: u32 = (1 << 5) | (1 << 9) | (1 << 10);

/// GDT selectors. The order (kernel code, kernel data, user data, user code) is the one SYSRET
/// would expect, although the guest never uses SYSCALL.
const KERNEL_CS: u16 = 0x08;
const USER_DS: u16 = 0x18 | 3;
const USER_CS: u16 = 0x20 | 3;
const TSS_SELECTOR: u16 = 0x28;
/// RFLAGS at CPL3: IOPL=3, IF=0, reserved bit 1.
const USER_RFLAGS: u64 = 0x3002;
/// Vectors for which the CPU pushes an error code.
const ERROR_CODE_VECTORS: u32 = (1 << 8)
    | (1 << 10)
    | (1 << 11)
    | (1 << 12)
    | (1 << 13)
    | (1 << 14)
    | (1 << 17)
    | (1 << 21)
    | (1 << 29)
    | (1 << 30);
/// Stack sizes: the kernel stack serves exception reports only.
const KERNEL_STACK_SIZE: usize = 16 * 1024;
const USER_STACK_SIZE: usize = 64 * 1024;

global_asm!(
    r#"
    .section .text.boot, "ax"
    .global boot_entry
boot_entry:
    mov eax, {cr0}
    mov cr0, rax
    mov eax, {cr4}
    mov cr4, rax
    mov eax, offset boot_pml4
    mov cr3, rax
    lgdt [rip + boot_gdtr]
    lidt [rip + boot_idtr]
    mov eax, {tss_selector}
    ltr ax
    mov esp, offset boot_iret_frame
    iretq

    // CPL3 from here on, native speed. The loader copies file contents only: zero .bss here.
user_start:
    mov rdi, offset __bss_start
    mov rcx, offset __bss_end
    sub rcx, rdi
    xor eax, eax
    rep stosb
    mov rdi, rsi
    call {guest_main}
    ud2

    // Exception stubs: stub n sits at exception_stubs + 16 * n (the IDT below relies on it) and
    // pushes a zero error code where the CPU pushes none, then the vector.
    .section .text.exception_stubs, "ax"
    .balign 512
    .global exception_stubs
exception_stubs:
    .set vector, 0
    .rept 32
    .balign 16
    .if ((({error_code_vectors}) >> vector) & 1) == 0
    push 0
    .endif
    push vector
    jmp exception_common
    .set vector, vector + 1
    .endr
exception_common:
    mov rdi, rsp
    and rsp, -16
    call {exception_entry}
    ud2

    // Identity map of 0..4 GiB in 2 MiB pages, present + writable + user at every level so CPL3
    // reaches RAM and the MMIO windows alike. The top GiB (the MMIO gap) is uncached (PCD | PWT).
    .section .data.page_tables, "aw"
    .balign 4096
boot_pml4:
    .quad boot_pdpt + 0x7
    .fill 511, 8, 0
boot_pdpt:
    .quad boot_pd + 0x7
    .quad boot_pd + 0x1000 + 0x7
    .quad boot_pd + 0x2000 + 0x7
    .quad boot_pd + 0x3000 + 0x7
    .fill 508, 8, 0
boot_pd:
    .set page, 0
    .rept 1536
    .quad (page << 21) | 0x87
    .set page, page + 1
    .endr
    .rept 512
    .quad (page << 21) | 0x9f
    .set page, page + 1
    .endr

    .section .data.boot, "aw"
    .balign 16
boot_gdt:
    .quad 0                         // null
    .quad 0x00af9a000000ffff        // 0x08 kernel code, 64-bit
    .quad 0x00cf92000000ffff        // 0x10 kernel data
    .quad 0x00cff2000000ffff        // 0x18 user data, DPL 3
    .quad 0x00affa000000ffff        // 0x20 user code, 64-bit, DPL 3
    .quad __boot_tss_desc_lo        // 0x28 TSS (two slots, see link.ld)
    .quad __boot_tss_desc_hi
boot_gdt_end:

    .balign 8
    .word 0, 0, 0
boot_gdtr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt

    .balign 16
boot_idt:
    .set vector, 0
    .rept 32
    .word __exception_stubs_lo + vector * 16
    .word {kernel_cs}
    .byte 0                         // IST: none
    .byte 0x8e                      // present, DPL 0, 64-bit interrupt gate
    .word __exception_stubs_hi
    .long 0
    .long 0
    .set vector, vector + 1
    .endr
boot_idt_end:

    .balign 8
    .word 0, 0, 0
boot_idtr:
    .word boot_idt_end - boot_idt - 1
    .quad boot_idt

    // 64-bit TSS: only RSP0 matters; I/O map base = limit + 1, so no I/O bitmap (IOPL governs).
    .balign 16
    .global boot_tss
boot_tss:
    .long 0
    .quad boot_kernel_stack_top     // RSP0
    .fill 11, 8, 0                  // RSP1, RSP2, reserved, IST1-7, reserved
    .word 0
    .word 104                       // I/O permission bitmap right after the TSS
boot_io_bitmap:
    .fill 8192, 1, 0                // every port allowed
    .byte 0xff                      // the terminating byte the CPU requires
    .global boot_tss_end
boot_tss_end:
    // The kernel stack, with the IRET frame that enters CPL3 on top: it is dead once used, and
    // a fault inside `iretq` itself still lands on this stack.
    .balign 16
boot_kernel_stack:
    .fill {kernel_stack_size} - 40, 1, 0
boot_iret_frame:
    .quad user_start
    .quad {user_cs}
    .quad {user_rflags}
    .quad boot_user_stack_top
    .quad {user_ds}
boot_kernel_stack_top:

    .section .stack, "aw", @nobits
    .balign 16
    .fill {user_stack_size}, 1, 0
boot_user_stack_top:
"#,
    cr0 = const CR0,
    cr4 = const CR4,
    tss_selector = const TSS_SELECTOR,
    kernel_cs = const KERNEL_CS,
    user_cs = const USER_CS,
    user_ds = const USER_DS,
    user_rflags = const USER_RFLAGS,
    error_code_vectors = const ERROR_CODE_VECTORS,
    kernel_stack_size = const KERNEL_STACK_SIZE,
    user_stack_size = const USER_STACK_SIZE,
    guest_main = sym crate::guest_main,
    exception_entry = sym exception_entry,
);

/// What the exception stubs leave on the kernel stack: their two pushes, then the CPU's frame.
#[repr(C)]
#[derive(Debug)]
struct ExceptionFrame {
    vector: u64,
    error_code: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

/// Vector of the page fault, whose faulting address is in CR2.
const PAGE_FAULT: u64 = 14;

/// Reports a CPU exception on COM1 and powers off. Runs at CPL0 (emulated, slow, but only once).
extern "sysv64" fn exception_entry(frame: &ExceptionFrame) -> ! {
    let mut serial = Serial::attach_com1();
    let _ = write!(
        serial,
        "\r\n{}{} error={:#x} rip={:#x}",
        crate::protocol::EXCEPTION_PREFIX,
        frame.vector,
        frame.error_code,
        frame.rip
    );
    if frame.vector == PAGE_FAULT {
        let _ = write!(serial, " cr2={:#x}", read_cr2());
    }
    let _ = serial.write_str(crate::protocol::LINE_END);
    io::request_power_off();
    loop {
        // SAFETY: this handler runs at CPL0, where `hlt` is allowed; with IF=0 it stops the vCPU
        // for good if the VMM ignored the power-off request.
        unsafe { asm!("hlt", options(nomem, nostack)) }
    }
}

fn read_cr2() -> u64 {
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects; this runs at CPL0 (exception handlers only).
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) }
    cr2
}
