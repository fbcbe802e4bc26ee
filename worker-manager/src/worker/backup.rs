//! A backup's disk capture and merge, done by the worker while its guest runs (the disk side of
//! Hyper-V's VSS writer and of its recovery checkpoints).
//!
//! Capture: each disk's overlay is created on its current image while the guest runs; then in
//! one short pause (vCPUs parked, the disks' in-flight requests finished) each disk switches to
//! its overlay and its changed-block map is taken (the blocks written since the previous
//! reference point), and the maps count from the new reference point. The images below the
//! overlays hold the disks exactly as they were at that instant.
//!
//! Merge: the overlay's data is copied into the image below it while the guest runs, through
//! the very overlay the guest writes (so its allocation is current) and a second, unlocked
//! handle on the image (the overlay's chain holds the image open, read-only, and only reads the
//! ranges the overlay does not hide; the merge writes only ranges it hides). What the guest writes
//! meanwhile is found in the disk's changed-block map: the merge takes the map before each pass
//! and puts every bit it took back at the end, so change tracking never misses a write. A few
//! passes shrink that set; the last is copied in a short pause, in which the disk moves back onto
//! its image. Then the overlay is deleted.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use partition::devices::virtio::{ChangedBlockMap, ChangedBlocks as TakenBlocks};
use partition::{Partition, PartitionConfig, RunState};
use vmm_core::integration::{
    BackupCaptureReport, BackupCaptureRequest, BackupMergeRequest, ChangedBlocks,
};
use vmm_core::{error_chain, fault};

use super::change_tracking::{BACKUP_ABORTED, ChangeTracking};
use super::disks;
use super::machine::partition_failure;
use super::overlays::{
    Switched, attach, check_overlays, create_overlays, detach, io_failure, remove_overlays,
    switch_back, switch_disks,
};
use crate::protocol::{BackupMergeReport, Failure};

/// The disks a merge switched back onto their images (index, overlay), and the failure that
/// stopped it from switching the others.
type SwitchedBack = (Vec<(usize, PathBuf)>, Option<Failure>);

/// Copy passes while the guest runs, after the first full one, at most.
const MERGE_PASSES: usize = 4;
/// A set of changed blocks this small is left for the final pause.
const SMALL_SET: u64 = 16;
/// Bytes read and written at a time.
const CHUNK: usize = 1 << 20;

/// A disk a backup captured, on its overlay until merged.
pub(crate) struct Captured {
    index: usize,
    /// The image below the overlay (the disk's image before the capture).
    image: PathBuf,
    overlay: PathBuf,
    /// The overlay as the guest writes it.
    disk: Arc<snapshot::Disk>,
}

