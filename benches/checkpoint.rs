//! Running checkpoints: what a checkpoint of a running (idle) test guest costs in total and how
//! long its guest is paused, at 64 MiB, 256 MiB and 1 GiB; a restore of the checkpoint into a
//! partition until its vCPUs run, at the same sizes (full image, and base + one delta); and the
//! bytes a second (delta) checkpoint writes against the pages the guest dirtied.
//!
//! The checkpoints are taken by real worker processes (this bench re-executes itself as the
//! worker, as the reference binary does) through `Worker::checkpoint`; the restores run
//! in-process on partition's `restore_layered`, as a worker restoring the state does.
//!
//! The criterion groups time diskless checkpoints (a disk's overlay chain would grow with every
//! iteration) and the restores. With `--bench`, fixed rounds of checkpoints of a VM with one qcow2
//! disk (switched to a new overlay each time) print the median and worst pause and total per
//! size, and the delta figures, with the load average.
#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use partition::{DiskConfig as PartitionDisk, Partition, PartitionState};
use vmm_core::{
    CheckpointReport, CheckpointRequest, DiskConfig, DiskOverlay, EventSink, LaunchMode, VmConfig,
    Worker, WorkerLauncher,
};
use worker_manager::worker;
use worker_manager::{LauncherOptions, MemoryManifest, ProcessLauncher, StoreLayout};

const SIZES_MIB: [u64; 3] = [64, 256, 1024];
const TIMEOUT: Duration = Duration::from_secs(60);
/// Pages dirtied between the two checkpoints of the delta figures (10 MiB).
const DIRTY_PAGES: u64 = 2560;

#[path = "common/worker_process.rs"]
mod worker_process;

fn main() -> ExitCode {
    if let Some(code) = worker_process::run_worker_or_skip() {
        return code;
    }
    let measuring = std::env::args().any(|a| a == "--bench");
    let mut criterion = Criterion::default().configure_from_args();
    for size in SIZES_MIB {
        create_bench(&mut criterion, size);
        restore_bench(&mut criterion, size);
    }
    criterion.final_summary();
    if measuring {
        figures();
    }
    ExitCode::SUCCESS
}

/// A store, one VM in it (with or without a qcow2 disk), and its running worker.
struct Running {
    _dir: tempfile::TempDir,
    store: PathBuf,
    vm: VmConfig,
    worker: Box<dyn Worker>,
    next: u32,
}

