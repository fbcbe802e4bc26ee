//! Many VMs in parallel; one operation per VM at a time.

mod common;

use std::thread;

use common::{TIMEOUT, ThreadLauncher, change, open, state_of};
use vmm_core::{
    EnabledState, Error, JobState, OperationalStatus, RequestedState, ReturnCode, VmConfig,
};

#[test]
fn ten_vms_change_state_concurrently() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let vms: Vec<_> = (0..10)
        .map(|i| {
            vmms.define_system(VmConfig::new(format!("vm-{i}")))
                .expect("define")
        })
        .collect();

    let jobs: Vec<_> = thread::scope(|scope| {
        let handles: Vec<_> = vms
            .iter()
            .map(|&vm| {
                let vmms = vmms.clone();
                scope.spawn(move || {
                    [
                        RequestedState::Start,
                        RequestedState::Pause,
                        RequestedState::Start,
                        RequestedState::Save,
                    ]
                    .map(|requested| change(&vmms, vm, requested).state)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });

    assert!(
        jobs.iter()
            .flatten()
            .all(|state| *state == JobState::Completed)
    );
    assert!(
        vms.iter()
            .all(|&vm| state_of(&vmms, vm) == EnabledState::Saved)
    );
    assert_eq!(launcher.launches(), 10);
}

#[test]
fn second_request_on_a_busy_vm_returns_32774_and_the_first_completes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let vm = vmms.define_system(VmConfig::new("busy")).expect("define");
    change(&vmms, vm, RequestedState::Start);
    launcher.hold_pauses(true);
    let (code, pause_job) = vmms
        .request_state_change(vm, RequestedState::Pause)
        .expect("vm");
    assert_eq!(code, ReturnCode::JobStarted);

    let second = vmms
        .request_state_change(vm, RequestedState::TurnOff)
        .expect("vm");
    let while_busy = vmms.get_vm(vm).expect("vm");
    let destroy = vmms.destroy_system(vm);
    launcher.hold_pauses(false);
    let first = vmms
        .wait_for_job(pause_job.expect("job"), TIMEOUT)
        .expect("job ends");

    assert_eq!(second, (ReturnCode::SystemInUse, None));
    assert_eq!(second.0.code(), 32774);
    assert_eq!(while_busy.enabled_state, EnabledState::Pausing);
    assert_eq!(while_busy.requested_state, RequestedState::Pause);
    assert_eq!(while_busy.operational_status, OperationalStatus::InService);
    assert!(matches!(destroy, Err(Error::Busy(_))));
    assert_eq!(first.state, JobState::Completed);
    assert_eq!(state_of(&vmms, vm), EnabledState::Paused);
}

#[test]
fn a_busy_vm_does_not_block_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let held = vmms.define_system(VmConfig::new("held")).expect("define");
    let free = vmms.define_system(VmConfig::new("free")).expect("define");
    change(&vmms, held, RequestedState::Start);
    launcher.hold_pauses(true);
    let (_, held_job) = vmms
        .request_state_change(held, RequestedState::Pause)
        .expect("vm");

    let free_job = change(&vmms, free, RequestedState::Start);
    launcher.hold_pauses(false);
    vmms.wait_for_job(held_job.expect("job"), TIMEOUT)
        .expect("held job ends");

    assert_eq!(free_job.state, JobState::Completed);
    assert_eq!(state_of(&vmms, free), EnabledState::Running);
}
