//! `Msvm_VirtualSystemSnapshotService`'s methods over vmm-core's checkpoint operations:
//! `CreateSnapshot`, `ApplySnapshot`, `DestroySnapshot`, `DestroySnapshotTree`, each starting a
//! job (4096 and a `Job` reference) or answering with vmm-core's return code; and the management
//! service's methods that act on checkpoints and exports: `ModifySystemSettings` of a
//! checkpoint's settings (its name), `ExportSystemDefinition`, `ImportSystemDefinition`.

use vmm_core::checkpoint::{CheckpointId, CheckpointType, CreateRequest};
use vmm_core::{JobId, ReturnCode, VmId, return_code};

use super::Provider;
use super::args::{Args, TypedArg};
use crate::cimxml::{MethodOutput, OutValue};
use crate::error::{CimError, CimResult, CimStatus};
use crate::model::{ConcreteJob, SnapshotSettingData};
use crate::path::ObjectPath;

/// `SnapshotType` of `CreateSnapshot`: 2 is a full checkpoint (the only kind Hyper-V's own
/// tools ask for besides 32768, the recovery checkpoints of backups).
const FULL_SNAPSHOT: i128 = 2;

/// `Msvm_VirtualSystemSnapshotSettingData.ConsistencyLevel` 1: application consistent, i.e. a
/// production checkpoint.
const APPLICATION_CONSISTENT: i128 = 1;

fn bad(message: impl Into<String>) -> CimError {
    CimError::new(CimStatus::InvalidParameter, message)
}

fn job_started((code, job): (ReturnCode, Option<JobId>)) -> MethodOutput {
    MethodOutput {
        return_value: code.code(),
        outputs: job
            .map(|j| vec![("Job", OutValue::Reference(ConcreteJob::path_of(j)))])
            .unwrap_or_default(),
    }
}

fn answer(result: vmm_core::Result<(ReturnCode, Option<JobId>)>) -> MethodOutput {
    match result {
        Ok(started) => job_started(started),
        Err(error) => MethodOutput {
            return_value: return_code(&error).code(),
            outputs: Vec::new(),
        },
    }
}

impl Provider {
    /// Dispatches one snapshot-service method.
    pub(crate) fn snapshot_service(&self, method: &str, args: &Args) -> CimResult<MethodOutput> {
        match method {
            "CreateSnapshot" => self.create_snapshot(args),
            "ApplySnapshot" => {
                let (vm, checkpoint) = self.snapshot_arg(args, "Snapshot")?;
                Ok(answer(
                    self.vmms.apply_snapshot(vm, &checkpoint.to_string()),
                ))
            }
            "DestroySnapshot" => {
                let (vm, checkpoint) = self.snapshot_arg(args, "AffectedSnapshot")?;
                Ok(answer(self.vmms.destroy_snapshot(
                    vm,
                    &checkpoint.to_string(),
                    false,
                )))
            }
            "DestroySnapshotTree" => {
                let (vm, checkpoint) = self.snapshot_arg(args, "SnapshotSettingData")?;
                Ok(answer(self.vmms.destroy_snapshot(
                    vm,
                    &checkpoint.to_string(),
                    true,
                )))
            }
            other => Err(CimError::new(
                CimStatus::MethodNotAvailable,
                format!("{other} is not implemented"),
            )),
        }
    }

    fn create_snapshot(&self, args: &Args) -> CimResult<MethodOutput> {
        let TypedArg::Reference(system) = args.get("AffectedSystem") else {
            return Err(bad("AffectedSystem is required"));
        };
        let Some(vm) = system.key("Name").and_then(|n| n.parse::<VmId>().ok()) else {
            return Ok(job_started((ReturnCode::InvalidParameter, None)));
        };
        match args.get("SnapshotType") {
            TypedArg::Null => {}
            TypedArg::Integer(FULL_SNAPSHOT) => {}
            TypedArg::Integer(_) => return Ok(job_started((ReturnCode::NotSupported, None))),
            _ => return Err(bad("SnapshotType must be an integer")),
        }
        let checkpoint_type = match args.get("SnapshotSettings") {
            TypedArg::Instance(settings)
                if settings.get_int("ConsistencyLevel") == Some(APPLICATION_CONSISTENT) =>
            {
                CheckpointType::Production
            }
            TypedArg::Instance(_) | TypedArg::Null => CheckpointType::Standard,
            _ => return Err(bad("SnapshotSettings must be an embedded instance")),
        };
        let request = CreateRequest {
            name: None,
            checkpoint_type,
        };
        Ok(answer(self.vmms.create_snapshot(vm, request)))
    }

