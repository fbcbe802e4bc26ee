//! The networking part of the provider: instances of the switch and adapter classes from the
//! store's switch file, and the methods that change it (the switch management service's, and
//! the VM management service's `AddResourceSettings` of a NIC or its connection).
//!
//! Hyper-V's scripts create a switch with `DefineSystem` (an `Msvm_EthernetPortAllocationSettingData`
//! whose `HostResource` is the host computer system makes it internal, one naming an external
//! port makes it external), add a VM's adapter with `AddResourceSettings` of an
//! `Msvm_SyntheticEthernetPortSettingData`, and connect it with `AddResourceSettings` of an
//! `Msvm_EthernetPortAllocationSettingData` (`Parent` = the adapter, `HostResource` = the switch).

use std::sync::{Mutex, MutexGuard, PoisonError};

use vmm_core::{EnabledState, ReturnCode, VmId};
use vswitch::{MacAddress, SwitchError, SwitchKind, SwitchRequest, VirtualSwitches};

use super::Provider;
use super::args::{Args, TypedArg};
use crate::cimxml::{MethodOutput, OutValue};
use crate::error::{CimError, CimResult, CimStatus};
use crate::instance::Instance;
use crate::model::{
    CimObject, EthernetPortAllocation, EthernetSwitch, EthernetSwitchSettingData,
    InternalEthernetPort, SwitchManagementService, SyntheticEthernetPort, VirtualSystemSettingData,
};
use crate::path::ObjectPath;
use crate::value::{CimValue, Scalar};

const SYNTHETIC_PORT: &str = "Msvm_SyntheticEthernetPortSettingData";
const PORT_ALLOCATION: &str = "Msvm_EthernetPortAllocationSettingData";

fn done(code: ReturnCode) -> MethodOutput {
    MethodOutput {
        return_value: code.code(),
        outputs: Vec::new(),
    }
}

fn bad(message: impl Into<String>) -> CimError {
    CimError::new(CimStatus::InvalidParameter, message)
}

/// Hyper-V's return code for a refused switch request.
fn refused(error: &SwitchError) -> MethodOutput {
    done(match error {
        SwitchError::SwitchInUse { .. } => ReturnCode::InvalidState,
        SwitchError::Host { .. } | SwitchError::Store { .. } | SwitchError::Corrupt { .. } => {
            ReturnCode::Failed
        }
        _ => ReturnCode::InvalidParameter,
    })
}

/// The strings of a string-array property (or of a single string).
fn strings(instance: &Instance, name: &str) -> Vec<String> {
    match instance.get(name) {
        Some(CimValue::Array(items)) => items.iter().map(Scalar::to_text).collect(),
        Some(CimValue::Scalar(scalar)) => vec![scalar.to_text()],
        None => Vec::new(),
    }
}

