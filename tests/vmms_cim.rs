//! The CIM-XML endpoint end to end with real WBEM clients from PyPI (pywbem 1.9, pywbemcli) in the
//! venv `scripts/test.sh` creates, against a real `vmms serve` with real workers and guests.
//! Without the venv the tests print why and return.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod vmms_common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vmms_common::{Daemon, vmms_binary};

/// The venv's bin folder: `$VMMS_VENV`, else `~/.cache/vmms/venv`.
fn venv_bin() -> Option<PathBuf> {
    let venv = std::env::var_os("VMMS_VENV")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/vmms/venv")))?;
    let bin = venv.join("bin");
    bin.join("pywbemcli").exists().then_some(bin)
}

macro_rules! require_venv {
    () => {
        match venv_bin() {
            Some(bin) => bin,
            None => {
                eprintln!("skipped: no pywbem venv (scripts/test.sh creates ~/.cache/vmms/venv)");
                return;
            }
        }
    };
}

/// A port free right now on `ip`.
fn free_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A daemon serving CIM-XML on 127.0.0.1 at a free port; returns it and the URL.
fn daemon_with_cim() -> (Daemon, String) {
    let port = free_port("127.0.0.1");
    let listen = format!("127.0.0.1:{port}");
    let daemon = Daemon::start_with(&["--cim-listen", &listen], &[]);
    (daemon, format!("http://{listen}"))
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(name)
}

/// Runs `tests/py/NAME` with the venv's Python against `daemon` at `url`.
fn run_script(bin: &Path, daemon: &Daemon, url: &str, name: &str, env: &[(&str, &str)]) -> Output {
    let output = Command::new(bin.join("python"))
        .arg(script(name))
        .current_dir(script(""))
        // requests prefers these to the CA the test passes.
        .env_remove("REQUESTS_CA_BUNDLE")
        .env_remove("CURL_CA_BUNDLE")
        .env("CIM_URL", url)
        .env("VMMS_BIN", vmms_binary())
        .env("VMMS_STORE", daemon.path())
        .envs(env.iter().copied())
        .output()
        .expect("run python");
    assert!(
        output.status.success(),
        "{name} failed:\n{}\n{}\n--- daemon log ---\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        daemon.log()
    );
    output
}

#[test]
fn pywbem_runs_the_microsoft_sample_flow() {
    require_kvm!();
    let bin = require_venv!();
    let (daemon, url) = daemon_with_cim();

    let output = run_script(&bin, &daemon, &url, "sample_flow.py", &[]);

    assert!(String::from_utf8_lossy(&output.stdout).contains("sample flow ok"));
}

#[test]
fn loopback_client_of_other_user_is_refused_and_root_is_served() {
    require_kvm!();
    let bin = require_venv!();
    let (daemon, url) = daemon_with_cim();

    let output = run_script(&bin, &daemon, &url, "access.py", &[]);

    assert!(String::from_utf8_lossy(&output.stdout).contains("access ok: 65534 refused (403"));
    assert!(
        daemon.log().contains("refused: user 65534 is not allowed"),
        "refusal not logged:\n{}",
        daemon.log()
    );
}

#[test]
fn loopback_client_in_socket_group_is_served() {
    require_kvm!();
    let bin = require_venv!();
    let listen = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let daemon = Daemon::start_with(&["--cim-listen", &listen, "--socket-group", "65534"], &[]);
    let url = format!("http://{listen}");

    let output = run_script(&bin, &daemon, &url, "access.py", &[("EXPECT", "admitted")]);

    assert!(String::from_utf8_lossy(&output.stdout).contains("access ok: 65534 admitted"));
}

#[test]
fn initiate_shutdown_halts_running_test_guest_and_job_completes() {
    require_kvm!();
    let bin = require_venv!();
    let (daemon, url) = daemon_with_cim();

    let output = run_script(&bin, &daemon, &url, "shutdown.py", &[]);

    assert!(String::from_utf8_lossy(&output.stdout).contains("shutdown ok"));
}

#[test]
fn indication_subscription_receives_state_changes_of_cli_started_vm() {
    require_kvm!();
    let bin = require_venv!();
    let (daemon, url) = daemon_with_cim();

    let output = run_script(&bin, &daemon, &url, "indications.py", &[]);

    assert!(String::from_utf8_lossy(&output.stdout).contains("indications ok"));
}

#[test]
fn invalid_namespace_class_key_method_type_and_transition_get_cim_errors() {
    require_kvm!();
    let bin = require_venv!();
    let (daemon, url) = daemon_with_cim();

    let output = run_script(&bin, &daemon, &url, "errors.py", &[]);

    assert!(String::from_utf8_lossy(&output.stdout).contains("errors ok"));
}

