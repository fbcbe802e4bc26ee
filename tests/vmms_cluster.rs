//! High availability on real etcd: failover after a machine loss, fencing of a frozen node,
//! etcd member loss and total loss, and quick migration — with real daemons, real workers and
//! the real test guest, whose disk record sequence shows from the guest's side that two workers
//! never ran the same VM.
//!
//! Trial counts: `VMMS_FAILOVER_TRIALS` (default 6), `VMMS_FENCE_TRIALS` (default 8; the issue's
//! full run is 20) and `VMMS_FREEZE_TRIALS` (default 2) keep CI within its budget.

mod cluster;
mod vmms_common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cluster::{Etcd, Node, TTL_S, median_max, records, write_records};

fn trials(variable: &str, default: usize) -> usize {
    std::env::var(variable)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Two nodes on a shared store and a 3-member etcd; VM `g` (test guest, 16 MiB, one raw disk)
/// defined and started on node A.
struct Cluster {
    etcd: Etcd,
    nodes: [Node; 2],
    vm_id: String,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let etcd_dir = dir.path().join("etcd");
        std::fs::create_dir_all(&etcd_dir).expect("etcd dir");
        let etcd = Etcd::start(&etcd_dir);
        let shared = dir.path().join("store");
        std::fs::create_dir_all(&shared).expect("store");
        let a = Node::start(&shared, &etcd.endpoints(), "A");
        let b = Node::start(&shared, &etcd.endpoints(), "B");
        let disk = dir.path().join("disk.img");
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(8 << 20))
            .expect("disk");
        let created = a.ok(&[
            "new-vm",
            "g",
            "--memory-mib",
            "16",
            "--disk",
            disk.to_str().expect("utf-8 path"),
            "--output",
            "json",
        ]);
        let created: serde_json::Value = serde_json::from_str(&created).expect("json");
        let vm_id = created[0]["id"].as_str().expect("id").to_owned();
        a.ok(&["start-vm", "g"]);
        Cluster {
            etcd,
            nodes: [a, b],
            vm_id,
            _dir: dir,
        }
    }

    fn run_dir(&self, node: usize) -> PathBuf {
        self.nodes[node].store().join("run").join(&self.vm_id)
    }

    /// The node that runs the VM, waiting up to `within`.
    fn runner(&self, within: Duration) -> Option<usize> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(i) = (0..2).find(|&i| self.nodes[i].runs("g")) {
                return Some(i);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Both nodes' logs, for a failure message.
    fn logs(&self) -> String {
        let log = |n: &str| {
            std::fs::read_to_string(self._dir.path().join("store").join(format!("{n}.log")))
                .unwrap_or_default()
        };
        format!("A:\n{}\nB:\n{}", log("A"), log("B"))
    }

    /// Live workers running the guest, over both nodes.
    fn running_workers(&self) -> usize {
        self.nodes.iter().map(|n| n.worker_pids().len()).sum()
    }
}

