//! The store across service restarts: definitions, saved state, degraded VMs, leftovers of
//! interrupted writes, re-attaching to live workers, automatic start.

mod common;

use std::fs;

use common::{TIMEOUT, ThreadLauncher, change, open, state_of, wait_for_state};
use std::sync::Arc;
use vmm_core::atomic_file::temporary_sibling;

use vmm_core::{
    AutomaticStartAction, EnabledState, Error, EventSink, HealthState, JobState, LaunchMode,
    OperationalStatus, RequestedState, ReturnCode, VirtualSystemManagementService, VmConfig, VmId,
    Worker, WorkerError, WorkerLauncher,
};

#[test]
fn defined_vm_survives_service_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let config = VmConfig::new("persistent");
    let vm = open(dir.path(), &launcher)
        .define_system(config.clone())
        .expect("define");

    let reopened = open(dir.path(), &launcher);

    let snapshot = reopened.get_vm(vm).expect("vm still defined");
    assert_eq!(snapshot.config, Some(config));
    assert_eq!(snapshot.enabled_state, EnabledState::Off);
}

#[test]
fn saved_vm_is_saved_after_service_restart_and_restores() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let vm = vmms.define_system(VmConfig::new("saved")).expect("define");
    change(&vmms, vm, RequestedState::Start);
    change(&vmms, vm, RequestedState::Save);
    drop(vmms);

    let reopened = open(dir.path(), &launcher);
    reopened.recover_on_start();
    let after_restart = state_of(&reopened, vm);
    let job = change(&reopened, vm, RequestedState::Start);

    assert_eq!(after_restart, EnabledState::Saved);
    assert_eq!(job.state, JobState::Completed);
    assert_eq!(state_of(&reopened, vm), EnabledState::Running);
}

#[test]
fn corrupt_config_degrades_only_its_own_vm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let good = vmms
        .define_system(VmConfig::new("good"))
        .expect("define good");
    let bad = vmms
        .define_system(VmConfig::new("bad"))
        .expect("define bad");
    fs::write(vmms.store().config_path(bad), b"{\"version\": 1, \"id\": ").expect("corrupt");
    drop(vmms);

    let reopened = open(dir.path(), &launcher);
    let degraded = reopened.get_vm(bad).expect("degraded vm is listed");
    let start_bad = reopened
        .request_state_change(bad, RequestedState::Start)
        .expect("vm");
    let modify_bad = reopened.modify_system_settings(VmConfig {
        id: bad,
        ..VmConfig::new("fix")
    });
    let good_job = change(&reopened, good, RequestedState::Start);

    assert_eq!(degraded.operational_status, OperationalStatus::Degraded);
    assert_eq!(degraded.operational_status.code(), 3);
    assert_eq!(degraded.health_state, HealthState::Ok);
    assert!(
        degraded
            .status_description
            .as_deref()
            .is_some_and(|t| t.contains("config.json"))
    );
    assert_eq!(degraded.config, None);
    assert_eq!(start_bad, (ReturnCode::InvalidState, None));
    assert!(matches!(modify_bad, Err(Error::Degraded(_))));
    assert_eq!(good_job.state, JobState::Completed);
    assert_eq!(reopened.list_vms().len(), 2);
}

#[test]
fn degraded_vm_can_be_destroyed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let bad = vmms.define_system(VmConfig::new("bad")).expect("define");
    fs::remove_file(vmms.store().config_path(bad)).expect("lose config");
    drop(vmms);
    let reopened = open(dir.path(), &launcher);

    reopened.destroy_system(bad).expect("destroy degraded vm");

    assert!(reopened.list_vms().is_empty());
}

#[test]
fn leftover_temporary_config_is_ignored_on_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let config = VmConfig::new("intact");
    let vm = vmms.define_system(config.clone()).expect("define");
    // A crash in the middle of a replacing write leaves a torn temporary beside the old file.
    let torn = temporary_sibling(&vmms.store().config_path(vm)).expect("temp name");
    fs::write(&torn, b"{\"name\": \"half-writ").expect("torn write");
    // And a crash during DefineSystem leaves a half-built folder under a temporary name.
    let half_defined =
        temporary_sibling(&vmms.store().vm_dir(vmm_core::VmId::new_random())).expect("temp name");
    fs::create_dir(&half_defined).expect("half-built vm folder");
    drop(vmms);

    let reopened = open(dir.path(), &launcher);

    let vms = reopened.list_vms();
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0].config, Some(config));
    assert_eq!(vms[0].operational_status, OperationalStatus::Ok);
}

