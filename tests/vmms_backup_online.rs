//! Online backups of running guests through the daemon: the guest's record workload writes the
//! whole time (`writeloop`), its agent on COM2 freezes it for the capture, and the sets restore
//! to exactly what the guest had written. Crashes of the daemon and of the worker in the middle
//! of a session lose nothing. Real daemon, real workers, the test guest, the real `qemu-img`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod vmms_common;

use std::fs;
use std::path::Path;
use std::process::Command;

use serde_json::Value;
use vmms_common::{Daemon, path_str, qemu_img_check_all, records_in, wait_until};

/// `backup-vm ... -o json`: the set's description.
fn backup(daemon: &Daemon, target: &str, set: &Path, extra: &[&str]) -> Value {
    let mut args = vec![
        "backup-vm",
        target,
        "--to",
        path_str(set),
        "--output",
        "json",
    ];
    args.extend_from_slice(extra);
    serde_json::from_str(&daemon.ok(&args)).expect("backup-vm json")
}

/// No backup overlay, journal or partial set is left behind.
fn assert_tidy(daemon: &Daemon, target: &str) {
    let dir = daemon.vm_dir(target);
    let leftovers: Vec<String> = fs::read_dir(dir.join("disks"))
        .expect("disks")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("~backup-"))
        .collect();
    assert!(leftovers.is_empty(), "overlays left: {leftovers:?}");
    assert!(!dir.join("backup-session.json").exists(), "journal left");
}

/// A running VM with a 64 MiB disk (room for a minute of `writeloop`), its record workload
/// writing continuously.
fn busy_vm(daemon: &Daemon, name: &str) {
    daemon.new_vm(name, &["--new-disk", "64M"]);
    daemon.ok(&["start-vm", name]);
    daemon.console_command(name, "writeloop", "writeloop started");
    wait_until("the workload writes", || daemon.guest_records(name) > 20);
}

/// Stops the workload and turns the VM off; returns the records it wrote.
fn quiet_and_off(daemon: &Daemon, name: &str) -> u64 {
    daemon.console_command(name, "stop", "writeloop stopped");
    let written = daemon.guest_records(name);
    daemon.ok(&["stop-vm", name, "--turn-off"]);
    daemon.wait_state(name, 3);
    written
}

#[test]
fn app_consistent_backup_of_a_busy_guest_restores_every_record_up_to_the_freeze() {
    let daemon = Daemon::start();
    busy_vm(&daemon, "web");
    let sets = tempfile::tempdir().expect("tempdir");
    let set = sets.path().join("full");
    let before = daemon.guest_records("web");
    let counter_before = daemon.counter("web");

    let info = backup(&daemon, "web", &set, &[]);

    let after = daemon.guest_records("web");
    assert_eq!(
        info["report"]["consistency"], "ApplicationConsistent",
        "{info}"
    );
    assert_eq!(info["report"]["kind"], "Full");
    assert!(info["report"]["freeze_window"].is_object(), "{info}");
    assert_eq!(daemon.vm("web")["enabled_state"], 2, "the VM never stopped");
    daemon.counter_above("web", counter_before);
    wait_until("the workload writes after the backup", || {
        daemon.guest_records("web") > after
    });
    assert_tidy(&daemon, "web");
    daemon.ok(&["test-vm-backup", path_str(&set)]);
    daemon.ok(&["restore-vm-backup", path_str(&set), "--as", "web-copy"]);
    let (restored, clean_end) = records_in(&daemon.disk("web-copy", 0));
    assert!(
        (before..=after).contains(&restored),
        "the set holds {restored} records, written {before} before and {after} after"
    );
    assert!(clean_end, "no torn record after the freeze point");
    let written = quiet_and_off(&daemon, "web");
    let (on_source, _) = records_in(&daemon.disk("web", 0));
    assert_eq!(on_source, written, "the source lost nothing");
    qemu_img_check_all(&daemon.vm_dir("web"));
    qemu_img_check_all(&set);
}

