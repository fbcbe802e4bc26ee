//! A running VM's display as Hyper-V's model shows it: `Msvm_SyntheticDisplayController` and its
//! `Msvm_VideoHead`, linked by `Msvm_VideoHeadOnController` and to the VM by `Msvm_SystemDevice`.
//! Here the display is the RDP console's framebuffer (COM1 rendered as text): its size is the
//! console server's, which the integrator gives the provider ([`ConsoleGeometry`]). Like
//! Hyper-V's logical devices they exist only while the VM runs.

use vmm_core::VmId;

use super::CimObject;
use crate::instance::Instance;
use crate::path::ObjectPath;
use crate::value::CimType::{Uint16, Uint32};

const CONTROLLER: &str = "Msvm_SyntheticDisplayController";
const HEAD: &str = "Msvm_VideoHead";
const SYSTEM_CLASS: &str = "Msvm_ComputerSystem";

/// The console framebuffer every VM's console server draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsoleGeometry {
    /// Pixels across.
    pub width: u32,
    /// Pixels down.
    pub height: u32,
    /// Bits per pixel of the frames sent.
    pub bits_per_pixel: u32,
    /// Text columns.
    pub columns: u32,
    /// Text rows.
    pub rows: u32,
}

fn device_path(class: &str, vm: VmId, device_id: &str) -> ObjectPath {
    ObjectPath::new(
        class,
        &[
            ("CreationClassName", class),
            ("DeviceID", device_id),
            ("SystemCreationClassName", SYSTEM_CLASS),
            ("SystemName", &vm.to_string()),
        ],
    )
}

fn device(class: &str, vm: VmId, device_id: String) -> Instance {
    Instance::new(class)
        .string("CreationClassName", Some(class))
        .string("DeviceID", Some(device_id))
        .string("SystemCreationClassName", Some(SYSTEM_CLASS))
        .string("SystemName", Some(vm.to_string()))
        .integer("EnabledState", Uint16, Some(2u16))
        .integer("HealthState", Uint16, Some(5u16))
        .integers("OperationalStatus", Uint16, &[2])
}

/// `Msvm_SyntheticDisplayController` of a running VM: its console server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyntheticDisplayController(pub VmId);

impl SyntheticDisplayController {
    fn device_id(vm: VmId) -> String {
        format!("Microsoft:{vm}\\SyntheticDisplayController")
    }

    /// The path of VM `vm`'s controller.
    pub fn path_of(vm: VmId) -> ObjectPath {
        device_path(CONTROLLER, vm, &Self::device_id(vm))
    }
}

impl CimObject for SyntheticDisplayController {
    const CLASS: &'static str = CONTROLLER;

    fn to_instance(&self) -> Instance {
        device(CONTROLLER, self.0, Self::device_id(self.0))
            .string("ElementName", Some("Synthetic Display Controller"))
            .string("Caption", Some("Synthetic Display Controller"))
            .string(
                "Description",
                Some("The VM's console over RDP: COM1 rendered as text on a framebuffer"),
            )
    }

    fn path(&self) -> ObjectPath {
        Self::path_of(self.0)
    }
}

/// `Msvm_VideoHead` of a running VM: the console framebuffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VideoHead {
    /// The VM.
    pub vm: VmId,
    /// The framebuffer.
    pub geometry: ConsoleGeometry,
}

impl VideoHead {
    fn device_id(vm: VmId) -> String {
        format!("Microsoft:{vm}\\Head\\0")
    }

    /// The path of VM `vm`'s video head.
    pub fn path_of(vm: VmId) -> ObjectPath {
        device_path(HEAD, vm, &Self::device_id(vm))
    }
}

impl CimObject for VideoHead {
    const CLASS: &'static str = HEAD;

    fn to_instance(&self) -> Instance {
        let g = self.geometry;
        device(HEAD, self.vm, Self::device_id(self.vm))
            .string("Name", Some("Video Head"))
            .string("ElementName", Some("Video Head"))
            .string("Caption", Some("Video Head"))
            .string("Description", Some("The console framebuffer"))
            .integer("CurrentHorizontalResolution", Uint32, Some(g.width))
            .integer("CurrentVerticalResolution", Uint32, Some(g.height))
            .integer("CurrentBitsPerPixel", Uint32, Some(g.bits_per_pixel))
            .integer("CurrentNumberOfColumns", Uint32, Some(g.columns))
            .integer("CurrentNumberOfRows", Uint32, Some(g.rows))
    }

    fn path(&self) -> ObjectPath {
        Self::path_of(self.vm)
    }
}
