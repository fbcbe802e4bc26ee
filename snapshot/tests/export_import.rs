//! Export to a self-contained folder and import into another store.

mod common_qemu;
mod common_vm;

use common_qemu::{assert_check_clean, qemu_img};
use common_vm::*;
use snapshot::{
    CheckpointType, CreateRequest, Error, ExportMode, ImportMode, NoProgress, ProgressCounter,
    VmFolder, apply_checkpoint, backing_chain, create_checkpoint, export_vm, import_vm,
};

fn standard(name: &str) -> CreateRequest {
    CreateRequest {
        name: Some(name.into()),
        checkpoint_type: CheckpointType::Standard,
    }
}

#[test]
fn flattened_export_imports_as_a_new_vm_with_identical_disk_contents() {
    let (src, dst) = (
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    );
    let vm = make_vm(src.path(), 1);
    write_record(&vm, 0, 0, 1);
    create_checkpoint(&vm, &standard("a"), &mut NoProgress).expect("cp");
    write_record(&vm, 0, 5, 2);
    save_vm(&vm, 9);
    let export = src.path().join("export");
    let mut progress = ProgressCounter::default();

    export_vm(&vm, &export, ExportMode::Flattened, &mut progress).expect("export");
    let id = import_vm(
        &export,
        &dst.path().join("vms"),
        ImportMode::NewId,
        &mut NoProgress,
    )
    .expect("import");

    let imported = VmFolder::new(dst.path().join("vms").join(id.to_string()));
    let disk = live_disk(&imported, 0);
    assert_eq!(
        backing_chain(&disk).expect("chain"),
        std::slice::from_ref(&disk)
    );
    qemu_img(&[
        "compare",
        disk.to_str().expect("utf8"),
        live_disk(&vm, 0).to_str().expect("utf8"),
    ]);
    assert_check_clean(&disk);
    assert_eq!(imported.config().expect("config")["id"], id.to_string());
    assert_eq!(saved_tag(&imported), Some(9));
    assert_eq!(progress.percent(), 100);
}

#[test]
fn chained_export_keeps_checkpoints_and_imports_with_the_same_id() {
    let (src, dst) = (
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    );
    let vm = make_vm(src.path(), 1);
    write_record(&vm, 0, 0, 1);
    let a = create_checkpoint(&vm, &standard("a"), &mut NoProgress).expect("cp");
    write_record(&vm, 0, 0, 2);
    let export = src.path().join("export");
    let id = vm.config().expect("config")["id"]
        .as_str()
        .expect("id")
        .to_string();

    export_vm(&vm, &export, ExportMode::Chained, &mut NoProgress).expect("export");
    let imported_id = import_vm(
        &export,
        &dst.path().join("vms"),
        ImportMode::SameId,
        &mut NoProgress,
    )
    .expect("import");

    let imported = VmFolder::new(dst.path().join("vms").join(imported_id.to_string()));
    assert_eq!(imported_id.to_string(), id);
    assert_eq!(read_record(&imported, 0, 0), 2);
    assert_eq!(
        backing_chain(&live_disk(&imported, 0))
            .expect("chain")
            .len(),
        2
    );
    apply_checkpoint(&imported, a.id, &mut NoProgress).expect("apply imported checkpoint");
    assert_eq!(read_record(&imported, 0, 0), 1);
    for file in disk_files(&imported) {
        assert_check_clean(&file);
    }
}

#[test]
fn import_with_the_same_id_into_a_store_that_has_it_is_refused() {
    let src = tempfile::tempdir().expect("tmp");
    let vm = make_vm(src.path(), 1);
    let export = src.path().join("export");
    export_vm(&vm, &export, ExportMode::Chained, &mut NoProgress).expect("export");

    let result = import_vm(
        &export,
        &src.path().join("vms"),
        ImportMode::SameId,
        &mut NoProgress,
    );

    assert!(matches!(result, Err(Error::AlreadyExists(_))), "{result:?}");
}

#[test]
fn import_of_an_export_with_a_missing_backing_file_fails_and_leaves_the_store_empty() {
    let (src, dst) = (
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    );
    let vm = make_vm(src.path(), 1);
    create_checkpoint(&vm, &standard("a"), &mut NoProgress).expect("cp");
    let export = src.path().join("export");
    export_vm(&vm, &export, ExportMode::Chained, &mut NoProgress).expect("export");
    std::fs::remove_file(export.join("disks").join("disk0.qcow2")).expect("break the chain");
    let vms = dst.path().join("vms");

    let result = import_vm(&export, &vms, ImportMode::NewId, &mut NoProgress);

    assert!(
        matches!(result, Err(Error::MissingBacking { .. })),
        "{result:?}"
    );
    assert_eq!(std::fs::read_dir(&vms).expect("vms").count(), 0);
}

#[test]
fn export_to_an_existing_folder_is_refused() {
    let src = tempfile::tempdir().expect("tmp");
    let vm = make_vm(src.path(), 1);

    let result = export_vm(&vm, src.path(), ExportMode::Flattened, &mut NoProgress);

    assert!(matches!(result, Err(Error::AlreadyExists(_))), "{result:?}");
}
