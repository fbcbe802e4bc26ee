//! The two singleton services: `Msvm_VirtualSystemManagementService` (`Name = "vmms"`) and
//! `Msvm_VirtualSystemSnapshotService` (`Name = "vssnapsvc"`).

use super::CimObject;
use crate::instance::Instance;
use crate::path::ObjectPath;
use crate::value::CimType::Uint16;

fn service_instance(class: &str, name: &str, host: &str, caption: &str) -> Instance {
    Instance::new(class)
        .string("CreationClassName", Some(class))
        .string("Name", Some(name))
        .string("SystemCreationClassName", Some("Msvm_ComputerSystem"))
        .string("SystemName", Some(host))
        .string("Caption", Some(caption))
        .string("Description", Some(caption))
        .string("ElementName", Some(caption))
        .integer("EnabledState", Uint16, Some(2u16))
        .integer("HealthState", Uint16, Some(5u16))
        .integers("OperationalStatus", Uint16, &[2])
        .boolean("Started", Some(true))
}

fn service_path(class: &str, name: &str, host: &str) -> ObjectPath {
    ObjectPath::new(
        class,
        &[
            ("CreationClassName", class),
            ("Name", name),
            ("SystemCreationClassName", "Msvm_ComputerSystem"),
            ("SystemName", host),
        ],
    )
}

/// `Msvm_VirtualSystemManagementService` on host `0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagementService(pub String);

impl CimObject for ManagementService {
    const CLASS: &'static str = "Msvm_VirtualSystemManagementService";

    fn to_instance(&self) -> Instance {
        service_instance(
            Self::CLASS,
            "vmms",
            &self.0,
            "Hyper-V Virtual System Management Service",
        )
    }

    fn path(&self) -> ObjectPath {
        service_path(Self::CLASS, "vmms", &self.0)
    }
}

/// `Msvm_VirtualSystemSnapshotService` on host `0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotService(pub String);

impl CimObject for SnapshotService {
    const CLASS: &'static str = "Msvm_VirtualSystemSnapshotService";

    fn to_instance(&self) -> Instance {
        service_instance(
            Self::CLASS,
            "vssnapsvc",
            &self.0,
            "Hyper-V Virtual System Snapshot Service",
        )
    }

    fn path(&self) -> ObjectPath {
        service_path(Self::CLASS, "vssnapsvc", &self.0)
    }
}
