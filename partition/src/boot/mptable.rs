//! The Intel MultiProcessor Specification 1.4 table: the CPU description of guests that have no
//! ACPI (kernels built without it, `acpi=off`, older systems).
//!
//! Linux prefers the ACPI MADT when it has both, so this table is the fallback, as in Firecracker.
//! It lists every vCPU's local APIC, one ISA bus, the IOAPIC, ISA IRQs 0-23 wired straight to the
//! IOAPIC pins of the same number (KVM's default routing), and the local interrupts a BIOS sets up:
//! ExtINT on LINT0 of the boot processor, NMI on LINT1 of every processor.

use vm_memory::{Bytes, GuestAddress};

use super::MachineDescription;
use crate::error::{Error, Result};
use crate::layout::{ACPI_START, APIC_START, IOAPIC_PINS, IOAPIC_START, MPTABLE_START};
use crate::memory::PartitionMemory;

/// Entry types of the configuration table.
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
/// Interrupt types.
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
/// Processor flags.
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// Local APIC and IOAPIC versions KVM reports.
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// CPU signature (family 6) and feature flags (FPU, APIC) of every processor entry.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
/// MP specification revision 1.4.
const MP_SPEC_REVISION: u8 = 4;
const BUS_ISA: u8 = 0;
/// Destination "all local APICs".
const ALL_APICS: u8 = 0xff;
/// Entry sizes: processors take 20 bytes, every other entry 8; the floating pointer 16, the
/// configuration table header 44.
const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_LEN: usize = 20;

/// Bytes the table needs for `vcpus` processors.
pub(crate) fn size(vcpus: u8) -> usize {
    FLOATING_POINTER_LEN
        + HEADER_LEN
        + PROCESSOR_LEN * usize::from(vcpus)
        + 8 * (2 + usize::from(IOAPIC_PINS) + 2)
}

/// Writes the floating pointer at [`MPTABLE_START`] and the configuration table right after it.
pub(crate) fn write(memory: &PartitionMemory, machine: &MachineDescription) -> Result<()> {
    let size = size(machine.vcpus);
    let available = (ACPI_START - MPTABLE_START) as usize;
    if size > available {
        return Err(Error::SystemTablesTooLarge {
            size: size as u64,
            available: available as u64,
        });
    }
    let table = configuration_table(machine);
    let table_addr = MPTABLE_START + FLOATING_POINTER_LEN as u64;
    let mut bytes = floating_pointer(table_addr as u32).to_vec();
    bytes.extend_from_slice(&table);
    memory
        .write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(|e| Error::GuestMemory(e.to_string()))
}

/// Two's complement of the byte sum, so the whole structure sums to zero.
fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_sub(*b))
}

fn floating_pointer(table_addr: u32) -> [u8; FLOATING_POINTER_LEN] {
    let mut mpf = [0u8; FLOATING_POINTER_LEN];
    mpf[0..4].copy_from_slice(b"_MP_");
    mpf[4..8].copy_from_slice(&table_addr.to_le_bytes());
    mpf[8] = 1; // length in 16-byte units
    mpf[9] = MP_SPEC_REVISION;
    // feature1 = 0: a configuration table is present (no default configuration).
    mpf[10] = checksum(&mpf);
    mpf
}

fn configuration_table(machine: &MachineDescription) -> Vec<u8> {
    let ioapic_id = machine.ioapic_id();
    let mut entries = Vec::with_capacity(size(machine.vcpus));
    let mut count: u16 = 0;
    for index in 0..machine.vcpus {
        let flags = CPU_ENABLED | if index == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[MP_PROCESSOR, index, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_BUS, BUS_ISA]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 2;
    for pin in 0..IOAPIC_PINS {
        // irqflag 0: conforming to the bus (ISA: edge, active high).
        entries.extend_from_slice(&[MP_INTSRC, MP_INT, 0, 0, BUS_ISA, pin, ioapic_id, pin]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_LINTSRC, MP_EXTINT, 0, 0, BUS_ISA, 0, 0, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_NMI, 0, 0, BUS_ISA, 0, ALL_APICS, 1]);
    count += 2;

    let mut table = Vec::with_capacity(HEADER_LEN + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((HEADER_LEN + entries.len()) as u16).to_le_bytes());
    table.push(MP_SPEC_REVISION);
    table.push(0); // checksum, below
    table.extend_from_slice(b"VMMS    "); // OEM ID
    table.extend_from_slice(b"PARTITION   "); // product ID
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create_memory, ram_ranges};

    fn machine(vcpus: u8) -> MachineDescription {
        MachineDescription {
            vcpus,
            virtio_mmio: Vec::new(),
        }
    }

    fn read(mem: &PartitionMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
        bytes
    }

    #[test]
    fn floating_pointer_leads_to_a_table_with_one_processor_per_vcpu() {
        let mem = create_memory(&ram_ranges(32 << 20)).unwrap();

        write(&mem, &machine(3)).unwrap();

        let mpf = read(&mem, MPTABLE_START, FLOATING_POINTER_LEN);
        assert_eq!(&mpf[0..4], b"_MP_");
        assert_eq!(mpf.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
        let table_addr = u64::from(u32::from_le_bytes(mpf[4..8].try_into().unwrap()));
        let header = read(&mem, table_addr, HEADER_LEN);
        assert_eq!(&header[0..4], b"PCMP");
        let len = usize::from(u16::from_le_bytes([header[4], header[5]]));
        let table = read(&mem, table_addr, len);
        assert_eq!(table.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
        let mut processors = Vec::new();
        let mut at = HEADER_LEN;
        while at < len {
            if table[at] == MP_PROCESSOR {
                processors.push((table[at + 1], table[at + 3]));
                at += PROCESSOR_LEN;
            } else {
                at += 8;
            }
        }
        assert_eq!(processors, vec![(0, 3), (1, 1), (2, 1)]);
        assert_eq!(
            usize::from(u16::from_le_bytes([header[34], header[35]])),
            3 + 2 + usize::from(IOAPIC_PINS) + 2
        );
    }

    #[test]
    fn largest_table_fits_below_the_acpi_tables() {
        assert!(size(u8::MAX) as u64 <= ACPI_START - MPTABLE_START);
    }
}
