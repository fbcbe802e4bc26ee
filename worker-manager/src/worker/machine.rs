//! The worker's owner of the partition: builds or restores it, runs it, and carries out the
//! parent's requests on it, one at a time, on the worker's main thread.
//!
//! `Partition`'s run control takes `&mut self`, so exactly one thread owns it: this one. It sleeps
//! in `poll` on two descriptors, the partition's stop event and the request queue's eventfd, so an
//! idle worker does not wake at all; status questions never come here (the connections answer them
//! from [`WorkerShared`]).

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use partition::{
    DiskConfig as PartitionDisk, ExitReason, KernelImage, Partition, PartitionConfig, VmShell,
};
use vmm_core::{BootSource, CheckpointContent, StopReason, VmConfig, VmId, error_chain, fault};

use super::WorkerOptions;
use super::agent::{self, AgentHandle, AgentJobs};
use super::backup::{self, Captured};
use super::change_tracking::ChangeTracking;
use super::checkpoint::{self, DirtyTracking};
use super::confinement::{self, IdleConfinement};
use super::console::{self, ConsoleLog};
use super::control::{self, Command, CommandReceiver, Taken, WorkerShared};
use super::disks;
use super::fence;
use super::frozen_checkpoint;
use super::idle_folder::bind_listener;
use super::pool::Handover;
use super::set_up::{VmLock, consume_saved_state, filesystem_view, read_config, restore};
use super::start_trace::mark;
use super::state_folder::write_saved_state;
use crate::error::{Error, Result};
use crate::protocol::{Confinement, Failure, FromWorker, GuestState, Notice, Reply, Request};
use crate::runtime::{RuntimeDir, StoreLayout};
use crate::worker_lock::WorkerLock;

/// Name of the partition state in a saved-state folder.
pub const STATE_FILE: &str = "state.json";
/// Name of the guest memory image in a saved-state folder.
pub const MEMORY_FILE: &str = "memory.bin";

/// How long a guest asked to shut down has for its integration agent to answer (the request
/// needs the stream in step first: a guest still booting gets this long to start its agent).
const SHUTDOWN_AGENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Maps a virtual machine's definition to the partition that runs it. Relative disk paths are
/// resolved against `disks_dir`; the test guest boots from `default_kernel`.
pub fn partition_config(vm: &VmConfig, disks_dir: &Path, default_kernel: &[u8]) -> PartitionConfig {
    let (kernel, initrd, cmdline) = match &vm.boot {
        BootSource::TestGuest => (KernelImage::Bytes(Arc::from(default_kernel)), None, ""),
        BootSource::Kernel {
            kernel,
            initrd,
            cmdline,
        } => (
            KernelImage::Path(kernel.clone()),
            initrd.clone(),
            cmdline.as_str(),
        ),
    };
    let mut config = PartitionConfig::new(kernel, cmdline);
    config.boot.initrd = initrd;
    config.vcpus = vm.vcpus;
    config.memory_mib = vm.memory_mib;
    config.disks = vm
        .disks
        .iter()
        .map(|disk| {
            let mut mapped = PartitionDisk::new(disks_dir.join(&disk.path));
            mapped.read_only = disk.read_only;
            mapped
        })
        .collect();
    config
}

/// What the service hears about a guest that stopped on its own.
pub fn stop_reason(exit: &ExitReason) -> StopReason {
    match exit {
        ExitReason::PowerOff => StopReason::GuestPowerOff,
        ExitReason::Reset => StopReason::GuestReset,
        ExitReason::TripleFault => StopReason::TripleFault,
        other => StopReason::GuestCrash {
            detail: other.to_string(),
        },
    }
}

/// What the owner loop does after a request.
enum Flow {
    Continue,
    Exit,
}

