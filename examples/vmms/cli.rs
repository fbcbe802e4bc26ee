//! The CLI verbs (after Hyper-V's PowerShell cmdlets), each a client of the daemon.

use std::fs::File;
use std::io::IsTerminal;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use indicatif::{ProgressBar, ProgressStyle};
use vmm_core::{Event, Job, RequestedState};

use crate::api::{ApiError, Client, Request, Shutdown, StateChange, VmSpec, VmView, describe_code};

/// How long `stop-daemon` waits for the daemon to be gone.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Human-readable table.
    Table,
    /// JSON, for scripts.
    Json,
}

/// A failed verb: prints as `verb: 'target': reason (code)`.
#[derive(Debug)]
pub struct CliError {
    pub verb: &'static str,
    pub target: Option<String>,
    pub error: ApiError,
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: ", self.verb)?;
        if let Some(target) = &self.target {
            write!(f, "'{target}': ")?;
        }
        write!(f, "{}", self.error)
    }
}

/// One CLI invocation's context.
pub struct Cli<'a> {
    pub store: &'a Path,
    pub output: Output,
    pub verb: &'static str,
    pub target: Option<String>,
}

impl Cli<'_> {
    fn fail(&self, error: ApiError) -> CliError {
        CliError {
            verb: self.verb,
            target: self.target.clone(),
            error,
        }
    }

    pub fn connect(&self) -> Result<Client, CliError> {
        Client::connect(self.store).map_err(|e| {
            self.fail(ApiError::new(format!(
                "cannot reach the daemon at {}: {e} (is `vmms serve --store {}` running?)",
                self.store.join(crate::api::SOCKET).display(),
                self.store.display()
            )))
        })
    }

    fn call<T: serde::de::DeserializeOwned>(
        &self,
        client: &mut Client,
        request: &Request,
    ) -> Result<T, CliError> {
        client.call(request).map_err(|e| self.fail(e))
    }

    /// `new-vm`.
    pub fn new_vm(&self, spec: VmSpec) -> Result<(), CliError> {
        let mut client = self.connect()?;
        let view: VmView = self.call(&mut client, &Request::NewVm { spec })?;
        self.print_vms(&[view]);
        Ok(())
    }

    /// `get-vm`.
    pub fn get_vm(&self) -> Result<(), CliError> {
        let mut client = self.connect()?;
        let vms: Vec<VmView> = self.call(
            &mut client,
            &Request::GetVm {
                target: self.target.clone(),
            },
        )?;
        self.print_vms(&vms);
        Ok(())
    }

    /// `start-vm`, `suspend-vm`, `resume-vm`, `save-vm`, `restart-vm`, `stop-vm --turn-off`:
    /// `RequestStateChange`, then the job followed to its end.
    pub fn change_state(&self, requested: RequestedState) -> Result<(), CliError> {
        let mut client = self.connect()?;
        let target = self.target.clone().unwrap_or_default();
        let change: StateChange = self.call(
            &mut client,
            &Request::ChangeState {
                target: target.clone(),
                state: requested.code(),
            },
        )?;
        match (change.code, change.job) {
            (4096, Some(job)) => {
                let job = self.follow(&mut client, job, &change.name)?;
                if !job.state.is_success() {
                    return Err(self.fail(ApiError::with_code(
                        job.error_code,
                        job.error_description
                            .unwrap_or_else(|| describe_code(job.error_code).into()),
                    )));
                }
            }
            (0, _) => {}
            (code, _) => return Err(self.fail(ApiError::with_code(code, describe_code(code)))),
        }
        let vms: Vec<VmView> = self.call(
            &mut client,
            &Request::GetVm {
                target: Some(target),
            },
        )?;
        self.print_vms(&vms);
        Ok(())
    }

    /// `resume-vm`: `RequestStateChange(2)` on a paused VM only (on an Off VM the same request
    /// would boot it, which is `start-vm`'s job).
    pub fn resume(&self) -> Result<(), CliError> {
        let vm = self.find()?;
        if vm.state != vmm_core::EnabledState::Paused {
            return Err(self.fail(ApiError::with_code(32775, describe_code(32775))));
        }
        self.change_state(RequestedState::Start)
    }

    /// Waits for `job`, with a spinner when stdout is a terminal.
    fn follow(
        &self,
        client: &mut Client,
        job: vmm_core::JobId,
        name: &str,
    ) -> Result<Job, CliError> {
        if !std::io::stdout().is_terminal() {
            return self.call(
                client,
                &Request::WaitJob {
                    job,
                    timeout_ms: 10 * 60 * 1000,
                },
            );
        }
        let spinner = ProgressBar::new_spinner();
        spinner.set_style(
            ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        spinner.enable_steady_tick(Duration::from_millis(80));
        loop {
            let current: Job = self.call(
                client,
                &Request::WaitJob {
                    job,
                    timeout_ms: 100,
                },
            )?;
            spinner.set_message(format!(
                "'{name}': {} ({}%)",
                current.kind.description(),
                current.percent_complete
            ));
            if current.state.is_terminal() {
                spinner.finish_and_clear();
                return Ok(current);
            }
        }
    }

    /// `stop-vm` without `--turn-off`: a graceful shutdown (see `ShutdownVm`).
    pub fn shutdown(&self, timeout: Duration) -> Result<(), CliError> {
        let mut client = self.connect()?;
        let target = self.target.clone().unwrap_or_default();
        let spinner = std::io::stdout().is_terminal().then(|| {
            let s = ProgressBar::new_spinner();
            s.set_message(format!("'{target}': shutting down"));
            s.enable_steady_tick(Duration::from_millis(80));
            s
        });
        let done: Result<Shutdown, CliError> = self.call(
            &mut client,
            &Request::ShutdownVm {
                target: target.clone(),
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            },
        );
        if let Some(spinner) = spinner {
            spinner.finish_and_clear();
        }
        let done = done?;
        if done.outcome != "guest shut down" {
            eprintln!("stop-vm: '{}': {}", done.name, done.outcome);
        }
        let vms: Vec<VmView> = self.call(
            &mut client,
            &Request::GetVm {
                target: Some(target),
            },
        )?;
        self.print_vms(&vms);
        Ok(())
    }

    /// `remove-vm`.
    pub fn remove_vm(&self) -> Result<(), CliError> {
        let mut client = self.connect()?;
        let _: serde_json::Value = self.call(
            &mut client,
            &Request::RemoveVm {
                target: self.target.clone().unwrap_or_default(),
            },
        )?;
        Ok(())
    }

    /// `get-vm-event`.
    pub fn get_events(&self) -> Result<(), CliError> {
        let mut client = self.connect()?;
        let events: Vec<Event> = self.call(
            &mut client,
            &Request::GetEvents {
                target: self.target.clone(),
            },
        )?;
        match self.output {
            Output::Json => print_json(&events),
            Output::Table => {
                for event in events {
                    out!("{}  {}  {:?}", clock(event.time), event.vm, event.kind);
                }
            }
        }
        Ok(())
    }

    /// `stop-daemon`: succeeds only once the daemon has exited and its store lock is free, so a
    /// new daemon can start on the store at once.
    pub fn stop_daemon(&self) -> Result<(), CliError> {
        let mut client = self.connect()?;
        let pid = client.daemon_pid().map_err(|e| {
            self.fail(ApiError::new(format!(
                "cannot tell which process the daemon is: {e}"
            )))
        })?;
        let _: serde_json::Value = self.call(&mut client, &Request::StopDaemon)?;
        drop(client);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while !(process_gone(pid) && store_unlocked(self.store)) {
            if Instant::now() >= deadline {
                return Err(self.fail(ApiError::new(format!(
                    "the daemon (pid {pid}) accepted the stop but has not exited and released \
                     the store lock within {}s",
                    STOP_TIMEOUT.as_secs()
                ))));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The VM the target names (for `console`).
    pub fn find(&self) -> Result<VmView, CliError> {
        let mut client = self.connect()?;
        let mut vms: Vec<VmView> = self.call(
            &mut client,
            &Request::GetVm {
                target: self.target.clone(),
            },
        )?;
        vms.pop()
            .ok_or_else(|| self.fail(ApiError::new("no such virtual machine")))
    }

    pub fn print_vms(&self, vms: &[VmView]) {
        match self.output {
            Output::Json => print_json(&vms),
            Output::Table => print_table(vms),
        }
    }
}

/// Whether process `pid` has exited (gone, or a zombie its parent has not reaped yet).
fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the command name, which ends at the last ')'.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with(['Z', 'X'])),
        Err(_) => true,
    }
}

