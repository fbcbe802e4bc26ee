//! Production checkpoints of running VMs through the daemon (Hyper-V's UserSnapshotType 3 and
//! 4): the guest's agent freezes it, the worker switches only its disks while it is frozen, the
//! guest thaws and runs on; applying the checkpoint leaves the VM Off, booting from disks that
//! hold every record up to the freeze. A guest that cannot be quiesced gets a standard checkpoint
//! (type 3, saying why) or none (type 4, 32775, nothing changed). A daemon killed while the
//! guest is frozen leaves it to the worker's hold limit. Real daemon, workers, test guest and
//! `qemu-img`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod vmms_common;

use std::fs;

use serde_json::Value;
use vmms_common::{Daemon, qemu_img_check_all, records_in, wait_until};

/// `get-vm-checkpoint TARGET -o json`.
fn tree(daemon: &Daemon, target: &str) -> Value {
    let text = daemon.ok(&["get-vm-checkpoint", target, "--output", "json"]);
    serde_json::from_str(&text).expect("get-vm-checkpoint json")
}

/// The checkpoint named `name`.
fn node(daemon: &Daemon, target: &str, name: &str) -> Value {
    let listed = tree(daemon, target);
    listed["checkpoints"]
        .as_array()
        .expect("checkpoints")
        .iter()
        .find(|c| c["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no checkpoint {name} in {listed}"))
}

/// `checkpoint-vm TARGET --name NAME --type KIND`: the CLI's output (stderr carries warnings).
fn checkpoint(daemon: &Daemon, target: &str, name: &str, kind: &str) -> std::process::Output {
    daemon.vmms(&["checkpoint-vm", target, "--name", name, "--type", kind])
}

/// Every file under the VM's `disks/` and `checkpoints/` (names), for "nothing changed" checks.
fn files(daemon: &Daemon, target: &str) -> Vec<String> {
    let dir = daemon.vm_dir(target);
    let mut names = Vec::new();
    for sub in ["disks", "checkpoints"] {
        for entry in fs::read_dir(dir.join(sub)).into_iter().flatten().flatten() {
            names.push(format!("{sub}/{}", entry.file_name().to_string_lossy()));
        }
    }
    names.sort();
    names
}

/// A running VM with a 64 MiB disk, its record workload writing continuously.
fn busy_vm(daemon: &Daemon, name: &str) {
    // Room for a minute of `writeloop` (one flushed record per pass): the tests that hold a
    // checkpoint in its frozen window for the hold limit keep the guest writing that long.
    daemon.new_vm(name, &["--new-disk", "64M", "--recovery", "none"]);
    daemon.ok(&["start-vm", name]);
    daemon.console_command(name, "writeloop", "writeloop started");
    wait_until("the workload writes", || daemon.guest_records(name) > 20);
}

#[test]
fn production_checkpoint_of_a_busy_guest_is_app_consistent_and_boots_from_whole_records() {
    let daemon = Daemon::start();
    busy_vm(&daemon, "db");
    let before = daemon.guest_records("db");
    let counter_before = daemon.counter("db");

    let out = checkpoint(&daemon, "db", "app", "production");

    assert!(out.status.success(), "{out:?}\n{}", daemon.log());
    let after = daemon.guest_records("db");
    let cp = node(&daemon, "db", "app");
    assert_eq!(cp["consistency"], "production", "{cp}");
    assert_eq!(cp["has_saved_state"], false, "{cp}");
    assert!(cp["quiesce_failure"].is_null(), "{cp}");
    assert_eq!(daemon.vm("db")["enabled_state"], 2, "the VM never stopped");
    daemon.counter_above("db", counter_before);
    wait_until("the workload writes after the checkpoint", || {
        daemon.guest_records("db") > after
    });
    let cp_dir = daemon
        .vm_dir("db")
        .join("checkpoints")
        .join(cp["id"].as_str().expect("id"));
    assert!(!cp_dir.join("state").exists(), "no memory captured");

    daemon.console_command("db", "stop", "writeloop stopped");
    let written = daemon.guest_records("db");
    daemon.ok(&["stop-vm", "db", "--turn-off"]);
    daemon.wait_state("db", 3);
    assert_eq!(
        records_in(&daemon.disk("db", 0)).0,
        written,
        "the live disk"
    );
    daemon.ok(&["restore-vm-checkpoint", "db", "app"]);

    assert_eq!(
        daemon.vm("db")["enabled_state"],
        3,
        "a production checkpoint applies Off"
    );
    let (at_freeze, clean_end) = records_in(&daemon.disk("db", 0));
    assert!(
        (before..=after).contains(&at_freeze),
        "the checkpoint holds {at_freeze} records, written {before} before and {after} after"
    );
    assert!(clean_end, "no torn record after the freeze point");
    daemon.ok(&["start-vm", "db"]);
    // The guest publishes its status before it has found the end of its log: wait for the scan.
    wait_until("the guest boots from the checkpoint's records", || {
        daemon.guest_records("db") == at_freeze
    });
    let total = at_freeze + 1;
    daemon.console_command("db", "write 1", &format!("total {total}"));
    daemon.ok(&["stop-vm", "db", "--turn-off"]);
    daemon.wait_state("db", 3);
    qemu_img_check_all(&daemon.vm_dir("db"));
}