impl Provider {
    fn switches(&self) -> Option<MutexGuard<'_, VirtualSwitches>> {
        self.network
            .as_ref()
            .map(|n| n.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Instances of a networking class (`None`: not a networking class).
    pub(crate) fn network_instances(&self, class: &str) -> Option<Vec<Instance>> {
        let networking = [
            "Msvm_VirtualEthernetSwitch",
            "Msvm_VirtualEthernetSwitchSettingData",
            "Msvm_VirtualEthernetSwitchManagementService",
            SYNTHETIC_PORT,
            PORT_ALLOCATION,
            "Msvm_InternalEthernetPort",
            "Msvm_VirtualEthernetSwitchSettingDataComponent",
            "Msvm_HostedEthernetPort",
        ];
        if !networking.contains(&class) {
            return None;
        }
        if class == "Msvm_VirtualEthernetSwitchManagementService" {
            return Some(vec![
                SwitchManagementService(self.host.clone()).to_instance(),
            ]);
        }
        let Some(switches) = self.switches() else {
            return Some(Vec::new());
        };
        let state = switches.state();
        let internal = || {
            state
                .switches
                .iter()
                .filter(|s| matches!(s.kind, SwitchKind::Internal { .. }))
        };
        let switch_id = |name: &str| state.switch(name).map(|s| s.id.clone());
        let list = match class {
            "Msvm_VirtualEthernetSwitch" => state
                .switches
                .iter()
                .map(|s| EthernetSwitch(s.clone()).to_instance())
                .collect(),
            "Msvm_VirtualEthernetSwitchSettingData" => state
                .switches
                .iter()
                .map(|s| EthernetSwitchSettingData(s.clone()).to_instance())
                .collect(),
            SYNTHETIC_PORT => state
                .adapters
                .iter()
                .map(|a| SyntheticEthernetPort(a.clone()).to_instance())
                .collect(),
            PORT_ALLOCATION => state
                .adapters
                .iter()
                .filter_map(|a| {
                    let switch_id = switch_id(a.switch.as_deref()?)?;
                    Some(
                        EthernetPortAllocation {
                            adapter: a.clone(),
                            switch_id,
                        }
                        .to_instance(),
                    )
                })
                .collect(),
            "Msvm_InternalEthernetPort" => internal()
                .map(|s| {
                    InternalEthernetPort {
                        switch: s.clone(),
                        host: self.host.clone(),
                    }
                    .to_instance()
                })
                .collect(),
            "Msvm_VirtualEthernetSwitchSettingDataComponent" => state
                .adapters
                .iter()
                .flat_map(|a| {
                    let vssd =
                        a.vm.parse::<VmId>()
                            .ok()
                            .map(VirtualSystemSettingData::path_of);
                    let connection = a
                        .switch
                        .as_ref()
                        .map(|_| EthernetPortAllocation::path_of(&a.vm, &a.id));
                    let port = SyntheticEthernetPort::path_of(&a.vm, &a.id);
                    vssd.into_iter().flat_map(move |vssd| {
                        std::iter::once(port.clone())
                            .chain(connection.clone())
                            .map(move |part| {
                                Instance::new(class)
                                    .reference("GroupComponent", vssd.clone())
                                    .reference("PartComponent", part)
                            })
                    })
                })
                .chain(state.switches.iter().map(|s| {
                    Instance::new(class)
                        .reference("GroupComponent", EthernetSwitchSettingData::path_of(&s.id))
                        .reference("PartComponent", EthernetSwitch::path_of(&s.id))
                }))
                .collect(),
            "Msvm_HostedEthernetPort" => internal()
                .map(|s| {
                    let port = InternalEthernetPort {
                        switch: s.clone(),
                        host: self.host.clone(),
                    };
                    Instance::new(class)
                        .reference("Antecedent", EthernetSwitch::path_of(&s.id))
                        .reference("Dependent", port.path())
                })
                .collect(),
            _ => Vec::new(),
        };
        Some(list)
    }

    /// `Msvm_VirtualEthernetSwitchManagementService`'s methods.
    pub(crate) fn switch_management(&self, method: &str, args: &Args) -> CimResult<MethodOutput> {
        let Some(mut switches) = self.switches() else {
            return Ok(done(ReturnCode::NotSupported));
        };
        match method {
            "DefineSystem" => {
                let TypedArg::Instance(settings) = args.get("SystemSettings") else {
                    return Err(bad("SystemSettings is required"));
                };
                let name = settings
                    .get_str("ElementName")
                    .ok_or_else(|| bad("SystemSettings has no ElementName"))?
                    .to_owned();
                let mut kind = SwitchRequest::Private;
                if let TypedArg::Instances(ports) = args.get("ResourceSettings") {
                    for port in ports {
                        for resource in strings(port, "HostResource") {
                            let path = ObjectPath::parse(&resource)
                                .map_err(|e| bad(format!("HostResource: {e}")))?;
                            kind = match path.class.as_str() {
                                "Msvm_ComputerSystem" => SwitchRequest::Internal,
                                "Msvm_ExternalEthernetPort" => SwitchRequest::External(
                                    path.key("DeviceID")
                                        .or_else(|| path.key("Name"))
                                        .unwrap_or_default()
                                        .to_owned(),
                                ),
                                other => return Err(bad(format!("HostResource {other}"))),
                            };
                        }
                    }
                }
                Ok(match switches.new_switch(&name, kind, None) {
                    Ok(switch) => MethodOutput {
                        return_value: ReturnCode::Completed.code(),
                        outputs: vec![(
                            "ResultingSystem",
                            OutValue::Reference(EthernetSwitch::path_of(&switch.id)),
                        )],
                    },
                    Err(error) => refused(&error),
                })
            }
            "DestroySystem" => {
                let TypedArg::Reference(path) = args.get("AffectedSystem") else {
                    return Err(bad("AffectedSystem is required"));
                };
                let id = path.key("Name").unwrap_or_default();
                let Some(name) = switches
                    .state()
                    .switches
                    .iter()
                    .find(|s| s.id == id)
                    .map(|s| s.name.clone())
                else {
                    return Ok(done(ReturnCode::InvalidParameter));
                };
                Ok(match switches.remove_switch(&name) {
                    Ok(()) => done(ReturnCode::Completed),
                    Err(error) => refused(&error),
                })
            }
            "AddResourceSettings" => {
                let TypedArg::Reference(path) = args.get("AffectedConfiguration") else {
                    return Err(bad("AffectedConfiguration is required"));
                };
                let Some(switch_id) = path
                    .key("InstanceID")
                    .and_then(EthernetSwitchSettingData::switch_of)
                else {
                    return Ok(done(ReturnCode::InvalidParameter));
                };
                let switch_path = EthernetSwitch::path_of(switch_id).to_string();
                let TypedArg::Instances(list) = args.get("ResourceSettings") else {
                    return Err(bad("ResourceSettings is required"));
                };
                // Ports of VMs' adapters, added to this switch.
                let list: Vec<Instance> = list
                    .iter()
                    .cloned()
                    .map(|port| {
                        let mut hosts = strings(&port, "HostResource");
                        hosts.push(switch_path.clone());
                        port.strings("HostResource", hosts)
                    })
                    .collect();
                drop(switches);
                self.add_network_resources(None, &list)
            }
            other => Err(CimError::new(
                CimStatus::MethodNotAvailable,
                format!("{other} is not implemented"),
            )),
        }
    }

    /// Whether `AddResourceSettings` of these settings is a networking request.
    pub(crate) fn is_network_resource(list: &[Instance]) -> bool {
        !list.is_empty()
            && list
                .iter()
                .all(|i| i.class == SYNTHETIC_PORT || i.class == PORT_ALLOCATION)
    }

    /// Adds network adapters to VM `vm` (`Msvm_SyntheticEthernetPortSettingData`) or connects
    /// adapters to switches (`Msvm_EthernetPortAllocationSettingData`: `Parent` the adapter,
    /// `HostResource` the switch; the VM comes from `Parent` when `vm` is `None`).
    pub(crate) fn add_network_resources(
        &self,
        vm: Option<VmId>,
        list: &[Instance],
    ) -> CimResult<MethodOutput> {
        let Some(mut switches) = self.switches() else {
            return Ok(done(ReturnCode::NotSupported));
        };
        let mut resulting = Vec::new();
        for setting in list {
            if setting.class == SYNTHETIC_PORT {
                let Some(vm) = vm else {
                    return Ok(done(ReturnCode::InvalidParameter));
                };
                match self.vmms.get_vm(vm) {
                    Ok(system) if system.enabled_state == EnabledState::Off => {}
                    Ok(_) => return Ok(done(ReturnCode::InvalidState)),
                    Err(_) => return Ok(done(ReturnCode::InvalidParameter)),
                }
                let static_mac = matches!(
                    setting.get("StaticMacAddress"),
                    Some(CimValue::Scalar(Scalar::Boolean(true)))
                );
                let mac = match setting.get_str("Address").filter(|_| static_mac) {
                    Some(text) => Some(text.parse::<MacAddress>().map_err(|e| bad(e.to_string()))?),
                    None => None,
                };
                match switches.add_adapter(&vm.to_string(), None, mac) {
                    Ok(adapter) => {
                        resulting.push(SyntheticEthernetPort::path_of(&adapter.vm, &adapter.id))
                    }
                    Err(error) => return Ok(refused(&error)),
                }
            } else {
                let parent = setting
                    .get_str("Parent")
                    .ok_or_else(|| bad("the connection has no Parent"))?;
                let parent = ObjectPath::parse(parent).map_err(|e| bad(format!("Parent: {e}")))?;
                let Some((owner, _adapter)) = parent
                    .key("InstanceID")
                    .and_then(SyntheticEthernetPort::ids_of)
                else {
                    return Ok(done(ReturnCode::InvalidParameter));
                };
                if vm.is_some_and(|vm| vm.to_string() != owner) {
                    return Ok(done(ReturnCode::InvalidParameter));
                }
                let owner = owner.to_owned();
                let switch = strings(setting, "HostResource")
                    .iter()
                    .filter_map(|r| ObjectPath::parse(r).ok())
                    .filter(|p| p.class == "Msvm_VirtualEthernetSwitch")
                    .find_map(|p| p.key("Name").map(str::to_owned));
                let Some(name) = switch.and_then(|id| {
                    switches
                        .state()
                        .switches
                        .iter()
                        .find(|s| s.id == id)
                        .map(|s| s.name.clone())
                }) else {
                    return Ok(done(ReturnCode::InvalidParameter));
                };
                match switches.connect(&owner, &name) {
                    Ok(adapter) => {
                        resulting.push(EthernetPortAllocation::path_of(&adapter.vm, &adapter.id))
                    }
                    Err(error) => return Ok(refused(&error)),
                }
            }
        }
        Ok(MethodOutput {
            return_value: ReturnCode::Completed.code(),
            outputs: vec![("ResultingResourceSettings", OutValue::RefArray(resulting))],
        })
    }
}

/// The shared switch set the provider reads and changes.
pub type SharedSwitches = std::sync::Arc<Mutex<VirtualSwitches>>;
