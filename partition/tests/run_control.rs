//! Pause, resume, state capture and restore, and the dirty log, on real KVM with a counting guest.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::tiny_elf;
use partition::{KernelImage, Partition, PartitionConfig, PartitionState, RunState};
use vm_memory::{Bytes, GuestAddress};

const COUNTER: u64 = 0x20_0000;

/// `inc qword [COUNTER]; jmp back`, forever.
fn counting_guest() -> PartitionConfig {
    let code = [0x48, 0xff, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00, 0xeb, 0xf6];
    let mut cfg = PartitionConfig::new(KernelImage::Bytes(Arc::from(tiny_elf(&code))), "");
    cfg.memory_mib = 32;
    cfg
}

fn counter(vm: &Partition) -> u64 {
    vm.memory().read_obj(GuestAddress(COUNTER)).unwrap()
}

/// Waits until the counter passes `above`.
fn wait_counter_above(vm: &Partition, above: u64) -> u64 {
    for _ in 0..2000 {
        let value = counter(vm);
        if value > above {
            return value;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("counter stuck at {}", counter(vm));
}

#[test]
fn pause_freezes_the_guest_and_resume_continues_it() {
    require_kvm!();
    let mut vm = Partition::new(counting_guest()).unwrap();
    vm.resume().unwrap();
    wait_counter_above(&vm, 0);

    vm.pause().unwrap();
    let frozen = counter(&vm);
    std::thread::sleep(Duration::from_millis(200));
    let still = counter(&vm);
    vm.resume().unwrap();
    let moved = wait_counter_above(&vm, still);

    assert_eq!(*vm.run_state(), RunState::Running);
    assert_eq!(frozen, still);
    assert!(moved > still);
}

#[test]
fn restored_partition_continues_from_the_exact_captured_counter() {
    require_kvm!();
    let mut vm = Partition::new(counting_guest()).unwrap();
    vm.resume().unwrap();
    wait_counter_above(&vm, 1000);
    vm.pause().unwrap();
    let saved_counter = counter(&vm);
    let state = vm.capture_state().unwrap();
    let mut memory_file = tempfile::tempfile().unwrap();
    vm.save_memory(&mut memory_file).unwrap();
    let json = state.to_json().unwrap();
    drop(vm);

    let state = PartitionState::from_json(&json).unwrap();
    let mut restored = Partition::builder(counting_guest())
        .restore(&state, &memory_file)
        .unwrap();
    let at_restore = counter(&restored);
    restored.resume().unwrap();
    let later = wait_counter_above(&restored, at_restore);

    assert_eq!(at_restore, saved_counter);
    assert!(later > saved_counter);
}

#[test]
fn restore_into_a_different_memory_size_is_rejected() {
    require_kvm!();
    let vm = Partition::new(counting_guest()).unwrap();
    let state = vm.capture_state().unwrap();
    let mut memory_file = tempfile::tempfile().unwrap();
    vm.save_memory(&mut memory_file).unwrap();
    let mut other = counting_guest();
    other.memory_mib = 64;

    let err = Partition::builder(other)
        .restore(&state, &memory_file)
        .unwrap_err();

    assert!(matches!(err, partition::Error::StateMismatch));
}

#[test]
fn capture_while_running_is_rejected() {
    require_kvm!();
    let mut vm = Partition::new(counting_guest()).unwrap();
    vm.resume().unwrap();

    let err = vm.capture_state().unwrap_err();

    assert!(matches!(err, partition::Error::InvalidRunState { .. }));
}

#[test]
fn dirty_log_reports_the_counter_page() {
    require_kvm!();
    let mut cfg = counting_guest();
    cfg.dirty_log = true;
    let mut vm = Partition::new(cfg).unwrap();
    // Loading the kernel wrote memory from the host side; start from a clean log.
    vm.read_dirty_log().unwrap();
    vm.resume().unwrap();
    wait_counter_above(&vm, 0);
    vm.pause().unwrap();

    let pages: Vec<u64> = vm
        .read_dirty_log()
        .unwrap()
        .iter()
        .flat_map(|r| r.pages().collect::<Vec<_>>())
        .collect();
    let second: u64 = vm.read_dirty_log().unwrap().iter().map(|r| r.count()).sum();

    assert!(pages.contains(&COUNTER), "dirty pages: {pages:x?}");
    assert_eq!(second, 0);
}

#[test]
fn state_with_a_wrong_irqchip_id_fails_to_restore_cleanly() {
    require_kvm!();
    let vm = Partition::new(counting_guest()).unwrap();
    let mut state = vm.capture_state().unwrap();
    let mut memory_file = tempfile::tempfile().unwrap();
    vm.save_memory(&mut memory_file).unwrap();
    state.vm.ioapic.chip_id = 7;

    let err = Partition::builder(counting_guest())
        .restore(&state, &memory_file)
        .unwrap_err();

    assert!(matches!(err, partition::Error::InvalidState(_)), "{err:?}");
}

#[test]
fn state_from_a_newer_version_is_refused() {
    require_kvm!();
    let vm = Partition::new(counting_guest()).unwrap();
    let mut json: serde_json::Value =
        serde_json::from_slice(&vm.capture_state().unwrap().to_json().unwrap()).unwrap();
    json["version"] = serde_json::json!(99);

    let err = PartitionState::from_json(json.to_string().as_bytes()).unwrap_err();

    assert!(matches!(
        err,
        partition::Error::StateVersion { found: 99, .. }
    ));
}

#[test]
fn two_vcpu_partition_pauses_captures_and_restores_both_vcpus() {
    require_kvm!();
    let mut config = counting_guest();
    config.vcpus = 2;
    let mut vm = Partition::new(config.clone()).unwrap();
    vm.resume().unwrap();
    wait_counter_above(&vm, 100);
    vm.pause().unwrap();
    let state = vm.capture_state().unwrap();
    let mut memory_file = tempfile::tempfile().unwrap();
    vm.save_memory(&mut memory_file).unwrap();
    let saved_counter = counter(&vm);
    drop(vm);

    let mut restored = Partition::builder(config)
        .restore(&state, &memory_file)
        .unwrap();
    restored.resume().unwrap();
    let later = wait_counter_above(&restored, saved_counter);

    assert_eq!(state.vcpus.len(), 2);
    assert_ne!(
        state.vcpus[0].mp_state.mp_state, state.vcpus[1].mp_state.mp_state,
        "the application processor waits for a SIPI while the boot processor runs"
    );
    assert!(later > saved_counter);
}
