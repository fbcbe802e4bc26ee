//! The reference daemon and CLI end to end: a real `vmms serve`, real worker processes, the real
//! test guest, driven only through the CLI a user types.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod vmms_common;

use std::thread;
use std::time::Duration;

use vmms_common::{Daemon, alive};

#[test]
fn full_lifecycle_through_the_cli_shows_each_enabled_state() {
    require_kvm!();
    let daemon = Daemon::start();

    let created = daemon.new_vm("web1", &[]);
    let id = created["id"].as_str().unwrap().to_owned();
    daemon.ok(&["start-vm", "web1"]);
    let running = daemon.vm("web1");
    let booted_pid = running["process_id"].as_u64().unwrap();
    let before_pause = daemon.counter_above("web1", 0);

    daemon.ok(&["suspend-vm", "web1"]);
    let paused = daemon.vm("web1");
    let frozen = daemon.counter("web1");
    thread::sleep(Duration::from_millis(300));
    let still_frozen = daemon.counter("web1");

    daemon.ok(&["resume-vm", "web1"]);
    let resumed = daemon.vm("web1");
    let after_resume = daemon.counter_above("web1", frozen);

    daemon.ok(&["save-vm", "web1"]);
    let saved = daemon.vm("web1");
    let saved_value = daemon.saved_counter(&id);

    daemon.ok(&["start-vm", "web1"]);
    let restored = daemon.vm("web1");
    let restored_counter = daemon.counter("web1");

    daemon.ok(&["stop-vm", "web1", "--turn-off"]);
    let off = daemon.vm("web1");
    daemon.ok(&["remove-vm", "web1"]);
    let gone = daemon.fails(&["get-vm", "web1"]);

    assert_eq!(created["enabled_state"], 3, "new VMs are Off");
    assert_eq!(running["enabled_state"], 2);
    assert_eq!(paused["enabled_state"], 9);
    assert_eq!(frozen, still_frozen, "a paused guest does not count");
    assert!(frozen >= before_pause);
    assert_eq!(resumed["enabled_state"], 2);
    assert!(after_resume > frozen);
    assert_eq!(saved["enabled_state"], 6);
    assert!(saved["process_id"].is_null(), "a saved VM has no worker");
    assert!(!alive(booted_pid), "the saving worker exited");
    assert!(saved_value >= after_resume);
    assert_eq!(restored["enabled_state"], 2);
    assert_eq!(
        restored["worker"]["restored"], true,
        "restored, not rebooted"
    );
    assert!(
        restored_counter >= saved_value,
        "counter {restored_counter} restarted below the saved {saved_value}"
    );
    assert_ne!(restored["process_id"].as_u64(), Some(booted_pid));
    assert_eq!(off["enabled_state"], 3);
    assert_eq!(gone, "get-vm: 'web1': no such virtual machine");
}

#[test]
fn pausing_an_off_vm_is_refused_with_32775_and_changes_nothing() {
    require_kvm!();
    let daemon = Daemon::start();
    daemon.new_vm("idle", &[]);

    let error = daemon.fails(&["suspend-vm", "idle"]);
    let vm = daemon.vm("idle");

    assert_eq!(
        error,
        "suspend-vm: 'idle': invalid state for this operation (32775)"
    );
    assert_eq!(vm["enabled_state"], 3);
    assert_eq!(vm["requested_state"], 12);
}

#[test]
fn missing_kernel_fails_start_with_a_clear_error_and_the_vm_stays_off() {
    require_kvm!();
    let daemon = Daemon::start();
    daemon.new_vm("k1", &["--kernel", "/nonexistent/vmlinux"]);

    let error = daemon.fails(&["start-vm", "k1"]);
    let vm = daemon.vm("k1");

    assert!(error.starts_with("start-vm: 'k1': "), "{error}");
    assert!(
        error.contains("cannot read /nonexistent/vmlinux"),
        "{error}"
    );
    assert!(error.ends_with("(32768)"), "{error}");
    assert_eq!(error.lines().count(), 1);
    assert_eq!(vm["enabled_state"], 3);
    assert!(vm["process_id"].is_null());
}

#[test]
fn stop_without_turn_off_halts_the_test_guest_gracefully() {
    require_kvm!();
    let daemon = Daemon::start();
    daemon.new_vm("polite", &[]);
    daemon.ok(&["start-vm", "polite"]);
    daemon.counter_above("polite", 0);

    let out = daemon.vmms(&["stop-vm", "polite"]);
    let vm = daemon.vm("polite");
    let events = daemon.events("polite");

    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).is_empty(),
        "no turn-off note: the guest shut itself down"
    );
    assert_eq!(vm["enabled_state"], 3);
    assert_eq!(vm["health_state"], 5, "a guest power-off is not a failure");
    assert!(events.iter().all(|e| e["kind"].get("WorkerLost").is_none()));
}

#[test]
fn console_sends_piped_input_to_com1_and_prints_the_reply() {
    require_kvm!();
    let daemon = Daemon::start();
    daemon.new_vm("tty", &[]);
    daemon.ok(&["start-vm", "tty"]);
    daemon.counter_above("tty", 0);

    let mut console = std::process::Command::new(vmms_common::vmms_binary())
        .args(["console", "tty", "--store"])
        .arg(daemon.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = console.stdin.take().unwrap();
        stdin.write_all(b"echo hello from the host\r").unwrap();
    }
    let out = console.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);

    assert!(out.status.success());
    assert!(
        text.contains("vmms test guest ready"),
        "recent output first: {text}"
    );
    assert!(text.contains("\r\nhello from the host\r\n"), "{text}");
}
