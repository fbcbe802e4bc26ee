//! Fixtures for the worker-manager integration tests: a store with one VM definition, a launcher
//! running the crate's real `vmms-worker` binary, and a console client.
#![allow(dead_code, missing_docs)]

pub mod images;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use vmm_core::{EventSink, LaunchMode, VmConfig, VmId, WorkerEvent, WorkerLauncher};
use worker_manager::{LauncherOptions, ProcessLauncher};

/// Generous bound for anything asynchronous; tests finish far sooner unless broken.
pub const TIMEOUT: Duration = Duration::from_secs(20);

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

/// A temporary store, a launcher for it and the events its workers send.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub launcher: ProcessLauncher,
    pub events: Receiver<WorkerEvent>,
    sink: EventSink,
}

impl Fixture {
    pub fn new() -> Self {
        Self::with_options(LauncherOptions::default())
    }

    pub fn with_options(options: LauncherOptions) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let launcher = ProcessLauncher::new(
            dir.path(),
            env!("CARGO_BIN_EXE_vmms-worker"),
            Vec::<String>::new(),
        )
        .with_options(options);
        // As a daemon does once it is up: VMs then start on pool workers, as they do in use.
        launcher.fill_pool();
        if launcher.options().pool_size > 0 {
            let deadline = Instant::now() + TIMEOUT;
            while launcher.idle_workers().is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let (tx, events) = mpsc::channel();
        let sink = EventSink::new(VmId::new_random(), move |e| tx.send(e).is_ok());
        Fixture {
            dir,
            launcher,
            events,
            sink,
        }
    }

    /// A fresh, empty staging folder and the (absent) saved-state folder a save commits to,
    /// inside the VM's folder as the service lays them out (a confined worker can write nowhere
    /// else).
    pub fn save_paths(&self, vm: VmId) -> (std::path::PathBuf, std::path::PathBuf) {
        let store = vmm_core::Store::open(self.dir.path()).unwrap();
        let staging = store.saving_dir(vm);
        std::fs::create_dir(&staging).unwrap();
        (staging, store.state_dir(vm))
    }

    pub fn sink(&self) -> EventSink {
        self.sink.clone()
    }

    /// Writes `config` into the store as the service would.
    pub fn define(&self, config: &VmConfig) {
        let vm_dir = self.dir.path().join("vms").join(config.id.to_string());
        fs::create_dir_all(vm_dir.join("disks")).expect("vm dir");
        fs::write(
            vm_dir.join("config.json"),
            serde_json::to_vec_pretty(config).expect("encode"),
        )
        .expect("config.json");
    }

    /// A small test-guest VM, defined.
    pub fn small_vm(&self, name: &str) -> VmConfig {
        let mut config = VmConfig::new(name);
        config.memory_mib = 16;
        self.define(&config);
        config
    }

    /// Launches `config`'s worker, booting.
    pub fn boot(&self, config: &VmConfig) -> Box<dyn vmm_core::Worker> {
        self.launcher
            .launch(config, LaunchMode::Boot, self.sink())
            .expect("launch")
    }

    pub fn next_event(&self) -> WorkerEvent {
        self.events.recv_timeout(TIMEOUT).expect("a worker event")
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Kill whatever worker a failed test left running.
        let run = self.dir.path().join("run");
        for entry in fs::read_dir(run).into_iter().flatten().flatten() {
            if let Some(pid) = fs::read_to_string(entry.path().join("pid"))
                .ok()
                .and_then(|t| t.trim().parse::<i32>().ok())
            {
                // SAFETY: kill only sends a signal.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// The test guest's counter as `vm`'s attached worker reports it.
pub fn counter(launcher: &ProcessLauncher, vm: VmId) -> u64 {
    launcher
        .report(vm, TIMEOUT)
        .expect("an attached worker")
        .expect("report")
        .test_guest
        .expect("test guest counters")
        .counter
}

/// A console connection that collects what the guest prints.
pub struct Console {
    stream: UnixStream,
    seen: Vec<u8>,
}

impl Console {
    pub fn attach(socket: &Path) -> Self {
        let stream = UnixStream::connect(socket).expect("console socket");
        stream
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        Console {
            stream,
            seen: Vec::new(),
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen).into_owned()
    }

    /// Reads until the output after byte `from` contains `needle`; returns the offset past it.
    pub fn wait_for(&mut self, needle: &str, from: usize) -> usize {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let text = self.text();
            if let Some(at) = text.get(from..).and_then(|t| t.find(needle)) {
                return from + at + needle.len();
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {needle:?}; console so far:\n{text}"
            );
            let mut buf = [0u8; 4096];
            match self.stream.read(&mut buf) {
                Ok(0) => panic!("console closed while waiting for {needle:?}:\n{text}"),
                Ok(n) => self.seen.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
    }

    pub fn send(&mut self, line: &str) {
        self.stream
            .write_all(line.as_bytes())
            .expect("console write");
    }

    /// Sends `status` and returns the counter from the reply.
    pub fn status_counter(&mut self) -> u64 {
        let from = self.seen.len();
        self.send("status\r");
        let value_at = self.wait_for("counter=", from);
        let end = self.wait_for(" ", value_at);
        self.text()[value_at..end - 1]
            .parse()
            .expect("counter value")
    }
}

/// Whether process `pid` runs (exists and is not a zombie).
pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| stat.contains(") Z "))
}

/// Polls `done` until it holds; fails the test naming `what` after [`TIMEOUT`].
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