/// Captures the disks `request` lists (see the module notes); the guest is left in the run
/// state it was in. On error every disk is on its image, no overlay exists and the maps and the
/// reference point are as they were.
pub(crate) fn capture(
    partition: &mut Partition,
    config: &mut PartitionConfig,
    tracking: &mut ChangeTracking,
    captured: &mut Vec<Captured>,
    request: &BackupCaptureRequest,
) -> Result<BackupCaptureReport, Failure> {
    let was_running = was_running(partition)?;
    if request.overlays.is_empty() {
        return Err(Failure::failed("a capture needs at least one disk"));
    }
    check_overlays(config, &request.overlays)?;
    if let Some(c) = request
        .overlays
        .iter()
        .find_map(|o| captured.iter().find(|c| c.index == o.disk))
    {
        return Err(Failure::invalid_state(format!(
            "disk {} is still on the overlay {} of a backup not merged",
            c.index,
            c.overlay.display()
        )));
    }
    // Flushed while the guest runs, the disks have little left to flush in the pause.
    for overlay in &request.overlays {
        if let Some(disk) = partition.disk_backend(overlay.disk) {
            disk.flush().map_err(|e| io_failure("flush the disk", e))?;
        }
    }
    create_overlays(partition, config, &request.overlays)?;
    let quiesce_started = Instant::now();
    if was_running && let Err(failure) = pause(partition) {
        remove_overlays(&request.overlays);
        return Err(failure);
    }
    let mut switched = Vec::new();
    let result = switch_disks(partition, config, &request.overlays, &mut switched)
        .and_then(|()| fault_failure("worker.backup.after-switch"));
    if let Err(failure) = result {
        undo_capture(partition, config, switched, &request.overlays, was_running);
        return Err(failure);
    }
    let mut taken = Vec::new();
    let mut changes = Vec::new();
    for disk in &switched {
        if let Some(map) = partition.changed_blocks(disk.index) {
            let blocks = map.take();
            let size = disk_size(partition, disk.index);
            changes.push(changed_blocks(disk.index, size, &blocks));
            taken.push((map.clone(), blocks));
        }
    }
    let previous = tracking.reference();
    tracking.set_reference(request.reference);
    let resumed = fits_in_a_reply(&changes).and_then(|()| match was_running {
        true => partition.resume().map_err(|e| partition_failure(&e)),
        false => Ok(()),
    });
    if let Err(failure) = resumed {
        put_back(&taken);
        tracking.restore_reference(previous);
        undo_capture(partition, config, switched, &request.overlays, was_running);
        return Err(failure);
    }
    let quiesce = quiesce_started.elapsed();
    captured.extend(switched.into_iter().map(|s: Switched| Captured {
        index: s.index,
        image: s.old_path,
        overlay: s.overlay,
        disk: s.disk,
    }));
    let (previous_reference, untracked_reason) = previous;
    Ok(BackupCaptureReport {
        previous_reference,
        untracked_reason,
        changes,
        quiesce,
    })
}

/// Switches `switched` back, removes the overlays, and resumes the guest if it was running.
fn undo_capture(
    partition: &mut Partition,
    config: &mut PartitionConfig,
    switched: Vec<Switched>,
    overlays: &[vmm_core::DiskOverlay],
    resume: bool,
) {
    switch_back(partition, config, switched);
    remove_overlays(overlays);
    if resume {
        // Best effort: the reply says the capture failed either way.
        let _ = partition.resume();
    }
}

/// Merges the overlays `request` lists back into their images (see the module notes), and
/// drops the reference point unless `request.keep_reference`. The guest is left in the run
/// state it was in. A disk not on its overlay is left alone.
pub(crate) fn merge(
    partition: &mut Partition,
    config: &mut PartitionConfig,
    tracking: &mut ChangeTracking,
    captured: &mut Vec<Captured>,
    request: &BackupMergeRequest,
) -> Result<BackupMergeReport, Failure> {
    let was_running = was_running(partition)?;
    let mut merging = Vec::new();
    for overlay in &request.overlays {
        let on_overlay = config
            .disks
            .get(overlay.disk)
            .is_some_and(|d| d.path == overlay.path);
        let position = captured
            .iter()
            .position(|c| c.index == overlay.disk && c.overlay == overlay.path);
        match (on_overlay, position) {
            (false, _) => {}
            (true, Some(at)) => merging.push(captured.swap_remove(at)),
            (true, None) => {
                captured.append(&mut merging);
                return Err(Failure::failed(format!(
                    "disk {} is on {}, which this worker did not capture",
                    overlay.disk,
                    overlay.path.display()
                )));
            }
        }
    }
    let mut report = BackupMergeReport {
        final_quiesce: Duration::ZERO,
        bytes_copied: 0,
        disks_merged: 0,
    };
    let mut taken = Vec::new();
    let result = merge_disks(
        partition,
        config,
        &mut merging,
        &mut taken,
        was_running,
        &mut report,
    );
    // The merge read the maps only to find the guest's writes: every bit goes back.
    put_back(&taken);
    captured.append(&mut merging);
    result?;
    if !request.keep_reference {
        tracking.drop_reference(BACKUP_ABORTED);
    }
    Ok(report)
}

