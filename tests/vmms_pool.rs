//! The daemon's pool of pre-started workers (`vmms serve --worker-pool`): a VM starts on the idle
//! worker, which is confined and supervised like any worker and survives a daemon restart; the
//! pool refills; idle workers end when the daemon dies.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod vmms_common;

use vmms_common::{Daemon, alive, idle_pool_workers, wait_until};

/// Waits until the daemon has exactly one idle pool worker; its pid.
fn one_idle_worker(daemon: &Daemon) -> u64 {
    let mut idle = Vec::new();
    wait_until("the daemon has an idle pool worker", || {
        idle = idle_pool_workers(daemon.path());
        idle.len() == 1
    });
    idle[0]
}

#[test]
fn start_vm_runs_on_the_idle_pool_worker_confined_and_the_pool_refills() {
    require_kvm!();
    let daemon = Daemon::start();
    daemon.new_vm("g", &[]);
    let idle = one_idle_worker(&daemon);

    daemon.ok(&["start-vm", "g"]);
    let pid = daemon.vm("g")["process_id"].as_u64().unwrap();
    let confinement = daemon.worker_report("g")["confinement"].clone();
    let counter = daemon.counter_above("g", 0);
    let refilled = one_idle_worker(&daemon);

    assert_eq!(pid, idle, "the VM runs on the worker that was idle");
    assert_ne!(refilled, pid);
    assert_eq!(confinement["enabled"], true, "{confinement}");
    assert_eq!(confinement["seccomp"], true, "{confinement}");
    assert_eq!(confinement["no_new_privs"], true, "{confinement}");
    assert!(counter > 0);
    daemon.ok(&["stop-vm", "g", "--turn-off"]);
    wait_until("the worker exits", || !alive(pid));
}

#[test]
fn idle_pool_workers_exit_when_the_daemon_is_killed_and_running_ones_are_reattached() {
    require_kvm!();
    let mut daemon = Daemon::start_with(&["--worker-pool", "2"], &[]);
    daemon.new_vm("g", &[]);
    wait_until("two workers are idle", || {
        idle_pool_workers(daemon.path()).len() == 2
    });
    daemon.ok(&["start-vm", "g"]);
    let running = daemon.vm("g")["process_id"].as_u64().unwrap();
    let mut idle = Vec::new();
    wait_until("the pool is full again", || {
        idle = idle_pool_workers(daemon.path());
        idle.len() == 2
    });

    daemon.kill9();
    for &pid in &idle {
        wait_until("an idle worker exits with its daemon", || !alive(pid));
    }
    let running_alive = alive(running);
    daemon.spawn();
    let vm = daemon.wait_state("g", 2);
    let counter = daemon.counter_above("g", 0);

    assert!(running_alive, "the VM's worker outlives the daemon");
    assert_eq!(vm["process_id"], running, "re-attached to the same worker");
    assert!(counter > 0);
    daemon.ok(&["stop-vm", "g", "--turn-off"]);
    wait_until("the worker exits", || !alive(running));
}

#[test]
fn worker_pool_zero_spawns_a_worker_per_start() {
    require_kvm!();
    let daemon = Daemon::start_with(&["--worker-pool", "0"], &[]);
    daemon.new_vm("g", &[]);

    daemon.ok(&["start-vm", "g"]);
    let counter = daemon.counter_above("g", 0);

    assert!(idle_pool_workers(daemon.path()).is_empty());
    assert!(counter > 0);
    daemon.ok(&["stop-vm", "g", "--turn-off"]);
}
