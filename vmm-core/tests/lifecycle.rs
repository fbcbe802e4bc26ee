//! RequestStateChange through the whole lifecycle, refusals, and the catalog operations.

mod common;

use common::{ThreadLauncher, change, open, state_of};
use vmm_core::{
    EnabledState, Error, EventKind, HealthState, JobState, OperationalStatus, RequestedState,
    ReturnCode, VmConfig,
};

#[test]
fn full_lifecycle_shows_every_hyper_v_state_code_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let vm = vmms
        .define_system(VmConfig::new("lifecycle"))
        .expect("define");
    let events = vmms.subscribe();

    for requested in [
        RequestedState::Start,
        RequestedState::Pause,
        RequestedState::Start,
        RequestedState::Save,
        RequestedState::Start,
        RequestedState::TurnOff,
    ] {
        let job = change(&vmms, vm, requested);
        assert_eq!(
            job.state,
            JobState::Completed,
            "{requested}: {:?}",
            job.error_description
        );
    }

    let codes: Vec<u16> = events
        .try_iter()
        .filter_map(|e| match e.kind {
            EventKind::StateChanged { current, .. } => Some(current.code()),
            _ => None,
        })
        .collect();
    assert_eq!(
        codes,
        [32770, 2, 32776, 9, 32777, 2, 32773, 6, 32770, 2, 32774, 3],
        "Off→Starting→Running→Pausing→Paused→Resuming→Running→Saving→Saved→Starting→Running→Stopping→Off"
    );
}

#[test]
fn running_vm_snapshot_has_worker_pid_and_no_pending_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let vm = vmms.define_system(VmConfig::new("snap")).expect("define");

    change(&vmms, vm, RequestedState::Start);

    let snapshot = vmms.get_vm(vm).expect("vm");
    assert_eq!(snapshot.enabled_state, EnabledState::Running);
    assert_eq!(snapshot.requested_state.code(), 12);
    assert_eq!(snapshot.health_state, HealthState::Ok);
    assert_eq!(snapshot.operational_status, OperationalStatus::Ok);
    assert_eq!(snapshot.process_id, Some(launcher.guest(vm).pid()));
}

#[test]
fn invalid_transition_returns_32775_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let vm = vmms.define_system(VmConfig::new("off")).expect("define");
    let before = vmms.get_vm(vm).expect("vm");
    let jobs_before = vmms.jobs().len();

    let result = vmms
        .request_state_change(vm, RequestedState::Pause)
        .expect("vm exists");

    assert_eq!(result, (ReturnCode::InvalidState, None));
    assert_eq!(result.0.code(), 32775);
    assert_eq!(vmms.get_vm(vm).expect("vm"), before);
    assert_eq!(vmms.jobs().len(), jobs_before);
    assert_eq!(launcher.launches(), 0);
}

#[test]
fn saved_vm_restores_guest_where_it_stopped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let vm = vmms.define_system(VmConfig::new("save")).expect("define");
    change(&vmms, vm, RequestedState::Start);
    launcher.guest(vm).wait_counter_above(20);
    change(&vmms, vm, RequestedState::Save);
    let saved_counter: u64 = std::fs::read_to_string(vmms.store().state_dir(vm).join("state.json"))
        .expect("saved state written")
        .parse()
        .expect("counter");

    change(&vmms, vm, RequestedState::Start);

    assert_eq!(state_of(&vmms, vm), EnabledState::Running);
    assert!(launcher.guest(vm).counter() >= saved_counter);
    assert!(saved_counter > 20);
    assert!(
        !vmms.store().has_saved_state(vm),
        "saved state is consumed by the restore"
    );
}

#[test]
fn turning_off_a_saved_vm_discards_its_saved_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let vm = vmms
        .define_system(VmConfig::new("discard"))
        .expect("define");
    change(&vmms, vm, RequestedState::Start);
    change(&vmms, vm, RequestedState::Save);

    let job = change(&vmms, vm, RequestedState::TurnOff);

    assert_eq!(job.state, JobState::Completed);
    assert_eq!(state_of(&vmms, vm), EnabledState::Off);
    assert!(!vmms.store().has_saved_state(vm));
}

#[test]
fn reset_of_paused_vm_leaves_it_running_with_a_fresh_guest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let vm = vmms.define_system(VmConfig::new("reset")).expect("define");
    change(&vmms, vm, RequestedState::Start);
    launcher.guest(vm).wait_counter_above(10);
    change(&vmms, vm, RequestedState::Pause);

    let job = change(&vmms, vm, RequestedState::Reset);

    assert_eq!(job.state, JobState::Completed);
    assert_eq!(state_of(&vmms, vm), EnabledState::Running);
    assert!(
        launcher.guest(vm).counter() < 10,
        "guest restarted from zero"
    );
}