/// Merges the overlays `request` lists into their images once the guest has stopped on its own
/// (powered off, say, between a capture and its merge): an offline commit of each overlay, the
/// disk then on its image for a later reset. Drops the reference point unless
/// `request.keep_reference`.
pub(crate) fn merge_stopped(
    config: &mut PartitionConfig,
    tracking: &mut ChangeTracking,
    captured: &mut Vec<Captured>,
    request: &BackupMergeRequest,
) -> Result<BackupMergeReport, Failure> {
    let mut report = BackupMergeReport {
        final_quiesce: Duration::ZERO,
        bytes_copied: 0,
        disks_merged: 0,
    };
    for overlay in &request.overlays {
        let index = overlay.disk;
        if config
            .disks
            .get(index)
            .is_none_or(|d| d.path != overlay.path)
        {
            continue;
        }
        let Some(at) = captured
            .iter()
            .position(|c| c.index == index && c.overlay == overlay.path)
        else {
            return Err(Failure::failed(format!(
                "disk {index} is on {}, which this worker did not capture",
                overlay.path.display()
            )));
        };
        let Captured { image, disk, .. } = captured.swap_remove(at);
        // Every handle on the chain goes, so the commit can lock the image for writing.
        config.disks[index].backend = None;
        drop(disk);
        let mut progress = snapshot::ProgressCounter::default();
        if let Err(error) = snapshot::commit_into_backing(&overlay.path, &mut progress) {
            let failure = Failure::failed(error_chain(&error));
            let reopened = disks::open_writable(&overlay.path).map_err(|e| error_chain(&e));
            match reopened {
                Ok(disk) => {
                    config.disks[index].backend = Some(disk.clone());
                    captured.push(Captured {
                        index,
                        image,
                        overlay: overlay.path.clone(),
                        disk,
                    });
                }
                Err(again) => log_line!("worker: cannot reopen disk {index}: {again}"),
            }
            return Err(failure);
        }
        report.bytes_copied += progress.done;
        report.disks_merged += 1;
        match disks::open_writable(&image) {
            Ok(disk) => config.disks[index].backend = Some(disk),
            Err(error) => log_line!(
                "worker: cannot reopen disk {index}: {}",
                error_chain(&error)
            ),
        }
        config.disks[index].path = image;
        if let Err(error) = snapshot::durable::remove_file(&overlay.path) {
            log_line!(
                "worker: cannot remove {}: {}",
                overlay.path.display(),
                error_chain(&error)
            );
        }
    }
    if !request.keep_reference {
        tracking.drop_reference(BACKUP_ABORTED);
    }
    Ok(report)
}

/// The copy passes and the final pause. Disks merged are removed from `merging`; every map bit
/// taken is pushed on `taken`.
fn merge_disks(
    partition: &mut Partition,
    config: &mut PartitionConfig,
    merging: &mut Vec<Captured>,
    taken: &mut Vec<(Arc<ChangedBlockMap>, TakenBlocks)>,
    was_running: bool,
    report: &mut BackupMergeReport,
) -> Result<(), Failure> {
    if merging.is_empty() {
        return Ok(());
    }
    let mut copies = Vec::new();
    for disk in merging.iter() {
        let image = snapshot::Disk::open_below_running_overlay(&disk.image)
            .map_err(|e| Failure::failed(error_chain(&e)))?;
        let map = partition
            .changed_blocks(disk.index)
            .cloned()
            .ok_or_else(|| Failure::failed(format!("there is no disk {}", disk.index)))?;
        copies.push((map, image));
    }
    // Pass 0: everything the overlay holds. From here on the map names what the guest wrote.
    for (disk, (map, image)) in merging.iter().zip(&copies) {
        taken.push((map.clone(), map.take()));
        report.bytes_copied += copy_extents(&disk.disk, image, 0, disk.disk.size())?;
    }
    let mut previous = u64::MAX;
    for _ in 0..MERGE_PASSES {
        let mut count = 0;
        for (disk, (map, image)) in merging.iter().zip(&copies) {
            let blocks = map.take();
            count += blocks.count();
            report.bytes_copied += copy_blocks(&disk.disk, image, &blocks)?;
            taken.push((map.clone(), blocks));
        }
        if count <= SMALL_SET || count >= previous {
            break;
        }
        previous = count;
    }
    // Most of the data is made durable now, so the pause has little to write.
    for (_, image) in &copies {
        image
            .flush()
            .map_err(|e| io_failure("flush the image", e))?;
    }
    fault_failure("worker.backup.merge-before-pause")?;

    let quiesce_started = Instant::now();
    if was_running {
        pause(partition)?;
    }
    let finished = finish(partition, config, merging, copies, taken, report);
    if was_running {
        partition.resume().map_err(|e| partition_failure(&e))?;
    }
    report.final_quiesce = quiesce_started.elapsed();
    let (merged, failure) = finished?;
    report.disks_merged = merged.len();
    for (index, overlay) in merged {
        // The image holds the overlay's data durably before the overlay goes; until then a
        // crash leaves the overlay, which an offline commit finishes.
        let synced = partition
            .disk_backend(index)
            .map_or(Ok(()), |disk| disk.flush());
        if let Err(error) = synced {
            log_line!(
                "worker: cannot sync disk {index}, keeping {}: {error}",
                overlay.display()
            );
            continue;
        }
        // The disk no longer uses it; a leftover is harmless (the next merge skips the disk).
        if let Err(error) = snapshot::durable::remove_file(&overlay) {
            log_line!(
                "worker: cannot remove {}: {}",
                overlay.display(),
                error_chain(&error)
            );
        }
    }
    failure.map_or(Ok(()), Err)
}