#[test]
fn without_an_agent_production_falls_back_to_standard_and_production_only_changes_nothing() {
    let daemon = Daemon::start();
    let dir = tempfile::tempdir().expect("tempdir");
    daemon.start_guest_with_cmdline("mute", "agent=off", dir.path(), &["--recovery", "none"]);
    let files_before = files(&daemon, "mute");

    let refused = checkpoint(&daemon, "mute", "only", "production-only");

    let refusal = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(!refused.status.success(), "production-only succeeded");
    assert!(
        refusal.contains("32775") && refusal.contains("quiesc"),
        "{refusal}"
    );
    assert!(
        tree(&daemon, "mute")["checkpoints"]
            .as_array()
            .is_some_and(Vec::is_empty)
    );
    assert_eq!(files(&daemon, "mute"), files_before, "nothing was made");
    assert_eq!(daemon.vm("mute")["enabled_state"], 2);
    daemon.console_command("mute", "write 1", "wrote 1 records, total 11");

    let fell_back = checkpoint(&daemon, "mute", "prod", "production");

    assert!(fell_back.status.success(), "{fell_back:?}");
    let warning = String::from_utf8_lossy(&fell_back.stderr).into_owned();
    assert!(warning.contains("taken as a standard one"), "{warning}");
    let cp = node(&daemon, "mute", "prod");
    assert_eq!(cp["consistency"], "standard-fallback", "{cp}");
    assert_eq!(cp["has_saved_state"], true, "{cp}");
    let reason = cp["quiesce_failure"].as_str().unwrap_or("");
    assert!(reason.contains("agent does not answer"), "{cp}");
    daemon.console_command("mute", "write 5", "total 16");
    daemon.ok(&["stop-vm", "mute", "--turn-off"]);
    daemon.wait_state("mute", 3);
    daemon.ok(&["restore-vm-checkpoint", "mute", "prod"]);
    assert_eq!(daemon.vm("mute")["enabled_state"], 6, "Saved");
    daemon.ok(&["start-vm", "mute"]);
    assert_eq!(daemon.worker_report("mute")["restored"], true);
    daemon.console_command("mute", "write 1", "wrote 1 records, total 12");
    daemon.ok(&["stop-vm", "mute", "--turn-off"]);
    daemon.wait_state("mute", 3);
    qemu_img_check_all(&daemon.vm_dir("mute"));
}

#[test]
fn a_freeze_that_never_answers_falls_back_or_fails_and_the_guest_runs_on() {
    let daemon = Daemon::start();
    let dir = tempfile::tempdir().expect("tempdir");
    daemon.start_guest_with_cmdline(
        "stuck",
        "agent=hang-freeze",
        dir.path(),
        &["--recovery", "none"],
    );
    let files_before = files(&daemon, "stuck");

    let refused = checkpoint(&daemon, "stuck", "only", "production-only");

    let refusal = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(!refused.status.success(), "production-only succeeded");
    assert!(refusal.contains("32775"), "{refusal}");
    assert!(refusal.contains("did not freeze"), "{refusal}");
    assert_eq!(files(&daemon, "stuck"), files_before, "nothing was made");
    assert_eq!(daemon.vm("stuck")["enabled_state"], 2);
    daemon.console_command("stuck", "write 1", "wrote 1 records, total 11");

    let fell_back = checkpoint(&daemon, "stuck", "prod", "production");

    assert!(fell_back.status.success(), "{fell_back:?}");
    let cp = node(&daemon, "stuck", "prod");
    assert_eq!(cp["consistency"], "standard-fallback", "{cp}");
    let reason = cp["quiesce_failure"].as_str().unwrap_or("");
    assert!(reason.contains("did not freeze"), "{cp}");
    assert_eq!(
        daemon.vm("stuck")["enabled_state"],
        2,
        "the VM keeps running"
    );
    daemon.console_command("stuck", "write 1", "wrote 1 records, total 12");
}

