//! vCPU exit round trips: the partition's run loop and bus next to a raw kvm-ioctls loop running the
//! same guest code in the same process, so their ratio is the cost of our dispatch.
//!
//! Each guest is a two-instruction loop in 64-bit mode (CPL0) doing one access per pass: `out`,
//! `in`, a 4-byte MMIO store or load. One criterion iteration is one exit round trip; the time is
//! taken inside the handler, from the first exit to the N+1th, so thread start-up and pause are not
//! counted. `*_32_devices` puts the target device among 31 others on each bus.
//!
//! `queue_notify` prices a virtio queue notification for the notifying vCPU: a store that exits
//! to userspace (the synchronous disk path) against one KVM matches to an ioeventfd (the I/O
//! thread's path), at CPL0 and CPL3.
#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use kvm_bindings::{
    KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_regs, kvm_segment, kvm_userspace_memory_region,
};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuExit, VcpuFd, VmFd};
use partition::bus::BusDevice;
use partition::{KernelImage, Partition, PartitionConfig};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const BENCH_PORT: u16 = 0x510;
/// Below 1 GiB (the boot identity map) and above the 16 MiB of RAM, so it exits as MMIO.
const BENCH_MMIO: u64 = 0x1000_0000;
const LOAD_ADDR: u64 = 0x10_0000;

#[derive(Clone, Copy, Debug)]
enum Mode {
    PioOut,
    PioIn,
    MmioWrite,
    MmioRead,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::PioOut => "pio_out",
            Mode::PioIn => "pio_in",
            Mode::MmioWrite => "mmio_write",
            Mode::MmioRead => "mmio_read",
        }
    }

    /// The guest loop, 64-bit code loaded at 1 MiB.
    fn code(self) -> Vec<u8> {
        match self {
            Mode::PioOut => vec![0x66, 0xba, 0x10, 0x05, 0xee, 0xeb, 0xfd], // mov dx,0x510; out dx,al; jmp
            Mode::PioIn => vec![0x66, 0xba, 0x10, 0x05, 0xec, 0xeb, 0xfd], // mov dx,0x510; in al,dx; jmp
            Mode::MmioWrite => vec![0xbf, 0, 0, 0, 0x10, 0x89, 0x07, 0xeb, 0xfc], // mov edi,..; mov [rdi],eax
            Mode::MmioRead => vec![0xbf, 0, 0, 0, 0x10, 0x8b, 0x07, 0xeb, 0xfc], // mov edi,..; mov eax,[rdi]
        }
    }
}

/// Counts exits and times exits 1..=N+1; the device both loops call on every bench exit.
#[derive(Default)]
struct ExitClock {
    count: AtomicU64,
    target: AtomicU64,
    done: AtomicBool,
    start: Mutex<Option<Instant>>,
    elapsed: Mutex<Option<Duration>>,
    finished: Condvar,
}

impl ExitClock {
    fn arm(&self, iters: u64) {
        self.count.store(0, Ordering::SeqCst);
        self.target.store(iters + 1, Ordering::SeqCst);
        self.done.store(false, Ordering::SeqCst);
        *self.elapsed.lock().unwrap() = None;
    }

    #[inline]
    fn tick(&self) {
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        if n == 1 {
            *self.start.lock().unwrap() = Some(Instant::now());
        } else if n == self.target.load(Ordering::Relaxed) {
            let start = self
                .start
                .lock()
                .unwrap()
                .take()
                .expect("first exit recorded");
            *self.elapsed.lock().unwrap() = Some(start.elapsed());
            self.done.store(true, Ordering::Release);
            self.finished.notify_all();
        }
    }

    fn wait(&self) -> Duration {
        let guard = self.elapsed.lock().unwrap();
        let guard = self.finished.wait_while(guard, |e| e.is_none()).unwrap();
        guard.expect("elapsed set")
    }
}

impl BusDevice for ExitClock {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        self.tick();
        data.fill(0);
    }
    fn write(&self, _offset: u64, _data: &[u8]) {
        self.tick();
    }
}

/// A device that is never the target: it only fills the bus.
struct Filler;
impl BusDevice for Filler {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, _offset: u64, _data: &[u8]) {}
}

use vmms_guest::fixture::tiny_elf;