/// Whether no process holds the store's lock (`vmms.lock`, taken by a serving daemon).
fn store_unlocked(store: &Path) -> bool {
    let Ok(file) = File::open(store.join("vmms.lock")) else {
        return true;
    };
    // SAFETY: flock only acts on the descriptor `file` owns; the shared lock we may take goes
    // away when `file` closes at the end of this function.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) == 0 }
}

pub fn print_json<T: serde::Serialize>(value: &T) {
    let mut value = match serde_json::to_value(value) {
        Ok(value) => value,
        Err(e) => return eprintln!("cannot encode output: {e}"),
    };
    iso_times(&mut value);
    match serde_json::to_string_pretty(&value) {
        Ok(text) => out!("{text}"),
        Err(e) => eprintln!("cannot encode output: {e}"),
    }
}

/// Rewrites every time (serde's `{secs_since_epoch, nanos_since_epoch}`) as an ISO 8601 string,
/// as scripts expect; the daemon's wire format stays as it is.
fn iso_times(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            let secs = map
                .get("secs_since_epoch")
                .and_then(serde_json::Value::as_u64);
            let nanos = map
                .get("nanos_since_epoch")
                .and_then(serde_json::Value::as_u64);
            if let (Some(secs), Some(nanos), 2) = (secs, nanos, map.len()) {
                let time = SystemTime::UNIX_EPOCH
                    + Duration::from_secs(secs)
                    + Duration::from_nanos(nanos);
                *value = serde_json::Value::String(wmi_model::iso8601(time));
            } else {
                map.values_mut().for_each(iso_times);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(iso_times),
        _ => {}
    }
}

