//! The daemon's costs: a VM start through VMMS and a worker process to the guest's first console
//! byte, next to booting the same partition in-process; VMs started per second; the memory a
//! worker process costs beyond its guest's, and an idle pool worker's.
//!
//! The service here is the daemon's own core (vmm-core with worker-manager's `ProcessLauncher`)
//! in this process; the CLI's socket hop (one JSON line each way) is not included. Like the
//! reference binary, this bench re-executes itself as the worker (`<bench> worker --vm …`, or
//! `<bench> worker --pool …` for the launcher's pool).
//!
//! With `--bench`, the start of the micro PVH guest (prints `OK`, then halts) is measured in
//! interleaved rounds, so that load changes hit every subject alike: in-process (`Partition::new`
//! → first COM1 byte), through the service on a pool worker (the default), and through the
//! service with no pool (a worker process spawned per start); each round gives the ratios to
//! the in-process start of the same round, and the worker's start trace breaks each start down.
//! Pin it for figures: `taskset -c 1 cargo bench --bench daemon`.
#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use criterion::Criterion;
use partition::{KernelImage, Partition, PartitionConfig, VmShape, VmShell};
use vmm_core::{
    EnabledState, JobState, RequestedState, VirtualSystemManagementService, VmConfig, VmId,
};
use worker_manager::worker::start_trace::{START_TRACE_ENV, START_TRACE_MARKER, monotonic_ns};

use worker_manager::{LauncherOptions, ProcessLauncher, StoreLayout};

#[path = "common/micro_guest.rs"]
mod micro_guest;

const MEMORY_MIB: u64 = 16;
const JOB_TIMEOUT: Duration = Duration::from_secs(30);

#[path = "common/worker_process.rs"]
mod worker_process;

fn main() -> ExitCode {
    if let Some(code) = worker_process::run_worker_or_skip() {
        return code;
    }
    // `cargo bench` passes --bench; test runners list (--list) or smoke-test the benches without it,
    // and the one-shot figures below are measurements, not tests.
    let measuring = std::env::args().any(|a| a == "--bench");
    if measuring {
        // SAFETY: no other thread exists yet to read the environment concurrently.
        unsafe { std::env::set_var(START_TRACE_ENV, "1") };
    }
    let mut criterion = Criterion::default().configure_from_args();
    first_byte(&mut criterion);
    criterion.final_summary();
    if measuring {
        paired_starts();
        figures();
    }
    ExitCode::SUCCESS
}

/// A service on a temporary store whose workers are this executable.
struct Daemon {
    _dir: tempfile::TempDir,
    store: std::path::PathBuf,
    vmms: VirtualSystemManagementService,
    launcher: Arc<ProcessLauncher>,
}

impl Daemon {
    fn new() -> Self {
        Self::with_options(LauncherOptions::default())
    }

    /// A service whose launcher uses `options` (confinement off, for one comparison).
    fn with_options(options: LauncherOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().to_path_buf();
        let exe = std::env::current_exe().unwrap();
        let launcher =
            Arc::new(ProcessLauncher::new(&store, exe, ["worker"]).with_options(options));
        let vmms = VirtualSystemManagementService::open(&store, launcher.clone()).unwrap();
        launcher.fill_pool();
        let daemon = Daemon {
            _dir: dir,
            store,
            vmms,
            launcher,
        };
        daemon.wait_pool_full();
        daemon
    }

    /// A service whose launcher keeps no pool: every start spawns its worker.
    fn without_pool() -> Self {
        Self::with_options(LauncherOptions {
            pool_size: 0,
            ..LauncherOptions::default()
        })
    }

