//! The guest's integration services through the CLI: `get-vm` shows whether the VM's agent
//! answers (Hyper-V's heartbeat) without asking the guest, and `stop-vm` asks the agent to shut
//! the guest down.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod vmms_common;

use vmms_common::{Daemon, wait_until};

#[test]
fn get_vm_shows_the_agent_heartbeat_and_stop_vm_shuts_down_through_it() {
    require_kvm!();
    let daemon = Daemon::start();
    let created = daemon.new_vm("beat", &[]);
    let id = created["id"].as_str().unwrap().to_owned();
    let off = daemon.vm("beat");
    daemon.ok(&["start-vm", "beat"]);

    wait_until("the heartbeat turns OK", || {
        daemon.vm("beat")["heartbeat"] == "Ok"
    });
    let table = daemon.ok(&["get-vm", "beat"]);
    let out = daemon.vmms(&["stop-vm", "beat"]);
    let stopped = daemon.vm("beat");

    assert!(off["heartbeat"].is_null(), "{off}");
    let header = table.lines().next().unwrap();
    assert!(header.contains("Heartbeat"), "{table}");
    assert!(table.lines().nth(1).unwrap().contains("OK"), "{table}");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stopped["enabled_state"], 3);
    assert!(stopped["heartbeat"].is_null(), "{stopped}");
    let worker_log =
        std::fs::read_to_string(daemon.path().join("run").join(&id).join("worker.log"))
            .unwrap_or_default();
    assert!(
        worker_log.contains("asked the guest's agent to shut down"),
        "the shutdown went through the agent:\n{worker_log}"
    );
}
