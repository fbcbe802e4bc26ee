//! A VM's firmware as Hyper-V's model shows it, mapped to what boots here: there is no BIOS
//! image, the worker loads the boot source straight into guest memory (a Linux kernel with its
//! initramfs and command line, or the test guest embedded in the worker).
//!
//! - `Msvm_BIOSElement`: that loader, one per VM, linked to the VM by `Msvm_SystemBIOS`;
//! - `Msvm_BootSourceSettingData`: the one boot source, listed by the VSSD's `BootSourceOrder`
//!   (Hyper-V's generation 2 boot order) and a component of the VSSD.

use vmm_core::{BootSource, VmId};

use super::CimObject;
use crate::instance::Instance;
use crate::path::ObjectPath;
use crate::value::CimType::Uint16;

const BIOS: &str = "Msvm_BIOSElement";
const BOOT_SOURCE: &str = "Msvm_BootSourceSettingData";

/// CIM_SoftwareElement.SoftwareElementState: ready to run, and running.
const EXECUTABLE: u16 = 2;
const RUNNING: u16 = 3;
/// CIM_SoftwareElement.TargetOperatingSystem: "Other" and "LINUX".
const OTHER_OS: u16 = 1;
const LINUX: u16 = 36;
/// Msvm_BootSourceSettingData.BootSourceType: a file (the kernel), or unknown (the test guest,
/// which is no file of its own but part of the worker binary).
const UNKNOWN_SOURCE: u16 = 0;
const FILE_SOURCE: u16 = 3;

fn name(boot: &BootSource) -> &'static str {
    match boot {
        BootSource::TestGuest => "vmms test guest loader",
        BootSource::Kernel { .. } => "vmms Linux direct boot",
    }
}

fn target_os(boot: &BootSource) -> u16 {
    match boot {
        BootSource::TestGuest => OTHER_OS,
        BootSource::Kernel { .. } => LINUX,
    }
}

/// `Msvm_BIOSElement` of a VM: the worker's loader of its boot source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BiosElement {
    /// The VM.
    pub vm: VmId,
    /// What it boots.
    pub boot: BootSource,
    /// Whether the VM runs (or is paused) now.
    pub running: bool,
}

impl BiosElement {
    fn state(&self) -> u16 {
        if self.running { RUNNING } else { EXECUTABLE }
    }
}

impl CimObject for BiosElement {
    const CLASS: &'static str = BIOS;

    fn to_instance(&self) -> Instance {
        let description = match &self.boot {
            BootSource::TestGuest => {
                "Loads the test guest embedded in the worker into guest memory".to_owned()
            }
            BootSource::Kernel { .. } => {
                "Loads a Linux kernel (bzImage, ELF or PVH), its initramfs and command line \
                 into guest memory"
                    .to_owned()
            }
        };
        Instance::new(BIOS)
            .string("Name", Some(name(&self.boot)))
            .string("Version", Some(env!("CARGO_PKG_VERSION")))
            .integer("SoftwareElementState", Uint16, Some(self.state()))
            .string("SoftwareElementID", Some(self.vm.to_string()))
            .integer("TargetOperatingSystem", Uint16, Some(target_os(&self.boot)))
            .string("Caption", Some("BIOS"))
            .string("Description", Some(description))
            .string("ElementName", Some("BIOS"))
            .string("Manufacturer", Some("vmms"))
            .boolean("PrimaryBIOS", Some(true))
    }

    fn path(&self) -> ObjectPath {
        // Integer keys typed as the instance has them, so the path matches its instance.
        self.to_instance().path(&[
            "Name",
            "Version",
            "SoftwareElementState",
            "SoftwareElementID",
            "TargetOperatingSystem",
        ])
    }
}

/// `Msvm_BootSourceSettingData`: a VM's boot source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootSourceSettingData {
    /// The VM.
    pub vm: VmId,
    /// What it boots.
    pub boot: BootSource,
}

impl BootSourceSettingData {
    fn instance_id(vm: VmId) -> String {
        format!("Microsoft:{vm}\\BootSource\\0")
    }

    /// The path of VM `vm`'s boot source.
    pub fn path_of(vm: VmId) -> ObjectPath {
        ObjectPath::new(BOOT_SOURCE, &[("InstanceID", &Self::instance_id(vm))])
    }
}

impl CimObject for BootSourceSettingData {
    const CLASS: &'static str = BOOT_SOURCE;

    fn to_instance(&self) -> Instance {
        let instance = Instance::new(BOOT_SOURCE)
            .string("InstanceID", Some(Self::instance_id(self.vm)))
            .string("Caption", Some("Boot Source"));
        match &self.boot {
            BootSource::TestGuest => instance
                .string("ElementName", Some("Test guest"))
                .string(
                    "Description",
                    Some("The test guest embedded in the worker binary"),
                )
                .string("BootSourceDescription", Some("vmms test guest"))
                .integer("BootSourceType", Uint16, Some(UNKNOWN_SOURCE))
                .string("FirmwareDevicePath", None::<String>),
            BootSource::Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                let initrd = initrd
                    .as_ref()
                    .map_or_else(|| "no initramfs".to_owned(), |p| p.display().to_string());
                instance
                    .string("ElementName", Some("Linux kernel"))
                    .string(
                        "Description",
                        Some(format!("initramfs {initrd}; command line: {cmdline}")),
                    )
                    .string(
                        "BootSourceDescription",
                        Some(format!("Linux kernel {}", kernel.display())),
                    )
                    .integer("BootSourceType", Uint16, Some(FILE_SOURCE))
                    .string("FirmwareDevicePath", Some(kernel.display().to_string()))
            }
        }
    }

    fn path(&self) -> ObjectPath {
        Self::path_of(self.vm)
    }
}
