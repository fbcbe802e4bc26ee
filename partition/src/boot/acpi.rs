//! ACPI tables: how a modern guest learns the machine's CPUs, interrupt controllers, power-off and
//! reset registers and legacy-free devices.
//!
//! The tables sit in the e820-reserved BIOS area from [`ACPI_START`]: RSDP (revision 2, XSDT only),
//! XSDT, FACS, DSDT, FADT and MADT. The FADT is a full (not hardware-reduced) one because the
//! power-off register the partition emulates is a PM1a control block (QEMU's PIIX4 port 0x604):
//! Linux writes `SLP_TYP | SLP_EN` there after evaluating `\_S5`. Reset goes through the FADT reset
//! register, the i8042 pulse (0xfe to port 0x64) the partition already turns into a reset.
//!
//! The MADT carries one local APIC per vCPU (APIC ID = vCPU index, which is what KVM gives each
//! vCPU), the in-kernel IOAPIC, and interrupt source overrides for the two ISA IRQs that do not
//! follow the ISA default (edge, active high): IRQ 0, which KVM's PIT drives straight into IOAPIC
//! pin 0 rather than a PC's pin 2, and the SCI (IRQ 9), level-triggered active high.

use acpi_tables::aml;
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress};

use super::MachineDescription;
use crate::error::{Error, Result};
use crate::layout::{
    ACPI_START, APIC_START, COM1_IRQ, COM1_PORT, COM2_IRQ, COM2_PORT, HIMEM_START,
    I8042_COMMAND_PORT, IOAPIC_START, PM1A_CONTROL_PORT, PM1A_EVENT_PORT, SCI_IRQ, UART_PORT_SIZE,
};
use crate::memory::PartitionMemory;

/// OEM ID in every table header.
const OEM_ID: [u8; 6] = *b"VMMS  ";
/// OEM table ID in every table header.
const OEM_TABLE_ID: [u8; 8] = *b"VMMSPART";
const OEM_REVISION: u32 = 1;
/// What the guest writes to the reset register (the i8042 "pulse reset line" command).
const RESET_VALUE: u8 = 0xfe;
/// `\_S5` sleep type; the PM1a control device powers off on any SLP_EN write.
const S5_SLEEP_TYPE: u8 = 5;
/// FADT IA-PC boot architecture flags: legacy devices, an 8042, no VGA.
const IAPC_BOOT_ARCH: u16 = (1 << 0) | (1 << 1) | (1 << 2);
/// MADT flag: the machine also has dual 8259 PICs (KVM's in-kernel irqchip has them).
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT interrupt source override (type 2) and local APIC NMI (type 4) structures.
const MADT_INTERRUPT_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
/// MPS INTI flags: active high + edge, active high + level.
const INTI_EDGE_HIGH: u16 = 0b0101;
const INTI_LEVEL_HIGH: u16 = 0b1101;
/// Size of a table header; the MADT has 8 more bytes (LAPIC address, flags) before its entries.
const HEADER_LEN: u32 = 36;
/// `_HID` of a virtio-mmio transport, the one Linux's virtio_mmio driver matches in ACPI.
const VIRTIO_MMIO_HID: &str = "LNRO0005";

/// Where the tables landed: the RSDP's address goes into the zero page / PVH start info.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AcpiTables {
    /// Guest-physical address of the RSDP.
    pub rsdp: u64,
    /// First byte past the last table.
    pub end: u64,
}

/// Builds every table for `machine` and writes them into `memory` from [`ACPI_START`].
pub(crate) fn write(memory: &PartitionMemory, machine: &MachineDescription) -> Result<AcpiTables> {
    let dsdt = dsdt(machine);
    let madt = madt(machine);
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align(rsdp_addr + Rsdp::len() as u64, 16);
    // Two XSDT entries: FADT and MADT.
    let facs_addr = align(xsdt_addr + u64::from(HEADER_LEN) + 16, 64);
    let dsdt_addr = facs_addr + FACS::len() as u64;
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64, 16);
    let madt_addr = align(fadt_addr + acpi_tables::fadt::FADT::len() as u64, 16);
    let end = madt_addr + madt.len() as u64;
    if end > HIMEM_START {
        return Err(Error::SystemTablesTooLarge {
            size: end - ACPI_START,
            available: HIMEM_START - ACPI_START,
        });
    }
    let fadt = fadt(dsdt_addr, facs_addr);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);

    write_table(memory, rsdp_addr, &rsdp)?;
    write_table(memory, xsdt_addr, &xsdt)?;
    write_table(memory, facs_addr, &FACS::new())?;
    write_table(memory, dsdt_addr, &dsdt)?;
    write_table(memory, fadt_addr, &fadt)?;
    write_table(memory, madt_addr, &madt)?;
    Ok(AcpiTables {
        rsdp: rsdp_addr,
        end,
    })
}