impl Running {
    fn boot(memory_mib: u64, with_disk: bool) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().to_path_buf();
        let layout = StoreLayout::new(&store);
        let mut vm = VmConfig::new(format!("cp{memory_mib}"));
        vm.memory_mib = memory_mib;
        let disks = layout.disks_dir(vm.id);
        fs::create_dir_all(&disks).unwrap();
        fs::create_dir_all(layout.vm_dir(vm.id).join("checkpoints")).unwrap();
        if with_disk {
            snapshot::create_qcow2(&disks.join("disk0.qcow2"), 16 << 20).unwrap();
            vm.disks = vec![DiskConfig {
                path: "disk0.qcow2".into(),
                read_only: false,
            }];
        }
        fs::write(layout.config_path(vm.id), serde_json::to_vec(&vm).unwrap()).unwrap();
        let exe = std::env::current_exe().unwrap();
        let launcher =
            ProcessLauncher::new(&store, exe, ["worker"]).with_options(LauncherOptions::default());
        let sink = EventSink::new(vm.id, |_| true);
        let worker = launcher.launch(&vm, LaunchMode::Boot, sink).unwrap();
        let running = Running {
            _dir: dir,
            store,
            vm,
            worker,
            next: 0,
        };
        running.command("echo up", "up");
        running
    }

    fn vm_dir(&self) -> PathBuf {
        StoreLayout::new(&self.store).vm_dir(self.vm.id)
    }

    /// Types `line` on the guest's console and waits for `reply`.
    fn command(&self, line: &str, reply: &str) {
        let socket = StoreLayout::new(&self.store)
            .runtime(self.vm.id)
            .console_socket();
        let mut console = UnixStream::connect(socket).unwrap();
        console
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        console.write_all(format!("{line}\r").as_bytes()).unwrap();
        let start = Instant::now();
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains(reply) {
            assert!(start.elapsed() < TIMEOUT, "no {reply:?} from the guest");
            let mut buf = [0u8; 4096];
            if let Ok(n) = console.read(&mut buf) {
                seen.extend_from_slice(&buf[..n]);
            }
        }
    }

    /// A checkpoint request with fresh names (an overlay for the disk, if there is one).
    fn request(&mut self, parent: Option<&Path>) -> CheckpointRequest {
        self.next += 1;
        let checkpoints = self.vm_dir().join("checkpoints");
        let staging = checkpoints.join(format!(".cp{}.staging", self.next));
        fs::create_dir(&staging).unwrap();
        let overlays = if self.vm.disks.is_empty() {
            Vec::new()
        } else {
            vec![DiskOverlay {
                disk: 0,
                path: self
                    .vm_dir()
                    .join("disks")
                    .join(format!("disk0-cp{}.qcow2", self.next)),
            }]
        };
        CheckpointRequest {
            staging,
            state_dir: checkpoints.join(format!("cp{}", self.next)),
            parent_state_dir: parent.map(Path::to_path_buf),
            overlays,
            content: vmm_core::CheckpointContent::SavedState,
        }
    }

    fn checkpoint(&mut self, parent: Option<&Path>) -> (CheckpointRequest, CheckpointReport) {
        let request = self.request(parent);
        let report = self.worker.checkpoint(&request).unwrap();
        (request, report)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.worker.turn_off();
    }
}

fn create_bench(c: &mut Criterion, memory_mib: u64) {
    let mut group = c.benchmark_group("running_checkpoint_idle_guest");
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(3));
    // Booted on first use: listing the benches (`--list`) boots nothing.
    let mut vm: Option<Running> = None;
    let mut pauses = Vec::new();
    group.bench_function(format!("{memory_mib}mib_total"), |b| {
        let vm = vm.get_or_insert_with(|| Running::boot(memory_mib, false));
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let (request, report) = vm.checkpoint(None);
                total += start.elapsed();
                pauses.push(report.pause);
                fs::remove_dir_all(&request.state_dir).unwrap();
            }
            total
        });
    });
    group.finish();
    if !pauses.is_empty() {
        println!(
            "running checkpoint, {memory_mib} MiB idle guest, no disk: pause median {:.2} ms, max {:.2} ms over {} checkpoints",
            ms(median(&mut pauses)),
            ms(pauses.iter().max().copied().unwrap_or_default()),
            pauses.len()
        );
    }
}

/// The partition configuration a worker builds for `vm` (disk opened on `top`).
fn restore_config(vm: &VmConfig, disks_dir: &Path, top: &Path) -> partition::PartitionConfig {
    let mut config = worker::partition_config(vm, disks_dir, vmms::guest::ELF);
    config.dirty_log = true;
    if let Some(disk) = config.disks.first_mut() {
        let backend = Arc::new(snapshot::open_disk(top, false).unwrap());
        *disk = PartitionDisk::with_backend(top, backend);
    }
    config
}

/// Restores `state_dir` into a partition and runs its vCPUs; returns how long that took.
fn restore_once(config: &partition::PartitionConfig, state_dir: &Path) -> Duration {
    let start = Instant::now();
    let state =
        PartitionState::from_json(&fs::read(state_dir.join("state.json")).unwrap()).unwrap();
    let manifest = MemoryManifest::read(state_dir).unwrap().unwrap();
    let mut files: Vec<fs::File> = manifest
        .layers
        .iter()
        .map(|name| fs::File::open(state_dir.join(name)).unwrap())
        .collect();
    let base = files.remove(0);
    let mut partition = Partition::builder(config.clone())
        .restore_layered(&state, &base, &files)
        .unwrap();
    partition.resume().unwrap();
    let elapsed = start.elapsed();
    partition.stop();
    drop(partition);
    // A partition's VM is destroyed on a teardown thread; let it finish so that it does not
    // compete with the next restore for the (pinned) CPU. A restoring worker is a fresh process.
    std::thread::sleep(Duration::from_millis(30));
    elapsed
}

