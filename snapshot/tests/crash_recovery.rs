//! Crash safety: each operation runs in a child process that SIGKILLs itself at a named step
//! (`VMMS_FAULT=<step>`); every image passes `qemu-img check` right after the kill and after
//! `recover`, the operation then happened or it did not, and no data written before the
//! operation began is lost.

mod common_qemu;
mod common_vm;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;

use common_qemu::assert_images_clean;
use common_vm::*;
use snapshot::{
    CheckpointId, CheckpointType, CreateRequest, ExportMode, ImportMode, NoProgress, Recovery,
    VmFolder, apply_checkpoint, create_checkpoint, delete_checkpoint, delete_checkpoint_tree,
    export_vm, import_vm, recover,
};

fn standard(name: &str) -> CreateRequest {
    CreateRequest {
        name: Some(name.into()),
        checkpoint_type: CheckpointType::Standard,
    }
}

/// The child side: runs `VMMS_FAULT_OP` on `VMMS_FAULT_VM`. Only meaningful when spawned by
/// [`run_until_killed`], hence ignored in normal runs.
#[test]
#[ignore = "run as a child process by the crash tests"]
fn fault_child() {
    let op = std::env::var("VMMS_FAULT_OP").expect("VMMS_FAULT_OP");
    let vm = VmFolder::new(std::env::var("VMMS_FAULT_VM").expect("VMMS_FAULT_VM"));
    let cp = || {
        std::env::var("VMMS_FAULT_CP")
            .expect("cp")
            .parse::<CheckpointId>()
            .expect("id")
    };
    match op.as_str() {
        "create" => create_checkpoint(&vm, &standard("crash"), &mut NoProgress).map(|_| ()),
        "apply" => apply_checkpoint(&vm, cp(), &mut NoProgress),
        "delete" => delete_checkpoint(&vm, cp(), &mut NoProgress),
        "delete-tree" => delete_checkpoint_tree(&vm, cp(), &mut NoProgress),
        "export" => {
            let target = std::env::var("VMMS_FAULT_TARGET").expect("target");
            export_vm(
                &vm,
                Path::new(&target),
                ExportMode::Chained,
                &mut NoProgress,
            )
        }
        other => panic!("unknown op {other}"),
    }
    .expect("operation");
}

