//! Sequential write throughput of a fresh disk through partition's block-backend seam: a qcow2
//! image (snapshot's imago-backed `Disk`, allocating clusters as it goes, and once more over
//! clusters already allocated) and a raw image through
//! the same backend, next to plain `pwrite` into a raw file, the floor any backend pays. Each
//! round writes 64 MiB in `REQUEST`-sized requests from guest memory, then flushes (fsync).
//!
//! Besides criterion's per-function figures, `--bench` ends with interleaved rounds (qcow2, raw,
//! pwrite, qcow2, ...) so that the three see the same machine load; their medians and ratios are
//! the figures to quote. Pin it: `taskset -c 1 cargo bench --bench qcow2_write`.
#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use partition::block::BlockBackend;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Bytes per round when measuring (`--bench`); test runners smoke-test with [`SMOKE_TOTAL`].
const MEASURED_TOTAL: u64 = 64 << 20;
const SMOKE_TOTAL: u64 = 1 << 20;
static TOTAL_BYTES: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

fn total() -> u64 {
    *TOTAL_BYTES.get().unwrap_or(&SMOKE_TOTAL)
}
const REQUEST: usize = 128 << 10;
const ROUNDS: usize = 9;

type Memory = GuestMemoryMmap<AtomicBitmap>;

fn guest_memory() -> Memory {
    let mem = Memory::from_ranges(&[(GuestAddress(0), REQUEST)]).unwrap();
    let pattern: Vec<u8> = (0..REQUEST).map(|i| (i % 251) as u8 + 1).collect();
    mem.write_slice(&pattern, GuestAddress(0)).unwrap();
    mem
}

#[derive(Clone, Copy, Debug)]
enum Target {
    Qcow2,
    /// The same qcow2 image written a second time: clusters already allocated.
    Qcow2Rewrite,
    RawBackend,
    Pwrite,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Qcow2 => "qcow2_backend",
            Target::Qcow2Rewrite => "qcow2_rewrite",
            Target::RawBackend => "raw_backend",
            Target::Pwrite => "raw_pwrite",
        }
    }
}

/// A fresh, empty image for one round.
fn fresh(dir: &Path, target: Target, mem: &Memory) -> std::path::PathBuf {
    let path = dir.join(format!("{}.img", target.name()));
    let _ = std::fs::remove_file(&path);
    match target {
        Target::Qcow2 => snapshot::create_qcow2(&path, total()).unwrap(),
        Target::Qcow2Rewrite => {
            snapshot::create_qcow2(&path, total()).unwrap();
            write_round(&path, Target::Qcow2, mem);
        }
        Target::RawBackend | Target::Pwrite => {
            File::create(&path).unwrap().set_len(total()).unwrap();
        }
    }
    path
}

/// Writes the whole disk once and flushes; returns the elapsed time.
fn write_round(path: &Path, target: Target, mem: &Memory) -> Duration {
    let slice = mem.get_slice(GuestAddress(0), REQUEST).unwrap();
    match target {
        Target::Qcow2 | Target::Qcow2Rewrite | Target::RawBackend => {
            let disk = snapshot::open_disk(path, false).unwrap();
            let start = Instant::now();
            for i in 0..total() / REQUEST as u64 {
                disk.write_at(i * REQUEST as u64, &slice).unwrap();
            }
            BlockBackend::flush(&disk).unwrap();
            start.elapsed()
        }
        Target::Pwrite => {
            let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            let mut buf = vec![0u8; REQUEST];
            let start = Instant::now();
            for i in 0..total() / REQUEST as u64 {
                // The guest bytes are copied out as a raw backend over a plain file would.
                slice.copy_to(&mut buf[..]);
                file.write_all_at(&buf, i * REQUEST as u64).unwrap();
            }
            file.sync_all().unwrap();
            start.elapsed()
        }
    }
}

fn bench(c: &mut Criterion, dir: &Path, mem: &Memory) {
    let mut group = c.benchmark_group("sequential_write");
    group.throughput(Throughput::Bytes(total()));
    group.sample_size(10);
    for target in [Target::Qcow2, Target::RawBackend, Target::Pwrite] {
        group.bench_function(target.name(), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| write_round(&fresh(dir, target, mem), target, mem))
                    .sum()
            })
        });
    }
    group.finish();
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn interleaved(dir: &Path, mem: &Memory) {
    let targets = [
        Target::Qcow2,
        Target::Qcow2Rewrite,
        Target::RawBackend,
        Target::Pwrite,
    ];
    let mut mibs = vec![Vec::new(); targets.len()];
    for _ in 0..ROUNDS {
        for (i, &target) in targets.iter().enumerate() {
            let elapsed = write_round(&fresh(dir, target, mem), target, mem);
            mibs[i].push(total() as f64 / (1 << 20) as f64 / elapsed.as_secs_f64());
        }
    }
    let medians: Vec<f64> = mibs.into_iter().map(median).collect();
    println!(
        "\ninterleaved, {ROUNDS} rounds of {} MiB in {} KiB requests + fsync (median MiB/s):",
        total() >> 20,
        REQUEST >> 10
    );
    for (target, m) in targets.iter().zip(&medians) {
        println!(
            "  {:<14} {m:8.1}  ({:.2} of raw_pwrite)",
            target.name(),
            m / medians[3]
        );
    }
}

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let _ = TOTAL_BYTES.set(if measuring {
        MEASURED_TOTAL
    } else {
        SMOKE_TOTAL
    });
    let dir = tempfile::tempdir_in(
        std::env::var_os("VMMS_BENCH_DIR").unwrap_or_else(|| std::env::temp_dir().into()),
    )
    .unwrap();
    let mem = guest_memory();
    let mut criterion = Criterion::default().configure_from_args();
    bench(&mut criterion, dir.path(), &mem);
    criterion.final_summary();
    if measuring {
        interleaved(dir.path(), &mem);
    }
}