/// In the pause: copies the last writes and switches each disk onto its image; the disks
/// switched and their overlays, and why the others were not (they stay in `merging`, on their
/// overlays).
fn finish(
    partition: &mut Partition,
    config: &mut PartitionConfig,
    merging: &mut Vec<Captured>,
    copies: Vec<(Arc<ChangedBlockMap>, snapshot::Disk)>,
    taken: &mut Vec<(Arc<ChangedBlockMap>, TakenBlocks)>,
    report: &mut BackupMergeReport,
) -> Result<SwitchedBack, Failure> {
    for (disk, (map, image)) in merging.iter().zip(&copies) {
        let blocks = map.take();
        report.bytes_copied += copy_blocks(&disk.disk, image, &blocks)?;
        taken.push((map.clone(), blocks));
        // The guest's own open of the image must read the metadata written through this one;
        // durability waits until the guest runs again.
        image
            .write_back()
            .map_err(|e| io_failure("write the image's metadata", e))?;
    }
    // The unlocked handles go before the images are opened (and locked) for the guest.
    drop(copies);
    let mut merged = Vec::new();
    let mut failure = None;
    for disk in std::mem::take(merging) {
        if failure.is_some() {
            merging.push(disk);
            continue;
        }
        let index = disk.index;
        match switch_to_image(partition, config, disk) {
            Ok(overlay) => merged.push((index, overlay)),
            Err((disk, error)) => {
                merging.extend(disk);
                failure = Some(error);
            }
        }
    }
    Ok((merged, failure))
}

/// Moves disk `captured` from its overlay back onto its image (the guest is paused); the
/// overlay's path. On failure the disk is back on its overlay, returned as captured (`None`
/// when even the overlay could not be reopened: the disk then fails the guest's requests).
fn switch_to_image(
    partition: &mut Partition,
    config: &mut PartitionConfig,
    captured: Captured,
) -> Result<PathBuf, (Option<Captured>, Failure)> {
    let size = captured.disk.size();
    if let Err(failure) = captured
        .disk
        .write_back()
        .map_err(|e| io_failure("write the overlay's metadata", e))
        .and_then(|()| detach(partition, config, captured.index, &captured.overlay, size))
    {
        return Err((Some(captured), failure));
    }
    let Captured {
        index,
        image,
        overlay,
        disk,
    } = captured;
    // The last handle on the overlay's chain: the image's read lock goes with it.
    drop(disk);
    let attached = fault_failure("worker.backup.merge-switch")
        .and_then(|()| disks::open_writable(&image).map_err(|e| Failure::failed(error_chain(&e))))
        .and_then(|backend| attach(partition, config, index, &image, backend));
    let Err(failure) = attached else {
        return Ok(overlay);
    };
    let reopened = disks::open_writable(&overlay)
        .map_err(|e| Failure::failed(error_chain(&e)))
        .and_then(|disk| attach(partition, config, index, &overlay, disk.clone()).map(|()| disk));
    match reopened {
        Ok(disk) => Err((
            Some(Captured {
                index,
                image,
                overlay,
                disk,
            }),
            failure,
        )),
        Err(again) => {
            log_line!(
                "worker: disk {index} is on neither {} nor {}: {again}",
                image.display(),
                overlay.display()
            );
            Err((None, failure))
        }
    }
}

