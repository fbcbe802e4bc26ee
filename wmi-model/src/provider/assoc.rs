//! Associations: their instances, and the Associators / References traversal.

use super::Provider;
use super::instances::{View, has_shutdown_component, reference_of};
use crate::error::{CimError, CimResult, CimStatus};
use crate::instance::Instance;
use crate::model::{
    BootSourceSettingData, CimObject, ComputerSystem, ConcreteJob, ShutdownComponent,
    SnapshotSettingData, VirtualSystemSettingData, settings_of,
};
use crate::path::ObjectPath;
use crate::schema::{ClassDecl, Namespace, Schema};
use crate::value::CimType;

/// The filters of an Associators / References request (DSP0200 parameter names).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AssocFilter {
    /// `AssocClass` (References: `ResultClass`).
    pub assoc_class: Option<String>,
    /// `ResultClass` (Associators only).
    pub result_class: Option<String>,
    /// `Role`: the source object's role.
    pub role: Option<String>,
    /// `ResultRole`: the result's role (Associators only).
    pub result_role: Option<String>,
    /// `RequiredQualifier` / `RequiredAssocQualifier`: only `Association` and `Key` are
    /// known to this model; any other matches nothing.
    pub required_qualifier: Option<String>,
}

fn same(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

impl Provider {
    /// Instances of one association class.
    pub(crate) fn association_instances(&self, class: &str, view: &View) -> Vec<Instance> {
        if let Some(network) = self.network_instances(class) {
            return network;
        }
        if let Some(devices) = self.device_instances(class, view) {
            return devices;
        }
        let mut out = Vec::new();
        if class == "Msvm_SystemDevice" {
            for vm in view.vms.iter().filter(|vm| has_shutdown_component(vm)) {
                out.push(
                    Instance::new(class)
                        .reference("GroupComponent", ComputerSystem::path_of(vm.id))
                        .reference("PartComponent", ShutdownComponent::path_of(vm.id)),
                );
                out.extend(self.display_devices(vm));
            }
        }
        for vm in &view.vms {
            let Some(config) = vm.config.as_ref() else {
                continue;
            };
            let vssd = VirtualSystemSettingData::path_of(vm.id);
            match class {
                "Msvm_SettingsDefineState" => out.push(
                    Instance::new(class)
                        .reference("ManagedElement", ComputerSystem::path_of(vm.id))
                        .reference("SettingData", vssd),
                ),
                "Msvm_VirtualSystemSettingDataComponent" => {
                    for rasd in settings_of(config) {
                        let keys = self.keys_of(Namespace::Virtualization, &rasd.class);
                        out.push(
                            Instance::new(class)
                                .reference("GroupComponent", vssd.clone())
                                .reference("PartComponent", rasd.path(&keys)),
                        );
                    }
                    out.push(
                        Instance::new(class)
                            .reference("GroupComponent", vssd.clone())
                            .reference("PartComponent", BootSourceSettingData::path_of(vm.id)),
                    );
                }
                _ => {}
            }
        }
        match class {
            "Msvm_SnapshotOfVirtualSystem" => {
                for snapshot in view.checkpoints(self) {
                    out.push(
                        Instance::new(class)
                            .reference("Antecedent", ComputerSystem::path_of(snapshot.vm))
                            .reference("Dependent", snapshot.path()),
                    );
                }
            }
            "Msvm_ParentChildSettingData" => {
                for snapshot in view.checkpoints(self) {
                    if let Some(parent) = snapshot.checkpoint.parent {
                        out.push(
                            Instance::new(class)
                                .reference("Antecedent", SnapshotSettingData::path_of(parent))
                                .reference("Dependent", snapshot.path()),
                        );
                    }
                }
            }
            "Msvm_MostCurrentSnapshotInBranch" => {
                for (vm, now) in view.now(self) {
                    out.push(
                        Instance::new(class)
                            .reference("Antecedent", ComputerSystem::path_of(*vm))
                            .reference("Dependent", SnapshotSettingData::path_of(*now)),
                    );
                }
            }
            _ => {}
        }
        if class == "Msvm_AffectedJobElement" {
            for job in &view.jobs {
                out.push(
                    Instance::new(class)
                        .reference("AffectedElement", ComputerSystem::path_of(job.affected_vm))
                        .reference("AffectingElement", ConcreteJob::path_of(job.id))
                        .integers("ElementEffects", CimType::Uint16, &[5]),
                );
            }
        }
        out
    }

    /// The association instances that refer to `object` in role `role`, filtered by class.
    fn links(
        &self,
        object: &ObjectPath,
        filter: &AssocFilter,
    ) -> CimResult<Vec<(&'static ClassDecl, Instance, String)>> {
        let schema = Schema::get();
        if let Some(assoc) = &filter.assoc_class
            && !schema.knows(Namespace::Virtualization, assoc)
        {
            return Err(CimError::new(
                CimStatus::InvalidParameter,
                format!("AssocClass {assoc} does not exist"),
            ));
        }
        if let Some(q) = &filter.required_qualifier
            && !same(q, "Association")
            && !same(q, "Key")
        {
            return Ok(Vec::new());
        }
        // The source must exist.
        self.get(Namespace::Virtualization, object)?;
        let view = self.view();
        let mut out = Vec::new();
        for decl in schema
            .classes(Namespace::Virtualization)
            .iter()
            .filter(|c| c.association)
            .filter(|c| filter.assoc_class.as_deref().is_none_or(|a| c.is_a(a)))
        {
            for instance in self.concrete_associations(decl.name, &view) {
                for property in decl
                    .properties
                    .iter()
                    .filter(|p| p.ty == CimType::Reference)
                {
                    if filter
                        .role
                        .as_deref()
                        .is_some_and(|r| !same(r, property.name))
                    {
                        continue;
                    }
                    if reference_of(&instance, property.name).is_some_and(|p| p.matches(object)) {
                        out.push((decl, instance.clone(), property.name.to_owned()));
                    }
                }
            }
        }
        Ok(out)
    }

    fn concrete_associations(&self, class: &str, view: &View) -> Vec<Instance> {
        self.association_instances(class, view)
    }

    /// `Associators`: the objects linked to `object`, each once per linking association.
    pub fn associators(
        &self,
        object: &ObjectPath,
        filter: &AssocFilter,
    ) -> CimResult<Vec<(ObjectPath, Instance)>> {
        let schema = Schema::get();
        if let Some(result) = &filter.result_class
            && !schema.knows(Namespace::Virtualization, result)
        {
            return Err(CimError::new(
                CimStatus::InvalidParameter,
                format!("ResultClass {result} does not exist"),
            ));
        }
        let mut out = Vec::new();
        for (decl, instance, source_role) in self.links(object, filter)? {
            for property in decl
                .properties
                .iter()
                .filter(|p| p.ty == CimType::Reference)
            {
                if same(property.name, &source_role) {
                    continue;
                }
                if filter
                    .result_role
                    .as_deref()
                    .is_some_and(|r| !same(r, property.name))
                {
                    continue;
                }
                let Some(target) = reference_of(&instance, property.name) else {
                    continue;
                };
                let Ok(found) = self.get(Namespace::Virtualization, target) else {
                    continue;
                };
                let wanted = filter.result_class.as_deref().is_none_or(|r| {
                    schema
                        .class(Namespace::Virtualization, &found.class)
                        .is_some_and(|c| c.is_a(r))
                });
                if wanted {
                    out.push((target.clone(), found));
                }
            }
        }
        Ok(out)
    }

    /// `References`: the association instances that refer to `object`.
    pub fn references(
        &self,
        object: &ObjectPath,
        filter: &AssocFilter,
    ) -> CimResult<Vec<(ObjectPath, Instance)>> {
        Ok(self
            .links(object, filter)?
            .into_iter()
            .map(|(decl, instance, _)| (instance.path(&decl.keys()), instance))
            .collect())
    }
}