#[test]
fn failed_boot_ends_job_with_exception_and_vm_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    launcher.fail_launches(true);
    let vmms = open(dir.path(), &launcher);
    let vm = vmms.define_system(VmConfig::new("nokvm")).expect("define");

    let job = change(&vmms, vm, RequestedState::Start);

    assert_eq!(job.state, JobState::Exception);
    assert_eq!(job.error_code, ReturnCode::Failed.code());
    assert!(
        job.error_description
            .as_deref()
            .is_some_and(|d| d.contains("no kvm in this test"))
    );
    assert_eq!(state_of(&vmms, vm), EnabledState::Off);
}

#[test]
fn destroy_refuses_a_running_vm_and_removes_an_off_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let vm = vmms.define_system(VmConfig::new("doomed")).expect("define");
    change(&vmms, vm, RequestedState::Start);

    let refused = vmms.destroy_system(vm);
    change(&vmms, vm, RequestedState::TurnOff);
    let destroyed = vmms.destroy_system(vm);

    assert!(matches!(
        refused,
        Err(Error::NotStopped {
            state: EnabledState::Running,
            ..
        })
    ));
    assert!(destroyed.is_ok());
    assert!(matches!(vmms.get_vm(vm), Err(Error::VmNotFound(_))));
    assert!(!vmms.store().vm_dir(vm).exists());
}

#[test]
fn destroy_removes_a_saved_vm_with_its_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let vm = vmms.define_system(VmConfig::new("saved")).expect("define");
    change(&vmms, vm, RequestedState::Start);
    change(&vmms, vm, RequestedState::Save);

    vmms.destroy_system(vm).expect("destroy saved vm");

    assert!(!vmms.store().vm_dir(vm).exists());
}

#[test]
fn modify_changes_name_while_running_but_not_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let config = VmConfig::new("before");
    let vm = vmms.define_system(config.clone()).expect("define");
    change(&vmms, vm, RequestedState::Start);

    let renamed = vmms.modify_system_settings(VmConfig {
        name: "after".into(),
        ..config.clone()
    });
    let resized = vmms.modify_system_settings(VmConfig {
        memory_mib: 128,
        ..config.clone()
    });

    assert!(renamed.is_ok());
    assert!(matches!(
        resized,
        Err(Error::ChangeRequiresOff {
            setting: "memory_mib",
            ..
        })
    ));
    assert_eq!(vmms.get_vm(vm).expect("vm").name, "after");
}

#[test]
fn modify_of_off_vm_is_persisted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let config = VmConfig::new("grow");
    let vm = vmms.define_system(config.clone()).expect("define");

    vmms.modify_system_settings(VmConfig {
        memory_mib: 256,
        vcpus: 2,
        ..config
    })
    .expect("modify");

    let on_disk: VmConfig =
        serde_json::from_slice(&std::fs::read(vmms.store().config_path(vm)).expect("config file"))
            .expect("valid json");
    assert_eq!((on_disk.memory_mib, on_disk.vcpus), (256, 2));
}

#[test]
fn define_rejects_invalid_config_and_creates_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);

    let result = vmms.define_system(VmConfig {
        vcpus: 0,
        ..VmConfig::new("bad")
    });

    assert!(matches!(result, Err(Error::InvalidConfig(_))));
    assert!(vmms.list_vms().is_empty());
}

#[test]
fn unknown_vm_is_an_error_not_a_return_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let stranger = vmm_core::VmId::new_random();

    let result = vmms.request_state_change(stranger, RequestedState::Start);

    assert!(matches!(result, Err(Error::VmNotFound(id)) if id == stranger));
}

#[test]
fn job_completed_event_follows_the_final_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let vm = vmms.define_system(VmConfig::new("events")).expect("define");
    let events = vmms.subscribe();

    let job = change(&vmms, vm, RequestedState::Start);

    let kinds: Vec<EventKind> = events.try_iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            EventKind::StateChanged {
                previous: EnabledState::Off,
                current: EnabledState::Starting
            },
            EventKind::StateChanged {
                previous: EnabledState::Starting,
                current: EnabledState::Running
            },
            EventKind::JobCompleted {
                job: job.id,
                state: JobState::Completed
            },
        ]
    );
}
