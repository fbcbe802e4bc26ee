//! A backup set's `manifest.json`: what the set holds and how to check it.
//!
//! The manifest is written last, atomically, so its presence is the set's commit point: a folder
//! without one is a session that never finished. Everything read from it is checked before use
//! (file names are plain names inside the set, sizes and extents fit the disk, the chain link is
//! a relative folder name), because a restore acts on it.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vmm_core::VmConfig;
use vmm_core::backup::{BackupConsistency, BackupKind};
use vmm_core::integration::ReferencePointId;

use crate::error::{Error, Result};

/// The manifest's file name inside a set.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The format tag this crate writes and reads.
pub const FORMAT: &str = "vmms-backup-set/1";

/// The largest manifest read (a disk of 2 TiB at 1 MiB extents is 2 Mi extents; far below).
const MAX_MANIFEST_BYTES: u64 = 256 << 20;

/// A set's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// The tool that wrote the set (`vss-writer <version>`).
    pub tool_version: String,
    /// The set's identity; an incremental names its base by it.
    pub set_id: Uuid,
    /// When the disks were captured.
    pub created: SystemTime,
    /// The VM's definition when it was backed up.
    pub vm: VmConfig,
    /// Full or incremental.
    pub kind: BackupKind,
    /// Why full although an incremental was asked.
    pub full_reason: Option<String>,
    /// How consistent the disks are.
    pub consistency: BackupConsistency,
    /// Why not application-consistent, when not.
    pub consistency_reason: Option<String>,
    /// How long the guest was frozen, in microseconds, when it was.
    pub freeze_window_us: Option<u64>,
    /// The reference point this capture started: the next incremental copies what changed since.
    pub reference: ReferencePointId,
    /// The set an incremental builds on.
    pub base: Option<BaseLink>,
    /// One entry per backed-up disk, in the VM's disk order.
    pub disks: Vec<DiskEntry>,
}

/// An incremental set's link to the set below it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseLink {
    /// The base set's folder, relative to this set's folder (`../<name>`).
    pub path: PathBuf,
    /// The base set's [`Manifest::set_id`].
    pub set_id: Uuid,
}

/// One disk's data in a set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskEntry {
    /// The disk's index in the VM's configuration.
    pub index: usize,
    /// The qcow2 image in the set (a plain file name).
    pub file: String,
    /// The disk's virtual size in bytes.
    pub size: u64,
    /// Bytes the change tracking reported changed (the allocated bytes for a full set).
    pub bytes_changed: u64,
    /// The extents this set stores, each with the SHA-256 of its data.
    pub extents: Vec<ExtentSum>,
}

/// One stored extent and its checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtentSum {
    /// Guest offset in bytes.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// SHA-256 of the bytes, lower-case hex.
    pub sha256: String,
}

impl DiskEntry {
    /// Bytes of data this set stores for the disk.
    pub fn stored_bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.length).sum()
    }
}

impl Manifest {
    /// Bytes of disk data the set stores.
    pub fn stored_bytes(&self) -> u64 {
        self.disks.iter().map(DiskEntry::stored_bytes).sum()
    }

    /// Reads and checks `set/manifest.json`.
    pub fn read(set: &Path) -> Result<Manifest> {
        let path = set.join(MANIFEST_FILE);
        let invalid = |reason: String| Error::InvalidSet {
            set: set.to_path_buf(),
            reason,
        };
        let length = std::fs::metadata(&path)
            .map_err(|e| invalid(format!("cannot read {MANIFEST_FILE}: {e}")))?
            .len();
        if length > MAX_MANIFEST_BYTES {
            return Err(invalid(format!("{MANIFEST_FILE} is {length} bytes long")));
        }
        let bytes = std::fs::read(&path)
            .map_err(|e| invalid(format!("cannot read {MANIFEST_FILE}: {e}")))?;
        Manifest::parse(&bytes).map_err(invalid)
    }

