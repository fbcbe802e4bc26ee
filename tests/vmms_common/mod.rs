//! Shared fixture of the daemon + CLI tests: a real `vmms serve` process on a temporary store,
//! the real CLI, real worker processes and the real test guest. Everything a test started is
//! killed when its [`Daemon`] drops, also when the test fails.
#![allow(dead_code, missing_docs)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

/// Generous bound for anything asynchronous; tests finish far sooner unless broken.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Returns early (skipping the test, with the reason printed) when /dev/kvm is missing.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("skipped: /dev/kvm is not available on this host");
            return;
        }
    };
}

/// The `vmms` example binary of the profile this test was built with, built first if it is
/// missing or older than the sources it is made of.
pub fn vmms_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let test_exe = std::env::current_exe().expect("test executable");
        // target/<profile>/deps/<test> → target/<profile>/examples/vmms
        let profile_dir = test_exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>/deps");
        let binary = profile_dir.join("examples").join("vmms");
        if is_stale(&binary) {
            let release = profile_dir.file_name().is_some_and(|n| n == "release");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut build = Command::new(cargo);
            build
                .args(["build", "--example", "vmms"])
                .current_dir(env!("CARGO_MANIFEST_DIR"));
            if release {
                build.arg("--release");
            }
            let status = build.status().expect("run cargo build --example vmms");
            assert!(status.success(), "cargo build --example vmms failed");
        }
        assert!(
            binary.exists(),
            "{} is missing; build it with `cargo build --example vmms`",
            binary.display()
        );
        binary
    })
}

/// Whether `binary` is missing or older than any source file it is built from.
fn is_stale(binary: &Path) -> bool {
    let Ok(built) = fs::metadata(binary).and_then(|m| m.modified()) else {
        return true;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sources = [
        "examples/vmms",
        "worker-manager/src",
        "vmm-core/src",
        "partition/src",
    ];
    sources
        .iter()
        .any(|dir| newest(&root.join(dir)).is_some_and(|changed| changed > built))
}

fn newest(dir: &Path) -> Option<SystemTime> {
    let mut latest = None;
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let time = if path.is_dir() {
            newest(&path)
        } else {
            entry.metadata().and_then(|m| m.modified()).ok()
        };
        latest = latest.max(time);
    }
    latest
}

/// A daemon on its own temporary store.
pub struct Daemon {
    pub store: tempfile::TempDir,
    child: Option<Child>,
    /// Extra `vmms serve` arguments (kept for restarts).
    serve_args: Vec<String>,
}

impl Daemon {
    /// Starts `vmms serve` on a fresh store and waits until it answers.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts `vmms serve ARGS…` on a fresh store and waits until it answers.
    pub fn start_with(args: &[&str]) -> Self {
        let mut daemon = Daemon {
            store: tempfile::tempdir().expect("tempdir"),
            child: None,
            serve_args: args.iter().map(|a| (*a).to_owned()).collect(),
        };
        daemon.spawn();
        daemon
    }

    pub fn path(&self) -> &Path {
        self.store.path()
    }

    /// Starts the daemon process (again) on this store.
    pub fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path().join("daemon.log"))
            .expect("daemon log");
        let child = Command::new(vmms_binary())
            .args(["serve", "--store"])
            .arg(self.path())
            .args(&self.serve_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn vmms serve");
        self.child = Some(child);
        wait_until("the daemon answers", || {
            self.vmms(&["get-vm"]).status.success()
        });
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// `kill -9` the daemon (its workers are not touched).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill daemon");
            child.wait().expect("reap daemon");
        }
    }

    /// SIGTERM to the daemon; waits for it to exit and returns whether it exited with success.
    pub fn terminate(&mut self) -> bool {
        let mut child = self.child.take().expect("daemon running");
        // SAFETY: kill only sends a signal, to the daemon this fixture started.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().expect("reap daemon").success()
    }

    /// Runs the CLI against this store.
    pub fn vmms(&self, args: &[&str]) -> Output {
        Command::new(vmms_binary())
            .args(args)
            .arg("--store")
            .arg(self.path())
            .stdin(Stdio::null())
            .output()
            .expect("run vmms")
    }

    /// Runs the CLI and insists it succeeds; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.vmms(args);
        assert!(
            out.status.success(),
            "vmms {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the CLI, insists it fails, and returns its one-line error.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.vmms(args);
        assert!(!out.status.success(), "vmms {args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).trim().to_owned()
    }

    /// `get-vm TARGET --output json`, the one VM.
    pub fn vm(&self, target: &str) -> Value {
        let text = self.ok(&["get-vm", target, "--output", "json"]);
        let mut list: Vec<Value> = serde_json::from_str(&text).expect("get-vm json");
        list.pop().expect("one vm")
    }

    /// `get-vm --output json`, every VM.
    pub fn vms(&self) -> Vec<Value> {
        serde_json::from_str(&self.ok(&["get-vm", "--output", "json"])).expect("get-vm json")
    }

    /// `new-vm NAME` with 16 MiB and the extra arguments.
    pub fn new_vm(&self, name: &str, extra: &[&str]) -> Value {
        let mut args = vec!["new-vm", name, "--memory-mib", "16"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--output", "json"]);
        let mut list: Vec<Value> = serde_json::from_str(&self.ok(&args)).expect("new-vm json");
        list.pop().expect("one vm")
    }

    /// The test guest's counter in `target`'s worker report.
    pub fn counter(&self, target: &str) -> u64 {
        let vm = self.vm(target);
        vm["worker"]["test_guest"]["counter"]
            .as_u64()
            .unwrap_or_else(|| panic!("no guest counter in {vm}"))
    }

    /// Waits until the guest's counter exceeds `above`; returns it.
    pub fn counter_above(&self, target: &str, above: u64) -> u64 {
        let mut value = 0;
        wait_until("the guest counter advances", || {
            value = self.counter(target);
            value > above
        });
        value
    }

    /// Waits until `target`'s EnabledState code is `code`.
    pub fn wait_state(&self, target: &str, code: u64) -> Value {
        let mut vm = Value::Null;
        wait_until(&format!("{target} reaches EnabledState {code}"), || {
            vm = self.vm(target);
            vm["enabled_state"] == code
        });
        vm
    }

    /// `get-vm-event TARGET --output json`.
    pub fn events(&self, target: &str) -> Vec<Value> {
        serde_json::from_str(&self.ok(&["get-vm-event", target, "--output", "json"]))
            .expect("events json")
    }

    /// The daemon's log, for failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(self.path().join("daemon.log")).unwrap_or_default()
    }

    /// Pids of every worker that has a pid file in the store.
    pub fn worker_pids(&self) -> Vec<i32> {
        fs::read_dir(self.path().join("run"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| fs::read_to_string(entry.path().join("pid")).ok())
            .filter_map(|text| text.trim().parse().ok())
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        for pid in self.worker_pids() {
            // SAFETY: kill only sends a signal, to a worker this test's daemon started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Whether process `pid` exists and is not a zombie.
pub fn alive(pid: u64) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| !stat.contains(") Z "))
}

/// `kill -9 pid`.
pub fn kill9(pid: u64) {
    // SAFETY: kill only sends a signal.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(20));
    }
}