/// A VM's two checkpoints (full, then a delta on it), its worker off, and the configuration a
/// worker restoring them builds.
struct Checkpoints {
    _vm: Running,
    config: partition::PartitionConfig,
    full: PathBuf,
    delta: PathBuf,
}

fn checkpoints(memory_mib: u64) -> Checkpoints {
    let mut vm = Running::boot(memory_mib, true);
    let (first, _) = vm.checkpoint(None);
    vm.command(&format!("dirty {DIRTY_PAGES}"), "dirtied");
    let (second, _) = vm.checkpoint(Some(&first.state_dir));
    let _ = vm.worker.turn_off();
    let disks = vm.vm_dir().join("disks");
    let top = disks.join("restore-top.qcow2");
    snapshot::create_overlay(&top, &second.overlays[0].path).unwrap();
    let config = restore_config(&vm.vm, &disks, &top);
    Checkpoints {
        _vm: vm,
        config,
        full: first.state_dir,
        delta: second.state_dir,
    }
}

fn restore_bench(c: &mut Criterion, memory_mib: u64) {
    let mut group = c.benchmark_group("restore_checkpoint_until_vcpus_run");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(3));
    // Made on first use: listing the benches (`--list`) boots nothing.
    let mut made: Option<Checkpoints> = None;
    for (label, delta) in [("full_image", false), ("base_plus_delta", true)] {
        group.bench_function(format!("{memory_mib}mib_{label}"), |b| {
            let made = made.get_or_insert_with(|| checkpoints(memory_mib));
            let dir = if delta { &made.delta } else { &made.full };
            b.iter_custom(|iters| (0..iters).map(|_| restore_once(&made.config, dir)).sum());
        });
    }
    group.finish();
}

fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn median(values: &mut [Duration]) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    values.sort();
    values[values.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Checkpoints of a VM with one qcow2 disk, fixed rounds per size, and the delta figures.
fn figures() {
    let rounds = 9;
    println!("load average before: {}", load_average());
    for size in SIZES_MIB {
        let mut vm = Running::boot(size, true);
        let (mut pauses, mut totals) = (Vec::new(), Vec::new());
        let mut full_bytes = 0;
        for _ in 0..rounds {
            let (request, report) = vm.checkpoint(None);
            pauses.push(report.pause);
            totals.push(report.total);
            full_bytes = report.memory_bytes;
            fs::remove_dir_all(&request.state_dir).unwrap();
        }
        let (first, first_report) = vm.checkpoint(None);
        vm.command(&format!("dirty {DIRTY_PAGES}"), "dirtied");
        let (_, delta) = vm.checkpoint(Some(&first.state_dir));
        println!(
            "{size} MiB idle guest + qcow2 disk: pause median {:.2} ms (max {:.2}), total median {:.1} ms (max {:.1}), full image {} KiB; \
             after dirtying {DIRTY_PAGES} pages ({} KiB): delta={} writes {} KiB ({:.2}x the dirtied bytes; the full checkpoint before it wrote {} KiB), pause {:.2} ms",
            ms(median(&mut pauses)),
            ms(pauses.iter().max().copied().unwrap_or_default()),
            ms(median(&mut totals)),
            ms(totals.iter().max().copied().unwrap_or_default()),
            full_bytes / 1024,
            DIRTY_PAGES * 4,
            delta.delta,
            delta.memory_bytes / 1024,
            delta.memory_bytes as f64 / (DIRTY_PAGES * 4096) as f64,
            first_report.memory_bytes / 1024,
            ms(delta.pause),
        );
    }
    println!("load average after: {}", load_average());
}
