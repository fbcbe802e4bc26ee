//! `Msvm_ComputerSystem`: each virtual machine, and the host.

use std::time::SystemTime;

use vmm_core::{VmId, available_requests};

use super::CimObject;
use crate::instance::Instance;
use crate::path::ObjectPath;
use crate::value::CimType::{Uint16, Uint32, Uint64};

const CLASS: &str = "Msvm_ComputerSystem";

/// A virtual machine as `Msvm_ComputerSystem`.
#[derive(Debug, Clone, PartialEq)]
pub struct ComputerSystem {
    /// `Name`: the VM GUID.
    pub name: VmId,
    /// `ElementName`.
    pub element_name: String,
    /// `EnabledState`.
    pub enabled_state: u16,
    /// `RequestedState` (12 when nothing is in progress).
    pub requested_state: u16,
    /// `HealthState`.
    pub health_state: u16,
    /// `OperationalStatus`.
    pub operational_status: Vec<u16>,
    /// `StatusDescriptions`.
    pub status_descriptions: Vec<String>,
    /// `AvailableRequestedStates`: what `RequestStateChange` accepts now.
    pub available_requested_states: Vec<u16>,
    /// `ProcessID`: the worker's pid while one runs.
    pub process_id: Option<u32>,
    /// `OnTimeInMilliseconds`.
    pub on_time_ms: u64,
    /// `TimeOfLastStateChange`.
    pub time_of_last_state_change: SystemTime,
    /// `InstallDate`: when the VM was defined (unknown when degraded).
    pub install_date: Option<SystemTime>,
}

impl From<&vmm_core::ComputerSystem> for ComputerSystem {
    fn from(vm: &vmm_core::ComputerSystem) -> Self {
        ComputerSystem {
            name: vm.id,
            element_name: vm.name.clone(),
            enabled_state: vm.enabled_state.code(),
            requested_state: vm.requested_state.code(),
            health_state: vm.health_state.code(),
            operational_status: vec![vm.operational_status.code()],
            status_descriptions: vm.status_description.iter().cloned().collect(),
            available_requested_states: available_requests(vm.enabled_state)
                .into_iter()
                .map(|r| r.code())
                .collect(),
            process_id: vm.process_id,
            on_time_ms: vm.on_time_ms,
            time_of_last_state_change: vm.time_of_last_state_change,
            install_date: vm.config.as_ref().map(|c| c.created),
        }
    }
}

impl ComputerSystem {
    /// The path of the VM `id`.
    pub fn path_of(id: VmId) -> ObjectPath {
        ObjectPath::new(
            CLASS,
            &[("CreationClassName", CLASS), ("Name", &id.to_string())],
        )
    }
}

impl CimObject for ComputerSystem {
    const CLASS: &'static str = CLASS;

    fn to_instance(&self) -> Instance {
        Instance::new(CLASS)
            .string("CreationClassName", Some(CLASS))
            .string("Name", Some(self.name.to_string()))
            .string("Caption", Some("Virtual Machine"))
            .string("Description", Some("Microsoft Virtual Machine"))
            .string("ElementName", Some(self.element_name.clone()))
            .timestamp("InstallDate", self.install_date)
            .integers("OperationalStatus", Uint16, &ints(&self.operational_status))
            .strings("StatusDescriptions", self.status_descriptions.clone())
            .integer("HealthState", Uint16, Some(self.health_state))
            .integer("EnabledState", Uint16, Some(self.enabled_state))
            .integer("RequestedState", Uint16, Some(self.requested_state))
            .integer("EnabledDefault", Uint16, Some(2u16))
            .integers(
                "AvailableRequestedStates",
                Uint16,
                &ints(&self.available_requested_states),
            )
            .timestamp(
                "TimeOfLastStateChange",
                Some(self.time_of_last_state_change),
            )
            .integer("OnTimeInMilliseconds", Uint64, Some(self.on_time_ms))
            .integer("ProcessID", Uint32, self.process_id)
            .integer("NumberOfNumaNodes", Uint16, Some(1u16))
            .integer("EnhancedSessionModeState", Uint16, Some(3u16))
    }

    fn path(&self) -> ObjectPath {
        Self::path_of(self.name)
    }
}

/// The host as `Msvm_ComputerSystem` (`Caption = "Hosting Computer System"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostComputerSystem {
    /// `Name`: the host name.
    pub name: String,
    /// `ProcessID`: the service's own pid.
    pub process_id: u32,
}

impl CimObject for HostComputerSystem {
    const CLASS: &'static str = CLASS;

    fn to_instance(&self) -> Instance {
        Instance::new(CLASS)
            .string("CreationClassName", Some(CLASS))
            .string("Name", Some(self.name.clone()))
            .string("Caption", Some("Hosting Computer System"))
            .string("Description", Some("Microsoft Hosting Computer System"))
            .string("ElementName", Some(self.name.clone()))
            .integers("OperationalStatus", Uint16, &[2])
            .integer("HealthState", Uint16, Some(5u16))
            .integer("EnabledState", Uint16, Some(2u16))
            .integer("RequestedState", Uint16, Some(12u16))
            .integer("EnabledDefault", Uint16, Some(2u16))
            .integer("ProcessID", Uint32, Some(self.process_id))
    }

    fn path(&self) -> ObjectPath {
        ObjectPath::new(CLASS, &[("CreationClassName", CLASS), ("Name", &self.name)])
    }
}

pub(crate) fn ints(values: &[u16]) -> Vec<i128> {
    values.iter().map(|v| i128::from(*v)).collect()
}
