//! Crash safety of the daemon's operations, proven by killing real processes at named steps.
//!
//! `VMMS_FAULT=<step>` makes the process that reaches `<step>` SIGKILL itself there
//! (`vmm_core::fault`); the daemon's workers inherit it. Each trial runs one operation on a real
//! daemon with a real worker and the test guest, lets the daemon or the worker die at one step,
//! restarts the daemon at once, and checks what a user is owed:
//!
//! - no orphan: the live worker processes of the store are exactly the one the VM shows;
//! - no loss: a guest whose worker survived runs on, a completed save is restored exactly, and a
//!   guest is lost only when its own worker process was killed before its state was committed
//!   (then the VM is Off with HealthState 25, as for any worker crash);
//! - no rollback: a saved state is never restored twice.
//!
//! The checkpoint and backup issues add their steps to the same harness.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod vmms_common;

use std::thread;
use std::time::Duration;

use serde_json::Value;
use vmms_common::{Daemon, wait_until};

/// Trials per kill point.
const TRIALS: usize = 2;

/// Which process a step kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dies {
    Daemon,
    Worker,
}

fn dies(step: &str) -> Dies {
    if step.starts_with("worker.") {
        Dies::Worker
    } else {
        Dies::Daemon
    }
}

/// Waits until `name` is in a steady state and no operation owns it; returns it.
fn settle(daemon: &Daemon, name: &str) -> Value {
    let mut vm = Value::Null;
    wait_until(&format!("{name} settles"), || {
        vm = daemon.vm(name);
        let steady = [2, 3, 6, 9].contains(&vm["enabled_state"].as_u64().unwrap_or(0));
        steady && vm["operational_status"] != 11
    });
    vm
}

/// The live workers of the store are exactly the one `vm` shows (none when it has none).
fn assert_no_orphan(daemon: &Daemon, vm: &Value, context: &str) {
    let expected: Vec<u64> = vm["process_id"].as_u64().into_iter().collect();
    let mut live = Vec::new();
    // A worker that was told to exit may take a moment to be gone.
    wait_until(&format!("{context}: workers match the VM"), || {
        live = daemon.live_workers();
        live == expected
    });
    assert_eq!(live, expected, "{context}");
}

/// After the daemon died at a daemon step: restart it at once. After a worker step the daemon
/// lives on; it is restarted too, so re-attach runs in every trial.
fn restart(daemon: &mut Daemon, step: &str) {
    match dies(step) {
        Dies::Daemon => daemon.wait_exit(),
        Dies::Worker => daemon.kill9(),
    }
    daemon.spawn();
}

/// When a worker step killed the worker, the daemon that watched it die, settled (`Null` for a
/// daemon step: that daemon is gone).
fn first_daemon_view(daemon: &Daemon, step: &str) -> Value {
    match dies(step) {
        Dies::Worker => settle(daemon, "g"),
        Dies::Daemon => Value::Null,
    }
}

/// Starts `name` and waits until its guest counts; returns the counter.
fn boot(daemon: &Daemon, name: &str) -> u64 {
    daemon.ok(&["start-vm", name]);
    daemon.counter_above(name, 0)
}

/// Turns `name` off (if it runs) and checks no worker is left.
fn finish(daemon: &Daemon, name: &str, context: &str) {
    let vm = settle(daemon, name);
    if vm["process_id"].as_u64().is_some() {
        daemon.ok(&["stop-vm", name, "--turn-off"]);
    }
    let vm = settle(daemon, name);
    assert_no_orphan(daemon, &vm, context);
}