    /// Waits (outside any timing) until the pool is back to its size: the starts measured are
    /// the ones a pool is for, not the ones that find it empty.
    fn wait_pool_full(&self) {
        let size = self.launcher.options().pool_size;
        let deadline = Instant::now() + JOB_TIMEOUT;
        while self.launcher.idle_workers().len() < size {
            assert!(
                Instant::now() < deadline,
                "the pool does not fill: {:?}",
                self.launcher.pool_error()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A VM booting `kernel` (the micro guest).
    fn define_kernel(&self, name: &str, kernel: &Path) -> VmId {
        let mut config = VmConfig::new(name);
        config.memory_mib = MEMORY_MIB;
        config.boot = vmm_core::BootSource::Kernel {
            kernel: kernel.to_path_buf(),
            initrd: None,
            cmdline: String::new(),
        };
        self.vmms.define_system(config).unwrap()
    }

    fn define(&self, name: &str, memory_mib: u64) -> VmId {
        let mut config = VmConfig::new(name);
        config.memory_mib = memory_mib;
        self.vmms.define_system(config).unwrap()
    }

    fn change(&self, vm: VmId, requested: RequestedState) {
        let (_, job) = self.vmms.request_state_change(vm, requested).unwrap();
        let job = self.vmms.wait_for_job(job.unwrap(), JOB_TIMEOUT).unwrap();
        assert_eq!(job.state, JobState::Completed, "{job:?}");
    }

    fn console(&self, vm: VmId) -> UnixStream {
        UnixStream::connect(StoreLayout::new(&self.store).runtime(vm).console_socket()).unwrap()
    }
}

/// A COM1 sink that signals its first byte.
#[derive(Clone, Default)]
struct FirstByte(Arc<(Mutex<bool>, Condvar)>);

impl Write for FirstByte {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let (seen, cv) = &*self.0;
        *seen.lock().unwrap() = true;
        cv.notify_all();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl FirstByte {
    fn wait(&self) {
        let (seen, cv) = &*self.0;
        let guard = seen.lock().unwrap();
        let _unused = cv.wait_while(guard, |seen| !*seen).unwrap();
    }
}

fn first_byte(c: &mut Criterion) {
    let mut group = c.benchmark_group("start_to_first_serial_byte");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(8));

    // Confined workers (the default) next to unconfined ones: what seccomp, Landlock and the
    // rest cost a start.
    let unconfined = LauncherOptions {
        confine: false,
        ..LauncherOptions::default()
    };
    for (label, daemon) in [
        ("vmms_worker_process", Daemon::new()),
        ("vmms_worker_process_no_pool", Daemon::without_pool()),
        (
            "vmms_worker_process_unconfined",
            Daemon::with_options(unconfined),
        ),
    ] {
        let vm = daemon.define("bench", MEMORY_MIB);
        group.bench_function(label, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    daemon.change(vm, RequestedState::Start);
                    let mut byte = [0u8; 1];
                    daemon.console(vm).read_exact(&mut byte).unwrap();
                    total += start.elapsed();
                    daemon.change(vm, RequestedState::TurnOff);
                    daemon.wait_pool_full();
                }
                total
            });
        });
    }

    group.bench_function("partition_in_process", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let mut config =
                    PartitionConfig::new(KernelImage::Bytes(Arc::from(vmms::guest::ELF)), "");
                config.memory_mib = MEMORY_MIB;
                let mut partition = Partition::new(config).unwrap();
                let sink = FirstByte::default();
                partition.com1().set_sink(Box::new(sink.clone()));
                partition.resume().unwrap();
                sink.wait();
                total += start.elapsed();
                partition.stop();
            }
            total
        });
    });
    group.finish();
}