#[test]
fn every_cli_verb_has_a_cim_method_equivalent() {
    require_kvm!();
    let bin = require_venv!();
    let (daemon, url) = daemon_with_cim();

    let output = run_script(&bin, &daemon, &url, "verbs.py", &[]);

    assert!(String::from_utf8_lossy(&output.stdout).contains("verbs ok"));
}

#[test]
fn pywbem_modifies_settings_adds_a_disk_and_summarises() {
    let bin = require_venv!();
    let (daemon, url) = daemon_with_cim();

    let output = run_script(&bin, &daemon, &url, "settings.py", &[]);

    assert!(String::from_utf8_lossy(&output.stdout).contains("settings ok"));
}

fn pywbemcli(bin: &Path, url: &str, args: &[&str]) -> String {
    let output = Command::new(bin.join("pywbemcli"))
        .args(["-s", url, "-d", "root/virtualization/v2"])
        .args(args)
        .output()
        .expect("run pywbemcli");
    assert!(
        output.status.success(),
        "pywbemcli {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn pywbemcli_enumerates_gets_shows_classes_and_starts_a_vm() {
    require_kvm!();
    let bin = require_venv!();
    let (daemon, url) = daemon_with_cim();
    let id = daemon.new_vm("cli-web", &[])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path =
        format!(r#"Msvm_ComputerSystem.CreationClassName="Msvm_ComputerSystem",Name="{id}""#);

    let enumerated = pywbemcli(
        &bin,
        &url,
        &["instance", "enumerate", "Msvm_ComputerSystem"],
    );
    let table = pywbemcli(
        &bin,
        &url,
        &[
            "-o",
            "table",
            "instance",
            "enumerate",
            "Msvm_ComputerSystem",
            "--pl",
            "ElementName",
            "--pl",
            "EnabledState",
        ],
    );
    let got = pywbemcli(&bin, &url, &["instance", "get", &path]);
    let class = pywbemcli(
        &bin,
        &url,
        &["class", "get", "Msvm_VirtualSystemManagementService"],
    );
    let invoked = pywbemcli(
        &bin,
        &url,
        &[
            "instance",
            "invokemethod",
            &path,
            "RequestStateChange",
            "-p",
            "RequestedState=2",
        ],
    );
    let running = daemon.wait_state("cli-web", 2);

    assert!(
        enumerated.contains("ElementName = \"cli-web\";"),
        "{enumerated}"
    );
    assert!(
        enumerated.contains("Caption = \"Hosting Computer System\";"),
        "{enumerated}"
    );
    assert!(
        table.contains("cli-web") && table.contains("EnabledState"),
        "{table}"
    );
    assert!(
        got.contains(&format!("Name = \"{id}\";")) && got.contains("EnabledState = 3;"),
        "{got}"
    );
    assert!(class.contains("uint32 DefineSystem("), "{class}");
    assert!(
        class.contains("EmbeddedInstance ( \"Msvm_VirtualSystemSettingData\" )"),
        "{class}"
    );
    assert!(invoked.contains("ReturnValue=4096"), "{invoked}");
    assert!(
        invoked.contains("Msvm_ConcreteJob.InstanceID="),
        "{invoked}"
    );
    assert!(running["process_id"].as_u64().is_some());
}

#[test]
fn tls_and_basic_auth_guard_a_non_loopback_bind() {
    require_kvm!();
    let bin = require_venv!();
    let keys = tempfile::tempdir().unwrap();
    let (cert, key) = (keys.path().join("cert.pem"), keys.path().join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=vmms-test",
        ])
        .args(["-addext", "subjectAltName=IP:127.0.0.2"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let credentials = keys.path().join("credentials");
    std::fs::write(&credentials, "admin:s3cret\n").unwrap();
    // 127.0.0.2 is not one of the two addresses served without TLS, and is never a real interface.
    let listen = format!("127.0.0.2:{}", free_port("127.0.0.2"));
    let plain = Command::new(vmms_binary())
        .args(["serve", "--store"])
        .arg(keys.path().join("refused-store"))
        .args(["--cim-listen", &listen])
        .output()
        .expect("run vmms serve");
    let daemon = Daemon::start_with(
        &[
            "--cim-listen",
            &listen,
            "--cim-cert",
            cert.to_str().unwrap(),
            "--cim-key",
            key.to_str().unwrap(),
            "--cim-credentials",
            credentials.to_str().unwrap(),
        ],
        &[],
    );

    let output = run_script(
        &bin,
        &daemon,
        &format!("https://{listen}"),
        "tls.py",
        &[
            ("CIM_USER", "admin"),
            ("CIM_PASSWORD", "s3cret"),
            ("CIM_CA", cert.to_str().unwrap()),
        ],
    );

    assert!(
        !plain.status.success(),
        "a non-loopback bind without TLS must be refused"
    );
    assert!(String::from_utf8_lossy(&plain.stderr).contains("TLS"));
    assert!(String::from_utf8_lossy(&output.stdout).contains("tls ok"));
}
