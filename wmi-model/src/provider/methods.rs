//! Extrinsic methods: `RequestStateChange`, the management service's methods (the snapshot
//! service's are in `snapshot_methods`). Each answers as Hyper-V does: `ReturnValue` 0 when done, 4096 with a job
//! reference when a job runs, or a return code from vmm-core's [`return_code`].

use vmm_core::{RequestedState, ReturnCode, VmConfig, VmId, return_code};

use super::Provider;
use super::args::{Args, TypedArg};
use crate::cimxml::{Arg, MethodOutput, OutValue};
use crate::error::{CimError, CimResult, CimStatus};
use crate::model::{
    CimObject, ComputerSystem, ConcreteJob, ResourceSettings, ShutdownComponent,
    StorageAllocationSettingData, SummaryInformation, SystemSettings, VirtualSystemSettingData,
};
use crate::path::ObjectPath;
use crate::schema::Namespace;

fn done(code: ReturnCode) -> MethodOutput {
    MethodOutput {
        return_value: code.code(),
        outputs: Vec::new(),
    }
}

fn failed(error: &vmm_core::Error) -> MethodOutput {
    done(return_code(error))
}

fn bad(message: impl Into<String>) -> CimError {
    CimError::new(CimStatus::InvalidParameter, message)
}

/// The VM a `Msvm_ComputerSystem` path names (`None` for the host or anything else).
fn vm_of_system(path: &ObjectPath) -> Option<VmId> {
    path.key("Name").and_then(|n| n.parse().ok())
}

impl Provider {
    /// Invokes `method` on `target` (an instance path, or a class path for the singleton
    /// services).
    pub fn invoke(
        &self,
        namespace: Namespace,
        target: &ObjectPath,
        method: &str,
        params: &[(String, Arg)],
    ) -> CimResult<MethodOutput> {
        let decl = self.class(namespace, &target.class)?;
        let method_decl = decl.method(method).ok_or_else(|| {
            CimError::new(
                CimStatus::MethodNotFound,
                format!("class {} has no method {method}", decl.name),
            )
        })?;
        let args = Args::check(method_decl, params)?;
        if !target.keys.is_empty() && decl.name != "Msvm_ShutdownComponent" {
            // The target must exist (a class path is fine for the singleton services).
            self.get(namespace, target)?;
        }
        match (decl.name, method_decl.name) {
            ("Msvm_ComputerSystem", "RequestStateChange") => {
                self.request_state_change(target, &args)
            }
            ("Msvm_ShutdownComponent", "InitiateShutdown") => self.initiate_shutdown(target, &args),
            ("Msvm_VirtualEthernetSwitchManagementService", name) => {
                self.switch_management(name, &args)
            }
            ("Msvm_VirtualSystemManagementService", name) => self.management(name, &args),
            ("Msvm_VirtualSystemSnapshotService", name) => self.snapshot_service(name, &args),
            _ => Err(CimError::new(
                CimStatus::MethodNotAvailable,
                format!("{}.{} is not implemented", decl.name, method_decl.name),
            )),
        }
    }

    /// `InitiateShutdown`: the target need not exist any more (the component goes away when
    /// the VM stops), so a stopped VM gets 32775 rather than "not found". `Force` and `Reason`
    /// are accepted as Hyper-V does; the guest is turned off anyway after
    /// [`SHUTDOWN_TIMEOUT`](crate::model::SHUTDOWN_TIMEOUT).
    fn initiate_shutdown(&self, target: &ObjectPath, args: &Args) -> CimResult<MethodOutput> {
        let not_found = || CimError::new(CimStatus::NotFound, format!("no instance {target}"));
        let _force = matches!(args.get("Force"), TypedArg::Boolean(true));
        let id = ShutdownComponent::vm_of(target).ok_or_else(not_found)?;
        if !ShutdownComponent::path_of(id).matches(target) {
            return Err(not_found());
        }
        self.vmms.get_vm(id).map_err(|_| not_found())?;
        Ok(
            match self
                .vmms
                .initiate_shutdown(id, crate::model::SHUTDOWN_TIMEOUT)
            {
                Ok((code, job)) => MethodOutput {
                    return_value: code.code(),
                    outputs: job
                        .map(|j| vec![("Job", OutValue::Reference(ConcreteJob::path_of(j)))])
                        .unwrap_or_default(),
                },
                Err(error) => failed(&error),
            },
        )
    }

