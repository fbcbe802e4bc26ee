//! vCPU threads: the KVM_RUN loop, exit dispatch, and the kick that brings a vCPU back to the host.
//!
//! The exit path — everything between one KVM_RUN returning and the next starting — allocates
//! nothing, logs nothing and takes no lock shared between vCPUs: a bus lookup is a binary search over
//! an immutable slice, the run request is one atomic load, and each device guards only itself.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;

use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN, kvm_run};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use crate::bus::Bus;
use crate::error::{Error, Result};
use crate::exit::ExitReason;
use crate::memory::PartitionMemory;
use crate::software_kvm::{self, InternalErrorAction};

const REQUEST_RUN: u8 = 0;
const REQUEST_PAUSE: u8 = 1;
const REQUEST_STOP: u8 = 2;

/// Real-time signal (offset from SIGRTMIN) that kicks a vCPU thread out of KVM_RUN.
const KICK_SIGNAL_OFFSET: i32 = 0;

thread_local! {
    /// This thread's `kvm_run` page while it runs a vCPU, so the kick handler can set
    /// `immediate_exit` (a kick that lands just before KVM_RUN must not be lost).
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: `run` is this thread's mapped kvm_run page, set by `run_vcpu` for exactly as
            // long as the mapping lives; a volatile byte store is async-signal-safe.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

fn kick_signal() -> i32 {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

/// Installs the kick handler once per process.
pub(crate) fn install_kick_handler() -> Result<()> {
    static INSTALLED: OnceLock<std::result::Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), handle_kick).map_err(|e| e.errno()))
        .map_err(|errno| Error::Signal(std::io::Error::from_raw_os_error(errno)))
}

/// What the host wants of the vCPUs, and why the run ended. Shared by the partition and its vCPU
/// threads; lock order: `exit` before `threads`.
#[derive(Debug, Default)]
pub(crate) struct RunControl {
    /// REQUEST_RUN, REQUEST_PAUSE or REQUEST_STOP: the only thing the exit path reads.
    request: AtomicU8,
    /// The first stop reason; set once per run.
    exit: Mutex<Option<ExitReason>>,
    exited: Condvar,
    /// pthreads of the running vCPU threads, for kicks. A thread is removed before it is joined, so a
    /// kick never targets a joined thread.
    threads: Mutex<Vec<libc::pthread_t>>,
    /// Signalled once, when the first stop reason is set: the owner's pollable view of `exited`.
    stopped: Option<EventFd>,
}

impl RunControl {
    /// Run control that also signals `stopped` when the run ends.
    pub(crate) fn notifying(stopped: EventFd) -> Self {
        Self {
            stopped: Some(stopped),
            ..Self::default()
        }
    }

    /// Stops the partition for `reason` (the first reason wins) and kicks every vCPU out.
    pub(crate) fn request_stop(&self, reason: ExitReason) {
        {
            let mut exit = self.exit.lock().unwrap_or_else(|e| e.into_inner());
            if exit.is_none() {
                *exit = Some(reason);
                if let Some(stopped) = &self.stopped {
                    // Only fails if the counter would overflow; it is written once per run.
                    let _ = stopped.write(1);
                }
            }
            self.request.store(REQUEST_STOP, Ordering::SeqCst);
            self.exited.notify_all();
        }
        self.kick_all();
    }

