//! A virtual machine's definition: the `config.json` that plays the role of Hyper-V's `.vmcx`.
//!
//! [`VmConfig`] is what `DefineSystem` takes and `ModifySystemSettings` replaces. It carries the
//! fields of `Msvm_VirtualSystemSettingData`, `Msvm_ProcessorSettingData` and
//! `Msvm_MemorySettingData` that this project implements, under names a Rust reader expects.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::SystemTime;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// Schema version written into every `config.json` this crate produces.
///
/// A file with a higher version came from a newer vmms and is refused rather than half-understood.
pub const CONFIG_VERSION: u32 = 1;
/// Longest display name, in characters (`Msvm_VirtualSystemSettingData.ElementName`).
pub const MAX_NAME_LEN: usize = 100;
/// Smallest guest memory accepted, in MiB (what the partition crate can boot in).
pub const MIN_MEMORY_MIB: u64 = 16;
/// Largest guest memory accepted, in MiB (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Longest kernel command line accepted, in bytes, excluding the NUL (Linux's `COMMAND_LINE_SIZE`).
pub const MAX_CMDLINE_LEN: usize = 2047;

/// A virtual machine's identity: the GUID that is `Msvm_ComputerSystem.Name`.
///
/// Shown and stored in Hyper-V's form, upper-case hyphenated
/// (`4E8B6A4D-2C1F-4F8A-9D3E-0B1C2D3E4F50`); parsing accepts any case.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VmId(Uuid);

impl VmId {
    /// A fresh random id (UUID v4).
    pub fn new_random() -> Self {
        VmId(Uuid::new_v4())
    }

    /// Wraps an existing UUID.
    pub const fn from_uuid(uuid: Uuid) -> Self {
        VmId(uuid)
    }

    /// The UUID inside.
    pub const fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = Uuid::encode_buffer();
        f.write_str(self.0.hyphenated().encode_upper(&mut buf))
    }
}

impl fmt::Debug for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VmId({self})")
    }
}

impl FromStr for VmId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(VmId)
    }
}

impl Serialize for VmId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for VmId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What the virtual machine boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BootSource {
    /// The project's test guest, embedded in the worker binary (the default: runs everywhere).
    TestGuest,
    /// A Linux kernel (bzImage, ELF vmlinux or PVH ELF) with an optional initramfs.
    Kernel {
        /// The kernel image.
        kernel: PathBuf,
        /// The initramfs, if any.
        initrd: Option<PathBuf>,
        /// The kernel command line (the worker appends its device announcements).
        cmdline: String,
    },
}

/// One virtual disk attached to the virtual machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// The disk image (absolute, or relative to the virtual machine's `disks/` folder).
    pub path: PathBuf,
    /// Whether the guest sees the disk as read-only.
    pub read_only: bool,
}

/// What the service does with the virtual machine when it starts
/// (`Msvm_VirtualSystemSettingData.AutomaticStartupAction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum AutomaticStartAction {
    /// 2: leave it as it is.
    #[default]
    Nothing,
    /// 3: start it if it was running when the service last stopped.
    StartIfPreviouslyRunning,
    /// 4: always start it.
    AlwaysStart,
}

impl AutomaticStartAction {
    /// The Hyper-V value.
    pub const fn code(self) -> u16 {
        match self {
            AutomaticStartAction::Nothing => 2,
            AutomaticStartAction::StartIfPreviouslyRunning => 3,
            AutomaticStartAction::AlwaysStart => 4,
        }
    }

    /// Decodes a Hyper-V value; `None` for values Hyper-V does not define.
    pub const fn from_code(code: u16) -> Option<Self> {
        match code {
            2 => Some(AutomaticStartAction::Nothing),
            3 => Some(AutomaticStartAction::StartIfPreviouslyRunning),
            4 => Some(AutomaticStartAction::AlwaysStart),
            _ => None,
        }
    }
}

/// What the service does when the virtual machine's worker fails
/// (`Msvm_VirtualSystemSettingData.AutomaticRecoveryAction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum AutomaticRecoveryAction {
    /// 2: leave it off.
    None,
    /// 3: start a fresh worker (Hyper-V's default).
    #[default]
    Restart,
    /// 4: apply a checkpoint, then start. Accepted in configurations; the service reports it as
    /// not supported yet and leaves the virtual machine off.
    RevertToSnapshot,
}

impl AutomaticRecoveryAction {
    /// The Hyper-V value.
    pub const fn code(self) -> u16 {
        match self {
            AutomaticRecoveryAction::None => 2,
            AutomaticRecoveryAction::Restart => 3,
            AutomaticRecoveryAction::RevertToSnapshot => 4,
        }
    }

