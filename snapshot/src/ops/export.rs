//! Export of a VM into a self-contained folder, and import of such a folder into a store.
//!
//! An export folder looks like a VM folder: `config.json`, `state/` (if Saved), `disks/`, and
//! (chained exports) `checkpoints/`. Disk paths inside it are relative to its `disks/`, so it can
//! be moved or imported anywhere. Exports are assembled in a temporary sibling of the target and
//! renamed into place; imports likewise inside the store's `vms/` folder.

use std::path::{Path, PathBuf};

use serde_json::Value;
use vmm_core::VmId;

use crate::disk::{Disk, backing_chain, create_qcow2, open_disk};
use crate::durable::{copy_file, create_dir_all, remove_dir_all, rename, size_of, sync_dir};
use crate::error::{Error, Result};
use crate::folder::{CONFIG_FILE, VmFolder, read_config, write_config};
use crate::journal::{JOURNAL_VERSION, JournalEntry, Operation, Stage};
use crate::ops::{begin, checkpoint_disks, layered};
use crate::progress::Progress;
use vmm_core::fault::point as fault_point;

pub use vmm_core::checkpoint::{ExportMode, ImportMode};

const CHUNK: usize = 1 << 20;

/// Exports the VM in `folder` to `target` (which must not exist).
pub fn export_vm(
    folder: &VmFolder,
    target: &Path,
    mode: ExportMode,
    progress: &mut dyn Progress,
) -> Result<()> {
    begin(folder)?;
    if target.exists() {
        return Err(Error::AlreadyExists(target.to_path_buf()));
    }
    let staging = crate::durable::temporary_sibling(target);
    let entry = JournalEntry {
        version: JOURNAL_VERSION,
        stage: Stage::Prepared,
        operation: Operation::Export {
            staging: staging.clone(),
            target: target.to_path_buf(),
        },
    };
    let result = (|| {
        if let Some(parent) = target.parent() {
            create_dir_all(parent)?;
        }
        entry.write(&folder.journal_path())?;
        fault_point("snapshot.export-journal");
        remove_dir_all(&staging)?;
        match mode {
            ExportMode::Flattened => export_flattened(folder, &staging, progress)?,
            ExportMode::Chained => export_chained(folder, &staging, progress)?,
        }
        fault_point("snapshot.export-copied");
        rename(&staging, target)?;
        fault_point("snapshot.export-renamed");
        JournalEntry::clear(&folder.journal_path())
    })();
    if result.is_err() {
        let _ = remove_dir_all(&staging);
        let _ = JournalEntry::clear(&folder.journal_path());
    }
    result
}

fn export_flattened(folder: &VmFolder, staging: &Path, progress: &mut dyn Progress) -> Result<()> {
    let config = folder.config()?;
    let disks = folder.disks(&config, &folder.config_path())?;
    let out = VmFolder::new(staging);
    create_dir_all(&out.disks_dir())?;
    let mut paths = Vec::new();
    for (i, disk) in disks.iter().enumerate() {
        let target = out.disks_dir().join(format!("disk{i}.qcow2"));
        flatten(&disk.path, &target, progress)?;
        fault_point("snapshot.export-disk");
        paths.push(target);
    }
    write_config(&out.config_path(), &out.with_disk_paths(&config, &paths))?;
    if folder.is_saved() {
        copy_tree(&folder.state_dir(), &out.state_dir(), progress)?;
    }
    sync_dir(staging)
}

/// Writes the contents of the chain `source` into a new standalone qcow2 `target`, skipping
/// zero chunks (they stay unallocated).
fn flatten(source: &Path, target: &Path, progress: &mut dyn Progress) -> Result<()> {
    let src = Disk::open(source, true)?;
    create_qcow2(target, src.size())?;
    let dst = open_disk(target, false)?;
    progress.add_total(src.size());
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0;
    while offset < src.size() {
        let n = (src.size() - offset).min(CHUNK as u64) as usize;
        src.read(offset, &mut buf[..n])
            .map_err(|e| Error::image(source, e))?;
        if buf[..n].iter().any(|&b| b != 0) {
            dst.write(offset, &buf[..n])
                .map_err(|e| Error::image(target, e))?;
        }
        progress.advance(n as u64);
        offset += n as u64;
    }
    dst.flush().map_err(|e| Error::image(target, e))
}