/// The worker's start trace (see `worker_manager::worker::start_trace`) from its log: step name
/// and `CLOCK_MONOTONIC` nanoseconds.
fn start_trace(daemon: &Daemon, vm: VmId) -> Vec<(String, u64)> {
    // The worker logs it just after it reported ready: it may not be there yet.
    let path = StoreLayout::new(&daemon.store).runtime(vm).log_file();
    let deadline = Instant::now() + JOB_TIMEOUT;
    let log = loop {
        let log = std::fs::read_to_string(&path).unwrap_or_default();
        if log.contains(START_TRACE_MARKER) && log.contains(" ready=") {
            break log;
        }
        assert!(Instant::now() < deadline, "the worker logs its start trace");
        std::thread::sleep(Duration::from_millis(1));
    };
    // The steps up to ready, and the guest's first byte on a line of its own.
    log.lines()
        .filter_map(|l| l.split_once(START_TRACE_MARKER).map(|(_, steps)| steps))
        .flat_map(str::split_whitespace)
        .filter_map(|step| step.split_once('='))
        .map(|(name, ns)| (name.to_owned(), ns.parse().unwrap()))
        .collect()
}

/// The micro guest's first byte, in-process: `Partition::new` → resume → first COM1 byte; the
/// total and its three steps.
fn in_process_start(kernel: &Arc<[u8]>) -> (Duration, Vec<(String, u64)>) {
    let start = Instant::now();
    let mut config = PartitionConfig::new(KernelImage::Bytes(Arc::clone(kernel)), "");
    config.memory_mib = MEMORY_MIB;
    let mut partition = Partition::new(config).unwrap();
    let created = Instant::now();
    let sink = FirstByte::default();
    partition.com1().set_sink(Box::new(sink.clone()));
    partition.resume().unwrap();
    let resumed = Instant::now();
    sink.wait();
    let elapsed = start.elapsed();
    partition.stop();
    let ns = |d: Duration| d.as_nanos() as u64;
    let steps = vec![
        ("Partition::new".to_owned(), ns(created - start)),
        ("resume (vCPU threads)".to_owned(), ns(resumed - created)),
        (
            "resume → first COM1 byte at the sink".to_owned(),
            ns(elapsed.saturating_sub(resumed - start)),
        ),
    ];
    (elapsed, steps)
}

/// The service's steps this process passed (`vmm_core::fault` points), with their
/// `CLOCK_MONOTONIC` times, since the last [`take_service_steps`].
static SERVICE_STEPS: Mutex<Vec<(String, u64)>> = Mutex::new(Vec::new());

fn record_service_step(name: &str) {
    let at = monotonic_ns();
    SERVICE_STEPS
        .lock()
        .unwrap()
        .push((format!("service {name}"), at));
}

fn take_service_steps() -> Vec<(String, u64)> {
    std::mem::take(&mut *SERVICE_STEPS.lock().unwrap())
}

/// One start through the service: to the first byte a client reads from the console (after
/// the start's job completed, as `vmms start-vm` then `vmms console` do), and to the guest's
/// first byte reaching the worker's console (the end point of the in-process start: the
/// partition's COM1 sink).
struct ServiceStart {
    client_first_byte: Duration,
    worker_first_byte: Duration,
    /// When each step ended, in nanoseconds after the client's request (service, worker and
    /// client steps on one clock).
    steps: Vec<(String, u64)>,
}

/// The in-process start of a partition built into a shell built out ahead (untimed) to its
/// shape, as a pool worker's is: the floor for a start that does its VM set-up ahead.
fn in_process_prebuilt_start(kernel: &Arc<[u8]>) -> Duration {
    let mut config = PartitionConfig::new(KernelImage::Bytes(Arc::clone(kernel)), "");
    config.memory_mib = MEMORY_MIB;
    let shell = VmShell::create_for(VmShape::of(&config)).unwrap();
    let start = Instant::now();
    let mut partition = Partition::builder(config).shell(shell).build().unwrap();
    let sink = FirstByte::default();
    partition.com1().set_sink(Box::new(sink.clone()));
    partition.resume().unwrap();
    sink.wait();
    let elapsed = start.elapsed();
    partition.stop();
    elapsed
}

