//! Supervision through the reference daemon: workers killed under it, and the daemon itself
//! killed under running VMs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod vmms_common;

use std::time::Instant;

use vmms_common::{Daemon, alive, kill9, wait_until};

#[test]
fn killed_worker_leaves_the_vm_off_with_critical_health_and_an_event() {
    require_kvm!();
    let daemon = Daemon::start();
    daemon.new_vm("fragile", &["--recovery", "none"]);
    daemon.ok(&["start-vm", "fragile"]);
    let pid = daemon.vm("fragile")["process_id"].as_u64().unwrap();

    kill9(pid);
    let vm = daemon.wait_state("fragile", 3);
    let events = daemon.events("fragile");

    assert_eq!(vm["health_state"], 25);
    assert!(vm["process_id"].is_null());
    assert_eq!(
        vm["status"], "worker killed by signal 9",
        "the reason is shown"
    );
    let lost: Vec<_> = events
        .iter()
        .filter_map(|e| e["kind"].get("WorkerLost"))
        .collect();
    assert_eq!(lost.len(), 1, "{events:?}");
    assert_eq!(lost[0]["reason"]["WorkerExited"]["signal"], 9);
}

#[test]
fn killed_worker_with_restart_recovery_runs_again_in_a_new_worker() {
    require_kvm!();
    let daemon = Daemon::start();
    daemon.new_vm("phoenix", &["--recovery", "restart"]);
    daemon.ok(&["start-vm", "phoenix"]);
    let first = daemon.vm("phoenix")["process_id"].as_u64().unwrap();

    kill9(first);
    let mut vm = serde_json::Value::Null;
    wait_until("phoenix runs in a new worker", || {
        vm = daemon.vm("phoenix");
        vm["enabled_state"] == 2 && vm["process_id"].as_u64().is_some_and(|p| p != first)
    });
    let events = daemon.events("phoenix");

    assert_eq!(
        vm["health_state"], 5,
        "a successful restart clears the failure"
    );
    assert!(
        events
            .iter()
            .any(|e| e["kind"].get("RecoveryStarted").is_some()),
        "{events:?}"
    );
    assert!(daemon.counter_above("phoenix", 0) > 0, "the new guest runs");
}

#[test]
fn daemon_killed_and_restarted_reattaches_running_vms_without_guest_downtime() {
    require_kvm!();
    let mut daemon = Daemon::start();
    let names = ["a", "b", "c"];
    for name in names {
        daemon.new_vm(name, &[]);
        daemon.ok(&["start-vm", name]);
    }
    let before: Vec<(u64, u64, u64)> = names
        .iter()
        .map(|name| {
            let vm = daemon.vm(name);
            let counter = daemon.counter_above(name, 0);
            let uptime = vm["worker"]["uptime_ms"].as_u64().unwrap();
            (vm["process_id"].as_u64().unwrap(), counter, uptime)
        })
        .collect();
    let killed_at = Instant::now();

    daemon.kill9();
    let survived = before.iter().all(|(pid, ..)| alive(*pid));
    daemon.spawn();
    let after: Vec<serde_json::Value> = names.iter().map(|name| daemon.vm(name)).collect();
    let gap = killed_at.elapsed();

    assert!(survived, "workers outlive the daemon");
    for ((pid, counter, uptime), vm) in before.iter().zip(&after) {
        assert_eq!(vm["enabled_state"], 2, "{vm}");
        assert_eq!(vm["process_id"].as_u64(), Some(*pid), "same worker");
        assert_eq!(vm["health_state"], 5);
        let report = &vm["worker"];
        assert!(report["test_guest"]["counter"].as_u64().unwrap() > *counter);
        assert_eq!(report["restored"], false);
        assert!(
            report["uptime_ms"].as_u64().unwrap() >= uptime + gap.as_millis() as u64,
            "the worker ran through the whole gap"
        );
    }
}

#[test]
fn sigterm_ends_the_daemon_but_not_its_vms() {
    require_kvm!();
    let mut daemon = Daemon::start();
    daemon.new_vm("keeper", &[]);
    daemon.ok(&["start-vm", "keeper"]);
    let pid = daemon.vm("keeper")["process_id"].as_u64().unwrap();

    let clean_exit = daemon.terminate();
    let worker_alive = alive(pid);
    let socket_left = daemon.path().join("vmms.sock").exists();
    daemon.spawn();
    let vm = daemon.vm("keeper");

    assert!(clean_exit, "the daemon exits 0 on SIGTERM");
    assert!(worker_alive, "the VM's worker survives");
    assert!(!socket_left, "the daemon removes its socket");
    assert_eq!(vm["enabled_state"], 2);
    assert_eq!(vm["process_id"].as_u64(), Some(pid));
}
