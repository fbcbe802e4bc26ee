//! The networking classes (`WindowsVirtualization.V2.mof`, only what the model fills in): virtual
//! switches, their settings and management service, a VM's synthetic NIC and its connection.

use super::classes::{
    RASD, SERVICE, SYSTEM, VSSD, association, class, element_properties, rasd_properties, service,
};
use super::decl::{ClassDecl, MethodDecl, array, input_embedded, input_ref, key, output_ref, prop};
use crate::value::CimType::{Boolean, String as Str, Uint16};

const EPASD: &[&str] = &[
    "CIM_EthernetPortAllocationSettingData",
    "CIM_ResourceAllocationSettingData",
    "CIM_SettingData",
    "CIM_ManagedElement",
];
const PORT: &[&str] = &[
    "CIM_EthernetPort",
    "CIM_NetworkPort",
    "CIM_LogicalPort",
    "CIM_LogicalDevice",
    "CIM_EnabledLogicalElement",
    "CIM_LogicalElement",
    "CIM_ManagedSystemElement",
    "CIM_ManagedElement",
];

/// The networking classes of `root/virtualization/v2`.
pub(super) fn classes() -> Vec<ClassDecl> {
    let job_ref = |array| output_ref("Job", "CIM_ConcreteJob", array);
    let switch = ClassDecl {
        properties: {
            let mut p = vec![key("CreationClassName"), key("Name")];
            p.extend(element_properties());
            p.extend([
                prop("EnabledState", Uint16),
                prop("HealthState", Uint16),
                array("OperationalStatus", Uint16),
            ]);
            p
        },
        ..class(
            "Msvm_VirtualEthernetSwitch",
            SYSTEM,
            "A virtual switch: a bridge the service owns, VMs' adapters as its ports.",
        )
    };
    let switch_settings = ClassDecl {
        properties: {
            let mut p = vec![key("InstanceID")];
            p.extend(element_properties());
            p.extend([
                prop("VirtualSystemIdentifier", Str),
                prop("VirtualSystemType", Str),
            ]);
            p
        },
        ..class(
            "Msvm_VirtualEthernetSwitchSettingData",
            VSSD,
            "The settings of a virtual switch.",
        )
    };
    let switch_service = ClassDecl {
        methods: vec![
            MethodDecl {
                name: "DefineSystem",
                params: vec![
                    input_embedded(
                        "SystemSettings",
                        "Msvm_VirtualEthernetSwitchSettingData",
                        false,
                    ),
                    input_embedded(
                        "ResourceSettings",
                        "CIM_ResourceAllocationSettingData",
                        true,
                    ),
                    input_ref("ReferenceConfiguration", "CIM_VirtualSystemSettingData"),
                    output_ref("ResultingSystem", "CIM_ComputerSystem", false),
                    job_ref(false),
                ],
            },
            MethodDecl {
                name: "DestroySystem",
                params: vec![
                    input_ref("AffectedSystem", "CIM_ComputerSystem"),
                    job_ref(false),
                ],
            },
            MethodDecl {
                name: "AddResourceSettings",
                params: vec![
                    input_ref("AffectedConfiguration", "CIM_VirtualSystemSettingData"),
                    input_embedded(
                        "ResourceSettings",
                        "CIM_ResourceAllocationSettingData",
                        true,
                    ),
                    output_ref(
                        "ResultingResourceSettings",
                        "CIM_ResourceAllocationSettingData",
                        true,
                    ),
                    job_ref(false),
                ],
            },
        ],
        ..service(
            "Msvm_VirtualEthernetSwitchManagementService",
            SERVICE,
            "Creates, removes and connects virtual switches.",
        )
    };
    let synthetic_port = ClassDecl {
        properties: {
            let mut p = rasd_properties();
            p.extend([
                prop("StaticMacAddress", Boolean),
                array("VirtualSystemIdentifiers", Str),
            ]);
            p
        },
        ..class(
            "Msvm_SyntheticEthernetPortSettingData",
            RASD,
            "A virtual machine's network adapter (virtio-net): its MAC address.",
        )
    };
    let port_allocation = ClassDecl {
        properties: {
            let mut p = rasd_properties();
            p.extend([
                prop("Parent", Str),
                array("HostResource", Str),
                prop("EnabledState", Uint16),
            ]);
            p
        },
        ..class(
            "Msvm_EthernetPortAllocationSettingData",
            EPASD,
            "The connection of a network adapter to a virtual switch (HostResource).",
        )
    };
    let internal_port = ClassDecl {
        properties: {
            let mut p = vec![
                key("CreationClassName"),
                key("DeviceID"),
                key("SystemCreationClassName"),
                key("SystemName"),
            ];
            p.extend(element_properties());
            p.extend([
                prop("Name", Str),
                prop("EnabledState", Uint16),
                array("NetworkAddresses", Str),
            ]);
            p
        },
        ..class(
            "Msvm_InternalEthernetPort",
            PORT,
            "The host's port on an internal virtual switch (the bridge, with the host's address).",
        )
    };
    vec![
        switch,
        switch_settings,
        switch_service,
        synthetic_port,
        port_allocation,
        internal_port,
        association(
            "Msvm_VirtualEthernetSwitchSettingDataComponent",
            &["CIM_Component"],
            "A virtual switch's settings and its internal port's allocation.",
            [
                ("GroupComponent", "CIM_VirtualSystemSettingData"),
                ("PartComponent", "CIM_ManagedElement"),
            ],
        ),
        association(
            "Msvm_HostedEthernetPort",
            &["CIM_HostedDependency", "CIM_Dependency"],
            "A virtual switch and the host's internal port on it.",
            [
                ("Antecedent", "CIM_ComputerSystem"),
                ("Dependent", "CIM_EthernetPort"),
            ],
        ),
    ]
}
