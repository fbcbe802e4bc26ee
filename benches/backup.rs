//! Online backup through the service (vmm-core's job, the vss-writer session, worker-manager's
//! worker and the test guest's agent on COM2), end to end as a daemon runs it:
//!
//! - `backup_freeze_window`: how long the guest's file systems stay frozen for a backup (the
//!   agent's freeze answered → capture → thaw answered), as the session measures it. Target
//!   ≤ 100 ms; VSS allows 10 s.
//! - `backup_full/64MiB`: a full backup of a running guest's 64 MiB disk holding 60 MiB of records, against
//!   `cp` of the same image file (`std::fs::copy`) in the same run; bytes per second.
//! - The incremental's bytes ratio (bytes copied / bytes the guest wrote since the last backup)
//!   is printed once, for 256 records written after a full backup.
//!
//! Like the reference binary, this bench re-executes itself as the worker.
#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use vmm_core::backup::{BackupReport, BackupRequest};
use vmm_core::{DiskConfig, RequestedState, VirtualSystemManagementService, VmConfig, VmId};
use worker_manager::{ProcessLauncher, StoreLayout};

const JOB_TIMEOUT: Duration = Duration::from_secs(300);
const DISK_MIB: u64 = 64;
/// Records the guest writes before the first backup: 60 MiB of the disk, leaving room for the
/// incremental's 256.
const RECORDS: u64 = 15 * 1024;

#[path = "common/worker_process.rs"]
mod worker_process;

fn main() -> ExitCode {
    if let Some(code) = worker_process::run_worker_or_skip() {
        return code;
    }
    let mut criterion = Criterion::default().configure_from_args();
    let service = Service::new();
    let vm = service.running_vm_with_disk();
    freeze_window(&mut criterion, &service, vm);
    full_backup(&mut criterion, &service, vm);
    incremental_ratio(&service, vm);
    service.change(vm, RequestedState::TurnOff);
    criterion.final_summary();
    ExitCode::SUCCESS
}

/// A service on a temporary store whose workers are this executable.
struct Service {
    _dir: tempfile::TempDir,
    store: PathBuf,
    sets: PathBuf,
    vmms: VirtualSystemManagementService,
    taken: std::cell::Cell<u64>,
}

impl Service {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let sets = dir.path().join("sets");
        std::fs::create_dir_all(&sets).unwrap();
        let exe = std::env::current_exe().unwrap();
        let launcher = Arc::new(ProcessLauncher::new(&store, exe, ["worker"]));
        let vmms = VirtualSystemManagementService::open(&store, launcher).unwrap();
        vmms.set_snapshot_service(Arc::new(snapshot::FolderSnapshotService));
        vmms.set_backup_service(Arc::new(vss_writer::VssWriter::new()));
        Service {
            _dir: dir,
            store,
            sets,
            vmms,
            taken: std::cell::Cell::new(0),
        }
    }

    /// A running test guest with a 64 MiB qcow2 disk it has filled with records.
    fn running_vm_with_disk(&self) -> VmId {
        let mut config = VmConfig::new("bench");
        config.disks.push(DiskConfig {
            path: "disk0.qcow2".into(),
            read_only: false,
        });
        let vm = self.vmms.define_system(config).unwrap();
        let disk = self.disk(vm);
        snapshot::create_qcow2(&disk, DISK_MIB << 20).unwrap();
        self.change(vm, RequestedState::Start);
        self.console(vm, &format!("write {RECORDS}"), "records, total");
        vm
    }

    fn disk(&self, vm: VmId) -> PathBuf {
        self.store
            .join("vms")
            .join(vm.to_string())
            .join("disks/disk0.qcow2")
    }

    fn finish(&self, started: vmm_core::Result<(vmm_core::ReturnCode, Option<vmm_core::JobId>)>) {
        let (code, job) = started.unwrap();
        let job = job.unwrap_or_else(|| panic!("refused: {code:?}"));
        let job = self.vmms.wait_for_job(job, JOB_TIMEOUT).unwrap();
        assert!(job.state.is_success(), "{job:?}");
    }

    fn change(&self, vm: VmId, requested: RequestedState) {
        self.finish(self.vmms.request_state_change(vm, requested));
    }

    /// One backup into a new set of the shared folder; what it reported.
    fn backup(&self, vm: VmId, incremental: bool) -> BackupReport {
        self.taken.set(self.taken.get() + 1);
        let set = self.sets.join(format!("set{}", self.taken.get()));
        let mut request = BackupRequest::new(&set);
        request.incremental = incremental;
        self.finish(self.vmms.backup_system(vm, request));
        self.vmms.describe_backup(&set).unwrap().report
    }

    /// Types `command` on the console and waits for `answer`.
    fn console(&self, vm: VmId, command: &str, answer: &str) {
        let socket = StoreLayout::new(&self.store).runtime(vm).console_socket();
        let mut console = UnixStream::connect(socket).unwrap();
        console
            .write_all(format!("\r{command}\r").as_bytes())
            .unwrap();
        let deadline = Instant::now() + JOB_TIMEOUT;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains(answer) {
            assert!(Instant::now() < deadline, "no {answer:?} after {command:?}");
            let n = console.read(&mut buf).unwrap();
            seen.extend_from_slice(&buf[..n]);
        }
    }
}

fn freeze_window(c: &mut Criterion, service: &Service, vm: VmId) {
    service.backup(vm, false);
    let mut group = c.benchmark_group("backup_freeze_window");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("incremental_of_a_running_guest", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let report = service.backup(vm, true);
                    report.freeze_window.expect("the agent froze the guest")
                })
                .sum()
        });
    });
    group.finish();
}

fn full_backup(c: &mut Criterion, service: &Service, vm: VmId) {
    let bytes = RECORDS * 4096;
    let mut group = c.benchmark_group("backup_full");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Bytes(bytes));
    group.bench_function(format!("{DISK_MIB}MiB/vss_writer"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let report = service.backup(vm, false);
                total += start.elapsed();
                assert!(report.bytes_copied >= bytes);
            }
            total
        });
    });
    let disk = service.disk(vm);
    let copy = service.sets.join("cp.qcow2");
    group.bench_function(format!("{DISK_MIB}MiB/cp"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                std::fs::copy(&disk, &copy).unwrap();
                std::fs::File::open(&copy).unwrap().sync_all().unwrap();
                total += start.elapsed();
                std::fs::remove_file(&copy).unwrap();
            }
            total
        });
    });
    group.finish();
}

fn incremental_ratio(service: &Service, vm: VmId) {
    service.backup(vm, false);
    service.console(vm, "write 256", "records, total");
    let report = service.backup(vm, true);
    let written = 256 * 4096;
    eprintln!(
        "backup_incremental_ratio: {} bytes copied for {written} bytes written: {:.3}",
        report.bytes_copied,
        report.bytes_copied as f64 / written as f64
    );
}
