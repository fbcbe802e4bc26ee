//! Switching a running disk between images: new qcow2 overlays on the disks' current images,
//! the switch of the device's backend while the guest is paused, and the way back. Shared by
//! running checkpoints ([`super::checkpoint`]) and backups ([`super::backup`]).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use partition::{Partition, PartitionConfig};
use vmm_core::{DiskOverlay, error_chain};

use super::disks::{self, Detached};
use super::machine::partition_failure;
use crate::protocol::Failure;

/// One disk switched to its overlay, and how to switch it back.
pub(crate) struct Switched {
    pub(crate) index: usize,
    pub(crate) old_path: PathBuf,
    pub(crate) overlay: PathBuf,
    /// The overlay as the guest now writes it (a merge reads its allocation through it).
    pub(crate) disk: Arc<snapshot::Disk>,
}

/// Refuses overlays that name a disk that is not there, read-only or listed twice, or a file
/// that already exists.
pub(crate) fn check_overlays(
    config: &PartitionConfig,
    overlays: &[DiskOverlay],
) -> Result<(), Failure> {
    let mut seen = Vec::new();
    for overlay in overlays {
        let Some(disk) = config.disks.get(overlay.disk) else {
            return Err(Failure::failed(format!(
                "there is no disk {}",
                overlay.disk
            )));
        };
        if disk.read_only || seen.contains(&overlay.disk) {
            return Err(Failure::failed(format!(
                "disk {} is read-only or listed twice",
                overlay.disk
            )));
        }
        if overlay.path.exists() {
            return Err(Failure::failed(format!(
                "overlay {} already exists",
                overlay.path.display()
            )));
        }
        seen.push(overlay.disk);
    }
    Ok(())
}

/// Creates each listed disk's overlay on its current image, while the guest still runs on that
/// image: the header only names the image (relative when in the same folder), its size and
/// format. On error none is left.
pub(crate) fn create_overlays(
    partition: &Partition,
    config: &PartitionConfig,
    overlays: &[DiskOverlay],
) -> Result<(), Failure> {
    for overlay in overlays {
        let index = overlay.disk;
        let image = &config.disks[index].path;
        let size = partition
            .disk_backend(index)
            .map(|backend| backend.size())
            .ok_or_else(|| Failure::failed(format!("there is no disk {index}")))?;
        let created = image_format(image).and_then(|format| {
            snapshot::create_overlay_sized(&overlay.path, image, size, format)
                .map_err(|e| Failure::failed(error_chain(&e)))
        });
        if let Err(failure) = created {
            remove_overlays(overlays);
            return Err(failure);
        }
    }
    Ok(())
}

/// The format of the image at `path`, from its magic (read without locking: the guest's own
/// open holds the image's lock).
pub(crate) fn image_format(path: &Path) -> Result<snapshot::DiskFormat, Failure> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let read = File::open(path)
        .and_then(|mut file| file.read(&mut magic))
        .map_err(|e| io_failure("read the disk's format", e))?;
    Ok(if read == 4 && &magic == b"QFI\xfb" {
        snapshot::DiskFormat::Qcow2
    } else {
        snapshot::DiskFormat::Raw
    })
}

/// Removes every overlay file of `overlays` (they did not exist before: the caller checked).
pub(crate) fn remove_overlays(overlays: &[DiskOverlay]) {
    for overlay in overlays {
        let _ = std::fs::remove_file(&overlay.path);
    }
}

/// Flushes each listed disk and switches the device to its overlay (made by
/// [`create_overlays`]); every disk switched is pushed on `switched` (for [`switch_back`]).
pub(crate) fn switch_disks(
    partition: &mut Partition,
    config: &mut PartitionConfig,
    overlays: &[DiskOverlay],
    switched: &mut Vec<Switched>,
) -> Result<(), Failure> {
    for overlay in overlays {
        let index = overlay.disk;
        let old_path = config.disks[index].path.clone();
        let current = partition
            .disk_backend(index)
            .ok_or_else(|| Failure::failed(format!("there is no disk {index}")))?;
        current
            .flush()
            .map_err(|e| io_failure("flush the disk", e))?;
        let size = current.size();
        drop(current);
        // The chain above the image reads it as a backing file, which our own write lock on it
        // refuses: close the image (nothing can use it while paused), then open the chain.
        detach(partition, config, index, &old_path, size)?;
        let attached = disks::open_writable(&overlay.path)
            .map_err(|e| Failure::failed(error_chain(&e)))
            .and_then(|disk| {
                attach(partition, config, index, &overlay.path, disk.clone()).map(|()| disk)
            });
        let disk = match attached {
            Ok(disk) => disk,
            Err(failure) => {
                reopen(partition, config, index, &old_path);
                return Err(failure);
            }
        };
        switched.push(Switched {
            index,
            old_path,
            overlay: overlay.path.clone(),
            disk,
        });
    }
    Ok(())
}

/// Puts every switched disk back on its old image and removes the overlays (best effort: this
/// runs on a failure already being reported).
pub(crate) fn switch_back(
    partition: &mut Partition,
    config: &mut PartitionConfig,
    switched: Vec<Switched>,
) {
    for disk in switched.into_iter().rev() {
        let size = partition.disk_backend(disk.index).map(|b| b.size());
        if let Some(size) = size {
            let _ = detach(partition, config, disk.index, &disk.old_path, size);
        }
        let _ = std::fs::remove_file(&disk.overlay);
        reopen(partition, config, disk.index, &disk.old_path);
    }
}

/// Reopens `path` as disk `index` after a failed switch.
pub(crate) fn reopen(
    partition: &mut Partition,
    config: &mut PartitionConfig,
    index: usize,
    path: &Path,
) {
    match disks::open_writable(path) {
        Ok(backend) => {
            let _ = attach(partition, config, index, path, backend);
        }
        Err(error) => log_line!(
            "worker: cannot reopen disk {} after a failed switch: {}",
            path.display(),
            error_chain(&error)
        ),
    }
}

/// Replaces disk `index`'s backend by a stand-in and drops every reference to the old one, so
/// its image is closed and unlocked.
pub(crate) fn detach(
    partition: &mut Partition,
    config: &mut PartitionConfig,
    index: usize,
    path: &Path,
    size: u64,
) -> Result<(), Failure> {
    let stand_in = Arc::new(Detached {
        size,
        read_only: false,
    });
    let old = partition
        .replace_disk_backend(index, path.to_path_buf(), stand_in)
        .map_err(|e| partition_failure(&e))?;
    config.disks[index].backend = None;
    drop(old);
    Ok(())
}

/// Makes `backend` (the image at `path`) disk `index`'s backend, in the partition and in the
/// worker's configuration (which a reset boots from).
pub(crate) fn attach(
    partition: &mut Partition,
    config: &mut PartitionConfig,
    index: usize,
    path: &Path,
    backend: Arc<dyn partition::block::BlockBackend>,
) -> Result<(), Failure> {
    partition
        .replace_disk_backend(index, path.to_path_buf(), backend.clone())
        .map_err(|e| partition_failure(&e))?;
    config.disks[index].path = path.to_path_buf();
    config.disks[index].backend = Some(backend);
    Ok(())
}

pub(crate) fn io_failure(what: &str, error: std::io::Error) -> Failure {
    Failure::failed(format!("cannot {what}: {error}"))
}