/// One start of `vm` through the service (see [`ServiceStart`]).
fn service_start(daemon: &Daemon, vm: VmId) -> ServiceStart {
    daemon.wait_pool_full();
    take_service_steps();
    let start = monotonic_ns();
    daemon.change(vm, RequestedState::Start);
    let job_done = monotonic_ns();
    let mut console = daemon.console(vm);
    let connected = monotonic_ns();
    let mut byte = [0u8; 1];
    console.read_exact(&mut byte).unwrap();
    let first_byte = monotonic_ns();
    let trace = start_trace(daemon, vm);
    let service = take_service_steps();
    daemon.change(vm, RequestedState::TurnOff);

    let mut events = service;
    events.extend(
        trace
            .iter()
            .map(|(step, at)| (format!("worker {step}"), *at)),
    );
    events.push(("client job completed".to_owned(), job_done));
    events.push(("client console connected".to_owned(), connected));
    events.push(("client first byte read".to_owned(), first_byte));
    let worker_first_byte = trace
        .iter()
        .find(|(step, _)| step == "first_byte")
        .map_or(first_byte, |(_, at)| *at);
    let steps = events
        .into_iter()
        .map(|(name, at)| (name, at.saturating_sub(start)))
        .collect();
    ServiceStart {
        client_first_byte: Duration::from_nanos(first_byte - start),
        worker_first_byte: Duration::from_nanos(worker_first_byte.saturating_sub(start)),
        steps,
    }
}

/// When each step of a start ended (nanoseconds after its request), gathered over rounds.
#[derive(Default)]
struct Timeline(Vec<Vec<(String, u64)>>);

impl Timeline {
    fn add(&mut self, steps: Vec<(String, u64)>) {
        self.0.push(steps);
    }

    /// The steps in the order of their median end, each with that median and the median of
    /// its distance from the step before (per round, so concurrent steps can be negative).
    fn print(&self) {
        let at = |round: &[(String, u64)], name: &str| {
            round
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| *t as i64)
        };
        let mut names: Vec<String> = Vec::new();
        for round in &self.0 {
            for (name, _) in round {
                if !names.contains(name) {
                    names.push(name.clone());
                }
            }
        }
        let median_of = |mut values: Vec<i64>| {
            values.sort_unstable();
            values.get(values.len() / 2).copied().unwrap_or(0)
        };
        let mut ordered: Vec<(String, i64)> = names
            .into_iter()
            .map(|name| {
                let ends = self.0.iter().filter_map(|r| at(r, &name)).collect();
                (name, median_of(ends))
            })
            .collect();
        ordered.sort_by_key(|(_, end)| *end);
        let mut previous: Option<&str> = None;
        for (name, end) in &ordered {
            let since = previous.map_or(*end, |before| {
                median_of(
                    self.0
                        .iter()
                        .filter_map(|r| Some(at(r, name)? - at(r, before)?))
                        .collect(),
                )
            });
            println!(
                "  {name:>34}: at {:7.3} ms, {:+7.3} ms after the step above",
                *end as f64 / 1e6,
                since as f64 / 1e6
            );
            previous = Some(name);
        }
    }
}

/// Medians of named spans gathered over rounds, in first-seen order.
#[derive(Default)]
struct Spans(Vec<(String, Vec<u64>)>);

impl Spans {
    fn add(&mut self, steps: Vec<(String, u64)>) {
        for (name, ns) in steps {
            match self.0.iter_mut().find(|(n, _)| *n == name) {
                Some((_, list)) => list.push(ns),
                None => self.0.push((name, vec![ns])),
            }
        }
    }

