//! Real worker processes (the crate's `vmms-worker` binary) booting the real test guest on KVM,
//! driven through `ProcessLauncher` and `ProcessWorker` exactly as the service drives them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::{Console, Fixture, TIMEOUT, counter, pid_alive, wait_until};
use vmm_core::{
    BootSource, LaunchMode, StopReason, VmConfig, WorkerError, WorkerEvent, WorkerLauncher,
    WorkerStatus,
};
use vmms_guest::protocol::{BANNER, STATUS_GPA};
use worker_manager::protocol::{FromWorker, PROTOCOL_VERSION, ToWorker, read_frame, write_frame};
use worker_manager::{LauncherOptions, MEMORY_FILE, STATE_FILE};

#[test]
fn launched_worker_boots_the_test_guest_and_serves_its_console() {
    require_kvm!();
    let fixture = Fixture::new();
    let vm = fixture.small_vm("console");

    let worker = fixture.boot(&vm);
    let runtime = fixture.launcher.runtime_dir(vm.id);
    let mut console = Console::attach(&runtime.console_socket());
    console.wait_for(BANNER, 0);
    let counter = console.status_counter();

    assert_eq!(worker.status(), WorkerStatus::Running);
    assert_eq!(runtime.read_pid().unwrap(), Some(worker.pid()));
    assert!(counter > 0, "the guest's main loop counts");
    worker.turn_off().unwrap();
}

#[test]
fn a_second_console_client_sees_the_banner_from_the_ring() {
    require_kvm!();
    let fixture = Fixture::new();
    let vm = fixture.small_vm("late");
    let worker = fixture.boot(&vm);
    let socket = fixture.launcher.runtime_dir(vm.id).console_socket();
    Console::attach(&socket).wait_for(BANNER, 0);

    let mut late = Console::attach(&socket);

    late.wait_for(BANNER, 0);
    worker.turn_off().unwrap();
}

#[test]
fn pause_freezes_the_guest_counter_and_resume_continues_it() {
    require_kvm!();
    let fixture = Fixture::new();
    let vm = fixture.small_vm("pause");
    let worker = fixture.boot(&vm);
    let mut console = Console::attach(&fixture.launcher.runtime_dir(vm.id).console_socket());
    console.wait_for(BANNER, 0);

    worker.pause().unwrap();
    let frozen = counter(&fixture.launcher, vm.id);
    thread::sleep(Duration::from_millis(300));
    let still = counter(&fixture.launcher, vm.id);
    let paused_status = worker.status();
    worker.resume().unwrap();
    wait_until("the counter moves again", || {
        counter(&fixture.launcher, vm.id) > frozen
    });

    assert_eq!(frozen, still);
    assert_eq!(paused_status, WorkerStatus::Paused);
    worker.turn_off().unwrap();
}

#[test]
fn saved_worker_exits_and_restore_continues_from_the_saved_counter() {
    require_kvm!();
    let fixture = Fixture::new();
    let vm = fixture.small_vm("save");
    let worker = fixture.boot(&vm);
    let mut console = Console::attach(&fixture.launcher.runtime_dir(vm.id).console_socket());
    console.wait_for(BANNER, 0);
    let before_save = console.status_counter();
    let (staging, state_dir) = fixture.save_paths(vm.id);
    let first_pid = worker.pid();

    worker.save(&staging, &state_dir).unwrap();
    let saved = saved_counter(&state_dir.join(MEMORY_FILE));
    let restored = fixture
        .launcher
        .launch(
            &vm,
            LaunchMode::RestoreSaved {
                state_dir: state_dir.clone(),
            },
            fixture.sink(),
        )
        .unwrap();
    let consumed = !state_dir.exists();
    let report = fixture.launcher.report(vm.id, TIMEOUT).unwrap().unwrap();
    let after = report.test_guest.unwrap().counter;

    assert!(!pid_alive(first_pid), "the saving worker exited");
    assert!(consumed, "the restored worker consumed the saved state");
    assert!(!staging.exists(), "the staging folder was committed");
    assert!(saved >= before_save, "saved {saved} < {before_save}");
    assert!(report.restored);
    assert!(
        after >= saved,
        "restored counter {after} is below the saved {saved}: the guest rebooted"
    );
    assert!(
        fixture.events.try_recv().is_err(),
        "a requested exit is no event"
    );
    restored.turn_off().unwrap();
}

/// The test guest's counter inside a saved memory image (RAM from address 0, in order).
fn saved_counter(memory: &Path) -> u64 {
    let image = fs::read(memory).unwrap();
    let at = STATUS_GPA as usize + 8;
    u64::from_le_bytes(image[at..at + 8].try_into().unwrap())
}

#[test]
fn saved_state_folder_holds_state_and_memory() {
    require_kvm!();
    let fixture = Fixture::new();
    let vm = fixture.small_vm("files");
    let worker = fixture.boot(&vm);
    let (staging, state_dir) = fixture.save_paths(vm.id);

    worker.save(&staging, &state_dir).unwrap();

    let memory = fs::metadata(state_dir.join(MEMORY_FILE)).unwrap().len();
    let state: serde_json::Value =
        serde_json::from_slice(&fs::read(state_dir.join(STATE_FILE)).unwrap()).unwrap();
    assert_eq!(memory, 16 << 20);
    assert_eq!(state["vcpus"].as_array().map(Vec::len), Some(1));
}

