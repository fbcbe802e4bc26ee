//! The settings classes: `Msvm_VirtualSystemSettingData` (VSSD) and the resource allocation
//! settings (processor, memory, disks), rendered from a [`VmConfig`] and parsed back from the
//! embedded instances `DefineSystem`, `ModifySystemSettings`, `ModifyResourceSettings` and
//! `AddResourceSettings` receive.

use std::path::{Path, PathBuf};

use vmm_core::{BootSource, VmConfig, VmId};

use super::CimObject;
use crate::error::{CimError, CimResult, CimStatus};
use crate::instance::Instance;
use crate::path::ObjectPath;
use crate::value::CimType::{Uint16, Uint32, Uint64};
use crate::value::{CimValue, Scalar};

const VSSD: &str = "Msvm_VirtualSystemSettingData";
const PROCESSOR: &str = "Msvm_ProcessorSettingData";
const MEMORY: &str = "Msvm_MemorySettingData";
const STORAGE: &str = "Msvm_StorageAllocationSettingData";

/// `Msvm_VirtualSystemSettingData` of a VM: its live (`System:Realized`) settings.
#[derive(Debug, Clone, PartialEq)]
pub struct VirtualSystemSettingData {
    /// The definition.
    pub config: VmConfig,
    /// `ConfigurationDataRoot`: the VM's folder in the store.
    pub configuration_data_root: PathBuf,
    /// `IsSaved`: a saved state exists.
    pub is_saved: bool,
}

impl VirtualSystemSettingData {
    /// `InstanceID` of VM `id`'s settings (`Microsoft:<GUID>`, as Hyper-V).
    pub fn instance_id(id: VmId) -> String {
        format!("Microsoft:{id}")
    }

    /// The path of VM `id`'s settings.
    pub fn path_of(id: VmId) -> ObjectPath {
        ObjectPath::new(VSSD, &[("InstanceID", &Self::instance_id(id))])
    }

    /// The VM an `InstanceID` of any settings class of this model belongs to.
    pub fn vm_of(instance_id: &str) -> Option<VmId> {
        let rest = instance_id.strip_prefix("Microsoft:")?;
        let guid = rest.split('\\').next()?;
        guid.parse().ok()
    }
}

impl CimObject for VirtualSystemSettingData {
    const CLASS: &'static str = VSSD;

    fn to_instance(&self) -> Instance {
        let c = &self.config;
        let (kernel, initrd, cmdline) = match &c.boot {
            BootSource::TestGuest => (None, None, None),
            BootSource::Kernel {
                kernel,
                initrd,
                cmdline,
            } => (
                Some(kernel.display().to_string()),
                initrd.as_ref().map(|p| p.display().to_string()),
                Some(cmdline.clone()),
            ),
        };
        let root = self.configuration_data_root.display().to_string();
        Instance::new(VSSD)
            .string("InstanceID", Some(Self::instance_id(c.id)))
            .string("Caption", Some("Virtual Machine Settings"))
            .string(
                "Description",
                Some("Active settings for the virtual machine"),
            )
            .string("ElementName", Some(c.name.clone()))
            .string("VirtualSystemIdentifier", Some(c.id.to_string()))
            .string(
                "VirtualSystemType",
                Some("Microsoft:Hyper-V:System:Realized"),
            )
            .string("VirtualSystemSubType", Some("Microsoft:Hyper-V:SubType:1"))
            .string("Version", Some(format!("{}.0", c.version)))
            .timestamp("CreationTime", Some(c.created))
            .strings("Notes", Vec::new())
            .string("ConfigurationDataRoot", Some(root.clone()))
            .string("ConfigurationFile", Some("config.json"))
            .string("SuspendDataRoot", Some(format!("{root}/state")))
            .string("SnapshotDataRoot", Some(format!("{root}/checkpoints")))
            .string("Parent", None::<String>)
            .boolean("IsSaved", Some(self.is_saved))
            .integer(
                "AutomaticStartupAction",
                Uint16,
                Some(c.automatic_start_action.code()),
            )
            .integer(
                "AutomaticRecoveryAction",
                Uint16,
                Some(c.automatic_recovery_action.code()),
            )
            // Hyper-V's generation 2 boot order: here always the one boot source.
            .strings(
                "BootSourceOrder",
                vec![super::BootSourceSettingData::path_of(c.id).to_string()],
            )
            .string("KernelFile", kernel)
            .string("InitrdFile", initrd)
            .string("KernelCommandLine", cmdline)
    }