    /// Parses and checks a manifest's bytes; the error says what is wrong.
    pub fn parse(bytes: &[u8]) -> std::result::Result<Manifest, String> {
        let manifest: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| format!("{MANIFEST_FILE} is not a backup manifest: {e}"))?;
        manifest.check()?;
        Ok(manifest)
    }

    /// Writes `set/manifest.json` atomically (the set's commit point).
    pub fn write(&self, set: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(Error::Encode)?;
        let path = set.join(MANIFEST_FILE);
        vmm_core::atomic_file::write_atomic(&path, &bytes).map_err(|e| Error::Io {
            op: "write",
            path,
            source: e,
        })
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.format != FORMAT {
            return Err(format!(
                "unknown format {:?} (this tool reads {FORMAT:?})",
                self.format
            ));
        }
        match (&self.kind, &self.base) {
            (BackupKind::Full, Some(_)) => return Err("a full set names a base set".into()),
            (BackupKind::Incremental, None) => {
                return Err("an incremental set names no base set".into());
            }
            (_, Some(base)) => check_base_path(&base.path)?,
            _ => {}
        }
        self.vm
            .validate()
            .map_err(|e| format!("the VM definition is invalid: {e}"))?;
        let mut seen = Vec::new();
        for disk in &self.disks {
            if disk.index >= self.vm.disks.len() || seen.contains(&disk.index) {
                return Err(format!("disk index {} is not a disk of the VM", disk.index));
            }
            seen.push(disk.index);
            check_file_name(&disk.file)?;
            if disk.size == 0 {
                return Err(format!("disk {} has size 0", disk.index));
            }
            let mut end = 0;
            for extent in &disk.extents {
                let last = extent.offset.checked_add(extent.length);
                if extent.length == 0
                    || extent.offset < end
                    || last.is_none_or(|last| last > disk.size)
                {
                    return Err(format!(
                        "disk {}: extent at {} of {} bytes overlaps or leaves the disk",
                        disk.index, extent.offset, extent.length
                    ));
                }
                if extent.sha256.len() != 64
                    || !extent.sha256.bytes().all(|b| b.is_ascii_hexdigit())
                {
                    return Err(format!(
                        "disk {}: extent at {} has a malformed checksum",
                        disk.index, extent.offset
                    ));
                }
                end = last.unwrap_or(u64::MAX);
            }
        }
        Ok(())
    }
}

/// A disk file name must be a plain name inside the set.
fn check_file_name(name: &str) -> std::result::Result<(), String> {
    let plain = Path::new(name).file_name().is_some_and(|n| n == name);
    if !plain || name.starts_with('.') {
        return Err(format!("disk file {name:?} is not a plain file name"));
    }
    Ok(())
}

/// A base link must be `../<plain name>`: sets of one chain are siblings.
fn check_base_path(path: &Path) -> std::result::Result<(), String> {
    let mut parts = path.components();
    let sibling = matches!(parts.next(), Some(std::path::Component::ParentDir))
        && matches!(parts.next(), Some(std::path::Component::Normal(_)))
        && parts.next().is_none();
    if !sibling {
        return Err(format!(
            "base set {} is not a sibling folder",
            path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Manifest {
        let mut vm = VmConfig::new("web");
        vm.disks.push(vmm_core::DiskConfig {
            path: "disk.qcow2".into(),
            read_only: false,
        });
        Manifest {
            format: FORMAT.into(),
            tool_version: "vss-writer test".into(),
            set_id: Uuid::new_v4(),
            created: SystemTime::UNIX_EPOCH,
            vm,
            kind: BackupKind::Incremental,
            full_reason: None,
            consistency: BackupConsistency::ApplicationConsistent,
            consistency_reason: None,
            freeze_window_us: Some(1200),
            reference: ReferencePointId::new_random(),
            base: Some(BaseLink {
                path: "../monday".into(),
                set_id: Uuid::new_v4(),
            }),
            disks: vec![DiskEntry {
                index: 0,
                file: "disk0.qcow2".into(),
                size: 1 << 20,
                bytes_changed: 4096,
                extents: vec![ExtentSum {
                    offset: 4096,
                    length: 4096,
                    sha256: "ab".repeat(32),
                }],
            }],
        }
    }

    #[test]
    fn a_written_manifest_parses_back_equal() {
        let manifest = sample();

        let bytes = serde_json::to_vec(&manifest).expect("encode");

        assert_eq!(Manifest::parse(&bytes), Ok(manifest));
    }

    #[test]
    fn a_disk_file_outside_the_set_is_refused() {
        let mut manifest = sample();
        manifest.disks[0].file = "../../etc/passwd".into();

        let bytes = serde_json::to_vec(&manifest).expect("encode");

        let error = Manifest::parse(&bytes).expect_err("refused");
        assert!(error.contains("plain file name"), "{error}");
    }

    #[test]
    fn a_base_that_is_not_a_sibling_is_refused() {
        let mut manifest = sample();
        manifest.base = Some(BaseLink {
            path: "/var/backups/monday".into(),
            set_id: Uuid::new_v4(),
        });

        let bytes = serde_json::to_vec(&manifest).expect("encode");

        assert!(Manifest::parse(&bytes).is_err());
    }

    #[test]
    fn an_extent_past_the_disk_is_refused() {
        let mut manifest = sample();
        manifest.disks[0].extents[0].offset = u64::MAX - 10;

        let bytes = serde_json::to_vec(&manifest).expect("encode");

        let error = Manifest::parse(&bytes).expect_err("refused");
        assert!(error.contains("leaves the disk"), "{error}");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_parser(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Manifest::parse(&bytes);
        }

        #[test]
        fn a_corrupted_manifest_is_an_error_or_still_valid(
            position in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let mut bytes = serde_json::to_vec(&sample()).expect("encode");
            let at = position.index(bytes.len());
            bytes[at] = byte;
            if let Ok(manifest) = Manifest::parse(&bytes) {
                prop_assert!(manifest.check().is_ok());
            }
        }
    }
}
