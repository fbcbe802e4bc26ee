//! The service's rules around checkpoint operations, over a snapshot service that only records
//! what it is asked (the `snapshot` crate's real one is tested through the daemon): a service
//! without one says so, and in a cluster a node that does not own the VM changes nothing.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::ThreadLauncher;
use vmm_core::checkpoint::{
    Checkpoint, CheckpointError, CheckpointId, CheckpointTree, CheckpointType, Consistency,
    CreateRequest, ExportMode, ImportMode, Progress, Recovery, RunningCapture, RunningCheckpoint,
    VirtualSystemSnapshotService,
};
use vmm_core::{
    ClusterCoordinator, Error, JobState, VirtualSystemManagementService, VmConfig, VmId,
};

/// Records the operations it is asked for; creates always succeed.
#[derive(Debug, Default)]
struct Recording {
    calls: Mutex<Vec<&'static str>>,
}

impl Recording {
    fn called(&self, what: &'static str) {
        self.calls.lock().expect("calls").push(what);
    }

    fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().expect("calls").clone()
    }
}

fn checkpoint(request: &CreateRequest) -> Checkpoint {
    Checkpoint {
        id: CheckpointId::new_random(),
        name: request.name.clone().unwrap_or_else(|| "cp".into()),
        parent: None,
        created: SystemTime::now(),
        requested_type: request.checkpoint_type,
        consistency: Consistency::Off,
        has_saved_state: false,
        quiesce_failure: None,
    }
}

impl VirtualSystemSnapshotService for Recording {
    fn create_snapshot(
        &self,
        _vm_dir: &Path,
        request: &CreateRequest,
        _progress: &mut dyn Progress,
    ) -> Result<Checkpoint, CheckpointError> {
        self.called("create");
        Ok(checkpoint(request))
    }
    fn prepare_running_snapshot(
        &self,
        _vm_dir: &Path,
        _request: &CreateRequest,
        _capture: &RunningCapture,
    ) -> Result<RunningCheckpoint, CheckpointError> {
        self.called("prepare");
        Err(CheckpointError::InvalidState("not in this test".into()))
    }
    fn finish_running_snapshot(
        &self,
        _vm_dir: &Path,
        _running: &RunningCheckpoint,
    ) -> Result<Checkpoint, CheckpointError> {
        self.called("finish");
        Err(CheckpointError::InvalidState("not in this test".into()))
    }
    fn apply_snapshot(
        &self,
        _vm_dir: &Path,
        _id: CheckpointId,
        _progress: &mut dyn Progress,
    ) -> Result<(), CheckpointError> {
        self.called("apply");
        Ok(())
    }
    fn destroy_snapshot(
        &self,
        _vm_dir: &Path,
        _id: CheckpointId,
        _progress: &mut dyn Progress,
    ) -> Result<(), CheckpointError> {
        self.called("destroy");
        Ok(())
    }
    fn destroy_snapshot_tree(
        &self,
        _vm_dir: &Path,
        _id: CheckpointId,
        _progress: &mut dyn Progress,
    ) -> Result<(), CheckpointError> {
        self.called("destroy-tree");
        Ok(())
    }
    fn rename_snapshot(
        &self,
        _vm_dir: &Path,
        _id: CheckpointId,
        _name: &str,
    ) -> Result<(), CheckpointError> {
        self.called("rename");
        Ok(())
    }
    fn snapshots(&self, _vm_dir: &Path) -> Result<CheckpointTree, CheckpointError> {
        Ok(CheckpointTree::default())
    }
    fn export(
        &self,
        _vm_dir: &Path,
        _target: &Path,
        _mode: ExportMode,
        _progress: &mut dyn Progress,
    ) -> Result<(), CheckpointError> {
        self.called("export");
        Ok(())
    }
    fn import(
        &self,
        _source: &Path,
        _vms_dir: &Path,
        _mode: ImportMode,
        _progress: &mut dyn Progress,
    ) -> Result<VmId, CheckpointError> {
        self.called("import");
        Err(CheckpointError::InvalidParameter("not in this test".into()))
    }
    fn create_disk(&self, _path: &Path, _size: u64) -> Result<(), CheckpointError> {
        self.called("create-disk");
        Ok(())
    }
    fn recover(&self, _vm_dir: &Path) -> Result<Recovery, CheckpointError> {
        Ok(Recovery::Clean)
    }
}