/// Copies what `overlay` stores in `[offset, offset + length)` (data and explicit zeros) into
/// `image`; the bytes written.
fn copy_extents(
    overlay: &snapshot::Disk,
    image: &snapshot::Disk,
    offset: u64,
    length: u64,
) -> Result<u64, Failure> {
    let extents = overlay
        .allocation_in(offset, length)
        .map_err(|e| Failure::failed(error_chain(&e)))?;
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0;
    for extent in extents {
        let end = extent.offset + extent.length;
        match extent.allocation {
            snapshot::Allocation::Unallocated => {}
            snapshot::Allocation::Zero => {
                image
                    .write_zeroes(extent.offset, extent.length)
                    .map_err(|e| io_failure("write zeros into the image", e))?;
                written += extent.length;
            }
            snapshot::Allocation::Data => {
                let mut at = extent.offset;
                while at < end {
                    let n = (end - at).min(CHUNK as u64) as usize;
                    overlay
                        .read(at, &mut buf[..n])
                        .map_err(|e| io_failure("read the overlay", e))?;
                    image
                        .write(at, &buf[..n])
                        .map_err(|e| io_failure("write the image", e))?;
                    at += n as u64;
                    written += n as u64;
                }
            }
        }
    }
    Ok(written)
}

/// Copies what `overlay` stores in the blocks of `blocks` into `image`; the bytes written.
fn copy_blocks(
    overlay: &snapshot::Disk,
    image: &snapshot::Disk,
    blocks: &TakenBlocks,
) -> Result<u64, Failure> {
    let size = blocks.block_size();
    let mut written = 0;
    let mut run: Option<(u64, u64)> = None;
    for block in blocks.iter() {
        match &mut run {
            Some((start, count)) if *start + *count == block => *count += 1,
            _ => {
                if let Some((start, count)) = run.take() {
                    written += copy_extents(overlay, image, start * size, count * size)?;
                }
                run = Some((block, 1));
            }
        }
    }
    if let Some((start, count)) = run {
        written += copy_extents(overlay, image, start * size, count * size)?;
    }
    Ok(written)
}

/// Refuses changes whose reply would not fit in one control frame (the parent would never see
/// it): about 200 GiB of disk changed everywhere, far more when changes are sparse.
fn fits_in_a_reply(changes: &[ChangedBlocks]) -> Result<(), Failure> {
    // JSON: each word's decimal digits and a comma; the rest of the reply is small.
    let digits = |w: u64| w.checked_ilog10().map_or(1, |d| u64::from(d) + 1);
    let bytes: u64 = changes
        .iter()
        .flat_map(|c| &c.words)
        .map(|&w| digits(w) + 1)
        .sum();
    if bytes + 64 * 1024 > u64::from(crate::protocol::MAX_FRAME_LEN) {
        return Err(Failure::failed(format!(
            "the changed-block maps ({bytes} bytes encoded) do not fit in one reply"
        )));
    }
    Ok(())
}

/// Marks every taken set again in the map it came from.
fn put_back(taken: &[(Arc<ChangedBlockMap>, TakenBlocks)]) {
    for (map, blocks) in taken {
        // A set taken from this very map: its geometry matches.
        let _ = map.merge(blocks);
    }
}

