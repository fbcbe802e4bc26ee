//! Worker confinement end to end: real workers under seccomp and Landlock, asked (through the
//! `VMMS_TEST_ESCAPE` test hook) to do what a guest that escaped device emulation would try, and
//! a traced lifecycle that shows the allowlist is no wider than what workers use.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod vmms_common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmms_common::{Daemon, TIMEOUT, wait_until};
use worker_manager::worker::{ALLOWANCE_MARGIN, TEST_ESCAPE_ENV, allowlist_names};

/// A daemon whose worker for the VM named "victim" tries `attempt` once confined, with a second
/// VM "bystander" running beside it.
fn daemon_with_escape(attempt: &str) -> (Daemon, String) {
    let spec = format!("victim:{attempt}");
    let daemon = Daemon::start_with(&[], &[(TEST_ESCAPE_ENV, spec.as_str())]);
    let victim = daemon.new_vm("victim", &["--recovery", "none"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    daemon.new_vm("bystander", &["--recovery", "none"]);
    daemon.ok(&["start-vm", "bystander"]);
    daemon.ok(&["start-vm", "victim"]);
    (daemon, victim)
}

/// Waits for the worker of `id` to log the outcome of its escape attempt; returns the line.
fn escape_outcome(daemon: &Daemon, id: &str) -> String {
    let log = daemon.path().join(format!("run/{id}/worker.log"));
    let mut line = String::new();
    wait_until("the worker logs its escape attempt", || {
        let text = fs::read_to_string(&log).unwrap_or_default();
        match text.lines().find(|l| l.starts_with("escape ")) {
            Some(found) => {
                line = found.to_owned();
                true
            }
            None => false,
        }
    });
    line
}

/// The bystander VM and the daemon are untouched: still running, counter moving.
fn assert_bystander_unaffected(daemon: &Daemon) {
    let before = daemon.counter_above("bystander", 0);
    assert!(daemon.counter_above("bystander", before) > before);
    assert_eq!(daemon.vm("bystander")["health_state"], 5);
}

#[test]
fn reading_etc_shadow_is_refused_and_the_guest_runs_on() {
    require_kvm!();
    let (daemon, victim) = daemon_with_escape("open-shadow");

    let outcome = escape_outcome(&daemon, &victim);

    assert!(
        outcome.contains("refused") && outcome.contains("Permission denied"),
        "{outcome}"
    );
    let before = daemon.counter_above("victim", 0);
    assert!(daemon.counter_above("victim", before) > before);
    assert_bystander_unaffected(&daemon);
}

#[test]
fn writing_outside_its_folders_is_refused() {
    require_kvm!();
    let (daemon, victim) = daemon_with_escape("write-outside");

    let outcome = escape_outcome(&daemon, &victim);
    let pid = daemon.vm("victim")["process_id"].as_u64().unwrap();

    assert!(outcome.contains("refused"), "{outcome}");
    assert!(
        !std::env::temp_dir()
            .join(format!("vmms-escape-{pid}"))
            .exists()
    );
    assert_bystander_unaffected(&daemon);
}

#[test]
fn execve_kills_the_worker_and_is_reported_as_a_bad_system_call() {
    require_kvm!();
    let (daemon, _victim) = daemon_with_escape("exec");

    let vm = daemon.wait_state("victim", 3);

    assert_eq!(vm["health_state"], 25);
    assert_eq!(
        vm["status"],
        "worker killed by its seccomp filter: bad system call"
    );
    assert_bystander_unaffected(&daemon);
}

#[test]
fn opening_a_socket_kills_the_worker_and_is_reported_as_a_bad_system_call() {
    require_kvm!();
    let (daemon, _victim) = daemon_with_escape("socket");

    let vm = daemon.wait_state("victim", 3);

    assert_eq!(vm["health_state"], 25);
    assert!(vm["status"].as_str().unwrap().contains("seccomp"), "{vm}");
    assert_bystander_unaffected(&daemon);
}

#[test]
fn get_vm_shows_the_confinement_and_no_confinement_turns_it_off() {
    require_kvm!();
    let confined = Daemon::start();
    confined.new_vm("g", &[]);
    confined.ok(&["start-vm", "g"]);
    let unconfined = Daemon::start_with(&["--no-confinement"], &[]);
    unconfined.new_vm("g", &[]);
    unconfined.ok(&["start-vm", "g"]);

    let on = confined.vm("g")["worker"]["confinement"].clone();
    let off = unconfined.vm("g")["worker"]["confinement"].clone();

    assert_eq!(on["enabled"], true);
    assert_eq!(on["seccomp"], true);
    assert_eq!(on["no_new_privs"], true);
    assert!(
        on["landlock"]
            .as_str()
            .unwrap()
            .starts_with("fully enforced"),
        "{on}"
    );
    assert_eq!(off["enabled"], false);
    assert_eq!(off["seccomp"], false);
    assert_eq!(off["landlock"], "off");
}

/// Runs one full lifecycle of a VM with a disk (boot, disk writes, console, pause, resume, save,
/// restore, reset, graceful shutdown, boot, turn-off) under a daemon traced by strace.
fn traced_lifecycle(dir: &Path) -> String {
    let store = dir.join("store");
    let trace = dir.join("trace");
    let disk = dir.join("disk.img");
    fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    let binary = vmms_common::vmms_binary();
    let mut strace = Command::new("strace")
        .args(["-f", "-qq", "-o"])
        .arg(&trace)
        .arg(binary)
        .args(["serve", "--store"])
        .arg(&store)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run strace");
    let cli = |args: &[&str]| {
        let out = Command::new(binary)
            .args(args)
            .arg("--store")
            .arg(&store)
            .output()
            .expect("run vmms");
        assert!(
            out.status.success(),
            "vmms {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let deadline = Instant::now() + TIMEOUT * 2;
    while Command::new(binary)
        .args(["get-vm", "--store"])
        .arg(&store)
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "traced daemon never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
    let created: Vec<Value> = serde_json::from_str(&cli(&[
        "new-vm",
        "g",
        "--memory-mib",
        "16",
        "--disk",
        disk.to_str().unwrap(),
        "--output",
        "json",
    ]))
    .unwrap();
    let id = created[0]["id"].as_str().unwrap().to_owned();
    cli(&["start-vm", "g"]);
    console_command(
        &store.join(format!("run/{id}/console.sock")),
        "write 5",
        "wrote 5",
    );
    cli(&["suspend-vm", "g"]);
    cli(&["resume-vm", "g"]);
    cli(&["save-vm", "g"]);
    cli(&["start-vm", "g"]);
    cli(&["restart-vm", "g"]);
    cli(&["stop-vm", "g"]);
    cli(&["start-vm", "g"]);
    cli(&["stop-vm", "g", "--turn-off"]);
    cli(&["stop-daemon"]);
    let _ = strace.wait();
    fs::read_to_string(&trace).expect("trace")
}

/// Types `command` on the guest's console and waits for `answer`.
fn console_command(socket: &Path, command: &str, answer: &str) {
    let mut console = UnixStream::connect(socket).expect("console");
    console
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    console
        .write_all(format!("\r{command}\r").as_bytes())
        .unwrap();
    let deadline = Instant::now() + TIMEOUT * 4;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(answer) {
        assert!(Instant::now() < deadline, "no '{answer}' on the console");
        if let Ok(n) = console.read(&mut buf) {
            seen.extend_from_slice(&buf[..n]);
        }
    }
}

/// Names of the syscalls (and `ioctl` requests) worker threads made after their seccomp filter
/// went on, from an `strace -f` log.
fn calls_after_confinement(trace: &str) -> BTreeSet<String> {
    let mut parent = std::collections::HashMap::new();
    let mut workers = BTreeSet::new();
    let mut confined = BTreeSet::new();
    let mut calls = BTreeSet::new();
    // The worker a thread belongs to: the nearest ancestor that exec'd as a worker.
    let root_of =
        |parent: &std::collections::HashMap<u32, u32>, workers: &BTreeSet<u32>, mut pid: u32| {
            for _ in 0..64 {
                if workers.contains(&pid) {
                    return Some(pid);
                }
                pid = *parent.get(&pid)?;
            }
            None
        };
    for line in trace.lines() {
        let Some((pid, rest)) = line.split_once(char::is_whitespace) else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        let rest = rest.trim_start();
        let name: String = if let Some(resumed) = rest.strip_prefix("<... ") {
            resumed.split_whitespace().next().unwrap_or("").to_owned()
        } else {
            rest.split('(').next().unwrap_or("").to_owned()
        };
        if name.is_empty() || name.starts_with('+') || name.starts_with('-') {
            continue;
        }
        if (name == "clone" || name == "clone3")
            && let Some(child) = rest
                .rsplit("= ")
                .next()
                .and_then(|v| v.trim().parse::<u32>().ok())
        {
            parent.insert(child, pid);
        }
        if name == "execve" && rest.contains("\"worker\"") {
            workers.insert(pid);
            continue;
        }
        let Some(root) = root_of(&parent, &workers, pid) else {
            continue;
        };
        if name == "seccomp" {
            confined.insert(root);
            continue;
        }
        if !confined.contains(&root) || rest.starts_with("<... ") {
            continue;
        }
        if name == "ioctl" {
            // ioctl(FD, REQUEST, ...)
            let request = rest
                .split([',', '('])
                .nth(2)
                .and_then(|r| r.split_whitespace().next());
            if let Some(request) = request {
                calls.insert(request.to_owned());
            }
        }
        calls.insert(name);
    }
    calls
}

#[test]
fn allowlist_holds_nothing_beyond_a_traced_lifecycle_and_its_documented_margin() {
    require_kvm!();
    if Command::new("strace").arg("-V").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "strace must be installed in CI"
        );
        eprintln!("skipped: strace is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();

    let used = calls_after_confinement(&traced_lifecycle(dir.path()));

    let allowed: BTreeSet<String> = allowlist_names().into_iter().map(str::to_owned).collect();
    let margin: BTreeSet<String> = ALLOWANCE_MARGIN
        .iter()
        .map(|(n, _)| (*n).to_owned())
        .collect();
    let unused: Vec<&String> = allowed
        .iter()
        .filter(|name| !used.contains(*name) && !margin.contains(*name))
        .collect();
    let outside: Vec<&String> = used
        .iter()
        .filter(|name| !allowed.contains(*name) && !name.starts_with("0x"))
        .collect();
    println!(
        "a confined lifecycle called {} of {} allowed entries",
        used.len(),
        allowed.len()
    );
    assert!(
        used.contains("KVM_RUN"),
        "the trace saw confined workers run: {used:?}"
    );
    assert!(
        unused.is_empty(),
        "allowed but neither used nor in the margin: {unused:?}"
    );
    assert!(
        outside.is_empty(),
        "used but not allowed (the worker would have died): {outside:?}"
    );
}