#[test]
fn killed_node_fails_over_within_five_seconds() {
    require_kvm!();
    require_etcd!();
    let mut cluster = Cluster::start();
    let mut owner = cluster
        .runner(Duration::from_secs(30))
        .expect("VM runs on A");
    let mut total = write_records(&cluster.run_dir(owner), 2);
    let mut times = Vec::new();
    for trial in 0..trials("VMMS_FAILOVER_TRIALS", 6) {
        let survivor = 1 - owner;
        // A machine loss: the daemon and its workers die at once.
        cluster.nodes[owner].kill9();
        let killed = Instant::now();
        let now_on = cluster.runner(Duration::from_secs(30));
        let took = killed.elapsed();
        assert_eq!(
            now_on,
            Some(survivor),
            "trial {trial}: VM not taken over\n{}",
            cluster.logs()
        );
        times.push(took.as_millis());
        // The guest booted on the survivor from the same disk: every record is there.
        let run_dir = cluster.run_dir(survivor);
        assert_eq!(
            records(&run_dir),
            total,
            "trial {trial}: records lost or forked"
        );
        total = write_records(&run_dir, 2);
        cluster.nodes[owner].spawn();
        owner = survivor;
    }
    let (median, max) = median_max(times.clone());
    println!(
        "failover (kill -9 owner, TTL {TTL_S} s): {} trials, median {median} ms, max {max} ms, all {times:?}; load {}",
        times.len(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    assert!(median <= 5000, "median failover {median} ms > 5 s");
    assert!(max <= 10_000, "a failover took {max} ms");
}

#[test]
fn frozen_node_is_fenced_and_the_record_sequence_never_forks() {
    require_kvm!();
    require_etcd!();
    let cluster = Cluster::start();
    let mut owner = cluster
        .runner(Duration::from_secs(30))
        .expect("VM runs on A");
    let mut total = write_records(&cluster.run_dir(owner), 2);
    let mut overlaps = 0;
    let mut times = Vec::new();
    for trial in 0..trials("VMMS_FENCE_TRIALS", 8) {
        let frozen = owner;
        let survivor = 1 - owner;
        let vm_dir = cluster.nodes[survivor]
            .store()
            .join("vms")
            .join(&cluster.vm_id);
        // The owner's daemon freezes past its TTL (its worker runs on, unsupervised).
        cluster.nodes[frozen].signal(libc::SIGSTOP);
        let stopped = Instant::now();
        let mut taken_over = None;
        while stopped.elapsed() < Duration::from_secs(30) {
            if cluster.running_workers() > 1 {
                overlaps += 1;
            }
            if taken_over.is_none() && cluster.nodes[survivor].runs("g") {
                taken_over = Some(stopped.elapsed());
            }
            if taken_over.is_some() && stopped.elapsed() > Duration::from_secs(TTL_S + 1) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let took =
            taken_over.unwrap_or_else(|| panic!("trial {trial}: no takeover\n{}", cluster.logs()));
        times.push(took.as_millis());
        // What the VM's folder holds once the new owner runs it: the frozen node must not change
        // any of it when it wakes up.
        let before = snapshot(&vm_dir);
        cluster.nodes[frozen].signal(libc::SIGCONT);
        let deadline = Instant::now() + Duration::from_secs(30);
        while cluster.nodes[frozen]
            .vm("g")
            .is_none_or(|vm| vm["enabled_state"] != 3)
        {
            assert!(
                Instant::now() < deadline,
                "trial {trial}: old owner still runs the VM"
            );
            if cluster.running_workers() > 1 {
                overlaps += 1;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            before,
            snapshot(&vm_dir),
            "trial {trial}: the fenced node wrote"
        );
        assert!(
            cluster.nodes[survivor].runs("g"),
            "trial {trial}: new owner lost it"
        );
        let run_dir = cluster.run_dir(survivor);
        assert_eq!(records(&run_dir), total, "trial {trial}: sequence forked");
        total = write_records(&run_dir, 2);
        owner = survivor;
    }
    let (median, max) = median_max(times.clone());
    println!(
        "fencing: {} trials, two live workers seen {overlaps} times, takeover after SIGSTOP median {median} ms, max {max} ms; {total} records in sequence; load {}",
        times.len(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    assert_eq!(overlaps, 0, "two workers ran the VM at once");
}

#[test]
fn frozen_machine_blocks_takeover_on_the_disk_lock_until_it_wakes() {
    require_kvm!();
    require_etcd!();
    let cluster = Cluster::start();
    let mut owner = cluster
        .runner(Duration::from_secs(30))
        .expect("VM runs on A");
    let mut total = write_records(&cluster.run_dir(owner), 2);
    for trial in 0..trials("VMMS_FREEZE_TRIALS", 2) {
        let frozen = owner;
        let survivor = 1 - owner;
        // The whole machine freezes: its daemon and its worker.
        let worker = cluster.nodes[frozen].worker_pids();
        let freeze = |signal| {
            cluster.nodes[frozen].signal(signal);
            for &pid in &worker {
                // SAFETY: kill only sends a signal to a worker this test's node started.
                unsafe { libc::kill(pid, signal) };
            }
        };
        freeze(libc::SIGSTOP);
        // The survivor takes ownership after the TTL, but the frozen worker still holds the disk:
        // no second worker may run the guest meanwhile.
        let until = Instant::now() + Duration::from_secs(TTL_S + 4);
        while Instant::now() < until {
            assert!(
                cluster.nodes[survivor].worker_pids().is_empty(),
                "trial {trial}: a second worker runs while the owner is frozen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        freeze(libc::SIGCONT);
        let woke = Instant::now();
        let now_on = cluster.runner(Duration::from_secs(30));
        assert_eq!(
            now_on,
            Some(survivor),
            "trial {trial}: no takeover after waking"
        );
        println!(
            "trial {trial}: running on the survivor {:?} after the frozen machine woke",
            woke.elapsed()
        );
        assert!(
            worker.iter().all(|&pid| !cluster::live(pid)),
            "trial {trial}: the fenced worker runs on"
        );
        let run_dir = cluster.run_dir(survivor);
        assert_eq!(records(&run_dir), total, "trial {trial}: sequence forked");
        total = write_records(&run_dir, 2);
        owner = survivor;
    }
}

#[test]
fn etcd_member_loss_is_survived_and_total_loss_self_fences() {
    require_kvm!();
    require_etcd!();
    let mut cluster = Cluster::start();
    let owner = cluster
        .runner(Duration::from_secs(30))
        .expect("VM runs on A");
    let total = write_records(&cluster.run_dir(owner), 2);
    let worker = cluster.nodes[owner].worker_pids();
    // One member of three gone: quorum stays, leases are kept alive, nothing moves.
    cluster.etcd.kill_member(0);
    let until = Instant::now() + Duration::from_secs(3 * TTL_S);
    while Instant::now() < until {
        assert_eq!(cluster.nodes[owner].worker_pids(), worker, "worker changed");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        cluster.nodes[owner].runs("g"),
        "VM moved after one member died"
    );
    let out = cluster.nodes[owner].ok(&["get-cluster-node"]);
    assert!(
        out.contains("unhealthy") && out.lines().any(|l| l.starts_with("A ")),
        "{out}"
    );
    // Every member gone: the owner cannot renew, so it stops its worker before its TTL ends.
    cluster.etcd.kill_all();
    let lost = Instant::now();
    while cluster.running_workers() > 0 {
        assert!(
            lost.elapsed() < Duration::from_secs(TTL_S),
            "worker still running at the lease TTL"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let fenced_after = lost.elapsed();
    // etcd back: the VM comes up again on one node, from an intact disk.
    cluster.etcd.restart_all();
    let back = cluster
        .runner(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("VM not back after etcd returned\n{}", cluster.logs()));
    assert_eq!(
        records(&cluster.run_dir(back)),
        total,
        "records lost or corrupted"
    );
    println!("self-fenced {fenced_after:?} after etcd was lost (TTL {TTL_S} s)");
}

#[test]
fn move_vm_restores_on_the_target_and_reports_downtime() {
    require_kvm!();
    require_etcd!();
    let cluster = Cluster::start();
    let owner = cluster
        .runner(Duration::from_secs(30))
        .expect("VM runs on A");
    let total = write_records(&cluster.run_dir(owner), 2);
    let target = 1 - owner;
    let mut downtimes = Vec::new();
    let mut from = owner;
    for _ in 0..4 {
        let to = 1 - from;
        let out = cluster.nodes[from].ok(&[
            "move-vm",
            "g",
            "--to",
            &cluster.nodes[to].name,
            "--output",
            "json",
        ]);
        let report: serde_json::Value = serde_json::from_str(&out).expect("json");
        downtimes.push(u128::from(
            report["downtime_ms"].as_u64().expect("downtime"),
        ));
        assert!(cluster.nodes[to].runs("g"), "not running on the target");
        from = to;
    }
    // A restored guest keeps its memory: same records, and no cold boot in between.
    assert_eq!(records(&cluster.run_dir(from)), total);
    let _ = target;
    let (median, max) = median_max(downtimes.clone());
    println!(
        "move-vm downtime: median {median} ms, max {max} ms, all {downtimes:?}; load {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
}

/// Names, sizes and modification times of every file in a folder tree.
fn snapshot(dir: &std::path::Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
    let mut all = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(path.clone());
            }
            all.push((
                path,
                meta.len(),
                meta.modified().unwrap_or(std::time::UNIX_EPOCH),
            ));
        }
    }
    all.sort();
    all
}
