//! The vmms test guest: the default guest of every vmms VM and the workhorse of its tests.
//!
//! On the machines vmms is built on, KVM is software (`kvm_pvm`): guest code at CPL0 is emulated at
//! about a microsecond per instruction, so a stock Linux kernel needs tens of minutes to boot and no
//! Linux userspace runs. The test guest is a freestanding `no_std` program (guest/firmware) that
//! boots through the same 64-bit Linux boot protocol a vmlinux uses, spends about a dozen
//! instructions at CPL0, and runs its main loop at CPL3 with IOPL=3, natively, polling its devices.
//! It gives tests something real to drive: a console shell on COM1, a counter in guest memory
//! ([`protocol::StatusBlock`]), a virtio-blk workload writing sequence-numbered, checksummed records
//! ([`verify_records`] checks a disk image), a memory dirtier and PIO/MMIO benchmark loops.
//!
//! [`ELF`] is the image, built by this crate's build script; [`protocol`] holds everything the host
//! and the guest agree on (addresses, console replies, record format), compiled from the very file
//! the guest is built from.
//!
//! ```
//! use vmms_guest::{ELF, protocol};
//!
//! // Boot `ELF` with `console=ttyS0 virtio_mmio.device=4K@0xd0000000:5`, wait for
//! // `protocol::BANNER` on COM1, type `write 3\r`, expect `wrote 3 records, total 3`.
//! assert_eq!(&ELF[..4], b"\x7fELF");
//! assert_eq!(protocol::STATUS_GPA, 0x10_0000);
//! ```

use std::io::{self, Read};

pub mod fixture;
#[path = "../firmware/src/protocol.rs"]
pub mod protocol;

use protocol::{RECORD_SIZE, RecordError, verify_record};

// The guest's pure parts, compiled here for their unit tests (the firmware has no test harness).
#[cfg(test)]
#[allow(
    dead_code,
    reason = "only the parts the tests exercise are used on the host"
)]
#[path = "../firmware/src/agent.rs"]
mod agent;
#[cfg(test)]
#[allow(
    dead_code,
    reason = "only the parts the tests exercise are used on the host"
)]
#[path = "../firmware/src/bootparams.rs"]
mod bootparams;
#[cfg(test)]
#[allow(
    dead_code,
    reason = "only the parts the tests exercise are used on the host"
)]
#[path = "../firmware/src/cmdline.rs"]
mod cmdline;
#[cfg(test)]
#[allow(
    dead_code,
    reason = "only the parts the tests exercise are used on the host"
)]
#[path = "../firmware/src/command.rs"]
mod command;

/// The test guest's image: a static x86-64 ELF loaded at [`protocol::STATUS_GPA`] (1 MiB), entered
/// through the Linux 64-bit boot protocol (RSI = `boot_params`). It carries no PVH note.
pub static ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/vmms-test-guest.elf"));

impl std::error::Error for RecordError {}

/// Why a disk image does not hold the records expected.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The image ended before record `seq`.
    #[error("image ends before record {seq}")]
    Truncated {
        /// The first missing record.
        seq: u64,
    },
    /// Reading record `seq` failed.
    #[error("cannot read record {seq}")]
    Io {
        /// The record being read.
        seq: u64,
        /// The read error.
        #[source]
        source: io::Error,
    },
    /// Record `seq` is not intact.
    #[error("record {seq} is invalid")]
    Record {
        /// The first invalid record.
        seq: u64,
        /// What is wrong with it.
        #[source]
        error: RecordError,
    },
}

/// Checks that `reader` (a disk image from its start) holds records `0..count`, each intact, as
/// `write` in the test guest leaves them. Blocks after `count` are not read.
pub fn verify_records(mut reader: impl Read, count: u64) -> Result<(), VerifyError> {
    let mut block = [0u8; RECORD_SIZE];
    for seq in 0..count {
        match read_block(&mut reader, &mut block) {
            Ok(true) => {
                verify_record(seq, &block).map_err(|error| VerifyError::Record { seq, error })?
            }
            Ok(false) => return Err(VerifyError::Truncated { seq }),
            Err(source) => return Err(VerifyError::Io { seq, source }),
        }
    }
    Ok(())
}

/// Counts the valid records at the start of `reader` the way the guest does on boot: up to the first
/// block that is not the right record, or the end of the image.
pub fn count_records(mut reader: impl Read) -> io::Result<u64> {
    let mut block = [0u8; RECORD_SIZE];
    let mut seq = 0;
    while read_block(&mut reader, &mut block)? && verify_record(seq, &block).is_ok() {
        seq += 1;
    }
    Ok(seq)
}

