//! What the service does when workers report on their own: crash, guest power-off, guest reset.

mod common;

use common::{TIMEOUT, ThreadLauncher, change, expect_event, open, state_of, wait_for_state};
use std::time::Duration;

use vmm_core::{
    AutomaticRecoveryAction, EnabledState, EventKind, HealthState, JobKind, RequestedState,
    StopReason, VmConfig, WorkerEvent,
};

fn config(name: &str, recovery: AutomaticRecoveryAction) -> VmConfig {
    VmConfig {
        automatic_recovery_action: recovery,
        ..VmConfig::new(name)
    }
}

#[test]
fn lost_worker_turns_vm_off_with_critical_health_and_an_event() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let vm = vmms
        .define_system(config("fragile", AutomaticRecoveryAction::None))
        .expect("define");
    change(&vmms, vm, RequestedState::Start);
    let events = vmms.subscribe();

    launcher.kill_worker(vm);

    let lost = expect_event(&events, vm, |k| matches!(k, EventKind::WorkerLost { .. }));
    wait_for_state(&vmms, vm, EnabledState::Off);
    let snapshot = vmms.get_vm(vm).expect("vm");
    assert_eq!(
        lost,
        EventKind::WorkerLost {
            reason: StopReason::WorkerExited {
                code: None,
                signal: Some(9)
            }
        }
    );
    assert_eq!(snapshot.health_state, HealthState::CriticalFailure);
    assert_eq!(snapshot.health_state.code(), 25);
    assert_eq!(snapshot.process_id, None);
    assert_eq!(
        launcher.launches(),
        1,
        "recovery action None does not restart"
    );
}

#[test]
fn lost_worker_with_restart_recovery_runs_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let vm = vmms
        .define_system(config("phoenix", AutomaticRecoveryAction::Restart))
        .expect("define");
    change(&vmms, vm, RequestedState::Start);
    let first_pid = launcher.guest(vm).pid();
    let events = vmms.subscribe();

    launcher.kill_worker(vm);

    expect_event(&events, vm, |k| {
        *k == EventKind::HealthChanged {
            previous: HealthState::Ok,
            current: HealthState::CriticalFailure,
        }
    });
    expect_event(&events, vm, |k| {
        *k == EventKind::StateChanged {
            previous: EnabledState::Running,
            current: EnabledState::Off,
        }
    });
    expect_event(&events, vm, |k| {
        matches!(
            k,
            EventKind::RecoveryStarted {
                action: AutomaticRecoveryAction::Restart
            }
        )
    });
    let job = match expect_event(&events, vm, |k| matches!(k, EventKind::JobCompleted { .. })) {
        EventKind::JobCompleted { job, .. } => job,
        other => unreachable!("filtered for JobCompleted, got {other:?}"),
    };
    let snapshot = vmms.get_vm(vm).expect("vm");
    assert_eq!(vmms.job(job).expect("job").kind, JobKind::RecoveryRestart);
    assert_eq!(snapshot.enabled_state, EnabledState::Running);
    assert_eq!(snapshot.health_state, HealthState::Ok);
    assert_ne!(snapshot.process_id, Some(first_pid));
    assert_eq!(launcher.launches(), 2);
}

#[test]
fn crash_looping_guest_is_left_off_after_the_restart_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let vm = vmms
        .define_system(config("looper", AutomaticRecoveryAction::Restart))
        .expect("define");
    change(&vmms, vm, RequestedState::Start);
    let events = vmms.subscribe();

    for _ in 0..vmm_core::MAX_RECOVERY_RESTARTS {
        launcher.kill_worker(vm);
        expect_event(&events, vm, |k| matches!(k, EventKind::JobCompleted { .. }));
        wait_for_state(&vmms, vm, EnabledState::Running);
    }
    launcher.kill_worker(vm);

    let skipped = expect_event(&events, vm, |k| {
        matches!(k, EventKind::RecoverySkipped { .. })
    });
    wait_for_state(&vmms, vm, EnabledState::Off);
    assert!(matches!(
        skipped,
        EventKind::RecoverySkipped {
            action: AutomaticRecoveryAction::Restart,
            ..
        }
    ));
    assert_eq!(launcher.launches(), 1 + vmm_core::MAX_RECOVERY_RESTARTS);
}

#[test]
fn revert_without_a_snapshot_service_is_skipped_and_says_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let recovery = AutomaticRecoveryAction::RevertToSnapshot;
    let vm = vmms
        .define_system(config("revert", recovery))
        .expect("define");
    change(&vmms, vm, RequestedState::Start);
    let events = vmms.subscribe();

    launcher.kill_worker(vm);

    let skipped = expect_event(&events, vm, |k| {
        matches!(k, EventKind::RecoverySkipped { .. })
    });
    wait_for_state(&vmms, vm, EnabledState::Off);
    assert!(
        matches!(skipped, EventKind::RecoverySkipped { reason, .. } if reason.contains("no snapshot service"))
    );
}

#[test]
fn guest_power_off_turns_vm_off_with_health_ok() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let vm = vmms
        .define_system(config("polite", AutomaticRecoveryAction::Restart))
        .expect("define");
    change(&vmms, vm, RequestedState::Start);

    launcher.guest_power_off(vm);

    wait_for_state(&vmms, vm, EnabledState::Off);
    let snapshot = vmms.get_vm(vm).expect("vm");
    assert_eq!(snapshot.health_state, HealthState::Ok);
    assert_eq!(snapshot.process_id, None);
    assert_eq!(
        launcher.launches(),
        1,
        "a guest power-off is not a failure to recover from"
    );
}

