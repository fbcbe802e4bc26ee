//! The firmware and video part of the provider: each VM's BIOS element and boot source from its
//! definition, and each running VM's display controller and video head from the console
//! geometry the integrator gave ([`Provider::with_console`]).

use super::Provider;
use super::instances::{View, has_shutdown_component};
use crate::instance::Instance;
use crate::model::{
    BiosElement, BootSourceSettingData, CimObject, ComputerSystem, SyntheticDisplayController,
    VideoHead,
};

impl Provider {
    /// Instances of a firmware or video class (`None`: not one of them).
    pub(crate) fn device_instances(&self, class: &str, view: &View) -> Option<Vec<Instance>> {
        let configured = || {
            view.vms
                .iter()
                .filter_map(|vm| vm.config.as_ref().map(|c| (vm, c)))
        };
        let running = || {
            view.vms
                .iter()
                .filter(|vm| self.console.is_some() && has_shutdown_component(vm))
        };
        let bios = |vm: &vmm_core::ComputerSystem, config: &vmm_core::VmConfig| BiosElement {
            vm: vm.id,
            boot: config.boot.clone(),
            running: has_shutdown_component(vm),
        };
        let list = match class {
            "Msvm_BIOSElement" => configured()
                .map(|(vm, c)| bios(vm, c).to_instance())
                .collect(),
            "Msvm_BootSourceSettingData" => configured()
                .map(|(vm, c)| {
                    BootSourceSettingData {
                        vm: vm.id,
                        boot: c.boot.clone(),
                    }
                    .to_instance()
                })
                .collect(),
            "Msvm_SystemBIOS" => configured()
                .map(|(vm, c)| {
                    Instance::new(class)
                        .reference("GroupComponent", ComputerSystem::path_of(vm.id))
                        .reference("PartComponent", bios(vm, c).path())
                })
                .collect(),
            "Msvm_SyntheticDisplayController" => running()
                .map(|vm| SyntheticDisplayController(vm.id).to_instance())
                .collect(),
            "Msvm_VideoHead" => running()
                .filter_map(|vm| {
                    let geometry = self.console?;
                    Some(
                        VideoHead {
                            vm: vm.id,
                            geometry,
                        }
                        .to_instance(),
                    )
                })
                .collect(),
            "Msvm_VideoHeadOnController" => running()
                .map(|vm| {
                    Instance::new(class)
                        .reference("Antecedent", SyntheticDisplayController::path_of(vm.id))
                        .reference("Dependent", VideoHead::path_of(vm.id))
                })
                .collect(),
            _ => return None,
        };
        Some(list)
    }

    /// `Msvm_SystemDevice` pairs of a running VM's display (none without a console).
    pub(crate) fn display_devices(&self, vm: &vmm_core::ComputerSystem) -> Vec<Instance> {
        if self.console.is_none() || !has_shutdown_component(vm) {
            return Vec::new();
        }
        [
            SyntheticDisplayController::path_of(vm.id),
            VideoHead::path_of(vm.id),
        ]
        .into_iter()
        .map(|device| {
            Instance::new("Msvm_SystemDevice")
                .reference("GroupComponent", ComputerSystem::path_of(vm.id))
                .reference("PartComponent", device)
        })
        .collect()
    }
}
