//! Persistent change tracking (Hyper-V's Resilient Change Tracking): the disks' changed-block
//! maps and the reference point they count from, kept in the VM's `change-tracking.json` across
//! clean stops of the worker.
//!
//! The file is only believed when it says `clean`: a worker that starts from it merges its maps
//! into the new partition's and at once rewrites it marked in use (a VM without disks has no
//! writes to miss, so its worker does that only once a capture moves the reference point: one
//! fsync less on every start). Only a clean end (turn-off
//! with the worker alive, the guest powering off or resetting, a save) writes it clean again, with
//! every write the guest made until then. A worker killed meanwhile leaves it in use, and the next
//! worker starts without a reference point ("the VM stopped uncleanly"): writes may have reached
//! the disks that no map recorded, so the next backup must be full. Anything that changes the
//! disks offline (applying a checkpoint) removes the file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use partition::Partition;
use partition::devices::virtio::{ChangedBlockMap, ChangedBlocks};
use serde::{Deserialize, Serialize};
use vmm_core::integration::ReferencePointId;

/// Version of the file's layout.
const VERSION: u32 = 1;

/// Why there is no reference point when there is no file at all.
pub(crate) const NO_REFERENCE_YET: &str = "no reference point yet";
/// Why there is none after a worker that did not end cleanly.
pub(crate) const STOPPED_UNCLEANLY: &str = "the VM stopped uncleanly";
/// Why there is none after a backup session that aborted after its capture.
pub(crate) const BACKUP_ABORTED: &str = "the previous backup was aborted";

/// `change-tracking.json`.
#[derive(Debug, Serialize, Deserialize)]
struct TrackingFile {
    version: u32,
    /// Written by a worker that ended cleanly; a file in use is not believed.
    clean: bool,
    /// The reference point the maps count from.
    reference: Option<ReferencePointId>,
    /// Why there is no reference point (kept across restarts).
    untracked_reason: Option<String>,
    /// Per disk in configuration order.
    disks: Vec<TrackedDisk>,
}

#[derive(Debug, Serialize, Deserialize)]
struct TrackedDisk {
    /// The disk's virtual size when the maps were written.
    disk_size: u64,
    /// Blocks written since `reference`.
    blocks: ChangedBlocks,
}

/// The running worker's change tracking: the partition's maps and what they count from.
#[derive(Debug)]
pub(crate) struct ChangeTracking {
    path: PathBuf,
    reference: Option<ReferencePointId>,
    untracked_reason: Option<String>,
    /// Per disk: its size and the map of the partition now running (kept past the partition,
    /// so a clean end writes what its last writes marked).
    maps: Vec<(u64, Arc<ChangedBlockMap>)>,
    /// The file says in use (or is gone); `false` while a VM without disks runs on its clean
    /// file, which stays true until a capture moves the reference point.
    marked_in_use: bool,
}

impl ChangeTracking {
    /// Loads `vm_dir`'s file into `partition`'s maps when it is clean and matches the disks,
    /// then marks it in use. Fails only when a stale clean file could not be invalidated.
    pub(crate) fn start(vm_dir: &Path, partition: &Partition) -> std::io::Result<Self> {
        let path = vm_dir.join(snapshot::folder::CHANGE_TRACKING_FILE);
        let mut tracking = ChangeTracking {
            path,
            reference: None,
            untracked_reason: None,
            maps: current_maps(partition),
            marked_in_use: false,
        };
        match load(&tracking.path, &tracking.maps) {
            Ok(reference) => tracking.reference = Some(reference),
            Err(reason) => tracking.untracked_reason = Some(reason),
        }
        if tracking.maps.is_empty() {
            // No disk, no write to miss: a clean file stays true while the guest runs (until a
            // capture moves the reference point: see `set_reference`), and marking it in use
            // would cost every start an fsync for nothing.
            return Ok(tracking);
        }
        tracking.mark_in_use()?;
        Ok(tracking)
    }