/// Hyper-V's `Get-VM` columns plus the numeric codes a script would check.
fn print_table(vms: &[VmView]) {
    let rows: Vec<[String; 12]> = vms.iter().map(row).collect();
    let header = [
        "Name",
        "State",
        "Code",
        "Health",
        "CPUs",
        "Memory(M)",
        "PID",
        "Uptime",
        "Heartbeat",
        "Confinement",
        "Consoles",
        "Status",
    ]
    .map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out!("{}", line.join("  ").trim_end());
    }
}

fn row(vm: &VmView) -> [String; 12] {
    let (cpus, memory) = vm
        .config
        .as_ref()
        .map_or((String::new(), String::new()), |c| {
            (c.vcpus.to_string(), c.memory_mib.to_string())
        });
    let health = match vm.health_state {
        5 => "OK (5)".to_owned(),
        20 => "Major (20)".to_owned(),
        code => format!("Critical ({code})"),
    };
    let status = match (&vm.status, vm.operational_status) {
        (Some(text), 3) => format!("Degraded (3): {text}"),
        (Some(text), _) => text.clone(),
        (None, 3) => "Degraded (3)".to_owned(),
        (None, _) => "Operating normally".to_owned(),
    };
    // In a cluster: which node owns the VM (it runs only there).
    let status = match &vm.owner {
        Some(owner) => format!("owner {owner}; {status}"),
        None => status,
    };
    [
        vm.name.clone(),
        vm.state.to_string(),
        vm.enabled_state.to_string(),
        health,
        cpus,
        memory,
        vm.process_id.map(|p| p.to_string()).unwrap_or_default(),
        uptime(vm.on_time_ms),
        vm.heartbeat.map(|h| h.to_string()).unwrap_or_default(),
        confinement(vm),
        vm.console_clients.to_string(),
        status,
    ]
}

/// What the VM's worker runs under, in a word or two: `seccomp+landlock`, `seccomp` (a kernel
/// without Landlock), `none` (`serve --no-confinement`); empty without a worker report.
fn confinement(vm: &VmView) -> String {
    let Some(worker) = &vm.worker else {
        return String::new();
    };
    let c = &worker.confinement;
    match (c.enabled, c.seccomp, c.landlock.starts_with("fully")) {
        (false, _, _) => "none".to_owned(),
        (true, true, true) => "seccomp+landlock".to_owned(),
        (true, true, false) => format!("seccomp, landlock {}", c.landlock),
        (true, false, _) => "partial".to_owned(),
    }
}

fn uptime(ms: u64) -> String {
    let s = ms / 1000;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// `HH:MM:SS` (UTC) of a timestamp, for event lines.
fn clock(time: SystemTime) -> String {
    let s = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{:02}:{:02}:{:02}", s / 3600 % 24, s / 60 % 60, s % 60)
}
