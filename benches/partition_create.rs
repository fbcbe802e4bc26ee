//! Partition create-to-first-instruction with 1, 2 and 8 vCPUs: from `PartitionBuilder::build`
//! (VM, in-kernel irqchip and PIT, memory, vCPUs, devices, kernel load, boot structures and the
//! ACPI and MP tables) through `resume` to the boot vCPU's first instruction, an `out` that reaches
//! a device on the bus. Teardown is not counted.
#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use partition::bus::BusDevice;
use partition::{KernelImage, Partition, PartitionConfig};

const FIRST_PORT: u16 = 0x510;

/// Set by the guest's first instruction.
#[derive(Default)]
struct FirstInstruction {
    reached: Mutex<bool>,
    cv: Condvar,
}

impl FirstInstruction {
    fn wait(&self) {
        let reached = self.reached.lock().unwrap();
        let (reached, timeout) = self
            .cv
            .wait_timeout_while(reached, Duration::from_secs(10), |r| !*r)
            .unwrap();
        assert!(*reached && !timeout.timed_out(), "guest never ran");
    }
}

impl BusDevice for FirstInstruction {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, _offset: u64, _data: &[u8]) {
        *self.reached.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

use vmms_guest::fixture::tiny_elf;

/// One create-to-first-instruction, and the partition (to be torn down outside the timing).
fn create_and_run(vcpus: u8, kernel: &Arc<[u8]>) -> (Duration, Partition) {
    let first = Arc::new(FirstInstruction::default());
    let mut config = PartitionConfig::new(KernelImage::Bytes(kernel.clone()), "");
    config.memory_mib = 64;
    config.vcpus = vcpus;
    let start = Instant::now();
    let mut vm = Partition::builder(config)
        .pio_device(FIRST_PORT, 1, first.clone())
        .build()
        .expect("bench partition");
    vm.resume().unwrap();
    first.wait();
    (start.elapsed(), vm)
}

fn bench_create(c: &mut Criterion) {
    // mov dx, 0x510; out dx, al; jmp $
    let kernel: Arc<[u8]> = Arc::from(tiny_elf(&[0x66, 0xba, 0x10, 0x05, 0xee, 0xeb, 0xfe]));
    let mut group = c.benchmark_group("partition_create");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(8));
    for vcpus in [1u8, 2, 8] {
        group.bench_function(format!("first_instruction/{vcpus}_vcpus"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (elapsed, mut vm) = create_and_run(vcpus, &kernel);
                    total += elapsed;
                    vm.stop();
                    drop(vm);
                }
                total
            });
        });
    }
    group.finish();
}

criterion_group!(benches, bench_create);
criterion_main!(benches);
