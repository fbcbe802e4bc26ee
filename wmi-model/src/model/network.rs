//! Virtual switches and network adapters as CIM objects, built from the store's switch file
//! (`vswitch`): `Msvm_VirtualEthernetSwitch` and its settings, the switch management service,
//! `Msvm_SyntheticEthernetPortSettingData` (a VM's NIC), `Msvm_EthernetPortAllocationSettingData`
//! (its connection, `HostResource` = the switch) and `Msvm_InternalEthernetPort` (the host on an
//! internal switch).

use vswitch::{Adapter, Switch, SwitchKind};

use super::CimObject;
use crate::instance::Instance;
use crate::path::ObjectPath;
use crate::value::CimType::Uint16;

const SWITCH: &str = "Msvm_VirtualEthernetSwitch";
const SWITCH_SETTINGS: &str = "Msvm_VirtualEthernetSwitchSettingData";
const SWITCH_SERVICE: &str = "Msvm_VirtualEthernetSwitchManagementService";
const SYNTHETIC_PORT: &str = "Msvm_SyntheticEthernetPortSettingData";
const PORT_ALLOCATION: &str = "Msvm_EthernetPortAllocationSettingData";
const INTERNAL_PORT: &str = "Msvm_InternalEthernetPort";
/// `ResourceType` of an Ethernet adapter and of an Ethernet connection (CIM).
const ETHERNET_ADAPTER: u16 = 10;
const ETHERNET_CONNECTION: u16 = 33;

/// A virtual switch.
#[derive(Debug, Clone)]
pub struct EthernetSwitch(pub Switch);

impl EthernetSwitch {
    /// The path of the switch with id `id`.
    pub fn path_of(id: &str) -> ObjectPath {
        ObjectPath::new(SWITCH, &[("CreationClassName", SWITCH), ("Name", id)])
    }
}

impl CimObject for EthernetSwitch {
    const CLASS: &'static str = SWITCH;

    fn to_instance(&self) -> Instance {
        Instance::new(SWITCH)
            .string("CreationClassName", Some(SWITCH))
            .string("Name", Some(self.0.id.clone()))
            .string("ElementName", Some(self.0.name.clone()))
            .string("Caption", Some("Virtual Switch"))
            .string(
                "Description",
                Some(format!("{} virtual switch", self.0.kind.name())),
            )
            .integer("EnabledState", Uint16, Some(2u16))
            .integer("HealthState", Uint16, Some(5u16))
            .integers("OperationalStatus", Uint16, &[2])
    }

    fn path(&self) -> ObjectPath {
        Self::path_of(&self.0.id)
    }
}

/// A virtual switch's settings.
#[derive(Debug, Clone)]
pub struct EthernetSwitchSettingData(pub Switch);

impl EthernetSwitchSettingData {
    /// The path of the settings of the switch with id `id`.
    pub fn path_of(id: &str) -> ObjectPath {
        ObjectPath::new(
            SWITCH_SETTINGS,
            &[("InstanceID", &format!("Microsoft:{id}"))],
        )
    }

    /// The switch id an `InstanceID` of switch settings names.
    pub fn switch_of(instance_id: &str) -> Option<&str> {
        instance_id.strip_prefix("Microsoft:")
    }
}

impl CimObject for EthernetSwitchSettingData {
    const CLASS: &'static str = SWITCH_SETTINGS;

    fn to_instance(&self) -> Instance {
        Instance::new(SWITCH_SETTINGS)
            .string("InstanceID", Some(format!("Microsoft:{}", self.0.id)))
            .string("ElementName", Some(self.0.name.clone()))
            .string("Caption", Some("Virtual Ethernet Switch Settings"))
            .string("Description", Some(self.0.kind.name()))
            .string("VirtualSystemIdentifier", Some(self.0.id.clone()))
            .string("VirtualSystemType", Some("DMTF:Virtual Ethernet Switch"))
    }

    fn path(&self) -> ObjectPath {
        Self::path_of(&self.0.id)
    }
}

/// `Msvm_VirtualEthernetSwitchManagementService` of the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwitchManagementService(pub String);

impl CimObject for SwitchManagementService {
    const CLASS: &'static str = SWITCH_SERVICE;

    fn to_instance(&self) -> Instance {
        let caption = "Hyper-V Virtual Switch Management Service";
        Instance::new(SWITCH_SERVICE)
            .string("CreationClassName", Some(SWITCH_SERVICE))
            .string("Name", Some("nvspwmi"))
            .string("SystemCreationClassName", Some("Msvm_ComputerSystem"))
            .string("SystemName", Some(self.0.clone()))
            .string("Caption", Some(caption))
            .string("Description", Some(caption))
            .string("ElementName", Some(caption))
            .integer("EnabledState", Uint16, Some(2u16))
            .integer("HealthState", Uint16, Some(5u16))
            .integers("OperationalStatus", Uint16, &[2])
            .boolean("Started", Some(true))
    }

    fn path(&self) -> ObjectPath {
        ObjectPath::new(
            SWITCH_SERVICE,
            &[
                ("CreationClassName", SWITCH_SERVICE),
                ("Name", "nvspwmi"),
                ("SystemCreationClassName", "Msvm_ComputerSystem"),
                ("SystemName", &self.0),
            ],
        )
    }
}

/// A VM's network adapter.
#[derive(Debug, Clone)]
pub struct SyntheticEthernetPort(pub Adapter);