#[test]
fn guest_reset_restarts_the_worker_and_keeps_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let vm = vmms
        .define_system(config("rebooter", AutomaticRecoveryAction::None))
        .expect("define");
    change(&vmms, vm, RequestedState::Start);
    let first_pid = launcher.guest(vm).pid();
    let events = vmms.subscribe();

    launcher.guest_reset(vm);

    let deadline = std::time::Instant::now() + TIMEOUT;
    while launcher.launches() < 2 || !launcher.is_live(vm) {
        assert!(
            std::time::Instant::now() < deadline,
            "worker not relaunched"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    wait_for_state(&vmms, vm, EnabledState::Running);
    let snapshot = vmms.get_vm(vm).expect("vm");
    assert_ne!(snapshot.process_id, Some(first_pid));
    assert_eq!(snapshot.process_id, Some(launcher.guest(vm).pid()));
    assert_eq!(snapshot.health_state, HealthState::Ok);
    let state_changes = events
        .try_iter()
        .filter(|e| matches!(e.kind, EventKind::StateChanged { .. }))
        .count();
    assert_eq!(
        state_changes, 0,
        "a guest reboot keeps the VM Running throughout"
    );
}

#[test]
fn worker_lost_during_an_operation_is_handled_when_it_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let vm = vmms
        .define_system(config("mid-op", AutomaticRecoveryAction::None))
        .expect("define");
    change(&vmms, vm, RequestedState::Start);
    launcher.hold_pauses(true);
    let (_, job) = vmms
        .request_state_change(vm, RequestedState::Pause)
        .expect("vm");

    launcher.kill_worker(vm);
    let while_busy = state_of(&vmms, vm);
    launcher.hold_pauses(false);
    let job = vmms
        .wait_for_job(job.expect("job"), TIMEOUT)
        .expect("job ends");

    wait_for_state(&vmms, vm, EnabledState::Off);
    assert_eq!(
        while_busy,
        EnabledState::Pausing,
        "held until the pause ends"
    );
    assert_eq!(job.state, vmm_core::JobState::Exception);
    assert_eq!(
        vmms.get_vm(vm).expect("vm").health_state,
        HealthState::CriticalFailure
    );
}

#[test]
fn stale_events_from_a_replaced_worker_are_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let vm = vmms
        .define_system(config("stale", AutomaticRecoveryAction::None))
        .expect("define");
    change(&vmms, vm, RequestedState::Start);
    let old_guest = launcher.guest(vm);
    change(&vmms, vm, RequestedState::TurnOff);
    change(&vmms, vm, RequestedState::Start);

    let events = vmms.subscribe();

    // The first worker's sink fires late (its exit notice raced the turn-off), then the current
    // guest powers off; events are handled in order, so the stale one has been seen by then.
    old_guest.report(StopReason::TripleFault);
    launcher.guest_power_off(vm);

    wait_for_state(&vmms, vm, EnabledState::Off);
    assert_eq!(vmms.get_vm(vm).expect("vm").health_state, HealthState::Ok);
    assert!(
        events
            .try_iter()
            .all(|e| !matches!(e.kind, EventKind::WorkerLost { .. }))
    );
}

#[test]
fn silent_worker_is_shown_major_failure_and_healthy_again_when_it_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let vm = vmms
        .define_system(config("quiet", AutomaticRecoveryAction::Restart))
        .expect("define");
    change(&vmms, vm, RequestedState::Start);
    let events = vmms.subscribe();
    let guest = launcher.guest(vm);

    guest.send(WorkerEvent::NotResponding {
        silent_for: Duration::from_secs(5),
    });
    expect_event(&events, vm, |k| {
        matches!(k, EventKind::WorkerNotResponding { .. })
    });
    let silent = vmms.get_vm(vm).expect("vm");
    guest.send(WorkerEvent::Responding);
    expect_event(&events, vm, |k| *k == EventKind::WorkerResponding);
    let back = vmms.get_vm(vm).expect("vm");

    assert_eq!(silent.health_state.code(), 20);
    assert_eq!(silent.enabled_state, EnabledState::Running);
    assert_eq!(back.health_state, HealthState::Ok);
    assert_eq!(
        back.process_id,
        Some(guest.pid()),
        "nothing was done to the worker"
    );
}

#[test]
fn hung_worker_is_left_alone_when_the_recovery_action_is_none() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let vm = vmms
        .define_system(config("patient", AutomaticRecoveryAction::None))
        .expect("define");
    change(&vmms, vm, RequestedState::Start);
    let guest = launcher.guest(vm);

    guest.send(WorkerEvent::NotResponding {
        silent_for: Duration::from_secs(5),
    });
    guest.send(WorkerEvent::Hung {
        silent_for: Duration::from_secs(30),
    });
    wait_for_health(&vmms, vm, HealthState::MajorFailure);

    assert_eq!(state_of(&vmms, vm), EnabledState::Running);
    assert!(launcher.is_live(vm), "the worker was not killed");
}

#[test]
fn hung_worker_is_restarted_when_the_recovery_action_is_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let vm = vmms
        .define_system(config("stuck", AutomaticRecoveryAction::Restart))
        .expect("define");
    change(&vmms, vm, RequestedState::Start);
    let first = launcher.guest(vm).pid();
    let events = vmms.subscribe();

    launcher.guest(vm).send(WorkerEvent::Hung {
        silent_for: Duration::from_secs(30),
    });
    expect_event(&events, vm, |k| {
        matches!(k, EventKind::RecoveryStarted { .. })
    });
    wait_for_state(&vmms, vm, EnabledState::Running);

    assert_ne!(launcher.guest(vm).pid(), first);
}

fn wait_for_health(
    vmms: &vmm_core::VirtualSystemManagementService,
    vm: vmm_core::VmId,
    health: HealthState,
) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    while vmms.get_vm(vm).expect("vm").health_state != health {
        assert!(
            std::time::Instant::now() < deadline,
            "health never became {health:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}
