//! `Msvm_SummaryInformation`: what `GetSummaryInformation` returns about a VM.

use vmm_core::ComputerSystem as Vm;

use super::CimObject;
use super::computer_system::{ComputerSystem, ints};
use crate::instance::Instance;
use crate::path::ObjectPath;
use crate::value::CimType::{Uint16, Uint32, Uint64};

const CLASS: &str = "Msvm_SummaryInformation";

/// Summary of one VM, restricted to the `RequestedInformation` codes asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct SummaryInformation {
    /// The VM.
    pub vm: Vm,
    /// Host name (`HostComputerSystemName`).
    pub host: String,
    /// Running jobs on it (`AsynchronousTasks`, as a count).
    pub running_jobs: u32,
    /// `RequestedInformation`; empty means everything this model knows.
    pub requested: Vec<u32>,
}

impl SummaryInformation {
    fn wants(&self, code: u32) -> bool {
        self.requested.is_empty() || self.requested.contains(&code)
    }
}

impl CimObject for SummaryInformation {
    const CLASS: &'static str = CLASS;

    fn to_instance(&self) -> Instance {
        let vm = &self.vm;
        let config = vm.config.as_ref();
        let mut i = Instance::new(CLASS)
            .string("InstanceID", Some(format!("Microsoft:{}", vm.id)))
            .string("Name", Some(vm.id.to_string()));
        if self.wants(1) {
            i = i.string("ElementName", Some(vm.name.clone()));
        }
        if self.wants(2) {
            i = i.timestamp("CreationTime", config.map(|c| c.created));
        }
        if self.wants(3) {
            i = i.strings("Notes", Vec::new());
        }
        if self.wants(4) {
            i = i.integer("NumberOfProcessors", Uint16, config.map(|c| c.vcpus));
        }
        if self.wants(10) {
            i = i.string("Version", config.map(|c| format!("{}.0", c.version)));
        }
        if self.wants(100) {
            i = i.integer("EnabledState", Uint16, Some(vm.enabled_state.code()));
        }
        if self.wants(103) {
            let running = vm.process_id.is_some();
            i = i.integer(
                "MemoryUsage",
                Uint64,
                config.filter(|_| running).map(|c| c.memory_mib),
            );
        }
        if self.wants(104) {
            // 12 No Contact: there is no heartbeat integration component yet.
            i = i.integer("Heartbeat", Uint16, Some(12u16));
        }
        if self.wants(105) {
            i = i.integer("UpTime", Uint64, Some(vm.on_time_ms));
        }
        if self.wants(108) {
            i = i.integer("AsynchronousTasks", Uint32, Some(self.running_jobs));
        }
        if self.wants(109) {
            i = i.integer("HealthState", Uint16, Some(vm.health_state.code()));
        }
        if self.wants(110) {
            let cs = ComputerSystem::from(vm);
            i = i.integers("OperationalStatus", Uint16, &ints(&cs.operational_status));
        }
        if self.wants(111) {
            i = i.strings(
                "StatusDescriptions",
                vm.status_description.iter().cloned().collect(),
            );
        }
        i.integer("ProcessID", Uint32, vm.process_id)
            .string("VirtualSystemSubType", Some("Microsoft:Hyper-V:SubType:1"))
            .string("HostComputerSystemName", Some(self.host.clone()))
    }

    fn path(&self) -> ObjectPath {
        ObjectPath::new(CLASS, &[])
    }
}