#[test]
fn save_survives_a_kill_at_every_step() {
    require_kvm!();
    let steps = [
        "save.before-worker",
        "worker.save.after-state-file",
        "worker.save.before-commit",
        "worker.save.after-commit",
        "save.after-worker",
    ];
    let mut losses = Vec::new();
    for step in steps {
        for trial in 0..TRIALS {
            let context = format!("save, kill at {step}, trial {trial}");
            let mut daemon = Daemon::start_with(&[], &[("VMMS_FAULT", step)]);
            let id = daemon.new_vm("g", &["--recovery", "none"])["id"]
                .as_str()
                .unwrap()
                .to_owned();
            let before = boot(&daemon, "g");

            let _ = daemon.vmms(&["save-vm", "g"]);
            let seen_by_first = first_daemon_view(&daemon, step);
            restart(&mut daemon, step);
            let vm = settle(&daemon, "g");
            assert_no_orphan(&daemon, &vm, &context);

            match vm["enabled_state"].as_u64() {
                Some(6) => {
                    let saved = daemon.saved_counter(&id);
                    assert!(saved >= before, "{context}: saved {saved} < {before}");
                    daemon.ok(&["start-vm", "g"]);
                    assert_eq!(daemon.worker_report("g")["restored"], true, "{context}");
                    assert!(daemon.counter("g") >= saved, "{context}: restore went back");
                }
                Some(2) => {
                    daemon.counter_above("g", before);
                }
                Some(3) if dies(step) == Dies::Worker && step != "worker.save.after-commit" => {
                    // The worker was killed before its state was committed: a worker crash,
                    // shown as such by the daemon that saw it (health is not persisted).
                    assert_eq!(seen_by_first["health_state"], 25, "{context}");
                    assert!(
                        !daemon
                            .path()
                            .join(format!("vms/{id}/state.saving"))
                            .exists(),
                        "{context}: the unfinished save is tidied"
                    );
                }
                _ => {
                    losses.push(format!("{context}: guest lost: {vm}\n{}", daemon.log()));
                    continue;
                }
            }
            finish(&daemon, "g", &context);
        }
    }
    println!(
        "fault injection, save: {} kill points x {TRIALS} trials, {} losses",
        steps.len(),
        losses.len()
    );
    assert!(losses.is_empty(), "{losses:#?}");
}

/// How the daemon is stopped while a save is in progress.
#[derive(Debug, Clone, Copy)]
enum DaemonStop {
    StopDaemon,
    Sigterm,
    Kill9,
}

#[test]
fn save_completed_while_the_daemon_is_stopped_leaves_the_vm_saved() {
    require_kvm!();
    for how in [
        DaemonStop::StopDaemon,
        DaemonStop::Sigterm,
        DaemonStop::Kill9,
    ] {
        for trial in 0..TRIALS {
            let context = format!("daemon stopped by {how:?} during a save, trial {trial}");
            // The worker dawdles before committing, so the save is surely in flight.
            let fault = [("VMMS_FAULT", "worker.save.before-commit:delay=1500")];
            let mut daemon = Daemon::start_with(&[], &fault);
            let id = daemon.new_vm("g", &["--recovery", "none"])["id"]
                .as_str()
                .unwrap()
                .to_owned();
            let before = boot(&daemon, "g");
            let store = daemon.path().to_owned();
            let saving = thread::spawn(move || {
                let _ = std::process::Command::new(vmms_common::vmms_binary())
                    .args(["save-vm", "g", "--store"])
                    .arg(&store)
                    .output();
            });
            wait_until("the save is in flight", || {
                daemon
                    .path()
                    .join(format!("vms/{id}/state.saving"))
                    .exists()
            });

            match how {
                DaemonStop::StopDaemon => {
                    daemon.ok(&["stop-daemon"]);
                    daemon.wait_exit();
                }
                DaemonStop::Sigterm => assert!(daemon.terminate()),
                DaemonStop::Kill9 => daemon.kill9(),
            }
            daemon.spawn();
            let vm = settle(&daemon, "g");
            saving.join().unwrap();

            assert_eq!(vm["enabled_state"], 6, "{context}: {vm}\n{}", daemon.log());
            assert_no_orphan(&daemon, &vm, &context);
            let saved = daemon.saved_counter(&id);
            assert!(saved >= before, "{context}");
            daemon.ok(&["start-vm", "g"]);
            assert_eq!(daemon.worker_report("g")["restored"], true, "{context}");
            assert!(daemon.counter("g") >= saved, "{context}: restore went back");
            finish(&daemon, "g", &context);
        }
    }
}

