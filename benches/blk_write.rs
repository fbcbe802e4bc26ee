//! virtio-blk end to end: the test guest's `write N` (N sequential 4 KiB records, sixteen to a
//! 64 KiB request, then one flush; the guest polls for completions), timed from typing the command
//! to the guest's `wrote N records`, through a partition with each disk backend and I/O mode.
//!
//! Each iteration boots a fresh guest on a fresh sparse disk (not timed), so every run appends to
//! an empty log. Disks live in `VMMS_BENCH_DISK_DIR` (default: the system temp folder, so the
//! final flush is a real `fdatasync`).
//!
//! With `VMMS_FIRECRACKER=<path to a firecracker binary>` the bench then runs the same guest and
//! workload under Firecracker and under the partition in interleaved rounds (`VMMS_PAIRED_ROUNDS`,
//! default 9) and prints both medians and their ratio: the side-by-side figure of issue 16.
//! `VMMS_FIRECRACKER_CACHE` picks Firecracker's drive cache type (`Unsafe`, its default: FLUSH not
//! offered and never synced; or `Writeback`: FLUSH offered and honoured, as the partition does).
#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use partition::block::{BlockBackend, GuestBuffer};
use partition::{DiskConfig, DiskIo, KernelImage, Partition, PartitionConfig};
use vm_memory::Bytes;
use vmms_guest::protocol::PROMPT;

const TIMEOUT: Duration = Duration::from_secs(60);
const MEMORY_MIB: u64 = 32;
const DISK_BYTES: u64 = 64 << 20;
/// Records of the side-by-side workload (issue 16).
const PAIRED_RECORDS: u64 = 3000;

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
            name: "raw_synchronous",
            prepare: raw_image,
            attach: |path| DiskConfig {
                io: DiskIo::Synchronous,
                ..DiskConfig::new(path)
            },
        },
    ]
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

/// Everything a guest printed, with a condition variable so waiting costs no polling delay.
#[derive(Default)]
struct Console {
    text: Mutex<Vec<u8>>,
    grew: Condvar,
}

impl Console {
    fn push(&self, bytes: &[u8]) {
        self.text.lock().unwrap().extend_from_slice(bytes);
        self.grew.notify_all();
    }

    fn len(&self) -> usize {
        self.text.lock().unwrap().len()
    }

    /// Waits until `needle` appears at or after `from`; returns the offset just past it.
    fn wait_for(&self, needle: &str, from: usize) -> usize {
        let deadline = Instant::now() + TIMEOUT;
        let mut text = self.text.lock().unwrap();
        loop {
            if let Some(at) = text
                .get(from..)
                .and_then(|t| t.windows(needle.len()).position(|w| w == needle.as_bytes()))
            {
                return from + at + needle.len();
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| {
                    panic!(
                        "timed out waiting for {needle:?}; output:\n{}",
                        String::from_utf8_lossy(&text)
                    )
                });
            text = self.grew.wait_timeout(text, left).unwrap().0;
        }
    }
}

struct ConsoleSink(Arc<Console>);

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn disk_dir() -> tempfile::TempDir {
    match std::env::var_os("VMMS_BENCH_DISK_DIR") {
        Some(dir) => tempfile::tempdir_in(dir).unwrap(),
        None => tempfile::tempdir().unwrap(),
    }
}

fn reply(records: u64) -> String {
    format!("wrote {records} records")
}

/// One timed `write records` on a freshly booted partition over `disk`.
fn partition_round(case: &BackendCase, records: u64) -> Duration {
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

    let start = Instant::now();
    vm.com1()
        .send_all(format!("write {records}\r").as_bytes(), TIMEOUT)
        .unwrap();
    console.wait_for(&reply(records), ready);
    let elapsed = start.elapsed();

    vm.stop();
    elapsed
}

fn bench_write(c: &mut Criterion) {
    let mut group = c.benchmark_group("blk_write");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .warm_up_time(Duration::from_secs(2));
    for case in backend_cases() {
        for records in [100u64, PAIRED_RECORDS] {
            group.bench_function(format!("{}/write_{records}", case.name), |b| {
                b.iter_custom(|iters| (0..iters).map(|_| partition_round(&case, records)).sum())
            });
        }
    }
    group.finish();
}

/// A Firecracker process running the test guest over a raw disk, COM1 on its stdin/stdout.
struct Firecracker {
    child: Child,
    console: Arc<Console>,
    _dir: tempfile::TempDir,
}

impl Firecracker {
    fn start(binary: &Path, kernel: &Path, cache: &str) -> Self {
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
        let config_path = dir.path().join("config.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let mut child = Command::new(binary)
            .arg("--no-api")
            .arg("--config-file")
            .arg(&config_path)
            .arg("--log-path")
            .arg("/dev/null")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start firecracker");
        let console = Arc::new(Console::default());
        let mut stdout = child.stdout.take().unwrap();
        let sink = Arc::clone(&console);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.push(&buf[..n]);
            }
        });
        Self {
            child,
            console,
            _dir: dir,
        }
    }

    fn round(mut self, records: u64) -> Duration {
        let ready = self.console.wait_for(PROMPT, 0);
        let stdin = self.child.stdin.as_mut().unwrap();
        let start = Instant::now();
        stdin
            .write_all(format!("write {records}\r").as_bytes())
            .unwrap();
        stdin.flush().unwrap();
        self.console.wait_for(&reply(records), ready);
        let elapsed = start.elapsed();
        let _ = self.child.kill();
        let _ = self.child.wait();
        assert!(self.console.len() > ready);
        elapsed
    }
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Interleaved rounds of the same workload under Firecracker and the partition; prints medians.
fn paired_with_firecracker(binary: &Path) {
    let rounds: usize = std::env::var("VMMS_PAIRED_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(9);
    let cache = std::env::var("VMMS_FIRECRACKER_CACHE").unwrap_or_else(|_| "Unsafe".into());
    let kernel_dir = tempfile::tempdir().unwrap();
    let kernel = kernel_dir.path().join("vmms-guest.elf");
    std::fs::write(&kernel, vmms_guest::ELF).unwrap();
    let cases = backend_cases();
    let mut theirs = Vec::new();
    let mut ours: Vec<Vec<Duration>> = vec![Vec::new(); cases.len()];
    for _ in 0..rounds {
        theirs.push(Firecracker::start(binary, &kernel, &cache).round(PAIRED_RECORDS));
        for (case, times) in cases.iter().zip(&mut ours) {
            times.push(partition_round(case, PAIRED_RECORDS));
        }
    }
    println!(
        "write {PAIRED_RECORDS}, {rounds} interleaved rounds: firecracker ({cache}) {:.1} ms",
        millis(median(theirs.clone()))
    );
    for (case, times) in cases.iter().zip(ours) {
        let ratios: Vec<f64> = times
            .iter()
            .zip(&theirs)
            .map(|(o, t)| o.as_secs_f64() / t.as_secs_f64())
            .collect();
        let (lo, hi) = ratios
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
        let (o, t) = (median(times), median(theirs.clone()));
        println!(
            "  partition {:<16} {:.1} ms, ratio {:.2} (per-round {lo:.2}-{hi:.2})",
            case.name,
            millis(o),
            o.as_secs_f64() / t.as_secs_f64(),
        );
    }
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
