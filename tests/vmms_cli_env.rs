//! What users of virsh and docker expect from the CLI: it finds the daemon through `VMMS_STORE`,
//! prints times as ISO 8601 in JSON, and the daemon's event history outlives a restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod vmms_common;

use std::process::{Command, Stdio};

use vmms_common::{Daemon, vmms_binary};

fn vmms_with_env(daemon: &Daemon, args: &[&str]) -> std::process::Output {
    Command::new(vmms_binary())
        .args(args)
        .env("VMMS_STORE", daemon.path())
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn cli_finds_the_daemon_through_vmms_store_without_store_flag() {
    let daemon = Daemon::start_with(&["--no-cim"], &[]);

    let created = vmms_with_env(&daemon, &["new-vm", "env-vm", "--memory-mib", "16"]);
    let listed = vmms_with_env(&daemon, &["get-vm"]);

    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    assert!(String::from_utf8_lossy(&listed.stdout).contains("env-vm"));
}

#[test]
fn get_vm_json_prints_times_as_iso_8601() {
    let daemon = Daemon::start_with(&["--no-cim"], &[]);
    daemon.new_vm("iso-vm", &[]);

    let vm = daemon.vm("iso-vm");

    let changed = vm["time_of_last_state_change"].as_str().unwrap();
    let created = vm["config"]["created"].as_str().unwrap();
    for time in [changed, created] {
        assert_eq!(time.len(), 27, "{time}");
        assert_eq!(&time[4..5], "-");
        assert_eq!(&time[10..11], "T");
        assert!(time.ends_with('Z'), "{time}");
    }
}

#[test]
fn event_history_survives_a_daemon_restart() {
    let mut daemon = Daemon::start_with(&["--no-cim"], &[]);
    daemon.new_vm("history-vm", &[]);
    vmms_common::wait_until("the Defined event is recorded", || {
        !daemon.events("history-vm").is_empty()
    });
    let before = daemon.events("history-vm");

    assert!(daemon.terminate());
    daemon.spawn();
    let after = daemon.events("history-vm");

    assert_eq!(before[0]["kind"], "Defined");
    assert_eq!(after, before);
}
