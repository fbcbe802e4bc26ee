//! The OCF agent `vmms-ocf` against a real store, a real worker and the test guest, driven by
//! Pacemaker's own tools: `ocf-tester` (Debian resource-agents) and `crm_resource --force-*`
//! (Debian pacemaker-cli-utils, which runs an agent without a cluster).

mod vmms_common;

use std::path::Path;
use std::process::{Command, Output};

use vmms_common::Daemon;

const AGENT: &str = env!("CARGO_BIN_EXE_vmms-ocf");

/// A store with VM `g` defined (Off) and no daemon serving it.
fn store_with_vm() -> Daemon {
    let mut daemon = Daemon::start();
    daemon.new_vm("g", &[]);
    daemon.ok(&["stop-daemon"]);
    daemon.wait_exit();
    daemon
}

fn agent(store: &Path, action: &str) -> Output {
    Command::new(AGENT)
        .arg(action)
        .env("OCF_ROOT", "/usr/lib/ocf")
        .env("OCF_RESKEY_store", store)
        .env("OCF_RESKEY_vm", "g")
        .output()
        .expect("run vmms-ocf")
}

fn code(output: &Output) -> Option<i32> {
    output.status.code()
}

#[test]
fn agent_actions_follow_ocf_exit_codes() {
    require_kvm!();
    let daemon = store_with_vm();
    let store = daemon.path();

    assert_eq!(
        code(&agent(store, "monitor")),
        Some(7),
        "probe of a stopped VM"
    );
    assert_eq!(code(&agent(store, "start")), Some(0));
    assert_eq!(code(&agent(store, "start")), Some(0), "start is idempotent");
    assert_eq!(code(&agent(store, "monitor")), Some(0));
    // Quick migration on one shared store: migrate_to saves, migrate_from restores and confirms.
    assert_eq!(code(&agent(store, "migrate_to")), Some(0));
    assert_eq!(
        code(&agent(store, "monitor")),
        Some(7),
        "saved after migrate_to"
    );
    assert_eq!(code(&agent(store, "migrate_from")), Some(0));
    assert_eq!(
        code(&agent(store, "monitor")),
        Some(0),
        "running after migrate_from"
    );
    assert_eq!(code(&agent(store, "stop")), Some(0));
    assert_eq!(code(&agent(store, "stop")), Some(0), "stop is idempotent");
    assert_eq!(code(&agent(store, "monitor")), Some(7));
    assert_eq!(code(&agent(store, "promote")), Some(3), "unimplemented");
    let meta = agent(store, "meta-data");
    assert!(String::from_utf8_lossy(&meta.stdout).contains("<resource-agent name=\"vmms\""));
}

#[test]
fn ocf_tester_passes() {
    require_kvm!();
    if Command::new("ocf-tester").arg("-h").output().is_err() {
        eprintln!("skipped: ocf-tester is not installed (Debian resource-agents)");
        return;
    }
    let daemon = store_with_vm();
    let out = Command::new("ocf-tester")
        .args(["-n", "vmtest", "-o"])
        .arg(format!("store={}", daemon.path().display()))
        .args(["-o", "vm=g", AGENT])
        .output()
        .expect("run ocf-tester");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("passed all tests"),
        "{text}"
    );
}

#[test]
fn crm_resource_force_start_check_stop() {
    require_kvm!();
    if Command::new("crm_resource")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: crm_resource is not installed (Debian pacemaker-cli-utils)");
        return;
    }
    // crm_resource finds agents under /usr/lib/ocf/resource.d/<provider>/<type>.
    let installed = Path::new("/usr/lib/ocf/resource.d/vmms/vm");
    let _ = std::fs::create_dir_all("/usr/lib/ocf/resource.d/vmms");
    let _ = std::fs::remove_file(installed);
    if std::os::unix::fs::symlink(AGENT, installed).is_err() {
        eprintln!("skipped: cannot install the agent in /usr/lib/ocf/resource.d (not root)");
        return;
    }
    let daemon = store_with_vm();
    let force = |what: &str| {
        Command::new("crm_resource")
            .arg(what)
            .args(["--class", "ocf", "--provider", "vmms", "--agent", "vm"])
            .args(["--option", &format!("store={}", daemon.path().display())])
            .args(["--option", "vm=g"])
            .output()
            .expect("run crm_resource")
            .status
            .code()
    };

    let start = force("--force-start");
    let check_running = force("--force-check");
    let stop = force("--force-stop");
    let check_stopped = force("--force-check");

    assert_eq!(
        (start, check_running, stop, check_stopped),
        (Some(0), Some(0), Some(0), Some(7))
    );
}