    /// Rewrites the file marked in use; when that fails, removes it, so that no stale clean
    /// file outlives this worker. Fails only when neither worked.
    fn mark_in_use(&mut self) -> std::io::Result<()> {
        self.marked_in_use = true;
        let tracking = self;
        if let Err(error) = tracking.write(false) {
            log_line!(
                "worker: cannot mark {} in use ({error}); change tracking restarts",
                tracking.path.display()
            );
            match std::fs::remove_file(&tracking.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            tracking.reference = None;
            tracking.untracked_reason =
                Some(format!("change tracking could not be recorded: {error}"));
        }
        Ok(())
    }

    /// The reference point the maps count from, or why there is none.
    pub(crate) fn reference(&self) -> (Option<ReferencePointId>, Option<String>) {
        (self.reference, self.untracked_reason.clone())
    }

    /// A capture took the maps: they count from `reference` now.
    pub(crate) fn set_reference(&mut self, reference: ReferencePointId) {
        if !self.marked_in_use {
            // The clean file names the reference point this one replaces: a worker killed from
            // here on must leave a file that is not believed.
            if let Err(error) = self.mark_in_use() {
                log_line!("worker: cannot invalidate {}: {error}", self.path.display());
            }
        }
        self.reference = Some(reference);
        self.untracked_reason = None;
    }

    /// Puts back what `reference` replaced (a capture that failed after it was set).
    pub(crate) fn restore_reference(&mut self, before: (Option<ReferencePointId>, Option<String>)) {
        (self.reference, self.untracked_reason) = before;
    }

    /// The maps no longer count from any reference point the backup application knows.
    pub(crate) fn drop_reference(&mut self, reason: &str) {
        self.reference = None;
        self.untracked_reason = Some(reason.to_owned());
    }

    /// The guest was rebuilt in a new partition (a reset): its maps carry on the old ones'.
    pub(crate) fn rebind(&mut self, partition: &Partition) {
        let new = current_maps(partition);
        let mut carried = new.len() == self.maps.len();
        for ((_, old), (_, map)) in self.maps.iter().zip(&new) {
            carried &= map.merge(&old.take()).is_ok();
        }
        self.maps = new;
        if !carried {
            self.drop_reference("the disks' tracking geometry changed");
        }
        // A guest that stopped on its own had its maps written clean; it runs again now.
        if let Err(error) = self.write(false) {
            log_line!(
                "worker: cannot mark {} in use: {error}",
                self.path.display()
            );
            // A clean file left behind would be believed after a crash.
            let _ = std::fs::remove_file(&self.path);
            self.drop_reference("change tracking could not be recorded");
        }
    }

    /// A clean end: writes the maps and the reference point marked clean (best effort: on
    /// failure the file stays in use and the next backup is full).
    pub(crate) fn write_clean(&self) {
        if let Err(error) = self.write(true) {
            log_line!(
                "worker: cannot write {}: {error}; the next backup will be full",
                self.path.display()
            );
        }
    }

    fn write(&self, clean: bool) -> std::io::Result<()> {
        let file = TrackingFile {
            version: VERSION,
            clean,
            reference: self.reference,
            untracked_reason: self.untracked_reason.clone(),
            // In use, the maps would be stale at once: only a clean file carries them.
            disks: if clean {
                self.maps
                    .iter()
                    .map(|(size, map)| TrackedDisk {
                        disk_size: *size,
                        blocks: map.snapshot(),
                    })
                    .collect()
            } else {
                Vec::new()
            },
        };
        let json = serde_json::to_vec(&file).map_err(std::io::Error::other)?;
        vmm_core::atomic_file::write_atomic(&self.path, &json)
    }
}

/// Reads the file at `path` and, when it is clean and matches `maps` (size and block geometry
/// per disk), merges its blocks into them; the reference point, or why there is none.
fn load(path: &Path, maps: &[(u64, Arc<ChangedBlockMap>)]) -> Result<ReferencePointId, String> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(NO_REFERENCE_YET.into());
        }
        Err(e) => return Err(format!("the change tracking file cannot be read: {e}")),
    };
    let file: TrackingFile = serde_json::from_slice(&bytes)
        .map_err(|e| format!("the change tracking file is damaged: {e}"))?;
    if file.version != VERSION {
        return Err(format!(
            "the change tracking file has version {}",
            file.version
        ));
    }
    if !file.clean {
        return Err(STOPPED_UNCLEANLY.into());
    }
    let Some(reference) = file.reference else {
        return Err(file
            .untracked_reason
            .unwrap_or_else(|| NO_REFERENCE_YET.into()));
    };
    if file.disks.len() != maps.len() {
        return Err("the VM's disks changed".into());
    }
    for (index, (disk, (size, map))) in file.disks.iter().zip(maps).enumerate() {
        if disk.disk_size != *size {
            return Err(format!("disk size changed (disk {index})"));
        }
        if disk.blocks.block_size() != map.block_size()
            || disk.blocks.block_count() != map.block_count()
        {
            return Err(format!("tracking block size changed (disk {index})"));
        }
    }
    for (disk, (_, map)) in file.disks.iter().zip(maps) {
        // Geometry checked above: cannot fail.
        let _ = map.merge(&disk.blocks);
    }
    Ok(reference)
}

