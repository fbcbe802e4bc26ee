//! Fixture of the cluster tests: a real 3-member etcd cluster (Debian's etcd-server) on free
//! loopback ports with its data in a temporary folder, and real `vmms serve --cluster` nodes
//! sharing one store. Everything started is killed when its owner drops.
#![allow(dead_code, missing_docs)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Lease TTL of the test nodes (the default).
pub const TTL_S: u64 = 3;

/// Returns early (skipping the test) when etcd is not installed.
#[macro_export]
macro_rules! require_etcd {
    () => {
        if std::process::Command::new("etcd")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("skipped: etcd is not installed (Debian etcd-server)");
            return;
        }
    };
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A 3-member etcd cluster.
pub struct Etcd {
    dir: PathBuf,
    client_ports: Vec<u16>,
    peer_ports: Vec<u16>,
    members: Vec<Option<Child>>,
}

impl Etcd {
    /// Starts three members and waits until each answers. A port picked free can be taken by
    /// another test before etcd binds it (tests run in parallel), so a cluster whose member dies
    /// at start is started again on new ports, in a fresh folder.
    pub fn start(dir: &Path) -> Self {
        let mut failures = Vec::new();
        for attempt in 0..3 {
            let attempt_dir = dir.join(format!("etcd-{attempt}"));
            std::fs::create_dir_all(&attempt_dir).expect("etcd folder");
            let mut etcd = Etcd {
                dir: attempt_dir,
                client_ports: (0..3).map(|_| free_port()).collect(),
                peer_ports: (0..3).map(|_| free_port()).collect(),
                members: vec![None, None, None],
            };
            for i in 0..3 {
                etcd.start_member(i);
            }
            match etcd.ready_within(Duration::from_secs(60)) {
                Ok(()) => return etcd,
                Err(why) => failures.push(why),
            }
        }
        panic!("etcd did not start: {failures:#?}");
    }