/// Kills the daemon at `step` of a production checkpoint of a busy guest, restarts it, and
/// checks that the guest was thawed and runs on, and that the checkpoint is whole or absent
/// (`kept`) with no stray overlay or staging folder.
fn daemon_killed_at(step: &str, kept: bool) {
    let mut daemon = Daemon::start();
    busy_vm(&daemon, "k");
    let layers_before = files(&daemon, "k")
        .iter()
        .filter(|f| f.starts_with("disks/"))
        .count();
    daemon.kill9();
    daemon.spawn_with(&[], &[("VMMS_FAULT", step)]);
    let out = checkpoint(&daemon, "k", "app", "production");
    assert!(!out.status.success(), "the daemon died at {step}");
    assert!(daemon.exited_within(vmms_common::TIMEOUT).is_some());

    daemon.spawn();

    assert_eq!(daemon.vm("k")["enabled_state"], 2, "{step}: the VM ran on");
    // Frozen at the kill, the guest writes again once the worker's hold limit thaws it.
    let at_restart = daemon.guest_records("k");
    wait_until("the guest is thawed and writes", || {
        daemon.guest_records("k") > at_restart + 5
    });
    let names = daemon.checkpoint_names("k");
    let after = files(&daemon, "k");
    let layers = after.iter().filter(|f| f.starts_with("disks/")).count();
    assert!(
        !after
            .iter()
            .any(|f| f.contains(".new") || f.contains("journal")),
        "{step}: leftovers {after:?}"
    );
    if kept {
        assert_eq!(names, ["app"], "{step}");
        assert_eq!(node(&daemon, "k", "app")["consistency"], "production");
        assert_eq!(layers, layers_before + 1, "{step}: on the overlay");
    } else {
        assert!(names.is_empty(), "{step}: {names:?}");
        assert_eq!(layers, layers_before, "{step}: no stray overlay");
    }
    daemon.console_command("k", "stop", "writeloop stopped");
    let written = daemon.guest_records("k");
    daemon.ok(&["stop-vm", "k", "--turn-off"]);
    daemon.wait_state("k", 3);
    assert_eq!(
        records_in(&daemon.disk("k", 0)).0,
        written,
        "{step}: nothing lost"
    );
    qemu_img_check_all(&daemon.vm_dir("k"));
}

#[test]
fn daemon_killed_while_the_guest_is_frozen_leaves_no_checkpoint_and_the_guest_thawed() {
    daemon_killed_at("checkpoint.production-frozen", false);
}

#[test]
fn daemon_killed_after_the_worker_committed_finds_the_production_checkpoint_whole() {
    daemon_killed_at("checkpoint.after-worker", true);
}

#[test]
fn a_freeze_thawed_at_its_hold_limit_before_the_switch_falls_back_or_fails() {
    // The daemon dawdles inside the frozen window past the worker's 10 s hold limit.
    let daemon = Daemon::start_with(
        &[],
        &[("VMMS_FAULT", "checkpoint.production-frozen:delay=12000")],
    );
    busy_vm(&daemon, "slow");
    let files_before = files(&daemon, "slow");

    let refused = checkpoint(&daemon, "slow", "only", "production-only");

    let refusal = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(!refused.status.success(), "production-only succeeded");
    assert!(
        refusal.contains("32775") && refusal.contains("were not frozen"),
        "{refusal}"
    );
    assert_eq!(files(&daemon, "slow"), files_before, "nothing was made");
    let at_refusal = daemon.guest_records("slow");
    wait_until("the thawed guest writes", || {
        daemon.guest_records("slow") > at_refusal + 5
    });

    let fell_back = checkpoint(&daemon, "slow", "prod", "production");

    assert!(fell_back.status.success(), "{fell_back:?}");
    let cp = node(&daemon, "slow", "prod");
    assert_eq!(cp["consistency"], "standard-fallback", "{cp}");
    assert_eq!(cp["has_saved_state"], true, "{cp}");
    let reason = cp["quiesce_failure"].as_str().unwrap_or("");
    assert!(reason.contains("were not frozen"), "{cp}");
    assert_eq!(daemon.vm("slow")["enabled_state"], 2);
    let after = daemon.guest_records("slow");
    wait_until("the guest writes on", || {
        daemon.guest_records("slow") > after + 5
    });
}

#[test]
fn a_paused_guest_cannot_be_quiesced_so_production_falls_back_and_it_stays_paused() {
    let daemon = Daemon::start();
    daemon.new_vm("p", &["--new-disk", "8M", "--recovery", "none"]);
    daemon.ok(&["start-vm", "p"]);
    daemon.console_command("p", "write 3", "wrote 3 records, total 3");
    daemon.ok(&["suspend-vm", "p"]);
    let paused = daemon.vm("p")["enabled_state"].clone();

    let refused = checkpoint(&daemon, "p", "only", "production-only");
    let fell_back = checkpoint(&daemon, "p", "prod", "production");

    let refusal = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(
        refusal.contains("32775") && refusal.contains("paused"),
        "{refusal}"
    );
    assert!(fell_back.status.success(), "{fell_back:?}");
    let cp = node(&daemon, "p", "prod");
    assert_eq!(cp["consistency"], "standard-fallback", "{cp}");
    assert!(
        cp["quiesce_failure"]
            .as_str()
            .unwrap_or("")
            .contains("paused"),
        "{cp}"
    );
    assert_eq!(daemon.vm("p")["enabled_state"], paused, "still paused");
    daemon.ok(&["resume-vm", "p"]);
    daemon.console_command("p", "write 1", "wrote 1 records, total 4");
}