    fn path(&self) -> ObjectPath {
        Self::path_of(self.config.id)
    }
}

fn rasd(
    class: &str,
    instance_id: String,
    caption: &str,
    resource_type: u16,
    subtype: &str,
) -> Instance {
    Instance::new(class)
        .string("InstanceID", Some(instance_id))
        .string("Caption", Some(caption))
        .string("Description", Some(format!("Settings for {caption}")))
        .string("ElementName", Some(caption))
        .integer("ResourceType", Uint16, Some(resource_type))
        .string("ResourceSubType", Some(subtype))
}

/// `Msvm_ProcessorSettingData` of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessorSettingData {
    /// The VM.
    pub vm: VmId,
    /// `VirtualQuantity`: vCPUs.
    pub count: u8,
}

impl ProcessorSettingData {
    /// The path of VM `id`'s processor settings.
    pub fn path_of(id: VmId) -> ObjectPath {
        ObjectPath::new(
            PROCESSOR,
            &[("InstanceID", &format!("Microsoft:{id}\\Processor"))],
        )
    }
}

impl CimObject for ProcessorSettingData {
    const CLASS: &'static str = PROCESSOR;

    fn to_instance(&self) -> Instance {
        rasd(
            PROCESSOR,
            format!("Microsoft:{}\\Processor", self.vm),
            "Processor",
            3,
            "Microsoft:Hyper-V:Processor",
        )
        .string("AllocationUnits", Some("count"))
        .integer("VirtualQuantity", Uint64, Some(self.count))
        .string("VirtualQuantityUnits", Some("count"))
        .integer("Reservation", Uint64, Some(0u8))
        .integer("Limit", Uint64, Some(100_000u32))
        .integer("Weight", Uint32, Some(100u8))
    }

    fn path(&self) -> ObjectPath {
        Self::path_of(self.vm)
    }
}

/// `Msvm_MemorySettingData` of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemorySettingData {
    /// The VM.
    pub vm: VmId,
    /// `VirtualQuantity`: MiB.
    pub mib: u64,
}

impl MemorySettingData {
    /// The path of VM `id`'s memory settings.
    pub fn path_of(id: VmId) -> ObjectPath {
        ObjectPath::new(
            MEMORY,
            &[("InstanceID", &format!("Microsoft:{id}\\Memory"))],
        )
    }
}

impl CimObject for MemorySettingData {
    const CLASS: &'static str = MEMORY;

    fn to_instance(&self) -> Instance {
        rasd(
            MEMORY,
            format!("Microsoft:{}\\Memory", self.vm),
            "Memory",
            4,
            "Microsoft:Hyper-V:Memory",
        )
        .string("AllocationUnits", Some("byte * 2^20"))
        .integer("VirtualQuantity", Uint64, Some(self.mib))
        .string("VirtualQuantityUnits", Some("byte * 2^20"))
        .integer("Reservation", Uint64, Some(self.mib))
        .integer("Limit", Uint64, Some(self.mib))
        .integer("Weight", Uint32, Some(5000u16))
        .boolean("DynamicMemoryEnabled", Some(false))
    }

    fn path(&self) -> ObjectPath {
        Self::path_of(self.vm)
    }
}