/// Reads the next block; `false` if the image ends first (a partial last block counts as missing).
fn read_block(reader: &mut impl Read, block: &mut [u8; RECORD_SIZE]) -> io::Result<bool> {
    match reader.read_exact(block) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{RECORD_CHECKSUM_OFFSET, StatusBlock, encode_record};

    fn image_of(records: u64) -> Vec<u8> {
        let mut image = vec![0u8; records as usize * RECORD_SIZE];
        for (seq, chunk) in (0..).zip(image.chunks_exact_mut(RECORD_SIZE)) {
            encode_record(seq, chunk.try_into().expect("chunks are RECORD_SIZE long"));
        }
        image
    }

    fn u16_at(bytes: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(bytes[at..at + 2].try_into().expect("two bytes"))
    }

    fn u32_at(bytes: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(bytes[at..at + 4].try_into().expect("four bytes"))
    }

    fn u64_at(bytes: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(bytes[at..at + 8].try_into().expect("eight bytes"))
    }

    /// Program headers of [`ELF`]: (type, vaddr, paddr, memsz).
    fn program_headers() -> Vec<(u32, u64, u64, u64)> {
        let (phoff, phentsize, phnum) = (
            u64_at(ELF, 0x20) as usize,
            u16_at(ELF, 0x36),
            u16_at(ELF, 0x38),
        );
        (0..usize::from(phnum))
            .map(|i| phoff + i * usize::from(phentsize))
            .map(|at| {
                (
                    u32_at(ELF, at),
                    u64_at(ELF, at + 0x10),
                    u64_at(ELF, at + 0x18),
                    u64_at(ELF, at + 0x28),
                )
            })
            .collect()
    }

    const PT_LOAD: u32 = 1;
    const PT_NOTE: u32 = 4;

    #[test]
    fn encoded_record_verifies() {
        let mut block = [0u8; RECORD_SIZE];
        encode_record(7, &mut block);

        assert_eq!(verify_record(7, &block), Ok(()));
    }

    #[test]
    fn flipped_payload_byte_is_a_bad_checksum() {
        let mut block = [0u8; RECORD_SIZE];
        encode_record(7, &mut block);
        block[100] ^= 0x01;

        assert_eq!(verify_record(7, &block), Err(RecordError::BadChecksum));
    }

    #[test]
    fn record_at_the_wrong_position_is_a_wrong_sequence() {
        let mut block = [0u8; RECORD_SIZE];
        encode_record(3, &mut block);

        assert_eq!(
            verify_record(4, &block),
            Err(RecordError::WrongSequence { found: 3 })
        );
    }

    #[test]
    fn payload_rewritten_with_matching_checksum_is_a_bad_payload() {
        let mut block = [0u8; RECORD_SIZE];
        encode_record(5, &mut block);
        block[16] ^= 0xff;
        let sum = protocol::fnv1a64(&block[..RECORD_CHECKSUM_OFFSET]);
        block[RECORD_CHECKSUM_OFFSET..].copy_from_slice(&sum.to_le_bytes());

        assert_eq!(verify_record(5, &block), Err(RecordError::BadPayload));
    }

    #[test]
    fn verify_records_accepts_an_image_of_records() {
        let image = image_of(20);

        assert!(verify_records(image.as_slice(), 20).is_ok());
    }

    #[test]
    fn verify_records_names_the_corrupted_record() {
        let mut image = image_of(20);
        image[13 * RECORD_SIZE + 500] ^= 0x40;

        let error = verify_records(image.as_slice(), 20).expect_err("record 13 is corrupted");

        assert!(matches!(
            error,
            VerifyError::Record {
                seq: 13,
                error: RecordError::BadChecksum
            }
        ));
    }

    #[test]
    fn verify_records_reports_a_short_image_as_truncated() {
        let image = image_of(4);

        let error = verify_records(image.as_slice(), 5).expect_err("the image holds 4 records");

        assert!(matches!(error, VerifyError::Truncated { seq: 4 }));
    }

    #[test]
    fn count_records_stops_at_the_first_unwritten_block() {
        let mut image = image_of(6);
        image.extend_from_slice(&[0u8; 3 * RECORD_SIZE]);

        assert_eq!(
            count_records(image.as_slice()).expect("reading a slice cannot fail"),
            6
        );
    }

    #[test]
    fn status_block_decodes_from_guest_memory_bytes() {
        let words = [
            protocol::STATUS_MAGIC,
            41,
            3,
            123_456,
            protocol::DIRTY_BASE,
            protocol::STATUS_FROZEN,
        ];
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();

        let block = StatusBlock::from_bytes(&bytes);

        assert_eq!(
            block,
            Some(StatusBlock {
                magic: protocol::STATUS_MAGIC,
                counter: 41,
                records_written: 3,
                ticks: 123_456,
                dirty_base: protocol::DIRTY_BASE,
                flags: protocol::STATUS_FROZEN,
            })
        );
    }

    #[test]
    fn elf_is_a_static_x86_64_executable() {
        const ET_EXEC: u16 = 2;
        const EM_X86_64: u16 = 62;

        assert_eq!(&ELF[..6], b"\x7fELF\x02\x01", "ELF64, little-endian");
        assert_eq!((u16_at(ELF, 0x10), u16_at(ELF, 0x12)), (ET_EXEC, EM_X86_64));
    }

    #[test]
    fn elf_entry_lies_inside_a_loaded_segment() {
        let entry = u64_at(ELF, 0x18);

        let inside = program_headers()
            .into_iter()
            .any(|(kind, vaddr, _, memsz)| {
                kind == PT_LOAD && (vaddr..vaddr + memsz).contains(&entry)
            });

        assert!(inside, "entry {entry:#x} is outside every PT_LOAD segment");
    }

    #[test]
    fn elf_first_segment_is_the_status_page_at_one_mib() {
        let first = program_headers()
            .into_iter()
            .find(|(kind, ..)| *kind == PT_LOAD);

        assert_eq!(
            first,
            Some((PT_LOAD, protocol::STATUS_GPA, protocol::STATUS_GPA, 0x1000))
        );
    }

    #[test]
    fn elf_has_no_note_so_no_pvh_entry() {
        let notes = program_headers()
            .into_iter()
            .filter(|(kind, ..)| *kind == PT_NOTE)
            .count();

        assert_eq!(notes, 0);
    }

    #[test]
    fn elf_loads_below_the_dirty_page_range() {
        let end = program_headers()
            .into_iter()
            .filter(|(kind, ..)| *kind == PT_LOAD)
            .map(|(_, _, paddr, memsz)| paddr + memsz)
            .max();

        assert!(
            end.is_some_and(|end| end <= protocol::DIRTY_BASE),
            "image ends at {end:x?}"
        );
    }
}