    /// `ModifySystemSettings` on a checkpoint's settings: renames it (`ElementName`, the only
    /// property of a checkpoint that may change). `None` when the instance is not a checkpoint's.
    pub(crate) fn modify_snapshot_settings(
        &self,
        settings: &crate::instance::Instance,
    ) -> Option<CimResult<MethodOutput>> {
        let id = settings.get_str("InstanceID")?;
        let (vm, checkpoint) = self.snapshot_of(&SnapshotSettingData::path_of(
            SnapshotSettingData::checkpoint_of(id)?,
        ))?;
        let Some(name) = settings.get_str("ElementName") else {
            return Some(Err(bad("ElementName is required to rename a checkpoint")));
        };
        let code = match self.vmms.rename_snapshot(vm, &checkpoint.to_string(), name) {
            Ok(()) => ReturnCode::Completed,
            Err(error) => return_code(&error),
        };
        Some(Ok(job_started((code, None))))
    }

    /// `ExportSystemDefinition`: the VM (Off or Saved) with its checkpoints into
    /// `ExportDirectory/<VM name>`, as `Export-VM -Path` lays it out.
    pub(crate) fn export_system(&self, args: &Args) -> CimResult<MethodOutput> {
        let TypedArg::Reference(system) = args.get("ComputerSystem") else {
            return Err(bad("ComputerSystem is required"));
        };
        let TypedArg::String(directory) = args.get("ExportDirectory") else {
            return Err(bad("ExportDirectory is required"));
        };
        let Some(vm) = system.key("Name").and_then(|n| n.parse::<VmId>().ok()) else {
            return Ok(job_started((ReturnCode::InvalidParameter, None)));
        };
        let name = match self.vmms.get_vm(vm) {
            Ok(found) => found.name,
            Err(error) => return Ok(job_started((return_code(&error), None))),
        };
        let target = std::path::Path::new(directory).join(name);
        Ok(answer(self.vmms.export_system(
            vm,
            target,
            vmm_core::checkpoint::ExportMode::Chained,
        )))
    }

    /// `ImportSystemDefinition`: imports an export folder (`SystemDefinitionFile` names the
    /// folder or its `config.json`); synchronous, so 0 and the imported VM's settings.
    pub(crate) fn import_system(&self, args: &Args) -> CimResult<MethodOutput> {
        let TypedArg::String(file) = args.get("SystemDefinitionFile") else {
            return Err(bad("SystemDefinitionFile is required"));
        };
        let path = std::path::Path::new(file);
        let folder = if path.is_file() {
            path.parent().unwrap_or(path)
        } else {
            path
        };
        let mode = match args.get("GenerateNewSystemIdentifier") {
            TypedArg::Boolean(true) => vmm_core::checkpoint::ImportMode::NewId,
            _ => vmm_core::checkpoint::ImportMode::SameId,
        };
        Ok(match self.vmms.import_system(folder, mode) {
            Ok(vm) => MethodOutput {
                return_value: ReturnCode::Completed.code(),
                outputs: vec![(
                    "ImportedSystem",
                    OutValue::Reference(crate::model::VirtualSystemSettingData::path_of(vm)),
                )],
            },
            Err(error) => job_started((return_code(&error), None)),
        })
    }

    /// The VM and checkpoint a snapshot settings reference names.
    fn snapshot_arg(&self, args: &Args, name: &str) -> CimResult<(VmId, CheckpointId)> {
        let TypedArg::Reference(path) = args.get(name) else {
            return Err(bad(format!("{name} is required")));
        };
        self.snapshot_of(path)
            .ok_or_else(|| bad(format!("{name} is not a checkpoint: {path}")))
    }

    fn snapshot_of(&self, path: &ObjectPath) -> Option<(VmId, CheckpointId)> {
        let id = path
            .key("InstanceID")
            .and_then(SnapshotSettingData::checkpoint_of)?;
        let view = self.view();
        view.checkpoints(self)
            .iter()
            .find(|s| s.checkpoint.id == id)
            .map(|s| (s.vm, id))
    }
}