impl SyntheticEthernetPort {
    /// The path of adapter `adapter` of VM `vm`.
    pub fn path_of(vm: &str, adapter: &str) -> ObjectPath {
        ObjectPath::new(
            SYNTHETIC_PORT,
            &[("InstanceID", &format!("Microsoft:{vm}\\{adapter}"))],
        )
    }

    /// (VM, adapter id) of an adapter's `InstanceID`.
    pub fn ids_of(instance_id: &str) -> Option<(&str, &str)> {
        let rest = instance_id.strip_prefix("Microsoft:")?;
        let (vm, adapter) = rest.split_once('\\')?;
        Some((vm, adapter.strip_suffix("\\C").unwrap_or(adapter)))
    }
}

/// Hyper-V's form of a MAC address: twelve upper-case hex digits.
fn hyperv_mac(adapter: &Adapter) -> String {
    adapter.mac.0.iter().map(|b| format!("{b:02X}")).collect()
}

impl CimObject for SyntheticEthernetPort {
    const CLASS: &'static str = SYNTHETIC_PORT;

    fn to_instance(&self) -> Instance {
        let a = &self.0;
        Instance::new(SYNTHETIC_PORT)
            .string("InstanceID", Some(format!("Microsoft:{}\\{}", a.vm, a.id)))
            .string("ElementName", Some("Network Adapter"))
            .string("Caption", Some("Virtual Ethernet Port"))
            .string("Description", Some("virtio-net"))
            .integer("ResourceType", Uint16, Some(ETHERNET_ADAPTER))
            .string(
                "ResourceSubType",
                Some("Microsoft:Hyper-V:Synthetic Ethernet Port"),
            )
            .string("Address", Some(hyperv_mac(a)))
            .boolean("StaticMacAddress", Some(a.static_mac))
            .strings("VirtualSystemIdentifiers", vec![format!("{{{}}}", a.id)])
    }

    fn path(&self) -> ObjectPath {
        Self::path_of(&self.0.vm, &self.0.id)
    }
}

/// The connection of a VM's adapter to its switch (only while connected).
#[derive(Debug, Clone)]
pub struct EthernetPortAllocation {
    /// The adapter.
    pub adapter: Adapter,
    /// The switch's id.
    pub switch_id: String,
}

impl EthernetPortAllocation {
    /// The path of the connection of adapter `adapter` of VM `vm`.
    pub fn path_of(vm: &str, adapter: &str) -> ObjectPath {
        ObjectPath::new(
            PORT_ALLOCATION,
            &[("InstanceID", &format!("Microsoft:{vm}\\{adapter}\\C"))],
        )
    }
}

impl CimObject for EthernetPortAllocation {
    const CLASS: &'static str = PORT_ALLOCATION;

    fn to_instance(&self) -> Instance {
        let a = &self.adapter;
        Instance::new(PORT_ALLOCATION)
            .string(
                "InstanceID",
                Some(format!("Microsoft:{}\\{}\\C", a.vm, a.id)),
            )
            .string("ElementName", Some("Dynamic Ethernet Switch Port"))
            .string("Caption", Some("Ethernet Switch Port Settings"))
            .string("Description", Some(a.tap.clone()))
            .integer("ResourceType", Uint16, Some(ETHERNET_CONNECTION))
            .string(
                "ResourceSubType",
                Some("Microsoft:Hyper-V:Ethernet Connection"),
            )
            .string(
                "Parent",
                Some(SyntheticEthernetPort::path_of(&a.vm, &a.id).to_string()),
            )
            .strings(
                "HostResource",
                vec![EthernetSwitch::path_of(&self.switch_id).to_string()],
            )
            .integer("EnabledState", Uint16, Some(2u16))
    }

    fn path(&self) -> ObjectPath {
        Self::path_of(&self.adapter.vm, &self.adapter.id)
    }
}

/// The host's port on an internal switch.
#[derive(Debug, Clone)]
pub struct InternalEthernetPort {
    /// The switch.
    pub switch: Switch,
    /// The host's name.
    pub host: String,
}

impl InternalEthernetPort {
    fn device_id(switch: &Switch) -> String {
        format!("Microsoft:{}", switch.id)
    }
}

impl CimObject for InternalEthernetPort {
    const CLASS: &'static str = INTERNAL_PORT;

    fn to_instance(&self) -> Instance {
        let addresses = match &self.switch.kind {
            SwitchKind::Internal { subnet } => {
                vec![format!("{}/{}", subnet.host_address(), subnet.prefix)]
            }
            _ => Vec::new(),
        };
        Instance::new(INTERNAL_PORT)
            .string("CreationClassName", Some(INTERNAL_PORT))
            .string("DeviceID", Some(Self::device_id(&self.switch)))
            .string("SystemCreationClassName", Some("Msvm_ComputerSystem"))
            .string("SystemName", Some(self.host.clone()))
            .string("ElementName", Some(self.switch.name.clone()))
            .string("Caption", Some("Internal Ethernet Port"))
            .string("Description", Some("The host's port on an internal switch"))
            .string("Name", Some(self.switch.bridge.clone()))
            .integer("EnabledState", Uint16, Some(2u16))
            .strings("NetworkAddresses", addresses)
    }

    fn path(&self) -> ObjectPath {
        ObjectPath::new(
            INTERNAL_PORT,
            &[
                ("CreationClassName", INTERNAL_PORT),
                ("DeviceID", &Self::device_id(&self.switch)),
                ("SystemCreationClassName", "Msvm_ComputerSystem"),
                ("SystemName", &self.host),
            ],
        )
    }
}