/// `Msvm_StorageAllocationSettingData`: one disk image of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageAllocationSettingData {
    /// The VM.
    pub vm: VmId,
    /// Position in the VM's disk list (`Address`).
    pub index: usize,
    /// `HostResource[0]`.
    pub path: PathBuf,
    /// `Access`: 1 read, 3 read/write.
    pub read_only: bool,
}

impl StorageAllocationSettingData {
    /// The `InstanceID` of VM `id`'s disk `index`.
    pub fn instance_id(id: VmId, index: usize) -> String {
        format!("Microsoft:{id}\\Disk\\{index}")
    }

    /// The disk index an `InstanceID` names.
    pub fn index_of(instance_id: &str) -> Option<usize> {
        let (_, index) = instance_id.rsplit_once("\\Disk\\")?;
        index.parse().ok()
    }
}

impl CimObject for StorageAllocationSettingData {
    const CLASS: &'static str = STORAGE;

    fn to_instance(&self) -> Instance {
        rasd(
            STORAGE,
            Self::instance_id(self.vm, self.index),
            "Hard Disk Image",
            31,
            "Microsoft:Hyper-V:Virtual Hard Disk",
        )
        .string("Address", Some(self.index.to_string()))
        .strings("HostResource", vec![self.path.display().to_string()])
        .integer("Access", Uint16, Some(if self.read_only { 1u8 } else { 3 }))
    }

    fn path(&self) -> ObjectPath {
        ObjectPath::new(
            STORAGE,
            &[("InstanceID", &Self::instance_id(self.vm, self.index))],
        )
    }
}

/// Every resource setting of `config`, in the order Hyper-V lists them.
pub fn resources_of(config: &VmConfig) -> Vec<Instance> {
    let mut list = vec![
        ProcessorSettingData {
            vm: config.id,
            count: config.vcpus,
        }
        .to_instance(),
        MemorySettingData {
            vm: config.id,
            mib: config.memory_mib,
        }
        .to_instance(),
    ];
    list.extend(config.disks.iter().enumerate().map(|(index, disk)| {
        StorageAllocationSettingData {
            vm: config.id,
            index,
            path: disk.path.clone(),
            read_only: disk.read_only,
        }
        .to_instance()
    }));
    list
}

/// What an embedded `Msvm_VirtualSystemSettingData` asks for; unset properties keep their
/// defaults (or, for `ModifySystemSettings`, the current value).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SystemSettings {
    /// `InstanceID` (selects the VM in `ModifySystemSettings`).
    pub instance_id: Option<String>,
    /// `ElementName`.
    pub element_name: Option<String>,
    /// `AutomaticStartupAction`.
    pub automatic_startup_action: Option<u16>,
    /// `AutomaticRecoveryAction`.
    pub automatic_recovery_action: Option<u16>,
    /// `KernelFile` (vmms extension).
    pub kernel: Option<PathBuf>,
    /// `InitrdFile` (vmms extension).
    pub initrd: Option<PathBuf>,
    /// `KernelCommandLine` (vmms extension).
    pub cmdline: Option<String>,
}

impl SystemSettings {
    /// Reads an embedded instance; it must be a VSSD.
    pub fn from_instance(instance: &Instance) -> CimResult<Self> {
        if !instance.class.eq_ignore_ascii_case(VSSD)
            && !instance
                .class
                .eq_ignore_ascii_case("CIM_VirtualSystemSettingData")
        {
            return Err(CimError::new(
                CimStatus::InvalidParameter,
                format!("SystemSettings must be a {VSSD}, not {}", instance.class),
            ));
        }
        Ok(SystemSettings {
            instance_id: text(instance, "InstanceID"),
            element_name: text(instance, "ElementName"),
            automatic_startup_action: number(instance, "AutomaticStartupAction")?,
            automatic_recovery_action: number(instance, "AutomaticRecoveryAction")?,
            kernel: text(instance, "KernelFile").map(PathBuf::from),
            initrd: text(instance, "InitrdFile").map(PathBuf::from),
            cmdline: text(instance, "KernelCommandLine"),
        })
    }