#[test]
fn incremental_copies_the_changed_blocks_and_the_chain_restores_the_disk_exactly() {
    let daemon = Daemon::start();
    daemon.new_vm("db", &["--new-disk", "16M"]);
    daemon.ok(&["start-vm", "db"]);
    // 48 records: 3 whole 64 KiB blocks, so the change below starts on a block boundary.
    daemon.console_command("db", "write 48", "wrote 48 records, total 48");
    let sets = tempfile::tempdir().expect("tempdir");
    let full = sets.path().join("mon");
    let incremental = sets.path().join("tue");
    backup(&daemon, "db", &full, &[]);
    daemon.console_command("db", "write 160", "wrote 160 records, total 208");

    let info = backup(&daemon, "db", &incremental, &["--incremental"]);

    let guest_wrote = 160 * 4096;
    let copied = info["report"]["bytes_copied"].as_u64().expect("bytes");
    assert_eq!(info["report"]["kind"], "Incremental", "{info}");
    assert!(
        copied as f64 / guest_wrote as f64 <= 1.1,
        "copied {copied} bytes for {guest_wrote} written"
    );
    assert_eq!(info["chain"].as_array().map(Vec::len), Some(2));
    daemon.ok(&["stop-vm", "db", "--turn-off"]);
    daemon.wait_state("db", 3);
    daemon.ok(&["test-vm-backup", path_str(&incremental)]);
    daemon.ok(&[
        "restore-vm-backup",
        path_str(&incremental),
        "--as",
        "db-copy",
    ]);
    let compare = Command::new("qemu-img")
        .args(["compare", "-U"])
        .arg(daemon.disk("db", 0))
        .arg(daemon.disk("db-copy", 0))
        .output()
        .expect("qemu-img compare");
    assert!(compare.status.success(), "{compare:?}");
    let chain_read = Command::new("qemu-img")
        .args(["compare", "-U"])
        .arg(daemon.disk("db", 0))
        .arg(incremental.join("disk0.qcow2"))
        .output()
        .expect("qemu-img compare");
    assert!(
        chain_read.status.success(),
        "qemu-img reads the chain: {chain_read:?}"
    );
    let removed_base = sets.path().join("mon-moved");
    fs::rename(&full, &removed_base).expect("move the base away");
    let broken = daemon.fails(&["test-vm-backup", path_str(&incremental)]);
    assert!(broken.contains("is missing"), "{broken}");
}

#[test]
fn an_incremental_without_a_usable_reference_is_full_and_says_why() {
    let daemon = Daemon::start();
    daemon.new_vm("v", &["--new-disk", "8M"]);
    daemon.ok(&["start-vm", "v"]);
    let sets = tempfile::tempdir().expect("tempdir");

    let first = backup(&daemon, "v", &sets.path().join("a"), &["--incremental"]);

    assert_eq!(first["report"]["kind"], "Full");
    assert!(
        first["report"]["full_reason"]
            .as_str()
            .is_some_and(|r| r.contains("no earlier backup")),
        "{first}"
    );
}

/// Kills the daemon at a step of a backup of a busy guest, restarts it, and checks that the VM
/// ran on, nothing is left behind, and the next incremental is full.
fn daemon_killed_at(step: &str, set_survives: bool) {
    let mut daemon = Daemon::start();
    busy_vm(&daemon, "k");
    let sets = tempfile::tempdir().expect("tempdir");
    let set = sets.path().join("s");
    let counter = daemon.counter("k");
    daemon.kill9();
    daemon.spawn_with(&[], &[("VMMS_FAULT", step)]);
    let out = daemon.vmms(&["backup-vm", "k", "--to", path_str(&set)]);
    assert!(!out.status.success(), "the daemon died at {step}");
    assert!(daemon.exited_within(vmms_common::TIMEOUT).is_some());

    daemon.spawn();

    assert_eq!(daemon.vm("k")["enabled_state"], 2, "the VM ran on");
    daemon.counter_above("k", counter);
    assert_tidy(&daemon, "k");
    assert_eq!(set.join("manifest.json").exists(), set_survives, "{step}");
    if !set_survives {
        assert!(!set.exists(), "partial set removed after {step}");
    }
    let next = backup(&daemon, "k", &sets.path().join("next"), &["--incremental"]);
    assert_eq!(next["report"]["kind"], "Full", "{step}: {next}");
    let written = quiet_and_off(&daemon, "k");
    let (on_disk, _) = records_in(&daemon.disk("k", 0));
    assert_eq!(on_disk, written, "{step}: the VM lost nothing");
    qemu_img_check_all(&daemon.vm_dir("k"));
}

#[test]
fn daemon_killed_before_the_capture_leaves_the_vm_on_its_disk() {
    daemon_killed_at("backup.before-capture", false);
}

#[test]
fn daemon_killed_after_the_capture_merges_the_overlays_back_at_start() {
    daemon_killed_at("backup.after-capture", false);
}

#[test]
fn daemon_killed_after_the_copy_removes_the_unfinished_set() {
    daemon_killed_at("backup.after-copy", false);
}

#[test]
fn daemon_killed_after_the_manifest_keeps_the_set_and_merges_back() {
    daemon_killed_at("backup.after-manifest", true);
}

