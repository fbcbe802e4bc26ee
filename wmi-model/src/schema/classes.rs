//! The declarations themselves, after `WindowsVirtualization.V2.mof` (only what the model fills
//! in) and DMTF's interop schema.

use super::decl::{
    ClassDecl, MethodDecl, array, embedded_prop, input, input_embedded, input_ref, key, key_ref,
    output_ref, prop,
};
use crate::value::CimType::{Boolean, Datetime, String as Str, Uint16, Uint32, Uint64};

const MANAGED: &[&str] = &["CIM_ManagedElement"];
pub(super) const SYSTEM: &[&str] = &[
    "CIM_ComputerSystem",
    "CIM_System",
    "CIM_EnabledLogicalElement",
    "CIM_LogicalElement",
    "CIM_ManagedSystemElement",
    "CIM_ManagedElement",
];
pub(super) const SERVICE: &[&str] = &[
    "CIM_VirtualSystemManagementService",
    "CIM_Service",
    "CIM_EnabledLogicalElement",
    "CIM_LogicalElement",
    "CIM_ManagedSystemElement",
    "CIM_ManagedElement",
];
const SNAPSHOT_SERVICE: &[&str] = &[
    "CIM_VirtualSystemSnapshotService",
    "CIM_Service",
    "CIM_EnabledLogicalElement",
    "CIM_LogicalElement",
    "CIM_ManagedSystemElement",
    "CIM_ManagedElement",
];
pub(super) const VSSD: &[&str] = &[
    "CIM_VirtualSystemSettingData",
    "CIM_SettingData",
    "CIM_ManagedElement",
];
pub(super) const RASD: &[&str] = &[
    "CIM_ResourceAllocationSettingData",
    "CIM_SettingData",
    "CIM_ManagedElement",
];
const SASD: &[&str] = &[
    "CIM_StorageAllocationSettingData",
    "CIM_ResourceAllocationSettingData",
    "CIM_SettingData",
    "CIM_ManagedElement",
];
const JOB: &[&str] = &[
    "CIM_ConcreteJob",
    "CIM_Job",
    "CIM_LogicalElement",
    "CIM_ManagedSystemElement",
    "CIM_ManagedElement",
];

pub(super) fn class(
    name: &'static str,
    ancestors: &'static [&'static str],
    description: &'static str,
) -> ClassDecl {
    ClassDecl {
        name,
        superclass: ancestors.first().copied(),
        ancestors,
        association: false,
        indication: false,
        description,
        properties: Vec::new(),
        methods: Vec::new(),
    }
}

pub(super) fn association(
    name: &'static str,
    ancestor: &'static [&'static str],
    description: &'static str,
    ends: [(&'static str, &'static str); 2],
) -> ClassDecl {
    ClassDecl {
        association: true,
        properties: ends
            .iter()
            .map(|(role, class)| key_ref(role, class))
            .collect(),
        ..class(name, ancestor, description)
    }
}

pub(super) fn element_properties() -> Vec<super::PropertyDecl> {
    vec![
        prop("Caption", Str),
        prop("Description", Str),
        prop("ElementName", Str),
    ]
}

pub(super) fn service(
    name: &'static str,
    ancestors: &'static [&'static str],
    description: &'static str,
) -> ClassDecl {
    let mut properties = vec![
        key("CreationClassName"),
        key("Name"),
        key("SystemCreationClassName"),
        key("SystemName"),
    ];
    properties.extend(element_properties());
    properties.extend([
        prop("EnabledState", Uint16),
        prop("HealthState", Uint16),
        array("OperationalStatus", Uint16),
        prop("Started", Boolean),
    ]);
    ClassDecl {
        properties,
        ..class(name, ancestors, description)
    }
}