#[test]
fn start_survives_a_daemon_kill_at_every_step_without_orphans() {
    require_kvm!();
    // The `running` marker is written beside the launch: `start.after-marker` may come before
    // the hand-off (then no worker exists yet) or after the worker is ready.
    let steps = [
        "start.before-launch",
        "launch.after-spawn",
        "start.after-marker",
        "launch.after-ready",
        "start.after-launch",
    ];
    for step in steps {
        for trial in 0..TRIALS {
            let context = format!("start, kill at {step}, trial {trial}");
            let mut daemon = Daemon::start_with(&[], &[("VMMS_FAULT", step)]);
            let id = daemon.new_vm("g", &["--recovery", "none"])["id"]
                .as_str()
                .unwrap()
                .to_owned();

            let _ = daemon.vmms(&["start-vm", "g"]);
            restart(&mut daemon, step);
            let vm = settle(&daemon, "g");
            assert_no_orphan(&daemon, &vm, &context);

            let marker = daemon.path().join(format!("vms/{id}/was-running"));
            match vm["enabled_state"].as_u64() {
                Some(2) => {
                    daemon.counter_above("g", 0);
                    assert!(marker.exists(), "{context}: a running VM is marked running");
                }
                Some(3) => {
                    assert!(
                        !marker.exists(),
                        "{context}: an Off VM is not marked running"
                    );
                    // Never started: it must start now, once.
                    boot(&daemon, "g");
                    let vm = daemon.vm("g");
                    assert_no_orphan(&daemon, &vm, &context);
                }
                _ => panic!("{context}: unexpected state {vm}"),
            }
            finish(&daemon, "g", &context);
        }
    }
}

#[test]
fn restore_survives_a_kill_at_every_step_and_never_rolls_back() {
    require_kvm!();
    let steps = [
        "start.before-launch",
        "launch.after-spawn",
        "worker.restore.before-consume",
        "worker.restore.after-consume",
        "launch.after-ready",
        "start.after-launch",
    ];
    let mut losses = Vec::new();
    for step in steps {
        for trial in 0..TRIALS {
            let context = format!("restore, kill at {step}, trial {trial}");
            let mut daemon = Daemon::start();
            let id = daemon.new_vm("g", &["--recovery", "none"])["id"]
                .as_str()
                .unwrap()
                .to_owned();
            boot(&daemon, "g");
            daemon.ok(&["save-vm", "g"]);
            let saved = daemon.saved_counter(&id);
            daemon.kill9();
            daemon.spawn_with(&[], &[("VMMS_FAULT", step)]);

            let _ = daemon.vmms(&["start-vm", "g"]);
            let seen_by_first = first_daemon_view(&daemon, step);
            restart(&mut daemon, step);
            let vm = settle(&daemon, "g");
            assert_no_orphan(&daemon, &vm, &context);

            match vm["enabled_state"].as_u64() {
                Some(2) => {
                    assert_eq!(
                        daemon.worker_report("g")["restored"],
                        true,
                        "{context}: cold boot"
                    );
                    assert!(
                        !daemon.path().join(format!("vms/{id}/state")).exists(),
                        "{context}: a running guest left its saved state behind"
                    );
                    assert!(daemon.counter("g") >= saved, "{context}");
                }
                Some(6) => {
                    assert_eq!(daemon.saved_counter(&id), saved, "{context}");
                    daemon.ok(&["start-vm", "g"]);
                    assert!(daemon.counter("g") >= saved, "{context}");
                }
                Some(3) if step == "worker.restore.after-consume" => {
                    // The restoring worker died after taking the state over: a worker crash.
                    assert_eq!(seen_by_first["health_state"], 25, "{context}");
                }
                _ => {
                    losses.push(format!("{context}: guest lost: {vm}\n{}", daemon.log()));
                    continue;
                }
            }
            if daemon.vm("g")["enabled_state"] == 2 {
                // A second save and restore must give the second state, not the first.
                let running = daemon.counter_above("g", saved);
                daemon.ok(&["save-vm", "g"]);
                let second = daemon.saved_counter(&id);
                assert!(second >= running, "{context}: second save went back");
                daemon.kill9();
                daemon.spawn();
                daemon.ok(&["start-vm", "g"]);
                assert!(daemon.counter("g") >= second, "{context}: rolled back");
            }
            finish(&daemon, "g", &context);
        }
    }
    println!(
        "fault injection, restore: {} kill points x {TRIALS} trials, {} losses",
        steps.len(),
        losses.len()
    );
    assert!(losses.is_empty(), "{losses:#?}");
}

