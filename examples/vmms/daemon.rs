//! `vmms serve`: the daemon. vmm-core's service with worker-manager's process launcher, answering
//! CLI requests on `<store>/vmms.sock`.
//!
//! SIGTERM and SIGINT end the daemon without touching running VMs: their workers run in sessions
//! of their own and the next daemon re-attaches to them.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use vmm_core::{
    AutomaticRecoveryAction, BootSource, DiskConfig, EnabledState, Event, EventHistory,
    RequestedState, ReturnCode, VirtualSystemManagementService, VmConfig, VmId, WorkerLauncher,
    error_chain,
};
use worker_manager::ProcessLauncher;

use crate::api::{ApiError, Request, Response, SOCKET, Shutdown, StateChange, VmSpec, VmView};

/// How long `get-vm` waits for a worker's live report (a hung worker must not hang the CLI).
const REPORT_TIMEOUT: Duration = Duration::from_secs(1);

/// Events kept for `get-vm-event`.
const EVENT_HISTORY: usize = 1000;

/// The daemon's state shared by its client threads.
struct Daemon {
    store: PathBuf,
    vmms: VirtualSystemManagementService,
    launcher: Arc<ProcessLauncher>,
    events: Mutex<EventHistory>,
}

/// Runs the daemon until a signal or a `stop-daemon` request.
pub fn serve(store: &Path, cim: &crate::cim::CimArgs) -> Result<(), String> {
    // Before any thread exists, so every thread inherits the mask and only the signal thread
    // ever takes these signals.
    let signals = block_termination_signals();
    fs::create_dir_all(store).map_err(|e| format!("cannot create {}: {e}", store.display()))?;
    let store = store
        .canonicalize()
        .map_err(|e| format!("cannot resolve {}: {e}", store.display()))?;
    let _lock = lock_store(&store)?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let launcher = Arc::new(ProcessLauncher::new(&store, exe, ["worker"]));
    let as_launcher: Arc<dyn WorkerLauncher> = launcher.clone();
    let vmms = VirtualSystemManagementService::open(&store, as_launcher)
        .map_err(|e| format!("cannot open store: {}", error_chain(&e)))?;
    let daemon = Arc::new(Daemon {
        store: store.clone(),
        events: Mutex::new(open_event_history(&store)),
        vmms,
        launcher,
    });
    let subscription = daemon.vmms.subscribe();
    let logger = Arc::clone(&daemon);
    thread::Builder::new()
        .name("event-log".into())
        .spawn(move || {
            while let Ok(event) = subscription.recv() {
                logger.record(event);
                // One write for a burst of events.
                while let Ok(event) = subscription.try_recv() {
                    logger.record(event);
                }
                logger.save_events();
            }
        })
        .map_err(|e| format!("cannot start event thread: {e}"))?;

    let report = daemon.vmms.recover_on_start();
    println!(
        "vmms: store {}; {} VM(s); re-attached {}, auto-started {}, failed {}",
        store.display(),
        daemon.vmms.list_vms().len(),
        report.reattached.len(),
        report.auto_started.len(),
        report.failed.len()
    );
    for (vm, reason) in &report.failed {
        println!("vmms: {vm}: {reason}");
    }
    crate::cim::start(&daemon.vmms, cim)?;

    let socket = store.join(SOCKET);
    let listener = bind(&socket)?;
    let signal_socket = socket.clone();
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || wait_for_signal(&signals, &signal_socket))
        .map_err(|e| format!("cannot start signal thread: {e}"))?;
    println!("vmms: listening on {}", socket.display());
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let daemon = Arc::clone(&daemon);
        let spawned = thread::Builder::new()
            .name("client".into())
            .spawn(move || daemon.client(stream));
        if let Err(e) = spawned {
            eprintln!("vmms: cannot serve a client: {e}");
        }
    }
    Ok(())
}

/// The event history of the previous daemon (`<store>/events.json`), or an empty one.
fn open_event_history(store: &Path) -> EventHistory {
    let path = store.join("events.json");
    EventHistory::open(&path, EVENT_HISTORY).unwrap_or_else(|e| {
        eprintln!("vmms: starting a new event history: {}", error_chain(&e));
        EventHistory::new(path, EVENT_HISTORY)
    })
}

/// Takes the store's lock: one daemon per store.
fn lock_store(store: &Path) -> Result<File, String> {
    let path = store.join("vmms.lock");
    let file = File::create(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // SAFETY: flock only acts on the descriptor `file` owns.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(format!(
            "another vmms daemon already serves {}",
            store.display()
        ));
    }
    Ok(file)
}

