//! `Msvm_ShutdownComponent`: the guest shutdown integration of a running VM, what `stop-vm`
//! without `--turn-off` maps to. Hyper-V exposes one per running VM with the service enabled,
//! linked to its `Msvm_ComputerSystem` by `Msvm_SystemDevice`.

use std::time::Duration;

use vmm_core::VmId;

use super::CimObject;
use crate::instance::Instance;
use crate::path::ObjectPath;
use crate::value::CimType::Uint16;

const CLASS: &str = "Msvm_ShutdownComponent";
const SYSTEM_CLASS: &str = "Msvm_ComputerSystem";

/// How long `InitiateShutdown` waits for the guest to power off before turning it off (the job
/// then ends `CompletedWithWarnings`). Hyper-V's method takes no timeout either; this is the
/// default of the CLI's `stop-vm --timeout` (10 s).
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// The shutdown component of the VM it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownComponent(pub VmId);

impl ShutdownComponent {
    /// The path of VM `id`'s component.
    pub fn path_of(id: VmId) -> ObjectPath {
        ObjectPath::new(
            CLASS,
            &[
                ("CreationClassName", CLASS),
                ("DeviceID", &Self::device_id(id)),
                ("SystemCreationClassName", SYSTEM_CLASS),
                ("SystemName", &id.to_string()),
            ],
        )
    }

    fn device_id(id: VmId) -> String {
        format!("Microsoft:{id}\\ShutdownComponent")
    }

    /// The VM a component path names.
    pub fn vm_of(path: &ObjectPath) -> Option<VmId> {
        path.key("SystemName").and_then(|n| n.parse().ok())
    }
}

impl CimObject for ShutdownComponent {
    const CLASS: &'static str = CLASS;

    fn to_instance(&self) -> Instance {
        Instance::new(CLASS)
            .string("CreationClassName", Some(CLASS))
            .string("DeviceID", Some(Self::device_id(self.0)))
            .string("SystemCreationClassName", Some(SYSTEM_CLASS))
            .string("SystemName", Some(self.0.to_string()))
            .string("ElementName", Some("Shutdown"))
            .string("Caption", Some("Shutdown"))
            .string("Description", Some("Guest shutdown integration"))
            .integer("EnabledState", Uint16, Some(2u16))
            .integers("OperationalStatus", Uint16, &[2])
    }

    fn path(&self) -> ObjectPath {
        Self::path_of(self.0)
    }
}