    fn print(&mut self) {
        for (name, values) in &mut self.0 {
            values.sort_unstable();
            println!(
                "  {name:>40}: median {:7.3} ms (min {:.3}, {} rounds)",
                values[values.len() / 2] as f64 / 1e6,
                values[0] as f64 / 1e6,
                values.len()
            );
        }
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// In-process, pooled and unpooled starts of the micro guest in interleaved rounds; per-round
/// ratios to the in-process start; each path's steps.
fn paired_starts() {
    let rounds: usize = std::env::var("DAEMON_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(30);
    let kernel_bytes: Arc<[u8]> = Arc::from(micro_guest::micro_pvh_elf(false));
    let pooled = Daemon::new();
    let spawned = Daemon::without_pool();
    let kernel = pooled.store.join("micro-pvh.elf");
    std::fs::write(&kernel, &*kernel_bytes).unwrap();
    let pooled_vm = pooled.define_kernel("micro", &kernel);
    let spawned_vm = spawned.define_kernel("micro", &kernel);
    vmm_core::fault::observe(record_service_step);
    // Warm the page cache and the service's first-use paths.
    in_process_start(&kernel_bytes);
    service_start(&pooled, pooled_vm);
    service_start(&spawned, spawned_vm);

    let (mut in_process, mut pool_ms, mut spawn_ms) = (Vec::new(), Vec::new(), Vec::new());
    let (mut pool_ratio, mut spawn_ratio) = (Vec::new(), Vec::new());
    // The same end point as in-process: the guest's first byte at the worker's console.
    let (mut pool_worker_ms, mut pool_worker_ratio) = (Vec::new(), Vec::new());
    let mut in_process_steps = Spans::default();
    // In-process into a shell built out ahead: what the pool worker's own partition step costs.
    let mut prebuilt_ms = Vec::new();
    // The service marks a started VM durably (`running` in its folder: created, the folder
    // fsynced) before the start's job completes; what that costs on this disk.
    let mut marker_ms = Vec::new();
    let marker = pooled.store.join("marker-probe");
    let (mut pool_steps, mut spawn_steps) = (Timeline::default(), Timeline::default());
    println!("load average before: {}", load_average());
    for _ in 0..rounds {
        let (base, steps) = in_process_start(&kernel_bytes);
        let base = base.as_secs_f64();
        in_process_steps.add(steps);
        let prebuilt = in_process_prebuilt_start(&kernel_bytes).as_secs_f64();
        prebuilt_ms.push(prebuilt * 1e3);
        let pooled_start = service_start(&pooled, pooled_vm);
        pool_steps.add(pooled_start.steps);
        let pool = pooled_start.client_first_byte;
        let pool_worker = pooled_start.worker_first_byte.as_secs_f64();
        pool_worker_ms.push(pool_worker * 1e3);
        pool_worker_ratio.push(pool_worker / base);
        let spawned_start = service_start(&spawned, spawned_vm);
        spawn_steps.add(spawned_start.steps);
        let spawn = spawned_start.client_first_byte;
        let before = Instant::now();
        vmm_core::atomic_file::create_marker(&marker).unwrap();
        marker_ms.push(before.elapsed().as_secs_f64() * 1e3);
        std::fs::remove_file(&marker).unwrap();
        in_process.push(base * 1e3);
        pool_ms.push(pool.as_secs_f64() * 1e3);
        spawn_ms.push(spawn.as_secs_f64() * 1e3);
        pool_ratio.push(pool.as_secs_f64() / base);
        spawn_ratio.push(spawn.as_secs_f64() / base);
    }
    println!("load average after {rounds} rounds: {}", load_average());
    println!(
        "micro guest, start → first byte, medians of {rounds} interleaved rounds: in-process {:.3} ms; \
         service + pool worker {:.3} ms; service + spawned worker {:.3} ms",
        median(&mut in_process),
        median(&mut pool_ms),
        median(&mut spawn_ms),
    );
    println!(
        "per-round ratio to in-process (median): pool worker {:.2}, spawned worker {:.2}",
        median(&mut pool_ratio),
        median(&mut spawn_ratio),
    );
    println!(
        "in-process into a shell built out ahead (the pool worker's partition path, no service): \
         median {:.3} ms",
        median(&mut prebuilt_ms)
    );
    println!(
        "to the guest's first byte at the worker's console (the in-process end point): \
         service + pool worker median {:.3} ms, per-round ratio {:.2}",
        median(&mut pool_worker_ms),
        median(&mut pool_worker_ratio),
    );
    println!(
        "the service's durable `running` marker beside it (create_marker on this disk): median {:.3} ms",
        median(&mut marker_ms)
    );
    println!("steps of an in-process start:");
    in_process_steps.print();
    println!("steps of a start on a pool worker:");
    pool_steps.print();
    println!("steps of a start on a spawned worker:");
    spawn_steps.print();
    pooled.wait_pool_full();
    for pid in pooled.launcher.idle_workers() {
        println!(
            "idle pool worker {pid}: VmRSS {} KiB, Pss {} KiB, Private {} KiB",
            status_kib(pid, "VmRSS:"),
            rollup_kib(pid, "Pss:"),
            rollup_kib(pid, "Private_Clean:") + rollup_kib(pid, "Private_Dirty:"),
        );
    }
}

/// A `/proc/<pid>/smaps_rollup` field in KiB.
fn rollup_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap_or(0)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Figures that are not per-iteration timings: start rate and memory overhead.
fn figures() {
    let daemon = Daemon::new();
    let count = 10;
    let vms: Vec<VmId> = (0..count)
        .map(|i| daemon.define(&format!("rate{i}"), MEMORY_MIB))
        .collect();
    let mut rates = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        let jobs: Vec<_> = vms
            .iter()
            .map(|&vm| {
                daemon
                    .vmms
                    .request_state_change(vm, RequestedState::Start)
                    .unwrap()
                    .1
            })
            .collect();
        for job in jobs {
            let job = daemon.vmms.wait_for_job(job.unwrap(), JOB_TIMEOUT).unwrap();
            assert_eq!(job.state, JobState::Completed, "{job:?}");
        }
        rates.push(f64::from(count) / start.elapsed().as_secs_f64());
        for &vm in &vms {
            daemon.change(vm, RequestedState::TurnOff);
        }
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "VMs started per second ({count} started at once, {MEMORY_MIB} MiB each): median {:.0}, best {:.0}",
        rates[1], rates[2]
    );

    for memory_mib in [16, 64, 256] {
        let vm = daemon.define(&format!("rss{memory_mib}"), memory_mib);
        daemon.change(vm, RequestedState::Start);
        // Let the guest boot and settle at its prompt.
        let mut console = daemon.console(vm);
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&seen).contains(vmms_guest::protocol::PROMPT) {
            let n = console.read(&mut buf).unwrap();
            seen.extend_from_slice(&buf[..n]);
        }
        let system = daemon.vmms.get_vm(vm).unwrap();
        assert_eq!(system.enabled_state, EnabledState::Running);
        let pid = system.process_id.unwrap();
        let rss = status_kib(pid, "VmRSS:");
        let guest = guest_rss_kib(pid, memory_mib << 10);
        // Off before anything can fail: a worker outlives the bench that started it.
        daemon.change(vm, RequestedState::TurnOff);
        let guest = guest.expect("the guest memory mapping in /proc/<pid>/smaps");
        println!(
            "worker RSS with a {memory_mib} MiB guest: {rss} KiB total, {guest} KiB of it guest memory touched, \
             overhead {} KiB ({:.2} MiB)",
            rss - guest,
            (rss - guest) as f64 / 1024.0
        );
    }
}

/// A `/proc/<pid>/status` field in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap()
}

/// Resident KiB of the guest memory mapping: the smallest mapping of at least the guest's size
/// (the kernel may merge it with an adjacent anonymous mapping, so it can be larger).
fn guest_rss_kib(pid: u32, size_kib: u64) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut size = 0;
    let mut best: Option<(u64, u64)> = None;
    for line in smaps.lines() {
        if let Some(value) = line.strip_prefix("Size:") {
            size = value.split_whitespace().next()?.parse().ok()?;
        } else if let Some(value) = line.strip_prefix("Rss:")
            && size >= size_kib
            && best.is_none_or(|(smallest, _)| size < smallest)
        {
            best = Some((size, value.split_whitespace().next()?.parse().ok()?));
        }
    }
    best.map(|(_, rss)| rss)
}
