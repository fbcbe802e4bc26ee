//! The VM's disks, opened by the worker through the `snapshot` crate: raw or qcow2 (format from
//! the magic) with their whole backing chains, each file locked the way QEMU locks it.
//!
//! They are opened before the worker confines itself, so Landlock only has to allow what the
//! worker opens later: the backing chain (read, for a checkpoint's new overlay on top of it) and
//! the VM's own folder, where checkpoints put their overlays and saved state.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use partition::PartitionConfig;
use partition::block::{BlockBackend, GuestBuffer};

use crate::error::{Error, Result};

/// Opens every disk of `config` through [`snapshot::open_disk`] and hands the partition the
/// opened backends. A disk that is missing, corrupt, locked by another VM or has a missing
/// backing file is an error naming it.
pub(crate) fn open_disks(config: &mut PartitionConfig) -> Result<()> {
    for disk in &mut config.disks {
        let opened =
            snapshot::open_disk(&disk.path, disk.read_only).map_err(|source| match source {
                snapshot::Error::ImageLocked { .. } => Error::DiskLocked {
                    path: disk.path.clone(),
                    source,
                },
                source => Error::Disk {
                    path: disk.path.clone(),
                    source,
                },
            })?;
        disk.backend = Some(Arc::new(opened));
    }
    Ok(())
}

/// Every backing file below the disks of `config` (top layers excluded), for the worker's
/// Landlock rules. A chain that cannot be read yields what was found; opening the disk reports
/// the error properly.
pub(crate) fn backing_files(config: &PartitionConfig) -> Vec<PathBuf> {
    config
        .disks
        .iter()
        .filter_map(|disk| snapshot::backing_chain(&disk.path).ok())
        .flat_map(|chain| chain.into_iter().skip(1))
        .collect()
}

/// Stands in for a disk while the partition is paused and its image is being switched: the old
/// image must be closed (its lock released) before the new chain, which reads the old image as a
/// backing file, can be opened. Never serves a request: the guest cannot issue one while paused.
#[derive(Debug)]
pub(crate) struct Detached {
    pub(crate) size: u64,
    pub(crate) read_only: bool,
}

impl BlockBackend for Detached {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, _offset: u64, _buf: &GuestBuffer<'_>) -> io::Result<()> {
        Err(io::Error::other("disk is being switched"))
    }

    fn write_at(&self, _offset: u64, _buf: &GuestBuffer<'_>) -> io::Result<()> {
        Err(io::Error::other("disk is being switched"))
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Opens `path` (the top of a chain) for the guest to write, for a disk being switched.
pub(crate) fn open_writable(path: &Path) -> Result<Arc<snapshot::Disk>> {
    snapshot::open_disk(path, false)
        .map(Arc::new)
        .map_err(|source| Error::Disk {
            path: path.to_path_buf(),
            source,
        })
}