/// What a pool worker made ready for its VM's start while it waited, and how the VM's runtime
/// folder becomes its own; an exec'd worker has none of it and does it all in [`Machine::start`].
#[derive(Debug, Default)]
pub(crate) struct Prepared<'a> {
    /// The launcher's hand-over of the VM's lock, and the sockets and log prepared while idle.
    pub(crate) handover: Option<Handover<'a>>,
    /// The VM created while idle; the partition is built into it.
    pub(crate) shell: Option<VmShell>,
    /// What the worker confined while idle, the seccomp filter included.
    pub(crate) confinement: Option<IdleConfinement>,
}

/// The partition and everything the main thread needs to drive it.
pub(crate) struct Machine {
    config: PartitionConfig,
    /// `None` once the guest stopped on its own (its memory is released at once).
    partition: Option<Partition>,
    shared: Arc<WorkerShared>,
    commands: CommandReceiver,
    runtime: RuntimeDir,
    /// The agent thread's job queue, until the thread starts.
    agent_jobs: Option<AgentJobs>,
    /// Whether the process is confined (seccomp goes on before the first `KVM_RUN`).
    confine: bool,
    vm_name: String,
    /// The pages dirtied since the state the guest's memory last equalled (for delta
    /// checkpoints).
    tracking: DirtyTracking,
    /// The disks' changed-block maps and their reference point (persisted on a clean end).
    change_tracking: ChangeTracking,
    /// Disks a backup captured and has not merged yet.
    backup: Vec<Captured>,
    /// Held for the whole life of the process: it is what tells a service that this VM has a
    /// worker (see [`WorkerLock`]).
    _lock: WorkerLock,
}

impl Machine {
    /// Builds or restores the partition, opens the sockets, starts the guest and writes the pid
    /// file. On error nothing is left in the runtime folder but the log. `prepared` is what a
    /// pool worker made ready while it waited (nothing for an exec'd worker).
    pub(crate) fn start(
        options: &WorkerOptions<'_>,
        vm_id: VmId,
        prepared: Prepared,
    ) -> Result<Self> {
        let Prepared {
            handover,
            shell,
            confinement: idle_confinement,
        } = prepared;
        let filtered = idle_confinement.is_some();
        let layout = StoreLayout::new(&options.store);
        let runtime = layout.runtime(vm_id);
        // A filtered worker may not change modes (its filter has no chmod); the launcher sets
        // the folder's.
        let created = if filtered {
            runtime.create_keeping_mode()
        } else {
            runtime.create()
        };
        created.map_err(|e| Error::io(runtime.path(), e))?;
        // An exec'd worker holds the lock from the start; a pool worker gets it from the
        // launcher while it builds the partition.
        let lock = match handover {
            Some(handover) => VmLock::HandedOver(handover),
            None => VmLock::Held(
                WorkerLock::inherit_or_acquire(&runtime)
                    .map_err(|e| Error::io(runtime.lock_file(), e))?
                    .ok_or(Error::AlreadyRunning)?,
            ),
        };
        let vm = read_config(&layout, vm_id)?;
        mark("config");
        let mut config = partition_config(&vm, &layout.disks_dir(vm.id), options.default_kernel);
        // Disks are opened (and locked) before the sandbox closes; Landlock then only needs
        // what later opens: backing files and the VM's folder.
        disks::open_disks(&mut config)?;
        // Running checkpoints pre-copy memory with the dirty log, and a delta needs it
        // continuous from the start.
        config.dirty_log = true;
        mark("disks");
        // Network adapters: their TAPs are opened now, before the sandbox closes.
        super::network::attach_adapters(
            &mut config,
            &options.store,
            vm.id,
            vm.boot == BootSource::TestGuest,
        )?;
        mark("network");
        let confinement = if options.confine {
            // Facts the partition reads from outside the sandbox, read once before it closes.
            partition::software_kvm::is_software_kvm();
            let view = filesystem_view(&layout, &vm, &config, options.restore.as_deref());
            confinement::restrict_process(&view, idle_confinement)?
        } else {
            Confinement {
                landlock: "off".into(),
                ..Confinement::default()
            }
        };
        mark("landlock");
        fence::watch(layout.vm_dir(vm.id).join(vmm_core::FENCE_FILE)).map_err(Error::Thread)?;
        mark("fence");
        let mut builder = Partition::builder(config.clone());
        if let Some(shell) = shell {
            builder = builder.shell(shell);
        }
        let (partition, restored_state) = match &options.restore {
            Some(dir) => restore(builder, dir)?,
            None => (builder.build()?, None),
        };
        mark("partition");
        let (lock, listeners) = lock.take(&runtime)?;
        mark("handover");
        let vm_dir = layout.vm_dir(vm.id);
        let change_tracking =
            ChangeTracking::start(&vm_dir, &partition).map_err(|e| Error::io(vm_dir, e))?;
        mark("tracking");
        let console = Arc::new(ConsoleLog::default());
        let (tx, commands) = control::command_queue().map_err(Error::EventFd)?;
        let test_guest = vm.boot == BootSource::TestGuest;
        let (agent, agent_jobs) = AgentHandle::new();
        let shared = Arc::new(WorkerShared::new(
            vm.id,
            options.restore.is_some(),
            test_guest,
            Arc::clone(&console),
            tx,
            agent,
        ));
        shared.set_confinement(confinement);
        let mut machine = Machine {
            config,
            partition: None,
            shared,
            commands,
            runtime,
            agent_jobs: Some(agent_jobs),
            confine: options.confine,
            vm_name: vm.name.clone(),
            tracking: DirtyTracking::starting_at(restored_state),
            change_tracking,
            backup: Vec::new(),
            _lock: lock,
        };
        let result = machine.open_and_run(partition, options.restore.as_deref(), listeners);
        if result.is_err() {
            machine.runtime.remove_live_files(std::process::id());
        }
        result.map(|()| machine)
    }

