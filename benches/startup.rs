//! Start and stop at the host's limit: a partition from nothing to its guest's first console byte,
//! and VMs started and stopped per second.
//!
//! The guest is a micro PVH kernel (an ELF64 with a `XEN_ELFNOTE_PHYS32_ENTRY` note, 24 bytes of
//! code) that prints `OK` and a newline on COM1 and resets the machine through the i8042: the
//! smallest guest every VMM here boots, so what is measured is the VMM's own start and stop.
//!
//! The criterion group times the in-process start (and start + stop). With `--bench`, the figures
//! below are printed as well, measured in interleaved rounds so that load changes hit every subject
//! alike:
//! - spawn → marker (`OK\n` read from the process's stdout) and spawn → exit, for the `partition`
//!   example (`$VMMS_EXAMPLE`, default `target/release/examples/partition`; build it with `cargo
//!   build --release --example partition`), Firecracker (`$FIRECRACKER`, default `/work/peers/bin/firecracker`) and, when
//!   `$VMMS_BASELINE_EXAMPLE` names one, an older build of the example;
//! - in-process VMs started and stopped per second, one after the other.
#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use criterion::Criterion;
use partition::{ExitReason, KernelImage, Partition, PartitionConfig};

#[path = "common/micro_guest.rs"]
mod micro_guest;
use micro_guest::{MARKER, micro_pvh_elf};

const MEMORY_MIB: u64 = 128;