#[test]
fn guest_halt_is_reported_as_power_off_and_turn_off_reaps_the_worker() {
    require_kvm!();
    let fixture = Fixture::new();
    let vm = fixture.small_vm("halt");
    let worker = fixture.boot(&vm);
    let runtime = fixture.launcher.runtime_dir(vm.id);
    let mut console = Console::attach(&runtime.console_socket());
    console.wait_for(BANNER, 0);
    let pid = worker.pid();

    console.send("halt\r");
    let event = fixture.next_event();
    worker.turn_off().unwrap();

    assert_eq!(event, WorkerEvent::Stopped(StopReason::GuestPowerOff));
    assert!(!pid_alive(pid));
    assert!(
        !runtime.control_socket().exists()
            && !runtime.console_socket().exists()
            && !runtime.pid_file().exists(),
        "a clean exit leaves no live files"
    );
}

#[test]
fn guest_reboot_is_reported_as_reset() {
    require_kvm!();
    let fixture = Fixture::new();
    let vm = fixture.small_vm("reboot");
    let worker = fixture.boot(&vm);
    let mut console = Console::attach(&fixture.launcher.runtime_dir(vm.id).console_socket());
    console.wait_for(BANNER, 0);

    console.send("reboot\r");

    assert_eq!(
        fixture.next_event(),
        WorkerEvent::Stopped(StopReason::GuestReset)
    );
    worker.turn_off().unwrap();
}

#[test]
fn reset_request_reboots_the_guest_in_the_same_worker() {
    require_kvm!();
    let fixture = Fixture::new();
    let vm = fixture.small_vm("reset");
    let worker = fixture.boot(&vm);
    let mut console = Console::attach(&fixture.launcher.runtime_dir(vm.id).console_socket());
    let after_first_banner = console.wait_for(BANNER, 0);
    let pid = worker.pid();

    worker.reset().unwrap();

    console.wait_for(BANNER, after_first_banner);
    assert_eq!(worker.pid(), pid);
    assert_eq!(worker.status(), WorkerStatus::Running);
    worker.turn_off().unwrap();
}

#[test]
fn killed_worker_is_reported_with_its_signal_at_once() {
    require_kvm!();
    let fixture = Fixture::new();
    let vm = fixture.small_vm("kill");
    let worker = fixture.boot(&vm);
    let started = Instant::now();

    // SAFETY: kill only sends a signal to the worker we started.
    unsafe { libc::kill(worker.pid() as i32, libc::SIGKILL) };
    let event = fixture.next_event();

    assert_eq!(
        event,
        WorkerEvent::Stopped(StopReason::WorkerExited {
            code: None,
            signal: Some(libc::SIGKILL)
        })
    );
    assert!(started.elapsed() < Duration::from_secs(2), "seen at once");
    assert!(matches!(worker.turn_off(), Ok(()) | Err(WorkerError::Gone)));
}

#[test]
fn stopped_worker_is_reported_not_responding_then_hung() {
    require_kvm!();
    let fixture = Fixture::with_options(LauncherOptions {
        heartbeat_interval: Duration::from_millis(100),
        heartbeat_timeout: Duration::from_millis(800),
        hang_timeout: Duration::from_millis(2000),
        ..LauncherOptions::default()
    });
    let vm = fixture.small_vm("hang");
    let worker = fixture.boot(&vm);

    // SAFETY: kill only sends a signal to the worker we started.
    unsafe { libc::kill(worker.pid() as i32, libc::SIGSTOP) };
    let first = fixture.next_event();
    let second = fixture.next_event();
    worker.turn_off().unwrap();

    assert!(
        matches!(&first, WorkerEvent::NotResponding { silent_for }
            if *silent_for >= Duration::from_millis(800)),
        "{first:?}"
    );
    assert!(
        matches!(&second, WorkerEvent::Hung { silent_for }
            if *silent_for >= Duration::from_millis(2000)),
        "{second:?}"
    );
    assert!(!pid_alive(worker.pid()), "turn-off kills a hung worker");
}

#[test]
fn worker_that_answers_again_is_reported_responding_and_kept() {
    require_kvm!();
    let fixture = Fixture::with_options(LauncherOptions {
        heartbeat_interval: Duration::from_millis(100),
        heartbeat_timeout: Duration::from_millis(800),
        ..LauncherOptions::default()
    });
    let vm = fixture.small_vm("pause-process");
    let worker = fixture.boot(&vm);
    let pid = worker.pid() as i32;

    // SAFETY: kill only sends signals to the worker we started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let silent = fixture.next_event();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let back = fixture.next_event();
    let status = worker.status();

    assert!(
        matches!(silent, WorkerEvent::NotResponding { .. }),
        "{silent:?}"
    );
    assert_eq!(back, WorkerEvent::Responding);
    assert_eq!(status, WorkerStatus::Running);
    assert!(
        pid_alive(worker.pid()),
        "a worker that was only stopped keeps its guest"
    );
    worker.turn_off().unwrap();
}