    /// Decodes a Hyper-V value; `None` for values Hyper-V does not define.
    pub const fn from_code(code: u16) -> Option<Self> {
        match code {
            2 => Some(AutomaticRecoveryAction::None),
            3 => Some(AutomaticRecoveryAction::Restart),
            4 => Some(AutomaticRecoveryAction::RevertToSnapshot),
            _ => None,
        }
    }
}

/// A virtual machine's definition, persisted as `vms/<id>/config.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Schema version of this record ([`CONFIG_VERSION`] when written by this crate).
    pub version: u32,
    /// The virtual machine's identity; never changes.
    pub id: VmId,
    /// Display name (`ElementName`): 1 to [`MAX_NAME_LEN`] characters, no control characters, and
    /// (for names given now, see [`VmConfig::validate_definition`]) not a GUID. Names need not be
    /// unique, as in Hyper-V.
    pub name: String,
    /// Number of virtual processors (1..=255).
    pub vcpus: u8,
    /// Guest memory in MiB ([`MIN_MEMORY_MIB`]..=[`MAX_MEMORY_MIB`]).
    pub memory_mib: u64,
    /// What the virtual machine boots.
    pub boot: BootSource,
    /// Virtual disks, in the order the guest sees them.
    pub disks: Vec<DiskConfig>,
    /// What to do when the service starts.
    pub automatic_start_action: AutomaticStartAction,
    /// What to do when the worker fails.
    pub automatic_recovery_action: AutomaticRecoveryAction,
    /// When the virtual machine was defined (`InstallDate`, VSSD `CreationTime`).
    pub created: SystemTime,
}

impl VmConfig {
    /// A definition with a fresh id and the defaults: 1 vCPU, 64 MiB, the test guest, no disks,
    /// no automatic start, restart on failure.
    pub fn new(name: impl Into<String>) -> Self {
        VmConfig {
            version: CONFIG_VERSION,
            id: VmId::new_random(),
            name: name.into(),
            vcpus: 1,
            memory_mib: 64,
            boot: BootSource::TestGuest,
            disks: Vec::new(),
            automatic_start_action: AutomaticStartAction::default(),
            automatic_recovery_action: AutomaticRecoveryAction::default(),
            created: SystemTime::now(),
        }
    }

    /// Checks every field against the limits above; the first violation found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.version == 0 || self.version > CONFIG_VERSION {
            return Err(ConfigError::UnsupportedVersion {
                found: self.version,
                supported: CONFIG_VERSION,
            });
        }
        validate_name(&self.name)?;
        if self.vcpus == 0 {
            return Err(ConfigError::NoVcpus);
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ConfigError::MemoryOutOfRange {
                mib: self.memory_mib,
                min: MIN_MEMORY_MIB,
                max: MAX_MEMORY_MIB,
            });
        }
        if let BootSource::Kernel {
            kernel,
            initrd,
            cmdline,
        } = &self.boot
        {
            if kernel.as_os_str().is_empty() {
                return Err(ConfigError::EmptyKernelPath);
            }
            if initrd.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return Err(ConfigError::EmptyInitrdPath);
            }
            if cmdline.len() > MAX_CMDLINE_LEN || cmdline.contains('\0') {
                return Err(ConfigError::InvalidCmdline {
                    len: cmdline.len(),
                    max: MAX_CMDLINE_LEN,
                });
            }
        }
        if let Some(index) = self
            .disks
            .iter()
            .position(|d| d.path.as_os_str().is_empty())
        {
            return Err(ConfigError::EmptyDiskPath { index });
        }
        Ok(())
    }

    /// What `DefineSystem` and `ModifySystemSettings` check: [`validate`](Self::validate) plus
    /// the rules for a name being given now ([`validate_new_name`]).
    ///
    /// Stored definitions are loaded with [`validate`](Self::validate) alone, so a store written
    /// before a rule existed still loads: its VM is not degraded, and a client that names VMs
    /// "by name or GUID" resolves the GUID first.
    pub fn validate_definition(&self) -> Result<(), ConfigError> {
        self.validate()?;
        validate_new_name(&self.name)
    }
}

/// Checks a name a client gives a VM now: [`validate_name`], and not something that parses as a
/// GUID. Every client that takes "a name or a GUID" (the CLI, WMI queries) would read such a name
/// as another VM's id, so `remove-vm <GUID>` could act on a different VM than the one so named.
pub fn validate_new_name(name: &str) -> Result<(), ConfigError> {
    validate_name(name)?;
    if name.trim().parse::<VmId>().is_ok() {
        return Err(ConfigError::NameIsGuid);
    }
    Ok(())
}