    /// Opens the sockets, consumes the saved state the guest was restored from (if any), and
    /// starts the guest.
    fn open_and_run(
        &mut self,
        partition: Partition,
        restored_from: Option<&Path>,
        listeners: Option<(UnixListener, UnixListener)>,
    ) -> Result<()> {
        let (control, console_listener) = match listeners {
            Some(listeners) => listeners,
            None => {
                let bind = |path: PathBuf| bind_listener(&path).map_err(|e| Error::io(path, e));
                (
                    bind(self.runtime.control_socket())?,
                    bind(self.runtime.console_socket())?,
                )
            }
        };
        mark("bind");
        if let Some(dir) = restored_from {
            // From here on the guest lives in this process only: the saved state must be gone
            // before anyone can see this worker run, or a crash of the service could have the
            // same state restored a second time on top of disks that have moved on.
            fault::point("worker.restore.before-consume");
            consume_saved_state(dir)?;
            fault::point("worker.restore.after-consume");
        }
        self.install(partition);
        // Set-up is over: from the first KVM_RUN on, only the allowlist (a pool worker has had
        // it since it was idle).
        if self.confine && !self.shared.confinement().seccomp {
            confinement::install_seccomp()?;
            self.shared.update_confinement(|c| c.seccomp = true);
        }
        mark("seccomp");
        if let Some(partition) = &mut self.partition {
            partition.resume()?;
        }
        mark("running");
        self.shared.set_state(GuestState::Running);
        // The connection threads start once the guest runs, not on its way there: nobody can
        // reach them before the worker reports ready, and they inherit the filter.
        let shared = Arc::clone(&self.shared);
        std::thread::Builder::new()
            .name("listeners".into())
            .spawn(move || super::listeners::serve(control, console_listener, &shared))
            .map_err(Error::Thread)?;
        if let Some(jobs) = self.agent_jobs.take() {
            let shared = Arc::clone(&self.shared);
            std::thread::Builder::new()
                .name("guest-agent".into())
                .spawn(move || agent::serve(jobs, shared))
                .map_err(Error::Thread)?;
        }
        mark("threads");
        if self.confine {
            let landlock = self.shared.confinement().landlock;
            log_line!(
                "worker {}: confined: seccomp allowlist, no new privileges, landlock {landlock}",
                self.shared.vm()
            );
            confinement::start_test_escape(&self.vm_name);
        }
        let pid_file = self.runtime.pid_file();
        self.runtime
            .write_pid(std::process::id())
            .map_err(|e| Error::io(pid_file, e))?;
        mark("pid");
        Ok(())
    }