/// Runs `op` in a child that dies at `step`; asserts it really died there (SIGKILL).
fn run_until_killed(
    op: &str,
    step: &str,
    vm: &VmFolder,
    cp: Option<CheckpointId>,
    target: Option<&Path>,
) {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args([
        "--exact",
        "fault_child",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("VMMS_FAULT", step)
    .env("VMMS_FAULT_OP", op)
    .env("VMMS_FAULT_VM", vm.dir());
    if let Some(cp) = cp {
        cmd.env("VMMS_FAULT_CP", cp.to_string());
    }
    if let Some(target) = target {
        cmd.env("VMMS_FAULT_TARGET", target);
    }
    let out = cmd.output().expect("spawn child");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGKILL),
        "{op} did not die at {step}: {:?} {} {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// 3 MiB of pattern at 1 MiB (several commit chunks).
const BULK: (u64, usize) = (1 << 20, 3 << 20);

fn bulk_pattern() -> Vec<u8> {
    (0..BULK.1).map(|i| (i / 4096 % 250) as u8 + 1).collect()
}

fn write_bulk(vm: &VmFolder) {
    let disk = snapshot::open_disk(&live_disk(vm, 0), false).expect("open");
    disk.write(BULK.0, &bulk_pattern()).expect("bulk write");
    disk.flush().expect("flush");
}

fn assert_bulk_intact(vm: &VmFolder, step: &str) {
    let disk = snapshot::open_disk(&live_disk(vm, 0), true).expect("open");
    let mut buf = vec![0u8; BULK.1];
    disk.read(BULK.0, &mut buf).expect("read");
    assert!(buf == bulk_pattern(), "{step}: bulk data changed");
}

fn blocks(vm: &VmFolder) -> [u8; 3] {
    [
        read_record(vm, 0, 0),
        read_record(vm, 0, 1),
        read_record(vm, 0, 2),
    ]
}

#[test]
fn create_killed_at_any_step_is_rolled_back_or_finished() {
    let steps = [
        ("snapshot.create-journal", false),
        ("snapshot.create-state-copied", false),
        ("snapshot.create-folder", false),
        ("snapshot.create-overlay", false),
        ("snapshot.create-committed", true),
        ("snapshot.create-tree", true),
        ("snapshot.create-config", true),
    ];
    for (step, happened) in steps {
        let root = tempfile::tempdir().expect("tmp");
        let vm = make_vm(root.path(), 1);
        write_record(&vm, 0, 0, 1);
        save_vm(&vm, 7);

        run_until_killed("create", step, &vm, None, None);
        assert_images_clean(disk_files(&vm));
        let recovery = recover(vm.dir()).expect("recover");

        let tree = vm.tree().expect("tree");
        assert_eq!(tree.checkpoints.len(), usize::from(happened), "{step}");
        assert_eq!(
            matches!(recovery, Recovery::RolledForward(_)),
            happened,
            "{step}"
        );
        assert_eq!(
            disk_files(&vm).len(),
            1 + usize::from(happened),
            "{step}: leftover layers"
        );
        assert_eq!(blocks(&vm), [1, 0, 0], "{step}");
        assert_eq!(saved_tag(&vm), Some(7), "{step}");
        let entries: Vec<String> = std::fs::read_dir(vm.checkpoints_dir())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n != "tree.json")
            .collect();
        assert_eq!(
            entries.len(),
            usize::from(happened),
            "{step}: stray entries {entries:?}"
        );
        assert_images_clean(disk_files(&vm));
    }
}

#[test]
fn apply_killed_at_any_step_is_rolled_back_or_finished() {
    let steps = [
        ("snapshot.apply-journal", false),
        ("snapshot.apply-overlay", false),
        ("snapshot.apply-state-copied", false),
        ("snapshot.apply-committed", true),
        ("snapshot.apply-state", true),
        ("snapshot.apply-tree", true),
        ("snapshot.apply-config", true),
        ("snapshot.apply-discard", true),
    ];
    for (step, happened) in steps {
        let root = tempfile::tempdir().expect("tmp");
        let vm = make_vm(root.path(), 1);
        write_record(&vm, 0, 0, 1);
        save_vm(&vm, 5);
        let a = create_checkpoint(&vm, &standard("a"), &mut NoProgress).expect("cp");
        std::fs::remove_dir_all(vm.state_dir()).expect("VM started and turned off");
        write_record(&vm, 0, 0, 2);

        run_until_killed("apply", step, &vm, Some(a.id), None);
        assert_images_clean(disk_files(&vm));
        recover(vm.dir()).expect("recover");

        let expected = if happened {
            ([1, 0, 0], Some(5))
        } else {
            ([2, 0, 0], None)
        };
        assert_eq!((blocks(&vm), saved_tag(&vm)), expected, "{step}");
        assert_eq!(
            disk_files(&vm).len(),
            2,
            "{step}: checkpoint layer + one live layer"
        );
        assert!(
            !vm.dir().join(".state.new").exists() && !vm.dir().join(".state.old").exists(),
            "{step}"
        );
        assert_images_clean(disk_files(&vm));
    }
}

/// A (block0=1) → B (block1=2) → Now (block2=3).
fn two_checkpoints(root: &Path) -> (VmFolder, CheckpointId, CheckpointId) {
    let vm = make_vm(root, 1);
    write_record(&vm, 0, 0, 1);
    let a = create_checkpoint(&vm, &standard("a"), &mut NoProgress).expect("a");
    write_record(&vm, 0, 1, 2);
    write_bulk(&vm);
    let b = create_checkpoint(&vm, &standard("b"), &mut NoProgress).expect("b");
    write_record(&vm, 0, 2, 3);
    (vm, a.id, b.id)
}

#[test]
fn delete_killed_at_any_step_is_finished_with_every_state_intact() {
    let steps = [
        "snapshot.delete-journal",
        "snapshot.commit-chunk-1",
        "snapshot.commit-chunk-3",
        "snapshot.delete-committed",
        "snapshot.delete-renamed",
        "snapshot.delete-tree",
        "snapshot.delete-folder",
    ];
    for step in steps {
        let root = tempfile::tempdir().expect("tmp");
        let (vm, a, b) = two_checkpoints(root.path());
        let files_before = disk_files(&vm).len();

        run_until_killed("delete", step, &vm, Some(a), None);
        assert_images_clean(disk_files(&vm));
        let recovery = recover(vm.dir()).expect("recover");

        assert_eq!(recovery, Recovery::RolledForward("delete"), "{step}");
        let tree = vm.tree().expect("tree");
        assert!(
            tree.get(a).is_none() && tree.get(b).and_then(|n| n.parent).is_none(),
            "{step}"
        );
        assert_eq!(
            disk_files(&vm).len(),
            files_before - 1,
            "{step}: chain shrank"
        );
        assert_images_clean(disk_files(&vm));
        assert_eq!(blocks(&vm), [1, 2, 3], "{step}: live data");
        assert_bulk_intact(&vm, step);
        apply_checkpoint(&vm, b, &mut NoProgress).expect("apply b");
        assert_eq!(blocks(&vm), [1, 2, 0], "{step}: checkpoint b");
        assert_images_clean(disk_files(&vm));
    }
}

#[test]
fn delete_of_an_abandoned_branch_killed_while_removing_its_layer_is_finished() {
    let root = tempfile::tempdir().expect("tmp");
    let (vm, a, b) = two_checkpoints(root.path());
    apply_checkpoint(&vm, a, &mut NoProgress).expect("apply a abandons b's branch");

    run_until_killed(
        "delete-tree",
        "snapshot.delete-layer-removed",
        &vm,
        Some(b),
        None,
    );
    recover(vm.dir()).expect("recover");

    let tree = vm.tree().expect("tree");
    assert!(tree.get(b).is_none() && tree.get(a).is_some());
    assert_eq!(disk_files(&vm).len(), 2, "a's layer and the live layer");
    assert_eq!(blocks(&vm), [1, 0, 0]);
    assert_images_clean(disk_files(&vm));
}

#[test]
fn export_killed_at_any_step_leaves_no_partial_export() {
    let steps = [
        ("snapshot.export-journal", false),
        ("snapshot.export-copied", false),
        ("snapshot.export-renamed", true),
    ];
    for (step, happened) in steps {
        let root = tempfile::tempdir().expect("tmp");
        let (vm, _, _) = two_checkpoints(root.path());
        let target = root.path().join("exports").join("vm1");

        run_until_killed("export", step, &vm, None, Some(&target));
        recover(vm.dir()).expect("recover");

        assert_eq!(target.exists(), happened, "{step}");
        let leftovers = std::fs::read_dir(root.path().join("exports"))
            .expect("list")
            .count();
        assert_eq!(
            leftovers,
            usize::from(happened),
            "{step}: no staging folder left"
        );
        if happened {
            let store = root.path().join("store");
            let id = import_vm(
                &target,
                &store.join("vms"),
                ImportMode::NewId,
                &mut NoProgress,
            )
            .expect("import");
            let imported = VmFolder::new(store.join("vms").join(id.to_string()));
            assert_eq!(blocks(&imported), [1, 2, 3], "{step}");
        }
        assert_eq!(blocks(&vm), [1, 2, 3], "{step}: source untouched");
    }
}

#[test]
fn delete_of_a_branch_point_killed_mid_rebase_is_finished() {
    for step in [
        "snapshot.rebase-streamed",
        "snapshot.delete-rebased",
        "snapshot.delete-layer-removed",
    ] {
        let root = tempfile::tempdir().expect("tmp");
        let (vm, a, b) = two_checkpoints(root.path());
        apply_checkpoint(&vm, a, &mut NoProgress).expect("apply a");
        write_record(&vm, 0, 2, 9);
        let d = create_checkpoint(&vm, &standard("d"), &mut NoProgress).expect("d");
        let files_before = disk_files(&vm).len();

        run_until_killed("delete", step, &vm, Some(a), None);
        assert_images_clean(disk_files(&vm));
        recover(vm.dir()).expect("recover");

        assert_eq!(disk_files(&vm).len(), files_before - 1, "{step}");
        assert_eq!(blocks(&vm), [1, 0, 9], "{step}: live data");
        assert_images_clean(disk_files(&vm));
        apply_checkpoint(&vm, b, &mut NoProgress).expect("apply b");
        assert_eq!(blocks(&vm), [1, 2, 0], "{step}: checkpoint b");
        assert_bulk_intact(&vm, step);
        apply_checkpoint(&vm, d.id, &mut NoProgress).expect("apply d");
        assert_eq!(blocks(&vm), [1, 0, 9], "{step}: checkpoint d");
    }
}
