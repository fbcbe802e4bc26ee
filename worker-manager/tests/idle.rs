//! An idle worker sleeps: with the guest running and nobody asking anything, the worker's own
//! threads (everything but the vCPUs) neither use CPU time nor wake up.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::thread;
use std::time::Duration;

use common::{Console, Fixture};
use vmms_guest::protocol::BANNER;
use worker_manager::LauncherOptions;

/// How long the worker is watched.
const WATCH: Duration = Duration::from_secs(10);

/// CPU time (clock ticks) and context switches of one thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ThreadUsage {
    ticks: u64,
    switches: u64,
}

/// Usage of every thread of `pid` whose name does not start with "vcpu", by thread id.
fn non_vcpu_threads(pid: u32) -> Vec<(String, ThreadUsage)> {
    let mut threads = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let Ok(comm) = fs::read_to_string(dir.join("comm")) else {
            continue; // the thread ended meanwhile
        };
        let comm = comm.trim().to_owned();
        if comm.starts_with("vcpu") {
            continue;
        }
        let (Ok(stat), Ok(status)) = (
            fs::read_to_string(dir.join("stat")),
            fs::read_to_string(dir.join("status")),
        ) else {
            continue;
        };
        // Fields after the parenthesised name: state is field 3, utime 14 and stime 15.
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        let switches = status
            .lines()
            .filter(|l| l.contains("ctxt_switches"))
            .map(|l| l.split_whitespace().last().unwrap().parse::<u64>().unwrap())
            .sum();
        let tid = dir.file_name().unwrap().to_string_lossy().into_owned();
        threads.push((format!("{comm}/{tid}"), ThreadUsage { ticks, switches }));
    }
    threads.sort_by(|a, b| a.0.cmp(&b.0));
    threads
}

#[test]
fn idle_worker_threads_use_no_cpu_while_the_guest_runs() {
    require_kvm!();
    // No heartbeat during the watch: a status request every second is work, not idling.
    let fixture = Fixture::with_options(LauncherOptions {
        heartbeat_interval: Duration::from_secs(3600),
        ..LauncherOptions::default()
    });
    let vm = fixture.small_vm("idle");
    let worker = fixture.boot(&vm);
    let pid = worker.pid();
    {
        let mut console = Console::attach(&fixture.launcher.runtime_dir(vm.id).console_socket());
        console.wait_for(BANNER, 0);
    }
    // Let the console connection's threads see the client go.
    thread::sleep(Duration::from_millis(500));

    let before = non_vcpu_threads(pid);
    thread::sleep(WATCH);
    let after = non_vcpu_threads(pid);

    let mut ticks = 0;
    let mut switches = 0;
    for (name, end) in &after {
        let start = before
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, usage)| *usage)
            .unwrap_or_default();
        eprintln!(
            "{name}: {} ticks, {} context switches in {WATCH:?}",
            end.ticks - start.ticks,
            end.switches - start.switches
        );
        ticks += end.ticks - start.ticks;
        switches += end.switches - start.switches;
    }
    assert!(!after.is_empty(), "the worker has its main thread at least");
    // One clock tick (10 ms) can be charged to a thread that ran for a microsecond at the wrong
    // moment; a worker waking every 10 ms would switch ~1000 times.
    assert!(ticks <= 1, "{ticks} clock ticks of CPU in {WATCH:?}");
    assert!(switches <= 10, "{switches} wake-ups in {WATCH:?}");
    worker.turn_off().unwrap();
}
