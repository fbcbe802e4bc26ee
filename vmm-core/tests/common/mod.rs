//! A `WorkerLauncher` whose workers are threads instead of processes: the test double for
//! vmm-core's service tests (the real process-backed workers are tested in the daemon's
//! integration tests).
//!
//! Each "guest" is a thread that counts while running, stops counting while paused, writes its
//! counter into the saved-state folder on save and continues from it on restore. Live guests stay
//! registered in the launcher after the service that launched them is dropped, so a new service
//! sharing the launcher can re-attach to them, as it would to surviving worker processes. Tests
//! can make a guest crash, power off or reset itself, hold pause requests at a gate, and make
//! launches fail.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use vmm_core::{
    EnabledState, Event, EventKind, EventSink, Job, LaunchMode, RequestedState, ReturnCode,
    StopReason, VirtualSystemManagementService, VmConfig, VmId, Worker, WorkerError, WorkerEvent,
    WorkerLauncher, WorkerStatus,
};

/// Generous bound for anything asynchronous; tests finish far sooner unless broken.
pub const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    Running,
    Paused,
    /// Paused and writing its state (a save a previous service started).
    Saving,
    Exited,
}

/// One guest: a counting thread plus what a worker process would hold.
#[derive(Debug)]
pub struct Guest {
    vm: VmId,
    pid: u32,
    run: Mutex<Run>,
    changed: Condvar,
    counter: AtomicU64,
    sink: Mutex<EventSink>,
}

impl Guest {
    fn lock(&self) -> MutexGuard<'_, Run> {
        self.run.lock().expect("guest lock")
    }

    fn set(&self, run: Run) {
        *self.lock() = run;
        self.changed.notify_all();
    }

    /// The pid its "worker" reports.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The guest's work counter.
    pub fn counter(&self) -> u64 {
        self.counter.load(Ordering::SeqCst)
    }

    /// Blocks until the counter passes `value`.
    pub fn wait_counter_above(&self, value: u64) {
        let deadline = Instant::now() + TIMEOUT;
        while self.counter() <= value {
            assert!(
                Instant::now() < deadline,
                "guest counter stuck at {}",
                self.counter()
            );
            thread::sleep(Duration::from_millis(1));
        }
    }

    fn run_loop(&self) {
        let mut run = self.lock();
        loop {
            match *run {
                Run::Exited => return,
                Run::Paused | Run::Saving => run = self.changed.wait(run).expect("guest lock"),
                Run::Running => {
                    self.counter.fetch_add(1, Ordering::SeqCst);
                    run = self
                        .changed
                        .wait_timeout(run, Duration::from_millis(1))
                        .expect("guest lock")
                        .0;
                }
            }
        }
    }

    /// Sends `reason` on the sink this guest's worker was given.
    pub fn report(&self, reason: StopReason) {
        self.send(WorkerEvent::Stopped(reason));
    }

    /// Sends any event on the guest's current sink, as a worker would on its own.
    pub fn send(&self, event: WorkerEvent) {
        let sink = self.sink.lock().expect("sink lock").clone();
        sink.send(event);
    }
}

/// A closed gate holds pause requests until it is opened.
#[derive(Debug, Default)]
struct Gate {
    closed: Mutex<bool>,
    changed: Condvar,
}

impl Gate {
    fn set(&self, closed: bool) {
        *self.closed.lock().expect("gate lock") = closed;
        self.changed.notify_all();
    }

    fn pass(&self) {
        let mut closed = self.closed.lock().expect("gate lock");
        while *closed {
            closed = self.changed.wait(closed).expect("gate lock");
        }
    }
}

#[derive(Debug, Default)]
struct Shared {
    live: Mutex<HashMap<VmId, Arc<Guest>>>,
    next_pid: AtomicU32,
    launches: AtomicUsize,
    fail_launches: AtomicBool,
    ignore_shutdown: AtomicBool,
    pause_gate: Gate,
}

impl Shared {
    fn exit(&self, guest: &Guest) {
        guest.set(Run::Exited);
        let mut live = self.live.lock().expect("live lock");
        if live.get(&guest.vm).is_some_and(|g| g.pid == guest.pid) {
            live.remove(&guest.vm);
        }
    }
}

/// The launcher. Clone it to keep a handle for controlling guests after handing it to a service.
#[derive(Debug, Clone, Default)]
pub struct ThreadLauncher {
    shared: Arc<Shared>,
}