/// A partition running `mode`'s loop, with the clock (and `fillers` other devices) on its buses.
fn partition_for(mode: Mode, clock: &Arc<ExitClock>, fillers: u16) -> Partition {
    let mut config =
        PartitionConfig::new(KernelImage::Bytes(Arc::from(tiny_elf(&mode.code()))), "");
    config.memory_mib = 16;
    let mut builder = Partition::builder(config)
        .pio_device(BENCH_PORT, 1, clock.clone())
        .mmio_device(BENCH_MMIO, 4, clock.clone());
    for i in 0..fillers {
        builder = builder
            .pio_device(0x1000 + i * 8, 8, Arc::new(Filler))
            .mmio_device(
                BENCH_MMIO + 0x1000 * (u64::from(i) + 1),
                0x100,
                Arc::new(Filler),
            );
    }
    builder.build().expect("bench partition")
}

/// A bare KVM VM running the same code in the same CPU mode, with no bus: the baseline.
struct RawVm {
    vcpu: VcpuFd,
    _vm: VmFd,
    _memory: GuestMemoryMmap,
}

fn raw_vm(mode: Mode) -> RawVm {
    raw_vm_running(&mode.code(), false)
}

/// A bare KVM VM with `code` at 1 MiB on an identity map, in 64-bit mode at CPL0, or at CPL3
/// (user bit at every paging level, DPL-3 segments, IOPL 3 so `out` still exits).
fn raw_vm_running(code: &[u8], cpl3: bool) -> RawVm {
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    vm.set_tss_address(0xfffb_d000).unwrap();
    vm.create_irq_chip().unwrap();
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .unwrap();
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    let host = memory.get_host_address(GuestAddress(0)).unwrap();
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: 16 << 20,
        userspace_addr: host as u64,
    };
    // SAFETY: `memory` maps 16 MiB at `host` and lives in the returned RawVm next to the VM.
    unsafe { vm.set_user_memory_region(region) }.unwrap();
    memory.write_slice(code, GuestAddress(LOAD_ADDR)).unwrap();
    // Identity map of the first 1 GiB in 2 MiB pages, as the partition's boot path builds.
    let user = if cpl3 { 0x4 } else { 0 };
    memory
        .write_obj(0xa003u64 | user, GuestAddress(0x9000))
        .unwrap();
    memory
        .write_obj(0xb003u64 | user, GuestAddress(0xa000))
        .unwrap();
    for i in 0..512u64 {
        memory
            .write_obj((i << 21) | 0x83 | user, GuestAddress(0xb000 + i * 8))
            .unwrap();
    }
    let vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_cpuid2(
        &kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap(),
    )
    .unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    let dpl = if cpl3 { 3 } else { 0 };
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 8 | u16::from(dpl),
        type_: 0xb,
        present: 1,
        dpl,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: 0x10 | u16::from(dpl),
        type_: 0x3,
        l: 0,
        db: 1,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.cr3 = 0x9000;
    sregs.cr4 = 1 << 5;
    sregs.cr0 = 0x8000_0033;
    sregs.efer = (1 << 8) | (1 << 10);
    vcpu.set_sregs(&sregs).unwrap();
    vcpu.set_regs(&kvm_regs {
        rip: LOAD_ADDR,
        rflags: if cpl3 { 0x3002 } else { 2 },
        rsp: 0x8ff0,
        ..Default::default()
    })
    .unwrap();
    RawVm {
        vcpu,
        _vm: vm,
        _memory: memory,
    }
}

/// The baseline loop: KVM_RUN and a direct call into the clock, nothing else.
fn run_raw(raw: &mut RawVm, clock: &ExitClock) -> Duration {
    while !clock.done.load(Ordering::Acquire) {
        match raw.vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(BENCH_PORT, _) => clock.tick(),
            VcpuExit::IoIn(BENCH_PORT, data) => {
                clock.tick();
                data.fill(0);
            }
            VcpuExit::MmioWrite(BENCH_MMIO, _) => clock.tick(),
            VcpuExit::MmioRead(BENCH_MMIO, data) => {
                clock.tick();
                data.fill(0);
            }
            other => panic!("unexpected exit {other:?}"),
        }
    }
    clock.wait()
}