/// A taken set in the seam's form.
fn changed_blocks(disk: usize, disk_size: u64, blocks: &TakenBlocks) -> ChangedBlocks {
    let mut words = vec![0u64; blocks.block_count().div_ceil(64) as usize];
    for block in blocks.iter() {
        if let Some(word) = words.get_mut((block / 64) as usize) {
            *word |= 1 << (block % 64);
        }
    }
    ChangedBlocks {
        disk,
        block_size: blocks.block_size(),
        disk_size,
        words,
    }
}

fn disk_size(partition: &Partition, index: usize) -> u64 {
    partition.disk_backend(index).map_or(0, |b| b.size())
}

/// Whether the guest runs (`false`: paused or not yet started); a stopped guest is refused.
fn was_running(partition: &Partition) -> Result<bool, Failure> {
    match partition.run_state() {
        RunState::Running => Ok(true),
        RunState::Paused | RunState::Created => Ok(false),
        RunState::Stopped(reason) => Err(Failure::invalid_state(format!(
            "guest has stopped: {reason}"
        ))),
    }
}

/// Parks the vCPUs and finishes the disks' in-flight requests; a guest that stopped on its own
/// meanwhile is an error.
fn pause(partition: &mut Partition) -> Result<(), Failure> {
    partition.pause().map_err(|e| partition_failure(&e))?;
    if let RunState::Stopped(reason) = partition.run_state() {
        return Err(Failure::invalid_state(format!(
            "guest stopped during the backup: {reason}"
        )));
    }
    Ok(())
}

/// A fault-injection point (kill or delay, see [`vmm_core::fault`]) inside a chain of steps.
fn fault_failure(name: &str) -> Result<(), Failure> {
    fault::point(name);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK: u64 = 64 * 1024;

    #[test]
    fn copy_blocks_writes_only_what_the_overlay_holds_in_the_marked_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let top = dir.path().join("top.qcow2");
        snapshot::create_qcow2(&base, 8 * BLOCK).unwrap();
        snapshot::open_disk(&base, false)
            .unwrap()
            .write(5 * BLOCK, &[5u8; 512])
            .unwrap();
        snapshot::create_overlay(&top, &base).unwrap();
        let overlay = snapshot::open_disk(&top, false).unwrap();
        overlay.write(BLOCK, &[1u8; 512]).unwrap();
        overlay.write(2 * BLOCK, &[2u8; 512]).unwrap();
        let map = ChangedBlockMap::new(8 * BLOCK, BLOCK).unwrap();
        map.mark(BLOCK, 512);
        map.mark(5 * BLOCK, 512);
        let image = snapshot::Disk::open_below_running_overlay(&base).unwrap();

        let written = copy_blocks(&overlay, &image, &map.take()).unwrap();
        image.flush().unwrap();
        drop((overlay, image));

        let base = snapshot::open_disk(&base, true).unwrap();
        let read = |offset| {
            let mut byte = [0u8; 1];
            base.read(offset, &mut byte).unwrap();
            byte[0]
        };
        assert_eq!(
            written, BLOCK,
            "one cluster of the overlay, none of the base"
        );
        assert_eq!((read(BLOCK), read(2 * BLOCK), read(5 * BLOCK)), (1, 0, 5));
    }

    #[test]
    fn changes_convert_to_words_and_huge_ones_do_not_fit_a_reply() {
        let map = ChangedBlockMap::new(130 * BLOCK, BLOCK).unwrap();
        map.mark(0, 1);
        map.mark(129 * BLOCK, 1);
        let small = changed_blocks(0, 130 * BLOCK, &map.take());
        let huge = ChangedBlocks {
            disk: 0,
            block_size: BLOCK,
            disk_size: 1 << 50,
            words: vec![u64::MAX; 100_000],
        };

        assert_eq!(small.words, vec![1, 0, 1 << 1]);
        assert!(fits_in_a_reply(&[small]).is_ok());
        assert!(fits_in_a_reply(&[huge]).is_err());
    }
}
