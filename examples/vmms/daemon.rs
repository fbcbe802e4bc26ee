//! `vmms serve`: the daemon. vmm-core's service with worker-manager's process launcher, answering
//! CLI requests on `<store>/vmms.sock`.
//!
//! SIGTERM and SIGINT end the daemon without touching running VMs: their workers run in sessions
//! of their own and the next daemon re-attaches to them.

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use vmm_core::{
    AutomaticRecoveryAction, BootSource, DiskConfig, Event, EventHistory, JobState, RequestedState,
    ReturnCode, VirtualSystemManagementService, VmConfig, VmId, WorkerLauncher, error_chain,
};
use worker_manager::{LauncherOptions, ProcessLauncher};

use crate::api::{ApiError, Request, Response, SOCKET, Shutdown, StateChange, VmSpec, VmView};
use crate::listener::{self, AccessPolicy, Timeouts};

/// How long `get-vm` waits for a worker's live report (a hung worker must not hang the CLI).
const REPORT_TIMEOUT: Duration = Duration::from_secs(1);

/// Events kept for `get-vm-event`.
const EVENT_HISTORY: usize = 1000;

/// How `vmms serve` runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Users of this group may use the daemon too (besides root and the daemon's own user).
    pub socket_group: Option<String>,
    /// Connection timeouts.
    pub timeouts: Timeouts,
    /// Run as a node of this cluster (`--cluster`, `--node`): see `cluster_node.rs`.
    pub cluster: Option<cluster_resource::ClusterOptions>,
}

/// The file name of `new-vm --new-disk`'s disk in the VM's `disks/` folder.
const NEW_DISK: &str = "disk0.qcow2";

/// The daemon's state shared by its client threads.
struct Daemon {
    store: PathBuf,
    vmms: VirtualSystemManagementService,
    launcher: Arc<ProcessLauncher>,
    events: Mutex<EventHistory>,
    cluster: Option<Arc<cluster_resource::ClusterNode>>,
    /// Console clients per VM (RDP listener).
    consoles: crate::rdp::Consoles,
}

/// How the daemon watches its workers (`vmms serve` flags).
#[derive(Debug, Clone)]
pub struct Supervision {
    /// Silence after which a worker is reported not responding (HealthState 20).
    pub heartbeat_timeout: Duration,
    /// Silence after which the VM's recovery action applies to a hung worker.
    pub hang_timeout: Duration,
    /// Confine workers (off only with `--no-confinement`).
    pub confine_workers: bool,
    /// Idle workers kept started (`--worker-pool`).
    pub worker_pool: usize,
}

