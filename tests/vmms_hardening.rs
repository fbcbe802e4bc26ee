//! Regression tests for the defects adversarial testing found in the daemon's lifecycle paths:
//! graceful shutdown racing a save, worker identity after a restart, and hung workers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod vmms_common;

use std::fs;
use std::process::{Child, Command};
use std::thread;
use std::time::Duration;

use vmms_common::{Daemon, alive, kill9, wait_until};

/// A process unrelated to vmms whose command line nevertheless carries `guid` as an argument,
/// as a process that reused a stale worker pid might.
fn decoy_with_argument(guid: &str) -> Child {
    Command::new("python3")
        .args(["-c", "import time; time.sleep(300)", guid])
        .spawn()
        .expect("spawn decoy")
}

fn stop_and_reap(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn graceful_stop_racing_a_save_never_touches_the_saved_guest() {
    require_kvm!();
    let daemon = Daemon::start();
    let id = daemon.new_vm("g", &["--recovery", "none"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for head_start in [0, 2, 10] {
        daemon.ok(&["start-vm", "g"]);
        daemon.counter_above("g", 0);
        let store = daemon.path().to_owned();
        let stopper = thread::spawn(move || {
            Command::new(vmms_common::vmms_binary())
                .args(["stop-vm", "g", "--timeout", "10", "--store"])
                .arg(&store)
                .output()
                .expect("run stop-vm")
        });
        thread::sleep(Duration::from_millis(head_start));

        let save = daemon.vmms(&["save-vm", "g"]);
        let stop = stopper.join().unwrap();

        let saved = daemon.vm("g")["enabled_state"] == 6;
        assert!(
            save.status.success() != stop.status.success(),
            "exactly one of save-vm and stop-vm wins (head start {head_start} ms): save {:?}, stop {:?}",
            String::from_utf8_lossy(&save.stderr),
            String::from_utf8_lossy(&stop.stderr)
        );
        assert_eq!(saved, save.status.success(), "the winner decides the state");
        if saved {
            // The saved guest must not carry a half-delivered shutdown into its restore.
            let at_save = daemon.saved_counter(&id);
            daemon.ok(&["start-vm", "g"]);
            thread::sleep(Duration::from_millis(1500));
            let vm = daemon.vm("g");
            assert_eq!(vm["enabled_state"], 2, "the restored guest keeps running");
            assert!(daemon.counter("g") > at_save);
            daemon.ok(&["stop-vm", "g", "--turn-off"]);
        } else {
            assert!(
                String::from_utf8_lossy(&save.stderr).contains("3277"),
                "save-vm is refused with a Hyper-V code: {}",
                String::from_utf8_lossy(&save.stderr)
            );
            assert!(!daemon.path().join(format!("vms/{id}/state")).exists());
        }
        daemon.wait_state("g", 3);
    }
}

#[test]
fn stale_pid_file_naming_an_unrelated_process_is_neither_adopted_nor_killed() {
    require_kvm!();
    let fast_heartbeat = ["--heartbeat-timeout", "1", "--hang-timeout", "2"];
    let mut daemon = Daemon::start_with(&fast_heartbeat, &[]);
    let id = daemon.new_vm("g", &["--recovery", "none"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    daemon.ok(&["start-vm", "g"]);
    let worker = daemon.vm("g")["process_id"].as_u64().unwrap();
    daemon.kill9();
    kill9(worker);
    wait_until("the worker is gone", || !alive(worker));
    let decoy = decoy_with_argument(&id);
    let pid_file = daemon.path().join(format!("run/{id}/pid"));
    fs::write(&pid_file, format!("{}\n", decoy.id())).unwrap();

    daemon.spawn_with(&fast_heartbeat, &[]);
    let vm = daemon.vm("g");
    // Longer than the hang timeout: an adopted decoy would have been killed by now.
    thread::sleep(Duration::from_secs(3));
    let decoy_alive = alive(u64::from(decoy.id()));
    stop_and_reap(decoy);

    assert_eq!(vm["enabled_state"], 3);
    assert!(vm["process_id"].is_null());
    assert!(decoy_alive, "the unrelated process was killed");
}

#[test]
fn overwritten_pid_file_neither_orphans_the_worker_nor_allows_a_second_one() {
    require_kvm!();
    let mut daemon = Daemon::start();
    let id = daemon.new_vm("g", &["--recovery", "none"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    daemon.ok(&["start-vm", "g"]);
    let worker = daemon.vm("g")["process_id"].as_u64().unwrap();
    let decoy = decoy_with_argument(&id);
    fs::write(
        daemon.path().join(format!("run/{id}/pid")),
        format!("{}\n", decoy.id()),
    )
    .unwrap();

    daemon.kill9();
    daemon.spawn();
    let vm = daemon.wait_state("g", 2);
    let second_start = daemon.fails(&["start-vm", "g"]);
    let live = daemon.live_workers();
    let decoy_alive = alive(u64::from(decoy.id()));
    stop_and_reap(decoy);

    assert_eq!(vm["process_id"], worker, "re-attached to the real worker");
    assert!(second_start.contains("32775"), "{second_start}");
    assert_eq!(live, vec![worker]);
    assert!(decoy_alive);
    daemon.ok(&["stop-vm", "g", "--turn-off"]);
    assert!(daemon.live_workers().is_empty());
}

#[test]
fn stopped_worker_is_shown_not_responding_and_kept_when_it_comes_back() {
    require_kvm!();
    let daemon = Daemon::start_with(&["--heartbeat-timeout", "1", "--hang-timeout", "60"], &[]);
    daemon.new_vm("g", &["--recovery", "restart"]);
    daemon.ok(&["start-vm", "g"]);
    let worker = daemon.vm("g")["process_id"].as_u64().unwrap();
    let before = daemon.counter_above("g", 0);

    // SAFETY: kill only sends a signal, to the worker this test's daemon started.
    unsafe { libc::kill(worker as i32, libc::SIGSTOP) };
    let mut silent = serde_json::Value::Null;
    wait_until("the VM shows the worker not responding", || {
        silent = daemon.vm("g");
        silent["health_state"] == 20
    });
    // SAFETY: as above.
    unsafe { libc::kill(worker as i32, libc::SIGCONT) };
    let mut back = serde_json::Value::Null;
    wait_until("the VM is healthy again", || {
        back = daemon.vm("g");
        back["health_state"] == 5
    });

    assert_eq!(silent["enabled_state"], 2);
    assert_eq!(back["process_id"], worker, "the same worker, not a restart");
    assert!(daemon.counter_above("g", before) > before);
    let events = daemon.events("g");
    assert!(
        events
            .iter()
            .any(|e| e["kind"].get("WorkerNotResponding").is_some())
    );
}

#[test]
fn worker_hung_past_the_hang_timeout_is_restarted_per_its_recovery_action() {
    require_kvm!();
    let daemon = Daemon::start_with(&["--heartbeat-timeout", "1", "--hang-timeout", "2"], &[]);
    daemon.new_vm("g", &["--recovery", "restart"]);
    daemon.ok(&["start-vm", "g"]);
    let worker = daemon.vm("g")["process_id"].as_u64().unwrap();

    // SAFETY: kill only sends a signal, to the worker this test's daemon started.
    unsafe { libc::kill(worker as i32, libc::SIGSTOP) };
    let mut vm = serde_json::Value::Null;
    wait_until("the VM runs in a new worker", || {
        vm = daemon.vm("g");
        vm["enabled_state"] == 2 && vm["process_id"].as_u64().is_some_and(|p| p != worker)
    });

    assert!(!alive(worker), "the hung worker was killed");
    daemon.ok(&["stop-vm", "g", "--turn-off"]);
}

#[test]
fn save_that_fails_under_a_restarted_daemon_shows_the_guest_running_again() {
    require_kvm!();
    let fault = [("VMMS_FAULT", "worker.save.before-commit:delay=1500")];
    let mut daemon = Daemon::start_with(&[], &fault);
    let id = daemon.new_vm("g", &["--recovery", "none"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    daemon.ok(&["start-vm", "g"]);
    let before = daemon.counter_above("g", 0);
    let store = daemon.path().to_owned();
    let saving = thread::spawn(move || {
        let _ = Command::new(vmms_common::vmms_binary())
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
    daemon.kill9();
    saving.join().unwrap();
    // Something occupies state/, so the worker's commit fails and its guest runs on.
    let blocker = daemon.path().join(format!("vms/{id}/state"));
    fs::create_dir(&blocker).unwrap();
    fs::write(blocker.join("in-the-way"), b"x").unwrap();

    daemon.spawn();
    let vm = daemon.wait_state("g", 2);

    assert!(daemon.counter_above("g", before) > before, "the guest runs");
    assert!(vm["process_id"].as_u64().is_some());
    daemon.ok(&["stop-vm", "g", "--turn-off"]);
}

#[test]
fn second_vm_on_the_same_disk_image_is_refused_and_the_first_keeps_writing() {
    require_kvm!();
    let daemon = Daemon::start();
    let disk = daemon.path().join("shared.img");
    fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    let disk = disk.to_str().unwrap();
    daemon.new_vm("first", &["--disk", disk, "--recovery", "none"]);
    daemon.new_vm("second", &["--disk", disk, "--recovery", "none"]);
    daemon.ok(&["start-vm", "first"]);

    let refusal = daemon.fails(&["start-vm", "second"]);

    assert!(refusal.contains("locked"), "{refusal}");
    assert_eq!(daemon.vm("second")["enabled_state"], 3);
    let before = daemon.counter_above("first", 0);
    assert!(daemon.counter_above("first", before) > before);
    daemon.ok(&["stop-vm", "first", "--turn-off"]);
    daemon.ok(&["start-vm", "second"]);
    daemon.ok(&["stop-vm", "second", "--turn-off"]);
}