    fn request_state_change(&self, target: &ObjectPath, args: &Args) -> CimResult<MethodOutput> {
        let TypedArg::Integer(code) = args.get("RequestedState") else {
            return Err(bad("RequestedState is required"));
        };
        let Some(id) = vm_of_system(target) else {
            // The host computer system cannot be started or stopped through WMI.
            return Ok(done(ReturnCode::NotSupported));
        };
        let code = u16::try_from(*code).map_err(|_| bad("RequestedState out of range"))?;
        let requested = match RequestedState::from_code(code) {
            Ok(r) => r,
            Err(refusal) => return Ok(done(refusal)),
        };
        Ok(match self.vmms.request_state_change(id, requested) {
            Ok((code, job)) => MethodOutput {
                return_value: code.code(),
                outputs: job
                    .map(|j| vec![("Job", OutValue::Reference(ConcreteJob::path_of(j)))])
                    .unwrap_or_default(),
            },
            Err(error) => failed(&error),
        })
    }

    fn management(&self, method: &str, args: &Args) -> CimResult<MethodOutput> {
        match method {
            "DefineSystem" => self.define_system(args),
            "DestroySystem" => {
                let TypedArg::Reference(path) = args.get("AffectedSystem") else {
                    return Err(bad("AffectedSystem is required"));
                };
                let Some(id) = vm_of_system(path) else {
                    return Ok(done(ReturnCode::InvalidParameter));
                };
                Ok(match self.vmms.destroy_system(id) {
                    Ok(()) => done(ReturnCode::Completed),
                    Err(error) => failed(&error),
                })
            }
            "ModifySystemSettings" => {
                let TypedArg::Instance(instance) = args.get("SystemSettings") else {
                    return Err(bad("SystemSettings is required"));
                };
                if let Some(renamed) = self.modify_snapshot_settings(instance) {
                    return renamed;
                }
                let settings = SystemSettings::from_instance(instance)?;
                let Some(id) = settings
                    .instance_id
                    .as_deref()
                    .and_then(VirtualSystemSettingData::vm_of)
                else {
                    return Ok(done(ReturnCode::InvalidParameter));
                };
                self.modify(id, |config| settings.apply(config))
                    .map(|(output, _)| output)
            }
            "ModifyResourceSettings" => self.modify_resources(args, None),
            "AddResourceSettings" => {
                let TypedArg::Reference(path) = args.get("AffectedConfiguration") else {
                    return Err(bad("AffectedConfiguration is required"));
                };
                let Some(id) = path
                    .key("InstanceID")
                    .and_then(VirtualSystemSettingData::vm_of)
                else {
                    return Ok(done(ReturnCode::InvalidParameter));
                };
                if let TypedArg::Instances(list) = args.get("ResourceSettings")
                    && Self::is_network_resource(list)
                {
                    return self.add_network_resources(Some(id), list);
                }
                self.modify_resources(args, Some(id))
            }
            "GetSummaryInformation" => self.summary(args),
            "ExportSystemDefinition" => self.export_system(args),
            "ImportSystemDefinition" => self.import_system(args),
            other => Err(CimError::new(
                CimStatus::MethodNotAvailable,
                format!("{other} is not implemented"),
            )),
        }
    }

    fn define_system(&self, args: &Args) -> CimResult<MethodOutput> {
        let mut config = VmConfig::new("New Virtual Machine");
        match args.get("SystemSettings") {
            TypedArg::Instance(instance) => {
                SystemSettings::from_instance(instance)?.apply(&mut config)?
            }
            TypedArg::Null => {}
            _ => return Err(bad("SystemSettings must be an embedded instance")),
        }
        if let TypedArg::Instances(list) = args.get("ResourceSettings") {
            for instance in list {
                ResourceSettings::from_instance(instance)?.apply(&mut config)?;
            }
        }
        if *args.get("ReferenceConfiguration") != TypedArg::Null {
            // Planned / reference configurations are not modelled.
            return Ok(done(ReturnCode::NotSupported));
        }
        Ok(match self.vmms.define_system(config) {
            Ok(id) => MethodOutput {
                return_value: ReturnCode::Completed.code(),
                outputs: vec![(
                    "ResultingSystem",
                    OutValue::Reference(ComputerSystem::path_of(id)),
                )],
            },
            Err(error) => failed(&error),
        })
    }

    /// Reads VM `id`'s configuration, changes it with `change`, and stores it.
    fn modify(
        &self,
        id: VmId,
        change: impl FnOnce(&mut VmConfig) -> CimResult<()>,
    ) -> CimResult<(MethodOutput, Option<VmConfig>)> {
        let vm = match self.vmms.get_vm(id) {
            Ok(vm) => vm,
            Err(error) => return Ok((failed(&error), None)),
        };
        let Some(mut config) = vm.config else {
            return Ok((done(ReturnCode::InvalidState), None));
        };
        change(&mut config)?;
        Ok(match self.vmms.modify_system_settings(config.clone()) {
            Ok(()) => (done(ReturnCode::Completed), Some(config)),
            Err(error) => (failed(&error), None),
        })
    }

