//! `InitiateShutdown` as a service operation: the guest is asked, turned off when it does not
//! comply, and nothing else may change the VM while that happens.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{TIMEOUT, ThreadLauncher, change, open, state_of};
use vmm_core::{
    AutomaticRecoveryAction, EnabledState, JobState, RequestedState, ReturnCode, VmConfig,
};

fn running_vm(
    launcher: &ThreadLauncher,
) -> (
    tempfile::TempDir,
    vmm_core::VirtualSystemManagementService,
    vmm_core::VmId,
) {
    let dir = tempfile::tempdir().unwrap();
    let vmms = open(dir.path(), launcher);
    let mut config = VmConfig::new("guest");
    config.automatic_recovery_action = AutomaticRecoveryAction::None;
    let vm = vmms.define_system(config).unwrap();
    change(&vmms, vm, RequestedState::Start);
    (dir, vmms, vm)
}

#[test]
fn guest_that_complies_is_off_and_the_job_completes() {
    let launcher = ThreadLauncher::default();
    let (_dir, vmms, vm) = running_vm(&launcher);

    let (code, job) = vmms.initiate_shutdown(vm, Duration::from_secs(5)).unwrap();
    let job = vmms.wait_for_job(job.unwrap(), TIMEOUT).unwrap();

    assert_eq!(code, ReturnCode::JobStarted);
    assert_eq!(job.state, JobState::Completed);
    assert_eq!(state_of(&vmms, vm), EnabledState::Off);
    assert_eq!(
        vmms.get_vm(vm).unwrap().health_state,
        vmm_core::HealthState::Ok
    );
    assert!(!launcher.is_live(vm));
}

#[test]
fn guest_that_ignores_the_request_is_turned_off_with_a_warning() {
    let launcher = ThreadLauncher::default();
    let (_dir, vmms, vm) = running_vm(&launcher);
    launcher.ignore_shutdown(true);

    let (_, job) = vmms
        .initiate_shutdown(vm, Duration::from_millis(200))
        .unwrap();
    let job = vmms.wait_for_job(job.unwrap(), TIMEOUT).unwrap();

    assert_eq!(job.state, JobState::CompletedWithWarnings);
    assert!(
        job.error_description
            .as_deref()
            .is_some_and(|d| d.contains("did not shut down")),
        "{job:?}"
    );
    assert_eq!(state_of(&vmms, vm), EnabledState::Off);
    assert!(!launcher.is_live(vm));
}

#[test]
fn save_during_a_shutdown_is_refused_and_changes_nothing() {
    let launcher = ThreadLauncher::default();
    let (_dir, vmms, vm) = running_vm(&launcher);
    launcher.ignore_shutdown(true);
    let (_, shutdown) = vmms
        .initiate_shutdown(vm, Duration::from_millis(500))
        .unwrap();

    let (save, save_job) = vmms.request_state_change(vm, RequestedState::Save).unwrap();
    vmms.wait_for_job(shutdown.unwrap(), TIMEOUT).unwrap();

    assert_eq!((save, save_job), (ReturnCode::SystemInUse, None));
    assert_eq!(state_of(&vmms, vm), EnabledState::Off);
    assert!(!vmms.store().has_saved_state(vm));
}

#[test]
fn shutdown_of_an_off_vm_is_an_invalid_state() {
    let launcher = ThreadLauncher::default();
    let dir = tempfile::tempdir().unwrap();
    let vmms = open(dir.path(), &launcher);
    let vm = vmms.define_system(VmConfig::new("off")).unwrap();

    let answer = vmms.initiate_shutdown(vm, Duration::from_secs(1)).unwrap();

    assert_eq!(answer, (ReturnCode::InvalidState, None));
}