/// Allows writes about no VM (another node owns them all).
#[derive(Debug)]
struct OwnsNothing;

impl ClusterCoordinator for OwnsNothing {
    fn guard_write(&self, _vm: VmId) -> Result<(), String> {
        Err("owned by node b".into())
    }
}

fn standard(name: &str) -> CreateRequest {
    CreateRequest {
        name: Some(name.into()),
        checkpoint_type: CheckpointType::Standard,
    }
}

#[test]
fn checkpoints_without_a_snapshot_service_are_not_supported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = common::open(dir.path(), &launcher);
    let vm = vmms.define_system(VmConfig::new("plain")).expect("define");

    let refused = vmms.create_snapshot(vm, standard("cp"));

    assert!(
        matches!(refused, Err(Error::NoSnapshotService)),
        "{refused:?}"
    );
    assert_eq!(
        vmm_core::return_code(&Error::NoSnapshotService).code(),
        32770
    );
}

#[test]
fn a_node_that_does_not_own_the_vm_changes_none_of_its_checkpoints() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vm = {
        let launcher = ThreadLauncher::default();
        let vmms = common::open(dir.path(), &launcher);
        vmms.define_system(VmConfig::new("theirs")).expect("define")
    };
    let launcher = Arc::new(ThreadLauncher::default());
    let vmms =
        VirtualSystemManagementService::open_clustered(dir.path(), launcher, Arc::new(OwnsNothing))
            .expect("clustered service");
    let recording = Arc::new(Recording::default());
    vmms.set_snapshot_service(recording.clone());

    let (code, job) = vmms.create_snapshot(vm, standard("cp")).expect("begun");
    let job = vmms
        .wait_for_job(job.expect("job"), Duration::from_secs(10))
        .expect("job ends");
    let disk = vmms.create_disk(vm, "disk0.qcow2", 1 << 20);

    assert_eq!(code.code(), 4096);
    assert_eq!(job.state, JobState::Exception);
    assert!(
        job.error_description
            .as_deref()
            .unwrap_or("")
            .contains("owned by node b"),
        "{job:?}"
    );
    assert!(disk.is_err());
    assert!(recording.calls().is_empty(), "{:?}", recording.calls());
}

fn of_type(name: &str, checkpoint_type: CheckpointType) -> CreateRequest {
    CreateRequest {
        name: Some(name.into()),
        checkpoint_type,
    }
}

#[test]
fn production_only_of_a_running_guest_that_cannot_be_quiesced_fails_before_anything_is_made() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = common::open(dir.path(), &launcher);
    let recording = Arc::new(Recording::default());
    vmms.set_snapshot_service(recording.clone());
    let vm = vmms.define_system(VmConfig::new("mute")).expect("define");
    common::change(&vmms, vm, vmm_core::RequestedState::Start);

    let (_, only) = vmms
        .create_snapshot(vm, of_type("only", CheckpointType::ProductionOnly))
        .expect("begun");
    let only = vmms
        .wait_for_job(only.expect("job"), Duration::from_secs(10))
        .expect("job ends");
    let calls_after_only = recording.calls();
    let (_, fallback) = vmms
        .create_snapshot(vm, of_type("prod", CheckpointType::Production))
        .expect("begun");
    vmms.wait_for_job(fallback.expect("job"), Duration::from_secs(10))
        .expect("job ends");

    // The test launcher's workers have no integration channel: no agent can freeze the guest.
    assert_eq!(only.state, JobState::Exception);
    assert_eq!(only.error_code, 32775);
    let why = only.error_description.unwrap_or_default();
    assert!(why.contains("quiescing the guest failed"), "{why}");
    assert!(calls_after_only.is_empty(), "{calls_after_only:?}");
    assert_eq!(recording.calls(), ["prepare"], "production falls back");
    assert_eq!(common::state_of(&vmms, vm), vmm_core::EnabledState::Running);
}