pub(super) fn rasd_properties() -> Vec<super::PropertyDecl> {
    let mut properties = vec![key("InstanceID")];
    properties.extend(element_properties());
    properties.extend([
        prop("ResourceType", Uint16),
        prop("ResourceSubType", Str),
        prop("AllocationUnits", Str),
        prop("VirtualQuantity", Uint64),
        prop("VirtualQuantityUnits", Str),
        prop("Reservation", Uint64),
        prop("Limit", Uint64),
        prop("Weight", Uint32),
        prop("Address", Str),
    ]);
    properties
}

/// `root/virtualization/v2`.
pub(super) fn virtualization() -> Vec<ClassDecl> {
    let job_ref = |array| output_ref("Job", "CIM_ConcreteJob", array);
    let computer_system = {
        let mut properties = vec![key("CreationClassName"), key("Name")];
        properties.extend(element_properties());
        properties.extend([
            prop("InstallDate", Datetime),
            array("OperationalStatus", Uint16),
            array("StatusDescriptions", Str),
            prop("HealthState", Uint16),
            prop("EnabledState", Uint16),
            prop("RequestedState", Uint16),
            prop("EnabledDefault", Uint16),
            array("AvailableRequestedStates", Uint16),
            prop("TimeOfLastStateChange", Datetime),
            prop("TimeOfLastConfigurationChange", Datetime),
            prop("OnTimeInMilliseconds", Uint64),
            prop("ProcessID", Uint32),
            prop("NumberOfNumaNodes", Uint16),
            prop("EnhancedSessionModeState", Uint16),
        ]);
        ClassDecl {
            properties,
            methods: vec![MethodDecl {
                name: "RequestStateChange",
                params: vec![
                    input("RequestedState", Uint16),
                    job_ref(false),
                    input("TimeoutPeriod", Datetime),
                ],
            }],
            ..class(
                "Msvm_ComputerSystem",
                SYSTEM,
                "A virtual machine or the hosting computer system.",
            )
        }
    };
    let vssd = {
        let mut properties = vec![key("InstanceID")];
        properties.extend(element_properties());
        properties.extend([
            prop("VirtualSystemIdentifier", Str),
            prop("VirtualSystemType", Str),
            prop("VirtualSystemSubType", Str),
            prop("Version", Str),
            prop("CreationTime", Datetime),
            array("Notes", Str),
            prop("ConfigurationDataRoot", Str),
            prop("ConfigurationFile", Str),
            prop("SuspendDataRoot", Str),
            prop("SnapshotDataRoot", Str),
            prop("Parent", Str),
            prop("IsSaved", Boolean),
            prop("UserSnapshotType", Uint16),
            prop("AutomaticStartupAction", Uint16),
            prop("AutomaticRecoveryAction", Uint16),
            array("BootSourceOrder", Str),
            prop("KernelFile", Str),
            prop("InitrdFile", Str),
            prop("KernelCommandLine", Str),
        ]);
        ClassDecl {
            properties,
            ..class(
                "Msvm_VirtualSystemSettingData",
                VSSD,
                "The settings of a virtual machine. KernelFile, InitrdFile and KernelCommandLine \
                 are vmms extensions: a Linux kernel booted directly instead of the test guest.",
            )
        }
    };
    let processor = ClassDecl {
        properties: rasd_properties(),
        ..class(
            "Msvm_ProcessorSettingData",
            RASD,
            "The virtual processors of a virtual machine (VirtualQuantity = count).",
        )
    };
    let memory = ClassDecl {
        properties: {
            let mut p = rasd_properties();
            p.push(prop("DynamicMemoryEnabled", Boolean));
            p
        },
        ..class(
            "Msvm_MemorySettingData",
            RASD,
            "The memory of a virtual machine (VirtualQuantity in MiB).",
        )
    };
    let storage = ClassDecl {
        properties: {
            let mut p = rasd_properties();
            p.extend([array("HostResource", Str), prop("Access", Uint16)]);
            p
        },
        ..class(
            "Msvm_StorageAllocationSettingData",
            SASD,
            "A disk image attached to a virtual machine (HostResource[0] = image path).",
        )
    };
    let vsms = ClassDecl {
        methods: vec![
            MethodDecl {
                name: "DefineSystem",
                params: vec![
                    input_embedded("SystemSettings", "Msvm_VirtualSystemSettingData", false),
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
                name: "ModifySystemSettings",
                params: vec![
                    input_embedded("SystemSettings", "CIM_VirtualSystemSettingData", false),
                    job_ref(false),
                ],
            },
            MethodDecl {
                name: "ModifyResourceSettings",
                params: vec![
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
            MethodDecl {
                name: "ExportSystemDefinition",
                params: vec![
                    input_ref("ComputerSystem", "CIM_ComputerSystem"),
                    input("ExportDirectory", Str),
                    input_embedded(
                        "ExportSettingData",
                        "Msvm_VirtualSystemExportSettingData",
                        false,
                    ),
                    job_ref(false),
                ],
            },
            MethodDecl {
                name: "ImportSystemDefinition",
                params: vec![
                    input("SystemDefinitionFile", Str),
                    input("SnapshotFolder", Str),
                    input("GenerateNewSystemIdentifier", Boolean),
                    output_ref("ImportedSystem", "CIM_VirtualSystemSettingData", false),
                    job_ref(false),
                ],
            },
            MethodDecl {
                name: "GetSummaryInformation",
                params: vec![
                    super::ParamDecl {
                        array: true,
                        ..input_ref("SettingData", "CIM_VirtualSystemSettingData")
                    },
                    super::ParamDecl {
                        array: true,
                        ..input("RequestedInformation", Uint32)
                    },
                    super::ParamDecl {
                        input: false,
                        output: true,
                        ..input_embedded("SummaryInformation", "Msvm_SummaryInformationBase", true)
                    },
                ],
            },
        ],
        ..service(
            "Msvm_VirtualSystemManagementService",
            SERVICE,
            "Defines, modifies and destroys virtual machines.",
        )
    };
    let snapshot_service = ClassDecl {
        methods: vec![
            MethodDecl {
                name: "CreateSnapshot",
                params: vec![
                    input_ref("AffectedSystem", "CIM_ComputerSystem"),
                    input_embedded(
                        "SnapshotSettings",
                        "Msvm_VirtualSystemSnapshotSettingData",
                        false,
                    ),
                    input("SnapshotType", Uint16),
                    output_ref("ResultingSnapshot", "CIM_VirtualSystemSettingData", false),
                    job_ref(false),
                ],
            },
            MethodDecl {
                name: "ApplySnapshot",
                params: vec![
                    input_ref("Snapshot", "CIM_VirtualSystemSettingData"),
                    job_ref(false),
                ],
            },
            MethodDecl {
                name: "DestroySnapshot",
                params: vec![
                    input_ref("AffectedSnapshot", "CIM_VirtualSystemSettingData"),
                    job_ref(false),
                ],
            },
            MethodDecl {
                name: "DestroySnapshotTree",
                params: vec![
                    input_ref("SnapshotSettingData", "CIM_VirtualSystemSettingData"),
                    job_ref(false),
                ],
            },
        ],
        ..service(
            "Msvm_VirtualSystemSnapshotService",
            SNAPSHOT_SERVICE,
            "Creates, applies and destroys checkpoints. CreateSnapshot takes a standard \
             checkpoint, or a production one when SnapshotSettings has ConsistencyLevel 1; the \
             job's affected element is the VM, and the new checkpoint is its \
             Msvm_MostCurrentSnapshotInBranch.",
        )
    };
    let job = ClassDecl {
        properties: {
            let mut p = vec![key("InstanceID")];
            p.extend(element_properties());
            p.extend([
                prop("JobState", Uint16),
                prop("PercentComplete", Uint16),
                prop("ErrorCode", Uint16),
                prop("ErrorDescription", Str),
                prop("ErrorSummaryDescription", Str),
                prop("JobStatus", Str),
                prop("JobType", Uint16),
                prop("Cancellable", Boolean),
                prop("TimeSubmitted", Datetime),
                prop("StartTime", Datetime),
                prop("ElapsedTime", Datetime),
                prop("TimeOfLastStateChange", Datetime),
                prop("DeleteOnCompletion", Boolean),
                prop("TimeBeforeRemoval", Datetime),
                array("OperationalStatus", Uint16),
            ]);
            p
        },
        ..class(
            "Msvm_ConcreteJob",
            JOB,
            "An asynchronous operation started by a method that returned 4096.",
        )
    };
    let summary = ClassDecl {
        properties: vec![
            prop("InstanceID", Str),
            prop("Name", Str),
            prop("ElementName", Str),
            prop("CreationTime", Datetime),
            array("Notes", Str),
            prop("Version", Str),
            prop("NumberOfProcessors", Uint16),
            prop("EnabledState", Uint16),
            prop("HealthState", Uint16),
            array("OperationalStatus", Uint16),
            array("StatusDescriptions", Str),
            prop("MemoryUsage", Uint64),
            prop("UpTime", Uint64),
            prop("Heartbeat", Uint16),
            prop("ProcessID", Uint32),
            prop("VirtualSystemSubType", Str),
            prop("HostComputerSystemName", Str),
            prop("AsynchronousTasks", Uint32),
        ],
        ..class(
            "Msvm_SummaryInformation",
            &["Msvm_SummaryInformationBase", "CIM_ManagedElement"],
            "What GetSummaryInformation returns about one virtual machine.",
        )
    };
    let affected_job = {
        let mut c = association(
            "Msvm_AffectedJobElement",
            &["CIM_AffectedJobElement"],
            "A job and the element it acts on.",
            [
                ("AffectedElement", "CIM_ManagedElement"),
                ("AffectingElement", "CIM_Job"),
            ],
        );
        c.properties.push(array("ElementEffects", Uint16));
        c
    };
    let shutdown = ClassDecl {
        properties: {
            let mut p = vec![
                key("CreationClassName"),
                key("DeviceID"),
                key("SystemCreationClassName"),
                key("SystemName"),
            ];
            p.extend(element_properties());
            p.extend([
                prop("EnabledState", Uint16),
                array("OperationalStatus", Uint16),
            ]);
            p
        },
        methods: vec![MethodDecl {
            name: "InitiateShutdown",
            params: vec![
                input("Force", Boolean),
                input("Reason", Str),
                job_ref(false),
            ],
        }],
        ..class(
            "Msvm_ShutdownComponent",
            &[
                "CIM_LogicalDevice",
                "CIM_EnabledLogicalElement",
                "CIM_LogicalElement",
                "CIM_ManagedSystemElement",
                "CIM_ManagedElement",
            ],
            "The guest shutdown integration of a running virtual machine.",
        )
    };
    vec![
        computer_system,
        vssd,
        shutdown,
        processor,
        memory,
        storage,
        vsms,
        snapshot_service,
        job,
        summary,
        association(
            "Msvm_SystemDevice",
            &["CIM_SystemDevice", "CIM_SystemComponent", "CIM_Component"],
            "A virtual machine and its devices (its shutdown component while it runs).",
            [
                ("GroupComponent", "CIM_ComputerSystem"),
                ("PartComponent", "CIM_LogicalDevice"),
            ],
        ),
        association(
            "Msvm_SettingsDefineState",
            &["CIM_SettingsDefineState", "CIM_ElementSettingData"],
            "A virtual machine and its live settings.",
            [
                ("ManagedElement", "CIM_ManagedElement"),
                ("SettingData", "CIM_SettingData"),
            ],
        ),
        association(
            "Msvm_VirtualSystemSettingDataComponent",
            &["CIM_VirtualSystemSettingDataComponent", "CIM_Component"],
            "A virtual machine's settings and its resource settings.",
            [
                ("GroupComponent", "CIM_VirtualSystemSettingData"),
                ("PartComponent", "CIM_ManagedElement"),
            ],
        ),
        association(
            "Msvm_SnapshotOfVirtualSystem",
            &["CIM_SnapshotOfVirtualSystem", "CIM_Dependency"],
            "A virtual machine and its checkpoints.",
            [
                ("Antecedent", "CIM_ComputerSystem"),
                ("Dependent", "CIM_VirtualSystemSettingData"),
            ],
        ),
        association(
            "Msvm_MostCurrentSnapshotInBranch",
            &["CIM_Dependency"],
            "A virtual machine and the checkpoint its state descends from.",
            [
                ("Antecedent", "CIM_ComputerSystem"),
                ("Dependent", "CIM_VirtualSystemSettingData"),
            ],
        ),
        association(
            "Msvm_ParentChildSettingData",
            &["CIM_Dependency"],
            "A checkpoint and the checkpoint it was taken on top of.",
            [
                ("Antecedent", "CIM_SettingData"),
                ("Dependent", "CIM_SettingData"),
            ],
        ),
        affected_job,
    ]
    .into_iter()
    .chain(indications())
    .collect()
}

/// The indication classes (delivered, never enumerated).
fn indications() -> Vec<ClassDecl> {
    let indication = |name, ancestors, description| ClassDecl {
        indication: true,
        properties: vec![
            prop("IndicationIdentifier", Str),
            prop("IndicationTime", Datetime),
            embedded_prop("SourceInstance", "CIM_ManagedElement"),
            embedded_prop("PreviousInstance", "CIM_ManagedElement"),
            prop("SourceInstanceModelPath", Str),
            prop("SourceInstanceHost", Str),
        ],
        ..class(name, ancestors, description)
    };
    vec![
        indication(
            "CIM_InstModification",
            &["CIM_InstIndication", "CIM_Indication"],
            "An instance changed: a virtual machine's state or health, or a job that ended.",
        ),
        indication(
            "CIM_InstCreation",
            &["CIM_InstIndication", "CIM_Indication"],
            "A virtual machine was defined.",
        ),
        indication(
            "CIM_InstDeletion",
            &["CIM_InstIndication", "CIM_Indication"],
            "A virtual machine was destroyed.",
        ),
    ]
}

/// `root/interop`: the subscription classes.
pub(super) fn interop() -> Vec<ClassDecl> {
    let system_keys = || {
        vec![
            key("SystemCreationClassName"),
            key("SystemName"),
            key("CreationClassName"),
            key("Name"),
        ]
    };
    let filter = ClassDecl {
        properties: {
            let mut p = system_keys();
            p.extend([
                prop("Query", Str),
                prop("QueryLanguage", Str),
                prop("SourceNamespace", Str),
                array("SourceNamespaces", Str),
            ]);
            p
        },
        ..class(
            "CIM_IndicationFilter",
            MANAGED,
            "A WQL query selecting indications.",
        )
    };
    let destination = ClassDecl {
        properties: {
            let mut p = system_keys();
            p.extend([prop("Destination", Str), prop("PersistenceType", Uint16)]);
            p
        },
        ..class(
            "CIM_ListenerDestinationCIMXML",
            &["CIM_ListenerDestination", "CIM_ManagedElement"],
            "A CIM-XML listener (http URL) that receives ExportIndication requests.",
        )
    };
    let subscription = {
        let mut c = association(
            "CIM_IndicationSubscription",
            &["CIM_ManagedElement"],
            "Sends the indications a filter selects to a listener.",
            [
                ("Filter", "CIM_IndicationFilter"),
                ("Handler", "CIM_ListenerDestination"),
            ],
        );
        c.properties.push(prop("SubscriptionState", Uint16));
        c
    };
    vec![filter, destination, subscription]
}
