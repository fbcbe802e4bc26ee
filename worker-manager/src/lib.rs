//! Hyper-V's Worker Process Manager: one worker process (`vmwp.exe`) per running virtual machine.
//!
//! VMMS never runs a guest in its own process. For every running VM it starts a worker process
//! that owns the VM's [`Partition`](partition::Partition), and drives it over a control
//! connection; a crash or hang of one guest's worker takes down that VM only, and workers outlive
//! the service, so the daemon can be restarted or upgraded under running VMs. This crate is both
//! halves:
//!
//! - **Parent side** — [`ProcessLauncher`] implements vmm-core's [`WorkerLauncher`] and hands out
//!   [`ProcessWorker`]s ([`Worker`]): it spawns `program args… --vm <GUID> --store <DIR>
//!   [--restore <DIR>]` in a session of its own, waits for it to report ready, connects to its
//!   control socket, and supervises it — exit seen at once through a pidfd (also for workers
//!   re-attached after a daemon restart, which are not its children), hangs through a heartbeat.
//!   Every end reaches the service once, as a [`StopReason`](vmm_core::StopReason). It keeps
//!   a small pool of workers started and idle ([`LauncherOptions::pool_size`]), so that a VM's
//!   start does not wait for a process to be spawned: an idle worker gets the VM's lock and log
//!   over a socket pair, confines itself for that VM and starts it as a spawned one does, and
//!   the pair becomes its control connection; idle workers exit when their launcher goes away.
//! - **Worker side** — [`worker::run`] is the whole life of a worker process: read the VM's
//!   `config.json`, build or restore the partition, serve `control.sock` and `console.sock` in
//!   `<store>/run/<GUID>/`, write the pid file, run the guest until told to save or turn off.
//!   Disks are opened through the `snapshot` crate (raw or qcow2 with backing chains, QEMU-style
//!   locks) before the worker confines itself. A worker takes checkpoints of its running guest
//!   ([`Request::Checkpoint`](protocol::Request::Checkpoint)): memory pre-copied with the dirty
//!   log while the guest runs, then one short pause that copies the last pages, captures the
//!   state, switches each disk to a new qcow2 overlay and commits the state folder; a second
//!   checkpoint writes a delta layer ([`MemoryManifest`]). For a backup it captures the disks
//!   ([`Request::BackupCapture`](protocol::Request::BackupCapture): overlays switched in one
//!   short pause, the changed-block maps taken) and merges them back while the guest runs
//!   ([`Request::BackupMerge`](protocol::Request::BackupMerge)); the maps and their reference
//!   point persist in the VM's `change-tracking.json` across clean stops (Resilient Change
//!   Tracking), and are not believed after a worker that did not end cleanly.
//! - **Between them** — [`protocol`]: length-delimited JSON frames with a version handshake,
//!   request ids, replies and unsolicited notices; [`ControlClient`] is the parent's end of it.
//!   The console is a separate socket carrying COM1's raw bytes both ways.
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use vmm_core::{RequestedState, VirtualSystemManagementService, VmConfig};
//! use worker_manager::ProcessLauncher;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // This program re-executes itself as `<exe> worker --vm … --store …` for each VM; its
//! // `worker` role calls `worker_manager::worker::run(WorkerOptions { .. })`.
//! let launcher = ProcessLauncher::new("./vmms-data", std::env::current_exe()?, ["worker"]);
//! let vmms = VirtualSystemManagementService::open("./vmms-data", Arc::new(launcher))?;
//! vmms.recover_on_start(); // re-attaches workers that outlived the previous daemon
//!
//! let vm = vmms.define_system(VmConfig::new("web1"))?;
//! let (_, job) = vmms.request_state_change(vm, RequestedState::Start)?;
//! if let Some(job) = job {
//!     vmms.wait_for_job(job, Duration::from_secs(30))?;
//! }
//! println!("worker pid {:?}", vmms.get_vm(vm)?.process_id);
//! # Ok(())
//! # }
//! ```

mod client;
mod error;
pub mod guest_agent;
mod launcher;
mod pool;
mod process;
pub mod protocol;
mod runtime;
mod supervisor;
pub mod worker;
mod worker_lock;

pub use client::ControlClient;
pub use error::{Error, Result};
pub use launcher::{LauncherOptions, ProcessLauncher};
pub use runtime::{RuntimeDir, StoreLayout};
pub use supervisor::ProcessWorker;
pub use vmm_core::{Worker, WorkerLauncher};
pub use worker::{MAX_MEMORY_LAYERS, MEMORY_FILE, MEMORY_MANIFEST, MemoryManifest, STATE_FILE};
pub use worker_lock::{LOCK_FD_ENV, WorkerLock};
