//! virtio-blk end to end: the test guest's `write N` (N sequential 4 KiB records, sixteen to a
//! 64 KiB request, then one flush; the guest polls for completions), timed from typing the command
//! to the guest's `wrote N records`, through a partition with each disk backend and I/O mode.
//! `write N 1` is the same with one record to a request: N 4 KiB requests, where the cost of
//! each notification and completion shows rather than the guest's own work on the records.
//!
//! Each iteration boots a fresh guest on a fresh sparse disk (not timed), so every run appends to
//! an empty log. Disks live in `VMMS_BENCH_DISK_DIR` (default: the system temp folder, so the
//! final flush is a real `fdatasync`).
//!
//! With `VMMS_FIRECRACKER=<path to a firecracker binary>` the bench then runs the same guest and
//! workload under Firecracker and under the partition in interleaved rounds (`VMMS_PAIRED_ROUNDS`,
//! default 9) and prints both medians and their ratio: the side-by-side figure of issue 16.
//! `VMMS_FIRECRACKER_CACHE` lists Firecracker's drive cache types to run (default
//! `Writeback,Unsafe`): `Writeback` offers FLUSH and honours it by syncing the file, as the
//! partition does, so it is the like-for-like baseline; `Unsafe`, Firecracker's default, does
//! not offer FLUSH, so the guest's final flush costs it nothing and its data is not durable.
//!
//! Next to each median it prints the CPU time the VMM's threads used during the run (their
//! schedstat), vCPU included: a guest that polls keeps its vCPU busy under either VMM, and the
//! partition's I/O thread polls too when it may run on a CPU of its own (notification
//! suppression), which this makes visible.
//!
//! Run it optimized, as Firecracker is built: `cargo bench -p partition --bench blk_write`.
#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use partition::block::{BlockBackend, GuestBuffer, RawImage};
use partition::{DiskConfig, DiskIo, KernelImage, Partition, PartitionConfig};
use vm_memory::Bytes;
use vmms_guest::protocol::PROMPT;

#[path = "../../benches/common/paired.rs"]
mod paired;
use paired::{CONSOLE_TIMEOUT as TIMEOUT, Console, ConsoleSink, Firecracker, cpu_time};

const MEMORY_MIB: u64 = 32;
const DISK_BYTES: u64 = 64 << 20;
/// Records of the side-by-side workloads (issue 16).
const PAIRED_RECORDS: u64 = 3000;

/// One `write` command: how many records, and how many to a request (`None`: the guest's
/// largest request, 16).
#[derive(Clone, Copy)]
struct Workload {
    records: u64,
    per_request: Option<u64>,
}

impl Workload {
    const fn batched(records: u64) -> Self {
        Self {
            records,
            per_request: None,
        }
    }

    fn command(&self) -> String {
        match self.per_request {
            None => format!("write {}", self.records),
            Some(n) => format!("write {} {n}", self.records),
        }
    }

    fn reply(&self) -> String {
        format!("wrote {} records", self.records)
    }
}

/// The side-by-side workloads: 64 KiB requests (188 of them), then 4 KiB requests (3,000).
const PAIRED: [Workload; 2] = [
    Workload::batched(PAIRED_RECORDS),
    Workload {
        records: PAIRED_RECORDS,
        per_request: Some(1),
    },
];

/// A disk backend (and I/O mode) the bench runs the guest on: a name and how to attach an image.
///
/// The qcow2 backend plugs in here: open the image as an `Arc<dyn BlockBackend>` and return
/// `DiskConfig::with_backend(path, backend)`, creating the image first if `prepare` needs to.
struct BackendCase {
    name: &'static str,
    /// Creates an empty disk of `bytes` bytes in `dir`; returns its path.
    prepare: fn(dir: &Path, bytes: u64) -> PathBuf,
    /// The partition's disk for the image `prepare` made.
    attach: fn(path: &Path) -> DiskConfig,
}

fn raw_image(dir: &Path, bytes: u64) -> PathBuf {
    let path = dir.join("disk.img");
    File::create(&path).unwrap().set_len(bytes).unwrap();
    path
}