    /// `host:port,…` of every member.
    pub fn endpoints(&self) -> String {
        self.client_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn start_member(&mut self, i: usize) {
        let cluster: Vec<String> = (0..3)
            .map(|j| format!("m{j}=http://127.0.0.1:{}", self.peer_ports[j]))
            .collect();
        let client = format!("http://127.0.0.1:{}", self.client_ports[i]);
        let peer = format!("http://127.0.0.1:{}", self.peer_ports[i]);
        let log = std::fs::File::create(self.dir.join(format!("m{i}.log"))).expect("etcd log");
        let child = Command::new("etcd")
            .args(["--name", &format!("m{i}")])
            .arg("--data-dir")
            .arg(self.dir.join(format!("m{i}")))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &cluster.join(",")])
            .args(["--initial-cluster-state", "new"])
            // Leader election well within the nodes' lease TTL.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd (Debian etcd-server)");
        self.members[i] = Some(child);
    }

    fn wait_ready(&mut self) {
        if let Err(why) = self.ready_within(Duration::from_secs(60)) {
            panic!("{why}");
        }
    }

    /// Waits until every running member serves clients; says which did not, and why (the tail
    /// of its log), if one exits or the time runs out.
    fn ready_within(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        for i in 0..3 {
            let log = self.dir.join(format!("m{i}.log"));
            while let Some(child) = self.members[i].as_mut() {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if text.contains("ready to serve client requests") {
                    break;
                }
                let tail = || text.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
                if let Ok(Some(status)) = child.try_wait() {
                    self.kill_all();
                    return Err(format!("etcd member {i} exited ({status}): {}", tail()));
                }
                if Instant::now() >= deadline {
                    self.kill_all();
                    return Err(format!("etcd member {i} not ready: {}", tail()));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// `kill -9` one member.
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `kill -9` every member.
    pub fn kill_all(&mut self) {
        for i in 0..3 {
            self.kill_member(i);
        }
    }

    /// Starts every member that is down again, on its data.
    pub fn restart_all(&mut self) {
        for i in 0..3 {
            if self.members[i].is_none() {
                let log = self.dir.join(format!("m{i}.log"));
                let _ = std::fs::remove_file(&log);
                self.start_member(i);
            }
        }
        self.wait_ready();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// One `vmms serve --cluster` node on the shared store.
pub struct Node {
    pub name: String,
    shared: PathBuf,
    endpoints: String,
    child: Option<Child>,
}

impl Node {
    /// Starts node `name` and waits until it answers.
    pub fn start(shared: &Path, endpoints: &str, name: &str) -> Self {
        let mut node = Node {
            name: name.to_owned(),
            shared: shared.to_owned(),
            endpoints: endpoints.to_owned(),
            child: None,
        };
        node.spawn();
        node
    }

    /// Starts the daemon (again).
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.shared.join(format!("{}.log", self.name)))
            .expect("node log");
        let child = Command::new(crate::vmms_common::vmms_binary())
            .arg("serve")
            .arg("--store")
            .arg(&self.shared)
            .args([
                "--cluster",
                &self.endpoints,
                "--node",
                &self.name,
                "--no-cim",
            ])
            .args(["--lease-ttl", &TTL_S.to_string()])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn vmms serve");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.vmms(&["get-vm"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "node {} never answered",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The node's own folder of the shared store (its CLI's `--store`).
    pub fn store(&self) -> PathBuf {
        self.shared.join("nodes").join(&self.name)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    pub fn vmms(&self, args: &[&str]) -> Output {
        Command::new(crate::vmms_common::vmms_binary())
            .args(args)
            .arg("--store")
            .arg(self.store())
            .output()
            .expect("run vmms")
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.vmms(args);
        assert!(
            out.status.success(),
            "vmms {args:?} on {} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The VM as this node sees it (`get-vm --output json`), if it answers.
    pub fn vm(&self, name: &str) -> Option<Value> {
        let out = self.vmms(&["get-vm", name, "--output", "json"]);
        if !out.status.success() {
            return None;
        }
        let list: Value = serde_json::from_slice(&out.stdout).ok()?;
        list.get(0).cloned()
    }

    /// Whether this node runs the VM now (Running here, with a worker).
    pub fn runs(&self, name: &str) -> bool {
        self.vm(name).is_some_and(|vm| {
            vm["enabled_state"] == 2 && vm["process_id"].is_u64() && vm["owner"] == self.name
        })
    }

    /// Live (not zombie) worker processes of this node, from their pid files.
    pub fn worker_pids(&self) -> Vec<i32> {
        let Ok(dirs) = std::fs::read_dir(self.store().join("run")) else {
            return Vec::new();
        };
        dirs.flatten()
            .filter_map(|d| std::fs::read_to_string(d.path().join("pid")).ok())
            .filter_map(|p| p.trim().parse::<i32>().ok())
            .filter(|&pid| live(pid))
            .collect()
    }

    /// A machine loss: `kill -9` the daemon and every worker of this node.
    pub fn kill9(&mut self) {
        let workers = self.worker_pids();
        // SAFETY: kill only sends signals to processes this test started.
        unsafe {
            libc::kill(self.pid(), libc::SIGKILL);
            for pid in workers {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill only sends a signal to the daemon this test started.
        unsafe { libc::kill(self.pid(), signal) };
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Whether `pid` is alive and not a zombie.
pub fn live(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with(['Z', 'X']))
    })
}

/// Types `command` on the guest's console (socket in `run_dir`) and returns the line that
/// starts with `answer`.
pub fn console(run_dir: &Path, command: &str, answer: &str) -> String {
    let mut console = UnixStream::connect(run_dir.join("console.sock")).expect("console");
    console
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    console
        .write_all(format!("\r{command}\r").as_bytes())
        .expect("console write");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&seen).into_owned();
        let complete = text.rsplit_once('\n').map_or("", |(done, _)| done);
        if let Some(line) = complete.split('\n').rev().find(|l| l.contains(answer)) {
            let start = line.find(answer).unwrap_or(0);
            return line[start..].trim().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no '{answer}' on the console: {text}"
        );
        if let Ok(n) = console.read(&mut buf) {
            seen.extend_from_slice(&buf[..n]);
        }
    }
}

/// The guest's record count (`status` → `records=<n>`).
pub fn records(run_dir: &Path) -> u64 {
    let line = console(run_dir, "status", "counter=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("records="))
        .and_then(|n| n.parse().ok())
        .expect("records=<n>")
}

/// Appends `n` records; returns the new total (`wrote <n> records, total <m>`).
pub fn write_records(run_dir: &Path, n: u64) -> u64 {
    let line = console(run_dir, &format!("write {n}"), "wrote ");
    line.rsplit(' ')
        .next()
        .and_then(|m| m.parse().ok())
        .expect("total <m>")
}

/// Median and max of durations, in ms (0 and 0 for none).
pub fn median_max(mut v: Vec<u128>) -> (u128, u128) {
    v.sort_unstable();
    (
        v.get(v.len() / 2).copied().unwrap_or(0),
        v.last().copied().unwrap_or(0),
    )
}
