//! Production checkpoints taken by a real worker running the test guest: only the disks are
//! switched, and only while a freeze the worker relayed is held. Without a freeze, or after the
//! hold limit thawed the guest, the worker refuses and nothing is made; with one, the guest's
//! disk moves to its overlay, no memory is written, and the guest is still frozen until thawed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::images::qemu_img;
use common::{Console, Fixture, TIMEOUT};
use vmm_core::integration::GuestFreezeStatus;
use vmm_core::{
    CheckpointContent, CheckpointRequest, DiskConfig, DiskOverlay, VmConfig, Worker, WorkerError,
};
use vmms_guest::protocol::BANNER;

/// What the agent gets per call: far more than a polling guest needs, even on a loaded host.
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);

fn vm_dir(fixture: &Fixture, config: &VmConfig) -> PathBuf {
    fixture.dir.path().join("vms").join(config.id.to_string())
}

/// A running test guest with a qcow2 disk and 5 records on it.
fn boot(fixture: &Fixture) -> (VmConfig, Box<dyn Worker>) {
    let mut config = VmConfig::new("prod");
    config.memory_mib = 16;
    config.disks = vec![DiskConfig {
        path: "disk0.qcow2".into(),
        read_only: false,
    }];
    let dir = vm_dir(fixture, &config);
    fs::create_dir_all(dir.join("disks")).unwrap();
    fs::create_dir_all(dir.join("checkpoints")).unwrap();
    fixture.define(&config);
    let disk = dir.join("disks/disk0.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", disk.to_str().unwrap(), "8M"]);
    let worker = fixture.boot(&config);
    let runtime = fixture.launcher.runtime_dir(config.id);
    let mut console = Console::attach(&runtime.console_socket());
    let at = console.wait_for(BANNER, 0);
    console.send("write 5\r");
    console.wait_for("wrote 5 records, total 5", at);
    (config, worker)
}

/// A disks-only request named `name`: an empty staging folder, its marker, one overlay.
fn request(dir: &Path, name: &str) -> CheckpointRequest {
    let staging = dir.join("checkpoints").join(format!(".{name}.staging"));
    fs::create_dir(&staging).unwrap();
    CheckpointRequest {
        staging,
        state_dir: dir.join("checkpoints").join(format!("{name}.switched")),
        parent_state_dir: None,
        overlays: vec![DiskOverlay {
            disk: 0,
            path: dir.join("disks").join(format!("disk0-{name}.qcow2")),
        }],
        content: CheckpointContent::FrozenDisks,
    }
}

fn assert_nothing_made(request: &CheckpointRequest) {
    assert!(!request.state_dir.exists(), "no commit");
    assert!(!request.overlays[0].path.exists(), "no overlay left");
}

#[test]
fn disks_only_checkpoint_needs_a_held_freeze_and_writes_no_memory() {
    require_kvm!();
    let fixture = Fixture::new();
    let (config, worker) = boot(&fixture);
    let dir = vm_dir(&fixture, &config);
    let unfrozen = request(&dir, "unfrozen");
    let frozen = request(&dir, "frozen");

    let refused = worker.checkpoint(&unfrozen);
    worker
        .freeze_guest(AGENT_TIMEOUT, Duration::from_secs(60))
        .unwrap();
    let taken = worker.checkpoint(&frozen);
    let status_after = worker.guest_freeze_status(AGENT_TIMEOUT);
    worker.thaw_guest(AGENT_TIMEOUT).unwrap();

    assert!(
        matches!(refused, Err(WorkerError::InvalidState { .. })),
        "{refused:?}"
    );
    assert_nothing_made(&unfrozen);
    let report = taken.unwrap();
    assert_eq!(report.memory_bytes, 0);
    assert!(frozen.state_dir.is_dir(), "committed");
    assert_eq!(
        fs::read_dir(&frozen.state_dir).unwrap().count(),
        0,
        "no state"
    );
    assert!(frozen.overlays[0].path.is_file());
    assert_eq!(
        status_after.unwrap(),
        GuestFreezeStatus::Frozen,
        "still frozen"
    );
    assert_eq!(worker.status(), vmm_core::WorkerStatus::Running);
    worker.turn_off().unwrap();
    let info = qemu_img(&[
        "info",
        "--output=json",
        frozen.overlays[0].path.to_str().unwrap(),
    ]);
    assert!(
        info.contains("disk0.qcow2"),
        "the overlay's backing: {info}"
    );
}

#[test]
fn a_freeze_thawed_at_its_hold_limit_no_longer_allows_a_disks_only_checkpoint() {
    require_kvm!();
    let fixture = Fixture::new();
    let (config, worker) = boot(&fixture);
    let dir = vm_dir(&fixture, &config);
    let late = request(&dir, "late");
    worker
        .freeze_guest(AGENT_TIMEOUT, Duration::from_millis(500))
        .unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while worker.guest_freeze_status(AGENT_TIMEOUT).unwrap() != GuestFreezeStatus::Thawed {
        assert!(Instant::now() < deadline, "the hold limit never thawed");
        std::thread::sleep(Duration::from_millis(50));
    }

    let refused = worker.checkpoint(&late);

    assert!(
        matches!(refused, Err(WorkerError::InvalidState { .. })),
        "{refused:?}"
    );
    assert_nothing_made(&late);
    assert_eq!(worker.status(), vmm_core::WorkerStatus::Running);
    worker.turn_off().unwrap();
}