fn backend_cases() -> Vec<BackendCase> {
    vec![
        BackendCase {
            name: "raw",
            prepare: raw_image,
            attach: |path| DiskConfig::new(path),
        },
        BackendCase {
            name: "null",
            prepare: raw_image,
            attach: |path| DiskConfig::with_backend(path, Arc::new(NullDisk)),
        },
        BackendCase {
            name: "raw_no_flush",
            prepare: raw_image,
            attach: |path| {
                let image = RawImage::open(path, false).unwrap();
                DiskConfig::with_backend(path, Arc::new(NoFlush(image)))
            },
        },
        BackendCase {
            name: "raw_synchronous",
            prepare: raw_image,
            attach: |path| DiskConfig {
                io: DiskIo::Synchronous,
                ..DiskConfig::new(path)
            },
        },
    ]
}

/// A raw image whose FLUSH returns at once: the partition's counterpart of Firecracker's
/// `Unsafe` cache type (which offers no FLUSH), for a like-for-like pair with it.
#[derive(Debug)]
struct NoFlush(RawImage);

impl BlockBackend for NoFlush {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_only(&self) -> bool {
        self.0.read_only()
    }
    fn read_at(&self, offset: u64, buf: &GuestBuffer<'_>) -> std::io::Result<()> {
        self.0.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &GuestBuffer<'_>) -> std::io::Result<()> {
        self.0.write_at(offset, buf)
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A disk that keeps nothing: reads zeros, discards writes. The workload's floor: the guest's own
/// work and the notification and completion path, without the cost of moving bytes.
#[derive(Debug)]
struct NullDisk;

impl BlockBackend for NullDisk {
    fn size(&self) -> u64 {
        DISK_BYTES
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, _offset: u64, buf: &GuestBuffer<'_>) -> std::io::Result<()> {
        let zeros = [0u8; 4096];
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(zeros.len());
            buf.write_slice(&zeros[..n], done)
                .map_err(std::io::Error::other)?;
            done += n;
        }
        Ok(())
    }
    fn write_at(&self, _offset: u64, _buf: &GuestBuffer<'_>) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

fn disk_dir() -> tempfile::TempDir {
    match std::env::var_os("VMMS_BENCH_DISK_DIR") {
        Some(dir) => tempfile::tempdir_in(dir).unwrap(),
        None => tempfile::tempdir().unwrap(),
    }
}

/// One timed run: wall-clock time, and the CPU time the VMM's threads used meanwhile.
#[derive(Clone, Copy)]
struct Round {
    wall: Duration,
    cpu: Duration,
}

/// One timed `workload` on a freshly booted partition over `disk`.
fn partition_round(case: &BackendCase, workload: Workload) -> Round {
    let dir = disk_dir();
    let path = (case.prepare)(dir.path(), DISK_BYTES);
    let mut config = PartitionConfig::new(KernelImage::Bytes(Arc::from(vmms_guest::ELF)), "");
    config.memory_mib = MEMORY_MIB;
    config.disks.push((case.attach)(&path));
    let mut vm = Partition::new(config).unwrap();
    let console = Arc::new(Console::default());
    vm.com1()
        .set_sink(Box::new(ConsoleSink(Arc::clone(&console))));
    vm.resume().unwrap();
    let ready = console.wait_for(PROMPT, 0);

    let cpu = cpu_time(std::process::id());
    let start = Instant::now();
    vm.com1()
        .send_all(format!("{}\r", workload.command()).as_bytes(), TIMEOUT)
        .unwrap();
    console.wait_for(&workload.reply(), ready);
    let round = Round {
        wall: start.elapsed(),
        cpu: cpu_time(std::process::id()).saturating_sub(cpu),
    };

    vm.stop();
    round
}

fn bench_write(c: &mut Criterion) {
    let mut group = c.benchmark_group("blk_write");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .warm_up_time(Duration::from_secs(2));
    for case in backend_cases() {
        for workload in [Workload::batched(100), PAIRED[0], PAIRED[1]] {
            let name = workload.command().replace(' ', "_");
            group.bench_function(format!("{}/{name}", case.name), |b| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| partition_round(&case, workload).wall)
                        .sum()
                })
            });
        }
    }
    group.finish();
}

