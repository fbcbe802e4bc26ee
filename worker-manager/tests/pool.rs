//! The launcher's pool of pre-started workers: a VM starts on an idle worker, which runs it like
//! any worker (console, confinement, control, turn-off), the pool refills behind it, and idle
//! workers end with the launcher that started them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;

use common::{Console, Fixture, TIMEOUT, pid_alive, wait_until};
use vmm_core::{VmConfig, WorkerLauncher, WorkerStatus};
use vmms_guest::protocol::BANNER;
use worker_manager::LauncherOptions;

#[test]
fn a_vm_starts_on_the_idle_pool_worker_and_the_pool_refills() {
    require_kvm!();
    let fixture = Fixture::new();
    let idle = fixture.launcher.idle_workers();
    let vm = fixture.small_vm("pooled");

    let worker = fixture.boot(&vm);
    let mut console = Console::attach(&fixture.launcher.runtime_dir(vm.id).console_socket());
    console.wait_for(BANNER, 0);
    let mut refilled = Vec::new();
    wait_until("the pool has a new idle worker", || {
        refilled = fixture.launcher.idle_workers();
        !refilled.is_empty()
    });
    let report = fixture
        .launcher
        .report(vm.id, TIMEOUT)
        .expect("attached")
        .expect("report");

    assert_eq!(idle, vec![worker.pid()], "the VM runs on the idle worker");
    assert!(!refilled.contains(&worker.pid()));
    assert_eq!(worker.status(), WorkerStatus::Running);
    assert!(report.confinement.enabled && report.confinement.seccomp);
    assert!(report.confinement.no_new_privs);
    let log = fs::read_to_string(fixture.launcher.runtime_dir(vm.id).log_file()).unwrap();
    assert!(log.contains("(pool worker)"), "{log}");
    worker.turn_off().unwrap();
    wait_until("the worker exits", || !pid_alive(worker.pid()));
}

