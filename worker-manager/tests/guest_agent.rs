//! The guest's integration agent on COM2, driven through real workers running the test guest:
//! freeze holds its record workload and thaw lets it go on, the worker's hold limit thaws a
//! guest nobody thaws, the heartbeat, shutdown through the agent, and a guest without an agent
//! (timeouts, the VM running on).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::images::{count_records, qemu_img};
use common::{Console, Fixture, TIMEOUT};
use vmm_core::integration::{GuestFreezeStatus, GuestHeartbeat};
use vmm_core::{
    BootSource, DiskConfig, StopReason, VmConfig, VmId, Worker, WorkerError, WorkerEvent,
    WorkerLauncher,
};
use vmms_guest::protocol::{AGENT_SHUTDOWN_LINE, BANNER};
use worker_manager::ProcessLauncher;
use worker_manager::protocol::TestGuestCounters;

/// What the agent gets per call: far more than a polling guest needs, even on a loaded host.
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);

/// A test-guest VM with a qcow2 disk for its records; `cmdline` (when given) boots the test
/// guest from a file with that command line instead of the built-in default.
fn define(fixture: &Fixture, name: &str, cmdline: Option<&str>) -> VmConfig {
    let mut config = VmConfig::new(name);
    config.memory_mib = 16;
    config.disks = vec![DiskConfig {
        path: "disk0.qcow2".into(),
        read_only: false,
    }];
    let dir = fixture.dir.path().join("vms").join(config.id.to_string());
    fs::create_dir_all(dir.join("disks")).unwrap();
    if let Some(cmdline) = cmdline {
        let kernel: PathBuf = dir.join("test-guest.elf");
        fs::write(&kernel, vmms_guest::ELF).unwrap();
        config.boot = BootSource::Kernel {
            kernel,
            initrd: None,
            cmdline: cmdline.into(),
        };
    }
    fixture.define(&config);
    let disk = dir.join("disks/disk0.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", disk.to_str().unwrap(), "64M"]);
    config
}

fn disk_path(fixture: &Fixture, vm: VmId) -> PathBuf {
    fixture
        .dir
        .path()
        .join("vms")
        .join(vm.to_string())
        .join("disks/disk0.qcow2")
}

fn boot(fixture: &Fixture, config: &VmConfig) -> (Box<dyn Worker>, Console) {
    let worker = fixture.boot(config);
    let runtime = fixture.launcher.runtime_dir(config.id);
    let mut console = Console::attach(&runtime.console_socket());
    console.wait_for(BANNER, 0);
    (worker, console)
}

fn counters(launcher: &ProcessLauncher, vm: VmId) -> TestGuestCounters {
    launcher
        .report(vm, TIMEOUT)
        .expect("an attached worker")
        .expect("report")
        .test_guest
        .expect("test guest counters")
}