    /// Applies these settings to `config`; unknown action codes are invalid parameters.
    pub fn apply(&self, config: &mut VmConfig) -> CimResult<()> {
        if let Some(name) = &self.element_name {
            config.name.clone_from(name);
        }
        if let Some(code) = self.automatic_startup_action {
            config.automatic_start_action = vmm_core::AutomaticStartAction::from_code(code)
                .ok_or_else(|| invalid(format!("AutomaticStartupAction {code} is not defined")))?;
        }
        if let Some(code) = self.automatic_recovery_action {
            config.automatic_recovery_action = vmm_core::AutomaticRecoveryAction::from_code(code)
                .ok_or_else(|| {
                invalid(format!("AutomaticRecoveryAction {code} is not defined"))
            })?;
        }
        if let Some(kernel) = &self.kernel {
            config.boot = BootSource::Kernel {
                kernel: kernel.clone(),
                initrd: self.initrd.clone(),
                cmdline: self
                    .cmdline
                    .clone()
                    .unwrap_or_else(|| "console=ttyS0".to_owned()),
            };
        }
        Ok(())
    }
}

/// One embedded resource allocation setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResourceSettings {
    /// `Msvm_ProcessorSettingData` (ResourceType 3).
    Processor {
        /// `InstanceID`, when modifying.
        instance_id: Option<String>,
        /// `VirtualQuantity`.
        count: Option<u64>,
    },
    /// `Msvm_MemorySettingData` (ResourceType 4).
    Memory {
        /// `InstanceID`, when modifying.
        instance_id: Option<String>,
        /// `VirtualQuantity` in MiB.
        mib: Option<u64>,
    },
    /// `Msvm_StorageAllocationSettingData` (ResourceType 31).
    Disk {
        /// `InstanceID`, when modifying.
        instance_id: Option<String>,
        /// `HostResource[0]`.
        path: Option<PathBuf>,
        /// `Access == 1`.
        read_only: bool,
    },
}

impl ResourceSettings {
    /// Reads an embedded RASD by its class (or, for a generic class, its `ResourceType`).
    pub fn from_instance(instance: &Instance) -> CimResult<Self> {
        let class = instance.class.to_ascii_lowercase();
        let resource_type = number::<u16>(instance, "ResourceType")?;
        let instance_id = text(instance, "InstanceID");
        let kind = match (class.as_str(), resource_type) {
            ("msvm_processorsettingdata", _) | (_, Some(3)) => 3,
            ("msvm_memorysettingdata", _) | (_, Some(4)) => 4,
            ("msvm_storageallocationsettingdata", _) | (_, Some(31 | 16 | 17)) => 31,
            _ => {
                return Err(invalid(format!(
                    "resource settings of class {} are not supported (processor, memory, storage)",
                    instance.class
                )));
            }
        };
        Ok(match kind {
            3 => ResourceSettings::Processor {
                instance_id,
                count: number(instance, "VirtualQuantity")?,
            },
            4 => ResourceSettings::Memory {
                instance_id,
                mib: number(instance, "VirtualQuantity")?,
            },
            _ => ResourceSettings::Disk {
                instance_id,
                path: first_text(instance, "HostResource").map(PathBuf::from),
                read_only: number::<u16>(instance, "Access")? == Some(1),
            },
        })
    }