/// Firecracker running the test guest over a fresh raw disk with the drive cache type `cache`.
fn firecracker_round(binary: &Path, kernel: &Path, cache: &str, workload: Workload) -> Round {
    let dir = disk_dir();
    let disk = raw_image(dir.path(), DISK_BYTES);
    let config = serde_json::json!({
        "boot-source": { "kernel_image_path": kernel, "boot_args": "console=ttyS0" },
        "drives": [{
            "drive_id": "disk0",
            "path_on_host": disk,
            "is_root_device": false,
            "is_read_only": false,
            "cache_type": cache,
        }],
        "machine-config": { "vcpu_count": 1, "mem_size_mib": MEMORY_MIB },
    });
    let mut vm = Firecracker::start(binary, &config, dir.path());
    let ready = vm.console.wait_for(PROMPT, 0);
    let cpu = cpu_time(vm.pid());
    let start = Instant::now();
    vm.type_line(&workload.command());
    vm.console.wait_for(&workload.reply(), ready);
    Round {
        wall: start.elapsed(),
        cpu: cpu_time(vm.pid()).saturating_sub(cpu),
    }
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// For each side-by-side workload, interleaved rounds under Firecracker (once per drive cache
/// type) and the partition (once per backend case); prints the medians and each case's ratio to
/// each Firecracker configuration.
fn paired_with_firecracker(binary: &Path) {
    let rounds: usize = std::env::var("VMMS_PAIRED_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(9);
    let caches: Vec<String> = std::env::var("VMMS_FIRECRACKER_CACHE")
        .unwrap_or_else(|_| "Writeback,Unsafe".into())
        .split(',')
        .map(str::to_owned)
        .collect();
    let kernel_dir = tempfile::tempdir().unwrap();
    let kernel = kernel_dir.path().join("vmms-guest.elf");
    std::fs::write(&kernel, vmms_guest::ELF).unwrap();
    let cases = backend_cases();
    for workload in PAIRED {
        let mut theirs: Vec<Vec<Round>> = vec![Vec::new(); caches.len()];
        let mut ours: Vec<Vec<Round>> = vec![Vec::new(); cases.len()];
        for _ in 0..rounds {
            for (cache, times) in caches.iter().zip(&mut theirs) {
                times.push(firecracker_round(binary, &kernel, cache, workload));
            }
            for (case, times) in cases.iter().zip(&mut ours) {
                times.push(partition_round(case, workload));
            }
        }
        println!(
            "{}, {rounds} interleaved rounds (medians; ratio per-round range)",
            workload.command()
        );
        let walls = |rounds: &[Round]| rounds.iter().map(|r| r.wall).collect::<Vec<_>>();
        let cpus = |rounds: &[Round]| rounds.iter().map(|r| r.cpu).collect::<Vec<_>>();
        for (cache, rounds) in caches.iter().zip(&theirs) {
            println!(
                "  firecracker {cache:<16} {:.1} ms (cpu {:.1} ms)",
                millis(median(walls(rounds))),
                millis(median(cpus(rounds)))
            );
        }
        for (case, rounds) in cases.iter().zip(&ours) {
            let ratios: Vec<String> = caches
                .iter()
                .zip(&theirs)
                .map(|(cache, base)| format!("{cache} {}", ratio(&walls(rounds), &walls(base))))
                .collect();
            println!(
                "  partition   {:<16} {:.1} ms (cpu {:.1} ms); vs firecracker {}",
                case.name,
                millis(median(walls(rounds))),
                millis(median(cpus(rounds))),
                ratios.join(", ")
            );
        }
    }
}

/// The ratio of the medians of `ours` to `theirs`, with the range of the per-round ratios.
fn ratio(ours: &[Duration], theirs: &[Duration]) -> String {
    let per_round: Vec<f64> = ours
        .iter()
        .zip(theirs)
        .map(|(o, t)| o.as_secs_f64() / t.as_secs_f64())
        .collect();
    let (lo, hi) = per_round
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
    let medians = median(ours.to_vec()).as_secs_f64() / median(theirs.to_vec()).as_secs_f64();
    format!("{medians:.2} ({lo:.2}-{hi:.2})")
}

criterion_group!(benches, bench_write);

fn main() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipped: /dev/kvm is not available on this host");
        return;
    }
    if let Some(binary) = std::env::var_os("VMMS_FIRECRACKER") {
        paired_with_firecracker(Path::new(&binary));
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