#[test]
fn a_started_pool_worker_leaves_no_idle_folder_and_its_log_replaces_the_previous_one() {
    require_kvm!();
    let fixture = Fixture::new();
    let vm = fixture.small_vm("twice");
    let first = fixture.boot(&vm);
    first.turn_off().unwrap();
    wait_until("the first worker exits", || !pid_alive(first.pid()));
    wait_until("the pool refills", || {
        !fixture.launcher.idle_workers().is_empty()
    });

    let second = fixture.boot(&vm);
    let mut idle = Vec::new();
    wait_until("the pool refills again", || {
        idle = fixture.launcher.idle_workers();
        !idle.is_empty()
    });

    let mut pool_folders: Vec<String> = fs::read_dir(fixture.dir.path().join("run"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.starts_with("pool-"))
        .collect();
    pool_folders.sort();
    let mut expected: Vec<String> = idle.iter().map(|pid| format!("pool-{pid}")).collect();
    expected.sort();
    assert_eq!(pool_folders, expected, "only idle workers have a folder");
    let runtime = fixture.launcher.runtime_dir(vm.id);
    let log = fs::read_to_string(runtime.log_file()).unwrap();
    assert!(log.contains(&format!("pid {}", second.pid())), "{log}");
    assert!(!log.contains(&format!("pid {}", first.pid())), "{log}");
    assert!(!runtime.previous_log_file().exists());
    second.turn_off().unwrap();
}

#[test]
fn a_pool_worker_given_a_vm_that_already_runs_is_killed_and_touches_nothing_of_it() {
    require_kvm!();
    let fixture = Fixture::new();
    let vm = fixture.small_vm("taken");
    let running = fixture.boot(&vm);
    let mut idle = Vec::new();
    wait_until("the pool refills", || {
        idle = fixture.launcher.idle_workers();
        !idle.is_empty()
    });
    let runtime = fixture.launcher.runtime_dir(vm.id);
    let log_before = fs::read_to_string(runtime.log_file()).unwrap();

    let second = fixture
        .launcher
        .launch(&vm, vmm_core::LaunchMode::Boot, fixture.sink());

    let text = vmm_core::error_chain(&second.map(|_| ()).expect_err("refused"));
    assert!(text.contains("already runs"), "{text}");
    for pid in &idle {
        assert!(!pid_alive(*pid), "the taken pool worker {pid} is gone");
        assert!(!fixture.dir.path().join(format!("run/pool-{pid}")).exists());
    }
    assert_eq!(fs::read_to_string(runtime.log_file()).unwrap(), log_before);
    let mut console = Console::attach(&runtime.console_socket());
    console.wait_for(BANNER, 0);
    assert_eq!(running.status(), WorkerStatus::Running);
    running.turn_off().unwrap();
}

#[test]
fn a_pool_worker_whose_files_cannot_be_moved_is_replaced_by_a_spawned_worker() {
    require_kvm!();
    let fixture = Fixture::new();
    let first = fixture.small_vm("first");
    fixture.boot(&first).turn_off().unwrap();
    let mut idle = Vec::new();
    wait_until("the pool has an idle worker", || {
        idle = fixture.launcher.idle_workers();
        !idle.is_empty()
    });
    let tampered = fixture.dir.path().join(format!("run/pool-{}", idle[0]));
    fs::remove_file(tampered.join("control.sock")).unwrap();
    let vm = fixture.small_vm("second");

    let worker = fixture.boot(&vm);

    let mut console = Console::attach(&fixture.launcher.runtime_dir(vm.id).console_socket());
    console.wait_for(BANNER, 0);
    assert_ne!(worker.pid(), idle[0]);
    assert!(!pid_alive(idle[0]), "the tampered pool worker is gone");
    assert!(!tampered.exists());
    worker.turn_off().unwrap();
}

/// The size in KiB of each mapping of process `pid`.
fn mapping_sizes_kib(pid: u32) -> Vec<u64> {
    fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("Size:"))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

#[test]
fn a_pool_worker_builds_the_vm_it_created_while_idle_to_the_assigned_config() {
    require_kvm!();
    let fixture = Fixture::new();
    let idle = fixture.launcher.idle_workers();
    let mut config = VmConfig::new("sized");
    config.memory_mib = 48;
    config.vcpus = 2;
    fixture.define(&config);

    let worker = fixture.boot(&config);
    let mut console = Console::attach(&fixture.launcher.runtime_dir(config.id).console_socket());
    console.wait_for(BANNER, 0);
    let mut counted = 0;
    wait_until("the guest counts", || {
        counted = common::counter(&fixture.launcher, config.id);
        counted > 0
    });
    let log = fs::read_to_string(fixture.launcher.runtime_dir(config.id).log_file()).unwrap();

    assert_eq!(idle, vec![worker.pid()], "the VM runs on the idle worker");
    assert!(
        log.contains("building into the VM created while idle"),
        "{log}"
    );
    assert!(
        mapping_sizes_kib(worker.pid()).contains(&(48 << 10)),
        "the guest's memory is the assigned VM's 48 MiB"
    );
    assert!(counted > 0);
    worker.turn_off().unwrap();
    wait_until("the worker exits", || !pid_alive(worker.pid()));
}

/// Boots `config` on the idle pool worker once the pool holds one that is not `not`, and waits
/// until its guest counts; the worker and its log.
fn boot_on_next_idle(
    fixture: &Fixture,
    config: &VmConfig,
    not: Option<u32>,
) -> (Box<dyn vmm_core::Worker>, String) {
    wait_until("a fresh idle worker", || {
        let idle = fixture.launcher.idle_workers();
        !idle.is_empty() && idle.iter().all(|&pid| Some(pid) != not)
    });
    let worker = fixture.boot(config);
    wait_until("the guest counts", || {
        let report = fixture.launcher.report(config.id, TIMEOUT);
        report
            .and_then(Result::ok)
            .and_then(|r| r.test_guest)
            .is_some_and(|guest| guest.counter > 0)
    });
    let log = fs::read_to_string(fixture.launcher.runtime_dir(config.id).log_file()).unwrap();
    (worker, log)
}

#[test]
fn idle_workers_build_their_vm_out_to_the_shape_started_last_and_serve_any_shape() {
    require_kvm!();
    let fixture = Fixture::new();
    let sized = |name: &str, memory_mib: u64, vcpus: u8| {
        let mut config = VmConfig::new(name);
        config.memory_mib = memory_mib;
        config.vcpus = vcpus;
        fixture.define(&config);
        config
    };
    let (first, second, other) = (sized("a", 48, 2), sized("b", 48, 2), sized("c", 16, 1));

    let (a, _) = boot_on_next_idle(&fixture, &first, None);
    let (b, b_log) = boot_on_next_idle(&fixture, &second, Some(a.pid()));
    let (c, c_log) = boot_on_next_idle(&fixture, &other, Some(b.pid()));

    assert!(
        b_log.contains("built out to 48 MiB, 2 vCPUs"),
        "the worker after a 48 MiB, 2-vCPU start prepared that shape: {b_log}"
    );
    assert!(mapping_sizes_kib(b.pid()).contains(&(48 << 10)));
    assert!(
        c_log.contains("built out to 48 MiB, 2 vCPUs"),
        "prepared for the last shape: {c_log}"
    );
    // The idle shape's VM is torn down off the worker's thread, and until its 48 MiB are
    // unmapped the kernel may show them merged with the guest's own adjacent mapping; after,
    // the guest's shows as at least (merges with other anonymous mappings), not exactly, 16 MiB.
    wait_until("a VM of another shape has its own memory", || {
        mapping_sizes_kib(c.pid())
            .iter()
            .any(|&kib| (16 << 10..48 << 10).contains(&kib))
    });
    for worker in [a, b, c] {
        worker.turn_off().unwrap();
    }
}

#[test]
fn a_pool_worker_that_cannot_start_its_vm_says_why_and_the_next_start_works() {
    require_kvm!();
    let fixture = Fixture::new();
    let mut broken = VmConfig::new("broken");
    broken.memory_mib = 16;
    broken.disks = vec![vmm_core::DiskConfig {
        path: "missing.qcow2".into(),
        read_only: false,
    }];
    fixture.define(&broken);
    let good = fixture.small_vm("good");

    let failed = fixture
        .launcher
        .launch(&broken, vmm_core::LaunchMode::Boot, fixture.sink())
        .map(|_| ())
        .expect_err("the start fails");
    wait_until("the pool refills", || {
        !fixture.launcher.idle_workers().is_empty()
    });
    let worker = fixture.boot(&good);

    let why = vmm_core::error_chain(&failed);
    assert!(why.contains("missing.qcow2"), "{why}");
    assert_eq!(worker.status(), WorkerStatus::Running);
    worker.turn_off().unwrap();
}

#[test]
fn idle_pool_workers_exit_when_their_launcher_goes_away() {
    require_kvm!();
    let fixture = Fixture::with_options(LauncherOptions {
        pool_size: 2,
        ..LauncherOptions::default()
    });
    wait_until("two workers are idle", || {
        fixture.launcher.idle_workers().len() == 2
    });
    let idle = fixture.launcher.idle_workers();

    drop(fixture);

    for pid in idle {
        wait_until("the idle worker exits", || !pid_alive(pid));
    }
}

#[test]
fn idle_pool_workers_leave_no_folder_when_their_launcher_goes_away() {
    require_kvm!();
    let store = tempfile::tempdir().unwrap();
    let launcher = worker_manager::ProcessLauncher::new(
        store.path(),
        env!("CARGO_BIN_EXE_vmms-worker"),
        Vec::<String>::new(),
    );
    launcher.fill_pool();
    wait_until("a worker is idle", || !launcher.idle_workers().is_empty());
    let idle = launcher.idle_workers();

    drop(launcher);

    for pid in idle {
        wait_until("the idle worker exits", || !pid_alive(pid));
        let folder = store.path().join(format!("run/pool-{pid}"));
        wait_until("its folder is removed", || !folder.exists());
    }
}

#[test]
fn pool_size_zero_starts_no_idle_worker() {
    require_kvm!();
    let fixture = Fixture::with_options(LauncherOptions {
        pool_size: 0,
        ..LauncherOptions::default()
    });
    let vm = fixture.small_vm("unpooled");

    let worker = fixture.boot(&vm);

    assert!(fixture.launcher.idle_workers().is_empty());
    assert!(fixture.launcher.pool_error().is_none());
    assert_eq!(worker.status(), WorkerStatus::Running);
    worker.turn_off().unwrap();
}