    /// ModifyResourceSettings (`add_to == None`: every RASD names its VM by InstanceID) and
    /// AddResourceSettings (`add_to`: the VM; only disks can be added).
    fn modify_resources(&self, args: &Args, add_to: Option<VmId>) -> CimResult<MethodOutput> {
        let TypedArg::Instances(list) = args.get("ResourceSettings") else {
            return Err(bad("ResourceSettings is required"));
        };
        let mut by_vm: Vec<(VmId, Vec<ResourceSettings>)> = Vec::new();
        for instance in list {
            let setting = ResourceSettings::from_instance(instance)?;
            let id = match add_to {
                Some(id) => {
                    if !matches!(setting, ResourceSettings::Disk { .. }) {
                        return Ok(done(ReturnCode::InvalidParameter));
                    }
                    id
                }
                None => match setting
                    .instance_id()
                    .and_then(VirtualSystemSettingData::vm_of)
                {
                    Some(id) => id,
                    None => return Ok(done(ReturnCode::InvalidParameter)),
                },
            };
            match by_vm.iter_mut().find(|(vm, _)| *vm == id) {
                Some((_, settings)) => settings.push(setting),
                None => by_vm.push((id, vec![setting])),
            }
        }
        let mut resulting = Vec::new();
        for (id, settings) in by_vm {
            let before = self
                .vmms
                .get_vm(id)
                .ok()
                .and_then(|vm| vm.config)
                .map_or(0, |c| c.disks.len());
            let (output, config) = self.modify(id, |config| {
                settings.iter().try_for_each(|s| s.apply(config))
            })?;
            let Some(config) = config else {
                return Ok(output);
            };
            for setting in &settings {
                let path = match setting {
                    ResourceSettings::Processor { .. } => {
                        crate::model::ProcessorSettingData::path_of(id)
                    }
                    ResourceSettings::Memory { .. } => crate::model::MemorySettingData::path_of(id),
                    ResourceSettings::Disk { instance_id, .. } => {
                        let index = instance_id
                            .as_deref()
                            .and_then(StorageAllocationSettingData::index_of)
                            .unwrap_or(before);
                        StorageAllocationSettingData {
                            vm: id,
                            index,
                            path: config
                                .disks
                                .get(index)
                                .map(|d| d.path.clone())
                                .unwrap_or_default(),
                            read_only: false,
                        }
                        .path()
                    }
                };
                resulting.push(path);
            }
        }
        Ok(MethodOutput {
            return_value: ReturnCode::Completed.code(),
            outputs: vec![("ResultingResourceSettings", OutValue::RefArray(resulting))],
        })
    }

    fn summary(&self, args: &Args) -> CimResult<MethodOutput> {
        let requested: Vec<u32> = match args.get("RequestedInformation") {
            TypedArg::Integers(codes) => codes
                .iter()
                .filter_map(|c| u32::try_from(*c).ok())
                .collect(),
            _ => Vec::new(),
        };
        let vms = match args.get("SettingData") {
            TypedArg::References(paths) => {
                let mut vms = Vec::new();
                for path in paths {
                    let Some(id) = path
                        .key("InstanceID")
                        .and_then(VirtualSystemSettingData::vm_of)
                    else {
                        return Ok(done(ReturnCode::InvalidParameter));
                    };
                    match self.vmms.get_vm(id) {
                        Ok(vm) => vms.push(vm),
                        Err(error) => return Ok(failed(&error)),
                    }
                }
                vms
            }
            _ => self.vmms.list_vms(),
        };
        let jobs = self.vmms.jobs();
        let summaries = vms
            .into_iter()
            .map(|vm| {
                let running_jobs = jobs
                    .iter()
                    .filter(|j| j.affected_vm == vm.id && !j.state.is_terminal())
                    .count();
                SummaryInformation {
                    host: self.host.clone(),
                    running_jobs: u32::try_from(running_jobs).unwrap_or(u32::MAX),
                    requested: requested.clone(),
                    vm,
                }
                .to_instance()
            })
            .collect();
        Ok(MethodOutput {
            return_value: ReturnCode::Completed.code(),
            outputs: vec![("SummaryInformation", OutValue::EmbeddedArray(summaries))],
        })
    }
}
