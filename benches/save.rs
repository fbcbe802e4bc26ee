//! Saving costs what the guest used: the memory image of a 1 GiB test guest that touched 10 MiB,
//! written (and fsynced, as a worker's save does) the sparse way `Partition::save_memory` writes
//! it, next to the dense way (every byte of memory) it used to be written; and a restore from the
//! sparse image.
//!
//! The criterion group times the sparse save and the restore. With `--bench`, the sparse and dense
//! saves are also timed in interleaved rounds and their ratio printed with the load average.
#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::Criterion;
use partition::{KernelImage, Partition, PartitionConfig, PartitionState};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress, WriteVolatile};

const MEMORY_MIB: u64 = 1024;
/// Pages the guest touches with `dirty`: 10 MiB.
const DIRTY_PAGES: u64 = 2560;
const TIMEOUT: Duration = Duration::from_secs(60);

/// COM1 output, kept for waiting on replies.
#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    fn wait_for(&self, needle: &str) {
        let start = Instant::now();
        while !String::from_utf8_lossy(&self.0.lock().unwrap()).contains(needle) {
            assert!(start.elapsed() < TIMEOUT, "no {needle:?} from the guest");
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

fn config() -> PartitionConfig {
    let mut config = PartitionConfig::new(KernelImage::Bytes(Arc::from(vmms::guest::ELF)), "");
    config.memory_mib = MEMORY_MIB;
    config
}

/// The test guest after `dirty 2560`, paused.
fn dirtied_guest() -> Partition {
    let mut vm = Partition::new(config()).unwrap();
    let console = Console::default();
    vm.com1().set_sink(Box::new(console.clone()));
    vm.resume().unwrap();
    console.wait_for(vmms_guest::protocol::PROMPT);
    vm.com1()
        .send_all(format!("dirty {DIRTY_PAGES}\r").as_bytes(), TIMEOUT)
        .unwrap();
    console.wait_for(&format!("dirtied {DIRTY_PAGES} pages"));
    vm.pause().unwrap();
    vm
}

/// What a worker's save does with memory: a new file, the image, fsync.
fn save_sparse(vm: &Partition, path: &Path) -> Duration {
    let _ = std::fs::remove_file(path);
    let start = Instant::now();
    let mut file = File::create_new(path).unwrap();
    vm.save_memory(&mut file).unwrap();
    file.sync_all().unwrap();
    start.elapsed()
}

/// The same, writing every byte of memory (how images were written before they were sparse).
fn save_dense(vm: &Partition, path: &Path) -> Duration {
    let _ = std::fs::remove_file(path);
    let start = Instant::now();
    let mut file = File::create_new(path).unwrap();
    for region in vm.memory().iter() {
        let slice = region
            .get_slice(MemoryRegionAddress(0), region.len() as usize)
            .unwrap();
        file.write_all_volatile(&slice).unwrap();
    }
    file.sync_all().unwrap();
    start.elapsed()
}

fn benches(c: &mut Criterion, vm: &Partition, dir: &Path) {
    let mut group = c.benchmark_group("memory_image_1gib_guest_touched_10mib");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(3));
    let image = dir.join("sparse.bin");
    group.bench_function("save_sparse_and_fsync", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| save_sparse(vm, &image)).sum());
    });
    let state = vm.capture_state().unwrap().to_json().unwrap();
    save_sparse(vm, &image);
    group.bench_function("restore_from_sparse_image", |b| {
        b.iter(|| {
            let state = PartitionState::from_json(&state).unwrap();
            let file = File::open(&image).unwrap();
            Partition::builder(config()).restore(&state, &file).unwrap()
        });
    });
    group.finish();
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn median(values: &mut [Duration]) -> Duration {
    values.sort();
    values[values.len() / 2]
}

/// Sparse and dense saves of the same guest, interleaved.
fn figures(vm: &Partition, dir: &Path) {
    let rounds = 7;
    let (mut sparse, mut dense) = (Vec::new(), Vec::new());
    println!("load average before: {}", load_average());
    for _ in 0..rounds {
        sparse.push(save_sparse(vm, &dir.join("sparse.bin")));
        dense.push(save_dense(vm, &dir.join("dense.bin")));
    }
    println!("load average after {rounds} rounds: {}", load_average());
    let mut ratios: Vec<f64> = sparse
        .iter()
        .zip(&dense)
        .map(|(s, d)| s.as_secs_f64() / d.as_secs_f64())
        .collect();
    ratios.sort_by(f64::total_cmp);
    let data = |name: &str| std::fs::metadata(dir.join(name)).unwrap();
    use std::os::unix::fs::MetadataExt;
    println!(
        "save + fsync of a {MEMORY_MIB} MiB guest that touched {} MiB: sparse median {:.1} ms \
         ({} KiB allocated), dense median {:.1} ms ({} KiB allocated), per-round ratio {:.3}",
        (DIRTY_PAGES * 4096) >> 20,
        median(&mut sparse).as_secs_f64() * 1e3,
        data("sparse.bin").blocks() / 2,
        median(&mut dense).as_secs_f64() * 1e3,
        data("dense.bin").blocks() / 2,
        ratios[ratios.len() / 2],
    );
}

fn main() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipped: /dev/kvm is not available on this host");
        return;
    }
    let measuring = std::env::args().any(|a| a == "--bench");
    // Set TMPDIR to measure on the disk a store would use (here /tmp is on the same disk).
    let dir = tempfile::tempdir().unwrap();
    let vm = dirtied_guest();
    let mut criterion = Criterion::default().configure_from_args();
    benches(&mut criterion, &vm, dir.path());
    criterion.final_summary();
    if measuring {
        figures(&vm, dir.path());
    }
}