/// Each disk's size and changed-block map in `partition`.
fn current_maps(partition: &Partition) -> Vec<(u64, Arc<ChangedBlockMap>)> {
    (0..partition.config().disks.len())
        .filter_map(|index| {
            let size = partition.disk_backend(index)?.size();
            Some((size, partition.changed_blocks(index)?.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BLOCK: u64 = 64 * 1024;

    fn maps(sizes: &[u64]) -> Vec<(u64, Arc<ChangedBlockMap>)> {
        sizes
            .iter()
            .map(|&size| (size, Arc::new(ChangedBlockMap::new(size, BLOCK).unwrap())))
            .collect()
    }

    fn tracking(path: &Path, maps: Vec<(u64, Arc<ChangedBlockMap>)>) -> ChangeTracking {
        ChangeTracking {
            path: path.to_path_buf(),
            reference: None,
            untracked_reason: None,
            maps,
            marked_in_use: true,
        }
    }

    #[test]
    fn diskless_vm_keeps_its_clean_file_until_a_capture_moves_the_reference() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(snapshot::folder::CHANGE_TRACKING_FILE);
        let first = ReferencePointId::new_random();
        let mut earlier = tracking(&path, Vec::new());
        earlier.set_reference(first);
        earlier.write_clean();
        // A worker of the diskless VM that started on the clean file without rewriting it.
        let mut running = tracking(&path, Vec::new());
        running.marked_in_use = false;
        let while_running = load(&path, &[]);

        running.set_reference(ReferencePointId::new_random());
        // Killed here: no clean end.
        let after_capture = load(&path, &[]);

        assert_eq!(while_running, Ok(first));
        assert_eq!(after_capture, Err(STOPPED_UNCLEANLY.into()));
    }

    #[test]
    fn clean_file_restores_reference_and_marks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(snapshot::folder::CHANGE_TRACKING_FILE);
        let reference = ReferencePointId::new_random();
        let before = maps(&[1 << 20]);
        before[0].1.mark(3 * BLOCK, 10);
        let mut writer = tracking(&path, before);
        writer.set_reference(reference);
        writer.write_clean();
        let after = maps(&[1 << 20]);

        let loaded = load(&path, &after);

        assert_eq!(loaded, Ok(reference));
        assert!(after[0].1.is_marked(3));
        assert_eq!(after[0].1.count(), 1);
    }

    #[test]
    fn file_in_use_or_for_other_disks_gives_no_reference_and_no_marks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(snapshot::folder::CHANGE_TRACKING_FILE);
        let mut writer = tracking(&path, maps(&[1 << 20]));
        writer.set_reference(ReferencePointId::new_random());
        writer.maps[0].1.mark(0, 1);
        writer.write_clean();
        let resized = maps(&[2 << 20]);
        let more_disks = maps(&[1 << 20, 1 << 20]);
        let resized_result = load(&path, &resized);
        let more_disks_result = load(&path, &more_disks);
        writer.write(false).unwrap();

        let in_use = load(&path, &maps(&[1 << 20]));

        assert_eq!(resized_result, Err("disk size changed (disk 0)".into()));
        assert_eq!(more_disks_result, Err("the VM's disks changed".into()));
        assert_eq!(in_use, Err(STOPPED_UNCLEANLY.into()));
        assert_eq!(resized[0].1.count() + more_disks[0].1.count(), 0);
        assert_eq!(
            load(&dir.path().join("absent"), &resized),
            Err(NO_REFERENCE_YET.into())
        );
    }

    proptest! {
        #[test]
        fn any_file_contents_load_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("change-tracking.json");
            std::fs::write(&path, &bytes).unwrap();
            let maps = maps(&[1 << 20]);

            let loaded = load(&path, &maps);

            prop_assert!(loaded.is_err());
            prop_assert_eq!(maps[0].1.count(), 0);
        }
    }
}