    /// Applies this setting to `config`: processor and memory replace the current values, a
    /// disk without an `InstanceID` is added, one with an `InstanceID` is replaced.
    pub fn apply(&self, config: &mut VmConfig) -> CimResult<()> {
        match self {
            ResourceSettings::Processor { count, .. } => {
                if let Some(count) = count {
                    config.vcpus = u8::try_from(*count)
                        .map_err(|_| invalid(format!("{count} processors is too many")))?;
                }
            }
            ResourceSettings::Memory { mib, .. } => {
                if let Some(mib) = mib {
                    config.memory_mib = *mib;
                }
            }
            ResourceSettings::Disk {
                instance_id,
                path,
                read_only,
            } => {
                let path = path
                    .clone()
                    .ok_or_else(|| invalid("a disk needs HostResource[0], the image path"))?;
                let disk = vmm_core::DiskConfig {
                    path: absolute(&path),
                    read_only: *read_only,
                };
                match instance_id
                    .as_deref()
                    .and_then(StorageAllocationSettingData::index_of)
                {
                    Some(index) if index < config.disks.len() => config.disks[index] = disk,
                    Some(index) => return Err(invalid(format!("the VM has no disk {index}"))),
                    None => config.disks.push(disk),
                }
            }
        }
        Ok(())
    }

    /// The `InstanceID` given, if any.
    pub fn instance_id(&self) -> Option<&str> {
        match self {
            ResourceSettings::Processor { instance_id, .. }
            | ResourceSettings::Memory { instance_id, .. }
            | ResourceSettings::Disk { instance_id, .. } => instance_id.as_deref(),
        }
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

fn invalid(message: impl Into<String>) -> CimError {
    CimError::new(CimStatus::InvalidParameter, message)
}

fn text(instance: &Instance, name: &str) -> Option<String> {
    match instance.get(name)? {
        CimValue::Scalar(scalar) => Some(scalar.to_text()),
        CimValue::Array(_) => None,
    }
}

fn first_text(instance: &Instance, name: &str) -> Option<String> {
    match instance.get(name)? {
        CimValue::Array(values) => values.first().map(Scalar::to_text),
        CimValue::Scalar(scalar) => Some(scalar.to_text()),
    }
}

fn number<T: TryFrom<i128>>(instance: &Instance, name: &str) -> CimResult<Option<T>> {
    let Some(value) = instance.get(name) else {
        return Ok(None);
    };
    let parsed = match value {
        CimValue::Scalar(Scalar::Integer(i)) => Some(*i),
        CimValue::Scalar(Scalar::String(s)) => s.trim().parse::<i128>().ok(),
        _ => None,
    };
    parsed
        .and_then(|i| T::try_from(i).ok())
        .map(Some)
        .ok_or_else(|| invalid(format!("{name} is not a number in range")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vssd_instance_id_names_its_vm() {
        let id = VmId::new_random();

        assert_eq!(
            VirtualSystemSettingData::vm_of(&VirtualSystemSettingData::instance_id(id)),
            Some(id)
        );
        assert_eq!(
            VirtualSystemSettingData::vm_of(&format!("Microsoft:{id}\\Disk\\0")),
            Some(id)
        );
    }

    #[test]
    fn processor_settings_change_the_vcpu_count() {
        let mut config = VmConfig::new("a");
        let instance = Instance::new(PROCESSOR).integer("VirtualQuantity", Uint64, Some(4u8));

        ResourceSettings::from_instance(&instance)
            .and_then(|r| r.apply(&mut config))
            .expect("valid");

        assert_eq!(config.vcpus, 4);
    }

    #[test]
    fn disk_without_instance_id_is_added() {
        let mut config = VmConfig::new("a");
        let instance = Instance::new(STORAGE).strings("HostResource", vec!["/tmp/d.img".into()]);

        ResourceSettings::from_instance(&instance)
            .and_then(|r| r.apply(&mut config))
            .expect("valid");

        assert_eq!(config.disks.len(), 1);
        assert_eq!(config.disks[0].path, PathBuf::from("/tmp/d.img"));
    }

    #[test]
    fn unknown_resource_class_is_invalid_parameter() {
        let instance = Instance::new("Msvm_SyntheticEthernetPortSettingData");

        let error = ResourceSettings::from_instance(&instance).expect_err("unsupported");

        assert_eq!(error.status, CimStatus::InvalidParameter);
    }
}
