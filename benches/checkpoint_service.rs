//! Checkpoints through the service (vmm-core's operations, the snapshot crate's files,
//! worker-manager's worker processes), end to end as a daemon runs them:
//!
//! - `restore_to_first_byte/<MiB>`: ApplySnapshot of a standard checkpoint, then start (the
//!   worker restores the checkpoint's memory), until the guest answers on its console; at 64,
//!   256 and 1024 MiB of guest memory. The target is a restore that stays flat as memory grows.
//! - `create_running/<MiB>`: CreateSnapshot of a running VM (pre-copy, pause, overlay switch,
//!   commit) as the job reports it, at the same sizes.
//!
//! Like the reference binary, this bench re-executes itself as the worker.
#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use vmm_core::checkpoint::{CheckpointType, CreateRequest};
use vmm_core::{JobState, RequestedState, VirtualSystemManagementService, VmConfig, VmId};
use worker_manager::{ProcessLauncher, StoreLayout};

const JOB_TIMEOUT: Duration = Duration::from_secs(120);
const SIZES_MIB: [u64; 3] = [64, 256, 1024];

#[path = "common/worker_process.rs"]
mod worker_process;

fn main() -> ExitCode {
    if let Some(code) = worker_process::run_worker_or_skip() {
        return code;
    }
    let mut criterion = Criterion::default().configure_from_args();
    restore_to_first_byte(&mut criterion);
    create_running(&mut criterion);
    criterion.final_summary();
    ExitCode::SUCCESS
}

/// A service on a temporary store whose workers are this executable.
struct Service {
    _dir: tempfile::TempDir,
    store: std::path::PathBuf,
    vmms: VirtualSystemManagementService,
}

impl Service {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().to_path_buf();
        let exe = std::env::current_exe().unwrap();
        let launcher = Arc::new(ProcessLauncher::new(&store, exe, ["worker"]));
        let vmms = VirtualSystemManagementService::open(&store, launcher).unwrap();
        vmms.set_snapshot_service(Arc::new(snapshot::FolderSnapshotService));
        Service {
            _dir: dir,
            store,
            vmms,
        }
    }

    fn define(&self, name: &str, memory_mib: u64) -> VmId {
        let mut config = VmConfig::new(name);
        config.memory_mib = memory_mib;
        self.vmms.define_system(config).unwrap()
    }

    fn finish(&self, started: vmm_core::Result<(vmm_core::ReturnCode, Option<vmm_core::JobId>)>) {
        let (code, job) = started.unwrap();
        let job = job.unwrap_or_else(|| panic!("refused: {code:?}"));
        let job = self.vmms.wait_for_job(job, JOB_TIMEOUT).unwrap();
        assert_eq!(job.state, JobState::Completed, "{job:?}");
    }

    fn change(&self, vm: VmId, requested: RequestedState) {
        self.finish(self.vmms.request_state_change(vm, requested));
    }

    fn checkpoint(&self, vm: VmId, name: &str) {
        let request = CreateRequest {
            name: Some(name.into()),
            checkpoint_type: CheckpointType::Standard,
        };
        self.finish(self.vmms.create_snapshot(vm, request));
    }

    /// Types a return on the console and waits for the guest's first byte back.
    fn first_byte(&self, vm: VmId) {
        let socket = StoreLayout::new(&self.store).runtime(vm).console_socket();
        let mut console = UnixStream::connect(socket).unwrap();
        console.write_all(b"\r").unwrap();
        let mut byte = [0u8; 1];
        console.read_exact(&mut byte).unwrap();
    }
}

fn restore_to_first_byte(c: &mut Criterion) {
    let mut group = c.benchmark_group("checkpoint_restore_to_first_byte");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    for mib in SIZES_MIB {
        let service = Service::new();
        let vm = service.define("bench", mib);
        service.change(vm, RequestedState::Start);
        service.first_byte(vm);
        service.change(vm, RequestedState::Save);
        service.checkpoint(vm, "base");
        group.bench_function(format!("{mib}MiB"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    service.finish(service.vmms.apply_snapshot(vm, "base"));
                    service.change(vm, RequestedState::Start);
                    service.first_byte(vm);
                    total += start.elapsed();
                    service.change(vm, RequestedState::TurnOff);
                }
                total
            });
        });
    }
    group.finish();
}

fn create_running(c: &mut Criterion) {
    let mut group = c.benchmark_group("checkpoint_create_running");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    for mib in SIZES_MIB {
        let service = Service::new();
        let vm = service.define("bench", mib);
        service.change(vm, RequestedState::Start);
        service.first_byte(vm);
        let mut n = 0u64;
        group.bench_function(format!("{mib}MiB"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    n += 1;
                    let start = Instant::now();
                    service.checkpoint(vm, &format!("cp{n}"));
                    total += start.elapsed();
                }
                total
            });
        });
        service.change(vm, RequestedState::TurnOff);
    }
    group.finish();
}
