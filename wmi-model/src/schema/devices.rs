//! The firmware and video classes (`WindowsVirtualization.V2.mof`, only what the model fills in):
//! the VM's BIOS element and boot source, its synthetic display controller and video head, and
//! their associations.

use super::classes::{association, class, element_properties};
use super::decl::{ClassDecl, array, key, prop};
use crate::value::CimType::{Boolean, String as Str, Uint16, Uint32};

const BIOS: &[&str] = &[
    "CIM_BIOSElement",
    "CIM_SoftwareElement",
    "CIM_LogicalElement",
    "CIM_ManagedSystemElement",
    "CIM_ManagedElement",
];
const BOOT_SOURCE: &[&str] = &[
    "CIM_BootSourceSettingData",
    "CIM_SettingData",
    "CIM_ManagedElement",
];
const DISPLAY_CONTROLLER: &[&str] = &[
    "CIM_DisplayController",
    "CIM_Controller",
    "CIM_LogicalDevice",
    "CIM_EnabledLogicalElement",
    "CIM_LogicalElement",
    "CIM_ManagedSystemElement",
    "CIM_ManagedElement",
];
const VIDEO_HEAD: &[&str] = &[
    "CIM_VideoHead",
    "CIM_LogicalDevice",
    "CIM_EnabledLogicalElement",
    "CIM_LogicalElement",
    "CIM_ManagedSystemElement",
    "CIM_ManagedElement",
];

/// A logical device's keys and state.
fn device_properties() -> Vec<super::PropertyDecl> {
    let mut p = vec![
        key("CreationClassName"),
        key("DeviceID"),
        key("SystemCreationClassName"),
        key("SystemName"),
    ];
    p.extend(element_properties());
    p.extend([
        prop("EnabledState", Uint16),
        prop("HealthState", Uint16),
        array("OperationalStatus", Uint16),
    ]);
    p
}

/// The firmware and video classes of `root/virtualization/v2`.
pub(super) fn classes() -> Vec<ClassDecl> {
    let bios = ClassDecl {
        properties: {
            let mut p = vec![
                key("Name"),
                key("Version"),
                key("SoftwareElementState"),
                key("SoftwareElementID"),
                key("TargetOperatingSystem"),
            ];
            p.extend(element_properties());
            p.extend([prop("Manufacturer", Str), prop("PrimaryBIOS", Boolean)]);
            p
        },
        ..class(
            "Msvm_BIOSElement",
            BIOS,
            "A virtual machine's firmware: the worker's loader of its boot source (no BIOS image).",
        )
    };
    let boot_source = ClassDecl {
        properties: {
            let mut p = vec![key("InstanceID")];
            p.extend(element_properties());
            p.extend([
                prop("BootSourceDescription", Str),
                prop("BootSourceType", Uint16),
                prop("FirmwareDevicePath", Str),
            ]);
            p
        },
        ..class(
            "Msvm_BootSourceSettingData",
            BOOT_SOURCE,
            "What a virtual machine boots: a Linux kernel file, or the test guest.",
        )
    };
    let controller = ClassDecl {
        properties: device_properties(),
        ..class(
            "Msvm_SyntheticDisplayController",
            DISPLAY_CONTROLLER,
            "A running virtual machine's display: its console server over RDP.",
        )
    };
    let head = ClassDecl {
        properties: {
            let mut p = device_properties();
            p.extend([
                prop("Name", Str),
                prop("CurrentHorizontalResolution", Uint32),
                prop("CurrentVerticalResolution", Uint32),
                prop("CurrentBitsPerPixel", Uint32),
                prop("CurrentNumberOfColumns", Uint32),
                prop("CurrentNumberOfRows", Uint32),
            ]);
            p
        },
        ..class(
            "Msvm_VideoHead",
            VIDEO_HEAD,
            "The framebuffer of a running virtual machine's console (COM1 as text).",
        )
    };
    vec![
        bios,
        boot_source,
        controller,
        head,
        association(
            "Msvm_SystemBIOS",
            &["CIM_SystemBIOS", "CIM_SystemComponent", "CIM_Component"],
            "A virtual machine and its firmware.",
            [
                ("GroupComponent", "CIM_System"),
                ("PartComponent", "CIM_BIOSElement"),
            ],
        ),
        association(
            "Msvm_VideoHeadOnController",
            &[
                "CIM_VideoHeadOnController",
                "CIM_HostedDependency",
                "CIM_Dependency",
            ],
            "A display controller and its video head.",
            [
                ("Antecedent", "CIM_DisplayController"),
                ("Dependent", "CIM_VideoHead"),
            ],
        ),
    ]
}