#[test]
fn reattach_finds_a_detached_worker_and_forgets_a_dead_one() {
    require_kvm!();
    let fixture = Fixture::new();
    let vm = fixture.small_vm("reattach");
    let worker = fixture.boot(&vm);
    let pid = worker.pid();
    drop(worker);
    let runtime = fixture.launcher.runtime_dir(vm.id);

    let found = fixture.launcher.reattach(vm.id, fixture.sink()).unwrap();
    let found = found.expect("a live worker");
    let found_pid = found.pid();
    let found_status = found.status();
    // SAFETY: kill only sends a signal to the worker we started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_until("the worker is gone", || !pid_alive(pid));
    drop(found);
    let stale = fixture.launcher.reattach(vm.id, fixture.sink()).unwrap();

    assert_eq!(found_pid, pid);
    assert_eq!(found_status, WorkerStatus::Running);
    assert!(stale.is_none());
    assert_eq!(runtime.read_pid().unwrap(), None, "stale pid file removed");
    assert!(!runtime.control_socket().exists());
}

#[test]
fn missing_kernel_fails_the_launch_with_the_workers_reason() {
    require_kvm!();
    let fixture = Fixture::new();
    let mut vm = VmConfig::new("nokernel");
    vm.memory_mib = 16;
    vm.boot = BootSource::Kernel {
        kernel: "/nonexistent/vmlinux".into(),
        initrd: None,
        cmdline: "console=ttyS0".into(),
    };
    fixture.define(&vm);

    let error = fixture
        .launcher
        .launch(&vm, LaunchMode::Boot, fixture.sink())
        .unwrap_err();

    let text = vmm_core::error_chain(&error);
    assert!(text.contains("/nonexistent/vmlinux"), "{text}");
    assert!(!fixture.launcher.runtime_dir(vm.id).pid_file().exists());
}

#[test]
fn second_launch_for_a_running_vm_is_refused() {
    require_kvm!();
    let fixture = Fixture::new();
    let vm = fixture.small_vm("twice");
    let worker = fixture.boot(&vm);

    let second = fixture
        .launcher
        .launch(&vm, LaunchMode::Boot, fixture.sink());

    let text = vmm_core::error_chain(&second.unwrap_err());
    assert!(text.contains("already runs"), "{text}");
    worker.turn_off().unwrap();
}

#[test]
fn worker_refuses_another_protocol_version() {
    require_kvm!();
    let fixture = Fixture::new();
    let vm = fixture.small_vm("version");
    let worker = fixture.boot(&vm);
    let mut stream =
        UnixStream::connect(fixture.launcher.runtime_dir(vm.id).control_socket()).unwrap();

    write_frame(
        &mut stream,
        &ToWorker::Hello {
            version: PROTOCOL_VERSION + 1,
        },
    )
    .unwrap();
    let answer: Option<FromWorker> = read_frame(&mut stream).unwrap();

    assert!(
        matches!(answer, Some(FromWorker::Refused { .. })),
        "{answer:?}"
    );
    assert_eq!(
        worker.status(),
        WorkerStatus::Running,
        "the guest is unaffected"
    );
    worker.turn_off().unwrap();
}

#[test]
fn garbage_on_the_control_socket_drops_only_that_connection() {
    require_kvm!();
    let fixture = Fixture::new();
    let vm = fixture.small_vm("garbage");
    let worker = fixture.boot(&vm);
    let mut stream =
        UnixStream::connect(fixture.launcher.runtime_dir(vm.id).control_socket()).unwrap();

    stream.write_all(&[0xff, 0xff, 0xff, 0x7f, b'{']).unwrap();
    let mut rest = Vec::new();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let closed = stream.read_to_end(&mut rest).is_ok();

    assert!(closed, "the worker closes a connection that sent garbage");
    assert_eq!(worker.status(), WorkerStatus::Running);
    worker.turn_off().unwrap();
}

#[test]
fn worker_program_that_dies_at_start_up_fails_the_launch_with_its_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let launcher = worker_manager::ProcessLauncher::new(dir.path(), "false", Vec::<String>::new());
    let vm = VmConfig::new("broken");
    let sink = vmm_core::EventSink::new(vm.id, |_| true);

    let error = launcher.launch(&vm, LaunchMode::Boot, sink).unwrap_err();

    let text = vmm_core::error_chain(&error);
    assert!(
        text.contains("worker ended during start-up (exit code 1)"),
        "{text}"
    );
}

#[test]
fn missing_worker_program_fails_the_launch_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let launcher =
        worker_manager::ProcessLauncher::new(dir.path(), "/nonexistent/worker", ["worker"]);
    let vm = VmConfig::new("nowhere");
    let sink = vmm_core::EventSink::new(vm.id, |_| true);

    let error = launcher.launch(&vm, LaunchMode::Boot, sink).unwrap_err();

    let text = vmm_core::error_chain(&error);
    assert!(text.contains("/nonexistent/worker"), "{text}");
}
