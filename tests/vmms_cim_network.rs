//! The networking classes through pywbem (`tests/py/network.py`) against a real daemon, inside a
//! network namespace of the test's own (its loopback brought up for the CIM listener).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod vmms_common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use vmms_common::{Daemon, vmms_binary};
use vswitch::netlink::{Netlink, link_index};

fn venv_bin() -> Option<PathBuf> {
    let venv = std::env::var_os("VMMS_VENV")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/vmms/venv")))?;
    let bin = venv.join("bin");
    bin.join("pywbemcli").exists().then_some(bin)
}

#[test]
fn pywbem_creates_a_switch_and_a_nic_and_connects_them() {
    let Some(bin) = venv_bin() else {
        eprintln!("skipped: no pywbem venv (scripts/test.sh creates ~/.cache/vmms/venv)");
        return;
    };
    // SAFETY: unshare takes flags by value; this thread and what it starts move namespaces.
    assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
    Netlink::open()
        .unwrap()
        .set_up(link_index("lo").unwrap(), true)
        .unwrap();
    let port = TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let daemon = Daemon::start_with(&["--cim-listen", &listen], &[]);
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py");

    let output = Command::new(bin.join("python"))
        .arg(scripts.join("network.py"))
        .current_dir(&scripts)
        .env_remove("REQUESTS_CA_BUNDLE")
        .env_remove("CURL_CA_BUNDLE")
        .env("CIM_URL", format!("http://{listen}"))
        .env("VMMS_BIN", vmms_binary())
        .env("VMMS_STORE", daemon.path())
        .output()
        .expect("run python");

    assert!(
        output.status.success(),
        "network.py failed:\n{}\n{}\n--- daemon log ---\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        daemon.log()
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("network ok"));
}
