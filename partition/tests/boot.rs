//! Booting small kernels on real KVM: the 64-bit entry path, exit reasons, and bad inputs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Capture, print_and_power_off, tiny_elf};
use partition::{Error, ExitReason, KernelImage, Partition, PartitionConfig};

fn config(code: &[u8]) -> PartitionConfig {
    PartitionConfig::new(KernelImage::Bytes(Arc::from(tiny_elf(code))), "")
}

#[test]
fn elf_guest_prints_on_com1_and_powers_off() {
    require_kvm!();
    let out = Capture::default();
    let mut vm = Partition::new(config(&print_and_power_off(b"hello"))).unwrap();
    vm.com1().set_sink(Box::new(out.clone()));

    vm.resume().unwrap();
    let reason = vm.wait(Some(Duration::from_secs(20)));

    assert_eq!(reason, Some(ExitReason::PowerOff));
    assert_eq!(out.text(), "hello");
}

#[test]
fn i8042_reset_ends_the_run_with_reset() {
    require_kvm!();
    // mov al, 0xfe; out 0x64, al; jmp $
    let mut vm = Partition::new(config(&[0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe])).unwrap();

    vm.resume().unwrap();

    assert_eq!(
        vm.wait(Some(Duration::from_secs(20))),
        Some(ExitReason::Reset)
    );
}

#[test]
fn stop_ends_a_spinning_guest_with_stopped() {
    require_kvm!();
    let mut vm = Partition::new(config(&[0xeb, 0xfe])).unwrap();
    vm.resume().unwrap();

    let reason = vm.stop();

    assert_eq!(reason, ExitReason::Stopped);
}

#[test]
fn zero_vcpus_is_a_config_error() {
    require_kvm!();
    let mut cfg = config(&[0xf4]);
    cfg.vcpus = 0;

    assert!(matches!(
        Partition::new(cfg),
        Err(Error::InvalidVcpuCount { count: 0, .. })
    ));
}

#[test]
fn missing_kernel_is_a_read_error() {
    require_kvm!();
    let cfg = PartitionConfig::new(KernelImage::Path("/nonexistent/vmlinux".into()), "");

    assert!(matches!(Partition::new(cfg), Err(Error::ReadFile { .. })));
}

#[test]
fn truncated_kernel_file_is_a_load_error() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vmlinux");
    std::fs::write(&path, &tiny_elf(&[0xf4; 256])[..100]).unwrap();
    let cfg = PartitionConfig::new(KernelImage::Path(path), "");

    assert!(matches!(Partition::new(cfg), Err(Error::KernelLoad(_))));
}

#[test]
fn initrd_too_large_for_memory_is_rejected() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initrd");
    std::fs::File::create(&initrd)
        .unwrap()
        .set_len(20 << 20)
        .unwrap();
    let mut cfg = config(&[0xf4]);
    cfg.memory_mib = 16;
    cfg.boot.initrd = Some(initrd);

    assert!(matches!(
        Partition::new(cfg),
        Err(Error::InitrdTooLarge { .. })
    ));
}

#[test]
fn pause_of_a_partition_never_started_is_rejected() {
    require_kvm!();
    let mut vm = Partition::new(config(&[0xf4])).unwrap();

    assert!(matches!(
        vm.pause(),
        Err(Error::InvalidRunState {
            operation: "pause",
            ..
        })
    ));
}

#[test]
fn overlapping_devices_are_rejected() {
    require_kvm!();
    struct Nothing;
    impl partition::bus::BusDevice for Nothing {
        fn read(&self, _offset: u64, _data: &mut [u8]) {}
        fn write(&self, _offset: u64, _data: &[u8]) {}
    }

    // COM1 already owns 0x3f8..0x400.
    let result = Partition::builder(config(&[0xf4]))
        .pio_device(0x3fc, 4, Arc::new(Nothing))
        .build();

    assert!(matches!(
        result,
        Err(Error::Bus(partition::error::BusError::Overlap { .. }))
    ));
}

#[test]
fn disk_that_is_a_directory_is_rejected() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&[0xf4]);
    cfg.disks.push(partition::DiskConfig::new(dir.path()));

    assert!(matches!(
        Partition::new(cfg),
        Err(Error::DiskNotAFile { .. })
    ));
}

#[test]
fn disk_whose_size_is_not_whole_sectors_is_rejected() {
    require_kvm!();
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(1000).unwrap();
    let mut cfg = config(&[0xf4]);
    cfg.disks.push(partition::DiskConfig::new(file.path()));

    assert!(matches!(
        Partition::new(cfg),
        Err(Error::Block(
            partition::block::BlockError::NotSectorAligned { len: 1000, .. }
        ))
    ));
}

#[test]
fn fwait_runs_on_any_kvm() {
    require_kvm!();
    // Hardware executes fwait; a software KVM's emulator cannot, and the partition steps over it.
    let mut code = vec![0x9b, 0x9b];
    code.extend(print_and_power_off(b"after fwait"));
    let out = Capture::default();
    let mut vm = Partition::new(config(&code)).unwrap();
    vm.com1().set_sink(Box::new(out.clone()));

    vm.resume().unwrap();

    assert_eq!(
        vm.wait(Some(Duration::from_secs(20))),
        Some(ExitReason::PowerOff)
    );
    assert_eq!(out.text(), "after fwait");
}

#[test]
fn undecodable_instruction_ends_the_run_with_its_bytes() {
    require_kvm!();
    // ud2 with no IDT: #UD cannot be delivered, so the vCPU triple-faults (hardware) or the
    // emulator gives up with the instruction bytes (software KVM); either way the run ends typed.
    let mut vm = Partition::new(config(&[0x0f, 0x0b])).unwrap();

    vm.resume().unwrap();
    let reason = vm.wait(Some(Duration::from_secs(20)));

    assert!(
        matches!(
            reason,
            Some(ExitReason::TripleFault) | Some(ExitReason::InternalError { .. })
        ),
        "{reason:?}"
    );
}