fn export_chained(folder: &VmFolder, staging: &Path, progress: &mut dyn Progress) -> Result<()> {
    let tree = folder.tree()?;
    // Every file of every chain must live in the VM folder for the copy to be self-contained.
    let config = folder.config()?;
    let mut tops: Vec<PathBuf> = folder
        .disks(&config, &folder.config_path())?
        .into_iter()
        .map(|d| d.path)
        .collect();
    for cp in &tree.checkpoints {
        let (_, disks) = checkpoint_disks(folder, cp.id)?;
        tops.extend(layered(&disks).map(|d| d.path.clone()));
    }
    for top in &tops {
        for layer in backing_chain(top)? {
            if !layer.starts_with(folder.disks_dir()) {
                return Err(Error::DiskOutsideFolder(layer));
            }
        }
    }
    progress.add_total(size_of(folder.dir()));
    copy_tree(folder.dir(), staging, progress)?;
    // Configs may name disks by absolute paths inside the source folder: make them relative.
    let out = VmFolder::new(staging);
    relativize(folder, &out, &out.config_path())?;
    for cp in &tree.checkpoints {
        relativize(folder, &out, &out.checkpoint_dir(cp.id).join(CONFIG_FILE))?;
    }
    Ok(())
}

fn relativize(source: &VmFolder, out: &VmFolder, config_path: &Path) -> Result<()> {
    let config = read_config(config_path)?;
    let paths: Vec<PathBuf> = source
        .disks(&config, config_path)?
        .into_iter()
        .map(|d| source.relative_disk_path(&d.path))
        .map(|p| out.disks_dir().join(p))
        .collect();
    write_config(config_path, &out.with_disk_paths(&config, &paths))
}

/// Copies a folder, leaving out temporaries (names starting with `.`) and the journal.
fn copy_tree(from: &Path, to: &Path, progress: &mut dyn Progress) -> Result<()> {
    std::fs::create_dir(to).map_err(|e| Error::io("create", to, e))?;
    let entries = std::fs::read_dir(from).map_err(|e| Error::io("list", from, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list", from, e))?;
        let name = entry.file_name();
        let skip = name.to_string_lossy().starts_with('.') || name == "journal.json";
        if skip {
            continue;
        }
        let kind = entry
            .file_type()
            .map_err(|e| Error::io("stat", entry.path(), e))?;
        if kind.is_dir() {
            copy_tree(&entry.path(), &to.join(&name), progress)?;
        } else if kind.is_file() {
            copy_file(&entry.path(), &to.join(&name), progress)?;
        }
    }
    sync_dir(to)
}

/// Imports the export folder `source` into the store folder `vms_dir` (`<root>/vms`); returns
/// the new VM's id. Every disk chain is opened before the VM appears, so a broken export (a
/// missing backing file) is refused and leaves the store untouched.
pub fn import_vm(
    source: &Path,
    vms_dir: &Path,
    mode: ImportMode,
    progress: &mut dyn Progress,
) -> Result<VmId> {
    let config = read_config(&source.join(CONFIG_FILE))?;
    let id = match mode {
        ImportMode::NewId => VmId::new_random(),
        ImportMode::SameId => config
            .get("id")
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<VmId>().ok())
            .ok_or_else(|| Error::Invalid {
                path: source.join(CONFIG_FILE),
                reason: "no VM id".into(),
            })?,
    };
    let target = vms_dir.join(id.to_string());
    if target.exists() {
        return Err(Error::AlreadyExists(target));
    }
    create_dir_all(vms_dir)?;
    let staging = vms_dir.join(format!(".{id}.tmp.import"));
    remove_dir_all(&staging)?;
    let result = (|| {
        progress.add_total(size_of(source));
        copy_tree(source, &staging, progress)?;
        fault_point("snapshot.import-copied");
        let folder = VmFolder::new(&staging);
        set_id(&folder.config_path(), id)?;
        for cp in folder.tree()?.checkpoints {
            set_id(&folder.checkpoint_dir(cp.id).join(CONFIG_FILE), id)?;
        }
        let config = folder.config()?;
        for disk in folder.disks(&config, &folder.config_path())? {
            Disk::open(&disk.path, true)?;
        }
        rename(&staging, &target)
    })();
    if result.is_err() {
        let _ = remove_dir_all(&staging);
    }
    result.map(|()| id)
}

/// Writes `id` into a config the way vmm-core names VMs (its folder name is the same text).
fn set_id(config_path: &Path, id: VmId) -> Result<()> {
    let mut config = read_config(config_path)?;
    config["id"] = Value::String(id.to_string());
    write_config(config_path, &config)
}

/// Removes what a crashed export left (its staging folder).
pub(crate) fn roll_back(folder: &VmFolder, staging: &Path) -> Result<()> {
    remove_dir_all(staging)?;
    JournalEntry::clear(&folder.journal_path())
}