#[test]
fn running_vm_is_reattached_after_service_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let vm = vmms
        .define_system(VmConfig::new("survivor"))
        .expect("define");
    change(&vmms, vm, RequestedState::Start);
    let pid = launcher.guest(vm).pid();
    drop(vmms);

    let reopened = open(dir.path(), &launcher);
    let report = reopened.recover_on_start();

    let snapshot = reopened.get_vm(vm).expect("vm");
    assert_eq!(report.reattached, [vm]);
    assert_eq!(snapshot.enabled_state, EnabledState::Running);
    assert_eq!(snapshot.process_id, Some(pid));
    assert_eq!(launcher.launches(), 1, "re-attached, not relaunched");
}

#[test]
fn reattached_worker_still_reports_to_the_new_service() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let vm = vmms
        .define_system(VmConfig::new("survivor"))
        .expect("define");
    change(&vmms, vm, RequestedState::Start);
    drop(vmms);
    let reopened = open(dir.path(), &launcher);
    reopened.recover_on_start();

    launcher.guest_power_off(vm);

    wait_for_state(&reopened, vm, EnabledState::Off);
}

#[test]
fn paused_vm_is_reattached_as_paused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let vm = vmms.define_system(VmConfig::new("paused")).expect("define");
    change(&vmms, vm, RequestedState::Start);
    change(&vmms, vm, RequestedState::Pause);
    drop(vmms);

    let reopened = open(dir.path(), &launcher);
    reopened.recover_on_start();

    assert_eq!(state_of(&reopened, vm), EnabledState::Paused);
}

#[test]
fn always_start_vm_is_started_by_recover_on_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let config = VmConfig {
        automatic_start_action: AutomaticStartAction::AlwaysStart,
        ..VmConfig::new("auto")
    };
    let vm = open(dir.path(), &launcher)
        .define_system(config)
        .expect("define");

    let reopened = open(dir.path(), &launcher);
    let report = reopened.recover_on_start();

    let (started, job) = report.auto_started[0];
    assert_eq!(started, vm);
    assert_eq!(
        reopened.wait_for_job(job, TIMEOUT).expect("job").state,
        JobState::Completed
    );
    assert_eq!(state_of(&reopened, vm), EnabledState::Running);
}

#[test]
fn start_if_previously_running_starts_only_the_vm_that_was_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let action = AutomaticStartAction::StartIfPreviouslyRunning;
    let was_running = vmms
        .define_system(VmConfig {
            automatic_start_action: action,
            ..VmConfig::new("was-running")
        })
        .expect("define");
    let was_off = vmms
        .define_system(VmConfig {
            automatic_start_action: action,
            ..VmConfig::new("was-off")
        })
        .expect("define");
    change(&vmms, was_running, RequestedState::Start);
    drop(vmms);
    // The host "reboots": every worker is gone.
    let fresh_host = ThreadLauncher::default();

    let reopened = open(dir.path(), &fresh_host);
    let report = reopened.recover_on_start();

    let started: Vec<_> = report.auto_started.iter().map(|(vm, _)| *vm).collect();
    assert_eq!(started, [was_running]);
    assert_eq!(state_of(&reopened, was_off), EnabledState::Off);
}

#[test]
fn second_recover_on_start_does_not_start_a_vm_turned_off_since() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let config = VmConfig {
        automatic_start_action: AutomaticStartAction::AlwaysStart,
        ..VmConfig::new("auto")
    };
    let vm = open(dir.path(), &launcher)
        .define_system(config)
        .expect("define");
    let vmms = open(dir.path(), &launcher);
    let (_, job) = vmms.recover_on_start().auto_started[0];
    vmms.wait_for_job(job, TIMEOUT).expect("auto start ends");
    change(&vmms, vm, RequestedState::TurnOff);

    let again = vmms.recover_on_start();

    assert_eq!(again, vmm_core::StartupReport::default());
    assert_eq!(state_of(&vmms, vm), EnabledState::Off);
}

#[test]
fn worker_saving_at_restart_is_shown_saving_and_then_saved() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let vm = vmms.define_system(VmConfig::new("saver")).expect("define");
    change(&vmms, vm, RequestedState::Start);
    launcher.start_saving(vm);
    drop(vmms);

    let reopened = open(dir.path(), &launcher);
    reopened.recover_on_start();
    let while_saving = state_of(&reopened, vm);
    launcher.finish_saving(vm, &reopened.store().state_dir(vm));
    wait_for_state(&reopened, vm, EnabledState::Saved);

    assert_eq!(while_saving, EnabledState::Saving);
    assert!(reopened.store().has_saved_state(vm));
}