const fn align(addr: u64, to: u64) -> u64 {
    addr.div_ceil(to) * to
}

fn write_table(memory: &PartitionMemory, addr: u64, table: &dyn Aml) -> Result<()> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    memory
        .write_slice(&bytes, GuestAddress(addr))
        .map_err(|e| Error::GuestMemory(e.to_string()))
}

/// The FADT: PM1a event and control blocks in PIIX4's layout, SCI on IRQ 9, no PM timer, no GPEs,
/// no SMI command port (the machine is always in ACPI mode), and the i8042 reset register.
fn fadt(dsdt_addr: u64, facs_addr: u64) -> acpi_tables::fadt::FADT {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .firmware_ctrl_64(facs_addr)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    fadt.sci_int = (SCI_IRQ as u16).into();
    fadt.pm1a_evt_blk = u32::from(PM1A_EVENT_PORT).into();
    fadt.pm1_evt_len = 4;
    fadt.pm1a_cnt_blk = u32::from(PM1A_CONTROL_PORT).into();
    fadt.pm1_cnt_len = 2;
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    fadt.reset_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(I8042_COMMAND_PORT),
    );
    fadt.reset_value = RESET_VALUE;
    fadt.finalize()
}

/// The MADT: one enabled local APIC per vCPU, the IOAPIC, the two interrupt source overrides and
/// LINT1 as NMI on every processor.
fn madt(machine: &MachineDescription) -> Sdt {
    let mut madt = Sdt::new(
        *b"APIC",
        HEADER_LEN + 8,
        5,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    madt.write_u32(36, APIC_START as u32);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    let mut entries = Vec::with_capacity(usize::from(machine.vcpus) * 8 + 64);
    for index in 0..machine.vcpus {
        ProcessorLocalApic::new(index, index, EnabledStatus::Enabled).to_aml_bytes(&mut entries);
    }
    IoApic::new(machine.ioapic_id(), IOAPIC_START as u32, 0).to_aml_bytes(&mut entries);
    interrupt_override(&mut entries, 0, 0, INTI_EDGE_HIGH);
    interrupt_override(&mut entries, SCI_IRQ as u8, SCI_IRQ, INTI_LEVEL_HIGH);
    // Local APIC NMI: all processors (UID 0xff), LINT1, edge / active high.
    entries.extend_from_slice(&[MADT_LOCAL_APIC_NMI, 6, 0xff]);
    entries.extend_from_slice(&INTI_EDGE_HIGH.to_le_bytes());
    entries.push(1);
    madt.append_slice(&entries);
    madt
}

fn interrupt_override(entries: &mut Vec<u8>, isa_irq: u8, gsi: u32, flags: u16) {
    // Bus 0 is ISA.
    entries.extend_from_slice(&[MADT_INTERRUPT_OVERRIDE, 10, 0, isa_irq]);
    entries.extend_from_slice(&gsi.to_le_bytes());
    entries.extend_from_slice(&flags.to_le_bytes());
}

/// AML already serialised, for nesting inside a scope.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// The DSDT: `\_S5` for power-off, and under `\_SB` the two COM ports and every virtio-mmio
/// transport with its window and interrupt.
fn dsdt(machine: &MachineDescription) -> Sdt {
    let mut devices = Vec::new();
    uart(&mut devices, "COM1", 1, COM1_PORT, COM1_IRQ);
    uart(&mut devices, "COM2", 2, COM2_PORT, COM2_IRQ);
    for (index, device) in machine.virtio_mmio.iter().enumerate() {
        virtio_mmio(&mut devices, index, device);
    }
    let mut body = Vec::new();
    aml::Scope::new("\\_SB_".into(), vec![&RawAml(devices)]).to_aml_bytes(&mut body);
    aml::Name::new(
        "\\_S5_".into(),
        &aml::Package::new(vec![&S5_SLEEP_TYPE, &S5_SLEEP_TYPE, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut body);
    let mut dsdt = Sdt::new(*b"DSDT", HEADER_LEN, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&body);
    dsdt
}

/// A 16550 (`PNP0501`) at `port` raising ISA IRQ `irq`.
fn uart(out: &mut Vec<u8>, name: &str, uid: u8, port: u16, irq: u32) {
    let io = aml::IO::new(port, port, 1, UART_PORT_SIZE as u8);
    let interrupt = aml::Interrupt::new(true, true, false, false, irq);
    let resources = aml::ResourceTemplate::new(vec![&io, &interrupt]);
    aml::Device::new(
        name.into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &uid),
            &aml::Name::new("_CRS".into(), &resources),
        ],
    )
    .to_aml_bytes(out);
}

/// A virtio-mmio transport (`LNRO0005`), named `VRnn` like QEMU's. Its interrupt is edge-triggered
/// (the transport signals through an irqfd pulse), as on the `virtio_mmio.device=` command line.
fn virtio_mmio(out: &mut Vec<u8>, index: usize, device: &super::VirtioMmioDevice) {
    let name = format!("VR{:02X}", index & 0xff);
    let window = aml::Memory32Fixed::new(true, device.base as u32, device.len as u32);
    let interrupt = aml::Interrupt::new(true, true, false, false, device.gsi);
    let resources = aml::ResourceTemplate::new(vec![&window, &interrupt]);
    aml::Device::new(
        name.as_str().into(),
        vec![
            &aml::Name::new("_HID".into(), &VIRTIO_MMIO_HID),
            &aml::Name::new("_UID".into(), &(index as u64)),
            &aml::Name::new("_CRS".into(), &resources),
        ],
    )
    .to_aml_bytes(out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::VirtioMmioDevice;
    use crate::boot::params::{E820_RESERVED, memory_map};
    use crate::memory::{create_memory, ram_ranges};

    fn machine(vcpus: u8, disks: u32) -> MachineDescription {
        MachineDescription {
            vcpus,
            virtio_mmio: (0..disks)
                .map(|n| VirtioMmioDevice {
                    base: 0xd000_0000 + u64::from(n) * 0x1000,
                    len: 0x1000,
                    gsi: 5 + n,
                })
                .collect(),
        }
    }

    fn read(mem: &PartitionMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
        bytes
    }

    fn u32_at(bytes: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
    }

    fn sums_to_zero(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)) == 0
    }

    /// A whole table (its header says how long), checked for its checksum.
    fn table(mem: &PartitionMemory, addr: u64) -> Vec<u8> {
        let len = u32_at(&read(mem, addr, 36), 4) as usize;
        let bytes = read(mem, addr, len);
        assert!(
            sums_to_zero(&bytes),
            "{} checksum",
            String::from_utf8_lossy(&bytes[0..4])
        );
        bytes
    }

    /// Walks RSDP -> XSDT and returns every table it lists with its address.
    fn walk(mem: &PartitionMemory, rsdp_addr: u64) -> Vec<(u64, Vec<u8>)> {
        let rsdp = read(mem, rsdp_addr, Rsdp::len());
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert!(sums_to_zero(&rsdp[0..20]), "RSDP checksum");
        assert!(sums_to_zero(&rsdp), "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "revision 2: the XSDT is used");
        let xsdt = table(mem, u64_at(&rsdp, 24));
        assert_eq!(&xsdt[0..4], b"XSDT");
        xsdt[36..]
            .chunks(8)
            .map(|entry| {
                let addr = u64_at(entry, 0);
                (addr, table(mem, addr))
            })
            .collect()
    }

    fn find<'a>(tables: &'a [(u64, Vec<u8>)], signature: &[u8]) -> &'a (u64, Vec<u8>) {
        tables
            .iter()
            .find(|(_, t)| &t[0..4] == signature)
            .unwrap_or_else(|| panic!("no {}", String::from_utf8_lossy(signature)))
    }

    /// (type, bytes) of every MADT entry.
    fn madt_entries(madt: &[u8]) -> Vec<(u8, &[u8])> {
        let mut entries = Vec::new();
        let mut at = 44;
        while at < madt.len() {
            let len = usize::from(madt[at + 1]);
            entries.push((madt[at], &madt[at..at + len]));
            at += len;
        }
        entries
    }

    #[test]
    fn rsdp_leads_through_the_xsdt_to_a_madt_with_one_local_apic_per_vcpu() {
        let mem = create_memory(&ram_ranges(64 << 20)).unwrap();

        let written = write(&mem, &machine(4, 2)).unwrap();

        let tables = walk(&mem, written.rsdp);
        let (_, madt) = find(&tables, b"APIC");
        assert_eq!(u32_at(madt, 36), APIC_START as u32);
        let entries = madt_entries(madt);
        let lapics: Vec<(u8, u8, u32)> = entries
            .iter()
            .filter(|(kind, _)| *kind == 0)
            .map(|(_, e)| (e[2], e[3], u32_at(e, 4)))
            .collect();
        assert_eq!(lapics, vec![(0, 0, 1), (1, 1, 1), (2, 2, 1), (3, 3, 1)]);
        let ioapics: Vec<(u8, u32, u32)> = entries
            .iter()
            .filter(|(kind, _)| *kind == 1)
            .map(|(_, e)| (e[2], u32_at(e, 4), u32_at(e, 8)))
            .collect();
        assert_eq!(ioapics, vec![(4, IOAPIC_START as u32, 0)]);
        let overrides: Vec<(u8, u32)> = entries
            .iter()
            .filter(|(kind, _)| *kind == MADT_INTERRUPT_OVERRIDE)
            .map(|(_, e)| (e[3], u32_at(e, 4)))
            .collect();
        assert_eq!(overrides, vec![(0, 0), (9, 9)]);
    }

    #[test]
    fn fadt_names_the_emulated_power_off_and_reset_registers_and_the_dsdt() {
        let mem = create_memory(&ram_ranges(64 << 20)).unwrap();

        let written = write(&mem, &machine(1, 0)).unwrap();

        let tables = walk(&mem, written.rsdp);
        let (_, fadt) = find(&tables, b"FACP");
        assert_eq!(u32_at(fadt, 64), u32::from(PM1A_CONTROL_PORT));
        assert_eq!(fadt[89], 2, "PM1 control block length");
        assert_eq!(u32_at(fadt, 56), u32::from(PM1A_EVENT_PORT));
        assert_eq!(u32_at(fadt, 112) & (1 << 10), 1 << 10, "RESET_REG_SUP");
        assert_eq!(
            (fadt[116], u64_at(fadt, 120), fadt[128]),
            (1, u64::from(I8042_COMMAND_PORT), RESET_VALUE)
        );
        let dsdt = table(&mem, u64_at(fadt, 140));
        assert_eq!(&dsdt[0..4], b"DSDT");
        let facs = read(&mem, u64_at(fadt, 132), 64);
        assert_eq!(&facs[0..4], b"FACS");
        assert_eq!(u64_at(fadt, 132) % 64, 0, "FACS alignment");
    }

    #[test]
    fn every_table_lies_in_memory_the_e820_map_reserves() {
        let mem = create_memory(&ram_ranges(64 << 20)).unwrap();

        let written = write(&mem, &machine(8, 4)).unwrap();

        let reserved: Vec<(u64, u64)> = memory_map(&mem)
            .into_iter()
            .filter(|(_, _, kind)| *kind == E820_RESERVED)
            .map(|(start, len, _)| (start, start + len))
            .collect();
        let inside = |start: u64, end: u64| reserved.iter().any(|&(s, e)| s <= start && end <= e);
        assert!(inside(written.rsdp, written.end));
        for (addr, bytes) in walk(&mem, written.rsdp) {
            assert!(inside(addr, addr + bytes.len() as u64));
        }
    }

    #[test]
    fn largest_machine_fits_the_table_area() {
        let mem = create_memory(&ram_ranges(64 << 20)).unwrap();

        let written = write(&mem, &machine(u8::MAX, 19)).unwrap();

        assert!(written.end <= HIMEM_START);
    }

    #[test]
    fn iasl_disassembles_the_dsdt_without_errors() {
        if std::process::Command::new("iasl")
            .arg("-v")
            .output()
            .is_err()
        {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must install acpica-tools (scripts/test.sh)"
            );
            eprintln!("skipped: no iasl (Debian acpica-tools)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let aml = dir.path().join("dsdt.aml");
        let mut bytes = Vec::new();
        dsdt(&machine(2, 3)).to_aml_bytes(&mut bytes);
        std::fs::write(&aml, &bytes).unwrap();

        let out = std::process::Command::new("iasl")
            .arg("-d")
            .arg(&aml)
            .current_dir(dir.path())
            .output()
            .unwrap();

        let log = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{log}");
        assert!(!log.contains("Error"), "{log}");
        let dsl = std::fs::read_to_string(dir.path().join("dsdt.dsl")).unwrap();
        for name in ["COM1", "COM2", "VR00", "VR02", "LNRO0005", "_S5_"] {
            assert!(dsl.contains(name), "{name} missing from:\n{dsl}");
        }
        assert!(dsl.contains("0xD0002000"), "{dsl}");
    }
}