#[test]
fn remove_and_shutdown_survive_a_daemon_kill() {
    require_kvm!();
    for step in ["remove.before-store", "remove.after-rename"] {
        for trial in 0..TRIALS {
            let context = format!("remove, kill at {step}, trial {trial}");
            let mut daemon = Daemon::start_with(&[], &[("VMMS_FAULT", step)]);
            daemon.new_vm("g", &[]);

            let _ = daemon.vmms(&["remove-vm", "g"]);
            restart(&mut daemon, step);
            let remaining = daemon.vms();
            if !remaining.is_empty() {
                daemon.ok(&["remove-vm", "g"]);
            }

            assert!(daemon.vms().is_empty(), "{context}");
            let leftovers: Vec<_> = std::fs::read_dir(daemon.path().join("vms"))
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .collect();
            assert!(leftovers.is_empty(), "{context}: {leftovers:?}");
        }
    }
    for step in ["shutdown.before-request", "shutdown.after-request"] {
        for trial in 0..TRIALS {
            let context = format!("shutdown, kill at {step}, trial {trial}");
            let mut daemon = Daemon::start_with(&[], &[("VMMS_FAULT", step)]);
            daemon.new_vm("g", &["--recovery", "none"]);
            let before = boot(&daemon, "g");

            let _ = daemon.vmms(&["stop-vm", "g"]);
            restart(&mut daemon, step);
            let vm = settle(&daemon, "g");
            assert_no_orphan(&daemon, &vm, &context);

            match vm["enabled_state"].as_u64() {
                Some(2) => {
                    daemon.counter_above("g", before);
                }
                Some(3) => assert_eq!(vm["health_state"], 5, "{context}: a clean power-off"),
                _ => panic!("{context}: unexpected state {vm}"),
            }
            finish(&daemon, "g", &context);
        }
    }
}

#[test]
fn ten_starts_with_the_daemon_killed_midway_leave_no_orphan() {
    require_kvm!();
    let mut daemon = Daemon::start();
    let names: Vec<String> = (0..10).map(|i| format!("vm{i}")).collect();
    for name in &names {
        daemon.new_vm(name, &["--recovery", "none"]);
    }
    let store = daemon.path().to_owned();
    let starters: Vec<_> = names
        .iter()
        .map(|name| {
            let (store, name) = (store.clone(), name.clone());
            thread::spawn(move || {
                let _ = std::process::Command::new(vmms_common::vmms_binary())
                    .args(["start-vm", &name, "--store"])
                    .arg(&store)
                    .output();
            })
        })
        .collect();
    // Some launches are done, some in flight, some not begun.
    thread::sleep(Duration::from_millis(150));

    daemon.kill9();
    daemon.spawn();
    for starter in starters {
        starter.join().unwrap();
    }
    let vms: Vec<Value> = names.iter().map(|n| settle(&daemon, n)).collect();

    let mut shown: Vec<u64> = vms
        .iter()
        .filter_map(|v| v["process_id"].as_u64())
        .collect();
    shown.sort_unstable();
    let mut live = Vec::new();
    wait_until("every live worker is attached to its VM", || {
        live = daemon.live_workers();
        live == shown
    });
    assert_eq!(live, shown);
    for name in &names {
        if daemon.vm(name)["enabled_state"] == 3 {
            boot(&daemon, name);
        }
        daemon.ok(&["stop-vm", name, "--turn-off"]);
    }
    assert!(daemon.live_workers().is_empty());
}
