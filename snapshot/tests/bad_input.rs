//! Bad input gets a clear error and touches nothing else.

mod common_vm;

use common_vm::*;
use snapshot::{
    CheckpointType, CreateRequest, Error, NoProgress, apply_checkpoint, create_checkpoint,
    create_overlay, create_qcow2, open_disk,
};

fn standard(name: &str) -> CreateRequest {
    CreateRequest {
        name: Some(name.into()),
        checkpoint_type: CheckpointType::Standard,
    }
}

#[test]
fn a_corrupt_tree_file_is_a_clear_error_and_nothing_is_touched() {
    let root = tempfile::tempdir().expect("tmp");
    let vm = make_vm(root.path(), 1);
    create_checkpoint(&vm, &standard("a"), &mut NoProgress).expect("cp");
    std::fs::write(vm.tree_path(), b"{\"version\": 1, \"checkpoints\": [tru").expect("corrupt");
    let before = snapshot_of(vm.dir());

    let result = create_checkpoint(&vm, &standard("b"), &mut NoProgress);

    assert!(matches!(result, Err(Error::Corrupt { .. })), "{result:?}");
    assert!(snapshot_of(vm.dir()) == before, "the VM folder changed");
}

#[test]
fn a_tree_with_a_dangling_parent_is_invalid() {
    let root = tempfile::tempdir().expect("tmp");
    let vm = make_vm(root.path(), 1);
    let cp = create_checkpoint(&vm, &standard("a"), &mut NoProgress).expect("cp");
    let text = std::fs::read_to_string(vm.tree_path()).expect("tree");
    let broken = text.replacen(
        "\"parent\": null",
        "\"parent\": \"0b3d7a5c-95c1-4c4e-9d0a-1a2b3c4d5e6f\"",
        1,
    );
    std::fs::write(vm.tree_path(), broken).expect("write");

    let result = apply_checkpoint(&vm, cp.id, &mut NoProgress);

    assert!(matches!(result, Err(Error::Invalid { .. })), "{result:?}");
}

#[test]
fn a_truncated_qcow2_header_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("d.qcow2");
    create_qcow2(&path, 1 << 20).expect("create");
    let bytes = std::fs::read(&path).expect("read");
    std::fs::write(&path, &bytes[..40]).expect("truncate");

    let result = open_disk(&path, true);

    assert!(
        matches!(
            result,
            Err(Error::Image { .. } | Error::UnknownFormat { .. })
        ),
        "{result:?}"
    );
}

#[test]
fn a_qcow2_header_with_garbage_fields_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("d.qcow2");
    create_qcow2(&path, 1 << 20).expect("create");
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[20..24].copy_from_slice(&[0, 0, 0, 40]); // cluster_bits = 40
    std::fs::write(&path, &bytes).expect("corrupt");

    let result = open_disk(&path, false);

    assert!(
        matches!(result, Err(Error::Image { .. } | Error::Unsupported { .. })),
        "{result:?}"
    );
}

#[test]
fn a_missing_backing_file_is_named_in_the_error() {
    let dir = tempfile::tempdir().expect("tmp");
    let (base, top) = (dir.path().join("base.qcow2"), dir.path().join("top.qcow2"));
    create_qcow2(&base, 1 << 20).expect("base");
    create_overlay(&top, &base).expect("top");
    std::fs::remove_file(&base).expect("remove base");

    let result = open_disk(&top, false);

    assert!(
        matches!(&result, Err(Error::MissingBacking { backing, .. }) if backing == &base),
        "{result:?}"
    );
}

#[test]
fn apply_of_a_checkpoint_missing_its_memory_file_fails_and_changes_nothing() {
    let root = tempfile::tempdir().expect("tmp");
    let vm = make_vm(root.path(), 1);
    save_vm(&vm, 3);
    let cp = create_checkpoint(&vm, &standard("a"), &mut NoProgress).expect("cp");
    std::fs::remove_file(vm.checkpoint_dir(cp.id).join("state").join("memory.bin"))
        .expect("remove memory");
    let before = snapshot_of(vm.dir());

    let result = apply_checkpoint(&vm, cp.id, &mut NoProgress);

    assert!(
        matches!(result, Err(Error::CheckpointIncomplete { .. })),
        "{result:?}"
    );
    assert!(snapshot_of(vm.dir()) == before, "the VM folder changed");
}

#[test]
fn a_random_file_is_not_taken_for_a_disk() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, b"hello").expect("write");

    let result = open_disk(&path, true);

    assert!(
        matches!(result, Err(Error::UnknownFormat { .. })),
        "{result:?}"
    );
}

mod header_fuzz {
    use proptest::prelude::*;
    use snapshot::{create_overlay, create_qcow2, open_disk};

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Damaging any header byte of a qcow2 overlay gives an error or a usable disk, never a
        /// panic; reads of a disk that did open stay within bounds.
        #[test]
        fn damaged_qcow2_headers_never_panic(edits in proptest::collection::vec((0usize..512, any::<u8>()), 1..6)) {
            let dir = tempfile::tempdir().expect("tmp");
            let (base, top) = (dir.path().join("base.qcow2"), dir.path().join("top.qcow2"));
            create_qcow2(&base, 1 << 20).expect("base");
            create_overlay(&top, &base).expect("top");
            let mut bytes = std::fs::read(&top).expect("read");
            for (at, value) in edits {
                bytes[at] = value;
            }
            std::fs::write(&top, &bytes).expect("write");

            if let Ok(disk) = open_disk(&top, true) {
                let mut buf = vec![0u8; 4096];
                let _ = disk.read(0, &mut buf);
                let _ = disk.allocation_map();
            }
        }
    }
}

/// A header claiming an enormous disk (a damaged size field) is refused at open: walking it
/// would take one step per L2 table, for ever (seen as a hung fuzz case).
#[test]
fn qcow2_claiming_more_than_qemu_can_map_is_refused_quickly() {
    let dir = tempfile::tempdir().expect("tmp");
    let (base, top) = (dir.path().join("base.qcow2"), dir.path().join("top.qcow2"));
    snapshot::create_qcow2(&base, 1 << 20).expect("base");
    snapshot::create_overlay(&top, &base).expect("top");
    let mut bytes = std::fs::read(&top).expect("read");
    bytes[24..32].copy_from_slice(&(1u64 << 61).to_be_bytes());
    std::fs::write(&top, &bytes).expect("write");
    let started = std::time::Instant::now();

    let opened = snapshot::open_disk(&top, true);

    assert!(
        matches!(&opened, Err(snapshot::Error::Unsupported { feature, .. }) if feature.contains("virtual size")),
        "{:?}",
        opened.map(|d| d.size())
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
}
