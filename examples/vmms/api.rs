//! What the CLI and the daemon say to each other over `<store>/vmms.sock`: one JSON request per
//! line, one JSON response line back. The daemon answers in the model's terms (Hyper-V's state
//! codes, return codes and jobs), so the CLI is a thin client like any other.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::time::SystemTime;

use vmm_core::{ComputerSystem, EnabledState, HealthState, JobId, VmConfig, VmId};
use worker_manager::protocol::WorkerReport;

/// Name of the daemon's socket inside the store.
pub const SOCKET: &str = "vmms.sock";

/// A CLI request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// `DefineSystem`.
    NewVm { spec: VmSpec },
    /// One VM (by name or GUID) or all of them.
    GetVm { target: Option<String> },
    /// `RequestStateChange` with a Hyper-V `RequestedState` code.
    ChangeState { target: String, state: u16 },
    /// Waits up to `timeout_ms` for a job to end; returns it either way.
    WaitJob { job: JobId, timeout_ms: u64 },
    /// A graceful stop: the guest is asked to shut down, then turned off if it does not.
    ShutdownVm { target: String, timeout_ms: u64 },
    /// `DestroySystem`.
    RemoveVm { target: String },
    /// Recent events, of one VM or all.
    GetEvents { target: Option<String> },
    /// The daemon exits; running VMs keep running.
    StopDaemon,
    /// A checkpoint, export or import verb.
    Checkpoint {
        call: crate::checkpoint::CheckpointCall,
    },
    /// A backup, verify or restore verb.
    Backup { call: crate::backup::BackupCall },
}

/// What `new-vm` defines.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub disks: Vec<PathBuf>,
    /// Size in bytes of a new empty qcow2 disk `disks/disk0.qcow2` (`New-VM -NewVHDSizeBytes`),
    /// attached before `disks`.
    #[serde(default)]
    pub new_disk: Option<u64>,
    /// `none`, `restart` or `revert` (to the newest checkpoint).
    pub recovery: String,
}

/// A failed request: the Hyper-V return code when there is one, and a sentence.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    pub code: Option<u32>,
    pub message: String,
}

impl ApiError {
    pub fn new(message: impl Into<String>) -> Self {
        ApiError {
            code: None,
            message: message.into(),
        }
    }

    pub fn with_code(code: u32, message: impl Into<String>) -> Self {
        ApiError {
            code: Some(code),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code {
            Some(code) => write!(f, "{} ({code})", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// The daemon's answer line.
pub type Response = Result<serde_json::Value, ApiError>;

/// One VM as the CLI shows it: the model's `Msvm_ComputerSystem` view with Hyper-V's numeric
/// codes next to their names, plus what its worker reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmView {
    pub id: VmId,
    pub name: String,
    /// `EnabledState` by name.
    pub state: EnabledState,
    /// `EnabledState` code (2 Running, 3 Off, 6 Saved, 9 Paused, 3277x transitional).
    pub enabled_state: u16,
    /// `RequestedState` code (12: no request in progress).
    pub requested_state: u16,
    /// `HealthState` by name.
    pub health: HealthState,
    /// `HealthState` code (5 OK, 25 critical failure).
    pub health_state: u16,
    /// `OperationalStatus[0]` code (2 OK, 3 degraded).
    pub operational_status: u16,
    /// Why the VM is degraded or unhealthy.
    pub status: Option<String>,
    /// The worker's pid while one runs.
    pub process_id: Option<u32>,
    /// Running time since the last start.
    pub on_time_ms: u64,
    pub time_of_last_state_change: SystemTime,
    /// The definition (`None` when degraded).
    pub config: Option<VmConfig>,
    /// Live report of the worker, while one runs.
    pub worker: Option<WorkerReport>,
    /// In a cluster: the node that owns the VM now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// RDP console clients connected now.
    #[serde(default)]
    pub console_clients: usize,
    /// Whether the guest's integration agent answers (Hyper-V's heartbeat): `Ok`, `NoContact`,
    /// `LostCommunication`; `null` while no guest runs.
    #[serde(default)]
    pub heartbeat: Option<vmm_core::integration::GuestHeartbeat>,
}

impl VmView {
    pub fn new(system: ComputerSystem, worker: Option<WorkerReport>) -> Self {
        VmView {
            id: system.id,
            name: system.name,
            state: system.enabled_state,
            enabled_state: system.enabled_state.code(),
            requested_state: system.requested_state.code(),
            health: system.health_state,
            health_state: system.health_state.code(),
            operational_status: system.operational_status.code(),
            status: system.status_description,
            process_id: system.process_id,
            on_time_ms: system.on_time_ms,
            time_of_last_state_change: system.time_of_last_state_change,
            config: system.config,
            worker,
            owner: None,
            console_clients: 0,
            heartbeat: system.heartbeat,
        }
    }

    /// With the number of connected console clients.
    pub fn with_console_clients(mut self, clients: usize) -> Self {
        self.console_clients = clients;
        self
    }
}

/// The answer to `change-state`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateChange {
    pub vm: VmId,
    pub name: String,
    /// `RequestStateChange`'s return value (0, 4096, or a 327xx refusal).
    pub code: u32,
    pub job: Option<JobId>,
}

/// The answer to `shutdown-vm`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Shutdown {
    pub vm: VmId,
    pub name: String,
    /// How the VM ended: `"guest shut down"` or why it was turned off instead.
    pub outcome: String,
}

/// Hyper-V's text for a `RequestStateChange` / job error code.
pub fn describe_code(code: u32) -> &'static str {
    match code {
        0 => "completed",
        4096 => "job started",
        32768 => "failed",
        32769 => "access denied",
        32770 => "not supported",
        32771 => "status unknown",
        32772 => "timeout",
        32773 => "invalid parameter",
        32774 => "system in use",
        32775 => "invalid state for this operation",
        32776 => "incorrect data type",
        32777 => "system not available",
        32778 => "out of memory",
        32779 => "file not found",
        _ => "error",
    }
}

/// A connection to the daemon.
#[derive(Debug)]
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connects to the daemon of the store at `store`.
    pub fn connect(store: &Path) -> std::io::Result<Self> {
        let stream = UnixStream::connect(store.join(SOCKET))?;
        Ok(Client {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    /// The daemon's pid, as the kernel recorded it when the daemon accepted us (`SO_PEERCRED`).
    pub fn daemon_pid(&self) -> std::io::Result<i32> {
        crate::listener::peer_of(&self.writer).map(|peer| peer.pid)
    }

    /// Sends `request` and decodes the answer as `T`.
    pub fn call<T: DeserializeOwned>(&mut self, request: &Request) -> Result<T, ApiError> {
        let mut line = serde_json::to_vec(request).map_err(|e| ApiError::new(e.to_string()))?;
        line.push(b'\n');
        // A daemon that refuses us (access denied, too many connections) answers and closes
        // at once, maybe before our request is written: its answer is still there to read.
        let sent = self.writer.write_all(&line);
        let mut answer = String::new();
        match (self.reader.read_line(&mut answer), sent) {
            (Ok(n), _) if n > 0 => {}
            (_, Err(e)) => return Err(ApiError::new(format!("daemon connection: {e}"))),
            (Ok(_), Ok(())) => return Err(ApiError::new("daemon closed the connection")),
            (Err(e), Ok(())) => return Err(ApiError::new(format!("daemon connection: {e}"))),
        }
        let response: Response = serde_json::from_str(&answer)
            .map_err(|e| ApiError::new(format!("daemon answer: {e}")))?;
        serde_json::from_value(response?).map_err(|e| ApiError::new(format!("daemon answer: {e}")))
    }
}