    /// The worker's status now (what [`Request::Status`] answers).
    pub(crate) fn report(&self) -> crate::protocol::WorkerReport {
        self.shared.report()
    }

    /// Serves a pool worker's socket pair, on which it just reported ready, as a control
    /// connection whose handshake is done (see the `pool` module notes).
    pub(crate) fn adopt_parent(&self, channel: std::os::unix::net::UnixStream) -> Result<()> {
        let shared = Arc::clone(&self.shared);
        std::thread::Builder::new()
            .name("control-conn".into())
            .spawn(move || control::adopt(channel, &shared))
            .map(drop)
            .map_err(Error::Thread)
    }

    /// Makes `partition` the running one: COM1 into the console log, memory and COM1 visible to
    /// the connection threads, COM2 to the guest-agent thread.
    fn install(&mut self, partition: Partition) {
        partition
            .com1()
            .set_sink(Box::new(console::ConsoleSink::new(self.shared.console())));
        self.shared.agent().attach(Some(partition.com2().clone()));
        self.shared.set_guest(
            Some(partition.memory().clone()),
            Some(partition.com1().clone()),
        );
        self.partition = Some(partition);
    }

    /// Runs the guest and the parent's requests until told to save or turn off. Between events the
    /// thread sleeps in `poll`: on the request queue always, on the partition's stop event while the
    /// guest runs.
    pub(crate) fn serve(mut self) -> ExitCode {
        // Ready and running: the previous worker's log, moved aside for this start, can go now.
        self.runtime.remove_previous_log();
        'serve: loop {
            let stop_event = match (&self.partition, self.shared.state()) {
                (Some(partition), GuestState::Running) => Some(partition.stop_event().as_raw_fd()),
                _ => None,
            };
            let [requests, stopped] =
                super::listeners::wait_readable([Some(self.commands.ready_fd()), stop_event]);
            if stopped
                && let Some(partition) = &mut self.partition
                && let Some(exit) = partition.wait(Some(Duration::ZERO))
            {
                self.guest_stopped(&exit);
            }
            if !requests {
                continue;
            }
            self.commands.clear();
            loop {
                match self.commands.take() {
                    Taken::Command(command) => {
                        if let Flow::Exit = self.handle(command) {
                            break 'serve;
                        }
                    }
                    Taken::Empty => break,
                    // The shared state holds a sender for the whole life of the process.
                    Taken::Closed => break 'serve,
                }
            }
        }
        // The folder itself stays: a confined worker may not remove it, and its lock file and
        // log are what the next worker and a post-mortem use.
        self.runtime.remove_live_files(std::process::id());
        log_line!("worker {}: exiting", self.shared.vm());
        ExitCode::SUCCESS
    }

    /// The guest stopped on its own: release it, remember why, tell every parent connected.
    fn guest_stopped(&mut self, exit: &ExitReason) {
        log_line!("worker {}: guest stopped: {exit}", self.shared.vm());
        self.release_guest(stop_reason(exit));
    }

    /// The guest is gone for `reason`: free its memory, and tell every parent connected.
    fn release_guest(&mut self, reason: StopReason) {
        self.partition = None;
        // Every write the guest made is in the maps now (its devices are gone): a clean end.
        self.change_tracking.write_clean();
        self.shared.set_guest(None, None);
        self.shared.agent().attach(None);
        self.shared.set_state(GuestState::Stopped {
            reason: reason.clone(),
        });
        self.shared
            .broadcast(&FromWorker::Event(Notice::GuestStopped { reason }));
    }

    fn handle(&mut self, command: Command) -> Flow {
        if let Request::GuestAgent(request) = command.request {
            // The connection threads send these to the agent thread; should one come here, it
            // goes there too.
            let job = agent::Job::Call {
                id: command.id,
                request,
                peer: command.peer,
            };
            if let Err(agent::Job::Call { id, peer, .. }) = self.shared.agent().submit(job) {
                peer.send(&FromWorker::Reply {
                    id,
                    result: Err(Failure::invalid_state("worker is shutting down")),
                });
            }
            return Flow::Continue;
        }
        let (result, flow) = match command.request {
            Request::Pause => (self.pause(), Flow::Continue),
            Request::Resume => (self.resume(), Flow::Continue),
            Request::Reset => (self.reset(), Flow::Continue),
            Request::Save { staging, state_dir } => match self.save(&staging, &state_dir) {
                Ok(()) => (Ok(Reply::Done), Flow::Exit),
                Err(reason) => (Err(reason), Flow::Continue),
            },
            Request::Shutdown => (self.shutdown(), Flow::Continue),
            Request::Checkpoint(request) => (self.checkpoint(&request), Flow::Continue),
            Request::BackupCapture(request) => (self.backup_capture(&request), Flow::Continue),
            Request::BackupMerge(request) => (self.backup_merge(&request), Flow::Continue),
            Request::TurnOff => {
                if let Some(partition) = &mut self.partition {
                    partition.stop();
                }
                self.partition = None;
                self.change_tracking.write_clean();
                (Ok(Reply::Done), Flow::Exit)
            }
            // Answered by the connection threads; harmless if it arrives here.
            Request::Status => (Ok(Reply::Status(self.shared.report())), Flow::Continue),
            Request::GuestAgent(_) => return Flow::Continue,
        };
        command.peer.send(&FromWorker::Reply {
            id: command.id,
            result,
        });
        flow
    }

    /// The partition, or why there is none.
    fn live(&mut self) -> std::result::Result<&mut Partition, Failure> {
        match (&mut self.partition, self.shared.state()) {
            (Some(partition), _) => Ok(partition),
            (None, GuestState::Stopped { reason }) => Err(Failure::invalid_state(format!(
                "guest has stopped: {reason}"
            ))),
            (None, _) => Err(Failure::invalid_state("guest is not running")),
        }
    }

    fn pause(&mut self) -> std::result::Result<Reply, Failure> {
        if self.shared.state() == GuestState::Paused {
            return Ok(Reply::Done);
        }
        let partition = self.live()?;
        partition.pause().map_err(|e| partition_failure(&e))?;
        if let partition::RunState::Stopped(exit) = partition.run_state().clone() {
            // The guest stopped on its own just as it was paused.
            self.guest_stopped(&exit);
            return Err(Failure::invalid_state(format!(
                "guest has stopped: {}",
                stop_reason(&exit)
            )));
        }
        self.set_and_announce(GuestState::Paused);
        Ok(Reply::Done)
    }

    fn resume(&mut self) -> std::result::Result<Reply, Failure> {
        if self.shared.state() == GuestState::Running {
            return Ok(Reply::Done);
        }
        self.live()?.resume().map_err(|e| partition_failure(&e))?;
        self.set_and_announce(GuestState::Running);
        Ok(Reply::Done)
    }

    /// A hard reset: the old partition is torn down and a fresh one boots from the boot source.
    fn reset(&mut self) -> std::result::Result<Reply, Failure> {
        if let Some(mut old) = self.partition.take() {
            old.stop();
        }
        self.tracking = DirtyTracking::default();
        self.shared.set_guest(None, None);
        self.shared.agent().attach(None);
        let booted = Partition::new(self.config.clone()).and_then(|partition| {
            self.install(partition);
            match &mut self.partition {
                Some(partition) => partition.resume(),
                None => Ok(()),
            }
        });
        match booted {
            Ok(()) => {
                if let Some(partition) = &self.partition {
                    self.change_tracking.rebind(partition);
                }
                self.set_and_announce(GuestState::Running);
                Ok(Reply::Done)
            }
            Err(error) => {
                let detail = format!("reset failed: {}", error_chain(&error));
                self.release_guest(StopReason::GuestCrash {
                    detail: detail.clone(),
                });
                Err(Failure::failed(detail))
            }
        }
    }

    /// Asks the guest to shut down: `guest-shutdown` through its integration agent on COM2
    /// (the test guest's and a Linux guest's `qemu-ga` alike). The power-off itself is announced
    /// when the vCPUs see it. A guest whose agent does not answer is refused: it cannot be
    /// asked.
    fn shutdown(&mut self) -> std::result::Result<Reply, Failure> {
        if self.shared.state() != GuestState::Running {
            return Err(Failure::invalid_state("only a running guest can shut down"));
        }
        match self.shared.agent().shutdown(SHUTDOWN_AGENT_TIMEOUT) {
            Ok(()) => Ok(Reply::Done),
            Err(error) => Err(Failure::refused(format!(
                "the guest cannot be asked to shut down: {}",
                error_chain(&error)
            ))),
        }
    }

    /// Pauses, writes the state and memory durably into `staging`, commits it as `state_dir`,
    /// and releases the guest. On any failure before the commit the guest runs on as before
    /// (or stays paused, if it was) and `state_dir` is untouched.
    fn save(&mut self, staging: &Path, state_dir: &Path) -> std::result::Result<(), Failure> {
        self.no_backup_pending()?;
        let before = self.shared.state();
        if before == GuestState::Running {
            self.pause()?;
        }
        self.set_and_announce(GuestState::Saving);
        let started = Instant::now();
        let written = self.live().and_then(|partition| {
            write_saved_state(partition, staging).map_err(|e| Failure::failed(error_chain(&e)))
        });
        let committed = written.and_then(|bytes| {
            fault::point("worker.save.before-commit");
            vmm_core::atomic_file::commit_dir(staging, state_dir)
                .map(|()| bytes)
                .map_err(|e| Failure::failed(format!("cannot commit {}: {e}", state_dir.display())))
        });
        match committed {
            Ok(bytes) => {
                fault::point("worker.save.after-commit");
                log_line!(
                    "worker {}: saved {bytes} bytes of memory in {:?}",
                    self.shared.vm(),
                    started.elapsed()
                );
                // A parent that re-attached during the save learns from this that the VM is
                // Saved; the one that asked ignores it.
                self.release_guest(StopReason::Saved);
                Ok(())
            }
            Err(failure) => {
                let reason = Failure {
                    message: format!("save failed: {}", failure.message),
                    ..failure
                };
                // Best effort: the reply says the save failed either way.
                if before == GuestState::Running {
                    self.shared.set_state(GuestState::Paused);
                    let _ = self.resume();
                } else {
                    self.set_and_announce(GuestState::Paused);
                }
                Err(reason)
            }
        }
    }

    /// Takes a checkpoint of the running or paused guest (see [`checkpoint`]); it is left in the
    /// state it was in. Status requests see it as it was meanwhile: the pause is short.
    fn checkpoint(
        &mut self,
        request: &vmm_core::CheckpointRequest,
    ) -> std::result::Result<Reply, Failure> {
        match request.content {
            CheckpointContent::SavedState => self.no_backup_pending()?,
            // Its point is a frozen guest: the freeze is checked inside the pause instead.
            CheckpointContent::FrozenDisks => self.no_backup_overlays()?,
        }
        match self.shared.state() {
            GuestState::Running | GuestState::Paused => {}
            other => {
                return Err(Failure::invalid_state(format!(
                    "a checkpoint needs a running or paused guest, not {other:?}"
                )));
            }
        }
        let shared = Arc::clone(&self.shared);
        let Some(partition) = &mut self.partition else {
            return Err(Failure::invalid_state("guest is not running"));
        };
        let result = match request.content {
            CheckpointContent::SavedState => {
                checkpoint::checkpoint(partition, &mut self.config, &mut self.tracking, request)
            }
            CheckpointContent::FrozenDisks => {
                let agent = shared.agent();
                frozen_checkpoint::frozen_disks(partition, &mut self.config, request, &|| {
                    agent.freeze_held()
                })
            }
        };
        if let partition::RunState::Stopped(exit) = partition.run_state().clone() {
            self.guest_stopped(&exit);
        }
        match &result {
            Ok(report) => log_line!(
                "worker {}: checkpoint committed: {} bytes of memory{}, paused {:?}, total {:?}",
                self.shared.vm(),
                report.memory_bytes,
                if report.delta { " (delta)" } else { "" },
                report.pause,
                report.total
            ),
            Err(failure) => log_line!("worker {}: checkpoint failed: {failure}", self.shared.vm()),
        }
        result.map(Reply::Checkpoint)
    }

    /// A backup's capture of the disks (see [`backup::capture`]).
    fn backup_capture(
        &mut self,
        request: &vmm_core::integration::BackupCaptureRequest,
    ) -> std::result::Result<Reply, Failure> {
        self.running_or_paused()?;
        let Some(partition) = &mut self.partition else {
            return Err(Failure::invalid_state("guest is not running"));
        };
        let result = backup::capture(
            partition,
            &mut self.config,
            &mut self.change_tracking,
            &mut self.backup,
            request,
        );
        self.note_stopped();
        match &result {
            Ok(report) => log_line!(
                "worker {}: backup capture of {} disks, quiesced {:?}, previous reference {:?}",
                self.shared.vm(),
                report.changes.len(),
                report.quiesce,
                report.previous_reference
            ),
            Err(failure) => log_line!(
                "worker {}: backup capture failed: {failure}",
                self.shared.vm()
            ),
        }
        result.map(Reply::BackupCaptured)
    }

    /// The merge that ends a backup (see [`backup::merge`]).
    fn backup_merge(
        &mut self,
        request: &vmm_core::integration::BackupMergeRequest,
    ) -> std::result::Result<Reply, Failure> {
        let stopped = matches!(self.shared.state(), GuestState::Stopped { .. });
        let result = match &mut self.partition {
            None if stopped => {
                let merged = backup::merge_stopped(
                    &mut self.config,
                    &mut self.change_tracking,
                    &mut self.backup,
                    request,
                );
                // The guest's end wrote the tracking already: again, with what the merge kept.
                self.change_tracking.write_clean();
                merged
            }
            _ => {
                self.running_or_paused()?;
                let Some(partition) = &mut self.partition else {
                    return Err(Failure::invalid_state("guest is not running"));
                };
                backup::merge(
                    partition,
                    &mut self.config,
                    &mut self.change_tracking,
                    &mut self.backup,
                    request,
                )
            }
        };
        self.note_stopped();
        match &result {
            Ok(report) => log_line!(
                "worker {}: backup merge of {} disks, {} bytes, final quiesce {:?}",
                self.shared.vm(),
                report.disks_merged,
                report.bytes_copied,
                report.final_quiesce
            ),
            Err(failure) => log_line!(
                "worker {}: backup merge failed: {failure}",
                self.shared.vm()
            ),
        }
        result.map(Reply::BackupMerged)
    }

    /// Refuses unless the guest runs or is paused (with a partition).
    fn running_or_paused(&mut self) -> std::result::Result<(), Failure> {
        match self.shared.state() {
            GuestState::Running | GuestState::Paused => self.live().map(drop),
            other => Err(Failure::invalid_state(format!(
                "the disks of a {other:?} guest cannot be switched"
            ))),
        }
    }

    /// Releases the guest if it stopped on its own during an operation.
    fn note_stopped(&mut self) {
        if let Some(partition) = &self.partition
            && let partition::RunState::Stopped(exit) = partition.run_state().clone()
        {
            self.guest_stopped(&exit);
        }
    }

    /// Refuses an operation that would carry a backup's unmerged overlays into saved state or a
    /// checkpoint.
    fn no_backup_pending(&self) -> std::result::Result<(), Failure> {
        self.no_backup_overlays()?;
        // A state captured while frozen would come back frozen, with no hold limit to end it.
        if self.shared.agent().may_be_frozen() {
            return Err(Failure::invalid_state(
                "the guest's file systems are frozen for a backup",
            ));
        }
        Ok(())
    }

    /// Refuses an operation that would carry a backup's unmerged overlays into a checkpoint.
    fn no_backup_overlays(&self) -> std::result::Result<(), Failure> {
        if !self.backup.is_empty() {
            return Err(Failure::invalid_state(
                "a backup's overlays are not merged yet",
            ));
        }
        Ok(())
    }

    fn set_and_announce(&self, state: GuestState) {
        self.shared.set_state(state.clone());
        self.shared
            .broadcast(&FromWorker::Event(Notice::StateChanged { state }));
    }
}

