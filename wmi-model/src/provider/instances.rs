//! Enumerating and fetching instances of the virtualization namespace.

use std::cell::OnceCell;

use vmm_core::{ComputerSystem as Vm, VmId};

use super::Provider;
use crate::error::{CimError, CimResult, CimStatus};
use crate::instance::Instance;
use crate::model::settings_of;
use crate::model::{
    CimObject, ComputerSystem, ConcreteJob, HostComputerSystem, ManagementService,
    ShutdownComponent, SnapshotService, SnapshotSettingData, VirtualSystemSettingData,
};
use crate::path::ObjectPath;
use crate::schema::{ClassDecl, Namespace, Schema};
use crate::value::CimType;

/// A consistent view of the service for one operation.
pub(crate) struct View {
    pub(crate) vms: Vec<Vm>,
    pub(crate) jobs: Vec<vmm_core::Job>,
    /// The checkpoints of `vms`, read from their trees only when a class needs them (most
    /// requests do not, and reading a thousand trees would dominate them).
    checkpoints: OnceCell<Vec<SnapshotSettingData>>,
    /// "Now"'s parent per VM, filled with `checkpoints`.
    now: OnceCell<Vec<(VmId, vmm_core::checkpoint::CheckpointId)>>,
}

impl View {
    pub(crate) fn new(vms: Vec<Vm>, jobs: Vec<vmm_core::Job>) -> Self {
        View {
            vms,
            jobs,
            checkpoints: OnceCell::new(),
            now: OnceCell::new(),
        }
    }

    /// Every checkpoint of the view's VMs (none when the service has no snapshot support or a
    /// tree cannot be read: that VM's `get-vm-checkpoint` says why).
    pub(crate) fn checkpoints(&self, provider: &Provider) -> &[SnapshotSettingData] {
        self.load(provider);
        self.checkpoints
            .get()
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Each VM's "Now" parent checkpoint.
    pub(crate) fn now(&self, provider: &Provider) -> &[(VmId, vmm_core::checkpoint::CheckpointId)] {
        self.load(provider);
        self.now.get().map(Vec::as_slice).unwrap_or_default()
    }

    fn load(&self, provider: &Provider) {
        if self.checkpoints.get().is_some() {
            return;
        }
        let mut all = Vec::new();
        let mut now = Vec::new();
        for vm in &self.vms {
            let Ok(tree) = provider.vmms.snapshots(vm.id) else {
                continue;
            };
            let folder = provider.vmms.store().checkpoints_dir(vm.id);
            if let Some(id) = tree.now {
                now.push((vm.id, id));
            }
            all.extend(
                tree.checkpoints
                    .into_iter()
                    .map(|checkpoint| SnapshotSettingData {
                        vm: vm.id,
                        configuration_data_root: folder.join(checkpoint.id.to_string()),
                        checkpoint,
                    }),
            );
        }
        let _ = self.checkpoints.set(all);
        let _ = self.now.set(now);
    }
}

impl Provider {
    pub(crate) fn view(&self) -> View {
        View::new(self.vmms.list_vms(), self.vmms.jobs())
    }

    pub(crate) fn host_system(&self) -> HostComputerSystem {
        HostComputerSystem {
            name: self.host.clone(),
            process_id: std::process::id(),
        }
    }

    /// The declaration of `class` in `namespace`, or `CIM_ERR_INVALID_CLASS`.
    pub(crate) fn class(&self, namespace: Namespace, class: &str) -> CimResult<&'static ClassDecl> {
        Schema::get().class(namespace, class).ok_or_else(|| {
            CimError::new(
                CimStatus::InvalidClass,
                format!("class {class} does not exist in {}", namespace.name()),
            )
        })
    }

    /// Every instance of `class` and its subclasses, with paths.
    pub(crate) fn enumerate(
        &self,
        namespace: Namespace,
        class: &str,
        view: &View,
    ) -> CimResult<Vec<(ObjectPath, Instance)>> {
        let schema = Schema::get();
        if !schema.knows(namespace, class) {
            return Err(CimError::new(
                CimStatus::InvalidClass,
                format!("class {class} does not exist in {}", namespace.name()),
            ));
        }
        if namespace == Namespace::Interop {
            return Ok(self.subscriptions.enumerate(class));
        }
        let mut out = Vec::new();
        for decl in schema.classes(namespace).iter().filter(|c| c.is_a(class)) {
            let keys = decl.keys();
            for instance in self.concrete(decl.name, view) {
                out.push((instance.path(&keys), instance));
            }
        }
        Ok(out)
    }