#[test]
fn saved_state_beside_a_running_worker_is_discarded_at_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let vm = vmms.define_system(VmConfig::new("stale")).expect("define");
    change(&vmms, vm, RequestedState::Start);
    drop(vmms);
    // What a restore left behind when its service died before consuming it.
    let state_dir = dir.path().join(format!("vms/{vm}/state"));
    std::fs::create_dir(&state_dir).expect("stale state");
    std::fs::write(state_dir.join("state.json"), "1").expect("stale file");

    let reopened = open(dir.path(), &launcher);
    reopened.recover_on_start();

    assert_eq!(state_of(&reopened, vm), EnabledState::Running);
    assert!(
        !reopened.store().has_saved_state(vm),
        "a stale state would be a rollback"
    );
}

#[test]
fn unfinished_save_without_a_worker_is_removed_at_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let vm = vmms.define_system(VmConfig::new("torn")).expect("define");
    drop(vmms);
    let staging = dir.path().join(format!("vms/{vm}/state.saving"));
    std::fs::create_dir(&staging).expect("leftover staging");

    let reopened = open(dir.path(), &launcher);
    reopened.recover_on_start();

    assert!(!staging.exists());
    assert_eq!(state_of(&reopened, vm), EnabledState::Off);
}

/// A launcher that never reports its hand-off (one written before the hook existed).
#[derive(Debug)]
struct WithoutHandOff(ThreadLauncher);

impl WorkerLauncher for WithoutHandOff {
    fn launch(
        &self,
        vm: &VmConfig,
        mode: LaunchMode,
        events: EventSink,
    ) -> Result<Box<dyn Worker>, WorkerError> {
        self.0.launch(vm, mode, events)
    }

    fn launch_handing_off(
        &self,
        vm: &VmConfig,
        mode: LaunchMode,
        events: EventSink,
        _handed_off: &mut dyn FnMut(),
    ) -> Result<Box<dyn Worker>, WorkerError> {
        self.0.launch(vm, mode, events)
    }

    fn reattach(
        &self,
        vm: VmId,
        events: EventSink,
    ) -> Result<Option<Box<dyn Worker>>, WorkerError> {
        self.0.reattach(vm, events)
    }
}

#[test]
fn a_launcher_that_never_hands_off_still_gets_its_vm_marked_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = WithoutHandOff(ThreadLauncher::default());
    let vmms = VirtualSystemManagementService::open(dir.path(), Arc::new(launcher)).expect("open");
    let vm = vmms.define_system(VmConfig::new("quiet")).expect("define");

    let job = change(&vmms, vm, RequestedState::Start);

    assert_eq!(job.state, JobState::Completed);
    assert!(dir.path().join(format!("vms/{vm}/was-running")).exists());
}

#[test]
fn failed_start_leaves_no_was_running_marker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let config = VmConfig {
        automatic_start_action: AutomaticStartAction::StartIfPreviouslyRunning,
        ..VmConfig::new("fails")
    };
    let vm = vmms.define_system(config).expect("define");
    launcher.fail_launches(true);

    let job = change(&vmms, vm, RequestedState::Start);
    drop(vmms);
    launcher.fail_launches(false);
    let reopened = open(dir.path(), &launcher);
    let report = reopened.recover_on_start();

    assert_eq!(job.state, JobState::Exception);
    assert!(
        report.auto_started.is_empty(),
        "a VM whose start failed was never running: {report:?}"
    );
    assert_eq!(state_of(&reopened, vm), EnabledState::Off);
}

#[test]
fn reattached_worker_whose_marker_was_not_written_yet_counts_as_previously_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let config = VmConfig {
        automatic_start_action: AutomaticStartAction::StartIfPreviouslyRunning,
        ..VmConfig::new("started")
    };
    let vm = vmms.define_system(config).expect("define");
    change(&vmms, vm, RequestedState::Start);
    drop(vmms);
    // The service died after the hand-off, before the marker written beside the launch was
    // durable: the worker runs, the marker is not there.
    fs::remove_file(dir.path().join(format!("vms/{vm}/was-running"))).expect("marker written");

    let reopened = open(dir.path(), &launcher);
    let reattached = reopened.recover_on_start().reattached;
    drop(reopened);
    let fresh_host = ThreadLauncher::default();
    let after_reboot = open(dir.path(), &fresh_host);
    let started: Vec<_> = after_reboot
        .recover_on_start()
        .auto_started
        .iter()
        .map(|(vm, _)| *vm)
        .collect();

    assert_eq!(reattached, [vm]);
    assert_eq!(started, [vm], "the re-attached VM was running");
}
