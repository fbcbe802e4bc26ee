//! The machine description a guest finds in memory (ACPI tables, reached from the zero page) on a
//! real partition, and that it still finds after capture and restore.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::tiny_elf;
use partition::layout::ZERO_PAGE_START;
use partition::memory::PartitionMemory;
use partition::{Error, KernelImage, Partition, PartitionConfig};
use vm_memory::{Bytes, GuestAddress};

/// Offset of `acpi_rsdp_addr` in Linux's `struct boot_params`.
const BOOT_PARAMS_ACPI_RSDP_ADDR: u64 = 0x70;

fn read(memory: &PartitionMemory, addr: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    memory.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
    bytes
}

fn sums_to_zero(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)) == 0
}

/// A table whose checksum holds.
fn table(memory: &PartitionMemory, addr: u64) -> Vec<u8> {
    let len = u32::from_le_bytes(read(memory, addr + 4, 4).try_into().unwrap()) as usize;
    let bytes = read(memory, addr, len);
    assert!(sums_to_zero(&bytes));
    bytes
}

/// APIC IDs of the enabled local APICs in the MADT found from the zero page's RSDP pointer.
fn local_apic_ids(memory: &PartitionMemory) -> Vec<u8> {
    let rsdp_addr: u64 = memory
        .read_obj(GuestAddress(ZERO_PAGE_START + BOOT_PARAMS_ACPI_RSDP_ADDR))
        .unwrap();
    let rsdp = read(memory, rsdp_addr, 36);
    assert_eq!(&rsdp[0..8], b"RSD PTR ");
    assert!(sums_to_zero(&rsdp));
    let xsdt = table(memory, u64::from_le_bytes(rsdp[24..32].try_into().unwrap()));
    let madt = xsdt[36..]
        .chunks(8)
        .map(|entry| table(memory, u64::from_le_bytes(entry.try_into().unwrap())))
        .find(|t| &t[0..4] == b"APIC")
        .expect("a MADT");
    let mut ids = Vec::new();
    let mut at = 44;
    while at < madt.len() {
        if madt[at] == 0 && madt[at + 4] & 1 == 1 {
            ids.push(madt[at + 3]);
        }
        at += usize::from(madt[at + 1]);
    }
    ids
}

/// `jmp $` on every vCPU that runs.
fn spinning_guest(vcpus: u8) -> PartitionConfig {
    let mut config =
        PartitionConfig::new(KernelImage::Bytes(Arc::from(tiny_elf(&[0xeb, 0xfe]))), "");
    config.memory_mib = 32;
    config.vcpus = vcpus;
    config
}

#[test]
fn madt_lists_every_vcpu_of_a_built_partition() {
    require_kvm!();

    let vm = Partition::new(spinning_guest(3)).unwrap();

    assert_eq!(local_apic_ids(vm.memory()), vec![0, 1, 2]);
}

#[test]
fn restored_partition_keeps_its_cpu_description_and_refuses_another_shape() {
    require_kvm!();
    let config = spinning_guest(2);
    let mut vm = Partition::new(config.clone()).unwrap();
    vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    vm.pause().unwrap();
    let state = vm.capture_state().unwrap();
    let mut memory_file = tempfile::tempfile().unwrap();
    vm.save_memory(&mut memory_file).unwrap();
    drop(vm);

    let restored = Partition::builder(config).restore(&state, &memory_file);
    let reshaped = Partition::builder(spinning_guest(4)).restore(&state, &memory_file);

    assert_eq!(local_apic_ids(restored.unwrap().memory()), vec![0, 1]);
    assert!(matches!(reshaped, Err(Error::StateMismatch)));
}