fn bind(socket: &Path) -> Result<UnixListener, String> {
    // The store lock is ours, so a socket file left here belongs to a daemon that died.
    let _ = fs::remove_file(socket);
    let listener = UnixListener::bind(socket)
        .map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?;
    fs::set_permissions(socket, fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot restrict {}: {e}", socket.display()))?;
    Ok(listener)
}

fn block_termination_signals() -> libc::sigset_t {
    // SAFETY: the set is initialised by sigemptyset before use; pthread_sigmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_for_signal(signals: &libc::sigset_t, socket: &Path) {
    let mut signal = 0;
    // SAFETY: `signals` is an initialised set and `signal` a valid out-pointer.
    unsafe { libc::sigwait(signals, &mut signal) };
    let _ = fs::remove_file(socket);
    println!("vmms: signal {signal}: exiting; running VMs keep running");
    std::process::exit(0);
}

impl Daemon {
    fn record(&self, event: Event) {
        println!("vmms: {} {:?}", event.vm, event.kind);
        let mut events = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        events.record(event);
    }

    fn save_events(&self) {
        let events = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = events.save() {
            eprintln!("vmms: cannot save the event history: {}", error_chain(&e));
        }
    }

    fn client(&self, stream: UnixStream) {
        let Ok(writer) = stream.try_clone() else {
            return;
        };
        let mut writer = writer;
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            let (response, stop) = match serde_json::from_str::<Request>(&line) {
                Ok(Request::StopDaemon) => (Ok(serde_json::Value::Null), true),
                Ok(request) => (self.handle(request), false),
                Err(e) => (Err(ApiError::new(format!("bad request: {e}"))), false),
            };
            let mut answer = serde_json::to_vec(&response).unwrap_or_else(|e| {
                format!(r#"{{"Err":{{"code":null,"message":"cannot encode answer: {e}"}}}}"#)
                    .into_bytes()
            });
            answer.push(b'\n');
            if writer.write_all(&answer).is_err() {
                return;
            }
            if stop {
                let _ = fs::remove_file(self.store.join(SOCKET));
                println!("vmms: stop requested; running VMs keep running");
                std::process::exit(0);
            }
        }
    }

    fn handle(&self, request: Request) -> Response {
        let value = match request {
            Request::NewVm { spec } => json(&self.new_vm(spec)?),
            Request::GetVm { target } => {
                let vms = match target {
                    Some(target) => vec![self.vmms.get_vm(self.resolve(&target)?).map_err(api)?],
                    None => self.vmms.list_vms(),
                };
                let views: Vec<VmView> = vms.into_iter().map(|s| self.view(s)).collect();
                json(&views)
            }
            Request::ChangeState { target, state } => json(&self.change_state(&target, state)?),
            Request::WaitJob { job, timeout_ms } => {
                let waited = self
                    .vmms
                    .wait_for_job(job, Duration::from_millis(timeout_ms));
                match waited {
                    Ok(job) => json(&job),
                    Err(vmm_core::Error::JobTimeout { .. }) => {
                        json(&self.vmms.job(job).map_err(api)?)
                    }
                    Err(e) => return Err(api(e)),
                }
            }
            Request::ShutdownVm { target, timeout_ms } => {
                json(&self.shutdown(&target, Duration::from_millis(timeout_ms))?)
            }
            Request::RemoveVm { target } => {
                let id = self.resolve(&target)?;
                self.vmms.destroy_system(id).map_err(api)?;
                serde_json::Value::Null
            }
            Request::GetEvents { target } => {
                let id = target.map(|t| self.resolve(&t)).transpose()?;
                let events = self.events.lock().unwrap_or_else(PoisonError::into_inner);
                let list: Vec<&Event> = events
                    .iter()
                    .filter(|e| id.is_none_or(|id| e.vm == id))
                    .collect();
                json(&list)
            }
            Request::StopDaemon => serde_json::Value::Null,
        };
        Ok(value)
    }

    /// A VM by GUID or by name (names need not be unique; an ambiguous name is refused).
    fn resolve(&self, target: &str) -> Result<VmId, ApiError> {
        if let Ok(id) = target.parse::<VmId>() {
            return Ok(id);
        }
        let matches: Vec<VmId> = self
            .vmms
            .list_vms()
            .into_iter()
            .filter(|vm| vm.name == target)
            .map(|vm| vm.id)
            .collect();
        match matches.as_slice() {
            [id] => Ok(*id),
            [] => Err(ApiError::new("no such virtual machine")),
            many => Err(ApiError::new(format!(
                "the name matches {} virtual machines; use the GUID",
                many.len()
            ))),
        }
    }

    fn view(&self, system: vmm_core::ComputerSystem) -> VmView {
        let worker = system
            .process_id
            .and_then(|_| self.launcher.report(system.id, REPORT_TIMEOUT))
            .and_then(Result::ok);
        VmView::new(system, worker)
    }

    fn new_vm(&self, spec: VmSpec) -> Result<VmView, ApiError> {
        let mut config = VmConfig::new(spec.name);
        config.vcpus = spec.vcpus;
        config.memory_mib = spec.memory_mib;
        if let Some(kernel) = spec.kernel {
            config.boot = BootSource::Kernel {
                kernel,
                initrd: spec.initrd,
                cmdline: spec.cmdline.unwrap_or_else(|| "console=ttyS0".into()),
            };
        }
        config.disks = spec
            .disks
            .into_iter()
            .map(|path| DiskConfig {
                path,
                read_only: false,
            })
            .collect();
        config.automatic_recovery_action = match spec.recovery.as_str() {
            "none" => AutomaticRecoveryAction::None,
            "restart" => AutomaticRecoveryAction::Restart,
            other => {
                return Err(ApiError::with_code(
                    ReturnCode::InvalidParameter.code(),
                    format!("unknown recovery action '{other}' (none, restart)"),
                ));
            }
        };
        let id = self.vmms.define_system(config).map_err(api)?;
        Ok(self.view(self.vmms.get_vm(id).map_err(api)?))
    }

    fn change_state(&self, target: &str, state: u16) -> Result<StateChange, ApiError> {
        let id = self.resolve(target)?;
        let name = self.vmms.get_vm(id).map_err(api)?.name;
        let requested = RequestedState::from_code(state)
            .map_err(|code| ApiError::with_code(code.code(), "requested state not accepted"))?;
        let (code, job) = self.vmms.request_state_change(id, requested).map_err(api)?;
        Ok(StateChange {
            vm: id,
            name,
            code: code.code(),
            job,
        })
    }

    /// Asks the guest to shut down (the test guest's `halt` on its console) and waits for it to
    /// power off; turns it off when it has no way to be asked or does not comply in time.
    fn shutdown(&self, target: &str, timeout: Duration) -> Result<Shutdown, ApiError> {
        let id = self.resolve(target)?;
        let vm = self.vmms.get_vm(id).map_err(api)?;
        let test_guest = vm
            .config
            .as_ref()
            .is_some_and(|c| c.boot == BootSource::TestGuest);
        let outcome = match (vm.enabled_state, test_guest) {
            (EnabledState::Running, true) => match self.ask_guest_to_halt(id, timeout) {
                Ok(()) => return Ok(self.shutdown_result(id, vm.name, "guest shut down")),
                Err(why) => format!("turned off: {why}"),
            },
            (EnabledState::Running, false) => {
                "turned off: the guest has no shutdown integration".to_owned()
            }
            (EnabledState::Paused, _) => "turned off: a paused guest cannot shut down".to_owned(),
            (state, _) => {
                return Err(ApiError::with_code(
                    ReturnCode::InvalidState.code(),
                    format!("cannot shut down a VM that is {state}"),
                ));
            }
        };
        let change = self.change_state(target, RequestedState::TurnOff.code())?;
        if change.code != ReturnCode::JobStarted.code() {
            return Err(ApiError::with_code(change.code, "turn off refused"));
        }
        if let Some(job) = change.job {
            let job = self
                .vmms
                .wait_for_job(job, Duration::from_secs(60))
                .map_err(api)?;
            if !job.state.is_success() {
                return Err(ApiError::with_code(
                    job.error_code,
                    job.error_description.unwrap_or_default(),
                ));
            }
        }
        Ok(self.shutdown_result(id, vm.name, &outcome))
    }

    fn shutdown_result(&self, vm: VmId, name: String, outcome: &str) -> Shutdown {
        Shutdown {
            vm,
            name,
            outcome: outcome.to_owned(),
        }
    }

    /// Types `halt` at the test guest's shell and waits for the VM to reach Off.
    fn ask_guest_to_halt(&self, id: VmId, timeout: Duration) -> Result<(), String> {
        let socket = self.launcher.runtime_dir(id).console_socket();
        let mut console =
            UnixStream::connect(&socket).map_err(|e| format!("console unreachable: {e}"))?;
        // A leading CR ends whatever half-typed line the shell holds.
        console
            .write_all(b"\rhalt\r")
            .map_err(|e| format!("console write failed: {e}"))?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let state = self
                .vmms
                .get_vm(id)
                .map_err(|e| e.to_string())?
                .enabled_state;
            if state == EnabledState::Off {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(20));
        }
        Err(format!("the guest did not power off within {timeout:?}"))
    }
}

fn json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

/// A service error as the CLI shows it: vmm-core's return code and the whole error chain.
fn api(error: vmm_core::Error) -> ApiError {
    ApiError::with_code(vmm_core::return_code(&error).code(), error_chain(&error))
}