/// Polls until `condition` holds on the guest's counters; returns them.
fn wait_counters(
    launcher: &ProcessLauncher,
    vm: VmId,
    what: &str,
    condition: impl Fn(&TestGuestCounters) -> bool,
) -> TestGuestCounters {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let now = counters(launcher, vm);
        if condition(&now) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `writeloop` and waits until records are being written.
fn start_writeloop(fixture: &Fixture, vm: VmId, console: &mut Console) -> u64 {
    let from = console.text().len();
    console.send("writeloop\r");
    console.wait_for("writeloop started", from);
    let start = counters(&fixture.launcher, vm).records;
    wait_counters(&fixture.launcher, vm, "the writeloop writes", |c| {
        c.records > start + 2 && c.writeloop
    })
    .records
}

#[test]
fn freeze_holds_the_record_workload_and_thaw_resumes_it() {
    require_kvm!();
    let fixture = Fixture::new();
    let config = define(&fixture, "frozen", None);
    let (worker, mut console) = boot(&fixture, &config);
    start_writeloop(&fixture, config.id, &mut console);

    let started = Instant::now();
    let frozen = worker.freeze_guest(AGENT_TIMEOUT, Duration::from_secs(60));
    let freeze_took = started.elapsed();
    let status_frozen = worker.guest_freeze_status(AGENT_TIMEOUT);
    let at_freeze = counters(&fixture.launcher, config.id);
    // The guest keeps running (its counter moves) while not a record is written.
    let later = wait_counters(&fixture.launcher, config.id, "the guest ran on", |c| {
        c.counter > at_freeze.counter + 200
    });
    let started = Instant::now();
    let thawed = worker.thaw_guest(AGENT_TIMEOUT);
    let thaw_took = started.elapsed();
    eprintln!("freeze answered in {freeze_took:?}, thaw in {thaw_took:?}");
    let status_thawed = worker.guest_freeze_status(AGENT_TIMEOUT);
    let resumed = wait_counters(&fixture.launcher, config.id, "records resume", |c| {
        c.records > later.records + 2
    });

    assert_eq!(frozen.unwrap(), 1, "one record log frozen");
    assert_eq!(status_frozen.unwrap(), GuestFreezeStatus::Frozen);
    assert!(at_freeze.frozen && at_freeze.writeloop, "{at_freeze:?}");
    assert_eq!(
        later.records, at_freeze.records,
        "no record written while frozen"
    );
    assert_eq!(thawed.unwrap(), 1);
    assert_eq!(status_thawed.unwrap(), GuestFreezeStatus::Thawed);
    assert!(!resumed.frozen);
    worker.turn_off().unwrap();
    let on_disk = count_records(&disk_path(&fixture, config.id));
    assert!(
        on_disk >= resumed.records,
        "{on_disk} < {}",
        resumed.records
    );
}

/// The guest's own word on its freeze, from its shell's `status` line.
fn console_frozen(console: &mut Console) -> bool {
    let from = console.text().len();
    console.send("status\r");
    let at = console.wait_for("frozen=", from);
    console.wait_for(" ", at);
    console.text()[at..].starts_with('1')
}

#[test]
fn hold_limit_thaws_a_guest_whose_parent_went_away() {
    require_kvm!();
    let fixture = Fixture::new();
    let config = define(&fixture, "held", None);
    let (worker, mut console) = boot(&fixture, &config);
    start_writeloop(&fixture, config.id, &mut console);
    let hold_limit = Duration::from_secs(2);

    let asked = Instant::now();
    let frozen = worker.freeze_guest(AGENT_TIMEOUT, hold_limit);
    let frozen_after_freeze = console_frozen(&mut console);
    // The parent goes away (a daemon killed mid-backup): nobody will thaw.
    drop(worker);
    let deadline = Instant::now() + TIMEOUT;
    while console_frozen(&mut console) {
        assert!(
            Instant::now() < deadline,
            "still frozen past the hold limit"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let held_for = asked.elapsed();
    let worker = fixture
        .launcher
        .reattach(config.id, fixture.sink())
        .expect("reattach")
        .expect("a live worker");
    let thawed_at = counters(&fixture.launcher, config.id).records;
    let resumed = wait_counters(&fixture.launcher, config.id, "records resume", |c| {
        c.records > thawed_at + 2
    });

    assert_eq!(frozen.unwrap(), 1);
    assert!(frozen_after_freeze);
    assert!(held_for >= hold_limit, "thawed after {held_for:?}");
    assert_eq!(
        worker.guest_freeze_status(AGENT_TIMEOUT).unwrap(),
        GuestFreezeStatus::Thawed
    );
    assert!(!resumed.frozen);
    worker.turn_off().unwrap();
}

#[test]
fn agent_answers_ping_and_info_and_the_heartbeat_turns_ok() {
    require_kvm!();
    let fixture = Fixture::new();
    let config = define(&fixture, "beat", None);
    let (worker, _console) = boot(&fixture, &config);

    let ping = worker.guest_agent_ping(AGENT_TIMEOUT);
    let info = worker.guest_agent_info(AGENT_TIMEOUT).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while worker.guest_heartbeat() != Some(GuestHeartbeat::Ok) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let report = fixture
        .launcher
        .report(config.id, TIMEOUT)
        .unwrap()
        .unwrap();

    assert!(ping.is_ok(), "{ping:?}");
    assert!(info.version.starts_with("vmms-test-guest"), "{info:?}");
    for command in [
        "guest-sync-delimited",
        "guest-fsfreeze-freeze",
        "guest-fsfreeze-thaw",
        "guest-shutdown",
    ] {
        assert!(
            info.supported_commands.iter().any(|c| c == command),
            "{command}"
        );
    }
    assert_eq!(worker.guest_heartbeat(), Some(GuestHeartbeat::Ok));
    assert_eq!(report.guest_heartbeat, Some(GuestHeartbeat::Ok));
    worker.turn_off().unwrap();
}

#[test]
fn shutdown_goes_through_the_agent_and_the_guest_powers_off() {
    require_kvm!();
    let fixture = Fixture::new();
    let config = define(&fixture, "polite", None);
    let (worker, mut console) = boot(&fixture, &config);

    let result = worker.shutdown(TIMEOUT);

    assert!(result.is_ok(), "{result:?}");
    console.wait_for(AGENT_SHUTDOWN_LINE, 0);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match fixture
            .events
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(WorkerEvent::Stopped(reason)) => {
                assert_eq!(reason, StopReason::GuestPowerOff);
                break;
            }
            Ok(_) => {}
            Err(e) => panic!("no stop event: {e}"),
        }
    }
    worker.turn_off().unwrap();
}

#[test]
fn guest_without_agent_times_out_quickly_and_keeps_running() {
    require_kvm!();
    let fixture = Fixture::new();
    let config = define(&fixture, "mute", Some("agent=off"));
    let (worker, mut console) = boot(&fixture, &config);
    let timeout = Duration::from_millis(500);

    let started = Instant::now();
    let ping = worker.guest_agent_ping(timeout);
    let ping_took = started.elapsed();
    let freeze = worker.freeze_guest(timeout, Duration::from_secs(5));
    let shutdown = worker.shutdown(Duration::from_secs(5));
    // Booted from a file, the guest's counters are not in the report: ask its shell.
    let before = console.status_counter();
    std::thread::sleep(Duration::from_millis(200));
    let after = console.status_counter();

    assert!(
        matches!(ping, Err(WorkerError::Timeout(t)) if t == timeout),
        "{ping:?}"
    );
    assert!(ping_took < Duration::from_secs(5), "took {ping_took:?}");
    assert!(matches!(freeze, Err(WorkerError::Timeout(_))), "{freeze:?}");
    assert!(
        matches!(&shutdown, Err(WorkerError::Refused { reason }) if reason.contains("agent")),
        "{shutdown:?}"
    );
    assert!(after > before, "the guest runs on: {before} -> {after}");
    assert_eq!(worker.status(), vmm_core::WorkerStatus::Running);
    assert_eq!(worker.guest_heartbeat(), Some(GuestHeartbeat::NoContact));
    worker.turn_off().unwrap();
}

#[test]
fn a_frozen_guest_is_not_saved_until_it_is_thawed() {
    require_kvm!();
    let fixture = Fixture::new();
    let config = define(&fixture, "held", None);
    let (worker, _console) = boot(&fixture, &config);
    let vm_dir = fixture.dir.path().join("vms").join(config.id.to_string());
    let staging = vm_dir.join("state.saving");
    let state = vm_dir.join("state");
    fs::create_dir_all(&staging).unwrap();

    worker
        .freeze_guest(AGENT_TIMEOUT, Duration::from_secs(60))
        .unwrap();
    let refused = worker.save(&staging, &state);
    worker.thaw_guest(AGENT_TIMEOUT).unwrap();
    let saved = worker.save(&staging, &state);

    // A state captured while frozen would restore a guest nobody thaws.
    assert!(
        matches!(refused, Err(vmm_core::WorkerError::InvalidState { .. })),
        "{refused:?}"
    );
    saved.unwrap();
    assert!(state.is_dir(), "the thawed guest saved");
}