/// Runs the daemon until a signal or a `stop-daemon` request.
///
/// Logging never fails or wedges the daemon (`log!`, see `log.rs`), and both ways out (a signal,
/// `stop-daemon`) end the process, which releases the store lock.
pub fn serve(
    store: &Path,
    options: &ServeOptions,
    supervision: &Supervision,
    cim: &crate::cim::CimArgs,
    rdp: &crate::rdp::RdpArgs,
) -> Result<(), String> {
    // Before anything is created, and inherited by every worker: nothing of the store, its
    // socket or a worker's runtime files is ever readable by others, whatever our caller's umask.
    // SAFETY: umask only sets the process's file mode creation mask.
    unsafe { libc::umask(0o077) };
    // Before any thread exists, so every thread inherits the mask and only the signal thread
    // ever takes these signals.
    let signals = block_termination_signals();
    raise_open_file_limit();
    crate::log::install().map_err(|e| format!("cannot start the log thread: {e}"))?;
    let group = options
        .socket_group
        .as_deref()
        .map(listener::group_id)
        .transpose()?;
    fs::create_dir_all(store).map_err(|e| format!("cannot create {}: {e}", store.display()))?;
    let store = store
        .canonicalize()
        .map_err(|e| format!("cannot resolve {}: {e}", store.display()))?;
    // In a cluster the node's own folder of the shared store is its store (cluster_node.rs).
    let store = match &options.cluster {
        Some(cluster) => crate::cluster_node::prepare(&store, cluster)?,
        None => store,
    };
    let _lock = lock_store(&store)?;
    let cluster = match &options.cluster {
        Some(options) => Some(crate::cluster_node::join(&store, options)?),
        None => None,
    };
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let launcher_options = LauncherOptions {
        heartbeat_timeout: supervision.heartbeat_timeout,
        hang_timeout: supervision.hang_timeout,
        confine: supervision.confine_workers,
        pool_size: supervision.worker_pool,
        ..LauncherOptions::default()
    };
    let launcher =
        Arc::new(ProcessLauncher::new(&store, exe, ["worker"]).with_options(launcher_options));
    let as_launcher: Arc<dyn WorkerLauncher> = launcher.clone();
    // Opening the store also makes its root and top folders 0700.
    let vmms = match &cluster {
        Some(node) => VirtualSystemManagementService::open_clustered(
            &store,
            Arc::new(cluster_resource::FencedLauncher::new(
                node.clone(),
                as_launcher,
            )),
            node.clone(),
        ),
        None => VirtualSystemManagementService::open(&store, as_launcher),
    }
    .map_err(|e| format!("cannot open store: {}", error_chain(&e)))?;
    vmms.set_snapshot_service(Arc::new(snapshot::FolderSnapshotService));
    vmms.set_backup_service(Arc::new(vss_writer::VssWriter::new()));
    let consoles = crate::rdp::start(&vmms, &store, rdp)?;
    let daemon = Arc::new(Daemon {
        consoles,
        store: store.clone(),
        events: Mutex::new(open_event_history(&store)),
        vmms,
        launcher,
        cluster,
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

    // Bridges and TAPs before any worker starts or is re-attached.
    crate::switch::start(&store);
    let report = daemon.vmms.recover_on_start();
    log!(
        "vmms: store {}; {} VM(s); re-attached {}, auto-started {}, failed {}",
        store.display(),
        daemon.vmms.list_vms().len(),
        report.reattached.len(),
        report.auto_started.len(),
        report.failed.len()
    );
    for (vm, reason) in &report.failed {
        log!("vmms: {vm}: {reason}");
    }
    // Started after the re-attach, so that the pool's spawns do not slow down recovery.
    daemon.launcher.fill_pool();
    if let Some(node) = &daemon.cluster {
        crate::cluster_node::start_agent(node, &daemon.vmms)?;
    }
    crate::cim::start(
        &daemon.vmms,
        cim,
        AccessPolicy::new(group),
        daemon.consoles.geometry(),
    )?;

    let socket = store.join(SOCKET);
    let listener = listener::bind(&socket, group)?;
    let signal_socket = socket.clone();
    let signal_consoles = daemon.consoles.clone();
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || wait_for_signal(&signals, &signal_socket, &signal_consoles))
        .map_err(|e| format!("cannot start signal thread: {e}"))?;
    log!("vmms: listening on {}", socket.display());
    listener::serve(
        &listener,
        AccessPolicy::new(group),
        options.timeouts,
        daemon,
    );
    Ok(())
}

/// The event history of the previous daemon (`<store>/events.json`), or an empty one.
fn open_event_history(store: &Path) -> EventHistory {
    let path = store.join("events.json");
    EventHistory::open(&path, EVENT_HISTORY).unwrap_or_else(|e| {
        log!("vmms: starting a new event history: {}", error_chain(&e));
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

/// Raises the soft limit on open files to the hard one: each client and each worker connection
/// holds a descriptor, and the connection limit should bind long before this one does.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid out-pointer for getrlimit and a valid input for setrlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
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

fn wait_for_signal(signals: &libc::sigset_t, socket: &Path, consoles: &crate::rdp::Consoles) {
    let mut signal = 0;
    // SAFETY: `signals` is an initialised set and `signal` a valid out-pointer.
    unsafe { libc::sigwait(signals, &mut signal) };
    exit(socket, consoles, &format!("signal {signal}"));
}

/// Ends the daemon: the socket goes first (no new client finds a daemon that is leaving), then
/// the RDP listener (its console sessions closed, its port released), then the process, and
/// with it the store lock. Nothing here can panic, and stdout is waited for only briefly.
fn exit(socket: &Path, consoles: &crate::rdp::Consoles, why: &str) -> ! {
    let _ = fs::remove_file(socket);
    log!("vmms: {why}: exiting; running VMs keep running");
    consoles.shutdown();
    crate::log::flush(Duration::from_secs(1));
    std::process::exit(0);
}

impl listener::Service for Daemon {
    fn answer(&self, request: &[u8]) -> (Vec<u8>, bool) {
        let resolve = |target: &str| self.resolve(target);
        let vms = || self.vmms.list_vms();
        if let Some(answer) = crate::switch::answer(request, &resolve, &vms) {
            return (answer, false);
        }
        let (response, stop) = match serde_json::from_slice::<Request>(request) {
            Ok(Request::StopDaemon) => (Ok(serde_json::Value::Null), true),
            Ok(request) => (self.handle(request), false),
            Err(e) => (
                Err(ApiError::with_code(
                    ReturnCode::InvalidParameter.code(),
                    format!("bad request: {e}"),
                )),
                false,
            ),
        };
        let answer = serde_json::to_vec(&response).unwrap_or_else(|e| {
            format!(r#"{{"Err":{{"code":null,"message":"cannot encode answer: {e}"}}}}"#)
                .into_bytes()
        });
        (answer, stop)
    }

    fn stop(&self) -> ! {
        exit(&self.store.join(SOCKET), &self.consoles, "stop requested")
    }
}

impl Daemon {
    fn record(&self, event: Event) {
        log!("vmms: {} {:?}", event.vm, event.kind);
        let mut events = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        events.record(event);
    }

    fn save_events(&self) {
        let events = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = events.save() {
            log!("vmms: cannot save the event history: {}", error_chain(&e));
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
                crate::switch::vm_removed(id);
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
            Request::Backup { call } => {
                crate::backup::serve(&self.vmms, |t| self.resolve(t), call)?
            }
            Request::Checkpoint { call } => {
                crate::checkpoint::serve(&self.vmms, |t| self.resolve(t), call)?
            }
        };
        Ok(value)
    }

    /// A VM by GUID or by name (names need not be unique; an ambiguous name is refused).
    ///
    /// Anything that parses as a GUID names a VM by its id, never by its name: new names that
    /// parse as a GUID are refused, and a VM stored with one before that rule is reached by its
    /// own GUID.
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
        let id = system.id;
        let consoles = self.consoles.clients(id);
        let mut view = VmView::new(system, worker).with_console_clients(consoles);
        view.owner = self
            .cluster
            .as_ref()
            .and_then(|node| crate::cluster_node::owner(node, id));
        view
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
            "revert" => AutomaticRecoveryAction::RevertToSnapshot,
            other => {
                return Err(ApiError::with_code(
                    ReturnCode::InvalidParameter.code(),
                    format!("unknown recovery action '{other}' (none, restart, revert)"),
                ));
            }
        };
        let id = match spec.new_disk {
            None => self.vmms.define_system(config).map_err(api)?,
            Some(size) => self.define_with_new_disk(config, size)?,
        };
        Ok(self.view(self.vmms.get_vm(id).map_err(api)?))
    }

    /// `New-VM -NewVHDSizeBytes`: the VM is defined, its new disk made in its own folder and
    /// attached first; if the disk cannot be made the VM is removed again.
    fn define_with_new_disk(&self, config: VmConfig, size: u64) -> Result<VmId, ApiError> {
        let mut bare = config.clone();
        bare.disks.clear();
        let id = self.vmms.define_system(bare).map_err(api)?;
        let attached = self.vmms.create_disk(id, NEW_DISK, size).and_then(|_| {
            let mut full = config;
            full.id = id;
            full.disks.insert(
                0,
                DiskConfig {
                    path: PathBuf::from(NEW_DISK),
                    read_only: false,
                },
            );
            self.vmms.modify_system_settings(full)
        });
        if let Err(error) = attached {
            let _ = self.vmms.destroy_system(id);
            return Err(api(error));
        }
        Ok(id)
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

    /// `InitiateShutdown`: the service asks the guest to power off and turns it off if it cannot
    /// be asked or does not comply within `timeout`; the shutdown owns the VM until it is off.
    fn shutdown(&self, target: &str, timeout: Duration) -> Result<Shutdown, ApiError> {
        let id = self.resolve(target)?;
        let name = self.vmms.get_vm(id).map_err(api)?.name;
        let (code, job) = self.vmms.initiate_shutdown(id, timeout).map_err(api)?;
        let Some(job) = job else {
            let state = self.vmms.get_vm(id).map_err(api)?.enabled_state;
            return Err(ApiError::with_code(
                code.code(),
                format!("cannot shut down a VM that is {state}"),
            ));
        };
        // The guest's own timeout plus time to turn it off.
        let job = self
            .vmms
            .wait_for_job(job, timeout + Duration::from_secs(60))
            .map_err(api)?;
        let outcome = match job.state {
            JobState::Completed => "guest shut down".to_owned(),
            JobState::CompletedWithWarnings => job.error_description.unwrap_or_default(),
            _ => {
                return Err(ApiError::with_code(
                    job.error_code,
                    job.error_description.unwrap_or_default(),
                ));
            }
        };
        Ok(Shutdown {
            vm: id,
            name,
            outcome,
        })
    }
}

fn json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

/// A service error as the CLI shows it: vmm-core's return code and the whole error chain.
fn api(error: vmm_core::Error) -> ApiError {
    ApiError::with_code(vmm_core::return_code(&error).code(), error_chain(&error))
}