fn micro_config() -> PartitionConfig {
    let mut config = PartitionConfig::new(KernelImage::Bytes(Arc::from(micro_pvh_elf(true))), "");
    config.memory_mib = MEMORY_MIB;
    config
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

/// Builds and runs the micro guest to its first byte; returns the running partition.
fn start_to_first_byte() -> Partition {
    let mut partition = Partition::new(micro_config()).unwrap();
    let sink = FirstByte::default();
    partition.com1().set_sink(Box::new(sink.clone()));
    partition.resume().unwrap();
    sink.wait();
    partition
}

/// One VM's whole life: start, run until the guest resets, tear down. Returns what dropping the
/// stopped partition cost the caller.
fn start_run_stop() -> Duration {
    let mut partition = Partition::new(micro_config()).unwrap();
    partition.resume().unwrap();
    let exit = partition.wait(Some(Duration::from_secs(10)));
    assert_eq!(exit, Some(ExitReason::Reset));
    let start = Instant::now();
    drop(partition);
    start.elapsed()
}

fn in_process(c: &mut Criterion) {
    let mut group = c.benchmark_group("micro_pvh_in_process");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(4));
    group.bench_function("start_to_first_byte", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let partition = start_to_first_byte();
                total += start.elapsed();
                drop(partition);
            }
            total
        });
    });
    group.bench_function("start_run_stop", |b| b.iter(start_run_stop));
    group.bench_function("drop_stopped_partition", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| start_run_stop()).sum())
    });
    group.finish();
}

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipped: /dev/kvm is not available on this host");
        return;
    }
    let mut criterion = Criterion::default().configure_from_args();
    in_process(&mut criterion);
    criterion.final_summary();
    if measuring {
        figures();
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// A VMM binary under test and how to run the micro guest in it.
struct Subject {
    name: &'static str,
    command: Command,
    marker: Vec<Duration>,
    exit: Vec<Duration>,
}

impl Subject {
    /// Spawns the VMM once; records spawn → marker and spawn → exit.
    fn round(&mut self) {
        let start = Instant::now();
        let mut child = self
            .command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        let mut marked = None;
        loop {
            let n = out.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if marked.is_none() && seen.windows(MARKER.len()).any(|w| w == MARKER) {
                marked = Some(start.elapsed());
            }
        }
        child.wait().unwrap();
        let exit = start.elapsed();
        let marked = marked.unwrap_or_else(|| {
            panic!(
                "{}: no marker; output: {:?}",
                self.name,
                String::from_utf8_lossy(&seen)
            )
        });
        self.marker.push(marked);
        self.exit.push(exit);
    }
}

fn median(values: &[Duration]) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

fn median_f64(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn example_path() -> PathBuf {
    if let Some(path) = std::env::var_os("VMMS_EXAMPLE") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/startup-<hash> → target/<profile>/examples/partition
    exe.parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("examples").join("partition"))
        .unwrap()
}

/// Spawn → marker and spawn → exit of each VMM in interleaved rounds; in-process start/stop rate.
fn figures() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("micro-pvh.elf");
    std::fs::write(&kernel, micro_pvh_elf(true)).unwrap();
    let mut subjects = Vec::new();
    let example = |name, path: PathBuf| {
        let mut command = Command::new(path);
        command.arg("--kernel").arg(&kernel).args([
            "--cmdline",
            "",
            "--mem-mib",
            &MEMORY_MIB.to_string(),
        ]);
        Subject {
            name,
            command,
            marker: Vec::new(),
            exit: Vec::new(),
        }
    };
    let ours = example_path();
    if ours.exists() {
        subjects.push(example("partition example", ours));
    } else {
        println!(
            "no {}: build it with `cargo build --release --example partition`",
            ours.display()
        );
    }
    if let Some(baseline) = std::env::var_os("VMMS_BASELINE_EXAMPLE") {
        subjects.push(example("baseline example", PathBuf::from(baseline)));
    }
    let firecracker = std::env::var_os("FIRECRACKER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/work/peers/bin/firecracker"));
    if firecracker.exists() {
        let config = dir.path().join("firecracker.json");
        let json = serde_json::json!({
            "boot-source": {"kernel_image_path": kernel, "boot_args": "console=ttyS0"},
            "drives": [],
            "machine-config": {"vcpu_count": 1, "mem_size_mib": MEMORY_MIB},
        });
        std::fs::write(&config, json.to_string()).unwrap();
        let mut command = Command::new(&firecracker);
        command
            .args(["--no-api", "--log-path", "/dev/null", "--config-file"])
            .arg(&config);
        subjects.push(Subject {
            name: "firecracker",
            command,
            marker: Vec::new(),
            exit: Vec::new(),
        });
    } else {
        println!("no Firecracker at {}", firecracker.display());
    }

    let rounds: usize = std::env::var("STARTUP_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(40);
    println!("load average before: {}", load_average());
    for subject in &mut subjects {
        subject.round(); // warm the page cache
        subject.marker.clear();
        subject.exit.clear();
    }
    for _ in 0..rounds {
        for subject in &mut subjects {
            subject.round();
        }
    }
    println!("load average after {rounds} rounds: {}", load_average());
    for subject in &subjects {
        let (min, max) = (
            subject.marker.iter().min().unwrap(),
            subject.marker.iter().max().unwrap(),
        );
        println!(
            "{:>18}: spawn → marker median {:.2} ms ({:.2}–{:.2}), spawn → exit median {:.2} ms, \
             exits per second (sequential) {:.0}",
            subject.name,
            ms(median(&subject.marker)),
            ms(*min),
            ms(*max),
            ms(median(&subject.exit)),
            1.0 / median(&subject.exit).as_secs_f64(),
        );
    }
    let Some(first) = subjects.first() else {
        return;
    };
    for other in subjects.iter().skip(1) {
        let mut marker: Vec<f64> = first
            .marker
            .iter()
            .zip(&other.marker)
            .map(|(a, b)| a.as_secs_f64() / b.as_secs_f64())
            .collect();
        let mut exit: Vec<f64> = first
            .exit
            .iter()
            .zip(&other.exit)
            .map(|(a, b)| a.as_secs_f64() / b.as_secs_f64())
            .collect();
        println!(
            "{} / {}: per-round ratio of medians: marker {:.2}, exit {:.2}",
            first.name,
            other.name,
            median_f64(&mut marker),
            median_f64(&mut exit),
        );
    }

    let window = Duration::from_secs(3);
    let start = Instant::now();
    let mut drops = Vec::new();
    while start.elapsed() < window {
        drops.push(start_run_stop());
    }
    println!(
        "in-process start → guest reset → teardown, one after another: {:.0} VMs/s ({} in {:.1} s; load {})",
        drops.len() as f64 / start.elapsed().as_secs_f64(),
        drops.len(),
        start.elapsed().as_secs_f64(),
        load_average()
    );
    println!(
        "dropping a stopped partition costs its owner: median {:.3} ms, max {:.3} ms",
        ms(median(&drops)),
        ms(*drops.iter().max().unwrap())
    );
}