    /// Every instance of exactly the concrete class `class`.
    fn concrete(&self, class: &str, view: &View) -> Vec<Instance> {
        if let Some(instances) = self.network_instances(class) {
            return instances;
        }
        if let Some(instances) = self.device_instances(class, view) {
            return instances;
        }
        let configured = || {
            view.vms
                .iter()
                .filter_map(|vm| vm.config.as_ref().map(|c| (vm, c)))
        };
        match class {
            "Msvm_ComputerSystem" => std::iter::once(self.host_system().to_instance())
                .chain(
                    view.vms
                        .iter()
                        .map(|vm| ComputerSystem::from(vm).to_instance()),
                )
                .collect(),
            "Msvm_VirtualSystemSettingData" => configured()
                .map(|(vm, c)| self.vssd(vm, c).to_instance())
                .chain(view.checkpoints(self).iter().map(|s| s.to_instance()))
                .collect(),
            "Msvm_ProcessorSettingData"
            | "Msvm_MemorySettingData"
            | "Msvm_StorageAllocationSettingData" => configured()
                .flat_map(|(_, c)| settings_of(c))
                .filter(|i| i.class == class)
                .collect(),
            "Msvm_VirtualSystemManagementService" => {
                vec![ManagementService(self.host.clone()).to_instance()]
            }
            "Msvm_VirtualSystemSnapshotService" => {
                vec![SnapshotService(self.host.clone()).to_instance()]
            }
            "Msvm_ConcreteJob" => view
                .jobs
                .iter()
                .map(|j| ConcreteJob(j.clone()).to_instance())
                .collect(),
            "Msvm_ShutdownComponent" => view
                .vms
                .iter()
                .filter(|vm| has_shutdown_component(vm))
                .map(|vm| ShutdownComponent(vm.id).to_instance())
                .collect(),
            "Msvm_SettingsDefineState"
            | "Msvm_SystemDevice"
            | "Msvm_VirtualSystemSettingDataComponent"
            | "Msvm_AffectedJobElement"
            | "Msvm_SnapshotOfVirtualSystem"
            | "Msvm_MostCurrentSnapshotInBranch"
            | "Msvm_ParentChildSettingData" => self.association_instances(class, view),
            // Summaries are only returned by
            // GetSummaryInformation, indications are only delivered.
            _ => Vec::new(),
        }
    }

    pub(crate) fn vssd(&self, vm: &Vm, config: &vmm_core::VmConfig) -> VirtualSystemSettingData {
        VirtualSystemSettingData {
            config: config.clone(),
            configuration_data_root: self.vmms.store().vm_dir(vm.id),
            is_saved: self.vmms.store().has_saved_state(vm.id),
        }
    }

    /// One instance by path, or `CIM_ERR_NOT_FOUND`.
    pub(crate) fn get(&self, namespace: Namespace, path: &ObjectPath) -> CimResult<Instance> {
        let decl = self.class(namespace, &path.class)?;
        let not_found = || CimError::new(CimStatus::NotFound, format!("no instance {path}"));
        if namespace == Namespace::Interop {
            return self.subscriptions.get(path).ok_or_else(not_found);
        }
        // Fast paths for what clients poll: a VM, a job, a VM's settings.
        let one_vm = |id: VmId| -> CimResult<View> {
            let vm = self.vmms.get_vm(id).map_err(|_| not_found())?;
            Ok(View::new(vec![vm], Vec::new()))
        };
        let view = match decl.name {
            "Msvm_ComputerSystem" => match path.key("Name").and_then(|n| n.parse::<VmId>().ok()) {
                Some(id) => one_vm(id)?,
                None => View::new(Vec::new(), Vec::new()),
            },
            "Msvm_ConcreteJob" => {
                let id = path
                    .key("InstanceID")
                    .and_then(|i| i.parse().ok())
                    .ok_or_else(not_found)?;
                let job = self.vmms.job(id).map_err(|_| not_found())?;
                View::new(Vec::new(), vec![job])
            }
            "Msvm_ShutdownComponent" => {
                one_vm(ShutdownComponent::vm_of(path).ok_or_else(not_found)?)?
            }
            "Msvm_VirtualSystemSettingData"
            | "Msvm_ProcessorSettingData"
            | "Msvm_MemorySettingData"
            | "Msvm_StorageAllocationSettingData" => {
                let id = path
                    .key("InstanceID")
                    .and_then(VirtualSystemSettingData::vm_of)
                    .ok_or_else(not_found)?;
                // A checkpoint's settings have the same form of InstanceID: look further.
                one_vm(id).unwrap_or_else(|_| self.view())
            }
            _ => self.view(),
        };
        let keys = decl.keys();
        self.concrete(decl.name, &view)
            .into_iter()
            .find(|i| i.path(&keys).matches(path))
            .ok_or_else(not_found)
    }

    /// The key names of `class` (for building paths of instances).
    pub(crate) fn keys_of(&self, namespace: Namespace, class: &str) -> Vec<&'static str> {
        Schema::get()
            .class(namespace, class)
            .map(ClassDecl::keys)
            .unwrap_or_default()
    }
}

/// Whether `vm` has a shutdown component now: it runs or is paused (a guest to ask).
pub(crate) fn has_shutdown_component(vm: &Vm) -> bool {
    matches!(
        vm.enabled_state,
        vmm_core::EnabledState::Running | vmm_core::EnabledState::Paused
    )
}

/// A reference property of `instance`, if it has one named `role`.
pub(crate) fn reference_of<'a>(instance: &'a Instance, role: &str) -> Option<&'a ObjectPath> {
    match instance.property(role) {
        Some(p) if p.ty == CimType::Reference => match &p.value {
            Some(crate::value::CimValue::Scalar(crate::value::Scalar::Reference(path))) => {
                Some(path)
            }
            _ => None,
        },
        _ => None,
    }
}