/// A partition error as a reply: a run state that forbids the operation is
/// [`FailureKind::InvalidState`](crate::protocol::FailureKind::InvalidState), anything else a
/// failure with the whole chain of causes.
pub(crate) fn partition_failure(error: &partition::Error) -> Failure {
    match error {
        partition::Error::InvalidRunState { .. } => Failure::invalid_state(error_chain(error)),
        other => Failure::failed(error_chain(other)),
    }
}

/// Lock helper shared by the worker's modules: state behind these locks is replaced whole, so a
/// panic on another thread leaves it consistent.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_core::DiskConfig;

    #[test]
    fn test_guest_boots_the_default_kernel_with_the_configured_shape() {
        let mut vm = VmConfig::new("t");
        vm.vcpus = 2;
        vm.memory_mib = 32;

        let config = partition_config(&vm, Path::new("/d"), b"ELF!");

        assert!(matches!(&config.boot.kernel, KernelImage::Bytes(b) if &b[..] == b"ELF!"));
        assert_eq!((config.vcpus, config.memory_mib), (2, 32));
        assert_eq!(config.boot.cmdline, "");
    }

    #[test]
    fn kernel_boot_and_relative_disks_map_to_paths() {
        let mut vm = VmConfig::new("k");
        vm.boot = BootSource::Kernel {
            kernel: "/boot/vmlinux".into(),
            initrd: Some("/boot/initrd".into()),
            cmdline: "console=ttyS0".into(),
        };
        vm.disks = vec![
            DiskConfig {
                path: "root.img".into(),
                read_only: false,
            },
            DiskConfig {
                path: "/abs/data.img".into(),
                read_only: true,
            },
        ];

        let config = partition_config(&vm, Path::new("/store/vms/X/disks"), b"");

        assert!(
            matches!(&config.boot.kernel, KernelImage::Path(p) if p == Path::new("/boot/vmlinux"))
        );
        assert_eq!(
            config.boot.initrd.as_deref(),
            Some(Path::new("/boot/initrd"))
        );
        assert_eq!(config.boot.cmdline, "console=ttyS0");
        assert_eq!(
            config.disks[0].path,
            Path::new("/store/vms/X/disks/root.img")
        );
        assert_eq!(config.disks[1].path, Path::new("/abs/data.img"));
        assert!(config.disks[1].read_only);
    }

    #[test]
    fn guest_exits_map_to_stop_reasons() {
        let reasons = [
            ExitReason::PowerOff,
            ExitReason::Reset,
            ExitReason::TripleFault,
            ExitReason::FailEntry { reason: 7 },
        ]
        .map(|exit| stop_reason(&exit));

        assert_eq!(
            reasons,
            [
                StopReason::GuestPowerOff,
                StopReason::GuestReset,
                StopReason::TripleFault,
                StopReason::GuestCrash {
                    detail: "vm entry failed, reason 0x7".into()
                },
            ]
        );
    }
}