/// Pins this thread, and so every thread it starts later (vCPU threads included), to one CPU: the
/// raw loop and the partition then run on the same core and migrations do not add noise to one side.
fn pin_to_one_cpu() {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write inside it, and
    // sched_setaffinity reads it for the calling thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The dispatch alone, without KVM: a bus lookup plus the device call, with 1 and 32 devices. Added
/// to the raw exit time this is what the partition's loop costs beyond a bare KVM_RUN loop.
fn bench_bus_dispatch(c: &mut Criterion) {
    let mut group = c.benchmark_group("bus_dispatch");
    for devices in [1u64, 32] {
        let mut bus = partition::bus::Bus::new();
        for i in 0..devices {
            bus.insert(Arc::new(Filler), 0x1000 + i * 8, 8).unwrap();
        }
        let target = 0x1000 + (devices / 2) * 8 + 3;
        group.bench_function(format!("pio_write_{devices}_devices"), |b| {
            b.iter(|| bus.write(std::hint::black_box(target), &[0]))
        });
    }
    group.finish();
}

/// A partition driven from a thread that carries the worker's seccomp filters, as a confined
/// worker's are: the vCPU threads it starts inherit them, so their exits pay whatever the
/// filter costs per KVM_RUN.
struct FilteredPartition {
    runs: std::sync::mpsc::Sender<u64>,
    elapsed: std::sync::mpsc::Receiver<Duration>,
}

impl FilteredPartition {
    fn start(mode: Mode) -> Self {
        let (runs, requests) = std::sync::mpsc::channel::<u64>();
        let (done, elapsed) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let clock = Arc::new(ExitClock::default());
            let mut vm = partition_for(mode, &clock, 0);
            worker_manager::worker::install_seccomp_on_current_thread().expect("seccomp");
            for iters in requests {
                clock.arm(iters);
                vm.resume().expect("resume");
                let took = clock.wait();
                vm.pause().expect("pause");
                if done.send(took).is_err() {
                    break;
                }
            }
        });
        FilteredPartition { runs, elapsed }
    }

    fn run(&self, iters: u64) -> Duration {
        self.runs.send(iters).expect("filtered thread");
        self.elapsed.recv().expect("filtered thread")
    }
}

/// A thread that issues `KVM_CHECK_EXTENSION` on request, with or without the worker's seccomp
/// filters: the ioctl path through the filter (the one KVM_RUN takes) without the noise of a
/// guest exit around it.
struct IoctlThread {
    runs: std::sync::mpsc::Sender<u64>,
    elapsed: std::sync::mpsc::Receiver<Duration>,
}

impl IoctlThread {
    fn start(filtered: bool) -> Self {
        let (runs, requests) = std::sync::mpsc::channel::<u64>();
        let (done, elapsed) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let kvm = Kvm::new().expect("/dev/kvm");
            if filtered {
                worker_manager::worker::install_seccomp_on_current_thread().expect("seccomp");
            }
            for iters in requests {
                let start = Instant::now();
                for _ in 0..iters {
                    std::hint::black_box(kvm.check_extension(kvm_ioctls::Cap::Irqchip));
                }
                if done.send(start.elapsed()).is_err() {
                    break;
                }
            }
        });
        IoctlThread { runs, elapsed }
    }

    fn run(&self, iters: u64) -> Duration {
        self.runs.send(iters).expect("ioctl thread");
        self.elapsed.recv().expect("ioctl thread")
    }
}

/// What the worker's seccomp filter adds to an ioctl on /dev/kvm.
fn bench_seccomp(c: &mut Criterion) {
    if !std::path::Path::new("/dev/kvm").exists() {
        return;
    }
    let mut group = c.benchmark_group("seccomp");
    for (label, filtered) in [
        ("kvm_ioctl_unfiltered", false),
        ("kvm_ioctl_filtered", true),
    ] {
        let thread = IoctlThread::start(filtered);
        group.bench_function(label, |b| b.iter_custom(|iters| thread.run(iters)));
    }
    group.finish();
}

fn bench_exits(c: &mut Criterion) {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipped: /dev/kvm is not available on this host");
        return;
    }
    pin_to_one_cpu();
    let mut group = c.benchmark_group("vcpu_exit");
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1));
    for mode in [Mode::PioOut, Mode::PioIn, Mode::MmioWrite, Mode::MmioRead] {
        let clock = Arc::new(ExitClock::default());
        let mut raw = raw_vm(mode);
        group.bench_function(format!("{}/raw_kvm", mode.name()), |b| {
            b.iter_custom(|iters| {
                clock.arm(iters);
                run_raw(&mut raw, &clock)
            })
        });
        let filtered = FilteredPartition::start(mode);
        group.bench_function(format!("{}/partition_seccomp", mode.name()), |b| {
            b.iter_custom(|iters| filtered.run(iters))
        });
        for (label, fillers) in [("partition", 0), ("partition_32_devices", 31)] {
            let clock = Arc::new(ExitClock::default());
            let mut vm = partition_for(mode, &clock, fillers);
            group.bench_function(format!("{}/{label}", mode.name()), |b| {
                b.iter_custom(|iters| {
                    clock.arm(iters);
                    vm.resume().expect("resume");
                    let elapsed = clock.wait();
                    vm.pause().expect("pause");
                    elapsed
                })
            });
        }
    }
    group.finish();
}

