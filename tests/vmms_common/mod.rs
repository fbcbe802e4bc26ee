//! Shared fixture of the daemon + CLI tests: a real `vmms serve` process on a temporary store,
//! the real CLI, real worker processes and the real test guest. Everything a test started is
//! killed when its [`Daemon`] drops, also when the test fails.
#![allow(dead_code, missing_docs)]

use std::fs;
use std::os::unix::process::CommandExt;
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

/// A copy of the `vmms` binary that any user can run: the build's own may sit below a folder
/// only its owner can enter (a clone or target folder under /root), and a test that runs the CLI
/// as another user must reach the daemon's checks, not fail at exec.
pub fn binary_for_other_users() -> &'static Path {
    static COPY: OnceLock<PathBuf> = OnceLock::new();
    COPY.get_or_init(|| {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("vmms-cli-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("folder for the shared binary");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod folder");
        let copy = dir.join("vmms");
        fs::copy(vmms_binary(), &copy).expect("copy the vmms binary");
        fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).expect("chmod binary");
        copy
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
        "wmi-model/src",
        "vswitch/src",
        "guest/firmware/src",
        "cluster-resource/src",
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

/// How a test starts its daemon, beyond the defaults (stdout and stderr into `daemon.log`).
#[derive(Debug, Default)]
pub struct Launch {
    /// The umask the daemon process starts with.
    pub umask: Option<libc::mode_t>,
    /// Its `RLIMIT_NOFILE`, soft and hard (what `prlimit --nofile=N` sets).
    pub nofile: Option<u64>,
    /// Its stdout: this pipe (the test decides when its reader goes away) instead of the log.
    pub stdout: Option<std::io::PipeWriter>,
    /// Extra arguments to `vmms serve`.
    pub args: Vec<String>,
    /// Extra environment variables (its workers inherit them).
    pub env: Vec<(String, String)>,
    /// The store root's mode before the daemon first starts (a world-writable store, say).
    pub store_mode: Option<u32>,
}

/// A [`Launch`] with just extra `serve` arguments and environment.
fn launch_of(args: &[&str], env: &[(&str, &str)]) -> Launch {
    Launch {
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        env: env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Launch::default()
    }
}

/// A daemon on its own temporary store.
pub struct Daemon {
    pub store: tempfile::TempDir,
    child: Option<Child>,
}

impl Daemon {
    /// Starts `vmms serve` on a fresh store and waits until it answers.
    pub fn start() -> Self {
        let mut daemon = Daemon {
            store: tempfile::tempdir().expect("tempdir"),
            child: None,
        };
        daemon.spawn();
        daemon
    }

    pub fn path(&self) -> &Path {
        self.store.path()
    }

    /// Starts `vmms serve` as `launch` says on a fresh store, and waits until it answers.
    pub fn start_launch(launch: Launch) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let mut daemon = Daemon {
            store: tempfile::tempdir().expect("tempdir"),
            child: None,
        };
        if let Some(mode) = launch.store_mode {
            fs::set_permissions(daemon.path(), fs::Permissions::from_mode(mode))
                .expect("chmod store");
        }
        daemon.spawn_launch(launch);
        daemon
    }

    /// Starts the daemon process (again) on this store.
    pub fn spawn(&mut self) {
        self.spawn_launch(Launch::default());
    }

    /// Starts the daemon process (again) with extra `serve` arguments and environment
    /// variables (its workers inherit the environment), and waits until it answers.
    pub fn spawn_with(&mut self, args: &[&str], env: &[(&str, &str)]) {
        self.spawn_launch(launch_of(args, env));
    }

    /// Starts the daemon process (again) on this store as `launch` says, and waits until it
    /// answers.
    pub fn spawn_launch(&mut self, launch: Launch) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path().join("daemon.log"))
            .expect("daemon log");
        let stdout = match launch.stdout {
            Some(pipe) => Stdio::from(pipe),
            None => Stdio::from(log.try_clone().expect("log")),
        };
        let mut command = Command::new(vmms_binary());
        command
            .args(["serve", "--store"])
            .arg(self.path())
            .args(&launch.args)
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log);
        let (umask, nofile) = (launch.umask, launch.nofile);
        // SAFETY: the closure runs in the forked child before exec and calls only umask and
        // setrlimit, which are async-signal-safe, on values it owns.
        unsafe {
            command.pre_exec(move || {
                if let Some(mask) = umask {
                    libc::umask(mask);
                }
                if let Some(n) = nofile {
                    let limit = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("spawn vmms serve");
        self.child = Some(child);
        let deadline = Instant::now() + TIMEOUT;
        while !self.vmms(&["get-vm"]).status.success() {
            let exited = self.has_exited();
            assert!(
                !exited && Instant::now() < deadline,
                "the daemon {} instead of answering; its log:\n{}",
                if exited {
                    "exited"
                } else {
                    "did not answer in time"
                },
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `timeout` for the daemon process to exit; its status if it did.
    pub fn exited_within(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut()?;
            if let Some(status) = child.try_wait().expect("poll daemon") {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM to the daemon, without waiting.
    pub fn send_sigterm(&self) {
        // SAFETY: kill only sends a signal, to the daemon this fixture started.
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
    }

    /// Whether the store's lock is free (no daemon holds it).
    pub fn store_lock_is_free(&self) -> bool {
        use std::os::fd::AsRawFd;
        let Ok(file) = fs::File::open(self.path().join("vmms.lock")) else {
            return true;
        };
        // SAFETY: flock only acts on the descriptor `file` owns; closing it releases our lock.
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
    }

    /// Runs the CLI against this store as user and group `id` (no supplementary groups); the
    /// test must run as root.
    pub fn vmms_as(&self, id: u32, args: &[&str]) -> Output {
        Command::new(binary_for_other_users())
            .args(args)
            .arg("--store")
            .arg(self.path())
            .uid(id)
            .gid(id)
            .current_dir("/")
            .stdin(Stdio::null())
            .output()
            .expect("run vmms as another user")
    }

    /// Runs the CLI, killing it if it has not finished within `timeout` (`None` then).
    pub fn vmms_within(&self, args: &[&str], timeout: Duration) -> Option<Output> {
        let mut child = Command::new(vmms_binary())
            .args(args)
            .arg("--store")
            .arg(self.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run vmms");
        let deadline = Instant::now() + timeout;
        while child.try_wait().expect("poll vmms").is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
        Some(child.wait_with_output().expect("vmms output"))
    }

    /// The daemon's resident memory in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    /// Starts a daemon on a fresh store with extra `serve` arguments and environment.
    pub fn start_with(args: &[&str], env: &[(&str, &str)]) -> Self {
        Daemon::start_launch(launch_of(args, env))
    }

    /// Whether the daemon process has exited (reaping it if so).
    pub fn has_exited(&mut self) -> bool {
        let exited = match self.child.as_mut() {
            Some(child) => child.try_wait().expect("try_wait daemon").is_some(),
            None => true,
        };
        if exited {
            self.child = None;
        }
        exited
    }

    /// Waits until the daemon process has exited by itself (a fault injected into it).
    pub fn wait_exit(&mut self) {
        wait_until("the daemon exits", || self.has_exited());
    }

    /// Pids of live worker processes of this store, found from `/proc` (not from pid files,
    /// which a crash can leave wrong): every process whose command line is `… worker … --store
    /// <this store>`.
    pub fn live_workers(&self) -> Vec<u64> {
        let store = self.path().as_os_str().as_encoded_bytes().to_vec();
        let mut pids = Vec::new();
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            let is_worker = args.iter().any(|a| *a == b"worker");
            let ours = args
                .windows(2)
                .any(|w| w[0] == b"--store" && w[1] == store.as_slice());
            // A pool worker runs a VM once it was given one, which it holds the lock of; until
            // then it is the daemon's idle worker, no VM's.
            let idle = args.iter().any(|a| *a == b"--pool") && !holds_worker_lock(pid);
            if is_worker && ours && !idle && alive(pid) {
                pids.push(pid);
            }
        }
        pids.sort_unstable();
        pids
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

    /// The test guest's counter inside the saved memory image of the VM with GUID `id` (RAM
    /// from address 0, in order).
    pub fn saved_counter(&self, id: &str) -> u64 {
        let path = self.path().join(format!("vms/{id}/state/memory.bin"));
        let image = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let at = vmms::guest::protocol::STATUS_GPA as usize + 8;
        u64::from_le_bytes(image[at..at + 8].try_into().expect("8 bytes"))
    }

    /// The folder of VM `target` in the store (`vms/<GUID>`).
    pub fn vm_dir(&self, target: &str) -> PathBuf {
        let id = self.vm(target)["id"].as_str().expect("id").to_owned();
        self.path().join("vms").join(id)
    }

    /// The absolute path of disk `index` of VM `target` (its live layer).
    pub fn disk(&self, target: &str, index: usize) -> PathBuf {
        let vm = self.vm(target);
        let disk = Path::new(vm["config"]["disks"][index]["path"].as_str().expect("disk"));
        if disk.is_absolute() {
            disk.to_path_buf()
        } else {
            self.vm_dir(target).join("disks").join(disk)
        }
    }

    /// Records the test guest has written (or found on its disk at boot), from its worker's
    /// report.
    pub fn guest_records(&self, target: &str) -> u64 {
        let mut records = None;
        wait_until(&format!("{target}'s guest publishes its records"), || {
            records = self.worker_report(target)["test_guest"]["records"].as_u64();
            records.is_some()
        });
        records.expect("records in the worker report")
    }

    /// Defines and starts VM `name` booting the test guest as a kernel (its image written into
    /// `dir`) with `cmdline` (`agent=off`, `agent=hang-freeze`, …), an 8 MiB disk and the
    /// `extra` `new-vm` arguments, and writes 10 records.
    pub fn start_guest_with_cmdline(&self, name: &str, cmdline: &str, dir: &Path, extra: &[&str]) {
        let elf = dir.join(format!("{name}.elf"));
        fs::write(&elf, vmms::guest::ELF).expect("guest image");
        let mut args = vec![
            "--kernel",
            path_str(&elf),
            "--cmdline",
            cmdline,
            "--new-disk",
            "8M",
        ];
        args.extend_from_slice(extra);
        self.new_vm(name, &args);
        self.ok(&["start-vm", name]);
        self.console_command(name, "write 10", "wrote 10 records, total 10");
    }

    /// The test guest's counter in `target`'s worker report.
    pub fn counter(&self, target: &str) -> u64 {
        // A worker just started (a pooled one reports as soon as it is ready) may answer before
        // the guest has published its status block: ask again until the counter is there.
        let mut counter = None;
        wait_until(&format!("{target}'s guest publishes its counter"), || {
            counter = self.worker_report(target)["test_guest"]["counter"].as_u64();
            counter.is_some()
        });
        counter.unwrap_or_else(|| panic!("no guest counter in {target}'s report"))
    }

    /// The live report of `target`'s worker. `get-vm` leaves it out when the worker does not
    /// answer within its short deadline, as happens on a loaded host: this asks again.
    pub fn worker_report(&self, target: &str) -> Value {
        let mut report = Value::Null;
        wait_until(&format!("{target}'s worker reports"), || {
            report = self.vm(target)["worker"].clone();
            !report["test_guest"]["counter"].is_null() || !report["confinement"].is_null()
        });
        report
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
        for pid in self.live_workers() {
            kill9(pid);
        }
    }
}

/// Whether process `pid` has a VM's `worker.lock` open.
pub fn holds_worker_lock(pid: u64) -> bool {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| fs::read_link(fd.path()).ok())
        .any(|target| target.file_name().is_some_and(|n| n == "worker.lock"))
}

/// Pids of the daemon's idle pool workers (`worker --pool`, no VM's lock held).
pub fn idle_pool_workers(store: &Path) -> Vec<u64> {
    let store = store.as_os_str().as_encoded_bytes().to_vec();
    let mut pids: Vec<u64> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u64>().ok()?;
            let cmdline = fs::read(entry.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            let pool = args.iter().any(|a| *a == b"--pool");
            let ours = args
                .windows(2)
                .any(|w| w[0] == b"--store" && w[1] == store.as_slice());
            (pool && ours && alive(pid) && !holds_worker_lock(pid)).then_some(pid)
        })
        .collect();
    pids.sort_unstable();
    pids
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

/// Whether `done` becomes true within [`TIMEOUT`] (for things that happen asynchronously, such
/// as a line reaching the daemon's log).
pub fn eventually(mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + TIMEOUT;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
    true
}

pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

impl Daemon {
    /// Types `command` on running VM `target`'s console and waits for a line containing
    /// `answer`; returns everything seen.
    pub fn console_command(&self, target: &str, command: &str, answer: &str) -> String {
        use std::io::{Read, Write};
        let id = self.vm(target)["id"].as_str().expect("id").to_owned();
        let socket = self.path().join(format!("run/{id}/console.sock"));
        let mut console = std::os::unix::net::UnixStream::connect(&socket)
            .unwrap_or_else(|e| panic!("console {}: {e}", socket.display()));
        console
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        console
            .write_all(format!("\r{command}\r").as_bytes())
            .expect("type");
        let deadline = Instant::now() + TIMEOUT * 4;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains(answer) {
            assert!(
                Instant::now() < deadline,
                "no '{answer}' after '{command}' on {target}'s console: {}",
                String::from_utf8_lossy(&seen)
            );
            if let Ok(n) = console.read(&mut buf) {
                seen.extend_from_slice(&buf[..n]);
            }
        }
        String::from_utf8_lossy(&seen).into_owned()
    }
}

/// Runs `qemu-img check` on every qcow2 image under `dir` and insists it finds nothing.
pub fn qemu_img_check_all(dir: &Path) {
    let mut images = Vec::new();
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in fs::read_dir(&folder).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                folders.push(path);
            } else if path.extension().is_some_and(|e| e == "qcow2") {
                images.push(path);
            }
        }
    }
    for image in images {
        let out = Command::new("qemu-img")
            .args(["check", "-q"])
            .arg(&image)
            .output()
            .expect("qemu-img runs (apt-get install qemu-utils)");
        assert!(
            out.status.success(),
            "qemu-img check {}: {}{}",
            image.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Daemon {
    /// The names of `target`'s checkpoints (`get-vm-checkpoint -o json`), sorted.
    pub fn checkpoint_names(&self, target: &str) -> Vec<String> {
        let text = self.ok(&["get-vm-checkpoint", target, "--output", "json"]);
        let tree: Value = serde_json::from_str(&text).expect("get-vm-checkpoint json");
        let mut names: Vec<String> = tree["checkpoints"]
            .as_array()
            .expect("checkpoints")
            .iter()
            .map(|c| c["name"].as_str().expect("name").to_owned())
            .collect();
        names.sort();
        names
    }
}

/// `p` as the UTF-8 argument a CLI call takes.
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The valid test-guest records at the start of `image` (any format, read through its chain
/// with `qemu-img`), and whether the block after them was never written (no torn record at the
/// end).
pub fn records_in(image: &Path) -> (u64, bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("disk.raw");
    let converted = Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw"])
        .arg(image)
        .arg(&raw)
        .status()
        .expect("qemu-img");
    assert!(converted.success(), "qemu-img convert {}", image.display());
    let bytes = fs::read(&raw).expect("raw image");
    let count = vmms::guest::count_records(&bytes[..]).expect("count");
    vmms::guest::verify_records(&bytes[..], count).expect("records whole");
    let at = usize::try_from(count * 4096).expect("offset");
    let next_clean = bytes
        .get(at..at + 4096)
        .is_none_or(|block| block.iter().all(|&b| b == 0));
    (count, next_clean)
}
