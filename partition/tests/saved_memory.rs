//! Sparse memory images on real KVM: a save writes only the pages the test guest (or the VMM)
//! touched, and a restore from it is exact: every byte of memory, the guest's counter, its disk
//! records, and a second save of the restored guest.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::guest::{Guest, blank_disk, first_difference, guest_config, status_of};
use partition::{Partition, PartitionConfig, PartitionState, RunState};
use vm_memory::{Bytes, GuestAddress};
use vmms_guest::protocol::DIRTY_BASE;

const PAGE: u64 = 4096;

/// Pauses `guest` (if it runs) and writes its state and memory image into `dir`; returns the state and the
/// image's data bytes.
fn save(guest: &mut Guest, dir: &Path, name: &str) -> (PartitionState, File, u64) {
    if *guest.vm.run_state() == RunState::Running {
        guest.vm.pause().unwrap();
    }
    let state = guest.vm.capture_state().unwrap();
    let path = dir.join(name);
    let written = guest
        .vm
        .save_memory(&mut File::create(&path).unwrap())
        .unwrap();
    (state, File::open(&path).unwrap(), written)
}

fn restore(config: PartitionConfig, state: &PartitionState, image: &File) -> Partition {
    // Through the state's own codec, as a worker restores it.
    let state = PartitionState::from_json(&state.to_json().unwrap()).unwrap();
    Partition::builder(config).restore(&state, image).unwrap()
}

#[test]
fn sparse_image_restores_memory_counter_and_disk_records_exactly() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let disk = blank_disk(dir.path());
    let mut guest = Guest::boot(guest_config(64, Some(&disk)));
    guest.run("write 12");
    let dirtied = guest.run("dirty 300");
    // A pattern the VMM writes across scattered free pages, beyond the guest's 300.
    let scattered: Vec<u64> = (0..100)
        .map(|i| DIRTY_BASE + (400 + 37 * i) * PAGE)
        .collect();
    guest.vm.pause().unwrap();
    for (i, &address) in scattered.iter().enumerate() {
        let value = 0x5ca7_7e00_u64 + i as u64;
        guest
            .vm
            .memory()
            .write_obj(value, GuestAddress(address + 8 * (i as u64 % 500)))
            .unwrap();
    }
    let saved_counter = guest.status().counter;

    let (state, image, written) = save(&mut guest, dir.path(), "memory.bin");
    // The original keeps its disk (and the disk's lock) for the comparison below: the restored
    // partition runs on a copy taken at the save, as a checkpoint's disk would be.
    let restored_disk = dir.path().join("restored.img");
    std::fs::copy(&disk, &restored_disk).unwrap();
    let restored = restore(guest_config(64, Some(&restored_disk)), &state, &image);
    let difference = first_difference(&guest.vm, &restored);
    drop(guest);
    let restored_counter = status_of(&restored).counter;
    let mut restored = Guest::attach(restored, false);
    let moved = restored.wait_counter_above(saved_counter);
    let reply = restored.run("write 3");
    let allocated = image.metadata().unwrap().blocks() * 512;

    assert_eq!(dirtied, format!("dirtied 300 pages at {DIRTY_BASE:#x}"));
    assert_eq!(difference, None);
    eprintln!("image: {written} bytes of data, {allocated} bytes allocated");
    assert!(
        written < 16 << 20,
        "{written} bytes written for 64 MiB of which the guest used a few"
    );
    // The file system adds blocks of its own (the extent tree) to the data.
    assert!(
        allocated <= written + (1 << 20),
        "{allocated} bytes allocated, {written} written"
    );
    assert_eq!(image.metadata().unwrap().len(), 64 << 20);
    assert_eq!(restored_counter, saved_counter);
    assert!(moved > saved_counter);
    assert_eq!(reply, "wrote 3 records, total 15");
    vmms_guest::verify_records(File::open(&restored_disk).unwrap(), 15).unwrap();
}

#[test]
fn second_save_of_a_restored_guest_keeps_image_pages_and_new_writes() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let config = guest_config(32, None);
    let mut guest = Guest::boot(config.clone());
    guest.run("dirty 200");
    let (state, image, _) = save(&mut guest, dir.path(), "first.bin");
    drop(guest);
    let mut first = Guest::attach(restore(config.clone(), &state, &image), false);
    // The counter has moved, so the first 50 pages get new bytes; pages 50..200 keep the image's.
    first.wait_counter_above(status_of(&first.vm).counter);
    first.run("dirty 50");

    let (state, image, written) = save(&mut first, dir.path(), "second.bin");
    let second = restore(config, &state, &image);
    let difference = first_difference(&first.vm, &second);
    let saved_counter = first.status().counter;
    drop(first);
    let second = Guest::attach(second, false);
    let moved = second.wait_counter_above(saved_counter);

    assert_eq!(difference, None);
    assert!(written >= 200 * PAGE, "{written} bytes written");
    assert!(moved > saved_counter);
}

#[test]
fn guest_that_wrote_all_its_free_memory_saves_and_restores_exactly() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let config = guest_config(32, None);
    let free_pages = ((32 << 20) - DIRTY_BASE) / PAGE;
    let mut guest = Guest::boot(config.clone());
    let dirtied = guest.run(&format!("dirty {free_pages}"));

    let (state, image, written) = save(&mut guest, dir.path(), "memory.bin");
    let restored = restore(config, &state, &image);
    let difference = first_difference(&guest.vm, &restored);
    let saved_counter = guest.status().counter;
    drop(guest);
    let restored = Guest::attach(restored, false);
    let moved = restored.wait_counter_above(saved_counter);

    assert_eq!(
        dirtied,
        format!("dirtied {free_pages} pages at {DIRTY_BASE:#x}")
    );
    assert!(written >= free_pages * PAGE, "{written} bytes written");
    assert_eq!(difference, None);
    assert!(moved > saved_counter);
}