#[test]
fn worker_killed_mid_backup_leaves_its_writes_on_the_disk_and_the_vm_restarts() {
    let mut daemon = Daemon::start();
    busy_vm(&daemon, "w");
    let sets = tempfile::tempdir().expect("tempdir");
    let set = sets.path().join("s");
    daemon.kill9();
    daemon.spawn_with(&[], &[("VMMS_FAULT", "backup.after-capture:delay=3000")]);
    let pid = daemon.worker_pids()[0];
    let cli = {
        let store = daemon.path().to_path_buf();
        let set = set.clone();
        std::thread::spawn(move || {
            Command::new(vmms_common::vmms_binary())
                .args([
                    "--store",
                    path_str(&store),
                    "backup-vm",
                    "w",
                    "--to",
                    path_str(&set),
                ])
                .output()
                .expect("backup-vm")
        })
    };
    wait_until("the capture switched the disk", || {
        fs::read_dir(daemon.vm_dir("w").join("disks"))
            .expect("disks")
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains("~backup-"))
    });
    let written_before_kill = daemon.guest_records("w");
    vmms_common::kill9(u64::try_from(pid).expect("pid"));

    let out = cli.join().expect("cli thread");

    // The copy was of the frozen images, complete: the set stands even though the worker died.
    assert!(out.status.success(), "{out:?}");
    daemon.ok(&["test-vm-backup", path_str(&set)]);
    // The recovery action starts a fresh worker on the images the overlays were merged into.
    daemon.wait_state("w", 2);
    wait_until("a new worker runs the VM", || {
        daemon.worker_pids().first().is_some_and(|&p| p != pid)
    });
    assert_tidy(&daemon, "w");
    daemon.ok(&["stop-vm", "w", "--turn-off"]);
    daemon.wait_state("w", 3);
    let (on_disk, _) = records_in(&daemon.disk("w", 0));
    // The guest counts a batch once written and flushes it after: a kill in between may lose
    // that one unflushed batch (a write cache's right), never a flushed record.
    let flushed = written_before_kill.saturating_sub(vmms_guest::protocol::WRITELOOP_BATCH);
    assert!(
        on_disk >= flushed,
        "{on_disk} records on disk, {written_before_kill} written before the kill"
    );
}

#[test]
fn a_guest_without_an_agent_is_backed_up_crash_consistent_and_says_so() {
    let daemon = Daemon::start();
    let sets = tempfile::tempdir().expect("tempdir");
    daemon.start_guest_with_cmdline("mute", "agent=off", sets.path(), &[]);
    let strict = sets.path().join("strict");

    let refused = daemon.fails(&[
        "backup-vm",
        "mute",
        "--to",
        path_str(&strict),
        "--require-app-consistent",
    ]);
    let info = backup(&daemon, "mute", &sets.path().join("set"), &[]);

    assert!(refused.contains("could not be quiesced"), "{refused}");
    assert!(!strict.exists(), "no set from a refused backup");
    assert_eq!(info["report"]["consistency"], "CrashConsistent");
    let reason = info["report"]["consistency_reason"].as_str().unwrap_or("");
    assert!(reason.contains("agent does not answer"), "{info}");
    assert_eq!(daemon.vm("mute")["enabled_state"], 2);
    assert_tidy(&daemon, "mute");
    daemon.ok(&[
        "restore-vm-backup",
        path_str(&sets.path().join("set")),
        "--as",
        "copy",
    ]);
    assert_eq!(records_in(&daemon.disk("copy", 0)).0, 10);
}

#[test]
fn a_freeze_that_never_answers_is_thawed_at_the_limit_and_the_backup_falls_back() {
    let daemon = Daemon::start();
    let sets = tempfile::tempdir().expect("tempdir");
    daemon.start_guest_with_cmdline("stuck", "agent=hang-freeze", sets.path(), &[]);
    let started = std::time::Instant::now();

    let info = backup(
        &daemon,
        "stuck",
        &sets.path().join("set"),
        &["--freeze-limit", "1"],
    );
    let refused = daemon.fails(&[
        "backup-vm",
        "stuck",
        "--to",
        path_str(&sets.path().join("strict")),
        "--freeze-limit",
        "1",
        "--require-app-consistent",
    ]);

    assert!(started.elapsed() >= std::time::Duration::from_secs(1));
    assert_eq!(info["report"]["consistency"], "CrashConsistent");
    let reason = info["report"]["consistency_reason"].as_str().unwrap_or("");
    assert!(reason.contains("did not freeze"), "{info}");
    assert!(refused.contains("could not be quiesced"), "{refused}");
    assert_eq!(
        daemon.vm("stuck")["enabled_state"],
        2,
        "the VM keeps running"
    );
    daemon.console_command("stuck", "write 1", "wrote 1 records, total 11");
    assert_tidy(&daemon, "stuck");
}