    fn request_pause(&self) {
        // A stop already requested wins over a pause.
        let _ = self.request.compare_exchange(
            REQUEST_RUN,
            REQUEST_PAUSE,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        self.kick_all();
    }

    fn kick_all(&self) {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        for &thread in threads.iter() {
            // SAFETY: `thread` belongs to a vCPU thread that has not been joined yet (threads are
            // removed from this list, under this lock, before being joined).
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }

    pub(crate) fn exit_reason(&self) -> Option<ExitReason> {
        self.exit.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Blocks until a stop reason is set or `timeout` passes.
    pub(crate) fn wait_for_exit(&self, timeout: Option<std::time::Duration>) -> Option<ExitReason> {
        let exit = self.exit.lock().unwrap_or_else(|e| e.into_inner());
        let exit = match timeout {
            Some(t) => {
                self.exited
                    .wait_timeout_while(exit, t, |e| e.is_none())
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
            None => self
                .exited
                .wait_while(exit, |e| e.is_none())
                .unwrap_or_else(|e| e.into_inner()),
        };
        exit.clone()
    }

    fn reset_for_run(&self) {
        self.request.store(REQUEST_RUN, Ordering::SeqCst);
    }
}

/// What every vCPU thread of one partition shares.
#[derive(Debug)]
pub(crate) struct VcpuContext {
    pub io_bus: Bus,
    pub mmio_bus: Bus,
    pub memory: PartitionMemory,
    pub control: Arc<RunControl>,
}

/// One vCPU: its KVM file descriptor and index.
#[derive(Debug)]
pub(crate) struct Vcpu {
    pub fd: VcpuFd,
    pub index: u8,
}

/// What the run loop does after one exit.
enum Next {
    Run,
    InternalError,
    Stop(ExitReason),
}

/// Handles one exit; the I/O arms are the hot path.
#[inline]
fn dispatch(exit: VcpuExit<'_>, ctx: &VcpuContext) -> Next {
    match exit {
        VcpuExit::IoOut(port, data) => {
            ctx.io_bus.write(u64::from(port), data);
            Next::Run
        }
        VcpuExit::IoIn(port, data) => {
            if !ctx.io_bus.read(u64::from(port), data) {
                data.fill(0xff);
            }
            Next::Run
        }
        VcpuExit::MmioWrite(addr, data) => {
            ctx.mmio_bus.write(addr, data);
            Next::Run
        }
        VcpuExit::MmioRead(addr, data) => {
            if !ctx.mmio_bus.read(addr, data) {
                data.fill(0xff);
            }
            Next::Run
        }
        VcpuExit::Shutdown => Next::Stop(ExitReason::TripleFault),
        VcpuExit::SystemEvent(kind, _) => Next::Stop(match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
            KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
            other => ExitReason::UnhandledExit {
                exit: format!("system event {other}"),
            },
        }),
        VcpuExit::InternalError => Next::InternalError,
        VcpuExit::FailEntry(reason, _) => Next::Stop(ExitReason::FailEntry { reason }),
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => Next::Run,
        other => Next::Stop(ExitReason::UnhandledExit {
            exit: format!("{other:?}"),
        }),
    }
}

/// Runs `vcpu` until the partition is asked to pause or stop, then completes any half-done PIO/MMIO
/// (so captured state is consistent) and hands the vCPU back.
fn run_vcpu(mut vcpu: Vcpu, ctx: &VcpuContext) -> Vcpu {
    KVM_RUN.with(|run| run.set(vcpu.fd.get_kvm_run() as *mut kvm_run));
    while ctx.control.request.load(Ordering::Acquire) == REQUEST_RUN {
        let next = match vcpu.fd.run() {
            Ok(exit) => dispatch(exit, ctx),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.fd.set_kvm_immediate_exit(0);
                Next::Run
            }
            Err(e) => Next::Stop(ExitReason::HostError {
                message: format!("KVM_RUN: {e}"),
            }),
        };
        match next {
            Next::Run => {}
            Next::InternalError => {
                match software_kvm::handle_internal_error(&mut vcpu.fd, &ctx.memory) {
                    InternalErrorAction::Resume => {}
                    InternalErrorAction::Stop(reason) => ctx.control.request_stop(reason),
                }
            }
            Next::Stop(reason) => ctx.control.request_stop(reason),
        }
    }
    // With immediate_exit set, KVM finishes the pending instruction (an IN or MMIO read whose data we
    // just supplied) and returns EINTR without running guest code.
    vcpu.fd.set_kvm_immediate_exit(1);
    let _ = vcpu.fd.run();
    vcpu.fd.set_kvm_immediate_exit(0);
    KVM_RUN.with(|run| run.set(std::ptr::null_mut()));
    vcpu
}

/// The running vCPU threads of a partition.
#[derive(Debug, Default)]
pub(crate) struct VcpuThreads {
    handles: Vec<JoinHandle<Vcpu>>,
}

impl VcpuThreads {
    /// Starts one thread per vCPU.
    pub(crate) fn spawn(vcpus: Vec<Vcpu>, ctx: &Arc<VcpuContext>) -> Result<Self> {
        install_kick_handler()?;
        ctx.control.reset_for_run();
        let mut handles = Vec::with_capacity(vcpus.len());
        for vcpu in vcpus {
            let thread_ctx = ctx.clone();
            let name = format!("vcpu{}", vcpu.index);
            let handle = std::thread::Builder::new()
                .name(name)
                .spawn(move || run_vcpu(vcpu, &thread_ctx))
                .map_err(Error::SpawnVcpu)?;
            ctx.control
                .threads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(handle.as_pthread_t());
            handles.push(handle);
        }
        Ok(Self { handles })
    }

    /// Asks every vCPU to pause (or stop) and joins the threads, returning the vCPUs in index order.
    pub(crate) fn join(self, ctx: &VcpuContext, stop: bool) -> Vec<Vcpu> {
        if stop {
            ctx.control.request_stop(ExitReason::Stopped);
        } else {
            ctx.control.request_pause();
        }
        ctx.control
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        let mut vcpus: Vec<Vcpu> = self
            .handles
            .into_iter()
            .filter_map(|h| h.join().ok())
            .collect();
        vcpus.sort_by_key(|v| v.index);
        vcpus
    }
}