/// Checks a display name the way `ElementName` is limited.
pub fn validate_name(name: &str) -> Result<(), ConfigError> {
    let len = name.chars().count();
    if name.trim().is_empty() {
        return Err(ConfigError::EmptyName);
    }
    if len > MAX_NAME_LEN {
        return Err(ConfigError::NameTooLong {
            len,
            max: MAX_NAME_LEN,
        });
    }
    if name.chars().any(char::is_control) {
        return Err(ConfigError::NameHasControlCharacters);
    }
    Ok(())
}

/// Why a [`VmConfig`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The record's schema version is unknown to this build.
    #[error("configuration version {found} is not supported (this build reads 1..={supported})")]
    UnsupportedVersion {
        /// Version in the record.
        found: u32,
        /// Highest version this build reads.
        supported: u32,
    },
    /// The name is empty or only blanks.
    #[error("name is empty")]
    EmptyName,
    /// The name is longer than `ElementName` allows.
    #[error("name has {len} characters, more than {max}")]
    NameTooLong {
        /// Its length in characters.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The name contains control characters (they break tables, logs and CIM-XML).
    #[error("name contains control characters")]
    NameHasControlCharacters,
    /// The name parses as a GUID, so it could be taken for another VM's id.
    #[error("name looks like a GUID; a GUID names a VM by its id, choose another name")]
    NameIsGuid,
    /// Zero virtual processors.
    #[error("at least one virtual processor is needed")]
    NoVcpus,
    /// Memory outside the accepted range.
    #[error("memory {mib} MiB is outside {min}..={max} MiB")]
    MemoryOutOfRange {
        /// Requested size.
        mib: u64,
        /// Smallest accepted.
        min: u64,
        /// Largest accepted.
        max: u64,
    },
    /// A kernel boot source without a kernel path.
    #[error("kernel path is empty")]
    EmptyKernelPath,
    /// An initrd given as an empty path.
    #[error("initrd path is empty")]
    EmptyInitrdPath,
    /// The kernel command line is too long or contains a NUL byte.
    #[error("kernel command line of {len} bytes is too long (max {max}) or contains a NUL")]
    InvalidCmdline {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A disk without a path.
    #[error("disk {index} has an empty path")]
    EmptyDiskPath {
        /// Position in `disks`.
        index: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_config_is_valid() {
        let config = VmConfig::new("web-01");

        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn vm_id_displays_upper_case_and_parses_any_case() {
        let id: VmId = "4e8b6a4d-2c1f-4f8a-9d3e-0b1c2d3e4f50"
            .parse()
            .expect("valid guid");

        assert_eq!(id.to_string(), "4E8B6A4D-2C1F-4F8A-9D3E-0B1C2D3E4F50");
        assert_eq!(id.to_string().parse::<VmId>().expect("round trip"), id);
    }

    #[test]
    fn config_round_trips_through_json() {
        let mut config = VmConfig::new("kernel-vm");
        config.boot = BootSource::Kernel {
            kernel: "/boot/vmlinuz".into(),
            initrd: Some("/boot/initrd".into()),
            cmdline: "console=ttyS0".into(),
        };
        config.disks.push(DiskConfig {
            path: "root.qcow2".into(),
            read_only: false,
        });

        let json = serde_json::to_string(&config).expect("encode");
        let back: VmConfig = serde_json::from_str(&json).expect("decode");

        assert_eq!(back, config);
    }

    #[test]
    fn name_of_101_characters_is_rejected() {
        let config = VmConfig {
            name: "x".repeat(101),
            ..VmConfig::new("x")
        };

        assert_eq!(
            config.validate(),
            Err(ConfigError::NameTooLong { len: 101, max: 100 })
        );
    }

    #[test]
    fn name_of_100_multibyte_characters_is_accepted() {
        let config = VmConfig {
            name: "é".repeat(100),
            ..VmConfig::new("x")
        };

        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn blank_name_is_rejected() {
        let config = VmConfig {
            name: "   ".into(),
            ..VmConfig::new("x")
        };

        assert_eq!(config.validate(), Err(ConfigError::EmptyName));
    }

    #[test]
    fn name_with_newline_is_rejected() {
        let config = VmConfig {
            name: "a\nb".into(),
            ..VmConfig::new("x")
        };

        assert_eq!(
            config.validate(),
            Err(ConfigError::NameHasControlCharacters)
        );
    }

    #[test]
    fn name_that_parses_as_a_guid_is_refused_for_a_definition() {
        let id = VmId::new_random();
        let names = [
            id.to_string(),
            id.to_string().to_lowercase(),
            id.as_uuid().simple().to_string(),
            format!("{{{id}}}"),
            format!("urn:uuid:{id}"),
            format!(" {id} "),
        ];

        for name in names {
            let config = VmConfig {
                name: name.clone(),
                ..VmConfig::new("x")
            };
            assert_eq!(
                config.validate_definition(),
                Err(ConfigError::NameIsGuid),
                "{name}"
            );
        }
    }

    #[test]
    fn stored_name_that_parses_as_a_guid_still_loads() {
        let config = VmConfig {
            name: VmId::new_random().to_string(),
            ..VmConfig::new("x")
        };

        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn name_that_only_contains_a_guid_is_accepted() {
        let config = VmConfig {
            name: format!("web-{}", VmId::new_random()),
            ..VmConfig::new("x")
        };

        assert_eq!(config.validate_definition(), Ok(()));
    }

    #[test]
    fn zero_vcpus_are_rejected() {
        let config = VmConfig {
            vcpus: 0,
            ..VmConfig::new("x")
        };

        assert_eq!(config.validate(), Err(ConfigError::NoVcpus));
    }

    #[test]
    fn memory_below_minimum_is_rejected() {
        let config = VmConfig {
            memory_mib: 15,
            ..VmConfig::new("x")
        };

        assert!(matches!(
            config.validate(),
            Err(ConfigError::MemoryOutOfRange { mib: 15, .. })
        ));
    }

    #[test]
    fn memory_above_maximum_is_rejected() {
        let config = VmConfig {
            memory_mib: MAX_MEMORY_MIB + 1,
            ..VmConfig::new("x")
        };

        assert!(matches!(
            config.validate(),
            Err(ConfigError::MemoryOutOfRange { .. })
        ));
    }

    #[test]
    fn newer_schema_version_is_rejected() {
        let config = VmConfig {
            version: CONFIG_VERSION + 1,
            ..VmConfig::new("x")
        };

        assert!(matches!(
            config.validate(),
            Err(ConfigError::UnsupportedVersion { found: 2, .. })
        ));
    }

    #[test]
    fn kernel_boot_without_kernel_path_is_rejected() {
        let boot = BootSource::Kernel {
            kernel: PathBuf::new(),
            initrd: None,
            cmdline: String::new(),
        };
        let config = VmConfig {
            boot,
            ..VmConfig::new("x")
        };

        assert_eq!(config.validate(), Err(ConfigError::EmptyKernelPath));
    }

    #[test]
    fn cmdline_with_nul_is_rejected() {
        let boot = BootSource::Kernel {
            kernel: "k".into(),
            initrd: None,
            cmdline: "a\0b".into(),
        };
        let config = VmConfig {
            boot,
            ..VmConfig::new("x")
        };

        assert!(matches!(
            config.validate(),
            Err(ConfigError::InvalidCmdline { .. })
        ));
    }

    #[test]
    fn disk_with_empty_path_is_rejected() {
        let mut config = VmConfig::new("x");
        config.disks.push(DiskConfig {
            path: "a.qcow2".into(),
            read_only: true,
        });
        config.disks.push(DiskConfig {
            path: PathBuf::new(),
            read_only: false,
        });

        assert_eq!(
            config.validate(),
            Err(ConfigError::EmptyDiskPath { index: 1 })
        );
    }

    #[test]
    fn automatic_actions_use_hyper_v_codes() {
        let start: Vec<u16> = [
            AutomaticStartAction::Nothing,
            AutomaticStartAction::StartIfPreviouslyRunning,
            AutomaticStartAction::AlwaysStart,
        ]
        .map(AutomaticStartAction::code)
        .to_vec();
        let recovery: Vec<u16> = [
            AutomaticRecoveryAction::None,
            AutomaticRecoveryAction::Restart,
            AutomaticRecoveryAction::RevertToSnapshot,
        ]
        .map(AutomaticRecoveryAction::code)
        .to_vec();

        assert_eq!(start, [2, 3, 4]);
        assert_eq!(recovery, [2, 3, 4]);
        assert_eq!(
            AutomaticStartAction::from_code(3),
            Some(AutomaticStartAction::StartIfPreviouslyRunning)
        );
        assert_eq!(AutomaticRecoveryAction::from_code(5), None);
    }
}