impl ThreadLauncher {
    /// The live guest of `vm`.
    pub fn guest(&self, vm: VmId) -> Arc<Guest> {
        self.shared
            .live
            .lock()
            .expect("live lock")
            .get(&vm)
            .cloned()
            .expect("guest is live")
    }

    /// Whether `vm` has a live guest.
    pub fn is_live(&self, vm: VmId) -> bool {
        self.shared
            .live
            .lock()
            .expect("live lock")
            .contains_key(&vm)
    }

    /// How many workers were launched so far.
    pub fn launches(&self) -> usize {
        self.shared.launches.load(Ordering::SeqCst)
    }

    /// Makes every later launch fail (or succeed again).
    pub fn fail_launches(&self, fail: bool) {
        self.shared.fail_launches.store(fail, Ordering::SeqCst);
    }

    /// Holds (`true`) or releases (`false`) pause requests.
    /// Guests ignore shutdown requests from now on (or obey them again).
    pub fn ignore_shutdown(&self, ignore: bool) {
        self.shared.ignore_shutdown.store(ignore, Ordering::SeqCst);
    }

    /// The guest of `vm` starts saving on its own (as after a save a previous service began).
    pub fn start_saving(&self, vm: VmId) {
        self.guest(vm).set(Run::Saving);
    }

    /// The saving guest of `vm` commits its counter as the VM's saved state at `state_dir`,
    /// exits and reports [`StopReason::Saved`].
    pub fn finish_saving(&self, vm: VmId, state_dir: &Path) {
        let guest = self.guest(vm);
        fs::create_dir_all(state_dir).expect("state dir");
        fs::write(state_dir.join("state.json"), guest.counter().to_string()).expect("state");
        self.shared.exit(&guest);
        guest.report(StopReason::Saved);
    }

    pub fn hold_pauses(&self, hold: bool) {
        self.shared.pause_gate.set(hold);
    }

    /// The worker process of `vm` dies (as if killed by SIGKILL) and the worker manager says so.
    pub fn kill_worker(&self, vm: VmId) {
        let guest = self.guest(vm);
        self.shared.exit(&guest);
        guest.report(StopReason::WorkerExited {
            code: None,
            signal: Some(9),
        });
    }

    /// The guest of `vm` powers itself off; its worker exits.
    pub fn guest_power_off(&self, vm: VmId) {
        let guest = self.guest(vm);
        self.shared.exit(&guest);
        guest.report(StopReason::GuestPowerOff);
    }

    /// The guest of `vm` reboots itself; its worker stops the partition and exits.
    pub fn guest_reset(&self, vm: VmId) {
        let guest = self.guest(vm);
        self.shared.exit(&guest);
        guest.report(StopReason::GuestReset);
    }
}

impl WorkerLauncher for ThreadLauncher {
    fn launch(
        &self,
        vm: &VmConfig,
        mode: LaunchMode,
        events: EventSink,
    ) -> Result<Box<dyn Worker>, WorkerError> {
        self.shared.launches.fetch_add(1, Ordering::SeqCst);
        if self.shared.fail_launches.load(Ordering::SeqCst) {
            return Err(WorkerError::failed(std::io::Error::other(
                "no kvm in this test",
            )));
        }
        let counter = match mode {
            LaunchMode::Boot => 0,
            LaunchMode::RestoreSaved { state_dir } => read_saved_counter(&state_dir)?,
        };
        let guest = Arc::new(Guest {
            vm: vm.id,
            pid: 10_000 + self.shared.next_pid.fetch_add(1, Ordering::SeqCst),
            run: Mutex::new(Run::Running),
            changed: Condvar::new(),
            counter: AtomicU64::new(counter),
            sink: Mutex::new(events),
        });
        let runner = Arc::clone(&guest);
        thread::spawn(move || runner.run_loop());
        self.shared
            .live
            .lock()
            .expect("live lock")
            .insert(vm.id, Arc::clone(&guest));
        Ok(Box::new(ThreadWorker {
            guest,
            shared: Arc::clone(&self.shared),
        }))
    }

    fn reattach(
        &self,
        vm: VmId,
        events: EventSink,
    ) -> Result<Option<Box<dyn Worker>>, WorkerError> {
        let Some(guest) = self
            .shared
            .live
            .lock()
            .expect("live lock")
            .get(&vm)
            .cloned()
        else {
            return Ok(None);
        };
        *guest.sink.lock().expect("sink lock") = events;
        Ok(Some(Box::new(ThreadWorker {
            guest,
            shared: Arc::clone(&self.shared),
        })))
    }
}

