//! Hand-made guests for host tests and benchmarks that need a few instructions of guest code and
//! nothing else (the partition's boot tests, the exit and create benchmarks).

/// Where [`tiny_elf`] loads its code, and its entry point: 1 MiB, the first byte of RAM above the
/// legacy area.
pub const TINY_ELF_LOAD_ADDR: u64 = 0x10_0000;

/// The smallest ELF64 image linux-loader accepts: one `PT_LOAD` segment holding `code` at
/// [`TINY_ELF_LOAD_ADDR`], entered at its first byte in 64-bit mode.
pub fn tiny_elf(code: &[u8]) -> Vec<u8> {
    const HEADERS: usize = 0x78;
    const PROGRAM_HEADER: usize = 0x40;
    let load = TINY_ELF_LOAD_ADDR.to_le_bytes();
    let size = (code.len() as u64).to_le_bytes();
    let mut elf = vec![0u8; HEADERS];
    elf[0..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // 64-bit
    elf[5] = 1; // little-endian
    elf[6] = 1; // version
    elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // executable
    elf[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[24..32].copy_from_slice(&load); // entry
    elf[32..40].copy_from_slice(&(PROGRAM_HEADER as u64).to_le_bytes());
    elf[52..54].copy_from_slice(&0x40u16.to_le_bytes()); // ELF header size
    elf[54..56].copy_from_slice(&0x38u16.to_le_bytes()); // program header size
    elf[56..58].copy_from_slice(&1u16.to_le_bytes()); // one program header
    let ph = PROGRAM_HEADER;
    elf[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    elf[ph + 8..ph + 16].copy_from_slice(&(HEADERS as u64).to_le_bytes()); // file offset
    elf[ph + 16..ph + 24].copy_from_slice(&load); // virtual address
    elf[ph + 24..ph + 32].copy_from_slice(&load); // physical address
    elf[ph + 32..ph + 40].copy_from_slice(&size); // file size
    elf[ph + 40..ph + 48].copy_from_slice(&size); // memory size
    elf.extend_from_slice(code);
    elf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_follows_the_headers_and_the_segment_says_how_long_it_is() {
        let elf = tiny_elf(&[0xf4]);

        assert_eq!(&elf[0..4], b"\x7fELF");
        assert_eq!(elf.len(), 0x79);
        assert_eq!(elf[0x78], 0xf4);
        assert_eq!(u64::from_le_bytes(elf[0x60..0x68].try_into().unwrap()), 1);
    }
}
