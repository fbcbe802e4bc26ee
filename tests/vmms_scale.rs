//! Many VMs at once, and one bad VM among good ones, through the reference daemon.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod vmms_common;

use std::collections::HashSet;
use std::fs;
use std::process::{Command, Stdio};

use vmms_common::{Daemon, vmms_binary};

#[test]
fn ten_vms_start_concurrently() {
    require_kvm!();
    let daemon = Daemon::start();
    let names: Vec<String> = (0..10).map(|i| format!("vm{i}")).collect();
    for name in &names {
        daemon.new_vm(name, &[]);
    }

    let children: Vec<_> = names
        .iter()
        .map(|name| {
            Command::new(vmms_binary())
                .args(["start-vm", name, "--store"])
                .arg(daemon.path())
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    // Every child is waited for (no short-circuit), then judged.
    let succeeded: Vec<bool> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap().status.success())
        .collect();
    let vms = daemon.vms();

    assert_eq!(succeeded, [true; 10]);
    assert_eq!(vms.len(), 10);
    assert!(vms.iter().all(|vm| vm["enabled_state"] == 2), "{vms:?}");
    let pids: HashSet<u64> = vms
        .iter()
        .filter_map(|vm| vm["process_id"].as_u64())
        .collect();
    assert_eq!(pids.len(), 10, "one worker per VM");
}

#[test]
fn corrupt_config_degrades_only_its_vm() {
    require_kvm!();
    let mut daemon = Daemon::start();
    let bad = daemon.new_vm("bad", &[]);
    daemon.new_vm("good", &[]);
    let bad_id = bad["id"].as_str().unwrap().to_owned();
    daemon.ok(&["stop-daemon"]);
    daemon.kill9();
    fs::write(
        daemon.path().join(format!("vms/{bad_id}/config.json")),
        b"{ not json",
    )
    .unwrap();

    daemon.spawn();
    let degraded = daemon.vm(&bad_id);
    let refused = daemon.fails(&["start-vm", &bad_id]);
    daemon.ok(&["start-vm", "good"]);
    let good = daemon.vm("good");

    assert_eq!(degraded["operational_status"], 3);
    assert_eq!(degraded["enabled_state"], 3);
    assert!(degraded["config"].is_null());
    assert!(
        degraded["status"].as_str().unwrap().contains("config.json"),
        "{degraded}"
    );
    assert_eq!(
        refused,
        format!("start-vm: '{bad_id}': invalid state for this operation (32775)")
    );
    assert_eq!(good["enabled_state"], 2);
    assert_eq!(good["operational_status"], 2);
}
