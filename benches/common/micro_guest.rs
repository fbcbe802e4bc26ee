//! The micro PVH guest the start-up benches boot: an ELF64 with a `XEN_ELFNOTE_PHYS32_ENTRY` note
//! and a few bytes of 32-bit code that print [`MARKER`] on COM1, then either reset the machine
//! through the i8042 (a whole VM life) or halt for good (a VM that keeps running).
#![allow(dead_code)]

pub const MARKER: &[u8] = b"OK\n";
const LOAD_ADDRESS: u64 = 0x10_0000;

/// 32-bit protected-mode code (the PVH entry state): print [`MARKER`] on COM1, then pulse the
/// i8042 reset line (`reset`) or halt.
fn micro_code(reset: bool) -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for &byte in MARKER {
        code.extend_from_slice(&[0xb0, byte, 0xee]); // mov al, byte; out dx, al
    }
    if reset {
        code.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64]); // mov al, 0xfe; out 0x64, al
    }
    code.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // hlt; jmp hlt
    code
}

/// An ELF64 with one PT_LOAD of [`micro_code`] at 1 MiB and one PT_NOTE holding the PVH entry.
pub fn micro_pvh_elf(reset: bool) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let note_offset = EHDR + 2 * PHDR;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // namesz
    note.extend_from_slice(&4u32.to_le_bytes()); // descsz
    note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(LOAD_ADDRESS as u32).to_le_bytes());
    let code_offset = note_offset + note.len();
    let code = micro_code(reset);

    let mut elf = vec![0u8; EHDR];
    elf[0..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // ELFCLASS64
    elf[5] = 1; // little-endian
    elf[6] = 1; // EV_CURRENT
    elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[24..32].copy_from_slice(&LOAD_ADDRESS.to_le_bytes());
    elf[32..40].copy_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    elf[52..54].copy_from_slice(&(EHDR as u16).to_le_bytes());
    elf[54..56].copy_from_slice(&(PHDR as u16).to_le_bytes());
    elf[56..58].copy_from_slice(&2u16.to_le_bytes());
    let phdr = |p_type: u32, flags: u32, offset: usize, addr: u64, size: usize| {
        let mut h = Vec::with_capacity(PHDR);
        h.extend_from_slice(&p_type.to_le_bytes());
        h.extend_from_slice(&flags.to_le_bytes());
        h.extend_from_slice(&(offset as u64).to_le_bytes());
        h.extend_from_slice(&addr.to_le_bytes());
        h.extend_from_slice(&addr.to_le_bytes());
        h.extend_from_slice(&(size as u64).to_le_bytes());
        h.extend_from_slice(&(size as u64).to_le_bytes());
        h.extend_from_slice(&4u64.to_le_bytes());
        h
    };
    elf.extend(phdr(1, 5, code_offset, LOAD_ADDRESS, code.len())); // PT_LOAD, R+X
    elf.extend(phdr(4, 4, note_offset, 0, note.len())); // PT_NOTE
    elf.extend(note);
    elf.extend(code);
    elf
}