/// How a queue-notify bench guest's store reaches the device.
#[derive(Clone, Copy, Debug)]
enum Notify {
    /// The loop without the store: what the loop itself costs, to subtract.
    LoopOnly,
    /// Every store is an MMIO exit to this process (the old synchronous path's notification).
    UserspaceExit,
    /// The store matches a KVM ioeventfd (datamatch 0): the exit ends in the kernel, which
    /// signals the eventfd, and the vCPU re-enters the guest at once (the I/O thread's path).
    Ioeventfd,
}

/// `rcx` stores of eax (0: queue 0) to the bench address, then one `out` that hands the vCPU back.
fn notify_loop(store: bool) -> Vec<u8> {
    let mut code = vec![0xbf, 0, 0, 0, 0x10]; // mov edi, BENCH_MMIO
    code.extend_from_slice(&[0x66, 0xba, 0x10, 0x05]); // mov dx, BENCH_PORT
    if store {
        code.extend_from_slice(&[0x89, 0x07]); // loop: mov [rdi], eax
    } else {
        code.extend_from_slice(&[0x66, 0x90]); // loop: 2-byte nop
    }
    code.extend_from_slice(&[0x48, 0xff, 0xc9]); // dec rcx
    code.extend_from_slice(&[0x75, 0xf9]); // jnz loop
    code.extend_from_slice(&[0xee, 0xeb, 0xfe]); // out dx, al; jmp $
    code
}

/// Runs the notify loop for `iters` passes; the time includes one KVM_SET_REGS and the final exit.
fn run_notify_loop(raw: &mut RawVm, iters: u64, cpl3: bool) -> Duration {
    raw.vcpu
        .set_regs(&kvm_regs {
            rip: LOAD_ADDR,
            rflags: if cpl3 { 0x3002 } else { 2 },
            rsp: 0x8ff0,
            rcx: iters,
            ..Default::default()
        })
        .unwrap();
    let start = Instant::now();
    loop {
        match raw.vcpu.run().expect("KVM_RUN") {
            VcpuExit::MmioWrite(BENCH_MMIO, _) => {}
            VcpuExit::IoOut(BENCH_PORT, _) => return start.elapsed(),
            other => panic!("unexpected exit {other:?}"),
        }
    }
}

/// The cost of a virtio queue notification to the notifying vCPU: an MMIO store that exits to
/// userspace (the synchronous path) next to one KVM turns into an ioeventfd signal (the I/O
/// thread's path), at CPL0 and at CPL3 (where the test guest's driver runs). Per pass, subtract
/// `loop_only` for the store alone.
fn bench_queue_notify(c: &mut Criterion) {
    if !std::path::Path::new("/dev/kvm").exists() {
        return;
    }
    pin_to_one_cpu();
    let mut group = c.benchmark_group("queue_notify");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    for cpl3 in [false, true] {
        for notify in [Notify::LoopOnly, Notify::UserspaceExit, Notify::Ioeventfd] {
            let mut raw = raw_vm_running(&notify_loop(!matches!(notify, Notify::LoopOnly)), cpl3);
            let eventfd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
            if matches!(notify, Notify::Ioeventfd) {
                raw._vm
                    .register_ioevent(&eventfd, &IoEventAddress::Mmio(BENCH_MMIO), 0u32)
                    .unwrap();
            }
            let name = match notify {
                Notify::LoopOnly => "loop_only",
                Notify::UserspaceExit => "userspace_exit",
                Notify::Ioeventfd => "ioeventfd",
            };
            let cpl = if cpl3 { "cpl3" } else { "cpl0" };
            group.bench_function(format!("{cpl}/{name}"), |b| {
                b.iter_custom(|iters| run_notify_loop(&mut raw, iters, cpl3))
            });
        }
    }
    group.finish();
}

criterion_group!(
    benches,
    bench_bus_dispatch,
    bench_seccomp,
    bench_exits,
    bench_queue_notify
);
criterion_main!(benches);