fn read_saved_counter(state_dir: &Path) -> Result<u64, WorkerError> {
    let text = fs::read_to_string(state_dir.join("state.json")).map_err(WorkerError::failed)?;
    text.trim().parse().map_err(|_| WorkerError::Refused {
        reason: "corrupt saved state".into(),
    })
}

/// The `Worker` handle the service holds; dropping it leaves the guest running.
#[derive(Debug)]
struct ThreadWorker {
    guest: Arc<Guest>,
    shared: Arc<Shared>,
}

impl ThreadWorker {
    fn alive(&self) -> Result<(), WorkerError> {
        match *self.guest.lock() {
            Run::Exited => Err(WorkerError::Gone),
            _ => Ok(()),
        }
    }
}

impl Worker for ThreadWorker {
    fn pid(&self) -> u32 {
        self.guest.pid
    }

    fn status(&self) -> WorkerStatus {
        match *self.guest.lock() {
            Run::Running => WorkerStatus::Running,
            Run::Paused => WorkerStatus::Paused,
            Run::Saving => WorkerStatus::Saving,
            Run::Exited => WorkerStatus::Exited,
        }
    }

    fn shutdown(&self, timeout: Duration) -> Result<(), WorkerError> {
        self.alive()?;
        if self.shared.ignore_shutdown.load(Ordering::SeqCst) {
            thread::sleep(timeout);
            return Err(WorkerError::Timeout(timeout));
        }
        self.shared.exit(&self.guest);
        self.guest.report(StopReason::GuestPowerOff);
        Ok(())
    }

    fn pause(&self) -> Result<(), WorkerError> {
        self.shared.pause_gate.pass();
        self.alive()?;
        self.guest.set(Run::Paused);
        Ok(())
    }

    fn resume(&self) -> Result<(), WorkerError> {
        self.alive()?;
        self.guest.set(Run::Running);
        Ok(())
    }

    fn save(&self, staging: &Path, state_dir: &Path) -> Result<(), WorkerError> {
        self.alive()?;
        self.guest.set(Run::Paused);
        let counter = self.guest.counter().to_string();
        fs::write(staging.join("state.json"), counter).map_err(WorkerError::failed)?;
        vmm_core::atomic_file::commit_dir(staging, state_dir).map_err(WorkerError::failed)?;
        self.shared.exit(&self.guest);
        Ok(())
    }

    fn reset(&self) -> Result<(), WorkerError> {
        self.alive()?;
        self.guest.counter.store(0, Ordering::SeqCst);
        self.guest.set(Run::Running);
        Ok(())
    }

    fn turn_off(&self) -> Result<(), WorkerError> {
        self.shared.exit(&self.guest);
        Ok(())
    }
}

/// Opens a service on `root` driven by `launcher`.
pub fn open(root: &Path, launcher: &ThreadLauncher) -> VirtualSystemManagementService {
    VirtualSystemManagementService::open(root, Arc::new(launcher.clone())).expect("open service")
}

/// Requests `requested`, expects 4096, waits for the job and returns it.
pub fn change(vmms: &VirtualSystemManagementService, vm: VmId, requested: RequestedState) -> Job {
    let (code, job) = vmms.request_state_change(vm, requested).expect("vm exists");
    assert_eq!(code, ReturnCode::JobStarted, "request {requested} on {vm}");
    vmms.wait_for_job(job.expect("4096 comes with a job"), TIMEOUT)
        .expect("job ends")
}

/// The VM's current EnabledState.
pub fn state_of(vmms: &VirtualSystemManagementService, vm: VmId) -> EnabledState {
    vmms.get_vm(vm).expect("vm exists").enabled_state
}

/// Waits for the first event about `vm` that `matches`, returning it.
pub fn expect_event(
    events: &Receiver<Event>,
    vm: VmId,
    matches: impl Fn(&EventKind) -> bool,
) -> EventKind {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = events
            .recv_timeout(left)
            .expect("expected event arrives in time");
        if event.vm == vm && matches(&event.kind) {
            return event.kind;
        }
    }
}

/// Waits until `vm` is in `state` (for changes driven by worker events, which have no job).
pub fn wait_for_state(vmms: &VirtualSystemManagementService, vm: VmId, state: EnabledState) {
    let deadline = Instant::now() + TIMEOUT;
    while state_of(vmms, vm) != state
        || vmms.get_vm(vm).expect("vm exists").operational_status
            == vmm_core::OperationalStatus::InService
    {
        assert!(
            Instant::now() < deadline,
            "{vm} stuck in {}",
            state_of(vmms, vm)
        );
        thread::sleep(Duration::from_millis(2));
    }
}
