//! VMMS — Hyper-V's Virtual Machine Management Service — rebuilt as an embeddable library.
//!
//! This crate is the part of `vmms.exe` that owns virtual machines as objects: the catalog of
//! defined VMs persisted as `config.json` files (the `.vmcx` analog), each VM's state machine with
//! Hyper-V's `EnabledState` codes, `RequestStateChange` with its return codes, asynchronous jobs
//! (`Msvm_ConcreteJob`), events, and the reactions to workers that fail (HealthState 25 and the
//! automatic recovery action). It runs no VM itself: it drives worker processes through the
//! [`WorkerLauncher`] and [`Worker`] traits, which the worker-manager crate implements (and an
//! integrator may implement over anything else). It uses plain threads and channels, no async
//! runtime.
//!
//! Main types:
//! - [`VirtualSystemManagementService`]: the service (`DefineSystem`, `DestroySystem`,
//!   `ModifySystemSettings`, `RequestStateChange`, queries, jobs, events, start-up recovery).
//! - [`VmConfig`]: a VM's definition; [`ComputerSystem`]: a VM as clients see it.
//! - [`EnabledState`], [`RequestedState`], [`ReturnCode`], [`HealthState`],
//!   [`OperationalStatus`] and the pure [`transition`] table.
//! - [`Job`] / [`JobState`]; [`Event`] / [`EventKind`].
//! - [`return_code`]: the one mapping from an [`Error`] to Hyper-V's return code, for every front end.
//! - [`WorkerLauncher`], [`Worker`], [`EventSink`], [`WorkerEvent`], [`StopReason`]: the seam.
//! - [`Store`]: the on-disk layout; [`atomic_file`]: crash-safe file replacement.
//!
//! ```
//! use std::path::Path;
//! use std::sync::Arc;
//! use std::time::Duration;
//! use vmm_core::{
//!     EnabledState, EventSink, JobState, LaunchMode, RequestedState, ReturnCode,
//!     VirtualSystemManagementService, VmConfig, VmId, Worker, WorkerError, WorkerLauncher,
//!     WorkerStatus,
//! };
//!
//! /// Stands in for worker-manager's process-backed worker: it runs no guest.
//! #[derive(Debug)]
//! struct NoGuest;
//!
//! impl Worker for NoGuest {
//!     fn pid(&self) -> u32 { std::process::id() }
//!     fn status(&self) -> WorkerStatus { WorkerStatus::Running }
//!     fn pause(&self) -> Result<(), WorkerError> { Ok(()) }
//!     fn resume(&self) -> Result<(), WorkerError> { Ok(()) }
//!     fn save(&self, _staging: &Path, _state_dir: &Path) -> Result<(), WorkerError> { Ok(()) }
//!     fn reset(&self) -> Result<(), WorkerError> { Ok(()) }
//!     fn turn_off(&self) -> Result<(), WorkerError> { Ok(()) }
//! }
//!
//! #[derive(Debug)]
//! struct Launcher;
//!
//! impl WorkerLauncher for Launcher {
//!     fn launch(&self, _vm: &VmConfig, _mode: LaunchMode, _events: EventSink)
//!         -> Result<Box<dyn Worker>, WorkerError> {
//!         Ok(Box::new(NoGuest))
//!     }
//!     fn reattach(&self, _vm: VmId, _events: EventSink)
//!         -> Result<Option<Box<dyn Worker>>, WorkerError> {
//!         Ok(None)
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let root = tempfile::tempdir()?;
//! let vmms = VirtualSystemManagementService::open(root.path(), Arc::new(Launcher))?;
//! vmms.recover_on_start();
//!
//! let id = vmms.define_system(VmConfig::new("demo"))?;
//! let (code, job) = vmms.request_state_change(id, RequestedState::Start)?;
//! assert_eq!(code, ReturnCode::JobStarted); // 4096
//!
//! let job = vmms.wait_for_job(job.expect("4096 comes with a job"), Duration::from_secs(10))?;
//! assert_eq!(job.state, JobState::Completed);
//! assert_eq!(vmms.get_vm(id)?.enabled_state, EnabledState::Running);
//!
//! // Starting a running VM is not a valid transition: 32775, and nothing changes.
//! let (code, job) = vmms.request_state_change(id, RequestedState::Start)?;
//! assert_eq!((code.code(), job), (32775, None));
//! # Ok(())
//! # }
//! ```

pub mod atomic_file;
pub mod backup;
mod backup_ops;
mod catalog;
pub mod checkpoint;
mod checkpoint_ops;
mod cluster;
mod config;
mod error;
mod event;
mod event_history;
pub mod fault;
pub mod integration;
mod job;
mod operation;
mod operation_threads;
mod ownership;
mod production_checkpoint;
mod return_code;
mod service;
mod state;
mod store;
mod supervision;
mod worker;

pub use backup::{BackupError, VirtualSystemBackupService};
pub use catalog::ComputerSystem;
pub use checkpoint::{CheckpointError, VirtualSystemSnapshotService};
pub use cluster::{ClusterCoordinator, FENCE_FILE};
pub use config::{
    AutomaticRecoveryAction, AutomaticStartAction, BootSource, CONFIG_VERSION, ConfigError,
    DiskConfig, MAX_CMDLINE_LEN, MAX_MEMORY_MIB, MAX_NAME_LEN, MIN_MEMORY_MIB, VmConfig, VmId,
    validate_name, validate_new_name,
};
pub use error::{Error, Result, error_chain};
pub use event::{Event, EventKind};
pub use event_history::EventHistory;
pub use job::{JOB_RETENTION, Job, JobId, JobKind, JobState};
pub use return_code::return_code;
pub use service::{
    MAX_RECOVERY_RESTARTS, RECOVERY_WINDOW, StartupReport, VirtualSystemManagementService,
};
pub use state::{
    EnabledState, HealthState, OperationalStatus, RequestedState, ReturnCode, Transition,
    TransitionAction, available_requests, transition,
};
pub use store::Store;
pub use worker::{
    CheckpointContent, CheckpointReport, CheckpointRequest, DiskOverlay, EventSink, LaunchMode,
    StopReason, Worker, WorkerError, WorkerEvent, WorkerLauncher, WorkerStatus,
};
